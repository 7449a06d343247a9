//! The node agent on the real Docker engine, real processes, Postgres and NATS. The tests
//! write the rows the manager would (an app, a deployment, an image, instances on the
//! agent's node) and watch containers and processes follow them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use berth::agent::{AgentDeps, AgentOptions, NodeConfig};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::fixtures::{
    ChildGuard, TestDb, TestDocker, TestNats, berth_bin, busybox, busybox_httpd_context,
    eventually, http_get, link_instance, start_listener, unique,
};

/// A world with one node: Postgres, NATS with the listener running, the Docker engine.
struct World {
    db: TestDb,
    nats: TestNats,
    docker: TestDocker,
    node: String,
    /// The agent's data directory (exec working directories).
    data: tempfile::TempDir,
    _listener: CancellationToken,
}

impl World {
    async fn new() -> World {
        let db = TestDb::new().await;
        let nats = TestNats::start().await;
        let js = async_nats::jetstream::new(nats.client().await);
        berth::events::ensure_stream(&js).await.unwrap();
        let (listener, _) = start_listener(&db, nats.client().await);
        World {
            db,
            nats,
            docker: TestDocker::new().await,
            node: unique("n").replace('_', "-"),
            data: tempfile::tempdir().unwrap(),
            _listener: listener,
        }
    }

    /// A FROM scratch busybox httpd image serving `page`.
    async fn httpd_image(&self, page: &str) -> String {
        let ctx = tempfile::tempdir().unwrap();
        busybox_httpd_context(ctx.path(), page);
        self.docker.build_image(ctx.path(), "img").await
    }

    fn deps(&self) -> AgentDeps {
        AgentDeps {
            pool: self.db.pool.clone(),
            docker: Some(self.docker.docker.clone()),
            node: NodeConfig {
                name: self.node.clone(),
                address: "127.0.0.1".into(),
                labels: Default::default(),
                capacity: None,
            },
            data_dir: self.data.path().to_path_buf(),
            options: AgentOptions {
                restart_backoff: Duration::from_millis(200),
                max_restart_backoff: Duration::from_secs(2),
                container_prefix: format!("{}-", self.docker.prefix),
                ..Default::default()
            },
        }
    }

    /// Runs an agent in this process until the returned token is cancelled.
    async fn agent(&self) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let shutdown = CancellationToken::new();
        let js = async_nats::jetstream::new(self.nats.client().await);
        let task = tokio::spawn({
            let (deps, shutdown) = (self.deps(), shutdown.clone());
            async move {
                berth::agent::run(deps, js, berth::metrics::Metrics::new(), shutdown)
                    .await
                    .expect("the agent runs")
            }
        });
        self.wait_for_node().await;
        (shutdown, task)
    }

    /// Runs `berth up --components agent` as a process of its own.
    fn agent_process(&self) -> ChildGuard {
        let child = std::process::Command::new(berth_bin())
            .args(["up", "--components", "agent"])
            .env("BERTH_DATABASE_URL", &self.db.url)
            .env("BERTH_NATS_URL", self.nats.url())
            .env("BERTH_NODE_NAME", &self.node)
            .env("BERTH_NODE_ADDRESS", "127.0.0.1")
            .env("BERTH_CONTAINER_PREFIX", format!("{}-", self.docker.prefix))
            .env("BERTH_DATA_DIR", self.data.path())
            .env("BERTH_API_LISTEN", "127.0.0.1:0")
            .env("BERTH_LOG", "berth=info")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        ChildGuard(Some(child))
    }

    async fn wait_for_node(&self) -> i64 {
        eventually("the node registers", Duration::from_secs(30), || async {
            node_id(&self.db.pool, &self.node).await.is_some()
        })
        .await;
        node_id(&self.db.pool, &self.node).await.unwrap()
    }

    /// An app with a deployment of `spec` (YAML lines after the name) and `image`.
    async fn deploy(&self, app: &str, spec: &str, image: Option<&str>) -> (i64, i64, Option<i64>) {
        let image_line = image.map(|i| format!("image: {i}\n")).unwrap_or_default();
        let text = format!("apiVersion: berth/v1\nkind: App\nname: {app}\n{image_line}{spec}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("app.yaml");
        std::fs::write(&file, text).unwrap();
        let loaded = berth::spec::load_paths(&[file]);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let spec = loaded.apps.into_iter().next().unwrap().spec;
        let json = spec.to_canonical_json();
        let app_id: i64 = sqlx::query_scalar(
            "insert into apps (name, spec, spec_hash, generation, source) values ($1, $2, 'h', 1, 'test') returning id",
        )
        .bind(app)
        .bind(&json)
        .fetch_one(&self.db.pool)
        .await
        .unwrap();
        let image_id: Option<i64> = match image {
            Some(reference) => Some(
                sqlx::query_scalar(
                    "insert into images (app_id, reference) values ($1, $2) returning id",
                )
                .bind(app_id)
                .bind(reference)
                .fetch_one(&self.db.pool)
                .await
                .unwrap(),
            ),
            None => None,
        };
        let deployment: i64 = sqlx::query_scalar(
            "insert into deployments (app_id, generation, spec, spec_hash, status, image_id) values ($1, 1, $2, 'h', 'active', $3) returning id",
        )
        .bind(app_id)
        .bind(&json)
        .bind(image_id)
        .fetch_one(&self.db.pool)
        .await
        .unwrap();
        (app_id, deployment, image_id)
    }

    /// An instance on this world's node, as the manager would create it.
    async fn instance(&self, (app, deployment, image): (i64, i64, Option<i64>)) -> i64 {
        let node = self.wait_for_node().await;
        let id: i64 = sqlx::query_scalar(
            "insert into instances (app_id, deployment_id, node_id, image_id, host) values ($1, $2, $3, $4, '127.0.0.1') returning id",
        )
        .bind(app)
        .bind(deployment)
        .bind(node)
        .bind(image)
        .fetch_one(&self.db.pool)
        .await
        .unwrap();
        link_instance(&self.db.pool, deployment, id).await;
        id
    }
}

