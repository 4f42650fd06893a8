//! The decision core: given the config, a key's record and usage, what a
//! request asks for, and `now`, decide and charge.
//!
//! No sockets and no Pingora types: the proxy, the admin `verify` call and
//! the benchmarks all call [`admit`]. Checks run in SPEC §3's order (enabled,
//! expiry, tier, feature, amounts, rate limits, pools, credits) and every
//! check runs before anything is charged, so a rejected request charges
//! nothing. The caller holds the key's lock across `admit`, which is what
//! makes concurrent requests on one key exact.

use std::sync::Arc;

use http::HeaderMap;
use jiff::Timestamp;

use crate::clock::Now;
use crate::config::{Amount, Config, Credits, Overage, PoolWindow, Route, Tier};
use crate::ledger::{duration_ms, KeyRecord, Usage};
use crate::reject::Rejection;

/// What a request asks of a key.
#[derive(Debug, Clone)]
pub struct Demand {
    pub feature: Option<Arc<str>>,
    /// Credits and pool units, or why they could not be read.
    pub amounts: Result<Amounts, Rejection>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Amounts {
    pub cost: u64,
    pub pools: Vec<(Arc<str>, u64)>,
}

impl Demand {
    /// What `route` charges, reading header amounts from `headers`.
    pub fn for_route(route: &Route, headers: &HeaderMap) -> Demand {
        let amounts = (|| {
            let cost = resolve(&route.cost, headers)?;
            let pools = route
                .pools
                .iter()
                .map(|(pool, amount)| Ok((pool.clone(), resolve(amount, headers)?)))
                .collect::<Result<_, Rejection>>()?;
            Ok(Amounts { cost, pools })
        })();
        Demand {
            feature: route.feature.clone(),
            amounts,
        }
    }
}

/// Largest amount anywhere (a header, a balance, a grant): 2^63 - 1, so
/// that every amount fits a signed 64-bit integer in any client.
pub const MAX_AMOUNT: u64 = i64::MAX as u64;

fn resolve(amount: &Amount, headers: &HeaderMap) -> Result<u64, Rejection> {
    match amount {
        Amount::Fixed(n) => Ok(*n),
        Amount::Header(name) => {
            let mut values = headers.get_all(name).iter();
            let value = match (values.next(), values.count()) {
                (Some(value), 0) => value,
                (None, _) => {
                    return Err(Rejection::bad_request(format!(
                        "header '{name}' is missing: this route charges the amount it gives, \
                         a decimal integer from 0 to {MAX_AMOUNT}"
                    )))
                }
                (Some(_), more) => {
                    return Err(Rejection::bad_request(format!(
                        "header '{name}' was sent {} times: send it once",
                        more + 1
                    )))
                }
            };
            parse_amount(value.as_bytes()).ok_or_else(|| {
                Rejection::bad_request(format!(
                    "header '{name}' must be a decimal integer from 0 to {MAX_AMOUNT}"
                ))
            })
        }
    }
}

/// An amount in a header (a request's cost, an upstream's metered units):
/// ASCII digits making an integer in 0..=2^63-1, with any number of leading
/// zeros and optional spaces or tabs around it (HTTP's optional whitespace,
/// not part of the value). No sign, no other characters, no wrapping or
/// capping: anything else is refused.
pub fn parse_amount(bytes: &[u8]) -> Option<u64> {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = bytes.iter().position(|b| !is_ows(b))?;
    let end = bytes.iter().rposition(|b| !is_ows(b))? + 1;
    let digits = &bytes[start..end];
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    // Leading zeros add nothing; a number too large overflows and is refused.
    digits
        .iter()
        .try_fold(0u64, |n, d| {
            n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .filter(|n| *n <= MAX_AMOUNT)
}

/// What was charged, kept so it can be given back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Charge {
    pub credits: u64,
    pub overage: u64,
    /// The credit period charged; a refund into a later period is dropped.
    pub period: Option<Timestamp>,
    pub pools: Vec<PoolCharge>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolCharge {
    pub pool: Arc<str>,
    pub units: u64,
    pub slot: Slot,
}

/// Where pool units were counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    /// A rolling window's bucket.
    Bucket(i64),
    /// A calendar period.
    Period(Option<Timestamp>),
    /// A pool the tier does not define: counted in its total only.
    Total,
}

/// The state of one rate limit after a request, for response headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateStatus {
    /// The limit's index in its tier's `rate_limits`.
    pub index: usize,
    pub limit: u64,
    pub remaining: u64,
    /// Seconds until the count next drops.
    pub reset: u64,
    pub window_secs: u64,
}

/// An allowed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    /// The key's tier: its index in [`Config::tiers`].
    pub tier: usize,
    pub charge: Charge,
    /// Credits left after the charge; `None` when unlimited.
    pub remaining: Option<u64>,
    /// The rate limit with the least room left.
    pub tightest: Option<RateStatus>,
    /// Every rate limit after the request, in tier order.
    pub rates: Vec<RateStatus>,
    /// Shadow limits or pools that would have refused this request.
    pub shadowed: Vec<String>,
}

