//! Turns the file structs into the runtime [`Config`], collecting every
//! error and warning with its YAML path and line.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU64;
use std::path::PathBuf;
use std::time::Duration;

use http::header::HeaderName;
use indexmap::IndexMap;

use super::file::{self, AmountFile, CreditsFile, FileConfig};
use super::locate::Lines;
use super::*;
use crate::calendar::Interval;
use crate::path::normalise;

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_FLUSH_INTERVAL: Duration = Duration::from_secs(5);
const MAX_PREFIX_LEN: usize = 32;

/// Whether secrets are read from their env vars, or left empty (for a
/// client that only needs addresses).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Secrets {
    Read,
    Skip,
}

pub(super) fn parse(text: &str, secrets: Secrets) -> Result<Loaded, ConfigErrors> {
    let lines = Lines::index(text);
    let file = deserialize(text, &lines)?;
    let mut check = Check {
        lines: &lines,
        errors: Vec::new(),
        warnings: Vec::new(),
        secrets,
    };
    let config = check.config(file);
    if check.errors.is_empty() {
        Ok(Loaded {
            config,
            warnings: check.warnings,
        })
    } else {
        Err(ConfigErrors(check.errors))
    }
}

fn deserialize(text: &str, lines: &Lines) -> Result<FileConfig, ConfigErrors> {
    if text.trim().is_empty() {
        return Err(ConfigErrors(vec![ConfigError {
            path: String::new(),
            line: None,
            message: "the file is empty".into(),
        }]));
    }
    let de = yaml_serde::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let inner = e.into_inner();
        let line = inner
            .location()
            .map(|l| l.line())
            .or_else(|| lines.line(&path));
        let mut message = inner.to_string();
        // The parser appends its own position; the line is printed once, in front.
        if let Some(cut) = message.find(" at line ") {
            message.truncate(cut);
        }
        ConfigErrors(vec![ConfigError {
            path,
            line,
            message,
        }])
    })
}

struct Check<'a> {
    lines: &'a Lines,
    errors: Vec<ConfigError>,
    warnings: Vec<ConfigError>,
    secrets: Secrets,
}

