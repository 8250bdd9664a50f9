//! `acge-proxy model eval`: runs a labelled set through the same path the proxy uses
//! (canonical rendering, batcher, engine, threshold) and reports how the model did.
//!
//! The set is JSON lines as `../shared/eval/README.md` describes: `service`, `method`,
//! `path`, optional `headers`, `body`, `label` (`comply` | `violate`) and, for
//! violations, `principle`.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use acge_filters::acge::filter::{AcgeConfig, AcgeFilter};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde::{Deserialize, Serialize};

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
pub async fn evaluate(
    model: &Path,
    data: &Path,
    constitution_hash: &str,
    threshold: Option<f64>,
) -> Result<Report, String> {
    let text = std::fs::read_to_string(data).map_err(|e| format!("{}: {e}", data.display()))?;
    let mut cases = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let case: Case = serde_json::from_str(line)
            .map_err(|e| format!("{} line {}: {e}", data.display(), n + 1))?;
        if case.label == Label::Violate && case.principle.is_none() {
            return Err(format!(
                "{} line {}: a `violate` case needs its `principle`",
                data.display(),
                n + 1
            ));
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
    }))
    .map_err(|e| e.to_string())?;
    let filter = Arc::new(AcgeFilter::load(&config, constitution_hash).map_err(|e| e.to_string())?);

    let started = Instant::now();
    let mut tasks = Vec::with_capacity(cases.len());
    for case in &cases {
        let method = Method::from_bytes(case.method.as_bytes())
            .map_err(|e| format!("method {}: {e}", case.method))?;
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
        results.push(
            t.await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?,
        );
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
#[cfg(feature = "torch")]
/// What `sweep` feeds the model: a canonical rendering of a typical request.
const SWEEP_TEXT: &str = "POST /api/v1/integrity/acge/audit\ncontent-type: application/json\n\n\
{\"entry\":{\"action\":\"firewall_rule_changed\",\"actor\":\"netadmin.li\",\"rule\":4471,\
\"ticket\":\"CHG-1204\"},\"operation\":\"append\",\"reason\":\"quarterly review of the \
edge firewall found two stale rules; removed after approval by the network lead\",\
\"requested_at\":\"2026-11-30T08:15:00Z\",\"tenant\":\"northwind\"}";

pub fn sweep(
    model: &Path,
    constitution_hash: &str,
    device: acge_filters::acge::DeviceChoice,
    threads: Option<usize>,
    batches: &[usize],
    len: usize,
    min_time: std::time::Duration,
) -> Result<(String, Vec<SweepRow>), String> {
    use acge_filters::acge::batcher::Backend;
    use acge_filters::acge::engine::TorchEngine;

    let (mut engine, meta) =
        TorchEngine::load(model, constitution_hash, device, threads).map_err(|e| e.to_string())?;
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
