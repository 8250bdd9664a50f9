//! The filter contract of acge-proxy: what a filter is, the context it sees, and the
//! ordered chain a route runs.
//!
//! This crate owns the contract and the built-in filters ([`hash`], [`audit`]). It does
//! not own the data plane: the proxy calls [`Chain::on_request`] before it picks blue or
//! green, [`Chain::on_response`] before any answer goes back (the upstream's, or one the
//! proxy or a filter made), and [`Chain::on_log`] exactly once when the exchange is
//! over, also when the client went away or the upstream failed.

pub mod acge;
pub mod audit;
pub mod hash;
pub mod metrics;

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Response, StatusCode, Uri};
use http_body_util::Full;

/// A response a filter (or the proxy) makes itself instead of forwarding.
pub type LocalResponse = Response<Full<Bytes>>;

/// What a phase decided.
#[derive(Debug)]
pub enum Verdict {
    /// Go on to the next filter, then to the upstream.
    Continue,
    /// Stop here and answer the client with this response.
    Respond(LocalResponse),
}

/// One request as the filters see it before it is forwarded.
#[derive(Debug)]
pub struct RequestCtx {
    pub method: Method,
    pub uri: Uri,
    pub headers: http::HeaderMap,
    /// The whole body, present only when a filter on the route asked for it.
    pub body: Option<Bytes>,
    pub route: Arc<str>,
    pub request_id: Arc<str>,
    pub attributes: Attributes,
}

/// One answer as the filters see it before it goes back to the client.
#[derive(Debug)]
pub struct ResponseCtx {
    pub status: StatusCode,
    pub headers: http::HeaderMap,
    /// The whole body, present only when a filter on the route asked for it.
    pub body: Option<Bytes>,
    pub route: Arc<str>,
    pub request_id: Arc<str>,
    pub method: Method,
    pub path: String,
    /// `blue` or `green` for an upstream's answer; None for one the proxy or a filter
    /// made itself (a rejection, an upstream failure).
    pub version: Option<&'static str>,
    /// Since the request arrived.
    pub elapsed: Duration,
    /// Left by the request phase, carried on.
    pub attributes: Attributes,
}

/// A finished exchange, handed to every filter's log phase once.
#[derive(Debug)]
pub struct Exchange {
    pub route: Arc<str>,
    pub request_id: Arc<str>,
    pub method: Method,
    pub path: String,
    pub version: Option<&'static str>,
    /// The status sent, or 499 when the client went away first.
    pub status: StatusCode,
    /// Whether the whole response reached the client.
    pub completed: bool,
    pub latency: Duration,
    pub attributes: Attributes,
}

/// The ACGE model's judgement of a request or response, left by the acge filter for the
/// audit log.
#[derive(Debug, Clone, PartialEq)]
pub struct Compliance {
    /// 1 − the highest violation probability.
    pub score: f64,
    /// Principles whose violation probability was over the threshold.
    pub principles: Vec<String>,
}

/// The acge filter's judgement of an upstream's response, left for the proxy's
/// migration windows (the green compliance gate).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseJudgement {
    pub compliant: bool,
}

/// Marks a response that is green's answer to a mirrored (shadow) request: no client
/// sees it; the audit log records it as `shadow`.
#[derive(Debug, Clone, Copy)]
pub struct ShadowExchange;

/// The status logged for an exchange whose client went away before the answer was
/// complete (nginx's convention).
pub const CLIENT_CLOSED_REQUEST: u16 = 499;

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
}

impl std::fmt::Debug for Attributes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Attributes({} values)", self.0.len())
    }
}

/// A small async object with optional request, response and log phases.
#[async_trait]
pub trait Filter: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Needs the whole request body before `on_request` (bounded by the route's max_body).
    fn wants_body(&self) -> bool {
        false
    }

    /// Needs the whole response body before `on_response` (bounded like the request's).
    fn wants_response_body(&self) -> bool {
        false
    }

    async fn on_request(&self, _req: &mut RequestCtx) -> Verdict {
        Verdict::Continue
    }

    async fn on_response(&self, _res: &mut ResponseCtx) -> Verdict {
        Verdict::Continue
    }

    fn on_log(&self, _done: &Exchange) {}
}

/// The ordered filters of one route. Request phases run in route order and the first
/// `Respond` stops them. Response phases also run in route order, over every answer
/// (the upstream's or a local one); a filter that answers replaces the response, and
/// the filters after it see the replacement, so that a filter listed last (the audit
/// log) records what the client really gets.
#[derive(Clone, Default)]
pub struct Chain {
    filters: Arc<[Arc<dyn Filter>]>,
}

