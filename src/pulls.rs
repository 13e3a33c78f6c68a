//! When each image record was last pulled or built, kept in storage beside
//! the records (`cache/pulled/<image key>`, `{"at":<unix seconds>}`), so
//! that every replica's pulls count and a restart finds them; retention
//! decides by them.
//!
//! A pull is noted in memory only, in the image's [`Mark`] (an atomic, so
//! a pull of a cached tag takes no lock). [`Pulls::flush`] writes the
//! images pulled since their last write, and `serve` runs it once per
//! interval (an hour by default) and when it stops: a pull costs no
//! storage write of its own, an image is written at most once per interval
//! by each replica, and a replica killed outright loses at most the last
//! interval. A build writes its image's record at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;

use crate::storage::{Storage, StorageError};

/// Where the records are, below `cache/`.
const PREFIX: &str = "pulled";
/// Records written at once by a flush.
const WRITES_AT_ONCE: usize = 8;

/// One image's last pull as this replica saw it, and the last one it wrote.
#[derive(Debug, Default)]
pub struct Mark {
    pulled: AtomicU64,
    written: AtomicU64,
}

impl Mark {
    /// Notes a pull now.
    pub fn pulled(&self) {
        self.pulled.fetch_max(unix_now(), Ordering::Relaxed);
    }

    fn unwritten(&self) -> Option<u64> {
        let pulled = self.pulled.load(Ordering::Relaxed);
        (pulled > self.written.load(Ordering::Relaxed)).then_some(pulled)
    }
}

/// The last-pull records of one storage.
#[derive(Debug)]
pub struct Pulls {
    storage: Storage,
    marks: Mutex<HashMap<String, Arc<Mark>>>,
}

/// A record as stored.
#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    /// Unix seconds.
    at: u64,
}

impl Pulls {
    pub fn new(storage: Storage) -> Self {
        Pulls {
            storage,
            marks: Mutex::new(HashMap::new()),
        }
    }

    /// The mark of the image recorded under `key`.
    pub fn mark(&self, key: &str) -> Arc<Mark> {
        let mut marks = self.marks.lock().expect("no panics under the lock");
        Arc::clone(marks.entry(key.to_owned()).or_default())
    }

    /// Writes the record of an image just built under `key`.
    pub async fn built(&self, key: &str) -> Result<(), StorageError> {
        let (mark, at) = (self.mark(key), unix_now());
        mark.pulled.fetch_max(at, Ordering::Relaxed);
        write(&self.storage, key, at).await?;
        mark.written.fetch_max(at, Ordering::Relaxed);
        Ok(())
    }

    /// Writes the record of every image pulled since its last write; how
    /// many were written. Marks nothing holds and nothing changed go.
    pub async fn flush(&self) -> Result<usize, StorageError> {
        let due: Vec<(String, Arc<Mark>, u64)> = {
            let mut marks = self.marks.lock().expect("no panics under the lock");
            marks.retain(|_, mark| Arc::strong_count(mark) > 1 || mark.unwritten().is_some());
            (marks.iter())
                .filter_map(|(key, mark)| Some((key.clone(), Arc::clone(mark), mark.unwritten()?)))
                .collect()
        };
        let writes = futures::stream::iter(due.into_iter().map(|(key, mark, at)| {
            let storage = self.storage.clone();
            async move {
                write(&storage, &key, at).await?;
                mark.written.fetch_max(at, Ordering::Relaxed);
                Ok::<_, StorageError>(())
            }
        }))
        .buffer_unordered(WRITES_AT_ONCE);
        let results: Vec<_> = writes.collect().await;
        let written = results.iter().filter(|result| result.is_ok()).count();
        match results.into_iter().find_map(Result::err) {
            Some(error) => Err(error),
            None => Ok(written),
        }
    }
}

async fn write(storage: &Storage, key: &str, at: u64) -> Result<(), StorageError> {
    let bytes = serde_json::to_vec(&Record { at }).expect("a record serialises");
    storage.put_record(&record_key(key), Bytes::from(bytes)).await
}

fn record_key(image_key: &str) -> String {
    format!("{PREFIX}/{image_key}")
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Backend, StorageConfig};

    async fn pulls() -> (Pulls, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(&StorageConfig {
            backend: Backend::Filesystem(dir.path().join("storage")),
            redirect: None,
            spool: dir.path().join("spool"),
            blob_cache_bytes: 0,
        })
        .await
        .unwrap();
        (Pulls::new(storage), dir)
    }

    /// How many record files there are, and the written time of `key`.
    fn on_disk(dir: &tempfile::TempDir, key: &str) -> (usize, Option<u64>) {
        let folder = dir.path().join("storage/cache").join(PREFIX);
        let count = std::fs::read_dir(&folder).map_or(0, |entries| entries.count());
        let at = std::fs::read(folder.join(key))
            .ok()
            .map(|bytes| serde_json::from_slice::<Record>(&bytes).unwrap().at);
        (count, at)
    }

    #[tokio::test]
    async fn pulls_are_written_once_per_flush_and_only_when_new() {
        let (pulls, dir) = pulls().await;
        for _ in 0..100 {
            pulls.mark("a").pulled();
            pulls.mark("b").pulled();
        }
        assert_eq!(on_disk(&dir, "a").0, 0, "a pull writes nothing itself");
        assert_eq!(pulls.flush().await.unwrap(), 2);
        let (count, at) = on_disk(&dir, "a");
        assert_eq!(count, 2);
        assert!(at.unwrap() >= unix_now() - 5);
        assert_eq!(pulls.flush().await.unwrap(), 0, "nothing pulled since");
        assert_eq!(pulls.marks.lock().unwrap().len(), 0, "idle marks go");

        let mark = pulls.mark("a");
        mark.written.store(0, Ordering::Relaxed);
        mark.pulled();
        assert_eq!(pulls.flush().await.unwrap(), 1);
        assert_eq!(pulls.marks.lock().unwrap().len(), 1, "a held mark stays");
    }

    #[tokio::test]
    async fn a_build_is_written_at_once() {
        let (pulls, dir) = pulls().await;
        assert_eq!(on_disk(&dir, "k").1, None);
        pulls.built("k").await.unwrap();
        assert!(on_disk(&dir, "k").1.is_some());
        let at = on_disk(&dir, "k").1.unwrap();
        assert!(unix_now() - at < 5);
        assert_eq!(pulls.flush().await.unwrap(), 0, "already written");
    }
}
