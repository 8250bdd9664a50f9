//! `acge-proxy check --config FILE`: everything `run` would refuse, without running.
//!
//! The config is parsed and validated (every error with its field path and line), then
//! every file it names that the start would refuse to start without is loaded as the
//! start would load it — each model (metadata, constitution hash, module, output
//! shape), the audit signing key when it exists, the TLS certificate and key — without
//! binding a port or writing a file. (The admin token file is read on each mutation, so
//! a missing one only disables mutations, as it would at run time.)

use std::path::Path;
use std::process::ExitCode;

use acge_proxy::config::{Config, ConfigError, ValidConfig};

pub fn check(path: &Path) -> ExitCode {
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("{errors}");
            return ExitCode::FAILURE;
        }
    };
    let problems = files(&config);
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

/// The files the config names, loaded; each problem with its field and line.
fn files(config: &ValidConfig) -> Vec<ConfigError> {
    let mut errors: Vec<(String, String)> = config
        .filters
        .check_files(&config.constitution.hash, |name| config.uses_filter(name))
        .into_iter()
        .map(|e| (e.path, e.message))
        .collect();
    if let Some(tls) = &config.listener.tls {
        if let Err(e) = acge_proxy::proxy::server::Certificates::load(&tls.cert, &tls.key) {
            errors.push(("listener.tls".into(), e.to_string()));
        }
    }
    for (name, cluster) in &config.clusters {
        if let Some(tls) = &cluster.tls {
            if let Err(e) =
                acge_proxy::proxy::upstream::tls::UpstreamTls::load(name, tls, cluster.protocol)
            {
                errors.push((format!("clusters.{name}.tls"), e.to_string()));
            }
        }
    }
    errors
        .into_iter()
        .map(|(path, message)| ConfigError {
            line: config.line_of(&path),
            path,
            message,
        })
        .collect()
}
