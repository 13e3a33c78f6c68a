//! Image configs and manifests, built with the `oci-spec` types and
//! serialised once into the exact bytes that are hashed, stored and served.
//! Docker schema 2 is the format served today; the media types of both
//! families live here.

use oci_spec::image::{
    Arch as OciArch, ConfigBuilder, DescriptorBuilder, ImageConfigurationBuilder, ImageManifestBuilder, MediaType, Os,
    RootFsBuilder,
};
use serde::Deserialize;

use crate::archive::LayerDigests;
use crate::digest::Digest;
use crate::image::Arch;

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

/// Manifest media types this registry can serve by digest.
const MANIFEST_TYPES: [&str; 4] = [DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX];

/// Where images look for programs and CA certificates.
const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const SSL_CERT_FILE: &str = "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt";

/// A serialised JSON document and its digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    pub bytes: Vec<u8>,
    pub digest: Digest,
}

impl Document {
    fn new(bytes: Vec<u8>) -> Self {
        Document {
            digest: Digest::of(&bytes),
            bytes,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("building an OCI document failed: {0}")]
    Spec(#[from] oci_spec::OciSpecError),
    #[error("serialising an OCI document failed: {0}")]
    Json(#[from] serde_json::Error),
}

/// The image config: architecture, `PATH` and `SSL_CERT_FILE`, `bash` as
/// the command when the image has it, and the layers' diff_ids in order.
pub fn image_config(arch: Arch, layers: &[LayerDigests], bash: bool) -> Result<Document, OciError> {
    let mut config = ConfigBuilder::default().env(vec![PATH.to_owned(), SSL_CERT_FILE.to_owned()]);
    if bash {
        config = config.cmd(vec!["bash".to_owned()]);
    }
    let rootfs = RootFsBuilder::default()
        .typ("layers")
        .diff_ids(layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>())
        .build()?;
    let image = ImageConfigurationBuilder::default()
        .architecture(match arch {
            Arch::Amd64 => OciArch::Amd64,
            Arch::Arm64 => OciArch::ARM64,
        })
        .os(Os::Linux)
        .config(config.build()?)
        .rootfs(rootfs)
        .build()?;
    Ok(Document::new(serde_json::to_vec(&image)?))
}

/// A Docker schema 2 manifest for a config and gzip layers.
pub fn docker_manifest(config: &Document, layers: &[LayerDigests]) -> Result<Document, OciError> {
    let descriptor = |media_type: &str, digest: &Digest, size: u64| {
        DescriptorBuilder::default()
            .media_type(MediaType::from(media_type))
            .digest(oci_spec::image::Digest::try_from(digest.as_str()).expect("our digests are valid"))
            .size(size)
            .build()
    };
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::from(DOCKER_MANIFEST))
        .config(descriptor(DOCKER_CONFIG, &config.digest, config.bytes.len() as u64)?)
        .layers(
            layers
                .iter()
                .map(|l| descriptor(DOCKER_LAYER_GZIP, &l.digest, l.size))
                .collect::<Result<Vec<_>, _>>()?,
        )
        .build()?;
    Ok(Document::new(serde_json::to_vec(&manifest)?))
}

/// The media type a stored manifest declares, if the bytes are a manifest
/// or index of a type this registry serves.
pub fn manifest_media_type(bytes: &[u8]) -> Option<&'static str> {
    #[derive(Deserialize)]
    struct Head {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        #[serde(rename = "schemaVersion")]
        schema_version: u32,
    }
    let head: Head = serde_json::from_slice(bytes).ok()?;
    let declared = head.media_type?;
    (head.schema_version == 2).then_some(())?;
    MANIFEST_TYPES.into_iter().find(|t| *t == declared)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(n: u8) -> LayerDigests {
        LayerDigests {
            digest: Digest::of(&[n]),
            diff_id: Digest::of(&[n, n]),
            size: 100 + n as u64,
        }
    }

    /// The exact bytes: a change here changes every image's digest.
    #[test]
    fn config_bytes_are_pinned() {
        let config = image_config(Arch::Amd64, &[layer(1)], true).unwrap();
        assert_eq!(
            String::from_utf8(config.bytes.clone()).unwrap(),
            format!(
                r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["{PATH}","{SSL_CERT_FILE}"],"Cmd":["bash"]}},"rootfs":{{"type":"layers","diff_ids":["{}"]}}}}"#,
                Digest::of(&[1, 1])
            )
        );
        let arm = image_config(Arch::Arm64, &[], false).unwrap();
        let text = String::from_utf8(arm.bytes).unwrap();
        assert!(text.starts_with(r#"{"architecture":"arm64","#), "{text}");
        assert!(!text.contains("Cmd"));
    }

    #[test]
    fn manifest_bytes_are_pinned() {
        let config = image_config(Arch::Amd64, &[layer(1), layer(2)], false).unwrap();
        let manifest = docker_manifest(&config, &[layer(1), layer(2)]).unwrap();
        let expected = format!(
            concat!(
                r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"{}","digest":"{}","size":{}}},"#,
                r#""layers":[{{"mediaType":"{}","digest":"{}","size":101}},{{"mediaType":"{}","digest":"{}","size":102}}]}}"#
            ),
            DOCKER_MANIFEST,
            DOCKER_CONFIG,
            config.digest,
            config.bytes.len(),
            DOCKER_LAYER_GZIP,
            Digest::of(&[1]),
            DOCKER_LAYER_GZIP,
            Digest::of(&[2]),
        );
        assert_eq!(String::from_utf8(manifest.bytes.clone()).unwrap(), expected);
        assert_eq!(manifest.digest, Digest::of(&manifest.bytes));
        assert_eq!(manifest_media_type(&manifest.bytes), Some(DOCKER_MANIFEST));
    }

    #[test]
    fn only_manifests_have_a_manifest_media_type() {
        assert_eq!(manifest_media_type(b"\x1f\x8b\x08\x00"), None);
        assert_eq!(manifest_media_type(br#"{"architecture":"amd64"}"#), None);
        assert_eq!(
            manifest_media_type(br#"{"schemaVersion":2,"mediaType":"text/plain"}"#),
            None
        );
        assert_eq!(
            manifest_media_type(format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}"}}"#).as_bytes()),
            Some(OCI_INDEX)
        );
    }
}
