// The gateway suite, included by two test binaries: `gateway` (the
// embedded store) and `gateway_on_redis` (every gateway on one real
// redis-server), so the behaviour both backends share is tested on both.

#[allow(dead_code)] // each binary uses its part
mod common;

mod admin_api;
mod billing;
mod cli;
mod demo;
mod forwarding;
mod http_edges;
mod keys;
mod keys_cli;
mod limits;
mod openapi;
mod operations;
mod paths;
mod rejections;
mod store;
mod streaming;
mod tls;
mod upgrade;

/// Tiers and routes most tests use.
pub const PLANS: &str = r#"
tiers:
  free:
    name: Free
    key_prefix: sk_free
    credits: 5
    refill: { interval: daily, amount: 5 }
    rate_limits:
      requests: { limit: 100, window: 60s }
    pools:
      tokens: { limit: 100, window: 1h }
      exports: { limit: 2, refill: monthly }
    features: [api]
    upgrade_url: "https://example.com/upgrade"
  metered:
    credits: 1000
    pools:
      tokens: { limit: 1000, window: 1h }
    features: [api, ai]
  tight:
    credits: 1000
    rate_limits:
      requests: { limit: 3, window: 60s }
      slow: { limit: 10, window: 1h }
    features: [api]
  payg:
    credits: 2
    overage: allow
    features: [api]
  unlimited:
    credits: unlimited
    features: [api, ai]
routes:
  - { name: data, methods: [GET], path: /api/data, upstream: main, feature: api }
  - { name: priced, path: /api/priced, upstream: main, feature: api, cost: { header: x-cost } }
  - { name: ai, path: /api/ai/*, upstream: main, feature: ai, cost: 1, pools: { tokens: { header: x-tokens } }, refund_on_5xx: true }
  - { name: complete, path: /api/complete, upstream: main, feature: api, meter: { tokens: x-usage-tokens } }
  - { name: exports, path: /api/exports, upstream: main, feature: api, cost: 0, pools: { exports: 1 } }
  - { name: raw-files, path: /files/*, upstream: main, feature: api, allow_encoded_slashes: true }
  - { name: forwarded, path: /api/forward, upstream: main, feature: api, forward_key: true }
  - { name: down, path: /api/down, upstream: dead, feature: api }
  - { name: slow, path: /api/slow, upstream: slow, feature: api }
  - { name: admin-area, path: /api/admin, upstream: main, feature: ai }
  - { name: api, path: /api/*, upstream: main, feature: api }
  - { name: health, path: /health, upstream: main, auth: none }
"#;
