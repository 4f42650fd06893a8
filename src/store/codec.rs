//! How the embedded store writes a key's usage and billing state: a
//! binary form of LEB128 varints (the [`integer_encoding`] crate's), not
//! JSON.
//!
//! Every key in use is written a few times a second under load (see
//! [`super::local::REWRITE_AFTER_MS`]), and with many keys in use the
//! JSON was half of what a written row cost: field names, `serde_json`'s
//! escape scan of every string, a window's varints in base64 (callgrind:
//! BENCHMARKS.md, "Usage written in a binary form, not JSON", ~40% fewer
//! instructions a written row with it). The binary form is the
//! fields in a fixed order, each number a varint, each name its length
//! and bytes, each window its width, format and packed buckets (see
//! [`crate::window::Window::encode`]).
//!
//! A value starts with [`BINARY`]; JSON starts with `{`. Stores written
//! before schema 8 hold JSON, and a row keeps it until its key is written
//! again, so both are read. The shared store (Redis) keeps JSON: gateways
//! of an earlier version on the same Redis read it.
//!
//! ```text
//! usage:   BINARY, remaining?, period_start?, used, overage,
//!          n, n x (name, window),
//!          n, n x (name, window, used, period_start?, total)
//! billing: BINARY, credits, overage, n, n x (name, reported),
//!          notified_period?, n, n x notified, exceeded,
//!          n, n x (threshold?, at, period_start?)
//! ```
//!
//! `x?` is a byte 0 (absent) or 1 and then `x`; a timestamp is its
//! seconds and its nanoseconds, both zigzagged; a threshold the 8 bytes
//! of an `f64`, little-endian; `exceeded` a byte 0 or 1.

use integer_encoding::VarInt;
use jiff::Timestamp;

use super::sqlite::Row;
use super::StoreError;
use crate::ledger::{Billing, Detected, PoolUsage, Usage};
use crate::window::Window;

/// The first byte of a value in the binary form (format 1). JSON's is `{`.
pub const BINARY: u8 = 1;

/// Writes the binary form into a buffer, after what it holds.
pub struct Out<'a>(pub &'a mut Vec<u8>);

impl Out<'_> {
    pub fn byte(&mut self, b: u8) {
        self.0.push(b);
    }

    pub fn var<T: VarInt>(&mut self, n: T) {
        let mut bytes = [0u8; 10];
        let len = n.encode_var(&mut bytes);
        self.0.extend_from_slice(&bytes[..len]);
    }

    pub fn name(&mut self, name: &str) {
        self.var(name.len() as u64);
        self.0.extend_from_slice(name.as_bytes());
    }

    fn timestamp(&mut self, at: Timestamp) {
        self.var(at.as_second());
        self.var(i64::from(at.subsec_nanosecond()));
    }

    fn some<T>(&mut self, value: Option<T>, write: impl FnOnce(&mut Self, T)) {
        match value {
            None => self.byte(0),
            Some(value) => {
                self.byte(1);
                write(self, value);
            }
        }
    }
}

/// Reads the binary form; every read fails cleanly on bytes it did not
/// write, and no count sizes an allocation past what the bytes can hold.
pub struct In<'a>(pub &'a [u8]);

impl<'a> In<'a> {
    pub fn byte(&mut self) -> Result<u8, String> {
        let (&b, rest) = self.0.split_first().ok_or("ends early")?;
        self.0 = rest;
        Ok(b)
    }

    pub fn var<T: VarInt>(&mut self) -> Result<T, String> {
        let (n, len) = T::decode_var(self.0).ok_or("ends early, or holds a number out of range")?;
        self.0 = &self.0[len..];
        Ok(n)
    }

    /// A count of things that take at least `each` bytes apiece.
    pub fn count(&mut self, each: usize) -> Result<usize, String> {
        let count: u64 = self.var()?;
        usize::try_from(count)
            .ok()
            .filter(|&c| c <= self.0.len() / each.max(1))
            .ok_or_else(|| format!("counts {count} things in {} bytes", self.0.len()))
    }

