//! The pull side of the OCI distribution-spec conformance suite (legacy
//! v1.1.1 "Pull" workflow and the read-only checks of the redesigned suite),
//! run against a real `nixery serve`, plus the rest of the read API: content
//! negotiation, tags/list with pagination, referrers, refused writes, and
//! HEAD answered from the cache.

mod common;

use common::{Registry, Response, request, sha256};
use serde_json::Value;

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// The suite's repository: a small image that builds.
const REPO: &str = "hello";

/// A digest nothing in the registry has.
fn random_digest() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    sha256(nanos.to_string().as_bytes())
}

fn head(registry: &Registry, path: &str, accept: &[(&str, &str)]) -> Response {
    request("HEAD", &registry.url(path), accept)
}

fn get(registry: &Registry, path: &str, accept: &[(&str, &str)]) -> Response {
    request("GET", &registry.url(path), accept)
}

/// A 200 with the headers a manifest or blob response must carry, and a
/// body (GET) or none (HEAD) of the length announced.
fn assert_content(response: &Response, digest: &str, head: bool) {
    assert_eq!(response.status, 200, "{}", String::from_utf8_lossy(&response.body));
    assert_eq!(response.header("docker-content-digest"), digest);
    assert_eq!(response.header("etag"), format!("\"{digest}\""));
    if head {
        assert!(response.body.is_empty(), "HEAD has no body");
    } else {
        assert_eq!(response.header("content-length"), response.body.len().to_string());
        assert_eq!(sha256(&response.body), digest);
    }
}

/// The spec's error envelope: `{"errors":[{"code","message","detail"?}]}`
/// with a code from the spec's list.
fn assert_error(response: &Response, status: u16, code: &str) {
    assert_eq!(response.status, status, "{}", String::from_utf8_lossy(&response.body));
    assert_eq!(response.header("content-type"), "application/json");
    let body = response.json();
    let errors = body["errors"].as_array().expect("an errors array");
    assert!(!errors.is_empty());
    for error in errors {
        let keys: Vec<&String> = error.as_object().unwrap().keys().collect();
        assert!(
            keys.iter().all(|k| ["code", "message", "detail"].contains(&k.as_str())),
            "{keys:?}"
        );
        assert!(error["message"].is_string());
    }
    assert_eq!(errors[0]["code"], code);
}

