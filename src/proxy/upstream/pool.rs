//! Connections to one cluster: each endpoint's idle HTTP/1.1 connections (or its one
//! shared HTTP/2 connection), the cluster's limit on open connections, and the bounded
//! wait for one when all are busy.
//!
//! The checkout takes no lock: idle connections sit in a lock-free bounded queue
//! (crossbeam's `ArrayQueue`, as pingora-pool keeps a lock-free hot queue in front of
//! its pool), and the shared HTTP/2 sender is read through `ArcSwap`. Each open
//! connection holds a permit of the cluster's semaphore for as long as its I/O task
//! runs, so the limit counts connections, not requests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use crossbeam_queue::ArrayQueue;
use http::uri::Authority;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::error::UpstreamError;
use super::tls::UpstreamTls;
use crate::proxy::Body;

/// A connection's bytes: plain TCP, or TLS over it.
pub(super) trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// One upstream address and its connections.
pub(super) struct Endpoint {
    pub(super) authority: Authority,
    /// Set when the endpoint is an IP literal, so connecting needs no DNS look-up.
    addr: Option<SocketAddr>,
    /// HTTP/1.1: idle connections, oldest first.
    idle: ArrayQueue<Idle>,
    /// HTTP/2: the one multiplexed connection, shared by every request.
    shared: ArcSwapOption<http2::SendRequest<Body>>,
    /// Only one task at a time opens the shared HTTP/2 connection.
    opening: tokio::sync::Mutex<()>,
}

struct Idle {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

/// How a cluster connects, and its limits.
pub(super) struct Limits {
    pub(super) connect_timeout: Duration,
    pub(super) idle_timeout: Duration,
    pub(super) max_pending: Duration,
    pub(super) max_connections: usize,
    /// The read buffer bound, which bounds the response header block.
    pub(super) max_header_bytes: usize,
}

/// The cluster-wide part: the connection permits and the wake-up for waiters.
pub(super) struct Pool {
    pub(super) cluster: String,
    pub(super) limits: Limits,
    /// TLS to the endpoints, when the cluster has it.
    tls: Option<Arc<UpstreamTls>>,
    permits: Arc<Semaphore>,
    /// Notified when a connection goes back to an idle queue.
    returned: Notify,
}

/// A connection for one HTTP/1.1 request.
pub(super) struct Checkout {
    pub(super) sender: http1::SendRequest<Body>,
    /// Whether it served a request before (and may have been closed by the upstream
    /// since).
    pub(super) reused: bool,
}

impl Endpoint {
    pub(super) fn new(authority: Authority, idle_capacity: usize) -> Self {
        Self {
            addr: authority.as_str().parse().ok(),
            authority,
            idle: ArrayQueue::new(idle_capacity.max(1)),
            shared: ArcSwapOption::empty(),
            opening: tokio::sync::Mutex::new(()),
        }
    }
}

impl Pool {
    pub(super) fn new(cluster: &str, limits: Limits, tls: Option<Arc<UpstreamTls>>) -> Self {
        Self {
            cluster: cluster.to_string(),
            tls,
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            returned: Notify::new(),
        }
    }

    pub(super) fn tls(&self) -> Option<&Arc<UpstreamTls>> {
        self.tls.as_ref()
    }

    /// An idle connection that is still open and young enough, or a new one; when the
    /// cluster's connections are all open and busy, waits up to `max_pending` for one.
    pub(super) async fn checkout_h1(&self, endpoint: &Endpoint) -> Result<Checkout, UpstreamError> {
        if let Some(sender) = self.idle(endpoint) {
            return Ok(Checkout {
                sender,
                reused: true,
            });
        }
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return self.connect_h1(endpoint, permit).await;
        }
        let deadline = tokio::time::Instant::now() + self.limits.max_pending;
        loop {
            let returned = self.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            // Looked at again once the wake-up is armed, so a return in between counts.
            if let Some(sender) = self.idle(endpoint) {
                return Ok(Checkout {
                    sender,
                    reused: true,
                });
            }
            tokio::select! {
                permit = self.permits.clone().acquire_owned() => {
                    let permit = permit.expect("the pool's semaphore is never closed");
                    return self.connect_h1(endpoint, permit).await;
                }
                () = &mut returned => {}
                () = tokio::time::sleep_until(deadline) => return Err(self.pending()),
            }
        }
    }

    /// A fresh connection, for a request that may not meet a stale one again.
    pub(super) async fn fresh_h1(&self, endpoint: &Endpoint) -> Result<Checkout, UpstreamError> {
        let permit = self.permit().await?;
        self.connect_h1(endpoint, permit).await
    }

    /// A permit for one more connection, waited for at most `max_pending`.
    async fn permit(&self) -> Result<OwnedSemaphorePermit, UpstreamError> {
        tokio::time::timeout(
            self.limits.max_pending,
            self.permits.clone().acquire_owned(),
        )
        .await
        .map_err(|_| self.pending())
        .map(|permit| permit.expect("the pool's semaphore is never closed"))
    }

    /// Every connection stayed busy for `max_pending`: counted, and the 503.
    fn pending(&self) -> UpstreamError {
        crate::telemetry::refused(crate::telemetry::Refusal::UpstreamPending);
        UpstreamError::Pending {
            cluster: self.cluster.clone(),
            max_connections: self.limits.max_connections,
            after: self.limits.max_pending,
        }
    }

