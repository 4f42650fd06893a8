//! Operations: live reload (file watcher and SIGHUP), metrics, and the
//! graceful stop on SIGTERM/SIGINT.

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;

use crate::common::{eventually, json_of, metric, Binary, Harness, Upstream, ROOT_KEY};
use crate::PLANS;

const DATA_ROUTE: &str =
    "{ name: data, methods: [GET], path: /api/data, upstream: main, feature: api }";

/// PLANS with the data route costing `cost`.
fn plans_costing(cost: u64) -> String {
    PLANS.replace(
        DATA_ROUTE,
        &format!("{{ name: data, methods: [GET], path: /api/data, upstream: main, feature: api, cost: {cost} }}"),
    )
}

fn data_cost(h: &Harness) -> tollgate::config::Amount {
    h.gateway.gateway.config().routes[0].cost.clone()
}

fn reloads(h: &Harness, result: &str) -> u64 {
    h.gateway
        .gateway
        .metrics
        .config_reloads
        .with_label_values(&[result])
        .get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_rewrites_under_load_drop_no_request() {
    let h = Harness::start_watching(PLANS).await;
    let (key, _) = h.create_key("unlimited").await;
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = {
        let (client, url) = (h.client.clone(), h.url("/api/data"));
        let (stop, ok, failed, key) = (stop.clone(), ok.clone(), failed.clone(), key.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client.get(&url).bearer_auth(&key).send().await {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        })
    };
    // From 2: the data route already costs 1, and a rewrite the loop cannot
    // see applied would merge with the next one into a single reload.
    for cost in 2..=21u64 {
        std::fs::write(h.config_file(), h.config_text(&plans_costing(cost))).expect("rewrite");
        let want = tollgate::config::Amount::Fixed(cost);
        eventually("the rewrite is applied", || data_cost(&h) == want).await;
    }
    stop.store(true, Ordering::Relaxed);
    load.await.expect("load loop");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during reloads"
    );
    assert!(ok.load(Ordering::Relaxed) > 0);
    // The counters move just after the swap that the loop waited for.
    eventually("20 reloads counted", || reloads(&h, "ok") == 20).await;
    eventually("generation counted", || generation(&h) == 21).await;
    // The new cost is what requests are charged.
    let (priced, _) = h.create_key("free").await;
    let resp = h.get("/api/data", &priced).await;
    assert_eq!(resp.status(), 402, "cost 21 > the free plan's 5 credits");
}

#[tokio::test]
async fn a_bad_file_keeps_the_last_good_config_serving() {
    let h = Harness::start_watching(&plans_costing(2)).await;
    let (key, _) = h.create_key("metered").await;
    let good = tollgate::config::Amount::Fixed(2);
    let bad_files = [
        "tiers: { free: [broken yaml".to_string(),
        h.config_text(&plans_costing(2).replace("limit: 100, window: 1h", "limit: 0, window: 1h")),
        String::new(),
    ];
    let mut errors = reloads(&h, "error");
    let mut remaining = 1000u64;
    for bad in bad_files {
        std::fs::write(h.config_file(), bad).expect("write");
        eventually("the failed reload is counted", || {
            reloads(&h, "error") > errors
        })
        .await;
        errors = reloads(&h, "error");
        assert_eq!(data_cost(&h), good);
        // Requests still cost 2, as the last good config says.
        remaining -= 2;
        let resp = h.get("/api/data", &key).await;
        assert_eq!(
            resp.headers()["x-usage-remaining"],
            remaining.to_string().as_str()
        );
    }
    std::fs::remove_file(h.config_file()).expect("delete");
    eventually("the deleted file is counted as a failed reload", || {
        reloads(&h, "error") > errors
    })
    .await;
    assert_eq!(data_cost(&h), good);
    // A good file again is applied.
    std::fs::write(h.config_file(), h.config_text(&plans_costing(3))).expect("write");
    eventually("the good file is applied", || {
        data_cost(&h) == tollgate::config::Amount::Fixed(3)
    })
    .await;
}