impl Check<'_> {
    fn error(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.to_string(),
            line: self.lines.line(path),
            message: message.into(),
        });
    }

    fn warn(&mut self, path: &str, message: impl Into<String>) {
        self.warnings.push(ConfigError {
            path: path.to_string(),
            line: self.lines.line(path),
            message: message.into(),
        });
    }

    fn config(&mut self, file: FileConfig) -> Config {
        let listen = self.listen(&file.listen);
        let upstreams = file
            .upstreams
            .iter()
            .filter_map(|(name, u)| {
                self.upstream(&format!("upstreams.{name}"), name, u)
                    .map(|u| (name.clone(), u))
            })
            .collect::<IndexMap<_, _>>();
        let tiers = file
            .tiers
            .iter()
            .filter_map(|(id, t)| self.tier(id, t).map(|t| (id.clone(), t)))
            .collect::<IndexMap<_, _>>();
        if file.upstreams.is_empty() {
            self.error("upstreams", "at least one upstream is required");
        }
        if file.tiers.is_empty() {
            self.error("tiers", "at least one tier is required");
        }
        if file.routes.is_empty() {
            self.warn("routes", "no routes: every request will get 404");
        }
        let mut names = HashSet::new();
        let routes = file
            .routes
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let path = format!("routes[{i}]");
                if !names.insert(r.name.clone()) {
                    self.error(
                        &format!("{path}.name"),
                        format!("duplicate route name '{}'", r.name),
                    );
                }
                self.route(&path, r, &file)
            })
            .collect::<Vec<_>>();
        let reporting = file.reporting.as_ref().and_then(|r| self.reporting(r));
        if let Some(stripe) = file.reporting.as_ref().and_then(|r| r.stripe.as_ref()) {
            for counter in stripe.meters.keys() {
                let known = counter == "credits"
                    || file.tiers.values().any(|t| t.pools.contains_key(counter))
                    || file
                        .routes
                        .iter()
                        .any(|r| r.pools.contains_key(counter) || r.meter.contains_key(counter));
                if !known {
                    self.warn(
                        &format!("reporting.stripe.meters.{counter}"),
                        format!("no tier or route has a counter '{counter}' (credits or a pool): this meter will never bill"),
                    );
                }
            }
        }
        let usage_path = self.usage_path(&file.usage.path);
        if file.admin.root_key_env.trim().is_empty() {
            self.error("admin.root_key_env", "must name an environment variable");
        }
        if file.store.path.trim().is_empty() {
            self.error("store.path", "must not be empty");
        }
        let redis = file.store.redis.as_ref().and_then(|r| self.redis(r));
        Config {
            listen,
            store_path: PathBuf::from(&file.store.path),
            redis,
            root_key_env: file.admin.root_key_env,
            upstreams,
            tiers,
            route_table: crate::route::RouteTable::new(&routes),
            routes,
            reporting,
            usage_path,
        }
    }

    fn listen(&mut self, l: &file::ListenFile) -> Listen {
        let mut addr = |field: &str, value: &str| -> SocketAddr {
            value.parse().unwrap_or_else(|_| {
                self.error(
                    &format!("listen.{field}"),
                    format!("'{value}' is not an address like 127.0.0.1:8080"),
                );
                SocketAddr::from(([127, 0, 0, 1], 0))
            })
        };
        let listen = Listen {
            proxy: addr("proxy", &l.proxy),
            admin: addr("admin", &l.admin),
            metrics: addr("metrics", &l.metrics),
        };
        let named = [
            ("proxy", listen.proxy),
            ("admin", listen.admin),
            ("metrics", listen.metrics),
        ];
        for (i, (a_name, a)) in named.iter().enumerate() {
            for (b_name, b) in &named[i + 1..] {
                if overlaps(*a, *b) {
                    self.error(
                        &format!("listen.{b_name}"),
                        format!("{b} overlaps listen.{a_name} ({a})"),
                    );
                }
            }
        }
        listen
    }

    fn duration(&mut self, path: &str, text: &str) -> Option<Duration> {
        match humantime::parse_duration(text.trim()) {
            Ok(d) if d.is_zero() => {
                self.error(path, "must be greater than zero");
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.error(
                    path,
                    format!("'{text}' is not a duration like 500ms, 60s, 5m, 1h or 30d ({e})"),
                );
                None
            }
        }
    }

    fn positive(&mut self, path: &str, value: i64) -> Option<NonZeroU64> {
        match u64::try_from(value).ok().and_then(NonZeroU64::new) {
            Some(v) => Some(v),
            None => {
                self.error(path, format!("must be greater than 0, got {value}"));
                None
            }
        }
    }

    fn non_negative(&mut self, path: &str, value: i64) -> Option<u64> {
        match u64::try_from(value) {
            Ok(v) => Some(v),
            Err(_) => {
                self.error(path, format!("must not be negative, got {value}"));
                None
            }
        }
    }

    fn url(&mut self, path: &str, text: &str) -> Option<http::Uri> {
        match text.parse::<http::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.host().is_some_and(|h| !h.is_empty()) =>
            {
                Some(uri)
            }
            _ => {
                self.error(
                    path,
                    format!("'{text}' is not an http:// or https:// URL with a host"),
                );
                None
            }
        }
    }

    fn upstream(&mut self, path: &str, name: &str, u: &file::UpstreamFile) -> Option<Upstream> {
        let uri = self.url(&format!("{path}.url"), &u.url);
        let connect_timeout = match &u.connect_timeout {
            Some(t) => self.duration(&format!("{path}.connect_timeout"), t),
            None => Some(DEFAULT_CONNECT_TIMEOUT),
        };
        let read_timeout = match &u.read_timeout {
            Some(t) => self.duration(&format!("{path}.read_timeout"), t),
            None => Some(DEFAULT_READ_TIMEOUT),
        };
        let uri = uri?;
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            self.error(
                &format!("{path}.url"),
                "must be an origin (scheme, host and port) without a path or query",
            );
            return None;
        }
        let tls = uri.scheme_str() == Some("https");
        let host = uri
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let host_header = match &u.host {
            Some(h) if h.trim().is_empty() || h.contains(['\r', '\n']) => {
                self.error(&format!("{path}.host"), "must be a host name");
                return None;
            }
            other => other.clone(),
        };
        Some(Upstream {
            name: name.to_string(),
            tls,
            host,
            port,
            host_header,
            connect_timeout: connect_timeout?,
            read_timeout: read_timeout?,
        })
    }

    /// A refill interval written as `<base>.<field>: daily|monthly` with an
    /// optional `<base>.day`.
    fn interval(
        &mut self,
        base: &str,
        field: &str,
        word: &str,
        day: Option<i64>,
    ) -> Option<Interval> {
        let path = format!("{base}.{field}");
        let day = match day {
            None => None,
            Some(d) if (1..=31).contains(&d) => Some(d as u8),
            Some(d) => {
                self.error(
                    &format!("{base}.day"),
                    format!("must be a day of the month, 1-31, got {d}"),
                );
                return None;
            }
        };
        match word {
            "daily" if day.is_some() => {
                self.error(&format!("{base}.day"), "only a monthly refill takes a day");
                None
            }
            "daily" => Some(Interval::Daily),
            "monthly" => Some(Interval::Monthly {
                day: day.unwrap_or(1),
            }),
            other => {
                self.error(
                    &path,
                    format!("unknown refill interval '{other}': expected daily or monthly"),
                );
                None
            }
        }
    }

    fn tier(&mut self, id: &str, t: &file::TierFile) -> Option<Tier> {
        let path = format!("tiers.{id}");
        let ok_before = self.errors.len();
        if id.is_empty()
            || !id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c))
        {
            self.error(
                &path,
                "a tier id may hold only letters, digits, '-' and '_'",
            );
        }
        let key_prefix = match &t.key_prefix {
            Some(p) => {
                if p.is_empty()
                    || p.len() > MAX_PREFIX_LEN
                    || !p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    || p.starts_with('_')
                    || p.ends_with('_')
                {
                    self.error(
                        &format!("{path}.key_prefix"),
                        format!("'{p}' must be 1-{MAX_PREFIX_LEN} letters, digits or inner '_'"),
                    );
                }
                p.clone()
            }
            None => format!("sk_{}", id.replace('-', "_")),
        };
        let credits = match &t.credits {
            None => Credits::Unlimited,
            Some(CreditsFile::Word(w)) if w == "unlimited" => Credits::Unlimited,
            Some(CreditsFile::Word(w)) => {
                self.error(
                    &format!("{path}.credits"),
                    format!("'{w}' is not a number of credits or 'unlimited'"),
                );
                Credits::Unlimited
            }
            Some(CreditsFile::Amount(n)) => self
                .non_negative(&format!("{path}.credits"), *n)
                .map_or(Credits::Unlimited, Credits::Limited),
        };
        let refill = t.refill.as_ref().and_then(|r| {
            let rpath = format!("{path}.refill");
            let interval = self.interval(&rpath, "interval", &r.interval, r.day);
            let amount = self.positive(&format!("{rpath}.amount"), r.amount);
            if credits == Credits::Unlimited {
                self.error(
                    &rpath,
                    "a tier with unlimited credits has nothing to refill",
                );
            }
            Some(Refill {
                interval: interval?,
                amount: amount?.get(),
            })
        });
        let mut rate_limits = IndexMap::new();
        for (name, rl) in &t.rate_limits {
            let rpath = format!("{path}.rate_limits.{name}");
            let limit = self.positive(&format!("{rpath}.limit"), rl.limit);
            let window = self.duration(&format!("{rpath}.window"), &rl.window);
            if let (Some(limit), Some(window)) = (limit, window) {
                rate_limits.insert(
                    name.clone(),
                    RateLimit {
                        limit,
                        window,
                        shadow: rl.shadow,
                    },
                );
            }
        }
        let mut pools = IndexMap::new();
        for (name, p) in &t.pools {
            let ppath = format!("{path}.pools.{name}");
            let limit = self.positive(&format!("{ppath}.limit"), p.limit);
            let window = match (&p.window, &p.refill) {
                (Some(w), None) => {
                    if p.day.is_some() {
                        self.error(&format!("{ppath}.day"), "only a monthly refill takes a day");
                    }
                    self.duration(&format!("{ppath}.window"), w)
                        .map(PoolWindow::Rolling)
                }
                (None, Some(r)) => self
                    .interval(&ppath, "refill", r, p.day)
                    .map(PoolWindow::Calendar),
                _ => {
                    self.error(
                        &ppath,
                        "a pool needs exactly one of 'window' (rolling) or 'refill' (calendar)",
                    );
                    None
                }
            };
            if let (Some(limit), Some(window)) = (limit, window) {
                pools.insert(
                    name.clone(),
                    Pool {
                        limit,
                        window,
                        shadow: p.shadow,
                    },
                );
            }
        }
        let overage = match t.overage.as_deref() {
            None | Some("block") => Overage::Block,
            Some("allow") => Overage::Allow,
            Some(other) => {
                self.error(
                    &format!("{path}.overage"),
                    format!("unknown overage policy '{other}': expected block or allow"),
                );
                Overage::Block
            }
        };
        if let Some(url) = &t.upgrade_url {
            self.url(&format!("{path}.upgrade_url"), url);
        }
        if self.errors.len() > ok_before {
            return None;
        }
        let rate_limit_policy = Tier::policy_header(&rate_limits);
        Some(Tier {
            id: id.to_string(),
            name: t.name.clone().unwrap_or_else(|| id.to_string()),
            key_prefix,
            credits,
            refill,
            rate_limits,
            rate_limit_policy,
            pools,
            features: t.features.clone(),
            overage,
            upgrade_url: t.upgrade_url.clone(),
        })
    }

    fn header_name(&mut self, path: &str, name: &str) -> Option<HeaderName> {
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(h) => Some(h),
            Err(_) => {
                self.error(path, format!("'{name}' is not a valid header name"));
                None
            }
        }
    }

    fn amount(&mut self, path: &str, a: &AmountFile) -> Option<Amount> {
        match a {
            AmountFile::Fixed(n) => self.non_negative(path, *n).map(Amount::Fixed),
            AmountFile::Header(h) => self
                .header_name(&format!("{path}.header"), &h.header)
                .map(Amount::Header),
        }
    }

    fn route(&mut self, path: &str, r: &file::RouteFile, file: &FileConfig) -> Option<Route> {
        let ok_before = self.errors.len();
        if r.name.trim().is_empty() {
            self.error(&format!("{path}.name"), "must not be empty");
        }
        let methods = r.methods.as_ref().map(|ms| {
            ms.iter()
                .enumerate()
                .filter_map(|(i, m)| {
                    match http::Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                        Ok(m) => Some(m),
                        Err(_) => {
                            self.error(
                                &format!("{path}.methods[{i}]"),
                                format!("'{m}' is not an HTTP method"),
                            );
                            None
                        }
                    }
                })
                .collect::<Vec<_>>()
        });
        let pattern = self.path_pattern(&format!("{path}.path"), &r.path, r.allow_encoded_slashes);
        if !file.upstreams.contains_key(&r.upstream) {
            self.error(
                &format!("{path}.upstream"),
                format!("unknown upstream '{}'", r.upstream),
            );
        }
        let public = match r.auth.as_deref() {
            None | Some("key") => false,
            Some("none") => true,
            Some(other) => {
                self.error(
                    &format!("{path}.auth"),
                    format!("unknown auth '{other}': expected key or none"),
                );
                false
            }
        };
        if public {
            let charges = [
                ("feature", r.feature.is_some()),
                ("cost", r.cost.is_some()),
                ("pools", !r.pools.is_empty()),
                ("meter", !r.meter.is_empty()),
            ];
            for (field, set) in charges {
                if set {
                    self.error(
                        &format!("{path}.{field}"),
                        "a public route (auth: none) has no key to gate or charge",
                    );
                }
            }
        }
        if let Some(feature) = &r.feature {
            let granted = file.tiers.values().any(|t| t.features.contains(feature));
            if !granted {
                self.warn(
                    &format!("{path}.feature"),
                    format!("no tier grants feature '{feature}': every keyed request gets 403"),
                );
            }
        }
        let cost = match &r.cost {
            Some(a) => self.amount(&format!("{path}.cost"), a),
            None => Some(Amount::Fixed(1)),
        };
        let mut pools = Vec::new();
        for (pool, a) in &r.pools {
            self.warn_unknown_pool(&format!("{path}.pools.{pool}"), pool, file);
            if let Some(a) = self.amount(&format!("{path}.pools.{pool}"), a) {
                pools.push((pool.clone(), a));
            }
        }
        let mut meter = Vec::new();
        for (pool, header) in &r.meter {
            self.warn_unknown_pool(&format!("{path}.meter.{pool}"), pool, file);
            if let Some(h) = self.header_name(&format!("{path}.meter.{pool}"), header) {
                meter.push((pool.clone(), h));
            }
        }
        if self.errors.len() > ok_before {
            return None;
        }
        Some(Route {
            name: r.name.clone(),
            methods,
            path: pattern?,
            upstream: r.upstream.clone(),
            // Every upstream is valid when every route is (else the config
            // is refused), so the file's index is the config's.
            upstream_index: file.upstreams.get_index_of(&r.upstream).unwrap_or(0),
            feature: r.feature.clone(),
            cost: cost?,
            pools,
            meter,
            refund_on_5xx: r.refund_on_5xx,
            auth: !public,
            forward_key: r.forward_key,
            allow_encoded_slashes: r.allow_encoded_slashes,
        })
    }

    fn warn_unknown_pool(&mut self, path: &str, pool: &str, file: &FileConfig) {
        if !file.tiers.values().any(|t| t.pools.contains_key(pool)) {
            self.warn(
                path,
                format!("no tier defines pool '{pool}': its use is counted but never limited"),
            );
        }
    }

    fn path_pattern(&mut self, path: &str, text: &str, allow_encoded: bool) -> Option<PathPattern> {
        let (base, prefix) = match text.strip_suffix("/*") {
            Some(base) => (if base.is_empty() { "/" } else { base }, true),
            None => (text, false),
        };
        if base.contains('*') {
            self.error(path, "'*' is allowed only as a final '/*'");
            return None;
        }
        match normalise(base, allow_encoded) {
            Ok(canonical) if canonical == base => Some(if prefix {
                PathPattern::Prefix(canonical.into_owned())
            } else {
                PathPattern::Exact(canonical.into_owned())
            }),
            Ok(canonical) => {
                self.error(
                    path,
                    format!("'{text}' is not in canonical form; write it as '{canonical}'"),
                );
                None
            }
            Err(e) => {
                self.error(path, format!("'{text}': {e}"));
                None
            }
        }
    }

    fn redis(&mut self, r: &file::RedisFile) -> Option<RedisConfig> {
        let ok_before = self.errors.len();
        if let Err(e) = redis::IntoConnectionInfo::into_connection_info(r.url.as_str()) {
            self.error(
                "store.redis.url",
                format!(
                    "'{}' is not a Redis URL (redis://host:port/db or rediss://...): {e}",
                    crate::store::migrate::redacted(&r.url)
                ),
            );
        }
        let password = match &r.password_env {
            Some(name) => self.secret("store.redis.password_env", name),
            None => None,
        };
        let on_error = match r.on_error.as_deref() {
            None | Some("deny") => OnStoreError::Deny,
            Some("allow") => OnStoreError::Allow,
            Some(other) => {
                self.error(
                    "store.redis.on_error",
                    format!(
                        "'{other}' is not one of: deny (answer 503), allow (forward uncharged)"
                    ),
                );
                OnStoreError::Deny
            }
        };
        let claim_after = match r.claim_after.as_deref() {
            None => Some(Duration::from_secs(30)),
            Some(text) => self.duration("store.redis.claim_after", text),
        };
        if claim_after.is_some_and(|d| d < Duration::from_secs(1) || d > Duration::from_secs(3600))
        {
            self.error("store.redis.claim_after", "must be between 1s and 1h");
        }
        (self.errors.len() == ok_before).then(|| RedisConfig {
            url: r.url.clone(),
            password,
            on_error,
            cluster: r.cluster,
            claim_after: claim_after.unwrap_or(Duration::from_secs(30)),
        })
    }

    /// The value of the env var `name`, which must be set and not empty.
    fn secret(&mut self, path: &str, name: &str) -> Option<Secret> {
        if self.secrets == Secrets::Skip {
            return Some(Secret::new(String::new()));
        }
        match std::env::var(name) {
            Ok(value) if !value.is_empty() => Some(Secret::new(value)),
            _ => {
                self.error(
                    path,
                    format!("the environment variable {name} is not set (it holds the secret)"),
                );
                None
            }
        }
    }

    fn reporting(&mut self, r: &file::ReportingFile) -> Option<Reporting> {
        let ok_before = self.errors.len();
        for (i, t) in r.thresholds.iter().enumerate() {
            if !(*t > 0.0 && *t <= 1.0) {
                self.error(
                    &format!("reporting.thresholds[{i}]"),
                    format!("a threshold is a fraction of credits used, in (0, 1]; got {t}"),
                );
            }
        }
        let flush_interval = match &r.flush_interval {
            Some(t) => self.duration("reporting.flush_interval", t),
            None => Some(DEFAULT_FLUSH_INTERVAL),
        };
        let webhook = r.webhook.as_ref().and_then(|w| {
            self.url("reporting.webhook.url", &w.url);
            let secret = match &w.secret_env {
                Some(name) => self.secret("reporting.webhook.secret_env", name),
                None => {
                    self.error(
                        "reporting.webhook",
                        "secret_env is required: the name of the env var holding the signing secret",
                    );
                    None
                }
            };
            Some(Webhook {
                url: w.url.clone(),
                secret: secret?,
            })
        });
        let stripe = r.stripe.as_ref().and_then(|s| {
            let base_url = s
                .base_url
                .clone()
                .unwrap_or_else(|| "https://api.stripe.com".into());
            self.url("reporting.stripe.base_url", &base_url);
            let api_key = self.secret("reporting.stripe.api_key_env", &s.api_key_env);
            Some(Stripe {
                api_key: api_key?,
                base_url: base_url.trim_end_matches('/').to_string(),
                event_name: s.event_name.clone().unwrap_or_else(|| "api_overage".into()),
                meters: s.meters.clone(),
            })
        });
        if self.errors.len() > ok_before {
            return None;
        }
        let mut thresholds = r.thresholds.clone();
        thresholds.sort_by(f64::total_cmp);
        thresholds.dedup();
        Some(Reporting {
            webhook,
            stripe,
            thresholds,
            flush_interval: flush_interval?,
            usage_events: r.usage_events,
        })
    }

    fn usage_path(&mut self, text: &str) -> String {
        match normalise(text, false) {
            Ok(canonical) if canonical == text => canonical.into_owned(),
            _ => {
                self.error(
                    "usage.path",
                    format!("'{text}' must be an absolute path in canonical form"),
                );
                text.to_string()
            }
        }
    }
}

