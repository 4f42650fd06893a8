//! The shared backend (SPEC §8): every key, record, counter and outbox
//! event lives in Redis (or Valkey); a node holds only caches.
//!
//! # Layout
//!
//! A key's data sits in one hash, under a hash tag shared with the outbox
//! streams of its bucket (one of [`BUCKETS`], from the key id), so every
//! atomic step touches one Redis Cluster slot:
//!
//! - `tg:{b<n>}:key:<key_id>`: `rec` (the record, JSON), `use` (usage,
//!   JSON), `bil` (billing state, JSON), `ver` (bumped by every change),
//!   `hash` (the key's SHA-256, hex);
//! - `tg:{b<n>}:outbox:<sink>`: the bucket's events for a sink (a stream,
//!   consumer group `reporters`);
//! - `tg:hash:<sha256 hex>` → key id; `tg:ids` and `tg:ext:<external id>`:
//!   key ids in id order (sorted sets), for listing;
//! - `tg:{b<n>}:charged`: ids of the bucket's keys charged since they were
//!   last reported;
//! - `tg:parked:<sink>`: events a sink refused for good;
//! - channel `tg:changes`: the id of every key an admin write changed.
//!
//! # Exactness
//!
//! A node decides on its cached copy of a key's record and usage, then
//! writes the new usage with one script that checks `ver` is still the one
//! it decided on (compare-and-set). If another node changed the key
//! meanwhile, the script answers the current state instead and the node
//! decides again on it: the pure closure of [`crate::store::Store::charge`]
//! re-runs. So every allowed request's charge is checked against the state
//! of the moment, across nodes: with N credits left exactly N of any burst
//! succeed, one round trip per request when the node's copy is current.
//! Requests on one key within one node wait for each other (a per-key
//! async lock), so they do not conflict among themselves.
//!
//! A decision that changes nothing (most rejections) is not written; it is
//! checked instead: the node reads `ver` and decides again if the key
//! changed (another node refunded, released a pool slot). Admin writes are
//! also announced: [`CHANNEL`] messages mark a changed key stale on every
//! node at once, and a node that loses the channel drops every copy (see
//! [`watch`]), so a revoked or disabled key is refused everywhere at once.
//!
//! Every charge also marks the key in its bucket's `charged` set, so any
//! node's reporting pass (not only the charging node's, which may die)
//! turns its units into events.
//!
//! # Faults
//!
//! A command that fails or takes longer than [`TIMEOUT`] marks the store
//! unhealthy; a probe every [`PROBE_EVERY`] marks it healthy again once
//! Redis answers. Nothing is written partially: the scripts are atomic.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, RedisFuture, Script, Value};

use super::sqlite::{Batch, OutboxStats, Outgoing, Row};
use super::{MakeEvents, StoreError};
use crate::config::RedisConfig;
use crate::keys::KeyHash;
use crate::ledger::{Billing, KeyRecord, Usage};

/// Buckets keys (and their outbox streams) are spread over.
pub const BUCKETS: u32 = 64;
/// The channel admin writes announce changed keys on.
pub const CHANNEL: &str = "tg:changes";
/// The outbox streams' consumer group.
const GROUP: &str = "reporters";
/// Longest wait for one Redis command.
pub const TIMEOUT: Duration = Duration::from_secs(1);
/// How often an unhealthy store checks whether Redis answers again.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);
/// How often a compare-and-set is retried before giving up (contention).
const MAX_ATTEMPTS: usize = 64;

/// The bucket of a key id: FNV-1a, stable across versions and platforms.
fn bucket(key_id: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key_id.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % BUCKETS
}

fn data_key(key_id: &str) -> String {
    format!("tg:{{b{}}}:key:{key_id}", bucket(key_id))
}

fn outbox_key(bucket: u32, sink: &str) -> String {
    format!("tg:{{b{bucket}}}:outbox:{sink}")
}

fn hash_key(hash: &KeyHash) -> String {
    format!("tg:hash:{}", hash.to_hex())
}

fn ext_key(external_id: &str) -> String {
    format!("tg:ext:{external_id}")
}

/// The keys of a bucket charged since they were last reported.
fn charged_key(bucket: u32) -> String {
    format!("tg:{{b{bucket}}}:charged")
}

fn parked_key(sink: &str) -> String {
    format!("tg:parked:{sink}")
}

const IDS: &str = "tg:ids";

/// A script that runs `$body` only if the key's `ver` (KEYS[1], ARGV[1])
/// is still the one the node decided on, then sets it to ARGV[2], a
/// version no other write can make ([`Redis::next_version`]). Answers
/// `{1}`, `{0, ver, rec, use, bil}` (changed meanwhile: the current state,
/// to decide again on), or `{-1}` (revoked). The body's own arguments
/// start at ARGV[3].
macro_rules! compare_and_set {
    ($body:literal) => {
        concat!(
            "local ver = redis.call('HGET', KEYS[1], 'ver')\n",
            "if not ver then return {-1} end\n",
            "if ver ~= ARGV[1] then\n",
            "  local v = redis.call('HMGET', KEYS[1], 'ver', 'rec', 'use', 'bil')\n",
            "  return {0, v[1], v[2], v[3], v[4]}\n",
            "end\n",
            $body,
            "redis.call('HSET', KEYS[1], 'ver', ARGV[2])\n",
            "return {1}\n",
        )
    };
}

/// Writes a key's usage and billing if `ver` is still the one given, and
/// marks the key for the next reporting pass of any node (KEYS[2], the
/// bucket's set of charged keys; ARGV[5], the key id).
static CAS_USAGE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(compare_and_set!(
        r"
redis.call('HSET', KEYS[1], 'use', ARGV[3], 'bil', ARGV[4])
redis.call('SADD', KEYS[2], ARGV[5])
"
    ))
});

/// Unmarks a key that has nothing left to report, if nothing charged it
/// since (`ver` still the one given). KEYS: the key's hash, the bucket's
/// set of charged keys; ARGV: ver, key id.
static REPORTED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local ver = redis.call('HGET', KEYS[1], 'ver')
if (not ver) or ver == ARGV[1] then redis.call('SREM', KEYS[2], ARGV[2]) end
return 1
",
    )
});

/// [`CAS_USAGE`] for an admin write: the record too.
static CAS_ALL: LazyLock<Script> = LazyLock::new(|| {
    Script::new(compare_and_set!(
        r"
redis.call('HSET', KEYS[1], 'rec', ARGV[3], 'use', ARGV[4], 'bil', ARGV[5])
"
    ))
});

/// A reporting step: writes the billing state and appends its events to
/// the bucket's outbox streams in one atomic step, if `ver` still holds.
/// KEYS: the key's hash, then one stream per event; ARGV: ver, new ver,
/// billing, then (id, event, created ms) per event.
static REPORT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(compare_and_set!(
        r"
redis.call('HSET', KEYS[1], 'bil', ARGV[3])
for i = 2, #KEYS do
  local a = 4 + (i - 2) * 3
  redis.call('XADD', KEYS[i], '*', 'id', ARGV[a], 'event', ARGV[a + 1], 'at', ARGV[a + 2])
end
"
    ))
});

