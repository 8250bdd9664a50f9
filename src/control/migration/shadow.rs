//! Shadow mode: at the migration's step 0, requests bound for blue are mirrored to
//! green. The client always gets blue's answer; green's answer goes through the
//! route's response and log phases (so the acge and hash filters judge it, and the
//! audit log records it as `shadow`), feeds green's migration windows, and is compared
//! with blue's (`acge_shadow_mismatch_total`).
//!
//! The data plane forks the request after its request phases
//! ([`crate::proxy::route::Mirror`]): green never receives a request the chain refused,
//! and gets the headers the phases set. Mirroring never slows blue down: a request is
//! mirrored only while fewer than `max_inflight` mirrors are running (tokio semaphore,
//! `try_acquire`), and only when its body has a declared length within the route's
//! `max_body_bytes` (the body must be held whole to be sent twice; a streamed upload of
//! unknown length is not mirrored).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use acge_filters::{Answer, End, Ending, Source, Version};
use http::{HeaderName, HeaderValue};
use metrics::{counter, Counter};
use tokio::sync::Semaphore;

use crate::config::ShadowConfig;
use crate::proxy::body::{full_body, read_whole, Bounds, Budget};
use crate::proxy::error::ProxyError;
use crate::proxy::route::{Mirror, Mirrored, Route, StartMirror};
use crate::proxy::upstream::BODY_CUT;
use crate::telemetry::{SHADOW_MISMATCH_TOTAL, SHADOW_REQUESTS_TOTAL};

/// Marks a mirrored request, so that green (and its logs) can tell.
pub const SHADOW_HEADER: HeaderName = HeaderName::from_static("x-acge-shadow");

/// How long a mirror waits for blue's answer to compare with.
const COMPARE_WAIT: Duration = Duration::from_secs(60);

/// How long green's mirrored answer body may take.
const GREEN_BODY_WAIT: Duration = Duration::from_secs(30);

/// A route's mirroring state; the migration controller switches it on and off.
pub struct Shadow {
    active: AtomicBool,
    /// Mirror a request when the Weyl sequence below lands under this point.
    point: u64,
    sequence: AtomicU64,
    slots: Arc<Semaphore>,
    ignore_fields: Arc<[String]>,
    counters: Arc<Counters>,
    /// Green's answers are held whole for the comparison; they count in a budget of
    /// their own, so mirrors never take room from clients' bodies.
    budget: Arc<Budget>,
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
            ignore_fields: config.ignore_fields.clone().into(),
            counters: Arc::new(Counters {
                mirrored: result("mirrored"),
                busy: result("skipped_busy"),
                unbuffered: result("skipped_body"),
                mismatch_status: mismatch("status"),
                mismatch_body: mismatch("body"),
            }),
            budget: Budget::new(64 * 1024 * 1024),
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

impl Mirror for Shadow {
    fn admit(&self, declared_body: Option<u64>, max_body: u64) -> Option<StartMirror> {
        if !self.is_active() || !self.sampled() {
            return None;
        }
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            self.counters.busy.increment(1);
            return None;
        };
        if declared_body.is_none_or(|n| n > max_body) {
            self.counters.unbuffered.increment(1);
            return None;
        }
        self.counters.mirrored.increment(1);
        let counters = self.counters.clone();
        let ignore = self.ignore_fields.clone();
        let budget = self.budget.clone();
        Some(Box::new(move |route, copy| {
            tokio::spawn(async move {
                let _permit = permit;
                mirror(route, copy, &counters, &ignore, &budget).await;
            });
        }))
    }
}

async fn mirror(
    route: Arc<Route>,
    copy: Mirrored,
    counters: &Counters,
    ignore: &[String],
    budget: &Arc<Budget>,
) {
    let Mirrored {
        exchange: mut ex,
        body,
        forwarded,
        blue,
    } = copy;
    let started = Instant::now();
    ex.request
        .headers
        .insert(SHADOW_HEADER, HeaderValue::from_static("true"));
    let sent = route
        .green
        .send(&ex.request, full_body(body), &forwarded)
        .await;
    let latency = started.elapsed();
    let answer = match sent {
        Ok(res) => {
            let (parts, body) = res.into_parts();
            let bounds = Bounds {
                limit: route.max_body_bytes,
                timeout: GREEN_BODY_WAIT,
                upstream: true,
            };
            match read_whole(body, None, bounds, budget).await {
                Ok((bytes, _)) => Answer {
                    status: parts.status,
                    headers: parts.headers,
                    body: Some(bytes),
                    source: Source::Upstream(Version::Green),
                },
                // A body green cut (or one too large to compare) is green's failure,
                // and its gates see it so.
                Err(e) => {
                    if matches!(e, ProxyError::UpstreamBodyCut(_)) {
                        route.metrics.upstream_error(Version::Green, BODY_CUT);
                    }
                    acge_filters::answer_of(e.into_response())
                }
            }
        }
        Err(e) => {
            route.metrics.upstream_error(Version::Green, e.kind());
            acge_filters::answer_of(ProxyError::Upstream(e).into_response())
        }
    };
    ex.response = Some(answer);
    route.chain.on_response(&mut ex).await;
    let answer = ex
        .response
        .as_ref()
        .expect("the response phases leave an answer");
    let (status, green_body) = (answer.status, answer.body.clone());
    ex.end = Some(End {
        status,
        ending: Ending::Complete,
        latency,
    });
    route.observe(&ex);
    let _ = route.chain.on_log(&ex).await;

    let Ok(Ok(blue)) = tokio::time::timeout(COMPARE_WAIT, blue).await else {
        return;
    };
    if blue.status / 100 != status.as_u16() / 100 {
        counters.mismatch_status.increment(1);
    } else if let (Some(b), Some(g)) = (blue.body, green_body) {
        if !same_json(&b, &g, ignore) {
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
