//! The listener: every committed outbox row reaches JetStream, none lost, none twice.
//!
//! One listener leads (advisory lock). It waits on `LISTEN berth_events` (with a fallback
//! poll, since a notification can be missed while reconnecting), then drains the outbox:
//! unpublished rows in id order, a batch at a time, each published with `Nats-Msg-Id` =
//! event id and all of a batch in flight at once, then marked published in one statement.
//!
//! Invariants:
//! - a row is marked published only after JetStream acknowledged it, so a crash, a NATS
//!   outage or a Postgres restart at any point leaves it unpublished and it is sent again;
//! - a row sent twice (crash between ack and mark) carries the same `Nats-Msg-Id`, and
//!   JetStream drops the repeat within the stream's dedup window;
//! - reading `published_at is null` in id order (never a high-water mark) keeps rows whose
//!   ids were assigned earlier but committed later.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use chrono::{DateTime, Utc};
use futures_util::stream::{FuturesOrdered, StreamExt};
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;

use crate::events::{EventPayload, NOTIFY_CHANNEL};
use crate::metrics::{Counter, Histogram, Metrics};

/// What the listener needs.
#[derive(Clone)]
pub struct ListenerDeps {
    pub pool: PgPool,
    /// For LISTEN and the leadership connection.
    pub database_url: String,
    pub nats: async_nats::Client,
    pub metrics: Arc<Metrics>,
    pub options: ListenerOptions,
}

#[derive(Debug, Clone)]
pub struct ListenerOptions {
    /// Rows read and published per round trip.
    pub batch: i64,
    /// How often the outbox is read without a notification.
    pub poll: Duration,
    /// How long published rows stay as history.
    pub retention: Duration,
}

impl Default for ListenerOptions {
    fn default() -> Self {
        ListenerOptions {
            batch: 2000,
            poll: Duration::from_secs(1),
            retention: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

struct Meters {
    published: Arc<Counter>,
    lag: Arc<Histogram>,
}

pub async fn run(deps: ListenerDeps, shutdown: CancellationToken) -> anyhow::Result<()> {
    let meters = Meters {
        published: deps.metrics.counter(
            "berth_events_published_total",
            "Outbox events published to JetStream.",
            &[],
        ),
        lag: deps.metrics.histogram(
            "berth_event_publish_lag_seconds",
            "Time from a change to its event acknowledged by JetStream.",
            &[],
        ),
    };
    loop {
        let Some(lead) = crate::leader::acquire(
            &deps.database_url,
            crate::leader::LISTENER_LOCK,
            "listener",
            &shutdown,
        )
        .await
        else {
            return Ok(());
        };
        let stop = lead.lost.child_token();
        let mut failures = 0u32;
        loop {
            let session = publish_while_leading(&deps, &meters, &stop, &shutdown);
            match session.await {
                Ok(()) => break,
                Err(e) => {
                    failures += 1;
                    let delay = crate::events::controller::backoff(
                        failures.min(8),
                        Duration::from_millis(100),
                        Duration::from_secs(5),
                    );
                    tracing::warn!(error = format!("{e:#}"), retry_in = ?delay, "listener: publishing failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        if shutdown.is_cancelled() {
            return Ok(());
        }
        tracing::warn!("listener lost leadership; standing by");
    }
}

/// Drains and waits until leadership is lost or shutdown (Ok), or an error (Err).
async fn publish_while_leading(
    deps: &ListenerDeps,
    meters: &Meters,
    stop: &CancellationToken,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let js = jetstream::new(deps.nats.clone());
    let mut listener = PgListener::connect(&deps.database_url)
        .await
        .context("connecting the LISTEN session")?;
    listener.listen(NOTIFY_CHANNEL).await?;
    let mut last_cleanup = std::time::Instant::now() - Duration::from_secs(3600);
    loop {
        // Drain everything visible; a full batch means there may be more.
        loop {
            if stop.is_cancelled() || shutdown.is_cancelled() {
                return Ok(());
            }
            let n = publish_batch(&deps.pool, &js, deps.options.batch, meters).await?;
            if n < deps.options.batch as usize {
                break;
            }
        }
        if last_cleanup.elapsed() > Duration::from_secs(60) {
            remove_history(&deps.pool, deps.options.retention).await?;
            last_cleanup = std::time::Instant::now();
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = stop.cancelled() => return Ok(()),
            n = listener.recv() => { n.context("LISTEN session")?; }
            _ = tokio::time::sleep(deps.options.poll) => {}
        }
    }
}

/// Publishes one batch; returns how many rows it held.
async fn publish_batch(
    pool: &PgPool,
    js: &jetstream::Context,
    batch: i64,
    meters: &Meters,
) -> anyhow::Result<usize> {
    let rows = sqlx::query(
        "select id, table_name, op, row_id, app_id, deployment_id, node_id, created_at
         from events where published_at is null order by id limit $1",
    )
    .bind(batch)
    .fetch_all(pool)
    .await
    .context("reading the outbox")?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut ids = Vec::with_capacity(rows.len());
    let mut times: Vec<DateTime<Utc>> = Vec::with_capacity(rows.len());
    let mut acks = FuturesOrdered::new();
    for r in &rows {
        let event = EventPayload {
            event_id: r.get("id"),
            table: r.get("table_name"),
            op: r.get("op"),
            id: r.get("row_id"),
            app_id: r.get("app_id"),
            deployment_id: r.get("deployment_id"),
            node_id: r.get("node_id"),
            at: r.get("created_at"),
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", event.event_id.to_string().as_str());
        let body = serde_json::to_vec(&event)?;
        // Sending does not wait for the ack: the whole batch is in flight at once.
        let ack = js
            .publish_with_headers(event.subject(), headers, body.into())
            .await
            .with_context(|| format!("publishing event {}", event.event_id))?;
        acks.push_back(std::future::IntoFuture::into_future(ack));
        ids.push(event.event_id);
        times.push(event.at);
    }
    while let Some(ack) = acks.next().await {
        ack.context("JetStream did not acknowledge an event")?;
    }
    sqlx::query("update events set published_at = now() where id = any($1)")
        .bind(&ids)
        .execute(pool)
        .await
        .context("marking events published")?;
    let now = Utc::now();
    meters.published.inc_by(ids.len() as u64);
    for at in times {
        meters.lag.observe((now - at).to_std().unwrap_or_default());
    }
    Ok(ids.len())
}

/// Removes published rows older than the retention, a bounded batch at a time.
async fn remove_history(pool: &PgPool, retention: Duration) -> anyhow::Result<()> {
    let cutoff =
        Utc::now() - chrono::Duration::from_std(retention).unwrap_or(chrono::Duration::days(7));
    loop {
        let removed = sqlx::query(
            "delete from events where id in
                 (select id from events where published_at is not null and published_at < $1 limit 10000)",
        )
        .bind(cutoff)
        .execute(pool)
        .await
        .context("removing old events")?
        .rows_affected();
        if removed < 10000 {
            return Ok(());
        }
    }
}
