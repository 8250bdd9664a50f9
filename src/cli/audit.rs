//! `acge-proxy audit verify|prove|check-proof`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use acge_filters::audit::verify::{self, Trust};
use anyhow::Context;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Recompute every record, checkpoint signature and consistency, fail closed; name
    /// the first bad place and exit 1, or print OK.
    Verify {
        dir: PathBuf,
        /// The public key to trust (hex, as `audit.pub` holds it), kept outside the log
        /// directory. Without it, the key in the directory is trusted, and verify says
        /// so.
        #[arg(long, conflicts_with = "key_hex")]
        key: Option<PathBuf>,
        /// The public key to trust, hex.
        #[arg(long)]
        key_hex: Option<String>,
        /// Checkpoints saved outside the log (`GET /audit/checkpoint`): the log must
        /// extend each one.
        #[arg(long, num_args = 1..)]
        trusted: Vec<PathBuf>,
    },
    /// Print an inclusion proof (JSON) of record INDEX against the first checkpoint
    /// that covers it.
    Prove {
        dir: PathBuf,
        #[arg(long)]
        index: u64,
    },
    /// Check an inclusion proof: its checkpoint's signature and the record's path to
    /// the signed root. The public key comes from the log's directory or is given.
    CheckProof {
        /// The proof, as `audit prove` printed it ("-" for standard input).
        #[arg(long)]
        proof: PathBuf,
        /// The log directory whose audit.pub to trust.
        #[arg(
            long,
            conflicts_with = "public_key",
            required_unless_present = "public_key"
        )]
        dir: Option<PathBuf>,
        /// The ed25519 public key, hex.
        #[arg(long)]
        public_key: Option<String>,
    },
}

pub fn audit(command: AuditCommand) -> ExitCode {
    let outcome: anyhow::Result<String> = match command {
        AuditCommand::Verify {
            dir,
            key,
            key_hex,
            trusted,
        } => trust(key.as_deref(), key_hex.as_deref(), &trusted).and_then(|trust| {
            verify::verify(&dir, &trust)
                .map(|summary| summary.to_string())
                .map_err(|problem| anyhow::anyhow!("FAILED: {problem}"))
        }),
        AuditCommand::Prove { dir, index } => verify::prove(&dir, index)
            .map(|proof| serde_json::to_string_pretty(&proof).expect("proofs serialize"))
            .map_err(Into::into),
        AuditCommand::CheckProof {
            proof,
            dir,
            public_key,
        } => check_proof(&proof, dir.as_deref(), public_key.as_deref()),
    };
    match outcome {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// What `verify` trusts besides the log: a pinned key, outside checkpoints.
fn trust(key: Option<&Path>, key_hex: Option<&str>, trusted: &[PathBuf]) -> anyhow::Result<Trust> {
    let key = match (key, key_hex) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
            let key = verify::parse_public_key(text.trim())
                .with_context(|| format!("{} is not an ed25519 public key", path.display()))?;
            Some((key, path.display().to_string()))
        }
        (None, Some(hex)) => Some((
            verify::parse_public_key(hex).context("--key-hex is not an ed25519 public key")?,
            "--key-hex".to_string(),
        )),
        (None, None) => None,
    };
    let checkpoints = trusted
        .iter()
        .map(|path| {
            std::fs::read_to_string(path)
                .with_context(|| path.display().to_string())
                .map(|note| (path.display().to_string(), note))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Trust { key, checkpoints })
}

fn check_proof(
    proof: &std::path::Path,
    dir: Option<&std::path::Path>,
    key: Option<&str>,
) -> anyhow::Result<String> {
    let text = if proof.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin()).context("standard input")?
    } else {
        std::fs::read_to_string(proof).with_context(|| proof.display().to_string())?
    };
    let proof: verify::InclusionProof =
        serde_json::from_str(&text).context("not an inclusion proof")?;
    let key = match (dir, key) {
        (Some(dir), _) => verify::read_public_key(dir)?,
        (None, Some(hex)) => verify::parse_public_key(hex)?,
        (None, None) => anyhow::bail!("give --dir or --public-key"),
    };
    verify::check_proof(&proof, &key).map_err(|e| anyhow::anyhow!("FAILED: {e}"))?;
    Ok(format!(
        "OK: record {} is in the log of {} records signed at {} ms (root {})",
        proof.index, proof.checkpoint.tree_size, proof.checkpoint.time_ms, proof.checkpoint.root
    ))
}