#[tokio::test]
async fn a_tier_removed_by_reload_fails_its_keys_closed() {
    let h = Harness::start_watching(PLANS).await;
    let (key, key_id) = h.create_key("payg").await;
    assert_eq!(h.get("/api/data", &key).await.status(), 200);
    let without = PLANS.replace(
        "  payg:\n    credits: 2\n    overage: allow\n    features: [api]\n",
        "",
    );
    assert_ne!(without, PLANS);
    std::fs::write(h.config_file(), h.config_text(&without)).expect("write");
    eventually("payg is gone", || {
        h.gateway.gateway.config().tier("payg").is_none()
    })
    .await;
    let body = json_of(h.get("/api/data", &key).await, 403).await;
    assert_eq!(
        (body["code"].as_str(), body["tier"].as_str()),
        (Some("TIER_NOT_FOUND"), Some("payg"))
    );
    // The admin API still shows the balance the key keeps (2 - 1), with no
    // refill, not `"credits": null`.
    let record = json_of(
        h.admin(reqwest::Method::GET, &format!("/v1/keys/{key_id}"))
            .send()
            .await
            .expect("get"),
        200,
    )
    .await;
    assert_eq!(record["credits"]["remaining"], 1, "{record}");
    assert_eq!(record["credits"]["refill"], serde_json::Value::Null);
}

#[tokio::test]
async fn metrics_count_known_traffic_by_route_tier_and_code() {
    let h = Harness::start(PLANS).await;
    let (key, key_id) = h.create_key("free").await;
    for _ in 0..3 {
        assert_eq!(h.get("/api/data", &key).await.status(), 200);
    }
    assert_eq!(
        h.client
            .get(h.url("/api/data"))
            .send()
            .await
            .expect("send")
            .status(),
        401
    );
    assert_eq!(h.get("/api/data", "sk_free_unknown").await.status(), 401);
    assert_eq!(h.get("/nowhere", &key).await.status(), 404);
    assert_eq!(h.get("/api/ai/chat", &key).await.status(), 403);
    assert_eq!(h.post("/api/exports", &key).await.status(), 200);
    assert_eq!(h.get("/api/down", &key).await.status(), 502);
    assert_eq!(h.usage(&key).await["key_id"], key_id.as_str());

    // A request is counted when its log phase runs, which may be just after
    // its client has the answer.
    let mut text = h.scrape().await;
    for _ in 0..500 {
        if metric(&text, "tollgate_requests_total", &[]) >= 10.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        text = h.scrape().await;
    }
    let requests = |labels: &[(&str, &str)]| metric(&text, "tollgate_requests_total", labels);
    assert_eq!(
        requests(&[("route", "data"), ("tier", "free"), ("code", "OK")]),
        3.0
    );
    assert_eq!(
        requests(&[("route", "data"), ("tier", "none"), ("code", "MISSING_KEY")]),
        1.0
    );
    assert_eq!(
        requests(&[("route", "data"), ("tier", "none"), ("code", "INVALID_KEY")]),
        1.0
    );
    assert_eq!(
        requests(&[("route", "none"), ("code", "ROUTE_NOT_FOUND")]),
        1.0
    );
    // The usage endpoint has its own label, not `none`.
    assert_eq!(requests(&[("route", "usage"), ("code", "OK")]), 1.0);
    assert_eq!(
        metric(
            &text,
            "tollgate_request_duration_seconds_count",
            &[("route", "usage")]
        ),
        1.0
    );
    assert_eq!(
        requests(&[
            ("route", "ai"),
            ("tier", "free"),
            ("code", "FEATURE_NOT_AVAILABLE")
        ]),
        1.0
    );
    assert_eq!(
        requests(&[
            ("route", "down"),
            ("tier", "free"),
            ("code", "UPSTREAM_UNAVAILABLE")
        ]),
        1.0
    );
    assert_eq!(requests(&[]), 10.0);
    assert_eq!(
        metric(
            &text,
            "tollgate_request_duration_seconds_count",
            &[("route", "data")]
        ),
        5.0
    );
    assert_eq!(
        metric(&text, "tollgate_verify_duration_seconds_count", &[]),
        7.0
    );
    // 3 data calls; exports cost 0; the refused and refunded ones cost nothing.
    assert_eq!(
        metric(&text, "tollgate_credits_charged_total", &[("tier", "free")]),
        3.0
    );
    assert_eq!(
        metric(&text, "tollgate_pool_charged_total", &[("pool", "exports")]),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "tollgate_upstream_errors_total",
            &[("upstream", "dead")]
        ),
        1.0
    );
    assert_eq!(metric(&text, "tollgate_keys", &[]), 1.0);
    assert_eq!(metric(&text, "tollgate_store_healthy", &[]), 1.0);
    assert_eq!(metric(&text, "tollgate_config_generation", &[]), 1.0);
    assert_eq!(
        metric(&text, "tollgate_config_reloads_total", &[("result", "ok")]),
        0.0
    );
    assert!(text.contains("tollgate_config_reloads_total{result=\"error\"} 0"));
    assert!(text.contains("tollgate_webhook_deliveries_total{result=\"ok\"} 0"));
    assert!(
        !text.contains(&key_id) && !text.contains(&key),
        "a key reached the metrics"
    );
    // Shadow series exist only for tiers that have shadow limits; PLANS has none.
    for name in tollgate::metrics::NAMES
        .iter()
        .filter(|n| !n.contains("shadow"))
    {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} is not exported"
        );
    }
}