/// Copies an event in (`tollgate migrate`), once per id: KEYS: the stream,
/// the set of ids copied into it; ARGV: id, event, created ms.
static IMPORT_EVENT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('SADD', KEYS[2], ARGV[1]) == 0 then return 0 end
redis.call('XADD', KEYS[1], '*', 'id', ARGV[1], 'event', ARGV[2], 'at', ARGV[3])
return 1
",
    )
});

/// Creates a key's hash if it does not exist. Answers 1, or 0 if it did.
static CREATE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'rec', ARGV[1], 'use', ARGV[2], 'bil', ARGV[3], 'hash', ARGV[4], 'ver', 1)
return 1
",
    )
});

/// One connection, to one Redis or to a cluster.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// What a node knows of a key.
#[derive(Clone)]
struct Cached {
    record: KeyRecord,
    usage: Usage,
    /// The version this copy is of (or will be, once the writes this node
    /// has sent apply).
    ver: String,
}

/// One key as this node holds it.
pub struct Entry {
    key_id: String,
    hash: KeyHash,
    state: tokio::sync::Mutex<Cached>,
    /// Changed elsewhere: read it again before using it.
    stale: AtomicBool,
    gone: AtomicBool,
}

/// The shared store.
pub struct Redis {
    /// Runs every Redis command and the connection's own tasks, so they
    /// never depend on a runtime of Pingora's (which stop at shutdown).
    rt: Option<tokio::runtime::Runtime>,
    conn: Conn,
    client: Option<redis::Client>,
    healthy: Arc<AtomicBool>,
    cache: RwLock<HashMap<KeyHash, Arc<Entry>, ahash::RandomState>>,
    /// This node's name as an outbox consumer: kept in `store.path`, so a
    /// node started again takes up the events it had taken at once.
    consumer: String,
    /// An event another consumer took this long ago and did not
    /// acknowledge (its node died) is taken over (`store.redis.claim_after`).
    claim_after: Duration,
    /// Stream entries of batches under way: batch id → (stream, entry id).
    batches: Mutex<HashMap<String, Vec<(String, String)>>>,
    /// The batch under way per sink, retried as it is until delivered.
    open: Mutex<HashMap<&'static str, Batch>>,
    /// Stream entries of events sent one by one: event id → (stream, entry id).
    singles: Mutex<HashMap<String, (String, String)>>,
    /// Redis's `TIME` minus the node's clock, in µs, once measured.
    clock_offset: Arc<crate::clock::Offsets>,
    offset_measured: AtomicBool,
    /// The node's own clock, once the gateway hands it over.
    node_clock: std::sync::OnceLock<crate::clock::SharedClock>,
    /// Tells this store's per-thread connections from other stores' (a
    /// test process holds many).
    id: u64,
    /// Bumped on a failed command and when Redis answers again: a thread
    /// whose connection is older makes a new one, so no request after a
    /// Redis restart goes out on a connection to the process that died.
    conn_epoch: std::sync::atomic::AtomicU64,
    /// Versions this process writes: `<prefix>:<n>`.
    version_prefix: String,
    versions: std::sync::atomic::AtomicU64,
    /// Tells the background tasks to end.
    stop: tokio::sync::watch::Sender<bool>,
    /// Held for the store's life: the lock of `store.path`.
    _lock: Option<std::fs::File>,
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn io(e: redis::RedisError) -> StoreError {
    StoreError::Io(format!("redis: {e}"))
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    super::local::to_json(value)
}

fn parse<T: serde::de::DeserializeOwned>(
    key_id: &str,
    what: &str,
    text: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        key_id: key_id.to_string(),
        reason: format!("{what}: {e}"),
    })
}

fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(n) => Some(n.to_string()),
        _ => None,
    }
}

fn int(v: Option<&Value>) -> Option<i64> {
    match v? {
        Value::Int(n) => Some(*n),
        other => text(Some(other))?.parse().ok(),
    }
}

/// A key's state from `ver, rec, use, bil` values.
fn cached_from(key_id: &str, values: &[Value]) -> Result<Cached, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt {
        key_id: key_id.to_string(),
        reason: format!("missing {what}"),
    };
    let ver = text(values.first()).ok_or_else(|| corrupt("ver"))?;
    let record: KeyRecord = parse(
        key_id,
        "record",
        &text(values.get(1)).ok_or_else(|| corrupt("rec"))?,
    )?;
    let mut usage: Usage = parse(
        key_id,
        "usage",
        &text(values.get(2)).ok_or_else(|| corrupt("use"))?,
    )?;
    usage.billing = match text(values.get(3)) {
        Some(b) => parse(key_id, "billing", &b)?,
        None => Billing::default(),
    };
    Ok(Cached { record, usage, ver })
}

/// What a compare-and-set answered.
enum Cas {
    Done,
    /// Boxed: the state is large, and seldom sent back.
    Changed(Box<Cached>),
    Gone,
}

fn cas_reply(key_id: &str, reply: &Value) -> Result<Cas, StoreError> {
    let Value::Array(items) = reply else {
        return Err(StoreError::Io(format!(
            "redis: unexpected script answer {reply:?}"
        )));
    };
    match int(items.first()) {
        Some(1) => Ok(Cas::Done),
        Some(0) => Ok(Cas::Changed(Box::new(cached_from(key_id, &items[1..])?))),
        Some(-1) => Ok(Cas::Gone),
        _ => Err(StoreError::Io(format!(
            "redis: unexpected script answer {reply:?}"
        ))),
    }
}

impl Redis {
    /// Connects (lazily: a Redis that is down at start makes the store
    /// unhealthy, not the start fail) and starts the background tasks:
    /// following [`CHANNEL`], and probing Redis while it does not answer.
    /// Blocks until connected or refused; callable from any thread.
    /// `consumer` names this node's outbox consumer ([`node_name`]).
    pub fn open(
        config: &RedisConfig,
        consumer: String,
        lock: Option<std::fs::File>,
    ) -> Result<Arc<Redis>, StoreError> {
        let claim_after = config.claim_after;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tollgate-redis")
            .enable_all()
            .build()?;
        let (tx, rx) = std::sync::mpsc::channel();
        let config = config.clone();
        rt.spawn(async move {
            let _ = tx.send(connect(&config).await);
        });
        let (conn, client) = rx
            .recv()
            .map_err(|_| StoreError::Io("redis: the connecting task ended".into()))??;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let handle = rt.handle().clone();
        let store = Arc::new(Redis {
            rt: Some(rt),
            conn,
            client,
            healthy: Arc::new(AtomicBool::new(true)),
            cache: RwLock::default(),
            consumer,
            claim_after,
            clock_offset: Arc::default(),
            offset_measured: AtomicBool::new(false),
            node_clock: std::sync::OnceLock::new(),
            id: {
                static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                NEXT.fetch_add(1, Ordering::Relaxed)
            },
            conn_epoch: std::sync::atomic::AtomicU64::new(0),
            version_prefix: crate::keys::random_id("v"),
            versions: std::sync::atomic::AtomicU64::new(1),
            batches: Mutex::default(),
            open: Mutex::default(),
            singles: Mutex::default(),
            stop,
            _lock: lock,
        });
        handle.spawn(probe(Arc::downgrade(&store), stopped.clone()));
        handle.spawn(watch(Arc::downgrade(&store), stopped));
        Ok(store)
    }

