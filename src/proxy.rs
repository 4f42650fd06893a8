//! The Pingora glue: extract what the gate needs from a request, call it,
//! and write the answer or forward.
//!
//! Phases, as Pingora calls them:
//! - `request_filter`: normalise the path, match a route, answer the usage
//!   endpoint, authenticate, decide and charge (all in [`crate::gate`]).
//! - `upstream_peer`: where the route's upstream is.
//! - `upstream_request_filter`: forward the canonical path, strip the key
//!   and any client `X-Tollgate-*`, add the gateway's own identity headers.
//! - `upstream_response_filter`: meter pools from the upstream's answer, and
//!   refund on 5xx where the route says so.
//! - `response_filter`: usage and rate-limit headers.
//! - `fail_to_proxy`: the upstream did not answer; refund and answer 502.

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method};
use pingora::http::{H1Value, RequestHeader, ResponseHeader};
use pingora::prelude::*;
use pingora::protocols::http::ServerSession as HttpSession;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{ErrorSource, ErrorType};

use crate::clock::Tick;
use crate::config::{Config, OnStoreError, Route};
use crate::gate::{self, Admission, Demand};
use crate::gateway::{charged, presented_key, Gateway, Generation, InFlightGuard, KeySource};
use crate::metrics::{RouteLabel, NONE};
use crate::path::{normalise, PathError};
use crate::reject::Rejection;
use crate::store::Key;
use crate::views;

// Header names, built once: inserted by `insert_static_header`, they are
// neither parsed nor allocated per request.
static X_USAGE_REMAINING: HeaderName = HeaderName::from_static("x-usage-remaining");
static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static X_TOLLGATE_KEY_ID: HeaderName = HeaderName::from_static("x-tollgate-key-id");
static X_TOLLGATE_EXTERNAL_ID: HeaderName = HeaderName::from_static("x-tollgate-external-id");
static X_TOLLGATE_TIER: HeaderName = HeaderName::from_static("x-tollgate-tier");

/// A span in nanoseconds as the seconds a histogram observes.
fn seconds(nanos: u64) -> f64 {
    nanos as f64 / 1e9
}

/// Writes `n` in decimal at the end of `buf`.
fn push_number(buf: &mut Vec<u8>, n: u64) {
    buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Adds tollgate's own fields (those given a value) to an answer,
/// replacing any the upstream sent under those names. On HTTP/1.x they go
/// on the wire after the upstream's fields without entering the header
/// map (a map insert each cost more than the rest of the answer's header
/// work), all in one step: `ResponseHeader::append_h1_fields` in the
/// vendored pingora-http. An HTTP/2 answer is built from the map, so there
/// they are inserted.
fn add_fields<const N: usize>(
    resp: &mut ResponseHeader,
    http2: bool,
    fields: &[(&'static HeaderName, Option<H1Value<'_>>); N],
) {
    // The given fields first; the places after them (a placeholder, the
    // array's length fixed) are never read.
    let mut ours = [(&RATELIMIT, H1Value::Number(0)); N];
    let mut given = 0;
    for &(name, value) in fields {
        if let Some(value) = value {
            ours[given] = (name, value);
            given += 1;
        }
    }
    let ours = &ours[..given];
    if http2 {
        for &(name, value) in ours {
            let value = match value {
                H1Value::Number(n) => HeaderValue::from(n),
                H1Value::Text(text) => match HeaderValue::from_bytes(text) {
                    Ok(value) => value,
                    Err(_) => continue,
                },
            };
            resp.insert_static_header(name, value);
        }
        return;
    }
    let theirs = resp
        .headers
        .keys()
        .any(|n| ours.iter().any(|(name, _)| n == *name));
    if theirs {
        for (name, _) in ours {
            resp.remove_header(*name);
        }
    }
    let left_out = resp.append_h1_fields(ours);
    if left_out > 0 {
        tracing::debug!(left_out, "fields no header can carry were not added");
    }
}

pub struct Proxy {
    gateway: Arc<Gateway>,
}

impl Proxy {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        Self { gateway }
    }
}

