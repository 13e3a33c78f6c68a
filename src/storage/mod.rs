//! Where bytes live. Blobs (layers, configs, manifests) sit at their content
//! address, `blobs/sha256/<hex>`, so the storage root (a folder or a bucket)
//! is an OCI image layout; small cache records sit under `cache/`.
//! Reads go through `object_store` (backends in `backend.rs`); writes go
//! through one `Writes` (`writes.rs`), chosen when the backend is opened:
//! the same object store, or for a GCS bucket its JSON API (`gcs.rs`).
//! Once opened, `Storage` never asks which backend it has.
//!
//! A layer is packed into a staged file and reaches its content address only
//! once its digest is known, and only if nothing is there yet:
//! - in a folder, the file is packed in `staging/` below the root, synced and
//!   hard-linked to its address (the kernel is asked to write each completed
//!   8 MiB while packing goes on, so the sync waits only for the tail);
//! - in a bucket, the file is packed in a local spool folder; once the file
//!   is hashed again and found to hold the digest, it is uploaded to
//!   `staging/<name>` in the bucket, checked for its size there and copied to
//!   its address (copy-if-absent where the bucket has it; where it has not,
//!   S3, after a check that nothing is there: a copy of the same digest
//!   writes the same bytes), and the staging object is deleted.
//!
//! Small blobs and the layout files are put only where nothing is, the same
//! way (conditionally, or after a check where the store cannot).
//!
//! A crash leaves at most garbage under `staging/`, never a wrong blob at an
//! address; staging objects older than an hour are deleted at start. In a
//! folder, a write killed half-way also leaves object_store's temporary
//! file beside its object (`<name>#<n>`, which listings skip): those older
//! than an hour go too, under `cache/leases/` at start (a lease's renewal
//! is the write a killed `nixery gc` was most likely in) and under all of
//! `cache/` at each collection.

mod backend;
mod blob_cache;
mod documents;
mod files;
mod gcs;
mod linked;
mod settings;
mod writes;

pub use settings::{Backend, GcsConfig, S3Config, StorageConfig};

use std::io::{self, Write};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as StorePath;
use object_store::signer::Signer;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt};
use tempfile::NamedTempFile;

use crate::digest::Digest;

use writes::Writes;

/// Staging prefix in the store; in a folder, also where layers are packed
/// (the same filesystem, so that a commit is a hard link).
const STAGING: &str = "staging";
/// Staging objects older than this belong to no running build.
const STALE: Duration = Duration::from_secs(3600);
/// Bytes of a staged file after which the kernel is asked to write them out;
/// also the part size of multipart uploads.
const WRITE_BEHIND: u64 = 8 << 20;
const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;
const EMPTY_INDEX: &[u8] =
    br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("storage I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("object store failed: {0}")]
    Store(#[from] object_store::Error),
    #[error("the upload of {digest} to staging has {found} bytes, not {expected}")]
    UploadSize { digest: Digest, expected: u64, found: u64 },
    #[error("the staged file of {digest} holds bytes whose digest is {found}")]
    StagedDigest { digest: Digest, found: Digest },
    #[error("this store cannot create an object only where none is")]
    NoConditionalCreate,
}

/// What a conditional create found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Created {
    /// The object is this call's.
    Created,
    /// Something was there already; nothing was written.
    Exists,
}

/// An object found by a listing: its key (below the listed prefix), size
/// and last write.
#[derive(Clone, Debug)]
pub struct Listed {
    pub key: String,
    pub size: u64,
    pub modified: SystemTime,
}

/// A stream of a blob's bytes.
pub type BlobStream = BoxStream<'static, Result<Bytes, StorageError>>;

/// An opened blob (see [`Storage::open_blob`]).
pub enum Blob {
    File(files::OpenFile),
    Object {
        store: Arc<dyn ObjectStore>,
        path: StorePath,
        digest: Digest,
        size: u64,
        /// Where a whole GET of it is kept, if anywhere.
        cache: Option<Arc<blob_cache::BlobCache>>,
    },
}

