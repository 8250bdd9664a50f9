//! The on-disk format of the audit log: segment files of framed records, the
//! checkpoint file, and the record itself.
//!
//! A segment (`segment-00000001.log`, …) is a sequence of frames:
//! `u32 length (LE) ‖ u32 CRC-32 of the payload (LE) ‖ payload`, the payload being one
//! record as JSON, or a signed checkpoint (a c2sp note, `note.rs`). The checksum tells
//! a torn final write from a complete frame; the Merkle tree (over the records) and the
//! signed checkpoints in the stream are what make tampering evident.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const FRAME_HEADER: usize = 8;
pub const CHECKPOINTS_FILE: &str = "checkpoints.log";
pub const PUBLIC_KEY_FILE: &str = "audit.pub";
pub const DEFAULT_KEY_FILE: &str = "audit.key";
/// The signing key's c2sp verifier key (`name+id+key`), for witnesses.
pub const VERIFIER_KEY_FILE: &str = "audit.vkey";

/// What a frame holds: a record (JSON, a leaf of the tree) or a checkpoint (a signed
/// note, which is not a leaf).
pub enum Entry<'a> {
    Record(&'a [u8]),
    Checkpoint(&'a str),
}

/// Tells a frame's payload apart: records are JSON objects; a checkpoint is a note,
/// whose first line is its origin.
pub fn entry(payload: &[u8]) -> Entry<'_> {
    match (payload.first(), std::str::from_utf8(payload)) {
        (Some(b'{'), _) | (_, Err(_)) => Entry::Record(payload),
        (_, Ok(text)) => Entry::Checkpoint(text),
    }
}

/// One exchange, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    /// Position in the log, from 0: a gap or a step back shows a deleted or moved record.
    pub seq: u64,
    pub request_id: String,
    /// When the request arrived, in milliseconds since the Unix epoch.
    pub time_ms: u64,
    pub route: String,
    /// `blue` or `green`; None when no upstream was chosen.
    pub version: Option<String>,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub hash_request: Option<String>,
    pub hash_response: Option<String>,
    /// The ACGE compliance score and the principles over threshold, when scored.
    pub compliance: Option<f64>,
    #[serde(default)]
    pub principles: Vec<String>,
    /// Which model of a cascade decided (`fast`, `second`, `second_skipped`); absent
    /// without a cascade.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acge_stage: Option<String>,
    /// `allowed`, `denied`, `error` or `aborted`.
    pub decision: String,
    pub latency_ms: f64,
    /// For a record that is not an exchange (a migration step, a rollback): what
    /// happened and the figures behind it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<serde_json::Value>,
    /// The forwarded claims of the request's token (the jwt filter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<serde_json::Value>,
}

/// A signed statement of the tree's size and root at a moment: a signed note (inline
/// checkpoints), or the v1 form of `checkpoints.log` (logs from before).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    pub tree_size: u64,
    /// Hex SHA-256.
    pub root: String,
    pub time_ms: u64,
    /// v1: hex ed25519 signature over [`Checkpoint::message`]; empty for a note.
    pub signature: String,
    /// The signed note, for an inline checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Checkpoint {
    /// The bytes that are signed.
    pub fn message(tree_size: u64, root_hex: &str, time_ms: u64) -> Vec<u8> {
        format!("acge-audit-checkpoint v1\n{tree_size}\n{root_hex}\n{time_ms}\n").into_bytes()
    }
}

pub fn segment_name(number: u64) -> String {
    format!("segment-{number:08}.log")
}

/// The segment files of `dir`, in order.
pub fn segments(dir: &Path) -> std::io::Result<Vec<(u64, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = name
            .strip_prefix("segment-")
            .and_then(|s| s.strip_suffix(".log"))
            .and_then(|s| s.parse::<u64>().ok())
        {
            found.push((n, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

pub fn frame(payload: &[u8], out: &mut Vec<u8>) {
    let len = u32::try_from(payload.len()).expect("a record is far below 4 GiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// What reading a segment's frames found.
pub struct Frames<'a> {
    /// (offset of the frame, payload)
    pub records: Vec<(u64, &'a [u8])>,
    pub bad: Option<BadFrame>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadFrame {
    pub offset: u64,
    pub reason: String,
    /// Nothing follows it: a write torn by a crash, not a change in the middle.
    pub at_end: bool,
}

/// Splits a segment into frames, stopping at the first one that does not check out.
pub fn read_frames(bytes: &[u8]) -> Frames<'_> {
    let mut records = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let rest = &bytes[at..];
        let bad = |reason: String, at_end: bool| BadFrame {
            offset: at as u64,
            reason,
            at_end,
        };
        if rest.len() < FRAME_HEADER {
            return Frames {
                records,
                bad: Some(bad(
                    format!("{} bytes, shorter than a frame header", rest.len()),
                    true,
                )),
            };
        }
        let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().expect("4 bytes"));
        if rest.len() - FRAME_HEADER < len {
            return Frames {
                records,
                bad: Some(bad(
                    format!(
                        "the frame says {len} bytes but {} remain",
                        rest.len() - FRAME_HEADER
                    ),
                    true,
                )),
            };
        }
        let payload = &rest[FRAME_HEADER..FRAME_HEADER + len];
        if crc32fast::hash(payload) != crc {
            let at_end = rest.len() == FRAME_HEADER + len;
            return Frames {
                records,
                bad: Some(bad("checksum mismatch".into(), at_end)),
            };
        }
        records.push((at as u64, payload));
        at += FRAME_HEADER + len;
    }
    Frames { records, bad: None }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_torn_tails_are_told_from_changes() {
        let mut buf = Vec::new();
        frame(b"one", &mut buf);
        frame(b"two", &mut buf);
        let f = read_frames(&buf);
        assert_eq!(
            f.records.iter().map(|r| r.1).collect::<Vec<_>>(),
            vec![&b"one"[..], b"two"]
        );
        assert!(f.bad.is_none());

        let torn = &buf[..buf.len() - 1];
        let f = read_frames(torn);
        assert_eq!(f.records.len(), 1);
        assert!(f.bad.unwrap().at_end);

        let mut changed = buf.clone();
        changed[FRAME_HEADER] ^= 1;
        let f = read_frames(&changed);
        assert_eq!(f.records.len(), 0);
        let bad = f.bad.unwrap();
        assert_eq!((bad.offset, bad.at_end), (0, false));
    }
}
