//! The HTTP API (DESIGN §5): `GET /healthz` (the process's own connections to Postgres and
//! NATS), `GET /metrics` (Prometheus text), `GET /v1/apps`, `/v1/apps/{name}`,
//! `/v1/deployments/{id}`, `/v1/nodes`, `/v1/events` (server-sent events; `?follow` keeps
//! the stream open with live events from NATS), `POST /v1/apps/{name}/redeploy` (bearer
//! token) and `POST /v1/hooks/git` (a signed push wakes the watcher).
//!
//! Errors are JSON `{"error": ...}`; server errors are logged and answered without detail.
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

pub mod views;

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
        .route("/v1/apps", get(list_apps))
        .route("/v1/apps/{name}", get(show_app))
        .route("/v1/apps/{name}/redeploy", axum::routing::post(redeploy))
        .route("/v1/deployments/{id}", get(show_deployment))
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/events", get(events))
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

/// An API error: the status and a message for the caller (server errors say nothing more).
enum ApiError {
    NotFound(String),
    Unauthorized,
    Conflict(String),
    Internal(anyhow::Error),
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError::Internal(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> axum::response::Response {
        let (status, message) = match self {
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, m),
            ApiError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "this call needs `Authorization: Bearer <BERTH_API_TOKEN>`".to_string(),
            ),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, m),
            ApiError::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "api request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error".to_string(),
                )
            }
        };
        (status, Json(json!({ "error": message }))).into_response()
    }
}

type ApiResult = Result<Json<serde_json::Value>, ApiError>;

async fn list_apps(State(state): State<Arc<ApiState>>) -> ApiResult {
    Ok(Json(views::apps(&state.pool).await?))
}

async fn show_app(
    State(state): State<Arc<ApiState>>,
    axum::extract::Path(name): axum::extract::Path<String>,
) -> ApiResult {
    views::app(&state.pool, &name)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no app named `{name}`")))
}

async fn show_deployment(
    State(state): State<Arc<ApiState>>,
    axum::extract::Path(id): axum::extract::Path<i64>,
) -> ApiResult {
    views::deployment(&state.pool, id, 10_000)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("no deployment {id}")))
}

async fn list_nodes(State(state): State<Arc<ApiState>>) -> ApiResult {
    Ok(Json(views::nodes(&state.pool).await?))
}

async fn redeploy(
    State(state): State<Arc<ApiState>>,
    axum::extract::Path(name): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    if !state
        .api_token
        .as_deref()
        .is_some_and(|token| bearer_ok(token, &headers))
    {
        return Err(ApiError::Unauthorized);
    }
    match views::redeploy(&state.pool, &name).await? {
        None => Err(ApiError::NotFound(format!(
            "no app named `{name}` with a valid spec"
        ))),
        Some(Err(conflict)) => Err(ApiError::Conflict(conflict)),
        Some(Ok(id)) => Ok((StatusCode::ACCEPTED, Json(json!({"deployment_id": id})))),
    }
}

#[derive(serde::Deserialize)]
struct EventsQuery {
    /// Present (any value): keep the stream open with live events.
    follow: Option<String>,
    /// How many past events to send first.
    last: Option<i64>,
}

/// `GET /v1/events`: the last events of the history, then (with `?follow`) live ones as
/// they reach NATS, as server-sent events (`event: <table>.<op>`, `data: <payload>`).
async fn events(
    State(state): State<Arc<ApiState>>,
    axum::extract::Query(query): axum::extract::Query<EventsQuery>,
) -> Result<impl IntoResponse, ApiError> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use futures_util::StreamExt;
    // Subscribed before reading the history, so nothing falls between the two.
    let live = match query.follow {
        Some(_) => Some(
            state
                .nats
                .subscribe("*.*")
                .await
                .map_err(|e| ApiError::Internal(e.into()))?,
        ),
        None => None,
    };
    let past =
        views::recent_events(&state.pool, query.last.unwrap_or(100).clamp(0, 10_000)).await?;
    let last_id = past
        .last()
        .and_then(|e| e["event_id"].as_i64())
        .unwrap_or(0);
    let to_event = |v: &serde_json::Value| {
        Event::default()
            .event(format!(
                "{}.{}",
                v["table"].as_str().unwrap_or("?"),
                v["op"].as_str().unwrap_or("?")
            ))
            .data(v.to_string())
    };
    let history: Vec<Result<Event, std::convert::Infallible>> =
        past.iter().map(|v| Ok(to_event(v))).collect();
    let live = futures_util::stream::iter(live)
        .flatten()
        .filter_map(move |msg| {
            let parsed: Option<crate::events::EventPayload> =
                serde_json::from_slice(&msg.payload).ok();
            let event = parsed
                .filter(|p| p.event_id > last_id)
                .and_then(|p| serde_json::to_value(p).ok())
                .map(|v| Ok(to_event(&v)));
            async move { event }
        });
    Ok(Sse::new(futures_util::stream::iter(history).chain(live)).keep_alive(KeepAlive::default()))
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
