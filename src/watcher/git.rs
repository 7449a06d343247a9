//! Git sources: fetch the branch with the `git` program (so the user's own credentials,
//! ssh keys and helpers apply), check its commit out into a work area under the data
//! directory, and apply the specs under the configured path. The fetched commit is the
//! truth: force-pushes and a branch moved back are applied like any other commit.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

use super::apply::SourceSnapshot;
use super::{WatcherDeps, apply_and_log, record_source_error};
use crate::config::GitConfig;

pub fn git_source(git: &GitConfig) -> String {
    format!("git:{}#{}:{}", git.url, git.branch, git.path)
}

/// The checkout folder of a repository and branch.
pub fn work_area(data_dir: &Path, git: &GitConfig) -> PathBuf {
    let digest = Sha256::digest(format!("{}#{}", git.url, git.branch).as_bytes());
    let id: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    data_dir.join("git").join(id)
}

async fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        // Never wait for a password prompt; credentials come from the user's git setup.
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .context("running git (is it installed?)")?;
    if !out.status.success() {
        bail!(
            "git {}: {}",
            args.first().unwrap_or(&""),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Fetches the branch and checks its commit out; returns the commit id.
pub async fn fetch_and_checkout(git_cfg: &GitConfig, dir: &Path) -> anyhow::Result<String> {
    if !dir.join(".git").exists() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        git(dir, &["init", "-q"]).await?;
    }
    let refspec = format!("+refs/heads/{}:refs/berth/head", git_cfg.branch);
    git(
        dir,
        &[
            "fetch",
            "--quiet",
            "--force",
            "--no-tags",
            &git_cfg.url,
            &refspec,
        ],
    )
    .await?;
    let commit = git(dir, &["rev-parse", "--verify", "refs/berth/head^{commit}"]).await?;
    git(
        dir,
        &["checkout", "--quiet", "--force", "--detach", &commit],
    )
    .await?;
    git(dir, &["clean", "-ffdxq"]).await?;
    Ok(commit)
}

/// Loads the specs of the checked-out commit.
pub fn load_checkout(
    git_cfg: &GitConfig,
    dir: &Path,
    commit: &str,
) -> anyhow::Result<SourceSnapshot> {
    let root = dir.join(&git_cfg.path);
    if !root.is_dir() {
        bail!("path `{}` does not exist at commit {commit}", git_cfg.path);
    }
    let loaded = crate::spec::load_paths(std::slice::from_ref(&root));
    Ok(SourceSnapshot::new(
        git_source(git_cfg),
        commit.to_string(),
        root,
        loaded,
    ))
}

/// Polls (and wakes on webhooks) until shutdown. Failures back off from 1 s up to the interval.
pub async fn watch_git(
    deps: WatcherDeps,
    git_cfg: GitConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let source = git_source(&git_cfg);
    let dir = work_area(&deps.data_dir, &git_cfg);
    let mut hooks = super::hook_wakeups(&deps.nats).await;
    let mut backoff = Duration::from_secs(1);
    let mut clean_commit: Option<String> = None;
    loop {
        let wait = match fetch_and_checkout(&git_cfg, &dir).await {
            Ok(commit) => {
                backoff = Duration::from_secs(1);
                if clean_commit.as_deref() != Some(commit.as_str()) {
                    let loaded = {
                        let (g, d, c) = (git_cfg.clone(), dir.clone(), commit.clone());
                        tokio::task::spawn_blocking(move || load_checkout(&g, &d, &c)).await?
                    };
                    match loaded {
                        Ok(snap) => match apply_and_log(&deps.pool, &snap, deps.options).await {
                            Ok(true) => clean_commit = Some(commit),
                            Ok(false) => clean_commit = None,
                            Err(e) => {
                                tracing::warn!(source = %source, error = format!("{e:#}"), "apply failed")
                            }
                        },
                        Err(e) => record_source_error(&deps.pool, &source, &format!("{e:#}")).await,
                    }
                }
                crate::events::controller::jitter(git_cfg.interval)
            }
            Err(e) => {
                tracing::warn!(source = %source, error = format!("{e:#}"), retry_in = ?backoff, "fetch failed");
                record_source_error(&deps.pool, &source, &format!("fetch failed: {e:#}")).await;
                let wait = backoff;
                backoff = (backoff * 2).min(git_cfg.interval);
                wait
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
            _ = super::next_hook(&mut hooks) => tracing::info!(source = %source, "webhook: fetching now"),
        }
    }
}

/// Checks out `revision` of the repository into `dir` (fetching the branch first), for a
/// build of that exact commit.
pub async fn checkout_revision(
    git_cfg: &GitConfig,
    dir: &Path,
    revision: &str,
) -> anyhow::Result<()> {
    fetch_and_checkout(git_cfg, dir).await?;
    git(
        dir,
        &["checkout", "--quiet", "--force", "--detach", revision],
    )
    .await
    .with_context(|| {
        format!(
            "commit {revision} is not on branch {} any more",
            git_cfg.branch
        )
    })?;
    git(dir, &["clean", "-ffdxq"]).await?;
    Ok(())
}
