//! The whole flow of DESIGN §1 in one `berth up` process on the real services: a spec
//! (dropped in a folder, or committed to Git) becomes a built image, a container on the
//! node, a route on the edge and a 200; edits roll out under load without a failed
//! request; a `berth up` killed mid-rollout converges when it comes back.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::fixtures::{
    ChildGuard, TestDb, TestDocker, TestNats, berth_bin, busybox_httpd_context, docker_remove,
    eventually, unique,
};

/// One `berth up` with every component on the test's database, NATS and Docker prefix.
struct Installation {
    db: TestDb,
    nats: TestNats,
    docker: TestDocker,
    data: tempfile::TempDir,
    edge: u16,
    api: u16,
    node: String,
    /// The app's name (unique: image tags `berth/<app>:<deployment>` are engine-wide).
    app: String,
}

impl Installation {
    async fn new() -> Installation {
        let free = || berth::daemon::embedded::free_port().unwrap();
        Installation {
            db: TestDb::new().await,
            nats: TestNats::start().await,
            docker: TestDocker::new().await,
            data: tempfile::tempdir().unwrap(),
            edge: free(),
            api: free(),
            node: unique("n").replace('_', "-"),
            app: unique("e").replace('_', "-"),
        }
    }

    fn up(&self, source: &[(&str, String)]) -> ChildGuard {
        let mut command = Command::new(berth_bin());
        command
            .arg("up")
            .env("BERTH_DATABASE_URL", &self.db.url)
            .env("BERTH_NATS_URL", self.nats.url())
            .env("BERTH_EDGE_LISTEN", format!("127.0.0.1:{}", self.edge))
            .env("BERTH_API_LISTEN", format!("127.0.0.1:{}", self.api))
            .env("BERTH_NODE_NAME", &self.node)
            .env("BERTH_CONTAINER_PREFIX", format!("{}-", self.docker.prefix))
            .env("BERTH_DATA_DIR", self.data.path())
            .env("BERTH_WATCH_DEBOUNCE", "20ms")
            .env("BERTH_LOG", "berth=info,berth::access=warn")
            .stdout(Stdio::null());
        for (k, v) in source {
            command.env(k, v);
        }
        ChildGuard(Some(command.spawn().unwrap()))
    }

    /// `berth up --components agent` for another node, as a process of its own.
    fn second_agent(&self, node: &str, data: &Path) -> ChildGuard {
        ChildGuard(Some(
            Command::new(berth_bin())
                .args(["up", "--components", "agent"])
                .env("BERTH_DATABASE_URL", &self.db.url)
                .env("BERTH_NATS_URL", self.nats.url())
                .env("BERTH_NODE_NAME", node)
                .env("BERTH_NODE_LABELS", "zone=b")
                .env("BERTH_CONTAINER_PREFIX", format!("{}-", self.docker.prefix))
                .env("BERTH_DATA_DIR", data)
                .env("BERTH_API_LISTEN", "127.0.0.1:0")
                .env("BERTH_LOG", "berth=warn")
                .stdout(Stdio::null())
                .spawn()
                .unwrap(),
        ))
    }

    async fn wait_ready_nodes(&self, n: i64) {
        eventually(
            &format!("{n} nodes ready"),
            Duration::from_secs(30),
            || async {
                let ready: i64 =
                    sqlx::query_scalar("select count(*) from nodes where state = 'ready'")
                        .fetch_one(&self.db.pool)
                        .await
                        .unwrap();
                ready == n
            },
        )
        .await;
    }

    /// Running, wanted instances per node name.
    async fn running_per_node(&self) -> Vec<(String, i64)> {
        sqlx::query_as(
            "select n.name, count(*) from instances i join nodes n on n.id = i.node_id
             where i.state = 'running' and i.desired_state = 'running' group by n.name order by n.name",
        )
        .fetch_all(&self.db.pool)
        .await
        .unwrap()
    }

    fn host(&self) -> String {
        format!("{}.localhost", self.app)
    }

