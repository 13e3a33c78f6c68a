//! The builder: what a pull, a page or `nixery build` asks for. A tag
//! becomes a revision of the package set, then per architecture an image
//! record from the caches, from a build in flight, or from a new build
//! (`pipeline.rs`), admitted through one flight per image, build slots and
//! per-client shares (`flight.rs`), and recorded under keys (`keys.rs`).
//! One layer set serves every manifest format whose layers are compressed
//! alike; a set is packed only when a client asks for a format that uses
//! it (with zstd for OCI, the Docker gzip set waits for a Docker client).
//! When storage has lost something the records name, the builder forgets
//! those records and makes it again, byte for byte. Tags answered from
//! records are remembered by the question as asked (`answers.rs`), so a
//! pull of a cached tag costs little more than reading its manifest.
//!
//! Storage is the truth, and a garbage collection may delete what memory
//! remembers: every answer from memory, HEAD or GET, first looks that its
//! manifest or index is still stored; a manifest asked for by digest and
//! not found forgets the answers and records in memory that name it
//! ([`Builder::document_missing`]); a collection forgets them all
//! ([`Builder::collected`]).

mod answers;
mod attestations;
mod flight;
mod keys;
mod pipeline;
mod replicas;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures::FutureExt;

use crate::activity::{self, Activity};
use crate::arch::Arch;
use crate::archive::{Compression, LayerDigests};
use crate::cache::{Caches, ImageRecord, ManifestRecord, PlanRecord};
use crate::client::Client;
use crate::digest::Digest;
use crate::fresh::Fresh;
use crate::gc::guard::{self, Published};
use crate::image::ImageRequest;
use crate::layers::{self, Popularity};
use crate::learning::Learned;
use crate::leases::Leases;
use crate::metrics::{CacheKind, Metrics};
use crate::negotiate::Choice;
use crate::nix::{Nix, NixError};
use crate::oci::{self, Format, IndexEntry, OciError};
use crate::pulls::{Mark, Pulls};
use crate::redact;
use crate::source::{PackageSource, Resolved, SourceError};
use crate::storage::{Storage, StorageError};
use answers::{Answer, Answers};
use flight::{Flights, Limits, Refused};

pub use answers::Question;
use pipeline::{BuildJob, Built, Pipeline};

/// What a caller wants of a manifest or index besides its record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// Its bytes (a GET).
    Bytes,
    /// Only that it is stored (a HEAD).
    Presence,
}

/// What a tag resolved to.
#[derive(Debug)]
pub struct Resolution {
    /// The manifest or index.
    pub record: ManifestRecord,
    /// The manifests an index names (none for a manifest).
    pub manifests: Vec<Digest>,
    /// Its bytes, for [`Want::Bytes`].
    pub bytes: Option<Bytes>,
}

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
    #[error(
        "this client started its {per_minute} new images of the last minute; its next may start in {retry_after_secs} s"
    )]
    TooManyNewImages { per_minute: u32, retry_after_secs: u64 },
    #[error("{0} is missing from storage")]
    Lost(Digest),
    #[error(transparent)]
    Oci(#[from] OciError),
}

impl From<Refused> for BuildError {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::ShareUsed(count) => BuildError::TooManyBuilds(count),
            Refused::RateUsed {
                per_minute,
                retry_after,
            } => BuildError::TooManyNewImages {
                per_minute,
                // Whole seconds, rounded up: a client that waits them gets its token.
                retry_after_secs: (retry_after.as_nanos().div_ceil(1_000_000_000) as u64).max(1),
            },
        }
    }
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
    /// Whether an image of one package runs its `meta.mainProgram`.
    pub entrypoint: bool,
    /// Most components an image name may have.
    pub max_packages: usize,
    /// Most new images one client may have building at once.
    pub builds_per_client: usize,
    /// New images one client may start per minute (as many at once after
    /// a minute without).
    pub client_build_rate: u32,
    /// How long a replica's lease on an image it builds lasts unless renewed.
    pub lease_ttl: Duration,
    /// Who the provenance names as the builder.
    pub builder_id: String,
    /// What signs the provenance (as a DSSE envelope); `None`: it is
    /// stored unsigned.
    pub signer: Option<Arc<crate::signing::Signer>>,
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
    pub(super) fn formats(&self, compression: Compression) -> Vec<Format> {
        [Format::Docker, Format::Oci]
            .into_iter()
            .filter(|&f| self.compression(f) == compression)
            .collect()
    }
}

