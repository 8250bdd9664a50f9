//! The admin API, on its own listener (127.0.0.1:15000 by default).
//!
//! | method, path                   | what                                                  |
//! | ------------------------------ | ----------------------------------------------------- |
//! | `GET /`                        | this list, as JSON                                    |
//! | `GET /live`                    | 200 while the process serves                          |
//! | `GET /ready`                   | 200 once the listeners are bound, 503 before          |
//! | `GET /metrics`                 | Prometheus text format                                |
//! | `GET /weights`                 | `{"routes": {"auth": {"blue": 95, "green": 5}}}`      |
//! | `PUT /routes/{name}/weights`   | body `{"green": 25}`; needs the bearer token          |
//! | `GET /config_dump`             | the running config, current weights, no secrets       |
//! | `GET /migration`               | the migration controller's state, per route           |
//! | `POST /migration/{r}/{action}` | pause, resume, promote, rollback; needs the token     |
//! | `PUT /demo/faults`             | demo only: faults of a demo backend; needs the token  |
//!
//! Mutations need `Authorization: Bearer <token>`, compared in constant time. With no
//! token configured they are refused (403): the API is never open by default. This
//! module reads and sets route weights; it does not own them (`split.rs` does).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use acge_filters::{json_error, json_response};
use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::config::Config;
use crate::migration::{Action, ActionError, Controller};
use crate::split::RouteTable;
use crate::{local, Body};

/// Largest admin request body; weight changes are a few bytes.
const MAX_BODY: usize = 64 * 1024;

/// Where the bearer token for mutations comes from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// No token: every mutation is refused with 403.
    None,
    /// Read on every mutation, so a rotated secret applies at once.
    File(PathBuf),
    /// Fixed for the life of the process (`ACGE_ADMIN_TOKEN`, or the demo's own).
    Fixed(String),
}

impl TokenSource {
    /// `admin.token_file` when configured, else `ACGE_ADMIN_TOKEN` when set, else none.
    pub fn from_config(config: &Config) -> Self {
        if let Some(path) = &config.admin.token_file {
            return TokenSource::File(path.clone());
        }
        match std::env::var("ACGE_ADMIN_TOKEN") {
            Ok(token) if !token.trim().is_empty() => TokenSource::Fixed(token.trim().to_string()),
            _ => TokenSource::None,
        }
    }

    fn describe(&self) -> &'static str {
        match self {
            TokenSource::None => "none",
            TokenSource::File(_) => "file",
            TokenSource::Fixed(_) => "fixed",
        }
    }

    /// The token now, or why there is none.
    fn current(&self) -> Result<String, String> {
        match self {
            TokenSource::None => Err(
                "no admin token is configured (admin.token_file or ACGE_ADMIN_TOKEN); mutations are disabled".into(),
            ),
            TokenSource::File(path) => match std::fs::read_to_string(path) {
                Ok(token) if !token.trim().is_empty() => Ok(token.trim().to_string()),
                Ok(_) => Err(format!("the admin token file {} is empty; mutations are disabled", path.display())),
                Err(e) => Err(format!(
                    "the admin token file {} cannot be read ({e}); mutations are disabled",
                    path.display()
                )),
            },
            TokenSource::Fixed(token) => Ok(token.clone()),
        }
    }
}

pub struct Admin {
    routes: Arc<RouteTable>,
    prometheus: PrometheusHandle,
    token: TokenSource,
    config: Config,
    ready: AtomicBool,
    migration: Option<Arc<Controller>>,
    demo_faults: Option<Arc<crate::demo::Faults>>,
}

impl Admin {
    pub fn new(
        routes: Arc<RouteTable>,
        prometheus: PrometheusHandle,
        token: TokenSource,
        config: Config,
        migration: Option<Arc<Controller>>,
        demo_faults: Option<Arc<crate::demo::Faults>>,
    ) -> Self {
        Self {
            routes,
            prometheus,
            token,
            config,
            ready: AtomicBool::new(false),
            migration,
            demo_faults,
        }
    }

