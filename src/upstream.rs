//! Where the upstreams are: each upstream's Pingora peer, built once per
//! config generation with its address resolved when the config is loaded,
//! and resolved again in the background ([`Resolver`]), never on a request.
//!
//! A host name that does not resolve leaves its upstream without a peer:
//! its requests get 502 (and their charge back) until a background lookup
//! succeeds, which is retried every [`RETRY`]. A later failed lookup keeps
//! the address the last one found.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
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

/// One peer per upstream, in the config's upstream order.
pub struct Peers {
    peers: Vec<ArcSwapOption<HttpPeer>>,
}

impl Peers {
    /// Resolves every upstream of `config` now. Blocking: for start-up and
    /// reloads, which run off the request path.
    pub fn resolve(config: &Config) -> Peers {
        let peers = config
            .upstreams
            .values()
            .map(|u| ArcSwapOption::new(lookup(u).map(|addr| Arc::new(peer(u, addr)))))
            .collect();
        Peers { peers }
    }

    /// The peer of the upstream at `index` in the config, if its address is
    /// known.
    pub fn get(&self, index: usize) -> Option<Arc<HttpPeer>> {
        self.peers.get(index)?.load_full()
    }

    /// Whether some upstream has no address yet.
    pub fn incomplete(&self) -> bool {
        self.peers.iter().any(|p| p.load().is_none())
    }

    /// Looks up the host names of `config` again (blocking). A lookup that
    /// fails keeps the address already known.
    pub fn refresh(&self, config: &Config) {
        for (slot, upstream) in self.peers.iter().zip(config.upstreams.values()) {
            if upstream.host.parse::<std::net::IpAddr>().is_ok() && slot.load().is_some() {
                continue;
            }
            if let Some(addr) = lookup(upstream) {
                let changed = slot
                    .load()
                    .as_ref()
                    .is_none_or(|p| p._address != addr.into());
                if changed {
                    tracing::info!(upstream = %upstream.name, %addr, "upstream address resolved");
                    slot.store(Some(Arc::new(peer(upstream, addr))));
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
fn peer(upstream: &Upstream, addr: SocketAddr) -> HttpPeer {
    let mut peer = HttpPeer::new(addr, upstream.tls, upstream.host.clone());
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
