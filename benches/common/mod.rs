//! What every benchmark needs: a fresh migrated database on the test Postgres.

/// A database created for one benchmark run, dropped by [`BenchDb::drop_database`].
pub struct BenchDb {
    pub pool: sqlx::PgPool,
    /// For components that open their own connections (leadership, LISTEN).
    #[allow(dead_code)] // each bench compiles this module on its own; not all use it
    pub url: String,
    admin: sqlx::PgPool,
    name: String,
}

impl BenchDb {
    pub async fn create(pool_size: u32) -> anyhow::Result<BenchDb> {
        let admin_url = std::env::var("BERTH_TEST_DATABASE_URL")
            .map_err(|_| anyhow::anyhow!("set BERTH_TEST_DATABASE_URL (scripts/bench.sh does)"))?;
        let name = format!("berth_bench_{}", std::process::id());
        let admin = sqlx::PgPool::connect(&admin_url).await?;
        sqlx::query(&format!("create database {name}"))
            .execute(&admin)
            .await?;
        let url = format!(
            "{}/{name}",
            &admin_url[..admin_url.rfind('/').expect("a url with a database")]
        );
        let pool = berth::db::connect(&url, pool_size).await?;
        berth::db::migrate(&pool).await?;
        Ok(BenchDb {
            pool,
            url,
            admin,
            name,
        })
    }

    pub async fn drop_database(self) -> anyhow::Result<()> {
        self.pool.close().await;
        sqlx::query(&format!("drop database {} with (force)", self.name))
            .execute(&self.admin)
            .await?;
        Ok(())
    }
}

/// A private nats-server with JetStream on a free loopback port, storing under `dir`.
#[allow(dead_code)] // each bench compiles this module on its own; not all use it
pub fn nats_server(dir: &std::path::Path) -> anyhow::Result<(std::process::Child, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = std::process::Command::new("nats-server")
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    Ok((child, port))
}
