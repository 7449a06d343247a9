//! The manager on real Postgres. The tests play the builder and the agents through the
//! same row updates those components make, and check the invariants from the rows after
//! every step.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use berth::events::controller::Reconciler;
use berth::manager::{Manager, ManagerDeps, ManagerOptions};
use berth::watcher::apply::{self, ApplyOptions};
use sqlx::PgPool;

use crate::fixtures::TestDb;

fn manager(db: &TestDb) -> Arc<Manager> {
    Manager::new(ManagerDeps {
        pool: db.pool.clone(),
        options: ManagerOptions::default(),
    })
}

async fn node(pool: &PgPool, name: &str, capacity: serde_json::Value) -> i64 {
    sqlx::query_scalar("insert into nodes (name, address, capacity, last_heartbeat_at) values ($1, '127.0.0.1', $2, now()) returning id")
        .bind(name)
        .bind(capacity)
        .fetch_one(pool)
        .await
        .unwrap()
}

fn write_spec(dir: &Path, extra: &str) {
    std::fs::write(
        dir.join("web.yaml"),
        format!("apiVersion: berth/v1\nkind: App\nname: web\nimage: busybox:1\ndomains: [web.localhost]\n{extra}"),
    )
    .unwrap();
}

async fn apply_dir(pool: &PgPool, dir: &Path, prune_empty: bool) {
    apply::apply(
        pool,
        &berth::watcher::load_folder(dir).unwrap(),
        ApplyOptions { prune_empty },
    )
    .await
    .unwrap();
}

