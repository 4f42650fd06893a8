//! The integration harness: a real upstream HTTP server, the real gateway
//! in-process with a temporary sled store and a hand-moved clock, all on
//! 127.0.0.1 port 0. Each test reads like a sentence: start, send, assert.

use std::sync::Arc;

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use futures::StreamExt;
use jiff::Timestamp;
use parking_lot::Mutex;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;

use tollgate::clock::{Clock, ManualClock};
use tollgate::config::Config;
use tollgate::server::{self, Options, Running};

pub const ROOT_KEY: &str = "test-root-key-0123456789";

/// When every test's clock starts: a Tuesday afternoon, mid-month.
pub const START: &str = "2026-03-10T12:00:00Z";

/// A test gateway's worker threads, unless a test asks for one.
const THREADS: usize = 2;

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub target: String,
}

#[derive(Default)]
struct UpstreamState {
    seen: Mutex<Vec<Seen>>,
    /// Lets a streaming response send its second half.
    release: Notify,
}

/// A real HTTP server standing in for the API being sold.
///
/// It answers every request with JSON describing what it received (method,
/// target, headers, body length and SHA-256), and obeys test controls sent
/// as request headers:
/// - `x-test-status: 503`: answer with that status;
/// - `x-test-usage-tokens: N`: add `x-usage-tokens: N` to the answer;
/// - `x-test-delay-ms: N`: answer only after N ms (a slow upstream);
/// - `x-test-stream: 1`: answer with server-sent events, the second only
///   after the test calls [`Upstream::release`].
pub struct Upstream {
    pub addr: std::net::SocketAddr,
    state: Arc<UpstreamState>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let state = Arc::new(UpstreamState::default());
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Upstream { addr, state }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().clone()
    }

    pub fn release(&self) {
        self.state.release.notify_one();
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn answer(State(state): State<Arc<UpstreamState>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let target = parts
        .uri
        .path_and_query()
        .map_or("/".to_string(), |p| p.as_str().to_string());
    state.seen.lock().push(Seen {
        target: target.clone(),
    });
    if let Some(ms) = header(&parts.headers, "x-test-delay-ms").and_then(|v| v.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if header(&parts.headers, "x-test-stream").is_some() {
        let state = state.clone();
        let events = futures::stream::unfold(0, move |step| {
            let state = state.clone();
            async move {
                match step {
                    0 => Some((Ok::<_, std::io::Error>("data: one\n\n".to_string()), 1)),
                    1 => {
                        state.release.notified().await;
                        Some((Ok("data: two\n\n".to_string()), 2))
                    }
                    _ => None,
                }
            }
        });
        return Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(events))
            .expect("stream response");
    }
    // Read the body as it streams in, never holding it whole.
    let mut stream = body.into_data_stream();
    let mut hasher = Sha256::new();
    let mut len = 0usize;
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else { break };
        len += chunk.len();
        hasher.update(&chunk);
    }
    let headers: serde_json::Map<String, Value> = parts
        .headers
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v.to_str().unwrap_or("<binary>"))))
        .collect();
    let status = header(&parts.headers, "x-test-status")
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let mut resp = Response::builder()
        .status(status)
        .header("content-type", "application/json");
    if let Some(tokens) = header(&parts.headers, "x-test-usage-tokens") {
        resp = resp.header("x-usage-tokens", tokens);
    }
    let body = json!({
        "method": parts.method.to_string(),
        "target": target,
        "headers": headers,
        "body_len": len,
        "body_sha256": format!("{:x}", hasher.finalize()),
    });
    resp.body(Body::from(body.to_string())).expect("response")
}

/// The webhook secret tests configure (`secret_env: TOLLGATE_TEST_WEBHOOK_SECRET`).
pub const WEBHOOK_SECRET: &str = "whsec_dGVzdC13ZWJob29rLXNlY3JldC0xMjM0NQ==";

/// Sets the webhook secret's env var (the same value in every test, so
/// tests running at once agree).
pub fn set_webhook_secret() {
    std::env::set_var("TOLLGATE_TEST_WEBHOOK_SECRET", WEBHOOK_SECRET);
}

/// One POST the receiver got.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub headers: HeaderMap,
    pub body: bytes::Bytes,
    /// What the receiver answered.
    pub status: u16,
}

impl Delivery {
    pub fn events(&self) -> Vec<Value> {
        let v: Value = serde_json::from_slice(&self.body).expect("a JSON body");
        v["events"].as_array().cloned().unwrap_or_default()
    }
}