pub type BuildResult<T> = Result<T, Arc<BuildError>>;

/// What the builder works with, besides its settings.
pub struct Parts {
    pub source: Arc<PackageSource>,
    pub nix: Nix,
    pub storage: Storage,
    pub popularity: Popularity,
    /// Where built closures are counted, when popularity is learned.
    pub learned: Option<Arc<Learned>>,
    pub metrics: Arc<Metrics>,
    /// Where builds and failures are noted for the pages.
    pub activity: Arc<Activity>,
}

/// Builds images and remembers what it built.
pub struct Builder {
    source: Arc<PackageSource>,
    pipeline: Arc<Pipeline>,
    flights: Flights<BuildResult<Built>>,
    readiness: Fresh<Readiness, std::convert::Infallible>,
    answers: Answers,
    /// When each image was last pulled or built.
    pulls: Arc<Pulls>,
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

/// An image's layer plan as built, for its web page.
#[derive(Debug)]
pub struct ImagePlan {
    pub arch: Arch,
    /// Whether the image's manifests are cached (its revision is pinned).
    pub cached: bool,
    pub layers: Vec<PlannedLayer>,
    /// Its manifest in the preferred format (or its only one), once built.
    pub manifest: Option<Digest>,
    /// The documents about that manifest: each artifact type and the blob
    /// of the document.
    pub documents: Vec<(String, Digest)>,
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
    pub fn new(parts: Parts, settings: Settings) -> Arc<Self> {
        let limits = Limits {
            per_client: settings.builds_per_client,
            per_minute: settings.client_build_rate,
        };
        let flights = Flights::new(settings.max_builds, limits);
        let pipeline = Pipeline {
            nix: parts.nix,
            caches: Caches::new(parts.storage.clone()),
            leases: Leases::new(parts.storage.clone()),
            storage: parts.storage.clone(),
            popularity: parts.popularity,
            learned: parts.learned,
            settings,
            metrics: parts.metrics,
            activity: parts.activity,
        };
        Arc::new(Builder {
            source: parts.source,
            pipeline: Arc::new(pipeline),
            flights,
            readiness: Fresh::new(READINESS_TTL, READINESS_STALE),
            answers: Answers::default(),
            pulls: Arc::new(Pulls::new(parts.storage)),
        })
    }

    /// Whether storage answers and Nix reaches its store: probed at most
    /// every few seconds, one probe at a time, however many ask.
    pub async fn readiness(&self) -> Readiness {
        let (storage, nix) = (self.pipeline.storage.clone(), self.pipeline.nix.clone());
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
        self.flights.idle()
    }

    /// The manifest format served to clients that accept both.
    pub fn preferred_format(&self) -> Format {
        self.pipeline.settings.preferred_format
    }

    /// The architectures a request's tag resolves to.
    pub fn architectures(&self, request: &ImageRequest) -> Vec<Arch> {
        match request.pinned_arch {
            Some(arch) => vec![arch],
            None => self.pipeline.settings.architectures.clone(),
        }
    }

