//! What the upstream receives, and the customer usage endpoint.

use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{json_of, Harness};
use crate::PLANS;

#[tokio::test]
async fn key_is_stripped_identity_added_and_spoofs_dropped() {
    let h = Harness::start(PLANS).await;
    let created = h
        .create_key_with(json!({ "tier": "free", "external_id": "cus_42" }))
        .await;
    let key = created["key"].as_str().expect("key");
    let resp = h
        .keyed(Method::GET, "/api/data?x=1&y=2", key)
        .header("x-tollgate-tier", "enterprise")
        .header("X-Tollgate-Key-Id", "key_forged")
        .header("x-tollgate-anything", "forged")
        .header("x-custom", "kept")
        .send()
        .await
        .expect("send");
    let seen = json_of(resp, 200).await;
    let headers = &seen["headers"];
    assert_eq!(seen["target"], "/api/data?x=1&y=2");
    assert!(headers.get("authorization").is_none(), "{headers}");
    assert_eq!(headers["x-tollgate-key-id"], created["key_id"]);
    assert_eq!(headers["x-tollgate-external-id"], "cus_42");
    assert_eq!(headers["x-tollgate-tier"], "free");
    assert!(headers.get("x-tollgate-anything").is_none());
    assert_eq!(headers["x-custom"], "kept");
}

#[tokio::test]
async fn x_api_key_is_stripped_too_unless_the_route_forwards_it() {
    let h = Harness::start(PLANS).await;
    let (key, _) = h.create_key("free").await;
    let via_api_key = |path: &str| h.client.get(h.url(path)).header("x-api-key", &key).send();
    let seen = json_of(via_api_key("/api/data").await.expect("send"), 200).await;
    assert!(seen["headers"].get("x-api-key").is_none());
    let seen = json_of(via_api_key("/api/forward").await.expect("send"), 200).await;
    assert_eq!(seen["headers"]["x-api-key"], key.as_str());
}

#[tokio::test]
async fn public_routes_need_no_key_and_get_no_identity() {
    let h = Harness::start(PLANS).await;
    let resp = h
        .client
        .get(h.url("/health"))
        .header("x-tollgate-tier", "forged")
        .send()
        .await
        .expect("send");
    let seen = json_of(resp, 200).await;
    assert!(seen["headers"].get("x-tollgate-tier").is_none());
    assert!(seen["headers"].get("x-tollgate-key-id").is_none());
}

#[tokio::test]
async fn usage_endpoint_is_answered_by_the_gateway_uncharged() {
    let h = Harness::start(PLANS).await;
    let (key, key_id) = h.create_key("free").await;
    h.post("/api/exports", &key).await;
    assert_eq!(h.get("/api/data", &key).await.status(), 200);
    let before = h.upstream.seen().len();
    let first = h.usage(&key).await;
    let second = h.usage(&key).await;
    assert_eq!(first, second, "reading usage charged something");
    assert_eq!(h.upstream.seen().len(), before, "usage was forwarded");
    let expected = json!({
        "key_id": key_id,
        "tier": "free",
        "plan": "Free",
        "usage": {
            "credits": { "used": 1, "limit": 5, "remaining": 4, "unlimited": false, "resets_at": "2026-03-11T00:00:00Z" },
            "rate_limits": { "requests": { "limit": 100, "window": "60s", "remaining": 98 } },
            "pools": {
                "tokens": { "used": 0, "limit": 100, "remaining": 100 },
                "exports": { "used": 1, "limit": 2, "remaining": 1, "resets_at": "2026-04-01T00:00:00Z" }
            },
            "overage": { "units": 0 }
        },
        "features": ["api"]
    });
    assert_subset(&expected, &first);
}

#[tokio::test]
async fn usage_endpoint_needs_a_valid_key() {
    let h = Harness::start(PLANS).await;
    let resp = h
        .client
        .get(h.url("/_tollgate/usage"))
        .send()
        .await
        .expect("send");
    assert_eq!(json_of(resp, 401).await["code"], "MISSING_KEY");
    let body = json_of(h.get("/_tollgate/usage", "sk_free_nope").await, 401).await;
    assert_eq!(body["code"], "INVALID_KEY");
}

/// Every field of `expected` is in `actual` with the same value (objects may
/// hold more).
fn assert_subset(expected: &Value, actual: &Value) {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            for (k, v) in e {
                let got = a
                    .get(k)
                    .unwrap_or_else(|| panic!("missing field {k} in {actual}"));
                assert_subset(v, got);
            }
        }
        _ => assert_eq!(expected, actual),
    }
}