#[derive(Default)]
struct ReceiverState {
    deliveries: Mutex<Vec<Delivery>>,
    /// The status to answer (200 when 0).
    status: std::sync::atomic::AtomicU16,
    /// Answer only after 15 s (past tollgate's 10 s timeout).
    hang: std::sync::atomic::AtomicBool,
    /// Deliveries that began hanging.
    hung: std::sync::atomic::AtomicUsize,
}

/// A real webhook receiver: records every delivery, answers as told.
pub struct Receiver {
    pub addr: std::net::SocketAddr,
    state: Arc<ReceiverState>,
}

impl Receiver {
    pub async fn start() -> Receiver {
        let state = Arc::new(ReceiverState::default());
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let addr = listener.local_addr().expect("receiver addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}/billing", self.addr)
    }

    /// Answers every delivery with `status` from now on.
    pub fn answer(&self, status: u16) {
        self.state
            .status
            .store(status, std::sync::atomic::Ordering::Release);
    }

    /// Lets deliveries hang past the gateway's timeout (or not).
    pub fn hang(&self, hang: bool) {
        self.state
            .hang
            .store(hang, std::sync::atomic::Ordering::Release);
    }

    /// How many deliveries began hanging ([`Receiver::hang`]).
    pub fn hung(&self) -> usize {
        self.state.hung.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.state.deliveries.lock().clone()
    }

    /// Every event in a delivery the receiver accepted (2xx), once per id.
    pub fn events(&self) -> Vec<Value> {
        let mut seen = std::collections::HashSet::new();
        self.deliveries()
            .iter()
            .filter(|d| (200..300).contains(&d.status))
            .flat_map(Delivery::events)
            .filter(|e| seen.insert(e["id"].as_str().unwrap_or_default().to_string()))
            .collect()
    }

    /// The events of `kind` for `key_id`, once per id.
    pub fn events_of(&self, kind: &str, key_id: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["type"] == kind && e["key_id"] == key_id)
            .collect()
    }
}

async fn receive(State(state): State<Arc<ReceiverState>>, req: Request) -> StatusCode {
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 16 * 1024 * 1024).await else {
        return StatusCode::BAD_REQUEST;
    };
    if state.hang.load(std::sync::atomic::Ordering::Acquire) {
        state.hung.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        tokio::time::sleep(Duration::from_secs(15)).await;
    }
    let status = match state.status.load(std::sync::atomic::Ordering::Acquire) {
        0 => StatusCode::OK,
        n => StatusCode::from_u16(n).unwrap_or(StatusCode::OK),
    };
    state.deliveries.lock().push(Delivery {
        headers: parts.headers,
        body,
        status: status.as_u16(),
    });
    status
}

/// A real `redis-server` on a free loopback port, in a temporary
/// directory, with its append-only file on (fsynced on every write), so a
/// restart finds what it acknowledged. It dies when dropped, or with the
/// thread that started it.
pub struct RedisServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
    /// More `redis-server` arguments.
    args: Vec<String>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// [`RedisServer::start`] with more `redis-server` arguments.
    pub fn start_with(args: &[&str]) -> RedisServer {
        let port = dead_address().port();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut server = RedisServer {
            port,
            dir,
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        server.restart();
        server
    }

    /// What `redis-cli` prints for `args` on database 0.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("redis-cli (apt-get install redis-tools)");
        assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `redis://` for database `db` (the harness gives each gateway its own).
    pub fn url(&self, db: u32) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    /// Starts (again) on the same port and directory: the data comes back
    /// from the append-only file.
    pub fn restart(&mut self) {
        use std::os::unix::process::CommandExt;
        assert!(self.child.is_none(), "redis-server runs already");
        let mut command = std::process::Command::new("redis-server");
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .args(["--databases", "10000", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"))
            .args(&self.args)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to
        // kill this child when the test process ends.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = command
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        self.child = Some(child);
        for _ in 0..500 {
            if redis_ping(self.port) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not start on port {}", self.port);
    }

    /// Stops it at once (`kill -9`: what it acknowledged is in its AOF).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn redis_ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut conn) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 16];
    conn.write_all(b"PING\r\n").is_ok()
        && conn
            .read(&mut buf)
            .is_ok_and(|n| buf[..n].starts_with(b"+PONG"))
}

/// The shared store for every gateway this test process starts, when
/// in `gateway_on_redis`: one server, a database each.
/// The same store path gets the same database, so a gateway started again
/// on its store (a restart, an upgrade) finds its keys.
fn shared_redis(store: &std::path::Path) -> Option<String> {
    static PORT: std::sync::OnceLock<u16> = std::sync::OnceLock::new();
    static DBS: std::sync::Mutex<Vec<std::path::PathBuf>> = std::sync::Mutex::new(Vec::new());
    if !on_redis() {
        return None;
    }
    // The server dies with the thread that started it (PDEATHSIG), and a
    // test's thread ends with the test: start it on a thread of its own
    // that lives as long as the process.
    let port = *PORT.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let server = RedisServer::start();
            let _ = tx.send(server.port);
            loop {
                std::thread::park();
            }
        });
        rx.recv().expect("the shared redis-server started")
    });
    let mut dbs = DBS.lock().unwrap_or_else(|e| e.into_inner());
    let db = match dbs.iter().position(|p| p == store) {
        Some(i) => i + 1,
        None => {
            dbs.push(store.to_path_buf());
            dbs.len()
        }
    };
    Some(format!("redis://127.0.0.1:{port}/{db}"))
}