    /// The manifest or index a tag resolves to for a client's choice (and
    /// the manifests an index names): from the caches, from builds in
    /// flight, or from new builds. `client` starts new builds only up to
    /// its share.
    async fn resolve(
        self: &Arc<Self>,
        request: &ImageRequest,
        choice: Choice,
        client: Option<Client>,
        question: Option<&Question>,
    ) -> BuildResult<(ManifestRecord, Vec<Digest>)> {
        self.admit(request).map_err(Arc::new)?;
        let resolved = self.revision(&request.tag).await.map_err(Arc::new)?;
        let architectures = self.architectures(request);
        let format = choice.format;
        let (record, manifests, marks) = if !choice.index {
            let (record, mark) = self.image(request, architectures[0], &resolved, format, client).await?;
            (record, vec![], vec![mark])
        } else {
            let manifests = futures::future::try_join_all(
                architectures
                    .iter()
                    .map(|&arch| self.image(request, arch, &resolved, format, client)),
            )
            .await?;
            let (manifests, marks): (Vec<_>, Vec<_>) = manifests.into_iter().unzip();
            let entries: Vec<IndexEntry> = architectures
                .iter()
                .zip(manifests)
                .map(|(&arch, manifest)| IndexEntry {
                    arch,
                    digest: manifest.digest,
                    size: manifest.size,
                })
                .collect();
            let manifests = entries.iter().map(|entry| entry.digest.clone()).collect();
            (
                self.index(choice.format, &entries).await.map_err(Arc::new)?,
                manifests,
                marks,
            )
        };
        if let (Some(question), Some(revision)) = (question, resolved.revision) {
            let answer = Answer {
                revision,
                record: record.clone(),
                manifests: manifests.clone(),
                marks,
            };
            self.answers.put(question.clone(), answer);
        }
        Ok((record, manifests))
    }

    /// The artifacts (SBOMs, provenance) that refer to a manifest, from
    /// their record: nothing is built for a manifest not built here.
    pub async fn referrers(&self, subject: &Digest) -> Result<Vec<oci::Referrer>, StorageError> {
        self.pipeline.caches.referrers(subject).await
    }

    /// When each image was last pulled or built.
    pub fn pulls(&self) -> &Arc<Pulls> {
        &self.pulls
    }

    /// What `question` was answered with, if it was, the tag still names
    /// the same revision and the document is still stored; with its bytes
    /// for [`Want::Bytes`]. A document storage lost (a collection deleted
    /// it) forgets what names it, and [`Builder::fetch`] makes it again.
    pub async fn recall(&self, question: &Question, tag: &str, want: Want) -> Option<Resolution> {
        let answer = self.answers.get(question)?;
        if self.source.revision(tag).await.ok()?? != answer.revision {
            return None;
        }
        let Some(bytes) = self.stored(&answer.record.digest, want).await.ok()? else {
            self.document_missing(&answer.record.digest).await;
            return None;
        };
        for mark in &answer.marks {
            mark.pulled();
            self.pipeline.metrics.cache(CacheKind::Manifest, true);
        }
        Some(Resolution {
            record: answer.record.clone(),
            manifests: answer.manifests.clone(),
            bytes,
        })
    }

    /// What a tag resolves to for a client's choice, from the caches, from
    /// builds in flight, or from new builds (`client` starts new builds
    /// only up to its share), having looked that the document is still
    /// stored; with its bytes for [`Want::Bytes`]. A manifest or index
    /// that storage lost (a collection deleted it, or someone removed it)
    /// is made again first: the records that name it are forgotten, so that
    /// the index is stored again, or the image built again (its layers
    /// checked and packed again).
    pub async fn fetch(
        self: &Arc<Self>,
        request: &ImageRequest,
        choice: Choice,
        client: Option<Client>,
        question: Option<&Question>,
        want: Want,
    ) -> BuildResult<Resolution> {
        let missing = match self.resolve_stored(request, choice, client, question, want).await? {
            Ok(found) => return Ok(found),
            Err(missing) => missing,
        };
        tracing::warn!(image = %request, %missing, "a manifest or index is missing from storage: making it again");
        self.forget(request, choice, &missing).await.map_err(Arc::new)?;
        let again = self.resolve_stored(request, choice, client, question, want).await?;
        again.map_err(|lost| Arc::new(BuildError::Lost(lost)))
    }

