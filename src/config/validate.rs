//! Validation: what a config may hold beyond what its types say, and [`ValidConfig`],
//! the only form of a config the proxy starts from.
//!
//! Every problem is reported at once, each with its field path (the caller adds the
//! line). References between parts (a route's clusters and filters, the migration's
//! routes), ranges (percentages, shares, timeouts) and addresses are checked here; the
//! files a config names (models, keys, certificates) are loaded by `acge-proxy check`
//! and by the start.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use super::lines::LineIndex;
use super::types::{Config, MigrationConfig};
use super::ConfigError;

/// A config that passed validation. [`crate::start`] takes only this, so nothing it
/// indexes (a route's cluster, an address) can be missing.
#[derive(Debug, Clone)]
pub struct ValidConfig {
    config: Config,
    listener_at: SocketAddr,
    admin_at: SocketAddr,
    custom_filters: Vec<String>,
    /// Where each field is written, when the config came from a file.
    lines: Option<Arc<LineIndex>>,
    /// The file it was read from (a reload reads it again), when it came from one,
    /// and the SHA-256 of the bytes read.
    source: Option<(std::path::PathBuf, String)>,
}

impl std::ops::Deref for ValidConfig {
    type Target = Config;

    fn deref(&self) -> &Config {
        &self.config
    }
}

impl ValidConfig {
    /// Validates a config built or changed in code (line numbers are not known here).
    /// `custom_filters` are the names of filters the embedding program registers.
    pub fn new(config: Config, custom_filters: &[&str]) -> Result<Self, super::ConfigErrors> {
        Self::checked(config, custom_filters, "config", None)
    }

    pub(super) fn checked(
        config: Config,
        custom_filters: &[&str],
        origin: &str,
        lines: Option<LineIndex>,
    ) -> Result<Self, super::ConfigErrors> {
        let mut errors = config.problems(custom_filters);
        for e in &mut errors {
            e.line = lines.as_ref().and_then(|l| l.line_of(&e.path));
        }
        errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
        if !errors.is_empty() {
            return Err(super::ConfigErrors {
                origin: origin.to_string(),
                errors,
            });
        }
        Ok(Self {
            listener_at: parse_socket_addr(&config.listener.address).expect("validated just above"),
            admin_at: parse_socket_addr(&config.admin.address).expect("validated just above"),
            custom_filters: custom_filters.iter().map(|s| s.to_string()).collect(),
            lines: lines.map(Arc::new),
            source: None,
            config,
        })
    }

    /// Records the file the config was read from, and what it held (for reloads).
    pub(super) fn read_from(mut self, path: &std::path::Path, bytes: &[u8]) -> Self {
        self.source = Some((path.to_path_buf(), super::sha256_hex(bytes)));
        self
    }

    /// The file the config was read from; None for one built in code or embedded
    /// (which cannot be reloaded).
    pub fn source(&self) -> Option<&std::path::Path> {
        self.source.as_ref().map(|(p, _)| p.as_path())
    }

    /// The SHA-256 of the config: of the file's bytes when it came from a file, else of
    /// its JSON form.
    pub fn sha256(&self) -> String {
        match &self.source {
            Some((_, digest)) => digest.clone(),
            None => super::sha256_hex(&serde_json::to_vec(&self.config).unwrap_or_default()),
        }
    }

    /// Names of the embedding program's filters this config was validated with.
    pub fn custom_filters(&self) -> Vec<&str> {
        self.custom_filters.iter().map(String::as_str).collect()
    }

    /// The config, to change it (then validate it again with [`ValidConfig::new`]).
    pub fn into_inner(self) -> Config {
        self.config
    }

    pub fn listener_addr(&self) -> SocketAddr {
        self.listener_at
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_at
    }

    /// Whether `name` is one of the embedding program's filters.
    pub fn is_custom_filter(&self, name: &str) -> bool {
        self.custom_filters.iter().any(|f| f == name)
    }

    /// The line a field path is written on, when the config came from a file.
    pub fn line_of(&self, path: &str) -> Option<usize> {
        self.lines.as_ref().and_then(|l| l.line_of(path))
    }
}

