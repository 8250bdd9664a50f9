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

/// All records of a log directory, as read, with where each came from.
struct Loaded {
    payloads: Vec<Vec<u8>>,
    leaves: Vec<Hash>,
    segments: usize,
}

fn load_records(dir: &Path) -> Result<Loaded, Vec<String>> {
    let found = segments(dir).map_err(|e| vec![format!("{}: {e}", dir.display())])?;
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
        let bytes = std::fs::read(path).map_err(|e| vec![format!("{name}: {e}")])?;
        let frames = read_frames(&bytes);
        for (offset, payload) in frames.records {
            let index = loaded.payloads.len() as u64;
            let record: AuditRecord = serde_json::from_slice(payload).map_err(|e| {
                vec![format!(
                    "record {index} ({name} offset {offset}): not a valid record: {e}"
                )]
            })?;
            if record.seq != index {
                let what = if record.seq > index {
                    "records are missing before it"
                } else {
                    "it is out of order or repeated"
                };
                return Err(vec![format!(
                    "record {index} ({name} offset {offset}) says it is record {}: {what}",
                    record.seq
                )]);
            }
            loaded.leaves.push(leaf_hash(payload));
            loaded.payloads.push(payload.to_vec());
        }
        if let Some(bad) = frames.bad {
            let index = loaded.payloads.len();
            let kind = if bad.at_end {
                "ends in a torn or cut record"
            } else {
                "is damaged"
            };
            return Err(vec![format!(
                "record {index} ({name} offset {}): the segment {kind}: {}",
                bad.offset, bad.reason
            )]);
        }
    }
    Ok(loaded)
}

pub fn read_public_key(dir: &Path) -> Result<VerifyingKey, String> {
    let path = dir.join(PUBLIC_KEY_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse_public_key(text.trim()).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn parse_public_key(hex_key: &str) -> Result<VerifyingKey, String> {
    let bytes: [u8; 32] = hex::decode(hex_key)
        .map_err(|e| format!("not hex: {e}"))?
        .try_into()
        .map_err(|_| "an ed25519 public key is 32 bytes".to_string())?;
    VerifyingKey::from_bytes(&bytes).map_err(|e| format!("not an ed25519 public key: {e}"))
}

fn read_checkpoints(dir: &Path) -> Result<Vec<Checkpoint>, Vec<String>> {
    let path = dir.join(CHECKPOINTS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(vec![format!("{}: {e}", path.display())]),
    };
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| {
                vec![format!(
                    "checkpoint {} ({CHECKPOINTS_FILE} line {}): {e}",
                    i,
                    i + 1
                )]
            })
        })
        .collect()
}

fn check_signature(key: &VerifyingKey, cp: &Checkpoint) -> Result<(), String> {
    let sig: [u8; 64] = hex::decode(&cp.signature)
        .map_err(|e| format!("signature not hex: {e}"))?
        .try_into()
        .map_err(|_| "a signature is 64 bytes".to_string())?;
    key.verify(
        &Checkpoint::message(cp.tree_size, &cp.root, cp.time_ms),
        &Signature::from_bytes(&sig),
    )
    .map_err(|_| "the signature does not match".to_string())
}

/// Recomputes everything: every record's frame and sequence, every checkpoint's
/// signature and root, and each checkpoint's consistency with the one before.
/// Returns the problems found, the first bad place named first.
pub fn verify(dir: &Path) -> Result<Summary, Vec<String>> {
    let key = read_public_key(dir).map_err(|e| vec![e])?;
    let loaded = load_records(dir)?;
    let checkpoints = read_checkpoints(dir)?;
    let total = loaded.leaves.len() as u64;
    let mut previous: Option<&Checkpoint> = None;
    for (i, cp) in checkpoints.iter().enumerate() {
        let place = format!("checkpoint {i} (size {})", cp.tree_size);
        check_signature(&key, cp).map_err(|e| vec![format!("{place}: {e}")])?;
        if cp.tree_size > total {
            return Err(vec![format!(
                "{place}: covers {} records but the log holds {total}: records {total}..{} are missing or cut",
                cp.tree_size,
                cp.tree_size - 1
            )]);
        }
        let size = cp.tree_size as usize;
        let root = hex::encode(merkle::root(&loaded.leaves[..size]));
        if root != cp.root {
            let from = previous.map_or(0, |p| p.tree_size);
            return Err(vec![format!(
                "{place}: the records do not hash to the signed root: a record in {from}..{} was changed",
                cp.tree_size.saturating_sub(1)
            )]);
        }
        if let Some(prev) = previous {
            if prev.tree_size > cp.tree_size {
                return Err(vec![format!(
                    "{place}: smaller than checkpoint {} before it",
                    i - 1
                )]);
            }
            let proof = merkle::consistency_proof(&loaded.leaves[..size], prev.tree_size as usize);
            let (r1, r2) = (parse_hash(&prev.root), parse_hash(&cp.root));
            let consistent = match (r1, r2) {
                (Some(r1), Some(r2)) => {
                    merkle::verify_consistency(prev.tree_size, cp.tree_size, &r1, &r2, &proof)
                }
                _ => false,
            };
            if !consistent {
                return Err(vec![format!(
                    "{place}: not consistent with checkpoint {}",
                    i - 1
                )]);
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
pub fn prove(dir: &Path, index: u64) -> Result<InclusionProof, String> {
    let loaded = load_records(dir).map_err(|e| e.join("; "))?;
    let checkpoints = read_checkpoints(dir).map_err(|e| e.join("; "))?;
    let Some(cp) = checkpoints.into_iter().find(|c| c.tree_size > index) else {
        return Err(format!(
            "no checkpoint covers record {index} yet (the log holds {} records)",
            loaded.leaves.len()
        ));
    };
    let size = cp.tree_size as usize;
    if size > loaded.leaves.len() {
        return Err(format!(
            "checkpoint of size {size} covers records the log no longer holds"
        ));
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
pub fn check_proof(proof: &InclusionProof, key: &VerifyingKey) -> Result<(), String> {
    check_signature(key, &proof.checkpoint).map_err(|e| format!("checkpoint: {e}"))?;
    let root = parse_hash(&proof.checkpoint.root).ok_or("checkpoint root is not a SHA-256 hex")?;
    let path: Vec<Hash> = proof
        .path
        .iter()
        .map(|h| parse_hash(h).ok_or_else(|| format!("path entry `{h}` is not a SHA-256 hex")))
        .collect::<Result<_, _>>()?;
    let leaf = leaf_hash(proof.record.as_bytes());
    if merkle::verify_inclusion(&leaf, proof.index, proof.checkpoint.tree_size, &path, &root) {
        Ok(())
    } else {
        Err(format!(
            "record {} is not in the tree of size {} with root {}: the record or the path was changed",
            proof.index, proof.checkpoint.tree_size, proof.checkpoint.root
        ))
    }
}
