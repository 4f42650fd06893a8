//! The store: keys, their records and usage, and the billing outbox, behind
//! one interface whatever backend runs.
//!
//! # Parts
//!
//! - this file: the interface ([`Store`], a [`Key`] handle), the errors;
//! - [`local`]: the embedded backend: usage in memory, written behind to
//!   SQLite ([`sqlite`]) by one writer thread;
//! - [`codec`]: the binary form the embedded backend writes usage in;
//! - [`redis`]: the shared backend, for several gateways on one Redis;
//! - [`migrate`]: copying a store of an earlier tollgate (sled) into this one.
//!
//! # The interface
//!
//! Callers never hold a key's state. They find a [`Key`] and hand the store
//! a closure: [`Store::charge`] for what requests do (decide and charge,
//! refund, meter, settle a view), [`Store::update`] for admin writes. The
//! closure gets the key's record and usage and must be a pure function of
//! them: a backend may run it more than once (a shared store re-runs it
//! when another node changed the key meanwhile). Side effects (metrics,
//! logs) belong after the call, on what it returned.

pub mod codec;
pub mod local;
pub mod migrate;
pub mod redis;
pub mod sqlite;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::keys::KeyHash;
use crate::ledger::{Billing, KeyRecord, Usage};

pub use local::{lock_dir, MIN_FREE, REWRITE_AFTER_MS};

/// Turns a key's unreported units and detected events into outbox rows,
/// raising the reported marks of `billing` (a copy of the key's) to match.
pub type MakeEvents<'a> =
    &'a (dyn Fn(&KeyRecord, &Usage, &mut Billing) -> Vec<sqlite::Outgoing> + Sync);

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O error: {0}")]
    Io(String),
    #[error("store holds a corrupt record for {key_id}: {reason}")]
    Corrupt { key_id: String, reason: String },
    #[error("the store cannot write right now")]
    Unavailable,
    #[error("another process is using the store {}", .0.display())]
    Locked(PathBuf),
    #[error("the store is closed")]
    Closed,
    #[error("the key was revoked")]
    Gone,
    #[error(
        "{} holds a store of an earlier tollgate (sled); copy it into this version's store first: \
         tollgate migrate --from {}",
        .0.display(), .0.display()
    )]
    NeedsMigration(PathBuf),
}

impl StoreError {
    /// Another process (or a just-dropped store) holds the store's lock.
    pub fn is_locked(&self) -> bool {
        matches!(self, StoreError::Locked(_))
    }
}

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

/// Which backend runs. One a process, reached on every keyed request:
/// kept inline rather than boxed.
#[allow(clippy::large_enum_variant)]
enum Backend {
    Local(local::Local),
    Redis(Arc<self::redis::Redis>),
}

/// The store a gateway runs on.
pub struct Store {
    backend: Backend,
    /// Lookups by key hash that went past memory (see [`Store::lookups`]).
    lookups: std::sync::atomic::AtomicU64,
}

/// A key found in the store, to hand back to its calls.
#[derive(Clone)]
pub struct Key(KeyRef);

#[derive(Clone)]
enum KeyRef {
    Local(Arc<local::Entry>),
    Redis(Arc<self::redis::Entry>),
}

