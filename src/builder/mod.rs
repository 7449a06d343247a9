//! The builder: image builds become images.
//!
//! Any number of builders run. Each reconciles builds by deployment id: it claims a pending
//! build (or one whose lease expired: its builder died) with `for update skip locked`,
//! renews the lease while it works, and finishes in one transaction guarded by its claim,
//! so a build records at most one image even when two builders raced for it.
//!
//! - `build:` specs: the context (the spec's folder, or the Git checkout of the deployment's
//!   revision) is sent to the Docker engine, tagged `berth/<app>:<deployment id>`; every
//!   line of the engine's stream goes to the stored log, an `errorDetail` fails the build
//!   with its message and the failing step.
//! - `image:` specs: the local image, or a pull; its id and digest are recorded.
//! - `runtime: exec`: nothing to build (the agent checks the program exists).
//!
//! A build whose deployment was cancelled or superseded meanwhile is stopped and marked
//! cancelled. Docker calls live here and in the agent only.

pub mod context;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use bollard::Docker;
use futures_util::StreamExt;
use sqlx::{PgPool, Row};

use crate::events::EventPayload;
use crate::events::controller::{Action, Reconciler};
use crate::spec::{AppSpec, Runtime};

/// What a builder needs.
#[derive(Clone)]
pub struct BuilderDeps {
    pub pool: PgPool,
    pub docker: Docker,
    /// This builder's name in `claimed_by`.
    pub id: String,
    /// Where Git checkouts for builds go.
    pub data_dir: PathBuf,
    pub options: BuilderOptions,
}

#[derive(Debug, Clone)]
pub struct BuilderOptions {
    /// How long a claim lasts without renewal; renewed every third of it.
    pub lease: Duration,
    /// A build taking longer fails.
    pub timeout: Duration,
    /// Claims of one build (a builder dying mid-build counts) before it fails for good.
    pub max_attempts: i32,
    /// Builds at once (the controller's concurrency).
    pub concurrency: usize,
}

impl Default for BuilderOptions {
    fn default() -> Self {
        BuilderOptions {
            lease: Duration::from_secs(30),
            timeout: Duration::from_secs(15 * 60),
            max_attempts: 3,
            concurrency: 2,
        }
    }
}

pub struct Builder {
    deps: BuilderDeps,
}

impl Builder {
    pub fn new(deps: BuilderDeps) -> Arc<Builder> {
        Arc::new(Builder { deps })
    }
}

/// Why a build stopped without an image.
#[derive(Debug)]
enum Outcome {
    Failed(String),
    Cancelled,
    /// Another builder holds the claim now (our lease ran out): leave the build alone.
    LostClaim,
}

/// A claimed build.
struct Claim {
    build_id: i64,
    deployment_id: i64,
    app_id: i64,
    app_name: String,
    spec: AppSpec,
    source: String,
    source_file: Option<String>,
    revision: Option<String>,
}

impl Reconciler for Builder {
    type Key = i64;

    fn name(&self) -> &'static str {
        "builder"
    }

    fn keys_for(&self, event: &EventPayload) -> Vec<i64> {
        match event.table.as_str() {
            "image_build" | "deployment" => event.deployment_id.into_iter().collect(),
            _ => vec![],
        }
    }

    async fn list_keys(&self) -> anyhow::Result<Vec<i64>> {
        Ok(sqlx::query_scalar(
            "select deployment_id from image_builds
             where status = 'pending' or (status = 'running' and (lease_expires_at < now() or claimed_by = $1))",
        )
        .bind(&self.deps.id)
        .fetch_all(&self.deps.pool)
        .await?)
    }

    async fn reconcile(&self, deployment_id: &i64) -> anyhow::Result<Action> {
        let Some(claim) = self.claim(*deployment_id).await? else {
            // Someone else's running build: look again when its lease would expire.
            let lease: Option<chrono::DateTime<chrono::Utc>> = sqlx::query_scalar(
                "select lease_expires_at from image_builds where deployment_id = $1 and status = 'running' and claimed_by <> $2",
            )
            .bind(deployment_id)
            .bind(&self.deps.id)
            .fetch_optional(&self.deps.pool)
            .await?
            .flatten();
            return Ok(match lease {
                Some(at) => Action::RequeueAfter(
                    (at - chrono::Utc::now()).to_std().unwrap_or_default()
                        + Duration::from_millis(100),
                ),
                None => Action::Done,
            });
        };
        let build_id = claim.build_id;
        let span = tracing::info_span!("build", build.id = build_id, app.name = %claim.app_name, deployment.id = claim.deployment_id);
        let result = tracing::Instrument::instrument(self.run_claimed(&claim), span).await;
        match result {
            Ok(image) => self.complete(&claim, image).await?,
            Err(Outcome::Failed(message)) => self.fail(&claim, &message).await?,
            Err(Outcome::Cancelled) => self.cancel(build_id).await?,
            Err(Outcome::LostClaim) => tracing::warn!(
                build.id = build_id,
                "lost the claim; another builder has the build"
            ),
        }
        Ok(Action::Done)
    }
}

