//! The `remote` backend: the model runs on a shared Open Inference Protocol server
//! (KServe v2: Triton, KServe, MLServer), reached over gRPC
//! (`inference.GRPCInferenceService/ModelInfer`).
//!
//! The sidecar still renders and encodes locally and forms batches (the batcher, one
//! thread per batch on the wire, `max_in_flight`); a batch becomes one `ModelInfer`
//! whose inputs are the layout's tensors as `raw_input_contents` (little-endian INT64):
//! `ids [N]` and `offsets [B]` for `hashed`, `input_ids` and `attention_mask [B, T]`
//! for `tokens`, `input [B, W]` for `bytes`. The output (`[B, P]`, FP32) is read back
//! per row, from `raw_output_contents` or `contents`. The server batches again across
//! sidecars.
//!
//! A circuit breaker keeps a dead server from costing requests their time: after
//! `breaker_failures` consecutive failed or timed-out batches it opens, and every batch
//! is refused at once for `breaker_cool_down_ms`; after that one batch (or the health
//! probe) may try, and a success closes it. While it is open the local model decides
//! when `fallback: local`, counted; otherwise `on_error` does. A health task asks
//! `ServerReady` and `ModelReady` every second; `/ready` follows it and the breaker.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram};
use tonic::transport::{Channel, Endpoint};

use super::batcher::Backend;
use super::config::RemoteConfig;
use super::encoder::Layout;
use crate::metrics::{
    REMOTE_BREAKER_STATE, REMOTE_ERRORS_TOTAL, REMOTE_FALLBACK_TOTAL, REMOTE_REQUESTS_TOTAL,
    REMOTE_SECONDS,
};

/// The protocol's messages and client, generated from `proto/grpc_predict_v2.proto`.
pub mod proto {
    tonic::include_proto!("inference");
}

use proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use proto::model_infer_request::InferInputTensor;
use proto::{ModelInferRequest, ModelInferResponse, ModelReadyRequest, ServerReadyRequest};

/// Why a batch was not scored remotely.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("the circuit to the inference server is open (it failed {0} times in a row); retrying after the cool-down")]
    Open(u32),
    #[error("the inference server did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the inference server: {0}")]
    Status(String),
    #[error("the inference server's answer: {0}")]
    Answer(String),
    #[error("the local fallback model: {0}")]
    Fallback(String),
}

impl RemoteError {
    fn kind(&self) -> &'static str {
        match self {
            RemoteError::Open(_) => "open",
            RemoteError::Timeout(_) => "timeout",
            RemoteError::Status(_) => "status",
            RemoteError::Answer(_) => "answer",
            RemoteError::Fallback(_) => "fallback",
        }
    }
}

/// The circuit's state: `acge_remote_breaker_state` 0, 1, 2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum BreakerState {
    Closed = 0,
    /// The cool-down is over: the next batch (or health probe) tries.
    HalfOpen = 1,
    Open = 2,
}

/// Consecutive failures open it; a success closes it.
pub struct Breaker {
    threshold: u32,
    cool_down: Duration,
    failures: AtomicU32,
    state: AtomicU8,
    /// When it opened, in ms since `epoch`.
    opened_ms: AtomicU64,
    epoch: Instant,
}

impl Breaker {
    pub fn new(threshold: u32, cool_down: Duration) -> Self {
        gauge!(REMOTE_BREAKER_STATE).set(0.0);
        Self {
            threshold: threshold.max(1),
            cool_down,
            failures: AtomicU32::new(0),
            state: AtomicU8::new(BreakerState::Closed as u8),
            opened_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    pub fn state(&self) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            0 => BreakerState::Closed,
            1 => BreakerState::HalfOpen,
            _ => {
                let opened = Duration::from_millis(self.opened_ms.load(Ordering::Acquire));
                if self.epoch.elapsed() >= opened + self.cool_down {
                    BreakerState::HalfOpen
                } else {
                    BreakerState::Open
                }
            }
        }
    }

    /// Whether a call may go out now: not while open (and cooling down).
    pub fn allows(&self) -> bool {
        self.state() != BreakerState::Open
    }

