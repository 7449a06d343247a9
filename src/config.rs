//! Configuration: every setting is a flag with a `BERTH_*` variable (DESIGN §5).
//!
//! clap only collects strings; [`RawConfig::validate`] turns them into a [`Config`] before
//! anything starts, so a bad value exits 64 naming the flag and the variable, and nothing
//! half-started has to be undone.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use crate::spec::units::parse_duration;

/// The settings shared by `berth up` and the commands that talk to Postgres or NATS.
#[derive(Debug, Clone, Args)]
pub struct RawConfig {
    /// Postgres URL; without it `berth up` starts a private Postgres under the data directory.
    #[arg(long, env = "BERTH_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// NATS URL; without it `berth up` starts a private nats-server under the data directory.
    #[arg(long, env = "BERTH_NATS_URL")]
    pub nats_url: Option<String>,
    /// A folder of app specs to watch.
    #[arg(long, env = "BERTH_SPECS")]
    pub specs: Option<PathBuf>,
    /// A Git repository of app specs.
    #[arg(long, env = "BERTH_GIT_URL")]
    pub git_url: Option<String>,
    /// The branch of the Git repository to follow.
    #[arg(long, env = "BERTH_GIT_BRANCH", default_value = "main")]
    pub git_branch: String,
    /// The folder inside the Git repository that holds the specs.
    #[arg(long, env = "BERTH_GIT_PATH", default_value = ".")]
    pub git_path: String,
    /// How often the Git repository is fetched.
    #[arg(long, env = "BERTH_GIT_INTERVAL", default_value = "30s")]
    pub git_interval: String,
    /// Secret for the HMAC signature of `POST /v1/hooks/git`.
    #[arg(long, env = "BERTH_GIT_WEBHOOK_SECRET", hide_env_values = true)]
    pub git_webhook_secret: Option<String>,
    /// Let a source that had apps become empty (deleting them all); refused otherwise.
    #[arg(long, env = "BERTH_PRUNE_EMPTY")]
    pub prune_empty: bool,
    /// Quiet time after a spec file changes before the folder is read.
    #[arg(long, env = "BERTH_WATCH_DEBOUNCE", default_value = "100ms")]
    pub watch_debounce: String,
    /// Period of the full rescan of spec folders (a safety net for missed file events).
    #[arg(long, env = "BERTH_RESCAN_INTERVAL", default_value = "60s")]
    pub rescan_interval: String,
    /// Where the edge listens for HTTP.
    #[arg(long, env = "BERTH_EDGE_LISTEN", default_value = "127.0.0.1:8080")]
    pub edge_listen: String,
    /// Where the edge listens for HTTPS (needs certificates in the TLS folder).
    #[arg(long, env = "BERTH_EDGE_TLS_LISTEN")]
    pub edge_tls_listen: Option<String>,
    /// A folder of certificates (`name.crt` + `name.key`) for the edge.
    #[arg(long, env = "BERTH_TLS_DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Where the API listens.
    #[arg(long, env = "BERTH_API_LISTEN", default_value = "127.0.0.1:7070")]
    pub api_listen: String,
    /// Token required by mutating API calls.
    #[arg(long, env = "BERTH_API_TOKEN", hide_env_values = true)]
    pub api_token: Option<String>,
    /// This node's name (agent); defaults to the host name.
    #[arg(long, env = "BERTH_NODE_NAME")]
    pub node_name: Option<String>,
    /// This node's labels for scheduling (agent), e.g. `zone=a,disk=ssd`.
    #[arg(long, env = "BERTH_NODE_LABELS", default_value = "")]
    pub node_labels: String,
    /// The address the edge uses to reach this node's instances.
    #[arg(long, env = "BERTH_NODE_ADDRESS", default_value = "127.0.0.1")]
    pub node_address: String,
    /// Prefix of the names of the containers the agent creates (installations sharing one
    /// Docker engine use different ones).
    #[arg(long, env = "BERTH_CONTAINER_PREFIX", default_value = "berth-")]
    pub container_prefix: String,
    /// Where berth keeps its private Postgres, NATS and state.
    #[arg(long, env = "BERTH_DATA_DIR", default_value = ".berth")]
    pub data_dir: PathBuf,
    /// Log filter, e.g. `info` or `berth=debug,sqlx=warn`.
    #[arg(long, env = "BERTH_LOG", default_value = "info")]
    pub log: String,
    /// Log format: `text` or `json`.
    #[arg(long, env = "BERTH_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

/// A configuration problem: which setting, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `--flag / BERTH_VAR`.
    pub setting: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration: {}: {}",
            self.setting, self.message
        )
    }
}

