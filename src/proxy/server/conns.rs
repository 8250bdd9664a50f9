//! The open connections of one listener: how many, which are idle and since when, the
//! requests in flight over all of them, and closing the oldest idle one to make room.
//!
//! The table is touched when a connection opens or closes and when room must be made;
//! a request only moves two atomic counters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// One connection, as the listener sees it.
pub struct Conn {
    id: u64,
    in_flight: AtomicU32,
    /// Milliseconds since the table's origin at which the connection last became idle
    /// (its last request ended, or it opened).
    idle_since_ms: AtomicU64,
    /// Asked to close (to make room, or by the idle timeout).
    closing: AtomicBool,
    pub(super) close: Notify,
    table: Arc<Table>,
}

impl Conn {
    /// When the connection has been idle for `timeout`, or None while a request is in
    /// flight.
    pub(super) fn idle_deadline(&self, timeout: Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
        Some(self.table.origin + since + timeout)
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

/// One admitted request: counted in flight (on its connection and the listener) until
/// dropped, which the proxy does when the exchange ends.
pub struct InFlight {
    conn: Arc<Conn>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let table = &self.conn.table;
        if self.conn.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.conn
                .idle_since_ms
                .store(table.now_ms(), Ordering::Release);
        }
        table.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

struct Table {
    origin: Instant,
    next_id: AtomicU64,
    open: AtomicUsize,
    in_flight: AtomicUsize,
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
}

impl Conns {
    pub fn new(max_connections: usize, max_in_flight: usize) -> Self {
        Self {
            table: Arc::new(Table {
                origin: Instant::now(),
                next_id: AtomicU64::new(0),
                open: AtomicUsize::new(0),
                in_flight: AtomicUsize::new(0),
                by_id: Mutex::new(HashMap::new()),
                empty: Notify::new(),
            }),
            max_connections,
            max_in_flight,
        }
    }

    pub fn open(&self) -> usize {
        self.table.open.load(Ordering::Acquire)
    }

    pub fn in_flight(&self) -> usize {
        self.table.in_flight.load(Ordering::Acquire)
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
            close: Notify::new(),
            table: table.clone(),
        });
        table
            .by_id
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(conn.id, Arc::downgrade(&conn));
        Registered(conn)
    }

    /// Counts a request in flight on `conn`, or None when the listener's limit is
    /// reached.
    pub fn admit(&self, conn: &Arc<Conn>) -> Option<InFlight> {
        let table = &self.table;
        if table.in_flight.fetch_add(1, Ordering::AcqRel) >= self.max_in_flight {
            table.in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        Some(InFlight { conn: conn.clone() })
    }

    /// Asks the connection that has been idle longest to close; false when none is
    /// idle.
    pub fn shed_oldest_idle(&self) -> bool {
        let by_id = self.table.by_id.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = by_id
            .values()
            .filter_map(std::sync::Weak::upgrade)
            .filter(|c| {
                c.in_flight.load(Ordering::Acquire) == 0 && !c.closing.load(Ordering::Acquire)
            })
            .min_by_key(|c| c.idle_since_ms.load(Ordering::Acquire));
        drop(by_id);
        match oldest {
            Some(conn) => {
                conn.closing.store(true, Ordering::Release);
                conn.close.notify_one();
                true
            }
            None => false,
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
        let conns = Conns::new(10, 2);
        let a = conns.register();
        let first = conns.admit(a.conn()).unwrap();
        let second = conns.admit(a.conn()).unwrap();
        assert!(
            conns.admit(a.conn()).is_none(),
            "third request over the limit"
        );
        assert!(
            a.conn().idle_deadline(Duration::from_secs(1)).is_none(),
            "busy"
        );
        drop(first);
        assert!(
            a.conn().idle_deadline(Duration::from_secs(1)).is_none(),
            "still busy"
        );
        drop(second);
        let deadline = a.conn().idle_deadline(Duration::from_secs(1)).unwrap();
        assert!(deadline > Instant::now());
        assert_eq!(conns.in_flight(), 0);
        assert!(conns.admit(a.conn()).is_some());
    }

    #[test]
    fn the_oldest_idle_connection_is_shed_and_busy_ones_never() {
        let conns = Conns::new(2, 100);
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
