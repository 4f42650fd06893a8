//! Credits, refills, pools, meters, refunds and exactness under concurrency,
//! through the real proxy.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::common::{metric, Harness};
use crate::PLANS;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_never_overspend() {
    let h = Harness::start(PLANS).await;
    let created = h
        .create_key_with(json!({ "tier": "metered", "credits": 50 }))
        .await;
    let key = created["key"].as_str().expect("key").to_string();
    let sends = (0..90).map(|_| {
        let req = h.keyed(Method::GET, "/api/data", &key);
        async move { req.send().await.expect("answer").status().as_u16() }
    });
    let statuses = futures::future::join_all(sends).await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let paid = statuses.iter().filter(|s| **s == 402).count();
    assert_eq!((ok, paid), (50, 40), "{statuses:?}");
    assert_eq!(h.usage(&key).await["usage"]["credits"]["remaining"], 0);
    assert_eq!(h.upstream.seen().len(), 50);
}

#[tokio::test]
async fn credits_refill_lazily_at_utc_midnight() {
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("free").await;
    for _ in 0..5 {
        assert_eq!(h.get("/api/data", &key).await.status(), 200);
    }
    assert_eq!(h.get("/api/data", &key).await.status(), 402);
    h.set_time("2026-03-10T23:59:59Z");
    assert_eq!(h.get("/api/data", &key).await.status(), 402);
    h.set_time("2026-03-11T00:00:00Z");
    let resp = h.get("/api/data", &key).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-usage-remaining"], "4");
}

#[tokio::test]
async fn rolling_pool_charged_from_request_header_and_window_slides() {
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("metered").await;
    let ask = |tokens: &str| {
        h.keyed(Method::POST, "/api/ai/chat", &key)
            .header("x-tokens", tokens)
            .send()
    };
    assert_eq!(ask("600").await.expect("send").status(), 200);
    h.advance(Duration::from_secs(1800));
    assert_eq!(ask("400").await.expect("send").status(), 200);
    let resp = ask("1").await.expect("send");
    assert_eq!(resp.status(), 402);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(
        (body["pool"].as_str(), body["remaining"].as_u64()),
        (Some("tokens"), Some(0))
    );
    // An hour after the first charge (plus one bucket), its 600 are free again.
    h.advance(Duration::from_secs(1800 + 60));
    assert_eq!(ask("600").await.expect("send").status(), 200);
    let usage = h.usage(&key).await;
    assert_eq!(usage["usage"]["pools"]["tokens"]["used"], 1000);
}

#[tokio::test]
async fn meter_charges_the_pool_from_the_upstream_answer() {
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("metered").await;
    let resp = h
        .keyed(Method::POST, "/api/complete", &key)
        .header("x-test-usage-tokens", "700")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let usage = h.usage(&key).await;
    assert_eq!(usage["usage"]["pools"]["tokens"]["used"], 700);
    assert_eq!(usage["usage"]["pools"]["tokens"]["remaining"], 300);
    // Counted through the route's metric handles, under the pool's name.
    let text = h.scrape().await;
    assert_eq!(
        metric(&text, "tollgate_pool_charged_total", &[("pool", "tokens")]),
        700.0
    );
}

#[tokio::test]
async fn upstream_5xx_refunds_where_the_route_says_so() {
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("metered").await;
    let resp = h
        .keyed(Method::POST, "/api/ai/chat", &key)
        .header("x-tokens", "50")
        .header("x-test-status", "503")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 503, "the upstream's answer is passed on");
    assert_eq!(resp.headers()["x-usage-remaining"], "1000");
    let usage = h.usage(&key).await;
    assert_eq!(usage["usage"]["credits"]["remaining"], 1000);
    assert_eq!(usage["usage"]["pools"]["tokens"]["used"], 0);
    // A route without refund_on_5xx keeps the charge.
    let resp = h
        .keyed(Method::GET, "/api/data", &key)
        .header("x-test-status", "500")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 500);
    assert_eq!(h.usage(&key).await["usage"]["credits"]["remaining"], 999);
}

#[tokio::test]
async fn overage_allow_keeps_serving_and_counts_units() {
    let h = Harness::start(PLANS).await;
    let (key, key_id) = h.create_key("payg").await;
    for _ in 0..5 {
        assert_eq!(h.get("/api/data", &key).await.status(), 200);
    }
    let usage = h.usage(&key).await;
    assert_eq!(usage["usage"]["credits"]["remaining"], 0);
    assert_eq!(usage["usage"]["overage"]["units"], 3);
    let record: serde_json::Value = h
        .admin(Method::GET, &format!("/v1/keys/{key_id}"))
        .send()
        .await
        .expect("admin")
        .json()
        .await
        .expect("json");
    assert_eq!(record["overage"]["units"], 3);
}

#[tokio::test]
async fn rate_limit_headers_describe_the_tightest_limit() {
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("tight").await;
    let resp = h.get("/api/data", &key).await;
    assert_eq!(resp.status(), 200);
    let header = |name: &str| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(header("ratelimit-limit"), "3");
    assert_eq!(header("ratelimit-remaining"), "2");
    let reset: u64 = header("ratelimit-reset").parse().expect("seconds");
    // One window at most (the clock stands still): never 61 on a 60 s window.
    assert_eq!(reset, 60);
    assert_eq!(
        header("ratelimit-policy"),
        "\"requests\";q=3;w=60, \"slow\";q=10;w=3600"
    );
    assert!(
        header("ratelimit").starts_with("\"requests\";r=2;t="),
        "{}",
        header("ratelimit")
    );
    assert_eq!(header("x-usage-remaining"), "999");
}

/// A step of the wall clock (NTP, an operator) does not end a rate window:
/// windows count on the monotonic clock.
#[tokio::test]
async fn a_wall_clock_step_does_not_end_a_rate_window() {
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("tight").await;
    for _ in 0..3 {
        assert_eq!(h.get("/api/data", &key).await.status(), 200);
    }
    assert_eq!(h.get("/api/data", &key).await.status(), 429);
    h.step_wall(jiff::SignedDuration::from_hours(2));
    let resp = h.get("/api/data", &key).await;
    assert_eq!(resp.status(), 429, "the wall clock's step ended the window");
    assert_eq!(resp.headers()["retry-after"], "60");
    h.step_wall(jiff::SignedDuration::from_hours(-4));
    h.advance(Duration::from_secs(60));
    assert_eq!(h.get("/api/data", &key).await.status(), 200, "a minute passed");
}

#[tokio::test]
async fn unlimited_tier_sends_no_usage_remaining() {
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("unlimited").await;
    let resp = h.get("/api/data", &key).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-usage-remaining").is_none());
    let usage = h.usage(&key).await;
    assert_eq!(
        usage["usage"]["credits"],
        json!({ "used": 1, "limit": null, "remaining": null, "unlimited": true })
    );
}
