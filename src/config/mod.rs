//! The YAML configuration: its serde types, documented defaults, and validation.
//!
//! Loading is two passes. Serde (with `deny_unknown_fields`) catches shape errors and
//! reports them with a field path and line. [`Config::validate`] then checks what the
//! types cannot say (cluster references, percentages, addresses, duplicates) and reports
//! *every* problem at once, each with its field path and, where the scanner finds it,
//! the line. This module owns no runtime state; `lib.rs` turns a valid config into a
//! running proxy.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod lines;
use lines::LineIndex;

/// The constitutional hash every request and response is expected to carry.
pub const DEFAULT_CONSTITUTION_HASH: &str = "cdd01ef066bc6cf2";

/// Filters this build can run. Routes naming anything else are refused at load.
pub const KNOWN_FILTERS: &[&str] = &["constitutional_hash", "acge", "audit"];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listener: ListenerConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub constitution: ConstitutionConfig,
    pub clusters: BTreeMap<String, ClusterConfig>,
    pub routes: Vec<RouteConfig>,
    /// Settings of each filter, shared by every route that lists it.
    #[serde(default)]
    pub filters: FiltersConfig,
    /// The migration controller; absent, weights move only through the admin API.
    #[serde(default)]
    pub migration: Option<MigrationConfig>,
}

/// The migration controller (docs/migration.md): steps, gates, rollback, shadow.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationConfig {
    /// Routes the controller walks; every route when left out.
    #[serde(default)]
    pub routes: Option<Vec<String>>,
    /// Green weights, percent, in order; a leading 0 is the shadow step.
    #[serde(default = "defaults::steps")]
    pub steps: Vec<u8>,
    /// Time in a step, and the window its gates are judged over, in seconds.
    #[serde(default = "defaults::interval_s")]
    pub interval_s: f64,
    /// Green requests an interval needs before it may advance.
    #[serde(default = "defaults::min_requests")]
    pub min_requests: u64,
    /// Rollback is judged continuously over this recent window, in seconds…
    #[serde(default = "defaults::rollback_window_s")]
    pub rollback_window_s: f64,
    /// …once it holds at least this many green requests.
    #[serde(default = "defaults::rollback_min_requests")]
    pub rollback_min_requests: u64,
    #[serde(default)]
    pub rollback: RollbackThresholds,
    /// Where progress is kept across restarts (written atomically).
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    #[serde(default)]
    pub shadow: ShadowConfig,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackThresholds {
    #[serde(default = "defaults::compliance_below")]
    pub compliance_below: f64,
    #[serde(default = "defaults::p95_above_ms")]
    pub p95_above_ms: f64,
    #[serde(default = "defaults::error_rate_above")]
    pub error_rate_above: f64,
    #[serde(default = "defaults::hash_consistency_below")]
    pub hash_consistency_below: f64,
}

impl Default for RollbackThresholds {
    fn default() -> Self {
        Self {
            compliance_below: defaults::compliance_below(),
            p95_above_ms: defaults::p95_above_ms(),
            error_rate_above: defaults::error_rate_above(),
            hash_consistency_below: defaults::hash_consistency_below(),
        }
    }
}

/// Mirroring to green at the shadow step.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// Share of requests mirrored, 0–1.
    #[serde(default = "defaults::shadow_fraction")]
    pub fraction: f64,
    /// Mirrored requests in flight at most; beyond it a request is not mirrored.
    #[serde(default = "defaults::shadow_max_inflight")]
    pub max_inflight: usize,
    /// Top-level JSON fields left out when blue's and green's bodies are compared.
    #[serde(default)]
    pub ignore_fields: Vec<String>,
}

impl Default for ShadowConfig {
    fn default() -> Self {
        Self {
            fraction: defaults::shadow_fraction(),
            max_inflight: defaults::shadow_max_inflight(),
            ignore_fields: Vec::new(),
        }
    }
}

