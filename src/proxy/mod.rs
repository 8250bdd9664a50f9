//! One request's life: route → filter chain (request) → split → upstream → filter chain
//! (response) → log, with the header hygiene of a well-behaved intermediary.
//!
//! Bodies stream both ways unless a filter on the route asks for one whole (bounded by
//! the route's `max_body_bytes`, 413 beyond it). A route without filters takes a path
//! with no buffering and no log phase at all. This module does not accept connections
//! (`server.rs`), choose weights (`split.rs`) or implement filters (`acge-filters`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use acge_filters::{json_error, Attributes, RequestCtx, ResponseCtx, Verdict};
use bytes::Bytes;
use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, HOST, TE, TRANSFER_ENCODING,
    UPGRADE,
};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

mod log;
pub mod shadow;
use log::{LogGuard, LoggedBody};

use crate::split::{Route, RouteTable, Version, OVERRIDE_HEADER};
use crate::upstream::UpstreamError;
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
        req: Request<Incoming>,
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
        let req = req.map(|body| body.map_err(Into::into).boxed_unsync());
        let (req, mirror) = match shadow::fork(&route, req, request_id).await {
            Ok(forked) => forked,
            Err(refusal) => return refusal,
        };
        let res = if route.chain.is_empty() {
            self.forward_plain(&route, req, peer, request_id, start)
                .await
        } else {
            self.forward_filtered(&route, req, peer, request_id, start)
                .await
        };
        match mirror {
            Some(mirror) => mirror.finish(res).await,
            None => res,
        }
    }

    /// A route without filters: nothing is buffered, nothing waits for a log phase.
    async fn forward_plain(
        &self,
        route: &Route,
        mut req: Request<Body>,
        peer: SocketAddr,
        request_id: &HeaderValue,
        start: Instant,
    ) -> Response<Body> {
        let version = match route.splitter.choose(req.headers()) {
            Ok(choice) => choice.version,
            Err(e) => {
                route.metrics.record(None, 400, start.elapsed());
                return local(bad_override(e));
            }
        };
        self.prepare_upstream(&mut req, peer, request_id);
        let result = route.cluster(version).send(req).await;
        let res = upstream_answer(route, version, result);
        route.observe(Some(version), res.status().as_u16(), start.elapsed(), None);
        res
    }

    /// A route with filters: request phases, split, upstream, response phases, and a
    /// log phase that runs exactly once, whenever and however the exchange ends.
    async fn forward_filtered(
        &self,
        route: &Arc<Route>,
        req: Request<Body>,
        peer: SocketAddr,
        request_id: &HeaderValue,
        start: Instant,
    ) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        let id: Arc<str> = request_id.to_str().unwrap_or_default().into();
        let mut log = LogGuard::new(route, &id, &parts.method, parts.uri.path(), start);

        let (buffered, streaming) = if route.chain.wants_body() {
            match read_body(body, &parts.headers, route.max_body_bytes).await {
                Ok(bytes) => (Some(bytes), None),
                Err(refusal) => {
                    let answer = Answer::local(refusal, None);
                    return self.finish(route, answer, Attributes::default(), log).await;
                }
            }
        } else {
            (None, Some(body))
        };
        let mut ctx = RequestCtx {
            method: parts.method.clone(),
            uri: parts.uri.clone(),
            headers: std::mem::take(&mut parts.headers),
            body: buffered,
            route: route.name.clone(),
            request_id: id,
            attributes: Attributes::default(),
        };
        if let Verdict::Respond(refusal) = route.chain.on_request(&mut ctx).await {
            let answer = Answer::local(local(refusal), None);
            return self.finish(route, answer, ctx.attributes, log).await;
        }
        parts.headers = ctx.headers;
        let version = match route.splitter.choose(&parts.headers) {
            Ok(choice) => choice.version,
            Err(e) => {
                let answer = Answer::local(local(bad_override(e)), None);
                return self.finish(route, answer, ctx.attributes, log).await;
            }
        };
        log.version(version);
        let body = match (ctx.body, streaming) {
            (Some(bytes), _) => {
                parts.headers.remove(CONTENT_LENGTH);
                full_body(bytes)
            }
            (None, Some(stream)) => stream,
            (None, None) => crate::empty_body(),
        };
        let mut upstream_req = Request::from_parts(parts, body);
        self.prepare_upstream(&mut upstream_req, peer, request_id);
        let result = route.cluster(version).send(upstream_req).await;
        let answer = match result {
            Ok(res) => Answer {
                response: res,
                from: Some(version),
                metric_version: Some(version),
            },
            Err(e) => Answer::local(upstream_answer(route, version, Err(e)), Some(version)),
        };
        self.finish(route, answer, ctx.attributes, log).await
    }

    /// Runs the response phases over an answer and hands it back with the log phase
    /// attached to the end of its body.
    async fn finish(
        &self,
        route: &Route,
        answer: Answer,
        attributes: Attributes,
        mut log: LogGuard,
    ) -> Response<Body> {
        let exchange = log.exchange();
        let (mut parts, body) = answer.response.into_parts();
        let (buffered, streaming) = match answer.from {
            Some(_) if route.chain.wants_response_body() => {
                match read_body(body, &parts.headers, route.max_body_bytes).await {
                    Ok(bytes) => (Some(bytes), None),
                    Err(_) => {
                        let refusal = json_error(
                            StatusCode::BAD_GATEWAY,
                            "upstream_response_too_large",
                            format!(
                                "the response body is over the route's {} bytes",
                                route.max_body_bytes
                            ),
                        );
                        let (p, b) = refusal.into_parts();
                        parts = p;
                        (b.into_inner(), None)
                    }
                }
            }
            _ => (None, Some(body)),
        };
        let mut res = ResponseCtx {
            status: parts.status,
            headers: std::mem::take(&mut parts.headers),
            body: buffered,
            route: route.name.clone(),
            request_id: exchange.request_id.clone(),
            method: exchange.method.clone(),
            path: exchange.path.clone(),
            version: answer.from.map(Version::as_str),
            elapsed: log.start.elapsed(),
            attributes,
        };
        route.chain.on_response(&mut res).await;
        parts.status = res.status;
        parts.headers = res.headers;
        let body = match (res.body, streaming) {
            (Some(bytes), _) => {
                // Filters may have replaced or rewritten it; hyper counts the new one.
                parts.headers.remove(CONTENT_LENGTH);
                full_body(bytes)
            }
            (None, Some(stream)) => stream,
            (None, None) => crate::empty_body(),
        };
        route.observe(
            answer.metric_version,
            parts.status.as_u16(),
            log.start.elapsed(),
            Some(&res.attributes),
        );
        log.answered(parts.status, res.attributes);
        Response::from_parts(
            parts,
            LoggedBody {
                body,
                log: Some(log),
            }
            .boxed_unsync(),
        )
    }

    /// Header hygiene for the hop to the upstream.
    fn prepare_upstream<B>(
        &self,
        req: &mut Request<B>,
        peer: SocketAddr,
        request_id: &HeaderValue,
    ) {
        let authority = req.uri().authority().cloned();
        let headers = req.headers_mut();
        strip_hop_by_hop(headers);
        append_forwarded_for(headers, peer);
        headers.insert(X_FORWARDED_PROTO, self.forwarded_proto.clone());
        headers.insert(X_REQUEST_ID, request_id.clone());
        if !headers.contains_key(HOST) {
            // HTTP/2 carries the host in :authority; an HTTP/1.1 upstream needs it as Host.
            if let Some(host) = authority.and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
                headers.insert(HOST, host);
            }
        }
    }
}

