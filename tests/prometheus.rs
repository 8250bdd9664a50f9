//! The alert rules and the dashboard against a real Prometheus (Debian's package,
//! installed by scripts/setup.sh) scraping a running demo on loopback: every alert
//! expression evaluates without error, and every metric and label it selects on exists
//! in what the proxy exports; every dashboard panel's query returns data, and its
//! variables have values — so renaming a metric or a label breaks this test. Faults on two
//! green backends make the events behind the rarer series happen: hash mismatches,
//! 5xx answers and a migration rollback.
#![cfg(feature = "torch")]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use http::Method;

/// Query-string encoding of a PromQL expression.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn encode_pair(k: &str, v: &str) -> String {
    format!("{}={}", encode(k), encode(v))
}

struct Prometheus {
    child: Child,
    url: String,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Prometheus scraping `target` (host:port) every second, keeping its data in `dir`.
fn prometheus(dir: &Path, target: &str) -> Prometheus {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n  - job_name: acge\n    static_configs: [{{targets: [\"{target}\"]}}]\n"
        ),
    )
    .unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("prometheus is installed by scripts/setup.sh (Debian's prometheus package)");
    Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
    }
}

/// The `data.result` of an instant query, or the error Prometheus gave.
async fn query(p: &Prometheus, expr: &str) -> Result<Vec<serde_json::Value>, String> {
    let url = format!("{}/api/v1/query?query={}", p.url, encode(expr));
    let r = get(&client(), &url, &[]).await;
    let v: serde_json::Value = serde_json::from_slice(&r.body)
        .map_err(|e| format!("{e}: {}", String::from_utf8_lossy(&r.body)))?;
    if v["status"] != "success" {
        return Err(v.to_string());
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

/// The metric selectors of an expression: (metric name, label names it matches on).
fn selectors(expr: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("acge_") {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = tail[..end].to_string();
        let mut labels = Vec::new();
        rest = &tail[end..];
        if let Some(inner) = rest.strip_prefix('{') {
            let close = inner.find('}').unwrap();
            for m in inner[..close].split(',') {
                let label = m.split(['=', '!', '~']).next().unwrap().trim();
                labels.push(label.to_string());
            }
            rest = &inner[close..];
        }
        out.push((name, labels));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_alert_and_dashboard_query_evaluates_over_what_a_running_demo_exports() {
    let dir = tempfile::tempdir().unwrap();
    let demo = acge_proxy::demo::start("demo-token".into(), dir.path())
        .await
        .expect("the demo ports (15000, 15001, 18000-18006, 18100-18106) are free");
    let _traffic =
        acge_proxy::demo::spawn_traffic(demo.proxy.proxy_addr, 40, Some(demo.bearer.clone()));
    let c = client();
    for fault in [
        r#"{"service": "ac", "version": "green", "wrong_hash_rate": 0.5}"#,
        r#"{"service": "fv", "version": "green", "error_rate": 0.3}"#,
    ] {
        let r = send(
            &c,
            Method::PUT,
            &format!("http://{}/demo/faults", demo.proxy.admin_addr),
            &[("authorization", "Bearer demo-token")],
            fault,
        )
        .await;
        assert!(r.status.is_success(), "{:?}", r.body);
    }
    let prom_dir = tempfile::tempdir().unwrap();
    let p = prometheus(prom_dir.path(), &demo.proxy.admin_addr.to_string());
    let addr = p.url.trim_start_matches("http://").to_string();
    let started = Instant::now();
    while tokio::net::TcpStream::connect(&addr).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "prometheus did not listen on {addr} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Until the rarer series exist in Prometheus (the rollback follows the first steps
    // of the migration: about 20 s), at most two minutes.
    let needed = [
        "acge_migration_rollbacks_total",
        "acge_hash_checks_total{result=\"mismatch\"}",
        "acge_requests_total{code_class=\"5xx\"}",
        "acge_decisions_total",
        "acge_request_duration_seconds_bucket",
    ];
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut missing = Vec::new();
        for s in needed {
            if query(&p, s).await.map(|r| r.is_empty()).unwrap_or(true) {
                missing.push(s);
            }
        }
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after two minutes Prometheus still has no {missing:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    let rules = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("helm/acge-proxy/files/alerts.yaml"),
    )
    .unwrap();
    let rules: serde_json::Value = serde_yaml_ng::from_str(&rules).unwrap();
    let mut problems = Vec::new();
    let mut checked = 0;
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let alert = rule["alert"].as_str().unwrap();
            let expr = rule["expr"].as_str().unwrap();
            if let Err(e) = query(&p, expr).await {
                problems.push(format!("{alert}: {e}"));
            }
            for (name, labels) in selectors(expr) {
                match query(&p, &name).await {
                    Ok(r) if !r.is_empty() => {
                        for label in labels {
                            let has = r.iter().any(|s| s["metric"].get(&label).is_some());
                            if !has {
                                problems.push(format!("{alert}: {name} has no label `{label}`"));
                            }
                        }
                    }
                    Ok(_) => problems.push(format!("{alert}: the demo exports no {name}")),
                    Err(e) => problems.push(format!("{alert}: {name}: {e}")),
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 9, "only {checked} selectors were checked");

    // The dashboard, with every route and version selected, over the last 30 s.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("helm/acge-proxy/files/dashboard.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(dashboard["uid"], "acge-proxy", "a stable uid");
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(variables, ["datasource", "route", "version"]);
    for label in ["route", "version"] {
        let url = format!(
            "{}/api/v1/label/{label}/values?{}",
            p.url,
            encode_pair("match[]", "acge_requests_total")
        );
        let v: serde_json::Value =
            serde_json::from_slice(&get(&client(), &url, &[]).await.body).unwrap();
        let values = v["data"].as_array().unwrap();
        assert!(
            !values.is_empty(),
            "no values for the `{label}` variable: {v}"
        );
    }
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        let title = panel["title"].as_str().unwrap().to_string();
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$route", ".+")
                .replace("$version", ".+")
                .replace("$__rate_interval", "30s");
            exprs.push((title.clone(), expr));
        }
    }
    let queries = exprs.len();
    // A rate needs two scrapes in its window: poll, at most a minute.
    let deadline = Instant::now() + Duration::from_secs(60);
    let panel_problems = loop {
        let mut missing = Vec::new();
        for (title, expr) in &exprs {
            match query(&p, expr).await {
                Ok(r) if !r.is_empty() => {}
                Ok(_) => missing.push(format!("panel `{title}`: no data for {expr}")),
                Err(e) => missing.push(format!("panel `{title}`: {e}")),
            }
        }
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    problems.extend(panel_problems);
    assert!(queries >= 14, "only {queries} panel queries");
    assert!(problems.is_empty(), "{problems:#?}");
    drop(p);
    demo.proxy.shutdown().await;
}
