//! Listeners: accept, optional TLS, HTTP/1.1 and HTTP/2 on one port, the limits that
//! protect the proxy from hostile and careless clients, graceful drain.
//!
//! One accept loop serves any handler of the shape `(request, peer, in-flight guard) →
//! response`: the proxy, the admin API and the demo backends all run on it. HTTP/2 is
//! recognised by its connection preface (prior knowledge, h2c) or by ALPN under TLS.
//!
//! Limits, in the order a client meets them:
//! - the listen backlog;
//! - open connections (`max_connections`, and at most half the descriptor limit): at
//!   the limit the oldest idle connection is closed to make room; with none idle the
//!   new one gets a canned 503 and is closed.
//!   When accepting fails for want of file descriptors, a reserved descriptor is let go
//!   so the waiting connection can be accepted and closed, and the oldest idle
//!   connection is shed: the listener keeps answering;
//! - the first byte (or the TLS handshake) within `first_byte_timeout`;
//! - the request head within `header_read_timeout` (hyper's, from its first byte);
//! - requests in flight (`max_requests_in_flight`): beyond it a request waits for a
//!   slot, in arrival order, up to `admission_wait_ms`, then gets a 503 `overloaded`
//!   with `Retry-After`, before its body is read;
//! - an idle connection (nothing in flight) closes after `idle_timeout`;
//! - HTTP/2: concurrent streams and resets per connection.
//!
//! Each refusal counts in `acge_refused_total{reason}`. A drain ([`drain`]) first
//! answers HTTP/1 requests with `Connection: close` (and, on a takeover, stops
//! accepting: the new process has the socket). On shutdown the loop stops accepting,
//! asks every connection to finish its in-flight requests (HTTP/2 gets GOAWAY), waits
//! up to the drain timeout, then closes what is left. This module knows nothing of
//! routes or upstreams.

mod conns;
pub mod drain;
pub mod handover;
mod tls;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_rustls::TlsAcceptor;

pub use conns::{Conns, InFlight};
pub use drain::{Drain, Phase};
pub use tls::{acceptor as tls_acceptor, Certificates, TlsError};

use crate::config::ListenerConfig;
use crate::proxy::error::ProxyError;
use crate::proxy::Body;
use crate::telemetry::{refused, Refusal};

/// How a listener treats its connections.
#[derive(Clone)]
pub struct ServerOptions {
    pub tls: Option<TlsAcceptor>,
    /// Largest header block accepted by the protocol layer. The proxy checks its own,
    /// smaller limit first so that clients get a JSON 431; this one is the backstop.
    pub max_header_bytes: usize,
    pub first_byte_timeout: Duration,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub drain_timeout: Duration,
    pub max_connections: usize,
    pub max_requests_in_flight: usize,
    /// How long a request beyond `max_requests_in_flight` waits for a slot.
    pub admission_wait: Duration,
    pub h2_max_concurrent_streams: u32,
    pub h2_max_pending_resets: usize,
    pub h2_max_local_resets: usize,
    /// The drain this listener follows before its shutdown (the proxy's listeners).
    pub drain: Option<std::sync::Arc<Drain>>,
}

impl Default for ServerOptions {
    /// Generous limits, for the admin API and the demo backends.
    fn default() -> Self {
        Self {
            tls: None,
            max_header_bytes: 32 * 1024,
            first_byte_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_requests_in_flight: 10_000,
            admission_wait: Duration::ZERO,
            h2_max_concurrent_streams: 256,
            h2_max_pending_resets: 20,
            h2_max_local_resets: 1024,
            drain: None,
        }
    }
}

impl ServerOptions {
    /// The proxy listener's options, from its config.
    pub fn of_listener(config: &ListenerConfig, tls: Option<TlsAcceptor>) -> Self {
        let ms = Duration::from_millis;
        Self {
            tls,
            max_header_bytes: config.max_header_bytes,
            first_byte_timeout: ms(config.first_byte_timeout_ms),
            header_read_timeout: ms(config.header_read_timeout_ms),
            idle_timeout: ms(config.idle_timeout_ms),
            drain_timeout: ms(config.drain_timeout_ms),
            max_connections: config.max_connections,
            max_requests_in_flight: config.max_requests_in_flight,
            admission_wait: ms(config.admission_wait_ms),
            h2_max_concurrent_streams: config.h2_max_concurrent_streams,
            h2_max_pending_resets: config.h2_max_pending_resets,
            h2_max_local_resets: config.h2_max_local_resets,
            drain: None,
        }
    }
}

