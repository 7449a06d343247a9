//! Scheduling: which ready node gets a new instance.
//!
//! A node qualifies when it is `ready` and has room for the instance's requested resources
//! (`resources` of the spec against the node's `capacity`, minus what its wanted instances
//! request). Among those, an app's replicas spread across nodes first, then the least
//! loaded node wins. When none qualifies, the answer says why each node was refused.

use std::collections::HashMap;

use sqlx::{PgConnection, Row};

use super::Deployment;

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
    of_app: i64,
}

fn fmt_bytes(b: f64) -> String {
    format!("{:.0}Mi", b / (1024.0 * 1024.0))
}

/// Picks nodes for `n` new instances of `deployment`, or explains why it cannot.
pub async fn place(
    tx: &mut PgConnection,
    app_id: i64,
    deployment: &Deployment,
    n: usize,
) -> anyhow::Result<Result<Vec<(i64, String)>, String>> {
    let rows = sqlx::query(
        "select n.id, n.name, n.address, n.state,
                (n.capacity->>'memory')::float8 as cap_memory, (n.capacity->>'cpus')::float8 as cap_cpus,
                coalesce(sum((d.spec->'resources'->>'memory')::float8), 0) as used_memory,
                coalesce(sum((d.spec->'resources'->>'cpus')::float8), 0) as used_cpus,
                count(i.id) as instances,
                count(i.id) filter (where i.app_id = $1) as of_app
         from nodes n
         left join instances i on i.node_id = n.id and i.desired_state = 'running'
         left join deployments d on d.id = i.deployment_id
         group by n.id order by n.id",
    )
    .bind(app_id)
    .fetch_all(&mut *tx)
    .await?;
    let mut nodes: Vec<NodeLoad> = rows
        .into_iter()
        .map(|r| NodeLoad {
            id: r.get("id"),
            name: r.get("name"),
            address: r.get("address"),
            state: r.get("state"),
            cap_memory: r.get("cap_memory"),
            cap_cpus: r.get("cap_cpus"),
            used_memory: r.get("used_memory"),
            used_cpus: r.get("used_cpus"),
            instances: r.get("instances"),
            of_app: r.get("of_app"),
        })
        .collect();
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
                Some(format!(
                    "{}: not enough memory (needs {}, {} of {} free)",
                    node.name,
                    fmt_bytes(want_memory),
                    fmt_bytes((node.cap_memory.unwrap_or(0.0) - node.used_memory).max(0.0)),
                    fmt_bytes(node.cap_memory.unwrap_or(0.0))
                ))
            } else if node
                .cap_cpus
                .is_some_and(|cap| node.used_cpus + want_cpus > cap + 1e-9)
            {
                Some(format!(
                    "{}: not enough cpu (needs {want_cpus}, {:.2} of {} free)",
                    node.name,
                    (node.cap_cpus.unwrap_or(0.0) - node.used_cpus).max(0.0),
                    node.cap_cpus.unwrap_or(0.0)
                ))
            } else {
                None
            };
            if let Some(r) = refusal {
                refusals.insert(node.name.clone(), r);
                continue;
            }
            let better = match best {
                None => true,
                Some(b) => {
                    let (x, y) = (&nodes[b], node);
                    (y.of_app, y.instances, y.id) < (x.of_app, x.instances, x.id)
                }
            };
            if better {
                best = Some(i);
            }
        }
        let Some(b) = best else {
            let mut reasons: Vec<String> = refusals.into_values().collect();
            reasons.sort();
            if reasons.is_empty() {
                reasons.push("no node has registered".into());
            }
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
        placed.push((node.id, node.address.clone()));
    }
    Ok(Ok(placed))
}
