//! Unit and property tests of the decision core, moving time by hand.

use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use jiff::Timestamp;
use proptest::prelude::*;

use super::*;
use crate::clock::Now;
use crate::config::Config;
use crate::ledger::CreditPolicy;

const CONFIG: &str = r#"
upstreams:
  main: { url: "http://127.0.0.1:3000" }
tiers:
  free:
    credits: 5
    refill: { interval: daily, amount: 5 }
    rate_limits:
      requests: { limit: 3, window: 60s }
    pools:
      tokens: { limit: 100, window: 1h }
      exports: { limit: 2, refill: monthly }
    features: [api]
    upgrade_url: "https://example.com/up"
  monthly:
    credits: 10
    refill: { interval: monthly, amount: 10, day: 31 }
    features: [api]
  payg:
    credits: 2
    overage: allow
    features: [api]
  shadowy:
    credits: unlimited
    rate_limits:
      requests: { limit: 1, window: 60s, shadow: true }
    pools:
      tokens: { limit: 1, window: 1h, shadow: true }
    features: [api]
routes:
  - { name: data, path: /data, upstream: main, feature: api }
"#;

fn config() -> Config {
    Config::parse(CONFIG).expect("test config").config
}

fn ts(s: &str) -> Timestamp {
    s.parse().expect("timestamp")
}

fn record(tier: &str) -> KeyRecord {
    let hash = crate::keys::KeyHash::of("sk_test");
    KeyRecord::new(
        "key_test".into(),
        &hash,
        "sk_test",
        tier,
        ts("2026-01-01T00:00:00Z"),
    )
}

fn usage(config: &Config, tier: &str, now: Timestamp) -> Usage {
    Usage::new(&config.tiers[tier], None, None, now)
}

fn demand(cost: u64) -> Demand {
    Demand {
        feature: Some("api".into()),
        amounts: Ok(Amounts {
            cost,
            pools: Vec::new(),
        }),
    }
}

fn pools(cost: u64, pools: &[(&str, u64)]) -> Demand {
    Demand {
        feature: Some("api".into()),
        amounts: Ok(Amounts {
            cost,
            pools: pools.iter().map(|(p, n)| (Arc::from(*p), *n)).collect(),
        }),
    }
}

#[test]
fn checks_run_in_spec_order() {
    let c = config();
    let now = ts("2026-03-01T12:00:00Z");
    let mut u = usage(&c, "free", now);
    let bad_amount = Demand {
        feature: Some("missing".into()),
        amounts: Err(Rejection::bad_request("x")),
    };

    let mut r = record("free");
    r.enabled = false;
    r.expires_at = Some(ts("2026-02-01T00:00:00Z"));
    r.tier = "gone".into();
    assert_eq!(
        admit(&c, &r, &mut u, &bad_amount, now),
        Err(Rejection::Disabled)
    );
    r.enabled = true;
    assert!(matches!(
        admit(&c, &r, &mut u, &bad_amount, now),
        Err(Rejection::Expired { .. })
    ));
    r.expires_at = None;
    assert!(matches!(
        admit(&c, &r, &mut u, &bad_amount, now),
        Err(Rejection::TierNotFound { .. })
    ));
    r.tier = "free".into();
    let Err(Rejection::FeatureNotAvailable {
        required,
        current_tier,
        upgrade_url,
    }) = admit(&c, &r, &mut u, &bad_amount, now)
    else {
        panic!("expected FEATURE_NOT_AVAILABLE");
    };
    assert_eq!(
        (
            required.as_str(),
            current_tier.as_str(),
            upgrade_url.as_deref()
        ),
        ("missing", "free", Some("https://example.com/up"))
    );
    let bad_amount = Demand {
        feature: Some("api".into()),
        ..bad_amount
    };
    assert!(matches!(
        admit(&c, &r, &mut u, &bad_amount, now),
        Err(Rejection::BadRequest { .. })
    ));
    assert_eq!(u, usage(&c, "free", now), "rejections charged something");
}

#[test]
fn expiry_is_exact_to_the_instant() {
    let c = config();
    let at = ts("2026-03-01T12:00:00Z");
    let mut r = record("free");
    r.expires_at = Some(at);
    let mut u = usage(&c, "free", at);
    let before = at
        .checked_sub(jiff::SignedDuration::from_millis(1))
        .unwrap();
    assert!(admit(&c, &r, &mut u, &demand(1), before).is_ok());
    assert_eq!(
        admit(&c, &r, &mut u, &demand(1), at),
        Err(Rejection::Expired { expired_at: at })
    );
}