    /// A spec for a busybox httpd app built from `context` (relative to the spec).
    fn spec(&self, replicas: u32, version: &str) -> String {
        format!(
            "apiVersion: berth/v1\nkind: App\nname: {app}\nbuild: {{context: ctx}}\nreplicas: {replicas}\n\
             env: {{VERSION: \"{version}\"}}\ndomains: [{host}]\n\
             health: {{path: /healthz, interval: 200ms}}\n\
             deploy: {{max_surge: 1, max_unavailable: 0, drain_timeout: 2s}}\n",
            app = self.app,
            host = self.host()
        )
    }

    async fn get(&self) -> Option<(u16, String)> {
        get(self.edge, &self.host()).await
    }

    async fn wait_for_page(&self, page: &str, timeout: Duration) {
        eventually(&format!("the edge serves {page:?}"), timeout, || async {
            self.get().await.is_some_and(|(s, b)| s == 200 && b == page)
        })
        .await;
    }

    /// Containers of this installation (running or not).
    fn containers(&self) -> Vec<String> {
        let out = Command::new("docker")
            .args(["ps", "-a", "--format", "{{.Names}} {{.Status}}", "--filter"])
            .arg(format!("label=berth.node={}", self.node))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Installation {
    fn drop(&mut self) {
        // Containers first (they hold the images), then the images.
        let prefix = format!("name=^/{}", self.docker.prefix);
        docker_remove(&["ps", "-aq", "--filter", &prefix], &["rm", "-f"]);
        let images = format!("berth/{}", self.app);
        docker_remove(&["images", "-q", &images], &["rmi", "-f"]);
    }
}

async fn get(port: u16, host: &str) -> Option<(u16, String)> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake::<_, http_body_util::Empty<Bytes>>(TokioIo::new(
            stream,
        ))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/")
        .header("host", host)
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Writes the app's context (page `page`) and spec into `dir`.
fn write_app(dir: &Path, spec: &str, page: &str) {
    let ctx = dir.join("ctx");
    std::fs::create_dir_all(&ctx).unwrap();
    busybox_httpd_context(&ctx, page);
    // Atomically, as an editor or a deploy tool would.
    std::fs::write(dir.join(".app.yaml.tmp"), spec).unwrap();
    std::fs::rename(dir.join(".app.yaml.tmp"), dir.join("app.yaml")).unwrap();
}

/// Requests through the edge on keep-alive connections until stopped, counting successes
/// in `ok` as they happen: (ok, failed).
fn load(
    port: u16,
    host: String,
    stop: CancellationToken,
    ok: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    tokio::spawn(async move {
        let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut clients = Vec::new();
        for _ in 0..3 {
            let (host, stop, ok, failures) =
                (host.clone(), stop.clone(), ok.clone(), failures.clone());
            clients.push(tokio::spawn(async move {
                while !stop.is_cancelled() {
                    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
                        .await
                        .unwrap();
                    let (mut sender, conn) = hyper::client::conn::http1::handshake::<
                        _,
                        http_body_util::Empty<Bytes>,
                    >(TokioIo::new(stream))
                    .await
                    .unwrap();
                    tokio::spawn(conn);
                    for _ in 0..200 {
                        if stop.is_cancelled() {
                            break;
                        }
                        let req = hyper::Request::get("/")
                            .header("host", &host)
                            .body(http_body_util::Empty::new())
                            .unwrap();
                        match sender.send_request(req).await {
                            Ok(r) if r.status() == 200 => {
                                let _ = r.into_body().collect().await;
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            other => {
                                failures
                                    .lock()
                                    .unwrap()
                                    .push(format!("{:?}", other.map(|r| r.status())));
                                break;
                            }
                        }
                    }
                }
            }));
        }
        for c in clients {
            c.await.unwrap();
        }
        let failures = failures.lock().unwrap().clone();
        (ok.load(Ordering::Relaxed), failures)
    })
}

#[tokio::test]
async fn a_dropped_spec_is_served_through_the_edge_and_an_edit_rolls_out_under_load_without_a_failed_request()
 {
    let it = Installation::new().await;
    let specs = tempfile::tempdir().unwrap();
    let _up = it.up(&[("BERTH_SPECS", specs.path().display().to_string())]);

    let dropped = Instant::now();
    write_app(specs.path(), &it.spec(2, "1"), "version 1\n");
    it.wait_for_page("version 1\n", Duration::from_secs(120))
        .await;
    println!(
        "spec dropped -> first routed 200 (cold build): {:?}",
        dropped.elapsed()
    );

    // The new deployment's instances are routed as they become healthy; the cutover
    // follows once all of them are.
    eventually("the app is ready", Duration::from_secs(60), || async {
        let ready: Option<bool> =
            sqlx::query_scalar("select (status->>'ready')::bool from apps where name = $1")
                .bind(&it.app)
                .fetch_one(&it.db.pool)
                .await
                .unwrap();
        ready == Some(true)
    })
    .await;
    // The flow's rows.
    let (status, current, observed): (serde_json::Value, Option<i64>, i64) = sqlx::query_as(
        "select status, current_deployment_id, observed_generation from apps where name = $1",
    )
    .bind(&it.app)
    .fetch_one(&it.db.pool)
    .await
    .unwrap();
    assert!(current.is_some() && observed == 1, "{status}");
    let kinds: Vec<String> = sqlx::query_scalar(
        "select distinct on (table_name) table_name || '.' || op from events where op = 'created' order by table_name, id",
    )
    .fetch_all(&it.db.pool)
    .await
    .unwrap();
    for k in [
        "app.created",
        "deployment.created",
        "image_build.created",
        "instance.created",
        "deployment_instance.created",
        "domain.created",
    ] {
        assert!(kinds.contains(&k.to_string()), "{k} in {kinds:?}");
    }

    // An edit under continuous load: a new build, a rolling update, zero failures.
    let stop = CancellationToken::new();
    let served = Arc::new(AtomicUsize::new(0));
    let traffic = load(it.edge, it.host(), stop.clone(), served.clone());
    eventually(
        "traffic flows before the edit",
        Duration::from_secs(10),
        || async { served.load(Ordering::Relaxed) >= 20 },
    )
    .await;
    write_app(specs.path(), &it.spec(2, "2"), "version 2\n");
    it.wait_for_page("version 2\n", Duration::from_secs(120))
        .await;
    eventually("the old deployment is superseded and its instances gone", Duration::from_secs(60), || async {
        let (superseded, old_live): (i64, i64) = sqlx::query_as(
            "select count(distinct d.id), count(i.id) filter (where i.state <> 'stopped')
             from deployments d join instances i on i.deployment_id = d.id where d.status = 'superseded'",
        )
        .fetch_one(&it.db.pool)
        .await
        .unwrap();
        superseded == 1 && old_live == 0
    })
    .await;
    stop.cancel();
    let (ok, failures) = traffic.await.unwrap();
    println!("edit under load: {ok} requests, {} failed", failures.len());
    assert!(ok > 50, "the load ran ({ok})");
    assert!(failures.is_empty(), "failed requests: {failures:?}");
    let containers = it.containers();
    assert_eq!(
        containers.len(),
        2,
        "two replicas, old ones removed: {containers:?}"
    );

    // `berth status` sees it ready, through the API.
    let out = Command::new(berth_bin())
        .args([
            "status",
            "--api-url",
            &format!("http://127.0.0.1:{}", it.api),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let line = text
        .lines()
        .find(|l| l.starts_with(&it.app))
        .unwrap_or_default();
    assert!(
        line.contains("yes") && line.contains("Ready") && line.contains("2/2"),
        "{text}"
    );
}

#[tokio::test]
async fn a_git_commit_is_served_through_the_edge() {
    let it = Installation::new().await;
    let repo = tempfile::tempdir().unwrap();
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args(args)
            .current_dir(repo.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    git(&["init", "-q", "-b", "main"]);
    git(&["config", "user.email", "t@example.com"]);
    git(&["config", "user.name", "t"]);
    write_app(repo.path(), &it.spec(1, "1"), "from git\n");
    git(&["add", "-A"]);
    git(&["commit", "-qm", "first"]);
    let _up = it.up(&[
        ("BERTH_GIT_URL", format!("file://{}", repo.path().display())),
        ("BERTH_GIT_INTERVAL", "1s".into()),
    ]);
    it.wait_for_page("from git\n", Duration::from_secs(120))
        .await;

    write_app(repo.path(), &it.spec(1, "2"), "second commit\n");
    git(&["commit", "-qam", "second"]);
    it.wait_for_page("second commit\n", Duration::from_secs(120))
        .await;
    // A commit of code alone, the spec as it was: a new image is built and served.
    write_app(repo.path(), &it.spec(1, "2"), "code only\n");
    git(&["commit", "-qam", "code only"]);
    it.wait_for_page("code only\n", Duration::from_secs(120))
        .await;
    let revision: String = sqlx::query_scalar("select source_revision from apps where name = $1")
        .bind(&it.app)
        .fetch_one(&it.db.pool)
        .await
        .unwrap();
    let head = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(repo.path())
        .output()
        .unwrap();
    assert_eq!(revision, String::from_utf8_lossy(&head.stdout).trim());
}

#[tokio::test]
async fn berth_up_killed_mid_rollout_converges_when_it_comes_back_without_duplicate_containers() {
    let it = Installation::new().await;
    let specs = tempfile::tempdir().unwrap();
    let source = [("BERTH_SPECS", specs.path().display().to_string())];
    let mut up = it.up(&source);
    write_app(specs.path(), &it.spec(2, "1"), "before\n");
    it.wait_for_page("before\n", Duration::from_secs(120)).await;

    // A new version; kill -9 as soon as its first new instance exists. The new version is
    // the newest deployment: the page (in the build context) and the spec are written one
    // after the other, and a rescan between them makes a deployment of its own.
    write_app(specs.path(), &it.spec(2, "2"), "after\n");
    eventually(
        "the rollout has started",
        Duration::from_secs(60),
        || async {
            let n: i64 = sqlx::query_scalar(
                "select count(*) from instances i join deployments d on d.id = i.deployment_id
             where d.generation >= 2",
            )
            .fetch_one(&it.db.pool)
            .await
            .unwrap();
            n > 0
        },
    )
    .await;
    up.kill();
    let _up = it.up(&source);
    it.wait_for_page("after\n", Duration::from_secs(120)).await;
    eventually("converged: two running instances of the new deployment, the rest stopped", Duration::from_secs(60), || async {
        let (running, others): (i64, i64) = sqlx::query_as(
            "select count(*) filter (where d.generation = newest.g and i.state = 'running' and i.desired_state = 'running'),
                    count(*) filter (where not (d.generation = newest.g and i.desired_state = 'running') and i.state <> 'stopped')
             from instances i join deployments d on d.id = i.deployment_id,
                  (select max(generation) as g from deployments) newest",
        )
        .fetch_one(&it.db.pool)
        .await
        .unwrap();
        running == 2 && others == 0 && it.containers().len() == 2
    })
    .await;
    let ready: bool =
        sqlx::query_scalar("select (status->>'ready')::bool from apps where name = $1")
            .bind(&it.app)
            .fetch_one(&it.db.pool)
            .await
            .unwrap();
    assert!(ready);
    // One container per wanted instance: no duplicates from the restart.
    let names = it.containers();
    let mut ids: Vec<&str> = names
        .iter()
        .filter_map(|n| n.split(' ').next()?.rsplit('-').next())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 2, "{names:?}");
}

#[tokio::test]
async fn two_agents_in_two_processes_share_the_replicas_and_the_edge_routes_to_both() {
    let it = Installation::new().await;
    let specs = tempfile::tempdir().unwrap();
    let _up = it.up(&[("BERTH_SPECS", specs.path().display().to_string())]);
    // A second node: only the agent, in a process of its own, on the same Postgres and NATS.
    let second = format!("{}-b", it.node);
    let data_b = tempfile::tempdir().unwrap();
    let _agent_b = it.second_agent(&second, data_b.path());
    it.wait_ready_nodes(2).await;
    write_app(specs.path(), &it.spec(2, "1"), "spread\n");
    it.wait_for_page("spread\n", Duration::from_secs(120)).await;
    eventually(
        "one running instance on each node",
        Duration::from_secs(60),
        || async { it.running_per_node().await == vec![(it.node.clone(), 1), (second.clone(), 1)] },
    )
    .await;
    let labels: serde_json::Value = sqlx::query_scalar("select labels from nodes where name = $1")
        .bind(&second)
        .fetch_one(&it.db.pool)
        .await
        .unwrap();
    assert_eq!(labels, serde_json::json!({"zone": "b"}));
    // Each agent runs its own node's container.
    let second_containers = Command::new("docker")
        .args([
            "ps",
            "-q",
            "--filter",
            &format!("label=berth.node={second}"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&second_containers.stdout)
            .lines()
            .count(),
        1
    );
    for _ in 0..10 {
        assert_eq!(it.get().await.unwrap(), (200, "spread\n".to_string()));
    }
}

#[tokio::test]
async fn a_crashing_app_ends_in_crash_loop_with_its_exit_code_and_last_lines() {
    let it = Installation::new().await;
    let specs = tempfile::tempdir().unwrap();
    let _up = it.up(&[("BERTH_SPECS", specs.path().display().to_string())]);
    let spec = it.spec(1, "1").replace(
        "replicas: 1\n",
        "replicas: 1\ncommand: [\"/bin/busybox\", \"sh\", \"-c\", \"echo cannot open the database; exit 4\"]\n",
    );
    write_app(specs.path(), &spec, "never served\n");
    eventually(
        "the app is in CrashLoop",
        Duration::from_secs(120),
        || async {
            let status: Option<serde_json::Value> =
                sqlx::query_scalar("select status from apps where name = $1")
                    .bind(&it.app)
                    .fetch_optional(&it.db.pool)
                    .await
                    .unwrap();
            status.is_some_and(|s| s["reason"] == "CrashLoop")
        },
    )
    .await;
    let status: serde_json::Value = sqlx::query_scalar("select status from apps where name = $1")
        .bind(&it.app)
        .fetch_one(&it.db.pool)
        .await
        .unwrap();
    let message = status["message"].as_str().unwrap();
    assert!(message.contains("exited with code 4"), "{message}");
    assert!(message.contains("cannot open the database"), "{message}");
    assert_eq!(status["ready"], false);
    assert_eq!(
        it.get().await.unwrap().0,
        503,
        "nothing healthy to route to"
    );
}

#[tokio::test]
async fn a_lost_node_has_its_instances_replaced_and_its_stale_containers_stopped_when_it_returns() {
    let it = Installation::new().await;
    let specs = tempfile::tempdir().unwrap();
    let _up = it.up(&[("BERTH_SPECS", specs.path().display().to_string())]);
    let second = format!("{}-b", it.node);
    let data_b = tempfile::tempdir().unwrap();
    let mut agent_b = it.second_agent(&second, data_b.path());
    it.wait_ready_nodes(2).await;
    write_app(specs.path(), &it.spec(2, "1"), "still here\n");
    eventually(
        "one running instance on each node",
        Duration::from_secs(120),
        || async { it.running_per_node().await == vec![(it.node.clone(), 1), (second.clone(), 1)] },
    )
    .await;

    // The second node goes silent (its agent killed; its container runs on, unsupervised).
    agent_b.kill();
    eventually(
        "the node is down and its instance replaced on the first",
        Duration::from_secs(60),
        || async {
            let state: String = sqlx::query_scalar("select state from nodes where name = $1")
                .bind(&second)
                .fetch_one(&it.db.pool)
                .await
                .unwrap();
            state == "down" && it.running_per_node().await == vec![(it.node.clone(), 2)]
        },
    )
    .await;
    let lost: i64 = sqlx::query_scalar(
        "select count(*) from instances where state = 'lost' and desired_state = 'stopped'",
    )
    .fetch_one(&it.db.pool)
    .await
    .unwrap();
    assert_eq!(lost, 1);
    assert_eq!(it.get().await.unwrap(), (200, "still here\n".to_string()));

    // It comes back: ready again, and its stale container is stopped and removed.
    let _agent_b = it.second_agent(&second, data_b.path());
    it.wait_ready_nodes(2).await;
    eventually(
        "the stale container is gone",
        Duration::from_secs(60),
        || async {
            let out = Command::new("docker")
                .args([
                    "ps",
                    "-aq",
                    "--filter",
                    &format!("label=berth.node={second}"),
                ])
                .output()
                .unwrap();
            out.stdout.is_empty()
        },
    )
    .await;
    let stale_state: String = sqlx::query_scalar(
        "select i.state from instances i join nodes n on n.id = i.node_id where n.name = $1",
    )
    .bind(&second)
    .fetch_one(&it.db.pool)
    .await
    .unwrap();
    assert_eq!(stale_state, "stopped");
    assert_eq!(it.running_per_node().await, vec![(it.node.clone(), 2)]);
}
