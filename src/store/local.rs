//! The embedded backend: key records and usage in SQLite, with usage held
//! in memory and written behind.
//!
//! This file holds the in-memory state of each key ([`Entry`]), the cache
//! of them, the write-behind queue and the store's health;
//! [`super::sqlite`] is the database and the one thread that writes it.
//!
//! # Counters
//!
//! Only this process opens the store (it holds an exclusive lock on the
//! `lock` file in the store directory), so the in-memory [`Entry`] of a key
//! is the authority for its usage. A request locks the entry, lets the gate
//! decide and charge, and marks it dirty; no disk write is on the request
//! path. A [`Local::flush_due`] pass (the flusher, every 200 ms) writes the
//! dirty usage of keys not written in the last [`REWRITE_AFTER_MS`] and
//! commits, and [`Local::flush_dirty`] (at shutdown) writes all of it, so a
//! `kill -9` loses at most the charges of that pacing, one pass interval
//! and one commit: well under the second SPEC §7 allows.
//!
//! # Admin writes
//!
//! [`Local::update`] runs the change on a copy of the key's state, commits
//! the copy, and only then applies the change to the live state: a write
//! that fails changes nothing, in memory or on disk. No lock is held while
//! the disk works. While a key's admin write is being committed, the
//! write-behind skips that key, so an older snapshot cannot land after it.
//!
//! # Health
//!
//! A failed write, or less than [`MIN_FREE`] bytes free on the store's
//! filesystem, makes the store unhealthy: charges fail closed with 503
//! until a write-behind pass succeeds with room on the disk again. Usage
//! charged before the failure stays queued and is written then.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard, RwLock};

use super::sqlite::{self, Disk, Outgoing, UsageRow, Write};
use super::{codec, migrate, MakeEvents, StoreError};
use crate::keys::KeyHash;
use crate::ledger::{KeyRecord, Usage};

/// A key's usage is written again by the periodic pass at most this often
/// (see [`Local::flush_due`]): every third pass of the flusher's 200 ms,
/// with room for the passes' jitter. Under traffic spread over many keys
/// nearly every key is due whenever this allows, so the write-behind's work
/// is inversely proportional to it (at 400 ms it was an eighth of the CPU
/// with 10,000 keys in use); a charge is on disk within this, a pass and a
/// commit of being made.
pub const REWRITE_AFTER_MS: u64 = 590;

/// Below this much free space on the store's filesystem, charges fail
/// closed before writes start failing, leaving room for the queued usage.
pub const MIN_FREE: u64 = 1024 * 1024;

/// What a write-behind pass took from memory.
#[derive(Default)]
struct Snapshot {
    rows: Vec<UsageRow>,
    events: Vec<Outgoing>,
    /// Every key taken, to queue again if the write fails.
    taken: Vec<Arc<Entry>>,
    /// Per reported key: the marks its events reached and how many
    /// detected events they took, to apply once they are on disk.
    reported: Vec<(Arc<Entry>, std::collections::BTreeMap<String, u64>, usize)>,
}

#[derive(Clone)]
struct KeyState {
    record: KeyRecord,
    usage: Usage,
    revoked: bool,
    /// An admin write of this key is being committed.
    admin_pending: bool,
    /// Charged since it was loaded (see [`Local::charge`]).
    charged: bool,
}

pub struct Entry {
    state: Mutex<KeyState>,
    dirty: AtomicBool,
    /// Charged since the last reporting pass took it.
    unreported: AtomicBool,
    /// When a lookup last found it, in seconds since the store opened.
    last_used: AtomicU64,
    /// When a pass last took its usage to write, in milliseconds since the
    /// store opened.
    written_ms: AtomicU64,
    /// The `seq` its usage was last written to the usage log with: it may
    /// leave memory once a fold has taken the log that far.
    logged_seq: AtomicU64,
    /// One admin write of this key at a time, held across its commit.
    admin: tokio::sync::Mutex<()>,
}

impl Entry {
    fn new(record: KeyRecord, usage: Usage, now: u64) -> Entry {
        Entry {
            state: Mutex::new(KeyState {
                record,
                usage,
                revoked: false,
                admin_pending: false,
                charged: false,
            }),
            dirty: AtomicBool::new(false),
            unreported: AtomicBool::new(false),
            last_used: AtomicU64::new(now),
            written_ms: AtomicU64::new(0),
            logged_seq: AtomicU64::new(0),
            admin: tokio::sync::Mutex::new(()),
        }
    }

    /// Locks the key. Returns `None` if it was revoked meanwhile.
    fn lock(&self) -> Option<MutexGuard<'_, KeyState>> {
        let guard = self.state.lock();
        (!guard.revoked).then_some(guard)
    }
}

/// Asks the CPU for every cache line of a key's state at once, as soon as
/// the key is found. A request then reads the state's fields one after
/// another (the reference count, the lock, the record, the usage, a
/// window), and with many keys in use each is a cache miss; behind the
/// locked instructions that take the reference and the lock, the CPU
/// would wait for them one at a time. A prefetch never faults, whatever
/// the address; on other processors this does nothing.
#[inline]
fn prefetch(entry: &Arc<Entry>) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // The reference counts come just before the entry.
        let counts = 2 * std::mem::size_of::<usize>();
        let start = Arc::as_ptr(entry).cast::<i8>().wrapping_sub(counts);
        for line in (0..counts + std::mem::size_of::<Entry>()).step_by(64) {
            // SAFETY: SSE, which the instruction needs, is part of every
            // x86_64 processor; a prefetch reads nothing the program sees.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(line)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = entry;
}

/// How many shards the key cache has.
const SHARDS: usize = 32;

/// The keys in memory, in shards by hash, so that requests on different
/// keys rarely wait for the same lock.
struct Cache {
    shards: Vec<RwLock<HashMap<KeyHash, Arc<Entry>, ahash::RandomState>>>,
}

impl Cache {
    fn new() -> Cache {
        Cache {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
        }
    }

    fn shard(&self, hash: &KeyHash) -> &RwLock<HashMap<KeyHash, Arc<Entry>, ahash::RandomState>> {
        // The hash is SHA-256: any byte of it is evenly spread.
        &self.shards[usize::from(hash.0[0]) % SHARDS]
    }
}

