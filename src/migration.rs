//! The migration controller: walks each route from blue to green through the
//! configured steps, judging green by its recent figures, and backs out on its own.
//!
//! Every `TICK`, for each route it runs:
//! - **rollback**, continuously: over the last `rollback_window_s`, once green has at
//!   least `rollback_min_requests` there, any gate breached (compliance below, p95
//!   above, error rate above, hash consistency below its threshold) sets green to 0 at
//!   once, and the route stays rolled back until an operator resumes it;
//! - **progress**: once a step has lasted `interval_s`, and the last interval holds at
//!   least `min_requests` green requests and every gate passes, the next step. Too few
//!   requests hold the step (the state says so).
//!
//! Step 0 (a weight of 0) is the shadow step: requests are mirrored to green
//! (`proxy/shadow.rs`) and green's shadow answers are what its gates read. Progress is
//! kept in `state_file` (write to a temporary file, fsync, rename), so a restarted proxy
//! resumes where it was. Each step, rollback and operator action goes to the audit log
//! when one is configured.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use acge_filters::audit::log::now_ms;
use acge_filters::audit::{AuditLog, AuditRecord};
use metrics::{counter, gauge, Gauge};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::config::{MigrationConfig, RollbackThresholds};
use crate::metrics::window::Figures;
use crate::metrics::{MIGRATION_ROLLBACKS_TOTAL, MIGRATION_STEP};
use crate::split::{Route, RouteTable, Version};

/// How often the controller looks at the windows.
pub const TICK: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Running,
    Paused,
    Complete,
    RolledBack,
}

/// What an operator asks of a route's controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Pause,
    Resume,
    Promote,
    Rollback,
}

impl Action {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pause" => Self::Pause,
            "resume" => Self::Resume,
            "promote" => Self::Promote,
            "rollback" => Self::Rollback,
            _ => return None,
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Pause => "pause",
            Self::Resume => "resume",
            Self::Promote => "promote",
            Self::Rollback => "rollback",
        }
    }
}

/// Why an operator action was refused.
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("no route named `{0}` is under migration")]
    UnknownRoute(String),
    #[error("{0}")]
    NotNow(String),
}

/// A gate's verdict over a window.
#[derive(Debug, Clone, Serialize)]
pub struct Gate {
    pub name: &'static str,
    /// None: not applicable (nothing measures it on this route) or nothing measured.
    pub value: Option<f64>,
    pub threshold: f64,
    /// `above` or `below`: the side of the threshold that breaches.
    pub breach_when: &'static str,
    pub passed: bool,
}

fn gates(f: &Figures, t: &RollbackThresholds) -> Vec<Gate> {
    let gate = |name, value: Option<f64>, threshold, above: bool| Gate {
        name,
        value,
        threshold,
        breach_when: if above { "above" } else { "below" },
        passed: value.is_none_or(|v| {
            if above {
                v <= threshold
            } else {
                v >= threshold
            }
        }),
    };
    vec![
        gate("compliance", f.compliance, t.compliance_below, false),
        gate("p95_ms", f.p95_ms, t.p95_above_ms, true),
        gate("error_rate", f.error_rate, t.error_rate_above, true),
        gate(
            "hash_consistency",
            f.hash_consistency,
            t.hash_consistency_below,
            false,
        ),
    ]
}

/// A rollback, as kept in the state and told to operators.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rollback {
    pub at_ms: u64,
    /// The gate that breached, or `operator`.
    pub reason: String,
    pub step: usize,
    pub weight: u8,
    #[serde(default)]
    pub figures: serde_json::Value,
}

/// One route's progress: what the state file keeps.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Saved {
    step: usize,
    state: State,
    since_ms: u64,
    #[serde(default)]
    last_rollback: Option<Rollback>,
    #[serde(default)]
    note: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StateFile {
    routes: std::collections::BTreeMap<String, Saved>,
}

struct Progress {
    saved: Saved,
    /// When the current step (or state) began, for the interval.
    since: Instant,
    /// Why the step is holding, when it is.
    holding: Option<String>,
}

pub struct RouteMigration {
    pub route: Arc<Route>,
    progress: Mutex<Progress>,
    step_gauge: Gauge,
}

impl RouteMigration {
    fn windows(&self) -> &crate::metrics::window::Windows {
        self.route
            .windows
            .as_ref()
            .expect("the route table gives every route the controller walks its windows")
    }
}

pub struct Controller {
    routes: Vec<RouteMigration>,
    config: MigrationConfig,
    audit: Option<Arc<AuditLog>>,
    /// Serialises state-file writes.
    save: Mutex<()>,
}

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("migration.state_file {path}: {reason}")]
    State { path: PathBuf, reason: String },
}

