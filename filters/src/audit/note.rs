//! Signed tree heads as c2sp.org/tlog-checkpoint signed notes (c2sp.org/signed-note).
//!
//! ```text
//! acge-proxy.audit/3f2a9c…                 origin: the log's name (and the key's)
//! 1234                                     tree size
//! 9lJ0…=                                   root hash, base64
//! timestamp 1764590400123                  extension: when it was signed (ms)
//! bound 1000                               extension: the writer signs at least every
//!                                          `bound` records, so an unsigned tail longer
//!                                          than that means a checkpoint was removed
//!
//! — acge-proxy.audit/3f2a9c… <base64(key id ‖ Ed25519 signature)>
//! ```
//!
//! The signature covers the text up to and including its last newline, not the blank
//! line. The key id is the first four bytes of SHA-256(name ‖ 0x0A ‖ 0x01 ‖ public
//! key). The same note is what the writer appends inline to the log, what `GET
//! /audit/checkpoint` serves, and what `audit verify --trusted` reads back.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

use super::merkle::Hash;

/// The em dash and space that begin a signature line.
const SIGNATURE_PREFIX: &str = "\u{2014} ";

/// The signature type byte of Ed25519 in key ids.
const ED25519: u8 = 0x01;

/// A tree head as its note says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeHead {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
    pub time_ms: u64,
    /// The most records the writer leaves unsigned.
    pub bound: u64,
}

/// Why a note is not a signed tree head of this log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    #[error("not a signed note: {0}")]
    Malformed(&'static str),
    #[error("no signature by {0} with the trusted key")]
    NotSigned(String),
    #[error("the signature by {0} does not match the note")]
    BadSignature(String),
}

/// The key id of an Ed25519 key under `name`.
pub fn key_id(name: &str, key: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([b'\n', ED25519]);
    h.update(key.as_bytes());
    let digest = h.finalize();
    [digest[0], digest[1], digest[2], digest[3]]
}

/// The c2sp verifier key (`name+hex(key id)+base64(0x01 ‖ key)`), for witnesses and
/// collectors.
pub fn verifier_key(name: &str, key: &VerifyingKey) -> String {
    let mut typed = vec![ED25519];
    typed.extend_from_slice(key.as_bytes());
    format!(
        "{name}+{}+{}",
        hex::encode(key_id(name, key)),
        BASE64.encode(typed)
    )
}

/// The default origin of a log signed by `key`: stable for the key, unique to it.
pub fn default_origin(key: &VerifyingKey) -> String {
    format!(
        "acge-proxy.audit/{}",
        &hex::encode(Sha256::digest(key.as_bytes()))[..16]
    )
}

/// Signs `head` as a note.
pub fn sign(head: &TreeHead, key: &SigningKey) -> String {
    let text = format!(
        "{}\n{}\n{}\ntimestamp {}\nbound {}\n",
        head.origin,
        head.size,
        BASE64.encode(head.root),
        head.time_ms,
        head.bound
    );
    let signature = key.sign(text.as_bytes());
    let mut blob = key_id(&head.origin, &key.verifying_key()).to_vec();
    blob.extend_from_slice(&signature.to_bytes());
    format!(
        "{text}\n{SIGNATURE_PREFIX}{} {}\n",
        head.origin,
        BASE64.encode(blob)
    )
}

