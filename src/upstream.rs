//! Pooled clients per cluster: endpoint choice, timeouts, and the mapping of upstream
//! failures to statuses.
//!
//! Each cluster owns one hyper client (its own connection pool) and picks endpoints round
//! robin. A failure becomes an [`UpstreamError`], which knows its status (502, 503, 504),
//! its metric label and its JSON answer. This module does not decide which cluster serves
//! a request; `split.rs` does.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{parse_endpoint, ClusterConfig, Protocol};
use crate::Body;

/// Why an upstream did not answer.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cluster {cluster} has no endpoints")]
    NoEndpoint { cluster: String },
    #[error("cluster {cluster}: cannot connect to {endpoint}: {reason}")]
    Connect {
        cluster: String,
        endpoint: Authority,
        reason: String,
    },
    #[error("cluster {cluster}: connecting to {endpoint} took over {after:?}")]
    ConnectTimeout {
        cluster: String,
        endpoint: Authority,
        after: Duration,
    },
    #[error("cluster {cluster}: {endpoint} sent no response within {after:?}")]
    Timeout {
        cluster: String,
        endpoint: Authority,
        after: Duration,
    },
    #[error("cluster {cluster}: {endpoint} failed the exchange: {reason}")]
    Protocol {
        cluster: String,
        endpoint: Authority,
        reason: String,
    },
}

impl UpstreamError {
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::NoEndpoint { .. } => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamError::Connect { .. } | UpstreamError::Protocol { .. } => {
                StatusCode::BAD_GATEWAY
            }
            UpstreamError::ConnectTimeout { .. } | UpstreamError::Timeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
        }
    }

    /// The `kind` label of `acge_upstream_errors_total` and the `error` of the JSON body.
    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::NoEndpoint { .. } => "no_endpoint",
            UpstreamError::Connect { .. } => "connect",
            UpstreamError::ConnectTimeout { .. } => "connect_timeout",
            UpstreamError::Timeout { .. } => "timeout",
            UpstreamError::Protocol { .. } => "protocol",
        }
    }
}

/// One named group of endpoints with its own connection pool.
pub struct Cluster {
    pub name: String,
    endpoints: Vec<Authority>,
    next: AtomicUsize,
    client: Client<HttpConnector, Body>,
    version: http::Version,
    connect_timeout: Duration,
    timeout: Duration,
}

impl Cluster {
    /// Builds a cluster from a validated config.
    pub fn new(name: &str, config: &ClusterConfig) -> Self {
        let connect_timeout = Duration::from_millis(config.connect_timeout_ms);
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_millis(config.idle_timeout_ms));
        if config.protocol == Protocol::Http2 {
            builder.http2_only(true);
        }
        Self {
            name: name.to_string(),
            endpoints: config
                .endpoints
                .iter()
                .filter_map(|e| parse_endpoint(e).ok())
                .collect(),
            next: AtomicUsize::new(0),
            client: builder.build(connector),
            version: match config.protocol {
                Protocol::Http1 => http::Version::HTTP_11,
                Protocol::Http2 => http::Version::HTTP_2,
            },
            connect_timeout,
            timeout: Duration::from_millis(config.timeout_ms),
        }
    }

    fn pick(&self) -> Option<&Authority> {
        match self.endpoints.len() {
            0 => None,
            1 => self.endpoints.first(),
            n => self
                .endpoints
                .get(self.next.fetch_add(1, Ordering::Relaxed) % n),
        }
    }

    /// Sends `req` to the next endpoint and waits for the response head. The URI is
    /// rewritten to the endpoint; headers and body go as they are.
    pub async fn send(&self, mut req: Request<Body>) -> Result<Response<Incoming>, UpstreamError> {
        let Some(endpoint) = self.pick() else {
            return Err(UpstreamError::NoEndpoint {
                cluster: self.name.clone(),
            });
        };
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(Scheme::HTTP);
        parts.authority = Some(endpoint.clone());
        parts.path_and_query = Some(path);
        *req.uri_mut() = Uri::from_parts(parts).expect("scheme, authority and path are all set");
        *req.version_mut() = self.version;

        match tokio::time::timeout(self.timeout, self.client.request(req)).await {
            Ok(Ok(res)) => Ok(res),
            Ok(Err(e)) => Err(self.classify(endpoint, e)),
            Err(_) => Err(UpstreamError::Timeout {
                cluster: self.name.clone(),
                endpoint: endpoint.clone(),
                after: self.timeout,
            }),
        }
    }

    fn classify(
        &self,
        endpoint: &Authority,
        e: hyper_util::client::legacy::Error,
    ) -> UpstreamError {
        let cluster = self.name.clone();
        let endpoint = endpoint.clone();
        let root = root_cause(&e);
        if e.is_connect() {
            let timed_out = root
                .downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
                || root.to_string().contains("timed out");
            return if timed_out {
                UpstreamError::ConnectTimeout {
                    cluster,
                    endpoint,
                    after: self.connect_timeout,
                }
            } else {
                UpstreamError::Connect {
                    cluster,
                    endpoint,
                    reason: root.to_string(),
                }
            };
        }
        UpstreamError::Protocol {
            cluster,
            endpoint,
            reason: root.to_string(),
        }
    }
}

fn root_cause<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> &'a (dyn std::error::Error + 'static) {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(endpoints: &[&str]) -> Cluster {
        let config = ClusterConfig {
            endpoints: endpoints.iter().map(|s| s.to_string()).collect(),
            connect_timeout_ms: 100,
            timeout_ms: 100,
            protocol: Protocol::Http1,
            idle_timeout_ms: 1000,
        };
        Cluster::new("c", &config)
    }

    #[tokio::test]
    async fn endpoints_are_picked_round_robin() {
        let c = cluster(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]);
        let ports: Vec<_> = (0..6)
            .map(|_| c.pick().unwrap().port_u16().unwrap())
            .collect();
        assert_eq!(ports, vec![1, 2, 3, 1, 2, 3]);
    }

    #[tokio::test]
    async fn empty_cluster_is_503() {
        let c = cluster(&[]);
        let err = c.send(Request::new(crate::empty_body())).await.unwrap_err();
        assert_eq!(err.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(err.kind(), "no_endpoint");
    }
}
