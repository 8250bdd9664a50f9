//! Dynamic batching with Triton's semantics: a batch goes to the model when it holds
//! `max_batch` items, or when its oldest item has waited `max_delay`, whichever comes
//! first. The model is owned by one dedicated thread; callers wait on a oneshot.
//!
//! The queue is bounded: a full queue is an immediate [`InferError::QueueFull`] (the
//! acge filter's `on_error` decides what that means), never an unbounded wait. Each item
//! has a deadline; an item still queued past it is answered with
//! [`InferError::Timeout`] and not computed.

use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

/// What runs a batch: the libtorch engine, or a stand-in in tests.
pub trait Backend: Send + 'static {
    type Error: std::error::Error;

    /// Called once on the inference thread before its first batch (per-thread settings
    /// such as libtorch's intra-op thread count).
    fn start(&mut self) {}

    /// Scores a batch of inputs (each the row an [`super::encoder::Encoder`] made;
    /// lengths differ, the backend lays them out). Returns one row of P probabilities
    /// per input.
    fn infer(&mut self, batch: &[&[i64]]) -> Result<Vec<Vec<f32>>, Self::Error>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatcherConfig {
    pub max_batch: usize,
    pub max_delay: Duration,
    pub queue: usize,
    pub timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InferError {
    #[error("the inference queue is full")]
    QueueFull,
    /// The input could not be made (a tokenizer's error).
    #[error("{0}")]
    Input(String),
    #[error("no result within {0:?}")]
    Timeout(Duration),
    /// The backend's error, rendered once: every item of the failed batch gets it.
    #[error("the model failed: {0}")]
    Engine(String),
    #[error("the inference thread has stopped")]
    Stopped,
}

impl InferError {
    /// The `kind` label of `acge_inference_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            InferError::QueueFull => "queue_full",
            InferError::Input(_) => "input",
            InferError::Timeout(_) => "timeout",
            InferError::Engine(_) => "engine",
            InferError::Stopped => "stopped",
        }
    }
}

struct Job {
    input: Vec<i64>,
    enqueued: Instant,
    deadline: Instant,
    reply: oneshot::Sender<Result<Vec<f32>, InferError>>,
}

/// Observations the batcher reports, so that the caller owns the metric names.
pub trait BatchObserver: Send + 'static {
    fn batch(&self, _size: usize, _queue_waits: &[Duration], _inference: Duration) {}
    fn error(&self, _e: &InferError) {}
}

/// An observer that records nothing.
pub struct NoObserver;
impl BatchObserver for NoObserver {}

pub struct Batcher {
    tx: SyncSender<Job>,
    timeout: Duration,
}

impl Batcher {
    /// Starts the inference thread (`acge-{name}`), which owns `backend` until the
    /// batcher is dropped.
    pub fn spawn<B: Backend, O: BatchObserver>(
        name: &str,
        backend: B,
        config: BatcherConfig,
        observer: O,
    ) -> std::io::Result<Self> {
        Self::spawn_workers(name, vec![(backend, observer)], config)
    }

    /// As [`Batcher::spawn`], with one thread per backend, all taking batches from the
    /// one queue: for a backend whose batches wait on the network, so that several are
    /// on the wire at once (`remote.max_in_flight`). A thread forms its batch holding
    /// the queue, then lets it go before it runs the batch.
    pub fn spawn_many<B: Backend, O: BatchObserver + Clone>(
        name: &str,
        backends: Vec<B>,
        config: BatcherConfig,
        observer: O,
    ) -> std::io::Result<Self> {
        let workers = backends
            .into_iter()
            .map(|b| (b, observer.clone()))
            .collect();
        Self::spawn_workers(name, workers, config)
    }

    /// One thread per worker (`acge-{name}`, numbered when there are several), all
    /// taking batches from one queue.
    fn spawn_workers<B: Backend, O: BatchObserver>(
        name: &str,
        workers: Vec<(B, O)>,
        config: BatcherConfig,
    ) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::sync_channel(config.queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        let many = workers.len() > 1;
        for (i, (backend, observer)) in workers.into_iter().enumerate() {
            let rx = rx.clone();
            let thread = if many {
                format!("acge-{name}-{i}")
            } else {
                format!("acge-{name}")
            };
            std::thread::Builder::new()
                .name(thread)
                .spawn(move || run(backend, config, observer, rx))?;
        }
        Ok(Self {
            tx,
            timeout: config.timeout,
        })
    }

    /// Queues one input and waits for its row of probabilities.
    pub async fn infer(&self, input: Vec<i64>) -> Result<Vec<f32>, InferError> {
        let (reply, wait) = oneshot::channel();
        let now = Instant::now();
        let job = Job {
            input,
            enqueued: now,
            deadline: now + self.timeout,
            reply,
        };
        match self.tx.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(InferError::QueueFull),
            Err(TrySendError::Disconnected(_)) => return Err(InferError::Stopped),
        }
        match tokio::time::timeout(self.timeout, wait).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(InferError::Stopped),
            Err(_) => Err(InferError::Timeout(self.timeout)),
        }
    }
}

