//! `acge-proxy model bench`: what scoring costs, in parts. For each model (the fast
//! one, and the second of a cascade): the canonical rendering and the encoding
//! (hashing or tokenising) per item, on the calling thread, apart from the module's
//! time per item at each batch size; then, for a cascade, items/s end to end through
//! the acge filter's own path and the share each stage decided.
//!
//! Inputs are distinct requests of about `--len` bytes (or the bodies of a `--data`
//! set), so no two rows of a batch are alike.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use acge_filters::acge::config::DEFAULT_HEADERS;
use acge_filters::acge::render;
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde::Serialize;

#[derive(clap::Args)]
pub struct BenchArgs {
    #[arg(long)]
    model: PathBuf,
    /// A second model: bench it too, and the cascade of the two.
    #[arg(long)]
    second: Option<PathBuf>,
    /// The cascade's band, `lo,hi`.
    #[arg(long, value_delimiter = ',', default_value = "0.2,0.8")]
    band: Vec<f64>,
    /// auto, cpu or cuda.
    #[arg(long, default_value = "auto")]
    device: String,
    /// fp32, fp16 or bf16; default bf16 on CUDA, fp32 on the CPU.
    #[arg(long)]
    precision: Option<String>,
    /// libtorch intra-op threads of each model.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Batch sizes, comma-separated; default 1…256 on the CPU, 1…1024 on CUDA.
    #[arg(long, value_delimiter = ',')]
    batches: Option<Vec<usize>>,
    /// Bytes per synthetic request (its rendering), before the model's cut.
    #[arg(long, default_value_t = 1024)]
    len: usize,
    /// Take the requests from this eval-format set instead.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Least time per measurement, in milliseconds.
    #[arg(long, default_value_t = 500)]
    min_ms: u64,
    #[arg(long)]
    json: bool,
    #[arg(long, default_value = acge_proxy::config::DEFAULT_CONSTITUTION_HASH)]
    constitution_hash: String,
}

/// One row of a batch-size sweep.
#[derive(Debug, Clone, Serialize)]
pub struct SweepRow {
    pub batch: usize,
    pub micros_per_item: f64,
    pub items_per_second: f64,
}

#[derive(Debug, Serialize)]
struct ModelReport {
    stage: &'static str,
    model: String,
    input: &'static str,
    device: String,
    precision: &'static str,
    threads: usize,
    /// Rendering, µs per item (the same for every model).
    render_us: f64,
    /// Cut and bytes / hashing / tokenising, µs per item.
    encode_us: f64,
    /// Mean input row length (bytes, feature ids or tokens).
    row_len: f64,
    rows: Vec<SweepRow>,
}

#[derive(Debug, Serialize)]
struct CascadeReport {
    band: [f64; 2],
    items: usize,
    items_per_second: f64,
    /// Share of items each stage decided.
    fast: f64,
    second: f64,
    second_skipped: f64,
}

/// One request as the proxy holds it.
#[derive(Clone)]
struct Request {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Vec<u8>,
}

pub fn run(args: &BenchArgs) -> anyhow::Result<()> {
    #[cfg(feature = "torch")]
    {
        let reports = bench(args)?;
        print(args, &reports.0, reports.1.as_ref());
        Ok(())
    }
    #[cfg(not(feature = "torch"))]
    {
        let _ = args;
        anyhow::bail!("this build has no libtorch: rebuild with the `torch` feature (the default)")
    }
}

fn print(args: &BenchArgs, models: &[ModelReport], cascade: Option<&CascadeReport>) {
    if args.json {
        println!(
            "{}",
            serde_json::json!({"len": args.len, "models": models, "cascade": cascade})
        );
        return;
    }
    for m in models {
        println!(
            "{} model `{}` ({} input) on {}, {}, {} thread(s); mean row {:.0}",
            m.stage, m.model, m.input, m.device, m.precision, m.threads, m.row_len
        );
        println!(
            "rendering {:.1} µs/item, encoding {:.1} µs/item (on the caller's thread)",
            m.render_us, m.encode_us
        );
        println!(
            "| batch | module µs/item | module items/s | with rendering and encoding, µs/item |"
        );
        println!("| ---: | ---: | ---: | ---: |");
        for r in &m.rows {
            println!(
                "| {} | {:.1} | {:.0} | {:.1} |",
                r.batch,
                r.micros_per_item,
                r.items_per_second,
                r.micros_per_item + m.render_us + m.encode_us
            );
        }
        println!();
    }
    if let Some(c) = cascade {
        println!(
            "cascade, band [{}, {}], end to end through the filter: {:.0} items/s over {} items; decided by fast {:.1} %, second {:.1} %, fast because the second was unavailable {:.1} %",
            c.band[0],
            c.band[1],
            c.items_per_second,
            c.items,
            c.fast * 100.0,
            c.second * 100.0,
            c.second_skipped * 100.0
        );
    }
}