    pub fn success(&self) {
        self.failures.store(0, Ordering::Release);
        if self
            .state
            .swap(BreakerState::Closed as u8, Ordering::AcqRel)
            != BreakerState::Closed as u8
        {
            tracing::info!("inference server circuit closed");
            gauge!(REMOTE_BREAKER_STATE).set(0.0);
        }
    }

    pub fn failure(&self) {
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        let probing = self.state() == BreakerState::HalfOpen
            && self.state.load(Ordering::Acquire) != BreakerState::Closed as u8;
        if n >= self.threshold || probing {
            self.opened_ms
                .store(self.epoch.elapsed().as_millis() as u64, Ordering::Release);
            if self.state.swap(BreakerState::Open as u8, Ordering::AcqRel)
                != BreakerState::Open as u8
            {
                tracing::warn!(
                    failures = n,
                    cool_down_ms = self.cool_down.as_millis() as u64,
                    "inference server circuit open"
                );
            }
            gauge!(REMOTE_BREAKER_STATE).set(2.0);
        }
    }

    fn failures(&self) -> u32 {
        self.failures.load(Ordering::Acquire)
    }
}

/// What the proxy's `/ready` reads.
pub struct Health {
    /// `ServerReady` and `ModelReady` both said yes at the last probe.
    ready: AtomicBool,
    pub breaker: Breaker,
    /// A local model decides while the server cannot.
    has_fallback: bool,
    endpoint: String,
    model: String,
}

impl Health {
    /// Why the proxy should not take traffic now, if it should not. With a fallback,
    /// the local model serves while the server is away, so the pod stays ready.
    pub fn waiting_for(&self) -> Option<String> {
        if self.has_fallback {
            return None;
        }
        if !self.ready.load(Ordering::Acquire) {
            return Some(format!(
                "the inference server {} (model {}) is not ready",
                self.endpoint, self.model
            ));
        }
        if self.breaker.state() == BreakerState::Open {
            return Some(format!(
                "the circuit to the inference server {} is open",
                self.endpoint
            ));
        }
        None
    }
}

/// A local model to decide while the server cannot (`fallback: local`), shared by the
/// remote backend's threads.
pub type Fallback = Arc<Mutex<Box<dyn Backend<Error = super::meta::ModelError>>>>;

/// One batch thread's view of the server.
pub struct RemoteBackend {
    client: GrpcInferenceServiceClient<Channel>,
    runtime: tokio::runtime::Handle,
    model: String,
    version: String,
    layout: Layout,
    inputs: Vec<String>,
    output: Option<String>,
    principles: usize,
    timeout: Duration,
    health: Arc<Health>,
    fallback: Option<Fallback>,
}

impl RemoteBackend {
    /// `max_in_flight` backends over one lazily connected channel, their health, and
    /// the task that probes it (runs while the health is referenced). Call inside the
    /// tokio runtime.
    pub fn connect(
        config: &RemoteConfig,
        layout: Layout,
        principles: usize,
        fallback: Option<Fallback>,
    ) -> Result<(Vec<Self>, Arc<Health>), String> {
        let endpoint = Endpoint::from_shared(config.endpoint.clone())
            .map_err(|e| format!("remote.endpoint `{}`: {e}", config.endpoint))?
            .connect_timeout(Duration::from_millis(config.timeout_ms.max(100)))
            .tcp_nodelay(true);
        let channel = endpoint.connect_lazy();
        let client = GrpcInferenceServiceClient::new(channel);
        let inputs = config.inputs.clone().unwrap_or_else(|| match layout {
            Layout::Bytes => vec!["input".into()],
            Layout::Hashed => vec!["ids".into(), "offsets".into()],
            Layout::Tokens { .. } => vec!["input_ids".into(), "attention_mask".into()],
        });
        let want = match layout {
            Layout::Bytes => 1,
            _ => 2,
        };
        if inputs.len() != want {
            return Err(format!(
                "remote.inputs: {} names for a layout of {want} tensors",
                inputs.len()
            ));
        }
        let health = Arc::new(Health {
            ready: AtomicBool::new(false),
            breaker: Breaker::new(
                config.breaker_failures,
                Duration::from_millis(config.breaker_cool_down_ms),
            ),
            has_fallback: fallback.is_some(),
            endpoint: config.endpoint.clone(),
            model: config.model.clone(),
        });
        let runtime = tokio::runtime::Handle::current();
        runtime.spawn(probe(
            client.clone(),
            config.model.clone(),
            config.version.clone(),
            Arc::downgrade(&health),
        ));
        let backends = (0..config.max_in_flight.max(1))
            .map(|_| Self {
                client: client.clone(),
                runtime: runtime.clone(),
                model: config.model.clone(),
                version: config.version.clone(),
                layout,
                inputs: inputs.clone(),
                output: config.output.clone(),
                principles,
                timeout: Duration::from_millis(config.timeout_ms),
                health: health.clone(),
                fallback: fallback.clone(),
            })
            .collect();
        Ok((backends, health))
    }

