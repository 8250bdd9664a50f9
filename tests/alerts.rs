//! The alert rules of helm/acge-proxy/files/alerts.yaml, checked by Prometheus's own
//! promtool (scripts/setup.sh installs it): they parse, and each alert fires on the
//! series of helm/acge-proxy/tests/alerts.test.yaml that should fire it and stays
//! silent on the others.

mod common;

use std::path::Path;
use std::process::Command;

use common::run_command;

/// promtool, which scripts/setup.sh installs (Debian's prometheus package).
fn promtool(args: &[&str], dir: &Path) -> (bool, String) {
    run_command(Command::new("promtool").args(args).current_dir(dir))
}

/// The alert names of the rule file, in order.
fn alerts(rules: &str) -> Vec<&str> {
    rules
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- alert: "))
        .collect()
}

fn chart() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("helm/acge-proxy")
}

#[test]
fn the_alert_rules_parse_and_name_every_alert_of_the_runbook() {
    let (ok, text) = promtool(&["check", "rules", "files/alerts.yaml"], &chart());
    assert!(ok, "{text}");
    assert!(text.contains("SUCCESS: 10 rules found"), "{text}");
    let rules = std::fs::read_to_string(chart().join("files/alerts.yaml")).unwrap();
    let runbook =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/runbooks.md"))
            .unwrap();
    for name in alerts(&rules) {
        assert!(
            runbook.contains(&format!("## {name}")),
            "docs/runbooks.md has no section for {name}"
        );
        assert!(
            rules.contains(&format!("docs/runbooks.md#{}", name.to_lowercase())),
            "{name} does not link its runbook section"
        );
    }
}

#[test]
fn each_alert_fires_on_its_series_and_stays_silent_on_the_others() {
    let (ok, text) = promtool(
        &["test", "rules", "alerts.test.yaml"],
        &chart().join("tests"),
    );
    assert!(ok, "{text}");
    assert!(text.contains("SUCCESS"), "{text}");
    // The test file exercises every alert of the rule file (a test of nothing passes).
    let rules = std::fs::read_to_string(chart().join("files/alerts.yaml")).unwrap();
    let tests = std::fs::read_to_string(chart().join("tests/alerts.test.yaml")).unwrap();
    for name in alerts(&rules) {
        assert!(
            tests.contains(&format!("alertname: {name}")),
            "alerts.test.yaml does not test {name}"
        );
    }
}
