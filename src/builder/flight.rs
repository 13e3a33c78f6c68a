//! Admission of builds: one flight per key (whoever asks for a key that is
//! being built waits for that build), a bounded number of builds running
//! at once (the others wait for a slot), and per client a share of the new
//! flights it may have running and a rate at which it may start them (a
//! token bucket). A flight runs to its end even when everyone who waited
//! for it has gone. Knows nothing of what is built.
//!
//! A client's account (its running flights and its bucket) is kept only
//! while it has flights running or its bucket is not full: the map holds
//! the clients of about the last refill period, however many came before.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use tokio::sync::Semaphore;

use crate::client::Client;

/// Accounts kept before the first look for idle ones to drop.
const PRUNE_FROM: usize = 1024;

/// Why a client may start no new flight now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// It has this many flights of its own running already.
    ShareUsed(usize),
    /// It started its `per_minute` flights of the last minute; its next
    /// token comes in `retry_after`.
    RateUsed { per_minute: u32, retry_after: Duration },
}

/// How many new flights a client may start: `per_client` running at once,
/// and `per_minute` per minute (as many at once after a minute's pause).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub per_client: usize,
    pub per_minute: u32,
}

/// Flights by key, whose results are `T`.
pub struct Flights<T> {
    slots: Arc<Semaphore>,
    shares: Shares,
    running: Arc<Mutex<HashMap<String, Shared<BoxFuture<'static, T>>>>>,
}

impl<T: Clone + Send + Sync + 'static> Flights<T> {
    /// `slots` flights run at once; a client starts new ones within `limits`.
    pub fn new(slots: usize, limits: Limits) -> Self {
        Flights {
            slots: Arc::new(Semaphore::new(slots)),
            shares: Shares {
                limits,
                accounts: Arc::default(),
            },
            running: Arc::default(),
        }
    }

    /// Waits for the flight of `key`. When none is running, `start` is
    /// called at once and what it returns runs in a build slot, counted
    /// against `client`'s share and rate (`None`: against none); a client
    /// whose share or rate is used up may still join a running flight.
    pub async fn join<F>(&self, key: &str, client: Option<Client>, start: impl FnOnce() -> F) -> Result<T, Refused>
    where
        F: Future<Output = T> + Send + 'static,
    {
        let flight = {
            let mut running = self.running.lock().expect("not poisoned");
            match running.get(key) {
                Some(flight) => flight.clone(),
                None => {
                    let share = self.shares.take(client, Instant::now())?;
                    let flight = self.launch(key.to_owned(), share, start());
                    running.insert(key.to_owned(), flight.clone());
                    flight
                }
            }
        };
        Ok(flight.await)
    }

    /// Whether no flight is running.
    pub fn idle(&self) -> bool {
        self.running.lock().expect("not poisoned").is_empty()
    }

    /// Runs `work` on its own task, in a slot, keeping `share` until it
    /// ends; then `key` is free for a new flight.
    fn launch(
        &self,
        key: String,
        share: Option<Share>,
        work: impl Future<Output = T> + Send + 'static,
    ) -> Shared<BoxFuture<'static, T>> {
        let (slots, running) = (Arc::clone(&self.slots), Arc::clone(&self.running));
        let flight = async move {
            let _share = share;
            let result = {
                let _slot = slots.acquire().await.expect("never closed");
                work.await
            };
            running.lock().expect("not poisoned").remove(&key);
            result
        };
        // The flight's log lines carry the span (request id) of the request that started it.
        let task = tokio::spawn(tracing::Instrument::in_current_span(flight));
        task.map(|joined| joined.expect("flights do not panic"))
            .boxed()
            .shared()
    }
}

/// A client's flights running and its bucket of new ones.
#[derive(Debug)]
struct Account {
    running: usize,
    bucket: Bucket,
}

impl Account {
    /// Whether forgetting it changes nothing: no flight runs, the bucket is full.
    fn idle(&self, now: Instant) -> bool {
        self.running == 0 && self.bucket.full(now)
    }
}

/// A token bucket of `per_minute` tokens, one coming back every
/// `60 s / per_minute`, kept as the moment it is full again (before that,
/// one token is missing per refill interval still to go).
#[derive(Clone, Copy, Debug)]
struct Bucket {
    full_at: Instant,
}

impl Bucket {
    fn new(now: Instant) -> Self {
        Bucket { full_at: now }
    }

    fn full(&self, now: Instant) -> bool {
        self.full_at <= now
    }

    /// Takes a token; when none is left, how long until the next one.
    fn take(&mut self, per_minute: u32, now: Instant) -> Result<(), Duration> {
        let interval = Duration::from_secs(60) / per_minute.max(1);
        let full_at = self.full_at.max(now) + interval;
        let missing = full_at - now;
        let capacity = interval * per_minute.max(1);
        if missing > capacity {
            return Err(missing - capacity);
        }
        self.full_at = full_at;
        Ok(())
    }
}

/// Every client's account, within the limits.
struct Shares {
    limits: Limits,
    accounts: Arc<Mutex<HashMap<Client, Account>>>,
}

