//! The manager: the reconcile loop from a deployment to running, routed and cleaned-up
//! instances (DESIGN §1 steps 2, 4 and 6).
//!
//! One manager leads (advisory lock). It reconciles apps by id; each reconcile is one
//! transaction that first locks the app row (`for update`), so the watcher and a second
//! manager can never interleave with it, then reads everything it needs and moves the app
//! one step:
//!
//! 1. a pending deployment gets its image build — unless only `replicas` changed from the
//!    current deployment: then the current deployment is scaled and the new one is closed
//!    as `cancelled` with a timeline entry saying so (the app's generation still bumps;
//!    `observed_generation` catches up at once, since nothing needs rolling out);
//! 2. a built (`deploying`) deployment becomes `active` and gets instances, scheduled onto
//!    ready nodes;
//! 3. an active deployment that is not yet current rolls out (rolling with max_surge and
//!    max_unavailable, or recreate); when all its instances run it becomes current, the old
//!    deployment is superseded and its instances stopped; past its progress deadline it fails
//!    and its instances are stopped, the current version serving on;
//! 4. the current deployment keeps its replica count (replacing lost instances);
//! 5. the app's status says what is going on.
//!
//! Invariants (checked by the tests from the rows): never more live instances than
//! replicas + max_surge; during a rolling update never fewer healthy than
//! replicas - max_unavailable (as far as it depends on the manager); no instance of a
//! superseded deployment left wanted.

mod schedule;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use sqlx::{PgConnection, PgPool, Row};
use tokio_util::sync::CancellationToken;

use crate::events::EventPayload;
use crate::events::controller::{Action, Reconciler};
use crate::spec::{AppSpec, Strategy};

/// What the manager needs.
#[derive(Clone)]
pub struct ManagerDeps {
    pub pool: PgPool,
    pub options: ManagerOptions,
}

#[derive(Debug, Clone)]
pub struct ManagerOptions {
    /// A node silent for this long is down; its instances are lost and replaced.
    pub node_timeout: Duration,
    /// Consecutive restarts of an instance after which the app is in CrashLoop.
    pub crashloop_restarts: i32,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        ManagerOptions {
            node_timeout: Duration::from_secs(10),
            crashloop_restarts: 3,
        }
    }
}

pub struct Manager {
    deps: ManagerDeps,
    /// Node loads for scheduling, kept between reconciles.
    nodes: schedule::NodeCache,
}

impl Manager {
    pub fn new(deps: ManagerDeps) -> Arc<Manager> {
        Arc::new(Manager {
            deps,
            nodes: Default::default(),
        })
    }
}

/// A deployment as the manager reads it.
#[derive(Debug, Clone)]
struct Deployment {
    id: i64,
    generation: i64,
    spec: AppSpec,
    status: String,
    image_id: Option<i64>,
    active_at: Option<chrono::DateTime<chrono::Utc>>,
}

/// An instance as the manager reads it.
#[derive(Debug, Clone)]
struct Instance {
    id: i64,
    deployment_id: Option<i64>,
    desired_running: bool,
    state: String,
    restart_count: i32,
    exit_code: Option<i32>,
    last_error: Option<String>,
}

impl Instance {
    /// Wanted and not given up on: it occupies a slot.
    fn live(&self) -> bool {
        self.desired_running && self.state != "lost"
    }
    fn healthy(&self) -> bool {
        self.live() && self.state == "running"
    }
}

fn timeline(step: &str, message: &str) -> serde_json::Value {
    json!([{ "at": chrono::Utc::now(), "step": step, "message": message }])
}

impl Reconciler for Manager {
    type Key = i64;