    /// What a tag resolves to, if its document is stored; else `Err` with
    /// the document's digest.
    async fn resolve_stored(
        self: &Arc<Self>,
        request: &ImageRequest,
        choice: Choice,
        client: Option<Client>,
        question: Option<&Question>,
        want: Want,
    ) -> BuildResult<Result<Resolution, Digest>> {
        let (record, manifests) = self.resolve(request, choice, client, question).await?;
        Ok(match self.stored(&record.digest, want).await? {
            Some(bytes) => Ok(Resolution {
                record,
                manifests,
                bytes,
            }),
            None => Err(record.digest),
        })
    }

    /// `None` when storage lost the document `digest`; else its bytes for
    /// [`Want::Bytes`], nothing for [`Want::Presence`].
    async fn stored(&self, digest: &Digest, want: Want) -> BuildResult<Option<Option<Bytes>>> {
        let storage = &self.pipeline.storage;
        let stored = match want {
            Want::Bytes => storage.read_small_blob(digest).await.map(|b| b.map(Some)),
            Want::Presence => storage.has_small_blob(digest).await.map(|there| there.then_some(None)),
        };
        stored.map_err(|e| Arc::new(e.into()))
    }

    /// Forgets the answers and records in memory that name `document`, a
    /// manifest or index asked for and not found in storage (a collection,
    /// perhaps another replica's, deleted it), so that the next pull that
    /// would have been answered with it makes it again. Cheap for a digest
    /// nothing names: two lookups.
    pub async fn document_missing(&self, document: &Digest) {
        let answered = self.answers.forget_naming(document);
        let recorded = self.pipeline.caches.forget_naming(document).await;
        if answered || recorded {
            tracing::warn!(%document, "a manifest or index is missing from storage: forgot what named it");
        }
    }

