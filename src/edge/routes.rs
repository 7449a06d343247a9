//! The edge's route table: hostname -> the healthy endpoints of its app, in memory.
//!
//! Requests read it without locks (an `ArcSwap` of an immutable map of `ArcSwap` slots);
//! an update stores an app's new routes into its slots, or, when hostnames come or go, swaps
//! in a new map, so a request never waits on Postgres or on an update. Endpoints are shared
//! across table versions (by instance id), so their outstanding-request counts and ejections
//! survive updates, and a request in flight keeps its endpoint alive after it leaves the table
//! (that is the drain).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use sqlx::{PgPool, Row};

use crate::metrics::{Counter, Metrics};

/// One healthy instance the edge can send requests to.
#[derive(Debug)]
pub struct Endpoint {
    pub instance_id: i64,
    pub addr: SocketAddr,
    /// Until when (ms since the table's epoch) it is skipped after a connect error.
    ejected_until: AtomicU64,
    /// Idle keep-alive connections to it, and the requests in flight, per worker thread.
    pub pool: super::upstream::Pool,
}

/// The routes of one hostname.
#[derive(Debug)]
pub struct Route {
    pub app_id: i64,
    pub app: String,
    pub endpoints: Vec<Arc<Endpoint>>,
    /// The app's counters, looked up on the route's first request (not per request).
    pub metrics: std::sync::OnceLock<Arc<AppMetrics>>,
}

/// Per-app edge metrics.
#[derive(Debug)]
pub struct AppMetrics {
    pub requests: Arc<Counter>,
    pub upstream_errors: Arc<Counter>,
}

/// One hostname's current route, swapped in place when only its endpoints change.
type Slot = Arc<ArcSwap<Route>>;

/// All routes: hostname -> slot. The map is replaced only when hostnames come or go; an
/// app's new endpoints are stored into its slots, so an update costs O(the app's hosts),
/// not O(all routes).
pub struct RouteTable {
    routes: ArcSwap<HashMap<String, Slot>>,
    /// Every endpoint by instance id, reused when a route is rebuilt.
    endpoints: std::sync::Mutex<HashMap<i64, Arc<Endpoint>>>,
    /// The writers' index (and their lock: readers never take it).
    write: std::sync::Mutex<Written>,
    epoch: Instant,
    /// How long an endpoint is skipped after a connect error.
    pub ejection: Duration,
    metrics: Arc<Metrics>,
    /// Per-app counters by app name, registered once.
    app_metrics: std::sync::Mutex<HashMap<String, Arc<AppMetrics>>>,
}

/// What the table holds per app, for updates without scanning every route.
#[derive(Default)]
struct Written {
    hosts: HashMap<i64, Vec<String>>,
    instances: HashMap<i64, Vec<i64>>,
}

impl RouteTable {
    pub fn new(metrics: Arc<Metrics>) -> RouteTable {
        RouteTable {
            routes: ArcSwap::from_pointee(HashMap::new()),
            endpoints: Default::default(),
            write: Default::default(),
            epoch: Instant::now(),
            ejection: Duration::from_secs(2),
            metrics,
            app_metrics: Default::default(),
        }
    }

    /// The counters of a route's app.
    pub fn metrics_of<'r>(&self, route: &'r Route) -> &'r AppMetrics {
        route.metrics.get_or_init(|| {
            let mut cache = self.app_metrics.lock().expect("app metrics lock");
            cache
                .entry(route.app.clone())
                .or_insert_with(|| {
                    let labels = [("app", route.app.as_str())];
                    Arc::new(AppMetrics {
                        requests: self.metrics.counter(
                            "berth_edge_requests_total",
                            "Requests the edge routed to an app.",
                            &labels,
                        ),
                        upstream_errors: self.metrics.counter(
                            "berth_edge_upstream_errors_total",
                            "Requests to an app's instances that failed (connect, reset, timeout).",
                            &labels,
                        ),
                    })
                })
                .clone()
        })
    }
}

/// A row of the route query.
struct RouteRow {
    hostname: String,
    app_id: i64,
    app: String,
    instance: Option<(i64, SocketAddr)>,
}

/// The route query: every domain with its app's healthy instances, of any active deployment
/// (the current one and, during a rollout, the new one), followed by `$where`.
macro_rules! routes_sql {
    ($where:literal) => {
        concat!(
            "select d.hostname, a.id as app_id, a.name as app, i.id as instance_id, i.host, i.port
             from domains d
             join apps a on a.id = d.app_id and a.deleted_at is null
             left join (
                 select i.id, i.app_id, i.host, i.port from instances i
                 join deployments dep on dep.id = i.deployment_id and dep.status = 'active'
                 where i.state = 'running' and i.desired_state = 'running'
                   and i.port is not null and i.host is not null
             ) i on i.app_id = a.id ",
            $where
        )
    };
}

/// Every app's routes.
const ROUTES_SQL: &str = routes_sql!("");

/// One app's routes. A statement of its own: a shared `$1 is null or a.id = $1` makes
/// Postgres's generic plan scan every app (5 ms instead of 0.1 ms with 10,000 apps). (A
/// plain join rather than a lateral one, for the same reason: right after a bulk insert,
/// before statistics, a lateral subquery per domain took 8.6 s for 10,000 routes.)
const APP_ROUTES_SQL: &str = routes_sql!("where a.id = $1");

