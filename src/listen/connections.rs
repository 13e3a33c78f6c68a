//! The open connections: how many there are against the cap, which are
//! idle (waiting for a first request, or between requests) and since when,
//! the deadline each one has, and telling one to close. At the cap, a new
//! connection takes the place of the one idle longest, the way nginx reuses
//! its idle connections, so that connections which send nothing cannot
//! lock out clients that do; only when every connection is busy is a new
//! one refused.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

/// Why a connection is told to close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// The registry is stopping: finish what is in flight, then close.
    Stopping,
    /// Its place went to a new connection.
    Evicted,
    /// No first request within the header timeout.
    NoRequest,
    /// Idle for the idle timeout.
    Idle,
}

impl Reason {
    /// Its name in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Stopping => "stopping",
            Reason::Evicted => "evicted",
            Reason::NoRequest => "no_request",
            Reason::Idle => "idle",
        }
    }
}

/// What a connection waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Close now.
    Close(Reason),
    /// Nothing in flight: close at this moment unless a request comes.
    Until(Instant, Reason),
    /// Requests in flight: no deadline of ours.
    Busy,
}

/// How long a connection may wait for its requests.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// From accepting to the first request's headers.
    pub first_request: Duration,
    /// From the end of a response to the next request's headers.
    pub idle: Duration,
}

/// Every open connection.
pub struct Table {
    cap: usize,
    timeouts: Timeouts,
    inner: Mutex<Inner>,
    /// How many connections are open (evicted ones until they close).
    open: watch::Sender<usize>,
}

struct Inner {
    next: u64,
    /// Open connections not told to close for eviction: what the cap counts.
    live: usize,
    stopping: bool,
    entries: HashMap<u64, Entry>,
    /// Idle connections by the moment they became idle (a sequence number).
    idle: BTreeMap<u64, u64>,
}

struct Entry {
    accepted: Instant,
    /// Requests in flight.
    busy: usize,
    served: bool,
    idle_since: Instant,
    /// Its key in `idle`, while idle.
    idle_key: Option<u64>,
    close: Option<Reason>,
    notify: Arc<Notify>,
}

/// One open connection's place in the table; given back when dropped.
pub struct Conn {
    id: u64,
    table: Arc<Table>,
    notify: Arc<Notify>,
}

/// A request in flight on a connection; the connection is idle again once
/// every such guard is dropped.
pub struct InFlight(Arc<Conn>);

/// A new connection found every place taken by a busy connection.
#[derive(Debug)]
pub struct Full;

impl Table {
    pub fn new(cap: usize, timeouts: Timeouts) -> Arc<Self> {
        Arc::new(Table {
            cap,
            timeouts,
            inner: Mutex::new(Inner {
                next: 0,
                live: 0,
                stopping: false,
                entries: HashMap::new(),
                idle: BTreeMap::new(),
            }),
            open: watch::Sender::new(0),
        })
    }

    /// A place for a new connection, made by evicting the connection idle
    /// longest when the table is at its cap; and whether one was evicted.
    pub fn admit(self: &Arc<Self>) -> Result<(Arc<Conn>, bool), Full> {
        let mut inner = self.inner.lock().expect("not poisoned");
        let evicted = inner.live >= self.cap && inner.evict_idle(1) == 1;
        if inner.stopping || inner.live >= self.cap {
            return Err(Full);
        }
        inner.live += 1;
        let id = inner.next_key();
        let idle_key = inner.next_key();
        let now = Instant::now();
        let notify = Arc::new(Notify::new());
        inner.entries.insert(
            id,
            Entry {
                accepted: now,
                busy: 0,
                served: false,
                idle_since: now,
                idle_key: Some(idle_key),
                close: None,
                notify: Arc::clone(&notify),
            },
        );
        inner.idle.insert(idle_key, id);
        let open = inner.entries.len();
        drop(inner);
        self.open.send_replace(open);
        let conn = Arc::new(Conn {
            id,
            table: Arc::clone(self),
            notify,
        });
        Ok((conn, evicted))
    }

    /// Tells up to `count` of the connections idle longest to close (to
    /// free file descriptors); how many were told.
    pub fn evict_idle(&self, count: usize) -> usize {
        self.inner.lock().expect("not poisoned").evict_idle(count)
    }

    /// Tells every connection to finish what it has in flight and close.
    pub fn stop(&self) {
        let mut inner = self.inner.lock().expect("not poisoned");
        inner.stopping = true;
        for entry in inner.entries.values_mut() {
            entry.close.get_or_insert(Reason::Stopping);
            entry.notify.notify_one();
        }
    }

    /// Waits until every connection has closed.
    pub async fn all_closed(&self) {
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|n| *n == 0).await;
    }

    /// Waits while connections told to close for eviction, but not closed
    /// yet, hold more descriptors than an eighth of the cap: new ones wait in
    /// the kernel's backlog meanwhile, rather than run the process out of
    /// descriptors.
    pub async fn room(&self) {
        let most = self.cap + self.cap / 8 + 1;
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|n| *n < most).await;
    }

    /// How many connections are open.
    pub fn open(&self) -> usize {
        *self.open.borrow()
    }

    fn with_entry<T>(&self, id: u64, f: impl FnOnce(&mut Inner, u64) -> T) -> T {
        let mut inner = self.inner.lock().expect("not poisoned");
        f(&mut inner, id)
    }
}

