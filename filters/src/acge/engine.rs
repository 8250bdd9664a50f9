//! The libtorch engine: a TorchScript ACGE model, its metadata, and the [`Backend`] that
//! runs it for the batcher. Compiled with the `torch` feature only.
//!
//! A model directory holds `model.json` (metadata) and the TorchScript file it names.
//! Loading refuses, with the reason, a missing file, metadata that does not parse, a
//! constitution hash other than the configured one, and a module whose output is not
//! `[B, P]` for the P principles the metadata lists.

use std::path::Path;

use tch::{CModule, Device, Kind, Tensor};

use super::batcher::Backend;
pub use super::meta::{ModelError, ModelMeta};
use super::DeviceChoice;

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
        let (meta, file) = ModelMeta::read(dir, constitution_hash)?;
        let device = match device {
            DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Cuda if !tch::Cuda::is_available() => return Err(ModelError::NoCuda),
            DeviceChoice::Cuda => Device::Cuda(0),
            DeviceChoice::Auto => Device::cuda_if_available(),
        };
        if let Some(n) = threads {
            tch::set_num_threads(i32::try_from(n.max(1)).unwrap_or(i32::MAX));
        }
        let mut module = CModule::load_on_device(&file, device).map_err(|e| ModelError::Load {
            path: file.display().to_string(),
            reason: first_line(&e.to_string()),
        })?;
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
            .map_err(|e| ModelError::Torch(first_line(&e.to_string())))?;
        Ok(out.to_device(Device::Cpu).to_kind(Kind::Float))
    }
}

impl Backend for TorchEngine {
    type Error = ModelError;

    fn infer(&mut self, batch: &[&[i64]]) -> Result<Vec<Vec<f32>>, ModelError> {
        let out = self.forward(batch)?;
        if out.size() != [batch.len() as i64, self.principles as i64] {
            return Err(ModelError::Shape {
                got: out.size(),
                principles: self.principles,
            });
        }
        let flat = Vec::<f32>::try_from(out.flatten(0, -1))
            .map_err(|e| ModelError::Torch(first_line(&e.to_string())))?;
        Ok(flat.chunks(self.principles).map(<[f32]>::to_vec).collect())
    }
}

/// libtorch's errors carry a C++ stack trace after their first line; the reason is the
/// first line.
fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or(message).trim().to_string()
}
