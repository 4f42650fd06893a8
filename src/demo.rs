//! `tollgate demo`: the example config, a temporary store, the built-in echo
//! upstream, one key per plan, and ready-to-paste `curl` lines. Nothing to
//! set up; Ctrl-C ends it and removes the store.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use base64::Engine as _;
use rand::Rng;

use crate::admin::{issue_key, CreateKey};
use crate::clock::SystemClock;
use crate::config::Config;
use crate::server::{self, Options};

/// The example config, built in so the demo runs from any directory.
pub const EXAMPLE_CONFIG: &str = include_str!("../config/tollgate.yaml");

/// `addr` if it can be bound now, else the same IP with any free port.
fn free_or_any(addr: SocketAddr) -> SocketAddr {
    match TcpListener::bind(addr) {
        Ok(_) => addr,
        Err(_) => SocketAddr::new(addr.ip(), 0),
    }
}

/// Runs the demo until SIGINT or SIGTERM. `config` replaces the built-in
/// example.
pub fn run(config: Option<&Path>) -> anyhow::Result<()> {
    // The example's webhook signs with this; a demo makes one up.
    if std::env::var_os(DEMO_SECRET_ENV).is_none() {
        let bytes: [u8; 24] = rand::rng().random();
        let secret = base64::engine::general_purpose::STANDARD.encode(bytes);
        std::env::set_var(DEMO_SECRET_ENV, format!("whsec_{secret}"));
    }
    let loaded = match config {
        Some(path) => Config::load(path),
        None => Config::parse(EXAMPLE_CONFIG),
    }
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut config = loaded.config;

    let runtime = tokio::runtime::Runtime::new()?;
    let echo = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let echo_addr = echo.local_addr()?;
    runtime.spawn(crate::echo::serve(echo));

    // Billing events go to a receiver of the demo's own, which prints them.
    if let Some(hook) = config.reporting.as_mut().and_then(|r| r.webhook.as_mut()) {
        let receiver = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        hook.url = format!("http://{}/billing", receiver.local_addr()?);
        let app = axum::Router::new().route("/billing", axum::routing::post(print_events));
        runtime.spawn(async move { axum::serve(receiver, app).await });
    }

    let store = tempfile::tempdir().context("cannot create a temporary store")?;
    config.store_path = store.path().join("tollgate.db");
    for upstream in config.upstreams.values_mut() {
        upstream.tls = false;
        upstream.host = echo_addr.ip().to_string();
        upstream.port = echo_addr.port();
        upstream.host_header = None;
    }
    config.listen.proxy = free_or_any(config.listen.proxy);
    config.listen.admin = free_or_any(config.listen.admin);
    let tiers: Vec<(String, String)> = config
        .tiers
        .values()
        .map(|t| (t.id.clone(), t.name.clone()))
        .collect();

    let root_key: String = {
        let mut rng = rand::rng();
        (0..24)
            .map(|_| char::from(b"abcdefghijkmnopqrstuvwxyz23456789"[rng.random_range(0..33)]))
            .collect()
    };
    let running = server::start(
        config,
        Options {
            clock: Arc::new(SystemClock::new()),
            root_key: Some(format!("demo_{root_key}")),
            threads: 2,
            config_path: None,
            handle_signals: true,
            drain_timeout: std::time::Duration::from_secs(5),
            work_stealing: false,
            upgrade: false,
        },
    )?;

    let mut keys = Vec::new();
    for (tier, name) in &tiers {
        let created = runtime
            .block_on(issue_key(
                &running.gateway,
                CreateKey {
                    tier: tier.clone(),
                    external_id: Some(format!("demo-{tier}")),
                    name: Some(format!("demo {name} key")),
                    ..CreateKey::default()
                },
            ))
            .map_err(|e| anyhow::anyhow!("cannot create the demo key for {tier}: {e}"))?;
        let field = |name: &str| created[name].as_str().unwrap_or_default().to_string();
        keys.push((tier.clone(), field("key"), field("key_id")));
    }
    print!(
        "{}",
        instructions(
            running.proxy_addr,
            running.admin_addr,
            echo_addr,
            &keys,
            &format!("demo_{root_key}")
        )
    );
    running.wait();
    drop(store);
    Ok(())
}

