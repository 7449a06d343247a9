//! The builder on the real Docker engine and Postgres: images from FROM-scratch contexts,
//! engine errors surfaced, leases taken over, cancelled builds stopped, escaping contexts
//! refused.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use berth::builder::{Builder, BuilderDeps, BuilderOptions};
use berth::events::controller::{Action, Reconciler};
use berth::watcher::apply::{self, ApplyOptions};
use sqlx::{PgPool, Row};

use crate::fixtures::{
    TestDb, TestDocker, busybox, busybox_httpd_context, eventually, http_get, unique,
};

/// A unique app name (image tags are global to the engine).
fn app_name() -> String {
    unique("b").replace('_', "-")
}

fn builder(db: &TestDb, docker: &TestDocker, id: &str, lease: Duration) -> Arc<Builder> {
    Builder::new(BuilderDeps {
        pool: db.pool.clone(),
        docker: docker.docker.clone(),
        id: id.into(),
        data_dir: std::env::temp_dir(),
        options: BuilderOptions {
            lease,
            timeout: Duration::from_secs(120),
            max_attempts: 3,
            concurrency: 1,
        },
    })
}

/// Applies a folder holding `<app>.yaml` with a build of `ctx/`, then queues its build as
/// the manager does. Returns the deployment id.
async fn deploy(pool: &PgPool, root: &Path, app: &str) -> i64 {
    std::fs::write(
        root.join("app.yaml"),
        format!("apiVersion: berth/v1\nkind: App\nname: {app}\nbuild:\n  context: ctx\n"),
    )
    .unwrap();
    apply::apply(
        pool,
        &berth::watcher::load_folder(root).unwrap(),
        ApplyOptions::default(),
    )
    .await
    .unwrap();
    let dep: i64 = sqlx::query_scalar("select max(id) from deployments")
        .fetch_one(pool)
        .await
        .unwrap();
    sqlx::query("insert into image_builds (deployment_id) values ($1) on conflict do nothing")
        .bind(dep)
        .execute(pool)
        .await
        .unwrap();
    dep
}

async fn build_row(pool: &PgPool, dep: i64) -> (String, Option<String>, String, i32, Option<i64>) {
    let r = sqlx::query(
        "select status, error, log, attempts, image_id from image_builds where deployment_id = $1",
    )
    .bind(dep)
    .fetch_one(pool)
    .await
    .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
}

async fn deployment_status(pool: &PgPool, dep: i64) -> String {
    sqlx::query_scalar("select status from deployments where id = $1")
        .bind(dep)
        .fetch_one(pool)
        .await
        .unwrap()
}

fn remove_image(reference: &str) {
    let _ = std::process::Command::new("docker")
        .args(["rmi", "-f", reference])
        .output();
}

