//! The admin API (SPEC §4) on its own listener, with axum.
//!
//! Every call but `/healthz` needs `Authorization: Bearer <root key>`,
//! compared in constant time. Bodies are read with a size cap and parsed
//! strictly (unknown fields are errors) so that a mistake gets a 400 naming
//! the field. Every write is on disk before it is answered.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use jiff::Timestamp;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use subtle::ConstantTimeEq;

use crate::config::{Config, Credits};
use crate::gate::{self, Amounts, Demand, MAX_AMOUNT};
use crate::gateway::{charged, Gateway};
use crate::keys;
use crate::ledger::{CreditPolicy, KeyRecord, Usage};
use crate::reject::Rejection;
use crate::store::{Key, StoreError};
use crate::views;

/// Largest admin request body.
pub const MAX_BODY: usize = 64 * 1024;

/// An admin API error: status, code and message, as JSON.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.status.as_u16(),
            self.code,
            self.message
        )
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "INVALID_REQUEST",
            message: message.into(),
        }
    }

    fn not_found() -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: "KEY_NOT_FOUND",
            message: "no key with this id".into(),
        }
    }

    /// The gateway started without its root key: no call can be
    /// authorised, and the caller should know why rather than retry keys.
    fn no_root_key(env: &str) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "NO_ROOT_KEY",
            message: format!(
                "the admin API is closed: the gateway was started without {env} set; \
                 set it to the root key and restart the gateway"
            ),
        }
    }

    fn unauthorized() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            code: "UNAUTHORIZED",
            message: "a valid root key is required: Authorization: Bearer <root key>".into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if let StoreError::Gone = e {
            return ApiError::not_found();
        }
        tracing::error!(error = %e, "admin store operation failed");
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "STORE_UNAVAILABLE",
            message: format!(
                "the store could not complete the operation ({e}); nothing was changed"
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({ "code": self.code, "message": self.message });
        (self.status, Json(body)).into_response()
    }
}

/// Reads a body of at most [`MAX_BODY`] bytes and parses it as JSON
/// strictly, naming the offending field on error.
pub async fn parse_body<T: DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let body = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|_| ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "INVALID_REQUEST",
            message: format!("the body is larger than {MAX_BODY} bytes, or was cut off"),
        })?;
    parse_json(&body)
}

/// Parses a JSON body strictly, naming the offending field on error.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // The position is only worth giving when the JSON itself is broken.
        let mut message = inner.to_string();
        if !inner.is_syntax() && !inner.is_eof() {
            if let Some(cut) = message.rfind(" at line ") {
                message.truncate(cut);
            }
        }
        if path == "." {
            ApiError::invalid(message)
        } else {
            ApiError::invalid(format!("{path}: {message}"))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::invalid(format!("trailing data after the JSON body: {e}")))?;
    Ok(value)
}

/// Parses `body` as every admin request body, for the fuzzer: each parse
/// must end in a value or an [`ApiError`], never a panic.
#[doc(hidden)]
pub fn parse_every_body(body: &[u8]) {
    let _ = parse_json::<CreateKey>(body);
    let _ = parse_json::<UpdateKey>(body);
    let _ = parse_json::<ChangeCredits>(body);
    let _ = parse_json::<Verify>(body);
    let _ = parse_json::<RetryParked>(body);
    // The list call's query string.
    if let Ok(uri) = format!("/v1/keys?{}", String::from_utf8_lossy(body)).parse::<http::Uri>() {
        let _ = Query::<ListQuery>::try_from_uri(&uri);
    }
}

fn authorize(gateway: &Gateway, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(root) = gateway.root_key.as_deref() else {
        return Err(ApiError::no_root_key(&gateway.config().root_key_env));
    };
    let presented = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| crate::gateway::authorization(v.as_bytes()))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, token)| token);
    if bool::from(presented.as_bytes().ct_eq(root.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
    }
}

/// The gateway, for a request that carried the root key. Extracted before
/// the body, so a caller without the key learns nothing about its input.
pub struct Authorized(pub Arc<Gateway>);

