//! The demo: the seven governance services, each in a blue and a green flavour, on
//! loopback, behind the proxy with `config/demo.yaml` (embedded in the binary).
//!
//! A demo backend answers every request with JSON describing what it received, and with
//! the headers `x-acge-backend: blue|green`, `x-acge-service: <name>` and
//! `x-constitutional-hash`, so a person (or a test) can see where a request went and what
//! the proxy forwarded. Tests reuse [`spawn_backend`]. This module is not on the request
//! path of a real deployment.

use std::net::SocketAddr;
use std::sync::Arc;

use acge_filters::json_response;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::admin::TokenSource;
use crate::config::{Config, DEFAULT_CONSTITUTION_HASH};
use crate::server::{self, ServerOptions};
use crate::split::Version;
use crate::{local, Body, StartOptions};

/// The demo's config, embedded so that `acge-proxy demo` needs no files.
pub const DEMO_CONFIG: &str = include_str!("../config/demo.yaml");

/// One governance service: its name, its legacy port, its route prefix and the ACGE
/// endpoint the green version adds.
#[derive(Debug, Clone, Copy)]
pub struct Service {
    pub name: &'static str,
    pub legacy_port: u16,
    pub path_prefix: &'static str,
    pub acge_endpoint: &'static str,
}

pub const SERVICES: [Service; 7] = [
    Service {
        name: "auth",
        legacy_port: 8000,
        path_prefix: "/api/v1/auth",
        acge_endpoint: "/api/v1/auth/acge/validate",
    },
    Service {
        name: "ac",
        legacy_port: 8001,
        path_prefix: "/api/v1/constitutional",
        acge_endpoint: "/api/v1/constitutional/acge/analyze",
    },
    Service {
        name: "integrity",
        legacy_port: 8002,
        path_prefix: "/api/v1/integrity",
        acge_endpoint: "/api/v1/integrity/acge/audit",
    },
    Service {
        name: "fv",
        legacy_port: 8003,
        path_prefix: "/api/v1/verification",
        acge_endpoint: "/api/v1/verification/acge/prove",
    },
    Service {
        name: "gs",
        legacy_port: 8004,
        path_prefix: "/api/v1/governance",
        acge_endpoint: "/api/v1/governance/acge/synthesize",
    },
    Service {
        name: "pgc",
        legacy_port: 8005,
        path_prefix: "/api/v1/policy",
        acge_endpoint: "/api/v1/policy/acge/compile",
    },
    Service {
        name: "ec",
        legacy_port: 8006,
        path_prefix: "/api/v1/evolution",
        acge_endpoint: "/api/v1/evolution/acge/optimize",
    },
];

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("the embedded demo config is invalid:\n{0}")]
    Config(#[from] crate::config::ConfigErrors),
    #[error("cannot start the {service} {version} backend on {address}: {source}")]
    Backend {
        service: String,
        version: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Start(#[from] crate::StartError),
}

/// A running demo backend.
pub struct Backend {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Faults an operator (or a test) sets on the demo backends through the admin API's
/// `PUT /demo/faults`, to provoke each of the migration controller's rollbacks.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    /// Added before every answer.
    #[serde(default)]
    pub latency_ms: u64,
    /// Share of answers that are 500s.
    #[serde(default)]
    pub error_rate: f64,
    /// Share of answers with a wrong `x-constitutional-hash`.
    #[serde(default)]
    pub wrong_hash_rate: f64,
    /// Share of answers whose body discloses personal data in bulk (which the acge
    /// filter, scoring responses, should judge non-compliant).
    #[serde(default)]
    pub noncompliant_rate: f64,
}

/// The faults of every demo backend, by service and version.
#[derive(Default)]
pub struct Faults {
    by: std::sync::Mutex<std::collections::HashMap<(String, Version), (Fault, u64)>>,
}

/// What fires for one answer.
#[derive(Debug, Default, Clone, Copy)]
struct Fired {
    latency: std::time::Duration,
    error: bool,
    wrong_hash: bool,
    noncompliant: bool,
}

impl Faults {
    /// Sets the fault of one backend; an all-zero fault clears it.
    pub fn set(&self, service: &str, version: Version, fault: Fault) {
        let mut by = self.by.lock().unwrap_or_else(|e| e.into_inner());
        if fault == Fault::default() {
            by.remove(&(service.to_string(), version));
        } else {
            by.insert((service.to_string(), version), (fault, 0));
        }
    }

    /// Every fault set, for the admin API's answer.
    pub fn list(&self) -> serde_json::Value {
        let by = self.by.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = by
            .iter()
            .map(|((s, v), (f, _))| json!({"service": s, "version": v.as_str(), "fault": f}))
            .collect();
        out.sort_by_key(|v| v.to_string());
        json!(out)
    }

    /// Exact shares, spread evenly: the n-th answer fires a fault of rate r when
    /// floor((n + 1) r) > floor(n r).
    fn next(&self, service: &str, version: Version) -> Fired {
        let mut by = self.by.lock().unwrap_or_else(|e| e.into_inner());
        let Some((f, n)) = by.get_mut(&(service.to_string(), version)) else {
            return Fired::default();
        };
        let k = *n as f64;
        *n += 1;
        let fires = |rate: f64| ((k + 1.0) * rate).floor() > (k * rate).floor();
        Fired {
            latency: std::time::Duration::from_millis(f.latency_ms),
            error: fires(f.error_rate),
            wrong_hash: fires(f.wrong_hash_rate),
            noncompliant: fires(f.noncompliant_rate),
        }
    }
}

/// Starts one demo backend on `address` (port 0 picks a free port), without faults.
pub async fn spawn_backend(
    service: &'static str,
    version: Version,
    address: SocketAddr,
) -> Result<Backend, DemoError> {
    spawn_backend_with(service, version, address, Arc::new(Faults::default())).await
}

/// Starts one demo backend that obeys `faults`.
pub async fn spawn_backend_with(
    service: &'static str,
    version: Version,
    address: SocketAddr,
    faults: Arc<Faults>,
) -> Result<Backend, DemoError> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| DemoError::Backend {
            service: service.to_string(),
            version: version.as_str(),
            address,
            source,
        })?;
    let addr = listener
        .local_addr()
        .expect("a bound socket has an address");
    let task = tokio::spawn(server::serve(
        listener,
        ServerOptions::default(),
        move |req, _peer| {
            let fired = faults.next(service, version);
            answer(service, version, req, fired)
        },
        std::future::pending(),
    ));
    Ok(Backend { addr, task })
}

