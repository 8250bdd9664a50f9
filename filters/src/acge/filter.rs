//! The `acge` filter: scores requests and/or responses with the ACGE model and allows,
//! annotates or denies them.
//!
//! compliance score = 1 − the highest violation probability; the principles over the
//! threshold are named. `mode: enforce` answers a non-compliant request with 403 and
//! turns a non-compliant response into 502; `mode: observe` forwards and annotates
//! (`x-acge-compliance`, `x-acge-principles`). When the model cannot answer (engine
//! error, timeout, full queue), `on_error: deny` (the default: fail closed) answers
//! 503 and `allow` forwards with `x-acge-compliance: unavailable`; both are counted.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use http::{HeaderName, HeaderValue, StatusCode};
use metrics::{counter, histogram, Counter, Histogram};
use serde::{Deserialize, Serialize};

use super::batcher::{BatchObserver, Batcher, BatcherConfig, InferError};
use super::cache::{self, ScoreCache};
use super::features;
use crate::metrics::{
    COMPLIANCE_SCORE, DECISIONS_TOTAL, INFERENCE_BATCH_SIZE, INFERENCE_CACHE_TOTAL,
    INFERENCE_ERRORS_TOTAL, INFERENCE_QUEUE_SECONDS, INFERENCE_SECONDS,
};
use crate::{json_error, Compliance, Exchange, Filter, RequestCtx, ResponseCtx, Verdict};

pub const COMPLIANCE_HEADER: HeaderName = HeaderName::from_static("x-acge-compliance");
pub const PRINCIPLES_HEADER: HeaderName = HeaderName::from_static("x-acge-principles");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AcgeMode {
    #[default]
    Enforce,
    Observe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    #[default]
    Deny,
    Allow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Request,
    Response,
}

