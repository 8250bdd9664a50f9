//! `model.json`: what a model directory says about its model, and the checks that
//! need no libtorch (so that `acge-proxy check` can run them in any build).
//!
//! The `input` section says what the module is given (docs/model-contract.md):
//! `bytes` (the rendering's bytes, the first contract), `hashed` (feature bucket ids the
//! proxy computes, [`super::hashed`]) or `tokens` (a Hugging Face tokenizer's ids,
//! [`super::tokens`]). A model without the section is a `bytes` model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// `model.json`, beside the TorchScript file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelMeta {
    pub name: String,
    pub version: String,
    /// The TorchScript file, relative to the model directory.
    pub file: String,
    /// Renderings longer than this many bytes are cut (how, [`InputSpec::cut`] says).
    pub max_len: usize,
    /// Principle ids, in the order of the output's columns.
    pub principles: Vec<String>,
    /// Violation probability above which a principle counts as violated.
    pub threshold: f64,
    /// Per principle, over `threshold` (calibrated on a validation split); a principle
    /// not named here has `threshold`.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub thresholds: BTreeMap<String, f64>,
    /// The constitution the model was trained for.
    pub constitution_hash: String,
    /// What the module is given; `bytes` when absent.
    pub input: InputSpec,
}

/// `model.json` as it is read: the `input` section is taken apart by its `kind` in a
/// second step, so that an error in it names its field (`input.buckets: …`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMeta {
    name: String,
    version: String,
    file: String,
    max_len: usize,
    principles: Vec<String>,
    threshold: f64,
    #[serde(default)]
    thresholds: BTreeMap<String, f64>,
    constitution_hash: String,
    #[serde(default)]
    input: Option<serde_json::Value>,
}

/// What the module reads, and how the proxy computes it from the rendering.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum InputSpec {
    /// `int64 [B, W]`: the rendering's bytes plus one, 0 pads; cut to its head.
    #[default]
    Bytes,
    /// `(ids int64 [N], offsets int64 [B])`: every item's feature bucket ids, one after
    /// the other; item b's start at `offsets[b]` (an `EmbeddingBag`'s own input).
    Hashed(HashedSpec),
    /// `(input_ids int64 [B, T], attention_mask int64 [B, T])`, T the batch's longest.
    Tokens(TokensSpec),
}

/// How a long rendering is cut to `max_len` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// The first `max_len` bytes (the `bytes` contract, kept as it was).
    Head,
    /// The first three quarters and the last quarter of `max_len`, each at a UTF-8
    /// character boundary: the request line and headers (who asks) and the end of the
    /// body, where a note or a final field sits, both survive a long body.
    HeadTail,
}

impl InputSpec {
    pub fn kind(&self) -> &'static str {
        match self {
            InputSpec::Bytes => "bytes",
            InputSpec::Hashed(_) => "hashed",
            InputSpec::Tokens(_) => "tokens",
        }
    }

    pub fn cut(&self) -> Cut {
        match self {
            InputSpec::Bytes => Cut::Head,
            InputSpec::Hashed(_) | InputSpec::Tokens(_) => Cut::HeadTail,
        }
    }
}

/// The `hashed` input: which features, hashed how, into how many buckets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HashedSpec {
    /// The hash function; `fmix64` is the only one (named, so that a model asking for
    /// another one is refused instead of read wrongly).
    pub hash: String,
    /// Bucket ids are in `0..buckets`, a power of two: the module's table has this many
    /// rows.
    pub buckets: u64,
    /// ASCII letters are lower-cased before any feature is taken.
    #[serde(default = "yes")]
    pub lowercase: bool,
    /// In this order: each feature's ids follow the previous feature's.
    pub features: Vec<Feature>,
}

fn yes() -> bool {
    true
}

