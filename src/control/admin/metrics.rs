//! `GET /metrics`: the Prometheus text format.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::header::{HeaderValue, CONTENT_TYPE};

use super::Admin;

pub async fn scrape(State(admin): State<Arc<Admin>>) -> Response {
    (
        [(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        admin.prometheus.render(),
    )
        .into_response()
}