impl std::error::Error for ConfigError {}

fn err(flag: &str, message: impl Into<String>) -> ConfigError {
    let var = format!("BERTH_{}", flag.replace('-', "_").to_uppercase());
    ConfigError {
        setting: format!("--{flag} / {var}"),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// Validated settings.
#[derive(Debug, Clone)]
pub struct Config {
    pub database_url: Option<String>,
    pub nats_url: Option<String>,
    pub specs: Option<PathBuf>,
    pub git: Option<GitConfig>,
    pub prune_empty: bool,
    pub watch_debounce: Duration,
    pub rescan_interval: Duration,
    pub edge_listen: SocketAddr,
    pub edge_tls_listen: Option<SocketAddr>,
    pub tls_dir: Option<PathBuf>,
    pub api_listen: SocketAddr,
    pub api_token: Option<String>,
    pub node_name: String,
    pub node_labels: std::collections::BTreeMap<String, String>,
    pub node_address: String,
    pub container_prefix: String,
    pub data_dir: PathBuf,
    pub log: String,
    pub log_format: LogFormat,
}

#[derive(Debug, Clone)]
pub struct GitConfig {
    pub url: String,
    pub branch: String,
    pub path: String,
    pub interval: Duration,
    pub webhook_secret: Option<String>,
}

impl RawConfig {
    pub fn validate(&self) -> Result<Config, ConfigError> {
        let database_url = match &self.database_url {
            Some(u) if u.trim().is_empty() => None,
            Some(u) if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) => {
                return Err(err("database-url", "must be a postgres:// URL"));
            }
            other => other.clone(),
        };
        let nats_url = match &self.nats_url {
            Some(u) if u.trim().is_empty() => None,
            Some(u) if u.contains(char::is_whitespace) => {
                return Err(err(
                    "nats-url",
                    "must be a NATS URL such as nats://127.0.0.1:4222",
                ));
            }
            other => other.clone(),
        };
        if let Some(dir) = &self.specs
            && dir.as_os_str().is_empty()
        {
            return Err(err("specs", "must be a folder"));
        }
        let git = match &self.git_url {
            Some(url) if !url.trim().is_empty() => {
                let interval =
                    parse_duration(&self.git_interval).map_err(|e| err("git-interval", e))?;
                if interval < Duration::from_secs(1) {
                    return Err(err("git-interval", "must be at least 1s"));
                }
                if self.git_branch.trim().is_empty() {
                    return Err(err("git-branch", "must not be empty"));
                }
                if self.git_path.starts_with('/') || self.git_path.split('/').any(|p| p == "..") {
                    return Err(err(
                        "git-path",
                        "must be a relative path inside the repository",
                    ));
                }
                Some(GitConfig {
                    url: url.clone(),
                    branch: self.git_branch.clone(),
                    path: self.git_path.clone(),
                    interval,
                    webhook_secret: self.git_webhook_secret.clone().filter(|s| !s.is_empty()),
                })
            }
            _ => None,
        };
        let watch_debounce =
            parse_duration(&self.watch_debounce).map_err(|e| err("watch-debounce", e))?;
        if watch_debounce > Duration::from_secs(10) {
            return Err(err("watch-debounce", "must be at most 10s"));
        }
        let rescan_interval =
            parse_duration(&self.rescan_interval).map_err(|e| err("rescan-interval", e))?;
        if rescan_interval < Duration::from_secs(1) {
            return Err(err("rescan-interval", "must be at least 1s"));
        }
        let edge_listen = parse_addr("edge-listen", &self.edge_listen)?;
        let edge_tls_listen = match &self.edge_tls_listen {
            Some(a) if !a.is_empty() => Some(parse_addr("edge-tls-listen", a)?),
            _ => None,
        };
        let tls_dir = self.tls_dir.clone().filter(|d| !d.as_os_str().is_empty());
        if edge_tls_listen.is_some() && tls_dir.is_none() {
            return Err(err(
                "edge-tls-listen",
                "needs --tls-dir / BERTH_TLS_DIR, the folder of certificates",
            ));
        }
        if let Some(dir) = &tls_dir
            && !dir.is_dir()
        {
            return Err(err(
                "tls-dir",
                format!("`{}` is not a folder", dir.display()),
            ));
        }
        let api_listen = parse_addr("api-listen", &self.api_listen)?;
        if let Some(token) = &self.api_token
            && !token.is_empty()
            && token.len() < 16
        {
            return Err(err("api-token", "must be at least 16 characters"));
        }
        let node_name = match &self.node_name {
            Some(n) if !n.is_empty() => n.clone(),
            _ => default_node_name(),
        };
        crate::spec::validate_dns_label(&node_name).map_err(|e| err("node-name", e))?;
        if self.node_address.parse::<std::net::IpAddr>().is_err()
            && crate::spec::normalize_hostname(&self.node_address).is_err()
        {
            return Err(err(
                "node-address",
                format!("`{}` is not an IP address or hostname", self.node_address),
            ));
        }
        let mut node_labels = std::collections::BTreeMap::new();
        for pair in self
            .node_labels
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            match pair.split_once('=') {
                Some((k, v)) if !k.trim().is_empty() => {
                    node_labels.insert(k.trim().to_string(), v.trim().to_string());
                }
                _ => {
                    return Err(err(
                        "node-labels",
                        format!("`{pair}` is not key=value (expected e.g. zone=a,disk=ssd)"),
                    ));
                }
            }
        }
        if !self
            .container_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            || !self
                .container_prefix
                .starts_with(|c: char| c.is_ascii_alphanumeric())
        {
            return Err(err(
                "container-prefix",
                "must start with a letter or digit and hold only letters, digits, `-`, `_` and `.`",
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(err("data-dir", "must not be empty"));
        }
        tracing_subscriber::EnvFilter::try_new(&self.log)
            .map_err(|e| err("log", format!("`{}` is not a log filter: {e}", self.log)))?;
        let log_format = match self.log_format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(err(
                    "log-format",
                    format!("`{other}` is neither `text` nor `json`"),
                ));
            }
        };
        Ok(Config {
            database_url,
            nats_url,
            specs: self.specs.clone(),
            git,
            prune_empty: self.prune_empty,
            watch_debounce,
            rescan_interval,
            edge_listen,
            edge_tls_listen,
            tls_dir,
            api_listen,
            api_token: self.api_token.clone().filter(|t| !t.is_empty()),
            node_name,
            node_labels,
            container_prefix: self.container_prefix.clone(),
            node_address: self.node_address.clone(),
            data_dir: self.data_dir.clone(),
            log: self.log.clone(),
            log_format,
        })
    }
}

