//! `acge-proxy check --config FILE`: everything `run` would refuse, without running.
//!
//! The config is parsed and validated (every error with its field path and line), then
//! every file it names is loaded as the start would load it — each model (metadata,
//! constitution hash, output shape), the audit signing key, the TLS certificate and
//! key — without binding a port or writing a file.

use std::path::Path;
use std::process::ExitCode;

use acge_proxy::config::Config;

pub fn check(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    let problems = config.check_files();
    if !problems.is_empty() {
        for e in &problems {
            eprintln!("{}: {e}", path.display());
        }
        return ExitCode::FAILURE;
    }
    println!(
        "OK: {} ({} routes, {} clusters)",
        path.display(),
        config.routes.len(),
        config.clusters.len()
    );
    ExitCode::SUCCESS
}
