//! Every row of SPEC §3's rejection table: status, code, context, headers,
//! and that a rejection charges nothing.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;

use crate::common::{eventually, json_of, Binary, Harness, ROOT_KEY};
use crate::PLANS;

#[tokio::test]
async fn missing_key_is_401_with_www_authenticate() {
    let h = Harness::start(PLANS).await;
    let resp = h
        .client
        .get(h.url("/api/data"))
        .send()
        .await
        .expect("answer");
    assert_eq!(
        resp.headers()
            .get("www-authenticate")
            .map(|v| v.to_str().ok()),
        Some(Some("Bearer"))
    );
    let body = json_of(resp, 401).await;
    assert_eq!(body["code"], "MISSING_KEY");
    assert!(h.upstream.seen().is_empty());
}

#[tokio::test]
async fn malformed_unknown_and_revoked_keys_are_invalid() {
    let h = Harness::start(PLANS).await;
    let (key, key_id) = h.create_key("free").await;
    // A typo fails the checksum; a well-formed key nobody issued is unknown.
    let mut typo = key.clone().into_bytes();
    let last = typo.len() - 1;
    typo[last] = if typo[last] == b'a' { b'b' } else { b'a' };
    let typo = String::from_utf8(typo).expect("ascii");
    let (other, other_id) = h.create_key("free").await;
    let resp = h
        .admin(Method::DELETE, &format!("/v1/keys/{other_id}"))
        .send()
        .await
        .expect("admin");
    assert_eq!(resp.status(), 204);
    for bad in ["garbage", typo.as_str(), other.as_str()] {
        let body = json_of(h.get("/api/data", bad).await, 401).await;
        assert_eq!(body["code"], "INVALID_KEY", "{bad}");
    }
    // The real key still works, and the failures charged it nothing.
    let usage = h.usage(&key).await;
    assert_eq!(usage["key_id"], key_id.as_str());
    assert_eq!(usage["usage"]["credits"]["remaining"], 5);
}

#[tokio::test]
async fn expired_key_is_401_with_expired_at() {
    let h = Harness::start(PLANS).await;
    let created = h
        .create_key_with(json!({ "tier": "free", "expires_at": "2026-03-10T13:00:00Z" }))
        .await;
    let key = created["key"].as_str().expect("key");
    assert_eq!(h.get("/api/data", key).await.status(), 200);
    h.advance(Duration::from_secs(3600));
    let body = json_of(h.get("/api/data", key).await, 401).await;
    assert_eq!(body["code"], "EXPIRED");
    assert_eq!(body["expired_at"], "2026-03-10T13:00:00Z");
}

#[tokio::test]
async fn disabled_key_is_403() {
    let h = Harness::start(PLANS).await;
    let created = h
        .create_key_with(json!({ "tier": "free", "enabled": false }))
        .await;
    let body = json_of(
        h.get("/api/data", created["key"].as_str().expect("key"))
            .await,
        403,
    )
    .await;
    assert_eq!(body["code"], "DISABLED");
}

#[tokio::test]
async fn key_on_a_vanished_tier_fails_closed() {
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("payg").await;
    let config = h.gateway.gateway.config();
    let text = crate::common::config_text(
        h.upstream.addr,
        crate::common::dead_address(),
        &config.store_path,
        &PLANS.replace(
            "  payg:\n    credits: 2\n    overage: allow\n",
            "  other:\n    credits: 2\n",
        ),
    );
    let reloaded = tollgate::config::Config::parse(&text)
        .expect("valid")
        .config;
    h.gateway.gateway.install(reloaded);
    let body = json_of(h.get("/api/data", &key).await, 403).await;
    assert_eq!(body["code"], "TIER_NOT_FOUND");
    assert_eq!(body["tier"], "payg");
}

#[tokio::test]
async fn missing_feature_is_403_with_upgrade_url() {
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("free").await;
    let body = json_of(h.get("/api/ai/chat", &key).await, 403).await;
    assert_eq!(body["code"], "FEATURE_NOT_AVAILABLE");
    assert_eq!(body["required"], "ai");
    assert_eq!(body["current_tier"], "free");
    assert_eq!(body["upgrade_url"], "https://example.com/upgrade");
    assert_eq!(h.usage(&key).await["usage"]["credits"]["remaining"], 5);
}

