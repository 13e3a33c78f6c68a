//! The open connections: how many there are against the cap, which are
//! idle (waiting for a first request, or between requests) and since when,
//! the deadline each one has, and telling one to close. At the cap, a new
//! connection takes the place of the one idle longest, the way nginx reuses
//! its idle connections, so that connections which send nothing cannot
//! lock out clients that do; only when every connection is busy is a new
//! one refused.
//!
//! A request's start and end touch only its connection's atomics: no lock,
//! no wake-up. The connection finds its deadline when its timer fires (a
//! busy one looks again an idle timeout later), and the table, which needs
//! the idle order only to evict at the cap, reads the atomics then.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

/// Why a connection is told to close.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Reason {
    /// The registry is stopping: finish what is in flight, then close.
    Stopping = 1,
    /// Its place went to a new connection.
    Evicted = 2,
    /// No first request within the header timeout.
    NoRequest = 3,
    /// Idle for the idle timeout.
    Idle = 4,
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

    /// Its code in [`State::close`], where 0 is "not told to close".
    fn code(self) -> u8 {
        self as u8
    }

    fn from_code(code: u8) -> Option<Reason> {
        [Reason::Stopping, Reason::Evicted, Reason::NoRequest, Reason::Idle]
            .into_iter()
            .find(|reason| reason.code() == code)
    }
}

/// What a connection waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// Close now.
    Close(Reason),
    /// Nothing in flight: close at this moment unless a request comes.
    Until(Instant, Reason),
    /// Requests in flight: no deadline of ours before this moment.
    Busy(Instant),
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
    /// What `idle_since` counts from.
    epoch: Instant,
    /// The order connections become idle in.
    idle_order: AtomicU64,
    inner: Mutex<Inner>,
    /// How many connections are open (evicted ones until they close).
    open: watch::Sender<usize>,
}

struct Inner {
    next: u64,
    /// Open connections not told to close for eviction: what the cap counts.
    live: usize,
    stopping: bool,
    entries: HashMap<u64, Arc<State>>,
}

/// One connection's state, shared by the table and the connection.
struct State {
    accepted: Instant,
    /// Requests in flight.
    busy: AtomicUsize,
    served: AtomicBool,
    /// When it last became idle, in nanoseconds from the table's epoch.
    idle_since: AtomicU64,
    /// When it became idle in the table's order, for eviction.
    idle_order: AtomicU64,
    /// Why it is told to close ([`Reason::code`]), or 0.
    close: AtomicU8,
    notify: Notify,
}

impl State {
    fn close(&self) -> Option<Reason> {
        Reason::from_code(self.close.load(Ordering::Acquire))
    }

