//! Retention: when each image was last pulled or built, as storage records
//! it for every replica (`cache/pulled/<image key>`): written by a build at
//! once, by pulls only in batches, and by a registry that stops. Then, on
//! a folder, SeaweedFS and fake-gcs-server (`store.rs`): `nixery gc` over
//! three revisions of a git package source, a collection while another
//! replica builds and pulls, collections killed at several steps, and one
//! build per image across two replicas, also when the builder dies.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::buckets::ObjectServer;
use common::store::{self, Store};
use common::{Registry, git, package_set};

const HELLO: &str = "/v2/shell/hello/manifests/latest";
/// A last pull long ago.
const LONG_AGO: u64 = 1000;

fn folder(storage: &Path) -> PathBuf {
    storage.join("cache/pulled")
}

/// Each image's recorded last pull, by image key.
fn records(storage: &Path) -> Vec<(String, u64)> {
    let Ok(entries) = std::fs::read_dir(folder(storage)) else {
        return vec![];
    };
    let mut records: Vec<(String, u64)> = entries
        .map(|entry| {
            let entry = entry.unwrap();
            let record: serde_json::Value = serde_json::from_slice(&std::fs::read(entry.path()).unwrap()).unwrap();
            let at = record["at"].as_u64().expect("unix seconds");
            (entry.file_name().into_string().unwrap(), at)
        })
        .collect();
    records.sort();
    records
}

