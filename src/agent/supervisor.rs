//! One instance's life on the node: adopt or start, probe, restart after a crash with
//! capped exponential backoff, and on stop drain and stop. The only writer of the
//! instance's runtime columns while it lives.
//!
//! States written: `starting` when started, `running` after `healthy_threshold` passing
//! probes, `unhealthy` after `unhealthy_threshold` failing ones (and `running` again when
//! they pass), `failed` with the exit code and last log lines when it exits, `stopping`
//! then `stopped` when told to stop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::runtime::{Adopted, Exit, Launch, LogRing, Process};
use super::{Agent, InstanceRow};
use crate::events::controller::backoff;

/// How long a stopping instance keeps serving before its signal, so every edge has taken it
/// out of its routes first (they do within milliseconds of the event; this is the margin).
const DEREGISTRATION_DELAY: Duration = Duration::from_secs(1);

/// Probes come this fast while an instance starts (capped by the spec's interval), so a
/// quick app is routable within tens of milliseconds of listening.
const STARTUP_PROBE: Duration = Duration::from_millis(25);

/// Crash backoff starts over once an instance has stayed up this long.
const STABLE_AFTER: Duration = Duration::from_secs(60);

/// Why the running phase ended.
enum Ended {
    Stop,
    Exited(Exit),
}

pub(super) async fn supervise(
    agent: Arc<Agent>,
    id: i64,
    row: Option<InstanceRow>,
    mut run: watch::Receiver<bool>,
    logs: LogRing,
) {
    let runtime_id = row.as_ref().and_then(|r| r.runtime_id.clone());
    // What still runs of it from an earlier agent.
    let mut process = None;
    let mut crashed = None;
    loop {
        match agent.runtimes.adopt(id, runtime_id.as_deref(), &logs).await {
            Ok(Some(Adopted::Running(p))) => process = Some(p),
            Ok(Some(Adopted::Exited(exit))) => crashed = Some(exit),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(instance.id = id, error = %e, "cannot look for the instance's container; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(2)) => continue,
                    _ = run.changed() => continue,
                }
            }
        }
        break;
    }
    let owned = row.is_some();
    // Orphans (no row of this node) get the default drain time.
    let drain = row
        .as_ref()
        .and_then(|r| r.spec.as_ref())
        .map(|s| s.deploy.drain_timeout.0)
        .unwrap_or(Duration::from_secs(30));
    let Some(row) = row.filter(|_| *run.borrow()) else {
        stop(&agent, id, owned, process, None, drain, &logs).await;
        return;
    };
    let Some(spec) = row.spec.clone() else {
        tracing::warn!(
            instance.id = id,
            "the instance has no deployment spec; stopping it"
        );
        stop(&agent, id, true, process, None, drain, &logs).await;
        return;
    };
    let mut port = row.port.and_then(|p| u16::try_from(p).ok());
    if process.is_none() {
        port = None; // a fresh start gets a port checked free now
    } else if let Some(p) = port {
        agent.ports.lock().expect("ports lock").insert(p);
    }
    let mut state = row.state.clone();
    let mut attempt: u32 = 0;
    if let Some(exit) = crashed {
        record_exit(&agent, id, &exit, &logs).await;
        attempt = 1;
    }
    loop {
        let mut p = match process.take() {
            Some(p) => p,
            None => {
                if attempt > 0 {
                    let delay = backoff(
                        attempt,
                        agent.deps.options.restart_backoff,
                        agent.deps.options.max_restart_backoff,
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = wait_for_stop(&mut run) => {
                            stop(&agent, id, true, None, port, drain, &logs).await;
                            return;
                        }
                    }
                }
                let assigned = match port {
                    Some(p) => p,
                    None => match agent.allocate_port() {
                        Ok(p) => p,
                        Err(e) => {
                            record_start_failure(&agent, id, &e).await;
                            attempt += 1;
                            continue;
                        }
                    },
                };
                port = Some(assigned);
                mark(&agent, id, "starting", Some(assigned), None).await;
                state = "starting".into();
                let launch = Launch {
                    instance_id: id,
                    app: &row.app,
                    deployment_id: row.deployment_id,
                    spec: &spec,
                    image: row.image.as_deref(),
                    port: assigned,
                    logs: logs.clone(),
                };
                match agent.runtimes.start(&launch).await {
                    Ok(p) => {
                        mark(&agent, id, "starting", Some(assigned), Some(&p.runtime_id)).await;
                        p
                    }
                    Err(e) => {
                        tracing::warn!(instance.id = id, error = %e, "starting failed");
                        record_start_failure(&agent, id, &e).await;
                        attempt += 1;
                        continue;
                    }
                }
            }
        };
        let started = Instant::now();
        let addr = probe_address(&agent.deps.node.address, port.unwrap_or(0)).await;
        match watch_health(&agent, id, &spec, addr, &mut p, &mut state, &mut run).await {
            Ended::Stop => {
                stop(&agent, id, true, Some(p), port, drain, &logs).await;
                return;
            }
            Ended::Exited(exit) => {
                tracing::info!(instance.id = id, code = ?exit.code, "instance exited");
                record_exit(&agent, id, &exit, &logs).await;
                if let Err(e) = agent.runtimes.discard(&p).await {
                    tracing::warn!(instance.id = id, error = %e, "removing the exited container failed");
                }
                attempt = if started.elapsed() > STABLE_AFTER {
                    1
                } else {
                    attempt + 1
                };
            }
        }
    }
}