    /// Forgets every answer and record in memory, after a garbage
    /// collection (this replica's or another's): each is read again from
    /// storage when next asked for.
    pub fn collected(&self) {
        self.answers.clear();
        self.pipeline.caches.forget_all();
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
    fn job(key: &str, request: &ImageRequest, arch: Arch, resolved: Resolved, compression: Compression) -> BuildJob {
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
    ) -> BuildResult<(ManifestRecord, Arc<Mark>)> {
        let compression = self.pipeline.settings.compression(format);
        let key = self.image_key(request, arch, resolved.revision.as_deref(), compression);
        let mark = self.pulls.mark(&key);
        let cached = match resolved.revision.is_some() {
            true => self.pipeline.caches.image(&key).await.map_err(|e| Arc::new(e.into()))?,
            false => None,
        };
        let hit = cached.as_ref().and_then(|record| record.manifest(format));
        self.pipeline.metrics.cache(CacheKind::Manifest, hit.is_some());
        if let Some(manifest) = hit {
            tracing::debug!(image = %request, arch = arch.oci_name(), "image cache hit");
            mark.pulled();
            return Ok((manifest.clone(), mark));
        }
        let job = Self::job(&key, request, arch, resolved.clone(), compression);
        let built = self.join_build(&key, job, client).await?;
        let manifest = (built.record.manifest(format)).expect("a build makes every format of its layer set");
        Ok((manifest.clone(), mark))
    }

    /// Stores the index over `entries` once and returns its record.
    async fn index(&self, format: Format, entries: &[IndexEntry]) -> Result<ManifestRecord, BuildError> {
        let document = oci::index(format, entries)?;
        let key = keys::index(&document.digest);
        let caches = &self.pipeline.caches;
        if let Some(record) = caches.index(&key).await? {
            return Ok(record);
        }
        let record = self.pipeline.store_document(document, format.media_type(true)).await?;
        let mut blobs: Vec<&Digest> = entries.iter().map(|entry| &entry.digest).collect();
        blobs.push(&record.digest);
        let write = || caches.put_index(&key, record.clone()).boxed();
        match guard::publish(&self.pipeline.storage, &self.pipeline.leases, &blobs, write).await? {
            Published::Written => Ok(record),
            Published::Missing(blob) => Err(BuildError::Lost(blob)),
        }
    }

    /// Forgets the records `resolve` used for `request` and `choice` that
    /// name `missing`, a manifest or index storage lost, so that the next
    /// `resolve` makes it again, byte for byte: an index is stored again
    /// from its image manifests, an image whose manifest is lost is built
    /// again. Records that name other documents are kept.
    async fn forget(&self, request: &ImageRequest, choice: Choice, missing: &Digest) -> Result<(), BuildError> {
        let caches = &self.pipeline.caches;
        caches.forget_index(&keys::index(missing)).await?;
        let resolved = self.revision(&request.tag).await?;
        let compression = self.pipeline.settings.compression(choice.format);
        for arch in self.architectures(request) {
            let key = self.image_key(request, arch, resolved.revision.as_deref(), compression);
            let names_it = |record: &ImageRecord| record.manifests.iter().any(|(_, m)| m.digest == *missing);
            if caches.image(&key).await?.as_ref().is_some_and(names_it) {
                caches.forget_image(&key).await?;
            }
        }
        // After the records: an answer found meanwhile may name them.
        self.answers.clear();
        Ok(())
    }

    /// Forgets the image records that name `blob` (a layer or config)
    /// after a GET found it missing from storage, so that the next pull of
    /// each builds it again, byte for byte. Cheap for blobs nothing names:
    /// one listing of the records noted for it.
    pub async fn blob_missing(&self, blob: &Digest) -> Result<(), BuildError> {
        let caches = &self.pipeline.caches;
        let users = caches.users_of(blob).await?;
        for key in &users {
            caches.forget_image(key).await?;
        }
        if !users.is_empty() {
            // After the records: an answer found meanwhile may name them.
            // (One found after this is cleared at the next miss: the
            // notes of who uses the blob stay.)
            self.answers.clear();
            tracing::warn!(%blob, images = users.len(), "a blob is missing from storage: its images are built again at their next pull");
        }
        Ok(())
    }

    /// Refuses names with more components than allowed, before anything runs.
    fn admit(&self, request: &ImageRequest) -> Result<(), BuildError> {
        let count = request.name.split('/').count();
        let max = self.pipeline.settings.max_packages;
        match count > max {
            true => Err(BuildError::TooManyPackages { count, max }),
            false => Ok(()),
        }
    }

    /// Waits for the build of `key`, starting it if none is running (and
    /// `client` may start one).
    async fn join_build(&self, key: &str, job: BuildJob, client: Option<Client>) -> BuildResult<Built> {
        let (pipeline, pulls) = (Arc::clone(&self.pipeline), Arc::clone(&self.pulls));
        let start = move || async move {
            let result = pipeline.build_once_everywhere(&job).await.map_err(Arc::new);
            trim_heap();
            match (&result, &job.cache_key) {
                (Err(error), _) => note_failure(&pipeline.activity, &job, error),
                (Ok(_), Some(key)) => {
                    if let Err(error) = pulls.built(key).await {
                        tracing::warn!(%error, "could not record when an image was built");
                    }
                }
                (Ok(_), None) => {}
            }
            result
        };
        self.flights
            .join(key, client, start)
            .await
            .map_err(|used| Arc::new(used.into()))?
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
        let settings = &self.pipeline.settings;
        let compression = settings.compression(settings.preferred_format);
        let key = self.image_key(request, arch, resolved.revision.as_deref(), compression);
        let cacheable = resolved.revision.is_some();
        if cacheable && let Some(plan) = self.recorded_plan(&key).await.map_err(Arc::new)? {
            let mut view = self.plan_view(request, arch, true, &plan);
            if let Some(record) = self.pipeline.caches.image(&key).await.map_err(|e| Arc::new(e.into()))? {
                self.describe_documents(&mut view, &record).await.map_err(Arc::new)?;
            }
            return Ok(Some(view));
        }
        let Some(client) = client else { return Ok(None) };
        let job = Self::job(&key, request, arch, resolved, compression);
        let built = self.join_build(&key, job, Some(client)).await?;
        let mut view = self.plan_view(request, arch, cacheable, &built.plan);
        self.describe_documents(&mut view, &built.record)
            .await
            .map_err(Arc::new)?;
        Ok(Some(view))
    }

    /// Puts into `view` the image's manifest in the preferred format (or
    /// its only one) and the documents about it: each artifact type, and
    /// the document's blob.
    async fn describe_documents(&self, view: &mut ImagePlan, record: &ImageRecord) -> Result<(), BuildError> {
        let preferred = record.manifest(self.pipeline.settings.preferred_format);
        let Some(manifest) = preferred.or(record.manifests.first().map(|(_, m)| m)) else {
            return Ok(());
        };
        view.manifest = Some(manifest.digest.clone());
        for referrer in self.pipeline.caches.referrers(&manifest.digest).await? {
            let Some(bytes) = self.pipeline.storage.read_small_blob(&referrer.digest).await? else {
                continue;
            };
            if let Some(parts) = oci::artifact_parts(&bytes) {
                view.documents.push((referrer.artifact_type, parts.layer));
            }
        }
        Ok(())
    }

    /// The plan of the image recorded under `key`, when both its record
    /// and its plan are in storage. (An image record without a plan, lost or
    /// from a version that kept none, counts as not built: building the
    /// image again records both.)
    async fn recorded_plan(&self, key: &str) -> Result<Option<PlanRecord>, BuildError> {
        let caches = &self.pipeline.caches;
        match caches.image(key).await? {
            Some(_) => Ok(caches.plan(key).await?),
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
                shared_with: self.pipeline.activity.other_users(&layer.key, &image),
            })
            .collect();
        ImagePlan {
            arch,
            cached,
            layers,
            manifest: None,
            documents: vec![],
        }
    }

