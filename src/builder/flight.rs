//! Admission of builds: one flight per key (whoever asks for a key that is
//! being built waits for that build), a bounded number of builds running
//! at once (the others wait for a slot), and a share per client of the new
//! flights it may start. A flight runs to its end even when everyone who
//! waited for it has gone. Knows nothing of what is built.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use tokio::sync::Semaphore;

use crate::client::Client;

/// The client already has this many flights of its own running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShareUsed(pub usize);

/// Flights by key, whose results are `T`.
pub struct Flights<T> {
    slots: Arc<Semaphore>,
    shares: Shares,
    running: Arc<Mutex<HashMap<String, Shared<BoxFuture<'static, T>>>>>,
}

impl<T: Clone + Send + Sync + 'static> Flights<T> {
    /// `slots` flights run at once; a client starts at most `per_client`.
    pub fn new(slots: usize, per_client: usize) -> Self {
        Flights {
            slots: Arc::new(Semaphore::new(slots)),
            shares: Shares {
                per_client,
                taken: Arc::default(),
            },
            running: Arc::default(),
        }
    }

    /// Waits for the flight of `key`. When none is running, `start` is
    /// called at once and what it returns runs in a build slot, counted
    /// against `client`'s share (`None`: against no share); a client whose
    /// share is used up may still join a running flight.
    pub async fn join<F>(&self, key: &str, client: Option<Client>, start: impl FnOnce() -> F) -> Result<T, ShareUsed>
    where
        F: Future<Output = T> + Send + 'static,
    {
        let flight = {
            let mut running = self.running.lock().expect("not poisoned");
            match running.get(key) {
                Some(flight) => flight.clone(),
                None => {
                    let share = self.shares.take(client)?;
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

/// How many flights each client has started and not seen end.
struct Shares {
    per_client: usize,
    taken: Arc<Mutex<HashMap<Client, usize>>>,
}

impl Shares {
    /// A share for `client`, unless it has all of its own.
    fn take(&self, client: Option<Client>) -> Result<Option<Share>, ShareUsed> {
        let Some(client) = client else { return Ok(None) };
        let mut taken = self.taken.lock().expect("not poisoned");
        let count = taken.entry(client).or_insert(0);
        if *count >= self.per_client {
            return Err(ShareUsed(*count));
        }
        *count += 1;
        Ok(Some(Share {
            taken: Arc::clone(&self.taken),
            client,
        }))
    }
}

/// One flight of a client's share, given back when dropped.
struct Share {
    taken: Arc<Mutex<HashMap<Client, usize>>>,
    client: Client,
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut taken = self.taken.lock().expect("not poisoned");
        if let Some(count) = taken.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                taken.remove(&self.client);
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
    ) -> tokio::task::JoinHandle<Result<u32, ShareUsed>> {
        let flights = Arc::clone(flights);
        tokio::spawn(async move { flights.join(key, client, start).await })
    }

    #[tokio::test]
    async fn one_flight_per_key() {
        let flights = Arc::new(Flights::<u32>::new(4, 4));
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
        let flights = Arc::new(Flights::<u32>::new(2, 10));
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
        let flights = Arc::new(Flights::<u32>::new(4, 1));
        let starts = Arc::new(AtomicUsize::new(0));
        let (release, start) = gated(&starts);
        let mine = in_background(&flights, "a", client(1), start);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (_, other) = gated(&starts);
        assert_eq!(flights.join("b", client(1), other).await, Err(ShareUsed(1)));
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
        let flights = Arc::new(Flights::<u32>::new(1, 1));
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
}