#[test]
fn pull_workflow() {
    let registry = Registry::start();
    let oci = [("Accept", OCI_MANIFEST)];

    // Ping.
    let ping = get(&registry, "/v2/", &[]);
    assert_eq!(ping.status, 200);
    assert_eq!(ping.header("docker-distribution-api-version"), "registry/2.0");

    // Manifest by tag, then by digest, GET and HEAD.
    let by_tag = get(&registry, &format!("/v2/{REPO}/manifests/latest"), &oci);
    let digest = by_tag.header("docker-content-digest").to_owned();
    assert_content(&by_tag, &digest, false);
    assert_eq!(by_tag.header("content-type"), OCI_MANIFEST);
    let head_tag = head(&registry, &format!("/v2/{REPO}/manifests/latest"), &oci);
    assert_content(&head_tag, &digest, true);
    assert_eq!(head_tag.header("content-length"), by_tag.body.len().to_string());
    assert_eq!(head_tag.header("content-type"), OCI_MANIFEST);
    for response in [
        get(&registry, &format!("/v2/{REPO}/manifests/{digest}"), &oci),
        head(&registry, &format!("/v2/{REPO}/manifests/{digest}"), &oci),
    ] {
        let is_head = response.body.is_empty();
        assert_content(&response, &digest, is_head);
        assert_eq!(response.header("content-type"), OCI_MANIFEST);
        assert_eq!(response.header("content-length"), by_tag.body.len().to_string());
    }

    // Blobs, GET and HEAD, and a range of one.
    let manifest = by_tag.json();
    let config = manifest["config"]["digest"].as_str().unwrap();
    for response in [
        get(&registry, &format!("/v2/{REPO}/blobs/{config}"), &[]),
        head(&registry, &format!("/v2/{REPO}/blobs/{config}"), &[]),
    ] {
        let is_head = response.body.is_empty();
        assert_content(&response, config, is_head);
        assert_eq!(
            response.header("content-length"),
            manifest["config"]["size"].to_string()
        );
    }
    let layer = manifest["layers"][0]["digest"].as_str().unwrap();
    let whole = get(&registry, &format!("/v2/{REPO}/blobs/{layer}"), &[]);
    assert!(whole.body.len() > 1500, "a layer big enough for the suite's range");
    let ranged = get(
        &registry,
        &format!("/v2/{REPO}/blobs/{layer}"),
        &[("Range", "bytes=500-1499")],
    );
    assert_eq!(ranged.status, 206);
    assert_eq!(ranged.body, whole.body[500..1500]);
    assert_eq!(ranged.header("content-length"), "1000");
    assert_eq!(
        ranged.header("content-range"),
        format!("bytes 500-1499/{}", whole.body.len())
    );
    let beyond = format!("bytes={}-", whole.body.len());
    let unsatisfiable = get(&registry, &format!("/v2/{REPO}/blobs/{layer}"), &[("Range", &beyond)]);
    assert_error(&unsatisfiable, 416, "RANGE_INVALID");

    // What is not there: 404s with the right codes, fast and without Nix.
    let runs = registry.nix_runs();
    let missing = random_digest();
    assert_error(
        &get(&registry, &format!("/v2/{REPO}/blobs/{missing}"), &[]),
        404,
        "BLOB_UNKNOWN",
    );
    let head_missing = head(&registry, &format!("/v2/{REPO}/blobs/{missing}"), &[]);
    assert_eq!(head_missing.status, 404);
    assert!(head_missing.body.is_empty());
    for reference in [missing.as_str(), ".INVALID_MANIFEST_NAME", "missing-q8cnhq3xsp"] {
        let path = format!("/v2/{REPO}/manifests/{reference}");
        assert_error(&get(&registry, &path, &oci), 404, "MANIFEST_UNKNOWN");
        assert_eq!(head(&registry, &path, &oci).status, 404, "{reference}");
    }
    assert_error(
        &get(&registry, &format!("/v2/{REPO}/manifests/sha256:totallywrong"), &oci),
        400,
        "DIGEST_INVALID",
    );
    assert_error(&get(&registry, "/v2/Hello/manifests/latest", &oci), 400, "NAME_INVALID");
    assert_error(
        &get(&registry, &format!("/v2/Hello/blobs/{missing}"), &[]),
        400,
        "NAME_INVALID",
    );
    assert_eq!(registry.nix_runs(), runs, "nothing above needed Nix");
}

#[test]
fn accept_decides_the_format_and_both_are_servable_by_digest() {
    let registry = Registry::start();
    let path = "/v2/shell/hello/manifests/latest";
    let docker = get(&registry, path, &[]);
    assert_eq!(docker.header("content-type"), DOCKER_MANIFEST);
    assert_eq!(docker.header("vary"), "Accept");
    let wildcard = get(&registry, path, &[("Accept", "*/*")]);
    assert_eq!(wildcard.body, docker.body);
    let oci = get(&registry, path, &[("Accept", OCI_MANIFEST)]);
    assert_eq!(oci.header("content-type"), OCI_MANIFEST);
    let containerd = get(
        &registry,
        path,
        &[(
            "Accept",
            &format!("{DOCKER_MANIFEST}, {OCI_MANIFEST}, {OCI_INDEX}, */*"),
        )],
    );
    assert_eq!(containerd.body, oci.body, "OCI is preferred when both are accepted");
    assert_eq!(registry.nix_runs(), 1, "one build serves both formats");

    let (docker_json, oci_json) = (docker.json(), oci.json());
    assert_eq!(docker_json["mediaType"], DOCKER_MANIFEST);
    assert_eq!(oci_json["mediaType"], OCI_MANIFEST);
    assert_eq!(docker_json["config"]["mediaType"], DOCKER_CONFIG);
    assert_eq!(oci_json["config"]["mediaType"], OCI_CONFIG);
    assert_eq!(docker_json["config"]["digest"], oci_json["config"]["digest"]);
    let layer_types = |m: &Value, t: &str| m["layers"].as_array().unwrap().iter().all(|l| l["mediaType"] == t);
    assert!(layer_types(&docker_json, DOCKER_LAYER));
    assert!(layer_types(&oci_json, OCI_LAYER));

    let (docker_digest, oci_digest) = (
        docker.header("docker-content-digest"),
        oci.header("docker-content-digest"),
    );
    assert_ne!(docker_digest, oci_digest);
    for (digest, bytes, media_type) in [
        (docker_digest, &docker.body, DOCKER_MANIFEST),
        (oci_digest, &oci.body, OCI_MANIFEST),
    ] {
        // A digest names one document, whatever the client accepts.
        let by_digest = get(
            &registry,
            &format!("/v2/shell/hello/manifests/{digest}"),
            &[("Accept", DOCKER_MANIFEST)],
        );
        assert_eq!((&by_digest.body, by_digest.header("content-type")), (bytes, media_type));
    }

    let preferring_docker = Registry::start_with(&[("NIXERY_MANIFEST_FORMAT", "docker")]);
    let both = format!("{OCI_MANIFEST}, {DOCKER_MANIFEST}");
    let response = get(&preferring_docker, path, &[("Accept", &both)]);
    assert_eq!(
        response.body, docker.body,
        "same image, same bytes, on another registry"
    );
}