    fn conn(&self) -> Conn {
        self.conn.clone()
    }

    /// Runs a command on the store's runtime with the [`TIMEOUT`]; a
    /// failure marks the store unhealthy.
    async fn run<T: redis::FromRedisValue + Send + 'static>(
        &self,
        cmd: &Cmd,
    ) -> Result<T, StoreError> {
        let (mut conn, cmd) = (self.conn(), cmd.clone());
        let result = self
            .on_runtime(async move { cmd.query_async::<T>(&mut conn).await.map_err(io) })
            .await;
        self.note(&result);
        result
    }

    async fn script(
        &self,
        script: &'static LazyLock<Script>,
        keys: &[String],
        args: &[String],
    ) -> Result<Value, StoreError> {
        let result = self.start_script(script, keys, args).await;
        self.note(&result);
        result
    }

    /// Sends a script now; its answer comes with the future.
    fn start_script(
        &self,
        script: &'static LazyLock<Script>,
        keys: &[String],
        args: &[String],
    ) -> impl std::future::Future<Output = Result<Value, StoreError>> {
        self.on_runtime(invoke(self.conn(), script, keys.to_vec(), args.to_vec()))
    }

    /// A script on the caller's own thread and runtime, over that thread's
    /// own connection ([`Redis::local_conn`]), with the [`TIMEOUT`]: the
    /// proxy's hot path, with no hand-off to another thread and back. It is
    /// sent when first polled.
    async fn script_here(
        &self,
        script: &'static LazyLock<Script>,
        keys: Vec<String>,
        args: Vec<String>,
    ) -> Result<Value, StoreError> {
        let work = invoke(self.local_conn(), script, keys, args);
        match tokio::time::timeout(TIMEOUT, work).await {
            Ok(result) => result,
            Err(_) => Err(StoreError::Io("redis: no answer in time".into())),
        }
    }

    /// This thread's own connection to Redis, so a worker's requests do
    /// their I/O on its own thread; the shared connection until that one
    /// is up. It is made on the thread's first request (and again after
    /// Redis failed, or when making it failed) and carries requests once
    /// it has answered a `PING` ([`warm_up`]): a connect may take longer
    /// than a request may wait ([`TIMEOUT`]), and a request that timed out
    /// would mark the whole store unhealthy. A cluster connection is
    /// shared.
    fn local_conn(&self) -> Conn {
        let (Some(client), Conn::Single(_)) = (&self.client, &self.conn) else {
            return self.conn();
        };
        let epoch = self.conn_epoch.load(Ordering::Acquire);
        LOCAL_CONNS.with(|conns| {
            let mut conns = conns.borrow_mut();
            if let Some(at) = conns.iter().position(|own| own.store == self.id) {
                let own = &conns[at];
                if own.epoch == epoch {
                    match own.state.load(Ordering::Acquire) {
                        READY => return Conn::Single(own.conn.clone()),
                        WARMING => return self.conn(),
                        _ => {}
                    }
                }
                conns.swap_remove(at);
            }
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return self.conn();
            };
            let Ok(conn) = client.get_connection_manager_lazy(manager_config()) else {
                return self.conn();
            };
            let state = Arc::new(AtomicU8::new(WARMING));
            runtime.spawn(warm_up(conn.clone(), state.clone()));
            conns.push(OwnConn {
                store: self.id,
                epoch,
                conn,
                state,
            });
            self.conn()
        })
    }
}

/// A thread's own connection to one store ([`Redis::local_conn`]).
struct OwnConn {
    /// The store's [`Redis::id`].
    store: u64,
    /// The [`Redis::conn_epoch`] it was made in.
    epoch: u64,
    conn: ConnectionManager,
    /// [`WARMING`], [`READY`] or [`FAILED`].
    state: Arc<AtomicU8>,
}

const WARMING: u8 = 0;
const READY: u8 = 1;
const FAILED: u8 = 2;

