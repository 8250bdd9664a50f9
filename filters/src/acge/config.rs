//! The `acge` filter's settings (`filters.acge` in the config), their defaults and the
//! checks of their values. docs/config.md is the reference.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{DeviceChoice, Precision};

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
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Request => "request",
            Phase::Response => "response",
        }
    }
}

/// The largest batch a model may be given (a GPU's; 256 is plenty on a CPU).
pub const MAX_BATCH: usize = 1024;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcgeConfig {
    /// The model directory (model.json and the TorchScript file): the fast model when
    /// a `second` stage is set.
    pub model: PathBuf,
    #[serde(default)]
    pub mode: AcgeMode,
    #[serde(default = "defaults::on")]
    pub on: Vec<Phase>,
    /// Overrides the models' own thresholds.
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
    pub device: DeviceChoice,
    /// Default bf16 on CUDA, fp32 on the CPU.
    #[serde(default)]
    pub precision: Option<Precision>,
    /// libtorch intra-op threads of this model's inference thread; default
    /// [`default_threads`].
    #[serde(default)]
    pub threads: Option<usize>,
    /// Request and response headers the model reads, in this order.
    #[serde(default = "defaults::headers")]
    pub headers: Vec<String>,
    #[serde(default = "defaults::cache_entries")]
    pub cache_entries: usize,
    #[serde(default = "defaults::cache_ttl_ms")]
    pub cache_ttl_ms: u64,
    /// A second, stronger model for the items the first one is unsure of.
    #[serde(default)]
    pub second: Option<SecondConfig>,
    /// Score on a shared Open Inference Protocol server (Triton, KServe, MLServer)
    /// instead of in process. `model` still names the model's directory: its
    /// `model.json` (and tokenizer) make the input here; its TorchScript file is loaded
    /// only as the `fallback`.
    #[serde(default)]
    pub remote: Option<RemoteConfig>,
}

/// The `remote` backend: gRPC `inference.GRPCInferenceService/ModelInfer`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteConfig {
    /// `http://host:port` of the server's gRPC listener.
    pub endpoint: String,
    /// The model's name on the server.
    pub model: String,
    /// Its version; empty for the server's choice.
    #[serde(default)]
    pub version: String,
    /// Per batch, the call's deadline.
    #[serde(default = "defaults::remote_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "defaults::max_batch")]
    pub max_batch: usize,
    #[serde(default = "defaults::max_delay_us")]
    pub max_delay_us: u64,
    /// Batches on the wire at once.
    #[serde(default = "defaults::remote_in_flight")]
    pub max_in_flight: usize,
    /// Names of the input tensors, in the layout's order (`ids, offsets` for `hashed`,
    /// `input_ids, attention_mask` for `tokens`, `input` for `bytes`); Triton's
    /// TorchScript backend wants `INPUT__0, INPUT__1`.
    #[serde(default)]
    pub inputs: Option<Vec<String>>,
    /// The output tensor to read (`[B, P]`, FP32); the first when absent.
    #[serde(default)]
    pub output: Option<String>,
    /// Consecutive failed (or timed-out) batches that open the circuit.
    #[serde(default = "defaults::breaker_failures")]
    pub breaker_failures: u32,
    /// How long an open circuit refuses at once before a probe may close it.
    #[serde(default = "defaults::breaker_cool_down_ms")]
    pub breaker_cool_down_ms: u64,
    /// `local`: while the circuit is open (or a call fails) the local TorchScript model
    /// in `model` decides, counted; `none`: `on_error` decides.
    #[serde(default)]
    pub fallback: Fallback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    #[default]
    None,
    Local,
}

/// The cascade's second stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecondConfig {
    pub model: PathBuf,
    /// `[lo, hi]`: items whose highest violation probability from the fast model is
    /// within it (inclusive) go to this model; `[0, 1]` sends every item.
    pub band: [f64; 2],
    /// Items waiting for this model at most; beyond it the fast verdict stands.
    #[serde(default = "defaults::second_queue")]
    pub max_queue: usize,
    #[serde(default = "defaults::second_max_batch")]
    pub max_batch: usize,
    #[serde(default = "defaults::second_max_delay_us")]
    pub max_delay_us: u64,
    /// Beyond it the fast verdict stands.
    #[serde(default = "defaults::second_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default)]
    pub device: DeviceChoice,
    #[serde(default)]
    pub precision: Option<Precision>,
    #[serde(default)]
    pub threads: Option<usize>,
}

mod defaults {
    pub fn remote_timeout_ms() -> u64 {
        250
    }
    pub fn remote_in_flight() -> usize {
        4
    }
    pub fn breaker_failures() -> u32 {
        5
    }
    pub fn breaker_cool_down_ms() -> u64 {
        5_000
    }
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
        super::DEFAULT_HEADERS
            .iter()
            .map(|h| h.to_string())
            .collect()
    }
    pub fn cache_entries() -> usize {
        10_000
    }
    pub fn cache_ttl_ms() -> u64 {
        300_000
    }
    pub fn second_queue() -> usize {
        256
    }
    pub fn second_max_batch() -> usize {
        16
    }
    pub fn second_max_delay_us() -> u64 {
        2_000
    }
    pub fn second_timeout_ms() -> u64 {
        500
    }
}

