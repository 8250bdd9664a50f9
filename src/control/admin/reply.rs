//! The admin API's answers: JSON bodies, JSON errors, and the refusals for paths and
//! methods it does not serve.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::response::{IntoResponse, Response};
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, StatusCode, Uri};

/// Largest admin request body; weight changes are a few bytes.
pub const MAX_BODY: usize = 64 * 1024;

pub fn json(status: StatusCode, value: &serde_json::Value) -> Response {
    (
        status,
        [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
        value.to_string(),
    )
        .into_response()
}

pub fn ok(value: serde_json::Value) -> Response {
    json(StatusCode::OK, &value)
}

/// `{"error": ..., "detail": ...}` with `status`.
pub fn error(status: StatusCode, error: &str, detail: impl AsRef<str>) -> Response {
    json(
        status,
        &serde_json::json!({"error": error, "detail": detail.as_ref()}),
    )
}

/// A mutation's body, or the JSON refusal for one that is too large or broken.
pub fn body(body: Result<Bytes, BytesRejection>) -> Result<Bytes, Box<Response>> {
    body.map_err(|e| {
        Box::new(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "bad_body",
            format!("cannot read the body ({e}); at most {MAX_BODY} bytes"),
        ))
    })
}

pub async fn not_found(uri: Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no admin endpoint at {}; GET / lists them", uri.path()),
    )
}

pub async fn method_not_allowed(method: Method) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed here; the Allow header says what is"),
    )
}
