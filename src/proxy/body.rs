//! Bodies: the one body type the proxy moves, and holding a body whole when a filter
//! (or a mirror) needs it, within its limits.
//!
//! A whole body is bounded three ways: by the route's `max_body_bytes` (413, or 502 for
//! an upstream's answer), by the time it may take to arrive (`body_read_timeout_ms`,
//! 408), and by the listener's budget for bytes held at once over all requests
//! (`max_buffered_bytes`, 503): a thousand slow uploads cannot hold a gigabyte.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, CONTENT_LENGTH};
use http::Response;
use http_body_util::{BodyExt, Empty, Full};

use super::error::ProxyError;
use crate::telemetry::{refused, Refusal};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of everything the proxy sends or receives: streamed, boxed once.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A locally made response, in the proxy's body type.
pub fn local(res: acge_filters::LocalResponse) -> Response<Body> {
    res.map(|b| b.map_err(|never| match never {}).boxed_unsync())
}

pub fn full(bytes: Bytes) -> Response<Body> {
    Response::new(full_body(bytes))
}

pub fn full_body(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty_body() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// The `content-length` a message declares, when it declares one that parses.
pub fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// The listener's budget of body bytes held whole at once.
pub struct Budget {
    held: AtomicU64,
    max: u64,
}

/// Bytes of the budget one body holds; given back when dropped.
pub struct Lease {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Budget {
    pub fn new(max: u64) -> Arc<Self> {
        Arc::new(Self {
            held: AtomicU64::new(0),
            max,
        })
    }

    pub fn held(&self) -> u64 {
        self.held.load(Ordering::Acquire)
    }

    fn take(&self, bytes: u64) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|n| *n <= self.max)
            })
            .is_ok()
    }

    fn lease(self: &Arc<Self>, bytes: u64) -> Option<Lease> {
        self.take(bytes).then(|| Lease {
            budget: self.clone(),
            bytes,
        })
    }
}

impl Lease {
    /// Holds `more` bytes besides; false when the budget has no room.
    fn grow(&mut self, more: u64) -> bool {
        let ok = self.budget.take(more);
        if ok {
            self.bytes += more;
        }
        ok
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.budget.held.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// How a whole body may be read.
#[derive(Clone, Copy)]
pub struct Bounds {
    pub limit: u64,
    pub timeout: Duration,
    /// The body is an upstream's answer: over the limit is a 502, not a 413.
    pub upstream: bool,
}

/// Reads a whole body within `bounds` and the budget, refusing at once when the
/// declared length is over the limit (before anything is read, so no `100 Continue`
/// goes out).
pub async fn read_whole(
    mut body: Body,
    declared: Option<u64>,
    bounds: Bounds,
    budget: &Arc<Budget>,
) -> Result<(Bytes, Lease), ProxyError> {
    let too_large = |size: String| {
        if bounds.upstream {
            ProxyError::ResponseTooLarge {
                limit: bounds.limit,
            }
        } else {
            ProxyError::PayloadTooLarge {
                size,
                limit: bounds.limit,
            }
        }
    };
    if let Some(n) = declared.filter(|n| *n > bounds.limit) {
        return Err(too_large(format!("{n} bytes")));
    }
    let over_budget = || {
        refused(Refusal::BufferBudget);
        ProxyError::Overloaded("the proxy holds as many bodies as it may; try again shortly")
    };
    let mut lease = budget
        .lease(declared.unwrap_or(0))
        .ok_or_else(over_budget)?;
    let deadline = tokio::time::Instant::now() + bounds.timeout;
    let mut buf = bytes::BytesMut::with_capacity(declared.unwrap_or(0) as usize);
    loop {
        let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
            Ok(Some(frame)) => frame,
            Ok(None) => break,
            Err(_) => {
                if !bounds.upstream {
                    refused(Refusal::BodyTimeout);
                    return Err(ProxyError::BodyTimeout(bounds.timeout));
                }
                return Err(ProxyError::UpstreamBodyCut(format!(
                    "it did not arrive within {:?}",
                    bounds.timeout
                )));
            }
        };
        let frame = frame.map_err(|e| {
            if bounds.upstream {
                ProxyError::UpstreamBodyCut(e.to_string())
            } else {
                ProxyError::BadBody(e.to_string())
            }
        })?;
        if let Ok(data) = frame.into_data() {
            let len = (buf.len() + data.len()) as u64;
            if len > bounds.limit {
                return Err(too_large("over the limit".into()));
            }
            if len > lease.bytes && !lease.grow(len - lease.bytes) {
                return Err(over_budget());
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok((buf.freeze(), lease))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_shared_and_given_back() {
        let budget = Budget::new(100);
        let mut a = budget.lease(60).unwrap();
        assert!(budget.lease(50).is_none(), "60 + 50 is over 100");
        let b = budget.lease(40).unwrap();
        assert!(!a.grow(1));
        drop(b);
        assert!(a.grow(40));
        assert_eq!(budget.held(), 100);
        drop(a);
        assert_eq!(budget.held(), 0);
    }
}
