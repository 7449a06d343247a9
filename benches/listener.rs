//! The listener: how fast the outbox drains to JetStream, commit-to-consumer latency, and
//! what the outbox trigger costs a single-row update.
//!
//! Run with scripts/bench.sh listener (it starts the test Postgres and sets
//! BERTH_TEST_DATABASE_URL). It starts its own nats-server with JetStream on loopback.

mod common;

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

const BACKLOG: i64 = 100_000;
const LATENCY_SAMPLES: usize = 2_000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let bench_db = common::BenchDb::create(8).await?;
        let (pool, url) = (bench_db.pool.clone(), bench_db.url.clone());

        let store = tempfile::tempdir()?;
        let port = berth::daemon::embedded::free_port()?;
        let mut nats_server = std::process::Command::new("nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js"])
            .arg("-sd")
            .arg(store.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let nats = loop {
            if let Ok(c) = async_nats::connect(format!("127.0.0.1:{port}")).await {
                break c;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let js = jetstream::new(nats.clone());
        berth::events::ensure_stream(&js).await?;
        let metrics = berth::metrics::Metrics::new();
        let deps = berth::listener::ListenerDeps {
            pool: pool.clone(),
            database_url: url.clone(),
            nats: nats.clone(),
            metrics: metrics.clone(),
            options: Default::default(),
        };

        // 1. Drain a backlog of 100,000 committed events.
        for chunk in 0..BACKLOG / 10_000 {
            sqlx::query("insert into nodes (name, address) select 'n' || $1 || '-' || g, '127.0.0.1' from generate_series(1, 10000) g")
                .bind(chunk)
                .execute(&pool)
                .await?;
        }
        let shutdown = CancellationToken::new();
        let started = Instant::now();
        let task = tokio::spawn(berth::listener::run(deps, shutdown.clone()));
        loop {
            let left: i64 = sqlx::query_scalar("select count(*) from events where published_at is null").fetch_one(&pool).await?;
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let drain = started.elapsed();
        println!("drain {BACKLOG} events: {:.2} s = {:.0} events/s", drain.as_secs_f64(), BACKLOG as f64 / drain.as_secs_f64());

        // 2. Commit to consumer: single-row commits, each received by a pull consumer.
        let stream = js.get_stream(berth::events::STREAM).await?;
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                filter_subject: "node.updated".into(),
                deliver_policy: consumer::DeliverPolicy::New,
                ack_policy: consumer::AckPolicy::None,
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        let receiver = tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(LATENCY_SAMPLES);
            while latencies.len() < LATENCY_SAMPLES {
                let msg = messages.next().await.expect("stream open").expect("message");
                let event: berth::events::EventPayload = serde_json::from_slice(&msg.payload).expect("payload");
                latencies.push((chrono::Utc::now() - event.at).to_std().unwrap_or_default());
            }
            latencies
        });
        for i in 0..LATENCY_SAMPLES {
            sqlx::query("update nodes set labels = jsonb_build_object('i', $1::int) where name = 'n0-1'").bind(i as i32).execute(&pool).await?;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let mut latencies = receiver.await?;
        latencies.sort();
        println!(
            "commit to consumer ({LATENCY_SAMPLES} single-row commits, one per ~2 ms): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            percentile(&latencies, 0.5).as_secs_f64() * 1e3,
            percentile(&latencies, 0.99).as_secs_f64() * 1e3,
            latencies.last().unwrap().as_secs_f64() * 1e3
        );
        shutdown.cancel();
        task.await??;

        // 3. What the trigger costs: single-row updates for 3 s each, with and without it.
        let tps = |label: &'static str| {
            let pool = pool.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(3);
                let mut n = 0u64;
                while Instant::now() < deadline {
                    sqlx::query("update nodes set labels = jsonb_build_object('i', $1::bigint) where name = 'n1-1'").bind(n as i64).execute(&pool).await?;
                    n += 1;
                }
                let tps = n as f64 / 3.0;
                println!("single-row update, {label}: {tps:.0} tps");
                Ok::<f64, anyhow::Error>(tps)
            }
        };
        let with = tps("with the outbox trigger").await?;
        sqlx::query("alter table nodes disable trigger nodes_events_u").execute(&pool).await?;
        let without = tps("without it").await?;
        println!("trigger cost: {:.0}% fewer updates per second", (1.0 - with / without) * 100.0);

        let _ = nats_server.kill();
        bench_db.drop_database().await?;
        Ok(())
    })
}
