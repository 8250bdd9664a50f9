//! The `acge` filter: scores requests and/or responses with the ACGE model and allows,
//! annotates or denies them.
//!
//! compliance score = 1 − the highest violation probability; the principles over the
//! threshold are named. `mode: enforce` answers a non-compliant request with 403 and
//! turns a non-compliant response into 502; `mode: observe` forwards and annotates.
//! The request's score travels upstream in `x-acge-request-compliance` and
//! `x-acge-request-principles`; the response's score goes to the client in
//! `x-acge-response-compliance` and `x-acge-response-principles` (each header has one
//! meaning). When the model cannot answer (engine error, timeout, full queue),
//! `on_error: deny` (the default: fail closed) answers 503 and `allow` forwards with the
//! score header set to `unavailable`; both are counted.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::{HeaderName, HeaderValue, StatusCode};
use metrics::{counter, histogram, Counter, Histogram};
use serde::{Deserialize, Serialize};

use super::batcher::{BatchObserver, Batcher, BatcherConfig, InferError};
use super::cache::ScoreCache;
use super::features;
use crate::metrics::{
    COMPLIANCE_SCORE, DECISIONS_TOTAL, INFERENCE_BATCH_SIZE, INFERENCE_CACHE_TOTAL,
    INFERENCE_ERRORS_TOTAL, INFERENCE_QUEUE_SECONDS, INFERENCE_SECONDS,
};
use crate::{json_error, Compliance, Exchange, Filter, LogError, Verdict, Version};

/// The request's score, on the request sent upstream.
pub const REQUEST_COMPLIANCE_HEADER: HeaderName =
    HeaderName::from_static("x-acge-request-compliance");
pub const REQUEST_PRINCIPLES_HEADER: HeaderName =
    HeaderName::from_static("x-acge-request-principles");
/// The response's score, on the answer sent to the client.
pub const RESPONSE_COMPLIANCE_HEADER: HeaderName =
    HeaderName::from_static("x-acge-response-compliance");
pub const RESPONSE_PRINCIPLES_HEADER: HeaderName =
    HeaderName::from_static("x-acge-response-principles");

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

/// The metric handles of one route, version and phase, registered when the filter is
/// bound to the route, so that a request records with atomics, not label look-ups.
struct PhaseMetrics {
    score: Histogram,
    decisions: [Counter; 3],
}

impl PhaseMetrics {
    fn new(route: &str, version: &'static str, phase: Phase) -> Self {
        let labels = |d: Decision| {
            counter!(DECISIONS_TOTAL, "route" => route.to_string(), "version" => version,
                "phase" => phase.as_str(), "decision" => d.as_str())
        };
        Self {
            score: histogram!(COMPLIANCE_SCORE, "route" => route.to_string(), "version" => version, "phase" => phase.as_str()),
            decisions: DECISIONS.map(labels),
        }
    }
}

/// The filter bound to one route, with that route's metric handles.
pub struct RouteAcgeFilter {
    shared: Arc<AcgeFilter>,
    /// Request phase, by the version the request went to ([`Version::index`]).
    request: [PhaseMetrics; 3],
    /// Response phase, blue and green.
    response: [PhaseMetrics; 2],
}

