//! What storage is opened with: the backend (a folder, an S3 or GCS bucket,
//! or memory) and its settings, whether blob GETs are redirected to
//! presigned URLs, and where layers for a bucket are packed. Configuration
//! fills these in; storage reads them.

use std::path::PathBuf;
use std::time::Duration;

/// Where to keep data, and how blobs are served from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    pub backend: Backend,
    /// Lifetime of presigned URLs when blob GETs are redirected to them.
    pub redirect: Option<Duration>,
    /// Where layers are packed before upload (buckets only).
    pub spool: PathBuf,
    /// Bytes of a bucket's streamed blobs kept in the spool folder (0: none).
    pub blob_cache_bytes: u64,
}

/// A storage backend and its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backend {
    Filesystem(PathBuf),
    S3(S3Config),
    Gcs(GcsConfig),
    Memory,
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Filesystem(_) => "filesystem",
            Backend::S3(_) => "s3",
            Backend::Gcs(_) => "gcs",
            Backend::Memory => "memory",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    pub endpoint: Option<String>,
    pub region: String,
    /// Access key id, secret and session token; `None`: the instance's role.
    pub credentials: Option<(String, String, Option<String>)>,
    pub path_style: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcsConfig {
    pub bucket: String,
    pub credentials: Option<PathBuf>,
    pub endpoint: Option<String>,
}
