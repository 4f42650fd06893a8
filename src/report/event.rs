//! Billing events (SPEC §5), made from a key's state: pure, so the store
//! can run it under the key's lock and write what it makes in the same
//! transaction as the usage it comes from.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde_json::{json, Map, Value};

use crate::keys;
use crate::ledger::{Billing, KeyRecord, Usage};
use crate::store::sqlite::Outgoing;

/// The sinks, as named in the outbox.
pub const WEBHOOK: &str = "webhook";
pub const STRIPE: &str = "stripe";

/// The event types, as their `type` field and metric label.
pub const OVERAGE: &str = "overage";
pub const THRESHOLD: &str = "usage.threshold";
pub const EXCEEDED: &str = "usage.exceeded";
pub const USAGE: &str = "usage";
pub const TYPES: [&str; 4] = [OVERAGE, THRESHOLD, EXCEEDED, USAGE];

/// The counter name of credits in `usage` events and `stripe.meters`.
pub const CREDITS: &str = "credits";

/// What a reporting pass makes events for, and where they go.
pub struct Plan {
    /// Whether the webhook gets every event.
    pub webhook: bool,
    /// Stripe's meters, when the Stripe sink is configured.
    pub stripe: Option<StripeMeters>,
    /// Whether the webhook gets `usage` events (they are made anyway when
    /// Stripe has `meters`).
    pub usage_events: bool,
    pub now: Timestamp,
}

/// Which Stripe meter bills what.
pub struct StripeMeters {
    /// Receives overage units.
    pub overage: String,
    /// Counter → meter, billing every unit of that counter (`usage` events).
    pub meters: Vec<(String, String)>,
}

/// The events `record`'s state calls for, one [`Outgoing`] per sink each;
/// raises the reported marks of `billing` (a copy of the key's) to match
/// and takes its detected events. Pushes each event's type to `types`.
pub fn make(
    plan: &Plan,
    record: &KeyRecord,
    usage: &Usage,
    billing: &mut Billing,
    types: &mut Vec<&'static str>,
) -> Vec<Outgoing> {
    let mut events = Vec::new();
    let base = |kind: &'static str, at: Timestamp, period_start: Option<Timestamp>| {
        let mut e = Map::new();
        e.insert("id".into(), json!(keys::random_id("evt")));
        e.insert("type".into(), json!(kind));
        e.insert("at".into(), json!(at));
        e.insert("key_id".into(), json!(record.key_id));
        e.insert("external_id".into(), json!(record.external_id));
        e.insert("tier".into(), json!(record.tier));
        e.insert("meta".into(), Value::Object(record.meta.clone()));
        e.insert("period_start".into(), json!(period_start));
        e
    };
    for detected in std::mem::take(&mut billing.detected) {
        let e = match detected.threshold {
            Some(t) => {
                let mut e = base(THRESHOLD, detected.at, detected.period_start);
                e.insert("threshold".into(), json!(t));
                e
            }
            None => base(EXCEEDED, detected.at, detected.period_start),
        };
        events.push(e);
    }
    let overage = billing.unreported(OVERAGE, billing.overage);
    if overage > 0 {
        let mut e = base(OVERAGE, plan.now, usage.period_start);
        e.insert("units".into(), json!(overage));
        events.push(e);
        billing.reported.insert(OVERAGE.into(), billing.overage);
    }
    let stripe_meters = plan.stripe.as_ref().is_some_and(|s| !s.meters.is_empty());
    if plan.usage_events || stripe_meters {
        let mut totals: BTreeMap<String, u64> = usage
            .pools
            .iter()
            .map(|(name, pool)| (name.to_string(), pool.total))
            .collect();
        totals.insert(CREDITS.into(), billing.credits);
        let mut units = Map::new();
        for (counter, total) in totals {
            let n = billing.unreported(&counter, total);
            if n > 0 {
                units.insert(counter.clone(), json!(n));
                billing.reported.insert(counter, total);
            }
        }
        if !units.is_empty() {
            let mut e = base(USAGE, plan.now, usage.period_start);
            e.insert("units".into(), Value::Object(units));
            events.push(e);
        }
    }
    let created_ms = plan.now.as_millisecond();
    let mut out = Vec::with_capacity(events.len());
    for e in events {
        let kind = match e.get("type").and_then(Value::as_str) {
            Some(OVERAGE) => OVERAGE,
            Some(THRESHOLD) => THRESHOLD,
            Some(EXCEEDED) => EXCEEDED,
            _ => USAGE,
        };
        types.push(kind);
        let id = e
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if let Some(stripe) = &plan.stripe {
            for (identifier, call) in stripe_calls(stripe, kind, &id, &e) {
                out.push(Outgoing {
                    sink: STRIPE,
                    id: identifier,
                    event: call.to_string(),
                    created_ms,
                });
            }
        }
        if plan.webhook && (kind != USAGE || plan.usage_events) {
            out.push(Outgoing {
                sink: WEBHOOK,
                id,
                event: Value::Object(e).to_string(),
                created_ms,
            });
        }
    }
    out
}

