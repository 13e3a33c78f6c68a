//! A bucket's blobs kept on local disk as they are streamed, for
//! registries that stream blobs from a bucket instead of redirecting to it
//! (`NIXERY_BLOB_REDIRECT=false`). The next GET of a layer is then read
//! from the page cache (`files.rs`) instead of coming over the network and
//! through this process twice, which cost it as much as the bucket's own
//! serving.
//!
//! - The bucket stays the truth: a GET still asks it for the blob's size (a
//!   HEAD), and a kept file of another size is dropped.
//! - A blob is kept only whole, and only if its bytes hash to its digest:
//!   it is written to a `.part` file as it streams, and renamed to its
//!   digest at the end. A GET that ends early leaves nothing.
//! - Whole GETs fill the cache, one at a time per blob; ranges do not.
//! - At most so many bytes are kept (`NIXERY_BLOB_CACHE_MB`); past them,
//!   the blobs asked for least recently go first. What is on disk at start
//!   is kept, oldest first by modification time.

use std::collections::{HashMap, HashSet};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures::StreamExt;
use tempfile::NamedTempFile;

use super::files::{OpenFile, OpenFiles};
use super::{BlobStream, StorageError};
use crate::digest::{Digest, DigestWriter};

const PART: &str = ".part";

/// The blobs kept (see the module's comment).
#[derive(Debug)]
pub struct BlobCache {
    dir: PathBuf,
    max_bytes: u64,
    index: Mutex<Index>,
    files: OpenFiles,
}

#[derive(Debug, Default)]
struct Index {
    /// Each blob's size and when it was last asked for (a count).
    kept: HashMap<Digest, (u64, u64)>,
    bytes: u64,
    clock: u64,
    filling: HashSet<Digest>,
}

impl BlobCache {
    /// The cache in `dir` (created if missing), holding at most `max_bytes`.
    pub fn open(dir: PathBuf, max_bytes: u64) -> io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let mut found = vec![];
        for entry in std::fs::read_dir(&dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let digest = format!("sha256:{name}").parse::<Digest>();
            match digest {
                Ok(digest) if entry.file_type()?.is_file() => {
                    let metadata = entry.metadata()?;
                    found.push((metadata.modified()?, digest, metadata.len()));
                }
                _ => std::fs::remove_file(entry.path())?,
            }
        }
        found.sort();
        let cache = BlobCache {
            dir,
            max_bytes,
            index: Mutex::default(),
            files: OpenFiles::default(),
        };
        for (_, digest, size) in found {
            cache.note(digest, size);
        }
        Ok(cache)
    }

    fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    /// The kept file of `digest`, if there is one of `size` bytes.
    pub async fn get(&self, digest: &Digest, size: u64) -> Result<Option<OpenFile>, StorageError> {
        if !self.touch(digest) {
            return Ok(None);
        }
        match self.files.open(digest, || self.path(digest)).await? {
            Some(file) if file.size == size => Ok(Some(file)),
            _ => {
                self.drop_kept(digest);
                Ok(None)
            }
        }
    }

    /// `stream`, the whole of blob `digest` (`size` bytes), kept as it
    /// passes, unless it is being kept already or is too large to keep.
    pub fn fill(self: &Arc<Self>, digest: &Digest, size: u64, stream: BlobStream) -> BlobStream {
        if size > self.max_bytes || !self.index().filling.insert(digest.clone()) {
            return stream;
        }
        let part = tempfile::Builder::new().suffix(PART).tempfile_in(&self.dir);
        let fill = Fill {
            cache: Arc::clone(self),
            digest: digest.clone(),
            size,
            written: 0,
            writer: part.ok().map(DigestWriter::new),
        };
        futures::stream::unfold((stream, fill), |(mut stream, mut fill)| async move {
            match stream.next().await {
                Some(Ok(chunk)) => {
                    fill.write(chunk.clone()).await;
                    // hyper stops asking once it has sent the length.
                    if fill.written == fill.size {
                        fill.finish().await;
                    }
                    Some((Ok(chunk), (stream, fill)))
                }
                Some(Err(e)) => {
                    fill.writer = None;
                    Some((Err(e), (stream, fill)))
                }
                None => {
                    fill.finish().await;
                    None
                }
            }
        })
        .boxed()
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().expect("no panics under the lock")
    }

    /// Marks `digest` asked for; whether it is kept.
    fn touch(&self, digest: &Digest) -> bool {
        let index = &mut *self.index();
        index.clock += 1;
        match index.kept.get_mut(digest) {
            Some((_, used)) => {
                *used = index.clock;
                true
            }
            None => false,
        }
    }

    /// Notes a kept blob, then drops the least recently asked for until
    /// the rest fit.
    fn note(&self, digest: Digest, size: u64) {
        let mut index = self.index();
        index.clock += 1;
        let clock = index.clock;
        if let Some((old, _)) = index.kept.insert(digest, (size, clock)) {
            index.bytes -= old;
        }
        index.bytes += size;
        while index.bytes > self.max_bytes {
            let Some(oldest) = index
                .kept
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(d, _)| d.clone())
            else {
                break;
            };
            let (size, _) = index.kept.remove(&oldest).expect("it was just found");
            index.bytes -= size;
            remove(&self.path(&oldest));
        }
    }

    fn drop_kept(&self, digest: &Digest) {
        let mut index = self.index();
        if let Some((size, _)) = index.kept.remove(digest) {
            index.bytes -= size;
            remove(&self.path(digest));
        }
    }
}

