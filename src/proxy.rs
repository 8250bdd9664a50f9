//! One request's life: route → split → upstream → response, with the header hygiene of
//! a well-behaved intermediary.
//!
//! Bodies stream both ways: the client's body is handed to the upstream client as it
//! arrives, and the upstream's body to the client. Nothing here buffers. This module
//! does not accept connections (`server.rs`) and does not choose weights (`split.rs`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use acge_filters::json_error;
use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, HOST, TE, TRANSFER_ENCODING, UPGRADE,
};
use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::split::{RouteTable, OVERRIDE_HEADER};
use crate::{local, metrics, Body};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// Headers that describe one connection, never the message (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 6] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    TE,
    TRANSFER_ENCODING,
    UPGRADE,
];

/// The request path's shared, read-only state.
pub struct Proxy {
    routes: Arc<RouteTable>,
    forwarded_proto: HeaderValue,
    max_header_bytes: usize,
}

impl Proxy {
    pub fn new(routes: Arc<RouteTable>, tls: bool, max_header_bytes: usize) -> Self {
        Self {
            routes,
            forwarded_proto: HeaderValue::from_static(if tls { "https" } else { "http" }),
            max_header_bytes,
        }
    }

    /// Serves one request. Every outcome, including each failure, is a response.
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let request_id = match req.headers().get(X_REQUEST_ID) {
            Some(id) if !id.is_empty() && id.len() <= 200 => id.clone(),
            _ => new_request_id(),
        };
        let mut res = self.forward(req, peer, &request_id).await;
        res.headers_mut().insert(X_REQUEST_ID, request_id);
        res
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        request_id: &HeaderValue,
    ) -> Response<Body> {
        let start = Instant::now();
        let header_bytes = header_block_size(req.headers());
        if header_bytes > self.max_header_bytes {
            metrics::unrouted(431);
            return local(json_error(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "request_header_fields_too_large",
                format!(
                    "headers are {header_bytes} bytes; this listener allows {}",
                    self.max_header_bytes
                ),
            ));
        }
        let Some(route) = self.routes.find(req.uri().path()).cloned() else {
            metrics::unrouted(404);
            return local(json_error(
                StatusCode::NOT_FOUND,
                "no_route",
                format!("no route matches the path {}", req.uri().path()),
            ));
        };
        let choice = match route.splitter.choose(req.headers()) {
            Ok(choice) => choice,
            Err(e) => {
                metrics::unrouted(400);
                return local(json_error(
                    StatusCode::BAD_REQUEST,
                    "bad_version_override",
                    e.to_string(),
                ));
            }
        };

        let headers = req.headers_mut();
        strip_hop_by_hop(headers);
        append_forwarded_for(headers, peer);
        headers.insert(X_FORWARDED_PROTO, self.forwarded_proto.clone());
        headers.insert(X_REQUEST_ID, request_id.clone());
        if !headers.contains_key(HOST) {
            // HTTP/2 carries the host in :authority; an HTTP/1.1 upstream needs it as Host.
            if let Some(host) = req
                .uri()
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            {
                req.headers_mut().insert(HOST, host);
            }
        }

        let upstream_req = req.map(|body| body.map_err(Into::into).boxed_unsync());
        let result = route.cluster(choice.version).send(upstream_req).await;
        let elapsed = start.elapsed();
        match result {
            Ok(mut res) => {
                strip_hop_by_hop(res.headers_mut());
                route
                    .metrics
                    .record(choice.version, res.status().as_u16(), elapsed);
                res
            }
            Err(e) => {
                tracing::debug!(route = %route.name, version = choice.version.as_str(), error = %e, "upstream failed");
                route.metrics.upstream_error(choice.version, e.kind());
                route
                    .metrics
                    .record(choice.version, e.status().as_u16(), elapsed);
                let mut res = local(json_error(e.status(), e.kind(), e.to_string()));
                // Says which version failed, as the demo backends' x-acge-backend would.
                res.headers_mut().insert(
                    HeaderName::from_static(OVERRIDE_HEADER),
                    HeaderValue::from_static(choice.version.as_str()),
                );
                res
            }
        }
    }
}

/// Removes the hop-by-hop headers and those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Appends the client's address to `x-forwarded-for`, folding any earlier hops into one
/// comma-separated value.
fn append_forwarded_for(headers: &mut HeaderMap, peer: SocketAddr) {
    let ip = peer.ip().to_canonical().to_string();
    let mut value = String::new();
    for earlier in headers.get_all(&X_FORWARDED_FOR) {
        if let Ok(s) = earlier.to_str() {
            value.push_str(s);
            value.push_str(", ");
        }
    }
    value.push_str(&ip);
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(X_FORWARDED_FOR, v);
    }
}

/// The size of the header block as HTTP/1.1 would send it (`name: value\r\n`).
fn header_block_size(headers: &HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum()
}

fn new_request_id() -> HeaderValue {
    let mut buf = uuid::Uuid::encode_buffer();
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    HeaderValue::from_str(id).expect("a hyphenated UUID is a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(CONNECTION, "close, x-secret-hop".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert(TE, "trailers".parse().unwrap());
        h.insert(UPGRADE, "websocket".parse().unwrap());
        h.insert("proxy-connection", "keep-alive".parse().unwrap());
        h.insert(TRANSFER_ENCODING, "chunked".parse().unwrap());
        h.insert("x-keep", "yes".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-keep"], "yes");
    }

    #[test]
    fn forwarded_for_folds_earlier_hops() {
        let mut h = HeaderMap::new();
        h.append(X_FORWARDED_FOR, "10.0.0.1".parse().unwrap());
        h.append(X_FORWARDED_FOR, "10.0.0.2, 10.0.0.3".parse().unwrap());
        append_forwarded_for(&mut h, "127.0.0.9:5555".parse().unwrap());
        assert_eq!(h.get_all(X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(
            h[X_FORWARDED_FOR],
            "10.0.0.1, 10.0.0.2, 10.0.0.3, 127.0.0.9"
        );
    }
}
