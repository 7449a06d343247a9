//! The watcher: folders and Git repositories of specs become apps and deployments.
//!
//! One watcher leads (advisory lock); it runs one task per configured source. A folder is
//! watched with `notify` (debounced) plus a periodic rescan; a Git repository is fetched
//! every interval, or at once when `POST /v1/hooks/git` publishes on [`GIT_HOOK_SUBJECT`].
//! Each revision goes through [`apply::apply`], the same code path as `berth apply`.
//!
//! Invariants: a folder that is missing is an error on the source, never a deletion of its
//! apps; an unchanged revision is not applied again (and would change nothing if it were).

pub mod apply;
pub mod git;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;
use notify::Watcher as _;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::GitConfig;
use apply::{ApplyOptions, SourceSnapshot};

/// Core NATS subject (not in the stream) the API publishes on when a Git webhook arrives.
pub const GIT_HOOK_SUBJECT: &str = "berth.hooks.git";

/// What the watcher needs.
#[derive(Clone)]
pub struct WatcherDeps {
    pub pool: PgPool,
    /// For its own leadership connection.
    pub database_url: String,
    /// Webhook wake-ups; without NATS the watcher only polls.
    pub nats: Option<async_nats::Client>,
    pub specs: Option<PathBuf>,
    pub git: Option<GitConfig>,
    /// Where Git checkouts live.
    pub data_dir: PathBuf,
    pub options: ApplyOptions,
    /// Quiet time after a file event before a rescan.
    pub debounce: Duration,
    /// Period of the safety-net rescan of folders.
    pub rescan: Duration,
}

/// The source name of a folder: its absolute path as configured (not resolved: a symlinked
/// folder swapped to a new target stays the same source).
pub fn folder_source(path: &Path) -> String {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    format!("folder:{}", abs.display())
}

/// Loads a folder source. `None` when the folder is missing (an error, not an empty source).
pub fn load_folder(path: &Path) -> Option<SourceSnapshot> {
    if !path.is_dir() {
        return None;
    }
    Some(
        SourceSnapshot::new(
            folder_source(path),
            apply::folder_revision(path),
            path.to_path_buf(),
            crate::spec::load_paths(&[path.to_path_buf()]),
        )
        .with_builds_in_revision(),
    )
}

pub async fn run(deps: WatcherDeps, shutdown: CancellationToken) -> anyhow::Result<()> {
    if deps.specs.is_none() && deps.git.is_none() {
        tracing::info!("no source configured (BERTH_SPECS, BERTH_GIT_URL): the watcher idles");
        shutdown.cancelled().await;
        return Ok(());
    }
    loop {
        let Some(lead) = crate::leader::acquire(
            &deps.database_url,
            crate::leader::WATCHER_LOCK,
            "watcher",
            &shutdown,
        )
        .await
        else {
            return Ok(());
        };
        let stop = lead.lost.child_token();
        let scope = shutdown.child_token();
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(folder) = deps.specs.clone() {
            tasks.spawn(watch_folder(deps.clone(), folder, scope.clone()));
        }
        if let Some(git) = deps.git.clone() {
            tasks.spawn(git::watch_git(deps.clone(), git, scope.clone()));
        }
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = stop.cancelled() => tracing::warn!("watcher lost leadership; standing by"),
            Some(res) = tasks.join_next() => {
                scope.cancel();
                res.context("watcher task panicked")??;
            }
        }
        scope.cancel();
        while tasks.join_next().await.is_some() {}
        if shutdown.is_cancelled() {
            return Ok(());
        }
    }
}

/// Records a source-level error (missing folder, failed fetch) without touching apps.
pub async fn record_source_error(pool: &PgPool, source: &str, error: &str) {
    let res = sqlx::query(
        "insert into sources (name, error) values ($1, $2)
         on conflict (name) do update set error = excluded.error where sources.error is distinct from excluded.error",
    )
    .bind(source)
    .bind(error)
    .execute(pool)
    .await;
    if let Err(e) = res {
        tracing::warn!(source, error = %e, "cannot record the source error");
    }
}