impl FromRequestParts<Arc<Gateway>> for Authorized {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, gw: &Arc<Gateway>) -> Result<Self, ApiError> {
        authorize(gw, &parts.headers)?;
        Ok(Authorized(gw.clone()))
    }
}

/// A JSON body parsed by [`parse_body`].
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, _: &S) -> Result<Self, ApiError> {
        parse_body(req.into_body()).await.map(JsonBody)
    }
}

/// The body of `POST /v1/keys`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    pub tier: String,
    pub external_id: Option<String>,
    pub name: Option<String>,
    pub meta: Option<Map<String, Value>>,
    pub credits: Option<u64>,
    pub refill_day: Option<u8>,
    #[serde(default, deserialize_with = "time")]
    pub expires_at: Option<Timestamp>,
    pub enabled: Option<bool>,
}

async fn create_key(
    Authorized(gw): Authorized,
    JsonBody(req): JsonBody<CreateKey>,
) -> Result<Response, ApiError> {
    let answer = issue_key(&gw, req).await?;
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// Mints and stores a key; answers its record plus the secret `key`, which
/// is never shown again. Durable when this returns.
pub async fn issue_key(gw: &Gateway, req: CreateKey) -> Result<Value, ApiError> {
    let config = gw.config();
    let tier = config
        .tier(&req.tier)
        .ok_or_else(|| ApiError::invalid(format!("tier: unknown tier '{}'", req.tier)))?;
    if req.credits.is_some() && tier.credits == Credits::Unlimited {
        return Err(ApiError::invalid(format!(
            "credits: tier '{}' has unlimited credits",
            tier.id
        )));
    }
    if let Some(ext) = &req.external_id {
        if ext.is_empty() || ext.len() > 256 || ext.chars().any(char::is_control) {
            return Err(ApiError::invalid(
                "external_id: must be 1-256 characters without control characters",
            ));
        }
    }
    if let Some(credits) = req.credits.filter(|c| *c > MAX_AMOUNT) {
        return Err(ApiError::invalid(format!(
            "credits: must be an integer from 0 to {MAX_AMOUNT} (2^63-1), got {credits}"
        )));
    }
    if let Some(day) = req.refill_day.filter(|d| !(1..=31).contains(d)) {
        return Err(ApiError::invalid(format!(
            "refill_day: must be 1-31, got {day}"
        )));
    }
    let monthly = tier
        .refill
        .is_some_and(|r| matches!(r.interval, crate::calendar::Interval::Monthly { .. }));
    if req.refill_day.is_some() && !monthly {
        return Err(ApiError::invalid(format!(
            "refill_day: tier '{}' has no monthly refill, so a refill day means nothing",
            tier.id
        )));
    }
    let now = gw.clock.now();
    if let Some(at) = req.expires_at.filter(|at| *at <= now) {
        return Err(ApiError::invalid(format!(
            "expires_at: {at} is not in the future (now is {now}); a key must be usable when made"
        )));
    }
    let key = keys::generate(&tier.key_prefix);
    let record = KeyRecord {
        external_id: req.external_id,
        name: req.name,
        meta: req.meta.unwrap_or_default(),
        enabled: req.enabled.unwrap_or(true),
        expires_at: req.expires_at,
        refill_day: req.refill_day,
        ..KeyRecord::new(keys::generate_id(), &key.hash, &key.start, &tier.id, now)
    };
    let mut usage = Usage::new(tier, req.credits, req.refill_day, now);
    gw.store.create(key.hash, &record, &usage).await?;
    tracing::info!(key_id = %record.key_id, tier = %record.tier, "key created");
    let mut answer = views::key_record(&config, &record, &mut usage, now);
    answer["key"] = Value::String(key.secret);
    Ok(answer)
}

async fn get_key(
    Authorized(gw): Authorized,
    Path(key_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let key = find(&gw, &key_id).await?;
    let config = gw.config();
    record_view(&gw, &config, &key)
        .await?
        .map(Json)
        .ok_or_else(ApiError::not_found)
}

async fn revoke_key(
    Authorized(gw): Authorized,
    Path(key_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if gw.store.revoke(&key_id).await? {
        tracing::info!(%key_id, "key revoked");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found())
    }
}

/// A key's record as the API shows it, its usage settled first; `None` if
/// the key was revoked meanwhile.
async fn record_view(gw: &Gateway, config: &Config, key: &Key) -> Result<Option<Value>, ApiError> {
    let now = gw.clock.read();
    Ok(gw
        .store
        .charge(key, |record, usage| {
            views::key_record(config, record, usage, now)
        })
        .await?)
}

async fn find(gw: &Gateway, key_id: &str) -> Result<Key, ApiError> {
    gw.store
        .find_id(key_id)
        .await?
        .ok_or_else(ApiError::not_found)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    external_id: Option<String>,
    limit: Option<usize>,
    cursor: Option<String>,
}

/// Most keys one page holds.
const MAX_PAGE: usize = 1000;
const DEFAULT_PAGE: usize = 100;

async fn list_keys(
    Authorized(gw): Authorized,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::invalid(e.body_text()))?;
    if let Some(cursor) = query.cursor.as_deref().filter(|c| !keys::is_key_id(c)) {
        return Err(ApiError::invalid(format!(
            "cursor: '{}' is not a cursor this API gave; pass the `cursor` of the previous page",
            cursor.chars().take(64).collect::<String>()
        )));
    }
    let limit = match query.limit {
        None => DEFAULT_PAGE,
        Some(n) if (1..=MAX_PAGE).contains(&n) => n,
        Some(n) => {
            return Err(ApiError::invalid(format!(
                "limit: must be 1-{MAX_PAGE}, got {n}"
            )))
        }
    };
    // One more than asked tells whether another page exists.
    let mut ids = gw
        .store
        .list_ids(
            query.external_id.as_deref(),
            query.cursor.as_deref(),
            limit + 1,
        )
        .await?;
    let more = ids.len() > limit;
    ids.truncate(limit);
    let config = gw.config();
    let mut keys = Vec::with_capacity(ids.len());
    for id in &ids {
        // A key revoked between the scan and here is simply left out.
        let Some(key) = gw.store.find_id(id).await? else {
            continue;
        };
        keys.extend(record_view(&gw, &config, &key).await?);
    }
    let cursor = if more { ids.last().cloned() } else { None };
    Ok(Json(json!({ "keys": keys, "cursor": cursor })))
}

/// `null` and absent differ: `Some(None)` clears a field.
fn nullable<'de, T, D>(de: D) -> Result<Option<Option<T>>, D::Error>
where
    T: Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    Option::<T>::deserialize(de).map(Some)
}

