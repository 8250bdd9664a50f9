//! The controller: one loop over every route it walks, the operator's actions, and
//! the status the admin API serves.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use acge_filters::audit::log::now_ms;
use acge_filters::audit::{AuditLog, AuditRecord};
use acge_filters::Version;
use arc_swap::ArcSwap;
use metrics::{counter, gauge, Gauge};
use serde_json::json;

use super::gates;
use super::shadow::Shadow;
use super::state::{self, MigrationError, Saved, StateFile, StateWriter};
use super::{state_str, Action, ActionError, Rollback, State, TICK};
use crate::config::MigrationConfig;
use crate::proxy::route::{Route, RouteTable};
use crate::telemetry::window::Windows;
use crate::telemetry::{MIGRATION_ROLLBACKS_TOTAL, MIGRATION_STEP};

struct Progress {
    saved: Saved,
    /// When the current step (or state) began, for the interval.
    since: Instant,
    /// Why the step is holding, when it is.
    holding: Option<String>,
}

struct RouteMigration {
    /// The route in the table now serving; a config reload replaces it with the new
    /// table's route of the same name, which carries the weight and the windows.
    route: ArcSwap<Route>,
    shadow: Arc<Shadow>,
    progress: Mutex<Progress>,
    step_gauge: Gauge,
}

impl RouteMigration {
    fn new(
        route: &Arc<Route>,
        shadows: &HashMap<String, Arc<Shadow>>,
        config: &MigrationConfig,
        saved: Saved,
    ) -> Self {
        Self {
            route: ArcSwap::new(route.clone()),
            shadow: shadows
                .get(&*route.name)
                .cloned()
                .unwrap_or_else(|| Arc::new(Shadow::new(&route.name, &config.shadow))),
            progress: Mutex::new(Progress {
                saved,
                since: Instant::now(),
                holding: None,
            }),
            step_gauge: gauge!(MIGRATION_STEP, "route" => route.name.to_string()),
        }
    }

    fn windows(&self) -> Arc<Windows> {
        self.route
            .load()
            .windows
            .clone()
            .expect("the route table gives every route the controller walks its windows")
    }

    fn name(&self) -> Arc<str> {
        self.route.load().name.clone()
    }
}

pub struct Controller {
    /// Replaced whole by [`Controller::sync`] after a config reload.
    routes: ArcSwap<Vec<Arc<RouteMigration>>>,
    config: MigrationConfig,
    audit: Option<Arc<AuditLog>>,
    writer: Option<StateWriter>,
}