    fn name(&self) -> &'static str {
        "manager"
    }

    fn keys_for(&self, event: &EventPayload) -> Vec<i64> {
        event.app_id.into_iter().collect()
    }

    /// Every app that is not visibly converged, found in one query: a resync of 10,000
    /// settled apps costs one statement, not 10,000 reconciles. Converged means: ready at
    /// its generation, no open or rolling deployment, and exactly `replicas` wanted
    /// instances, all running. Anything the manager would act on breaks one of these.
    async fn list_keys(&self) -> anyhow::Result<Vec<i64>> {
        Ok(sqlx::query_scalar(
            "select a.id from apps a
             left join deployments c on c.id = a.current_deployment_id
             left join lateral (
                 select count(*) filter (where i.state = 'running') as running, count(*) as wanted
                 from instances i where i.app_id = a.id and i.desired_state = 'running'
             ) w on true
             where a.deleted_at is not null and w.wanted > 0
                or a.deleted_at is null and (
                    a.status->>'reason' is distinct from 'Ready'
                    or a.generation <> a.observed_generation
                    or a.spec_error is not null
                    or c.id is null
                    or w.running <> w.wanted
                    or w.wanted <> (c.spec->>'replicas')::bigint
                    or exists (select 1 from deployments d where d.app_id = a.id and d.id <> c.id
                               and d.status in ('pending', 'building', 'deploying', 'active')))",
        )
        .fetch_all(&self.deps.pool)
        .await?)
    }

    async fn reconcile(&self, app_id: &i64) -> anyhow::Result<Action> {
        let mut tx = self.deps.pool.begin().await?;
        let action = self.reconcile_app(&mut tx, *app_id).await?;
        tx.commit().await?;
        Ok(action)
    }
}

/// The app row, locked.
struct App {
    id: i64,
    name: String,
    generation: i64,
    current: Option<i64>,
    deleted: bool,
    spec_error: Option<String>,
    status: serde_json::Value,
}

impl Manager {
    async fn reconcile_app(&self, tx: &mut PgConnection, app_id: i64) -> anyhow::Result<Action> {
        let Some(row) = sqlx::query(
            "select id, name, generation, current_deployment_id, deleted_at is not null as deleted, spec_error, status
             from apps where id = $1 for update",
        )
        .bind(app_id)
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(Action::Done);
        };
        let app = App {
            id: row.get("id"),
            name: row.get("name"),
            generation: row.get("generation"),
            current: row.get("current_deployment_id"),
            deleted: row.get("deleted"),
            spec_error: row.get("spec_error"),
            status: row.get("status"),
        };
        if app.deleted {
            return self.reconcile_deleted(tx, &app).await;
        }
        let deployments = load_deployments(tx, app.id).await?;
        let mut instances = load_instances(tx, app.id).await?;
        let current = app
            .current
            .and_then(|id| deployments.iter().find(|d| d.id == id))
            .cloned();
        // The newest open deployment is the target; older open ones lost the race.
        let target = deployments
            .iter()
            .filter(|d| Some(d.id) != app.current)
            .max_by_key(|d| d.id)
            .cloned();
        for d in deployments
            .iter()
            .filter(|d| Some(d.id) != app.current && Some(d.id) != target.as_ref().map(|t| t.id))
        {
            close_deployment(tx, d, "a newer deployment arrived").await?;
            stop_instances(tx, &mut instances, |i| i.deployment_id == Some(d.id)).await?;
        }

