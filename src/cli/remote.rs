//! CLI commands that talk to a running installation through its API: `berth status` and
//! `berth events`. The API is found by `--api-url` / BERTH_API_URL, else through the state
//! file of the `berth up` running from the data directory.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::config::ConfigError;

/// Where the API is.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiTarget {
    /// The API of a running installation (default: the `berth up` using the data directory).
    #[arg(long, env = "BERTH_API_URL")]
    api_url: Option<String>,
    /// Token for the API (only mutating calls need it).
    #[arg(long, env = "BERTH_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// The data directory of a local `berth up`.
    #[arg(long, env = "BERTH_DATA_DIR", default_value = ".berth")]
    data_dir: PathBuf,
}

impl ApiTarget {
    pub fn url(&self) -> Result<String, ConfigError> {
        if let Some(url) = self.api_url.as_ref().filter(|u| !u.is_empty()) {
            if !url.starts_with("http://") {
                return Err(ConfigError {
                    setting: "--api-url / BERTH_API_URL".into(),
                    message: format!("`{url}` is not an http:// URL"),
                });
            }
            return Ok(url.trim_end_matches('/').to_string());
        }
        crate::daemon::StateFile::read(&self.data_dir)
            .ok()
            .map(|s| s.api_url)
            .filter(|u| !u.is_empty())
            .ok_or_else(|| ConfigError {
                setting: "--api-url / BERTH_API_URL".into(),
                message: format!(
                    "not set, and no `berth up` with an api is running from the data directory {}",
                    self.data_dir.display()
                ),
            })
    }
}

type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Empty<Bytes>>;

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// GETs JSON from the API; an error answer becomes an error naming it.
async fn get_json(
    client: &HttpClient,
    target: &ApiTarget,
    base: &str,
    path: &str,
) -> anyhow::Result<Value> {
    let mut request = hyper::Request::get(format!("{base}{path}"));
    if let Some(token) = &target.api_token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = client
        .request(request.body(Empty::new())?)
        .await
        .with_context(|| format!("reaching the berth API at {base}"))?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    let value: Value = serde_json::from_slice(&body)
        .with_context(|| format!("the API answered {status} with something that is not JSON"))?;
    if !status.is_success() {
        anyhow::bail!(
            "{}",
            value["error"]
                .as_str()
                .unwrap_or(&format!("the API answered {status}"))
        );
    }
    Ok(value)
}

/// `berth status [APP]`.
pub async fn status(target: ApiTarget, app: Option<String>, json: bool) -> anyhow::Result<()> {
    let base = target.url()?;
    let client = client();
    let value = match &app {
        Some(name) => get_json(&client, &target, &base, &format!("/v1/apps/{name}")).await?,
        None => get_json(&client, &target, &base, "/v1/apps").await?,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    match app {
        None => print_apps(&value),
        Some(_) => print_app(&value),
    }
    Ok(())
}

fn age(at: &Value) -> String {
    let Some(at) = at
        .as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
    else {
        return "-".into();
    };
    let secs = (chrono::Utc::now() - at.with_timezone(&chrono::Utc))
        .num_seconds()
        .max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn short_revision(v: &Value) -> String {
    v.as_str()
        .map(|r| r.chars().take(12).collect())
        .unwrap_or_else(|| "-".into())
}

fn print_apps(apps: &Value) {
    let rows: Vec<[String; 6]> = apps
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            [
                a["name"].as_str().unwrap_or("?").to_string(),
                if a["ready"].as_bool() == Some(true) {
                    "yes"
                } else {
                    "no"
                }
                .to_string(),
                a["reason"].as_str().unwrap_or("-").to_string(),
                format!("{}/{}", a["replicas"]["ready"], a["replicas"]["desired"]),
                short_revision(&a["source_revision"]),
                age(&a["updated_at"]),
            ]
        })
        .collect();
    let header = ["APP", "READY", "REASON", "REPLICAS", "REVISION", "AGE"];
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, cell) in widths.iter_mut().zip(r) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    println!("{}", line(&header.map(String::from)));
    for r in &rows {
        println!("{}", line(r));
    }
    // The reasons' evidence, for the apps that are not ready.
    for a in apps.as_array().into_iter().flatten() {
        if a["ready"].as_bool() != Some(true)
            && let Some(m) = a["message"].as_str().filter(|m| !m.is_empty())
        {
            println!(
                "\n{}: {}",
                a["name"].as_str().unwrap_or("?"),
                first_lines(m, 6)
            );
        }
    }
}

fn first_lines(text: &str, n: usize) -> String {
    text.lines().take(n).collect::<Vec<_>>().join("\n  ")
}