pub struct Local {
    disk: Disk,
    dir: PathBuf,
    cache: Cache,
    dirty: Mutex<Vec<Arc<Entry>>>,
    /// Keys charged since the last reporting pass.
    unreported: Mutex<Vec<Arc<Entry>>>,
    /// False after a failed write, or while the disk is (nearly) full:
    /// charges fail closed.
    healthy: Arc<AtomicBool>,
    /// Keys in the store.
    keys: AtomicUsize,
    /// Orders the states written of each key (see [`sqlite`]).
    seq: AtomicU64,
    /// Rows logged with a `seq` up to this are folded into `keys`.
    folded: AtomicU64,
    /// The `seq` handed out as the log now set aside was set aside (every
    /// row in it has a lower one), or 0 when none is: what `folded`
    /// becomes once it is folded.
    aside: AtomicU64,
    /// Counts revocations, so a lookup can tell one raced its read.
    revocations: AtomicU64,
    /// The epoch of `Entry::last_used`.
    opened: std::time::Instant,
    /// One write-behind pass at a time, so a pass that started before a
    /// failure cannot finish after it and mark the store healthy.
    flush_pass: tokio::sync::Mutex<()>,
    /// Held for the store's life: the exclusive lock on the directory.
    _lock: File,
}

pub(super) fn to_json<T: serde::Serialize>(value: &T) -> String {
    // Serialising plain data structs to JSON cannot fail.
    serde_json::to_string(value).unwrap_or_default()
}

fn from_json<T: serde::de::DeserializeOwned>(key_id: &str, text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt {
        key_id: key_id.to_string(),
        reason: e.to_string(),
    })
}

/// Takes the exclusive lock of a store directory (creating both if absent).
/// The lock ends with the returned file, or the process.
pub fn lock_dir(path: &Path) -> Result<File, StoreError> {
    std::fs::create_dir_all(path)?;
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path.join("lock"))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked(path.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => Err(e.into()),
    }
}

