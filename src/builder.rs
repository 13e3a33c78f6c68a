//! The image pipeline: tag → revision → image cache → Nix → layer plan →
//! packed layers → config and manifests in storage, and an index over the
//! architectures when asked for. One layer set serves every manifest format
//! whose layers are compressed alike; a set is packed only when a client
//! asks for a format that uses it (with zstd for OCI, the Docker gzip set
//! waits for a Docker client). One build per image (callers
//! asking for an image that is being built wait for that build), a bounded
//! number of builds at once, and builds that finish even when the client
//! that asked has gone. Each stage's duration is logged.

use std::collections::HashMap;
use std::future::Future;
use std::io::BufWriter;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::{FutureExt, Shared};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::activity::{self, Activity};
use crate::arch::Arch;
use crate::archive::{self, Compression, LayerDigests, RootFs};
use crate::cache::{Caches, ImageRecord, ManifestRecord, PlanLayer, PlanRecord};
use crate::client::Client;
use crate::digest::Digest;
use crate::fresh::Fresh;
use crate::image::{self, ImageRequest};
use crate::layers::{self, Popularity};
use crate::learning::Learned;
use crate::meta::{MetaPackages, User};
use crate::metrics::{CacheKind, Metrics, Stage};
use crate::negotiate::Choice;
use crate::nix::{Nix, NixError, Realised};
use crate::oci::{self, Format, IndexEntry, OciError};
use crate::redact;
use crate::source::{PackageSource, Resolved, SourceError};
use crate::storage::{Storage, StorageError};

/// Bumped when anything that shapes store-path layers changes, so old
/// layer records miss.
const FORMAT: &str = "nixery-v2";
/// Bumped when anything else that shapes images (configs, the root
/// filesystem layer) changes, so old image records miss.
const IMAGE_FORMAT: &str = "nixery-image-v3";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Nix(#[from] NixError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("packing a layer failed: {0}")]
    Archive(std::io::Error),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("tag {0:?} names no revision of the package set")]
    UnknownTag(String),
    #[error("an image may name at most {max} packages; this one names {count}")]
    TooManyPackages { count: usize, max: usize },
    #[error("this client has {0} new images building already; try again when they are done")]
    TooManyBuilds(usize),
    #[error(transparent)]
    Oci(#[from] OciError),
}

/// What shapes the layers, besides the packages.
#[derive(Clone, Debug)]
pub struct Settings {
    pub layering: layers::Strategy,
    pub layer_budget: usize,
    /// Layers of Docker manifests (and of OCI ones unless `oci_layers` differs).
    pub gzip: Compression,
    /// Layers of OCI manifests: `gzip`, or zstd.
    pub oci_layers: Compression,
    /// Layers packed at once per build.
    pub parallel: usize,
    /// Builds that may run at once (others wait for a slot).
    pub max_builds: usize,
    /// What a tag resolves to without the `arm64` meta-package; the first is
    /// the one for clients that read no index. Never empty.
    pub architectures: Vec<Arch>,
    /// The manifest format served to clients that accept both.
    pub preferred_format: Format,
    /// What leading image name components stand for.
    pub meta_packages: MetaPackages,
    /// Whether an image of one package runs its `meta.mainProgram`.
    pub entrypoint: bool,
    /// Most components an image name may have.
    pub max_packages: usize,
    /// Most new images one client may have building at once.
    pub builds_per_client: usize,
}

impl Settings {
    /// How the layers of `format` manifests are compressed.
    fn compression(&self, format: Format) -> Compression {
        match format {
            Format::Docker => self.gzip,
            Format::Oci => self.oci_layers,
        }
    }

    /// The manifest formats whose layers are compressed with `compression`.
    fn formats(&self, compression: Compression) -> Vec<Format> {
        [Format::Docker, Format::Oci]
            .into_iter()
            .filter(|&f| self.compression(f) == compression)
            .collect()
    }
}

