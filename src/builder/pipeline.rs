//! One architecture's image, built: Nix realises the packages, the layer
//! plan cuts their closure, each layer is packed (or found packed), then
//! the config and the manifests of every format that shares the layer set
//! are stored, their SBOMs and provenance (`attestations.rs`), and last the
//! records a pull trusts. Each stage's time goes
//! to the metrics and the build's log line from one [`Timings`].

use std::collections::HashMap;
use std::io::BufWriter;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::{FutureExt, StreamExt, TryStreamExt};

use super::{BuildError, Settings, keys};
use crate::activity::{self, Activity};
use crate::arch::Arch;
use crate::archive::{self, Compression, LayerDigests, RootFs};
use crate::cache::{Caches, ImageRecord, ManifestRecord, PlanLayer, PlanRecord};
use crate::digest::Digest;
use crate::gc::guard::{self, Published};
use crate::image::{self, ImageRequest};
use crate::layers::{self, Popularity};
use crate::learning::Learned;
use crate::leases::Leases;
use crate::meta::User;
use crate::metrics::{CacheKind, Metrics, Stage};
use crate::nix::{Nix, Realised};
use crate::oci;
use crate::source::Resolved;
use crate::storage::Storage;

/// Builds of one image before giving up on blobs that keep going missing
/// (a garbage collection deleting what the build reused).
const ATTEMPTS: usize = 3;

/// What one build made: the image's manifests and its layer plan.
#[derive(Clone, Debug)]
pub struct Built {
    pub record: ImageRecord,
    pub plan: Arc<PlanRecord>,
}

/// One architecture's image to build.
pub struct BuildJob {
    pub request: ImageRequest,
    pub arch: Arch,
    /// Of the layer set to pack.
    pub compression: Compression,
    pub resolved: Resolved,
    /// Where to record the result; `None` when the revision is not pinned.
    pub cache_key: Option<String>,
}

/// What builds images, and what it builds them with.
pub struct Pipeline {
    pub nix: Nix,
    pub storage: Storage,
    pub caches: Caches,
    /// Build leases, and the collector's lease that records wait for.
    pub leases: Leases,
    pub popularity: Popularity,
    /// Where built closures are counted, when popularity is learned.
    pub learned: Option<Arc<Learned>>,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    pub activity: Arc<Activity>,
}

/// How long each stage of one build took.
struct Timings {
    nix: Duration,
    layering: Duration,
    /// Packing layers, storage commits included.
    packing: Duration,
    /// Committing packed layers to storage.
    storage: Duration,
    /// Storing the config, manifests and records.
    manifest: Duration,
    /// What making and storing the SBOMs and provenance added to
    /// `manifest`: how much longer they took than the image's own writes,
    /// which they run beside.
    attest: Duration,
    total: Duration,
}

impl Timings {
    fn record(&self, metrics: &Metrics) {
        metrics.stage(Stage::Nix, self.nix);
        metrics.stage(Stage::Layering, self.layering);
        metrics.stage(Stage::Packing, self.packing.saturating_sub(self.storage));
        metrics.stage(Stage::Storage, self.storage);
    }
}

/// An image's config and manifests as stored, with the documents about them.
struct Stored {
    record: ImageRecord,
    config: Digest,
    /// The blobs of the SBOMs and provenance.
    attested: Vec<Digest>,
    /// How much longer their writes took than the image's own.
    attest: Duration,
}

/// An image's layers as planned, before packing.
struct Planned {
    realised: Realised,
    jobs: Vec<LayerJob>,
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
    fn key(&self, compression: Compression) -> String {
        match self {
            LayerJob::Store(paths) => keys::store_layer(paths, compression),
            LayerJob::Root(packages, user, _) => keys::root_layer(packages, user.as_ref(), compression),
        }
    }

    fn pack<W: std::io::Write>(self, out: W, compression: Compression) -> std::io::Result<(W, LayerDigests)> {
        match self {
            LayerJob::Store(paths) => archive::write_store_layer(&paths, out, compression),
            LayerJob::Root(_, _, rootfs) => rootfs.write(out, compression),
        }
    }
}

impl Pipeline {
    /// Builds `job`'s image and, when its revision is pinned, records it;
    /// built again when a blob it reused went missing before the record
    /// was written (a garbage collection deleted it).
    pub async fn build(&self, job: &BuildJob) -> Result<Built, BuildError> {
        let mut missing = None;
        for _ in 0..ATTEMPTS {
            match self.attempt(job).await? {
                Ok(built) => return Ok(built),
                Err(blob) => {
                    tracing::warn!(image = %job.request, %blob, "a blob went from storage during the build: building again");
                    missing = Some(blob);
                }
            }
        }
        Err(BuildError::Lost(missing.expect("at least one attempt")))
    }

