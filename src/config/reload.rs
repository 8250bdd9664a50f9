//! Config reload: read the file again, validate it whole, build the new clusters,
//! filter chains and route table, and swap them in at once.
//!
//! Three triggers lead here: `POST /reload` on the admin API, `SIGHUP`, and a change
//! in the file's directory ([`super::watch`]). Reloads run one at a time. The file's
//! SHA-256 is compared first: an unchanged file is not parsed again. A file that fails
//! validation, or whose models cannot be loaded, is refused whole and the running
//! config keeps serving; the reply and the log carry every error with its field path
//! and line.
//!
//! What survives a reload (docs/operations.md has the table):
//! - a route that keeps its name keeps its weight (set at runtime or by the migration
//!   controller), its windows and its shadow; an edited `green_weight` in the file
//!   applies, except on a route the controller walks;
//! - the migration controller's progress; a route the reload adds starts at the first
//!   step, a route it removes is let go;
//! - a cluster whose settings did not change is the same cluster: its pooled upstream
//!   connections stay open. A changed one is built anew (and probed for readiness);
//!   the old one's connections close once the requests on them are done;
//! - the acge filter (engines, threads, score cache) when `filters.acge` and the
//!   constitution hash did not change; the audit log always.
//!
//! What a reload refuses, because it is bound once at start: a change to `listener`
//! (its sockets; its certificate files reload by themselves), `admin`, `migration`,
//! or `filters.audit` once the log is open (one writer per log directory). Requests in
//! flight finish on the table they started on.

use std::collections::HashMap;
use std::sync::Arc;

use acge_filters::registry::{BuildError, Registry};
use acge_filters::{Chain, Filter};
use arc_swap::ArcSwap;
use http::StatusCode;
use metrics::{counter, gauge};
use serde::Serialize;
use serde_json::json;

use super::{Config, ConfigError, ConfigErrors, RouteConfig, ValidConfig};
use crate::control::admin::Readiness;
use crate::control::migration::{Controller, Shadow};
use crate::proxy::route::{Mirror, Parts, RouteTable};
use crate::proxy::upstream::Cluster;
use crate::telemetry::{CONFIG_GENERATION, CONFIG_LAST_RELOAD_SUCCESSFUL, CONFIG_RELOADS_TOTAL};

/// What set a reload off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// `POST /reload`.
    Admin,
    /// `SIGHUP`.
    Signal,
    /// A change in the config file's directory.
    Watch,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::Signal => "signal",
            Self::Watch => "watch",
        }
    }
}

/// One loaded config and what was built from it, beside its route table.
pub struct Generation {
    /// 1 at start, one more for each reload that loaded.
    pub number: u64,
    pub sha256: String,
    pub config: Arc<ValidConfig>,
    pub registry: Arc<Registry>,
    pub clusters: HashMap<String, Arc<Cluster>>,
    /// The migration's mirror of each route it walks, by route name.
    pub shadows: HashMap<String, Arc<Shadow>>,
}

/// Why a config's parts could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error(transparent)]
    Filters(#[from] BuildError),
    #[error("routes: the filter `{0}` is named as a custom filter but StartOptions has none by that name")]
    MissingFilter(String),
    #[error("clusters.{name}.tls: {reason}")]
    Cluster { name: String, reason: String },
}

