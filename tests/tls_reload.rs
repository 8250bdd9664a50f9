//! The listener's certificate rotates without a dropped connection: a new pair written
//! over the files serves new handshakes within `reload_ms`, a connection opened before
//! keeps working (on the pair it was made with), and a pair whose key is not the
//! certificate's is refused while the current one keeps serving.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use acge_proxy::control::admin::TokenSource;
use common::*;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

struct Pair {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
}

fn pair() -> Pair {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    Pair {
        cert_pem: c.cert.pem(),
        key_pem: c.key_pair.serialize_pem(),
        der: c.cert.der().clone(),
    }
}

/// Writes both files as a Kubernetes Secret update does: each replaced whole.
fn install(dir: &std::path::Path, cert: &str, key: &str) {
    for (name, text) in [("cert.pem", cert), ("key.pem", key)] {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

fn connector(trusted: &[&Pair]) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for p in trusted {
        roots.add(p.der.clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    TlsConnector::from(Arc::new(config))
}

async fn connect(
    tls: &TlsConnector,
    addr: std::net::SocketAddr,
) -> TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tls.connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("the TLS handshake succeeds")
}

fn served(s: &TlsStream<tokio::net::TcpStream>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0]
        .clone()
        .into_owned()
}

/// One keep-alive HTTP/1.1 request on the stream; the status line.
async fn request(s: &mut TlsStream<tokio::net::TcpStream>) -> String {
    s.write_all(b"GET /x HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .expect("the connection is open");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head_end, length) = loop {
        let n = s.read(&mut chunk).await.expect("the connection is open");
        assert!(n > 0, "the proxy closed the connection");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..at]).to_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse::<usize>().unwrap())
                .expect("a content-length");
            break (at + 4, length);
        }
    };
    while buf.len() < head_end + length {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "the proxy closed the connection mid-body");
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&buf[..buf.iter().position(|b| *b == b'\r').unwrap()]).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_serves_new_handshakes_and_no_connection_drops() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (pair(), pair());
    install(dir.path(), &a.cert_pem, &a.key_pem);
    let up = acge_proxy::demo::spawn_backend(
        "tls-reload",
        acge_proxy::proxy::split::Version::Blue,
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let yaml = format!(
        "listener: {{address: 127.0.0.1:0, tls: {{cert: {}, key: {}, reload_ms: 50}}}}
admin: {{address: 127.0.0.1:0}}
clusters:
  up: {{endpoints: [\"{}\"]}}
routes:
  - {{name: tls-reload, match: {{path_prefix: /}}, blue: up, green: up}}
",
        dir.path().join("cert.pem").display(),
        dir.path().join("key.pem").display(),
        up.addr
    );
    let p = start(&yaml, TokenSource::None).await;
    let tls = connector(&[&a, &b]);

    let mut old = connect(&tls, p.proxy_addr).await;
    assert_eq!(served(&old), a.der);
    assert_eq!(request(&mut old).await, "HTTP/1.1 200 OK");

    install(dir.path(), &b.cert_pem, &b.key_pem);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let fresh = connect(&tls, p.proxy_addr).await;
        if served(&fresh) == b.der {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new handshakes still get the old certificate"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The connection made before the rotation is still open, on its own pair.
    assert_eq!(request(&mut old).await, "HTTP/1.1 200 OK");
    assert_eq!(served(&old), a.der);

    // A key that is not the certificate's: refused, and B keeps serving.
    install(dir.path(), &a.cert_pem, &b.key_pem);
    let deadline = Instant::now() + Duration::from_secs(5);
    let metrics = loop {
        let m = scrape(&p).await;
        if sample(&m, r#"acge_tls_reloads_total{result="refused"}"#).is_some_and(|n| n >= 1.0) {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "the bad pair was never refused:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        sample(&metrics, r#"acge_tls_reloads_total{result="loaded"}"#),
        Some(1.0)
    );
    let mut fresh = connect(&tls, p.proxy_addr).await;
    assert_eq!(
        served(&fresh),
        b.der,
        "the refused pair did not replace the good one"
    );
    assert_eq!(request(&mut fresh).await, "HTTP/1.1 200 OK");
    assert_eq!(request(&mut old).await, "HTTP/1.1 200 OK");
    p.shutdown().await;
}
