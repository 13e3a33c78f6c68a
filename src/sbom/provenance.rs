//! The in-toto statement of an image's SLSA provenance (v1): its subject
//! is the image's manifests; its build definition records the package set
//! and revision, the requested packages and the meta-packages they came
//! from, the derivations, and the settings that shaped the layers; its run
//! details name the builder.

use serde_json::{Value, json};

use crate::digest::Digest;
use crate::nix::Package;

/// The build type this registry's provenance describes.
const BUILD_TYPE: &str = "urn:nixery:build-type:image:v1";

/// What an image's provenance says.
pub struct Provenance<'a> {
    /// The image as pulled: `shell/hello:latest`.
    pub image: &'a str,
    /// The manifests built, one per format.
    pub manifests: &'a [&'a Digest],
    /// The packages the name asked for (meta-packages expanded).
    pub requested: &'a [String],
    /// The meta-packages the name starts with, and what each adds.
    pub metas: &'a [(String, Vec<String>)],
    /// Every package installed, with its derivation.
    pub packages: &'a [Package],
    pub source: &'a str,
    pub revision: Option<&'a str>,
    /// The settings that shaped the image (layering, budget, compression,
    /// architecture…), as they enter its cache key.
    pub settings: Value,
    /// Who built it (`NIXERY_BUILDER_ID`).
    pub builder: &'a str,
}

/// The statement's bytes.
pub fn provenance(provenance: &Provenance) -> Vec<u8> {
    let subject: Vec<Value> = (provenance.manifests.iter())
        .map(|digest| json!({ "name": provenance.image, "digest": { "sha256": digest.hex() } }))
        .collect();
    let metas: serde_json::Map<String, Value> = (provenance.metas.iter())
        .map(|(name, packages)| (name.clone(), json!(packages)))
        .collect();
    let mut source = json!({ "uri": provenance.source });
    if let Some(revision) = provenance.revision {
        source["annotations"] = json!({ "revision": revision });
        if revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit()) {
            source["digest"] = json!({ "gitCommit": revision });
        }
    }
    let mut dependencies = vec![source];
    dependencies.extend((provenance.packages.iter()).map(|package| {
        json!({
            "name": package.attribute,
            "uri": package.drv,
            "annotations": { "out": package.out },
        })
    }));
    let statement = json!({
        "_type": "https://in-toto.io/Statement/v1",
        "subject": subject,
        "predicateType": "https://slsa.dev/provenance/v1",
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "image": provenance.image,
                    "packages": provenance.requested,
                    "metaPackages": metas,
                },
                "internalParameters": provenance.settings,
                "resolvedDependencies": dependencies,
            },
            "runDetails": {
                "builder": {
                    "id": provenance.builder,
                    "version": { "nixery": env!("CARGO_PKG_VERSION") },
                },
            },
        },
    });
    serde_json::to_vec_pretty(&statement).expect("documents serialise")
}