/// Builds the clusters, filters and route table of `config`. On a reload `previous`
/// is the running generation and its table: what did not change is carried over (see
/// the module's list). Loads models: call it off the runtime's workers.
pub fn assemble(
    config: Arc<ValidConfig>,
    custom: &[(String, Arc<dyn Filter>)],
    previous: Option<(&Generation, &RouteTable)>,
) -> Result<(Generation, RouteTable), AssembleError> {
    for route in &config.routes {
        for name in &route.filters {
            if config.is_custom_filter(name) && !custom.iter().any(|(n, _)| n == name) {
                return Err(AssembleError::MissingFilter(name.clone()));
            }
        }
    }
    let clusters: HashMap<String, Arc<Cluster>> = config
        .clusters
        .iter()
        .map(|(name, c)| {
            let kept = previous.and_then(|(g, _)| {
                let old = g.config.clusters.get(name)?;
                (same(old, c)).then(|| g.clusters.get(name).cloned())?
            });
            let cluster = match kept {
                Some(cluster) => cluster,
                None => Arc::new(Cluster::new(name, c).map_err(|e| AssembleError::Cluster {
                    name: name.clone(),
                    reason: e.to_string(),
                })?),
            };
            Ok((name.clone(), cluster))
        })
        .collect::<Result<_, AssembleError>>()?;
    let registry = Arc::new(Registry::rebuild(
        &config.filters,
        &config.constitution.hash,
        |name| config.uses_filter(name),
        previous.map(|(g, _)| &*g.registry),
    )?);
    let shadows: HashMap<String, Arc<Shadow>> = match &config.migration {
        Some(m) => config
            .routes
            .iter()
            .filter(|r| m.covers(&r.name))
            .map(|r| {
                let shadow = previous
                    .and_then(|(g, _)| g.shadows.get(&r.name).cloned())
                    .unwrap_or_else(|| Arc::new(Shadow::new(&r.name, &m.shadow)));
                (r.name.clone(), shadow)
            })
            .collect(),
        None => HashMap::new(),
    };
    let chain_of = |route: &RouteConfig| {
        Chain::new(
            route
                .filters
                .iter()
                .filter_map(|name| {
                    custom
                        .iter()
                        .find(|(n, _)| n == name)
                        .map(|(_, f)| f.clone())
                        .or_else(|| registry.for_route(name, &route.name))
                })
                .collect(),
        )
    };
    let mirror_of = |route: &RouteConfig| {
        shadows
            .get(&route.name)
            .map(|s| s.clone() as Arc<dyn Mirror>)
    };
    let table = RouteTable::build(
        &config,
        Parts {
            clusters: &clusters,
            chain_of: &chain_of,
            mirror_of: &mirror_of,
            previous: previous.map(|(g, table)| (table, &*g.config)),
        },
    );
    let generation = Generation {
        number: previous.map_or(1, |(g, _)| g.number + 1),
        sha256: config.sha256(),
        config,
        registry,
        clusters,
        shadows,
    };
    Ok((generation, table))
}

/// Whether two config parts are the same settings.
fn same<T: Serialize>(a: &T, b: &T) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

/// Names added, changed and removed between two configs' maps of one kind.
#[derive(Debug, Default, Serialize)]
pub struct Changes {
    pub added: Vec<String>,
    pub changed: Vec<String>,
    pub removed: Vec<String>,
}

impl Changes {
    fn between<'a, T: Serialize + 'a>(
        old: impl Iterator<Item = (&'a str, &'a T)> + Clone,
        new: impl Iterator<Item = (&'a str, &'a T)> + Clone,
    ) -> Self {
        let mut c = Changes::default();
        for (name, n) in new.clone() {
            match old.clone().find(|(o, _)| *o == name) {
                None => c.added.push(name.to_string()),
                Some((_, o)) if !same(o, n) => c.changed.push(name.to_string()),
                Some(_) => {}
            }
        }
        for (name, _) in old {
            if !new.clone().any(|(n, _)| n == name) {
                c.removed.push(name.to_string());
            }
        }
        c
    }
}

/// What one reload did.
#[derive(Debug)]
pub enum Outcome {
    /// The new config serves.
    Loaded {
        generation: u64,
        sha256: String,
        routes: Changes,
        clusters: Changes,
        /// Built-in filters loaded anew (the others were kept).
        rebuilt: Vec<&'static str>,
    },
    /// The file holds what is already serving.
    Unchanged { generation: u64, sha256: String },
    /// The file was refused; the running config keeps serving.
    Refused {
        generation: u64,
        errors: ConfigErrors,
    },
    /// The config did not come from a file (the demo's is embedded).
    NoFile,
}

impl Outcome {
    pub fn result(&self) -> &'static str {
        match self {
            Self::Loaded { .. } => "loaded",
            Self::Unchanged { .. } => "unchanged",
            Self::Refused { .. } => "refused",
            Self::NoFile => "no_file",
        }
    }

    /// The admin API's status for it.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Loaded { .. } | Self::Unchanged { .. } => StatusCode::OK,
            Self::Refused { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::NoFile => StatusCode::CONFLICT,
        }
    }

    /// The admin API's body for it (errors in the API's `{error, detail}` shape).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Self::Loaded {
                generation,
                sha256,
                routes,
                clusters,
                rebuilt,
            } => json!({
                "result": "loaded",
                "generation": generation,
                "sha256": sha256,
                "routes": routes,
                "clusters": clusters,
                "filters_rebuilt": rebuilt,
            }),
            Self::Unchanged { generation, sha256 } => json!({
                "result": "unchanged",
                "generation": generation,
                "sha256": sha256,
            }),
            Self::Refused { generation, errors } => json!({
                "error": "config_refused",
                "detail": format!(
                    "{} refused; generation {generation} keeps serving", errors.origin
                ),
                "generation": generation,
                "errors": errors.errors.iter().map(|e| json!({
                    "path": e.path,
                    "line": e.line,
                    "message": e.message,
                    "text": e.to_string(),
                })).collect::<Vec<_>>(),
            }),
            Self::NoFile => json!({
                "error": "no_config_file",
                "detail": "this proxy's config did not come from a file (the demo's is embedded); start it with `run --config FILE` to reload",
            }),
        }
    }
}