    fn idle(&self, endpoint: &Endpoint) -> Option<http1::SendRequest<Body>> {
        while let Some(entry) = endpoint.idle.pop() {
            if entry.since.elapsed() <= self.limits.idle_timeout && !entry.sender.is_closed() {
                return Some(entry.sender);
            }
            // Dropped: its connection task ends and gives its permit back.
        }
        None
    }

    /// Hands a connection whose response was read to the end back for the next request.
    pub(super) fn give_back(&self, endpoint: &Endpoint, sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let idle = Idle {
            sender,
            since: Instant::now(),
        };
        if endpoint.idle.push(idle).is_ok() {
            self.returned.notify_one();
        }
    }

    /// The endpoint's shared HTTP/2 connection, opened when there is none (or it
    /// closed).
    pub(super) async fn h2(
        &self,
        endpoint: &Endpoint,
    ) -> Result<http2::SendRequest<Body>, UpstreamError> {
        if let Some(sender) = endpoint.shared.load().as_deref().filter(|s| !s.is_closed()) {
            return Ok(sender.clone());
        }
        let _opening = endpoint.opening.lock().await;
        if let Some(sender) = endpoint.shared.load().as_deref().filter(|s| !s.is_closed()) {
            return Ok(sender.clone());
        }
        let permit = self.permit().await?;
        let stream = self.connect(endpoint).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(u32::try_from(self.limits.max_header_bytes).unwrap_or(u32::MAX))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.protocol_error(endpoint, &e))?;
        drive(conn, permit);
        endpoint.shared.store(Some(Arc::new(sender.clone())));
        Ok(sender)
    }

    async fn connect_h1(
        &self,
        endpoint: &Endpoint,
        permit: OwnedSemaphorePermit,
    ) -> Result<Checkout, UpstreamError> {
        // Boxed: connecting is rare, and its large future would otherwise be carried
        // (and copied) by every request.
        Box::pin(async {
            let stream = self.connect(endpoint).await?;
            let (sender, conn) = http1::Builder::new()
                .max_buf_size(self.limits.max_header_bytes.max(8192))
                .handshake(TokioIo::new(stream))
                .await
                .map_err(|e| self.protocol_error(endpoint, &e))?;
            drive(conn, permit);
            Ok(Checkout {
                sender,
                reused: false,
            })
        })
        .await
    }

    /// A new connection to `endpoint`, with its TLS handshake when the cluster has TLS;
    /// both within `connect_timeout`.
    async fn connect(&self, endpoint: &Endpoint) -> Result<Box<dyn Io>, UpstreamError> {
        let started = tokio::time::Instant::now();
        let tcp = self.connect_tcp(endpoint).await?;
        let Some(tls) = &self.tls else {
            return Ok(Box::new(tcp));
        };
        let left = self
            .limits
            .connect_timeout
            .saturating_sub(started.elapsed());
        match tokio::time::timeout(left, tls.connect(endpoint.authority.host(), tcp)).await {
            Ok(Ok(stream)) => Ok(Box::new(stream)),
            Ok(Err(reason)) => Err(UpstreamError::Tls {
                cluster: self.cluster.clone(),
                endpoint: endpoint.authority.clone(),
                reason,
            }),
            Err(_) => Err(UpstreamError::ConnectTimeout {
                cluster: self.cluster.clone(),
                endpoint: endpoint.authority.clone(),
                after: self.limits.connect_timeout,
            }),
        }
    }

    async fn connect_tcp(&self, endpoint: &Endpoint) -> Result<TcpStream, UpstreamError> {
        let connect = async {
            match endpoint.addr {
                Some(addr) => TcpStream::connect(addr).await,
                None => TcpStream::connect(endpoint.authority.as_str()).await,
            }
        };
        let stream = match tokio::time::timeout(self.limits.connect_timeout, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                return Err(UpstreamError::Connect {
                    cluster: self.cluster.clone(),
                    endpoint: endpoint.authority.clone(),
                    reason: e.to_string(),
                })
            }
            Err(_) => {
                return Err(UpstreamError::ConnectTimeout {
                    cluster: self.cluster.clone(),
                    endpoint: endpoint.authority.clone(),
                    after: self.limits.connect_timeout,
                })
            }
        };
        // Requests and responses are small and latency matters more than packet count.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    pub(super) fn protocol_error(&self, endpoint: &Endpoint, e: &hyper::Error) -> UpstreamError {
        if e.is_parse_too_large() {
            return UpstreamError::HeadersTooLarge {
                cluster: self.cluster.clone(),
                endpoint: endpoint.authority.clone(),
                limit: self.limits.max_header_bytes,
            };
        }
        UpstreamError::Protocol {
            cluster: self.cluster.clone(),
            endpoint: endpoint.authority.clone(),
            reason: root_cause(e).to_string(),
        }
    }

    /// Whether a connection to `endpoint` can be opened now (for readiness).
    pub(super) async fn probe(&self, endpoint: &Endpoint) -> bool {
        self.connect_tcp(endpoint).await.is_ok()
    }
}

/// Runs an upstream connection's I/O in its own task until either side closes it; the
/// connection's permit goes with it.
fn drive<C>(conn: C, permit: OwnedSemaphorePermit)
where
    C: std::future::Future<Output = hyper::Result<()>> + Send + 'static,
{
    tokio::spawn(async move {
        let _permit = permit;
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended with an error");
        }
    });
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