async fn node_id(pool: &PgPool, name: &str) -> Option<i64> {
    sqlx::query_scalar("select id from nodes where name = $1")
        .bind(name)
        .fetch_optional(pool)
        .await
        .unwrap()
}

#[derive(Debug, Clone, sqlx::FromRow)]
struct Row {
    state: String,
    port: Option<i32>,
    runtime_id: Option<String>,
    restart_count: i32,
    exit_code: Option<i32>,
    last_error: Option<String>,
}

async fn row(pool: &PgPool, id: i64) -> Row {
    sqlx::query_as(
        "select state, port, runtime_id, restart_count, exit_code, last_error from instances where id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn wait_state(pool: &PgPool, id: i64, state: &str, timeout: Duration) -> Row {
    eventually(&format!("instance {id} is {state}"), timeout, || async {
        row(pool, id).await.state == state
    })
    .await;
    row(pool, id).await
}

async fn stop_instance(pool: &PgPool, id: i64) {
    sqlx::query("update instances set desired_state = 'stopped' where id = $1")
        .bind(id)
        .execute(pool)
        .await
        .unwrap();
}

/// Whether a container exists, and whether it runs.
async fn container(docker: &TestDocker, id: &str) -> Option<(bool, HashMap<String, String>)> {
    let c = docker.docker.inspect_container(id, None).await.ok()?;
    Some((
        c.state.and_then(|s| s.running).unwrap_or(false),
        c.config.and_then(|c| c.labels).unwrap_or_default(),
    ))
}

/// A shell command running busybox httpd on $PORT over `www`, for `runtime: exec`.
fn exec_httpd(www: &std::path::Path) -> String {
    format!(
        "exec {} httpd -f -p 127.0.0.1:$PORT -h {}",
        busybox().display(),
        www.display()
    )
}

const HEALTH: &str = "health:\n  path: /healthz\n  interval: 200ms\n  timeout: 1s\n";

#[tokio::test]
async fn an_instance_becomes_a_labelled_container_answering_and_stops_within_its_drain_time() {
    let world = World::new().await;
    let image = world.httpd_image("hello from the agent\n").await;
    let (_stop, _agent) = world.agent().await;

    let app = world
        .deploy(
            "web",
            &format!("port: 8080\nenv: {{GREETING: hi}}\nresources: {{memory: 64Mi, cpus: 0.5}}\ndeploy: {{drain_timeout: 3s}}\n{HEALTH}"),
            Some(&image),
        )
        .await;
    let id = world.instance(app).await;
    let r = wait_state(&world.db.pool, id, "running", Duration::from_secs(30)).await;
    let port = r.port.expect("a port is assigned");
    let (status, body) = http_get(&format!("http://127.0.0.1:{port}/"))
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "hello from the agent\n"));

    let cid = r.runtime_id.clone().expect("the container id is recorded");
    let (running, labels) = container(&world.docker, &cid).await.unwrap();
    assert!(running);
    assert_eq!(labels["berth.instance"], id.to_string());
    assert_eq!(labels["berth.app"], "web");
    assert_eq!(labels["berth.deployment"], app.1.to_string());
    let inspect = world
        .docker
        .docker
        .inspect_container(&cid, None)
        .await
        .unwrap();
    let host = inspect.host_config.unwrap();
    assert_eq!(host.network_mode.as_deref(), Some("host"));
    assert_eq!(host.memory, Some(64 * 1024 * 1024));
    assert_eq!(host.nano_cpus, Some(500_000_000));
    assert!(
        host.security_opt
            .unwrap()
            .contains(&"no-new-privileges".to_string())
    );
    let env = inspect.config.unwrap().env.unwrap();
    assert!(env.contains(&format!("PORT={port}")), "{env:?}");
    assert!(env.contains(&"GREETING=hi".to_string()), "{env:?}");

    let asked = Instant::now();
    stop_instance(&world.db.pool, id).await;
    wait_state(&world.db.pool, id, "stopped", Duration::from_secs(10)).await;
    assert!(
        asked.elapsed() < Duration::from_secs(3) + Duration::from_millis(1500),
        "stopping took {:?}",
        asked.elapsed()
    );
    assert!(
        container(&world.docker, &cid).await.is_none(),
        "the container is removed"
    );
    assert!(
        http_get(&format!("http://127.0.0.1:{port}/"))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn after_kill_9_and_restart_the_agent_adopts_its_running_containers() {
    let world = World::new().await;
    let image = world.httpd_image("adopted\n").await;
    let mut agent = world.agent_process();

    let app = world.deploy("web", HEALTH, Some(&image)).await;
    let first = world.instance(app).await;
    let before = wait_state(&world.db.pool, first, "running", Duration::from_secs(30)).await;
    let cid = before.runtime_id.clone().unwrap();
    let started_at = world
        .docker
        .docker
        .inspect_container(&cid, None)
        .await
        .unwrap()
        .state
        .unwrap()
        .started_at;

    agent.kill(); // SIGKILL: nothing of the agent runs on
    let _agent = world.agent_process();
    // A second instance running proves the new agent reconciles; the first was queued
    // by its start-up resync before any event.
    let second = world.instance(app).await;
    wait_state(&world.db.pool, second, "running", Duration::from_secs(30)).await;

    let after = row(&world.db.pool, first).await;
    assert_eq!(after.state, "running");
    assert_eq!(
        after.runtime_id.as_deref(),
        Some(cid.as_str()),
        "same container"
    );
    assert_eq!(after.restart_count, 0);
    let inspect = world
        .docker
        .docker
        .inspect_container(&cid, None)
        .await
        .unwrap();
    assert_eq!(
        inspect.state.unwrap().started_at,
        started_at,
        "never restarted"
    );
    let port = after.port.unwrap();
    assert_eq!(
        http_get(&format!("http://127.0.0.1:{port}/"))
            .await
            .unwrap()
            .0,
        200
    );
}

#[tokio::test]
async fn a_crashing_container_is_restarted_with_backoff_and_its_exit_is_recorded() {
    let world = World::new().await;
    let image = world.httpd_image("unused\n").await;
    let (_stop, _agent) = world.agent().await;

    let app = world
        .deploy(
            "crasher",
            "command: [\"/bin/busybox\", \"sh\", \"-c\", \"echo starting up; echo boom >&2; exit 3\"]\n",
            Some(&image),
        )
        .await;
    let id = world.instance(app).await;
    let restarts = std::sync::Mutex::new(Vec::new());
    eventually("three restarts", Duration::from_secs(30), || async {
        let r = row(&world.db.pool, id).await;
        let mut seen = restarts.lock().unwrap();
        if seen.last() != Some(&r.restart_count) {
            seen.push(r.restart_count);
        }
        r.restart_count >= 3
    })
    .await;
    let restarts = restarts.into_inner().unwrap();
    let r = row(&world.db.pool, id).await;
    assert_eq!(r.exit_code, Some(3));
    let error = r.last_error.unwrap();
    assert!(error.starts_with("exited with code 3"), "{error}");
    assert!(
        error.contains("boom") && error.contains("starting up"),
        "{error}"
    );
    let logs: String = sqlx::query_scalar("select lines from instance_logs where instance_id = $1")
        .bind(id)
        .fetch_one(&world.db.pool)
        .await
        .unwrap();
    assert!(logs.contains("boom"), "{logs}");
    // Backoff: 200 ms, 400 ms, 800 ms (each scaled by 0.5..1), so three restarts take a
    // while, and the restarts came one by one.
    assert!(restarts.windows(2).all(|w| w[1] > w[0]), "{restarts:?}");
}

#[tokio::test]
async fn a_failing_health_check_makes_the_instance_unhealthy_until_it_recovers() {
    let world = World::new().await;
    let ctx = tempfile::tempdir().unwrap();
    busybox_httpd_context(ctx.path(), "page\n");
    // A CGI health endpoint: 500 while /www/sick exists.
    std::fs::create_dir_all(ctx.path().join("www/cgi-bin")).unwrap();
    std::fs::write(
        ctx.path().join("www/cgi-bin/health"),
        "#!/bin/busybox sh\nif [ -e /www/sick ]; then printf 'Status: 500 Internal Server Error\\r\\n\\r\\ndatabase unreachable\\n'; else printf 'Content-Type: text/plain\\r\\n\\r\\nok\\n'; fi\n",
    )
    .unwrap();
    let script = ctx.path().join("www/cgi-bin/health");
    let mut perms = std::fs::metadata(&script).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&script, perms).unwrap();
    let image = world.docker.build_image(ctx.path(), "img").await;
    let (_stop, _agent) = world.agent().await;

    let app = world
        .deploy(
            "web",
            "health:\n  path: /cgi-bin/health\n  interval: 100ms\n  unhealthy_threshold: 2\n",
            Some(&image),
        )
        .await;
    let id = world.instance(app).await;
    let r = wait_state(&world.db.pool, id, "running", Duration::from_secs(30)).await;
    let cid = r.runtime_id.unwrap();
    let exec = |cmd: &'static str| {
        let status = std::process::Command::new("docker")
            .args(["exec", &cid, "/bin/busybox", "sh", "-c", cmd])
            .status()
            .unwrap();
        assert!(status.success());
    };
    exec("/bin/busybox touch /www/sick");
    let r = wait_state(&world.db.pool, id, "unhealthy", Duration::from_secs(10)).await;
    let error = r.last_error.unwrap();
    assert!(
        error.contains("500") && error.contains("database unreachable"),
        "{error}"
    );
    exec("/bin/busybox rm /www/sick");
    let r = wait_state(&world.db.pool, id, "running", Duration::from_secs(10)).await;
    assert_eq!(r.last_error, None);
    assert_eq!(r.restart_count, 0, "a failing probe never restarts it");
}

