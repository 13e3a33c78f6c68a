//! Image configs, manifests and indexes in both families (Docker schema 2
//! and OCI), built with the `oci-spec` types and serialised once into the
//! exact bytes that are hashed, stored and served. The media types live here.

use oci_spec::image::{
    Arch as OciArch, ConfigBuilder, Descriptor, DescriptorBuilder, ImageConfigurationBuilder, ImageIndexBuilder,
    ImageManifestBuilder, MediaType, Os, PlatformBuilder, RootFsBuilder,
};
use std::collections::BTreeMap;

use serde::Deserialize;

use crate::arch::Arch;
use crate::archive::{Compression, LayerDigests};
use crate::digest::Digest;
use crate::meta::User;

pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// The config of artifacts, and its bytes.
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
pub const EMPTY_JSON: &[u8] = b"{}";
/// When artifacts say they were made: the Unix epoch, as their contents
/// depend on the image only.
pub const CREATED: &str = "1970-01-01T00:00:00Z";
const CREATED_ANNOTATION: &str = "org.opencontainers.image.created";
/// The file name a blob is saved under (`oras pull` saves only layers that
/// have one).
const TITLE_ANNOTATION: &str = "org.opencontainers.image.title";

/// Manifest media types this registry can serve by digest.
const MANIFEST_TYPES: [&str; 4] = [DOCKER_MANIFEST, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX];

/// Where images look for programs and CA certificates.
const PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
const SSL_CERT_FILE: &str = "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt";
const NIX_SSL_CERT_FILE: &str = "NIX_SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt";
const LANG: &str = "LANG=C.UTF-8";

/// A manifest family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Docker,
    Oci,
}

impl std::str::FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "docker" => Ok(Format::Docker),
            "oci" => Ok(Format::Oci),
            other => Err(format!("unknown manifest format {other:?}: use oci or docker")),
        }
    }
}

impl Format {
    fn manifest_type(self) -> &'static str {
        match self {
            Format::Docker => DOCKER_MANIFEST,
            Format::Oci => OCI_MANIFEST,
        }
    }

    fn index_type(self) -> &'static str {
        match self {
            Format::Docker => DOCKER_MANIFEST_LIST,
            Format::Oci => OCI_INDEX,
        }
    }

    fn config_type(self) -> &'static str {
        match self {
            Format::Docker => DOCKER_CONFIG,
            Format::Oci => OCI_CONFIG,
        }
    }

    /// The media type of layers compressed so; Docker has no zstd type,
    /// so its manifests are only ever made with gzip layers.
    fn layer_type(self, compression: Compression) -> &'static str {
        match (self, compression) {
            (Format::Docker, _) => DOCKER_LAYER_GZIP,
            (Format::Oci, Compression::Gzip(_)) => OCI_LAYER_GZIP,
            (Format::Oci, Compression::Zstd(_)) => OCI_LAYER_ZSTD,
        }
    }

    /// The media type of a manifest (`index: false`) or index of this family.
    pub fn media_type(self, index: bool) -> &'static str {
        if index { self.index_type() } else { self.manifest_type() }
    }
}

/// A serialised JSON document and its digest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Document {
    pub bytes: Vec<u8>,
    pub digest: Digest,
}

