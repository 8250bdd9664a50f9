//! The audit log writer: one thread owns the files, appends records in batches, keeps
//! the Merkle frontier, signs checkpoints, and rotates segments.
//!
//! Durability by `commit` mode:
//! - `sync`: [`AuditLog::append`] returns once the record's segment is fsynced. One
//!   fsync covers every record of a batch (group commit). A record that was answered
//!   survives `kill -9` and power loss (as far as the disk honours fsync).
//! - `async`: `append` returns once the record is queued. The writer writes it to the
//!   OS within one batch and fsyncs at every checkpoint. `kill -9` loses what was still
//!   queued (at most `queue` records); power loss also loses what was written since the
//!   last checkpoint. A full queue makes `append` wait: nothing is dropped.
//!
//! Checkpoints are signed notes (`note.rs`) appended to the segment itself, in the
//! stream of records: after every `checkpoint_every` records (a batch never crosses
//! one), every `checkpoint_interval_ms`, before each rotation, at start when records are
//! unsigned, and at clean shutdown. The records a checkpoint covers are fsynced before
//! it is written. Deleting checkpoints therefore means deleting frames between records,
//! and the unsigned tail is at most `checkpoint_every` records (signed into each
//! checkpoint as its `bound`). Logs from before (checkpoints in `checkpoints.log`) are
//! read and continued: their old checkpoints still count, new ones go inline.
//!
//! On start the log is scanned: a torn final frame (a crash mid-write) is reported and
//! cut off; any other damage stops the start, since cutting it would lose committed
//! records.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::merkle::{leaf_hash, Frontier};
use super::note::{self, TreeHead};
use super::segment::{
    entry, frame, read_frames, segment_name, segments, AuditRecord, Checkpoint, Entry,
    CHECKPOINTS_FILE, DEFAULT_KEY_FILE, PUBLIC_KEY_FILE, VERIFIER_KEY_FILE,
};
use crate::metrics::{AUDIT_COMMIT_SECONDS, AUDIT_QUEUE_DEPTH, AUDIT_RECORDS_TOTAL};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CommitMode {
    #[default]
    Sync,
    Async,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Directory of the segments, the checkpoints and the public key.
    pub dir: PathBuf,
    #[serde(default)]
    pub commit: CommitMode,
    /// Sign a checkpoint after this many records…
    #[serde(default = "defaults::checkpoint_every")]
    pub checkpoint_every: u64,
    /// …or this long after the last one, whichever comes first.
    #[serde(default = "defaults::checkpoint_interval_ms")]
    pub checkpoint_interval_ms: u64,
    /// A segment is closed and the next begun past this size.
    #[serde(default = "defaults::segment_bytes")]
    pub segment_bytes: u64,
    /// Records waiting for the writer; a full queue makes requests wait.
    #[serde(default = "defaults::queue")]
    pub queue: usize,
    /// The ed25519 signing key (hex seed), created with mode 0600 if absent. Default
    /// `DIR/audit.key`; in production keep it apart from the log (a Secret mount).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The log's name in its signed checkpoints (and the key's); default
    /// `acge-proxy.audit/<the first 16 hex digits of the public key's SHA-256>`.
    #[serde(default)]
    pub origin: Option<String>,
}

