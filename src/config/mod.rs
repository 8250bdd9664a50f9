//! The YAML configuration: loading, its types ([`types`]), validation ([`validate`])
//! and where each field is written ([`lines`]).
//!
//! Loading is two passes. Serde (with `deny_unknown_fields`) catches shape errors and
//! reports them with a field path and line. Validation then checks what the types
//! cannot say (cluster references, percentages, addresses, duplicates) and reports
//! *every* problem at once, each with its field path and, where the scanner finds it,
//! the line. The result is a [`ValidConfig`], the only form [`crate::start`] takes.
//! [`reload`] reads the file again at runtime ([`watch`] sees it change) and holds the
//! generation serving; the rest of this module owns no runtime state.

use std::fmt;
use std::path::{Path, PathBuf};

mod lines;
pub mod reload;
mod types;
mod validate;
mod watch;

use lines::LineIndex;
pub use types::*;
pub use validate::{parse_endpoint, ValidConfig};
pub use watch::spawn as watch_file;

/// Deepest nesting a config may have. Config files people write are a few levels
/// deep; a bound keeps parsing linear in the file's size.
pub const MAX_DEPTH: usize = 32;

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

/// Lower-case hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Config {
    /// Reads, parses and validates a config file; paths in it are relative to its
    /// directory.
    pub fn load(path: &Path) -> Result<ValidConfig, ConfigErrors> {
        let text = std::fs::read(path).map_err(|e| ConfigErrors {
            origin: path.display().to_string(),
            errors: vec![ConfigError {
                path: String::new(),
                line: None,
                message: format!("cannot read the file: {e}"),
            }],
        })?;
        Self::load_bytes(path, &text, &[])
    }

    /// Parses and validates the contents of the config file `path` (read by the
    /// caller: a reload hashes what it read); `custom_filters` as in
    /// [`ValidConfig::new`].
    pub fn load_bytes(
        path: &Path,
        bytes: &[u8],
        custom_filters: &[&str],
    ) -> Result<ValidConfig, ConfigErrors> {
        let origin = path.display().to_string();
        let text = std::str::from_utf8(bytes).map_err(|e| ConfigErrors {
            origin: origin.clone(),
            errors: vec![ConfigError {
                path: String::new(),
                line: None,
                message: format!("the file is not UTF-8: {e}"),
            }],
        })?;
        let (mut config, lines) = Self::parse(text, &origin)?;
        config.resolve_paths(path.parent().unwrap_or(Path::new(".")));
        ValidConfig::checked(config, custom_filters, &origin, Some(lines))
            .map(|valid| valid.read_from(path, bytes))
    }

    /// Parses and validates YAML text; `origin` names it in errors.
    pub fn from_yaml(text: &str, origin: &str) -> Result<ValidConfig, ConfigErrors> {
        let (config, lines) = Self::parse(text, origin)?;
        ValidConfig::checked(config, &[], origin, Some(lines))
    }

    /// Parses YAML text into a config without validating it (for a program that
    /// changes it in code, then validates it with [`ValidConfig::new`]).
    pub fn parse_yaml(text: &str, origin: &str) -> Result<Config, ConfigErrors> {
        Self::parse(text, origin).map(|(config, _)| config)
    }

    fn parse(text: &str, origin: &str) -> Result<(Config, LineIndex), ConfigErrors> {
        let fail = |error| ConfigErrors {
            origin: origin.to_string(),
            errors: vec![error],
        };
        if let Some(line) = lines::deeper_than(text, MAX_DEPTH) {
            return Err(fail(ConfigError {
                path: String::new(),
                line: Some(line),
                message: format!("nested deeper than {MAX_DEPTH} levels"),
            }));
        }
        let config: Config = serde_yaml_ng::from_str(text).map_err(|e| {
            let line = e.location().map(|l| l.line());
            // serde_yaml_ng appends " at line L column C"; the line is reported apart.
            let message = e.to_string();
            let message = match message.rfind(" at line ") {
                Some(i) if line.is_some() => message[..i].to_string(),
                _ => message,
            };
            let (path, message) = validate::split_serde_path(&message);
            fail(ConfigError {
                path,
                line,
                message,
            })
        })?;
        Ok((config, LineIndex::new(text)))
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
        for cluster in self.clusters.values_mut() {
            if let Some(tls) = &mut cluster.tls {
                resolve(&mut tls.ca);
                for file in [&mut tls.cert, &mut tls.key].into_iter().flatten() {
                    resolve(file);
                }
            }
        }

        if let Some(state) = self.migration.as_mut().and_then(|m| m.state_file.as_mut()) {
            resolve(state);
        }
        acge_filters::registry::resolve_paths(&mut self.filters, base);
    }
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
        let m = c.migration.clone().unwrap();
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
                .contains("unknown filter `rate_limit` (known: constitutional_hash, jwt, policy, acge, audit)"),
            "{}",
            e[0]
        );
    }
}
