//! Key management through the admin API: listing, plan changes, credit
//! grants, verify, and durability across `kill -9`.

use std::collections::HashSet;

use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{json_of, Binary, Harness, ROOT_KEY};
use crate::PLANS;

async fn patch(h: &Harness, key_id: &str, body: Value) -> reqwest::Response {
    h.admin(Method::PATCH, &format!("/v1/keys/{key_id}"))
        .json(&body)
        .send()
        .await
        .expect("admin")
}

async fn credits(h: &Harness, key_id: &str, body: Value) -> reqwest::Response {
    h.admin(Method::POST, &format!("/v1/keys/{key_id}/credits"))
        .json(&body)
        .send()
        .await
        .expect("admin")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_250_keys_pages_to_exactly_the_set() {
    let h = Harness::start(PLANS).await;
    let mut expected = HashSet::new();
    for i in 0..250 {
        let created = h
            .create_key_with(
                json!({ "tier": "free", "external_id": "cus_many", "name": format!("k{i}") }),
            )
            .await;
        expected.insert(created["key_id"].as_str().expect("id").to_string());
    }
    h.create_key_with(json!({ "tier": "free", "external_id": "cus_other" }))
        .await;
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = "/v1/keys?external_id=cus_many&limit=100".to_string();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = json_of(h.admin(Method::GET, &path).send().await.expect("list"), 200).await;
        pages += 1;
        for key in page["keys"].as_array().expect("keys") {
            assert_eq!(key["external_id"], "cus_many");
            assert!(key.get("key").is_none());
            seen.push(key["key_id"].as_str().expect("id").to_string());
        }
        match page["cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), 250, "duplicates or gaps");
    assert_eq!(seen.into_iter().collect::<HashSet<_>>(), expected);
    let bad = h
        .admin(Method::GET, "/v1/keys?limit=0")
        .send()
        .await
        .expect("list");
    assert_eq!(json_of(bad, 400).await["code"], "INVALID_REQUEST");
}

#[tokio::test]
async fn plan_change_credit_policies_follow_the_formulas() {
    let h = Harness::start(PLANS).await;
    // free: 5 credits refilled daily to 5 (a = 5); metered: 1000, never refilled (b = 1000).
    for (policy, expected) in [
        ("prorate", json!(998)),
        ("reset", json!(1000)),
        ("keep", json!(3)),
    ] {
        let (key, key_id) = h.create_key("free").await;
        for _ in 0..2 {
            assert_eq!(h.get("/api/data", &key).await.status(), 200);
        }
        let body = json!({ "tier": "metered", "credit_policy": policy });
        let record = json_of(patch(&h, &key_id, body).await, 200).await;
        assert_eq!(record["tier"], "metered");
        assert_eq!(record["credits"]["remaining"], expected, "{policy}");
    }
    // prorate never goes below 0: metered (a = 1000) with 3 left, to free (b = 5).
    let created = h
        .create_key_with(json!({ "tier": "metered", "credits": 3 }))
        .await;
    let key_id = created["key_id"].as_str().expect("id");
    let record = json_of(patch(&h, key_id, json!({ "tier": "free" })).await, 200).await;
    assert_eq!(record["credits"]["remaining"], 0);
    // To unlimited: null. From unlimited: the new tier's credits.
    let record = json_of(patch(&h, key_id, json!({ "tier": "unlimited" })).await, 200).await;
    assert_eq!(record["credits"], Value::Null);
    let record = json_of(
        patch(
            &h,
            key_id,
            json!({ "tier": "payg", "credit_policy": "keep" }),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(record["credits"]["remaining"], 2);
}

#[tokio::test]
async fn a_plan_change_applies_on_the_very_next_request() {
    let h = Harness::start(PLANS).await;
    let (key, key_id) = h.create_key("free").await;
    let ai = || {
        h.keyed(Method::POST, "/api/ai/chat", &key)
            .header("x-tokens", "10")
            .send()
    };
    assert_eq!(ai().await.expect("send").status(), 403);
    json_of(patch(&h, &key_id, json!({ "tier": "metered" })).await, 200).await;
    let resp = ai().await.expect("send");
    assert_eq!(resp.status(), 200, "upgrade grants the feature at once");
    assert!(
        resp.headers().get("ratelimit-limit").is_none(),
        "metered has no rate limits"
    );
    // Downgrade to a tight plan: its rate limit applies to the next request.
    json_of(patch(&h, &key_id, json!({ "tier": "tight" })).await, 200).await;
    assert_eq!(ai().await.expect("send").status(), 403);
    let resp = h.get("/api/data", &key).await;
    assert_eq!(resp.headers()["ratelimit-limit"], "3");
    let usage = h.usage(&key).await;
    assert_eq!(usage["tier"], "tight");
    assert_eq!(
        usage["usage"]["pools"]["tokens"]["used"], 10,
        "pool use is kept across plans"
    );
}

#[tokio::test]
async fn patch_updates_name_meta_enabled_and_expiry() {
    let h = Harness::start(PLANS).await;
    let created = h
        .create_key_with(
            json!({ "tier": "free", "name": "a", "expires_at": "2030-01-01T00:00:00Z" }),
        )
        .await;
    let key = created["key"].as_str().expect("key");
    let key_id = created["key_id"].as_str().expect("id");
    let record = json_of(
        patch(
            &h,
            key_id,
            json!({ "name": "b", "meta": { "stripe_customer_id": "cus_S" }, "enabled": false }),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(
        (record["name"].as_str(), record["enabled"].as_bool()),
        (Some("b"), Some(false))
    );
    assert_eq!(record["meta"]["stripe_customer_id"], "cus_S");
    assert_eq!(
        record["expires_at"], "2030-01-01T00:00:00Z",
        "absent fields are untouched"
    );
    assert_eq!(
        json_of(h.get("/api/data", key).await, 403).await["code"],
        "DISABLED"
    );
    let record = json_of(
        patch(
            &h,
            key_id,
            json!({ "enabled": true, "expires_at": null, "name": null }),
        )
        .await,
        200,
    )
    .await;
    assert_eq!(record["expires_at"], Value::Null);
    assert_eq!(record["name"], Value::Null);
    assert_eq!(h.get("/api/data", key).await.status(), 200);
}

#[tokio::test]
async fn credit_grants_add_and_set() {
    let h = Harness::start(PLANS).await;
    let (key, key_id) = h.create_key("free").await;
    let record = json_of(
        credits(&h, &key_id, json!({ "op": "add", "amount": 10 })).await,
        200,
    )
    .await;
    assert_eq!(record["credits"]["remaining"], 15);
    let record = json_of(
        credits(&h, &key_id, json!({ "op": "set", "amount": 1 })).await,
        200,
    )
    .await;
    assert_eq!(record["credits"]["remaining"], 1);
    assert_eq!(h.get("/api/data", &key).await.status(), 200);
    assert_eq!(h.get("/api/data", &key).await.status(), 402);
    let (_, unlimited) = h.create_key("unlimited").await;
    let resp = credits(&h, &unlimited, json!({ "op": "add", "amount": 1 })).await;
    assert_eq!(json_of(resp, 400).await["code"], "INVALID_REQUEST");
}

#[tokio::test]
async fn bad_updates_are_400_and_unknown_ids_404() {
    let h = Harness::start(PLANS).await;
    let (_, key_id) = h.create_key("free").await;
    for (body, field) in [
        (json!({ "tier": "gold" }), "tier"),
        (json!({ "credit_policy": "reset" }), "credit_policy"),
        (
            json!({ "tier": "metered", "credit_policy": "double" }),
            "credit_policy",
        ),
        (json!({ "enabled": "yes" }), "enabled"),
        (json!({ "meta": "x" }), "meta"),
        (json!({ "colour": 1 }), "colour"),
    ] {
        let answer = json_of(patch(&h, &key_id, body.clone()).await, 400).await;
        assert!(
            answer["message"].as_str().unwrap_or("").contains(field),
            "{body}: {answer}"
        );
    }
    for (body, field) in [
        (json!({ "op": "add", "amount": -1 }), "amount"),
        (json!({ "op": "double", "amount": 1 }), "op"),
        (json!({ "op": "add" }), "amount"),
    ] {
        let answer = json_of(credits(&h, &key_id, body.clone()).await, 400).await;
        assert!(
            answer["message"].as_str().unwrap_or("").contains(field),
            "{body}: {answer}"
        );
    }
    let resp = patch(&h, "key_doesnotexist", json!({ "enabled": false })).await;
    assert_eq!(json_of(resp, 404).await["code"], "KEY_NOT_FOUND");
    let resp = credits(&h, "key_doesnotexist", json!({ "op": "add", "amount": 1 })).await;
    assert_eq!(json_of(resp, 404).await["code"], "KEY_NOT_FOUND");
    let resp = h
        .admin(Method::DELETE, "/v1/keys/key_doesnotexist")
        .send()
        .await
        .expect("delete");
    assert_eq!(json_of(resp, 404).await["code"], "KEY_NOT_FOUND");
}

async fn verify(h: &Harness, body: Value) -> Value {
    let resp = h
        .admin(Method::POST, "/v1/verify")
        .json(&body)
        .send()
        .await
        .expect("verify");
    json_of(resp, 200).await
}

#[tokio::test]
async fn verify_charges_like_a_proxied_request() {
    let h = Harness::start(PLANS).await;
    let (key, key_id) = h.create_key("free").await;
    let ok = verify(
        &h,
        json!({ "key": key, "feature": "api", "cost": 2, "pools": { "tokens": 30 } }),
    )
    .await;
    assert_eq!(ok["valid"], true);
    assert_eq!(ok["key_id"], key_id.as_str());
    assert_eq!(ok["remaining"], 3);
    // All or nothing: the pool would overflow, so the credits are untouched.
    let no = verify(
        &h,
        json!({ "key": key, "cost": 1, "pools": { "tokens": 71 } }),
    )
    .await;
    assert_eq!(
        (no["valid"].as_bool(), no["code"].as_str()),
        (Some(false), Some("QUOTA_EXCEEDED"))
    );
    let no = verify(&h, json!({ "key": key, "feature": "ai" })).await;
    assert_eq!(no["code"], "FEATURE_NOT_AVAILABLE");
    let no = verify(&h, json!({ "key": "sk_free_nope" })).await;
    assert_eq!(
        (no["valid"].as_bool(), no["code"].as_str()),
        (Some(false), Some("INVALID_KEY"))
    );
    let usage = h.usage(&key).await;
    assert_eq!(usage["usage"]["credits"]["remaining"], 3);
    assert_eq!(usage["usage"]["pools"]["tokens"]["used"], 30);
    // A proxied request and verify share one balance.
    assert_eq!(
        h.get("/api/data", &key).await.headers()["x-usage-remaining"],
        "2"
    );
}

/// A pool no tier or route defines would be counted for good and become
/// a metric label: one caller could grow both without bound.
#[tokio::test]
async fn verify_refuses_a_pool_the_config_does_not_define() {
    let h = Harness::start(PLANS).await;
    let (key, key_id) = h.create_key("free").await;
    let resp = h
        .admin(Method::POST, "/v1/verify")
        .json(&json!({ "key": key, "pools": { "made-up-pool": 1 } }))
        .send()
        .await
        .expect("verify");
    let answer = json_of(resp, 400).await;
    assert!(
        answer["message"]
            .as_str()
            .unwrap_or("")
            .contains("pools.made-up-pool"),
        "{answer}"
    );
    let metrics = h.scrape().await;
    assert!(
        !metrics.contains("made-up-pool"),
        "a metric series appeared"
    );
    let record = h
        .admin(Method::GET, &format!("/v1/keys/{key_id}"))
        .send()
        .await
        .expect("get");
    let record = json_of(record, 200).await;
    assert!(
        !record.to_string().contains("made-up-pool"),
        "the pool was stored: {record}"
    );
    assert_eq!(record["credits"]["remaining"], 5, "nothing was charged");
}

/// Every balance stays at most 2^63-1: a grant or a set past it, or an
/// initial balance past it, is a 400 that changes nothing.
#[tokio::test]
async fn balances_never_pass_2_pow_63_minus_1() {
    const MAX: u64 = i64::MAX as u64;
    let h = Harness::start(PLANS).await;
    let (_, key_id) = h.create_key("free").await;
    let record = json_of(
        credits(&h, &key_id, json!({ "op": "set", "amount": MAX - 5 })).await,
        200,
    )
    .await;
    assert_eq!(record["credits"]["remaining"], MAX - 5);
    let record = json_of(
        credits(&h, &key_id, json!({ "op": "add", "amount": 5 })).await,
        200,
    )
    .await;
    assert_eq!(record["credits"]["remaining"], MAX, "up to the cap is fine");
    for body in [
        json!({ "op": "add", "amount": 1 }),
        json!({ "op": "add", "amount": MAX }),
        json!({ "op": "set", "amount": MAX + 1 }),
        json!({ "op": "add", "amount": u64::MAX }),
    ] {
        let answer = json_of(credits(&h, &key_id, body.clone()).await, 400).await;
        assert!(
            answer["message"].as_str().unwrap_or("").contains("amount"),
            "{body}: {answer}"
        );
    }
    let record = h
        .admin(Method::GET, &format!("/v1/keys/{key_id}"))
        .send()
        .await
        .expect("get");
    assert_eq!(json_of(record, 200).await["credits"]["remaining"], MAX);
    let resp = h
        .admin(Method::POST, "/v1/keys")
        .json(&json!({ "tier": "free", "credits": MAX + 1 }))
        .send()
        .await
        .expect("create");
    let answer = json_of(resp, 400).await;
    assert!(answer["message"].as_str().unwrap_or("").contains("credits"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_writes_survive_kill_9() {
    let upstream = crate::common::Upstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("tollgate.yaml");
    let text = crate::common::config_text(
        upstream.addr,
        crate::common::dead_address(),
        &dir.path().join("store"),
        PLANS,
    );
    std::fs::write(&config, text).expect("write config");
    let env = [("TOLLGATE_TEST_ROOT_KEY", std::ffi::OsStr::new(ROOT_KEY))];
    let client = reqwest::Client::new();

    let mut first = Binary::serve(&config, &env).await;
    let created = first.create_key(json!({ "tier": "free" })).await;
    let key = created["key"].as_str().expect("key").to_string();
    let key_id = created["key_id"].as_str().expect("id").to_string();
    let granted = client
        .post(format!("http://{}/v1/keys/{key_id}/credits", first.admin))
        .bearer_auth(ROOT_KEY)
        .json(&json!({ "op": "add", "amount": 1000 }))
        .send()
        .await
        .expect("grant");
    assert_eq!(granted.status(), 200);
    // SIGKILL at once: no shutdown path runs.
    first.child.kill().expect("kill -9");
    first.child.wait().expect("reap");
    drop(first);

    let second = Binary::serve(&config, &env).await;
    let usage = second.usage(&key).await;
    assert_eq!(usage["usage"]["credits"]["remaining"], 1005);
}
