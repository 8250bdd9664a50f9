//! The acge filter with a real TorchScript model through libtorch: observe and enforce
//! on requests and responses, on_error when the model fails, batching, the cache, and
//! the score reaching the audit log.
#![cfg(feature = "torch")]

mod common;

use std::path::Path;
use std::process::Command;

use acge_proxy::control::admin::TokenSource;
use common::*;
use http::{Method, StatusCode};

async fn acge_proxy(
    name: &'static str,
    model: &Path,
    settings: &str,
    filters: &str,
) -> (acge_proxy::Running, acge_proxy::demo::Backend) {
    let section = format!(
        "filters:\n  acge: {{model: {}, {settings}}}\n",
        model.display()
    );
    filtered_proxy(name, filters, &section).await
}

async fn metrics_text(p: &acge_proxy::Running) -> String {
    let r = get(&client(), &format!("http://{}/metrics", p.admin_addr), &[]).await;
    String::from_utf8(r.body.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observe_mode_scores_and_annotates_requests_and_responses() {
    let dir = tempfile::tempdir().unwrap();
    make_test_model(dir.path(), &[]);
    let (p, _up) = acge_proxy(
        "acge-observe",
        dir.path(),
        "mode: observe, on: [request, response], threshold: 0.0",
        "acge",
    )
    .await;
    let r = send(
        &client(),
        Method::POST,
        &format!("http://{}/svc/x", p.proxy_addr),
        &[("content-type", "application/json")],
        r#"{"user":"alice"}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "observe never refuses");
    let score: f64 = r.headers["x-acge-response-compliance"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((0.0..=1.0).contains(&score));
    assert_eq!(
        r.headers["x-acge-response-principles"],
        "privacy,safety,fairness,transparency,accountability,authority",
        "at threshold 0 every principle is over it"
    );
    assert!(
        !r.headers.contains_key("x-acge-request-compliance"),
        "the client gets the response's score only, under its own name"
    );
    let seen = &r.json()["received_headers"];
    assert!(
        seen["x-acge-request-compliance"]
            .as_str()
            .unwrap()
            .parse::<f64>()
            .is_ok(),
        "the upstream saw the request's score"
    );
    assert_eq!(
        seen["x-acge-request-principles"],
        "privacy,safety,fairness,transparency,accountability,authority"
    );
    assert!(
        seen.get("x-acge-response-compliance").is_none(),
        "the upstream never sees a response score"
    );
    let text = metrics_text(&p).await;
    assert!(
        text.contains(
            r#"acge_compliance_score_bucket{route="acge-observe",version="blue",phase="response""#
        ),
        "{text}"
    );
    assert!(text.contains(r#"acge_decisions_total{route="acge-observe",version="blue",phase="request",decision="violation"}"#));
    // Every principle was violated once in each phase, and each is counted by name.
    for phase in ["request", "response"] {
        for principle in ["privacy", "authority"] {
            let series = format!(
                r#"acge_principle_violations_total{{route="acge-observe",version="blue",phase="{phase}",principle="{principle}"}}"#
            );
            assert_eq!(sample(&text, &series), Some(1.0), "{series}\n{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_denies_requests_with_403_and_responses_with_502() {
    let dir = tempfile::tempdir().unwrap();
    make_test_model(dir.path(), &[]);
    let c = client();
    let (deny, _a) = acge_proxy(
        "acge-deny",
        dir.path(),
        "mode: enforce, threshold: 0.0",
        "acge",
    )
    .await;
    let r = send(
        &c,
        Method::POST,
        &format!("http://{}/svc", deny.proxy_addr),
        &[],
        r#"{"a":1}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(r.json()["error"], "constitutional_violation");
    assert!(
        r.json()["detail"]
            .as_str()
            .unwrap()
            .contains("privacy, safety"),
        "{}",
        r.json()
    );

    let (allow, _b) = acge_proxy(
        "acge-allow",
        dir.path(),
        "mode: enforce, threshold: 1.0",
        "acge",
    )
    .await;
    let r = send(
        &c,
        Method::POST,
        &format!("http://{}/svc", allow.proxy_addr),
        &[],
        r#"{"a":1}"#,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);

    let (resp, _c) = acge_proxy(
        "acge-resp",
        dir.path(),
        "mode: enforce, on: [response], threshold: 0.0",
        "acge",
    )
    .await;
    let r = get(&c, &format!("http://{}/svc", resp.proxy_addr), &[]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert!(r.json()["detail"]
        .as_str()
        .unwrap()
        .contains("blue upstream's response violates"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_model_follows_on_error_and_is_counted() {
    let dir = tempfile::tempdir().unwrap();
    make_test_model(dir.path(), &["--fail-over", "40"]);
    let c = client();
    let long = format!(r#"{{"text":"{}"}}"#, "x".repeat(100));
    let (deny, _a) = acge_proxy("acge-fail-deny", dir.path(), "on_error: deny", "acge").await;
    let r = send(
        &c,
        Method::POST,
        &format!("http://{}/svc", deny.proxy_addr),
        &[],
        long.clone(),
    )
    .await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE, "fail closed");
    assert_eq!(r.json()["error"], "acge_unavailable");
    let (allow, _b) = acge_proxy("acge-fail-allow", dir.path(), "on_error: allow", "acge").await;
    let r = send(
        &c,
        Method::POST,
        &format!("http://{}/svc", allow.proxy_addr),
        &[],
        long,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json()["received_headers"]["x-acge-request-compliance"],
        "unavailable"
    );
    let text = metrics_text(&allow).await;
    assert!(
        sample(
            &text,
            r#"acge_inference_errors_total{stage="fast",kind="engine"}"#
        )
        .unwrap()
            >= 2.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_batches_and_repeats_hit_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    make_test_model(dir.path(), &[]);
    let (p, _up) = acge_proxy(
        "acge-batch",
        dir.path(),
        "mode: observe, max_batch: 32, max_delay_us: 20000",
        "acge",
    )
    .await;
    let before = metrics_text(&p).await;
    let url = format!("http://{}/svc", p.proxy_addr);
    let mut tasks = Vec::new();
    for i in 0..24 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            send(
                &client(),
                Method::POST,
                &url,
                &[],
                format!(r#"{{"n":{i}}}"#),
            )
            .await
            .status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    let after = metrics_text(&p).await;
    let delta =
        |name: &str| sample(&after, name).unwrap_or(0.0) - sample(&before, name).unwrap_or(0.0);
    let batches = delta(r#"acge_inference_batch_size_count{stage="fast"}"#);
    let items = delta(r#"acge_inference_batch_size_sum{stage="fast"}"#);
    assert!(
        items >= 24.0 && batches < items,
        "{items} items in {batches} batches: batched"
    );

    let hits = sample(&after, r#"acge_inference_cache_total{result="hit"}"#).unwrap_or(0.0);
    let r = send(&client(), Method::POST, &url, &[], r#"{"n":3}"#).await;
    assert_eq!(r.status, StatusCode::OK);
    let text = metrics_text(&p).await;
    assert!(
        sample(&text, r#"acge_inference_cache_total{result="hit"}"#).unwrap() > hits,
        "a repeat is a cache hit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_score_reaches_the_audit_record() {
    let model = tempfile::tempdir().unwrap();
    make_test_model(model.path(), &[]);
    let audit = tempfile::tempdir().unwrap();
    let up = acge_proxy::demo::spawn_backend(
        "acge-audit",
        acge_proxy::proxy::split::Version::Blue,
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let yaml = filtered_config(
        "acge-audit",
        up.addr,
        "acge, audit",
        &format!(
            "filters:\n  acge: {{model: {}, mode: observe, threshold: 0.0}}\n  audit: {{dir: {}}}\n",
            model.path().display(),
            audit.path().display()
        ),
    );
    let p = start(&yaml, TokenSource::None).await;
    let r = send(
        &client(),
        Method::POST,
        &format!("http://{}/svc", p.proxy_addr),
        &[("x-request-id", "scored-1")],
        "{}",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    p.shutdown().await;
    let rec = audit_records(audit.path())
        .into_iter()
        .find(|r| r.request_id == "scored-1")
        .unwrap();
    assert!(
        rec.compliance.is_some_and(|s| (0.0..=1.0).contains(&s)),
        "{rec:?}"
    );
    assert_eq!(rec.principles.len(), 6);
}

#[test]
fn a_config_naming_acge_without_its_section_is_refused() {
    let yaml = "listener: {address: 127.0.0.1:0}\nclusters: {up: {endpoints: [\"127.0.0.1:1\"]}}\nroutes:\n  - {name: r, match: {path_prefix: /}, blue: up, green: up, filters: [acge]}\n";
    let e = acge_proxy::config::Config::from_yaml(yaml, "t.yaml").unwrap_err();
    assert!(
        e.to_string()
            .contains("routes[0].filters[0]: `acge` needs a `filters.acge` section"),
        "{e}"
    );
}

fn eval(model: &Path, data: &Path, extra: &[&str]) -> (bool, String) {
    run_command(
        Command::new(env!("CARGO_BIN_EXE_acge-proxy"))
            .args(["model", "eval", "--model"])
            .arg(model)
            .arg("--data")
            .arg(data)
            .args(extra),
    )
}

#[test]
fn model_eval_reports_on_the_shared_sample_set() {
    let dir = tempfile::tempdir().unwrap();
    make_test_model(dir.path(), &[]);
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/eval/sample.jsonl");
    assert!(
        sample.is_file(),
        "../shared/eval/sample.jsonl is beside the checkout in CI and here"
    );
    // Threshold 0: every case is called a violation of every principle.
    let (ok, text) = eval(dir.path(), &sample, &["--json", "--threshold", "0"]);
    assert!(ok, "{text}");
    let v: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(v["items"], 14);
    assert_eq!(v["confusion"]["comply"]["violate"], 7);
    assert_eq!(v["confusion"]["violate"]["violate"], 7);
    assert_eq!(v["accuracy"], 0.5);
    assert_eq!(v["false_deny_rate"], 1.0);
    assert!(
        v["per_principle_recall"]
            .as_object()
            .unwrap()
            .values()
            .all(|r| r == 1.0),
        "{v}"
    );
    assert!(v["items_per_second"].as_f64().unwrap() > 0.0);
    // Threshold 1: nothing is a violation.
    let (ok, text) = eval(dir.path(), &sample, &["--json", "--threshold", "1"]);
    assert!(ok, "{text}");
    let v: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(v["false_deny_rate"], 0.0);
    assert_eq!(v["confusion"]["violate"]["comply"], 7);
    // The table form.
    let (ok, text) = eval(dir.path(), &sample, &[]);
    assert!(
        ok && text.contains("accuracy") && text.contains("recall by principle"),
        "{text}"
    );
}

#[test]
fn model_eval_names_a_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    make_test_model(dir.path(), &[]);
    let data = dir.path().join("bad.jsonl");
    std::fs::write(
        &data,
        "{\"service\":\"auth\",\"method\":\"POST\",\"path\":\"/x\",\"body\":{},\"label\":\"comply\"}\n{\"service\":\"auth\",\"method\":\"POST\",\"path\":\"/x\",\"body\":{},\"label\":\"violate\"}\n",
    )
    .unwrap();
    let (ok, text) = eval(dir.path(), &data, &[]);
    assert!(!ok);
    assert!(
        text.contains("bad.jsonl line 2: a `violate` case needs its `principle`"),
        "{text}"
    );
}

#[test]
fn model_bench_times_each_part_for_each_kind_and_the_cascade() {
    let fast = tempfile::tempdir().unwrap();
    make_test_model(fast.path(), &["--kind", "hashed"]);
    let second = tempfile::tempdir().unwrap();
    make_test_model(second.path(), &["--kind", "tokens"]);
    let out = Command::new(env!("CARGO_BIN_EXE_acge-proxy"))
        .args([
            "model",
            "bench",
            "--device",
            "cpu",
            "--batches",
            "1,4,16",
            "--min-ms",
            "20",
            "--len",
            "600",
            "--band",
            "0,1",
            "--json",
            "--model",
        ])
        .arg(fast.path())
        .arg("--second")
        .arg(second.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let models = v["models"].as_array().unwrap();
    assert_eq!(models.len(), 2, "{v}");
    for (m, (stage, kind)) in models
        .iter()
        .zip([("fast", "hashed"), ("second", "tokens")])
    {
        assert_eq!(m["stage"], stage);
        assert_eq!(m["input"], kind);
        assert_eq!(m["device"], "Cpu");
        assert!(m["render_us"].as_f64().unwrap() > 0.0, "{m}");
        assert!(m["encode_us"].as_f64().unwrap() > 0.0, "{m}");
        let rows = m["rows"].as_array().unwrap();
        assert_eq!(
            rows.iter()
                .map(|r| r["batch"].as_u64().unwrap())
                .collect::<Vec<_>>(),
            vec![1, 4, 16]
        );
        assert!(rows
            .iter()
            .all(|r| r["items_per_second"].as_f64().unwrap() > 0.0));
    }
    // Band [0, 1]: the second model decides every item.
    let c = &v["cascade"];
    assert!(c["items"].as_u64().unwrap() >= 256, "{c}");
    assert_eq!(c["second"].as_f64(), Some(1.0), "{c}");
    let bad = Command::new(env!("CARGO_BIN_EXE_acge-proxy"))
        .args(["model", "bench", "--device", "tpu", "--model"])
        .arg(fast.path())
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--device must be auto, cpu or cuda"));
}
