//! The libtorch engine against models PyTorch wrote: outputs match PyTorch's, batches
//! of mixed lengths score as their items would alone, and bad models are refused with
//! the reason.
#![cfg(feature = "torch")]

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use acge_filters::acge::batcher::{Backend, BatchObserver, Batcher, BatcherConfig};
use acge_filters::acge::engine::{ModelError, TorchEngine};
use acge_filters::acge::DeviceChoice;
use common::make_test_model;

const HASH: &str = "cdd01ef066bc6cf2";

fn fixtures(dir: &Path) -> Vec<(Vec<i64>, Vec<f32>)> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("fixtures.json")).unwrap()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let input = f["input"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect();
            let output = f["output"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect();
            (input, output)
        })
        .collect::<Vec<_>>()
}

/// The fixtures, refusing an empty set (a loop over nothing checks nothing).
fn cases(dir: &Path) -> Vec<(Vec<i64>, Vec<f32>)> {
    let cases = fixtures(dir);
    assert!(
        cases.len() >= 4,
        "the test model wrote {} fixtures",
        cases.len()
    );
    cases
}

fn close(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
}

#[test]
fn engine_matches_pytorch_alone_and_in_mixed_batches() {
    let dir = tempfile::tempdir().unwrap();
    make_test_model(dir.path(), &[]);
    let (mut engine, meta) =
        TorchEngine::load(dir.path(), HASH, DeviceChoice::Cpu, Some(1)).unwrap();
    assert_eq!(meta.principles.len(), 6);
    let cases = cases(dir.path());
    for (input, expected) in &cases {
        let rows = engine.infer(&[input.as_slice()]).unwrap();
        assert!(close(&rows[0], expected), "{:?} vs {expected:?}", rows[0]);
    }
    // One batch of every case: padded to the longest, each row as it was alone.
    let batch: Vec<&[i64]> = cases.iter().map(|(i, _)| i.as_slice()).collect();
    let rows = engine.infer(&batch).unwrap();
    assert_eq!(rows.len(), cases.len(), "one row per item");
    for (row, (_, expected)) in rows.iter().zip(&cases) {
        assert!(close(row, expected), "{row:?} vs {expected:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_behind_the_batcher_serves_concurrent_callers() {
    let dir = tempfile::tempdir().unwrap();
    make_test_model(dir.path(), &[]);
    let (engine, _) = TorchEngine::load(dir.path(), HASH, DeviceChoice::Auto, Some(1)).unwrap();
    let config = BatcherConfig {
        max_batch: 16,
        max_delay: Duration::from_millis(5),
        queue: 256,
        timeout: Duration::from_secs(5),
    };
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let observer = Sizes(sizes.clone());
    let batcher = Arc::new(Batcher::spawn(engine, config, observer).unwrap());
    let cases = Arc::new(cases(dir.path()));
    let mut tasks = Vec::new();
    for k in 0..40 {
        let (batcher, cases) = (batcher.clone(), cases.clone());
        tasks.push(tokio::spawn(async move {
            let (input, expected) = &cases[k % cases.len()];
            let row = batcher.infer(input.clone()).await.unwrap();
            assert!(close(&row, expected), "{row:?} vs {expected:?}");
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let sizes = sizes.lock().unwrap().clone();
    assert_eq!(sizes.iter().sum::<usize>(), 40, "{sizes:?}");
    assert!(
        sizes.iter().any(|s| *s > 1),
        "concurrent callers shared a batch: {sizes:?}"
    );
}

/// Remembers the size of every batch the batcher ran.
struct Sizes(Arc<Mutex<Vec<usize>>>);

impl BatchObserver for Sizes {
    fn batch(&self, size: usize, _queue_waits: &[Duration], _inference: Duration) {
        self.0.lock().unwrap().push(size);
    }
}

#[test]
fn bad_models_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    make_test_model(dir.path(), &["--hash", "0123456789abcdef"]);
    match TorchEngine::load(dir.path(), HASH, DeviceChoice::Cpu, None) {
        Err(e @ ModelError::Hash { .. }) => assert!(e.to_string().contains("0123456789abcdef")),
        other => panic!("expected a hash refusal, got {:?}", other.err()),
    }

    let dir = tempfile::tempdir().unwrap();
    make_test_model(dir.path(), &["--extra-outputs", "1"]);
    match TorchEngine::load(dir.path(), HASH, DeviceChoice::Cpu, None) {
        Err(e @ ModelError::Shape { .. }) => assert!(e.to_string().contains("[2, 7]"), "{e}"),
        other => panic!("expected a shape refusal, got {:?}", other.err()),
    }

    let dir = tempfile::tempdir().unwrap();
    make_test_model(dir.path(), &[]);
    std::fs::remove_file(dir.path().join("model.pt")).unwrap();
    match TorchEngine::load(dir.path(), HASH, DeviceChoice::Cpu, None) {
        Err(e @ ModelError::Missing { .. }) => assert!(e.to_string().contains("model.pt"), "{e}"),
        other => panic!("expected a missing-file refusal, got {:?}", other.err()),
    }

    let empty = tempfile::tempdir().unwrap();
    match TorchEngine::load(empty.path(), HASH, DeviceChoice::Cpu, None) {
        Err(e @ ModelError::Missing { .. }) => assert!(e.to_string().contains("model.json"), "{e}"),
        other => panic!("expected a missing-metadata refusal, got {:?}", other.err()),
    }
}