/// The model, its batcher and cache: built once, shared by every route.
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
    #[error(transparent)]
    Model(#[from] super::meta::ModelError),
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
        )?;
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

    /// Loads the model as [`AcgeFilter::load`] would (metadata, constitution hash,
    /// module, output shape), and lets it go again: starts no thread. For
    /// `acge-proxy check`.
    pub fn check(config: &AcgeConfig, constitution_hash: &str) -> Result<(), AcgeLoadError> {
        #[cfg(feature = "torch")]
        {
            // Checked on the CPU when the config asks for CUDA: a missing GPU is for the
            // machine that runs the proxy to find, not the one that checks its config.
            let device = match config.device {
                super::DeviceChoice::Cuda => super::DeviceChoice::Auto,
                d => d,
            };
            super::engine::TorchEngine::load(&config.model, constitution_hash, device, None)?;
            Ok(())
        }
        #[cfg(not(feature = "torch"))]
        {
            super::meta::ModelMeta::read(&config.model, constitution_hash)?;
            Err(AcgeLoadError::NoTorch)
        }
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
        self.score(features::Input::Request {
            method,
            path,
            headers,
            body,
        })
        .await
    }

    pub fn principles(&self) -> &[String] {
        &self.principles
    }

    /// Scores one input: from the cache (keyed on the raw input, so a hit renders
    /// nothing), or rendered and run through the batcher.
    async fn score(&self, input: features::Input<'_>) -> Result<Compliance, InferError> {
        let key = input.cache_key(&self.headers);
        let row = match self.cache.get(&key) {
            Some(row) => {
                self.cache_hits.increment(1);
                row
            }
            None => {
                self.cache_misses.increment(1);
                let row: Arc<[f32]> = self
                    .batcher
                    .infer(features::encode(&input.render(&self.headers), self.max_len))
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

    /// Keeps the worse of the request's and the response's judgement for the audit log.
    fn remember(attributes: &mut crate::Attributes, c: &Compliance) {
        let merged = match attributes.get::<Compliance>() {
            Some(prev) if prev.score <= c.score => return,
            _ => c.clone(),
        };
        attributes.insert(merged);
    }

    fn annotate(headers: &mut http::HeaderMap, phase: Phase, c: Option<&Compliance>) {
        let (score_header, principles_header) = match phase {
            Phase::Request => (REQUEST_COMPLIANCE_HEADER, REQUEST_PRINCIPLES_HEADER),
            Phase::Response => (RESPONSE_COMPLIANCE_HEADER, RESPONSE_PRINCIPLES_HEADER),
        };
        let score = c.map_or("unavailable".to_string(), |c| format!("{:.4}", c.score));
        if let Ok(v) = HeaderValue::from_str(&score) {
            headers.insert(score_header, v);
        }
        if let Some(c) = c {
            if let Ok(v) = HeaderValue::from_str(&c.principles.join(",")) {
                headers.insert(principles_header, v);
            }
        }
    }

    /// Binds the filter to `route`, registering its metric handles.
    pub fn for_route(self: &Arc<Self>, route: &str) -> RouteAcgeFilter {
        RouteAcgeFilter {
            shared: self.clone(),
            request: [
                PhaseMetrics::new(route, Version::Blue.as_str(), Phase::Request),
                PhaseMetrics::new(route, Version::Green.as_str(), Phase::Request),
                PhaseMetrics::new(route, "none", Phase::Request),
            ],
            response: [
                PhaseMetrics::new(route, Version::Blue.as_str(), Phase::Response),
                PhaseMetrics::new(route, Version::Green.as_str(), Phase::Response),
            ],
        }
    }
}

#[async_trait]
impl Filter for RouteAcgeFilter {
    fn name(&self) -> &'static str {
        "acge"
    }

    fn wants_body(&self) -> bool {
        self.shared.on_request
    }

    fn wants_response_body(&self) -> bool {
        self.shared.on_response
    }

    async fn on_request(&self, ex: &mut Exchange) -> Verdict {
        let f = &*self.shared;
        if !f.on_request {
            return Verdict::Continue;
        }
        let input = features::Input::Request {
            method: &ex.request.method,
            path: ex.request.uri.path(),
            headers: &ex.request.headers,
            body: ex.request_body.as_deref(),
        };
        match f.score(input).await {
            Ok(c) => {
                // The version is not chosen yet; the score is recorded under `none`.
                self.request[Version::NONE_INDEX].score.record(c.score);
                ex.attributes.insert(Decisions {
                    request: Some(Decision::of(&c)),
                });
                AcgeFilter::remember(&mut ex.attributes, &c);
                if f.mode == AcgeMode::Enforce && !c.principles.is_empty() {
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
                AcgeFilter::annotate(&mut ex.request.headers, Phase::Request, Some(&c));
                Verdict::Continue
            }
            Err(e) => {
                ex.attributes.insert(Decisions {
                    request: Some(Decision::Error),
                });
                match f.on_error {
                    OnError::Deny => Verdict::Respond(json_error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "acge_unavailable",
                        format!("the request could not be scored ({e}); on_error is deny"),
                    )),
                    OnError::Allow => {
                        AcgeFilter::annotate(&mut ex.request.headers, Phase::Request, None);
                        Verdict::Continue
                    }
                }
            }
        }
    }

    async fn on_response(&self, ex: &mut Exchange) -> Verdict {
        let f = &*self.shared;
        // Only an upstream's answer is scored; the proxy's own refusals are not.
        let Some(answer) = ex.response.as_mut() else {
            return Verdict::Continue;
        };
        let (true, Some(version)) = (f.on_response, answer.upstream()) else {
            return Verdict::Continue;
        };
        let input = features::Input::Response {
            status: answer.status.as_u16(),
            headers: &answer.headers,
            body: answer.body.as_deref(),
        };
        let metrics = &self.response[version as usize];
        match f.score(input).await {
            Ok(c) => {
                metrics.score.record(c.score);
                metrics.decisions[Decision::of(&c) as usize].increment(1);
                let compliant = c.principles.is_empty();
                ex.findings.compliant = Some(compliant);
                if f.mode == AcgeMode::Enforce && !compliant {
                    AcgeFilter::remember(&mut ex.attributes, &c);
                    return Verdict::Respond(json_error(
                        StatusCode::BAD_GATEWAY,
                        "constitutional_violation",
                        format!(
                            "the {} upstream's response violates: {} (compliance {:.4})",
                            version.as_str(),
                            c.principles.join(", "),
                            c.score
                        ),
                    ));
                }
                AcgeFilter::annotate(&mut answer.headers, Phase::Response, Some(&c));
                AcgeFilter::remember(&mut ex.attributes, &c);
                Verdict::Continue
            }
            Err(e) => {
                metrics.decisions[Decision::Error as usize].increment(1);
                match f.on_error {
                    OnError::Deny => Verdict::Respond(json_error(
                        StatusCode::BAD_GATEWAY,
                        "acge_unavailable",
                        format!("the response could not be scored ({e}); on_error is deny"),
                    )),
                    OnError::Allow => {
                        AcgeFilter::annotate(&mut answer.headers, Phase::Response, None);
                        Verdict::Continue
                    }
                }
            }
        }
    }

    async fn on_log(&self, ex: &Exchange) -> Result<(), LogError> {
        // Request decisions are counted once the version they went to is known.
        if let Some(d) = ex.attributes.get::<Decisions>().and_then(|d| d.request) {
            self.request[Version::index(ex.version)].decisions[d as usize].increment(1);
        }
        Ok(())
    }
}
