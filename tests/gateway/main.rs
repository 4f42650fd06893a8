//! Integration tests: the real gateway, a real upstream, a real embedded
//! store. One test binary (one link of Pingora), a module per area;
//! `tests/gateway_on_redis` runs the same suite on Redis.

/// Whether every gateway of this binary runs on the shared store.
const ON_REDIS: bool = false;

include!("suite.rs");