/// One kind of feature of a `hashed` input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Feature {
    /// Every run of `n` consecutive bytes, for each listed n (1–7).
    CharNgrams { n: Vec<u8>, seed: u64 },
    /// Words: maximal runs of ASCII letters and digits and of bytes ≥ 0x80.
    Words { seed: u64 },
    /// Each word with the word after it.
    WordPairs { seed: u64 },
}

/// The `tokens` input.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensSpec {
    /// A Hugging Face `tokenizer.json`, relative to the model directory.
    pub tokenizer: String,
    /// T at most: longer inputs are truncated by the tokenizer (its end is cut).
    pub max_tokens: usize,
    /// The id that pads a row to the batch's longest (its attention mask is 0);
    /// default the tokenizer's own padding id, else `[PAD]`'s, else 0.
    #[serde(default)]
    pub pad_id: Option<i64>,
}

/// The most buckets a `hashed` model may have (its ids are int64).
pub const MAX_BUCKETS: u64 = 1 << 40;

/// The largest `max_tokens` a model may ask for.
pub const MAX_TOKENS: usize = 8192;

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
    #[error(
        "precision {precision} needs device cuda; on the CPU the model runs in fp32 (or bf16)"
    )]
    Precision { precision: &'static str },
    #[error("{path}: libtorch cannot load it: {reason}")]
    Load { path: String, reason: String },
    #[error("{path}: the tokenizer cannot be loaded: {reason}")]
    Tokenizer { path: String, reason: String },
    #[error("the model does not take a {kind} input ({reason}); check model.json's `input` against docs/model-contract.md")]
    Signature { kind: &'static str, reason: String },
    #[error("libtorch: {0}")]
    Torch(String),
}

impl ModelMeta {
    /// The threshold of each output column, in the order of `principles`.
    pub fn column_thresholds(&self) -> Vec<f64> {
        self.principles
            .iter()
            .map(|p| self.thresholds.get(p).copied().unwrap_or(self.threshold))
            .collect()
    }

    /// Reads and checks `dir/model.json`: it parses, names principles, a length, a
    /// threshold that is a probability, the configured constitution, an `input` section
    /// the proxy can compute, and files that exist. Returns the metadata and the model
    /// file's path.
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
        let raw: RawMeta =
            parse(&mut serde_json::Deserializer::from_str(&text), "").map_err(bad)?;
        let meta = ModelMeta {
            input: match raw.input {
                None => InputSpec::Bytes,
                Some(v) => InputSpec::from_value(v).map_err(bad)?,
            },
            name: raw.name,
            version: raw.version,
            file: raw.file,
            max_len: raw.max_len,
            principles: raw.principles,
            threshold: raw.threshold,
            thresholds: raw.thresholds,
            constitution_hash: raw.constitution_hash,
        };
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
        for (principle, t) in &meta.thresholds {
            if !meta.principles.contains(principle) {
                return Err(bad(format!(
                    "thresholds.{principle}: not one of the model's principles"
                )));
            }
            if !(0.0..=1.0).contains(t) {
                return Err(bad(format!(
                    "thresholds.{principle}: {t} is not a probability (0–1)"
                )));
            }
        }
        meta.input.check().map_err(bad)?;
        if let InputSpec::Tokens(t) = &meta.input {
            let file = dir.join(&t.tokenizer);
            if !file.is_file() {
                return Err(ModelError::Missing {
                    path: file.display().to_string(),
                    reason: "no such file (model.json's input.tokenizer)".into(),
                });
            }
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

/// Deserializes, prefixing an error with the path of the field it is about.
fn parse<'de, T: Deserialize<'de>, D: serde::Deserializer<'de>>(
    de: D,
    prefix: &str,
) -> Result<T, String>
where
    D::Error: std::fmt::Display,
{
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = match (prefix, path.as_str()) {
            (p, ".") => p.to_string(),
            ("", q) => q.to_string(),
            (p, q) => format!("{p}.{q}"),
        };
        if path.is_empty() {
            e.into_inner().to_string()
        } else {
            format!("{path}: {}", e.into_inner())
        }
    })
}

