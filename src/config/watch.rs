//! Watching the config file's directory for a change, for [`super::reload`].
//!
//! The directory is watched, not the file: Kubernetes updates a mounted ConfigMap by
//! writing a new timestamped directory and renaming a `..data` symlink over the old
//! one, so the file's own inode never changes and a watch on it would see nothing (or
//! lose itself when an editor renames a new file into place). Every event in the
//! directory, except reads, restarts a quiet period; when it ends the callback runs
//! once. Whether anything changed is the callback's to decide (it compares content
//! hashes), so a swap of several steps, or a touch, costs one read.

use std::future::Future;
use std::path::Path;
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Starts watching the directory of `file`; `on_change` runs after each burst of
/// changes has been quiet for `debounce`. The task ends when it is aborted.
pub fn spawn<F, Fut>(
    file: &Path,
    debounce: Duration,
    on_change: F,
) -> Result<tokio::task::JoinHandle<()>, notify::Error>
where
    F: Fn() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let dir = match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => Path::new(".").to_path_buf(),
    };
    // One pending signal is enough: the callback reads the file as it is then.
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        match event {
            // Our own reads of the file are events too; they change nothing.
            Ok(e) if matches!(e.kind, EventKind::Access(_)) => {}
            Ok(_) => {
                let _ = tx.try_send(());
            }
            Err(e) => tracing::warn!(error = %e, "config directory watch"),
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    tracing::info!(dir = %dir.display(), debounce_ms = debounce.as_millis() as u64, "watching the config directory");
    Ok(tokio::spawn(async move {
        // Dropping the watcher stops it: it lives as long as the task.
        let _watcher = watcher;
        while rx.recv().await.is_some() {
            loop {
                tokio::select! {
                    more = rx.recv() => if more.is_none() { return },
                    () = tokio::time::sleep(debounce) => break,
                }
            }
            on_change().await;
        }
    }))
}
