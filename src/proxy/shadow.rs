//! Shadow mode: at the migration's step 0, requests bound for blue are mirrored to
//! green. The client always gets blue's answer; green's answer goes through the
//! route's response phases (so the acge and hash filters judge it), feeds green's
//! migration windows, and is compared with blue's (`acge_shadow_mismatch_total`).
//!
//! Mirroring never slows blue down: a request is mirrored only while fewer than
//! `max_inflight` mirrors are running (tokio semaphore, `try_acquire`), and only when
//! its body has a declared length within the route's `max_body_bytes` (the body must be
//! read whole to be sent twice; a streamed upload of unknown length is not mirrored).
//! Blue's response body is read whole for the comparison only when its declared length
//! is within that limit; otherwise only the status classes are compared.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use acge_filters::hash::HashChecks;
use acge_filters::{Attributes, ResponseCtx, ResponseJudgement, ShadowExchange};
use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Body as _;
use metrics::{counter, Counter};
use tokio::sync::{oneshot, Semaphore};

use crate::config::ShadowConfig;
use crate::metrics::window::Outcome;
use crate::metrics::{SHADOW_MISMATCH_TOTAL, SHADOW_REQUESTS_TOTAL};
use crate::split::{Route, Version};
use crate::Body;

/// Marks a mirrored request, so that green (and its logs) can tell.
pub const SHADOW_HEADER: HeaderName = HeaderName::from_static("x-acge-shadow");

/// How long a mirror waits for blue's answer to compare with.
const COMPARE_WAIT: Duration = Duration::from_secs(60);

/// A route's mirroring state; the migration controller switches it on and off.
pub struct Shadow {
    active: AtomicBool,
    /// Mirror a request when the Weyl sequence below lands under this point.
    point: u64,
    sequence: AtomicU64,
    slots: Arc<Semaphore>,
    ignore_fields: Vec<String>,
    counters: Counters,
}

struct Counters {
    mirrored: Counter,
    busy: Counter,
    unbuffered: Counter,
    mismatch_status: Counter,
    mismatch_body: Counter,
}

impl Shadow {
    pub fn new(route: &str, config: &ShadowConfig) -> Self {
        let result = |r: &'static str| counter!(SHADOW_REQUESTS_TOTAL, "route" => route.to_string(), "result" => r);
        let mismatch = |k: &'static str| counter!(SHADOW_MISMATCH_TOTAL, "route" => route.to_string(), "kind" => k);
        Self {
            active: AtomicBool::new(false),
            point: (config.fraction.clamp(0.0, 1.0) * u64::MAX as f64) as u64,
            sequence: AtomicU64::new(0),
            slots: Arc::new(Semaphore::new(config.max_inflight.max(1))),
            ignore_fields: config.ignore_fields.clone(),
            counters: Counters {
                mirrored: result("mirrored"),
                busy: result("skipped_busy"),
                unbuffered: result("skipped_body"),
                mismatch_status: mismatch("status"),
                mismatch_body: mismatch("body"),
            },
        }
    }

