//! The metric names the built-in filters record. The proxy's `metrics.rs` re-exports
//! them, so every `acge_` name can still be found from one place.

pub const HASH_CHECKS_TOTAL: &str = "acge_hash_checks_total";
pub const HASH_CONSISTENCY_RATIO: &str = "acge_hash_consistency_ratio";
pub const AUDIT_RECORDS_TOTAL: &str = "acge_audit_records_total";
pub const AUDIT_QUEUE_DEPTH: &str = "acge_audit_queue_depth";
pub const AUDIT_COMMIT_SECONDS: &str = "acge_audit_commit_seconds";

/// Buckets for the audit commit histogram: an fsync takes from tens of microseconds
/// (a cache-backed disk) to tens of milliseconds.
pub const COMMIT_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
