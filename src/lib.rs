//! acge-proxy: a sidecar L7 proxy that moves a service's traffic from its legacy
//! **blue** version to its ACGE-backed **green** version.
//!
//! A request flows one way: [`server`] accepts it, [`proxy`] finds its route, [`split`]
//! picks blue or green, [`upstream`] forwards it, and the answer streams back.
//! [`admin`] serves the operator's API, [`metrics`] owns every metric name, and
//! [`demo`] runs the seven services in both versions for `acge-proxy demo`.
//! [`start`] wires these together from a validated [`config::Config`].

pub mod admin;
pub mod config;
pub mod demo;
pub mod eval;
pub mod metrics;
pub mod migration;
pub mod proxy;
pub mod server;
pub mod split;
pub mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Response;
use http_body_util::{BodyExt, Empty, Full};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use acge_filters::acge::filter::AcgeFilter;
use acge_filters::audit::{AuditFilter, AuditLog};
use acge_filters::hash::HashFilter;
use acge_filters::{Chain, Filter};

use crate::admin::{Admin, TokenSource};
use crate::config::Config;
use crate::server::ServerOptions;
use crate::split::RouteTable;
use crate::upstream::Cluster;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of everything the proxy sends or receives: streamed, boxed once.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A locally made response, in the proxy's body type.
pub fn local(res: acge_filters::LocalResponse) -> Response<Body> {
    res.map(|b| b.map_err(|never| match never {}).boxed_unsync())
}

pub fn full(bytes: Bytes) -> Response<Body> {
    Response::new(
        Full::new(bytes)
            .map_err(|never| match never {})
            .boxed_unsync(),
    )
}

