//! The reporter: turns metered usage into billing events and delivers them
//! (SPEC §5).
//!
//! Every `reporting.flush_interval` it runs a reporting pass of the store
//! ([`crate::store::Store::report`]): each key charged since the last pass
//! goes through [`event::make`], and the events land in the store's outbox
//! in the same transaction as the usage they come from. Then each sink
//! sends what its outbox holds, in batches of at most [`BATCH`], oldest
//! first, each batch under an id that is on disk before the first attempt
//! and kept across retries and restarts (at least once; receivers
//! de-duplicate by event id or batch id). A failed attempt backs off
//! exponentially with jitter, capped at [`MAX_BACKOFF`]. The request path
//! never waits on any of it.
//!
//! - [`event`]: what events a key's state calls for (pure);
//! - [`webhook`]: the signed webhook sink;
//! - [`stripe`]: Stripe Billing meter events.

pub mod event;
pub mod stripe;
pub mod webhook;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use rand::Rng;

use crate::gateway::Gateway;
use crate::ledger::{Billing, KeyRecord, Usage};

/// Most events one delivery carries.
pub const BATCH: usize = 100;
/// The longest wait between two attempts at a failing sink.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How often to run when no `reporting` is configured.
const IDLE: Duration = Duration::from_secs(5);

pub use event::{STRIPE, WEBHOOK};

/// Exponential backoff with jitter: after `n` failures, a wait drawn from
/// `[d/2, d]` with `d = base * 2^n`, at most [`MAX_BACKOFF`].
///
/// Waits are measured on the gateway's clock, so tests can let a receiver
/// fail for minutes by moving time. A clock that jumps back before the
/// failure ends the wait rather than stretch it.
#[derive(Default)]
struct Backoff {
    failures: u32,
    /// When the last attempt failed, and how long to wait after it.
    waiting: Option<(Timestamp, Duration)>,
}

impl Backoff {
    fn ready(&self, now: Timestamp) -> bool {
        self.waiting.is_none_or(|(failed_at, wait)| {
            now < failed_at || now.duration_since(failed_at).unsigned_abs() >= wait
        })
    }

    fn failed(&mut self, base: Duration, now: Timestamp) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let exp = base.saturating_mul(1u32 << self.failures.min(16));
        let cap = exp.min(MAX_BACKOFF);
        let wait = rand::rng().random_range(cap / 2..=cap);
        self.waiting = Some((now, wait));
        wait
    }

    fn succeeded(&mut self) {
        *self = Backoff::default();
    }
}

/// Each sink backs off on its own.
#[derive(Default)]
struct Backoffs {
    webhook: Backoff,
    stripe: Backoff,
}

pub struct Reporter {
    gateway: Arc<Gateway>,
    client: reqwest::Client,
}

impl Reporter {
    pub fn new(gateway: Arc<Gateway>) -> Reporter {
        Reporter {
            gateway,
            client: reqwest::Client::new(),
        }
    }

    /// One round: a reporting pass, then each sink's deliveries.
    async fn round(&self, backoff: &mut Backoffs) {
        let gw = &self.gateway;
        let config = gw.config();
        // Without reporting the pass still runs, with nowhere to send: it
        // lets charged keys leave memory, and units accrued while billing
        // is off are not billed later when it is turned on.
        let reporting = config.reporting.as_ref();
        let plan = event::Plan {
            webhook: reporting.is_some_and(|r| r.webhook.is_some()),
            stripe: reporting
                .and_then(|r| r.stripe.as_ref())
                .map(|s| event::StripeMeters {
                    overage: s.event_name.clone(),
                    meters: s
                        .meters
                        .iter()
                        .map(|(c, m)| (c.clone(), m.clone()))
                        .collect(),
                }),
            usage_events: reporting.is_some_and(|r| r.usage_events),
            now: gw.clock.now(),
        };
        let types = parking_lot::Mutex::new(Vec::new());
        let make = |record: &KeyRecord, usage: &Usage, billing: &mut Billing| {
            event::make(&plan, record, usage, billing, &mut types.lock())
        };
        match gw.store.report(&make).await {
            Ok(_) => {
                for kind in types.into_inner() {
                    gw.metrics.events.with_label_values(&[kind]).inc();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reporting pass failed; its events will be made on the next")
            }
        }
        let Some(reporting) = reporting else {
            return;
        };
        if let Some(hook) = &reporting.webhook {
            if backoff.webhook.ready(gw.clock.now()) {
                self.deliver_webhook(hook, reporting.flush_interval, &mut backoff.webhook)
                    .await;
            }
        }
        if let Some(stripe) = &reporting.stripe {
            if backoff.stripe.ready(gw.clock.now()) {
                self.deliver_stripe(stripe, reporting.flush_interval, &mut backoff.stripe)
                    .await;
            }
        }
        self.update_gauges().await;
    }

    /// One last round at shutdown, after the final flush, bounded by
    /// `within`: what it cannot send stays in the outbox for the next start.
    pub async fn last_attempt(&self, within: Duration) {
        let mut backoff = Backoffs::default();
        if tokio::time::timeout(within, self.round(&mut backoff))
            .await
            .is_err()
        {
            tracing::warn!(
                within_ms = within.as_millis() as u64,
                "the reporter's last attempt ran out of time; what it did not send stays in the outbox"
            );
        }
    }

    /// Sends the webhook outbox until it is empty or an attempt fails.
    async fn deliver_webhook(
        &self,
        hook: &crate::config::Webhook,
        base: Duration,
        backoff: &mut Backoff,
    ) {
        let store = &self.gateway.store;
        let metrics = &self.gateway.metrics;
        loop {
            let batch = match store.outbox_batch(WEBHOOK, BATCH).await {
                Ok(Some(batch)) => batch,
                Ok(None) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the outbox");
                    return;
                }
            };
            // The wait runs from the attempt's start.
            let attempted = self.gateway.clock.now();
            match webhook::send(&self.client, hook, &batch).await {
                Ok(()) => {
                    metrics.webhook_deliveries.with_label_values(&["ok"]).inc();
                    backoff.succeeded();
                    if let Err(e) = store.outbox_delivered(WEBHOOK, &batch.id).await {
                        // Sent again later: receivers de-duplicate.
                        tracing::warn!(error = %e, batch = %batch.id, "delivered, but cannot mark it so");
                        return;
                    }
                }
                Err(reason) => {
                    metrics
                        .webhook_deliveries
                        .with_label_values(&["error"])
                        .inc();
                    let wait = backoff.failed(base, attempted);
                    tracing::warn!(batch = %batch.id, events = batch.events.len(), %reason, retry_in_ms = wait.as_millis() as u64, "webhook delivery failed");
                    return;
                }
            }
        }
    }

