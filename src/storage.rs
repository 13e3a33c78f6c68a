//! Where bytes live. Blobs (layers, configs, manifests) sit at their content
//! address, `blobs/sha256/<hex>`, so the storage root is an OCI image
//! layout; small cache records sit under `cache/`. Everything goes through
//! `object_store`. A layer is written to a staging file first and committed
//! to its address only if nothing is there yet, after it was synced: a crash
//! leaves at most garbage in `staging/`, never a wrong blob at an address.
//! While a staging file is written the kernel is asked to start writing each
//! completed stretch to disk, so the sync before the commit waits only for
//! the tail.

use std::io::{self, Write};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use tempfile::NamedTempFile;

use crate::digest::Digest;

/// Staging folder below the storage root, on the same filesystem so that a
/// commit is a hard link.
const STAGING: &str = "staging";
/// Bytes of a staging file after which the kernel is asked to write them out.
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
}

/// A stream of a blob's bytes.
pub type BlobStream = BoxStream<'static, Result<Bytes, StorageError>>;

/// The registry's storage.
#[derive(Clone, Debug)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    staging: PathBuf,
}

impl Storage {
    /// Storage in a local folder, created if missing.
    pub async fn filesystem(root: &Path) -> Result<Self, StorageError> {
        let staging = root.join(STAGING);
        tokio::fs::create_dir_all(&staging).await?;
        tokio::fs::create_dir_all(root.join("blobs/sha256")).await?;
        let store = LocalFileSystem::new_with_prefix(root)?.with_fsync(true);
        let storage = Storage {
            store: Arc::new(store),
            staging,
        };
        storage
            .put_if_absent(&StorePath::from("oci-layout"), Bytes::from_static(OCI_LAYOUT))
            .await?;
        storage
            .put_if_absent(&StorePath::from("index.json"), Bytes::from_static(EMPTY_INDEX))
            .await?;
        Ok(storage)
    }

    /// A new staging file to write a blob into, before its digest is known.
    pub fn stage(&self) -> io::Result<StagedBlob> {
        let file = tempfile::Builder::new().prefix("blob-").tempfile_in(&self.staging)?;
        Ok(StagedBlob {
            file,
            written: 0,
            flushed: 0,
        })
    }

    /// Syncs a staged blob and puts it at `digest` unless a blob is there
    /// already; the staging file is removed either way.
    pub async fn commit(&self, staged: StagedBlob, digest: &Digest) -> Result<(), StorageError> {
        let staged = staged.file;
        let staged = tokio::task::spawn_blocking(move || staged.as_file().sync_all().map(|_| staged))
            .await
            .expect("sync does not panic")?;
        let name = staged
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .expect("tempfile names are UTF-8");
        let from = StorePath::from(format!("{STAGING}/{name}"));
        match self.store.copy_if_not_exists(&from, &blob_path(digest)).await {
            Ok(()) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Puts a small blob at its address unless it is there already.
    pub async fn put_blob(&self, digest: &Digest, bytes: Bytes) -> Result<(), StorageError> {
        self.put_if_absent(&blob_path(digest), bytes).await
    }

    /// The size of a blob, or `None` if there is none at `digest`.
    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        match self.store.head(&blob_path(digest)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Streams a blob, or the byte range of it; `None` if there is none.
    pub async fn read_blob(
        &self,
        digest: &Digest,
        range: Option<Range<u64>>,
    ) -> Result<Option<BlobStream>, StorageError> {
        let options = GetOptions {
            range: range.map(GetRange::Bounded),
            ..Default::default()
        };
        match self.store.get_opts(&blob_path(digest), options).await {
            Ok(result) => Ok(Some(result.into_stream().map_err(StorageError::from).boxed())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// A small blob's bytes, or `None` if there is none.
    pub async fn read_blob_bytes(&self, digest: &Digest) -> Result<Option<Bytes>, StorageError> {
        self.get(&blob_path(digest)).await
    }

    /// The cache record at `key` (a `/`-separated path below `cache/`).
    pub async fn get_record(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        self.get(&record_path(key)).await
    }

    /// Writes (or replaces) the cache record at `key`.
    pub async fn put_record(&self, key: &str, bytes: Bytes) -> Result<(), StorageError> {
        self.store.put(&record_path(key), PutPayload::from_bytes(bytes)).await?;
        Ok(())
    }

    async fn get(&self, path: &StorePath) -> Result<Option<Bytes>, StorageError> {
        match self.store.get(path).await {
            Ok(result) => Ok(Some(result.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn put_if_absent(&self, path: &StorePath, bytes: Bytes) -> Result<(), StorageError> {
        let options = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self.store.put_opts(path, PutPayload::from_bytes(bytes), options).await {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
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
            storage.read_blob_bytes(&digest).await.unwrap().unwrap(),
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
        assert_eq!(storage.read_blob_bytes(&digest).await.unwrap().unwrap(), whole);
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
        assert_eq!(storage.read_blob_bytes(&digest).await.unwrap().unwrap(), &b"x"[..]);
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