/// The image a build produced.
struct BuiltImage {
    reference: String,
    digest: Option<String>,
}

impl Builder {
    /// Claims the build of `deployment_id` if it is pending or its lease expired.
    async fn claim(&self, deployment_id: i64) -> anyhow::Result<Option<Claim>> {
        let pool = &self.deps.pool;
        // A build of a deployment that is no longer wanted is cancelled, claimed or not.
        let cancelled = sqlx::query(
            "update image_builds b set status = 'cancelled', finished_at = now(), lease_expires_at = null
             from deployments d
             where b.deployment_id = $1 and d.id = b.deployment_id and b.status in ('pending', 'running')
               and d.status in ('cancelled', 'superseded', 'failed')",
        )
        .bind(deployment_id)
        .execute(pool)
        .await?;
        if cancelled.rows_affected() > 0 {
            return Ok(None);
        }
        let lease_ms = self.deps.options.lease.as_millis() as i64;
        let row = sqlx::query(
            "update image_builds set status = 'running', claimed_by = $2, attempts = attempts + 1,
                 lease_expires_at = now() + make_interval(secs => $3::double precision / 1000),
                 started_at = coalesce(started_at, now()), error = null
             where id = (select id from image_builds
                         where deployment_id = $1
                           and (status = 'pending' or (status = 'running' and lease_expires_at < now()))
                         for update skip locked)
             returning id, attempts",
        )
        .bind(deployment_id)
        .bind(&self.deps.id)
        .bind(lease_ms)
        .fetch_optional(pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let build_id: i64 = row.get(0);
        let attempts: i32 = row.get(1);
        let d = sqlx::query(
            "select d.app_id, a.name, d.spec, a.source, a.source_file, d.source_revision
             from deployments d join apps a on a.id = d.app_id where d.id = $1",
        )
        .bind(deployment_id)
        .fetch_one(pool)
        .await?;
        let spec: AppSpec =
            serde_json::from_value(d.get("spec")).context("reading the deployment's spec")?;
        let claim = Claim {
            build_id,
            deployment_id,
            app_id: d.get("app_id"),
            app_name: d.get("name"),
            spec,
            source: d.get("source"),
            source_file: d.get("source_file"),
            revision: d.get("source_revision"),
        };
        if attempts > self.deps.options.max_attempts {
            self.fail(
                &claim,
                &format!(
                    "gave up after {} attempts (builders died or lost their lease)",
                    attempts - 1
                ),
            )
            .await?;
            return Ok(None);
        }
        sqlx::query(
            "update deployments set status = 'building', building_at = now(),
                 timeline = timeline || jsonb_build_array(jsonb_build_object('at', now(), 'step', 'building', 'message', $2::text))
             where id = $1 and status = 'pending'",
        )
        .bind(deployment_id)
        .bind(format!("claimed by builder {} (attempt {attempts})", self.deps.id))
        .execute(pool)
        .await?;
        tracing::info!(build.id = build_id, attempt = attempts, "build claimed");
        Ok(Some(claim))
    }

    /// Runs the build while renewing the lease and watching for cancellation.
    async fn run_claimed(&self, claim: &Claim) -> Result<Option<BuiltImage>, Outcome> {
        let log = LogSink::new(self.deps.pool.clone(), claim.build_id);
        let work = self.produce(claim, &log);
        let guard = self.guard(claim);
        let result = tokio::select! {
            r = tokio::time::timeout(self.deps.options.timeout, work) => match r {
                Ok(r) => r,
                Err(_) => Err(Outcome::Failed(format!("timed out after {}", crate::spec::units::format_duration(self.deps.options.timeout)))),
            },
            stop = guard => Err(stop),
        };
        log.flush().await;
        result
    }

    /// Renews the lease every third of it; resolves when the build must stop.
    async fn guard(&self, claim: &Claim) -> Outcome {
        let every = self.deps.options.lease / 3;
        loop {
            tokio::time::sleep(every).await;
            let renewed = sqlx::query(
                "update image_builds set lease_expires_at = now() + make_interval(secs => $3::double precision / 1000)
                 where id = $1 and claimed_by = $2 and status = 'running'",
            )
            .bind(claim.build_id)
            .bind(&self.deps.id)
            .bind(self.deps.options.lease.as_millis() as i64)
            .execute(&self.deps.pool)
            .await;
            match renewed {
                Ok(r) if r.rows_affected() == 0 => return Outcome::LostClaim,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot renew the build lease"),
            }
            let status: Result<String, _> =
                sqlx::query_scalar("select status from deployments where id = $1")
                    .bind(claim.deployment_id)
                    .fetch_one(&self.deps.pool)
                    .await;
            if matches!(status.as_deref(), Ok("cancelled" | "superseded" | "failed")) {
                return Outcome::Cancelled;
            }
        }
    }

    /// Produces the image of the claim's spec.
    async fn produce(&self, claim: &Claim, log: &LogSink) -> Result<Option<BuiltImage>, Outcome> {
        let spec = &claim.spec;
        if spec.runtime == Runtime::Exec {
            log.line("runtime exec: nothing to build");
            return Ok(None);
        }
        if let Some(image) = &spec.image {
            return self.resolve_image(image, log).await.map(Some);
        }
        let build = spec
            .build
            .as_ref()
            .ok_or_else(|| Outcome::Failed("the spec has neither build nor image".into()))?;
        let context_dir = self
            .context_dir(claim)
            .await
            .map_err(|e| Outcome::Failed(format!("{e:#}")))?;
        let context = context_dir.join(&build.context);
        log.line(&format!("context {}", context.display()));
        let tar = tokio::task::spawn_blocking(move || context::tar_context(&context))
            .await
            .map_err(|e| Outcome::Failed(e.to_string()))?
            .map_err(|e| Outcome::Failed(e.to_string()))?;
        let tag = format!("berth/{}:{}", claim.app_name, claim.deployment_id);
        let args: HashMap<String, String> = build
            .args
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut options = bollard::query_parameters::BuildImageOptionsBuilder::new()
            .dockerfile(&build.dockerfile)
            .t(&tag)
            .rm(true)
            .forcerm(true)
            // Builders run where the engine may have no bridge network.
            .networkmode("host")
            .buildargs(&args);
        if let Some(target) = &build.target {
            options = options.target(target);
        }
        let mut stream = self.deps.docker.build_image(
            options.build(),
            None,
            Some(bollard::body_full(bytes::Bytes::from(tar))),
        );
        let mut step = String::new();
        let failed = |step: &str, message: String| {
            log.line(&format!("error: {message}"));
            Outcome::Failed(if step.is_empty() {
                message
            } else {
                format!("{step}: {message}")
            })
        };
        while let Some(item) = stream.next().await {
            // bollard turns the engine's `errorDetail` into a stream error.
            let info = item.map_err(|e| failed(&step, docker_error(&e)))?;
            if let Some(text) = info.stream.as_deref() {
                for line in text.lines() {
                    if line.starts_with("Step ") {
                        step = line.to_string();
                    }
                    log.line(line);
                }
            }
            if let Some(status) = info.status.as_deref() {
                log.line(status);
            }
            log.maybe_flush().await;
            if let Some(detail) = info.error_detail {
                return Err(failed(
                    &step,
                    detail.message.unwrap_or_else(|| "the build failed".into()),
                ));
            }
        }
        let inspect = self
            .deps
            .docker
            .inspect_image(&tag)
            .await
            .map_err(|e| Outcome::Failed(docker_error(&e)))?;
        Ok(Some(BuiltImage {
            reference: tag,
            digest: inspect.id,
        }))
    }

    /// The local image, or a pull of it.
    async fn resolve_image(&self, image: &str, log: &LogSink) -> Result<BuiltImage, Outcome> {
        if let Ok(found) = self.deps.docker.inspect_image(image).await {
            log.line(&format!("using the local image {image}"));
            let digest = found
                .repo_digests
                .and_then(|d| d.into_iter().next())
                .or(found.id);
            return Ok(BuiltImage {
                reference: image.to_string(),
                digest,
            });
        }
        log.line(&format!("pulling {image}"));
        let options = bollard::query_parameters::CreateImageOptionsBuilder::new()
            .from_image(image)
            .build();
        let mut pull = self.deps.docker.create_image(Some(options), None, None);
        while let Some(item) = pull.next().await {
            let info = item
                .map_err(|e| Outcome::Failed(format!("pulling {image}: {}", docker_error(&e))))?;
            if let Some(status) = info.status {
                log.line(&status);
            }
        }
        let found = self
            .deps
            .docker
            .inspect_image(image)
            .await
            .map_err(|e| Outcome::Failed(docker_error(&e)))?;
        let digest = found
            .repo_digests
            .and_then(|d| d.into_iter().next())
            .or(found.id);
        Ok(BuiltImage {
            reference: image.to_string(),
            digest,
        })
    }

    /// The folder the spec's paths are relative to: the spec file's folder in a folder
    /// source, or in a checkout of the deployment's revision for a Git source.
    async fn context_dir(&self, claim: &Claim) -> anyhow::Result<PathBuf> {
        let file = claim.source_file.clone().unwrap_or_default();
        let file_dir = Path::new(&file)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        if let Some(folder) = claim.source.strip_prefix("folder:") {
            return Ok(Path::new(folder).join(file_dir));
        }
        if let Some(file_source) = claim.source.strip_prefix("file:") {
            return Ok(Path::new(file_source)
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default());
        }
        let Some(rest) = claim.source.strip_prefix("git:") else {
            return Err(anyhow!("unknown source `{}`", claim.source));
        };
        let (url, branch_path) = rest
            .rsplit_once('#')
            .ok_or_else(|| anyhow!("bad git source `{}`", claim.source))?;
        let (branch, path) = branch_path.split_once(':').unwrap_or((branch_path, "."));
        let revision = claim
            .revision
            .clone()
            .ok_or_else(|| anyhow!("the deployment has no revision"))?;
        let git = crate::config::GitConfig {
            url: url.to_string(),
            branch: branch.to_string(),
            path: path.to_string(),
            interval: Duration::from_secs(30),
            webhook_secret: None,
        };
        let dir = self
            .deps
            .data_dir
            .join("builds")
            .join(claim.deployment_id.to_string());
        crate::watcher::git::checkout_revision(&git, &dir, &revision).await?;
        Ok(dir.join(path).join(file_dir))
    }

    /// Success: the image, the deployment deploying and the build completed, in one
    /// transaction that only the claim holder can commit.
    async fn complete(&self, claim: &Claim, image: Option<BuiltImage>) -> anyhow::Result<()> {
        let mut tx = self.deps.pool.begin().await?;
        let still_ours: Option<i64> = sqlx::query_scalar(
            "select id from image_builds where id = $1 and claimed_by = $2 and status = 'running' for update",
        )
        .bind(claim.build_id)
        .bind(&self.deps.id)
        .fetch_optional(&mut *tx)
        .await?;
        if still_ours.is_none() {
            tracing::warn!(
                build.id = claim.build_id,
                "the build is no longer ours; dropping the result"
            );
            return Ok(());
        }
        let image_id: Option<i64> = match &image {
            Some(img) => Some(
                sqlx::query_scalar("insert into images (app_id, reference, digest) values ($1, $2, $3) returning id")
                    .bind(claim.app_id)
                    .bind(&img.reference)
                    .bind(&img.digest)
                    .fetch_one(&mut *tx)
                    .await?,
            ),
            None => None,
        };
        sqlx::query(
            "update image_builds set status = 'completed', image_id = $2, finished_at = now(), lease_expires_at = null where id = $1",
        )
        .bind(claim.build_id)
        .bind(image_id)
        .execute(&mut *tx)
        .await?;
        let message = match &image {
            Some(img) => format!(
                "image {} ({})",
                img.reference,
                img.digest.as_deref().unwrap_or("no digest")
            ),
            None => "nothing to build".to_string(),
        };
        sqlx::query(
            "update deployments set status = 'deploying', image_id = $2, deploying_at = now(),
                 timeline = timeline || jsonb_build_array(jsonb_build_object('at', now(), 'step', 'deploying', 'message', $3::text))
             where id = $1 and status = 'building'",
        )
        .bind(claim.deployment_id)
        .bind(image_id)
        .bind(&message)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(build.id = claim.build_id, "{message}");
        Ok(())
    }

    /// Failure: the build and deployment failed with the message; the app's status says
    /// BuildFailed with the last lines of the log. Its running version is untouched.
    async fn fail(&self, claim: &Claim, message: &str) -> anyhow::Result<()> {
        let mut tx = self.deps.pool.begin().await?;
        let log: Option<String> = sqlx::query_scalar(
            "update image_builds set status = 'failed', error = $2, finished_at = now(), lease_expires_at = null
             where id = $1 and status in ('pending', 'running') returning log",
        )
        .bind(claim.build_id)
        .bind(message)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(log) = log else { return Ok(()) };
        sqlx::query(
            "update deployments set status = 'failed', error = $2, failed_at = now(),
                 timeline = timeline || jsonb_build_array(jsonb_build_object('at', now(), 'step', 'failed', 'message', $2::text))
             where id = $1 and status in ('pending', 'building')",
        )
        .bind(claim.deployment_id)
        .bind(message)
        .execute(&mut *tx)
        .await?;
        let tail: Vec<&str> = log
            .lines()
            .rev()
            .take(10)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let status_message = format!("{message}\n{}", tail.join("\n"));
        sqlx::query(
            "update apps set status = jsonb_build_object('ready', coalesce((status->>'ready')::boolean, false),
                 'reason', 'BuildFailed', 'message', $2::text)
             where id = $1 and generation = (select generation from deployments where id = $3)",
        )
        .bind(claim.app_id)
        .bind(status_message)
        .bind(claim.deployment_id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::warn!(build.id = claim.build_id, "build failed: {message}");
        Ok(())
    }

    async fn cancel(&self, build_id: i64) -> anyhow::Result<()> {
        sqlx::query(
            "update image_builds set status = 'cancelled', finished_at = now(), lease_expires_at = null
             where id = $1 and status = 'running'",
        )
        .bind(build_id)
        .execute(&self.deps.pool)
        .await?;
        tracing::info!(
            build.id = build_id,
            "build cancelled: its deployment is no longer wanted"
        );
        Ok(())
    }
}

fn docker_error(e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message.clone(),
        bollard::errors::Error::DockerStreamError { error } => error.clone(),
        other => other.to_string(),
    }
}