const WORDS: &[&str] = &[
    "ledger",
    "reconciled",
    "statement",
    "nightly",
    "batch",
    "entries",
    "approval",
    "ticket",
    "review",
    "firewall",
    "rule",
    "stale",
    "removed",
    "network",
    "lead",
    "quarterly",
    "audit",
    "record",
    "policy",
    "tenant",
    "region",
    "export",
    "report",
    "customer",
    "invoice",
    "rotate",
    "credential",
    "schedule",
    "deploy",
    "rollback",
    "threshold",
    "sensor",
    "limit",
    "consent",
    "retention",
    "summary",
    "appeal",
    "reason",
    "model",
    "score",
];

/// Distinct requests of about `len` bytes of rendering.
fn synthetic(count: usize, len: usize) -> Vec<Request> {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    (0..count)
        .map(|i| {
            let mut note = String::new();
            while note.len() + 200 < len {
                note.push_str(WORDS[(next() % WORDS.len() as u64) as usize]);
                note.push(' ');
            }
            let body = serde_json::json!({
                "operation": "append",
                "entry": {"actor": format!("svc-{i}"), "action": WORDS[i % WORDS.len()], "batch": i},
                "ticket": format!("OPS-{}", next() % 10_000),
                "note": note.trim_end(),
            });
            let mut headers = HeaderMap::new();
            headers.insert("content-type", HeaderValue::from_static("application/json"));
            headers.insert(
                "x-constitutional-hash",
                HeaderValue::from_static("cdd01ef066bc6cf2"),
            );
            headers.insert("x-user-role", HeaderValue::from_static("operator"));
            Request {
                method: Method::POST,
                path: "/api/v1/integrity/acge/audit".into(),
                headers,
                body: serde_json::to_vec(&body).expect("a JSON value serialises"),
            }
        })
        .collect()
}

fn from_data(path: &Path) -> anyhow::Result<Vec<Request>> {
    let text = std::fs::read_to_string(path)?;
    let mut out = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let case: super::eval::Case = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{} line {}: {e}", path.display(), n + 1))?;
        let headers = case.header_map();
        out.push(Request {
            method: Method::from_bytes(case.method.as_bytes())?,
            path: case.path.clone(),
            headers,
            body: serde_json::to_vec(&case.body)?,
        });
    }
    anyhow::ensure!(!out.is_empty(), "{}: no cases", path.display());
    Ok(out)
}

/// Runs `f` over and over for at least `min`, and returns its mean time.
/// The median time of one call of `f`, over as many calls as fill `min` (at least five,
/// after three to warm up): a median, so that a call the scheduler or another process
/// stalled does not move the figure.
fn time(min: Duration, mut f: impl FnMut()) -> Duration {
    for _ in 0..3 {
        f();
    }
    let started = Instant::now();
    let mut runs = Vec::new();
    while runs.len() < 5 || started.elapsed() < min {
        let t = Instant::now();
        f();
        runs.push(t.elapsed());
    }
    runs.sort_unstable();
    runs[runs.len() / 2]
}

