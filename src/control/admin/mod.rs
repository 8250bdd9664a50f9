//! The admin API, on its own listener (127.0.0.1:15000 by default), as a tower service:
//! an axum router, the token layer ([`auth`]), a body limit; one file per resource.
//!
//! | method, path                   | what                                                  |
//! | ------------------------------ | ----------------------------------------------------- |
//! | `GET /`                        | this list, as JSON                                    |
//! | `GET /live`                    | 200 while the process serves                          |
//! | `GET /ready`                   | 200 once the listeners serve, the models are loaded and every cluster that takes traffic has been reached; 503 with what it waits for |
//! | `GET /metrics`                 | Prometheus text format                                |
//! | `GET /weights`                 | `{"routes": {"auth": {"blue": 95, "green": 5}}}`      |
//! | `PUT /routes/{name}/weights`   | body `{"green": 25}`; needs the bearer token          |
//! | `GET /config_dump`             | the running config, current weights, its generation and SHA-256, no secrets |
//! | `POST /reload`                 | reads the config file again and swaps it in (or says why not); needs the token |
//! | `GET /migration`               | the migration controller's state, per route           |
//! | `POST /migration/{r}/{action}` | pause, resume, promote, rollback; needs the token     |
//! | `GET /audit/checkpoint`        | the audit log's latest signed checkpoint (c2sp note)  |
//!
//! Mutations (any method but `GET` and `HEAD`) need `Authorization: Bearer <token>`,
//! compared in constant time; with no token configured they are refused (403). Bodies
//! are at most 64 KiB. Every error is JSON. A program that embeds the proxy (the demo)
//! adds routes of its own through [`crate::StartOptions::admin_routes`]; they get the
//! same token layer. This module reads and sets route weights; it does not own them
//! (the route table does).

mod audit;
mod auth;
mod config_dump;
mod health;
mod metrics;
mod migration;
mod reload;
mod reply;
mod weights;

use std::sync::Arc;

use arc_swap::ArcSwap;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post, put};
use axum::Router;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use metrics_exporter_prometheus::PrometheusHandle;
use tower::ServiceExt;

pub use auth::TokenSource;
pub use health::Readiness;
pub use reply::{body as read_body, error as json_error_response, ok as json_ok, MAX_BODY};

use crate::config::reload::Reloader;
use crate::control::migration::Controller;
use crate::proxy::route::RouteTable;
use crate::proxy::Body;

/// What the admin API reads and changes.
pub struct Admin {
    pub(crate) routes: Arc<ArcSwap<RouteTable>>,
    pub(crate) prometheus: PrometheusHandle,
    pub(crate) token: TokenSource,
    /// The running config and what was built from it; swaps in reloaded ones.
    pub(crate) reloader: Arc<Reloader>,
    pub(crate) readiness: Arc<Readiness>,
    pub(crate) migration: Option<Arc<Controller>>,
}

impl Admin {
    /// The router: every endpoint above, then `extra` (each with the same token layer
    /// and body limit), JSON for unknown paths and methods.
    pub fn router(self: Arc<Self>, extra: Vec<Router>) -> Router {
        let token = self.token.clone();
        let mut router = Router::new()
            .route("/", get(health::index))
            .route("/live", get(health::live))
            .route("/ready", get(health::ready))
            .route("/metrics", get(metrics::scrape))
            .route("/weights", get(weights::list))
            .route("/routes/{name}/weights", put(weights::set))
            .route("/config_dump", get(config_dump::dump))
            .route("/reload", post(reload::reload))
            .route("/migration", get(migration::status))
            .route("/migration/{route}/{action}", post(migration::act))
            .route("/audit/checkpoint", get(audit::checkpoint))
            .with_state(self);
        for more in extra {
            router = router.merge(more);
        }
        router
            .method_not_allowed_fallback(reply::method_not_allowed)
            .fallback(reply::not_found)
            .route_layer(axum::middleware::from_fn_with_state(
                token,
                auth::require_token,
            ))
            .layer(DefaultBodyLimit::max(MAX_BODY))
    }
}

/// Serves one request with `router` (for the admin listener).
pub async fn serve(router: Router, req: Request<Incoming>) -> Response<Body> {
    let res = router
        .oneshot(req)
        .await
        .unwrap_or_else(|never| match never {});
    res.map(|body| body.map_err(Into::into).boxed_unsync())
}
