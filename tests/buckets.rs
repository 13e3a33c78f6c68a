//! The S3 and GCS storage backends against real object stores started here
//! on loopback (SeaweedFS and fake-gcs-server, see `common/buckets.rs`):
//! pulls with skopeo, blob redirects to presigned URLs that the client
//! follows to the store, two replicas sharing one bucket, a replica killed
//! in the middle of a build, and a store that goes away and comes back.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::buckets::{Kind, ObjectServer, retry_until};
use common::{Registry, sha256, skopeo_copy};
use futures::TryStreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt};

const IMAGE: &str = "shell/hello";

fn start_registry(server: &ObjectServer, extra: &[(&str, &str)]) -> Registry {
    let env = server.registry_env();
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    all.extend_from_slice(extra);
    Registry::start_with(&all)
}

/// A client that shows redirects instead of following them.
fn no_redirects() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The digests of the layers and config of `image`'s Docker manifest.
fn blob_digests(registry: &Registry, image: &str) -> Vec<String> {
    let manifest = registry.get(&format!("/v2/{image}/manifests/latest"));
    assert_eq!(manifest.status, 200, "{}", String::from_utf8_lossy(&manifest.body));
    let manifest = manifest.json();
    let mut digests = vec![manifest["config"]["digest"].as_str().unwrap().to_owned()];
    for layer in manifest["layers"].as_array().unwrap() {
        digests.push(layer["digest"].as_str().unwrap().to_owned());
    }
    digests
}

/// Every key in the bucket below `prefix`.
fn keys(store: &Arc<dyn ObjectStore>, prefix: &str) -> BTreeSet<String> {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        store
            .list(Some(&StorePath::from(prefix)))
            .map_ok(|meta| meta.location.to_string())
            .try_collect()
            .await
            .unwrap()
    })
}

/// Checks that every blob in the bucket holds the bytes its address names,
/// and returns how many there are.
fn assert_blobs_match_their_addresses(store: &Arc<dyn ObjectStore>) -> usize {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let blobs = keys(store, "blobs/sha256");
    for key in &blobs {
        let bytes = runtime.block_on(async {
            store
                .get(&StorePath::from(key.as_str()))
                .await
                .unwrap()
                .bytes()
                .await
                .unwrap()
        });
        let hex = key.rsplit('/').next().unwrap();
        assert_eq!(sha256(&bytes), format!("sha256:{hex}"), "{key} holds other bytes");
    }
    blobs.len()
}

/// Pulls through `registry` with skopeo, which checks every digest.
fn pull(registry: &Registry, image: &str) {
    let dir = tempfile::tempdir().unwrap();
    let layout = format!("oci:{}:latest", dir.path().join("image").display());
    skopeo_copy(&format!("docker://{}/{image}", registry.address), &layout);
}

/// A blob GET is a 307 to a presigned URL of the store, which serves it.
fn assert_blob_redirects_to_the_store(registry: &Registry, server: &ObjectServer, digest: &str) {
    let client = no_redirects();
    let response = client
        .get(registry.url(&format!("/v2/{IMAGE}/blobs/{digest}")))
        .send()
        .unwrap();
    assert_eq!(response.status().as_u16(), 307);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&server.endpoint), "{location}");
    let signature = match server.kind {
        Kind::S3 => "X-Amz-Signature=",
        Kind::Gcs => "X-Goog-Signature=",
    };
    assert!(location.contains(signature), "presigned: {location}");
    let blob = client.get(&location).send().unwrap();
    assert_eq!(blob.status().as_u16(), 200);
    assert_eq!(sha256(&blob.bytes().unwrap()), digest);
    // HEAD is answered by the registry itself.
    let head = client
        .head(registry.url(&format!("/v2/{IMAGE}/blobs/{digest}")))
        .send()
        .unwrap();
    assert_eq!(head.status().as_u16(), 200);
}