impl Document {
    pub fn new(bytes: Vec<u8>) -> Self {
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

/// How a container of an image runs, besides what its layers hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Runtime {
    /// `bash` is the command (unless there is an entrypoint).
    pub bash: bool,
    /// The user to run as; root when `None`.
    pub user: Option<User>,
    /// The program to run, from the sole requested package's `mainProgram`.
    pub entrypoint: Option<String>,
    /// Labels, such as the package source and its revision.
    pub labels: BTreeMap<String, String>,
}

/// The image config: architecture; `PATH`, the CA bundle, `LANG` and `HOME`
/// in the environment; the user, the entrypoint or else `bash` as the
/// command, and the labels of `runtime`; the layers' diff_ids in order.
pub fn image_config(arch: Arch, layers: &[LayerDigests], runtime: &Runtime) -> Result<Document, OciError> {
    let home = runtime.user.as_ref().map_or_else(|| "/root".to_owned(), User::home);
    let env = [PATH, SSL_CERT_FILE, NIX_SSL_CERT_FILE, LANG].map(str::to_owned);
    let mut config = ConfigBuilder::default().env([&env[..], &[format!("HOME={home}")]].concat());
    if let Some(user) = &runtime.user {
        config = config.user(format!("{}:{}", user.uid, user.gid)).working_dir(home);
    }
    match &runtime.entrypoint {
        Some(program) => config = config.entrypoint(vec![program.clone()]),
        None if runtime.bash => config = config.cmd(vec!["bash".to_owned()]),
        None => {}
    }

    let rootfs = RootFsBuilder::default()
        .typ("layers")
        .diff_ids(layers.iter().map(|l| l.diff_id.to_string()).collect::<Vec<_>>())
        .build()?;
    let image = ImageConfigurationBuilder::default()
        .architecture(oci_arch(arch))
        .os(Os::Linux)
        .config(config.build()?)
        .rootfs(rootfs)
        .build()?;
    // oci-spec keeps labels in a HashMap, whose order changes from run to
    // run: they are added to the JSON value instead, in sorted order.
    let mut value = serde_json::to_value(&image)?;
    if !runtime.labels.is_empty() {
        value["config"]["Labels"] = serde_json::to_value(&runtime.labels)?;
    }
    Ok(Document::new(serde_json::to_vec(&value)?))
}

fn oci_arch(arch: Arch) -> OciArch {
    match arch {
        Arch::Amd64 => OciArch::Amd64,
        Arch::Arm64 => OciArch::ARM64,
    }
}

fn descriptor(media_type: &str, digest: &Digest, size: u64) -> DescriptorBuilder {
    DescriptorBuilder::default()
        .media_type(MediaType::from(media_type))
        .digest(oci_spec::image::Digest::try_from(digest.as_str()).expect("our digests are valid"))
        .size(size)
}

/// A manifest of the family for a config and layers compressed so.
pub fn manifest(
    format: Format,
    config: &Document,
    layers: &[LayerDigests],
    compression: Compression,
) -> Result<Document, OciError> {
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::from(format.manifest_type()))
        .config(descriptor(format.config_type(), &config.digest, config.bytes.len() as u64).build()?)
        .layers(
            layers
                .iter()
                .map(|l| descriptor(format.layer_type(compression), &l.digest, l.size).build())
                .collect::<Result<Vec<_>, _>>()?,
        )
        .build()?;
    Ok(Document::new(serde_json::to_vec(&manifest)?))
}

/// One architecture's manifest, as an index lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexEntry {
    pub arch: Arch,
    pub digest: Digest,
    pub size: u64,
}

/// An index (OCI) or manifest list (Docker) over manifests of the same
/// family, one per architecture, in the order given.
pub fn index(format: Format, entries: &[IndexEntry]) -> Result<Document, OciError> {
    let manifests = entries
        .iter()
        .map(|entry| {
            let mut platform = PlatformBuilder::default()
                .architecture(oci_arch(entry.arch))
                .os(Os::Linux);
            if entry.arch == Arch::Arm64 {
                platform = platform.variant("v8");
            }
            descriptor(format.manifest_type(), &entry.digest, entry.size)
                .platform(platform.build()?)
                .build()
        })
        .collect::<Result<Vec<Descriptor>, _>>()?;
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::from(format.index_type()))
        .manifests(manifests)
        .build()?;
    Ok(Document::new(serde_json::to_vec(&index)?))
}

/// A manifest that refers to another (an artifact of `artifact_type`
/// whose subject is a manifest).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Referrer {
    pub digest: Digest,
    pub size: u64,
    pub artifact_type: String,
}

/// A manifest, as a subject names it.
pub struct Subject<'a> {
    pub media_type: &'a str,
    pub digest: &'a Digest,
    pub size: u64,
}

/// A blob an artifact holds: its media type, the file name it is saved
/// under, and its bytes.
pub struct ArtifactBlob<'a> {
    pub media_type: &'a str,
    pub title: &'a str,
    pub document: &'a Document,
}

/// The artifact manifest of `blob` about `subject`, with the empty config.
pub fn artifact(artifact_type: &str, blob: &ArtifactBlob, subject: &Subject) -> Result<Document, OciError> {
    let empty = Digest::of(EMPTY_JSON);
    let title = std::collections::HashMap::from([(TITLE_ANNOTATION.to_owned(), blob.title.to_owned())]);
    let layer = descriptor(blob.media_type, &blob.document.digest, blob.document.bytes.len() as u64)
        .annotations(title)
        .build()?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::from(OCI_MANIFEST))
        .artifact_type(MediaType::from(artifact_type))
        .config(descriptor(OCI_EMPTY, &empty, EMPTY_JSON.len() as u64).build()?)
        .layers(vec![layer])
        .subject(descriptor(subject.media_type, subject.digest, subject.size).build()?)
        .annotations(created())
        .build()?;
    Ok(Document::new(serde_json::to_vec(&manifest)?))
}