/// The Stripe meter events an event calls for: `(identifier, call)`. An
/// overage event is one, to the overage meter; a `usage` event one per
/// counter that has a meter. The customer is the key's
/// `meta.stripe_customer_id` (`null` when it has none: the sink parks it).
fn stripe_calls(
    stripe: &StripeMeters,
    kind: &str,
    id: &str,
    e: &Map<String, Value>,
) -> Vec<(String, Value)> {
    let at = e
        .get("at")
        .and_then(Value::as_str)
        .and_then(|t| t.parse::<Timestamp>().ok())
        .map_or(0, Timestamp::as_second);
    let customer = e
        .get("meta")
        .and_then(|m| m.get("stripe_customer_id"))
        .cloned()
        .unwrap_or(Value::Null);
    let call = |identifier: String, meter: &str, value: &Value| {
        let body = json!({
            "identifier": identifier,
            "event_name": meter,
            "customer": customer,
            "value": value,
            "timestamp": at,
            "event_id": id,
            "key_id": e.get("key_id"),
        });
        (identifier, body)
    };
    match kind {
        OVERAGE => e
            .get("units")
            .map(|units| vec![call(id.to_string(), &stripe.overage, units)])
            .unwrap_or_default(),
        USAGE => stripe
            .meters
            .iter()
            .filter_map(|(counter, meter)| {
                let units = e.get("units")?.get(counter)?;
                Some(call(format!("{id}.{counter}"), meter, units))
            })
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::Detected;

    fn key() -> KeyRecord {
        let hash = keys::KeyHash::of("sk_t_x");
        KeyRecord {
            external_id: Some("cus_1".into()),
            ..KeyRecord::new("key_1".into(), &hash, "sk_t", "payg", Timestamp::UNIX_EPOCH)
        }
    }

    fn plan(usage_events: bool) -> Plan {
        Plan {
            webhook: true,
            stripe: None,
            usage_events,
            now: "2026-03-10T12:00:05Z".parse().expect("time"),
        }
    }

    fn parse(out: &[Outgoing]) -> Vec<Value> {
        out.iter()
            .map(|o| serde_json::from_str(&o.event).expect("json"))
            .collect()
    }

    #[test]
    fn overage_reports_what_is_new_once() {
        let mut usage = Usage::default();
        let mut billing = Billing {
            overage: 40,
            ..Billing::default()
        };
        let mut types = Vec::new();
        let events = parse(&make(
            &plan(false),
            &key(),
            &usage,
            &mut billing,
            &mut types,
        ));
        assert_eq!(events.len(), 1);
        assert_eq!(events[0]["type"], "overage");
        assert_eq!(events[0]["units"], 40);
        assert_eq!(events[0]["external_id"], "cus_1");
        assert_eq!(types, [OVERAGE]);
        // Nothing new: nothing to say. A refund below what was reported
        // is netted against the next units.
        usage.billing = billing.clone();
        assert!(make(&plan(false), &key(), &usage, &mut billing, &mut types).is_empty());
        billing.overage = 35;
        assert!(make(&plan(false), &key(), &usage, &mut billing, &mut types).is_empty());
        billing.overage = 45;
        let events = parse(&make(
            &plan(false),
            &key(),
            &usage,
            &mut billing,
            &mut types,
        ));
        assert_eq!(events[0]["units"], 5);
    }

    #[test]
    fn detected_events_are_taken_and_usage_counts_every_counter() {
        let mut usage = Usage::default();
        usage.pools.slot("tokens").total = 700;
        let mut billing = Billing {
            credits: 12,
            detected: vec![
                Detected {
                    threshold: Some(0.8),
                    at: Timestamp::UNIX_EPOCH,
                    period_start: None,
                },
                Detected {
                    threshold: None,
                    at: Timestamp::UNIX_EPOCH,
                    period_start: None,
                },
            ],
            ..Billing::default()
        };
        let mut types = Vec::new();
        let events = parse(&make(&plan(true), &key(), &usage, &mut billing, &mut types));
        assert_eq!(types, [THRESHOLD, EXCEEDED, USAGE]);
        assert_eq!(events[0]["threshold"], 0.8);
        assert_eq!(events[2]["units"], json!({ "credits": 12, "tokens": 700 }));
        assert!(billing.detected.is_empty());
        let ids: std::collections::HashSet<_> = events.iter().map(|e| e["id"].clone()).collect();
        assert_eq!(ids.len(), 3, "every event has its own id");
    }
}
