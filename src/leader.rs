//! Leadership for the one-active components (watcher, listener, manager).
//!
//! A leader holds `pg_try_advisory_lock(key)` on a dedicated connection. Postgres releases
//! the lock when that connection ends, so a crashed or partitioned leader loses it and a
//! standby, retrying every second, takes over. The leader checks its connection every second
//! and cancels [`Leadership::lost`] when it fails, so it stops acting before (or as) a
//! standby starts.

use std::time::Duration;

use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

/// Advisory lock keys, one per role. Arbitrary but fixed: changing one breaks mixed versions.
pub const WATCHER_LOCK: i64 = 0x6265_7274_6801;
pub const LISTENER_LOCK: i64 = 0x6265_7274_6802;
pub const MANAGER_LOCK: i64 = 0x6265_7274_6803;

/// Held leadership. Dropping it ends the connection, which releases the lock.
pub struct Leadership {
    /// Cancelled when the lock's connection fails: the holder must stop acting at once.
    pub lost: CancellationToken,
    /// Ends the keep-alive task (and with it the connection) when leadership is given up.
    release: CancellationToken,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.release.cancel();
    }
}

/// Waits until this process holds the lock `key`, or `shutdown` is cancelled (`None`).
pub async fn acquire(
    database_url: &str,
    key: i64,
    role: &str,
    shutdown: &CancellationToken,
) -> Option<Leadership> {
    let mut announced = false;
    loop {
        let attempt = async {
            let mut conn = PgConnection::connect(database_url).await?;
            let got: bool = sqlx::query_scalar("select pg_try_advisory_lock($1)")
                .bind(key)
                .fetch_one(&mut conn)
                .await?;
            Ok::<_, sqlx::Error>(got.then_some(conn))
        };
        match attempt.await {
            Ok(Some(conn)) => {
                tracing::info!(role, "became leader");
                let lost = CancellationToken::new();
                let release = CancellationToken::new();
                tokio::spawn(keep_alive(
                    conn,
                    lost.clone(),
                    release.clone(),
                    role.to_string(),
                ));
                return Some(Leadership { lost, release });
            }
            Ok(None) => {
                if !announced {
                    tracing::info!(role, "another instance leads; standing by");
                    announced = true;
                }
            }
            Err(e) => {
                tracing::warn!(role, error = %e, "cannot reach postgres to take leadership; retrying")
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

async fn keep_alive(
    mut conn: PgConnection,
    lost: CancellationToken,
    release: CancellationToken,
    role: String,
) {
    loop {
        tokio::select! {
            _ = release.cancelled() => {
                let _ = conn.close().await;
                return;
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let ping = tokio::time::timeout(
            Duration::from_secs(3),
            sqlx::query("select 1").execute(&mut conn),
        )
        .await;
        if !matches!(ping, Ok(Ok(_))) {
            tracing::warn!(role, "lost the leadership connection; stepping down");
            lost.cancel();
            return;
        }
    }
}
