//! An image's SBOMs (SPDX and CycloneDX) and provenance, made with its
//! build (`sbom`) and stored as OCI artifacts whose subject is each of its
//! manifests, then recorded as those manifests' referrers, which the
//! referrers API answers from. With a signing key, the provenance is
//! stored as a DSSE envelope signed by it. Pulls of a built image do none
//! of this.
//!
//! A manifest has one set of documents, which never changes once it has
//! them: those made by the first build that made it, naming the image as
//! that build's request spelled it. Another spelling of the same image
//! (`hello.out` for `hello`, `hello/shell` for `shell/hello`) builds the
//! same manifests and keeps their documents, writing none; the record of
//! a manifest's referrers is written only where there is none. Only a set
//! that cannot stand is replaced: one whose blobs are gone, or whose
//! provenance is not signed by the registry's key (a new key, or none).

use bytes::Bytes;

use super::BuildError;
use super::pipeline::{BuildJob, Pipeline};
use crate::cache::ImageRecord;
use crate::digest::Digest;
use crate::nix::Realised;
use crate::oci::{self, ArtifactBlob, Document, Referrer, Subject};
use crate::sbom::{self, Provenance};
use crate::signing;
use crate::source::{REVISION_LABEL, SOURCE_LABEL};

/// The artifact types, which are also their blobs' media types.
pub const SPDX: &str = "application/spdx+json";
pub const CYCLONEDX: &str = "application/vnd.cyclonedx+json";
pub const IN_TOTO: &str = "application/vnd.in-toto+json";

/// The file names the documents are saved under (their layers' titles).
const SPDX_FILE: &str = "sbom.spdx.json";
const CYCLONEDX_FILE: &str = "sbom.cdx.json";
const IN_TOTO_FILE: &str = "provenance.intoto.json";
const DSSE_FILE: &str = "provenance.dsse.json";

impl Pipeline {
    /// Stores the documents of the image `record` holds and records them as
    /// its manifests' referrers; every blob they added (for the check
    /// before the image record is written).
    pub async fn attest(
        &self,
        job: &BuildJob,
        realised: &Realised,
        record: &ImageRecord,
        config: &Digest,
    ) -> Result<Vec<Digest>, BuildError> {
        let mut kept = Vec::new();
        for (_, manifest) in &record.manifests {
            match self.kept_documents(&manifest.digest).await? {
                Some(blobs) => kept.extend(blobs),
                None => return self.make_documents(job, realised, record, config).await,
            }
        }
        Ok(kept)
    }

    /// The blobs of the documents `manifest` has, if it has a set that
    /// stands: every artifact and its blob stored, and the provenance
    /// signed as this registry signs it now.
    async fn kept_documents(&self, manifest: &Digest) -> Result<Option<Vec<Digest>>, BuildError> {
        let referrers = self.caches.referrers(manifest).await?;
        if referrers.is_empty() {
            return Ok(None);
        }
        let mut blobs = Vec::new();
        for referrer in &referrers {
            let Some(bytes) = self.storage.read_small_blob(&referrer.digest).await? else {
                return Ok(None);
            };
            let Some(parts) = oci::artifact_parts(&bytes) else {
                return Ok(None);
            };
            if referrer.artifact_type == IN_TOTO && !self.provenance_stands(&parts).await? {
                return Ok(None);
            }
            if self.storage.blob_size(&parts.layer).await?.is_none() {
                return Ok(None);
            }
            blobs.extend([referrer.digest.clone(), parts.config, parts.layer]);
        }
        Ok(Some(blobs))
    }

    /// Whether a provenance artifact's layer is what this registry writes
    /// now: a DSSE envelope its key signed, or without a key a statement.
    async fn provenance_stands(&self, parts: &oci::ArtifactParts) -> Result<bool, BuildError> {
        let Some(signer) = &self.settings.signer else {
            return Ok(parts.layer_type == IN_TOTO);
        };
        if parts.layer_type != signing::DSSE_ENVELOPE {
            return Ok(false);
        }
        let envelope = self.storage.read_small_blob(&parts.layer).await?;
        Ok(envelope.is_some_and(|envelope| signer.signed_envelope(&envelope)))
    }