        let mut status: Option<(bool, &str, String)> = None;
        let mut action = Action::Done;
        if let Some(target) = target {
            match target.status.as_str() {
                "pending" | "building" => {
                    let scale_only = current
                        .as_ref()
                        .is_some_and(|c| only_replicas_differ(&c.spec, &target.spec));
                    if scale_only && target.status == "pending" {
                        let c = current.as_ref().expect("checked");
                        self.scale_current(tx, &app, c, &target).await?;
                        // Re-read: the current deployment's spec changed.
                        return Ok(Action::RequeueAfter(Duration::ZERO));
                    }
                    sqlx::query("insert into image_builds (deployment_id) values ($1) on conflict (deployment_id) do nothing")
                        .bind(target.id)
                        .execute(&mut *tx)
                        .await?;
                    status = Some((
                        false,
                        "Building",
                        format!(
                            "deployment #{} (generation {}) is {}",
                            target.id, target.generation, target.status
                        ),
                    ));
                }
                "deploying" | "active" => {
                    if target.status == "deploying" {
                        sqlx::query(
                            "update deployments set status = 'active', active_at = now(), timeline = timeline || $2
                             where id = $1 and status = 'deploying'",
                        )
                        .bind(target.id)
                        .bind(timeline("active", "rolling out"))
                        .execute(&mut *tx)
                        .await?;
                    }
                    let active_at = target.active_at.unwrap_or_else(chrono::Utc::now);
                    let outcome = self
                        .roll_out(
                            tx,
                            &app,
                            current.as_ref(),
                            &target,
                            &mut instances,
                            active_at,
                        )
                        .await?;
                    status = Some(outcome.0);
                    action = outcome.1;
                }
                _ => {}
            }
        }
        // The current deployment keeps its replica count when no rollout is replacing it.
        let rolling = target_is_rolling(&deployments, app.current);
        if let (Some(c), false) = (&current, rolling) {
            let unscheduled = self.keep_replicas(tx, &app, c, &mut instances).await?;
            if let Some(reason) = unscheduled {
                status = Some((false, "Unschedulable", reason));
                action = Action::RequeueAfter(Duration::from_secs(5));
            }
        }
        let computed = self
            .status(tx, &app, current.as_ref(), &instances, status)
            .await?;
        if computed != app.status {
            sqlx::query("update apps set status = $2 where id = $1")
                .bind(app.id)
                .bind(&computed)
                .execute(&mut *tx)
                .await?;
        }
        Ok(action)
    }

    /// A deleted app: every instance stopped, open deployments closed, domains released.
    async fn reconcile_deleted(&self, tx: &mut PgConnection, app: &App) -> anyhow::Result<Action> {
        sqlx::query("update instances set desired_state = 'stopped' where app_id = $1 and desired_state = 'running'")
            .bind(app.id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "update deployments set status = 'cancelled', cancelled_at = now(), timeline = timeline || $2
             where app_id = $1 and status in ('pending', 'building', 'deploying')",
        )
        .bind(app.id)
        .bind(timeline("cancelled", "the app was deleted"))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "update deployments set status = 'superseded', superseded_at = now(), timeline = timeline || $2
             where app_id = $1 and status = 'active'",
        )
        .bind(app.id)
        .bind(timeline("superseded", "the app was deleted"))
        .execute(&mut *tx)
        .await?;
        sqlx::query("delete from domains where app_id = $1")
            .bind(app.id)
            .execute(&mut *tx)
            .await?;
        let status = json!({"ready": false, "reason": "Deleted", "message": "the app was deleted; its instances are stopped"});
        if status != app.status {
            sqlx::query("update apps set status = $2 where id = $1")
                .bind(app.id)
                .bind(status)
                .execute(&mut *tx)
                .await?;
        }
        Ok(Action::Done)
    }

    /// Applies a replicas-only change to the current deployment instead of building.
    async fn scale_current(
        &self,
        tx: &mut PgConnection,
        app: &App,
        current: &Deployment,
        target: &Deployment,
    ) -> anyhow::Result<()> {
        let message = format!(
            "replicas {} -> {} applied to deployment #{} without a build",
            current.spec.replicas, target.spec.replicas, current.id
        );
        sqlx::query("update deployments set spec = $2, timeline = timeline || $3 where id = $1")
            .bind(current.id)
            .bind(target.spec.to_canonical_json())
            .bind(timeline("scaled", &message))
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "update deployments set status = 'cancelled', cancelled_at = now(), timeline = timeline || $2
             where id = $1 and status = 'pending'",
        )
        .bind(target.id)
        .bind(timeline("cancelled", &message))
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "update apps set observed_generation = greatest(observed_generation, $2) where id = $1",
        )
        .bind(app.id)
        .bind(target.generation)
        .execute(&mut *tx)
        .await?;
        tracing::info!(app.name = %app.name, "{message}");
        Ok(())
    }

    /// One step of a rollout of `target`. Returns its status and when to look again.
    async fn roll_out(
        &self,
        tx: &mut PgConnection,
        app: &App,
        current: Option<&Deployment>,
        target: &Deployment,
        instances: &mut Vec<Instance>,
        active_at: chrono::DateTime<chrono::Utc>,
    ) -> anyhow::Result<((bool, &'static str, String), Action)> {
        let spec = &target.spec;
        let replicas = spec.replicas as usize;
        let is_new = |i: &Instance| i.deployment_id == Some(target.id);
        let new_live = instances.iter().filter(|i| is_new(i) && i.live()).count();
        let new_healthy = instances
            .iter()
            .filter(|i| is_new(i) && i.healthy())
            .count();

        // Done: every new instance runs. Cut over.
        if new_healthy >= replicas && new_live == replicas {
            self.cut_over(tx, app, current, target, instances).await?;
            return Ok((
                (
                    true,
                    "Ready",
                    format!("{replicas}/{replicas} instances healthy"),
                ),
                Action::Done,
            ));
        }
        // Past the deadline: the rollout failed; the current version serves on.
        let deadline = active_at
            + chrono::Duration::from_std(spec.deploy.progress_deadline.0)
                .unwrap_or(chrono::Duration::MAX);
        if chrono::Utc::now() > deadline {
            let message = format!(
                "progress deadline {} exceeded: {new_healthy}/{replicas} new instances healthy",
                spec.deploy.progress_deadline
            );
            sqlx::query(
                "update deployments set status = 'failed', failed_at = now(), error = $2, timeline = timeline || $3
                 where id = $1 and status = 'active'",
            )
            .bind(target.id)
            .bind(&message)
            .bind(timeline("failed", &message))
            .execute(&mut *tx)
            .await?;
            stop_instances(tx, instances, |i| i.deployment_id == Some(target.id)).await?;
            return Ok((
                (false, "ProgressDeadlineExceeded", message),
                Action::RequeueAfter(Duration::ZERO),
            ));
        }

        let old_live = instances.iter().filter(|i| !is_new(i) && i.live()).count();
        let old_healthy = instances
            .iter()
            .filter(|i| !is_new(i) && i.healthy())
            .count();
        let mut to_create = 0;
        match spec.deploy.strategy {
            Strategy::Recreate => {
                if old_live > 0 {
                    stop_instances(tx, instances, |i| i.deployment_id != Some(target.id)).await?;
                } else {
                    to_create = replicas.saturating_sub(new_live);
                }
            }
            Strategy::Rolling => {
                let max_total = replicas + spec.deploy.max_surge as usize;
                let min_available = replicas.saturating_sub(spec.deploy.max_unavailable as usize);
                to_create = replicas
                    .saturating_sub(new_live)
                    .min(max_total.saturating_sub(new_live + old_live));
                // Old instances that serve nothing go first; healthy ones only while enough
                // stay healthy.
                stop_instances(tx, instances, |i| {
                    i.deployment_id != Some(target.id) && i.state != "running"
                })
                .await?;
                let mut stoppable = (new_healthy + old_healthy)
                    .saturating_sub(min_available)
                    .min(old_healthy);
                // Never stop more old ones than new ones can replace.
                stoppable = stoppable.min((new_live + old_live).saturating_sub(replicas));
                if stoppable > 0 {
                    let mut victims: Vec<i64> = instances
                        .iter()
                        .filter(|i| !is_new(i) && i.healthy())
                        .map(|i| i.id)
                        .collect();
                    victims.sort_unstable_by(|a, b| b.cmp(a));
                    victims.truncate(stoppable);
                    stop_instances(tx, instances, |i| victims.contains(&i.id)).await?;
                }
                // Recount: creating after stopping keeps live within replicas + surge.
                let live_now = instances.iter().filter(|i| i.live()).count();
                let new_live_now = instances.iter().filter(|i| is_new(i) && i.live()).count();
                to_create = to_create.max(
                    replicas
                        .saturating_sub(new_live_now)
                        .min(max_total.saturating_sub(live_now)),
                );
            }
        }
        if to_create > 0 {
            match self.nodes.place(tx, app.id, target, to_create).await? {
                Ok(placed) => {
                    create_instances(tx, app.id, target, placed, instances).await?;
                }
                Err(reason) => {
                    return Ok((
                        (false, "Unschedulable", reason),
                        Action::RequeueAfter(Duration::from_secs(5)),
                    ));
                }
            }
        }
        let left = (deadline - chrono::Utc::now()).to_std().unwrap_or_default();
        let message = format!(
            "rolling out deployment #{}: {new_healthy}/{replicas} new instances healthy",
            target.id
        );
        Ok((
            (false, "Progressing", message),
            Action::RequeueAfter(left + Duration::from_millis(50)),
        ))
    }

    /// The target becomes current; older deployments are superseded and their instances stopped.
    async fn cut_over(
        &self,
        tx: &mut PgConnection,
        app: &App,
        current: Option<&Deployment>,
        target: &Deployment,
        instances: &mut [Instance],
    ) -> anyhow::Result<()> {
        sqlx::query("update apps set current_deployment_id = $2, observed_generation = greatest(observed_generation, $3) where id = $1")
            .bind(app.id)
            .bind(target.id)
            .bind(target.generation)
            .execute(&mut *tx)
            .await?;
        sqlx::query("update deployments set timeline = timeline || $2 where id = $1")
            .bind(target.id)
            .bind(timeline("current", "all instances healthy: serving"))
            .execute(&mut *tx)
            .await?;
        if let Some(old) = current {
            close_deployment(tx, old, &format!("replaced by deployment #{}", target.id)).await?;
        }
        stop_instances(tx, instances, |i| i.deployment_id != Some(target.id)).await?;
        tracing::info!(app.name = %app.name, deployment.id = target.id, "cut over");
        Ok(())
    }

    /// Keeps the current deployment at its replica count. Returns why it could not.
    async fn keep_replicas(
        &self,
        tx: &mut PgConnection,
        app: &App,
        current: &Deployment,
        instances: &mut Vec<Instance>,
    ) -> anyhow::Result<Option<String>> {
        let replicas = current.spec.replicas as usize;
        let mut live: Vec<&Instance> = instances
            .iter()
            .filter(|i| i.deployment_id == Some(current.id) && i.live())
            .collect();
        if live.len() > replicas {
            // Stop the extra ones: those not running first, then the newest.
            live.sort_by_key(|i| (i.state == "running", std::cmp::Reverse(i.id)));
            let extra: Vec<i64> = live
                .iter()
                .take(live.len() - replicas)
                .map(|i| i.id)
                .collect();
            stop_instances(tx, instances, |i| extra.contains(&i.id)).await?;
            return Ok(None);
        }
        let missing = replicas - live.len();
        if missing == 0 {
            return Ok(None);
        }
        match self.nodes.place(tx, app.id, current, missing).await? {
            Ok(placed) => {
                create_instances(tx, app.id, current, placed, instances).await?;
                Ok(None)
            }
            Err(reason) => Ok(Some(reason)),
        }
    }

    /// The app's status (DESIGN §6), from what this reconcile saw.
    async fn status(
        &self,
        tx: &mut PgConnection,
        app: &App,
        current: Option<&Deployment>,
        instances: &[Instance],
        step: Option<(bool, &str, String)>,
    ) -> anyhow::Result<serde_json::Value> {
        let ready_now = current.is_some_and(|c| {
            let healthy = instances
                .iter()
                .filter(|i| i.deployment_id == Some(c.id) && i.healthy())
                .count();
            healthy >= c.spec.replicas as usize
        });
        if let Some(error) = &app.spec_error {
            return Ok(json!({"ready": ready_now, "reason": "InvalidSpec", "message": error}));
        }
        // The newest deployment failed (build or deadline): say so while the old one serves.
        let failed: Option<(i64, Option<String>, Option<String>)> = sqlx::query_as(
            "select d.generation, d.error, b.status from deployments d left join image_builds b on b.deployment_id = d.id
             where d.app_id = $1 and d.status = 'failed' and d.id > coalesce($2, 0)
               and d.id = (select max(id) from deployments where app_id = $1 and status <> 'cancelled')",
        )
        .bind(app.id)
        .bind(app.current)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((_, error, build_status)) = failed {
            let reason = if build_status.as_deref() == Some("failed") {
                "BuildFailed"
            } else {
                "ProgressDeadlineExceeded"
            };
            if reason == "BuildFailed" && app.status["reason"] == "BuildFailed" {
                // The builder wrote the message with the log tail; keep it.
                return Ok(
                    json!({"ready": ready_now, "reason": reason, "message": app.status["message"]}),
                );
            }
            return Ok(
                json!({"ready": ready_now, "reason": reason, "message": error.unwrap_or_default()}),
            );
        }
        let crashing = instances
            .iter()
            .filter(|i| {
                i.live()
                    && i.state == "failed"
                    && i.restart_count >= self.deps.options.crashloop_restarts
            })
            .max_by_key(|i| i.restart_count);
        if let Some(i) = crashing {
            let message = format!(
                "instance {} exited with code {} ({} restarts): {}",
                i.id,
                i.exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "?".into()),
                i.restart_count,
                i.last_error.clone().unwrap_or_default()
            );
            return Ok(json!({"ready": false, "reason": "CrashLoop", "message": message}));
        }
        if let Some((ready, reason, message)) = step {
            return Ok(
                json!({"ready": ready || (ready_now && reason != "Unschedulable"), "reason": reason, "message": message}),
            );
        }
        if let Some(i) = instances
            .iter()
            .find(|i| i.live() && i.state == "unhealthy")
        {
            return Ok(
                json!({"ready": ready_now, "reason": "HealthCheckFailed", "message": format!("instance {}: {}", i.id, i.last_error.clone().unwrap_or_default())}),
            );
        }
        Ok(match current {
            Some(c) if ready_now => {
                json!({"ready": true, "reason": "Ready", "message": format!("{}/{} instances healthy", c.spec.replicas, c.spec.replicas)})
            }
            Some(c) => {
                let healthy = instances
                    .iter()
                    .filter(|i| i.deployment_id == Some(c.id) && i.healthy())
                    .count();
                json!({"ready": false, "reason": "Progressing", "message": format!("{healthy}/{} instances healthy", c.spec.replicas)})
            }
            None => {
                json!({"ready": false, "reason": "Progressing", "message": format!("generation {} has no deployment yet", app.generation)})
            }
        })
    }
}

