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
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Run a labelled JSONL set through the proxy's inference path and report accuracy,
    /// false denies, recall per principle, the confusion matrix and items/s.
    Eval {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        data: PathBuf,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Override the model's threshold.
        #[arg(long)]
        threshold: Option<f64>,
        /// The constitution hash the model must have been trained for.
        #[arg(long, default_value = acge_proxy::config::DEFAULT_CONSTITUTION_HASH)]
        constitution_hash: String,
    },
    /// Time the model alone at each batch size (µs per item, items/s).
    Bench(BenchArgs),
}

#[derive(clap::Args)]
struct BenchArgs {
    #[arg(long)]
    model: PathBuf,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// libtorch intra-op threads.
    #[arg(long)]
    threads: Option<usize>,
    /// Batch sizes, comma-separated.
    #[arg(
        long,
        default_value = "1,2,4,8,16,32,64,128,256",
        value_delimiter = ','
    )]
    batches: Vec<usize>,
    /// Input length in bytes (cut to the model's max_len).
    #[arg(long, default_value_t = 320)]
    len: usize,
    /// Least time per batch size, in milliseconds.
    #[arg(long, default_value_t = 500)]
    min_ms: u64,
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = acge_proxy::config::DEFAULT_CONSTITUTION_HASH)]
    constitution_hash: String,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Recompute every record, checkpoint signature and consistency; name the first
    /// bad place and exit 1, or print OK.
    Verify { dir: PathBuf },
    /// Print an inclusion proof (JSON) of record INDEX against the first checkpoint
    /// that covers it.
    Prove {
        dir: PathBuf,
        #[arg(long)]
        index: u64,
    },
    /// Check an inclusion proof: its checkpoint's signature and the record's path to
    /// the signed root. The public key comes from the log's directory or is given.
    CheckProof {
        /// The proof, as `audit prove` printed it ("-" for standard input).
        #[arg(long)]
        proof: PathBuf,
        /// The log directory whose audit.pub to trust.
        #[arg(
            long,
            conflicts_with = "public_key",
            required_unless_present = "public_key"
        )]
        dir: Option<PathBuf>,
        /// The ed25519 public key, hex.
        #[arg(long)]
        public_key: Option<String>,
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
        Command::Demo {
            workers,
            dir,
            traffic,
        } => report(block_on(workers, demo(dir, traffic))),
        Command::Migration {
            command: MigrationCommand::Status { admin, watch },
        } => report(block_on(Some(1), migration_status(admin, watch))),
        Command::Audit { command } => audit(command),
        Command::Model {
            command: ModelCommand::Bench(args),
        } => report(model_bench(&args)),
        Command::Model {
            command:
                ModelCommand::Eval {
                    model,
                    data,
                    json,
                    threshold,
                    constitution_hash,
                },
        } => report(block_on(None, async move {
            let r = acge_proxy::eval::evaluate(&model, &data, &constitution_hash, threshold)
                .await
                .map_err(anyhow::Error::msg)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print!("{r}");
            }
            Ok(())
        })),
    }
}

