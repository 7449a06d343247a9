//! The HTTP API (DESIGN §5). For now: `GET /healthz` (the process's own connections to
//! Postgres and NATS), `GET /metrics` (Prometheus text) and `POST /v1/hooks/git` (a signed
//! push wakes the watcher).
//!
//! `run` takes an already-bound listener and a shutdown token, so tests bind port 0.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the handlers need.
#[derive(Clone)]
pub struct ApiState {
    /// Postgres, read for every answer (the API is not on the request path of apps).
    pub pool: PgPool,
    /// NATS, for health, webhook wake-ups and (later) the event stream.
    pub nats: async_nats::Client,
    /// The metrics of the components in this process, served at `/metrics`.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Required (as a bearer token) by mutating calls; without it they are refused.
    pub api_token: Option<String>,
    /// HMAC-SHA256 key of Git webhooks (GitHub and Gitea signature headers).
    pub webhook_secret: Option<String>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/hooks/git", axum::routing::post(git_hook))
        .with_state(Arc::new(state))
}

/// Serves until `shutdown` is cancelled, then finishes in-flight requests.
pub async fn run(
    listener: TcpListener,
    state: ApiState,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(api.addr = %addr, "api listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}

async fn metrics(State(state): State<Arc<ApiState>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
}

async fn healthz(State(state): State<Arc<ApiState>>) -> impl IntoResponse {
    let db = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query_scalar::<_, i32>("select 1").fetch_one(&state.pool),
    )
    .await;
    let database = match db {
        Ok(Ok(_)) => "ok".to_string(),
        Ok(Err(e)) => format!("error: {e}"),
        Err(_) => "error: timed out".to_string(),
    };
    let nats = match state.nats.connection_state() {
        async_nats::connection::State::Connected => "ok".to_string(),
        other => format!("error: {other}"),
    };
    let healthy = database == "ok" && nats == "ok";
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(
            json!({"status": if healthy { "ok" } else { "unavailable" }, "database": database, "nats": nats}),
        ),
    )
}

/// `POST /v1/hooks/git`: a push happened. Authenticated by an HMAC-SHA256 signature of the
/// body (`X-Hub-Signature-256: sha256=<hex>` from GitHub, `X-Gitea-Signature: <hex>` from
/// Gitea) or by the API token. Nothing in the payload is trusted: it only wakes the watcher,
/// which fetches and applies whatever the branch holds.
async fn git_hook(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let by_signature = state
        .webhook_secret
        .as_deref()
        .is_some_and(|secret| webhook_signature_ok(secret, &headers, &body));
    let by_token = state
        .api_token
        .as_deref()
        .is_some_and(|token| bearer_ok(token, &headers));
    if !(by_signature || by_token) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "missing or wrong webhook signature"})),
        );
    }
    if let Err(e) = state
        .nats
        .publish(crate::watcher::GIT_HOOK_SUBJECT, Bytes::new())
        .await
    {
        tracing::error!(error = %e, "cannot wake the watcher");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": "cannot reach the watcher"})),
        );
    }
    (
        StatusCode::ACCEPTED,
        Json(json!({"status": "fetch requested"})),
    )
}

/// Checks a GitHub or Gitea HMAC-SHA256 signature header, in constant time.
pub fn webhook_signature_ok(secret: &str, headers: &HeaderMap, body: &[u8]) -> bool {
    use hmac::{Hmac, Mac};
    let header = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("sha256="))
        .or_else(|| {
            headers
                .get("x-gitea-signature")
                .and_then(|v| v.to_str().ok())
        });
    let Some(hex) = header else { return false };
    let Some(expected) = decode_hex(hex.trim()) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

fn bearer_ok(token: &str, headers: &HeaderMap) -> bool {
    let Some(given) = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    // Compare digests so the time taken says nothing about the token.
    use sha2::Digest;
    sha2::Sha256::digest(given.as_bytes()) == sha2::Sha256::digest(token.as_bytes())
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
