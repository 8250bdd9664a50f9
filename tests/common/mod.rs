//! Shared harness: demo backends and a proxy on 127.0.0.1 with free ports, and a small
//! HTTP client, so each test reads as what a user does and sees.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use acge_proxy::config::Config;
use acge_proxy::control::admin::TokenSource;
use acge_proxy::demo::{spawn_backend, Backend};
use acge_proxy::proxy::split::Version;
use acge_proxy::{Running, StartOptions};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const TOKEN: &str = "test-admin-token";

/// A proxy in front of one blue and one green demo backend.
pub struct Setup {
    pub proxy: Running,
    pub blue: Backend,
    pub green: Backend,
}

impl Setup {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy.proxy_addr, path)
    }

    pub fn admin(&self, path: &str) -> String {
        format!("http://{}{}", self.proxy.admin_addr, path)
    }
}

/// One route `name` on `/svc`, blue and green demo backends, with `route_extra` YAML
/// lines added to the route (indented by the caller's 4 spaces).
pub async fn setup(name: &'static str, weight: u8, route_extra: &str) -> Setup {
    setup_with(name, weight, route_extra, TokenSource::Fixed(TOKEN.into())).await
}

pub async fn setup_with(
    name: &'static str,
    weight: u8,
    route_extra: &str,
    token: TokenSource,
) -> Setup {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let blue = spawn_backend(name, Version::Blue, any).await.unwrap();
    let green = spawn_backend(name, Version::Green, any).await.unwrap();
    let yaml = format!(
        "listener: {{address: 127.0.0.1:0}}
admin: {{address: 127.0.0.1:0}}
clusters:
  blue: {{endpoints: [\"{}\"]}}
  green: {{endpoints: [\"{}\"]}}
routes:
  - name: {name}
    match: {{path_prefix: /svc}}
    blue: blue
    green: green
    green_weight: {weight}
{route_extra}",
        blue.addr, green.addr
    );
    let proxy = start(&yaml, token).await;
    Setup { proxy, blue, green }
}

pub async fn start(yaml: &str, token: TokenSource) -> Running {
    let config = Config::from_yaml(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    acge_proxy::start(config, StartOptions::new(token))
        .await
        .unwrap()
}

/// What a client sees of one answer.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// `blue` or `green`, from the demo backend's header.
    pub fn backend(&self) -> &str {
        self.headers
            .get("x-acge-backend")
            .map(|v| v.to_str().unwrap())
            .unwrap_or("none")
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build_http()
}

pub async fn send(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body.into())).unwrap();
    let res = tokio::time::timeout(Duration::from_secs(10), client.request(req))
        .await
        .expect("the proxy answers within 10 s")
        .expect("the request completes");
    let (parts, body) = res.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

pub async fn get(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    headers: &[(&str, &str)],
) -> Reply {
    send(client, Method::GET, url, headers, Bytes::new()).await
}

/// `PUT /routes/{route}/weights` with the test token; returns the reply.
pub async fn put_weight(s: &Setup, route: &str, green: u8) -> Reply {
    send(
        &client(),
        Method::PUT,
        &s.admin(&format!("/routes/{route}/weights")),
        &[("authorization", &format!("Bearer {TOKEN}"))],
        format!(r#"{{"green": {green}}}"#),
    )
    .await
}

/// Writes raw bytes on a fresh connection and reads the whole answer (the server is asked
/// to close). For requests an HTTP client library would refuse to send.
pub async fn raw(addr: SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// An address where nothing listens (bound, then released).
pub async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// A server that accepts connections and never answers.
pub async fn silent_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}

/// Sends `n` requests from `parallel` concurrent clients; returns how many went green.
pub async fn count_green(url: &str, n: usize, parallel: usize) -> usize {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..parallel {
        let url = url.to_string();
        let share = n / parallel;
        tasks.spawn(async move {
            let c = client();
            let mut green = 0;
            for _ in 0..share {
                let r = get(&c, &url, &[]).await;
                assert_eq!(r.status, StatusCode::OK);
                if r.backend() == "green" {
                    green += 1;
                }
            }
            green
        });
    }
    let mut green = 0;
    while let Some(g) = tasks.join_next().await {
        green += g.unwrap();
    }
    green
}

/// The value of one sample line of the Prometheus text, e.g.
/// `acge_requests_total{route="a",version="green",code_class="2xx"}`.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.trim().parse().ok()
    })
}

/// An upstream that answers every request with 200, `body`, and these headers.
pub async fn fixed_upstream(
    headers: &'static [(&'static str, &'static str)],
    body: &'static str,
) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(acge_proxy::proxy::server::serve(
        l,
        acge_proxy::proxy::server::ServerOptions::default(),
        move |_req, _peer, _in_flight| async move {
            let mut res = acge_proxy::proxy::full(Bytes::from_static(body.as_bytes()));
            for (k, v) in headers {
                res.headers_mut().insert(*k, v.parse().unwrap());
            }
            res
        },
        std::future::pending(),
    ));
    addr
}

/// A config with one route `name` on `/svc` to `upstream` (blue and green alike),
/// running `filters`, with `filters_section` YAML appended (top level).
pub fn filtered_config(
    name: &str,
    upstream: SocketAddr,
    filters: &str,
    filters_section: &str,
) -> String {
    format!(
        "listener: {{address: 127.0.0.1:0}}
admin: {{address: 127.0.0.1:0}}
clusters:
  up: {{endpoints: [\"{upstream}\"]}}
routes:
  - name: {name}
    match: {{path_prefix: /svc}}
    blue: up
    green: up
    filters: [{filters}]
{filters_section}"
    )
}

/// A proxy on route `name` (`/svc`) to a blue demo backend of its own, running
/// `filters` with `filters_section` appended ([`filtered_config`]).
pub async fn filtered_proxy(
    name: &'static str,
    filters: &str,
    filters_section: &str,
) -> (Running, acge_proxy::demo::Backend) {
    let up = acge_proxy::demo::spawn_backend(
        name,
        acge_proxy::proxy::split::Version::Blue,
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let yaml = filtered_config(name, up.addr, filters, filters_section);
    (start(&yaml, TokenSource::None).await, up)
}

/// Every record in an audit log directory, in order.
pub fn audit_records(dir: &std::path::Path) -> Vec<acge_filters::audit::AuditRecord> {
    let mut out = Vec::new();
    for (_, path) in acge_filters::audit::segment::segments(dir).unwrap() {
        let bytes = std::fs::read(path).unwrap();
        for (_, payload) in acge_filters::audit::segment::read_frames(&bytes).records {
            if let acge_filters::audit::segment::Entry::Record(record) =
                acge_filters::audit::segment::entry(payload)
            {
                out.push(serde_json::from_slice(record).unwrap());
            }
        }
    }
    out
}

/// Writes a small TorchScript model with the ACGE contract into `dir`, with the torch
/// venv's PyTorch (`scripts/cargo-torch` names its python in ACGE_TORCH_PYTHON).
pub fn make_test_model(dir: &std::path::Path, extra: &[&str]) {
    let python = std::env::var("ACGE_TORCH_PYTHON").expect(
        "ACGE_TORCH_PYTHON names the torch venv's python: run the tests through `make test` or scripts/cargo-torch",
    );
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/make_test_model.py");
    let out = std::process::Command::new(python)
        .arg(script)
        .arg(dir)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Prometheus text a running proxy serves.
pub async fn scrape(p: &Running) -> String {
    let r = get(&client(), &format!("http://{}/metrics", p.admin_addr), &[]).await;
    String::from_utf8_lossy(&r.body).into_owned()
}

/// `acge_refused_total{reason}` as a number (0 before the first).
pub fn refused(metrics: &str, reason: &str) -> f64 {
    sample(
        metrics,
        &format!("acge_refused_total{{reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0)
}

/// An upstream that hands each accepted connection to `script`.
pub async fn scripted_upstream<F, Fut>(script: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let script = std::sync::Arc::new(script);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(script(s));
        }
    });
    addr
}

/// Reads one HTTP/1 request head (through the empty line) from `stream`.
pub async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// One request an upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
}

/// An upstream that answers every request with 200 `{"ok":true}` (with the right
/// constitutional hash) and reports each request it received.
pub async fn recording_upstream() -> (SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Seen>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(acge_proxy::proxy::server::serve(
        l,
        acge_proxy::proxy::server::ServerOptions::default(),
        move |req: Request<hyper::body::Incoming>, _peer, _in_flight| {
            let tx = tx.clone();
            async move {
                let (parts, body) = req.into_parts();
                let _ = body.collect().await;
                let _ = tx.send(Seen {
                    method: parts.method.to_string(),
                    path: parts.uri.to_string(),
                    headers: parts.headers,
                });
                let mut res = acge_proxy::proxy::full(Bytes::from_static(b"{\"ok\":true}"));
                res.headers_mut()
                    .insert("x-constitutional-hash", "cdd01ef066bc6cf2".parse().unwrap());
                res.headers_mut()
                    .insert("content-type", "application/json".parse().unwrap());
                res
            }
        },
        std::future::pending(),
    ));
    (addr, rx)
}

/// A config of one route `name` on `/svc` to `upstream` (blue and green alike), with
/// `listener` YAML added to the listener's flow map, `cluster` to the cluster's and
/// `rest` appended (top level).
pub fn config_with(
    name: &str,
    upstream: SocketAddr,
    listener: &str,
    cluster: &str,
    rest: &str,
) -> String {
    format!(
        "listener: {{address: 127.0.0.1:0{listener}}}
admin: {{address: 127.0.0.1:0}}
clusters:
  up: {{endpoints: [\"{upstream}\"]{cluster}}}
routes:
  - {{name: {name}, match: {{path_prefix: /svc}}, blue: up, green: up}}
{rest}"
    )
}

/// The resident memory of this process, in bytes.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// Runs a command to its end: whether it succeeded, and its stdout then stderr.
pub fn run_command(cmd: &mut std::process::Command) -> (bool, String) {
    let out = cmd.output().expect("the command starts");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A proxy with one route `route` on `prefix` to a [`recording_upstream`], running
/// `filters` (a YAML list's items), with `sections` (indented 2) under `filters:`.
pub async fn recording_proxy(
    route: &str,
    prefix: &str,
    filters: &str,
    sections: &str,
) -> (Running, tokio::sync::mpsc::UnboundedReceiver<Seen>) {
    let (up, seen) = recording_upstream().await;
    let yaml = format!(
        "listener: {{address: 127.0.0.1:0}}
admin: {{address: 127.0.0.1:0}}
clusters:
  up: {{endpoints: [\"{up}\"]}}
routes:
  - {{name: {route}, match: {{path_prefix: {prefix}}}, blue: up, green: up, filters: [{filters}]}}
filters:
{sections}"
    );
    (start(&yaml, TokenSource::None).await, seen)
}
