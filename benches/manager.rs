//! The manager with 10,000 apps over 100 simulated nodes: placements per second, a no-op
//! full resync, and the process RSS. The benchmark plays the builder and the agents with
//! bulk row updates (the same rows they write).
//!
//! Run with scripts/bench.sh manager.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use berth::events::controller::{ControllerOptions, resync, run_workers};
use berth::events::queue::WorkQueue;
use berth::manager::{Manager, ManagerDeps};
use berth::watcher::apply::{self, ApplyOptions};
use tokio_util::sync::CancellationToken;

const APPS: usize = 10_000;
const NODES: usize = 100;

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// A full resync: every app not visibly converged goes through the manager once. Returns
/// how many were reconciled and the time from the resync query to the last reconcile.
async fn full_pass(
    manager: &Arc<Manager>,
    pool: &sqlx::PgPool,
) -> anyhow::Result<(usize, Duration)> {
    let queue = WorkQueue::new();
    let started = Instant::now();
    let keys = resync(&**manager, &queue).await?;
    let shutdown = CancellationToken::new();
    let options = ControllerOptions {
        concurrency: 8,
        ..ControllerOptions::new("manager", vec![])
    };
    let metrics = berth::metrics::Metrics::new();
    let workers = tokio::spawn({
        let (m, q, s, metrics) = (
            manager.clone(),
            queue.clone(),
            shutdown.clone(),
            metrics.clone(),
        );
        async move { run_workers(m, q, &options, &metrics, s).await }
    });
    let _ = pool;
    let count = metrics.histogram(
        "berth_reconcile_duration_seconds",
        "",
        &[("component", "manager")],
    );
    while (count.count() as usize) < keys {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = started.elapsed();
    shutdown.cancel();
    workers.await?;
    Ok((keys, took))
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let db = common::BenchDb::create(16).await?;
        let pool = db.pool.clone();
        sqlx::query(
            "insert into nodes (name, address, capacity, last_heartbeat_at)
             select 'node-' || g, '127.0.0.1', '{\"memory\": 68719476736, \"cpus\": 64}', now() from generate_series(1, $1) g",
        )
        .bind(NODES as i32)
        .execute(&pool)
        .await?;
        let dir = tempfile::tempdir()?;
        for i in 0..APPS {
            std::fs::write(
                dir.path().join(format!("app-{i:05}.yaml")),
                format!("apiVersion: berth/v1\nkind: App\nname: app-{i:05}\nimage: registry.example.com/app:{i}\nresources: {{memory: 64Mi}}\n"),
            )?;
        }
        apply::apply(&pool, &berth::watcher::load_folder(dir.path()).unwrap(), ApplyOptions::default()).await?;
        let manager = Manager::new(ManagerDeps { pool: pool.clone(), options: Default::default() });

        let (n, t) = full_pass(&manager, &pool).await?;
        println!("pass 1: {n} pending deployments get their builds       {:>7.2} s", t.as_secs_f64());
        // The builder's part, in bulk.
        sqlx::query(
            "with i as (insert into images (app_id, reference) select app_id, 'registry.example.com/app' from deployments returning id, app_id)
             update deployments d set status = 'deploying', image_id = i.id from i where i.app_id = d.app_id",
        )
        .execute(&pool)
        .await?;
        sqlx::query("update image_builds set status = 'completed'").execute(&pool).await?;
        let (_, t) = full_pass(&manager, &pool).await?;
        let placed: i64 = sqlx::query_scalar("select count(*) from instances").fetch_one(&pool).await?;
        let spread: i64 = sqlx::query_scalar("select max(c) - min(c) from (select count(*) c from instances group by node_id) x").fetch_one(&pool).await?;
        println!(
            "pass 2: {placed} instances placed on {NODES} nodes             {:>7.2} s = {:.0} placements/s (max-min per node: {spread})",
            t.as_secs_f64(),
            placed as f64 / t.as_secs_f64()
        );
        // The agents' part, in bulk.
        sqlx::query("update instances set state = 'running'").execute(&pool).await?;
        let (_, t) = full_pass(&manager, &pool).await?;
        let ready: i64 = sqlx::query_scalar("select count(*) from apps where status->>'reason' = 'Ready'").fetch_one(&pool).await?;
        println!("pass 3: cut over ({ready} apps ready)                        {:>7.2} s", t.as_secs_f64());
        let events_before: i64 = sqlx::query_scalar("select count(*) from events").fetch_one(&pool).await?;
        let (n, t) = full_pass(&manager, &pool).await?;
        let events_after: i64 = sqlx::query_scalar("select count(*) from events").fetch_one(&pool).await?;
        println!(
            "pass 4: no-op full resync of 10,000 apps                  {:>7.3} s ({n} apps needed a reconcile, {} rows changed)",
            t.as_secs_f64(),
            events_after - events_before
        );
        // The same resync when every app is reconciled anyway (a worst case: all unsettled).
        sqlx::query("update apps set status = jsonb_set(status, '{reason}', '\"Progressing\"')").execute(&pool).await?;
        let (n, t) = full_pass(&manager, &pool).await?;
        println!("pass 5: resync with every app unsettled ({n} reconciles, each rewrites its status) {:>7.2} s", t.as_secs_f64());
        println!("manager process RSS (bench process, manager + driver)     {:>7.1} MB", rss_mb());
        db.drop_database().await?;
        Ok(())
    })
}
