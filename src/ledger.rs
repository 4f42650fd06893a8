//! What the gateway keeps per key: the [`KeyRecord`] an operator writes
//! through the admin API, and the [`Usage`] that requests charge.
//!
//! The two are stored apart because they have different durability: a record
//! is flushed to disk before an admin write is acknowledged, usage is written
//! behind (SPEC §7). Both are plain data with serde; `Usage::settle` applies
//! lazy, calendar-aligned refills.

use std::collections::BTreeMap;

use compact_str::CompactString;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use smallvec::SmallVec;

use crate::clock::Now;
use crate::config::{Credits, Pool, PoolWindow, Tier};
use crate::keys::KeyHash;
use crate::window::Window;

/// Values by name, in name order: a key's state per rate limit and per
/// pool. A tier has a handful of each, so a sorted list: names and values
/// in one allocation, found with one short search. (A `BTreeMap` took a
/// ~1 KB node for one entry and two searches a lookup; with many keys in
/// use their state is seldom in the CPU's cache, and every request reads
/// it.) A name of up to 24 bytes is held in the list itself, not in an
/// allocation of its own: the search reads it beside the value rather than
/// missing the cache once more per name. The first entry is in no
/// allocation at all but beside the key's other usage (a tier has one
/// rate limit or one pool more often than more): a request reads it
/// without first reading where the list's entries are, another cache line
/// apart. Stored as the JSON object the `BTreeMap` was.
#[derive(Debug, Clone, PartialEq)]
pub struct Named<V>(List<V>);

/// A [`Named`]'s entries, the first of them inline.
type List<V> = SmallVec<[(CompactString, V); 1]>;

impl<V> Default for Named<V> {
    fn default() -> Self {
        Named(List::new())
    }
}

impl<V> Named<V> {
    fn find(&self, name: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(n, _)| n.as_str().cmp(name))
    }

    pub fn get(&self, name: &str) -> Option<&V> {
        self.find(name).ok().map(|i| &self.0[i].1)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut V> {
        let i = self.find(name).ok()?;
        Some(&mut self.0[i].1)
    }

    /// The value under `name`, created empty if absent (a name is
    /// allocated only then).
    pub fn slot(&mut self, name: &str) -> &mut V
    where
        V: Default,
    {
        let i = self.find(name).unwrap_or_else(|at| {
            self.0.insert(at, (CompactString::from(name), V::default()));
            at
        });
        &mut self.0[i].1
    }

    /// Puts `value` under `name`; the value it replaces, if any.
    pub fn insert(&mut self, name: String, value: V) -> Option<V> {
        match self.find(&name) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, value)),
            Err(at) => {
                self.0.insert(at, (CompactString::from(name), value));
                None
            }
        }
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&str, &mut V) -> bool) {
        self.0.retain_mut(|(name, value)| keep(name, value));
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(name, _)| name.as_str())
    }

    /// In name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &V)> {
        self.0.iter().map(|(name, value)| (name.as_str(), value))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl<V: Serialize> Serialize for Named<V> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Named<V> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Entries<V> {
            type Value = Named<V>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object of names")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut entries: A,
            ) -> Result<Named<V>, A::Error> {
                let mut all = List::with_capacity(entries.size_hint().unwrap_or(0).min(16));
                while let Some(entry) = entries.next_entry::<CompactString, V>()? {
                    all.push(entry);
                }
                // Sorted whatever order the object gave (not an insert
                // each: quadratic in a long object), and a name given
                // twice keeps its last value, as a map's would: latest
                // first, a stable sort, then the first of each name.
                all.reverse();
                all.sort_by(|(a, _), (b, _)| a.cmp(b));
                all.dedup_by(|(later, _), (kept, _)| later == kept);
                Ok(Named(all))
            }
        }
        deserializer.deserialize_map(Entries(std::marker::PhantomData))
    }
}

/// A key as the operator sees it. Never holds the key itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    /// Held inline (up to 24 bytes), like `tier`: every request reads both.
    pub key_id: CompactString,
    /// Hex SHA-256 of the key.
    pub hash: String,
    /// Prefix plus the first random characters, to recognise a key.
    pub start: String,
    pub tier: CompactString,
    pub external_id: Option<String>,
    pub name: Option<String>,
    #[serde(default)]
    pub meta: Map<String, Value>,
    pub enabled: bool,
    pub expires_at: Option<Timestamp>,
    pub created_at: Timestamp,
    /// Aligns a monthly credit refill to this day (a customer's billing date).
    pub refill_day: Option<u8>,
}

impl KeyRecord {
    /// An enabled key with nothing optional set.
    pub fn new(
        key_id: String,
        hash: &KeyHash,
        start: &str,
        tier: &str,
        created_at: Timestamp,
    ) -> KeyRecord {
        KeyRecord {
            key_id: key_id.into(),
            hash: hash.to_hex(),
            start: start.to_string(),
            tier: tier.into(),
            external_id: None,
            name: None,
            meta: Map::new(),
            enabled: true,
            expires_at: None,
            created_at,
            refill_day: None,
        }
    }
}

