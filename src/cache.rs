//! Records of what was built, by key: which manifests an image resolved to
//! (per layer set), which index a multi-arch tag resolved to, which blob a
//! layer's contents were packed into, and which artifacts (SBOMs,
//! provenance) refer to a manifest. Kept in
//! memory (moka, bounded) in front of records in storage, so that a
//! restarted registry finds them too. Beside them, in storage only: each
//! image's layer plan as built (for its web page), and which images use
//! each blob, so that a blob lost from storage can be traced to the
//! records that name it.

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use moka::future::Cache;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::archive::LayerDigests;
use crate::digest::Digest;
use crate::oci::{Format, Referrer};
use crate::storage::{Storage, StorageError};

const IMAGE_ENTRIES: u64 = 10_000;
const LAYER_ENTRIES: u64 = 100_000;
/// Where the images that use a blob are noted: `blob-users/<hex>/<image key>`.
const USERS: &str = "blob-users";
/// Where the artifacts that refer to a manifest are listed: `referrers/<hex>`.
pub const REFERRERS: &str = "referrers";
/// Notes written at once.
const NOTES_AT_ONCE: usize = 8;

/// A built manifest.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ManifestRecord {
    pub digest: Digest,
    pub media_type: String,
    pub size: u64,
}

/// One architecture's image: the manifests of the formats that share one
/// layer set (both, unless OCI manifests get other compression).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageRecord {
    pub manifests: Vec<(Format, ManifestRecord)>,
}

impl ImageRecord {
    pub fn manifest(&self, format: Format) -> Option<&ManifestRecord> {
        self.manifests.iter().find(|(f, _)| *f == format).map(|(_, m)| m)
    }
}

/// An image's layers as built: what each holds and where it was packed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PlanRecord {
    pub layers: Vec<PlanLayer>,
}

/// One layer of a [`PlanRecord`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PlanLayer {
    /// Store path names without their hash (`hello-2.12.1`), or a
    /// description of the root filesystem layer.
    pub contents: Vec<String>,
    /// Bytes of store contents (the sum of their NAR sizes).
    pub bytes: u64,
    /// The layer's cache key.
    pub key: String,
    pub packed: LayerDigests,
}

/// The image, index, layer and referrer caches.
#[derive(Clone)]
pub struct Caches {
    storage: Storage,
    images: Cache<String, ImageRecord>,
    indexes: Cache<String, ManifestRecord>,
    layers: Cache<String, LayerDigests>,
    referrers: Cache<String, Vec<Referrer>>,
}

impl Caches {
    pub fn new(storage: Storage) -> Self {
        Caches {
            storage,
            images: Cache::new(IMAGE_ENTRIES),
            indexes: Cache::new(IMAGE_ENTRIES),
            layers: Cache::new(LAYER_ENTRIES),
            referrers: Cache::new(IMAGE_ENTRIES),
        }
    }

    pub async fn image(&self, key: &str) -> Result<Option<ImageRecord>, StorageError> {
        lookup(&self.storage, &self.images, "images", key).await
    }

    pub async fn put_image(&self, key: &str, record: ImageRecord) -> Result<(), StorageError> {
        store(&self.storage, &self.images, "images", key, record).await
    }

    /// Drops an image record that names a manifest storage lost.
    pub async fn forget_image(&self, key: &str) -> Result<(), StorageError> {
        self.images.invalidate(key).await;
        self.storage.delete_record(&format!("images/{key}")).await
    }

