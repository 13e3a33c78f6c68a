//! The CycloneDX 1.5 JSON document of an image: the image as the subject,
//! one component per store path (name, version, purl, NAR hash, licenses
//! and homepage where the package set says, the store path as a property)
//! and their dependencies from the references. Licenses are `license.id`s
//! when each is one listed identifier (`license.name`, the `LicenseRef-`,
//! for one that is not valid), else one `expression` of them all.

use serde_json::{Value, json};

use super::declared::{self, License, Licenses};
use super::spdx::origin;
use super::{CREATED, Image, StorePath, nar_sha256};
use crate::digest::Digest;

/// The document's bytes.
pub fn cyclonedx(image: &Image) -> Vec<u8> {
    let components: Vec<Value> = image.graph.paths.iter().map(|info| component(image, info)).collect();
    let mut dependencies = vec![json!({ "ref": "image", "dependsOn": image.graph.roots })];
    dependencies
        .extend((image.graph.paths.iter()).map(|info| json!({ "ref": info.path, "dependsOn": info.references })));
    let mut properties = vec![json!({ "name": "nixery:package-source", "value": image.source })];
    if let Some(revision) = image.revision {
        properties.push(json!({ "name": "nixery:revision", "value": revision }));
    }
    let document = json!({
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        "serialNumber": serial_number(image.id),
        "version": 1,
        "metadata": {
            "timestamp": CREATED,
            "tools": { "components": [{
                "type": "application",
                "name": "nixery",
                "version": env!("CARGO_PKG_VERSION"),
            }] },
            "component": {
                "type": "container",
                "bom-ref": "image",
                "name": image.name,
                "version": image.id.as_str(),
                "description": origin(image),
            },
            "properties": properties,
        },
        "components": components,
        "dependencies": dependencies,
    });
    serde_json::to_vec_pretty(&document).expect("documents serialise")
}

fn component(image: &Image, info: &crate::layers::PathInfo) -> Value {
    let path = StorePath::parse(&info.path);
    let meta = image.packages.iter().find(|p| p.out == info.path);
    let mut component = json!({
        "type": if meta.is_some() { "application" } else { "library" },
        "bom-ref": info.path,
        "name": path.name,
        "purl": path.purl(),
        "properties": [{ "name": "nix:store_path", "value": info.path }],
    });
    if let Some(version) = path.version {
        component["version"] = json!(version);
    }
    if let Some(hex) = info.nar_hash.as_deref().and_then(nar_sha256) {
        component["hashes"] = json!([{ "alg": "SHA-256", "content": hex }]);
    }
    if let Some(meta) = meta {
        if let Some(licenses) = licenses(&Licenses::parse(&meta.licenses)) {
            component["licenses"] = licenses;
        }
        if let Some(homepage) = meta.homepage.as_deref().and_then(declared::homepage) {
            component["externalReferences"] = json!([{ "type": "website", "url": homepage }]);
        }
    }
    component
}

/// A component's `licenses`: one `license` each, or one `expression` when
/// any needs more than an identifier; `None` without any.
fn licenses(licenses: &Licenses) -> Option<Value> {
    let expression = licenses.expression()?;
    if licenses.need_expression() {
        return Some(json!([{ "expression": expression }]));
    }
    let each = (licenses.0.iter()).map(|license| match license {
        License::Listed(id) => json!({ "license": { "id": id } }),
        other => json!({ "license": { "name": other.text() } }),
    });
    Some(Value::Array(each.collect()))
}

/// A UUID derived from the image ID, shaped as a name-based one.
fn serial_number(id: &Digest) -> String {
    let hex = id.hex();
    let variant = ["8", "9", "a", "b"][usize::from_str_radix(&hex[16..17], 16).unwrap_or(0) % 4];
    format!(
        "urn:uuid:{}-{}-5{}-{variant}{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stated(texts: &[&str]) -> Option<Value> {
        licenses(&Licenses::parse(
            &texts.iter().map(|t| t.to_string()).collect::<Vec<_>>(),
        ))
    }

    #[test]
    fn licenses_are_ids_names_or_one_expression() {
        assert_eq!(
            stated(&["GPL-2.0-only", "<b>x</b>"]),
            Some(json!([
                { "license": { "id": "GPL-2.0-only" } },
                { "license": { "name": "LicenseRef--b-x--b-" } },
            ]))
        );
        assert_eq!(
            stated(&["MIT or ISC", "Zlib", "<b>"]),
            Some(json!([{ "expression": "(MIT OR ISC) AND Zlib AND LicenseRef--b-" }])),
            "CycloneDX takes one expression, or licenses, not both"
        );
        assert_eq!(stated(&[]), None);
    }
}
