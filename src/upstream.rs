//! Where the upstreams are: each upstream's address, resolved when its
//! config generation is built and again in the background ([`Resolver`]),
//! never on a request. A request's Pingora peer is built from it: a peer
//! on Pingora's defaults and three timeouts costs ~300 instructions less
//! than cloning a kept one and loading it from an `ArcSwap`.
//!
//! A host name that does not resolve leaves its upstream without a peer:
//! its requests get 502 (and their charge back) until a background lookup
//! succeeds, which is retried every [`RETRY`]. A later failed lookup keeps
//! the address the last one found.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::RwLock;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use pingora::upstreams::peer::HttpPeer;

use crate::config::{Config, Upstream};
use crate::gateway::Gateway;

/// How long a resolved address is used before it is looked up again (the
/// system resolver does not say how long a record lives).
pub const TTL: Duration = Duration::from_secs(30);
/// How soon a host name that did not resolve is tried again.
pub const RETRY: Duration = Duration::from_secs(2);

/// One address per upstream, in the config's upstream order.
pub struct Peers {
    addrs: Vec<RwLock<Option<SocketAddr>>>,
}

impl Peers {
    /// Resolves every upstream of `config` now. Blocking: for start-up and
    /// reloads, which run off the request path.
    pub fn resolve(config: &Config) -> Peers {
        let addrs = config
            .upstreams
            .values()
            .map(|u| RwLock::new(lookup(u)))
            .collect();
        Peers { addrs }
    }

    /// The peer of the upstream at `index` in `config` (the config these
    /// addresses were resolved for), if its address is known.
    pub fn get(&self, config: &Config, index: usize) -> Option<HttpPeer> {
        let addr = (*self.addrs.get(index)?.read())?;
        let (_, upstream) = config.upstreams.get_index(index)?;
        Some(peer(upstream, addr))
    }

    /// Whether some upstream has no address yet.
    pub fn incomplete(&self) -> bool {
        self.addrs.iter().any(|a| a.read().is_none())
    }

    /// Looks up the host names of `config` again (blocking). A lookup that
    /// fails keeps the address already known.
    pub fn refresh(&self, config: &Config) {
        for (slot, upstream) in self.addrs.iter().zip(config.upstreams.values()) {
            if upstream.host.parse::<std::net::IpAddr>().is_ok() && slot.read().is_some() {
                continue;
            }
            if let Some(addr) = lookup(upstream) {
                if *slot.read() != Some(addr) {
                    tracing::info!(upstream = %upstream.name, %addr, "upstream address resolved");
                    *slot.write() = Some(addr);
                }
            }
        }
    }
}

/// The first address of an upstream's host, or `None` (logged).
fn lookup(upstream: &Upstream) -> Option<SocketAddr> {
    if let Ok(ip) = upstream.host.parse::<std::net::IpAddr>() {
        return Some(SocketAddr::new(ip, upstream.port));
    }
    match (upstream.host.as_str(), upstream.port).to_socket_addrs() {
        Ok(mut addrs) => addrs.next().or_else(|| {
            tracing::warn!(upstream = %upstream.name, host = %upstream.host, "upstream host has no address");
            None
        }),
        Err(e) => {
            tracing::warn!(upstream = %upstream.name, host = %upstream.host, error = %e, "upstream host did not resolve");
            None
        }
    }
}

/// An upstream peer speaks HTTP/1.x (Pingora's default ALPN, over TLS too):
/// `proxy.rs` writes a forwarded request's identity fields for that wire.
/// The host name is the peer's SNI over TLS; plain HTTP has no use for it
/// (the request carries its `Host`), so it is not copied there.
fn peer(upstream: &Upstream, addr: SocketAddr) -> HttpPeer {
    let sni = if upstream.tls {
        upstream.host.clone()
    } else {
        String::new()
    };
    let mut peer = HttpPeer::new(addr, upstream.tls, sni);
    peer.options.connection_timeout = Some(upstream.connect_timeout);
    peer.options.total_connection_timeout = Some(upstream.connect_timeout);
    peer.options.read_timeout = Some(upstream.read_timeout);
    peer
}

/// Looks the upstreams' host names up again every [`TTL`], or every
/// [`RETRY`] while one has no address.
pub struct Resolver {
    pub gateway: Arc<Gateway>,
}

#[async_trait]
impl BackgroundService for Resolver {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            let wait = if self.gateway.config().peers.incomplete() {
                RETRY
            } else {
                TTL
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            let generation = self.gateway.config();
            let refreshed =
                tokio::task::spawn_blocking(move || generation.peers.refresh(&generation)).await;
            if let Err(e) = refreshed {
                tracing::warn!(error = %e, "upstream lookup task failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::upstreams::peer::Peer;

    fn config() -> Config {
        Config::parse(
            r#"
upstreams:
  plain: { url: "http://127.0.0.1:4001", connect_timeout: 3s, read_timeout: 7s }
  secure: { url: "https://127.0.0.2:4002" }
  nowhere: { url: "http://tollgate-test.invalid:4003" }
tiers:
  free: { credits: 1 }
routes:
  - { name: a, path: /a, upstream: plain, auth: none }
  - { name: b, path: /b, upstream: secure, auth: none }
  - { name: c, path: /c, upstream: nowhere, auth: none }
"#,
        )
        .expect("config")
        .config
    }

    #[test]
    fn a_request_peer_carries_its_upstreams_address_scheme_and_timeouts() {
        let config = config();
        let peers = Peers::resolve(&config);
        let plain = peers.get(&config, 0).expect("an address");
        assert_eq!(
            plain.address().to_string(),
            "127.0.0.1:4001",
            "the resolved address"
        );
        assert!(!plain.is_tls());
        assert_eq!(plain.sni(), "", "no SNI over plain HTTP");
        assert_eq!(
            plain.options.connection_timeout,
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            plain.options.total_connection_timeout,
            Some(Duration::from_secs(3))
        );
        assert_eq!(plain.options.read_timeout, Some(Duration::from_secs(7)));
        let secure = peers.get(&config, 1).expect("an address");
        assert!(secure.is_tls());
        assert_eq!(secure.sni(), "127.0.0.2", "the host is the SNI over TLS");
        // Built per request, the same every time: one connection pool.
        assert_eq!(
            plain.reuse_hash(),
            peers.get(&config, 0).expect("again").reuse_hash()
        );
    }

    #[test]
    fn a_host_that_does_not_resolve_has_no_peer_and_keeps_the_resolver_retrying() {
        let config = config();
        let peers = Peers::resolve(&config);
        assert!(peers.get(&config, 2).is_none());
        assert!(peers.get(&config, 3).is_none(), "no such upstream");
        assert!(peers.incomplete());
        // A refresh that fails again keeps what is known.
        peers.refresh(&config);
        assert!(peers.get(&config, 2).is_none());
        assert!(peers.get(&config, 0).is_some());
    }
}