/// Whether this test binary puts the gateways on Redis (`gateway_on_redis`):
/// tests of the embedded store's own machinery skip then.
pub fn on_redis() -> bool {
    crate::ON_REDIS
}

/// A gateway in front of an [`Upstream`].
pub struct Harness {
    pub gateway: Running,
    pub upstream: Arc<Upstream>,
    pub clock: Arc<ManualClock>,
    pub client: reqwest::Client,
    _dir: tempfile::TempDir,
    base: String,
    admin: String,
}

/// The config around a test's tiers and routes: loopback listeners on port 0,
/// a temporary store, and three upstreams: the test upstream, one that
/// refuses connections, and the test upstream with a short read timeout.
pub fn config_text(
    upstream: std::net::SocketAddr,
    dead: std::net::SocketAddr,
    store: &std::path::Path,
    body: &str,
) -> String {
    format!(
        r#"
listen:
  proxy: "127.0.0.1:0"
  admin: "127.0.0.1:0"
  metrics: "127.0.0.1:0"
store:
  path: "{store}"{redis}
admin:
  root_key_env: TOLLGATE_TEST_ROOT_KEY
upstreams:
  main: {{ url: "http://{upstream}" }}
  dead: {{ url: "http://{dead}", connect_timeout: 2s }}
  slow: {{ url: "http://{upstream}", read_timeout: 1s }}
{body}
"#,
        store = store.display(),
        redis = shared_redis(store)
            .map(|url| format!("\n  redis: {{ url: \"{url}\" }}"))
            .unwrap_or_default(),
    )
}

/// An address nothing listens on.
pub fn dead_address() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr")
}

impl Harness {
    /// Starts an upstream and a gateway whose config holds `body` (tiers and
    /// routes) around the standard listeners and upstreams.
    pub async fn start(body: &str) -> Harness {
        Harness::start_with(body, false).await
    }

    /// Like [`Harness::start`], with the config in a file the gateway
    /// watches ([`Harness::config_file`]).
    pub async fn start_watching(body: &str) -> Harness {
        Harness::start_with(body, true).await
    }

    /// Like [`Harness::start`], with the upstream named `dead` at `second`
    /// (a server of the test's own) instead of an address nobody serves.
    pub async fn start_beside(body: &str, second: std::net::SocketAddr) -> Harness {
        Harness::start_custom(body, second, "", false, THREADS).await
    }

    /// Like [`Harness::start_beside`], with one worker thread: every
    /// request runs on it (for what is kept per thread).
    pub async fn start_beside_on_one_thread(body: &str, second: std::net::SocketAddr) -> Harness {
        Harness::start_custom(body, second, "", false, 1).await
    }

    /// Like [`Harness::start`], with `listen_extra` (YAML lines indented
    /// for the `listen` section, such as `proxy_tls`) added to `listen`.
    pub async fn start_listening(body: &str, listen_extra: &str) -> Harness {
        Harness::start_custom(body, dead_address(), listen_extra, false, THREADS).await
    }

    async fn start_with(body: &str, watch: bool) -> Harness {
        Harness::start_custom(body, dead_address(), "", watch, THREADS).await
    }