/// A time in a body: RFC 3339 in UTC or with an offset, within years
/// 1970–9998 (so that a refill or window computed from it never leaves the
/// calendar), with a message that says so.
fn time<'de, D: serde::Deserializer<'de>>(de: D) -> Result<Option<Timestamp>, D::Error> {
    let Some(text) = Option::<String>::deserialize(de)? else {
        return Ok(None);
    };
    let shown: String = text.chars().take(40).collect();
    let (earliest, latest) = (Timestamp::UNIX_EPOCH, time_limit());
    let out_of_range = || {
        serde::de::Error::custom(format!(
            "'{shown}' is out of range: from {earliest} to before {latest}"
        ))
    };
    let at: Timestamp = match text.parse() {
        Ok(at) => at,
        // Past what the calendar library holds (the end of year 9999).
        Err(_) if text.get(..4).and_then(|y| y.parse::<u32>().ok()) >= Some(9999) => {
            return Err(out_of_range())
        }
        Err(_) => {
            return Err(serde::de::Error::custom(format!(
                "'{shown}' is not a time: write RFC 3339, like 2027-01-31T00:00:00Z"
            )))
        }
    };
    if at < earliest || at >= latest {
        return Err(out_of_range());
    }
    Ok(Some(at))
}

/// The first instant a body may not name: 9999-01-01T00:00:00Z.
fn time_limit() -> Timestamp {
    jiff::civil::date(9999, 1, 1)
        .to_zoned(jiff::tz::TimeZone::UTC)
        .map_or(Timestamp::MAX, |z| z.timestamp())
}

