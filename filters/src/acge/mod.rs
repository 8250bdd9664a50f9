//! ACGE inference: the pieces that turn a request into model input and run the model in
//! dynamic batches.
//!
//! The canonical rendering and its cut ([`render`]); the model's input computed in Rust
//! ([`encoder`]: the bytes, the [`hashed`] feature ids or the [`tokens`] of a Hugging
//! Face tokenizer); the model metadata ([`meta`]); the Triton-style dynamic batcher over
//! any [`batcher::Backend`] ([`batcher`]); the libtorch engine (`engine`, with the
//! `torch` feature) or a shared Open Inference Protocol server ([`remote`]); the
//! two-stage [`cascade`]; the score cache ([`cache`]) and the `acge` filter
//! ([`filter`]).

pub mod batcher;
pub mod cache;
pub mod cascade;
pub mod config;
pub mod encoder;
#[cfg(feature = "torch")]
pub mod engine;
pub mod filter;
pub mod hashed;
pub mod meta;
pub mod remote;
pub mod render;
pub mod tokens;

use serde::{Deserialize, Serialize};

/// Where the model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when a GPU is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    Cuda,
}

/// The floating-point type the module's weights and arithmetic use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    /// CUDA only.
    Fp16,
    Bf16,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Fp16 => "fp16",
            Precision::Bf16 => "bf16",
        }
    }

    #[cfg(feature = "torch")]
    pub(crate) fn kind(self) -> tch::Kind {
        match self {
            Precision::Fp32 => tch::Kind::Float,
            Precision::Fp16 => tch::Kind::Half,
            Precision::Bf16 => tch::Kind::BFloat16,
        }
    }
}
