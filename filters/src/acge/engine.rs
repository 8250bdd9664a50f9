//! The libtorch engine: a TorchScript ACGE model, its metadata and encoder, and the
//! [`Backend`] that runs it for the batcher. Compiled with the `torch` feature only.
//!
//! A model directory holds `model.json` (metadata) and the TorchScript file it names
//! (and, for a `tokens` model, its `tokenizer.json`). Loading refuses, with the reason,
//! a missing file, metadata that does not parse, a constitution hash other than the
//! configured one, a precision the device cannot run, and a module whose output for a
//! probe batch of the model's own input kind is not `[2, P]`.
//!
//! On CUDA the module runs in bf16 unless told otherwise (fp16 or fp32); each batch's
//! input is one packed int64 buffer, pinned and copied to the GPU once. On the CPU it
//! runs in fp32 (bf16 if asked). The intra-op thread count is set on the inference
//! thread itself: libtorch keeps it per thread, so two engines keep their own.

use std::path::Path;

use tch::{CModule, Device, Kind, Tensor};

use super::batcher::Backend;
use super::encoder::{Encoder, Layout};
pub use super::meta::{ModelError, ModelMeta};
use super::{DeviceChoice, Precision};

/// How an engine runs: where, in what precision, on how many threads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineOptions {
    pub device: DeviceChoice,
    /// Default: bf16 on CUDA, fp32 on the CPU.
    pub precision: Option<Precision>,
    /// libtorch intra-op threads of the inference thread; default libtorch's choice.
    pub threads: Option<usize>,
}

/// A loaded model: what turns a rendering into its input, and what runs it.
pub struct Loaded {
    pub engine: TorchEngine,
    pub encoder: Encoder,
    pub meta: ModelMeta,
}

pub struct TorchEngine {
    module: CModule,
    device: Device,
    precision: Precision,
    layout: Layout,
    principles: usize,
    threads: Option<usize>,
}

