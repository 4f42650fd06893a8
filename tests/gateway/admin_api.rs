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
            "tier": "free", "external_id": "cus_7", "name": "ci", "meta": { "plan": "x" }, "refill_day": 15
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
