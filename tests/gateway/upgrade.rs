//! Zero-downtime binary upgrade: a second `tollgate serve --upgrade` takes
//! the listening sockets and then the store from the running one while a
//! load loop runs.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::json;

use crate::common::{config_text, dead_address, eventually, Binary, Upstream, ROOT_KEY};
use crate::PLANS;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_upgrade_under_load_cuts_nothing_and_counts_every_charge() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("store");
    let first_config = dir.path().join("first.yaml");
    std::fs::write(
        &first_config,
        config_text(upstream.addr, dead_address(), &store, PLANS),
    )
    .expect("write");
    let env = [("TOLLGATE_TEST_ROOT_KEY", std::ffi::OsStr::new(ROOT_KEY))];
    let old = Binary::serve(&first_config, &env).await;

    // The new process must claim the very addresses the old one serves.
    let second_config = dir.path().join("second.yaml");
    let text = config_text(upstream.addr, dead_address(), &store, PLANS).replace(
        "listen:\n  proxy: \"127.0.0.1:0\"\n  admin: \"127.0.0.1:0\"\n  metrics: \"127.0.0.1:0\"",
        &format!(
            "listen:\n  proxy: \"{}\"\n  admin: \"{}\"\n  metrics: \"{}\"",
            old.proxy, old.admin, old.metrics
        ),
    );
    assert!(text.contains(&old.proxy));
    std::fs::write(&second_config, text).expect("write");

    // Every request opens a new connection: what a client sees during the
    // hand-over is what a fresh client would.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let created = old
        .create_key(json!({ "tier": "metered", "credits": 1_000_000 }))
        .await;
    let key = created["key"].as_str().expect("key").to_string();
    let url = format!("http://{}/api/data", old.proxy);

    let (stop, ok, failed) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let load = {
        let (client, url, key) = (client.clone(), url.clone(), key.clone());
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match client.get(&url).bearer_auth(&key).send().await {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(r) => {
                        eprintln!("failed: {}", r.status());
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                    Err(e) => {
                        eprintln!("failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
        })
    };
    // A slow request in flight across the hand-over.
    let slow = {
        let (client, url, key) = (client.clone(), url.clone(), key.clone());
        tokio::spawn(async move {
            client
                .get(&url)
                .bearer_auth(&key)
                .header("x-test-delay-ms", "2000")
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    eventually("the load loop is running", || {
        ok.load(Ordering::Relaxed) > 20
    })
    .await;

    let mut old = old;
    let new = Binary::serve_with(&second_config, &env, &["--upgrade"]).await;
    let old_exit = tokio::task::spawn_blocking(move || old.child.wait())
        .await
        .expect("join")
        .expect("old process exit");
    assert!(old_exit.success(), "the old process exits 0: {old_exit:?}");
    assert_eq!(
        slow.await
            .expect("join")
            .expect("the in-flight request completed"),
        200
    );

    let served_before_new = ok.load(Ordering::Relaxed);
    eventually("the new process serves", || {
        ok.load(Ordering::Relaxed) > served_before_new + 20
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    load.await.expect("load loop");
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during the upgrade"
    );

    // Every charge, before and after, is in the store the new process serves.
    let usage = new.usage(&key).await;
    let served = ok.load(Ordering::Relaxed) + 1;
    assert_eq!(
        usage["usage"]["credits"]["used"], served,
        "charges lost or doubled"
    );
    assert_eq!(usage["usage"]["credits"]["remaining"], 1_000_000 - served);
}