/// Decides a request for a known key and charges it if allowed.
pub fn admit(
    config: &Config,
    record: &KeyRecord,
    usage: &mut Usage,
    demand: &Demand,
    now: impl Into<Now>,
) -> Result<Admission, Rejection> {
    let now = now.into();
    let (wall, now_ms) = (now.wall, now.steady_ms);
    if !record.enabled {
        return Err(Rejection::Disabled);
    }
    if let Some(expired_at) = record.expires_at.filter(|at| *at <= wall) {
        return Err(Rejection::Expired { expired_at });
    }
    let (tier_index, _, tier) =
        config
            .tiers
            .get_full(record.tier.as_str())
            .ok_or_else(|| Rejection::TierNotFound {
                tier: record.tier.to_string(),
            })?;
    if let Some(feature) = demand.feature.as_deref().filter(|f| !tier.has_feature(f)) {
        return Err(Rejection::FeatureNotAvailable {
            required: feature.to_string(),
            current_tier: tier.id.clone(),
            upgrade_url: tier.upgrade_url.clone(),
        });
    }
    let amounts = demand.amounts.as_ref().map_err(Clone::clone)?;
    usage.settle(tier, record.refill_day, wall);
    let mut shadowed = Vec::new();

    // Check everything first; nothing below mutates a balance until all pass.
    for (name, rl) in &tier.rate_limits {
        let window_ms = duration_ms(rl.window);
        let window = usage.rate.slot(name);
        window.used(window_ms, now_ms);
        let wait = window.wait_ms(1, rl.limit.get(), window_ms, now_ms);
        if wait != Some(0) {
            if rl.shadow {
                shadowed.push(name.clone());
            } else {
                return Err(Rejection::RateLimited {
                    limit: name.clone(),
                    retry_after: secs_ceil(wait.unwrap_or(window_ms)).max(1),
                });
            }
        }
    }
    for (name, units) in &amounts.pools {
        let Some(pool) = tier.pools.get(&**name) else {
            continue;
        };
        let limit = pool.limit.get();
        let state = usage.pools.slot(name);
        let (used, resets_at) = state.standing(pool, *units, now);
        if used.saturating_add(*units) > limit {
            if pool.shadow {
                shadowed.push(name.to_string());
            } else {
                return Err(Rejection::QuotaExceeded {
                    pool: name.to_string(),
                    units: *units,
                    remaining: limit.saturating_sub(used),
                    resets_at,
                });
            }
        }
    }
    let (credits, overage) = match tier.credits {
        Credits::Unlimited => (amounts.cost, 0),
        Credits::Limited(_) => {
            let remaining = usage.remaining.unwrap_or(0);
            if amounts.cost <= remaining {
                (amounts.cost, 0)
            } else if tier.overage == Overage::Allow {
                (remaining, amounts.cost - remaining)
            } else {
                return Err(Rejection::UsageExceeded {
                    cost: amounts.cost,
                    remaining,
                    resets_at: Usage::next_refill(tier, record.refill_day, wall),
                    upgrade_url: tier.upgrade_url.clone(),
                });
            }
        }
    };

    // Everything passed: charge it all.
    let mut rates = Vec::with_capacity(tier.rate_limits.len());
    for (index, (name, rl)) in tier.rate_limits.iter().enumerate() {
        let window_ms = duration_ms(rl.window);
        let window = usage.rate.slot(name);
        window.add(1, window_ms, now_ms);
        let used = window.units();
        let reset_ms = window
            .oldest_expiry_ms(window_ms, now_ms)
            .map_or(0, |at| (at - now_ms).max(0));
        rates.push(RateStatus {
            index,
            limit: rl.limit.get(),
            remaining: rl.limit.get().saturating_sub(used),
            reset: secs_ceil(reset_ms),
            window_secs: rl.window.as_secs(),
        });
    }
    let mut pools = Vec::with_capacity(amounts.pools.len());
    for (name, units) in &amounts.pools {
        let state = usage.pools.slot(name);
        state.total = state.total.saturating_add(*units);
        let slot = match tier.pools.get(&**name).map(|p| p.window) {
            Some(PoolWindow::Rolling(window)) => {
                Slot::Bucket(state.window.add(*units, duration_ms(window), now_ms))
            }
            Some(PoolWindow::Calendar(_)) => {
                state.used = state.used.saturating_add(*units);
                Slot::Period(state.period_start)
            }
            None => Slot::Total,
        };
        pools.push(PoolCharge {
            pool: name.clone(),
            units: *units,
            slot,
        });
    }
    if let Some(remaining) = usage
        .remaining
        .as_mut()
        .filter(|_| tier.credits != Credits::Unlimited)
    {
        *remaining -= credits;
    }
    usage.used = usage.used.saturating_add(credits);
    usage.overage = usage.overage.saturating_add(overage);
    usage.billing.credits = usage.billing.credits.saturating_add(amounts.cost);
    usage.billing.overage = usage.billing.overage.saturating_add(overage);
    if let (Some(reporting), Some(remaining)) = (&config.reporting, usage.remaining) {
        if tier.credits != Credits::Unlimited {
            usage.billing.detect(
                &reporting.thresholds,
                usage.used,
                remaining,
                usage.period_start,
                wall,
            );
        }
    }

    let tightest = rates
        .iter()
        .min_by_key(|r| (r.remaining, std::cmp::Reverse(r.reset)))
        .cloned();
    Ok(Admission {
        tier: tier_index,
        charge: Charge {
            credits,
            overage,
            period: usage.period_start,
            pools,
        },
        remaining: match tier.credits {
            Credits::Unlimited => None,
            Credits::Limited(_) => usage.remaining,
        },
        tightest,
        rates,
        shadowed,
    })
}

