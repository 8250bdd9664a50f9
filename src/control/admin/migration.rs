//! `GET /migration` and `POST /migration/{route}/{action}`: the controller's state per
//! route, and the operator's pause, resume, promote and rollback.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::Response;
use http::StatusCode;

use super::{reply, Admin};
use crate::control::migration::{Action, ActionError};

fn no_controller() -> Response {
    reply::error(
        StatusCode::NOT_FOUND,
        "no_migration",
        "this proxy runs no migration controller (the config has no `migration` section)",
    )
}

pub async fn status(State(admin): State<Arc<Admin>>) -> Response {
    match &admin.migration {
        Some(m) => reply::ok(m.status()),
        None => no_controller(),
    }
}

pub async fn act(
    State(admin): State<Arc<Admin>>,
    Path((name, action)): Path<(String, String)>,
) -> Response {
    let Some(m) = &admin.migration else {
        return no_controller();
    };
    let Some(action) = Action::parse(&action) else {
        return reply::error(
            StatusCode::NOT_FOUND,
            "unknown_action",
            format!("`{action}` is not an action; use pause, resume, promote or rollback"),
        );
    };
    match m.act(&name, action) {
        Ok(status) => reply::ok(status),
        Err(e @ ActionError::UnknownRoute(_)) => {
            reply::error(StatusCode::NOT_FOUND, "unknown_route", e.to_string())
        }
        Err(e @ ActionError::NotNow(_)) => {
            reply::error(StatusCode::CONFLICT, "not_now", e.to_string())
        }
    }
}
