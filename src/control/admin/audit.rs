//! `GET /audit/checkpoint`: the audit log's latest signed tree head, as a
//! c2sp.org/tlog-checkpoint signed note, for collectors and witnesses to keep outside
//! the pod (`acge-proxy audit verify --trusted` checks a log against what they kept).

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::header::{HeaderValue, CONTENT_TYPE};
use http::StatusCode;

use super::{reply, Admin};

pub async fn checkpoint(State(admin): State<Arc<Admin>>) -> Response {
    let Some(log) = admin.reloader.current().registry.audit_log() else {
        return reply::error(
            StatusCode::NOT_FOUND,
            "no_audit_log",
            "no route runs the audit filter",
        );
    };
    match log.latest_checkpoint() {
        Some(note) => (
            [(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            )],
            note,
        )
            .into_response(),
        None => reply::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_checkpoint_yet",
            "the audit log has signed no checkpoint yet",
        ),
    }
}
