//! A demo backend: answers every request with JSON describing what it received, and
//! with `x-acge-backend: blue|green`, `x-acge-service: <name>` and
//! `x-constitutional-hash`, so a person (or a test) can see where a request went and
//! what the proxy forwarded. Tests reuse [`spawn_backend`].

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

use super::faults::{Faults, Fired};
use super::services::SERVICES;
use super::DemoError;
use crate::config::DEFAULT_CONSTITUTION_HASH;
use crate::proxy::server::{self, ServerOptions};
use crate::proxy::split::Version;
use crate::proxy::{local, Body};

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
        move |req, _peer, _in_flight| {
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