impl Blob {
    pub fn size(&self) -> u64 {
        match self {
            Blob::File(file) => file.size,
            Blob::Object { size, .. } => *size,
        }
    }

    /// Its bytes, or those of `range`; `None` if an object went since it
    /// was opened. A whole object streams into the blob cache too.
    pub async fn stream(self, range: Option<Range<u64>>) -> Result<Option<BlobStream>, StorageError> {
        let (store, path, digest, size, cache) = match self {
            Blob::File(file) => return Ok(Some(file.stream(range))),
            Blob::Object {
                store,
                path,
                digest,
                size,
                cache,
            } => (store, path, digest, size, cache),
        };
        let whole = range.is_none();
        let options = GetOptions {
            range: range.map(GetRange::Bounded),
            ..Default::default()
        };
        let stream = match store.get_opts(&path, options).await {
            Ok(result) => result.into_stream().map_err(StorageError::from).boxed(),
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        Ok(Some(match (cache, whole) {
            (Some(cache), true) => cache.fill(&digest, size, stream),
            _ => stream,
        }))
    }
}

/// The registry's storage.
#[derive(Clone, Debug)]
pub struct Storage {
    /// What reads, lists and heads go to.
    store: Arc<dyn ObjectStore>,
    /// Presigns blob URLs, and for how long, when blob GETs are redirected.
    redirect: Option<(Arc<dyn Signer>, Duration)>,
    /// For a folder: its root, whose blob files are read directly.
    folder: Option<PathBuf>,
    /// For a folder: the small blobs kept in memory, and the blob files
    /// kept open.
    documents: Arc<documents::Documents>,
    files: Arc<files::OpenFiles>,
    /// For a bucket whose blobs are streamed: those kept on local disk.
    blob_cache: Option<Arc<blob_cache::BlobCache>>,
    /// What all writes go through.
    writes: Writes,
    spool: Spool,
    /// Whether conditional creates are kept to (probed once, when first needed).
    conditional: Arc<tokio::sync::OnceCell<bool>>,
}

/// Where staged blobs are written.
#[derive(Clone, Debug)]
enum Spool {
    /// `staging/` inside the storage folder: committed by a link.
    InStore(PathBuf),
    /// A local folder: committed by an upload.
    Local(PathBuf),
}

impl Storage {
    /// Opens the configured storage, writes the OCI layout files if missing
    /// and deletes stale staging objects.
    pub async fn open(config: &StorageConfig) -> Result<Self, StorageError> {
        let opened = backend::open(&config.backend).await?;
        let spool = match &config.backend {
            Backend::Filesystem(root) => Spool::InStore(root.join(STAGING)),
            _ => Spool::Local(config.spool.clone()),
        };
        let redirect = match (opened.signer, config.redirect) {
            (Some(signer), Some(ttl)) => Some((signer, ttl)),
            _ => None,
        };
        let bucket = matches!(config.backend, Backend::S3(_) | Backend::Gcs(_));
        let blob_cache = match (&spool, &redirect, config.blob_cache_bytes) {
            (Spool::Local(dir), None, bytes) if bucket && bytes > 0 => {
                Some(Arc::new(blob_cache::BlobCache::open(dir.join("blobs"), bytes)?))
            }
            _ => None,
        };
        let storage = Storage {
            store: opened.store,
            redirect,
            folder: opened.folder,
            documents: Arc::default(),
            files: Arc::default(),
            blob_cache,
            writes: opened.writes,
            spool,
            conditional: Arc::default(),
        };
        tokio::fs::create_dir_all(storage.spool_dir()).await?;
        storage.ensure_layout().await?;
        storage.remove_stale_staging().await?;
        storage.remove_stale_temp_files("leases").await?;
        Ok(storage)
    }

