//! How far a listener's drain has gone, shared by the proxy's two listeners and read
//! on every response (one atomic load).
//!
//! [`Phase::Closing`] starts with the drain delay: HTTP/1 responses carry
//! `Connection: close`, so each client connection closes after the answer it is
//! waiting for and its client opens a new one elsewhere, and no connection is closed
//! under a client that is about to send on it. [`Phase::Handed`] is a takeover: a new
//! process serves the same sockets, so this one stops accepting at once (the sockets
//! stay open in the new process: nothing queued is lost) and goes on answering what
//! it has. The stop itself (GOAWAY, closing idle connections, the drain timeout) is
//! the listener's shutdown future.

use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum Phase {
    Serving = 0,
    /// Still accepting; HTTP/1 responses carry `Connection: close`.
    Closing = 1,
    /// Another process has the sockets: no more accepting; as `Closing` otherwise.
    Handed = 2,
}

#[derive(Debug, Default)]
pub struct Drain {
    phase: AtomicU8,
    changed: Notify,
    /// Client connections open on the listeners that follow this drain.
    open: AtomicUsize,
    /// Notified when the last of them closes.
    none_open: Notify,
}

/// One open connection, counted while it lives.
pub struct Counted(Arc<Drain>);

impl Drop for Counted {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.none_open.notify_waiters();
        }
    }
}

impl Drain {
    /// Moves the drain on to `phase` (never back).
    pub fn set(&self, phase: Phase) {
        self.phase.fetch_max(phase as u8, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Serving,
            1 => Phase::Closing,
            _ => Phase::Handed,
        }
    }

    /// Whether responses on HTTP/1 connections should close them.
    pub fn closing(&self) -> bool {
        self.phase.load(Ordering::Relaxed) >= Phase::Closing as u8
    }

    /// Counts a connection as open until the guard drops.
    pub fn count(self: &Arc<Self>) -> Counted {
        self.open.fetch_add(1, Ordering::AcqRel);
        Counted(self.clone())
    }

    /// Resolves once no connection is open (at once when none is).
    pub async fn none_open(&self) {
        loop {
            let closed = self.none_open.notified();
            tokio::pin!(closed);
            closed.as_mut().enable();
            if self.open.load(Ordering::Acquire) == 0 {
                return;
            }
            closed.await;
        }
    }

    /// Resolves once the drain has reached `phase`.
    pub async fn reached(&self, phase: Phase) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.phase() >= phase {
                return;
            }
            changed.await;
        }
    }
}