impl Controller {
    /// Sets up the controller for the routes `config` covers, resuming from the state
    /// file when there is one, and sets their weights accordingly.
    pub fn new(
        config: &MigrationConfig,
        routes: &RouteTable,
        audit: Option<Arc<AuditLog>>,
    ) -> Result<Self, MigrationError> {
        let saved = match &config.state_file {
            Some(path) => load(path)?,
            None => None,
        };
        let last = config.steps.len().saturating_sub(1);
        let routes = routes
            .iter()
            .filter(|r| config.covers(&r.name))
            .map(|route| {
                let mut s = saved
                    .as_ref()
                    .and_then(|f| f.routes.get(&*route.name).cloned())
                    .unwrap_or(Saved {
                        step: 0,
                        state: State::Running,
                        since_ms: now_ms(),
                        last_rollback: None,
                        note: None,
                    });
                if s.step > last {
                    tracing::warn!(route = %route.name, step = s.step, "the saved step is past the configured steps; resuming at the last");
                    s.step = last;
                }
                tracing::info!(route = %route.name, step = s.step, state = ?s.state, "migration controller resumes");
                RouteMigration {
                    route: route.clone(),
                    progress: Mutex::new(Progress {
                        saved: s,
                        since: Instant::now(),
                        holding: None,
                    }),
                    step_gauge: gauge!(MIGRATION_STEP, "route" => route.name.to_string()),
                }
            })
            .collect();
        let controller = Self {
            routes,
            config: config.clone(),
            audit,
            save: Mutex::new(()),
        };
        for r in &controller.routes {
            let p = r.progress.lock().unwrap_or_else(|e| e.into_inner());
            controller.apply(r, &p.saved);
        }
        Ok(controller)
    }