/// The demo backend's answer: what it saw, as JSON.
async fn answer(
    service: &'static str,
    version: Version,
    req: Request<Incoming>,
    fired: Fired,
) -> Response<Body> {
    if !fired.latency.is_zero() {
        tokio::time::sleep(fired.latency).await;
    }
    let (parts, mut body) = req.into_parts();
    // Count the body as it streams, so large uploads cost no memory here.
    let mut body_bytes = 0usize;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => body_bytes += frame.data_ref().map_or(0, |d| d.len()),
            Err(e) => {
                return local(acge_filters::json_error(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    e.to_string(),
                ))
            }
        }
    }
    let headers: serde_json::Map<String, serde_json::Value> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                json!(String::from_utf8_lossy(v.as_bytes())),
            )
        })
        .collect();
    let endpoint = SERVICES
        .iter()
        .find(|s| s.name == service)
        .map(|s| s.acge_endpoint);
    let result = match (version, endpoint) {
        _ if fired.noncompliant => json!({
            "export": "all_customers.csv",
            "rows": 482113,
            "columns": ["name", "date_of_birth", "national_id", "card_number"],
            "patients": [{"name": "A. Jones", "ssn": "512-44-1093", "diagnosis": "F32.1"}],
        }),
        (Version::Green, Some(ep)) if parts.uri.path() == ep => {
            json!({"acge": "evaluated", "compliant": true})
        }
        _ => json!({"status": "ok"}),
    };
    let reply = json!({
        "service": service,
        "backend": version.as_str(),
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "received_headers": headers,
        "body_bytes": body_bytes,
        "result": result,
    });
    let status = if fired.error {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::OK
    };
    let mut res = json_response(status, Bytes::from(reply.to_string()));
    let h = res.headers_mut();
    h.insert(
        HeaderName::from_static("x-acge-backend"),
        HeaderValue::from_static(version.as_str()),
    );
    h.insert(
        HeaderName::from_static("x-acge-service"),
        HeaderValue::from_static(service),
    );
    h.insert(
        HeaderName::from_static("x-constitutional-hash"),
        HeaderValue::from_static(if fired.wrong_hash {
            "0000000000000000"
        } else {
            DEFAULT_CONSTITUTION_HASH
        }),
    );
    local(res)
}

