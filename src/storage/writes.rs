//! What storage writes through, chosen once when the backend is opened: the
//! object store it reads, or for GCS the bucket's JSON API (`gcs.rs`).
//! Writes to an address that must not be replaced (blobs, the layout files,
//! records written once) are conditional where the backend can make them so;
//! where it cannot (S3 without conditional writes or copies), they follow a
//! check that nothing is there, and since such an address is a content
//! address, a racing write puts the same bytes there.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};
use tokio::io::AsyncReadExt;

use super::gcs::JsonWrites;
use super::{Created, StorageError, WRITE_BEHIND};

/// Parts of one upload in flight at once.
const UPLOAD_CONCURRENCY: usize = 4;

/// Where writes go.
#[derive(Clone, Debug)]
pub enum Writes {
    /// The object store that reads go to as well.
    Store(Arc<dyn ObjectStore>),
    /// GCS's JSON API (object_store's GCS client writes through the XML API).
    GcsJson(Arc<JsonWrites>),
}

impl Writes {
    /// Writes (or replaces) `path`.
    pub async fn put(&self, path: &StorePath, bytes: Bytes) -> Result<(), StorageError> {
        match self {
            Writes::Store(store) => drop(store.put(path, PutPayload::from_bytes(bytes)).await?),
            Writes::GcsJson(gcs) => gcs.put(path, bytes, false).await?,
        }
        Ok(())
    }

    /// Writes `path` unless something is there; something there already is
    /// no error.
    pub async fn put_if_absent(&self, path: &StorePath, bytes: Bytes) -> Result<(), StorageError> {
        match self.create(path, bytes.clone()).await {
            Ok(_) => Ok(()),
            Err(StorageError::NoConditionalCreate) => match self {
                Writes::Store(store) => put_after_check(store.as_ref(), path, bytes).await,
                Writes::GcsJson(_) => Err(StorageError::NoConditionalCreate),
            },
            Err(e) => Err(e),
        }
    }

    /// Creates `path` only if nothing is there, atomically: whether this
    /// call created it. A store that cannot make it conditional says so
    /// ([`StorageError::NoConditionalCreate`]) instead of falling back to a
    /// check, since two replicas must never both be told they created it.
    pub async fn create(&self, path: &StorePath, bytes: Bytes) -> Result<Created, StorageError> {
        let created = match self {
            Writes::Store(store) => {
                let options = PutOptions {
                    mode: PutMode::Create,
                    ..Default::default()
                };
                store
                    .put_opts(path, PutPayload::from_bytes(bytes), options)
                    .await
                    .map(drop)
            }
            Writes::GcsJson(gcs) => gcs.put(path, bytes, true).await,
        };
        match created {
            Ok(()) => Ok(Created::Created),
            Err(object_store::Error::AlreadyExists { .. } | object_store::Error::Precondition { .. }) => {
                Ok(Created::Exists)
            }
            Err(object_store::Error::NotImplemented { .. } | object_store::Error::NotSupported { .. }) => {
                Err(StorageError::NoConditionalCreate)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Streams a local file to `to`: to a store, in one request when small,
    /// else in parts, a few at a time; to GCS, in one request.
    pub async fn upload_file(&self, file: &Path, to: &StorePath) -> Result<(), StorageError> {
        let mut file = tokio::fs::File::open(file).await?;
        let store = match self {
            Writes::Store(store) => store,
            Writes::GcsJson(gcs) => return Ok(gcs.upload_file(to, file).await?),
        };
        let size = file.metadata().await?.len();
        if size <= WRITE_BEHIND {
            let mut bytes = Vec::with_capacity(size as usize);
            file.read_to_end(&mut bytes).await?;
            store.put(to, PutPayload::from(bytes)).await?;
            return Ok(());
        }
        let mut upload = WriteMultipart::new_with_chunk_size(store.put_multipart(to).await?, WRITE_BEHIND as usize);
        let mut buffer = vec![0; WRITE_BEHIND as usize];
        loop {
            let n = match file.read(&mut buffer).await {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    let _ = upload.abort().await;
                    return Err(e.into());
                }
            };
            upload.write(&buffer[..n]);
            if let Err(e) = upload.wait_for_capacity(UPLOAD_CONCURRENCY).await {
                let _ = upload.abort().await;
                return Err(e.into());
            }
        }
        upload.finish().await?;
        Ok(())
    }

    /// Copies `from` to `to` unless something is at `to`; something there
    /// already is no error. A store without copy-if-absent (S3) makes a
    /// plain copy: callers checked that `to` was empty, and `to` is a
    /// content address, so a racing copy writes the same bytes.
    pub async fn copy_if_absent(&self, from: &StorePath, to: &StorePath) -> Result<(), StorageError> {
        let copied = match self {
            Writes::Store(store) => match store.copy_if_not_exists(from, to).await {
                Err(object_store::Error::NotSupported { .. } | object_store::Error::NotImplemented { .. }) => {
                    return Ok(store.copy(from, to).await?);
                }
                copied => copied,
            },
            Writes::GcsJson(gcs) => gcs.copy_if_absent(from, to).await,
        };
        match copied {
            Ok(()) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes `path`; `NotFound` if nothing is there, for the caller to
    /// judge.
    pub async fn delete(&self, path: &StorePath) -> Result<(), object_store::Error> {
        match self {
            Writes::Store(store) => store.delete(path).await,
            Writes::GcsJson(gcs) => gcs.delete(path).await,
        }
    }
}

/// A put for a store that cannot make it conditional: made only if a check
/// finds nothing at `path`.
async fn put_after_check(store: &dyn ObjectStore, path: &StorePath, bytes: Bytes) -> Result<(), StorageError> {
    match store.head(path).await {
        Ok(_) => Ok(()),
        Err(object_store::Error::NotFound { .. }) => {
            store.put(path, PutPayload::from_bytes(bytes)).await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}
