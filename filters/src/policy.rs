//! The `policy` filter: Rego policies (the `.rego` files of `dir`, as the pgc service
//! emits them) evaluated in process by `regorus`, no OPA sidecar and no network.
//!
//! The policies are parsed and compiled once per load (a config reload loads them
//! again). Each request is the input document:
//! `input.method`, `input.path`, `input.headers` (names lower-case; repeated values
//! joined by `,`), `input.body` (the parsed JSON body, or null), `input.route`,
//! `input.jwt` (the claims, when the `jwt` filter ran first) and `input.acge`
//! (`{score, principles}`, when `acge` ran first). `query` (default
//! `data.acge.allow`) must be `true` to forward; anything else is a 403 whose JSON
//! carries `reasons` (the `reasons` rule, default `data.acge.reasons`). An evaluation
//! error is `on_error`: `deny` (503, the default) or `allow`. Each decision counts in
//! `acge_policy_total{route,result}`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use metrics::{counter, Counter};
use serde::{Deserialize, Serialize};

use crate::acge::filter::OnError;
use crate::jwt::JwtClaims;
use crate::metrics::POLICY_TOTAL;
use crate::{Compliance, Exchange, Filter, Verdict};

/// `filters.policy`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// The directory of `.rego` files (and their `_test.rego` tests), read whole.
    pub dir: PathBuf,
    #[serde(default = "defaults::query")]
    pub query: String,
    #[serde(default = "defaults::reasons")]
    pub reasons: String,
    #[serde(default)]
    pub on_error: OnError,
}

mod defaults {
    pub fn query() -> String {
        "data.acge.allow".into()
    }
    pub fn reasons() -> String {
        "data.acge.reasons".into()
    }
}

/// Why the policies could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} holds no .rego file")]
    Empty(String),
    #[error("{0}")]
    Rego(String),
}

/// The `.rego` files of `dir` and below, sorted, tests included.
pub fn rego_files(dir: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).map_err(|source| PolicyError::Read {
            path: d.display().to_string(),
            source,
        })?;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rego") {
                out.push(path);
            }
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(PolicyError::Empty(dir.display().to_string()));
    }
    Ok(out)
}

/// Parses every policy of `dir` into one engine.
pub fn load_engine(dir: &Path) -> Result<regorus::Engine, PolicyError> {
    let mut engine = regorus::Engine::new();
    for path in rego_files(dir)? {
        let text = std::fs::read_to_string(&path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        engine
            .add_policy(path.display().to_string(), text)
            .map_err(|e| PolicyError::Rego(e.to_string()))?;
    }
    Ok(engine)
}

/// A decision: whether to forward, and the policy's reasons when not.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub allow: bool,
    pub reasons: Vec<String>,
}

/// Evaluates `query` and, on a deny, `reasons` for `input`.
pub fn decide(
    engine: &regorus::Engine,
    query: &str,
    reasons: &str,
    input: serde_json::Value,
) -> Result<Decision, String> {
    let mut engine = engine.clone();
    engine.set_input(regorus::Value::from(input));
    let allow = engine
        .eval_rule(query.to_string())
        .map_err(|e| e.to_string())?;
    let allow = allow == regorus::Value::from(true);
    let reasons = if allow {
        Vec::new()
    } else {
        let value = engine
            .eval_rule(reasons.to_string())
            .map_err(|e| e.to_string())?;
        match serde_json::to_value(&value) {
            Ok(serde_json::Value::Array(items)) => items
                .into_iter()
                .map(|i| match i {
                    serde_json::Value::String(s) => s,
                    other => other.to_string(),
                })
                .collect(),
            Ok(serde_json::Value::String(s)) if s != "<undefined>" => vec![s],
            _ => Vec::new(),
        }
    };
    Ok(Decision { allow, reasons })
}

/// The input document of one request (module docs).
pub fn input_of(ex: &Exchange) -> serde_json::Value {
    let mut headers = serde_json::Map::new();
    for name in ex.request.headers.keys() {
        let joined = ex
            .request
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect::<Vec<_>>()
            .join(",");
        headers.insert(name.as_str().to_string(), joined.into());
    }
    let body = ex
        .request_body
        .as_ref()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
        .unwrap_or(serde_json::Value::Null);
    let mut input = serde_json::json!({
        "method": ex.request.method.as_str(),
        "path": ex.request.uri.path(),
        "headers": headers,
        "body": body,
        "route": &*ex.route,
    });
    if let Some(JwtClaims(claims)) = ex.attributes.get::<JwtClaims>() {
        input["jwt"] = (**claims).clone();
    }
    if let Some(c) = ex.attributes.get::<Compliance>() {
        input["acge"] = serde_json::json!({"score": c.score, "principles": c.principles});
    }
    input
}