    /// Runs the controller until `stop` resolves.
    pub fn spawn(
        self: Arc<Self>,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    _ = &mut stop => break,
                    _ = tick.tick() => self.tick(),
                }
            }
        })
    }

    fn route(&self, name: &str) -> Option<&RouteMigration> {
        self.routes.iter().find(|r| &*r.route.name == name)
    }

    /// Whether the controller walks this route.
    pub fn covers(&self, name: &str) -> bool {
        self.route(name).is_some()
    }

    /// The weight and mirroring a saved progress means.
    fn apply(&self, r: &RouteMigration, s: &Saved) {
        let weight = match s.state {
            State::RolledBack => 0,
            _ => self.config.steps[s.step],
        };
        r.route.set_green_weight(weight);
        r.route
            .shadow
            .set_active(s.state == State::Running && weight == 0);
        r.step_gauge.set(s.step as f64);
    }

    fn tick(&self) {
        let mut changed = false;
        for r in &self.routes {
            changed |= self.judge(r);
        }
        if changed {
            self.persist();
        }
    }

    /// One look at one route; true when its progress changed.
    fn judge(&self, r: &RouteMigration) -> bool {
        let mut p = r.progress.lock().unwrap_or_else(|e| e.into_inner());
        if p.saved.state != State::Running {
            return false;
        }
        let recent = r.windows().figures(
            Version::Green,
            Duration::from_secs_f64(self.config.rollback_window_s),
            Some(p.since),
        );
        if recent.requests >= self.config.rollback_min_requests {
            if let Some(breach) = gates(&recent, &self.config.rollback)
                .into_iter()
                .find(|g| !g.passed)
            {
                let figures = json!({"green": recent, "gate": breach});
                self.roll_back(r, &mut p, breach.name, figures);
                return true;
            }
        }
        let interval = Duration::from_secs_f64(self.config.interval_s);
        if p.since.elapsed() < interval {
            return false;
        }
        let window = r.windows().figures(Version::Green, interval, Some(p.since));
        if window.requests < self.config.min_requests {
            p.holding = Some(format!(
                "thin traffic: {} green requests in the last interval, {} needed",
                window.requests, self.config.min_requests
            ));
            return false;
        }
        if let Some(failed) = gates(&window, &self.config.rollback)
            .into_iter()
            .find(|g| !g.passed)
        {
            // Short of a breach (too few requests for the rollback window), a failing
            // gate only holds the step.
            p.holding = Some(format!("gate {} does not pass", failed.name));
            return false;
        }
        let figures = json!({"green": window});
        self.advance(r, &mut p, "gates_passed", figures);
        true
    }

    fn advance(&self, r: &RouteMigration, p: &mut Progress, why: &str, figures: serde_json::Value) {
        let last = self.config.steps.len() - 1;
        if p.saved.step < last {
            p.saved.step += 1;
        }
        p.saved.state = if p.saved.step == last {
            State::Complete
        } else {
            State::Running
        };
        self.begin(p);
        self.apply(r, &p.saved);
        let weight = self.config.steps[p.saved.step];
        tracing::info!(route = %r.route.name, step = p.saved.step, weight, why, "migration step");
        self.audit(
            r,
            "step",
            json!({"why": why, "step": p.saved.step, "weight": weight, "figures": figures}),
        );
    }

    fn roll_back(
        &self,
        r: &RouteMigration,
        p: &mut Progress,
        reason: &str,
        figures: serde_json::Value,
    ) {
        let weight = r.route.splitter.green_weight();
        let rollback = Rollback {
            at_ms: now_ms(),
            reason: reason.to_string(),
            step: p.saved.step,
            weight,
            figures,
        };
        p.saved.state = State::RolledBack;
        p.saved.last_rollback = Some(rollback.clone());
        self.begin(p);
        self.apply(r, &p.saved);
        counter!(MIGRATION_ROLLBACKS_TOTAL, "route" => r.route.name.to_string(), "reason" => reason.to_string())
            .increment(1);
        tracing::warn!(route = %r.route.name, reason, step = rollback.step, weight, "migration rolled back");
        self.audit(
            r,
            "rollback",
            serde_json::to_value(&rollback).unwrap_or_default(),
        );
    }

    /// A new step or state starts now: its interval and its windows begin afresh.
    fn begin(&self, p: &mut Progress) {
        p.since = Instant::now();
        p.saved.since_ms = now_ms();
        p.holding = None;
    }

    /// An operator's action; returns the route's status after it.
    pub fn act(&self, name: &str, action: Action) -> Result<serde_json::Value, ActionError> {
        let r = self
            .route(name)
            .ok_or_else(|| ActionError::UnknownRoute(name.to_string()))?;
        {
            let mut p = r.progress.lock().unwrap_or_else(|e| e.into_inner());
            let state = p.saved.state;
            match (action, state) {
                (Action::Pause, State::Running) => {
                    p.saved.state = State::Paused;
                    p.saved.note = Some("paused by an operator".into());
                }
                (Action::Resume, State::Paused | State::RolledBack) => {
                    if state == State::RolledBack {
                        // Back to the first step: green earns its traffic again.
                        p.saved.step = 0;
                    }
                    p.saved.state = State::Running;
                    p.saved.note = None;
                    self.begin(&mut p);
                }
                (Action::Promote, State::Running | State::Paused) => {
                    p.saved.note = Some("promoted by an operator".into());
                    self.advance(r, &mut p, "operator", json!(null));
                    drop(p);
                    self.persist();
                    return Ok(self.describe(r));
                }
                (Action::Rollback, State::Running | State::Paused | State::Complete) => {
                    let figures = json!({"green": r.windows().figures(
                        Version::Green,
                        Duration::from_secs_f64(self.config.rollback_window_s),
                        None,
                    )});
                    self.roll_back(r, &mut p, "operator", figures);
                    drop(p);
                    self.persist();
                    return Ok(self.describe(r));
                }
                _ => {
                    return Err(ActionError::NotNow(format!(
                        "cannot {} route `{name}` while it is {}",
                        action.as_str(),
                        state_str(state)
                    )))
                }
            }
            self.apply(r, &p.saved);
        }
        self.audit(r, action.as_str(), json!({"by": "operator"}));
        self.persist();
        Ok(self.describe(r))
    }

    /// A manual weight change pauses the route's controller; returns what to tell the
    /// operator, or None when the controller does not walk this route.
    pub fn weight_set_by_operator(&self, name: &str, weight: u8) -> Option<String> {
        let r = self.route(name)?;
        let mut p = r.progress.lock().unwrap_or_else(|e| e.into_inner());
        let note = format!("weight set to {weight} by an operator; the controller is paused (POST /migration/{name}/resume hands it back)");
        if matches!(p.saved.state, State::Running | State::Complete) {
            p.saved.state = State::Paused;
        }
        r.route.shadow.set_active(false);
        p.saved.note = Some(note.clone());
        drop(p);
        self.audit(r, "manual_weight", json!({"weight": weight}));
        self.persist();
        Some(note)
    }

    /// Every route's step, weight, gates and state (`GET /migration`).
    pub fn status(&self) -> serde_json::Value {
        let routes: serde_json::Map<String, serde_json::Value> = self
            .routes
            .iter()
            .map(|r| (r.route.name.to_string(), self.describe(r)))
            .collect();
        json!({
            "steps": self.config.steps,
            "interval_s": self.config.interval_s,
            "min_requests": self.config.min_requests,
            "rollback_window_s": self.config.rollback_window_s,
            "routes": routes,
        })
    }

    fn describe(&self, r: &RouteMigration) -> serde_json::Value {
        let p = r.progress.lock().unwrap_or_else(|e| e.into_inner());
        let interval = Duration::from_secs_f64(self.config.interval_s);
        let green = r.windows().figures(Version::Green, interval, Some(p.since));
        let blue = r.windows().figures(Version::Blue, interval, Some(p.since));
        json!({
            "state": p.saved.state,
            "step": p.saved.step,
            "weight": r.route.splitter.green_weight(),
            "shadow": r.route.shadow.is_active(),
            "time_in_step_s": (p.since.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            "holding": p.holding,
            "note": p.saved.note,
            "gates": gates(&green, &self.config.rollback),
            "green": green,
            "blue": blue,
            "last_rollback": p.saved.last_rollback,
        })
    }

    fn audit(&self, r: &RouteMigration, action: &str, detail: serde_json::Value) {
        let Some(log) = &self.audit else { return };
        let record = AuditRecord {
            seq: 0,
            request_id: format!("migration-{}", uuid::Uuid::new_v4()),
            time_ms: now_ms(),
            route: r.route.name.to_string(),
            version: None,
            method: "MIGRATION".into(),
            path: format!("/migration/{}/{action}", r.route.name),
            status: 0,
            hash_request: None,
            hash_response: None,
            compliance: None,
            principles: vec![],
            decision: action.to_string(),
            latency_ms: 0.0,
            event: Some(json!({
                "action": action,
                "weight": r.route.splitter.green_weight(),
                "detail": detail,
            })),
        };
        log.append_detached(record);
    }

    fn persist(&self) {
        let Some(path) = &self.config.state_file else {
            return;
        };
        let _guard = self.save.lock().unwrap_or_else(|e| e.into_inner());
        let routes = self
            .routes
            .iter()
            .map(|r| {
                let p = r.progress.lock().unwrap_or_else(|e| e.into_inner());
                (r.route.name.to_string(), p.saved.clone())
            })
            .collect();
        if let Err(e) = save(path, &StateFile { routes }) {
            tracing::error!(path = %path.display(), error = %e, "cannot save the migration state");
        }
    }
}

