//! The store under concurrency and faults, on the real binary: 32-way admin
//! writes beside keyed traffic, a crash loop of `kill -9`s, a full disk on
//! a real (tmpfs) filesystem, and the migration from a sled store.
//!
//! A [`Workload`] keeps a model of everything the gateway acknowledged;
//! after each restart [`Workload::verify`] holds the store to it: every
//! acknowledged key, grant, plan change and revocation is there, and the
//! charges lost are only those of the last write-behind bound.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rand::Rng;
use serde_json::{json, Value};

use crate::common::{config_text, dead_address, metric, on_redis, Binary, Upstream, ROOT_KEY};

const PLANS: &str = r#"
tiers:
  bulk: { credits: 1000000000, features: [api] }
  gold: { credits: 1000, features: [api] }
  silver: { credits: 500, features: [api] }
routes:
  - { name: api, path: /api/*, upstream: main, feature: api }
  - { name: health, path: /health, upstream: main, auth: none }
"#;

/// The bulk key's credits: only keyed traffic charges it.
const BULK: u64 = 1_000_000_000;
/// The grant key's starting credits (a `gold` key).
const GOLD: u64 = 1000;
/// What the README and SPEC §7 promise: a `kill -9` loses at most the
/// charges of the last second.
const WRITE_BEHIND_BOUND: Duration = Duration::from_secs(1);
/// Keyed requests in flight at once.
const LOAD_WORKERS: usize = 4;
/// No admin call or request may take longer: longer is a hang.
const HANG: Duration = Duration::from_secs(10);

/// A gateway's config file and store, kept across restarts.
struct Site {
    dir: tempfile::TempDir,
    config: PathBuf,
    _upstream: Upstream,
}

impl Site {
    async fn new(store: Option<&Path>) -> Site {
        let upstream = Upstream::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store.map_or_else(|| dir.path().join("store"), Path::to_path_buf);
        let config = dir.path().join("tollgate.yaml");
        std::fs::write(
            &config,
            config_text(upstream.addr, dead_address(), &store, PLANS),
        )
        .expect("write config");
        Site {
            dir,
            config,
            _upstream: upstream,
        }
    }

    async fn serve(&self) -> Binary {
        let env = [("TOLLGATE_TEST_ROOT_KEY", std::ffi::OsStr::new(ROOT_KEY))];
        Binary::serve(&self.config, &env).await
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(HANG)
        .build()
        .expect("client")
}

/// An admin call; `None` when the connection failed (the gateway was
/// killed), and a panic if it hung.
async fn admin_call(
    client: &reqwest::Client,
    admin: &str,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> Option<(u16, Value)> {
    let mut req = client
        .request(method, format!("http://{admin}{path}"))
        .bearer_auth(ROOT_KEY);
    if let Some(body) = body {
        req = req.json(&body);
    }
    match req.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let body = resp.json().await.unwrap_or(Value::Null);
            Some((status, body))
        }
        Err(e) if e.is_timeout() => panic!("admin call {path} hung for {HANG:?}"),
        Err(_) => None,
    }
}

/// One key an admin worker owns, with what it last heard of its tier.
#[derive(Clone)]
struct Owned {
    id: String,
    secret: String,
    tier: &'static str,
    /// A plan change sent but not answered when the gateway died.
    tier_in_flight: Option<&'static str>,
}

/// Everything acknowledged so far.
#[derive(Default)]
struct Model {
    /// Keys created and not revoked, per admin worker.
    owned: Vec<Vec<Owned>>,
    /// Revocations answered 204: (id, secret).
    revoked: Vec<(String, String)>,
    /// Revocations sent but not answered.
    revoking: Vec<(String, String)>,
}

struct Workload {
    bulk: String,
    grant_id: String,
    grant_key: String,
    /// Grants of 1 answered 200 / sent, on the grant key.
    grants_acked: AtomicU64,
    grants_sent: AtomicU64,
    model: Mutex<Model>,
    /// The bulk key's credits used as of the last verification.
    bulk_used: AtomicU64,
    /// When each bulk request answered 200, this round.
    oks: Mutex<Vec<Instant>>,
    /// Answers that are neither 200 nor a fail-closed 503, or errors
    /// before the gateway was killed.
    failures: Mutex<Vec<String>>,
    admin_workers: usize,
}

impl Workload {
    async fn new(gateway: &Binary, admin_workers: usize) -> Arc<Workload> {
        let bulk = gateway.create_key(json!({ "tier": "bulk" })).await;
        let grant = gateway.create_key(json!({ "tier": "gold" })).await;
        Arc::new(Workload {
            bulk: bulk["key"].as_str().expect("key").to_string(),
            grant_id: grant["key_id"].as_str().expect("id").to_string(),
            grant_key: grant["key"].as_str().expect("key").to_string(),
            grants_acked: AtomicU64::new(0),
            grants_sent: AtomicU64::new(0),
            model: Mutex::new(Model {
                owned: vec![Vec::new(); admin_workers],
                ..Model::default()
            }),
            bulk_used: AtomicU64::new(0),
            oks: Mutex::new(Vec::new()),
            failures: Mutex::new(Vec::new()),
            admin_workers,
        })
    }

    /// Runs keyed traffic on the bulk key and the admin workers against
    /// `gateway` until `stop` is set.
    fn start(
        self: &Arc<Self>,
        gateway: &Binary,
        stop: &Arc<AtomicBool>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        for _ in 0..LOAD_WORKERS {
            let (w, stop, proxy) = (self.clone(), stop.clone(), gateway.proxy.clone());
            tasks.push(tokio::spawn(async move { w.keyed(&proxy, &stop).await }));
        }
        for worker in 0..self.admin_workers {
            let (w, stop, admin) = (self.clone(), stop.clone(), gateway.admin.clone());
            tasks.push(tokio::spawn(
                async move { w.admin(worker, &admin, &stop).await },
            ));
        }
        tasks
    }

    async fn keyed(&self, proxy: &str, stop: &AtomicBool) {
        let client = client();
        while !stop.load(Ordering::Acquire) {
            let sent = client
                .get(format!("http://{proxy}/api/work"))
                .bearer_auth(&self.bulk)
                .send()
                .await;
            match sent.map(|r| r.status().as_u16()) {
                Ok(200) => self.oks.lock().push(Instant::now()),
                Ok(503) => {}
                Ok(other) => self.failures.lock().push(format!("keyed request: {other}")),
                Err(e) if stop.load(Ordering::Acquire) => drop(e),
                Err(e) => {
                    assert!(!e.is_timeout(), "a keyed request hung for {HANG:?}");
                    // Killed under us: the round is ending.
                    return;
                }
            }
        }
    }

    /// Cycles create → grant → plan change → revoke, one call at a time.
    async fn admin(&self, worker: usize, admin: &str, stop: &AtomicBool) {
        use reqwest::Method;
        let client = client();
        let mut step = 0usize;
        while !stop.load(Ordering::Acquire) {
            step += 1;
            let answered = match step % 4 {
                0 => {
                    let body = json!({ "tier": "gold", "meta": { "worker": worker } });
                    let Some((status, body)) =
                        admin_call(&client, admin, Method::POST, "/v1/keys", Some(body)).await
                    else {
                        return;
                    };
                    if status == 201 {
                        self.model.lock().owned[worker].push(Owned {
                            id: body["key_id"].as_str().expect("id").to_string(),
                            secret: body["key"].as_str().expect("key").to_string(),
                            tier: "gold",
                            tier_in_flight: None,
                        });
                    }
                    status
                }
                1 => {
                    let path = format!("/v1/keys/{}/credits", self.grant_id);
                    let body = json!({ "op": "add", "amount": 1 });
                    self.grants_sent.fetch_add(1, Ordering::AcqRel);
                    let Some((status, _)) =
                        admin_call(&client, admin, Method::POST, &path, Some(body)).await
                    else {
                        return;
                    };
                    if status == 200 {
                        self.grants_acked.fetch_add(1, Ordering::AcqRel);
                    }
                    status
                }
                2 => {
                    let Some(key) = self.model.lock().owned[worker].last().cloned() else {
                        continue;
                    };
                    let to = if key.tier == "gold" { "silver" } else { "gold" };
                    self.set_in_flight(worker, &key.id, Some(to));
                    let path = format!("/v1/keys/{}", key.id);
                    let body = json!({ "tier": to, "credit_policy": "keep" });
                    let Some((status, _)) =
                        admin_call(&client, admin, Method::PATCH, &path, Some(body)).await
                    else {
                        return;
                    };
                    let mut model = self.model.lock();
                    if let Some(k) = model.owned[worker].iter_mut().find(|k| k.id == key.id) {
                        k.tier_in_flight = None;
                        if status == 200 {
                            k.tier = to;
                        }
                    }
                    status
                }
                _ => {
                    let victim = {
                        let mut model = self.model.lock();
                        let owned = &mut model.owned[worker];
                        if owned.len() < 2 {
                            continue;
                        }
                        let k = owned.remove(0);
                        model.revoking.push((k.id.clone(), k.secret.clone()));
                        k
                    };
                    let path = format!("/v1/keys/{}", victim.id);
                    let Some((status, _)) =
                        admin_call(&client, admin, Method::DELETE, &path, None).await
                    else {
                        return;
                    };
                    let mut model = self.model.lock();
                    model.revoking.retain(|(id, _)| *id != victim.id);
                    if status == 204 {
                        model.revoked.push((victim.id, victim.secret));
                    } else {
                        model.owned[worker].insert(0, victim);
                    }
                    status
                }
            };
            if !matches!(answered, 200 | 201 | 204 | 503) {
                self.failures
                    .lock()
                    .push(format!("admin step {}: {answered}", step % 4));
            }
        }
    }

    fn set_in_flight(&self, worker: usize, id: &str, to: Option<&'static str>) {
        if let Some(k) = self.model.lock().owned[worker]
            .iter_mut()
            .find(|k| k.id == id)
        {
            k.tier_in_flight = to;
        }
    }

    /// Holds a restarted gateway to the model. `killed_at` is when the last
    /// process was killed (`None`: it stopped gracefully, so nothing may
    /// be lost). Then takes what it found as the next round's baseline.
    async fn verify(&self, gateway: &Binary, killed_at: Option<Instant>) {
        use reqwest::Method;
        let failures = std::mem::take(&mut *self.failures.lock());
        assert!(failures.is_empty(), "unexpected answers: {failures:?}");
        let client = client();
        let admin = &gateway.admin;

        // Charges: at most the last bound lost, none invented, none negative.
        let oks = std::mem::take(&mut *self.oks.lock());
        let usage = gateway.usage(&self.bulk).await;
        let credits = &usage["usage"]["credits"];
        let used = credits["used"].as_u64().expect("used");
        let remaining = credits["remaining"].as_u64().expect("remaining");
        assert_eq!(used + remaining, BULK, "credits balance: {credits}");
        let base = self.bulk_used.load(Ordering::Acquire);
        let answered = oks.len() as u64;
        let must_have = match killed_at {
            Some(at) => oks
                .iter()
                .filter(|t| **t + WRITE_BEHIND_BOUND <= at)
                .count() as u64,
            None => answered,
        };
        assert!(
            used >= base + must_have,
            "charges lost beyond the write-behind bound: {used} used, expected at least {base} + {must_have} (of {answered} answered)"
        );
        let may_have = match killed_at {
            Some(_) => answered + LOAD_WORKERS as u64,
            None => answered,
        };
        assert!(
            used <= base + may_have,
            "more charged than served: {used} used, at most {base} + {may_have}"
        );
        self.bulk_used.store(used, Ordering::Release);

        // Grants: every acknowledged one, and at most those sent.
        let (status, record) = admin_call(
            &client,
            admin,
            Method::GET,
            &format!("/v1/keys/{}", self.grant_id),
            None,
        )
        .await
        .expect("admin answers");
        assert_eq!(status, 200);
        let granted = record["credits"]["remaining"].as_u64().expect("remaining") - GOLD;
        let (acked, sent) = (
            self.grants_acked.load(Ordering::Acquire),
            self.grants_sent.load(Ordering::Acquire),
        );
        assert!(
            (acked..=sent).contains(&granted),
            "grant key: {granted} granted, {acked} acknowledged, {sent} sent"
        );
        self.grants_acked.store(granted, Ordering::Release);
        self.grants_sent.store(granted, Ordering::Release);
        let grant_usage = gateway.usage(&self.grant_key).await;
        assert_eq!(grant_usage["usage"]["credits"]["remaining"], GOLD + granted);

        // Keys, plan changes, revocations.
        let (owned, revoked, revoking) = {
            let mut model = self.model.lock();
            let revoking = std::mem::take(&mut model.revoking);
            (model.owned.clone(), model.revoked.clone(), revoking)
        };
        for (worker, keys) in owned.iter().enumerate() {
            for key in keys {
                let (status, record) = admin_call(
                    &client,
                    admin,
                    Method::GET,
                    &format!("/v1/keys/{}", key.id),
                    None,
                )
                .await
                .expect("admin answers");
                assert_eq!(status, 200, "acknowledged key {} is gone", key.id);
                let tier = record["tier"].as_str().expect("tier");
                let allowed = [Some(key.tier), key.tier_in_flight];
                assert!(
                    allowed.contains(&Some(tier)),
                    "key {}: tier {tier}, acknowledged {}",
                    key.id,
                    key.tier
                );
                let tier = if tier == "gold" { "gold" } else { "silver" };
                self.set_in_flight(worker, &key.id, None);
                if let Some(k) = self.model.lock().owned[worker]
                    .iter_mut()
                    .find(|k| k.id == key.id)
                {
                    k.tier = tier;
                }
            }
        }
        for (id, secret) in &revoked {
            let (status, _) =
                admin_call(&client, admin, Method::GET, &format!("/v1/keys/{id}"), None)
                    .await
                    .expect("admin answers");
            assert_eq!(status, 404, "revoked key {id} came back");
            let resp = client
                .get(format!("http://{}/api/work", gateway.proxy))
                .bearer_auth(secret)
                .send()
                .await
                .expect("proxy answers");
            assert_eq!(resp.status(), 401, "revoked key {id} works again");
        }
        // A revocation cut off by the kill happened or not: make sure it
        // has, so the model is exact again.
        for (id, secret) in revoking {
            let path = format!("/v1/keys/{id}");
            let (status, _) = admin_call(&client, admin, Method::DELETE, &path, None)
                .await
                .expect("admin answers");
            assert!(matches!(status, 204 | 404), "revoke {id}: {status}");
            self.model.lock().revoked.push((id, secret));
        }
    }
}

/// Runs the workload on `gateway` for `run`, then kills it with `kill -9`
/// while everything is still going. Returns when it was killed.
async fn run_then_kill(workload: &Arc<Workload>, gateway: Binary, run: Duration) -> Instant {
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = workload.start(&gateway, &stop);
    tokio::time::sleep(run).await;
    let killed_at = Instant::now();
    gateway.kill_9();
    stop.store(true, Ordering::Release);
    for task in tasks {
        task.await.expect("workload task");
    }
    killed_at
}

fn secs_from_env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// 32 admin writers (creates, grants, plan changes, revocations) beside
/// keyed traffic: nothing hangs, and what was acknowledged survives
/// `kill -9`; then the same again ending with SIGTERM, which exits 0 and
/// loses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_admin_writers_beside_keyed_traffic_neither_hang_nor_lose() {
    let site = Site::new(None).await;
    let gateway = site.serve().await;
    let workload = Workload::new(&gateway, 32).await;
    let run = Duration::from_secs(secs_from_env("TOLLGATE_STRESS_SECS", 3));

    // While 32 writers run, the gateway answers everything else too.
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = workload.start(&gateway, &stop);
    tokio::time::sleep(run).await;
    let client = client();
    let health = client
        .get(format!("http://{}/healthz", gateway.admin))
        .send()
        .await
        .expect("/healthz answers under load");
    assert_eq!(health.status(), 200);
    let killed_at = Instant::now();
    gateway.kill_9();
    stop.store(true, Ordering::Release);
    for task in tasks {
        task.await.expect("workload task");
    }
    let gateway = site.serve().await;
    workload.verify(&gateway, Some(killed_at)).await;
    let created = workload
        .model
        .lock()
        .owned
        .iter()
        .map(Vec::len)
        .sum::<usize>();
    assert!(created >= 32, "the writers did little: {created} keys");

    // Again, ending with SIGTERM: exit 0, nothing lost at all.
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = workload.start(&gateway, &stop);
    tokio::time::sleep(run).await;
    stop.store(true, Ordering::Release);
    for task in tasks {
        task.await.expect("workload task");
    }
    gateway.signal("TERM");
    let status = gateway.exit_status().await;
    assert!(status.success(), "SIGTERM after the load: {status:?}");
    let gateway = site.serve().await;
    workload.verify(&gateway, None).await;
}

/// `kill -9` at random moments, 20 times (`TOLLGATE_CRASH_ROUNDS` for
/// more), under keyed load and admin writes: the store opens every time,
/// nothing acknowledged is lost, charges lost stay within the bound, no
/// counter goes negative.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_loop_of_kill_9_loses_nothing_acknowledged() {
    let rounds = secs_from_env("TOLLGATE_CRASH_ROUNDS", 20);
    let site = Site::new(None).await;
    let mut gateway = site.serve().await;
    let workload = Workload::new(&gateway, 2).await;
    for _ in 0..rounds {
        let run = Duration::from_millis(rand::rng().random_range(100..900));
        let killed_at = run_then_kill(&workload, gateway, run).await;
        gateway = site.serve().await;
        workload.verify(&gateway, Some(killed_at)).await;
    }
    let served = workload.bulk_used.load(Ordering::Acquire);
    assert!(served > 0, "the crash loop charged nothing");
}

/// Mounts a tmpfs of `size` at `at`; unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).expect("mount point");
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status();
        match status {
            Ok(s) if s.success() => Some(Tmpfs(at.to_path_buf())),
            _ => None,
        }
    }

    fn resize(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .expect("mount");
        assert!(ok.success(), "remount {size}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// Writes `path` until the filesystem is full.
fn fill(path: &Path) {
    use std::io::Write as _;
    let mut file = std::fs::File::create(path).expect("filler");
    let chunk = vec![0xA5u8; 64 * 1024];
    while file.write_all(&chunk).is_ok() {}
    let _ = file.sync_all();
}

/// A store on a small real filesystem, filled two ways (by another file,
/// then by key creation): from the first failed write every charging
/// request answers 503 while public routes serve, admin writes answer at
/// once, the gateway recovers by itself once there is room, and every
/// request that got 200 is in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_disk_fails_charges_closed_and_recovers_by_itself() {
    if on_redis() {
        return; // the embedded store's disk; Redis faults are tests/gateway/shared.rs
    }
    let mnt = tempfile::tempdir().expect("tempdir");
    let Some(tmpfs) = Tmpfs::mount(mnt.path(), "16m") else {
        if std::env::var_os("TOLLGATE_SKIP_MOUNT_TESTS").is_some() {
            eprintln!("\n*** SKIPPED: cannot mount a tmpfs here (needs root); the full-disk test did not run ***\n");
            return;
        }
        panic!(
            "this test mounts a 16 MiB tmpfs to fill a real filesystem and needs root \
             (CAP_SYS_ADMIN); set TOLLGATE_SKIP_MOUNT_TESTS=1 to skip it knowingly"
        );
    };
    let site = Site::new(Some(&mnt.path().join("store"))).await;
    let gateway = site.serve().await;
    let workload = Workload::new(&gateway, 0).await;
    let stop = Arc::new(AtomicBool::new(false));
    let tasks = workload.start(&gateway, &stop);
    let client = client();
    let keyed = || async {
        let status = client
            .get(format!("http://{}/api/work", gateway.proxy))
            .bearer_auth(&workload.bulk)
            .send()
            .await
            .expect("proxy answers")
            .status()
            .as_u16();
        if status == 200 {
            workload.oks.lock().push(Instant::now());
        }
        status
    };
    let scrape = || async {
        let text = client
            .get(format!("http://{}/metrics", gateway.metrics))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        metric(&text, "tollgate_store_healthy", &[])
    };

    // 1. Another file fills the disk.
    let filler = mnt.path().join("filler");
    fill(&filler);
    wait_for("keyed requests to fail closed", || async {
        keyed().await == 503
    })
    .await;
    assert_eq!(scrape().await, 0.0, "store_healthy while the disk is full");
    let public = client
        .get(format!("http://{}/health", gateway.proxy))
        .send()
        .await
        .expect("public route answers");
    assert_eq!(public.status(), 200, "public routes keep serving");
    let create = admin_call(
        &client,
        &gateway.admin,
        reqwest::Method::POST,
        "/v1/keys",
        Some(json!({ "tier": "gold" })),
    )
    .await
    .expect("admin answers");
    assert_eq!(create.0, 503, "a create on a full disk: {create:?}");
    assert_eq!(create.1["code"], "STORE_UNAVAILABLE");
    std::fs::remove_file(&filler).expect("free the space");
    wait_for("charges to resume by themselves", || async {
        keyed().await == 200
    })
    .await;
    assert_eq!(scrape().await, 1.0);

    // 2. Key creation fills the disk: from the first refused create on,
    // charges fail closed.
    let meta: serde_json::Map<String, Value> = (0..200)
        .map(|i| (format!("field{i}"), json!("x".repeat(200))))
        .collect();
    let mut created = 0;
    loop {
        let (status, body) = admin_call(
            &client,
            &gateway.admin,
            reqwest::Method::POST,
            "/v1/keys",
            Some(json!({ "tier": "gold", "meta": meta })),
        )
        .await
        .expect("admin answers");
        if status == 503 {
            assert_eq!(body["code"], "STORE_UNAVAILABLE");
            break;
        }
        assert_eq!(status, 201);
        created += 1;
        assert!(created < 10_000, "16 MiB never filled up");
    }
    for _ in 0..20 {
        assert_eq!(keyed().await, 503, "a charge after the first failed write");
    }
    tmpfs.resize("64m");
    wait_for("charges to resume after the disk grew", || async {
        keyed().await == 200
    })
    .await;

    // Every 200 is in the store once it is flushed: stop, restart, count.
    stop.store(true, Ordering::Release);
    for task in tasks {
        task.await.expect("workload task");
    }
    let served = workload.oks.lock().len() as u64;
    gateway.signal("TERM");
    assert!(gateway.exit_status().await.success());
    let gateway = site.serve().await;
    let usage = gateway.usage(&workload.bulk).await;
    assert_eq!(usage["usage"]["credits"]["used"], served);
    drop(gateway);
}

/// Polls `check` every 20 ms for at most 10 s.
async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..500 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// A store written by an earlier tollgate (sled) is refused with the
/// command that migrates it; `tollgate migrate` copies every key, its
/// hash, record and usage, and running it twice changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_store_migrates_in_one_command() {
    if on_redis() {
        return; // an embedded store's migration
    }
    let site = Site::new(None).await;
    let store = site.dir.path().join("store");
    let (secret, key_id) = sled_store_with_one_key(&store);

    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["serve", "--config"])
        .arg(&site.config)
        .output()
        .expect("run serve");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("tollgate migrate --from"), "{stderr}");

    for _ in 0..2 {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["migrate", "--from"])
            .arg(&store)
            .output()
            .expect("run migrate");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("copied 1 keys"), "{stdout}");
    }

    let gateway = site.serve().await;
    let usage = gateway.usage(&secret).await;
    assert_eq!(usage["key_id"], key_id.as_str());
    assert_eq!(usage["usage"]["credits"]["used"], 7);
    assert_eq!(usage["usage"]["credits"]["remaining"], 993);
    let (status, list) = admin_call(
        &client(),
        &gateway.admin,
        reqwest::Method::GET,
        "/v1/keys?external_id=cus_42",
        None,
    )
    .await
    .expect("admin answers");
    assert_eq!(status, 200);
    assert_eq!(list["keys"][0]["key_id"], key_id.as_str());
}

/// Writes a sled store the way tollgate 0.1 did, with one gold key that
/// has used 7 credits. Returns its secret and id.
fn sled_store_with_one_key(dir: &Path) -> (String, String) {
    use tollgate::keys;
    use tollgate::ledger::{KeyRecord, Usage};
    let key = keys::generate("sk_gold");
    let now = jiff::Timestamp::now();
    let record = KeyRecord {
        external_id: Some("cus_42".into()),
        ..KeyRecord::new(keys::generate_id(), &key.hash, &key.start, "gold", now)
    };
    let usage = Usage {
        remaining: Some(993),
        used: 7,
        ..Usage::default()
    };
    let db = sled::open(dir).expect("sled");
    let id = record.key_id.as_bytes();
    let tree = |name: &str| db.open_tree(name).expect("tree");
    tree("records")
        .insert(id, serde_json::to_vec(&record).expect("json"))
        .expect("insert");
    tree("hashes").insert(key.hash.0, id).expect("insert");
    tree("usage")
        .insert(id, serde_json::to_vec(&usage).expect("json"))
        .expect("insert");
    let mut external = b"cus_42\0".to_vec();
    external.extend_from_slice(id);
    tree("external").insert(external, &[]).expect("insert");
    db.flush().expect("flush");
    (key.secret, record.key_id.to_string())
}
