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
//! noticed when it is next taken or expires, not at once; every
//! [`SWEEP_EVERY`] a release also drops the expired connections of every
//! peer, those no longer asked for included.
//!
//! Used for peers that speak only HTTP/1 (no ALPN beyond it, no custom
//! protocol); every other peer goes through Pingora's connector as before.
//! The pool's connections time their reads themselves (read_deadline.rs):
//! the HTTP/1 session over one is given no read timeout of its own
//! ([`read_timeout`]).

use crate::read_deadline::TimedStream;
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

/// How often a thread looks through all its lists for expired connections,
/// so that those to peers no longer asked for (an upstream whose address
/// changed) are closed too.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

struct Idle {
    stream: Box<TimedStream>,
    until: Instant,
}

/// A worker thread's idle connections.
struct Lists {
    /// By `Peer::reuse_hash`, the longest idle first.
    by_peer: HashMap<u64, VecDeque<Idle>>,
    /// When every list was last rid of its expired connections.
    swept: Instant,
}

impl Lists {
    fn sweep(&mut self, now: Instant) {
        self.swept = now;
        self.by_peer.retain(|_, list| {
            drop_expired(list, now);
            !list.is_empty()
        });
    }
}

thread_local! {
    static IDLE: RefCell<Lists> = RefCell::new(Lists {
        by_peer: HashMap::new(),
        swept: Instant::now(),
    });
}

fn drop_expired(list: &mut VecDeque<Idle>, now: Instant) {
    while list.front().is_some_and(|c| c.until <= now) {
        list.pop_front();
    }
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
        let (mut stream, taken_at) = match take(peer.reuse_hash()) {
            Some((stream, now)) => (stream, Some(now)),
            // Boxed: connecting is rare on a kept-alive path, and its
            // future (over 8 KiB) would otherwise be part of every request's.
            None => (
                TimedStream::new(Box::pin(self.transport.new_stream(peer)).await?),
                None,
            ),
        };
        stream.start(
            peer.get_peer_options().and_then(|o| o.read_timeout),
            taken_at,
        );
        let reused = taken_at.is_some();
        Ok((HttpSession::new_with_options(stream, peer), reused))
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
        // Every stream of the pool's sessions is one (`get`).
        let Ok(stream) = stream.into_any().downcast::<TimedStream>() else {
            return;
        };
        let now = Instant::now();
        let until = now + idle_timeout.unwrap_or(DEFAULT_IDLE);
        IDLE.with_borrow_mut(|idle| {
            if now.duration_since(idle.swept) >= SWEEP_EVERY {
                idle.sweep(now);
            }
            let list = idle.by_peer.entry(peer.reuse_hash()).or_default();
            if list.len() >= self.per_peer {
                // The longest idle goes: it is the likeliest to be closed.
                list.pop_front();
            }
            list.push_back(Idle { stream, until });
        });
    }
}

/// The most recently released connection to the peer `key` that is still
/// alive, and the time it was taken; those expired or found closed on the
/// way are dropped.
fn take(key: u64) -> Option<(Box<TimedStream>, Instant)> {
    IDLE.with_borrow_mut(|idle| {
        let list = idle.by_peer.get_mut(&key)?;
        let now = Instant::now();
        drop_expired(list, now);
        while let Some(mut c) = list.pop_back() {
            if quiet(c.stream.inner_mut()) {
                return Some((c.stream, now));
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

/// The read timeout Pingora's HTTP/1 session over a connection to `peer`
/// is given: none when the connection comes from this pool, whose
/// connections time their own reads; the peer's otherwise.
pub(crate) fn read_timeout<P: Peer>(peer: &P) -> Option<Duration> {
    if IdlePool::serves(peer) {
        None
    } else {
        peer.get_peer_options().and_then(|o| o.read_timeout)
    }
}
