//! The migration's state file: each route's step and state, kept across restarts.
//!
//! Written off the runtime, by a thread of its own: a write (temporary file, fsync,
//! rename, directory fsync) can take milliseconds on a slow disk, and with one runtime
//! worker that would stall the data plane. Writes coalesce: only the newest state
//! waiting is written. [`StateWriter::flush`] waits for what is queued.

use std::path::{Path, PathBuf};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::{Rollback, State};

/// One route's progress: what the state file keeps.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Saved {
    pub(super) step: usize,
    pub(super) state: State,
    pub(super) since_ms: u64,
    #[serde(default)]
    pub(super) last_rollback: Option<Rollback>,
    #[serde(default)]
    pub(super) note: Option<String>,
}

impl Saved {
    /// Where a route with no saved progress starts: the first step, running.
    pub(super) fn first_step() -> Self {
        Self {
            step: 0,
            state: State::Running,
            since_ms: acge_filters::audit::log::now_ms(),
            last_rollback: None,
            note: None,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct StateFile {
    pub(super) routes: std::collections::BTreeMap<String, Saved>,
}

/// Why the controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("migration.state_file {path}: {reason}")]
    State { path: PathBuf, reason: String },
    #[error("cannot start the migration state writer: {0}")]
    Thread(std::io::Error),
}

pub(super) fn load(path: &Path) -> Result<Option<StateFile>, MigrationError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| MigrationError::State {
                path: path.to_path_buf(),
                reason: format!("not a migration state ({e}); move it away to start afresh"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(MigrationError::State {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
    }
}

/// Write to a temporary file beside it, fsync, rename over, fsync the directory: the
/// file is the old state or the new one, never a mix.
fn save(path: &Path, state: &StateFile) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

enum Job {
    Save(StateFile),
    Flush(oneshot::Sender<()>),
}

/// The thread that writes the state file.
pub(super) struct StateWriter {
    tx: mpsc::Sender<Job>,
}

impl StateWriter {
    pub(super) fn spawn(path: PathBuf) -> Result<Self, MigrationError> {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("acge-migration-state".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    let mut newest = None;
                    let mut flushed = Vec::new();
                    for job in std::iter::once(job).chain(rx.try_iter()) {
                        match job {
                            Job::Save(state) => newest = Some(state),
                            Job::Flush(done) => flushed.push(done),
                        }
                    }
                    if let Some(state) = newest {
                        if let Err(e) = save(&path, &state) {
                            tracing::error!(path = %path.display(), error = %e, "cannot save the migration state");
                        }
                    }
                    for done in flushed {
                        let _ = done.send(());
                    }
                }
            })
            .map_err(MigrationError::Thread)?;
        Ok(Self { tx })
    }

    /// Queues `state` to be written; returns at once.
    pub(super) fn save(&self, state: StateFile) {
        let _ = self.tx.send(Job::Save(state));
    }

    /// Waits until everything queued before it is written.
    pub(super) async fn flush(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Job::Flush(done)).is_ok() {
            let _ = wait.await;
        }
    }
}
