//! Private Postgres and nats-server for a `berth up` given no URLs.
//!
//! Both run from the installed binaries with their data under the data directory, listen on
//! loopback only, and are stopped by [`Embedded::stop`]. Postgres runs as an unprivileged
//! user when berth runs as root (Postgres refuses root). A second start reuses the data. If a
//! previous berth was killed and left its servers running, they are stopped first, so one
//! data directory never has two servers.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, Uid, User};
use tokio::process::{Child, Command};

/// A running private server.
pub struct ChildServer {
    /// What it is, for logs.
    name: &'static str,
    pid: i32,
    /// The signal that asks it to stop quickly but cleanly.
    stop_signal: Signal,
    /// Becomes `Some` when the process exits; a task owns the child and waits for it.
    exit: tokio::sync::watch::Receiver<Option<std::process::ExitStatus>>,
}

impl ChildServer {
    fn spawn(
        name: &'static str,
        cmd: &mut Command,
        stop_signal: Signal,
    ) -> anyhow::Result<ChildServer> {
        let mut child: Child = cmd.spawn()?;
        let pid = child.id().map(|p| p as i32).unwrap_or_default();
        let (tx, exit) = tokio::sync::watch::channel(None);
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            let _ = tx.send(status);
        });
        Ok(ChildServer {
            name,
            pid,
            stop_signal,
            exit,
        })
    }

    /// The exit status, if it has exited.
    fn exited(&self) -> Option<std::process::ExitStatus> {
        *self.exit.borrow()
    }

    /// Signals the server and waits for it; SIGKILL after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        let _ = kill(Pid::from_raw(self.pid), self.stop_signal);
        let waited = tokio::time::timeout(grace, self.exit.wait_for(|s| s.is_some()))
            .await
            .is_ok();
        if !waited {
            tracing::warn!(server = self.name, "did not stop in time; killing it");
            let _ = kill(Pid::from_raw(self.pid), Signal::SIGKILL);
            let _ = self.exit.wait_for(|s| s.is_some()).await;
        }
        tracing::info!(server = self.name, "stopped");
    }
}

/// The private servers and how to reach them.
pub struct Embedded {
    pub database_url: Option<String>,
    pub nats_url: Option<String>,
    postgres: Option<ChildServer>,
    nats: Option<ChildServer>,
}

impl Embedded {
    /// Starts whichever of the two servers has no URL configured.
    pub async fn start(
        data_dir: &Path,
        database_url: Option<String>,
        nats_url: Option<String>,
    ) -> anyhow::Result<Self> {
        Self::start_at(data_dir, database_url, nats_url, None).await
    }

    /// As [`Embedded::start`], with Postgres on a chosen port (tests restart it in place).
    pub async fn start_at(
        data_dir: &Path,
        database_url: Option<String>,
        nats_url: Option<String>,
        postgres_port: Option<u16>,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("creating data directory {}", data_dir.display()))?;
        let data_dir = data_dir
            .canonicalize()
            .with_context(|| format!("resolving data directory {}", data_dir.display()))?;
        let mut embedded = Embedded {
            database_url,
            nats_url,
            postgres: None,
            nats: None,
        };
        if embedded.nats_url.is_none() {
            let (url, server) = start_nats(&data_dir).await?;
            embedded.nats_url = Some(url);
            embedded.nats = Some(server);
        }
        if embedded.database_url.is_none() {
            match start_postgres(&data_dir, postgres_port).await {
                Ok((url, server)) => {
                    embedded.database_url = Some(url);
                    embedded.postgres = Some(server);
                }
                Err(e) => {
                    embedded.stop().await;
                    return Err(e);
                }
            }
        }
        Ok(embedded)
    }

    /// Resolves when a private server exits on its own, naming it. Pending forever when
    /// there is none (external URLs).
    pub fn died(&self) -> impl std::future::Future<Output = &'static str> + Send + 'static {
        let watched: Vec<(&'static str, tokio::sync::watch::Receiver<_>)> =
            [&self.postgres, &self.nats]
                .into_iter()
                .flatten()
                .map(|s| (s.name, s.exit.clone()))
                .collect();
        async move {
            let waits = watched.into_iter().map(|(name, mut rx)| {
                Box::pin(async move {
                    let _ = rx.wait_for(|s| s.is_some()).await;
                    name
                })
            });
            let waits: Vec<_> = waits.collect();
            if waits.is_empty() {
                return std::future::pending().await;
            }
            futures_util::future::select_all(waits).await.0
        }
    }

    /// Stops the private servers: Postgres first (its clients are gone by now), then NATS.
    pub async fn stop(&mut self) {
        if let Some(pg) = self.postgres.take() {
            pg.stop(Duration::from_secs(30)).await;
        }
        if let Some(nats) = self.nats.take() {
            nats.stop(Duration::from_secs(10)).await;
        }
    }
}

