//! Audit log append: records per second and the latency each append adds (p50, p99),
//! in both commit modes, with 1 and 64 concurrent writers (group commit shows with
//! many). The log lives in a temporary directory on the machine's disk.
//!
//! `cargo bench --bench audit_append` (RECORDS=N to change the count)

use std::sync::Arc;
use std::time::{Duration, Instant};

use acge_filters::audit::{AuditConfig, AuditLog, AuditRecord, CommitMode};

fn record(i: usize) -> AuditRecord {
    AuditRecord {
        seq: 0,
        request_id: format!("8f7791b1-f084-4fec-ad61-{i:012}"),
        time_ms: 1_796_000_000_000 + i as u64,
        route: "auth".into(),
        version: Some("green".into()),
        method: "POST".into(),
        path: "/api/v1/auth/acge/validate".into(),
        status: 200,
        hash_request: Some("match".into()),
        hash_response: Some("match".into()),
        compliance: Some(0.982),
        principles: vec![],
        acge_stage: None,
        decision: "allowed".into(),
        latency_ms: 1.234,
        event: None,
        jwt: None,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn run(mode: CommitMode, writers: usize, records: usize) -> (f64, Duration, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let config = AuditConfig {
        dir: dir.path().to_path_buf(),
        commit: mode,
        checkpoint_every: 1000,
        checkpoint_interval_ms: 1000,
        segment_bytes: 64 << 20,
        queue: 8192,
        key_file: None,
        origin: None,
    };
    let (log, _) = AuditLog::open(&config).unwrap();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let log: Arc<AuditLog> = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(records / writers);
            for i in 0..records / writers {
                let t = Instant::now();
                log.append(record(w * records + i)).await.unwrap();
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    log.close().await; // async mode: include writing out what was queued
    let elapsed = start.elapsed();
    lat.sort();
    (
        lat.len() as f64 / elapsed.as_secs_f64(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
    )
}

fn main() {
    // `cargo bench` passes flags such as --bench; this harness takes none.
    let records: usize = std::env::var("RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!("| commit | writers | records/s | p50 added latency | p99 added latency |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for mode in [CommitMode::Sync, CommitMode::Async] {
        for writers in [1, 64] {
            let n = if mode == CommitMode::Sync && writers == 1 {
                records / 10
            } else {
                records
            };
            let (rate, p50, p99) = rt.block_on(run(mode, writers, n));
            println!(
                "| {} | {writers} | {rate:.0} | {:.1} µs | {:.1} µs |",
                format!("{mode:?}").to_lowercase(),
                p50.as_secs_f64() * 1e6,
                p99.as_secs_f64() * 1e6
            );
        }
    }
}
