//! Layer compression: gzip (libdeflate) and zstd, parallel within a layer,
//! with bytes that do not depend on the number of threads.
//!
//! - **gzip**: the tar stream is cut into fixed 1 MiB chunks by offset; each
//!   chunk becomes one gzip member (RFC 1952 allows a file of several
//!   members, and every client's gzip reader reads them all). Chunks are
//!   compressed on the rayon pool, at most a few per thread in flight, and
//!   written in order, so the output depends only on the input and level.
//! - **zstd**: libzstd's multi-threaded mode, whose output is the same for
//!   any number of workers from one up (checked by a test).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver};

/// Bytes of tar per gzip member.
const CHUNK: usize = 1 << 20;

/// How a layer's tar stream is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// libdeflate level, 1 (fastest) to 12 (smallest).
    Gzip(u32),
    /// zstd level, 1 to 19.
    Zstd(i32),
}

/// Default gzip level, the one registries and the original use.
pub const DEFAULT_GZIP_LEVEL: u32 = 6;
/// Default zstd level, zstd's own.
pub const DEFAULT_ZSTD_LEVEL: i32 = 3;

/// A writer that compresses into `W`.
pub enum Compressor<W: Write> {
    Gzip(ChunkedGzip<W>),
    Zstd(zstd::stream::write::Encoder<'static, W>),
}

impl<W: Write> Compressor<W> {
    /// Compresses on rayon's global pool. Must not be called from a thread
    /// of that pool, which would wait for work queued behind itself.
    pub fn new(out: W, compression: Compression) -> io::Result<Self> {
        Self::on_pool(out, compression, None)
    }

    fn on_pool(out: W, compression: Compression, pool: Option<Arc<rayon::ThreadPool>>) -> io::Result<Self> {
        let workers = pool
            .as_ref()
            .map_or_else(rayon::current_num_threads, |p| p.current_num_threads());
        Ok(match compression {
            Compression::Gzip(level) => Compressor::Gzip(ChunkedGzip::new(out, level, workers, pool)?),
            Compression::Zstd(level) => {
                let mut encoder = zstd::stream::write::Encoder::new(out, level)?;
                encoder.multithread(workers.max(1) as u32)?;
                Compressor::Zstd(encoder)
            }
        })
    }

    /// Ends the stream and returns the writer.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Compressor::Gzip(gzip) => gzip.finish(),
            Compressor::Zstd(zstd) => zstd.finish(),
        }
    }
}

impl<W: Write> Write for Compressor<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::Gzip(gzip) => gzip.write(buf),
            Compressor::Zstd(zstd) => zstd.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::Gzip(gzip) => gzip.flush(),
            Compressor::Zstd(zstd) => zstd.flush(),
        }
    }
}

/// gzip in 1 MiB members, compressed on the rayon pool.
pub struct ChunkedGzip<W: Write> {
    out: W,
    level: libdeflater::CompressionLvl,
    chunk: Vec<u8>,
    in_flight: VecDeque<Receiver<io::Result<Vec<u8>>>>,
    max_in_flight: usize,
    wrote_any: bool,
    /// `None`: rayon's global pool.
    pool: Option<Arc<rayon::ThreadPool>>,
}

impl<W: Write> ChunkedGzip<W> {
    fn new(out: W, level: u32, workers: usize, pool: Option<Arc<rayon::ThreadPool>>) -> io::Result<Self> {
        let level = i32::try_from(level)
            .ok()
            .and_then(|l| libdeflater::CompressionLvl::new(l).ok())
            .ok_or_else(|| io::Error::other(format!("gzip level {level} is not between 0 and 12")))?;
        Ok(ChunkedGzip {
            out,
            level,
            chunk: Vec::with_capacity(CHUNK),
            in_flight: VecDeque::new(),
            max_in_flight: 2 * workers.max(1),
            wrote_any: false,
            pool,
        })
    }

    /// Hands the current chunk to the pool; writes out finished members
    /// while too many are in flight.
    fn submit(&mut self) -> io::Result<()> {
        let chunk = std::mem::replace(&mut self.chunk, Vec::with_capacity(CHUNK));
        let level = self.level;
        let (done, result) = mpsc::sync_channel(1);
        let job = move || {
            let _ = done.send(gzip_member(&chunk, level));
        };
        match &self.pool {
            Some(pool) => pool.spawn(job),
            None => rayon::spawn(job),
        }
        self.in_flight.push_back(result);
        self.wrote_any = true;
        while self.in_flight.len() >= self.max_in_flight {
            self.write_oldest()?;
        }
        Ok(())
    }

