//! Spec change to first routed 200 (DESIGN §9), through one `berth up` with every component
//! (default settings) on the test Postgres, a private nats-server and the Docker engine: a
//! folder source with an `image:` app (the image is present, as the target says); each of
//! 20 changes sets a new `VERSION` in the spec's env, and the clock runs from the file's
//! rename into place to the first 200 through the edge whose body is the new version (a CGI
//! script printing $VERSION, so only the new deployment's instances can answer it).
//!
//! Run with scripts/bench.sh e2e.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const CHANGES: usize = 20;

/// One GET of the version through the edge.
async fn version(edge: u16) -> Option<String> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", edge))
        .await
        .ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake::<
        _,
        http_body_util::Empty<bytes::Bytes>,
    >(hyper_util::rt::TokioIo::new(stream))
    .await
    .ok()?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/cgi-bin/v")
        .header("host", "bench.localhost")
        .body(http_body_util::Empty::new())
        .ok()?;
    let resp = sender.send_request(req).await.ok()?;
    if resp.status() != 200 {
        return None;
    }
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some(String::from_utf8_lossy(&body).into_owned())
}

fn write_spec(dir: &std::path::Path, image: &str, version: usize) -> anyhow::Result<()> {
    let spec = format!(
        "apiVersion: berth/v1\nkind: App\nname: bench\nimage: {image}\nreplicas: 1\nenv: {{VERSION: \"{version}\"}}\n\
         domains: [bench.localhost]\nhealth: {{path: /healthz}}\ndeploy: {{drain_timeout: 2s}}\n"
    );
    std::fs::write(dir.join(".bench.yaml.tmp"), spec)?;
    std::fs::rename(dir.join(".bench.yaml.tmp"), dir.join("bench.yaml"))?;
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let db = common::BenchDb::create(4).await?;
    let docker = bollard::Docker::connect_with_local_defaults()?
        .negotiate_version()
        .await?;
    let prefix = format!("berth-bench-e2e-{}-", std::process::id());
    let image = format!("{prefix}img:1");
    common::busybox_image(
        &docker,
        &image,
        &[(
            "cgi-bin/v",
            "#!/bin/busybox sh\nprintf 'Content-Type: text/plain\\r\\n\\r\\n%s' \"$VERSION\"\n",
            true,
        )],
    )
    .await?;
    let work = tempfile::tempdir()?;
    let specs = work.path().join("specs");
    std::fs::create_dir_all(&specs)?;
    write_spec(&specs, &image, 0)?;

    let (mut nats, nats_port) = common::nats_server(&work.path().join("nats"))?;
    let edge = berth::daemon::embedded::free_port()?;
    let node = format!("bench-e2e-{}", std::process::id());
    let mut up = Command::new(env!("CARGO_BIN_EXE_berth"))
        .arg("up")
        .env("BERTH_DATABASE_URL", &db.url)
        .env("BERTH_NATS_URL", format!("nats://127.0.0.1:{nats_port}"))
        .env("BERTH_SPECS", &specs)
        .env("BERTH_EDGE_LISTEN", format!("127.0.0.1:{edge}"))
        .env(
            "BERTH_API_LISTEN",
            format!("127.0.0.1:{}", berth::daemon::embedded::free_port()?),
        )
        .env("BERTH_NODE_NAME", &node)
        .env("BERTH_CONTAINER_PREFIX", &prefix)
        .env("BERTH_DATA_DIR", work.path().join("data"))
        .env("BERTH_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;

    let started = Instant::now();
    while version(edge).await.as_deref() != Some("0") {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "the first version never came up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut latencies = Vec::with_capacity(CHANGES);
    for v in 1..=CHANGES {
        let want = v.to_string();
        let changed = Instant::now();
        write_spec(&specs, &image, v)?;
        loop {
            if version(edge).await.as_deref() == Some(want.as_str()) {
                break;
            }
            anyhow::ensure!(
                changed.elapsed() < Duration::from_secs(60),
                "version {v} never came up"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        latencies.push(changed.elapsed());
        // Let the rollout finish (the old instance drains) before the next change.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let mut sorted = latencies.clone();
    sorted.sort();
    println!(
        "spec change to first routed 200 ({CHANGES} changes, image present, default settings): p50 {:.0} ms, p99 {:.0} ms, min {:.0} ms, max {:.0} ms",
        percentile(&sorted, 0.5).as_secs_f64() * 1e3,
        percentile(&sorted, 0.99).as_secs_f64() * 1e3,
        sorted[0].as_secs_f64() * 1e3,
        sorted[sorted.len() - 1].as_secs_f64() * 1e3,
    );
    println!(
        "each: {:?}",
        latencies.iter().map(|d| d.as_millis()).collect::<Vec<_>>()
    );

    let _ = nix_kill(up.id());
    let _ = up.wait();
    let _ = nats.kill();
    let _ = nats.wait();
    let ids = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=berth.node={node}")])
        .output()?;
    let ids: Vec<String> = String::from_utf8_lossy(&ids.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    if !ids.is_empty() {
        Command::new("docker")
            .args(["rm", "-f"])
            .args(&ids)
            .stdout(Stdio::null())
            .status()?;
    }
    let _ = docker
        .remove_image(
            &image,
            None::<bollard::query_parameters::RemoveImageOptions>,
            None,
        )
        .await;
    db.drop_database().await?;
    Ok(())
}

/// SIGTERM, so `berth up` stops its components in order.
fn nix_kill(pid: u32) -> nix::Result<()> {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
}
