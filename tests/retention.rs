//! Retention: when each image was last pulled or built, as storage records
//! it for every replica (`cache/pulled/<image key>`): written by a build at
//! once, by pulls only in batches, and by a registry that stops.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::Registry;

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