    async fn start_custom(
        body: &str,
        second: std::net::SocketAddr,
        listen_extra: &str,
        watch: bool,
        threads: usize,
    ) -> Harness {
        let upstream = Arc::new(Upstream::start().await);
        let dir = tempfile::tempdir().expect("tempdir");
        let text = config_text(upstream.addr, second, &dir.path().join("store"), body).replacen(
            "  metrics: \"127.0.0.1:0\"\n",
            &format!("  metrics: \"127.0.0.1:0\"\n{listen_extra}"),
            1,
        );
        let start = START.parse().expect("start time");
        Harness::launch(upstream, dir, &text, watch, start, true, threads).await
    }

    /// A gateway with one worker thread on the whole config `text`
    /// (`{store}` in it becomes a store path of its own).
    pub async fn start_text_on_one_thread(text: &str) -> Harness {
        let upstream = Arc::new(Upstream::start().await);
        let start = START.parse().expect("start time");
        Harness::launch_text(upstream, text, start, true, 1).await
    }

    /// One of several gateways in front of `upstream`, on the config
    /// `text` (`{store}` in it becomes a store path of its own), its own
    /// clock starting at `clock`. With `align`, the time it counts with is
    /// set to `clock` (see [`Harness::set_time`]); without, a gateway on
    /// Redis counts on Redis's clock whatever its own says.
    pub async fn node(upstream: Arc<Upstream>, text: &str, clock: Timestamp, align: bool) -> Harness {
        Harness::launch_text(upstream, text, clock, align, THREADS).await
    }

    /// [`Harness::launch`] on `text` with `{store}` in it made a store
    /// path of its own.
    async fn launch_text(
        upstream: Arc<Upstream>,
        text: &str,
        clock: Timestamp,
        align: bool,
        threads: usize,
    ) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = text.replace("{store}", &dir.path().join("store").display().to_string());
        Harness::launch(upstream, dir, &text, false, clock, align, threads).await
    }

    /// Starts a gateway on `text`, its clock at `start`.
    async fn launch(
        upstream: Arc<Upstream>,
        dir: tempfile::TempDir,
        text: &str,
        watch: bool,
        start: Timestamp,
        align: bool,
        threads: usize,
    ) -> Harness {
        let config = Config::parse(text)
            .unwrap_or_else(|e| panic!("test config is invalid: {e}"))
            .config;
        let config_path = watch.then(|| {
            let path = dir.path().join("tollgate.yaml");
            std::fs::write(&path, text).expect("write config");
            path
        });
        let clock = ManualClock::new(start);
        let options = Options {
            clock: clock.clone(),
            root_key: Some(ROOT_KEY.to_string()),
            threads,
            config_path,
            handle_signals: false,
            drain_timeout: Duration::from_secs(1),
            // Many gateways start in this one process (see the option).
            work_stealing: true,
            upgrade: false,
        };
        let gateway = tokio::task::spawn_blocking(move || server::start(config, options))
            .await
            .expect("start task")
            .expect("gateway starts");
        let base = format!("http://{}", gateway.proxy_addr);
        let admin = format!("http://{}", gateway.admin_addr);
        let harness = Harness {
            gateway,
            upstream,
            clock,
            client: reqwest::Client::new(),
            _dir: dir,
            base,
            admin,
        };
        if align {
            harness.set_time_to(start);
        }
        harness
    }

    /// Where [`Harness::start_watching`] keeps the config.
    pub fn config_file(&self) -> std::path::PathBuf {
        self._dir.path().join("tollgate.yaml")
    }

    /// The config text for `body` around this harness's upstream and store.
    pub fn config_text(&self, body: &str) -> String {
        config_text(
            self.upstream.addr,
            dead_address(),
            &self._dir.path().join("store"),
            body,
        )
    }

    /// The gateway's metrics, scraped over HTTP.
    pub async fn scrape(&self) -> String {
        let url = format!("http://{}/metrics", self.gateway.metrics_addr);
        let resp = self.client.get(url).send().await.expect("metrics answer");
        assert_eq!(resp.status(), 200);
        resp.text().await.expect("metrics text")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("{}{path}", self.admin)
    }

    /// A request to the proxy with `key` as a bearer token.
    pub fn keyed(&self, method: reqwest::Method, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.client.request(method, self.url(path)).bearer_auth(key)
    }

    pub async fn get(&self, path: &str, key: &str) -> reqwest::Response {
        self.keyed(reqwest::Method::GET, path, key)
            .send()
            .await
            .expect("proxy answers")
    }

    /// `POST path` with `key` and no body.
    pub async fn post(&self, path: &str, key: &str) -> reqwest::Response {
        self.keyed(reqwest::Method::POST, path, key)
            .send()
            .await
            .expect("proxy answers")
    }

    /// A request to the admin API with the root key.
    pub fn admin(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.admin_url(path))
            .bearer_auth(ROOT_KEY)
    }

    /// Creates a key with these fields; returns the whole answer.
    pub async fn create_key_with(&self, fields: Value) -> Value {
        let resp = self
            .admin(reqwest::Method::POST, "/v1/keys")
            .json(&fields)
            .send()
            .await
            .expect("admin answers");
        assert_eq!(resp.status(), 201, "create key {fields}");
        resp.json().await.expect("json")
    }

    /// Creates a key on `tier`; returns (secret, key id).
    pub async fn create_key(&self, tier: &str) -> (String, String) {
        let created = self.create_key_with(json!({ "tier": tier })).await;
        (
            created["key"].as_str().expect("key").to_string(),
            created["key_id"].as_str().expect("key id").to_string(),
        )
    }

    pub async fn usage(&self, key: &str) -> Value {
        let resp = self.get("/_tollgate/usage", key).await;
        assert_eq!(resp.status(), 200);
        resp.json().await.expect("usage json")
    }

    pub fn advance(&self, by: Duration) {
        self.clock.advance(by);
    }

    /// Steps the wall clock alone, as NTP would: window time stays.
    pub fn step_wall(&self, by: jiff::SignedDuration) {
        self.clock.step(by);
    }

    /// Sets the gateway's time. On Redis the gateway adds the offset it
    /// measured to Redis's clock to its own: that is kept, so the time the
    /// gateway counts with is `at`.
    pub fn set_time(&self, at: &str) {
        self.set_time_to(at.parse::<Timestamp>().expect("time"));
    }

    fn set_time_to(&self, at: Timestamp) {
        let offset = self.gateway.gateway.clock.now().duration_since(self.clock.now());
        self.clock.set(at.checked_sub(offset).expect("a time in range"));
    }

    /// The time the gateway counts with.
    pub fn now(&self) -> Timestamp {
        self.gateway.gateway.clock.now()
    }

    /// Sends raw bytes to the proxy (no client-side path cleaning) and
    /// returns the status and body.
    pub async fn raw(&self, request: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(self.gateway.proxy_addr)
            .await
            .expect("connect");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.expect("read");
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_string();
        (status, body)
    }

    /// `GET target` with `key`, sent raw.
    pub async fn raw_get(&self, target: &str, key: &str) -> (u16, String) {
        self.raw(&format!(
            "GET {target} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
        ))
        .await
    }
}

