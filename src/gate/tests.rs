//! Unit and property tests of the decision core, moving time by hand.

use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use jiff::Timestamp;
use proptest::prelude::*;

use super::*;
use crate::config::Config;

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
            pools: pools.iter().map(|(p, n)| (p.to_string(), *n)).collect(),
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
    assert_eq!(u.pools["tokens"].total, 1_000_000);
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
        u.pools["tokens"]
            .window
            .clone()
            .used(3_600_000, millis(now)),
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
        u.pools["tokens"]
            .window
            .clone()
            .used(3_600_000, millis(now)),
        0
    );
    assert_eq!(u.pools["exports"].used, 0);

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
