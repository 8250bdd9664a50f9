//! The end of an exchange: measured, counted and logged when the answer's body ends,
//! not when its head goes out.
//!
//! [`Finish`] holds what the end needs (the route, the exchange, the request's
//! in-flight guard and the budget it holds), and ends the exchange as 499 if it is
//! dropped before it ended. [`LoggedBody`] wraps the answer's body and runs the end
//! exactly once: when the body has been read to its end (the last frame is
//! held back until the log phases are done, so that in `sync` mode the client's answer
//! completes only once its audit record is on disk), when the upstream cuts it (502,
//! counted as an upstream `body` error), or when it is dropped first (the client went
//! away: 499, the log phases then run in a task of their own).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use acge_filters::{End, Ending, Exchange, LogError, CLIENT_CLOSED_REQUEST};
use bytes::Bytes;
use http::StatusCode;
use hyper::body::Frame;

use super::body::{Body, BoxError, Lease};
use super::route::Route;
use super::server::InFlight;
use super::upstream::BODY_CUT;

type LogFuture = Pin<Box<dyn Future<Output = Result<(), LogError>> + Send>>;

/// The log phases not yet done, so that shutdown can wait for them before the audit
/// log closes: an exchange the drain cut short still gets its record.
#[derive(Default)]
pub struct PendingLogs {
    count: std::sync::atomic::AtomicUsize,
    done: tokio::sync::Notify,
}

impl PendingLogs {
    fn hold(self: &Arc<Self>) -> PendingLog {
        self.count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        PendingLog(self.clone())
    }

    /// Waits until every log phase begun has returned.
    pub async fn settled(&self) {
        loop {
            let done = self.done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.count.load(std::sync::atomic::Ordering::Acquire) == 0 {
                return;
            }
            done.await;
        }
    }
}

/// One log phase under way.
struct PendingLog(Arc<PendingLogs>);

impl Drop for PendingLog {
    fn drop(&mut self) {
        if self
            .0
            .count
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.0.done.notify_waiters();
        }
    }
}

/// What the end of one exchange needs.
pub(super) struct Open {
    pub(super) route: Arc<Route>,
    pub(super) pending: Arc<PendingLogs>,
    pub(super) ex: Exchange,
    /// The status of the answer's head, as sent.
    pub(super) status: StatusCode,
    pub(super) _in_flight: InFlight,
    pub(super) leases: Vec<Lease>,
}

/// An exchange that has not ended yet. It ends exactly once: through [`Finish::end`],
/// or, when whatever holds it is dropped first (the client went away while the
/// upstream was still thinking, or mid-body), as 499 from its `Drop`.
pub(super) struct Finish(Option<Box<Open>>);

impl std::ops::Deref for Finish {
    type Target = Open;

    fn deref(&self) -> &Open {
        self.0
            .as_ref()
            .expect("an exchange is used only until it ends")
    }
}

impl std::ops::DerefMut for Finish {
    fn deref_mut(&mut self) -> &mut Open {
        self.0
            .as_mut()
            .expect("an exchange is used only until it ends")
    }
}

impl Finish {
    pub(super) fn new(open: Open) -> Self {
        Self(Some(Box::new(open)))
    }

    /// Records the end and returns the log phases to run (None when the route has no
    /// filters, or the exchange had ended already).
    pub(super) fn end(&mut self, ending: Ending) -> Option<LogFuture> {
        let mut open = self.0.take()?;
        let status = match ending {
            Ending::Complete => open.status,
            Ending::ClientGone => {
                StatusCode::from_u16(CLIENT_CLOSED_REQUEST).expect("499 is a valid status")
            }
            Ending::UpstreamCut => StatusCode::BAD_GATEWAY,
        };
        open.ex.end = Some(End {
            status,
            ending,
            latency: open.ex.started.elapsed(),
        });
        if ending == Ending::UpstreamCut {
            if let Some(version) = open.ex.answered_by() {
                open.route.metrics.upstream_error(version, BODY_CUT);
            }
        }
        open.route.observe(&open.ex);
        if open.route.chain.is_empty() {
            return None;
        }
        let pending = open.pending.hold();
        Some(Box::pin(async move {
            let result = open.route.chain.on_log(&open.ex).await;
            drop(open);
            drop(pending);
            result
        }))
    }

