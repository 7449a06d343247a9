//! The two ways an instance runs on a node: a Docker container (bollard) or a plain child
//! process group (`runtime: exec`). Both give a [`Process`] whose exit can be awaited, feed
//! the instance's [`LogRing`], and stop with SIGTERM, then SIGKILL after the drain time.
//!
//! Invariants: only containers carrying `berth.instance` and this node's `berth.node` label
//! are ever looked at, stopped or removed; a child process never inherits the agent's
//! environment (it holds database URLs and tokens), only PATH plus the spec's env and PORT.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, LogsOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use futures_util::StreamExt;
use tokio::io::AsyncBufReadExt;
use tokio::sync::oneshot;

use crate::spec::AppSpec;

/// Lines kept per instance (the API shows them; a crash records the last 50).
const LOG_LINES: usize = 200;

/// The last lines an instance printed, shared by the tasks that read its output and the
/// agent's periodic flush to `instance_logs`.
#[derive(Clone, Default)]
pub struct LogRing(Arc<Mutex<(VecDeque<String>, bool)>>);

impl LogRing {
    pub fn push(&self, text: &str) {
        let mut guard = self.0.lock().expect("log lock");
        for line in text.lines() {
            if guard.0.len() == LOG_LINES {
                guard.0.pop_front();
            }
            guard.0.push_back(line.to_string());
        }
        guard.1 = true;
    }

    /// The last `n` lines, joined.
    pub fn tail(&self, n: usize) -> String {
        let guard = self.0.lock().expect("log lock");
        let skip = guard.0.len().saturating_sub(n);
        guard
            .0
            .iter()
            .skip(skip)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Everything, if anything changed since the last call.
    pub fn take_changed(&self) -> Option<String> {
        let mut guard = self.0.lock().expect("log lock");
        if !guard.1 {
            return None;
        }
        guard.1 = false;
        Some(guard.0.iter().cloned().collect::<Vec<_>>().join("\n"))
    }
}

/// How a process ended.
#[derive(Debug, Clone)]
pub struct Exit {
    /// The exit code; a signal death counts as 128 + signal, as shells say.
    pub code: Option<i64>,
    /// What the runtime said, if anything (e.g. "OOMKilled").
    pub message: String,
}

/// A running instance.
pub struct Process {
    /// Container id or pid, for `instances.runtime_id`.
    pub runtime_id: String,
    /// Resolves once it exits.
    pub exited: oneshot::Receiver<Exit>,
    kind: Kind,
}

enum Kind {
    Container,
    Child { pid: i32 },
}

/// What an instance runs, as the agent read it from its rows.
pub struct Launch<'a> {
    pub instance_id: i64,
    pub app: &'a str,
    pub deployment_id: Option<i64>,
    pub spec: &'a AppSpec,
    pub image: Option<&'a str>,
    pub port: u16,
    pub logs: LogRing,
}

impl Launch<'_> {
    fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .spec
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.push(("PORT".into(), self.port.to_string()));
        env.push(("BERTH_INSTANCE".into(), self.instance_id.to_string()));
        env.push(("BERTH_APP".into(), self.app.to_string()));
        env
    }
}

/// A node's runtimes.
#[derive(Clone)]
pub struct Runtimes {
    /// None when the node has no Docker engine: docker instances then fail to start, saying so.
    pub docker: Option<Docker>,
    /// This node's name, in the `berth.node` label.
    pub node: String,
    /// Prefix of container names (tests use their own so parallel tests never collide).
    pub container_prefix: String,
    /// Working directories of exec instances live under here.
    pub exec_dir: PathBuf,
}

