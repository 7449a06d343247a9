//! The `berth` command line (DESIGN §5). Exit codes: 0 ok, 1 a failed check, 2 usage,
//! 64 bad configuration.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::config::{ConfigError, RawConfig};
use crate::daemon::Component;

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
    /// Print the JSON Schema of an app spec.
    Schema,
    /// Apply the database migrations and exit.
    Migrate {
        /// Postgres URL.
        #[arg(long, env = "BERTH_DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
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
