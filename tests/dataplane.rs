//! The data plane as clients and upstreams see it: failures mapped to JSON statuses,
//! header hygiene, streaming, HTTP/2 and TLS with real clients (curl), graceful drain.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use acge_proxy::control::admin::TokenSource;
use common::*;
use http::{Method, StatusCode};

fn one_cluster(endpoint: &str, extra_cluster: &str) -> String {
    format!(
        "listener: {{address: 127.0.0.1:0}}
admin: {{address: 127.0.0.1:0}}
clusters:
  up: {{endpoints: [{endpoint}]{extra_cluster}}}
routes:
  - {{name: dp, match: {{path_prefix: /svc}}, blue: up, green: up}}
"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_is_502_json() {
    let down = closed_port().await;
    let p = start(&one_cluster(&format!("\"{down}\""), ""), TokenSource::None).await;
    let r = get(&client(), &format!("http://{}/svc", p.proxy_addr), &[]).await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert_eq!(r.headers["content-type"], "application/json");
    let v = r.json();
    assert_eq!(v["error"], "connect");
    assert!(
        v["detail"].as_str().unwrap().contains(&down.to_string()),
        "{v}"
    );
    assert!(r.headers.contains_key("x-request-id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_upstream_is_504_json() {
    let (slow, _task) = silent_server().await;
    let p = start(
        &one_cluster(&format!("\"{slow}\""), ", timeout_ms: 300"),
        TokenSource::None,
    )
    .await;
    let started = Instant::now();
    let r = get(&client(), &format!("http://{}/svc", p.proxy_addr), &[]).await;
    assert_eq!(r.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(r.json()["error"], "timeout");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the timeout applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_without_endpoints_is_503_json() {
    let p = start(&one_cluster("", ""), TokenSource::None).await;
    let r = get(&client(), &format!("http://{}/svc", p.proxy_addr), &[]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json()["error"], "no_endpoint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_path_is_404_json() {
    let s = setup("nf", 0, "").await;
    let r = get(&client(), &s.url("/elsewhere"), &[]).await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.json()["error"], "no_route");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_are_not_forwarded() {
    let s = setup("hop", 0, "").await;
    let answer = raw(
        s.proxy.proxy_addr,
        b"GET /svc HTTP/1.1\r\nHost: example\r\nConnection: close, X-Private-Hop\r\n\
          X-Private-Hop: secret\r\nKeep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\n\
          TE: trailers\r\nUpgrade: h2c\r\nX-Kept: yes\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    let seen = v["received_headers"].as_object().unwrap();
    for hop in [
        "connection",
        "x-private-hop",
        "keep-alive",
        "proxy-connection",
        "te",
        "upgrade",
        "transfer-encoding",
    ] {
        assert!(!seen.contains_key(hop), "{hop} was forwarded: {seen:?}");
    }
    assert_eq!(seen["x-kept"], "yes");
    assert_eq!(
        seen["host"], "example",
        "Host is the client's, not the endpoint's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_and_request_id() {
    let s = setup("fwd", 0, "").await;
    let c = client();
    let r = get(&c, &s.url("/svc"), &[("x-forwarded-for", "203.0.113.7")]).await;
    let seen = &r.json()["received_headers"];
    assert_eq!(seen["x-forwarded-for"], "203.0.113.7, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    let id = r.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 36, "a generated UUID: {id}");
    assert_eq!(
        seen["x-request-id"],
        id.as_str(),
        "the upstream saw the id the client got"
    );

    let r = get(&c, &s.url("/svc"), &[("x-request-id", "abc-123")]).await;
    assert_eq!(r.headers["x-request-id"], "abc-123");
    assert_eq!(r.json()["received_headers"]["x-request-id"], "abc-123");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_headers_get_431_json_and_garbage_gets_400() {
    let s = setup("big", 0, "").await;
    let big = "x".repeat(40 * 1024);
    let r = get(&client(), &s.url("/svc"), &[("x-big", &big)]).await;
    assert_eq!(r.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(r.json()["error"], "request_header_fields_too_large");

    // A request line hyper cannot parse is answered by hyper itself: 400, no body.
    let answer = raw(s.proxy.proxy_addr, b"NOT HTTP AT ALL\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_through() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An upstream that says when the first bytes of a body arrive, then reads it all.
    let (first_bytes, mut arrived) = tokio::sync::mpsc::unbounded_channel();
    let up = scripted_upstream(move |mut s| {
        let first_bytes = first_bytes.clone();
        async move {
            let head = read_head(&mut s).await;
            assert!(
                head.to_ascii_lowercase()
                    .contains("transfer-encoding: chunked"),
                "{head}"
            );
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0usize;
            let mut told = false;
            while let Ok(n) = s.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                total += n;
                if !told {
                    let _ = first_bytes.send(());
                    told = true;
                }
                if buf[..n].ends_with(b"0\r\n\r\n") {
                    break;
                }
            }
            let _ = s
                .write_all(
                    format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{total}",
                        total.to_string().len()
                    )
                    .as_bytes(),
                )
                .await;
        }
    })
    .await;
    let p = start(&one_cluster(&format!("\"{up}\""), ""), TokenSource::None).await;
    let mut client = tokio::net::TcpStream::connect(p.proxy_addr).await.unwrap();
    client
        .write_all(b"POST /svc/upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let chunk = vec![b'a'; 1024 * 1024];
    client
        .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
        .await
        .unwrap();
    client.write_all(&chunk).await.unwrap();
    client.write_all(b"\r\n").await.unwrap();
    // The upstream must see the first megabyte before the client sends the other seven.
    tokio::time::timeout(Duration::from_secs(5), arrived.recv())
        .await
        .expect("the first bytes reached the upstream while the upload was still going on")
        .unwrap();
    for _ in 0..7 {
        client
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        client.write_all(&chunk).await.unwrap();
        client.write_all(b"\r\n").await.unwrap();
    }
    client.write_all(b"0\r\n\r\n").await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "-i", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl is installed (make setup)");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_request_works() {
    let s = setup("h2c", 100, "").await;
    let url = s.url("/svc/h2");
    let out = tokio::task::spawn_blocking(move || curl(&["--http2-prior-knowledge", &url]))
        .await
        .unwrap();
    assert!(out.starts_with("HTTP/2 200"), "{out}");
    assert!(out.contains("x-acge-backend: green"), "{out}");
    // HTTP/2 has no Host header; the upstream still sees the authority as Host.
    assert!(out.contains(r#""host":"127.0.0.1:"#), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_serves_h2_and_http11_by_alpn() {
    let dir = std::env::temp_dir().join(format!("acge-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_path, key_path, ca_path) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&ca_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();

    let any = "127.0.0.1:0".parse().unwrap();
    let up = acge_proxy::demo::spawn_backend("tls", acge_proxy::proxy::split::Version::Blue, any)
        .await
        .unwrap();
    let yaml = format!(
        "listener: {{address: 127.0.0.1:0, tls: {{cert: {}, key: {}}}}}
admin: {{address: 127.0.0.1:0}}
clusters:
  up: {{endpoints: [\"{}\"]}}
routes:
  - {{name: tls, match: {{path_prefix: /}}, blue: up, green: up}}
",
        cert_path.display(),
        key_path.display(),
        up.addr
    );
    let p = start(&yaml, TokenSource::None).await;
    let port = p.proxy_addr.port();
    let resolve = format!("localhost:{port}:127.0.0.1");
    let url = format!("https://localhost:{port}/x");
    let ca = ca_path.display().to_string();
    let (h2, h1) = tokio::task::spawn_blocking(move || {
        (
            curl(&["--http2", "--cacert", &ca, "--resolve", &resolve, &url]),
            curl(&["--http1.1", "--cacert", &ca, "--resolve", &resolve, &url]),
        )
    })
    .await
    .unwrap();
    assert!(h2.starts_with("HTTP/2 200"), "{h2}");
    assert!(h2.contains(r#""x-forwarded-proto":"https""#), "{h2}");
    assert!(h1.starts_with("HTTP/1.1 200"), "{h1}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_in_flight_requests_finish() {
    // A backend that answers after 500 ms, so a request is in flight at shutdown.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let slow = l.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                let _ = s
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\ndone",
                    )
                    .await;
            });
        }
    });
    let p = start(&one_cluster(&format!("\"{slow}\""), ""), TokenSource::None).await;
    let url = format!("http://{}/svc", p.proxy_addr);
    let addr = p.proxy_addr;
    let in_flight = tokio::spawn(async move { get(&client(), &url, &[]).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    p.shutdown().await;
    let r = in_flight.await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(&r.body[..], b"done");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_closing_idle_connections_causes_no_error() {
    // An upstream that answers one request per connection with keep-alive, then closes
    // the connection shortly after, as servers with short idle timeouts do.
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = l.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            });
        }
    });
    let p = start(&one_cluster(&format!("\"{up}\""), ""), TokenSource::None).await;
    let c = client();
    for i in 0..10 {
        let r = get(&c, &format!("http://{}/svc", p.proxy_addr), &[]).await;
        assert_eq!(r.status, StatusCode::OK, "request {i}: {:?}", r.body);
        tokio::time::sleep(Duration::from_millis(if i % 2 == 0 { 50 } else { 0 })).await;
    }
    assert!(
        accepted.load(std::sync::atomic::Ordering::SeqCst) >= 5,
        "closed connections were replaced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_upstream_cluster_works() {
    let s = setup("h2up", 0, "").await;
    let yaml = format!(
        "listener: {{address: 127.0.0.1:0}}
admin: {{address: 127.0.0.1:0}}
clusters:
  up: {{endpoints: [\"{}\"], protocol: http2}}
routes:
  - {{name: h2up, match: {{path_prefix: /}}, blue: up, green: up}}
",
        s.blue.addr
    );
    let p = start(&yaml, TokenSource::None).await;
    let c = client();
    for _ in 0..5 {
        let r = send(
            &c,
            Method::POST,
            &format!("http://{}/svc/x", p.proxy_addr),
            &[],
            vec![b'z'; 100_000],
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.json()["body_bytes"], 100_000);
    }
}

/// The drain order: on shutdown `/ready` turns 503 `draining` at once while requests
/// are still served for `drain_delay_ms`; only then does the listener stop accepting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_turns_ready_to_503_and_serves_through_the_drain_delay() {
    let up = acge_proxy::demo::spawn_backend(
        "drain",
        acge_proxy::proxy::split::Version::Blue,
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let yaml = format!(
        "listener: {{address: 127.0.0.1:0, drain_delay_ms: 1500}}
admin: {{address: 127.0.0.1:0}}
clusters:
  up: {{endpoints: [\"{}\"]}}
routes:
  - {{name: drain, match: {{path_prefix: /svc}}, blue: up, green: up}}
",
        up.addr
    );
    let p = start(&yaml, TokenSource::None).await;
    let (proxy, admin) = (p.proxy_addr, p.admin_addr);
    let c = client();
    let ready = format!("http://{admin}/ready");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while get(&c, &ready, &[]).await.status != StatusCode::OK {
        assert!(std::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = std::time::Instant::now();
    let stopping = tokio::spawn(p.shutdown());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let r = get(&c, &ready, &[]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.json()["error"], "draining", "{:?}", r.body);
    // Inside the delay: still served, on a new connection too.
    let fresh = client();
    let r = get(&fresh, &format!("http://{proxy}/svc"), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "checked inside the delay"
    );
    stopping.await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "the listener stayed open for the whole delay"
    );
    assert!(
        tokio::net::TcpStream::connect(proxy).await.is_err(),
        "no longer accepting after the drain"
    );
}

/// Draining, HTTP/1: from the start of the drain delay every answer carries
/// `Connection: close` and the proxy closes the connection after it, so a keep-alive
/// client moves to a new connection between requests, never under one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_answers_http1_with_connection_close_and_closes_after_the_answer() {
    let up = acge_proxy::demo::spawn_backend(
        "close",
        acge_proxy::proxy::split::Version::Blue,
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let yaml = format!(
        "listener: {{address: 127.0.0.1:0, drain_delay_ms: 1000}}
admin: {{address: 127.0.0.1:0}}
clusters:
  up: {{endpoints: [\"{}\"]}}
routes:
  - {{name: close, match: {{path_prefix: /svc}}, blue: up, green: up}}
",
        up.addr
    );
    let p = start(&yaml, TokenSource::None).await;
    let proxy = p.proxy_addr;
    let request = b"GET /svc HTTP/1.1\r\nhost: x\r\n\r\n";
    let mut conn = tokio::net::TcpStream::connect(proxy).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(request).await.unwrap();
    let head = common::read_head(&mut conn).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        !head.to_ascii_lowercase().contains("connection: close"),
        "before the drain the connection stays open: {head}"
    );
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap();
    let mut body = vec![0u8; len];
    conn.read_exact(&mut body).await.unwrap();

    let stopping = tokio::spawn(p.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The same keep-alive connection: answered, told to close, then closed.
    conn.write_all(request).await.unwrap();
    let head = common::read_head(&mut conn).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "inside the drain delay the answer says close: {head}"
    );
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_millis(500), conn.read_to_end(&mut rest)).await;
    assert!(
        matches!(read, Ok(Ok(n)) if n == len),
        "the proxy closed the connection after the answer (while still in the delay): {read:?}"
    );
    stopping.await.unwrap();
}

/// Draining, HTTP/2: at the stop the client gets GOAWAY, and the stream in flight
/// still gets its whole answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_sends_http2_goaway_and_finishes_the_stream_in_flight() {
    let slow = common::scripted_upstream(|mut s| async move {
        use tokio::io::AsyncWriteExt;
        let _ = common::read_head(&mut s).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nslow")
            .await;
    })
    .await;
    let p = start(
        &common::config_with("goaway", slow, "", "", ""),
        TokenSource::None,
    )
    .await;
    let tcp = tokio::net::TcpStream::connect(p.proxy_addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = http::Request::get(format!("http://{}/svc", p.proxy_addr))
        .body(())
        .unwrap();
    let (res, _) = client.send_request(req, true).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stopping = tokio::spawn(p.shutdown());
    let res = tokio::time::timeout(Duration::from_secs(5), res)
        .await
        .expect("answered within the drain")
        .expect("the stream in flight is not refused");
    assert_eq!(res.status(), StatusCode::OK);
    let mut body = res.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        got.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(got, b"slow");
    // GOAWAY: the connection ends without error, and takes no new stream.
    let ended = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the server closed the HTTP/2 connection");
    assert!(
        matches!(ended, Ok(Ok(()))),
        "a graceful GOAWAY, not an error: {ended:?}"
    );
    let again = http::Request::get(format!("http://{}/svc", "x"))
        .body(())
        .unwrap();
    assert!(
        client.send_request(again, true).is_err(),
        "no new stream after GOAWAY"
    );
    stopping.await.unwrap();
}