#[test]
fn credits_run_out_and_refill_at_utc_midnight() {
    let c = config();
    let r = record("free");
    let mut now = ts("2026-03-01T23:59:00Z");
    let mut u = usage(&c, "free", now);
    let a = admit(&c, &r, &mut u, &demand(4), now).expect("4 of 5");
    assert_eq!(a.remaining, Some(1));
    let refused = admit(&c, &r, &mut u, &demand(2), now).expect_err("2 of 1");
    assert_eq!(
        refused.body()["message"],
        "this request costs 2 credits and the key has 1 left"
    );
    let Rejection::UsageExceeded {
        cost,
        remaining,
        resets_at,
        upgrade_url,
    } = refused
    else {
        panic!("expected USAGE_EXCEEDED");
    };
    assert_eq!((cost, remaining), (2, 1));
    assert_eq!(resets_at, Some(ts("2026-03-02T00:00:00Z")));
    assert!(upgrade_url.is_some());
    now = ts("2026-03-02T00:00:00Z");
    let a = admit(&c, &r, &mut u, &demand(2), now).expect("refilled");
    assert_eq!(a.remaining, Some(3), "a refill sets, it does not add");
}

#[test]
fn monthly_day_31_refills_on_the_last_day_of_february_and_leap_day() {
    let c = config();
    let r = record("monthly");
    let start = ts("2027-01-31T10:00:00Z");
    let mut u = usage(&c, "monthly", start);
    admit(&c, &r, &mut u, &demand(10), start).expect("all credits");
    let feb27 = ts("2027-02-27T23:59:59Z");
    assert!(matches!(
        admit(&c, &r, &mut u, &demand(1), feb27),
        Err(Rejection::UsageExceeded { resets_at: Some(t), .. }) if t == ts("2027-02-28T00:00:00Z")
    ));
    let feb28 = ts("2027-02-28T00:00:00Z");
    assert_eq!(
        admit(&c, &r, &mut u, &demand(10), feb28).map(|a| a.remaining),
        Ok(Some(0))
    );

    // 2028 is a leap year: the boundary is Feb 29, not Feb 28.
    let leap_start = ts("2028-01-31T00:00:00Z");
    let mut u = usage(&c, "monthly", leap_start);
    admit(&c, &r, &mut u, &demand(10), leap_start).expect("all credits");
    assert!(admit(&c, &r, &mut u, &demand(1), ts("2028-02-28T23:59:59Z")).is_err());
    assert!(admit(&c, &r, &mut u, &demand(1), ts("2028-02-29T00:00:00Z")).is_ok());
}

#[test]
fn per_key_refill_day_moves_the_boundary() {
    let c = config();
    let mut r = record("monthly");
    r.refill_day = Some(15);
    let start = ts("2026-05-20T00:00:00Z");
    let mut u = Usage::new(&c.tiers["monthly"], None, Some(15), start);
    admit(&c, &r, &mut u, &demand(10), start).expect("all credits");
    assert!(admit(&c, &r, &mut u, &demand(1), ts("2026-06-14T23:59:59Z")).is_err());
    assert!(admit(&c, &r, &mut u, &demand(1), ts("2026-06-15T00:00:00Z")).is_ok());
}

#[test]
fn rate_limit_rejects_then_frees_with_retry_after() {
    let c = config();
    let r = record("free");
    let now = ts("2026-03-01T12:00:00Z");
    let mut u = usage(&c, "free", now);
    u.remaining = Some(100);
    for i in 0..3 {
        let a = admit(&c, &r, &mut u, &demand(0), now).expect("under limit");
        let t = a.tightest.expect("has a rate limit");
        assert_eq!((t.limit, t.remaining), (3, 2 - i));
    }
    let Err(Rejection::RateLimited { limit, retry_after }) = admit(&c, &r, &mut u, &demand(0), now)
    else {
        panic!("expected RATE_LIMITED");
    };
    assert_eq!(limit, "requests");
    // The window exactly: never 61 on a 60 s window.
    assert_eq!(retry_after, 60);
    let later = now
        .checked_add(Duration::from_secs(retry_after))
        .expect("in range");
    assert!(admit(&c, &r, &mut u, &demand(0), later).is_ok());
}

