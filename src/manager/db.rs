//! The manager's SQL: reading a batch of apps (locked) with everything a decision needs,
//! and writing the decisions of a batch back in a few set-based statements.
//!
//! A batch costs the same dozen round trips whether it holds one app or a hundred; that,
//! not Postgres' work per row, is what bounds the manager on a small machine.

use std::collections::BTreeMap;

use anyhow::Context;
use serde_json::{Value, json};
use sqlx::{PgConnection, Row};

use super::{App, Deployment, Instance};

/// One app of a batch, as read under its row lock.
pub(super) struct Loaded {
    pub app: App,
    /// Its open deployments (pending, building, deploying, active), oldest first.
    pub deployments: Vec<Deployment>,
    /// Its wanted instances, and unwanted ones that have not stopped yet.
    pub instances: Vec<Instance>,
    /// Its newest deployment, when that failed after the current one: (error, the build failed).
    pub failed: Option<(Option<String>, bool)>,
}

/// Reads and locks the apps `ids` (in id order, as the watcher's apply does, so no two of
/// them deadlock). `for no key update` excludes other reconciles and the watcher's updates
/// of these rows, while inserts that only reference them (a builder's image, the watcher's
/// deployment) go on. Apps that no longer exist are absent.
pub(super) async fn load(tx: &mut PgConnection, ids: &[i64]) -> anyhow::Result<Vec<Loaded>> {
    let apps = sqlx::query(
        "select id, name, generation, current_deployment_id, deleted_at is not null as deleted, spec_error, status
         from apps where id = any($1) order by id for no key update",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?;
    let mut loaded: BTreeMap<i64, Loaded> = apps
        .into_iter()
        .map(|r| {
            let app = App {
                id: r.get("id"),
                name: r.get("name"),
                generation: r.get("generation"),
                current: r.get("current_deployment_id"),
                deleted: r.get("deleted"),
                spec_error: r.get("spec_error"),
                status: r.get("status"),
            };
            (
                app.id,
                Loaded {
                    app,
                    deployments: Vec::new(),
                    instances: Vec::new(),
                    failed: None,
                },
            )
        })
        .collect();
    if loaded.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = loaded.keys().copied().collect();
    let rows = sqlx::query(
        "select id, app_id, generation, spec, status, image_id, active_at from deployments
         where app_id = any($1) and status in ('pending', 'building', 'deploying', 'active') order by id",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    for r in rows {
        let id: i64 = r.get("id");
        let d = Deployment {
            id,
            generation: r.get("generation"),
            spec: serde_json::from_value(r.get("spec"))
                .with_context(|| format!("the spec of deployment #{id} does not parse"))?,
            status: r.get("status"),
            image_id: r.get("image_id"),
            active_at: r.get("active_at"),
        };
        if let Some(l) = loaded.get_mut(&r.get::<i64, _>("app_id")) {
            l.deployments.push(d);
        }
    }
    let rows = sqlx::query(
        "select id, app_id, deployment_id, desired_state = 'running' as desired_running, state, restart_count, exit_code, last_error
         from instances where app_id = any($1) and (desired_state = 'running' or state not in ('stopped', 'lost', 'failed'))
         order by id",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    for r in rows {
        if let Some(l) = loaded.get_mut(&r.get::<i64, _>("app_id")) {
            l.instances.push(Instance {
                id: r.get("id"),
                deployment_id: r.get("deployment_id"),
                desired_running: r.get("desired_running"),
                state: r.get("state"),
                restart_count: r.get("restart_count"),
                exit_code: r.get("exit_code"),
                last_error: r.get("last_error"),
            });
        }
    }
    let rows = sqlx::query(
        "select d.app_id, d.error, b.status = 'failed' as build_failed
         from apps a
         join lateral (select id from deployments x where x.app_id = a.id and x.status <> 'cancelled'
                       order by id desc limit 1) n on true
         join deployments d on d.id = n.id
         left join image_builds b on b.deployment_id = d.id
         where a.id = any($1) and d.status = 'failed' and d.id > coalesce(a.current_deployment_id, 0)",
    )
    .bind(&ids)
    .fetch_all(&mut *tx)
    .await?;
    for r in rows {
        if let Some(l) = loaded.get_mut(&r.get::<i64, _>("app_id")) {
            l.failed = Some((
                r.get("error"),
                r.get::<Option<bool>, _>("build_failed").unwrap_or(false),
            ));
        }
    }
    Ok(loaded.into_values().collect())
}

/// What one step writes to a deployment. Several steps of one reconcile merge here.
#[derive(Debug)]
struct DeploymentWrite {
    /// The status it was read with: the write is made only if it still has it.
    guard: String,
    status: Option<&'static str>,
    /// Set when it became active in this step (active_at).
    activated: bool,
    spec: Option<Value>,
    error: Option<String>,
    timeline: Vec<Value>,
}

/// What one step writes to an app.
#[derive(Debug, Default)]
struct AppWrite {
    current: Option<i64>,
    observed_generation: Option<i64>,
    status: Option<Value>,
}

/// An instance to create, with its deployment_instances row.
#[derive(Debug)]
struct NewInstance {
    app_id: i64,
    deployment_id: i64,
    node_id: i64,
    image_id: Option<i64>,
    host: String,
}

/// The writes of a batch, collected while deciding and applied together.
#[derive(Debug, Default)]
pub(super) struct Writes {
    builds: Vec<i64>,
    deployments: BTreeMap<i64, DeploymentWrite>,
    stop: Vec<i64>,
    create: Vec<NewInstance>,
    apps: BTreeMap<i64, AppWrite>,
    release_domains: Vec<i64>,
    /// Ids handed to instances created in this batch (negative: not in the database yet).
    next_temp_id: i64,
}

fn step(step: &str, message: &str) -> Value {
    json!({ "at": chrono::Utc::now(), "step": step, "message": message })
}

impl Writes {
    fn deployment(&mut self, d: &Deployment) -> &mut DeploymentWrite {
        self.deployments
            .entry(d.id)
            .or_insert_with(|| DeploymentWrite {
                guard: d.status.clone(),
                status: None,
                activated: false,
                spec: None,
                error: None,
                timeline: Vec::new(),
            })
    }

    /// The image build of a deployment (at most one: a conflict is no error).
    pub fn build(&mut self, deployment_id: i64) {
        self.builds.push(deployment_id);
    }

    /// Moves `d` to `status` with a timeline entry; `activated` also stamps active_at.
    pub fn transition(&mut self, d: &Deployment, status: &'static str, message: &str) {
        let w = self.deployment(d);
        w.status = Some(status);
        w.activated |= status == "active";
        w.timeline.push(step(status, message));
    }

    /// A timeline entry without a status change.
    pub fn note(&mut self, d: &Deployment, name: &str, message: &str) {
        self.deployment(d).timeline.push(step(name, message));
    }

    pub fn set_spec(&mut self, d: &Deployment, spec: Value) {
        self.deployment(d).spec = Some(spec);
    }

    pub fn fail(&mut self, d: &Deployment, error: &str) {
        self.transition(d, "failed", error);
        self.deployment(d).error = Some(error.to_string());
    }

    /// Closes a deployment that lost to another: an active one is superseded, one that
    /// never ran is cancelled.
    pub fn close(&mut self, d: &Deployment, why: &str) {
        let status = if d.status == "active" {
            "superseded"
        } else {
            "cancelled"
        };
        self.transition(d, status, why);
    }

    /// Sets desired_state = stopped on the wanted instances matching `which`.
    pub fn stop(&mut self, instances: &mut [Instance], which: impl Fn(&Instance) -> bool) {
        for i in instances
            .iter_mut()
            .filter(|i| i.desired_running && which(i))
        {
            i.desired_running = false;
            if i.id > 0 {
                self.stop.push(i.id);
            }
        }
    }

    /// Creates an instance of `d` on each placed node and tracks it in `instances`.
    pub fn create(
        &mut self,
        app_id: i64,
        d: &Deployment,
        placed: Vec<(i64, String)>,
        instances: &mut Vec<Instance>,
    ) {
        for (node_id, host) in placed {
            self.next_temp_id -= 1;
            self.create.push(NewInstance {
                app_id,
                deployment_id: d.id,
                node_id,
                image_id: d.image_id,
                host,
            });
            instances.push(Instance {
                id: self.next_temp_id,
                deployment_id: Some(d.id),
                desired_running: true,
                state: "pending".into(),
                restart_count: 0,
                exit_code: None,
                last_error: None,
            });
        }
    }

    pub fn set_current(&mut self, app_id: i64, deployment_id: i64) {
        self.apps.entry(app_id).or_default().current = Some(deployment_id);
    }

    pub fn observe(&mut self, app_id: i64, generation: i64) {
        let w = self.apps.entry(app_id).or_default();
        w.observed_generation = Some(w.observed_generation.unwrap_or(0).max(generation));
    }

    pub fn set_status(&mut self, app_id: i64, status: Value) {
        self.apps.entry(app_id).or_default().status = Some(status);
    }

    pub fn release_domains(&mut self, app_id: i64) {
        self.release_domains.push(app_id);
    }

    /// Applies the batch: each kind of write is one statement, whatever the batch size.
    /// Stops come before creates, so the rows never hold more live instances than a
    /// decision allowed (and the transaction makes them visible together anyway).
    pub async fn apply(self, tx: &mut PgConnection) -> anyhow::Result<()> {
        if !self.builds.is_empty() {
            sqlx::query(
                "insert into image_builds (deployment_id) select unnest($1::bigint[])
                 on conflict (deployment_id) do nothing",
            )
            .bind(&self.builds)
            .execute(&mut *tx)
            .await?;
        }
        if !self.deployments.is_empty() {
            let rows: Vec<Value> = self
                .deployments
                .iter()
                .map(|(id, w)| {
                    json!({"id": id, "guard": w.guard, "status": w.status, "activated": w.activated,
                           "spec": w.spec, "error": w.error, "timeline": w.timeline})
                })
                .collect();
            sqlx::query(
                "update deployments d set
                    status = coalesce(u.status, d.status),
                    spec = coalesce(u.spec, d.spec),
                    error = coalesce(u.error, d.error),
                    timeline = d.timeline || u.timeline,
                    active_at = case when u.activated then now() else d.active_at end,
                    superseded_at = case when u.status = 'superseded' then now() else d.superseded_at end,
                    cancelled_at = case when u.status = 'cancelled' then now() else d.cancelled_at end,
                    failed_at = case when u.status = 'failed' then now() else d.failed_at end
                 from jsonb_to_recordset($1) as u(id bigint, guard text, status text, activated bool, spec jsonb, error text, timeline jsonb)
                 where d.id = u.id and d.status = u.guard",
            )
            .bind(Value::Array(rows))
            .execute(&mut *tx)
            .await?;
        }
        if !self.stop.is_empty() {
            sqlx::query(
                "update instances set desired_state = 'stopped' where id = any($1) and desired_state = 'running'",
            )
            .bind(&self.stop)
            .execute(&mut *tx)
            .await?;
        }
        if !self.create.is_empty() {
            let rows: Vec<Value> = self
                .create
                .iter()
                .enumerate()
                .map(|(n, i)| {
                    json!({"n": n, "app_id": i.app_id, "deployment_id": i.deployment_id,
                           "node_id": i.node_id, "image_id": i.image_id, "host": i.host})
                })
                .collect();
            let created: u64 = sqlx::query(
                "with u as (
                     select * from jsonb_to_recordset($1)
                         as u(n int, app_id bigint, deployment_id bigint, node_id bigint, image_id bigint, host text)
                 ), i as (
                     insert into instances (app_id, deployment_id, node_id, image_id, host)
                     select app_id, deployment_id, node_id, image_id, host from u order by n
                     returning id, deployment_id
                 )
                 insert into deployment_instances (deployment_id, instance_id) select deployment_id, id from i",
            )
            .bind(Value::Array(rows))
            .execute(&mut *tx)
            .await?
            .rows_affected();
            anyhow::ensure!(
                created as usize == self.create.len(),
                "created {created} of {} instances",
                self.create.len()
            );
        }
        if !self.apps.is_empty() {
            let rows: Vec<Value> = self
                .apps
                .iter()
                .map(|(id, w)| {
                    json!({"id": id, "current": w.current, "observed": w.observed_generation, "status": w.status})
                })
                .collect();
            sqlx::query(
                "update apps a set
                    current_deployment_id = coalesce(u.current, a.current_deployment_id),
                    observed_generation = greatest(a.observed_generation, coalesce(u.observed, a.observed_generation)),
                    status = coalesce(u.status, a.status)
                 from jsonb_to_recordset($1) as u(id bigint, current bigint, observed bigint, status jsonb)
                 where a.id = u.id",
            )
            .bind(Value::Array(rows))
            .execute(&mut *tx)
            .await?;
        }
        if !self.release_domains.is_empty() {
            sqlx::query("delete from domains where app_id = any($1)")
                .bind(&self.release_domains)
                .execute(&mut *tx)
                .await?;
        }
        Ok(())
    }
}