impl Inner {
    fn next_key(&mut self) -> u64 {
        self.next += 1;
        self.next
    }

    fn evict_idle(&mut self, count: usize) -> usize {
        let mut evicted = 0;
        while evicted < count {
            let Some((_, id)) = self.idle.pop_first() else { break };
            let entry = self.entries.get_mut(&id).expect("idle connections are open");
            entry.idle_key = None;
            entry.close = Some(Reason::Evicted);
            entry.notify.notify_one();
            self.live -= 1;
            evicted += 1;
        }
        evicted
    }

    fn entry(&mut self, id: u64) -> &mut Entry {
        self.entries
            .get_mut(&id)
            .expect("a connection is in the table while open")
    }
}

impl Conn {
    /// Marks a request in flight until the guard is dropped.
    pub fn request_started(self: &Arc<Self>) -> InFlight {
        self.table.with_entry(self.id, |inner, id| {
            let entry = inner.entry(id);
            entry.busy += 1;
            entry.served = true;
            if let Some(key) = entry.idle_key.take() {
                inner.idle.remove(&key);
            }
        });
        InFlight(Arc::clone(self))
    }

    /// What the connection waits for now.
    pub fn wait(&self) -> Wait {
        let timeouts = self.table.timeouts;
        self.table.with_entry(self.id, |inner, id| {
            let entry = inner.entry(id);
            if let Some(reason) = entry.close {
                return Wait::Close(reason);
            }
            if entry.busy > 0 {
                return Wait::Busy;
            }
            let (at, reason) = match entry.served {
                false => (entry.accepted + timeouts.first_request, Reason::NoRequest),
                true => (entry.idle_since + timeouts.idle, Reason::Idle),
            };
            if at <= Instant::now() {
                entry.close = Some(reason);
                return Wait::Close(reason);
            }
            Wait::Until(at, reason)
        })
    }

    /// Whether a request is in flight.
    pub fn busy(&self) -> bool {
        self.table.with_entry(self.id, |inner, id| inner.entry(id).busy > 0)
    }

    /// Resolves when the connection's state changes (a request starts or
    /// ends, or it is told to close).
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let conn = &self.0;
        conn.table.with_entry(conn.id, |inner, id| {
            let key = inner.next_key();
            let entry = inner.entry(id);
            entry.busy -= 1;
            if entry.busy == 0 && entry.close.is_none() {
                entry.idle_since = Instant::now();
                entry.idle_key = Some(key);
                inner.idle.insert(key, id);
            }
        });
        conn.notify.notify_one();
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let mut inner = self.table.inner.lock().expect("not poisoned");
        let entry = inner.entries.remove(&self.id).expect("dropped once");
        if let Some(key) = entry.idle_key {
            inner.idle.remove(&key);
        }
        if entry.close != Some(Reason::Evicted) {
            inner.live -= 1;
        }
        let open = inner.entries.len();
        drop(inner);
        self.table.open.send_replace(open);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(cap: usize) -> Arc<Table> {
        Table::new(
            cap,
            Timeouts {
                first_request: Duration::from_secs(10),
                idle: Duration::from_secs(30),
            },
        )
    }

    #[test]
    fn at_the_cap_the_connection_idle_longest_makes_room() {
        let table = table(2);
        let (first, _) = table.admit().unwrap();
        let (second, _) = table.admit().unwrap();
        let (third, evicted) = table.admit().unwrap();
        assert!(evicted);
        assert_eq!(first.wait(), Wait::Close(Reason::Evicted), "the oldest idle one");
        assert!(matches!(second.wait(), Wait::Until(_, Reason::NoRequest)));
        let _busy = (second.request_started(), third.request_started());
        assert!(table.admit().is_err(), "every place is busy");
        assert_eq!(table.open(), 3, "the evicted one is open until it closes");
        drop(first);
        assert_eq!(table.open(), 2);
    }

    #[test]
    fn requests_keep_a_connection_from_its_deadline() {
        let table = table(4);
        let (conn, _) = table.admit().unwrap();
        let busy = conn.request_started();
        assert_eq!(conn.wait(), Wait::Busy);
        let (other, _) = table.admit().unwrap();
        drop(busy);
        assert!(matches!(conn.wait(), Wait::Until(_, Reason::Idle)));
        // `conn` became idle after `other` was accepted: `other` has been
        // idle longest.
        assert_eq!(table.evict_idle(1), 1);
        assert_eq!(other.wait(), Wait::Close(Reason::Evicted));
        assert!(matches!(conn.wait(), Wait::Until(..)));
    }

    #[test]
    fn stopping_closes_everything_and_refuses_more() {
        let table = table(4);
        let (conn, _) = table.admit().unwrap();
        table.stop();
        assert_eq!(conn.wait(), Wait::Close(Reason::Stopping));
        assert!(table.admit().is_err());
    }

    #[tokio::test]
    async fn deadlines_pass() {
        let table = Table::new(
            4,
            Timeouts {
                first_request: Duration::from_millis(20),
                idle: Duration::from_millis(20),
            },
        );
        let (conn, _) = table.admit().unwrap();
        let Wait::Until(at, Reason::NoRequest) = conn.wait() else {
            panic!()
        };
        tokio::time::sleep_until(at.into()).await;
        assert_eq!(conn.wait(), Wait::Close(Reason::NoRequest));
        drop(conn);
        table.all_closed().await;
    }
}