/// A key moved to a tier without a rate limit forgets that limit's
/// window; one on a tier with it keeps counting.
#[test]
fn limits_the_tier_no_longer_has_are_forgotten() {
    let c = config();
    let now = ts("2026-03-01T12:00:00Z");
    let mut u = usage(&c, "free", now);
    u.remaining = Some(100);
    let r = record("free");
    admit(&c, &r, &mut u, &demand(0), now).expect("under limit");
    u.settle(&c.tiers["free"], None, now);
    assert_eq!(u.rate.keys().collect::<Vec<_>>(), ["requests"]);
    u.settle(&c.tiers["monthly"], None, now);
    assert!(u.rate.is_empty(), "{:?}", u.rate);
}

#[test]
fn rejected_request_charges_nothing_anywhere() {
    let c = config();
    let r = record("free");
    let now = ts("2026-03-01T12:00:00Z");
    let mut u = usage(&c, "free", now);
    admit(&c, &r, &mut u, &pools(1, &[("tokens", 90)]), now).expect("fits");
    let before = u.clone();
    // Pool would overflow: no credit, no rate slot, no pool units taken.
    assert!(matches!(
        admit(&c, &r, &mut u, &pools(1, &[("tokens", 11)]), now),
        Err(Rejection::QuotaExceeded { remaining: 10, .. })
    ));
    // Credits would overflow: the pool is untouched too.
    assert!(matches!(
        admit(&c, &r, &mut u, &pools(5, &[("tokens", 1)]), now),
        Err(Rejection::UsageExceeded { .. })
    ));
    assert_eq!(u, before);
}

#[test]
fn calendar_pool_resets_monthly() {
    let c = config();
    let r = record("free");
    let now = ts("2026-03-31T12:00:00Z");
    let mut u = usage(&c, "free", now);
    admit(&c, &r, &mut u, &pools(0, &[("exports", 2)]), now).expect("fits");
    let Err(Rejection::QuotaExceeded {
        pool, resets_at, ..
    }) = admit(&c, &r, &mut u, &pools(0, &[("exports", 1)]), now)
    else {
        panic!("expected QUOTA_EXCEEDED");
    };
    assert_eq!(pool, "exports");
    assert_eq!(resets_at, Some(ts("2026-04-01T00:00:00Z")));
    assert!(admit(
        &c,
        &r,
        &mut u,
        &pools(0, &[("exports", 2)]),
        ts("2026-04-01T00:00:00Z")
    )
    .is_ok());
}

#[test]
fn undefined_pool_is_counted_not_limited() {
    let c = config();
    let r = record("monthly");
    let now = ts("2026-03-01T12:00:00Z");
    let mut u = usage(&c, "monthly", now);
    admit(&c, &r, &mut u, &pools(0, &[("tokens", 1_000_000)]), now).expect("not limited");
    assert_eq!(u.pools.get("tokens").expect("tokens").total, 1_000_000);
}

#[test]
fn overage_allow_serves_past_zero_and_counts_units() {
    let c = config();
    let r = record("payg");
    let now = ts("2026-03-01T12:00:00Z");
    let mut u = usage(&c, "payg", now);
    let a = admit(&c, &r, &mut u, &demand(3), now).expect("allowed");
    assert_eq!((a.charge.credits, a.charge.overage), (2, 1));
    let a = admit(&c, &r, &mut u, &demand(4), now).expect("allowed");
    assert_eq!(
        (a.charge.credits, a.charge.overage, a.remaining),
        (0, 4, Some(0))
    );
    assert_eq!(u.overage, 5);
}

#[test]
fn shadow_limits_count_but_never_refuse() {
    let c = config();
    let r = record("shadowy");
    let now = ts("2026-03-01T12:00:00Z");
    let mut u = usage(&c, "shadowy", now);
    admit(&c, &r, &mut u, &pools(1, &[("tokens", 1)]), now).expect("first");
    let a = admit(&c, &r, &mut u, &pools(1, &[("tokens", 1)]), now).expect("shadow");
    assert_eq!(a.shadowed, ["requests", "tokens"]);
    assert_eq!(a.remaining, None);
    assert_eq!(
        u.pools
            .get("tokens")
            .expect("tokens")
            .window
            .clone()
            .used(3_600_000, now.as_millisecond()),
        2
    );
}

