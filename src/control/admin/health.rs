//! `GET /`, `GET /live` and `GET /ready`.
//!
//! Ready means: the listeners serve, every model the config needs is loaded (the start
//! loads them before it binds) or, for a remote one, its inference server answers
//! `ServerReady` and `ModelReady` and its circuit is not open (unless a local fallback
//! decides meanwhile), and every cluster that a route now sends traffic to
//! (blue below 100 % green, green above 0 %) has accepted a connection once. Each
//! cluster's latch drops for good the first time it does; a later outage is the
//! upstream's to report (502/503), not a reason to pull the sidecar from its Service.
//! A config reload that adds a cluster, or changes one, gives it a new latch and probe.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::extract::State;
use axum::response::Response;
use http::StatusCode;
use serde_json::json;

use super::{reply, Admin};
use crate::proxy::split::Version;
use crate::proxy::upstream::Cluster;

/// What readiness waits for.
pub struct Readiness {
    serving: AtomicBool,
    /// Shutting down: `/ready` says so, whatever else holds.
    draining: AtomicBool,
    /// Per cluster name: reached once. Read by `/ready` only, never by a request.
    reached: Mutex<HashMap<String, Arc<AtomicBool>>>,
}

impl Readiness {
    pub fn new() -> Self {
        Self {
            serving: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            reached: Mutex::new(HashMap::new()),
        }
    }

    /// The listeners are bound and serving.
    pub fn set_serving(&self) {
        self.serving.store(true, Ordering::Release);
    }

    /// Shutdown has begun: not ready from now on.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Whether shutdown has begun.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Waits for a first connection to each of `clusters` (new ones, or ones a reload
    /// rebuilt): each gets a fresh latch, and a task that probes it every 250 ms until
    /// it answers, or until the cluster is dropped (a later reload replaced it).
    /// A cluster with no endpoints counts as reached (every request to it is a 503).
    pub fn track(self: &Arc<Self>, clusters: &HashMap<String, Arc<Cluster>>) {
        let mut reached = self.reached.lock().unwrap_or_else(|e| e.into_inner());
        for (name, cluster) in clusters {
            let latch = Arc::new(AtomicBool::new(cluster.is_empty()));
            reached.insert(name.clone(), latch.clone());
            if !cluster.is_empty() {
                tokio::spawn(probe(name.clone(), Arc::downgrade(cluster), latch));
            }
        }
    }

    /// Forgets clusters the config no longer has.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.reached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|name, _| keep(name));
    }

    fn reached(&self, cluster: &str) -> bool {
        self.reached
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(cluster)
            .is_none_or(|latch| latch.load(Ordering::Acquire))
    }
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

async fn probe(name: String, cluster: Weak<Cluster>, latch: Arc<AtomicBool>) {
    loop {
        let Some(cluster) = cluster.upgrade() else {
            return;
        };
        if cluster.reachable().await {
            latch.store(true, Ordering::Release);
            tracing::info!(cluster = %name, "cluster reachable");
            return;
        }
        drop(cluster);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn index() -> Response {
    reply::ok(json!({
        "endpoints": [
            "GET /live", "GET /ready", "GET /metrics", "GET /weights",
            "PUT /routes/{name}/weights", "GET /config_dump", "GET /migration",
            "POST /migration/{route}/{pause,resume,promote,rollback}",
            "GET /audit/checkpoint", "POST /reload"
        ]
    }))
}

pub async fn live() -> Response {
    reply::ok(json!({"status": "live"}))
}

pub async fn ready(State(admin): State<Arc<Admin>>) -> Response {
    let readiness = &admin.readiness;
    if readiness.is_draining() {
        return reply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "the proxy is shutting down: it still serves, but takes no new traffic soon",
        );
    }
    if !readiness.serving.load(Ordering::Acquire) {
        return reply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the proxy listener is not serving yet",
        );
    }
    let routes = admin.routes.load();
    let mut waiting = Vec::new();
    for route in routes.iter() {
        let green = route.splitter.green_weight();
        for (version, takes_traffic) in [(Version::Blue, green < 100), (Version::Green, green > 0)]
        {
            let cluster = &route.cluster(version).name;
            if takes_traffic && !readiness.reached(cluster) && !waiting.contains(cluster) {
                waiting.push(cluster.clone());
            }
        }
    }
    if let Some(why) = admin
        .reloader
        .current()
        .registry
        .acge()
        .and_then(|acge| acge.waiting_for())
    {
        return reply::error(StatusCode::SERVICE_UNAVAILABLE, "not_ready", why);
    }
    if waiting.is_empty() {
        reply::ok(json!({"status": "ready"}))
    } else {
        reply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!(
                "waiting for a first connection to cluster(s) {}",
                waiting.join(", ")
            ),
        )
    }
}