/// The manifest of a signature: the simple-signing `payload` as its one
/// layer, with its base64 `signature` in the layer's annotation (as cosign
/// writes it), the empty config, and the signed manifest as its subject
/// (so that it is among the manifest's referrers too).
pub fn signature_manifest(payload: &Document, signature: &str, subject: &Subject) -> Result<Document, OciError> {
    let empty = Digest::of(EMPTY_JSON);
    let annotations =
        std::collections::HashMap::from([(crate::signing::SIGNATURE_ANNOTATION.to_owned(), signature.to_owned())]);
    let layer = descriptor(
        crate::signing::SIMPLE_SIGNING,
        &payload.digest,
        payload.bytes.len() as u64,
    )
    .annotations(annotations)
    .build()?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::from(OCI_MANIFEST))
        .artifact_type(MediaType::from(crate::signing::SIGNATURE_ARTIFACT))
        .config(descriptor(OCI_EMPTY, &empty, EMPTY_JSON.len() as u64).build()?)
        .layers(vec![layer])
        .subject(descriptor(subject.media_type, subject.digest, subject.size).build()?)
        .build()?;
    Ok(Document::new(serde_json::to_vec(&manifest)?))
}

/// What the referrers API answers: an index of the artifacts that refer
/// to a manifest (none, for a digest nothing refers to).
pub fn referrers_index(referrers: &[Referrer]) -> Document {
    let manifests: Vec<Descriptor> = referrers
        .iter()
        .map(|referrer| {
            descriptor(OCI_MANIFEST, &referrer.digest, referrer.size)
                .artifact_type(MediaType::from(referrer.artifact_type.as_str()))
                .annotations(created())
                .build()
                .expect("a referrer's descriptor is valid")
        })
        .collect();
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::from(OCI_INDEX))
        .manifests(manifests)
        .build()
        .expect("an index of descriptors is valid");
    Document::new(serde_json::to_vec(&index).expect("an index serialises"))
}

fn created() -> std::collections::HashMap<String, String> {
    std::collections::HashMap::from([(CREATED_ANNOTATION.to_owned(), CREATED.to_owned())])
}

/// What an artifact manifest (as [`artifact`] writes it) names: its
/// config, and its one layer with that layer's media type.
#[derive(Debug, PartialEq, Eq)]
pub struct ArtifactParts {
    pub config: Digest,
    pub layer: Digest,
    pub layer_type: String,
}