    /// Ends the exchange now and waits for its log phases (an answer with no body to
    /// hold back).
    pub(super) async fn end_now(mut self) {
        if let Some(log) = self.end(Ending::Complete) {
            let _ = log.await;
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        if let Some(log) = self.end(Ending::ClientGone) {
            spawn_log(log);
        }
    }
}

enum State {
    Streaming(Finish),
    /// The body has ended; its last frame waits for the log phases.
    Logging {
        log: LogFuture,
        held: Option<Frame<Bytes>>,
    },
    Done,
}

/// The body of every answer the proxy sends: when it belongs to an exchange still to
/// end, it ends it when it ends. (One type for both, so that the proxy's answers are
/// not boxed twice.)
pub struct LoggedBody {
    body: Body,
    state: State,
}

impl LoggedBody {
    pub(super) fn new(body: Body, finish: Finish) -> Self {
        Self {
            body,
            state: State::Streaming(finish),
        }
    }
}

impl From<Body> for LoggedBody {
    /// A body that ends nothing (an answer made before any exchange began).
    fn from(body: Body) -> Self {
        Self {
            body,
            state: State::Done,
        }
    }
}

impl LoggedBody {
    fn start_end(&mut self, ending: Ending, held: Option<Frame<Bytes>>) -> Option<Frame<Bytes>> {
        let State::Streaming(mut finish) = std::mem::replace(&mut self.state, State::Done) else {
            return held;
        };
        match finish.end(ending) {
            Some(log) => {
                self.state = State::Logging { log, held };
                None
            }
            None => held,
        }
    }
}

impl hyper::body::Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Streaming(_) => match Pin::new(&mut this.body).poll_frame(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(Ok(frame))) if !this.body.is_end_stream() => {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                    // The last frame: held back while the log phases run.
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(frame) = this.start_end(Ending::Complete, Some(frame)) {
                            return Poll::Ready(Some(Ok(frame)));
                        }
                    }
                    Poll::Ready(None) => {
                        this.start_end(Ending::Complete, None);
                    }
                    // The upstream cut its body: the client's answer fails too, and
                    // nothing is held back for the log phases.
                    Poll::Ready(Some(Err(e))) => {
                        if let State::Streaming(mut finish) =
                            std::mem::replace(&mut this.state, State::Done)
                        {
                            if let Some(log) = finish.end(Ending::UpstreamCut) {
                                spawn_log(log);
                            }
                        }
                        return Poll::Ready(Some(Err(e)));
                    }
                },
                State::Logging { log, held } => {
                    let result = match log.as_mut().poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(result) => result,
                    };
                    let held = held.take();
                    this.state = State::Done;
                    return match result {
                        // The client must not see as complete an exchange whose log
                        // phase failed (an audit record that was not written).
                        Err(e) => Poll::Ready(Some(Err(Box::new(e)))),
                        Ok(()) => Poll::Ready(held.map(Ok)),
                    };
                }
                // Nothing (more) to end: the body as it is.
                State::Done => return Pin::new(&mut this.body).poll_frame(cx),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.state, State::Done) && self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        // Streaming: the Finish's own drop ends the exchange as 499. Logging: the
        // answer was read to its end, and the client went before the log phases were
        // done; they finish on their own.
        if let State::Logging { log, .. } = std::mem::replace(&mut self.state, State::Done) {
            spawn_log(log);
        }
    }
}

fn spawn_log(log: LogFuture) {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(async move {
                let _ = log.await;
            });
        }
        Err(_) => tracing::warn!("no runtime to finish an exchange's log phases on"),
    }
}