/// A key's balances and counters. Stored as JSON, a field that is `None`,
/// or that has a default it reads back as when absent, is left out when
/// it holds that (builds before this read it the same): every charged key
/// is written a few times a second under load, and two
/// `"period_start":null` were a twelfth of a row.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// Credits left; `None` while the key has never been on a limited tier.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
    /// Start of the current credit period (the last refill boundary).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period_start: Option<Timestamp>,
    /// Credits charged this period.
    pub used: u64,
    /// Units served past 0 credits this period (`overage: allow`).
    pub overage: u64,
    #[serde(default, skip_serializing_if = "Named::is_empty")]
    pub rate: Named<Window>,
    #[serde(default, skip_serializing_if = "Named::is_empty")]
    pub pools: Named<PoolUsage>,
    /// What billing events have said of this key. Stored apart from the
    /// rest (see [`crate::store::sqlite::Row::billing`]).
    #[serde(skip)]
    pub billing: Billing,
}

/// A key's billing state, kept in its usage so that it is written in the
/// same store write as the counters it describes. Fields at their default
/// are left out of its JSON (a key that reports nothing writes
/// `{"credits":n}`); every field reads as its default when absent.
///
/// Totals only grow (net of refunds). An event reports `total - reported`
/// and raises `reported` in the same write that puts the event in the
/// outbox: after any crash, what the counters show and what the events
/// said agree. A refund of units already reported is netted against the
/// next ones.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Billing {
    /// Credits charged since the key was created (the full cost, overage
    /// included), net of refunds.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub credits: u64,
    /// Overage units served since the key was created, net of refunds.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub overage: u64,
    /// How much of each total (`credits`, `overage`, a pool's name) events
    /// have reported.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reported: BTreeMap<String, u64>,
    /// The credit period `notified` and `exceeded` speak of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notified_period: Option<Timestamp>,
    /// Thresholds (in millionths) already notified in that period.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notified: Vec<u32>,
    /// Whether `usage.exceeded` was notified in that period.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exceeded: bool,
    /// Thresholds crossed and exhaustion, detected by the gate and not yet
    /// in the outbox.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub detected: Vec<Detected>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Something the gate noticed that billing must hear about.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detected {
    /// `None`: credits hit 0 (`usage.exceeded`); else the threshold crossed.
    pub threshold: Option<f64>,
    pub at: Timestamp,
    pub period_start: Option<Timestamp>,
}

impl Billing {
    /// Notes what crossing into this usage means: each threshold of
    /// `thresholds` (fractions of the period's credits used) once per
    /// period, and credits reaching 0 once per period.
    pub fn detect(
        &mut self,
        thresholds: &[f64],
        used: u64,
        remaining: u64,
        period_start: Option<Timestamp>,
        now: Timestamp,
    ) {
        if self.notified_period != period_start {
            self.notified_period = period_start;
            self.notified.clear();
            self.exceeded = false;
        }
        let allowance = used.saturating_add(remaining);
        for &t in thresholds {
            let millionths = (t * 1e6).round() as u32;
            if allowance > 0
                && used as f64 >= t * allowance as f64
                && !self.notified.contains(&millionths)
            {
                self.notified.push(millionths);
                self.detected.push(Detected {
                    threshold: Some(t),
                    at: now,
                    period_start,
                });
            }
        }
        if remaining == 0 && !self.exceeded {
            self.exceeded = true;
            self.detected.push(Detected {
                threshold: None,
                at: now,
                period_start,
            });
        }
    }

