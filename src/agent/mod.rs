//! The node agent (DESIGN §1 step 5, §7): registers its node, heartbeats, and makes the
//! node's instances match their rows.
//!
//! Reconciles are keyed by instance id and fed by `instance.*` events for this node, by a
//! resync (every wanted instance of the node plus every container labelled with the node),
//! and by nothing else. A reconcile only decides run or stop; each instance that should run
//! (or still has something to stop) has one [`supervisor`] task that owns its process:
//! start or adopt, probe, restart after a crash with backoff, drain and stop.
//!
//! Invariants: the agent writes `state`, `port`, `runtime_id`, `exit_code`, `last_error`
//! and `restart_count` of its own node's instances and nothing else; at most one supervisor
//! runs per instance; containers without berth labels for this node are never touched.

pub mod probe;
pub mod runtime;
mod supervisor;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use sqlx::{PgPool, Row};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::events::EventPayload;
use crate::events::controller::{Action, ControllerOptions, Reconciler};
use crate::spec::AppSpec;
use runtime::{LogRing, Runtimes};

/// What the agent needs.
#[derive(Clone)]
pub struct AgentDeps {
    pub pool: PgPool,
    /// None on a node without Docker: exec instances still run.
    pub docker: Option<bollard::Docker>,
    pub node: NodeConfig,
    /// Working directories of exec instances go under `<data dir>/exec`.
    pub data_dir: PathBuf,
    pub options: AgentOptions,
}

/// The node as it registers itself.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub name: String,
    /// Where the edge (and the agent's probes) reach this node's instances.
    pub address: String,
    pub labels: BTreeMap<String, String>,
    /// `{"memory": bytes, "cpus": n}`; measured from the machine when None.
    pub capacity: Option<serde_json::Value>,
}

#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// How often the node says it is alive (the manager's timeout is 10 s).
    pub heartbeat: Duration,
    /// First delay before restarting a crashed instance; doubles per crash up to the max.
    pub restart_backoff: Duration,
    pub max_restart_backoff: Duration,
    /// Prefix of container names.
    pub container_prefix: String,
    /// Period of the full resync against the rows and the engine.
    pub resync: Duration,
}

impl Default for AgentOptions {
    fn default() -> Self {
        AgentOptions {
            heartbeat: Duration::from_secs(2),
            restart_backoff: Duration::from_secs(1),
            max_restart_backoff: Duration::from_secs(60),
            container_prefix: "berth-".into(),
            resync: Duration::from_secs(30),
        }
    }
}

pub struct Agent {
    deps: AgentDeps,
    /// This node's row.
    node_id: i64,
    runtimes: Runtimes,
    /// One supervisor per instance that runs or still has something to stop.
    supervisors: Mutex<HashMap<i64, Supervisor>>,
    /// Host ports handed to this node's instances, so two never get the same one.
    ports: Mutex<HashSet<u16>>,
    /// Itself, for supervisor tasks that outlive the reconcile that spawned them.
    me: std::sync::Weak<Agent>,
}

/// The handle of one instance's supervisor task.
struct Supervisor {
    /// true: keep it running; false: drain and stop it.
    run: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    logs: LogRing,
}

/// An instance row as the agent reads it.
#[derive(Debug, Clone)]
struct InstanceRow {
    node_id: Option<i64>,
    app: String,
    deployment_id: Option<i64>,
    desired_running: bool,
    state: String,
    runtime_id: Option<String>,
    port: Option<i32>,
    spec: Option<AppSpec>,
    image: Option<String>,
}

