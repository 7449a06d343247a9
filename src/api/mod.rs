//! The HTTP API (DESIGN §5). For now: `GET /healthz`, which checks the process's own
//! connections to Postgres and NATS.
//!
//! `run` takes an already-bound listener and a shutdown token, so tests bind port 0.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
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
    /// NATS, for health and (later) the event stream.
    pub nats: async_nats::Client,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
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