fn docker_error(e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

impl Runtimes {
    fn docker(&self) -> Result<&Docker, String> {
        self.docker
            .as_ref()
            .ok_or_else(|| "this node has no Docker engine".to_string())
    }

    /// Starts an instance.
    pub async fn start(&self, launch: &Launch<'_>) -> Result<Process, String> {
        match launch.spec.runtime {
            crate::spec::Runtime::Docker => self.start_container(launch).await,
            crate::spec::Runtime::Exec => self.start_child(launch).await,
        }
    }

    /// Finds what still runs of an instance from before an agent restart. A running
    /// container is adopted as it is. A stopped container is removed, its exit returned so
    /// it counts as a crash. A process is stopped (its pipes died with the old agent), so
    /// the caller starts it again.
    pub async fn adopt(
        &self,
        instance_id: i64,
        runtime_id: Option<&str>,
        logs: &LogRing,
    ) -> Result<Option<Adopted>, String> {
        if let Some(container) = self.find_container(instance_id).await? {
            let docker = self.docker()?;
            let inspect = docker
                .inspect_container(&container, None)
                .await
                .map_err(|e| docker_error(&e))?;
            let state = inspect.state.unwrap_or_default();
            if state.running == Some(true) {
                return Ok(Some(Adopted::Running(
                    self.watch_container(docker, container, logs, "50"),
                )));
            }
            self.collect_logs(docker, &container, logs).await;
            let exit = Exit {
                code: state.exit_code,
                message: state.error.unwrap_or_default(),
            };
            self.remove_container(&container).await?;
            return Ok(Some(Adopted::Exited(exit)));
        }
        if let Some(pid) = runtime_id.and_then(|r| r.parse::<i32>().ok())
            && is_our_child(pid, instance_id)
        {
            tracing::info!(
                instance.id = instance_id,
                pid,
                "stopping a process left by an earlier agent"
            );
            kill_group(pid, nix::sys::signal::Signal::SIGKILL);
        }
        Ok(None)
    }

    /// Stops a process: SIGTERM, then SIGKILL after `grace`; a container is removed.
    pub async fn stop(
        &self,
        process: &mut Process,
        grace: Duration,
    ) -> Result<Option<Exit>, String> {
        match process.kind {
            Kind::Container => {
                let docker = self.docker()?;
                let options = StopContainerOptionsBuilder::new()
                    .t(grace.as_secs().max(1) as i32)
                    .build();
                match docker
                    .stop_container(&process.runtime_id, Some(options))
                    .await
                {
                    Ok(()) => {}
                    // 304: already stopped; 404: already gone.
                    Err(bollard::errors::Error::DockerResponseServerError {
                        status_code: 304 | 404,
                        ..
                    }) => {}
                    Err(e) => return Err(docker_error(&e)),
                }
                let exit = tokio::time::timeout(Duration::from_secs(5), &mut process.exited)
                    .await
                    .ok()
                    .and_then(Result::ok);
                self.remove_container(&process.runtime_id).await?;
                Ok(exit)
            }
            Kind::Child { pid } => {
                kill_group(pid, nix::sys::signal::Signal::SIGTERM);
                if let Ok(Ok(exit)) = tokio::time::timeout(grace, &mut process.exited).await {
                    return Ok(Some(exit));
                }
                kill_group(pid, nix::sys::signal::Signal::SIGKILL);
                Ok(
                    tokio::time::timeout(Duration::from_secs(5), &mut process.exited)
                        .await
                        .ok()
                        .and_then(Result::ok),
                )
            }
        }
    }

    /// Removes a crashed container before its replacement is created.
    pub async fn discard(&self, process: &Process) -> Result<(), String> {
        match process.kind {
            Kind::Container => self.remove_container(&process.runtime_id).await,
            Kind::Child { .. } => Ok(()),
        }
    }

    /// Ids of the instances that have a container on this node (running or not).
    pub async fn container_instances(&self) -> Result<Vec<i64>, String> {
        Ok(self
            .labelled_containers(&[])
            .await?
            .into_iter()
            .filter_map(|c| c.labels?.get("berth.instance")?.parse().ok())
            .collect())
    }

    async fn find_container(&self, instance_id: i64) -> Result<Option<String>, String> {
        let label = format!("berth.instance={instance_id}");
        Ok(self
            .labelled_containers(&[label])
            .await?
            .into_iter()
            .find_map(|c| c.id))
    }

    /// The containers (running or not) labelled with this node and `labels`.
    async fn labelled_containers(
        &self,
        labels: &[String],
    ) -> Result<Vec<bollard::models::ContainerSummary>, String> {
        let Some(docker) = &self.docker else {
            return Ok(Vec::new());
        };
        let mut wanted = vec![format!("berth.node={}", self.node)];
        wanted.extend_from_slice(labels);
        let filters = HashMap::from([("label".to_string(), wanted)]);
        let options = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        docker
            .list_containers(Some(options))
            .await
            .map_err(|e| docker_error(&e))
    }

    async fn remove_container(&self, id: &str) -> Result<(), String> {
        let options = RemoveContainerOptionsBuilder::new().force(true).build();
        match self.docker()?.remove_container(id, Some(options)).await {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            // 409: removal already in progress.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(()),
            Err(e) => Err(docker_error(&e)),
        }
    }

    async fn start_container(&self, launch: &Launch<'_>) -> Result<Process, String> {
        let docker = self.docker()?;
        let image = launch
            .image
            .ok_or_else(|| "the deployment has no image".to_string())?;
        let name = format!(
            "{}{}-{}",
            self.container_prefix, launch.app, launch.instance_id
        );
        let mut labels = HashMap::from([
            ("berth.instance".to_string(), launch.instance_id.to_string()),
            ("berth.app".to_string(), launch.app.to_string()),
            ("berth.node".to_string(), self.node.clone()),
        ]);
        if let Some(d) = launch.deployment_id {
            labels.insert("berth.deployment".to_string(), d.to_string());
        }
        let resources = launch.spec.resources.as_ref();
        let host_config = HostConfig {
            network_mode: Some("host".into()),
            memory: resources.and_then(|r| r.memory).map(|m| m.0 as i64),
            nano_cpus: resources.and_then(|r| r.cpus).map(|c| (c * 1e9) as i64),
            security_opt: Some(vec!["no-new-privileges".into()]),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            cmd: launch.spec.command.clone(),
            env: Some(
                launch
                    .env()
                    .into_iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect(),
            ),
            labels: Some(labels),
            host_config: Some(host_config),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        let created = match docker
            .create_container(Some(options.clone()), body.clone())
            .await
        {
            Ok(c) => c,
            // A container of this name left behind (a crash between create and the row
            // update): it is ours by name and label, so replace it.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => {
                self.remove_container(&name).await?;
                docker
                    .create_container(Some(options), body)
                    .await
                    .map_err(|e| docker_error(&e))?
            }
            Err(e) => return Err(docker_error(&e)),
        };
        if let Err(e) = docker.start_container(&created.id, None).await {
            let _ = self.remove_container(&created.id).await;
            return Err(docker_error(&e));
        }
        Ok(self.watch_container(docker, created.id, &launch.logs, "all"))
    }

    /// Follows a container's output into `logs` and its exit into the process's channel.
    fn watch_container(&self, docker: &Docker, id: String, logs: &LogRing, tail: &str) -> Process {
        let (tx, rx) = oneshot::channel();
        let options = LogsOptionsBuilder::new()
            .follow(true)
            .stdout(true)
            .stderr(true)
            .tail(tail)
            .build();
        let mut stream = docker.logs(&id, Some(options));
        let ring = logs.clone();
        let log_task = tokio::spawn(async move {
            while let Some(Ok(chunk)) = stream.next().await {
                ring.push(&chunk.to_string());
            }
        });
        let (docker, container) = (docker.clone(), id.clone());
        tokio::spawn(async move {
            let exit = wait_container(&docker, &container).await;
            // The last lines may still be in flight on the log stream.
            let _ = tokio::time::timeout(Duration::from_millis(500), log_task).await;
            let _ = tx.send(exit);
        });
        Process {
            runtime_id: id,
            exited: rx,
            kind: Kind::Container,
        }
    }

    async fn collect_logs(&self, docker: &Docker, id: &str, logs: &LogRing) {
        let options = LogsOptionsBuilder::new()
            .stdout(true)
            .stderr(true)
            .tail("50")
            .build();
        let mut stream = docker.logs(id, Some(options));
        while let Some(Ok(chunk)) = stream.next().await {
            logs.push(&chunk.to_string());
        }
    }

    async fn start_child(&self, launch: &Launch<'_>) -> Result<Process, String> {
        let argv = launch
            .spec
            .command
            .as_ref()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| "runtime exec needs a command".to_string())?;
        let dir = self.exec_dir.join(launch.instance_id.to_string());
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let mut command = tokio::process::Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .env_clear()
            .env(
                "PATH",
                std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
            )
            .envs(launch.env())
            .current_dir(&dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            // Its own process group, so a stop reaches everything it started.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = command
            .spawn()
            .map_err(|e| format!("starting {}: {e}", argv[0]))?;
        let pid = child.id().ok_or("the process exited at once")? as i32;
        for reader in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Send + Unpin>),
        ]
        .into_iter()
        .flatten()
        {
            let ring = launch.logs.clone();
            tokio::spawn(async move {
                let mut lines = tokio::io::BufReader::new(reader).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    ring.push(&line);
                }
            });
        }
        let (tx, rx) = oneshot::channel();
        tokio::spawn(async move {
            let exit = match child.wait().await {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    Exit {
                        code: status
                            .code()
                            .map(i64::from)
                            .or(status.signal().map(|s| 128 + i64::from(s))),
                        message: String::new(),
                    }
                }
                Err(e) => Exit {
                    code: None,
                    message: e.to_string(),
                },
            };
            let _ = tx.send(exit);
        });
        Ok(Process {
            runtime_id: pid.to_string(),
            exited: rx,
            kind: Kind::Child { pid },
        })
    }
}

