//! The Helm charts (helm/acge-sidecar, helm/acge-proxy, helm/examples/auth), checked
//! by helm/tests/test_charts.py with Helm's own Go SDK, Kubernetes 1.29 and 1.33
//! schemas and this build's binary: schema, lint, every rendered object, bad values
//! refused, and the sidecar's rendered config run with the container's args and
//! probed as the kubelet would. scripts/setup-helm.sh provides the Python packages.

mod common;

use std::path::Path;
use std::process::Command;

use common::run_command;

#[test]
fn the_charts_render_validate_and_run_the_sidecar_they_declare() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let setup = Command::new(root.join("scripts/setup-helm.sh"))
        .output()
        .expect("scripts/setup-helm.sh runs");
    assert!(
        setup.status.success(),
        "scripts/setup-helm.sh: {}",
        String::from_utf8_lossy(&setup.stderr)
    );
    let python = String::from_utf8_lossy(&setup.stdout)
        .lines()
        .last()
        .expect("setup-helm.sh prints the venv's python")
        .to_string();
    let (ok, text) = run_command(
        Command::new(python)
            .arg(root.join("helm/tests/test_charts.py"))
            .arg(env!("CARGO_BIN_EXE_acge-proxy")),
    );
    assert!(ok, "{text}");
    assert!(text.contains("all chart checks passed"), "{text}");
    // Every case ran: six renderings, four refusals, a grace period too short for the
    // drain refused at render, three probes.
    assert_eq!(
        text.matches("objects valid on Kubernetes").count(),
        6,
        "{text}"
    );
    assert_eq!(text.matches(" refused: ").count(), 4, "{text}");
    assert!(
        text.contains("refused at render: below the drain it must cover"),
        "{text}"
    );
    assert!(
        text.contains("restart annotation: a weight reloads in place"),
        "{text}"
    );
    assert!(
        text.contains("inference example: values-remote.yaml renders filters.acge.remote"),
        "{text}"
    );
    assert!(
        text.contains("refused at render: needs sidecar.config.filters.acge"),
        "{text}"
    );
    assert_eq!(text.matches("Probe GET").count(), 3, "{text}");
}