    /// The request for a batch: the layout's tensors, raw.
    fn request(&self, batch: &[&[i64]]) -> ModelInferRequest {
        let rows = batch.len() as i64;
        let tensors: Vec<(Vec<i64>, Vec<i64>)> = match self.layout {
            Layout::Bytes => {
                let width = batch.iter().map(|i| i.len()).max().unwrap_or(0).max(1);
                vec![(padded(batch, width, 0), vec![rows, width as i64])]
            }
            Layout::Hashed => {
                let mut ids = Vec::with_capacity(batch.iter().map(|i| i.len()).sum());
                let mut offsets = Vec::with_capacity(batch.len());
                for input in batch {
                    offsets.push(ids.len() as i64);
                    ids.extend_from_slice(input);
                }
                let n = ids.len() as i64;
                vec![(ids, vec![n]), (offsets, vec![rows])]
            }
            Layout::Tokens { pad_id } => {
                let width = batch.iter().map(|i| i.len()).max().unwrap_or(0).max(1);
                let mut mask = vec![0i64; batch.len() * width];
                for (row, input) in mask.chunks_mut(width).zip(batch) {
                    row[..input.len()].fill(1);
                }
                let shape = vec![rows, width as i64];
                vec![(padded(batch, width, pad_id), shape.clone()), (mask, shape)]
            }
        };
        let mut request = ModelInferRequest {
            model_name: self.model.clone(),
            model_version: self.version.clone(),
            ..Default::default()
        };
        for ((data, shape), name) in tensors.into_iter().zip(&self.inputs) {
            request.inputs.push(InferInputTensor {
                name: name.clone(),
                datatype: "INT64".into(),
                shape,
                ..Default::default()
            });
            let mut raw = Vec::with_capacity(data.len() * 8);
            for v in data {
                raw.extend_from_slice(&v.to_le_bytes());
            }
            request.raw_input_contents.push(raw);
        }
        request
    }

    /// The `[B, P]` rows of the answer.
    fn rows(&self, answer: ModelInferResponse, batch: usize) -> Result<Vec<Vec<f32>>, RemoteError> {
        let bad = |why: String| RemoteError::Answer(why);
        let index = match &self.output {
            Some(name) => answer
                .outputs
                .iter()
                .position(|o| &o.name == name)
                .ok_or_else(|| bad(format!("no output named `{name}`")))?,
            None if answer.outputs.is_empty() => return Err(bad("no output".into())),
            None => 0,
        };
        let out = &answer.outputs[index];
        if out.datatype != "FP32" {
            return Err(bad(format!(
                "output `{}` is {}, not FP32",
                out.name, out.datatype
            )));
        }
        let want = [batch as i64, self.principles as i64];
        if out.shape != want {
            return Err(bad(format!(
                "output `{}` has shape {:?}, not {want:?} (batch, principles)",
                out.name, out.shape
            )));
        }
        let values: Vec<f32> = match answer.raw_output_contents.get(index) {
            Some(raw) => raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            None => out
                .contents
                .as_ref()
                .map(|c| c.fp32_contents.clone())
                .unwrap_or_default(),
        };
        if values.len() != batch * self.principles {
            return Err(bad(format!(
                "{} values for {batch} rows of {} principles",
                values.len(),
                self.principles
            )));
        }
        Ok(values
            .chunks(self.principles)
            .map(<[f32]>::to_vec)
            .collect())
    }

