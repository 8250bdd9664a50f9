//! `acge-proxy model eval|bench`. `eval` runs a labelled set through the same path the
//! proxy uses (canonical rendering, batcher, engine, threshold) and reports how the
//! model did; `bench` times the engine alone at each batch size.
//!
//! The set is JSON lines as `../shared/eval/README.md` describes: `service`, `method`,
//! `path`, optional `headers`, `body`, `label` (`comply` | `violate`) and, for
//! violations, `principle`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use acge_filters::acge::filter::{AcgeConfig, AcgeFilter};
use anyhow::Context;
use clap::Subcommand;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde::{Deserialize, Serialize};

#[derive(Subcommand)]
pub enum ModelCommand {
    /// Run a labelled JSONL set through the proxy's inference path and report accuracy,
    /// false denies, recall per principle, the confusion matrix and items/s.
    Eval {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        data: PathBuf,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
        /// Override the model's threshold.
        #[arg(long)]
        threshold: Option<f64>,
        /// The constitution hash the model must have been trained for.
        #[arg(long, default_value = acge_proxy::config::DEFAULT_CONSTITUTION_HASH)]
        constitution_hash: String,
    },
    /// Time the model alone at each batch size (µs per item, items/s).
    Bench(BenchArgs),
}

#[derive(clap::Args)]
pub struct BenchArgs {
    #[arg(long)]
    model: PathBuf,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// libtorch intra-op threads.
    #[arg(long)]
    threads: Option<usize>,
    /// Batch sizes, comma-separated.
    #[arg(
        long,
        default_value = "1,2,4,8,16,32,64,128,256",
        value_delimiter = ','
    )]
    batches: Vec<usize>,
    /// Input length in bytes (cut to the model's max_len).
    #[arg(long, default_value_t = 320)]
    len: usize,
    /// Least time per batch size, in milliseconds.
    #[arg(long, default_value_t = 500)]
    min_ms: u64,
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = acge_proxy::config::DEFAULT_CONSTITUTION_HASH)]
    constitution_hash: String,
}

/// Runs a `model` subcommand.
pub fn run(command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::Bench(args) => model_bench(&args),
        ModelCommand::Eval {
            model,
            data,
            json,
            threshold,
            constitution_hash,
        } => super::block_on(None, async move {
            let r = evaluate(&model, &data, &constitution_hash, threshold).await?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                print!("{r}");
            }
            Ok(())
        }),
    }
}

fn model_bench(args: &BenchArgs) -> anyhow::Result<()> {
    #[cfg(feature = "torch")]
    {
        let device: acge_filters::acge::DeviceChoice =
            serde_json::from_value(serde_json::Value::String(args.device.clone())).map_err(
                |_| anyhow::anyhow!("--device must be auto, cpu or cuda, not `{}`", args.device),
            )?;
        let (name, rows) = sweep(
            &args.model,
            &args.constitution_hash,
            device,
            args.threads,
            &args.batches,
            args.len,
            std::time::Duration::from_millis(args.min_ms),
        )?;
        if args.json {
            println!(
                "{}",
                serde_json::json!({ "device": name, "len": args.len, "rows": rows })
            );
        } else {
            println!("device {name}, inputs of {} bytes", args.len);
            println!("| batch | µs per item | items/s |");
            println!("| ---: | ---: | ---: |");
            for r in rows {
                println!(
                    "| {} | {:.1} | {:.0} |",
                    r.batch, r.micros_per_item, r.items_per_second
                );
            }
        }
        Ok(())
    }
    #[cfg(not(feature = "torch"))]
    {
        let _ = args;
        anyhow::bail!("this build has no libtorch: rebuild with the `torch` feature (the default)")
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    #[allow(dead_code)]
    service: String,
    method: String,
    path: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    body: serde_json::Value,
    label: Label,
    #[serde(default)]
    principle: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Label {
    Comply,
    Violate,
}

/// Rows: the truth; columns: the prediction.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Confusion {
    pub comply: Row,
    pub violate: Row,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    pub comply: u64,
    pub violate: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub items: u64,
    pub accuracy: f64,
    /// Compliant cases the model would deny, as a share of all compliant cases.
    pub false_deny_rate: f64,
    /// Per principle: the share of its violations the model flagged naming it.
    pub per_principle_recall: BTreeMap<String, f64>,
    pub confusion: Confusion,
    pub items_per_second: f64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "items            {}", self.items)?;
        writeln!(f, "accuracy         {:.2} %", self.accuracy * 100.0)?;
        writeln!(
            f,
            "false denies     {:.2} % of compliant cases",
            self.false_deny_rate * 100.0
        )?;
        writeln!(f, "items/s          {:.0}", self.items_per_second)?;
        writeln!(f, "confusion        predicted comply  predicted violate")?;
        writeln!(
            f,
            "  comply         {:>16}  {:>17}",
            self.confusion.comply.comply, self.confusion.comply.violate
        )?;
        writeln!(
            f,
            "  violate        {:>16}  {:>17}",
            self.confusion.violate.comply, self.confusion.violate.violate
        )?;
        writeln!(f, "recall by principle")?;
        for (p, r) in &self.per_principle_recall {
            writeln!(f, "  {p:<15} {:.2} %", r * 100.0)?;
        }
        Ok(())
    }
}

