//! What an outside probe of the proxy found, as attackers and careless clients: each
//! test failed before its fix. Idle and slow connections, slow and stalled bodies,
//! floods beyond every limit, smuggled hashes, paths spelt around a route, headers the
//! proxy sets itself, and answers that cut their bodies or send huge heads.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use acge_filters::{Exchange, Filter, LogError, Verdict};
use acge_proxy::config::{Config, ValidConfig};
use acge_proxy::control::admin::TokenSource;
use acge_proxy::StartOptions;
use async_trait::async_trait;
use common::*;
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const HASH: &str = "cdd01ef066bc6cf2";

/// Whether the peer has closed `stream` (a read sees the end, or a reset) within
/// `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// A keep-alive GET on `stream`; the status line, or None when the connection failed.
async fn keepalive_get(stream: &mut TcpStream, path: &str) -> Option<String> {
    let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n");
    stream.write_all(req.as_bytes()).await.ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // The demo backend's answers carry a content-length; read until the body is in.
    loop {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got);
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return text.lines().next().map(str::to_string);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_send_a_byte_are_closed() {
    let up = acge_proxy::demo::spawn_backend(
        "idle",
        acge_proxy::proxy::split::Version::Blue,
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let p = start(
        &config_with("idle", up.addr, ", first_byte_timeout_ms: 300", "", ""),
        TokenSource::None,
    )
    .await;
    let mut silent = Vec::new();
    for _ in 0..50 {
        silent.push(TcpStream::connect(p.proxy_addr).await.unwrap());
    }
    let started = Instant::now();
    for (i, s) in silent.iter_mut().enumerate() {
        let closed = closed_within(s, Duration::from_secs(3)).await;
        assert!(
            closed,
            "connection {i}, which sent nothing, was left open; {}",
            scrape(&p)
                .await
                .lines()
                .filter(|l| l.contains("refused"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "not before the timeout"
    );
    let text = scrape(&p).await;
    assert!(refused(&text, "first_byte_timeout") >= 50.0, "{text}");
    // And one that speaks is served.
    let mut talker = TcpStream::connect(p.proxy_addr).await.unwrap();
    assert_eq!(
        keepalive_get(&mut talker, "/svc").await.as_deref(),
        Some("HTTP/1.1 200 OK")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keepalive_connections_are_closed_after_the_idle_timeout() {
    let up = acge_proxy::demo::spawn_backend(
        "idle2",
        acge_proxy::proxy::split::Version::Blue,
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let p = start(
        &config_with("idle2", up.addr, ", idle_timeout_ms: 400", "", ""),
        TokenSource::None,
    )
    .await;
    let mut s = TcpStream::connect(p.proxy_addr).await.unwrap();
    assert_eq!(
        keepalive_get(&mut s, "/svc").await.as_deref(),
        Some("HTTP/1.1 200 OK")
    );
    assert!(closed_within(&mut s, Duration::from_secs(3)).await);
    assert!(refused(&scrape(&p).await, "idle_timeout") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_connection_limit_the_oldest_idle_connection_makes_room() {
    let up = acge_proxy::demo::spawn_backend(
        "room",
        acge_proxy::proxy::split::Version::Blue,
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let p = start(
        &config_with("room", up.addr, ", max_connections: 10", "", ""),
        TokenSource::None,
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..10 {
        let mut s = TcpStream::connect(p.proxy_addr).await.unwrap();
        assert_eq!(
            keepalive_get(&mut s, "/svc").await.as_deref(),
            Some("HTTP/1.1 200 OK")
        );
        held.push(s);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut newcomer = TcpStream::connect(p.proxy_addr).await.unwrap();
    assert_eq!(
        keepalive_get(&mut newcomer, "/svc").await.as_deref(),
        Some("HTTP/1.1 200 OK"),
        "the eleventh connection is served"
    );
    assert!(
        closed_within(&mut held[0], Duration::from_secs(2)).await,
        "the oldest idle connection was closed to make room"
    );
    assert!(
        !closed_within(&mut held[9], Duration::from_millis(200)).await,
        "the newest idle one stays"
    );
    assert!(refused(&scrape(&p).await, "shed_idle") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_beyond_the_limit_gets_503_and_memory_stays_bounded() {
    // Every admitted connection holds a request the upstream never answers, so none
    // is idle: connections beyond the limit are refused at once.
    let (slow, _task) = silent_server().await;
    let p = start(
        &config_with(
            "flood",
            slow,
            ", max_connections: 20",
            ", timeout_ms: 20000",
            "",
        ),
        TokenSource::None,
    )
    .await;
    let mut busy = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(p.proxy_addr).await.unwrap();
        s.write_all(b"GET /svc HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        busy.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_bytes();
    let started = Instant::now();
    let mut refused_503 = 0;
    for _ in 0..2000 {
        let mut s = TcpStream::connect(p.proxy_addr).await.unwrap();
        let _ = s.write_all(b"GET /svc HTTP/1.1\r\nHost: t\r\n\r\n").await;
        let mut answer = String::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut answer)).await;
        if answer.starts_with("HTTP/1.1 503") {
            assert!(answer.contains("retry-after: 1"), "{answer}");
            assert!(answer.contains(r#""error":"overloaded""#), "{answer}");
            refused_503 += 1;
        }
    }
    let took = started.elapsed();
    let grown = rss_bytes().saturating_sub(before);
    assert_eq!(
        refused_503, 2000,
        "every connection beyond the limit got a 503"
    );
    assert!(
        grown < 64 * 1024 * 1024,
        "memory grew by {} MiB for 2,000 refused connections",
        grown / (1024 * 1024)
    );
    assert!(took < Duration::from_secs(60), "refusals took {took:?}");
    assert!(refused(&scrape(&p).await, "connections") >= 2000.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_in_flight_limit_get_a_fast_503_without_their_body_read() {
    let (slow, _task) = silent_server().await;
    let p = start(
        &config_with(
            "inflight",
            slow,
            ", max_requests_in_flight: 4",
            ", timeout_ms: 20000",
            "",
        ),
        TokenSource::None,
    )
    .await;
    let mut busy = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(p.proxy_addr).await.unwrap();
        s.write_all(b"GET /svc HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        busy.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A request that declares a large body and sends none of it: answered anyway.
    let mut s = TcpStream::connect(p.proxy_addr).await.unwrap();
    s.write_all(b"POST /svc HTTP/1.1\r\nHost: t\r\ncontent-length: 1000000\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf))
        .await
        .expect("answered without waiting for the body")
        .unwrap();
    let answer = String::from_utf8_lossy(&buf[..n]);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("retry-after: 1"), "{answer}");
    assert!(answer.contains("overloaded"), "{answer}");
    assert!(refused(&scrape(&p).await, "requests") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_beyond_the_limit_waits_for_a_slot_in_order_then_gets_503() {
    // An upstream that answers after 300 ms.
    let slow = scripted_upstream(|mut s| async move {
        loop {
            if read_head(&mut s).await.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .is_err()
            {
                return;
            }
        }
    })
    .await;
    let p = start(
        &config_with(
            "waiting",
            slow,
            ", max_requests_in_flight: 1, admission_wait_ms: 1000",
            "",
            "",
        ),
        TokenSource::None,
    )
    .await;
    let url = format!("http://{}/svc", p.proxy_addr);
    // Three at once through one slot: the second waits 300 ms and the third 600 ms,
    // both within the wait, so all three are served.
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            get(&client(), &url, &[]).await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    // Eight at once: 8 × 300 ms is beyond the wait, so the last ones are refused.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move { get(&client(), &url, &[]).await }));
    }
    let mut served = 0;
    let mut refused_503 = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            StatusCode::OK => served += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(r.json()["error"], "overloaded");
                refused_503 += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        served >= 3 && refused_503 >= 2,
        "{served} served, {refused_503} refused"
    );
    assert_eq!(served + refused_503, 8);
}

/// A filter that wants the request body whole, so that the proxy buffers it.
struct WantsBody;

#[async_trait]
impl Filter for WantsBody {
    fn name(&self) -> &'static str {
        "wants_body"
    }
    fn wants_body(&self) -> bool {
        true
    }
}

async fn buffering_proxy(upstream: std::net::SocketAddr, listener: &str) -> acge_proxy::Running {
    let yaml = config_with("buffered", upstream, listener, "", "");
    let mut config = Config::parse_yaml(&yaml, "t.yaml").unwrap();
    config.routes[0].filters.push("wants_body".into());
    config.routes[0].max_body_bytes = 8000;
    let config = ValidConfig::new(config, &["wants_body"]).unwrap();
    let mut options = StartOptions::new(TokenSource::None);
    options
        .filters
        .push(("wants_body".into(), Arc::new(WantsBody)));
    acge_proxy::start(config, options).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_the_proxy_holds_that_arrives_too_slowly_gets_408() {
    let up = acge_proxy::demo::spawn_backend(
        "slowbody",
        acge_proxy::proxy::split::Version::Blue,
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let p = buffering_proxy(up.addr, ", body_read_timeout_ms: 400").await;
    let mut s = TcpStream::connect(p.proxy_addr).await.unwrap();
    s.write_all(b"POST /svc HTTP/1.1\r\nHost: t\r\ncontent-length: 100\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let sender = tokio::spawn(async move {
        // One byte every 100 ms: 10 s for the whole body.
        for _ in 0..100 {
            if s.write_all(b"x").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        s
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let text = scrape(&p).await;
    assert!(refused(&text, "body_timeout") >= 1.0, "{text}");
    sender.abort();
    assert!(started.elapsed() < Duration::from_secs(5));
    // The answer itself, on a fresh slow body.
    let mut s = TcpStream::connect(p.proxy_addr).await.unwrap();
    s.write_all(b"POST /svc HTTP/1.1\r\nHost: t\r\ncontent-length: 100\r\n\r\nxx")
        .await
        .unwrap();
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains(r#""error":"body_timeout""#), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_held_whole_share_one_budget_and_beyond_it_get_503() {
    let up = acge_proxy::demo::spawn_backend(
        "budget",
        acge_proxy::proxy::split::Version::Blue,
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let p = buffering_proxy(up.addr, ", max_buffered_bytes: 10000").await;
    // A stalled 8,000-byte upload holds 8,000 bytes of the 10,000.
    let mut stalled = TcpStream::connect(p.proxy_addr).await.unwrap();
    stalled
        .write_all(b"POST /svc HTTP/1.1\r\nHost: t\r\ncontent-length: 8000\r\n\r\nabc")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(p.proxy.buffered_bytes(), 8000);
    let c = client();
    let url = format!("http://{}/svc", p.proxy_addr);
    let r = send(&c, Method::POST, &url, &[], vec![b'y'; 5000]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json()["error"], "overloaded");
    assert_eq!(r.headers["retry-after"], "1");
    assert!(refused(&scrape(&p).await, "buffer_budget") >= 1.0);
    // A small one still fits; and once the stalled upload goes, a large one does.
    let r = send(&c, Method::POST, &url, &[], vec![b'y'; 1000]).await;
    assert_eq!(r.status, StatusCode::OK);
    drop(stalled);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(p.proxy.buffered_bytes(), 0, "the budget is given back");
    let r = send(&c, Method::POST, &url, &[], vec![b'y'; 5000]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["body_bytes"], 5000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hash_values_are_a_mismatch_in_both_directions() {
    let up = fixed_upstream(&[("x-constitutional-hash", HASH)], "ok").await;
    let yaml = filtered_config(
        "twohash",
        up,
        "constitutional_hash",
        "filters:\n  constitutional_hash: {mode: enforce}\n",
    );
    let p = start(&yaml, TokenSource::None).await;
    let answer = raw(
        p.proxy_addr,
        format!(
            "GET /svc HTTP/1.1\r\nHost: t\r\nx-constitutional-hash: {HASH}\r\nx-constitutional-hash: 0000000000000000\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 403"), "{answer}");
    assert!(
        answer.contains("2 x-constitutional-hash values"),
        "{answer}"
    );

    // An upstream answering with the right hash and another one.
    let two = scripted_upstream(|mut s| async move {
        read_head(&mut s).await;
        let _ = s
            .write_all(
                format!("HTTP/1.1 200 OK\r\nx-constitutional-hash: {HASH}\r\nx-constitutional-hash: ffffffffffffffff\r\ncontent-length: 2\r\n\r\nok").as_bytes(),
            )
            .await;
    })
    .await;
    let yaml = filtered_config(
        "twohash-up",
        two,
        "constitutional_hash",
        "filters:\n  constitutional_hash: {mode: enforce}\n",
    );
    let p = start(&yaml, TokenSource::None).await;
    let r = get(
        &client(),
        &format!("http://{}/svc", p.proxy_addr),
        &[("x-constitutional-hash", HASH)],
    )
    .await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.json()["error"], "constitutional_hash_mismatch");
}

/// Remembers how each exchange ended, as its log phase saw it.
#[derive(Default)]
struct Ends(std::sync::Mutex<Vec<(u16, Duration)>>);

#[async_trait]
impl Filter for Ends {
    fn name(&self) -> &'static str {
        "ends"
    }
    async fn on_request(&self, _ex: &mut Exchange) -> Verdict {
        Verdict::Continue
    }
    async fn on_log(&self, ex: &Exchange) -> Result<(), LogError> {
        let end = ex.end.expect("ended");
        self.0
            .lock()
            .unwrap()
            .push((end.status.as_u16(), end.latency));
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_answer_is_measured_and_logged_when_its_body_ends() {
    let dir = tempfile::tempdir().unwrap();
    // The head at once, the body's end 600 ms later.
    let streaming = scripted_upstream(|mut s| async move {
        read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            .await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        let _ = s.write_all(b"4\r\nlast\r\n0\r\n\r\n").await;
    })
    .await;
    let yaml = config_with(
        "stream-log",
        streaming,
        "",
        "",
        &format!(
            "filters:\n  audit: {{dir: {}, commit: sync}}\n",
            dir.path().display()
        ),
    )
    .replace("green: up}", "green: up, filters: [audit]}");
    let mut config = Config::parse_yaml(&yaml, "t.yaml").unwrap();
    config.routes[0].filters.push("ends".into());
    let config = ValidConfig::new(config, &["ends"]).unwrap();
    let ends = Arc::new(Ends::default());
    let mut options = StartOptions::new(TokenSource::None);
    options.filters.push(("ends".into(), ends.clone()));
    let p = acge_proxy::start(config, options).await.unwrap();
    let r = get(
        &client(),
        &format!("http://{}/svc", p.proxy_addr),
        &[("x-request-id", "streamed-1")],
    )
    .await;
    assert_eq!(&r.body[..], b"firstlast");
    let seen = ends.0.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert!(
        seen[0].1 >= Duration::from_millis(550),
        "the latency runs to the body's end: {:?}",
        seen[0].1
    );
    let record = audit_records(dir.path())
        .into_iter()
        .find(|r| r.request_id == "streamed-1")
        .expect("recorded, in sync mode before the answer completed");
    assert!(record.latency_ms >= 550.0, "{record:?}");
    let text = scrape(&p).await;
    let slow_bucket = sample(
        &text,
        r#"acge_request_duration_seconds_bucket{route="stream-log",version="blue",le="0.5"}"#,
    );
    assert_eq!(
        slow_bucket,
        Some(0.0),
        "not counted as faster than 0.5 s: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_cuts_its_body_is_an_upstream_error_the_gates_see() {
    let dir = tempfile::tempdir().unwrap();
    let cutting = scripted_upstream(|mut s| async move {
        read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b")
            .await;
        // Closed with 90 bytes missing.
    })
    .await;
    let yaml = config_with(
        "cut",
        cutting,
        "",
        "",
        &format!(
            "filters:\n  audit: {{dir: {}, commit: sync}}\nmigration:\n  steps: [0, 100]\n  interval_s: 60\n  rollback_min_requests: 1000\n",
            dir.path().display()
        ),
    )
    // A body limit below the answer's length: blue's answer streams (a mirror's
    // comparison would hold it whole; that case is below).
    .replace("green: up}", "green: up, filters: [audit], max_body_bytes: 50}");
    let p = start(&yaml, TokenSource::Fixed(TOKEN.into())).await;
    let c = client();
    let req = http::Request::get(format!("http://{}/svc", p.proxy_addr))
        .header("x-request-id", "cut-1")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let res = c.request(req).await.unwrap();
    if res.status() != StatusCode::OK {
        use http_body_util::BodyExt;
        let body = res.into_body().collect().await.unwrap().to_bytes();
        panic!(
            "not the upstream's head: {}",
            String::from_utf8_lossy(&body)
        );
    }
    use http_body_util::BodyExt;
    assert!(
        res.into_body().collect().await.is_err(),
        "the client sees the cut"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = scrape(&p).await;
    assert_eq!(
        sample(
            &text,
            r#"acge_upstream_errors_total{route="cut",version="blue",kind="body"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"acge_requests_total{route="cut",version="blue",code_class="5xx"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"acge_requests_total{route="cut",version="blue",code_class="2xx"}"#
        )
        .unwrap_or(0.0),
        0.0
    );
    let status = get(&c, &format!("http://{}/migration", p.admin_addr), &[])
        .await
        .json();
    assert_eq!(status["routes"]["cut"]["blue"]["errors"], 1, "{status}");
    let record = audit_records(dir.path())
        .into_iter()
        .find(|r| r.request_id == "cut-1" && r.decision != "shadow")
        .unwrap();
    assert_eq!((record.status, record.decision.as_str()), (502, "error"));

    // Held whole (here for the shadow comparison), a cut body is a clean 502.
    let dir = tempfile::tempdir().unwrap();
    let held = start(
        &yaml
            .replace(", max_body_bytes: 50", "")
            .replace(&dir_path_of(&yaml), &dir.path().display().to_string()),
        TokenSource::Fixed(TOKEN.into()),
    )
    .await;
    let r = get(&c, &format!("http://{}/svc", held.proxy_addr), &[]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.json()["error"], "upstream_body_cut");
    let text = scrape(&held).await;
    assert!(
        sample(
            &text,
            r#"acge_upstream_errors_total{route="cut",version="blue",kind="body"}"#
        ) >= Some(2.0),
        "{text}"
    );
}

/// The audit directory a test config names.
fn dir_path_of(yaml: &str) -> String {
    let at = yaml.find("audit: {dir: ").unwrap() + "audit: {dir: ".len();
    yaml[at..].split(',').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_headers_over_the_clusters_limit_are_502() {
    let huge = scripted_upstream(|mut s| async move {
        read_head(&mut s).await;
        let big = "v".repeat(100 * 1024);
        let _ = s
            .write_all(
                format!("HTTP/1.1 200 OK\r\nx-huge: {big}\r\ncontent-length: 2\r\n\r\nok")
                    .as_bytes(),
            )
            .await;
    })
    .await;
    let p = start(
        &config_with(
            "bighead",
            huge,
            "",
            ", max_response_header_bytes: 16384",
            "",
        ),
        TokenSource::None,
    )
    .await;
    let r = get(&client(), &format!("http://{}/svc", p.proxy_addr), &[]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.json()["error"], "upstream_headers_too_large");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_headers_must_be_one_and_unknown_codings_are_refused() {
    let (up, mut seen) = recording_upstream().await;
    let p = start(&config_with("hosts", up, "", "", ""), TokenSource::None).await;
    let two = raw(
        p.proxy_addr,
        b"GET /svc HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(two.starts_with("HTTP/1.1 400"), "{two}");
    assert!(two.contains("bad_host"), "{two}");
    let none = raw(
        p.proxy_addr,
        b"GET /svc HTTP/1.1\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(none.starts_with("HTTP/1.1 400"), "{none}");
    let gzip = raw(
        p.proxy_addr,
        b"POST /svc HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
    )
    .await;
    assert!(gzip.starts_with("HTTP/1.1 501"), "{gzip}");
    assert!(gzip.contains("unsupported_transfer_coding"), "{gzip}");
    assert!(seen.try_recv().is_err(), "none of them went upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_spelt_around_a_route_still_meets_its_filters() {
    let (up, mut seen) = recording_upstream().await;
    let yaml = format!(
        "listener: {{address: 127.0.0.1:0}}
admin: {{address: 127.0.0.1:0}}
clusters:
  up: {{endpoints: [\"{up}\"]}}
routes:
  - {{name: public, match: {{path_prefix: /}}, blue: up, green: up}}
  - {{name: secure, match: {{path_prefix: /secure}}, blue: up, green: up, filters: [constitutional_hash]}}
filters:
  constitutional_hash: {{mode: enforce}}
"
    );
    let p = start(&yaml, TokenSource::None).await;
    for path in [
        "/public/../secure/x",
        "/%73ecure/x",
        "/public/%2e%2e/secure/x",
        "//secure/x",
    ] {
        let answer = raw(
            p.proxy_addr,
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(
            answer.starts_with("HTTP/1.1 403"),
            "{path} skipped the secure route's hash check: {answer}"
        );
    }
    let answer = raw(
        p.proxy_addr,
        format!("GET /public/../secure/./x?q=1 HTTP/1.1\r\nHost: t\r\nx-constitutional-hash: {HASH}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        seen.recv().await.unwrap().path,
        "/secure/x?q=1",
        "the normalised path is forwarded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_the_proxy_sets_itself_are_not_taken_from_clients() {
    let (up, mut seen) = recording_upstream().await;
    let forged = [
        ("x-acge-hash-check", "match"),
        ("x-acge-shadow", "true"),
        ("x-acge-request-compliance", "1.0000"),
        ("x-acge-version", "green"),
    ];
    let p = start(&config_with("strip", up, "", "", ""), TokenSource::None).await;
    let r = get(&client(), &format!("http://{}/svc", p.proxy_addr), &forged).await;
    assert_eq!(r.status, StatusCode::OK);
    let got = seen.recv().await.unwrap();
    for (name, _) in forged {
        assert!(
            !got.headers.contains_key(name),
            "{name} reached the upstream"
        );
    }
    let trusted = start(
        &config_with("trusted", up, ", trust_acge_headers: true", "", ""),
        TokenSource::None,
    )
    .await;
    get(
        &client(),
        &format!("http://{}/svc", trusted.proxy_addr),
        &forged,
    )
    .await;
    let got = seen.recv().await.unwrap();
    assert_eq!(
        got.headers["x-acge-hash-check"], "match",
        "trusted when configured"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clusters_connection_limit_bounds_the_wait_for_a_connection() {
    // An upstream that takes 800 ms to answer.
    let slow = scripted_upstream(|mut s| async move {
        loop {
            if read_head(&mut s).await.is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(800)).await;
            if s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await
                .is_err()
            {
                return;
            }
        }
    })
    .await;
    let p = start(
        &config_with(
            "pool",
            slow,
            "",
            ", max_connections: 2, max_pending_ms: 200",
            "",
        ),
        TokenSource::None,
    )
    .await;
    let url = format!("http://{}/svc", p.proxy_addr);
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let url = url.clone();
        tasks.push(tokio::spawn(async move { get(&client(), &url, &[]).await }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut statuses = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        if r.status == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(r.json()["error"], "upstream_overloaded");
        }
        statuses.push(r.status.as_u16());
    }
    statuses.sort_unstable();
    assert_eq!(statuses, vec![200, 200, 503]);
    assert!(refused(&scrape(&p).await, "upstream_pending") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_slowloris_connections_do_not_stop_normal_requests() {
    let up = acge_proxy::demo::spawn_backend(
        "loris",
        acge_proxy::proxy::split::Version::Blue,
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let p = start(
        &config_with("loris", up.addr, ", header_read_timeout_ms: 2000", "", ""),
        TokenSource::None,
    )
    .await;
    let addr = p.proxy_addr;
    let lorises: Vec<_> = (0..200)
        .map(|_| {
            tokio::spawn(async move {
                let Ok(mut s) = TcpStream::connect(addr).await else {
                    return;
                };
                let _ = s.write_all(b"GET /svc HTTP/1.1\r\nHost: t\r\n").await;
                for i in 0..100 {
                    if s.write_all(format!("x-slow-{i}: 1\r\n").as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = client();
    let started = Instant::now();
    for _ in 0..50 {
        let r = get(&c, &format!("http://{addr}/svc"), &[]).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "50 requests beside 200 slow clients took {:?}",
        started.elapsed()
    );
    for l in lorises {
        l.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_timeout_runs_from_the_end_of_the_upload() {
    let (up, _seen) = recording_upstream().await;
    let p = start(
        &config_with("upload", up, "", ", timeout_ms: 500", ""),
        TokenSource::None,
    )
    .await;
    // A chunked upload that takes 1.5 s; the upstream answers as soon as it ends.
    let mut s = TcpStream::connect(p.proxy_addr).await.unwrap();
    s.write_all(
        b"POST /svc HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    for _ in 0..6 {
        s.write_all(b"3\r\nabc\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_limits_reach_the_wire() {
    let up = acge_proxy::demo::spawn_backend(
        "h2lim",
        acge_proxy::proxy::split::Version::Blue,
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let p = start(
        &config_with("h2lim", up.addr, ", h2_max_concurrent_streams: 7", "", ""),
        TokenSource::None,
    )
    .await;
    let tcp = TcpStream::connect(p.proxy_addr).await.unwrap();
    let (mut client, mut conn) = h2::client::handshake(tcp).await.unwrap();
    let req = http::Request::get(format!("http://{}/svc", p.proxy_addr))
        .body(())
        .unwrap();
    let (res, _) = client.send_request(req, true).unwrap();
    tokio::pin!(res);
    let res = tokio::select! {
        res = &mut res => res.unwrap(),
        ended = &mut conn => panic!("the connection ended first: {ended:?}"),
    };
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        conn.max_concurrent_send_streams(),
        7,
        "the server's SETTINGS carry the configured stream limit"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_rapid_reset_flood_closes_the_connection() {
    let (slow, _task) = silent_server().await;
    let p = start(
        &config_with(
            "reset",
            slow,
            ", h2_max_pending_resets: 5",
            ", timeout_ms: 20000",
            "",
        ),
        TokenSource::None,
    )
    .await;
    let tcp = TcpStream::connect(p.proxy_addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let mut refused_streams = false;
    for _ in 0..2000 {
        let req = http::Request::get(format!("http://{}/svc", p.proxy_addr))
            .body(())
            .unwrap();
        match client.send_request(req, false) {
            // Dropping both halves resets the stream at once.
            Ok((res, stream)) => drop((res, stream)),
            Err(_) => {
                refused_streams = true;
                break;
            }
        }
        match client.ready().await {
            Ok(c) => client = c,
            Err(_) => {
                refused_streams = true;
                break;
            }
        }
    }
    let ended = tokio::time::timeout(Duration::from_secs(5), conn).await;
    assert!(
        refused_streams || matches!(ended, Ok(Ok(Err(_)))),
        "2,000 reset streams were all accepted: {ended:?}"
    );
    // The proxy still serves others.
    let up = acge_proxy::demo::spawn_backend(
        "after",
        acge_proxy::proxy::split::Version::Blue,
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let other = start(
        &config_with("after", up.addr, "", "", ""),
        TokenSource::None,
    )
    .await;
    assert_eq!(
        get(
            &client_h1(),
            &format!("http://{}/svc", other.proxy_addr),
            &[]
        )
        .await
        .status,
        StatusCode::OK
    );
}

fn client_h1() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<bytes::Bytes>,
> {
    client()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_proxy_keeps_answering() {
    let up = acge_proxy::demo::spawn_backend(
        "fds",
        acge_proxy::proxy::split::Version::Blue,
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let (proxy_addr, admin_addr) = (closed_port().await, closed_port().await);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("fds.yaml");
    std::fs::write(
        &config,
        format!(
            "listener: {{address: \"{proxy_addr}\"}}\nadmin: {{address: \"{admin_addr}\"}}\nclusters:\n  up: {{endpoints: [\"{}\"]}}\nroutes:\n  - {{name: fds, match: {{path_prefix: /svc}}, blue: up, green: up}}\n",
            up.addr
        ),
    )
    .unwrap();
    // The proxy may hold 64 descriptors; 200 idle clients ask for more.
    let _child = Killed(
        std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "ulimit -n 64 && exec {} run --config {} --workers 1",
                env!("CARGO_BIN_EXE_acge-proxy"),
                config.display()
            ))
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(proxy_addr).await.is_err() {
        assert!(Instant::now() < deadline, "the proxy did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut idle = Vec::new();
    for _ in 0..200 {
        if let Ok(mut s) = TcpStream::connect(proxy_addr).await {
            let _ = keepalive_get(&mut s, "/svc").await;
            idle.push(s);
        }
    }
    // Past the limit, a new client is still answered: descriptors are freed by shedding
    // the oldest idle connections.
    let mut answered = false;
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        if let Ok(mut s) = TcpStream::connect(proxy_addr).await {
            if keepalive_get(&mut s, "/svc").await.as_deref() == Some("HTTP/1.1 200 OK") {
                answered = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        answered,
        "with its descriptors spent, the proxy stopped answering"
    );
    let live = get(&client(), &format!("http://{admin_addr}/live"), &[]).await;
    assert_eq!(live.status, StatusCode::OK, "and /live answers");
}

/// A child process, killed when the test ends however it ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
