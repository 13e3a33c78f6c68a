//! What the landing page and the metrics show of storage: the bytes and
//! objects in it, and the last garbage collection, which its collector
//! records (`cache/gc/last`) for every replica to read. `serve` measures
//! it at start, every pull-record interval and after its own collections.
//! (`serve` hands the figures to the metrics.) `serve` also looks at the
//! record every [`NOTICE_EVERY`] ([`Watch`]), so that a collection by
//! another process is noticed within that long and its replica forgets
//! what it remembered of storage.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::Report;
use crate::storage::{Storage, StorageError};

const RECORD: &str = "gc/last";

/// How often `serve` looks for a collection that ended since it last looked.
pub const NOTICE_EVERY: Duration = Duration::from_secs(10);

/// A collection as its collector recorded it.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LastGc {
    /// Unix seconds when it ended.
    pub at: u64,
    /// Bytes of blobs deleted, and objects (blobs and records).
    pub deleted_bytes: u64,
    pub deleted_objects: u64,
    /// What storage held afterwards (less what others wrote meanwhile).
    pub store_bytes: u64,
    pub store_objects: u64,
}

impl LastGc {
    /// The record of a collection that deleted what `report` says, before
    /// storage is measured again.
    pub fn from_report(report: &Report) -> Self {
        let deleted_objects = (report.blobs_deleted + report.records_deleted) as u64;
        LastGc {
            at: unix_now(),
            deleted_bytes: report.bytes_deleted,
            deleted_objects,
            store_bytes: report.store_bytes_before.saturating_sub(report.bytes_deleted),
            store_objects: report.store_objects_before.saturating_sub(deleted_objects),
        }
    }

    pub async fn write(&self, storage: &Storage) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(self).expect("a record serialises");
        storage.put_record(RECORD, Bytes::from(bytes)).await
    }

    async fn read(storage: &Storage) -> Result<Option<Self>, StorageError> {
        let bytes = storage.get_record(RECORD).await?;
        Ok(bytes.and_then(|b| serde_json::from_slice(&b).ok()))
    }
}

/// What a replica saw of the last collection, to notice the next.
#[derive(Debug, Default)]
pub struct Watch {
    seen: Option<LastGc>,
}

impl Watch {
    /// Whether a collection that deleted something ended since the last
    /// look (at the first look: since the record was found).
    pub async fn collected(&mut self, storage: &Storage) -> Result<bool, StorageError> {
        let last = LastGc::read(storage).await?;
        let new = last.is_some() && last != self.seen;
        let deleted = last.as_ref().is_some_and(|gc| gc.deleted_objects > 0);
        self.seen = last;
        Ok(new && deleted)
    }
}

/// Storage as last measured.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StorageUse {
    pub bytes: u64,
    pub objects: u64,
    /// Unix seconds.
    pub measured_at: u64,
    pub last_gc: Option<LastGc>,
}

/// The last measurement, shared by the pages and the metrics.
#[derive(Clone, Debug, Default)]
pub struct Status(Arc<RwLock<Option<StorageUse>>>);

impl Status {
    pub fn get(&self) -> Option<StorageUse> {
        self.0.read().expect("no panics under the lock").clone()
    }

    /// Measures storage (one listing of it) and keeps the figures.
    pub async fn measure(&self, storage: &Storage) -> Result<StorageUse, StorageError> {
        let (bytes, objects) = storage.usage().await?;
        let measured = StorageUse {
            bytes,
            objects,
            measured_at: unix_now(),
            last_gc: LastGc::read(storage).await?,
        };
        *self.0.write().expect("no panics under the lock") = Some(measured.clone());
        Ok(measured)
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_watch_notices_each_collection_that_deleted_something_once() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::filesystem(dir.path()).await.unwrap();
        let mut watch = Watch::default();
        assert!(!watch.collected(&storage).await.unwrap(), "none yet");
        let gc = |at, deleted_objects| LastGc {
            at,
            deleted_objects,
            ..LastGc::default()
        };
        gc(1, 3).write(&storage).await.unwrap();
        assert!(watch.collected(&storage).await.unwrap());
        assert!(!watch.collected(&storage).await.unwrap(), "once");
        gc(2, 0).write(&storage).await.unwrap();
        assert!(!watch.collected(&storage).await.unwrap(), "it deleted nothing");
        gc(3, 1).write(&storage).await.unwrap();
        assert!(watch.collected(&storage).await.unwrap());
    }
}
