//! Leases in storage: which one of the replicas sharing a store does a
//! piece of work (builds one image, runs the garbage collector) while the
//! others wait. A lease expires unless its holder renews it, so a holder
//! that dies frees it.
//!
//! A lease named `n` is a series of objects `cache/leases/<n>/<seq>`, only
//! the newest of which counts. Taking it means creating the next one with a
//! conditional create (put-if-absent), so of replicas taking it at once
//! exactly one succeeds, whether the lease was free, released or expired:
//! no object is ever replaced by someone who does not own it. Its holder
//! renews and releases it by rewriting its own object; a renewal finds out
//! from a newer object that the lease was taken over meanwhile. The winner
//! of a new object deletes the older ones, so at most two are left.
//!
//! A lease whose work left nothing else in storage (a build that failed)
//! is ended: released, then its objects deleted, so that it leaves nothing
//! either; `nixery gc` deletes the series that are released or expired the
//! same way. Ending restarts the series: a taker that listed it before the
//! deletion creates the next object, one that lists it after creates the
//! first, and both may succeed, so two hold the lease at once. For a build
//! lease that costs one build more of the image (the same bytes; blobs are
//! written only where nothing is, records are the same), as when a holder
//! too slow to renew is taken over; the holder of the lower object learns
//! it at its next renewal. Object keys are [`SEQ_DIGITS`] digits; anything
//! else listed there (a temporary file of a folder's write) is no object.
//!
//! A store that cannot create conditionally (some S3 services) has no
//! leases: [`Take::Unsupported`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::storage::{Created, Storage, StorageError};

const PREFIX: &str = "leases";
/// The digits of an object's sequence number in its key.
const SEQ_DIGITS: usize = 20;

/// A lease object's contents.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct State {
    /// Who holds it (host, process and start time).
    pub holder: String,
    /// Unix milliseconds, by the holder's clock.
    pub expires_ms: u64,
    /// What the holder is doing, for those who read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default)]
    pub released: bool,
}

impl State {
    /// Held now: neither released nor expired.
    pub fn live(&self) -> bool {
        !self.released && unix_ms() < self.expires_ms
    }
}

/// What taking a lease found.
#[derive(Debug)]
pub enum Take {
    /// The lease is ours; `took_over` if its last holder let it expire.
    Held { lease: Box<Lease>, took_over: bool },
    /// Someone else holds it.
    Busy(State),
    /// The store cannot create conditionally.
    Unsupported,
}

/// The leases of one store, taken as one holder.
#[derive(Clone, Debug)]
pub struct Leases {
    storage: Storage,
    holder: String,
}

/// A held lease.
#[derive(Debug)]
pub struct Lease {
    storage: Storage,
    name: String,
    seq: u64,
    state: State,
    ttl: Duration,
}

impl Leases {
    pub fn new(storage: Storage) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        let holder = format!("{}/{}/{}", host.trim(), std::process::id(), unix_ms());
        Leases { storage, holder }
    }

    /// Takes the lease `name` for `ttl` unless someone holds it.
    pub async fn take(&self, name: &str, ttl: Duration, phase: Option<&str>) -> Result<Take, StorageError> {
        let newest = self.newest(name).await?;
        let took_over = match &newest {
            Some((_, state)) if state.live() => return Ok(Take::Busy(state.clone())),
            Some((_, state)) => !state.released,
            None => false,
        };
        let seq = newest.as_ref().map_or(1, |(seq, _)| seq + 1);
        let state = State {
            holder: self.holder.clone(),
            expires_ms: unix_ms() + ttl.as_millis() as u64,
            phase: phase.map(str::to_owned),
            released: false,
        };
        let created = self.storage.create_record(&object(name, seq), encode(&state)).await;
        match created {
            Ok(Created::Created) => {}
            Ok(Created::Exists) => {
                let winner = self.read(name, seq).await?;
                return Ok(Take::Busy(winner.unwrap_or(state)));
            }
            Err(StorageError::NoConditionalCreate) => return Ok(Take::Unsupported),
            Err(e) => return Err(e),
        }
        for older in newest.iter().map(|(seq, _)| *seq) {
            self.storage.delete_record(&object(name, older)).await?;
        }
        let lease = Box::new(Lease {
            storage: self.storage.clone(),
            name: name.to_owned(),
            seq,
            state,
            ttl,
        });
        Ok(Take::Held { lease, took_over })
    }

    /// The lease's state, if anyone has taken it.
    pub async fn current(&self, name: &str) -> Result<Option<State>, StorageError> {
        Ok(self.newest(name).await?.map(|(_, state)| state))
    }

    async fn newest(&self, name: &str) -> Result<Option<(u64, State)>, StorageError> {
        let Some(seq) = self.seqs(name).await?.into_iter().max() else {
            return Ok(None);
        };
        // Gone since the listing: deleted by a newer taker, who holds it,
        // or by its holder ending it (then free a moment later).
        Ok(Some((seq, self.read(name, seq).await?.unwrap_or_else(unknown_holder))))
    }

    async fn seqs(&self, name: &str) -> Result<Vec<u64>, StorageError> {
        seqs(&self.storage, name).await
    }

    async fn read(&self, name: &str, seq: u64) -> Result<Option<State>, StorageError> {
        let bytes = self.storage.get_record(&object(name, seq)).await?;
        Ok(bytes.and_then(|b| serde_json::from_slice(&b).ok()))
    }
}