    /// Makes and stores the documents of the image `record` holds, and
    /// records them as its manifests' referrers where none are recorded
    /// (or those recorded cannot stand); every blob they added.
    async fn make_documents(
        &self,
        job: &BuildJob,
        realised: &Realised,
        record: &ImageRecord,
        config: &Digest,
    ) -> Result<Vec<Digest>, BuildError> {
        let name = job.request.to_string();
        let source = job.resolved.labels.get(SOURCE_LABEL).map_or("", String::as_str);
        let revision = job.resolved.labels.get(REVISION_LABEL).map(String::as_str);
        let manifests: Vec<&Digest> = record.manifests.iter().map(|(_, m)| &m.digest).collect();
        let statement = sbom::provenance(&Provenance {
            image: &name,
            manifests: &manifests,
            requested: &job.request.requested,
            metas: &job.request.metas,
            packages: &realised.packages,
            source,
            revision,
            settings: self.parameters(job),
            builder: &self.settings.builder_id,
        });
        let (provenance_type, provenance_file, provenance) = match &self.settings.signer {
            Some(signer) => (
                signing::DSSE_ENVELOPE,
                DSSE_FILE,
                Document::new(signer.envelope(IN_TOTO, &statement)),
            ),
            None => (IN_TOTO, IN_TOTO_FILE, Document::new(statement)),
        };
        // Made first, then written all at once: the writes (each synced
        // to disk in a folder) are most of the cost. The SBOMs are the
        // image's, the same for each of its manifests.
        let image = sbom::Image {
            name: &name,
            id: config,
            graph: &realised.graph,
            packages: &realised.packages,
            source,
            revision,
        };
        // (artifact type, blob's media type, its file name, blob)
        let made = [
            (SPDX, SPDX, SPDX_FILE, Document::new(sbom::spdx(&image))),
            (
                CYCLONEDX,
                CYCLONEDX,
                CYCLONEDX_FILE,
                Document::new(sbom::cyclonedx(&image)),
            ),
            (IN_TOTO, provenance_type, provenance_file, provenance),
        ];
        let mut recorded = Vec::new();
        let mut artifacts = Vec::new();
        for (_, manifest) in &record.manifests {
            let subject = Subject {
                media_type: &manifest.media_type,
                digest: &manifest.digest,
                size: manifest.size,
            };
            let mut referrers = Vec::new();
            for (artifact_type, media_type, title, document) in &made {
                let blob = ArtifactBlob {
                    media_type,
                    title,
                    document,
                };
                let artifact = oci::artifact(artifact_type, &blob, &subject)?;
                referrers.push(Referrer {
                    digest: artifact.digest.clone(),
                    size: artifact.bytes.len() as u64,
                    artifact_type: (*artifact_type).to_owned(),
                });
                artifacts.push(artifact);
            }
            recorded.push((manifest.digest.clone(), referrers));
        }
        let empty = Document::new(oci::EMPTY_JSON.to_vec());
        let documents: Vec<Document> = (std::iter::once(empty))
            .chain(made.into_iter().map(|(_, _, _, document)| document))
            .chain(artifacts)
            .collect();
        let blobs: Vec<Digest> = documents.iter().map(|d| d.digest.clone()).collect();
        let writes = (documents.iter()).map(|d| self.storage.put_blob(&d.digest, Bytes::copy_from_slice(&d.bytes)));
        futures::future::try_join_all(writes).await?;
        let records = (recorded.iter()).map(|(subject, referrers)| self.record_referrers(subject, referrers));
        futures::future::try_join_all(records).await?;
        Ok(blobs)
    }

    /// Records `referrers` as `subject`'s where none are recorded, and in
    /// place of recorded ones that cannot stand.
    async fn record_referrers(&self, subject: &Digest, referrers: &[Referrer]) -> Result<(), BuildError> {
        match self.kept_documents(subject).await? {
            Some(_) => Ok(()),
            None if self.caches.referrers(subject).await?.is_empty() => {
                Ok(self.caches.put_referrers_if_absent(subject, referrers).await?)
            }
            None => Ok(self.caches.put_referrers(subject, referrers.to_vec()).await?),
        }
    }

    /// The settings that shaped `job`'s image, as its provenance records them.
    fn parameters(&self, job: &BuildJob) -> serde_json::Value {
        let settings = &self.settings;
        serde_json::json!({
            "architecture": job.arch.oci_name(),
            "layering": settings.layering.name(),
            "layerBudget": settings.layer_budget,
            "compression": job.compression,
            "formats": settings.formats(job.compression),
            "popularity": self.popularity.id(),
            "entrypoint": settings.entrypoint,
            "user": job.request.user,
        })
    }
}
