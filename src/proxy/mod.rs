//! The data plane, in the order a request meets it: [`server`] (listeners, TLS,
//! limits, drain), [`ingress`] (the trust boundary), [`exchange`] (one pipeline for
//! every route), [`route`] (matching, and each route's handles), [`split`] (blue or
//! green), [`upstream`] (pool, hygiene, timeouts), [`log`] (the end of an exchange),
//! with [`error`] the one place failures become answers and [`body`] the one body type.
//!
//! Nothing here imports the control plane or the demo: the migration's mirror plugs
//! in through [`route::Mirror`], and the route table is swapped whole by whoever owns
//! it ([`Proxy::routes`]).

pub mod body;
pub mod error;
mod exchange;
pub mod ingress;
mod log;
pub mod path;
pub mod route;
pub mod server;
pub mod split;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::header::HeaderValue;
use http::{Request, Response};
use hyper::body::Incoming;

use body::Budget;
pub use body::{empty_body, full, full_body, local, Body, BoxError};
use ingress::Ingress;
pub use log::{LoggedBody, PendingLogs};
use route::RouteTable;
use server::InFlight;

use crate::config::ValidConfig;

/// The request path's shared state: read on every request, never locked.
pub struct Proxy {
    routes: Arc<ArcSwap<RouteTable>>,
    ingress: Ingress,
    budget: Arc<Budget>,
    body_timeout: Duration,
    forwarded_proto: HeaderValue,
    pending_logs: Arc<PendingLogs>,
}

impl Proxy {
    pub fn new(config: &ValidConfig, routes: Arc<ArcSwap<RouteTable>>) -> Self {
        let listener = &config.listener;
        Self {
            routes,
            ingress: Ingress::new(listener),
            budget: Budget::new(listener.max_buffered_bytes),
            body_timeout: Duration::from_millis(listener.body_read_timeout_ms),
            forwarded_proto: HeaderValue::from_static(if listener.tls.is_some() {
                "https"
            } else {
                "http"
            }),
            pending_logs: Arc::new(PendingLogs::default()),
        }
    }

    /// Serves one admitted request.
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
        in_flight: InFlight,
    ) -> Response<LoggedBody> {
        exchange::run(self, req, peer, in_flight).await
    }

    /// The log phases still under way (shutdown waits for them).
    pub fn pending_logs(&self) -> &Arc<PendingLogs> {
        &self.pending_logs
    }

    /// Bytes of request and response bodies held whole right now.
    pub fn buffered_bytes(&self) -> u64 {
        self.budget.held()
    }
}