    /// Writes the OCI layout's own files unless they are there.
    pub async fn ensure_layout(&self) -> Result<(), StorageError> {
        self.writes
            .put_if_absent(&StorePath::from("oci-layout"), Bytes::from_static(OCI_LAYOUT))
            .await?;
        self.writes
            .put_if_absent(&StorePath::from("index.json"), Bytes::from_static(EMPTY_INDEX))
            .await
    }

    /// Storage in a local folder, created if missing.
    pub async fn filesystem(root: &Path) -> Result<Self, StorageError> {
        Self::open(&StorageConfig {
            backend: Backend::Filesystem(root.to_owned()),
            redirect: None,
            spool: root.join(STAGING),
            blob_cache_bytes: 0,
        })
        .await
    }

    fn spool_dir(&self) -> &Path {
        match &self.spool {
            Spool::InStore(dir) | Spool::Local(dir) => dir,
        }
    }

    /// A new staging file to write a blob into, before its digest is known.
    /// (The folder is made again if someone removed it.)
    pub fn stage(&self) -> io::Result<StagedBlob> {
        std::fs::create_dir_all(self.spool_dir())?;
        let file = tempfile::Builder::new().prefix("blob-").tempfile_in(self.spool_dir())?;
        Ok(StagedBlob {
            file,
            written: 0,
            flushed: 0,
        })
    }

    /// Puts a staged blob at `digest` unless a blob is there already; the
    /// staged file is removed either way.
    pub async fn commit(&self, staged: StagedBlob, digest: &Digest) -> Result<(), StorageError> {
        let name = staged
            .file
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .expect("tempfile names are UTF-8")
            .to_owned();
        let staging = StorePath::from(format!("{STAGING}/{name}"));
        match self.spool {
            Spool::InStore(_) => {
                let file = staged.file;
                let file = tokio::task::spawn_blocking(move || file.as_file().sync_all().map(|_| file))
                    .await
                    .expect("sync does not panic")?;
                let committed = self.writes.copy_if_absent(&staging, &blob_path(digest)).await;
                drop(file);
                committed
            }
            Spool::Local(_) => {
                if self.blob_size(digest).await?.is_some() {
                    return Ok(());
                }
                let uploaded = self.upload_and_copy(&staged, &staging, digest).await;
                if let Err(object_store::Error::NotFound { .. }) | Ok(()) = self.writes.delete(&staging).await {
                } else {
                    tracing::warn!(%staging, "could not delete a staging object; it goes at the next start");
                }
                uploaded
            }
        }
    }

    /// Checks that a staged file holds `digest`'s bytes, uploads it to
    /// `staging`, checks its size there and copies it to the blob's address.
    async fn upload_and_copy(
        &self,
        staged: &StagedBlob,
        staging: &StorePath,
        digest: &Digest,
    ) -> Result<(), StorageError> {
        let file = staged.file.reopen()?;
        let found = tokio::task::spawn_blocking(move || Digest::of_reader(file))
            .await
            .expect("hashing does not panic")?;
        if found != *digest {
            return Err(StorageError::StagedDigest {
                digest: digest.clone(),
                found,
            });
        }
        self.writes.upload_file(staged.file.path(), staging).await?;
        let found = self.store.head(staging).await?.size;
        if found != staged.written {
            return Err(StorageError::UploadSize {
                digest: digest.clone(),
                expected: staged.written,
                found,
            });
        }
        self.writes.copy_if_absent(staging, &blob_path(digest)).await
    }