/// The parts of the artifact manifest `bytes`; `None` if it is none.
pub fn artifact_parts(bytes: &[u8]) -> Option<ArtifactParts> {
    let artifact: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let digest = |value: &serde_json::Value| value["digest"].as_str()?.parse::<Digest>().ok();
    let layer = &artifact["layers"][0];
    Some(ArtifactParts {
        config: digest(&artifact["config"])?,
        layer: digest(layer)?,
        layer_type: layer["mediaType"].as_str()?.to_owned(),
    })
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

    const GZIP: Compression = Compression::Gzip(6);

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
        let bash = Runtime {
            bash: true,
            ..Runtime::default()
        };
        let config = image_config(Arch::Amd64, &[layer(1)], &bash).unwrap();
        assert_eq!(
            String::from_utf8(config.bytes.clone()).unwrap(),
            format!(
                r#"{{"architecture":"amd64","config":{{"Cmd":["bash"],"Env":["{PATH}","{SSL_CERT_FILE}","{NIX_SSL_CERT_FILE}","{LANG}","HOME=/root"]}},"os":"linux","rootfs":{{"diff_ids":["{}"],"type":"layers"}}}}"#,
                Digest::of(&[1, 1])
            )
        );
        let arm = image_config(Arch::Arm64, &[], &Runtime::default()).unwrap();
        let text = String::from_utf8(arm.bytes).unwrap();
        assert!(text.starts_with(r#"{"architecture":"arm64","#), "{text}");
        assert!(!text.contains("Cmd"));
    }

    #[test]
    fn users_entrypoints_and_labels_go_into_the_config() {
        let runtime = Runtime {
            bash: true,
            user: Some(User {
                name: "app".into(),
                uid: 10,
                gid: 20,
                home: None,
            }),
            entrypoint: Some("/nix/store/x-hello/bin/hello".into()),
            labels: BTreeMap::from([
                ("org.opencontainers.image.source".into(), "s".into()),
                ("org.opencontainers.image.revision".into(), "r".into()),
            ]),
        };
        let config: serde_json::Value =
            serde_json::from_slice(&image_config(Arch::Amd64, &[], &runtime).unwrap().bytes).unwrap();
        let config = &config["config"];
        assert_eq!(config["User"], "10:20");
        assert_eq!(config["WorkingDir"], "/home/app");
        assert_eq!(
            config["Entrypoint"],
            serde_json::json!(["/nix/store/x-hello/bin/hello"])
        );
        assert!(config.get("Cmd").is_none(), "the entrypoint replaces bash");
        assert!(config["Env"].as_array().unwrap().contains(&"HOME=/home/app".into()));
        assert_eq!(
            serde_json::to_string(&config["Labels"]).unwrap(),
            r#"{"org.opencontainers.image.revision":"r","org.opencontainers.image.source":"s"}"#
        );
    }

    #[test]
    fn manifest_bytes_are_pinned() {
        let config = image_config(Arch::Amd64, &[layer(1), layer(2)], &Runtime::default()).unwrap();
        let manifest = manifest(Format::Docker, &config, &[layer(1), layer(2)], GZIP).unwrap();
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
    fn oci_manifests_differ_only_in_media_types() {
        let config = image_config(Arch::Amd64, &[layer(1)], &Runtime::default()).unwrap();
        let docker = manifest(Format::Docker, &config, &[layer(1)], GZIP).unwrap();
        let oci = manifest(Format::Oci, &config, &[layer(1)], GZIP).unwrap();
        assert_ne!(docker.digest, oci.digest);
        let text = String::from_utf8(oci.bytes.clone()).unwrap();
        let converted = text
            .replace(OCI_MANIFEST, DOCKER_MANIFEST)
            .replace(OCI_CONFIG, DOCKER_CONFIG)
            .replace(OCI_LAYER_GZIP, DOCKER_LAYER_GZIP);
        assert_eq!(converted.as_bytes(), docker.bytes);
        assert_eq!(manifest_media_type(&oci.bytes), Some(OCI_MANIFEST));
        let zstd = manifest(Format::Oci, &config, &[layer(1)], Compression::Zstd(3)).unwrap();
        assert!(String::from_utf8(zstd.bytes).unwrap().contains(OCI_LAYER_ZSTD));
        let docker_zstd = manifest(Format::Docker, &config, &[layer(1)], Compression::Zstd(3)).unwrap();
        assert_eq!(docker_zstd, docker, "Docker manifests say gzip");
    }

    #[test]
    fn index_bytes_are_pinned() {
        let entries = [
            IndexEntry {
                arch: Arch::Amd64,
                digest: Digest::of(b"a"),
                size: 10,
            },
            IndexEntry {
                arch: Arch::Arm64,
                digest: Digest::of(b"b"),
                size: 20,
            },
        ];
        let oci = index(Format::Oci, &entries).unwrap();
        assert_eq!(
            String::from_utf8(oci.bytes.clone()).unwrap(),
            format!(
                concat!(
                    r#"{{"schemaVersion":2,"mediaType":"{index}","manifests":["#,
                    r#"{{"mediaType":"{manifest}","digest":"{a}","size":10,"platform":{{"architecture":"amd64","os":"linux"}}}},"#,
                    r#"{{"mediaType":"{manifest}","digest":"{b}","size":20,"platform":{{"architecture":"arm64","os":"linux","variant":"v8"}}}}]}}"#
                ),
                index = OCI_INDEX,
                manifest = OCI_MANIFEST,
                a = Digest::of(b"a"),
                b = Digest::of(b"b"),
            )
        );
        let docker = index(Format::Docker, &entries).unwrap();
        assert_eq!(manifest_media_type(&docker.bytes), Some(DOCKER_MANIFEST_LIST));
        assert!(String::from_utf8(docker.bytes).unwrap().contains(DOCKER_MANIFEST));
        assert_eq!(
            String::from_utf8(referrers_index(&[]).bytes).unwrap(),
            format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[]}}"#)
        );
    }

    #[test]
    fn artifacts_name_their_blob_and_subject() {
        let document = Document::new(b"{}\n".to_vec());
        let subject = Digest::of(b"manifest");
        let blob = ArtifactBlob {
            media_type: "application/spdx+json",
            title: "sbom.spdx.json",
            document: &document,
        };
        let subject = Subject {
            media_type: OCI_MANIFEST,
            digest: &subject,
            size: 8,
        };
        let artifact = artifact("application/spdx+json", &blob, &subject).unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(&artifact.bytes).unwrap();
        let layer = &manifest["layers"][0];
        assert_eq!(
            layer["annotations"][TITLE_ANNOTATION], "sbom.spdx.json",
            "oras saves it by this"
        );
        assert_eq!(layer["digest"], document.digest.as_str());
        assert_eq!(manifest["subject"]["digest"], subject.digest.as_str());
        assert_eq!(manifest["annotations"][CREATED_ANNOTATION], CREATED);
        assert_eq!(
            artifact,
            super::artifact("application/spdx+json", &blob, &subject).unwrap()
        );
        let parts = artifact_parts(&artifact.bytes).unwrap();
        assert_eq!(
            (parts.layer, parts.layer_type.as_str()),
            (document.digest.clone(), "application/spdx+json")
        );
        assert_eq!(parts.config, Digest::of(EMPTY_JSON));
        assert_eq!(artifact_parts(b"{}"), None);
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
