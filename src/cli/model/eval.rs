//! `acge-proxy model eval`: a labelled set through the proxy's own scoring path.
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
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    #[allow(dead_code)]
    service: String,
    pub(super) method: String,
    pub(super) path: String,
    #[serde(default)]
    pub(super) headers: BTreeMap<String, String>,
    pub(super) body: serde_json::Value,
    /// A response (green's answer to the request above): scored as one.
    #[serde(default)]
    pub(super) status: Option<u16>,
    label: Label,
    #[serde(default)]
    principle: Option<String>,
}

impl Case {
    /// The case's headers as the proxy would hold them; a name or value HTTP cannot
    /// carry is left out, as it could not have reached the proxy.
    pub(super) fn header_map(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (k, v) in &self.headers {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                headers.insert(k, v);
            }
        }
        headers
    }
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
    /// With a cascade: the share of items each stage decided (`fast`, `second`,
    /// `second_skipped`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stages: Option<BTreeMap<&'static str, f64>>,
}

/// How `eval` runs the model: where, and with which second stage.
#[derive(Debug, Clone, Default)]
pub struct EvalOptions {
    pub threshold: Option<f64>,
    pub device: Option<String>,
    pub precision: Option<String>,
    pub second: Option<PathBuf>,
    pub band: Option<[f64; 2]>,
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
        if let Some(stages) = &self.stages {
            writeln!(f, "decided by")?;
            for (s, share) in stages {
                writeln!(f, "  {s:<15} {:.2} %", share * 100.0)?;
            }
        }
        Ok(())
    }
}

/// Reads a labelled set, refusing a line that is not a case (naming the line).
fn read_cases(data: &Path) -> anyhow::Result<Vec<Case>> {
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
    Ok(cases)
}

/// Evaluates `data` with the model in `model`.
pub async fn evaluate(
    model: &Path,
    data: &Path,
    constitution_hash: &str,
    options: &EvalOptions,
) -> anyhow::Result<Report> {
    let cases = read_cases(data)?;
    let mut settings = serde_json::json!({
        "model": model,
        "threshold": options.threshold,
        "max_batch": 64,
        "max_delay_us": 1000,
        "queue": cases.len().max(1),
        "timeout_ms": 60_000,
        "cache_entries": 1,
        "cache_ttl_ms": 0,
        "device": options.device.as_deref().unwrap_or("auto"),
        "precision": options.precision,
    });
    if let Some(second) = &options.second {
        // A queue for every item: an evaluation measures the cascade's decisions, not
        // its behaviour under overload.
        settings["second"] = serde_json::json!({
            "model": second,
            "band": options.band.unwrap_or([0.2, 0.8]),
            "max_queue": cases.len().max(1),
            "max_batch": 64,
            "timeout_ms": 60_000,
            "device": options.device.as_deref().unwrap_or("auto"),
            "precision": options.precision,
        });
    }
    let config: AcgeConfig = serde_json::from_value(settings).context("--device or --precision")?;
    if let Some((field, why)) = config.problems().into_iter().next() {
        anyhow::bail!("{field}: {why}");
    }
    score_all(&config, cases, constitution_hash).await
}

/// Evaluates `data` with what route `route` of the config file `config` runs: its
/// `filters.acge` settings as they are (models, cascade and band, thresholds, headers,
/// device, precision, threads) and the config's constitution hash. Only what would
/// make the evaluation measure overload instead of decisions is changed: every queue
/// holds the whole set, and every timeout is a minute.
pub async fn evaluate_route(config: &Path, route: &str, data: &Path) -> anyhow::Result<Report> {
    let valid = acge_proxy::config::Config::load(config).map_err(|e| anyhow::anyhow!("{e}"))?;
    let names: Vec<&str> = valid.routes.iter().map(|r| r.name.as_str()).collect();
    let Some(r) = valid.routes.iter().find(|r| r.name == route) else {
        anyhow::bail!(
            "{}: no route `{route}` (its routes: {})",
            config.display(),
            names.join(", ")
        );
    };
    if !r.filters.iter().any(|f| f == "acge") {
        anyhow::bail!(
            "{}: route `{route}` does not run the acge filter (its filters: [{}])",
            config.display(),
            r.filters.join(", ")
        );
    }
    let mut acge = valid
        .filters
        .acge
        .clone()
        .context("the config lists acge on the route but has no filters.acge")?;
    let cases = read_cases(data)?;
    let n = cases.len().max(1);
    acge.queue = acge.queue.max(n);
    acge.timeout_ms = 60_000;
    if let Some(second) = acge.second.as_mut() {
        second.max_queue = second.max_queue.max(n);
        second.timeout_ms = 60_000;
    }
    score_all(&acge, cases, &valid.constitution.hash).await
}

/// Scores every case at once through an acge filter built from `config`, and counts.
async fn score_all(
    config: &AcgeConfig,
    cases: Vec<Case>,
    constitution_hash: &str,
) -> anyhow::Result<Report> {
    let filter = Arc::new(AcgeFilter::load(config, constitution_hash)?);

    let started = Instant::now();
    let mut tasks = Vec::with_capacity(cases.len());
    for case in &cases {
        let method = Method::from_bytes(case.method.as_bytes())
            .with_context(|| format!("method {}", case.method))?;
        let headers = case.header_map();
        let body = serde_json::to_vec(&case.body).expect("a parsed value serializes");
        let (filter, path, status) = (filter.clone(), case.path.clone(), case.status);
        tasks.push(tokio::spawn(async move {
            match status {
                Some(status) => filter.score_response(status, &headers, Some(&body)).await,
                None => {
                    filter
                        .score_request(&method, &path, &headers, Some(&body))
                        .await
                }
            }
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
        stages: config.second.is_some().then(|| {
            let mut shares = BTreeMap::new();
            for stage in ["fast", "second", "second_skipped"] {
                let n = results.iter().filter(|c| c.stage == Some(stage)).count();
                shares.insert(stage, ratio(n as u64, items));
            }
            shares
        }),
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
