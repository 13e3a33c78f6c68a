//! What the serving fast paths must keep (the speed itself is measured by
//! `scripts/bench-serve.sh`, not here): blobs read from a folder in big
//! chunks come back exact, whole and by range across chunk boundaries;
//! HEAD answers like GET; conditional requests still give 304; the bytes
//! served are counted exactly; remembered answers follow a new revision;
//! and a bucket's blobs kept on local disk are the bucket's bytes, and go
//! when the bucket loses them.

mod common;

use common::buckets::ObjectServer;
use common::{Registry, package_set, request, sha256};
use object_store::ObjectStoreExt;
use object_store::path::Path as StorePath;

/// The largest layer of `image`: its digest and size.
fn largest_layer(registry: &Registry, image: &str) -> (String, u64) {
    let manifest = registry.get(&format!("/v2/{image}/manifests/latest"));
    assert_eq!(manifest.status, 200, "{}", String::from_utf8_lossy(&manifest.body));
    let manifest = manifest.json();
    let layer = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|l| l["size"].as_u64().unwrap())
        .unwrap()
        .clone();
    (
        layer["digest"].as_str().unwrap().to_owned(),
        layer["size"].as_u64().unwrap(),
    )
}

/// The registry's count of blob bytes served.
fn blob_bytes_served(registry: &Registry) -> u64 {
    let metrics = String::from_utf8(registry.get("/metrics").body).unwrap();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("nixery_bytes_served_total{kind=\"blob\"} "))
        .map_or(0, |v| v.parse::<f64>().unwrap() as u64)
}

#[test]
fn blobs_come_back_exact_whole_and_by_range_and_are_counted() {
    let registry = Registry::start();
    let (digest, size) = largest_layer(&registry, "shell/hello");
    let chunk = 64 * 1024;
    assert!(size > 2 * chunk, "a layer of several chunks: {size} bytes");
    let file = std::fs::read(registry.storage().join("blobs/sha256").join(&digest[7..])).unwrap();
    let url = registry.url(&format!("/v2/shell/hello/blobs/{digest}"));
    let before = blob_bytes_served(&registry);

    let whole = request("GET", &url, &[]);
    assert_eq!(whole.status, 200);
    assert_eq!(whole.body, file);
    assert_eq!(sha256(&whole.body), digest);
    let mut counted = size;

    let last = size - 1;
    for (range, start, end) in [
        (format!("bytes=0-{}", chunk - 1), 0, chunk),
        (format!("bytes={}-{}", chunk - 1, chunk), chunk - 1, chunk + 1),
        (format!("bytes={}-", 2 * chunk + 3), 2 * chunk + 3, size),
        ("bytes=-100".to_owned(), size - 100, size),
        (format!("bytes={last}-{}", last + 50), last, size),
    ] {
        let part = request("GET", &url, &[("Range", &range)]);
        assert_eq!(part.status, 206, "{range}");
        assert_eq!(
            part.header("content-range"),
            format!("bytes {start}-{}/{size}", end - 1)
        );
        assert_eq!(part.body, file[start as usize..end as usize], "{range}");
        counted += end - start;
    }

    let head = request("HEAD", &url, &[]);
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    for name in [
        "content-length",
        "content-type",
        "docker-content-digest",
        "etag",
        "accept-ranges",
    ] {
        assert_eq!(head.header(name), whole.header(name), "{name}");
    }
    let etag = whole.header("etag");
    let unchanged = request("GET", &url, &[("If-None-Match", etag), ("Range", "bytes=0-9")]);
    assert_eq!((unchanged.status, unchanged.body.len()), (304, 0));

    assert_eq!(
        blob_bytes_served(&registry) - before,
        counted,
        "every byte of every GET, nothing for HEAD or 304"
    );
}

