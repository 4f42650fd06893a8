//! The embedded store: key records and usage in sled, with usage held in
//! memory and written behind.
//!
//! # Layout (sled trees)
//!
//! | tree       | key                          | value                  |
//! |------------|------------------------------|------------------------|
//! | `records`  | key id                       | [`KeyRecord`] as JSON  |
//! | `hashes`   | SHA-256 of the key (32 bytes)| key id                 |
//! | `usage`    | key id                       | [`Usage`] as JSON      |
//! | `external` | external id, `0x00`, key id  | empty                  |
//!
//! # Counters
//!
//! Only this process opens the store (sled holds an exclusive lock), so the
//! in-memory [`Entry`] of a key is the authority for its usage. A request
//! locks the entry, lets the gate decide and charge, and marks it dirty; no
//! disk write is on the request path. A [`Store::flush_dirty`] pass (the
//! `Flusher` service, every 200 ms, and at shutdown) writes dirty usage to
//! sled and fsyncs, so a `kill -9` loses at most the charges of the last
//! pass interval plus one fsync. Admin writes go to sled and are fsynced
//! before they are acknowledged.
//!
//! Every sled write of a key happens while its entry is locked, so the order
//! of writes in sled is the order of changes in memory: a write-behind pass
//! can never overwrite a newer admin write with older usage.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard, RwLock};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use crate::keys::KeyHash;
use crate::ledger::{KeyRecord, Usage};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O error: {0}")]
    Sled(#[from] sled::Error),
    #[error("store holds a corrupt record for {key_id}: {reason}")]
    Corrupt { key_id: String, reason: String },
    #[error("the store cannot write right now")]
    Unavailable,
}

impl StoreError {
    /// Another process (or a just-dropped store) holds sled's lock.
    pub fn is_locked(&self) -> bool {
        matches!(self, StoreError::Sled(sled::Error::Io(io)) if io.to_string().contains("could not acquire lock"))
    }
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(e: TransactionError<StoreError>) -> Self {
        match e {
            TransactionError::Abort(e) => e,
            TransactionError::Storage(e) => StoreError::Sled(e),
        }
    }
}

/// One key's state, shared by every request on that key.
pub struct KeyState {
    pub record: KeyRecord,
    pub usage: Usage,
    revoked: bool,
}

pub struct Entry {
    state: Mutex<KeyState>,
    dirty: AtomicBool,
    /// When a lookup last found it, in seconds since the store opened.
    last_used: AtomicU64,
}

impl Entry {
    /// Locks the key. Returns `None` if it was revoked meanwhile.
    pub fn lock(&self) -> Option<MutexGuard<'_, KeyState>> {
        let guard = self.state.lock();
        (!guard.revoked).then_some(guard)
    }
}

pub struct Store {
    db: sled::Db,
    records: sled::Tree,
    hashes: sled::Tree,
    usage: sled::Tree,
    external: sled::Tree,
    cache: RwLock<HashMap<KeyHash, Arc<Entry>, ahash::RandomState>>,
    dirty: Mutex<Vec<Arc<Entry>>>,
    /// False after a failed write-behind pass: charges fail closed.
    healthy: AtomicBool,
    /// Fault injection for tests: every flush fails while set.
    fail_flushes: AtomicBool,
    /// Keys in `records` (sled's `len` walks the whole tree).
    keys: AtomicUsize,
    /// The epoch of `Entry::last_used`.
    opened: std::time::Instant,
    /// One write-behind pass at a time, so a pass that started before a
    /// failure cannot finish after it and mark the store healthy.
    flush_pass: tokio::sync::Mutex<()>,
}

fn to_json<T: serde::Serialize>(value: &T) -> Vec<u8> {
    // Serialising plain data structs to JSON cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn from_json<T: serde::de::DeserializeOwned>(key_id: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key_id: key_id.to_string(),
        reason: e.to_string(),
    })
}

fn external_key(external_id: &str, key_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(external_id.len() + 1 + key_id.len());
    k.extend_from_slice(external_id.as_bytes());
    k.push(0);
    k.extend_from_slice(key_id.as_bytes());
    k
}

