//! Several gateways on one real `redis-server` (SPEC §8): counters exact
//! across nodes, changes in force everywhere at once, one clock, the
//! shared outbox, Redis faults, migration, and Redis Cluster.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use jiff::Timestamp;
use reqwest::Method;
use serde_json::{json, Value};

use crate::common::{
    bounded_client, json_of, metric, set_webhook_secret, Binary, Harness, Receiver, RedisServer,
    Upstream, ROOT_KEY, START,
};

const PLANS: &str = r#"
tiers:
  fifty:
    credits: 50
    features: [api]
  limited:
    credits: unlimited
    rate_limits:
      requests: { limit: 30, window: 1h }
    features: [api]
  pooled:
    credits: 50
    pools:
      tokens: { limit: 40, window: 1h }
    features: [api]
  daily:
    credits: 5
    refill: { interval: daily, amount: 5 }
    features: [api]
  payg:
    credits: 2
    overage: allow
    features: [api]
  gold:
    credits: 100
    features: [api, ai]
routes:
  - { name: tokens, path: /api/tokens, upstream: main, feature: api, pools: { tokens: 1 } }
  - { name: ai, path: /api/ai, upstream: main, feature: ai }
  - { name: api, path: /api/*, upstream: main, feature: api }
  - { name: health, path: /health, upstream: main, auth: none }
"#;

/// A node's config: `redis` is the `store.redis` mapping's inside (empty:
/// the embedded store); `{store}` is left for [`Harness::node`].
fn node_text(upstream: &Upstream, redis: &str, extra: &str) -> String {
    let redis = if redis.is_empty() {
        String::new()
    } else {
        format!("\n  redis: {{ {redis} }}")
    };
    format!(
        r#"
listen:
  proxy: "127.0.0.1:0"
  admin: "127.0.0.1:0"
  metrics: "127.0.0.1:0"
store:
  path: "{{store}}"{redis}
admin:
  root_key_env: TOLLGATE_TEST_ROOT_KEY
upstreams:
  main: {{ url: "http://{upstream}" }}
{PLANS}
{extra}
"#,
        upstream = upstream.addr,
    )
}

fn start() -> Timestamp {
    START.parse().expect("start")
}

/// `n` gateways on the Redis at `url`, in front of one upstream.
async fn nodes(n: usize, redis: &str, extra: &str) -> (Arc<Upstream>, Vec<Harness>) {
    let upstream = Arc::new(Upstream::start().await);
    let text = node_text(&upstream, redis, extra);
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(Harness::node(upstream.clone(), &text, start(), true).await);
    }
    (upstream, nodes)
}

/// Sends `count` requests at once, spread over `nodes` in turn; the
/// statuses.
async fn burst(nodes: &[Harness], count: usize, path: &str, key: &str) -> Vec<u16> {
    let sends = (0..count).map(|i| nodes[i % nodes.len()].get(path, key));
    join_all(sends)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect()
}

fn successes(statuses: &[u16]) -> usize {
    statuses.iter().filter(|s| **s == 200).count()
}

/// 90 concurrent requests over 3 nodes: exactly what each counter holds
/// succeeds (credits, a rate limit, a pool), and a request refused by one
/// counter charges none of the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ninety_requests_over_three_nodes_get_exactly_what_the_counters_hold() {
    let redis = RedisServer::start();
    let (upstream, nodes) = nodes(3, &format!("url: \"{}\"", redis.url(0)), "").await;
    let (fifty, _) = nodes[0].create_key("fifty").await;
    let (limited, _) = nodes[1].create_key("limited").await;
    let (pooled, _) = nodes[2].create_key("pooled").await;
    for (key, path, expected, refused) in [
        (&fifty, "/api/data", 50, 402),
        (&limited, "/api/data", 30, 429),
        (&pooled, "/api/tokens", 40, 402),
    ] {
        let statuses = burst(&nodes, 90, path, key).await;
        assert_eq!(successes(&statuses), expected, "{path}: {statuses:?}");
        assert!(
            statuses.iter().all(|s| *s == 200 || *s == refused),
            "{statuses:?}"
        );
    }
    assert_eq!(upstream.seen().len(), 50 + 30 + 40);
    for node in &nodes {
        let usage = node.usage(&fifty).await;
        assert_eq!(usage["usage"]["credits"]["remaining"], 0);
        let usage = node.usage(&pooled).await;
        assert_eq!(usage["usage"]["pools"]["tokens"]["used"], 40);
        assert_eq!(
            usage["usage"]["credits"]["remaining"], 10,
            "a request the pool refused charged no credit"
        );
    }
}

/// A daily refill on a key three nodes race on just past midnight happens
/// once: 30 requests, exactly the 5 refilled credits succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refill_three_nodes_race_on_happens_once() {
    let redis = RedisServer::start();
    let (_upstream, nodes) = nodes(3, &format!("url: \"{}\"", redis.url(0)), "").await;
    let (key, _) = nodes[0].create_key("daily").await;
    assert_eq!(successes(&burst(&nodes, 9, "/api/data", &key).await), 5);
    for node in &nodes {
        node.set_time("2026-03-11T00:00:01Z");
    }
    assert_eq!(successes(&burst(&nodes, 30, "/api/data", &key).await), 5);
    assert_eq!(
        nodes[2].usage(&key).await["usage"]["credits"]["remaining"],
        0
    );
}

/// A node whose own clock runs a day ahead still counts on Redis's: it
/// sees no new day, so no refill the others do not see.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_with_a_skewed_clock_counts_on_redis_time() {
    let redis = RedisServer::start();
    let upstream = Arc::new(Upstream::start().await);
    let text = node_text(&upstream, &format!("url: \"{}\"", redis.url(0)), "");
    let now = Timestamp::now();
    let ahead = now
        .checked_add(jiff::SignedDuration::from_hours(24))
        .expect("time");
    let on_time = Harness::node(upstream.clone(), &text, now, false).await;
    let skewed = Harness::node(upstream.clone(), &text, ahead, false).await;
    let gap = skewed.now().duration_since(on_time.now());
    assert!(
        gap.abs() < jiff::SignedDuration::from_secs(60),
        "the nodes count a day apart: {gap}"
    );
    let (key, _) = on_time.create_key("daily").await;
    for _ in 0..5 {
        assert_eq!(on_time.get("/api/data", &key).await.status(), 200);
    }
    let body = json_of(skewed.get("/api/data", &key).await, 402).await;
    assert_eq!(body["code"], "USAGE_EXCEEDED", "{body}");
    assert_eq!(on_time.get("/api/data", &key).await.status(), 402);
}

async fn admin_json(node: &Harness, method: Method, path: &str, body: Option<Value>) -> Value {
    let mut request = node.admin(method, path);
    if let Some(body) = body {
        request = request.json(&body);
    }
    json_of(request.send().await.expect("admin"), 200).await
}

/// A key made on one node works on the others at once; grants, plan
/// changes, disabling and revocation made on one node are in force on the
/// others by the time the admin call has answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_made_on_one_node_hold_on_the_others_at_once() {
    let redis = RedisServer::start();
    let (_upstream, nodes) = nodes(3, &format!("url: \"{}\"", redis.url(0)), "").await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let (key, key_id) = a.create_key("fifty").await;
    assert_eq!(b.get("/api/data", &key).await.status(), 200);
    assert_eq!(c.get("/api/data", &key).await.status(), 200);
    // b and c hold the key now; changes reach their copies.
    let path = format!("/v1/keys/{key_id}/credits");
    admin_json(
        a,
        Method::POST,
        &path,
        Some(json!({ "op": "set", "amount": 1 })),
    )
    .await;
    assert_eq!(b.get("/api/data", &key).await.status(), 200);
    assert_eq!(c.get("/api/data", &key).await.status(), 402);
    admin_json(
        a,
        Method::POST,
        &path,
        Some(json!({ "op": "add", "amount": 2 })),
    )
    .await;
    assert_eq!(c.get("/api/data", &key).await.status(), 200);
    assert_eq!(b.get("/api/ai", &key).await.status(), 403);
    let key_path = format!("/v1/keys/{key_id}");
    admin_json(a, Method::PATCH, &key_path, Some(json!({ "tier": "gold" }))).await;
    assert_eq!(b.get("/api/ai", &key).await.status(), 200);
    admin_json(
        c,
        Method::PATCH,
        &key_path,
        Some(json!({ "enabled": false })),
    )
    .await;
    assert_eq!(a.get("/api/data", &key).await.status(), 403);
    assert_eq!(b.get("/api/data", &key).await.status(), 403);
    admin_json(
        b,
        Method::PATCH,
        &key_path,
        Some(json!({ "enabled": true })),
    )
    .await;
    assert_eq!(c.get("/api/data", &key).await.status(), 200);
    let resp = a
        .admin(Method::DELETE, &key_path)
        .send()
        .await
        .expect("revoke");
    assert!(resp.status().is_success(), "{}", resp.status());
    for node in &nodes {
        let body = json_of(node.get("/api/data", &key).await, 401).await;
        assert_eq!(body["code"], "INVALID_KEY");
    }
}

/// Polls `node` with `key` until it answers 200 (at most 10 s).
async fn until_served(node: &Harness, key: &str) {
    for _ in 0..1000 {
        if node.get("/api/data", key).await.status() == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the node never served again");
}

/// Redis stopped: keyed routes answer 503 at once, public routes serve,
/// the store shows unhealthy. Redis restarted from its append-only file:
/// the node serves again by itself and every answered charge is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_stopped_is_503_and_a_restart_from_its_aof_loses_nothing() {
    let mut redis = RedisServer::start();
    let (_upstream, nodes) = nodes(2, &format!("url: \"{}\"", redis.url(0)), "").await;
    let node = &nodes[0];
    let (key, _) = node.create_key("fifty").await;
    assert_eq!(successes(&burst(&nodes, 6, "/api/data", &key).await), 6);
    redis.stop();
    // Bounded: an answer that took longer than 2 s is an error here.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("client");
    for node in &nodes {
        let resp = client
            .get(node.url("/api/data"))
            .bearer_auth(&key)
            .send()
            .await
            .expect("an answer within 2 s");
        assert_eq!(json_of(resp, 503).await["code"], "STORE_UNAVAILABLE");
        let resp = client
            .get(node.url("/health"))
            .send()
            .await
            .expect("public");
        assert_eq!(resp.status(), 200);
        assert_eq!(
            metric(&node.scrape().await, "tollgate_store_healthy", &[]),
            0.0
        );
        let health = client
            .get(node.admin_url("/healthz"))
            .send()
            .await
            .expect("healthz");
        assert_eq!(json_of(health, 200).await["store"], "unavailable");
    }
    redis.restart();
    for node in &nodes {
        until_served(node, &key).await;
    }
    // 6 before, one each after: nothing answered was lost.
    assert_eq!(
        nodes[1].usage(&key).await["usage"]["credits"]["remaining"],
        50 - 6 - 2
    );
    assert_eq!(
        metric(&node.scrape().await, "tollgate_store_healthy", &[]),
        1.0
    );
}

/// A TCP relay in front of `to` that can hold new connections: one it
/// accepts while held is passed on only once released (as a slow link or
/// handshake would keep it). Counts the connections it passed on.
struct Relay {
    addr: std::net::SocketAddr,
    held: tokio::sync::watch::Sender<bool>,
    passed: Arc<std::sync::atomic::AtomicUsize>,
}

impl Relay {
    async fn start(to: std::net::SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("relay binds");
        let addr = listener.local_addr().expect("relay address");
        let (held, release) = tokio::sync::watch::channel(false);
        let passed = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = passed.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let mut release = release.clone();
                let count = count.clone();
                tokio::spawn(async move {
                    if release.wait_for(|held| !*held).await.is_err() {
                        return;
                    }
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await else {
                        return;
                    };
                    count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        Relay { addr, held, passed }
    }

    fn hold(&self, held: bool) {
        self.held.send_replace(held);
    }

    fn passed(&self) -> usize {
        self.passed.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// A worker thread's own Redis connection carries requests only once it
/// is up: while new connections to Redis hang (a slow link, a slow
/// handshake), keyed requests go over the connection the node already
/// has, and are served; once connections go through again, the threads'
/// own are made and used.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_do_not_wait_for_a_threads_own_redis_connection() {
    let redis = RedisServer::start();
    let relay = Relay::start(([127, 0, 0, 1], redis.port).into()).await;
    let (upstream, nodes) = nodes(1, &format!("url: \"redis://{}/0\"", relay.addr), "").await;
    let node = &nodes[0];
    let (key, _) = node.create_key("fifty").await;
    let at_start = relay.passed();
    relay.hold(true);
    // More requests than worker threads, one after another and at once.
    for _ in 0..6 {
        assert_eq!(node.get("/api/data", &key).await.status(), 200);
    }
    let statuses = burst(&nodes, 6, "/api/data", &key).await;
    assert_eq!(statuses, vec![200; 6]);
    assert_eq!(relay.passed(), at_start, "no new connection got through");
    assert_eq!(
        metric(&node.scrape().await, "tollgate_store_healthy", &[]),
        1.0
    );
    relay.hold(false);
    let clients_on = |command: &str| {
        redis
            .cli(&["CLIENT", "LIST"])
            .lines()
            .filter(|client| client.split(' ').any(|f| f == format!("cmd={command}")))
            .count()
    };
    // Connections go through now: a thread's own one answers its PING (a
    // held one, or, if that gave up while held, the one the thread's next
    // request makes), then carries that thread's requests: a second
    // connection runs the charging script (the first is the node's shared
    // one). Bounded by the key's credits.
    let mut served = 12;
    while clients_on("evalsha") < 2 {
        assert!(served < 45, "no thread's own connection carried a request");
        if clients_on("ping") == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(node.get("/api/data", &key).await.status(), 200);
        served += 1;
    }
    assert_eq!(upstream.seen().len(), served);
    assert_eq!(
        node.usage(&key).await["usage"]["credits"]["remaining"],
        50 - served
    );
}

/// `on_error: allow`: while Redis is away keyed requests are forwarded
/// uncharged and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_error_allow_forwards_uncharged_and_counts_it() {
    let mut redis = RedisServer::start();
    let (upstream, nodes) = nodes(
        1,
        &format!("url: \"{}\", on_error: allow", redis.url(0)),
        "",
    )
    .await;
    let node = &nodes[0];
    let (key, _) = node.create_key("fifty").await;
    assert_eq!(node.get("/api/data", &key).await.status(), 200);
    redis.stop();
    for _ in 0..3 {
        assert_eq!(node.get("/api/data", &key).await.status(), 200);
    }
    assert_eq!(upstream.seen().len(), 4);
    let text = node.scrape().await;
    assert_eq!(metric(&text, "tollgate_store_bypassed_total", &[]), 3.0);
    redis.restart();
    for _ in 0..1000 {
        if metric(&node.scrape().await, "tollgate_store_healthy", &[]) == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(node.get("/api/data", &key).await.status(), 200);
    assert_eq!(
        node.usage(&key).await["usage"]["credits"]["remaining"],
        50 - 2,
        "the bypassed requests charged nothing"
    );
    assert_eq!(
        metric(&node.scrape().await, "tollgate_store_bypassed_total", &[]),
        3.0
    );
}

fn reporting(receiver: &Receiver, interval: &str) -> String {
    format!(
        r#"reporting:
  webhook: {{ url: "{}", secret_env: TOLLGATE_TEST_WEBHOOK_SECRET }}
  flush_interval: {interval}
"#,
        receiver.url()
    )
}

/// The overage units delivered for `key_id`, once per event id.
fn overage_delivered(receiver: &Receiver, key_id: &str) -> u64 {
    receiver
        .events_of("overage", key_id)
        .iter()
        .filter_map(|e| e["units"].as_u64())
        .sum()
}

/// A real `tollgate serve` on `text` (its store in `dir`).
async fn serve(dir: &std::path::Path, text: &str) -> Binary {
    let config = dir.join("tollgate.yaml");
    let text = text.replace("{store}", &dir.join("store").display().to_string());
    std::fs::write(&config, text).expect("write config");
    let env = [
        ("TOLLGATE_TEST_ROOT_KEY", std::ffi::OsStr::new(ROOT_KEY)),
        (
            "TOLLGATE_TEST_WEBHOOK_SECRET",
            std::ffi::OsStr::new(crate::common::WEBHOOK_SECRET),
        ),
    ];
    Binary::serve(&config, &env).await
}

async fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    crate::common::eventually(what, &mut check).await;
}

/// A node takes events from the shared outbox, fails to deliver them and
/// is `kill -9`ed for good: another node takes them over once they have
/// been idle `claim_after`, and the receiver gets each once per id.
/// Charges the dead node made but had not yet turned into events are
/// reported by the other node too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_of_a_node_killed_for_good_are_delivered_by_another() {
    set_webhook_secret();
    let redis = RedisServer::start();
    let receiver = Receiver::start().await;
    receiver.answer(503);
    let upstream = Arc::new(Upstream::start().await);
    let url = format!("url: \"{}\", claim_after: 1s", redis.url(0));
    let dir = tempfile::tempdir().expect("tempdir");
    // Reporting every 2 s: all 7 requests are charged before the first
    // pass, so its batch (retried unchanged while it fails) carries all 5
    // units; with 100 ms a loaded machine can let a pass run mid-way and
    // the rest wait behind a batch that never succeeds.
    let doomed = serve(
        dir.path(),
        &node_text(&upstream, &url, &reporting(&receiver, "2s")),
    )
    .await;
    let created = doomed.create_key(json!({ "tier": "payg" })).await;
    let (key, key_id) = (
        created["key"].as_str().expect("key").to_string(),
        created["key_id"].as_str().expect("id").to_string(),
    );
    let client = bounded_client();
    let proxy = format!("http://{}/api/data", doomed.proxy);
    for _ in 0..7 {
        let resp = client
            .get(&proxy)
            .bearer_auth(&key)
            .send()
            .await
            .expect("proxy");
        assert_eq!(resp.status(), 200);
    }
    wait_for(
        "the dead node's failed attempt carrying the 5 units",
        || {
            receiver
                .deliveries()
                .iter()
                .flat_map(|d| d.events())
                .filter(|e| e["type"] == "overage")
                .filter_map(|e| e["units"].as_u64())
                .sum::<u64>()
                >= 5
        },
    )
    .await;
    doomed.kill_9();
    receiver.answer(200);
    // The survivor charges 2 more units of its own on the same key.
    let survivor = Harness::node(
        upstream.clone(),
        &node_text(&upstream, &url, &reporting(&receiver, "100ms")),
        start(),
        true,
    )
    .await;
    for _ in 0..2 {
        assert_eq!(survivor.get("/api/data", &key).await.status(), 200);
    }
    for _ in 0..1000 {
        if overage_delivered(&receiver, &key_id) >= 7 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(overage_delivered(&receiver, &key_id), 7);
    let record = admin_json(&survivor, Method::GET, &format!("/v1/keys/{key_id}"), None).await;
    assert_eq!(record["overage"]["units"], 7, "{record}");
}

/// `tollgate migrate --from <store> --to <redis url>` copies a used store:
/// keys, usage, external ids and pending events; twice changes nothing;
/// a node on Redis then serves the keys with what they had left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_used_embedded_store_migrates_to_redis_once() {
    set_webhook_secret();
    let redis = RedisServer::start();
    let receiver = Receiver::start().await;
    receiver.answer(503);
    let upstream = Arc::new(Upstream::start().await);
    let dir = tempfile::tempdir().expect("tempdir");
    let embedded = serve(
        dir.path(),
        &node_text(&upstream, "", &reporting(&receiver, "100ms")),
    )
    .await;
    let fifty = embedded
        .create_key(json!({ "tier": "fifty", "external_id": "cus_migrated" }))
        .await;
    let payg = embedded.create_key(json!({ "tier": "payg" })).await;
    let limited = embedded.create_key(json!({ "tier": "limited" })).await;
    let client = bounded_client();
    let proxy = format!("http://{}/api/data", embedded.proxy);
    for (created, times) in [(&fifty, 3), (&payg, 4), (&limited, 3)] {
        for _ in 0..times {
            let resp = client
                .get(&proxy)
                .bearer_auth(created["key"].as_str().expect("key"))
                .send()
                .await
                .expect("proxy");
            assert_eq!(resp.status(), 200);
        }
    }
    wait_for("the overage events in the outbox", || {
        !receiver.deliveries().is_empty()
    })
    .await;
    embedded.signal("TERM");
    assert!(embedded.exit_status().await.success());
    // The embedded store keeps usage in its binary form; Redis gets it as
    // JSON with windows as pairs, which gateways of earlier versions on it
    // can read.
    let limited_id = limited["key_id"].as_str().expect("id");
    let embedded_usage: Vec<u8> =
        rusqlite::Connection::open(dir.path().join("store/tollgate.sqlite3"))
            .expect("open the store")
            .query_row(
                "SELECT usage FROM keys WHERE key_id = ?1",
                [limited_id],
                |r| r.get(0),
            )
            .expect("the limited key's row, a blob");
    assert_eq!(
        embedded_usage.first(),
        Some(&tollgate::store::codec::BINARY)
    );

    let migrate = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["migrate", "--from"])
            .arg(dir.path().join("store"))
            .args(["--to", &redis.url(0)])
            .output()
            .expect("run migrate");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let first = migrate();
    assert!(first.contains("copied 3 of 3 keys and "), "{first}");
    assert!(!first.contains("and 0 outbox events"), "{first}");
    let second = migrate();
    assert!(
        second.contains("copied 0 of 3 keys and 0 outbox events"),
        "{second}"
    );

    receiver.answer(200);
    let node = Harness::node(
        upstream.clone(),
        &node_text(
            &upstream,
            &format!("url: \"{}\"", redis.url(0)),
            &reporting(&receiver, "100ms"),
        ),
        start(),
        true,
    )
    .await;
    let key = fifty["key"].as_str().expect("key");
    assert_eq!(node.usage(key).await["usage"]["credits"]["remaining"], 47);
    let in_redis = redis.cli(&["--scan", "--pattern", &format!("tg:*:key:{limited_id}")]);
    let in_redis = redis.cli(&["hget", in_redis.trim(), "use"]);
    assert!(in_redis.contains(r#""buckets":[["#), "{in_redis}");
    assert!(!in_redis.contains(r#""v":3"#), "{in_redis}");
    let limited_usage = node.usage(limited["key"].as_str().expect("key")).await;
    assert_eq!(
        limited_usage["usage"]["rate_limits"]["requests"]["remaining"], 27,
        "{limited_usage}"
    );
    let listed = admin_json(
        &node,
        Method::GET,
        "/v1/keys?external_id=cus_migrated",
        None,
    )
    .await;
    assert_eq!(listed["keys"][0]["key_id"], fifty["key_id"], "{listed}");
    let payg_id = payg["key_id"].as_str().expect("id");
    for _ in 0..1000 {
        if overage_delivered(&receiver, payg_id) >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(overage_delivered(&receiver, payg_id), 2);
    assert_eq!(node.get("/api/data", key).await.status(), 200);
}

/// Redis Cluster: three masters on loopback; every key's data under one
/// hash tag, so each script touches one slot. Two nodes on the cluster
/// stay exact and see each other's changes (a cluster has no one pub/sub
/// for every key: the version check on every decision carries them).
/// Alone: `cargo test --test gateway_on_redis -- cluster`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_cluster_of_three_masters_stays_exact() {
    let masters: Vec<RedisServer> = (0..3)
        .map(|_| {
            RedisServer::start_with(&["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
        })
        .collect();
    let addresses: Vec<String> = masters
        .iter()
        .map(|m| format!("127.0.0.1:{}", m.port))
        .collect();
    let made = std::process::Command::new("redis-cli")
        .arg("--cluster")
        .arg("create")
        .args(&addresses)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .expect("redis-cli (apt-get install redis-tools)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stdout)
    );
    for _ in 0..1000 {
        if masters[0]
            .cli(&["cluster", "info"])
            .contains("cluster_state:ok")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let url = format!("url: \"redis://{}\", cluster: true", addresses[0]);
    let (upstream, nodes) = nodes(2, &url, "").await;
    let mut keys = Vec::new();
    // Keys spread over buckets, so over all three masters.
    for _ in 0..6 {
        keys.push(nodes[0].create_key("fifty").await);
    }
    for (key, _) in &keys {
        assert_eq!(successes(&burst(&nodes, 60, "/api/data", key).await), 50);
    }
    assert_eq!(upstream.seen().len(), 6 * 50);
    let (key, key_id) = &keys[0];
    let path = format!("/v1/keys/{key_id}/credits");
    admin_json(
        &nodes[0],
        Method::POST,
        &path,
        Some(json!({ "op": "add", "amount": 1 })),
    )
    .await;
    assert_eq!(nodes[1].get("/api/data", key).await.status(), 200);
    let resp = nodes[1]
        .admin(Method::DELETE, &format!("/v1/keys/{key_id}"))
        .send()
        .await
        .expect("revoke");
    assert!(resp.status().is_success());
    assert_eq!(nodes[0].get("/api/data", key).await.status(), 401);
}
