//! The exchange context: one request's life as every phase of every filter sees it.
//!
//! The proxy makes one [`Exchange`] when a request has been routed and carries it through
//! the request phases, the split, the upstream, the response phases and the log phase.
//! A phase changes the context, and what it changed is what happens: the request head
//! as the request phases leave it is what goes upstream (and to a shadow mirror); the
//! answer as the response phases leave it is what the client gets. This module owns the
//! shape of that context; it does not run phases ([`crate::Chain`] does) or move bytes
//! (the proxy does).

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode, Uri};

/// Which version of the service answers: the legacy one, or the new ACGE-backed one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    Blue = 0,
    Green = 1,
}

impl Version {
    pub const ALL: [Version; 2] = [Version::Blue, Version::Green];

    pub fn as_str(self) -> &'static str {
        match self {
            Version::Blue => "blue",
            Version::Green => "green",
        }
    }

    /// The index of per-version handles made at build time: blue 0, green 1, and
    /// [`Version::NONE_INDEX`] for an exchange no version answered.
    pub fn index(version: Option<Version>) -> usize {
        version.map_or(Self::NONE_INDEX, |v| v as usize)
    }

    pub const NONE_INDEX: usize = 2;

    /// The metric label of [`Version::index`]: `blue`, `green` or `none`.
    pub fn label(version: Option<Version>) -> &'static str {
        version.map_or("none", Version::as_str)
    }
}

/// A request's id: 1–200 visible ASCII characters, kept as the header value it travels
/// in (so that the id costs no copy), readable as a `&str`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(http::HeaderValue);

impl RequestId {
    /// The id in `value`, when it is one (1–200 visible ASCII characters).
    pub fn new(value: http::HeaderValue) -> Option<Self> {
        let ok = !value.is_empty()
            && value.len() <= 200
            && value.as_bytes().iter().all(|b| b.is_ascii_graphic());
        ok.then_some(Self(value))
    }

    /// The id as the header value it is sent in.
    pub fn header(&self) -> &http::HeaderValue {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        self.0
            .to_str()
            .expect("a RequestId holds visible ASCII only")
    }
}

impl std::ops::Deref for RequestId {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&'static str> for RequestId {
    /// For tests and fixed ids; panics on an id that is not visible ASCII.
    fn from(id: &'static str) -> Self {
        Self::new(http::HeaderValue::from_static(id)).expect("a visible-ASCII request id")
    }
}

/// The request as it will be forwarded. A request phase may change any of it.
#[derive(Debug, Clone)]
pub struct RequestHead {
    pub method: Method,
    /// The normalised path (and query) the route was matched on.
    pub uri: Uri,
    pub headers: HeaderMap,
}

/// Who made an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The upstream of this version answered.
    Upstream(Version),
    /// The proxy or a filter answered itself: a refusal, an upstream failure.
    Local,
}

/// The answer on its way back to the client.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// The whole body, when a filter on the route wants response bodies (or the answer
    /// was made locally). None while it streams.
    pub body: Option<Bytes>,
    pub source: Source,
}

impl Answer {
    /// The version whose upstream answered, for an upstream's answer.
    pub fn upstream(&self) -> Option<Version> {
        match self.source {
            Source::Upstream(v) => Some(v),
            Source::Local => None,
        }
    }
}

/// How an exchange ended, for the log phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The whole answer was handed to the client.
    Complete,
    /// The client went away before the answer was complete (logged as 499).
    ClientGone,
    /// The upstream cut its body mid-way (logged as 502, counted as an upstream error).
    UpstreamCut,
}

/// The end of an exchange: set before the log phase runs.
#[derive(Debug, Clone, Copy)]
pub struct End {
    /// The status as logged and counted: the one sent, 499 when the client went away,
    /// 502 when the upstream cut the body it had begun.
    pub status: StatusCode,
    pub ending: Ending,
    /// From the request's arrival to the end of the answer's body.
    pub latency: Duration,
}

impl End {
    pub fn completed(&self) -> bool {
        self.ending == Ending::Complete
    }
}

/// The status logged for an exchange whose client went away before the answer was
/// complete (nginx's convention).
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