    /// Sends Stripe's outbox one meter event at a time until it is empty,
    /// Stripe asks to wait (429, 5xx, no answer), or the pass is done.
    /// Events Stripe refuses for good are parked.
    async fn deliver_stripe(
        &self,
        stripe: &crate::config::Stripe,
        base: Duration,
        backoff: &mut Backoff,
    ) {
        let store = &self.gateway.store;
        let metrics = &self.gateway.metrics;
        let calls = match store.outbox_next(STRIPE, BATCH).await {
            Ok(calls) => calls,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the outbox");
                return;
            }
        };
        let mut sent = Vec::new();
        for (id, call) in calls {
            let call: serde_json::Value = serde_json::from_str(&call).unwrap_or_default();
            let attempted = self.gateway.clock.now();
            match stripe::send(&self.client, stripe, &call).await {
                stripe::Outcome::Sent => {
                    metrics.stripe_meter_events.with_label_values(&["ok"]).inc();
                    backoff.succeeded();
                    sent.push(id);
                }
                stripe::Outcome::Retry(reason) => {
                    metrics
                        .stripe_meter_events
                        .with_label_values(&["retry"])
                        .inc();
                    let wait = backoff.failed(base, attempted);
                    tracing::warn!(event = %id, %reason, retry_in_ms = wait.as_millis() as u64, "Stripe meter event not sent");
                    break;
                }
                stripe::Outcome::Park(reason) => {
                    metrics
                        .stripe_meter_events
                        .with_label_values(&["parked"])
                        .inc();
                    tracing::warn!(event = %id, %reason, "Stripe meter event parked: see GET /v1/outbox");
                    if let Err(e) = store.outbox_park(STRIPE, &id, &reason).await {
                        tracing::warn!(error = %e, event = %id, "cannot park the event");
                        break;
                    }
                }
            }
        }
        if !sent.is_empty() {
            if let Err(e) = store.outbox_sent(STRIPE, sent).await {
                // Sent again later: Stripe de-duplicates by identifier.
                tracing::warn!(error = %e, "sent to Stripe, but cannot mark it so");
            }
        }
    }

    async fn update_gauges(&self) {
        let m = &self.gateway.metrics;
        let mut pending = 0u64;
        let mut oldest: Option<i64> = None;
        for sink in [WEBHOOK, STRIPE] {
            if let Ok(stats) = self.gateway.store.outbox_stats(sink).await {
                pending += stats.pending;
                oldest = match (oldest, stats.oldest_ms) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
            }
        }
        m.outbox_pending
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        let age = oldest.map_or(0.0, |oldest| {
            let now = self.gateway.clock.now().as_millisecond();
            (now - oldest).max(0) as f64 / 1000.0
        });
        m.outbox_oldest_age.set(age);
    }
}

#[async_trait]
impl BackgroundService for Reporter {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut backoff = Backoffs::default();
        loop {
            let interval = self
                .gateway
                .config()
                .reporting
                .as_ref()
                .map_or(IDLE, |r| r.flush_interval);
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            self.round(&mut backoff).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap_on_the_given_clock() {
        let base = Duration::from_secs(1);
        let t0: Timestamp = "2026-11-17T15:00:00Z".parse().expect("time");
        let mut backoff = Backoff::default();
        assert!(backoff.ready(t0));
        for n in 1..=20u32 {
            let wait = backoff.failed(base, t0);
            let cap = base.saturating_mul(1 << n.min(16)).min(MAX_BACKOFF);
            assert!(wait >= cap / 2 && wait <= cap, "failure {n}: {wait:?}");
            assert!(!backoff.ready(t0));
            let just_before = t0 + (wait - Duration::from_millis(1));
            assert!(!backoff.ready(just_before));
            assert!(backoff.ready(t0 + wait));
        }
        // A clock set back before the failure does not stretch the wait.
        assert!(backoff.ready(t0 - Duration::from_secs(1)));
        backoff.succeeded();
        assert!(backoff.ready(t0));
    }
}
