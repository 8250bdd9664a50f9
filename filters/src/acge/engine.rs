//! The libtorch engine: a TorchScript ACGE model, its metadata, and the [`Backend`] that
//! runs it for the batcher. Compiled with the `torch` feature only.
//!
//! A model directory holds `model.json` (metadata) and the TorchScript file it names.
//! Loading refuses, with the reason, a missing file, metadata that does not parse, a
//! constitution hash other than the configured one, and a module whose output is not
//! `[B, P]` for the P principles the metadata lists.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{CModule, Device, Kind, Tensor};

use super::batcher::Backend;
use super::DeviceChoice;

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
    #[error("libtorch: {0}")]
    Torch(String),
}

pub struct TorchEngine {
    module: CModule,
    device: Device,
    principles: usize,
}

impl TorchEngine {
    /// Loads and checks the model in `dir`.
    pub fn load(
        dir: &Path,
        constitution_hash: &str,
        device: DeviceChoice,
        threads: Option<usize>,
    ) -> Result<(Self, ModelMeta), ModelError> {
        let meta_path = dir.join("model.json");
        let text = std::fs::read_to_string(&meta_path).map_err(|e| ModelError::Missing {
            path: meta_path.display().to_string(),
            reason: e.to_string(),
        })?;
        let meta: ModelMeta = serde_json::from_str(&text).map_err(|e| ModelError::Meta {
            path: meta_path.display().to_string(),
            reason: e.to_string(),
        })?;
        if meta.constitution_hash != constitution_hash {
            return Err(ModelError::Hash {
                model: meta.constitution_hash,
                configured: constitution_hash.to_string(),
            });
        }
        if meta.principles.is_empty() || meta.max_len == 0 {
            return Err(ModelError::Meta {
                path: meta_path.display().to_string(),
                reason: "principles must not be empty and max_len must be above 0".into(),
            });
        }
        let device = match device {
            DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Cuda if !tch::Cuda::is_available() => return Err(ModelError::NoCuda),
            DeviceChoice::Cuda => Device::Cuda(0),
            DeviceChoice::Auto => Device::cuda_if_available(),
        };
        if let Some(n) = threads {
            tch::set_num_threads(i32::try_from(n.max(1)).unwrap_or(i32::MAX));
        }
        let file: PathBuf = dir.join(&meta.file);
        if !file.is_file() {
            return Err(ModelError::Missing {
                path: file.display().to_string(),
                reason: "no such file".into(),
            });
        }
        let mut module =
            CModule::load_on_device(&file, device).map_err(|e| ModelError::Torch(e.to_string()))?;
        module.set_eval();
        let mut engine = Self {
            module,
            device,
            principles: meta.principles.len(),
        };
        // A probe of two inputs of different lengths: the output must be [2, P].
        let probe = engine.forward(&[&[1, 2, 3], &[4]])?;
        if probe.size() != [2, meta.principles.len() as i64] {
            return Err(ModelError::Shape {
                got: probe.size(),
                principles: meta.principles.len(),
            });
        }
        Ok((engine, meta))
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Pads the batch to its longest input (not to L) and runs the module.
    fn forward(&mut self, batch: &[&[i64]]) -> Result<Tensor, ModelError> {
        let width = batch.iter().map(|i| i.len()).max().unwrap_or(0).max(1);
        let mut ids = vec![0i64; batch.len() * width];
        for (row, input) in ids.chunks_mut(width).zip(batch) {
            row[..input.len()].copy_from_slice(input);
        }
        let input = Tensor::from_slice(&ids)
            .view([batch.len() as i64, width as i64])
            .to_device(self.device);
        let out = tch::no_grad(|| self.module.forward_ts(&[input]))
            .map_err(|e| ModelError::Torch(e.to_string()))?;
        Ok(out.to_device(Device::Cpu).to_kind(Kind::Float))
    }
}

impl Backend for TorchEngine {
    fn infer(&mut self, batch: &[&[i64]]) -> Result<Vec<Vec<f32>>, String> {
        let out = self.forward(batch).map_err(|e| e.to_string())?;
        if out.size() != [batch.len() as i64, self.principles as i64] {
            return Err(format!(
                "output {:?} for a batch of {}",
                out.size(),
                batch.len()
            ));
        }
        let flat = Vec::<f32>::try_from(out.flatten(0, -1)).map_err(|e| e.to_string())?;
        Ok(flat.chunks(self.principles).map(<[f32]>::to_vec).collect())
    }
}
