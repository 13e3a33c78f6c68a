//! SBOMs and provenance: made with every image, listed by the referrers API
//! (with its artifactType filter) and the referrers tag scheme, read with
//! the oras Python SDK, validated with spdx-tools and cyclonedx-python-lib,
//! complete (every store path of the image's layers exactly once), the same
//! bytes from another registry, nothing built for a digest never built, and
//! valid whatever a package's `meta` says, each pulled as a file named by
//! its title.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::{Registry, request, sha256};
use serde_json::Value;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const SPDX: &str = "application/spdx+json";
const CYCLONEDX: &str = "application/vnd.cyclonedx+json";
const IN_TOTO: &str = "application/vnd.in-toto+json";

/// Lists the referrers of a manifest with the oras SDK's client, fetches
/// each artifact manifest and its one blob, and writes the blob to
/// `<folder>/<artifact digest>.json`; prints `{artifactType: file}`.
const ORAS_CLIENT: &str = r#"
import json, sys
import oras.provider
host, name, subject, folder = sys.argv[1:5]
registry = oras.provider.Registry(host, insecure=True)
listed = registry.do_request(f"http://{host}/v2/{name}/referrers/{subject}", "GET")
listed.raise_for_status()
found = {}
for descriptor in listed.json()["manifests"]:
    artifact = registry.get_manifest(f"{host}/{name}@{descriptor['digest']}")
    assert artifact["subject"]["digest"] == subject, artifact
    layer = artifact["layers"][0]
    container = registry.get_container(f"{host}/{name}")
    path = f"{folder}/{descriptor['digest'][7:]}.json"
    registry.download_blob(container, layer["digest"], path)
    found[descriptor["artifactType"]] = path
print(json.dumps(found))
"#;

/// Pulls each referrer of a manifest with the oras SDK's `pull`, which
/// saves a layer under its title (else its digest) in `<folder>`; prints
/// `{artifactType: [file names]}`.
const ORAS_PULL: &str = r#"
import json, os, sys
import oras.provider
host, name, subject, folder = sys.argv[1:5]
registry = oras.provider.Registry(host, insecure=True)
listed = registry.do_request(f"http://{host}/v2/{name}/referrers/{subject}", "GET")
listed.raise_for_status()
found = {}
for descriptor in listed.json()["manifests"]:
    files = registry.pull(target=f"{host}/{name}@{descriptor['digest']}", outdir=folder)
    found[descriptor["artifactType"]] = [os.path.basename(f) for f in files]
print(json.dumps(found))
"#;

const CYCLONEDX_CHECK: &str = r#"
import sys
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator
errors = JsonStrictValidator(SchemaVersion.V1_5).validate_str(open(sys.argv[1]).read())
if errors:
    sys.exit(f"invalid CycloneDX 1.5: {errors}")
"#;

fn tools() -> PathBuf {
    common::buckets::tools().parent().unwrap().join("sbom/bin")
}

/// Runs a program of the SBOM tools; its stdout.
fn tool(program: &str, args: &[&str]) -> String {
    let path = tools().join(program);
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup.sh test",
        path.display()
    );
    common::run(path.to_str().unwrap(), args)
}

/// The OCI manifest `image` resolves to: its digest and JSON.
fn manifest(registry: &Registry, image: &str) -> (String, Value) {
    let response = request(
        "GET",
        &registry.url(&format!("/v2/{image}/manifests/latest")),
        &[("Accept", OCI_MANIFEST)],
    );
    assert_eq!(response.status, 200);
    (sha256(&response.body), response.json())
}

