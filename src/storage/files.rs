//! Streaming blobs out of a storage folder at the speed of the page cache.
//!
//! object_store's local reader hands every 8 KiB chunk to the blocking
//! pool, so serving a layer is mostly threads waking each other. Here a blob
//! file is opened once (on the blocking pool: an open may wait for the
//! disk), and each chunk is read on the async worker with
//! `preadv2(RWF_NOWAIT)`, which copies from the page cache and refuses,
//! rather than waits, when the bytes are not there. Only such a read goes to
//! the blocking pool. Chunks are [`CHUNK`] bytes: large enough that a read
//! costs little per byte (128 KiB were no faster), small enough that 200
//! downloads at once hold a few tens of MiB.
//!
//! Blob files are written once, complete, and reach their address by a link,
//! so an open file never changes under a reader; one that is shorter than
//! its size said (someone truncated it) ends the stream with an error.
//! The files of blobs recently asked for are kept open ([`OpenFiles`],
//! while still linked: `linked.rs`), so a request for one costs no open.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;

use super::linked::{Kept, Linked};
use super::{BlobStream, StorageError};
use crate::digest::Digest;

/// Bytes read per chunk.
pub const CHUNK: usize = 64 * 1024;
/// Blob files kept open at most.
const KEPT_OPEN: usize = 256;

/// The blob files kept open, by digest; past [`KEPT_OPEN`], the oldest
/// are closed.
#[derive(Debug)]
pub struct OpenFiles {
    kept: Kept<OpenFile>,
}

impl Default for OpenFiles {
    fn default() -> Self {
        OpenFiles {
            kept: Kept::new(KEPT_OPEN, KEPT_OPEN),
        }
    }
}

impl OpenFiles {
    /// The blob `digest`, whose file is `path`, open; `None` when there is none.
    /// The file of `digest`, at `path` unless it is kept open already.
    pub async fn open(
        &self,
        digest: &Digest,
        path: impl FnOnce() -> PathBuf,
    ) -> Result<Option<OpenFile>, StorageError> {
        if let Some(file) = self.kept.get(digest)? {
            return Ok(Some(file));
        }
        let Some(file) = open(path()).await? else {
            return Ok(None);
        };
        self.kept.keep(digest, file.clone());
        Ok(Some(file))
    }
}

impl Linked for OpenFile {
    fn file(&self) -> &File {
        &self.file
    }

    fn weight(&self) -> usize {
        1
    }
}

/// A blob file, open, with its size.
#[derive(Clone, Debug)]
pub struct OpenFile {
    file: Arc<File>,
    pub size: u64,
}

/// Opens the file at `path`; `None` when there is none.
pub async fn open(path: PathBuf) -> Result<Option<OpenFile>, StorageError> {
    let opened = tokio::task::spawn_blocking(move || {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        Ok::<_, io::Error>(OpenFile {
            file: Arc::new(file),
            size,
        })
    })
    .await
    .expect("opening a file does not panic");
    match opened {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl OpenFile {
    /// The bytes of `range` (the whole file if `None`), in chunks.
    pub fn stream(self, range: Option<Range<u64>>) -> BlobStream {
        let range = range.unwrap_or(0..self.size);
        futures::stream::try_unfold((self.file, range), |(file, range)| async move {
            if range.is_empty() {
                return Ok(None);
            }
            let want = usize::try_from(range.end - range.start).map_or(CHUNK, |left| left.min(CHUNK));
            let chunk = read_chunk(&file, range.start, want).await?;
            if chunk.is_empty() {
                return Err(StorageError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "a blob file is shorter than its size",
                )));
            }
            let next = range.start + chunk.len() as u64..range.end;
            Ok(Some((chunk, (file, next))))
        })
        .boxed()
    }
}

/// Up to `want` bytes at `offset`: from the page cache at once when they
/// are there, else read on the blocking pool.
async fn read_chunk(file: &Arc<File>, offset: u64, want: usize) -> io::Result<Bytes> {
    match read_cached(file, offset, want) {
        Ok(Some(bytes)) => return Ok(bytes),
        Ok(None) => {}
        Err(e) => return Err(e),
    }
    let file = Arc::clone(file);
    tokio::task::spawn_blocking(move || {
        let mut buffer = vec![0; want];
        let read = file.read_at(&mut buffer, offset)?;
        buffer.truncate(read);
        Ok(Bytes::from(buffer))
    })
    .await
    .expect("reading a file does not panic")
}