/// What the response phases found about an upstream's answer, in the terms the
/// migration gates read. Filters fill it; the route's windows read it, without knowing
/// which filter found what.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Findings {
    /// Whether the answer was judged compliant (the acge filter); None when unjudged.
    pub compliant: Option<bool>,
    /// Whether the answer carried the right constitutional hash; None when unchecked.
    pub hash_consistent: Option<bool>,
}

/// One exchange, from routing to the log phase.
#[derive(Debug)]
pub struct Exchange {
    pub route: Arc<str>,
    /// The request id, as sent upstream and returned to the client.
    pub request_id: RequestId,
    /// When the request head arrived.
    pub started: Instant,
    /// The request as it will be forwarded; the request phases may change it.
    pub request: RequestHead,
    /// The whole request body, present only when a filter on the route wants it (or
    /// the request is mirrored). A request phase may replace it; the replacement is sent.
    pub request_body: Option<Bytes>,
    /// The version the split chose; None before the split, or when the request was
    /// refused before it.
    pub version: Option<Version>,
    /// The answer, from the response phases on.
    pub response: Option<Answer>,
    /// How the exchange ended, in the log phase.
    pub end: Option<End>,
    /// A copy of the request sent to green while blue answers the client (the
    /// migration's shadow step): no client sees this exchange's answer.
    pub shadow: bool,
    pub findings: Findings,
    /// Typed values that one filter leaves for later ones.
    pub attributes: Attributes,
}

impl Exchange {
    pub fn new(
        route: Arc<str>,
        request_id: RequestId,
        started: Instant,
        request: RequestHead,
    ) -> Self {
        Self {
            route,
            request_id,
            started,
            request,
            request_body: None,
            version: None,
            response: None,
            end: None,
            shadow: false,
            findings: Findings::default(),
            attributes: Attributes::default(),
        }
    }

    /// The request path, as the route matched it.
    pub fn path(&self) -> &str {
        self.request.uri.path()
    }

    /// The version whose upstream made the answer (None for a local answer or before
    /// there is one).
    pub fn answered_by(&self) -> Option<Version> {
        self.response.as_ref().and_then(Answer::upstream)
    }

    /// A fresh context for green's answer to a mirrored copy of this request: the same
    /// route, id and request (as the request phases left it), nothing found yet.
    pub fn fork_for_shadow(&self) -> Exchange {
        let mut copy = Exchange::new(
            self.route.clone(),
            self.request_id.clone(),
            self.started,
            self.request.clone(),
        );
        copy.request_body = self.request_body.clone();
        copy.version = Some(Version::Green);
        copy.shadow = true;
        copy
    }
}

/// Typed values that one filter leaves for later ones (a compliance score, a hash
/// result), keyed by their type so that two filters cannot clash on a string name.
#[derive(Default)]
pub struct Attributes(HashMap<TypeId, Box<dyn Any + Send + Sync>>);

impl Attributes {
    pub fn insert<T: Any + Send + Sync>(&mut self, value: T) {
        self.0.insert(TypeId::of::<T>(), Box::new(value));
    }

    pub fn get<T: Any + Send + Sync>(&self) -> Option<&T> {
        self.0
            .get(&TypeId::of::<T>())
            .and_then(|v| v.downcast_ref())
    }

    pub fn get_mut<T: Any + Send + Sync>(&mut self) -> Option<&mut T> {
        self.0
            .get_mut(&TypeId::of::<T>())
            .and_then(|v| v.downcast_mut())
    }
}

impl std::fmt::Debug for Attributes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Attributes({} values)", self.0.len())
    }
}

/// The ACGE model's judgement of a request or response, left by the acge filter for the
/// audit log (the worse of the two when both were scored).
#[derive(Debug, Clone, PartialEq)]
pub struct Compliance {
    /// 1 − the highest violation probability.
    pub score: f64,
    /// Principles whose violation probability was over the threshold.
    pub principles: Vec<String>,
    /// Which model of a cascade decided (`fast`, `second`, `second_skipped`); None
    /// without a cascade.
    pub stage: Option<&'static str>,
}