#[tokio::test]
async fn rate_limit_is_429_with_retry_after_and_frees_later() {
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("tight").await;
    for _ in 0..3 {
        assert_eq!(h.get("/api/data", &key).await.status(), 200);
    }
    let resp = h.get("/api/data", &key).await;
    let retry: u64 = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("Retry-After header");
    let body = json_of(resp, 429).await;
    assert_eq!(body["code"], "RATE_LIMITED");
    assert_eq!(body["limit"], "requests");
    assert_eq!(body["retry_after"], retry);
    // The clock stands still: exactly the 60 s window, never more.
    assert_eq!(retry, 60);
    // The refused request cost no credit.
    assert_eq!(h.usage(&key).await["usage"]["credits"]["remaining"], 997);
    h.advance(Duration::from_secs(retry));
    assert_eq!(h.get("/api/data", &key).await.status(), 200);
}

#[tokio::test]
async fn pool_exhaustion_is_402_quota_exceeded() {
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("free").await;
    for _ in 0..2 {
        assert_eq!(h.post("/api/exports", &key).await.status(), 200);
    }
    let resp = h.post("/api/exports", &key).await;
    let body = json_of(resp, 402).await;
    assert_eq!(body["code"], "QUOTA_EXCEEDED");
    assert_eq!(body["pool"], "exports");
    assert_eq!(body["remaining"], 0);
    assert_eq!(body["resets_at"], "2026-04-01T00:00:00Z");
}

#[tokio::test]
async fn credits_exhaustion_is_402_usage_exceeded() {
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("free").await;
    for _ in 0..5 {
        assert_eq!(h.get("/api/data", &key).await.status(), 200);
    }
    let body = json_of(h.get("/api/data", &key).await, 402).await;
    assert_eq!(body["code"], "USAGE_EXCEEDED");
    assert_eq!(body["remaining"], 0);
    assert_eq!(body["resets_at"], "2026-03-11T00:00:00Z");
    assert_eq!(body["upgrade_url"], "https://example.com/upgrade");
    assert_eq!(h.upstream.seen().len(), 5);
}

#[tokio::test]
async fn bad_cost_headers_are_400_and_charge_nothing() {
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("tight").await;
    for bad in [
        None,
        Some("-1"),
        Some("1.5"),
        Some("abc"),
        Some("9223372036854775808"),
        Some("18446744073709551617"),
    ] {
        let mut req = h.keyed(Method::GET, "/api/priced", &key);
        if let Some(v) = bad {
            req = req.header("x-cost", v);
        }
        let body = json_of(req.send().await.expect("send"), 400).await;
        assert_eq!(body["code"], "BAD_REQUEST", "{bad:?}");
        assert!(body["message"]
            .as_str()
            .is_some_and(|m| m.contains("x-cost")));
    }
    let resp = h
        .keyed(Method::GET, "/api/priced", &key)
        .header("x-cost", "7")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    let usage = h.usage(&key).await;
    assert_eq!(usage["usage"]["credits"]["remaining"], 993);
    assert_eq!(usage["usage"]["rate_limits"]["requests"]["remaining"], 2);
}