#[test]
fn refund_restores_credits_and_pools_in_the_same_period() {
    let c = config();
    let tier = c.tier("free");
    let r = record("free");
    let now = ts("2026-03-01T12:00:00Z");
    let mut u = usage(&c, "free", now);
    let a = admit(
        &c,
        &r,
        &mut u,
        &pools(2, &[("tokens", 50), ("exports", 1)]),
        now,
    )
    .expect("ok");
    refund(tier, &mut u, &a.charge);
    assert_eq!(u.remaining, Some(5));
    assert_eq!(u.used, 0);
    assert_eq!(
        u.pools
            .get("tokens")
            .expect("tokens")
            .window
            .clone()
            .used(3_600_000, now.as_millisecond()),
        0
    );
    assert_eq!(u.pools.get("exports").expect("exports").used, 0);

    // A refund after the period rolled over must not top up the new period.
    let a = admit(&c, &r, &mut u, &demand(2), now).expect("ok");
    let tomorrow = ts("2026-03-02T00:00:01Z");
    admit(&c, &r, &mut u, &demand(1), tomorrow).expect("refilled");
    refund(tier, &mut u, &a.charge);
    assert_eq!(u.remaining, Some(4));
}

#[test]
fn meter_charges_after_the_fact_even_past_the_limit() {
    let c = config();
    let tier = c.tier("free");
    let now = ts("2026-03-01T12:00:00Z");
    let mut u = usage(&c, "free", now);
    meter(tier, &mut u, "tokens", 150, now);
    assert!(matches!(
        admit(
            &c,
            &record("free"),
            &mut u,
            &pools(0, &[("tokens", 1)]),
            now
        ),
        Err(Rejection::QuotaExceeded { remaining: 0, .. })
    ));
}

#[test]
fn header_amounts_parse_strictly() {
    let route = config().routes[0].clone();
    let route = crate::config::Route {
        cost: Amount::Header(http::header::HeaderName::from_static("x-cost")),
        ..route
    };
    let with = |v: &[&str]| {
        let mut h = HeaderMap::new();
        for v in v {
            h.append("x-cost", HeaderValue::from_str(v).expect("header"));
        }
        Demand::for_route(&route, &h).amounts.map(|a| a.cost)
    };
    // One rule: digits, any leading zeros, optional spaces or tabs around.
    for (good, n) in [
        ("42", 42),
        ("0", 0),
        ("007", 7),
        (" 5", 5),
        ("\t5", 5),
        ("5 \t", 5),
        ("00000000000000000000000000000005", 5),
        (
            "000000000000000000000009223372036854775807",
            i64::MAX as u64,
        ),
        ("9223372036854775807", i64::MAX as u64),
    ] {
        assert_eq!(with(&[good]), Ok(n), "{good:?}");
    }
    for bad in [
        "",
        " ",
        "-1",
        "+1",
        "1.5",
        "1 2",
        "1_000",
        "9223372036854775808",
        "99999999999999999999",
        "0x10",
        "٣",
    ] {
        assert!(with(&[bad]).is_err(), "{bad:?} was accepted");
    }
    let missing = with(&[]).expect_err("missing header accepted");
    assert!(missing.to_string().contains("missing"), "{missing}");
    let twice = with(&["1", "2"]).expect_err("two values accepted");
    assert!(twice.to_string().contains("2 times"), "{twice}");
}

proptest! {
    /// However requests interleave with time, a key never spends more
    /// credits than it was given, and every success is paid for.
    #[test]
    fn credits_are_exact(costs in proptest::collection::vec((0u64..4, 0u64..120), 1..100)) {
        let c = config();
        let r = record("payg");
        let mut now = ts("2026-03-01T12:00:00Z");
        let mut u = usage(&c, "payg", now);
        let mut credits = 0;
        let mut overage = 0;
        for (cost, dt) in costs {
            now = now.checked_add(Duration::from_secs(dt)).expect("in range");
            if let Ok(a) = admit(&c, &r, &mut u, &demand(cost), now) {
                prop_assert_eq!(a.charge.credits + a.charge.overage, cost);
                credits += a.charge.credits;
                overage += a.charge.overage;
            }
        }
        prop_assert!(credits <= 2);
        prop_assert_eq!(u.remaining, Some(2 - credits));
        prop_assert_eq!(u.overage, overage);
    }
}