pub fn empty_body() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

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
    Tls(#[from] server::TlsError),
    #[error("filters.audit: {0}")]
    Audit(#[from] acge_filters::audit::AuditError),
    #[error("constitution.hash: {0}")]
    Hash(#[from] http::header::InvalidHeaderValue),
    #[error("filters.acge: {0}")]
    Acge(#[from] acge_filters::acge::filter::AcgeLoadError),
    #[error("{0}")]
    Migration(#[from] migration::MigrationError),
}

/// How to start, beyond the config file.
#[derive(Clone)]
pub struct StartOptions {
    pub admin_token: TokenSource,
    /// Filters of your own, by the name routes list them under (for a program that
    /// embeds acge-proxy; see docs/filters.md). They are looked up before the
    /// built-in ones. Config validation knows only the built-in names, so add these
    /// names to `RouteConfig::filters` after loading.
    pub filters: Vec<(String, Arc<dyn Filter>)>,
    /// The demo backends' faults, served as `PUT /demo/faults` on the admin port (the
    /// demo sets it; nothing else should).
    pub demo_faults: Option<Arc<demo::Faults>>,
}

impl StartOptions {
    pub fn new(admin_token: TokenSource) -> Self {
        Self {
            admin_token,
            filters: Vec::new(),
            demo_faults: None,
        }
    }
}

/// A started proxy: its bound addresses, its routes, and the handle to stop it.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub routes: Arc<RouteTable>,
    /// The audit log, when a route runs the audit filter.
    pub audit: Option<Arc<AuditLog>>,
    /// The migration controller, when the config has a `migration` section.
    pub migration: Option<Arc<migration::Controller>>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, drains in-flight requests (up to the drain timeout), then
    /// writes what the audit log still holds and signs its last checkpoint.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
        if let Some(audit) = self.audit {
            audit.close().await;
        }
    }
}

/// The filters this config runs, built once and shared by every route that lists them.
struct Filters {
    hash: Option<Arc<HashFilter>>,
    acge: Option<Arc<AcgeFilter>>,
    audit: Option<(Arc<AuditLog>, Arc<AuditFilter>)>,
}

impl Filters {
    fn build(config: &Config) -> Result<Self, StartError> {
        let hash = if config.uses_filter("constitutional_hash") {
            let settings = config
                .filters
                .constitutional_hash
                .clone()
                .unwrap_or_default();
            Some(Arc::new(HashFilter::new(
                &config.constitution.hash,
                &settings,
            )?))
        } else {
            None
        };
        let acge = match (&config.filters.acge, config.uses_filter("acge")) {
            (Some(settings), true) => Some(Arc::new(AcgeFilter::load(
                settings,
                &config.constitution.hash,
            )?)),
            _ => None,
        };
        let audit = match (&config.filters.audit, config.uses_filter("audit")) {
            (Some(settings), true) => {
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
        Ok(Self { hash, acge, audit })
    }

    fn chain(&self, route: &config::RouteConfig, custom: &[(String, Arc<dyn Filter>)]) -> Chain {
        let filters = route
            .filters
            .iter()
            .filter_map(|name| -> Option<Arc<dyn Filter>> {
                if let Some((_, f)) = custom.iter().find(|(n, _)| n == name) {
                    return Some(f.clone());
                }
                match name.as_str() {
                    "constitutional_hash" => self.hash.clone().map(|f| f as Arc<dyn Filter>),
                    "acge" => self.acge.clone().map(|f| f as Arc<dyn Filter>),
                    "audit" => self
                        .audit
                        .as_ref()
                        .map(|(_, f)| f.clone() as Arc<dyn Filter>),
                    _ => None,
                }
            })
            .collect();
        Chain::new(filters)
    }
}

/// Binds the listeners and starts serving. Port 0 in the config binds any free port;
/// [`Running`] says which.
pub async fn start(config: Config, options: StartOptions) -> Result<Running, StartError> {
    let prometheus = metrics::install();
    let bind = |role, address| async move {
        TcpListener::bind(address)
            .await
            .map_err(|source| StartError::Bind {
                role,
                address,
                source,
            })
    };
    let proxy_listener = bind("listener", config.listener_addr()).await?;
    let admin_listener = bind("admin", config.admin_addr()).await?;
    let proxy_addr = proxy_listener
        .local_addr()
        .expect("a bound socket has an address");
    let admin_addr = admin_listener
        .local_addr()
        .expect("a bound socket has an address");

    let tls = match &config.listener.tls {
        Some(tls) => Some(server::tls_acceptor(&tls.cert, &tls.key)?),
        None => None,
    };
    let clusters: HashMap<String, Arc<Cluster>> = config
        .clusters
        .iter()
        .map(|(name, c)| (name.clone(), Arc::new(Cluster::new(name, c))))
        .collect();
    let filters = Filters::build(&config)?;
    let routes = Arc::new(RouteTable::new(
        &config.routes,
        &clusters,
        config.migration.as_ref(),
        |r| filters.chain(r, &options.filters),
    ));
    let audit_log = filters.audit.as_ref().map(|(log, _)| log.clone());
    let controller = match &config.migration {
        Some(m) => Some(Arc::new(migration::Controller::new(
            m,
            &routes,
            audit_log.clone(),
        )?)),
        None => None,
    };
    let proxy = Arc::new(proxy::Proxy::new(
        routes.clone(),
        tls.is_some(),
        config.listener.max_header_bytes,
    ));
    let admin = Arc::new(Admin::new(
        routes.clone(),
        prometheus.clone(),
        options.admin_token,
        config.clone(),
        controller.clone(),
        options.demo_faults.clone(),
    ));

    let (shutdown, signal) = watch::channel(false);
    let stopped = move || {
        let mut signal = signal.clone();
        async move {
            let _ = signal.wait_for(|stop| *stop).await;
        }
    };
    let proxy_options = ServerOptions {
        tls,
        max_header_bytes: config.listener.max_header_bytes,
        header_read_timeout: Duration::from_millis(config.listener.header_read_timeout_ms),
        drain_timeout: Duration::from_millis(config.listener.drain_timeout_ms),
    };
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(server::serve(
        proxy_listener,
        proxy_options,
        move |req, peer| {
            let proxy = proxy.clone();
            async move { proxy.handle(req, peer).await }
        },
        stopped(),
    )));
    let admin_for_server = admin.clone();
    tasks.push(tokio::spawn(server::serve(
        admin_listener,
        ServerOptions::default(),
        move |req, _peer| {
            let admin = admin_for_server.clone();
            async move { admin.handle(req).await }
        },
        stopped(),
    )));
    if let Some(c) = &controller {
        tasks.push(c.clone().spawn(stopped()));
    }
    let upkeep = metrics::spawn_upkeep(prometheus);
    tasks.push(tokio::spawn({
        let stop = stopped();
        async move {
            stop.await;
            upkeep.abort();
        }
    }));
    admin.set_ready();
    tracing::info!(%proxy_addr, %admin_addr, routes = routes.iter().count(), "acge-proxy serving");
    Ok(Running {
        proxy_addr,
        admin_addr,
        routes,
        audit: audit_log,
        migration: controller,
        shutdown,
        tasks,
    })
}
