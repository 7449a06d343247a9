//! Shared fixtures: each test gets real services of its own.
//!
//! - [`TestDb`]: a fresh, migrated database on the test Postgres (BERTH_TEST_DATABASE_URL,
//!   set up by scripts/test.sh), dropped afterwards.
//! - [`TestNats`]: a private nats-server with JetStream on a free loopback port.
//! - [`TestDocker`]: the Docker engine with a unique container name prefix; every container
//!   with that prefix is removed afterwards.
//! - [`eventually`]: polls a condition until a deadline; tests never sleep to wait.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgPool;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this test process and call.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{prefix}{}_{}_{nanos:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Polls `check` every 20 ms until it returns true; panics naming `what` after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if check().await {
            return;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn admin_url() -> String {
    std::env::var("BERTH_TEST_DATABASE_URL").expect(
        "BERTH_TEST_DATABASE_URL is not set: run the tests through scripts/test.sh, \
         which starts a test Postgres and sets it",
    )
}

/// Replaces the database name of a postgres URL.
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let cut = base.rfind('/').expect("a postgres url has a path");
    let mut out = format!("{}/{db}", &base[..cut]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

/// A fresh database with berth's migrations applied.
pub struct TestDb {
    pub pool: PgPool,
    pub url: String,
    name: String,
}

impl TestDb {
    pub async fn new() -> TestDb {
        let admin = admin_url();
        let name = unique("berth_t");
        let admin_pool = PgPool::connect(&admin)
            .await
            .expect("connecting to the test postgres");
        sqlx::query(&format!("create database {name}"))
            .execute(&admin_pool)
            .await
            .unwrap();
        admin_pool.close().await;
        let url = with_database(&admin, &name);
        let pool = berth::db::connect(&url, 10).await.unwrap();
        berth::db::migrate(&pool).await.expect("migrations apply");
        TestDb { pool, url, name }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // Drop runs inside the test's (blocked) runtime, so no async client can be used here;
        // psql does it synchronously. `with (force)` ends the test pool's connections.
        let _ = Command::new("psql")
            .arg(admin_url())
            .args([
                "-q",
                "-c",
                &format!("drop database if exists {} with (force)", self.name),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A private nats-server with JetStream, stoppable and restartable on the same port.
pub struct TestNats {
    pub port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
}

impl TestNats {
    pub async fn start() -> TestNats {
        let store = tempfile::tempdir().unwrap();
        let port = berth::daemon::embedded::free_port().unwrap();
        let mut nats = TestNats {
            port,
            store,
            child: None,
        };
        nats.restart().await;
        nats
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .expect("connecting to the test nats-server")
    }

    /// Starts the server (again), keeping its port and its JetStream store.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js"])
            .arg("-sd")
            .arg(self.store.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is installed (scripts/test.sh installs it)");
        self.child = Some(child);
        let port = self.port;
        eventually(
            "nats-server accepting connections",
            Duration::from_secs(10),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
            },
        )
        .await;
    }

    /// Kills the server (SIGKILL): what a crash looks like to clients.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for TestNats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The Docker engine, with every container and image this test names removed afterwards.
pub struct TestDocker {
    pub docker: bollard::Docker,
    /// Prefix of every container and image name this test creates.
    pub prefix: String,
}

impl TestDocker {
    /// Builds `context` (see [`busybox_httpd_context`]) as `<prefix>-<name>:1`.
    pub async fn build_image(&self, context: &Path, name: &str) -> String {
        use futures_util::StreamExt;
        let tag = format!("{}:1", self.name(name));
        let options = bollard::query_parameters::BuildImageOptionsBuilder::new()
            .t(&tag)
            .rm(true)
            .forcerm(true)
            .networkmode("host")
            .build();
        let body = bollard::body_full(bytes::Bytes::from(tar_folder(context)));
        let mut stream = self.docker.build_image(options, None, Some(body));
        let mut log = String::new();
        while let Some(item) = stream.next().await {
            let info = item.expect("the build stream reads");
            if let Some(detail) = info.error_detail {
                panic!("build failed: {detail:?}\n{log}");
            }
            if let Some(s) = info.stream {
                log.push_str(&s);
            }
        }
        assert!(log.contains("Successfully"), "{log}");
        tag
    }

    pub async fn new() -> TestDocker {
        let docker = bollard::Docker::connect_with_local_defaults()
            .expect("docker socket")
            .negotiate_version()
            .await
            .expect("the Docker engine answers (scripts/test.sh starts it)");
        TestDocker {
            docker,
            prefix: unique("berth-t-").replace('_', "-"),
        }
    }

    pub fn name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.prefix)
    }
}

impl Drop for TestDocker {
    fn drop(&mut self) {
        // As for TestDb: synchronously, with the docker CLI.
        let list = |args: &[&str]| -> Vec<String> {
            Command::new("docker")
                .args(args)
                .output()
                .map(|o| {
                    String::from_utf8_lossy(&o.stdout)
                        .lines()
                        .map(str::to_string)
                        .collect()
                })
                .unwrap_or_default()
        };
        let filter = format!("name=^/{}", self.prefix);
        let containers = list(&["ps", "-aq", "--filter", &filter]);
        if !containers.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-f"])
                .args(&containers)
                .stdout(Stdio::null())
                .status();
        }
        let images: Vec<String> = list(&["images", "--format", "{{.Repository}}:{{.Tag}}"])
            .into_iter()
            .filter(|i| i.starts_with(&self.prefix))
            .collect();
        if !images.is_empty() {
            let _ = Command::new("docker")
                .args(["rmi", "-f"])
                .args(&images)
                .stdout(Stdio::null())
                .status();
        }
    }
}

/// Runs `docker <list...>` and, when it printed any ids, `docker <remove...> <ids>`.
/// Synchronous (the docker CLI), so it can run in `Drop`.
pub fn docker_remove(list: &[&str], remove: &[&str]) {
    let Ok(out) = Command::new("docker").args(list).output() else {
        return;
    };
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    if !ids.is_empty() {
        let _ = Command::new("docker")
            .args(remove)
            .args(&ids)
            .stdout(Stdio::null())
            .status();
    }
}

/// The static busybox from Debian's busybox-static: it brings `httpd` and `sh`.
pub fn busybox() -> PathBuf {
    for p in ["/bin/busybox", "/usr/bin/busybox"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    panic!("busybox-static is not installed (scripts/test.sh installs it)")
}

/// A build context: FROM scratch with busybox, serving `www/` with httpd on $PORT.
pub fn busybox_httpd_context(dir: &Path, page: &str) {
    std::fs::copy(busybox(), dir.join("busybox")).unwrap();
    std::fs::create_dir_all(dir.join("www")).unwrap();
    std::fs::write(dir.join("www/index.html"), page).unwrap();
    std::fs::write(dir.join("www/healthz"), "ok\n").unwrap();
    std::fs::write(
        dir.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nCOPY www /www\n\
         CMD [\"/bin/busybox\", \"sh\", \"-c\", \"exec /bin/busybox httpd -f -v -p 127.0.0.1:${PORT:-8080} -h /www\"]\n",
    )
    .unwrap();
}

/// The tar stream of a folder, as the Docker build API takes it.
pub fn tar_folder(dir: &Path) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.append_dir_all(".", dir).unwrap();
    builder.into_inner().unwrap()
}

/// The `berth` binary built for these tests.
pub fn berth_bin() -> &'static str {
    env!("CARGO_BIN_EXE_berth")
}

/// An HTTP GET with a short timeout; `None` when nothing answered.
pub async fn http_get(url: &str) -> Option<(u16, String)> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let resp = client.get(url).send().await.ok()?;
    let status = resp.status().as_u16();
    Some((status, resp.text().await.unwrap_or_default()))
}

/// A child process killed (SIGKILL) when the test ends, even by a panic.
pub struct ChildGuard(pub Option<std::process::Child>);

impl ChildGuard {
    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Runs the listener (events from the test's rows to its nats-server) until the token is
/// cancelled.
pub fn start_listener(
    db: &TestDb,
    client: async_nats::Client,
) -> (
    tokio_util::sync::CancellationToken,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let deps = berth::listener::ListenerDeps {
        pool: db.pool.clone(),
        database_url: db.url.clone(),
        nats: client,
        metrics: berth::metrics::Metrics::new(),
        options: berth::listener::ListenerOptions {
            batch: 500,
            ..Default::default()
        },
    };
    (
        shutdown.clone(),
        tokio::spawn(berth::listener::run(deps, shutdown)),
    )
}

/// The contract's join row of an instance and the deployment that created it.
pub async fn link_instance(pool: &PgPool, deployment: i64, instance: i64) {
    sqlx::query("insert into deployment_instances (deployment_id, instance_id) values ($1, $2)")
        .bind(deployment)
        .bind(instance)
        .execute(pool)
        .await
        .unwrap();
}