/// The store paths the image's layers hold (`/nix/store/<name>` of every
/// entry below it), with how many layers hold each.
fn layer_store_paths(registry: &Registry, image: &str, manifest: &Value) -> BTreeMap<String, usize> {
    let mut found = BTreeMap::new();
    for layer in manifest["layers"].as_array().unwrap() {
        let digest = layer["digest"].as_str().unwrap();
        let blob = registry.get(&format!("/v2/{image}/blobs/{digest}")).body;
        let mut archive = tar::Archive::new(flate2::read::MultiGzDecoder::new(&blob[..]));
        let mut paths: Vec<String> = archive
            .entries()
            .unwrap()
            .filter_map(|entry| {
                let path = entry.unwrap().path().unwrap().to_string_lossy().into_owned();
                let rest = path
                    .trim_start_matches("./")
                    .trim_start_matches('/')
                    .strip_prefix("nix/store/")?;
                let name = rest.split('/').next().filter(|n| !n.is_empty())?;
                Some(format!("/nix/store/{name}"))
            })
            .collect();
        paths.sort();
        paths.dedup();
        for path in paths {
            *found.entry(path).or_default() += 1;
        }
    }
    found
}

fn read(path: &str) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// How many times each store path is described.
fn counted<'a>(paths: impl Iterator<Item = &'a str>) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for path in paths {
        *counts.entry(path.to_owned()).or_default() += 1;
    }
    counts
}

#[test]
fn every_image_has_valid_complete_sboms_and_provenance() {
    let registry = Registry::start();
    let image = "shell/hello";
    let (digest, oci) = manifest(&registry, image);
    let folder = tempfile::tempdir().unwrap();
    let listed = tool(
        "python",
        &[
            "-c",
            ORAS_CLIENT,
            &registry.address,
            image,
            &digest,
            folder.path().to_str().unwrap(),
        ],
    );
    let files: BTreeMap<String, String> = serde_json::from_str(&listed).unwrap();
    assert_eq!(
        files.keys().map(String::as_str).collect::<Vec<_>>(),
        [SPDX, CYCLONEDX, IN_TOTO],
        "one SBOM of each kind and the provenance"
    );
    tool("pyspdxtools", &["-i", &files[SPDX]]);
    tool("python", &["-c", CYCLONEDX_CHECK, &files[CYCLONEDX]]);

    let in_layers = layer_store_paths(&registry, image, &oci);
    assert!(in_layers.values().all(|&n| n == 1), "each store path in one layer");
    let spdx = read(&files[SPDX]);
    let packages = spdx["packages"].as_array().unwrap();
    let described = counted(packages.iter().map(|p| p["packageFileName"].as_str().unwrap()));
    assert_eq!(
        described, in_layers,
        "the SPDX document describes exactly the layers' store paths"
    );
    let cyclonedx = read(&files[CYCLONEDX]);
    let components = cyclonedx["components"].as_array().unwrap();
    let described = counted(components.iter().map(|c| c["bom-ref"].as_str().unwrap()));
    assert_eq!(described, in_layers, "the CycloneDX document too");

    let hello = packages.iter().find(|p| p["name"] == "hello").unwrap();
    assert_eq!(hello["versionInfo"], "2.12.1");
    assert_eq!(hello["licenseDeclared"], "GPL-3.0-or-later");
    assert_eq!(hello["homepage"], "https://www.gnu.org/software/hello/manual/");
    let purl = hello["externalRefs"][0]["referenceLocator"].as_str().unwrap();
    assert!(purl.starts_with("pkg:nix/hello@2.12.1?outputhash="), "{purl}");
    assert_eq!(hello["checksums"][0]["algorithm"], "SHA256");
    let relationships = spdx["relationships"].as_array().unwrap();
    assert!(relationships.iter().any(|r| r["relationshipType"] == "DEPENDS_ON"));
    let component = components.iter().find(|c| c["name"] == "hello").unwrap();
    assert_eq!(component["licenses"][0]["license"]["id"], "GPL-3.0-or-later");
    assert_eq!(component["purl"].as_str(), Some(purl));

    let provenance = read(&files[IN_TOTO]);
    assert_eq!(provenance["predicateType"], "https://slsa.dev/provenance/v1");
    let subjects: Vec<&str> = (provenance["subject"].as_array().unwrap().iter())
        .map(|s| s["digest"]["sha256"].as_str().unwrap())
        .collect();
    assert!(subjects.contains(&&digest["sha256:".len()..]), "{subjects:?}");
    let definition = &provenance["predicate"]["buildDefinition"];
    assert_eq!(
        definition["externalParameters"]["metaPackages"]["shell"][0],
        "bashInteractive"
    );
    let derivations = definition["resolvedDependencies"].as_array().unwrap();
    assert!(
        derivations
            .iter()
            .any(|d| d["name"] == "hello" && d["uri"].as_str().unwrap().ends_with(".drv"))
    );
    assert_eq!(definition["internalParameters"]["layering"], "stable");

    referrers_api(&registry, image, &digest, &files);
    image_page_links_them(&registry, image, &files);
}