impl MigrationConfig {
    /// Whether the controller walks the route `name`.
    pub fn covers(&self, name: &str) -> bool {
        self.routes
            .as_ref()
            .is_none_or(|routes| routes.iter().any(|r| r == name))
    }

    /// The longest span a window must cover.
    pub fn window_span(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.interval_s.max(self.rollback_window_s).max(0.05))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FiltersConfig {
    /// Defaults to `{mode: enforce}` for routes that list the filter.
    #[serde(default)]
    pub constitutional_hash: Option<acge_filters::hash::HashConfig>,
    /// Needed by routes that list `acge` (its `model` has no default).
    #[serde(default)]
    pub acge: Option<acge_filters::acge::filter::AcgeConfig>,
    /// Needed by routes that list `audit` (its `dir` has no default).
    #[serde(default)]
    pub audit: Option<acge_filters::audit::AuditConfig>,
}

impl Config {
    /// Whether any route runs the filter `name`.
    pub fn uses_filter(&self, name: &str) -> bool {
        self.routes
            .iter()
            .any(|r| r.filters.iter().any(|f| f == name))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `host:port` the proxy accepts traffic on, HTTP/1.1 and HTTP/2 alike.
    pub address: String,
    /// Serve TLS (ALPN h2 and http/1.1) instead of cleartext.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Runtime worker threads; default: one per CPU.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Requests whose header block (names and values) is larger get 431.
    #[serde(default = "defaults::max_header_bytes")]
    pub max_header_bytes: usize,
    /// An HTTP/1 client must finish sending its headers within this time.
    #[serde(default = "defaults::header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// On shutdown, in-flight requests get this long to finish.
    #[serde(default = "defaults::drain_timeout_ms")]
    pub drain_timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "defaults::admin_address")]
    pub address: String,
    /// File holding the bearer token for mutations; read on every mutation, so a
    /// rotated secret applies without a restart. Without it, `ACGE_ADMIN_TOKEN` is used.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            address: defaults::admin_address(),
            token_file: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConstitutionConfig {
    #[serde(default = "defaults::constitution_hash")]
    pub hash: String,
}

impl Default for ConstitutionConfig {
    fn default() -> Self {
        Self {
            hash: defaults::constitution_hash(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 to the upstream (keep-alive pooled).
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c) to the upstream.
    Http2,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `host:port` of each endpoint; requests go round robin. Empty means every request
    /// to the cluster gets 503.
    pub endpoints: Vec<String>,
    #[serde(default = "defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time allowed from sending the request until the response head arrives.
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub protocol: Protocol,
    /// Idle pooled connections are closed after this long.
    #[serde(default = "defaults::idle_timeout_ms")]
    pub idle_timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: MatchConfig,
    pub blue: String,
    pub green: String,
    /// Percent of requests sent to green, 0–100. The admin API changes it at runtime.
    #[serde(default)]
    pub green_weight: i64,
    /// Keep one client on one version: its key hashes to a fixed point.
    #[serde(default)]
    pub sticky: Option<StickyConfig>,
    /// Honour `x-acge-version: blue|green` from clients (for testing a version directly).
    #[serde(default)]
    pub version_override: bool,
    /// Filter names, run in this order (see docs/filters.md).
    #[serde(default)]
    pub filters: Vec<String>,
    /// Largest body a filter may buffer, request or response; 413 beyond it.
    #[serde(default = "defaults::max_body_bytes")]
    pub max_body_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    pub path_prefix: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StickyConfig {
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub cookie: Option<String>,
}

mod defaults {
    pub fn steps() -> Vec<u8> {
        vec![0, 5, 10, 25, 50, 75, 100]
    }
    pub fn interval_s() -> f64 {
        60.0
    }
    pub fn min_requests() -> u64 {
        200
    }
    pub fn rollback_window_s() -> f64 {
        10.0
    }
    pub fn rollback_min_requests() -> u64 {
        20
    }
    pub fn compliance_below() -> f64 {
        0.95
    }
    pub fn p95_above_ms() -> f64 {
        2000.0
    }
    pub fn error_rate_above() -> f64 {
        0.01
    }
    pub fn hash_consistency_below() -> f64 {
        1.0
    }
    pub fn shadow_fraction() -> f64 {
        1.0
    }
    pub fn shadow_max_inflight() -> usize {
        64
    }
    pub fn max_header_bytes() -> usize {
        32 * 1024
    }
    pub fn header_read_timeout_ms() -> u64 {
        10_000
    }
    pub fn drain_timeout_ms() -> u64 {
        10_000
    }
    pub fn admin_address() -> String {
        "127.0.0.1:15000".into()
    }
    pub fn constitution_hash() -> String {
        super::DEFAULT_CONSTITUTION_HASH.into()
    }
    pub fn connect_timeout_ms() -> u64 {
        250
    }
    pub fn timeout_ms() -> u64 {
        5_000
    }
    pub fn idle_timeout_ms() -> u64 {
        90_000
    }
    pub fn max_body_bytes() -> u64 {
        1024 * 1024
    }
}

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Field path, e.g. `routes[1].green_weight`; empty for whole-file problems.
    pub path: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in one config file, in file order where lines are known.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors {
    pub origin: String,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {e}", self.origin)?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            origin: origin.clone(),
            errors: vec![ConfigError {
                path: String::new(),
                line: None,
                message: format!("cannot read the file: {e}"),
            }],
        })?;
        let mut config = Self::from_yaml(&text, &origin)?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        Ok(config)
    }

