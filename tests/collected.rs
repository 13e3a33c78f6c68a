//! What replicas answer after a garbage collection by another process drops
//! images they served, with their answers and records still in memory:
//! containerd pulls (HEAD by tag, then GET by digest) the image again, and
//! two replicas on one folder, pulled as containerd pulls while the
//! collection runs, fail at most one pull per dropped image and serve each
//! image again within the bound the README gives (a collection is noticed
//! within 10 s; a stale answer never outlives one look at storage).

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::engines::containerd;
use common::sha256;
use common::store::{self, Store};
use serde_json::Value;

/// A last pull long ago.
const LONG_AGO: u64 = 1000;
/// What containerd's resolver sends with its HEAD by tag.
const ACCEPT: &str = "application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, */*";
/// How long a replica may take to notice another process's collection
/// (`gc::NOTICE_EVERY`), with time for the image to be built again.
const BOUND: Duration = Duration::from_secs(30);

/// The package set: the registry's default, which `nixery gc` needs named.
fn source() -> Vec<(String, String)> {
    let pkgs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pkgs");
    vec![("NIXERY_PKGS_PATH".to_owned(), pkgs.display().to_string())]
}

/// `ctr images pull` from a private containerd, whose content store has
/// never seen the image.
fn ctr_pull(reference: &str) -> Result<(), String> {
    let daemon = containerd().expect("containerd starts");
    let output = Command::new("ctr")
        .args(["--address", daemon.socket.to_str().unwrap()])
        .args(["images", "pull", "--plain-http", reference])
        .output()
        .unwrap();
    match output.status.success() {
        true => Ok(()),
        false => Err(String::from_utf8_lossy(&output.stderr).into_owned()),
    }
}

/// The key of the image record made since `before` was listed.
fn new_image(store: &Store, before: &std::collections::BTreeSet<String>) -> String {
    let made: Vec<String> = store.keys("cache/pulled").difference(before).cloned().collect();
    assert_eq!(made.len(), 1, "one new image: {made:?}");
    store::last_part(&made[0])
}

#[test]
fn containerd_pulls_an_image_that_another_process_collected() {
    let store = Store::folder();
    let registry = store.registry(&source());
    let reference = format!("{}/shell/hello:latest", registry.address);
    let before = store.keys("cache/pulled");
    ctr_pull(&reference).expect("the first pull builds the image");
    let key = new_image(&store, &before);
    // Served once more: its answer is in the replica's memory.
    ctr_pull(&reference).expect("a second pull");

    store.set_pulled(&key, LONG_AGO);
    let (report, done) = store.gc(&source(), &["--grace", "0s"]);
    println!("{report}");
    assert_eq!(done["images_dropped"], "1", "{report}");

    let started = Instant::now();
    let mut failures = vec![];
    while let Err(error) = ctr_pull(&reference) {
        failures.push(error);
        assert!(
            started.elapsed() < BOUND,
            "containerd never pulled the collected image again: {failures:#?}\n{}",
            registry.log()
        );
        std::thread::sleep(Duration::from_secs(1));
    }
    println!(
        "pulled again {:.1} s after the collection, after {} failed pull(s)",
        started.elapsed().as_secs_f64(),
        failures.len()
    );
    assert!(failures.len() <= 1, "at most one failed pull: {failures:#?}");
    store.assert_consistent();
}

/// Why a pull as containerd pulls failed: its step and what was answered.
type Failure = String;

/// A pull as containerd makes it: HEAD by tag, GET by digest, then the
/// config and every layer, each checked against its digest.
fn pull(address: &str, image: &str) -> Result<(), Failure> {
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let url = |path: String| format!("http://{address}/v2/{image}/{path}");
    let head = (client
        .head(url("manifests/latest".into()))
        .header("Accept", ACCEPT)
        .send())
    .map_err(|e| format!("HEAD by tag: {e}"))?;
    if !head.status().is_success() {
        return Err(format!("HEAD by tag: {}", head.status()));
    }
    let digest = head.headers()["docker-content-digest"].to_str().unwrap().to_owned();
    let fetch = |path: String, digest: &str, step: &str| -> Result<Vec<u8>, Failure> {
        let response = (client.get(url(path)).header("Accept", ACCEPT).send()).map_err(|e| format!("{step}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("{step}: {}", response.status()));
        }
        let bytes = response.bytes().map_err(|e| format!("{step}: {e}"))?.to_vec();
        match sha256(&bytes) == digest {
            true => Ok(bytes),
            false => Err(format!("{step}: bytes that are not {digest}")),
        }
    };
    let manifest = fetch(format!("manifests/{digest}"), &digest, "GET by digest")?;
    let manifest: Value = serde_json::from_slice(&manifest).unwrap();
    let blobs = std::iter::once(&manifest["config"]).chain(manifest["layers"].as_array().unwrap());
    for blob in blobs {
        let digest = blob["digest"].as_str().unwrap();
        fetch(format!("blobs/{digest}"), digest, "GET blob")?;
    }
    Ok(())
}

#[test]
fn two_replicas_on_one_folder_answer_through_a_collection() {
    let store = Store::folder();
    let (a, b) = (store.registry(&source()), store.registry(&source()));
    let images = ["shell/hello", "hello", "git"];
    let mut keys = BTreeMap::new();
    for image in images {
        let before = store.keys("cache/pulled");
        pull(&a.address, image).unwrap();
        keys.insert(image, new_image(&store, &before));
        pull(&b.address, image).unwrap();
    }
    let dropped = ["hello", "git"];
    for image in dropped {
        store.set_pulled(&keys[image], LONG_AGO);
    }

    let collecting = AtomicBool::new(true);
    let failures: BTreeMap<(String, &str), Vec<Failure>> = std::thread::scope(|scope| {
        let pullers: Vec<_> = [&a, &b]
            .into_iter()
            .flat_map(|replica| images.map(|image| (replica, image)))
            .map(|(replica, image)| {
                let collecting = &collecting;
                scope.spawn(move || {
                    let mut failed = vec![];
                    let give_up = Instant::now() + 4 * BOUND;
                    // Through the collection, then until a pull works.
                    let mut last = pull(&replica.address, image);
                    while (collecting.load(Ordering::SeqCst) || last.is_err()) && Instant::now() < give_up {
                        if let Err(failure) = last {
                            failed.push(failure);
                            std::thread::sleep(Duration::from_millis(500));
                        }
                        last = pull(&replica.address, image);
                    }
                    if let Err(failure) = last {
                        failed.push(format!("still, after {:?}: {failure}", 4 * BOUND));
                    }
                    ((replica.address.clone(), image), failed)
                })
            })
            .collect();
        let (report, done) = store.gc(&source(), &["--grace", "0s"]);
        println!("{report}");
        assert_eq!(done["images_dropped"], "2", "{report}");
        // Pulls go on past the time a replica takes to notice.
        std::thread::sleep(BOUND / 3);
        collecting.store(false, Ordering::SeqCst);
        pullers.into_iter().map(|p| p.join().unwrap()).collect()
    });
    for ((replica, image), failed) in &failures {
        let reasons: std::collections::BTreeSet<&Failure> = failed.iter().collect();
        println!("{image} from {replica}: {} failed pull(s) {reasons:?}", failed.len());
        let allowed = if dropped.contains(image) { 1 } else { 0 };
        assert!(failed.len() <= allowed, "{image} from {replica}: {reasons:#?}");
    }
    store.assert_consistent();
}