impl Agent {
    /// Registers (or re-registers) the node and returns the agent.
    pub async fn register(deps: AgentDeps) -> anyhow::Result<Arc<Agent>> {
        let capacity = deps.node.capacity.clone().unwrap_or_else(machine_capacity);
        let node_id: i64 = sqlx::query_scalar(
            "insert into nodes (name, address, labels, capacity, state, last_heartbeat_at)
             values ($1, $2, $3, $4, 'ready', now())
             on conflict (name) do update set address = excluded.address, labels = excluded.labels,
                 capacity = excluded.capacity, last_heartbeat_at = now(),
                 state = case when nodes.state = 'draining' then 'draining' else 'ready' end
             returning id",
        )
        .bind(&deps.node.name)
        .bind(&deps.node.address)
        .bind(serde_json::to_value(&deps.node.labels)?)
        .bind(capacity)
        .fetch_one(&deps.pool)
        .await
        .context("registering the node")?;
        let runtimes = Runtimes {
            docker: deps.docker.clone(),
            node: deps.node.name.clone(),
            container_prefix: deps.options.container_prefix.clone(),
            exec_dir: deps.data_dir.join("exec"),
        };
        tracing::info!(node.name = %deps.node.name, node.id = node_id, "node registered");
        Ok(Arc::new_cyclic(|me| Agent {
            deps,
            node_id,
            runtimes,
            supervisors: Default::default(),
            ports: Default::default(),
            me: me.clone(),
        }))
    }

    pub fn node_id(&self) -> i64 {
        self.node_id
    }

    /// Marks the node alive (and back from `down`), and writes changed log tails.
    async fn heartbeat(&self) -> anyhow::Result<()> {
        sqlx::query(
            "update nodes set last_heartbeat_at = now(),
                 state = case when state = 'down' then 'ready' else state end
             where id = $1",
        )
        .bind(self.node_id)
        .execute(&self.deps.pool)
        .await?;
        let changed: Vec<(i64, String)> = {
            let supervisors = self.supervisors.lock().expect("supervisors lock");
            supervisors
                .iter()
                .filter_map(|(id, s)| Some((*id, s.logs.take_changed()?)))
                .collect()
        };
        for (id, lines) in changed {
            write_logs(&self.deps.pool, id, &lines).await?;
        }
        Ok(())
    }

    async fn load(&self, id: i64) -> anyhow::Result<Option<InstanceRow>> {
        let Some(r) = sqlx::query(
            "select i.node_id, a.name as app, i.deployment_id, i.desired_state = 'running' as desired_running,
                    i.state, i.runtime_id, i.port, d.spec, img.reference
             from instances i join apps a on a.id = i.app_id
             left join deployments d on d.id = i.deployment_id
             left join images img on img.id = i.image_id
             where i.id = $1",
        )
        .bind(id)
        .fetch_optional(&self.deps.pool)
        .await?
        else {
            return Ok(None);
        };
        let spec: Option<serde_json::Value> = r.get("spec");
        Ok(Some(InstanceRow {
            node_id: r.get("node_id"),
            app: r.get("app"),
            deployment_id: r.get("deployment_id"),
            desired_running: r.get("desired_running"),
            state: r.get("state"),
            runtime_id: r.get("runtime_id"),
            port: r.get("port"),
            spec: spec.map(serde_json::from_value).transpose()?,
            image: r.get("reference"),
        }))
    }

    /// A host port no other instance of this node has, free right now.
    fn allocate_port(&self) -> Result<u16, String> {
        let mut ports = self.ports.lock().expect("ports lock");
        for _ in 0..20 {
            let listener = std::net::TcpListener::bind((self.deps.node.address.as_str(), 0))
                .or_else(|_| std::net::TcpListener::bind(("0.0.0.0", 0)))
                .map_err(|e| format!("finding a free port: {e}"))?;
            let port = listener.local_addr().map_err(|e| e.to_string())?.port();
            if ports.insert(port) {
                return Ok(port);
            }
        }
        Err("no free port found".into())
    }

    fn release_port(&self, port: Option<u16>) {
        if let Some(p) = port {
            self.ports.lock().expect("ports lock").remove(&p);
        }
    }
}

impl Reconciler for Agent {
    type Key = i64;