impl Local {
    /// Opens the store, waiting up to `max_wait` while another process (or
    /// a just-dropped store) holds its lock.
    pub fn open_waiting(path: &Path, max_wait: std::time::Duration) -> Result<Local, StoreError> {
        let deadline = std::time::Instant::now() + max_wait;
        loop {
            match Local::open(path) {
                Err(e) if e.is_locked() && std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    /// Opens (creating if absent) the store directory.
    pub fn open(path: &Path) -> Result<Local, StoreError> {
        let lock = lock_dir(path)?;
        if migrate::holds_sled(path) && !path.join(sqlite::FILE).exists() {
            return Err(StoreError::NeedsMigration(path.to_path_buf()));
        }
        Local::open_locked(path, lock)
    }

    pub(super) fn open_locked(path: &Path, lock: File) -> Result<Local, StoreError> {
        let healthy = Arc::new(AtomicBool::new(true));
        let (disk, max_seq, keys) = Disk::open(path, healthy.clone())?;
        Ok(Local {
            disk,
            dir: path.to_path_buf(),
            cache: Cache::new(),
            dirty: Mutex::new(Vec::new()),
            unreported: Mutex::new(Vec::new()),
            healthy,
            keys: AtomicUsize::new(keys),
            seq: AtomicU64::new(max_seq + 1),
            folded: AtomicU64::new(max_seq),
            aside: AtomicU64::new(0),
            revocations: AtomicU64::new(0),
            opened: std::time::Instant::now(),
            flush_pass: tokio::sync::Mutex::new(()),
            _lock: lock,
        })
    }

    /// Whether charges can be recorded.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Acquire)
    }

    /// Makes every write fail (or succeed again): for tests of the
    /// fail-closed path.
    #[doc(hidden)]
    pub fn inject_flush_failure(&self, fail: bool) {
        self.disk.inject_failure(fail);
    }

    fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// The key with this hash, loaded into memory on first use.
    pub fn lookup(&self, hash: &KeyHash) -> Result<Option<Arc<Entry>>, StoreError> {
        if let Some(entry) = self.in_memory(hash) {
            return Ok(Some(entry));
        }
        loop {
            let revocations = self.revocations.load(Ordering::Acquire);
            // Unknown keys never take the write lock.
            let Some(row) = self.disk.by_hash(&hash.0)? else {
                return Ok(None);
            };
            let record: KeyRecord = from_json(&row.key_id, &row.record)?;
            let usage = codec::row_usage(&row)?;
            let mut cache = self.cache.shard(hash).write();
            if let Some(entry) = cache.get(hash) {
                return Ok(Some(entry.clone()));
            }
            // A revocation that committed after the read may have been of
            // this key: read again rather than bring it back.
            if self.revocations.load(Ordering::Acquire) != revocations {
                continue;
            }
            // What a loaded key keeps in memory comes from a heap of its
            // own (see `alloc::lasting`): copied there, so that what
            // reading it made and let go of leaves no holes among it.
            let entry = crate::alloc::lasting(|| {
                Arc::new(Entry::new(record.clone(), usage.clone(), self.now_secs()))
            });
            cache.insert(*hash, entry.clone());
            return Ok(Some(entry));
        }
    }

    /// The key with this id, loaded into memory on first use.
    pub fn lookup_id(&self, key_id: &str) -> Result<Option<Arc<Entry>>, StoreError> {
        let Some(hash) = self.disk.hash_of(key_id)? else {
            return Ok(None);
        };
        let hash: [u8; 32] = hash.try_into().map_err(|_| StoreError::Corrupt {
            key_id: key_id.to_string(),
            reason: "bad hash".into(),
        })?;
        self.lookup(&KeyHash(hash))
    }

    /// Marks a key's usage as changed, for the next write-behind pass.
    ///
    /// A busy key is nearly always marked already (a pass takes it a few
    /// times a second), so each flag is read before it is swapped: a read
    /// is not a locked instruction, which would wait for every cache miss
    /// of the request before it (with 10,000 keys in use, many). A flag a
    /// pass cleared after this request's charge reads clear here: the pass
    /// clears it under the key's lock, which the charge took after it.
    fn touch(&self, entry: &Arc<Entry>) {
        if !entry.dirty.load(Ordering::Acquire) && !entry.dirty.swap(true, Ordering::AcqRel) {
            self.dirty.lock().push(entry.clone());
        }
        if !entry.unreported.load(Ordering::Acquire)
            && !entry.unreported.swap(true, Ordering::AcqRel)
        {
            self.unreported.lock().push(entry.clone());
        }
    }

    /// Stores a new key. Durable on disk when this returns.
    pub async fn create(
        &self,
        hash: KeyHash,
        record: &KeyRecord,
        usage: &Usage,
    ) -> Result<(), StoreError> {
        self.disk
            .write(Write::Create {
                key_id: record.key_id.to_string(),
                hash: hash.0,
                external_id: record.external_id.clone(),
                record: to_json(record),
                usage: codec::usage_bytes(usage),
                seq: self.next_seq(),
            })
            .await?;
        self.keys.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Changes a key durably. `change` runs on a copy of the key's state;
    /// the copy is committed; then `change` runs on the live state, which
    /// requests went on charging meanwhile. If the write fails nothing
    /// changes. If `change` refuses the live state (rare: a refill came in
    /// between), the live state becomes the committed copy.
    pub async fn update<E: From<StoreError>>(
        &self,
        entry: &Arc<Entry>,
        change: impl Fn(&mut KeyRecord, &mut Usage) -> Result<(), E>,
    ) -> Result<(), E> {
        let _one_admin_write = entry.admin.lock().await;
        let (write, next) = {
            let mut live = entry.lock().ok_or(StoreError::Gone)?;
            let mut next = live.clone();
            change(&mut next.record, &mut next.usage)?;
            live.admin_pending = true;
            let write = Write::Update {
                key_id: next.record.key_id.to_string(),
                external_id: next.record.external_id.clone(),
                record: to_json(&next.record),
                usage: codec::usage_bytes(&next.usage),
                seq: self.next_seq(),
            };
            (write, next)
        };
        let written = self.disk.write(write).await;
        {
            let mut live = entry.state.lock();
            live.admin_pending = false;
            let live = &mut *live;
            if written.is_ok()
                && !live.revoked
                && change(&mut live.record, &mut live.usage).is_err()
            {
                live.record = next.record;
                live.usage = next.usage;
            }
        }
        self.touch(entry);
        Ok(written?)
    }

    /// Runs `f` on the key's state under its lock and marks the key for the
    /// write-behind. `None` if the key was revoked.
    pub fn charge<T>(
        &self,
        entry: &Arc<Entry>,
        f: impl FnOnce(&KeyRecord, &mut Usage) -> T,
    ) -> Option<T> {
        let out = {
            let mut state = entry.lock()?;
            let state = &mut *state;
            let out = f(&state.record, &mut state.usage);
            if !state.charged {
                // A key's first charge adds its windows and pools to its
                // usage, kept as long as the key is: copied to the keys'
                // heap with the rest of it.
                state.charged = true;
                state.usage = crate::alloc::lasting(|| state.usage.clone());
            }
            out
        };
        self.touch(entry);
        Some(out)
    }

    /// Revokes a key: it stops working at once. Durable when this returns.
    pub async fn revoke(&self, key_id: &str) -> Result<bool, StoreError> {
        let Some(entry) = self.lookup_id(key_id)? else {
            return Ok(false);
        };
        let _one_admin_write = entry.admin.lock().await;
        let hash = {
            let Some(state) = entry.lock() else {
                return Ok(false);
            };
            KeyHash::from_hex(&state.record.hash)
        };
        self.disk
            .write(Write::Delete {
                key_id: key_id.to_string(),
            })
            .await?;
        self.revocations.fetch_add(1, Ordering::AcqRel);
        entry.state.lock().revoked = true;
        if let Some(hash) = hash {
            // A lookup may have loaded it again while the delete committed.
            if let Some(cached) = self.cache.shard(&hash).write().remove(&hash) {
                cached.state.lock().revoked = true;
            }
        }
        self.keys.fetch_sub(1, Ordering::Relaxed);
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
        self.disk.list_ids(external_id, after, limit)
    }

    /// Copies keys from another store; a key id already here is kept as is.
    /// Durable when this returns.
    /// Every key, in id order, `limit` at a time after `after`: `(row,
    /// hash, external id)`.
    pub fn rows_after(
        &self,
        after: &str,
        limit: usize,
    ) -> Result<Vec<sqlite::CopiedKey>, StoreError> {
        self.disk.rows_after(after, limit)
    }

    /// Every outbox event, parked ones included.
    pub fn outbox_all(&self) -> Result<Vec<sqlite::Pending>, StoreError> {
        self.disk.outbox_all()
    }

    pub fn import_blocking(
        &self,
        rows: Vec<(sqlite::Row, KeyHash, Option<String>)>,
    ) -> Result<(), StoreError> {
        let rows = rows
            .into_iter()
            .map(|(row, hash, ext)| (row, hash.0, ext))
            .collect();
        self.disk.write_blocking(Write::Import(rows))
    }

    fn now_secs(&self) -> u64 {
        self.opened.elapsed().as_secs()
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Drops from memory the keys nobody has used for `idle`, whose usage is
    /// already written (and folded: see [`Local::fold`]) and which no
    /// request holds. Their state is in `keys` on disk, so the next lookup
    /// loads it again. Returns how many were dropped.
    ///
    /// Holding a cache shard's write lock, an entry of that shard whose
    /// only owner is the cache cannot be picked up by anyone meanwhile:
    /// lookups wait for the lock, and every request, admin write or
    /// dirty-queue slot holds its own `Arc`.
    pub fn evict_idle(&self, idle: std::time::Duration) -> usize {
        let cutoff = self.now_secs().saturating_sub(idle.as_secs());
        let folded = self.folded.load(Ordering::Acquire);
        let mut dropped = 0;
        for shard in &self.cache.shards {
            let mut cache = shard.write();
            let before = cache.len();
            cache.retain(|_, entry| {
                Arc::strong_count(entry) > 1
                    || entry.dirty.load(Ordering::Acquire)
                    || entry.unreported.load(Ordering::Acquire)
                    || entry.logged_seq.load(Ordering::Acquire) > folded
                    || entry.last_used.load(Ordering::Relaxed) > cutoff
            });
            dropped += before - cache.len();
        }
        dropped
    }

    /// Keys held in memory.
    pub fn cached(&self) -> usize {
        self.cache.shards.iter().map(|s| s.read().len()).sum()
    }

    /// The key with this hash if it is in memory; never reads the disk.
    pub fn in_memory(&self, hash: &KeyHash) -> Option<Arc<Entry>> {
        let entry = {
            let shard = self.cache.shard(hash).read();
            let entry = shard.get(hash)?;
            prefetch(entry);
            entry.clone()
        };
        entry.last_used.store(self.now_secs(), Ordering::Relaxed);
        Some(entry)
    }

    /// How many keys exist.
    pub fn key_count(&self) -> usize {
        self.keys.load(Ordering::Relaxed)
    }

    /// Whether the store's filesystem has [`MIN_FREE`] bytes free.
    fn has_room(&self) -> bool {
        match nix::sys::statvfs::statvfs(&self.dir) {
            Ok(fs) => {
                // The block count's type is narrower than u64 on some targets.
                #[allow(clippy::useless_conversion)]
                let free = u64::from(fs.blocks_available()).saturating_mul(fs.fragment_size());
                free >= MIN_FREE
            }
            // Not knowing is no reason to stop: a write will tell.
            Err(_) => true,
        }
    }

    /// Takes the dirty keys' usage, each under its lock, in the order of
    /// their changes. With `report`, every key charged since the last
    /// reporting pass also goes through it: a key it makes events for, or
    /// whose billing marks it moves, is taken with them at once; a key it
    /// has nothing to say of is written only if it is due anyway (its
    /// usage needs no write for the report's sake). A key whose admin
    /// write is being committed waits for the next pass; with `paced`, so
    /// does a key written less than [`REWRITE_AFTER_MS`] ago.
    fn snapshot(&self, report: Option<MakeEvents<'_>>, paced: bool) -> Snapshot {
        let now_ms = self.now_ms();
        let mut queued = std::mem::take(&mut *self.dirty.lock());
        if report.is_some() {
            queued.append(&mut std::mem::take(&mut *self.unreported.lock()));
            let mut seen = std::collections::HashSet::new();
            queued.retain(|e| seen.insert(Arc::as_ptr(e)));
        }
        // Rows an earlier pass wrote, to write over (see `SpareRows`).
        let (mut spare, rows) = self.disk.spare_rows().take();
        let mut snap = Snapshot {
            rows,
            ..Snapshot::default()
        };
        // Keys left for a later pass, and whether each is still unreported.
        let mut later = Vec::new();
        for entry in queued {
            let recent =
                now_ms.saturating_sub(entry.written_ms.load(Ordering::Relaxed)) < REWRITE_AFTER_MS;
            // A paced pass that does not report leaves a key written
            // recently without taking its lock: most visits of a busy key
            // are such (a pass every 200 ms, a write at most every
            // REWRITE_AFTER_MS), and with many keys in use the lock and
            // the state beside it are a cache miss each.
            if report.is_none() && paced && recent {
                if entry.dirty.load(Ordering::Acquire) {
                    later.push((entry, false));
                }
                continue;
            }
            let state = entry.state.lock();
            if state.admin_pending {
                drop(state);
                later.push((entry, report.is_some()));
                continue;
            }
            // The billing state a report moves, copied only for a report.
            let mut moved = None;
            let mut reports = false;
            if let Some(make) = report {
                if entry.unreported.swap(false, Ordering::AcqRel) && !state.revoked {
                    let mut billing = state.usage.billing.clone();
                    let events = make(&state.record, &state.usage, &mut billing);
                    if !events.is_empty() || billing != state.usage.billing {
                        reports = true;
                        let detected = state.usage.billing.detected.len();
                        snap.events.extend(events);
                        snap.reported
                            .push((entry.clone(), billing.reported.clone(), detected));
                    }
                    moved = Some(billing);
                }
            }
            let dirty = entry.dirty.load(Ordering::Acquire);
            if !reports && (!dirty || (paced && recent)) {
                drop(state);
                if dirty {
                    later.push((entry, false));
                }
                continue;
            }
            entry.written_ms.store(now_ms, Ordering::Relaxed);
            entry.dirty.store(false, Ordering::Release);
            if !state.revoked {
                // Written out here, under the key's lock, rather than
                // cloned and written out later: the bytes are the only copy
                // the pass needs.
                let seq = self.next_seq();
                entry.logged_seq.store(seq, Ordering::Release);
                let mut row = spare.pop().unwrap_or_default();
                row.key_id.clear();
                row.key_id.push_str(&state.record.key_id);
                codec::write_usage(&mut row.usage, &state.usage);
                let billing = moved.as_ref().unwrap_or(&state.usage.billing);
                codec::write_billing(&mut row.billing, billing);
                row.seq = seq;
                snap.rows.push(row);
            }
            drop(state);
            snap.taken.push(entry);
        }
        // Back in the queues they came from: every one is still dirty
        // (bar a key whose admin write is under way), some still unreported.
        self.disk.spare_rows().give_back(spare);
        let unreported = later.iter().filter(|(_, u)| *u).map(|(e, _)| e.clone());
        self.unreported.lock().extend(unreported);
        self.dirty.lock().extend(later.into_iter().map(|(e, _)| e));
        snap
    }

    /// After a write-behind pass: a failure keeps its keys dirty for the
    /// next pass (a duplicate in the queue only means one extra write) and
    /// makes the store unhealthy; a success with room on the disk makes it
    /// healthy again.
    fn settle_pass(&self, result: &Result<(), StoreError>, snap: Snapshot, room: bool) {
        match result {
            Ok(()) => {
                // The events are in the outbox: the live state learns what
                // they reported.
                for (entry, reported, detected) in snap.reported {
                    let mut state = entry.state.lock();
                    let billing = &mut state.usage.billing;
                    for (counter, mark) in reported {
                        let live = billing.reported.entry(counter).or_default();
                        *live = (*live).max(mark);
                    }
                    billing
                        .detected
                        .drain(..detected.min(billing.detected.len()));
                }
                if room && !self.healthy.swap(true, Ordering::AcqRel) {
                    tracing::info!("the store writes again; charges resume");
                }
            }
            Err(_) => {
                for entry in &snap.taken {
                    entry.dirty.store(true, Ordering::Release);
                    entry.unreported.store(true, Ordering::Release);
                }
                self.unreported.lock().extend(snap.taken.iter().cloned());
                self.dirty.lock().extend(snap.taken);
                self.healthy.store(false, Ordering::Release);
            }
        }
    }

    /// Checks the room on the disk before a pass: too little fails charges
    /// closed at once, while the queued usage can still be written.
    fn check_room(&self) -> bool {
        let room = self.has_room();
        if !room && self.healthy.swap(false, Ordering::AcqRel) {
            tracing::error!(
                dir = %self.dir.display(),
                min_free = MIN_FREE,
                "the store's disk is nearly full; charges fail closed until there is room"
            );
        }
        room
    }

    /// Writes every dirty key's usage and commits. Returns how many keys
    /// were written. See the module's "Health" for what a failure does.
    pub async fn flush_dirty(&self) -> Result<usize, StoreError> {
        self.pass(None, false).await.map(|(written, _)| written)
    }

    /// The flusher's periodic pass: like [`Local::flush_dirty`], but a key
    /// written less than [`REWRITE_AFTER_MS`] ago waits for a later pass.
    /// A busy key is then written a few times a second, not every pass,
    /// and a charge is still on disk within `REWRITE_AFTER_MS` plus one
    /// pass interval and a commit (SPEC §7 allows a second).
    pub async fn flush_due(&self) -> Result<usize, StoreError> {
        self.pass(None, true).await.map(|(written, _)| written)
    }

    /// A write-behind pass that also reports: every key charged since the
    /// last such pass goes through `make`, and the events it makes go to
    /// the outbox in the same transaction as the usage they come from.
    /// A key it has nothing to say of is written at the flusher's pace
    /// ([`Local::flush_due`]). Returns the events written.
    pub async fn report(&self, make: MakeEvents<'_>) -> Result<usize, StoreError> {
        self.pass(Some(make), true).await.map(|(_, events)| events)
    }

    async fn pass(
        &self,
        report: Option<MakeEvents<'_>>,
        paced: bool,
    ) -> Result<(usize, usize), StoreError> {
        let _pass = self.flush_pass.lock().await;
        let room = self.check_room();
        let mut snap = self.snapshot(report, paced);
        let (written, events) = (snap.rows.len(), snap.events.len());
        let result = if snap.rows.is_empty() && snap.events.is_empty() {
            Ok(())
        } else {
            let rows = std::mem::take(&mut snap.rows);
            let events = std::mem::take(&mut snap.events);
            self.disk.write(Write::Usage { rows, events }).await
        };
        self.settle_pass(&result, snap, room);
        result.map(|()| (written, events))
    }

    /// The batch of `sink` to send next: the one already under way (its id
    /// kept across retries and restarts), or a new one of at most `max` of
    /// the oldest events, whose id is on disk before it is returned.
    pub async fn outbox_batch(
        &self,
        sink: &'static str,
        max: usize,
    ) -> Result<Option<sqlite::Batch>, StoreError> {
        if let Some(batch) = self.disk.outbox_batch(sink)? {
            return Ok(Some(batch));
        }
        let events = self.disk.outbox_unbatched(sink, max)?;
        if events.is_empty() {
            return Ok(None);
        }
        let id = crate::keys::random_id("batch");
        let (seqs, events): (Vec<i64>, Vec<String>) = events.into_iter().unzip();
        self.disk
            .write(Write::Batch {
                sink,
                batch: id.clone(),
                seqs,
            })
            .await?;
        Ok(Some(sqlite::Batch { id, events }))
    }

    /// A batch was delivered: its events leave the outbox.
    pub async fn outbox_delivered(
        &self,
        sink: &'static str,
        batch: &str,
    ) -> Result<(), StoreError> {
        self.disk
            .write(Write::Delivered {
                sink,
                batch: batch.to_string(),
            })
            .await
    }

    pub fn outbox_stats(&self, sink: &str) -> Result<sqlite::OutboxStats, StoreError> {
        self.disk.outbox_stats(sink)
    }

    /// The oldest events of `sink` waiting to be sent one by one:
    /// `(id, event)`.
    pub fn outbox_next(&self, sink: &str, max: usize) -> Result<Vec<(String, String)>, StoreError> {
        Ok(self
            .disk
            .outbox_unbatched(sink, max)?
            .into_iter()
            .filter_map(|(_, event)| {
                let id = serde_json::from_str::<serde_json::Value>(&event).ok()?["identifier"]
                    .as_str()?
                    .to_string();
                Some((id, event))
            })
            .collect())
    }

    /// Events of `sink` sent one by one: they leave the outbox.
    pub async fn outbox_sent(
        &self,
        sink: &'static str,
        ids: Vec<String>,
    ) -> Result<(), StoreError> {
        self.disk.write(Write::Sent { sink, ids }).await
    }

    /// An event `sink` refuses for good: parked until an operator retries it.
    pub async fn outbox_park(
        &self,
        sink: &'static str,
        id: &str,
        reason: &str,
    ) -> Result<(), StoreError> {
        self.disk
            .write(Write::Park {
                sink,
                id: id.to_string(),
                reason: reason.to_string(),
            })
            .await
    }

    /// Parked events of `sink`: `(id, reason, event)`.
    pub fn outbox_parked(
        &self,
        sink: &str,
        limit: usize,
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        self.disk.outbox_parked(sink, limit)
    }

    /// Puts parked events (these ids, or all) back in the queue.
    pub async fn outbox_unpark(&self, ids: Option<Vec<String>>) -> Result<(), StoreError> {
        self.disk.write(Write::Unpark { ids }).await
    }

    /// Folds the usage log into the keys' rows (see [`sqlite`]'s "Usage
    /// log"), a log set aside first. Keys written before it may then leave
    /// memory.
    pub async fn fold(&self) -> Result<(), StoreError> {
        let upto = self.behind_the_passes(Write::Fold).await?;
        self.folded.fetch_max(upto, Ordering::AcqRel);
        Ok(())
    }

    /// Queues `write` (a fold, or setting the log aside) behind every row
    /// logged so far and waits for it; returns a `seq` higher than all of
    /// theirs. Every such row came from a pass that has finished (they
    /// take the same lock), with a `seq` handed out before this one, and
    /// is on disk ahead of `write`. The lock is not held while the writer
    /// works: passes go on, committed between a fold's steps.
    async fn behind_the_passes(&self, write: Write) -> Result<u64, StoreError> {
        let (upto, done) = {
            let _pass = self.flush_pass.lock().await;
            (self.next_seq(), self.disk.queue(write)?)
        };
        done.await?;
        Ok(upto)
    }

    /// Sets the usage log aside for [`Local::fold_aside`]; the passes go
    /// on in a new one. A log still aside (its fold failed) stays, with
    /// the mark it was set aside with.
    pub async fn set_aside(&self) -> Result<(), StoreError> {
        let upto = self.behind_the_passes(Write::SetAside).await?;
        let _ = self
            .aside
            .compare_exchange(0, upto, Ordering::AcqRel, Ordering::Acquire);
        Ok(())
    }

    /// Folds the log [`Local::set_aside`] set aside into the keys' rows,
    /// but for keys the passes have logged again since (see [`sqlite`]'s
    /// "Usage log"). Keys last written before it was set aside may then
    /// leave memory: a key left out was logged again, with a later `seq`.
    pub async fn fold_aside(&self) -> Result<(), StoreError> {
        self.disk.write(Write::FoldAside).await?;
        let upto = self.aside.swap(0, Ordering::AcqRel);
        self.folded.fetch_max(upto, Ordering::AcqRel);
        Ok(())
    }

    /// [`Local::flush_dirty`] and [`Local::fold`] for a thread outside any
    /// runtime (the last flush after the server stopped).
    pub fn flush_blocking(&self) -> Result<usize, StoreError> {
        tokio::runtime::Builder::new_current_thread()
            .build()?
            .block_on(async {
                let written = self.flush_dirty().await?;
                self.fold().await?;
                Ok(written)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys;
    use crate::window::Window;

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
        let (id, window);
        {
            let store = Local::open(dir.path()).expect("open");
            let rec = record(&key.hash, Some("cus_1"));
            id = rec.key_id.clone();
            store
                .create(key.hash, &rec, &Usage::default())
                .await
                .expect("create");
            let entry = store.lookup(&key.hash).expect("read").expect("found");
            {
                let mut state = entry.lock().expect("live");
                state.usage.used = 7;
                let requests = state.usage.rate.slot("requests");
                for t in 0..5 {
                    requests.add(2, 60_000, 1_000 + t * 1_500);
                }
                window = requests.clone();
            }
            store.touch(&entry);
            assert_eq!(store.flush_dirty().await.expect("flush"), 1);
            // Dropped without a fold, as by kill -9: the usage is in the
            // log only.
        }
        assert_eq!(logged(dir.path()), 1);
        let store =
            Local::open_waiting(dir.path(), std::time::Duration::from_secs(10)).expect("reopen");
        assert_eq!(logged(dir.path()), 0, "opening folds the log");
        let entry = store.lookup_id(&id).expect("read").expect("found");
        let state = entry.lock().expect("live");
        assert_eq!(state.usage.used, 7);
        // Written in the binary form, read back the same.
        assert_eq!(state.usage.rate.get("requests"), Some(&window));
        drop(state);
        assert_eq!(store.list_ids(Some("cus_1"), None, 10).expect("list"), [id]);
    }

    /// A store of schema 7 holds usage and billing as JSON text: this
    /// build reads it, and writes the key back in the binary form.
    #[tokio::test]
    async fn json_usage_of_an_earlier_build_reads_and_is_written_back_binary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = keys::generate("sk_t");
        let rec = record(&key.hash, None);
        {
            let store = Local::open(dir.path()).expect("open");
            store
                .create(key.hash, &rec, &Usage::default())
                .await
                .expect("create");
        }
        let db = || rusqlite::Connection::open(dir.path().join(sqlite::FILE)).expect("open");
        db().execute(
            "UPDATE keys SET usage = ?2, billing = ?3 WHERE key_id = ?1",
            rusqlite::params![
                rec.key_id.as_str(),
                r#"{"remaining":5,"used":4,"overage":0,"rate":{"requests":{"width_ms":1000,"v":3,"b":"AQIC"}}}"#,
                r#"{"credits":4,"reported":{"credits":3}}"#,
            ],
        )
        .expect("write the row as schema 7 did");
        db().execute_batch("PRAGMA user_version = 7")
            .expect("version");
        let form = || -> (String, String) {
            db().query_row(
                "SELECT typeof(usage), typeof(billing) FROM keys WHERE key_id = ?1",
                [rec.key_id.as_str()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .expect("row")
        };
        assert_eq!(form(), ("text".into(), "text".into()));
        {
            let store = Local::open(dir.path()).expect("open a schema 7 store");
            let entry = store.lookup(&key.hash).expect("read").expect("found");
            {
                let mut state = entry.lock().expect("live");
                assert_eq!((state.usage.remaining, state.usage.used), (Some(5), 4));
                assert_eq!(state.usage.rate.get("requests").map(Window::units), Some(2));
                assert_eq!(state.usage.billing.unreported("credits", 4), 1);
                state.usage.used = 5;
            }
            store.touch(&entry);
            store.flush_dirty().await.expect("flush");
            store.fold().await.expect("fold");
        }
        assert_eq!(form(), ("blob".into(), "blob".into()));
        let store = Local::open(dir.path()).expect("reopen");
        let entry = store.lookup(&key.hash).expect("read").expect("found");
        let state = entry.lock().expect("live");
        assert_eq!((state.usage.remaining, state.usage.used), (Some(5), 5));
        assert_eq!(state.usage.rate.get("requests").map(Window::units), Some(2));
        assert_eq!(state.usage.billing.reported.get("credits"), Some(&3));
        let version: i64 = db()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, 8);
    }

    /// Rows in the store's usage log.
    fn logged(dir: &Path) -> i64 {
        rusqlite::Connection::open(dir.join(sqlite::FILE))
            .expect("open the database")
            .query_row("SELECT count(*) FROM usage_log", [], |r| r.get(0))
            .expect("count")
    }

    #[tokio::test]
    async fn a_fold_never_puts_back_a_state_older_than_an_admin_write() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = keys::generate("sk_t");
        {
            let store = Local::open(dir.path()).expect("open");
            store
                .create(key.hash, &record(&key.hash, None), &Usage::default())
                .await
                .expect("create");
            let entry = store.lookup(&key.hash).expect("read").expect("found");
            for used in [1, 2] {
                entry.lock().expect("live").usage.used = used;
                store.touch(&entry);
                store.flush_dirty().await.expect("flush");
            }
            // A grant after the charges were logged: its row is newer
            // than anything in the log.
            store
                .update(&entry, |_, usage| {
                    usage.remaining = Some(100);
                    Ok::<_, StoreError>(())
                })
                .await
                .expect("grant");
            assert_eq!(logged(dir.path()), 2);
            store.fold().await.expect("fold");
            assert_eq!(logged(dir.path()), 0);
        }
        let store =
            Local::open_waiting(dir.path(), std::time::Duration::from_secs(10)).expect("reopen");
        let entry = store.lookup(&key.hash).expect("read").expect("found");
        let state = entry.lock().expect("live");
        assert_eq!((state.usage.used, state.usage.remaining), (2, Some(100)));
    }

    #[test]
    fn a_store_a_newer_build_wrote_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(Local::open(dir.path()).expect("open"));
        rusqlite::Connection::open(dir.path().join(sqlite::FILE))
            .expect("open the database")
            .execute_batch("PRAGMA user_version = 99")
            .expect("mark it newer");
        let refused = Local::open_waiting(dir.path(), std::time::Duration::from_secs(10));
        let err = refused.err().expect("refused").to_string();
        assert!(err.contains("written by a newer tollgate"), "{err}");
    }

    /// A loaded key, and after its first charge the windows and pools that
    /// charge added, are copied into the keys' heap: what a worker keeps
    /// for as long as the key stays loaded is not among its requests'
    /// blocks (see `alloc::lasting`).
    #[tokio::test]
    async fn a_loaded_and_charged_key_lives_in_the_keys_heap() {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = keys::generate("sk_t");
        {
            let store = Local::open(dir.path()).expect("open");
            let rec = record(&key.hash, None);
            store
                .create(key.hash, &rec, &Usage::default())
                .await
                .expect("create");
        }
        let store = Local::open(dir.path()).expect("reopen");
        let entry = store.lookup(&key.hash).expect("read").expect("found");
        assert!(crate::alloc::in_lasting_heap(Arc::as_ptr(&entry)));
        store
            .charge(&entry, |_, usage| {
                usage.rate.slot("requests").add(1, 60_000, 0);
            })
            .expect("live");
        let state = entry.lock().expect("live");
        let window = state.usage.rate.get("requests").expect("charged");
        // The window sits in its map's buffer, made by the charge.
        assert!(crate::alloc::in_lasting_heap(std::ptr::from_ref(window)));
    }

    #[tokio::test]
    async fn revoke_removes_the_key_everywhere() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Local::open(dir.path()).expect("open");
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
        let (store, a, b) = two_keys(dir.path()).await;
        let entry = store.lookup(&a.hash).expect("read").expect("found");
        entry.lock().expect("live").usage.used = 42;
        store.touch(&entry);
        drop(entry);
        let held = store.lookup(&b.hash).expect("read").expect("found");
        // Dirty (queued for the flusher), unreported and held entries stay.
        assert_eq!(store.evict_idle(std::time::Duration::ZERO), 0);
        store.flush_dirty().await.expect("flush");
        assert_eq!(store.evict_idle(std::time::Duration::ZERO), 0);
        store.report(&|_, _, _| Vec::new()).await.expect("report");
        // Its usage is in the log, not yet in its row: it stays until a
        // fold has put it there.
        assert_eq!(store.evict_idle(std::time::Duration::ZERO), 0);
        store.fold().await.expect("fold");
        assert_eq!(store.evict_idle(std::time::Duration::ZERO), 1);
        assert_eq!(store.cached(), 1, "the held key stays");
        let again = store.lookup(&a.hash).expect("read").expect("found");
        assert_eq!(again.lock().expect("live").usage.used, 42);
        drop(held);
    }

    /// The fold of a log set aside leaves out a key logged again since
    /// (the new log holds a newer state): its row keeps what it held, and
    /// the key stays in memory until a fold has its newest state in its
    /// row. A key not logged again is folded and may leave memory.
    #[tokio::test]
    async fn a_key_logged_again_after_its_log_was_set_aside_waits_for_the_next_fold() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, a, b) = two_keys(dir.path()).await;
        let charge = |hash: &KeyHash, used: u64| {
            let entry = store.lookup(hash).expect("read").expect("found");
            entry.lock().expect("live").usage.used = used;
            store.touch(&entry);
        };
        let log = || async {
            store.flush_dirty().await.expect("flush");
            store.report(&|_, _, _| Vec::new()).await.expect("report");
        };
        let in_row = |hash: &KeyHash| -> u64 {
            let row = store.disk.by_hash(&hash.0).expect("read").expect("row");
            codec::row_usage(&row).expect("usage").used
        };
        charge(&a.hash, 1);
        charge(&b.hash, 1);
        log().await;
        store.set_aside().await.expect("set aside");
        charge(&a.hash, 2);
        log().await;

        store.fold_aside().await.expect("fold aside");
        assert_eq!((in_row(&a.hash), in_row(&b.hash)), (0, 1));
        assert_eq!(store.evict_idle(std::time::Duration::ZERO), 1, "b leaves");
        assert_eq!(
            store.cached(),
            1,
            "a stays: its newest state is only logged"
        );
        assert_eq!(
            store
                .lookup(&a.hash)
                .expect("read")
                .expect("found")
                .lock()
                .expect("live")
                .usage
                .used,
            2
        );

        store.fold().await.expect("fold");
        assert_eq!(in_row(&a.hash), 2);
        assert_eq!(store.evict_idle(std::time::Duration::ZERO), 1, "a leaves");
        for (k, used) in [(&a, 2), (&b, 1)] {
            let entry = store.lookup(&k.hash).expect("read").expect("found");
            assert_eq!(entry.lock().expect("live").usage.used, used);
        }
    }

    /// A store in `dir` with two keys in it.
    async fn two_keys(dir: &Path) -> (Local, keys::NewKey, keys::NewKey) {
        let store = Local::open(dir).expect("open");
        let (a, b) = (keys::generate("sk_t"), keys::generate("sk_t"));
        for k in [&a, &b] {
            store
                .create(k.hash, &record(&k.hash, None), &Usage::default())
                .await
                .expect("create");
        }
        (store, a, b)
    }

    /// A store in `dir` with one key in it.
    async fn one_key(dir: &Path) -> (Local, KeyHash) {
        let store = Local::open(dir).expect("open");
        let key = keys::generate("sk_t");
        store
            .create(key.hash, &record(&key.hash, None), &Usage::default())
            .await
            .expect("create");
        (store, key.hash)
    }

    /// A pass writes its rows over those of the pass before (their
    /// strings kept by the writer): nothing of a longer row written before
    /// is left in a shorter one, of its usage, billing or key id.
    #[tokio::test]
    async fn a_pass_writes_over_the_rows_of_the_pass_before() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (long, short) = (keys::generate("sk_t"), keys::generate("sk_t"));
        let mut ids = Vec::new();
        let window;
        {
            let store = Local::open(dir.path()).expect("open");
            for key in [&long, &short] {
                let rec = record(&key.hash, None);
                ids.push(rec.key_id.clone());
                store
                    .create(key.hash, &rec, &Usage::default())
                    .await
                    .expect("create");
            }
            let entry = store.lookup(&long.hash).expect("read").expect("found");
            {
                let mut state = entry.lock().expect("live");
                state.usage.used = 123_456_789;
                let requests = state.usage.rate.slot("requests");
                for t in 0..60u32 {
                    requests.add(u64::from(t) + 1, 60_000, i64::from(t) * 1_000);
                }
                window = requests.clone();
                state.usage.billing.credits = 123_456_789;
            }
            store.touch(&entry);
            assert_eq!(store.flush_dirty().await.expect("flush"), 1);
            let (spare, list) = store.disk.spare_rows().take();
            assert_eq!((spare.len(), list.len()), (1, 0), "kept by the writer");
            store.disk.spare_rows().give_back(spare);

            let entry = store.lookup(&short.hash).expect("read").expect("found");
            entry.lock().expect("live").usage.used = 1;
            store.touch(&entry);
            assert_eq!(store.flush_dirty().await.expect("flush"), 1);
            // Dropped without a fold: both rows are in the log only.
        }
        assert_eq!(logged(dir.path()), 2);
        let store =
            Local::open_waiting(dir.path(), std::time::Duration::from_secs(10)).expect("reopen");
        let entry = store.lookup_id(&ids[1]).expect("read").expect("found");
        let state = entry.lock().expect("live");
        assert_eq!(state.usage.used, 1);
        assert!(state.usage.rate.is_empty());
        assert_eq!(state.usage.billing, crate::ledger::Billing::default());
        drop(state);
        let entry = store.lookup_id(&ids[0]).expect("read").expect("found");
        let state = entry.lock().expect("live");
        assert_eq!(state.usage.used, 123_456_789);
        assert_eq!(state.usage.billing.credits, 123_456_789);
        assert_eq!(state.usage.rate.get("requests"), Some(&window));
    }

