//! Pooled clients per cluster: endpoint choice, timeouts, and the mapping of upstream
//! failures to statuses.
//!
//! Each cluster picks endpoints round robin; each endpoint keeps its own pool of
//! HTTP/1.1 connections (or one shared HTTP/2 connection), built on hyper's connection
//! API. A request that meets a pooled connection the upstream has just closed is sent
//! again on another one: it was never written, so that is always safe. A failure becomes an [`UpstreamError`], which knows its status (502, 503, 504),
//! its metric label and its JSON answer. This module does not decide which cluster serves
//! a request; `split.rs` does.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::config::{parse_endpoint, ClusterConfig, Protocol};
use crate::{Body, BoxError};

/// Why an upstream did not answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cluster {cluster} has no endpoints")]
    NoEndpoint { cluster: String },
    #[error("cluster {cluster}: cannot connect to {endpoint}: {reason}")]
    Connect {
        cluster: String,
        endpoint: Authority,
        reason: String,
    },
    #[error("cluster {cluster}: connecting to {endpoint} took over {after:?}")]
    ConnectTimeout {
        cluster: String,
        endpoint: Authority,
        after: Duration,
    },
    #[error("cluster {cluster}: {endpoint} sent no response within {after:?}")]
    Timeout {
        cluster: String,
        endpoint: Authority,
        after: Duration,
    },
    #[error("cluster {cluster}: {endpoint} failed the exchange: {reason}")]
    Protocol {
        cluster: String,
        endpoint: Authority,
        reason: String,
    },
}

impl UpstreamError {
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::NoEndpoint { .. } => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamError::Connect { .. } | UpstreamError::Protocol { .. } => {
                StatusCode::BAD_GATEWAY
            }
            UpstreamError::ConnectTimeout { .. } | UpstreamError::Timeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
        }
    }

    /// The `kind` label of `acge_upstream_errors_total` and the `error` of the JSON body.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::NoEndpoint { .. } => "no_endpoint",
            UpstreamError::Connect { .. } => "connect",
            UpstreamError::ConnectTimeout { .. } => "connect_timeout",
            UpstreamError::Timeout { .. } => "timeout",
            UpstreamError::Protocol { .. } => "protocol",
        }
    }
}

/// One named group of endpoints, each with its own pool of connections.
pub struct Cluster {
    pub name: String,
    endpoints: Vec<Arc<Endpoint>>,
    next: AtomicUsize,
    protocol: Protocol,
    connect_timeout: Duration,
    timeout: Duration,
    idle_timeout: Duration,
}

/// One upstream address and its idle connections.
struct Endpoint {
    authority: Authority,
    /// Set when the endpoint is an IP literal, so connecting needs no DNS look-up.
    addr: Option<SocketAddr>,
    /// HTTP/1.1: idle connections, most recently used last (LIFO keeps few warm).
    idle: Mutex<Vec<Idle>>,
    /// HTTP/2: the one multiplexed connection, shared by every request.
    shared: Mutex<Option<http2::SendRequest<Body>>>,
}

struct Idle {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

/// Idle HTTP/1.1 connections kept per endpoint; more are closed when returned.
const MAX_IDLE_PER_ENDPOINT: usize = 1024;

/// A request whose pooled connection turned out to be closed is sent again on another
/// connection this many times. It was never written, so this is always safe.
const MAX_STALE_RETRIES: usize = 3;

impl Cluster {
    /// Builds a cluster from a validated config.
    pub fn new(name: &str, config: &ClusterConfig) -> Self {
        Self {
            name: name.to_string(),
            endpoints: config
                .endpoints
                .iter()
                .filter_map(|e| parse_endpoint(e).ok())
                .map(|authority| {
                    Arc::new(Endpoint {
                        addr: authority.as_str().parse().ok(),
                        authority,
                        idle: Mutex::new(Vec::new()),
                        shared: Mutex::new(None),
                    })
                })
                .collect(),
            next: AtomicUsize::new(0),
            protocol: config.protocol,
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            timeout: Duration::from_millis(config.timeout_ms),
            idle_timeout: Duration::from_millis(config.idle_timeout_ms),
        }
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

    /// Sends `req` to the next endpoint and waits for the response head. Headers and
    /// body go as they are; the URI is rewritten for the upstream (origin-form for
    /// HTTP/1.1). The response body streams; its connection returns to the pool once
    /// the body has been read to the end.
    pub async fn send(&self, mut req: Request<Body>) -> Result<Response<Body>, UpstreamError> {
        let Some(endpoint) = self.pick() else {
            return Err(UpstreamError::NoEndpoint {
                cluster: self.name.clone(),
            });
        };
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut parts = http::uri::Parts::default();
        if self.protocol == Protocol::Http2 {
            parts.scheme = Some(Scheme::HTTP);
            parts.authority = Some(endpoint.authority.clone());
        }
        parts.path_and_query = Some(path);
        *req.uri_mut() =
            Uri::from_parts(parts).expect("a path alone, or scheme, authority and path");
        let exchange = async {
            match self.protocol {
                Protocol::Http1 => {
                    *req.version_mut() = http::Version::HTTP_11;
                    self.send_h1(endpoint, req).await
                }
                Protocol::Http2 => {
                    *req.version_mut() = http::Version::HTTP_2;
                    self.send_h2(endpoint, req).await
                }
            }
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::Timeout {
                cluster: self.name.clone(),
                endpoint: endpoint.authority.clone(),
                after: self.timeout,
            }),
        }
    }

