//! Reading the audit log back: full verification, inclusion proofs, and checking a
//! proof against a signed checkpoint. This is what `acge-proxy audit verify|prove|
//! check-proof` run; it never writes.

use std::path::Path;

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::merkle::{self, leaf_hash, Hash};
use super::note;
use super::segment::{
    entry, read_frames, segments, AuditRecord, Checkpoint, Entry, CHECKPOINTS_FILE, PUBLIC_KEY_FILE,
};

/// The key a verification trusts.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// Given by the operator, kept outside the log (`--key`, `--key-hex`).
    Pinned(String),
    /// The log directory's own `audit.pub`: whoever can rewrite the log can replace it.
    Directory(String),
}

/// What a verification is to trust beyond the log itself.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    /// The public key; None: the one in the log directory.
    pub key: Option<(VerifyingKey, String)>,
    /// Checkpoints saved outside the log (a collector, a witness), each (where it came
    /// from, its signed note): the log must extend every one.
    pub checkpoints: Vec<(String, String)>,
}

/// What a passing verification saw.
#[derive(Debug, Clone)]
pub struct Summary {
    pub records: u64,
    pub segments: usize,
    pub checkpoints: usize,
    /// Of those, from `checkpoints.log` (logs from before inline checkpoints).
    pub legacy_checkpoints: usize,
    /// Size and root of the last checkpoint.
    pub last: Option<(u64, String)>,
    /// Records written after the last checkpoint, not yet covered by a signature.
    pub unsigned_tail: u64,
    /// The most records the last checkpoint says the writer leaves unsigned; None for
    /// a legacy checkpoint, which said nothing.
    pub bound: Option<u64>,
    pub key: KeySource,
    /// Outside checkpoints the log was found consistent with.
    pub trusted: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "OK: {} records in {} segments, {} checkpoints",
            self.records, self.segments, self.checkpoints
        )?;
        if self.legacy_checkpoints > 0 {
            write!(
                f,
                " ({} of them from checkpoints.log)",
                self.legacy_checkpoints
            )?;
        }
        if let Some((size, root)) = &self.last {
            write!(f, "; last checkpoint: size {size}, root {root}")?;
        }
        if self.unsigned_tail > 0 {
            write!(
                f,
                "; {} records after it are not signed yet",
                self.unsigned_tail
            )?;
            match self.bound {
                Some(bound) => write!(f, " (bound {bound})")?,
                None => write!(f, " (a legacy checkpoint states no bound)")?,
            }
        }
        match &self.key {
            KeySource::Pinned(from) => write!(f, "; key: pinned ({from})")?,
            KeySource::Directory(path) => write!(
                f,
                "; key: {path}, trusted as found in the log directory (pin it with --key)"
            )?,
        }
        if self.trusted > 0 {
            write!(f, "; consistent with {} trusted checkpoints", self.trusted)?;
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
    #[error("{records} records and not one checkpoint: the checkpoints were removed, or the log was never signed")]
    NoCheckpoints { records: u64 },
    #[error("checkpoint {index} ({segment} offset {offset}): it signs {size} records but {before} come before it: it was moved, or records were taken out")]
    Misplaced {
        index: usize,
        segment: String,
        offset: u64,
        size: u64,
        before: u64,
    },
    #[error("checkpoint {index} ({segment} offset {offset}): {reason}")]
    Note {
        index: usize,
        segment: String,
        offset: u64,
        reason: super::note::NoteError,
    },
    #[error("the last checkpoint signs {size} records and {tail} follow it, more than its bound of {bound}: a checkpoint after it was removed")]
    TailTooLong { size: u64, tail: u64, bound: u64 },
    #[error("trusted checkpoint {from}: {reason}")]
    TrustedNote {
        from: String,
        reason: super::note::NoteError,
    },
    #[error("trusted checkpoint {from} saw {size} records, but the log holds {records}: it was cut back")]
    CutBack {
        from: String,
        size: u64,
        records: u64,
    },
    #[error("trusted checkpoint {from}: the log's first {size} records do not hash to its root: they were rewritten")]
    Diverged { from: String, size: u64 },
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
    #[error(transparent)]
    Note(#[from] super::note::NoteError),
    #[error("its note says size {size} and root {root}, not what the checkpoint says")]
    NoteDiffers { size: u64, root: String },
}

/// All records of a log directory, as read, with where each came from.
struct Loaded {
    payloads: Vec<Vec<u8>>,
    leaves: Vec<Hash>,
    segments: usize,
    /// The checkpoints in the stream, in order.
    inline: Vec<Inline>,
}

/// A checkpoint frame, and where it stands.
struct Inline {
    note: String,
    /// Records before it in the stream.
    before: u64,
    segment: String,
    offset: u64,
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
        inline: Vec::new(),
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
            if let Entry::Checkpoint(note) = entry(payload) {
                loaded.inline.push(Inline {
                    note: note.to_string(),
                    before: index,
                    segment: name.clone(),
                    offset,
                });
                continue;
            }
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
    if let Some(text) = &cp.note {
        let head = note::verify(text, key)?;
        if head.size != cp.tree_size || hex::encode(head.root) != cp.root {
            return Err(SignatureError::NoteDiffers {
                size: head.size,
                root: hex::encode(head.root),
            });
        }
        return Ok(());
    }
    let sig: [u8; 64] = hex::decode(&cp.signature)?
        .try_into()
        .map_err(|_| SignatureError::Length)?;
    key.verify(
        &Checkpoint::message(cp.tree_size, &cp.root, cp.time_ms),
        &Signature::from_bytes(&sig),
    )
    .map_err(|_| SignatureError::Mismatch)
}

/// Every checkpoint of the log, in order: those of `checkpoints.log` (logs from before
/// inline checkpoints), then those in the stream. Inline ones are checked to stand
/// right after the records they sign, and their signatures (which tell what they say)
/// are checked here.
fn all_checkpoints(
    dir: &Path,
    loaded: &Loaded,
    key: &VerifyingKey,
) -> Result<(Vec<Checkpoint>, usize, Option<u64>), VerifyError> {
    let mut all = read_checkpoints(dir)?;
    let legacy = all.len();
    let mut bound = None;
    for (i, inline) in loaded.inline.iter().enumerate() {
        let index = legacy + i;
        let head = note::verify(&inline.note, key).map_err(|reason| VerifyError::Note {
            index,
            segment: inline.segment.clone(),
            offset: inline.offset,
            reason,
        })?;
        if head.size != inline.before {
            return Err(VerifyError::Misplaced {
                index,
                segment: inline.segment.clone(),
                offset: inline.offset,
                size: head.size,
                before: inline.before,
            });
        }
        bound = Some(head.bound);
        all.push(Checkpoint {
            tree_size: head.size,
            root: hex::encode(head.root),
            time_ms: head.time_ms,
            signature: String::new(),
            note: Some(inline.note.clone()),
        });
    }
    Ok((all, legacy, bound))
}

/// Recomputes everything, and fails closed: every record's frame and sequence; the
/// checkpoints (there must be some where there are records; each inline one right
/// after the records it signs; each signature under the trusted key; each root the
/// recomputed tree's; each consistent with the one before, RFC 9162); the unsigned
/// tail within the last checkpoint's bound; and the log consistent with every
/// checkpoint saved outside it. Returns the first bad place found.
pub fn verify(dir: &Path, trust: &Trust) -> Result<Summary, VerifyError> {
    let (key, source) = match &trust.key {
        Some((key, from)) => (*key, KeySource::Pinned(from.clone())),
        None => (
            read_public_key(dir)?,
            KeySource::Directory(dir.join(PUBLIC_KEY_FILE).display().to_string()),
        ),
    };
    let loaded = load_records(dir)?;
    let (checkpoints, legacy, bound) = all_checkpoints(dir, &loaded, &key)?;
    let total = loaded.leaves.len() as u64;
    if total > 0 && checkpoints.is_empty() {
        return Err(VerifyError::NoCheckpoints { records: total });
    }
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
    let signed = last.map_or(0, |c| c.tree_size);
    let tail = total - signed;
    // The bound of the last checkpoint, when it is an inline one (it states it).
    let bound = bound.filter(|_| checkpoints.len() > legacy);
    if let Some(bound) = bound {
        if tail > bound {
            return Err(VerifyError::TailTooLong {
                size: signed,
                tail,
                bound,
            });
        }
    }
    for (from, text) in &trust.checkpoints {
        let head = note::verify(text, &key).map_err(|reason| VerifyError::TrustedNote {
            from: from.clone(),
            reason,
        })?;
        if head.size > total {
            return Err(VerifyError::CutBack {
                from: from.clone(),
                size: head.size,
                records: total,
            });
        }
        if merkle::root(&loaded.leaves[..head.size as usize]) != head.root {
            return Err(VerifyError::Diverged {
                from: from.clone(),
                size: head.size,
            });
        }
    }
    Ok(Summary {
        records: total,
        segments: loaded.segments,
        checkpoints: checkpoints.len(),
        legacy_checkpoints: legacy,
        last: last.map(|c| (c.tree_size, c.root.clone())),
        unsigned_tail: tail,
        bound,
        key: source,
        trusted: trust.checkpoints.len(),
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
    let key = read_public_key(dir)?;
    let (checkpoints, _, _) = all_checkpoints(dir, &loaded, &key)?;
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
