//! The registry of built-in filters: their names, their settings (the config's
//! `filters:` section), the checks of those settings, and building them for routes.
//!
//! This is the one place a built-in filter is named. A filter is built once (its model,
//! its log) and then bound to each route that lists it, so that its per-route metric
//! handles are made here, not looked up per request.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::acge::filter::{AcgeConfig, AcgeFilter, AcgeLoadError};
use crate::audit::{AuditConfig, AuditError, AuditFilter, AuditLog};
use crate::hash::{HashConfig, HashFilter};
use crate::jwt::{JwksError, JwtConfig, JwtFilter};
use crate::policy::{PolicyConfig, PolicyError, PolicyFilter};
use crate::Filter;

/// Filters this build can run. Routes naming anything else are refused at load.
pub const KNOWN_FILTERS: &[&str] = &["constitutional_hash", "jwt", "policy", "acge", "audit"];

/// Settings of each filter, shared by every route that lists it.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FiltersConfig {
    /// Defaults to `{mode: enforce}` for routes that list the filter.
    #[serde(default)]
    pub constitutional_hash: Option<HashConfig>,
    /// Needed by routes that list `acge` (its `model` has no default).
    #[serde(default)]
    pub acge: Option<AcgeConfig>,
    /// Needed by routes that list `audit` (its `dir` has no default).
    #[serde(default)]
    pub audit: Option<AuditConfig>,
    /// Needed by routes that list `jwt` (its `jwks_file` has no default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtConfig>,
    /// Needed by routes that list `policy` (its `dir` has no default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyConfig>,
}

/// One problem with the filters' settings: the field path under `filters.` and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettingError {
    pub path: String,
    pub message: String,
}