    async fn send_h1(
        &self,
        endpoint: &Arc<Endpoint>,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, UpstreamError> {
        let mut attempt = 0;
        let mut fresh_only = false;
        loop {
            let pooled = if fresh_only {
                None
            } else {
                self.checkout(endpoint)
            };
            let (mut sender, reused) = match pooled {
                Some(sender) => (sender, true),
                // Boxed: connecting is rare, and its large future would otherwise be
                // carried (and copied) by every request.
                None => (Box::pin(self.connect_h1(endpoint)).await?, false),
            };
            if let Err(e) = sender.ready().await {
                if reused {
                    continue;
                }
                return Err(self.protocol_error(endpoint, &e));
            }
            // A reused connection may have been closed by the upstream just as the request
            // went out. A request that can be sent again (idempotent, no body) is kept so.
            let replay = (reused && attempt < MAX_STALE_RETRIES)
                .then(|| Replay::of(&req))
                .flatten();
            match sender.try_send_request(req).await {
                Ok(res) => {
                    let endpoint = endpoint.clone();
                    return Ok(res.map(|body| {
                        PooledBody {
                            body,
                            release: Some((sender, endpoint)),
                        }
                        .boxed_unsync()
                    }));
                }
                Err(mut e) => {
                    let unsent = e.take_message();
                    match (unsent, replay) {
                        // Never written: always safe to send on another connection.
                        (Some(unsent), _) if reused && attempt < MAX_STALE_RETRIES => req = unsent,
                        // Written, but no response came and sending it again is harmless.
                        (None, Some(replay)) => {
                            tracing::debug!(error = %e.error(), "reused upstream connection failed; sending again on a new one");
                            req = replay.into_request();
                            fresh_only = true;
                        }
                        _ => return Err(self.protocol_error(endpoint, e.error())),
                    }
                    attempt += 1;
                }
            }
        }
    }

    async fn send_h2(
        &self,
        endpoint: &Arc<Endpoint>,
        req: Request<Body>,
    ) -> Result<Response<Body>, UpstreamError> {
        let shared = endpoint
            .shared
            .lock()
            .expect("the pool lock is never held across a panic")
            .clone()
            .filter(|s| !s.is_closed());
        let mut sender = match shared {
            Some(sender) => sender,
            None => {
                let sender = Box::pin(self.connect_h2(endpoint)).await?;
                *endpoint
                    .shared
                    .lock()
                    .expect("the pool lock is never held across a panic") = Some(sender.clone());
                sender
            }
        };
        sender
            .ready()
            .await
            .map_err(|e| self.protocol_error(endpoint, &e))?;
        match sender.send_request(req).await {
            Ok(res) => Ok(res.map(|b| b.map_err(Into::into).boxed_unsync())),
            Err(e) => Err(self.protocol_error(endpoint, &e)),
        }
    }

    /// The most recently used idle connection that is still open and young enough.
    fn checkout(&self, endpoint: &Endpoint) -> Option<http1::SendRequest<Body>> {
        let mut idle = endpoint
            .idle
            .lock()
            .expect("the pool lock is never held across a panic");
        while let Some(entry) = idle.pop() {
            if entry.since.elapsed() > self.idle_timeout {
                // Everything below is older still.
                idle.clear();
                return None;
            }
            if !entry.sender.is_closed() {
                return Some(entry.sender);
            }
        }
        None
    }

    async fn connect_tcp(&self, endpoint: &Endpoint) -> Result<TcpStream, UpstreamError> {
        let connect = async {
            match endpoint.addr {
                Some(addr) => TcpStream::connect(addr).await,
                None => TcpStream::connect(endpoint.authority.as_str()).await,
            }
        };
        let stream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                return Err(UpstreamError::Connect {
                    cluster: self.name.clone(),
                    endpoint: endpoint.authority.clone(),
                    reason: e.to_string(),
                })
            }
            Err(_) => {
                return Err(UpstreamError::ConnectTimeout {
                    cluster: self.name.clone(),
                    endpoint: endpoint.authority.clone(),
                    after: self.connect_timeout,
                })
            }
        };
        // Requests and responses are small and latency matters more than packet count.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    async fn connect_h1(
        &self,
        endpoint: &Endpoint,
    ) -> Result<http1::SendRequest<Body>, UpstreamError> {
        let stream = self.connect_tcp(endpoint).await?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.protocol_error(endpoint, &e))?;
        drive(conn);
        Ok(sender)
    }

    async fn connect_h2(
        &self,
        endpoint: &Endpoint,
    ) -> Result<http2::SendRequest<Body>, UpstreamError> {
        let stream = self.connect_tcp(endpoint).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.protocol_error(endpoint, &e))?;
        drive(conn);
        Ok(sender)
    }

    fn protocol_error(&self, endpoint: &Endpoint, e: &hyper::Error) -> UpstreamError {
        UpstreamError::Protocol {
            cluster: self.name.clone(),
            endpoint: endpoint.authority.clone(),
            reason: root_cause(e).to_string(),
        }
    }
}