/// Gives back what [`admit`] charged (an upstream failure). Rate limits stay
/// counted: the request did reach the gateway. Credits charged in a period
/// that has since ended are not given back into the new one.
pub fn refund(tier: Option<&Tier>, usage: &mut Usage, charge: &Charge) {
    if usage.period_start == charge.period {
        if let Some(remaining) = usage.remaining.as_mut() {
            if tier.is_some_and(|t| t.credits != Credits::Unlimited) {
                *remaining = remaining.saturating_add(charge.credits);
            }
        }
        usage.used = usage.used.saturating_sub(charge.credits);
        usage.overage = usage.overage.saturating_sub(charge.overage);
    }
    let cost = charge.credits.saturating_add(charge.overage);
    usage.billing.credits = usage.billing.credits.saturating_sub(cost);
    usage.billing.overage = usage.billing.overage.saturating_sub(charge.overage);
    for pc in &charge.pools {
        let Some(state) = usage.pools.get_mut(&pc.pool) else {
            continue;
        };
        state.total = state.total.saturating_sub(pc.units);
        match pc.slot {
            Slot::Bucket(idx) => state.window.refund(pc.units, idx),
            Slot::Period(period) if period == state.period_start => {
                state.used = state.used.saturating_sub(pc.units);
            }
            Slot::Period(_) | Slot::Total => {}
        }
    }
}

/// Charges pool units reported by the upstream after the response. The work
/// is done, so this never refuses; it may take a pool past its limit.
pub fn meter(tier: Option<&Tier>, usage: &mut Usage, pool: &str, units: u64, now: impl Into<Now>) {
    let now = now.into();
    let state = usage.pools.slot(pool);
    state.total = state.total.saturating_add(units);
    match tier.and_then(|t| t.pools.get(pool)).map(|p| p.window) {
        Some(PoolWindow::Rolling(window)) => {
            state.window.add(units, duration_ms(window), now.steady_ms);
        }
        Some(PoolWindow::Calendar(interval)) => {
            let boundary = interval.period_start(now.wall);
            if state.period_start < boundary {
                state.used = 0;
                state.period_start = boundary;
            }
            state.used = state.used.saturating_add(units);
        }
        None => {}
    }
}

/// Whole seconds, rounded up, in a span of milliseconds.
fn secs_ceil(ms: i64) -> u64 {
    u64::try_from(ms).unwrap_or(0).div_ceil(1000)
}

#[cfg(test)]
mod tests;
