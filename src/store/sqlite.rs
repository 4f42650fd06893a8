//! The embedded store's disk: one SQLite database in WAL mode, written by
//! one thread.
//!
//! # Why one writer thread
//!
//! Every write (a key created, changed or revoked, a write-behind batch of
//! usage) is a [`Write`] sent to the writer thread, which owns the only
//! writing connection. It takes whatever has queued up, applies it in one
//! transaction and commits once (one fsync for the whole group), then
//! answers each sender. Nothing else writes, so there is no lock order to
//! get wrong: async tasks never block on I/O (they await the answer), and
//! no key lock is ever held while the disk works.
//!
//! # Faults
//!
//! SQLite's answer to a full disk or an I/O error is an error for that
//! transaction, which is rolled back whole; the database stays usable and
//! the next transaction may succeed once space is back. A failed group fails
//! every write in it (their callers hear 503 and nothing was changed) and
//! marks the store unhealthy; the flusher decides when it is healthy again.
//!
//! # Layout
//!
//! One table, `keys`: `key_id` (primary key), `hash` (the key's SHA-256,
//! unique), `external_id` (indexed with `key_id`, for listing a customer's
//! keys), `record` (JSON of [`crate::ledger::KeyRecord`]), `usage` and
//! `billing` ([`crate::ledger::Usage`] and its billing state, in the
//! binary form of [`super::codec`], or JSON in rows written before it),
//! and `seq`, the order in which the in-memory
//! states were taken: a write carrying an older `seq` than the row's never
//! overwrites it, so writes queued in any order leave the newest state.
//! `outbox` holds billing events until their sink has them.
//!
//! # Usage log
//!
//! Under load spread over many keys nearly every charge is a key written
//! by the next write-behind pass, and rewriting those rows in place dirties
//! a page of `keys` for nearly every key (keys charged together are spread
//! over the whole table). So a pass appends its rows to `usage_log`
//! instead, which packs them into as few pages as their bytes need, and
//! every few seconds one [`Write::SetAside`] sets the log aside (passes go
//! on in a new one) and a [`Write::FoldAside`] a second later lists each
//! logged key's newest state and writes it into `keys` (once per key,
//! however often it was logged), both a bounded amount a transaction, and
//! drops the log it set aside. A key the new log holds by then is left
//! out: that log holds a newer state of it, and its own fold writes it (or
//! leaves it to the next log, if the key is logged there again). A key in
//! use is logged again within a pass of [`crate::store::local::REWRITE_AFTER_MS`],
//! so a fold writes the rows of keys that went idle, not those of every
//! key in use: with 10,000 keys in use spread over 1,000,000, a fold
//! wrote 10,000 pages of `keys` all over the table, each into the
//! write-ahead log and back, for keys whose next state was already logged.
//! A [`Write::Fold`] (at exit, opening, in tests) does both at once and
//! leaves nothing logged. The writes queued
//! meanwhile are committed between two of its transactions, so they wait
//! for one step of a fold, not for all of it. Opening the store folds
//! first (a log set aside, then the other), so after a crash the log is in
//! `keys` before anything is read. The log has no index: a key's row in
//! `keys` is read only when the key is not in memory, and a key leaves
//! memory only once its last logged state has been folded
//! ([`crate::store::local::Local::evict_idle`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, LazyLock};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};
use tokio::sync::oneshot;

use super::StoreError;

/// The database file inside the store directory.
pub const FILE: &str = "tollgate.sqlite3";

/// Writes that queue up while a group commits go in the next group, up to
/// this many.
const MAX_GROUP: usize = 512;

/// How long a connection waits for another one's lock (a reader during a
/// checkpoint) before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The schema version this build writes (`PRAGMA user_version`). 3: usage
/// may hold windows in a compact JSON form (`v` 2), which builds that
/// know 2 cannot read. 4: the latest usage of a key may be in
/// `usage_log` (see "Usage log"), which builds that know 3 would not
/// fold. 5: windows may be in the packed compact form (`v` 3). 6: logged
/// usage may be in `usage_log_folding` (a fold under way when the process
/// stopped), which builds that know 5 would not fold. 7: opening reads
/// the highest `seq` from `meta`, which builds that know 6 would not keep.
/// 8: usage and billing may be in the binary form ([`super::codec`]),
/// which builds that know 7 cannot read.
const SCHEMA_VERSION: i64 = 8;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS keys (
    key_id      TEXT PRIMARY KEY NOT NULL,
    hash        BLOB NOT NULL UNIQUE,
    external_id TEXT,
    record      TEXT NOT NULL,
    usage       TEXT NOT NULL,
    seq         INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS keys_by_external ON keys (external_id, key_id)
    WHERE external_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS outbox (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    sink       TEXT NOT NULL,
    id         TEXT NOT NULL,
    event      TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    batch      TEXT,
    parked     TEXT,
    UNIQUE (sink, id)
);
CREATE INDEX IF NOT EXISTS outbox_by_batch ON outbox (sink, batch);
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
) WITHOUT ROWID;
";

/// `meta`'s `seq`: at least every `seq` written to `keys` or the usage
/// log, raised in the transaction of each write that uses one, so that
/// opening reads it rather than scanning every key's row (with 1,000,000
/// keys that scan was most of a start-up, and grew with their usage).
const KEEP_SEQ: &str = "
INSERT INTO meta (name, value) VALUES ('seq', ?1)
    ON CONFLICT (name) DO UPDATE SET value = max(value, excluded.value)
";

/// The usage log (see "Usage log"); also made again by each fold.
const USAGE_LOG: &str = "
CREATE TABLE IF NOT EXISTS usage_log (
    key_id  TEXT NOT NULL,
    usage   TEXT NOT NULL,
    billing TEXT NOT NULL,
    seq     INTEGER NOT NULL
);
";

/// Folding the usage log into `keys`: each logged key's newest entry (rows
/// are appended in `seq` order, so the highest rowid), unless the row
/// holds a newer state of it (the rule every write to `keys` follows) or
/// the log the passes write now holds the key (`fold_skip`: a newer state,
/// which that log's fold writes). The log was set aside as
/// `usage_log_folding` by [`set_aside`] (a [`Write::SetAside`], a fold that
/// did not finish, or the fold's own first step), and a new one started
/// for the passes to come. [`FOLD_LIST`] then reads the
/// set-aside log [`FOLD_ROWS`] rows at a time into a list of each logged
/// key's newest row by key id, and [`FOLD_FIND`] looks each listed key up
/// in `keys` once, in key id order, [`FOLD_ROWS`] keys at a time, into a
/// list by the key's row in `keys`, so each [`FOLD_STEP`] of
/// [`FOLD_BATCH`] keys, taken in that order, rewrites a run of
/// neighbouring pages rather than pages all over the table. The last step
/// drops the folded log whole ([`FOLD_END`]; deleting its rows one by one
/// took longer than the fold's writes). A logged key since deleted is not
/// found (its rows go with the log).
const FOLD_LISTING: &str = "
DROP TABLE IF EXISTS temp.fold_skip;
CREATE TEMP TABLE fold_skip (key_id TEXT PRIMARY KEY) WITHOUT ROWID;
INSERT OR IGNORE INTO temp.fold_skip (key_id) SELECT key_id FROM usage_log;
DROP TABLE IF EXISTS temp.fold_logged;
CREATE TEMP TABLE fold_logged (key_id TEXT PRIMARY KEY, newest INTEGER NOT NULL) WITHOUT ROWID;
DROP TABLE IF EXISTS temp.fold_newest;
CREATE TEMP TABLE fold_newest (krow INTEGER PRIMARY KEY, newest INTEGER NOT NULL);
";

/// Log rows `?1` (exclusive) to `?2` (inclusive) into the list by key id.
/// A busy key is logged every few passes, so a fold's log holds it many
/// times over: looking it up in `keys` once per key, after the listing,
/// rather than once per [`FOLD_ROWS`] rows that hold it, took a fold of
/// 10,000 keys spread over 1,000,000 (25 rows each) from 0.36 s to 0.19 s
/// of listing (BENCHMARKS.md). Grouping the rows first (a sort) cost more
/// than it saved.
const FOLD_LIST: &str = "
INSERT INTO temp.fold_logged (key_id, newest)
    SELECT key_id, rowid FROM usage_log_folding WHERE rowid > ?1 AND rowid <= ?2
        AND key_id NOT IN temp.fold_skip
    ON CONFLICT (key_id) DO UPDATE SET newest = max(newest, excluded.newest)
";

/// Up to `?2` listed keys after key id `?1`, found in `keys`, into the
/// list by the key's row.
const FOLD_FIND: &str = "
INSERT INTO temp.fold_newest (krow, newest)
    SELECT k.rowid, n.newest
    FROM (SELECT key_id, newest FROM temp.fold_logged WHERE key_id > ?1
          ORDER BY key_id LIMIT ?2) AS n
        JOIN keys AS k ON k.key_id = n.key_id
    WHERE true
    ON CONFLICT (krow) DO UPDATE SET newest = max(newest, excluded.newest)
";

/// Listed keys whose rows are `?1` (exclusive) to `?2` (inclusive). A
/// key deleted after it was listed may have left its row's number to a
/// key created since (SQLite reuses the highest); the key's id tells them
/// apart. The `IN` has each listed row looked up by its number: with only
/// `keys.rowid = n.krow`, SQLite carries the list's range over to `keys`
/// and reads every row between the step's first and last, which for keys
/// in use spread over a large store is most of the table each step (10,000
/// keys spread over 1,000,000 cost 2.7-4.3 us of the writer's time a
/// request against 1.0 for 10,000 neighbouring ones, BENCHMARKS.md).
const FOLD_STEP: &str = "
UPDATE keys SET
    usage = iif(keys.seq < l.seq, l.usage, keys.usage),
    seq = max(keys.seq, l.seq),
    billing = iif(keys.billing_seq < l.seq, l.billing, keys.billing),
    billing_seq = max(keys.billing_seq, l.seq)
