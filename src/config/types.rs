//! The configuration's serde types and their documented defaults (docs/config.md is
//! the reference). Unknown keys are errors. This module only says what a config can
//! hold; `validate.rs` says what it may hold.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use acge_filters::registry::FiltersConfig;

/// The constitutional hash every request and response is expected to carry.
pub const DEFAULT_CONSTITUTION_HASH: &str = "cdd01ef066bc6cf2";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listener: ListenerConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub constitution: ConstitutionConfig,
    pub clusters: BTreeMap<String, ClusterConfig>,
    pub routes: Vec<RouteConfig>,
    /// Settings of each filter, shared by every route that lists it.
    #[serde(default)]
    pub filters: FiltersConfig,
    /// The migration controller; absent, weights move only through the admin API.
    #[serde(default)]
    pub migration: Option<MigrationConfig>,
}

/// The migration controller (docs/migration.md): steps, gates, rollback, shadow.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationConfig {
    /// Routes the controller walks; every route when left out.
    #[serde(default)]
    pub routes: Option<Vec<String>>,
    /// Green weights, percent, in order; a leading 0 is the shadow step.
    #[serde(default = "defaults::steps")]
    pub steps: Vec<u8>,
    /// Time in a step, and the window its gates are judged over, in seconds.
    #[serde(default = "defaults::interval_s")]
    pub interval_s: f64,
    /// Green requests an interval needs before it may advance.
    #[serde(default = "defaults::min_requests")]
    pub min_requests: u64,
    /// Rollback is judged continuously over this recent window, in seconds…
    #[serde(default = "defaults::rollback_window_s")]
    pub rollback_window_s: f64,
    /// …once it holds at least this many green requests.
    #[serde(default = "defaults::rollback_min_requests")]
    pub rollback_min_requests: u64,
    #[serde(default)]
    pub rollback: RollbackThresholds,
    /// Where progress is kept across restarts (written atomically).
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    #[serde(default)]
    pub shadow: ShadowConfig,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RollbackThresholds {
    #[serde(default = "defaults::compliance_below")]
    pub compliance_below: f64,
    #[serde(default = "defaults::p95_above_ms")]
    pub p95_above_ms: f64,
    #[serde(default = "defaults::error_rate_above")]
    pub error_rate_above: f64,
    #[serde(default = "defaults::hash_consistency_below")]
    pub hash_consistency_below: f64,
}

impl Default for RollbackThresholds {
    fn default() -> Self {
        Self {
            compliance_below: defaults::compliance_below(),
            p95_above_ms: defaults::p95_above_ms(),
            error_rate_above: defaults::error_rate_above(),
            hash_consistency_below: defaults::hash_consistency_below(),
        }
    }
}

/// Mirroring to green at the shadow step.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// Share of requests mirrored, 0–1.
    #[serde(default = "defaults::shadow_fraction")]
    pub fraction: f64,
    /// Mirrored requests in flight at most; beyond it a request is not mirrored.
    #[serde(default = "defaults::shadow_max_inflight")]
    pub max_inflight: usize,
    /// Top-level JSON fields left out when blue's and green's bodies are compared.
    #[serde(default)]
    pub ignore_fields: Vec<String>,
}

impl Default for ShadowConfig {
    fn default() -> Self {
        Self {
            fraction: defaults::shadow_fraction(),
            max_inflight: defaults::shadow_max_inflight(),
            ignore_fields: Vec::new(),
        }
    }
}

impl MigrationConfig {
    /// Whether the controller walks the route `name`.
    pub fn covers(&self, name: &str) -> bool {
        self.routes
            .as_ref()
            .is_none_or(|routes| routes.iter().any(|r| r == name))
    }