thread_local! {
    static LOCAL_CONNS: std::cell::RefCell<Vec<OwnConn>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Connects `conn` (made lazily) with a `PING`, on the runtime it will
/// serve; marks it ready when answered, failed when not (within its
/// connect and answer timeouts, and at most [`WARM_UP_WITHIN`]). Nothing
/// else is told: the store's health is the shared connection's to say.
async fn warm_up(mut conn: ConnectionManager, state: Arc<AtomicU8>) {
    let ping = redis::cmd("PING");
    let answer = tokio::time::timeout(WARM_UP_WITHIN, ping.query_async::<String>(&mut conn));
    let up = matches!(answer.await, Ok(Ok(_)));
    state.store(if up { READY } else { FAILED }, Ordering::Release);
}

/// The longest a thread's new connection is given to answer its first
/// `PING` ([`warm_up`]).
const WARM_UP_WITHIN: Duration = Duration::from_secs(5);

/// Runs a script (EVALSHA, and the script itself only when Redis lacks it).
async fn invoke(
    mut conn: Conn,
    script: &'static LazyLock<Script>,
    keys: Vec<String>,
    args: Vec<String>,
) -> Result<Value, StoreError> {
    let mut invocation = script.prepare_invoke();
    for k in &keys {
        invocation.key(k);
    }
    for a in &args {
        invocation.arg(a);
    }
    invocation
        .invoke_async::<Value>(&mut conn)
        .await
        .map_err(io)
}

impl Redis {
    /// A version no other write makes: this process's own prefix (random,
    /// so not even this node before a restart) and a counter.
    fn next_version(&self) -> String {
        let n = self.versions.fetch_add(1, Ordering::Relaxed);
        format!("{}:{n}", self.version_prefix)
    }

    /// Runs `work` on the store's runtime, with the [`TIMEOUT`]. The work
    /// is started now (spawned, so sent in the order of the calls); the
    /// answer comes with the future.
    fn on_runtime<T: Send + 'static>(
        &self,
        work: impl std::future::Future<Output = Result<T, StoreError>> + Send + 'static,
    ) -> impl std::future::Future<Output = Result<T, StoreError>> {
        let handle = self
            .rt
            .as_ref()
            .map(|rt| rt.spawn(tokio::time::timeout(TIMEOUT, work)));
        async move {
            match handle {
                None => Err(StoreError::Closed),
                Some(handle) => match handle.await {
                    Ok(Ok(result)) => result,
                    Ok(Err(_)) => Err(StoreError::Io("redis: no answer in time".into())),
                    Err(e) => Err(StoreError::Io(format!("redis: {e}"))),
                },
            }
        }
    }

    fn note<T>(&self, result: &Result<T, StoreError>) {
        // Commands cut off by the store's own shutdown say nothing of Redis.
        let closing = *self.stop.borrow();
        if result.is_err() && !closing {
            self.conn_epoch.fetch_add(1, Ordering::AcqRel);
        }
        if result.is_err() && !closing && self.healthy.swap(false, Ordering::AcqRel) {
            tracing::error!("Redis stopped answering; keyed requests fail until it does");
        }
    }

    /// The clock the gateway runs on: `clock` set to Redis's time. Waits a
    /// moment for the measure; if Redis does not answer yet, the probe
    /// measures once it does (until then the node's own clock counts).
    /// Not callable from the store's own runtime.
    pub fn shared_clock(
        self: &Arc<Self>,
        clock: crate::clock::SharedClock,
    ) -> crate::clock::SharedClock {
        let _ = self.node_clock.set(clock.clone());
        if let Some(rt) = &self.rt {
            let (tx, rx) = std::sync::mpsc::channel();
            let (store, node) = (self.clone(), clock.clone());
            rt.spawn(async move {
                let _ = tx.send(store.measure_clock(&node).await);
            });
            if let Ok(Err(e)) | Err(e) = rx
                .recv_timeout(TIMEOUT * 2)
                .map_err(|e| StoreError::Io(e.to_string()))
            {
                tracing::warn!(error = %e, "cannot read Redis's clock yet; the node's own counts until it can");
            }
        }
        crate::clock::OffsetClock::new(clock, self.clock_offset.clone())
    }

    /// Measures Redis's `TIME` against `clock` (the node's own), once: the
    /// midpoint of the round trip, so the error is at most half of it.
    pub async fn measure_clock(&self, clock: &crate::clock::SharedClock) -> Result<(), StoreError> {
        if self.offset_measured.load(Ordering::Acquire) {
            return Ok(());
        }
        let (before, before_steady) = (clock.now(), clock.steady());
        let started = std::time::Instant::now();
        let (secs, micros): (i64, i64) = self.run(&redis::cmd("TIME")).await?;
        let half = jiff::SignedDuration::try_from(started.elapsed() / 2).unwrap_or_default();
        let redis_us = secs.saturating_mul(1_000_000).saturating_add(micros);
        let offset_from = |local: jiff::Timestamp| {
            let local = local.checked_add(half).unwrap_or(local);
            redis_us.saturating_sub(local.as_microsecond())
        };
        let offset = offset_from(before);
        let offsets = &self.clock_offset;
        offsets.wall_us.store(offset, Ordering::Relaxed);
        offsets
            .steady_us
            .store(offset_from(before_steady), Ordering::Relaxed);
        self.offset_measured.store(true, Ordering::Release);
        tracing::info!(offset_ms = offset / 1000, "counting time on Redis's clock");
        Ok(())
    }

    /// Whether Redis answers now; marks the store healthy if it does.
    pub async fn ping(&self) -> bool {
        let up = self.run::<String>(&redis::cmd("PING")).await.is_ok();
        if up && !self.healthy.swap(true, Ordering::AcqRel) {
            self.conn_epoch.fetch_add(1, Ordering::AcqRel);
            tracing::info!("Redis answers again; charges resume");
        }
        up
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Forgets every cached key (the change channel was lost).
    pub fn forget_all(&self) {
        let mut cache = self.cache.write();
        for entry in cache.values() {
            entry.stale.store(true, Ordering::Release);
        }
        cache.clear();
    }

    /// Marks the key with this id stale, if this node holds it.
    fn changed(&self, key_id: &str) {
        for entry in self.cache.read().values() {
            if entry.key_id == key_id {
                entry.stale.store(true, Ordering::Release);
            }
        }
    }

    async fn load_id(&self, key_id: &str, hash: KeyHash) -> Result<Option<Arc<Entry>>, StoreError> {
        let values: Vec<Value> = self
            .run(
                redis::cmd("HMGET")
                    .arg(data_key(key_id))
                    .arg(&["ver", "rec", "use", "bil"]),
            )
            .await?;
        if values.first().is_none_or(|v| matches!(v, Value::Nil)) {
            return Ok(None);
        }
        let cached = cached_from(key_id, &values)?;
        // What a loaded key keeps in memory comes from a heap of its own
        // (see `alloc::lasting`): copied there, so that what reading it
        // made and let go of leaves no holes among it.
        let entry = crate::alloc::lasting(|| {
            Arc::new(Entry {
                key_id: key_id.to_string(),
                hash,
                state: tokio::sync::Mutex::new(cached.clone()),
                stale: AtomicBool::new(false),
                gone: AtomicBool::new(false),
            })
        });
        let mut cache = self.cache.write();
        Ok(Some(cache.entry(hash).or_insert(entry).clone()))
    }

    pub fn in_memory(&self, hash: &KeyHash) -> Option<Arc<Entry>> {
        let entry = self.cache.read().get(hash).cloned()?;
        (!entry.gone.load(Ordering::Acquire)).then_some(entry)
    }

    pub async fn lookup(&self, hash: &KeyHash) -> Result<Option<Arc<Entry>>, StoreError> {
        if let Some(entry) = self.in_memory(hash) {
            return Ok(Some(entry));
        }
        let Some(key_id): Option<String> = self.run(redis::cmd("GET").arg(hash_key(hash))).await?
        else {
            return Ok(None);
        };
        self.load_id(&key_id, *hash).await
    }

    pub async fn lookup_id(&self, key_id: &str) -> Result<Option<Arc<Entry>>, StoreError> {
        let hex: Option<String> = self
            .run(redis::cmd("HGET").arg(data_key(key_id)).arg("hash"))
            .await?;
        let Some(hash) = hex.as_deref().and_then(KeyHash::from_hex) else {
            return Ok(None);
        };
        if let Some(entry) = self.in_memory(&hash) {
            return Ok(Some(entry));
        }
        self.load_id(key_id, hash).await
    }

    /// Reads the key again if it changed elsewhere. `false` if revoked.
    async fn refresh(&self, entry: &Entry, state: &mut Cached) -> Result<bool, StoreError> {
        if !entry.stale.swap(false, Ordering::AcqRel) {
            return Ok(!entry.gone.load(Ordering::Acquire));
        }
        let values: Vec<Value> = self
            .run(
                redis::cmd("HMGET")
                    .arg(data_key(&entry.key_id))
                    .arg(&["ver", "rec", "use", "bil"]),
            )
            .await?;
        if values.first().is_none_or(|v| matches!(v, Value::Nil)) {
            self.gone(entry);
            return Ok(false);
        }
        *state = cached_from(&entry.key_id, &values)?;
        Ok(true)
    }

    fn gone(&self, entry: &Entry) {
        entry.gone.store(true, Ordering::Release);
        self.cache.write().remove(&entry.hash);
    }

    /// See [`crate::store::Store::charge`].
    pub async fn charge<T>(
        &self,
        entry: &Arc<Entry>,
        f: impl Fn(&KeyRecord, &mut Usage) -> T,
    ) -> Result<Option<T>, StoreError> {
        for _ in 0..MAX_ATTEMPTS {
            let (mut answer, early, out) = {
                let mut state = entry.state.lock().await;
                if !self.refresh(entry, &mut state).await? {
                    return Ok(None);
                }
                let mut usage = state.usage.clone();
                let out = f(&state.record, &mut usage);
                if usage == state.usage {
                    // A decision that writes nothing (a rejection, mostly)
                    // must still rest on the state of the moment: another
                    // node may have refunded or released since this copy
                    // was read, or a write this node sent may have failed.
                    let ver: Option<String> = self
                        .run(redis::cmd("HGET").arg(data_key(&entry.key_id)).arg("ver"))
                        .await?;
                    match ver {
                        None => {
                            self.gone(entry);
                            return Ok(None);
                        }
                        Some(ver) if ver == state.ver => return Ok(Some(out)),
                        Some(_) => {
                            entry.stale.store(true, Ordering::Release);
                            continue;
                        }
                    }
                }
                // Sent now, answered later: the next request on this key
                // decides on this one's outcome without waiting for it.
                // If this write fails, every write decided after it fails
                // too (each names the version the one before it makes),
                // and each decides again on what Redis holds.
                let version = self.next_version();
                let expected = std::mem::replace(&mut state.ver, version.clone());
                let mut answer = Box::pin(self.script_here(
                    &CAS_USAGE,
                    vec![data_key(&entry.key_id), charged_key(bucket(&entry.key_id))],
                    vec![
                        expected,
                        version,
                        to_json(&usage),
                        to_json(&usage.billing),
                        entry.key_id.clone(),
                    ],
                ));
                state.usage = usage;
                // Polled once under the key's lock: that sends it, so the
                // writes on a key leave in the order they were decided.
                let early = futures_util::poll!(answer.as_mut());
                (answer, early, out)
            };
            let reply = match early {
                std::task::Poll::Ready(reply) => reply,
                std::task::Poll::Pending => answer.as_mut().await,
            };
            self.note(&reply);
            let reply = match reply.and_then(|r| cas_reply(&entry.key_id, &r)) {
                Ok(reply) => reply,
                Err(e) => {
                    // Whether it was written is unknown: read it again.
                    entry.stale.store(true, Ordering::Release);
                    return Err(e);
                }
            };
            match reply {
                Cas::Done => return Ok(Some(out)),
                Cas::Changed(_) => entry.stale.store(true, Ordering::Release),
                Cas::Gone => {
                    self.gone(entry);
                    return Ok(None);
                }
            }
        }
        Err(StoreError::Io(
            "redis: the key kept changing under this node".into(),
        ))
    }

    /// See [`crate::store::Store::update`].
    pub async fn update<E: From<StoreError>>(
        &self,
        entry: &Arc<Entry>,
        change: impl Fn(&mut KeyRecord, &mut Usage) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut state = entry.state.lock().await;
        // An admin write works on the state of the moment.
        entry.stale.store(true, Ordering::Release);
        if !self.refresh(entry, &mut state).await? {
            return Err(StoreError::Gone.into());
        }
        for _ in 0..MAX_ATTEMPTS {
            let (mut record, mut usage) = (state.record.clone(), state.usage.clone());
            change(&mut record, &mut usage)?;
            let version = self.next_version();
            let reply = self
                .script(
                    &CAS_ALL,
                    &[data_key(&entry.key_id)],
                    &[
                        state.ver.clone(),
                        version.clone(),
                        to_json(&record),
                        to_json(&usage),
                        to_json(&usage.billing),
                    ],
                )
                .await
                .and_then(|reply| cas_reply(&entry.key_id, &reply))
                .inspect_err(|_| entry.stale.store(true, Ordering::Release))?;
            match reply {
                Cas::Done => {
                    let old_ext = std::mem::replace(&mut state.record, record);
                    state.usage = usage;
                    state.ver = version;
                    self.reindex_external(
                        &entry.key_id,
                        old_ext.external_id.as_deref(),
                        state.record.external_id.as_deref(),
                    )
                    .await?;
                    self.announce(&entry.key_id).await;
                    return Ok(());
                }
                Cas::Changed(now) => *state = *now,
                Cas::Gone => {
                    self.gone(entry);
                    return Err(StoreError::Gone.into());
                }
            }
        }
        Err(StoreError::Io("redis: the key kept changing under this node".into()).into())
    }

    async fn reindex_external(
        &self,
        key_id: &str,
        old: Option<&str>,
        new: Option<&str>,
    ) -> Result<(), StoreError> {
        if old == new {
            return Ok(());
        }
        if let Some(old) = old {
            self.run::<i64>(redis::cmd("ZREM").arg(ext_key(old)).arg(key_id))
                .await?;
        }
        if let Some(new) = new {
            self.run::<i64>(redis::cmd("ZADD").arg(ext_key(new)).arg(0).arg(key_id))
                .await?;
        }
        Ok(())
    }

    /// Tells every node the key changed (best effort: their next
    /// compare-and-set would find out anyway).
    async fn announce(&self, key_id: &str) {
        if let Err(e) = self
            .run::<i64>(redis::cmd("PUBLISH").arg(CHANNEL).arg(key_id))
            .await
        {
            tracing::warn!(error = %e, %key_id, "cannot announce a key change");
        }
    }

    pub async fn create(
        &self,
        hash: KeyHash,
        record: &KeyRecord,
        usage: &Usage,
    ) -> Result<(), StoreError> {
        let created = self
            .script(
                &CREATE,
                &[data_key(&record.key_id)],
                &[
                    to_json(record),
                    to_json(usage),
                    to_json(&usage.billing),
                    hash.to_hex(),
                ],
            )
            .await?;
        if int(Some(&created)) != Some(1) {
            return Err(StoreError::Io(format!(
                "key id {} exists already",
                record.key_id
            )));
        }
        // Indexes after the data: a key is findable only once it is whole.
        self.run::<()>(
            redis::cmd("SET")
                .arg(hash_key(&hash))
                .arg(record.key_id.as_str()),
        )
        .await?;
        self.run::<i64>(
            redis::cmd("ZADD")
                .arg(IDS)
                .arg(0)
                .arg(record.key_id.as_str()),
        )
        .await?;
        if let Some(ext) = &record.external_id {
            self.run::<i64>(
                redis::cmd("ZADD")
                    .arg(ext_key(ext))
                    .arg(0)
                    .arg(record.key_id.as_str()),
            )
            .await?;
        }
        Ok(())
    }

    pub async fn revoke(&self, key_id: &str) -> Result<bool, StoreError> {
        let values: Vec<Option<String>> = self
            .run(
                redis::cmd("HMGET")
                    .arg(data_key(key_id))
                    .arg(&["hash", "rec"]),
            )
            .await?;
        let (Some(Some(hex)), rec) = (values.first().cloned(), values.get(1).cloned().flatten())
        else {
            return Ok(false);
        };
        let external = rec
            .and_then(|r| serde_json::from_str::<KeyRecord>(&r).ok())
            .and_then(|r| r.external_id);
        // The lookup first, so no node can find it while the rest goes.
        self.run::<i64>(redis::cmd("DEL").arg(format!("tg:hash:{hex}")))
            .await?;
        self.run::<i64>(redis::cmd("DEL").arg(data_key(key_id)))
            .await?;
        self.run::<i64>(redis::cmd("ZREM").arg(IDS).arg(key_id))
            .await?;
        if let Some(ext) = external {
            self.run::<i64>(redis::cmd("ZREM").arg(ext_key(&ext)).arg(key_id))
                .await?;
        }
        if let Some(hash) = KeyHash::from_hex(&hex) {
            if let Some(entry) = self.cache.write().remove(&hash) {
                entry.gone.store(true, Ordering::Release);
            }
        }
        self.announce(key_id).await;
        Ok(true)
    }

    pub async fn list_ids(
        &self,
        external_id: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let set = external_id.map_or_else(|| IDS.to_string(), ext_key);
        let min = after.map_or_else(|| "-".to_string(), |a| format!("({a}"));
        self.run(
            redis::cmd("ZRANGEBYLEX")
                .arg(set)
                .arg(min)
                .arg("+")
                .arg("LIMIT")
                .arg(0)
                .arg(limit),
        )
        .await
    }

    pub async fn key_count(&self) -> Result<usize, StoreError> {
        self.run(redis::cmd("ZCARD").arg(IDS)).await
    }

    pub fn cached(&self) -> usize {
        self.cache.read().len()
    }

    /// Drops every cached key not in use: the shared store holds them.
    pub fn evict_idle(&self) -> usize {
        let mut cache = self.cache.write();
        let before = cache.len();
        cache.retain(|_, entry| Arc::strong_count(entry) > 1);
        before - cache.len()
    }

    /// Copies keys (hashes only), records, usage and billing in; a key id
    /// already there is left as it is. Idempotent.
    pub async fn import(
        &self,
        rows: Vec<(Row, KeyHash, Option<String>)>,
    ) -> Result<usize, StoreError> {
        let mut copied = 0;
        for (row, hash, _) in rows {
            let record: KeyRecord = parse(&row.key_id, "record", &row.record)?;
            // The embedded store's forms; written here as this store
            // keeps them.
            let usage = super::codec::row_usage(&row)?;
            match self.create(hash, &record, &usage).await {
                Ok(()) => copied += 1,
                Err(StoreError::Io(e)) if e.contains("exists already") => {}
                Err(e) => return Err(e),
            }
        }
        Ok(copied)
    }

    /// Copies outbox events in: pending ones to their sink's stream (the
    /// bucket of the event id), parked ones to the parked list; each once
    /// per id however often it runs. Returns how many were new.
    pub async fn import_events(
        &self,
        events: Vec<super::sqlite::Pending>,
    ) -> Result<usize, StoreError> {
        let mut copied = 0;
        for e in events {
            let b = bucket(&e.id);
            let stream = outbox_key(b, &e.sink);
            let new = match &e.parked {
                None => {
                    let done = self
                        .script(
                            &IMPORT_EVENT,
                            &[stream, format!("tg:{{b{b}}}:imported:{}", e.sink)],
                            &[e.id.clone(), e.event.clone(), e.created_ms.to_string()],
                        )
                        .await?;
                    int(Some(&done)) == Some(1)
                }
                Some(reason) => {
                    let parked =
                        serde_json::json!({ "reason": reason, "event": e.event, "stream": stream })
                            .to_string();
                    let set: i64 = self
                        .run(
                            redis::cmd("HSETNX")
                                .arg(parked_key(&e.sink))
                                .arg(&e.id)
                                .arg(parked),
                        )
                        .await?;
                    set == 1
                }
            };
            copied += usize::from(new);
        }
        Ok(copied)
    }

    /// A reporting pass over the keys charged since they were last
    /// reported, by any node (one that died included): each key's events
    /// and billing marks in one atomic step. Nodes may report the same key
    /// at once; the compare-and-set lets one of them write its events.
    pub async fn report(&self, make: MakeEvents<'_>) -> Result<usize, StoreError> {
        let mut written = 0;
        for b in 0..BUCKETS {
            let ids: Vec<String> = self.run(redis::cmd("SMEMBERS").arg(charged_key(b))).await?;
            for key_id in ids {
                match self.lookup_id(&key_id).await? {
                    Some(entry) => written += self.report_key(&entry, make).await?,
                    None => {
                        self.run::<i64>(redis::cmd("SREM").arg(charged_key(b)).arg(&key_id))
                            .await?;
                    }
                }
            }
        }
        Ok(written)
    }

    async fn report_key(
        &self,
        entry: &Arc<Entry>,
        make: MakeEvents<'_>,
    ) -> Result<usize, StoreError> {
        let mut state = entry.state.lock().await;
        // Other nodes' charges are not announced: read the state of now.
        entry.stale.store(true, Ordering::Release);
        if !self.refresh(entry, &mut state).await? {
            return Ok(0);
        }
        let b = bucket(&entry.key_id);
        for _ in 0..MAX_ATTEMPTS {
            let mut billing = state.usage.billing.clone();
            let events: Vec<Outgoing> = make(&state.record, &state.usage, &mut billing);
            if events.is_empty() && billing == state.usage.billing {
                self.script(
                    &REPORTED,
                    &[data_key(&entry.key_id), charged_key(b)],
                    &[state.ver.clone(), entry.key_id.clone()],
                )
                .await?;
                return Ok(0);
            }
            let mut keys = vec![data_key(&entry.key_id)];
            let version = self.next_version();
            let mut args = vec![state.ver.clone(), version.clone(), to_json(&billing)];
            for e in &events {
                keys.push(outbox_key(b, e.sink));
                args.extend([e.id.clone(), e.event.clone(), e.created_ms.to_string()]);
            }
            let reply = self
                .script(&REPORT, &keys, &args)
                .await
                .and_then(|reply| cas_reply(&entry.key_id, &reply))
                .inspect_err(|_| entry.stale.store(true, Ordering::Release))?;
            match reply {
                Cas::Done => {
                    state.usage.billing = billing;
                    state.ver = version;
                    return Ok(events.len());
                }
                Cas::Changed(now) => *state = *now,
                Cas::Gone => {
                    self.gone(entry);
                    return Ok(0);
                }
            }
        }
        Err(StoreError::Io(
            "redis: the key kept changing under this node".into(),
        ))
    }

    /// Makes sure every bucket stream of `sink` has the consumer group.
    async fn ensure_group(&self, stream: &str) -> Result<(), StoreError> {
        let made = self
            .run::<()>(
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(stream)
                    .arg(GROUP)
                    .arg("0")
                    .arg("MKSTREAM"),
            )
            .await;
        match made {
            Err(StoreError::Io(e)) if e.contains("BUSYGROUP") => {
                // Not a fault: the group exists.
                self.healthy.store(true, Ordering::Release);
                Ok(())
            }
            other => other,
        }
    }

    /// Up to `max` events of `sink` for this node: first those it took
    /// before and did not acknowledge, then those other (dead) nodes took
    /// long ago, then new ones. `(stream, entry id, event id, event)`.
    async fn take(
        &self,
        sink: &str,
        max: usize,
    ) -> Result<Vec<(String, String, String, String)>, StoreError> {
        let mut out = Vec::new();
        for b in 0..BUCKETS {
            if out.len() >= max {
                break;
            }
            let stream = outbox_key(b, sink);
            let exists: i64 = self.run(redis::cmd("EXISTS").arg(&stream)).await?;
            if exists == 0 {
                continue;
            }
            self.ensure_group(&stream).await?;
            let room = max - out.len();
            // Ours, not yet acknowledged.
            let mine: Value = self
                .run(
                    redis::cmd("XREADGROUP")
                        .arg("GROUP")
                        .arg(GROUP)
                        .arg(&self.consumer)
                        .arg("COUNT")
                        .arg(room)
                        .arg("STREAMS")
                        .arg(&stream)
                        .arg("0"),
                )
                .await?;
            out.extend(stream_entries(&stream, &mine));
            if out.len() >= max {
                break;
            }
            // Taken by a node that has not acknowledged them for long.
            let claimed: Value = self
                .run(
                    redis::cmd("XAUTOCLAIM")
                        .arg(&stream)
                        .arg(GROUP)
                        .arg(&self.consumer)
                        .arg(self.claim_after.as_millis() as u64)
                        .arg("0-0")
                        .arg("COUNT")
                        .arg(max - out.len()),
                )
                .await?;
            if let Value::Array(parts) = &claimed {
                if let Some(entries) = parts.get(1) {
                    out.extend(entry_list(&stream, entries));
                }
            }
            if out.len() >= max {
                break;
            }
            let new: Value = self
                .run(
                    redis::cmd("XREADGROUP")
                        .arg("GROUP")
                        .arg(GROUP)
                        .arg(&self.consumer)
                        .arg("COUNT")
                        .arg(max - out.len())
                        .arg("STREAMS")
                        .arg(&stream)
                        .arg(">"),
                )
                .await?;
            out.extend(stream_entries(&stream, &new));
        }
        out.truncate(max);
        Ok(out)
    }

    /// Acknowledges and removes stream entries.
    async fn done(&self, entries: &[(String, String)]) -> Result<(), StoreError> {
        for (stream, id) in entries {
            self.run::<i64>(redis::cmd("XACK").arg(stream).arg(GROUP).arg(id))
                .await?;
            self.run::<i64>(redis::cmd("XDEL").arg(stream).arg(id))
                .await?;
        }
        Ok(())
    }

    pub async fn outbox_batch(
        &self,
        sink: &'static str,
        max: usize,
    ) -> Result<Option<Batch>, StoreError> {
        // A batch is retried as it was until it is delivered.
        if let Some(open) = self.open.lock().get(sink) {
            return Ok(Some(open.clone()));
        }
        let taken = self.take(sink, max).await?;
        if taken.is_empty() {
            return Ok(None);
        }
        // The same events make the same batch id, however often and by
        // whichever node they are sent.
        let mut ids: Vec<&str> = taken.iter().map(|t| t.2.as_str()).collect();
        ids.sort_unstable();
        let digest = <sha2::Sha256 as sha2::Digest>::digest(ids.join(",").as_bytes());
        let id = format!("batch_{}", &KeyHash(digest.into()).to_hex()[..22]);
        let events = taken.iter().map(|t| t.3.clone()).collect();
        self.batches
            .lock()
            .insert(id.clone(), taken.into_iter().map(|t| (t.0, t.1)).collect());
        let batch = Batch { id, events };
        self.open.lock().insert(sink, batch.clone());
        Ok(Some(batch))
    }

    pub async fn outbox_delivered(&self, sink: &str, batch: &str) -> Result<(), StoreError> {
        let entries = self.batches.lock().get(batch).cloned().unwrap_or_default();
        self.done(&entries).await?;
        self.batches.lock().remove(batch);
        let mut open = self.open.lock();
        if open.get(sink).is_some_and(|b| b.id == batch) {
            open.remove(sink);
        }
        Ok(())
    }

    pub async fn outbox_next(
        &self,
        sink: &str,
        max: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let taken = self.take(sink, max).await?;
        let mut singles = self.singles.lock();
        Ok(taken
            .into_iter()
            .map(|(stream, entry, id, event)| {
                singles.insert(id.clone(), (stream, entry));
                (id, event)
            })
            .collect())
    }

    pub async fn outbox_sent(&self, _sink: &str, ids: Vec<String>) -> Result<(), StoreError> {
        let entries: Vec<(String, String)> = {
            let mut singles = self.singles.lock();
            ids.iter().filter_map(|id| singles.remove(id)).collect()
        };
        self.done(&entries).await
    }

    pub async fn outbox_park(&self, sink: &str, id: &str, reason: &str) -> Result<(), StoreError> {
        let entry = self.singles.lock().remove(id);
        let Some((stream, entry_id)) = entry else {
            return Ok(());
        };
        let found: Value = self
            .run(
                redis::cmd("XRANGE")
                    .arg(&stream)
                    .arg(&entry_id)
                    .arg(&entry_id),
            )
            .await?;
        let event = entry_list(&stream, &found)
            .into_iter()
            .next()
            .map(|t| t.3)
            .unwrap_or_default();
        let parked =
            serde_json::json!({ "reason": reason, "event": event, "stream": stream }).to_string();
        self.run::<i64>(redis::cmd("HSET").arg(parked_key(sink)).arg(id).arg(parked))
            .await?;
        self.done(&[(stream, entry_id)]).await
    }

    pub async fn outbox_parked(
        &self,
        sink: &str,
        limit: usize,
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        let all: HashMap<String, String> = self
            .run(redis::cmd("HGETALL").arg(parked_key(sink)))
            .await?;
        let mut out: Vec<(String, String, String)> = all
            .into_iter()
            .filter_map(|(id, v)| {
                let v: serde_json::Value = serde_json::from_str(&v).ok()?;
                Some((
                    id,
                    v["reason"].as_str()?.to_string(),
                    v["event"].as_str()?.to_string(),
                ))
            })
            .collect();
        out.sort();
        out.truncate(limit);
        Ok(out)
    }

    pub async fn outbox_unpark(&self, ids: Option<Vec<String>>) -> Result<(), StoreError> {
        for sink in [crate::report::WEBHOOK, crate::report::STRIPE] {
            let all: HashMap<String, String> = self
                .run(redis::cmd("HGETALL").arg(parked_key(sink)))
                .await?;
            for (id, v) in all {
                if ids.as_ref().is_some_and(|ids| !ids.contains(&id)) {
                    continue;
                }
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&v) else {
                    continue;
                };
                let (Some(stream), Some(event)) = (v["stream"].as_str(), v["event"].as_str())
                else {
                    continue;
                };
                self.run::<String>(
                    redis::cmd("XADD")
                        .arg(stream)
                        .arg("*")
                        .arg("id")
                        .arg(&id)
                        .arg("event")
                        .arg(event)
                        .arg("at")
                        .arg(jiff::Timestamp::now().as_millisecond()),
                )
                .await?;
                self.run::<i64>(redis::cmd("HDEL").arg(parked_key(sink)).arg(&id))
                    .await?;
            }
        }
        Ok(())
    }

    pub async fn outbox_stats(&self, sink: &str) -> Result<OutboxStats, StoreError> {
        let mut pending = 0u64;
        let mut oldest: Option<i64> = None;
        for b in 0..BUCKETS {
            let stream = outbox_key(b, sink);
            let len: u64 = self.run(redis::cmd("XLEN").arg(&stream)).await?;
            if len == 0 {
                continue;
            }
            pending += len;
            let first: Value = self
                .run(
                    redis::cmd("XRANGE")
                        .arg(&stream)
                        .arg("-")
                        .arg("+")
                        .arg("COUNT")
                        .arg(1),
                )
                .await?;
            if let Some((_, entry, _, _)) = entry_list(&stream, &first).into_iter().next() {
                let ms = entry
                    .split('-')
                    .next()
                    .and_then(|ms| ms.parse::<i64>().ok());
                oldest = match (oldest, ms) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        let parked: u64 = self.run(redis::cmd("HLEN").arg(parked_key(sink))).await?;
        Ok(OutboxStats {
            pending,
            oldest_ms: oldest,
            parked,
        })
    }
}

/// This node's name, made once and kept in `dir` (the `store.path`).
pub fn node_name(dir: &std::path::Path) -> Result<String, StoreError> {
    let path = dir.join("node");
    match std::fs::read_to_string(&path) {
        Ok(name) if !name.trim().is_empty() => Ok(name.trim().to_string()),
        Ok(_) => write_node_name(&path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => write_node_name(&path),
        Err(e) => Err(e.into()),
    }
}

fn write_node_name(path: &std::path::Path) -> Result<String, StoreError> {
    let name = crate::keys::random_id("node");
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, &name)?;
    std::fs::rename(&temp, path)?;
    Ok(name)
}

/// Connects to Redis (or a cluster): `(connection, client for pub/sub)`.
async fn connect(config: &RedisConfig) -> Result<(Conn, Option<redis::Client>), StoreError> {
    let mut info =
        redis::IntoConnectionInfo::into_connection_info(config.url.as_str()).map_err(io)?;
    if let Some(password) = &config.password {
        let settings = info
            .redis_settings()
            .clone()
            .set_password(password.expose());
        info = info.set_redis_settings(settings);
    }
    if config.cluster {
        let client = redis::cluster::ClusterClient::builder(vec![info])
            .connection_timeout(Duration::from_millis(500))
            .response_timeout(TIMEOUT)
            .retries(1)
            .build()
            .map_err(io)?;
        let conn = tokio::time::timeout(TIMEOUT * 5, client.get_async_connection())
            .await
            .map_err(|_| StoreError::Io("redis: the cluster did not answer".into()))?
            .map_err(io)?;
        Ok((Conn::Cluster(conn), None))
    } else {
        let client = redis::Client::open(info).map_err(io)?;
        let manager = client
            .get_connection_manager_lazy(manager_config())
            .map_err(io)?;
        Ok((Conn::Single(manager), Some(client)))
    }
}

/// How a connection to one Redis connects, waits and reconnects.
fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_millis(500)))
        .set_response_timeout(Some(TIMEOUT))
        .set_number_of_retries(1)
        .set_min_delay(Duration::from_millis(50))
        .set_max_delay(Duration::from_millis(200))
}

