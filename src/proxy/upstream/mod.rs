//! Sending a request to a cluster and bringing its answer back: endpoint choice, the
//! connection pool ([`pool`]), header hygiene both ways ([`headers`]), timeouts, and the
//! mapping of failures to statuses ([`UpstreamError`]).
//!
//! The request that leaves is built here from the exchange's request head (as the
//! filters left it), so every request — a client's, a mirrored copy, a replay — gets the
//! same hygiene. The timeout runs from the end of the request (its body sent) to the
//! response head, so a slow upload does not eat the upstream's time. A request that
//! meets a pooled connection the upstream has just closed is sent again on another one
//! when it was never written, or when it is idempotent and bodyless. This module does
//! not decide which cluster serves a request; `split.rs` does.

mod error;
pub mod headers;
mod pool;
pub mod tls;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use acge_filters::RequestHead;
use bytes::Bytes;
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1;
use tokio::sync::oneshot;

pub use error::{UpstreamError, BODY_CUT};
pub use headers::Forwarded;
use pool::{Endpoint, Limits, Pool};

use crate::config::{parse_endpoint, ClusterConfig, Protocol};
use crate::proxy::{Body, BoxError};

/// A request whose pooled connection turned out to be closed is sent again on another
/// connection this many times.
const MAX_STALE_RETRIES: usize = 3;

/// Idle HTTP/1.1 connections kept per endpoint at most.
const MAX_IDLE_PER_ENDPOINT: usize = 1024;

/// One named group of endpoints, each with its own connections.
pub struct Cluster {
    pub name: String,
    endpoints: Vec<Arc<Endpoint>>,
    next: AtomicUsize,
    protocol: Protocol,
    /// `https` when the cluster has TLS (the HTTP/2 `:scheme`).
    scheme: Scheme,
    timeout: Duration,
    pool: Arc<Pool>,
    failures: FailureLog,
}

impl Cluster {
    /// Builds a cluster from a validated config; loads its TLS files, and starts
    /// reading them again every `tls.reload_ms`.
    pub fn new(name: &str, config: &ClusterConfig) -> Result<Self, crate::proxy::server::TlsError> {
        let idle = config.max_connections.min(MAX_IDLE_PER_ENDPOINT);
        let tls = match &config.tls {
            Some(t) => {
                let tls = tls::UpstreamTls::load(name, t, config.protocol)?;
                if t.reload_ms > 0 {
                    tls::spawn_reload(Arc::downgrade(&tls), Duration::from_millis(t.reload_ms));
                }
                Some(tls)
            }
            None => None,
        };
        Ok(Self {
            name: name.to_string(),
            endpoints: config
                .endpoints
                .iter()
                .filter_map(|e| parse_endpoint(e).ok())
                .map(|authority| Arc::new(Endpoint::new(authority, idle)))
                .collect(),
            next: AtomicUsize::new(0),
            protocol: config.protocol,
            scheme: if tls.is_some() {
                Scheme::HTTPS
            } else {
                Scheme::HTTP
            },
            timeout: Duration::from_millis(config.timeout_ms),
            pool: Arc::new(Pool::new(
                name,
                Limits {
                    connect_timeout: Duration::from_millis(config.connect_timeout_ms),
                    idle_timeout: Duration::from_millis(config.idle_timeout_ms),
                    max_pending: Duration::from_millis(config.max_pending_ms),
                    max_connections: config.max_connections,
                    max_header_bytes: config.max_response_header_bytes,
                },
                tls,
            )),
            failures: FailureLog::default(),
        })
    }

    fn pick(&self) -> Option<&Arc<Endpoint>> {
        match self.endpoints.len() {
            0 => None,
            1 => self.endpoints.first(),
            n => self
                .endpoints
                .get(self.next.fetch_add(1, Ordering::Relaxed) % n),
        }
    }

    /// Reads the cluster's TLS files again now (`SIGHUP`); see [`tls::UpstreamTls::reload`].
    /// `Ok(false)` for a cluster without TLS.
    pub fn reload_tls(&self) -> Result<bool, crate::proxy::server::TlsError> {
        match self.pool.tls() {
            Some(tls) => tls.reload(),
            None => Ok(false),
        }
    }

    /// Whether the cluster has no endpoints (every request to it is a 503).
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Whether some endpoint accepts a connection now (for readiness).
    pub async fn reachable(&self) -> bool {
        for endpoint in &self.endpoints {
            if self.pool.probe(endpoint).await {
                return true;
            }
        }
        false
    }

    /// Sends the request `head` with `body` to the next endpoint and waits for the
    /// response head. The response body streams; its connection returns to the pool
    /// once the body has been read to the end.
    pub async fn send(
        &self,
        head: &RequestHead,
        body: Body,
        fwd: &Forwarded,
    ) -> Result<Response<Body>, UpstreamError> {
        let result = self.send_inner(head, body, fwd).await;
        if let Err(e) = &result {
            self.failures.note(e);
        }
        result
    }