impl Shares {
    /// A share for `client` at `now`, unless it has all of its own running
    /// or has started all its rate allows.
    fn take(&self, client: Option<Client>, now: Instant) -> Result<Option<Share>, Refused> {
        let Some(client) = client else { return Ok(None) };
        let mut accounts = self.accounts.lock().expect("not poisoned");
        if accounts.len() >= PRUNE_FROM {
            accounts.retain(|_, account| !account.idle(now));
        }
        let account = accounts.entry(client).or_insert_with(|| Account {
            running: 0,
            bucket: Bucket::new(now),
        });
        self.admit(account, now)?;
        Ok(Some(Share {
            accounts: Arc::clone(&self.accounts),
            client,
        }))
    }

    /// Counts a new flight against `account`, if its share and rate allow.
    fn admit(&self, account: &mut Account, now: Instant) -> Result<(), Refused> {
        if account.running >= self.limits.per_client {
            return Err(Refused::ShareUsed(account.running));
        }
        let per_minute = self.limits.per_minute;
        (account.bucket.take(per_minute, now)).map_err(|retry_after| Refused::RateUsed {
            per_minute,
            retry_after,
        })?;
        account.running += 1;
        Ok(())
    }
}

/// One flight of a client's share, given back when dropped.
struct Share {
    accounts: Arc<Mutex<HashMap<Client, Account>>>,
    client: Client,
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut accounts = self.accounts.lock().expect("not poisoned");
        if let Some(account) = accounts.get_mut(&self.client) {
            account.running -= 1;
            if account.idle(Instant::now()) {
                accounts.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;

    fn limits(per_client: usize, per_minute: u32) -> Limits {
        Limits { per_client, per_minute }
    }

    fn client(last: u8) -> Option<Client> {
        Some(Client::of(std::net::IpAddr::from([192, 0, 2, last])))
    }

    /// A flight that ends when `release` is sent to, and counts its starts.
    fn gated(
        starts: &Arc<AtomicUsize>,
    ) -> (
        oneshot::Sender<()>,
        impl FnOnce() -> BoxFuture<'static, u32> + Send + use<>,
    ) {
        let (release, released) = oneshot::channel::<()>();
        let starts = Arc::clone(starts);
        let start = move || {
            starts.fetch_add(1, Ordering::SeqCst);
            async move {
                let _ = released.await;
                7
            }
            .boxed()
        };
        (release, start)
    }

    /// `flights.join(key, client, start)` on a task of its own.
    fn in_background(
        flights: &Arc<Flights<u32>>,
        key: &'static str,
        client: Option<Client>,
        start: impl FnOnce() -> BoxFuture<'static, u32> + Send + 'static,
    ) -> tokio::task::JoinHandle<Result<u32, Refused>> {
        let flights = Arc::clone(flights);
        tokio::spawn(async move { flights.join(key, client, start).await })
    }

    #[tokio::test]
    async fn one_flight_per_key() {
        let flights = Arc::new(Flights::<u32>::new(4, limits(4, 1000)));
        let starts = Arc::new(AtomicUsize::new(0));
        let (release, start) = gated(&starts);
        let first = in_background(&flights, "k", client(1), start);
        tokio::task::yield_now().await;
        let (_, again) = gated(&starts);
        let second = in_background(&flights, "k", client(2), again);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!flights.idle());
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap(), Ok(7));
        assert_eq!(second.await.unwrap(), Ok(7));
        assert_eq!(
            starts.load(Ordering::SeqCst),
            1,
            "the second caller joined the first flight"
        );
        assert!(flights.idle());
    }

