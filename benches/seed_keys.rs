//! Fills a store with many keys at once, for `benches/compare.sh`: creating
//! a million keys through the admin API would take minutes, and the load
//! test only needs them to exist. Writes the secrets, one per line, to a
//! file for wrk to pick from.
//!
//! ```sh
//! cargo build --release --example seed_keys
//! target/release/examples/seed_keys STORE_DIR TIER PREFIX COUNT KEYS_FILE
//! ```

use std::io::Write;

use tollgate::keys;
use tollgate::ledger::{KeyRecord, Usage};
use tollgate::store::{codec, sqlite, Store};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, tier, prefix, count, out] = args.as_slice() else {
        anyhow::bail!("usage: seed_keys STORE_DIR TIER PREFIX COUNT KEYS_FILE");
    };
    let count: usize = count.parse()?;
    let store = Store::open(std::path::Path::new(dir))?;
    let mut secrets = std::io::BufWriter::new(std::fs::File::create(out)?);
    let usage = codec::usage_bytes(&Usage::default());
    let billing = codec::billing_bytes(&tollgate::ledger::Billing::default());
    let now = jiff::Timestamp::now();
    let mut batch = Vec::with_capacity(10_000);
    for n in 0..count {
        let key = keys::generate(prefix);
        let record = KeyRecord::new(keys::generate_id(), &key.hash, &key.start, tier, now);
        writeln!(secrets, "{}", key.secret)?;
        let row = sqlite::Row {
            key_id: record.key_id.to_string(),
            record: serde_json::to_string(&record)?,
            usage: usage.clone(),
            seq: 0,
            billing: billing.clone(),
        };
        batch.push((row, key.hash, None));
        if batch.len() == 10_000 || n + 1 == count {
            store.import_blocking(std::mem::take(&mut batch))?;
        }
    }
    secrets.flush()?;
    Ok(())
}
