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
//! - [`reject`]: every rejection and its status, code, body and headers.
//! - [`clock`]: injectable time.
pub mod admin;
pub mod calendar;
pub mod clock;
pub mod config;
pub mod gate;
pub mod gateway;
pub mod keys;
pub mod ledger;
pub mod path;
pub mod proxy;
pub mod reject;
pub mod server;
pub mod store;
pub mod views;
pub mod window;
