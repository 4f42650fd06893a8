//! Prometheus metrics (SPEC §6), one registry per gateway.
//!
//! Labels are bounded: route, tier, pool and upstream names come from the
//! config, codes from a fixed set; never a key id, an external id or a
//! secret. Every metric is registered, and every series the config implies
//! is created at zero, at start-up and on reload, so dashboards and alerts
//! see them before the first request.

use std::sync::{Arc, OnceLock};

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    Opts, Registry, TextEncoder,
};

use crate::config::Config;

/// Every metric name exported, for dashboards and their test.
pub const NAMES: &[&str] = &[
    "tollgate_requests_total",
    "tollgate_request_duration_seconds",
    "tollgate_verify_duration_seconds",
    "tollgate_upstream_errors_total",
    "tollgate_credits_charged_total",
    "tollgate_pool_charged_total",
    "tollgate_overage_units_total",
    "tollgate_shadow_rejections_total",
    "tollgate_outbox_pending",
    "tollgate_outbox_oldest_age_seconds",
    "tollgate_events_total",
    "tollgate_webhook_deliveries_total",
    "tollgate_stripe_meter_events_total",
    "tollgate_config_reloads_total",
    "tollgate_config_generation",
    "tollgate_keys",
    "tollgate_store_healthy",
    "tollgate_requests_in_flight",
    "tollgate_store_bypassed_total",
];

/// The `route` label when no route matched; the `tier` label when no key
/// was read, or its tier is not in the config.
pub const NONE: &str = "none";
/// The `route` label of the customer usage endpoint (`usage.path`).
pub const USAGE: &str = "usage";

/// `name` as a `&'static str`: the same one for equal names. Route and
/// tier names are interned so that what a request leaves behind (its
/// access line, formatted after it: `log::Access`) can name them after
/// its config is gone. A name is kept for the process's life once seen:
/// names come from config files, so there are as many as the configs
/// loaded ever named, not more.
pub fn intern(name: &str) -> &'static str {
    static NAMES: OnceLock<parking_lot::Mutex<std::collections::HashSet<&'static str>>> =
        OnceLock::new();
    let mut names = NAMES.get_or_init(Default::default).lock();
    if let Some(known) = names.get(name) {
        return known;
    }
    let name: &'static str = Box::leak(name.into());
    names.insert(name);
    name
}

/// Which `route` label a request counts under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteLabel {
    /// A route of the config, by index.
    Route(usize),
    /// The usage endpoint.
    Usage,
    /// No route matched.
    None,
}

/// Every `code` label value: the rejection codes and `OK`.
pub const CODES: &[&str] = &[
    "OK",
    "MISSING_KEY",
    "INVALID_KEY",
    "EXPIRED",
    "DISABLED",
    "TIER_NOT_FOUND",
    "FEATURE_NOT_AVAILABLE",
    "RATE_LIMITED",
    "QUOTA_EXCEEDED",
    "USAGE_EXCEEDED",
    "BAD_REQUEST",
    "ROUTE_NOT_FOUND",
    "METHOD_NOT_ALLOWED",
    "UPSTREAM_UNAVAILABLE",
    "STORE_UNAVAILABLE",
    "INTERNAL",
];

pub struct Metrics {
    registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub verify_duration: Histogram,
    pub upstream_errors: IntCounterVec,
    pub credits_charged: IntCounterVec,
    pub pool_charged: IntCounterVec,
    pub overage_units: IntCounterVec,
    pub shadow_rejections: IntCounterVec,
    pub outbox_pending: IntGauge,
    pub outbox_oldest_age: prometheus::Gauge,
    pub events: IntCounterVec,
    pub stripe_meter_events: IntCounterVec,
    pub webhook_deliveries: IntCounterVec,
    pub config_reloads: IntCounterVec,
    pub config_generation: IntGauge,
    pub keys: IntGauge,
    pub store_healthy: Gauge,
    pub in_flight: IntGauge,
    pub store_bypassed: prometheus::IntCounter,
}