/// [`time`] where `null` clears the field (`Some(None)`).
fn nullable_time<'de, D: serde::Deserializer<'de>>(
    de: D,
) -> Result<Option<Option<Timestamp>>, D::Error> {
    time(de).map(Some)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateKey {
    tier: Option<String>,
    credit_policy: Option<CreditPolicy>,
    #[serde(default, deserialize_with = "nullable")]
    name: Option<Option<String>>,
    meta: Option<Map<String, Value>>,
    enabled: Option<bool>,
    #[serde(default, deserialize_with = "nullable_time")]
    expires_at: Option<Option<Timestamp>>,
}

async fn update_key(
    Authorized(gw): Authorized,
    Path(key_id): Path<String>,
    JsonBody(req): JsonBody<UpdateKey>,
) -> Result<Json<Value>, ApiError> {
    let config = gw.config();
    let new_tier = match &req.tier {
        Some(t) => Some(
            config
                .tier(t)
                .ok_or_else(|| ApiError::invalid(format!("tier: unknown tier '{t}'")))?,
        ),
        None if req.credit_policy.is_some() => {
            return Err(ApiError::invalid(
                "credit_policy: applies only to a tier change",
            ))
        }
        None => None,
    };
    let policy = req.credit_policy.unwrap_or_default();
    let from = std::sync::OnceLock::new();
    let answer = write_key(&gw, &key_id, |config, record, usage| {
        let now = gw.clock.now();
        if let Some(new) = new_tier {
            let old = config.tier(&record.tier);
            if let Some(old) = old {
                usage.settle(old, record.refill_day, now);
            }
            usage.change_plan(old, new, policy, record.refill_day, now);
            let _ = from.set(record.tier.clone());
            record.tier = new.id.as_str().into();
        }
        if let Some(name) = &req.name {
            record.name = name.clone();
        }
        if let Some(meta) = &req.meta {
            record.meta = meta.clone();
        }
        if let Some(enabled) = req.enabled {
            record.enabled = enabled;
        }
        if let Some(expires_at) = req.expires_at {
            record.expires_at = expires_at;
        }
        Ok(())
    })
    .await?;
    if let (Some(new), Some(from)) = (new_tier, from.get()) {
        tracing::info!(%key_id, %from, to = %new.id, ?policy, "plan changed");
    }
    Ok(answer)
}

/// Changes a key durably (see [`crate::store::Store::update`]: `change`
/// may run more than once) and answers its record once the change is on
/// disk.
async fn write_key(
    gw: &Gateway,
    key_id: &str,
    change: impl Fn(&Config, &mut KeyRecord, &mut Usage) -> Result<(), ApiError>,
) -> Result<Json<Value>, ApiError> {
    let config = gw.config();
    let key = find(gw, key_id).await?;
    gw.store
        .update(&key, |record, usage| change(&config, record, usage))
        .await?;
    record_view(gw, &config, &key)
        .await?
        .map(Json)
        .ok_or_else(ApiError::not_found)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "lowercase")]
