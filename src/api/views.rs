//! What the API shows: apps, deployments, nodes and events as JSON, read from Postgres.
//! Nothing secret is ever selected: spec `env` values are replaced by `"***"` (they may hold
//! secrets), and database URLs never leave the process.

use serde_json::{Value, json};
use sqlx::{PgPool, Row};

/// Lines of build and instance logs shown with an app.
const LOG_TAIL: usize = 20;

/// Every app that is not deleted: its status and replica counts.
pub async fn apps(pool: &PgPool) -> anyhow::Result<Value> {
    let rows = sqlx::query(
        "select a.name, a.status, a.generation, a.observed_generation, a.source, a.source_revision,
                a.current_deployment_id, a.updated_at, a.created_at,
                coalesce((c.spec->>'replicas')::int, (a.spec->>'replicas')::int, 0) as desired,
                (select count(*) from instances i where i.app_id = a.id and i.deployment_id = a.current_deployment_id
                   and i.state = 'running' and i.desired_state = 'running') as ready
         from apps a left join deployments c on c.id = a.current_deployment_id
         where a.deleted_at is null order by a.name",
    )
    .fetch_all(pool)
    .await?;
    Ok(Value::Array(rows.iter().map(app_summary).collect()))
}

fn app_summary(r: &sqlx::postgres::PgRow) -> Value {
    let status: Value = r.get("status");
    json!({
        "name": r.get::<String, _>("name"),
        "ready": status["ready"],
        "reason": status["reason"],
        "message": status["message"],
        "replicas": {"ready": r.get::<i64, _>("ready"), "desired": r.get::<i32, _>("desired")},
        "generation": r.get::<i64, _>("generation"),
        "observed_generation": r.get::<i64, _>("observed_generation"),
        "source": r.get::<String, _>("source"),
        "source_revision": r.get::<Option<String>, _>("source_revision"),
        "current_deployment_id": r.get::<Option<i64>, _>("current_deployment_id"),
        "created_at": r.get::<chrono::DateTime<chrono::Utc>, _>("created_at"),
        "updated_at": r.get::<chrono::DateTime<chrono::Utc>, _>("updated_at"),
    })
}

