//! Configuration: command-line flags and the environment variables the
//! original Nixery reads (`PORT`, `NIXERY_PKGS_PATH`, `NIXERY_CHANNEL`,
//! `NIXERY_PKGS_REPO`, `NIXERY_STORAGE_BACKEND`, `STORAGE_PATH`,
//! `NIX_TIMEOUT`, `NIX_POPULARITY_URL`, `NIXERY_DEFAULT_TAG`, `GCS_BUCKET`,
//! `GOOGLE_APPLICATION_CREDENTIALS`, and the S3 backend's `S3_BUCKET`,
//! `S3_ENDPOINT`, `AWS_REGION`, `S3_ACCESS_KEY`, `S3_SECRET_KEY`,
//! `S3_USE_PATH_STYLE`) plus ours, each with a flag of the
//! same meaning. The only module that reads the environment. Invalid
//! settings stop the program at start with a message naming the setting.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::builder::TypedValueParser as _;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::arch::Arch;
use crate::archive::{Compression, DEFAULT_GZIP_LEVEL, DEFAULT_ZSTD_LEVEL};
use crate::auth::Auth;
use crate::client::TrustedProxies;
use crate::export::OutputFormat;
use crate::layers::{DEFAULT_BUDGET, Strategy};
use crate::meta::MetaPackages;
use crate::oci::Format;
use crate::redact::Secrets;
use crate::source::{Channel, DEFAULT_CHANNEL_URL, PackageSource};
use crate::storage::{Backend, GcsConfig, S3Config, StorageConfig};

#[derive(Debug, Parser)]
#[command(
    name = "nixery",
    version,
    about = "A container registry that builds images from Nix packages on demand"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the registry.
    Serve(Box<ServeArgs>),
    /// Build one image without serving it, and write it to a folder (an OCI
    /// image layout) or a file (a docker-archive for `docker load`).
    Build(Box<BuildArgs>),
    /// Delete what no recently pulled image needs: the records of images
    /// not pulled within `--keep-pulled-within` (or beyond `--max-bytes`),
    /// then the blobs nothing kept reaches. Safe while replicas serve.
    Gc(Box<GcArgs>),
    /// Print, as JSON, how a strategy groups a runtime graph into layers
    /// (the registry's own code); `{"layers":[{"paths":[…],"size":N}]}` in
    /// manifest order.
    Layers(LayersArgs),
}

#[derive(Debug, Args)]
pub struct LayersArgs {
    /// A runtime graph: Nixery's `{"exportReferencesGraph":{"graph":[roots]},"graph":[…]}`,
    /// `nix path-info --json --recursive` output, or an exportReferencesGraph list.
    pub graph: PathBuf,
    /// Popularity JSON, `{"name-version": count}`.
    #[arg(long)]
    pub popularity: Option<PathBuf>,
    /// The most layers to make.
    #[arg(long, default_value_t = DEFAULT_BUDGET, value_parser = clap::value_parser!(u16).range(1..).map(usize::from))]
    pub budget: usize,
    /// stable, nixery or size-cohort.
    #[arg(long, default_value = "stable")]
    pub strategy: Strategy,
    /// Name prefixes of the roots every image gets, comma-separated (the
    /// registry's always-added packages).
    #[arg(long, value_delimiter = ',', default_value = "nss-cacert,iana-etc")]
    pub base: Vec<String>,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Print what would be dropped, and the bytes; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// The registry's settings: storage, and retention.
    #[command(flatten)]
    pub registry: ServeArgs,
}

impl GcArgs {
    pub fn check(self) -> Result<(ServeConfig, crate::gc::Options), ConfigError> {
        let config = self.registry.check()?;
        let options = crate::gc::Options {
            dry_run: self.dry_run,
            ..config.retention.clone()
        };
        Ok((config, options))
    }
}

/// What retention keeps, for `gc` and for `serve`'s own collections.
#[derive(Debug, Args)]
struct RetentionArgs {
    /// Keep images pulled or built within this long (`30d`, `12h`).
    #[arg(long, env = "NIXERY_GC_KEEP_PULLED_WITHIN", default_value = "30d", value_parser = humantime::parse_duration)]
    keep_pulled_within: Duration,
    /// Keep at most this many bytes of blobs (`500GiB`, `10GB`, bytes):
    /// beyond it, the least recently pulled images are dropped first.
    #[arg(long, env = "NIXERY_GC_MAX_BYTES", value_parser = parse_size)]
    max_bytes: Option<u64>,
    /// Never delete a blob younger than this.
    #[arg(long, env = "NIXERY_GC_GRACE", default_value = "1h", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Run a garbage collection this often inside `serve` (`24h`); one
    /// replica at a time. Off unless set.
    #[arg(long, env = "NIXERY_GC_INTERVAL", value_parser = humantime::parse_duration)]
    gc_interval: Option<Duration>,
    /// Seconds a replica's lease (on an image it builds, or on a garbage
    /// collection) lasts unless its holder renews it: how long the others
    /// wait for a replica that died before one of them takes over.
    #[arg(long, env = "NIXERY_LEASE_TTL", default_value_t = 30, value_parser = clap::value_parser!(u64).range(3..))]
    lease_ttl: u64,
}

