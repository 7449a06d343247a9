//! The watcher and apply: folders and Git repositories become exactly the expected app and
//! deployment rows, on real Postgres, real files and real git repositories.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use berth::watcher::apply::{self, ApplyOptions, Change};
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;

use crate::fixtures::{TestDb, TestNats, berth_bin, eventually};

fn spec(name: &str, replicas: u32, domain: &str) -> String {
    format!(
        "apiVersion: berth/v1\nkind: App\nname: {name}\nimage: busybox:1\nreplicas: {replicas}\ndomains: [{domain}]\n"
    )
}

fn write(dir: &Path, file: &str, text: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(file), text).unwrap();
}

async fn apply_folder(pool: &PgPool, dir: &Path, prune_empty: bool) -> apply::Plan {
    let snap = berth::watcher::load_folder(dir).expect("folder exists");
    apply::apply(pool, &snap, ApplyOptions { prune_empty })
        .await
        .unwrap()
}

async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

async fn events(pool: &PgPool) -> i64 {
    count(pool, "select count(*) from events").await
}

/// (name, generation, deleted, spec_error) of every app.
async fn apps(pool: &PgPool) -> Vec<(String, i64, bool, Option<String>)> {
    sqlx::query(
        "select name, generation, deleted_at is not null, spec_error from apps order by name",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

/// (app, generation, status) of every deployment, in id order.
async fn deployments(pool: &PgPool) -> Vec<(String, i64, String)> {
    sqlx::query("select a.name, d.generation, d.status from deployments d join apps a on a.id = d.app_id order by d.id")
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

fn dep(app: &str, generation: i64, status: &str) -> (String, i64, String) {
    (app.into(), generation, status.into())
}

#[tokio::test]
async fn apply_writes_exactly_what_changed() {
    let db = TestDb::new().await;
    let p = &db.pool;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("specs");
    write(&root, "a.yaml", &spec("a", 1, "a.localhost"));
    write(&root, "b.yaml", &spec("b", 1, "b.localhost"));

    let plan = apply_folder(p, &root, false).await;
    assert_eq!(
        plan.changes,
        vec![
            Change::Create { name: "a".into() },
            Change::Create { name: "b".into() }
        ]
    );
    assert_eq!(
        deployments(p).await,
        vec![dep("a", 1, "pending"), dep("b", 1, "pending")]
    );
    assert_eq!(count(p, "select count(*) from domains").await, 2);
    let rev: String = sqlx::query_scalar("select source_revision from deployments limit 1")
        .fetch_one(p)
        .await
        .unwrap();
    assert_eq!(rev, plan.revision);

    // The same specs, reformatted with keys reordered and defaults spelled out: nothing written.
    let before = events(p).await;
    write(
        &root,
        "a.yaml",
        "# reformatted\nname: a\nreplicas: 1\ndomains:\n  - A.localhost\nkind: App\napiVersion: berth/v1\nimage: \"busybox:1\"\nruntime: docker\n",
    );
    let plan = apply_folder(p, &root, false).await;
    assert!(!plan.has_changes(), "{plan:?}");
    assert_eq!(events(p).await, before, "a no-op apply raises no event");

    // A real change: a new generation and deployment; the pending one is cancelled.
    write(&root, "a.yaml", &spec("a", 3, "a.localhost"));
    let plan = apply_folder(p, &root, false).await;
    assert_eq!(
        plan.changes[0],
        Change::Update {
            name: "a".into(),
            fields: vec!["replicas".into()]
        }
    );
    assert_eq!(
        deployments(p).await,
        vec![
            dep("a", 1, "cancelled"),
            dep("b", 1, "pending"),
            dep("a", 2, "pending")
        ]
    );

    // A broken spec keeps the app and its deployments; the status says where.
    write(
        &root,
        "b.yaml",
        &format!("{}replica: 2\n", spec("b", 1, "b.localhost")),
    );
    apply_folder(p, &root, false).await;
    let status: serde_json::Value = sqlx::query_scalar("select status from apps where name = 'b'")
        .fetch_one(p)
        .await
        .unwrap();
    assert_eq!(status["reason"], "InvalidSpec");
    let message = status["message"].as_str().unwrap();
    assert!(
        message.contains("b.yaml:7:1: replica: unknown field `replica` (did you mean `replicas`?)"),
        "{message}"
    );
    // A syntax error, where even the name is unreadable, keeps the app too.
    write(&root, "b.yaml", "apiVersion: berth/v1\nname: [b\n");
    apply_folder(p, &root, false).await;
    let rows = apps(p).await;
    assert!(!rows[1].2, "b is not deleted");
    assert!(
        rows[1].3.as_deref().unwrap().contains("b.yaml:"),
        "{:?}",
        rows[1]
    );
    assert_eq!(
        deployments(p).await.len(),
        3,
        "no deployment for invalid specs"
    );

    // Fixing it back to the running spec clears the error without a new deployment.
    write(&root, "b.yaml", &spec("b", 1, "b.localhost"));
    let plan = apply_folder(p, &root, false).await;
    assert_eq!(plan.changes[1], Change::Clear { name: "b".into() });
    assert_eq!(apps(p).await[1], ("b".into(), 1, false, None));
    assert_eq!(deployments(p).await.len(), 3);

    // A removed file deletes its app and releases its domain for another app.
    std::fs::remove_file(root.join("a.yaml")).unwrap();
    write(&root, "c.yaml", &spec("c", 1, "a.localhost"));
    let plan = apply_folder(p, &root, false).await;
    assert!(
        plan.changes.contains(&Change::Delete { name: "a".into() }),
        "{plan:?}"
    );
    assert!(
        plan.changes.contains(&Change::Create { name: "c".into() }),
        "{plan:?}"
    );
    assert_eq!(deployments(p).await[2], dep("a", 2, "cancelled"));
    let owner: String = sqlx::query_scalar("select a.name from domains d join apps a on a.id = d.app_id where hostname = 'a.localhost'")
        .fetch_one(p)
        .await
        .unwrap();
    assert_eq!(owner, "c");

    // Emptying the source is refused, unless prune_empty.
    std::fs::remove_file(root.join("b.yaml")).unwrap();
    std::fs::remove_file(root.join("c.yaml")).unwrap();
    let plan = apply_folder(p, &root, false).await;
    assert!(plan.refused.is_some());
    assert_eq!(
        count(p, "select count(*) from apps where deleted_at is null").await,
        2
    );
    let error: String = sqlx::query_scalar("select error from sources")
        .fetch_one(p)
        .await
        .unwrap();
    assert!(error.contains("refusing"), "{error}");
    apply_folder(p, &root, true).await;
    assert_eq!(
        count(p, "select count(*) from apps where deleted_at is null").await,
        0
    );
}

#[tokio::test]
async fn one_source_cannot_take_another_sources_app() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    write(&one, "a.yaml", &spec("a", 1, "a.localhost"));
    write(&two, "a.yaml", &spec("a", 5, "other.localhost"));
    write(&two, "x.yaml", &spec("x", 1, "a.localhost"));
    apply_folder(&db.pool, &one, false).await;
    let plan = apply_folder(&db.pool, &two, false).await;
    assert!(
        matches!(&plan.changes[0], Change::Invalid { name, error } if name == "a" && error.contains("already defined by source folder:"))
    );
    assert!(
        matches!(&plan.changes[1], Change::Invalid { name, error } if name == "x" && error.contains("already used by app `a`"))
    );
    assert_eq!(
        deployments(&db.pool).await,
        vec![dep("a", 1, "pending")],
        "the owner keeps its app"
    );
}

#[tokio::test]
async fn a_changed_build_context_is_a_new_deployment_and_an_ignored_file_is_not() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write(
        root,
        "web.yaml",
        "apiVersion: berth/v1\nkind: App\nname: web\nbuild: {context: src}\n",
    );
    write(
        &root.join("src"),
        "Dockerfile",
        "FROM busybox:1\nCOPY . /app\n",
    );
    write(&root.join("src"), ".dockerignore", "*.log\n");
    write(&root.join("src"), "index.html", "one\n");
    apply_folder(&db.pool, root, false).await;
    let revision = berth::watcher::load_folder(root).unwrap().revision;

    // Only the code changes: the folder's revision and the app change, with a reason.
    write(&root.join("src"), "index.html", "two\n");
    let snap = berth::watcher::load_folder(root).unwrap();
    assert_ne!(
        snap.revision, revision,
        "the revision covers build contexts"
    );
    let plan = apply_folder(&db.pool, root, false).await;
    assert!(
        matches!(&plan.changes[..], [Change::Update { name, fields }] if name == "web" && fields == &["build context"]),
        "{:?}",
        plan.changes
    );
    assert_eq!(
        deployments(&db.pool).await,
        vec![dep("web", 1, "cancelled"), dep("web", 2, "pending")]
    );

    // What .dockerignore excludes, and a file's time, are not the context.
    write(&root.join("src"), "debug.log", "noise\n");
    let html = root.join("src/index.html");
    std::fs::File::options()
        .write(true)
        .open(&html)
        .unwrap()
        .set_modified(std::time::SystemTime::UNIX_EPOCH)
        .unwrap();
    let plan = apply_folder(&db.pool, root, false).await;
    assert!(
        matches!(&plan.changes[..], [Change::Unchanged { .. }]),
        "{:?}",
        plan.changes
    );
    // An executable bit is.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&html, std::fs::Permissions::from_mode(0o755)).unwrap();
    let plan = apply_folder(&db.pool, root, false).await;
    assert!(
        matches!(&plan.changes[..], [Change::Update { .. }]),
        "{:?}",
        plan.changes
    );
    assert_eq!(deployments(&db.pool).await.len(), 3);
}

fn watcher_deps(
    db: &TestDb,
    specs: Option<PathBuf>,
    git: Option<berth::config::GitConfig>,
    nats: Option<async_nats::Client>,
    data: &Path,
) -> berth::watcher::WatcherDeps {
    berth::watcher::WatcherDeps {
        pool: db.pool.clone(),
        database_url: db.url.clone(),
        nats,
        specs,
        git,
        data_dir: data.to_path_buf(),
        options: ApplyOptions::default(),
        debounce: Duration::from_millis(50),
        rescan: Duration::from_secs(3600),
    }
}

async fn wait_for_deployments(pool: &PgPool, what: &str, expected: Vec<(String, i64, String)>) {
    eventually(what, Duration::from_secs(10), || {
        let expected = expected.clone();
        async move { deployments(pool).await == expected }
    })
    .await;
}

#[tokio::test]
async fn folder_watcher_follows_edits_renames_swaps_and_disappearances() {
    let db = TestDb::new().await;
    let p = &db.pool;
    let dir = tempfile::tempdir().unwrap();
    let v1 = dir.path().join("store-v1");
    write(&v1, "hello.yaml", &spec("hello", 1, "hello.localhost"));
    let specs = dir.path().join("specs");
    std::os::unix::fs::symlink(&v1, &specs).unwrap();

    let shutdown = CancellationToken::new();
    let task = tokio::spawn(berth::watcher::run(
        watcher_deps(&db, Some(specs.clone()), None, None, dir.path()),
        shutdown.clone(),
    ));
    wait_for_deployments(
        p,
        "the first spec applied",
        vec![dep("hello", 1, "pending")],
    )
    .await;

    // A new file dropped in, written the atomic way (temp file, then rename).
    write(&v1, ".world.yaml.tmp", &spec("world", 1, "world.localhost"));
    std::fs::rename(v1.join(".world.yaml.tmp"), v1.join("world.yaml")).unwrap();
    wait_for_deployments(
        p,
        "a dropped file",
        vec![dep("hello", 1, "pending"), dep("world", 1, "pending")],
    )
    .await;

    // Editor leftovers are ignored; a rename of the same spec makes no deployment.
    write(&v1, "hello.yaml~", &spec("ghost", 1, "ghost.localhost"));
    std::fs::rename(v1.join("world.yaml"), v1.join("renamed.yaml")).unwrap();
    eventually("the rename recorded", Duration::from_secs(10), || async {
        let f: Option<String> =
            sqlx::query_scalar("select source_file from apps where name = 'world'")
                .fetch_one(p)
                .await
                .unwrap();
        f.as_deref() == Some("renamed.yaml")
    })
    .await;
    assert_eq!(deployments(p).await.len(), 2);

    // The Nix way: the folder is a symlink swapped atomically to a new store path.
    let v2 = dir.path().join("store-v2");
    write(&v2, "hello.yaml", &spec("hello", 2, "hello.localhost"));
    write(&v2, "renamed.yaml", &spec("world", 1, "world.localhost"));
    std::os::unix::fs::symlink(&v2, dir.path().join("specs.new")).unwrap();
    std::fs::rename(dir.path().join("specs.new"), &specs).unwrap();
    wait_for_deployments(
        p,
        "the swapped folder applied",
        vec![
            dep("hello", 1, "cancelled"),
            dep("world", 1, "pending"),
            dep("hello", 2, "pending"),
        ],
    )
    .await;

    // Deleted and created again: the app goes, then comes back as a new generation.
    std::fs::remove_file(v2.join("renamed.yaml")).unwrap();
    eventually("world deleted", Duration::from_secs(10), || async {
        apps(p).await[1].2
    })
    .await;
    write(&v2, "renamed.yaml", &spec("world", 1, "world.localhost"));
    eventually("world back", Duration::from_secs(10), || async {
        !apps(p).await[1].2
    })
    .await;

    // A folder that disappears for a while deletes nothing, and is read again when back.
    std::fs::remove_file(&specs).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // give a wrong deletion the chance to happen
    assert_eq!(
        count(p, "select count(*) from apps where deleted_at is not null").await,
        0
    );
    let missing: Option<String> = sqlx::query_scalar("select error from sources")
        .fetch_one(p)
        .await
        .unwrap();
    assert!(missing.unwrap_or_default().contains("missing"));
    write(&v2, "hello.yaml", &spec("hello", 4, "hello.localhost"));
    std::os::unix::fs::symlink(&v2, &specs).unwrap();
    eventually(
        "hello generation 3 after the folder came back",
        Duration::from_secs(10),
        || async { apps(p).await[0].1 == 3 },
    )
    .await;

    shutdown.cancel();
    task.await.unwrap().unwrap();
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@localhost",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn commit(work: &Path, file: &str, text: &str) -> String {
    write(&work.join("apps"), file, text);
    git(work, &["add", "-A"]);
    git(work, &["commit", "-q", "-m", "change"]);
    git(work, &["push", "-q", "--force", "origin", "HEAD:main"]);
    git(work, &["rev-parse", "HEAD"])
}

async fn deployed_revision(pool: &PgPool) -> Option<String> {
    sqlx::query_scalar("select source_revision from deployments order by id desc limit 1")
        .fetch_optional(pool)
        .await
        .unwrap()
        .flatten()
}

#[tokio::test]
async fn git_commits_are_applied_by_poll_and_by_signed_webhook() {
    let db = TestDb::new().await;
    let nats = TestNats::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bare = dir.path().join("origin.git");
    let work = dir.path().join("work");
    std::fs::create_dir_all(&bare).unwrap();
    git(&bare, &["init", "-q", "--bare"]);
    std::fs::create_dir_all(&work).unwrap();
    git(&work, &["init", "-q"]);
    git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);
    let first = commit(&work, "hello.yaml", &spec("hello", 1, "hello.localhost"));

    let git_cfg = berth::config::GitConfig {
        url: format!("file://{}", bare.display()),
        branch: "main".into(),
        path: "apps".into(),
        interval: Duration::from_secs(1),
        webhook_secret: Some("s3cret".into()),
    };
    let client = nats.client().await;
    let shutdown = CancellationToken::new();
    let data = dir.path().join("data");
    let watcher = tokio::spawn(berth::watcher::run(
        watcher_deps(
            &db,
            None,
            Some(git_cfg.clone()),
            Some(client.clone()),
            &data,
        ),
        shutdown.clone(),
    ));
    eventually(
        "the first commit applied",
        Duration::from_secs(10),
        || async { deployed_revision(&db.pool).await.as_deref() == Some(first.as_str()) },
    )
    .await;

    // Within one poll interval.
    let second = commit(&work, "hello.yaml", &spec("hello", 2, "hello.localhost"));
    eventually(
        "the second commit applied by polling",
        Duration::from_secs(5),
        || async { deployed_revision(&db.pool).await.as_deref() == Some(second.as_str()) },
    )
    .await;
    shutdown.cancel();
    watcher.await.unwrap().unwrap();

    // Now with a poll interval of an hour: only the webhook can make it quick.
    let shutdown = CancellationToken::new();
    let slow = berth::config::GitConfig {
        interval: Duration::from_secs(3600),
        ..git_cfg
    };
    let fetch_head = berth::watcher::git::work_area(&data, &slow).join(".git/FETCH_HEAD");
    let started = std::time::SystemTime::now();
    let watcher = tokio::spawn(berth::watcher::run(
        watcher_deps(&db, None, Some(slow), Some(client.clone()), &data),
        shutdown.clone(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let api = format!("http://{}", listener.local_addr().unwrap());
    let state = berth::api::ApiState {
        pool: db.pool.clone(),
        nats: client.clone(),
        metrics: berth::metrics::Metrics::new(),
        api_token: None,
        webhook_secret: Some("s3cret".into()),
    };
    tokio::spawn(berth::api::run(listener, state, shutdown.clone()));

    // Once the new watcher leads and has made its first fetch, it sleeps for the hour.
    eventually(
        "the slow watcher's first fetch",
        Duration::from_secs(10),
        || {
            let fetch_head = fetch_head.clone();
            async move {
                std::fs::metadata(&fetch_head)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t >= started)
            }
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await; // let it finish applying that fetch

    // A force-push that moves the branch back to the first commit.
    git(&work, &["reset", "-q", "--hard", &first]);
    git(&work, &["push", "-q", "--force", "origin", "HEAD:main"]);
    let body = br#"{"ref":"refs/heads/main","after":"0000000000000000000000000000000000000000"}"#;
    let http = reqwest::Client::new();
    let wrong = http
        .post(format!("{api}/v1/hooks/git"))
        .header("X-Hub-Signature-256", "sha256=00ff")
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let unsigned = http
        .post(format!("{api}/v1/hooks/git"))
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status().as_u16(), 401);
    tokio::time::sleep(Duration::from_millis(500)).await; // a wrong signature must not trigger a fetch
    assert_eq!(
        deployed_revision(&db.pool).await.as_deref(),
        Some(second.as_str())
    );

    let signature = {
        use hmac::{Hmac, Mac};
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(body);
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let ok = http
        .post(format!("{api}/v1/hooks/git"))
        .header("X-Gitea-Signature", signature)
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status().as_u16(), 202);
    eventually(
        "the force-pushed commit applied through the webhook",
        Duration::from_secs(5),
        || async { deployed_revision(&db.pool).await.as_deref() == Some(first.as_str()) },
    )
    .await;
    assert_eq!(
        deployments(&db.pool).await,
        vec![
            dep("hello", 1, "cancelled"),
            dep("hello", 2, "cancelled"),
            dep("hello", 3, "pending")
        ]
    );
    shutdown.cancel();
    watcher.await.unwrap().unwrap();
}

#[tokio::test]
async fn plan_and_apply_commands() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "hello.yaml",
        &spec("hello", 1, "hello.localhost"),
    );
    let run = |cmd: &str| {
        Command::new(berth_bin())
            .args([cmd, dir.path().to_str().unwrap()])
            .env("BERTH_DATABASE_URL", &db.url)
            .output()
            .unwrap()
    };
    let out = run("plan");
    assert_eq!(out.status.code(), Some(1), "a plan with changes exits 1");
    assert!(String::from_utf8_lossy(&out.stdout).contains("+ hello: create"));
    assert_eq!(
        count(&db.pool, "select count(*) from apps").await,
        0,
        "plan writes nothing"
    );
    let out = run("apply");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run("plan");
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("1 unchanged"));
    write(dir.path(), "hello.yaml", &spec("hello", 3, "hi.localhost"));
    let out = run("plan");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("~ hello: update domains, replicas"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[tokio::test]
async fn one_watcher_leads_and_a_standby_takes_over() {
    let db = TestDb::new().await;
    let p = &db.pool;
    let dir = tempfile::tempdir().unwrap();
    let specs = dir.path().join("specs");
    write(&specs, "a.yaml", &spec("a", 1, "a.localhost"));
    let never = CancellationToken::new();
    let first = tokio::spawn(berth::watcher::run(
        watcher_deps(&db, Some(specs.clone()), None, None, dir.path()),
        never.clone(),
    ));
    wait_for_deployments(p, "the leader applies", vec![dep("a", 1, "pending")]).await;
    let second = tokio::spawn(berth::watcher::run(
        watcher_deps(&db, Some(specs.clone()), None, None, dir.path()),
        never.clone(),
    ));

    // Exactly one holds the watcher lock (a bigint key shows as classid = high, objid = low 32 bits).
    let holders = || async {
        let sql = format!(
            "select count(*) from pg_locks where locktype = 'advisory' and granted and database = (select oid from pg_database where datname = current_database()) and classid = {} and objid = {}",
            berth::leader::WATCHER_LOCK >> 32,
            berth::leader::WATCHER_LOCK & 0xffff_ffff
        );
        count(p, &sql).await
    };
    tokio::time::sleep(Duration::from_millis(1500)).await; // the standby has retried by now
    assert_eq!(holders().await, 1);

    // The leader dies; the standby takes over within a few seconds and applies the next change.
    first.abort();
    let _ = first.await;
    write(&specs, "a.yaml", &spec("a", 2, "a.localhost"));
    eventually(
        "the standby applied the change",
        Duration::from_secs(10),
        || async { deployments(p).await == vec![dep("a", 1, "cancelled"), dep("a", 2, "pending")] },
    )
    .await;
    assert_eq!(holders().await, 1);
    second.abort();
}