fn only_replicas_differ(a: &AppSpec, b: &AppSpec) -> bool {
    a.replicas != b.replicas
        && AppSpec {
            replicas: b.replicas,
            ..a.clone()
        } == *b
}

/// Whether an active deployment other than the current one is rolling out.
fn target_is_rolling(deployments: &[Deployment], current: Option<i64>) -> bool {
    deployments
        .iter()
        .any(|d| Some(d.id) != current && matches!(d.status.as_str(), "active" | "deploying"))
}

async fn load_deployments(tx: &mut PgConnection, app_id: i64) -> anyhow::Result<Vec<Deployment>> {
    let rows = sqlx::query(
        "select id, generation, spec, status, image_id, active_at from deployments
         where app_id = $1 and status in ('pending', 'building', 'deploying', 'active') order by id",
    )
    .bind(app_id)
    .fetch_all(&mut *tx)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(Deployment {
                id: r.get("id"),
                generation: r.get("generation"),
                spec: serde_json::from_value(r.get("spec"))
                    .context("a deployment's spec does not parse")?,
                status: r.get("status"),
                image_id: r.get("image_id"),
                active_at: r.get("active_at"),
            })
        })
        .collect()
}

async fn load_instances(tx: &mut PgConnection, app_id: i64) -> anyhow::Result<Vec<Instance>> {
    let rows = sqlx::query(
        "select id, deployment_id, desired_state = 'running' as desired_running, state, restart_count, exit_code, last_error
         from instances where app_id = $1 and (desired_state = 'running' or state not in ('stopped', 'lost', 'failed'))",
    )
    .bind(app_id)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| Instance {
            id: r.get("id"),
            deployment_id: r.get("deployment_id"),
            desired_running: r.get("desired_running"),
            state: r.get("state"),
            restart_count: r.get("restart_count"),
            exit_code: r.get("exit_code"),
            last_error: r.get("last_error"),
        })
        .collect())
}

