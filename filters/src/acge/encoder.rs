//! From a rendering to one model's input row: the cut its `input` section asks for, then
//! the bytes, the hashed feature ids or the tokens. Runs on the caller's thread (the
//! proxy's worker), so the inference thread does only tensor work.

use std::path::Path;

use super::hashed::Hasher;
use super::meta::{Cut, InputSpec, ModelError, ModelMeta};
use super::render;
use super::tokens::TokenEncoder;

/// How a row of the batch is laid out in the module's input tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `[B, W]`, 0 pads.
    Bytes,
    /// `ids [N]`, `offsets [B]`.
    Hashed,
    /// `input_ids [B, T]` padded with this id, `attention_mask [B, T]`.
    Tokens { pad_id: i64 },
}

pub struct Encoder {
    max_len: usize,
    cut: Cut,
    kind: Kind,
}

enum Kind {
    Bytes,
    Hashed(Hasher),
    Tokens(Box<TokenEncoder>),
}

impl Encoder {
    /// The encoder `meta` (read from `dir`) asks for; loads the tokenizer of a
    /// `tokens` model.
    pub fn new(dir: &Path, meta: &ModelMeta) -> Result<Self, ModelError> {
        let kind = match &meta.input {
            InputSpec::Bytes => Kind::Bytes,
            InputSpec::Hashed(spec) => Kind::Hashed(Hasher::new(spec)),
            InputSpec::Tokens(spec) => Kind::Tokens(Box::new(TokenEncoder::load(dir, spec)?)),
        };
        Ok(Self {
            max_len: meta.max_len,
            cut: meta.input.cut(),
            kind,
        })
    }

    pub fn layout(&self) -> Layout {
        match &self.kind {
            Kind::Bytes => Layout::Bytes,
            Kind::Hashed(_) => Layout::Hashed,
            Kind::Tokens(t) => Layout::Tokens { pad_id: t.pad_id() },
        }
    }

    /// One input row for the model.
    pub fn encode(&self, rendering: &[u8]) -> Result<Vec<i64>, String> {
        let cut = render::cut(rendering, self.max_len, self.cut);
        match &self.kind {
            Kind::Bytes => Ok(render::encode_bytes(&cut)),
            Kind::Hashed(h) => Ok(h.ids(&cut)),
            Kind::Tokens(t) => t.ids(&cut),
        }
    }
}
