//! Records of what was built, by key: which manifests an image resolved to
//! (per layer set), which index a multi-arch tag resolved to, which blob a
//! layer's contents were packed into, and which artifacts (SBOMs,
//! provenance) refer to a manifest. Kept in
//! memory (moka, bounded) in front of records in storage, so that a
//! restarted registry finds them too. Beside them, in storage only: each
//! image's layer plan as built (for its web page), and which images use
//! each blob, so that a blob lost from storage can be traced to the
//! records that name it.
//!
//! Storage is the truth: a garbage collection (this replica's or another's)
//! deletes records and blobs behind the memory's back. So the memory notes
//! which of its image and index records name each manifest or index, and a
//! document found missing forgets them at once ([`Caches::forget_naming`]);
//! a collection forgets everything ([`Caches::forget_all`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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
/// Documents noted as named by records in memory, at most; past it, the
/// memory is forgotten whole (records are read again from storage).
const NAMED_MAX: usize = 4 * IMAGE_ENTRIES as usize;

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
    named: Arc<Mutex<Named>>,
}

/// Which records in memory name each document: every manifest of an image
/// record, the index of an index record. (A record evicted since may still
/// be noted; forgetting it then costs one read of storage.)
type Named = HashMap<Digest, Vec<Namer>>;

/// A record in memory, by kind and key.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Namer {
    Image(String),
    Index(String),
}

impl Caches {
    pub fn new(storage: Storage) -> Self {
        Caches {
            storage,
            images: Cache::new(IMAGE_ENTRIES),
            indexes: Cache::new(IMAGE_ENTRIES),
            layers: Cache::new(LAYER_ENTRIES),
            referrers: Cache::new(IMAGE_ENTRIES),
            named: Arc::default(),
        }
    }

    pub async fn image(&self, key: &str) -> Result<Option<ImageRecord>, StorageError> {
        let found = lookup(&self.storage, &self.images, "images", key).await?;
        if let Some(Found::Read(record)) = &found {
            self.note_image(key, record);
        }
        Ok(found.map(Found::into_inner))
    }

    pub async fn put_image(&self, key: &str, record: ImageRecord) -> Result<(), StorageError> {
        self.note_image(key, &record);
        store(&self.storage, &self.images, "images", key, record).await
    }

    /// Notes that the image record `key`, entering memory, names its manifests.
    fn note_image(&self, key: &str, record: &ImageRecord) {
        for (_, manifest) in &record.manifests {
            self.note(&manifest.digest, Namer::Image(key.to_owned()));
        }
    }

    /// Notes that `namer`, entering memory, names `document`.
    fn note(&self, document: &Digest, namer: Namer) {
        let mut named = self.named.lock().expect("no panics under the lock");
        if named.len() >= NAMED_MAX {
            named.clear();
            self.images.invalidate_all();
            self.indexes.invalidate_all();
        }
        let namers = named.entry(document.clone()).or_default();
        if !namers.contains(&namer) {
            namers.push(namer);
        }
    }

    /// Forgets the records in memory that name `document` (a manifest or
    /// index found missing from storage), and the referrers of it; whether
    /// any did. Records in storage stay: a pull that reads one again finds
    /// the document missing and makes it again.
    pub async fn forget_naming(&self, document: &Digest) -> bool {
        let namers = self.named.lock().expect("no panics under the lock").remove(document);
        self.referrers.invalidate(document.hex()).await;
        let Some(namers) = namers else { return false };
        for namer in namers {
            match namer {
                Namer::Image(key) => self.images.invalidate(&key).await,
                Namer::Index(key) => self.indexes.invalidate(&key).await,
            }
        }
        true
    }

    /// Forgets every record in memory (after a garbage collection): each is
    /// read again from storage when next asked for.
    pub fn forget_all(&self) {
        let mut named = self.named.lock().expect("no panics under the lock");
        named.clear();
        self.images.invalidate_all();
        self.indexes.invalidate_all();
        self.layers.invalidate_all();
        self.referrers.invalidate_all();
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
        let found = lookup(&self.storage, &self.indexes, "indexes", key).await?;
        if let Some(Found::Read(record)) = &found {
            self.note(&record.digest, Namer::Index(key.to_owned()));
        }
        Ok(found.map(Found::into_inner))
    }

    pub async fn put_index(&self, key: &str, record: ManifestRecord) -> Result<(), StorageError> {
        self.note(&record.digest, Namer::Index(key.to_owned()));
        store(&self.storage, &self.indexes, "indexes", key, record).await
    }

    /// Drops an index record whose index storage lost.
    pub async fn forget_index(&self, key: &str) -> Result<(), StorageError> {
        self.indexes.invalidate(key).await;
        self.storage.delete_record(&format!("indexes/{key}")).await
    }