/// What [`Runtimes::adopt`] found.
pub enum Adopted {
    Running(Process),
    Exited(Exit),
}

async fn wait_container(docker: &Docker, id: &str) -> Exit {
    loop {
        let mut wait = docker.wait_container(id, None);
        match wait.next().await {
            Some(Ok(response)) => {
                return Exit {
                    code: Some(response.status_code),
                    message: String::new(),
                };
            }
            Some(Err(bollard::errors::Error::DockerContainerWaitError { error, code })) => {
                return Exit {
                    code: Some(code),
                    message: error,
                };
            }
            // The engine went away (restart, socket hiccup): ask again whether it runs.
            _ => match docker.inspect_container(id, None).await {
                Ok(i) if i.state.as_ref().and_then(|s| s.running) == Some(true) => {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Ok(i) => {
                    let state = i.state.unwrap_or_default();
                    let oom = state.oom_killed == Some(true);
                    return Exit {
                        code: state.exit_code,
                        message: if oom {
                            "OOMKilled".into()
                        } else {
                            state.error.unwrap_or_default()
                        },
                    };
                }
                Err(e) => {
                    return Exit {
                        code: None,
                        message: docker_error(&e),
                    };
                }
            },
        }
    }
}

/// Whether `pid` is a process this agent started for `instance_id` (its environment says
/// so), so a recycled pid is never signalled.
fn is_our_child(pid: i32, instance_id: i64) -> bool {
    let Ok(environ) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let wanted = format!("BERTH_INSTANCE={instance_id}");
    environ
        .split(|b| *b == 0)
        .any(|var| var == wanted.as_bytes())
}

fn kill_group(pid: i32, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pid), signal);
}
