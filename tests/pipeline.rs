//! One pipeline for every route: what the old second copy of the request path got
//! wrong, each as a client or an upstream sees it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use acge_filters::{Exchange, Filter, Verdict};
use acge_proxy::config::{Config, ValidConfig};
use acge_proxy::control::admin::TokenSource;
use acge_proxy::StartOptions;
use async_trait::async_trait;
use common::*;
use http::{Method, StatusCode};
use tokio::io::AsyncWriteExt;

const HASH: &str = "cdd01ef066bc6cf2";

/// A proxy whose one route runs `filters` (YAML names) and then `custom`.
async fn proxy_with(
    upstream: std::net::SocketAddr,
    filters: &str,
    rest: &str,
    custom: Option<(&'static str, Arc<dyn Filter>)>,
) -> acge_proxy::Running {
    let yaml = config_with("pipe", upstream, "", "", rest)
        .replace("green: up}", &format!("green: up, filters: [{filters}]}}"));
    let mut config = Config::parse_yaml(&yaml, "t.yaml").unwrap();
    let mut options = StartOptions::new(TokenSource::Fixed(TOKEN.into()));
    let mut names = Vec::new();
    if let Some((name, filter)) = custom {
        config.routes[0].filters.push(name.into());
        options.filters.push((name.into(), filter));
        names.push(name);
    }
    let config = ValidConfig::new(config, &names).unwrap();
    acge_proxy::start(config, options).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstreams_hop_by_hop_headers_never_reach_the_client_on_any_route() {
    let up = scripted_upstream(|mut s| async move {
        loop {
            if read_head(&mut s).await.is_empty() {
                return;
            }
            let answer = format!(
                "HTTP/1.1 200 OK\r\nConnection: keep-alive, x-secret-hop\r\nX-Secret-Hop: 1\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nx-constitutional-hash: {HASH}\r\nx-kept: yes\r\ncontent-length: 2\r\n\r\nok"
            );
            if s.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    })
    .await;
    let plain = proxy_with(up, "", "", None).await;
    let filtered = proxy_with(
        up,
        "constitutional_hash",
        "filters:\n  constitutional_hash: {mode: audit}\n",
        None,
    )
    .await;
    for p in [&plain, &filtered] {
        let r = get(&client(), &format!("http://{}/svc", p.proxy_addr), &[]).await;
        assert_eq!(r.status, StatusCode::OK);
        for hop in ["x-secret-hop", "keep-alive", "proxy-connection"] {
            assert!(
                !r.headers.contains_key(hop),
                "{hop} reached the client: {:?}",
                r.headers
            );
        }
        assert_ne!(
            r.headers.get("connection").map(|v| v.to_str().unwrap()),
            Some("keep-alive, x-secret-hop"),
            "the upstream's Connection header is its own"
        );
        assert_eq!(r.headers["x-kept"], "yes");
    }
}

/// Rewrites the request: PUT to another path, with a header.
struct Rewrite;

#[async_trait]
impl Filter for Rewrite {
    fn name(&self) -> &'static str {
        "rewrite"
    }
    async fn on_request(&self, ex: &mut Exchange) -> Verdict {
        ex.request.method = Method::PUT;
        ex.request.uri = "/svc/rewritten?by=filter".parse().unwrap();
        ex.request
            .headers
            .insert("x-rewritten", "yes".parse().unwrap());
        Verdict::Continue
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_phases_changes_to_method_and_uri_are_what_is_forwarded() {
    let (up, mut seen) = recording_upstream().await;
    let p = proxy_with(up, "", "", Some(("rewrite", Arc::new(Rewrite)))).await;
    let r = get(
        &client(),
        &format!("http://{}/svc/original", p.proxy_addr),
        &[],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let got = seen.recv().await.unwrap();
    assert_eq!(got.method, "PUT");
    assert_eq!(got.path, "/svc/rewritten?by=filter");
    assert_eq!(got.headers["x-rewritten"], "yes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_are_forked_after_the_request_phases() {
    let (blue, _blue_seen) = recording_upstream().await;
    let (green, mut green_seen) = recording_upstream().await;
    let yaml = format!(
        "listener: {{address: 127.0.0.1:0}}
admin: {{address: 127.0.0.1:0}}
clusters:
  blue: {{endpoints: [\"{blue}\"]}}
  green: {{endpoints: [\"{green}\"]}}
routes:
  - {{name: mirror, match: {{path_prefix: /svc}}, blue: blue, green: green, filters: [constitutional_hash]}}
filters:
  constitutional_hash: {{mode: enforce}}
migration:
  steps: [0, 100]
  interval_s: 60
  rollback_min_requests: 1000
"
    );
    let p = start(&yaml, TokenSource::Fixed(TOKEN.into())).await;
    let c = client();
    let url = format!("http://{}/svc/x", p.proxy_addr);
    // Refused by the request phase: never mirrored.
    let r = send(&c, Method::POST, &url, &[], "refused").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // Accepted: mirrored as the phases left it.
    let r = send(
        &c,
        Method::POST,
        &url,
        &[
            ("x-constitutional-hash", HASH),
            ("x-request-id", "mirrored-1"),
        ],
        "accepted",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let copy = tokio::time::timeout(Duration::from_secs(5), green_seen.recv())
        .await
        .expect("the accepted request was mirrored")
        .unwrap();
    assert_eq!(copy.headers["x-acge-shadow"], "true");
    assert_eq!(copy.headers["x-request-id"], "mirrored-1");
    assert_eq!(copy.headers["x-constitutional-hash"], HASH);
    assert!(
        copy.headers.contains_key("x-forwarded-for"),
        "the copy has the edge's hygiene too"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        green_seen.try_recv().is_err(),
        "the refused request never reached green"
    );
    // A request without a body is mirrored too (its length is known: none).
    let r = get(&c, &url, &[("x-constitutional-hash", HASH)]).await;
    assert_eq!(r.status, StatusCode::OK);
    let copy = tokio::time::timeout(Duration::from_secs(5), green_seen.recv())
        .await
        .expect("the bodyless GET was mirrored")
        .unwrap();
    assert_eq!(copy.method, "GET");
}

#[tokio::test(flavor = "current_thread")]
async fn the_state_file_is_written_off_the_runtime() {
    // The state is written to state.tmp first. There, a FIFO with no reader: opening it
    // for writing blocks until one comes. Had the state file been written on the
    // runtime, this one-thread runtime would stop.
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let fifo = dir.path().join("state.tmp");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let up = acge_proxy::demo::spawn_backend(
        "state",
        acge_proxy::proxy::split::Version::Blue,
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let migration = format!(
        "migration:\n  steps: [0, 50, 100]\n  interval_s: 60\n  state_file: {}\n",
        state.display()
    );
    let p = start(
        &config_with("state", up.addr, "", "", &migration),
        TokenSource::Fixed(TOKEN.into()),
    )
    .await;
    // Should the runtime stall, a watchdog comes as the reader after 10 s, so the test
    // ends (and fails) instead of hanging.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let (done, fifo) = (done.clone(), fifo.clone());
        std::thread::spawn(move || {
            for _ in 0..200 {
                if done.load(std::sync::atomic::Ordering::SeqCst) {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Some(std::fs::read(&fifo).unwrap())
        })
    };
    let c = client();
    let r = send(
        &c,
        Method::POST,
        &format!("http://{}/migration/state/promote", p.admin_addr),
        &[("authorization", &format!("Bearer {TOKEN}"))],
        "",
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    for _ in 0..20 {
        let r = get(&c, &format!("http://{}/svc", p.proxy_addr), &[]).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(
        watchdog.join().unwrap().is_none(),
        "the proxy stalled until the state file's write could go on"
    );
    // Now a reader comes; the writer thread finishes its write.
    let reader = std::thread::spawn(move || std::fs::read(&fifo).unwrap());
    p.migration.as_ref().unwrap().flush().await;
    let written: serde_json::Value = serde_json::from_slice(&reader.join().unwrap()).unwrap();
    assert_eq!(written["routes"]["state"]["step"], 1);
}

#[test]
fn a_config_that_names_a_missing_cluster_cannot_start() {
    let yaml = "listener: {address: 127.0.0.1:0}
clusters:
  up: {endpoints: [\"127.0.0.1:9\"]}
routes:
  - {name: r, match: {path_prefix: /}, blue: up, green: nowhere}
";
    let mut config = Config::parse_yaml(yaml, "t.yaml").unwrap();
    config.routes[0].green = "also-nowhere".into();
    let errors = ValidConfig::new(config, &[]).unwrap_err();
    assert_eq!(errors.errors[0].path, "routes[0].green");
    assert!(
        errors
            .to_string()
            .contains("unknown cluster `also-nowhere`"),
        "{errors}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_every_cluster_that_takes_traffic() {
    let later = closed_port().await;
    let p = start(&config_with("later", later, "", "", ""), TokenSource::None).await;
    let c = client();
    let r = get(&c, &format!("http://{}/ready", p.admin_addr), &[]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        r.json()["detail"].as_str().unwrap().contains("up"),
        "{}",
        r.json()
    );
    let _listening = tokio::net::TcpListener::bind(later).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let r = get(&c, &format!("http://{}/ready", p.admin_addr), &[]).await;
        if r.status == StatusCode::OK {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never ready: {}",
            r.json()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_that_is_not_visible_ascii_is_replaced_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    let (up, mut seen) = recording_upstream().await;
    let p = proxy_with(
        up,
        "audit",
        &format!(
            "filters:\n  audit: {{dir: {}, commit: sync}}\n",
            dir.path().display()
        ),
        None,
    )
    .await;
    let answer = raw(
        p.proxy_addr,
        "GET /svc HTTP/1.1\r\nHost: t\r\nx-request-id: ключ-7\r\nConnection: close\r\n\r\n"
            .as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let id = answer
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .unwrap()
        .to_string();
    assert_eq!(id.len(), 36, "a new UUID: {id}");
    assert_eq!(
        seen.recv().await.unwrap().headers["x-request-id"],
        id.as_str()
    );
    let records = audit_records(dir.path());
    assert_eq!(records.len(), 1);
    assert_eq!(
        records[0].request_id, id,
        "logged under the id the client got"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http10_upstreams_answer_goes_to_an_http11_client_as_http11() {
    let old = scripted_upstream(|mut s| async move {
        read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await;
    })
    .await;
    let p = proxy_with(old, "", "", None).await;
    let answer = raw(
        p.proxy_addr,
        b"GET /svc HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("ok"), "{answer}");
}
