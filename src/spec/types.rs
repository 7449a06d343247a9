//! The serde types of an app spec. Defaults live here so a spec's stored JSON always has
//! every field written out (and so hashes the same whether defaults were spelled or not).

use std::collections::BTreeMap;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::units::{ByteSize, SpecDuration};

pub const API_VERSION: &str = "berth/v1";

/// One app: what to run, how many, and how to reach and roll it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "berth App")]
pub struct AppSpec {
    /// Always `berth/v1`.
    #[serde(rename = "apiVersion")]
    pub api_version: String,
    /// Always `App`.
    pub kind: String,
    /// The app's name: a DNS label, unique across all sources.
    pub name: String,
    /// Build the image from a Dockerfile. Exactly one of `build`, `image` or `runtime: exec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildSpec>,
    /// Run an existing image (local, or pulled). Exactly one of `build`, `image` or `runtime: exec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// How many instances to run. 0 is allowed.
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0))]
    pub replicas: u32,
    /// The port the app listens on inside its container (bridge networking). berth also
    /// exports `PORT`, which an app on host networking must listen on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// The command to run: overrides the image's, or (with `runtime: exec`) the program on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Environment variables for the app.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Hostnames the edge routes to this app (lowercase, no port).
    #[serde(default)]
    pub domains: Vec<String>,
    /// How an instance is judged healthy. Without it, a TCP connect to the port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<HealthSpec>,
    /// How a new version replaces the old.
    #[serde(default)]
    pub deploy: DeploySpec,
    /// Limits and requests per instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// `docker` (default) runs a container; `exec` runs `command` as a process on the node.
    #[serde(default)]
    pub runtime: Runtime,
}

fn default_replicas() -> u32 {
    1
}

/// A Docker build of a folder next to the spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BuildSpec {
    /// The build context, relative to the spec file. It may not leave the source root.
    #[serde(default = "default_context")]
    pub context: String,
    /// The Dockerfile, relative to the context.
    #[serde(default = "default_dockerfile")]
    pub dockerfile: String,
    /// Build arguments (`ARG`).
    #[serde(default)]
    pub args: BTreeMap<String, String>,
    /// A stage of a multi-stage Dockerfile to build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

fn default_context() -> String {
    ".".into()
}
fn default_dockerfile() -> String {
    "Dockerfile".into()
}

/// An HTTP GET (with `path`) or TCP connect (without) health check.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    /// HTTP path to GET; a 2xx or 3xx answer is healthy. Without it, a TCP connect is tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Time between probes.
    #[serde(default = "default_interval")]
    pub interval: SpecDuration,
    /// How long one probe may take.
    #[serde(default = "default_interval")]
    pub timeout: SpecDuration,
    /// Consecutive passes before an instance is healthy.
    #[serde(default = "one")]
    pub healthy_threshold: u32,
    /// Consecutive failures before a running instance is unhealthy.
    #[serde(default = "three")]
    pub unhealthy_threshold: u32,
}

impl Default for HealthSpec {
    fn default() -> Self {
        HealthSpec {
            path: None,
            interval: default_interval(),
            timeout: default_interval(),
            healthy_threshold: 1,
            unhealthy_threshold: 3,
        }
    }
}

fn default_interval() -> SpecDuration {
    SpecDuration(Duration::from_secs(1))
}
fn one() -> u32 {
    1
}
fn three() -> u32 {
    3
}

/// How a new deployment replaces the running one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeploySpec {
    /// `rolling` replaces instances a few at a time; `recreate` stops all old ones first.
    #[serde(default)]
    pub strategy: Strategy,
    /// How many instances above `replicas` may exist during a rolling update.
    #[serde(default = "one")]
    pub max_surge: u32,
    /// How many of `replicas` may be unhealthy during a rolling update.
    #[serde(default)]
    pub max_unavailable: u32,
    /// How long an old instance keeps serving its in-flight requests before it is stopped.
    #[serde(default = "default_drain")]
    pub drain_timeout: SpecDuration,
    /// How long a rollout may take before it is declared failed (the old version keeps serving).
    #[serde(default = "default_deadline")]
    pub progress_deadline: SpecDuration,
}

impl Default for DeploySpec {
    fn default() -> Self {
        DeploySpec {
            strategy: Strategy::Rolling,
            max_surge: 1,
            max_unavailable: 0,
            drain_timeout: default_drain(),
            progress_deadline: default_deadline(),
        }
    }
}

fn default_drain() -> SpecDuration {
    SpecDuration(Duration::from_secs(30))
}
fn default_deadline() -> SpecDuration {
    SpecDuration(Duration::from_secs(300))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    #[default]
    Rolling,
    Recreate,
}

/// Resources per instance: limits for the runtime, requests for scheduling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// Memory limit, e.g. `256Mi`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<ByteSize>,
    /// CPU limit in cores, e.g. `0.5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    #[default]
    Docker,
    Exec,
}

impl AppSpec {
    /// The canonical form: hostnames lowercased without trailing dot.
    pub(super) fn normalized(mut self) -> Self {
        for d in &mut self.domains {
            if let Ok(h) = super::normalize_hostname(d) {
                *d = h;
            }
        }
        self
    }

    /// The spec as stored in Postgres: every default written out, keys sorted.
    pub fn to_canonical_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("specs always serialize")
    }

    /// SHA-256 of the canonical JSON, hex. Equal for specs that mean the same.
    pub fn spec_hash(&self) -> String {
        let bytes = serde_json::to_vec(&self.to_canonical_json()).expect("json values serialize");
        let digest = Sha256::digest(&bytes);
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The JSON Schema of a spec document, as `berth schema` prints it.
    pub fn json_schema() -> serde_json::Value {
        let schema = schemars::schema_for!(AppSpec);
        serde_json::to_value(schema).expect("schemas serialize")
    }
}
