//! `GET /config_dump`: the running config, with the weights as they are now, its
//! generation, SHA-256 and file, and without secrets (the admin token is never in the
//! config; the dump says only where it comes from).

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;
use serde_json::json;

use super::{reply, Admin};

pub async fn dump(State(admin): State<Arc<Admin>>) -> Response {
    let generation = admin.reloader.current();
    let mut config = serde_json::to_value(&**generation.config)
        .unwrap_or_else(|e| json!({"error": e.to_string()}));
    let routes = admin.routes.load();
    // The weights in the file are only where the proxy started.
    if let Some(list) = config.get_mut("routes").and_then(|r| r.as_array_mut()) {
        for route in list {
            let current = route
                .get("name")
                .and_then(|n| n.as_str())
                .and_then(|n| routes.get(n))
                .map(|r| r.splitter.green_weight());
            if let Some(weight) = current {
                route["green_weight"] = json!(weight);
            }
        }
    }
    config["admin"]["token_source"] = json!(admin.token.describe());
    config["generation"] = json!({
        "number": generation.number,
        "sha256": generation.sha256,
        "file": generation.config.source().map(|p| p.display().to_string()),
    });
    reply::ok(config)
}