/// Reads HTTP/1.1 answers from `stream` until `n` are complete (each with
/// a Content-Length) or the peer closes; returns (status, body) each.
pub async fn read_answers<S: tokio::io::AsyncRead + Unpin>(
    stream: &mut S,
    n: usize,
) -> Vec<(u16, String)> {
    let mut buf = Vec::new();
    let mut answers = Vec::new();
    let mut chunk = [0u8; 8192];
    while answers.len() < n {
        // Parse whatever is complete.
        loop {
            let text = String::from_utf8_lossy(&buf).into_owned();
            let Some((head, rest)) = text.split_once("\r\n\r\n") else { break };
            let len: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse().ok())?
                })
                .expect("content-length");
            if rest.len() < len {
                break;
            }
            let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            answers.push((status, rest[..len].to_string()));
            let used = head.len() + 4 + len;
            buf.drain(..used);
        }
        if answers.len() >= n {
            break;
        }
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut chunk))
            .await
            .expect("an answer within 10 s")
            .expect("read");
        if read == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..read]);
    }
    answers
}

/// The JSON body of a response, after checking its status.
pub async fn json_of(resp: reqwest::Response, status: u16) -> Value {
    let got = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    assert_eq!(got, status, "unexpected status; body: {text}");
    serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
}