/// One app with its recent deployments, live instances per node, last errors and log tails.
pub async fn app(pool: &PgPool, name: &str) -> anyhow::Result<Option<Value>> {
    let Some(row) = sqlx::query(
        "select a.id, a.name, a.status, a.generation, a.observed_generation, a.source, a.source_revision,
                a.current_deployment_id, a.updated_at, a.created_at, a.spec, a.spec_error,
                coalesce((c.spec->>'replicas')::int, (a.spec->>'replicas')::int, 0) as desired,
                (select count(*) from instances i where i.app_id = a.id and i.deployment_id = a.current_deployment_id
                   and i.state = 'running' and i.desired_state = 'running') as ready
         from apps a left join deployments c on c.id = a.current_deployment_id
         where a.name = $1 and a.deleted_at is null",
    )
    .bind(name)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    let id: i64 = row.get("id");
    let mut out = app_summary(&row);
    out["spec"] = redact(row.get::<Option<Value>, _>("spec").unwrap_or(Value::Null));
    out["spec_error"] = json!(row.get::<Option<String>, _>("spec_error"));
    let deployments = sqlx::query(
        "select d.id from deployments d where d.app_id = $1 order by d.id desc limit 5",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    let mut list = Vec::new();
    for d in deployments {
        if let Some(v) = deployment(pool, d.get("id"), LOG_TAIL).await? {
            list.push(v);
        }
    }
    out["deployments"] = Value::Array(list);
    let instances = sqlx::query(
        "select i.id, i.deployment_id, n.name as node, i.desired_state, i.state, i.host, i.port, i.runtime_id,
                i.restart_count, i.exit_code, i.last_error, i.started_at, l.lines
         from instances i left join nodes n on n.id = i.node_id
         left join instance_logs l on l.instance_id = i.id
         where i.app_id = $1 and (i.desired_state = 'running' or i.state not in ('stopped', 'failed', 'lost')
               or i.updated_at > now() - interval '10 minutes')
         order by i.id desc limit 50",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    out["instances"] = Value::Array(
        instances
            .iter()
            .map(|i| {
                json!({
                    "id": i.get::<i64, _>("id"),
                    "deployment_id": i.get::<Option<i64>, _>("deployment_id"),
                    "node": i.get::<Option<String>, _>("node"),
                    "desired_state": i.get::<String, _>("desired_state"),
                    "state": i.get::<String, _>("state"),
                    "address": match (i.get::<Option<String>, _>("host"), i.get::<Option<i32>, _>("port")) {
                        (Some(h), Some(p)) => Some(format!("{h}:{p}")),
                        _ => None,
                    },
                    "runtime_id": i.get::<Option<String>, _>("runtime_id"),
                    "restart_count": i.get::<i32, _>("restart_count"),
                    "exit_code": i.get::<Option<i32>, _>("exit_code"),
                    "last_error": i.get::<Option<String>, _>("last_error"),
                    "started_at": i.get::<Option<chrono::DateTime<chrono::Utc>>, _>("started_at"),
                    "log_tail": tail(&i.get::<Option<String>, _>("lines").unwrap_or_default(), LOG_TAIL),
                })
            })
            .collect(),
    );
    Ok(Some(out))
}

/// A deployment with its timeline and the last `log_lines` of its build log.
pub async fn deployment(pool: &PgPool, id: i64, log_lines: usize) -> anyhow::Result<Option<Value>> {
    let Some(d) = sqlx::query(
        "select d.id, a.name as app, d.generation, d.status, d.source_revision, d.error, d.timeline,
                d.created_at, img.reference as image, b.status as build_status, b.log as build_log, b.error as build_error
         from deployments d join apps a on a.id = d.app_id
         left join images img on img.id = d.image_id
         left join image_builds b on b.deployment_id = d.id
         where d.id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?
    else {
        return Ok(None);
    };
    Ok(Some(json!({
        "id": d.get::<i64, _>("id"),
        "app": d.get::<String, _>("app"),
        "generation": d.get::<i64, _>("generation"),
        "status": d.get::<String, _>("status"),
        "source_revision": d.get::<Option<String>, _>("source_revision"),
        "error": d.get::<Option<String>, _>("error"),
        "image": d.get::<Option<String>, _>("image"),
        "timeline": d.get::<Value, _>("timeline"),
        "created_at": d.get::<chrono::DateTime<chrono::Utc>, _>("created_at"),
        "build": {
            "status": d.get::<Option<String>, _>("build_status"),
            "error": d.get::<Option<String>, _>("build_error"),
            "log_tail": tail(&d.get::<Option<String>, _>("build_log").unwrap_or_default(), log_lines),
        },
    })))
}

pub async fn nodes(pool: &PgPool) -> anyhow::Result<Value> {
    let rows = sqlx::query(
        "select n.name, n.address, n.labels, n.capacity, n.state, n.last_heartbeat_at,
                (select count(*) from instances i where i.node_id = n.id and i.desired_state = 'running') as instances
         from nodes n order by n.name",
    )
    .fetch_all(pool)
    .await?;
    Ok(Value::Array(
        rows.iter()
            .map(|n| {
                json!({
                    "name": n.get::<String, _>("name"),
                    "address": n.get::<String, _>("address"),
                    "labels": n.get::<Value, _>("labels"),
                    "capacity": n.get::<Value, _>("capacity"),
                    "state": n.get::<String, _>("state"),
                    "last_heartbeat_at": n.get::<Option<chrono::DateTime<chrono::Utc>>, _>("last_heartbeat_at"),
                    "instances": n.get::<i64, _>("instances"),
                })
            })
            .collect(),
    ))
}

/// The last `limit` events of the outbox history, oldest first.
pub async fn recent_events(pool: &PgPool, limit: i64) -> anyhow::Result<Vec<Value>> {
    let rows: Vec<Value> = sqlx::query_scalar(
        "select jsonb_strip_nulls(jsonb_build_object('event_id', id, 'table', table_name, 'op', op, 'id', row_id,
                 'app_id', app_id, 'deployment_id', deployment_id, 'node_id', node_id, 'at', created_at))
         from (select * from events order by id desc limit $1) e order by id",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}

/// A redeploy: a new pending deployment of the app's current spec. None when there is no
/// such app; Err(conflict message) when one is already on its way.
pub async fn redeploy(pool: &PgPool, name: &str) -> anyhow::Result<Option<Result<i64, String>>> {
    let result = sqlx::query_scalar::<_, i64>(
        "insert into deployments (app_id, generation, spec, spec_hash, source_revision, timeline)
         select id, generation, spec, spec_hash, source_revision,
                jsonb_build_array(jsonb_build_object('at', now(), 'step', 'pending', 'message', 'redeploy requested through the API'))
         from apps where name = $1 and deleted_at is null and spec is not null
         returning id",
    )
    .bind(name)
    .fetch_optional(pool)
    .await;
    match result {
        Ok(Some(id)) => Ok(Some(Ok(id))),
        Ok(None) => Ok(None),
        Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Ok(Some(Err(
            "a deployment of this app is already on its way; try again once it is active".into(),
        ))),
        Err(e) => Err(e.into()),
    }
}

/// The spec with every env value hidden.
fn redact(mut spec: Value) -> Value {
    if let Some(env) = spec.get_mut("env").and_then(Value::as_object_mut) {
        for v in env.values_mut() {
            *v = json!("***");
        }
    }
    spec
}

fn tail(text: &str, n: usize) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}
