//! Every way the proxy can fail an exchange, and the one place each becomes an answer.
//!
//! A [`ProxyError`] knows its status, its error code (the `error` of the JSON body, and
//! a metric label) and its detail; [`ProxyError::into_response`] is the only code that
//! turns a failure into `{"error": "...", "detail": "..."}`. Filters answer with their
//! own JSON refusals ([`acge_filters::json_error`]); this module does not know them.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};
use http_body_util::Full;

use super::split::SplitError;
use super::upstream::UpstreamError;

/// Why the proxy answered an exchange itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("headers are {size} bytes; this listener allows {limit}")]
    HeadersTooLarge { size: usize, limit: usize },
    #[error("no route matches the path {path}")]
    NoRoute { path: String },
    #[error("{0}")]
    BadHost(&'static str),
    #[error("the path is not valid: {0}")]
    BadPath(&'static str),
    #[error("transfer coding `{0}` is not implemented here (only chunked is)")]
    UnsupportedTransferCoding(String),
    #[error(transparent)]
    BadOverride(#[from] SplitError),
    #[error("body is {size}; the route allows {limit} bytes")]
    PayloadTooLarge { size: String, limit: u64 },
    #[error("the body did not arrive within {0:?}")]
    BodyTimeout(Duration),
    #[error("the body could not be read: {0}")]
    BadBody(String),
    #[error("{0}")]
    Overloaded(&'static str),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("the response body is over the route's {limit} bytes")]
    ResponseTooLarge { limit: u64 },
    #[error("the upstream's body failed before it was whole: {0}")]
    UpstreamBodyCut(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::BadHost(_)
            | ProxyError::BadPath(_)
            | ProxyError::BadOverride(_)
            | ProxyError::BadBody(_) => StatusCode::BAD_REQUEST,
            ProxyError::UnsupportedTransferCoding(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::Overloaded(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Upstream(e) => e.status(),
            ProxyError::ResponseTooLarge { .. } | ProxyError::UpstreamBodyCut(_) => {
                StatusCode::BAD_GATEWAY
            }
        }
    }

    /// The `error` field of the JSON answer.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::HeadersTooLarge { .. } => "request_header_fields_too_large",
            ProxyError::NoRoute { .. } => "no_route",
            ProxyError::BadHost(_) => "bad_host",
            ProxyError::BadPath(_) => "bad_path",
            ProxyError::UnsupportedTransferCoding(_) => "unsupported_transfer_coding",
            ProxyError::BadOverride(_) => "bad_version_override",
            ProxyError::PayloadTooLarge { .. } => "payload_too_large",
            ProxyError::BodyTimeout(_) => "body_timeout",
            ProxyError::BadBody(_) => "bad_body",
            ProxyError::Overloaded(_) => "overloaded",
            ProxyError::Upstream(e) => e.kind(),
            ProxyError::ResponseTooLarge { .. } => "upstream_response_too_large",
            ProxyError::UpstreamBodyCut(_) => "upstream_body_cut",
        }
    }

    /// The JSON answer. Overload answers say when to come back.
    pub fn into_response(self) -> acge_filters::LocalResponse {
        let mut res = acge_filters::json_error(self.status(), self.code(), self.to_string());
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            res.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        res
    }
}

/// The in-flight limit's answer: [`ProxyError::Overloaded`]'s, made from constants.
/// Under a flood it is the answer sent most, and must cost next to nothing.
pub fn too_many_in_flight() -> acge_filters::LocalResponse {
    const BODY: &str =
        r#"{"error":"overloaded","detail":"too many requests in flight; try again shortly"}"#;
    let mut res = Response::new(Full::new(Bytes::from_static(BODY.as_bytes())));
    *res.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
    let headers = res.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert(RETRY_AFTER, HeaderValue::from_static("1"));
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    const TOO_MANY_IN_FLIGHT: &str = "too many requests in flight; try again shortly";

    #[tokio::test]
    async fn the_constant_overload_answer_is_the_errors_own() {
        let made = ProxyError::Overloaded(TOO_MANY_IN_FLIGHT).into_response();
        let constant = too_many_in_flight();
        assert_eq!(made.status(), constant.status());
        assert_eq!(made.headers(), constant.headers());
        let body = |r: acge_filters::LocalResponse| async move {
            let bytes = r.into_body().collect().await.unwrap().to_bytes();
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()
        };
        assert_eq!(body(made).await, body(constant).await);
    }
}
