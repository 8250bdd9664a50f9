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
//! gate (through [`crate::Findings`]) and exported as `acge_hash_consistency_ratio`.
//! A header with more than one value is a mismatch, whatever the values are: two
//! hashes are never one constitution.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use metrics::{Counter, Gauge};
use serde::{Deserialize, Serialize};

use crate::metrics::{HASH_CHECKS_TOTAL, HASH_CONSISTENCY_RATIO};
use crate::{json_error, Exchange, Filter, LogError, Verdict, Version};

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

/// The filter's settings, shared by every route that lists it.
pub struct HashFilter {
    expected: HeaderValue,
    expected_text: String,
    mode: HashMode,
}

/// The filter bound to one route, with that route's metric handles.
pub struct RouteHashFilter {
    shared: Arc<HashFilter>,
    /// Blue, green, none ([`Version::index`]).
    stats: [Stats; 3],
}

/// What one header check saw.
struct Seen<'a> {
    result: HashResult,
    values: usize,
    first: Option<&'a HeaderValue>,
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
        })
    }

    /// Binds the filter to `route`, registering its metric handles.
    pub fn for_route(self: &Arc<Self>, route: &str) -> RouteHashFilter {
        RouteHashFilter {
            shared: self.clone(),
            stats: [
                Stats::new(route, Version::Blue.as_str()),
                Stats::new(route, Version::Green.as_str()),
                Stats::new(route, "none"),
            ],
        }
    }

    /// One value, equal to the expected hash, matches; none is missing; another value,
    /// or more than one value (whatever they are), is a mismatch.
    fn check<'a>(&self, headers: &'a HeaderMap) -> Seen<'a> {
        let mut all = headers.get_all(HASH_HEADER).iter();
        let first = all.next();
        let values = usize::from(first.is_some()) + all.count();
        let result = match (first, values) {
            (None, _) => HashResult::Missing,
            (Some(v), 1) if v == self.expected => HashResult::Match,
            _ => HashResult::Mismatch,
        };
        Seen {
            result,
            values,
            first,
        }
    }

    fn describe(seen: &Seen<'_>) -> String {
        match (seen.first, seen.values) {
            (None, _) => "no x-constitutional-hash header".to_string(),
            (Some(v), 1) => format!(
                "x-constitutional-hash: {}",
                String::from_utf8_lossy(v.as_bytes())
            ),
            (_, n) => format!("{n} x-constitutional-hash values (exactly one is allowed)"),
        }
    }
}

impl RouteHashFilter {
    fn record_response(&self, version: Version, result: HashResult) {
        let s = &self.stats[version as usize];
        let ok = u64::from(result.consistent());
        let total = s.total.fetch_add(1, Ordering::Relaxed) + 1;
        let consistent = s.consistent.fetch_add(ok, Ordering::Relaxed) + ok;
        s.ratio.set(consistent as f64 / total as f64);
        s.responses[result as usize].increment(1);
    }
}

#[async_trait]
impl Filter for RouteHashFilter {
    fn name(&self) -> &'static str {
        "constitutional_hash"
    }

    async fn on_request(&self, ex: &mut Exchange) -> Verdict {
        let f = &self.shared;
        let seen = f.check(&ex.request.headers);
        let mut result = seen.result;
        let refusal = (f.mode == HashMode::Enforce && !result.consistent()).then(|| {
            format!(
                "expected x-constitutional-hash: {}, got {}",
                f.expected_text,
                HashFilter::describe(&seen)
            )
        });
        if f.mode == HashMode::Stamp && result == HashResult::Missing {
            ex.request.headers.insert(HASH_HEADER, f.expected.clone());
            result = HashResult::Stamped;
        }
        ex.attributes.insert(HashChecks {
            request: Some(result),
            response: None,
        });
        if let Some(detail) = refusal {
            return Verdict::Respond(json_error(
                StatusCode::FORBIDDEN,
                "constitutional_hash_required",
                detail,
            ));
        }
        if f.mode != HashMode::Enforce {
            ex.request
                .headers
                .insert(CHECK_HEADER, HeaderValue::from_static(result.as_str()));
        }
        Verdict::Continue
    }

    async fn on_response(&self, ex: &mut Exchange) -> Verdict {
        let f = &self.shared;
        // Answers the proxy made itself carry no upstream hash to check.
        let Some(answer) = ex.response.as_mut() else {
            return Verdict::Continue;
        };
        let Some(version) = answer.upstream() else {
            return Verdict::Continue;
        };
        let seen = f.check(&answer.headers);
        let result = seen.result;
        let refusal = (f.mode == HashMode::Enforce && !result.consistent()).then(|| {
            format!(
                "the {} upstream answered with {} instead of x-constitutional-hash: {}",
                version.as_str(),
                HashFilter::describe(&seen),
                f.expected_text
            )
        });
        if f.mode != HashMode::Enforce {
            answer
                .headers
                .insert(CHECK_HEADER, HeaderValue::from_static(result.as_str()));
        }
        self.record_response(version, result);
        let mut checks = ex
            .attributes
            .get::<HashChecks>()
            .copied()
            .unwrap_or_default();
        checks.response = Some(result);
        ex.attributes.insert(checks);
        ex.findings.hash_consistent = Some(result.consistent());
        match refusal {
            Some(detail) => Verdict::Respond(json_error(
                StatusCode::BAD_GATEWAY,
                "constitutional_hash_mismatch",
                detail,
            )),
            None => Verdict::Continue,
        }
    }

    async fn on_log(&self, ex: &Exchange) -> Result<(), LogError> {
        // Requests are counted here, once the version they went to is known.
        if let Some(result) = ex.attributes.get::<HashChecks>().and_then(|c| c.request) {
            self.stats[Version::index(ex.version)].requests[result as usize].increment(1);
        }
        Ok(())
    }
}