fn state_str(s: State) -> &'static str {
    match s {
        State::Running => "running",
        State::Paused => "paused",
        State::Complete => "complete",
        State::RolledBack => "rolled back",
    }
}

fn load(path: &Path) -> Result<Option<StateFile>, MigrationError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| MigrationError::State {
                path: path.to_path_buf(),
                reason: format!("not a migration state ({e}); move it away to start afresh"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(MigrationError::State {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// Write to a temporary file beside it, fsync, rename over, fsync the directory: the
/// file is the old state or the new one, never a mix.
fn save(path: &Path, state: &StateFile) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

/// `GET /migration`'s answer as a table for people (`acge-proxy migration status`).
pub fn render_status(status: &serde_json::Value) -> String {
    use std::fmt::Write;
    let fmt_gate = |g: &serde_json::Value| {
        let name = g["name"].as_str().unwrap_or("?");
        let mark = if g["passed"].as_bool() == Some(true) {
            "ok"
        } else {
            "BREACH"
        };
        let limit = if g["breach_when"] == "above" {
            "≤"
        } else {
            "≥"
        };
        match g["value"].as_f64() {
            Some(v) => format!("{name} {v:.3} ({limit} {}) {mark}", g["threshold"]),
            None => format!("{name} n/a"),
        }
    };
    let mut out = String::new();
    let steps = status["steps"].to_string();
    let _ = writeln!(
        out,
        "steps {steps}, interval {} s, min {} green requests\n",
        status["interval_s"], status["min_requests"]
    );
    if let Some(routes) = status["routes"].as_object() {
        for (name, r) in routes {
            let _ = writeln!(
                out,
                "{name:<10} {:<12} step {} (green {:>3}%{}), {} s in step, green {} / blue {} requests",
                r["state"].as_str().unwrap_or("?"),
                r["step"],
                r["weight"],
                if r["shadow"].as_bool() == Some(true) { ", shadow" } else { "" },
                r["time_in_step_s"],
                r["green"]["requests"],
                r["blue"]["requests"],
            );
            let gates: Vec<String> = r["gates"]
                .as_array()
                .into_iter()
                .flatten()
                .map(fmt_gate)
                .collect();
            let _ = writeln!(out, "           {}", gates.join(" · "));
            for key in ["holding", "note"] {
                if let Some(text) = r[key].as_str() {
                    let _ = writeln!(out, "           {key}: {text}");
                }
            }
            if let Some(rb) = r["last_rollback"].as_object() {
                let _ = writeln!(
                    out,
                    "           last rollback: {} at step {} (green {}%)",
                    rb["reason"], rb["step"], rb["weight"]
                );
            }
        }
    }
    out
}
