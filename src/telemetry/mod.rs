//! Every metric name of acge-proxy, the Prometheus recorder, the per-route handles the
//! request path records into, and the sliding windows the migration controller reads
//! ([`window`]).
//!
//! Handles are registered once per route and version when the route table is built, so
//! a request records with a few atomic operations and never looks a label set up in a
//! map. This module does not serve `/metrics`; the admin API renders the handle
//! installed here.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use acge_filters::metrics as filter_metrics;

use acge_filters::Version;

pub mod window;

pub const REQUESTS_TOTAL: &str = "acge_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "acge_request_duration_seconds";
pub const UPSTREAM_ERRORS_TOTAL: &str = "acge_upstream_errors_total";
pub const GREEN_WEIGHT: &str = "acge_green_weight";
pub const MIGRATION_STEP: &str = "acge_migration_step";
pub const MIGRATION_ROLLBACKS_TOTAL: &str = "acge_migration_rollbacks_total";
pub const SHADOW_REQUESTS_TOTAL: &str = "acge_shadow_requests_total";
pub const SHADOW_MISMATCH_TOTAL: &str = "acge_shadow_mismatch_total";
pub const REFUSED_TOTAL: &str = "acge_refused_total";
/// Listener certificate reloads: `{result="loaded|refused"}`.
pub const TLS_RELOADS_TOTAL: &str = "acge_tls_reloads_total";
/// Upstream (cluster) TLS file reloads: `{cluster, result="loaded|refused"}`.
pub const UPSTREAM_TLS_RELOADS_TOTAL: &str = "acge_upstream_tls_reloads_total";
/// Config reloads: `{result="loaded|unchanged|refused|no_file", trigger="admin|signal|watch"}`.
pub const CONFIG_RELOADS_TOTAL: &str = "acge_config_reloads_total";
/// The generation of the config serving: 1 at start, one more per loaded reload.
pub const CONFIG_GENERATION: &str = "acge_config_generation";
/// 1 when the last reload loaded (or found the file unchanged), 0 when it was refused:
/// the file then says something the proxy is not serving.
pub const CONFIG_LAST_RELOAD_SUCCESSFUL: &str = "acge_config_last_reload_successful";
pub use acge_filters::metrics::{
    AUDIT_COMMIT_SECONDS, AUDIT_QUEUE_DEPTH, AUDIT_RECORDS_TOTAL, CASCADE_TOTAL, COMPLIANCE_SCORE,
    DECISIONS_TOTAL, HASH_CHECKS_TOTAL, HASH_CONSISTENCY_RATIO, INFERENCE_BATCH_SIZE,
    INFERENCE_CACHE_TOTAL, INFERENCE_ERRORS_TOTAL, INFERENCE_QUEUE_SECONDS, INFERENCE_SECONDS,
};

/// Explicit buckets (0.5 ms to 10 s) so that Prometheus can aggregate quantiles across
/// pods; a summary could not be.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0,
];

/// Installs the process-wide recorder once and returns its handle; later calls return
/// the same handle (tests start many proxies in one process).
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let buckets: [(&str, &[f64]); 6] = [
                (REQUEST_DURATION_SECONDS, LATENCY_BUCKETS),
                (AUDIT_COMMIT_SECONDS, filter_metrics::COMMIT_BUCKETS),
                (INFERENCE_BATCH_SIZE, filter_metrics::BATCH_SIZE_BUCKETS),
                (COMPLIANCE_SCORE, filter_metrics::SCORE_BUCKETS),
                (INFERENCE_SECONDS, filter_metrics::INFERENCE_BUCKETS),
                (INFERENCE_QUEUE_SECONDS, filter_metrics::INFERENCE_BUCKETS),
            ];
            let mut builder = PrometheusBuilder::new();
            for (name, list) in buckets {
                builder = builder
                    .set_buckets_for_metric(Matcher::Full(name.into()), list)
                    .expect("every bucket list is a non-empty constant");
            }
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            handle
        })
        .clone()
}

/// Status classes used as the `code_class` label.
const CODE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The handles one route records into, per version.
pub struct RouteMetrics {
    route: String,
    /// Blue, green, and "none" (answered before a version was chosen).
    versions: [VersionMetrics; 3],
    green_weight: Gauge,
}