#[tokio::test]
async fn reload_results_are_counted() {
    let h = Harness::start_watching(PLANS).await;
    std::fs::write(h.config_file(), "not: [valid").expect("write");
    eventually("an error reload", || reloads(&h, "error") == 1).await;
    std::fs::write(h.config_file(), h.config_text(&plans_costing(4))).expect("write");
    eventually("an ok reload", || reloads(&h, "ok") >= 1).await;
    let text = h.scrape().await;
    assert_eq!(
        metric(
            &text,
            "tollgate_config_reloads_total",
            &[("result", "error")]
        ),
        1.0
    );
    assert!(metric(&text, "tollgate_config_generation", &[]) >= 2.0);
}

/// How long to watch for reloads that must not happen. An absence cannot be
/// polled for, so this waits: several times the watcher's 150 ms settle time.
const QUIET: Duration = Duration::from_secs(1);

fn generation(h: &Harness) -> i64 {
    h.gateway.gateway.metrics.config_generation.get()
}

/// What a scrape shows of reloads: (ok, error, generation).
async fn reload_counts(h: &Harness) -> (f64, f64, f64) {
    let text = h.scrape().await;
    let reloads = |result| {
        metric(
            &text,
            "tollgate_config_reloads_total",
            &[("result", result)],
        )
    };
    (
        reloads("ok"),
        reloads("error"),
        metric(&text, "tollgate_config_generation", &[]),
    )
}

/// Rewrites the config in place so the data route costs `cost`, and waits
/// until it is applied; afterwards the watcher is certainly running.
async fn edit(h: &Harness, cost: u64) {
    std::fs::write(h.config_file(), h.config_text(&plans_costing(cost))).expect("write");
    let want = tollgate::config::Amount::Fixed(cost);
    eventually("the edit is applied", || data_cost(h) == want).await;
}

#[tokio::test]
async fn reading_the_config_file_does_not_reload_it() {
    let h = Harness::start_watching(PLANS).await;
    edit(&h, 2).await;
    assert_eq!(generation(&h), 2);
    // What `cat`, a backup tool or an editor opening the file does.
    for _ in 0..5 {
        let mut text = String::new();
        std::fs::File::open(h.config_file())
            .and_then(|mut f| f.read_to_string(&mut text))
            .expect("read");
        assert!(text.contains("cost: 2"));
    }
    // chmod and touch(1) change only metadata.
    let path = h.config_file();
    let mode = std::fs::metadata(&path).expect("stat").permissions();
    std::fs::set_permissions(&path, mode).expect("chmod");
    let now = std::time::SystemTime::now();
    let times = std::fs::FileTimes::new()
        .set_accessed(now)
        .set_modified(now);
    std::fs::File::open(&path)
        .and_then(|f| f.set_times(times))
        .expect("touch");
    tokio::time::sleep(QUIET).await;
    assert_eq!(reload_counts(&h).await, (1.0, 0.0, 2.0));
}