fn print_app(a: &Value) {
    println!(
        "{}  ready: {}  reason: {}  replicas: {}/{}  generation: {} (observed {})  revision: {}",
        a["name"].as_str().unwrap_or("?"),
        if a["ready"].as_bool() == Some(true) {
            "yes"
        } else {
            "no"
        },
        a["reason"].as_str().unwrap_or("-"),
        a["replicas"]["ready"],
        a["replicas"]["desired"],
        a["generation"],
        a["observed_generation"],
        short_revision(&a["source_revision"]),
    );
    if let Some(m) = a["message"].as_str().filter(|m| !m.is_empty()) {
        println!("  {}", first_lines(m, 12));
    }
    if let Some(e) = a["spec_error"].as_str() {
        println!("  spec error: {e}");
    }
    println!("\nDEPLOYMENTS");
    for d in a["deployments"].as_array().into_iter().flatten() {
        println!(
            "  #{} generation {} {} {}{}",
            d["id"],
            d["generation"],
            d["status"].as_str().unwrap_or("?"),
            d["image"].as_str().unwrap_or(""),
            d["error"]
                .as_str()
                .map(|e| format!("  error: {}", first_lines(e, 3)))
                .unwrap_or_default()
        );
        for step in d["timeline"].as_array().into_iter().flatten() {
            println!(
                "      {}  {:<11} {}",
                step["at"]
                    .as_str()
                    .unwrap_or("")
                    .chars()
                    .take(23)
                    .collect::<String>(),
                step["step"].as_str().unwrap_or(""),
                step["message"].as_str().unwrap_or("")
            );
        }
    }
    if let Some(d) = a["deployments"].as_array().and_then(|d| d.first())
        && d["build"]["status"].as_str() == Some("failed")
    {
        println!("\nBUILD LOG (last lines of #{})", d["id"]);
        for l in d["build"]["log_tail"].as_array().into_iter().flatten() {
            println!("  {}", l.as_str().unwrap_or(""));
        }
    }
    println!("\nINSTANCES");
    for i in a["instances"].as_array().into_iter().flatten() {
        println!(
            "  {:<6} node {:<12} {:<10} (wants {:<7}) {:<21} restarts {}{}",
            i["id"],
            i["node"].as_str().unwrap_or("-"),
            i["state"].as_str().unwrap_or("?"),
            i["desired_state"].as_str().unwrap_or("?"),
            i["address"].as_str().unwrap_or("-"),
            i["restart_count"],
            i["last_error"]
                .as_str()
                .map(|e| format!("\n      last error: {}", first_lines(e, 8)))
                .unwrap_or_default()
        );
    }
}

/// `berth events [--follow]`: one line per event.
pub async fn events(target: ApiTarget, follow: bool, json: bool) -> anyhow::Result<()> {
    let base = target.url()?;
    let path = if follow {
        "/v1/events?follow=1"
    } else {
        "/v1/events"
    };
    let response = client()
        .request(hyper::Request::get(format!("{base}{path}")).body(Empty::new())?)
        .await
        .with_context(|| format!("reaching the berth API at {base}"))?;
    anyhow::ensure!(
        response.status().is_success(),
        "the API answered {}",
        response.status()
    );
    let mut body = response.into_body();
    let mut pending = String::new();
    let mut stdout = std::io::stdout();
    // Without --follow the server ends the stream after the history... except that SSE
    // never ends by itself: stop at the first keep-alive pause instead.
    loop {
        let frame = if follow {
            body.frame().await
        } else {
            match tokio::time::timeout(std::time::Duration::from_millis(500), body.frame()).await {
                Ok(f) => f,
                Err(_) => break,
            }
        };
        let Some(frame) = frame else { break };
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        pending.push_str(&String::from_utf8_lossy(&data));
        while let Some(end) = pending.find("\n\n") {
            let block: String = pending.drain(..end + 2).collect();
            let Some(data) = block.lines().find_map(|l| l.strip_prefix("data:")) else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(data.trim()) else {
                continue;
            };
            if json {
                writeln!(stdout, "{v}")?;
            } else {
                writeln!(
                    stdout,
                    "{}  {:<28} id {:<8} app {}{}{}",
                    v["at"]
                        .as_str()
                        .unwrap_or("")
                        .chars()
                        .take(23)
                        .collect::<String>(),
                    format!(
                        "{}.{}",
                        v["table"].as_str().unwrap_or("?"),
                        v["op"].as_str().unwrap_or("?")
                    ),
                    v["id"],
                    v["app_id"],
                    v.get("deployment_id")
                        .map(|d| format!(" deployment {d}"))
                        .unwrap_or_default(),
                    v.get("node_id")
                        .map(|n| format!(" node {n}"))
                        .unwrap_or_default(),
                )?;
            }
            stdout.flush()?;
        }
    }
    Ok(())
}