/// A size in bytes: a number with an optional unit, `K`/`M`/`G`/`T` with
/// `B` (powers of 1000) or `iB` (powers of 1024).
fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().map_err(|_| format!("{text:?} is not a size"))?;
    let power = |p: i32, base: f64| base.powi(p);
    let factor = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => power(1, 1000.0),
        "m" | "mb" => power(2, 1000.0),
        "g" | "gb" => power(3, 1000.0),
        "t" | "tb" => power(4, 1000.0),
        "kib" => power(1, 1024.0),
        "mib" => power(2, 1024.0),
        "gib" => power(3, 1024.0),
        "tib" => power(4, 1024.0),
        _ => {
            return Err(format!(
                "{text:?}: the unit must be B, KB, MB, GB, TB, KiB, MiB, GiB or TiB"
            ));
        }
    };
    Ok((number * factor) as u64)
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The image, named as in a pull: `shell/hello`, `shell/git:v1`.
    pub image: String,
    /// Where to write it: a folder (oci) or a file (docker-archive).
    #[arg(long)]
    pub output: PathBuf,
    /// oci (an OCI image layout) or docker-archive (for `docker load`).
    #[arg(long, value_enum, default_value = "oci")]
    pub output_format: OutputFormat,
    /// The registry's settings, which shape the image the same way (those
    /// about listening do nothing here); storage defaults to a cache folder.
    #[command(flatten)]
    pub registry: ServeArgs,
}

