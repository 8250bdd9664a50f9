//! The libtorch engine against models PyTorch wrote, for each input kind: the ids the
//! Rust side computes are those the Python side (models/acge_input.py) computes, the
//! outputs are PyTorch's, batches of mixed lengths score as their items would alone,
//! precisions behave, and bad models are refused with the reason.
#![cfg(feature = "torch")]

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use acge_filters::acge::batcher::{Backend, BatchObserver, Batcher, BatcherConfig};
use acge_filters::acge::engine::{EngineOptions, Loaded, ModelError, TorchEngine};
use acge_filters::acge::{DeviceChoice, Precision};
use common::make_test_model;

const HASH: &str = "cdd01ef066bc6cf2";
const KINDS: [&str; 3] = ["bytes", "hashed", "tokens"];

struct Fixture {
    rendering: Vec<u8>,
    input: Vec<i64>,
    output: Vec<f32>,
}

/// The fixtures, refusing a short set (a loop over nothing checks nothing).
fn fixtures(dir: &Path) -> Vec<Fixture> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("fixtures.json")).unwrap()).unwrap();
    let all: Vec<Fixture> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|f| Fixture {
            rendering: hex::decode(f["rendering_hex"].as_str().unwrap()).unwrap(),
            input: f["input"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect(),
            output: f["output"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
                .collect(),
        })
        .collect();
    assert!(
        all.len() >= 4,
        "the test model wrote {} fixtures",
        all.len()
    );
    all
}

fn close(a: &[f32], b: &[f32], tolerance: f32) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < tolerance)
}

fn cpu(threads: usize) -> EngineOptions {
    EngineOptions {
        device: DeviceChoice::Cpu,
        precision: None,
        threads: Some(threads),
    }
}

fn model(kind: &str, extra: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["--kind", kind];
    args.extend_from_slice(extra);
    make_test_model(dir.path(), &args);
    dir
}

#[test]
fn each_input_kind_computes_pythons_ids_and_scores_as_pytorch() {
    for kind in KINDS {
        let dir = model(kind, &[]);
        let Loaded {
            mut engine,
            encoder,
            meta,
        } = TorchEngine::load(dir.path(), HASH, cpu(1)).unwrap();
        assert_eq!(meta.input.kind(), kind);
        let cases = fixtures(dir.path());
        for f in &cases {
            let input = encoder.encode(&f.rendering).unwrap();
            assert_eq!(
                input,
                f.input,
                "{kind}: Rust's ids for {:?} are Python's",
                String::from_utf8_lossy(&f.rendering)
            );
            let rows = engine.infer(&[input.as_slice()]).unwrap();
            assert!(
                close(&rows[0], &f.output, 1e-5),
                "{kind}: {:?} vs {:?}",
                rows[0],
                f.output
            );
        }
        // One batch of every case: laid out together, each row as it was alone.
        let batch: Vec<&[i64]> = cases.iter().map(|f| f.input.as_slice()).collect();
        let rows = engine.infer(&batch).unwrap();
        assert_eq!(rows.len(), cases.len(), "{kind}: one row per item");
        for (row, f) in rows.iter().zip(&cases) {
            assert!(
                close(row, &f.output, 1e-5),
                "{kind}: {row:?} vs {:?}",
                f.output
            );
        }
    }
}

#[test]
fn an_empty_hashed_row_scores_beside_full_ones() {
    let dir = model("hashed", &[]);
    let Loaded { mut engine, .. } = TorchEngine::load(dir.path(), HASH, cpu(1)).unwrap();
    let cases = fixtures(dir.path());
    let rows = engine
        .infer(&[cases[0].input.as_slice(), &[], cases[1].input.as_slice()])
        .unwrap();
    assert_eq!(rows.len(), 3);
    assert!(close(&rows[0], &cases[0].output, 1e-5));
    assert!(
        close(&rows[2], &cases[1].output, 1e-5),
        "the rows after an empty one keep their place"
    );
}

