//! The admin API calls this issue needs: create, read, revoke, health, and
//! its refusals.

use reqwest::Method;
use serde_json::json;

use crate::common::{json_of, Harness};
use crate::PLANS;

#[tokio::test]
async fn create_read_revoke() {
    let h = Harness::start(PLANS).await;
    let created = h
        .create_key_with(json!({
            "tier": "free", "external_id": "cus_7", "name": "ci", "meta": { "plan": "x" }
        }))
        .await;
    let key = created["key"].as_str().expect("key");
    let key_id = created["key_id"].as_str().expect("id");
    assert!(key.starts_with("sk_free_"));
    assert_eq!(created["start"], &key[..12]);
    assert_eq!(created["credits"]["remaining"], 5);
    assert_eq!(created["credits"]["next_refill_at"], "2026-03-11T00:00:00Z");
    let got = json_of(
        h.admin(Method::GET, &format!("/v1/keys/{key_id}"))
            .send()
            .await
            .expect("get"),
        200,
    )
    .await;
    assert!(got.get("key").is_none(), "the secret is shown only once");
    assert_eq!(got["external_id"], "cus_7");
    assert_eq!(got["meta"], json!({ "plan": "x" }));
    assert_eq!(got["created_at"], "2026-03-10T12:00:00Z");
    let resp = h
        .admin(Method::DELETE, &format!("/v1/keys/{key_id}"))
        .send()
        .await
        .expect("delete");
    assert_eq!(resp.status(), 204);
    let resp = h
        .admin(Method::GET, &format!("/v1/keys/{key_id}"))
        .send()
        .await
        .expect("get");
    assert_eq!(json_of(resp, 404).await["code"], "KEY_NOT_FOUND");
    assert_eq!(h.get("/api/data", key).await.status(), 401);
}

#[tokio::test]
async fn root_key_is_required() {
    let h = Harness::start(PLANS).await;
    let resp = h
        .client
        .post(h.admin_url("/v1/keys"))
        .json(&json!({"tier": "free"}))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 401);
    let resp = h
        .client
        .get(h.admin_url("/v1/keys/key_x"))
        .bearer_auth("wrong")
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 401);
    let resp = h
        .client
        .get(h.admin_url("/healthz"))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn bad_input_is_400_naming_the_field() {
    let h = Harness::start(PLANS).await;
    for (body, field) in [
        (json!({}).to_string(), "tier"),
        (json!({ "tier": "gold" }).to_string(), "tier"),
        (json!({ "tier": "free", "colour": 1 }).to_string(), "colour"),
        (
            json!({ "tier": "free", "credits": -5 }).to_string(),
            "credits",
        ),
        (json!({ "tier": "free", "meta": [1] }).to_string(), "meta"),
        (
            json!({ "tier": "free", "expires_at": "tomorrow" }).to_string(),
            "expires_at",
        ),
        (
            json!({ "tier": "free", "refill_day": 40 }).to_string(),
            "refill_day",
        ),
        // `free` refills daily: a refill day would mean nothing.
        (
            json!({ "tier": "free", "refill_day": 15 }).to_string(),
            "no monthly refill",
        ),
        (
            json!({ "tier": "free", "expires_at": "2026-03-10T11:59:59Z" }).to_string(),
            "not in the future",
        ),
        (
            json!({ "tier": "free", "expires_at": "tomorrow" }).to_string(),
            "'tomorrow' is not a time: write RFC 3339",
        ),
        (
            json!({ "tier": "free", "expires_at": "9999-12-31T23:59:59Z" }).to_string(),
            "out of range",
        ),
        ("{not json".to_string(), "key"),
    ] {
        let resp = h
            .admin(Method::POST, "/v1/keys")
            .body(body.clone())
            .send()
            .await
            .expect("send");
        let answer = json_of(resp, 400).await;
        assert_eq!(answer["code"], "INVALID_REQUEST", "{body}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(message.contains(field), "{body}: {message}");
    }
    let huge = json!({ "tier": "free", "name": "x".repeat(100_000) }).to_string();
    let resp = h
        .admin(Method::POST, "/v1/keys")
        .body(huge)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 413);
}

#[tokio::test]
async fn admin_edges_answer_json() {
    let h = Harness::start(PLANS).await;
    // The scheme is case-insensitive, as on the proxy.
    let resp = h
        .client
        .get(h.admin_url("/v1/keys"))
        .header("authorization", format!("bearer {}", crate::common::ROOT_KEY))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status(), 200);
    // A known path with a method it does not take: JSON 405 with Allow.
    let resp = h.admin(Method::PUT, "/v1/keys").send().await.expect("send");
    let allow = resp
        .headers()
        .get("allow")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    let body = json_of(resp, 405).await;
    assert_eq!(body["code"], "METHOD_NOT_ALLOWED");
    // A cursor this API never gave.
    let resp = h
        .admin(Method::GET, "/v1/keys?cursor=garbage%00")
        .send()
        .await
        .expect("send");
    let body = json_of(resp, 400).await;
    assert!(
        body["message"].as_str().unwrap_or_default().starts_with("cursor:"),
        "{body}"
    );
    // A far expiry inside the range is fine, and shows as given.
    let created = h
        .create_key_with(json!({ "tier": "free", "expires_at": "9998-12-31T23:59:59Z" }))
        .await;
    assert_eq!(created["expires_at"], "9998-12-31T23:59:59Z");
}

/// A gateway started without its root key's env var says so once at
/// start, and the admin API answers 503 with that reason, not 401.
#[tokio::test]
async fn a_gateway_without_its_root_key_says_so() {
    let (gateway, _upstream, _dir) = crate::common::Binary::start(PLANS, &[]).await;
    let resp = reqwest::Client::new()
        .get(format!("http://{}/v1/keys", gateway.admin))
        .bearer_auth("anything")
        .send()
        .await
        .expect("send");
    let body = json_of(resp, 503).await;
    assert_eq!(body["code"], "NO_ROOT_KEY");
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("TOLLGATE_TEST_ROOT_KEY")),
        "{body}"
    );
    assert_eq!(gateway.lines_with("TOLLGATE_TEST_ROOT_KEY is not set"), 1);
}
