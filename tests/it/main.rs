//! berth's integration tests: one binary, real services (Postgres, NATS JetStream, the
//! Docker engine, the berth binary itself). Run them with scripts/test.sh.

mod agent;
mod builder;
mod cli;
mod docker;
mod e2e;
mod edge;
mod fixtures;
mod jetstream;
mod listener;
mod manager;
mod outbox;
mod up;
mod watcher;
