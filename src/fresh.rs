//! Values worked out now and then and trusted for a while: a path source's
//! content hash, a git repository's refs, a flake's lock, the readiness
//! probe's answer. At most one refresh of a value runs at a time, on a task
//! of its own (a caller that goes away does not cancel it). Callers that
//! come while it runs get the previous value if it is recent enough, or
//! wait for the refresh; a failed refresh is remembered as long as a value
//! would be, so a source that is down is asked once per period, not once
//! per request.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::Shared;

type Flight<T, E> = Shared<Pin<Box<dyn Future<Output = Result<T, E>> + Send>>>;

/// A value refreshed at most once per `ttl`, one refresh at a time.
pub struct Fresh<T, E> {
    /// How long a value (or a failure) is trusted.
    ttl: Duration,
    /// How old a value may be and still be given out while its refresh runs.
    stale: Duration,
    state: Arc<Mutex<State<T, E>>>,
}

struct State<T, E> {
    /// The last value and when it was worked out.
    value: Option<(Instant, T)>,
    /// The last refresh's failure, when it failed, and when.
    failure: Option<(Instant, E)>,
    /// The refresh that is running.
    running: Option<Flight<T, E>>,
}

impl<T, E> std::fmt::Debug for Fresh<T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fresh").field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

impl<T, E> Fresh<T, E>
where
    T: Clone + Send + Sync + 'static,
    E: Clone + Send + Sync + 'static,
{
    pub fn new(ttl: Duration, stale: Duration) -> Self {
        Fresh {
            ttl,
            stale,
            state: Arc::new(Mutex::new(State {
                value: None,
                failure: None,
                running: None,
            })),
        }
    }

    /// The last value, however old, without refreshing it.
    pub fn known(&self) -> Option<T> {
        let state = self.state.lock().expect("not poisoned");
        state.value.as_ref().map(|(_, value)| value.clone())
    }

    /// The value: the trusted one, else the previous one while `refresh`
    /// (or a refresh another caller started) runs, else what that refresh
    /// gives.
    pub async fn get<F, Fut>(&self, refresh: F) -> Result<T, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let flight = {
            let mut state = self.state.lock().expect("not poisoned");
            let servable = |limit: Duration| {
                let (at, value) = state.value.as_ref()?;
                (at.elapsed() < limit).then(|| value.clone())
            };
            if let Some(value) = servable(self.ttl) {
                return Ok(value);
            }
            if let Some((at, error)) = &state.failure
                && at.elapsed() < self.ttl
            {
                return servable(self.stale).ok_or_else(|| error.clone());
            }
            let old = servable(self.stale);
            let flight = match &state.running {
                Some(flight) => flight.clone(),
                None => {
                    let flight = self.start(refresh());
                    state.running = Some(flight.clone());
                    flight
                }
            };
            if let Some(value) = old {
                return Ok(value);
            }
            flight
        };
        flight.await
    }

    /// Runs `refresh` on a task of its own, which records what it gives.
    fn start(&self, refresh: impl Future<Output = Result<T, E>> + Send + 'static) -> Flight<T, E> {
        let state = Arc::clone(&self.state);
        let task = tokio::spawn(async move {
            let result = refresh.await;
            let mut state = state.lock().expect("not poisoned");
            let now = Instant::now();
            match &result {
                Ok(value) => {
                    state.value = Some((now, value.clone()));
                    state.failure = None;
                }
                Err(error) => state.failure = Some((now, error.clone())),
            }
            state.running = None;
            result
        });
        let joined: Pin<Box<dyn Future<Output = Result<T, E>> + Send>> =
            Box::pin(task.map(|joined| joined.expect("refreshes do not panic")));
        joined.shared()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A refresh that counts its runs and waits `delay` before giving the count.
    fn counting(runs: &Arc<AtomicUsize>, delay: Duration) -> impl Future<Output = Result<usize, String>> + use<> {
        let runs = Arc::clone(runs);
        async move {
            let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
            tokio::time::sleep(delay).await;
            Ok(n)
        }
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_refresh() {
        let fresh = Arc::new(Fresh::new(Duration::from_secs(60), Duration::from_secs(600)));
        let runs = Arc::new(AtomicUsize::new(0));
        let callers = (0..50).map(|_| {
            let (fresh, runs) = (Arc::clone(&fresh), Arc::clone(&runs));
            tokio::spawn(async move { fresh.get(|| counting(&runs, Duration::from_millis(50))).await })
        });
        for caller in futures::future::join_all(callers).await {
            assert_eq!(caller.unwrap(), Ok(1));
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        assert_eq!(fresh.get(|| counting(&runs, Duration::ZERO)).await, Ok(1), "trusted");
        assert_eq!(fresh.known(), Some(1));
    }

    #[tokio::test]
    async fn an_old_value_is_given_out_while_its_refresh_runs() {
        let fresh = Fresh::new(Duration::from_millis(20), Duration::from_secs(600));
        let runs = Arc::new(AtomicUsize::new(0));
        assert_eq!(fresh.get(|| counting(&runs, Duration::ZERO)).await, Ok(1));
        tokio::time::sleep(Duration::from_millis(30)).await;
        let started = Instant::now();
        assert_eq!(fresh.get(|| counting(&runs, Duration::from_secs(5))).await, Ok(1));
        assert_eq!(
            fresh.get(|| counting(&runs, Duration::ZERO)).await,
            Ok(1),
            "still running"
        );
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "nobody waited for the refresh"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 2, "one refresh, started by the first");
    }

    #[tokio::test]
    async fn a_value_too_old_waits_for_its_refresh() {
        let fresh = Fresh::new(Duration::from_millis(10), Duration::from_millis(20));
        let runs = Arc::new(AtomicUsize::new(0));
        assert_eq!(fresh.get(|| counting(&runs, Duration::ZERO)).await, Ok(1));
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert_eq!(fresh.get(|| counting(&runs, Duration::ZERO)).await, Ok(2));
    }

    #[tokio::test]
    async fn failures_are_remembered_for_a_while() {
        let fresh: Fresh<usize, String> = Fresh::new(Duration::from_millis(50), Duration::from_secs(1));
        let runs = Arc::new(AtomicUsize::new(0));
        let failing = || {
            let runs = Arc::clone(&runs);
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Err::<usize, _>("down".to_owned())
            }
        };
        assert_eq!(fresh.get(failing).await, Err("down".into()));
        assert_eq!(fresh.get(failing).await, Err("down".into()));
        assert_eq!(runs.load(Ordering::SeqCst), 1, "asked once per period");
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(fresh.get(|| counting(&runs, Duration::ZERO)).await, Ok(2));
    }
}