/// Probes until the process exits or the instance is told to stop.
async fn watch_health(
    agent: &Agent,
    id: i64,
    spec: &crate::spec::AppSpec,
    addr: Option<SocketAddr>,
    process: &mut Process,
    state: &mut String,
    run: &mut watch::Receiver<bool>,
) -> Ended {
    // Without a health check, a port or a domain nothing can be probed: running it is.
    let probed = spec.health.is_some() || spec.port.is_some() || !spec.domains.is_empty();
    let health = spec.health.clone().unwrap_or_default();
    let interval = health.interval.0.max(Duration::from_millis(10));
    let (mut passes, mut fails) = (0u32, 0u32);
    let mut reported: Option<String> = None;
    let mut delay = Duration::ZERO;
    if !probed && state.as_str() != "running" {
        mark(agent, id, "running", None, None).await;
        *state = "running".into();
    }
    loop {
        tokio::select! {
            _ = wait_for_stop(run) => return Ended::Stop,
            exit = &mut process.exited => {
                return Ended::Exited(exit.unwrap_or(Exit { code: None, message: "the runtime lost track of it".into() }));
            }
            _ = tokio::time::sleep(delay), if probed => {
                let result = match addr {
                    Some(addr) => super::probe::probe(addr, health.path.as_deref(), health.timeout.0).await,
                    None => Err(format!("the node address `{}` does not resolve", agent.deps.node.address)),
                };
                match result {
                    Ok(()) => { passes += 1; fails = 0; }
                    Err(e) => { fails += 1; passes = 0; reported = Some(e); }
                }
                let healthy_now = passes >= health.healthy_threshold.max(1);
                let failing = fails >= health.unhealthy_threshold.max(1);
                match state.as_str() {
                    "running" if failing => {
                        set_unhealthy(agent, id, reported.as_deref().unwrap_or("")).await;
                        *state = "unhealthy".into();
                    }
                    "running" => {}
                    _ if healthy_now => {
                        mark(agent, id, "running", None, None).await;
                        *state = "running".into();
                    }
                    "starting" if failing && fails == health.unhealthy_threshold.max(1) => {
                        // Still starting, but say why it is not healthy yet.
                        note_error(agent, id, reported.as_deref().unwrap_or("")).await;
                    }
                    _ => {}
                }
                delay = if state.as_str() == "starting" {
                    STARTUP_PROBE.min(interval)
                } else {
                    interval
                };
            }
        }
    }
}

/// Resolves when the instance should stop (or its supervisor handle is gone).
async fn wait_for_stop(run: &mut watch::Receiver<bool>) {
    let _ = run.wait_for(|r| !*r).await;
}

async fn probe_address(address: &str, port: u16) -> Option<SocketAddr> {
    tokio::net::lookup_host((address, port)).await.ok()?.next()
}