/// Holds the running generation and swaps in new ones.
pub struct Reloader {
    current: ArcSwap<Generation>,
    routes: Arc<ArcSwap<RouteTable>>,
    readiness: Arc<Readiness>,
    migration: Option<Arc<Controller>>,
    custom: Vec<(String, Arc<dyn Filter>)>,
    /// Reloads run one at a time.
    one_at_a_time: tokio::sync::Mutex<()>,
}

impl Reloader {
    pub fn new(
        first: Generation,
        routes: Arc<ArcSwap<RouteTable>>,
        readiness: Arc<Readiness>,
        migration: Option<Arc<Controller>>,
        custom: Vec<(String, Arc<dyn Filter>)>,
    ) -> Self {
        gauge!(CONFIG_GENERATION).set(first.number as f64);
        gauge!(CONFIG_LAST_RELOAD_SUCCESSFUL).set(1.0);
        Self {
            current: ArcSwap::from_pointee(first),
            routes,
            readiness,
            migration,
            custom,
            one_at_a_time: tokio::sync::Mutex::new(()),
        }
    }

    /// The generation serving now.
    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// Reads the config file again and, when it changed and is valid, swaps it in.
    pub async fn reload(&self, trigger: Trigger) -> Outcome {
        let _one = self.one_at_a_time.lock().await;
        let outcome = self.reload_now().await;
        counter!(CONFIG_RELOADS_TOTAL, "result" => outcome.result(), "trigger" => trigger.as_str())
            .increment(1);
        match outcome {
            Outcome::Loaded { .. } | Outcome::Unchanged { .. } => {
                gauge!(CONFIG_LAST_RELOAD_SUCCESSFUL).set(1.0)
            }
            Outcome::Refused { .. } => gauge!(CONFIG_LAST_RELOAD_SUCCESSFUL).set(0.0),
            Outcome::NoFile => {}
        }
        match &outcome {
            Outcome::Loaded {
                generation,
                sha256,
                routes,
                clusters,
                rebuilt,
            } => tracing::info!(
                trigger = trigger.as_str(),
                generation,
                sha256 = %sha256,
                routes = %json!(routes),
                clusters = %json!(clusters),
                filters_rebuilt = ?rebuilt,
                "config reloaded"
            ),
            Outcome::Unchanged { .. } => {
                tracing::debug!(trigger = trigger.as_str(), "config file unchanged")
            }
            Outcome::Refused { generation, errors } => {
                for e in &errors.errors {
                    tracing::warn!(trigger = trigger.as_str(), file = %errors.origin, "{e}");
                }
                tracing::warn!(
                    trigger = trigger.as_str(),
                    generation,
                    "config refused; the running one keeps serving"
                );
            }
            Outcome::NoFile => {}
        }
        outcome
    }

    async fn reload_now(&self) -> Outcome {
        let running = self.current();
        let Some(path) = running.config.source().map(|p| p.to_path_buf()) else {
            return Outcome::NoFile;
        };
        let refuse = |errors: Vec<ConfigError>| Outcome::Refused {
            generation: running.number,
            errors: ConfigErrors {
                origin: path.display().to_string(),
                errors,
            },
        };
        let bytes = match tokio::fs::read(&path).await {
            Ok(bytes) => bytes,
            Err(e) => {
                return refuse(vec![ConfigError {
                    path: String::new(),
                    line: None,
                    message: format!("cannot read the file: {e}"),
                }])
            }
        };
        if super::sha256_hex(&bytes) == running.sha256 {
            return Outcome::Unchanged {
                generation: running.number,
                sha256: running.sha256.clone(),
            };
        }
        let config = match Config::load_bytes(&path, &bytes, &running.config.custom_filters()) {
            Ok(config) => Arc::new(config),
            Err(errors) => return refuse(errors.errors),
        };
        let fixed = fixed_sections(&running, &config);
        if !fixed.is_empty() {
            return refuse(fixed);
        }
        let table = self.routes.load_full();
        let built = tokio::task::spawn_blocking({
            let (config, custom, running) = (config.clone(), self.custom.clone(), running.clone());
            move || assemble(config, &custom, Some((&running, &table)))
        })
        .await;
        let (generation, table) = match built {
            Ok(Ok(built)) => built,
            Ok(Err(e)) => return refuse(vec![assemble_error(&config, e)]),
            Err(e) => {
                return refuse(vec![ConfigError {
                    path: String::new(),
                    line: None,
                    message: format!("building the new config failed: {e}"),
                }])
            }
        };
        let outcome = Outcome::Loaded {
            generation: generation.number,
            sha256: generation.sha256.clone(),
            routes: Changes::between(
                running.config.routes.iter().map(|r| (r.name.as_str(), r)),
                config.routes.iter().map(|r| (r.name.as_str(), r)),
            ),
            clusters: Changes::between(
                running.config.clusters.iter().map(|(n, c)| (n.as_str(), c)),
                config.clusters.iter().map(|(n, c)| (n.as_str(), c)),
            ),
            rebuilt: rebuilt(&running.registry, &generation.registry),
        };
        self.swap(generation, table);
        outcome
    }