fn remove(path: &Path) {
    if let Err(error) = std::fs::remove_file(path)
        && error.kind() != io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), %error, "could not remove a kept blob");
    }
}

/// One blob being kept as it streams; dropped before the end (the client
/// went, the bucket failed), its part file goes with it.
struct Fill {
    cache: Arc<BlobCache>,
    digest: Digest,
    size: u64,
    /// Bytes streamed so far.
    written: u64,
    /// `None` once anything went wrong: the rest streams without it.
    writer: Option<DigestWriter<NamedTempFile>>,
}

impl Fill {
    async fn write(&mut self, chunk: Bytes) {
        self.written += chunk.len() as u64;
        let Some(mut writer) = self.writer.take() else {
            return;
        };
        let written = tokio::task::spawn_blocking(move || writer.write_all(&chunk).map(|()| writer)).await;
        match written {
            Ok(Ok(writer)) => self.writer = Some(writer),
            Ok(Err(error)) => tracing::warn!(blob = %self.digest, %error, "could not keep a blob on local disk"),
            Err(_) => {}
        }
    }

    async fn finish(&mut self) {
        let Some(writer) = self.writer.take() else {
            return;
        };
        let (part, found, written) = writer.finish();
        if found != self.digest || written != self.size {
            tracing::warn!(blob = %self.digest, %found, written, "a blob streamed from the bucket does not match its digest");
            return;
        }
        let path = self.cache.path(&self.digest);
        let kept = tokio::task::spawn_blocking(move || part.persist(path).map(drop)).await;
        match kept {
            Ok(Ok(())) => self.cache.note(self.digest.clone(), self.size),
            Ok(Err(error)) => tracing::warn!(blob = %self.digest, %error, "could not keep a blob on local disk"),
            Err(_) => {}
        }
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        self.cache.index().filling.remove(&self.digest);
    }
}