enum CreditOp {
    Add,
    Set,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangeCredits {
    op: CreditOp,
    amount: u64,
}

async fn change_credits(
    Authorized(gw): Authorized,
    Path(key_id): Path<String>,
    JsonBody(req): JsonBody<ChangeCredits>,
) -> Result<Json<Value>, ApiError> {
    if req.amount > MAX_AMOUNT {
        return Err(ApiError::invalid(format!(
            "amount: must be an integer from 0 to {MAX_AMOUNT} (2^63-1)"
        )));
    }
    let answer = write_key(&gw, &key_id, |config, record, usage| {
        let tier = config
            .tier(&record.tier)
            .filter(|t| t.credits != Credits::Unlimited)
            .ok_or_else(|| {
                ApiError::invalid("amount: this key's plan has unlimited (or no) credits")
            })?;
        usage.settle(tier, record.refill_day, gw.clock.now());
        let remaining = usage.remaining.unwrap_or(0);
        usage.remaining = Some(match req.op {
            CreditOp::Add => remaining
                .checked_add(req.amount)
                .filter(|n| *n <= MAX_AMOUNT)
                .ok_or_else(|| {
                    ApiError::invalid(format!(
                        "amount: {remaining} + {} would pass the largest balance, {MAX_AMOUNT} (2^63-1)",
                        req.amount
                    ))
                })?,
            CreditOp::Set => req.amount,
        });
        Ok(())
    })
    .await?;
    tracing::info!(%key_id, op = ?req.op, amount = req.amount, "credits changed");
    Ok(answer)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Verify {
    key: String,
    feature: Option<String>,
    cost: Option<u64>,
    #[serde(default)]
    pools: Map<String, Value>,
}

/// Decides and charges exactly as a proxied request would, without
/// proxying. Refusals are `200 {"valid": false, "code": ...}`.
async fn verify(
    Authorized(gw): Authorized,
    JsonBody(req): JsonBody<Verify>,
) -> Result<Json<Value>, ApiError> {
    let config = gw.config();
    let mut pools = Vec::with_capacity(req.pools.len());
    for (name, units) in &req.pools {
        // A pool the config does not know would be counted for good and
        // named in metrics: one caller could grow both without bound.
        if !config.knows_pool(name) {
            return Err(ApiError::invalid(format!(
                "pools.{name}: no tier or route in the config defines this pool"
            )));
        }
        let units = units.as_u64().filter(|n| *n <= MAX_AMOUNT).ok_or_else(|| {
            ApiError::invalid(format!(
                "pools.{name}: must be an integer from 0 to {MAX_AMOUNT} (2^63-1)"
            ))
        })?;
        pools.push((Arc::from(name.as_str()), units));
    }
    let cost = req.cost.unwrap_or(1);
    if cost > MAX_AMOUNT {
        return Err(ApiError::invalid(format!(
            "cost: must be an integer from 0 to {MAX_AMOUNT} (2^63-1)"
        )));
    }
    let demand = Demand {
        feature: req.feature.as_deref().map(Arc::from),
        amounts: Ok(Amounts { cost, pools }),
    };
    let outcome = async {
        let key = gw.authenticate(&req.key).await?;
        if !gw.store.healthy() {
            return Err(Rejection::StoreUnavailable);
        }
        let now = gw.clock.read();
        let decided = gw
            .store
            .charge(&key, |record, usage| {
                let ids = (record.key_id.clone(), record.external_id.clone());
                gate::admit(&config, record, usage, &demand, now).map(|admission| (admission, ids))
            })
            .await;
        charged(decided)?
    }
    .await;
    if let Ok((admission, _)) = &outcome {
        gw.metrics.record_charge(&config, admission);
    }
    Ok(Json(match outcome {
        Ok((admission, (key_id, external_id))) => {
            let tier = config.tier_at(admission.tier);
            json!({
                "valid": true,
                "code": null,
                "key_id": key_id,
                "external_id": external_id,
                "tier": tier.map(|t| t.id.as_str()),
                "remaining": admission.remaining,
                "charged": { "credits": admission.charge.credits, "overage": admission.charge.overage },
                "rate_limits": admission.rates.iter().filter_map(|r| {
                    let (name, _) = tier?.rate_limits.get_index(r.index)?;
                    Some((name.clone(), json!({
                        "limit": r.limit, "remaining": r.remaining, "reset": r.reset,
                    })))
                }).collect::<Map<String, Value>>(),
            })
        }
        Err(rejection) => {
            let mut body = rejection.body();
            body["valid"] = Value::Bool(false);
            body
        }
    }))
}

/// Parked events one listing shows per sink.
const MAX_PARKED: usize = 1000;

/// What each sink's outbox holds: pending count, oldest pending age, and
/// the parked events with why.
async fn outbox_view(gw: &Gateway) -> Result<Value, ApiError> {
    let now = gw.clock.now().as_millisecond();
    let mut sinks = Map::new();
    for sink in [crate::report::WEBHOOK, crate::report::STRIPE] {
        let stats = gw.store.outbox_stats(sink).await?;
        let parked: Vec<Value> = gw
            .store
            .outbox_parked(sink, MAX_PARKED)
            .await?
            .into_iter()
            .map(|(id, reason, event)| {
                let event = serde_json::from_str(&event).unwrap_or(Value::Null);
                json!({ "id": id, "reason": reason, "event": event })
            })
            .collect();
        let age = stats
            .oldest_ms
            .map_or(0.0, |t| (now - t).max(0) as f64 / 1000.0);
        sinks.insert(
            sink.to_string(),
            json!({ "pending": stats.pending, "oldest_age_seconds": age, "parked_count": stats.parked, "parked": parked }),
        );
    }
    Ok(json!({ "sinks": sinks }))
}

async fn outbox(Authorized(gw): Authorized) -> Result<Json<Value>, ApiError> {
    outbox_view(&gw).await.map(Json)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryParked {
    ids: Option<Vec<String>>,
    #[serde(default)]
    all: bool,
}

/// Parked events (the ids given, or all) go back in the queue.
async fn retry_outbox(
    Authorized(gw): Authorized,
    JsonBody(req): JsonBody<RetryParked>,
) -> Result<Json<Value>, ApiError> {
    let ids = match (req.ids, req.all) {
        (None, true) => None,
        (Some(ids), false) if !ids.is_empty() => Some(ids),
        _ => {
            return Err(ApiError::invalid(
                "give either ids (a non-empty list of parked event ids) or all: true",
            ))
        }
    };
    gw.store.outbox_unpark(ids).await?;
    tracing::info!("parked events put back in the outbox");
    outbox_view(&gw).await.map(Json)
}

/// Liveness, and whether the store can record charges (with Redis: whether
/// Redis answers). Always 200: a gateway whose store is down still serves
/// public routes, and with `on_error: allow` keyed ones too.
async fn healthz(State(gw): State<Arc<Gateway>>) -> Json<Value> {
    let store = if gw.store.healthy() {
        "ok"
    } else {
        "unavailable"
    };
    Json(json!({ "status": "ok", "store": store }))
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: "METHOD_NOT_ALLOWED",
        message: "this admin endpoint does not take this method (see the Allow header)".into(),
    }
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: "NOT_FOUND",
        message: "no such admin endpoint".into(),
    }
}

/// Declares every admin route once: the router is built from this table,
/// and [`ROUTES`] lists it for the OpenAPI check.
macro_rules! admin_routes {
    ($($method:ident $path:literal => $handler:expr;)*) => {
        /// Every `(method, path)` the admin API answers.
        pub const ROUTES: &[(&str, &str)] = &[$((stringify!($method), $path)),*];

        fn routes(router: Router<Arc<Gateway>>) -> Router<Arc<Gateway>> {
            router$(.route($path, axum::routing::$method($handler)))*
        }
    };
}

admin_routes! {
    get "/healthz" => healthz;
    post "/v1/keys" => create_key;
    get "/v1/keys" => list_keys;
    get "/v1/keys/{key_id}" => get_key;
    patch "/v1/keys/{key_id}" => update_key;
    delete "/v1/keys/{key_id}" => revoke_key;
    post "/v1/keys/{key_id}/credits" => change_credits;
    post "/v1/verify" => verify;
    get "/v1/outbox" => outbox;
    post "/v1/outbox/retry" => retry_outbox;
}

/// The admin API's routes.
pub fn router(gateway: Arc<Gateway>) -> Router {
    routes(Router::new())
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .with_state(gateway)
}
