//! The configuration: the YAML file validated into runtime types.
//!
//! Two layers, as in river: `file` mirrors the YAML with serde, and
//! [`Config::parse`] validates it into [`Config`], where invalid states cannot
//! be written (non-zero limits, real `Duration`s, routes that name an existing
//! upstream). Validation collects every error with its YAML path and line
//! rather than stopping at the first, and never panics.

mod file;
mod locate;
mod validate;

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;
use indexmap::IndexMap;

use crate::calendar::Interval;

/// A fully validated configuration. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Config {
    pub listen: Listen,
    /// The embedded store's directory; with `redis`, only where the pid
    /// file and the upgrade hand-over socket live.
    pub store_path: PathBuf,
    /// The shared store, when several gateways run (SPEC §8).
    pub redis: Option<RedisConfig>,
    pub root_key_env: String,
    pub upstreams: IndexMap<String, Upstream>,
    pub tiers: IndexMap<String, Tier>,
    pub routes: Vec<Route>,
    /// Finds the first matching route of `routes` without a scan.
    pub route_table: crate::route::RouteTable,
    pub reporting: Option<Reporting>,
    pub usage_path: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    /// The proxy's HTTPS listener, if any.
    pub proxy_tls: Option<ProxyTls>,
}

/// `listen.proxy_tls`: where the proxy also listens with TLS (HTTP/2 by
/// ALPN), and the PEM files it reads, again whenever they change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyTls {
    pub addr: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    pub tls: bool,
    /// Host name or IP literal, without brackets.
    pub host: String,
    pub port: u16,
    /// `Host` header sent upstream; `None` forwards the client's unchanged.
    pub host_header: Option<String>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credits {
    Unlimited,
    Limited(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refill {
    pub interval: Interval,
    pub amount: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overage {
    Block,
    Allow,
}

#[derive(Debug, Clone)]
pub struct RateLimit {
    pub limit: NonZeroU64,
    pub window: Duration,
    pub shadow: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolWindow {
    /// A trailing window of this length.
    Rolling(Duration),
    /// Resets to zero at each calendar boundary.
    Calendar(Interval),
}

#[derive(Debug, Clone)]
pub struct Pool {
    pub limit: NonZeroU64,
    pub window: PoolWindow,
    pub shadow: bool,
}

#[derive(Debug, Clone)]
pub struct Tier {
    pub id: String,
    /// `id` as the `X-Tollgate-Tier` value sent upstream, built once.
    pub id_header: http::HeaderValue,
    pub name: String,
    pub key_prefix: String,
    pub credits: Credits,
    pub refill: Option<Refill>,
    pub rate_limits: IndexMap<String, RateLimit>,
    /// The draft `RateLimit-Policy` header for `rate_limits`, built once:
    /// it depends only on the tier.
    pub rate_limit_policy: Option<http::HeaderValue>,
    pub pools: IndexMap<String, Pool>,
    pub features: Vec<String>,
    pub overage: Overage,
    pub upgrade_url: Option<String>,
}

impl Tier {
    pub fn has_feature(&self, feature: &str) -> bool {
        self.features.iter().any(|f| f == feature)
    }

    /// `"<name>";q=<limit>;w=<window seconds>`, one per limit, or `None`
    /// without limits (or if a name cannot be a header value).
    pub fn policy_header(limits: &IndexMap<String, RateLimit>) -> Option<http::HeaderValue> {
        if limits.is_empty() {
            return None;
        }
        let policy: Vec<String> = limits
            .iter()
            .map(|(name, rl)| format!("\"{name}\";q={};w={}", rl.limit, rl.window.as_secs()))
            .collect();
        http::HeaderValue::from_str(&policy.join(", ")).ok()
    }
}

/// An amount charged by a route: fixed, or read from a request header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Amount {
    Fixed(u64),
    Header(HeaderName),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    /// Matches the path, with or without one trailing slash.
    Exact(String),
    /// `/api/ai/*`: stored as `/api/ai`; matches it and everything below it.
    Prefix(String),
}

impl PathPattern {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            // `/a/` is `/a` to many frameworks, so it meets `/a`'s gate too.
            // An exact path written with a trailing slash matches itself.
            PathPattern::Exact(p) => {
                path == p || path.strip_suffix('/').filter(|s| !s.is_empty()) == Some(p.as_str())
            }
            PathPattern::Prefix(p) => match path.strip_prefix(p.as_str()) {
                Some(rest) => rest.is_empty() || rest.starts_with('/') || p.ends_with('/'),
                None => false,
            },
        }
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    /// Upper-case methods; `None` matches any.
    pub methods: Option<Vec<http::Method>>,
    pub path: PathPattern,
    pub upstream: String,
    /// The index of `upstream` in [`Config::upstreams`].
    pub upstream_index: usize,
    /// Shared, not copied, by every request the route charges.
    pub feature: Option<Arc<str>>,
    pub cost: Amount,
    pub pools: Vec<(Arc<str>, Amount)>,
    /// Pools charged after the response, from an upstream response header.
    pub meter: Vec<(String, HeaderName)>,
    pub refund_on_5xx: bool,
    pub auth: bool,
    pub forward_key: bool,
    pub allow_encoded_slashes: bool,
}

impl Route {
    pub fn matches(&self, method: &http::Method, path: &str) -> bool {
        self.allows(method) && self.path.matches(path)
    }

    /// Whether the route takes this method (any, when it names none).
    /// `HEAD` goes wherever `GET` goes.
    pub fn allows(&self, method: &http::Method) -> bool {
        self.methods.as_ref().is_none_or(|methods| {
            methods.contains(method)
                || (*method == http::Method::HEAD && methods.contains(&http::Method::GET))
        })
    }
}

/// `store.redis`: several gateways on one Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://` or `rediss://`, without the password when `password`
    /// comes from the environment.
    pub url: String,
    pub password: Option<Secret>,
    /// What a keyed request gets while Redis cannot be reached.
    pub on_error: OnStoreError,
    /// `url` is one node of a Redis Cluster.
    pub cluster: bool,
    /// How long an outbox event taken by a node that has gone quiet waits
    /// before another node takes it over (the node has died).
    pub claim_after: std::time::Duration,
}

impl RedisConfig {
    /// The Redis `tollgate migrate --to <url>` writes to.
    pub fn for_migration(
        url: String,
        password_env: Option<&str>,
        cluster: bool,
    ) -> anyhow::Result<RedisConfig> {
        redis::IntoConnectionInfo::into_connection_info(url.as_str()).map_err(|e| {
            anyhow::anyhow!(
                "'{}' is not a Redis URL: {e}",
                crate::store::migrate::redacted(&url)
            )
        })?;
        let password = match password_env {
            None => None,
            Some(name) => match std::env::var(name) {
                Ok(value) if !value.is_empty() => Some(Secret::new(value)),
                _ => anyhow::bail!("--password-env names {name}, which is not set"),
            },
        };
        Ok(RedisConfig {
            url,
            password,
            on_error: OnStoreError::Deny,
            cluster,
            claim_after: std::time::Duration::from_secs(30),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnStoreError {
    /// 503 `STORE_UNAVAILABLE` (the default).
    Deny,
    /// Forward uncharged, counted in `tollgate_store_bypassed_total`.
    Allow,
}

#[derive(Debug, Clone)]
pub struct Reporting {
    pub webhook: Option<Webhook>,
    pub stripe: Option<Stripe>,
    /// Fractions of a period's credits, ascending.
    pub thresholds: Vec<f64>,
    pub flush_interval: Duration,
    /// Also report every unit charged (`usage` events).
    pub usage_events: bool,
}

/// A secret read from the environment. It never prints: `Debug` and
/// `Display` show a placeholder, so no log line or error can carry it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

#[derive(Debug, Clone)]
pub struct Webhook {
    pub url: String,
    /// Signs every delivery.
    pub secret: Secret,
}

#[derive(Debug, Clone)]
pub struct Stripe {
    pub api_key: Secret,
    pub base_url: String,
    /// The meter that receives overage units.
    pub event_name: String,
    /// Counter (`credits` or a pool) → the meter billing all its units.
    pub meters: IndexMap<String, String>,
}

/// A config file's text, or the one error saying why it cannot be read.
fn read(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            path: String::new(),
            line: None,
            message: format!("cannot read {}: {e}", path.display()),
        }])
    })
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Loaded, ConfigErrors> {
        Self::parse(&read(path)?)
    }

    /// Validates config text, reading the secrets it names from the
    /// environment (a secret not set is an error).
    pub fn parse(text: &str) -> Result<Loaded, ConfigErrors> {
        validate::parse(text, validate::Secrets::Read)
    }

    /// Reads a config file for a client of the gateway (`tollgate keys`),
    /// which needs addresses, not the gateway's secrets: they are left
    /// empty and need not be set.
    pub fn load_for_client(path: &Path) -> Result<Loaded, ConfigErrors> {
        validate::parse(&read(path)?, validate::Secrets::Skip)
    }

    /// The tier at `index` in [`Config::tiers`].
    pub fn tier_at(&self, index: usize) -> Option<&Tier> {
        self.tiers.get_index(index).map(|(_, tier)| tier)
    }

    pub fn tier(&self, id: &str) -> Option<&Tier> {
        self.tiers.get(id)
    }

    /// Whether any tier defines, or any route charges or meters, `pool`.
    pub fn knows_pool(&self, pool: &str) -> bool {
        self.tiers.values().any(|t| t.pools.contains_key(pool))
            || self.routes.iter().any(|r| {
                r.pools.iter().any(|(p, _)| **p == *pool) || r.meter.iter().any(|(p, _)| p == pool)
            })
    }

    /// The index of the first route, in file order, that matches.
    pub fn route_index(&self, method: &http::Method, path: &str) -> Option<usize> {
        self.route_table.find(&self.routes, method, path)
    }

    /// The methods the routes on `path` take, when none takes `method`
    /// (see [`crate::route::RouteTable::allowed`]).
    pub fn allowed_methods(&self, path: &str) -> Vec<http::Method> {
        self.route_table.allowed(&self.routes, path)
    }

    /// The first route, in file order, that matches.
    pub fn route_for(&self, method: &http::Method, path: &str) -> Option<&Route> {
        self.route_index(method, path).map(|i| &self.routes[i])
    }

    /// Every feature some tier grants.
    pub fn all_features(&self) -> HashSet<&str> {
        self.tiers
            .values()
            .flat_map(|t| t.features.iter().map(String::as_str))
            .collect()
    }
}

