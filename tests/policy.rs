//! The `policy` filter: Rego evaluated in process (regorus). Allow, deny with the
//! policy's reasons, an evaluation error under each `on_error`, a policy that reads
//! the ACGE score and the token's claims, and `acge-proxy policy test|eval` passing and
//! failing as they should.

mod common;

use std::path::Path;
use std::process::Command;

use common::{client, make_test_model, sample, scrape, send};
use http::Method;
use serde_json::json;

async fn proxy(
    route: &str,
    filters: &str,
    sections: &str,
) -> (
    acge_proxy::Running,
    tokio::sync::mpsc::UnboundedReceiver<common::Seen>,
) {
    common::recording_proxy(route, "/api", filters, sections).await
}

fn demo_policies() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("config/policies")
        .display()
        .to_string()
}

async fn post(
    p: &acge_proxy::Running,
    headers: &[(&str, &str)],
    body: serde_json::Value,
) -> common::Reply {
    let mut h = vec![("content-type", "application/json")];
    h.extend_from_slice(headers);
    send(
        &client(),
        Method::POST,
        &format!("http://{}/api/v1/policy/acge/compile", p.proxy_addr),
        &h,
        body.to_string(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pgc_policy_allows_a_good_compile_and_denies_with_its_reasons() {
    let (p, mut seen) = proxy(
        "pgc",
        "policy",
        &format!("  policy: {{dir: \"{}\"}}\n", demo_policies()),
    )
    .await;
    let good = json!({"constitutional_hash": "cdd01ef066bc6cf2", "rules": [{"id": "r1"}]});
    let r = post(&p, &[("x-user-roles", "policy-compiler")], good.clone()).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let upstream = seen.recv().await.unwrap();
    assert_eq!(upstream.path, "/api/v1/policy/acge/compile");

    let r = post(
        &p,
        &[("x-user-roles", "reader")],
        json!({"constitutional_hash": "0000", "rules": []}),
    )
    .await;
    assert_eq!(r.status, 403);
    let body = r.json();
    assert_eq!(body["error"], "policy_denied");
    assert_eq!(
        body["reasons"],
        json!([
            "the caller lacks the policy-compiler role",
            "the request compiles against constitution 0000, not cdd01ef066bc6cf2"
        ])
    );
    assert!(
        seen.try_recv().is_err(),
        "a denied request never reaches the upstream"
    );
    let m = scrape(&p).await;
    assert_eq!(
        sample(&m, "acge_policy_total{route=\"pgc\",result=\"allow\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&m, "acge_policy_total{route=\"pgc\",result=\"deny\"}"),
        Some(1.0)
    );
    p.shutdown().await;
}

/// A policy whose `allow` has two values for one input: an evaluation error.
const CONFLICT: &str = "package acge
import rego.v1
allow := true if input.body.a
allow := false if input.body.b
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evaluation_error_follows_on_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("conflict.rego"), CONFLICT).unwrap();
    for (route, on_error, status, result) in [
        ("deny-on-error", "deny", 503, "error_denied"),
        ("allow-on-error", "allow", 200, "error_allowed"),
    ] {
        let (p, _seen) = proxy(
            route,
            "policy",
            &format!(
                "  policy: {{dir: \"{}\", on_error: {on_error}}}\n",
                dir.path().display()
            ),
        )
        .await;
        let r = post(&p, &[], json!({"a": true, "b": true})).await;
        assert_eq!(r.status, status, "{on_error}: {:?}", r.body);
        if status == 503 {
            assert_eq!(r.json()["error"], "policy_error");
        }
        let series = format!("acge_policy_total{{route=\"{route}\",result=\"{result}\"}}");
        assert_eq!(sample(&scrape(&p).await, &series), Some(1.0), "{series}");
        p.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_sees_the_acge_score_of_the_request() {
    let model = tempfile::tempdir().unwrap();
    make_test_model(model.path(), &[]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("score.rego"),
        "package acge
import rego.v1
default allow := false
allow if {
  is_number(input.acge.score)
  input.acge.score >= 0
  input.route == \"scored\"
  input.body.user == \"alice\"
}
reasons contains \"no score\" if not input.acge
",
    )
    .unwrap();
    let (p, _seen) = proxy(
        "scored",
        "acge, policy",
        &format!(
            "  acge: {{model: \"{}\", mode: observe}}\n  policy: {{dir: \"{}\"}}\n",
            model.path().display(),
            dir.path().display()
        ),
    )
    .await;
    assert_eq!(post(&p, &[], json!({"user": "alice"})).await.status, 200);
    assert_eq!(post(&p, &[], json!({"user": "bob"})).await.status, 403);
    p.shutdown().await;

    // Without acge before it, the policy has no score, and says so.
    let (p, _seen) = proxy(
        "unscored",
        "policy",
        &format!("  policy: {{dir: \"{}\"}}\n", dir.path().display()),
    )
    .await;
    let r = post(&p, &[], json!({"user": "alice"})).await;
    assert_eq!(
        (r.status.as_u16(), r.json()["reasons"].clone()),
        (403, json!(["no score"]))
    );
    p.shutdown().await;
}

fn cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_acge-proxy"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn policy_test_passes_the_demo_policies_and_fails_a_broken_test() {
    let (ok, text) = cli(&["policy", "test", &demo_policies()]);
    assert!(ok, "{text}");
    assert!(
        text.contains("PASS data.acge_test.test_a_compiler_with_a_good_request_is_allowed"),
        "{text}"
    );
    assert!(text.contains("6 passed, 0 failed"), "{text}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        Path::new(&demo_policies()).join("pgc.rego"),
        dir.path().join("pgc.rego"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("wrong_test.rego"),
        "package acge_test
import rego.v1
import data.acge
test_an_empty_request_is_allowed if {
  acge.allow with input as {\"method\": \"GET\", \"headers\": {}}
}
",
    )
    .unwrap();
    let (ok, text) = cli(&["policy", "test", &dir.path().display().to_string()]);
    assert!(!ok, "a failing test fails the command: {text}");
    assert!(
        text.contains("FAIL data.acge_test.test_an_empty_request_is_allowed"),
        "{text}"
    );
}

#[test]
fn policy_eval_prints_the_decision_for_an_input() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.json");
    std::fs::write(
        &input,
        json!({"method": "POST", "path": "/api/v1/policy/acge/compile", "route": "pgc",
               "headers": {"x-user-roles": "policy-compiler"},
               "body": {"constitutional_hash": "cdd01ef066bc6cf2", "rules": []}})
        .to_string(),
    )
    .unwrap();
    let (ok, text) = cli(&[
        "policy",
        "eval",
        "--dir",
        &demo_policies(),
        "--input",
        &input.display().to_string(),
    ]);
    assert!(ok, "{text}");
    assert_eq!(text.trim(), r#"{"allow":true,"reasons":[]}"#);
    std::fs::write(&input, "{broken").unwrap();
    let (ok, text) = cli(&[
        "policy",
        "eval",
        "--dir",
        &demo_policies(),
        "--input",
        &input.display().to_string(),
    ]);
    assert!(!ok && text.contains("not JSON"), "{text}");
}