    fn call(&mut self, batch: &[&[i64]]) -> Result<Vec<Vec<f32>>, RemoteError> {
        let breaker = &self.health.breaker;
        if !breaker.allows() {
            return Err(RemoteError::Open(breaker.failures()));
        }
        let request = self.request(batch);
        let started = Instant::now();
        let mut client = self.client.clone();
        let timeout = self.timeout;
        let answer = self.runtime.block_on(async move {
            let mut request = tonic::Request::new(request);
            request.set_timeout(timeout);
            tokio::time::timeout(timeout, client.model_infer(request)).await
        });
        histogram!(REMOTE_SECONDS).record(started.elapsed().as_secs_f64());
        let result = match answer {
            Err(_) => Err(RemoteError::Timeout(timeout)),
            Ok(Err(status)) if status.code() == tonic::Code::DeadlineExceeded => {
                Err(RemoteError::Timeout(timeout))
            }
            Ok(Err(status)) => Err(RemoteError::Status(format!(
                "{:?}: {}",
                status.code(),
                status.message()
            ))),
            Ok(Ok(answer)) => self.rows(answer.into_inner(), batch.len()),
        };
        match &result {
            Ok(_) => breaker.success(),
            Err(_) => breaker.failure(),
        }
        result
    }
}

fn padded(batch: &[&[i64]], width: usize, pad: i64) -> Vec<i64> {
    let mut out = vec![pad; batch.len() * width];
    for (row, input) in out.chunks_mut(width).zip(batch) {
        row[..input.len()].copy_from_slice(input);
    }
    out
}

impl Backend for RemoteBackend {
    type Error = RemoteError;

    fn infer(&mut self, batch: &[&[i64]]) -> Result<Vec<Vec<f32>>, RemoteError> {
        match self.call(batch) {
            Ok(rows) => {
                counter!(REMOTE_REQUESTS_TOTAL, "result" => "ok").increment(1);
                Ok(rows)
            }
            Err(e) => {
                counter!(REMOTE_REQUESTS_TOTAL, "result" => "error").increment(1);
                counter!(REMOTE_ERRORS_TOTAL, "kind" => e.kind()).increment(1);
                let Some(fallback) = &self.fallback else {
                    return Err(e);
                };
                counter!(REMOTE_FALLBACK_TOTAL).increment(1);
                let mut local = fallback.lock().unwrap_or_else(|p| p.into_inner());
                local
                    .infer(batch)
                    .map_err(|f| RemoteError::Fallback(f.to_string()))
            }
        }
    }
}

/// Asks `ServerReady` and `ModelReady` every second while `health` lives. A server
/// that answers both after the breaker's cool-down closes the circuit, so that a
/// restarted server is taken back even before traffic tries it.
async fn probe(
    client: GrpcInferenceServiceClient<Channel>,
    model: String,
    version: String,
    health: std::sync::Weak<Health>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(health) = health.upgrade() else {
            return;
        };
        let mut c = client.clone();
        let asked = tokio::time::timeout(Duration::from_secs(1), async {
            let server = c
                .server_ready(ServerReadyRequest {})
                .await?
                .into_inner()
                .ready;
            let model = c
                .model_ready(ModelReadyRequest {
                    name: model.clone(),
                    version: version.clone(),
                })
                .await?
                .into_inner()
                .ready;
            Ok::<_, tonic::Status>(server && model)
        })
        .await;
        let ready = matches!(asked, Ok(Ok(true)));
        if health.ready.swap(ready, Ordering::AcqRel) != ready {
            tracing::info!(ready, endpoint = %health.endpoint, model = %health.model, "inference server readiness");
        }
        if ready && health.breaker.state() == BreakerState::HalfOpen {
            health.breaker.success();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_breaker_opens_after_consecutive_failures_and_a_success_closes_it() {
        let b = Breaker::new(3, Duration::from_millis(50));
        b.failure();
        b.failure();
        b.success();
        b.failure();
        b.failure();
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "a success in between resets the count"
        );
        b.failure();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.allows());
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.allows(), "one probe may go after the cool-down");
        b.failure();
        assert_eq!(
            b.state(),
            BreakerState::Open,
            "a failed probe opens it again at once"
        );
        std::thread::sleep(Duration::from_millis(60));
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
