//! Multi-arch: a registry configured with `NIXERY_ARCHITECTURES=amd64,arm64`
//! resolves a tag to an OCI index or Docker manifest list, and skopeo picks
//! the arm64 image from it. The shipped package set is built for
//! aarch64-linux offline: Nix is told it may build for that platform
//! (`extra-platforms`), and the derivations' builders are host programs.

mod common;

use common::{Registry, Response, request, run};
use serde_json::{Value, json};

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

fn multi_arch_registry() -> Registry {
    let nix_config = format!(
        "{}\nextra-platforms = aarch64-linux",
        std::env::var("NIX_CONFIG").unwrap_or_default()
    );
    Registry::start_with(&[("NIXERY_ARCHITECTURES", "amd64,arm64"), ("NIX_CONFIG", &nix_config)])
}

fn get(registry: &Registry, path: &str, accept: &str) -> Response {
    let headers: &[(&str, &str)] = if accept.is_empty() { &[] } else { &[("Accept", accept)] };
    let response = request("GET", &registry.url(path), headers);
    assert_eq!(
        response.status,
        200,
        "{path}: {}",
        String::from_utf8_lossy(&response.body)
    );
    response
}

/// The architecture in the config of the manifest with this digest.
fn architecture_of(registry: &Registry, manifest_digest: &str) -> String {
    let manifest = get(registry, &format!("/v2/hello/manifests/{manifest_digest}"), "").json();
    let config = manifest["config"]["digest"].as_str().unwrap();
    let config = get(registry, &format!("/v2/hello/blobs/{config}"), "").json();
    config["architecture"].as_str().unwrap().to_owned()
}

fn platforms(index: &Value) -> Vec<Value> {
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["platform"].clone())
        .collect()
}

#[test]
fn tags_resolve_to_an_index_over_the_architectures() {
    let registry = multi_arch_registry();
    let containerd = format!("{DOCKER_MANIFEST}, {DOCKER_LIST}, {OCI_MANIFEST}, {OCI_INDEX}, */*");
    let index = get(&registry, "/v2/hello/manifests/latest", &containerd);
    assert_eq!(index.header("content-type"), OCI_INDEX);
    let index_json = index.json();
    assert_eq!(index_json["mediaType"], OCI_INDEX);
    assert_eq!(
        platforms(&index_json),
        [
            json!({"architecture": "amd64", "os": "linux"}),
            json!({"architecture": "arm64", "os": "linux", "variant": "v8"})
        ]
    );
    assert_eq!(registry.nix_runs(), 2, "one evaluation per architecture");
    let entries = index_json["manifests"].as_array().unwrap();
    for (entry, arch) in entries.iter().zip(["amd64", "arm64"]) {
        assert_eq!(entry["mediaType"], OCI_MANIFEST);
        let digest = entry["digest"].as_str().unwrap();
        let manifest = get(&registry, &format!("/v2/hello/manifests/{digest}"), OCI_MANIFEST);
        assert_eq!(manifest.header("content-type"), OCI_MANIFEST);
        assert_eq!(manifest.body.len() as u64, entry["size"].as_u64().unwrap());
        assert_eq!(architecture_of(&registry, digest), arch);
    }
    let by_digest = get(
        &registry,
        &format!("/v2/hello/manifests/{}", index.header("docker-content-digest")),
        "",
    );
    assert_eq!(by_digest.body, index.body);

    // Docker-only clients get a manifest list of Docker manifests.
    let list = get(
        &registry,
        "/v2/hello/manifests/latest",
        &format!("{DOCKER_MANIFEST}, {DOCKER_LIST}"),
    );
    assert_eq!(list.header("content-type"), DOCKER_LIST);
    let list_json = list.json();
    assert_eq!(platforms(&list_json), platforms(&index_json));
    assert!(
        list_json["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["mediaType"] == DOCKER_MANIFEST)
    );

    // Clients that read no index get the first architecture's manifest.
    let plain = get(&registry, "/v2/hello/manifests/latest", "");
    assert_eq!(plain.header("content-type"), DOCKER_MANIFEST);
    assert_eq!(
        plain.header("docker-content-digest"),
        list_json["manifests"][0]["digest"]
    );
    assert_eq!(
        registry.nix_runs(),
        2,
        "the index and both formats came from the same builds"
    );

    // The arm64 meta-package still pins one architecture.
    let pinned = get(&registry, "/v2/arm64/hello/manifests/latest", &containerd);
    assert_eq!(pinned.header("content-type"), OCI_MANIFEST);
    assert_eq!(
        pinned.header("docker-content-digest"),
        entries[1]["digest"].as_str().unwrap(),
        "arm64/hello is the index's arm64 image"
    );
}

#[test]
fn skopeo_picks_the_architecture_it_is_asked_for() {
    let registry = multi_arch_registry();
    let image = format!("docker://{}/hello:latest", registry.address);
    let index = get(&registry, "/v2/hello/manifests/latest", OCI_INDEX);
    let index_digest = index.header("docker-content-digest").to_owned();
    let index = index.json();
    for (arch, entry) in [("amd64", 0), ("arm64", 1)] {
        let inspected: Value = serde_json::from_str(&run(
            "skopeo",
            &["--override-arch", arch, "inspect", "--tls-verify=false", &image],
        ))
        .unwrap();
        assert_eq!(inspected["Architecture"], arch);
        assert_eq!(inspected["Digest"], index_digest, "skopeo reports the tag's digest");
        let chosen = index["manifests"][entry]["digest"].as_str().unwrap();
        let manifest = get(&registry, &format!("/v2/hello/manifests/{chosen}"), "").json();
        let layers: Vec<&Value> = manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| &l["digest"])
            .collect();
        assert_eq!(
            inspected["Layers"].as_array().unwrap().iter().collect::<Vec<_>>(),
            layers
        );
    }
    let work = tempfile::tempdir().unwrap();
    let layout = format!("oci:{}:arm", work.path().join("oci").display());
    run(
        "skopeo",
        &[
            "--override-arch",
            "arm64",
            "copy",
            "--src-tls-verify=false",
            &image,
            &layout,
        ],
    );
    let config = run("skopeo", &["inspect", "--config", &layout]);
    let config: Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["architecture"], "arm64");
}
