//! `tollgate keys ...` and `tollgate outbox ...`: a command-line client of
//! a running gateway's admin API. Prints the API's JSON answers; any failure is one line on stderr and
//! a non-zero exit.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::{json, Map, Value};

use crate::config::Config;

/// The config `tollgate keys` reads when none is given, if it exists.
const DEFAULT_CONFIG: &str = "config/tollgate.yaml";

/// Where the admin API is: shared by `tollgate keys` and `tollgate outbox`.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The admin API, e.g. http://127.0.0.1:9090 [default: the config's
    /// listen.admin]
    #[arg(long, global = true)]
    admin_url: Option<String>,
    /// Where to read the admin address and the root key's env var name
    /// [default: config/tollgate.yaml if it exists, else the admin API at
    /// http://127.0.0.1:9090 and the key in TOLLGATE_ROOT_KEY]. A file given
    /// here must exist.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct KeysCommand {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    action: KeysAction,
}

#[derive(Debug, Args)]
pub struct OutboxCommand {
    #[command(flatten)]
    admin: AdminArgs,
    #[command(subcommand)]
    action: Option<OutboxAction>,
}

#[derive(Debug, Subcommand)]
enum OutboxAction {
    /// Per sink: events pending, the oldest one's age, parked events and why
    /// (the default).
    Show,
    /// Put parked events back in the queue: these ids, or --all.
    Retry {
        ids: Vec<String>,
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
}

#[derive(Debug, Subcommand)]
enum KeysAction {
    /// Create a key; the answer holds the secret, shown only this once.
    Create {
        #[arg(long)]
        tier: String,
        #[arg(long)]
        external_id: Option<String>,
        #[arg(long)]
        name: Option<String>,
        /// A JSON object.
        #[arg(long)]
        meta: Option<String>,
        /// Initial credits, instead of the tier's.
        #[arg(long)]
        credits: Option<u64>,
        /// Day of the month a monthly refill happens for this key.
        #[arg(long)]
        refill_day: Option<u8>,
        /// RFC 3339 time, e.g. 2027-01-01T00:00:00Z.
        #[arg(long)]
        expires_at: Option<String>,
        /// Create it disabled.
        #[arg(long)]
        disabled: bool,
    },
    /// Show a key's record.
    Get { key_id: String },
    /// List keys, a customer's with --external-id.
    List {
        #[arg(long)]
        external_id: Option<String>,
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        cursor: Option<String>,
        /// Follow the cursor to the end.
        #[arg(long)]
        all: bool,
    },
    /// Change a key's plan, name, meta, state or expiry.
    Update {
        key_id: String,
        #[arg(long)]
        tier: Option<String>,
        #[arg(long, value_enum)]
        credit_policy: Option<CreditPolicyArg>,
        #[arg(long)]
        name: Option<String>,
        /// A JSON object; replaces the old one.
        #[arg(long)]
        meta: Option<String>,
        #[arg(long)]
        enabled: Option<bool>,
        /// RFC 3339 time, or "never".
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// Add to or set a key's remaining credits.
    Credits {
        key_id: String,
        #[arg(value_enum)]
        op: CreditOpArg,
        amount: u64,
    },
    /// Revoke a key: it stops working at once.
    Revoke { key_id: String },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CreditPolicyArg {
    Prorate,
    Reset,
    Keep,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum CreditOpArg {
    Add,
    Set,
}

/// A one-line failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ClientError(String);

fn json_object(field: &str, text: &str) -> Result<Value, ClientError> {
    match serde_json::from_str::<Value>(text) {
        Ok(v @ Value::Object(_)) => Ok(v),
        _ => Err(ClientError(format!("--{field} must be a JSON object"))),
    }
}

struct Admin {
    base: String,
    root_key: String,
    http: reqwest::Client,
}

impl Admin {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url).bearer_auth(&self.root_key);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().await.map_err(|e| {
            let cause = std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string());
            ClientError(format!(
                "cannot reach the admin API at {}: {cause}",
                self.base
            ))
        })?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| ClientError(format!("the admin API's answer was cut off: {e}")))?;
        let body: Value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).map_err(|_| {
                ClientError(format!(
                    "the admin API answered {status} with non-JSON: {text}"
                ))
            })?
        };
        if status.is_success() {
            Ok(body)
        } else {
            let code = body["code"].as_str().unwrap_or("ERROR");
            let message = body["message"].as_str().unwrap_or("");
            Err(ClientError(format!(
                "{} {code}: {message}",
                status.as_u16()
            )))
        }
    }
}

/// Where the admin API is and what its root key is.
fn connect(cmd: &AdminArgs) -> Result<Admin, ClientError> {
    let path = match &cmd.config {
        Some(path) if !path.exists() => {
            return Err(ClientError(format!(
                "{}: no such file (pass the gateway's config, or --admin-url)",
                path.display()
            )))
        }
        Some(path) => Some(path.clone()),
        None => Some(PathBuf::from(DEFAULT_CONFIG)).filter(|p| p.exists()),
    };
    let config = match path {
        Some(path) => Some(Config::load_for_client(&path).map_err(|e| {
            ClientError(format!(
                "{}: {}",
                path.display(),
                e.to_string().replace('\n', " ")
            ))
        })?),
        None => None,
    };
    let config = config.map(|loaded| loaded.config);
    let base = match (&cmd.admin_url, &config) {
        (Some(url), _) => url.trim_end_matches('/').to_string(),
        (None, Some(c)) => {
            let mut addr = c.listen.admin;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{addr}")
        }
        (None, None) => "http://127.0.0.1:9090".to_string(),
    };
    let env = config
        .as_ref()
        .map_or("TOLLGATE_ROOT_KEY", |c| c.root_key_env.as_str());
    let root_key = std::env::var(env)
        .ok()
        .filter(|k| !k.is_empty())
        .ok_or_else(|| ClientError(format!("set {env} to the gateway's root key")))?;
    Ok(Admin {
        base,
        root_key,
        http: reqwest::Client::new(),
    })
}

