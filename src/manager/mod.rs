//! The manager: the reconcile loop from a deployment to running, routed and cleaned-up
//! instances (DESIGN §1 steps 2, 4 and 6).
//!
//! One manager leads (advisory lock). It reconciles apps by id, in batches: the apps ready
//! in the work queue at that moment (up to [`BATCH`]; one, when events come one at a time)
//! share one transaction. It locks their rows (`for no key update`, in id order, as the
//! watcher's apply does), so the watcher and a second manager can never interleave with
//! it, reads everything it needs in a few set-based queries (`db.rs`), decides each app's
//! step in memory (`decide.rs`), writes the steps back together, and commits. Each app
//! moves one step:
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

mod db;
mod decide;
mod schedule;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::events::EventPayload;
use crate::events::controller::{Action, Reconciler};
use crate::spec::AppSpec;

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
    /// Written as joins of per-app aggregates, so its cost stays linear whatever the
    /// planner believes about the tables (a per-app subplan took 17 s on 10,000 apps with
    /// stale statistics).
    async fn list_keys(&self) -> anyhow::Result<Vec<i64>> {
        Ok(sqlx::query_scalar(
            "with wanted as (
                 select app_id, count(*) filter (where state = 'running') as running, count(*) as wanted
                 from instances where desired_state = 'running' group by app_id
             ), open as (
                 select app_id, count(*) as n from deployments
                 where status in ('pending', 'building', 'deploying', 'active') group by app_id
             )
             select a.id from apps a
             left join deployments c on c.id = a.current_deployment_id
             left join wanted w on w.app_id = a.id
             left join open o on o.app_id = a.id
             where a.deleted_at is not null and w.wanted > 0
                or a.deleted_at is null and (
                    a.status->>'reason' is distinct from 'Ready'
                    or a.generation <> a.observed_generation
                    or a.spec_error is not null
                    or c.id is null
                    or coalesce(w.running, 0) <> coalesce(w.wanted, 0)
                    or coalesce(w.wanted, 0) <> (c.spec->>'replicas')::bigint
                    -- an open deployment besides the current one
                    or coalesce(o.n, 0) > (c.status in ('pending', 'building', 'deploying', 'active'))::int)",
        )
        .fetch_all(&self.deps.pool)
        .await?)
    }

    async fn reconcile(&self, app_id: &i64) -> anyhow::Result<Action> {
        let mut actions = self.reconcile_apps(std::slice::from_ref(app_id)).await?;
        Ok(actions.pop().expect("one action per app"))
    }

    fn batch_size(&self) -> usize {
        BATCH
    }

    /// The batch in one transaction. If it fails, each app is tried alone, so one app's
    /// error (a spec that does not parse, a lock timeout) holds back only that app.
    async fn reconcile_batch(&self, app_ids: &[i64]) -> Vec<anyhow::Result<Action>> {
        if app_ids.len() > 1 {
            match self.reconcile_apps(app_ids).await {
                Ok(actions) => return actions.into_iter().map(Ok).collect(),
                Err(e) => tracing::debug!(
                    apps = app_ids.len(),
                    error = format!("{e:#}"),
                    "a batch failed; reconciling its apps one by one"
                ),
            }
        }
        let mut results = Vec::with_capacity(app_ids.len());
        for id in app_ids {
            results.push(self.reconcile(id).await);
        }
        results
    }
}

/// Apps one worker reconciles in one transaction, at most.
const BATCH: usize = 64;

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
    /// One transaction for `app_ids`: lock and read them, decide each app's step, write
    /// the steps together. Returns one action per id, in order.
    async fn reconcile_apps(&self, app_ids: &[i64]) -> anyhow::Result<Vec<Action>> {
        let mut tx = self.deps.pool.begin().await?;
        let loaded = db::load(&mut tx, app_ids).await?;
        let mut actions: HashMap<i64, Action> = HashMap::with_capacity(loaded.len());
        if !loaded.is_empty() {
            let nodes = schedule::load_nodes(&mut tx).await?;
            let mut writes = db::Writes::default();
            {
                let mut placer = self.nodes.placer(&mut tx, nodes).await?;
                let mut decider = decide::Decider {
                    options: &self.deps.options,
                    placer: &mut placer,
                    writes: &mut writes,
                };
                for app in loaded {
                    let id = app.app.id;
                    let span = tracing::debug_span!("app", app.id = id, app.name = %app.app.name);
                    let _entered = span.enter();
                    actions.insert(id, decider.app(app));
                }
            }
            writes.apply(&mut tx).await?;
        }
        tx.commit().await?;
        // An app that is gone needs nothing.
        Ok(app_ids
            .iter()
            .map(|id| actions.get(id).copied().unwrap_or(Action::Done))
            .collect())
    }
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