impl InputSpec {
    fn from_value(mut v: serde_json::Value) -> Result<Self, String> {
        let Some(fields) = v.as_object_mut() else {
            return Err("input: an object with a `kind` was expected".into());
        };
        let kind = match fields.remove("kind") {
            Some(serde_json::Value::String(k)) => k,
            Some(other) => return Err(format!("input.kind: {other} is not a kind name")),
            None => return Err("input.kind: missing (bytes, hashed or tokens)".into()),
        };
        match kind.as_str() {
            "bytes" => match fields.keys().next() {
                Some(k) => Err(format!(
                    "input: unknown field `{k}` (a bytes input has none)"
                )),
                None => Ok(InputSpec::Bytes),
            },
            "hashed" => parse(v, "input").map(InputSpec::Hashed),
            "tokens" => parse(v, "input").map(InputSpec::Tokens),
            other => Err(format!(
                "input.kind: unknown kind `{other}` (bytes, hashed or tokens)"
            )),
        }
    }

    /// The checks serde cannot make, each naming its field.
    fn check(&self) -> Result<(), String> {
        match self {
            InputSpec::Bytes => Ok(()),
            InputSpec::Hashed(h) => {
                if h.hash != "fmix64" {
                    return Err(format!(
                        "input.hash: `{}` is not a hash this proxy computes (fmix64)",
                        h.hash
                    ));
                }
                if !(2..=MAX_BUCKETS).contains(&h.buckets) || !h.buckets.is_power_of_two() {
                    return Err(format!(
                        "input.buckets: {} is not a power of two from 2 to 2^40",
                        h.buckets
                    ));
                }
                if h.features.is_empty() {
                    return Err("input.features: list at least one feature".into());
                }
                for (i, f) in h.features.iter().enumerate() {
                    if let Feature::CharNgrams { n, .. } = f {
                        if n.is_empty() {
                            return Err(format!("input.features[{i}].n: list at least one size"));
                        }
                        if let Some(bad) = n.iter().find(|n| !(1..=7).contains(*n)) {
                            return Err(format!(
                                "input.features[{i}].n: {bad} is not an n-gram size (1–7)"
                            ));
                        }
                        if let Some(twice) =
                            n.iter().find(|x| n.iter().filter(|y| y == x).count() > 1)
                        {
                            return Err(format!("input.features[{i}].n: {twice} is listed twice"));
                        }
                    }
                }
                Ok(())
            }
            InputSpec::Tokens(t) => {
                if t.max_tokens < 2 || t.max_tokens > MAX_TOKENS {
                    return Err(format!(
                        "input.max_tokens: {} is outside 2–{MAX_TOKENS}",
                        t.max_tokens
                    ));
                }
                if t.tokenizer.is_empty() {
                    return Err("input.tokenizer: name the tokenizer.json file".into());
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, input: serde_json::Value) {
        let mut meta = serde_json::json!({
            "name": "m", "version": "1", "file": "model.pt", "max_len": 64,
            "principles": ["privacy"], "threshold": 0.5, "constitution_hash": "h",
        });
        if !input.is_null() {
            meta["input"] = input;
        }
        std::fs::write(dir.join("model.json"), meta.to_string()).unwrap();
        std::fs::write(dir.join("model.pt"), b"not read here").unwrap();
    }

    fn error(input: serde_json::Value) -> String {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), input);
        match ModelMeta::read(dir.path(), "h") {
            Ok(_) => panic!("accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_model_without_an_input_section_is_a_bytes_model() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), serde_json::Value::Null);
        let (meta, _) = ModelMeta::read(dir.path(), "h").unwrap();
        assert_eq!(meta.input, InputSpec::Bytes);
        assert_eq!(meta.input.cut(), Cut::Head);
    }

    #[test]
    fn a_hashed_section_parses() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            serde_json::json!({"kind": "hashed", "hash": "fmix64", "buckets": 1024,
                "features": [{"kind": "char_ngrams", "n": [3, 5], "seed": 1},
                             {"kind": "words", "seed": 2}, {"kind": "word_pairs", "seed": 3}]}),
        );
        let (meta, _) = ModelMeta::read(dir.path(), "h").unwrap();
        let InputSpec::Hashed(h) = meta.input else {
            panic!("{:?}", meta.input)
        };
        assert!(h.lowercase, "lower-cased unless said otherwise");
        assert_eq!(h.features.len(), 3);
    }

    #[test]
    fn bad_input_sections_are_refused_naming_the_field() {
        let cases = [
            (
                serde_json::json!({"kind": "pixels"}),
                "input.kind: unknown kind `pixels`",
            ),
            (
                serde_json::json!({"kind": "hashed", "hash": "fmix64", "buckets": 8, "features": [], "bucket": 3}),
                "input.bucket: unknown field `bucket`",
            ),
            (
                serde_json::json!({"kind": "hashed", "hash": "fmix64", "buckets": 1000, "features": [{"kind": "words", "seed": 1}]}),
                "input.buckets: 1000 is not a power of two",
            ),
            (
                serde_json::json!({"kind": "hashed", "hash": "md5", "buckets": 8, "features": [{"kind": "words", "seed": 1}]}),
                "input.hash: `md5`",
            ),
            (
                serde_json::json!({"kind": "hashed", "hash": "fmix64", "buckets": 8, "features": [{"kind": "char_ngrams", "n": [3, 9], "seed": 1}]}),
                "input.features[0].n: 9 is not an n-gram size",
            ),
            (
                serde_json::json!({"kind": "hashed", "hash": "fmix64", "buckets": "many", "features": []}),
                "input.buckets: invalid type: string \"many\"",
            ),
            (
                serde_json::json!({"kind": "hashed", "hash": "fmix64", "buckets": 8, "features": [{"kind": "words"}]}),
                "input.features[0]: missing field `seed`",
            ),
            (
                serde_json::json!({"kind": "tokens", "tokenizer": "tokenizer.json", "max_tokens": 100000}),
                "input.max_tokens: 100000 is outside",
            ),
            (
                serde_json::json!({"kind": "tokens", "tokenizer": "absent.json", "max_tokens": 128}),
                "absent.json: no such file (model.json's input.tokenizer)",
            ),
        ];
        for (input, expected) in cases {
            let e = error(input.clone());
            assert!(e.contains(expected), "{input}: {e}");
        }
    }

    #[test]
    fn per_principle_thresholds_fill_in_over_the_default_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let meta = serde_json::json!({
            "name": "m", "version": "1", "file": "model.pt", "max_len": 64,
            "principles": ["privacy", "safety"], "threshold": 0.5,
            "thresholds": {"safety": 0.8}, "constitution_hash": "h",
        });
        std::fs::write(dir.path().join("model.json"), meta.to_string()).unwrap();
        std::fs::write(dir.path().join("model.pt"), b"not read here").unwrap();
        let (read, _) = ModelMeta::read(dir.path(), "h").unwrap();
        assert_eq!(read.column_thresholds(), [0.5, 0.8]);
        for (thresholds, expected) in [
            (
                serde_json::json!({"privacy": 1.5}),
                "thresholds.privacy: 1.5 is not a probability",
            ),
            (
                serde_json::json!({"charm": 0.5}),
                "thresholds.charm: not one of the model's principles",
            ),
        ] {
            let mut bad = meta.clone();
            bad["thresholds"] = thresholds;
            std::fs::write(dir.path().join("model.json"), bad.to_string()).unwrap();
            let e = ModelMeta::read(dir.path(), "h").unwrap_err().to_string();
            assert!(e.contains(expected), "{e}");
        }
    }
}
