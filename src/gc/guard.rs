//! The builder's side of safe deletion: a record a pull trusts (an image
//! or index record) is written only while no collector sweeps, right after
//! a check that every blob it names is in storage, and within [`WINDOW`]
//! of the look at the collector's lease. A collector that starts sweeping
//! waits [`super::SETTLE`] (longer than the window) before it lists the
//! records again, so it sees any record written by a builder that saw no
//! sweep, and keeps that record's blobs; a builder that looks later waits
//! for the sweep to end, and then finds what it deleted missing.

use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use super::{GC_LEASE, SWEEPING};
use crate::digest::Digest;
use crate::leases::Leases;
use crate::storage::{Storage, StorageError};

/// How long after its look at the lease a builder may still write.
pub const WINDOW: Duration = Duration::from_secs(5);
/// How often a builder looks whether a sweep has ended.
const POLL: Duration = Duration::from_millis(500);
/// Tries before giving up on a store too slow to write within the window.
const ATTEMPTS: usize = 4;
/// Blobs checked at once.
const CHECKS_AT_ONCE: usize = 16;

/// What [`publish`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Published {
    Written,
    /// Nothing was written: this blob is not in storage (pack it again).
    Missing(Digest),
}

#[derive(Debug, thiserror::Error)]
#[error("storage took longer than {WINDOW:?} to check and write a record, {ATTEMPTS} times")]
pub struct TooSlow;

/// Runs `write` once every blob of `blobs` is known to be in storage and no
/// collector is sweeping, within the window.
pub async fn publish<'a>(
    storage: &Storage,
    leases: &Leases,
    blobs: &[&Digest],
    write: impl Fn() -> BoxFuture<'a, Result<(), StorageError>> + Send + Sync,
) -> Result<Published, StorageError> {
    for _ in 0..ATTEMPTS {
        wait_while_sweeping(leases).await?;
        let looked = Instant::now();
        if let Some(missing) = first_missing(storage, blobs).await? {
            return Ok(Published::Missing(missing));
        }
        if looked.elapsed() >= WINDOW {
            continue;
        }
        write().await?;
        if looked.elapsed() < WINDOW {
            return Ok(Published::Written);
        }
        // Written too late for a collector that began meanwhile to have
        // seen it: look and check again (the record may name blobs it
        // deleted, and a missing one is packed again).
    }
    Err(StorageError::Io(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        TooSlow,
    )))
}

/// Returns once no collector holds its lease in the sweeping phase.
async fn wait_while_sweeping(leases: &Leases) -> Result<(), StorageError> {
    let mut waited = false;
    while let Some(state) = leases.current(GC_LEASE).await?
        && state.live()
        && state.phase.as_deref() == Some(SWEEPING)
    {
        if !waited {
            tracing::info!(holder = %state.holder, "a garbage collection is sweeping: recording the image when it ends");
            waited = true;
        }
        tokio::time::sleep(POLL).await;
    }
    Ok(())
}

async fn first_missing(storage: &Storage, blobs: &[&Digest]) -> Result<Option<Digest>, StorageError> {
    for chunk in blobs.chunks(CHECKS_AT_ONCE) {
        let sizes = futures::future::try_join_all(chunk.iter().map(|digest| storage.blob_size(digest))).await?;
        if let Some(missing) = sizes.iter().position(Option::is_none) {
            return Ok(Some(chunk[missing].clone()));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use futures::FutureExt;

    use super::*;
    use crate::leases::Take;

    #[tokio::test]
    async fn a_record_waits_for_a_sweep_and_names_only_blobs_that_exist() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::filesystem(dir.path()).await.unwrap();
        let leases = Leases::new(storage.clone());
        let there = Digest::of(b"there");
        storage.put_blob(&there, Bytes::from_static(b"there")).await.unwrap();
        let gone = Digest::of(b"gone");
        let writes = AtomicUsize::new(0);
        let write = || {
            writes.fetch_add(1, Ordering::Relaxed);
            async { Ok(()) }.boxed()
        };
        let published = publish(&storage, &leases, &[&there, &gone], write).await.unwrap();
        assert_eq!(published, Published::Missing(gone));
        assert_eq!(writes.load(Ordering::Relaxed), 0);

        let Take::Held { lease, .. } = leases
            .take(GC_LEASE, Duration::from_secs(60), Some(SWEEPING))
            .await
            .unwrap()
        else {
            panic!("the lease is free")
        };
        let sweep = async {
            tokio::time::sleep(Duration::from_millis(700)).await;
            assert_eq!(writes.load(Ordering::Relaxed), 0, "nothing written during the sweep");
            lease.release().await.unwrap();
        };
        let only = [&there];
        let (published, ()) = tokio::join!(publish(&storage, &leases, &only, write), sweep);
        assert_eq!(published.unwrap(), Published::Written);
        assert_eq!(writes.load(Ordering::Relaxed), 1);
    }
}