/// The image page links each document, and the links serve it.
fn image_page_links_them(registry: &Registry, image: &str, files: &BTreeMap<String, String>) {
    let page = String::from_utf8(registry.get(&format!("/image/{image}")).body).unwrap();
    for name in ["SBOM (SPDX 2.3)", "SBOM (CycloneDX 1.5)", "provenance (SLSA v1)"] {
        assert!(page.contains(name), "{name} on the page:\n{page}");
    }
    let spdx = std::fs::read(&files[SPDX]).unwrap();
    let link = format!("/v2/{image}/blobs/{}", sha256(&spdx));
    assert!(page.contains(&link), "{link} on the page:\n{page}");
    assert_eq!(registry.get(&link).body, spdx);
}

/// The referrers API's filter and tag scheme; the same bytes from a
/// registry of its own; nothing built for a digest never built.
fn referrers_api(registry: &Registry, image: &str, digest: &str, files: &BTreeMap<String, String>) {
    let all = registry.get(&format!("/v2/{image}/referrers/{digest}"));
    let query = format!("artifactType={}", SPDX.replace('+', "%2B"));
    let filtered = registry.get(&format!("/v2/{image}/referrers/{digest}?{query}"));
    assert_eq!(filtered.header("oci-filters-applied"), "artifactType");
    let only = filtered.json();
    assert_eq!(only["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(only["manifests"][0]["artifactType"], SPDX);
    let tagged = registry.get(&format!("/v2/{image}/manifests/sha256-{}", &digest["sha256:".len()..]));
    assert_eq!(tagged.status, 200);
    assert_eq!(tagged.body, all.body, "the tag scheme serves the same index");

    let other = Registry::start();
    assert_eq!(manifest(&other, image).0, digest, "the same image");
    assert_eq!(other.get(&format!("/v2/{image}/referrers/{digest}")).body, all.body);
    let spdx = std::fs::read(&files[SPDX]).unwrap();
    let listed = other.get(&format!("/v2/{image}/referrers/{digest}?{query}")).json();
    let artifact = other.get(&format!(
        "/v2/{image}/manifests/{}",
        listed["manifests"][0]["digest"].as_str().unwrap()
    ));
    let blob = artifact.json()["layers"][0]["digest"].as_str().unwrap().to_owned();
    assert_eq!(
        other.get(&format!("/v2/{image}/blobs/{blob}")).body,
        spdx,
        "byte for byte"
    );

    let runs = registry.nix_runs();
    let never = sha256(b"never built");
    let empty = registry.get(&format!("/v2/shell/never/referrers/{never}"));
    assert_eq!(empty.status, 200);
    assert_eq!(empty.json()["manifests"], serde_json::json!([]));
    assert_eq!(registry.nix_runs(), runs, "asking builds nothing");
}

/// An image of a package whose `meta` holds JSON, HTML, junk license
/// identifiers and a `javascript:` homepage: both SBOMs validate, state
/// only valid license expressions and no such homepage, and `oras pull`
/// saves each document under its title.
#[test]
fn hostile_meta_gives_valid_documents_pulled_as_named_files() {
    let registry = Registry::start();
    let image = "hostile-meta";
    let (digest, _) = manifest(&registry, image);
    let folder = tempfile::tempdir().unwrap();
    let dir = folder.path().to_str().unwrap();
    let pulled = tool("python", &["-c", ORAS_PULL, &registry.address, image, &digest, dir]);
    let files: BTreeMap<String, Vec<String>> = serde_json::from_str(&pulled).unwrap();
    let expected: BTreeMap<String, Vec<String>> = [
        (SPDX, "sbom.spdx.json"),
        (CYCLONEDX, "sbom.cdx.json"),
        (IN_TOTO, "provenance.intoto.json"),
    ]
    .into_iter()
    .map(|(kind, file)| (kind.to_owned(), vec![file.to_owned()]))
    .collect();
    assert_eq!(files, expected, "each document saved under its title");
    let spdx_file = folder.path().join("sbom.spdx.json");
    let cyclonedx_file = folder.path().join("sbom.cdx.json");
    tool("pyspdxtools", &["-i", spdx_file.to_str().unwrap()]);
    tool("python", &["-c", CYCLONEDX_CHECK, cyclonedx_file.to_str().unwrap()]);

    for file in [&spdx_file, &cyclonedx_file] {
        let text = std::fs::read_to_string(file).unwrap();
        for hostile in ["javascript:", "<script", "</", "{\\\"", "\\\"license\\\""] {
            assert!(!text.contains(hostile), "{hostile:?} in {}:\n{text}", file.display());
        }
    }
    let spdx = read(spdx_file.to_str().unwrap());
    let package = (spdx["packages"].as_array().unwrap().iter())
        .find(|p| p["name"] == "hostile-meta")
        .unwrap();
    let junk = "LicenseRef-MIT-OR--script-alert-1---script-";
    let json = "LicenseRef---license----GPL-3.0-only--";
    assert_eq!(
        package["licenseDeclared"],
        format!("{junk} AND {json} AND Apache-2.0"),
        "what is no valid expression is a LicenseRef of its idstring characters"
    );
    assert_eq!(package.get("homepage"), None);
    let references: Vec<&str> = (spdx["hasExtractedLicensingInfos"].as_array().unwrap().iter())
        .map(|r| r["licenseId"].as_str().unwrap())
        .collect();
    assert_eq!(references, [json, junk], "each LicenseRef described once, sorted");

    let cyclonedx = read(cyclonedx_file.to_str().unwrap());
    let component = (cyclonedx["components"].as_array().unwrap().iter())
        .find(|c| c["name"] == "hostile-meta")
        .unwrap();
    assert_eq!(
        component["licenses"],
        serde_json::json!([
            { "license": { "name": junk } },
            { "license": { "name": json } },
            { "license": { "id": "Apache-2.0" } },
        ]),
        "license.id only for listed identifiers"
    );
    assert_eq!(component.get("externalReferences"), None);
}

/// The documents `subject` refers to: each artifact type and its one blob.
fn documents(registry: &Registry, image: &str, subject: &str) -> BTreeMap<String, String> {
    let referrers = registry.get(&format!("/v2/{image}/referrers/{subject}")).json();
    let mut found = BTreeMap::new();
    for descriptor in referrers["manifests"].as_array().unwrap() {
        let digest = descriptor["digest"].as_str().unwrap();
        let artifact = registry.get(&format!("/v2/{image}/manifests/{digest}")).json();
        let blob = artifact["layers"][0]["digest"].as_str().unwrap();
        found.insert(descriptor["artifactType"].as_str().unwrap().to_owned(), blob.to_owned());
    }
    found
}

#[test]
fn documents_name_the_image_as_asked_and_never_change_for_another_spelling() {
    let registry = Registry::start();
    let (digest, _) = manifest(&registry, "shell/hello");
    let first = documents(&registry, "shell/hello", &digest);
    let spdx = registry.get(&format!("/v2/shell/hello/blobs/{}", first[SPDX])).json();
    assert_eq!(spdx["name"], "shell/hello:latest", "named as asked");
    let blobs = || {
        std::fs::read_dir(registry.storage().join("blobs/sha256"))
            .unwrap()
            .count()
    };
    let before = blobs();
    // Another spelling: another image record, the same manifest.
    let (again, _) = manifest(&registry, "shell/hello.out");
    assert_eq!(again, digest, "the same image");
    assert_eq!(
        documents(&registry, "shell/hello.out", &digest),
        first,
        "the manifest keeps its documents"
    );
    assert_eq!(blobs(), before, "no documents are written for the other spelling");
}