/// Splits a demo cluster name (`auth-green`) into its service and version.
fn cluster_role(name: &str) -> Option<(&str, Version)> {
    let (service, version) = name.rsplit_once('-')?;
    match version {
        "blue" => Some((service, Version::Blue)),
        "green" => Some((service, Version::Green)),
        _ => None,
    }
}

/// A running demo: backends and proxy.
pub struct Demo {
    pub backends: Vec<Backend>,
    pub proxy: crate::Running,
    pub token: String,
}

/// Starts every backend the demo config names, then the proxy, keeping state (the
/// audit log) under `dir`.
pub async fn start(token: String, dir: &std::path::Path) -> Result<Demo, DemoError> {
    let mut config = Config::from_yaml(DEMO_CONFIG, "config/demo.yaml (embedded)")?;
    if let Some(audit) = &mut config.filters.audit {
        audit.dir = dir.join("audit");
    }
    if let Some(acge) = &mut config.filters.acge {
        // Relative to config/ as for any config file; the embedded file's config/ is
        // the one in the tree the binary was built from.
        if acge.model.is_relative() {
            acge.model = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("config")
                .join(&acge.model);
        }
    }
    if let Some(m) = &mut config.migration {
        if let Some(state) = &mut m.state_file {
            if state.is_relative() {
                *state = dir.join(&*state);
            }
        }
    }
    let faults = Arc::new(Faults::default());
    let mut backends = Vec::new();
    for (name, cluster) in &config.clusters {
        let Some((service, version)) = cluster_role(name) else {
            continue;
        };
        let Some(service) = SERVICES.iter().find(|s| s.name == service) else {
            continue;
        };
        for endpoint in &cluster.endpoints {
            if let Ok(address) = endpoint.parse::<SocketAddr>() {
                backends.push(
                    spawn_backend_with(service.name, version, address, faults.clone()).await?,
                );
            }
        }
    }
    let mut options = StartOptions::new(TokenSource::Fixed(token.clone()));
    options.demo_faults = Some(faults);
    let proxy = crate::start(config, options).await?;
    Ok(Demo {
        backends,
        proxy,
        token,
    })
}

/// Sends the demo's own traffic: `rps` requests a second to each service's ACGE
/// endpoint through the proxy (benign JSON, 50 clients per service by `x-user-id`),
/// so that the migration controller has something to judge. Runs until aborted.
pub fn spawn_traffic(proxy: SocketAddr, rps: u32) -> JoinHandle<()> {
    tokio::spawn(async move {
        if rps == 0 {
            return;
        }
        let mut tasks = Vec::new();
        for service in SERVICES {
            tasks.push(tokio::spawn(service_traffic(proxy, service, rps)));
        }
        for t in tasks {
            let _ = t.await;
        }
    })
}

async fn service_traffic(proxy: SocketAddr, service: Service, rps: u32) {
    // Several clients, each on its own connection, so that a slow green (a latency
    // fault) does not throttle the whole service's traffic.
    const CLIENTS: u32 = 8;
    let period = std::time::Duration::from_secs_f64(f64::from(CLIENTS) / f64::from(rps));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(client_traffic(proxy, service, period, c)))
        .collect();
    for c in clients {
        let _ = c.await;
    }
}