#[tokio::test]
async fn a_scratch_busybox_context_builds_logs_and_runs() {
    let db = TestDb::new().await;
    let docker = TestDocker::new().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("ctx")).unwrap();
    busybox_httpd_context(&dir.path().join("ctx"), "built by berth\n");
    std::fs::write(dir.path().join("ctx/.dockerignore"), "*.tmp\n").unwrap();
    std::fs::write(dir.path().join("ctx/big.tmp"), "ignored").unwrap();
    let app = app_name();
    let dep = deploy(&db.pool, dir.path(), &app).await;

    let b = builder(&db, &docker, "b1", Duration::from_secs(30));
    assert_eq!(b.reconcile(&dep).await.unwrap(), Action::Done);
    let (status, error, log, attempts, image_id) = build_row(&db.pool, dep).await;
    assert_eq!(
        (status.as_str(), error, attempts),
        ("completed", None, 1),
        "{log}"
    );
    assert!(
        log.contains("Step 1/4 : FROM scratch") && log.contains("Successfully tagged"),
        "{log}"
    );
    assert_eq!(deployment_status(&db.pool, dep).await, "deploying");
    let (reference, digest): (String, Option<String>) =
        sqlx::query_as("select reference, digest from images where id = $1")
            .bind(image_id.unwrap())
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(reference, format!("berth/{app}:{dep}"));
    assert!(digest.unwrap().starts_with("sha256:"));
    let on_deployment: Option<i64> =
        sqlx::query_scalar("select image_id from deployments where id = $1")
            .bind(dep)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(on_deployment, image_id);
    // .dockerignore was honoured.
    let listing = std::process::Command::new("docker")
        .args([
            "run",
            "--rm",
            "--network",
            "host",
            &reference,
            "/bin/busybox",
            "ls",
            "/",
        ])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&listing.stdout).contains("big.tmp"));

    // The image runs and serves.
    let port = berth::daemon::embedded::free_port().unwrap();
    let name = docker.name("built");
    let out = std::process::Command::new("docker")
        .args([
            "run",
            "-d",
            "--name",
            &name,
            "--network",
            "host",
            "-e",
            &format!("PORT={port}"),
            &reference,
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = format!("http://127.0.0.1:{port}/");
    eventually("the built image serving", Duration::from_secs(15), || {
        let url = url.clone();
        async move {
            http_get(&url)
                .await
                .is_some_and(|(s, b)| s == 200 && b.contains("built by berth"))
        }
    })
    .await;
    drop(docker);
    remove_image(&reference);
}

#[tokio::test]
async fn engine_errors_fail_the_build_and_the_app_keeps_its_version() {
    let db = TestDb::new().await;
    let docker = TestDocker::new().await;
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::copy(busybox(), ctx.join("busybox")).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\n",
    )
    .unwrap();
    let app = app_name();
    let good = deploy(&db.pool, dir.path(), &app).await;
    let b = builder(&db, &docker, "b1", Duration::from_secs(30));
    b.reconcile(&good).await.unwrap();
    // As the manager does at cutover.
    sqlx::query("update apps set current_deployment_id = $1")
        .bind(good)
        .execute(&db.pool)
        .await
        .unwrap();

    for (dockerfile, expected) in [
        (
            "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"false\"]\n",
            "returned a non-zero code: 1",
        ),
        ("FROM scratch\nCOPY not-there /x\n", "not-there"),
    ] {
        std::fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
        // A changed spec makes a new deployment; the build args make the spec differ.
        std::fs::write(
            dir.path().join("app.yaml"),
            format!("apiVersion: berth/v1\nkind: App\nname: {app}\nbuild:\n  context: ctx\n  args: {{V: \"{}\"}}\n", dockerfile.len()),
        )
        .unwrap();
        apply::apply(
            &db.pool,
            &berth::watcher::load_folder(dir.path()).unwrap(),
            ApplyOptions::default(),
        )
        .await
        .unwrap();
        let dep: i64 = sqlx::query_scalar("select max(id) from deployments")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        sqlx::query("insert into image_builds (deployment_id) values ($1)")
            .bind(dep)
            .execute(&db.pool)
            .await
            .unwrap();
        b.reconcile(&dep).await.unwrap();
        let (status, error, log, _, image) = build_row(&db.pool, dep).await;
        let error = error.unwrap_or_default();
        assert_eq!(status, "failed");
        assert!(
            error.contains(expected) && error.starts_with("Step "),
            "{error}\n{log}"
        );
        assert!(image.is_none());
        let (dep_status, dep_error): (String, Option<String>) =
            sqlx::query_as("select status, error from deployments where id = $1")
                .bind(dep)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(
            (dep_status.as_str(), dep_error.as_deref()),
            ("failed", Some(error.as_str()))
        );
        let (current, app_status): (Option<i64>, serde_json::Value) =
            sqlx::query_as("select current_deployment_id, status from apps")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert_eq!(current, Some(good), "the app keeps its previous deployment");
        assert_eq!(app_status["reason"], "BuildFailed");
        assert!(app_status["message"].as_str().unwrap().contains(expected));
    }
    remove_image(&format!("berth/{app}:{good}"));
}

/// A context whose build takes a few seconds.
fn slow_context(ctx: &Path, seconds: u32) {
    std::fs::create_dir_all(ctx).unwrap();
    std::fs::copy(busybox(), ctx.join("busybox")).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        format!("FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"sleep\", \"{seconds}\"]\n"),
    )
    .unwrap();
}

#[tokio::test]
async fn a_dead_builders_build_is_finished_by_another_after_its_lease() {
    let db = TestDb::new().await;
    let docker = TestDocker::new().await;
    let dir = tempfile::tempdir().unwrap();
    slow_context(&dir.path().join("ctx"), 3);
    let app = app_name();
    let dep = deploy(&db.pool, dir.path(), &app).await;

    let lease = Duration::from_secs(2);
    let a = builder(&db, &docker, "a", lease);
    let b = builder(&db, &docker, "b", lease);
    let dying = tokio::spawn(async move { a.reconcile(&dep).await });
    eventually("a building", Duration::from_secs(10), || async {
        deployment_status(&db.pool, dep).await == "building"
    })
    .await;
    dying.abort(); // builder a dies mid-build: no renewal, no result
    let _ = dying.await;

    // While a's lease runs, b leaves the build alone and comes back when it expires.
    let action = b.reconcile(&dep).await.unwrap();
    let Action::RequeueAfter(wait) = action else {
        panic!("expected a requeue, got {action:?}")
    };
    assert!(wait <= lease + Duration::from_millis(200));
    tokio::time::sleep(wait).await;
    b.reconcile(&dep).await.unwrap();
    let (status, _, log, attempts, image) = build_row(&db.pool, dep).await;
    assert_eq!((status.as_str(), attempts), ("completed", 2), "{log}");
    assert!(image.is_some());
    let images: i64 = sqlx::query_scalar("select count(*) from images")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(images, 1, "one build records one image");
    assert_eq!(deployment_status(&db.pool, dep).await, "deploying");
    remove_image(&format!("berth/{app}:{dep}"));
}