mod defaults {
    pub fn checkpoint_every() -> u64 {
        1000
    }
    pub fn checkpoint_interval_ms() -> u64 {
        1000
    }
    pub fn segment_bytes() -> u64 {
        64 * 1024 * 1024
    }
    pub fn queue() -> usize {
        8192
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("audit log {path}: {reason}; run `acge-proxy audit verify` and restore the log before starting")]
    Damaged { path: String, reason: String },
    #[error("audit signing key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("the audit writer has stopped")]
    Stopped,
    #[error("the audit log could not write: {0}")]
    Write(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuditError + '_ {
    move |source| AuditError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What opening the log found.
#[derive(Debug, Clone)]
pub struct OpenReport {
    pub records: u64,
    pub segments: usize,
    /// A torn final record that was cut off, described.
    pub cut: Option<String>,
    /// Another process holds the log; it opens when that one closes it (the figures
    /// above are then not known yet).
    pub waiting: bool,
}

/// The file whose exclusive lock the writer holds.
pub const LOCK_FILE: &str = "LOCK";

enum Msg {
    Append {
        record: Box<AuditRecord>,
        enqueued: Instant,
        done: Option<oneshot::Sender<Result<u64, String>>>,
    },
    Close(oneshot::Sender<()>),
}

/// The handle the audit filter appends through.
pub struct AuditLog {
    tx: mpsc::Sender<Msg>,
    mode: CommitMode,
    dir: PathBuf,
    /// Set by the writer while its writes fail, cleared by the next one that succeeds.
    failing: Arc<AtomicBool>,
    /// The latest signed checkpoint (a note), for `GET /audit/checkpoint`.
    latest: Arc<std::sync::Mutex<Option<String>>>,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl AuditLog {
    /// Opens (or creates) the log in `config.dir` and starts its writer thread.
    ///
    /// The log has one writer: the writer holds an exclusive lock on `dir/LOCK` while
    /// it runs. When another process holds it (the old process of a takeover, still
    /// draining), the log opens *waiting*: appends queue (and, past `queue`, wait) until
    /// the other writer closes the log, and then this one reads the log's end and goes
    /// on from it, so the chain stays one chain. The report says `waiting`.
    pub fn open(config: &AuditConfig) -> Result<(Arc<AuditLog>, OpenReport), AuditError> {
        let dir = config.dir.clone();
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io(&lock_path))?;
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let failing = Arc::new(AtomicBool::new(false));
        let latest = Arc::new(std::sync::Mutex::new(None));
        let report = match lock.try_lock() {
            Ok(()) => {
                let (writer, report) =
                    Writer::prepare(config, lock, failing.clone(), latest.clone())?;
                std::thread::Builder::new()
                    .name("acge-audit".into())
                    .spawn(move || writer.run(rx))
                    .map_err(io(&dir))?;
                report
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                tracing::warn!(dir = %dir.display(), "another process writes this audit log; records wait until it closes it (a takeover's old process)");
                let (config, failing, latest) = (config.clone(), failing.clone(), latest.clone());
                std::thread::Builder::new()
                    .name("acge-audit".into())
                    .spawn(move || {
                        if let Err(e) = lock.lock() {
                            tracing::error!(error = %e, "cannot lock the audit log");
                            failing.store(true, Ordering::Relaxed);
                            return;
                        }
                        match Writer::prepare(&config, lock, failing.clone(), latest) {
                            Ok((writer, report)) => {
                                tracing::info!(
                                    records = report.records,
                                    "audit log open: the other writer let go"
                                );
                                writer.run(rx)
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "audit log cannot be opened");
                                failing.store(true, Ordering::Relaxed);
                            }
                        }
                    })
                    .map_err(io(&dir))?;
                OpenReport {
                    records: 0,
                    segments: 0,
                    cut: None,
                    waiting: true,
                }
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(&lock_path)(e)),
        };
        Ok((
            Arc::new(AuditLog {
                tx,
                mode: config.commit,
                dir,
                failing,
                latest,
            }),
            report,
        ))
    }

    /// Whether records can be written now: the writer runs and its last write did not
    /// fail.
    pub fn health(&self) -> Result<(), AuditError> {
        if self.tx.is_closed() {
            return Err(AuditError::Stopped);
        }
        if self.failing.load(Ordering::Relaxed) {
            return Err(AuditError::Write("the last write to the log failed".into()));
        }
        Ok(())
    }

    /// The latest signed checkpoint, as a c2sp signed note; None before the first.
    pub fn latest_checkpoint(&self) -> Option<String> {
        self.latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn mode(&self) -> CommitMode {
        self.mode
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends a record (its `seq` is assigned by the writer). In `sync` mode this returns
    /// once the record is on disk; in `async` mode once it is queued. Returns the seq
    /// in sync mode, 0 in async mode.
    pub async fn append(&self, record: AuditRecord) -> Result<u64, AuditError> {
        let enqueued = Instant::now();
        match self.mode {
            CommitMode::Sync => {
                let (done, wait) = oneshot::channel();
                self.tx
                    .send(Msg::Append {
                        record: Box::new(record),
                        enqueued,
                        done: Some(done),
                    })
                    .await
                    .map_err(|_| AuditError::Stopped)?;
                wait.await
                    .map_err(|_| AuditError::Stopped)?
                    .map_err(AuditError::Write)
            }
            CommitMode::Async => {
                self.tx
                    .send(Msg::Append {
                        record: Box::new(record),
                        enqueued,
                        done: None,
                    })
                    .await
                    .map_err(|_| AuditError::Stopped)?;
                Ok(0)
            }
        }
    }

    /// Appends without waiting, for the log phase (which cannot wait). With a full queue
    /// the record waits in a task of its own rather than being dropped.
    pub fn append_detached(self: &Arc<Self>, record: AuditRecord) {
        let msg = Msg::Append {
            record: Box::new(record),
            enqueued: Instant::now(),
            done: None,
        };
        match self.tx.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(msg)) => {
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    if tx.send(msg).await.is_err() {
                        tracing::error!(
                            "audit writer stopped; a record from the log phase was not written"
                        );
                    }
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!(
                    "audit writer stopped; a record from the log phase was not written"
                );
            }
        }
    }

    /// Writes what is queued, signs a final checkpoint, and stops the writer.
    pub async fn close(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Close(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

/// The signing key's path for `config`.
fn key_path(config: &AuditConfig) -> PathBuf {
    config
        .key_file
        .clone()
        .unwrap_or_else(|| config.dir.join(DEFAULT_KEY_FILE))
}

/// Reads the signing key when it exists, as opening the log would; creates nothing.
/// For `acge-proxy check`.
pub fn check_key(config: &AuditConfig) -> Result<(), AuditError> {
    let path = key_path(config);
    match std::fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        _ => read_key(&path).map(|_| ()),
    }
}

fn read_key(path: &Path) -> Result<SigningKey, AuditError> {
    let key_err = |reason: String| AuditError::Key {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let bytes = hex::decode(text.trim()).map_err(|e| key_err(format!("not hex: {e}")))?;
    let seed: [u8; 32] = bytes
        .try_into()
        .map_err(|_| key_err("expected a 32-byte ed25519 seed".into()))?;
    Ok(SigningKey::from_bytes(&seed))
}

fn load_or_create_key(path: &Path) -> Result<SigningKey, AuditError> {
    let key_err = |reason: String| AuditError::Key {
        path: path.display().to_string(),
        reason,
    };
    match std::fs::metadata(path) {
        Ok(_) => read_key(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            getrandom::fill(&mut seed).map_err(|e| key_err(format!("no randomness: {e}")))?;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(io(parent))?;
            }
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io(path))?;
            file.write_all(format!("{}\n", hex::encode(seed)).as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(io(path))?;
            tracing::info!(path = %path.display(), "created the audit signing key");
            Ok(SigningKey::from_bytes(&seed))
        }
        Err(e) => Err(io(path)(e)),
    }
}

/// What scanning the segments found.
struct Scan {
    frontier: Frontier,
    last_segment: Option<(u64, PathBuf)>,
    cut: Option<String>,
    segments: usize,
    /// The last inline checkpoint: the records it covers, and its note.
    last_inline: Option<(u64, String)>,
}

/// Rebuilds the frontier from every segment, cutting a torn final frame.
fn scan(dir: &Path) -> Result<Scan, AuditError> {
    let found = segments(dir).map_err(io(dir))?;
    let mut frontier = Frontier::default();
    let mut cut = None;
    let mut last_inline = None;
    let last_index = found.len().saturating_sub(1);
    for (i, (_, path)) in found.iter().enumerate() {
        let bytes = std::fs::read(path).map_err(io(path))?;
        let frames = read_frames(&bytes);
        for (_, payload) in &frames.records {
            match entry(payload) {
                Entry::Record(record) => frontier.push(leaf_hash(record)),
                Entry::Checkpoint(text) => {
                    let covers = note::read(text).map(|h| h.size).unwrap_or(0);
                    last_inline = Some((covers, text.to_string()));
                }
            }
        }
        if let Some(bad) = frames.bad {
            if i == last_index && bad.at_end {
                let file = OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(io(path))?;
                file.set_len(bad.offset)
                    .and_then(|()| file.sync_all())
                    .map_err(io(path))?;
                let what = format!(
                    "cut a torn final frame from {} at offset {} ({}; {} bytes)",
                    path.display(),
                    bad.offset,
                    bad.reason,
                    bytes.len() as u64 - bad.offset
                );
                tracing::warn!("audit log: {what}");
                cut = Some(what);
            } else {
                return Err(AuditError::Damaged {
                    path: path.display().to_string(),
                    reason: format!("offset {}: {}", bad.offset, bad.reason),
                });
            }
        }
    }
    let segments = found.len();
    Ok(Scan {
        frontier,
        last_segment: found.into_iter().last(),
        cut,
        segments,
        last_inline,
    })
}

/// Drops a torn final checkpoint line and returns the last whole checkpoint.
fn trim_checkpoints(dir: &Path) -> Result<Option<Checkpoint>, AuditError> {
    let path = dir.join(CHECKPOINTS_FILE);
    let text = match std::fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path)(e)),
    };
    let whole = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    if whole < text.len() {
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        file.set_len(whole as u64)
            .and_then(|()| file.sync_all())
            .map_err(io(&path))?;
        tracing::warn!(path = %path.display(), "audit log: cut a torn final checkpoint line");
    }
    let last = text[..whole]
        .split(|b| *b == b'\n')
        .rfind(|l| !l.is_empty())
        .map(serde_json::from_slice::<Checkpoint>)
        .transpose()
        .map_err(|e| AuditError::Damaged {
            path: path.display().to_string(),
            reason: format!("the last checkpoint is not valid: {e}"),
        })?;
    Ok(last)
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

struct Writer {
    /// Held while the writer runs: one writer per log directory.
    _lock: File,
    failing: Arc<AtomicBool>,
    latest: Arc<std::sync::Mutex<Option<String>>>,
    origin: String,
    dir: PathBuf,
    config: AuditConfig,
    segment: File,
    segment_number: u64,
    segment_size: u64,
    frontier: Frontier,
    checkpointed: u64,
    last_checkpoint_at: Instant,
    key: SigningKey,
    capacity: usize,
}

/// Records written per batch at most, so one fsync never waits on an unbounded write.
const MAX_BATCH: usize = 4096;

impl Writer {
    /// Reads the log's end and makes the writer that goes on from it; `lock` is held.
    fn prepare(
        config: &AuditConfig,
        lock: File,
        failing: Arc<AtomicBool>,
        latest: Arc<std::sync::Mutex<Option<String>>>,
    ) -> Result<(Self, OpenReport), AuditError> {
        let dir = config.dir.clone();
        let key = load_or_create_key(&key_path(config))?;
        let origin = config
            .origin
            .clone()
            .unwrap_or_else(|| note::default_origin(&key.verifying_key()));
        let pub_path = dir.join(PUBLIC_KEY_FILE);
        std::fs::write(
            &pub_path,
            format!("{}\n", hex::encode(key.verifying_key().as_bytes())),
        )
        .map_err(io(&pub_path))?;
        let vkey_path = dir.join(VERIFIER_KEY_FILE);
        std::fs::write(
            &vkey_path,
            format!("{}\n", note::verifier_key(&origin, &key.verifying_key())),
        )
        .map_err(io(&vkey_path))?;

        let scanned = scan(&dir)?;
        let (frontier, last_segment, cut, segment_count) = (
            scanned.frontier,
            scanned.last_segment,
            scanned.cut,
            scanned.segments,
        );
        let legacy = trim_checkpoints(&dir)?;
        let checkpointed = scanned
            .last_inline
            .as_ref()
            .map(|(size, _)| *size)
            .into_iter()
            .chain(legacy.as_ref().map(|c| c.tree_size))
            .max()
            .unwrap_or(0);
        if checkpointed > frontier.size() {
            return Err(AuditError::Damaged {
                path: dir.display().to_string(),
                reason: format!(
                    "the last checkpoint covers {checkpointed} records but only {} are on disk",
                    frontier.size()
                ),
            });
        }
        let report = OpenReport {
            records: frontier.size(),
            segments: segment_count,
            cut,
            waiting: false,
        };
        let (number, path) = match last_segment {
            Some(last) => last,
            None => (1, dir.join(segment_name(1))),
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io(&path))?;
        let size = file.metadata().map_err(io(&path))?.len();
        sync_dir(&dir);
        *latest.lock().unwrap_or_else(|e| e.into_inner()) =
            scanned.last_inline.map(|(_, note)| note);
        let mut writer = Writer {
            _lock: lock,
            failing,
            latest,
            origin,
            dir: dir.clone(),
            config: config.clone(),
            segment: file,
            segment_number: number,
            segment_size: size,
            frontier,
            checkpointed,
            last_checkpoint_at: Instant::now(),
            key,
            capacity: config.queue.max(1),
        };
        // Records a crash (or the old format) left unsigned are signed before new ones
        // follow, so the unsigned tail never grows past its bound.
        if writer.frontier.size() > writer.checkpointed {
            writer.checkpoint().map_err(io(&dir))?;
        }
        Ok((writer, report))
    }

    fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "audit writer cannot start");
                return;
            }
        };
        let interval = Duration::from_millis(self.config.checkpoint_interval_ms.max(1));
        let mut buf = Vec::with_capacity(64 * 1024);
        loop {
            let wait = interval.saturating_sub(self.last_checkpoint_at.elapsed());
            let first = runtime.block_on(async { tokio::time::timeout(wait, rx.recv()).await });
            let first = match first {
                Ok(Some(msg)) => msg,
                Ok(None) => {
                    self.finish();
                    return;
                }
                Err(_) => {
                    self.checkpoint_if_due(true);
                    continue;
                }
            };
            // A batch never crosses a checkpoint: the gap between two is at most
            // `checkpoint_every` records, the bound each checkpoint states.
            let room = usize::try_from(
                self.config
                    .checkpoint_every
                    .saturating_sub(self.frontier.size() - self.checkpointed)
                    .max(1),
            )
            .unwrap_or(MAX_BATCH)
            .min(MAX_BATCH);
            let mut batch = vec![first];
            while batch.len() < room {
                match rx.try_recv() {
                    Ok(msg) => batch.push(msg),
                    Err(_) => break,
                }
            }
            let mut waiters = Vec::new();
            let mut closing = None;
            // Kept so that a failed write takes the batch back whole: its records were
            // never acknowledged, and their sequence numbers go to the next ones.
            let frontier_before = self.frontier.clone();
            buf.clear();
            for msg in batch {
                match msg {
                    Msg::Append {
                        mut record,
                        enqueued,
                        done,
                    } => {
                        record.seq = self.frontier.size();
                        let payload = serde_json::to_vec(&record).expect("records serialize");
                        frame(&payload, &mut buf);
                        self.frontier.push(leaf_hash(&payload));
                        waiters.push((record.seq, enqueued, done));
                    }
                    Msg::Close(done) => closing = Some(done),
                }
            }
            let result = self.write(&buf);
            match &result {
                Ok(()) => metrics::counter!(AUDIT_RECORDS_TOTAL).increment(waiters.len() as u64),
                Err(_) => self.frontier = frontier_before,
            }
            self.failing.store(result.is_err(), Ordering::Relaxed);
            metrics::gauge!(AUDIT_QUEUE_DEPTH).set((self.capacity - rx.capacity()) as f64);
            for (seq, enqueued, done) in waiters {
                metrics::histogram!(AUDIT_COMMIT_SECONDS).record(enqueued.elapsed().as_secs_f64());
                if let Some(done) = done {
                    let _ = done.send(result.clone().map(|()| seq));
                }
            }
            if let Err(e) = result {
                tracing::error!(error = %e, "audit log write failed");
            }
            self.checkpoint_if_due(false);
            if let Some(done) = closing {
                self.finish();
                let _ = done.send(());
                return;
            }
        }
    }

    /// Appends a batch; on failure cuts the segment back to where the batch began, so a
    /// half-written batch never sits in the middle of the log.
    fn write(&mut self, buf: &[u8]) -> Result<(), String> {
        if buf.is_empty() {
            return Ok(());
        }
        let written = self.segment.write_all(buf).and_then(|()| {
            if self.config.commit == CommitMode::Sync {
                self.segment.sync_data()
            } else {
                Ok(())
            }
        });
        if let Err(e) = written {
            if let Err(cut) = self.segment.set_len(self.segment_size) {
                tracing::error!(error = %cut, "cannot cut a failed audit batch back; the next start will report it");
            }
            return Err(e.to_string());
        }
        self.segment_size += buf.len() as u64;
        if self.segment_size >= self.config.segment_bytes {
            // The batch is written; a failed rotation is retried after the next one.
            if let Err(e) = self.rotate() {
                tracing::error!(error = %e, "audit segment rotation failed");
            }
        }
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        // Each segment ends signed.
        if self.frontier.size() > self.checkpointed {
            self.checkpoint()?;
        }
        self.segment.sync_all()?;
        let number = self.segment_number + 1;
        let path = self.dir.join(segment_name(number));
        self.segment = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)?;
        self.segment_number = number;
        self.segment_size = 0;
        sync_dir(&self.dir);
        Ok(())
    }

    fn checkpoint_if_due(&mut self, timer: bool) {
        let pending = self.frontier.size() - self.checkpointed;
        let due = pending >= self.config.checkpoint_every
            || (pending > 0
                && (timer
                    || self.last_checkpoint_at.elapsed().as_millis() as u64
                        >= self.config.checkpoint_interval_ms));
        if due {
            if let Err(e) = self.checkpoint() {
                tracing::error!(error = %e, "audit checkpoint failed");
            }
        } else if timer {
            self.last_checkpoint_at = Instant::now();
        }
    }

    /// Signs the current tree and appends the signed note to the segment. The records
    /// it covers are made durable first, so a checkpoint never vouches for records a
    /// crash could take back; the note is made durable too, so a crash cannot widen the
    /// unsigned tail past its bound.
    fn checkpoint(&mut self) -> std::io::Result<()> {
        self.segment.sync_data()?;
        let head = TreeHead {
            origin: self.origin.clone(),
            size: self.frontier.size(),
            root: self.frontier.root(),
            time_ms: now_ms(),
            bound: self.config.checkpoint_every,
        };
        let signed = note::sign(&head, &self.key);
        let mut buf = Vec::with_capacity(signed.len() + 8);
        frame(signed.as_bytes(), &mut buf);
        if let Err(e) = self
            .segment
            .write_all(&buf)
            .and_then(|()| self.segment.sync_data())
        {
            let _ = self.segment.set_len(self.segment_size);
            return Err(e);
        }
        self.segment_size += buf.len() as u64;
        self.checkpointed = head.size;
        self.last_checkpoint_at = Instant::now();
        tracing::info!(
            origin = %head.origin,
            size = head.size,
            root = %hex::encode(head.root),
            note = %signed.escape_debug(),
            "audit checkpoint"
        );
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(signed);
        Ok(())
    }

    fn finish(&mut self) {
        if self.frontier.size() > self.checkpointed {
            if let Err(e) = self.checkpoint() {
                tracing::error!(error = %e, "final audit checkpoint failed");
            }
        }
        let _ = self.segment.sync_all();
    }
}