#[test]
fn head_is_answered_from_the_cache_and_shares_builds() {
    let registry = Registry::start();
    let url = registry.url("/v2/shell/hello/manifests/latest");
    let (first_head, first_get) = std::thread::scope(|s| {
        let head = s.spawn(|| request("HEAD", &url, &[]));
        let get = s.spawn(|| request("GET", &url, &[]));
        (head.join().unwrap(), get.join().unwrap())
    });
    assert_eq!(registry.nix_runs(), 1, "concurrent HEAD and GET run one build");
    let digest = first_get.header("docker-content-digest");
    assert_content(&first_head, digest, true);
    assert_content(&first_get, digest, false);

    let again = request("HEAD", &url, &[]);
    assert_content(&again, digest, true);
    assert_eq!(again.header("content-length"), first_get.body.len().to_string());
    assert_eq!(registry.nix_runs(), 1, "a cached HEAD runs no Nix");
}

#[test]
fn conditional_requests_get_304_for_what_the_client_has() {
    let registry = Registry::start();
    let path = "/v2/hello/manifests/latest";
    let manifest = get(&registry, path, &[]);
    let etag = manifest.header("etag").to_owned();
    let digest = manifest.header("docker-content-digest").to_owned();
    for headers in [
        vec![("If-None-Match", etag.as_str())],
        vec![("If-None-Match", "\"sha256:0\", *")],
    ] {
        let unchanged = get(&registry, path, &headers);
        assert_eq!(unchanged.status, 304);
        assert!(unchanged.body.is_empty());
        assert_eq!(unchanged.header("docker-content-digest"), digest);
        assert_eq!(unchanged.header("etag"), etag);
    }
    let changed = get(&registry, path, &[("If-None-Match", "\"sha256:0\"")]);
    assert_content(&changed, &digest, false);

    let layer = manifest.json()["layers"][0]["digest"].as_str().unwrap().to_owned();
    let blob_etag = format!("\"{layer}\"");
    let blob = get(
        &registry,
        &format!("/v2/hello/blobs/{layer}"),
        &[("If-None-Match", &blob_etag)],
    );
    assert_eq!((blob.status, blob.body.len()), (304, 0));
}

#[test]
fn tags_list_and_referrers() {
    let registry = Registry::start();
    let tags = get(&registry, "/v2/shell/hello/tags/list", &[]);
    assert_eq!(tags.status, 200);
    assert_eq!(tags.header("content-type"), "application/json");
    assert_eq!(
        tags.json(),
        serde_json::json!({"name": "shell/hello", "tags": ["latest"]})
    );
    let empty = get(&registry, "/v2/shell/hello/tags/list?n=0", &[]);
    assert_eq!(empty.json()["tags"], serde_json::json!([]));
    let after = get(&registry, "/v2/shell/hello/tags/list?last=latest", &[]);
    assert_eq!(after.json()["tags"], serde_json::json!([]));
    assert!(after.headers.get("link").is_none());
    assert_error(
        &get(&registry, "/v2/shell/hello/tags/list?n=-1", &[]),
        400,
        "PAGINATION_NUMBER_INVALID",
    );
    assert_error(&get(&registry, "/v2/BAD/tags/list", &[]), 400, "NAME_INVALID");

    let referrers = get(&registry, &format!("/v2/hello/referrers/{}", random_digest()), &[]);
    assert_eq!(referrers.status, 200);
    assert_eq!(referrers.header("content-type"), OCI_INDEX);
    assert_eq!(
        referrers.json(),
        serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
    );
    let filtered = get(
        &registry,
        &format!("/v2/hello/referrers/{}?artifactType=application/x", random_digest()),
        &[],
    );
    assert_eq!(filtered.header("oci-filters-applied"), "artifactType");
    assert_error(
        &get(&registry, "/v2/hello/referrers/sha256:nope", &[]),
        400,
        "DIGEST_INVALID",
    );
    assert_eq!(registry.nix_runs(), 0);
}

