//! Postgres: the pool and the migrations. Postgres is the truth (DESIGN §1); everything
//! else in berth is a cache of it or a hint about it.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The schema, embedded at compile time from `migrations/`. Applied migrations are never
/// edited; a change is a new file.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations");

/// Opens a pool. Fails fast (a few seconds) when Postgres cannot be reached, so the caller
/// reports it rather than hanging.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        // berth's statements are small and frequent: compiling one with JIT (which Postgres
        // does once a plan's estimated cost passes a threshold, e.g. on stale statistics)
        // costs more than the statement itself.
        .connect_with(options.application_name("berth").options([("jit", "off")]))
        .await
}

/// Applies pending migrations. Safe to run from several processes at once: sqlx takes an
/// advisory lock around them.
pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}
