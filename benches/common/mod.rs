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

/// Builds `tag`: FROM scratch with Debian's static busybox running httpd on $PORT (loopback)
/// over `www/`, which holds `healthz` plus `files` (path, content, executable).
#[allow(dead_code)] // each bench compiles this module on its own; not all use it
pub async fn busybox_image(
    docker: &bollard::Docker,
    tag: &str,
    files: &[(&str, &str, bool)],
) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    std::fs::copy("/bin/busybox", dir.path().join("busybox"))?;
    std::fs::create_dir_all(dir.path().join("www"))?;
    std::fs::write(dir.path().join("www/healthz"), "ok\n")?;
    for (path, content, executable) in files {
        let file = dir.path().join("www").join(path);
        std::fs::create_dir_all(file.parent().expect("a file in www"))?;
        std::fs::write(&file, content)?;
        if *executable {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755))?;
        }
    }
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY www /www\n\
         CMD [\"/bin/busybox\", \"sh\", \"-c\", \"exec /bin/busybox httpd -f -p 127.0.0.1:$PORT -h /www\"]\n",
    )?;
    let mut tar = tar::Builder::new(Vec::new());
    tar.append_dir_all(".", dir.path())?;
    let options = bollard::query_parameters::BuildImageOptionsBuilder::new()
        .t(tag)
        .rm(true)
        .networkmode("host")
        .build();
    let body = bollard::body_full(bytes::Bytes::from(tar.into_inner()?));
    let mut stream = docker.build_image(options, None, Some(body));
    while let Some(item) = stream.next().await {
        if let Some(e) = item?.error_detail {
            anyhow::bail!("build failed: {e:?}");
        }
    }
    Ok(())
}
