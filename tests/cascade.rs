//! The two-stage cascade through a running proxy, with real TorchScript models: items
//! in the band are decided by the second model, others by the fast one; a full second
//! queue lets the fast verdict stand; each is counted per route and written in the
//! audit record; a config with bad cascade values is refused naming the field.
#![cfg(feature = "torch")]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use http::{Method, StatusCode};

/// A proxy on route `name` whose acge filter runs `fast` with a `second` stage,
/// observing requests, with an audit log in `audit`.
async fn cascade_proxy(
    name: &'static str,
    fast: &Path,
    second: &str,
    audit: &Path,
) -> (acge_proxy::Running, acge_proxy::demo::Backend) {
    let section = format!(
        "filters:\n  acge: {{model: {}, mode: observe, timeout_ms: 5000, second: {{{second}}}}}\n  audit: {{dir: {}}}\n",
        fast.display(),
        audit.display()
    );
    filtered_proxy(name, "acge, audit", &section).await
}

fn constant(p: &str, extra: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["--constant", p];
    args.extend_from_slice(extra);
    make_test_model(dir.path(), &args);
    dir
}

/// Sends `n` requests with distinct bodies at once; returns the compliance each
/// request carried upstream.
async fn burst(p: &acge_proxy::Running, n: usize, tag: &str) -> Vec<String> {
    let url = format!("http://{}/svc", p.proxy_addr);
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let (url, tag) = (url.clone(), tag.to_string());
            tokio::spawn(async move {
                let id = format!("{tag}-{i}");
                let r = send(
                    &client(),
                    Method::POST,
                    &url,
                    &[("x-request-id", id.as_str())],
                    format!(r#"{{"n":{i},"tag":"{tag}"}}"#),
                )
                .await;
                assert_eq!(r.status, StatusCode::OK, "observe mode forwards");
                r.json()["received_headers"]["x-acge-request-compliance"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn cascade_count(metrics: &str, route: &str, stage: &str) -> f64 {
    sample(
        metrics,
        &format!("acge_cascade_total{{route=\"{route}\",stage=\"{stage}\"}}"),
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_band_items_are_decided_by_the_second_model_and_others_by_the_fast_one() {
    // The fast model says 0.5 of everything, the second 0.9.
    let (fast, second) = (constant("0.5", &[]), constant("0.9", &[]));
    let audit = tempfile::tempdir().unwrap();
    let band = format!("model: {}, band: [0.4, 0.6]", second.path().display());
    let (p, _up) = cascade_proxy("cascade-in", fast.path(), &band, audit.path()).await;
    let scores = burst(&p, 8, "in").await;
    assert!(
        scores.iter().all(|s| s == "0.1000"),
        "1 − 0.9: the second model decided: {scores:?}"
    );
    let text = scrape(&p).await;
    assert_eq!(cascade_count(&text, "cascade-in", "second"), 8.0, "{text}");
    assert_eq!(cascade_count(&text, "cascade-in", "fast"), 0.0);
    p.shutdown().await;
    let records = audit_records(audit.path());
    let ours: Vec<_> = records
        .iter()
        .filter(|r| r.request_id.starts_with("in-"))
        .collect();
    assert_eq!(ours.len(), 8);
    assert!(
        ours.iter()
            .all(|r| r.acge_stage.as_deref() == Some("second")),
        "{ours:?}"
    );

    // Outside the band: the fast verdict, counted as such, and no second-stage work.
    let audit = tempfile::tempdir().unwrap();
    let band = format!("model: {}, band: [0.6, 0.95]", second.path().display());
    let (p, _up) = cascade_proxy("cascade-out", fast.path(), &band, audit.path()).await;
    let scores = burst(&p, 8, "out").await;
    assert!(scores.iter().all(|s| s == "0.5000"), "{scores:?}");
    let text = scrape(&p).await;
    assert_eq!(cascade_count(&text, "cascade-out", "fast"), 8.0, "{text}");
    assert_eq!(cascade_count(&text, "cascade-out", "second"), 0.0);
    p.shutdown().await;
    assert!(audit_records(audit.path())
        .iter()
        .filter(|r| r.request_id.starts_with("out-"))
        .all(|r| r.acge_stage.as_deref() == Some("fast")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_second_queue_lets_the_fast_verdict_stand() {
    // The second model is slow (tens of milliseconds a batch) and holds one item.
    let fast = constant("0.5", &[]);
    let second = constant("0.9", &["--slow", "60"]);
    let audit = tempfile::tempdir().unwrap();
    let band = format!(
        "model: {}, band: [0, 1], max_queue: 1, max_batch: 1, timeout_ms: 5000",
        second.path().display()
    );
    let (p, _up) = cascade_proxy("cascade-full", fast.path(), &band, audit.path()).await;
    let scores = burst(&p, 24, "full").await;
    let by_fast = scores.iter().filter(|s| *s == "0.5000").count();
    let by_second = scores.iter().filter(|s| *s == "0.1000").count();
    assert_eq!(by_fast + by_second, 24, "{scores:?}");
    assert!(by_fast >= 1, "some items found the queue full: {scores:?}");
    assert!(
        by_second >= 1,
        "the second model still decided some: {scores:?}"
    );
    let text = scrape(&p).await;
    assert_eq!(
        cascade_count(&text, "cascade-full", "second_skipped"),
        by_fast as f64,
        "{text}"
    );
    assert_eq!(
        cascade_count(&text, "cascade-full", "second"),
        by_second as f64
    );
    assert!(
        sample(
            &text,
            r#"acge_inference_errors_total{stage="second",kind="queue_full"}"#
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{text}"
    );
    p.shutdown().await;
    let skipped = audit_records(audit.path())
        .iter()
        .filter(|r| r.acge_stage.as_deref() == Some("second_skipped"))
        .count();
    assert_eq!(
        skipped, by_fast,
        "the audit record says which stage decided"
    );
}

#[test]
fn bad_cascade_settings_are_refused_naming_the_field_and_line() {
    let fast = constant("0.5", &[]);
    let other = tempfile::tempdir().unwrap();
    make_test_model(other.path(), &["--principles", "5"]);
    let dir = tempfile::tempdir().unwrap();
    let check = |yaml: &str| {
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, yaml).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_acge-proxy"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{yaml}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let base = |second: &str| {
        format!(
            "listener: {{address: 127.0.0.1:0}}\nclusters:\n  up: {{endpoints: [\"127.0.0.1:1\"]}}\nroutes:\n  - {{name: r, match: {{path_prefix: /}}, blue: up, green: up, filters: [acge]}}\nfilters:\n  acge:\n    model: {}\n    second: {second}\n",
            fast.path().display()
        )
    };
    let e = check(&base(&format!(
        "{{model: {}, band: [0.9, 0.1]}}",
        fast.path().display()
    )));
    assert!(
        e.contains("line 9: filters.acge.second.band: [0.9, 0.1] is not a band"),
        "{e}"
    );
    let e = check(&base(&format!(
        "{{model: {}, band: [0.1, 0.9], precision: fp16, device: cpu}}",
        fast.path().display()
    )));
    assert!(
        e.contains("filters.acge.second.precision: fp16 needs device cuda"),
        "{e}"
    );
    let e = check(&base(&format!(
        "{{model: {}, band: [0.1, 0.9]}}",
        other.path().display()
    )));
    assert!(
        e.contains("filters.acge.second.model: its principles"),
        "{e}"
    );
}

/// `model eval --config --route` evaluates what the route's acge filter runs: here a
/// fast model whose every score is in the band, and a second model that calls every
/// case compliant, so the cascade (not the fast model, which would deny) decides.
#[test]
fn model_eval_of_a_route_decides_as_its_cascade() {
    let fast = constant("0.5", &[]);
    let second = constant("0.1", &[]);
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "listener: {{address: 127.0.0.1:0}}\nclusters:\n  up: {{endpoints: [\"127.0.0.1:1\"]}}\nroutes:\n  - {{name: scored, match: {{path_prefix: /a}}, blue: up, green: up, filters: [acge]}}\n  - {{name: plain, match: {{path_prefix: /b}}, blue: up, green: up, filters: []}}\nfilters:\n  acge: {{model: {}, threshold: 0.3, second: {{model: {}, band: [0.4, 0.6]}}}}\n",
            fast.path().display(),
            second.path().display()
        ),
    )
    .unwrap();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/eval/sample.jsonl");
    let eval = |route: &str| {
        run_command(
            Command::new(env!("CARGO_BIN_EXE_acge-proxy"))
                .args(["model", "eval", "--json", "--config"])
                .arg(&config)
                .args(["--route", route, "--data"])
                .arg(&sample),
        )
    };
    let (ok, text) = eval("scored");
    assert!(ok, "{text}");
    let v: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(v["items"], 14);
    assert_eq!(v["stages"]["second"], 1.0, "{v}");
    assert_eq!(v["stages"]["fast"], 0.0, "{v}");
    // The second model's 0.1 is under the route's threshold 0.3: nothing is denied.
    assert_eq!(v["false_deny_rate"], 0.0, "{v}");
    assert_eq!(v["confusion"]["violate"]["comply"], 7, "{v}");

    let (ok, text) = eval("plain");
    assert!(!ok);
    assert!(
        text.contains("route `plain` does not run the acge filter"),
        "{text}"
    );
    let (ok, text) = eval("nope");
    assert!(!ok);
    assert!(
        text.contains("no route `nope` (its routes: scored, plain)"),
        "{text}"
    );
}