fn counter(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

impl Metrics {
    pub fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new();
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "tollgate_request_duration_seconds",
                "Whole request, as the gateway saw it, by route.",
            )
            .buckets(vec![
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                10.0, 30.0,
            ]),
            &["route"],
        )?;
        registry.register(Box::new(request_duration.clone()))?;
        let verify_duration = Histogram::with_opts(
            HistogramOpts::new(
                "tollgate_verify_duration_seconds",
                "The key decision alone: checksum, hash, lookup, checks and charge.",
            )
            .buckets(vec![
                0.000_001,
                0.000_002_5,
                0.000_005,
                0.000_01,
                0.000_025,
                0.000_05,
                0.000_1,
                0.000_25,
                0.000_5,
                0.001,
                0.005,
            ]),
        )?;
        registry.register(Box::new(verify_duration.clone()))?;
        let gauge = |name: &str, help: &str| -> prometheus::Result<IntGauge> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let outbox_pending = gauge(
            "tollgate_outbox_pending",
            "Events waiting in the outbox, every sink (parked ones not counted).",
        )?;
        let outbox_oldest_age = prometheus::Gauge::new(
            "tollgate_outbox_oldest_age_seconds",
            "Age of the oldest event waiting in the outbox.",
        )?;
        registry.register(Box::new(outbox_oldest_age.clone()))?;
        let config_generation = gauge(
            "tollgate_config_generation",
            "How many configurations have been applied since start (1 = the first).",
        )?;
        let keys = gauge("tollgate_keys", "Keys in the store.")?;
        let in_flight = gauge(
            "tollgate_requests_in_flight",
            "Proxied requests under way (drains to 0 at a stop or an upgrade).",
        )?;
        let store_bypassed = prometheus::IntCounter::new(
            "tollgate_store_bypassed_total",
            "Keyed requests forwarded uncharged because the shared store did not answer (store.redis.on_error: allow).",
        )?;
        registry.register(Box::new(store_bypassed.clone()))?;
        let store_healthy = Gauge::new(
            "tollgate_store_healthy",
            "1 while the store records charges, 0 while charges fail closed.",
        )?;
        registry.register(Box::new(store_healthy.clone()))?;
        store_healthy.set(1.0);
        let metrics = Metrics {
            requests: counter(
                &registry,
                "tollgate_requests_total",
                "Requests by route, tier and outcome code (OK when forwarded).",
                &["route", "tier", "code"],
            )?,
            request_duration,
            verify_duration,
            upstream_errors: counter(
                &registry,
                "tollgate_upstream_errors_total",
                "Upstream connection failures, resets and timeouts.",
                &["upstream"],
            )?,
            credits_charged: counter(
                &registry,
                "tollgate_credits_charged_total",
                "Credits charged (net of refunds).",
                &["tier"],
            )?,
            pool_charged: counter(
                &registry,
                "tollgate_pool_charged_total",
                "Pool units charged, up front and metered (net of refunds).",
                &["pool"],
            )?,
            overage_units: counter(
                &registry,
                "tollgate_overage_units_total",
                "Units served past 0 credits.",
                &["tier"],
            )?,
            shadow_rejections: counter(
                &registry,
                "tollgate_shadow_rejections_total",
                "Requests a shadow limit or pool would have refused.",
                &["limit"],
            )?,
            outbox_pending,
            outbox_oldest_age,
            events: counter(
                &registry,
                "tollgate_events_total",
                "Billing events written to the outbox, by type.",
                &["type"],
            )?,
            stripe_meter_events: counter(
                &registry,
                "tollgate_stripe_meter_events_total",
                "Stripe meter events by result: ok, retry (429, 5xx, no answer), parked.",
                &["result"],
            )?,
            webhook_deliveries: counter(
                &registry,
                "tollgate_webhook_deliveries_total",
                "Webhook batch deliveries by result.",
                &["result"],
            )?,
            config_reloads: counter(
                &registry,
                "tollgate_config_reloads_total",
                "Config reloads by result.",
                &["result"],
            )?,
            config_generation,
            keys,
            store_healthy,
            in_flight,
            store_bypassed,
            registry,
        };
        for kind in crate::report::event::TYPES {
            metrics.events.with_label_values(&[kind]);
        }
        for result in ["ok", "retry", "parked"] {
            metrics.stripe_meter_events.with_label_values(&[result]);
        }
        for result in ["ok", "error"] {
            metrics.webhook_deliveries.with_label_values(&[result]);
            metrics.config_reloads.with_label_values(&[result]);
        }
        Ok(metrics)
    }

    /// Creates at zero every series the config implies, so they are
    /// exported before their first event.
    pub fn prepare(&self, config: &Config) {
        let mut routes: Vec<&str> = config.routes.iter().map(|r| r.name.as_str()).collect();
        routes.extend([USAGE, NONE]);
        let mut tiers: Vec<&str> = config.tiers.keys().map(String::as_str).collect();
        for route in &routes {
            self.request_duration.with_label_values(&[route]);
        }
        for route in config.routes.iter().filter(|r| r.auth) {
            for tier in &tiers {
                self.requests
                    .with_label_values(&[route.name.as_str(), tier, "OK"]);
            }
        }
        tiers.push(NONE);
        for tier in &tiers {
            self.credits_charged.with_label_values(&[tier]);
            self.overage_units.with_label_values(&[tier]);
        }
        for upstream in config.upstreams.keys() {
            self.upstream_errors.with_label_values(&[upstream]);
        }
        for tier in config.tiers.values() {
            for (pool, p) in &tier.pools {
                self.pool_charged.with_label_values(&[pool]);
                if p.shadow {
                    self.shadow_rejections.with_label_values(&[pool]);
                }
            }
            for (name, _) in tier.rate_limits.iter().filter(|(_, rl)| rl.shadow) {
                self.shadow_rejections.with_label_values(&[name]);
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Metrics {
    /// Counts what an allowed request (or verify call) was charged, net of
    /// any refund.
    pub fn record_charge(&self, config: &Config, admission: &crate::gate::Admission) {
        let tier = config
            .tiers
            .get_index(admission.tier)
            .map_or(NONE, |(name, _)| name.as_str());
        let charge = &admission.charge;
        self.credits_charged
            .with_label_values(&[tier])
            .inc_by(charge.credits);
        if charge.overage > 0 {
            self.overage_units
                .with_label_values(&[tier])
                .inc_by(charge.overage);
        }
        self.record_pools(admission);
    }

    /// Counts the pool units an allowed request (or verify call) was
    /// charged, and the shadow limits it went past.
    pub fn record_pools(&self, admission: &crate::gate::Admission) {
        for pc in &admission.charge.pools {
            self.pool_charged
                .with_label_values(&[&*pc.pool])
                .inc_by(pc.units);
        }
        self.record_shadowed(admission);
    }

    /// Counts the shadow limits and pools an allowed request went past.
    pub fn record_shadowed(&self, admission: &crate::gate::Admission) {
        for name in &admission.shadowed {
            self.shadow_rejections.with_label_values(&[name]).inc();
        }
    }
}

/// The series one config generation's requests count in, resolved once
/// per generation instead of looked up by label (a hash and a lock) on
/// every request. Routes and tiers are the config's indices; the last
/// index of each stands for `none`, and the one before the last route
/// index for `usage`.
pub struct Handles {
    routes: usize,
    tiers: usize,
    durations: Vec<Histogram>,
    /// `(route, tier, code)`, created on first use.
    requests: Vec<OnceLock<IntCounter>>,
    requests_vec: IntCounterVec,
    credits: Vec<IntCounter>,
    overage: Vec<IntCounter>,
    /// Per route, `tollgate_pool_charged_total` of each pool it charges
    /// (in the route's order, with the name it was resolved for) and of
    /// each pool it meters.
    pools: Vec<Vec<(Arc<str>, IntCounter)>>,
    meters: Vec<Vec<IntCounter>>,
    /// Each route label's name, then `usage` and `none` (interned).
    route_names: Vec<&'static str>,
    /// Each tier's name, then `none` (interned).
    tier_names: Vec<&'static str>,
}

impl Handles {
    /// The handles of `config`'s series; creates them at zero first.
    pub fn new(metrics: &Metrics, config: &Config) -> Handles {
        metrics.prepare(config);
        let mut route_names: Vec<&'static str> =
            config.routes.iter().map(|r| intern(&r.name)).collect();
        route_names.extend([USAGE, NONE]);
        let mut tier_names: Vec<&'static str> = config.tiers.keys().map(|t| intern(t)).collect();
        tier_names.push(NONE);
        let per_tier = |vec: &IntCounterVec| -> Vec<IntCounter> {
            tier_names
                .iter()
                .map(|t| vec.with_label_values(&[t]))
                .collect()
        };
        Handles {
            routes: route_names.len(),
            tiers: tier_names.len(),
            durations: route_names
                .iter()
                .map(|r| metrics.request_duration.with_label_values(&[r]))
                .collect(),
            requests: (0..route_names.len() * tier_names.len() * CODES.len())
                .map(|_| OnceLock::new())
                .collect(),
            requests_vec: metrics.requests.clone(),
            credits: per_tier(&metrics.credits_charged),
            overage: per_tier(&metrics.overage_units),
            pools: config
                .routes
                .iter()
                .map(|r| {
                    r.pools
                        .iter()
                        .map(|(p, _)| (p.clone(), metrics.pool_charged.with_label_values(&[&**p])))
                        .collect()
                })
                .collect(),
            meters: config
                .routes
                .iter()
                .map(|r| {
                    r.meter
                        .iter()
                        .map(|(p, _)| metrics.pool_charged.with_label_values(&[p]))
                        .collect()
                })
                .collect(),
            route_names,
            tier_names,
        }
    }

    fn route(&self, route: RouteLabel) -> usize {
        match route {
            RouteLabel::Route(r) if r < self.routes - 2 => r,
            RouteLabel::Usage => self.routes - 2,
            _ => self.routes - 1,
        }
    }

    fn tier(&self, tier: Option<usize>) -> usize {
        tier.filter(|t| *t < self.tiers - 1)
            .unwrap_or(self.tiers - 1)
    }

    /// The names of the route and tier labels a request counts under.
    pub fn names(&self, route: RouteLabel, tier: Option<usize>) -> (&'static str, &'static str) {
        (
            self.route_names[self.route(route)],
            self.tier_names[self.tier(tier)],
        )
    }

    /// Counts a finished request and its duration.
    pub fn request(&self, route: RouteLabel, tier: Option<usize>, code: &str, seconds: f64) {
        let (r, t) = (self.route(route), self.tier(tier));
        self.durations[r].observe(seconds);
        let c = CODES.iter().position(|c| *c == code).unwrap_or(0);
        let counter = self.requests[(r * self.tiers + t) * CODES.len() + c].get_or_init(|| {
            self.requests_vec.with_label_values(&[
                self.route_names[r],
                self.tier_names[t],
                CODES[c],
            ])
        });
        counter.inc();
    }

    /// Counts the pool units a request on `route` was charged, net of
    /// refunds, through the route's handles; a charge of a pool the route
    /// does not name first, or without a route (none that `gate::admit`
    /// makes), by its label.
    pub fn pools(&self, metrics: &Metrics, route: Option<usize>, charge: &crate::gate::Charge) {
        let handles = route
            .and_then(|r| self.pools.get(r))
            .map_or(&[][..], Vec::as_slice);
        for (i, pc) in charge.pools.iter().enumerate() {
            match handles.get(i) {
                Some((name, counter)) if Arc::ptr_eq(name, &pc.pool) => counter.inc_by(pc.units),
                _ => metrics
                    .pool_charged
                    .with_label_values(&[&*pc.pool])
                    .inc_by(pc.units),
            }
        }
    }

    /// Counts units metered from an answer: `units` of the `meter`th pool
    /// `route` meters.
    pub fn metered(&self, route: usize, meter: usize, units: u64) {
        if let Some(counter) = self.meters.get(route).and_then(|m| m.get(meter)) {
            counter.inc_by(units);
        }
    }

    /// Counts the credits and overage a request was charged, net of refunds.
    pub fn charge(&self, tier: Option<usize>, credits: u64, overage: u64) {
        let t = self.tier(tier);
        self.credits[t].inc_by(credits);
        if overage > 0 {
            self.overage[t].inc_by(overage);
        }
    }
}

/// A label that stays bounded: `tier` when the config has it, else `none`.
pub fn tier_label<'a>(config: &Config, tier: Option<&'a str>) -> &'a str {
    match tier {
        Some(t) if config.tiers.contains_key(t) => t,
        _ => NONE,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_name_is_exported_from_the_start() {
        let metrics = Metrics::new().expect("metrics");
        let config = Config::parse(
            "upstreams: { main: { url: \"http://127.0.0.1:1\" } }\ntiers: { free: { credits: 1, pools: { p: { limit: 1, window: 1s, shadow: true } } } }\nroutes: [ { name: a, path: /a, upstream: main } ]\n",
        )
        .expect("config")
        .config;
        metrics.prepare(&config);
        let text = metrics.render();
        for name in NAMES {
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} missing from:\n{text}"
            );
        }
        assert!(text.contains("tollgate_config_reloads_total{result=\"error\"} 0"));
        assert!(text.contains("tollgate_requests_total{code=\"OK\",route=\"a\",tier=\"free\"} 0"));
    }
}