    #[tokio::test]
    async fn slots_bound_the_flights_running_at_once() {
        let flights = Arc::new(Flights::<u32>::new(2, limits(10, 1000)));
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let joins: Vec<_> = (0..6)
            .map(|i| {
                let (flights, running, most) = (Arc::clone(&flights), Arc::clone(&running), Arc::clone(&most));
                tokio::spawn(async move {
                    flights
                        .join(&format!("k{i}"), None, move || async move {
                            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                            most.fetch_max(now, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            running.fetch_sub(1, Ordering::SeqCst);
                            i
                        })
                        .await
                })
            })
            .collect();
        for (i, join) in joins.into_iter().enumerate() {
            assert_eq!(join.await.unwrap(), Ok(i as u32));
        }
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_client_starts_only_its_share_and_gets_it_back() {
        let flights = Arc::new(Flights::<u32>::new(4, limits(1, 1000)));
        let starts = Arc::new(AtomicUsize::new(0));
        let (release, start) = gated(&starts);
        let mine = in_background(&flights, "a", client(1), start);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (_, other) = gated(&starts);
        assert_eq!(flights.join("b", client(1), other).await, Err(Refused::ShareUsed(1)));
        assert_eq!(starts.load(Ordering::SeqCst), 1, "a refused flight never starts");
        let (_, join) = gated(&starts);
        let joined = in_background(&flights, "a", client(1), join);
        let (release_other, other) = gated(&starts);
        release_other.send(()).unwrap();
        assert_eq!(
            flights.join("c", client(2), other).await,
            Ok(7),
            "another client has its own share"
        );
        release.send(()).unwrap();
        assert_eq!(mine.await.unwrap(), Ok(7));
        assert_eq!(joined.await.unwrap(), Ok(7), "joining a running flight needs no share");
        let (release, again) = gated(&starts);
        release.send(()).unwrap();
        assert_eq!(flights.join("b", client(1), again).await, Ok(7), "the share came back");
    }

    #[tokio::test]
    async fn a_flight_finishes_when_its_callers_are_gone() {
        let flights = Arc::new(Flights::<u32>::new(1, limits(1, 1000)));
        let finished = Arc::new(AtomicUsize::new(0));
        let done = Arc::clone(&finished);
        let waiting = tokio::spawn({
            let flights = Arc::clone(&flights);
            async move {
                flights
                    .join("k", client(1), move || async move {
                        tokio::time::sleep(Duration::from_millis(30)).await;
                        done.fetch_add(1, Ordering::SeqCst);
                        1
                    })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        waiting.abort();
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(finished.load(Ordering::SeqCst), 1);
        assert!(flights.idle());
    }

    #[test]
    fn a_bucket_gives_its_burst_then_one_token_per_interval() {
        let start = Instant::now();
        let mut bucket = Bucket::new(start);
        for _ in 0..3 {
            assert_eq!(bucket.take(3, start), Ok(()));
        }
        assert_eq!(
            bucket.take(3, start),
            Err(Duration::from_secs(20)),
            "the next token in 60 s / 3"
        );
        let later = start + Duration::from_secs(15);
        assert_eq!(
            bucket.take(3, later),
            Err(Duration::from_secs(5)),
            "a refusal costs nothing"
        );
        let refilled = start + Duration::from_secs(20);
        assert_eq!(bucket.take(3, refilled), Ok(()));
        assert_eq!(bucket.take(3, refilled), Err(Duration::from_secs(20)));
        let full = start + Duration::from_secs(80);
        assert!(bucket.full(full));
        for _ in 0..3 {
            assert_eq!(bucket.take(3, full), Ok(()), "a full bucket gives its burst again");
        }
    }

    #[test]
    fn a_client_starts_only_its_rate_and_others_keep_theirs() {
        let shares = Shares {
            limits: limits(10, 2),
            accounts: Arc::default(),
        };
        let now = Instant::now();
        let mine: Vec<_> = (0..2).map(|_| shares.take(client(1), now).unwrap()).collect();
        drop(mine);
        assert_eq!(
            shares.take(client(1), now).err(),
            Some(Refused::RateUsed {
                per_minute: 2,
                retry_after: Duration::from_secs(30)
            }),
            "finished flights still count against the rate"
        );
        assert!(
            shares.take(client(2), now).unwrap().is_some(),
            "another client has its own rate"
        );
        assert!(shares.take(None, now).unwrap().is_none(), "no client, no limit");
        let next = now + Duration::from_secs(30);
        assert!(shares.take(client(1), next).unwrap().is_some(), "the next token came");
    }

    #[test]
    fn idle_clients_with_full_buckets_are_forgotten() {
        let shares = Shares {
            limits: limits(1, 60),
            accounts: Arc::default(),
        };
        let start = Instant::now();
        let count = || shares.accounts.lock().unwrap().len();
        for i in 0..PRUNE_FROM as u32 {
            let address = std::net::IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            let share = shares.take(Some(Client::of(address)), start).unwrap();
            drop(share);
        }
        assert_eq!(count(), PRUNE_FROM, "each bucket still misses its token");
        let running = shares.take(client(1), start + Duration::from_secs(2)).unwrap();
        assert_eq!(count(), 1, "only the account in use is left");
        drop(running);
        assert_eq!(count(), 1, "its bucket is not full yet");
        let earlier = Instant::now() - Duration::from_secs(2);
        let share = shares.take(client(2), earlier).unwrap();
        drop(share);
        assert_eq!(
            count(),
            1,
            "an account whose bucket is full when its last flight ends goes at once"
        );
    }

    #[tokio::test]
    async fn joining_a_running_flight_costs_no_token() {
        let flights = Arc::new(Flights::<u32>::new(4, limits(4, 1)));
        let starts = Arc::new(AtomicUsize::new(0));
        let (release, start) = gated(&starts);
        let first = in_background(&flights, "a", client(1), start);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (_, join) = gated(&starts);
        let joined = in_background(&flights, "a", client(1), join);
        let (_, other) = gated(&starts);
        let refused = flights.join("b", client(1), other).await;
        assert!(
            matches!(refused, Err(Refused::RateUsed { per_minute: 1, retry_after }) if retry_after > Duration::from_secs(59)),
            "{refused:?}"
        );
        release.send(()).unwrap();
        assert_eq!(first.await.unwrap(), Ok(7));
        assert_eq!(joined.await.unwrap(), Ok(7), "joining needed no token");
        assert_eq!(starts.load(Ordering::SeqCst), 1);
    }
}
