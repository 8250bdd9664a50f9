//! The filter chain as clients and upstreams see it: the constitutional hash in each
//! mode and direction, bounded body buffering, and the log phase's exactly-once rule.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use acge_filters::{Exchange, Filter, LogError, Verdict};
use acge_proxy::config::Config;
use acge_proxy::control::admin::TokenSource;
use acge_proxy::proxy::split::Version;
use acge_proxy::StartOptions;
use async_trait::async_trait;
use common::*;
use http::{Method, StatusCode};

const HASH: &str = "cdd01ef066bc6cf2";

async fn hash_proxy(name: &str, mode: &str, upstream: std::net::SocketAddr) -> acge_proxy::Running {
    let yaml = filtered_config(
        name,
        upstream,
        "constitutional_hash",
        &format!("filters:\n  constitutional_hash: {{mode: {mode}}}\n"),
    );
    start(&yaml, TokenSource::None).await
}

async fn demo_upstream(name: &'static str) -> acge_proxy::demo::Backend {
    acge_proxy::demo::spawn_backend(name, Version::Blue, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

async fn metrics_text(p: &acge_proxy::Running) -> String {
    let r = get(&client(), &format!("http://{}/metrics", p.admin_addr), &[]).await;
    String::from_utf8(r.body.to_vec()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_refuses_requests_without_the_right_hash_with_403() {
    let up = demo_upstream("hash-enforce").await;
    let p = hash_proxy("hash-enforce", "enforce", up.addr).await;
    let c = client();
    let url = format!("http://{}/svc", p.proxy_addr);
    for headers in [
        &[][..],
        &[("x-constitutional-hash", "0000000000000000")][..],
    ] {
        let r = get(&c, &url, headers).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        let v = r.json();
        assert_eq!(v["error"], "constitutional_hash_required");
        assert!(v["detail"].as_str().unwrap().contains(HASH), "{v}");
    }
    let r = get(&c, &url, &[("x-constitutional-hash", HASH)]).await;
    assert_eq!(r.status, StatusCode::OK);
    let text = metrics_text(&p).await;
    assert_eq!(
        sample(
            &text,
            r#"acge_hash_checks_total{route="hash-enforce",version="none",direction="request",result="missing"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"acge_hash_checks_total{route="hash-enforce",version="none",direction="request",result="mismatch"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"acge_hash_checks_total{route="hash-enforce",version="blue",direction="request",result="match"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_turns_a_response_with_another_hash_into_502() {
    let wrong = fixed_upstream(&[("x-constitutional-hash", "ffffffffffffffff")], "{}").await;
    let p = hash_proxy("hash-resp", "enforce", wrong).await;
    let c = client();
    let r = get(
        &c,
        &format!("http://{}/svc", p.proxy_addr),
        &[("x-constitutional-hash", HASH)],
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    let v = r.json();
    assert_eq!(v["error"], "constitutional_hash_mismatch");
    assert!(
        v["detail"].as_str().unwrap().contains("ffffffffffffffff"),
        "{v}"
    );

    let missing = fixed_upstream(&[], "{}").await;
    let p2 = hash_proxy("hash-resp-missing", "enforce", missing).await;
    let r = get(
        &c,
        &format!("http://{}/svc", p2.proxy_addr),
        &[("x-constitutional-hash", HASH)],
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    let text = metrics_text(&p).await;
    assert_eq!(
        sample(
            &text,
            r#"acge_hash_consistency_ratio{route="hash-resp",version="blue"}"#
        ),
        Some(0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_mode_forwards_counts_and_annotates_both_directions() {
    let up = demo_upstream("hash-audit").await;
    let p = hash_proxy("hash-audit", "audit", up.addr).await;
    let c = client();
    let url = format!("http://{}/svc", p.proxy_addr);
    let r = get(&c, &url, &[]).await;
    assert_eq!(r.status, StatusCode::OK, "audit mode forwards");
    assert_eq!(r.json()["received_headers"]["x-acge-hash-check"], "missing");
    assert_eq!(
        r.headers["x-acge-hash-check"], "match",
        "the demo upstream answers with the hash"
    );

    let wrong = fixed_upstream(&[("x-constitutional-hash", "bad")], "{}").await;
    let p2 = hash_proxy("hash-audit-resp", "audit", wrong).await;
    let r = get(
        &c,
        &format!("http://{}/svc", p2.proxy_addr),
        &[("x-constitutional-hash", HASH)],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["x-acge-hash-check"], "mismatch");
    let text = metrics_text(&p2).await;
    assert_eq!(
        sample(
            &text,
            r#"acge_hash_checks_total{route="hash-audit-resp",version="blue",direction="response",result="mismatch"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"acge_hash_consistency_ratio{route="hash-audit",version="blue"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stamp_mode_adds_the_hash_for_legacy_clients() {
    let up = demo_upstream("hash-stamp").await;
    let p = hash_proxy("hash-stamp", "stamp", up.addr).await;
    let c = client();
    let url = format!("http://{}/svc", p.proxy_addr);
    let r = get(&c, &url, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    let seen = &r.json()["received_headers"];
    assert_eq!(seen["x-constitutional-hash"], HASH);
    assert_eq!(seen["x-acge-hash-check"], "stamped");
    // A client's own different hash is not overwritten: it is forwarded and counted.
    let r = get(&c, &url, &[("x-constitutional-hash", "other")]).await;
    assert_eq!(
        r.json()["received_headers"]["x-constitutional-hash"],
        "other"
    );
    assert_eq!(
        r.json()["received_headers"]["x-acge-hash-check"],
        "mismatch"
    );
}

/// (request id, status, completed, version) as the log phase saw them.
type Logged = (String, u16, bool, Option<&'static str>);

/// A filter that wants the body and remembers each exchange its log phase saw.
#[derive(Default)]
struct Recorder {
    bodies: Mutex<Vec<usize>>,
    logged: Mutex<Vec<Logged>>,
}

#[async_trait]
impl Filter for Recorder {
    fn name(&self) -> &'static str {
        "recorder"
    }
    fn wants_body(&self) -> bool {
        true
    }
    async fn on_request(&self, ex: &mut Exchange) -> Verdict {
        self.bodies
            .lock()
            .unwrap()
            .push(ex.request_body.as_ref().map_or(0, |b| b.len()));
        Verdict::Continue
    }
    async fn on_log(&self, ex: &Exchange) -> Result<(), LogError> {
        let end = ex.end.expect("the log phase sees how the exchange ended");
        self.logged.lock().unwrap().push((
            ex.request_id.to_string(),
            end.status.as_u16(),
            end.completed(),
            ex.version.map(|v| v.as_str()),
        ));
        Ok(())
    }
}

/// A proxy with one route on `/svc` to `upstream` running `filter` under `name`.
async fn custom_filter_proxy(
    upstream: std::net::SocketAddr,
    cluster_extra: &str,
    name: &str,
    filter: Arc<dyn Filter>,
) -> acge_proxy::Running {
    let yaml = format!(
        "listener: {{address: 127.0.0.1:0}}
admin: {{address: 127.0.0.1:0}}
clusters:
  up: {{endpoints: [\"{upstream}\"]{cluster_extra}}}
routes:
  - {{name: {name}, match: {{path_prefix: /svc}}, blue: up, green: up, max_body_bytes: 1000}}
"
    );
    let mut config = Config::parse_yaml(&yaml, "test.yaml").unwrap();
    config.routes[0].filters.push(name.into());
    let config = acge_proxy::config::ValidConfig::new(config, &[name]).unwrap();
    let mut options = StartOptions::new(TokenSource::None);
    options.filters.push((name.into(), filter));
    acge_proxy::start(config, options).await.unwrap()
}

async fn recorder_proxy(
    upstream: std::net::SocketAddr,
    extra: &str,
) -> (acge_proxy::Running, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    let p = custom_filter_proxy(upstream, extra, "recorder", recorder.clone()).await;
    (p, recorder)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_is_rejected_with_413() {
    let up = demo_upstream("rec").await;
    let (p, rec) = recorder_proxy(up.addr, "").await;
    let c = client();
    let url = format!("http://{}/svc", p.proxy_addr);
    let r = send(&c, Method::POST, &url, &[], vec![b'x'; 1001]).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.json()["error"], "payload_too_large");
    assert!(r.json()["detail"].as_str().unwrap().contains("1000 bytes"));

    let r = send(&c, Method::POST, &url, &[], vec![b'x'; 1000]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.json()["body_bytes"],
        1000,
        "the buffered body is forwarded whole"
    );
    assert_eq!(rec.bodies.lock().unwrap().as_slice(), &[1000]);

    // Chunked, with no length declared: refused once the limit is passed. With
    // Expect: 100-continue, curl gets its 100 only because the body is read.
    let url2 = url.clone();
    let out = tokio::task::spawn_blocking(move || {
        let small = std::process::Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                "Expect: 100-continue",
                "-H",
                "Transfer-Encoding: chunked",
                "--data-binary",
                &"y".repeat(900),
                &url2,
            ])
            .output()
            .unwrap();
        let big = std::process::Command::new("curl")
            .args([
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                "Transfer-Encoding: chunked",
                "--data-binary",
                &"y".repeat(5000),
                &url2,
            ])
            .output()
            .unwrap();
        (
            String::from_utf8_lossy(&small.stdout).into_owned(),
            String::from_utf8_lossy(&big.stdout).into_owned(),
        )
    })
    .await
    .unwrap();
    assert_eq!(out, ("200".to_string(), "413".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_phase_runs_once_per_exchange_also_on_client_abort_and_upstream_failure() {
    let up = demo_upstream("rec").await;
    let (p, rec) = recorder_proxy(up.addr, "").await;
    let c = client();
    let r = get(
        &c,
        &format!("http://{}/svc", p.proxy_addr),
        &[("x-request-id", "done-1")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);

    let down = closed_port().await;
    let (p2, rec2) = recorder_proxy(down, "").await;
    let r = get(
        &c,
        &format!("http://{}/svc", p2.proxy_addr),
        &[("x-request-id", "fail-1")],
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);

    let (slow, _task) = silent_server().await;
    let (p3, rec3) = recorder_proxy(slow, ", timeout_ms: 5000").await;
    let addr = p3.proxy_addr;
    let aborted = tokio::spawn(async move {
        raw(
            addr,
            b"GET /svc HTTP/1.1\r\nHost: x\r\nx-request-id: gone-1\r\n\r\n",
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    aborted.abort(); // the client goes away while the upstream is still thinking
    let _ = aborted.await;

    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while rec3.logged.lock().unwrap().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        rec.logged.lock().unwrap().as_slice(),
        &[("done-1".into(), 200, true, Some("blue"))]
    );
    assert_eq!(
        rec2.logged.lock().unwrap().as_slice(),
        &[("fail-1".into(), 502, true, Some("blue"))]
    );
    assert_eq!(
        rec3.logged.lock().unwrap().as_slice(),
        &[("gone-1".into(), 499, false, Some("blue"))]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_audit_records_every_answered_exchange_before_it_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let up = demo_upstream("audited").await;
    let yaml = filtered_config(
        "audited",
        up.addr,
        "constitutional_hash, audit",
        &format!(
            "filters:\n  constitutional_hash: {{mode: enforce}}\n  audit: {{dir: {}, commit: sync, checkpoint_every: 5}}\n",
            dir.path().display()
        ),
    );
    let p = start(&yaml, TokenSource::None).await;
    let c = client();
    let url = format!("http://{}/svc", p.proxy_addr);
    for i in 0..12 {
        let id = format!("req-{i}");
        let hash = if i == 3 { "wrong" } else { HASH };
        let r = get(
            &c,
            &url,
            &[("x-request-id", &id), ("x-constitutional-hash", hash)],
        )
        .await;
        // Sync commit: the record is on disk before the answer comes back.
        let records = audit_records(dir.path());
        let rec = records
            .iter()
            .find(|r| r.request_id == id)
            .expect("recorded before the answer");
        assert_eq!(rec.status, r.status.as_u16());
        if i == 3 {
            assert_eq!(
                (rec.decision.as_str(), rec.hash_request.as_deref()),
                ("denied", Some("mismatch"))
            );
            assert_eq!(rec.version, None);
        } else {
            assert_eq!(
                (rec.decision.as_str(), rec.hash_response.as_deref()),
                ("allowed", Some("match"))
            );
        }
    }
    let text = metrics_text(&p).await;
    assert!(sample(&text, "acge_audit_records_total").unwrap() >= 12.0);
    assert!(text.contains("acge_audit_commit_seconds_bucket"));
    p.shutdown().await;
    let summary = acge_filters::audit::verify::verify(dir.path(), &Default::default()).unwrap();
    assert_eq!(summary.records, 12);
    assert_eq!(summary.unsigned_tail, 0, "shutdown signs a last checkpoint");
}

/// A filter that reads whole responses and stamps their length.
struct ResponseMeter;

#[async_trait]
impl Filter for ResponseMeter {
    fn name(&self) -> &'static str {
        "meter"
    }
    fn wants_response_body(&self) -> bool {
        true
    }
    async fn on_response(&self, ex: &mut Exchange) -> Verdict {
        let answer = ex
            .response
            .as_mut()
            .expect("the response phase has an answer");
        let len = answer.body.as_ref().map_or(0, |b| b.len());
        answer.headers.insert("x-body-bytes", len.into());
        Verdict::Continue
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_bodies_are_buffered_for_filters_that_want_them_and_bounded() {
    let small = fixed_upstream(&[], "0123456789").await;
    let big = fixed_upstream(&[], &*Box::leak("z".repeat(1001).into_boxed_str())).await;
    let mut proxies = Vec::new();
    for up in [small, big] {
        proxies.push(custom_filter_proxy(up, "", "meter", Arc::new(ResponseMeter)).await);
    }
    let c = client();
    let r = get(&c, &format!("http://{}/svc", proxies[0].proxy_addr), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["x-body-bytes"], "10");
    assert_eq!(&r.body[..], b"0123456789");
    let r = get(&c, &format!("http://{}/svc", proxies[1].proxy_addr), &[]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.json()["error"], "upstream_response_too_large");
}