#[tokio::test]
async fn an_editor_save_reloads_exactly_once() {
    let h = Harness::start_watching(PLANS).await;
    // Most editors write a new file beside the old one and rename it over.
    let temp = h.config_file().with_extension("yaml.tmp");
    std::fs::write(&temp, h.config_text(&plans_costing(2))).expect("write");
    std::fs::rename(&temp, h.config_file()).expect("rename");
    eventually("the renamed file is applied", || {
        data_cost(&h) == tollgate::config::Amount::Fixed(2)
    })
    .await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(reload_counts(&h).await, (1.0, 0.0, 2.0));
    // Others rewrite it in place.
    edit(&h, 3).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(reload_counts(&h).await, (2.0, 0.0, 3.0));
}

#[tokio::test]
async fn a_broken_file_is_counted_once_per_change() {
    let h = Harness::start_watching(PLANS).await;
    let broken = "tiers: { free: [broken yaml";
    std::fs::write(h.config_file(), broken).expect("write");
    eventually("the failed reload is counted", || reloads(&h, "error") == 1).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(reload_counts(&h).await, (0.0, 1.0, 1.0));
    // Saving the same bytes again changes nothing.
    std::fs::write(h.config_file(), broken).expect("write again");
    tokio::time::sleep(QUIET).await;
    assert_eq!(reload_counts(&h).await, (0.0, 1.0, 1.0));
    // A different broken file is a new failure, counted once.
    std::fs::write(h.config_file(), "tiers: [").expect("write");
    eventually("the second failure is counted", || {
        reloads(&h, "error") == 2
    })
    .await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(reload_counts(&h).await, (0.0, 2.0, 1.0));
    assert_eq!(data_cost(&h), tollgate::config::Amount::Fixed(1));
}