    pub fn name(&mut self) -> Result<&'a str, String> {
        let len = self.count(1)?;
        let (name, rest) = self.0.split_at(len);
        self.0 = rest;
        std::str::from_utf8(name).map_err(|_| "holds a name that is not UTF-8".into())
    }

    fn timestamp(&mut self) -> Result<Timestamp, String> {
        let seconds: i64 = self.var()?;
        let nanos = i32::try_from(self.var::<i64>()?).map_err(|_| "holds a bad time")?;
        Timestamp::new(seconds, nanos).map_err(|e| format!("holds a bad time: {e}"))
    }

    fn some<T>(
        &mut self,
        read: impl FnOnce(&mut Self) -> Result<T, String>,
    ) -> Result<Option<T>, String> {
        match self.byte()? {
            0 => Ok(None),
            1 => read(self).map(Some),
            b => Err(format!("holds {b} where 0 or 1 belongs")),
        }
    }

    fn bool(&mut self) -> Result<bool, String> {
        self.some(|_| Ok(())).map(|b| b.is_some())
    }

    fn f64(&mut self) -> Result<f64, String> {
        let (bytes, rest) = self.0.split_first_chunk::<8>().ok_or("ends early")?;
        self.0 = rest;
        Ok(f64::from_le_bytes(*bytes))
    }

    fn end(&self) -> Result<(), String> {
        match self.0.len() {
            0 => Ok(()),
            n => Err(format!("has {n} bytes after its end")),
        }
    }
}

/// `usage` (not its billing, stored apart) in the binary form, in place
/// of what `out` held, in the room it has.
pub fn write_usage(out: &mut Vec<u8>, usage: &Usage) {
    out.clear();
    let mut out = Out(out);
    out.byte(BINARY);
    out.some(usage.remaining, Out::var);
    out.some(usage.period_start, Out::timestamp);
    out.var(usage.used);
    out.var(usage.overage);
    out.var(usage.rate.len() as u64);
    for (name, window) in usage.rate.iter() {
        out.name(name);
        window.encode(&mut out);
    }
    out.var(usage.pools.len() as u64);
    for (name, pool) in usage.pools.iter() {
        out.name(name);
        pool.window.encode(&mut out);
        out.var(pool.used);
        out.some(pool.period_start, Out::timestamp);
        out.var(pool.total);
    }
}

/// [`write_usage`] in a new buffer.
pub fn usage_bytes(usage: &Usage) -> Vec<u8> {
    // Room for a key with a minute window and a pool at once, rather than
    // growing to it.
    let mut bytes = Vec::with_capacity(256);
    write_usage(&mut bytes, usage);
    bytes
}

/// A key's billing state in the binary form, in place of what `out` held.
pub fn write_billing(out: &mut Vec<u8>, billing: &Billing) {
    out.clear();
    let mut out = Out(out);
    out.byte(BINARY);
    out.var(billing.credits);
    out.var(billing.overage);
    out.var(billing.reported.len() as u64);
    for (name, &mark) in &billing.reported {
        out.name(name);
        out.var(mark);
    }
    out.some(billing.notified_period, Out::timestamp);
    out.var(billing.notified.len() as u64);
    for &n in &billing.notified {
        out.var(n);
    }
    out.byte(u8::from(billing.exceeded));
    out.var(billing.detected.len() as u64);
    for d in &billing.detected {
        out.some(d.threshold, |out, t| {
            out.0.extend_from_slice(&t.to_le_bytes())
        });
        out.timestamp(d.at);
        out.some(d.period_start, Out::timestamp);
    }
}

/// [`write_billing`] in a new buffer.
pub fn billing_bytes(billing: &Billing) -> Vec<u8> {
    let mut bytes = Vec::new();
    write_billing(&mut bytes, billing);
    bytes
}

/// A key's usage and billing state as a store row holds them (see
/// [`usage`] and [`billing`]).
pub fn row_usage(row: &Row) -> Result<Usage, StoreError> {
    let corrupt = |what: &str, e: String| StoreError::Corrupt {
        key_id: row.key_id.clone(),
        reason: format!("its {what} {e}"),
    };
    let mut usage = usage(&row.usage).map_err(|e| corrupt("usage", e))?;
    usage.billing = billing(&row.billing).map_err(|e| corrupt("billing state", e))?;
    Ok(usage)
}

