//! TLS to upstreams (`clusters.<name>.tls`) against a real rustls server that requires
//! client certificates: mTLS over HTTP/1.1 and HTTP/2 agreed by ALPN, the refusals
//! (an untrusted server, a wrong name, no client certificate), and a client
//! certificate rotated on disk reaching new connections.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use acge_proxy::config::Config;
use acge_proxy::control::admin::TokenSource;
use bytes::Bytes;
use common::{client, get, sample, scrape};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use sha2::Digest;
use tokio::net::TcpListener;

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.self_signed(&key).unwrap();
        Self { cert, key }
    }

    /// A leaf for `names`, for a server or a client; its PEM chain and key.
    fn leaf(&self, names: &[&str], purpose: ExtendedKeyUsagePurpose) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.extended_key_usages = vec![purpose];
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A TLS server that requires a client certificate from `ca`, offers h2 and
/// http/1.1, and answers each request with its HTTP version and a fingerprint of the
/// client certificate the connection was made with.
async fn mtls_upstream(ca: &Ca) -> SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let (cert_pem, key_pem) = ca.leaf(
        &["upstream.test", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let chain: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .map(Result::unwrap)
        .collect();
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .unwrap()
        .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let client = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|c| hex::encode(&sha2::Sha256::digest(c.as_ref())[..8]))
                    .unwrap_or_else(|| "none".into());
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let body = format!("{:?} {client}", req.version());
                        async move {
                            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                                Bytes::from(body),
                            )))
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    addr
}

fn fingerprint(cert_pem: &str) -> String {
    let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    hex::encode(&sha2::Sha256::digest(der.as_ref())[..8])
}

