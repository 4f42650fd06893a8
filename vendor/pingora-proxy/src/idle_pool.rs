// tollgate: added to the vendored crate (see vendor/README.md).

//! Idle HTTP/1 upstream connections, kept per worker thread.
//!
//! Pingora's own pool (`TransportConnector`) hands every released
//! connection to a task of its own that watches it while it is idle, behind
//! an `Arc<Mutex>` the next checkout must lock, and checks a reused
//! connection's peer address with a system call. That costs a task spawn, a
//! lock, two wake-ups and a system call per request. This pool keeps a
//! worker thread's idle connections in a plain list owned by the thread: a
//! connection is checked once, when it is taken, by a read that must find
//! nothing (a closed or chattering connection is dropped and the next one
//! tried), and one idle longer than its peer's idle timeout is dropped
//! unused. A connection closed by the upstream while idle is therefore
//! noticed when it is next taken or expires, not at once.
//!
//! Used for peers that speak only HTTP/1 (no ALPN beyond it, no custom
//! protocol); every other peer goes through Pingora's connector as before.

use futures::FutureExt;
use pingora_core::connectors::{ConnectorOptions, TransportConnector};
use pingora_core::protocols::http::v1::client::HttpSession;
use pingora_core::protocols::Stream;
use pingora_core::upstreams::peer::{Peer, ALPN};
use pingora_error::Result;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

/// How long a connection may stay idle when its peer names no idle timeout.
const DEFAULT_IDLE: Duration = Duration::from_secs(60);

struct Idle {
    stream: Stream,
    until: Instant,
}

thread_local! {
    /// The idle connections of this worker thread, by `Peer::reuse_hash`.
    static IDLE: RefCell<HashMap<u64, VecDeque<Idle>>> = RefCell::new(HashMap::new());
}

pub(crate) struct IdlePool {
    transport: TransportConnector,
    /// Idle connections kept per peer and thread, at most.
    per_peer: usize,
}

impl IdlePool {
    pub(crate) fn new(options: ConnectorOptions) -> Self {
        let per_peer = options.keepalive_pool_size.max(1);
        IdlePool {
            transport: TransportConnector::new(Some(options)),
            per_peer,
        }
    }

    /// Whether this pool serves `peer`: HTTP/1 only, no custom protocol.
    pub(crate) fn serves<P: Peer>(peer: &P) -> bool {
        peer.get_peer_options().is_none_or(|o| {
            !matches!(o.alpn, ALPN::Custom(_)) && o.alpn.get_max_http_version() == 1
        })
    }

    /// An idle connection to `peer` if one is alive, else a new one; and
    /// whether it was reused.
    pub(crate) async fn get<P: Peer + Send + Sync + 'static>(
        &self,
        peer: &P,
    ) -> Result<(HttpSession, bool)> {
        if let Some(stream) = take(peer.reuse_hash()) {
            return Ok((HttpSession::new_with_options(stream, peer), true));
        }
        let stream = self.transport.new_stream(peer).await?;
        Ok((HttpSession::new_with_options(stream, peer), false))
    }

    /// Keeps `session`'s connection for the next request to `peer`, if
    /// HTTP lets it be reused.
    pub(crate) async fn release<P: Peer>(
        &self,
        mut session: HttpSession,
        peer: &P,
        idle_timeout: Option<Duration>,
    ) {
        session.respect_keepalive();
        let Some(stream) = session.reuse().await else {
            return;
        };
        let until = Instant::now() + idle_timeout.unwrap_or(DEFAULT_IDLE);
        IDLE.with_borrow_mut(|idle| {
            let list = idle.entry(peer.reuse_hash()).or_default();
            if list.len() >= self.per_peer {
                // The longest idle goes: it is the likeliest to be closed.
                list.pop_front();
            }
            list.push_back(Idle { stream, until });
        });
    }
}

/// The most recently released connection to the peer `key` that is still
/// alive; those expired or found closed on the way are dropped.
fn take(key: u64) -> Option<Stream> {
    IDLE.with_borrow_mut(|idle| {
        let list = idle.get_mut(&key)?;
        let now = Instant::now();
        while list.front().is_some_and(|c| c.until <= now) {
            list.pop_front();
        }
        while let Some(mut c) = list.pop_back() {
            if quiet(&mut c.stream) {
                return Some(c.stream);
            }
        }
        None
    })
}

/// Whether an idle connection has nothing to read: the upstream neither
/// closed it nor sent anything unasked (either makes it unusable).
fn quiet(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    // `unconstrained`: a ready read must not be turned into a yield by
    // tokio's budget, which `now_or_never` would take for "nothing to read".
    tokio::task::unconstrained(stream.read(&mut byte))
        .now_or_never()
        .is_none()
}
