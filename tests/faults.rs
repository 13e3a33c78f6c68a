//! Failing parts under a running registry: Nix killed in the middle of a
//! build, the storage folder removed in the middle of a build, a full
//! disk, and an index or a layer lost from storage. Each gives clients a
//! clear error (or none, when the registry can mend it), never a blob whose
//! bytes differ from its digest, and the registry recovers without a
//! restart; what was lost is made again byte for byte.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Registry, run, sha256};

/// Waits until the registry's log says Nix is building `slow`; the path of
/// its derivation.
fn building_slow(registry: &Registry) -> String {
    let started = Instant::now();
    loop {
        let log = registry.log();
        if let Some(at) = log.find("-slow-1.0.drv") {
            let start = log[..at].rfind("/nix/store/").expect("a store path");
            return log[start..at + "-slow-1.0.drv".len()].to_owned();
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the build starts:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Every blob in `storage` holds the bytes its name says; how many there are.
fn blobs_match(storage: &Path) -> usize {
    let dir = storage.join("blobs/sha256");
    let Ok(entries) = std::fs::read_dir(&dir) else { return 0 };
    let mut count = 0;
    for entry in entries {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_str().unwrap();
        assert_eq!(sha256(&bytes), format!("sha256:{name}"), "{}", path.display());
        count += 1;
    }
    count
}

/// A registry whose `slow` package builds until `gate` is dropped, with
/// `shell/hello` already built (its manifest in `hello`).
struct Gated {
    gate: tempfile::NamedTempFile,
    _set: tempfile::TempDir,
    registry: Registry,
    hello: common::Response,
}

impl Gated {
    fn start() -> Gated {
        let gate = tempfile::NamedTempFile::new().unwrap();
        let set = common::gated_package_set(gate.path());
        let registry = Registry::start_with(&[("NIXERY_PKGS_PATH", set.path().to_str().unwrap())]);
        let hello = registry.get("/v2/shell/hello/manifests/latest");
        assert_eq!(hello.status, 200);
        Gated {
            gate,
            _set: set,
            registry,
            hello,
        }
    }
}

fn request_in_background(registry: &Registry, path: &str) -> std::thread::JoinHandle<common::Response> {
    let url = registry.url(path);
    std::thread::spawn(move || common::request("GET", &url, &[]))
}

#[test]
fn nix_killed_mid_build_is_a_clear_error_and_the_next_pull_builds() {
    let gated = Gated::start();
    let (registry, hello) = (&gated.registry, &gated.hello);

    let pending = request_in_background(registry, "/v2/slow/manifests/latest");
    let drv = building_slow(registry);
    run("pkill", &["-KILL", "-f", &format!("nix-store --realise.*{drv}")]);
    let failed = pending.join().unwrap();
    assert_eq!(failed.status, 500);
    let message = failed.json()["errors"][0]["message"].as_str().unwrap().to_owned();
    assert_eq!(message, "Nix could not build slow: Nix was killed by a signal");

    drop(gated.gate);
    assert_eq!(registry.get("/v2/slow/manifests/latest").status, 200, "recovered");
    let again = registry.get("/v2/shell/hello/manifests/latest");
    assert_eq!(again.body, hello.body, "what was committed is still served");
    blobs_match(&registry.storage());
}

#[test]
fn storage_removed_mid_build_is_mended() {
    let gated = Gated::start();
    let (registry, hello) = (&gated.registry, &gated.hello);

    let pending = request_in_background(registry, "/v2/shell/slow/manifests/latest");
    building_slow(registry);
    std::fs::remove_dir_all(registry.storage()).unwrap();
    drop(gated.gate);
    let slow = pending.join().unwrap();
    assert_eq!(slow.status, 200, "{}", String::from_utf8_lossy(&slow.body));

    // shell/hello's records are in memory, its blobs are gone: it is built again.
    let again = registry.get("/v2/shell/hello/manifests/latest");
    assert_eq!(again.status, 200, "{}", String::from_utf8_lossy(&again.body));
    assert_eq!(again.body, hello.body, "the same bytes as before");
    let dir = tempfile::tempdir().unwrap();
    common::skopeo_copy(
        &format!("docker://{}/shell/hello", registry.address),
        &format!("oci:{}:latest", dir.path().join("oci").display()),
    );
    assert!(
        registry.storage().join("oci-layout").exists(),
        "the layout is written again"
    );
    assert!(blobs_match(&registry.storage()) > 0);
}

/// A tmpfs of `megabytes` at `dir`, unmounted when dropped.
struct Tmpfs<'a>(&'a Path);

impl<'a> Tmpfs<'a> {
    fn mount(dir: &'a Path, megabytes: u32) -> Self {
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={megabytes}m"),
                "tmpfs",
                dir.to_str().unwrap(),
            ],
        );
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

#[test]
fn a_full_disk_is_a_clear_error_and_leaves_no_wrong_blob() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    std::fs::create_dir(&storage).unwrap();
    let _tmpfs = Tmpfs::mount(&storage, 4);
    let registry = Registry::start_with(&[("STORAGE_PATH", storage.to_str().unwrap())]);
    // Leave a little room: less than shell/git's layers need.
    let filler = storage.join("filler");
    std::fs::write(&filler, vec![0u8; 3 << 20]).unwrap();

    let full = registry.get("/v2/shell/git/manifests/latest");
    assert_eq!(full.status, 503, "{}", String::from_utf8_lossy(&full.body));
    assert_eq!(full.error_code(), "UNAVAILABLE");
    let message = full.json()["errors"][0]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("No space left on device"), "{message}");
    blobs_match(&storage);
    // Layers packed beside the one that failed finish and clean up after themselves.
    let started = Instant::now();
    while std::fs::read_dir(storage.join("staging")).unwrap().count() > 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "no staged leftovers");
        std::thread::sleep(Duration::from_millis(50));
    }

    std::fs::remove_file(&filler).unwrap();
    let recovered = registry.get("/v2/shell/git/manifests/latest");
    assert_eq!(recovered.status, 200, "{}", String::from_utf8_lossy(&recovered.body));
    assert!(blobs_match(&storage) > 0);
}