/// Up to `want` bytes at `offset` if the page cache has (some of) them;
/// `None` if reading them would wait for the disk, or the kernel cannot
/// say without waiting.
fn read_cached(file: &File, offset: u64, want: usize) -> io::Result<Option<Bytes>> {
    let Ok(offset) = libc::off_t::try_from(offset) else {
        return Ok(None);
    };
    let mut buffer = BytesMut::with_capacity(want);
    let spare = buffer.spare_capacity_mut();
    let iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: want,
    };
    // SAFETY: the one iovec points at `want` bytes of `buffer`'s spare
    // capacity, which outlives the call; the kernel writes at most that.
    let read = unsafe { libc::preadv2(file.as_raw_fd(), &iov, 1, offset, libc::RWF_NOWAIT) };
    if read >= 0 {
        let read = usize::try_from(read).expect("a read's length is not negative");
        // SAFETY: the kernel initialised the first `read` bytes.
        unsafe { buffer.set_len(read) };
        return Ok(Some(buffer.freeze()));
    }
    let error = io::Error::last_os_error();
    match error.raw_os_error() {
        // Not cached; or a kernel or filesystem without RWF_NOWAIT.
        Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::EINVAL | libc::ENOSYS) => Ok(None),
        Some(libc::EINTR) => read_cached(file, u64::try_from(offset).unwrap_or(0), want),
        _ => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt;

    fn numbered(len: usize) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        (dir, path, bytes)
    }

    async fn collect(stream: BlobStream) -> (Vec<u8>, Vec<usize>) {
        let chunks: Vec<Bytes> = stream.try_collect().await.unwrap();
        let sizes = chunks.iter().map(Bytes::len).collect();
        (chunks.concat(), sizes)
    }

    #[tokio::test]
    async fn whole_files_and_ranges_come_back_exact_in_big_chunks() {
        let len = 3 * CHUNK + 1234;
        let (_dir, path, bytes) = numbered(len);
        let file = open(path).await.unwrap().unwrap();
        assert_eq!(file.size, len as u64);
        let (whole, sizes) = collect(file.clone().stream(None)).await;
        assert_eq!(whole, bytes);
        assert_eq!(sizes, [CHUNK, CHUNK, CHUNK, 1234]);
        for range in [0..1, 5..CHUNK + 7, CHUNK * 3..len, 17..17] {
            let wanted = range.start as u64..range.end as u64;
            let (part, _) = collect(file.clone().stream(Some(wanted))).await;
            assert_eq!(part, bytes[range]);
        }
    }

    #[tokio::test]
    async fn a_file_shorter_than_its_size_is_an_error_not_a_short_blob() {
        let (_dir, path, _) = numbered(2 * CHUNK);
        let file = open(path.clone()).await.unwrap().unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(CHUNK as u64 + 10)
            .unwrap();
        let read: Result<Vec<Bytes>, _> = file.stream(None).try_collect().await;
        assert!(matches!(read, Err(StorageError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof));
    }

    #[tokio::test]
    async fn bytes_not_in_the_page_cache_are_read_on_the_blocking_pool() {
        let (_dir, path, bytes) = numbered(2 * CHUNK);
        let file = open(path).await.unwrap().unwrap();
        // The kernel may keep pages it is still writing back, under load:
        // asked again, a moment later, it drops them.
        let dropped = (0..20).any(|_| {
            file.file.sync_all().unwrap();
            // SAFETY: advice on an open descriptor; it touches no memory.
            let advised = unsafe { libc::posix_fadvise(file.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            assert_eq!(advised, 0);
            let gone = read_cached(&file.file, 0, CHUNK).unwrap().is_none();
            if !gone {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            gone
        });
        assert!(dropped, "the kernel says the bytes are not cached");
        assert_eq!(collect(file.stream(None)).await.0, bytes);
    }

    #[tokio::test]
    async fn kept_files_serve_until_removed_and_stay_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let files = OpenFiles::default();
        let digest = Digest::of(b"one");
        let path = dir.path().join("one");
        std::fs::write(&path, b"one").unwrap();
        assert_eq!(files.open(&digest, || path.clone()).await.unwrap().unwrap().size, 3);
        // Kept: the same file again, though the path now holds another.
        let other = dir.path().join("other");
        std::fs::write(&other, b"other").unwrap();
        std::fs::hard_link(&path, dir.path().join("link")).unwrap();
        std::fs::rename(&other, &path).unwrap();
        assert_eq!(files.open(&digest, || path.clone()).await.unwrap().unwrap().size, 3);
        // Unlinked everywhere: looked for again.
        std::fs::remove_file(dir.path().join("link")).unwrap();
        assert_eq!(files.open(&digest, || path.clone()).await.unwrap().unwrap().size, 5);
        std::fs::remove_file(&path).unwrap();
        assert!(
            files.open(&digest, || path).await.unwrap().is_none(),
            "a removed file is noticed"
        );
        for i in 0..KEPT_OPEN + 3 {
            let path = dir.path().join(format!("f{i}"));
            std::fs::write(&path, b"x").unwrap();
            files
                .open(&Digest::of(format!("f{i}").as_bytes()), || path)
                .await
                .unwrap()
                .unwrap();
        }
        let kept = files.kept.map.read().unwrap();
        assert_eq!((kept.by_digest.len(), kept.order.len()), (KEPT_OPEN, KEPT_OPEN));
    }

    #[tokio::test]
    async fn a_missing_file_is_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(open(dir.path().join("nothing")).await.unwrap().is_none());
    }
}
