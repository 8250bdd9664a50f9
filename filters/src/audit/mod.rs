//! The `audit` filter and its tamper-evident, append-only log.
//!
//! Every exchange becomes one [`AuditRecord`]. Records are leaves of a Merkle tree as in
//! Certificate Transparency (RFC 6962/9162); every `checkpoint_every` records or
//! `checkpoint_interval_ms` a checkpoint (tree size, root, time) is signed with ed25519.
//! `acge-proxy audit verify` recomputes it all. Format and guarantees: docs/audit.md.
//!
//! The filter writes the record in the log phase, once the exchange is over, so that
//! the record holds the status and latency of the whole answer (a body the upstream
//! cut is an `error`, a client that went away `aborted`). In `sync` mode the end of the
//! response waits for the record's fsync, so a client that got a complete answer has
//! its record on disk; if it cannot be written, the answer is cut instead of completed.
//! A log whose writer is failing or stopped is refused up front (503
//! `audit_unavailable`) in the response phase.

pub mod log;
pub mod merkle;
pub mod note;
pub mod segment;
pub mod verify;

use std::sync::Arc;

use async_trait::async_trait;
use http::StatusCode;

pub use log::{AuditConfig, AuditError, AuditLog, CommitMode, OpenReport};
pub use segment::{AuditRecord, Checkpoint};

use crate::hash::HashChecks;
use crate::{json_error, Compliance, End, Ending, Exchange, Filter, LogError, Verdict};

pub struct AuditFilter {
    log: Arc<AuditLog>,
}

impl AuditFilter {
    pub fn new(log: Arc<AuditLog>) -> Self {
        Self { log }
    }
}

/// `allowed`, `denied`, `error`, `aborted` or `shadow`.
fn decision(ex: &Exchange, end: &End) -> &'static str {
    if ex.shadow {
        return "shadow";
    }
    let upstream = ex.answered_by().is_some();
    match (end.ending, end.status.as_u16()) {
        (Ending::ClientGone, _) => "aborted",
        (_, 500..) => "error",
        (_, 400..) if !upstream => "denied",
        _ => "allowed",
    }
}

fn record(ex: &Exchange, end: &End) -> AuditRecord {
    let hash = ex
        .attributes
        .get::<HashChecks>()
        .copied()
        .unwrap_or_default();
    let compliance = ex.attributes.get::<Compliance>();
    let latency_ms = end.latency.as_secs_f64() * 1000.0;
    AuditRecord {
        seq: 0,
        request_id: ex.request_id.to_string(),
        time_ms: log::now_ms().saturating_sub(end.latency.as_millis() as u64),
        route: ex.route.to_string(),
        version: ex.version.map(|v| v.as_str().to_string()),
        method: ex.request.method.as_str().to_string(),
        path: ex.path().to_string(),
        status: end.status.as_u16(),
        hash_request: hash.request.map(|r| r.as_str().to_string()),
        hash_response: hash.response.map(|r| r.as_str().to_string()),
        compliance: compliance.map(|c| c.score),
        principles: compliance.map(|c| c.principles.clone()).unwrap_or_default(),
        acge_stage: compliance.and_then(|c| c.stage).map(str::to_string),
        decision: decision(ex, end).to_string(),
        latency_ms: (latency_ms * 1000.0).round() / 1000.0,
        event: None,
        jwt: ex
            .attributes
            .get::<crate::jwt::JwtAudit>()
            .map(|a| a.0.clone()),
    }
}

#[async_trait]
impl Filter for AuditFilter {
    fn name(&self) -> &'static str {
        "audit"
    }

    async fn on_response(&self, _ex: &mut Exchange) -> Verdict {
        match self.log.health() {
            Ok(()) => Verdict::Continue,
            // Answering while records cannot be written would break the promise of the
            // log: fail closed.
            Err(e) => Verdict::Respond(json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit_unavailable",
                format!("the exchange could not be recorded: {e}"),
            )),
        }
    }

    async fn on_log(&self, ex: &Exchange) -> Result<(), LogError> {
        let Some(end) = &ex.end else { return Ok(()) };
        self.log
            .append(record(ex, end))
            .await
            .map(|_| ())
            .map_err(|e| LogError::new("audit", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Answer, RequestHead, Source, Version};
    use std::time::Duration;

    fn ended(source: Source, status: u16, ending: Ending, shadow: bool) -> (Exchange, End) {
        let mut ex = Exchange::new(
            "r".into(),
            "id".into(),
            std::time::Instant::now(),
            RequestHead {
                method: http::Method::GET,
                uri: http::Uri::from_static("/x"),
                headers: http::HeaderMap::new(),
            },
        );
        ex.shadow = shadow;
        ex.response = Some(Answer {
            status: StatusCode::from_u16(status).unwrap(),
            headers: http::HeaderMap::new(),
            body: None,
            source,
        });
        let end = End {
            status: StatusCode::from_u16(status).unwrap(),
            ending,
            latency: Duration::from_millis(3),
        };
        (ex, end)
    }

    #[test]
    fn decisions() {
        let up = Source::Upstream(Version::Blue);
        let cases = [
            (up, 200, Ending::Complete, false, "allowed"),
            (up, 404, Ending::Complete, false, "allowed"),
            (Source::Local, 403, Ending::Complete, false, "denied"),
            (Source::Local, 502, Ending::Complete, false, "error"),
            (up, 502, Ending::UpstreamCut, false, "error"),
            (up, 499, Ending::ClientGone, false, "aborted"),
            (up, 200, Ending::Complete, true, "shadow"),
        ];
        for (source, status, ending, shadow, want) in cases {
            let (ex, end) = ended(source, status, ending, shadow);
            assert_eq!(decision(&ex, &end), want, "{source:?} {status} {ending:?}");
        }
    }
}