    /// The longest span a window must cover.
    pub fn window_span(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.interval_s.max(self.rollback_window_s).max(0.05))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `host:port` the proxy accepts traffic on, HTTP/1.1 and HTTP/2 alike.
    pub address: String,
    /// Serve TLS (ALPN h2 and http/1.1) instead of cleartext.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Runtime worker threads; default: one per CPU.
    #[serde(default)]
    pub workers: Option<usize>,
    /// The kernel's queue of connections not yet accepted.
    #[serde(default = "defaults::backlog")]
    pub backlog: u32,
    /// Open client connections at most; beyond it the oldest idle one is closed, and
    /// with none idle a new one gets 503 `overloaded` and is closed.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Requests in flight at most (all connections); beyond it a request waits up to
    /// `admission_wait_ms`, then gets 503 `overloaded` with `Retry-After`, before its
    /// body is read.
    #[serde(default = "defaults::max_requests_in_flight")]
    pub max_requests_in_flight: usize,
    /// A request beyond `max_requests_in_flight` waits this long for a slot, in arrival
    /// order, before its 503: a flood of clients that retry at once is slowed to what
    /// the proxy serves instead of being answered as fast as it asks. 0: refuse at once.
    #[serde(default = "defaults::admission_wait_ms")]
    pub admission_wait_ms: u64,
    /// Request bodies held whole at once (for filters and mirrors), in bytes, over all
    /// requests; beyond it 503 `overloaded`.
    #[serde(default = "defaults::max_buffered_bytes")]
    pub max_buffered_bytes: u64,
    /// Requests whose header block (names and values) is larger get 431.
    #[serde(default = "defaults::max_header_bytes")]
    pub max_header_bytes: usize,
    /// A new connection must send its first byte (or finish its TLS handshake) within
    /// this time, or it is closed.
    #[serde(default = "defaults::first_byte_timeout_ms")]
    pub first_byte_timeout_ms: u64,
    /// An HTTP/1 client must finish sending its headers within this time.
    #[serde(default = "defaults::header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// A body the proxy holds whole must arrive within this time (408 beyond it).
    #[serde(default = "defaults::body_read_timeout_ms")]
    pub body_read_timeout_ms: u64,
    /// A connection with no request in flight and no bytes moving is closed after this.
    #[serde(default = "defaults::idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// HTTP/2: concurrent streams per connection.
    #[serde(default = "defaults::h2_max_concurrent_streams")]
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2: streams a client may reset before they are accepted (a rapid-reset
    /// flood), per connection, before the connection is closed.
    #[serde(default = "defaults::h2_max_pending_resets")]
    pub h2_max_pending_resets: usize,
    /// HTTP/2: streams the proxy may reset for a client's protocol errors, per
    /// connection, before it closes the connection.
    #[serde(default = "defaults::h2_max_local_resets")]
    pub h2_max_local_resets: usize,
    /// Route on (and forward) the path with dot segments removed, unreserved
    /// characters percent-decoded and hex digits upper-cased (RFC 3986 §6.2.2).
    #[serde(default = "defaults::yes")]
    pub normalize_path: bool,
    /// Merge runs of `/` in the path into one (with `normalize_path`).
    #[serde(default = "defaults::yes")]
    pub merge_slashes: bool,
    /// Pass on `x-acge-*` headers that clients send (otherwise they are removed at
    /// ingress, since the proxy sets them itself). Only behind another acge-proxy.
    #[serde(default)]
    pub trust_acge_headers: bool,
    /// On shutdown, in-flight requests get this long to finish.
    #[serde(default = "defaults::drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// On shutdown, `/ready` answers 503 `draining` at once, and the proxy goes on
    /// serving this long (so that load balancers and endpoints controllers stop
    /// sending new requests here) before it stops accepting and drains.
    #[serde(default)]
    pub drain_delay_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// How often the two files are read again (a rotated pair serves new handshakes;
    /// open connections keep theirs); 0: never.
    #[serde(default = "defaults::tls_reload_ms")]
    pub reload_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "defaults::admin_address")]
    pub address: String,
    /// File holding the bearer token for mutations; read on every mutation, so a
    /// rotated secret applies without a restart. Without it, `ACGE_ADMIN_TOKEN` is used.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// How the config file is reloaded (docs/operations.md).
    #[serde(default)]
    pub reload: ReloadConfig,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            address: defaults::admin_address(),
            token_file: None,
            reload: ReloadConfig::default(),
        }
    }
}

/// Reloading the config file: on `POST /reload` and `SIGHUP` always, and on a change
/// in the file's directory when `watch` is on.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReloadConfig {
    /// Watch the directory holding the config file (a mounted ConfigMap's `..data`
    /// swap, an editor's rename) and reload when the file's content changes.
    #[serde(default = "defaults::reload_watch")]
    pub watch: bool,
    /// Quiet time after the last change in the directory before the file is read, so
    /// that a swap of several steps is read once, whole.
    #[serde(default = "defaults::reload_debounce_ms")]
    pub debounce_ms: u64,
}

