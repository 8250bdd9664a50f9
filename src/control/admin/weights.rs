//! `GET /weights` and `PUT /routes/{name}/weights`.
//!
//! A new weight applies to the next request; nothing in flight is disturbed. On a route
//! the migration controller walks, a manual weight pauses the controller, and the
//! reply's `migration` field says so.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::response::Response;
use http::StatusCode;
use serde_json::json;

use super::{reply, Admin};

pub async fn list(State(admin): State<Arc<Admin>>) -> Response {
    let routes: serde_json::Map<String, serde_json::Value> = admin
        .routes
        .load()
        .iter()
        .map(|r| {
            let green = r.splitter.green_weight();
            (
                r.name.to_string(),
                json!({"blue": 100 - green, "green": green}),
            )
        })
        .collect();
    reply::ok(json!({ "routes": routes }))
}

pub async fn set(
    State(admin): State<Arc<Admin>>,
    Path(name): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let routes = admin.routes.load();
    let Some(route) = routes.get(&name) else {
        return reply::error(
            StatusCode::NOT_FOUND,
            "unknown_route",
            format!("no route named `{name}`"),
        );
    };
    let body = match reply::body(body) {
        Ok(body) => body,
        Err(refusal) => return *refusal,
    };
    let green = match parse_weight_body(&body) {
        Ok(green) => green,
        Err(detail) => return reply::error(StatusCode::BAD_REQUEST, "bad_weight", detail),
    };
    let previous = route.splitter.green_weight();
    route.set_green_weight(green);
    tracing::info!(route = %route.name, previous, green, "green weight changed through the admin API");
    let mut body = json!({
        "route": &*route.name,
        "blue": 100 - green,
        "green": green,
        "previous": {"blue": 100 - previous, "green": previous},
    });
    if let Some(note) = admin
        .migration
        .as_ref()
        .and_then(|m| m.weight_set_by_operator(&name, green))
    {
        body["migration"] = json!(note);
    }
    reply::ok(body)
}

/// `{"green": N}` with N an integer percentage; anything else says what is wrong.
fn parse_weight_body(body: &[u8]) -> Result<u8, String> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| format!("the body is not JSON: {e}; send {{\"green\": 25}}"))?;
    let object = value
        .as_object()
        .ok_or_else(|| "the body must be a JSON object like {\"green\": 25}".to_string())?;
    if let Some(extra) = object.keys().find(|k| k.as_str() != "green") {
        return Err(format!("unknown field `{extra}`; send {{\"green\": 25}}"));
    }
    let green = object
        .get("green")
        .ok_or_else(|| "missing field `green`; send {\"green\": 25}".to_string())?;
    match green.as_u64() {
        Some(n) if n <= 100 => Ok(u8::try_from(n).expect("at most 100")),
        _ => Err(format!(
            "green: {green} is not a percentage (an integer 0–100)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_bodies_are_checked() {
        assert_eq!(parse_weight_body(br#"{"green": 25}"#), Ok(25));
        assert_eq!(parse_weight_body(br#"{"green": 0}"#), Ok(0));
        assert_eq!(parse_weight_body(br#"{"green": 100}"#), Ok(100));
        for bad in [
            &br#"{"green": 101}"#[..],
            br#"{"green": -1}"#,
            br#"{"green": 2.5}"#,
            br#"{"green": "5"}"#,
            br#"{}"#,
            br#"[5]"#,
            b"green=5",
            br#"{"green": 5, "blue": 95}"#,
        ] {
            assert!(
                parse_weight_body(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
