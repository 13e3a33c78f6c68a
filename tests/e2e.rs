//! End to end: `nixery serve` on a free loopback port with the shipped
//! package set and real Nix builds images that skopeo pulls, umoci unpacks
//! and run in a chroot; their blobs, caching and lookups. Needs root
//! (chroot) and the tools `scripts/setup.sh` installs.

mod common;

use std::io::Read;

use common::{Registry, run, sha256, skopeo_copy};

#[test]
fn pull_unpack_and_run_shell_hello() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("oci");
    let image = format!("docker://{}/shell/hello", registry.address);

    skopeo_copy(&image, &format!("oci:{}:latest", layout.display()));
    let runs_after_first_pull = registry.nix_runs();
    assert_eq!(runs_after_first_pull, 1, "one evaluation for one image");

    let bundle = work.path().join("bundle");
    run(
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{}:latest", layout.display()),
            bundle.to_str().unwrap(),
        ],
    );
    let rootfs = bundle.join("rootfs");
    let rootfs = rootfs.to_str().unwrap();
    assert_eq!(run("chroot", &[rootfs, "hello"]), "Hello, world!\n");
    assert_eq!(run("chroot", &[rootfs, "bash", "-c", "echo ok"]), "ok\n");
    assert_eq!(run("chroot", &[rootfs, "/bin/sh", "-c", "stat -c %a /tmp"]), "1777\n");
    assert_eq!(
        run("chroot", &[rootfs, "/usr/bin/env", "echo", "env works"]),
        "env works\n"
    );

    // A second pull is served from the cache: Nix does not run again.
    skopeo_copy(&image, &format!("oci:{}:again", layout.display()));
    assert_eq!(registry.nix_runs(), runs_after_first_pull);

    // Pull by digest.
    let digest = registry
        .get("/v2/shell/hello/manifests/latest")
        .header("docker-content-digest")
        .to_owned();
    let by_digest = format!("docker://{}/shell/hello@{digest}", registry.address);
    skopeo_copy(&by_digest, &format!("oci:{}:bydigest", layout.display()));
    assert_eq!(registry.nix_runs(), runs_after_first_pull);
}

#[test]
fn every_blob_matches_its_digest_and_diff_id() {
    let registry = Registry::start();
    let manifest = registry.get("/v2/shell/hello/git/manifests/latest");
    assert_eq!(manifest.status, 200);
    assert_eq!(
        manifest.header("content-type"),
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(manifest.header("docker-content-digest"), sha256(&manifest.body));
    assert_eq!(manifest.header("content-length"), manifest.body.len().to_string());
    let manifest_json = manifest.json();

    let config_digest = manifest_json["config"]["digest"].as_str().unwrap();
    let config = registry.get(&format!("/v2/shell/hello/git/blobs/{config_digest}"));
    assert_eq!(sha256(&config.body), config_digest);
    let config = config.json();
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["config"]["Cmd"], serde_json::json!(["bash"]));
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    let layers = manifest_json["layers"].as_array().unwrap();
    assert_eq!(layers.len(), diff_ids.len());
    assert!(layers.len() >= 3, "store paths are spread over layers");

    for (layer, diff_id) in layers.iter().zip(diff_ids) {
        let digest = layer["digest"].as_str().unwrap();
        let blob = registry.get(&format!("/v2/shell/hello/git/blobs/{digest}"));
        assert_eq!(blob.status, 200);
        assert_eq!(blob.header("docker-content-digest"), digest);
        assert_eq!(blob.body.len() as u64, layer["size"].as_u64().unwrap());
        assert_eq!(sha256(&blob.body), digest);
        let mut tar = Vec::new();
        flate2::read::MultiGzDecoder::new(&blob.body[..])
            .read_to_end(&mut tar)
            .unwrap();
        assert_eq!(sha256(&tar), diff_id.as_str().unwrap());
    }
}

#[test]
fn two_registries_build_the_same_image() {
    let (a, b) = (Registry::start(), Registry::start());
    let path = "/v2/shell/hello/manifests/latest";
    let (ma, mb) = (a.get(path), b.get(path));
    assert_eq!(ma.status, 200);
    assert_eq!(ma.header("docker-content-digest"), mb.header("docker-content-digest"));
    assert_eq!(ma.body, mb.body);
}

#[test]
fn missing_packages_are_named_in_a_404() {
    let registry = Registry::start();
    let response = registry.get("/v2/hello/nosuchpackage/othermissing/manifests/latest");
    assert_eq!(response.status, 404);
    assert_eq!(response.error_code(), "MANIFEST_UNKNOWN");
    let message = response.json()["errors"][0]["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("nosuchpackage") && message.contains("othermissing"),
        "{message}"
    );
    assert!(!message.contains("hello"), "found packages are not named: {message}");

    // As the user spelled them, not as the attributes they were tried as.
    let response = registry.get("/v2/nosuch.thing/c_plus_plus/manifests/latest");
    assert_eq!(response.status, 404);
    let message = response.json()["errors"][0]["message"].as_str().unwrap().to_owned();
    assert!(
        message.ends_with("find Nix packages: c_plus_plus, nosuch.thing"),
        "{message}"
    );

    let response = registry.get("/v2/tools/manifests/latest");
    assert_eq!(response.status, 404);
    assert_eq!(response.error_code(), "MANIFEST_UNKNOWN");
}