/// Closes a deployment that lost to another: an active one is superseded, one that never
/// ran is cancelled.
async fn close_deployment(tx: &mut PgConnection, d: &Deployment, why: &str) -> anyhow::Result<()> {
    let (status, column) = match d.status.as_str() {
        "active" => ("superseded", "superseded_at"),
        _ => ("cancelled", "cancelled_at"),
    };
    sqlx::query(&format!(
        "update deployments set status = $2, {column} = now(), timeline = timeline || $3 where id = $1 and status = $4"
    ))
    .bind(d.id)
    .bind(status)
    .bind(timeline(status, why))
    .bind(&d.status)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Sets desired_state = stopped on the live instances matching `which`.
async fn stop_instances(
    tx: &mut PgConnection,
    instances: &mut [Instance],
    which: impl Fn(&Instance) -> bool,
) -> anyhow::Result<()> {
    let ids: Vec<i64> = instances
        .iter()
        .filter(|i| i.desired_running && which(i))
        .map(|i| i.id)
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query("update instances set desired_state = 'stopped' where id = any($1) and desired_state = 'running'")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    for i in instances.iter_mut().filter(|i| ids.contains(&i.id)) {
        i.desired_running = false;
    }
    Ok(())
}

/// Creates an instance on each placed node and tracks it in `instances`.
async fn create_instances(
    tx: &mut PgConnection,
    app_id: i64,
    d: &Deployment,
    placed: Vec<(i64, String)>,
    instances: &mut Vec<Instance>,
) -> anyhow::Result<()> {
    for (node_id, address) in placed {
        let id = create_instance(tx, app_id, d, node_id, &address).await?;
        instances.push(Instance {
            id,
            deployment_id: Some(d.id),
            desired_running: true,
            state: "pending".into(),
            restart_count: 0,
            exit_code: None,
            last_error: None,
        });
    }
    Ok(())
}

async fn create_instance(
    tx: &mut PgConnection,
    app_id: i64,
    d: &Deployment,
    node_id: i64,
    address: &str,
) -> anyhow::Result<i64> {
    let id: i64 = sqlx::query_scalar(
        "insert into instances (app_id, deployment_id, node_id, image_id, host) values ($1, $2, $3, $4, $5) returning id",
    )
    .bind(app_id)
    .bind(d.id)
    .bind(node_id)
    .bind(d.image_id)
    .bind(address)
    .fetch_one(&mut *tx)
    .await?;
    sqlx::query("insert into deployment_instances (deployment_id, instance_id) values ($1, $2)")
        .bind(d.id)
        .bind(id)
        .execute(&mut *tx)
        .await?;
    Ok(id)
}

/// Marks silent nodes down and their instances lost (the apps then replace them). Runs on
/// a timer while the manager leads.
pub async fn mark_silent_nodes(pool: &PgPool, timeout: Duration) -> anyhow::Result<Vec<i64>> {
    let mut tx = pool.begin().await?;
    let down: Vec<i64> = sqlx::query_scalar(
        "update nodes set state = 'down'
         where state <> 'down' and (last_heartbeat_at is null or last_heartbeat_at < now() - make_interval(secs => $1))
         returning id",
    )
    .bind(timeout.as_secs_f64())
    .fetch_all(&mut *tx)
    .await?;
    if !down.is_empty() {
        sqlx::query(
            "update instances set state = 'lost', desired_state = 'stopped', last_error = 'its node stopped heartbeating'
             where node_id = any($1) and state not in ('stopped', 'lost')",
        )
        .bind(&down)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(down)
}

/// Runs the manager while it leads: the controller over app events and the node timer.
pub async fn run(
    deps: ManagerDeps,
    database_url: String,
    js: async_nats::jetstream::Context,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    loop {
        let Some(lead) = crate::leader::acquire(
            &database_url,
            crate::leader::MANAGER_LOCK,
            "manager",
            &shutdown,
        )
        .await
        else {
            return Ok(());
        };
        let scope = lead.lost.child_token();
        let stop = scope.clone();
        let link = tokio::spawn({
            let (shutdown, scope) = (shutdown.clone(), scope.clone());
            async move {
                shutdown.cancelled().await;
                scope.cancel();
            }
        });
        let manager = Manager::new(deps.clone());
        let options = crate::events::controller::ControllerOptions::new(
            "manager",
            vec!["app", "deployment", "image_build", "instance", "node"],
        );
        let controller = crate::events::controller::run_controller(
            manager,
            js.clone(),
            options,
            metrics.clone(),
            scope.clone(),
        );
        let nodes = async {
            loop {
                if let Err(e) = mark_silent_nodes(&deps.pool, deps.options.node_timeout).await {
                    tracing::warn!(error = format!("{e:#}"), "checking node heartbeats failed");
                }
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        };
        let (result, ()) = tokio::join!(controller, nodes);
        link.abort();
        result?;
        if shutdown.is_cancelled() {
            return Ok(());
        }
        tracing::warn!("manager lost leadership; standing by");
    }
}
