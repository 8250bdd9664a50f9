//! `acge-proxy policy test DIR` and `acge-proxy policy eval --dir DIR --input FILE`:
//! the `policy` filter's Rego, run as the proxy runs it (regorus), outside the proxy.

use std::path::PathBuf;
use std::process::ExitCode;

use acge_filters::policy::{self, PolicyConfig, PolicyFilter};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Run the `test_` rules of the policies in DIR (as `opa test` does): print each
    /// with PASS or FAIL, exit 1 when one fails.
    Test { dir: PathBuf },
    /// Print the decision (allow, reasons) for one input document.
    Eval {
        /// The policies' directory.
        #[arg(long, default_value = "config/policies")]
        dir: PathBuf,
        /// The input document, JSON (`-` for standard input): what the filter builds
        /// from a request (docs/filters.md).
        #[arg(long)]
        input: PathBuf,
        #[arg(long, default_value = "data.acge.allow")]
        query: String,
        #[arg(long, default_value = "data.acge.reasons")]
        reasons: String,
    },
}

pub fn run(command: PolicyCommand) -> ExitCode {
    match command {
        PolicyCommand::Test { dir } => match policy::run_tests(&dir) {
            Ok(results) => {
                let failed = results.iter().filter(|r| !r.passed).count();
                for r in &results {
                    let verdict = if r.passed { "PASS" } else { "FAIL" };
                    match &r.error {
                        Some(e) => println!("{verdict} {} ({e})", r.name),
                        None => println!("{verdict} {}", r.name),
                    }
                }
                println!("{} passed, {failed} failed", results.len() - failed);
                if results.is_empty() {
                    eprintln!("{}: no test_ rule", dir.display());
                    return ExitCode::FAILURE;
                }
                if failed == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
        PolicyCommand::Eval {
            dir,
            input,
            query,
            reasons,
        } => {
            let text = if input.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
            } else {
                std::fs::read_to_string(&input)
            };
            let document: serde_json::Value = match text
                .map_err(|e| e.to_string())
                .and_then(|t| serde_json::from_str(&t).map_err(|e| format!("not JSON: {e}")))
            {
                Ok(v) => v,
                Err(e) => {
                    eprintln!("{}: {e}", input.display());
                    return ExitCode::FAILURE;
                }
            };
            let filter = match PolicyFilter::load(&PolicyConfig {
                dir,
                query,
                reasons,
                on_error: Default::default(),
            }) {
                Ok(f) => f,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            match filter.decide(document) {
                Ok(d) => {
                    println!(
                        "{}",
                        serde_json::json!({"allow": d.allow, "reasons": d.reasons})
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("evaluation failed: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