/// Two listen addresses overlap when they share a (fixed) port and one
/// address covers the other.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    let covers = |x: IpAddr, y: IpAddr| x == y || x.is_unspecified() || y.is_unspecified();
    a.port() != 0 && a.port() == b.port() && covers(a.ip(), b.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "upstreams:\n  main: { url: \"http://127.0.0.1:3000\" }\ntiers:\n  free: { credits: 10 }\nroutes:\n  - { name: a, path: /a, upstream: main }\n";

    fn errors(text: &str) -> Vec<ConfigError> {
        match Config::parse(text) {
            Ok(_) => Vec::new(),
            Err(ConfigErrors(e)) => e,
        }
    }

    #[test]
    fn minimal_config_is_valid() {
        let loaded = Config::parse(MINIMAL).expect("valid");
        assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
        let route = &loaded.config.routes[0];
        assert_eq!(route.cost, Amount::Fixed(1));
        assert_eq!(loaded.config.tiers["free"].key_prefix, "sk_free");
    }

    #[test]
    fn unknown_key_names_path_and_line() {
        let e =
            errors(&MINIMAL.replace("free: { credits: 10 }", "free: { credits: 10, creditz: 5 }"));
        assert_eq!(e.len(), 1);
        assert!(e[0].message.contains("unknown field `creditz`"), "{e:?}");
        assert_eq!(e[0].path, "tiers.free.creditz");
        assert_eq!(e[0].line, Some(4));
    }

    #[test]
    fn every_semantic_error_is_reported() {
        let text = "\
listen: { proxy: \"0.0.0.0:8080\", admin: \"127.0.0.1:8080\" }
upstreams:
  main: { url: \"not a url\" }
tiers:
  free:
    credits: -1
    refill: { interval: monthly, amount: 10, day: 32 }
    rate_limits: { requests: { limit: 0, window: 0s } }
routes:
  - { name: a, path: /a, upstream: nowhere }
  - { name: a, path: /b, upstream: main }
";
        let e = errors(text);
        let paths: Vec<_> = e.iter().map(|e| (e.path.as_str(), e.line)).collect();
        for expected in [
            ("listen.admin", Some(1)),
            ("upstreams.main.url", Some(3)),
            ("tiers.free.credits", Some(6)),
            ("tiers.free.refill.day", Some(7)),
            ("tiers.free.rate_limits.requests.limit", Some(8)),
            ("tiers.free.rate_limits.requests.window", Some(8)),
            ("routes[0].upstream", Some(10)),
            ("routes[1].name", Some(11)),
        ] {
            assert!(paths.contains(&expected), "missing {expected:?} in {e:#?}");
        }
    }

    #[test]
    fn warnings_do_not_fail() {
        let text = MINIMAL.replace(
            "upstream: main }",
            "upstream: main, feature: nope, pools: { ghosts: 1 } }",
        );
        let loaded = Config::parse(&text).expect("valid with warnings");
        let paths: Vec<_> = loaded.warnings.iter().map(|w| w.path.as_str()).collect();
        assert_eq!(paths, ["routes[0].feature", "routes[0].pools.ghosts"]);
    }

    #[test]
    fn type_errors_name_the_path() {
        let e = errors(&MINIMAL.replace("credits: 10", "credits: [1]"));
        assert_eq!(e[0].path, "tiers.free.credits");
        let e = errors(&MINIMAL.replace("path: /a", "path: /a/../b"));
        assert!(e[0].message.contains("canonical"), "{e:?}");
    }

    #[test]
    fn either_or_values_explain_what_they_accept() {
        let e = errors(&MINIMAL.replace("credits: 10", "credits: 1.5"));
        assert_eq!(e[0].path, "tiers.free.credits");
        assert!(
            e[0].message
                .contains("a whole number of credits, or unlimited"),
            "{e:?}"
        );
        let e = errors(&MINIMAL.replace(
            "upstream: main }",
            "upstream: main, cost: { header: x, extra: 1 } }",
        ));
        assert_eq!(e[0].path, "routes[0].cost");
        assert!(
            e[0].message.contains("{ header: <request header name> }"),
            "{e:?}"
        );
    }

    #[test]
    fn listen_overlap_rules() {
        let a: SocketAddr = "0.0.0.0:80".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:80".parse().unwrap();
        let c: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert!(overlaps(a, b));
        assert!(!overlaps(c, c));
        assert!(!overlaps(b, "127.0.0.2:80".parse().unwrap()));
    }
}