impl TorchEngine {
    /// Loads and checks the model in `dir`.
    pub fn load(
        dir: &Path,
        constitution_hash: &str,
        options: EngineOptions,
    ) -> Result<Loaded, ModelError> {
        let (meta, file) = ModelMeta::read(dir, constitution_hash)?;
        let encoder = Encoder::new(dir, &meta)?;
        let device = match options.device {
            DeviceChoice::Cpu => Device::Cpu,
            DeviceChoice::Cuda if !tch::Cuda::is_available() => return Err(ModelError::NoCuda),
            DeviceChoice::Cuda => Device::Cuda(0),
            DeviceChoice::Auto => Device::cuda_if_available(),
        };
        let precision = match (options.precision, device) {
            (None, Device::Cpu) => Precision::Fp32,
            (None, _) => Precision::Bf16,
            (Some(Precision::Fp16), Device::Cpu) => {
                return Err(ModelError::Precision {
                    precision: Precision::Fp16.as_str(),
                })
            }
            (Some(p), _) => p,
        };
        if let Some(n) = options.threads {
            tch::set_num_threads(i32::try_from(n.max(1)).unwrap_or(i32::MAX));
        }
        let mut module = CModule::load_on_device(&file, device).map_err(|e| ModelError::Load {
            path: file.display().to_string(),
            reason: first_line(&e.to_string()),
        })?;
        module.set_eval();
        // Every float parameter is brought to the precision it runs in, whatever it was
        // stored in: a model saved in fp16 (to be small on disk) runs in fp32 on the CPU.
        cast_parameters(&module, precision.kind()).map_err(|e| ModelError::Load {
            path: file.display().to_string(),
            reason: format!("cannot cast to {}: {e}", precision.as_str()),
        })?;
        let mut engine = Self {
            module,
            device,
            precision,
            layout: encoder.layout(),
            principles: meta.principles.len(),
            threads: options.threads,
        };
        // A probe of two inputs of the model's own kind, of different lengths: the
        // output must be [2, P].
        let probe: Vec<Vec<i64>> = [
            &b"GET /probe\n\n"[..],
            b"POST /probe\n\n{\"probe\":[1,2,3]}",
        ]
        .iter()
        .map(|r| encoder.encode(r))
        .collect::<Result<_, _>>()
        .map_err(|reason| ModelError::Signature {
            kind: meta.input.kind(),
            reason,
        })?;
        let refs: Vec<&[i64]> = probe.iter().map(Vec::as_slice).collect();
        let out = engine.forward(&refs).map_err(|e| match e {
            ModelError::Torch(reason) => ModelError::Signature {
                kind: meta.input.kind(),
                reason,
            },
            e => e,
        })?;
        if out.size() != [2, meta.principles.len() as i64] {
            return Err(ModelError::Shape {
                got: out.size(),
                principles: meta.principles.len(),
            });
        }
        Ok(Loaded {
            engine,
            encoder,
            meta,
        })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    pub fn on_cuda(&self) -> bool {
        self.device != Device::Cpu
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Builds the batch's input tensors (one packed buffer, one copy to the device) and
    /// runs the module.
    fn forward(&mut self, batch: &[&[i64]]) -> Result<Tensor, ModelError> {
        let rows = batch.len() as i64;
        let (packed, shape) = match self.layout {
            Layout::Bytes => {
                let width = batch.iter().map(|i| i.len()).max().unwrap_or(0).max(1);
                (pad(batch, width, 0, false), vec![rows, width as i64])
            }
            Layout::Hashed => {
                let total: usize = batch.iter().map(|i| i.len()).sum();
                let mut buf = Vec::with_capacity(total + batch.len());
                let mut offsets = Vec::with_capacity(batch.len());
                for input in batch {
                    offsets.push(buf.len() as i64);
                    buf.extend_from_slice(input);
                }
                buf.extend_from_slice(&offsets);
                (buf, vec![(total + batch.len()) as i64])
            }
            Layout::Tokens { pad_id } => {
                let width = batch.iter().map(|i| i.len()).max().unwrap_or(0).max(1);
                (pad(batch, width, pad_id, true), vec![2, rows, width as i64])
            }
        };
        let mut input = Tensor::from_slice(&packed).view(shape.as_slice());
        if self.device != Device::Cpu {
            input = input
                .pin_memory(self.device)
                .to_device_(self.device, Kind::Int64, true, false);
        }
        let inputs = match self.layout {
            Layout::Bytes => vec![input],
            Layout::Hashed => {
                let n = input.size()[0] - rows;
                vec![input.narrow(0, 0, n), input.narrow(0, n, rows)]
            }
            Layout::Tokens { .. } => vec![input.get(0), input.get(1)],
        };
        let out = tch::no_grad(|| self.module.forward_ts(&inputs))
            .map_err(|e| ModelError::Torch(first_line(&e.to_string())))?;
        Ok(out.to_device(Device::Cpu).to_kind(Kind::Float))
    }
}

/// Casts the module's floating-point parameters of another kind in place. Not `Module::to(kind)`:
/// libtorch's casts every tensor of the module, integer buffers too (a BERT's
/// `position_ids` would become bf16 and break its embedding look-up). Buffers stay as
/// the module saved them (docs/model-contract.md).
fn cast_parameters(module: &CModule, kind: Kind) -> Result<(), tch::TchError> {
    for (_, mut p) in module.named_parameters()? {
        if p.is_floating_point() && p.kind() != kind {
            let cast = p.f_to_kind(kind)?;
            tch::no_grad(|| p.set_data(&cast));
        }
    }
    Ok(())
}

/// Rows padded to `width` with `pad` (`[B, W]`); with `mask`, the attention mask
/// (`[B, W]`, 1 where a row has a value) follows, for a `[2, B, W]` buffer.
fn pad(batch: &[&[i64]], width: usize, pad: i64, mask: bool) -> Vec<i64> {
    let cells = batch.len() * width;
    let mut buf = vec![pad; if mask { 2 * cells } else { cells }];
    for (row, input) in buf[..cells].chunks_mut(width).zip(batch) {
        row[..input.len()].copy_from_slice(input);
    }
    if mask {
        buf[cells..].fill(0);
        for (row, input) in buf[cells..].chunks_mut(width).zip(batch) {
            row[..input.len()].fill(1);
        }
    }
    buf
}

impl Backend for TorchEngine {
    type Error = ModelError;

    fn start(&mut self) {
        if let Some(n) = self.threads {
            tch::set_num_threads(i32::try_from(n.max(1)).unwrap_or(i32::MAX));
        }
    }

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
/// first line, except for an error inside TorchScript, whose first line only says so:
/// there the reason is the error line the script's traceback ends with.
fn first_line(message: &str) -> String {
    let first = message.lines().next().unwrap_or(message).trim();
    if first.contains("failed in the TorchScript interpreter") {
        if let Some(line) = message.lines().rev().map(str::trim).find(|l| {
            l.split_once("Error: ")
                .is_some_and(|(k, _)| !k.contains(' '))
        }) {
            return line.to_string();
        }
    }
    first.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_and_masks() {
        let a = [1i64, 2, 3];
        let b = [4i64];
        assert_eq!(pad(&[&a, &b], 3, 0, false), vec![1, 2, 3, 4, 0, 0]);
        assert_eq!(
            pad(&[&a, &b], 3, 9, true),
            vec![1, 2, 3, 4, 9, 9, 1, 1, 1, 1, 0, 0]
        );
    }
}
