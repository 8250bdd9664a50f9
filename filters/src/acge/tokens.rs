//! The `tokens` input: a Hugging Face `tokenizer.json` from the model directory,
//! applied in Rust by the `tokenizers` crate (pure-Rust regex backend; it reads only
//! that file, never the network).
//!
//! The cut rendering is read as UTF-8 (an invalid sequence becomes U+FFFD, as Python's
//! `bytes.decode("utf-8", "replace")` does), encoded with the tokenizer's special
//! tokens, and truncated by the tokenizer to `max_tokens` (its end is cut). The proxy
//! pads each batch to its longest row itself.

use std::path::Path;

use tokenizers::{Tokenizer, TruncationParams};

use super::meta::{ModelError, TokensSpec};

pub struct TokenEncoder {
    tokenizer: Tokenizer,
    pad_id: i64,
}

impl TokenEncoder {
    pub fn load(dir: &Path, spec: &TokensSpec) -> Result<Self, ModelError> {
        let path = dir.join(&spec.tokenizer);
        let refuse = |reason: String| ModelError::Tokenizer {
            path: path.display().to_string(),
            reason,
        };
        let mut tokenizer = Tokenizer::from_file(&path).map_err(|e| refuse(e.to_string()))?;
        let pad_id = spec.pad_id.unwrap_or_else(|| {
            tokenizer
                .get_padding()
                .map(|p| i64::from(p.pad_id))
                .or_else(|| tokenizer.token_to_id("[PAD]").map(i64::from))
                .unwrap_or(0)
        });
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: spec.max_tokens,
                ..TruncationParams::default()
            }))
            .map_err(|e| refuse(e.to_string()))?;
        Ok(Self { tokenizer, pad_id })
    }

    /// The id that pads a row (attention mask 0 there).
    pub fn pad_id(&self) -> i64 {
        self.pad_id
    }

    /// The token ids of one cut rendering.
    pub fn ids(&self, cut: &[u8]) -> Result<Vec<i64>, String> {
        let text = String::from_utf8_lossy(cut);
        let encoding = self
            .tokenizer
            .encode(text.as_ref(), true)
            .map_err(|e| format!("the tokenizer failed: {e}"))?;
        Ok(encoding.get_ids().iter().map(|i| i64::from(*i)).collect())
    }
}
