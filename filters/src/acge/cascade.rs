//! The two-stage cascade: every item is scored by the fast model; an item whose highest
//! violation probability falls inside the band (`lo ≤ p ≤ hi`) is scored again by the
//! second model, batched on its own engine and thread, and the second model decides.
//!
//! The second stage is a help, never a gate: when its queue is full (`max_queue`), or
//! it times out or fails, the fast verdict stands (`second_skipped`), so an overloaded
//! encoder costs accuracy on the uncertain items, not availability. Without a second
//! stage the cascade is the fast model alone.

use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, histogram};

use super::batcher::{Backend, BatchObserver, Batcher, BatcherConfig, InferError};
use super::encoder::Encoder;
use crate::metrics::{
    INFERENCE_BATCH_SIZE, INFERENCE_ERRORS_TOTAL, INFERENCE_QUEUE_SECONDS, INFERENCE_SECONDS,
};

/// Which stage decided an item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decider {
    /// The fast model, its score outside the band (or no second stage).
    Fast,
    /// The second model.
    Second,
    /// The fast model, its score inside the band, the second model unavailable.
    SecondSkipped,
}

impl Decider {
    /// The `stage` label of `acge_cascade_total` and the audit record's `acge_stage`.
    pub fn as_str(self) -> &'static str {
        match self {
            Decider::Fast => "fast",
            Decider::Second => "second",
            Decider::SecondSkipped => "second_skipped",
        }
    }

    pub const ALL: [Decider; 3] = [Decider::Fast, Decider::Second, Decider::SecondSkipped];
}

/// A score and who gave it.
#[derive(Debug, Clone)]
pub struct Scored {
    /// Violation probability per principle.
    pub row: Arc<[f32]>,
    pub decider: Decider,
    /// The deciding model's threshold per principle (column).
    pub thresholds: Arc<[f64]>,
}

/// The probabilities, inclusive, that send an item to the second model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Band {
    pub lo: f32,
    pub hi: f32,
}

impl Band {
    pub fn contains(&self, p: f32) -> bool {
        self.lo <= p && p <= self.hi
    }
}

/// One model behind its batcher, with the encoder that makes its input.
pub struct Stage {
    name: &'static str,
    batcher: Batcher,
    encoder: Encoder,
    thresholds: Arc<[f64]>,
}

impl Stage {
    /// Starts the stage's inference thread (`acge-fast` or `acge-second`).
    pub fn spawn<B: Backend>(
        name: &'static str,
        backend: B,
        encoder: Encoder,
        thresholds: Vec<f64>,
        config: BatcherConfig,
    ) -> std::io::Result<Self> {
        Self::spawn_many(name, vec![backend], encoder, thresholds, config)
    }

    /// A stage whose batches run on several threads, one backend each, from one queue
    /// ([`Batcher::spawn_many`]): the remote backend's `max_in_flight`.
    pub fn spawn_many<B: Backend>(
        name: &'static str,
        backends: Vec<B>,
        encoder: Encoder,
        thresholds: Vec<f64>,
        config: BatcherConfig,
    ) -> std::io::Result<Self> {
        Ok(Self {
            name,
            batcher: Batcher::spawn_many(name, backends, config, Observer::new(name))?,
            encoder,
            thresholds: thresholds.into(),
        })
    }

    /// Encodes the rendering (on the caller's thread) and waits for the model's row.
    pub async fn infer(&self, rendering: &[u8]) -> Result<Vec<f32>, InferError> {
        let result = match self.encoder.encode(rendering) {
            Ok(input) => self.batcher.infer(input).await,
            Err(reason) => Err(InferError::Input(reason)),
        };
        // The inference thread counts what it saw (timeouts, engine errors); what never
        // reached it is counted here.
        if let Err(e @ (InferError::QueueFull | InferError::Input(_))) = &result {
            counter!(INFERENCE_ERRORS_TOTAL, "stage" => self.name, "kind" => e.kind()).increment(1);
        }
        result
    }

    pub fn encoder(&self) -> &Encoder {
        &self.encoder
    }
}

pub struct Cascade {
    fast: Stage,
    second: Option<(Stage, Band)>,
}

impl Cascade {
    pub fn new(fast: Stage, second: Option<(Stage, Band)>) -> Self {
        Self { fast, second }
    }

    pub fn has_second(&self) -> bool {
        self.second.is_some()
    }

    /// Scores one rendering through the stages.
    pub async fn score(&self, rendering: &[u8]) -> Result<Scored, InferError> {
        let row = self.fast.infer(rendering).await?;
        let fast = |decider| Scored {
            row: row.as_slice().into(),
            decider,
            thresholds: self.fast.thresholds.clone(),
        };
        let Some((second, band)) = &self.second else {
            return Ok(fast(Decider::Fast));
        };
        let worst = row.iter().copied().fold(0.0f32, f32::max);
        if !band.contains(worst) {
            return Ok(fast(Decider::Fast));
        }
        match second.infer(rendering).await {
            Ok(row) => Ok(Scored {
                row: row.into(),
                decider: Decider::Second,
                thresholds: second.thresholds.clone(),
            }),
            // Counted under acge_inference_errors_total{stage="second"}.
            Err(_) => Ok(fast(Decider::SecondSkipped)),
        }
    }
}

/// Records a stage's batches under the `acge_inference_*` names, labelled by stage.
#[derive(Clone)]
struct Observer {
    stage: &'static str,
    batch: metrics::Histogram,
    seconds: metrics::Histogram,
    queue: metrics::Histogram,
}

impl Observer {
    fn new(stage: &'static str) -> Self {
        Self {
            stage,
            batch: histogram!(INFERENCE_BATCH_SIZE, "stage" => stage),
            seconds: histogram!(INFERENCE_SECONDS, "stage" => stage),
            queue: histogram!(INFERENCE_QUEUE_SECONDS, "stage" => stage),
        }
    }
}

impl BatchObserver for Observer {
    fn batch(&self, size: usize, queue_waits: &[Duration], inference: Duration) {
        self.batch.record(size as f64);
        self.seconds.record(inference.as_secs_f64());
        for w in queue_waits {
            self.queue.record(w.as_secs_f64());
        }
    }
    fn error(&self, e: &InferError) {
        counter!(INFERENCE_ERRORS_TOTAL, "stage" => self.stage, "kind" => e.kind()).increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_band_is_inclusive() {
        let b = Band { lo: 0.2, hi: 0.8 };
        assert!(b.contains(0.2) && b.contains(0.8) && b.contains(0.5));
        assert!(!b.contains(0.19) && !b.contains(0.81));
        let all = Band { lo: 0.0, hi: 1.0 };
        assert!(all.contains(0.0) && all.contains(1.0));
    }
}