/// Drains and stops; `owned` says whether the row is this node's to write.
async fn stop(
    agent: &Agent,
    id: i64,
    owned: bool,
    process: Option<Process>,
    port: Option<u16>,
    drain: Duration,
    logs: &LogRing,
) {
    if let Some(mut p) = process {
        if owned {
            mark(agent, id, "stopping", None, None).await;
        }
        let delay = DEREGISTRATION_DELAY.min(drain / 2);
        tokio::time::sleep(delay).await;
        match agent.runtimes.stop(&mut p, drain - delay).await {
            Ok(exit) => {
                tracing::info!(instance.id = id, code = ?exit.and_then(|e| e.code), "instance stopped")
            }
            Err(e) => tracing::warn!(instance.id = id, error = %e, "stopping failed"),
        }
    }
    if owned {
        let result = sqlx::query(
            "update instances set state = 'stopped', stopped_at = coalesce(stopped_at, now()), runtime_id = null
             where id = $1 and node_id = $2 and (state <> 'stopped' or runtime_id is not null)",
        )
        .bind(id)
        .bind(agent.node_id)
        .execute(&agent.deps.pool)
        .await;
        if let Err(e) = result {
            tracing::warn!(instance.id = id, error = %e, "recording the stop failed");
        }
        if let Some(lines) = logs.take_changed() {
            let _ = super::write_logs(&agent.deps.pool, id, &lines).await;
        }
    }
    agent.release_port(port);
}

/// Writes a state (and the port and runtime id when given). Failures are logged: the
/// next transition or the resync writes the truth again.
async fn mark(agent: &Agent, id: i64, state: &str, port: Option<u16>, runtime_id: Option<&str>) {
    let result = sqlx::query(
        "update instances set state = $2,
             port = coalesce($3, port),
             host = coalesce(host, $5),
             runtime_id = coalesce($4, runtime_id),
             started_at = case when $2 = 'starting' then now() else started_at end,
             last_error = case when $2 = 'running' then null else last_error end
         where id = $1 and node_id = $6",
    )
    .bind(id)
    .bind(state)
    .bind(port.map(i32::from))
    .bind(runtime_id)
    .bind(&agent.deps.node.address)
    .bind(agent.node_id)
    .execute(&agent.deps.pool)
    .await;
    if let Err(e) = result {
        tracing::warn!(instance.id = id, state, error = %e, "recording the state failed");
    }
}

async fn set_unhealthy(agent: &Agent, id: i64, evidence: &str) {
    let result = sqlx::query(
        "update instances set state = 'unhealthy', last_error = $2 where id = $1 and node_id = $3",
    )
    .bind(id)
    .bind(evidence)
    .bind(agent.node_id)
    .execute(&agent.deps.pool)
    .await;
    if let Err(e) = result {
        tracing::warn!(instance.id = id, error = %e, "recording unhealthy failed");
    }
}

async fn note_error(agent: &Agent, id: i64, evidence: &str) {
    let _ = sqlx::query("update instances set last_error = $2 where id = $1 and node_id = $3")
        .bind(id)
        .bind(evidence)
        .bind(agent.node_id)
        .execute(&agent.deps.pool)
        .await;
}

/// An exit: `failed` with the code and the last 50 lines; it will be restarted.
async fn record_exit(agent: &Agent, id: i64, exit: &Exit, logs: &LogRing) {
    let code = exit
        .code
        .map(|c| c.to_string())
        .unwrap_or_else(|| "unknown".into());
    let mut message = format!("exited with code {code}");
    if !exit.message.is_empty() {
        message.push_str(&format!(" ({})", exit.message));
    }
    let tail = logs.tail(50);
    if !tail.is_empty() {
        message.push('\n');
        message.push_str(&tail);
    }
    let result = sqlx::query(
        "update instances set state = 'failed', exit_code = $2, last_error = $3,
             restart_count = restart_count + 1, runtime_id = null
         where id = $1 and node_id = $4",
    )
    .bind(id)
    .bind(exit.code.and_then(|c| i32::try_from(c).ok()))
    .bind(&message)
    .bind(agent.node_id)
    .execute(&agent.deps.pool)
    .await;
    if let Err(e) = result {
        tracing::warn!(instance.id = id, error = %e, "recording the exit failed");
    }
    if let Some(lines) = logs.take_changed() {
        let _ = super::write_logs(&agent.deps.pool, id, &lines).await;
    }
}

/// A start that failed before anything ran (no image, no command, engine error).
async fn record_start_failure(agent: &Agent, id: i64, error: &str) {
    let result = sqlx::query(
        "update instances set state = 'failed', last_error = $2, restart_count = restart_count + 1
         where id = $1 and node_id = $3",
    )
    .bind(id)
    .bind(format!("could not start: {error}"))
    .bind(agent.node_id)
    .execute(&agent.deps.pool)
    .await;
    if let Err(e) = result {
        tracing::warn!(instance.id = id, error = %e, "recording the start failure failed");
    }
}