impl BuildArgs {
    /// The registry settings, with storage in the user's cache folder
    /// (`$XDG_CACHE_HOME/nixery` or `~/.cache/nixery`) unless configured.
    pub fn check(mut self) -> Result<(ServeConfig, String, PathBuf, OutputFormat), ConfigError> {
        if self.registry.storage_backend == StorageBackend::Filesystem && self.registry.storage_path.is_none() {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
                .ok_or(ConfigError::NoStoragePath)?;
            self.registry.storage_path = Some(cache.join("nixery"));
        }
        let config = self.registry.check()?;
        Ok((config, self.image, self.output, self.output_format))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StorageBackend {
    Filesystem,
    S3,
    Gcs,
    /// In memory, lost at exit: for trying things out.
    Memory,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LayerCompression {
    Gzip,
    Zstd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TCP port to listen on.
    #[arg(long, env = "PORT", default_value_t = 8080)]
    port: u16,
    /// Address to listen on.
    #[arg(long, env = "NIXERY_LISTEN_ADDRESS", default_value = "0.0.0.0")]
    listen_address: IpAddr,
    /// A package set on local disk (a folder with default.nix, or a file).
    #[arg(long, env = "NIXERY_PKGS_PATH")]
    pkgs_path: Option<PathBuf>,
    /// A nixpkgs branch or commit, fetched as a tarball.
    #[arg(long, env = "NIXERY_CHANNEL")]
    channel: Option<String>,
    /// Where channel tarballs come from; `{channel}` is the branch or commit.
    #[arg(long, env = "NIXERY_CHANNEL_URL", default_value = DEFAULT_CHANNEL_URL)]
    channel_url: String,
    /// Other channels an image tag may select, comma-separated; `commits`
    /// lets a tag name any nixpkgs commit.
    #[arg(long, env = "NIXERY_CHANNEL_TAGS", value_delimiter = ',')]
    channel_tags: Vec<String>,
    /// A git repository holding a package set; image tags select revisions.
    #[arg(long, env = "NIXERY_PKGS_REPO")]
    pkgs_repo: Option<String>,
    /// The branch or tag `latest` names in the git repository (default: HEAD).
    #[arg(long, env = "NIXERY_DEFAULT_TAG")]
    default_tag: Option<String>,
    /// A flake whose legacyPackages (or packages) are the package set.
    #[arg(long, env = "NIXERY_FLAKE")]
    flake: Option<String>,
    /// A TOML file of meta-packages, replacing shell, arm64 and nonroot.
    #[arg(long, env = "NIXERY_META_PACKAGES")]
    meta_packages: Option<PathBuf>,
    /// Make an image of one package run its meta.mainProgram.
    #[arg(long, env = "NIXERY_ENTRYPOINT", default_value_t = true, action = clap::ArgAction::Set)]
    entrypoint: bool,
    /// Where blobs and cache records are kept.
    #[arg(long, env = "NIXERY_STORAGE_BACKEND", value_enum, default_value = "filesystem")]
    storage_backend: StorageBackend,
    /// Root folder of the filesystem storage backend.
    #[arg(long, env = "STORAGE_PATH")]
    storage_path: Option<PathBuf>,
    #[command(flatten)]
    s3: S3Args,
    #[command(flatten)]
    gcs: GcsArgs,
    /// Answer blob GETs with a 307 redirect to a presigned URL of the bucket
    /// instead of streaming them (default: on for s3 and gcs; those only).
    #[arg(long, env = "NIXERY_BLOB_REDIRECT", action = clap::ArgAction::Set)]
    blob_redirect: Option<bool>,
    /// Seconds a presigned blob URL stays valid.
    #[arg(long, env = "NIXERY_REDIRECT_TTL", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..=604_800))]
    redirect_ttl: u64,
    /// Local folder where layers are packed before they are uploaded to an
    /// s3 or gcs bucket (default: nixery-spool in the temporary folder).
    #[arg(long, env = "NIXERY_SPOOL_PATH")]
    spool_path: Option<PathBuf>,
    /// MiB of a bucket's blobs kept in the spool folder as they are
    /// streamed (without blob redirects), so popular layers are read from
    /// local disk; 0 keeps none.
    #[arg(long, env = "NIXERY_BLOB_CACHE_MB", default_value_t = 2048)]
    blob_cache_mb: u64,
    /// Image builds that may run at once (default: one per core); requests
    /// for other new images wait for a slot.
    #[arg(long, env = "NIXERY_MAX_BUILDS", value_parser = clap::value_parser!(u16).range(1..))]
    max_builds: Option<u16>,
    /// Seconds each Nix call (and each Nix builder) may take.
    #[arg(long, env = "NIX_TIMEOUT", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    nix_timeout: u64,
    /// Popularity data for layering: an http(s) URL, a file:// URL or a path.
    #[arg(long, env = "NIX_POPULARITY_URL")]
    popularity_url: Option<String>,
    /// Layers for store paths (one more holds the root filesystem).
    #[arg(long, env = "NIXERY_LAYER_BUDGET", default_value_t = DEFAULT_BUDGET as u16,
          value_parser = clap::value_parser!(u16).range(1..=125))]
    layer_budget: u16,
    /// Count the store paths of the images this registry builds and add the
    /// counts to the popularity data at the next start.
    #[arg(long, env = "NIXERY_LEARN_POPULARITY", default_value_t = false, action = clap::ArgAction::Set)]
    learn_popularity: bool,
    /// How store paths are grouped into layers: stable, nixery or size-cohort.
    #[arg(long, env = "NIXERY_LAYERING", default_value = "stable")]
    layering: Strategy,
    /// gzip level of layers (libdeflate: 1 fastest, 12 smallest).
    #[arg(long, env = "NIXERY_GZIP_LEVEL", default_value_t = DEFAULT_GZIP_LEVEL,
          value_parser = clap::value_parser!(u32).range(1..=12))]
    gzip_level: u32,
    /// Compression of the layers of OCI manifests: gzip, or zstd for clients
    /// that read it (Docker manifests always get gzip).
    #[arg(long, env = "NIXERY_COMPRESSION", value_enum, default_value = "gzip")]
    compression: LayerCompression,
    /// zstd level of layers (1 fastest, 19 smallest).
    #[arg(long, env = "NIXERY_ZSTD_LEVEL", default_value_t = DEFAULT_ZSTD_LEVEL,
          value_parser = clap::value_parser!(i32).range(1..=19))]
    zstd_level: i32,
    /// Architectures a tag resolves to, comma-separated; with more than one,
    /// clients that read indexes get an index over all of them, others the first.
    #[arg(long, env = "NIXERY_ARCHITECTURES", value_delimiter = ',', default_value = "amd64")]
    architectures: Vec<Arch>,
    /// The manifest format for clients that accept both (oci or docker);
    /// clients that accept one get that one.
    #[arg(long, env = "NIXERY_MANIFEST_FORMAT", default_value = "oci")]
    manifest_format: Format,
    /// An htpasswd file (bcrypt entries): pulls need one of its users.
    #[arg(long, env = "NIXERY_HTPASSWD")]
    htpasswd: Option<PathBuf>,
    /// A file of bearer tokens, one per line: pulls may show one instead.
    #[arg(long, env = "NIXERY_TOKENS")]
    tokens: Option<PathBuf>,
    /// With NIXERY_HTPASSWD or NIXERY_TOKENS, protect the web pages and
    /// metrics as well (health checks stay open).
    #[arg(long, env = "NIXERY_PROTECT_WEB", default_value_t = false, action = clap::ArgAction::Set)]
    protect_web: bool,
    /// Most packages (name components) an image may name.
    #[arg(long, env = "NIXERY_MAX_PACKAGES", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    max_packages: u16,
    /// Most new images one client (IP address) may have building at once;
    /// more get 429 TOOMANYREQUESTS.
    #[arg(long, env = "NIXERY_CLIENT_BUILDS", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    client_builds: u16,
    /// New images one client may start per minute, and at once after a
    /// minute without; more get 429 TOOMANYREQUESTS until its next one.
    #[arg(long, env = "NIXERY_CLIENT_BUILD_RATE", default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=60_000))]
    client_build_rate: u32,
    /// Seconds a new connection has to send its first request's headers; a
    /// slower one is disconnected.
    #[arg(long, env = "NIXERY_HEADER_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    header_timeout: u64,
    /// Seconds a connection may stay open between requests.
    #[arg(long, env = "NIXERY_IDLE_TIMEOUT", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout: u64,
    /// Most client connections open at once (default: three quarters of the
    /// open-file limit, which is raised to its hard limit, at most 16384).
    /// At the cap, the connection idle longest is closed for a new one.
    #[arg(long, env = "NIXERY_MAX_CONNECTIONS", value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: Option<u32>,
    /// Proxies whose X-Forwarded-For (or Forwarded) headers name the client,
    /// as comma-separated addresses and CIDR blocks.
    #[arg(long, env = "NIXERY_TRUSTED_PROXIES", default_value = "")]
    trusted_proxies: TrustedProxies,
    /// Show the last lines of Nix's log of failed builds on the landing page
    /// even when it is open to anyone (it always does when protected).
    #[arg(long, env = "NIXERY_WEB_SHOW_LOGS", default_value_t = false, action = clap::ArgAction::Set)]
    web_show_logs: bool,
    /// Seconds open requests and builds may take to finish after SIGTERM.
    #[arg(long, env = "NIXERY_SHUTDOWN_TIMEOUT", default_value_t = 30)]
    shutdown_timeout: u64,
    /// Seconds between writes of the images pulled since the last one (each
    /// image's last-pull time, for retention).
    #[arg(long, env = "NIXERY_PULL_RECORD_INTERVAL", default_value_t = 3600,
          value_parser = clap::value_parser!(u64).range(1..))]
    pull_record_interval: u64,
    #[command(flatten)]
    retention: RetentionArgs,
    /// A PEM ECDSA P-256 private key: every manifest and index is signed
    /// with it, as cosign signs (read once, at start). Unset: nothing is signed.
    #[arg(long, env = "NIXERY_SIGNING_KEY")]
    signing_key: Option<PathBuf>,
    /// The host signatures name images under (`registry.example.com`, the
    /// name clients pull from); needed with a signing key, never taken from
    /// a request.
    #[arg(long, env = "NIXERY_SIGNING_IDENTITY")]
    signing_identity: Option<String>,
    /// Who the images' provenance names as their builder (a URI).
    #[arg(long, env = "NIXERY_BUILDER_ID", default_value = "urn:nixery:builder")]
    builder_id: String,
    /// Log format.
    #[arg(long, env = "NIXERY_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