    fn write_oldest(&mut self) -> io::Result<()> {
        if let Some(result) = self.in_flight.pop_front() {
            let member = result
                .recv()
                .map_err(|_| io::Error::other("a compression worker stopped"))??;
            self.out.write_all(&member)?;
        }
        Ok(())
    }

    fn finish(mut self) -> io::Result<W> {
        if !self.chunk.is_empty() || !self.wrote_any {
            self.submit()?;
        }
        while !self.in_flight.is_empty() {
            self.write_oldest()?;
        }
        Ok(self.out)
    }
}

impl<W: Write> Write for ChunkedGzip<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let take = buf.len().min(CHUNK - self.chunk.len());
        self.chunk.extend_from_slice(&buf[..take]);
        if self.chunk.len() == CHUNK {
            self.submit()?;
        }
        Ok(take)
    }

    fn flush(&mut self) -> io::Result<()> {
        // Members are only ever cut at chunk boundaries; nothing to force.
        self.out.flush()
    }
}

/// One gzip member holding `data`: libdeflate writes no name and no time.
fn gzip_member(data: &[u8], level: libdeflater::CompressionLvl) -> io::Result<Vec<u8>> {
    let mut compressor = libdeflater::Compressor::new(level);
    let mut out = vec![0; compressor.gzip_compress_bound(data.len())];
    let size = compressor
        .gzip_compress(data, &mut out)
        .map_err(|e| io::Error::other(format!("gzip failed: {e:?}")))?;
    out.truncate(size);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    /// Compressible but not trivial: 3.5 chunks of a repeating pattern with noise.
    fn sample() -> Vec<u8> {
        (0..CHUNK * 7 / 2)
            .map(|i| ((i * 7919) % 251) as u8 ^ (i / 4096) as u8)
            .collect()
    }

    fn compress(data: &[u8], compression: Compression, workers: usize) -> Vec<u8> {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(workers).build().unwrap();
        let mut c = Compressor::on_pool(Vec::new(), compression, Some(Arc::new(pool))).unwrap();
        // Odd write sizes: chunking must not depend on how bytes arrive.
        for piece in data.chunks(333_333) {
            c.write_all(piece).unwrap();
        }
        c.finish().unwrap()
    }

    #[test]
    fn gzip_members_decode_to_the_input_whatever_the_threads() {
        let data = sample();
        let one = compress(&data, Compression::Gzip(6), 1);
        assert_eq!(
            one,
            compress(&data, Compression::Gzip(6), 4),
            "same bytes on 1 and 4 threads"
        );
        assert!(one.len() < data.len() / 2);
        let mut decoded = Vec::new();
        flate2::read::MultiGzDecoder::new(&one[..])
            .read_to_end(&mut decoded)
            .unwrap();
        assert_eq!(decoded, data);
        // Four members: three full chunks and the rest. No name, no time.
        let members = one.windows(4).filter(|w| w == &[0x1f, 0x8b, 8, 0]).count();
        assert!(members >= 4, "{members} member headers");
        assert_eq!(&one[4..8], &[0, 0, 0, 0], "mtime is zero");
    }

    #[test]
    fn empty_input_is_one_empty_member() {
        let empty = compress(&[], Compression::Gzip(6), 2);
        let mut decoded = Vec::new();
        flate2::read::MultiGzDecoder::new(&empty[..])
            .read_to_end(&mut decoded)
            .unwrap();
        assert!(decoded.is_empty());
        assert!(!empty.is_empty());
    }

    #[test]
    fn zstd_is_the_same_for_any_number_of_workers() {
        let data = sample();
        let one = compress(&data, Compression::Zstd(3), 1);
        assert_eq!(one, compress(&data, Compression::Zstd(3), 3));
        assert_eq!(zstd::stream::decode_all(&one[..]).unwrap(), data);
    }

    #[test]
    fn bad_gzip_levels_are_refused() {
        assert!(Compressor::new(Vec::new(), Compression::Gzip(13)).is_err());
    }
}