impl Store {
    /// Opens the store, waiting up to `max_wait` while another process (or
    /// a just-dropped store, whose threads are still closing) holds sled's
    /// exclusive lock on it.
    pub fn open_waiting(path: &Path, max_wait: std::time::Duration) -> Result<Store, StoreError> {
        let deadline = std::time::Instant::now() + max_wait;
        loop {
            match Store::open(path) {
                Err(e) if e.is_locked() && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    /// Opens (creating if absent) the store directory.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .flush_every_ms(Some(500))
            .open()?;
        let records = db.open_tree("records")?;
        Ok(Store {
            keys: AtomicUsize::new(records.len()),
            opened: std::time::Instant::now(),
            records,
            hashes: db.open_tree("hashes")?,
            usage: db.open_tree("usage")?,
            external: db.open_tree("external")?,
            db,
            cache: RwLock::new(HashMap::default()),
            dirty: Mutex::new(Vec::new()),
            healthy: AtomicBool::new(true),
            fail_flushes: AtomicBool::new(false),
            flush_pass: tokio::sync::Mutex::new(()),
        })
    }

    /// Whether charges can be recorded.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Makes every flush fail (or succeed again): for tests of the
    /// fail-closed path.
    #[doc(hidden)]
    pub fn inject_flush_failure(&self, fail: bool) {
        self.fail_flushes.store(fail, Ordering::Release);
    }

    /// The key with this hash, loaded into memory on first use.
    pub fn lookup(&self, hash: &KeyHash) -> Result<Option<Arc<Entry>>, StoreError> {
        if let Some(entry) = self.cache.read().get(hash) {
            entry.last_used.store(self.now_secs(), Ordering::Relaxed);
            return Ok(Some(entry.clone()));
        }
        if !self.hashes.contains_key(hash.0)? {
            // Unknown keys never take the write lock.
            return Ok(None);
        }
        // Load under the write lock so a concurrent revoke cannot slip
        // between the read from sled and the insert into the cache.
        let mut cache = self.cache.write();
        if let Some(entry) = cache.get(hash) {
            return Ok(Some(entry.clone()));
        }
        let Some(id) = self.hashes.get(hash.0)? else {
            return Ok(None);
        };
        let key_id = String::from_utf8_lossy(&id).into_owned();
        let Some(record) = self.records.get(&id)? else {
            return Ok(None);
        };
        let record: KeyRecord = from_json(&key_id, &record)?;
        let usage = match self.usage.get(&id)? {
            Some(bytes) => from_json(&key_id, &bytes)?,
            None => Usage::default(),
        };
        let entry = Arc::new(Entry {
            state: Mutex::new(KeyState {
                record,
                usage,
                revoked: false,
            }),
            dirty: AtomicBool::new(false),
            last_used: AtomicU64::new(self.now_secs()),
        });
        cache.insert(*hash, entry.clone());
        Ok(Some(entry))
    }

    /// The key with this id, loaded into memory on first use.
    pub fn lookup_id(&self, key_id: &str) -> Result<Option<Arc<Entry>>, StoreError> {
        let Some(bytes) = self.records.get(key_id.as_bytes())? else {
            return Ok(None);
        };
        let record: KeyRecord = from_json(key_id, &bytes)?;
        let hash = KeyHash::from_hex(&record.hash).ok_or_else(|| StoreError::Corrupt {
            key_id: key_id.to_string(),
            reason: "bad hash".into(),
        })?;
        self.lookup(&hash)
    }

    /// Marks a key's usage as changed, for the next write-behind pass.
    pub fn touch(&self, entry: &Arc<Entry>) {
        if !entry.dirty.swap(true, Ordering::AcqRel) {
            self.dirty.lock().push(entry.clone());
        }
    }

    /// Stores a new key. Durable on disk when this returns.
    pub async fn create(
        &self,
        hash: KeyHash,
        record: &KeyRecord,
        usage: &Usage,
    ) -> Result<(), StoreError> {
        let id = record.key_id.as_bytes();
        let record_json = to_json(record);
        let usage_json = to_json(usage);
        (&self.records, &self.hashes, &self.usage, &self.external).transaction(
            |(records, hashes, usage_tree, external)| {
                if hashes.get(hash.0)?.is_some() {
                    // 2^-128: only a broken random source gets here.
                    return Err(ConflictableTransactionError::Abort(StoreError::Corrupt {
                        key_id: record.key_id.clone(),
                        reason: "duplicate key hash".into(),
                    }));
                }
                records.insert(id, record_json.as_slice())?;
                hashes.insert(&hash.0, id)?;
                usage_tree.insert(id, usage_json.as_slice())?;
                if let Some(ext) = &record.external_id {
                    external.insert(external_key(ext, &record.key_id), &[])?;
                }
                Ok(())
            },
        )?;
        self.keys.fetch_add(1, Ordering::Relaxed);
        self.sync().await
    }

    /// Writes a key's record and usage now (under its lock, which the caller
    /// holds through `state`). Call [`Store::sync`] before acknowledging.
    pub fn write_through(
        &self,
        old_external: Option<&str>,
        state: &KeyState,
    ) -> Result<(), StoreError> {
        if self.fail_flushes.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable);
        }
        let id = state.record.key_id.as_bytes();
        self.records.insert(id, to_json(&state.record))?;
        self.usage.insert(id, to_json(&state.usage))?;
        if old_external != state.record.external_id.as_deref() {
            if let Some(old) = old_external {
                self.external
                    .remove(external_key(old, &state.record.key_id))?;
            }
            if let Some(new) = &state.record.external_id {
                self.external
                    .insert(external_key(new, &state.record.key_id), &[])?;
            }
        }
        Ok(())
    }

