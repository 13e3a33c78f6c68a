//! Opening the object store a configuration names: a local folder, an S3 or
//! GCS bucket, or memory; for buckets, the signer of presigned URLs; and
//! what writes go through (`writes.rs`): the store itself, or for GCS the
//! JSON API client (`gcs.rs`), decided here and nowhere else.
//! Requests to buckets give up after a few quick retries, so that clients
//! hear of an unreachable bucket in seconds rather than minutes.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::signer::Signer;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

use super::StorageError;
use super::gcs::JsonWrites;
use super::settings::{Backend, GcsConfig, S3Config};
use super::writes::Writes;

/// How long a bucket request may take before it is retried or fails.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Retries of a failed bucket request, and the time they may take in all.
const RETRIES: usize = 2;
const RETRY_TIMEOUT: Duration = Duration::from_secs(10);

/// An opened backend.
pub struct Opened {
    pub store: Arc<dyn ObjectStore>,
    /// For buckets: what presigns URLs.
    pub signer: Option<Arc<dyn Signer>>,
    /// What writes go through: `store`, or for GCS its JSON API.
    pub writes: Writes,
    /// For a folder: its root, whose blob files are read directly.
    pub folder: Option<std::path::PathBuf>,
}

/// Opens `backend`; a filesystem root is created if missing.
pub async fn open(backend: &Backend) -> Result<Opened, StorageError> {
    Ok(match backend {
        Backend::Filesystem(root) => {
            tokio::fs::create_dir_all(root).await?;
            let store: Arc<dyn ObjectStore> = Arc::new(LocalFileSystem::new_with_prefix(root)?.with_fsync(true));
            Opened {
                writes: Writes::Store(store.clone()),
                store,
                signer: None,
                folder: Some(std::fs::canonicalize(root)?),
            }
        }
        Backend::S3(config) => {
            let s3 = Arc::new(s3(config).build()?);
            Opened {
                store: s3.clone(),
                signer: Some(s3.clone()),
                writes: Writes::Store(s3),
                folder: None,
            }
        }
        Backend::Gcs(config) => {
            let gcs = Arc::new(gcs(config).build()?);
            let json = JsonWrites::new(config.endpoint.as_deref(), &config.bucket, gcs.credentials().clone())?;
            Opened {
                store: gcs.clone(),
                signer: Some(gcs),
                writes: Writes::GcsJson(Arc::new(json)),
                folder: None,
            }
        }
        Backend::Memory => {
            let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
            Opened {
                writes: Writes::Store(store.clone()),
                store,
                signer: None,
                folder: None,
            }
        }
    })
}

fn s3(config: &S3Config) -> AmazonS3Builder {
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(&config.bucket)
        .with_region(&config.region)
        .with_virtual_hosted_style_request(!config.path_style)
        .with_client_options(client_options(config.endpoint.as_deref()))
        .with_retry(retry());
    if let Some(endpoint) = &config.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some((key, secret, token)) = &config.credentials {
        builder = builder.with_access_key_id(key).with_secret_access_key(secret);
        if let Some(token) = token {
            builder = builder.with_token(token);
        }
    }
    builder
}

fn gcs(config: &GcsConfig) -> GoogleCloudStorageBuilder {
    let mut builder = GoogleCloudStorageBuilder::new()
        .with_bucket_name(&config.bucket)
        .with_client_options(client_options(config.endpoint.as_deref()))
        .with_retry(retry());
    if let Some(credentials) = &config.credentials {
        builder = builder.with_service_account_path(credentials.display().to_string());
    }
    if let Some(endpoint) = &config.endpoint {
        builder = builder.with_base_url(endpoint);
    }
    builder
}

/// Plain HTTP is allowed only for an endpoint that says so (an emulator).
fn client_options(endpoint: Option<&str>) -> ClientOptions {
    ClientOptions::new()
        .with_allow_http(endpoint.is_some_and(|e| e.starts_with("http://")))
        .with_timeout(REQUEST_TIMEOUT)
        .with_connect_timeout(CONNECT_TIMEOUT)
}

fn retry() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig::default(),
        max_retries: RETRIES,
        retry_timeout: RETRY_TIMEOUT,
    }
}