    /// Called once the proxy listener is bound and serving.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let method = req.method().clone();
        match (segments.as_slice(), &method) {
            ([""], &Method::GET) => local(self.index()),
            (["live"], &Method::GET) => {
                local(json_response(StatusCode::OK, r#"{"status":"live"}"#.into()))
            }
            (["ready"], &Method::GET) => local(self.readiness()),
            (["metrics"], &Method::GET) => self.metrics(),
            (["weights"], &Method::GET) => local(json_response(
                StatusCode::OK,
                self.weights().to_string().into(),
            )),
            (["config_dump"], &Method::GET) => local(json_response(
                StatusCode::OK,
                self.config_dump().to_string().into(),
            )),
            (["routes", name, "weights"], &Method::PUT) => {
                let name = name.to_string();
                local(self.set_weight(&name, req).await)
            }
            (["migration"], &Method::GET) => local(self.migration_status()),
            (["demo", "faults"], &Method::PUT) if self.demo_faults.is_some() => {
                local(self.set_fault(req).await)
            }
            (["migration", name, action], &Method::POST) => {
                let (name, action) = (name.to_string(), action.to_string());
                local(self.migration_action(&name, &action, &req))
            }
            (
                [""]
                | ["live"]
                | ["ready"]
                | ["metrics"]
                | ["weights"]
                | ["config_dump"]
                | ["migration"],
                _,
            ) => local(method_not_allowed(&method, "GET")),
            (["routes", _, "weights"], _) => local(method_not_allowed(&method, "PUT")),
            (["migration", _, _], _) => local(method_not_allowed(&method, "POST")),
            _ => local(json_error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no admin endpoint at {path}; GET / lists them"),
            )),
        }
    }

    fn index(&self) -> acge_filters::LocalResponse {
        let body = json!({
            "endpoints": [
                "GET /live", "GET /ready", "GET /metrics", "GET /weights",
                "PUT /routes/{name}/weights", "GET /config_dump", "GET /migration",
                "POST /migration/{route}/{pause,resume,promote,rollback}"
            ]
        });
        json_response(StatusCode::OK, body.to_string().into())
    }

    fn readiness(&self) -> acge_filters::LocalResponse {
        if self.ready.load(Ordering::Acquire) {
            json_response(StatusCode::OK, r#"{"status":"ready"}"#.into())
        } else {
            json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                "the proxy listener is not serving yet",
            )
        }
    }

    fn metrics(&self) -> Response<Body> {
        let mut res = crate::full(Bytes::from(self.prometheus.render()));
        res.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        res
    }

    fn weights(&self) -> serde_json::Value {
        let routes: serde_json::Map<String, serde_json::Value> = self
            .routes
            .iter()
            .map(|r| {
                let green = r.splitter.green_weight();
                (
                    r.name.to_string(),
                    json!({"blue": 100 - green, "green": green}),
                )
            })
            .collect();
        json!({ "routes": routes })
    }

    fn config_dump(&self) -> serde_json::Value {
        let mut config =
            serde_json::to_value(&self.config).unwrap_or_else(|e| json!({"error": e.to_string()}));
        // The weights in the file are only where the proxy started.
        if let Some(routes) = config.get_mut("routes").and_then(|r| r.as_array_mut()) {
            for route in routes {
                let current = route
                    .get("name")
                    .and_then(|n| n.as_str())
                    .and_then(|n| self.routes.get(n))
                    .map(|r| r.splitter.green_weight());
                if let Some(weight) = current {
                    route["green_weight"] = json!(weight);
                }
            }
        }
        // The token itself is never in the config; say only where it comes from.
        config["admin"]["token_source"] = json!(self.token.describe());
        config
    }