struct VersionMetrics {
    requests: [Counter; 5],
    duration: Histogram,
}

impl RouteMetrics {
    pub fn new(route: &str) -> Self {
        let version = |v: &'static str| {
            VersionMetrics {
            requests: CODE_CLASSES.map(|class| {
                counter!(REQUESTS_TOTAL, "route" => route.to_string(), "version" => v, "code_class" => class)
            }),
            duration: histogram!(REQUEST_DURATION_SECONDS, "route" => route.to_string(), "version" => v),
        }
        };
        Self {
            route: route.to_string(),
            versions: [
                version(Version::Blue.as_str()),
                version(Version::Green.as_str()),
                version("none"),
            ],
            green_weight: gauge!(GREEN_WEIGHT, "route" => route.to_string()),
        }
    }

    /// One finished exchange: its logged status and the time until its body ended.
    pub fn record(&self, version: Option<Version>, status: u16, elapsed: Duration) {
        let v = &self.versions[Version::index(version)];
        let class = (status / 100).clamp(1, 5) as usize - 1;
        v.requests[class].increment(1);
        v.duration.record(elapsed.as_secs_f64());
    }

    /// An upstream failure; rare, so the label lookup per call is fine.
    pub fn upstream_error(&self, version: Version, kind: &'static str) {
        counter!(UPSTREAM_ERRORS_TOTAL, "route" => self.route.clone(), "version" => version.as_str(), "kind" => kind)
            .increment(1);
    }

    pub fn set_green_weight(&self, weight: u8) {
        self.green_weight.set(f64::from(weight));
    }
}

/// Requests that matched no route (404) or were refused before a route was chosen.
pub fn unrouted(status: u16) {
    counter!(REQUESTS_TOTAL, "route" => "", "version" => "none", "code_class" => CODE_CLASSES[(status / 100).clamp(1, 5) as usize - 1])
        .increment(1);
}

/// Why the proxy refused work before (or instead of) doing it: `acge_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A connection beyond `listener.max_connections` with none idle to close.
    Connections = 0,
    /// An idle connection closed to make room for a new one.
    ShedIdle,
    /// A request beyond `listener.max_requests_in_flight`.
    Requests,
    /// A body that would overrun `listener.max_buffered_bytes`.
    BufferBudget,
    /// A connection that sent nothing within `first_byte_timeout_ms`.
    FirstByteTimeout,
    /// A connection idle beyond `idle_timeout_ms`.
    IdleTimeout,
    /// A body that did not arrive within `body_read_timeout_ms` (408).
    BodyTimeout,
    /// Accepting failed for want of file descriptors (the connection was shed).
    FileDescriptors,
    /// A request that waited `max_pending_ms` for an upstream connection.
    UpstreamPending,
}

impl Refusal {
    const ALL: [Refusal; 9] = [
        Refusal::Connections,
        Refusal::ShedIdle,
        Refusal::Requests,
        Refusal::BufferBudget,
        Refusal::FirstByteTimeout,
        Refusal::IdleTimeout,
        Refusal::BodyTimeout,
        Refusal::FileDescriptors,
        Refusal::UpstreamPending,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Connections => "connections",
            Refusal::ShedIdle => "shed_idle",
            Refusal::Requests => "requests",
            Refusal::BufferBudget => "buffer_budget",
            Refusal::FirstByteTimeout => "first_byte_timeout",
            Refusal::IdleTimeout => "idle_timeout",
            Refusal::BodyTimeout => "body_timeout",
            Refusal::FileDescriptors => "file_descriptors",
            Refusal::UpstreamPending => "upstream_pending",
        }
    }
}

/// Counts one refusal (the handles are registered once, on first use after
/// [`install`]).
pub fn refused(why: Refusal) {
    static HANDLES: OnceLock<[Counter; 9]> = OnceLock::new();
    HANDLES.get_or_init(|| Refusal::ALL.map(|r| counter!(REFUSED_TOTAL, "reason" => r.as_str())))
        [why as usize]
        .increment(1);
}

/// Keeps the recorder's memory bounded: histogram samples are folded into buckets.
pub fn spawn_upkeep(handle: PrometheusHandle) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    })
}
