//! The composition root of `berth up`: start (or connect to) Postgres and NATS, migrate,
//! ensure the stream, run the chosen components, and stop everything in order on SIGINT or
//! SIGTERM.
//!
//! Components each get the shared dependencies and one cancellation token; one that fails
//! cancels the rest, so a supervisor restarts a clean process rather than a half-working one.

pub mod embedded;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;

/// A part of berth that `berth up --components` can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Component {
    Watcher,
    Listener,
    Manager,
    Builder,
    Agent,
    Edge,
    Api,
}

impl Component {
    pub const ALL: [Component; 7] = [
        Component::Watcher,
        Component::Listener,
        Component::Manager,
        Component::Builder,
        Component::Agent,
        Component::Edge,
        Component::Api,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Component::Watcher => "watcher",
            Component::Listener => "listener",
            Component::Manager => "manager",
            Component::Builder => "builder",
            Component::Agent => "agent",
            Component::Edge => "edge",
            Component::Api => "api",
        }
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Component {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let names: Vec<&str> = Component::ALL.iter().map(|c| c.name()).collect();
        Component::ALL
            .iter()
            .copied()
            .find(|c| c.name() == s)
            .ok_or_else(|| match crate::spec::suggest(s, &names) {
                Some(n) => format!("unknown component `{s}` (did you mean `{n}`?)"),
                None => format!("unknown component `{s}` (known: {})", names.join(", ")),
            })
    }
}

/// Written to `<data dir>/berth.json` while `berth up` runs, so the CLI and tests can find
/// it. Readable only by its owner: the database URL holds a password.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateFile {
    pub pid: u32,
    pub api_url: String,
    pub database_url: String,
    pub nats_url: String,
}

impl StateFile {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("berth.json")
    }

    pub fn read(data_dir: &Path) -> anyhow::Result<StateFile> {
        let path = Self::path(data_dir);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(serde_json::from_str(&text)?)
    }
}

/// Runs `berth up` until a signal, then stops everything.
pub async fn up(config: Config, components: Vec<Component>) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    spawn_signal_handler(shutdown.clone());
    // One `berth up` per data directory: a second one would stop the first one's servers.
    let _lock = lock_data_dir(&config.data_dir)?;

    let mut embedded = embedded::Embedded::start(
        &config.data_dir,
        config.database_url.clone(),
        config.nats_url.clone(),
    )
    .await?;
    // A private server that dies takes berth down with it (a supervisor restarts it whole).
    let died: std::sync::Arc<std::sync::Mutex<Option<&'static str>>> = Default::default();
    let watchdog = tokio::spawn({
        let (death, died, shutdown) = (embedded.died(), died.clone(), shutdown.clone());
        async move {
            let name = death.await;
            tracing::error!(server = name, "a private server exited; shutting down");
            *died.lock().expect("died lock") = Some(name);
            shutdown.cancel();
        }
    });
    let result = run_components(&config, &embedded, &components, shutdown.clone()).await;
    watchdog.abort();
    let _ = std::fs::remove_file(StateFile::path(&config.data_dir));
    embedded.stop().await;
    if let Some(name) = *died.lock().expect("died lock") {
        anyhow::bail!(
            "the private {name} exited unexpectedly; see its log in {}",
            config.data_dir.display()
        );
    }
    result
}

/// Holds an exclusive lock on `<data dir>/berth.lock` for the life of the process.
fn lock_data_dir(data_dir: &Path) -> anyhow::Result<std::fs::File> {
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating data directory {}", data_dir.display()))?;
    let path = data_dir.join("berth.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = StateFile::read(data_dir)
                .map(|s| format!(" (pid {}, api {})", s.pid, s.api_url))
                .unwrap_or_default();
            anyhow::bail!(
                "another `berth up` is using the data directory {}{holder}",
                data_dir.display()
            )
        }
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("locking {}", path.display()))
        }
    }
}