    /// Tells it to close for `reason` unless it was told already; whether
    /// this did.
    fn tell(&self, reason: Reason) -> bool {
        let told = self
            .close
            .compare_exchange(0, reason.code(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if told {
            self.notify.notify_one();
        }
        told
    }

    fn idle(&self) -> bool {
        self.busy.load(Ordering::Acquire) == 0 && self.close().is_none()
    }
}

/// One open connection's place in the table; given back when dropped.
pub struct Conn {
    id: u64,
    table: Arc<Table>,
    state: Arc<State>,
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
            epoch: Instant::now(),
            idle_order: AtomicU64::new(0),
            inner: Mutex::new(Inner {
                next: 0,
                live: 0,
                stopping: false,
                entries: HashMap::new(),
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
        inner.next += 1;
        let id = inner.next;
        let now = Instant::now();
        let state = Arc::new(State {
            accepted: now,
            busy: AtomicUsize::new(0),
            served: AtomicBool::new(false),
            idle_since: AtomicU64::new(self.nanos(now)),
            idle_order: AtomicU64::new(self.idle_order.fetch_add(1, Ordering::Relaxed)),
            close: AtomicU8::new(0),
            notify: Notify::new(),
        });
        inner.entries.insert(id, Arc::clone(&state));
        let open = inner.entries.len();
        drop(inner);
        self.open.send_replace(open);
        let conn = Arc::new(Conn {
            id,
            table: Arc::clone(self),
            state,
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
        for state in inner.entries.values() {
            state.tell(Reason::Stopping);
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

    fn nanos(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_nanos() as u64
    }
}

impl Inner {
    /// Tells the `count` connections idle longest to close, for eviction.
    fn evict_idle(&mut self, count: usize) -> usize {
        let mut idle: Vec<(u64, &State)> = (self.entries.values())
            .filter(|state| state.idle())
            .map(|state| (state.idle_order.load(Ordering::Acquire), &**state))
            .collect();
        idle.sort_unstable_by_key(|(order, _)| *order);
        let evicted = (idle.into_iter().take(count))
            .filter(|(_, state)| state.tell(Reason::Evicted))
            .count();
        self.live -= evicted;
        evicted
    }
}

impl Conn {
    /// Marks a request in flight until the guard is dropped.
    pub fn request_started(self: &Arc<Self>) -> InFlight {
        self.state.served.store(true, Ordering::Relaxed);
        self.state.busy.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    /// What the connection waits for now.
    pub fn wait(&self) -> Wait {
        let (state, timeouts) = (&self.state, self.table.timeouts);
        if let Some(reason) = state.close() {
            return Wait::Close(reason);
        }
        let now = Instant::now();
        if state.busy.load(Ordering::Acquire) > 0 {
            // It is idle at the earliest now, so its deadline is later still.
            return Wait::Busy(now + timeouts.idle);
        }
        let (at, reason) = match state.served.load(Ordering::Relaxed) {
            false => (state.accepted + timeouts.first_request, Reason::NoRequest),
            true => {
                let since = Duration::from_nanos(state.idle_since.load(Ordering::Relaxed));
                (self.table.epoch + since + timeouts.idle, Reason::Idle)
            }
        };
        if at > now {
            return Wait::Until(at, reason);
        }
        state.tell(reason);
        Wait::Close(state.close().unwrap_or(reason))
    }

    /// Whether a request is in flight.
    pub fn busy(&self) -> bool {
        self.state.busy.load(Ordering::Acquire) > 0
    }

    /// Resolves when the connection is told to close, or when its last
    /// request ends after that.
    pub async fn changed(&self) {
        self.state.notify.notified().await;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let (table, state) = (&self.0.table, &self.0.state);
        // Before `busy` drops: whoever sees it idle sees since when.
        state.idle_since.store(table.nanos(Instant::now()), Ordering::Relaxed);
        let order = table.idle_order.fetch_add(1, Ordering::Relaxed);
        state.idle_order.store(order, Ordering::Relaxed);
        let last = state.busy.fetch_sub(1, Ordering::AcqRel) == 1;
        if last && state.close().is_some() {
            state.notify.notify_one();
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        let mut inner = self.table.inner.lock().expect("not poisoned");
        inner.entries.remove(&self.id).expect("dropped once");
        if self.state.close() != Some(Reason::Evicted) {
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
        assert!(matches!(conn.wait(), Wait::Busy(_)));
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
    fn a_connection_told_to_close_keeps_the_first_reason() {
        let table = table(4);
        let (conn, _) = table.admit().unwrap();
        let busy = conn.request_started();
        assert_eq!(table.evict_idle(1), 0, "a busy connection is not evicted");
        table.stop();
        assert_eq!(table.evict_idle(1), 0, "nor one told to close");
        drop(busy);
        assert_eq!(conn.wait(), Wait::Close(Reason::Stopping));
        for reason in [Reason::Stopping, Reason::Evicted, Reason::NoRequest, Reason::Idle] {
            assert_eq!(Reason::from_code(reason.code()), Some(reason));
        }
        assert_eq!(Reason::from_code(0), None);
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
