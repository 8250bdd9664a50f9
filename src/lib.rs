//! acge-proxy: a sidecar L7 proxy that moves a service's traffic from its legacy
//! **blue** version to its ACGE-backed **green** version.
//!
//! The folders say which side of the product a file belongs to: [`proxy`] is the data
//! plane (what every request touches), [`control`] the control plane (the admin API,
//! the migration controller), [`telemetry`] the metrics and windows, [`config`] the
//! configuration, [`demo`] the seven demo services. The filters are the
//! `acge-filters` crate. [`start`] wires the parts together from a [`ValidConfig`];
//! nothing else lives here.

pub mod config;
pub mod control;
pub mod demo;
pub mod proxy;
pub mod telemetry;

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use acge_filters::audit::AuditLog;
use acge_filters::registry::BuildError;
use acge_filters::Filter;
use arc_swap::ArcSwap;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::reload::{self, AssembleError, Outcome, Reloader, Trigger};
use crate::config::ValidConfig;
use crate::control::admin::{Admin, Readiness, TokenSource};
use crate::control::migration::{Controller, MigrationError};
use crate::proxy::route::RouteTable;
use crate::proxy::server::{self, Drain, Phase, ServerOptions};
use crate::proxy::Proxy;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {address} ({role}): {source}")]
    Bind {
        role: &'static str,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("listener.tls: {0}")]
    Tls(#[from] proxy::server::TlsError),
    #[error(transparent)]
    Filters(#[from] BuildError),
    #[error("routes: the filter `{0}` is named as a custom filter but StartOptions has none by that name")]
    MissingFilter(String),
    #[error(transparent)]
    Migration(#[from] MigrationError),
    #[error("clusters.{name}.tls: {reason}")]
    ClusterTls { name: String, reason: String },
    #[error("{role}: the config says {configured} but the sockets taken over listen on {inherited}; a takeover keeps the addresses (restart without --takeover to move them)")]
    TakeoverAddress {
        role: &'static str,
        configured: SocketAddr,
        inherited: SocketAddr,
    },
}

impl From<AssembleError> for StartError {
    fn from(e: AssembleError) -> Self {
        match e {
            AssembleError::Filters(e) => Self::Filters(e),
            AssembleError::MissingFilter(name) => Self::MissingFilter(name),
            AssembleError::Cluster { name, reason } => Self::ClusterTls { name, reason },
        }
    }
}

/// How to start, beyond the config file.
pub struct StartOptions {
    pub admin_token: TokenSource,
    /// Filters of your own, by the name routes list them under (for a program that
    /// embeds acge-proxy; see docs/filters.md). Validate the config with their names
    /// ([`ValidConfig::new`]).
    pub filters: Vec<(String, Arc<dyn Filter>)>,
    /// Routes of your own on the admin API (the demo's fault knobs), behind the same
    /// token layer.
    pub admin_routes: Vec<axum::Router>,
    /// Listening sockets taken over from a running process (proxy, admin), served
    /// instead of binding new ones (`run --takeover`, `proxy/server/handover.rs`).
    pub inherited: Option<(std::net::TcpListener, std::net::TcpListener)>,
}

impl StartOptions {
    pub fn new(admin_token: TokenSource) -> Self {
        Self {
            admin_token,
            filters: Vec::new(),
            admin_routes: Vec::new(),
            inherited: None,
        }
    }
}

/// A started proxy: its bound addresses, its routes, and the handle to stop it.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub routes: Arc<ArcSwap<RouteTable>>,
    /// The migration controller, when the config has a `migration` section.
    pub migration: Option<Arc<Controller>>,
    pub proxy: Arc<Proxy>,
    /// The config serving and its reloads.
    pub reloader: Arc<Reloader>,
    readiness: Arc<Readiness>,
    /// The listener's certificates, when it serves TLS.
    certificates: Option<Arc<server::Certificates>>,
    /// Both listeners follow it (`Connection: close` while draining; a takeover).
    drain: Arc<Drain>,
    /// The listening sockets (proxy, admin), kept to offer to a successor.
    sockets: [OwnedFd; 2],
    /// `listener.drain_delay_ms`.
    drain_delay: std::time::Duration,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// The audit log, when a route runs the audit filter.
    pub fn audit(&self) -> Option<Arc<AuditLog>> {
        self.reloader.current().registry.audit_log()
    }

    /// Reads the config file again and swaps it in when it changed and is valid
    /// (what `SIGHUP` and `POST /reload` do).
    pub async fn reload(&self, trigger: Trigger) -> Outcome {
        self.reloader.reload(trigger).await
    }

    /// Reads the listener's certificate and key, and every cluster's TLS files, again
    /// now (what `SIGHUP` does besides the config); true when something new loaded.
    pub async fn reload_certificates(&self) -> bool {
        let listener = match &self.certificates {
            Some(certs) => reload_certificates(certs.clone()).await,
            None => false,
        };
        let clusters = self.reloader.current().clusters.clone();
        let upstream = tokio::task::spawn_blocking(move || {
            let mut any = false;
            for (name, cluster) in &clusters {
                let counted = |result: &'static str| {
                    metrics::counter!(telemetry::UPSTREAM_TLS_RELOADS_TOTAL, "cluster" => name.clone(), "result" => result)
                        .increment(1)
                };
                match cluster.reload_tls() {
                    Ok(true) => {
                        counted("loaded");
                        tracing::info!(cluster = %name, "upstream TLS files reloaded");
                        any = true;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        counted("refused");
                        tracing::warn!(cluster = %name, error = %e, "upstream TLS files not reloaded; the current ones stay");
                    }
                }
            }
            any
        })
        .await
        .unwrap_or(false);
        listener || upstream
    }

    /// Copies of the listening sockets (proxy, admin), to offer to a successor
    /// ([`server::handover::offer`]).
    pub fn sockets(&self) -> std::io::Result<[OwnedFd; 2]> {
        Ok([self.sockets[0].try_clone()?, self.sockets[1].try_clone()?])
    }

    /// Turns `/ready` to 503 `draining` and goes on serving for the drain delay, with
    /// `Connection: close` on HTTP/1 answers; then stops accepting, sends HTTP/2
    /// GOAWAY, drains in-flight requests (up to the drain timeout), lets the log
    /// phases of every exchange finish (one the drain cut short is logged as aborted),
    /// writes the migration state, then writes what the audit log still holds and
    /// signs its last checkpoint.
    pub async fn shutdown(self) {
        self.readiness.set_draining();
        self.drain.set(Phase::Closing);
        if !self.drain_delay.is_zero() {
            tracing::info!(
                delay_ms = self.drain_delay.as_millis() as u64,
                "draining: /ready is 503, still serving"
            );
            tokio::time::sleep(self.drain_delay).await;
        }
        self.stop().await;
    }

    /// A successor serves the sockets now: stop accepting at once (the sockets stay
    /// open in the successor, so nothing queued is lost), answer what is open with
    /// `Connection: close` until every connection has closed or
    /// [`TAKEOVER_CLOSE_AFTER`] (or the drain delay, when longer) has passed, then stop
    /// as [`Running::shutdown`] does. A busy client gets its close with its next answer,
    /// so under load this takes milliseconds, and the audit log (which the successor
    /// waits for) is let go at once.
    pub async fn hand_over(self) {
        self.readiness.set_draining();
        self.drain.set(Phase::Handed);
        let delay = self.drain_delay.max(TAKEOVER_CLOSE_AFTER);
        tracing::info!(
            delay_ms = delay.as_millis() as u64,
            "taken over: no longer accepting; finishing what is open"
        );
        let _ = tokio::time::timeout(delay, self.drain.none_open()).await;
        self.stop().await;
    }

    async fn stop(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        // Bounded: a log phase that never returns must not keep the process up.
        let settled = self.proxy.pending_logs().settled();
        if tokio::time::timeout(std::time::Duration::from_secs(10), settled)
            .await
            .is_err()
        {
            tracing::warn!(
                "log phases still under way at shutdown; closing the audit log without them"
            );
        }
        if let Some(m) = &self.migration {
            m.flush().await;
        }
        if let Some(audit) = self.reloader.current().registry.audit_log() {
            audit.close().await;
        }
    }
}

/// After a takeover, how long the old process goes on answering its open connections
/// with `Connection: close` before it closes what is idle: long enough for every busy
/// HTTP/1 client to get one answer that tells it to move.
pub const TAKEOVER_CLOSE_AFTER: Duration = Duration::from_secs(1);

/// Binds the listeners and starts serving. Port 0 in the config binds any free port;
/// [`Running`] says which.
pub async fn start(config: ValidConfig, mut options: StartOptions) -> Result<Running, StartError> {
    let prometheus = telemetry::install();
    let inherited = options.inherited.take();
    let bind = |role, address| {
        server::bind(address, config.listener.backlog).map_err(|source| StartError::Bind {
            role,
            address,
            source,
        })
    };
    let adopt = |role, address: SocketAddr, socket: std::net::TcpListener| {
        let failed = |source| StartError::Bind {
            role,
            address,
            source,
        };
        let at = socket.local_addr().map_err(failed)?;
        if address.port() != 0 && at != address {
            return Err(StartError::TakeoverAddress {
                role,
                configured: address,
                inherited: at,
            });
        }
        socket.set_nonblocking(true).map_err(failed)?;
        tokio::net::TcpListener::from_std(socket).map_err(failed)
    };
    let (proxy_listener, admin_listener) = match inherited {
        Some((proxy, admin)) => (
            adopt("listener", config.listener_addr(), proxy)?,
            adopt("admin", config.admin_addr(), admin)?,
        ),
        None => (
            bind("listener", config.listener_addr())?,
            bind("admin", config.admin_addr())?,
        ),
    };
    let dup = |l: &tokio::net::TcpListener, role, address| {
        l.as_fd()
            .try_clone_to_owned()
            .map_err(|source| StartError::Bind {
                role,
                address,
                source,
            })
    };
    let sockets = [
        dup(&proxy_listener, "listener", config.listener_addr())?,
        dup(&admin_listener, "admin", config.admin_addr())?,
    ];
    let proxy_addr = proxy_listener
        .local_addr()
        .expect("a bound socket has an address");
    let admin_addr = admin_listener
        .local_addr()
        .expect("a bound socket has an address");
    let certificates = match &config.listener.tls {
        Some(tls) => Some((
            server::Certificates::load(&tls.cert, &tls.key)?,
            tls.reload_ms,
        )),
        None => None,
    };
    let tls = match &certificates {
        Some((certs, _)) => Some(server::tls_acceptor(certs.clone())?),
        None => None,
    };

    let config = Arc::new(config);
    let (generation, table) = reload::assemble(config.clone(), &options.filters, None)?;
    let routes = Arc::new(ArcSwap::from_pointee(table));
    let controller = match &config.migration {
        Some(m) => Some(Arc::new(Controller::new(
            m,
            &routes.load(),
            &generation.shadows,
            generation.registry.audit_log(),
        )?)),
        None => None,
    };
    let proxy = Arc::new(Proxy::new(&config, routes.clone()));
    let readiness = Arc::new(Readiness::new());
    readiness.track(&generation.clusters);
    let drain_delay_ms = config.listener.drain_delay_ms;
    let reloader = Arc::new(Reloader::new(
        generation,
        routes.clone(),
        readiness.clone(),
        controller.clone(),
        options.filters.clone(),
    ));
    let admin = Arc::new(Admin {
        routes: routes.clone(),
        prometheus: prometheus.clone(),
        token: options.admin_token.clone(),
        reloader: reloader.clone(),
        readiness: readiness.clone(),
        migration: controller.clone(),
    })
    .router(options.admin_routes.clone());

    let drain = Arc::new(Drain::default());
    let (shutdown, signal) = watch::channel(false);
    let stopped = move || {
        let mut signal = signal.clone();
        async move {
            let _ = signal.wait_for(|stop| *stop).await;
        }
    };
    let mut tasks = Vec::new();
    let serving = proxy.clone();
    tasks.push(tokio::spawn(server::serve(
        proxy_listener,
        ServerOptions {
            drain: Some(drain.clone()),
            ..ServerOptions::of_listener(&config.listener, tls)
        },
        move |req, peer, in_flight| {
            let proxy = serving.clone();
            async move { proxy.handle(req, peer, in_flight).await }
        },
        stopped(),
    )));
    tasks.push(tokio::spawn(server::serve(
        admin_listener,
        ServerOptions {
            drain: Some(drain.clone()),
            ..ServerOptions::default()
        },
        move |req, _peer, _in_flight| control::admin::serve(admin.clone(), req),
        stopped(),
    )));
    if let Some(c) = &controller {
        tasks.push(c.clone().spawn(stopped()));
    }
    let mut background = vec![telemetry::spawn_upkeep(prometheus)];
    if let Some((certs, every_ms)) = certificates.as_ref().filter(|(_, ms)| *ms > 0) {
        background.push(spawn_certificate_reload(certs.clone(), *every_ms));
    }
    if let (Some(path), true) = (config.source(), config.admin.reload.watch) {
        let watching = reloader.clone();
        let debounce = std::time::Duration::from_millis(config.admin.reload.debounce_ms);
        match config::watch_file(path, debounce, move || {
            let reloader = watching.clone();
            async move {
                reloader.reload(Trigger::Watch).await;
            }
        }) {
            Ok(task) => background.push(task),
            Err(e) => {
                tracing::warn!(error = %e, file = %path.display(), "cannot watch the config directory; reload with SIGHUP or POST /reload")
            }
        }
    }
    tasks.push(tokio::spawn({
        let stop = stopped();
        async move {
            stop.await;
            for task in background {
                task.abort();
            }
        }
    }));
    readiness.set_serving();
    tracing::info!(%proxy_addr, %admin_addr, routes = config.routes.len(), "acge-proxy serving");
    Ok(Running {
        proxy_addr,
        admin_addr,
        routes,
        migration: controller,
        proxy,
        reloader,
        readiness,
        certificates: certificates.map(|(certs, _)| certs),
        drain,
        sockets,
        drain_delay: std::time::Duration::from_millis(drain_delay_ms),
        shutdown,
        tasks,
    })
}

/// Reads the listener's certificate and key again every `every_ms`: a rotated pair
/// (a Kubernetes Secret's files swapped in place) serves new handshakes; a pair that
/// does not load is refused, logged once, and the current one keeps serving.
fn spawn_certificate_reload(
    certs: Arc<server::Certificates>,
    every_ms: u64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(every_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            reload_certificates(certs.clone()).await;
        }
    })
}

/// Reads the listener's certificate and key again (off the runtime's workers); true
/// when a new pair now serves.
async fn reload_certificates(certs: Arc<server::Certificates>) -> bool {
    match tokio::task::spawn_blocking(move || certs.reload()).await {
        Ok(Ok(true)) => {
            metrics::counter!(telemetry::TLS_RELOADS_TOTAL, "result" => "loaded").increment(1);
            tracing::info!("listener certificate reloaded");
            true
        }
        Ok(Ok(false)) | Err(_) => false,
        Ok(Err(e)) => {
            metrics::counter!(telemetry::TLS_RELOADS_TOTAL, "result" => "refused").increment(1);
            tracing::warn!(error = %e, "listener certificate not reloaded; the current one stays");
            false
        }
    }
}