    fn name(&self) -> &'static str {
        "agent"
    }

    fn keys_for(&self, event: &EventPayload) -> Vec<i64> {
        if event.table == "instance" && event.node_id == Some(self.node_id) {
            vec![event.id]
        } else {
            Vec::new()
        }
    }

    /// The node's instances that run or should, every container labelled with the node
    /// (orphans included), and every supervised instance.
    async fn list_keys(&self) -> anyhow::Result<Vec<i64>> {
        let mut keys: Vec<i64> = sqlx::query_scalar(
            "select id from instances where node_id = $1
             and (desired_state = 'running' or state not in ('stopped', 'failed'))",
        )
        .bind(self.node_id)
        .fetch_all(&self.deps.pool)
        .await?;
        keys.extend(
            self.runtimes
                .container_instances()
                .await
                .map_err(|e| anyhow::anyhow!("listing containers: {e}"))?,
        );
        keys.extend(self.supervisors.lock().expect("supervisors lock").keys());
        keys.sort_unstable();
        keys.dedup();
        Ok(keys)
    }

    async fn reconcile(&self, id: &i64) -> anyhow::Result<Action> {
        let row = self.load(*id).await?;
        let mine = row
            .as_ref()
            .is_some_and(|r| r.node_id == Some(self.node_id));
        let run = mine && row.as_ref().is_some_and(|r| r.desired_running);
        let mut supervisors = self.supervisors.lock().expect("supervisors lock");
        if let Some(s) = supervisors.get(id)
            && !s.task.is_finished()
        {
            if run && !*s.run.borrow() {
                // Told to stop, now wanted again (it should not happen: the manager never
                // revives an instance): let the stop finish, then start afresh.
                return Ok(Action::RequeueAfter(Duration::from_secs(1)));
            }
            s.run.send_if_modified(|r| std::mem::replace(r, run) != run);
            return Ok(Action::Done);
        }
        if !run
            && row
                .as_ref()
                .is_some_and(|r| mine && r.state == "stopped" && r.runtime_id.is_none())
        {
            // Nothing of it can be left (a container would have been listed by the resync).
            supervisors.remove(id);
            return Ok(Action::Done);
        }
        let (tx, rx) = watch::channel(run);
        let logs = LogRing::default();
        let task = tokio::spawn(supervisor::supervise(
            self.self_arc(),
            *id,
            row.filter(|_| mine),
            rx,
            logs.clone(),
        ));
        supervisors.insert(
            *id,
            Supervisor {
                run: tx,
                task,
                logs,
            },
        );
        Ok(Action::Done)
    }
}

impl Agent {
    /// The agent as an `Arc`, for tasks that outlive a reconcile.
    fn self_arc(&self) -> Arc<Agent> {
        self.me
            .upgrade()
            .expect("the agent lives while its controller runs")
    }
}

async fn write_logs(pool: &PgPool, instance_id: i64, lines: &str) -> anyhow::Result<()> {
    sqlx::query(
        "insert into instance_logs (instance_id, lines) values ($1, $2)
         on conflict (instance_id) do update set lines = excluded.lines",
    )
    .bind(instance_id)
    .bind(lines)
    .execute(pool)
    .await?;
    Ok(())
}

/// Memory and CPUs of this machine, for a node registering without configured capacity.
fn machine_capacity() -> serde_json::Value {
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kib| kib * 1024);
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    serde_json::json!({ "memory": memory, "cpus": cpus as f64 })
}

/// Runs the agent: registration, heartbeats and the instance controller, until shutdown.
/// Instances keep running when the agent stops; the next agent adopts them.
pub async fn run(
    deps: AgentDeps,
    js: async_nats::jetstream::Context,
    metrics: Arc<crate::metrics::Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let durable = format!("agent-{}", deps.node.name);
    let resync = deps.options.resync;
    let heartbeat = deps.options.heartbeat;
    let agent = Agent::register(deps).await?;
    let beats = tokio::spawn({
        let (agent, shutdown) = (agent.clone(), shutdown.clone());
        async move {
            loop {
                if let Err(e) = agent.heartbeat().await {
                    tracing::warn!(error = format!("{e:#}"), "heartbeat failed");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(heartbeat) => {}
                }
            }
        }
    });
    let options = ControllerOptions {
        resync,
        concurrency: 8,
        ..ControllerOptions::new(durable, vec!["instance"])
    };
    let result =
        crate::events::controller::run_controller(agent.clone(), js, options, metrics, shutdown)
            .await;
    beats.abort();
    // Last log lines for the API; the processes themselves run on.
    let _ = agent.heartbeat().await;
    result
}
