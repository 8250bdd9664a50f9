//! Routes: what a request is matched on, and everything a route's exchanges use that
//! was made once when the route table was built (its clusters, splitter, filter chain,
//! metric handles, windows and mirror).
//!
//! The table is read on every request and replaced whole (behind `ArcSwap` in
//! [`super::Proxy`]), never locked. This module matches and holds; it does not choose a
//! version (`split.rs`) or forward (`upstream/`).

use std::collections::HashMap;
use std::sync::Arc;

use acge_filters::{Chain, Exchange};
use bytes::Bytes;
use http::header::HeaderName;
use tokio::sync::oneshot;

use super::split::{Splitter, StickyKey, Version};
use super::upstream::{Cluster, Forwarded};
use crate::config::{RouteConfig, ValidConfig};
use crate::telemetry::window::{Outcome, Windows};
use crate::telemetry::RouteMetrics;

/// Blue's answer to a mirrored request, for the mirror to compare green's with.
#[derive(Debug)]
pub struct BlueAnswer {
    pub status: u16,
    /// The whole body, when it was small enough to hold (within `max_body_bytes`).
    pub body: Option<Bytes>,
}

/// A copy of one request, for green, made after the request phases.
pub struct Mirrored {
    /// Green's exchange: the request as the filters left it, with its whole body.
    pub exchange: Exchange,
    pub body: Bytes,
    /// What the client's request carried forward (its address, proto and id).
    pub forwarded: Forwarded,
    /// Blue's answer, when the client's exchange has it.
    pub blue: oneshot::Receiver<BlueAnswer>,
}

/// Starts one admitted mirror.
pub type StartMirror = Box<dyn FnOnce(Arc<Route>, Mirrored) + Send>;

/// Where a route's requests may be copied to green while blue answers (the migration's
/// shadow step, `control/migration/shadow.rs`). The data plane asks, and hands over
/// the copy; what happens to it is the mirror's.
pub trait Mirror: Send + Sync {
    /// Whether this request is mirrored (cheap when it is not: an atomic load). A body
    /// of unknown or larger length than `max_body` cannot be copied; the mirror counts
    /// that.
    fn admit(&self, declared_body: Option<u64>, max_body: u64) -> Option<StartMirror>;
}

/// One route: what it matches, where its versions live, how it splits.
pub struct Route {
    pub name: Arc<str>,
    pub path_prefix: String,
    pub blue: Arc<Cluster>,
    pub green: Arc<Cluster>,
    pub splitter: Splitter,
    pub metrics: RouteMetrics,
    /// The route's filters, in order; empty for a plain proxy route.
    pub chain: Chain,
    /// Largest body a filter (or a mirror) may have buffered, request or response.
    pub max_body_bytes: u64,
    /// Recent figures per version, for the migration controller; None on a route it
    /// does not walk, which then records nothing per request.
    pub windows: Option<Arc<Windows>>,
    /// Copies requests to green at the migration's shadow step.
    pub mirror: Option<Arc<dyn Mirror>>,
    /// Honour `x-acge-version` (the route's `version_override`).
    pub allows_override: bool,
}

impl Route {
    pub fn cluster(&self, version: Version) -> &Arc<Cluster> {
        match version {
            Version::Blue => &self.blue,
            Version::Green => &self.green,
        }
    }

    pub fn set_green_weight(&self, weight: u8) {
        self.splitter.set_green_weight(weight);
        self.metrics.set_green_weight(weight);
    }

    /// One ended exchange, into the metrics and, when a version answered (or failed
    /// to), into that version's windows.
    pub fn observe(&self, ex: &Exchange) {
        let Some(outcome) = Outcome::of(ex) else {
            return;
        };
        if !ex.shadow {
            self.metrics
                .record(ex.version, outcome.status, outcome.latency);
        }
        if let (Some(version), Some(windows)) = (ex.version, &self.windows) {
            windows.record(version, &outcome);
        }
    }
}