fn parse_addr(flag: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        err(
            flag,
            format!("`{value}` is not an address such as 127.0.0.1:8080"),
        )
    })
}

/// The host name, lowercased and cut to a DNS label; `node` when there is none.
fn default_node_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let name: String = raw
        .trim()
        .split('.')
        .next()
        .unwrap_or("")
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    let name = name.trim_matches('-').to_string();
    if name.is_empty() { "node".into() } else { name }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        c: RawConfig,
    }

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["t"];
        argv.extend_from_slice(args);
        T::parse_from(argv).c.validate()
    }

    #[test]
    fn defaults_are_valid() {
        let c = parse(&["--node-name", "n1"]).unwrap();
        assert_eq!(c.edge_listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.api_listen.to_string(), "127.0.0.1:7070");
        assert_eq!(c.log_format, LogFormat::Text);
    }

    #[test]
    fn bad_values_name_flag_and_variable() {
        let e = parse(&["--node-name", "n1", "--edge-listen", "nowhere"]).unwrap_err();
        assert_eq!(e.setting, "--edge-listen / BERTH_EDGE_LISTEN");
        assert!(e.message.contains("nowhere"));
        let e = parse(&["--node-name", "n1", "--log-format", "xml"]).unwrap_err();
        assert_eq!(e.setting, "--log-format / BERTH_LOG_FORMAT");
        let e = parse(&[
            "--node-name",
            "n1",
            "--git-url",
            "file:///x",
            "--git-interval",
            "soon",
        ])
        .unwrap_err();
        assert_eq!(e.setting, "--git-interval / BERTH_GIT_INTERVAL");
        let e = parse(&["--node-name", "Bad_Name"]).unwrap_err();
        assert_eq!(e.setting, "--node-name / BERTH_NODE_NAME");
        let e = parse(&["--node-name", "n1", "--database-url", "mysql://x"]).unwrap_err();
        assert_eq!(e.setting, "--database-url / BERTH_DATABASE_URL");
    }
}
