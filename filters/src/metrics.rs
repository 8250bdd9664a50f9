//! The metric names the built-in filters record. The proxy's `metrics.rs` re-exports
//! them, so every `acge_` name can still be found from one place.

pub const HASH_CHECKS_TOTAL: &str = "acge_hash_checks_total";
pub const HASH_CONSISTENCY_RATIO: &str = "acge_hash_consistency_ratio";
pub const AUDIT_RECORDS_TOTAL: &str = "acge_audit_records_total";
pub const AUDIT_QUEUE_DEPTH: &str = "acge_audit_queue_depth";
pub const AUDIT_COMMIT_SECONDS: &str = "acge_audit_commit_seconds";
pub const INFERENCE_BATCH_SIZE: &str = "acge_inference_batch_size";
pub const INFERENCE_QUEUE_SECONDS: &str = "acge_inference_queue_seconds";
pub const INFERENCE_SECONDS: &str = "acge_inference_seconds";
pub const INFERENCE_ERRORS_TOTAL: &str = "acge_inference_errors_total";
pub const INFERENCE_CACHE_TOTAL: &str = "acge_inference_cache_total";
/// Items the cascade decided, by `stage`: `fast` (outside the band), `second` (the
/// second model decided), `second_skipped` (inside the band, but the second model's
/// queue was full or it failed: the fast verdict stood).
pub const CASCADE_TOTAL: &str = "acge_cascade_total";
pub const COMPLIANCE_SCORE: &str = "acge_compliance_score";
pub const DECISIONS_TOTAL: &str = "acge_decisions_total";
/// Violations by principle: `{route, version, phase, principle}`.
pub const PRINCIPLE_VIOLATIONS_TOTAL: &str = "acge_principle_violations_total";
/// Tokens the jwt filter judged: `{route, result="valid|missing|expired|…"}`.
pub const JWT_TOTAL: &str = "acge_jwt_total";
/// Policy decisions: `{route, result="allow|deny|error_denied|error_allowed"}`.
pub const POLICY_TOTAL: &str = "acge_policy_total";
/// Batches sent to the remote inference server: `{result="ok|error"}`.
pub const REMOTE_REQUESTS_TOTAL: &str = "acge_remote_requests_total";
/// Failed remote batches: `{kind="open|timeout|status|answer|fallback"}`.
pub const REMOTE_ERRORS_TOTAL: &str = "acge_remote_errors_total";
/// Time of one remote `ModelInfer`, seconds (histogram).
pub const REMOTE_SECONDS: &str = "acge_remote_seconds";
/// The circuit to the server: 0 closed, 2 open.
pub const REMOTE_BREAKER_STATE: &str = "acge_remote_breaker_state";
/// Batches the local fallback model decided because the server could not.
pub const REMOTE_FALLBACK_TOTAL: &str = "acge_remote_fallback_total";

/// Batch sizes: powers of two up to the largest `max_batch` that makes sense.
pub const BATCH_SIZE_BUCKETS: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

/// Compliance scores in [0, 1], finer near the 0.95 gate.
pub const SCORE_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.97, 0.99, 1.0];

/// Inference and queueing times: 10 µs to 1 s.
pub const INFERENCE_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 1.0,
];

/// Buckets for the audit commit histogram: an fsync takes from tens of microseconds
/// (a cache-backed disk) to tens of milliseconds.
pub const COMMIT_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