    /// `total` not yet reported under `counter`.
    pub fn unreported(&self, counter: &str, total: u64) -> u64 {
        total.saturating_sub(self.reported.get(counter).copied().unwrap_or(0))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PoolUsage {
    /// Rolling pools count here.
    #[serde(default, skip_serializing_if = "is_unused")]
    pub window: Window,
    /// Calendar pools count here, per period.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub used: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period_start: Option<Timestamp>,
    /// Everything ever charged: shown for pools a tier does not define.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub total: u64,
}

/// A calendar pool's window: never counted in, as it reads back when absent.
fn is_unused(window: &Window) -> bool {
    *window == Window::default()
}

impl PoolUsage {
    /// Units counted against `pool` at `now`, and when that count next
    /// drops: far enough for `units` more (rolling), or to zero (calendar).
    pub fn standing(&mut self, pool: &Pool, units: u64, now: Now) -> (u64, Option<Timestamp>) {
        match pool.window {
            PoolWindow::Rolling(window) => {
                let (window_ms, now_ms) = (duration_ms(window), now.steady_ms);
                let used = self.window.used(window_ms, now_ms);
                let at = match self
                    .window
                    .wait_ms(units, pool.limit.get(), window_ms, now_ms)
                {
                    Some(wait) if wait > 0 => Some(now_ms + wait),
                    _ => self.window.oldest_expiry_ms(window_ms, now_ms),
                };
                (used, at.and_then(|ms| now.wall_at(ms)))
            }
            PoolWindow::Calendar(interval) => (self.used, interval.next_start(now.wall)),
        }
    }
}

impl Usage {
    /// Fresh usage for a new key: `credits` overrides the tier's allowance.
    pub fn new(tier: &Tier, credits: Option<u64>, refill_day: Option<u8>, now: Timestamp) -> Usage {
        let mut usage = Usage::default();
        if let Credits::Limited(initial) = tier.credits {
            usage.remaining = Some(credits.unwrap_or(initial));
        }
        usage.period_start = credit_period_start(tier, refill_day, now);
        usage
    }

    /// Applies every refill and pool reset due at `now`. Idempotent.
    pub fn settle(&mut self, tier: &Tier, refill_day: Option<u8>, now: Timestamp) {
        // Limits the tier no longer has (a plan change, a reload) are
        // forgotten. Looked for first: a retain walks the map as if to
        // change it, on every request.
        let kept = |name: &str| tier.rate_limits.contains_key(name);
        if !self.rate.keys().all(kept) {
            self.rate.retain(|name, _| kept(name));
        }
        if let Credits::Limited(initial) = tier.credits {
            if self.remaining.is_none() {
                // First time on a limited tier: start with its allowance,
                // in the current period.
                self.remaining = Some(initial);
                self.period_start = credit_period_start(tier, refill_day, now);
            }
        }
        if let Some(refill) = tier.refill {
            let boundary = refill.interval.with_day(refill_day).period_start(now);
            if boundary.is_some() && self.period_start < boundary {
                self.remaining = Some(refill.amount);
                self.used = 0;
                self.overage = 0;
                self.period_start = boundary;
            }
        }
        for (name, pool) in &tier.pools {
            if let PoolWindow::Calendar(interval) = pool.window {
                let boundary = interval.period_start(now);
                let state = self.pools.slot(name);
                if boundary.is_some() && state.period_start < boundary {
                    state.used = 0;
                    state.period_start = boundary;
                }
            }
        }
    }

    /// When credits next refill, if they ever do.
    pub fn next_refill(tier: &Tier, refill_day: Option<u8>, now: Timestamp) -> Option<Timestamp> {
        tier.refill
            .and_then(|r| r.interval.with_day(refill_day).next_start(now))
    }
}

/// What a plan change does to the remaining credits (SPEC §4).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CreditPolicy {
    /// `max(0, r + b - a)`: keep what is left, plus the difference in
    /// allowance between the new plan (`b`) and the old (`a`).
    #[default]
    Prorate,
    /// The new plan's allowance.
    Reset,
    /// What is left, unchanged.
    Keep,
}

impl Usage {
    /// Moves a key from `old` (if it still exists) to `new`. Call after
    /// settling under the old tier. The new period starts from the new
    /// tier's latest boundary, so no refill fires on the next request.
    pub fn change_plan(
        &mut self,
        old: Option<&Tier>,
        new: &Tier,
        policy: CreditPolicy,
        refill_day: Option<u8>,
        now: Timestamp,
    ) {
        match (
            new.credits,
            self.remaining
                .filter(|_| old.is_some_and(|t| t.credits != Credits::Unlimited)),
        ) {
            (Credits::Unlimited, _) => self.remaining = None,
            // From unlimited (or never limited): the new plan's credits.
            (Credits::Limited(initial), None) => self.remaining = Some(initial),
            (Credits::Limited(initial), Some(r)) => {
                let b = credit_limit(new).unwrap_or(initial);
                let a = old.and_then(credit_limit).unwrap_or(b);
                self.remaining = Some(match policy {
                    CreditPolicy::Prorate => r.saturating_add(b).saturating_sub(a),
                    CreditPolicy::Reset => b,
                    CreditPolicy::Keep => r,
                });
            }
        }
        self.period_start = credit_period_start(new, refill_day, now);
    }
}

fn credit_period_start(tier: &Tier, refill_day: Option<u8>, now: Timestamp) -> Option<Timestamp> {
    tier.refill
        .and_then(|r| r.interval.with_day(refill_day).period_start(now))
}

/// A tier's nominal credit allowance per period: the refill amount, or the
/// one-off credits when it never refills. `None` when unlimited.
pub fn credit_limit(tier: &Tier) -> Option<u64> {
    match (tier.credits, tier.refill) {
        (Credits::Unlimited, _) => None,
        (Credits::Limited(_), Some(r)) => Some(r.amount),
        (Credits::Limited(n), None) => Some(n),
    }
}

pub fn duration_ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One change to a map of names, as `Named` and `BTreeMap` both take it.
    #[derive(Debug, Clone)]
    enum Change {
        Slot(String, u64),
        Insert(String, u64),
        Retain(u64),
    }