    /// Revokes a key: it stops working at once. Durable when this returns.
    pub async fn revoke(&self, key_id: &str) -> Result<bool, StoreError> {
        let Some(entry) = self.lookup_id(key_id)? else {
            return Ok(false);
        };
        {
            let mut cache = self.cache.write();
            let mut state = entry.state.lock();
            if state.revoked {
                return Ok(false);
            }
            state.revoked = true;
            let id = key_id.as_bytes();
            if let Some(hash) = KeyHash::from_hex(&state.record.hash) {
                cache.remove(&hash);
                self.hashes.remove(hash.0)?;
            }
            self.records.remove(id)?;
            self.keys.fetch_sub(1, Ordering::Relaxed);
            self.usage.remove(id)?;
            if let Some(ext) = &state.record.external_id {
                self.external.remove(external_key(ext, key_id))?;
            }
        }
        self.sync().await?;
        Ok(true)
    }

    /// Key ids in id order after `after`: one customer's (`external_id`),
    /// or all.
    pub fn list_ids(
        &self,
        external_id: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let (tree, prefix) = match external_id {
            Some(ext) => (&self.external, external_key(ext, "")),
            None => (&self.records, Vec::new()),
        };
        let mut start = prefix.clone();
        start.extend_from_slice(after.unwrap_or("").as_bytes());
        let mut ids = Vec::new();
        for item in tree.range(start..) {
            let (k, _) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            let id = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            if Some(id.as_str()) == after {
                continue;
            }
            ids.push(id);
            if ids.len() == limit {
                break;
            }
        }
        Ok(ids)
    }

    fn now_secs(&self) -> u64 {
        self.opened.elapsed().as_secs()
    }

    /// Drops from memory the keys nobody has used for `idle`, whose usage is
    /// already written and which no request holds. Their state is in sled,
    /// so the next lookup loads it again. Returns how many were dropped.
    ///
    /// Holding the cache's write lock, an entry whose only owner is the
    /// cache cannot be picked up by anyone meanwhile: lookups wait for the
    /// lock, and every request or dirty-queue slot holds its own `Arc`.
    pub fn evict_idle(&self, idle: std::time::Duration) -> usize {
        let cutoff = self.now_secs().saturating_sub(idle.as_secs());
        let mut cache = self.cache.write();
        let before = cache.len();
        cache.retain(|_, entry| {
            Arc::strong_count(entry) > 1
                || entry.dirty.load(Ordering::Acquire)
                || entry.last_used.load(Ordering::Relaxed) > cutoff
        });
        before - cache.len()
    }

    /// Keys held in memory.
    pub fn cached(&self) -> usize {
        self.cache.read().len()
    }

    /// How many keys exist.
    pub fn key_count(&self) -> usize {
        self.keys.load(Ordering::Relaxed)
    }

    /// Writes every dirty key's usage and fsyncs. A failure marks the store
    /// unhealthy (charges answer 503) until a pass succeeds.
    pub async fn flush_dirty(&self) -> Result<usize, StoreError> {
        let _pass = self.flush_pass.lock().await;
        let batch = std::mem::take(&mut *self.dirty.lock());
        let result = self.write_batch(&batch);
        let result = match result {
            Ok(()) => self.sync().await.map(|()| batch.len()),
            Err(e) => Err(e),
        };
        if result.is_err() {
            // Keep them dirty for the next pass (a duplicate in the queue
            // only means one extra write).
            for entry in &batch {
                entry.dirty.store(true, Ordering::Release);
            }
            self.dirty.lock().extend(batch);
        }
        self.healthy.store(result.is_ok(), Ordering::Release);
        result
    }

