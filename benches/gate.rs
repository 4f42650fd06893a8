//! The decision core without sockets: what one keyed request costs the
//! gateway between parsing and forwarding, per outcome. Run:
//! `cargo bench --bench gate` (criterion's means and medians), which also
//! prints a median and p99 per case from individually timed decisions.
//!
//! Every case goes the way a proxied request does: the key found through
//! the gateway (one SHA-256, the in-memory shard), then `gate::admit` run
//! by the store on the key's state (the per-key lock, the key marked for
//! the write-behind). "1M keys" runs the allowed case with
//! that many keys in the store and in memory (`TOLLGATE_BENCH_KEYS` sets
//! the number; seeding them takes a minute).
//!
//! Last, the write-behind: the CPU a key written costs when load spreads
//! over 10,000 keys (`cargo bench --bench gate -- write-behind` runs only
//! that, in about 20 s).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use criterion::{criterion_group, Criterion};
use http::{HeaderMap, HeaderValue};
use jiff::{SignedDuration, Timestamp};

use futures::FutureExt;
use tollgate::clock::SystemClock;
use tollgate::config::Config;
use tollgate::gate::{self, admit, Demand};
use tollgate::gateway::{charged, Gateway, Generation};
use tollgate::keys::{self, KeyHash};
use tollgate::ledger::{KeyRecord, Usage};
use tollgate::metrics::Metrics;
use tollgate::path::normalise;
use tollgate::reject::Rejection;
use tollgate::store::{codec, sqlite, Store};

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
  tight:
    credits: 0
    rate_limits:
      requests: { limit: 1, window: 1h }
    pools:
      tokens: { limit: 1, window: 30d }
    features: [api]
  poor:
    credits: 0
    features: [api]
  spread:
    credits: 1000000000000
    rate_limits:
      requests: { limit: 1000000000, window: 60s }
    pools:
      exports: { limit: 1000000000000, window: 30d }
    features: [api]