    /// A reporting pass writes a key it makes events for, or whose marks
    /// it moves, at once; a key it has nothing to say of waits for the
    /// flusher's pace like any other.
    #[tokio::test]
    async fn a_report_with_nothing_to_say_leaves_writing_to_the_flusher() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, hash) = one_key(dir.path()).await;
        let entry = store.lookup(&hash).expect("read").expect("found");
        // Charged, and written so lately that the pacing holds it back.
        let charge = |used: u64| {
            entry.lock().expect("live").usage.used = used;
            store.touch(&entry);
            entry.written_ms.store(u64::MAX, Ordering::Relaxed);
        };
        charge(1);
        let nothing = |_: &KeyRecord, _: &Usage, _: &mut crate::ledger::Billing| Vec::new();
        assert_eq!(store.report(&nothing).await.expect("report"), 0);
        assert!(entry.dirty.load(Ordering::Acquire), "left for the flusher");
        assert!(!entry.unreported.load(Ordering::Acquire), "and reported");
        assert_eq!(store.flush_due().await.expect("flush"), 0, "still paced");
        assert_eq!(store.flush_dirty().await.expect("flush"), 1);

        charge(2);
        let raise = |_: &KeyRecord, _: &Usage, billing: &mut crate::ledger::Billing| {
            billing.reported.insert("credits".into(), 2);
            Vec::new()
        };
        assert_eq!(store.report(&raise).await.expect("report"), 0);
        assert!(
            !entry.dirty.load(Ordering::Acquire),
            "written with its marks"
        );
        assert_eq!(
            entry.lock().expect("live").usage.billing.reported["credits"],
            2
        );
        // On disk too: read back once it has left memory.
        drop(entry);
        store.fold().await.expect("fold");
        assert_eq!(store.evict_idle(std::time::Duration::ZERO), 1);
        let again = store.lookup(&hash).expect("read").expect("found");
        let state = again.lock().expect("live");
        assert_eq!(state.usage.used, 2);
        assert_eq!(state.usage.billing.reported["credits"], 2);
    }

    #[tokio::test]
    async fn failed_flush_marks_unhealthy_and_keeps_dirty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, hash) = one_key(dir.path()).await;
        let entry = store.lookup(&hash).expect("read").expect("found");
        store.touch(&entry);
        store.inject_flush_failure(true);
        assert!(store.flush_dirty().await.is_err());
        assert!(!store.healthy());
        store.inject_flush_failure(false);
        assert_eq!(store.flush_dirty().await.expect("flush"), 1);
        assert!(store.healthy());
    }
}