    async fn set_weight(&self, name: &str, req: Request<Incoming>) -> acge_filters::LocalResponse {
        if let Some(refusal) = self.refuse_unauthorized(&req) {
            return refusal;
        }
        let Some(route) = self.routes.get(name) else {
            return json_error(
                StatusCode::NOT_FOUND,
                "unknown_route",
                format!("no route named `{name}`"),
            );
        };
        let body = match read_small_body(req).await {
            Ok(body) => body,
            Err(refusal) => return refusal,
        };
        let green = match parse_weight_body(&body) {
            Ok(green) => green,
            Err(detail) => return json_error(StatusCode::BAD_REQUEST, "bad_weight", detail),
        };
        let previous = route.splitter.green_weight();
        route.set_green_weight(green);
        tracing::info!(route = %route.name, previous, green, "green weight changed through the admin API");
        let mut body = json!({
            "route": &*route.name,
            "blue": 100 - green,
            "green": green,
            "previous": {"blue": 100 - previous, "green": previous},
        });
        if let Some(note) = self
            .migration
            .as_ref()
            .and_then(|m| m.weight_set_by_operator(name, green))
        {
            body["migration"] = json!(note);
        }
        json_response(StatusCode::OK, body.to_string().into())
    }

    /// `PUT /demo/faults` (demo only): `{"service", "version", "latency_ms",
    /// "error_rate", "wrong_hash_rate", "noncompliant_rate"}`.
    async fn set_fault(&self, req: Request<Incoming>) -> acge_filters::LocalResponse {
        if let Some(refusal) = self.refuse_unauthorized(&req) {
            return refusal;
        }
        let Some(faults) = &self.demo_faults else {
            return json_error(StatusCode::NOT_FOUND, "not_found", "not a demo");
        };
        let body = match read_small_body(req).await {
            Ok(body) => body,
            Err(refusal) => return refusal,
        };
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Set {
            service: String,
            version: String,
            #[serde(flatten)]
            fault: crate::demo::Fault,
        }
        let set: Set = match serde_json::from_slice(&body) {
            Ok(set) => set,
            Err(e) => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    "bad_fault",
                    format!("{e}; send {{\"service\": \"auth\", \"version\": \"green\", \"latency_ms\": 0, \"error_rate\": 0.0, \"wrong_hash_rate\": 0.0, \"noncompliant_rate\": 0.0}}"),
                )
            }
        };
        let version = match set.version.as_str() {
            "blue" => crate::split::Version::Blue,
            "green" => crate::split::Version::Green,
            other => {
                return json_error(
                    StatusCode::BAD_REQUEST,
                    "bad_fault",
                    format!("version `{other}` is neither blue nor green"),
                )
            }
        };
        if !crate::demo::SERVICES.iter().any(|s| s.name == set.service) {
            return json_error(
                StatusCode::BAD_REQUEST,
                "bad_fault",
                format!("no demo service is named `{}`", set.service),
            );
        }
        let f = set.fault;
        if [f.error_rate, f.wrong_hash_rate, f.noncompliant_rate]
            .iter()
            .any(|r| !(0.0..=1.0).contains(r))
        {
            return json_error(
                StatusCode::BAD_REQUEST,
                "bad_fault",
                "rates are shares, 0–1",
            );
        }
        faults.set(&set.service, version, f);
        json_response(
            StatusCode::OK,
            json!({"faults": faults.list()}).to_string().into(),
        )
    }

    fn migration_status(&self) -> acge_filters::LocalResponse {
        match &self.migration {
            Some(m) => json_response(StatusCode::OK, m.status().to_string().into()),
            None => json_error(
                StatusCode::NOT_FOUND,
                "no_migration",
                "this proxy runs no migration controller (the config has no `migration` section)",
            ),
        }
    }

    fn migration_action<B>(
        &self,
        name: &str,
        action: &str,
        req: &Request<B>,
    ) -> acge_filters::LocalResponse {
        if let Some(refusal) = self.refuse_unauthorized(req) {
            return refusal;
        }
        let Some(m) = &self.migration else {
            return self.migration_status();
        };
        let Some(action) = Action::parse(action) else {
            return json_error(
                StatusCode::NOT_FOUND,
                "unknown_action",
                format!("`{action}` is not an action; use pause, resume, promote or rollback"),
            );
        };
        match m.act(name, action) {
            Ok(status) => json_response(StatusCode::OK, status.to_string().into()),
            Err(e @ ActionError::UnknownRoute(_)) => {
                json_error(StatusCode::NOT_FOUND, "unknown_route", e.to_string())
            }
            Err(e @ ActionError::NotNow(_)) => {
                json_error(StatusCode::CONFLICT, "not_now", e.to_string())
            }
        }
    }

    /// The refusal for a request that may not mutate, or None when it may.
    fn refuse_unauthorized<B>(&self, req: &Request<B>) -> Option<acge_filters::LocalResponse> {
        let expected = match self.token.current() {
            Ok(token) => token,
            Err(why) => return Some(json_error(StatusCode::FORBIDDEN, "mutations_disabled", why)),
        };
        let presented = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .map(|t| t.trim_ascii());
        if presented.is_some_and(|t| bool::from(t.ct_eq(expected.as_bytes()))) {
            return None;
        }
        let detail = if presented.is_some() {
            "the bearer token is not the admin token"
        } else {
            "send Authorization: Bearer <admin token>"
        };
        let mut res = json_error(StatusCode::UNAUTHORIZED, "unauthorized", detail);
        res.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"acge-admin\""),
        );
        Some(res)
    }
}