/// The S3 backend's settings.
#[derive(Debug, Args)]
struct S3Args {
    /// Bucket of the s3 storage backend.
    #[arg(long, env = "S3_BUCKET")]
    s3_bucket: Option<String>,
    /// Endpoint of an S3-compatible service (default: AWS).
    #[arg(long, env = "S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    aws_region: String,
    /// Access key (default: AWS_ACCESS_KEY_ID, else the instance's role).
    #[arg(long, env = "S3_ACCESS_KEY", hide_env_values = true)]
    s3_access_key: Option<String>,
    #[arg(long, env = "S3_SECRET_KEY", hide_env_values = true)]
    s3_secret_key: Option<String>,
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide = true, hide_env_values = true)]
    aws_access_key_id: Option<String>,
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide = true, hide_env_values = true)]
    aws_secret_access_key: Option<String>,
    #[arg(long, env = "AWS_SESSION_TOKEN", hide = true, hide_env_values = true)]
    aws_session_token: Option<String>,
    /// Path-style URLs (`endpoint/bucket/key`); default: on when S3_ENDPOINT is set.
    #[arg(long, env = "S3_USE_PATH_STYLE", action = clap::ArgAction::Set)]
    s3_use_path_style: Option<bool>,
}

/// The GCS backend's settings.
#[derive(Debug, Args)]
struct GcsArgs {
    /// Bucket of the gcs storage backend.
    #[arg(long, env = "GCS_BUCKET")]
    gcs_bucket: Option<String>,
    /// Service account key file (also used to sign blob URLs).
    #[arg(long, env = "GOOGLE_APPLICATION_CREDENTIALS")]
    google_application_credentials: Option<PathBuf>,
    /// Base URL of the GCS API, for an emulator (default: Google's).
    #[arg(long, env = "GCS_ENDPOINT")]
    gcs_endpoint: Option<String>,
}