fn spawn_signal_handler(shutdown: CancellationToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot install signal handlers");
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        shutdown.cancel();
    });
}

async fn run_components(
    config: &Config,
    embedded: &embedded::Embedded,
    components: &[Component],
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let database_url = embedded
        .database_url
        .clone()
        .expect("a database url is set or started");
    let nats_url = embedded
        .nats_url
        .clone()
        .expect("a nats url is set or started");
    let pool = crate::db::connect(&database_url, 20)
        .await
        .context("connecting to postgres")?;
    crate::db::migrate(&pool)
        .await
        .context("migrating the database")?;
    let nats = async_nats::ConnectOptions::new()
        .name("berth")
        .retry_on_initial_connect()
        .connect(&nats_url)
        .await
        .context("connecting to nats")?;
    let js = async_nats::jetstream::new(nats.clone());
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        crate::events::ensure_stream(&js),
    )
    .await
    .context("nats did not answer within 30s")?
    .context("creating the event stream")?;

    let tracker = TaskTracker::new();
    let failure: Failure = Default::default();
    let metrics = crate::metrics::Metrics::new();
    let mut api_url = String::new();
    for component in components {
        match component {
            Component::Watcher => {
                let deps = crate::watcher::WatcherDeps {
                    pool: pool.clone(),
                    database_url: database_url.clone(),
                    nats: Some(nats.clone()),
                    specs: config.specs.clone(),
                    git: config.git.clone(),
                    data_dir: config.data_dir.clone(),
                    options: crate::watcher::apply::ApplyOptions {
                        prune_empty: config.prune_empty,
                    },
                    debounce: config.watch_debounce,
                    rescan: config.rescan_interval,
                };
                spawn_component(
                    &tracker,
                    &failure,
                    *component,
                    shutdown.clone(),
                    crate::watcher::run(deps, shutdown.clone()),
                );
            }
            Component::Listener => {
                let deps = crate::listener::ListenerDeps {
                    pool: pool.clone(),
                    database_url: database_url.clone(),
                    nats: nats.clone(),
                    metrics: metrics.clone(),
                    options: Default::default(),
                };
                spawn_component(
                    &tracker,
                    &failure,
                    *component,
                    shutdown.clone(),
                    crate::listener::run(deps, shutdown.clone()),
                );
            }
            Component::Manager => {
                let deps = crate::manager::ManagerDeps {
                    pool: pool.clone(),
                    options: Default::default(),
                };
                spawn_component(
                    &tracker,
                    &failure,
                    *component,
                    shutdown.clone(),
                    crate::manager::run(
                        deps,
                        database_url.clone(),
                        js.clone(),
                        metrics.clone(),
                        shutdown.clone(),
                    ),
                );
            }
            Component::Builder => {
                let docker = connect_docker().await?;
                let builder = crate::builder::Builder::new(crate::builder::BuilderDeps {
                    pool: pool.clone(),
                    docker,
                    id: format!("{}-{}", config.node_name, std::process::id()),
                    data_dir: config.data_dir.clone(),
                    options: Default::default(),
                });
                let options = crate::events::controller::ControllerOptions {
                    concurrency: crate::builder::BuilderOptions::default().concurrency,
                    ..crate::events::controller::ControllerOptions::new(
                        "builder",
                        vec!["image_build", "deployment"],
                    )
                };
                spawn_component(
                    &tracker,
                    &failure,
                    *component,
                    shutdown.clone(),
                    crate::events::controller::run_controller(
                        builder,
                        js.clone(),
                        options,
                        metrics.clone(),
                        shutdown.clone(),
                    ),
                );
            }
            Component::Agent => {
                // A node without Docker still runs exec instances.
                let docker = match connect_docker().await {
                    Ok(d) => Some(d),
                    Err(e) => {
                        tracing::warn!(
                            error = format!("{e:#}"),
                            "no Docker engine: only exec instances can run here"
                        );
                        None
                    }
                };
                let deps = crate::agent::AgentDeps {
                    pool: pool.clone(),
                    docker,
                    node: crate::agent::NodeConfig {
                        name: config.node_name.clone(),
                        address: config.node_address.clone(),
                        labels: config.node_labels.clone(),
                        capacity: None,
                    },
                    data_dir: config.data_dir.clone(),
                    options: crate::agent::AgentOptions {
                        container_prefix: config.container_prefix.clone(),
                        ..Default::default()
                    },
                };
                spawn_component(
                    &tracker,
                    &failure,
                    *component,
                    shutdown.clone(),
                    crate::agent::run(deps, js.clone(), metrics.clone(), shutdown.clone()),
                );
            }
            Component::Edge => {
                let listener = crate::edge::bind(config.edge_listen).await?;
                let tls = match (config.edge_tls_listen, &config.tls_dir) {
                    (Some(addr), Some(dir)) => Some((crate::edge::bind(addr).await?, dir.clone())),
                    _ => None,
                };
                let deps = crate::edge::EdgeDeps {
                    pool: pool.clone(),
                    listener,
                    tls,
                    metrics: metrics.clone(),
                    options: Default::default(),
                };
                spawn_component(
                    &tracker,
                    &failure,
                    *component,
                    shutdown.clone(),
                    crate::edge::run(deps, js.clone(), shutdown.clone()),
                );
            }
            Component::Api => {
                let listener = tokio::net::TcpListener::bind(config.api_listen)
                    .await
                    .with_context(|| format!("binding the api to {}", config.api_listen))?;
                api_url = format!("http://{}", listener.local_addr()?);
                let state = crate::api::ApiState {
                    pool: pool.clone(),
                    nats: nats.clone(),
                    metrics: metrics.clone(),
                    api_token: config.api_token.clone(),
                    webhook_secret: config.git.as_ref().and_then(|g| g.webhook_secret.clone()),
                };
                spawn_component(
                    &tracker,
                    &failure,
                    *component,
                    shutdown.clone(),
                    crate::api::run(listener, state, shutdown.clone()),
                );
            }
        }
    }
    tracker.close();
    let state = StateFile {
        pid: std::process::id(),
        api_url,
        database_url,
        nats_url,
    };
    embedded::write_private(
        &StateFile::path(&config.data_dir),
        &serde_json::to_string_pretty(&state)?,
    )?;
    tracing::info!(components = ?components.iter().map(|c| c.name()).collect::<Vec<_>>(), "berth is up");

    shutdown.cancelled().await;
    tracker.wait().await;
    pool.close().await;
    let _ = nats.drain().await;
    match failure.lock().expect("failure lock").take() {
        Some(message) => Err(anyhow::anyhow!(message)),
        None => Ok(()),
    }
}

async fn connect_docker() -> anyhow::Result<bollard::Docker> {
    bollard::Docker::connect_with_local_defaults()
        .context("connecting to the Docker engine")?
        .negotiate_version()
        .await
        .context("the Docker engine does not answer (is it running?)")
}

/// The first component failure, which becomes `berth up`'s exit status.
type Failure = std::sync::Arc<std::sync::Mutex<Option<String>>>;

fn spawn_component<F>(
    tracker: &TaskTracker,
    failure: &Failure,
    component: Component,
    shutdown: CancellationToken,
    fut: F,
) where
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let failure = failure.clone();
    tracker.spawn(async move {
        let result = fut.await;
        // A component that returns while berth is meant to run is a failure too.
        let result = match result {
            Ok(()) if !shutdown.is_cancelled() => Err(anyhow::anyhow!("exited unexpectedly")),
            other => other,
        };
        match result {
            Ok(()) => tracing::info!(component = %component, "stopped"),
            Err(e) => {
                tracing::error!(component = %component, error = format!("{e:#}"), "failed; shutting down");
                failure.lock().expect("failure lock").get_or_insert_with(|| format!("{component}: {e:#}"));
                shutdown.cancel();
            }
        }
    });
}
