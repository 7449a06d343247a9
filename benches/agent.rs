//! The agent's start-to-running latency: from an instance row for the node (reconciled at
//! once, as its event would) to `state = running` after the first passing health probe, for
//! a host-network busybox httpd container built FROM scratch. 50 starts, one at a time.
//!
//! Run with scripts/bench.sh agent.

mod common;

use std::time::{Duration, Instant};

use berth::agent::{Agent, AgentDeps, AgentOptions, NodeConfig};
use berth::events::controller::Reconciler;

const STARTS: usize = 50;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn state(pool: &sqlx::PgPool, id: i64) -> anyhow::Result<String> {
    Ok(
        sqlx::query_scalar("select state from instances where id = $1")
            .bind(id)
            .fetch_one(pool)
            .await?,
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let db = common::BenchDb::create(10).await?;
    let docker = bollard::Docker::connect_with_local_defaults()?
        .negotiate_version()
        .await?;
    let prefix = format!("berth-bench-{}-", std::process::id());
    let tag = format!("{prefix}img:1");
    common::busybox_image(&docker, &tag, &[]).await?;
    let data = tempfile::tempdir()?;
    let agent = Agent::register(AgentDeps {
        pool: db.pool.clone(),
        docker: Some(docker.clone()),
        node: NodeConfig {
            name: "bench".into(),
            address: "127.0.0.1".into(),
            labels: Default::default(),
            capacity: None,
        },
        data_dir: data.path().to_path_buf(),
        options: AgentOptions {
            container_prefix: prefix.clone(),
            ..Default::default()
        },
    })
    .await?;
    let spec = serde_json::json!({
        "apiVersion": "berth/v1", "kind": "App", "name": "web", "image": tag, "replicas": 1,
        "env": {}, "domains": [], "runtime": "docker",
        "health": {"path": "/healthz", "interval": "1s", "timeout": "1s", "healthy_threshold": 1, "unhealthy_threshold": 3},
        "deploy": {"strategy": "rolling", "max_surge": 1, "max_unavailable": 0, "drain_timeout": "1s", "progress_deadline": "5m"}
    });
    let app: i64 = sqlx::query_scalar(
        "insert into apps (name, spec, spec_hash, source) values ('web', $1, 'h', 'bench') returning id",
    )
    .bind(&spec)
    .fetch_one(&db.pool)
    .await?;
    let image: i64 =
        sqlx::query_scalar("insert into images (app_id, reference) values ($1, $2) returning id")
            .bind(app)
            .bind(&tag)
            .fetch_one(&db.pool)
            .await?;
    let deployment: i64 = sqlx::query_scalar(
        "insert into deployments (app_id, generation, spec, spec_hash, status, image_id) values ($1, 1, $2, 'h', 'active', $3) returning id",
    )
    .bind(app)
    .bind(&spec)
    .bind(image)
    .fetch_one(&db.pool)
    .await?;

    let mut latencies = Vec::with_capacity(STARTS);
    for _ in 0..STARTS {
        let id: i64 = sqlx::query_scalar(
            "insert into instances (app_id, deployment_id, node_id, image_id, host) values ($1, $2, $3, $4, '127.0.0.1') returning id",
        )
        .bind(app)
        .bind(deployment)
        .bind(agent.node_id())
        .bind(image)
        .fetch_one(&db.pool)
        .await?;
        let started = Instant::now();
        agent.reconcile(&id).await?;
        while state(&db.pool, id).await? != "running" {
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "instance {id} never ran"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        latencies.push(started.elapsed());
        sqlx::query("update instances set desired_state = 'stopped' where id = $1")
            .bind(id)
            .execute(&db.pool)
            .await?;
        agent.reconcile(&id).await?;
        while state(&db.pool, id).await? != "stopped" {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    latencies.sort();
    println!(
        "agent start-to-running, host-network busybox container ({STARTS} starts): p50 {:.1} ms, p99 {:.1} ms, min {:.1} ms, max {:.1} ms",
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies[0].as_secs_f64() * 1e3,
        latencies[latencies.len() - 1].as_secs_f64() * 1e3,
    );
    let _ = docker
        .remove_image(
            &tag,
            None::<bollard::query_parameters::RemoveImageOptions>,
            None,
        )
        .await;
    db.drop_database().await?;
    Ok(())
}
