//! berth: a declarative deployment reconciler.
//!
//! App specs (YAML) become rows in Postgres; components woken by NATS JetStream events make
//! the running world match them. The map of this crate:
//!
//! - [`spec`]: the app spec, parsed with positions and validated; every error is located.
//! - [`db`]: the Postgres pool and the embedded migrations (the data model of DESIGN §2,
//!   with the outbox triggers of §3).
//! - [`events`]: the JetStream stream, subjects and event payload.
//! - [`watcher`], [`listener`], [`manager`], [`builder`], [`agent`]: the components of
//!   DESIGN §1, each with a `run(deps, shutdown)`.
//! - [`edge`]: the reverse proxy routing by Host to healthy instances.
//! - [`api`]: the HTTP API.
//! - [`daemon`]: the composition root of `berth up`, including the private Postgres and
//!   nats-server it starts when given no URLs.
//! - [`config`], [`telemetry`], [`cli`]: settings, logs and the command line.
#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod builder;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod db;
pub mod edge;
pub mod events;
pub mod leader;
pub mod listener;
pub mod manager;
pub mod metrics;
pub mod spec;
pub mod telemetry;
pub mod watcher;