/// What building the route table needs beside the route configs.
pub struct Parts<'a> {
    pub clusters: &'a HashMap<String, Arc<Cluster>>,
    pub chain_of: &'a dyn Fn(&RouteConfig) -> Chain,
    pub mirror_of: &'a dyn Fn(&RouteConfig) -> Option<Arc<dyn Mirror>>,
    /// On a config reload, the table being replaced and the config it was built from:
    /// a route that keeps its name keeps its weight and its windows (see
    /// [`RouteTable::build`]).
    pub previous: Option<(&'a RouteTable, &'a ValidConfig)>,
}

/// All routes, matched by longest path prefix.
pub struct RouteTable {
    /// Sorted by prefix length, longest first, so the first match is the longest.
    by_prefix: Vec<Arc<Route>>,
    /// In config order, for the admin API.
    in_order: Vec<Arc<Route>>,
}

impl RouteTable {
    /// Builds the table from a validated config.
    ///
    /// On a reload (`parts.previous`), a route whose name the running table has keeps
    /// that route's weight (the same atomic, so a weight set at runtime survives) and
    /// its windows, unless the file's `green_weight` for it changed since the last
    /// load: an edited weight is the operator's and applies. On a route the migration
    /// controller walks the weight is always the controller's.
    pub fn build(config: &ValidConfig, parts: Parts<'_>) -> Self {
        let window_span = config.migration.as_ref().map(|m| (m, m.window_span()));
        let walked = |name: &str| config.migration.as_ref().is_some_and(|m| m.covers(name));
        let in_order: Vec<Arc<Route>> = config
            .routes
            .iter()
            .map(|rc| {
                let sticky = rc
                    .sticky
                    .as_ref()
                    .and_then(|s| match (&s.header, &s.cookie) {
                        (Some(h), _) => HeaderName::from_bytes(h.as_bytes())
                            .ok()
                            .map(StickyKey::Header),
                        (None, Some(c)) => Some(StickyKey::Cookie(c.clone())),
                        (None, None) => None,
                    });
                let file_weight = u8::try_from(rc.green_weight.clamp(0, 100))
                    .expect("clamped to 0..=100, which fits u8");
                let previous = parts.previous.and_then(|(table, old)| {
                    let route = table.get(&rc.name)?;
                    let old_weight = old
                        .routes
                        .iter()
                        .find(|r| r.name == rc.name)
                        .map(|r| r.green_weight);
                    let edited = old_weight != Some(rc.green_weight) && !walked(&rc.name);
                    Some((route, edited))
                });
                let splitter = match previous {
                    Some((route, false)) => {
                        Splitter::carrying(&route.splitter, sticky, rc.version_override)
                    }
                    _ => Splitter::new(file_weight, sticky, rc.version_override),
                };
                let metrics = RouteMetrics::new(&rc.name);
                metrics.set_green_weight(splitter.green_weight());
                let cluster = |name: &str| {
                    parts
                        .clusters
                        .get(name)
                        .expect("a ValidConfig's routes name existing clusters")
                        .clone()
                };
                let windows = window_span
                    .filter(|(m, _)| m.covers(&rc.name))
                    .map(|(_, span)| {
                        previous
                            .and_then(|(route, _)| route.windows.clone())
                            .unwrap_or_else(|| Arc::new(Windows::new(span)))
                    });
                Arc::new(Route {
                    name: rc.name.as_str().into(),
                    path_prefix: rc.matcher.path_prefix.clone(),
                    blue: cluster(&rc.blue),
                    green: cluster(&rc.green),
                    splitter,
                    metrics,
                    chain: (parts.chain_of)(rc),
                    max_body_bytes: rc.max_body_bytes,
                    windows,
                    mirror: (parts.mirror_of)(rc),
                    allows_override: rc.version_override,
                })
            })
            .collect();
        let mut by_prefix = in_order.clone();
        by_prefix.sort_by_key(|r| std::cmp::Reverse(r.path_prefix.len()));
        Self {
            by_prefix,
            in_order,
        }
    }

    /// The route with the longest prefix of `path` (plain string prefix, as Envoy does).
    pub fn find(&self, path: &str) -> Option<&Arc<Route>> {
        self.by_prefix
            .iter()
            .find(|r| path.starts_with(r.path_prefix.as_str()))
    }

    pub fn get(&self, name: &str) -> Option<&Arc<Route>> {
        self.in_order.iter().find(|r| &*r.name == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.in_order.iter()
    }
}
