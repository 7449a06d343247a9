//! Applying 10,000 app specs from one folder: cold (every app created), then as a no-op,
//! then the watcher's rescan of an unchanged folder (revision hash only).
//!
//! Run with scripts/bench.sh apply (it starts the test Postgres and sets
//! BERTH_TEST_DATABASE_URL). Each run uses a fresh database.

mod common;

use std::time::{Duration, Instant};

use berth::watcher::apply::{self, ApplyOptions};

const APPS: usize = 10_000;

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let bench_db = common::BenchDb::create(4).await?;
        let pool = bench_db.pool.clone();

        let dir = tempfile::tempdir()?;
        for i in 0..APPS {
            std::fs::write(
                dir.path().join(format!("app-{i:05}.yaml")),
                format!(
                    "apiVersion: berth/v1\nkind: App\nname: app-{i:05}\nimage: registry.example.com/app:{i}\nreplicas: 2\n\
                     domains: [app-{i:05}.example.com]\nhealth: {{path: /healthz}}\nenv: {{INDEX: \"{i}\"}}\n"
                ),
            )?;
        }

        let time = |label: &str, d: Duration| println!("{label:<44} {:>8.3} s", d.as_secs_f64());
        let t = Instant::now();
        let snap = berth::watcher::load_folder(dir.path()).unwrap();
        let load = t.elapsed();
        let plan = apply::apply(&pool, &snap, ApplyOptions::default()).await?;
        let cold = t.elapsed();
        assert_eq!(plan.changes.len(), APPS);
        let deployments: i64 = sqlx::query_scalar("select count(*) from deployments").fetch_one(&pool).await?;
        assert_eq!(deployments, APPS as i64);
        time("cold: read + validate 10,000 files", load);
        time("cold: read + validate + apply (one tx)", cold);

        let events_before: i64 = sqlx::query_scalar("select count(*) from events").fetch_one(&pool).await?;
        let t = Instant::now();
        let snap = berth::watcher::load_folder(dir.path()).unwrap();
        let plan = apply::apply(&pool, &snap, ApplyOptions::default()).await?;
        let noop = t.elapsed();
        assert!(!plan.has_changes());
        let events_after: i64 = sqlx::query_scalar("select count(*) from events").fetch_one(&pool).await?;
        assert_eq!(events_before, events_after, "a no-op apply writes nothing");
        time("no-op: read + validate + apply", noop);

        let t = Instant::now();
        let _ = apply::folder_revision(dir.path());
        time("no-op rescan: revision hash only (watcher)", t.elapsed());

        bench_db.drop_database().await?;
        Ok(())
    })
}
