//! The default model as the training script left it: the Rust engine gives the outputs
//! PyTorch gave (fixtures written by models/train.py), and the int8 variant loads and
//! agrees with fp32 on every decision of the fixtures.
#![cfg(feature = "torch")]

use std::path::{Path, PathBuf};

use acge_filters::acge::batcher::Backend;
use acge_filters::acge::engine::TorchEngine;
use acge_filters::acge::{features, DeviceChoice};
use http::{HeaderMap, HeaderName, HeaderValue, Method};

const HASH: &str = "cdd01ef066bc6cf2";

fn model_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(name)
}

/// The training script's fixtures, refusing an empty set (a loop over nothing checks
/// nothing).
fn fixtures() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(model_dir("acge-default").join("fixtures.json")).unwrap();
    let all = serde_json::from_str::<serde_json::Value>(&text)
        .unwrap()
        .as_array()
        .unwrap()
        .clone();
    assert!(
        all.len() >= 4,
        "models/acge-default has {} fixtures",
        all.len()
    );
    all
}

/// Row against row, of the same length.
fn assert_close(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} vs {want:?}");
    for (a, b) in got.iter().zip(want) {
        assert!((a - b).abs() < 1e-4, "{what}: {got:?} vs {want:?}");
    }
}

#[test]
fn rust_renders_and_scores_the_training_scripts_fixtures_alike() {
    let (mut engine, meta) =
        TorchEngine::load(&model_dir("acge-default"), HASH, DeviceChoice::Cpu, Some(1)).unwrap();
    let selected = [
        HeaderName::from_static("x-constitutional-hash"),
        HeaderName::from_static("content-type"),
    ];
    for f in fixtures() {
        let case = &f["case"];
        let mut headers = HeaderMap::new();
        for (k, v) in case["headers"].as_object().unwrap() {
            headers.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v.as_str().unwrap()).unwrap(),
            );
        }
        let body = serde_json::to_vec(&case["body"]).unwrap();
        let rendering = features::render_request(
            &Method::POST,
            case["path"].as_str().unwrap(),
            &headers,
            &selected,
            Some(&body),
        );
        let input = features::encode(&rendering, meta.max_len);
        let expected: Vec<i64> = f["input"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        assert_eq!(
            input, expected,
            "the Rust rendering is the training script's, byte for byte"
        );
        let row = engine.infer(&[input.as_slice()]).unwrap().remove(0);
        let want: Vec<f32> = f["output"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_close(&row, &want, "Rust against PyTorch");
    }
}

#[test]
fn the_int8_variant_loads_and_decides_as_fp32() {
    let (mut fp32, meta) =
        TorchEngine::load(&model_dir("acge-default"), HASH, DeviceChoice::Cpu, Some(1)).unwrap();
    let (mut int8, _) = TorchEngine::load(
        &model_dir("acge-default-int8"),
        HASH,
        DeviceChoice::Cpu,
        Some(1),
    )
    .unwrap();
    for f in fixtures() {
        let input: Vec<i64> = f["input"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect();
        let a = fp32.infer(&[input.as_slice()]).unwrap().remove(0);
        let b = int8.infer(&[input.as_slice()]).unwrap().remove(0);
        let over = |row: &[f32]| {
            row.iter()
                .map(|p| f64::from(*p) > meta.threshold)
                .collect::<Vec<_>>()
        };
        assert_eq!(over(&a), over(&b), "{a:?} vs {b:?}");
    }
}

#[test]
fn the_default_model_scores_a_row_alike_alone_and_padded_in_a_batch() {
    let (mut engine, _) =
        TorchEngine::load(&model_dir("acge-default"), HASH, DeviceChoice::Cpu, Some(1)).unwrap();
    let inputs: Vec<Vec<i64>> = fixtures()
        .iter()
        .map(|f| {
            f["input"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_i64().unwrap())
                .collect()
        })
        .collect();
    assert!(
        inputs.iter().map(Vec::len).min() < inputs.iter().map(Vec::len).max(),
        "the fixtures must differ in length for the batch to pad some of them"
    );
    let refs: Vec<&[i64]> = inputs.iter().map(Vec::as_slice).collect();
    let batched = engine.infer(&refs).unwrap();
    assert_eq!(batched.len(), inputs.len(), "one row per item");
    for (input, together) in inputs.iter().zip(&batched) {
        let alone = engine.infer(&[input.as_slice()]).unwrap().remove(0);
        assert_close(together, &alone, "in a batch against alone");
    }
}