    /// An image's layer plan, read from storage (pages are rare: not kept in memory).
    pub async fn plan(&self, key: &str) -> Result<Option<PlanRecord>, StorageError> {
        let Some(bytes) = self.storage.get_record(&format!("plans/{key}")).await? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice(&bytes).ok())
    }

    pub async fn put_plan(&self, key: &str, plan: &PlanRecord) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(plan).expect("records serialise");
        self.storage
            .put_record(&format!("plans/{key}"), Bytes::from(bytes))
            .await
    }

    /// Notes that the image record `image_key` names each of `blobs`.
    pub async fn note_users(&self, image_key: &str, blobs: &[&Digest]) -> Result<(), StorageError> {
        let records: Vec<String> = blobs
            .iter()
            .map(|blob| format!("{USERS}/{}/{image_key}", blob.hex()))
            .collect();
        futures::stream::iter(records)
            .map(|record| self.storage.put_record_if_absent(record, Bytes::new()))
            .buffer_unordered(NOTES_AT_ONCE)
            .try_collect()
            .await
    }

    /// The keys of the image records noted as naming `blob`.
    pub async fn users_of(&self, blob: &Digest) -> Result<Vec<String>, StorageError> {
        self.storage.list_records(&format!("{USERS}/{}", blob.hex())).await
    }

    pub async fn index(&self, key: &str) -> Result<Option<ManifestRecord>, StorageError> {
        lookup(&self.storage, &self.indexes, "indexes", key).await
    }

    pub async fn put_index(&self, key: &str, record: ManifestRecord) -> Result<(), StorageError> {
        store(&self.storage, &self.indexes, "indexes", key, record).await
    }

    /// Drops an index record whose index storage lost.
    pub async fn forget_index(&self, key: &str) -> Result<(), StorageError> {
        self.indexes.invalidate(key).await;
        self.storage.delete_record(&format!("indexes/{key}")).await
    }

    pub async fn layer(&self, key: &str) -> Result<Option<LayerDigests>, StorageError> {
        lookup(&self.storage, &self.layers, "layers", key).await
    }

    pub async fn put_layer(&self, key: &str, record: LayerDigests) -> Result<(), StorageError> {
        store(&self.storage, &self.layers, "layers", key, record).await
    }

    /// The artifacts that refer to a manifest (its SBOMs and provenance);
    /// none when nothing does.
    pub async fn referrers(&self, subject: &Digest) -> Result<Vec<Referrer>, StorageError> {
        let found = lookup(&self.storage, &self.referrers, REFERRERS, subject.hex()).await?;
        Ok(found.unwrap_or_default())
    }

    pub async fn put_referrers(&self, subject: &Digest, referrers: Vec<Referrer>) -> Result<(), StorageError> {
        store(&self.storage, &self.referrers, REFERRERS, subject.hex(), referrers).await
    }
}

async fn lookup<T>(
    storage: &Storage,
    memory: &Cache<String, T>,
    kind: &str,
    key: &str,
) -> Result<Option<T>, StorageError>
where
    T: DeserializeOwned + Clone + Send + Sync + 'static,
{
    if let Some(found) = memory.get(key).await {
        return Ok(Some(found));
    }
    let Some(bytes) = storage.get_record(&format!("{kind}/{key}")).await? else {
        return Ok(None);
    };
    match serde_json::from_slice::<T>(&bytes) {
        Ok(record) => {
            memory.insert(key.to_owned(), record.clone()).await;
            Ok(Some(record))
        }
        Err(error) => {
            tracing::warn!(kind, key, %error, "ignoring unreadable cache record");
            Ok(None)
        }
    }
}

async fn store<T>(
    storage: &Storage,
    memory: &Cache<String, T>,
    kind: &str,
    key: &str,
    record: T,
) -> Result<(), StorageError>
where
    T: Serialize + Clone + Send + Sync + 'static,
{
    let bytes = serde_json::to_vec(&record).expect("records serialise");
    storage.put_record(&format!("{kind}/{key}"), Bytes::from(bytes)).await?;
    memory.insert(key.to_owned(), record).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> ManifestRecord {
        ManifestRecord {
            digest: Digest::of(b"m"),
            media_type: "application/x".into(),
            size: 1,
        }
    }

    #[tokio::test]
    async fn records_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let caches = Caches::new(Storage::filesystem(dir.path()).await.unwrap());
        assert_eq!(caches.index("k").await.unwrap(), None);
        caches.put_index("k", record()).await.unwrap();
        assert_eq!(caches.index("k").await.unwrap(), Some(record()));

        let fresh = Caches::new(Storage::filesystem(dir.path()).await.unwrap());
        assert_eq!(fresh.index("k").await.unwrap(), Some(record()));
        assert_eq!(fresh.image("k").await.unwrap(), None, "kinds do not mix");
        assert_eq!(fresh.layer("k").await.unwrap(), None, "kinds do not mix");
    }

    #[tokio::test]
    async fn unreadable_records_are_misses() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::filesystem(dir.path()).await.unwrap();
        storage
            .put_record("indexes/bad", Bytes::from_static(b"{not json"))
            .await
            .unwrap();
        assert_eq!(Caches::new(storage).index("bad").await.unwrap(), None);
    }
}
