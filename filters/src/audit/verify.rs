//! Reading the audit log back: full verification, inclusion proofs, and checking a
//! proof against a signed checkpoint. This is what `acge-proxy audit verify|prove|
//! check-proof` run; it never writes.

use std::path::Path;

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::merkle::{self, leaf_hash, Hash};
use super::segment::{
    read_frames, segments, AuditRecord, Checkpoint, CHECKPOINTS_FILE, PUBLIC_KEY_FILE,
};

/// What a passing verification saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub records: u64,
    pub segments: usize,
    pub checkpoints: usize,
    /// Size and root of the last checkpoint.
    pub last: Option<(u64, String)>,
    /// Records written after the last checkpoint, not yet covered by a signature.
    pub unsigned_tail: u64,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "OK: {} records in {} segments, {} checkpoints",
            self.records, self.segments, self.checkpoints
        )?;
        if let Some((size, root)) = &self.last {
            write!(f, "; last checkpoint: size {size}, root {root}")?;
        }
        if self.unsigned_tail > 0 {
            write!(
                f,
                "; {} records after it are not signed yet",
                self.unsigned_tail
            )?;
        }
        Ok(())
    }
}

/// Why a log does not verify, or a proof does not check: the first bad place, named.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Key { path: String, reason: KeyError },
    #[error("record {index} ({segment} offset {offset}): not a valid record: {reason}")]
    Record {
        index: u64,
        segment: String,
        offset: u64,
        reason: String,
    },
    #[error("record {index} ({segment} offset {offset}) says it is record {seq}: {}", if seq > index { "records are missing before it" } else { "it is out of order or repeated" })]
    Sequence {
        index: u64,
        segment: String,
        offset: u64,
        seq: u64,
    },
    #[error("record {index} ({segment} offset {offset}): the segment {}: {reason}", if *at_end { "ends in a torn or cut record" } else { "is damaged" })]
    Frame {
        index: u64,
        segment: String,
        offset: u64,
        at_end: bool,
        reason: String,
    },
    #[error("checkpoint {index} ({CHECKPOINTS_FILE} line {line}): {reason}")]
    CheckpointLine {
        index: usize,
        line: usize,
        reason: String,
    },
    #[error("checkpoint {index} (size {size}): {reason}")]
    Signature {
        index: usize,
        size: u64,
        reason: SignatureError,
    },
    #[error("checkpoint {index} (size {size}): covers {size} records but the log holds {total}: records {total}..{} are missing or cut", size - 1)]
    Covers { index: usize, size: u64, total: u64 },
    #[error("checkpoint {index} (size {size}): the records do not hash to the signed root: a record in {from}..{} was changed", size.saturating_sub(1))]
    Root { index: usize, size: u64, from: u64 },
    #[error("checkpoint {index} (size {size}): smaller than checkpoint {} before it", index - 1)]
    Shrunk { index: usize, size: u64 },
    #[error("checkpoint {index} (size {size}): not consistent with checkpoint {}", index - 1)]
    Inconsistent { index: usize, size: u64 },
    #[error("no checkpoint covers record {index} yet (the log holds {records} records)")]
    NotCovered { index: u64, records: u64 },
    #[error("checkpoint of size {size} covers records the log no longer holds")]
    Gone { size: u64 },
    #[error("checkpoint: {0}")]
    ProofSignature(SignatureError),
    #[error("{0} is not a SHA-256 hex")]
    NotAHash(String),
    #[error("record {index} is not in the tree of size {size} with root {root}: the record or the path was changed")]
    NotIncluded { index: u64, size: u64, root: String },
}

/// Why a public key is not one.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("not hex: {0}")]
    Hex(#[from] hex::FromHexError),
    #[error("an ed25519 public key is 32 bytes")]
    Length,
    #[error("not an ed25519 public key: {0}")]
    Point(#[from] ed25519_dalek::SignatureError),
}

/// Why a checkpoint's signature does not hold.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    #[error("signature not hex: {0}")]
    Hex(#[from] hex::FromHexError),
    #[error("a signature is 64 bytes")]
    Length,
    #[error("the signature does not match")]
    Mismatch,
}

/// All records of a log directory, as read, with where each came from.
struct Loaded {
    payloads: Vec<Vec<u8>>,
    leaves: Vec<Hash>,
    segments: usize,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> VerifyError + '_ {
    move |source| VerifyError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn load_records(dir: &Path) -> Result<Loaded, VerifyError> {
    let found = segments(dir).map_err(io_error(dir))?;
    let mut loaded = Loaded {
        payloads: Vec::new(),
        leaves: Vec::new(),
        segments: found.len(),
    };
    for (_, path) in &found {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = std::fs::read(path).map_err(io_error(path))?;
        let frames = read_frames(&bytes);
        for (offset, payload) in frames.records {
            let index = loaded.payloads.len() as u64;
            let record: AuditRecord =
                serde_json::from_slice(payload).map_err(|e| VerifyError::Record {
                    index,
                    segment: name.clone(),
                    offset,
                    reason: e.to_string(),
                })?;
            if record.seq != index {
                return Err(VerifyError::Sequence {
                    index,
                    segment: name,
                    offset,
                    seq: record.seq,
                });
            }
            loaded.leaves.push(leaf_hash(payload));
            loaded.payloads.push(payload.to_vec());
        }
        if let Some(bad) = frames.bad {
            return Err(VerifyError::Frame {
                index: loaded.payloads.len() as u64,
                segment: name,
                offset: bad.offset,
                at_end: bad.at_end,
                reason: bad.reason.to_string(),
            });
        }
    }
    Ok(loaded)
}

pub fn read_public_key(dir: &Path) -> Result<VerifyingKey, VerifyError> {
    let path = dir.join(PUBLIC_KEY_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_error(&path))?;
    parse_public_key(text.trim()).map_err(|reason| VerifyError::Key {
        path: path.display().to_string(),
        reason,
    })
}

pub fn parse_public_key(hex_key: &str) -> Result<VerifyingKey, KeyError> {
    let bytes: [u8; 32] = hex::decode(hex_key)?
        .try_into()
        .map_err(|_| KeyError::Length)?;
    Ok(VerifyingKey::from_bytes(&bytes)?)
}

fn read_checkpoints(dir: &Path) -> Result<Vec<Checkpoint>, VerifyError> {
    let path = dir.join(CHECKPOINTS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(&path)(e)),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| VerifyError::CheckpointLine {
                index: i,
                line: i + 1,
                reason: e.to_string(),
            })
        })
        .collect()
}