FROM (SELECT krow, newest FROM temp.fold_newest WHERE krow > ?1 AND krow <= ?2) AS n
    JOIN usage_log_folding AS l ON l.rowid = n.newest
WHERE keys.rowid IN (SELECT krow FROM temp.fold_newest WHERE krow > ?1 AND krow <= ?2)
    AND keys.rowid = n.krow AND keys.key_id = l.key_id
    AND (keys.seq < l.seq OR keys.billing_seq < l.seq)
";

/// The folded log is all in `keys`.
const FOLD_END: &str = "
DROP TABLE usage_log_folding;
DROP TABLE temp.fold_skip;
DROP TABLE temp.fold_logged;
DROP TABLE temp.fold_newest;
";

/// Keys a fold writes in one transaction, and log rows it lists (or
/// listed keys it finds) in one.
/// With many keys in use a whole fold is long (in one transaction, 10,000
/// keys took ~0.15 s and 40,000 ~0.6 s on the machine of BENCHMARKS.md);
/// in steps, the writes queued meanwhile (a write-behind pass, an admin
/// write) are committed between two of them, so a charge's way to disk
/// never waits for a whole fold (SPEC §7 allows a second).
const FOLD_BATCH: i64 = 2_000;
const FOLD_ROWS: i64 = 20_000;

/// Columns added after schema 1, for stores written by it.
const MIGRATIONS: &[&str] = &[
    "ALTER TABLE keys ADD COLUMN billing TEXT NOT NULL DEFAULT '{}'",
    "ALTER TABLE keys ADD COLUMN billing_seq INTEGER NOT NULL DEFAULT 0",
];

/// A key as [`Disk::rows_after`] copies it: its row, hash and external id.
pub type CopiedKey = (Row, Vec<u8>, Option<String>);

/// A key as stored: everything but the hash, which the caller knows.
pub struct Row {
    pub key_id: String,
    pub record: String,
    /// See [`super::codec`].
    pub usage: Vec<u8>,
    pub seq: u64,
    /// The key's billing state ([`crate::ledger::Billing`]): written only
    /// by write-behind passes, in order of its own `seq`, never by admin
    /// writes, so an admin write cannot roll back what events reported.
    pub billing: Vec<u8>,
}

/// An event on its way to the outbox, one per sink that will send it.
pub struct Outgoing {
    pub sink: &'static str,
    pub id: String,
    pub event: String,
    pub created_ms: i64,
}

/// An outbox event as a store holds it.
pub struct Pending {
    pub sink: String,
    pub id: String,
    pub event: String,
    pub created_ms: i64,
    /// Why the sink refused it for good, if it did.
    pub parked: Option<String>,
}

/// Events of one sink sent together, under one id kept across retries.
#[derive(Clone)]
pub struct Batch {
    pub id: String,
    pub events: Vec<String>,
}

/// What one sink's outbox holds.
pub struct OutboxStats {
    pub pending: u64,
    pub oldest_ms: Option<i64>,
    pub parked: u64,
}

/// One change for the writer.
pub enum Write {
    /// A new key. Refused (alone, not its group) if the hash exists.
    Create {
        key_id: String,
        hash: [u8; 32],
        external_id: Option<String>,
        record: String,
        usage: Vec<u8>,
        seq: u64,
    },
    /// A key's record and usage, unless the row holds a newer state.
    Update {
        key_id: String,
        external_id: Option<String>,
        record: String,
        usage: Vec<u8>,
        seq: u64,
    },
    /// Usage of many keys (write-behind), appended to the usage log (see
    /// the module's "Usage log"), and the events that came from it, in one
    /// transaction. A key revoked meanwhile is not brought back.
    Usage {
        rows: Vec<UsageRow>,
        events: Vec<Outgoing>,
    },
    /// The usage log, as far as it reached when the fold started, folded
    /// into `keys` and emptied, in steps with other writes committed
    /// between them ([`FOLD_BATCH`]); a log a fold left first. Answered
    /// once all of it is done.
    Fold,
    /// The usage log set aside for a [`Write::FoldAside`], the passes
    /// going on in a new one; nothing if a log is aside already (its fold
    /// failed) or nothing is logged.
    SetAside,
    /// The log [`Write::SetAside`] set aside, if there is one, folded into
    /// `keys` and dropped, the log after it left as it is. A key that log
    /// holds is left to its fold: it holds a newer state (see "Usage log").
    FoldAside,
    /// Gives a sink's oldest unbatched events a batch id (before the first
    /// attempt, so retries after a restart reuse it).
    Batch {
        sink: &'static str,
        batch: String,
        seqs: Vec<i64>,
    },
    /// A batch was delivered: its events leave the outbox.
    Delivered { sink: &'static str, batch: String },
    /// These events were delivered one by one: they leave the outbox.
    Sent {
        sink: &'static str,
        ids: Vec<String>,
    },
    /// An event the sink refuses for good waits for an operator.
    Park {
        sink: &'static str,
        id: String,
        reason: String,
    },
    /// Parked events (these, or all) go back in the queue.
    Unpark { ids: Option<Vec<String>> },
    /// A revoked key, gone from every index.
    Delete { key_id: String },
    /// Keys copied from another store; a key id already here is left as is.
    Import(Vec<(Row, [u8; 32], Option<String>)>),
}

/// One key's usage and billing state in a write-behind pass, in the
/// binary form of [`super::codec`].
#[derive(Default)]
pub struct UsageRow {
    pub key_id: String,
    pub usage: Vec<u8>,
    pub billing: Vec<u8>,
    pub seq: u64,
}

/// Most rows [`SpareRows`] keeps: a pass's worth with 25,000 keys in use
/// (a key is written every third pass); about 2.5 MB for keys of a
/// minute window and a pool each (~300 bytes a row: its id, usage and
/// billing state).
const SPARE_ROWS: usize = 8192;

/// The rows of write-behind passes the writer is done with, their buffers
/// kept for a later pass to write over, and a list with room for a pass's
/// rows. A pass with many keys in use otherwise allocated three strings a
/// key and a list of them on the flusher's thread and freed them on the
/// writer's, and the allocator gave their pages back and took them again
/// pass after pass (BENCHMARKS.md).
#[derive(Clone, Default)]
pub struct SpareRows(Arc<Mutex<Spare>>);

#[derive(Default)]
struct Spare {
    rows: Vec<UsageRow>,
    /// Empty, with the room the last written pass's rows took.
    list: Vec<UsageRow>,
}

impl SpareRows {
    /// Every spare row, to write over, and an empty list for a pass's rows.
    pub fn take(&self) -> (Vec<UsageRow>, Vec<UsageRow>) {
        let mut spare = self.0.lock();
        let list = std::mem::take(&mut spare.list);
        (std::mem::take(&mut spare.rows), list)
    }

    /// Rows a pass did not write over.
    pub fn give_back(&self, mut rows: Vec<UsageRow>) {
        let mut spare = self.0.lock();
        if spare.rows.is_empty() {
            std::mem::swap(&mut spare.rows, &mut rows);
        }
        Self::keep(&mut spare, rows);
    }

    /// A write's rows, if it has any, once it is done: kept up to
    /// [`SPARE_ROWS`], and their list kept empty for the next pass.
    fn recycle(&self, write: Write) {
        if let Write::Usage { rows, .. } = write {
            let mut spare = self.0.lock();
            let list = Self::keep(&mut spare, rows);
            if list.capacity() > spare.list.capacity() {
                spare.list = list;
            }
        }
    }

    /// Moves up to [`SPARE_ROWS`] of `rows` into the spare ones; returns
    /// the list they came in, empty.
    fn keep(spare: &mut Spare, mut rows: Vec<UsageRow>) -> Vec<UsageRow> {
        rows.truncate(SPARE_ROWS.saturating_sub(spare.rows.len()));
        spare.rows.append(&mut rows);
        rows
    }
}

struct Job {
    write: Write,
    done: oneshot::Sender<Result<(), StoreError>>,
}

pub struct Disk {
    file: PathBuf,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    readers: Mutex<Vec<Connection>>,
    /// Fault injection for tests: every group fails while set.
    fail: Arc<AtomicBool>,
    spare: SpareRows,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Io(e.to_string())
    }
}

fn writer_connection(file: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open(file)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // WAL: readers never wait for the writer. FULL: a commit is on disk
    // (the WAL fsynced) when it returns, which is what an acknowledged
    // admin write promises.
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Io(format!(
            "cannot put {} in WAL mode (got {mode})",
            file.display()
        )));
    }
    // The write-behind rewrites the same rows pass after pass. Statement
    // journals in memory, not in a temporary file (they were a third of
    // the writer's `pwrite`s); checkpoints every 8192 pages rather than
    // 1000, so a page rewritten many times is copied into the database
    // once per checkpoint, not once per few passes; a page cache that
    // holds a busy store's working set (64 MiB at most).
    conn.execute_batch(
        "PRAGMA synchronous = FULL;
         PRAGMA temp_store = MEMORY;
         PRAGMA wal_autocheckpoint = 8192;
         PRAGMA journal_size_limit = 67108864;
         PRAGMA cache_size = -65536;",
    )?;
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Io(format!(
            "{} was written by a newer tollgate (schema {version}; this one knows {SCHEMA_VERSION})",
            file.display()
        )));
    }
    conn.execute_batch(SCHEMA)?;
    conn.execute_batch(USAGE_LOG)?;
    let columns: Vec<String> = conn
        .prepare("SELECT name FROM pragma_table_info('keys')")?
        .query_map([], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    if !columns.iter().any(|c| c == "billing") {
        for step in MIGRATIONS {
            conn.execute_batch(step)?;
        }
    }
    if kept_seq(&conn)?.is_none() {
        // A store of schema 6 or before: its highest `seq` by a scan, once.
        let highest = highest_seq_scanned(&conn)?;
        conn.execute(KEEP_SEQ, [highest])?;
    }
    conn.execute_batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
    Ok(conn)
}