    fn change() -> impl proptest::strategy::Strategy<Value = Change> {
        use proptest::prelude::*;
        let name = "[a-d]{0,3}";
        prop_oneof![
            (name, any::<u64>()).prop_map(|(n, v)| Change::Slot(n, v)),
            (name, any::<u64>()).prop_map(|(n, v)| Change::Insert(n, v)),
            (2u64..5).prop_map(Change::Retain),
        ]
    }

    proptest::proptest! {
        /// `Named` holds what the `BTreeMap` it replaces would, and is
        /// stored and read back as the same JSON object, names in order.
        #[test]
        fn named_values_behave_and_are_stored_as_a_map(changes in proptest::collection::vec(change(), 0..40)) {
            let (mut named, mut map) = (Named::<u64>::default(), BTreeMap::<String, u64>::new());
            for c in &changes {
                match c {
                    Change::Slot(n, v) => {
                        *named.slot(n) += v % 100;
                        *map.entry(n.clone()).or_default() += v % 100;
                    }
                    Change::Insert(n, v) => {
                        proptest::prop_assert_eq!(named.insert(n.clone(), *v), map.insert(n.clone(), *v));
                    }
                    Change::Retain(m) => {
                        named.retain(|_, v| *v % m != 0);
                        map.retain(|_, v| *v % m != 0);
                    }
                }
                for name in ["", "a", "ab", "dd", "x"] {
                    proptest::prop_assert_eq!(named.get(name), map.get(name));
                }
            }
            let json = serde_json::to_string(&named).expect("json");
            proptest::prop_assert_eq!(&json, &serde_json::to_string(&map).expect("json"));
            proptest::prop_assert_eq!(named.keys().collect::<Vec<_>>(), map.keys().map(String::as_str).collect::<Vec<_>>());
            proptest::prop_assert_eq!(serde_json::from_str::<Named<u64>>(&json).expect("read"), named);
        }
    }

    #[test]
    fn a_name_stored_twice_reads_as_its_last_value() {
        let text = r#"{"b":1,"c":0,"a":2,"b":3,"b":4}"#;
        let named: Named<u64> = serde_json::from_str(text).expect("read");
        assert_eq!(
            named.iter().collect::<Vec<_>>(),
            [("a", &2), ("b", &4), ("c", &0)]
        );
        let map: BTreeMap<String, u64> = serde_json::from_str(text).expect("read");
        assert_eq!(
            named.keys().collect::<Vec<_>>(),
            map.keys().map(String::as_str).collect::<Vec<_>>()
        );
        assert_eq!(named.get("b"), map.get("b"));
        assert!(serde_json::from_str::<Named<u64>>("[1]").is_err());
    }

    #[test]
    fn stored_usage_leaves_out_what_is_none_and_reads_either_form() {
        let mut usage = Usage {
            used: 3,
            ..Usage::default()
        };
        usage.pools.insert("exports".into(), PoolUsage::default());
        let json = serde_json::to_string(&usage).expect("json");
        assert_eq!(json, r#"{"used":3,"overage":0,"pools":{"exports":{}}}"#);
        assert_eq!(serde_json::from_str::<Usage>(&json).expect("read"), usage);
        // As builds before this one wrote it.
        let older = r#"{"remaining":null,"period_start":null,"used":3,"overage":0,"rate":{},
            "pools":{"exports":{"used":0,"period_start":null,"total":0}}}"#;
        assert_eq!(serde_json::from_str::<Usage>(older).expect("read"), usage);
        // What is there is written.
        let start: Timestamp = "2026-12-01T00:00:00Z".parse().expect("timestamp");
        usage.remaining = Some(7);
        usage.period_start = Some(start);
        usage.rate.slot("requests").add(2, 60_000, 5);
        if let Some(pool) = usage.pools.get_mut("exports") {
            pool.period_start = Some(start);
            pool.used = 4;
            pool.total = 9;
            pool.window.add(1, 60_000, 5);
        }
        let json = serde_json::to_string(&usage).expect("json");
        let fields = [
            "\"remaining\":7",
            "\"requests\":{",
            "\"window\":{",
            "\"used\":4",
            "\"total\":9",
        ];
        for field in fields {
            assert!(json.contains(field), "{field} in {json}");
        }
        let start = "\"period_start\":\"2026-12-01T00:00:00Z\"";
        assert_eq!(json.matches(start).count(), 2, "{json}");
        assert_eq!(serde_json::from_str::<Usage>(&json).expect("read"), usage);
    }
}
