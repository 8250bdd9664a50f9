//! The `acge-proxy` command: run the proxy, check a config, or run the demo.

use std::path::PathBuf;
use std::process::ExitCode;

use acge_proxy::admin::TokenSource;
use acge_proxy::config::Config;
use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "acge-proxy",
    version,
    about = "Sidecar proxy that migrates a service from blue to green under constitutional checks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a config file.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// Runtime worker threads (overrides listener.workers; default one per CPU).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Check a config file: print every error and exit 1, or print OK.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the seven demo services (blue and green) behind the proxy on loopback.
    Demo {
        #[arg(long)]
        workers: Option<usize>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(c) => {
                println!(
                    "OK: {} ({} routes, {} clusters)",
                    config.display(),
                    c.routes.len(),
                    c.clusters.len()
                );
                ExitCode::SUCCESS
            }
            Err(errors) => {
                eprintln!("{errors}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config, workers } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::FAILURE;
                }
            };
            let workers = workers.or(config.listener.workers);
            report(block_on(workers, run(config)))
        }
        Command::Demo { workers } => report(block_on(workers, demo())),
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("acge-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn block_on(
    workers: Option<usize>,
    f: impl std::future::Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    // One worker needs no work stealing: the single-threaded scheduler skips its
    // cross-thread bookkeeping on every wake-up.
    let mut builder = match workers {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    builder.enable_all();
    if let Some(n) = workers.filter(|n| *n > 1) {
        builder.worker_threads(n);
    }
    builder
        .build()
        .context("cannot start the async runtime")?
        .block_on(f)
}

async fn run(config: Config) -> anyhow::Result<()> {
    let token = TokenSource::from_config(&config);
    let running =
        acge_proxy::start(config, acge_proxy::StartOptions { admin_token: token }).await?;
    shutdown_signal().await;
    tracing::info!("shutting down: draining in-flight requests");
    running.shutdown().await;
    Ok(())
}

async fn demo() -> anyhow::Result<()> {
    let token = match std::env::var("ACGE_ADMIN_TOKEN") {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ => format!("demo-{}", uuid::Uuid::new_v4().simple()),
    };
    let demo = acge_proxy::demo::start(token).await?;
    println!("{}", acge_proxy::demo::banner(&demo));
    shutdown_signal().await;
    demo.proxy.shutdown().await;
    Ok(())
}

/// SIGTERM (Kubernetes) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