/// Applies a loaded snapshot and logs what happened.
pub async fn apply_and_log(
    pool: &PgPool,
    snap: &SourceSnapshot,
    options: ApplyOptions,
) -> anyhow::Result<bool> {
    let plan = apply::apply(pool, snap, options)
        .await
        .context("applying specs")?;
    for e in &plan.errors {
        tracing::warn!(source = %snap.source, "invalid spec: {e}");
    }
    if let Some(r) = &plan.refused {
        tracing::error!(source = %snap.source, "{r}");
    }
    let changed: Vec<String> = plan
        .changes
        .iter()
        .filter(|c| c.is_change())
        .map(|c| format!("{c:?}"))
        .collect();
    if !changed.is_empty() {
        tracing::info!(source = %snap.source, revision = %snap.revision, changes = changed.len(), "applied: {}", changed.join(", "));
    }
    Ok(plan.refused.is_none() && plan.errors.is_empty())
}

/// Watches one folder: notify events (debounced) and a periodic rescan.
async fn watch_folder(
    deps: WatcherDeps,
    folder: PathBuf,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let source = folder_source(&folder);
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            let _ = tx.send(());
        }
    })
    .context("starting the file watcher")?;
    let mut watches = Watches::default();
    // The last revision applied without any problem; anything else is applied again.
    let mut clean_revision: Option<String> = None;
    loop {
        watches.ensure(&mut watcher, &folder);
        let scan_folder = folder.clone();
        let snap = tokio::task::spawn_blocking(move || load_folder(&scan_folder)).await?;
        match snap {
            None => {
                record_source_error(
                    &deps.pool,
                    &source,
                    &format!("folder {} is missing", folder.display()),
                )
                .await;
                clean_revision = None;
            }
            Some(snap) if clean_revision.as_deref() == Some(snap.revision.as_str()) => {}
            Some(snap) => match apply_and_log(&deps.pool, &snap, deps.options).await {
                Ok(true) => clean_revision = Some(snap.revision),
                Ok(false) => clean_revision = None,
                Err(e) => {
                    tracing::warn!(source = %source, error = format!("{e:#}"), "apply failed; retrying at the next change or rescan");
                    clean_revision = None;
                }
            },
        }
        let rescan = crate::events::controller::jitter(deps.rescan);
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(rescan) => {}
            got = rx.recv() => {
                if got.is_none() {
                    anyhow::bail!("the file watcher stopped");
                }
                debounce(&mut rx, deps.debounce).await;
            }
        }
    }
}

/// Waits until `quiet` passes without an event (at most 10 quiet periods).
async fn debounce(rx: &mut mpsc::UnboundedReceiver<()>, quiet: Duration) {
    let deadline = tokio::time::Instant::now() + quiet * 10;
    loop {
        match tokio::time::timeout(quiet, rx.recv()).await {
            Ok(Some(())) if tokio::time::Instant::now() < deadline => continue,
            _ => return,
        }
    }
}

/// The inotify watches of one folder: its parent (to see the folder or its symlink replaced)
/// and the folder's current real target, recursively.
#[derive(Default)]
struct Watches {
    parent: Option<PathBuf>,
    target: Option<PathBuf>,
}

impl Watches {
    fn ensure(&mut self, watcher: &mut notify::RecommendedWatcher, folder: &Path) {
        let parent = std::path::absolute(folder)
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf));
        if self.parent.is_none()
            && let Some(p) = parent.filter(|p| p.is_dir())
            && watcher
                .watch(&p, notify::RecursiveMode::NonRecursive)
                .is_ok()
        {
            self.parent = Some(p);
        }
        let target = folder.canonicalize().ok().filter(|t| t.is_dir());
        if target != self.target {
            if let Some(old) = self.target.take() {
                let _ = watcher.unwatch(&old);
            }
            if let Some(t) = target {
                match watcher.watch(&t, notify::RecursiveMode::Recursive) {
                    Ok(()) => self.target = Some(t),
                    Err(e) => {
                        tracing::warn!(folder = %folder.display(), error = %e, "cannot watch the folder; relying on rescans")
                    }
                }
            }
        }
    }
}

/// Subscribes to webhook wake-ups, if NATS is there.
pub async fn hook_wakeups(nats: &Option<async_nats::Client>) -> Option<async_nats::Subscriber> {
    let client = nats.as_ref()?;
    client.subscribe(GIT_HOOK_SUBJECT).await.ok()
}

/// Waits for the next webhook wake-up, or forever without a subscription.
pub async fn next_hook(sub: &mut Option<async_nats::Subscriber>) {
    match sub {
        Some(s) => {
            if s.next().await.is_none() {
                *sub = None;
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}
