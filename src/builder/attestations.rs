//! An image's SBOMs (SPDX and CycloneDX) and provenance, made with its
//! build (`sbom`) and stored as OCI artifacts whose subject is each of its
//! manifests, then recorded as those manifests' referrers, which the
//! referrers API answers from. Pulls of a built image do none of this.

use bytes::Bytes;

use super::BuildError;
use super::pipeline::{BuildJob, Pipeline};
use crate::cache::ImageRecord;
use crate::digest::Digest;
use crate::nix::Realised;
use crate::oci::{self, Document, Referrer, Subject};
use crate::sbom::{self, Provenance};
use crate::source::{REVISION_LABEL, SOURCE_LABEL};

/// The artifact types, which are also their blobs' media types.
pub const SPDX: &str = "application/spdx+json";
pub const CYCLONEDX: &str = "application/vnd.cyclonedx+json";
pub const IN_TOTO: &str = "application/vnd.in-toto+json";

impl Pipeline {
    /// Stores the documents of the image `record` holds and records them as
    /// its manifests' referrers; every blob they added (for the check
    /// before the image record is written).
    pub async fn attest(
        &self,
        job: &BuildJob,
        realised: &Realised,
        record: &ImageRecord,
    ) -> Result<Vec<Digest>, BuildError> {
        let empty = Digest::of(oci::EMPTY_JSON);
        self.storage
            .put_blob(&empty, Bytes::from_static(oci::EMPTY_JSON))
            .await?;
        let name = job.request.to_string();
        let source = job.resolved.labels.get(SOURCE_LABEL).map_or("", String::as_str);
        let revision = job.resolved.labels.get(REVISION_LABEL).map(String::as_str);
        let manifests: Vec<&Digest> = record.manifests.iter().map(|(_, m)| &m.digest).collect();
        let provenance = Document::new(sbom::provenance(&Provenance {
            image: &name,
            manifests: &manifests,
            requested: &job.request.requested,
            metas: &job.request.metas,
            packages: &realised.packages,
            source,
            revision,
            settings: self.parameters(job),
            builder: &self.settings.builder_id,
        }));
        let mut blobs = vec![empty];
        for (_, manifest) in &record.manifests {
            let image = sbom::Image {
                name: &name,
                manifest: &manifest.digest,
                graph: &realised.graph,
                packages: &realised.packages,
                source,
                revision,
            };
            let documents = [
                (SPDX, Document::new(sbom::spdx(&image))),
                (CYCLONEDX, Document::new(sbom::cyclonedx(&image))),
                (IN_TOTO, provenance.clone()),
            ];
            let subject = Subject {
                media_type: &manifest.media_type,
                digest: &manifest.digest,
                size: manifest.size,
            };
            let mut referrers = Vec::new();
            for (artifact_type, document) in documents {
                let artifact = oci::artifact(artifact_type, &document, &subject)?;
                self.storage
                    .put_blob(&document.digest, Bytes::from(document.bytes))
                    .await?;
                let stored = self.store_document(artifact, oci::OCI_MANIFEST).await?;
                blobs.extend([document.digest, stored.digest.clone()]);
                referrers.push(Referrer {
                    digest: stored.digest,
                    size: stored.size,
                    artifact_type: artifact_type.to_owned(),
                });
            }
            self.caches.put_referrers(&manifest.digest, referrers).await?;
        }
        Ok(blobs)
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