impl Default for ReloadConfig {
    fn default() -> Self {
        Self {
            watch: defaults::reload_watch(),
            debounce_ms: defaults::reload_debounce_ms(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConstitutionConfig {
    #[serde(default = "defaults::constitution_hash")]
    pub hash: String,
}

impl Default for ConstitutionConfig {
    fn default() -> Self {
        Self {
            hash: defaults::constitution_hash(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// HTTP/1.1 to the upstream (keep-alive pooled).
    #[default]
    Http1,
    /// HTTP/2 to the upstream: with prior knowledge (h2c) in plaintext, agreed by
    /// ALPN under `tls`.
    Http2,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `host:port` of each endpoint; requests go round robin. Empty means every request
    /// to the cluster gets 503.
    pub endpoints: Vec<String>,
    #[serde(default = "defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Time allowed from the end of the request until the response head arrives.
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub protocol: Protocol,
    /// Idle pooled connections are closed after this long: keep it below the
    /// upstream's own keep-alive timeout (uvicorn's default is 5 s), so that the proxy,
    /// not the upstream, closes them.
    #[serde(default = "defaults::upstream_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    /// Open connections to the cluster at most (all endpoints together).
    #[serde(default = "defaults::cluster_max_connections")]
    pub max_connections: usize,
    /// How long a request waits for a connection when all are busy; 503
    /// `upstream_overloaded` beyond it.
    #[serde(default = "defaults::max_pending_ms")]
    pub max_pending_ms: u64,
    /// Largest response header block accepted from the cluster; 502 beyond it.
    #[serde(default = "defaults::max_response_header_bytes")]
    pub max_response_header_bytes: usize,
    /// TLS to the endpoints; plaintext when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClusterTlsConfig>,
}

/// TLS to a cluster's endpoints (rustls): the upstream's certificate is verified
/// against `ca`; `cert` and `key` make it mutual.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTlsConfig {
    /// PEM bundle of the CAs the upstream's certificate must chain to.
    pub ca: PathBuf,
    /// The name sent (SNI) and verified; the endpoint's host when absent.
    #[serde(default)]
    pub sni: Option<String>,
    /// PEM client certificate chain, for mTLS (with `key`).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// ALPN protocols offered; `[h2]` with `protocol: http2`, `[http/1.1]` otherwise.
    #[serde(default)]
    pub alpn: Option<Vec<String>>,
    /// How often the files are read again (0: never); new connections use a changed
    /// set, open ones keep theirs.
    #[serde(default = "defaults::tls_reload_ms")]
    pub reload_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    #[serde(rename = "match")]
    pub matcher: MatchConfig,
    pub blue: String,
    pub green: String,
    /// Percent of requests sent to green, 0–100. The admin API changes it at runtime.
    #[serde(default)]
    pub green_weight: i64,
    /// Keep one client on one version: its key hashes to a fixed point.
    #[serde(default)]
    pub sticky: Option<StickyConfig>,
    /// Honour `x-acge-version: blue|green` from clients (for testing a version directly).
    #[serde(default)]
    pub version_override: bool,
    /// Filter names, run in this order (see docs/filters.md).
    #[serde(default)]
    pub filters: Vec<String>,
    /// Largest body a filter may buffer, request or response; 413 beyond it.
    #[serde(default = "defaults::max_body_bytes")]
    pub max_body_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    pub path_prefix: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StickyConfig {
    #[serde(default)]
    pub header: Option<String>,
    #[serde(default)]
    pub cookie: Option<String>,
}

mod defaults {
    pub fn steps() -> Vec<u8> {
        vec![0, 5, 10, 25, 50, 75, 100]
    }
    pub fn interval_s() -> f64 {
        60.0
    }
    pub fn min_requests() -> u64 {
        200
    }
    pub fn rollback_window_s() -> f64 {
        10.0
    }
    pub fn rollback_min_requests() -> u64 {
        20
    }
    pub fn compliance_below() -> f64 {
        0.95
    }
    pub fn p95_above_ms() -> f64 {
        2000.0
    }
    pub fn error_rate_above() -> f64 {
        0.01
    }
    pub fn hash_consistency_below() -> f64 {
        1.0
    }
    pub fn shadow_fraction() -> f64 {
        1.0
    }
    pub fn shadow_max_inflight() -> usize {
        64
    }
    pub fn max_header_bytes() -> usize {
        32 * 1024
    }
    pub fn header_read_timeout_ms() -> u64 {
        10_000
    }
    pub fn first_byte_timeout_ms() -> u64 {
        5_000
    }
    pub fn body_read_timeout_ms() -> u64 {
        30_000
    }
    pub fn tls_reload_ms() -> u64 {
        5_000
    }
    pub fn backlog() -> u32 {
        1024
    }
    pub fn max_connections() -> usize {
        10_000
    }
    pub fn max_requests_in_flight() -> usize {
        4_096
    }
    pub fn admission_wait_ms() -> u64 {
        500
    }
    pub fn max_buffered_bytes() -> u64 {
        256 * 1024 * 1024
    }
    pub fn h2_max_concurrent_streams() -> u32 {
        256
    }
    pub fn h2_max_pending_resets() -> usize {
        20
    }
    pub fn h2_max_local_resets() -> usize {
        1024
    }
    pub fn yes() -> bool {
        true
    }
    pub fn drain_timeout_ms() -> u64 {
        10_000
    }
    pub fn admin_address() -> String {
        "127.0.0.1:15000".into()
    }
    pub fn reload_watch() -> bool {
        true
    }
    pub fn reload_debounce_ms() -> u64 {
        250
    }
    pub fn constitution_hash() -> String {
        super::DEFAULT_CONSTITUTION_HASH.into()
    }
    pub fn connect_timeout_ms() -> u64 {
        250
    }
    pub fn timeout_ms() -> u64 {
        5_000
    }
    pub fn idle_timeout_ms() -> u64 {
        60_000
    }
    pub fn upstream_idle_timeout_ms() -> u64 {
        4_000
    }
    pub fn cluster_max_connections() -> usize {
        1024
    }
    pub fn max_pending_ms() -> u64 {
        1_000
    }
    pub fn max_response_header_bytes() -> usize {
        64 * 1024
    }
    pub fn max_body_bytes() -> u64 {
        1024 * 1024
    }
}