impl RouteTable {
    /// The route of a request's host (already normalized).
    pub fn get(&self, host: &str) -> Option<Arc<Route>> {
        self.routes.load().get(host).map(|slot| slot.load_full())
    }

    pub fn len(&self) -> usize {
        self.routes.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Replaces the whole table from Postgres (at start and after the event feed reconnects).
    pub async fn load_all(&self, pool: &PgPool) -> anyhow::Result<usize> {
        let rows = query(pool, None).await?;
        let mut written = self.write.lock().expect("route writer lock");
        let fresh = self.build(rows);
        *written = Written::default();
        for (host, route) in &fresh {
            written
                .hosts
                .entry(route.app_id)
                .or_default()
                .push(host.clone());
            written
                .instances
                .entry(route.app_id)
                .or_default()
                .extend(route.endpoints.iter().map(|e| e.instance_id));
        }
        let n = fresh.len();
        let slots = fresh
            .into_iter()
            .map(|(h, r)| (h, Arc::new(ArcSwap::new(r))))
            .collect();
        self.routes.store(Arc::new(slots));
        let used: std::collections::HashSet<i64> =
            written.instances.values().flatten().copied().collect();
        self.endpoints
            .lock()
            .expect("endpoints lock")
            .retain(|id, _| used.contains(id));
        Ok(n)
    }

    /// Rebuilds one app's routes (its hostnames may have changed too).
    pub async fn load_app(&self, pool: &PgPool, app_id: i64) -> anyhow::Result<()> {
        let rows = query(pool, Some(app_id)).await?;
        let mut written = self.write.lock().expect("route writer lock");
        let fresh = self.build(rows);
        let old_hosts = written.hosts.remove(&app_id).unwrap_or_default();
        let current = self.routes.load();
        let same_hosts = old_hosts.len() == fresh.len()
            && old_hosts.iter().all(|h| {
                fresh.contains_key(h)
                    && current
                        .get(h)
                        .is_some_and(|slot| slot.load().app_id == app_id)
            });
        let mut new_hosts = Vec::with_capacity(fresh.len());
        let mut new_instances = Vec::new();
        if same_hosts {
            for (host, route) in fresh {
                new_instances.extend(route.endpoints.iter().map(|e| e.instance_id));
                current[&host].store(route);
                new_hosts.push(host);
            }
        } else {
            // Hostnames came or went: a new map (rare: a domain change).
            let mut next: HashMap<String, Slot> = (**current).clone();
            for h in &old_hosts {
                if next.get(h).is_some_and(|slot| slot.load().app_id == app_id) {
                    next.remove(h);
                }
            }
            for (host, route) in fresh {
                new_instances.extend(route.endpoints.iter().map(|e| e.instance_id));
                next.insert(host.clone(), Arc::new(ArcSwap::new(route)));
                new_hosts.push(host);
            }
            self.routes.store(Arc::new(next));
        }
        // Endpoints of this app that left its routes (requests in flight still hold theirs).
        let old_instances = written.instances.remove(&app_id).unwrap_or_default();
        if !old_instances.is_empty() {
            let mut endpoints = self.endpoints.lock().expect("endpoints lock");
            for id in old_instances
                .iter()
                .filter(|id| !new_instances.contains(id))
            {
                endpoints.remove(id);
            }
        }
        if !new_hosts.is_empty() {
            written.hosts.insert(app_id, new_hosts);
            written.instances.insert(app_id, new_instances);
        }
        Ok(())
    }

    fn build(&self, rows: Vec<RouteRow>) -> HashMap<String, Arc<Route>> {
        let mut endpoints = self.endpoints.lock().expect("endpoints lock");
        let mut grouped: HashMap<String, Route> = HashMap::new();
        for row in rows {
            let route = grouped.entry(row.hostname).or_insert_with(|| Route {
                app_id: row.app_id,
                app: row.app.clone(),
                endpoints: Vec::new(),
                metrics: Default::default(),
            });
            if let Some((instance_id, addr)) = row.instance {
                let endpoint = endpoints
                    .entry(instance_id)
                    .and_modify(|e| {
                        if e.addr != addr {
                            *e = Arc::new(Endpoint::new(instance_id, addr));
                        }
                    })
                    .or_insert_with(|| Arc::new(Endpoint::new(instance_id, addr)))
                    .clone();
                route.endpoints.push(endpoint);
            }
        }
        grouped
            .into_iter()
            .map(|(h, mut r)| {
                r.endpoints.sort_by_key(|e| e.instance_id);
                (h, Arc::new(r))
            })
            .collect()
    }

    /// Every endpoint in the table now.
    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        let endpoints = self.endpoints.lock().expect("endpoints lock");
        endpoints.values().cloned().collect()
    }

