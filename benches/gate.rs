//! The decision core without sockets: what one request costs the gateway
//! between parsing and forwarding. Run: `cargo bench --bench gate`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};
use jiff::{SignedDuration, Timestamp};

use tollgate::config::Config;
use tollgate::gate::{admit, Demand};
use tollgate::keys::{self, KeyHash};
use tollgate::ledger::{KeyRecord, Usage};
use tollgate::path::normalise;
use tollgate::store::Store;

const CONFIG: &str = r#"
upstreams:
  main: { url: "http://127.0.0.1:3000" }
tiers:
  simple:
    credits: 1000000000000
    rate_limits:
      requests: { limit: 1000000000, window: 60s }
    features: [api]
  rich:
    credits: 1000000000000
    refill: { interval: monthly, amount: 1000000000000 }
    rate_limits:
      requests: { limit: 1000000000, window: 60s }
      burst: { limit: 1000000000, window: 1s }
    pools:
      tokens: { limit: 1000000000000, window: 30d }
      exports: { limit: 1000000000000, refill: monthly }
    features: [api]
routes:
  - { name: data, path: /api/data, upstream: main, feature: api }
  - { name: ai, path: /api/ai/*, upstream: main, feature: api, cost: { header: x-cost }, pools: { tokens: { header: x-tokens }, exports: 1 } }
"#;

fn record(tier: &str, hash: &KeyHash) -> KeyRecord {
    KeyRecord::new(
        "key_bench".into(),
        hash,
        "sk_bench",
        tier,
        Timestamp::UNIX_EPOCH,
    )
}

fn bench(c: &mut Criterion) {
    let config = Config::parse(CONFIG).expect("bench config").config;
    let start: Timestamp = "2026-03-10T12:00:00Z".parse().expect("time");
    let step = SignedDuration::from_micros(50);

    let key = keys::generate("sk_bench");
    c.bench_function("key check: checksum + sha256", |b| {
        b.iter(|| {
            assert!(keys::well_formed(black_box(&key.secret)));
            KeyHash::of(black_box(&key.secret))
        })
    });

    c.bench_function("path normalise", |b| {
        b.iter(|| normalise(black_box("/api/v1/users/%61bc/../42/orders?x=1"), false))
    });

    let data = Demand::for_route(&config.routes[0], &HeaderMap::new());
    let rec = record("simple", &key.hash);
    let mut usage = Usage::new(&config.tiers["simple"], None, None, start);
    let mut now = start;
    c.bench_function("admit: credits + 1 rate limit", |b| {
        b.iter(|| {
            now = now.checked_add(step).expect("time");
            admit(&config, &rec, &mut usage, black_box(&data), now).expect("allowed")
        })
    });

    let mut headers = HeaderMap::new();
    headers.insert("x-cost", HeaderValue::from_static("3"));
    headers.insert("x-tokens", HeaderValue::from_static("1500"));
    let rec = record("rich", &key.hash);
    let mut usage = Usage::new(&config.tiers["rich"], None, None, start);
    let mut now = start;
    c.bench_function("admit: header costs + 2 rate limits + 2 pools", |b| {
        b.iter(|| {
            now = now.checked_add(step).expect("time");
            let demand = Demand::for_route(&config.routes[1], black_box(&headers));
            admit(&config, &rec, &mut usage, &demand, now).expect("allowed")
        })
    });

    // The whole decision a proxied request pays: checksum, hash, cache
    // lookup in the real store, per-key lock, admit, mark dirty.
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let rec = record("simple", &key.hash);
    rt.block_on(store.create(
        key.hash,
        &rec,
        &Usage::new(&config.tiers["simple"], None, None, start),
    ))
    .expect("create");
    let mut now = start;
    c.bench_function("decision: key check + store lookup + admit", |b| {
        b.iter(|| {
            now = now.checked_add(step).expect("time");
            assert!(keys::well_formed(&key.secret));
            let entry = store
                .lookup(&KeyHash::of(&key.secret))
                .expect("io")
                .expect("known");
            let result = {
                let mut state = entry.lock().expect("live");
                let state = &mut *state;
                admit(&config, &state.record, &mut state.usage, &data, now)
            };
            store.touch(&entry);
            result.expect("allowed")
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