    async fn send_inner(
        &self,
        head: &RequestHead,
        body: Body,
        fwd: &Forwarded,
    ) -> Result<Response<Body>, UpstreamError> {
        let Some(endpoint) = self.pick() else {
            return Err(UpstreamError::NoEndpoint {
                cluster: self.name.clone(),
            });
        };
        // The timeout starts once the whole request has gone.
        let (body, uploaded) = UploadBody::watch(body);
        let exchange = async {
            match self.protocol {
                Protocol::Http1 => self.send_h1(endpoint, head, body, fwd).await,
                Protocol::Http2 => self.send_h2(endpoint, head, body, fwd).await,
            }
        };
        tokio::pin!(exchange);
        let timeout = async {
            if let Some(uploaded) = uploaded {
                let _ = uploaded.await;
            }
            tokio::time::sleep(self.timeout).await;
        };
        let (res, release) = tokio::select! {
            biased;
            res = &mut exchange => res?,
            () = timeout => {
                return Err(UpstreamError::Timeout {
                    cluster: self.name.clone(),
                    endpoint: endpoint.authority.clone(),
                    after: self.timeout,
                })
            }
        };
        self.incoming(endpoint, res, release)
    }

    /// The wire request for `endpoint`: origin-form (or, for HTTP/2, absolute) URI, the
    /// hygienic headers.
    fn wire(
        &self,
        endpoint: &Endpoint,
        head: &RequestHead,
        body: Body,
        fwd: &Forwarded,
    ) -> Request<Body> {
        let mut parts = http::uri::Parts::default();
        if self.protocol == Protocol::Http2 {
            parts.scheme = Some(self.scheme.clone());
            parts.authority = Some(endpoint.authority.clone());
        }
        parts.path_and_query = Some(
            head.uri
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        let mut req = Request::new(body);
        *req.method_mut() = head.method.clone();
        *req.uri_mut() =
            Uri::from_parts(parts).expect("a path alone, or scheme, authority and path");
        *req.version_mut() = match self.protocol {
            Protocol::Http1 => http::Version::HTTP_11,
            Protocol::Http2 => http::Version::HTTP_2,
        };
        *req.headers_mut() = headers::outgoing(&head.headers, fwd);
        req
    }

    async fn send_h1(
        &self,
        endpoint: &Arc<Endpoint>,
        head: &RequestHead,
        body: Body,
        fwd: &Forwarded,
    ) -> Result<(Response<Incoming>, Option<Release>), UpstreamError> {
        let replayable = is_idempotent(&head.method) && body.is_end_stream();
        let mut req = self.wire(endpoint, head, body, fwd);
        let mut attempt = 0;
        let mut fresh_only = false;
        loop {
            let checkout = if fresh_only {
                self.pool.fresh_h1(endpoint).await?
            } else {
                self.pool.checkout_h1(endpoint).await?
            };
            let (mut sender, reused) = (checkout.sender, checkout.reused);
            if let Err(e) = sender.ready().await {
                if reused {
                    continue;
                }
                return Err(self.pool.protocol_error(endpoint, &e));
            }
            match sender.try_send_request(req).await {
                Ok(res) => {
                    let release = Release {
                        sender,
                        endpoint: endpoint.clone(),
                        pool: self.pool.clone(),
                    };
                    return Ok((res, Some(release)));
                }
                Err(mut e) => {
                    let retry = reused && attempt < MAX_STALE_RETRIES;
                    match e.take_message() {
                        // Never written: always safe to send on another connection.
                        Some(unsent) if retry => req = unsent,
                        // Written on a connection the upstream had just closed, and
                        // harmless to send again: built anew from the exchange's head.
                        None if retry && replayable => {
                            tracing::debug!(error = %e.error(), "reused upstream connection failed; sending again on a new one");
                            req = self.wire(endpoint, head, crate::proxy::empty_body(), fwd);
                            fresh_only = true;
                        }
                        _ => return Err(self.pool.protocol_error(endpoint, e.error())),
                    }
                    attempt += 1;
                }
            }
        }
    }

    async fn send_h2(
        &self,
        endpoint: &Arc<Endpoint>,
        head: &RequestHead,
        body: Body,
        fwd: &Forwarded,
    ) -> Result<(Response<Incoming>, Option<Release>), UpstreamError> {
        let mut sender = self.pool.h2(endpoint).await?;
        sender
            .ready()
            .await
            .map_err(|e| self.pool.protocol_error(endpoint, &e))?;
        let req = self.wire(endpoint, head, body, fwd);
        let res = sender
            .send_request(req)
            .await
            .map_err(|e| self.pool.protocol_error(endpoint, &e))?;
        Ok((res, None))
    }

    /// The answer as it goes on: header block within the cluster's limit (hyper bounds
    /// an HTTP/1.1 head by its read buffer; this is the exact check for both
    /// protocols), hop-by-hop headers dropped, HTTP/1.1 whatever the upstream spoke
    /// (an HTTP/1.0 upstream's answer is not an HTTP/1.0 answer to the client), the
    /// connection handed back when the body ends.
    fn incoming(
        &self,
        endpoint: &Endpoint,
        res: Response<Incoming>,
        release: Option<Release>,
    ) -> Result<Response<Body>, UpstreamError> {
        let (mut parts, body) = res.into_parts();
        let limit = self.pool.limits.max_header_bytes;
        if headers::block_size(&parts.headers) > limit {
            return Err(UpstreamError::HeadersTooLarge {
                cluster: self.name.clone(),
                endpoint: endpoint.authority.clone(),
                limit,
            });
        }
        headers::strip_hop_by_hop(&mut parts.headers);
        parts.version = http::Version::HTTP_11;
        Ok(Response::from_parts(
            parts,
            PooledBody { body, release }.boxed_unsync(),
        ))
    }
}

fn is_idempotent(method: &http::Method) -> bool {
    matches!(
        *method,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::TRACE
            | http::Method::PUT
            | http::Method::DELETE
    )
}

/// What hands an HTTP/1.1 connection back once its response body has been read.
struct Release {
    sender: http1::SendRequest<Body>,
    endpoint: Arc<Endpoint>,
    pool: Arc<Pool>,
}

/// A response body that hands its connection back to the pool once it has been read
/// to the end. Dropped early, it drops the connection instead, since hyper cannot
/// reuse a connection with an unread response on it.
struct PooledBody {
    body: Incoming,
    release: Option<Release>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some(r) = self.release.take() {
            r.pool.give_back(&r.endpoint, r.sender);
        }
    }
}