async fn app_id(pool: &PgPool) -> i64 {
    sqlx::query_scalar("select id from apps where name = 'web'")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Plays the builder: pending builds complete with an image (or fail).
async fn builder_step(pool: &PgPool, fail: bool) {
    let builds: Vec<(i64, i64)> =
        sqlx::query_as("select id, deployment_id from image_builds where status = 'pending'")
            .fetch_all(pool)
            .await
            .unwrap();
    for (build, dep) in builds {
        if fail {
            sqlx::query("update image_builds set status = 'failed', error = 'Step 2/2 : RUN false: exit 1' where id = $1").bind(build).execute(pool).await.unwrap();
            sqlx::query("update deployments set status = 'failed', error = 'Step 2/2 : RUN false: exit 1' where id = $1").bind(dep).execute(pool).await.unwrap();
            continue;
        }
        let image: i64 = sqlx::query_scalar("insert into images (app_id, reference) select app_id, 'busybox:1' from deployments where id = $1 returning id")
            .bind(dep)
            .fetch_one(pool)
            .await
            .unwrap();
        sqlx::query("update image_builds set status = 'completed', image_id = $2 where id = $1")
            .bind(build)
            .bind(image)
            .execute(pool)
            .await
            .unwrap();
        sqlx::query("update deployments set status = 'deploying', image_id = $2 where id = $1 and status in ('pending', 'building')")
            .bind(dep)
            .bind(image)
            .execute(pool)
            .await
            .unwrap();
    }
}

/// Plays the agents: up to `start` pending instances become running; stopped ones stop.
async fn agent_step(pool: &PgPool, start: i64) {
    sqlx::query(
        "update instances set state = 'running' where id in
             (select id from instances where desired_state = 'running' and state = 'pending' order by id limit $1)",
    )
    .bind(start)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("update instances set state = 'stopped' where desired_state = 'stopped' and state not in ('stopped', 'lost')")
        .execute(pool)
        .await
        .unwrap();
}

/// (wanted live instances, healthy wanted instances) of the app.
async fn counts(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as(
        "select count(*) filter (where desired_state = 'running' and state <> 'lost'),
                count(*) filter (where desired_state = 'running' and state = 'running')
         from instances",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn status(pool: &PgPool) -> serde_json::Value {
    sqlx::query_scalar("select status from apps where name = 'web'")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Reconciles until the app is ready at its generation, checking after every step that
/// live <= replicas + surge and (once it served) healthy >= replicas - unavailable.
async fn converge(
    m: &Manager,
    pool: &PgPool,
    replicas: i64,
    surge: i64,
    unavailable: i64,
    start_per_step: i64,
) {
    let app = app_id(pool).await;
    let mut served = false;
    for _ in 0..100 {
        m.reconcile(&app).await.unwrap();
        let (live, healthy) = counts(pool).await;
        assert!(
            live <= replicas + surge,
            "{live} live instances, more than {replicas} + {surge}"
        );
        if served {
            assert!(
                healthy >= replicas - unavailable,
                "{healthy} healthy, fewer than {replicas} - {unavailable}"
            );
        }
        let s = status(pool).await;
        let (generation, observed): (i64, i64) =
            sqlx::query_as("select generation, observed_generation from apps where id = $1")
                .bind(app)
                .fetch_one(pool)
                .await
                .unwrap();
        if s["ready"] == true && generation == observed && s["reason"] == "Ready" {
            return;
        }
        served |= healthy >= replicas;
        builder_step(pool, false).await;
        agent_step(pool, start_per_step).await;
    }
    panic!("never converged: {}", status(pool).await);
}

/// An app `web` converged on one node `n1`, with its spec folder and a manager.
struct Running {
    db: TestDb,
    dir: tempfile::TempDir,
    m: Arc<Manager>,
}

async fn running(spec: &str, replicas: i64) -> Running {
    let db = TestDb::new().await;
    node(&db.pool, "n1", serde_json::json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    write_spec(dir.path(), spec);
    apply_dir(&db.pool, dir.path(), false).await;
    let m = manager(&db);
    converge(&m, &db.pool, replicas, 1, 0, replicas).await;
    Running { db, dir, m }
}

#[tokio::test]
async fn the_flow_happens_in_order_with_its_events() {
    let Running { db, .. } = running("replicas: 2\n", 2).await;
    let p = &db.pool;

    let (current, observed): (Option<i64>, i64) =
        sqlx::query_as("select current_deployment_id, observed_generation from apps")
            .fetch_one(p)
            .await
            .unwrap();
    let dep: i64 = sqlx::query_scalar("select id from deployments")
        .fetch_one(p)
        .await
        .unwrap();
    assert_eq!((current, observed), (Some(dep), 1));
    assert_eq!(
        sqlx::query_scalar::<_, String>("select status from deployments")
            .fetch_one(p)
            .await
            .unwrap(),
        "active"
    );
    // The events of DESIGN §1, in order of their first appearance.
    let subjects: Vec<String> =
        sqlx::query_scalar("select table_name || '.' || op from events order by id")
            .fetch_all(p)
            .await
            .unwrap();
    let first = |s: &str| {
        subjects
            .iter()
            .position(|x| x == s)
            .unwrap_or_else(|| panic!("{s} missing: {subjects:?}"))
    };
    let order = [
        "deployment.created",
        "image_build.created",
        "image_build.updated",
        "instance.created",
        "deployment_instance.created",
        "instance.updated",
    ];
    for w in order.windows(2) {
        assert!(
            first(w[0]) < first(w[1]),
            "{} before {}: {subjects:?}",
            w[0],
            w[1]
        );
    }
    let cutover = subjects.iter().rposition(|s| s == "app.updated").unwrap();
    assert!(
        cutover > first("instance.updated"),
        "current_deployment_id set after the instances run"
    );
}

#[tokio::test]
async fn a_rolling_update_keeps_enough_healthy_and_cleans_up() {
    let db = TestDb::new().await;
    let p = &db.pool;
    node(p, "n1", serde_json::json!({})).await;
    node(p, "n2", serde_json::json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let deploy = "replicas: 3\ndeploy: {max_surge: 1, max_unavailable: 0}\n";
    write_spec(dir.path(), deploy);
    apply_dir(p, dir.path(), false).await;
    let m = manager(&db);
    converge(&m, p, 3, 1, 0, 3).await;
    let old: i64 = sqlx::query_scalar("select id from deployments")
        .fetch_one(p)
        .await
        .unwrap();
    // Spread across both nodes.
    let nodes: i64 = sqlx::query_scalar("select count(distinct node_id) from instances")
        .fetch_one(p)
        .await
        .unwrap();
    assert_eq!(nodes, 2);

    write_spec(dir.path(), &format!("{deploy}env: {{VERSION: \"2\"}}\n"));
    apply_dir(p, dir.path(), false).await;
    // New instances become healthy one at a time.
    converge(&m, p, 3, 1, 0, 1).await;
    let new: i64 = sqlx::query_scalar("select current_deployment_id from apps")
        .fetch_one(p)
        .await
        .unwrap();
    assert_ne!(new, old);
    let old_status: String = sqlx::query_scalar("select status from deployments where id = $1")
        .bind(old)
        .fetch_one(p)
        .await
        .unwrap();
    assert_eq!(old_status, "superseded");
    let wanted_old: i64 = sqlx::query_scalar(
        "select count(*) from instances where deployment_id = $1 and desired_state = 'running'",
    )
    .bind(old)
    .fetch_one(p)
    .await
    .unwrap();
    assert_eq!(
        wanted_old, 0,
        "no instance of a superseded deployment is wanted"
    );
}

#[tokio::test]
async fn recreate_stops_the_old_before_starting_the_new() {
    let db = TestDb::new().await;
    let p = &db.pool;
    node(p, "n1", serde_json::json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    write_spec(dir.path(), "replicas: 2\ndeploy: {strategy: recreate}\n");
    apply_dir(p, dir.path(), false).await;
    let m = manager(&db);
    converge(&m, p, 2, 0, 2, 2).await;
    write_spec(
        dir.path(),
        "replicas: 2\ndeploy: {strategy: recreate}\nenv: {V: \"2\"}\n",
    );
    apply_dir(p, dir.path(), false).await;
    converge(&m, p, 2, 0, 2, 2).await;
}

#[tokio::test]
async fn a_replicas_change_scales_without_a_build() {
    let Running { db, dir, m } = running("replicas: 2\n", 2).await;
    let p = &db.pool;
    write_spec(dir.path(), "replicas: 4\n");
    apply_dir(p, dir.path(), false).await;
    converge(&m, p, 4, 0, 0, 4).await;
    let builds: i64 = sqlx::query_scalar("select count(*) from image_builds")
        .fetch_one(p)
        .await
        .unwrap();
    assert_eq!(builds, 1, "scaling needs no build");
    let (live, _) = counts(p).await;
    assert_eq!(live, 4);
    let (generation, observed): (i64, i64) =
        sqlx::query_as("select generation, observed_generation from apps")
            .fetch_one(p)
            .await
            .unwrap();
    assert_eq!((generation, observed), (2, 2));
    let closed: String =
        sqlx::query_scalar("select timeline->-1->>'message' from deployments where generation = 2")
            .fetch_one(p)
            .await
            .unwrap();
    assert!(closed.contains("replicas 2 -> 4"), "{closed}");
    // And down again: the extra instances stop.
    write_spec(dir.path(), "replicas: 1\n");
    apply_dir(p, dir.path(), false).await;
    converge(&m, p, 1, 3, 0, 1).await;
    assert_eq!(counts(p).await.0, 1);
}

#[tokio::test]
async fn deletion_stops_everything_and_releases_domains() {
    let Running { db, dir, m } = running("replicas: 2\n", 2).await;
    let p = &db.pool;
    std::fs::remove_file(dir.path().join("web.yaml")).unwrap();
    apply_dir(p, dir.path(), true).await;
    m.reconcile(&app_id(p).await).await.unwrap();
    assert_eq!(counts(p).await.0, 0);
    assert_eq!(
        sqlx::query_scalar::<_, i64>("select count(*) from domains")
            .fetch_one(p)
            .await
            .unwrap(),
        0
    );
    assert_eq!(status(p).await["reason"], "Deleted");
    assert_eq!(
        sqlx::query_scalar::<_, i64>("select count(*) from apps")
            .fetch_one(p)
            .await
            .unwrap(),
        1,
        "rows stay as history"
    );
}

#[tokio::test]
async fn a_failed_build_leaves_the_current_version_serving() {
    let Running { db, dir, m } = running("replicas: 2\n", 2).await;
    let p = &db.pool;
    let before: i64 = sqlx::query_scalar("select current_deployment_id from apps")
        .fetch_one(p)
        .await
        .unwrap();
    write_spec(dir.path(), "replicas: 2\nenv: {V: \"2\"}\n");
    apply_dir(p, dir.path(), false).await;
    let app = app_id(p).await;
    m.reconcile(&app).await.unwrap();
    builder_step(p, true).await;
    m.reconcile(&app).await.unwrap();
    let s = status(p).await;
    assert_eq!(s["reason"], "BuildFailed", "{s}");
    assert!(s["message"].as_str().unwrap().contains("RUN false"));
    assert_eq!(s["ready"], true, "the old version still serves");
    assert_eq!(
        sqlx::query_scalar::<_, i64>("select current_deployment_id from apps")
            .fetch_one(p)
            .await
            .unwrap(),
        before
    );
    assert_eq!(counts(p).await, (2, 2));
}

#[tokio::test]
async fn past_the_progress_deadline_the_rollout_fails_and_the_old_serves() {
    let db = TestDb::new().await;
    let p = &db.pool;
    node(p, "n1", serde_json::json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let deploy = "replicas: 2\ndeploy: {progress_deadline: 1s}\n";
    write_spec(dir.path(), deploy);
    apply_dir(p, dir.path(), false).await;
    let m = manager(&db);
    converge(&m, p, 2, 1, 0, 2).await;
    write_spec(dir.path(), &format!("{deploy}env: {{V: \"broken\"}}\n"));
    apply_dir(p, dir.path(), false).await;
    let app = app_id(p).await;
    m.reconcile(&app).await.unwrap();
    builder_step(p, false).await;
    m.reconcile(&app).await.unwrap();
    // The new instance never becomes healthy.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    m.reconcile(&app).await.unwrap();
    m.reconcile(&app).await.unwrap();
    let s = status(p).await;
    assert_eq!(s["reason"], "ProgressDeadlineExceeded", "{s}");
    let failed: (String, String) =
        sqlx::query_as("select status, error from deployments order by id desc limit 1")
            .fetch_one(p)
            .await
            .unwrap();
    assert_eq!(failed.0, "failed");
    let wanted_new: i64 = sqlx::query_scalar("select count(*) from instances i join deployments d on d.id = i.deployment_id where d.status = 'failed' and i.desired_state = 'running'").fetch_one(p).await.unwrap();
    assert_eq!(wanted_new, 0, "the failing new instances are stopped");
    assert_eq!(counts(p).await, (2, 2), "the old version keeps serving");
}

#[tokio::test]
async fn no_fitting_node_is_unschedulable_with_reasons() {
    let db = TestDb::new().await;
    let p = &db.pool;
    node(
        p,
        "small",
        serde_json::json!({"memory": 10 * 1024 * 1024, "cpus": 2.0}),
    )
    .await;
    let down = node(p, "gone", serde_json::json!({})).await;
    sqlx::query("update nodes set state = 'down' where id = $1")
        .bind(down)
        .execute(p)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_spec(dir.path(), "replicas: 1\nresources: {memory: 64Mi}\n");
    apply_dir(p, dir.path(), false).await;
    let m = manager(&db);
    let app = app_id(p).await;
    m.reconcile(&app).await.unwrap();
    builder_step(p, false).await;
    m.reconcile(&app).await.unwrap();
    let s = status(p).await;
    assert_eq!(s["reason"], "Unschedulable", "{s}");
    let message = s["message"].as_str().unwrap();
    assert!(
        message.contains("small: not enough memory (needs 64Mi, 10Mi of 10Mi free)")
            && message.contains("gone: down"),
        "{message}"
    );
    assert_eq!(counts(p).await.0, 0);
    // A bigger node arrives: the instance is placed there.
    node(p, "big", serde_json::json!({"memory": 1024 * 1024 * 1024})).await;
    converge(&m, p, 1, 1, 0, 1).await;
}

#[tokio::test]
async fn a_silent_node_loses_its_instances_and_they_are_replaced() {
    let db = TestDb::new().await;
    let p = &db.pool;
    let n1 = node(p, "n1", serde_json::json!({})).await;
    let n2 = node(p, "n2", serde_json::json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    write_spec(dir.path(), "replicas: 2\n");
    apply_dir(p, dir.path(), false).await;
    let m = manager(&db);
    converge(&m, p, 2, 1, 0, 2).await;
    sqlx::query("update nodes set last_heartbeat_at = now() - interval '1 minute' where id = $1")
        .bind(n1)
        .execute(p)
        .await
        .unwrap();
    let down = berth::manager::mark_silent_nodes(p, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(down, vec![n1]);
    let lost: i64 = sqlx::query_scalar("select count(*) from instances where node_id = $1 and state = 'lost' and desired_state = 'stopped'").bind(n1).fetch_one(p).await.unwrap();
    assert_eq!(lost, 1);
    converge(&m, p, 2, 1, 0, 2).await;
    let on_n2: i64 = sqlx::query_scalar(
        "select count(*) from instances where node_id = $1 and desired_state = 'running'",
    )
    .bind(n2)
    .fetch_one(p)
    .await
    .unwrap();
    assert_eq!(
        on_n2, 2,
        "the lost instance is replaced on the node that is left"
    );
}

#[tokio::test]
async fn two_managers_at_once_never_break_the_invariants() {
    let db = TestDb::new().await;
    let p = &db.pool;
    node(p, "n1", serde_json::json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    write_spec(dir.path(), "replicas: 3\ndeploy: {max_surge: 1}\n");
    apply_dir(p, dir.path(), false).await;
    let (a, b) = (manager(&db), manager(&db));
    let app = app_id(p).await;
    for round in 0..40 {
        if round == 10 {
            write_spec(
                dir.path(),
                "replicas: 3\ndeploy: {max_surge: 1}\nenv: {V: \"2\"}\n",
            );
            apply_dir(p, dir.path(), false).await;
        }
        // Duplicated work: both reconcile the same app at the same moment.
        let (x, y) = tokio::join!(a.reconcile(&app), b.reconcile(&app));
        x.unwrap();
        y.unwrap();
        let (live, _) = counts(p).await;
        assert!(live <= 4, "round {round}: {live} live instances");
        let builds: i64 =
            sqlx::query_scalar("select count(*) - count(distinct deployment_id) from image_builds")
                .fetch_one(p)
                .await
                .unwrap();
        assert_eq!(builds, 0);
        builder_step(p, false).await;
        agent_step(p, 1).await;
    }
    assert_eq!(status(p).await["reason"], "Ready");
    let stale: i64 = sqlx::query_scalar(
        "select count(*) from instances i join deployments d on d.id = i.deployment_id where d.status <> 'active' and i.desired_state = 'running'",
    )
    .fetch_one(p)
    .await
    .unwrap();
    assert_eq!(stale, 0);
}

#[tokio::test]
async fn a_resync_skips_converged_apps_and_finds_the_rest() {
    let Running { db, dir, m } = running("replicas: 2\n", 2).await;
    let p = &db.pool;
    let app = app_id(p).await;
    assert_eq!(
        m.list_keys().await.unwrap(),
        Vec::<i64>::new(),
        "a converged app needs nothing"
    );
    // Anything the manager would act on brings it back: an unhealthy instance...
    sqlx::query(
        "update instances set state = 'unhealthy' where id = (select min(id) from instances)",
    )
    .execute(p)
    .await
    .unwrap();
    assert_eq!(m.list_keys().await.unwrap(), vec![app]);
    sqlx::query("update instances set state = 'running'")
        .execute(p)
        .await
        .unwrap();
    // ...a lost one...
    sqlx::query("update instances set state = 'lost', desired_state = 'stopped' where id = (select min(id) from instances)").execute(p).await.unwrap();
    assert_eq!(m.list_keys().await.unwrap(), vec![app]);
    converge(&m, p, 2, 1, 0, 2).await;
    // ...a new generation, or a deletion with instances still wanted.
    write_spec(dir.path(), "replicas: 3\n");
    apply_dir(p, dir.path(), false).await;
    assert_eq!(m.list_keys().await.unwrap(), vec![app]);
    converge(&m, p, 3, 1, 0, 3).await;
    sqlx::query("update apps set deleted_at = now()")
        .execute(p)
        .await
        .unwrap();
    assert_eq!(m.list_keys().await.unwrap(), vec![app]);
    m.reconcile(&app).await.unwrap();
    assert_eq!(m.list_keys().await.unwrap(), Vec::<i64>::new());
}

/// Wanted live and healthy instances per app, and the live ones of superseded or failed
/// deployments (which must be none once the app settles).
async fn counts_per_app(pool: &PgPool) -> Vec<(i64, i64, i64)> {
    sqlx::query_as(
        "select app_id,
                count(*) filter (where desired_state = 'running' and state <> 'lost'),
                count(*) filter (where desired_state = 'running' and state = 'running')
         from instances group by app_id order by app_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// `berth up --components manager` as a process of its own.
fn manager_process(db: &TestDb, nats: &crate::fixtures::TestNats) -> crate::fixtures::ChildGuard {
    let data = tempfile::tempdir().unwrap().keep();
    crate::fixtures::ChildGuard(Some(
        std::process::Command::new(crate::fixtures::berth_bin())
            .args(["up", "--components", "manager"])
            .env("BERTH_DATABASE_URL", &db.url)
            .env("BERTH_NATS_URL", nats.url())
            .env("BERTH_DATA_DIR", data)
            .env("BERTH_API_LISTEN", "127.0.0.1:0")
            .env("BERTH_LOG", "berth=warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    ))
}

#[tokio::test]
async fn managers_killed_at_random_with_duplicated_events_never_break_the_invariants() {
    use crate::fixtures::{TestNats, eventually, start_listener};
    const APPS: usize = 4;
    const REPLICAS: i64 = 3;
    let db = TestDb::new().await;
    let nats = TestNats::start().await;
    let p = &db.pool;
    node(p, "n1", serde_json::json!({})).await;
    let client = nats.client().await;
    let (stop_listener, listener) = start_listener(&db, client.clone());
    let dir = tempfile::tempdir().unwrap();
    let write_all = |version: usize| {
        for a in 0..APPS {
            std::fs::write(
                dir.path().join(format!("web{a}.yaml")),
                format!("apiVersion: berth/v1\nkind: App\nname: web{a}\nimage: busybox:1\nreplicas: {REPLICAS}\ndeploy: {{max_surge: 1, max_unavailable: 0}}\nenv: {{V: \"{version}\"}}\n"),
            )
            .unwrap();
        }
    };
    write_all(0);
    apply_dir(p, dir.path(), false).await;
    let mut managers = [manager_process(&db, &nats), manager_process(&db, &nats)];
    // A small generator, seeded from the clock and printed, so a failure can be replayed.
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
        | 1;
    eprintln!("random kills: seed {seed}");
    let mut random = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut served = std::collections::HashSet::new();
    let (mut kills, mut version, mut fake_event) = (0, 0, 1_000_000_000_i64);
    for round in 0..160 {
        if round % 40 == 20 {
            version += 1;
            write_all(version);
            apply_dir(p, dir.path(), false).await;
        }
        if random(6) == 0 {
            // kill -9 one of them, leader or standby, and start a new one in its place
            let k = random(2) as usize;
            managers[k].kill();
            kills += 1;
            managers[k] = manager_process(&db, &nats);
        }
        // Duplicated events: every app gets a repeated app.updated now and then.
        if random(3) == 0 {
            let ids: Vec<i64> = sqlx::query_scalar("select id from apps")
                .fetch_all(p)
                .await
                .unwrap();
            for id in ids {
                fake_event += 1;
                let payload = berth::events::EventPayload {
                    event_id: fake_event,
                    table: "app".into(),
                    op: "updated".into(),
                    id,
                    app_id: Some(id),
                    deployment_id: None,
                    node_id: None,
                    at: chrono::Utc::now(),
                };
                client
                    .publish("app.updated", serde_json::to_vec(&payload).unwrap().into())
                    .await
                    .unwrap();
            }
        }
        builder_step(p, false).await;
        agent_step(p, 1 + random(3) as i64).await;
        sqlx::query("update nodes set last_heartbeat_at = now()")
            .execute(p)
            .await
            .unwrap();
        for (app, live, healthy) in counts_per_app(p).await {
            assert!(
                live <= REPLICAS + 1,
                "round {round}: app {app} has {live} live instances"
            );
            if served.contains(&app) {
                assert!(
                    healthy >= REPLICAS,
                    "round {round}: app {app} has {healthy} healthy instances after serving"
                );
            } else if healthy >= REPLICAS {
                served.insert(app);
            }
        }
        let doubled: i64 =
            sqlx::query_scalar("select count(*) - count(distinct deployment_id) from image_builds")
                .fetch_one(p)
                .await
                .unwrap();
        assert_eq!(doubled, 0, "two builds for one deployment");
        // A pace for the simulated agents and builder, not a wait for a condition.
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    assert!(kills > 0 && version == 4);
    // No more kills: every app settles on the last version, with nothing stale left.
    eventually(
        "every app ready at its generation",
        Duration::from_secs(60),
        || async {
            builder_step(p, false).await;
            agent_step(p, 3).await;
            sqlx::query("update nodes set last_heartbeat_at = now()")
                .execute(p)
                .await
                .unwrap();
            let settled: i64 = sqlx::query_scalar(
                "select count(*) from apps where status->>'reason' = 'Ready' and generation = observed_generation",
            )
            .fetch_one(p)
            .await
            .unwrap();
            settled == APPS as i64
        },
    )
    .await;
    let stale: i64 = sqlx::query_scalar(
        "select count(*) from instances i join apps a on a.id = i.app_id
         where i.desired_state = 'running' and i.deployment_id is distinct from a.current_deployment_id",
    )
    .fetch_one(p)
    .await
    .unwrap();
    assert_eq!(stale, 0, "instances of old deployments still wanted");
    for (app, live, healthy) in counts_per_app(p).await {
        assert_eq!((live, healthy), (REPLICAS, REPLICAS), "app {app}");
    }
    let current_generation: Vec<i64> = sqlx::query_scalar(
        "select d.generation from apps a join deployments d on d.id = a.current_deployment_id",
    )
    .fetch_all(p)
    .await
    .unwrap();
    assert_eq!(
        current_generation,
        vec![5; APPS],
        "the latest version serves"
    );
    drop(managers);
    stop_listener.cancel();
    listener.await.unwrap().unwrap();
}

#[tokio::test]
async fn applies_and_batched_reconciles_of_the_same_apps_never_deadlock() {
    const APPS: usize = 30;
    let db = TestDb::new().await;
    let p = &db.pool;
    node(p, "n1", serde_json::json!({})).await;
    let dir = tempfile::tempdir().unwrap();
    let write = |a: usize, version: usize| {
        std::fs::write(
            dir.path().join(format!("a{a:02}.yaml")),
            format!("apiVersion: berth/v1\nkind: App\nname: a{a:02}\nimage: busybox:1\nenv: {{V: \"{version}\"}}\n"),
        )
        .unwrap();
    };
    // Created one by one from the last name to the first, so the apply's name order is the
    // reverse of the id order the manager locks in.
    for a in (0..APPS).rev() {
        write(a, 0);
        apply_dir(p, dir.path(), false).await;
    }
    let ids: Vec<i64> = sqlx::query_scalar("select id from apps order by id")
        .fetch_all(p)
        .await
        .unwrap();
    let m = manager(&db);
    let done = tokio_util::sync::CancellationToken::new();
    let reconciles = tokio::spawn({
        let (m, ids, done) = (m.clone(), ids.clone(), done.clone());
        async move {
            let mut batches = 0;
            while !done.is_cancelled() {
                for result in m.reconcile_batch(&ids).await {
                    result.unwrap();
                }
                batches += 1;
            }
            batches
        }
    });
    for version in 1..=15 {
        for a in 0..APPS {
            write(a, version);
        }
        // A deadlock would fail the apply (Postgres aborts one of the two).
        apply::apply(
            p,
            &berth::watcher::load_folder(dir.path()).unwrap(),
            ApplyOptions::default(),
        )
        .await
        .unwrap();
        builder_step(p, false).await;
    }
    done.cancel();
    assert!(reconciles.await.unwrap() > 0);
    let generations: Vec<i64> = sqlx::query_scalar("select generation from apps")
        .fetch_all(p)
        .await
        .unwrap();
    assert!(generations.iter().all(|g| *g == 16), "{generations:?}");
    // A batch that lost a deadlock would be retried app by app and hide it: ask Postgres.
    // Its backends count deadlocks in their statistics, written out when they exit.
    p.close().await;
    let fresh = sqlx::PgPool::connect(&db.url).await.unwrap();
    for _ in 0..20 {
        let deadlocks: i64 = sqlx::query_scalar(
            "select deadlocks from pg_stat_database where datname = current_database()",
        )
        .fetch_one(&fresh)
        .await
        .unwrap();
        assert_eq!(deadlocks, 0, "Postgres saw deadlocks");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fresh.close().await;
}