impl Controller {
    /// Sets up the controller for the routes `config` covers, resuming from the state
    /// file when there is one, and sets their weights accordingly.
    /// `shadows` are the mirrors the route table was built with, by route name.
    pub fn new(
        config: &MigrationConfig,
        routes: &RouteTable,
        shadows: &HashMap<String, Arc<Shadow>>,
        audit: Option<Arc<AuditLog>>,
    ) -> Result<Self, MigrationError> {
        let saved = match &config.state_file {
            Some(path) => state::load(path)?,
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
                    .unwrap_or_else(Saved::first_step);
                if s.step > last {
                    tracing::warn!(route = %route.name, step = s.step, "the saved step is past the configured steps; resuming at the last");
                    s.step = last;
                }
                tracing::info!(route = %route.name, step = s.step, state = ?s.state, "migration controller resumes");
                Arc::new(RouteMigration::new(route, shadows, config, s))
            })
            .collect();
        let writer = match &config.state_file {
            Some(path) => Some(StateWriter::spawn(path.clone())?),
            None => None,
        };
        let controller = Self {
            routes: ArcSwap::from_pointee(routes),
            config: config.clone(),
            audit,
            writer,
        };
        for r in controller.routes.load().iter() {
            let p = r.progress.lock().unwrap_or_else(|e| e.into_inner());
            controller.apply(r, &p.saved);
        }
        Ok(controller)
    }

    /// After a config reload, walks the routes of the new `table` that it covers. A
    /// route it already walked keeps its progress (the new table's route carries its
    /// weight and windows); a route new to the config starts at the first step; a route
    /// the config no longer has is dropped, and the state file follows.
    pub fn sync(&self, table: &RouteTable, shadows: &HashMap<String, Arc<Shadow>>) {
        let current = self.routes.load_full();
        let next: Vec<Arc<RouteMigration>> = table
            .iter()
            .filter(|r| self.config.covers(&r.name))
            .map(|route| match current.iter().find(|m| m.name() == route.name) {
                Some(m) => {
                    m.route.store(route.clone());
                    m.clone()
                }
                None => {
                    tracing::info!(route = %route.name, "migration controller walks a route the reload added");
                    let m = Arc::new(RouteMigration::new(
                        route,
                        shadows,
                        &self.config,
                        Saved::first_step(),
                    ));
                    let p = m.progress.lock().unwrap_or_else(|e| e.into_inner());
                    self.apply(&m, &p.saved);
                    drop(p);
                    m
                }
            })
            .collect();
        for gone in current
            .iter()
            .filter(|m| !next.iter().any(|n| Arc::ptr_eq(n, m)))
        {
            tracing::info!(route = %gone.name(), "migration controller lets go of a route the reload removed");
        }
        self.routes.store(Arc::new(next));
        self.persist();
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

    fn route(&self, name: &str) -> Option<Arc<RouteMigration>> {
        self.routes
            .load()
            .iter()
            .find(|r| &*r.name() == name)
            .cloned()
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
        r.route.load().set_green_weight(weight);
        r.shadow
            .set_active(s.state == State::Running && weight == 0);
        r.step_gauge.set(s.step as f64);
    }

    fn tick(&self) {
        let mut changed = false;
        for r in self.routes.load().iter() {
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
            if let Some(breach) = gates::first_breach(&recent, &self.config.rollback) {
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
        if let Some(failed) = gates::first_breach(&window, &self.config.rollback) {
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
        tracing::info!(route = %r.name(), step = p.saved.step, weight, why, "migration step");
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
        let weight = r.route.load().splitter.green_weight();
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
        counter!(MIGRATION_ROLLBACKS_TOTAL, "route" => r.name().to_string(), "reason" => reason.to_string())
            .increment(1);
        tracing::warn!(route = %r.name(), reason, step = rollback.step, weight, "migration rolled back");
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
        let r = &*r;
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
        let r = &*r;
        let mut p = r.progress.lock().unwrap_or_else(|e| e.into_inner());
        let note = format!("weight set to {weight} by an operator; the controller is paused (POST /migration/{name}/resume hands it back)");
        if matches!(p.saved.state, State::Running | State::Complete) {
            p.saved.state = State::Paused;
        }
        r.shadow.set_active(false);
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
            .load()
            .iter()
            .map(|r| (r.name().to_string(), self.describe(r)))
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
            "weight": r.route.load().splitter.green_weight(),
            "shadow": r.shadow.is_active(),
            "time_in_step_s": (p.since.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            "holding": p.holding,
            "note": p.saved.note,
            "gates": gates::judge(&green, &self.config.rollback),
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
            route: r.name().to_string(),
            version: None,
            method: "MIGRATION".into(),
            path: format!("/migration/{}/{action}", r.name()),
            status: 0,
            hash_request: None,
            hash_response: None,
            compliance: None,
            principles: vec![],
            acge_stage: None,
            decision: action.to_string(),
            latency_ms: 0.0,
            event: Some(json!({
                "action": action,
                "weight": r.route.load().splitter.green_weight(),
                "detail": detail,
            })),
            jwt: None,
        };
        log.append_detached(record);
    }

    /// Hands the state to the writer thread; returns at once.
    fn persist(&self) {
        let Some(writer) = &self.writer else {
            return;
        };
        let routes = self
            .routes
            .load()
            .iter()
            .map(|r| {
                let p = r.progress.lock().unwrap_or_else(|e| e.into_inner());
                (r.name().to_string(), p.saved.clone())
            })
            .collect();
        writer.save(StateFile { routes });
    }

    /// Waits until the state file holds the latest state (at shutdown).
    pub async fn flush(&self) {
        if let Some(writer) = &self.writer {
            writer.flush().await;
        }
    }
}
