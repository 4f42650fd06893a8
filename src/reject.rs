//! Why a request was not forwarded, and the one mapping from that to a
//! status code, a JSON body and headers (SPEC §3).

use jiff::Timestamp;
use serde_json::{json, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// No key; `scheme` names the `Authorization` scheme sent instead of
    /// `Bearer`, if any (the scheme only, never the credentials).
    MissingKey {
        scheme: Option<String>,
    },
    InvalidKey,
    Expired {
        expired_at: Timestamp,
    },
    Disabled,
    TierNotFound {
        tier: String,
    },
    FeatureNotAvailable {
        required: String,
        current_tier: String,
        upgrade_url: Option<String>,
    },
    RateLimited {
        limit: String,
        retry_after: u64,
    },
    QuotaExceeded {
        pool: String,
        /// What the request needs of the pool, for the message.
        units: u64,
        remaining: u64,
        resets_at: Option<Timestamp>,
    },
    UsageExceeded {
        /// What the request costs, for the message.
        cost: u64,
        remaining: u64,
        resets_at: Option<Timestamp>,
        upgrade_url: Option<String>,
    },
    BadRequest {
        message: String,
    },
    RouteNotFound,
    /// Routes have this path, none this method; `allow` lists theirs.
    MethodNotAllowed {
        allow: String,
    },
    UpstreamUnavailable,
    StoreUnavailable,
}

impl Rejection {
    pub fn bad_request(message: impl Into<String>) -> Rejection {
        Rejection::BadRequest {
            message: message.into(),
        }
    }

    pub fn status(&self) -> u16 {
        match self {
            Rejection::MissingKey { .. } | Rejection::InvalidKey | Rejection::Expired { .. } => 401,
            Rejection::Disabled
            | Rejection::TierNotFound { .. }
            | Rejection::FeatureNotAvailable { .. } => 403,
            Rejection::RateLimited { .. } => 429,
            Rejection::QuotaExceeded { .. } | Rejection::UsageExceeded { .. } => 402,
            Rejection::BadRequest { .. } => 400,
            Rejection::RouteNotFound => 404,
            Rejection::MethodNotAllowed { .. } => 405,
            Rejection::UpstreamUnavailable => 502,
            Rejection::StoreUnavailable => 503,
        }
    }

    /// The `code` field, also the `code` label of request metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::MissingKey { .. } => "MISSING_KEY",
            Rejection::InvalidKey => "INVALID_KEY",
            Rejection::Expired { .. } => "EXPIRED",
            Rejection::Disabled => "DISABLED",
            Rejection::TierNotFound { .. } => "TIER_NOT_FOUND",
            Rejection::FeatureNotAvailable { .. } => "FEATURE_NOT_AVAILABLE",
            Rejection::RateLimited { .. } => "RATE_LIMITED",
            Rejection::QuotaExceeded { .. } => "QUOTA_EXCEEDED",
            Rejection::UsageExceeded { .. } => "USAGE_EXCEEDED",
            Rejection::BadRequest { .. } => "BAD_REQUEST",
            Rejection::RouteNotFound => "ROUTE_NOT_FOUND",
            Rejection::MethodNotAllowed { .. } => "METHOD_NOT_ALLOWED",
            Rejection::UpstreamUnavailable => "UPSTREAM_UNAVAILABLE",
            Rejection::StoreUnavailable => "STORE_UNAVAILABLE",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Rejection::MissingKey { scheme: None } => {
                "no API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'".into()
            }
            Rejection::MissingKey {
                scheme: Some(scheme),
            } => format!(
                "the Authorization header uses the '{scheme}' scheme, which carries no API key \
                 here: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
            ),
            Rejection::InvalidKey => "the API key is not valid".into(),
            Rejection::Expired { .. } => "the API key has expired".into(),
            Rejection::Disabled => "the API key is disabled".into(),
            Rejection::TierNotFound { tier } => {
                format!("the key's plan '{tier}' no longer exists")
            }
            Rejection::FeatureNotAvailable { required, .. } => {
                format!("this endpoint needs the '{required}' feature, which your plan lacks")
            }
            Rejection::RateLimited { limit, .. } => {
                format!("rate limit '{limit}' exceeded; retry later")
            }
            Rejection::QuotaExceeded {
                pool,
                units,
                remaining,
                ..
            } => {
                format!("this request needs {units} of the '{pool}' quota and {remaining} are left")
            }
            Rejection::UsageExceeded {
                cost, remaining: 0, ..
            } => format!("this request costs {cost} credits and the key has none left"),
            Rejection::UsageExceeded {
                cost, remaining, ..
            } => format!("this request costs {cost} credits and the key has {remaining} left"),
            Rejection::BadRequest { message } => message.clone(),
            Rejection::RouteNotFound => "no route matches this request".into(),
            Rejection::MethodNotAllowed { allow } if allow.is_empty() => {
                "tollgate does not take this method on any path".into()
            }
            Rejection::MethodNotAllowed { allow } => {
                format!("this path does not take this method; it takes {allow}")
            }
            Rejection::UpstreamUnavailable => {
                "the upstream service did not answer; nothing was charged".into()
            }
            Rejection::StoreUnavailable => {
                "the gateway cannot record usage right now; retry later".into()
            }
        }
    }

    /// The JSON body: `code`, `message` and the context fields of SPEC §3.
    pub fn body(&self) -> Value {
        let mut body = json!({ "code": self.code(), "message": self.message() });
        let context = match self {
            Rejection::Expired { expired_at } => json!({ "expired_at": expired_at }),
            Rejection::TierNotFound { tier } => json!({ "tier": tier }),
            Rejection::FeatureNotAvailable {
                required,
                current_tier,
                upgrade_url,
            } => json!({
                "required": required,
                "current_tier": current_tier,
                "upgrade_url": upgrade_url,
            }),
            Rejection::RateLimited { limit, retry_after } => {
                json!({ "limit": limit, "retry_after": retry_after })
            }
            Rejection::QuotaExceeded {
                pool,
                remaining,
                resets_at,
                ..
            } => json!({ "pool": pool, "remaining": remaining, "resets_at": resets_at }),
            Rejection::UsageExceeded {
                remaining,
                resets_at,
                upgrade_url,
                ..
            } => json!({
                "remaining": remaining,
                "resets_at": resets_at,
                "upgrade_url": upgrade_url,
            }),
            _ => Value::Null,
        };
        if let (Value::Object(body), Value::Object(context)) = (&mut body, context) {
            body.extend(context);
        }
        body
    }

    /// Extra response headers.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        match self {
            Rejection::MissingKey { .. } => vec![("WWW-Authenticate", "Bearer".into())],
            Rejection::InvalidKey | Rejection::Expired { .. } => {
                vec![("WWW-Authenticate", "Bearer error=\"invalid_token\"".into())]
            }
            Rejection::RateLimited { retry_after, .. } => {
                vec![("Retry-After", retry_after.to_string())]
            }
            Rejection::MethodNotAllowed { allow } => vec![("Allow", allow.clone())],
            _ => Vec::new(),
        }
    }
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code(), self.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_carries_code_message_and_context() {
        let r = Rejection::RateLimited {
            limit: "requests".into(),
            retry_after: 7,
        };
        assert_eq!(r.status(), 429);
        let body = r.body();
        assert_eq!(body["code"], "RATE_LIMITED");
        assert_eq!(body["limit"], "requests");
        assert_eq!(body["retry_after"], 7);
        assert_eq!(r.headers(), vec![("Retry-After", "7".to_string())]);
    }
}
