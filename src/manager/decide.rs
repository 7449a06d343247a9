//! One app's next step, decided in memory from its rows as [`super::db::load`] read them.
//! Nothing here touches Postgres: every write goes into the batch's [`Writes`], which the
//! batch applies in the same transaction that locked the app.

use std::time::Duration;

use serde_json::json;

use super::db::{Loaded, Writes};
use super::schedule::Placer;
use super::{App, Deployment, Instance, ManagerOptions};
use crate::events::controller::Action;
use crate::spec::{AppSpec, Strategy};

/// A status a step asks for: (ready, reason, message).
type Step = (bool, &'static str, String);

/// What one batch decides with.
pub(super) struct Decider<'a, 'p> {
    pub options: &'a ManagerOptions,
    pub placer: &'a mut Placer<'p>,
    pub writes: &'a mut Writes,
}

impl Decider<'_, '_> {
    /// Moves the app one step (module docs of `manager`) and returns when to look again.
    pub fn app(&mut self, loaded: Loaded) -> Action {
        let Loaded {
            app,
            deployments,
            mut instances,
            failed,
        } = loaded;
        if app.deleted {
            return self.deleted(&app, &deployments, &mut instances);
        }
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
            self.writes.close(d, "a newer deployment arrived");
            self.writes
                .stop(&mut instances, |i| i.deployment_id == Some(d.id));
        }

        let mut step: Option<Step> = None;
        let mut action = Action::Done;
        if let Some(target) = &target {
            match target.status.as_str() {
                "pending" | "building" => {
                    let scale_only = current
                        .as_ref()
                        .is_some_and(|c| only_replicas_differ(&c.spec, &target.spec));
                    if let (Some(c), true, "pending") =
                        (&current, scale_only, target.status.as_str())
                    {
                        self.scale_current(&app, c, target);
                        // Look again at once: the current deployment's spec changed.
                        return Action::RequeueAfter(Duration::ZERO);
                    }
                    self.writes.build(target.id);
                    step = Some((
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
                        self.writes.transition(target, "active", "rolling out");
                    }
                    let active_at = target.active_at.unwrap_or_else(chrono::Utc::now);
                    let (s, a) =
                        self.roll_out(&app, current.as_ref(), target, &mut instances, active_at);
                    step = Some(s);
                    action = a;
                }
                _ => {}
            }
        }
        // The current deployment keeps its replica count when no rollout is replacing it.
        let rolling = deployments.iter().any(|d| {
            Some(d.id) != app.current && matches!(d.status.as_str(), "active" | "deploying")
        });
        if let (Some(c), false) = (&current, rolling)
            && let Some(reason) = self.keep_replicas(&app, c, &mut instances)
        {
            step = Some((false, "Unschedulable", reason));
            action = Action::RequeueAfter(Duration::from_secs(5));
        }
        let computed = status(
            self.options,
            &app,
            current.as_ref(),
            &instances,
            failed,
            step,
        );
        if computed != app.status {
            self.writes.set_status(app.id, computed);
        }
        action
    }

    /// A deleted app: every instance stopped, open deployments closed, domains released.
    fn deleted(
        &mut self,
        app: &App,
        deployments: &[Deployment],
        instances: &mut [Instance],
    ) -> Action {
        self.writes.stop(instances, |_| true);
        for d in deployments {
            self.writes.close(d, "the app was deleted");
        }
        self.writes.release_domains(app.id);
        let status = json!({"ready": false, "reason": "Deleted", "message": "the app was deleted; its instances are stopped"});
        if status != app.status {
            self.writes.set_status(app.id, status);
        }
        Action::Done
    }

    /// Applies a replicas-only change to the current deployment instead of building.
    fn scale_current(&mut self, app: &App, current: &Deployment, target: &Deployment) {
        let message = format!(
            "replicas {} -> {} applied to deployment #{} without a build",
            current.spec.replicas, target.spec.replicas, current.id
        );
        self.writes
            .set_spec(current, target.spec.to_canonical_json());
        self.writes.note(current, "scaled", &message);
        self.writes.transition(target, "cancelled", &message);
        self.writes.observe(app.id, target.generation);
        tracing::info!(app.name = %app.name, "{message}");
    }

    /// One step of a rollout of `target`. Returns its status and when to look again.
    fn roll_out(
        &mut self,
        app: &App,
        current: Option<&Deployment>,
        target: &Deployment,
        instances: &mut Vec<Instance>,
        active_at: chrono::DateTime<chrono::Utc>,
    ) -> (Step, Action) {
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
            self.cut_over(app, current, target, instances);
            return (
                (
                    true,
                    "Ready",
                    format!("{replicas}/{replicas} instances healthy"),
                ),
                Action::Done,
            );
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
            self.writes.fail(target, &message);
            self.writes
                .stop(instances, |i| i.deployment_id == Some(target.id));
            return (
                (false, "ProgressDeadlineExceeded", message),
                Action::RequeueAfter(Duration::ZERO),
            );
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
                    self.writes
                        .stop(instances, |i| i.deployment_id != Some(target.id));
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
                self.writes.stop(instances, |i| {
                    i.deployment_id != Some(target.id) && i.state != "running"
                });
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
                    self.writes.stop(instances, |i| victims.contains(&i.id));
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
            match self.placer.place(app.id, target, to_create) {
                Ok(placed) => self.writes.create(app.id, target, placed, instances),
                Err(reason) => {
                    return (
                        (false, "Unschedulable", reason),
                        Action::RequeueAfter(Duration::from_secs(5)),
                    );
                }
            }
        }
        let left = (deadline - chrono::Utc::now()).to_std().unwrap_or_default();
        let message = format!(
            "rolling out deployment #{}: {new_healthy}/{replicas} new instances healthy",
            target.id
        );
        (
            (false, "Progressing", message),
            Action::RequeueAfter(left + Duration::from_millis(50)),
        )
    }

    /// The target becomes current; older deployments are superseded and their instances stopped.
    fn cut_over(
        &mut self,
        app: &App,
        current: Option<&Deployment>,
        target: &Deployment,
        instances: &mut [Instance],
    ) {
        self.writes.set_current(app.id, target.id);
        self.writes.observe(app.id, target.generation);
        self.writes
            .note(target, "current", "all instances healthy: serving");
        if let Some(old) = current {
            self.writes
                .close(old, &format!("replaced by deployment #{}", target.id));
        }
        self.writes
            .stop(instances, |i| i.deployment_id != Some(target.id));
        tracing::info!(app.name = %app.name, deployment.id = target.id, "cut over");
    }

    /// Keeps the current deployment at its replica count. Returns why it could not.
    fn keep_replicas(
        &mut self,
        app: &App,
        current: &Deployment,
        instances: &mut Vec<Instance>,
    ) -> Option<String> {
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
            self.writes.stop(instances, |i| extra.contains(&i.id));
            return None;
        }
        let missing = replicas - live.len();
        if missing == 0 {
            return None;
        }
        match self.placer.place(app.id, current, missing) {
            Ok(placed) => {
                self.writes.create(app.id, current, placed, instances);
                None
            }
            Err(reason) => Some(reason),
        }
    }
}

