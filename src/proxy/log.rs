//! The log phase's guarantee: it runs exactly once per exchange, when the response body
//! has been sent, or when whatever holds the exchange is dropped first (the client went
//! away: status 499, or the upstream failed mid-body).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use acge_filters::{Attributes, Chain, Exchange, CLIENT_CLOSED_REQUEST};
use bytes::Bytes;
use http::{Method, StatusCode};
use hyper::body::Body as _;

use crate::split::{Route, Version};
use crate::Body;

/// Runs the route's log phase exactly once: when the response body ends, or when
/// whatever holds it is dropped (the client went away, the upstream failed mid-way).
pub(super) struct LogGuard {
    chain: Chain,
    exchange: Option<Exchange>,
    pub(super) start: Instant,
}

impl LogGuard {
    pub(super) fn new(
        route: &Route,
        request_id: &Arc<str>,
        method: &Method,
        path: &str,
        start: Instant,
    ) -> Self {
        Self {
            chain: route.chain.clone(),
            exchange: Some(Exchange {
                route: route.name.clone(),
                request_id: request_id.clone(),
                method: method.clone(),
                path: path.to_string(),
                version: None,
                status: StatusCode::from_u16(CLIENT_CLOSED_REQUEST).expect("499 is a valid status"),
                completed: false,
                latency: Duration::ZERO,
                attributes: Attributes::default(),
            }),
            start,
        }
    }

    /// The exchange as it stands; present until the log phase has run.
    pub(super) fn exchange(&self) -> &Exchange {
        self.exchange
            .as_ref()
            .expect("the log phase runs only when the guard completes or drops")
    }

    pub(super) fn version(&mut self, version: Version) {
        if let Some(e) = &mut self.exchange {
            e.version = Some(version.as_str());
        }
    }

    pub(super) fn answered(&mut self, status: StatusCode, attributes: Attributes) {
        if let Some(e) = &mut self.exchange {
            e.status = status;
            e.attributes = attributes;
        }
    }

    fn complete(&mut self) {
        if let Some(e) = &mut self.exchange {
            e.completed = true;
        }
        self.fire();
    }

    fn fire(&mut self) {
        if let Some(mut e) = self.exchange.take() {
            e.latency = self.start.elapsed();
            if !e.completed {
                e.status =
                    StatusCode::from_u16(CLIENT_CLOSED_REQUEST).expect("499 is a valid status");
            }
            self.chain.on_log(&e);
        }
    }
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        self.fire();
    }
}

/// A response body that completes its exchange's log when it ends.
pub(super) struct LoggedBody {
    pub(super) body: Body,
    pub(super) log: Option<LogGuard>,
}

impl hyper::body::Body for LoggedBody {
    type Data = Bytes;
    type Error = crate::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => self.body.is_end_stream(),
            _ => false,
        };
        if ended {
            if let Some(mut log) = self.log.take() {
                log.complete();
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

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some(mut log) = self.log.take() {
            // An empty body is never polled: it was complete when it was sent.
            if self.body.is_end_stream() {
                log.complete();
            }
        }
    }
}