impl SettingError {
    fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl FiltersConfig {
    /// Why a route may not list `name` (unknown, or its settings are missing).
    pub fn refuse(&self, name: &str) -> Option<String> {
        if !KNOWN_FILTERS.contains(&name) {
            return Some(format!(
                "unknown filter `{name}` (known: {})",
                KNOWN_FILTERS.join(", ")
            ));
        }
        match name {
            "audit" if self.audit.is_none() => {
                Some("`audit` needs a `filters.audit` section with its `dir`".into())
            }
            "acge" if self.acge.is_none() => {
                Some("`acge` needs a `filters.acge` section with its `model`".into())
            }
            "jwt" if self.jwt.is_none() => {
                Some("`jwt` needs a `filters.jwt` section with its `jwks_file`".into())
            }
            "policy" if self.policy.is_none() => {
                Some("`policy` needs a `filters.policy` section with its `dir`".into())
            }
            _ => None,
        }
    }

    /// Checks the settings' values, without touching the files they name.
    pub fn validate(&self) -> Vec<SettingError> {
        let mut errors = Vec::new();
        if let Some(acge) = &self.acge {
            for (field, why) in acge.problems() {
                errors.push(SettingError::new(format!("filters.acge.{field}"), why));
            }
        }
        if let Some(jwt) = &self.jwt {
            for (field, why) in jwt.problems() {
                errors.push(SettingError::new(format!("filters.jwt.{field}"), why));
            }
        }
        if let Some(audit) = &self.audit {
            if audit.queue == 0 {
                errors.push(SettingError::new(
                    "filters.audit.queue",
                    "must be at least 1",
                ));
            }
            if audit.checkpoint_every == 0 {
                errors.push(SettingError::new(
                    "filters.audit.checkpoint_every",
                    "must be at least 1",
                ));
            }
            if let Some(origin) = &audit.origin {
                if origin.is_empty() || origin.chars().any(|c| c.is_whitespace() || c == '+') {
                    errors.push(SettingError::new(
                        "filters.audit.origin",
                        format!("`{origin}` is not a log name (no spaces, no `+`)"),
                    ));
                }
            }
            if audit.segment_bytes < 4096 {
                errors.push(SettingError::new(
                    "filters.audit.segment_bytes",
                    format!("{} is too small (at least 4096)", audit.segment_bytes),
                ));
            }
        }
        errors
    }

    /// Loads what the settings name, as starting would, without starting anything or
    /// writing a file: the acge model (metadata, constitution hash, output shape) and
    /// the audit signing key when it exists. For `acge-proxy check`.
    pub fn check_files(
        &self,
        constitution_hash: &str,
        used: impl Fn(&str) -> bool,
    ) -> Vec<SettingError> {
        let mut errors = Vec::new();
        if let (Some(acge), true) = (&self.acge, used("acge")) {
            match AcgeFilter::check(acge, constitution_hash) {
                Ok(()) => {}
                Err(AcgeLoadError::Second(e)) => {
                    errors.push(SettingError::new("filters.acge.second.model", e.to_string()))
                }
                Err(AcgeLoadError::Principles { fast, second }) => errors.push(SettingError::new(
                    "filters.acge.second.model",
                    format!("its principles {second:?} are not the first model's {fast:?} (same ids, same order)"),
                )),
                Err(e) => errors.push(SettingError::new("filters.acge.model", e.to_string())),
            }
        }
        if let (Some(jwt), true) = (&self.jwt, used("jwt")) {
            if let Err(e) = JwtFilter::load(jwt, constitution_hash) {
                errors.push(SettingError::new("filters.jwt.jwks_file", e.to_string()));
            }
        }
        if let (Some(policy), true) = (&self.policy, used("policy")) {
            if let Err(e) = PolicyFilter::load(policy) {
                errors.push(SettingError::new("filters.policy.dir", e.to_string()));
            }
        }
        if let (Some(audit), true) = (&self.audit, used("audit")) {
            if let Err(e) = crate::audit::log::check_key(audit) {
                errors.push(SettingError::new("filters.audit.key_file", e.to_string()));
            }
            if audit.dir.exists() && !audit.dir.is_dir() {
                errors.push(SettingError::new(
                    "filters.audit.dir",
                    format!("{} exists and is not a directory", audit.dir.display()),
                ));
            }
        }
        errors
    }
}

/// Why the filters could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("filters.constitutional_hash: the constitution hash is not a header value")]
    Hash,
    #[error("filters.acge: {0}")]
    Acge(#[from] AcgeLoadError),
    #[error("filters.audit: {0}")]
    Audit(#[from] AuditError),
    #[error("filters.jwt: {0}")]
    Jwt(#[from] JwksError),
    #[error("filters.policy: {0}")]
    Policy(#[from] PolicyError),
}

/// The built-in filters a config runs, each built once.
pub struct Registry {
    hash: Option<Arc<HashFilter>>,
    jwt: Option<Arc<JwtFilter>>,
    /// Loaded anew on every build: a reload reads the policies again.
    policy: Option<Arc<PolicyFilter>>,
    /// The acge filter, with the settings (and constitution hash) it was loaded with.
    acge: Option<(serde_json::Value, Arc<AcgeFilter>)>,
    audit: Option<(Arc<AuditLog>, Arc<AuditFilter>)>,
}

impl Registry {
    /// Builds each filter that `used` says a route lists: loads the model, opens the
    /// audit log (creating its directory and key when absent).
    pub fn build(
        config: &FiltersConfig,
        constitution_hash: &str,
        used: impl Fn(&str) -> bool,
    ) -> Result<Self, BuildError> {
        Self::rebuild(config, constitution_hash, used, None)
    }

    /// Builds the filters of a reloaded config, keeping what `previous` built where it
    /// can: the acge filter (its engines, threads and score cache) when its settings
    /// and the constitution hash are unchanged, and the audit log always (one writer
    /// per log directory: the caller refuses a reload that changes `filters.audit`).
    pub fn rebuild(
        config: &FiltersConfig,
        constitution_hash: &str,
        used: impl Fn(&str) -> bool,
        previous: Option<&Registry>,
    ) -> Result<Self, BuildError> {
        let hash = if used("constitutional_hash") {
            let settings = config.constitutional_hash.clone().unwrap_or_default();
            Some(Arc::new(
                HashFilter::new(constitution_hash, &settings).map_err(|_| BuildError::Hash)?,
            ))
        } else {
            None
        };
        let jwt = match (&config.jwt, used("jwt")) {
            (Some(settings), true) => Some(JwtFilter::load(settings, constitution_hash)?),
            _ => None,
        };
        let policy = match (&config.policy, used("policy")) {
            (Some(settings), true) => Some(PolicyFilter::load(settings)?),
            _ => None,
        };
        let acge = match (&config.acge, used("acge")) {
            (Some(settings), true) => {
                let key = serde_json::json!({"settings": settings, "hash": constitution_hash});
                let kept = previous
                    .and_then(|p| p.acge.as_ref())
                    .filter(|(k, _)| *k == key)
                    .map(|(_, f)| f.clone());
                let filter = match kept {
                    Some(f) => f,
                    None => Arc::new(AcgeFilter::load(settings, constitution_hash)?),
                };
                Some((key, filter))
            }
            _ => None,
        };
        let audit = match (
            previous.and_then(|p| p.audit.clone()),
            &config.audit,
            used("audit"),
        ) {
            (Some(kept), _, _) => Some(kept),
            (None, Some(settings), true) => {
                let (log, report) = AuditLog::open(settings)?;
                tracing::info!(
                    dir = %settings.dir.display(),
                    records = report.records,
                    segments = report.segments,
                    cut = report.cut.as_deref().unwrap_or("nothing"),
                    "audit log open"
                );
                Some((log.clone(), Arc::new(AuditFilter::new(log))))
            }
            _ => None,
        };
        Ok(Self {
            hash,
            jwt,
            policy,
            acge,
            audit,
        })
    }

    /// The built-in filter `name`, bound to `route`; None for a name this registry did
    /// not build.
    pub fn for_route(&self, name: &str, route: &str) -> Option<Arc<dyn Filter>> {
        match name {
            "constitutional_hash" => self
                .hash
                .as_ref()
                .map(|f| Arc::new(f.for_route(route)) as Arc<dyn Filter>),
            "acge" => self
                .acge
                .as_ref()
                .map(|(_, f)| Arc::new(f.for_route(route)) as Arc<dyn Filter>),
            "audit" => self
                .audit
                .as_ref()
                .map(|(_, f)| f.clone() as Arc<dyn Filter>),
            "jwt" => self
                .jwt
                .as_ref()
                .map(|f| Arc::new(f.for_route(route)) as Arc<dyn Filter>),
            "policy" => self
                .policy
                .as_ref()
                .map(|f| Arc::new(f.for_route(route)) as Arc<dyn Filter>),
            _ => None,
        }
    }

    /// The audit log, when a route runs the audit filter.
    pub fn audit_log(&self) -> Option<Arc<AuditLog>> {
        self.audit.as_ref().map(|(log, _)| log.clone())
    }

    /// The acge filter's shared part, when a route runs it (for readiness).
    pub fn acge(&self) -> Option<Arc<AcgeFilter>> {
        self.acge.as_ref().map(|(_, f)| f.clone())
    }
}

/// Resolves paths in the settings against the directory of the config file.
pub fn resolve_paths(config: &mut FiltersConfig, base: &Path) {
    let resolve = |p: &mut std::path::PathBuf| {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    };
    if let Some(acge) = &mut config.acge {
        resolve(&mut acge.model);
        if let Some(second) = &mut acge.second {
            resolve(&mut second.model);
        }
    }
    if let Some(jwt) = &mut config.jwt {
        resolve(&mut jwt.jwks_file);
    }
    if let Some(policy) = &mut config.policy {
        resolve(&mut policy.dir);
    }
    if let Some(audit) = &mut config.audit {
        resolve(&mut audit.dir);
        if let Some(key) = &mut audit.key_file {
            resolve(key);
        }
    }
}