#[cfg(feature = "torch")]
fn bench(args: &BenchArgs) -> anyhow::Result<(Vec<ModelReport>, Option<CascadeReport>)> {
    use acge_filters::acge::batcher::Backend;
    use acge_filters::acge::engine::{EngineOptions, TorchEngine};
    use acge_filters::acge::{DeviceChoice, Precision};

    let device: DeviceChoice =
        serde_json::from_value(serde_json::Value::String(args.device.clone())).map_err(|_| {
            anyhow::anyhow!("--device must be auto, cpu or cuda, not `{}`", args.device)
        })?;
    let precision: Option<Precision> = args
        .precision
        .as_ref()
        .map(|p| serde_json::from_value(serde_json::Value::String(p.clone())))
        .transpose()
        .map_err(|_| anyhow::anyhow!("--precision must be fp32, fp16 or bf16"))?;
    let requests = match &args.data {
        Some(path) => from_data(path)?,
        None => synthetic(256, args.len),
    };
    let selected: Vec<HeaderName> = DEFAULT_HEADERS
        .iter()
        .map(|h| HeaderName::from_static(h))
        .collect();
    let render_all = || -> Vec<Vec<u8>> {
        requests
            .iter()
            .map(|r| {
                render::render_request(&r.method, &r.path, &r.headers, &selected, Some(&r.body))
            })
            .collect()
    };
    let min = Duration::from_millis(args.min_ms);
    let render_us = time(min, || {
        std::hint::black_box(render_all());
    })
    .as_secs_f64()
        * 1e6
        / requests.len() as f64;
    let renderings = render_all();

    let mut reports = Vec::new();
    let dirs: Vec<(&'static str, &Path)> = std::iter::once(("fast", args.model.as_path()))
        .chain(args.second.as_deref().map(|d| ("second", d)))
        .collect();
    for (stage, dir) in &dirs {
        let options = EngineOptions {
            device,
            precision,
            threads: Some(args.threads),
        };
        let mut loaded = TorchEngine::load(dir, &args.constitution_hash, options)?;
        let encoder = &loaded.encoder;
        let encode_all = || -> anyhow::Result<Vec<Vec<i64>>> {
            renderings
                .iter()
                .map(|r| encoder.encode(r).map_err(anyhow::Error::msg))
                .collect()
        };
        // One row at a time, dropped before the next, as a worker encodes one request:
        // holding every row would time the allocator's page faults instead.
        let encode_us = time(min, || {
            for r in &renderings {
                std::hint::black_box(encoder.encode(r).ok());
            }
        })
        .as_secs_f64()
            * 1e6
            / renderings.len() as f64;
        let inputs = encode_all()?;
        let cuda = loaded.engine.on_cuda();
        let batches = args.batches.clone().unwrap_or_else(|| {
            let top = if cuda { 1024 } else { 256 };
            std::iter::successors(Some(1usize), |b| Some(b * 2))
                .take_while(|b| *b <= top)
                .collect()
        });
        let mut rows = Vec::new();
        for &b in &batches {
            let b = b.max(1);
            let mut start = 0usize;
            let mut failed = None;
            let per_batch = time(min, || {
                let batch: Vec<&[i64]> = (0..b)
                    .map(|k| inputs[(start + k) % inputs.len()].as_slice())
                    .collect();
                start = (start + b) % inputs.len();
                if let Err(e) = loaded.engine.infer(&batch) {
                    failed = Some(e);
                }
            });
            if let Some(e) = failed {
                anyhow::bail!("{}: batch of {b}: {e}", dir.display());
            }
            let per_item = per_batch.as_secs_f64() / b as f64;
            rows.push(SweepRow {
                batch: b,
                micros_per_item: per_item * 1e6,
                items_per_second: 1.0 / per_item,
            });
        }
        reports.push(ModelReport {
            stage,
            model: loaded.meta.name.clone(),
            input: loaded.meta.input.kind(),
            device: format!("{:?}", loaded.engine.device()),
            precision: loaded.engine.precision().as_str(),
            threads: args.threads,
            render_us,
            encode_us,
            row_len: inputs.iter().map(Vec::len).sum::<usize>() as f64 / inputs.len() as f64,
            rows,
        });
    }
    let cascade = match &args.second {
        None => None,
        Some(second) => Some(cascade(args, second, &requests)?),
    };
    Ok((reports, cascade))
}

/// The cascade end to end through the acge filter (no cache), every request in flight
/// at once, round after round for at least `--min-ms`.
#[cfg(feature = "torch")]
fn cascade(args: &BenchArgs, second: &Path, requests: &[Request]) -> anyhow::Result<CascadeReport> {
    use acge_filters::acge::filter::{AcgeConfig, AcgeFilter};
    use std::sync::Arc;

    anyhow::ensure!(args.band.len() == 2, "--band takes two numbers, lo,hi");
    let band = [args.band[0], args.band[1]];
    let config: AcgeConfig = serde_json::from_value(serde_json::json!({
        "model": args.model,
        "device": args.device,
        "precision": args.precision,
        "threads": args.threads,
        "max_batch": 64,
        "max_delay_us": 1000,
        "queue": requests.len().max(1),
        "timeout_ms": 60_000,
        "cache_entries": 1,
        "cache_ttl_ms": 0,
        "second": {"model": second, "band": band, "max_queue": requests.len().max(1),
                   "max_batch": 64, "timeout_ms": 60_000, "device": args.device,
                   "precision": args.precision, "threads": args.threads},
    }))?;
    let problems = config.problems();
    anyhow::ensure!(problems.is_empty(), "{problems:?}");
    let filter = Arc::new(AcgeFilter::load(&config, &args.constitution_hash)?);
    let requests: Arc<Vec<Request>> = Arc::new(requests.to_vec());
    let min = Duration::from_millis(args.min_ms);
    super::super::block_on(None, async move {
        let started = Instant::now();
        let (mut items, mut counts) = (0usize, [0usize; 3]);
        while items == 0 || started.elapsed() < min {
            let mut tasks = Vec::with_capacity(requests.len());
            for i in 0..requests.len() {
                let (filter, requests) = (filter.clone(), requests.clone());
                tasks.push(tokio::spawn(async move {
                    let r = &requests[i];
                    filter
                        .score_request(&r.method, &r.path, &r.headers, Some(&r.body))
                        .await
                }));
            }
            for t in tasks {
                let c = t.await??;
                counts[match c.stage {
                    Some("second") => 1,
                    Some("second_skipped") => 2,
                    _ => 0,
                }] += 1;
                items += 1;
            }
        }
        let seconds = started.elapsed().as_secs_f64();
        let share = |n: usize| n as f64 / items as f64;
        Ok(CascadeReport {
            band,
            items,
            items_per_second: items as f64 / seconds,
            fast: share(counts[0]),
            second: share(counts[1]),
            second_skipped: share(counts[2]),
        })
    })
}