pub type BuildResult<T> = Result<T, Arc<BuildError>>;
type BuildFuture = Shared<Pin<Box<dyn Future<Output = BuildResult<Built>> + Send>>>;

/// What one build made: the image's manifests and its layer plan.
#[derive(Clone, Debug)]
struct Built {
    record: ImageRecord,
    plan: Arc<PlanRecord>,
}

/// Builds images and remembers what it built.
pub struct Builder {
    source: PackageSource,
    nix: Nix,
    storage: Storage,
    caches: Caches,
    popularity: Popularity,
    /// Where built closures are counted, when popularity is learned.
    learned: Option<Arc<Learned>>,
    settings: Settings,
    build_slots: Semaphore,
    in_flight: Mutex<HashMap<String, BuildFuture>>,
    metrics: Arc<Metrics>,
    activity: Activity,
    /// New builds in flight per client.
    client_builds: Arc<Mutex<HashMap<Client, usize>>>,
    readiness: Fresh<Readiness, std::convert::Infallible>,
}

/// What the readiness probe found: each part's problem, if it has one.
#[derive(Clone, Debug)]
pub struct Readiness {
    pub storage: Result<(), String>,
    pub nix: Result<(), String>,
}

/// How long a readiness answer is trusted, and how old one may be given out
/// while the next probe runs.
const READINESS_TTL: Duration = Duration::from_secs(5);
const READINESS_STALE: Duration = Duration::from_secs(30);

/// A client's share of builds in flight, given back when dropped.
struct ClientSlot {
    counts: Arc<Mutex<HashMap<Client, usize>>>,
    client: Client,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().expect("not poisoned");
        if let Some(count) = counts.get_mut(&self.client) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.client);
            }
        }
    }
}

/// An image's layers as planned, before packing.
struct Planned {
    realised: Realised,
    jobs: Vec<LayerJob>,
}

/// An image's layer plan as built, for its web page.
#[derive(Debug)]
pub struct ImagePlan {
    pub arch: Arch,
    /// Whether the image's manifests are cached (its revision is pinned).
    pub cached: bool,
    pub layers: Vec<PlannedLayer>,
}

/// One layer of an [`ImagePlan`].
#[derive(Debug)]
pub struct PlannedLayer {
    /// Store path names without their hash (`hello-2.12.1`), or a
    /// description of the root filesystem layer.
    pub contents: Vec<String>,
    /// Bytes of store contents (the sum of their NAR sizes).
    pub bytes: u64,
    /// The packed blob.
    pub packed: LayerDigests,
    /// Other images built here that hold the same layer.
    pub shared_with: Vec<String>,
}