/// The highest `seq` `meta` keeps (see [`KEEP_SEQ`]).
fn kept_seq(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    conn.query_row("SELECT value FROM meta WHERE name = 'seq'", [], |r| {
        r.get(0)
    })
    .optional()
}

/// The highest `seq` in `keys` and in the usage logs, read from every row.
fn highest_seq_scanned(conn: &Connection) -> rusqlite::Result<i64> {
    let folding = folding_log_left(conn)?;
    let mut query = String::from(
        "SELECT max((SELECT coalesce(max(max(seq, billing_seq)), 0) FROM keys), \
                    (SELECT coalesce(max(seq), 0) FROM usage_log)",
    );
    if folding {
        query.push_str(", (SELECT coalesce(max(seq), 0) FROM usage_log_folding)");
    }
    query.push(')');
    conn.query_row(&query, [], |r| r.get(0))
}

fn reader_connection(file: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        file,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

impl Disk {
    /// Opens (creating if absent) the database in `dir` and starts its
    /// writer. Returns the highest `seq` stored and the number of keys.
    pub fn open(dir: &Path, healthy: Arc<AtomicBool>) -> Result<(Disk, u64, usize), StoreError> {
        let file = dir.join(FILE);
        let mut conn = writer_connection(&file)?;
        // What the last run logged is in `keys` before anything is read.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        fold_all(&tx)?;
        tx.commit()?;
        // Neither reads every key's row: the highest `seq` as `meta` keeps
        // it (`writer_connection` found it if the store kept none), the
        // count through an index.
        let max_seq = match kept_seq(&conn)? {
            Some(kept) => kept,
            None => highest_seq_scanned(&conn)?,
        };
        let keys: i64 = conn.query_row("SELECT count(*) FROM keys", [], |r| r.get(0))?;
        let (tx, rx) = mpsc::channel();
        let fail = Arc::new(AtomicBool::new(false));
        let spare = SpareRows::default();
        let writer = {
            let fail = fail.clone();
            let mut writer = Writer::new(conn);
            writer.spare = spare.clone();
            std::thread::Builder::new()
                .name("tollgate-store".into())
                .spawn(move || run_writer(writer, rx, &fail, &healthy))
                .map_err(|e| StoreError::Io(format!("cannot start the store writer: {e}")))?
        };
        let disk = Disk {
            file,
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            readers: Mutex::new(Vec::new()),
            fail,
            spare,
        };
        Ok((
            disk,
            u64::try_from(max_seq).unwrap_or(0),
            usize::try_from(keys).unwrap_or(0),
        ))
    }

    /// The rows the writer is done with (see [`SpareRows`]).
    pub fn spare_rows(&self) -> &SpareRows {
        &self.spare
    }

    pub fn inject_failure(&self, fail: bool) {
        self.fail.store(fail, Ordering::Release);
    }

    fn submit(
        &self,
        write: Write,
    ) -> Result<oneshot::Receiver<Result<(), StoreError>>, StoreError> {
        let (done, answer) = oneshot::channel();
        let jobs = self.jobs.lock();
        let sender = jobs.as_ref().ok_or(StoreError::Closed)?;
        sender
            .send(Job { write, done })
            .map_err(|_| StoreError::Closed)?;
        Ok(answer)
    }

    /// Applies `write`; on disk when this returns `Ok`.
    pub async fn write(&self, write: Write) -> Result<(), StoreError> {
        self.queue(write)?.await
    }

    /// Queues `write` behind every write queued before it, now; the
    /// returned future answers as [`Disk::write`] does.
    pub fn queue(
        &self,
        write: Write,
    ) -> Result<impl std::future::Future<Output = Result<(), StoreError>>, StoreError> {
        let answer = self.submit(write)?;
        Ok(async move { answer.await.map_err(|_| StoreError::Closed)? })
    }

    /// [`Disk::write`] for a thread outside any runtime.
    pub fn write_blocking(&self, write: Write) -> Result<(), StoreError> {
        let answer = self.submit(write)?;
        answer.blocking_recv().map_err(|_| StoreError::Closed)?
    }

    /// Runs `f` on a reading connection (taken from a pool, opened if none
    /// is free). Readers see the last committed state and never wait for
    /// the writer.
    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let conn = self.readers.lock().pop();
        let conn = match conn {
            Some(conn) => conn,
            None => reader_connection(&self.file)?,
        };
        let out = f(&conn);
        self.readers.lock().push(conn);
        Ok(out?)
    }

    /// The key with this hash.
    pub fn by_hash(&self, hash: &[u8; 32]) -> Result<Option<Row>, StoreError> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT key_id, record, usage, seq, billing FROM keys WHERE hash = ?1",
            )?
            .query_row([&hash[..]], row)
            .optional()
        })
    }

    /// The hash of the key with this id.
    pub fn hash_of(&self, key_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(|c| {
            c.prepare_cached("SELECT hash FROM keys WHERE key_id = ?1")?
                .query_row([key_id], |r| r.get(0))
                .optional()
        })
    }

    /// Key ids in order after `after`: one customer's, or all.
    pub fn list_ids(
        &self,
        external_id: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StoreError> {
        let after = after.unwrap_or("");
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|c| match external_id {
            Some(ext) => c
                .prepare_cached(
                    "SELECT key_id FROM keys WHERE external_id = ?1 AND key_id > ?2 \
                     ORDER BY key_id LIMIT ?3",
                )?
                .query_map(params![ext, after, limit], |r| r.get(0))?
                .collect(),
            None => c
                .prepare_cached(
                    "SELECT key_id FROM keys WHERE key_id > ?1 ORDER BY key_id LIMIT ?2",
                )?
                .query_map(params![after, limit], |r| r.get(0))?
                .collect(),
        })
    }

    /// Every key, in id order, `limit` at a time after `after` (for copying
    /// a store whole).
    pub fn rows_after(&self, after: &str, limit: usize) -> Result<Vec<CopiedKey>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|c| {
            c.prepare_cached(
                "SELECT key_id, record, usage, seq, billing, hash, external_id FROM keys \
                 WHERE key_id > ?1 ORDER BY key_id LIMIT ?2",
            )?
            .query_map(params![after, limit], |r| {
                Ok((row(r)?, r.get(5)?, r.get(6)?))
            })?
            .collect()
        })
    }

    /// Every event in the outbox, parked ones included, oldest first: for
    /// copying a store whole.
    pub fn outbox_all(&self) -> Result<Vec<Pending>, StoreError> {
        self.read(|c| {
            c.prepare_cached("SELECT sink, id, event, created_ms, parked FROM outbox ORDER BY seq")?
                .query_map([], |r| {
                    Ok(Pending {
                        sink: r.get(0)?,
                        id: r.get(1)?,
                        event: r.get(2)?,
                        created_ms: r.get(3)?,
                        parked: r.get(4)?,
                    })
                })?
                .collect()
        })
    }

    /// The batch of `sink` already under way (retried with its id), if any.
    pub fn outbox_batch(&self, sink: &str) -> Result<Option<Batch>, StoreError> {
        self.read(|c| {
            let batch: Option<String> = c
                .prepare_cached(
                    "SELECT batch FROM outbox WHERE sink = ?1 AND batch IS NOT NULL \
                     AND parked IS NULL ORDER BY seq LIMIT 1",
                )?
                .query_row([sink], |r| r.get(0))
                .optional()?;
            let Some(id) = batch else { return Ok(None) };
            let events = c
                .prepare_cached(
                    "SELECT event FROM outbox WHERE sink = ?1 AND batch = ?2 ORDER BY seq",
                )?
                .query_map(params![sink, id], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(Some(Batch { id, events }))
        })
    }

    /// Parked events of `sink`: `(id, reason, event)`, oldest first.
    pub fn outbox_parked(
        &self,
        sink: &str,
        limit: usize,
    ) -> Result<Vec<(String, String, String)>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|c| {
            c.prepare_cached(
                "SELECT id, parked, event FROM outbox WHERE sink = ?1 AND parked IS NOT NULL \
                 ORDER BY seq LIMIT ?2",
            )?
            .query_map(params![sink, limit], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?
            .collect()
        })
    }

    /// The oldest events of `sink` in no batch yet: `(seq, event)`.
    pub fn outbox_unbatched(
        &self,
        sink: &str,
        limit: usize,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.read(|c| {
            c.prepare_cached(
                "SELECT seq, event FROM outbox WHERE sink = ?1 AND batch IS NULL \
                 AND parked IS NULL ORDER BY seq LIMIT ?2",
            )?
            .query_map(params![sink, limit], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect()
        })
    }

    pub fn outbox_stats(&self, sink: &str) -> Result<OutboxStats, StoreError> {
        self.read(|c| {
            c.prepare_cached(
                "SELECT count(*) FILTER (WHERE parked IS NULL), \
                        min(created_ms) FILTER (WHERE parked IS NULL), \
                        count(*) FILTER (WHERE parked IS NOT NULL) \
                 FROM outbox WHERE sink = ?1",
            )?
            .query_row([sink], |r| {
                Ok(OutboxStats {
                    pending: u64::try_from(r.get::<_, i64>(0)?).unwrap_or(0),
                    oldest_ms: r.get(1)?,
                    parked: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
                })
            })
        })
    }

    /// Stops the writer once it has applied everything sent so far.
    pub fn close(&self) {
        self.jobs.lock().take();
        if let Some(writer) = self.writer.lock().take() {
            let _ = writer.join();
        }
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        self.close();
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        key_id: r.get(0)?,
        record: r.get(1)?,
        usage: stored(r, 2)?,
        seq: u64::try_from(r.get::<_, i64>(3)?).unwrap_or(0),
        billing: stored(r, 4)?,
    })
}

