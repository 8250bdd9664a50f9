//! `model.json`: what a model directory says about its model, and the checks that
//! need no libtorch (so that `acge-proxy check` can run them in any build).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// `model.json`, beside the TorchScript file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelMeta {
    pub name: String,
    pub version: String,
    /// The TorchScript file, relative to the model directory.
    pub file: String,
    /// L: inputs longer than this are cut.
    pub max_len: usize,
    /// Principle ids, in the order of the output's columns.
    pub principles: Vec<String>,
    /// Violation probability above which a principle counts as violated.
    pub threshold: f64,
    /// The constitution the model was trained for.
    pub constitution_hash: String,
}

/// Why a model could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {reason}")]
    Missing { path: String, reason: String },
    #[error("{path}: not valid model metadata: {reason}")]
    Meta { path: String, reason: String },
    #[error("the model was trained for constitution {model}, but this proxy checks {configured}")]
    Hash { model: String, configured: String },
    #[error("the model's output is {got:?}; model.json lists {principles} principles, so [B, {principles}] was expected")]
    Shape { got: Vec<i64>, principles: usize },
    #[error("device cuda was asked for, but no CUDA device is available")]
    NoCuda,
    #[error("{path}: libtorch cannot load it: {reason}")]
    Load { path: String, reason: String },
    #[error("libtorch: {0}")]
    Torch(String),
}

impl ModelMeta {
    /// Reads and checks `dir/model.json`: it parses, names principles, a length, a
    /// threshold that is a probability, the configured constitution, and a model file
    /// that exists. Returns the metadata and the model file's path.
    pub fn read(dir: &Path, constitution_hash: &str) -> Result<(Self, PathBuf), ModelError> {
        let meta_path = dir.join("model.json");
        let text = std::fs::read_to_string(&meta_path).map_err(|e| ModelError::Missing {
            path: meta_path.display().to_string(),
            reason: e.to_string(),
        })?;
        let bad = |reason: String| ModelError::Meta {
            path: meta_path.display().to_string(),
            reason,
        };
        let meta: ModelMeta = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if meta.constitution_hash != constitution_hash {
            return Err(ModelError::Hash {
                model: meta.constitution_hash,
                configured: constitution_hash.to_string(),
            });
        }
        if meta.principles.is_empty() {
            return Err(bad("principles: list at least one".into()));
        }
        if meta.max_len == 0 {
            return Err(bad("max_len: must be above 0".into()));
        }
        if !(0.0..=1.0).contains(&meta.threshold) {
            return Err(bad(format!(
                "threshold: {} is not a probability (0–1)",
                meta.threshold
            )));
        }
        let file = dir.join(&meta.file);
        if !file.is_file() {
            return Err(ModelError::Missing {
                path: file.display().to_string(),
                reason: "no such file".into(),
            });
        }
        Ok((meta, file))
    }
}