/// Whether `file` is a part file of an unfinished fill.
#[cfg(test)]
fn is_part(file: &Path) -> bool {
    file.to_string_lossy().ends_with(PART)
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;

    fn blob(fill: u8, len: usize) -> (Bytes, Digest) {
        let bytes = Bytes::from(vec![fill; len]);
        let digest = Digest::of(&bytes);
        (bytes, digest)
    }

    fn chunks(bytes: &Bytes) -> BlobStream {
        let parts: Vec<Result<Bytes, StorageError>> =
            bytes.chunks(1000).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        futures::stream::iter(parts).boxed()
    }

    fn files_in(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        files
    }

    #[tokio::test]
    async fn a_whole_matching_blob_is_kept_and_served_from_disk() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(BlobCache::open(dir.path().join("kept"), 1 << 20).unwrap());
        let (bytes, digest) = blob(7, 5000);
        assert!(cache.get(&digest, 5000).await.unwrap().is_none());
        let streamed: Vec<Bytes> = cache.fill(&digest, 5000, chunks(&bytes)).try_collect().await.unwrap();
        assert_eq!(streamed.concat(), bytes);
        let file = cache.get(&digest, 5000).await.unwrap().expect("kept");
        let read: Vec<Bytes> = file.stream(None).try_collect().await.unwrap();
        assert_eq!(read.concat(), bytes);
        assert!(
            cache.get(&digest, 4999).await.unwrap().is_none(),
            "another size: dropped"
        );
        assert!(files_in(&dir.path().join("kept")).is_empty());
    }

    #[tokio::test]
    async fn a_blob_is_kept_once_its_length_has_passed() {
        // As hyper does: it stops polling once Content-Length bytes are sent.
        let dir = tempfile::tempdir().unwrap();
        let cache = Arc::new(BlobCache::open(dir.path().join("kept"), 1 << 20).unwrap());
        let (bytes, digest) = blob(9, 2500);
        let mut stream = cache.fill(&digest, 2500, chunks(&bytes));
        for _ in 0..3 {
            stream.next().await.unwrap().unwrap();
        }
        drop(stream);
        assert!(cache.get(&digest, 2500).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn wrong_or_unfinished_bytes_are_never_kept() {
        let dir = tempfile::tempdir().unwrap();
        let kept = dir.path().join("kept");
        let cache = Arc::new(BlobCache::open(kept.clone(), 1 << 20).unwrap());
        let (bytes, _) = blob(1, 3000);
        let (_, other) = blob(2, 3000);
        let streamed: Vec<Bytes> = cache.fill(&other, 3000, chunks(&bytes)).try_collect().await.unwrap();
        assert_eq!(streamed.concat(), bytes, "the client still gets what the bucket sent");
        assert!(cache.get(&other, 3000).await.unwrap().is_none());

        let (bytes, digest) = blob(3, 3000);
        let mut stream = cache.fill(&digest, 3000, chunks(&bytes));
        stream.next().await.unwrap().unwrap();
        assert!(files_in(&kept).iter().any(|f| is_part(f)));
        drop(stream);
        assert!(files_in(&kept).is_empty(), "a GET that ends early leaves nothing");
        assert!(cache.get(&digest, 3000).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn the_least_recently_asked_for_go_first_and_a_restart_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let kept = dir.path().join("kept");
        let cache = Arc::new(BlobCache::open(kept.clone(), 10_000).unwrap());
        let blobs: Vec<(Bytes, Digest)> = (0..3).map(|i| blob(i, 4000)).collect();
        for (bytes, digest) in &blobs[..2] {
            let _: Vec<Bytes> = cache.fill(digest, 4000, chunks(bytes)).try_collect().await.unwrap();
        }
        assert!(
            cache.get(&blobs[0].1, 4000).await.unwrap().is_some(),
            "0 asked for again"
        );
        let _: Vec<Bytes> = cache
            .fill(&blobs[2].1, 4000, chunks(&blobs[2].0))
            .try_collect()
            .await
            .unwrap();
        assert!(cache.get(&blobs[1].1, 4000).await.unwrap().is_none(), "1 went");
        assert_eq!(files_in(&kept).len(), 2);

        std::fs::write(kept.join("junk.part"), b"x").unwrap();
        let again = BlobCache::open(kept.clone(), 10_000).unwrap();
        assert!(again.get(&blobs[0].1, 4000).await.unwrap().is_some());
        assert!(again.get(&blobs[2].1, 4000).await.unwrap().is_some());
        assert_eq!(files_in(&kept).len(), 2, "part files go at start");
    }
}