/// Replica A builds `IMAGE` and serves its blobs by redirect; replica B,
/// which streams blobs, serves the same image from the shared records
/// without Nix. Checks both, and the bucket; returns them and the digests.
fn two_replicas(server: &ObjectServer) -> (Registry, Registry, Vec<String>) {
    let a = start_registry(server, &[]);
    pull(&a, IMAGE);
    let digests = blob_digests(&a, IMAGE);
    assert_blob_redirects_to_the_store(&a, server, &digests[1]);

    let store = server.store();
    let layout = keys(&store, "");
    assert!(
        layout.contains("oci-layout") && layout.contains("index.json"),
        "{layout:?}"
    );
    assert!(keys(&store, "staging").is_empty(), "staging is emptied after commits");
    for digest in &digests {
        assert!(layout.contains(&format!("blobs/sha256/{}", &digest[7..])));
    }
    assert_blobs_match_their_addresses(&store);

    let b = start_registry(server, &[("NIXERY_BLOB_REDIRECT", "false")]);
    let started = Instant::now();
    pull(&b, IMAGE);
    eprintln!("warm pull through replica B: {:?}", started.elapsed());
    assert_eq!(blob_digests(&b, IMAGE), digests);
    assert_eq!(b.nix_runs(), 0, "replica B ran no Nix");

    // A missing blob is a 404, never an empty 200, in both modes.
    let missing = format!("/v2/{IMAGE}/blobs/sha256:{}", "0".repeat(64));
    for registry in [&a, &b] {
        let response = registry.get(&missing);
        assert_eq!((response.status, response.error_code().as_str()), (404, "BLOB_UNKNOWN"));
    }
    (a, b, digests)
}

#[test]
fn s3_redirects_and_a_second_replica_serves_without_nix() {
    let server = ObjectServer::seaweedfs();
    let (_a, b, digests) = two_replicas(&server);
    let layer_path = format!("/v2/{IMAGE}/blobs/{}", digests[1]);
    let layer = b.get(&layer_path);
    assert_eq!(layer.status, 200);
    assert_eq!(sha256(&layer.body), digests[1]);
    let part = common::request("GET", &b.url(&layer_path), &[("Range", "bytes=10-19")]);
    assert_eq!(part.status, 206);
    assert_eq!(part.body, layer.body[10..20]);
}

#[test]
fn gcs_redirects_and_a_second_replica_serves_without_nix() {
    two_replicas(&ObjectServer::fake_gcs());
}

/// Starts a build of `image` and kills the registry (SIGKILL) `delay` after
/// Nix finished, with the store frozen meanwhile when `freeze` is set.
fn kill_mid_build(server: &ObjectServer, image: &str, delay: Duration, freeze: bool) {
    let mut registry = start_registry(server, &[]);
    let url = registry.url(&format!("/v2/{image}/manifests/latest"));
    std::thread::spawn(move || {
        let _ = reqwest::blocking::Client::new().get(url).send();
    });
    retry_until("Nix finishes", || registry.log().contains("nix finished"));
    let frozen = freeze.then(|| server.pause());
    std::thread::sleep(delay);
    registry.kill();
    drop(frozen);
}

#[test]
fn a_replica_killed_mid_build_leaves_no_wrong_blob() {
    let server = ObjectServer::seaweedfs();
    // Killed at different moments of packing and uploading, and once while
    // the store hangs.
    let kills = [
        ("shell/git", 0, false),
        ("shell/curl", 20, false),
        ("shell/htop", 60, false),
        ("shell/python3packages.numpy", 120, false),
        ("shell/nano", 300, true),
    ];
    for (image, delay, freeze) in kills {
        kill_mid_build(&server, image, Duration::from_millis(delay), freeze);
    }
    let store = server.store();
    let blobs = assert_blobs_match_their_addresses(&store);
    eprintln!(
        "killed replicas left {blobs} blobs and {} staging objects",
        keys(&store, "staging").len()
    );

    let restarted = start_registry(&server, &[]);
    for (image, _, _) in kills {
        pull(&restarted, image);
    }
    assert_blobs_match_their_addresses(&store);
}

#[test]
fn an_unreachable_store_gives_503_and_the_registry_recovers() {
    let mut server = ObjectServer::seaweedfs();
    let registry = start_registry(&server, &[("NIXERY_BLOB_REDIRECT", "false")]);
    let digests = blob_digests(&registry, IMAGE);
    let layer = format!("/v2/{IMAGE}/blobs/{}", digests[1]);

    server.kill();
    let started = Instant::now();
    for path in [layer.as_str(), "/v2/shell/git/manifests/latest"] {
        let response = registry.get(path);
        assert_eq!(response.status, 503, "{path}");
        assert_eq!(response.error_code(), "UNAVAILABLE");
        assert!(response.header("retry-after").parse::<u32>().is_ok());
    }
    assert!(started.elapsed() < Duration::from_secs(30), "errors come quickly");

    server.restart();
    retry_until("the registry serves again", || registry.get(&layer).status == 200);
    assert_eq!(sha256(&registry.get(&layer).body), digests[1]);
    pull(&registry, "shell/git");
}
