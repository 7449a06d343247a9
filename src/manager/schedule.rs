//! Scheduling: which ready node gets a new instance.
//!
//! A node qualifies when it is `ready` and has room for the instance's requested resources
//! (`resources` of the spec against the node's `capacity`, minus what its wanted instances
//! request). Among those, an app's replicas spread across nodes first, then the least
//! loaded node wins. When none qualifies, the answer says why each node was refused.
//!
//! Node rows (state, capacity) are read fresh for every batch of reconciles: they are few.
//! What the wanted instances use per node comes from a cache the leading manager keeps (like
//! kube-scheduler's): rebuilt from the rows when older than [`CACHE_TTL`], and updated at
//! once by each placement it makes. Instances stopped meanwhile are still counted until the
//! next rebuild, so the cache errs towards full nodes, never towards overcommit.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sqlx::{PgConnection, Row};
use tokio::sync::{Mutex, MutexGuard};

use super::Deployment;

/// How long a snapshot of node loads is trusted.
pub const CACHE_TTL: Duration = Duration::from_secs(2);

/// A node as read for one batch, with what its wanted instances use.
pub struct NodeLoad {
    id: i64,
    name: String,
    address: String,
    state: String,
    cap_memory: Option<f64>,
    cap_cpus: Option<f64>,
}

/// What the wanted instances on one node use.
#[derive(Debug, Clone, Default)]
pub struct Usage {
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

/// The node rows, fresh: they are few, and a node that went down must not get instances.
pub async fn load_nodes(tx: &mut PgConnection) -> anyhow::Result<Vec<NodeLoad>> {
    Ok(sqlx::query(
        "select id, name, address, state, (capacity->>'memory')::float8 as cap_memory,
                (capacity->>'cpus')::float8 as cap_cpus
         from nodes order by id",
    )
    .fetch_all(&mut *tx)
    .await?
    .into_iter()
    .map(|r| NodeLoad {
        id: r.get("id"),
        name: r.get("name"),
        address: r.get("address"),
        state: r.get("state"),
        cap_memory: r.get("cap_memory"),
        cap_cpus: r.get("cap_cpus"),
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
    /// Takes the cache for one batch's decisions (rebuilding a stale snapshot from `tx`).
    /// Batches decide one after another; their reads and writes still overlap.
    pub async fn placer<'a>(
        &'a self,
        tx: &mut PgConnection,
        nodes: Vec<NodeLoad>,
    ) -> anyhow::Result<Placer<'a>> {
        let mut guard = self.snapshot.lock().await;
        let fresh = guard
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < CACHE_TTL);
        if !fresh {
            *guard = Some((Instant::now(), load_usage(tx).await?));
        }
        Ok(Placer {
            guard,
            nodes,
            stale: false,
        })
    }
}

/// Places instances for one batch: the node rows of the batch and the shared usage.
pub struct Placer<'a> {
    guard: MutexGuard<'a, Option<(Instant, HashMap<i64, Usage>)>>,
    nodes: Vec<NodeLoad>,
    /// A refusal may come from a stale snapshot: rebuild it for the next batch.
    stale: bool,
}

impl Drop for Placer<'_> {
    fn drop(&mut self) {
        if self.stale {
            *self.guard = None;
        }
    }
}

impl Placer<'_> {
    /// Picks nodes for `n` new instances of `deployment` of app `app_id`, or explains why
    /// it cannot. What it picks counts as used at once.
    pub fn place(
        &mut self,
        app_id: i64,
        deployment: &Deployment,
        n: usize,
    ) -> Result<Vec<(i64, String)>, String> {
        let usage = &mut self.guard.as_mut().expect("loaded by placer()").1;
        let resources = deployment.spec.resources.as_ref();
        let want_memory = resources
            .and_then(|r| r.memory)
            .map(|m| m.0 as f64)
            .unwrap_or(0.0);
        let want_cpus = resources.and_then(|r| r.cpus).unwrap_or(0.0);
        let mut placed = Vec::with_capacity(n);
        let mut refusals: HashMap<String, String> = HashMap::new();
        let empty = Usage::default();
        for _ in 0..n {
            // (of this app, instances, id): spread first, then the least loaded.
            let mut best: Option<((i64, i64, i64), usize)> = None;
            for (i, node) in self.nodes.iter().enumerate() {
                let used = usage.get(&node.id).unwrap_or(&empty);
                let refusal = if node.state != "ready" {
                    Some(format!("{}: {}", node.name, node.state))
                } else if node
                    .cap_memory
                    .is_some_and(|cap| used.memory + want_memory > cap)
                {
                    let cap = node.cap_memory.unwrap_or(0.0);
                    Some(format!(
                        "{}: not enough memory (needs {}, {} of {} free)",
                        node.name,
                        fmt_bytes(want_memory),
                        fmt_bytes((cap - used.memory).max(0.0)),
                        fmt_bytes(cap)
                    ))
                } else if node
                    .cap_cpus
                    .is_some_and(|cap| used.cpus + want_cpus > cap + 1e-9)
                {
                    let cap = node.cap_cpus.unwrap_or(0.0);
                    Some(format!(
                        "{}: not enough cpu (needs {want_cpus}, {:.2} of {cap} free)",
                        node.name,
                        (cap - used.cpus).max(0.0)
                    ))
                } else {
                    None
                };
                if let Some(r) = refusal {
                    refusals.insert(node.name.clone(), r);
                    continue;
                }
                let key = (
                    used.of_app.get(&app_id).copied().unwrap_or(0),
                    used.instances,
                    node.id,
                );
                if best.is_none_or(|(b, _)| key < b) {
                    best = Some((key, i));
                }
            }
            let Some((_, b)) = best else {
                let mut reasons: Vec<String> = refusals.into_values().collect();
                reasons.sort();
                if reasons.is_empty() {
                    reasons.push("no node has registered".into());
                }
                self.stale = true;
                return Err(format!(
                    "no node can take an instance: {}",
                    reasons.join("; ")
                ));
            };
            let node = &self.nodes[b];
            let u = usage.entry(node.id).or_default();
            u.memory += want_memory;
            u.cpus += want_cpus;
            u.instances += 1;
            *u.of_app.entry(app_id).or_insert(0) += 1;
            placed.push((node.id, node.address.clone()));
        }
        Ok(placed)
    }
}
