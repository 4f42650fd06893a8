//! The admin API (SPEC §4) on its own listener, with axum.
//!
//! Every call but `/healthz` needs `Authorization: Bearer <root key>`,
//! compared in constant time. Bodies are read with a size cap and parsed
//! strictly (unknown fields are errors) so that a mistake gets a 400 naming
//! the field. Every write is on disk before it is answered.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use jiff::Timestamp;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use subtle::ConstantTimeEq;

use crate::config::Credits;
use crate::gateway::Gateway;
use crate::keys;
use crate::ledger::{KeyRecord, Usage};
use crate::store::{hash_to_hex, StoreError};
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
        tracing::error!(error = %e, "admin store operation failed");
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "STORE_UNAVAILABLE",
            message: "the store could not complete the operation; nothing was changed".into(),
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
    let mut de = serde_json::Deserializer::from_slice(&body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            ApiError::invalid(e.into_inner().to_string())
        } else {
            ApiError::invalid(format!("{path}: {}", e.into_inner()))
        }
    })?;
    de.end()
        .map_err(|e| ApiError::invalid(format!("trailing data after the JSON body: {e}")))?;
    Ok(value)
}

fn authorize(gateway: &Gateway, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(root) = gateway.root_key.as_deref() else {
        return Err(ApiError::unauthorized());
    };
    let presented = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(presented.as_bytes().ct_eq(root.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
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
    pub expires_at: Option<Timestamp>,
    pub enabled: Option<bool>,
}

async fn create_key(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    authorize(&gw, &headers)?;
    let req: CreateKey = parse_body(body).await?;
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
    if let Some(day) = req.refill_day.filter(|d| !(1..=31).contains(d)) {
        return Err(ApiError::invalid(format!(
            "refill_day: must be 1-31, got {day}"
        )));
    }
    let now = gw.clock.now();
    let key = keys::generate(&tier.key_prefix);
    let record = KeyRecord {
        key_id: keys::generate_id(),
        hash: hash_to_hex(&key.hash),
        start: key.start,
        tier: tier.id.clone(),
        external_id: req.external_id,
        name: req.name,
        meta: req.meta.unwrap_or_default(),
        enabled: req.enabled.unwrap_or(true),
        expires_at: req.expires_at,
        created_at: now,
        refill_day: req.refill_day,
    };
    let mut usage = Usage::new(tier, req.credits, req.refill_day, now);
    gw.store.create(key.hash, &record, &usage).await?;
    tracing::info!(key_id = %record.key_id, tier = %record.tier, "key created");
    let mut answer = views::key_record(&config, &record, &mut usage, now);
    answer["key"] = Value::String(key.secret);
    Ok(answer)
}

async fn get_key(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(key_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    authorize(&gw, &headers)?;
    let entry = gw
        .store
        .lookup_id(&key_id)?
        .ok_or_else(ApiError::not_found)?;
    let config = gw.config();
    let now = gw.clock.now();
    let view = {
        let mut state = entry.lock().ok_or_else(ApiError::not_found)?;
        let state = &mut *state;
        views::key_record(&config, &state.record, &mut state.usage, now)
    };
    gw.store.touch(&entry);
    Ok(Json(view))
}

async fn revoke_key(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Path(key_id): Path<String>,
) -> Result<StatusCode, ApiError> {
    authorize(&gw, &headers)?;
    if gw.store.revoke(&key_id).await? {
        tracing::info!(%key_id, "key revoked");
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found())
    }
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: "NOT_FOUND",
        message: "no such admin endpoint".into(),
    }
}

/// The admin API's routes.
pub fn router(gateway: Arc<Gateway>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/v1/keys", post(create_key))
        .route("/v1/keys/{key_id}", get(get_key).delete(revoke_key))
        .fallback(not_found)
        .with_state(gateway)
}