/// A registry serving amd64 and arm64 (arm64 built offline, as in
/// `tests/multiarch.rs`) on the storage folder `storage`.
fn multi_arch_registry(storage: &Path) -> Registry {
    let nix_config = format!(
        "{}\nextra-platforms = aarch64-linux",
        std::env::var("NIX_CONFIG").unwrap_or_default()
    );
    Registry::start_with(&[
        ("NIXERY_ARCHITECTURES", "amd64,arm64"),
        ("NIX_CONFIG", &nix_config),
        ("STORAGE_PATH", storage.to_str().unwrap()),
    ])
}

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

fn blob_file(storage: &Path, digest: &str) -> std::path::PathBuf {
    storage
        .join("blobs/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
}

#[test]
fn a_lost_index_is_stored_again_without_a_build() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    let index_of = |registry: &Registry| {
        let index = common::request(
            "GET",
            &registry.url("/v2/hello/manifests/latest"),
            &[("Accept", OCI_INDEX)],
        );
        assert_eq!(index.status, 200, "{}", String::from_utf8_lossy(&index.body));
        (index.header("docker-content-digest").to_owned(), index.body)
    };
    let mut registry = multi_arch_registry(&storage);
    let (digest, bytes) = index_of(&registry);
    assert_eq!(registry.nix_runs(), 2, "one build per architecture");

    std::fs::remove_file(blob_file(&storage, &digest)).unwrap();
    assert_eq!(
        index_of(&registry),
        (digest.clone(), bytes.clone()),
        "the same index again"
    );
    assert_eq!(registry.nix_runs(), 2, "from the image records: no build");
    assert!(blob_file(&storage, &digest).exists());

    // A restarted registry trusts no record of an index it cannot find.
    registry.kill();
    std::fs::remove_file(blob_file(&storage, &digest)).unwrap();
    let restarted = multi_arch_registry(&storage);
    assert_eq!(index_of(&restarted), (digest, bytes));
    assert_eq!(restarted.nix_runs(), 0);
    blobs_match(&storage);
}

#[test]
fn a_lost_layer_is_built_again_byte_for_byte() {
    let registry = Registry::start();
    let manifest = registry.get("/v2/shell/hello/manifests/latest");
    let layers = manifest.json()["layers"].as_array().unwrap().clone();
    let digest = layers[layers.len() / 2]["digest"].as_str().unwrap().to_owned();
    let path = format!("/v2/shell/hello/blobs/{digest}");
    let bytes = registry.get(&path).body;
    std::fs::remove_file(blob_file(&registry.storage(), &digest)).unwrap();

    let lost = registry.get(&path);
    assert_eq!((lost.status, lost.error_code().as_str()), (404, "BLOB_UNKNOWN"));
    let runs = registry.nix_runs();
    let dir = tempfile::tempdir().unwrap();
    common::skopeo_copy(
        &format!("docker://{}/shell/hello", registry.address),
        &format!("oci:{}:latest", dir.path().join("oci").display()),
    );
    assert_eq!(registry.nix_runs(), runs + 1, "the image was built again");
    assert_eq!(registry.get("/v2/shell/hello/manifests/latest").body, manifest.body);
    let again = registry.get(&path);
    assert_eq!(again.status, 200);
    assert!(again.body == bytes, "the same bytes");
    blobs_match(&registry.storage());
}