/// Evaluates `data` with the model in `model`.
async fn evaluate(
    model: &Path,
    data: &Path,
    constitution_hash: &str,
    threshold: Option<f64>,
) -> anyhow::Result<Report> {
    let text = std::fs::read_to_string(data).with_context(|| data.display().to_string())?;
    let mut cases = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let case: Case = serde_json::from_str(line)
            .with_context(|| format!("{} line {}", data.display(), n + 1))?;
        if case.label == Label::Violate && case.principle.is_none() {
            anyhow::bail!(
                "{} line {}: a `violate` case needs its `principle`",
                data.display(),
                n + 1
            );
        }
        cases.push(case);
    }
    let config: AcgeConfig = serde_json::from_value(serde_json::json!({
        "model": model,
        "threshold": threshold,
        "max_batch": 64,
        "max_delay_us": 1000,
        "queue": cases.len().max(1),
        "timeout_ms": 60_000,
        "cache_entries": 1,
    }))?;
    let filter = Arc::new(AcgeFilter::load(&config, constitution_hash)?);

    let started = Instant::now();
    let mut tasks = Vec::with_capacity(cases.len());
    for case in &cases {
        let method = Method::from_bytes(case.method.as_bytes())
            .with_context(|| format!("method {}", case.method))?;
        let mut headers = HeaderMap::new();
        for (k, v) in &case.headers {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                headers.insert(k, v);
            }
        }
        let body = serde_json::to_vec(&case.body).expect("a parsed value serializes");
        let (filter, path) = (filter.clone(), case.path.clone());
        tasks.push(tokio::spawn(async move {
            filter
                .score_request(&method, &path, &headers, Some(&body))
                .await
        }));
    }
    let mut results = Vec::with_capacity(tasks.len());
    for t in tasks {
        results.push(t.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();

    let mut confusion = Confusion::default();
    let mut recall: BTreeMap<String, (u64, u64)> = filter
        .principles()
        .iter()
        .map(|p| (p.clone(), (0, 0)))
        .collect();
    for (case, c) in cases.iter().zip(&results) {
        let predicted_violation = !c.principles.is_empty();
        let row = match case.label {
            Label::Comply => &mut confusion.comply,
            Label::Violate => &mut confusion.violate,
        };
        if predicted_violation {
            row.violate += 1;
        } else {
            row.comply += 1;
        }
        if let Some(p) = &case.principle {
            let entry = recall.entry(p.clone()).or_default();
            entry.1 += 1;
            if c.principles.contains(p) {
                entry.0 += 1;
            }
        }
    }
    let items = cases.len() as u64;
    let correct = confusion.comply.comply + confusion.violate.violate;
    let compliant = confusion.comply.comply + confusion.comply.violate;
    Ok(Report {
        items,
        accuracy: ratio(correct, items),
        false_deny_rate: ratio(confusion.comply.violate, compliant),
        per_principle_recall: recall
            .into_iter()
            .filter(|(_, (_, total))| *total > 0)
            .map(|(p, (hit, total))| (p, ratio(hit, total)))
            .collect(),
        confusion,
        items_per_second: if elapsed > 0.0 {
            items as f64 / elapsed
        } else {
            0.0
        },
    })
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// One row of a batch-size sweep.
#[derive(Debug, Clone, Serialize)]
pub struct SweepRow {
    pub batch: usize,
    pub micros_per_item: f64,
    pub items_per_second: f64,
}

/// Times the engine alone at each batch size: inputs of `len` bytes, a warm-up, then
/// batches until at least `min_time` has passed. For `acge-proxy model bench`.
/// What `sweep` feeds the model: a canonical rendering of a typical request.
#[cfg(feature = "torch")]
const SWEEP_TEXT: &str = "POST /api/v1/integrity/acge/audit\ncontent-type: application/json\n\n\
{\"entry\":{\"action\":\"firewall_rule_changed\",\"actor\":\"netadmin.li\",\"rule\":4471,\
\"ticket\":\"CHG-1204\"},\"operation\":\"append\",\"reason\":\"quarterly review of the \
edge firewall found two stale rules; removed after approval by the network lead\",\
\"requested_at\":\"2026-11-30T08:15:00Z\",\"tenant\":\"northwind\"}";

#[cfg(feature = "torch")]
fn sweep(
    model: &Path,
    constitution_hash: &str,
    device: acge_filters::acge::DeviceChoice,
    threads: Option<usize>,
    batches: &[usize],
    len: usize,
    min_time: std::time::Duration,
) -> anyhow::Result<(String, Vec<SweepRow>)> {
    use acge_filters::acge::batcher::Backend;
    use acge_filters::acge::engine::TorchEngine;

    let (mut engine, meta) = TorchEngine::load(model, constitution_hash, device, threads)?;
    let device_name = format!("{:?}", engine.device());
    let len = len.clamp(1, meta.max_len);
    // A request as the proxy renders one (words, JSON punctuation, numbers), repeated
    // to the length and started at another place in each row, so that no two rows are
    // alike; shifted by one as the model expects.
    let text = SWEEP_TEXT.as_bytes();
    let input = |row: usize| -> Vec<i64> {
        (0..len)
            .map(|i| i64::from(text[(i + row * 13) % text.len()]) + 1)
            .collect()
    };
    let mut rows = Vec::new();
    for &b in batches {
        let inputs: Vec<Vec<i64>> = (0..b.max(1)).map(input).collect();
        let refs: Vec<&[i64]> = inputs.iter().map(Vec::as_slice).collect();
        for _ in 0..3 {
            engine.infer(&refs)?;
        }
        let started = Instant::now();
        let mut runs = 0usize;
        while runs < 3 || started.elapsed() < min_time {
            engine.infer(&refs)?;
            runs += 1;
        }
        let per_item = started.elapsed().as_secs_f64() / (runs * refs.len()) as f64;
        rows.push(SweepRow {
            batch: refs.len(),
            micros_per_item: per_item * 1e6,
            items_per_second: 1.0 / per_item,
        });
    }
    Ok((device_name, rows))
}