#[tokio::test]
async fn orphaned_berth_containers_are_removed_and_others_are_left_alone() {
    let world = World::new().await;
    let image = world.httpd_image("x\n").await;
    let create = |name: String, labels: Option<HashMap<String, String>>| {
        let docker = world.docker.docker.clone();
        let image = image.clone();
        async move {
            let body = bollard::models::ContainerCreateBody {
                image: Some(image),
                cmd: Some(vec!["/bin/busybox".into(), "sleep".into(), "600".into()]),
                labels,
                host_config: Some(bollard::models::HostConfig {
                    network_mode: Some("host".into()),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let options = bollard::query_parameters::CreateContainerOptionsBuilder::new()
                .name(&name)
                .build();
            let id = docker
                .create_container(Some(options), body)
                .await
                .unwrap()
                .id;
            docker.start_container(&id, None).await.unwrap();
            id
        }
    };
    let orphan = create(
        world.docker.name("orphan"),
        Some(HashMap::from([
            ("berth.instance".to_string(), "987654".to_string()),
            ("berth.app".to_string(), "gone".to_string()),
            ("berth.node".to_string(), world.node.clone()),
        ])),
    )
    .await;
    let foreign = create(world.docker.name("foreign"), None).await;
    let (_stop, _agent) = world.agent().await;

    eventually("the orphan is removed", Duration::from_secs(45), || async {
        container(&world.docker, &orphan).await.is_none()
    })
    .await;
    let (running, _) = container(&world.docker, &foreign)
        .await
        .expect("left alone");
    assert!(running);
}

#[tokio::test]
async fn the_exec_runtime_runs_busybox_httpd_as_a_process_with_the_same_behaviour() {
    let world = World::new().await;
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join("index.html"), "from a process\n").unwrap();
    std::fs::write(www.path().join("healthz"), "ok\n").unwrap();
    let (_stop, _agent) = world.agent().await;

    let command = exec_httpd(www.path());
    let app = world
        .deploy(
            "proc",
            &format!("runtime: exec\ncommand: [\"/bin/sh\", \"-c\", {command:?}]\nenv: {{GREETING: hi}}\ndeploy: {{drain_timeout: 2s}}\n{HEALTH}"),
            None,
        )
        .await;
    let id = world.instance(app).await;
    let r = wait_state(&world.db.pool, id, "running", Duration::from_secs(20)).await;
    let port = r.port.unwrap();
    let pid: i32 = r.runtime_id.unwrap().parse().expect("the pid is recorded");
    let (status, body) = http_get(&format!("http://127.0.0.1:{port}/"))
        .await
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "from a process\n"));
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    assert!(environ.contains("GREETING=hi") && environ.contains(&format!("PORT={port}")));
    assert!(
        !environ.contains("BERTH_DATABASE_URL"),
        "the agent's environment never leaks"
    );

    // A crash is restarted like a container's.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually(
        "a restart after the kill",
        Duration::from_secs(20),
        || async {
            let r = row(&world.db.pool, id).await;
            r.restart_count == 1 && r.state == "running"
        },
    )
    .await;
    let r = row(&world.db.pool, id).await;
    assert_eq!(r.exit_code, Some(137), "128 + SIGKILL");
    let pid: i32 = r.runtime_id.unwrap().parse().unwrap();

    stop_instance(&world.db.pool, id).await;
    wait_state(&world.db.pool, id, "stopped", Duration::from_secs(10)).await;
    assert!(
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err(),
        "the process is gone"
    );
}