impl Chain {
    pub fn new(filters: Vec<Arc<dyn Filter>>) -> Self {
        Self {
            filters: filters.into(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.filters.iter().map(|f| f.name()).collect()
    }

    /// Whether any filter needs the request body buffered.
    pub fn wants_body(&self) -> bool {
        self.filters.iter().any(|f| f.wants_body())
    }

    /// Whether any filter needs the response body buffered.
    pub fn wants_response_body(&self) -> bool {
        self.filters.iter().any(|f| f.wants_response_body())
    }

    pub async fn on_request(&self, req: &mut RequestCtx) -> Verdict {
        for filter in self.filters.iter() {
            if let Verdict::Respond(res) = filter.on_request(req).await {
                return Verdict::Respond(res);
            }
        }
        Verdict::Continue
    }

    /// Runs every response phase; returns whether any filter replaced the response
    /// (then `res.body` holds the replacement's body).
    pub async fn on_response(&self, res: &mut ResponseCtx) -> bool {
        let mut replaced = false;
        for filter in self.filters.iter() {
            if let Verdict::Respond(local) = filter.on_response(res).await {
                let (parts, body) = local.into_parts();
                res.status = parts.status;
                res.headers = parts.headers;
                res.body = Some(body.into_inner().unwrap_or_default());
                replaced = true;
            }
        }
        replaced
    }

    pub fn on_log(&self, done: &Exchange) {
        for filter in self.filters.iter() {
            filter.on_log(done);
        }
    }
}

/// The one shape of every error the proxy answers: `{"error": "...", "detail": "..."}`.
pub fn json_error(status: StatusCode, error: &str, detail: impl AsRef<str>) -> LocalResponse {
    let body = serde_json::json!({ "error": error, "detail": detail.as_ref() });
    json_response(status, Bytes::from(body.to_string()))
}

/// A response with a JSON body that is already rendered.
pub fn json_response(status: StatusCode, body: Bytes) -> LocalResponse {
    let mut res = Response::new(Full::new(body));
    *res.status_mut() = status;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    struct Tag(&'static str, bool);

    #[async_trait]
    impl Filter for Tag {
        fn name(&self) -> &'static str {
            self.0
        }
        async fn on_request(&self, req: &mut RequestCtx) -> Verdict {
            let mut seen: Vec<&'static str> = req
                .attributes
                .get::<Vec<&'static str>>()
                .cloned()
                .unwrap_or_default();
            seen.push(self.0);
            req.attributes.insert(seen);
            if self.1 {
                Verdict::Respond(json_error(StatusCode::FORBIDDEN, "denied", self.0))
            } else {
                Verdict::Continue
            }
        }
    }

    fn ctx() -> RequestCtx {
        RequestCtx {
            method: Method::GET,
            uri: Uri::from_static("/x"),
            headers: http::HeaderMap::new(),
            body: None,
            route: "r".into(),
            request_id: "id".into(),
            attributes: Attributes::default(),
        }
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        // The chain's futures here never wait on I/O, so polling once with a no-op waker
        // finishes them.
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut f = std::pin::pin!(f);
        match f.as_mut().poll(&mut cx) {
            std::task::Poll::Ready(v) => v,
            std::task::Poll::Pending => panic!("chain future did not finish at once"),
        }
    }

    #[test]
    fn request_phase_runs_in_order_and_stops_at_first_respond() {
        let chain = Chain::new(vec![
            Arc::new(Tag("a", false)),
            Arc::new(Tag("b", true)),
            Arc::new(Tag("c", false)),
        ]);
        let mut req = ctx();
        let verdict = block_on(chain.on_request(&mut req));
        let Verdict::Respond(res) = verdict else {
            panic!("expected the second filter to answer");
        };
        assert_eq!(res.status(), StatusCode::FORBIDDEN);
        let seen = req.attributes.get::<Vec<&'static str>>().unwrap();
        assert_eq!(seen, &vec!["a", "b"]);
        assert_eq!(chain.names(), vec!["a", "b", "c"]);
    }

    #[test]
    fn json_error_escapes_and_sets_content_type() {
        let res = json_error(StatusCode::BAD_GATEWAY, "upstream", "said \"no\"\n");
        assert_eq!(res.headers()[header::CONTENT_TYPE], "application/json");
        let body = block_on(res.into_body().collect()).unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"], "upstream");
        assert_eq!(v["detail"], "said \"no\"\n");
    }
}