fn check_signature(key: &VerifyingKey, cp: &Checkpoint) -> Result<(), SignatureError> {
    let sig: [u8; 64] = hex::decode(&cp.signature)?
        .try_into()
        .map_err(|_| SignatureError::Length)?;
    key.verify(
        &Checkpoint::message(cp.tree_size, &cp.root, cp.time_ms),
        &Signature::from_bytes(&sig),
    )
    .map_err(|_| SignatureError::Mismatch)
}

/// Recomputes everything: every record's frame and sequence, every checkpoint's
/// signature and root, and each checkpoint's consistency with the one before.
/// Returns the first bad place found.
pub fn verify(dir: &Path) -> Result<Summary, VerifyError> {
    let key = read_public_key(dir)?;
    let loaded = load_records(dir)?;
    let checkpoints = read_checkpoints(dir)?;
    let total = loaded.leaves.len() as u64;
    let mut previous: Option<&Checkpoint> = None;
    for (i, cp) in checkpoints.iter().enumerate() {
        let size = cp.tree_size;
        check_signature(&key, cp).map_err(|reason| VerifyError::Signature {
            index: i,
            size,
            reason,
        })?;
        if size > total {
            return Err(VerifyError::Covers {
                index: i,
                size,
                total,
            });
        }
        let leaves = &loaded.leaves[..size as usize];
        if hex::encode(merkle::root(leaves)) != cp.root {
            return Err(VerifyError::Root {
                index: i,
                size,
                from: previous.map_or(0, |p| p.tree_size),
            });
        }
        if let Some(prev) = previous {
            if prev.tree_size > size {
                return Err(VerifyError::Shrunk { index: i, size });
            }
            let proof = merkle::consistency_proof(leaves, prev.tree_size as usize);
            let (r1, r2) = (parse_hash(&prev.root), parse_hash(&cp.root));
            let consistent = match (r1, r2) {
                (Some(r1), Some(r2)) => {
                    merkle::verify_consistency(prev.tree_size, cp.tree_size, &r1, &r2, &proof)
                }
                _ => false,
            };
            if !consistent {
                return Err(VerifyError::Inconsistent { index: i, size });
            }
        }
        previous = Some(cp);
    }
    let last = checkpoints.last();
    Ok(Summary {
        records: total,
        segments: loaded.segments,
        checkpoints: checkpoints.len(),
        last: last.map(|c| (c.tree_size, c.root.clone())),
        unsigned_tail: total - last.map_or(0, |c| c.tree_size),
    })
}

fn parse_hash(h: &str) -> Option<Hash> {
    hex::decode(h).ok()?.try_into().ok()
}

/// An inclusion proof: record `index` is in the tree a signed checkpoint vouches for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InclusionProof {
    pub index: u64,
    /// The record exactly as stored (its JSON text).
    pub record: String,
    pub checkpoint: Checkpoint,
    /// Hex hashes, leaf to root.
    pub path: Vec<String>,
}

/// Proves record `index` against the first checkpoint that covers it.
pub fn prove(dir: &Path, index: u64) -> Result<InclusionProof, VerifyError> {
    let loaded = load_records(dir)?;
    let checkpoints = read_checkpoints(dir)?;
    let Some(cp) = checkpoints.into_iter().find(|c| c.tree_size > index) else {
        return Err(VerifyError::NotCovered {
            index,
            records: loaded.leaves.len() as u64,
        });
    };
    let size = cp.tree_size as usize;
    if size > loaded.leaves.len() {
        return Err(VerifyError::Gone { size: cp.tree_size });
    }
    let path = merkle::inclusion_proof(&loaded.leaves[..size], index as usize)
        .iter()
        .map(hex::encode)
        .collect();
    Ok(InclusionProof {
        index,
        record: String::from_utf8_lossy(&loaded.payloads[index as usize]).into_owned(),
        checkpoint: cp,
        path,
    })
}

/// Checks a proof: the checkpoint's signature under `key`, and the record's path to
/// the checkpoint's root.
pub fn check_proof(proof: &InclusionProof, key: &VerifyingKey) -> Result<(), VerifyError> {
    check_signature(key, &proof.checkpoint).map_err(VerifyError::ProofSignature)?;
    let root = parse_hash(&proof.checkpoint.root)
        .ok_or_else(|| VerifyError::NotAHash("the checkpoint's root".into()))?;
    let path: Vec<Hash> = proof
        .path
        .iter()
        .map(|h| parse_hash(h).ok_or_else(|| VerifyError::NotAHash(format!("path entry `{h}`"))))
        .collect::<Result<_, _>>()?;
    let leaf = leaf_hash(proof.record.as_bytes());
    if merkle::verify_inclusion(&leaf, proof.index, proof.checkpoint.tree_size, &path, &root) {
        Ok(())
    } else {
        Err(VerifyError::NotIncluded {
            index: proof.index,
            size: proof.checkpoint.tree_size,
            root: proof.checkpoint.root.clone(),
        })
    }
}
