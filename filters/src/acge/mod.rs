//! ACGE inference: the pieces that turn a request into model input and run the model in
//! dynamic batches.
//!
//! Built so far (issue 4 is in progress): the canonical rendering and encoding
//! ([`features`]), the Triton-style dynamic batcher over any [`batcher::Backend`]
//! ([`batcher`]), the score cache ([`cache`]), and the libtorch engine (`engine`,
//! with the `torch` feature). Not built yet: the `acge` filter itself, the default
//! model and its training, and `acge-proxy model eval`. No route can run an `acge`
//! filter until they are.

pub mod batcher;
pub mod cache;
#[cfg(feature = "torch")]
pub mod engine;
pub mod features;