fn write(dir: &Path, name: &str, text: &str) {
    let tmp = dir.join(format!("{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

async fn proxy(yaml: &str) -> acge_proxy::Running {
    let config = Config::from_yaml(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    acge_proxy::start(config, acge_proxy::StartOptions::new(TokenSource::None))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_to_a_real_tls_upstream_over_http1_and_http2_by_alpn() {
    let ca = Ca::new("test CA");
    let upstream = mtls_upstream(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "ca.pem", &ca.cert.pem());
    let (cert, key) = ca.leaf(&["acge-sidecar"], ExtendedKeyUsagePurpose::ClientAuth);
    write(d, "client.pem", &cert);
    write(d, "client.key", &key);
    let tls = format!(
        "tls: {{ca: \"{0}/ca.pem\", cert: \"{0}/client.pem\", key: \"{0}/client.key\", sni: upstream.test}}",
        d.display()
    );
    let p = proxy(&format!(
        "listener: {{address: 127.0.0.1:0}}
admin: {{address: 127.0.0.1:0}}
clusters:
  h1: {{endpoints: [\"{upstream}\"], {tls}}}
  h2: {{endpoints: [\"{upstream}\"], protocol: http2, {tls}}}
  by-ip: {{endpoints: [\"{upstream}\"], {}}}
routes:
  - {{name: one, match: {{path_prefix: /one}}, blue: h1, green: h1}}
  - {{name: two, match: {{path_prefix: /two}}, blue: h2, green: h2}}
  - {{name: ip, match: {{path_prefix: /ip}}, blue: by-ip, green: by-ip}}
",
        tls.replace(", sni: upstream.test", "")
    ))
    .await;
    let c = client();
    let fp = fingerprint(&cert);
    for _ in 0..3 {
        let r = get(&c, &format!("http://{}/one", p.proxy_addr), &[]).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(String::from_utf8_lossy(&r.body), format!("HTTP/1.1 {fp}"));
        let r = get(&c, &format!("http://{}/two", p.proxy_addr), &[]).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(
            String::from_utf8_lossy(&r.body),
            format!("HTTP/2.0 {fp}"),
            "HTTP/2 agreed by ALPN, with the client certificate"
        );
    }
    // Without `sni`, the endpoint's IP is the name verified (the certificate has it).
    let r = get(&c, &format!("http://{}/ip", p.proxy_addr), &[]).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_server_a_wrong_name_and_a_missing_client_certificate_are_refused() {
    let ca = Ca::new("test CA");
    let other = Ca::new("another CA");
    let upstream = mtls_upstream(&ca).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "ca.pem", &ca.cert.pem());
    write(d, "other.pem", &other.cert.pem());
    let (cert, key) = ca.leaf(&["acge-sidecar"], ExtendedKeyUsagePurpose::ClientAuth);
    write(d, "client.pem", &cert);
    write(d, "client.key", &key);
    let d = d.display();
    let p = proxy(&format!(
        "listener: {{address: 127.0.0.1:0}}
admin: {{address: 127.0.0.1:0}}
clusters:
  untrusted: {{endpoints: [\"{upstream}\"], tls: {{ca: \"{d}/other.pem\", cert: \"{d}/client.pem\", key: \"{d}/client.key\", sni: upstream.test}}}}
  wrong-name: {{endpoints: [\"{upstream}\"], tls: {{ca: \"{d}/ca.pem\", cert: \"{d}/client.pem\", key: \"{d}/client.key\", sni: elsewhere.test}}}}
  no-client-cert: {{endpoints: [\"{upstream}\"], tls: {{ca: \"{d}/ca.pem\", sni: upstream.test}}}}
routes:
  - {{name: untrusted, match: {{path_prefix: /untrusted}}, blue: untrusted, green: untrusted}}
  - {{name: wrongname, match: {{path_prefix: /wrong}}, blue: wrong-name, green: wrong-name}}
  - {{name: nocert, match: {{path_prefix: /nocert}}, blue: no-client-cert, green: no-client-cert}}
"
    ))
    .await;
    let c = client();
    for (path, needle) in [
        ("/untrusted", "UnknownIssuer"),
        ("/wrong", "not valid for name"),
    ] {
        let r = get(&c, &format!("http://{}{path}", p.proxy_addr), &[]).await;
        assert_eq!(r.status, 502, "{path}: {:?}", r.body);
        let body = r.json();
        assert_eq!(body["error"], "tls", "{path}: {body}");
        assert!(
            body["detail"].as_str().unwrap().contains(needle),
            "{path}: {body}"
        );
    }
    // TLS 1.3: the client's handshake ends before the server judges its certificate,
    // so the refusal arrives as the connection's first read.
    let r = get(&c, &format!("http://{}/nocert", p.proxy_addr), &[]).await;
    assert_eq!(r.status, 502, "{:?}", r.body);
    let m = scrape(&p).await;
    assert!(
        sample(
            &m,
            "acge_upstream_errors_total{route=\"untrusted\",version=\"blue\",kind=\"tls\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{m}"
    );
    p.shutdown().await;
}

/// A proxy with one mTLS cluster `up` (`/svc`), whose client pair lives in a
/// directory the test rotates; pooled connections expire after 50 ms, so that a
/// request a little later opens a new one.
struct Rotating {
    ca: Ca,
    dir: tempfile::TempDir,
    proxy: acge_proxy::Running,
    /// The client certificate loaded at start.
    first: String,
}

impl Rotating {
    async fn start(reload_ms: u64) -> Self {
        let ca = Ca::new("test CA");
        let upstream = mtls_upstream(&ca).await;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(d, "ca.pem", &ca.cert.pem());
        let (first, key) = ca.leaf(&["acge-sidecar"], ExtendedKeyUsagePurpose::ClientAuth);
        write(d, "client.pem", &first);
        write(d, "client.key", &key);
        let proxy = proxy(&format!(
            "listener: {{address: 127.0.0.1:0}}
admin: {{address: 127.0.0.1:0}}
clusters:
  up: {{endpoints: [\"{upstream}\"], idle_timeout_ms: 50, tls: {{ca: \"{0}/ca.pem\", cert: \"{0}/client.pem\", key: \"{0}/client.key\", sni: upstream.test, reload_ms: {reload_ms}}}}}
routes:
  - {{name: rot, match: {{path_prefix: /svc}}, blue: up, green: up}}
",
            d.display()
        ))
        .await;
        Self {
            ca,
            dir,
            proxy,
            first,
        }
    }

    /// Writes a new client pair (the key first, as a Secret's update may); returns
    /// the answer a connection made with it gets.
    fn rotate(&self) -> String {
        let (cert, key) = self
            .ca
            .leaf(&["acge-sidecar"], ExtendedKeyUsagePurpose::ClientAuth);
        write(self.dir.path(), "client.key", &key);
        write(self.dir.path(), "client.pem", &cert);
        format!("HTTP/1.1 {}", fingerprint(&cert))
    }

    async fn answer(&self) -> String {
        let url = format!("http://{}/svc", self.proxy.proxy_addr);
        String::from_utf8_lossy(&get(&client(), &url, &[]).await.body).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_client_certificate_reaches_new_connections_and_a_broken_one_is_refused() {
    let r = Rotating::start(100).await;
    assert_eq!(
        r.answer().await,
        format!("HTTP/1.1 {}", fingerprint(&r.first))
    );
    let want = r.rotate();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Past the pool's idle timeout, so each request opens a new connection.
        tokio::time::sleep(Duration::from_millis(120)).await;
        if r.answer().await == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rotated certificate never reached a connection"
        );
    }
    let loaded = "acge_upstream_tls_reloads_total{cluster=\"up\",result=\"loaded\"}";
    assert!(sample(&scrape(&r.proxy).await, loaded).is_some_and(|n| n >= 1.0));

    // A key that does not load is refused; the rotated pair keeps serving.
    write(r.dir.path(), "client.key", "not a key\n");
    let refused = "acge_upstream_tls_reloads_total{cluster=\"up\",result=\"refused\"}";
    let deadline = Instant::now() + Duration::from_secs(10);
    while sample(&scrape(&r.proxy).await, refused).is_none() {
        assert!(Instant::now() < deadline, "the broken key was never read");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(r.answer().await, want);
    r.proxy.shutdown().await;
}

/// What `SIGHUP` does ([`acge_proxy::Running::reload_certificates`]): a cluster that
/// does not poll its files (`reload_ms: 0`) takes a rotated pair at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_certificates_reads_a_clusters_files_again_now() {
    let r = Rotating::start(0).await;
    assert_eq!(
        r.answer().await,
        format!("HTTP/1.1 {}", fingerprint(&r.first))
    );
    assert!(!r.proxy.reload_certificates().await, "nothing changed yet");
    let want = r.rotate();
    assert!(
        r.proxy.reload_certificates().await,
        "the rotated pair loaded"
    );
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(r.answer().await, want);
    r.proxy.shutdown().await;
}

#[test]
fn cluster_tls_mistakes_name_their_field_and_line() {
    let yaml = "listener: {address: 127.0.0.1:0}
clusters:
  up:
    endpoints: [\"127.0.0.1:1\"]
    protocol: http2
    tls: {ca: ca.pem, cert: c.pem, sni: \"not a name!\", alpn: [http/1.1]}
routes:
  - {name: r, match: {path_prefix: /}, blue: up, green: up}
";
    let e = Config::from_yaml(yaml, "t.yaml").unwrap_err().errors;
    let got: Vec<(String, Option<usize>)> = e.iter().map(|e| (e.path.clone(), e.line)).collect();
    assert_eq!(
        got,
        [
            ("clusters.up.tls.key".to_string(), Some(6)),
            ("clusters.up.tls.sni".to_string(), Some(6)),
            ("clusters.up.tls.alpn".to_string(), Some(6)),
        ],
        "{e:?}"
    );
    assert!(e[2].message.contains("must offer h2"), "{}", e[2]);
}