#[tokio::test]
async fn the_agent_registers_its_node_and_heartbeats() {
    let world = World::new().await;
    let (_stop, _agent) = world.agent().await;
    let first: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("select last_heartbeat_at from nodes where name = $1")
            .bind(&world.node)
            .fetch_one(&world.db.pool)
            .await
            .unwrap();
    eventually("a second heartbeat", Duration::from_secs(10), || async {
        let now: chrono::DateTime<chrono::Utc> =
            sqlx::query_scalar("select last_heartbeat_at from nodes where name = $1")
                .bind(&world.node)
                .fetch_one(&world.db.pool)
                .await
                .unwrap();
        now > first
    })
    .await;
    let (state, capacity): (String, serde_json::Value) =
        sqlx::query_as("select state, capacity from nodes where name = $1")
            .bind(&world.node)
            .fetch_one(&world.db.pool)
            .await
            .unwrap();
    assert_eq!(state, "ready");
    assert!(capacity["memory"].as_u64().unwrap() > 0 && capacity["cpus"].as_f64().unwrap() >= 1.0);
}

#[tokio::test]
async fn after_kill_9_the_next_agent_restarts_exec_processes_it_cannot_adopt() {
    let world = World::new().await;
    let www = tempfile::tempdir().unwrap();
    std::fs::write(www.path().join("healthz"), "ok\n").unwrap();
    let mut agent = world.agent_process();
    let command = exec_httpd(www.path());
    let app = world
        .deploy(
            "proc",
            &format!("runtime: exec\ncommand: [\"/bin/sh\", \"-c\", {command:?}]\n{HEALTH}"),
            None,
        )
        .await;
    let id = world.instance(app).await;
    let first = wait_state(&world.db.pool, id, "running", Duration::from_secs(30)).await;
    let old_pid: i32 = first.runtime_id.unwrap().parse().unwrap();

    agent.kill(); // SIGKILL: the process lives on, its output pipes now lead nowhere
    let _agent = world.agent_process();
    eventually(
        "a new process runs the instance",
        Duration::from_secs(30),
        || async {
            let r = row(&world.db.pool, id).await;
            r.state == "running" && r.runtime_id.as_deref() != Some(old_pid.to_string().as_str())
        },
    )
    .await;
    // Stopped: gone, or a zombie waiting for init to reap it (its parent, the agent, died).
    eventually(
        "the old process is stopped",
        Duration::from_secs(5),
        || async {
            std::fs::read_to_string(format!("/proc/{old_pid}/stat"))
                .map(|stat| {
                    stat.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z')
                })
                .unwrap_or(true)
        },
    )
    .await;
    let port = row(&world.db.pool, id).await.port.unwrap();
    assert_eq!(
        http_get(&format!("http://127.0.0.1:{port}/healthz"))
            .await
            .unwrap()
            .0,
        200
    );
}
