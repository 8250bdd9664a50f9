//! The `audit` filter and its tamper-evident, append-only log.
//!
//! Every exchange becomes one [`AuditRecord`]. Records are leaves of a Merkle tree as in
//! Certificate Transparency (RFC 6962/9162); every `checkpoint_every` records or
//! `checkpoint_interval_ms` a checkpoint (tree size, root, time) is signed with ed25519.
//! `acge-proxy audit verify` recomputes it all. Format and guarantees: docs/audit.md.
//!
//! The filter writes the record in the response phase, so that in `sync` mode the
//! client gets its answer only once the record is on disk; exchanges that never reach
//! a response (the client went away) are written from the log phase.

pub mod log;
pub mod merkle;
pub mod segment;
pub mod verify;

use std::sync::Arc;

use async_trait::async_trait;
use http::StatusCode;

pub use log::{AuditConfig, AuditError, AuditLog, CommitMode, OpenReport};
pub use segment::{AuditRecord, Checkpoint};

use crate::hash::HashChecks;
use crate::{json_error, Compliance, Exchange, Filter, ResponseCtx, Verdict};

/// Marks an exchange whose record the response phase already wrote.
struct Audited;

pub struct AuditFilter {
    log: Arc<AuditLog>,
}

impl AuditFilter {
    pub fn new(log: Arc<AuditLog>) -> Self {
        Self { log }
    }
}

fn decision(status: u16, upstream: bool, completed: bool) -> &'static str {
    match (completed, status) {
        (false, _) => "aborted",
        (_, 500..) => "error",
        (_, 400..) if !upstream => "denied",
        _ => "allowed",
    }
}

#[allow(clippy::too_many_arguments)]
fn record(
    request_id: &str,
    route: &str,
    version: Option<&str>,
    method: &http::Method,
    path: &str,
    status: u16,
    elapsed: std::time::Duration,
    attributes: &crate::Attributes,
    decision: &str,
) -> AuditRecord {
    let hash = attributes.get::<HashChecks>().copied().unwrap_or_default();
    let compliance = attributes.get::<Compliance>();
    let elapsed_ms = elapsed.as_secs_f64() * 1000.0;
    AuditRecord {
        seq: 0,
        request_id: request_id.to_string(),
        time_ms: log::now_ms().saturating_sub(elapsed.as_millis() as u64),
        route: route.to_string(),
        version: version.map(str::to_string),
        method: method.as_str().to_string(),
        path: path.to_string(),
        status,
        hash_request: hash.request.map(|r| r.as_str().to_string()),
        hash_response: hash.response.map(|r| r.as_str().to_string()),
        compliance: compliance.map(|c| c.score),
        principles: compliance.map(|c| c.principles.clone()).unwrap_or_default(),
        decision: decision.to_string(),
        latency_ms: (elapsed_ms * 1000.0).round() / 1000.0,
        event: None,
    }
}

#[async_trait]
impl Filter for AuditFilter {
    fn name(&self) -> &'static str {
        "audit"
    }

    async fn on_response(&self, res: &mut ResponseCtx) -> Verdict {
        let status = res.status.as_u16();
        let decision = if res.attributes.get::<crate::ShadowExchange>().is_some() {
            "shadow"
        } else {
            decision(status, res.version.is_some(), true)
        };
        let rec = record(
            &res.request_id,
            &res.route,
            res.version,
            &res.method,
            &res.path,
            status,
            res.elapsed,
            &res.attributes,
            decision,
        );
        res.attributes.insert(Audited);
        match self.log.append(rec).await {
            Ok(_) => Verdict::Continue,
            // Answering without the record would break the promise of `sync`: fail closed.
            Err(e) => Verdict::Respond(json_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "audit_unavailable",
                format!("the exchange could not be recorded: {e}"),
            )),
        }
    }

    fn on_log(&self, done: &Exchange) {
        if done.attributes.get::<Audited>().is_some() {
            return;
        }
        let status = done.status.as_u16();
        let rec = record(
            &done.request_id,
            &done.route,
            done.version,
            &done.method,
            &done.path,
            status,
            done.latency,
            &done.attributes,
            decision(status, done.version.is_some(), done.completed),
        );
        self.log.append_detached(rec);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions() {
        assert_eq!(decision(200, true, true), "allowed");
        assert_eq!(decision(404, true, true), "allowed");
        assert_eq!(decision(403, false, true), "denied");
        assert_eq!(decision(502, false, true), "error");
        assert_eq!(decision(200, true, false), "aborted");
    }
}