/// Per-request state.
pub struct Ctx {
    _in_flight: InFlightGuard,
    started: Tick,
    /// When the request went upstream, for the access log.
    upstream_started: Option<Tick>,
    upstream_us: Option<u64>,
    config: Option<Arc<Generation>>,
    route: Option<usize>,
    /// The request is the customer usage endpoint's.
    usage: bool,
    /// The request is a CORS preflight (see [`preflight_method`]).
    preflight: bool,
    /// Canonical path plus the original query, when it differs from what
    /// the client sent: what is forwarded instead.
    target: Option<String>,
    /// What the request's key brought, once one was presented.
    keyed: Option<Box<Keyed>>,
    /// The request's outcome code: a rejection code, or `OK`.
    pub code: &'static str,
}

/// What a request learns of its key. Boxed in [`Ctx`]: a request without
/// a key carries a pointer's worth instead, and Pingora moves the context
/// a few times a request (each move of a larger one a `memcpy`).
#[derive(Default)]
struct Keyed {
    source: Option<KeySource>,
    key: Option<Key>,
    key_id: Option<compact_str::CompactString>,
    external_id: Option<String>,
    /// The index of the key's tier in the config, once known and if the
    /// config has it (for logs and metrics).
    tier: Option<usize>,
    admission: Option<Admission>,
}

impl Ctx {
    fn route(&self) -> Option<&Route> {
        Some(&self.config.as_ref()?.routes[self.route?])
    }

    fn keyed(&mut self) -> &mut Keyed {
        self.keyed.get_or_insert_with(Box::default)
    }

    fn admission(&self) -> Option<&Admission> {
        self.keyed.as_ref()?.admission.as_ref()
    }

    fn tier(&self) -> Option<usize> {
        self.keyed.as_ref()?.tier
    }
}

/// The longest request target (path and query) tollgate reads.
pub const MAX_TARGET: usize = 8 * 1024;
/// The most request headers tollgate reads.
pub const MAX_HEADERS: usize = 100;
/// The most bytes of request header names and values tollgate reads.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;

/// A request tollgate refuses before routing: past its caps (which sit
/// below Pingora's own: requests past those never reach tollgate), or a
/// CONNECT (tollgate does not tunnel).
fn beyond_caps(req: &RequestHeader) -> Option<Rejection> {
    if req.method == Method::CONNECT {
        return Some(Rejection::MethodNotAllowed {
            allow: String::new(),
        });
    }
    let target = req.uri.path_and_query().map_or(0, |p| p.as_str().len());
    if target > MAX_TARGET {
        return Some(too_large(format_args!(
            "the request target (path and query) is {target} bytes; the most is {MAX_TARGET}"
        )));
    }
    if req.headers.len() > MAX_HEADERS {
        return Some(too_large(format_args!(
            "{} request headers; the most is {MAX_HEADERS}",
            req.headers.len()
        )));
    }
    let bytes: usize = req
        .headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if bytes > MAX_HEADER_BYTES {
        return Some(too_large(format_args!(
            "{bytes} bytes of request headers; the most is {MAX_HEADER_BYTES}"
        )));
    }
    None
}

/// A request past one of tollgate's caps, refused with `message`.
#[cold]
fn too_large(message: std::fmt::Arguments<'_>) -> Rejection {
    Rejection::bad_request(message.to_string())
}

/// The method a CORS preflight announces: an `OPTIONS` with `Origin` and
/// `Access-Control-Request-Method` is routed as that method (SPEC §3).
fn preflight_method(req: &RequestHeader) -> Option<Method> {
    if req.method != Method::OPTIONS || !req.headers.contains_key(http::header::ORIGIN) {
        return None;
    }
    let announced = req
        .headers
        .get(http::header::ACCESS_CONTROL_REQUEST_METHOD)?
        .to_str()
        .ok()?;
    Method::from_bytes(announced.trim().as_bytes()).ok()
}

/// Whether a header's name is one tollgate sends upstream itself.
fn ours(name: &HeaderName) -> bool {
    name.as_str().starts_with("x-tollgate-")
}