    /// Least outstanding requests among two endpoints picked at random, skipping ejected
    /// ones (all ejected: pick among all rather than fail).
    pub fn pick(&self, route: &Route, exclude: Option<i64>) -> Option<Arc<Endpoint>> {
        // No allocation on this path: it runs for every request.
        let now = self.now_ms();
        let usable = |e: &&Arc<Endpoint>, skip_ejected: bool| {
            Some(e.instance_id) != exclude
                && (!skip_ejected || e.ejected_until.load(Ordering::Relaxed) <= now)
        };
        let healthy = route.endpoints.iter().filter(|e| usable(e, true)).count();
        let skip_ejected = healthy > 0;
        let n = if skip_ejected {
            healthy
        } else {
            route.endpoints.iter().filter(|e| usable(e, false)).count()
        };
        let nth = |k: usize| {
            route
                .endpoints
                .iter()
                .filter(|e| usable(e, skip_ejected))
                .nth(k)
        };
        match n {
            0 => None,
            1 => nth(0).cloned(),
            n => {
                let a = fastrand(n);
                let mut b = fastrand(n - 1);
                if b >= a {
                    b += 1;
                }
                let (ea, eb) = (nth(a)?, nth(b)?);
                let slot = ea.pool.my_slot();
                Some(
                    if eb.pool.outstanding(slot).load(Ordering::Relaxed)
                        < ea.pool.outstanding(slot).load(Ordering::Relaxed)
                    {
                        eb.clone()
                    } else {
                        ea.clone()
                    },
                )
            }
        }
    }

    /// Skips `endpoint` for a while after a connect error (passive health checking).
    pub fn eject(&self, endpoint: &Endpoint) {
        let until = self.now_ms() + self.ejection.as_millis() as u64;
        endpoint.ejected_until.store(until, Ordering::Relaxed);
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }
}

impl Endpoint {
    fn new(instance_id: i64, addr: SocketAddr) -> Endpoint {
        Endpoint {
            instance_id,
            addr,
            ejected_until: AtomicU64::new(0),
            pool: Default::default(),
        }
    }
}

async fn query(pool: &PgPool, app_id: Option<i64>) -> anyhow::Result<Vec<RouteRow>> {
    let rows = match app_id {
        None => sqlx::query(ROUTES_SQL).fetch_all(pool).await?,
        Some(id) => sqlx::query(APP_ROUTES_SQL).bind(id).fetch_all(pool).await?,
    };
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let instance_id: Option<i64> = r.get("instance_id");
        let host: Option<String> = r.get("host");
        let port: Option<i32> = r.get("port");
        let instance = match (instance_id, host, port) {
            (Some(id), Some(host), Some(port)) => {
                resolve(&host, port as u16).await.map(|a| (id, a))
            }
            _ => None,
        };
        out.push(RouteRow {
            hostname: r.get("hostname"),
            app_id: r.get("app_id"),
            app: r.get("app"),
            instance,
        });
    }
    Ok(out)
}

/// A node address is an IP (resolved for free) or a hostname (resolved once per load).
async fn resolve(host: &str, port: u16) -> Option<SocketAddr> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Some(SocketAddr::new(ip, port));
    }
    tokio::net::lookup_host((host, port)).await.ok()?.next()
}

/// The route key of a Host header or URI authority: lowercase, without port or trailing dot.
pub fn normalize_host(host: &str) -> std::borrow::Cow<'_, str> {
    let host = host.trim();
    let without_port = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        rest.split(']').next().unwrap_or(rest)
    } else {
        match host.rsplit_once(':') {
            Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
            _ => host,
        }
    };
    let host = without_port.trim_end_matches('.');
    // Hosts come lowercase nearly always: no copy then.
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

/// A cheap random index in [0, n) (not for anything secret): a per-thread xorshift.
fn fastrand(n: usize) -> usize {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos() as u64;
            t | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x % n as u64) as usize
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_normalized() {
        assert_eq!(normalize_host("Hello.Example.COM"), "hello.example.com");
        assert_eq!(
            normalize_host("hello.example.com:8080"),
            "hello.example.com"
        );
        assert_eq!(normalize_host("hello.example.com."), "hello.example.com");
        assert_eq!(
            normalize_host("hello.example.com.:443"),
            "hello.example.com"
        );
        assert_eq!(normalize_host("[::1]:8080"), "::1");
    }

    #[test]
    fn the_less_loaded_of_two_is_picked_and_ejected_ones_are_skipped() {
        let table = RouteTable::new(Metrics::new());
        let a = Arc::new(Endpoint::new(1, "127.0.0.1:1".parse().unwrap()));
        let b = Arc::new(Endpoint::new(2, "127.0.0.1:2".parse().unwrap()));
        a.pool
            .outstanding(a.pool.my_slot())
            .store(5, Ordering::Relaxed);
        let route = Route {
            app_id: 1,
            app: "web".into(),
            endpoints: vec![a.clone(), b.clone()],
            metrics: Default::default(),
        };
        for _ in 0..20 {
            assert_eq!(table.pick(&route, None).unwrap().instance_id, 2);
        }
        table.eject(&b);
        assert_eq!(table.pick(&route, None).unwrap().instance_id, 1);
        assert_eq!(
            table.pick(&route, Some(1)).unwrap().instance_id,
            2,
            "all others ejected: still tried"
        );
    }
}
