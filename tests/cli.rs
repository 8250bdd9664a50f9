//! `acge-proxy check` as an operator runs it: every error named by field and line.

mod common;

use std::path::PathBuf;
use std::process::Command;

fn check(yaml: &str) -> (bool, String, String) {
    // A directory of its own, removed afterwards: parallel checks never share a file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    run_check(path)
}

fn run_check(path: PathBuf) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_acge-proxy"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const BAD: &str = "\
listener:
  address: 0.0.0.0:99999
clusters:
  auth-blue: {endpoints: [\"127.0.0.1:8000\"]}
  auth-green: {endpoints: [\"green.svc\"]}
routes:
  - name: auth
    match: {path_prefix: /api/v1/auth}
    blue: auth-blue
    green: auth-gren
    green_weight: 140
  - name: auth
    match: {path_prefix: /api/v1/other}
    blue: auth-blue
    green: auth-green
";

#[test]
fn check_names_every_error_with_field_and_line() {
    let (ok, _, stderr) = check(BAD);
    assert!(!ok, "exit status is non-zero");
    let lines: Vec<&str> = stderr.lines().collect();
    let expect = [
        "line 2: listener.address: `0.0.0.0:99999` is not an address",
        "line 5: clusters.auth-green.endpoints[0]: `green.svc` is not an endpoint",
        "line 10: routes[0].green: unknown cluster `auth-gren`",
        "line 11: routes[0].green_weight: 140 is not a percentage (0–100)",
        "line 12: routes[1].name: `auth` is already the name of routes[0]",
    ];
    assert_eq!(lines.len(), expect.len(), "{stderr}");
    for (line, want) in lines.iter().zip(expect) {
        assert!(line.contains(want), "{line:?} should contain {want:?}");
    }
}

#[test]
fn check_reports_shape_errors_with_path_and_line() {
    let (ok, _, stderr) = check(
        "listener: {address: 127.0.0.1:1}\nclusters: {}\nroutes:\n  - name: a\n    colour: blue\n",
    );
    assert!(!ok);
    assert!(
        stderr.contains("line 5: routes[0]: unknown field `colour`"),
        "{stderr}"
    );
    let (ok, _, stderr) = check("listener: [1, 2]\nclusters: {}\nroutes: []\n");
    assert!(!ok);
    assert!(stderr.contains("listener: invalid type"), "{stderr}");
}

#[test]
fn check_accepts_the_shipped_configs() {
    for file in ["config/demo.yaml", "config/seven-services.yaml"] {
        let (ok, stdout, stderr) = run_check(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(file));
        assert!(ok, "{file}: {stderr}");
        assert!(stdout.starts_with("OK:"), "{stdout}");
        assert!(stdout.contains("7 routes, 14 clusters"), "{stdout}");
    }
}

#[test]
fn missing_file_is_a_clear_error() {
    let (ok, _, stderr) = run_check(PathBuf::from("/nonexistent/acge.yaml"));
    assert!(!ok);
    assert!(
        stderr.contains("/nonexistent/acge.yaml: cannot read the file"),
        "{stderr}"
    );
}

#[test]
fn deeply_nested_yaml_is_refused_at_once_naming_the_line() {
    let deep = format!(
        "listener: {{address: 127.0.0.1:15001}}\nx: {}{}\n",
        "[".repeat(60_000),
        "]".repeat(60_000)
    );
    let (ok, _, stderr) = check(&deep);
    assert!(!ok);
    assert!(
        stderr.contains("line 2: nested deeper than 32 levels"),
        "{stderr}"
    );
}

/// A config whose one route runs acge (on `model`) and audit (with `key`), with TLS
/// from `cert`/`key_pem` when given.
fn files_config(
    dir: &std::path::Path,
    model: &std::path::Path,
    audit_key: &std::path::Path,
    tls: Option<(&std::path::Path, &std::path::Path)>,
) -> PathBuf {
    let tls = tls.map_or(String::new(), |(c, k)| {
        format!(", tls: {{cert: {}, key: {}}}", c.display(), k.display())
    });
    let yaml = format!(
        "listener: {{address: 127.0.0.1:15001{tls}}}
clusters:
  up: {{endpoints: [\"127.0.0.1:8000\"]}}
routes:
  - {{name: r, match: {{path_prefix: /}}, blue: up, green: up, filters: [acge, audit]}}
filters:
  acge: {{model: {}}}
  audit: {{dir: {}, key_file: {}}}
",
        model.display(),
        dir.join("audit").display(),
        audit_key.display()
    );
    let path = dir.join(format!("files-{}.yaml", yaml.len()));
    std::fs::write(&path, yaml).unwrap();
    path
}

/// One refusal: exit 1, the field named, one line, no libtorch stack frames.
fn refused_with(path: PathBuf, field: &str, reason: &str) {
    let (ok, _, stderr) = run_check(path);
    assert!(!ok, "check passed a config run would refuse");
    assert!(
        stderr.contains(field) && stderr.contains(reason),
        "{stderr}"
    );
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(
        !stderr.contains("frame #") && !stderr.contains("Exception raised"),
        "{stderr}"
    );
}

#[test]
fn check_refuses_what_run_would_refuse_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    common::make_test_model(&model, &[]);
    let key = dir.path().join("audit.key");
    let good = files_config(dir.path(), &model, &key, None);
    let (ok, stdout, stderr) = run_check(good.clone());
    assert!(ok, "{stderr}");
    assert!(stdout.starts_with("OK:"), "{stdout}");
    assert!(!key.exists(), "check creates no key");
    assert!(
        !dir.path().join("audit").exists(),
        "check creates no log directory"
    );

    let missing = dir.path().join("no-such-model");
    refused_with(
        files_config(dir.path(), &missing, &key, None),
        "filters.acge.model",
        "model.json",
    );

    let corrupt = dir.path().join("corrupt");
    common::make_test_model(&corrupt, &[]);
    std::fs::write(corrupt.join("model.pt"), b"not a TorchScript archive").unwrap();
    refused_with(
        files_config(dir.path(), &corrupt, &key, None),
        "filters.acge.model",
        "libtorch cannot load it",
    );

    let odd = dir.path().join("odd-threshold");
    common::make_test_model(&odd, &[]);
    let meta = std::fs::read_to_string(odd.join("model.json")).unwrap();
    let mut meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    meta["threshold"] = serde_json::json!(1.5);
    std::fs::write(odd.join("model.json"), meta.to_string()).unwrap();
    refused_with(
        files_config(dir.path(), &odd, &key, None),
        "filters.acge.model",
        "threshold: 1.5 is not a probability",
    );

    std::fs::write(&key, "not hex\n").unwrap();
    refused_with(
        files_config(dir.path(), &model, &key, None),
        "filters.audit.key_file",
        "not hex",
    );
    std::fs::remove_file(&key).unwrap();

    let nowhere = dir.path().join("nowhere.pem");
    refused_with(
        files_config(dir.path(), &model, &key, Some((&nowhere, &nowhere))),
        "listener.tls",
        "nowhere.pem",
    );
}