/// Buffers log lines for `image_builds.log`, written at most every 250 ms and at the end.
struct LogSink {
    pool: PgPool,
    build_id: i64,
    pending: std::sync::Mutex<(String, std::time::Instant)>,
}

impl LogSink {
    fn new(pool: PgPool, build_id: i64) -> LogSink {
        LogSink {
            pool,
            build_id,
            pending: std::sync::Mutex::new((String::new(), std::time::Instant::now())),
        }
    }

    fn line(&self, line: &str) {
        let mut p = self.pending.lock().expect("log lock");
        p.0.push_str(line.trim_end());
        p.0.push('\n');
    }

    /// Writes the buffered lines if the last write is 250 ms old (in order: awaited).
    async fn maybe_flush(&self) {
        let due = self.pending.lock().expect("log lock").1.elapsed() > Duration::from_millis(250);
        if due {
            self.flush().await;
        }
    }

    fn take(&self) -> String {
        let mut p = self.pending.lock().expect("log lock");
        p.1 = std::time::Instant::now();
        std::mem::take(&mut p.0)
    }

    async fn flush(&self) {
        let text = self.take();
        append_log(&self.pool, self.build_id, &text).await;
    }
}

/// Appends to a build's log, keeping its last 256 KiB.
async fn append_log(pool: &PgPool, build_id: i64, text: &str) {
    if text.is_empty() {
        return;
    }
    let res = sqlx::query("update image_builds set log = right(log || $2, 262144) where id = $1")
        .bind(build_id)
        .bind(text)
        .execute(pool)
        .await;
    if let Err(e) = res {
        tracing::warn!(build.id = build_id, error = %e, "cannot store build log lines");
    }
}