/// While the store is unhealthy, asks Redis every [`PROBE_EVERY`] whether
/// it answers again.
async fn probe(store: std::sync::Weak<Redis>, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PROBE_EVERY) => {}
            _ = stop.changed() => return,
        }
        let Some(store) = store.upgrade() else { return };
        if !store.healthy() {
            store.ping().await;
        }
        if store.healthy() && !store.offset_measured.load(Ordering::Acquire) {
            if let Some(clock) = store.node_clock.get().cloned() {
                let _ = store.measure_clock(&clock).await;
            }
        }
    }
}

/// Follows [`CHANNEL`]: each message marks a key stale. A lost
/// subscription drops every cached key, then subscribes again. On a
/// cluster, where one subscription does not see every node, cached keys
/// live one [`PROBE_EVERY`] at most.
async fn watch(store: std::sync::Weak<Redis>, mut stop: tokio::sync::watch::Receiver<bool>) {
    use futures_util::StreamExt;
    let client = match store.upgrade() {
        Some(s) => s.client.clone(),
        None => return,
    };
    let Some(client) = client else {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(PROBE_EVERY) => {}
                _ = stop.changed() => return,
            }
            match store.upgrade() {
                Some(s) => s.forget_all(),
                None => return,
            }
        }
    };
    loop {
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => {
                if pubsub.subscribe(CHANNEL).await.is_ok() {
                    // Anything cached may have changed while unsubscribed.
                    match store.upgrade() {
                        Some(s) => s.forget_all(),
                        None => return,
                    }
                    let mut messages = pubsub.into_on_message();
                    loop {
                        tokio::select! {
                            message = messages.next() => match message {
                                Some(m) => {
                                    let Some(s) = store.upgrade() else { return };
                                    if let Ok(id) = m.get_payload::<String>() {
                                        s.changed(&id);
                                    }
                                }
                                None => break,
                            },
                            _ = stop.changed() => return,
                        }
                    }
                }
                tracing::warn!("lost the Redis change channel; dropping cached keys");
                match store.upgrade() {
                    Some(s) => s.forget_all(),
                    None => return,
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot subscribe to the Redis change channel yet")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(PROBE_EVERY) => {}
            _ = stop.changed() => return,
        }
    }
}

