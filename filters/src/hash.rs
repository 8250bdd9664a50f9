//! The `constitutional_hash` filter: requests and responses carry
//! `x-constitutional-hash`, and it must be the configured constitution's.
//!
//! | mode      | request without / with another hash      | response with another hash (or none) |
//! | --------- | ---------------------------------------- | ------------------------------------ |
//! | `enforce` | 403 JSON naming the expected hash        | 502 JSON `constitutional_hash_mismatch` |
//! | `audit`   | forwarded, counted, annotated            | passed on, counted, annotated        |
//! | `stamp`   | a missing hash is added (legacy clients); another is counted and forwarded | counted, annotated |
//!
//! "Annotated" means the result travels in `x-acge-hash-check` (on the forwarded request,
//! and on the response to the client). Every check counts in `acge_hash_checks_total`;
//! per route and version the share of consistent responses is kept for the migration
//! gate ([`HashFilter::consistency`]) and exported as `acge_hash_consistency_ratio`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use http::{HeaderName, HeaderValue, StatusCode};
use metrics::{Counter, Gauge};
use serde::{Deserialize, Serialize};

use crate::metrics::{HASH_CHECKS_TOTAL, HASH_CONSISTENCY_RATIO};
use crate::{json_error, Exchange, Filter, RequestCtx, ResponseCtx, Verdict};

pub const HASH_HEADER: HeaderName = HeaderName::from_static("x-constitutional-hash");
pub const CHECK_HEADER: HeaderName = HeaderName::from_static("x-acge-hash-check");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HashMode {
    #[default]
    Enforce,
    Audit,
    Stamp,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HashConfig {
    #[serde(default)]
    pub mode: HashMode,
}

/// What one check found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashResult {
    Match = 0,
    Missing = 1,
    Mismatch = 2,
    /// Missing on a request, and added in stamp mode.
    Stamped = 3,
}

impl HashResult {
    pub fn as_str(self) -> &'static str {
        match self {
            HashResult::Match => "match",
            HashResult::Missing => "missing",
            HashResult::Mismatch => "mismatch",
            HashResult::Stamped => "stamped",
        }
    }

    /// The right hash arrived, or the filter put it there.
    pub fn consistent(self) -> bool {
        matches!(self, HashResult::Match | HashResult::Stamped)
    }
}

/// The checks of one exchange, left as an attribute for later filters (the audit log).
#[derive(Debug, Clone, Copy, Default)]
pub struct HashChecks {
    pub request: Option<HashResult>,
    pub response: Option<HashResult>,
}

type RouteVersion = (Arc<str>, &'static str);

/// What one route and version has seen, with its metric handles registered once.
struct Stats {
    consistent: AtomicU64,
    total: AtomicU64,
    ratio: Gauge,
    /// By [`HashResult`] index, per direction.
    requests: [Counter; 4],
    responses: [Counter; 4],
}

impl Stats {
    fn new(route: &str, version: &'static str) -> Self {
        let counters = |direction: &'static str| {
            RESULTS.map(|r| {
                metrics::counter!(HASH_CHECKS_TOTAL,
                    "route" => route.to_string(), "version" => version,
                    "direction" => direction, "result" => r.as_str())
            })
        };
        Self {
            consistent: AtomicU64::new(0),
            total: AtomicU64::new(0),
            ratio: metrics::gauge!(HASH_CONSISTENCY_RATIO, "route" => route.to_string(), "version" => version),
            requests: counters("request"),
            responses: counters("response"),
        }
    }
}

const RESULTS: [HashResult; 4] = [
    HashResult::Match,
    HashResult::Missing,
    HashResult::Mismatch,
    HashResult::Stamped,
];

pub struct HashFilter {
    expected: HeaderValue,
    expected_text: String,
    mode: HashMode,
    stats: RwLock<HashMap<RouteVersion, Arc<Stats>>>,
}

impl HashFilter {
    /// `expected` must be a valid header value; the config validates it.
    pub fn new(
        expected: &str,
        config: &HashConfig,
    ) -> Result<Self, http::header::InvalidHeaderValue> {
        Ok(Self {
            expected: HeaderValue::from_str(expected)?,
            expected_text: expected.to_string(),
            mode: config.mode,
            stats: RwLock::new(HashMap::new()),
        })
    }

    fn check(&self, value: Option<&HeaderValue>) -> HashResult {
        match value {
            None => HashResult::Missing,
            Some(v) if v == self.expected => HashResult::Match,
            Some(_) => HashResult::Mismatch,
        }
    }