impl Phase {
    fn as_str(self) -> &'static str {
        match self {
            Phase::Request => "request",
            Phase::Response => "response",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcgeConfig {
    /// The model directory (model.json and the TorchScript file).
    pub model: PathBuf,
    #[serde(default)]
    pub mode: AcgeMode,
    #[serde(default = "defaults::on")]
    pub on: Vec<Phase>,
    /// Overrides the model's own threshold.
    #[serde(default)]
    pub threshold: Option<f64>,
    #[serde(default = "defaults::max_batch")]
    pub max_batch: usize,
    #[serde(default = "defaults::max_delay_us")]
    pub max_delay_us: u64,
    #[serde(default = "defaults::queue")]
    pub queue: usize,
    /// Per item, from queueing to result.
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub on_error: OnError,
    #[serde(default)]
    pub device: super::DeviceChoice,
    /// libtorch intra-op threads; default libtorch's own choice.
    #[serde(default)]
    pub threads: Option<usize>,
    /// Request and response headers the model reads, in this order.
    #[serde(default = "defaults::headers")]
    pub headers: Vec<String>,
    #[serde(default = "defaults::cache_entries")]
    pub cache_entries: usize,
    #[serde(default = "defaults::cache_ttl_ms")]
    pub cache_ttl_ms: u64,
}

mod defaults {
    pub fn on() -> Vec<super::Phase> {
        vec![super::Phase::Request]
    }
    pub fn max_batch() -> usize {
        64
    }
    pub fn max_delay_us() -> u64 {
        500
    }
    pub fn queue() -> usize {
        4096
    }
    pub fn timeout_ms() -> u64 {
        100
    }
    pub fn headers() -> Vec<String> {
        vec!["x-constitutional-hash".into(), "content-type".into()]
    }
    pub fn cache_entries() -> usize {
        10_000
    }
    pub fn cache_ttl_ms() -> u64 {
        300_000
    }
}

/// The request phase's decision, kept for the log phase's counters.
#[derive(Debug, Clone, Copy, Default)]
struct Decisions {
    request: Option<Decision>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    Allow = 0,
    Violation = 1,
    Error = 2,
}

const DECISIONS: [Decision; 3] = [Decision::Allow, Decision::Violation, Decision::Error];

impl Decision {
    fn of(c: &Compliance) -> Self {
        if c.principles.is_empty() {
            Decision::Allow
        } else {
            Decision::Violation
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Violation => "violation",
            Decision::Error => "error",
        }
    }
}

/// The metric handles of one route, version and phase, registered on first use so
/// that a request records with atomics, not label look-ups.
struct PhaseMetrics {
    score: Histogram,
    decisions: [Counter; 3],
}

type PhaseKey = (Arc<str>, &'static str, Phase);

pub struct AcgeFilter {
    batcher: Batcher,
    cache: ScoreCache,
    principles: Vec<String>,
    threshold: f64,
    max_len: usize,
    mode: AcgeMode,
    on_error: OnError,
    on_request: bool,
    on_response: bool,
    headers: Vec<HeaderName>,
    metrics: RwLock<HashMap<PhaseKey, Arc<PhaseMetrics>>>,
    cache_hits: Counter,
    cache_misses: Counter,
}

/// Records the batcher's observations under the `acge_inference_*` names.
struct Observer;

impl BatchObserver for Observer {
    fn batch(&self, size: usize, queue_waits: &[Duration], inference: Duration) {
        histogram!(INFERENCE_BATCH_SIZE).record(size as f64);
        histogram!(INFERENCE_SECONDS).record(inference.as_secs_f64());
        let queue = histogram!(INFERENCE_QUEUE_SECONDS);
        for w in queue_waits {
            queue.record(w.as_secs_f64());
        }
    }
    fn error(&self, e: &InferError) {
        counter!(INFERENCE_ERRORS_TOTAL, "kind" => e.kind()).increment(1);
    }
}

/// Why the filter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AcgeLoadError {
    #[error("this build has no libtorch: rebuild with the `torch` feature (the default) to run the acge filter")]
    NoTorch,
    #[error("{0}")]
    Model(String),
    #[error("headers: `{0}` is not a header name")]
    Header(String),
    #[error("cannot start the inference thread: {0}")]
    Thread(std::io::Error),
}

impl AcgeFilter {
    /// Loads the model and starts its inference thread.
    #[cfg(feature = "torch")]
    pub fn load(config: &AcgeConfig, constitution_hash: &str) -> Result<Self, AcgeLoadError> {
        let (engine, meta) = super::engine::TorchEngine::load(
            &config.model,
            constitution_hash,
            config.device,
            config.threads,
        )
        .map_err(|e| AcgeLoadError::Model(e.to_string()))?;
        tracing::info!(model = %meta.name, version = %meta.version, device = ?engine.device(), "ACGE model loaded");
        Self::with_backend(
            engine,
            meta.principles,
            meta.threshold,
            meta.max_len,
            config,
        )
    }

    #[cfg(not(feature = "torch"))]
    pub fn load(_config: &AcgeConfig, _constitution_hash: &str) -> Result<Self, AcgeLoadError> {
        Err(AcgeLoadError::NoTorch)
    }

    /// Builds the filter over any backend (the engine, or a stand-in).
    pub fn with_backend<B: super::batcher::Backend>(
        backend: B,
        principles: Vec<String>,
        model_threshold: f64,
        max_len: usize,
        config: &AcgeConfig,
    ) -> Result<Self, AcgeLoadError> {
        let headers = config
            .headers
            .iter()
            .map(|h| {
                HeaderName::from_bytes(h.as_bytes()).map_err(|_| AcgeLoadError::Header(h.clone()))
            })
            .collect::<Result<_, _>>()?;
        let batcher = Batcher::spawn(
            backend,
            BatcherConfig {
                max_batch: config.max_batch,
                max_delay: Duration::from_micros(config.max_delay_us),
                queue: config.queue,
                timeout: Duration::from_millis(config.timeout_ms),
            },
            Observer,
        )
        .map_err(AcgeLoadError::Thread)?;
        Ok(Self {
            batcher,
            cache: ScoreCache::new(
                config.cache_entries,
                Duration::from_millis(config.cache_ttl_ms),
            ),
            principles,
            threshold: config.threshold.unwrap_or(model_threshold),
            max_len,
            mode: config.mode,
            on_error: config.on_error,
            on_request: config.on.contains(&Phase::Request),
            on_response: config.on.contains(&Phase::Response),
            headers,
            metrics: RwLock::new(HashMap::new()),
            cache_hits: counter!(INFERENCE_CACHE_TOTAL, "result" => "hit"),
            cache_misses: counter!(INFERENCE_CACHE_TOTAL, "result" => "miss"),
        })
    }

    /// Scores a request exactly as `on_request` does (for `acge-proxy model eval`).
    pub async fn score_request(
        &self,
        method: &http::Method,
        path: &str,
        headers: &http::HeaderMap,
        body: Option<&[u8]>,
    ) -> Result<Compliance, InferError> {
        self.score(&features::render_request(
            method,
            path,
            headers,
            &self.headers,
            body,
        ))
        .await
    }

    pub fn principles(&self) -> &[String] {
        &self.principles
    }

    /// Scores one rendering: from the cache, or through the batcher.
    async fn score(&self, rendering: &[u8]) -> Result<Compliance, InferError> {
        let key = cache::key(rendering);
        let row = match self.cache.get(&key) {
            Some(row) => {
                self.cache_hits.increment(1);
                row
            }
            None => {
                self.cache_misses.increment(1);
                let row: Arc<[f32]> = self
                    .batcher
                    .infer(features::encode(rendering, self.max_len))
                    .await?
                    .into();
                self.cache.insert(key, row.clone());
                row
            }
        };
        let worst = row.iter().copied().fold(0.0f32, f32::max);
        let principles = row
            .iter()
            .zip(&self.principles)
            .filter(|(p, _)| f64::from(**p) > self.threshold)
            .map(|(_, id)| id.clone())
            .collect();
        Ok(Compliance {
            score: 1.0 - f64::from(worst),
            principles,
        })
    }

    fn phase_metrics(
        &self,
        route: &Arc<str>,
        version: &'static str,
        phase: Phase,
    ) -> Arc<PhaseMetrics> {
        let key = (route.clone(), version, phase);
        if let Some(m) = self
            .metrics
            .read()
            .expect("never poisoned: no panics under the lock")
            .get(&key)
        {
            return m.clone();
        }
        self.metrics
            .write()
            .expect("never poisoned: no panics under the lock")
            .entry(key)
            .or_insert_with(|| {
                let labels = |d: Decision| {
                    counter!(DECISIONS_TOTAL, "route" => route.to_string(), "version" => version,
                        "phase" => phase.as_str(), "decision" => d.as_str())
                };
                Arc::new(PhaseMetrics {
                    score: histogram!(COMPLIANCE_SCORE, "route" => route.to_string(), "version" => version, "phase" => phase.as_str()),
                    decisions: DECISIONS.map(labels),
                })
            })
            .clone()
    }

    /// Keeps the worse of the request's and the response's judgement for the audit log.
    fn remember(attributes: &mut crate::Attributes, c: &Compliance) {
        let merged = match attributes.get::<Compliance>() {
            Some(prev) if prev.score <= c.score => return,
            _ => c.clone(),
        };
        attributes.insert(merged);
    }

    fn annotate(headers: &mut http::HeaderMap, c: Option<&Compliance>) {
        let score = c.map_or("unavailable".to_string(), |c| format!("{:.4}", c.score));
        if let Ok(v) = HeaderValue::from_str(&score) {
            headers.insert(COMPLIANCE_HEADER, v);
        }
        if let Some(c) = c {
            if let Ok(v) = HeaderValue::from_str(&c.principles.join(",")) {
                headers.insert(PRINCIPLES_HEADER, v);
            }
        }
    }
}

#[async_trait]
impl Filter for AcgeFilter {
    fn name(&self) -> &'static str {
        "acge"
    }

    fn wants_body(&self) -> bool {
        self.on_request
    }

    fn wants_response_body(&self) -> bool {
        self.on_response
    }

    async fn on_request(&self, req: &mut RequestCtx) -> Verdict {
        if !self.on_request {
            return Verdict::Continue;
        }
        let rendering = features::render_request(
            &req.method,
            req.uri.path(),
            &req.headers,
            &self.headers,
            req.body.as_deref(),
        );
        match self.score(&rendering).await {
            Ok(c) => {
                self.phase_metrics(&req.route, "none", Phase::Request)
                    .score
                    .record(c.score);
                req.attributes.insert(Decisions {
                    request: Some(Decision::of(&c)),
                });
                Self::remember(&mut req.attributes, &c);
                if self.mode == AcgeMode::Enforce && !c.principles.is_empty() {
                    return Verdict::Respond(json_error(
                        StatusCode::FORBIDDEN,
                        "constitutional_violation",
                        format!(
                            "the request violates: {} (compliance {:.4})",
                            c.principles.join(", "),
                            c.score
                        ),
                    ));
                }
                Self::annotate(&mut req.headers, Some(&c));
                Verdict::Continue
            }
            Err(e) => {
                req.attributes.insert(Decisions {
                    request: Some(Decision::Error),
                });
                match self.on_error {
                    OnError::Deny => Verdict::Respond(json_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "acge_unavailable",
                        format!("the request could not be scored ({e}); on_error is deny"),
                    )),
                    OnError::Allow => {
                        Self::annotate(&mut req.headers, None);
                        Verdict::Continue
                    }
                }
            }
        }
    }