/// A valid config and the warnings found on the way.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    pub warnings: Vec<ConfigError>,
}

/// One problem in the file, located by its YAML path and, where known, line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.path.is_empty(), self.line) {
            (true, Some(line)) => write!(f, "line {line}: {}", self.message),
            (true, None) => f.write_str(&self.message),
            (false, Some(line)) => write!(f, "{} (line {line}): {}", self.path, self.message),
            (false, None) => write!(f, "{}: {}", self.path, self.message),
        }
    }
}

/// Every error found in one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        writeln!(
            f,
            "{n} error{} in configuration:",
            if n == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            writeln!(f, "  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[cfg(test)]
mod tests {
    use super::PathPattern;

    #[test]
    fn exact_matches_with_one_trailing_slash() {
        let p = PathPattern::Exact("/api/admin".into());
        assert!(p.matches("/api/admin"));
        assert!(p.matches("/api/admin/"));
        assert!(!p.matches("/api/admin/x"));
        assert!(!p.matches("/api/adminx"));
        assert!(PathPattern::Exact("/".into()).matches("/"));
    }

    #[test]
    fn prefix_matches_itself_and_below_on_segment_boundaries() {
        let p = PathPattern::Prefix("/api/ai".into());
        assert!(p.matches("/api/ai"));
        assert!(p.matches("/api/ai/"));
        assert!(p.matches("/api/ai/chat/x"));
        assert!(!p.matches("/api/aix"));
        assert!(PathPattern::Prefix("/".into()).matches("/anything"));
    }
}