/// The env var the example config names for the webhook secret.
const DEMO_SECRET_ENV: &str = "TOLLGATE_WEBHOOK_SECRET";

/// The demo's webhook receiver: one line per billing event.
async fn print_events(body: axum::body::Bytes) -> axum::http::StatusCode {
    let events = serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default();
    for e in events["events"].as_array().into_iter().flatten() {
        let detail = match e["type"].as_str() {
            Some("usage.threshold") => format!(
                "{}% of its credits used",
                e["threshold"].as_f64().unwrap_or(0.0) * 100.0
            ),
            Some("usage.exceeded") => "no credits left".to_string(),
            _ => format!("units {}", e["units"]),
        };
        // A closed stdout (the demo piped into `head`) is no reason to fail.
        let _ = writeln!(
            std::io::stdout(),
            "billing event  {:<16} key {}  ({})  {detail}",
            e["type"].as_str().unwrap_or("?"),
            e["key_id"].as_str().unwrap_or("?"),
            e["tier"].as_str().unwrap_or("?"),
        );
    }
    axum::http::StatusCode::NO_CONTENT
}

/// What the demo prints. Each example is a `# <status> <what>` line and
/// then one command; the demo's test runs them.
fn instructions(
    proxy: SocketAddr,
    admin: SocketAddr,
    echo: SocketAddr,
    keys: &[(String, String, String)],
    root_key: &str,
) -> String {
    let key = |tier: &str| {
        keys.iter()
            .find(|(t, _, _)| t == tier)
            .map_or(("<no such plan>", "<no such plan>"), |(_, k, id)| {
                (k.as_str(), id.as_str())
            })
    };
    let (free, free_id) = key("free");
    let (pro, _) = key("pro");
    let p = format!("http://{proxy}");
    let mut out = String::new();
    let _ = writeln!(out, "tollgate demo is running (Ctrl-C stops it).\n");
    let _ = writeln!(out, "  proxy     {p}");
    let _ = writeln!(out, "  admin API http://{admin}   root key: {root_key}");
    let _ = writeln!(out, "  upstream  http://{echo} (built-in echo)\n");
    let _ = writeln!(out, "One key per plan:");
    for (tier, secret, _) in keys {
        let _ = writeln!(out, "  {tier:<12} {secret}");
    }
    let _ = writeln!(out, "\nTry these:\n");
    let examples = [
        ("200 OK: a call on the Free plan", format!("curl -i -H 'Authorization: Bearer {free}' {p}/api/data")),
        (
            "402 USAGE_EXCEEDED: a call that costs more credits than the key has",
            format!("curl -i -H 'Authorization: Bearer {free}' -H 'x-cost: 1000' {p}/api/search"),
        ),
        (
            "403 FEATURE_NOT_AVAILABLE: the Free plan has no 'ai' feature",
            format!("curl -i -H 'Authorization: Bearer {free}' -H 'x-token-count: 10' {p}/api/ai/chat"),
        ),
        (
            "429 RATE_LIMITED: the Free plan allows 10 requests a minute",
            format!(
                "for i in $(seq 12); do curl -s -o /dev/null -w '%{{http_code}}\\n' -H 'Authorization: Bearer {free}' {p}/api/data; done"
            ),
        ),
        (
            "200 OK: the Pro plan has 'ai'; tokens are charged to its pool",
            format!("curl -i -H 'Authorization: Bearer {pro}' -H 'x-token-count: 500' {p}/api/ai/chat"),
        ),
        (
            "200 OK: the usage endpoint, answered by the gateway itself",
            format!("curl -s -H 'Authorization: Bearer {free}' {p}/_tollgate/usage"),
        ),
        (
            "200 OK: a key record through the admin API",
            format!("curl -s -H 'Authorization: Bearer {root_key}' http://{admin}/v1/keys/{free_id}"),
        ),
    ];
    for (what, command) in examples {
        let _ = writeln!(out, "# {what}\n{command}\n");
    }
    let _ = writeln!(
        out,
        "Billing events (80% and 100% of credits used, credits exhausted) print here as\nthe built-in webhook receiver gets them, within 5 s.\n"
    );
    out
}
