//! The open connections of one listener: how many, which are idle and since when, the
//! requests in flight over all of them, and closing the oldest idle one to make room.
//!
//! The table is touched when a connection opens or closes, when room must be made, and
//! by the listener's sweep for idle connections (a few times a second); a request only
//! moves two atomic counters. A connection is asked to close through flags and a waker
//! its task registers on each poll, so that watching costs a request no timer and no
//! lock.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use tokio::sync::Notify;

use crate::telemetry::{refused, Refusal};

/// One connection, as the listener sees it.
pub struct Conn {
    id: u64,
    in_flight: AtomicU32,
    /// Milliseconds since the table's origin at which the connection last became idle
    /// (its last request ended, or it opened).
    idle_since_ms: AtomicU64,
    /// Asked to finish its requests and close (to make room, idle, or draining).
    closing: AtomicBool,
    /// Asked to close now (the drain timed out).
    killed: AtomicBool,
    /// The connection task's waker, registered on each poll.
    waker: AtomicWaker,
    table: Arc<Table>,
}

impl Conn {
    /// Whether the connection has been idle (nothing in flight) for `timeout` at `now`.
    fn idle_past(&self, timeout: Duration, now_ms: u64) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
            && now_ms.saturating_sub(self.idle_since_ms.load(Ordering::Acquire))
                >= timeout.as_millis() as u64
    }

    /// Asks the connection to finish what it is doing and close; counts why, once.
    fn ask_to_close(&self, why: Option<Refusal>) -> bool {
        if self.closing.swap(true, Ordering::AcqRel) {
            return false;
        }
        if let Some(why) = why {
            refused(why);
        }
        self.waker.wake();
        true
    }

    /// For the connection's task: registers its waker, then says what is asked of it.
    pub(super) fn watch(&self, waker: &std::task::Waker) -> (bool, bool) {
        self.waker.register(waker);
        (
            self.closing.load(Ordering::Acquire),
            self.killed.load(Ordering::Acquire),
        )
    }
}

/// A registered connection: counted open until dropped (when its task ends).
pub struct Registered(Arc<Conn>);

impl Registered {
    pub fn conn(&self) -> &Arc<Conn> {
        &self.0
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        let table = &self.0.table;
        table
            .by_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.0.id);
        table.open.fetch_sub(1, Ordering::AcqRel);
        table.notify_if_empty();
    }
}

/// One admitted request: counted in flight (on its connection, and by a permit of the
/// listener's) until dropped, which the proxy does when the exchange ends.
pub struct InFlight {
    conn: Arc<Conn>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let table = &self.conn.table;
        if self.conn.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.conn
                .idle_since_ms
                .store(table.now_ms(), Ordering::Release);
        }
    }
}

struct Table {
    origin: Instant,
    next_id: AtomicU64,
    open: AtomicUsize,
    /// Requests in flight, over all connections; waiters queue in arrival order.
    slots: Arc<tokio::sync::Semaphore>,
    by_id: Mutex<HashMap<u64, std::sync::Weak<Conn>>>,
    empty: Notify,
}

impl Table {
    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    fn notify_if_empty(&self) {
        if self.open.load(Ordering::Acquire) == 0 {
            self.empty.notify_waiters();
        }
    }
}

/// The connection table of one listener, with its limits.
#[derive(Clone)]
pub struct Conns {
    table: Arc<Table>,
    max_connections: usize,
    max_in_flight: usize,
    wait: Duration,
}

impl Conns {
    /// `wait`: how long a request beyond `max_in_flight` may wait for a slot.
    pub fn new(max_connections: usize, max_in_flight: usize, wait: Duration) -> Self {
        Self {
            table: Arc::new(Table {
                origin: Instant::now(),
                next_id: AtomicU64::new(0),
                open: AtomicUsize::new(0),
                slots: Arc::new(tokio::sync::Semaphore::new(max_in_flight)),
                by_id: Mutex::new(HashMap::new()),
                empty: Notify::new(),
            }),
            max_connections,
            max_in_flight,
            wait,
        }
    }

    pub fn open(&self) -> usize {
        self.table.open.load(Ordering::Acquire)
    }

    pub fn in_flight(&self) -> usize {
        self.max_in_flight - self.table.slots.available_permits()
    }

    /// Whether one more connection fits under the limit.
    pub fn has_room(&self) -> bool {
        self.open() < self.max_connections
    }

    pub fn register(&self) -> Registered {
        let table = &self.table;
        table.open.fetch_add(1, Ordering::AcqRel);
        let conn = Arc::new(Conn {
            id: table.next_id.fetch_add(1, Ordering::Relaxed),
            in_flight: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(table.now_ms()),
            closing: AtomicBool::new(false),
            killed: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            table: table.clone(),
        });
        table
            .by_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(conn.id, Arc::downgrade(&conn));
        Registered(conn)
    }