/// Runs an upstream connection's I/O in its own task until either side closes it.
fn drive<C>(conn: C)
where
    C: std::future::Future<Output = hyper::Result<()>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
}

/// What is needed to send a bodyless idempotent request (RFC 9110 §9.2.2) again.
struct Replay {
    method: http::Method,
    uri: Uri,
    version: http::Version,
    headers: http::HeaderMap,
}

impl Replay {
    fn of(req: &Request<Body>) -> Option<Self> {
        let idempotent = matches!(
            *req.method(),
            http::Method::GET
                | http::Method::HEAD
                | http::Method::OPTIONS
                | http::Method::TRACE
                | http::Method::PUT
                | http::Method::DELETE
        );
        (idempotent && req.body().is_end_stream()).then(|| Replay {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        })
    }

    fn into_request(self) -> Request<Body> {
        let mut req = Request::new(crate::empty_body());
        *req.method_mut() = self.method;
        *req.uri_mut() = self.uri;
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers;
        req
    }
}

/// A response body that hands its connection back to the pool once it has been read
/// to the end. Dropped early, it drops the connection instead, since hyper cannot
/// reuse a connection with an unread response on it.
struct PooledBody {
    body: Incoming,
    release: Option<(http1::SendRequest<Body>, Arc<Endpoint>)>,
}

impl PooledBody {
    fn release(&mut self) {
        if let Some((sender, endpoint)) = self.release.take() {
            if sender.is_closed() {
                return;
            }
            let mut idle = endpoint
                .idle
                .lock()
                .expect("the pool lock is never held across a panic");
            if idle.len() < MAX_IDLE_PER_ENDPOINT {
                idle.push(Idle {
                    sender,
                    since: Instant::now(),
                });
            }
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

fn root_cause<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> &'a (dyn std::error::Error + 'static) {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(endpoints: &[&str]) -> Cluster {
        let config = ClusterConfig {
            endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
            connect_timeout_ms: 100,
            timeout_ms: 100,
            protocol: Protocol::Http1,
            idle_timeout_ms: 1000,
        };
        Cluster::new("c", &config)
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
    fn only_bodyless_idempotent_requests_are_replayed() {
        let req = |method: http::Method, body: Body| {
            let mut r = Request::new(body);
            *r.method_mut() = method;
            r.headers_mut().insert("x-a", "1".parse().unwrap());
            r
        };
        let full = || {
            http_body_util::Full::new(Bytes::from_static(b"x"))
                .map_err(|n| match n {})
                .boxed_unsync()
        };
        let replay = Replay::of(&req(http::Method::GET, crate::empty_body())).unwrap();
        let again = replay.into_request();
        assert_eq!(again.method(), http::Method::GET);
        assert_eq!(again.headers()["x-a"], "1");
        assert!(Replay::of(&req(http::Method::DELETE, crate::empty_body())).is_some());
        assert!(Replay::of(&req(http::Method::POST, crate::empty_body())).is_none());
        assert!(Replay::of(&req(http::Method::PUT, full())).is_none());
    }

    #[tokio::test]
    async fn empty_cluster_is_503() {
        let c = cluster(&[]);
        let err = c.send(Request::new(crate::empty_body())).await.unwrap_err();
        assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(err.kind(), "no_endpoint");
    }
}