    pub async fn layer(&self, key: &str) -> Result<Option<LayerDigests>, StorageError> {
        let found = lookup(&self.storage, &self.layers, "layers", key).await?;
        Ok(found.map(Found::into_inner))
    }

    pub async fn put_layer(&self, key: &str, record: LayerDigests) -> Result<(), StorageError> {
        store(&self.storage, &self.layers, "layers", key, record).await
    }

    /// The artifacts that refer to a manifest (its SBOMs and provenance);
    /// none when nothing does.
    pub async fn referrers(&self, subject: &Digest) -> Result<Vec<Referrer>, StorageError> {
        let found = lookup(&self.storage, &self.referrers, REFERRERS, subject.hex()).await?;
        Ok(found.map(Found::into_inner).unwrap_or_default())
    }

    /// Replaces the referrers of `subject` (whose recorded ones cannot stand).
    pub async fn put_referrers(&self, subject: &Digest, referrers: Vec<Referrer>) -> Result<(), StorageError> {
        store(&self.storage, &self.referrers, REFERRERS, subject.hex(), referrers).await
    }

    /// Records the referrers of `subject` unless some are recorded: of two
    /// builds recording at once, the first one's stay.
    pub async fn put_referrers_if_absent(&self, subject: &Digest, referrers: &[Referrer]) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(referrers).expect("records serialise");
        let key = format!("{REFERRERS}/{}", subject.hex());
        self.storage.put_record_if_absent(key, Bytes::from(bytes)).await?;
        // Read from storage next: the record there may be the other build's.
        self.referrers.invalidate(subject.hex()).await;
        Ok(())
    }
}

/// A record found in memory, or read from storage (and now in memory).
enum Found<T> {
    Kept(T),
    Read(T),
}

impl<T> Found<T> {
    fn into_inner(self) -> T {
        match self {
            Found::Kept(record) | Found::Read(record) => record,
        }
    }
}

async fn lookup<T>(
    storage: &Storage,
    memory: &Cache<String, T>,
    kind: &str,
    key: &str,
) -> Result<Option<Found<T>>, StorageError>
where
    T: DeserializeOwned + Clone + Send + Sync + 'static,
{
    if let Some(found) = memory.get(key).await {
        return Ok(Some(Found::Kept(found)));
    }
    let Some(bytes) = storage.get_record(&format!("{kind}/{key}")).await? else {
        return Ok(None);
    };
    match serde_json::from_slice::<T>(&bytes) {
        Ok(record) => {
            memory.insert(key.to_owned(), record.clone()).await;
            Ok(Some(Found::Read(record)))
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

    fn image(manifest: &[u8]) -> ImageRecord {
        let digest = Digest::of(manifest);
        let record = ManifestRecord { digest, ..record() };
        ImageRecord {
            manifests: vec![(Format::Oci, record)],
        }
    }

    #[tokio::test]
    async fn a_missing_document_forgets_the_records_in_memory_that_name_it() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::filesystem(dir.path()).await.unwrap();
        let caches = Caches::new(storage.clone());
        caches.put_image("a", image(b"a")).await.unwrap();
        caches.put_image("b", image(b"b")).await.unwrap();
        caches.put_index("i", record()).await.unwrap();
        // Another process's collection deletes them from storage.
        for key in ["images/a", "images/b", "indexes/i"] {
            storage.delete_record(key).await.unwrap();
        }
        assert!(caches.image("a").await.unwrap().is_some(), "memory still has it");
        assert!(!caches.forget_naming(&Digest::of(b"never")).await, "nothing named it");
        assert!(caches.forget_naming(&Digest::of(b"a")).await);
        assert_eq!(caches.image("a").await.unwrap(), None);
        assert!(caches.image("b").await.unwrap().is_some(), "b names another manifest");
        assert!(caches.forget_naming(&record().digest).await);
        assert_eq!(caches.index("i").await.unwrap(), None);
        caches.forget_all();
        assert_eq!(caches.image("b").await.unwrap(), None, "a collection forgets all");
    }

    #[tokio::test]
    async fn records_read_from_storage_are_noted_too() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::filesystem(dir.path()).await.unwrap();
        Caches::new(storage.clone()).put_image("a", image(b"a")).await.unwrap();
        let fresh = Caches::new(storage.clone());
        assert!(fresh.image("a").await.unwrap().is_some(), "read from storage");
        storage.delete_record("images/a").await.unwrap();
        assert!(fresh.forget_naming(&Digest::of(b"a")).await);
        assert_eq!(fresh.image("a").await.unwrap(), None);
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
