//! Content digests: the `sha256:<hex>` strings that name blobs, and a writer
//! that hashes and counts the bytes passing through it.

use std::fmt;
use std::io::{self, Write};
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// A sha256 content digest, always in canonical `sha256:<64 lowercase hex>` form.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Digest(String);

/// Why a string is not a digest this registry can hold.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("digest {0:?} is not of the form algorithm:hex")]
    Malformed(String),
    #[error("digest algorithm {0:?} is not supported; only sha256 is")]
    UnsupportedAlgorithm(String),
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self::from_hash(Sha256::digest(bytes).as_slice())
    }

    /// The digest of everything `reader` yields.
    pub fn of_reader(mut reader: impl io::Read) -> io::Result<Self> {
        let mut hashing = DigestWriter::new(io::sink());
        io::copy(&mut reader, &mut hashing)?;
        Ok(hashing.finish().1)
    }

    fn from_hash(hash: &[u8]) -> Self {
        Digest(format!("sha256:{}", hex::encode(hash)))
    }

    /// The 64 hex characters after `sha256:`.
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Digest {
    type Err = DigestError;

    /// Accepts the OCI digest grammar, but only sha256 with 64 lowercase hex
    /// characters can be held here: other well-formed algorithms are
    /// `UnsupportedAlgorithm`, anything else `Malformed`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || DigestError::Malformed(s.to_owned());
        let (algorithm, encoded) = s.split_once(':').ok_or_else(malformed)?;
        let algorithm_ok = !algorithm.is_empty()
            && algorithm
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b));
        let encoded_ok = !encoded.is_empty()
            && encoded
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"=_-".contains(&b));
        if !algorithm_ok || !encoded_ok {
            return Err(malformed());
        }
        if algorithm != "sha256" {
            return Err(DigestError::UnsupportedAlgorithm(algorithm.to_owned()));
        }
        let hex_ok = encoded.len() == 64
            && encoded
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !hex_ok {
            return Err(malformed());
        }
        Ok(Digest(s.to_owned()))
    }
}

impl TryFrom<String> for Digest {
    type Error = DigestError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Passes writes through to `inner` while hashing and counting them.
pub struct DigestWriter<W> {
    inner: W,
    hasher: Sha256,
    written: u64,
}

impl<W: Write> DigestWriter<W> {
    pub fn new(inner: W) -> Self {
        DigestWriter {
            inner,
            hasher: Sha256::new(),
            written: 0,
        }
    }

    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// The inner writer, the digest of everything written and its length.
    pub fn finish(self) -> (W, Digest, u64) {
        (
            self.inner,
            Digest::from_hash(self.hasher.finalize().as_slice()),
            self.written,
        )
    }
}

impl<W: Write> Write for DigestWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digest_of_bytes_is_canonical() {
        assert_eq!(Digest::of(b"").as_str(), EMPTY);
        assert_eq!(Digest::of(b"").hex(), &EMPTY[7..]);
    }

    #[test]
    fn parse_accepts_only_sha256_hex() {
        assert_eq!(EMPTY.parse::<Digest>().unwrap().as_str(), EMPTY);
        assert!(matches!(
            "sha256:totallywrong".parse::<Digest>(),
            Err(DigestError::Malformed(_))
        ));
        assert!(matches!("sha256:ABC".parse::<Digest>(), Err(DigestError::Malformed(_))));
        assert!(matches!(
            EMPTY.to_uppercase().parse::<Digest>(),
            Err(DigestError::Malformed(_))
        ));
        assert!(matches!("nocolon".parse::<Digest>(), Err(DigestError::Malformed(_))));
        assert!(matches!("sha256:".parse::<Digest>(), Err(DigestError::Malformed(_))));
        assert_eq!(
            format!("sha512:{}", "a".repeat(128)).parse::<Digest>(),
            Err(DigestError::UnsupportedAlgorithm("sha512".into()))
        );
    }

    #[test]
    fn a_reader_hashes_like_its_bytes() {
        let bytes = vec![7u8; 100_000];
        assert_eq!(Digest::of_reader(&bytes[..]).unwrap(), Digest::of(&bytes));
    }

    #[test]
    fn writer_hashes_and_counts_what_passes() {
        let mut w = DigestWriter::new(Vec::new());
        w.write_all(b"hello ").unwrap();
        w.write_all(b"world").unwrap();
        let (bytes, digest, n) = w.finish();
        assert_eq!(bytes, b"hello world");
        assert_eq!(n, 11);
        assert_eq!(digest, Digest::of(b"hello world"));
    }
}