async fn client_traffic(
    proxy: SocketAddr,
    service: Service,
    period: std::time::Duration,
    client: u32,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sender = None;
    for n in 0u64.. {
        tick.tick().await;
        if sender.is_none() {
            sender = connect(proxy).await;
        }
        let Some(s) = &mut sender else { continue };
        let user = format!("user-{}", (n * 8 + u64::from(client)) % 50);
        let body = json!({"actor": user, "action": "read", "target": "own profile", "request": n});
        let req = Request::post(service.acge_endpoint)
            .header("host", proxy.to_string())
            .header("content-type", "application/json")
            .header("x-user-id", &user)
            .body(http_body_util::Full::new(Bytes::from(body.to_string())))
            .expect("a valid request");
        match s.send_request(req).await {
            Ok(res) => {
                let _ = res.into_body().collect().await;
            }
            Err(_) => sender = None,
        }
    }
}

async fn connect(
    proxy: SocketAddr,
) -> Option<hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>> {
    let stream = tokio::net::TcpStream::connect(proxy).await.ok()?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .ok()?;
    tokio::spawn(conn);
    Some(sender)
}

/// What the demo prints once it is up: where things are and what to try.
pub fn banner(demo: &Demo) -> String {
    let proxy = demo.proxy.proxy_addr;
    let admin = demo.proxy.admin_addr;
    let token = &demo.token;
    let audit = demo
        .proxy
        .audit
        .as_ref()
        .map(|a| a.dir().display().to_string())
        .unwrap_or_default();
    let mut routes = String::new();
    for route in demo.proxy.routes.iter() {
        let service = SERVICES.iter().find(|s| s.name == &*route.name);
        routes.push_str(&format!(
            "  {:<10} {:<24} green {:>3}%   try {}\n",
            route.name,
            route.path_prefix,
            route.splitter.green_weight(),
            service.map(|s| s.acge_endpoint).unwrap_or("")
        ));
    }
    format!(
        "acge-proxy demo: 7 services × blue/green on loopback, proxy on {proxy}, admin on {admin}\n\n\
         routes:\n{routes}\n\
         send a request (see x-acge-backend, x-acge-compliance and x-acge-principles):\n  \
         curl -si http://{proxy}/api/v1/auth/acge/validate -H 'content-type: application/json' -d '{{\"user\":\"alice\"}}'\n\n\
         move auth to 50% green:\n  \
         curl -s -X PUT http://{admin}/routes/auth/weights -H 'Authorization: Bearer {token}' -d '{{\"green\": 50}}'\n\n\
         see the weights and the metrics:\n  \
         curl -s http://{admin}/weights\n  curl -s http://{admin}/metrics | grep acge_\n\n\
         the migration controller walks every route from shadow to 100 % green on the\n\
         demo's own traffic; watch it, and roll auth back with a fault on its green:\n  \
         acge-proxy migration status --admin {admin} --watch\n  \
         curl -s -X PUT http://{admin}/demo/faults -H 'Authorization: Bearer {token}' -d '{{\"service\": \"auth\", \"version\": \"green\", \"error_rate\": 0.2}}'\n\n\
         every exchange is in the audit log; after the demo, verify it:\n  \
         acge-proxy audit verify {audit}\n\n\
         Ctrl-C stops the demo.\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_config_is_valid_and_covers_every_service() {
        let config = Config::from_yaml(DEMO_CONFIG, "demo.yaml").unwrap();
        for s in SERVICES {
            let route = config.routes.iter().find(|r| r.name == s.name).unwrap();
            assert_eq!(route.matcher.path_prefix, s.path_prefix);
            assert_eq!(route.green_weight, 10);
            assert_eq!(cluster_role(&route.blue), Some((s.name, Version::Blue)));
            assert_eq!(cluster_role(&route.green), Some((s.name, Version::Green)));
        }
        assert_eq!(config.listener.address, "127.0.0.1:15001");
        assert_eq!(config.admin.address, "127.0.0.1:15000");
    }
}
