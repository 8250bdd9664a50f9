//! The `acge-proxy` subcommands, one file each. The library does the work; these turn
//! arguments into calls and results into text and exit codes (anyhow lives only here).

pub mod audit;
pub mod check;
pub mod demo;
pub mod migration;
pub mod model;
pub mod policy;
pub mod run;

use std::process::ExitCode;

use anyhow::Context;

/// Prints a failure as one line and exits 1.
pub fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("acge-proxy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `f` on a runtime with `workers` threads (one per CPU by default).
pub fn block_on<T>(
    workers: Option<usize>,
    f: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
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

/// SIGTERM (Kubernetes) or Ctrl-C.
/// `SIGHUP`s, one item each (none ever arrives off Unix).
pub fn hangup_signal() -> std::io::Result<tokio::sync::mpsc::Receiver<()>> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                // A reload is already pending when the channel is full: one is enough.
                let _ = tx.try_send(());
            }
        });
    }
    #[cfg(not(unix))]
    std::mem::forget(tx);
    Ok(rx)
}

pub async fn shutdown_signal() {
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