impl hyper::body::Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.release(),
            Poll::Ready(Some(Ok(_))) if self.body.is_end_stream() => self.release(),
            Poll::Ready(Some(Err(_))) => self.release = None,
            _ => {}
        }
        polled.map(|frame| frame.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        // An empty body (204, 304, HEAD) is never polled: it ends where it starts.
        if self.body.is_end_stream() {
            self.release();
        }
    }
}

/// A request body that says when it has been sent whole (or at once, when empty).
struct UploadBody {
    body: Body,
    done: Option<oneshot::Sender<()>>,
}

impl UploadBody {
    /// The body to send, and what resolves once it has been sent (None: it already
    /// has, being empty).
    fn watch(body: Body) -> (Body, Option<oneshot::Receiver<()>>) {
        if body.is_end_stream() {
            return (body, None);
        }
        let (done, uploaded) = oneshot::channel();
        let watched = UploadBody {
            body,
            done: Some(done),
        };
        (watched.boxed_unsync(), Some(uploaded))
    }
}

impl hyper::body::Body for UploadBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) | Poll::Ready(Some(Err(_))) => true,
            Poll::Ready(Some(Ok(_))) => self.body.is_end_stream(),
            Poll::Pending => false,
        };
        if ended {
            if let Some(done) = self.done.take() {
                let _ = done.send(());
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Upstream failures, logged at most once a second per cluster, with how many were
/// left out in between.
#[derive(Default)]
struct FailureLog {
    last_ms: AtomicU64,
    left_out: AtomicU64,
}

impl FailureLog {
    fn note(&self, e: &UpstreamError) {
        static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let now = ORIGIN.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1000;
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let left_out = self.left_out.swap(0, Ordering::Relaxed);
            tracing::warn!(error = %e, kind = e.kind(), left_out, "upstream failed");
        } else {
            self.left_out.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(endpoints: &[&str]) -> Cluster {
        let config: ClusterConfig = serde_yaml_ng::from_str(&format!(
            "{{endpoints: [{}], connect_timeout_ms: 100, timeout_ms: 100}}",
            endpoints.join(", ")
        ))
        .unwrap();
        Cluster::new("c", &config).unwrap()
    }

    fn head() -> RequestHead {
        RequestHead {
            method: http::Method::GET,
            uri: Uri::from_static("/x"),
            headers: http::HeaderMap::new(),
        }
    }

    fn fwd() -> Forwarded {
        Forwarded {
            client: "127.0.0.1".parse().unwrap(),
            proto: http::HeaderValue::from_static("http"),
            request_id: http::HeaderValue::from_static("id"),
        }
    }

    #[tokio::test]
    async fn endpoints_are_picked_round_robin() {
        let c = cluster(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        let ports: Vec<_> = (0..6)
            .map(|_| c.pick().unwrap().authority.port_u16().unwrap())
            .collect();
        assert_eq!(ports, vec![1, 2, 3, 1, 2, 3]);
    }

    #[test]
    fn only_idempotent_methods_are_replayed() {
        assert!(is_idempotent(&http::Method::GET));
        assert!(is_idempotent(&http::Method::DELETE));
        assert!(!is_idempotent(&http::Method::POST));
        assert!(!is_idempotent(&http::Method::PATCH));
    }

    #[tokio::test]
    async fn empty_cluster_is_503() {
        let c = cluster(&[]);
        let err = c
            .send(&head(), crate::proxy::empty_body(), &fwd())
            .await
            .unwrap_err();
        assert_eq!(err.status(), http::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(err.kind(), "no_endpoint");
    }
}