#[test]
fn remembered_answers_follow_a_new_revision_of_the_package_set() {
    let dir = tempfile::tempdir().unwrap();
    let pkgs = dir.path().join("pkgs");
    package_set(&pkgs, "one");
    let registry = Registry::start_with(&[("NIXERY_PKGS_PATH", pkgs.to_str().unwrap())]);
    let first = registry.get("/v2/hello/manifests/latest");
    assert_eq!(first.status, 200);
    assert_eq!(
        registry.get("/v2/hello/manifests/latest").body,
        first.body,
        "answered again"
    );
    let runs = registry.nix_runs();

    package_set(&pkgs, "two");
    // The revision of a path is looked at again after a few seconds.
    let started = std::time::Instant::now();
    let changed = loop {
        let now = registry.get("/v2/hello/manifests/latest");
        assert_eq!(now.status, 200);
        if now.body != first.body {
            break now;
        }
        assert!(started.elapsed().as_secs() < 30, "the new revision is seen");
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert!(registry.nix_runs() > runs, "built for the new revision");
    let digest = changed.header("docker-content-digest");
    let head = request("HEAD", &registry.url("/v2/hello/manifests/latest"), &[]);
    assert_eq!(head.header("docker-content-digest"), digest, "HEAD follows too");
}

#[test]
fn a_buckets_blobs_are_kept_on_local_disk_and_the_bucket_stays_the_truth() {
    let server = ObjectServer::seaweedfs();
    let spool = tempfile::tempdir().unwrap();
    let mut env: Vec<(String, String)> = server.registry_env();
    env.push(("NIXERY_BLOB_REDIRECT".into(), "false".into()));
    env.push(("NIXERY_SPOOL_PATH".into(), spool.path().display().to_string()));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let registry = Registry::start_with(&env);
    let (digest, size) = largest_layer(&registry, "shell/hello");
    let url = registry.url(&format!("/v2/shell/hello/blobs/{digest}"));
    let kept = spool.path().join("blobs").join(&digest[7..]);

    let streamed = request("GET", &url, &[]);
    assert_eq!(streamed.status, 200);
    assert_eq!(sha256(&streamed.body), digest);
    assert_eq!(std::fs::read(&kept).unwrap(), streamed.body, "kept whole");
    let again = request("GET", &url, &[]);
    assert_eq!(again.body, streamed.body);
    let part = request("GET", &url, &[("Range", "bytes=10-19")]);
    assert_eq!(part.body, streamed.body[10..20]);
    assert_eq!(size, streamed.body.len() as u64);

    let store = server.store();
    let location = StorePath::from(format!("blobs/sha256/{}", &digest[7..]));
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(store.delete(&location)).unwrap();
    let lost = request("GET", &url, &[]);
    assert_eq!((lost.status, lost.error_code().as_str()), (404, "BLOB_UNKNOWN"));
}

/// The files the registry holds open.
fn open_files(registry: &Registry) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", registry.pid()))
        .unwrap()
        .count()
}

#[test]
fn blobs_asked_for_as_manifests_are_not_kept_open() {
    let registry = Registry::start();
    let mut blobs = std::collections::BTreeSet::new();
    for image in ["shell/hello", "shell/git", "python3", "tools.jq/zlib"] {
        let manifest = registry.get(&format!("/v2/{image}/manifests/latest")).json();
        blobs.insert(manifest["config"]["digest"].as_str().unwrap().to_owned());
        for layer in manifest["layers"].as_array().unwrap() {
            blobs.insert(layer["digest"].as_str().unwrap().to_owned());
        }
    }
    let before = open_files(&registry);
    for blob in &blobs {
        let response = registry.get(&format!("/v2/shell/hello/manifests/{blob}"));
        assert_eq!(response.status, 404, "{blob} is no manifest");
    }
    let after = open_files(&registry);
    println!(
        "{} blobs asked for as manifests: {before} open files before, {after} after",
        blobs.len()
    );
    assert!(after <= before + 2, "{before} open files before, {after} after");
}
