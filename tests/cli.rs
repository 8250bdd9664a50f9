//! `acge-proxy check` as an operator runs it: every error named by field and line.

use std::path::PathBuf;
use std::process::Command;

fn check(yaml: &str) -> (bool, String, String) {
    let dir = std::env::temp_dir().join(format!("acge-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("c{}.yaml", yaml.len()));
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