/// The filter's shared part: the compiled policies.
pub struct PolicyFilter {
    engine: regorus::Engine,
    query: String,
    reasons: String,
    on_error: OnError,
}

impl PolicyFilter {
    pub fn load(config: &PolicyConfig) -> Result<Arc<Self>, PolicyError> {
        let mut engine = load_engine(&config.dir)?;
        // Evaluated once here, so that the engine each request clones is already
        // prepared (its rules analysed and scheduled): a request only evaluates.
        engine.set_input(regorus::Value::from(serde_json::json!({})));
        let _ = engine.eval_rule(config.query.clone());
        let _ = engine.eval_rule(config.reasons.clone());
        Ok(Arc::new(Self {
            engine,
            query: config.query.clone(),
            reasons: config.reasons.clone(),
            on_error: config.on_error,
        }))
    }

    pub fn for_route(self: &Arc<Self>, route: &str) -> RoutePolicyFilter {
        let c =
            |r: &'static str| counter!(POLICY_TOTAL, "route" => route.to_string(), "result" => r);
        RoutePolicyFilter {
            shared: self.clone(),
            allow: c("allow"),
            deny: c("deny"),
            error_denied: c("error_denied"),
            error_allowed: c("error_allowed"),
        }
    }

    /// The decision for an input document (for `acge-proxy policy eval` too).
    pub fn decide(&self, input: serde_json::Value) -> Result<Decision, String> {
        decide(&self.engine, &self.query, &self.reasons, input)
    }
}

/// The filter bound to one route.
pub struct RoutePolicyFilter {
    shared: Arc<PolicyFilter>,
    allow: Counter,
    deny: Counter,
    error_denied: Counter,
    error_allowed: Counter,
}

fn json(status: StatusCode, body: serde_json::Value) -> crate::LocalResponse {
    let mut res = http::Response::new(http_body_util::Full::new(Bytes::from(body.to_string())));
    *res.status_mut() = status;
    res.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

#[async_trait]
impl Filter for RoutePolicyFilter {
    fn name(&self) -> &'static str {
        "policy"
    }

    fn wants_body(&self) -> bool {
        true
    }

    async fn on_request(&self, ex: &mut Exchange) -> Verdict {
        match self.shared.decide(input_of(ex)) {
            Ok(d) if d.allow => {
                self.allow.increment(1);
                Verdict::Continue
            }
            Ok(d) => {
                self.deny.increment(1);
                Verdict::Respond(json(
                    StatusCode::FORBIDDEN,
                    serde_json::json!({
                        "error": "policy_denied",
                        "detail": if d.reasons.is_empty() { "the policy did not allow the request".to_string() } else { d.reasons.join("; ") },
                        "reasons": d.reasons,
                    }),
                ))
            }
            Err(e) => match self.shared.on_error {
                OnError::Allow => {
                    self.error_allowed.increment(1);
                    tracing::warn!(error = %e, "policy evaluation failed; on_error: allow forwards");
                    Verdict::Continue
                }
                OnError::Deny => {
                    self.error_denied.increment(1);
                    tracing::warn!(error = %e, "policy evaluation failed; on_error: deny");
                    Verdict::Respond(crate::json_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "policy_error",
                        format!("the policy could not be evaluated: {e}"),
                    ))
                }
            },
        }
    }
}

/// One `test_` rule of a policy directory and whether it passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestResult {
    pub name: String,
    pub passed: bool,
    pub error: Option<String>,
}

/// Runs every `test_` rule of the policies in `dir`, as `opa test` does: each must
/// evaluate to `true`.
pub fn run_tests(dir: &Path) -> Result<Vec<TestResult>, PolicyError> {
    let engine = load_engine(dir)?;
    let mut results = Vec::new();
    for path in rego_files(dir)? {
        let text = std::fs::read_to_string(&path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let Some(package) = text.lines().find_map(|l| {
            l.trim()
                .strip_prefix("package ")
                .map(|p| p.trim().to_string())
        }) else {
            continue;
        };
        let mut seen = Vec::new();
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("test_") else {
                continue;
            };
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let rule = format!("test_{name}");
            if seen.contains(&rule) {
                continue;
            }
            seen.push(rule.clone());
            let mut e = engine.clone();
            let full = format!("data.{package}.{rule}");
            let (passed, error) = match e.eval_rule(full.clone()) {
                Ok(v) => (v == regorus::Value::from(true), None),
                Err(err) => (false, Some(err.to_string())),
            };
            results.push(TestResult {
                name: full,
                passed,
                error,
            });
        }
    }
    Ok(results)
}
