//! Who may change things: the bearer token for mutations, and the layer that asks for
//! it. Reads (`GET`, `HEAD`) are open on the admin listener (loopback by default);
//! every other method needs `Authorization: Bearer <token>`, compared in constant time.
//! With no token configured, mutations are refused (403): the API is never open.

use std::path::PathBuf;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::header::{HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
use http::{Method, StatusCode};
use subtle::ConstantTimeEq;

use super::reply;
use crate::config::Config;

/// Where the bearer token for mutations comes from.
#[derive(Debug, Clone)]
pub enum TokenSource {
    /// No token: every mutation is refused with 403.
    None,
    /// Read on every mutation, so a rotated secret applies at once.
    File(PathBuf),
    /// Fixed for the life of the process (`ACGE_ADMIN_TOKEN`, or the demo's own).
    Fixed(String),
}

impl TokenSource {
    /// `admin.token_file` when configured, else `ACGE_ADMIN_TOKEN` when set, else none.
    pub fn from_config(config: &Config) -> Self {
        if let Some(path) = &config.admin.token_file {
            return TokenSource::File(path.clone());
        }
        match std::env::var("ACGE_ADMIN_TOKEN") {
            Ok(token) if !token.trim().is_empty() => TokenSource::Fixed(token.trim().to_string()),
            _ => TokenSource::None,
        }
    }

    /// `none`, `file` or `fixed`, for the config dump (never the token).
    pub fn describe(&self) -> &'static str {
        match self {
            TokenSource::None => "none",
            TokenSource::File(_) => "file",
            TokenSource::Fixed(_) => "fixed",
        }
    }

    /// The token now, or why there is none.
    fn current(&self) -> Result<String, String> {
        match self {
            TokenSource::None => Err(
                "no admin token is configured (admin.token_file or ACGE_ADMIN_TOKEN); mutations are disabled".into(),
            ),
            TokenSource::File(path) => match std::fs::read_to_string(path) {
                Ok(token) if !token.trim().is_empty() => Ok(token.trim().to_string()),
                Ok(_) => Err(format!("the admin token file {} is empty; mutations are disabled", path.display())),
                Err(e) => Err(format!(
                    "the admin token file {} cannot be read ({e}); mutations are disabled",
                    path.display()
                )),
            },
            TokenSource::Fixed(token) => Ok(token.clone()),
        }
    }

    /// The refusal for a request that may not mutate, or None when it may.
    fn refuse(&self, request: &Request) -> Option<Response> {
        let expected = match self.current() {
            Ok(token) => token,
            Err(why) => {
                return Some(reply::error(
                    StatusCode::FORBIDDEN,
                    "mutations_disabled",
                    why,
                ));
            }
        };
        let presented = request
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .map(|t| t.trim_ascii());
        if presented.is_some_and(|t| bool::from(t.ct_eq(expected.as_bytes()))) {
            return None;
        }
        let detail = if presented.is_some() {
            "the bearer token is not the admin token"
        } else {
            "send Authorization: Bearer <admin token>"
        };
        let mut res = reply::error(StatusCode::UNAUTHORIZED, "unauthorized", detail);
        res.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"acge-admin\""),
        );
        Some(res)
    }
}

/// The layer over every admin route: mutations need the token.
pub async fn require_token(
    State(token): State<TokenSource>,
    request: Request,
    next: Next,
) -> Response {
    if matches!(*request.method(), Method::GET | Method::HEAD) {
        return next.run(request).await;
    }
    match token.refuse(&request) {
        Some(refusal) => refusal,
        None => next.run(request).await.into_response(),
    }
}
