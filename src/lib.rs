//! tollgate: API keys, plans, credits, rate limits, resource pools and usage
//! billing in front of any HTTP API, as a reverse proxy on Pingora.
//!
//! # Layout
//!
//! - [`config`]: the YAML file, validated into runtime types.
//! - [`keys`]: the key format: prefix, randomness, checksum, hash.
//! - [`ledger`]: what is kept per key: the record and its usage counters.
//! - [`gate`]: the decision core. **Credits, pools and rate limits are
//!   checked and charged here**, in one pure function.
//! - [`window`]: the trailing-window counter behind rate limits and rolling pools.
//! - [`calendar`]: UTC refill boundaries (daily, monthly on a day).
//! - [`path`]: path normalisation, so the matched path is the forwarded path.
//! - [`route`]: the route table (first match wins, without a scan).
//! - [`reject`]: every rejection and its status, code, body and headers.
//! - [`clock`]: injectable time.
//! - [`metrics`]: the Prometheus registry and every metric.
//! - [`store`]: keys and usage in memory, written behind to SQLite by one
//!   writer thread; health on a full disk; migration from sled.
//! - [`gateway`]: the state every listener shares (the live config generation); key lookup.
//! - [`upstream`]: upstream peers, resolved at load and in the background.
//! - [`tls`]: the proxy's HTTPS listener's certificate, reloaded when its files change.
//! - [`proxy`]: the Pingora `ProxyHttp` glue around the gate.
//! - [`admin`]: the admin API (axum); [`client`]: `tollgate keys`, its CLI client.
//! - [`views`]: the key record and usage JSON.
//! - [`server`]: assembling and running it all; shutdown.
//! - [`reload`]: live config: SIGHUP and the file watcher.
//! - [`log`]: logging, through a buffer written out in the background.
//! - [`report`]: billing events and their delivery (the outbox's reader).
//! - [`upgrade`]: zero-downtime binary upgrade with the store handed over.
//! - [`demo`], [`echo`]: the quick start and its built-in upstream.
pub mod admin;
pub mod alloc;
pub mod calendar;
pub mod client;
pub mod clock;
pub mod config;
pub mod demo;
pub mod echo;
pub mod gate;
pub mod gateway;
pub mod keys;
pub mod ledger;
pub mod log;
pub mod metrics;
pub mod path;
pub mod proxy;
pub mod reject;
pub mod reload;
pub mod report;
pub mod route;
pub mod server;
pub mod store;
pub mod tls;
pub mod upgrade;
pub mod upstream;
pub mod views;
pub mod window;

/// The unit tests run on the allocator the binary ships with (see
/// [`alloc`]), so that a test can ask which heap a block came from.
#[cfg(test)]
#[global_allocator]
static ALLOCATOR: alloc::Allocator = alloc::Allocator;
