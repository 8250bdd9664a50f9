//! `acge-proxy model eval|bench`. `eval` runs a labelled set through the same path the
//! proxy uses (canonical rendering, encoder, batcher, engine, threshold) and reports how
//! the model did ([`eval`]); `bench` times rendering, encoding and the module apart, at
//! each batch size, and a cascade end to end ([`bench`]).
//!
//! The set is JSON lines as `../shared/eval/README.md` describes: `service`, `method`,
//! `path`, optional `headers`, `body`, `label` (`comply` | `violate`) and, for
//! violations, `principle`.

mod bench;
mod eval;

use std::path::PathBuf;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Run a labelled JSONL set through the proxy's inference path and report accuracy,
    /// false denies, recall per principle, the confusion matrix and items/s.
    ///
    /// Either `--model DIR` (with `--second` for a cascade), or `--config FILE --route
    /// NAME`: exactly what that route's acge filter decides, cascade included.
    Eval {
        #[arg(long, required_unless_present = "config", conflicts_with = "config")]
        model: Option<PathBuf>,
        /// A proxy config file: evaluate what its `--route` runs.
        #[arg(long, requires = "route", conflicts_with_all = ["threshold", "device", "precision", "second", "band", "constitution_hash"])]
        config: Option<PathBuf>,
        /// The route of `--config` whose acge filter is evaluated.
        #[arg(long, requires = "config")]
        route: Option<String>,
        #[arg(long)]
        data: PathBuf,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Override the model's threshold.
        #[arg(long)]
        threshold: Option<f64>,
        /// auto, cpu or cuda.
        #[arg(long)]
        device: Option<String>,
        /// fp32, fp16 or bf16; default bf16 on CUDA, fp32 on the CPU.
        #[arg(long)]
        precision: Option<String>,
        /// A second model: evaluate the cascade of the two.
        #[arg(long)]
        second: Option<PathBuf>,
        /// The cascade's band, `lo,hi`.
        #[arg(long, value_delimiter = ',')]
        band: Option<Vec<f64>>,
        /// The constitution hash the model must have been trained for.
        #[arg(long, default_value = acge_proxy::config::DEFAULT_CONSTITUTION_HASH)]
        constitution_hash: String,
    },
    /// Time rendering, encoding and the module (µs per item, items/s at each batch
    /// size), and a cascade end to end.
    Bench(bench::BenchArgs),
}

/// Runs a `model` subcommand.
pub fn run(command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::Bench(args) => bench::run(&args),
        ModelCommand::Eval {
            model,
            config,
            route,
            data,
            json,
            threshold,
            device,
            precision,
            second,
            band,
            constitution_hash,
        } => super::block_on(None, async move {
            let options = eval::EvalOptions {
                threshold,
                device,
                precision,
                second,
                band: match band.as_deref() {
                    None => None,
                    Some(&[lo, hi]) => Some([lo, hi]),
                    Some(other) => anyhow::bail!("--band takes two numbers, lo,hi, not {other:?}"),
                },
            };
            let r = match (&config, &route, &model) {
                (Some(config), Some(route), _) => {
                    eval::evaluate_route(config, route, &data).await?
                }
                (_, _, Some(model)) => {
                    eval::evaluate(model, &data, &constitution_hash, &options).await?
                }
                _ => anyhow::bail!("give --model DIR, or --config FILE and --route NAME"),
            };
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print!("{r}");
            }
            Ok(())
        }),
    }
}