/// Settings that are wrong together or point at nothing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("no package source: set one of NIXERY_PKGS_PATH, NIXERY_CHANNEL, NIXERY_PKGS_REPO or NIXERY_FLAKE")]
    NoSource,
    #[error("NIXERY_CHANNEL_URL {0:?} has no {{channel}} for the branch or commit")]
    ChannelUrl(String),
    #[error("{0} applies to NIXERY_PKGS_REPO only")]
    GitOnly(&'static str),
    #[error("NIXERY_META_PACKAGES: {0}")]
    MetaPackages(String),
    #[error("access control: {0}")]
    Auth(String),
    #[error("more than one package source is set ({0}): set only one")]
    SeveralSources(String),
    #[error("NIXERY_PKGS_PATH {0} does not exist")]
    MissingPkgsPath(PathBuf),
    #[error("the filesystem storage backend needs STORAGE_PATH (or --storage-path)")]
    NoStoragePath,
    #[error("the {backend} storage backend needs {setting}")]
    MissingSetting {
        backend: &'static str,
        setting: &'static str,
    },
    #[error("S3_ACCESS_KEY and S3_SECRET_KEY (or the AWS_ variables) must be set together")]
    HalfCredentials,
    #[error("NIXERY_SIGNING_KEY: {0}")]
    SigningKey(String),
    #[error(
        "NIXERY_SIGNING_KEY needs NIXERY_SIGNING_IDENTITY: the host clients pull from, which signatures name (registry.example.com)"
    )]
    NoSigningIdentity,
    #[error("NIXERY_SIGNING_IDENTITY {0:?} is not a host name, with a port or not (registry.example.com:5000)")]
    SigningIdentity(String),
    #[error("NIXERY_BLOB_REDIRECT needs a bucket that can presign URLs (s3 or gcs), not {0}")]
    RedirectWithoutBucket(&'static str),
}

/// A checked configuration for `serve`.
#[derive(Debug)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub source: PackageSource,
    pub storage: StorageConfig,
    /// `None`: one per core.
    pub max_builds: Option<usize>,
    pub nix_timeout: Duration,
    pub popularity_url: Option<String>,
    pub learn_popularity: bool,
    pub layering: Strategy,
    pub layer_budget: usize,
    /// Layers of Docker manifests, and of OCI ones unless `oci_layers` says otherwise.
    pub gzip: Compression,
    pub oci_layers: Compression,
    /// Never empty, no duplicates, in the order configured.
    pub architectures: Vec<Arch>,
    pub manifest_format: Format,
    pub meta_packages: MetaPackages,
    pub entrypoint: bool,
    pub shutdown_timeout: Duration,
    /// How often the images pulled since are written down.
    pub pull_record_interval: Duration,
    /// What garbage collections keep.
    pub retention: crate::gc::Options,
    /// How often `serve` collects garbage; `None`: never.
    pub gc_interval: Option<Duration>,
    /// How long a lease lasts unless renewed.
    pub lease_ttl: Duration,
    /// Who the provenance names as the builder.
    pub builder_id: String,
    /// The signing key, loaded; `None`: nothing is signed.
    pub signer: Option<std::sync::Arc<crate::signing::Signer>>,
    /// The host signatures name; set whenever `signer` is.
    pub signing_identity: Option<String>,
    pub max_packages: usize,
    pub builds_per_client: usize,
    pub client_build_rate: u32,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// `None`: derived from the open-file limit.
    pub max_connections: Option<usize>,
    /// Who may pull; `None`: anyone.
    pub auth: Option<std::sync::Arc<Auth>>,
    /// Whose forwarding headers name the client.
    pub trusted_proxies: TrustedProxies,
    /// What the web pages show.
    pub web: crate::web::Settings,
    /// What the settings hold that must never be shown.
    pub secrets: Secrets,
}

impl ServeArgs {
    /// Checks the settings against each other and the disk.
    pub fn check(self) -> Result<ServeConfig, ConfigError> {
        let source = self.source()?;
        let storage = self.storage()?;
        let auth = Auth::load(self.htpasswd.as_deref(), self.tokens.as_deref(), self.protect_web)
            .map_err(|e| ConfigError::Auth(e.to_string()))?
            .map(std::sync::Arc::new);
        let meta_packages = match &self.meta_packages {
            Some(path) => MetaPackages::load(path).map_err(|e| ConfigError::MetaPackages(e.to_string()))?,
            None => MetaPackages::default(),
        };
        let secrets = self.secrets();
        Ok(ServeConfig {
            secrets,
            listen: SocketAddr::new(self.listen_address, self.port),
            source,
            storage,
            max_builds: self.max_builds.map(usize::from),
            nix_timeout: Duration::from_secs(self.nix_timeout),
            popularity_url: self.popularity_url,
            learn_popularity: self.learn_popularity,
            layering: self.layering,
            layer_budget: self.layer_budget.into(),
            gzip: Compression::Gzip(self.gzip_level),
            oci_layers: match self.compression {
                LayerCompression::Gzip => Compression::Gzip(self.gzip_level),
                LayerCompression::Zstd => Compression::Zstd(self.zstd_level),
            },
            architectures: self.architectures.iter().fold(Vec::new(), |mut seen, arch| {
                if !seen.contains(arch) {
                    seen.push(*arch);
                }
                seen
            }),
            manifest_format: self.manifest_format,
            meta_packages,
            entrypoint: self.entrypoint,
            shutdown_timeout: Duration::from_secs(self.shutdown_timeout),
            pull_record_interval: Duration::from_secs(self.pull_record_interval),
            retention: crate::gc::Options {
                keep_pulled_within: self.retention.keep_pulled_within,
                max_bytes: self.retention.max_bytes,
                grace: self.retention.grace,
                dry_run: false,
                lease_ttl: Duration::from_secs(self.retention.lease_ttl),
            },
            gc_interval: self.retention.gc_interval,
            lease_ttl: Duration::from_secs(self.retention.lease_ttl),
            builder_id: self.builder_id.clone(),
            signer: match &self.signing_key {
                Some(path) => {
                    let signer =
                        crate::signing::Signer::load(path).map_err(|e| ConfigError::SigningKey(e.to_string()))?;
                    Some(std::sync::Arc::new(signer))
                }
                None => None,
            },
            signing_identity: signing_identity(self.signing_key.is_some(), self.signing_identity.as_deref())?,
            max_packages: self.max_packages.into(),
            builds_per_client: self.client_builds.into(),
            client_build_rate: self.client_build_rate,
            header_timeout: Duration::from_secs(self.header_timeout),
            idle_timeout: Duration::from_secs(self.idle_timeout),
            max_connections: self.max_connections.map(|n| n as usize),
            web: crate::web::Settings {
                show_logs: self.web_show_logs || auth.as_ref().is_some_and(|a| a.protect_web),
            },
            auth,
            trusted_proxies: self.trusted_proxies.clone(),
        })
    }