    /// Deletes staging objects (and spooled files) older than [`STALE`]:
    /// what builds that were killed left.
    async fn remove_stale_staging(&self) -> Result<(), StorageError> {
        let cutoff = SystemTime::now() - STALE;
        let stale: Vec<StorePath> = self
            .store
            .list(Some(&StorePath::from(STAGING)))
            .try_filter(|meta| std::future::ready(SystemTime::from(meta.last_modified) < cutoff))
            .map_ok(|meta| meta.location)
            .try_collect()
            .await?;
        for location in &stale {
            match self.writes.delete(location).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if let Spool::Local(dir) = &self.spool {
            remove_stale_files(dir)?;
        }
        if !stale.is_empty() {
            tracing::info!(count = stale.len(), "deleted stale staging objects");
        }
        Ok(())
    }

    /// In a folder, deletes the temporary files of writes killed half-way
    /// below the records' `prefix` (`""`: all of them) that are older than
    /// [`STALE`]; how many.
    pub async fn remove_stale_temp_files(&self, prefix: &str) -> Result<usize, StorageError> {
        let Some(root) = &self.folder else { return Ok(0) };
        let dir = root.join(record_path(prefix).as_ref());
        let cutoff = SystemTime::now() - STALE;
        let removed = tokio::task::spawn_blocking(move || remove_temp_files(&dir, cutoff))
            .await
            .expect("the walk does not panic")?;
        if removed > 0 {
            tracing::info!(count = removed, "deleted the temporary files of killed writes");
        }
        Ok(removed)
    }

    /// Whether storage answers: its `oci-layout` file can be read.
    pub async fn ready(&self) -> Result<(), String> {
        self.store
            .head(&StorePath::from("oci-layout"))
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    }

    /// Puts a small blob at its address unless it is there already (in a
    /// folder, a look at the file first spares the synced write).
    pub async fn put_blob(&self, digest: &Digest, bytes: Bytes) -> Result<(), StorageError> {
        if let Some(root) = &self.folder
            && tokio::fs::try_exists(folder_blob(root, digest)).await?
        {
            return Ok(());
        }
        self.writes.put_if_absent(&blob_path(digest), bytes).await
    }

    /// The size of a blob, or `None` if there is none at `digest`.
    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        match self.store.head(&blob_path(digest)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// A presigned URL of a blob when blob GETs are redirected.
    pub async fn blob_url(&self, digest: &Digest) -> Result<Option<String>, StorageError> {
        match &self.redirect {
            Some((signer, ttl)) => Ok(Some(
                signer
                    .signed_url(http::Method::GET, &blob_path(digest), *ttl)
                    .await?
                    .to_string(),
            )),
            None => Ok(None),
        }
    }

    /// Opens a blob: its size, and then its bytes or a range of them;
    /// `None` if there is none. A folder's blob files are read directly
    /// (`files.rs`); a bucket's objects are asked for their size here and
    /// read from the blob cache (`blob_cache.rs`) when it has them, else
    /// fetched when streamed.
    pub async fn open_blob(&self, digest: &Digest) -> Result<Option<Blob>, StorageError> {
        if let Some(root) = &self.folder {
            let file = self.files.open(digest, || folder_blob(root, digest)).await?;
            return Ok(file.map(Blob::File));
        }
        let Some(size) = self.blob_size(digest).await? else {
            return Ok(None);
        };
        if let Some(cache) = &self.blob_cache
            && let Some(file) = cache.get(digest, size).await?
        {
            return Ok(Some(Blob::File(file)));
        }
        Ok(Some(Blob::Object {
            store: Arc::clone(&self.store),
            path: blob_path(digest),
            digest: digest.clone(),
            size,
            cache: self.blob_cache.clone(),
        }))
    }

    /// Streams a blob, or the byte range of it; `None` if there is none.
    pub async fn read_blob(
        &self,
        digest: &Digest,
        range: Option<Range<u64>>,
    ) -> Result<Option<BlobStream>, StorageError> {
        match self.open_blob(digest).await? {
            Some(blob) => blob.stream(range).await,
            None => Ok(None),
        }
    }

    /// A small blob's bytes (a manifest, an index, a config): `None` if
    /// there is none, or it has more than `limit` bytes (no limit: the
    /// caller's records say it is small). A folder's are kept in memory
    /// while their files stay (`documents.rs`).
    pub async fn read_small_blob(&self, digest: &Digest) -> Result<Option<Bytes>, StorageError> {
        if let Some(root) = &self.folder {
            let path = || folder_blob(root, digest);
            return self.documents.read(digest, path, None, |_| true).await;
        }
        self.get(&blob_path(digest)).await
    }

    /// The bytes of a blob a client asked for as a document (a manifest or
    /// index by digest): `None` if there is none, or it has more than
    /// `limit` bytes. A folder's are kept in memory only if `is_document`
    /// says they are one, so other blobs hold no file open; the caller
    /// still tells what the bytes are.
    pub async fn read_document(
        &self,
        digest: &Digest,
        limit: u64,
        is_document: impl FnOnce(&[u8]) -> bool,
    ) -> Result<Option<Bytes>, StorageError> {
        if let Some(root) = &self.folder {
            let path = || folder_blob(root, digest);
            return self.documents.read(digest, path, Some(limit), is_document).await;
        }
        match self.blob_size(digest).await? {
            Some(size) if size <= limit => self.get(&blob_path(digest)).await,
            _ => Ok(None),
        }
    }

    /// Whether a small blob (a manifest or an index) is at its address: for
    /// a folder, one `fstat` of its kept file (or a read of it, which keeps
    /// it), for a bucket a HEAD of its object.
    pub async fn has_small_blob(&self, digest: &Digest) -> Result<bool, StorageError> {
        match &self.folder {
            Some(_) => Ok(self.read_small_blob(digest).await?.is_some()),
            None => Ok(self.blob_size(digest).await?.is_some()),
        }
    }

    /// The cache record at `key` (a `/`-separated path below `cache/`).
    pub async fn get_record(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        self.get(&record_path(key)).await
    }

    /// Writes (or replaces) the cache record at `key`.
    pub async fn put_record(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        self.writes.put(&record_path(key), bytes).await
    }

    /// Writes the cache record at `key` unless there is one.
    pub async fn put_record_if_absent(&self, key: String, bytes: Bytes) -> Result<(), StorageError> {
        self.writes.put_if_absent(&record_path(&key), bytes).await
    }

    /// The keys of the cache records below `prefix` (relative to it).
    pub async fn list_records(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        let listed = self.list_below(&record_path(prefix)).await?;
        Ok(listed
            .into_iter()
            .map(|record| record.key.split('/').next().unwrap_or_default().to_owned())
            .collect())
    }

    /// Deletes the cache record at `key`, if there is one.
    pub async fn delete_record(&self, key: &str) -> Result<(), StorageError> {
        match self.writes.delete(&record_path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Creates the cache record at `key` only if there is none, atomically
    /// (two replicas creating it at once: one gets [`Created::Created`]);
    /// [`StorageError::NoConditionalCreate`] where the store cannot.
    pub async fn create_record(&self, key: &str, bytes: Bytes) -> Result<Created, StorageError> {
        if !self.conditional_creates().await? {
            return Err(StorageError::NoConditionalCreate);
        }
        self.writes.create(&record_path(key), bytes).await
    }

    /// Whether the store keeps to conditional creates. Some S3 services
    /// accept `If-None-Match` and overwrite anyway, so this is found out
    /// once by trying: a second create of one probe object must fail.
    pub async fn conditional_creates(&self) -> Result<bool, StorageError> {
        let probe = || async {
            let path = record_path(&format!("probe/{}", unique_name()));
            let tried = async {
                let first = self.writes.create(&path, Bytes::from_static(b"1")).await?;
                let second = self.writes.create(&path, Bytes::from_static(b"2")).await?;
                Ok::<_, StorageError>((first, second))
            }
            .await;
            let _ = self.writes.delete(&path).await;
            match tried {
                Ok((Created::Created, Created::Exists)) => Ok(true),
                Ok(_) | Err(StorageError::NoConditionalCreate) => Ok(false),
                Err(e) => Err(e),
            }
        };
        let supported = *self.conditional.get_or_try_init(probe).await?;
        Ok(supported)
    }

    /// Every cache record below `prefix`, with its size and last write.
    pub async fn list_records_meta(&self, prefix: &str) -> Result<Vec<Listed>, StorageError> {
        self.list_below(&record_path(prefix)).await
    }

    /// Every blob: its digest (as hex, the key), size and last write.
    pub async fn list_blobs(&self) -> Result<Vec<Listed>, StorageError> {
        self.list_below(&StorePath::from("blobs/sha256")).await
    }

    /// Bytes and objects in the whole store.
    pub async fn usage(&self) -> Result<(u64, u64), StorageError> {
        let mut listing = self.store.list(None);
        let (mut bytes, mut objects) = (0, 0);
        while let Some(meta) = listing.try_next().await? {
            bytes += meta.size;
            objects += 1;
        }
        Ok((bytes, objects))
    }

    async fn list_below(&self, below: &StorePath) -> Result<Vec<Listed>, StorageError> {
        let listed: Result<Vec<_>, _> = self.store.list(Some(below)).try_collect().await;
        let listed = match listed {
            Err(object_store::Error::NotFound { .. }) => return Ok(vec![]),
            listed => listed?,
        };
        Ok(listed
            .into_iter()
            .filter_map(|meta| {
                let key = meta.location.as_ref().strip_prefix(below.as_ref())?.strip_prefix('/')?;
                Some(Listed {
                    key: key.to_owned(),
                    size: meta.size,
                    modified: meta.last_modified.into(),
                })
            })
            .collect())
    }

    /// Deletes the blob at `digest`, if there is one.
    pub async fn delete_blob(&self, digest: &Digest) -> Result<(), StorageError> {
        match self.writes.delete(&blob_path(digest)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn get(&self, path: &StorePath) -> Result<Option<Bytes>, StorageError> {
        match self.store.get(path).await {
            Ok(result) => Ok(Some(result.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

/// A name no other process picks: the time and this process's id.
fn unique_name() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nanos:x}-{:x}", std::process::id())
}

/// Removes the files in `dir` last written before [`STALE`] ago.
fn remove_stale_files(dir: &Path) -> io::Result<()> {
    let cutoff = SystemTime::now() - STALE;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_type()?.is_file() && entry.metadata()?.modified()? < cutoff {
            std::fs::remove_file(entry.path())?;
        }
    }
    Ok(())
}

/// Removes the temporary files below `dir` last written before `cutoff`;
/// how many. Entries that vanish meanwhile (a record deleted) are skipped.
fn remove_temp_files(dir: &Path, cutoff: SystemTime) -> io::Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        entries => entries?,
    };
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let Ok(meta) = entry.metadata() else { continue };
        if meta.is_dir() {
            removed += remove_temp_files(&entry.path(), cutoff)?;
        } else if is_temp_file(&entry.file_name().to_string_lossy()) && meta.modified()? < cutoff {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(removed)
}

/// Whether `name` is that of object_store's temporary file for a write to
/// a folder (`<name>#<digits>`), which listings leave out.
fn is_temp_file(name: &str) -> bool {
    name.rsplit_once('#')
        .is_some_and(|(_, n)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// A blob being written to a staging file, until [`Storage::commit`].
/// Dropped uncommitted, the file is removed.
pub struct StagedBlob {
    file: NamedTempFile,
    written: u64,
    /// Bytes handed to the kernel for writing out.
    flushed: u64,
}

impl Write for StagedBlob {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        if self.written - self.flushed >= WRITE_BEHIND {
            start_writeback(self.file.as_file(), self.flushed, self.written - self.flushed);
            self.flushed = self.written;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// Asks the kernel to start writing `len` bytes at `offset` to disk without
/// waiting for it. Only a hint: the sync before the commit checks for errors.
fn start_writeback(file: &std::fs::File, offset: u64, len: u64) {
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return;
    };
    // SAFETY: the descriptor is open for the duration of the call (borrowed
    // from `file`), and the call reads no memory of this process.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

fn blob_path(digest: &Digest) -> StorePath {
    StorePath::from(format!("blobs/sha256/{}", digest.hex()))
}

/// A blob's file in a storage folder.
fn folder_blob(root: &Path, digest: &Digest) -> PathBuf {
    root.join(blob_path(digest).as_ref())
}

fn record_path(key: &str) -> StorePath {
    StorePath::from(format!("cache/{key}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(stream: BlobStream) -> Vec<u8> {
        let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
        chunks.concat()
    }

    #[tokio::test]
    async fn layout_and_blob_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::filesystem(dir.path()).await.unwrap();
        assert_eq!(std::fs::read(dir.path().join("oci-layout")).unwrap(), OCI_LAYOUT);
        assert!(dir.path().join("index.json").exists());

        let mut staged = storage.stage().unwrap();
        staged.write_all(b"layer bytes").unwrap();
        let staged_path = staged.file.path().to_owned();
        let digest = Digest::of(b"layer bytes");
        storage.commit(staged, &digest).await.unwrap();
        assert!(!staged_path.exists(), "staging file removed");
        assert_eq!(
            std::fs::read(dir.path().join("blobs/sha256").join(digest.hex())).unwrap(),
            b"layer bytes"
        );
        assert_eq!(storage.blob_size(&digest).await.unwrap(), Some(11));
        assert_eq!(
            collect(storage.read_blob(&digest, None).await.unwrap().unwrap()).await,
            b"layer bytes"
        );
        assert_eq!(
            collect(storage.read_blob(&digest, Some(6..11)).await.unwrap().unwrap()).await,
            b"bytes"
        );
        assert_eq!(
            storage.read_small_blob(&digest).await.unwrap().unwrap(),
            &b"layer bytes"[..]
        );
    }

    #[tokio::test]
    async fn a_blob_past_the_write_behind_stretch_commits_whole() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::filesystem(dir.path()).await.unwrap();
        let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        let mut staged = storage.stage().unwrap();
        let mut whole = Vec::new();
        for _ in 0..(2 * WRITE_BEHIND / chunk.len() as u64 + 1) {
            staged.write_all(&chunk).unwrap();
            whole.extend_from_slice(&chunk);
        }
        assert_eq!(staged.flushed, 2 * WRITE_BEHIND, "two stretches handed to the kernel");
        let digest = Digest::of(&whole);
        storage.commit(staged, &digest).await.unwrap();
        assert_eq!(storage.read_small_blob(&digest).await.unwrap().unwrap(), whole);
    }

    #[tokio::test]
    async fn a_bucket_commit_goes_through_staging_and_leaves_nothing_behind() {
        let spool = tempfile::tempdir().unwrap();
        let storage = Storage::open(&StorageConfig {
            backend: Backend::Memory,
            redirect: None,
            spool: spool.path().to_owned(),
            blob_cache_bytes: 0,
        })
        .await
        .unwrap();
        for size in [11, 3 * WRITE_BEHIND as usize + 5] {
            let bytes: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
            let mut staged = storage.stage().unwrap();
            staged.write_all(&bytes).unwrap();
            let digest = Digest::of(&bytes);
            storage.commit(staged, &digest).await.unwrap();
            assert_eq!(storage.read_small_blob(&digest).await.unwrap().unwrap(), bytes);
        }
        let staging: Vec<_> = storage
            .store
            .list(Some(&StorePath::from(STAGING)))
            .try_collect()
            .await
            .unwrap();
        assert!(staging.is_empty(), "{staging:?}");
        assert_eq!(std::fs::read_dir(spool.path()).unwrap().count(), 0, "spool emptied");

        let mut wrong = storage.stage().unwrap();
        wrong.write_all(b"not what the digest says").unwrap();
        let digest = Digest::of(b"something else");
        let refused = storage.commit(wrong, &digest).await;
        assert!(matches!(refused, Err(StorageError::StagedDigest { .. })), "{refused:?}");
        assert_eq!(storage.blob_size(&digest).await.unwrap(), None);
    }

    #[tokio::test]
    async fn stale_staging_files_go_at_open() {
        let dir = tempfile::tempdir().unwrap();
        Storage::filesystem(dir.path()).await.unwrap();
        let staging = dir.path().join(STAGING);
        let (old, new) = (staging.join("blob-old"), staging.join("blob-new"));
        for file in [&old, &new] {
            std::fs::write(file, b"partial").unwrap();
        }
        let two_hours_ago = SystemTime::now() - 2 * STALE;
        std::fs::File::options()
            .write(true)
            .open(&old)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        Storage::filesystem(dir.path()).await.unwrap();
        assert!(!old.exists(), "a killed build's leftover is deleted");
        assert!(new.exists(), "a running build's file is kept");
    }

    #[tokio::test]
    async fn temporary_files_of_killed_writes_go() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::filesystem(dir.path()).await.unwrap();
        storage
            .put_record("leases/gc/00000000000000000003", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        storage.put_record("images/k", Bytes::from_static(b"{}")).await.unwrap();
        let cache = dir.path().join("cache");
        let old = |path: &str| {
            let path = cache.join(path);
            std::fs::write(&path, b"half").unwrap();
            let file = std::fs::File::options().write(true).open(&path).unwrap();
            file.set_modified(SystemTime::now() - 2 * STALE).unwrap();
            path
        };
        let (lease, record) = (old("leases/gc/00000000000000000003#1"), old("images/k#1"));
        let (young, named) = (cache.join("leases/gc/00000000000000000003#2"), old("images/k#v1"));
        std::fs::write(&young, b"half").unwrap();
        let listed = storage.list_records("leases/gc").await.unwrap();
        assert_eq!(listed, ["00000000000000000003"], "listings leave them out");
        Storage::filesystem(dir.path()).await.unwrap();
        assert!(!lease.exists(), "a start deletes a killed lease write's file");
        assert!(record.exists() && young.exists());
        assert_eq!(storage.remove_stale_temp_files("").await.unwrap(), 1);
        assert!(!record.exists(), "a collection deletes those of every record");
        assert!(young.exists(), "a running write's file is kept");
        assert!(named.exists(), "a record whose name has a '#' is no temporary file");
        assert!(cache.join("images/k").exists());
    }

    #[tokio::test]
    async fn an_existing_blob_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::filesystem(dir.path()).await.unwrap();
        let digest = Digest::of(b"x");
        storage.put_blob(&digest, Bytes::from_static(b"x")).await.unwrap();
        let mut staged = storage.stage().unwrap();
        staged.write_all(b"something else").unwrap();
        storage.commit(staged, &digest).await.unwrap();
        storage.put_blob(&digest, Bytes::from_static(b"other")).await.unwrap();
        assert_eq!(storage.read_small_blob(&digest).await.unwrap().unwrap(), &b"x"[..]);
        assert_eq!(std::fs::read_dir(dir.path().join(STAGING)).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn missing_things_are_none() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::filesystem(dir.path()).await.unwrap();
        let digest = Digest::of(b"absent");
        assert_eq!(storage.blob_size(&digest).await.unwrap(), None);
        assert!(storage.read_blob(&digest, None).await.unwrap().is_none());
        assert_eq!(storage.get_record("manifests/x").await.unwrap(), None);
        storage
            .put_record("manifests/x", Bytes::from_static(b"1"))
            .await
            .unwrap();
        storage
            .put_record("manifests/x", Bytes::from_static(b"2"))
            .await
            .unwrap();
        assert_eq!(storage.get_record("manifests/x").await.unwrap().unwrap(), &b"2"[..]);
    }
}
