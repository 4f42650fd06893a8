//! Usage billing (SPEC §5): events made from metered usage, written to the
//! outbox with the usage they come from, delivered to a real webhook
//! receiver with both signatures, at least once, through receiver outages,
//! hangs and `kill -9`.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::common::{
    eventually, json_of, metric, set_webhook_secret, Binary, Harness, Receiver, Upstream, ROOT_KEY,
    WEBHOOK_SECRET,
};

/// Plans for billing: a pay-as-you-go plan that goes past 0, a capped one.
const PLANS: &str = r#"
tiers:
  payg:
    credits: 2
    overage: allow
    features: [api]
  capped:
    credits: 10
    pools:
      tokens: { limit: 1000, window: 1h }
    features: [api]
routes:
  - { name: down, path: /api/down, upstream: dead, feature: api }
  - { name: tokens, path: /api/tokens, upstream: main, feature: api, pools: { tokens: { header: x-tokens } } }
  - { name: api, path: /api/*, upstream: main, feature: api }
"#;

fn reporting(receiver: &Receiver, extra: &str) -> String {
    reporting_every(receiver, "100ms", extra)
}

fn reporting_every(receiver: &Receiver, interval: &str, extra: &str) -> String {
    format!(
        r#"{PLANS}
reporting:
  webhook: {{ url: "{}", secret_env: TOLLGATE_TEST_WEBHOOK_SECRET }}
  flush_interval: {interval}
{extra}
"#,
        receiver.url()
    )
}

async fn gateway(receiver: &Receiver, extra: &str) -> Harness {
    set_webhook_secret();
    Harness::start(&reporting(receiver, extra)).await
}

/// One request on the tokens route per amount, each charged to the pool.
async fn spend_tokens(h: &Harness, key: &str, amounts: &[u64]) {
    for tokens in amounts {
        let resp = h
            .keyed(reqwest::Method::GET, "/api/tokens", key)
            .header("x-tokens", tokens.to_string())
            .send()
            .await
            .expect("proxy");
        assert_eq!(resp.status(), 200);
    }
}

/// Waits until `check` holds, moving the gateway's clock half a second per
/// poll: the reporter's backoff waits on that clock.
async fn retried_until(h: &Harness, what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if check() {
            return;
        }
        h.advance(Duration::from_millis(500));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// The overage units delivered for `key_id`, once per event id.
fn overage_delivered(receiver: &Receiver, key_id: &str) -> u64 {
    receiver
        .events_of("overage", key_id)
        .iter()
        .map(|e| e["units"].as_u64().expect("units"))
        .sum()
}

async fn key_record(h: &Harness, key_id: &str) -> Value {
    let resp = h
        .admin(reqwest::Method::GET, &format!("/v1/keys/{key_id}"))
        .send()
        .await
        .expect("admin");
    json_of(resp, 200).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overage_thresholds_and_exhaustion_are_delivered_signed_twice() {
    let receiver = Receiver::start().await;
    let h = gateway(&receiver, "  thresholds: [0.5, 1.0]").await;
    let created = h
        .create_key_with(json!({ "tier": "payg", "external_id": "cus_7", "meta": { "plan": "x" } }))
        .await;
    let (key, key_id) = (
        created["key"].as_str().expect("key").to_string(),
        created["key_id"].as_str().expect("id").to_string(),
    );
    for _ in 0..5 {
        assert_eq!(h.get("/api/data", &key).await.status(), 200);
    }
    eventually("3 overage units delivered", || {
        overage_delivered(&receiver, &key_id) == 3
    })
    .await;
    eventually("threshold and exceeded events", || {
        receiver.events_of("usage.threshold", &key_id).len() == 2
            && receiver.events_of("usage.exceeded", &key_id).len() == 1
    })
    .await;

    let overage = &receiver.events_of("overage", &key_id)[0];
    for field in [
        "id",
        "type",
        "at",
        "key_id",
        "external_id",
        "tier",
        "meta",
        "units",
        "period_start",
    ] {
        assert!(
            overage.get(field).is_some(),
            "overage event lacks {field}: {overage}"
        );
    }
    assert_eq!(overage["external_id"], "cus_7");
    assert_eq!(overage["tier"], "payg");
    assert_eq!(overage["meta"], json!({ "plan": "x" }));
    assert_eq!(overage["at"], "2026-03-10T12:00:00Z", "the gateway's clock");
    let mut thresholds: Vec<f64> = receiver
        .events_of("usage.threshold", &key_id)
        .iter()
        .map(|e| e["threshold"].as_f64().expect("threshold"))
        .collect();
    thresholds.sort_by(f64::total_cmp);
    assert_eq!(thresholds, [0.5, 1.0]);

    // Every delivery carries both signatures of the same body.
    let deliveries = receiver.deliveries();
    assert!(!deliveries.is_empty());
    let verifier = standardwebhooks::Webhook::new(WEBHOOK_SECRET).expect("secret");
    for d in &deliveries {
        verifier
            .verify(&d.body, &d.headers)
            .unwrap_or_else(|e| panic!("Standard Webhooks signature: {e:?}"));
        let header = |name: &str| d.headers[name].to_str().expect("ascii").to_string();
        assert_eq!(header("idempotency-key"), header("webhook-id"));
        let ours = header("tollgate-signature");
        let (t, v1) = ours
            .strip_prefix("t=")
            .and_then(|rest| rest.split_once(",v1="))
            .expect("t=<unix>,v1=<hex>");
        let mut mac = Hmac::<Sha256>::new_from_slice(WEBHOOK_SECRET.as_bytes()).expect("key");
        mac.update(format!("{t}.").as_bytes());
        mac.update(&d.body);
        let expected: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(v1, expected, "Tollgate-Signature");
    }
    // Nothing more to say: no more events, however long it waits.
    let before = receiver.events().len();
    assert_eq!(h.get("/api/data", &key).await.status(), 200);
    eventually("the fourth unit", || {
        overage_delivered(&receiver, &key_id) == 4
    })
    .await;
    assert_eq!(
        receiver.events().len(),
        before + 1,
        "only the new overage unit"
    );
    assert_eq!(key_record(&h, &key_id).await["overage"]["units"], 4);
    let text = h.scrape().await;
    assert!(metric(&text, "tollgate_events_total", &[("type", "overage")]) >= 2.0);
    assert!(
        metric(
            &text,
            "tollgate_webhook_deliveries_total",
            &[("result", "ok")]
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overage_refunded_after_an_upstream_failure_is_not_reported() {
    let receiver = Receiver::start().await;
    let h = gateway(&receiver, "").await;
    let (key, key_id) = h.create_key("payg").await;
    for _ in 0..2 {
        assert_eq!(h.get("/api/data", &key).await.status(), 200);
    }
    // Past 0 now: these would be overage, but the upstream is down.
    for _ in 0..3 {
        assert_eq!(h.get("/api/down", &key).await.status(), 502);
    }
    assert_eq!(h.get("/api/data", &key).await.status(), 200);
    eventually("one overage unit", || {
        overage_delivered(&receiver, &key_id) == 1
    })
    .await;
    assert_eq!(key_record(&h, &key_id).await["overage"]["units"], 1);
    assert_eq!(overage_delivered(&receiver, &key_id), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_events_count_every_counter_net_of_refunds() {
    let receiver = Receiver::start().await;
    let h = gateway(&receiver, "  usage_events: true").await;
    let (key, key_id) = h.create_key("capped").await;
    spend_tokens(&h, &key, &[100, 250]).await;
    assert_eq!(h.get("/api/down", &key).await.status(), 502);
    let total = |counter: &str| -> u64 {
        receiver
            .events_of("usage", &key_id)
            .iter()
            .filter_map(|e| e["units"][counter].as_u64())
            .sum()
    };
    eventually("usage units", || {
        total("credits") == 2 && total("tokens") == 350
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_fails_then_recovers_gets_every_unit_with_batches_keeping_their_ids() {
    let receiver = Receiver::start().await;
    receiver.answer(503);
    let h = gateway(&receiver, "").await;
    let (key, key_id) = h.create_key("payg").await;
    for _ in 0..12 {
        // The proxy answers as usual while the receiver fails.
        assert_eq!(h.get("/api/data", &key).await.status(), 200);
    }
    retried_until(&h, "three failed attempts", || {
        receiver.deliveries().len() >= 3
    })
    .await;
    let text = h.scrape().await;
    assert!(
        metric(
            &text,
            "tollgate_webhook_deliveries_total",
            &[("result", "error")]
        ) >= 3.0
    );
    assert!(metric(&text, "tollgate_outbox_pending", &[]) >= 1.0);
    receiver.answer(200);
    retried_until(&h, "10 overage units", || {
        overage_delivered(&receiver, &key_id) == 10
    })
    .await;
    // A retried batch kept its id.
    let ids: Vec<String> = receiver
        .deliveries()
        .iter()
        .map(|d| d.headers["webhook-id"].to_str().expect("id").to_string())
        .collect();
    let first = &ids[0];
    assert!(
        ids.iter().filter(|id| *id == first).count() >= 2,
        "the first batch was retried under its id: {ids:?}"
    );
    // The outbox, as the admin API shows it, empties.
    for _ in 0..1000 {
        let resp = h
            .admin(reqwest::Method::GET, "/v1/outbox")
            .send()
            .await
            .expect("outbox");
        if json_of(resp, 200).await["sinks"]["webhook"]["pending"] == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the webhook outbox never emptied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_for_twenty_minutes_is_retried_at_most_five_minutes_apart() {
    let receiver = Receiver::start().await;
    receiver.answer(503);
    let h = gateway(&receiver, "").await;
    let (key, key_id) = h.create_key("payg").await;
    for _ in 0..5 {
        assert_eq!(h.get("/api/data", &key).await.status(), 200);
    }
    eventually("a first failed attempt", || {
        !receiver.deliveries().is_empty()
    })
    .await;
    // Minutes pass on the gateway's clock. Backoff doubles, but never waits
    // longer than 5 minutes, so each 5-minute step brings another attempt;
    // the proxy answers as usual meanwhile.
    for step in 1..=4 {
        let before = receiver.deliveries().len();
        h.advance(Duration::from_secs(301));
        eventually(&format!("an attempt after step {step}"), || {
            receiver.deliveries().len() > before
        })
        .await;
        assert_eq!(h.get("/api/data", &key).await.status(), 200);
    }
    assert_eq!(overage_delivered(&receiver, &key_id), 0);
    receiver.answer(200);
    h.advance(Duration::from_secs(301));
    eventually("every overage unit", || {
        overage_delivered(&receiver, &key_id) == 7
    })
    .await;
    let ids: std::collections::BTreeSet<String> = receiver
        .deliveries()
        .iter()
        .map(|d| d.headers["webhook-id"].to_str().expect("id").to_string())
        .collect();
    assert!(
        ids.len() <= 2,
        "twenty minutes of retries kept the batch ids: {ids:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_hangs_past_the_timeout_is_retried() {
    let receiver = Receiver::start().await;
    receiver.hang(true);
    let h = gateway(&receiver, "").await;
    let (key, key_id) = h.create_key("payg").await;
    for _ in 0..4 {
        assert_eq!(h.get("/api/data", &key).await.status(), 200);
    }
    // The first attempt hangs; requests go on meanwhile.
    eventually("a delivery hanging", || receiver.hung() > 0).await;
    receiver.hang(false);
    for _ in 0..2 {
        assert_eq!(h.get("/api/data", &key).await.status(), 200);
    }
    for _ in 0..2000 {
        if overage_delivered(&receiver, &key_id) == 4 {
            break;
        }
        h.advance(Duration::from_millis(100));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        overage_delivered(&receiver, &key_id),
        4,
        "every unit, after the 10 s timeout"
    );
    let text = h.scrape().await;
    assert!(
        metric(
            &text,
            "tollgate_webhook_deliveries_total",
            &[("result", "error")]
        ) >= 1.0
    );
}

/// The real binary, reporting to `receiver`, with its config and store in
/// `dir`.
async fn serve_reporting(
    dir: &std::path::Path,
    upstream: &Upstream,
    receiver: &Receiver,
) -> Binary {
    serve_reporting_every(dir, upstream, receiver, "100ms").await
}

async fn serve_reporting_every(
    dir: &std::path::Path,
    upstream: &Upstream,
    receiver: &Receiver,
    interval: &str,
) -> Binary {
    let config = dir.join("tollgate.yaml");
    let text = crate::common::config_text(
        upstream.addr,
        crate::common::dead_address(),
        &dir.join("store"),
        &reporting_every(receiver, interval, ""),
    );
    std::fs::write(&config, text).expect("write config");
    let env = [
        ("TOLLGATE_TEST_ROOT_KEY", std::ffi::OsStr::new(ROOT_KEY)),
        (
            "TOLLGATE_TEST_WEBHOOK_SECRET",
            std::ffi::OsStr::new(WEBHOOK_SECRET),
        ),
    ];
    Binary::serve(&config, &env).await
}

async fn record_overage(gateway: &Binary, key_id: &str) -> u64 {
    crate::common::bounded_client()
        .get(format!("http://{}/v1/keys/{key_id}", gateway.admin))
        .bearer_auth(ROOT_KEY)
        .send()
        .await
        .expect("admin")
        .json::<Value>()
        .await
        .expect("json")["overage"]["units"]
        .as_u64()
        .expect("units")
}

/// 40 overage requests and `kill -9` at once: whatever the write-behind
/// kept, the units the key record shows after the restart are exactly the
/// units delivered, once per id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_kill_9_the_record_and_the_delivered_events_agree() {
    let upstream = Upstream::start().await;
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    for round in 0..3 {
        let gateway = serve_reporting(dir.path(), &upstream, &receiver).await;
        let created = gateway.create_key(json!({ "tier": "payg" })).await;
        let (key, key_id) = (
            created["key"].as_str().expect("key").to_string(),
            created["key_id"].as_str().expect("id").to_string(),
        );
        let client = crate::common::bounded_client();
        let sends = (0..42).map(|_| {
            client
                .get(format!("http://{}/api/data", gateway.proxy))
                .bearer_auth(&key)
                .send()
        });
        for resp in futures::future::join_all(sends).await {
            let resp = resp.expect("proxy");
            let status = resp.status();
            // The body says which refusal, if one came.
            let body = resp.text().await.unwrap_or_default();
            // On Redis these are a fresh gateway's first requests: each
            // worker thread opens its connection and loads the scripts,
            // which in a loaded test run has taken past the store's 1 s
            // timeout (twice, 2026-12). Such a request is refused and
            // charges nothing; what this test checks holds for whatever
            // was served.
            if crate::common::on_redis()
                && status == 503
                && body.contains("STORE_UNAVAILABLE")
            {
                continue;
            }
            assert_eq!(status, 200, "round {round}: {body}");
        }
        // Round 0 dies at once; later rounds a little later, so that some
        // rounds keep the usage and some do not.
        tokio::time::sleep(Duration::from_millis(150 * round)).await;
        gateway.kill_9();

        let gateway = serve_reporting(dir.path(), &upstream, &receiver).await;
        let shown = record_overage(&gateway, &key_id).await;
        assert!(shown <= 40, "round {round}: {shown} overage units");
        for _ in 0..1000 {
            if overage_delivered(&receiver, &key_id) >= shown {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // And no more than that arrives afterwards.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            overage_delivered(&receiver, &key_id),
            shown,
            "round {round}: delivered units == the record's"
        );
        gateway.kill_9();
    }
}

/// Events pending when the gateway dies are delivered by the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_pending_at_kill_9_are_delivered_after_the_restart() {
    let upstream = Upstream::start().await;
    let receiver = Receiver::start().await;
    receiver.answer(503);
    let dir = tempfile::tempdir().expect("tempdir");
    // Reporting every 2 s: all 7 requests are charged before the first
    // pass makes their events, so the first batch (retried unchanged while
    // it fails) carries all 5 units. With a shorter interval a loaded
    // machine lets a pass run mid-way, and the rest waits behind a batch
    // that never succeeds.
    let gateway = serve_reporting_every(dir.path(), &upstream, &receiver, "2s").await;
    let created = gateway.create_key(json!({ "tier": "payg" })).await;
    let (key, key_id) = (
        created["key"].as_str().expect("key").to_string(),
        created["key_id"].as_str().expect("id").to_string(),
    );
    let client = crate::common::bounded_client();
    for _ in 0..7 {
        let resp = client
            .get(format!("http://{}/api/data", gateway.proxy))
            .bearer_auth(&key)
            .send()
            .await
            .expect("proxy");
        assert_eq!(resp.status(), 200);
    }
    // The first attempt comes 2 s after the start, on the binary's real
    // clock.
    crate::common::eventually_within("failed attempts carrying all 5 units", Duration::from_secs(30), || {
        let mut seen = std::collections::HashSet::new();
        let units: u64 = receiver
            .deliveries()
            .iter()
            .flat_map(|d| d.events())
            .filter(|e| e["type"] == "overage" && seen.insert(e["id"].to_string()))
            .filter_map(|e| e["units"].as_u64())
            .sum();
        units == 5
    })
    .await;
    assert_eq!(
        overage_delivered(&receiver, &key_id),
        0,
        "nothing accepted yet"
    );
    gateway.kill_9();
    let batch_ids = |accepted: bool| -> std::collections::HashSet<String> {
        receiver
            .deliveries()
            .iter()
            .filter(|d| (200..300).contains(&d.status) == accepted)
            .map(|d| d.headers["webhook-id"].to_str().expect("id").to_string())
            .collect()
    };
    let failed_before = batch_ids(false);
    receiver.answer(200);
    let gateway = serve_reporting(dir.path(), &upstream, &receiver).await;
    eventually("the 5 units after the restart", || {
        overage_delivered(&receiver, &key_id) == 5
    })
    .await;
    assert!(
        batch_ids(true).is_subset(&failed_before),
        "the batches kept their ids across the restart: {failed_before:?} then {:?}",
        batch_ids(true)
    );
    drop(gateway);
}

/// SIGTERM: drain, flush, then one bounded last attempt of the reporter,
/// then exit 0. With an hourly reporter only that last attempt can have
/// delivered the events. A receiver that hangs does not hold the exit up:
/// its events wait in the outbox for the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_then_reports_once_more_then_exits_0() {
    let upstream = Upstream::start().await;
    let receiver = Receiver::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let client = crate::common::bounded_client();
    let overage_requests = |gateway: &Binary, key: &str| {
        let (url, key) = (
            format!("http://{}/api/data", gateway.proxy),
            key.to_string(),
        );
        let client = client.clone();
        async move {
            for _ in 0..5 {
                let resp = client
                    .get(&url)
                    .bearer_auth(&key)
                    .send()
                    .await
                    .expect("proxy");
                assert_eq!(resp.status(), 200);
            }
        }
    };

    let gateway = serve_reporting_every(dir.path(), &upstream, &receiver, "1h").await;
    let created = gateway.create_key(json!({ "tier": "payg" })).await;
    let (key, key_id) = (
        created["key"].as_str().expect("key").to_string(),
        created["key_id"].as_str().expect("id").to_string(),
    );
    overage_requests(&gateway, &key).await;
    gateway.signal("TERM");
    assert!(gateway.exit_status().await.success());
    assert_eq!(
        overage_delivered(&receiver, &key_id),
        3,
        "sent by the last attempt"
    );

    // A receiver that hangs: the exit does not wait for it.
    receiver.hang(true);
    let gateway = serve_reporting_every(dir.path(), &upstream, &receiver, "1h").await;
    overage_requests(&gateway, &key).await;
    gateway.signal("TERM");
    assert!(gateway.exit_status().await.success());
    receiver.hang(false);
    let gateway = serve_reporting(dir.path(), &upstream, &receiver).await;
    eventually("the units left in the outbox, after the restart", || {
        overage_delivered(&receiver, &key_id) == 8
    })
    .await;
    drop(gateway);
}

/// The Stripe key tests configure (`api_key_env: TOLLGATE_TEST_STRIPE_KEY`).
const STRIPE_KEY: &str = "sk_test_tollgate_0123456789";

#[derive(Default)]
struct StripeState {
    /// Accepted meter events by identifier: (event_name, customer, value).
    accepted: parking_lot::Mutex<std::collections::HashMap<String, (String, String, u64)>>,
    /// Everything that broke Stripe's contract.
    violations: parking_lot::Mutex<Vec<String>>,
    calls: std::sync::atomic::AtomicUsize,
    /// Calls under way per (customer, meter), and the most ever at once.
    in_flight: parking_lot::Mutex<std::collections::HashMap<(String, String), usize>>,
    most_at_once: std::sync::atomic::AtomicUsize,
    /// Whether `cus_refused` exists yet.
    refused_exists: std::sync::atomic::AtomicBool,
}

/// A local stand-in for Stripe's meter-event endpoint, as strict as the
/// real one: method, path, key, content type and every form field; 429 on
/// every third call, as Stripe does under load; 400 for an unknown customer.
struct FakeStripe {
    url: String,
    state: std::sync::Arc<StripeState>,
}

impl FakeStripe {
    async fn start() -> FakeStripe {
        let state = std::sync::Arc::new(StripeState::default());
        let app = axum::Router::new()
            .fallback(stripe_endpoint)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeStripe { url, state }
    }

    /// The sum of accepted values for a meter and customer.
    fn total(&self, meter: &str, customer: &str) -> u64 {
        self.state
            .accepted
            .lock()
            .values()
            .filter(|(m, c, _)| m == meter && c == customer)
            .map(|(_, _, v)| v)
            .sum()
    }
}

async fn stripe_endpoint(
    axum::extract::State(state): axum::extract::State<std::sync::Arc<StripeState>>,
    req: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 1 << 20)
        .await
        .unwrap_or_default();
    let mut wrong = Vec::new();
    if parts.method != axum::http::Method::POST {
        wrong.push(format!("method {}", parts.method));
    }
    if parts.uri.path() != "/v1/billing/meter_events" {
        wrong.push(format!("path {}", parts.uri.path()));
    }
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    if header("authorization") != format!("Bearer {STRIPE_KEY}") {
        wrong.push("authorization".into());
    }
    if !header("content-type").starts_with("application/x-www-form-urlencoded") {
        wrong.push(format!("content-type {}", header("content-type")));
    }
    let form: Vec<(String, String)> = serde_urlencoded::from_bytes(&body).unwrap_or_default();
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let mut names: Vec<&str> = form.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    let expected = [
        "event_name",
        "identifier",
        "payload[stripe_customer_id]",
        "payload[value]",
        "timestamp",
    ];
    if names != expected {
        wrong.push(format!("fields {names:?}"));
    }
    let value = field("payload[value]").and_then(|v| v.parse::<u64>().ok());
    let timestamp = field("timestamp").and_then(|v| v.parse::<i64>().ok());
    if value.is_none() || timestamp.is_none_or(|t| t <= 0) {
        wrong.push(format!("value {value:?} / timestamp {timestamp:?}"));
    }
    let (meter, customer, identifier) = (
        field("event_name").unwrap_or_default(),
        field("payload[stripe_customer_id]").unwrap_or_default(),
        field("identifier").unwrap_or_default(),
    );
    if !wrong.is_empty() {
        state.violations.lock().extend(wrong);
        return (axum::http::StatusCode::BAD_REQUEST, "bad request").into_response();
    }
    let lane = (customer.clone(), meter.clone());
    let now = {
        let mut in_flight = state.in_flight.lock();
        let n = in_flight.entry(lane.clone()).or_default();
        *n += 1;
        *n
    };
    state
        .most_at_once
        .fetch_max(now, std::sync::atomic::Ordering::AcqRel);
    // Long enough that concurrent calls would overlap.
    tokio::time::sleep(Duration::from_millis(15)).await;
    if let Some(n) = state.in_flight.lock().get_mut(&lane) {
        *n -= 1;
    }
    let call = state
        .calls
        .fetch_add(1, std::sync::atomic::Ordering::AcqRel)
        + 1;
    let error = |status: u16, message: &str| {
        let status = axum::http::StatusCode::from_u16(status).expect("status");
        (
            status,
            axum::Json(json!({ "error": { "message": message } })),
        )
            .into_response()
    };
    if call % 3 == 0 {
        return error(429, "Too many requests in a short period of time.");
    }
    if customer == "cus_refused"
        && !state
            .refused_exists
            .load(std::sync::atomic::Ordering::Acquire)
    {
        return error(400, "No such customer: 'cus_refused'");
    }
    state
        .accepted
        .lock()
        .insert(identifier, (meter, customer, value.unwrap_or(0)));
    axum::Json(json!({ "object": "billing.meter_event" })).into_response()
}

/// Overage goes to the overage meter, `meters` bill every unit of their
/// counters, a 429 is retried, calls for one customer and meter are never
/// concurrent, and events Stripe refuses or that have no customer are
/// parked, listed and retried on request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_meter_events_are_exact_serial_and_parked_when_refused() {
    std::env::set_var("TOLLGATE_TEST_STRIPE_KEY", STRIPE_KEY);
    let stripe = FakeStripe::start().await;
    let h = Harness::start(&format!(
        r#"{PLANS}
reporting:
  stripe:
    api_key_env: TOLLGATE_TEST_STRIPE_KEY
    base_url: "{}"
    event_name: api_overage
    meters: {{ credits: api_calls, tokens: ai_tokens }}
  flush_interval: 100ms
"#,
        stripe.url
    ))
    .await;
    async fn key(h: &Harness, tier: &str, customer: Option<&str>) -> String {
        let meta = customer.map_or(json!({}), |c| json!({ "stripe_customer_id": c }));
        let created = h
            .create_key_with(json!({ "tier": tier, "meta": meta }))
            .await;
        created["key"].as_str().expect("key").to_string()
    }
    let (a, none, refused, d) = (
        key(&h, "payg", Some("cus_A")).await,
        key(&h, "payg", None).await,
        key(&h, "payg", Some("cus_refused")).await,
        key(&h, "capped", Some("cus_D")).await,
    );
    for k in [&a, &none, &refused] {
        for _ in 0..5 {
            assert_eq!(h.get("/api/data", k).await.status(), 200);
        }
    }
    spend_tokens(&h, &d, &[100, 250]).await;
    let parked = || async {
        let resp = h
            .admin(reqwest::Method::GET, "/v1/outbox")
            .send()
            .await
            .expect("outbox");
        json_of(resp, 200).await["sinks"]["stripe"]["parked"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    for _ in 0..1000 {
        let done = stripe.total("api_overage", "cus_A") == 3
            && stripe.total("api_calls", "cus_A") == 5
            && stripe.total("api_calls", "cus_D") == 2
            && stripe.total("ai_tokens", "cus_D") == 350
            && parked().await.len() == 4;
        if done {
            break;
        }
        h.advance(Duration::from_millis(500));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(stripe.total("api_overage", "cus_A"), 3);
    assert_eq!(stripe.total("api_calls", "cus_A"), 5);
    assert_eq!(stripe.total("api_calls", "cus_D"), 2);
    assert_eq!(stripe.total("ai_tokens", "cus_D"), 350);
    let listed = parked().await;
    assert_eq!(
        listed.len(),
        4,
        "two events each of the keys without a usable customer: {listed:?}"
    );
    assert!(listed.iter().any(|p| p["reason"]
        .as_str()
        .unwrap_or("")
        .contains("stripe_customer_id")));
    assert!(listed.iter().any(|p| p["reason"]
        .as_str()
        .unwrap_or("")
        .contains("No such customer")));
    let violations = stripe.state.violations.lock().clone();
    assert!(violations.is_empty(), "{violations:?}");
    assert_eq!(
        stripe
            .state
            .most_at_once
            .load(std::sync::atomic::Ordering::Acquire),
        1
    );
    let text = h.scrape().await;
    assert!(
        metric(
            &text,
            "tollgate_stripe_meter_events_total",
            &[("result", "retry")]
        ) >= 1.0
    );
    assert!(
        metric(
            &text,
            "tollgate_stripe_meter_events_total",
            &[("result", "parked")]
        ) >= 4.0
    );

    // The customer exists now: retry everything parked. The events of the
    // key without a customer come back parked; the others go through.
    stripe
        .state
        .refused_exists
        .store(true, std::sync::atomic::Ordering::Release);
    let resp = h
        .admin(reqwest::Method::POST, "/v1/outbox/retry")
        .json(&json!({ "all": true }))
        .send()
        .await
        .expect("retry");
    json_of(resp, 200).await;
    retried_until(&h, "the refused customer's events delivered", || {
        stripe.total("api_overage", "cus_refused") == 3
            && stripe.total("api_calls", "cus_refused") == 5
    })
    .await;
    for _ in 0..500 {
        if parked().await.len() == 2 {
            break;
        }
        h.advance(Duration::from_millis(500));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        parked().await.len(),
        2,
        "the key without a customer stays parked"
    );
    let resp = h
        .admin(reqwest::Method::POST, "/v1/outbox/retry")
        .json(&json!({}))
        .send()
        .await
        .expect("retry");
    json_of(resp, 400).await;
}

/// A reload whose webhook secret is not in the environment is an error:
/// the old config keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_naming_an_unset_secret_keeps_the_old_config() {
    let receiver = Receiver::start().await;
    set_webhook_secret();
    let h = Harness::start_watching(&reporting(&receiver, "")).await;
    let (key, _) = h.create_key("payg").await;
    let broken = h.config_text(&reporting(&receiver, "")).replace(
        "TOLLGATE_TEST_WEBHOOK_SECRET",
        "TOLLGATE_TEST_NEVER_SET_SECRET",
    );
    std::fs::write(h.config_file(), broken).expect("write");
    for _ in 0..1000 {
        if metric(
            &h.scrape().await,
            "tollgate_config_reloads_total",
            &[("result", "error")],
        ) >= 1.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let text = h.scrape().await;
    assert_eq!(
        metric(
            &text,
            "tollgate_config_reloads_total",
            &[("result", "error")]
        ),
        1.0
    );
    assert_eq!(metric(&text, "tollgate_config_generation", &[]), 1.0);
    assert_eq!(h.get("/api/data", &key).await.status(), 200);
}