impl Lease {
    /// Extends the lease by its time to live, with `phase`; `false` if it
    /// was taken over meanwhile (it had expired), when it is no longer ours.
    pub async fn renew(&mut self, phase: Option<&str>) -> Result<bool, StorageError> {
        if seqs(&self.storage, &self.name)
            .await?
            .into_iter()
            .any(|seq| seq > self.seq)
        {
            return Ok(false);
        }
        self.state.expires_ms = unix_ms() + self.ttl.as_millis() as u64;
        self.state.phase = phase.map(str::to_owned);
        self.write().await?;
        Ok(true)
    }

    /// Frees the lease for the next taker.
    pub async fn release(mut self) -> Result<(), StorageError> {
        self.state.released = true;
        self.write().await
    }

    /// Releases the lease and deletes its objects (ours and any older
    /// one; a newer one is someone else's), leaving nothing of it in
    /// storage. See the module's doc for a taker at that moment.
    pub async fn end(self) -> Result<(), StorageError> {
        let (storage, name, seq) = (self.storage.clone(), self.name.clone(), self.seq);
        self.release().await?;
        for older in seqs(&storage, &name).await?.into_iter().filter(|&s| s <= seq) {
            storage.delete_record(&object(&name, older)).await?;
        }
        Ok(())
    }

    /// How long the lease lasts from a renewal.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    async fn write(&self) -> Result<(), StorageError> {
        self.storage
            .put_record(&object(&self.name, self.seq), encode(&self.state))
            .await
    }
}

/// The state of an object deleted between listing and reading it: held by
/// the newer taker who deleted it, for a moment at least (or ended).
fn unknown_holder() -> State {
    State {
        holder: "unknown".into(),
        expires_ms: unix_ms() + 1000,
        phase: None,
        released: false,
    }
}

/// The sequence numbers of the lease `name`'s objects in storage.
async fn seqs(storage: &Storage, name: &str) -> Result<Vec<u64>, StorageError> {
    let listed = storage.list_records_meta(&format!("{PREFIX}/{name}")).await?;
    Ok(listed.iter().filter_map(|l| seq_of(&l.key)).collect())
}

/// The sequence number an object's key holds, if it is one.
fn seq_of(key: &str) -> Option<u64> {
    let digits = key.len() == SEQ_DIGITS && key.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| key.parse().ok()).flatten()
}

fn object(name: &str, seq: u64) -> String {
    format!("{PREFIX}/{name}/{seq:0SEQ_DIGITS$}")
}

fn encode(state: &State) -> Bytes {
    Bytes::from(serde_json::to_vec(state).expect("a lease serialises"))
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn leases() -> (Leases, Leases, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::filesystem(dir.path()).await.unwrap();
        let mut other = Leases::new(storage.clone());
        other.holder.push_str("-other");
        (Leases::new(storage), other, dir)
    }

    fn held(take: Take) -> (Lease, bool) {
        match take {
            Take::Held { lease, took_over } => (*lease, took_over),
            other => panic!("not held: {other:?}"),
        }
    }

    #[tokio::test]
    async fn one_holder_at_a_time_until_released() {
        let (a, b, _dir) = leases().await;
        let ttl = Duration::from_secs(60);
        let (lease, took_over) = held(a.take("x", ttl, Some("marking")).await.unwrap());
        assert!(!took_over);
        match b.take("x", ttl, None).await.unwrap() {
            Take::Busy(state) => assert_eq!(state.phase.as_deref(), Some("marking")),
            other => panic!("{other:?}"),
        }
        lease.release().await.unwrap();
        let (_lease, took_over) = held(b.take("x", ttl, None).await.unwrap());
        assert!(!took_over, "a released lease is not taken over");
        assert_eq!(b.seqs("x").await.unwrap(), [2], "older objects go");
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_once_and_its_holder_learns_it() {
        let (a, b, _dir) = leases().await;
        let (mut lease, _) = held(a.take("x", Duration::from_millis(1), None).await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (first, second) = tokio::join!(
            b.take("x", Duration::from_secs(60), None),
            a.take("x", Duration::from_secs(60), None)
        );
        let winners = [first.unwrap(), second.unwrap()]
            .into_iter()
            .filter(|t| matches!(t, Take::Held { took_over: true, .. }))
            .count();
        assert_eq!(winners, 1, "exactly one takes it over");
        assert!(!lease.renew(None).await.unwrap(), "the old holder lost it");
    }

    #[tokio::test]
    async fn an_ended_lease_leaves_nothing_and_can_be_taken_again() {
        let (a, b, dir) = leases().await;
        let ttl = Duration::from_secs(60);
        let (first, _) = held(a.take("build/x", ttl, None).await.unwrap());
        first.release().await.unwrap();
        let (second, _) = held(a.take("build/x", ttl, None).await.unwrap());
        second.end().await.unwrap();
        assert_eq!(a.seqs("build/x").await.unwrap(), Vec::<u64>::new());
        let folder = dir.path().join("cache/leases/build/x");
        let left = std::fs::read_dir(&folder).map_or(0, |files| files.count());
        assert_eq!(left, 0, "no object of the series is left in {folder:?}");
        let (_lease, took_over) = held(b.take("build/x", ttl, None).await.unwrap());
        assert!(!took_over, "an ended lease is free");
    }

    #[test]
    fn only_sequence_numbers_are_objects() {
        assert_eq!(seq_of("00000000000000000003"), Some(3));
        assert_eq!(seq_of("00000000000000000003#1"), None, "a folder's temporary file");
        assert_eq!(seq_of("3"), None);
        assert_eq!(seq_of("0000000000000000000x"), None);
        assert_eq!(object("gc", 3), "leases/gc/00000000000000000003");
    }
}
