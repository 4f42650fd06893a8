//! The state every listener shares: the live config generation, the store
//! and the clock; and the key lookup both the proxy and the admin API use.

use std::sync::Arc;

use arc_swap::ArcSwap;
use http::HeaderMap;

use crate::clock::SharedClock;
use crate::config::Config;
use crate::keys::{self, KeyHash};
use crate::metrics::{Handles, Metrics};
use crate::reject::Rejection;
use crate::store::{Key, Store, StoreError};
use crate::upstream::Peers;

/// One generation of the configuration, with what serving it needs that
/// the file does not say: the upstreams' resolved addresses and the metric
/// series its routes and tiers count in. Derefs to the [`Config`].
pub struct Generation {
    pub config: Config,
    pub peers: Peers,
    pub handles: Handles,
}

impl Generation {
    /// Resolves the upstreams (blocking) and the metric handles of `config`.
    pub fn new(config: Config, metrics: &Metrics) -> Generation {
        Generation {
            peers: Peers::resolve(&config),
            handles: Handles::new(metrics, &config),
            config,
        }
    }
}

impl std::ops::Deref for Generation {
    type Target = Config;

    fn deref(&self) -> &Config {
        &self.config
    }
}

pub struct Gateway {
    /// Swapped whole on reload; a request keeps the snapshot it started with.
    pub config: ArcSwap<Generation>,
    pub store: Arc<Store>,
    pub clock: SharedClock,
    /// The admin API's bearer secret; `None` refuses every admin call.
    pub root_key: Option<String>,
    pub metrics: Metrics,
    /// One reload at a time (file watcher and SIGHUP may coincide); holds
    /// the SHA-256 of the bytes the last reload read, so the watcher can
    /// skip a file that did not change.
    pub last_reload: parking_lot::Mutex<Option<[u8; 32]>>,
    /// Proxied requests under way, for the drain at shutdown.
    pub in_flight: InFlight,
    /// Proxy connections being served: one accepted just before the stop
    /// may not have a request under way yet, and is served after it.
    pub connections: InFlight,
}

/// A count of things under way (requests, connections) that can be waited
/// on to reach zero.
#[derive(Default)]
pub struct InFlight {
    count: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

impl InFlight {
    pub fn get(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Resolves the next time the count drops to zero.
    pub async fn idle(&self) {
        self.idle.notified().await;
    }

    /// One more under way.
    pub fn enter(&self) {
        self.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// One fewer under way; wakes [`InFlight::idle`] at zero.
    pub fn leave(&self) {
        if self.count.fetch_sub(1, std::sync::atomic::Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }
}

/// Counts one request in flight while it lives.
pub struct InFlightGuard(Arc<Gateway>);

impl InFlightGuard {
    pub fn enter(gateway: Arc<Gateway>) -> Self {
        gateway.in_flight.enter();
        Self(gateway)
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.leave();
    }
}

/// Which header carried the key, so exactly that one is stripped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    Authorization,
    ApiKey,
}

/// The header names a key comes in, built once (a name given as a string
/// is parsed and hashed again on every lookup).
static AUTHORIZATION: http::HeaderName = http::header::AUTHORIZATION;
static X_API_KEY: http::HeaderName = http::HeaderName::from_static("x-api-key");

impl KeySource {
    pub fn header(self) -> &'static http::HeaderName {
        match self {
            KeySource::Authorization => &AUTHORIZATION,
            KeySource::ApiKey => &X_API_KEY,
        }
    }
}

/// The one key a request carries: a `Bearer` `Authorization` or an
/// `X-API-Key`. Two keys, in any combination, is a bad request.
pub fn presented_key(headers: &HeaderMap) -> Result<(&str, KeySource), Rejection> {
    let mut other_scheme = None;
    let bearer = headers.get_all(&AUTHORIZATION).iter().filter_map(|v| {
        let (scheme, token) = authorization(v.as_bytes())?;
        if scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() {
            Some(token)
        } else {
            other_scheme.get_or_insert_with(|| scheme_name(scheme));
            None
        }
    });
    let bearer = bearer.map(|k| (k, KeySource::Authorization));
    let api_key = headers
        .get_all(&X_API_KEY)
        .iter()
        .map(|v| (v.to_str().unwrap_or(""), KeySource::ApiKey));
    let mut keys = bearer.chain(api_key);
    match (keys.next(), keys.next()) {
        (None, _) => Err(Rejection::MissingKey {
            scheme: other_scheme,
        }),
        (Some(one), None) => Ok(one),
        (Some(_), Some(_)) => Err(Rejection::bad_request(
            "send exactly one API key: one Authorization or one X-API-Key header",
        )),
    }
}

/// An `Authorization` value's scheme and credentials, trimmed; the scheme
/// is compared case-insensitively by callers (RFC 9110). `None` for a
/// value `HeaderValue::to_str` refuses (a byte that is not visible ASCII,
/// a space or a tab), checked without an early exit, so in vector compares:
/// every keyed request reads its key here, and a byte at a time, as
/// `to_str` and `str::trim` go, was ~400 instructions of it.
pub fn authorization(value: &[u8]) -> Option<(&str, &str)> {
    let refused = value.iter().fold(0u8, |refused, &b| {
        refused | u8::from((b < 0x20) & (b != b'\t')) | u8::from(b >= 0x7f)
    });
    if refused != 0 {
        return None;
    }
    // Visible ASCII, spaces and tabs: the only white space to trim, and
    // every byte a character.
    let blank = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !blank(b)).unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !blank(b))
        .map_or(start, |last| last + 1);
    let value = value.get(start..end)?;
    // SAFETY: every byte is below 0x7f (checked above): ASCII, so UTF-8.
    // (`str::from_utf8` checks again, a byte at a time up to alignment:
    // a third of this function's cost.)
    let value = unsafe { std::str::from_utf8_unchecked(value) };
    let (scheme, credentials) = value
        .bytes()
        .position(|b| blank(&b))
        .and_then(|at| value.split_at_checked(at))
        .unwrap_or((value, ""));
    Some((scheme, credentials.trim_start_matches([' ', '\t'])))
}

