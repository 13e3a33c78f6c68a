//! The SPDX 2.3 JSON document of an image: one package per store path
//! (name, version, the store path as its file name, NAR hash, purl,
//! license and homepage where the package set says, the package set and
//! revision as its source), `DESCRIBES` for the requested packages,
//! `DEPENDS_ON` for every reference, and the `LicenseRef-`s the licenses
//! name as extracted licensing information.

use serde_json::{Value, json};

use super::declared::{self, Licenses, REFERENCE_TEXT};
use super::{CREATED, Image, StorePath, TOOL, nar_sha256};

/// The document's bytes.
pub fn spdx(image: &Image) -> Vec<u8> {
    let packages: Vec<Value> = image.graph.paths.iter().map(|info| package(image, info)).collect();
    let mut relationships: Vec<Value> = image
        .graph
        .roots
        .iter()
        .map(|root| relationship("SPDXRef-DOCUMENT", "DESCRIBES", root))
        .collect();
    for info in &image.graph.paths {
        let own = id(&info.path);
        relationships.extend(info.references.iter().map(|to| relationship(&own, "DEPENDS_ON", to)));
    }
    let mut document = json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": image.name,
        "documentNamespace": format!("https://spdx.org/spdxdocs/nixery-{}", image.id.hex()),
        "creationInfo": {
            "created": CREATED,
            "creators": [format!("Tool: {TOOL}")],
            "comment": origin(image),
        },
        "packages": packages,
        "relationships": relationships,
    });
    let references = license_references(image);
    if !references.is_empty() {
        document["hasExtractedLicensingInfos"] = json!(references);
    }
    serde_json::to_vec_pretty(&document).expect("documents serialise")
}

/// Every `LicenseRef-` the packages' licenses name, once, sorted: SPDX
/// wants each described in the document.
fn license_references(image: &Image) -> Vec<Value> {
    let licenses: Vec<Licenses> = image.packages.iter().map(|p| Licenses::parse(&p.licenses)).collect();
    let references: std::collections::BTreeSet<&str> = licenses.iter().flat_map(Licenses::references).collect();
    (references.into_iter())
        .map(|id| json!({ "licenseId": id, "name": &id["LicenseRef-".len()..], "extractedText": REFERENCE_TEXT }))
        .collect()
}

fn package(image: &Image, info: &crate::layers::PathInfo) -> Value {
    let path = StorePath::parse(&info.path);
    let meta = image.packages.iter().find(|p| p.out == info.path);
    let mut package = json!({
        "SPDXID": id(&info.path),
        "name": path.name,
        "downloadLocation": "NOASSERTION",
        "filesAnalyzed": false,
        "licenseConcluded": "NOASSERTION",
        "licenseDeclared": meta
            .and_then(|m| Licenses::parse(&m.licenses).expression())
            .unwrap_or_else(|| "NOASSERTION".to_owned()),
        "copyrightText": "NOASSERTION",
        "packageFileName": info.path,
        "sourceInfo": origin(image),
        "externalRefs": [{
            "referenceCategory": "PACKAGE-MANAGER",
            "referenceType": "purl",
            "referenceLocator": path.purl(),
        }],
    });
    if let Some(version) = path.version {
        package["versionInfo"] = json!(version);
    }
    if let Some(hex) = info.nar_hash.as_deref().and_then(nar_sha256) {
        package["checksums"] = json!([{ "algorithm": "SHA256", "checksumValue": hex }]);
    }
    if let Some(homepage) = meta.and_then(|m| m.homepage.as_deref()).and_then(declared::homepage) {
        package["homepage"] = json!(homepage);
    }
    package
}

fn relationship(from: &str, kind: &str, to: &str) -> Value {
    json!({ "spdxElementId": from, "relationshipType": kind, "relatedSpdxElement": id(to) })
}

/// A store path's SPDX identifier (its hash part is unique in a closure);
/// the document's own identifier passes through.
fn id(path: &str) -> String {
    match path.starts_with("SPDXRef-") {
        true => path.to_owned(),
        false => format!("SPDXRef-Nix-{}", StorePath::parse(path).hash),
    }
}

/// Where the packages come from.
pub(super) fn origin(image: &Image) -> String {
    match image.revision {
        Some(revision) => format!("built from the package set {} at revision {revision}", image.source),
        None => format!("built from the package set {}", image.source),
    }
}
