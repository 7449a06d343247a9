//! The `berth` command line (DESIGN §5). Exit codes: 0 ok, 1 a failed check, 2 usage,
//! 64 bad configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{ConfigError, RawConfig};
use crate::daemon::Component;

mod remote;

pub const EXIT_FAILED: u8 = 1;
pub const EXIT_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "berth",
    version,
    about = "A declarative deployment reconciler",
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run berth's components in this process.
    Up {
        #[command(flatten)]
        config: Box<RawConfig>,
        /// Which components to run, comma-separated (default: all).
        #[arg(long, env = "BERTH_COMPONENTS", value_delimiter = ',')]
        components: Vec<String>,
    },
    /// Check app spec files or folders; print one located line per problem.
    Validate {
        /// Spec files or folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Apply spec files or folders once (each PATH is one source), without watching.
    Apply(SourceArgs),
    /// Show what `apply` would change; exit 1 when anything would.
    Plan(SourceArgs),
    /// Show apps (a table), or one app: deployments with their timelines, instances per
    /// node, last errors and build log tail.
    Status {
        /// One app.
        app: Option<String>,
        #[command(flatten)]
        target: remote::ApiTarget,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Print recent events; with --follow, keep printing live ones.
    Events {
        #[arg(long, short = 'f')]
        follow: bool,
        #[command(flatten)]
        target: remote::ApiTarget,
        #[arg(short = 'o', long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Print the JSON Schema of an app spec.
    Schema,
    /// Apply the database migrations and exit.
    Migrate {
        /// Postgres URL.
        #[arg(long, env = "BERTH_DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
}

/// The arguments of `apply` and `plan`.
#[derive(Debug, Clone, clap::Args)]
pub struct SourceArgs {
    /// Spec folders or files; each is one source.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Let a source that had apps become empty, deleting them all.
    #[arg(long)]
    prune_empty: bool,
    #[command(flatten)]
    target: DbTarget,
    #[arg(short = 'o', long, value_enum, default_value = "text")]
    output: Output,
}

/// Which database a one-shot command works on: the URL, or the `berth up` running from the
/// data directory.
#[derive(Debug, Clone, clap::Args)]
pub struct DbTarget {
    /// Postgres URL (default: the one of the `berth up` using the data directory).
    #[arg(long, env = "BERTH_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The data directory of a local `berth up`.
    #[arg(long, env = "BERTH_DATA_DIR", default_value = ".berth")]
    data_dir: PathBuf,
}

impl DbTarget {
    fn url(&self) -> Result<String, ConfigError> {
        if let Some(url) = self.database_url.as_ref().filter(|u| !u.is_empty()) {
            return Ok(url.clone());
        }
        crate::daemon::StateFile::read(&self.data_dir)
            .map(|s| s.database_url)
            .map_err(|_| ConfigError {
                setting: "--database-url / BERTH_DATABASE_URL".into(),
                message: format!(
                    "not set, and no `berth up` is running from the data directory {}",
                    self.data_dir.display()
                ),
            })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// Runs a parsed command line and maps the outcome to an exit code.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Validate { paths, output } => validate(&paths, output),
        Command::Apply(args) => apply_or_plan(&args, true),
        Command::Plan(args) => apply_or_plan(&args, false),
        Command::Status {
            app,
            target,
            output,
        } => {
            if let Err(e) = target.url() {
                return config_exit(e);
            }
            runtime_exit(remote::status(target, app, output == Output::Json))
        }
        Command::Events {
            follow,
            target,
            output,
        } => {
            if let Err(e) = target.url() {
                return config_exit(e);
            }
            runtime_exit(remote::events(target, follow, output == Output::Json))
        }
        Command::Schema => {
            println!("{}", schema_text());
            ExitCode::SUCCESS
        }
        Command::Migrate { database_url } => {
            crate::telemetry::init("info", crate::config::LogFormat::Text);
            runtime_exit(async move {
                let pool = crate::db::connect(&database_url, 2)
                    .await
                    .context("connecting to postgres")?;
                crate::db::migrate(&pool).await.context("migrating")?;
                let version: Option<i64> =
                    sqlx::query_scalar("select max(version) from _sqlx_migrations")
                        .fetch_one(&pool)
                        .await?;
                println!("database is at migration {}", version.unwrap_or(0));
                Ok(())
            })
        }
        Command::Up { config, components } => {
            let config = match config.validate() {
                Ok(c) => c,
                Err(e) => return config_exit(e),
            };
            let components = if components.is_empty() {
                Component::ALL.to_vec()
            } else {
                let mut parsed = Vec::new();
                for name in &components {
                    match name.trim().parse::<Component>() {
                        Ok(c) if !parsed.contains(&c) => parsed.push(c),
                        Ok(_) => {}
                        Err(message) => {
                            return config_exit(ConfigError {
                                setting: "--components / BERTH_COMPONENTS".into(),
                                message,
                            });
                        }
                    }
                }
                parsed
            };
            crate::telemetry::init(&config.log, config.log_format);
            runtime_exit(crate::daemon::up(config, components))
        }
    }
}

/// The schema exactly as checked in at specs/app.schema.json.
pub fn schema_text() -> String {
    serde_json::to_string_pretty(&crate::spec::AppSpec::json_schema()).expect("schemas serialize")
}

fn config_exit(e: ConfigError) -> ExitCode {
    eprintln!("berth: {e}");
    ExitCode::from(EXIT_CONFIG)
}

fn runtime_exit(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("berth: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth: {e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn validate(paths: &[PathBuf], output: Output) -> ExitCode {
    let loaded = crate::spec::load_paths(paths);
    match output {
        Output::Text => {
            for e in &loaded.errors {
                println!("{e}");
            }
            if loaded.errors.is_empty() {
                eprintln!("{} app(s) valid", loaded.apps.len());
            } else {
                eprintln!(
                    "{} problem(s), {} app(s) valid",
                    loaded.errors.len(),
                    loaded.apps.len()
                );
            }
        }
        Output::Json => {
            let errors: Vec<_> = loaded
                .errors
                .iter()
                .map(|e| {
                    serde_json::json!({
                        "file": e.file.display().to_string(),
                        "line": e.pos.line,
                        "column": e.pos.col,
                        "field": e.field,
                        "message": e.message,
                    })
                })
                .collect();
            let apps: Vec<_> = loaded
                .apps
                .iter()
                .map(|a| serde_json::json!({"name": a.spec.name, "file": a.file.display().to_string(), "spec_hash": a.spec.spec_hash()}))
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({"apps": apps, "errors": errors}))
                    .unwrap()
            );
        }
    }
    if loaded.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    }
}

/// Loads each PATH as one source: a folder, or a single file (its own source).
fn load_source(path: &std::path::Path) -> anyhow::Result<crate::watcher::apply::SourceSnapshot> {
    use sha2::Digest;
    if path.is_dir() {
        return crate::watcher::load_folder(path)
            .ok_or_else(|| anyhow::anyhow!("{}: folder is missing", path.display()));
    }
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let digest = sha2::Sha256::digest(&bytes);
    let abs = std::path::absolute(path)?;
    Ok(crate::watcher::apply::SourceSnapshot::new(
        format!("file:{}", abs.display()),
        crate::watcher::apply::revision_of(&digest),
        path.parent().map(|p| p.to_path_buf()).unwrap_or_default(),
        crate::spec::load_paths(&[path.to_path_buf()]),
    )
    .with_builds_in_revision())
}

fn apply_or_plan(args: &SourceArgs, write: bool) -> ExitCode {
    let SourceArgs {
        paths,
        prune_empty,
        target,
        output,
    } = args;
    let (prune_empty, output) = (*prune_empty, *output);
    use crate::watcher::apply::{self, ApplyOptions, Change};
    let url = match target.url() {
        Ok(u) => u,
        Err(e) => return config_exit(e),
    };
    let mut sources = Vec::new();
    for p in paths {
        match load_source(p) {
            Ok(s) => sources.push(s),
            Err(e) => {
                eprintln!("berth: {e:#}");
                return ExitCode::from(EXIT_FAILED);
            }
        }
    }
    let options = ApplyOptions { prune_empty };
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(async {
                let pool = crate::db::connect(&url, 2)
                    .await
                    .context("connecting to postgres")?;
                let mut plans = Vec::new();
                for s in &sources {
                    plans.push(if write {
                        apply::apply(&pool, s, options).await?
                    } else {
                        apply::plan(&pool, s, options).await?
                    });
                }
                Ok::<_, anyhow::Error>(plans)
            })
        });
    let plans = match result {
        Ok(p) => p,
        Err(e) => {
            eprintln!("berth: {e:#}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    if output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&plans).expect("plans serialize")
        );
    } else {
        for plan in &plans {
            println!("source {} (revision {})", plan.source, plan.revision);
            let mut unchanged = 0;
            for c in &plan.changes {
                match c {
                    Change::Create { name } => println!("  + {name}: create"),
                    Change::Update { name, fields } => {
                        println!("  ~ {name}: update {}", fields.join(", "))
                    }
                    Change::Delete { name } => println!("  - {name}: delete"),
                    Change::Invalid { name, error } => {
                        println!("  ! {name}: invalid, keeps its running version: {error}")
                    }
                    Change::Clear { name } => {
                        println!("  ~ {name}: spec fixed, back to the running version")
                    }
                    Change::Unchanged { .. } => unchanged += 1,
                }
            }
            for e in &plan.errors {
                println!("  error: {e}");
            }
            if let Some(r) = &plan.refused {
                println!("  refused: {r}");
            }
            println!("  {unchanged} unchanged");
        }
    }
    let failed = plans
        .iter()
        .any(|p| p.refused.is_some() || !p.errors.is_empty());
    let changed = plans.iter().any(|p| p.has_changes());
    if failed || (!write && changed) {
        ExitCode::from(EXIT_FAILED)
    } else {
        ExitCode::SUCCESS
    }
}
