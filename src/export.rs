//! Writing a built image out of storage, for `nixery build`: as an OCI image
//! layout folder (what `skopeo copy oci:DIR:TAG` reads), or as a
//! docker-archive tarball (what `docker load` reads), streaming each blob.

use std::io::Write;
use std::path::{Path, PathBuf};

use futures::TryStreamExt;
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::cache::ManifestRecord;
use crate::digest::Digest;
use crate::oci;
use crate::storage::{Storage, StorageError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// An OCI image layout folder.
    Oci,
    /// A tarball for `docker load`.
    DockerArchive,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("writing {path} failed: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("blob {0} is missing from storage")]
    Missing(Digest),
    #[error("manifest {0} cannot be read: {1}")]
    Manifest(Digest, String),
}

/// The blobs an image consists of, manifest first.
struct Blobs {
    manifest: Digest,
    config: Digest,
    layers: Vec<(Digest, u64)>,
}

impl Blobs {
    fn all(&self) -> impl Iterator<Item = &Digest> {
        [&self.manifest, &self.config]
            .into_iter()
            .chain(self.layers.iter().map(|(d, _)| d))
    }

    /// Bytes of layers: what takes time to copy.
    fn layer_bytes(&self) -> u64 {
        self.layers.iter().map(|(_, size)| size).sum()
    }
}

/// Writes the image whose manifest is `manifest` to `output`, naming it
/// `reference` (`name:tag`); `copied` hears of every chunk of bytes written.
/// Returns the bytes of layers written.
pub async fn export(
    storage: &Storage,
    manifest: &ManifestRecord,
    reference: &str,
    format: OutputFormat,
    output: &Path,
    copied: &(dyn Fn(u64) + Sync),
) -> Result<u64, ExportError> {
    let blobs = blobs(storage, &manifest.digest).await?;
    let layer_bytes = blobs.layer_bytes();
    match format {
        OutputFormat::Oci => write_layout(storage, manifest, &blobs, reference, output, copied).await?,
        OutputFormat::DockerArchive => {
            let staging = tempfile::tempdir().map_err(write_error(&std::env::temp_dir()))?;
            write_layout(storage, manifest, &blobs, reference, staging.path(), copied).await?;
            let (output, reference) = (output.to_owned(), reference.to_owned());
            tokio::task::spawn_blocking(move || write_archive(staging.path(), &blobs, &reference, &output))
                .await
                .expect("archiving does not panic")?;
        }
    }
    Ok(layer_bytes)
}

async fn blobs(storage: &Storage, manifest: &Digest) -> Result<Blobs, ExportError> {
    let bytes = storage
        .read_small_blob(manifest)
        .await?
        .ok_or_else(|| ExportError::Missing(manifest.clone()))?;
    let bad = |e: String| ExportError::Manifest(manifest.clone(), e);
    let document: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    let digest = |value: &serde_json::Value| -> Result<Digest, ExportError> {
        value
            .as_str()
            .ok_or_else(|| bad("a descriptor has no digest".into()))?
            .parse()
            .map_err(|e: crate::digest::DigestError| bad(e.to_string()))
    };
    let layers = document["layers"]
        .as_array()
        .ok_or_else(|| bad("no layers".into()))?
        .iter()
        .map(|layer| Ok((digest(&layer["digest"])?, layer["size"].as_u64().unwrap_or(0))))
        .collect::<Result<_, ExportError>>()?;
    Ok(Blobs {
        manifest: manifest.clone(),
        config: digest(&document["config"]["digest"])?,
        layers,
    })
}

/// An OCI image layout with the image's blobs and an index naming it.
async fn write_layout(
    storage: &Storage,
    manifest: &ManifestRecord,
    blobs: &Blobs,
    reference: &str,
    dir: &Path,
    copied: &(dyn Fn(u64) + Sync),
) -> Result<(), ExportError> {
    let blob_dir = dir.join("blobs/sha256");
    tokio::fs::create_dir_all(&blob_dir)
        .await
        .map_err(write_error(&blob_dir))?;
    for digest in blobs.all() {
        let path = blob_dir.join(digest.hex());
        let mut stream = storage
            .read_blob(digest, None)
            .await?
            .ok_or_else(|| ExportError::Missing(digest.clone()))?;
        let mut file = tokio::fs::File::create(&path).await.map_err(write_error(&path))?;
        while let Some(chunk) = stream.try_next().await? {
            file.write_all(&chunk).await.map_err(write_error(&path))?;
            copied(chunk.len() as u64);
        }
        file.flush().await.map_err(write_error(&path))?;
    }
    let tag = reference.rsplit_once(':').map_or(reference, |(_, tag)| tag);
    let index = json!({
        "schemaVersion": 2,
        "mediaType": oci::OCI_INDEX,
        "manifests": [{
            "mediaType": manifest.media_type,
            "digest": manifest.digest,
            "size": manifest.size,
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }],
    });
    for (name, contents) in [
        ("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec()),
        ("index.json", index.to_string().into_bytes()),
    ] {
        let path = dir.join(name);
        tokio::fs::write(&path, contents).await.map_err(write_error(&path))?;
    }
    Ok(())
}

/// A docker-archive (`docker save`'s format) of the layout in `dir`.
fn write_archive(dir: &Path, blobs: &Blobs, reference: &str, output: &Path) -> Result<(), ExportError> {
    let blob = |digest: &Digest| format!("blobs/sha256/{}", digest.hex());
    let manifest = json!([{
        "Config": blob(&blobs.config),
        "RepoTags": [reference],
        "Layers": blobs.layers.iter().map(|(d, _)| blob(d)).collect::<Vec<_>>(),
    }]);
    let file = std::fs::File::create(output).map_err(write_error(output))?;
    let mut archive = tar::Builder::new(std::io::BufWriter::new(file));
    let mut add = |name: String, path: &Path| archive.append_path_with_name(path, name);
    for digest in [&blobs.config].into_iter().chain(blobs.layers.iter().map(|(d, _)| d)) {
        add(blob(digest), &dir.join(blob(digest))).map_err(write_error(output))?;
    }
    let manifest_path = dir.join("manifest.json");
    std::fs::write(&manifest_path, manifest.to_string()).map_err(write_error(&manifest_path))?;
    add("manifest.json".into(), &manifest_path).map_err(write_error(output))?;
    archive
        .into_inner()
        .and_then(|mut writer| writer.flush())
        .map_err(write_error(output))
}

fn write_error(path: &Path) -> impl Fn(std::io::Error) -> ExportError + '_ {
    move |source| ExportError::Write {
        path: path.to_owned(),
        source,
    }
}