/// A mutation's body, at most `MAX_BODY` bytes.
async fn read_small_body(req: Request<Incoming>) -> Result<Bytes, acge_filters::LocalResponse> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(body) => Ok(body.to_bytes()),
        Err(e) => Err(json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "bad_body",
            format!("cannot read the body ({e}); at most {MAX_BODY} bytes"),
        )),
    }
}

/// GETs `path` from an admin API at `addr` (for the CLI); the body of a 200, or an
/// error that carries the status and the body.
pub async fn get(addr: std::net::SocketAddr, path: &str) -> anyhow::Result<Bytes> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(http_body_util::Empty::<Bytes>::new())?;
    let res = sender.send_request(req).await?;
    let status = res.status();
    let body = res.into_body().collect().await?.to_bytes();
    if status != StatusCode::OK {
        anyhow::bail!("{status}: {}", String::from_utf8_lossy(&body));
    }
    Ok(body)
}

/// `{"green": N}` with N an integer percentage; anything else says what is wrong.
fn parse_weight_body(body: &[u8]) -> Result<u8, String> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| format!("the body is not JSON: {e}; send {{\"green\": 25}}"))?;
    let object = value
        .as_object()
        .ok_or_else(|| "the body must be a JSON object like {\"green\": 25}".to_string())?;
    if let Some(extra) = object.keys().find(|k| k.as_str() != "green") {
        return Err(format!("unknown field `{extra}`; send {{\"green\": 25}}"));
    }
    let green = object
        .get("green")
        .ok_or_else(|| "missing field `green`; send {\"green\": 25}".to_string())?;
    match green.as_u64() {
        Some(n) if n <= 100 => Ok(u8::try_from(n).expect("at most 100")),
        _ => Err(format!(
            "green: {green} is not a percentage (an integer 0–100)"
        )),
    }
}

fn method_not_allowed(method: &Method, allow: &'static str) -> acge_filters::LocalResponse {
    let mut res = json_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed here; use {allow}"),
    );
    res.headers_mut()
        .insert(ALLOW, HeaderValue::from_static(allow));
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_bodies_are_checked() {
        assert_eq!(parse_weight_body(br#"{"green": 25}"#), Ok(25));
        assert_eq!(parse_weight_body(br#"{"green": 0}"#), Ok(0));
        assert_eq!(parse_weight_body(br#"{"green": 100}"#), Ok(100));
        for bad in [
            &br#"{"green": 101}"#[..],
            br#"{"green": -1}"#,
            br#"{"green": 2.5}"#,
            br#"{"green": "5"}"#,
            br#"{}"#,
            br#"[5]"#,
            b"green=5",
            br#"{"green": 5, "blue": 95}"#,
        ] {
            assert!(
                parse_weight_body(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