/// The real binary in front of a test upstream, with the config in a file.
async fn binary(body: &str) -> (Binary, Upstream, tempfile::TempDir) {
    let env = [("TOLLGATE_TEST_ROOT_KEY", std::ffi::OsStr::new(ROOT_KEY))];
    Binary::start(body, &env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sigint_let_in_flight_requests_finish_then_exit_0() {
    for sig in ["TERM", "INT"] {
        let (gateway, upstream, _dir) = binary(PLANS).await;
        let url = format!("http://{}/health", gateway.proxy);
        let slow = tokio::spawn(async move {
            reqwest::Client::new()
                .get(url)
                .header("x-test-delay-ms", "1500")
                .send()
                .await
                .map(|r| r.status().as_u16())
        });
        eventually("the slow request reached the upstream", || {
            !upstream.seen().is_empty()
        })
        .await;
        gateway.signal(sig);
        assert_eq!(
            slow.await
                .expect("join")
                .expect("the in-flight request completed"),
            200,
            "SIG{sig}"
        );
        let status = gateway.exit_status().await;
        assert!(status.success(), "SIG{sig}: {status:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_file() {
    let (gateway, _upstream, dir) = binary(PLANS).await;
    let client = reqwest::Client::new();
    let generation = || {
        let (client, url) = (
            client.clone(),
            format!("http://{}/metrics", gateway.metrics),
        );
        async move {
            let text = client
                .get(url)
                .send()
                .await
                .expect("scrape")
                .text()
                .await
                .expect("text");
            metric(&text, "tollgate_config_generation", &[])
        }
    };
    assert_eq!(generation().await, 1.0);
    for want in [2.0, 3.0] {
        gateway.signal("HUP");
        for _ in 0..1000 {
            if generation().await >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // The reload read the file; that must not look like an edit.
        tokio::time::sleep(QUIET).await;
        assert_eq!(
            generation().await,
            want,
            "each SIGHUP reloads the unchanged file exactly once"
        );
    }
    assert_eq!(gateway.lines_with("configuration reloaded"), 2);
    // A key made before and after still works: the store is untouched.
    let created = gateway.create_key(json!({ "tier": "free" })).await;
    assert!(created["key"].is_string());
    drop(dir);
}

/// `RUST_LOG` decides whether requests get access lines, as it does for
/// every other event (the gateway asks it once, at start).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_log_can_turn_the_access_lines_off() {
    let env = [
        ("TOLLGATE_TEST_ROOT_KEY", std::ffi::OsStr::new(ROOT_KEY)),
        ("RUST_LOG", std::ffi::OsStr::new("info,tollgate::access=off")),
    ];
    let (gateway, _upstream, _dir) = Binary::start(PLANS, &env).await;
    let created = gateway.create_key(json!({ "tier": "free" })).await;
    let key = created["key"].as_str().expect("key");
    let client = reqwest::Client::new();
    for (path, status) in [("/api/data", 200), ("/nowhere", 404)] {
        let resp = client
            .get(format!("http://{}{path}", gateway.proxy))
            .bearer_auth(key)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), status, "{path}");
    }
    // Lines go out in order: once the last one is read, so is every access
    // line there would have been.
    gateway.signal("TERM");
    eventually("the drained line", || {
        gateway.lines_with("drained; usage flushed") == 1
    })
    .await;
    assert_eq!(gateway.lines_with("tollgate::access"), 0);
    assert_eq!(gateway.lines_with("SIGTERM: draining"), 1, "info still logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_json_access_line_per_request_and_no_secrets() {
    let (gateway, _upstream, _dir) = binary(PLANS).await;
    let client = reqwest::Client::new();
    let created = gateway.create_key(json!({ "tier": "free" })).await;
    let key = created["key"].as_str().expect("key").to_string();
    let send = |path: &str| {
        client
            .get(format!("http://{}{path}", gateway.proxy))
            .bearer_auth(&key)
            .send()
    };
    assert_eq!(send("/api/data").await.expect("send").status(), 200);
    assert_eq!(send("/api/ai/x").await.expect("send").status(), 403);
    assert_eq!(send("/nowhere").await.expect("send").status(), 404);
    let access = || -> Vec<serde_json::Value> {
        gateway
            .logs
            .lock()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["target"] == "tollgate::access")
            .collect()
    };
    eventually("three access lines", || access().len() == 3).await;
    let lines = access();
    let summary: Vec<_> = lines
        .iter()
        .map(|l| {
            let f = &l["fields"];
            (
                f["route"].as_str(),
                f["tier"].as_str(),
                f["code"].as_str(),
                f["status"].as_u64(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (Some("data"), Some("free"), Some("OK"), Some(200)),
            (
                Some("ai"),
                Some("free"),
                Some("FEATURE_NOT_AVAILABLE"),
                Some(403)
            ),
            // No route matched, so no key was read.
            (
                Some("none"),
                Some("none"),
                Some("ROUTE_NOT_FOUND"),
                Some(404)
            ),
        ]
    );
    assert!(lines[0]["fields"]["latency_ms"].as_f64().is_some());
    assert!(lines[0]["fields"]["upstream_ms"].as_f64().is_some());
    let all = gateway.logs.lock().join("\n");
    assert!(all.contains("tollgate is serving"));
    assert!(
        all.contains("accepts connections once their request has arrived"),
        "TCP_DEFER_ACCEPT not set"
    );
    // Pingora's own `log` lines come through the same JSON subscriber.
    assert!(
        all.contains("\"target\":\"pingora_core"),
        "no Pingora line in the logs"
    );
    assert!(
        !all.contains(&key) && !all.contains(ROOT_KEY),
        "a secret reached the logs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_are_exported() {
    let h = Harness::start(PLANS).await;
    let slow = h
        .client
        .get(h.url("/health"))
        .header("x-test-delay-ms", "1000")
        .send();
    let slow = tokio::spawn(slow);
    eventually("the slow request reached the upstream", || {
        !h.upstream.seen().is_empty()
    })
    .await;
    let text = h.scrape().await;
    assert_eq!(metric(&text, "tollgate_requests_in_flight", &[]), 1.0);
    assert_eq!(slow.await.expect("join").expect("send").status(), 200);
    let gateway = &h.gateway.gateway;
    eventually("nothing in flight", || gateway.in_flight.get() == 0).await;
    assert_eq!(
        metric(&h.scrape().await, "tollgate_requests_in_flight", &[]),
        0.0
    );
}
