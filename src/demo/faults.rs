//! Faults of the demo backends, and `PUT /demo/faults`, the route the demo adds to the
//! admin API to set them (the admin API itself knows nothing of the demo).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::Response;
use axum::routing::put;
use axum::Router;
use http::StatusCode;
use serde_json::json;

use super::services::SERVICES;
use crate::control::admin::json_error_response as error;
use crate::proxy::split::Version;

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
pub(super) struct Fired {
    pub(super) latency: std::time::Duration,
    pub(super) error: bool,
    pub(super) wrong_hash: bool,
    pub(super) noncompliant: bool,
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
    pub(super) fn next(&self, service: &str, version: Version) -> Fired {
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

/// `PUT /demo/faults`: `{"service", "version", "latency_ms", "error_rate",
/// "wrong_hash_rate", "noncompliant_rate"}`; answers with every fault set.
pub fn admin_routes(faults: Arc<Faults>) -> Router {
    Router::new()
        .route("/demo/faults", put(set))
        .with_state(faults)
}

async fn set(State(faults): State<Arc<Faults>>, body: Result<Bytes, BytesRejection>) -> Response {
    let body = match crate::control::admin::read_body(body) {
        Ok(body) => body,
        Err(refusal) => return *refusal,
    };
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Set {
        service: String,
        version: String,
        #[serde(flatten)]
        fault: Fault,
    }
    let bad = |detail: String| error(StatusCode::BAD_REQUEST, "bad_fault", detail);
    let set: Set = match serde_json::from_slice(&body) {
        Ok(set) => set,
        Err(e) => return bad(format!("{e}; send {{\"service\": \"auth\", \"version\": \"green\", \"latency_ms\": 0, \"error_rate\": 0.0, \"wrong_hash_rate\": 0.0, \"noncompliant_rate\": 0.0}}")),
    };
    let version = match set.version.as_str() {
        "blue" => Version::Blue,
        "green" => Version::Green,
        other => return bad(format!("version `{other}` is neither blue nor green")),
    };
    if !SERVICES.iter().any(|s| s.name == set.service) {
        return bad(format!("no demo service is named `{}`", set.service));
    }
    let f = set.fault;
    if [f.error_rate, f.wrong_hash_rate, f.noncompliant_rate]
        .iter()
        .any(|r| !(0.0..=1.0).contains(r))
    {
        return bad("rates are shares, 0–1".into());
    }
    faults.set(&set.service, version, f);
    crate::control::admin::json_ok(json!({"faults": faults.list()}))
}