    /// The secrets of every URL setting, and the keys.
    fn secrets(&self) -> Secrets {
        let urls = [
            &self.pkgs_repo,
            &Some(self.channel_url.clone()),
            &self.flake,
            &self.popularity_url,
            &self.s3.s3_endpoint,
            &self.gcs.gcs_endpoint,
        ];
        let keys = [
            &self.s3.s3_secret_key,
            &self.s3.aws_secret_access_key,
            &self.s3.aws_session_token,
        ];
        Secrets::new(
            urls.into_iter().flatten().map(String::as_str),
            keys.into_iter().flatten().map(String::as_str),
        )
    }

    fn storage(&self) -> Result<StorageConfig, ConfigError> {
        let backend = match self.storage_backend {
            StorageBackend::Filesystem => {
                Backend::Filesystem(self.storage_path.clone().ok_or(ConfigError::NoStoragePath)?)
            }
            StorageBackend::S3 => Backend::S3(self.s3.check()?),
            StorageBackend::Gcs => Backend::Gcs(self.gcs.check()?),
            StorageBackend::Memory => Backend::Memory,
        };
        let bucket = matches!(backend, Backend::S3(_) | Backend::Gcs(_));
        let redirect = match (self.blob_redirect.unwrap_or(bucket), bucket) {
            (false, _) => None,
            (true, true) => Some(Duration::from_secs(self.redirect_ttl)),
            (true, false) => return Err(ConfigError::RedirectWithoutBucket(backend.name())),
        };
        let spool = self
            .spool_path
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("nixery-spool"));
        Ok(StorageConfig {
            backend,
            redirect,
            spool,
            blob_cache_bytes: self.blob_cache_mb.saturating_mul(1 << 20),
        })
    }

    fn source(&self) -> Result<PackageSource, ConfigError> {
        let set: Vec<&str> = [
            self.pkgs_path.as_ref().map(|_| "NIXERY_PKGS_PATH"),
            self.channel.as_ref().map(|_| "NIXERY_CHANNEL"),
            self.pkgs_repo.as_ref().map(|_| "NIXERY_PKGS_REPO"),
            self.flake.as_ref().map(|_| "NIXERY_FLAKE"),
        ]
        .into_iter()
        .flatten()
        .collect();
        if set.len() > 1 {
            return Err(ConfigError::SeveralSources(set.join(", ")));
        }
        if self.default_tag.is_some() && self.pkgs_repo.is_none() {
            return Err(ConfigError::GitOnly("NIXERY_DEFAULT_TAG"));
        }
        if let Some(path) = &self.pkgs_path {
            let path = std::path::absolute(path).map_err(|_| ConfigError::MissingPkgsPath(path.clone()))?;
            if !path.exists() {
                return Err(ConfigError::MissingPkgsPath(path));
            }
            return Ok(PackageSource::path(path));
        }
        if let Some(channel) = &self.channel {
            if !self.channel_url.contains("{channel}") {
                return Err(ConfigError::ChannelUrl(crate::redact::url(&self.channel_url)));
            }
            return Ok(PackageSource::Channel(Channel {
                channel: channel.clone(),
                url_template: self.channel_url.clone(),
                allowed_tags: self.channel_tags.clone(),
            }));
        }
        if let Some(repo) = &self.pkgs_repo {
            return Ok(PackageSource::git(repo.clone(), self.default_tag.clone()));
        }
        if let Some(flake) = &self.flake {
            return Ok(PackageSource::flake(flake.clone()));
        }
        Err(ConfigError::NoSource)
    }
}

