//! The gateway suite again with every gateway on one real `redis-server`
//! (a database each), plus the tests of several gateways sharing one
//! Redis (SPEC §8): `shared`.

/// Whether every gateway of this binary runs on the shared store.
const ON_REDIS: bool = true;

include!("../gateway/suite.rs");

#[path = "../gateway/shared.rs"]
mod shared;