routes:
  - { name: data, path: /api/data, upstream: main, feature: api }
  - { name: ai, path: /api/ai/*, upstream: main, feature: api, cost: { header: x-cost }, pools: { tokens: { header: x-tokens }, exports: 1 }, meter: { tokens: x-usage-tokens } }
  - { name: admin, path: /api/admin, upstream: main, feature: admin }
  - { name: spread, path: /api/spread, upstream: main, feature: api, pools: { exports: 1 } }
"#;

const START: &str = "2026-03-10T12:00:00Z";

/// A gateway over a store in a temporary directory, without listeners.
struct Bench {
    gateway: Gateway,
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
}

impl Bench {
    fn new() -> Bench {
        let config = Config::parse(CONFIG).expect("bench config").config;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::open(dir.path()).expect("store"));
        let metrics = Metrics::new().expect("metrics");
        let gateway = Gateway {
            config: ArcSwap::from_pointee(Generation::new(config, &metrics)),
            store,
            clock: Arc::new(SystemClock::new()),
            root_key: None,
            metrics,
            last_reload: Default::default(),
            in_flight: Default::default(),
            connections: Default::default(),
        };
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        Bench {
            gateway,
            _dir: dir,
            rt,
        }
    }

    /// A key on `tier`, changed by `edit` before it is stored.
    fn key(&self, tier: &str, edit: impl FnOnce(&mut KeyRecord)) -> String {
        let config = self.gateway.config();
        let key = keys::generate("sk_bench");
        let mut rec = KeyRecord::new(keys::generate_id(), &key.hash, &key.start, tier, ts(START));
        edit(&mut rec);
        let usage = Usage::new(&config.tiers[tier], None, None, ts(START));
        self.rt
            .block_on(self.gateway.store.create(key.hash, &rec, &usage))
            .expect("create");
        key.secret
    }

    /// Adds `n` keys on `tier` straight into the store, and loads them
    /// into memory.
    fn many(&self, tier: &str, n: usize) -> Vec<KeyHash> {
        let usage = codec::usage_bytes(&Usage::default());
        let billing = codec::billing_bytes(&tollgate::ledger::Billing::default());
        let mut hashes = Vec::with_capacity(n);
        let mut batch = Vec::with_capacity(10_000);
        for i in 0..n {
            let key = keys::generate("sk_bench");
            let rec = KeyRecord::new(keys::generate_id(), &key.hash, &key.start, tier, ts(START));
            batch.push((
                sqlite::Row {
                    key_id: rec.key_id.to_string(),
                    record: serde_json::to_string(&rec).expect("json"),
                    usage: usage.clone(),
                    seq: 0,
                    billing: billing.clone(),
                },
                key.hash,
                None,
            ));
            hashes.push(key.hash);
            if batch.len() == 10_000 || i + 1 == n {
                self.gateway
                    .store
                    .import_blocking(std::mem::take(&mut batch))
                    .expect("import");
            }
        }
        for hash in &hashes {
            ready(self.gateway.store.find(hash))
                .expect("read")
                .expect("known");
        }
        hashes
    }

    /// One decision, as the proxy makes it.
    fn decide(
        &self,
        route: usize,
        headers: &HeaderMap,
        key: &str,
        now: Timestamp,
    ) -> Result<gate::Admission, Rejection> {
        let config = self.gateway.config.load();
        let key = ready(self.gateway.authenticate(key))?;
        let demand = Demand::for_route(&config.routes[route], headers);
        let decided = ready(self.gateway.store.charge(&key, |record, usage| {
            admit(&config, record, usage, &demand, now)
        }));
        charged(decided)?
    }
}

/// The output of a future the embedded store completes at once.
fn ready<F: std::future::Future>(future: F) -> F::Output {
    future
        .now_or_never()
        .expect("the embedded store answers at once")
}

fn ts(text: &str) -> Timestamp {
    text.parse().expect("time")
}

/// A case: a name, and one decision at a given time.
type Case<'a> = (&'static str, Box<dyn Fn(Timestamp) + 'a>);

fn cases(bench: &Bench) -> Vec<Case<'_>> {
    let none = HeaderMap::new();
    let mut costs = HeaderMap::new();
    costs.insert("x-cost", HeaderValue::from_static("3"));
    costs.insert("x-tokens", HeaderValue::from_static("1500"));
    let mut bad = HeaderMap::new();
    bad.insert("x-cost", HeaderValue::from_static("-1"));
    bad.insert("x-tokens", HeaderValue::from_static("1"));

    let simple = bench.key("simple", |_| {});
    let rich = bench.key("rich", |_| {});
    let disabled = bench.key("simple", |r| r.enabled = false);
    let expired = bench.key("simple", |r| {
        r.expires_at = Some(ts("2026-01-01T00:00:00Z"))
    });
    let orphan = bench.key("simple", |r| r.tier = "gone".into());
    let tight = bench.key("tight", |_| {});
    let drained = bench.key("tight", |_| {});
    let poor = bench.key("poor", |_| {});
    // The tight key's one request an hour, spent just before the cases run;
    // the drained key's one pool unit, spent two hours before (so its rate
    // limit has room again).
    bench
        .decide(1, &costs_of(0, 0), &tight, ts(START))
        .expect("allowed");
    bench
        .decide(1, &costs_of(0, 1), &drained, ts("2026-03-10T10:00:00Z"))
        .expect("allowed");
    let made_up = {
        let mut k = keys::generate("sk_bench").secret;
        k.pop();
        k.push(if k.ends_with('1') { '2' } else { '1' });
        k
    };
    let unknown = keys::generate("sk_bench").secret;
    let meter = {
        let mut h = HeaderMap::new();
        h.insert("x-usage-tokens", HeaderValue::from_static("250"));
        h
    };

    let expect_ok = |r: Result<gate::Admission, Rejection>| {
        black_box(r.expect("allowed"));
    };
    let expect = |code: &'static str| {
        move |r: Result<gate::Admission, Rejection>| {
            let e = r.expect_err("refused");
            assert_eq!(e.code(), code);
        }
    };
    vec![
        (
            "allowed: credits + 1 rate limit",
            Box::new({
                let (none, simple) = (none.clone(), simple.clone());
                move |now| expect_ok(bench.decide(0, &none, &simple, now))
            }),
        ),
        (
            "allowed: header costs + 2 limits + 2 pools + meter",
            Box::new({
                let (rich, costs, meter) = (rich.clone(), costs.clone(), meter.clone());
                move |now| {
                    let config = bench.gateway.config.load();
                    expect_ok(bench.decide(1, &costs, &rich, now));
                    let key = ready(bench.gateway.authenticate(&rich)).expect("known");
                    let units =
                        gate::parse_amount(meter["x-usage-tokens"].as_bytes()).expect("units");
                    ready(bench.gateway.store.charge(&key, |record, usage| {
                        gate::meter(config.tier(&record.tier), usage, "tokens", units, now)
                    }))
                    .expect("store")
                    .expect("live");
                }
            }),
        ),
        (
            "INVALID_KEY: bad checksum",
            Box::new({
                let (made_up, none) = (made_up.clone(), none.clone());
                move |now| expect("INVALID_KEY")(bench.decide(0, &none, &made_up, now))
            }),
        ),
        (
            "INVALID_KEY: unknown (store read)",
            Box::new({
                let none = none.clone();
                move |now| expect("INVALID_KEY")(bench.decide(0, &none, &unknown, now))
            }),
        ),
        (
            "DISABLED",
            Box::new({
                let none = none.clone();
                move |now| expect("DISABLED")(bench.decide(0, &none, &disabled, now))
            }),
        ),
        (
            "EXPIRED",
            Box::new({
                let none = none.clone();
                move |now| expect("EXPIRED")(bench.decide(0, &none, &expired, now))
            }),
        ),
        (
            "TIER_NOT_FOUND",
            Box::new({
                let none = none.clone();
                move |now| expect("TIER_NOT_FOUND")(bench.decide(0, &none, &orphan, now))
            }),
        ),
        (
            "FEATURE_NOT_AVAILABLE",
            Box::new({
                let (none, simple) = (none.clone(), simple.clone());
                move |now| expect("FEATURE_NOT_AVAILABLE")(bench.decide(2, &none, &simple, now))
            }),
        ),
        (
            "BAD_REQUEST: cost header",
            Box::new({
                let simple = simple.clone();
                move |now| expect("BAD_REQUEST")(bench.decide(1, &bad, &simple, now))
            }),
        ),
        (
            "RATE_LIMITED",
            Box::new({
                let (none, tight) = (none.clone(), tight.clone());
                move |now| expect("RATE_LIMITED")(bench.decide(0, &none, &tight, now))
            }),
        ),
        (
            "QUOTA_EXCEEDED",
            Box::new({
                let h = costs_of(0, 5);
                move |now| expect("QUOTA_EXCEEDED")(bench.decide(1, &h, &drained, now))
            }),
        ),
        (
            "USAGE_EXCEEDED",
            Box::new(move |now| expect("USAGE_EXCEEDED")(bench.decide(0, &none, &poor, now))),
        ),
    ]
}

fn costs_of(cost: u64, tokens: u64) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("x-cost", HeaderValue::from(cost));
    h.insert("x-tokens", HeaderValue::from(tokens));
    h
}

/// Times `n` single decisions and returns (median, p99) in nanoseconds.
fn percentiles(n: usize, f: &dyn Fn(Timestamp)) -> (u128, u128) {
    let step = SignedDuration::from_micros(50);
    let mut now = ts(START);
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        now = now.checked_add(step).expect("time");
        let t = Instant::now();
        f(now);
        samples.push(t.elapsed().as_nanos());
    }
    samples.sort_unstable();
    (samples[n / 2], samples[n * 99 / 100])
}

fn bench(c: &mut Criterion) {
    let key = keys::generate("sk_bench");
    c.bench_function("key check: checksum + sha256", |b| {
        b.iter(|| {
            assert!(keys::well_formed(black_box(&key.secret)));
            KeyHash::of(black_box(&key.secret))
        })
    });
    c.bench_function("path normalise: already canonical", |b| {
        b.iter(|| normalise(black_box("/api/v1/users/abc/42/orders"), false))
    });
    c.bench_function("path normalise: dot segments and escapes", |b| {
        b.iter(|| normalise(black_box("/api/v1/users/%61bc/../42/orders"), false))
    });

    let bench = Bench::new();
    let all = cases(&bench);
    let step = SignedDuration::from_micros(50);
    for (name, f) in &all {
        let mut now = ts(START);
        c.bench_function(&format!("decision, {name}"), |b| {
            b.iter(|| {
                now = now.checked_add(step).expect("time");
                f(now)
            })
        });
    }

    let many: usize = std::env::var("TOLLGATE_BENCH_KEYS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1_000_000);
    let big = Bench::new();
    big.many("simple", many);
    let big_cases = cases(&big);
    let (_, allowed) = &big_cases[0];
    let mut now = ts(START);
    c.bench_function(&format!("decision, allowed, {many} keys in memory"), |b| {
        b.iter(|| {
            now = now.checked_add(step).expect("time");
            allowed(now)
        })
    });

    println!("\nmedian and p99 of 200,000 individually timed decisions (ns):");
    for (name, f) in all.iter().chain(std::iter::once(&big_cases[0])) {
        let label = if std::ptr::eq(f, allowed) {
            format!("allowed, {many} keys in memory")
        } else {
            name.to_string()
        };
        let (median, p99) = percentiles(200_000, f.as_ref());
        println!("  {label:<52} median {median:>6}   p99 {p99:>6}");
    }
}

/// CPU time of this whole process (every thread: the store's writer too),
/// or with `RUSAGE_THREAD` of the calling thread alone.
fn cpu(who: libc::c_int) -> std::time::Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(who, &mut usage);
        usage
    };
    let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    std::time::Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
}

/// The write-behind as `benches/compare.sh`'s 10,000-key case makes it
/// (20,000 requests a second spread over 10,000 keys; `WB_KEYS` sets
/// another count, a quarter of them charged a pass): each 200 ms pass,
/// 2,500 keys picked at random charged once on the route that spends
/// credits, a rate limit and a rolling pool, then the pass that writes
/// them; every 25 passes (the flusher's 5 s) a fold of the usage log into
/// the keys' rows starts beside the passes, as the flusher runs it.
/// Prints the CPU a key written costs the process (the flusher, the
/// writer thread and the folds: everything but the charging), per 5 s of
/// simulated traffic once the minute window has filled its buckets; and
/// the longest a pass took, wall time, while a fold was under way (a
/// charge's way to disk), beside the longest fold.
fn write_behind() {
    let keys: usize = match std::env::var("WB_KEYS") {
        Ok(v) => match v.parse() {
            Ok(n) if n >= 4 => n,
            _ => panic!("WB_KEYS is {v:?}: give a whole number of keys, at least 4"),
        },
        Err(_) => 10_000,
    };
    let per_pass = keys / 4;
    const PASSES: usize = 500;
    const GROUP: usize = 25;
    let bench = Bench::new();
    let hashes = bench.many("spread", keys);
    let store = &bench.gateway.store;
    let config = bench.gateway.config.load();
    let demand = Demand::for_route(&config.routes[3], &HeaderMap::new());
    let step = SignedDuration::from_micros(200_000 / per_pass as i64);
    let mut rng = rand::rng();
    let mut now = ts(START);
    let mut samples = Vec::new();
    let (mut spent, mut written) = (std::time::Duration::ZERO, 0);
    let (mut longest_pass, mut longest_fold) =
        (std::time::Duration::ZERO, std::time::Duration::ZERO);
    std::thread::scope(|scope| {
        let mut folding: Option<std::thread::ScopedJoinHandle<'_, std::time::Duration>> = None;
        for pass in 1..=PASSES {
            let (process, charging) = (cpu(libc::RUSAGE_SELF), cpu(libc::RUSAGE_THREAD));
            for i in rand::seq::index::sample(&mut rng, keys, per_pass) {
                now = now.checked_add(step).expect("time");
                let key = ready(store.find(&hashes[i])).expect("read").expect("known");
                ready(store.charge(&key, |record, usage| {
                    admit(&config, record, usage, &demand, now)
                }))
                .expect("store")
                .expect("live")
                .expect("allowed");
            }
            let charging = cpu(libc::RUSAGE_THREAD) - charging;
            let during_fold = folding.as_ref().is_some_and(|fold| !fold.is_finished());
            let started = std::time::Instant::now();
            written += bench.rt.block_on(store.flush_dirty()).expect("flush");
            if during_fold {
                longest_pass = longest_pass.max(started.elapsed());
            }
            if pass % GROUP == 0 {
                if let Some(fold) = folding.take() {
                    longest_fold = longest_fold.max(fold.join().expect("fold thread"));
                }
                let rt = &bench.rt;
                folding = Some(scope.spawn(move || {
                    let started = std::time::Instant::now();
                    rt.block_on(store.fold()).expect("fold");
                    started.elapsed()
                }));
            }
            spent += cpu(libc::RUSAGE_SELF) - process - charging;
            if pass % GROUP == 0 {
                if pass > 300 {
                    samples.push(spent.as_nanos() / written as u128);
                }
                (spent, written) = (std::time::Duration::ZERO, 0);
            }
        }
        if let Some(fold) = folding.take() {
            longest_fold = longest_fold.max(fold.join().expect("fold thread"));
        }
    });
    samples.sort_unstable();
    println!(
        "\nwrite-behind, {per_pass} of {keys} keys charged a pass: CPU per key written \
         (flusher + writer, folds included), median of {} groups of {GROUP} passes: \
         {:.2} µs (min {:.2}, max {:.2}); longest pass while a fold was under way \
         {:.0} ms (wall), longest fold {:.0} ms",
        samples.len(),
        samples[samples.len() / 2] as f64 / 1000.0,
        samples[0] as f64 / 1000.0,
        samples[samples.len() - 1] as f64 / 1000.0,
        longest_pass.as_secs_f64() * 1000.0,
        longest_fold.as_secs_f64() * 1000.0,
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(std::time::Duration::from_secs(1)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}

/// `cargo bench --bench gate` runs everything; `-- write-behind` only
/// the write-behind.
fn main() {
    if std::env::args().skip(1).all(|a| a != "write-behind") {
        benches();
        Criterion::default().configure_from_args().final_summary();
    }
    write_behind();
}
