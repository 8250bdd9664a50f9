//! `POST /reload`: reads the config file again and swaps it in (`config/reload.rs`).
//!
//! 200 `{"result": "loaded", "generation", "sha256", "routes", "clusters",
//! "filters_rebuilt"}` or `{"result": "unchanged", …}`; 422 `config_refused` with every
//! error (field path, line, message) when the file is refused, the running config
//! still serving; 409 `no_config_file` when the config was not read from a file.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;

use super::{reply, Admin};
use crate::config::reload::Trigger;

pub async fn reload(State(admin): State<Arc<Admin>>) -> Response {
    let outcome = admin.reloader.reload(Trigger::Admin).await;
    reply::json(outcome.status(), &outcome.to_json())
}
