//! The listener on real Postgres and nats-server: every committed change arrives on its
//! subject with its payload, once, through kills of the listener (task and process), NATS
//! outages and a standby taking over.

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use berth::events::EventPayload;
use futures_util::StreamExt;
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;

use crate::fixtures::{ChildGuard, TestDb, TestNats, berth_bin, eventually, start_listener};

async fn unpublished(pool: &PgPool) -> i64 {
    sqlx::query_scalar("select count(*) from events where published_at is null")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn published(pool: &PgPool) -> i64 {
    sqlx::query_scalar("select count(*) from events where published_at is not null")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A fresh database, a private nats-server with the stream, and a client of it.
async fn setup() -> (TestDb, TestNats, async_nats::Client) {
    let db = TestDb::new().await;
    let nats = TestNats::start().await;
    let client = nats.client().await;
    berth::events::ensure_stream(&jetstream::new(client.clone()))
        .await
        .unwrap();
    (db, nats, client)
}

/// Every message in the stream, read by a fresh consumer from the start.
async fn read_all(nats: &TestNats) -> Vec<(String, EventPayload)> {
    let js = jetstream::new(nats.client().await);
    let stream = js.get_stream(berth::events::STREAM).await.unwrap();
    let expected = stream.clone().info().await.unwrap().state.messages as usize;
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut out = Vec::with_capacity(expected);
    let mut messages = consumer.messages().await.unwrap();
    while out.len() < expected {
        let msg = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .expect("messages keep coming")
            .unwrap()
            .unwrap();
        out.push((
            msg.subject.to_string(),
            serde_json::from_slice(&msg.payload).unwrap(),
        ));
    }
    out
}

/// Asserts the stream holds each event of the outbox exactly once.
async fn assert_each_event_once(db: &TestDb, nats: &TestNats) {
    let total: i64 = sqlx::query_scalar("select count(*) from events")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let got = read_all(nats).await;
    let ids: HashSet<i64> = got.iter().map(|(_, e)| e.event_id).collect();
    assert_eq!(ids.len(), got.len(), "an event was delivered twice");
    assert_eq!(got.len() as i64, total, "an event is missing");
}

/// Commits `n` changes in transactions of 50 rows, while other things happen.
async fn burst(pool: PgPool, n: usize) {
    let prefix = crate::fixtures::unique("b");
    for chunk in 0..n / 50 {
        let mut tx = pool.begin().await.unwrap();
        sqlx::query("insert into nodes (name, address) select $2 || '-' || $1 || '-' || g, '127.0.0.1' from generate_series(1, 50) g")
            .bind(chunk as i64)
            .bind(&prefix)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
}

/// (subject, event id, row id, app id, deployment id, node id)
type EventRow = (String, i64, i64, Option<i64>, Option<i64>, Option<i64>);

#[tokio::test]
async fn every_change_arrives_on_its_subject_with_its_payload_in_order() {
    let (db, nats, client) = setup().await;
    let (stop, task) = start_listener(&db, client);
    let p = &db.pool;
    let node: i64 = sqlx::query_scalar(
        "insert into nodes (name, address) values ('n1', '127.0.0.1') returning id",
    )
    .fetch_one(p)
    .await
    .unwrap();
    let app: i64 =
        sqlx::query_scalar("insert into apps (name, source) values ('a', 's') returning id")
            .fetch_one(p)
            .await
            .unwrap();
    let dep: i64 = sqlx::query_scalar("insert into deployments (app_id, generation, spec, spec_hash) values ($1, 1, '{}', 'h') returning id").bind(app).fetch_one(p).await.unwrap();
    sqlx::query("insert into image_builds (deployment_id) values ($1)")
        .bind(dep)
        .execute(p)
        .await
        .unwrap();
    let inst: i64 = sqlx::query_scalar(
        "insert into instances (app_id, deployment_id, node_id) values ($1, $2, $3) returning id",
    )
    .bind(app)
    .bind(dep)
    .bind(node)
    .fetch_one(p)
    .await
    .unwrap();
    sqlx::query("insert into deployment_instances (deployment_id, instance_id) values ($1, $2)")
        .bind(dep)
        .bind(inst)
        .execute(p)
        .await
        .unwrap();
    sqlx::query("insert into domains (app_id, hostname) values ($1, 'a.localhost')")
        .bind(app)
        .execute(p)
        .await
        .unwrap();
    for state in ["starting", "running", "stopping", "stopped"] {
        sqlx::query("update instances set state = $1 where id = $2")
            .bind(state)
            .bind(inst)
            .execute(p)
            .await
            .unwrap();
    }
    sqlx::query("update image_builds set status = 'running'")
        .execute(p)
        .await
        .unwrap();
    sqlx::query("delete from domains").execute(p).await.unwrap();
    sqlx::query("delete from deployment_instances")
        .execute(p)
        .await
        .unwrap();
    eventually("everything published", Duration::from_secs(10), || async {
        unpublished(p).await == 0
    })
    .await;

    let expected: Vec<EventRow> = sqlx::query(
        "select table_name || '.' || op, id, row_id, app_id, deployment_id, node_id from events order by id",
    )
    .fetch_all(p)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
    .collect();
    let got: Vec<_> = read_all(&nats)
        .await
        .into_iter()
        .map(|(subject, e)| {
            assert_eq!(subject, e.subject());
            (
                subject,
                e.event_id,
                e.id,
                e.app_id,
                e.deployment_id,
                e.node_id,
            )
        })
        .collect();
    assert_eq!(got, expected);
    let subjects: HashSet<&str> = got.iter().map(|g| g.0.as_str()).collect();
    for s in [
        "node.created",
        "app.created",
        "deployment.created",
        "image_build.created",
        "image_build.updated",
        "instance.created",
        "instance.updated",
        "deployment_instance.created",
        "deployment_instance.deleted",
        "domain.created",
        "domain.deleted",
    ] {
        assert!(subjects.contains(s), "{s} missing");
    }
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn killing_the_listener_task_mid_burst_loses_and_repeats_nothing() {
    let (db, nats, client) = setup().await;
    let writer = tokio::spawn(burst(db.pool.clone(), 10_000));
    let (_, task) = start_listener(&db, client.clone());
    eventually("some events published", Duration::from_secs(20), || async {
        published(&db.pool).await > 1500
    })
    .await;
    task.abort();
    let _ = task.await;
    let at_kill = published(&db.pool).await;
    let (stop, task) = start_listener(&db, client);
    writer.await.unwrap();
    eventually("all 10,000 published", Duration::from_secs(60), || async {
        unpublished(&db.pool).await == 0
    })
    .await;
    assert!(at_kill < 10_000, "the kill happened mid-burst");
    assert_each_event_once(&db, &nats).await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

fn listener_process(db: &TestDb, nats: &TestNats, data: &std::path::Path) -> ChildGuard {
    ChildGuard(Some(
        Command::new(berth_bin())
            .args(["up", "--components", "listener"])
            .env("BERTH_DATABASE_URL", &db.url)
            .env("BERTH_NATS_URL", nats.url())
            .env("BERTH_DATA_DIR", data)
            .env("BERTH_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    ))
}

#[tokio::test]
async fn sigkilling_a_listener_process_mid_burst_loses_and_repeats_nothing() {
    let db = TestDb::new().await;
    let nats = TestNats::start().await;
    let data = tempfile::tempdir().unwrap();
    let writer = tokio::spawn(burst(db.pool.clone(), 10_000));
    let mut child = listener_process(&db, &nats, data.path());
    eventually("some events published", Duration::from_secs(30), || async {
        published(&db.pool).await > 1500
    })
    .await;
    child.kill(); // SIGKILL
    let mut child = listener_process(&db, &nats, data.path());
    writer.await.unwrap();
    eventually("all 10,000 published", Duration::from_secs(60), || async {
        unpublished(&db.pool).await == 0
    })
    .await;
    assert_each_event_once(&db, &nats).await;
    child.kill();
}

#[tokio::test]
async fn a_nats_outage_mid_burst_only_delays() {
    let (db, mut nats, client) = setup().await;
    let (stop, task) = start_listener(&db, client);
    let writer = tokio::spawn(burst(db.pool.clone(), 5_000));
    eventually("some events published", Duration::from_secs(20), || async {
        published(&db.pool).await > 500
    })
    .await;
    nats.kill();
    writer.await.unwrap();
    let during = unpublished(&db.pool).await;
    assert!(during > 0, "events wait while NATS is down");
    nats.restart().await;
    eventually(
        "all published after NATS came back",
        Duration::from_secs(60),
        || async { unpublished(&db.pool).await == 0 },
    )
    .await;
    assert_each_event_once(&db, &nats).await;
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn only_one_listener_publishes_and_a_standby_takes_over() {
    let (db, nats, client) = setup().await;
    let metrics_a = berth::metrics::Metrics::new();
    let metrics_b = berth::metrics::Metrics::new();
    let spawn = |metrics: Arc<berth::metrics::Metrics>| {
        let deps = berth::listener::ListenerDeps {
            pool: db.pool.clone(),
            database_url: db.url.clone(),
            nats: client.clone(),
            metrics,
            options: Default::default(),
        };
        tokio::spawn(berth::listener::run(deps, CancellationToken::new()))
    };
    let a = spawn(metrics_a.clone());
    eventually("a leads", Duration::from_secs(10), || async {
        sqlx::query(
            "insert into nodes (name, address) values (gen_random_uuid()::text, '127.0.0.1')",
        )
        .execute(&db.pool)
        .await
        .unwrap();
        published(&db.pool).await > 0
    })
    .await;
    let b = spawn(metrics_b.clone());
    burst(db.pool.clone(), 1_000).await;
    eventually("burst published", Duration::from_secs(20), || async {
        unpublished(&db.pool).await == 0
    })
    .await;
    let count =
        |m: &berth::metrics::Metrics| m.counter("berth_events_published_total", "", &[]).get();
    // The counter moves just after the rows are marked published: wait for it too.
    eventually("a counted the burst", Duration::from_secs(5), || async {
        count(&metrics_a) >= 1_000
    })
    .await;
    assert_eq!(count(&metrics_b), 0, "the standby published nothing");

    a.abort();
    let _ = a.await;
    let killed = std::time::Instant::now();
    burst(db.pool.clone(), 100).await;
    eventually("the standby publishes", Duration::from_secs(10), || async {
        unpublished(&db.pool).await == 0
    })
    .await;
    assert!(
        killed.elapsed() < Duration::from_secs(5),
        "took over within a few seconds"
    );
    eventually(
        "b counted what it published",
        Duration::from_secs(5),
        || async { count(&metrics_b) >= 100 },
    )
    .await;
    assert_each_event_once(&db, &nats).await;
    b.abort();
}

#[tokio::test]
async fn a_postgres_restart_makes_the_listener_reconnect_and_carry_on() {
    use berth::daemon::embedded::{Embedded, free_port};
    use std::os::unix::fs::PermissionsExt;
    // A Postgres of its own, restarted in place on the same port.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let nats = TestNats::start().await;
    let port = free_port().unwrap();
    let mut pg = Embedded::start_at(dir.path(), None, Some(nats.url()), Some(port))
        .await
        .unwrap();
    let url = pg.database_url.clone().unwrap();
    let pool = berth::db::connect(&url, 4).await.unwrap();
    berth::db::migrate(&pool).await.unwrap();
    let client = nats.client().await;
    berth::events::ensure_stream(&jetstream::new(client.clone()))
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let deps = berth::listener::ListenerDeps {
        pool: pool.clone(),
        database_url: url.clone(),
        nats: client,
        metrics: berth::metrics::Metrics::new(),
        options: Default::default(),
    };
    let task = tokio::spawn(berth::listener::run(deps, shutdown.clone()));
    burst(pool.clone(), 500).await;
    eventually(
        "the first burst published",
        Duration::from_secs(20),
        || async { unpublished(&pool).await == 0 },
    )
    .await;

    pg.stop().await;
    let mut pg = Embedded::start_at(dir.path(), None, Some(nats.url()), Some(port))
        .await
        .unwrap();
    let mut again = false;
    for _ in 0..100 {
        if sqlx::query("select 1").execute(&pool).await.is_ok() {
            again = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(again, "the pool reconnects");
    burst(pool.clone(), 500).await;
    eventually(
        "the second burst published after the restart",
        Duration::from_secs(30),
        || async { unpublished(&pool).await == 0 },
    )
    .await;
    let total: i64 = sqlx::query_scalar("select count(*) from events")
        .fetch_one(&pool)
        .await
        .unwrap();
    let got = read_all(&nats).await;
    let ids: HashSet<i64> = got.iter().map(|(_, e)| e.event_id).collect();
    assert_eq!((ids.len(), got.len() as i64), (got.len(), total));
    shutdown.cancel();
    task.await.unwrap().unwrap();
    pool.close().await;
    pg.stop().await;
}

/// Records which app ids it reconciled; lists every app for resyncs.
struct AppRecorder {
    pool: PgPool,
    seen: std::sync::Mutex<Vec<i64>>,
}

impl berth::events::controller::Reconciler for AppRecorder {
    type Key = i64;
    fn name(&self) -> &'static str {
        "recorder"
    }
    fn keys_for(&self, event: &EventPayload) -> Vec<i64> {
        event.app_id.into_iter().collect()
    }
    async fn list_keys(&self) -> anyhow::Result<Vec<i64>> {
        Ok(sqlx::query_scalar("select id from apps")
            .fetch_all(&self.pool)
            .await?)
    }
    async fn reconcile(&self, key: &i64) -> anyhow::Result<berth::events::controller::Action> {
        // Reads the truth, as a real reconciler does.
        let exists: bool = sqlx::query_scalar("select exists (select 1 from apps where id = $1)")
            .bind(key)
            .fetch_one(&self.pool)
            .await?;
        if exists {
            self.seen.lock().unwrap().push(*key);
        }
        Ok(berth::events::controller::Action::Done)
    }
}

#[tokio::test]
async fn a_controller_gets_keys_from_events_and_resyncs() {
    use berth::events::controller::{ControllerOptions, run_controller};
    let db = TestDb::new().await;
    let nats = TestNats::start().await;
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    berth::events::ensure_stream(&js).await.unwrap();
    let before: i64 =
        sqlx::query_scalar("insert into apps (name, source) values ('old', 's') returning id")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let (stop_listener, listener) = start_listener(&db, client);
    let recorder = Arc::new(AppRecorder {
        pool: db.pool.clone(),
        seen: Default::default(),
    });
    let shutdown = CancellationToken::new();
    let options = ControllerOptions {
        resync: Duration::from_millis(500),
        ..ControllerOptions::new("recorder", vec!["app", "deployment"])
    };
    let metrics = berth::metrics::Metrics::new();
    let controller = tokio::spawn(run_controller(
        recorder.clone(),
        js,
        options,
        metrics.clone(),
        shutdown.clone(),
    ));

    // The resync at start finds the app that existed before.
    eventually(
        "the app from before, by resync",
        Duration::from_secs(10),
        || async { recorder.seen.lock().unwrap().contains(&before) },
    )
    .await;
    // A new deployment's event brings its app.
    let app: i64 =
        sqlx::query_scalar("insert into apps (name, source) values ('new', 's') returning id")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    sqlx::query(
        "insert into deployments (app_id, generation, spec, spec_hash) values ($1, 1, '{}', 'h')",
    )
    .bind(app)
    .execute(&db.pool)
    .await
    .unwrap();
    eventually("the new app, by event", Duration::from_secs(10), || async {
        recorder.seen.lock().unwrap().contains(&app)
    })
    .await;
    // Periodic resyncs keep coming.
    eventually("resyncs repeat", Duration::from_secs(10), || async {
        recorder
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|k| **k == before)
            .count()
            >= 3
    })
    .await;
    assert!(
        metrics
            .render()
            .contains("berth_reconcile_duration_seconds_count{component=\"recorder\"}")
    );
    // The durable consumers exist, one per table.
    let stream = jetstream::new(nats.client().await)
        .get_stream(berth::events::STREAM)
        .await
        .unwrap();
    for name in ["recorder-app", "recorder-deployment"] {
        stream
            .get_consumer::<consumer::pull::Config>(name)
            .await
            .unwrap();
    }
    shutdown.cancel();
    controller.await.unwrap().unwrap();
    stop_listener.cancel();
    listener.await.unwrap().unwrap();
}
