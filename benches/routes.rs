//! The edge's instance-healthy-to-routable latency with 10,000 routes (DESIGN §9): the
//! listener and the edge run here on the test Postgres and a private nats-server; 50 times
//! (after one first change, timed apart), an instance row of a known host turns `running` and
//! the clock runs until the edge's first 200 for that host (polled every millisecond). Meanwhile a client keeps requesting
//! another app over keep-alive connections: route updates must not drop any of them.
//!
//! Run with scripts/bench.sh routes.

mod common;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_util::sync::CancellationToken;

const ROUTES: usize = 10_000;
const SAMPLES: usize = 50;

async fn backend() -> anyhow::Result<std::net::SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let service = hyper::service::service_fn(|_req| async {
                Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(b"ok"))))
            });
            tokio::spawn(
                hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned(),
            );
        }
    });
    Ok(addr)
}

async fn status(edge: std::net::SocketAddr, host: &str) -> Option<u16> {
    let stream = tokio::net::TcpStream::connect(edge).await.ok()?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .ok()?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/")
        .header("host", host)
        .body(Empty::new())
        .ok()?;
    let resp = sender.send_request(req).await.ok()?;
    let code = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    Some(code)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let db = common::BenchDb::create(10).await?;
    let store = tempfile::tempdir()?;
    let (mut nats, nats_port) = common::nats_server(store.path())?;
    let client = async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .connect(format!("nats://127.0.0.1:{nats_port}"))
        .await?;
    let js = async_nats::jetstream::new(client.clone());
    berth::events::ensure_stream(&js).await?;
    let backend = backend().await?;

    // 10,000 apps, each with a domain and a running instance; `steady` is the backend.
    sqlx::query(
        "insert into nodes (name, address, last_heartbeat_at) values ('bench', '127.0.0.1', now())",
    )
    .execute(&db.pool)
    .await?;
    sqlx::query(
        "insert into apps (name, spec, spec_hash, source)
         select 'app' || g, '{\"replicas\": 1}', 'h', 'bench' from generate_series(1, $1) g",
    )
    .bind(ROUTES as i32)
    .execute(&db.pool)
    .await?;
    sqlx::query("update apps set name = 'steady' where name = 'app1'")
        .execute(&db.pool)
        .await?;
    sqlx::query("insert into deployments (app_id, generation, spec, spec_hash, status) select id, 1, '{}', 'h', 'active' from apps")
        .execute(&db.pool)
        .await?;
    sqlx::query(
        "update apps a set current_deployment_id = d.id from deployments d where d.app_id = a.id",
    )
    .execute(&db.pool)
    .await?;
    sqlx::query("insert into domains (app_id, hostname) select id, name || '.localhost' from apps")
        .execute(&db.pool)
        .await?;
    sqlx::query(
        "insert into instances (app_id, deployment_id, node_id, host, port, state)
         select a.id, a.current_deployment_id, (select id from nodes), '127.0.0.1',
                case when a.name = 'steady' then $1 else 20000 + (a.id % 10000)::int end,
                case when a.id <= $2 + 1 then 'starting' else 'running' end
         from apps a",
    )
    .bind(backend.port() as i32)
    .bind(SAMPLES as i64 + 1)
    .execute(&db.pool)
    .await?;
    sqlx::query("update instances set state = 'running' where app_id = (select id from apps where name = 'steady')")
        .execute(&db.pool)
        .await?;
    // The sampled apps' instances point at the backend too.
    sqlx::query("update instances set port = $1 where state = 'starting'")
        .bind(backend.port() as i32)
        .execute(&db.pool)
        .await?;

    let shutdown = CancellationToken::new();
    tokio::spawn(berth::listener::run(
        berth::listener::ListenerDeps {
            pool: db.pool.clone(),
            database_url: db.url.clone(),
            nats: client.clone(),
            metrics: berth::metrics::Metrics::new(),
            options: Default::default(),
        },
        shutdown.clone(),
    ));
    // The 10,000 apps' events first reach NATS: the measurement starts on a quiet system.
    let drained = Instant::now();
    loop {
        let unpublished: i64 =
            sqlx::query_scalar("select count(*) from events where published_at is null")
                .fetch_one(&db.pool)
                .await?;
        if unpublished == 0 {
            break;
        }
        anyhow::ensure!(
            drained.elapsed() < Duration::from_secs(60),
            "the listener never caught up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Statistics as autovacuum leaves them a minute after a bulk insert.
    sqlx::query("analyze").execute(&db.pool).await?;
    let bound = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let edge = bound.local_addr()?;
    let loaded = Instant::now();
    tokio::spawn(berth::edge::run(
        berth::edge::EdgeDeps {
            pool: db.pool.clone(),
            listener: bound,
            tls: None,
            metrics: berth::metrics::Metrics::new(),
            options: Default::default(),
        },
        js,
        shutdown.clone(),
    ));
    while status(edge, "steady.localhost").await != Some(200) {
        anyhow::ensure!(
            loaded.elapsed() < Duration::from_secs(60),
            "the edge never served"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("edge up with {ROUTES} routes after {:?}", loaded.elapsed());

    // Steady traffic on keep-alive connections while routes change.
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load = tokio::spawn({
        let (ok, failed, stop) = (ok.clone(), failed.clone(), shutdown.clone());
        async move {
            let stream = tokio::net::TcpStream::connect(edge).await.unwrap();
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                    .await
                    .unwrap();
            tokio::spawn(conn);
            while !stop.is_cancelled() {
                let req = hyper::Request::get("/")
                    .header("host", "steady.localhost")
                    .body(Empty::new())
                    .unwrap();
                match sender.send_request(req).await {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.into_body().collect().await;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                }
            }
        }
    });

    // The first change after the edge started is timed apart: it pays for first uses (a
    // statement prepared on a pool connection, the consumer's first delivery after the bulk).
    let mut cold = Duration::ZERO;
    let mut latencies = Vec::with_capacity(SAMPLES);
    for i in std::iter::once(SAMPLES + 2).chain(2..SAMPLES + 2) {
        let host = format!("app{i}.localhost");
        anyhow::ensure!(
            status(edge, &host).await == Some(503),
            "{host} is not waiting"
        );
        let started = Instant::now();
        sqlx::query("update instances set state = 'running' where app_id = (select id from apps where name = $1)")
            .bind(format!("app{i}"))
            .execute(&db.pool)
            .await?;
        while status(edge, &host).await != Some(200) {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(10),
                "{host} never became routable"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        if i == SAMPLES + 2 {
            cold = started.elapsed();
        } else {
            latencies.push(started.elapsed());
        }
    }
    shutdown.cancel();
    let _ = load.await;
    latencies.sort();
    println!(
        "instance running -> first routed 200, {ROUTES} routes, {SAMPLES} samples: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies[latencies.len() - 1].as_secs_f64() * 1e3,
    );
    println!(
        "the first change after the edge started (not among the samples): {:.1} ms",
        cold.as_secs_f64() * 1e3
    );
    println!(
        "steady keep-alive traffic meanwhile: {} requests, {} failed",
        ok.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    let _ = nats.kill();
    let _ = nats.wait();
    db.drop_database().await?;
    Ok(())
}