    fn write_batch(&self, batch: &[Arc<Entry>]) -> Result<(), StoreError> {
        if self.fail_flushes.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable);
        }
        for entry in batch {
            let state = entry.state.lock();
            entry.dirty.store(false, Ordering::Release);
            if !state.revoked {
                self.usage
                    .insert(state.record.key_id.as_bytes(), to_json(&state.usage))?;
            }
        }
        Ok(())
    }

    /// [`Store::flush_dirty`] for a thread outside any runtime (the last
    /// flush after the server stopped).
    pub fn flush_blocking(&self) -> Result<usize, StoreError> {
        let batch = std::mem::take(&mut *self.dirty.lock());
        self.write_batch(&batch)?;
        self.db.flush()?;
        Ok(batch.len())
    }

    /// Fsyncs everything written so far.
    pub async fn sync(&self) -> Result<(), StoreError> {
        if self.fail_flushes.load(Ordering::Acquire) {
            return Err(StoreError::Unavailable);
        }
        self.db.flush_async().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys;

    fn record(hash: &KeyHash, external: Option<&str>) -> KeyRecord {
        KeyRecord {
            external_id: external.map(str::to_string),
            ..KeyRecord::new(
                keys::generate_id(),
                hash,
                "sk_t",
                "free",
                jiff::Timestamp::UNIX_EPOCH,
            )
        }
    }

    #[tokio::test]
    async fn usage_survives_reopen_after_flush() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = keys::generate("sk_t");
        let id;
        {
            let store = Store::open(dir.path()).expect("open");
            let rec = record(&key.hash, Some("cus_1"));
            id = rec.key_id.clone();
            store
                .create(key.hash, &rec, &Usage::default())
                .await
                .expect("create");
            let entry = store.lookup(&key.hash).expect("read").expect("found");
            entry.lock().expect("live").usage.used = 7;
            store.touch(&entry);
            assert_eq!(store.flush_dirty().await.expect("flush"), 1);
        }
        let store =
            Store::open_waiting(dir.path(), std::time::Duration::from_secs(10)).expect("reopen");
        let entry = store.lookup_id(&id).expect("read").expect("found");
        assert_eq!(entry.lock().expect("live").usage.used, 7);
        assert_eq!(store.list_ids(Some("cus_1"), None, 10).expect("list"), [id]);
    }

    #[tokio::test]
    async fn revoke_removes_the_key_everywhere() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let key = keys::generate("sk_t");
        let rec = record(&key.hash, Some("cus_1"));
        store
            .create(key.hash, &rec, &Usage::default())
            .await
            .expect("create");
        let held = store.lookup(&key.hash).expect("read").expect("found");
        assert!(store.revoke(&rec.key_id).await.expect("revoke"));
        assert!(
            held.lock().is_none(),
            "an entry held across a revoke is dead"
        );
        assert!(store.lookup(&key.hash).expect("read").is_none());
        assert!(store
            .list_ids(Some("cus_1"), None, 10)
            .expect("list")
            .is_empty());
        assert!(!store.revoke(&rec.key_id).await.expect("revoke"));
    }

    #[tokio::test]
    async fn idle_clean_unheld_keys_leave_memory_and_come_back_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let (a, b) = (keys::generate("sk_t"), keys::generate("sk_t"));
        for k in [&a, &b] {
            store
                .create(k.hash, &record(&k.hash, None), &Usage::default())
                .await
                .expect("create");
        }
        let entry = store.lookup(&a.hash).expect("read").expect("found");
        entry.lock().expect("live").usage.used = 42;
        store.touch(&entry);
        drop(entry);
        let held = store.lookup(&b.hash).expect("read").expect("found");
        // Dirty (queued for the flusher) and held entries stay.
        assert_eq!(store.evict_idle(std::time::Duration::ZERO), 0);
        store.flush_dirty().await.expect("flush");
        assert_eq!(store.evict_idle(std::time::Duration::ZERO), 1);
        assert_eq!(store.cached(), 1, "the held key stays");
        let again = store.lookup(&a.hash).expect("read").expect("found");
        assert_eq!(again.lock().expect("live").usage.used, 42);
        drop(held);
    }

    #[tokio::test]
    async fn failed_flush_marks_unhealthy_and_keeps_dirty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let key = keys::generate("sk_t");
        store
            .create(key.hash, &record(&key.hash, None), &Usage::default())
            .await
            .expect("create");
        let entry = store.lookup(&key.hash).expect("read").expect("found");
        store.touch(&entry);
        store.inject_flush_failure(true);
        assert!(store.flush_dirty().await.is_err());
        assert!(!store.healthy());
        store.inject_flush_failure(false);
        assert_eq!(store.flush_dirty().await.expect("flush"), 1);
        assert!(store.healthy());
    }
}