impl Store {
    /// Opens (creating if absent) the embedded store in `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        local::Local::open(path).map(Store::local)
    }

    /// [`Store::open`], waiting up to `max_wait` while another process (or a
    /// just-dropped store) holds the embedded store's lock.
    pub fn open_waiting(path: &Path, max_wait: std::time::Duration) -> Result<Store, StoreError> {
        local::Local::open_waiting(path, max_wait).map(Store::local)
    }

    /// The store a config names: the shared one with `store.redis`, else
    /// the embedded one in `store.path`. Either way this process holds the
    /// lock of `store.path` (with Redis, only the pid file and the upgrade
    /// socket live there), so an upgrade finds the process it replaces.
    pub fn open_for(config: &crate::config::Config) -> Result<Store, StoreError> {
        match &config.redis {
            None => Store::open(&config.store_path),
            Some(redis) => {
                let lock = lock_dir(&config.store_path)?;
                let node = self::redis::node_name(&config.store_path)?;
                Ok(Store {
                    backend: Backend::Redis(self::redis::Redis::open(redis, node, Some(lock))?),
                    lookups: Default::default(),
                })
            }
        }
    }

    /// [`Store::open_for`], waiting up to `max_wait` while another process
    /// holds the lock.
    pub fn open_for_waiting(
        config: &crate::config::Config,
        max_wait: std::time::Duration,
    ) -> Result<Store, StoreError> {
        let deadline = std::time::Instant::now() + max_wait;
        loop {
            match Store::open_for(config) {
                Err(e) if e.is_locked() && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    /// The clock a gateway on this store counts time with: `clock` itself on
    /// the embedded store; on Redis, `clock` set to Redis's time, so every
    /// node counts on one clock (SPEC §8).
    pub fn clock(&self, clock: crate::clock::SharedClock) -> crate::clock::SharedClock {
        match &self.backend {
            Backend::Redis(r) => r.shared_clock(clock),
            Backend::Local(_) => clock,
        }
    }

    /// Whether this is the shared store.
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Redis(_))
    }

    fn local(local: local::Local) -> Store {
        Store {
            backend: Backend::Local(local),
            lookups: Default::default(),
        }
    }

    /// Whether charges can be recorded.
    pub fn healthy(&self) -> bool {
        match &self.backend {
            Backend::Local(s) => s.healthy(),
            Backend::Redis(s) => s.healthy(),
        }
    }

    /// Makes every write fail (or succeed again): for tests of the
    /// fail-closed path.
    #[doc(hidden)]
    pub fn inject_flush_failure(&self, fail: bool) {
        match &self.backend {
            Backend::Local(s) => s.inject_flush_failure(fail),
            Backend::Redis(_) => {}
        }
    }

    /// The key with this hash if this process holds it already; never
    /// reads the backend. A key held is a real key.
    pub fn in_memory(&self, hash: &KeyHash) -> Option<Key> {
        match &self.backend {
            Backend::Local(s) => s.in_memory(hash).map(|e| Key(KeyRef::Local(e))),
            Backend::Redis(s) => s.in_memory(hash).map(|e| Key(KeyRef::Redis(e))),
        }
    }

    /// The key with this hash.
    pub async fn find(&self, hash: &KeyHash) -> Result<Option<Key>, StoreError> {
        self.lookups
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match &self.backend {
            Backend::Local(s) => Ok(s.lookup(hash)?.map(|e| Key(KeyRef::Local(e)))),
            Backend::Redis(s) => Ok(s.lookup(hash).await?.map(|e| Key(KeyRef::Redis(e)))),
        }
    }

    /// How many lookups by key hash went to the backend (the disk, or
    /// Redis) since the store opened: a key that is malformed or fails its
    /// checksum never makes one (tests count them).
    pub fn lookups(&self) -> u64 {
        self.lookups.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The key with this id.
    pub async fn find_id(&self, key_id: &str) -> Result<Option<Key>, StoreError> {
        match &self.backend {
            Backend::Local(s) => Ok(s.lookup_id(key_id)?.map(|e| Key(KeyRef::Local(e)))),
            Backend::Redis(s) => Ok(s.lookup_id(key_id).await?.map(|e| Key(KeyRef::Redis(e)))),
        }
    }

    /// Runs `f` on the key's record and usage and keeps what it changed in
    /// the usage (see the module's docs: `f` may run more than once). What
    /// `f` decides is exact: concurrent calls on one key see each other's
    /// changes. `None` if the key was revoked.
    pub async fn charge<T>(
        &self,
        key: &Key,
        f: impl Fn(&KeyRecord, &mut Usage) -> T,
    ) -> Result<Option<T>, StoreError> {
        match (&self.backend, &key.0) {
            (Backend::Local(s), KeyRef::Local(e)) => Ok(s.charge(e, f)),
            (Backend::Redis(s), KeyRef::Redis(e)) => s.charge(e, f).await,
            // A key handle only ever comes from its own store.
            _ => Ok(None),
        }
    }

    /// Changes a key durably: on disk (or in the shared store) before this
    /// returns; if the write fails, nothing changes. `change` may run more
    /// than once.
    pub async fn update<E: From<StoreError>>(
        &self,
        key: &Key,
        change: impl Fn(&mut KeyRecord, &mut Usage) -> Result<(), E>,
    ) -> Result<(), E> {
        match (&self.backend, &key.0) {
            (Backend::Local(s), KeyRef::Local(e)) => s.update(e, change).await,
            (Backend::Redis(s), KeyRef::Redis(e)) => s.update(e, change).await,
            _ => Err(StoreError::Gone.into()),
        }
    }

    /// Stores a new key. Durable when this returns.
    pub async fn create(
        &self,
        hash: KeyHash,
        record: &KeyRecord,
        usage: &Usage,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Local(s) => s.create(hash, record, usage).await,
            Backend::Redis(s) => s.create(hash, record, usage).await,
        }
    }

    /// Revokes a key: it stops working at once. Durable when this returns.
    /// `false` if there was no such key.
    pub async fn revoke(&self, key_id: &str) -> Result<bool, StoreError> {
        match &self.backend {
            Backend::Local(s) => s.revoke(key_id).await,
            Backend::Redis(s) => s.revoke(key_id).await,
        }
    }

    /// Key ids in id order after `after`: one customer's (`external_id`),
    /// or all.
    pub async fn list_ids(
        &self,
        external_id: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        match &self.backend {
            Backend::Local(s) => s.list_ids(external_id, after, limit),
            Backend::Redis(s) => s.list_ids(external_id, after, limit).await,
        }
    }

    /// Copies keys from another store; a key id already here is kept as is.
    /// Durable when this returns.
    pub fn import_blocking(
        &self,
        rows: Vec<(sqlite::Row, KeyHash, Option<String>)>,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Local(s) => s.import_blocking(rows),
            Backend::Redis(_) => Err(StoreError::Io(
                "a shared store is filled by `tollgate migrate --to`".into(),
            )),
        }
    }

    /// How many keys exist.
    pub async fn key_count(&self) -> Result<usize, StoreError> {
        match &self.backend {
            Backend::Local(s) => Ok(s.key_count()),
            Backend::Redis(s) => s.key_count().await,
        }
    }

    /// Copies keys from another store (`tollgate migrate`); a key id
    /// already there is kept as it is. Returns how many were copied.
    pub async fn import(
        &self,
        rows: Vec<(sqlite::Row, KeyHash, Option<String>)>,
    ) -> Result<usize, StoreError> {
        match &self.backend {
            Backend::Local(s) => {
                let n = rows.len();
                s.import_blocking(rows).map(|()| n)
            }
            Backend::Redis(s) => s.import(rows).await,
        }
    }

    /// Keys held in memory.
    pub fn cached(&self) -> usize {
        match &self.backend {
            Backend::Local(s) => s.cached(),
            Backend::Redis(s) => s.cached(),
        }
    }

    /// Drops from memory the keys unused for `idle` that nothing needs in
    /// memory any more. Returns how many were dropped.
    pub fn evict_idle(&self, idle: std::time::Duration) -> usize {
        match &self.backend {
            Backend::Local(s) => s.evict_idle(idle),
            // The shared store holds every key: any unused copy may go.
            Backend::Redis(s) => s.evict_idle(),
        }
    }

    /// The periodic write-behind pass (see [`local::Local::flush_due`]).
    pub async fn flush_due(&self) -> Result<usize, StoreError> {
        match &self.backend {
            Backend::Local(s) => s.flush_due().await,
            // Nothing is written behind: every change is in Redis already.
            Backend::Redis(_) => Ok(0),
        }
    }

    /// Folds what the write-behind logged into the keys' rows, so those
    /// keys may leave memory (see [`local::Local::fold`]).
    pub async fn fold(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Local(s) => s.fold().await,
            Backend::Redis(_) => Ok(()),
        }
    }

    /// Sets what the write-behind logged aside for [`Store::fold_aside`]
    /// (see [`local::Local::set_aside`]).
    pub async fn set_aside(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Local(s) => s.set_aside().await,
            Backend::Redis(_) => Ok(()),
        }
    }

    /// Folds what [`Store::set_aside`] set aside into the keys' rows, but
    /// for keys logged again since (see [`local::Local::fold_aside`]).
    pub async fn fold_aside(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Local(s) => s.fold_aside().await,
            Backend::Redis(_) => Ok(()),
        }
    }

    /// Writes everything charged so far (at shutdown).
    pub async fn flush_dirty(&self) -> Result<usize, StoreError> {
        match &self.backend {
            Backend::Local(s) => s.flush_dirty().await,
            Backend::Redis(_) => Ok(0),
        }
    }

    /// [`Store::flush_dirty`] for a thread outside any runtime.
    pub fn flush_blocking(&self) -> Result<usize, StoreError> {
        match &self.backend {
            Backend::Local(s) => s.flush_blocking(),
            Backend::Redis(_) => Ok(0),
        }
    }

    /// A reporting pass: every key charged since the last one goes through
    /// `make`, and its events go to the outbox in the same atomic write as
    /// the billing state they come from. Returns the events written.
    pub async fn report(&self, make: MakeEvents<'_>) -> Result<usize, StoreError> {
        match &self.backend {
            Backend::Local(s) => s.report(make).await,
            Backend::Redis(s) => s.report(make).await,
        }
    }

    /// The batch of `sink` to send next: the one already under way (its id
    /// kept across retries and restarts), or a new one of at most `max` of
    /// the oldest events.
    pub async fn outbox_batch(
        &self,
        sink: &'static str,
        max: usize,
    ) -> Result<Option<sqlite::Batch>, StoreError> {
        match &self.backend {
            Backend::Local(s) => s.outbox_batch(sink, max).await,
            Backend::Redis(s) => s.outbox_batch(sink, max).await,
        }
    }

    /// A batch was delivered: its events leave the outbox.
    pub async fn outbox_delivered(
        &self,
        sink: &'static str,
        batch: &str,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Local(s) => s.outbox_delivered(sink, batch).await,
            Backend::Redis(s) => s.outbox_delivered(sink, batch).await,
        }
    }

    pub async fn outbox_stats(&self, sink: &str) -> Result<sqlite::OutboxStats, StoreError> {
        match &self.backend {
            Backend::Local(s) => s.outbox_stats(sink),
            Backend::Redis(s) => s.outbox_stats(sink).await,
        }
    }

    /// The oldest events of `sink` waiting to be sent one by one:
    /// `(id, event)`.
    pub async fn outbox_next(
        &self,
        sink: &str,
        max: usize,
    ) -> Result<Vec<(String, String)>, StoreError> {
        match &self.backend {
            Backend::Local(s) => s.outbox_next(sink, max),
            Backend::Redis(s) => s.outbox_next(sink, max).await,
        }
    }

    /// Events of `sink` sent one by one: they leave the outbox.
    pub async fn outbox_sent(
        &self,
        sink: &'static str,
        ids: Vec<String>,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Local(s) => s.outbox_sent(sink, ids).await,
            Backend::Redis(s) => s.outbox_sent(sink, ids).await,
        }
    }

    /// An event `sink` refuses for good: parked until an operator retries it.
    pub async fn outbox_park(
        &self,
        sink: &'static str,
        id: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Local(s) => s.outbox_park(sink, id, reason).await,
            Backend::Redis(s) => s.outbox_park(sink, id, reason).await,
        }
    }

    /// Parked events of `sink`: `(id, reason, event)`.
    pub async fn outbox_parked(
        &self,
        sink: &str,
        limit: usize,
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        match &self.backend {
            Backend::Local(s) => s.outbox_parked(sink, limit),
            Backend::Redis(s) => s.outbox_parked(sink, limit).await,
        }
    }

    /// Puts parked events (these ids, or all) back in the queue.
    pub async fn outbox_unpark(&self, ids: Option<Vec<String>>) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Local(s) => s.outbox_unpark(ids).await,
            Backend::Redis(s) => s.outbox_unpark(ids).await,
        }
    }
}