/// Parses a note and checks its signature by `key` (under the note's own origin):
/// the tree head it vouches for.
pub fn verify(note: &str, key: &VerifyingKey) -> Result<TreeHead, NoteError> {
    if note.chars().any(|c| c.is_ascii_control() && c != '\n') {
        return Err(NoteError::Malformed("an ASCII control character"));
    }
    let split = note
        .rfind("\n\n")
        .ok_or(NoteError::Malformed("no blank line before the signatures"))?;
    let (text, signatures) = (&note[..=split], &note[split + 2..]);
    let head = parse_text(text)?;
    let want = key_id(&head.origin, key);
    let mut found = false;
    for line in signatures.split_terminator('\n') {
        let rest = line
            .strip_prefix(SIGNATURE_PREFIX)
            .ok_or(NoteError::Malformed("a signature line without the em dash"))?;
        let (name, blob) = rest.split_once(' ').ok_or(NoteError::Malformed(
            "a signature line without its signature",
        ))?;
        let blob = BASE64
            .decode(blob)
            .map_err(|_| NoteError::Malformed("a signature that is not base64"))?;
        if name != head.origin || blob.len() != 68 || blob[..4] != want {
            continue;
        }
        let signature = Signature::from_bytes(blob[4..].try_into().expect("64 bytes"));
        key.verify(text.as_bytes(), &signature)
            .map_err(|_| NoteError::BadSignature(name.to_string()))?;
        found = true;
        break;
    }
    if !signatures.ends_with('\n') {
        return Err(NoteError::Malformed("the note does not end in a newline"));
    }
    if found {
        Ok(head)
    } else {
        Err(NoteError::NotSigned(head.origin))
    }
}

/// The tree head a note's text says, unverified (for reporting where one is).
pub fn read(note: &str) -> Result<TreeHead, NoteError> {
    let split = note
        .rfind("\n\n")
        .ok_or(NoteError::Malformed("no blank line before the signatures"))?;
    parse_text(&note[..=split])
}

fn parse_text(text: &str) -> Result<TreeHead, NoteError> {
    let mut lines = text.split_terminator('\n');
    let origin = lines
        .next()
        .filter(|o| !o.is_empty() && !o.contains([' ', '+']))
        .ok_or(NoteError::Malformed("no origin line"))?;
    let size = lines
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or(NoteError::Malformed("no tree size line"))?;
    let root: Hash = lines
        .next()
        .and_then(|r| BASE64.decode(r).ok())
        .and_then(|r| r.try_into().ok())
        .ok_or(NoteError::Malformed("no root hash line"))?;
    let mut time_ms = None;
    let mut bound = None;
    for extension in lines {
        if let Some(t) = extension.strip_prefix("timestamp ") {
            time_ms = t.parse().ok();
        } else if let Some(b) = extension.strip_prefix("bound ") {
            bound = b.parse().ok();
        }
    }
    Ok(TreeHead {
        origin: origin.to_string(),
        size,
        root,
        time_ms: time_ms.ok_or(NoteError::Malformed("no timestamp line"))?,
        bound: bound.ok_or(NoteError::Malformed("no bound line"))?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head() -> TreeHead {
        TreeHead {
            origin: "example.audit/log".into(),
            size: 42,
            root: [7u8; 32],
            time_ms: 1_764_590_400_123,
            bound: 1000,
        }
    }

    #[test]
    fn a_signed_note_verifies_and_says_its_head() {
        let key = SigningKey::from_bytes(&[3u8; 32]);
        let note = sign(&head(), &key);
        assert!(note.starts_with("example.audit/log\n42\n"), "{note}");
        assert!(note.contains("\n\n\u{2014} example.audit/log "), "{note}");
        assert_eq!(verify(&note, &key.verifying_key()), Ok(head()));
        assert_eq!(read(&note), Ok(head()));
    }

    #[test]
    fn another_key_a_changed_text_or_a_broken_note_is_refused() {
        let key = SigningKey::from_bytes(&[3u8; 32]);
        let other = SigningKey::from_bytes(&[4u8; 32]);
        let note = sign(&head(), &key);
        assert!(matches!(
            verify(&note, &other.verifying_key()),
            Err(NoteError::NotSigned(_))
        ));
        let changed = note.replacen("\n42\n", "\n43\n", 1);
        assert!(matches!(
            verify(&changed, &key.verifying_key()),
            Err(NoteError::BadSignature(_))
        ));
        let unsigned = note[..note.rfind("\u{2014}").unwrap()].to_string();
        assert!(verify(&unsigned, &key.verifying_key()).is_err());
        assert!(verify("no blank line", &key.verifying_key()).is_err());
    }
}