impl Builder {
    pub fn new(
        source: PackageSource,
        nix: Nix,
        storage: Storage,
        popularity: Popularity,
        learned: Option<Arc<Learned>>,
        settings: Settings,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Builder {
            source,
            nix,
            caches: Caches::new(storage.clone()),
            storage,
            popularity,
            learned,
            build_slots: Semaphore::new(settings.max_builds),
            settings,
            in_flight: Mutex::new(HashMap::new()),
            metrics,
            activity: Activity::default(),
            client_builds: Arc::default(),
            readiness: Fresh::new(READINESS_TTL, READINESS_STALE),
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn activity(&self) -> &Activity {
        &self.activity
    }

    pub fn source(&self) -> &PackageSource {
        &self.source
    }

    /// Whether storage answers and Nix reaches its store: probed at most
    /// every few seconds, one probe at a time, however many ask.
    pub async fn readiness(&self) -> Readiness {
        let (storage, nix) = (self.storage.clone(), self.nix.clone());
        let probe = || async move {
            let (storage, nix) = tokio::join!(storage.ready(), nix.ready());
            Ok(Readiness {
                storage,
                nix: nix.map_err(|e| e.to_string()),
            })
        };
        match self.readiness.get(probe).await {
            Ok(readiness) => readiness,
            Err(never) => match never {},
        }
    }

    /// Whether no build is running.
    pub fn idle(&self) -> bool {
        self.in_flight.lock().expect("not poisoned").is_empty()
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The tags the package source can name.
    pub async fn tags(&self) -> Result<Vec<String>, SourceError> {
        self.source.tags().await
    }

    pub fn preferred_format(&self) -> Format {
        self.settings.preferred_format
    }

    pub fn meta_packages(&self) -> &MetaPackages {
        &self.settings.meta_packages
    }

    /// The architectures a request's tag resolves to.
    pub fn architectures(&self, request: &ImageRequest) -> Vec<Arch> {
        match request.pinned_arch {
            Some(arch) => vec![arch],
            None => self.settings.architectures.clone(),
        }
    }

    /// The manifest or index a tag resolves to for a client's choice: from
    /// the caches, from builds in flight, or from new builds.
    /// `client` starts new builds only up to its share.
    pub async fn resolve(
        self: &Arc<Self>,
        request: &ImageRequest,
        choice: Choice,
        client: Option<Client>,
    ) -> BuildResult<ManifestRecord> {
        self.admit(request).map_err(Arc::new)?;
        let resolved = self.revision(&request.tag).await.map_err(Arc::new)?;
        let architectures = self.architectures(request);
        let format = choice.format;
        if !choice.index {
            return self.image(request, architectures[0], &resolved, format, client).await;
        }
        let manifests = futures::future::try_join_all(
            architectures
                .iter()
                .map(|&arch| self.image(request, arch, &resolved, format, client)),
        )
        .await?;
        let entries: Vec<IndexEntry> = architectures
            .iter()
            .zip(manifests)
            .map(|(&arch, manifest)| IndexEntry {
                arch,
                digest: manifest.digest,
                size: manifest.size,
            })
            .collect();
        self.index(choice.format, &entries).await.map_err(Arc::new)
    }

    /// What `tag` names in the package source; an error when it names nothing.
    async fn revision(&self, tag: &str) -> Result<Resolved, BuildError> {
        self.source
            .resolve(tag)
            .await?
            .ok_or_else(|| BuildError::UnknownTag(tag.to_owned()))
    }

    /// The build of one architecture's layer set, whose key is `key`; its
    /// result is recorded under the key when the revision is pinned.
    fn job(
        &self,
        key: &str,
        request: &ImageRequest,
        arch: Arch,
        resolved: Resolved,
        compression: Compression,
    ) -> BuildJob {
        BuildJob {
            request: request.clone(),
            arch,
            compression,
            cache_key: resolved.revision.is_some().then(|| key.to_owned()),
            resolved,
        }
    }

    /// One architecture's manifest in `format`: cached, being built, or
    /// built now.
    async fn image(
        self: &Arc<Self>,
        request: &ImageRequest,
        arch: Arch,
        resolved: &Resolved,
        format: Format,
        client: Option<Client>,
    ) -> BuildResult<ManifestRecord> {
        let compression = self.settings.compression(format);
        let key = self.image_key(request, arch, resolved.revision.as_deref(), compression);
        let cacheable = resolved.revision.is_some();
        let cached = match cacheable {
            true => self.caches.image(&key).await.map_err(|e| Arc::new(e.into()))?,
            false => None,
        };
        let hit = cached.as_ref().and_then(|record| record.manifest(format));
        self.metrics.cache(CacheKind::Manifest, hit.is_some());
        if let Some(manifest) = hit {
            tracing::debug!(image = %request, arch = arch.oci_name(), "image cache hit");
            return Ok(manifest.clone());
        }
        let job = self.job(&key, request, arch, resolved.clone(), compression);
        let built = self.join_build(key, job, client).await?;
        Ok(built
            .record
            .manifest(format)
            .expect("a build makes every format of its layer set")
            .clone())
    }

    /// Stores the index over `entries` once and returns its record.
    async fn index(&self, format: Format, entries: &[IndexEntry]) -> Result<ManifestRecord, BuildError> {
        let document = oci::index(format, entries)?;
        let key = document.digest.hex().to_owned();
        if let Some(record) = self.caches.index(&key).await? {
            return Ok(record);
        }
        let record = self.store_document(document, format.media_type(true)).await?;
        self.caches.put_index(&key, record.clone()).await?;
        Ok(record)
    }

    /// Forgets the records `resolve` used for `request` and `choice` that
    /// name `missing`, a manifest or index storage lost, so that the next
    /// `resolve` makes it again, byte for byte: an index is stored again
    /// from its image manifests, an image whose manifest is lost is built
    /// again. Records that name other documents are kept.
    pub async fn forget_missing(
        &self,
        request: &ImageRequest,
        choice: Choice,
        missing: &Digest,
    ) -> Result<(), BuildError> {
        self.caches.forget_index(missing.hex()).await?;
        let resolved = self.revision(&request.tag).await?;
        let compression = self.settings.compression(choice.format);
        for arch in self.architectures(request) {
            let key = self.image_key(request, arch, resolved.revision.as_deref(), compression);
            let names_it = |record: &ImageRecord| record.manifests.iter().any(|(_, m)| m.digest == *missing);
            if self.caches.image(&key).await?.as_ref().is_some_and(names_it) {
                self.caches.forget_image(&key).await?;
            }
        }
        Ok(())
    }

    /// Forgets the image records that name `blob` (a layer or config)
    /// after a GET found it missing from storage, so that the next pull of
    /// each builds it again, byte for byte. Cheap for blobs nothing names:
    /// one listing of the records noted for it.
    pub async fn blob_missing(&self, blob: &Digest) -> Result<(), BuildError> {
        let users = self.caches.users_of(blob).await?;
        for key in &users {
            self.caches.forget_image(key).await?;
        }
        if !users.is_empty() {
            tracing::warn!(%blob, images = users.len(), "a blob is missing from storage: its images are built again at their next pull");
        }
        Ok(())
    }

    /// Refuses names with more components than allowed, before anything runs.
    fn admit(&self, request: &ImageRequest) -> Result<(), BuildError> {
        let count = request.name.split('/').count();
        match count > self.settings.max_packages {
            true => Err(BuildError::TooManyPackages {
                count,
                max: self.settings.max_packages,
            }),
            false => Ok(()),
        }
    }

    /// A share of builds for `client`, unless it has all of its own.
    fn client_slot(&self, client: Option<Client>) -> Result<Option<ClientSlot>, BuildError> {
        let Some(client) = client else { return Ok(None) };
        let mut counts = self.client_builds.lock().expect("not poisoned");
        let count = counts.entry(client).or_insert(0);
        if *count >= self.settings.builds_per_client {
            return Err(BuildError::TooManyBuilds(*count));
        }
        *count += 1;
        Ok(Some(ClientSlot {
            counts: Arc::clone(&self.client_builds),
            client,
        }))
    }

    /// Waits for the build of `key`, starting it if none is running (and
    /// `client` may start one).
    async fn join_build(self: &Arc<Self>, key: String, job: BuildJob, client: Option<Client>) -> BuildResult<Built> {
        let build = {
            let mut in_flight = self.in_flight.lock().expect("not poisoned");
            match in_flight.get(&key) {
                Some(build) => build.clone(),
                None => {
                    let slot = self.client_slot(client).map_err(Arc::new)?;
                    let this = Arc::clone(self);
                    let building = key.clone();
                    let build = async move {
                        let _slot = slot;
                        this.metrics.build_started();
                        let result = this.build(&job).await.map_err(Arc::new);
                        this.metrics.build_ended(result.is_ok());
                        if let Err(error) = &result {
                            tracing::warn!(image = %job.request, arch = job.arch.oci_name(), %error, "image build failed");
                            this.activity.failed(activity::Failure {
                                image: job.request.to_string(),
                                when: std::time::SystemTime::now(),
                                message: redact::scrub(&error.to_string()).into_owned(),
                                log: match error.as_ref() {
                                    BuildError::Nix(NixError::Eval { log, .. } | NixError::Build { log, .. }) => {
                                        log.clone()
                                    }
                                    _ => vec![],
                                },
                            });
                        }
                        this.in_flight.lock().expect("not poisoned").remove(&building);
                        result
                    };
                    // The build's log lines carry the span (request id) of the request that started it.
                    let task = tokio::spawn(tracing::Instrument::in_current_span(build));
                    let joined: Pin<Box<dyn Future<Output = BuildResult<Built>> + Send>> =
                        Box::pin(task.map(|joined| joined.expect("build tasks do not panic")));
                    let shared = joined.shared();
                    in_flight.insert(key, shared.clone());
                    shared
                }
            }
        };
        build.await
    }

    /// Nix, then the layer plan and the root filesystem layer.
    async fn plan(&self, job: &BuildJob) -> Result<Planned, BuildError> {
        let request = &job.request;
        let realised = self
            .nix
            .realise(&job.resolved.nix, job.arch.nix_system(), &request.packages)
            .await?;

        let base: Vec<String> = request
            .packages
            .iter()
            .zip(&realised.outputs)
            .filter(|(package, _)| image::ALWAYS.contains(&package.as_str()))
            .map(|(_, output)| output.clone())
            .collect();
        let inputs = layers::Inputs {
            popularity: &self.popularity,
            budget: self.settings.layer_budget,
            base: &base,
        };
        let plan = layers::plan(self.settings.layering, &realised.graph, inputs);
        let outputs = realised.outputs.clone();
        let user = request.user.clone();
        let rootfs = tokio::task::spawn_blocking(move || RootFs::plan(&outputs, user.as_ref()))
            .await
            .expect("planning does not panic")
            .map_err(BuildError::Archive)?;
        let mut jobs: Vec<LayerJob> = plan.into_iter().map(|layer| LayerJob::Store(layer.paths)).collect();
        jobs.push(LayerJob::Root(realised.outputs.clone(), request.user.clone(), rootfs));
        Ok(Planned { realised, jobs })
    }

    async fn build(&self, job: &BuildJob) -> Result<Built, BuildError> {
        let _slot = self.build_slots.acquire().await.expect("never closed");
        let started = Instant::now();
        let request = &job.request;
        self.storage.ensure_layout().await?;
        let Planned { realised, jobs } = self.plan(job).await?;
        let nix_done = started + realised.took;
        let layer_count = jobs.len();
        let plan_done = Instant::now();

        let storing = AtomicU64::new(0);
        let (layers, newly_packed) = self.pack(&jobs, job.compression, &storing).await?;
        let packing_done = Instant::now();

        // The tar streams are the same whatever the compression: one config.
        let runtime = oci::Runtime {
            bash: request.has_bash(),
            user: request.user.clone(),
            entrypoint: self.entrypoint(request, &realised),
            labels: job.resolved.labels.clone(),
        };
        let config = oci::image_config(job.arch, &layers, &runtime)?;
        self.storage
            .put_blob(&config.digest, Bytes::from(config.bytes.clone()))
            .await?;
        let mut manifests = Vec::new();
        for format in self.settings.formats(job.compression) {
            let manifest = self.put_manifest(format, &config, &layers, job.compression).await?;
            manifests.push((format, manifest));
        }
        let record = ImageRecord { manifests };
        let plan = plan_record(&jobs, &realised, &layers, job.compression);
        if let Some(key) = &job.cache_key {
            self.remember(key, &record, &plan, &config.digest).await?;
        }
        let storage_time = std::time::Duration::from_micros(storing.load(Ordering::Relaxed));
        self.metrics.stage(Stage::Nix, nix_done - started);
        self.metrics.stage(Stage::Layering, plan_done - nix_done);
        self.metrics
            .stage(Stage::Packing, (packing_done - plan_done).saturating_sub(storage_time));
        self.metrics.stage(Stage::Storage, storage_time);
        self.activity.built(
            activity::Build {
                image: request.to_string(),
                arch: job.arch.oci_name(),
                when: std::time::SystemTime::now(),
                millis: started.elapsed().as_millis() as u64,
                layers: layer_count,
                newly_packed,
                digest: record.manifests[0].1.digest.to_string(),
            },
            &jobs.iter().map(|j| j.key(job.compression)).collect::<Vec<_>>(),
        );
        if let Some(learned) = &self.learned
            && let Err(error) = learned.record(&realised.graph).await
        {
            tracing::warn!(%error, "could not store learned popularity");
        }

        tracing::info!(
            image = %request,
            arch = job.arch.oci_name(),
            compression = ?job.compression,
            digests = ?record.manifests.iter().map(|(_, m)| m.digest.as_str()).collect::<Vec<_>>(),
            nix_ms = (nix_done - started).as_millis() as u64,
            plan_ms = (plan_done - nix_done).as_millis() as u64,
            packing_ms = (packing_done - plan_done).as_millis() as u64,
            storage_ms = storing.load(Ordering::Relaxed) / 1000,
            manifest_ms = packing_done.elapsed().as_millis() as u64,
            total_ms = started.elapsed().as_millis() as u64,
            store_paths = realised.graph.paths.len(),
            layers = layer_count,
            newly_packed,
            "built image"
        );
        Ok(Built {
            record,
            plan: Arc::new(plan),
        })
    }

    /// Records a built image under `key`: its plan, the blobs it uses, and
    /// last its manifests, the record a pull trusts.
    async fn remember(
        &self,
        key: &str,
        record: &ImageRecord,
        plan: &PlanRecord,
        config: &Digest,
    ) -> Result<(), BuildError> {
        self.caches.put_plan(key, plan).await?;
        let blobs: Vec<&Digest> = plan
            .layers
            .iter()
            .map(|layer| &layer.packed.digest)
            .chain([config])
            .collect();
        self.caches.note_users(key, &blobs).await?;
        self.caches.put_image(key, record.clone()).await?;
        Ok(())
    }

    /// Every layer of `jobs` with `compression`, packed at most
    /// `parallel` at a time; and how many were packed now (not cached).
    /// Adds the microseconds spent committing blobs to storage to `storing`.
    async fn pack(
        &self,
        jobs: &[LayerJob],
        compression: Compression,
        storing: &AtomicU64,
    ) -> Result<(Vec<LayerDigests>, usize), BuildError> {
        let packed: Vec<(LayerDigests, bool)> = futures::stream::iter(jobs.iter().cloned())
            .map(|job| self.layer(job, compression, storing))
            .buffered(self.settings.parallel)
            .try_collect()
            .await?;
        let new = packed.iter().filter(|(_, new)| *new).count();
        Ok((packed.into_iter().map(|(digests, _)| digests).collect(), new))
    }

    async fn put_manifest(
        &self,
        format: Format,
        config: &oci::Document,
        layers: &[LayerDigests],
        compression: Compression,
    ) -> Result<ManifestRecord, BuildError> {
        let manifest = oci::manifest(format, config, layers, compression)?;
        self.store_document(manifest, format.media_type(false)).await
    }

    /// Puts a manifest or index at its digest; its record.
    async fn store_document(&self, document: oci::Document, media_type: &str) -> Result<ManifestRecord, BuildError> {
        let record = ManifestRecord {
            digest: document.digest.clone(),
            media_type: media_type.to_owned(),
            size: document.bytes.len() as u64,
        };
        self.storage
            .put_blob(&document.digest, Bytes::from(document.bytes))
            .await?;
        Ok(record)
    }

    /// A layer's digests, from the layer cache or packed now; `true` if packed now.
    async fn layer(
        &self,
        job: LayerJob,
        compression: Compression,
        storing: &AtomicU64,
    ) -> Result<(LayerDigests, bool), BuildError> {
        let key = job.key(compression);
        if let Some(known) = self.packed(&key).await? {
            self.metrics.cache(CacheKind::Layer, true);
            return Ok((known, false));
        }
        self.metrics.cache(CacheKind::Layer, false);
        let staged = self.storage.stage().map_err(BuildError::Archive)?;
        let (staged, digests) = tokio::task::spawn_blocking(move || {
            let out = BufWriter::new(staged);
            let (out, digests) = job.pack(out, compression)?;
            Ok::<_, std::io::Error>((out.into_inner().map_err(|e| e.into_error())?, digests))
        })
        .await
        .expect("packing does not panic")
        .map_err(BuildError::Archive)?;
        let committing = Instant::now();
        self.storage.commit(staged, &digests.digest).await?;
        self.caches.put_layer(&key, digests.clone()).await?;
        storing.fetch_add(committing.elapsed().as_micros() as u64, Ordering::Relaxed);
        Ok((digests, true))
    }

    /// A layer's record, when its blob is in storage.
    async fn packed(&self, key: &str) -> Result<Option<LayerDigests>, BuildError> {
        Ok(match self.caches.layer(key).await? {
            Some(known) if self.storage.blob_size(&known.digest).await? == Some(known.size) => Some(known),
            _ => None,
        })
    }

    /// An image's layer plan as built, for its web page: the first
    /// architecture, the preferred format's layer set. With a `client`, an
    /// image not built yet is built as its pull would build it, in the same
    /// flight, within the same build slots and the client's share. Without
    /// one, only what is built already is shown and nothing runs: `None`
    /// when the image is not built (or its tag not known) yet.
    pub async fn describe(
        self: &Arc<Self>,
        request: &ImageRequest,
        client: Option<Client>,
    ) -> BuildResult<Option<ImagePlan>> {
        self.admit(request).map_err(Arc::new)?;
        let resolved = match client {
            Some(_) => self.revision(&request.tag).await.map_err(Arc::new)?,
            None => match self.source.resolve_known(&request.tag).await {
                Some(resolved) => resolved,
                None => return Ok(None),
            },
        };
        let arch = self.architectures(request)[0];
        let compression = self.settings.compression(self.settings.preferred_format);
        let key = self.image_key(request, arch, resolved.revision.as_deref(), compression);
        let cacheable = resolved.revision.is_some();
        if cacheable && let Some(plan) = self.recorded_plan(&key).await.map_err(Arc::new)? {
            return Ok(Some(self.plan_view(request, arch, true, &plan)));
        }
        let Some(client) = client else { return Ok(None) };
        let job = self.job(&key, request, arch, resolved, compression);
        let built = self.join_build(key, job, Some(client)).await?;
        Ok(Some(self.plan_view(request, arch, cacheable, &built.plan)))
    }

    /// The plan of the image recorded under `key`, when both its record
    /// and its plan are in storage. (An image record without a plan, lost or
    /// from a version that kept none, counts as not built: building the
    /// image again records both.)
    async fn recorded_plan(&self, key: &str) -> Result<Option<PlanRecord>, BuildError> {
        match self.caches.image(key).await? {
            Some(_) => Ok(self.caches.plan(key).await?),
            None => Ok(None),
        }
    }

    /// A recorded plan as its page shows it, with the other images here
    /// that share each layer.
    fn plan_view(&self, request: &ImageRequest, arch: Arch, cached: bool, plan: &PlanRecord) -> ImagePlan {
        let image = request.to_string();
        let layers = plan
            .layers
            .iter()
            .map(|layer| PlannedLayer {
                contents: layer.contents.clone(),
                bytes: layer.bytes,
                packed: layer.packed.clone(),
                shared_with: self.activity.other_users(&layer.key, &image),
            })
            .collect();
        ImagePlan { arch, cached, layers }
    }

    /// The program an image of one package runs: that package's
    /// `meta.mainProgram`, when the setting allows it and the file exists.
    fn entrypoint(&self, request: &ImageRequest, realised: &Realised) -> Option<String> {
        let sole = request.sole_package().filter(|_| self.settings.entrypoint)?;
        let index = request.packages.iter().position(|p| p == sole)?;
        let program = realised.main_programs[index].as_ref()?;
        let path = format!("{}/bin/{program}", realised.outputs[index]);
        std::path::Path::new(&path).exists().then_some(path)
    }

    /// Everything that decides the manifests of one architecture's image
    /// whose layers are compressed with `compression`.
    fn image_key(
        &self,
        request: &ImageRequest,
        arch: Arch,
        revision: Option<&str>,
        compression: Compression,
    ) -> String {
        #[derive(Serialize)]
        struct Key<'a> {
            format: &'a str,
            arch: &'a str,
            revision: Option<&'a str>,
            packages: &'a [String],
            user: Option<&'a User>,
            entrypoint: bool,
            popularity: &'a str,
            layering: &'a str,
            layer_budget: usize,
            compression: Compression,
            formats: Vec<Format>,
        }
        let key = Key {
            format: IMAGE_FORMAT,
            arch: arch.oci_name(),
            revision,
            packages: &request.packages,
            user: request.user.as_ref(),
            entrypoint: self.settings.entrypoint,
            popularity: self.popularity.id(),
            layering: self.settings.layering.name(),
            layer_budget: self.settings.layer_budget,
            compression,
            formats: self.settings.formats(compression),
        };
        Digest::of(&serde_json::to_vec(&key).expect("keys serialise"))
            .hex()
            .to_owned()
    }
}

/// What each of an image's layers holds, and where it was packed.
fn plan_record(
    jobs: &[LayerJob],
    realised: &Realised,
    packed: &[LayerDigests],
    compression: Compression,
) -> PlanRecord {
    let sizes: HashMap<&str, u64> = realised
        .graph
        .paths
        .iter()
        .map(|p| (p.path.as_str(), p.nar_size))
        .collect();
    let layers = jobs
        .iter()
        .zip(packed)
        .map(|(job, packed)| {
            let (contents, bytes) = match job {
                LayerJob::Store(paths) => (
                    paths.iter().map(|p| store_name(p)).collect(),
                    paths.iter().map(|p| sizes.get(p.as_str()).copied().unwrap_or(0)).sum(),
                ),
                LayerJob::Root(..) => (vec!["root filesystem: links, /etc, /tmp".to_owned()], 0),
            };
            PlanLayer {
                contents,
                bytes,
                key: job.key(compression),
                packed: packed.clone(),
            }
        })
        .collect();
    PlanRecord { layers }
}

/// `hello-2.12.1` for `/nix/store/<hash>-hello-2.12.1`.
fn store_name(path: &str) -> String {
    let name = path.rsplit('/').next().unwrap_or(path);
    name.split_once('-').map_or(name, |(_, rest)| rest).to_owned()
}

/// One architecture's image to build.
struct BuildJob {
    request: ImageRequest,
    arch: Arch,
    /// Of the layer set to pack.
    compression: Compression,
    resolved: Resolved,
    /// Where to record the result; `None` when the revision is not pinned.
    cache_key: Option<String>,
}

/// One layer to pack.
#[derive(Clone)]
enum LayerJob {
    /// Whole store paths.
    Store(Vec<String>),
    /// The root filesystem of these packages, with this user.
    Root(Vec<String>, Option<User>, RootFs),
}

impl LayerJob {
    /// What identifies the layer's bytes: store paths never change contents.
    fn key(&self, compression: Compression) -> String {
        let key = match self {
            LayerJob::Store(paths) => serde_json::json!([FORMAT, "store", compression, paths]),
            LayerJob::Root(packages, user, _) => {
                serde_json::json!([IMAGE_FORMAT, "rootfs", compression, packages, user])
            }
        };
        Digest::of(key.to_string().as_bytes()).hex().to_owned()
    }

    fn pack<W: std::io::Write>(self, out: W, compression: Compression) -> std::io::Result<(W, LayerDigests)> {
        match self {
            LayerJob::Store(paths) => archive::write_store_layer(&paths, out, compression),
            LayerJob::Root(_, _, rootfs) => rootfs.write(out, compression),
        }
    }
}