/// The headers a model reads unless the config says otherwise: the constitution the
/// caller claims, what the body is, and who asks: identity, role, tenant and the
/// scopes a gateway forwards, since what a request may do depends on who sends it.
pub const DEFAULT_HEADERS: &[&str] = &[
    "x-constitutional-hash",
    "content-type",
    "x-user-id",
    "x-user-role",
    "x-user-roles",
    "x-tenant",
    "x-tenant-id",
    "x-scopes",
    "x-service-account",
    "x-on-behalf-of",
];

/// Intra-op threads an engine gets when its config names none: the machine's cores
/// (as the cgroup limits them) less one for the data plane, shared among the engines,
/// at least one each. On two cores: one each.
pub fn default_threads(engines: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores.saturating_sub(1) / engines.max(1)).max(1)
}

impl AcgeConfig {
    /// The values' problems, each as (field path under `filters.acge`, why).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut say = |path: &str, why: String| out.push((path.to_string(), why));
        if !(1..=MAX_BATCH).contains(&self.max_batch) {
            say(
                "max_batch",
                format!("{} is outside 1–{MAX_BATCH}", self.max_batch),
            );
        }
        if self.queue == 0 {
            say("queue", "must be at least 1".into());
        }
        if self.timeout_ms == 0 {
            say("timeout_ms", "must be at least 1".into());
        }
        if self.on.is_empty() {
            say("on", "list request, response or both".into());
        }
        if let Some(t) = self.threshold.filter(|t| !(0.0..=1.0).contains(t)) {
            say("threshold", format!("{t} is not a probability (0–1)"));
        }
        for (i, h) in self.headers.iter().enumerate() {
            if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                say(
                    &format!("headers[{i}]"),
                    format!("`{h}` is not a header name"),
                );
            }
        }
        engine_problems("", self.device, self.precision, self.threads, &mut say);
        if let Some(r) = &self.remote {
            match http::Uri::try_from(r.endpoint.as_str()) {
                Ok(u)
                    if matches!(u.scheme_str(), Some("http" | "https"))
                        && u.authority().is_some() => {}
                _ => say(
                    "remote.endpoint",
                    format!("`{}` is not an http(s)://host:port address", r.endpoint),
                ),
            }
            if r.model.is_empty() {
                say("remote.model", "must name the model on the server".into());
            }
            if !(1..=MAX_BATCH).contains(&r.max_batch) {
                say(
                    "remote.max_batch",
                    format!("{} is outside 1–{MAX_BATCH}", r.max_batch),
                );
            }
            for (field, value) in [
                ("remote.timeout_ms", r.timeout_ms),
                ("remote.max_in_flight", r.max_in_flight as u64),
                ("remote.breaker_failures", u64::from(r.breaker_failures)),
            ] {
                if value == 0 {
                    say(field, "must be at least 1".into());
                }
            }
            if self.second.is_some() {
                say(
                    "remote",
                    "a remote backend and a `second` stage cannot be combined yet: serve the cascade's model remotely".into(),
                );
            }
        }
        if let Some(s) = &self.second {
            let [lo, hi] = s.band;
            if !(0.0..=1.0).contains(&lo) || !(0.0..=1.0).contains(&hi) || lo > hi {
                say(
                    "second.band",
                    format!("[{lo}, {hi}] is not a band of probabilities (0 ≤ lo ≤ hi ≤ 1)"),
                );
            }
            if s.max_queue == 0 {
                say("second.max_queue", "must be at least 1".into());
            }
            if !(1..=MAX_BATCH).contains(&s.max_batch) {
                say(
                    "second.max_batch",
                    format!("{} is outside 1–{MAX_BATCH}", s.max_batch),
                );
            }
            if s.timeout_ms == 0 {
                say("second.timeout_ms", "must be at least 1".into());
            }
            engine_problems("second.", s.device, s.precision, s.threads, &mut say);
        }
        out
    }
}

fn engine_problems(
    prefix: &str,
    device: DeviceChoice,
    precision: Option<Precision>,
    threads: Option<usize>,
    say: &mut impl FnMut(&str, String),
) {
    if device == DeviceChoice::Cpu && precision == Some(Precision::Fp16) {
        say(
            &format!("{prefix}precision"),
            "fp16 needs device cuda; on the CPU use fp32 (the default) or bf16".into(),
        );
    }
    if threads == Some(0) {
        say(&format!("{prefix}threads"), "must be at least 1".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: serde_json::Value) -> AcgeConfig {
        serde_json::from_value(yaml).unwrap()
    }

    #[test]
    fn defaults_read_who_asks() {
        let c = config(serde_json::json!({"model": "m"}));
        for h in [
            "x-user-id",
            "x-user-role",
            "x-tenant",
            "x-constitutional-hash",
        ] {
            assert!(c.headers.iter().any(|x| x == h), "{h}");
        }
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        assert!(c.second.is_none());
    }

    #[test]
    fn bad_values_are_named() {
        let c = config(serde_json::json!({
            "model": "m", "max_batch": 4096, "device": "cpu", "precision": "fp16", "threads": 0,
            "second": {"model": "e", "band": [0.8, 0.2], "max_queue": 0, "precision": "fp16", "device": "cpu"}
        }));
        let fields: Vec<String> = c.problems().into_iter().map(|(f, _)| f).collect();
        assert_eq!(
            fields,
            [
                "max_batch",
                "precision",
                "threads",
                "second.band",
                "second.max_queue",
                "second.precision"
            ]
        );
    }

    #[test]
    fn default_threads_leave_a_core() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(default_threads(1) >= 1);
        if cores > 1 {
            assert!(default_threads(1) < cores);
            assert!(2 * default_threads(2) < cores || default_threads(2) == 1);
        }
    }
}