    /// Counts a request in flight on `conn` when a slot is free now, or None.
    pub fn admit(&self, conn: &Arc<Conn>) -> Option<InFlight> {
        let permit = self.table.slots.clone().try_acquire_owned().ok()?;
        Some(Self::in_flight_on(conn, permit))
    }

    /// As [`Conns::admit`], but waits for a slot (in arrival order) up to the
    /// listener's wait. A waiting request costs nothing but its connection, so a flood
    /// of clients that retry at once is slowed to what the proxy serves, instead of
    /// being answered as fast as it can ask.
    pub async fn admit_waiting(&self, conn: &Arc<Conn>) -> Option<InFlight> {
        if let Some(admitted) = self.admit(conn) {
            return Some(admitted);
        }
        let slot = self.table.slots.clone().acquire_owned();
        let permit = tokio::time::timeout(self.wait, slot).await.ok()?.ok()?;
        Some(Self::in_flight_on(conn, permit))
    }

    fn in_flight_on(conn: &Arc<Conn>, permit: tokio::sync::OwnedSemaphorePermit) -> InFlight {
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight {
            conn: conn.clone(),
            _permit: permit,
        }
    }

    fn all(&self) -> Vec<Arc<Conn>> {
        let by_id = self.table.by_id.lock().unwrap_or_else(|e| e.into_inner());
        by_id
            .values()
            .filter_map(std::sync::Weak::upgrade)
            .collect()
    }

    /// Asks the connection that has been idle longest to close; false when none is
    /// idle.
    pub fn shed_oldest_idle(&self) -> bool {
        let oldest = self
            .all()
            .into_iter()
            .filter(|c| {
                c.in_flight.load(Ordering::Acquire) == 0 && !c.closing.load(Ordering::Acquire)
            })
            .min_by_key(|c| c.idle_since_ms.load(Ordering::Acquire));
        oldest.is_some_and(|conn| conn.ask_to_close(Some(Refusal::ShedIdle)))
    }

    /// Asks every connection idle for `timeout` to close.
    pub fn sweep(&self, timeout: Duration) {
        let now = self.table.now_ms();
        for conn in self.all() {
            if conn.idle_past(timeout, now) {
                conn.ask_to_close(Some(Refusal::IdleTimeout));
            }
        }
    }

    /// Asks every connection to finish its requests and close (the drain).
    pub fn close_all(&self) {
        for conn in self.all() {
            conn.ask_to_close(None);
        }
    }

    /// Closes every connection now (the drain timed out).
    pub fn kill_all(&self) {
        for conn in self.all() {
            conn.killed.store(true, Ordering::Release);
            conn.waker.wake();
        }
    }

    /// Waits until no connection is open.
    pub async fn closed(&self) {
        loop {
            let empty = self.table.empty.notified();
            tokio::pin!(empty);
            empty.as_mut().enable();
            if self.open() == 0 {
                return;
            }
            empty.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_admitted_up_to_the_limit_and_idle_time_starts_when_they_end() {
        let conns = Conns::new(10, 2, Duration::ZERO);
        let a = conns.register();
        let first = conns.admit(a.conn()).unwrap();
        let second = conns.admit(a.conn()).unwrap();
        assert!(
            conns.admit(a.conn()).is_none(),
            "third request over the limit"
        );
        let later = conns.table.now_ms() + 10_000;
        assert!(!a.conn().idle_past(Duration::from_secs(1), later), "busy");
        drop(first);
        assert!(
            !a.conn().idle_past(Duration::from_secs(1), later),
            "still busy"
        );
        drop(second);
        assert!(a.conn().idle_past(Duration::from_secs(1), later));
        assert!(!a
            .conn()
            .idle_past(Duration::from_secs(1), conns.table.now_ms()));
        assert_eq!(conns.in_flight(), 0);
        assert!(conns.admit(a.conn()).is_some());
    }

    #[test]
    fn the_oldest_idle_connection_is_shed_and_busy_ones_never() {
        let conns = Conns::new(2, 100, Duration::ZERO);
        let old = conns.register();
        std::thread::sleep(Duration::from_millis(5));
        let newer = conns.register();
        let busy = conns.register();
        let req = conns.admit(busy.conn()).unwrap();
        assert!(!conns.has_room());
        assert!(conns.shed_oldest_idle());
        assert!(old.conn().closing.load(Ordering::Acquire));
        assert!(!newer.conn().closing.load(Ordering::Acquire));
        assert!(conns.shed_oldest_idle());
        assert!(newer.conn().closing.load(Ordering::Acquire));
        assert!(!conns.shed_oldest_idle(), "only the busy one is left");
        assert!(!busy.conn().closing.load(Ordering::Acquire));
        drop((old, newer, busy, req));
        assert_eq!(conns.open(), 0);
        assert_eq!(conns.in_flight(), 0);
    }
}