/// A free loopback port. Another process could take it before the server binds it; the
/// server then fails to start and the error says so.
pub fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

/// Finds a server binary on PATH or in Debian's versioned Postgres folders.
fn find_binary(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
        let mut versions: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
        versions.sort();
        for v in versions.into_iter().rev() {
            let candidate = v.join("bin").join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    bail!("`{name}` is not installed (on Debian: apt-get install postgresql nats-server)")
}

/// Stops a server left running by a berth that was killed, identified by its pid file and
/// its command line (a recycled pid is left alone).
async fn stop_orphan(pid_file: &Path, expect_in_cmdline: &str, signal: Signal) {
    let Ok(text) = std::fs::read_to_string(pid_file) else {
        return;
    };
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<i32>().ok())
    else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if !String::from_utf8_lossy(&cmdline).contains(expect_in_cmdline) {
        return;
    }
    tracing::warn!(pid, pid_file = %pid_file.display(), "stopping a server left running by a previous berth");
    let _ = kill(Pid::from_raw(pid), signal);
    let deadline = Instant::now() + Duration::from_secs(30);
    while kill(Pid::from_raw(pid), None).is_ok() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if kill(Pid::from_raw(pid), None).is_ok() {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

fn log_file(path: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

async fn start_nats(data_dir: &Path) -> anyhow::Result<(String, ChildServer)> {
    let binary = find_binary("nats-server")?;
    let store = data_dir.join("nats");
    std::fs::create_dir_all(&store)?;
    let pid_file = data_dir.join("nats.pid");
    stop_orphan(&pid_file, "nats-server", Signal::SIGTERM).await;
    let port = free_port()?;
    let log = log_file(&data_dir.join("nats.log"))?;
    let mut cmd = Command::new(&binary);
    cmd.args([
        "-a",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-js",
        "-n",
        "berth",
    ])
    .arg("-sd")
    .arg(&store)
    .arg("-P")
    .arg(&pid_file)
    .stdin(Stdio::null())
    .stdout(log.try_clone()?)
    .stderr(log)
    // Its own process group: a Ctrl-C in the terminal reaches berth, which stops the
    // servers in order, instead of reaching them all at once.
    .process_group(0)
    // Dropped without stop() (a failed start, a test): do not leave it running.
    .kill_on_drop(true);
    let server = ChildServer::spawn("nats-server", &mut cmd, Signal::SIGTERM)
        .with_context(|| format!("starting {}", binary.display()))?;
    let url = format!("nats://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = server.exited() {
            bail!(
                "nats-server exited during start ({status}); see {}",
                data_dir.join("nats.log").display()
            );
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        if Instant::now() > deadline {
            server.stop(Duration::from_secs(5)).await;
            bail!("nats-server did not accept connections within 20s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(nats.url = %url, "private nats-server started");
    Ok((url, server))
}

/// The user Postgres runs as when berth is root: `postgres` if it exists, else `nobody`.
fn postgres_user() -> anyhow::Result<Option<User>> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    for name in ["postgres", "nobody"] {
        if let Some(user) = User::from_name(name)? {
            return Ok(Some(user));
        }
    }
    bail!("running as root, and neither a `postgres` nor a `nobody` user exists to run Postgres")
}

fn as_user(cmd: &mut Command, user: &Option<User>) {
    if let Some(u) = user {
        cmd.uid(u.uid.as_raw())
            .gid(u.gid.as_raw())
            .env("HOME", &u.dir);
    }
}

async fn start_postgres(
    data_dir: &Path,
    port: Option<u16>,
) -> anyhow::Result<(String, ChildServer)> {
    let initdb = find_binary("initdb")?;
    let postgres = find_binary("postgres")?;
    let user = postgres_user()?;
    let pgdata = data_dir.join("postgres");
    let password_file = data_dir.join("postgres.password");
    if !pgdata.join("PG_VERSION").exists() {
        let _ = std::fs::remove_dir_all(&pgdata);
        std::fs::create_dir_all(&pgdata)?;
        let password = random_hex(16)?;
        // The password file initdb reads must be readable by its user; it is removed after.
        let pwfile = pgdata.with_extension("initpw");
        std::fs::write(&pwfile, &password)?;
        if let Some(u) = &user {
            std::os::unix::fs::chown(&pgdata, Some(u.uid.as_raw()), Some(u.gid.as_raw()))?;
            std::os::unix::fs::chown(&pwfile, Some(u.uid.as_raw()), Some(u.gid.as_raw()))?;
        }
        let mut cmd = Command::new(&initdb);
        cmd.arg("-D")
            .arg(&pgdata)
            .args([
                "-U",
                "berth",
                "-E",
                "UTF8",
                "--auth=scram-sha-256",
                "--no-instructions",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdin(Stdio::null());
        as_user(&mut cmd, &user);
        let output = cmd
            .output()
            .await
            .with_context(|| format!("running {}", initdb.display()))?;
        let _ = std::fs::remove_file(&pwfile);
        if !output.status.success() {
            let _ = std::fs::remove_dir_all(&pgdata);
            bail!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&output.stderr).trim(),
                if user.is_some() {
                    "\n(Postgres runs as an unprivileged user: every folder above the data directory must be readable by it)"
                } else {
                    ""
                }
            );
        }
        write_private(&password_file, &password)?;
    }
    let password = std::fs::read_to_string(&password_file)
        .with_context(|| format!("reading {}", password_file.display()))?;
    stop_orphan(&pgdata.join("postmaster.pid"), "postgres", Signal::SIGINT).await;
    let port = match port {
        Some(p) => p,
        None => free_port()?,
    };
    let log = log_file(&data_dir.join("postgres.log"))?;
    let mut cmd = Command::new(&postgres);
    cmd.arg("-D")
        .arg(&pgdata)
        .args([
            "-p",
            &port.to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "unix_socket_directories=",
        ])
        .args(["-c", "max_connections=200", "-c", "fsync=on"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        // Dropped without stop() (a failed start, a test): do not leave it running.
        .kill_on_drop(true);
    as_user(&mut cmd, &user);
    // SIGINT is Postgres' "fast" shutdown: roll back open transactions, checkpoint, exit.
    let server = ChildServer::spawn("postgres", &mut cmd, Signal::SIGINT)
        .with_context(|| format!("starting {}", postgres.display()))?;
    let admin_url = format!(
        "postgres://berth:{}@127.0.0.1:{port}/postgres",
        password.trim()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let admin = loop {
        if let Some(status) = server.exited() {
            bail!(
                "postgres exited during start ({status}); see {}",
                data_dir.join("postgres.log").display()
            );
        }
        match sqlx::PgPool::connect(&admin_url).await {
            Ok(pool) => break pool,
            Err(e) if Instant::now() > deadline => {
                server.stop(Duration::from_secs(10)).await;
                bail!("postgres did not accept connections within 60s: {e}");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let exists: bool =
        sqlx::query_scalar("select exists (select 1 from pg_database where datname = 'berth')")
            .fetch_one(&admin)
            .await?;
    if !exists {
        sqlx::query("create database berth").execute(&admin).await?;
    }
    admin.close().await;
    tracing::info!(postgres.port = port, postgres.data = %pgdata.display(), "private postgres started");
    Ok((
        format!(
            "postgres://berth:{}@127.0.0.1:{port}/berth",
            password.trim()
        ),
        server,
    ))
}

/// Writes a file only its owner can read.
pub fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