fn run<B: Backend, O: BatchObserver>(
    mut backend: B,
    config: BatcherConfig,
    observer: O,
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
) {
    backend.start();
    let max_batch = config.max_batch.max(1);
    let mut batch: Vec<Job> = Vec::with_capacity(max_batch);
    loop {
        // Uncontended with one thread; with several, one forms its batch at a time.
        let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
        let Ok(first) = rx.recv() else { return };
        let closes_at = first.enqueued + config.max_delay;
        batch.push(first);
        while batch.len() < max_batch {
            let now = Instant::now();
            if now >= closes_at {
                // Whatever is already queued still fits without waiting.
                match rx.try_recv() {
                    Ok(job) => {
                        batch.push(job);
                        continue;
                    }
                    Err(_) => break,
                }
            }
            match rx.recv_timeout(closes_at - now) {
                Ok(job) => batch.push(job),
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        drop(rx);
        let started = Instant::now();
        let (live, expired): (Vec<Job>, Vec<Job>) =
            batch.drain(..).partition(|j| j.deadline > started);
        for job in expired {
            let e = InferError::Timeout(config.timeout);
            observer.error(&e);
            let _ = job.reply.send(Err(e));
        }
        if live.is_empty() {
            continue;
        }
        let waits: Vec<Duration> = live.iter().map(|j| started - j.enqueued).collect();
        let inputs: Vec<&[i64]> = live.iter().map(|j| j.input.as_slice()).collect();
        let result = backend.infer(&inputs);
        observer.batch(live.len(), &waits, started.elapsed());
        match result {
            Ok(rows) if rows.len() == live.len() => {
                for (job, row) in live.into_iter().zip(rows) {
                    let _ = job.reply.send(Ok(row));
                }
            }
            Ok(rows) => {
                let e = InferError::Engine(format!(
                    "{} rows for a batch of {}",
                    rows.len(),
                    live.len()
                ));
                fail_all(live, e, &observer);
            }
            Err(e) => fail_all(live, InferError::Engine(e.to_string()), &observer),
        }
    }
}

fn fail_all<O: BatchObserver>(jobs: Vec<Job>, e: InferError, observer: &O) {
    for job in jobs {
        observer.error(&e);
        let _ = job.reply.send(Err(e.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scores each input as its length / 100 and remembers batch sizes.
    struct Fake {
        sizes: Arc<Mutex<Vec<usize>>>,
        delay: Duration,
        fail: bool,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("{0}")]
    struct Boom(&'static str);

    impl Backend for Fake {
        type Error = Boom;

        fn infer(&mut self, batch: &[&[i64]]) -> Result<Vec<Vec<f32>>, Boom> {
            self.sizes.lock().unwrap().push(batch.len());
            std::thread::sleep(self.delay);
            if self.fail {
                return Err(Boom("boom"));
            }
            Ok(batch.iter().map(|i| vec![i.len() as f32 / 100.0]).collect())
        }
    }

    fn batcher(
        max_batch: usize,
        max_delay_ms: u64,
        queue: usize,
        delay_ms: u64,
        fail: bool,
    ) -> (Arc<Batcher>, Arc<Mutex<Vec<usize>>>) {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let fake = Fake {
            sizes: sizes.clone(),
            delay: Duration::from_millis(delay_ms),
            fail,
        };
        let config = BatcherConfig {
            max_batch,
            max_delay: Duration::from_millis(max_delay_ms),
            queue,
            timeout: Duration::from_millis(500),
        };
        (
            Arc::new(Batcher::spawn("test", fake, config, NoObserver).unwrap()),
            sizes,
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_items_share_batches_and_get_their_own_results() {
        let (b, sizes) = batcher(8, 20, 64, 0, false);
        let mut tasks = Vec::new();
        for n in 0..32usize {
            let b = b.clone();
            tasks.push(tokio::spawn(async move {
                (n, b.infer(vec![1; n]).await.unwrap())
            }));
        }
        for t in tasks {
            let (n, row) = t.await.unwrap();
            assert_eq!(row, vec![n as f32 / 100.0]);
        }
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 32);
        assert!(sizes.iter().all(|s| *s <= 8), "{sizes:?}");
        assert!(sizes.iter().any(|s| *s > 1), "batched: {sizes:?}");
    }

    #[tokio::test]
    async fn a_lone_item_waits_at_most_max_delay() {
        let (b, sizes) = batcher(64, 30, 64, 0, false);
        let t = Instant::now();
        b.infer(vec![1, 2]).await.unwrap();
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(30) && waited < Duration::from_millis(400),
            "{waited:?}"
        );
        assert_eq!(sizes.lock().unwrap().as_slice(), &[1]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_is_refused_at_once_and_slow_items_time_out() {
        // The model takes 300 ms a batch of one: the queue of 2 fills behind it.
        let (b, _) = batcher(1, 0, 2, 300, false);
        let mut tasks = Vec::new();
        for _ in 0..6 {
            let b = b.clone();
            tasks.push(tokio::spawn(async move { b.infer(vec![1]).await }));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.unwrap());
        }
        assert!(results.contains(&Err(InferError::QueueFull)), "{results:?}");
        assert!(
            results
                .iter()
                .any(|r| matches!(r, Err(InferError::Timeout(_)))),
            "{results:?}"
        );
        assert!(results.iter().any(|r| r.is_ok()), "{results:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn engine_errors_reach_every_item_of_the_batch() {
        // Four callers inside one 200 ms batching window: one batch of four, which fails.
        let (b, sizes) = batcher(4, 200, 8, 0, true);
        let mut tasks = Vec::new();
        for n in 1..=4usize {
            let b = b.clone();
            tasks.push(tokio::spawn(async move { b.infer(vec![1; n]).await }));
        }
        for t in tasks {
            assert_eq!(
                t.await.unwrap(),
                Err(InferError::Engine("boom".into())),
                "every item of the failed batch gets the engine's error"
            );
        }
        assert_eq!(
            sizes.lock().unwrap().as_slice(),
            &[4],
            "the four items were one batch"
        );
    }
}