fn set_pulled(storage: &Path, key: &str, at: u64) {
    std::fs::write(folder(storage).join(key), format!(r#"{{"at":{at}}}"#)).unwrap();
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// The one image's key, once its build has recorded it.
fn built_image(registry: &Registry) -> String {
    let started = now();
    assert_eq!(registry.get(HELLO).status, 200);
    let records = records(&registry.storage());
    assert_eq!(records.len(), 1, "the build recorded its image: {records:?}");
    assert!(records[0].1 >= started, "at the time of the build");
    records[0].0.clone()
}

/// Sets the image's record long ago, then pulls it `times`; when.
fn age_then_pull(registry: &Registry, key: &str, times: usize) -> u64 {
    set_pulled(&registry.storage(), key, LONG_AGO);
    // The last write was in an earlier second than these pulls.
    std::thread::sleep(Duration::from_millis(1100));
    let pulled = now();
    for _ in 0..times {
        assert_eq!(registry.get(HELLO).status, 200);
    }
    pulled
}

#[test]
fn pulls_are_recorded_in_batches_not_one_write_each() {
    let registry = Registry::start_with(&[("NIXERY_PULL_RECORD_INTERVAL", "2")]);
    let storage = registry.storage();
    let key = built_image(&registry);
    let pulled = age_then_pull(&registry, &key, 20);
    let deadline = Instant::now() + Duration::from_secs(10);
    while records(&storage)[0].1 == LONG_AGO {
        assert!(Instant::now() < deadline, "the pulls were never recorded");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(records(&storage)[0].1 >= pulled);
    assert_eq!(records(&storage).len(), 1, "one record per image");
}

#[test]
fn a_pull_writes_nothing_itself_and_a_stop_writes_what_was_pulled() {
    let mut registry = Registry::start();
    let storage = registry.storage();
    let key = built_image(&registry);
    let pulled = age_then_pull(&registry, &key, 5);
    assert_eq!(
        records(&storage),
        [(key.clone(), LONG_AGO)],
        "within the hour, pulls are only noted in memory"
    );
    registry.terminate();
    assert!(registry.wait().success());
    let records = records(&storage);
    assert_eq!(records[0].0, key);
    assert!(records[0].1 >= pulled, "written when the registry stopped: {records:?}");
}

#[test]
fn serve_collects_garbage_at_its_interval_and_shows_it() {
    let registry = Registry::start_with(&[
        ("NIXERY_GC_INTERVAL", "3s"),
        ("NIXERY_GC_GRACE", "0s"),
        ("NIXERY_GC_KEEP_PULLED_WITHIN", "1h"),
    ]);
    let storage = registry.storage();
    let key = built_image(&registry);
    let image = storage.join("cache/images").join(&key);
    assert!(image.exists());
    set_pulled(&storage, &key, LONG_AGO);
    let deadline = Instant::now() + Duration::from_secs(60);
    while image.exists() {
        assert!(Instant::now() < deadline, "serve never collected the aged image");
        std::thread::sleep(Duration::from_millis(200));
    }
    let shown = || String::from_utf8(registry.get("/").body).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !shown().contains("s ago: deleted") {
        assert!(
            Instant::now() < deadline,
            "the landing page never showed the collection:\n{}",
            shown()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let page = shown();
    assert!(page.contains("objects,"), "{page}");
    let metrics = String::from_utf8(registry.get("/metrics").body).unwrap();
    let last_run = metrics.lines().find_map(|l| {
        l.strip_prefix("nixery_gc_last_run_timestamp_seconds ")?
            .parse::<u64>()
            .ok()
    });
    assert!(last_run.unwrap() >= now() - 60, "{metrics}");
    assert!(registry.log().contains("garbage collected"), "{}", registry.log());
    let again = reqwest::blocking::Client::new()
        .get(registry.url(HELLO))
        .timeout(Duration::from_secs(20))
        .send();
    assert!(
        again.is_ok_and(|r| r.status() == 200),
        "built again after its collection:\n{}",
        registry.log()
    );
}

#[test]
fn collection_on_a_folder() {
    collection(&Store::folder());
}

#[test]
fn collection_on_seaweedfs() {
    collection(&Store::bucket(ObjectServer::seaweedfs()));
}

#[test]
fn collection_on_fake_gcs() {
    collection(&Store::bucket(ObjectServer::fake_gcs()));
}

#[test]
fn one_build_per_image_across_replicas_on_a_folder() {
    replicas(&Store::folder());
}

#[test]
fn one_build_per_image_across_replicas_on_seaweedfs() {
    replicas(&Store::bucket(ObjectServer::seaweedfs()));
}

#[test]
fn one_build_per_image_across_replicas_on_fake_gcs() {
    replicas(&Store::bucket(ObjectServer::fake_gcs()));
}

/// A git repository whose tags `v1`, `v2`, `v3` are package sets whose
/// `hello` differs; the registry settings that serve it.
fn three_revisions() -> (tempfile::TempDir, Vec<(String, String)>) {
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    for version in ["v1", "v2", "v3"] {
        package_set(repo.path(), &format!("Hello from {version}"));
        git(repo.path(), &["add", "default.nix"]);
        git(repo.path(), &["commit", "-q", "-m", version]);
        git(repo.path(), &["tag", version]);
    }
    let url = format!("file://{}", repo.path().display());
    let source = vec![
        ("NIXERY_PKGS_PATH".to_owned(), String::new()),
        ("NIXERY_PKGS_REPO".to_owned(), url),
        ("NIXERY_LEASE_TTL".to_owned(), "6".to_owned()),
    ];
    (repo, source)
}

/// Retention over three revisions, a collection while another replica
/// builds and pulls, and collections killed at several steps.
fn collection(store: &Store) {
    let (_repo, source) = three_revisions();
    let registry = store.registry(&source);
    let mut images = std::collections::BTreeMap::new();
    for tag in ["v1", "v2", "v3"] {
        let before = store.keys("cache/pulled");
        let digest = store.pull_digest(&registry, &format!("shell/hello:{tag}"));
        let key: Vec<String> = store.keys("cache/pulled").difference(&before).cloned().collect();
        assert_eq!(key.len(), 1, "one new image for {tag}");
        images.insert(tag, (store::last_part(&key[0]), digest));
    }
    for tag in ["v1", "v2"] {
        store.set_pulled(&images[tag].0, LONG_AGO);
    }
    assert_eq!(
        store.pull_digest(&registry, "shell/hello:v3"),
        images["v3"].1,
        "pulled again"
    );
    let reached = |tag: &str| store.reached(&images[tag].0);
    let (kept, dropped): (Vec<String>, Vec<String>) = (reached("v3"), [reached("v1"), reached("v2")].concat());
    let only_dropped: Vec<&String> = dropped.iter().filter(|b| !kept.contains(b)).collect();
    assert!(!only_dropped.is_empty(), "the old revisions have blobs of their own");

    let blobs_before = store.keys("blobs/sha256");
    let (report, dry) = store.gc(&source, &["--dry-run", "--grace", "0s"]);
    println!("{report}");
    assert_eq!((dry["dry_run"].as_str(), dry["images_dropped"].as_str()), ("true", "2"));
    assert_eq!(store.keys("blobs/sha256"), blobs_before, "a dry run changes nothing");
    assert!(store.keys("cache/images").len() >= 3);

    let (report, done) = store.gc(&source, &["--grace", "0s"]);
    println!("{report}");
    assert_eq!(done["images_dropped"], "2");
    assert_eq!(
        done["blobs_deleted"], dry["blobs_deleted"],
        "the dry run said what would go"
    );
    assert_eq!(done["bytes_deleted"], dry["bytes_deleted"]);
    let blobs_after = store.keys("blobs/sha256");
    for blob in &kept {
        assert!(
            blobs_after.contains(&format!("blobs/sha256/{blob}")),
            "kept blob {blob} deleted"
        );
    }
    for blob in only_dropped {
        assert!(
            !blobs_after.contains(&format!("blobs/sha256/{blob}")),
            "dropped blob {blob} left"
        );
    }
    let (bytes, objects) = store.total();
    assert_eq!(
        done["store_bytes_after"],
        bytes.to_string(),
        "the report says what the store holds"
    );
    assert_eq!(done["store_objects_after"], objects.to_string());
    assert!(bytes < done["store_bytes_before"].parse().unwrap());
    store.assert_consistent();
    let (_, budget) = store.gc(&source, &["--dry-run", "--max-bytes", "1KB"]);
    assert_eq!(
        (budget["images_kept"].as_str(), budget["images_dropped"].as_str()),
        ("0", "1"),
        "over the budget"
    );
    assert_eq!(store.pull_digest(&registry, "shell/hello:v3"), images["v3"].1);
    assert_eq!(
        store.pull_digest(&registry, "shell/hello:v1"),
        images["v1"].1,
        "a dropped image builds again, byte for byte"
    );
    store.assert_consistent();

    concurrent(store, &source, &registry, &images["v1"].0, &images["v3"].1);
    killed(store, &source, &registry, (&images["v3"].0, &images["v3"].1));
}

/// A collection that drops `dropped` while another replica builds images
/// that reuse its layers and pulls the kept `shell/hello:v3`.
fn concurrent(store: &Store, source: &[(String, String)], registry: &Registry, dropped: &str, v3: &str) {
    let other = store.registry(source);
    store.set_pulled(dropped, LONG_AGO);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let collector = scope.spawn(|| {
            let result = store.gc(source, &["--grace", "0s"]);
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            result
        });
        let builds = scope.spawn(|| {
            for image in ["hello:v1", "hello:v2", "shell/hello:v2", "hello:v3"] {
                store.pull_digest(&other, image);
            }
        });
        let mut pulls = 0;
        while !done.load(std::sync::atomic::Ordering::SeqCst) || pulls == 0 {
            assert_eq!(
                store.pull_digest(&other, "shell/hello:v3"),
                v3,
                "a kept image pulls during a collection"
            );
            pulls += 1;
        }
        builds.join().unwrap();
        let (report, line) = collector.join().unwrap();
        println!("{report}\n{pulls} pulls during the collection");
        assert_eq!(line["images_dropped"], "1", "{report}");
    });
    store.assert_consistent();
    for image in ["hello:v1", "hello:v2", "shell/hello:v2", "shell/hello:v1"] {
        store.pull_digest(registry, image);
    }
}

/// Collections killed after each of their steps, each followed by a full one.
fn killed(store: &Store, source: &[(String, String)], registry: &Registry, (v3_key, v3): (&str, &str)) {
    let steps = ["gc: scanned", "gc: keep", "gc: deleted"];
    for (step, image) in steps.iter().zip(["hello:v1", "hello:v2", "shell/hello:v2"]) {
        store.pull_digest(registry, image);
        for key in store.keys("cache/pulled") {
            let key = store::last_part(&key);
            if key != v3_key {
                store.set_pulled(&key, LONG_AGO);
            }
        }
        store.gc_killed_after(source, step);
        store.assert_consistent();
        let (report, _) = store.gc_when_free(source);
        println!("after a collection killed at {step:?}:\n{report}");
        store.assert_consistent();
        let left: BTreeSet<String> = store.keys("blobs/sha256").iter().map(|k| store::last_part(k)).collect();
        assert_eq!(
            left,
            store.reached(v3_key).into_iter().collect(),
            "only the kept image's blobs are left"
        );
    }
    assert_eq!(store.pull_digest(registry, "shell/hello:v3"), v3);
}

/// Ten pulls of a new image spread over two replicas: one Nix evaluation;
/// then the replica building an image is killed, and the other takes over.
fn replicas(store: &Store) {
    let set = common::slow_package_set(3);
    let path = set.path().display().to_string();
    let source = vec![
        ("NIXERY_PKGS_PATH".to_owned(), path),
        ("NIXERY_LEASE_TTL".to_owned(), "6".to_owned()),
    ];
    let (a, b) = (store.registry(&source), store.registry(&source));
    let digests: Vec<String> = std::thread::scope(|scope| {
        let pulls: Vec<_> = (0..10)
            .map(|i| {
                let replica = if i % 2 == 0 { &a } else { &b };
                scope.spawn(move || {
                    let response = replica.get("/v2/slow/manifests/latest");
                    assert_eq!(response.status, 200, "{}", String::from_utf8_lossy(&response.body));
                    response.header("docker-content-digest").to_owned()
                })
            })
            .collect();
        pulls.into_iter().map(|p| p.join().unwrap()).collect()
    });
    assert!(digests.iter().all(|d| *d == digests[0]), "{digests:?}");
    let evaluations = a.nix_runs() + b.nix_runs();
    let waits = metric(&a, "nixery_build_lease_waits_total") + metric(&b, "nixery_build_lease_waits_total");
    println!("10 pulls over two replicas: {evaluations} Nix evaluation(s), {waits} lease wait(s)");
    assert_eq!(evaluations, 1, "one Nix evaluation in all");
    assert_eq!(waits, 1, "the other replica waited once");
    let waited = |r: &Registry| metric(r, "nixery_build_lease_waits_total") == 1;
    let (waiter, builder) = if waited(&a) { (&a, &b) } else { (&b, &a) };
    let builds = |r: &Registry, counter: &str| metric(r, &format!("nixery_builds_{counter}_total"));
    assert_eq!(
        [
            builds(waiter, "started"),
            builds(waiter, "finished"),
            builds(waiter, "failed")
        ],
        [0, 0, 0],
        "a replica that waits for another's build counts none of its own"
    );
    assert_eq!(
        [
            builds(builder, "started"),
            builds(builder, "finished"),
            builds(builder, "failed")
        ],
        [1, 1, 0]
    );
    takeover(store);
}

/// The replica building an image is killed; the one that waited builds it
/// once the lease expires, and its pull succeeds.
fn takeover(store: &Store) {
    let set = common::slow_package_set(8);
    let path = set.path().display().to_string();
    let source = vec![
        ("NIXERY_PKGS_PATH".to_owned(), path),
        ("NIXERY_LEASE_TTL".to_owned(), "6".to_owned()),
    ];
    let (mut a, b) = (store.registry(&source), store.registry(&source));
    let started = Instant::now();
    let earlier = store.keys("cache/leases/build");
    std::thread::scope(|scope| {
        let address = a.address.clone();
        // This pull fails with its replica.
        scope.spawn(move || reqwest::blocking::get(format!("http://{address}/v2/slow/manifests/latest")).is_ok());
        common::buckets::retry_until("replica A takes the build lease", || {
            store.keys("cache/leases/build").len() > earlier.len()
        });
        let waiter = scope.spawn(|| b.get("/v2/slow/manifests/latest"));
        std::thread::sleep(Duration::from_secs(1));
        a.kill();
        let response = waiter.join().unwrap();
        assert_eq!(response.status, 200, "{}", String::from_utf8_lossy(&response.body));
    });
    let takeovers = metric(&b, "nixery_build_lease_takeovers_total");
    println!(
        "lease holder killed: the other replica built the image after {:.1} s, with {} Nix evaluation(s), {takeovers} takeover(s)",
        started.elapsed().as_secs_f64(),
        b.nix_runs()
    );
    let leases: Vec<String> = b
        .log()
        .lines()
        .filter(|l| l.contains("lease"))
        .map(str::to_owned)
        .collect();
    assert_eq!(b.nix_runs(), 1);
    assert_eq!(takeovers, 1, "{leases:#?}");
    assert_eq!(metric(&b, "nixery_build_lease_waits_total"), 1);
}

/// A counter's value in a registry's metrics.
fn metric(registry: &Registry, name: &str) -> u64 {
    let text = String::from_utf8(registry.get("/metrics").body).unwrap();
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}