#[test]
fn bf16_on_the_cpu_stays_close_to_fp32_and_fp16_is_refused() {
    for kind in KINDS {
        let dir = model(kind, &[]);
        let Loaded { mut engine, .. } = TorchEngine::load(
            dir.path(),
            HASH,
            EngineOptions {
                precision: Some(Precision::Bf16),
                ..cpu(1)
            },
        )
        .unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(engine.precision(), Precision::Bf16);
        let mut differs = false;
        for f in fixtures(dir.path()) {
            let row = engine.infer(&[f.input.as_slice()]).unwrap().remove(0);
            assert!(
                close(&row, &f.output, 3e-2),
                "{kind}: bf16 {row:?} vs fp32 {:?}",
                f.output
            );
            differs |= !close(&row, &f.output, 1e-6);
        }
        assert!(
            differs,
            "{kind}: bf16 gave fp32's outputs exactly: the cast did not happen"
        );
        match TorchEngine::load(
            dir.path(),
            HASH,
            EngineOptions {
                precision: Some(Precision::Fp16),
                ..cpu(1)
            },
        ) {
            Err(e @ ModelError::Precision { .. }) => {
                assert!(e.to_string().contains("fp16 needs device cuda"), "{e}")
            }
            other => panic!("{kind}: fp16 on the CPU: {:?}", other.err()),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_behind_the_batcher_serves_concurrent_callers() {
    let dir = model("hashed", &[]);
    let Loaded { engine, .. } = TorchEngine::load(dir.path(), HASH, cpu(1)).unwrap();
    let config = BatcherConfig {
        max_batch: 16,
        max_delay: Duration::from_millis(5),
        queue: 256,
        timeout: Duration::from_secs(5),
    };
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let observer = Sizes(sizes.clone());
    let batcher = Arc::new(Batcher::spawn("test", engine, config, observer).unwrap());
    let cases = Arc::new(fixtures(dir.path()));
    let mut tasks = Vec::new();
    for k in 0..40 {
        let (batcher, cases) = (batcher.clone(), cases.clone());
        tasks.push(tokio::spawn(async move {
            let f = &cases[k % cases.len()];
            let row = batcher.infer(f.input.clone()).await.unwrap();
            assert!(close(&row, &f.output, 1e-5), "{row:?} vs {:?}", f.output);
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
    let load = |dir: &Path| TorchEngine::load(dir, HASH, cpu(1)).map(|_| ());

    let dir = model("bytes", &["--hash", "0123456789abcdef"]);
    match load(dir.path()) {
        Err(e @ ModelError::Hash { .. }) => assert!(e.to_string().contains("0123456789abcdef")),
        other => panic!("expected a hash refusal, got {:?}", other.err()),
    }

    let dir = model("hashed", &["--extra-outputs", "1"]);
    match load(dir.path()) {
        Err(e @ ModelError::Shape { .. }) => assert!(e.to_string().contains("[2, 7]"), "{e}"),
        other => panic!("expected a shape refusal, got {:?}", other.err()),
    }

    let dir = model("bytes", &[]);
    std::fs::remove_file(dir.path().join("model.pt")).unwrap();
    match load(dir.path()) {
        Err(e @ ModelError::Missing { .. }) => assert!(e.to_string().contains("model.pt"), "{e}"),
        other => panic!("expected a missing-file refusal, got {:?}", other.err()),
    }

    let empty = tempfile::tempdir().unwrap();
    match load(empty.path()) {
        Err(e @ ModelError::Missing { .. }) => assert!(e.to_string().contains("model.json"), "{e}"),
        other => panic!("expected a missing-metadata refusal, got {:?}", other.err()),
    }

    // A hashed module whose model.json claims bytes: the probe finds the mismatch.
    let dir = model("hashed", &[]);
    let path = dir.path().join("model.json");
    let mut meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    meta.as_object_mut().unwrap().remove("input");
    std::fs::write(&path, meta.to_string()).unwrap();
    match load(dir.path()) {
        Err(e @ ModelError::Signature { .. }) => {
            assert!(e.to_string().contains("does not take a bytes input"), "{e}")
        }
        other => panic!("expected a signature refusal, got {:?}", other.err()),
    }

    // A tokens model whose tokenizer.json is not one.
    let dir = model("tokens", &[]);
    std::fs::write(
        dir.path().join("tokenizer.json"),
        "{\"not\": \"a tokenizer\"}",
    )
    .unwrap();
    match load(dir.path()) {
        Err(e @ ModelError::Tokenizer { .. }) => {
            assert!(e.to_string().contains("tokenizer.json"), "{e}")
        }
        other => panic!("expected a tokenizer refusal, got {:?}", other.err()),
    }
}