    /// The key of one architecture's image whose layers are compressed
    /// with `compression`.
    fn image_key(
        &self,
        request: &ImageRequest,
        arch: Arch,
        revision: Option<&str>,
        compression: Compression,
    ) -> String {
        let settings = &self.pipeline.settings;
        keys::image(&keys::ImageKey {
            arch: arch.oci_name(),
            revision,
            packages: &request.packages,
            user: request.user.as_ref(),
            entrypoint: settings.entrypoint,
            popularity: self.pipeline.popularity.id(),
            layering: settings.layering.name(),
            layer_budget: settings.layer_budget,
            compression,
            formats: settings.formats(compression),
            signer: settings.signer.as_deref().map(crate::signing::Signer::key_id),
        })
    }
}

/// Gives the heap's free pages back to the system. A build's packing
/// buffers would otherwise stay resident after it, under whatever the
/// registry serves next.
fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory of glibc's heap.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Notes a failed build for the log and the landing page.
fn note_failure(activity: &Activity, job: &BuildJob, error: &BuildError) {
    tracing::warn!(image = %job.request, arch = job.arch.oci_name(), %error, "image build failed");
    activity.failed(activity::Failure {
        image: job.request.to_string(),
        when: SystemTime::now(),
        message: redact::scrub(&error.to_string()).into_owned(),
        log: match error {
            BuildError::Nix(NixError::Eval { log, .. } | NixError::Build { log, .. }) => log.clone(),
            _ => vec![],
        },
    });
}

#[cfg(test)]
impl Builder {
    /// Records `record` as the image a build of `request` made for its
    /// first architecture and `format`'s layer set, under the key a pull
    /// looks up: lets tests of the HTTP side serve an image without Nix.
    pub(crate) async fn record_built(&self, request: &ImageRequest, format: Format, record: ImageRecord) {
        let resolved = self.revision(&request.tag).await.expect("the tag resolves");
        let arch = self.architectures(request)[0];
        let compression = self.pipeline.settings.compression(format);
        let key = self.image_key(request, arch, resolved.revision.as_deref(), compression);
        self.pipeline.caches.put_image(&key, record).await.expect("recorded");
    }
}