#[test]
fn writes_are_refused_and_unknown_routes_are_json_404s() {
    let registry = Registry::start();
    for (method, path) in [
        ("POST", "/v2/hello/blobs/uploads/"),
        ("PATCH", "/v2/hello/blobs/uploads/x"),
        ("PUT", "/v2/hello/blobs/uploads/x?digest=sha256:00"),
        ("PUT", "/v2/hello/manifests/latest"),
        ("DELETE", "/v2/hello/manifests/latest"),
        ("DELETE", &format!("/v2/hello/blobs/{}", random_digest())),
    ] {
        let response = request(method, &registry.url(path), &[]);
        assert_error(&response, 405, "UNSUPPORTED");
        assert_eq!(response.header("allow"), "GET, HEAD", "{method} {path}");
    }
    for path in ["/v2/_catalog", "/v2/hello/tags/all", "/v2/hello/uploads/x", "/v2/x"] {
        assert_error(&get(&registry, path, &[]), 404, "UNSUPPORTED");
    }
    assert_eq!(registry.nix_runs(), 0);
}

/// A git repository holding the package set, with two branches and a tag.
fn package_repository() -> tempfile::TempDir {
    let repo = tempfile::tempdir().unwrap();
    let git = |args: &[&str]| common::git(repo.path(), args);
    git(&["init", "-q"]);
    let pkgs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pkgs/default.nix");
    std::fs::copy(pkgs, repo.path().join("default.nix")).unwrap();
    git(&["add", "default.nix"]);
    git(&["commit", "-q", "-m", "packages"]);
    git(&["tag", "-a", "v1", "-m", "one"]);
    git(&["branch", "dev"]);
    git(&["branch", "feature.x"]);
    repo
}

#[test]
fn git_tags_are_listed_paginated_and_resolved_without_nix() {
    let repo = package_repository();
    let url = format!("file://{}", repo.path().display());
    let registry = Registry::start_with(&[("NIXERY_PKGS_PATH", ""), ("NIXERY_PKGS_REPO", &url)]);

    let all = get(&registry, "/v2/hello/tags/list", &[]);
    assert_eq!(
        all.json()["tags"],
        serde_json::json!(["dev", "feature.x", "latest", "main", "v1"])
    );
    let first = get(&registry, "/v2/hello/tags/list?n=2", &[]);
    assert_eq!(first.json()["tags"], serde_json::json!(["dev", "feature.x"]));
    assert_eq!(
        first.header("link"),
        "</v2/hello/tags/list?n=2&last=feature.x>; rel=\"next\""
    );
    let last = get(&registry, "/v2/hello/tags/list?n=2&last=main", &[]);
    assert_eq!(last.json()["tags"], serde_json::json!(["v1"]));
    assert!(last.headers.get("link").is_none());

    assert_error(
        &get(&registry, "/v2/hello/manifests/nosuchbranch", &[]),
        404,
        "MANIFEST_UNKNOWN",
    );
    assert_eq!(registry.nix_runs(), 0, "an unknown branch needs no Nix");

    // A branch and a tag build from the repository and are the same image.
    let dev = get(&registry, "/v2/hello/manifests/dev", &[]);
    assert_eq!(dev.status, 200, "{}", String::from_utf8_lossy(&dev.body));
    let v1 = get(&registry, "/v2/hello/manifests/v1", &[]);
    assert_eq!(v1.body, dev.body);
    let runs = registry.nix_runs();
    let again = get(&registry, "/v2/hello/manifests/dev", &[]);
    assert_eq!(again.body, dev.body);
    assert_eq!(registry.nix_runs(), runs, "a branch's commit is cached");
}