/// Jumps of the clock forward and back across day and month ends and a
/// leap day: each period refills once, however often the clock crosses
/// its boundary.
#[test]
fn clock_steps_never_refill_twice() {
    let c = config();
    // Daily: spend at 23:59, cross midnight, step back, cross again.
    let r = record("free");
    let mut u = usage(&c, "free", ts("2026-03-01T23:59:00Z"));
    admit(&c, &r, &mut u, &demand(5), ts("2026-03-01T23:59:00Z")).expect("5 of 5");
    admit(&c, &r, &mut u, &demand(2), ts("2026-03-02T00:00:01Z")).expect("refilled");
    assert_eq!(u.remaining, Some(3));
    for (at, left) in [
        ("2026-03-01T23:59:30Z", 3), // back before midnight: nothing returns
        ("2026-03-02T00:00:30Z", 3), // forward again: no second refill
        ("2026-02-28T12:00:00Z", 3), // back over a month end
        ("2026-03-02T23:00:00Z", 3),
        ("2026-03-03T00:00:00Z", 5), // the next day's refill, once
        ("2026-03-02T00:00:00Z", 5),
        ("2026-03-03T00:00:00Z", 5),
    ] {
        let now = ts(at);
        u.settle(&c.tiers["free"], None, now);
        assert_eq!(u.remaining, Some(left), "at {at}");
    }
    // Monthly on day 31: the leap day is February's refill day.
    let r = record("monthly");
    let start = ts("2028-02-28T12:00:00Z");
    let mut u = usage(&c, "monthly", start);
    admit(&c, &r, &mut u, &demand(10), start).expect("10 of 10");
    let monthly = &c.tiers["monthly"];
    u.settle(monthly, None, ts("2028-02-29T00:00:00Z"));
    assert_eq!(u.remaining, Some(10), "refilled on the leap day");
    admit(&c, &r, &mut u, &demand(4), ts("2028-02-29T00:00:00Z")).expect("4 of 10");
    for at in [
        "2028-02-28T23:59:59Z",
        "2028-02-29T00:00:01Z",
        "2028-01-31T00:00:00Z",
        "2028-03-30T23:59:59Z",
    ] {
        u.settle(monthly, None, ts(at));
        assert_eq!(u.remaining, Some(6), "at {at}: no second refill");
    }
    u.settle(monthly, None, ts("2028-03-31T00:00:00Z"));
    assert_eq!(u.remaining, Some(10), "March 31 refills");
}

/// Rate windows and rolling pools count on window time: a step of the wall
/// clock (NTP, an operator) neither ends a window early nor stretches it,
/// while refills and expiry follow the wall clock.
#[test]
fn wall_clock_steps_do_not_move_windows() {
    let c = config();
    let r = record("free");
    let start = ts("2026-03-01T12:00:00Z");
    let at = |wall: &str, steady_secs: i64| Now {
        wall: ts(wall),
        steady_ms: start.as_millisecond() + steady_secs * 1000,
    };
    let mut u = usage(&c, "free", start);
    let tokens = pools(0, &[("tokens", 100)]);
    admit(&c, &r, &mut u, &tokens, start).expect("100 tokens of 100");
    for _ in 0..2 {
        admit(&c, &r, &mut u, &demand(0), start).expect("within 3 a minute");
    }
    // The wall clock jumps an hour ahead 10 s later: the minute and the hour
    // still run.
    let ahead = at("2026-03-01T13:00:10Z", 10);
    match admit(&c, &r, &mut u, &demand(0), ahead) {
        Err(Rejection::RateLimited { retry_after, .. }) => assert_eq!(retry_after, 50),
        other => panic!("a wall step ended the window: {other:?}"),
    }
    // The rolling pool's hour still runs, and its reset is told in wall
    // time: an hour after the charge, shifted by the step.
    match admit(
        &c,
        &r,
        &mut u,
        &pools(0, &[("tokens", 1)]),
        at("2026-03-01T13:01:01Z", 61),
    ) {
        Err(Rejection::QuotaExceeded { resets_at, .. }) => {
            assert_eq!(resets_at, Some(ts("2026-03-01T14:00:00Z")));
        }
        other => panic!("a wall step ended the rolling pool's hour: {other:?}"),
    }
    // Stepped back an hour instead: the minute still ends after 60 s.
    admit(&c, &r, &mut u, &demand(0), at("2026-03-01T11:01:01Z", 61)).expect("a minute passed");
    // Window time stood still while the wall clock crossed midnight: the
    // daily refill still comes, by the wall clock.
    let spent = u.remaining;
    admit(&c, &r, &mut u, &demand(1), at("2026-03-02T00:00:01Z", 62)).expect("refilled");
    assert_eq!(
        u.remaining,
        Some(4),
        "refilled to 5, then 1 spent (was {spent:?})"
    );
}