impl S3Args {
    fn check(&self) -> Result<S3Config, ConfigError> {
        let bucket = self.s3_bucket.clone().ok_or(ConfigError::MissingSetting {
            backend: "s3",
            setting: "S3_BUCKET",
        })?;
        let key = self.s3_access_key.clone().or_else(|| self.aws_access_key_id.clone());
        let secret = self
            .s3_secret_key
            .clone()
            .or_else(|| self.aws_secret_access_key.clone());
        let credentials = match (key, secret) {
            (Some(key), Some(secret)) => Some((key, secret, self.aws_session_token.clone())),
            (None, None) => None,
            _ => return Err(ConfigError::HalfCredentials),
        };
        Ok(S3Config {
            bucket,
            endpoint: self.s3_endpoint.clone(),
            region: self.aws_region.clone(),
            credentials,
            path_style: self.s3_use_path_style.unwrap_or(self.s3_endpoint.is_some()),
        })
    }
}

impl GcsArgs {
    fn check(&self) -> Result<GcsConfig, ConfigError> {
        Ok(GcsConfig {
            bucket: self.gcs_bucket.clone().ok_or(ConfigError::MissingSetting {
                backend: "gcs",
                setting: "GCS_BUCKET",
            })?,
            credentials: self.google_application_credentials.clone(),
            endpoint: self.gcs_endpoint.clone(),
        })
    }
}

