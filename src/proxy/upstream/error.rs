//! Why an upstream did not answer, and what each failure means to a client.

use std::time::Duration;

use http::uri::Authority;
use http::StatusCode;

/// Why an upstream did not answer. Each knows its status (502, 503, 504) and its
/// `kind`, the label of `acge_upstream_errors_total` and the `error` of the JSON answer.
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
    #[error(
        "cluster {cluster}: {endpoint} sent no response within {after:?} of the request's end"
    )]
    Timeout {
        cluster: String,
        endpoint: Authority,
        after: Duration,
    },
    #[error("cluster {cluster}: TLS with {endpoint} failed: {reason}")]
    Tls {
        cluster: String,
        endpoint: Authority,
        reason: String,
    },
    #[error("cluster {cluster}: {endpoint} failed the exchange: {reason}")]
    Protocol {
        cluster: String,
        endpoint: Authority,
        reason: String,
    },
    #[error("cluster {cluster}: {endpoint} sent a response header block over {limit} bytes")]
    HeadersTooLarge {
        cluster: String,
        endpoint: Authority,
        limit: usize,
    },
    #[error("cluster {cluster}: all {max_connections} connections stayed busy for {after:?}")]
    Pending {
        cluster: String,
        max_connections: usize,
        after: Duration,
    },
}

impl UpstreamError {
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::NoEndpoint { .. } | UpstreamError::Pending { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            UpstreamError::Connect { .. }
            | UpstreamError::Tls { .. }
            | UpstreamError::Protocol { .. }
            | UpstreamError::HeadersTooLarge { .. } => StatusCode::BAD_GATEWAY,
            UpstreamError::ConnectTimeout { .. } | UpstreamError::Timeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            UpstreamError::NoEndpoint { .. } => "no_endpoint",
            UpstreamError::Connect { .. } => "connect",
            UpstreamError::Tls { .. } => "tls",
            UpstreamError::ConnectTimeout { .. } => "connect_timeout",
            UpstreamError::Timeout { .. } => "timeout",
            UpstreamError::Protocol { .. } => "protocol",
            UpstreamError::HeadersTooLarge { .. } => "upstream_headers_too_large",
            UpstreamError::Pending { .. } => "upstream_overloaded",
        }
    }
}

/// The `kind` under which an answer whose body the upstream cut is counted.
pub const BODY_CUT: &str = "body";