/// A key's usage as stored: the binary form or (written before schema 8)
/// JSON. Its billing is the default: it is stored apart.
pub fn usage(bytes: &[u8]) -> Result<Usage, String> {
    if bytes.first() != Some(&BINARY) {
        return serde_json::from_slice(bytes).map_err(|e| e.to_string());
    }
    let input = &mut In(&bytes[1..]);
    let mut usage = Usage {
        remaining: input.some(In::var)?,
        period_start: input.some(In::timestamp)?,
        used: input.var()?,
        overage: input.var()?,
        ..Usage::default()
    };
    // A name and a window take at least 4 bytes; a pool 7.
    for _ in 0..input.count(4)? {
        let name = input.name()?;
        *usage.rate.slot(name) = Window::decode(input)?;
    }
    for _ in 0..input.count(7)? {
        let name = input.name()?;
        *usage.pools.slot(name) = PoolUsage {
            window: Window::decode(input)?,
            used: input.var()?,
            period_start: input.some(In::timestamp)?,
            total: input.var()?,
        };
    }
    input.end()?;
    Ok(usage)
}

/// A key's billing state as stored: the binary form or JSON.
pub fn billing(bytes: &[u8]) -> Result<Billing, String> {
    if bytes.first() != Some(&BINARY) {
        return serde_json::from_slice(bytes).map_err(|e| e.to_string());
    }
    let input = &mut In(&bytes[1..]);
    let mut billing = Billing {
        credits: input.var()?,
        overage: input.var()?,
        ..Billing::default()
    };
    for _ in 0..input.count(2)? {
        let name = input.name()?.to_string();
        billing.reported.insert(name, input.var()?);
    }
    billing.notified_period = input.some(In::timestamp)?;
    for _ in 0..input.count(1)? {
        let n = input.var::<u64>()?;
        billing
            .notified
            .push(u32::try_from(n).map_err(|_| "holds a threshold out of range")?);
    }
    billing.exceeded = input.bool()?;
    for _ in 0..input.count(4)? {
        billing.detected.push(Detected {
            threshold: input.some(In::f64)?,
            at: input.timestamp()?,
            period_start: input.some(In::timestamp)?,
        });
    }
    input.end()?;
    Ok(billing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(seconds: i64, nanos: i32) -> Timestamp {
        Timestamp::new(seconds, nanos).unwrap()
    }

    /// A key with a bit of everything: credits in a period, a minute
    /// window, a rolling pool and a calendar one, and billing that has
    /// reported, notified and detected.
    fn everything() -> (Usage, Billing) {
        let mut usage = Usage {
            remaining: Some(999_999_973_755),
            period_start: Some(at(1_796_083_200, 0)),
            used: 26_245,
            overage: 3,
            ..Usage::default()
        };
        let minute = usage.rate.slot("requests");
        for t in 0..60 {
            minute.add(
                1 + t as u64 % 3,
                60_000,
                1_773_144_000_000 + t * 1000 + t % 7,
            );
        }
        usage
            .pools
            .slot("exports")
            .window
            .add(26_245, 30 * 86_400_000, 1_773_144_000_000);
        *usage.pools.slot("gpu-hours") = PoolUsage {
            used: 7,
            period_start: Some(at(1_796_083_200, 0)),
            total: 70,
            ..PoolUsage::default()
        };
        let billing = Billing {
            credits: 26_245,
            overage: 3,
            reported: [("credits".to_string(), 26_000), ("exports".to_string(), 1)].into(),
            notified_period: Some(at(1_796_083_200, 0)),
            notified: vec![500_000, 800_000],
            exceeded: true,
            detected: vec![
                Detected {
                    threshold: Some(0.8),
                    at: at(1_796_090_000, 123_456_789),
                    period_start: Some(at(1_796_083_200, 0)),
                },
                Detected {
                    threshold: None,
                    at: at(-1, -5),
                    period_start: None,
                },
            ],
        };
        (usage, billing)
    }

    #[test]
    fn a_key_reads_back_as_it_was_written() {
        let (usage, billing) = everything();
        let bytes = usage_bytes(&usage);
        assert_eq!(bytes[0], BINARY);
        assert_eq!(super::usage(&bytes).unwrap(), usage);
        // A minute's 60 buckets take ~190 bytes, the rest ~80.
        assert!(bytes.len() < 280, "{}", bytes.len());
        let mut stored = Vec::new();
        write_billing(&mut stored, &billing);
        assert_eq!(super::billing(&stored).unwrap(), billing);
        // A key that has reported nothing: 8 bytes.
        write_billing(&mut stored, &Billing::default());
        assert_eq!(stored, [BINARY, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(super::billing(&stored).unwrap(), Billing::default());
    }

    #[test]
    fn json_written_before_the_binary_form_still_reads() {
        let (usage, billing) = everything();
        let json = serde_json::to_vec(&usage).unwrap();
        assert_eq!(super::usage(&json).unwrap(), usage);
        let json = serde_json::to_vec(&billing).unwrap();
        assert_eq!(super::billing(&json).unwrap(), billing);
        // What a key that never reported holds in a schema 7 store.
        assert_eq!(super::billing(b"{}").unwrap(), Billing::default());
        let old = br#"{"remaining":5,"used":1,"overage":0,"rate":{"requests":{"width_ms":1000,"v":3,"b":"AQIC"}}}"#;
        let read = super::usage(old).unwrap();
        assert_eq!(read.remaining, Some(5));
        assert_eq!(read.rate.get("requests").map(|w| w.units()), Some(2));
    }

    #[test]
    fn damaged_values_are_refused_with_a_reason() {
        let (usage, billing) = everything();
        let bytes = usage_bytes(&usage);
        let mut stored = Vec::new();
        write_billing(&mut stored, &billing);
        type Read<'a> = &'a dyn Fn(&[u8]) -> Result<(), String>;
        let usage = |b: &[u8]| super::usage(b).map(|_| ());
        let billing = |b: &[u8]| super::billing(b).map(|_| ());
        let cases: [(Read, &[u8], &str); 6] = [
            (&usage, &bytes[..bytes.len() - 1], "ends early"),
            (&billing, &stored[..stored.len() - 1], "ends early"),
            (&usage, &[BINARY, 2], "where 0 or 1 belongs"),
            (&usage, &[BINARY, 0, 0, 0, 0, 200, 1], "counts 200 things"),
            (
                &usage,
                &[BINARY, 0, 0, 0, 0, 0, 0, 9],
                "bytes after its end",
            ),
            (
                &usage,
                &[BINARY, 0, 0, 0, 0, 1, 1, 0xff, 0, 0, 0],
                "not UTF-8",
            ),
        ];
        for (read, bad, says) in cases {
            let err = read(bad).unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
        assert!(super::usage(b"").is_err());
        assert!(super::usage(b"[1]").is_err());
    }

    proptest! {
        /// Bytes tollgate did not write are an error, never a panic or an
        /// allocation a count asks for.
        #[test]
        fn any_bytes_read_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..96)) {
            let mut tagged = vec![BINARY];
            tagged.extend_from_slice(&bytes);
            if let Ok(usage) = super::usage(&tagged) {
                prop_assert_eq!(super::usage(&usage_bytes(&usage)).unwrap(), usage);
            }
            if let Ok(billing) = super::billing(&tagged) {
                let mut again = Vec::new();
                write_billing(&mut again, &billing);
                let back = super::billing(&again).unwrap();
                // NaN thresholds are not equal to themselves.
                prop_assert_eq!(back.detected.len(), billing.detected.len());
            }
        }

        #[test]
        fn every_usage_reads_back(
            remaining in proptest::option::of(any::<u64>()),
            start in proptest::option::of((any::<i32>(), 0i32..1_000_000_000)),
            used in any::<u64>(),
            charges in proptest::collection::vec((0u8..3, -5_000i64..200_000, 0u64..1_000), 0..80),
            credits in any::<u64>(),
            notified in proptest::collection::vec(any::<u32>(), 0..4),
        ) {
            let mut usage = Usage {
                remaining,
                period_start: start.map(|(s, n)| at(s.into(), n)),
                used,
                ..Usage::default()
            };
            for (which, now, units) in charges {
                match which {
                    0 => { usage.rate.slot("requests").add(units, 60_000, now); }
                    1 => { usage.rate.slot("per-second").add(units, 1_000, now); }
                    _ => {
                        let pool = usage.pools.slot("exports");
                        pool.window.add(units, 86_400_000, now);
                        pool.total += units;
                    }
                }
            }
            prop_assert_eq!(super::usage(&usage_bytes(&usage)).unwrap(), usage);
            let billing = Billing { credits, notified, ..Billing::default() };
            let mut stored = Vec::new();
            write_billing(&mut stored, &billing);
            prop_assert_eq!(super::billing(&stored).unwrap(), billing);
        }
    }
}
