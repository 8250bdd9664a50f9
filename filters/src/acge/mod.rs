//! ACGE inference: the pieces that turn a request into model input and run the model in
//! dynamic batches.
//!
//! Built so far (issue 4 is in progress): the canonical rendering and encoding
//! ([`features`]), the Triton-style dynamic batcher over any [`batcher::Backend`]
//! ([`batcher`]), and the score cache ([`cache`]). Not built yet: the libtorch engine
//! (`engine.rs`, behind the `torch` feature), the `acge` filter itself, the default
//! model and `acge-proxy model eval`. No route can run an `acge` filter until they are.

pub mod batcher;
pub mod cache;
pub mod features;
