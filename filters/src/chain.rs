//! What a filter is, and the ordered chain of them a route runs.
//!
//! Request phases run in route order and the first `Respond` stops them. Response
//! phases also run in route order, over every answer (the upstream's or a local one); a
//! filter that answers replaces the answer, and the filters after it see the
//! replacement, so that a filter listed last (the audit log) records what the client
//! really gets. Log phases run in route order once the exchange is over.

use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::Full;

use crate::exchange::{Answer, Exchange, Source};

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

/// A small async object with optional request, response and log phases over one
/// [`Exchange`] (docs/filters.md).
#[async_trait]
pub trait Filter: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Needs the whole request body (`ex.request_body`) before `on_request`, bounded by
    /// the route's `max_body_bytes`.
    fn wants_body(&self) -> bool {
        false
    }

    /// Needs the whole response body (`ex.response.body`) before `on_response`, bounded
    /// like the request's.
    fn wants_response_body(&self) -> bool {
        false
    }

    /// Before the split; `ex.response` is None.
    async fn on_request(&self, _ex: &mut Exchange) -> Verdict {
        Verdict::Continue
    }

    /// Over every answer; `ex.response` is Some.
    async fn on_response(&self, _ex: &mut Exchange) -> Verdict {
        Verdict::Continue
    }

    /// Once, when the exchange is over; `ex.end` is Some. The answer's headers and body
    /// have gone to the client by then (`ex.response` keeps its status and source).
    /// The end of the response waits for this phase (the audit log's sync commit
    /// relies on it), so it must not block; when the client has gone, it runs in a task
    /// of its own. An error cuts the answer where its end is still held: the client
    /// does not see as complete an exchange whose log phase failed.
    async fn on_log(&self, _ex: &Exchange) -> Result<(), LogError> {
        Ok(())
    }
}

/// A log phase that failed: which filter, and why.
#[derive(Debug, thiserror::Error)]
#[error("the {filter} filter's log phase failed: {source}")]
pub struct LogError {
    pub filter: &'static str,
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl LogError {
    pub fn new(
        filter: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            filter,
            source: source.into(),
        }
    }
}

/// The ordered filters of one route, built once when the route table is.
#[derive(Clone, Default)]
pub struct Chain {
    filters: Arc<[Arc<dyn Filter>]>,
    wants_body: bool,
    wants_response_body: bool,
}

impl Chain {
    pub fn new(filters: Vec<Arc<dyn Filter>>) -> Self {
        let wants_body = filters.iter().any(|f| f.wants_body());
        let wants_response_body = filters.iter().any(|f| f.wants_response_body());
        Self {
            filters: filters.into(),
            wants_body,
            wants_response_body,
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
        self.wants_body
    }

    /// Whether any filter needs the response body buffered.
    pub fn wants_response_body(&self) -> bool {
        self.wants_response_body
    }

    /// Runs the request phases; a refusal is returned for the proxy to answer with.
    pub async fn on_request(&self, ex: &mut Exchange) -> Option<LocalResponse> {
        for filter in self.filters.iter() {
            if let Verdict::Respond(res) = filter.on_request(ex).await {
                return Some(res);
            }
        }
        None
    }

    /// Runs every response phase over `ex.response`; a filter that answers replaces it
    /// (the replacement is a local answer with a whole body).
    pub async fn on_response(&self, ex: &mut Exchange) {
        for filter in self.filters.iter() {
            if let Verdict::Respond(local) = filter.on_response(ex).await {
                ex.response = Some(answer_of(local));
            }
        }
    }

    /// Runs every log phase (a failure does not stop the others); returns the first
    /// failure.
    pub async fn on_log(&self, ex: &Exchange) -> Result<(), LogError> {
        let mut first = Ok(());
        for filter in self.filters.iter() {
            if let Err(e) = filter.on_log(ex).await {
                tracing::error!(request_id = %ex.request_id, error = %e, "log phase failed");
                if first.is_ok() {
                    first = Err(e);
                }
            }
        }
        first
    }
}

/// A local response as the answer in an exchange.
pub fn answer_of(local: LocalResponse) -> Answer {
    let (parts, body) = local.into_parts();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body: Some(body.into_inner().unwrap_or_default()),
        source: Source::Local,
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
    use crate::exchange::RequestHead;
    use http::{Method, Uri};
    use http_body_util::BodyExt;

    struct Tag(&'static str, bool);

    #[async_trait]
    impl Filter for Tag {
        fn name(&self) -> &'static str {
            self.0
        }
        async fn on_request(&self, ex: &mut Exchange) -> Verdict {
            let mut seen: Vec<&'static str> = ex
                .attributes
                .get::<Vec<&'static str>>()
                .cloned()
                .unwrap_or_default();
            seen.push(self.0);
            ex.attributes.insert(seen);
            if self.1 {
                Verdict::Respond(json_error(StatusCode::FORBIDDEN, "denied", self.0))
            } else {
                Verdict::Continue
            }
        }
        async fn on_response(&self, ex: &mut Exchange) -> Verdict {
            let status = ex.response.as_ref().map(|a| a.status);
            let mut seen: Vec<Option<StatusCode>> = ex
                .attributes
                .get::<Vec<Option<StatusCode>>>()
                .cloned()
                .unwrap_or_default();
            seen.push(status);
            ex.attributes.insert(seen);
            if self.1 {
                Verdict::Respond(json_error(StatusCode::BAD_GATEWAY, "replaced", self.0))
            } else {
                Verdict::Continue
            }
        }
    }

    fn exchange() -> Exchange {
        Exchange::new(
            "r".into(),
            "id".into(),
            std::time::Instant::now(),
            RequestHead {
                method: Method::GET,
                uri: Uri::from_static("/x"),
                headers: http::HeaderMap::new(),
            },
        )
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

    fn chain() -> Chain {
        Chain::new(vec![
            Arc::new(Tag("a", false)),
            Arc::new(Tag("b", true)),
            Arc::new(Tag("c", false)),
        ])
    }

    #[test]
    fn request_phase_runs_in_order_and_stops_at_first_respond() {
        let chain = chain();
        let mut ex = exchange();
        let refusal = block_on(chain.on_request(&mut ex)).expect("the second filter answers");
        assert_eq!(refusal.status(), StatusCode::FORBIDDEN);
        let seen = ex.attributes.get::<Vec<&'static str>>().unwrap();
        assert_eq!(seen, &vec!["a", "b"]);
        assert_eq!(chain.names(), vec!["a", "b", "c"]);
    }

    #[test]
    fn a_response_phase_replacement_is_what_later_filters_see() {
        let chain = chain();
        let mut ex = exchange();
        ex.response = Some(Answer {
            status: StatusCode::OK,
            headers: http::HeaderMap::new(),
            body: None,
            source: Source::Upstream(crate::Version::Blue),
        });
        block_on(chain.on_response(&mut ex));
        let seen = ex.attributes.get::<Vec<Option<StatusCode>>>().unwrap();
        assert_eq!(
            seen,
            &vec![
                Some(StatusCode::OK),
                Some(StatusCode::OK),
                Some(StatusCode::BAD_GATEWAY)
            ]
        );
        let answer = ex.response.unwrap();
        assert_eq!(answer.source, Source::Local);
        assert!(answer.body.unwrap().starts_with(b"{\"error\":\"replaced\""));
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