    /// The share of `version`'s responses on `route` that carried the right hash, or
    /// None before any was checked.
    pub fn consistency(&self, route: &str, version: &str) -> Option<f64> {
        let map = self
            .stats
            .read()
            .expect("never poisoned: no panics under the lock");
        let c = map
            .iter()
            .find(|((r, v), _)| &**r == route && *v == version)?
            .1;
        let total = c.total.load(Ordering::Relaxed);
        (total > 0).then(|| c.consistent.load(Ordering::Relaxed) as f64 / total as f64)
    }

    /// The stats of one route and version; registered on first use, then read-locked.
    fn stats(&self, route: &Arc<str>, version: &'static str) -> Arc<Stats> {
        let key = (route.clone(), version);
        if let Some(s) = self
            .stats
            .read()
            .expect("never poisoned: no panics under the lock")
            .get(&key)
        {
            return s.clone();
        }
        self.stats
            .write()
            .expect("never poisoned: no panics under the lock")
            .entry(key)
            .or_insert_with(|| Arc::new(Stats::new(route, version)))
            .clone()
    }

    fn record_response(&self, route: &Arc<str>, version: &'static str, result: HashResult) {
        let s = self.stats(route, version);
        let ok = u64::from(result.consistent());
        let total = s.total.fetch_add(1, Ordering::Relaxed) + 1;
        let consistent = s.consistent.fetch_add(ok, Ordering::Relaxed) + ok;
        s.ratio.set(consistent as f64 / total as f64);
        s.responses[result as usize].increment(1);
    }
}

#[async_trait]
impl Filter for HashFilter {
    fn name(&self) -> &'static str {
        "constitutional_hash"
    }

    async fn on_request(&self, req: &mut RequestCtx) -> Verdict {
        let mut result = self.check(req.headers.get(HASH_HEADER));
        if self.mode == HashMode::Stamp && result == HashResult::Missing {
            req.headers.insert(HASH_HEADER, self.expected.clone());
            result = HashResult::Stamped;
        }
        req.attributes.insert(HashChecks {
            request: Some(result),
            response: None,
        });
        if self.mode == HashMode::Enforce && !result.consistent() {
            let got = match req.headers.get(HASH_HEADER) {
                Some(v) => format!("`{}`", String::from_utf8_lossy(v.as_bytes())),
                None => "no x-constitutional-hash header".to_string(),
            };
            return Verdict::Respond(json_error(
                StatusCode::FORBIDDEN,
                "constitutional_hash_required",
                format!(
                    "expected x-constitutional-hash: {}, got {got}",
                    self.expected_text
                ),
            ));
        }
        if self.mode != HashMode::Enforce {
            req.headers
                .insert(CHECK_HEADER, HeaderValue::from_static(result.as_str()));
        }
        Verdict::Continue
    }

    async fn on_response(&self, res: &mut ResponseCtx) -> Verdict {
        // Answers the proxy made itself carry no upstream hash to check.
        let Some(version) = res.version else {
            return Verdict::Continue;
        };
        let result = self.check(res.headers.get(HASH_HEADER));
        self.record_response(&res.route, version, result);
        let mut checks = res
            .attributes
            .get::<HashChecks>()
            .copied()
            .unwrap_or_default();
        checks.response = Some(result);
        res.attributes.insert(checks);
        if self.mode == HashMode::Enforce && !result.consistent() {
            return Verdict::Respond(json_error(
                StatusCode::BAD_GATEWAY,
                "constitutional_hash_mismatch",
                format!(
                    "the {version} upstream answered with {} instead of x-constitutional-hash: {}",
                    match res.headers.get(HASH_HEADER) {
                        Some(v) => format!(
                            "x-constitutional-hash: {}",
                            String::from_utf8_lossy(v.as_bytes())
                        ),
                        None => "no x-constitutional-hash header".to_string(),
                    },
                    self.expected_text
                ),
            ));
        }
        if self.mode != HashMode::Enforce {
            res.headers
                .insert(CHECK_HEADER, HeaderValue::from_static(result.as_str()));
        }
        Verdict::Continue
    }

    fn on_log(&self, done: &Exchange) {
        // Requests are counted here, once the version they went to is known.
        if let Some(result) = done.attributes.get::<HashChecks>().and_then(|c| c.request) {
            self.stats(&done.route, done.version.unwrap_or("none"))
                .requests[result as usize]
                .increment(1);
        }
    }
}