/// `(stream, entry id, event id, event)` of an XREADGROUP answer.
fn stream_entries(stream: &str, reply: &Value) -> Vec<(String, String, String, String)> {
    // [[stream, [[id, [field, value, ...]], ...]]] (or a map in RESP3).
    let streams = match reply {
        Value::Array(streams) => streams.clone(),
        Value::Map(pairs) => pairs
            .iter()
            .map(|(k, v)| Value::Array(vec![k.clone(), v.clone()]))
            .collect(),
        _ => return Vec::new(),
    };
    streams
        .iter()
        .filter_map(|s| match s {
            Value::Array(parts) => parts.get(1).map(|entries| entry_list(stream, entries)),
            _ => None,
        })
        .flatten()
        .collect()
}

/// `(stream, entry id, event id, event)` of a list of stream entries.
fn entry_list(stream: &str, entries: &Value) -> Vec<(String, String, String, String)> {
    let Value::Array(entries) = entries else {
        return Vec::new();
    };
    entries
        .iter()
        .filter_map(|e| {
            let Value::Array(parts) = e else { return None };
            let entry = text(parts.first())?;
            let fields: Vec<String> = match parts.get(1)? {
                Value::Array(f) => f.iter().filter_map(|v| text(Some(v))).collect(),
                Value::Map(m) => m
                    .iter()
                    .flat_map(|(k, v)| [text(Some(k)), text(Some(v))])
                    .flatten()
                    .collect(),
                _ => return None,
            };
            let field = |name: &str| {
                fields
                    .chunks(2)
                    .find(|kv| kv.first().map(String::as_str) == Some(name))
                    .and_then(|kv| kv.get(1).cloned())
            };
            Some((stream.to_string(), entry, field("id")?, field("event")?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_stable_and_spread() {
        assert_eq!(bucket("key_abc"), bucket("key_abc"));
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000 {
            seen.insert(bucket(&crate::keys::random_id(&format!("k{i}"))));
        }
        assert!(
            seen.len() > BUCKETS as usize / 2,
            "{} buckets used",
            seen.len()
        );
        assert!(data_key("key_x").starts_with("tg:{b"));
        let tag = |k: &str| k[k.find('{').unwrap_or(0)..=k.find('}').unwrap_or(0)].to_string();
        assert_eq!(
            tag(&data_key("key_x")),
            tag(&outbox_key(bucket("key_x"), "webhook"))
        );
    }
}