/// Usage or billing state: a blob in the binary form, or text (JSON)
/// written before it.
fn stored(r: &rusqlite::Row<'_>, column: usize) -> rusqlite::Result<Vec<u8>> {
    match r.get_ref(column)? {
        ValueRef::Blob(bytes) | ValueRef::Text(bytes) => Ok(bytes.to_vec()),
        other => Err(rusqlite::Error::InvalidColumnType(
            column,
            "usage".into(),
            other.data_type(),
        )),
    }
}

/// The writer thread: group, commit, answer, until every sender is gone
/// and no fold is under way or asked for. While one is, it takes whatever
/// queued up without waiting, between two of the fold's steps (a fold
/// asked for during another starts when that one ends, with or without
/// another write to wake the writer).
fn run_writer(
    mut writer: Writer,
    jobs: mpsc::Receiver<Job>,
    fail: &AtomicBool,
    healthy: &AtomicBool,
) {
    loop {
        let mut group = Vec::new();
        if writer.fold.is_none() && writer.next.is_empty() {
            match jobs.recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        while group.len() < MAX_GROUP {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        writer.step(group, fail, healthy);
    }
}

/// The writing connection and the fold under way on it, if any.
struct Writer {
    conn: Connection,
    /// Keys a fold writes a step, and log rows it lists a step
    /// ([`FOLD_BATCH`], [`FOLD_ROWS`]; fewer in tests).
    batch: i64,
    rows: i64,
    fold: Option<Fold>,
    /// Folds asked for while one was under way: the rows logged since it
    /// started are not in it, so they get a fold of their own after it;
    /// a whole one ([`Write::Fold`]) if any of them was.
    next: Vec<oneshot::Sender<Result<(), StoreError>>>,
    next_whole: bool,
    /// Where the passes' rows go once written.
    spare: SpareRows,
}

/// A fold in steps (see [`FOLD_BATCH`]).
struct Fold {
    at: FoldAt,
    /// Whether it folds the log set aside before it started, rather than
    /// the one the passes were writing then.
    leftover: bool,
    /// Whether the log the passes were writing is folded after a log set
    /// aside before ([`Write::Fold`]), or left ([`Write::FoldAside`]).
    whole: bool,
    waiting: Vec<oneshot::Sender<Result<(), StoreError>>>,
}

/// Where a fold is: listing the set-aside log's rows after `after` up to
/// `upto`, its last; finding the listed keys whose ids come after `after`;
/// or writing the found keys whose rows in `keys` come after `after`, up
/// to `last`, the last found.
#[derive(Clone, Debug, PartialEq, Eq)]
enum FoldAt {
    Listing { after: i64, upto: i64 },
    Finding { after: String },
    Writing { after: i64, last: i64 },
}

impl Writer {
    fn new(conn: Connection) -> Writer {
        Writer {
            conn,
            batch: FOLD_BATCH,
            rows: FOLD_ROWS,
            fold: None,
            next: Vec::new(),
            next_whole: false,
            spare: SpareRows::default(),
        }
    }

    /// Commits `group` but its folds, answering each; then starts a fold
    /// if one is asked for and none is under way, and takes the one under
    /// way a step further.
    fn step(&mut self, group: Vec<Job>, fail: &AtomicBool, healthy: &AtomicBool) {
        let (folds, writes): (Vec<Job>, Vec<Job>) = group
            .into_iter()
            .partition(|job| matches!(job.write, Write::Fold | Write::FoldAside));
        for job in folds {
            self.next_whole |= matches!(job.write, Write::Fold);
            self.next.push(job.done);
        }
        if !writes.is_empty() {
            match commit(&mut self.conn, &writes, fail) {
                Ok(results) => {
                    for (job, result) in writes.into_iter().zip(results) {
                        self.spare.recycle(job.write);
                        let _ = job.done.send(result);
                    }
                }
                Err(e) => {
                    healthy.store(false, Ordering::Release);
                    tracing::error!(error = %e, writes = writes.len(), "store write failed; nothing of it was applied");
                    for job in writes {
                        self.spare.recycle(job.write);
                        let _ = job.done.send(Err(e.clone()));
                    }
                }
            }
        }
        if self.fold.is_none() && !self.next.is_empty() {
            let waiting = std::mem::take(&mut self.next);
            let whole = std::mem::take(&mut self.next_whole);
            self.start_fold(waiting, whole, fail, healthy);
        }
        let Some(at) = self.fold.as_ref().map(|fold| fold.at.clone()) else {
            return;
        };
        let (batch, rows) = (self.batch, self.rows);
        match transaction(&mut self.conn, fail, |tx| {
            Ok(fold_advance(tx, at, batch, rows)?)
        }) {
            Ok(Some(at)) => {
                if let Some(fold) = self.fold.as_mut() {
                    fold.at = at;
                }
            }
            Ok(None) => match self.fold.take() {
                // The log set aside before is in `keys`; the one the
                // passes went on with since is not yet.
                Some(fold) if fold.leftover && fold.whole => {
                    self.start_fold(fold.waiting, true, fail, healthy)
                }
                Some(fold) => {
                    for done in fold.waiting {
                        let _ = done.send(Ok(()));
                    }
                }
                None => {}
            },
            // What was written stays (each step follows the rule every
            // write to `keys` does); the log stays whole for the next fold.
            Err(e) => {
                if let Some(fold) = self.fold.take() {
                    Self::fold_failed(healthy, fold.waiting, e);
                }
            }
        }
    }

    /// The fold's first step: takes the log set aside, or (`whole`) sets
    /// the log aside.
    fn start_fold(
        &mut self,
        waiting: Vec<oneshot::Sender<Result<(), StoreError>>>,
        whole: bool,
        fail: &AtomicBool,
        healthy: &AtomicBool,
    ) {
        match transaction(&mut self.conn, fail, |tx| Ok(fold_start(tx, whole)?)) {
            Ok(Some((at, leftover))) => {
                self.fold = Some(Fold {
                    at,
                    leftover,
                    whole,
                    waiting,
                })
            }
            Ok(None) => {
                for done in waiting {
                    let _ = done.send(Ok(()));
                }
            }
            Err(e) => Self::fold_failed(healthy, waiting, e),
        }
    }

    fn fold_failed(
        healthy: &AtomicBool,
        waiting: Vec<oneshot::Sender<Result<(), StoreError>>>,
        e: StoreError,
    ) {
        healthy.store(false, Ordering::Release);
        tracing::error!(error = %e, "folding the usage log failed; it is kept for the next fold");
        for done in waiting {
            let _ = done.send(Err(e.clone()));
        }
    }
}

/// Whether a log set aside by a fold is there (`usage_log_folding`): a
/// fold under way, or one the process stopped in.
fn folding_log_left(conn: &Connection) -> rusqlite::Result<bool> {
    Ok(conn.query_row(
        "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name = 'usage_log_folding'",
        [],
        |r| r.get::<_, i64>(0),
    )? > 0)
}

/// Sets the log aside, the passes going on in a new one. Returns whether
/// it did: not when nothing is logged (on a gateway serving only public
/// routes, every time). Renaming the log is a schema change, which makes
/// SQLite read its schema again and prepare every statement anew.
fn set_aside(conn: &Connection) -> rusqlite::Result<bool> {
    let logged: bool =
        conn.query_row("SELECT EXISTS (SELECT 1 FROM usage_log)", [], |r| r.get(0))?;
    if logged {
        conn.execute_batch("ALTER TABLE usage_log RENAME TO usage_log_folding")?;
        conn.execute_batch(USAGE_LOG)?;
    }
    Ok(logged)
}

/// Starts folding the log set aside before (a [`Write::SetAside`], or a
/// fold that did not finish), or with `whole` and none aside, sets the
/// log aside and starts folding it. Returns where the fold is, and
/// whether its log was set aside before; or `None` when there is nothing
/// to fold.
fn fold_start(conn: &Connection, whole: bool) -> rusqlite::Result<Option<(FoldAt, bool)>> {
    let leftover = folding_log_left(conn)?;
    let aside = leftover || (whole && set_aside(conn)?);
    if !aside {
        return Ok(None);
    }
    conn.execute_batch(FOLD_LISTING)?;
    let upto = conn.query_row(
        "SELECT coalesce(max(rowid), 0) FROM usage_log_folding",
        [],
        |r| r.get(0),
    )?;
    Ok(Some((FoldAt::Listing { after: 0, upto }, leftover)))
}

/// One step of a fold: lists up to `rows` log rows, finds up to `rows`
/// listed keys, or writes up to `batch` found keys (the last such step
/// drops the folded log).
/// Returns where the fold is then, or `None` once it is done.
fn fold_advance(
    conn: &Connection,
    at: FoldAt,
    batch: i64,
    rows: i64,
) -> rusqlite::Result<Option<FoldAt>> {
    match at {
        FoldAt::Listing { after, upto } => {
            let to = after.saturating_add(rows).min(upto);
            conn.prepare_cached(FOLD_LIST)?
                .execute(params![after, to])?;
            if to < upto {
                return Ok(Some(FoldAt::Listing { after: to, upto }));
            }
            Ok(Some(FoldAt::Finding {
                after: String::new(),
            }))
        }
        FoldAt::Finding { after } => {
            // The `rows`-th listed key after `after`, if there are that many.
            let to: Option<String> = conn
                .prepare_cached(
                    "SELECT key_id FROM temp.fold_logged WHERE key_id > ?1 \
                     ORDER BY key_id LIMIT 1 OFFSET ?2",
                )?
                .query_row(params![after, rows.saturating_sub(1).max(0)], |r| r.get(0))
                .optional()?;
            conn.prepare_cached(FOLD_FIND)?
                .execute(params![after, rows.max(1)])?;
            if let Some(after) = to {
                return Ok(Some(FoldAt::Finding { after }));
            }
            let last = conn.query_row(
                "SELECT coalesce(max(krow), 0) FROM temp.fold_newest",
                [],
                |r| r.get(0),
            )?;
            Ok(Some(FoldAt::Writing { after: 0, last }))
        }
        FoldAt::Writing { after, last } => {
            // The `batch`-th listed key after `after`, or the last.
            let to: i64 = conn
                .prepare_cached(
                    "SELECT krow FROM temp.fold_newest WHERE krow > ?1 \
                     ORDER BY krow LIMIT 1 OFFSET ?2",
                )?
                .query_row(params![after, batch.saturating_sub(1).max(0)], |r| r.get(0))
                .optional()?
                .unwrap_or(last);
            conn.prepare_cached(FOLD_STEP)?
                .execute(params![after, to])?;
            if to < last {
                return Ok(Some(FoldAt::Writing { after: to, last }));
            }
            conn.execute_batch(FOLD_END)?;
            Ok(None)
        }
    }
}

/// A whole fold in the transaction `conn` is in, and another if it
/// folded a log set aside before: after it, every logged usage is in
/// `keys`.
fn fold_all(conn: &Connection) -> rusqlite::Result<()> {
    loop {
        let Some((mut at, leftover)) = fold_start(conn, true)? else {
            return Ok(());
        };
        while let Some(next) = fold_advance(conn, at, FOLD_BATCH, FOLD_ROWS)? {
            at = next;
        }
        if !leftover {
            return Ok(());
        }
    }
}

/// Applies a group in one transaction. An error here (I/O, a full disk)
/// rolls the whole group back; a write refused on its own merits (a
/// duplicate hash) is rolled back alone and answered with its reason.
fn commit(
    conn: &mut Connection,
    group: &[Job],
    fail: &AtomicBool,
) -> Result<Vec<Result<(), StoreError>>, StoreError> {
    transaction(conn, fail, |tx| {
        let mut results = Vec::with_capacity(group.len());
        if let Some(highest) = group.iter().filter_map(|job| job.write.highest_seq()).max() {
            tx.prepare_cached(KEEP_SEQ)?.execute([seq(highest)])?;
        }
        for job in group {
            // Only a new key can be refused on its own merits; every other
            // write goes in without a savepoint, which would copy each page
            // it changes (a write-behind pass changes thousands).
            if !matches!(job.write, Write::Create { .. }) {
                results.push(apply(tx, &job.write)?);
                continue;
            }
            let sp = tx.savepoint()?;
            match apply(&sp, &job.write)? {
                Ok(()) => {
                    sp.commit()?;
                    results.push(Ok(()));
                }
                // Dropping the savepoint rolls back this write only.
                Err(refused) => results.push(Err(refused)),
            }
        }
        Ok(results)
    })
}

/// Runs `f` in one writing transaction, committed if it returns `Ok`
/// (none while the test hook `fail` is set).
fn transaction<T>(
    conn: &mut Connection,
    fail: &AtomicBool,
    f: impl FnOnce(&mut rusqlite::Transaction<'_>) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    if fail.load(Ordering::Acquire) {
        return Err(StoreError::Unavailable);
    }
    let mut tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let out = f(&mut tx)?;
    tx.commit()?;
    Ok(out)
}

impl Write {
    /// The highest `seq` this write puts in `keys` or the usage log.
    fn highest_seq(&self) -> Option<u64> {
        match self {
            Write::Create { seq, .. } | Write::Update { seq, .. } => Some(*seq),
            Write::Usage { rows, .. } => rows.iter().map(|row| row.seq).max(),
            Write::Import(rows) => rows.iter().map(|(row, _, _)| row.seq).max(),
            Write::Fold
            | Write::SetAside
            | Write::FoldAside
            | Write::Batch { .. }
            | Write::Delivered { .. }
            | Write::Sent { .. }
            | Write::Park { .. }
            | Write::Unpark { .. }
            | Write::Delete { .. } => None,
        }
    }
}

/// Usage log rows appended by one statement ([`APPEND_CHUNK`]); a pass's
/// rows past the last whole chunk go in one at a time. A statement run
/// for each row (opening the table, finding its end, finishing and
/// resetting the statement) made the writer's work a row about half as
/// much again (BENCHMARKS.md).
const LOG_CHUNK: usize = 32;

/// Appends rows to the usage log, [`LOG_CHUNK`] a statement, in the order
/// bound: the last of a key's rows is still its newest (see "Usage log").
/// `OR FAIL`: a statement of several rows that may stop part way
/// (`ABORT`, the default) has SQLite keep a journal of what the statement
/// changed, to undo only that; with it, chunks saved a third of what they
/// save without it. The log's only constraints are `NOT NULL`s every bound
/// value meets, and an error of the disk rolls the whole group back (see
/// "Faults"), so there is nothing for the statement alone to undo.
static APPEND_CHUNK: LazyLock<String> = LazyLock::new(|| append_sql(LOG_CHUNK));

/// [`APPEND_CHUNK`] for one row: a pass's rows past its last whole chunk.
static APPEND_ONE: LazyLock<String> = LazyLock::new(|| append_sql(1));

/// The statement appending `rows` rows to the usage log.
fn append_sql(rows: usize) -> String {
    let values: Vec<String> = (0..rows)
        .map(|i| {
            let p = 4 * i;
            format!("(?{}, ?{}, ?{}, ?{})", p + 1, p + 2, p + 3, p + 4)
        })
        .collect();
    format!(
        "INSERT OR FAIL INTO usage_log (key_id, usage, billing, seq) VALUES {}",
        values.join(", ")
    )
}

/// Binds `rows` to `append` (made by [`append_sql`] for as many) and runs it.
fn append(append: &mut rusqlite::Statement<'_>, rows: &[UsageRow]) -> rusqlite::Result<()> {
    for (i, row) in rows.iter().enumerate() {
        append.raw_bind_parameter(4 * i + 1, &row.key_id)?;
        append.raw_bind_parameter(4 * i + 2, &row.usage)?;
        append.raw_bind_parameter(4 * i + 3, &row.billing)?;
        append.raw_bind_parameter(4 * i + 4, seq(row.seq))?;
    }
    append.raw_execute()?;
    Ok(())
}

fn seq(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn apply(tx: &Connection, write: &Write) -> rusqlite::Result<Result<(), StoreError>> {
    match write {
        Write::Create {
            key_id,
            hash,
            external_id,
            record,
            usage,
            seq: s,
        } => {
            let taken: Option<String> = tx
                .prepare_cached("SELECT key_id FROM keys WHERE hash = ?1 OR key_id = ?2")?
                .query_row(params![&hash[..], key_id], |r| r.get(0))
                .optional()?;
            if taken.is_some() {
                // 2^-128: only a broken random source gets here.
                return Ok(Err(StoreError::Corrupt {
                    key_id: key_id.clone(),
                    reason: "duplicate key hash or id".into(),
                }));
            }
            tx.prepare_cached(
                "INSERT INTO keys (key_id, hash, external_id, record, usage, seq) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![
                key_id,
                &hash[..],
                external_id,
                record,
                usage,
                seq(*s)
            ])?;
        }
        Write::Update {
            key_id,
            external_id,
            record,
            usage,
            seq: s,
        } => {
            tx.prepare_cached(
                "UPDATE keys SET external_id = ?2, record = ?3, usage = ?4, seq = ?5 \
                 WHERE key_id = ?1 AND seq < ?5",
            )?
            .execute(params![key_id, external_id, record, usage, seq(*s)])?;
        }
        Write::Usage { rows, events } => {
            let mut chunks = rows.chunks_exact(LOG_CHUNK);
            if rows.len() >= LOG_CHUNK {
                let mut chunked = tx.prepare_cached(&APPEND_CHUNK)?;
                for chunk in &mut chunks {
                    append(&mut chunked, chunk)?;
                }
            }
            if !chunks.remainder().is_empty() {
                let mut one = tx.prepare_cached(&APPEND_ONE)?;
                for row in chunks.remainder() {
                    append(&mut one, std::slice::from_ref(row))?;
                }
            }
            let mut outbox = tx.prepare_cached(
                "INSERT OR IGNORE INTO outbox (sink, id, event, created_ms) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for e in events {
                outbox.execute(params![e.sink, e.id, e.event, e.created_ms])?;
            }
        }
        Write::SetAside => {
            if !folding_log_left(tx)? {
                set_aside(tx)?;
            }
        }
        // Taken apart by [`Writer::step`], never part of a group.
        Write::Fold | Write::FoldAside => {}
        Write::Batch { sink, batch, seqs } => {
            let mut stmt = tx.prepare_cached(
                "UPDATE outbox SET batch = ?3 WHERE sink = ?1 AND seq = ?2 AND batch IS NULL",
            )?;
            for s in seqs {
                stmt.execute(params![sink, s, batch])?;
            }
        }
        Write::Delivered { sink, batch } => {
            tx.prepare_cached("DELETE FROM outbox WHERE sink = ?1 AND batch = ?2")?
                .execute(params![sink, batch])?;
        }
        Write::Sent { sink, ids } => {
            let mut stmt = tx.prepare_cached("DELETE FROM outbox WHERE sink = ?1 AND id = ?2")?;
            for id in ids {
                stmt.execute(params![sink, id])?;
            }
        }
        Write::Park { sink, id, reason } => {
            tx.prepare_cached("UPDATE outbox SET parked = ?3 WHERE sink = ?1 AND id = ?2")?
                .execute(params![sink, id, reason])?;
        }
        Write::Unpark { ids: None } => {
            tx.prepare_cached(
                "UPDATE outbox SET parked = NULL, batch = NULL WHERE parked IS NOT NULL",
            )?
            .execute([])?;
        }
        Write::Unpark { ids: Some(ids) } => {
            let mut stmt = tx.prepare_cached(
                "UPDATE outbox SET parked = NULL, batch = NULL WHERE id = ?1 AND parked IS NOT NULL",
            )?;
            for id in ids {
                stmt.execute([id])?;
            }
        }
        Write::Delete { key_id } => {
            tx.prepare_cached("DELETE FROM keys WHERE key_id = ?1")?
                .execute([key_id])?;
        }
        Write::Import(rows) => {
            let mut stmt = tx.prepare_cached(
                "INSERT OR IGNORE INTO keys \
                 (key_id, hash, external_id, record, usage, seq, billing, billing_seq) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?6)",
            )?;
            for (row, hash, external_id) in rows {
                stmt.execute(params![
                    row.key_id,
                    &hash[..],
                    external_id,
                    row.record,
                    row.usage,
                    seq(row.seq),
                    row.billing,
                ])?;
            }
        }
    }
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    type Answer = oneshot::Receiver<Result<(), StoreError>>;

    fn job(write: Write) -> (Job, Answer) {
        let (done, answer) = oneshot::channel();
        (Job { write, done }, answer)
    }

    fn create(n: u8, seq: u64) -> Write {
        Write::Create {
            key_id: format!("k{n}"),
            hash: [n; 32],
            external_id: None,
            record: "{}".into(),
            usage: "created".into(),
            seq,
        }
    }

    fn logged(rows: &[(u8, &str, u64)]) -> Write {
        Write::Usage {
            rows: rows
                .iter()
                .map(|&(n, usage, seq)| UsageRow {
                    key_id: format!("k{n}"),
                    usage: usage.into(),
                    billing: format!("{{\"at\":\"{usage}\"}}").into_bytes(),
                    seq,
                })
                .collect(),
            events: Vec::new(),
        }
    }

    /// The writer keeps a written pass's rows for the next, up to
    /// `SPARE_ROWS`, and the list they came in, empty, for its rows.
    #[test]
    fn spare_rows_are_kept_up_to_a_bound() {
        let spare = SpareRows::default();
        let rows = |n: usize| (0..n).map(|_| UsageRow::default()).collect::<Vec<_>>();
        spare.recycle(Write::Usage {
            rows: rows(SPARE_ROWS - 10),
            events: Vec::new(),
        });
        spare.recycle(Write::Usage {
            rows: rows(100),
            events: Vec::new(),
        });
        let (kept, list) = spare.take();
        assert_eq!(kept.len(), SPARE_ROWS);
        assert!(list.is_empty() && list.capacity() >= SPARE_ROWS - 10);
        assert_eq!(spare.take().0.len(), 0, "all taken");
        spare.give_back(rows(5));
        spare.give_back(kept);
        assert_eq!(spare.take().0.len(), SPARE_ROWS);
    }

    fn answered(answer: &mut Answer) -> Option<Result<(), StoreError>> {
        answer.try_recv().ok()
    }

    fn usage_of(writer: &Writer, n: u8) -> (String, String, i64) {
        writer
            .conn
            .query_row(
                "SELECT usage, billing, seq FROM keys WHERE key_id = ?1",
                [format!("k{n}")],
                |r| Ok((text(r, 0)?, text(r, 1)?, r.get(2)?)),
            )
            .expect("row")
    }

    /// A usage or billing column the test wrote as text, in either form.
    fn text(r: &rusqlite::Row<'_>, column: usize) -> rusqlite::Result<String> {
        Ok(String::from_utf8_lossy(&stored(r, column)?).into_owned())
    }

    /// Rows in `table`; none if there is no such table.
    fn table_len(writer: &Writer, table: &str) -> i64 {
        writer
            .conn
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .unwrap_or(0)
    }

    /// Rows in the log, and in a log a fold set aside.
    fn log_len(writer: &Writer) -> i64 {
        table_len(writer, "usage_log") + table_len(writer, "usage_log_folding")
    }

    /// A writer on a fresh store, its test hook `fail` off and the store
    /// healthy.
    fn fresh_writer(dir: &Path) -> (Writer, AtomicBool, AtomicBool) {
        let conn = writer_connection(&dir.join(FILE)).expect("open");
        let healthy = AtomicBool::new(true);
        (Writer::new(conn), AtomicBool::new(false), healthy)
    }

    /// A writer on a fresh store, folding one key or listing two log rows
    /// a step, with keys k1-k3
    /// logged twice each (the second row the newest).
    fn writer_with_log(dir: &Path) -> (Writer, AtomicBool, AtomicBool) {
        let (mut writer, fail, healthy) = fresh_writer(dir);
        (writer.batch, writer.rows) = (1, 2);
        let mut writes = vec![job(create(1, 1)), job(create(2, 2)), job(create(3, 3))];
        writes.push(job(logged(&[
            (1, "k1 old", 10),
            (2, "k2 old", 11),
            (3, "k3 old", 12),
        ])));
        writes.push(job(logged(&[
            (1, "k1 new", 13),
            (2, "k2 new", 14),
            (3, "k3 new", 15),
        ])));
        let (jobs, mut answers): (Vec<Job>, Vec<Answer>) = writes.into_iter().unzip();
        writer.step(jobs, &fail, &healthy);
        for answer in &mut answers {
            assert!(matches!(answered(answer), Some(Ok(()))));
        }
        (writer, fail, healthy)
    }

    /// Steps the writer with nothing queued until `answer` comes, at
    /// most `max` times. Returns how many steps it took.
    fn until_answered(
        writer: &mut Writer,
        answer: &mut Answer,
        fail: &AtomicBool,
        healthy: &AtomicBool,
        max: usize,
    ) -> Result<usize, StoreError> {
        for steps in 1..=max {
            writer.step(Vec::new(), fail, healthy);
            if let Some(result) = answered(answer) {
                return result.map(|()| steps);
            }
        }
        panic!("no answer in {max} steps");
    }

    /// A pass's rows go in [`LOG_CHUNK`] a statement and the rest one at a
    /// time, every row logged and in the order given: a key logged twice in
    /// one pass (older first) folds to its later row, whether the two were
    /// in one chunk, in two, or the later one among the rest.
    #[test]
    fn a_pass_of_many_rows_logs_every_row_in_order() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut writer, fail, healthy) = fresh_writer(dir.path());
        let keys = 2 * LOG_CHUNK as u8 + 6;
        let mut writes: Vec<_> = (1..=keys).map(|n| job(create(n, 1))).collect();
        // Every key once (70 rows), then keys 65-70 and 1-30 again, then
        // 29 and 30 a third time: keys 65-70 have two rows in the third
        // chunk, key 1 one in the first and one in the third, keys 21-30
        // their later row among the rest, keys 29 and 30 two there.
        let again: Vec<u8> = (65..=keys).chain(1..=30).collect();
        let old: Vec<String> = (1..=keys).map(|n| format!("k{n} old")).collect();
        let new: Vec<String> = (1..=keys).map(|n| format!("k{n} new")).collect();
        let last: Vec<String> = (1..=keys).map(|n| format!("k{n} last")).collect();
        let mut rows: Vec<(u8, &str, u64)> = (1..=keys)
            .map(|n| (n, old[usize::from(n) - 1].as_str(), 100 + u64::from(n)))
            .collect();
        rows.extend(
            again
                .iter()
                .map(|&n| (n, new[usize::from(n) - 1].as_str(), 200 + u64::from(n))),
        );
        rows.extend([29u8, 30].map(|n| (n, last[usize::from(n) - 1].as_str(), 300 + u64::from(n))));
        assert_eq!(rows.len(), 3 * LOG_CHUNK + 12, "three chunks and the rest");
        writes.push(job(logged(&rows)));
        let (jobs, mut answers): (Vec<Job>, Vec<Answer>) = writes.into_iter().unzip();
        writer.step(jobs, &fail, &healthy);
        for answer in &mut answers {
            assert!(matches!(answered(answer), Some(Ok(()))));
        }
        assert_eq!(log_len(&writer), rows.len() as i64);
        let (fold, mut folded) = job(Write::Fold);
        writer.step(vec![fold], &fail, &healthy);
        until_answered(&mut writer, &mut folded, &fail, &healthy, 20).expect("fold");
        for n in 1..=keys {
            let (usage, billing, seq) = usage_of(&writer, n);
            let (want, want_seq) = if n == 29 || n == 30 {
                (format!("k{n} last"), 300 + i64::from(n))
            } else if again.contains(&n) {
                (format!("k{n} new"), 200 + i64::from(n))
            } else {
                (format!("k{n} old"), 100 + i64::from(n))
            };
            assert_eq!(usage, want, "key {n}");
            assert_eq!(billing, format!("{{\"at\":\"{want}\"}}"));
            assert_eq!(seq, want_seq);
        }
    }

    /// A store that fills up part way through a chunk of a pass (SQLite's
    /// own "database or disk is full", from a page limit) fails the whole
    /// pass and logs none of it; once there is room, the same pass is
    /// logged whole.
    #[test]
    fn a_pass_that_fills_the_store_part_way_logs_nothing() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut writer, fail, healthy) = fresh_writer(dir.path());
        let keys = 3 * LOG_CHUNK as u8;
        let (jobs, mut answers): (Vec<Job>, Vec<Answer>) =
            (1..=keys).map(|n| job(create(n, 1))).unzip();
        writer.step(jobs, &fail, &healthy);
        assert!(answers
            .iter_mut()
            .all(|a| matches!(answered(a), Some(Ok(())))));
        // A row of 2 KB a key: the pass needs about 50 more pages of 4 KB,
        // and has room for 20, so it fills up in its second chunk.
        let usage: Vec<String> = (1..=keys)
            .map(|n| format!("k{n} {}", "x".repeat(2000)))
            .collect();
        let rows: Vec<(u8, &str, u64)> = (1..=keys)
            .map(|n| (n, usage[usize::from(n) - 1].as_str(), 10 + u64::from(n)))
            .collect();
        let pages: i64 = writer
            .conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .expect("page count");
        writer
            .conn
            .execute_batch(&format!("PRAGMA max_page_count = {}", pages + 20))
            .expect("page limit");
        let (pass, mut passed) = job(logged(&rows));
        writer.step(vec![pass], &fail, &healthy);
        assert!(
            matches!(answered(&mut passed), Some(Err(_))),
            "the pass failed"
        );
        assert!(!healthy.load(Ordering::Acquire));
        assert_eq!(log_len(&writer), 0, "no row of the failed pass");

        writer
            .conn
            .execute_batch("PRAGMA max_page_count = 1073741823")
            .expect("room again");
        let (pass, mut passed) = job(logged(&rows));
        writer.step(vec![pass], &fail, &healthy);
        assert!(matches!(answered(&mut passed), Some(Ok(()))));
        assert_eq!(log_len(&writer), i64::from(keys));
        let (fold, mut folded) = job(Write::Fold);
        writer.step(vec![fold], &fail, &healthy);
        until_answered(&mut writer, &mut folded, &fail, &healthy, 20).expect("fold");
        for n in 1..=keys {
            assert_eq!(usage_of(&writer, n).0, usage[usize::from(n) - 1]);
        }
    }

    /// A fold with nothing logged since the last is answered at once and
    /// changes no schema (renaming the log would make SQLite read its
    /// schema again and prepare every statement anew, every few seconds on
    /// a gateway that charges nothing); with rows logged, it folds them.
    #[test]
    fn a_fold_with_nothing_logged_renames_nothing() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut writer, fail, healthy) = writer_with_log(dir.path());
        let schema = |writer: &Writer| -> i64 {
            writer
                .conn
                .query_row("PRAGMA schema_version", [], |r| r.get(0))
                .expect("schema version")
        };
        let (fold, mut folded) = job(Write::Fold);
        writer.step(vec![fold], &fail, &healthy);
        until_answered(&mut writer, &mut folded, &fail, &healthy, 20).expect("fold");
        assert_eq!(log_len(&writer), 0);
        let before = schema(&writer);

        let (fold, mut folded) = job(Write::Fold);
        writer.step(vec![fold], &fail, &healthy);
        assert!(
            matches!(answered(&mut folded), Some(Ok(()))),
            "answered in its first step"
        );
        assert_eq!(schema(&writer), before, "the empty log was set aside");

        let (pass, mut passed) = job(logged(&[(2, "k2 later", 16)]));
        let (fold, mut folded) = job(Write::Fold);
        writer.step(vec![pass, fold], &fail, &healthy);
        assert!(matches!(answered(&mut passed), Some(Ok(()))));
        until_answered(&mut writer, &mut folded, &fail, &healthy, 20).expect("fold");
        assert_eq!(usage_of(&writer, 2).0, "k2 later");
        assert_ne!(schema(&writer), before);
    }

    /// The writer folds in small steps here (two log rows listed, or one
    /// key written, a step): a pass queued while the fold is under way is
    /// committed at the next step, not after the fold's last; the fold
    /// still writes each key's newest row from before it started, and
    /// leaves the pass's row in the log for the next fold, which a fold
    /// asked for meanwhile is.
    #[test]
    fn writes_queued_during_a_fold_are_committed_between_its_steps() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut writer, fail, healthy) = writer_with_log(dir.path());
        let (fold, mut folded) = job(Write::Fold);
        writer.step(vec![fold], &fail, &healthy);
        assert!(
            answered(&mut folded).is_none(),
            "two log rows of six listed"
        );

        // A pass (k1 charged again) and a second fold come in meanwhile.
        let (pass, mut passed) = job(logged(&[(1, "k1 during", 16)]));
        let (again, mut refolded) = job(Write::Fold);
        writer.step(vec![pass, again], &fail, &healthy);
        assert!(
            matches!(answered(&mut passed), Some(Ok(()))),
            "the pass did not wait for the fold"
        );
        assert!(answered(&mut folded).is_none());

        // The last listing step, two finding the three keys, then a key a
        // step.
        let steps = until_answered(&mut writer, &mut folded, &fail, &healthy, 10).expect("fold");
        assert_eq!(steps, 6);
        assert!(
            answered(&mut refolded).is_none(),
            "the second fold starts after the first"
        );
        for n in 1..=3 {
            let (usage, billing, seq) = usage_of(&writer, n);
            assert_eq!(usage, format!("k{n} new"));
            assert_eq!(billing, format!("{{\"at\":\"k{n} new\"}}"));
            assert_eq!(seq, 12 + i64::from(n));
        }
        assert_eq!(
            log_len(&writer),
            1,
            "the pass's row waits for the next fold"
        );

        // The second fold: one row, one key.
        until_answered(&mut writer, &mut refolded, &fail, &healthy, 10).expect("fold");
        assert_eq!(usage_of(&writer, 1).0, "k1 during");
        assert_eq!(log_len(&writer), 0);
        assert!(writer.fold.is_none() && healthy.load(Ordering::Acquire));
    }

    /// A step that fails ends the fold with an error for whoever waits on
    /// it and an unhealthy store; what it wrote before stays (newer than
    /// what the row held), the log it set aside stays whole, and the next
    /// fold folds it and then the log the passes wrote meanwhile before it
    /// answers.
    #[test]
    fn a_fold_that_fails_midway_keeps_the_log_for_the_next() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut writer, fail, healthy) = writer_with_log(dir.path());
        let (fold, mut folded) = job(Write::Fold);
        writer.step(vec![fold], &fail, &healthy);
        for _ in 0..10 {
            if usage_of(&writer, 1).0 != "created" {
                break;
            }
            writer.step(Vec::new(), &fail, &healthy);
        }
        assert_eq!(usage_of(&writer, 1).0, "k1 new", "one key written");
        fail.store(true, Ordering::Release);
        writer.step(Vec::new(), &fail, &healthy);
        assert!(matches!(
            answered(&mut folded),
            Some(Err(StoreError::Unavailable))
        ));
        assert!(writer.fold.is_none());
        assert!(!healthy.load(Ordering::Acquire));
        assert_eq!(log_len(&writer), 6);
        assert_eq!(usage_of(&writer, 1).0, "k1 new", "the step before stays");
        assert_eq!(usage_of(&writer, 2).0, "created");

        fail.store(false, Ordering::Release);
        let (pass, mut passed) = job(logged(&[(2, "k2 after", 16)]));
        writer.step(vec![pass], &fail, &healthy);
        assert!(matches!(answered(&mut passed), Some(Ok(()))));
        let (fold, mut folded) = job(Write::Fold);
        writer.step(vec![fold], &fail, &healthy);
        until_answered(&mut writer, &mut folded, &fail, &healthy, 20).expect("fold");
        assert_eq!(usage_of(&writer, 1).0, "k1 new");
        assert_eq!(usage_of(&writer, 2).0, "k2 after");
        assert_eq!(usage_of(&writer, 3).0, "k3 new");
        assert_eq!(log_len(&writer), 0);
    }

    /// A fold asked for while another is under way, and no write after
    /// it: the writer thread starts it once the first ends, rather than
    /// waiting for a write that does not come (a drain's last fold came
    /// during the flusher's and never answered). Everything is queued
    /// before the writer runs, the first fold with a group's worth of
    /// writes so that the second comes in a later group, between the
    /// first fold's steps; the queue then closes, and the writer returns
    /// once nothing is left to do.
    #[test]
    fn a_fold_asked_for_during_another_starts_when_it_ends() {
        let dir = tempfile::tempdir().expect("dir");
        let (writer, fail, healthy) = writer_with_log(dir.path());
        let (sender, jobs) = mpsc::channel();
        let queue = |write| {
            let (job, answer) = job(write);
            sender.send(job).expect("queued");
            answer
        };
        let mut first = queue(Write::Fold);
        for _ in 1..MAX_GROUP {
            queue(Write::Usage {
                rows: Vec::new(),
                events: Vec::new(),
            });
        }
        let mut second = queue(Write::Fold);
        drop(sender);
        run_writer(writer, jobs, &fail, &healthy);
        assert!(matches!(answered(&mut first), Some(Ok(()))));
        assert!(
            matches!(answered(&mut second), Some(Ok(()))),
            "the second fold was never started"
        );
    }

    /// A key deleted between a fold's listing and its writing, and a key
    /// created meanwhile on the row number it left: the fold writes the
    /// deleted key's logged usage and billing nowhere, not into the new
    /// key's row.
    #[test]
    fn a_fold_writes_nothing_into_a_key_created_on_a_deleted_keys_row() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut writer, fail, healthy) = writer_with_log(dir.path());
        let (fold, mut folded) = job(Write::Fold);
        writer.step(vec![fold], &fail, &healthy);
        let mut at = Vec::new();
        for _ in 0..4 {
            writer.step(Vec::new(), &fail, &healthy);
            at.push(writer.fold.as_ref().map(|f| f.at.clone()));
        }
        let finding = |after: &str| {
            Some(FoldAt::Finding {
                after: after.into(),
            })
        };
        assert_eq!(
            at,
            [
                Some(FoldAt::Listing { after: 4, upto: 6 }),
                finding(""),
                finding("k2"),
                Some(FoldAt::Writing { after: 0, last: 3 }),
            ],
            "the six log rows are listed, their three keys found two a step, no key written yet"
        );

        let (delete, _) = job(Write::Delete {
            key_id: "k3".into(),
        });
        let (new_key, _) = job(create(4, 20));
        writer.step(vec![delete, new_key], &fail, &healthy);
        let row: i64 = writer
            .conn
            .query_row("SELECT rowid FROM keys WHERE key_id = 'k4'", [], |r| {
                r.get(0)
            })
            .expect("k4");
        assert_eq!(row, 3, "k4 took k3's row number");

        until_answered(&mut writer, &mut folded, &fail, &healthy, 10).expect("fold");
        assert_eq!(usage_of(&writer, 1).0, "k1 new");
        assert_eq!(usage_of(&writer, 4), ("created".into(), "{}".into(), 20));
        assert_eq!(log_len(&writer), 0);
    }

    /// Opening a store whose last fold did not finish folds the log it
    /// set aside and the one written after it, newest state winning.
    #[test]
    fn opening_folds_a_log_a_fold_left_and_the_one_after_it() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut writer, fail, healthy) = writer_with_log(dir.path());
        let (fold, mut folded) = job(Write::Fold);
        writer.step(vec![fold], &fail, &healthy);
        let (pass, _) = job(logged(&[(3, "k3 after", 16)]));
        writer.step(vec![pass], &fail, &healthy);
        assert!(answered(&mut folded).is_none());
        drop(writer);

        let (disk, max_seq, keys) =
            Disk::open(dir.path(), Arc::new(AtomicBool::new(true))).expect("open");
        assert_eq!((max_seq, keys), (16, 3));
        disk.close();
        let writer = Writer::new(writer_connection(&dir.path().join(FILE)).expect("open"));
        assert_eq!(usage_of(&writer, 1).0, "k1 new");
        assert_eq!(usage_of(&writer, 2).0, "k2 new");
        assert_eq!(usage_of(&writer, 3).0, "k3 after");
        assert_eq!(log_len(&writer), 0);
    }

    /// A fold step reads the rows of the keys it writes, not every row
    /// between them: two keys logged at the two ends of 2,000 rows take
    /// under 500 of SQLite's steps, where reading the rows between took
    /// over 10,000.
    #[test]
    fn a_fold_step_reads_only_the_rows_it_writes() {
        let dir = tempfile::tempdir().expect("dir");
        let mut writer = Writer::new(writer_connection(&dir.path().join(FILE)).expect("open"));
        let (fail, healthy) = (AtomicBool::new(false), AtomicBool::new(true));
        let creates = (0..2_000u64)
            .map(|n| {
                job(Write::Create {
                    key_id: format!("k{n:04}"),
                    hash: {
                        let mut hash = [0u8; 32];
                        hash[..8].copy_from_slice(&n.to_le_bytes());
                        hash
                    },
                    external_id: None,
                    record: "{}".into(),
                    usage: "created".into(),
                    seq: n + 1,
                })
                .0
            })
            .collect();
        writer.step(creates, &fail, &healthy);
        let row = |key_id: &str, seq: u64| UsageRow {
            key_id: key_id.into(),
            usage: format!("{key_id} logged").into_bytes(),
            billing: "{}".into(),
            seq,
        };
        let (pass, _) = job(Write::Usage {
            rows: vec![row("k0000", 5_000), row("k1999", 5_001)],
            events: Vec::new(),
        });
        let (fold, mut folded) = job(Write::Fold);
        writer.step(vec![pass, fold], &fail, &healthy);
        until_answered(&mut writer, &mut folded, &fail, &healthy, 10).expect("fold");
        let logged = |key_id: &str| -> String {
            writer
                .conn
                .query_row("SELECT usage FROM keys WHERE key_id = ?1", [key_id], |r| {
                    text(r, 0)
                })
                .expect("row")
        };
        assert_eq!(logged("k0000"), "k0000 logged");
        assert_eq!(logged("k1999"), "k1999 logged");
        assert_eq!(logged("k1000"), "created");
        let steps = writer
            .conn
            .prepare_cached(FOLD_STEP)
            .expect("step")
            .get_status(rusqlite::StatementStatus::VmStep);
        assert!(steps < 500, "the fold's step took {steps} VM steps");
    }

    /// A log set aside is folded on its own: a key the passes have logged
    /// again since is left out (its row keeps what it held, the newer
    /// state waits in the new log for its fold), the others are written,
    /// and the new log stays as it is. Setting aside while a log is aside
    /// does nothing; folding with none aside does nothing.
    #[test]
    fn a_fold_of_the_log_set_aside_leaves_keys_logged_again_to_the_next() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut writer, fail, healthy) = writer_with_log(dir.path());
        let (aside, mut set) = job(Write::SetAside);
        let (pass, _) = job(logged(&[(2, "k2 later", 16)]));
        let (again, mut set_again) = job(Write::SetAside);
        writer.step(vec![aside, pass, again], &fail, &healthy);
        assert!(matches!(answered(&mut set), Some(Ok(()))));
        assert!(matches!(answered(&mut set_again), Some(Ok(()))));
        assert_eq!(
            (
                table_len(&writer, "usage_log_folding"),
                table_len(&writer, "usage_log")
            ),
            (6, 1)
        );

        let (fold, mut folded) = job(Write::FoldAside);
        writer.step(vec![fold], &fail, &healthy);
        until_answered(&mut writer, &mut folded, &fail, &healthy, 20).expect("fold");
        assert_eq!(usage_of(&writer, 1).0, "k1 new");
        assert_eq!(usage_of(&writer, 2).0, "created");
        assert_eq!(usage_of(&writer, 3).0, "k3 new");
        assert!(!folding_log_left(&writer.conn).expect("schema"));
        assert_eq!(table_len(&writer, "usage_log"), 1);

        let (fold, mut folded) = job(Write::FoldAside);
        writer.step(vec![fold], &fail, &healthy);
        assert!(matches!(answered(&mut folded), Some(Ok(()))));
        assert_eq!(
            table_len(&writer, "usage_log"),
            1,
            "nothing aside, nothing folded"
        );

        let (fold, mut folded) = job(Write::Fold);
        writer.step(vec![fold], &fail, &healthy);
        until_answered(&mut writer, &mut folded, &fail, &healthy, 20).expect("fold");
        assert_eq!(
            usage_of(&writer, 2),
            ("k2 later".into(), "{\"at\":\"k2 later\"}".into(), 16)
        );
        assert_eq!(log_len(&writer), 0);
    }

    /// A key logged many times over is looked up in `keys` once a fold,
    /// not once for every few log rows that hold it: two keys logged 100
    /// times each, listed 10 rows a step, are found in under 200 of
    /// SQLite's steps (67 when written; looked up at each of the 20
    /// listing steps, they were looked up 20 times), and the newest row of
    /// each is what the fold writes.
    #[test]
    fn a_fold_looks_each_logged_key_up_once() {
        let dir = tempfile::tempdir().expect("dir");
        let mut writer = Writer::new(writer_connection(&dir.path().join(FILE)).expect("open"));
        (writer.batch, writer.rows) = (1, 10);
        let (fail, healthy) = (AtomicBool::new(false), AtomicBool::new(true));
        let mut jobs = vec![job(create(1, 1)).0, job(create(2, 2)).0];
        for pass in 0..100u64 {
            let (a, b) = (format!("k1 {pass}"), format!("k2 {pass}"));
            jobs.push(job(logged(&[(1, &a, 10 + 2 * pass), (2, &b, 11 + 2 * pass)])).0);
        }
        let (fold, mut folded) = job(Write::Fold);
        jobs.push(fold);
        writer.step(jobs, &fail, &healthy);
        until_answered(&mut writer, &mut folded, &fail, &healthy, 40).expect("fold");
        assert_eq!(usage_of(&writer, 1).0, "k1 99");
        assert_eq!(usage_of(&writer, 2).0, "k2 99");
        assert_eq!(log_len(&writer), 0);
        let steps = writer
            .conn
            .prepare_cached(FOLD_FIND)
            .expect("find")
            .get_status(rusqlite::StatementStatus::VmStep);
        assert!(steps < 200, "finding the keys took {steps} VM steps");
    }

    /// Each write that uses a `seq` raises the one `meta` keeps, in its
    /// own transaction; opening reads that one, not every key's row.
    #[test]
    fn opening_reads_the_highest_seq_kept_with_the_writes() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut writer, fail, healthy) = writer_with_log(dir.path());
        assert_eq!(kept_seq(&writer.conn).expect("read"), Some(15));
        let (update, _) = job(Write::Update {
            key_id: "k1".into(),
            external_id: None,
            record: "{}".into(),
            usage: "admin".into(),
            seq: 20,
        });
        let (delete, _) = job(Write::Delete {
            key_id: "k1".into(),
        });
        writer.step(vec![update, delete], &fail, &healthy);
        // Gone with its key from `keys`, kept in `meta`.
        assert_eq!(kept_seq(&writer.conn).expect("read"), Some(20));
        // Higher than any row: a scan would not find it.
        writer
            .conn
            .execute("UPDATE meta SET value = 500 WHERE name = 'seq'", [])
            .expect("raise");
        drop(writer);
        let (disk, max_seq, keys) =
            Disk::open(dir.path(), Arc::new(AtomicBool::new(true))).expect("open");
        assert_eq!((max_seq, keys), (500, 2));
        disk.close();
    }

    /// A store of schema 6 keeps no `seq`: the first opening finds it in
    /// every row, the usage logs' included (here only a log a fold set
    /// aside holds the highest), and keeps it from then on.
    #[test]
    fn a_store_before_schema_7_gets_its_highest_seq_from_its_rows_once() {
        let dir = tempfile::tempdir().expect("dir");
        let (mut writer, fail, healthy) = writer_with_log(dir.path());
        let (fold, _) = job(Write::Fold);
        writer.step(vec![fold], &fail, &healthy);
        writer
            .conn
            .execute_batch("DROP TABLE meta; PRAGMA user_version = 6;")
            .expect("schema 6");
        drop(writer);
        let (disk, max_seq, keys) =
            Disk::open(dir.path(), Arc::new(AtomicBool::new(true))).expect("open");
        assert_eq!((max_seq, keys), (15, 3));
        disk.close();
        let conn = writer_connection(&dir.path().join(FILE)).expect("open");
        assert_eq!(kept_seq(&conn).expect("read"), Some(15));
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, SCHEMA_VERSION);
    }
}
