//! `acge-proxy audit verify|prove|check-proof`.

use std::process::ExitCode;

use std::path::PathBuf;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Recompute every record, checkpoint signature and consistency; name the first
    /// bad place and exit 1, or print OK.
    Verify { dir: PathBuf },
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
    use acge_filters::audit::verify;
    let outcome: anyhow::Result<String> = match command {
        AuditCommand::Verify { dir } => verify::verify(&dir)
            .map(|summary| summary.to_string())
            .map_err(|problem| anyhow::anyhow!("FAILED: {problem}")),
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

fn check_proof(
    proof: &std::path::Path,
    dir: Option<&std::path::Path>,
    key: Option<&str>,
) -> anyhow::Result<String> {
    use acge_filters::audit::verify;
    use anyhow::Context;
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