/// Binds `address` with a listen backlog of `backlog`.
pub fn bind(address: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = match address {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(backlog)
}

/// Serves connections from `listener` until `shutdown` resolves, then drains.
pub async fn serve<H, F, B>(
    listener: TcpListener,
    options: ServerOptions,
    handler: H,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>, SocketAddr, InFlight) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = bytes::Bytes> + From<Body> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size((options.max_header_bytes * 4).max(64 * 1024))
        .max_headers(512);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(options.h2_max_concurrent_streams)
        .max_pending_accept_reset_streams(options.h2_max_pending_resets)
        .max_local_error_reset_streams(options.h2_max_local_resets)
        .max_header_list_size(u32::try_from(options.max_header_bytes * 4).unwrap_or(u32::MAX));

    let ceiling = connection_ceiling();
    if ceiling < options.max_connections {
        tracing::info!(
            configured = options.max_connections,
            ceiling,
            "fewer client connections than configured: half the descriptor limit"
        );
    }
    let conns = Conns::new(
        options.max_connections.min(ceiling),
        options.max_requests_in_flight,
        options.admission_wait,
    );
    let sweeper = tokio::spawn({
        let conns = conns.clone();
        // Often enough that no connection outlives its idle timeout by much.
        let every =
            (options.idle_timeout / 4).clamp(Duration::from_millis(20), Duration::from_secs(1));
        let idle = options.idle_timeout;
        async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                conns.sweep(idle);
            }
        }
    });
    // Let go when accepting runs out of descriptors, so the waiting connection can be
    // taken off the queue and closed rather than left to spin the loop.
    let mut reserve = std::fs::File::open("/dev/null").ok();
    let mut shutdown = std::pin::pin!(shutdown);
    let drain = options.drain.clone().unwrap_or_default();
    let mut shut_down = false;
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) if out_of_descriptors(&e) => {
                    refused(Refusal::FileDescriptors);
                    reserve.take();
                    if let Ok(Ok((stream, _))) =
                        tokio::time::timeout(Duration::from_millis(10), listener.accept()).await
                    {
                        drop(stream);
                    }
                    conns.shed_oldest_idle();
                    reserve = std::fs::File::open("/dev/null").ok();
                    continue;
                }
                Err(e) => {
                    // A reset before accept, or the like: back off briefly rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => {
                shut_down = true;
                break;
            }
            () = drain.reached(Phase::Handed) => break,
        };
        if !conns.has_room() && !conns.shed_oldest_idle() {
            refused(Refusal::Connections);
            if options.tls.is_none() {
                tokio::spawn(refuse_connection(stream));
            }
            continue;
        }
        // Requests and responses are small and latency matters more than packet count.
        let _ = stream.set_nodelay(true);
        let registered = conns.register();
        let conn = registered.conn().clone();
        let service = {
            let (handler, conns, drain) = (handler.clone(), conns.clone(), drain.clone());
            hyper::service::service_fn(move |req: Request<Incoming>| {
                let (handler, conns, conn) = (handler.clone(), conns.clone(), conn.clone());
                let drain = drain.clone();
                async move {
                    let h1 = req.version() < http::Version::HTTP_2;
                    let Some(guard) = conns.admit_waiting(&conn).await else {
                        refused(Refusal::Requests);
                        let refusal = crate::proxy::error::too_many_in_flight();
                        return Ok::<_, Infallible>(crate::proxy::local(refusal).map(B::from));
                    };
                    let mut res = handler(req, peer, guard).await;
                    if h1 && drain.closing() {
                        // hyper closes the connection once this answer is written.
                        res.headers_mut().insert(
                            http::header::CONNECTION,
                            http::HeaderValue::from_static("close"),
                        );
                    }
                    Ok(res)
                }
            })
        };
        let builder = builder.clone();
        let tls = options.tls.clone();
        let first_byte = options.first_byte_timeout;
        let counted = drain.count();
        tokio::spawn(async move {
            let _counted = counted;
            let _registered = registered;
            let conn = _registered.conn().clone();
            match tls {
                None => {
                    // `peek` waits for a byte (or the end) without taking it from hyper.
                    let mut first = [0u8; 1];
                    match tokio::time::timeout(first_byte, stream.peek(&mut first)).await {
                        Ok(Ok(n)) if n > 0 => {}
                        Ok(_) => return,
                        Err(_) => {
                            refused(Refusal::FirstByteTimeout);
                            return;
                        }
                    }
                    let served = builder.serve_connection(TokioIo::new(stream), service);
                    run(served, &conn, peer).await;
                }
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(first_byte, acceptor.accept(stream)).await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                refused(Refusal::FirstByteTimeout);
                                return;
                            }
                        };
                    let served = builder.serve_connection(TokioIo::new(stream), service);
                    run(served, &conn, peer).await;
                }
            }
        });
    }
    drop(listener);
    if !shut_down {
        // Handed over: what this process has open is served until its shutdown.
        shutdown.await;
    }
    conns.close_all();
    if tokio::time::timeout(options.drain_timeout, conns.closed())
        .await
        .is_err()
    {
        tracing::warn!(after = ?options.drain_timeout, open = conns.open(), "drain timed out; closing the remaining connections");
        conns.kill_all();
        // Their exchanges end (and start their log phases) as their tasks stop.
        let _ = tokio::time::timeout(Duration::from_secs(1), conns.closed()).await;
    }
    sweeper.abort();
}