/// One step of the property test below.
#[derive(Debug, Clone)]
enum Step {
    Request {
        cost: u64,
        tokens: u64,
        exports: u64,
    },
    RefundLast,
    Plan {
        tier: usize,
        policy: usize,
    },
    Grant(u64),
    Clock(i64),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0u64..4, 0u64..60, 0u64..2)
            .prop_map(|(cost, tokens, exports)| Step::Request { cost, tokens, exports }),
        1 => Just(Step::RefundLast),
        1 => (0usize..3, 0usize..3).prop_map(|(tier, policy)| Step::Plan { tier, policy }),
        1 => (0u64..8).prop_map(Step::Grant),
        // Up to three days either way, in seconds.
        2 => (-259_200i64..259_200).prop_map(Step::Clock),
    ]
}

proptest! {
    /// For any sequence of requests, refunds, plan changes, grants and clock
    /// steps (forward and back): a rejected request changes nothing; credits
    /// are conserved (what is left is what was given, by the initial
    /// allowance, refills, grants, plan changes and refunds, less what was
    /// spent and what refills or plan changes took away), so no success is
    /// ever paid from nothing; and no charge takes more than was left.
    #[test]
    fn the_decision_core_conserves_credits(steps in proptest::collection::vec(step(), 1..120)) {
        let c = config();
        let tiers = ["free", "monthly", "payg"];
        let policies = [CreditPolicy::Prorate, CreditPolicy::Reset, CreditPolicy::Keep];
        let mut r = record("free");
        let mut now = ts("2026-03-01T12:00:00Z");
        let mut u = usage(&c, "free", now);
        let left = |u: &Usage| i128::from(u.remaining.unwrap_or(0));
        let (mut given, mut spent, mut taken) = (left(&u), 0i128, 0i128);
        // Counts a change of the balance made outside a charge.
        let account = |given: &mut i128, taken: &mut i128, before: i128, after: i128| {
            if after > before { *given += after - before } else { *taken += before - after }
        };
        let mut last: Option<Charge> = None;
        for step in steps {
            let tier = &c.tiers[r.tier.as_str()];
            match step {
                Step::Request { cost, tokens, exports } => {
                    let mut settled = u.clone();
                    settled.settle(tier, r.refill_day, now);
                    account(&mut given, &mut taken, left(&u), left(&settled));
                    let d = pools(cost, &[("tokens", tokens), ("exports", exports)]);
                    match admit(&c, &r, &mut u, &d, now) {
                        Ok(a) => {
                            prop_assert!(i128::from(a.charge.credits) <= left(&settled));
                            // Every success is paid: in credits, or as overage where allowed.
                            prop_assert_eq!(a.charge.credits + a.charge.overage, cost);
                            spent += i128::from(a.charge.credits);
                            prop_assert_eq!(left(&u), left(&settled) - i128::from(a.charge.credits));
                            last = Some(a.charge);
                        }
                        // Nothing a client or the billing could see: the
                        // usage report and the billing state are the same.
                        Err(_) => {
                            let seen = |u: &Usage| {
                                let mut u = u.clone();
                                crate::views::usage_report(tier, &r, &mut u, now)
                            };
                            prop_assert_eq!(seen(&u), seen(&settled), "a rejection changed the usage");
                            prop_assert_eq!(&u.billing, &settled.billing);
                            prop_assert_eq!(u.remaining, settled.remaining);
                        }
                    }
                }
                Step::RefundLast => {
                    if let Some(charge) = last.take() {
                        let before = left(&u);
                        refund(Some(tier), &mut u, &charge);
                        // Given back at most what was charged.
                        prop_assert!(left(&u) - before <= i128::from(charge.credits));
                        spent -= left(&u) - before;
                    }
                }
                Step::Plan { tier: t, policy } => {
                    let before = left(&u);
                    u.settle(tier, r.refill_day, now);
                    let new = &c.tiers[tiers[t]];
                    u.change_plan(Some(tier), new, policies[policy], r.refill_day, now);
                    r.tier = tiers[t].into();
                    account(&mut given, &mut taken, before, left(&u));
                    last = None;
                }
                Step::Grant(n) => {
                    let before = left(&u);
                    u.remaining = u.remaining.map(|x| x + n);
                    account(&mut given, &mut taken, before, left(&u));
                }
                Step::Clock(secs) => {
                    let by = jiff::SignedDuration::from_secs(secs);
                    now = now.checked_add(by).expect("in range");
                }
            }
            prop_assert!(spent >= 0);
            prop_assert_eq!(left(&u), given - spent - taken, "credits not conserved");
        }
    }
}