/// Runs one `keys` command; returns the JSON to print.
pub async fn run(cmd: KeysCommand) -> Result<Value, ClientError> {
    use reqwest::Method;
    let admin = connect(&cmd.admin)?;
    match cmd.action {
        KeysAction::Create {
            tier,
            external_id,
            name,
            meta,
            credits,
            refill_day,
            expires_at,
            disabled,
        } => {
            let mut body = Map::new();
            body.insert("tier".into(), json!(tier));
            let optional = [
                ("external_id", external_id.map(Value::from)),
                ("name", name.map(Value::from)),
                ("meta", meta.map(|m| json_object("meta", &m)).transpose()?),
                ("credits", credits.map(Value::from)),
                ("refill_day", refill_day.map(Value::from)),
                ("expires_at", expires_at.map(Value::from)),
                ("enabled", disabled.then_some(Value::Bool(false))),
            ];
            body.extend(
                optional
                    .into_iter()
                    .filter_map(|(k, v)| Some((k.to_string(), v?))),
            );
            admin
                .call(Method::POST, "/v1/keys", Some(Value::Object(body)))
                .await
        }
        KeysAction::Get { key_id } => {
            admin
                .call(Method::GET, &format!("/v1/keys/{key_id}"), None)
                .await
        }
        KeysAction::List {
            external_id,
            limit,
            cursor,
            all,
        } => {
            let mut keys = Vec::new();
            let mut cursor = cursor;
            loop {
                let mut query = Vec::new();
                if let Some(ext) = &external_id {
                    query.push(("external_id", ext.clone()));
                }
                if let Some(limit) = limit {
                    query.push(("limit", limit.to_string()));
                }
                if let Some(c) = &cursor {
                    query.push(("cursor", c.clone()));
                }
                let query = query_string(&query);
                let page = admin
                    .call(Method::GET, &format!("/v1/keys{query}"), None)
                    .await?;
                cursor = page["cursor"].as_str().map(str::to_string);
                if !all {
                    return Ok(page);
                }
                keys.extend(page["keys"].as_array().cloned().unwrap_or_default());
                if cursor.is_none() {
                    return Ok(json!({ "keys": keys, "cursor": null }));
                }
            }
        }
        KeysAction::Update {
            key_id,
            tier,
            credit_policy,
            name,
            meta,
            enabled,
            expires_at,
        } => {
            let mut body = Map::new();
            if let Some(t) = tier {
                body.insert("tier".into(), json!(t));
            }
            if let Some(p) = credit_policy {
                let p = match p {
                    CreditPolicyArg::Prorate => "prorate",
                    CreditPolicyArg::Reset => "reset",
                    CreditPolicyArg::Keep => "keep",
                };
                body.insert("credit_policy".into(), json!(p));
            }
            if let Some(n) = name {
                body.insert("name".into(), json!(n));
            }
            if let Some(m) = meta {
                body.insert("meta".into(), json_object("meta", &m)?);
            }
            if let Some(e) = enabled {
                body.insert("enabled".into(), json!(e));
            }
            if let Some(at) = expires_at {
                let at = if at == "never" {
                    Value::Null
                } else {
                    json!(at)
                };
                body.insert("expires_at".into(), at);
            }
            admin
                .call(
                    Method::PATCH,
                    &format!("/v1/keys/{key_id}"),
                    Some(Value::Object(body)),
                )
                .await
        }
        KeysAction::Credits { key_id, op, amount } => {
            let op = match op {
                CreditOpArg::Add => "add",
                CreditOpArg::Set => "set",
            };
            admin
                .call(
                    Method::POST,
                    &format!("/v1/keys/{key_id}/credits"),
                    Some(json!({ "op": op, "amount": amount })),
                )
                .await
        }
        KeysAction::Revoke { key_id } => {
            admin
                .call(Method::DELETE, &format!("/v1/keys/{key_id}"), None)
                .await?;
            Ok(json!({ "key_id": key_id, "revoked": true }))
        }
    }
}

/// Runs one `outbox` command; returns the JSON to print.
pub async fn run_outbox(cmd: OutboxCommand) -> Result<Value, ClientError> {
    use reqwest::Method;
    let admin = connect(&cmd.admin)?;
    match cmd.action.unwrap_or(OutboxAction::Show) {
        OutboxAction::Show => admin.call(Method::GET, "/v1/outbox", None).await,
        OutboxAction::Retry { ids, all } => {
            let body = if all {
                json!({ "all": true })
            } else if ids.is_empty() {
                return Err(ClientError(
                    "name the parked event ids to retry, or --all".into(),
                ));
            } else {
                json!({ "ids": ids })
            };
            admin
                .call(Method::POST, "/v1/outbox/retry", Some(body))
                .await
        }
    }
}

/// `?a=1&b=2`, percent-encoded; empty when there is nothing.
fn query_string(pairs: &[(&str, String)]) -> String {
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    if pairs.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", utf8_percent_encode(v, NON_ALPHANUMERIC)))
        .collect();
    format!("?{}", parts.join("&"))
}