#[tokio::test]
async fn a_build_whose_deployment_is_cancelled_stops() {
    let db = TestDb::new().await;
    let docker = TestDocker::new().await;
    let dir = tempfile::tempdir().unwrap();
    slow_context(&dir.path().join("ctx"), 30);
    let app = app_name();
    let dep = deploy(&db.pool, dir.path(), &app).await;
    let b = builder(&db, &docker, "b1", Duration::from_millis(900));
    let started = std::time::Instant::now();
    let run = tokio::spawn({
        let b = b.clone();
        async move { b.reconcile(&dep).await }
    });
    eventually("building", Duration::from_secs(10), || async {
        deployment_status(&db.pool, dep).await == "building"
    })
    .await;
    // A newer deployment arrives: the watcher cancels this one.
    sqlx::query("update deployments set status = 'cancelled' where id = $1")
        .bind(dep)
        .execute(&db.pool)
        .await
        .unwrap();
    run.await.unwrap().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "stopped long before the 30 s build would end"
    );
    assert_eq!(build_row(&db.pool, dep).await.0, "cancelled");
    // A pending build of a cancelled deployment is cancelled without being claimed.
    let other = tempfile::tempdir().unwrap();
    slow_context(&other.path().join("ctx"), 1);
    let dep2 = deploy(&db.pool, other.path(), &app_name()).await;
    sqlx::query("update deployments set status = 'cancelled' where id = $1")
        .bind(dep2)
        .execute(&db.pool)
        .await
        .unwrap();
    b.reconcile(&dep2).await.unwrap();
    assert_eq!(
        build_row(&db.pool, dep2).await,
        ("cancelled".to_string(), None, String::new(), 0, None)
    );
}

#[tokio::test]
async fn a_context_with_a_symlink_leaving_it_is_refused() {
    let db = TestDb::new().await;
    let docker = TestDocker::new().await;
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\nCOPY secrets /secrets\n",
    )
    .unwrap();
    std::os::unix::fs::symlink("/etc/passwd", ctx.join("secrets")).unwrap();
    let dep = deploy(&db.pool, dir.path(), &app_name()).await;
    builder(&db, &docker, "b1", Duration::from_secs(30))
        .reconcile(&dep)
        .await
        .unwrap();
    let (status, error, ..) = build_row(&db.pool, dep).await;
    assert_eq!(status, "failed");
    assert_eq!(
        error.as_deref(),
        Some("symlink `secrets` points outside the build context")
    );
}

#[tokio::test]
async fn a_builder_at_its_limit_claims_nothing_more() {
    use berth::events::controller::{ControllerOptions, run_workers};
    use berth::events::queue::WorkQueue;
    let db = TestDb::new().await;
    let docker = TestDocker::new().await;
    let mut deps = Vec::new();
    let mut dirs = Vec::new();
    for _ in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        slow_context(&dir.path().join("ctx"), 1);
        let app = app_name();
        deps.push((deploy(&db.pool, dir.path(), &app).await, app));
        dirs.push(dir);
    }
    let b = builder(&db, &docker, "b1", Duration::from_secs(30));
    let queue = WorkQueue::new();
    berth::events::controller::resync(&*b, &queue)
        .await
        .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let options = ControllerOptions {
        concurrency: 1,
        ..ControllerOptions::new("builder", vec![])
    };
    let workers = tokio::spawn({
        let (b, q, s) = (b.clone(), queue.clone(), shutdown.clone());
        async move { run_workers(b, q, &options, &berth::metrics::Metrics::new(), s).await }
    });
    let max_running = Arc::new(std::sync::atomic::AtomicI64::new(0));
    eventually(
        "all three built, one at a time",
        Duration::from_secs(60),
        || {
            let pool = db.pool.clone();
            let max = max_running.clone();
            async move {
                let running: i64 = sqlx::query_scalar(
                    "select count(*) from image_builds where status = 'running'",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                max.fetch_max(running, std::sync::atomic::Ordering::SeqCst);
                let done: i64 = sqlx::query_scalar(
                    "select count(*) from image_builds where status = 'completed'",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                done == 3
            }
        },
    )
    .await;
    assert_eq!(max_running.load(std::sync::atomic::Ordering::SeqCst), 1);
    shutdown.cancel();
    workers.await.unwrap();
    for (dep, app) in deps {
        remove_image(&format!("berth/{app}:{dep}"));
    }
}