/// The app's status (DESIGN §6), from what this reconcile saw and did.
fn status(
    options: &ManagerOptions,
    app: &App,
    current: Option<&Deployment>,
    instances: &[Instance],
    failed: Option<(Option<String>, bool)>,
    step: Option<Step>,
) -> serde_json::Value {
    let ready_now = current.is_some_and(|c| {
        let healthy = instances
            .iter()
            .filter(|i| i.deployment_id == Some(c.id) && i.healthy())
            .count();
        healthy >= c.spec.replicas as usize
    });
    if let Some(error) = &app.spec_error {
        return json!({"ready": ready_now, "reason": "InvalidSpec", "message": error});
    }
    // The newest deployment failed (build or deadline): say so while the old one serves.
    if let Some((error, build_failed)) = failed {
        let reason = if build_failed {
            "BuildFailed"
        } else {
            "ProgressDeadlineExceeded"
        };
        if build_failed && app.status["reason"] == "BuildFailed" {
            // The builder wrote the message with the log tail; keep it.
            return json!({"ready": ready_now, "reason": reason, "message": app.status["message"]});
        }
        return json!({"ready": ready_now, "reason": reason, "message": error.unwrap_or_default()});
    }
    let crashing = instances
        .iter()
        .filter(|i| {
            i.live() && i.state == "failed" && i.restart_count >= options.crashloop_restarts
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
        return json!({"ready": false, "reason": "CrashLoop", "message": message});
    }
    if let Some((ready, reason, message)) = step {
        return json!({"ready": ready || (ready_now && reason != "Unschedulable"), "reason": reason, "message": message});
    }
    if let Some(i) = instances
        .iter()
        .find(|i| i.live() && i.state == "unhealthy")
    {
        return json!({"ready": ready_now, "reason": "HealthCheckFailed", "message": format!("instance {}: {}", i.id, i.last_error.clone().unwrap_or_default())});
    }
    match current {
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
    }
}

fn only_replicas_differ(a: &AppSpec, b: &AppSpec) -> bool {
    a.replicas != b.replicas
        && AppSpec {
            replicas: b.replicas,
            ..a.clone()
        } == *b
}