    /// One build; `Err(blob)` if `blob` was missing when it was recorded.
    async fn attempt(&self, job: &BuildJob) -> Result<Result<Built, Digest>, BuildError> {
        let started = Instant::now();
        self.storage.ensure_layout().await?;
        let Planned { realised, jobs } = self.plan(job).await?;
        let nix_done = started + realised.took;
        let plan_done = Instant::now();

        let storing = AtomicU64::new(0);
        let (layers, newly_packed) = self.pack(&jobs, job.compression, &storing).await?;
        let packing_done = Instant::now();

        let Stored {
            record,
            config,
            attested,
            attest,
        } = self.store(job, &realised, &layers).await?;
        let plan = plan_record(&jobs, &realised, &layers, job.compression);
        if let Some(key) = &job.cache_key
            && let Published::Missing(blob) = self.remember(key, &record, &plan, &config, &attested).await?
        {
            return Ok(Err(blob));
        }
        let timings = Timings {
            nix: nix_done - started,
            layering: plan_done - nix_done,
            packing: packing_done - plan_done,
            storage: Duration::from_micros(storing.load(Ordering::Relaxed)),
            manifest: packing_done.elapsed(),
            attest,
            total: started.elapsed(),
        };
        timings.record(&self.metrics);
        self.activity.built(
            activity::Build {
                image: job.request.to_string(),
                arch: job.arch.oci_name(),
                when: SystemTime::now(),
                millis: timings.total.as_millis() as u64,
                layers: jobs.len(),
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
        log_built(job, &record, &realised, jobs.len(), newly_packed, &timings);
        Ok(Ok(Built {
            record,
            plan: Arc::new(plan),
        }))
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

    /// Stores the image's config (one for every format: the tar streams are
    /// the same whatever the compression), a manifest per format of the
    /// layer set, and the documents about them (`attestations.rs`), all
    /// written at once. Their record, the config's digest, the documents'
    /// blobs, and the time the documents added: how much longer they took
    /// than the image's own writes.
    async fn store(&self, job: &BuildJob, realised: &Realised, layers: &[LayerDigests]) -> Result<Stored, BuildError> {
        let runtime = oci::Runtime {
            bash: job.request.has_bash(),
            user: job.request.user.clone(),
            entrypoint: self.entrypoint(&job.request, realised),
            labels: job.resolved.labels.clone(),
        };
        let config = oci::image_config(job.arch, layers, &runtime)?;
        let mut documents = vec![config.clone()];
        let mut manifests = Vec::new();
        for format in self.settings.formats(job.compression) {
            let manifest = oci::manifest(format, &config, layers, job.compression)?;
            let record = ManifestRecord {
                digest: manifest.digest.clone(),
                media_type: format.media_type(false).to_owned(),
                size: manifest.bytes.len() as u64,
            };
            manifests.push((format, record));
            documents.push(manifest);
        }
        let record = ImageRecord { manifests };
        let own = async {
            let writes = (documents.iter()).map(|d| self.storage.put_blob(&d.digest, Bytes::copy_from_slice(&d.bytes)));
            futures::future::try_join_all(writes).await?;
            Ok::<_, BuildError>(Instant::now())
        };
        let about = async {
            let attested = self.attest(job, realised, &record, &config.digest).await?;
            Ok::<_, BuildError>((attested, Instant::now()))
        };
        let (own_done, (attested, about_done)) = tokio::try_join!(own, about)?;
        Ok(Stored {
            config: config.digest,
            record,
            attested,
            attest: about_done.saturating_duration_since(own_done),
        })
    }

    /// Puts a manifest or index at its digest; its record.
    pub async fn store_document(
        &self,
        document: oci::Document,
        media_type: &str,
    ) -> Result<ManifestRecord, BuildError> {
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

    /// Records a built image under `key`: its plan, the blobs it uses, and
    /// last its manifests, the record a pull trusts, once they and the
    /// `attested` documents are all known to be in storage (see `gc::guard`).
    async fn remember(
        &self,
        key: &str,
        record: &ImageRecord,
        plan: &PlanRecord,
        config: &Digest,
        attested: &[Digest],
    ) -> Result<Published, BuildError> {
        self.caches.put_plan(key, plan).await?;
        let mut blobs: Vec<&Digest> = plan
            .layers
            .iter()
            .map(|layer| &layer.packed.digest)
            .chain([config])
            .collect();
        self.caches.note_users(key, &blobs).await?;
        blobs.extend(record.manifests.iter().map(|(_, manifest)| &manifest.digest));
        blobs.extend(attested);
        let write = || self.caches.put_image(key, record.clone()).boxed();
        Ok(guard::publish(&self.storage, &self.leases, &blobs, write).await?)
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
}

/// The build's log line: what was built, its digests and each stage's time.
fn log_built(
    job: &BuildJob,
    record: &ImageRecord,
    realised: &Realised,
    layers: usize,
    newly_packed: usize,
    timings: &Timings,
) {
    let millis = |d: Duration| d.as_millis() as u64;
    tracing::info!(
        image = %job.request,
        arch = job.arch.oci_name(),
        compression = ?job.compression,
        digests = ?record.manifests.iter().map(|(_, m)| m.digest.as_str()).collect::<Vec<_>>(),
        nix_ms = millis(timings.nix),
        plan_ms = millis(timings.layering),
        packing_ms = millis(timings.packing),
        storage_ms = millis(timings.storage),
        manifest_ms = millis(timings.manifest),
        attest_us = timings.attest.as_micros() as u64,
        total_ms = millis(timings.total),
        store_paths = realised.graph.paths.len(),
        layers,
        newly_packed,
        "built image"
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_names_drop_the_hash() {
        assert_eq!(store_name("/nix/store/0123abcd-hello-2.12.1"), "hello-2.12.1");
        assert_eq!(store_name("plain"), "plain");
    }

    #[test]
    fn packing_time_in_the_metrics_leaves_out_storage() {
        let metrics = Metrics::default();
        let second = Duration::from_secs(1);
        Timings {
            nix: second,
            layering: second,
            packing: 3 * second,
            storage: 2 * second,
            manifest: second,
            attest: Duration::ZERO,
            total: 6 * second,
        }
        .record(&metrics);
        let text = metrics.encode();
        let sum = |stage: &str| {
            text.lines()
                .find(|l| l.contains("stage_seconds_sum") && l.contains(&format!("stage=\"{stage}\"")))
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        };
        assert_eq!(sum("packing"), Some(1.0), "{text}");
        assert_eq!(sum("storage"), Some(2.0), "{text}");
    }
}
