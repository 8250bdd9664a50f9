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
//! score header set to `unavailable`; both are counted. With a `second` stage the
//! scores come from the [`Cascade`]; which stage decided is counted per route
//! (`acge_cascade_total`) and written in the audit record.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use http::{HeaderName, HeaderValue, StatusCode};
use metrics::{counter, histogram, Counter, Histogram};

use super::batcher::InferError;
use super::cache::ScoreCache;
use super::cascade::{Cascade, Decider, Scored};
pub use super::config::{AcgeConfig, AcgeMode, OnError, Phase, SecondConfig};
use super::render;
use crate::metrics::{
    CASCADE_TOTAL, COMPLIANCE_SCORE, DECISIONS_TOTAL, INFERENCE_CACHE_TOTAL,
    PRINCIPLE_VIOLATIONS_TOTAL,
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

/// The request phase's decision, kept for the log phase's counters.
#[derive(Debug, Clone, Copy, Default)]
struct Decisions {
    request: Option<Decision>,
    /// The request's violated principles, a bit per column of the model's output.
    violated: u64,
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
    /// By principle, in the order of the model's output columns.
    principles: Vec<Counter>,
}

impl PhaseMetrics {
    fn new(route: &str, version: &'static str, phase: Phase, principles: &[String]) -> Self {
        let labels = |d: Decision| {
            counter!(DECISIONS_TOTAL, "route" => route.to_string(), "version" => version,
                "phase" => phase.as_str(), "decision" => d.as_str())
        };
        Self {
            score: histogram!(COMPLIANCE_SCORE, "route" => route.to_string(), "version" => version, "phase" => phase.as_str()),
            decisions: DECISIONS.map(labels),
            principles: principles
                .iter()
                .map(|p| {
                    counter!(PRINCIPLE_VIOLATIONS_TOTAL, "route" => route.to_string(),
                        "version" => version, "phase" => phase.as_str(), "principle" => p.clone())
                })
                .collect(),
        }
    }

    fn count_violations(&self, violated: u64) {
        for (i, counter) in self.principles.iter().enumerate().take(64) {
            if violated & (1 << i) != 0 {
                counter.increment(1);
            }
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
    /// By [`Decider`], when the filter has a second stage.
    cascade: Option<[Counter; 3]>,
}

/// The models, their batchers and the cache: built once, shared by every route.
pub struct AcgeFilter {
    cascade: Cascade,
    cache: ScoreCache<Scored>,
    principles: Vec<String>,
    /// The config's threshold, over the models' own.
    threshold: Option<f64>,
    mode: AcgeMode,
    on_error: OnError,
    on_request: bool,
    on_response: bool,
    headers: Vec<HeaderName>,
    cache_hits: Counter,
    cache_misses: Counter,
    /// The remote server's health, when the model runs there.
    remote: Option<Arc<super::remote::Health>>,
}

/// Why the filter could not be built.
#[derive(Debug, thiserror::Error)]
pub enum AcgeLoadError {
    #[error("this build has no libtorch: rebuild with the `torch` feature (the default) to run the acge filter")]
    NoTorch,
    #[error(transparent)]
    Model(#[from] super::meta::ModelError),
    #[error("second.model: {0}")]
    Second(super::meta::ModelError),
    #[error("second.model: its principles {second:?} are not the first model's {fast:?} (same ids, same order)")]
    Principles {
        fast: Vec<String>,
        second: Vec<String>,
    },
    #[error("headers: `{0}` is not a header name")]
    Header(String),
    #[error("cannot start the inference thread: {0}")]
    Thread(std::io::Error),
    #[error("{0}")]
    Remote(String),
}

#[cfg(feature = "torch")]
mod load {
    use super::super::batcher::Backend;
    use super::super::batcher::BatcherConfig;
    use super::super::cascade::{Band, Stage};
    use super::super::config::default_threads;
    use super::super::config::Fallback;
    use super::super::encoder::Encoder;
    use super::super::engine::{EngineOptions, TorchEngine};
    use super::super::meta::{ModelError, ModelMeta};
    use super::super::remote::{Health as RemoteHealth, RemoteBackend};
    use super::*;

    /// The models a config names, loaded and checked, behind their inference threads;
    /// with `check_only`, loaded, checked and dropped (None), for `acge-proxy check`.
    pub(super) fn cascade(
        config: &AcgeConfig,
        constitution_hash: &str,
        check_only: bool,
    ) -> Result<Option<(Cascade, Vec<String>)>, AcgeLoadError> {
        let engines = 1 + usize::from(config.second.is_some());
        // Checked on the CPU when the config asks for CUDA: a missing GPU is for the
        // machine that runs the proxy to find, not the one that checks its config.
        let options = |device, precision, threads: Option<usize>| match (check_only, device) {
            (true, super::super::DeviceChoice::Cuda) => EngineOptions {
                device: super::super::DeviceChoice::Auto,
                precision: None,
                threads: Some(1),
            },
            _ => EngineOptions {
                device,
                precision,
                threads: Some(threads.unwrap_or_else(|| default_threads(engines))),
            },
        };
        let fast = TorchEngine::load(
            &config.model,
            constitution_hash,
            options(config.device, config.precision, config.threads),
        )?;
        if !check_only {
            tracing::info!(stage = "fast", model = %fast.meta.name, version = %fast.meta.version,
            input = fast.meta.input.kind(), device = ?fast.engine.device(),
            precision = fast.engine.precision().as_str(), "ACGE model loaded");
        }
        let second = match &config.second {
            None => None,
            Some(s) => {
                let loaded = TorchEngine::load(
                    &s.model,
                    constitution_hash,
                    options(s.device, s.precision, s.threads),
                )
                .map_err(AcgeLoadError::Second)?;
                if loaded.meta.principles != fast.meta.principles {
                    return Err(AcgeLoadError::Principles {
                        fast: fast.meta.principles,
                        second: loaded.meta.principles,
                    });
                }
                if !check_only {
                    tracing::info!(stage = "second", model = %loaded.meta.name,
                    version = %loaded.meta.version, input = loaded.meta.input.kind(),
                    device = ?loaded.engine.device(),
                    precision = loaded.engine.precision().as_str(),
                    band = ?s.band, "ACGE model loaded");
                }
                Some((s, loaded))
            }
        };
        if check_only {
            return Ok(None);
        }
        let principles = fast.meta.principles.clone();
        let fast_stage = Stage::spawn(
            "fast",
            fast.engine,
            fast.encoder,
            fast.meta.column_thresholds(),
            BatcherConfig {
                max_batch: config.max_batch,
                max_delay: Duration::from_micros(config.max_delay_us),
                queue: config.queue,
                timeout: Duration::from_millis(config.timeout_ms),
            },
        )
        .map_err(AcgeLoadError::Thread)?;
        let second = match second {
            None => None,
            Some((s, loaded)) => Some((
                Stage::spawn(
                    "second",
                    loaded.engine,
                    loaded.encoder,
                    loaded.meta.column_thresholds(),
                    BatcherConfig {
                        max_batch: s.max_batch,
                        max_delay: Duration::from_micros(s.max_delay_us),
                        queue: s.max_queue,
                        timeout: Duration::from_millis(s.timeout_ms),
                    },
                )
                .map_err(AcgeLoadError::Thread)?,
                Band {
                    lo: s.band[0] as f32,
                    hi: s.band[1] as f32,
                },
            )),
        };
        Ok(Some((Cascade::new(fast_stage, second), principles)))
    }

    /// The remote stage: the model's metadata and encoder from `config.model`, its
    /// TorchScript file only as the local fallback; with `check_only`, checked and
    /// dropped (None).
    #[allow(clippy::type_complexity)]
    pub(super) fn remote(
        config: &AcgeConfig,
        constitution_hash: &str,
        check_only: bool,
    ) -> Result<Option<(Cascade, Vec<String>, Arc<RemoteHealth>)>, AcgeLoadError> {
        let remote = config.remote.as_ref().expect("called for a remote config");
        let (meta, _) = ModelMeta::read(&config.model, constitution_hash)?;
        let encoder = Encoder::new(&config.model, &meta)?;
        let fallback = match remote.fallback {
            Fallback::None => None,
            Fallback::Local => {
                let loaded = TorchEngine::load(
                    &config.model,
                    constitution_hash,
                    EngineOptions {
                        device: config.device,
                        precision: config.precision,
                        threads: Some(config.threads.unwrap_or(1)),
                    },
                )?;
                let engine: Box<dyn Backend<Error = ModelError>> = Box::new(loaded.engine);
                Some(Arc::new(std::sync::Mutex::new(engine)))
            }
        };
        if check_only {
            return Ok(None);
        }
        let (backends, health) =
            RemoteBackend::connect(remote, encoder.layout(), meta.principles.len(), fallback)
                .map_err(AcgeLoadError::Remote)?;
        tracing::info!(endpoint = %remote.endpoint, model = %remote.model, in_flight = remote.max_in_flight,
            fallback = ?remote.fallback, input = meta.input.kind(), "ACGE model served remotely");
        let stage = Stage::spawn_many(
            "fast",
            backends,
            encoder,
            meta.column_thresholds(),
            BatcherConfig {
                max_batch: remote.max_batch,
                max_delay: Duration::from_micros(remote.max_delay_us),
                queue: config.queue,
                // An item waits for its batch's call: never less than the call's deadline.
                timeout: Duration::from_millis(
                    config
                        .timeout_ms
                        .max(remote.timeout_ms + remote.max_delay_us / 1000 + 50),
                ),
            },
        )
        .map_err(AcgeLoadError::Thread)?;
        Ok(Some((Cascade::new(stage, None), meta.principles, health)))
    }
}

impl AcgeFilter {
    /// Loads the model (and the second stage's) and starts the inference threads.
    #[cfg(feature = "torch")]
    pub fn load(config: &AcgeConfig, constitution_hash: &str) -> Result<Self, AcgeLoadError> {
        if config.remote.is_some() {
            let (cascade, principles, health) = load::remote(config, constitution_hash, false)?
                .expect("a remote stage that is not only checked is returned");
            let mut filter = Self::with_cascade(cascade, principles, config)?;
            filter.remote = Some(health);
            return Ok(filter);
        }
        let (cascade, principles) = load::cascade(config, constitution_hash, false)?
            .expect("a cascade that is not only checked is returned");
        Self::with_cascade(cascade, principles, config)
    }

    #[cfg(not(feature = "torch"))]
    pub fn load(_config: &AcgeConfig, _constitution_hash: &str) -> Result<Self, AcgeLoadError> {
        Err(AcgeLoadError::NoTorch)
    }

    /// Loads the models as [`AcgeFilter::load`] would (metadata, constitution hash,
    /// tokenizer, module, output shape, the stages' principles), and lets them go
    /// again. For `acge-proxy check`.
    pub fn check(config: &AcgeConfig, constitution_hash: &str) -> Result<(), AcgeLoadError> {
        #[cfg(feature = "torch")]
        {
            if config.remote.is_some() {
                return load::remote(config, constitution_hash, true).map(|_| ());
            }
            load::cascade(config, constitution_hash, true).map(|_| ())
        }
        #[cfg(not(feature = "torch"))]
        {
            super::meta::ModelMeta::read(&config.model, constitution_hash)?;
            if let Some(s) = &config.second {
                super::meta::ModelMeta::read(&s.model, constitution_hash)
                    .map_err(AcgeLoadError::Second)?;
            }
            Err(AcgeLoadError::NoTorch)
        }
    }

    /// Builds the filter over a cascade of any backends (the engines, or stand-ins).
    pub fn with_cascade(
        cascade: Cascade,
        principles: Vec<String>,
        config: &AcgeConfig,
    ) -> Result<Self, AcgeLoadError> {
        let headers = config
            .headers
            .iter()
            .map(|h| {
                HeaderName::from_bytes(h.as_bytes()).map_err(|_| AcgeLoadError::Header(h.clone()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            cascade,
            cache: ScoreCache::new(
                config.cache_entries,
                Duration::from_millis(config.cache_ttl_ms),
            ),
            principles,
            threshold: config.threshold,
            mode: config.mode,
            on_error: config.on_error,
            on_request: config.on.contains(&Phase::Request),
            on_response: config.on.contains(&Phase::Response),
            headers,
            cache_hits: counter!(INFERENCE_CACHE_TOTAL, "result" => "hit"),
            cache_misses: counter!(INFERENCE_CACHE_TOTAL, "result" => "miss"),
            remote: None,
        })
    }

    /// Why the proxy should not take traffic for this filter now: the remote server
    /// is not ready, or its circuit is open (and no local fallback decides).
    pub fn waiting_for(&self) -> Option<String> {
        self.remote.as_ref().and_then(|h| h.waiting_for())
    }

    /// Scores a request exactly as `on_request` does (for `acge-proxy model eval`).
    pub async fn score_request(
        &self,
        method: &http::Method,
        path: &str,
        headers: &http::HeaderMap,
        body: Option<&[u8]>,
    ) -> Result<Compliance, InferError> {
        self.score(render::Input::Request {
            method,
            path,
            headers,
            body,
        })
        .await
        .map(|(c, _)| c)
    }

    /// Scores a response exactly as `on_response` does (for `acge-proxy model eval`).
    pub async fn score_response(
        &self,
        status: u16,
        headers: &http::HeaderMap,
        body: Option<&[u8]>,
    ) -> Result<Compliance, InferError> {
        self.score(render::Input::Response {
            status,
            headers,
            body,
        })
        .await
        .map(|(c, _)| c)
    }

    pub fn principles(&self) -> &[String] {
        &self.principles
    }

    /// A bit per violated principle, by its column (violations are rare: the look-up
    /// runs only for them).
    fn violated(&self, c: &Compliance) -> u64 {
        c.principles
            .iter()
            .filter_map(|p| self.principles.iter().position(|q| q == p))
            .filter(|i| *i < 64)
            .fold(0, |mask, i| mask | 1 << i)
    }

    /// Scores one input: from the cache (keyed on the raw input, so a hit renders
    /// nothing), or rendered once and run through the cascade. The decider is None for
    /// a cache hit (it was counted when the score was made).
    async fn score(
        &self,
        input: render::Input<'_>,
    ) -> Result<(Compliance, Option<Decider>), InferError> {
        let key = input.cache_key(&self.headers);
        let (scored, fresh) = match self.cache.get(&key) {
            Some(scored) => {
                self.cache_hits.increment(1);
                (scored, false)
            }
            None => {
                self.cache_misses.increment(1);
                let scored = self.cascade.score(&input.render(&self.headers)).await?;
                self.cache.insert(key, scored.clone());
                (scored, true)
            }
        };
        let worst = scored.row.iter().copied().fold(0.0f32, f32::max);
        let principles = scored
            .row
            .iter()
            .zip(scored.thresholds.iter())
            .zip(&self.principles)
            .filter(|((p, t), _)| f64::from(**p) > self.threshold.unwrap_or(**t))
            .map(|(_, id)| id.clone())
            .collect();
        let compliance = Compliance {
            score: 1.0 - f64::from(worst),
            principles,
            stage: self.cascade.has_second().then(|| scored.decider.as_str()),
        };
        Ok((compliance, fresh.then_some(scored.decider)))
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
                PhaseMetrics::new(
                    route,
                    Version::Blue.as_str(),
                    Phase::Request,
                    &self.principles,
                ),
                PhaseMetrics::new(
                    route,
                    Version::Green.as_str(),
                    Phase::Request,
                    &self.principles,
                ),
                PhaseMetrics::new(route, "none", Phase::Request, &self.principles),
            ],
            response: [
                PhaseMetrics::new(
                    route,
                    Version::Blue.as_str(),
                    Phase::Response,
                    &self.principles,
                ),
                PhaseMetrics::new(
                    route,
                    Version::Green.as_str(),
                    Phase::Response,
                    &self.principles,
                ),
            ],
            cascade: self.cascade.has_second().then(|| {
                Decider::ALL.map(|d| {
                    counter!(CASCADE_TOTAL, "route" => route.to_string(), "stage" => d.as_str())
                })
            }),
        }
    }
}

impl RouteAcgeFilter {
    fn count(&self, decider: Option<Decider>) {
        if let (Some(counters), Some(d)) = (&self.cascade, decider) {
            counters[d as usize].increment(1);
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
        let input = render::Input::Request {
            method: &ex.request.method,
            path: ex.request.uri.path(),
            headers: &ex.request.headers,
            body: ex.request_body.as_deref(),
        };
        match f.score(input).await {
            Ok((c, decider)) => {
                self.count(decider);
                // The version is not chosen yet; the score is recorded under `none`.
                self.request[Version::NONE_INDEX].score.record(c.score);
                ex.attributes.insert(Decisions {
                    request: Some(Decision::of(&c)),
                    violated: f.violated(&c),
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
                    violated: 0,
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
        let input = render::Input::Response {
            status: answer.status.as_u16(),
            headers: &answer.headers,
            body: answer.body.as_deref(),
        };
        let metrics = &self.response[version as usize];
        match f.score(input).await {
            Ok((c, decider)) => {
                self.count(decider);
                metrics.score.record(c.score);
                metrics.decisions[Decision::of(&c) as usize].increment(1);
                metrics.count_violations(f.violated(&c));
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
        if let Some(decisions) = ex.attributes.get::<Decisions>() {
            let metrics = &self.request[Version::index(ex.version)];
            if let Some(d) = decisions.request {
                metrics.decisions[d as usize].increment(1);
            }
            metrics.count_violations(decisions.violated);
        }
        Ok(())
    }
}