/// An answer on its way back: the upstream's, or one made here.
struct Answer {
    response: Response<Body>,
    /// The version whose upstream answered; None for a local answer.
    from: Option<Version>,
    /// The version the request went to, for metrics (set for upstream failures too).
    metric_version: Option<Version>,
}

impl Answer {
    fn local(response: Response<Body>, went_to: Option<Version>) -> Self {
        Self {
            response,
            from: None,
            metric_version: went_to,
        }
    }
}

/// The upstream's response with hop-by-hop headers dropped, or the failure as JSON.
fn upstream_answer(
    route: &Route,
    version: Version,
    result: Result<Response<Body>, UpstreamError>,
) -> Response<Body> {
    match result {
        Ok(mut res) => {
            strip_hop_by_hop(res.headers_mut());
            res
        }
        Err(e) => {
            tracing::debug!(route = %route.name, version = version.as_str(), error = %e, "upstream failed");
            route.metrics.upstream_error(version, e.kind());
            let mut res = local(json_error(e.status(), e.kind(), e.to_string()));
            // Says which version failed, as the demo backends' x-acge-backend would.
            res.headers_mut().insert(
                HeaderName::from_static(OVERRIDE_HEADER),
                HeaderValue::from_static(version.as_str()),
            );
            res
        }
    }
}

fn bad_override(e: crate::split::SplitError) -> acge_filters::LocalResponse {
    json_error(
        StatusCode::BAD_REQUEST,
        "bad_version_override",
        e.to_string(),
    )
}

pub(crate) fn full_body(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Reads a whole body, refusing with 413 past `limit` bytes (at once when the
/// declared length says so, before reading anything).
async fn read_body(body: Body, headers: &HeaderMap, limit: u64) -> Result<Bytes, Response<Body>> {
    let too_large = |size: String| {
        local(json_error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("body is {size}; the route allows {limit} bytes"),
        ))
    };
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(n) = declared.filter(|n| *n > limit) {
        return Err(too_large(format!("{n} bytes")));
    }
    // A plain loop rather than `Limited`: its error bound trips rustc's Send check
    // for futures spawned onto the runtime.
    let mut body = body;
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| {
            local(json_error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                format!("the body could not be read: {e}"),
            ))
        })?;
        if let Ok(data) = frame.into_data() {
            if (buf.len() + data.len()) as u64 > limit {
                return Err(too_large("over the limit".into()));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
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