/// Removes a client's `X-Tollgate-*` fields: upstream, those come from
/// tollgate alone.
#[cold]
fn strip_ours(req: &mut RequestHeader) {
    let spoofed: Vec<HeaderName> = req.headers.keys().filter(|n| ours(n)).cloned().collect();
    for name in spoofed {
        req.remove_header(&name);
    }
}

/// What `request_filter` does with a request ([`Proxy::steer`]).
enum Steer {
    /// Forward it as it is: a public route's, or a CORS preflight.
    Forward,
    /// A keyed route's (by index): authenticate, decide, charge.
    Admit(usize),
    /// The customer usage endpoint's.
    Usage,
    /// Refuse it, and whether the connection can then be kept.
    Refuse(Rejection, Keepalive),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Keepalive {
    Keep,
    Close,
}

/// The refusal of a path no route takes with the request's method: 405
/// with the methods some route takes, or 404 when none has the path.
#[cold]
fn not_routed(config: &Config, path: &str) -> Rejection {
    let allow = config.allowed_methods(path);
    if allow.is_empty() {
        return Rejection::RouteNotFound;
    }
    Rejection::MethodNotAllowed {
        allow: allow
            .iter()
            .map(|m| m.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// The answer to an HTTP/1 client is HTTP/1.1 whatever the upstream spoke
/// (RFC 9110 §6.2): an HTTP/1.0 upstream's status line, and its
/// `Keep-Alive` leftovers, would tell the client to stop reusing the
/// connection. An HTTP/1.0 client never gets chunked encoding: without it
/// the body ends when the connection closes.
fn speak_http_1_1(client: http::Version, resp: &mut ResponseHeader) {
    if resp.version != http::Version::HTTP_11 {
        resp.set_version(http::Version::HTTP_11);
        resp.remove_header("keep-alive");
        resp.remove_header("proxy-connection");
    }
    if client == http::Version::HTTP_10 {
        resp.remove_header(&http::header::TRANSFER_ENCODING);
    }
}

/// A JSON answer's header and body.
fn json_answer(
    status: u16,
    body: &serde_json::Value,
    headers: &[(&'static str, String)],
) -> Result<(ResponseHeader, Bytes)> {
    let body = Bytes::from(body.to_string());
    let mut resp = ResponseHeader::build(status, Some(4 + headers.len()))?;
    resp.insert_header("content-type", "application/json")?;
    resp.insert_header("content-length", body.len().to_string())?;
    resp.insert_header("cache-control", "no-store")?;
    for (name, value) in headers {
        resp.insert_header(*name, value.as_str())?;
    }
    Ok((resp, body))
}

/// Writes a JSON answer and ends the request.
async fn respond_json(
    session: &mut Session,
    status: u16,
    body: &serde_json::Value,
    headers: &[(&'static str, String)],
) -> Result<()> {
    let (resp, body) = json_answer(status, body, headers)?;
    session.write_response_header(Box::new(resp), false).await?;
    session.write_response_body(Some(body), true).await
}

/// What was wrong with a request Pingora could not parse, in words that
/// quote none of it (it may hold a key). Pingora says it in the error's
/// cause (httparse's) or in the first words of its context.
fn unreadable(error: &Error) -> &'static str {
    if let Some(e) = error.root_cause().downcast_ref::<httparse::Error>() {
        return match e {
            httparse::Error::Version => "the request line is not HTTP/1.0 or HTTP/1.1",
            httparse::Error::TooManyHeaders => "more than 256 request headers",
            httparse::Error::HeaderName | httparse::Error::HeaderValue => {
                "a request header is malformed"
            }
            _ => "the request line or a header is malformed",
        };
    }
    let context = error.context.as_ref().map_or("", |c| c.as_str());
    if context.starts_with("invalid uri") {
        "the request target is malformed or over 64 KiB"
    } else if context.starts_with("invalid method") {
        "the request method is malformed"
    } else if context.starts_with("Request header larger") {
        "the request header is over 1 MiB"
    } else {
        "the request could not be read as HTTP/1.1"
    }
}

async fn reject(session: &mut Session, ctx: &mut Ctx, rejection: Rejection) -> Result<bool> {
    ctx.code = rejection.code();
    respond_json(
        session,
        rejection.status(),
        &rejection.body(),
        &rejection.headers(),
    )
    .await?;
    Ok(true)
}

impl Proxy {
    /// Matches the canonical path. An encoded slash is allowed only when the
    /// route it then matches says so.
    fn route<'a>(
        &self,
        config: &Config,
        method: &Method,
        raw: &'a str,
    ) -> Result<(Cow<'a, str>, Option<usize>), Rejection> {
        match normalise(raw, false) {
            Ok(path) => {
                let i = config.route_index(method, &path);
                Ok((path, i))
            }
            Err(e) => Self::encoded_slash(config, method, raw, e),
        }
    }

    /// A path [`normalise`] refused: still routed if its fault is an
    /// encoded slash and the route it then matches allows one.
    #[cold]
    fn encoded_slash<'a>(
        config: &Config,
        method: &Method,
        raw: &'a str,
        error: PathError,
    ) -> Result<(Cow<'a, str>, Option<usize>), Rejection> {
        if error != PathError::EncodedSlash {
            return Err(Rejection::bad_request(error.to_string()));
        }
        let path = normalise(raw, true).map_err(|e| Rejection::bad_request(e.to_string()))?;
        match config.route_index(method, &path) {
            Some(i) if config.routes[i].allow_encoded_slashes => Ok((path, Some(i))),
            _ => Err(Rejection::bad_request(error.to_string())),
        }
    }

    /// Where a request goes, decided without waiting on anything: the
    /// route matched (noted in `ctx`), the usage endpoint, or a refusal.
    /// Kept apart from the answers it leads to, which wait (writing a
    /// refusal, a key's decision), so that the path of a request that is
    /// simply forwarded is short and its code compact.
    fn steer(&self, req: &RequestHeader, ctx: &mut Ctx, config: &Generation) -> Steer {
        if let Some(refusal) = beyond_caps(req) {
            // What follows on this connection cannot be trusted to be framed
            // as expected (a CONNECT's tunnel, say): close it after the answer.
            return Steer::Refuse(refusal, Keepalive::Close);
        }
        let preflight = preflight_method(req);
        ctx.preflight = preflight.is_some();
        let method = preflight.as_ref().unwrap_or(&req.method);
        let (path, route) = match self.route(config, method, req.uri.path()) {
            Ok(found) => found,
            Err(rejection) => return Steer::Refuse(rejection, Keepalive::Keep),
        };
        if path == config.usage_path && req.method == Method::GET {
            return Steer::Usage;
        }
        let Some(index) = route else {
            return Steer::Refuse(not_routed(config, &path), Keepalive::Keep);
        };
        ctx.route = Some(index);
        // Forwarded as received unless normalising changed it.
        if let Cow::Owned(path) = path {
            ctx.target = Some(match req.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            });
        }
        let route = &config.routes[index];
        // A CORS preflight carries no key (browsers never send one) and is
        // the upstream's to answer: forwarded, uncharged.
        if !route.auth || ctx.preflight {
            Steer::Forward
        } else {
            Steer::Admit(index)
        }
    }

    /// `request_filter`'s work, on the config snapshot `config`.
    async fn filter(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        config: &Generation,
    ) -> Result<bool> {
        match self.steer(session.req_header(), ctx, config) {
            Steer::Forward => Ok(false),
            Steer::Admit(index) => self.keyed(session, ctx, config, index).await,
            Steer::Usage => self.usage(session, ctx, config).await,
            Steer::Refuse(rejection, keepalive) => {
                if keepalive == Keepalive::Close {
                    session.set_keepalive(None);
                }
                reject(session, ctx, rejection).await
            }
        }
    }

    /// A keyed route's request: admitted (and forwarded) or refused.
    async fn keyed(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        config: &Generation,
        index: usize,
    ) -> Result<bool> {
        let route = &config.routes[index];
        match self.admit(session, ctx, config, route).await {
            Ok(admission) => {
                ctx.keyed().admission = Some(admission);
                Ok(false)
            }
            // The shared store does not answer, and the operator chose to
            // serve uncharged meanwhile: forwarded without identity
            // headers (nothing is known of the key), counted.
            Err(Rejection::StoreUnavailable)
                if config
                    .redis
                    .as_ref()
                    .is_some_and(|r| r.on_error == OnStoreError::Allow) =>
            {
                self.gateway.metrics.store_bypassed.inc();
                ctx.code = "OK";
                Ok(false)
            }
            Err(rejection) => reject(session, ctx, rejection).await,
        }
    }

    /// The customer usage endpoint: answered here, never charged or forwarded.
    async fn usage(&self, session: &mut Session, ctx: &mut Ctx, config: &Config) -> Result<bool> {
        ctx.usage = true;
        match self.usage_report(session, config).await {
            Ok(report) => {
                ctx.code = "OK";
                respond_json(session, 200, &report, &[]).await?;
                Ok(true)
            }
            Err(rejection) => reject(session, ctx, rejection).await,
        }
    }

    async fn usage_report(
        &self,
        session: &Session,
        config: &Config,
    ) -> Result<serde_json::Value, Rejection> {
        let (key, _) = presented_key(&session.req_header().headers)?;
        let key = self.gateway.authenticate(key).await?;
        let now = self.gateway.clock.read();
        let report = self
            .gateway
            .store
            .charge(&key, |record, usage| {
                if !record.enabled {
                    return Err(Rejection::Disabled);
                }
                if let Some(expired_at) = record.expires_at.filter(|at| *at <= now.wall) {
                    return Err(Rejection::Expired { expired_at });
                }
                let tier = config
                    .tier(&record.tier)
                    .ok_or_else(|| Rejection::TierNotFound {
                        tier: record.tier.to_string(),
                    })?;
                Ok(views::usage_report(tier, record, usage, now))
            })
            .await;
        charged(report)?
    }

    /// Authenticates and charges a keyed request.
    async fn admit(
        &self,
        session: &Session,
        ctx: &mut Ctx,
        config: &Config,
        route: &Route,
    ) -> Result<Admission, Rejection> {
        let headers = &session.req_header().headers;
        let (key, source) = presented_key(headers)?;
        ctx.keyed().source = Some(source);
        let decided = Tick::now();
        let result = self.decide(ctx, config, route, headers, key).await;
        self.gateway
            .metrics
            .verify_duration
            .observe(seconds(decided.elapsed_nanos()));
        result
    }

    /// The key decision: look the key up, then check and charge.
    async fn decide(
        &self,
        ctx: &mut Ctx,
        config: &Config,
        route: &Route,
        headers: &http::HeaderMap,
        key: &str,
    ) -> Result<Admission, Rejection> {
        let key = self.gateway.authenticate(key).await?;
        if !self.gateway.store.healthy() {
            return Err(Rejection::StoreUnavailable);
        }
        let demand = Demand::for_route(route, headers);
        let now = self.gateway.clock.read();
        // Even a rejection may have settled a refill worth keeping: the
        // store keeps what `admit` changed either way.
        let decided = self
            .gateway
            .store
            .charge(&key, |record, usage| {
                let result = gate::admit(config, record, usage, &demand, now);
                // An admission names its tier; only a refusal looks it up.
                let tier = match &result {
                    Ok(admission) => Some(admission.tier),
                    Err(_) => config.tiers.get_index_of(record.tier.as_str()),
                };
                let who = (record.key_id.clone(), record.external_id.clone(), tier);
                (who, result)
            })
            .await;
        let ((key_id, external_id, tier), result) = charged(decided)?;
        let keyed = ctx.keyed();
        keyed.key_id = Some(key_id);
        keyed.external_id = external_id;
        keyed.tier = tier;
        keyed.key = Some(key);
        result
    }

    /// Gives the request's charge back (the upstream failed).
    async fn refund(&self, ctx: &mut Ctx) {
        let (Some(keyed), Some(config)) = (&mut ctx.keyed, &ctx.config) else {
            return;
        };
        let (Some(key), Some(admission)) = (&keyed.key, &mut keyed.admission) else {
            return;
        };
        let tier = config.tier_at(admission.tier);
        let charge = std::mem::take(&mut admission.charge);
        let refunded = self
            .gateway
            .store
            .charge(key, |_, usage| {
                gate::refund(tier, usage, &charge);
                usage.remaining
            })
            .await;
        match refunded {
            Ok(Some(remaining)) => {
                if admission.remaining.is_some() {
                    admission.remaining = remaining;
                }
            }
            // Revoked meanwhile: nothing left to give back to.
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "a refund could not be recorded");
                admission.charge = charge;
            }
        }
    }
}

impl ProxyHttp for Proxy {
    type CTX = Ctx;

    /// No modules: Pingora adds a (disabled) compression module by default,
    /// which costs a boxed filter call per request and does nothing.
    fn init_downstream_modules(&self, _modules: &mut pingora::modules::http::HttpModules) {}

    fn connection_opened(&self) {
        self.gateway.connections.enter();
    }

    fn connection_closed(&self) {
        self.gateway.connections.leave();
    }

    fn new_ctx(&self) -> Ctx {
        Ctx {
            _in_flight: InFlightGuard::enter(self.gateway.clone()),
            started: Tick::now(),
            upstream_started: None,
            upstream_us: None,
            config: None,
            route: None,
            usage: false,
            preflight: false,
            target: None,
            keyed: None,
            code: "OK",
        }
    }

    async fn early_request_filter(&self, session: &mut Session, _ctx: &mut Ctx) -> Result<()> {
        // HTTP/1.1 clients may send requests before the answers to earlier
        // ones (pipelining): answer every one, in order, instead of
        // dropping what followed the first (Pingora's default).
        session.set_pipelining_enabled(true);
        Ok(())
    }

    /// A request Pingora could not parse gets the §3 JSON like every other
    /// answer (the hook comes with the vendored pingora-proxy).
    async fn request_error_filter(&self, session: &mut HttpSession, error: &Error) -> Result<()> {
        let rejection = Rejection::bad_request(unreadable(error));
        let code = rejection.code();
        self.gateway
            .config()
            .handles
            .request(RouteLabel::None, None, code, 0.0);
        crate::log::access(crate::log::Access {
            route: NONE,
            tier: NONE,
            code,
            status: rejection.status(),
            latency_us: 0,
            upstream_us: None,
            error: Some(error.etype().as_str()),
            at: Tick::now(),
        });
        let (resp, body) = json_answer(rejection.status(), &rejection.body(), &[])?;
        session.write_error_response(resp, body).await
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // One handle on the snapshot for the whole request, kept in `ctx`
        // once this hook is done with it (nothing this hook calls reads it
        // there): not a second count on it for the hook alone.
        let config = self.gateway.config();
        let answered = self.filter(session, ctx, &config).await;
        ctx.config = Some(config);
        answered
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let (Some(generation), Some(route)) = (&ctx.config, ctx.route()) else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "route without upstream",
            ));
        };
        // Resolved when the config was loaded (and in the background since),
        // never here.
        let peer = generation
            .peers
            .get(generation, route.upstream_index)
            .ok_or_else(|| {
                Error::explain(ErrorType::ConnectNoRoute, "upstream host did not resolve").into_up()
            })?;
        Ok(Box::new(peer))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // Not taken: Pingora calls this again when it retries on another
        // connection, and every attempt must forward the canonical path.
        if let Some(target) = &ctx.target {
            let uri = target
                .parse::<http::Uri>()
                .map_err(|e| Error::because(ErrorType::InternalError, "canonical path", e))?;
            upstream_request.set_uri(uri);
        }
        ctx.upstream_started = Some(Tick::now());
        if upstream_request.headers.keys().any(ours) {
            strip_ours(upstream_request);
        }
        let Some(route) = ctx.route() else {
            return Ok(());
        };
        if let Some(host) = ctx
            .config
            .as_ref()
            .and_then(|c| c.upstreams.get_index(route.upstream_index))
            .and_then(|(_, u)| u.host_header.clone())
        {
            upstream_request.insert_header("host", host)?;
        }
        let keyed = ctx.keyed.as_deref();
        if let (Some(source), false) = (keyed.and_then(|k| k.source), route.forward_key) {
            upstream_request.remove_header(source.header());
        }
        if ctx.preflight && route.auth && !route.forward_key {
            // Nothing read it, so nothing of it goes upstream either.
            upstream_request.remove_header(KeySource::Authorization.header());
            upstream_request.remove_header(KeySource::ApiKey.header());
        }
        // The identity fields go on the wire after the request's own (an
        // upstream peer speaks HTTP/1.x: `upstream::peer` names no other
        // protocol), without entering its header map; a client's fields of
        // these names were removed above.
        if let Some((keyed, admission)) = keyed.and_then(|k| Some((k, k.admission.as_ref()?))) {
            if let Some(id) = &keyed.key_id {
                upstream_request.append_h1_field(&X_TOLLGATE_KEY_ID, id.as_bytes())?;
            }
            if let Some(ext) = &keyed.external_id {
                // An external id no header can carry is left out.
                let _ = upstream_request.append_h1_field(&X_TOLLGATE_EXTERNAL_ID, ext.as_bytes());
            }
            if let Some(tier) = ctx.config.as_ref().and_then(|c| c.tier_at(admission.tier)) {
                upstream_request.append_h1_field(&X_TOLLGATE_TIER, tier.id_header.as_bytes())?;
            }
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if upstream_response.status.is_informational() {
            return Ok(());
        }
        ctx.upstream_us = ctx.upstream_started.map(Tick::elapsed_micros);
        if ctx.admission().is_none() {
            return Ok(());
        }
        // A second handle on the snapshot, so the route can be read while
        // `ctx` is changed (a refund).
        let (Some(config), Some(index)) = (ctx.config.clone(), ctx.route) else {
            return Ok(());
        };
        let route = &config.routes[index];
        if route.refund_on_5xx && upstream_response.status.is_server_error() {
            self.refund(ctx).await;
        }
        if route.meter.is_empty() {
            return Ok(());
        }
        let Some(key) = ctx.keyed.as_ref().and_then(|k| k.key.as_ref()) else {
            return Ok(());
        };
        let mut metered = Vec::with_capacity(route.meter.len());
        for (i, (pool, header)) in route.meter.iter().enumerate() {
            let units = upstream_response
                .headers
                .get(header)
                .and_then(|v| gate::parse_amount(v.as_bytes()));
            match units {
                Some(units) => metered.push((i, pool.as_str(), units)),
                None if upstream_response.headers.contains_key(header) => {
                    tracing::warn!(route = %route.name, %pool, header = %header, "upstream sent a meter header that is not an amount; not charged");
                }
                None => {}
            }
        }
        if metered.is_empty() {
            return Ok(());
        }
        let now = self.gateway.clock.read();
        let charged = self
            .gateway
            .store
            .charge(key, |record, usage| {
                let tier = config.tier(&record.tier);
                for (_, pool, units) in &metered {
                    gate::meter(tier, usage, pool, *units, now);
                }
            })
            .await;
        match charged {
            Ok(Some(())) => {
                for (i, _, units) in &metered {
                    config.handles.metered(index, *i, *units);
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "metered units could not be recorded"),
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if !session.is_http2() {
            speak_http_1_1(session.req_header().version, upstream_response);
        }
        let (Some(admission), Some(config)) = (ctx.admission(), &ctx.config) else {
            return Ok(());
        };
        // The state of each of the policy's limits after this request, in
        // one field value.
        let mut state = Vec::new();
        let policy = config.tier_at(admission.tier).and_then(|tier| {
            let policy = tier.rate_limit_policy.as_ref()?;
            state.reserve(48 * admission.rates.len());
            for r in &admission.rates {
                let Some((name, _)) = tier.rate_limits.get_index(r.index) else {
                    continue;
                };
                if !state.is_empty() {
                    state.extend_from_slice(b", ");
                }
                state.push(b'"');
                state.extend_from_slice(name.as_bytes());
                state.extend_from_slice(b"\";r=");
                push_number(&mut state, r.remaining);
                state.extend_from_slice(b";t=");
                push_number(&mut state, r.reset);
            }
            Some(policy)
        });
        let tightest = admission.tightest.as_ref();
        let number = |n: Option<u64>| n.map(H1Value::Number);
        add_fields(
            upstream_response,
            session.is_http2(),
            &[
                (&X_USAGE_REMAINING, number(admission.remaining)),
                (&RATELIMIT_LIMIT, number(tightest.map(|t| t.limit))),
                (&RATELIMIT_REMAINING, number(tightest.map(|t| t.remaining))),
                (&RATELIMIT_RESET, number(tightest.map(|t| t.reset))),
                (
                    &RATELIMIT_POLICY,
                    policy.map(|p| H1Value::Text(p.as_bytes())),
                ),
                (&RATELIMIT, policy.map(|_| H1Value::Text(&state))),
            ],
        );
        Ok(())
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy
    where
        Ctx: Send + Sync,
    {
        let from_upstream = e.esource() == &ErrorSource::Upstream;
        let answered = session.response_written().is_some();
        // The connection is not reused after an error; say so, so the
        // client does not send its next request into a closing socket.
        session.set_keepalive(None);
        if from_upstream {
            if let Some(route) = ctx.route() {
                self.gateway
                    .metrics
                    .upstream_errors
                    .with_label_values(&[&route.upstream])
                    .inc();
            }
        }
        let code = if from_upstream && !answered {
            self.refund(ctx).await;
            let rejection = Rejection::UpstreamUnavailable;
            ctx.code = rejection.code();
            if let Err(write_error) =
                respond_json(session, 502, &rejection.body(), &rejection.headers()).await
            {
                tracing::debug!(error = %write_error, "client went away before the 502");
            }
            502
        } else if answered {
            0
        } else {
            let status = match e.etype() {
                ErrorType::HTTPStatus(code) => *code,
                _ if e.esource() == &ErrorSource::Downstream => 400,
                _ => 500,
            };
            let rejection = Rejection::bad_request("the request could not be processed");
            let body = if status == 400 {
                rejection.body()
            } else {
                serde_json::json!({ "code": "INTERNAL", "message": "internal error" })
            };
            ctx.code = if status == 400 {
                "BAD_REQUEST"
            } else {
                "INTERNAL"
            };
            if session.response_written().is_none() {
                let _ = respond_json(session, status, &body, &[]).await;
            }
            status
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, error: Option<&Error>, ctx: &mut Ctx) {
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let ended = Tick::now();
        let took = ctx.started.nanos_until(ended);
        let Some(config) = &ctx.config else { return };
        let label = match (ctx.route, ctx.usage) {
            (_, true) => RouteLabel::Usage,
            (Some(r), false) => RouteLabel::Route(r),
            (None, false) => RouteLabel::None,
        };
        let tier_index = ctx.tier();
        let (route, tier) = config.handles.names(label, tier_index);
        config
            .handles
            .request(label, tier_index, ctx.code, seconds(took));
        if let Some(admission) = ctx.admission() {
            config.handles.charge(
                tier_index,
                admission.charge.credits,
                admission.charge.overage,
            );
            config
                .handles
                .pools(&self.gateway.metrics, ctx.route, &admission.charge);
            self.gateway.metrics.record_shadowed(admission);
        }
        crate::log::access(crate::log::Access {
            route,
            tier,
            code: ctx.code,
            status,
            latency_us: took / 1000,
            upstream_us: ctx.upstream_us,
            error: error.map(|e| e.etype().as_str()),
            at: ended,
        });
    }
}
