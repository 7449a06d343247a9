//! Scheduling: which ready node gets a new instance.
//!
//! A node qualifies when it is `ready` and has room for the instance's requested resources
//! (`resources` of the spec against the node's `capacity`, minus what its wanted instances
//! request). Among those, an app's replicas spread across nodes first, then the least
//! loaded node wins. When none qualifies, the answer says why each node was refused.
//!
//! Node rows (state, capacity) are read fresh for every placement: they are few. What the
//! wanted instances use per node comes from a cache the leading manager keeps (like
//! kube-scheduler's): rebuilt from the rows when older than [`CACHE_TTL`], and updated at
//! once by each placement it makes. Instances stopped meanwhile are still counted until the
//! next rebuild, so the cache errs towards full nodes, never towards overcommit.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sqlx::{PgConnection, Row};
use tokio::sync::Mutex;

use super::Deployment;

/// How long a snapshot of node loads is trusted.
pub const CACHE_TTL: Duration = Duration::from_secs(2);

struct NodeLoad {
    id: i64,
    name: String,
    address: String,
    state: String,
    cap_memory: Option<f64>,
    cap_cpus: Option<f64>,
    used_memory: f64,
    used_cpus: f64,
    instances: i64,
    /// Wanted instances of the app being placed on this node.
    of_app: i64,
}

/// What the wanted instances on one node use.
#[derive(Debug, Clone, Default)]
struct Usage {
    memory: f64,
    cpus: f64,
    instances: i64,
    of_app: HashMap<i64, i64>,
}

/// The node usage of the leading manager.
#[derive(Default)]
pub struct NodeCache {
    snapshot: Mutex<Option<(Instant, HashMap<i64, Usage>)>>,
}

fn fmt_bytes(b: f64) -> String {
    format!("{:.0}Mi", b / (1024.0 * 1024.0))
}

async fn load_nodes(
    tx: &mut PgConnection,
    usage: &HashMap<i64, Usage>,
    app_id: i64,
) -> anyhow::Result<Vec<NodeLoad>> {
    Ok(sqlx::query(
        "select id, name, address, state, (capacity->>'memory')::float8 as cap_memory,
                (capacity->>'cpus')::float8 as cap_cpus
         from nodes order by id",
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|r| {
        let id: i64 = r.get("id");
        let u = usage.get(&id);
        NodeLoad {
            id,
            name: r.get("name"),
            address: r.get("address"),
            state: r.get("state"),
            cap_memory: r.get("cap_memory"),
            cap_cpus: r.get("cap_cpus"),
            used_memory: u.map_or(0.0, |u| u.memory),
            used_cpus: u.map_or(0.0, |u| u.cpus),
            instances: u.map_or(0, |u| u.instances),
            of_app: u.and_then(|u| u.of_app.get(&app_id).copied()).unwrap_or(0),
        }
    })
    .collect())
}

async fn load_usage(tx: &mut PgConnection) -> anyhow::Result<HashMap<i64, Usage>> {
    let rows = sqlx::query(
        "select i.node_id, i.app_id, count(*) as n,
                coalesce(sum((d.spec->'resources'->>'memory')::float8), 0) as memory,
                coalesce(sum((d.spec->'resources'->>'cpus')::float8), 0) as cpus
         from instances i join deployments d on d.id = i.deployment_id
         where i.desired_state = 'running' and i.node_id is not null
         group by i.node_id, i.app_id",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut usage: HashMap<i64, Usage> = HashMap::new();
    for r in rows {
        let u = usage.entry(r.get("node_id")).or_default();
        let n: i64 = r.get("n");
        u.instances += n;
        u.memory += r.get::<f64, _>("memory");
        u.cpus += r.get::<f64, _>("cpus");
        u.of_app.insert(r.get("app_id"), n);
    }
    Ok(usage)
}

impl NodeCache {
    /// Picks nodes for `n` new instances of `deployment`, or explains why it cannot.
    pub async fn place(
        &self,
        tx: &mut PgConnection,
        app_id: i64,
        deployment: &Deployment,
        n: usize,
    ) -> anyhow::Result<Result<Vec<(i64, String)>, String>> {
        let mut guard = self.snapshot.lock().await;
        let fresh = guard
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < CACHE_TTL);
        if !fresh {
            *guard = Some((Instant::now(), load_usage(tx).await?));
        }
        let usage = &mut guard.as_mut().expect("loaded").1;
        let mut nodes = load_nodes(tx, usage, app_id).await?;
        let resources = deployment.spec.resources.as_ref();
        let want_memory = resources
            .and_then(|r| r.memory)
            .map(|m| m.0 as f64)
            .unwrap_or(0.0);
        let want_cpus = resources.and_then(|r| r.cpus).unwrap_or(0.0);
        let mut placed = Vec::with_capacity(n);
        let mut refusals: HashMap<String, String> = HashMap::new();
        for _ in 0..n {
            let mut best: Option<usize> = None;
            for (i, node) in nodes.iter().enumerate() {
                let refusal = if node.state != "ready" {
                    Some(format!("{}: {}", node.name, node.state))
                } else if node
                    .cap_memory
                    .is_some_and(|cap| node.used_memory + want_memory > cap)
                {
                    let cap = node.cap_memory.unwrap_or(0.0);
                    Some(format!(
                        "{}: not enough memory (needs {}, {} of {} free)",
                        node.name,
                        fmt_bytes(want_memory),
                        fmt_bytes((cap - node.used_memory).max(0.0)),
                        fmt_bytes(cap)
                    ))
                } else if node
                    .cap_cpus
                    .is_some_and(|cap| node.used_cpus + want_cpus > cap + 1e-9)
                {
                    let cap = node.cap_cpus.unwrap_or(0.0);
                    Some(format!(
                        "{}: not enough cpu (needs {want_cpus}, {:.2} of {cap} free)",
                        node.name,
                        (cap - node.used_cpus).max(0.0)
                    ))
                } else {
                    None
                };
                if let Some(r) = refusal {
                    refusals.insert(node.name.clone(), r);
                    continue;
                }
                let key = |x: &NodeLoad| (x.of_app, x.instances, x.id);
                if best.is_none_or(|b| key(node) < key(&nodes[b])) {
                    best = Some(i);
                }
            }
            let Some(b) = best else {
                let mut reasons: Vec<String> = refusals.into_values().collect();
                reasons.sort();
                if reasons.is_empty() {
                    reasons.push("no node has registered".into());
                }
                // A refusal may come from a stale snapshot: rebuild it next time.
                *guard = None;
                return Ok(Err(format!(
                    "no node can take an instance: {}",
                    reasons.join("; ")
                )));
            };
            let node = &mut nodes[b];
            node.used_memory += want_memory;
            node.used_cpus += want_cpus;
            node.instances += 1;
            node.of_app += 1;
            let u = usage.entry(node.id).or_default();
            u.memory += want_memory;
            u.cpus += want_cpus;
            u.instances += 1;
            *u.of_app.entry(app_id).or_insert(0) += 1;
            placed.push((node.id, node.address.clone()));
        }
        Ok(Ok(placed))
    }
}
