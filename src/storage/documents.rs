//! Small blobs of a storage folder (manifests and indexes, read on every
//! pull) kept in memory, each with its file held open.
//!
//! A pull of a cached tag would otherwise open and read a file on the
//! blocking pool, and the threads handing the work back and forth cost more
//! than the rest of the request. A document is kept while its file is
//! still linked at its address (`linked.rs`), so a lost manifest is noticed
//! as soon as it is lost, and made again as before. Blob files never change
//! once at their address, so kept bytes are the file's bytes for as long
//! as it is linked. Past [`KEPT_BYTES`] or [`KEPT_FILES`], the oldest go.
//! A blob a client names (a manifest asked for by digest) is kept only if
//! the caller finds it is a document, so other blobs hold no file open.

use std::fs::File;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use super::StorageError;
use super::linked::{Kept, Linked};
use crate::digest::Digest;

/// Bytes of documents kept at most.
const KEPT_BYTES: usize = 16 << 20;
/// Documents kept (files held open) at most.
const KEPT_FILES: usize = 1024;

/// The documents kept, by digest.
#[derive(Debug)]
pub struct Documents {
    kept: Kept<Arc<Document>>,
}

impl Default for Documents {
    fn default() -> Self {
        Documents {
            kept: Kept::new(KEPT_BYTES, KEPT_FILES),
        }
    }
}

#[derive(Debug)]
struct Document {
    file: File,
    bytes: Bytes,
}

impl Linked for Arc<Document> {
    fn file(&self) -> &File {
        &self.file
    }

    fn weight(&self) -> usize {
        self.bytes.len()
    }
}

impl Documents {
    /// The bytes of the blob `digest` whose file is `path`, if it is there
    /// and holds at most `limit` bytes (if there is a limit); kept if `keep`
    /// says its bytes are a document.
    pub async fn read(
        &self,
        digest: &Digest,
        path: impl FnOnce() -> PathBuf,
        limit: Option<u64>,
        keep: impl FnOnce(&[u8]) -> bool,
    ) -> Result<Option<Bytes>, StorageError> {
        if let Some(document) = self.kept.get(digest)? {
            return Ok(Some(document.bytes.clone()));
        }
        let path = path();
        let read = tokio::task::spawn_blocking(move || open(path, limit))
            .await
            .expect("reading a file does not panic")?;
        let Some(document) = read else {
            return Ok(None);
        };
        let bytes = document.bytes.clone();
        if keep(&bytes) {
            self.kept.keep(digest, Arc::new(document));
        }
        Ok(Some(bytes))
    }
}

/// The file at `path` and its bytes; `None` when there is none, or it is
/// larger than `limit`.
fn open(path: PathBuf, limit: Option<u64>) -> io::Result<Option<Document>> {
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let size = file.metadata()?.len();
    if limit.is_some_and(|limit| size > limit) {
        return Ok(None);
    }
    let mut bytes = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    file.read_to_end(&mut bytes)?;
    Ok(Some(Document {
        file,
        bytes: Bytes::from(bytes),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn kept_documents_are_served_until_their_file_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("manifest");
        std::fs::write(&path, b"{}").unwrap();
        let digest = Digest::of(b"{}");
        let documents = Documents::default();
        let read = || documents.read(&digest, || path.clone(), Some(10), |_| true);
        assert_eq!(read().await.unwrap().unwrap(), &b"{}"[..]);
        // Kept: a second read does not read the file again (its bytes are
        // changed in place here, which storage never does).
        std::fs::write(&path, b"[]").unwrap();
        assert_eq!(read().await.unwrap().unwrap(), &b"{}"[..]);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(read().await.unwrap(), None, "a removed file is noticed");
        std::fs::write(&path, b"[]").unwrap();
        assert_eq!(
            read().await.unwrap().unwrap(),
            &b"[]"[..],
            "and read again once it is back"
        );
    }

    #[tokio::test]
    async fn the_oldest_go_past_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let documents = Documents::default();
        let big = vec![b'x'; KEPT_BYTES / 3 + 1];
        let mut digests = vec![];
        for i in 0..3u8 {
            let mut bytes = big.clone();
            bytes[0] = i;
            let digest = Digest::of(&bytes);
            let path = dir.path().join(digest.hex());
            std::fs::write(&path, &bytes).unwrap();
            documents.read(&digest, || path, None, |_| true).await.unwrap().unwrap();
            digests.push(digest);
        }
        let kept = documents.kept.map.read().unwrap();
        assert_eq!(kept.order, &digests[1..], "the first went");
        assert_eq!(kept.weight, 2 * big.len());
        assert!(!kept.by_digest.contains_key(&digests[0]));
    }

    #[tokio::test]
    async fn only_documents_are_kept_and_only_so_many_files() {
        let dir = tempfile::tempdir().unwrap();
        let documents = Documents::default();
        for i in 0..2 * KEPT_FILES {
            let bytes = i.to_string().into_bytes();
            let digest = Digest::of(&bytes);
            let path = dir.path().join(digest.hex());
            std::fs::write(&path, &bytes).unwrap();
            let is_document = |bytes: &[u8]| bytes[0] != b'7';
            documents
                .read(&digest, || path, None, is_document)
                .await
                .unwrap()
                .unwrap();
        }
        let kept = documents.kept.map.read().unwrap();
        assert_eq!(kept.by_digest.len(), KEPT_FILES, "files kept open are bounded");
        assert!(kept.order.iter().all(|d| !kept.by_digest[d].bytes.starts_with(b"7")));
        assert!(!kept.by_digest.contains_key(&Digest::of(b"799")), "not a document");
    }

    #[tokio::test]
    async fn larger_blobs_are_not_documents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("layer");
        std::fs::write(&path, [0; 11]).unwrap();
        let documents = Documents::default();
        assert_eq!(
            documents
                .read(&Digest::of(&[0; 11]), || path, Some(10), |_| true)
                .await
                .unwrap(),
            None
        );
    }
}
