//! The `acge-proxy` command: run the proxy, check a config, run the demo, read the audit
//! log, work with models, watch a migration. Each subcommand lives in `src/cli/`.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use acge_proxy::config::Config;
use clap::{Parser, Subcommand};

use cli::audit::AuditCommand;
use cli::migration::MigrationCommand;
use cli::model::ModelCommand;
use cli::policy::PolicyCommand;

/// mimalloc for the Rust side (libtorch keeps its own): a request's buffers are freed
/// on other threads than the one that made them (the audit writer, the inference
/// thread), and glibc's arenas serialised those frees on a lock (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// Restart without a gap: take the listening sockets over from the proxy
        /// offering them at this Unix socket (it then drains and exits), and offer them
        /// there to the next one. With nobody offering, bind afresh. docs/operations.md.
        #[arg(long, value_name = "SOCKET")]
        takeover: Option<PathBuf>,
    },
    /// Check a config file and every file it names (models, keys, certificates):
    /// print every error and exit 1, or print OK.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run the seven demo services (blue and green) behind the proxy on loopback.
    Demo {
        #[arg(long)]
        workers: Option<usize>,
        /// Where the demo keeps its state (the audit log in DIR/audit).
        #[arg(long, default_value = "demo-data")]
        dir: PathBuf,
        /// Requests a second the demo sends to each service itself (0: none), so that
        /// the migration controller has traffic to judge.
        #[arg(long, default_value_t = 40)]
        traffic: u32,
    },
    /// Watch the migration controller of a running proxy.
    Migration {
        #[command(subcommand)]
        command: MigrationCommand,
    },
    /// Read the tamper-evident audit log back.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Work with ACGE models.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Test and evaluate the policy filter's Rego.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
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
        Command::Check { config } => cli::check::check(&config),
        Command::Run {
            config,
            workers,
            takeover,
        } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::FAILURE;
                }
            };
            let workers = workers.or(config.listener.workers);
            cli::report(cli::block_on(workers, cli::run::run(config, takeover)))
        }
        Command::Demo {
            workers,
            dir,
            traffic,
        } => cli::report(cli::block_on(workers, cli::demo::demo(dir, traffic))),
        Command::Migration {
            command: MigrationCommand::Status { admin, watch },
        } => cli::report(cli::block_on(
            Some(1),
            cli::migration::migration_status(admin, watch),
        )),
        Command::Audit { command } => cli::audit::audit(command),
        Command::Model { command } => cli::report(cli::model::run(command)),
        Command::Policy { command } => cli::policy::run(command),
    }
}
