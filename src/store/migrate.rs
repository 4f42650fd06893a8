//! `tollgate migrate`: copies the store of an earlier tollgate (sled 0.34)
//! into this version's SQLite store.
//!
//! Earlier versions kept keys in sled trees (`records`: key id → record
//! JSON, `usage`: key id → usage JSON); the record's JSON is the same
//! today and is copied as it is, the usage is read and written in this
//! store's binary form ([`super::codec`]). The copy is built beside the
//! target and moved into place whole, so a migration cut off half-way
//! leaves nothing a gateway would start on. Into a store that already
//! exists, keys are added and a key id already there is kept: running it
//! twice changes nothing.

use std::path::Path;

use anyhow::{bail, Context};

use super::codec;
use super::local::{lock_dir, Local};
use super::sqlite::{self, Row};
use crate::keys::KeyHash;
use crate::ledger::KeyRecord;

/// Keys per transaction.
const BATCH: usize = 1000;

/// Whether `dir` holds a sled store (sled's `conf` and `db` files).
pub fn holds_sled(dir: &Path) -> bool {
    dir.join("conf").is_file() && dir.join("db").is_file()
}

/// Copies every key of the sled store in `from` into the store in `to`
/// (which may be the same directory). Returns how many keys `from` holds.
pub fn from_sled(from: &Path, to: &Path) -> anyhow::Result<usize> {
    if !holds_sled(from) {
        bail!(
            "{} does not hold a sled store (no conf and db files)",
            from.display()
        );
    }
    let sled = sled::Config::new().path(from).open().with_context(|| {
        format!(
            "cannot open the sled store {} (is a gateway using it?)",
            from.display()
        )
    })?;
    let records = sled.open_tree("records")?;
    let usage = sled.open_tree("usage")?;

    let lock = lock_dir(to).with_context(|| format!("cannot lock {}", to.display()))?;
    let target = to.join(sqlite::FILE);
    let staging = to.join("migrating");
    let building = !target.exists();
    let store = if building {
        if staging.exists() {
            std::fs::remove_dir_all(&staging)
                .with_context(|| format!("cannot clear {}", staging.display()))?;
        }
        Local::open(&staging)?
    } else {
        Local::open_locked(to, lock.try_clone()?)?
    };

    let mut copied = 0;
    let mut batch = Vec::with_capacity(BATCH);
    for item in records.iter() {
        let (id, record_json) = item?;
        let key_id = String::from_utf8_lossy(&id).into_owned();
        let record_text = String::from_utf8(record_json.to_vec())
            .with_context(|| format!("key {key_id}: the record is not UTF-8"))?;
        let record: KeyRecord = serde_json::from_str(&record_text)
            .with_context(|| format!("key {key_id}: cannot read its record"))?;
        let hash = KeyHash::from_hex(&record.hash)
            .with_context(|| format!("key {key_id}: its record holds no valid hash"))?;
        let usage = match usage.get(&id)? {
            Some(json) => codec::usage(&json)
                .map_err(|e| anyhow::anyhow!("key {key_id}: cannot read its usage: {e}"))?,
            None => crate::ledger::Usage::default(),
        };
        let row = Row {
            key_id,
            record: record_text,
            usage: codec::usage_bytes(&usage),
            seq: 0,
            billing: codec::billing_bytes(&crate::ledger::Billing::default()),
        };
        batch.push((row, hash, record.external_id));
        copied += 1;
        if batch.len() == BATCH {
            store.import_blocking(std::mem::take(&mut batch))?;
        }
    }
    if !batch.is_empty() {
        store.import_blocking(batch)?;
    }
    // Closes every connection, which folds the WAL into the database file.
    drop(store);
    if building {
        // The database file last: it is what a gateway looks for.
        for suffix in ["-wal", "-shm", ""] {
            let from = staging.join(format!("{}{suffix}", sqlite::FILE));
            if from.exists() {
                let to = to.join(format!("{}{suffix}", sqlite::FILE));
                std::fs::rename(&from, &to).with_context(|| {
                    format!("cannot move {} to {}", from.display(), to.display())
                })?;
            }
        }
        let _ = std::fs::remove_dir_all(&staging);
    }
    drop(lock);
    Ok(copied)
}

/// What [`to_redis`] copied.
pub struct Copied {
    /// Keys in the embedded store.
    pub keys: usize,
    /// Keys that were not in Redis yet.
    pub new_keys: usize,
    /// Outbox events (pending and parked) that were not in Redis yet.
    pub new_events: usize,
}

/// Copies every key (its hash, never the key), record, usage, billing
/// state, external id and outbox event of the embedded store in `from`
/// into the Redis at `redis` (SPEC §8). Run it with the gateway stopped
/// (it takes the store's lock). A key id or event id already in Redis is
/// left as it is, so running it twice changes nothing.
pub fn to_redis(from: &Path, redis: &crate::config::RedisConfig) -> anyhow::Result<Copied> {
    if holds_sled(from) && !from.join(sqlite::FILE).exists() {
        bail!(
            "{} holds an earlier version's store: run `tollgate migrate --from {0}` first",
            from.display()
        );
    }
    if !from.join(sqlite::FILE).exists() {
        bail!("{} holds no tollgate store", from.display());
    }
    let local = Local::open(from)
        .with_context(|| format!("cannot open {} (is a gateway using it?)", from.display()))?;
    let shared = super::redis::Redis::open(redis, "migrate".into(), None)
        .with_context(|| format!("cannot connect to {}", redacted(&redis.url)))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut copied = Copied {
        keys: 0,
        new_keys: 0,
        new_events: 0,
    };
    let mut after = String::new();
    loop {
        let rows = local.rows_after(&after, BATCH)?;
        let Some(last) = rows.last() else { break };
        after = last.0.key_id.clone();
        copied.keys += rows.len();
        let rows = rows
            .into_iter()
            .map(|(row, hash, ext)| {
                let hash = <[u8; 32]>::try_from(hash.as_slice())
                    .map(KeyHash)
                    .map_err(|_| anyhow::anyhow!("key {}: its hash is not 32 bytes", row.key_id))?;
                Ok((row, hash, ext))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        copied.new_keys += rt
            .block_on(shared.import(rows))
            .context("cannot copy keys into Redis")?;
    }
    copied.new_events = rt
        .block_on(shared.import_events(local.outbox_all()?))
        .context("cannot copy outbox events into Redis")?;
    Ok(copied)
}

/// A Redis URL without its password, for messages.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}