    /// Parses and validates YAML text; `origin` names it in errors.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Config, ConfigErrors> {
        let fail = |errors| ConfigErrors {
            origin: origin.to_string(),
            errors,
        };
        let config: Config = serde_yaml_ng::from_str(text).map_err(|e| {
            let line = e.location().map(|l| l.line());
            // serde_yaml_ng appends " at line L column C"; the line is reported apart.
            let message = e.to_string();
            let message = match message.rfind(" at line ") {
                Some(i) if line.is_some() => message[..i].to_string(),
                _ => message,
            };
            let (path, message) = split_serde_path(&message);
            fail(vec![ConfigError {
                path,
                line,
                message,
            }])
        })?;
        let lines = LineIndex::new(text);
        let mut errors = config.validate();
        for e in &mut errors {
            e.line = lines.line_of(&e.path);
        }
        errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(fail(errors))
        }
    }

    /// TLS files named relative to the config file are found beside it.
    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(tls) = &mut self.listener.tls {
            resolve(&mut tls.cert);
            resolve(&mut tls.key);
        }
        if let Some(token) = &mut self.admin.token_file {
            resolve(token);
        }
        if let Some(acge) = &mut self.filters.acge {
            resolve(&mut acge.model);
        }
        if let Some(state) = self.migration.as_mut().and_then(|m| m.state_file.as_mut()) {
            resolve(state);
        }
        if let Some(audit) = &mut self.filters.audit {
            resolve(&mut audit.dir);
            if let Some(key) = &mut audit.key_file {
                resolve(key);
            }
        }
    }

    /// Checks what serde cannot; returns every problem (lines are filled in by the caller).
    pub fn validate(&self) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let mut err = |path: String, message: String| {
            errors.push(ConfigError {
                path,
                line: None,
                message,
            })
        };

        if let Err(m) = parse_socket_addr(&self.listener.address) {
            err("listener.address".into(), m);
        }
        if self.listener.workers == Some(0) {
            err(
                "listener.workers".into(),
                "must be at least 1 (or left out for one per CPU)".into(),
            );
        }
        if self.listener.max_header_bytes < 1024 {
            err(
                "listener.max_header_bytes".into(),
                format!(
                    "{} is too small (at least 1024)",
                    self.listener.max_header_bytes
                ),
            );
        }
        if let Err(m) = parse_socket_addr(&self.admin.address) {
            err("admin.address".into(), m);
        }
        if self.constitution.hash.is_empty() {
            err("constitution.hash".into(), "must not be empty".into());
        }

        for (name, cluster) in &self.clusters {
            for (i, endpoint) in cluster.endpoints.iter().enumerate() {
                if let Err(m) = parse_endpoint(endpoint) {
                    err(format!("clusters.{name}.endpoints[{i}]"), m);
                }
            }
            if cluster.connect_timeout_ms == 0 {
                err(
                    format!("clusters.{name}.connect_timeout_ms"),
                    "must be above 0".into(),
                );
            }
            if cluster.timeout_ms == 0 {
                err(
                    format!("clusters.{name}.timeout_ms"),
                    "must be above 0".into(),
                );
            }
        }

        if self.routes.is_empty() {
            err("routes".into(), "at least one route is needed".into());
        }
        let mut names: HashMap<&str, usize> = HashMap::new();
        let mut prefixes: HashMap<&str, usize> = HashMap::new();
        for (i, route) in self.routes.iter().enumerate() {
            let at = |field: &str| format!("routes[{i}].{field}");
            if route.name.is_empty() {
                err(at("name"), "must not be empty".into());
            } else if !route
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                err(
                    at("name"),
                    format!(
                        "`{}` may use only letters, digits, `-` and `_` (it is a URL segment and a metric label)",
                        route.name
                    ),
                );
            } else if let Some(first) = names.insert(&route.name, i) {
                err(
                    at("name"),
                    format!("`{}` is already the name of routes[{first}]", route.name),
                );
            }
            let prefix = &route.matcher.path_prefix;
            if !prefix.starts_with('/') {
                err(
                    at("match.path_prefix"),
                    format!("`{prefix}` must start with `/`"),
                );
            } else if let Some(first) = prefixes.insert(prefix, i) {
                err(
                    at("match.path_prefix"),
                    format!("`{prefix}` is already matched by routes[{first}]"),
                );
            }
            for side in ["blue", "green"] {
                let cluster = if side == "blue" {
                    &route.blue
                } else {
                    &route.green
                };
                if !self.clusters.contains_key(cluster) {
                    err(
                        at(side),
                        format!(
                            "unknown cluster `{cluster}` (clusters: {})",
                            self.clusters.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    );
                }
            }
            if !(0..=100).contains(&route.green_weight) {
                err(
                    at("green_weight"),
                    format!("{} is not a percentage (0–100)", route.green_weight),
                );
            }
            if let Some(sticky) = &route.sticky {
                match (&sticky.header, &sticky.cookie) {
                    (Some(h), None) => {
                        if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                            err(at("sticky.header"), format!("`{h}` is not a header name"));
                        }
                    }
                    (None, Some(c)) => {
                        if c.is_empty() || c.contains([';', '=', ' ']) {
                            err(at("sticky.cookie"), format!("`{c}` is not a cookie name"));
                        }
                    }
                    _ => err(
                        at("sticky"),
                        "give exactly one of `header` or `cookie`".into(),
                    ),
                }
            }
            let mut seen = HashSet::new();
            for (j, filter) in route.filters.iter().enumerate() {
                if !KNOWN_FILTERS.contains(&filter.as_str()) {
                    let known = if KNOWN_FILTERS.is_empty() {
                        "this build has none yet".to_string()
                    } else {
                        format!("known: {}", KNOWN_FILTERS.join(", "))
                    };
                    err(
                        format!("routes[{i}].filters[{j}]"),
                        format!("unknown filter `{filter}` ({known})"),
                    );
                } else if !seen.insert(filter) {
                    err(
                        format!("routes[{i}].filters[{j}]"),
                        format!("`{filter}` is listed twice"),
                    );
                } else if filter == "audit" && self.filters.audit.is_none() {
                    err(
                        format!("routes[{i}].filters[{j}]"),
                        "`audit` needs a `filters.audit` section with its `dir`".into(),
                    );
                } else if filter == "acge" && self.filters.acge.is_none() {
                    err(
                        format!("routes[{i}].filters[{j}]"),
                        "`acge` needs a `filters.acge` section with its `model`".into(),
                    );
                }
            }
        }
        if http::HeaderValue::from_str(&self.constitution.hash).is_err() {
            err(
                "constitution.hash".into(),
                "must be printable ASCII (it travels in a header)".into(),
            );
        }
        if let Some(acge) = &self.filters.acge {
            if acge.max_batch == 0 || acge.queue == 0 || acge.timeout_ms == 0 {
                err(
                    "filters.acge".into(),
                    "max_batch, queue and timeout_ms must each be at least 1".into(),
                );
            }
            if acge.on.is_empty() {
                err(
                    "filters.acge.on".into(),
                    "list request, response or both".into(),
                );
            }
            if let Some(t) = acge.threshold.filter(|t| !(0.0..=1.0).contains(t)) {
                err(
                    "filters.acge.threshold".into(),
                    format!("{t} is not a probability (0–1)"),
                );
            }
        }
        if let Some(audit) = &self.filters.audit {
            if audit.queue == 0 {
                err("filters.audit.queue".into(), "must be at least 1".into());
            }
            if audit.checkpoint_every == 0 {
                err(
                    "filters.audit.checkpoint_every".into(),
                    "must be at least 1".into(),
                );
            }
            if audit.segment_bytes < 4096 {
                err(
                    "filters.audit.segment_bytes".into(),
                    format!("{} is too small (at least 4096)", audit.segment_bytes),
                );
            }
        }
        if let Some(m) = &self.migration {
            self.validate_migration(m, &mut err);
        }
        if let Some(tls) = &self.listener.tls {
            for (field, path) in [("cert", &tls.cert), ("key", &tls.key)] {
                if path.as_os_str().is_empty() {
                    err(format!("listener.tls.{field}"), "must name a file".into());
                }
            }
        }
        errors
    }

    fn validate_migration(&self, m: &MigrationConfig, err: &mut impl FnMut(String, String)) {
        if m.steps.is_empty() {
            err("migration.steps".into(), "list at least one step".into());
        }
        for (i, step) in m.steps.iter().enumerate() {
            if *step > 100 {
                err(
                    format!("migration.steps[{i}]"),
                    format!("{step} is not a percentage (0–100)"),
                );
            } else if i > 0 && *step <= m.steps[i - 1] {
                err(
                    format!("migration.steps[{i}]"),
                    format!(
                        "{step} does not rise above the step before it ({})",
                        m.steps[i - 1]
                    ),
                );
            }
        }
        for (field, value) in [
            ("interval_s", m.interval_s),
            ("rollback_window_s", m.rollback_window_s),
        ] {
            if !(0.05..=86_400.0).contains(&value) {
                err(
                    format!("migration.{field}"),
                    format!("{value} is not between 0.05 and 86400 seconds"),
                );
            }
        }
        if m.rollback_min_requests == 0 {
            err(
                "migration.rollback_min_requests".into(),
                "must be at least 1 (one request is no evidence)".into(),
            );
        }
        let r = &m.rollback;
        for (field, value) in [
            ("compliance_below", r.compliance_below),
            ("error_rate_above", r.error_rate_above),
            ("hash_consistency_below", r.hash_consistency_below),
        ] {
            if !(0.0..=1.0).contains(&value) {
                err(
                    format!("migration.rollback.{field}"),
                    format!("{value} is not a share (0–1)"),
                );
            }
        }
        if !(r.p95_above_ms.is_finite() && r.p95_above_ms > 0.0) {
            err(
                "migration.rollback.p95_above_ms".into(),
                format!("{} must be above 0", r.p95_above_ms),
            );
        }
        if !(0.0..=1.0).contains(&m.shadow.fraction) {
            err(
                "migration.shadow.fraction".into(),
                format!("{} is not a share (0–1)", m.shadow.fraction),
            );
        }
        if m.shadow.max_inflight == 0 {
            err(
                "migration.shadow.max_inflight".into(),
                "must be at least 1".into(),
            );
        }
        for (i, name) in m.routes.iter().flatten().enumerate() {
            if !self.routes.iter().any(|r| &r.name == name) {
                err(
                    format!("migration.routes[{i}]"),
                    format!("no route is named `{name}`"),
                );
            }
        }
    }

    /// The listener address; valid once [`Config::validate`] passed.
    pub fn listener_addr(&self) -> SocketAddr {
        parse_socket_addr(&self.listener.address).expect("validated before the proxy starts")
    }

    /// The admin address; valid once [`Config::validate`] passed.
    pub fn admin_addr(&self) -> SocketAddr {
        parse_socket_addr(&self.admin.address).expect("validated before the proxy starts")
    }
}

fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("`{s}` is not an address (ip:port, e.g. 0.0.0.0:15001)"))
}

/// An endpoint is `host:port`, where host is an IP or a DNS name.
pub fn parse_endpoint(s: &str) -> Result<http::uri::Authority, String> {
    let bad = || format!("`{s}` is not an endpoint (host:port, e.g. 127.0.0.1:8000)");
    let authority: http::uri::Authority = s.parse().map_err(|_| bad())?;
    if authority.port_u16().is_none() || authority.host().is_empty() || s.contains('@') {
        return Err(bad());
    }
    Ok(authority)
}

/// serde_yaml_ng errors read `routes[0].blue: invalid type ...`; the path is split off so
/// that shape errors and validation errors print alike.
fn split_serde_path(message: &str) -> (String, String) {
    if let Some((path, rest)) = message.split_once(": ") {
        let looks_like_path = !path.is_empty()
            && !path.contains(' ')
            && path
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-[]".contains(c));
        if looks_like_path {
            return (path.to_string(), rest.to_string());
        }
    }
    (String::new(), message.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
listener:
  address: 127.0.0.1:15001
clusters:
  auth-blue: {endpoints: [\"127.0.0.1:8000\"]}
  auth-green:
    endpoints:
      - auth-acge.acgs.svc:8000
routes:
  - name: auth
    match: {path_prefix: /api/v1/auth}
    blue: auth-blue
    green: auth-green
    green_weight: 5
";

    fn errors_of(text: &str) -> Vec<ConfigError> {
        Config::from_yaml(text, "t.yaml").unwrap_err().errors
    }

    #[test]
    fn good_config_loads_with_documented_defaults() {
        let c = Config::from_yaml(GOOD, "t.yaml").unwrap();
        assert_eq!(c.admin.address, "127.0.0.1:15000");
        assert_eq!(c.constitution.hash, DEFAULT_CONSTITUTION_HASH);
        assert_eq!(c.clusters["auth-blue"].connect_timeout_ms, 250);
        assert_eq!(c.clusters["auth-green"].protocol, Protocol::Http1);
        assert_eq!(c.routes[0].green_weight, 5);
        assert!(!c.routes[0].version_override);
    }

    #[test]
    fn weight_over_100_names_field_and_line() {
        let e = errors_of(&GOOD.replace("green_weight: 5", "green_weight: 140"));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].path, "routes[0].green_weight");
        assert_eq!(e[0].line, Some(13));
        assert_eq!(
            e[0].to_string(),
            "line 13: routes[0].green_weight: 140 is not a percentage (0–100)"
        );
    }

    #[test]
    fn migration_mistakes_name_their_field_and_line() {
        let text = format!(
            "{GOOD}migration:\n  steps: [0, 50, 25]\n  interval_s: 0\n  routes: [auth, nope]\n  rollback: {{error_rate_above: 2}}\n"
        );
        let e = errors_of(&text);
        let paths: Vec<_> = e.iter().map(|e| (e.path.as_str(), e.line)).collect();
        assert_eq!(
            paths,
            vec![
                ("migration.steps[2]", Some(15)),
                ("migration.interval_s", Some(16)),
                ("migration.routes[1]", Some(17)),
                ("migration.rollback.error_rate_above", Some(18)),
            ],
            "{e:?}"
        );
        let c = Config::from_yaml(&format!("{GOOD}migration: {{}}\n"), "t.yaml").unwrap();
        let m = c.migration.unwrap();
        assert_eq!(m.steps, [0, 5, 10, 25, 50, 75, 100]);
        assert_eq!((m.interval_s, m.min_requests), (60.0, 200));
        assert_eq!(m.rollback.p95_above_ms, 2000.0);
        assert!(m.covers("auth"));
    }

    #[test]
    fn unknown_cluster_is_named() {
        let e = errors_of(&GOOD.replace("green: auth-green", "green: auth-grene"));
        assert_eq!(e[0].path, "routes[0].green");
        assert_eq!(e[0].line, Some(12));
        assert!(
            e[0].message.contains("unknown cluster `auth-grene`"),
            "{}",
            e[0]
        );
    }

    #[test]
    fn bad_addresses_are_named() {
        let text = GOOD
            .replace("127.0.0.1:15001", "localhost")
            .replace("auth-acge.acgs.svc:8000", "no-port");
        let e = errors_of(&text);
        let paths: Vec<_> = e.iter().map(|e| (e.path.as_str(), e.line)).collect();
        assert_eq!(
            paths,
            vec![
                ("listener.address", Some(2)),
                ("clusters.auth-green.endpoints[0]", Some(7))
            ]
        );
    }

    #[test]
    fn duplicate_route_is_named_with_the_first() {
        let text = format!(
            "{GOOD}  - name: auth\n    match: {{path_prefix: /other}}\n    blue: auth-blue\n    green: auth-green\n"
        );
        let e = errors_of(&text);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].path, "routes[1].name");
        assert_eq!(e[0].line, Some(14));
        assert!(e[0].message.contains("routes[0]"));
    }

    #[test]
    fn unknown_field_is_a_shape_error_with_path_and_line() {
        let e = errors_of(&GOOD.replace("green_weight: 5", "green_wieght: 5"));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].path, "routes[0]");
        assert_eq!(e[0].line, Some(13));
        assert!(
            e[0].message.contains("unknown field `green_wieght`"),
            "{}",
            e[0]
        );
    }

    #[test]
    fn sticky_needs_exactly_one_key() {
        let e = errors_of(&GOOD.replace(
            "green_weight: 5",
            "green_weight: 5\n    sticky: {header: x-user, cookie: sid}",
        ));
        assert_eq!(e[0].path, "routes[0].sticky");
        assert_eq!(e[0].line, Some(14));
    }

    #[test]
    fn all_errors_are_reported_at_once() {
        let text = GOOD
            .replace("green_weight: 5", "green_weight: -1")
            .replace("blue: auth-blue", "blue: nope")
            .replace("/api/v1/auth", "api");
        let e = errors_of(&text);
        let paths: Vec<_> = e.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                "routes[0].match.path_prefix",
                "routes[0].blue",
                "routes[0].green_weight"
            ]
        );
    }

    #[test]
    fn unknown_filter_is_refused() {
        let e = errors_of(&GOOD.replace(
            "green_weight: 5",
            "green_weight: 5\n    filters: [constitutional_hash, rate_limit]",
        ));
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].path, "routes[0].filters[1]");
        assert!(
            e[0].message
                .contains("unknown filter `rate_limit` (known: constitutional_hash, acge, audit)"),
            "{}",
            e[0]
        );
    }
}
