//! The default model as the training script left it: the Rust side renders each fixture
//! case as models/acge_input.py did, computes the same hashed ids, and the engine gives
//! the outputs PyTorch gave; the int8 variant loads and agrees with fp32 on every
//! decision of the fixtures; the fine-tuned encoder tokenises and scores as PyTorch
//! did.
#![cfg(feature = "torch")]

use std::path::{Path, PathBuf};

use acge_filters::acge::batcher::Backend;
use acge_filters::acge::config::DEFAULT_HEADERS;
use acge_filters::acge::engine::{EngineOptions, Loaded, TorchEngine};
use acge_filters::acge::{render, DeviceChoice};
use http::{HeaderMap, HeaderName, HeaderValue, Method};

const HASH: &str = "cdd01ef066bc6cf2";

fn model_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(name)
}

fn load(name: &str) -> Loaded {
    TorchEngine::load(
        &model_dir(name),
        HASH,
        EngineOptions {
            device: DeviceChoice::Cpu,
            precision: None,
            threads: Some(1),
        },
    )
    .unwrap()
}

/// The training script's fixtures, refusing a short set (a loop over nothing checks
/// nothing).
fn fixtures() -> Vec<serde_json::Value> {
    fixtures_of("acge-default", 6)
}

fn fixtures_of(name: &str, least: usize) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(model_dir(name).join("fixtures.json")).unwrap();
    let all = serde_json::from_str::<serde_json::Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone();
    assert!(
        all.len() >= least,
        "models/{name} has {} fixtures",
        all.len()
    );
    all
}

fn ints(v: &serde_json::Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

fn floats(v: &serde_json::Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Row against row, of the same length.
fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_within(got, want, 1e-4, what);
}

fn assert_within(got: &[f32], want: &[f32], tolerance: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    for (a, b) in got.iter().zip(want) {
        assert!((a - b).abs() < tolerance, "{what}: {got:?} vs {want:?}");
    }
}

/// The case rendered by the proxy's own code, with the default headers.
fn rust_rendering(case: &serde_json::Value) -> Vec<u8> {
    let selected: Vec<HeaderName> = DEFAULT_HEADERS
        .iter()
        .map(|h| HeaderName::from_static(h))
        .collect();
    let mut headers = HeaderMap::new();
    for (k, v) in case["headers"].as_object().into_iter().flatten() {
        headers.insert(
            HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v.as_str().unwrap()).unwrap(),
        );
    }
    let body = serde_json::to_vec(&case["body"]).unwrap();
    match case["status"].as_u64() {
        Some(status) => render::render_response(status as u16, &headers, &selected, Some(&body)),
        None => render::render_request(
            &Method::from_bytes(case["method"].as_str().unwrap().as_bytes()).unwrap(),
            case["path"].as_str().unwrap(),
            &headers,
            &selected,
            Some(&body),
        ),
    }
}

#[test]
fn rust_renders_hashes_and_scores_the_training_scripts_fixtures_alike() {
    let Loaded {
        mut engine,
        encoder,
        meta,
    } = load("acge-default");
    assert_eq!(meta.input.kind(), "hashed");
    let all = fixtures();
    assert!(
        all.iter().any(|f| f["case"]["status"].is_u64()),
        "the fixtures hold responses too"
    );
    for f in all {
        let rendering = rust_rendering(&f["case"]);
        assert_eq!(
            hex::encode(&rendering),
            f["rendering_hex"].as_str().unwrap(),
            "the Rust rendering is the training script's, byte for byte: {}",
            String::from_utf8_lossy(&rendering)
        );
        let input = encoder.encode(&rendering).unwrap();
        assert_eq!(
            input,
            ints(&f["input"]),
            "the hashed ids are the training script's"
        );
        let row = engine.infer(&[input.as_slice()]).unwrap().remove(0);
        assert_close(&row, &floats(&f["output"]), "Rust against PyTorch");
    }
}

/// Quantization moves a probability a little: the int8 variant is within `TOLERANCE` of
/// fp32 on every fixture, so it decides alike wherever fp32 is further than that from
/// the threshold (a case nearer to it may go either way, and is not asserted).
#[test]
fn the_int8_variant_loads_and_stays_close_to_fp32() {
    const TOLERANCE: f64 = 0.15;
    let Loaded {
        engine: mut fp32,
        meta,
        ..
    } = load("acge-default");
    let Loaded {
        engine: mut int8, ..
    } = load("acge-default-int8");
    let mut decided = 0;
    for f in fixtures() {
        let input = ints(&f["input"]);
        let a = fp32.infer(&[input.as_slice()]).unwrap().remove(0);
        let b = int8.infer(&[input.as_slice()]).unwrap().remove(0);
        for ((p, q), t) in a.iter().zip(&b).zip(meta.column_thresholds()) {
            let (p, q) = (f64::from(*p), f64::from(*q));
            assert!((p - q).abs() <= TOLERANCE, "{a:?} vs {b:?}");
            if (p - t).abs() > TOLERANCE {
                assert_eq!(p > t, q > t, "{a:?} vs {b:?}");
                decided += 1;
            }
        }
    }
    assert!(decided > 0, "no fixture was clear of the threshold");
}

#[test]
fn the_default_model_scores_a_row_alike_alone_and_in_a_batch() {
    let Loaded { mut engine, .. } = load("acge-default");
    let inputs: Vec<Vec<i64>> = fixtures().iter().map(|f| ints(&f["input"])).collect();
    assert!(
        inputs.iter().map(Vec::len).min() < inputs.iter().map(Vec::len).max(),
        "the fixtures must differ in length for the batch to lay them out unevenly"
    );
    let refs: Vec<&[i64]> = inputs.iter().map(Vec::as_slice).collect();
    let batched = engine.infer(&refs).unwrap();
    assert_eq!(batched.len(), inputs.len(), "one row per item");
    for (input, together) in inputs.iter().zip(&batched) {
        let alone = engine.infer(&[input.as_slice()]).unwrap().remove(0);
        assert_close(together, &alone, "in a batch against alone");
    }
}

/// The fine-tuned encoder (`tokens` input, parameters stored in fp16): the Rust
/// rendering and the `tokenizers` crate give the ids Python's tokenizers gave, and the
/// engine, casting the parameters to fp32, the outputs PyTorch gave.
#[test]
fn rust_tokenises_and_scores_the_encoders_fixtures_alike() {
    let Loaded {
        mut engine,
        encoder,
        meta,
    } = load("acge-encoder");
    assert_eq!(meta.input.kind(), "tokens");
    let all = fixtures_of("acge-encoder", 4);
    for f in all {
        let rendering = rust_rendering(&f["case"]);
        assert_eq!(
            hex::encode(&rendering),
            f["rendering_hex"].as_str().unwrap()
        );
        let input = encoder.encode(&rendering).unwrap();
        assert_eq!(input, ints(&f["input"]), "the token ids are Python's");
        let row = engine.infer(&[input.as_slice()]).unwrap().remove(0);
        // Six transformer layers: summation orders differ a little between the two.
        assert_within(&row, &floats(&f["output"]), 1e-3, "Rust against PyTorch");
    }
}

/// The test sets stay apart from the training data: models/check_overlap.py finds no
/// training row whose word 5-grams overlap a test row's by a Jaccard of 0.5 or more.
#[test]
fn no_training_row_is_a_near_copy_of_a_test_row() {
    let python = std::env::var("ACGE_TORCH_PYTHON").expect("run through scripts/cargo-torch");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(python)
        .arg(root.join("models/check_overlap.py"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("0 near-copies"), "{text}");
}