/// The signing identity, which a signing key needs: a host name or
/// address, with a port or not, as a client's image reference names it.
fn signing_identity(key: bool, identity: Option<&str>) -> Result<Option<String>, ConfigError> {
    let Some(identity) = identity.filter(|i| !i.is_empty()) else {
        return match key {
            true => Err(ConfigError::NoSigningIdentity),
            false => Ok(None),
        };
    };
    let (host, port) = match identity.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(':') => (host, Some(port)),
        _ => (identity, None),
    };
    let host_ok = !host.is_empty()
        && (host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
            || (host.starts_with('[') && host.ends_with(']')));
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok());
    match host_ok && port_ok {
        true => Ok(Some(identity.to_owned())),
        false => Err(ConfigError::SigningIdentity(identity.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses flags only (the environment is not read for flags given).
    fn args(flags: &[&str]) -> Result<ServeArgs, clap::Error> {
        let cli = Cli::try_parse_from(["nixery", "serve"].iter().chain(flags))?;
        match cli.command {
            Command::Serve(args) => Ok(*args),
            _ => unreachable!("serve was asked for"),
        }
    }

    #[test]
    fn a_signing_key_needs_an_identity_that_is_a_host() {
        assert!(matches!(
            signing_identity(true, None),
            Err(ConfigError::NoSigningIdentity)
        ));
        assert!(matches!(
            signing_identity(true, Some("")),
            Err(ConfigError::NoSigningIdentity)
        ));
        assert_eq!(signing_identity(false, None).unwrap(), None);
        for good in ["registry.example.com", "127.0.0.1:5000", "[::1]:8080", "localhost"] {
            assert_eq!(signing_identity(true, Some(good)).unwrap().as_deref(), Some(good));
        }
        for bad in ["a/b", "host:port", "a b", ":80", "x:99999", "évil"] {
            assert!(
                matches!(signing_identity(true, Some(bad)), Err(ConfigError::SigningIdentity(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn retention_reads_durations_and_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let pkgs = dir.path().display().to_string();
        let base = ["--pkgs-path", &pkgs, "--storage-path", "/tmp/x"];
        let config = args(&base).unwrap().check().unwrap();
        assert_eq!(config.retention.keep_pulled_within, Duration::from_secs(30 * 86400));
        assert_eq!(config.retention.grace, Duration::from_secs(3600));
        assert_eq!((config.retention.max_bytes, config.gc_interval), (None, None));
        let more = [
            &base[..],
            &["--max-bytes", "2GiB", "--gc-interval", "12h", "--grace", "10m"],
        ]
        .concat();
        let config = args(&more).unwrap().check().unwrap();
        assert_eq!(config.retention.max_bytes, Some(2 << 30));
        assert_eq!(config.gc_interval, Some(Duration::from_secs(12 * 3600)));
        assert_eq!(config.retention.grace, Duration::from_secs(600));
        assert_eq!(parse_size("1.5 GB"), Ok(1_500_000_000));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("5 apples").is_err());
        assert!(args(&[&base[..], &["--max-bytes", "lots"]].concat()).is_err());
    }

    #[test]
    fn a_path_source_with_filesystem_storage() {
        let dir = tempfile::tempdir().unwrap();
        let pkgs = dir.path().display().to_string();
        let config = args(&[
            "--pkgs-path",
            &pkgs,
            "--storage-path",
            "/tmp/x",
            "--port",
            "5000",
            "--listen-address",
            "127.0.0.1",
        ])
        .unwrap()
        .check()
        .unwrap();
        assert_eq!(config.listen, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(config.storage.backend, Backend::Filesystem("/tmp/x".into()));
        assert_eq!(config.storage.redirect, None, "a folder cannot presign");
        assert_eq!(config.nix_timeout, Duration::from_secs(60));
        assert_eq!(config.layer_budget, 94);
        assert!(matches!(config.source, PackageSource::Path { .. }));
        assert_eq!(config.architectures, [Arch::Amd64]);
        assert_eq!(config.layering, Strategy::Stable);
        assert_eq!(
            (config.gzip, config.oci_layers),
            (Compression::Gzip(6), Compression::Gzip(6))
        );
        assert_eq!(config.manifest_format, Format::Oci);
    }

    #[test]
    fn architectures_are_a_list() {
        let dir = tempfile::tempdir().unwrap();
        let pkgs = dir.path().display().to_string();
        let flags = ["--pkgs-path", &pkgs, "--storage-path", "/tmp/x", "--architectures"];
        let with = |list: &str| {
            let mut all = flags.to_vec();
            all.push(list);
            args(&all).map(|a| a.check().unwrap().architectures)
        };
        assert_eq!(with("arm64,amd64,arm64").unwrap(), [Arch::Arm64, Arch::Amd64]);
        let error = with("amd64,riscv").unwrap_err().to_string();
        assert!(error.contains("riscv"), "{error}");
    }

    #[test]
    fn sources_must_be_exactly_one() {
        let storage = ["--storage-path", "/tmp/x"];
        assert_eq!(args(&storage).unwrap().check().unwrap_err(), ConfigError::NoSource);
        let both = args(&[
            "--channel",
            "nixos-unstable",
            "--pkgs-repo",
            "https://x",
            "--storage-path",
            "/tmp/x",
        ]);
        assert_eq!(
            both.unwrap().check().unwrap_err(),
            ConfigError::SeveralSources("NIXERY_CHANNEL, NIXERY_PKGS_REPO".into())
        );
        let missing = args(&["--pkgs-path", "/does/not/exist", "--storage-path", "/tmp/x"]);
        assert!(matches!(missing.unwrap().check(), Err(ConfigError::MissingPkgsPath(_))));
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        for (flags, needle) in [
            (&["--port", "http"][..], "--port"),
            (&["--storage-backend", "azure"][..], "filesystem"),
            (&["--redirect-ttl", "0"][..], "--redirect-ttl"),
            (&["--nix-timeout", "0"][..], "--nix-timeout"),
            (&["--layer-budget", "500"][..], "--layer-budget"),
            (&["--gzip-level", "13"][..], "--gzip-level"),
            (&["--compression", "xz"][..], "zstd"),
            (&["--zstd-level", "20"][..], "--zstd-level"),
            (&["--manifest-format", "v1"][..], "oci or docker"),
            (&["--layering", "auto"][..], "size-cohort"),
            (&["--no-such-flag"][..], "--no-such-flag"),
        ] {
            let error = args(flags).unwrap_err().to_string();
            assert!(error.contains(needle), "{flags:?}: {error}");
        }
        let error = args(&["--channel", "c"]).unwrap().check().unwrap_err();
        assert_eq!(error, ConfigError::NoStoragePath);
    }

    #[test]
    fn buckets_need_their_settings_and_redirect_by_default() {
        let storage = |flags: &[&str]| {
            let mut all = vec!["--channel", "c"];
            all.extend_from_slice(flags);
            args(&all).unwrap().storage()
        };
        let missing = |backend, setting| ConfigError::MissingSetting { backend, setting };
        assert_eq!(storage(&["--storage-backend", "s3"]), Err(missing("s3", "S3_BUCKET")));
        assert_eq!(
            storage(&["--storage-backend", "gcs"]),
            Err(missing("gcs", "GCS_BUCKET"))
        );

        let s3 = [
            "--storage-backend",
            "s3",
            "--s3-bucket",
            "b",
            "--s3-endpoint",
            "http://127.0.0.1:1",
        ];
        let config = storage(&s3).unwrap();
        assert_eq!(config.redirect, Some(Duration::from_secs(300)));
        let Backend::S3(s3_config) = config.backend else {
            panic!("s3")
        };
        assert!(s3_config.path_style, "an endpoint of its own means path style");
        assert_eq!(s3_config.region, "us-east-1");

        let streamed = storage(&[&s3[..], &["--blob-redirect", "false"]].concat()).unwrap();
        assert_eq!(streamed.redirect, None);
        let half = storage(&[&s3[..], &["--s3-access-key", "k"]].concat());
        assert_eq!(half, Err(ConfigError::HalfCredentials));

        let memory = storage(&["--storage-backend", "memory", "--blob-redirect", "true"]);
        assert_eq!(memory, Err(ConfigError::RedirectWithoutBucket("memory")));
    }
}
