//! The outbox triggers: every insert, update and delete on every table writes one event row
//! in the same transaction, and wakes the listener.

use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::{PgPool, Row};

use crate::fixtures::TestDb;

#[derive(Debug, PartialEq)]
struct Ev {
    table: String,
    op: String,
    row: i64,
    app: Option<i64>,
    deployment: Option<i64>,
    node: Option<i64>,
}

fn ev(
    table: &str,
    op: &str,
    row: i64,
    app: Option<i64>,
    deployment: Option<i64>,
    node: Option<i64>,
) -> Ev {
    Ev {
        table: table.into(),
        op: op.into(),
        row,
        app,
        deployment,
        node,
    }
}

/// Events after `after`, in id order.
async fn events_since(pool: &PgPool, after: i64) -> Vec<Ev> {
    sqlx::query("select table_name, op, row_id, app_id, deployment_id, node_id from events where id > $1 order by id")
        .bind(after)
        .fetch_all(pool)
        .await
        .unwrap()
        .into_iter()
        .map(|r| Ev {
            table: r.get(0),
            op: r.get(1),
            row: r.get(2),
            app: r.get(3),
            deployment: r.get(4),
            node: r.get(5),
        })
        .collect()
}

async fn last_event(pool: &PgPool) -> i64 {
    sqlx::query_scalar("select coalesce(max(id), 0) from events")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn id(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test]
async fn every_table_emits_created_updated_deleted() {
    let db = TestDb::new().await;
    let p = &db.pool;

    let node = id(
        p,
        "insert into nodes (name, address) values ('n1', '127.0.0.1') returning id",
    )
    .await;
    let app = id(
        p,
        "insert into apps (name, source) values ('hello', 'specs/') returning id",
    )
    .await;
    let image = id(
        p,
        &format!(
            "insert into images (app_id, reference) values ({app}, 'berth/hello:1') returning id"
        ),
    )
    .await;
    let dep = id(p, &format!("insert into deployments (app_id, generation, spec, spec_hash) values ({app}, 1, '{{}}', 'h') returning id")).await;
    let build = id(
        p,
        &format!("insert into image_builds (deployment_id) values ({dep}) returning id"),
    )
    .await;
    let inst = id(p, &format!("insert into instances (app_id, deployment_id, node_id, image_id) values ({app}, {dep}, {node}, {image}) returning id")).await;
    sqlx::query(&format!(
        "insert into deployment_instances (deployment_id, instance_id) values ({dep}, {inst})"
    ))
    .execute(p)
    .await
    .unwrap();
    let domain = id(
        p,
        &format!(
            "insert into domains (app_id, hostname) values ({app}, 'hello.localhost') returning id"
        ),
    )
    .await;

    let created = events_since(p, 0).await;
    assert_eq!(
        created,
        vec![
            ev("node", "created", node, None, None, Some(node)),
            ev("app", "created", app, Some(app), None, None),
            ev("deployment", "created", dep, Some(app), Some(dep), None),
            ev("image_build", "created", build, Some(app), Some(dep), None),
            ev(
                "instance",
                "created",
                inst,
                Some(app),
                Some(dep),
                Some(node)
            ),
            ev(
                "deployment_instance",
                "created",
                inst,
                Some(app),
                Some(dep),
                Some(node)
            ),
            ev("domain", "created", domain, Some(app), None, None),
        ]
    );

    let mark = last_event(p).await;
    for sql in [
        format!("update nodes set state = 'draining' where id = {node}"),
        format!("update apps set current_deployment_id = {dep} where id = {app}"),
        format!("update deployments set status = 'building' where id = {dep}"),
        format!("update image_builds set status = 'running' where id = {build}"),
        format!("update instances set state = 'running' where id = {inst}"),
        format!(
            "update deployment_instances set created_at = now() - interval '1 minute' where instance_id = {inst}"
        ),
        format!("update domains set hostname = 'hi.localhost' where id = {domain}"),
    ] {
        sqlx::query(&sql).execute(p).await.unwrap();
    }
    assert_eq!(
        events_since(p, mark).await,
        vec![
            ev("node", "updated", node, None, None, Some(node)),
            ev("app", "updated", app, Some(app), Some(dep), None),
            ev("deployment", "updated", dep, Some(app), Some(dep), None),
            ev("image_build", "updated", build, Some(app), Some(dep), None),
            ev(
                "instance",
                "updated",
                inst,
                Some(app),
                Some(dep),
                Some(node)
            ),
            ev(
                "deployment_instance",
                "updated",
                inst,
                Some(app),
                Some(dep),
                Some(node)
            ),
            ev("domain", "updated", domain, Some(app), None, None),
        ]
    );

    let mark = last_event(p).await;
    for sql in [
        format!("delete from domains where id = {domain}"),
        format!("delete from deployment_instances where instance_id = {inst}"),
        format!("delete from instances where id = {inst}"),
        format!("delete from image_builds where id = {build}"),
        format!("update apps set current_deployment_id = null where id = {app}"),
        format!("delete from deployments where id = {dep}"),
        format!("delete from images where id = {image}"),
        format!("delete from apps where id = {app}"),
        format!("delete from nodes where id = {node}"),
    ] {
        sqlx::query(&sql).execute(p).await.unwrap();
    }
    let deleted: Vec<Ev> = events_since(p, mark)
        .await
        .into_iter()
        .filter(|e| e.op == "deleted")
        .collect();
    assert_eq!(
        deleted,
        vec![
            ev("domain", "deleted", domain, Some(app), None, None),
            // the instance still exists when its join row goes, so app and node are known
            ev(
                "deployment_instance",
                "deleted",
                inst,
                Some(app),
                Some(dep),
                Some(node)
            ),
            ev(
                "instance",
                "deleted",
                inst,
                Some(app),
                Some(dep),
                Some(node)
            ),
            ev("image_build", "deleted", build, Some(app), Some(dep), None),
            ev("deployment", "deleted", dep, Some(app), Some(dep), None),
            ev("app", "deleted", app, Some(app), None, None),
            ev("node", "deleted", node, None, None, Some(node)),
        ]
    );
}

#[tokio::test]
async fn rolled_back_changes_emit_nothing_and_noop_updates_are_quiet() {
    let db = TestDb::new().await;
    let p = &db.pool;
    let node = id(
        p,
        "insert into nodes (name, address) values ('n1', '127.0.0.1') returning id",
    )
    .await;
    let mark = last_event(p).await;

    let mut tx = p.begin().await.unwrap();
    sqlx::query("insert into apps (name, source) values ('gone', 'x')")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("update nodes set state = 'down'")
        .execute(&mut *tx)
        .await
        .unwrap();
    let inside: i64 = sqlx::query_scalar("select count(*) from events where id > $1")
        .bind(mark)
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    assert_eq!(
        inside, 2,
        "the events are written in the same transaction as the change"
    );
    tx.rollback().await.unwrap();
    assert_eq!(events_since(p, mark).await, vec![]);

    // Writing the same values, and a heartbeat, raise no event.
    sqlx::query("update nodes set state = 'ready', address = '127.0.0.1'")
        .execute(p)
        .await
        .unwrap();
    sqlx::query("update nodes set last_heartbeat_at = now()")
        .execute(p)
        .await
        .unwrap();
    assert_eq!(events_since(p, mark).await, vec![]);
    let touched: bool =
        sqlx::query_scalar("select updated_at > created_at from nodes where id = $1")
            .bind(node)
            .fetch_one(p)
            .await
            .unwrap();
    assert!(touched, "a real change (the heartbeat) moves updated_at");
}

#[tokio::test]
async fn commits_notify_the_listener_once_and_rollbacks_never() {
    let db = TestDb::new().await;
    let mut listener = PgListener::connect(&db.url).await.unwrap();
    listener
        .listen(berth::events::NOTIFY_CHANNEL)
        .await
        .unwrap();

    let mut tx = db.pool.begin().await.unwrap();
    sqlx::query("insert into nodes (name, address) values ('rolled', '127.0.0.1')")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.rollback().await.unwrap();

    let mut tx = db.pool.begin().await.unwrap();
    for i in 0..50 {
        sqlx::query("insert into nodes (name, address) values ($1, '127.0.0.1')")
            .bind(format!("n{i}"))
            .execute(&mut *tx)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();

    let first = tokio::time::timeout(Duration::from_secs(5), listener.recv())
        .await
        .expect("a notification")
        .unwrap();
    assert_eq!(first.channel(), berth::events::NOTIFY_CHANNEL);
    let second = tokio::time::timeout(Duration::from_millis(300), listener.recv()).await;
    assert!(
        second.is_err(),
        "50 inserts in one transaction notify once; the rollback never"
    );
}

#[tokio::test]
async fn constraints_hold_the_at_most_one_rules() {
    let db = TestDb::new().await;
    let p = &db.pool;
    let app = id(
        p,
        "insert into apps (name, source) values ('a', 's') returning id",
    )
    .await;
    let ins = |status: &'static str| {
        sqlx::query("insert into deployments (app_id, generation, spec, spec_hash, status) values ($1, 1, '{}', 'h', $2) returning id")
            .bind(app)
            .bind(status)
    };
    let dep: i64 = ins("pending").fetch_one(p).await.unwrap().get(0);
    assert!(
        ins("building").fetch_one(p).await.is_err(),
        "two deployments in flight for one app"
    );
    ins("active").fetch_one(p).await.unwrap();
    sqlx::query("insert into image_builds (deployment_id) values ($1)")
        .bind(dep)
        .execute(p)
        .await
        .unwrap();
    assert!(
        sqlx::query("insert into image_builds (deployment_id) values ($1)")
            .bind(dep)
            .execute(p)
            .await
            .is_err(),
        "two builds for one deployment"
    );
    assert!(
        sqlx::query("insert into apps (name, source) values ('a', 't')")
            .execute(p)
            .await
            .is_err(),
        "duplicate app name"
    );
    assert!(
        sqlx::query("insert into apps (name, source) values ('Bad_Name', 't')")
            .execute(p)
            .await
            .is_err(),
        "name is a DNS label"
    );
    sqlx::query("insert into domains (app_id, hostname) values ($1, 'a.example.com')")
        .bind(app)
        .execute(p)
        .await
        .unwrap();
    assert!(
        sqlx::query("insert into domains (app_id, hostname) values ($1, 'a.example.com')")
            .bind(app)
            .execute(p)
            .await
            .is_err(),
        "duplicate hostname"
    );
    assert!(
        sqlx::query("insert into domains (app_id, hostname) values ($1, 'UPPER.example.com')")
            .bind(app)
            .execute(p)
            .await
            .is_err(),
        "hostnames are lowercase"
    );
    assert!(sqlx::query("insert into deployments (app_id, generation, spec, spec_hash, status) values ($1, 1, '{}', 'h', 'exploded')").bind(app).execute(p).await.is_err(), "unknown status");
}
