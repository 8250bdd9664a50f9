//! `GET /`, `GET /live` and `GET /ready`.
//!
//! Ready means: the listeners serve, every model the config needs is loaded (the start
//! loads them before it binds), and every cluster that a route now sends traffic to
//! (blue below 100 % green, green above 0 %) has accepted a connection once. Each
//! cluster's latch drops for good the first time it does; a later outage is the
//! upstream's to report (502/503), not a reason to pull the sidecar from its Service.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
    /// Per cluster name: reached once.
    reached: HashMap<String, AtomicBool>,
}

impl Readiness {
    pub fn new(clusters: &HashMap<String, Arc<Cluster>>) -> Self {
        Self {
            serving: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            reached: clusters
                .iter()
                .map(|(name, c)| (name.clone(), AtomicBool::new(c.is_empty())))
                .collect(),
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

    /// Probes every cluster not reached yet, every 250 ms, until all have been.
    pub fn spawn_probes(
        self: &Arc<Self>,
        clusters: HashMap<String, Arc<Cluster>>,
    ) -> tokio::task::JoinHandle<()> {
        let readiness = self.clone();
        tokio::spawn(async move {
            loop {
                let mut waiting = false;
                for (name, cluster) in &clusters {
                    let latch = &readiness.reached[name];
                    if latch.load(Ordering::Acquire) {
                        continue;
                    }
                    if cluster.reachable().await {
                        latch.store(true, Ordering::Release);
                        tracing::info!(cluster = %name, "cluster reachable");
                    } else {
                        waiting = true;
                    }
                }
                if !waiting {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    }

    fn reached(&self, cluster: &str) -> bool {
        self.reached
            .get(cluster)
            .is_none_or(|latch| latch.load(Ordering::Acquire))
    }
}

pub async fn index() -> Response {
    reply::ok(json!({
        "endpoints": [
            "GET /live", "GET /ready", "GET /metrics", "GET /weights",
            "PUT /routes/{name}/weights", "GET /config_dump", "GET /migration",
            "POST /migration/{route}/{pause,resume,promote,rollback}",
            "GET /audit/checkpoint"
        ]
    }))
}

pub async fn live() -> Response {
    reply::ok(json!({"status": "live"}))
}

pub async fn ready(State(admin): State<Arc<Admin>>) -> Response {
    let readiness = &admin.readiness;
    if readiness.draining.load(Ordering::Acquire) {
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