impl Config {
    /// Whether any route runs the filter `name`.
    pub fn uses_filter(&self, name: &str) -> bool {
        self.routes
            .iter()
            .any(|r| r.filters.iter().any(|f| f == name))
    }

    /// Checks what serde cannot; returns every problem (lines are filled in by the
    /// caller). `custom` names filters the embedding program brings.
    fn problems(&self, custom: &[&str]) -> Vec<ConfigError> {
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
        let l = &self.listener;
        for (field, value) in [
            ("backlog", u64::from(l.backlog)),
            ("max_connections", l.max_connections as u64),
            ("max_requests_in_flight", l.max_requests_in_flight as u64),
            ("max_buffered_bytes", l.max_buffered_bytes),
            ("first_byte_timeout_ms", l.first_byte_timeout_ms),
            ("header_read_timeout_ms", l.header_read_timeout_ms),
            ("body_read_timeout_ms", l.body_read_timeout_ms),
            ("idle_timeout_ms", l.idle_timeout_ms),
            (
                "h2_max_concurrent_streams",
                u64::from(l.h2_max_concurrent_streams),
            ),
        ] {
            if value == 0 {
                err(format!("listener.{field}"), "must be at least 1".into());
            }
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
            if cluster.max_connections == 0 {
                err(
                    format!("clusters.{name}.max_connections"),
                    "must be at least 1".into(),
                );
            }
            if cluster.max_response_header_bytes < 1024 {
                err(
                    format!("clusters.{name}.max_response_header_bytes"),
                    format!(
                        "{} is too small (at least 1024)",
                        cluster.max_response_header_bytes
                    ),
                );
            }
            if let Some(tls) = &cluster.tls {
                let at = |field: &str| format!("clusters.{name}.tls.{field}");
                match (&tls.cert, &tls.key) {
                    (Some(_), None) => {
                        err(at("key"), "needed with tls.cert (mTLS takes both)".into())
                    }
                    (None, Some(_)) => {
                        err(at("cert"), "needed with tls.key (mTLS takes both)".into())
                    }
                    _ => {}
                }
                if let Some(sni) = &tls.sni {
                    if rustls::pki_types::ServerName::try_from(sni.as_str()).is_err() {
                        err(
                            at("sni"),
                            format!("`{sni}` is not a DNS name or an IP address"),
                        );
                    }
                }
                if let Some(alpn) = &tls.alpn {
                    let h2 = alpn.iter().any(|p| p == "h2");
                    let h1 = alpn.iter().any(|p| p == "http/1.1");
                    if let Some(bad) = alpn.iter().find(|p| *p != "h2" && *p != "http/1.1") {
                        err(
                            at("alpn"),
                            format!("`{bad}` is not a protocol the proxy speaks (h2, http/1.1)"),
                        );
                    } else if cluster.protocol == super::Protocol::Http2 && !h2 {
                        err(
                            at("alpn"),
                            "protocol is http2, so ALPN must offer h2".into(),
                        );
                    } else if cluster.protocol == super::Protocol::Http1 && !h1 {
                        err(
                            at("alpn"),
                            "protocol is http1, so ALPN must offer http/1.1".into(),
                        );
                    }
                }
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
                let at = format!("routes[{i}].filters[{j}]");
                if !seen.insert(filter) {
                    err(at, format!("`{filter}` is listed twice"));
                } else if custom.contains(&filter.as_str()) {
                    continue;
                } else if let Some(why) = self.filters.refuse(filter) {
                    err(at, why);
                }
            }
        }
        if http::HeaderValue::from_str(&self.constitution.hash).is_err() {
            err(
                "constitution.hash".into(),
                "must be printable ASCII (it travels in a header)".into(),
            );
        }
        for e in self.filters.validate() {
            err(e.path, e.message);
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
}

pub(super) fn parse_socket_addr(s: &str) -> Result<SocketAddr, String> {
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
pub(super) fn split_serde_path(message: &str) -> (String, String) {
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