/// Drives one connection until it ends, closing it gracefully when the listener asks
/// (idle too long, its room needed, the drain) and at once when the drain times out.
/// The asking is two flags and the waker this registers on each poll: no timer or lock
/// per request.
async fn run<C>(served: C, conn: &std::sync::Arc<conns::Conn>, peer: SocketAddr)
where
    C: Future<Output = Result<(), Box<dyn std::error::Error + Send + Sync>>> + GracefulShutdown,
{
    let mut served = std::pin::pin!(served);
    let mut closing = false;
    let result = std::future::poll_fn(|cx| {
        let (asked_to_close, killed) = conn.watch(cx.waker());
        if killed {
            return std::task::Poll::Ready(Ok(()));
        }
        if asked_to_close && !closing {
            served.as_mut().shut_down();
            closing = true;
        }
        served.as_mut().poll(cx)
    })
    .await;
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// A connection that can be asked to finish what it is doing and close.
trait GracefulShutdown {
    fn shut_down(self: std::pin::Pin<&mut Self>);
}

impl<I, S, E, B> GracefulShutdown for auto::Connection<'_, I, S, E>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: auto::HttpServerConnExec<S::Future, B>,
{
    fn shut_down(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Client connections one listener may hold: half the process's descriptor limit, so
/// that upstream connections, files and the admin listener keep the other half and
/// the process does not run out (it still copes when it does; see `serve`).
fn connection_ceiling() -> usize {
    match rlimit::getrlimit(rlimit::Resource::NOFILE) {
        Ok((soft, _)) => usize::try_from(soft / 2).unwrap_or(usize::MAX),
        Err(_) => usize::MAX,
    }
}

/// Raises the process's descriptor limit to its hard limit (as Go's runtime does):
/// a proxy's connections are its descriptors.
pub fn raise_descriptor_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::debug!(limit = n, "descriptor limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the descriptor limit"),
    }
}

fn out_of_descriptors(e: &std::io::Error) -> bool {
    // EMFILE (24): the process is out of descriptors; ENFILE (23): the system is.
    matches!(e.raw_os_error(), Some(23 | 24))
}

/// The answer to a connection beyond the limit, written without reading the request:
/// a 503 that says so, then the connection is closed.
async fn refuse_connection(mut stream: TcpStream) {
    let body = ProxyError::Overloaded("too many open connections; try again shortly")
        .into_response()
        .into_body();
    let body = body.into_inner().unwrap_or_default();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        stream.shutdown().await?;
        // Read what the client sent, briefly, so that closing does not reset the
        // connection before the client has read the answer.
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_millis(200), write).await;
}