/// A client whose every call gives up after 30 s, so a gateway that hangs
/// fails a test instead of stalling it.
pub fn bounded_client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// The real `tollgate` binary, killed when dropped.
pub struct Binary {
    pub child: std::process::Child,
    pub proxy: String,
    pub admin: String,
    pub metrics: String,
    /// Every line it has logged so far (JSON).
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Binary {
    /// Creates a key through this process's admin API; the whole answer.
    pub async fn create_key(&self, fields: Value) -> Value {
        bounded_client()
            .post(format!("http://{}/v1/keys", self.admin))
            .bearer_auth(ROOT_KEY)
            .json(&fields)
            .send()
            .await
            .expect("create")
            .json()
            .await
            .expect("json")
    }

    /// Sends a signal (`"TERM"`, `"KILL"`, ...) with kill(1).
    pub fn signal(&self, name: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(ok.success(), "kill -{name}");
    }

    /// Waits (at most 30 s) for the process to exit by itself.
    pub async fn exit_status(mut self) -> std::process::ExitStatus {
        tokio::time::timeout(
            Duration::from_secs(30),
            tokio::task::spawn_blocking(move || self.child.wait()),
        )
        .await
        .expect("the gateway exited within 30 s")
        .expect("join")
        .expect("wait")
    }

    /// `kill -9`, and waits until it is gone.
    pub fn kill_9(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }

    /// The usage endpoint's answer for `key`.
    pub async fn usage(&self, key: &str) -> Value {
        bounded_client()
            .get(format!("http://{}/_tollgate/usage", self.proxy))
            .bearer_auth(key)
            .send()
            .await
            .expect("usage")
            .json()
            .await
            .expect("json")
    }

    /// How many lines the binary has logged so far that contain `text`.
    pub fn lines_with(&self, text: &str) -> usize {
        self.logs.lock().iter().filter(|l| l.contains(text)).count()
    }

    /// The real binary in front of a test upstream, on the config around
    /// `body` (see [`config_text`]) in a file, with `env`.
    pub async fn start(
        body: &str,
        env: &[(&str, &std::ffi::OsStr)],
    ) -> (Binary, Upstream, tempfile::TempDir) {
        let upstream = Upstream::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let text = config_text(upstream.addr, dead_address(), &dir.path().join("store"), body);
        let config = dir.path().join("tollgate.yaml");
        std::fs::write(&config, text).expect("write config");
        (Binary::serve(&config, env).await, upstream, dir)
    }

    /// Runs `tollgate serve --config <config>` with `env`, and waits until it
    /// logs the addresses it serves on.
    pub async fn serve(config: &std::path::Path, env: &[(&str, &std::ffi::OsStr)]) -> Binary {
        Binary::serve_with(config, env, &[]).await
    }

    /// [`Binary::serve`] with more `serve` arguments.
    pub async fn serve_with(
        config: &std::path::Path,
        env: &[(&str, &std::ffi::OsStr)],
        args: &[&str],
    ) -> Binary {
        use std::io::BufRead;
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"));
        command
            .args([
                "--log-format",
                "json",
                "serve",
                "--threads",
                "1",
                "--config",
            ])
            .arg(config)
            .args(args)
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null());
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.spawn().expect("spawn tollgate");
        let stderr = child.stderr.take().expect("stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        let found = tokio::task::spawn_blocking(move || {
            let mut lines = std::io::BufReader::new(stderr).lines();
            for line in lines.by_ref() {
                let line = line.expect("log line");
                sink.lock().push(line.clone());
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    let fields = &v["fields"];
                    if let (Some(p), Some(a), Some(m)) = (
                        fields["proxy"].as_str(),
                        fields["admin"].as_str(),
                        fields["metrics"].as_str(),
                    ) {
                        let found = (p.to_string(), a.to_string(), m.to_string());
                        // Keep reading so the child never blocks on a full pipe.
                        std::thread::spawn(move || {
                            for line in lines.map_while(Result::ok) {
                                sink.lock().push(line);
                            }
                        });
                        return Some(found);
                    }
                }
            }
            None
        })
        .await
        .expect("log reader");
        let Some((proxy, admin, metrics)) = found else {
            let status = child.wait().expect("wait");
            panic!("tollgate exited before serving: {status}");
        };
        Binary {
            child,
            proxy,
            admin,
            metrics,
            logs,
        }
    }
}

/// The value of one metric series in Prometheus text, e.g.
/// `metric(&text, "tollgate_requests_total", &[("code", "OK")])`: the sum
/// over every series of that name whose labels include all of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, rest) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if series_name != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.split(',').any(|pair| pair == format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// Waits until `check` holds, polling every 10 ms for at most 10 s: for
/// things that happen on another thread (a file watcher's reload), never
/// for time itself.
pub async fn eventually(what: &str, check: impl FnMut() -> bool) {
    eventually_within(what, Duration::from_secs(10), check).await
}

/// [`eventually`] with its own bound, for a thing another process does on
/// its own (real) clock, such as a reporter's backoff after failures.
pub async fn eventually_within(what: &str, bound: Duration, mut check: impl FnMut() -> bool) {
    let polls = bound.as_millis() / 10;
    for _ in 0..polls {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}
