//! The event backbone's names: the JetStream stream, its subjects and payload (DESIGN §3).
//!
//! Events are hints: they carry identifiers for routing, never state. Every consumer re-reads
//! Postgres, so a lost or repeated event only costs latency.

pub mod controller;
pub mod queue;

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use serde::{Deserialize, Serialize};

/// The one stream all table changes go to.
pub const STREAM: &str = "BERTH_EVENTS";

/// Tables that emit events, by their subject prefix (`<table>.<op>`).
pub const TABLES: [&str; 7] = [
    "app",
    "deployment",
    "image_build",
    "instance",
    "deployment_instance",
    "domain",
    "node",
];

/// The subjects of the stream: `app.*`, `deployment.*`, ...
pub fn stream_subjects() -> Vec<String> {
    TABLES.iter().map(|t| format!("{t}.*")).collect()
}

/// The Postgres NOTIFY channel the outbox triggers signal.
pub const NOTIFY_CHANNEL: &str = "berth_events";

/// How long JetStream drops a repeated `Nats-Msg-Id`.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(120);

/// The message body of one event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventPayload {
    pub event_id: i64,
    pub table: String,
    pub op: String,
    pub id: i64,
    pub app_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_id: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<i64>,
    pub at: chrono::DateTime<chrono::Utc>,
}

impl EventPayload {
    pub fn subject(&self) -> String {
        format!("{}.{}", self.table, self.op)
    }
}

/// Creates the stream, or brings an existing one's subjects and limits up to date.
pub async fn ensure_stream(js: &jetstream::Context) -> anyhow::Result<stream::Stream> {
    let config = stream::Config {
        name: STREAM.to_string(),
        subjects: stream_subjects(),
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        max_age: Duration::from_secs(7 * 24 * 3600),
        duplicate_window: DEDUP_WINDOW,
        ..Default::default()
    };
    match js.get_stream(STREAM).await {
        Ok(mut existing) => {
            let info = existing.info().await?;
            if info.config.subjects != config.subjects
                || info.config.duplicate_window != config.duplicate_window
            {
                js.update_stream(&config).await?;
            }
            Ok(existing)
        }
        Err(_) => Ok(js.create_stream(config).await?),
    }
}