    async fn on_response(&self, res: &mut ResponseCtx) -> Verdict {
        // Only an upstream's answer is scored; the proxy's own refusals are not.
        let (true, Some(version)) = (self.on_response, res.version) else {
            return Verdict::Continue;
        };
        let rendering = features::render_response(
            res.status.as_u16(),
            &res.headers,
            &self.headers,
            res.body.as_deref(),
        );
        let metrics = self.phase_metrics(&res.route, version, Phase::Response);
        match self.score(&rendering).await {
            Ok(c) => {
                metrics.score.record(c.score);
                metrics.decisions[Decision::of(&c) as usize].increment(1);
                Self::remember(&mut res.attributes, &c);
                res.attributes.insert(crate::ResponseJudgement {
                    compliant: c.principles.is_empty(),
                });
                if self.mode == AcgeMode::Enforce && !c.principles.is_empty() {
                    return Verdict::Respond(json_error(
                        StatusCode::BAD_GATEWAY,
                        "constitutional_violation",
                        format!(
                            "the {version} upstream's response violates: {} (compliance {:.4})",
                            c.principles.join(", "),
                            c.score
                        ),
                    ));
                }
                Self::annotate(&mut res.headers, Some(&c));
                Verdict::Continue
            }
            Err(e) => {
                metrics.decisions[Decision::Error as usize].increment(1);
                match self.on_error {
                    OnError::Deny => Verdict::Respond(json_error(
                        StatusCode::BAD_GATEWAY,
                        "acge_unavailable",
                        format!("the response could not be scored ({e}); on_error is deny"),
                    )),
                    OnError::Allow => {
                        Self::annotate(&mut res.headers, None);
                        Verdict::Continue
                    }
                }
            }
        }
    }

    fn on_log(&self, done: &Exchange) {
        // Request decisions are counted once the version they went to is known.
        if let Some(d) = done.attributes.get::<Decisions>().and_then(|d| d.request) {
            self.phase_metrics(&done.route, done.version.unwrap_or("none"), Phase::Request)
                .decisions[d as usize]
                .increment(1);
        }
    }
}
