//! `berth up` with no URLs: a private Postgres and nats-server under the data directory,
//! /healthz answering, data kept across a restart, and nothing left running after SIGTERM.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::fixtures::{berth_bin, eventually, http_get};

/// Starts `berth up`; with `capture`, its stderr is kept for the test to read (only for
/// runs the test waits out, so the pipe never fills).
fn start_with(data_dir: &Path, api_port: u16, capture: bool) -> Child {
    Command::new(berth_bin())
        .args(["up", "--components", "api"])
        .env("BERTH_DATA_DIR", data_dir)
        .env("BERTH_API_LISTEN", format!("127.0.0.1:{api_port}"))
        .env("BERTH_LOG", "info")
        .env_remove("BERTH_DATABASE_URL")
        .env_remove("BERTH_NATS_URL")
        .stdin(Stdio::null())
        .stderr(if capture {
            Stdio::piped()
        } else {
            Stdio::inherit()
        })
        .spawn()
        .unwrap()
}

fn start(data_dir: &Path, api_port: u16) -> Child {
    start_with(data_dir, api_port, false)
}

/// Processes whose command line mentions `needle` (the data directory).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().into_string().unwrap_or_default();
        if name.parse::<u32>().is_err() {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(format!("{name}: {cmdline}"));
        }
    }
    found
}

async fn stop(mut child: Child) {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.success(),
        "berth up exits 0 on SIGTERM, got {status}"
    );
}

async fn wait_healthy(api: &str) {
    let url = format!("{api}/healthz");
    eventually(
        "berth up answering /healthz",
        Duration::from_secs(90),
        || {
            let url = url.clone();
            async move { http_get(&url).await.is_some_and(|(s, _)| s == 200) }
        },
    )
    .await;
}

#[tokio::test]
async fn up_without_urls_runs_private_services_and_stops_clean() {
    let dir = tempfile::tempdir().unwrap();
    // Postgres runs as an unprivileged user when the tests run as root: let it in.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data_dir = dir.path().join("data");
    let port = berth::daemon::embedded::free_port().unwrap();
    let api = format!("http://127.0.0.1:{port}");

    let child = start(&data_dir, port);
    wait_healthy(&api).await;
    let state = berth::daemon::StateFile::read(&data_dir).unwrap();
    assert_eq!(state.api_url, api);
    assert!(
        state.database_url.contains("@127.0.0.1:"),
        "postgres listens on loopback"
    );
    assert!(state.nats_url.starts_with("nats://127.0.0.1:"));
    // A second `berth up` on the same data directory refuses, and leaves the first alone.
    let other_port = berth::daemon::embedded::free_port().unwrap();
    let second = start_with(&data_dir, other_port, true)
        .wait_with_output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&second.stderr)
            .contains("another `berth up` is using the data directory")
    );
    wait_healthy(&api).await;

    let pool = sqlx::PgPool::connect(&state.database_url).await.unwrap();
    sqlx::query("insert into nodes (name, address) values ('kept', '127.0.0.1')")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    stop(child).await;

    let needle = data_dir.to_string_lossy().to_string();
    let left = processes_mentioning(&needle);
    assert!(left.is_empty(), "processes left behind: {left:?}");
    assert!(
        !berth::daemon::StateFile::path(&data_dir).exists(),
        "the state file goes with the process"
    );

    // A second start reuses the data.
    let child = start(&data_dir, port);
    wait_healthy(&api).await;
    let state = berth::daemon::StateFile::read(&data_dir).unwrap();
    let pool = sqlx::PgPool::connect(&state.database_url).await.unwrap();
    let kept: i64 = sqlx::query_scalar("select count(*) from nodes where name = 'kept'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(kept, 1, "the data survives a restart");
    pool.close().await;
    stop(child).await;
    assert!(processes_mentioning(&needle).is_empty());
}

#[tokio::test]
async fn up_after_kill_9_takes_over_the_orphaned_servers() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data_dir = dir.path().join("data");
    let port = berth::daemon::embedded::free_port().unwrap();
    let api = format!("http://127.0.0.1:{port}");

    let mut child = start(&data_dir, port);
    wait_healthy(&api).await;
    child.kill().unwrap();
    child.wait().unwrap();
    // Its Postgres and nats-server run on without it...
    let needle = data_dir.to_string_lossy().to_string();
    assert!(!processes_mentioning(&needle).is_empty());

    // ...until the next start stops them and starts its own.
    let child = start(&data_dir, port);
    wait_healthy(&api).await;
    stop(child).await;
    let left = processes_mentioning(&needle);
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

#[tokio::test]
async fn up_exits_with_an_error_when_its_private_postgres_dies() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let data_dir = dir.path().join("data");
    let port = berth::daemon::embedded::free_port().unwrap();
    let child = start_with(&data_dir, port, true);
    wait_healthy(&format!("http://127.0.0.1:{port}")).await;
    let pid: i32 = std::fs::read_to_string(data_dir.join("postgres/postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the private postgres exited unexpectedly"),
        "{stderr}"
    );
    let left = processes_mentioning(&data_dir.to_string_lossy());
    assert!(left.is_empty(), "processes left behind: {left:?}");
}