#[tokio::test]
async fn two_keys_are_400() {
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("free").await;
    let resp = h
        .keyed(Method::GET, "/api/data", &key)
        .header("x-api-key", &key)
        .send()
        .await
        .expect("send");
    assert_eq!(json_of(resp, 400).await["code"], "BAD_REQUEST");
    let (status, body) = h
        .raw(&format!(
            "GET /api/data HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {key}\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
        ))
        .await;
    assert_eq!(status, 400, "{body}");
    // X-API-Key alone is fine.
    let resp = h
        .client
        .get(h.url("/api/data"))
        .header("x-api-key", &key)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn unmatched_route_is_404() {
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("free").await;
    let body = json_of(h.get("/nothing/here", &key).await, 404).await;
    assert_eq!(body["code"], "ROUTE_NOT_FOUND");
    // POST to a GET-only route does not match it either.
    let resp = h.post("/api/data", &key).await;
    assert_eq!(resp.status(), 200, "falls through to the /api/* route");
}

#[tokio::test]
async fn unreachable_upstream_is_502_and_refunded() {
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("free").await;
    let body = json_of(h.get("/api/down", &key).await, 502).await;
    assert_eq!(body["code"], "UPSTREAM_UNAVAILABLE");
    assert_eq!(h.usage(&key).await["usage"]["credits"]["remaining"], 5);
}

/// The `slow` upstream's read timeout is a whole second: timeouts of a
/// second or more run on tokio's timers, shorter ones on Pingora's (see
/// `server::start`), and the default (30 s) is of the first kind.
#[tokio::test]
async fn upstream_timeout_is_502_and_refunded() {
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("free").await;
    let resp = h
        .keyed(Method::GET, "/api/slow", &key)
        .header("x-test-delay-ms", "3000")
        .send()
        .await
        .expect("send");
    assert_eq!(json_of(resp, 502).await["code"], "UPSTREAM_UNAVAILABLE");
    assert_eq!(h.usage(&key).await["usage"]["credits"]["remaining"], 5);
}

/// A read timeout is logged as one: the access line's `error` is
/// `ReadTimedout`, as when Pingora timed the read itself (the gateway
/// times the reads of its kept upstream connections on its own:
/// vendor/README.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_read_timeout_is_logged_as_one() {
    let env = [("TOLLGATE_TEST_ROOT_KEY", std::ffi::OsStr::new(ROOT_KEY))];
    let (gateway, _upstream, _dir) = Binary::start(PLANS, &env).await;
    let created = gateway.create_key(json!({ "tier": "free" })).await;
    let key = created["key"].as_str().expect("key");
    let resp = reqwest::Client::new()
        .get(format!("http://{}/api/slow", gateway.proxy))
        .bearer_auth(key)
        .header("x-test-delay-ms", "3000")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 502);
    eventually("the access line of the timeout", || {
        gateway.lines_with("\"ReadTimedout\"") == 1
    })
    .await;
    assert_eq!(gateway.lines_with("ReadError"), 0);
}

#[tokio::test]
async fn store_failure_is_503_but_public_routes_work() {
    if crate::common::on_redis() {
        return; // injects a fault into the embedded store; Redis's own are in shared.rs
    }
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("free").await;
    assert_eq!(h.get("/api/data", &key).await.status(), 200);
    let store = &h.gateway.gateway.store;
    store.inject_flush_failure(true);
    assert!(store.flush_dirty().await.is_err());
    let body = json_of(h.get("/api/data", &key).await, 503).await;
    assert_eq!(body["code"], "STORE_UNAVAILABLE");
    let resp = h.client.get(h.url("/health")).send().await.expect("send");
    assert_eq!(resp.status(), 200);
    // Once the store writes again, so does the gateway.
    store.inject_flush_failure(false);
    store.flush_dirty().await.expect("flush");
    assert_eq!(h.get("/api/data", &key).await.status(), 200);
}

/// A key that is malformed or fails its checksum is refused without a
/// store lookup (nothing to time, nothing to load the disk or Redis with);
/// only a well-formed key the gateway has not seen is looked up.
#[tokio::test]
async fn malformed_keys_never_reach_the_store() {
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("free").await;
    let store = &h.gateway.gateway.store;
    let before = store.lookups();
    let mut bad_checksum = key.clone();
    let last = bad_checksum.pop().expect("a char");
    bad_checksum.push(if last == 'A' { 'B' } else { 'A' });
    for bad in [
        "sk_free_short",
        "not a key at all",
        "sk_free_0OIl0OIl0OIl0OIl0OIl0OIl0OIl",
        bad_checksum.as_str(),
        &"x".repeat(300),
    ] {
        let body = json_of(h.get("/api/data", bad).await, 401).await;
        assert_eq!(body["code"], "INVALID_KEY", "{bad}");
    }
    assert_eq!(store.lookups(), before, "a malformed key reached the store");
    // A well-formed key nobody issued is looked up once, then refused.
    let unknown = tollgate::keys::generate("sk_free").secret;
    let body = json_of(h.get("/api/data", &unknown).await, 401).await;
    assert_eq!(body["code"], "INVALID_KEY");
    assert_eq!(store.lookups(), before + 1);
}
