//! The JSON shapes users read: the admin API's key record and the customer
//! usage endpoint (SPEC §3, §4). Both show the same balances; both settle
//! due refills first, so what they show is what the next request will see.

use serde_json::{json, Map, Value};

use crate::clock::Now;
use crate::config::{Config, Credits, Tier};
use crate::ledger::{credit_limit, duration_ms, KeyRecord, Usage};

/// `60s`, `500ms`: the way the config file writes windows.
pub fn window_text(d: std::time::Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{}ms", d.as_millis())
    }
}

fn rate_limits(tier: &Tier, usage: &mut Usage, now: Now) -> Map<String, Value> {
    let now_ms = now.steady_ms;
    tier.rate_limits
        .iter()
        .map(|(name, rl)| {
            let window_ms = duration_ms(rl.window);
            let window = usage.rate.slot(name);
            let used = window.used(window_ms, now_ms);
            let state = json!({
                "limit": rl.limit.get(),
                "window": window_text(rl.window),
                "remaining": rl.limit.get().saturating_sub(used),
                "resets_at": window.oldest_expiry_ms(window_ms, now_ms).and_then(|ms| now.wall_at(ms)),
                "shadow": rl.shadow,
            });
            (name.clone(), state)
        })
        .collect()
}

fn pools(tier: &Tier, usage: &mut Usage, now: Now) -> Map<String, Value> {
    let mut out = Map::new();
    for (name, pool) in &tier.pools {
        let state = usage.pools.slot(name);
        let limit = pool.limit.get();
        let (used, resets_at) = state.standing(pool, 0, now);
        out.insert(
            name.clone(),
            json!({
                "used": used,
                "limit": limit,
                "remaining": limit.saturating_sub(used),
                "resets_at": resets_at,
                "shadow": pool.shadow,
            }),
        );
    }
    // Pools this tier does not define are counted, not limited.
    for (name, state) in usage.pools.iter() {
        if !tier.pools.contains_key(name) {
            out.insert(
                name.to_string(),
                json!({ "used": state.total, "limit": null, "remaining": null, "resets_at": null }),
            );
        }
    }
    out
}

/// The admin API's key record.
pub fn key_record(
    config: &Config,
    record: &KeyRecord,
    usage: &mut Usage,
    now: impl Into<Now>,
) -> Value {
    let now = now.into();
    let tier = config.tier(&record.tier);
    if let Some(tier) = tier {
        usage.settle(tier, record.refill_day, now.wall);
    }
    let credits = match tier {
        Some(t) if t.credits != Credits::Unlimited => json!({
            "remaining": usage.remaining,
            "refill": t.refill.map(|r| json!({
                "interval": r.interval.name(),
                "amount": r.amount,
                "day": match r.interval.with_day(record.refill_day) {
                    crate::calendar::Interval::Monthly { day } => Some(day),
                    crate::calendar::Interval::Daily => None,
                },
            })),
            "last_refill_at": usage.period_start,
            "next_refill_at": Usage::next_refill(t, record.refill_day, now.wall),
        }),
        // The tier was removed from the config: the balance is kept (the
        // tier may come back), and shown as it stands, with no refill.
        None if usage.remaining.is_some() => json!({
            "remaining": usage.remaining,
            "refill": null,
            "last_refill_at": usage.period_start,
            "next_refill_at": null,
        }),
        _ => Value::Null,
    };
    let (pools, rate_limits) = match tier {
        Some(t) => (pools(t, usage, now), rate_limits(t, usage, now)),
        None => (Map::new(), Map::new()),
    };
    json!({
        "key_id": record.key_id,
        "start": record.start,
        "tier": record.tier,
        "external_id": record.external_id,
        "name": record.name,
        "meta": record.meta,
        "enabled": record.enabled,
        "expires_at": record.expires_at,
        "created_at": record.created_at,
        "refill_day": record.refill_day,
        "credits": credits,
        "pools": pools,
        "rate_limits": rate_limits,
        "overage": { "units": usage.overage },
    })
}

/// The customer usage endpoint's answer, for a key whose tier exists.
pub fn usage_report(
    tier: &Tier,
    record: &KeyRecord,
    usage: &mut Usage,
    now: impl Into<Now>,
) -> Value {
    let now = now.into();
    usage.settle(tier, record.refill_day, now.wall);
    let credits = match credit_limit(tier) {
        None => json!({ "used": usage.used, "limit": null, "remaining": null, "unlimited": true }),
        Some(limit) => json!({
            "used": usage.used,
            "limit": limit,
            "remaining": usage.remaining,
            "unlimited": false,
            "resets_at": Usage::next_refill(tier, record.refill_day, now.wall),
        }),
    };
    json!({
        "key_id": record.key_id,
        "tier": tier.id,
        "plan": tier.name,
        "usage": {
            "credits": credits,
            "rate_limits": rate_limits(tier, usage, now),
            "pools": pools(tier, usage, now),
            "overage": { "units": usage.overage },
        },
        "features": tier.features,
    })
}