/// An `Authorization` scheme as it may be shown back: a short token of
/// letters, digits and dashes, or a neutral word; never the credentials.
fn scheme_name(scheme: &str) -> String {
    let shown = !scheme.is_empty()
        && scheme.len() <= 24
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if scheme.eq_ignore_ascii_case("bearer") {
        "Bearer (with no key)".into()
    } else if shown {
        scheme.into()
    } else {
        "unknown".into()
    }
}

/// What a store call's outcome means for a request: a revoked key is an
/// invalid one, and a store that cannot answer fails closed.
pub fn charged<T>(outcome: Result<Option<T>, StoreError>) -> Result<T, Rejection> {
    match outcome {
        Ok(Some(value)) => Ok(value),
        Ok(None) => Err(Rejection::InvalidKey),
        Err(e) => {
            tracing::error!(error = %e, "the store could not record a charge");
            Err(Rejection::StoreUnavailable)
        }
    }
}

impl Gateway {
    /// Finds the key a request presents, hashing it once. A key already in
    /// memory is known, so its checksum held when it was created; any other
    /// key must pass the checksum before the store is read, so a mistyped or
    /// made-up key never reaches the disk.
    pub async fn authenticate(&self, key: &str) -> Result<Key, Rejection> {
        if !keys::well_shaped(key) {
            return Err(Rejection::InvalidKey);
        }
        let hash = KeyHash::of(key);
        if let Some(found) = self.store.in_memory(&hash) {
            return Ok(found);
        }
        if !keys::checksum_holds(key) {
            return Err(Rejection::InvalidKey);
        }
        match self.store.find(&hash).await {
            Ok(Some(entry)) => Ok(entry),
            Ok(None) => Err(Rejection::InvalidKey),
            Err(e) => {
                tracing::error!(error = %e, "store lookup failed");
                Err(Rejection::StoreUnavailable)
            }
        }
    }

    pub fn config(&self) -> Arc<Generation> {
        self.config.load_full()
    }

    /// Makes `config` the live configuration.
    pub fn install(&self, config: Config) {
        self.config
            .store(Arc::new(Generation::new(config, &self.metrics)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, http::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn one_key_from_either_header() {
        let h = headers(&[("authorization", "Bearer sk_a")]);
        assert_eq!(presented_key(&h), Ok(("sk_a", KeySource::Authorization)));
        let h = headers(&[("x-api-key", "sk_b"), ("authorization", "Basic dXNlcg==")]);
        assert_eq!(presented_key(&h), Ok(("sk_b", KeySource::ApiKey)));
    }

    #[test]
    fn none_or_two_keys_are_refused() {
        assert_eq!(
            presented_key(&headers(&[])),
            Err(Rejection::MissingKey { scheme: None })
        );
        let sent = headers(&[("authorization", "Basic dXNlcjpwYXNz")]);
        let basic = presented_key(&sent);
        assert_eq!(
            basic,
            Err(Rejection::MissingKey {
                scheme: Some("Basic".into())
            })
        );
        let message = basic.expect_err("refused").to_string();
        assert!(message.contains("'Basic' scheme"), "{message}");
        assert!(!message.contains("dXNlcjpwYXNz"), "{message}");
        for empty in ["Bearer", "Bearer ", "bearer \t"] {
            assert_eq!(
                presented_key(&headers(&[("authorization", empty)])),
                Err(Rejection::MissingKey {
                    scheme: Some("Bearer (with no key)".into())
                }),
                "{empty:?}"
            );
        }
        for two in [
            headers(&[("authorization", "Bearer a"), ("authorization", "Bearer b")]),
            headers(&[("authorization", "Bearer a"), ("x-api-key", "b")]),
            headers(&[("x-api-key", "a"), ("x-api-key", "b")]),
        ] {
            assert!(matches!(
                presented_key(&two),
                Err(Rejection::BadRequest { .. })
            ));
        }
    }

    proptest::proptest! {
        /// As `to_str`, `trim` and a split at the first blank read a value,
        /// on any bytes: blanks, the scheme's letters, and bytes no header
        /// value may hold.
        #[test]
        fn an_authorization_value_reads_as_str_methods_read_it(
            value in proptest::collection::vec(proptest::sample::select(
                vec![b' ', b'\t', b'B', b'e', b'a', b'r', b'_', b'=', 0x0b, 0x0d, 0x7f, 0x80, 0xc3, 0xa9]
            ), 0..16)
        ) {
            let by_str = http::HeaderValue::from_bytes(&value).ok().and_then(|v| {
                let v = v.to_str().ok()?.trim();
                let (scheme, credentials) = v.split_once([' ', '\t']).unwrap_or((v, ""));
                Some((scheme.to_string(), credentials.trim().to_string()))
            });
            let ours = authorization(&value).map(|(s, c)| (s.to_string(), c.to_string()));
            // A value no `HeaderValue` holds never reaches here.
            if http::HeaderValue::from_bytes(&value).is_ok() {
                proptest::prop_assert_eq!(ours, by_str);
            }
        }
    }
}