    /// Puts the new table and generation in place: from here on every new request
    /// takes the new routes; those in flight finish on the ones they hold.
    fn swap(&self, generation: Generation, table: RouteTable) {
        let table = Arc::new(table);
        let running = self.current();
        let fresh: HashMap<String, Arc<Cluster>> = generation
            .clusters
            .iter()
            .filter(|(name, c)| {
                running
                    .clusters
                    .get(*name)
                    .is_none_or(|old| !Arc::ptr_eq(old, c))
            })
            .map(|(n, c)| (n.clone(), c.clone()))
            .collect();
        self.routes.store(table.clone());
        self.readiness.track(&fresh);
        self.readiness
            .retain(|name| generation.clusters.contains_key(name));
        if let Some(controller) = &self.migration {
            controller.sync(&table, &generation.shadows);
        }
        gauge!(CONFIG_GENERATION).set(generation.number as f64);
        self.current.store(Arc::new(generation));
    }
}

/// The sections a reload cannot change, each as an error naming it and its line.
fn fixed_sections(running: &Generation, new: &ValidConfig) -> Vec<ConfigError> {
    let old = &running.config;
    let mut errors = Vec::new();
    let mut check = |path: &str, changed: bool, why: &str| {
        if changed {
            errors.push(ConfigError {
                path: path.to_string(),
                line: new.line_of(path),
                message: format!("changed, and {why}; restart the proxy to apply it (the running config keeps serving)"),
            });
        }
    };
    check(
        "listener",
        !same(&old.listener, &new.listener),
        "the listener is bound once (its certificate files reload by themselves)",
    );
    check(
        "admin",
        !same(&old.admin, &new.admin),
        "the admin listener is bound once",
    );
    check(
        "migration",
        !same(&old.migration, &new.migration),
        "the migration controller is set up once",
    );
    check(
        "filters.audit",
        running.registry.audit_log().is_some() && !same(&old.filters.audit, &new.filters.audit),
        "the audit log is open (one writer per log directory)",
    );
    errors
}

fn assemble_error(config: &ValidConfig, e: AssembleError) -> ConfigError {
    let (path, message) = match &e {
        AssembleError::Filters(BuildError::Hash) => {
            ("constitution.hash".to_string(), e.to_string())
        }
        AssembleError::Filters(BuildError::Acge(inner)) => {
            ("filters.acge".to_string(), inner.to_string())
        }
        AssembleError::Filters(BuildError::Audit(inner)) => {
            ("filters.audit".to_string(), inner.to_string())
        }
        AssembleError::Filters(BuildError::Jwt(inner)) => {
            ("filters.jwt".to_string(), inner.to_string())
        }
        AssembleError::Filters(BuildError::Policy(inner)) => {
            ("filters.policy".to_string(), inner.to_string())
        }
        AssembleError::MissingFilter(_) => ("routes".to_string(), e.to_string()),
        AssembleError::Cluster { name, reason } => (format!("clusters.{name}.tls"), reason.clone()),
    };
    ConfigError {
        line: config.line_of(&path),
        path,
        message,
    }
}

/// Built-in filters whose shared part the new registry loaded anew.
fn rebuilt(old: &Registry, new: &Registry) -> Vec<&'static str> {
    let mut names = Vec::new();
    match (old.acge(), new.acge()) {
        (Some(a), Some(b)) if Arc::ptr_eq(&a, &b) => {}
        (_, Some(_)) => names.push("acge"),
        _ => {}
    }
    if old.audit_log().is_none() && new.audit_log().is_some() {
        names.push("audit");
    }
    names
}