#[test]
fn package_lookup_follows_the_original() {
    let registry = Registry::start();
    for name in ["bashinteractive", "python3packages.numpy", "tools.jq", "7zip"] {
        let response = registry.get(&format!("/v2/{name}/manifests/latest"));
        assert_eq!(
            response.status,
            200,
            "{name}: {}",
            String::from_utf8_lossy(&response.body)
        );
    }
}

#[test]
fn learned_popularity_counts_built_images() {
    let registry = Registry::start_with(&[("NIXERY_LEARN_POPULARITY", "true")]);
    for image in ["shell/hello", "hello"] {
        assert_eq!(registry.get(&format!("/v2/{image}/manifests/latest")).status, 200);
    }
    let learned = std::fs::read(registry.storage().join("cache/popularity/learned")).unwrap();
    let counts: serde_json::Value = serde_json::from_slice(&learned).unwrap();
    let count = |prefix: &str| -> u64 {
        let (_, count) = counts
            .as_object()
            .unwrap()
            .iter()
            .find(|(id, _)| id.starts_with(prefix))
            .unwrap();
        count.as_u64().unwrap()
    };
    assert_eq!(count("hello-"), 2, "both images hold hello");
    assert_eq!(count("bash-interactive"), 1, "only shell/hello holds bash: {counts}");
}

#[test]
fn zstd_layers_for_oci_manifests_and_gzip_for_docker() {
    let registry = Registry::start_with(&[("NIXERY_COMPRESSION", "zstd")]);
    let path = "/v2/shell/hello/manifests/latest";
    let oci = common::request(
        "GET",
        &registry.url(path),
        &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
    )
    .json();
    let gzip_blobs = || {
        std::fs::read_dir(registry.storage().join("blobs/sha256"))
            .unwrap()
            .filter(|blob| {
                std::fs::read(blob.as_ref().unwrap().path())
                    .unwrap()
                    .starts_with(&[0x1f, 0x8b])
            })
            .count()
    };
    assert_eq!(gzip_blobs(), 0, "the Docker layer set waits for a Docker client");
    let docker = registry.get(path).json();
    assert_eq!(gzip_blobs(), docker["layers"].as_array().unwrap().len());
    assert_eq!(registry.nix_runs(), 2, "one evaluation per layer set");
    assert_eq!(
        oci["config"]["digest"], docker["config"]["digest"],
        "one config: same tar streams"
    );
    let config = registry.get(&format!(
        "/v2/shell/hello/blobs/{}",
        oci["config"]["digest"].as_str().unwrap()
    ));
    let diff_ids = config.json()["rootfs"]["diff_ids"].clone();
    for (manifest, media_type) in [
        (&oci, "application/vnd.oci.image.layer.v1.tar+zstd"),
        (&docker, "application/vnd.docker.image.rootfs.diff.tar.gzip"),
    ] {
        for (layer, diff_id) in manifest["layers"]
            .as_array()
            .unwrap()
            .iter()
            .zip(diff_ids.as_array().unwrap())
        {
            assert_eq!(layer["mediaType"], media_type);
            let blob = registry.get(&format!("/v2/shell/hello/blobs/{}", layer["digest"].as_str().unwrap()));
            assert_eq!(sha256(&blob.body), layer["digest"].as_str().unwrap());
            let tar = if media_type.ends_with("zstd") {
                zstd::stream::decode_all(&blob.body[..]).unwrap()
            } else {
                let mut tar = Vec::new();
                flate2::read::MultiGzDecoder::new(&blob.body[..])
                    .read_to_end(&mut tar)
                    .unwrap();
                tar
            };
            assert_eq!(sha256(&tar), diff_id.as_str().unwrap());
        }
    }
}

#[test]
fn builds_beyond_the_limit_wait_for_a_slot() {
    let registry = Registry::start_with(&[("NIXERY_MAX_BUILDS", "1")]);
    let requests: Vec<_> = ["shell/git", "shell/curl", "shell/htop"]
        .into_iter()
        .map(|image| {
            let url = registry.url(&format!("/v2/{image}/manifests/latest"));
            std::thread::spawn(move || common::request("GET", &url, &[]).status)
        })
        .collect();
    for request in requests {
        assert_eq!(request.join().unwrap(), 200);
    }
    let log = registry.log();
    let stages: Vec<&str> = log
        .lines()
        .filter_map(|line| {
            ["nix finished", "built image"]
                .into_iter()
                .find(|stage| line.contains(stage))
        })
        .collect();
    assert_eq!(
        stages,
        ["nix finished", "built image"].repeat(3),
        "one build at a time, each finished before the next starts"
    );
}