fn audit(command: AuditCommand) -> ExitCode {
    use acge_filters::audit::verify;
    let outcome: Result<String, String> = match command {
        AuditCommand::Verify { dir } => verify::verify(&dir)
            .map(|summary| summary.to_string())
            .map_err(|problems| format!("FAILED: {}", problems.join("\n"))),
        AuditCommand::Prove { dir, index } => verify::prove(&dir, index)
            .map(|proof| serde_json::to_string_pretty(&proof).expect("proofs serialize")),
        AuditCommand::CheckProof {
            proof,
            dir,
            public_key,
        } => check_proof(&proof, dir.as_deref(), public_key.as_deref()),
    };
    match outcome {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn model_bench(args: &BenchArgs) -> anyhow::Result<()> {
    #[cfg(feature = "torch")]
    {
        let device: acge_filters::acge::DeviceChoice =
            serde_json::from_value(serde_json::Value::String(args.device.clone())).map_err(
                |_| anyhow::anyhow!("--device must be auto, cpu or cuda, not `{}`", args.device),
            )?;
        let (name, rows) = acge_proxy::eval::sweep(
            &args.model,
            &args.constitution_hash,
            device,
            args.threads,
            &args.batches,
            args.len,
            std::time::Duration::from_millis(args.min_ms),
        )
        .map_err(anyhow::Error::msg)?;
        if args.json {
            println!(
                "{}",
                serde_json::json!({ "device": name, "len": args.len, "rows": rows })
            );
        } else {
            println!("device {name}, inputs of {} bytes", args.len);
            println!("| batch | µs per item | items/s |");
            println!("| ---: | ---: | ---: |");
            for r in rows {
                println!(
                    "| {} | {:.1} | {:.0} |",
                    r.batch, r.micros_per_item, r.items_per_second
                );
            }
        }
        Ok(())
    }
    #[cfg(not(feature = "torch"))]
    {
        let _ = args;
        anyhow::bail!("this build has no libtorch: rebuild with the `torch` feature (the default)")
    }
}

fn check_proof(
    proof: &std::path::Path,
    dir: Option<&std::path::Path>,
    key: Option<&str>,
) -> Result<String, String> {
    use acge_filters::audit::verify;
    let text = if proof.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).map_err(|e| format!("standard input: {e}"))?
    } else {
        std::fs::read_to_string(proof).map_err(|e| format!("{}: {e}", proof.display()))?
    };
    let proof: verify::InclusionProof =
        serde_json::from_str(&text).map_err(|e| format!("not an inclusion proof: {e}"))?;
    let key = match (dir, key) {
        (Some(dir), _) => verify::read_public_key(dir)?,
        (None, Some(hex)) => verify::parse_public_key(hex)?,
        (None, None) => return Err("give --dir or --public-key".into()),
    };
    verify::check_proof(&proof, &key).map_err(|e| format!("FAILED: {e}"))?;
    Ok(format!(
        "OK: record {} is in the log of {} records signed at {} ms (root {})",
        proof.index, proof.checkpoint.tree_size, proof.checkpoint.time_ms, proof.checkpoint.root
    ))
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
    let running = acge_proxy::start(config, acge_proxy::StartOptions::new(token)).await?;
    shutdown_signal().await;
    tracing::info!("shutting down: draining in-flight requests");
    running.shutdown().await;
    Ok(())
}

async fn demo(dir: PathBuf, traffic: u32) -> anyhow::Result<()> {
    let token = match std::env::var("ACGE_ADMIN_TOKEN") {
        Ok(t) if !t.trim().is_empty() => t.trim().to_string(),
        _ => format!("demo-{}", uuid::Uuid::new_v4().simple()),
    };
    let demo = acge_proxy::demo::start(token, &dir).await?;
    println!("{}", acge_proxy::demo::banner(&demo));
    let load = acge_proxy::demo::spawn_traffic(demo.proxy.proxy_addr, traffic);
    shutdown_signal().await;
    load.abort();
    demo.proxy.shutdown().await;
    Ok(())
}

#[derive(Subcommand)]
enum MigrationCommand {
    /// Per route: step, weight, each gate's figure against its threshold, time in
    /// step, state.
    Status {
        /// The proxy's admin address.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: std::net::SocketAddr,
        /// Print again every second until interrupted.
        #[arg(long)]
        watch: bool,
    },
}

async fn migration_status(admin: std::net::SocketAddr, watch: bool) -> anyhow::Result<()> {
    loop {
        let body = acge_proxy::admin::get(admin, "/migration")
            .await
            .with_context(|| format!("GET http://{admin}/migration"))?;
        let status: serde_json::Value =
            serde_json::from_slice(&body).context("the admin API's answer is not JSON")?;
        if watch {
            print!("\x1b[2J\x1b[H");
        }
        print!("{}", acge_proxy::migration::render_status(&status));
        if !watch {
            return Ok(());
        }
        tokio::select! {
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            () = shutdown_signal() => return Ok(()),
        }
    }
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
