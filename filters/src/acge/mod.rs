//! ACGE inference: the pieces that turn a request into model input and run the model in
//! dynamic batches.
//!
//! The canonical rendering and encoding ([`features`]), the Triton-style dynamic
//! batcher over any [`batcher::Backend`] ([`batcher`]), the score cache ([`cache`]),
//! the model metadata ([`meta`]), the libtorch engine (`engine`, with the `torch`
//! feature) and the `acge` filter ([`filter`]).

pub mod batcher;
pub mod cache;
#[cfg(feature = "torch")]
pub mod engine;
pub mod features;
pub mod filter;
pub mod meta;

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
