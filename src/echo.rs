//! A small built-in upstream that answers every request with JSON saying
//! what it received: what `tollgate demo` and the load benchmark put behind
//! the gateway.

use std::net::SocketAddr;

use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

async fn echo(req: Request) -> Response {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let mut resp = Json(json!({
        "echo": true,
        "method": req.method().as_str(),
        "path": req.uri().path_and_query().map_or("/", |p| p.as_str()),
        "key_id": header("x-tollgate-key-id"),
        "tier": header("x-tollgate-tier"),
    }))
    .into_response();
    // Lets a demo show metering: the client says how many tokens the
    // upstream should report having used.
    if let Some(tokens) = header("x-demo-usage-tokens").and_then(|t| t.parse().ok()) {
        resp.headers_mut().insert("x-usage-tokens", tokens);
    }
    resp
}

/// Serves the echo upstream on `listener` until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let app = axum::Router::new().fallback(echo);
    axum::serve(listener, app).await
}

/// Binds `addr` and serves the echo upstream on it, forever.
pub async fn run(addr: SocketAddr) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "echo upstream listening");
    serve(listener).await
}