    pub fn set_active(&self, active: bool) {
        self.active.store(active, Ordering::Release);
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Whether this request is in the sampled fraction (an evenly spread sequence, as
    /// the splitter's).
    fn sampled(&self) -> bool {
        const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;
        let n = self.sequence.fetch_add(1, Ordering::Relaxed);
        n.wrapping_mul(GOLDEN) < self.point || self.point == u64::MAX
    }
}

/// A mirror under way: hand it blue's answer with [`Mirror::finish`].
pub struct Mirror {
    blue: oneshot::Sender<(u16, Option<Bytes>)>,
    limit: u64,
}

/// Starts a mirror of `req` to green when the route is in shadow mode and the request
/// qualifies; returns the request to send on (its body read whole when mirrored), or
/// the answer for a client whose body failed while it was read.
pub async fn fork(
    route: &Arc<Route>,
    req: Request<Body>,
    request_id: &HeaderValue,
) -> Result<(Request<Body>, Option<Mirror>), Response<Body>> {
    let shadow = &route.shadow;
    if !shadow.is_active() || !shadow.sampled() {
        return Ok((req, None));
    }
    let Ok(permit) = shadow.slots.clone().try_acquire_owned() else {
        shadow.counters.busy.increment(1);
        return Ok((req, None));
    };
    let within_limit = declared_length(req.headers()).is_some_and(|n| n <= route.max_body_bytes);
    if !within_limit && !req.body().is_end_stream() {
        shadow.counters.unbuffered.increment(1);
        return Ok((req, None));
    }
    let (parts, body) = req.into_parts();
    let limit = usize::try_from(route.max_body_bytes).unwrap_or(usize::MAX);
    let bytes = match read_limited(body, limit).await {
        Ok(bytes) => bytes,
        Err(why) => {
            return Err(crate::local(acge_filters::json_error(
                http::StatusCode::BAD_REQUEST,
                "bad_body",
                format!("the request body could not be read: {why}"),
            )));
        }
    };
    shadow.counters.mirrored.increment(1);
    let mut green_req = Request::from_parts(parts.clone(), crate::proxy::full_body(bytes.clone()));
    green_req
        .headers_mut()
        .insert(SHADOW_HEADER, HeaderValue::from_static("true"));
    green_req
        .headers_mut()
        .insert(crate::proxy::X_REQUEST_ID, request_id.clone());
    let (tx, rx) = oneshot::channel();
    let route = route.clone();
    tokio::spawn(async move {
        let _permit = permit;
        mirror(route, green_req, rx).await;
    });
    Ok((
        Request::from_parts(parts, crate::proxy::full_body(bytes)),
        Some(Mirror {
            blue: tx,
            limit: limit as u64,
        }),
    ))
}

impl Mirror {
    /// Passes blue's answer on to the mirror for comparison and returns it to be sent
    /// to the client (its body read whole first when it is small enough).
    pub async fn finish(self, res: Response<Body>) -> Response<Body> {
        let status = res.status().as_u16();
        if declared_length(res.headers()).is_none_or(|n| n > self.limit) {
            let _ = self.blue.send((status, None));
            return res;
        }
        let (parts, body) = res.into_parts();
        match body.collect().await {
            Ok(b) => {
                let bytes = b.to_bytes();
                let _ = self.blue.send((status, Some(bytes.clone())));
                Response::from_parts(parts, crate::proxy::full_body(bytes))
            }
            Err(e) => {
                // The client would have seen the same failure mid-body.
                tracing::debug!(error = %e, "blue's body failed while read for the shadow comparison");
                let _ = self.blue.send((status, None));
                Response::from_parts(parts, crate::empty_body())
            }
        }
    }
}

async fn mirror(
    route: Arc<Route>,
    req: Request<Body>,
    blue: oneshot::Receiver<(u16, Option<Bytes>)>,
) {
    let started = Instant::now();
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let request_id: Arc<str> = req
        .headers()
        .get(crate::proxy::X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .into();
    let (outcome, green_body) = match route.green.send(req).await {
        Ok(res) => {
            let latency = started.elapsed();
            let (parts, body) = res.into_parts();
            let limit = usize::try_from(route.max_body_bytes).unwrap_or(usize::MAX);
            let body = read_limited(body, limit).await.ok();
            let mut ctx = ResponseCtx {
                status: parts.status,
                headers: parts.headers,
                body: body.clone(),
                route: route.name.clone(),
                request_id,
                method,
                path,
                version: Some(Version::Green.as_str()),
                elapsed: latency,
                attributes: Attributes::default(),
            };
            ctx.attributes.insert(ShadowExchange);
            route.chain.on_response(&mut ctx).await;
            let outcome = Outcome {
                status: ctx.status.as_u16(),
                latency,
                compliant: ctx
                    .attributes
                    .get::<ResponseJudgement>()
                    .map(|j| j.compliant),
                hash_ok: ctx
                    .attributes
                    .get::<HashChecks>()
                    .and_then(|c| c.response)
                    .map(|r| r.consistent()),
            };
            (outcome, body)
        }
        Err(e) => (
            Outcome {
                status: e.status().as_u16(),
                latency: started.elapsed(),
                compliant: None,
                hash_ok: None,
            },
            None,
        ),
    };
    if let Some(windows) = &route.windows {
        windows.record(Version::Green, &outcome);
    }
    let Ok(Ok((blue_status, blue_body))) = tokio::time::timeout(COMPARE_WAIT, blue).await else {
        return;
    };
    let counters = &route.shadow.counters;
    if blue_status / 100 != outcome.status / 100 {
        counters.mismatch_status.increment(1);
    } else if let (Some(b), Some(g)) = (blue_body, green_body) {
        if !same_json(&b, &g, &route.shadow.ignore_fields) {
            counters.mismatch_body.increment(1);
        }
    }
}

/// Whether two bodies are the same JSON, top-level `ignore` fields left out; bodies
/// that are not JSON are compared byte for byte.
fn same_json(a: &[u8], b: &[u8], ignore: &[String]) -> bool {
    let parse = |x: &[u8]| {
        serde_json::from_slice::<serde_json::Value>(x)
            .ok()
            .map(|mut v| {
                if let Some(o) = v.as_object_mut() {
                    for k in ignore {
                        o.remove(k);
                    }
                }
                v
            })
    };
    match (parse(a), parse(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

/// The whole body, or why not: it failed, or it is longer than `limit`.
async fn read_limited(mut body: Body, limit: usize) -> Result<Bytes, String> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(format!("longer than {limit} bytes"));
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_bodies_compare_without_the_ignored_fields() {
        let ignore = vec!["backend".to_string()];
        assert!(same_json(
            br#"{"a":1,"backend":"blue"}"#,
            br#"{"backend":"green","a":1}"#,
            &ignore
        ));
        assert!(!same_json(br#"{"a":1}"#, br#"{"a":2}"#, &ignore));
        assert!(same_json(b"plain", b"plain", &ignore));
        assert!(!same_json(b"plain", b"other", &ignore));
    }
}
