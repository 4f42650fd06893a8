//! The YAML file as written: serde structs that mirror it field for field.
//!
//! Nothing here is validated beyond its shape; `config::validate` turns a
//! [`FileConfig`] into the runtime [`super::Config`]. Every struct denies
//! unknown keys so a typo is an error, not a silently ignored setting.

use indexmap::IndexMap;
use serde::Deserialize;

/// Maps keep file order: tiers, limits and pools are shown in the order written.
pub type Map<V> = IndexMap<String, V>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub listen: ListenFile,
    #[serde(default)]
    pub store: StoreFile,
    #[serde(default)]
    pub admin: AdminFile,
    #[serde(default)]
    pub upstreams: Map<UpstreamFile>,
    #[serde(default)]
    pub tiers: Map<TierFile>,
    #[serde(default)]
    pub routes: Vec<RouteFile>,
    #[serde(default)]
    pub reporting: Option<ReportingFile>,
    #[serde(default)]
    pub usage: UsageFile,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenFile {
    #[serde(default = "default_proxy")]
    pub proxy: String,
    #[serde(default = "default_admin")]
    pub admin: String,
    #[serde(default = "default_metrics")]
    pub metrics: String,
    pub proxy_tls: Option<ProxyTlsFile>,
}

/// `listen.proxy_tls`: an HTTPS listener for the proxy.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyTlsFile {
    pub addr: String,
    pub cert: String,
    pub key: String,
}

impl Default for ListenFile {
    fn default() -> Self {
        Self {
            proxy: default_proxy(),
            admin: default_admin(),
            metrics: default_metrics(),
            proxy_tls: None,
        }
    }
}

fn default_proxy() -> String {
    "0.0.0.0:8080".into()
}
fn default_admin() -> String {
    "127.0.0.1:9090".into()
}
fn default_metrics() -> String {
    "127.0.0.1:9091".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreFile {
    #[serde(default = "default_store_path")]
    pub path: String,
    #[serde(default)]
    pub redis: Option<RedisFile>,
}

impl Default for StoreFile {
    fn default() -> Self {
        Self {
            path: default_store_path(),
            redis: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisFile {
    pub url: String,
    #[serde(default)]
    pub password_env: Option<String>,
    #[serde(default)]
    pub on_error: Option<String>,
    #[serde(default)]
    pub cluster: bool,
    #[serde(default)]
    pub claim_after: Option<String>,
}

fn default_store_path() -> String {
    "data/tollgate.db".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminFile {
    #[serde(default = "default_root_key_env")]
    pub root_key_env: String,
}

impl Default for AdminFile {
    fn default() -> Self {
        Self {
            root_key_env: default_root_key_env(),
        }
    }
}

fn default_root_key_env() -> String {
    "TOLLGATE_ROOT_KEY".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamFile {
    pub url: String,
    pub host: Option<String>,
    pub connect_timeout: Option<String>,
    pub read_timeout: Option<String>,
}

/// `credits: 100` or `credits: unlimited`.
#[derive(Debug, Deserialize)]
#[serde(untagged, expecting = "a whole number of credits, or unlimited")]
pub enum CreditsFile {
    Amount(i64),
    Word(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefillFile {
    pub interval: String,
    pub amount: i64,
    pub day: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitFile {
    pub limit: i64,
    pub window: String,
    #[serde(default)]
    pub shadow: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolFile {
    pub limit: i64,
    pub window: Option<String>,
    pub refill: Option<String>,
    pub day: Option<i64>,
    #[serde(default)]
    pub shadow: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierFile {
    pub name: Option<String>,
    pub key_prefix: Option<String>,
    pub credits: Option<CreditsFile>,
    pub refill: Option<RefillFile>,
    #[serde(default)]
    pub rate_limits: Map<RateLimitFile>,
    #[serde(default)]
    pub pools: Map<PoolFile>,
    #[serde(default)]
    pub features: Vec<String>,
    pub overage: Option<String>,
    pub upgrade_url: Option<String>,
}

/// A charge: a fixed integer, or `{ header: name }` read from the request.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "a whole number, or { header: <request header name> }"
)]
pub enum AmountFile {
    Fixed(i64),
    Header(HeaderAmountFile),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderAmountFile {
    pub header: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub name: String,
    pub methods: Option<Vec<String>>,
    pub path: String,
    pub upstream: String,
    pub feature: Option<String>,
    pub cost: Option<AmountFile>,
    #[serde(default)]
    pub pools: Map<AmountFile>,
    #[serde(default)]
    pub meter: Map<String>,
    #[serde(default)]
    pub refund_on_5xx: bool,
    pub auth: Option<String>,
    #[serde(default)]
    pub forward_key: bool,
    #[serde(default)]
    pub allow_encoded_slashes: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportingFile {
    pub webhook: Option<WebhookFile>,
    pub stripe: Option<StripeFile>,
    #[serde(default)]
    pub thresholds: Vec<f64>,
    pub flush_interval: Option<String>,
    #[serde(default)]
    pub usage_events: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookFile {
    pub url: String,
    pub secret_env: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StripeFile {
    pub api_key_env: String,
    pub base_url: Option<String>,
    pub event_name: Option<String>,
    #[serde(default)]
    pub meters: indexmap::IndexMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsageFile {
    #[serde(default = "default_usage_path")]
    pub path: String,
}

impl Default for UsageFile {
    fn default() -> Self {
        Self {
            path: default_usage_path(),
        }
    }
}

fn default_usage_path() -> String {
    "/_tollgate/usage".into()
}
