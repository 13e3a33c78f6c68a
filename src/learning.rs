//! Popularity learned from this registry's own builds
//! (`NIXERY_LEARN_POPULARITY`): for every package id (`name-version`), how
//! many built images held it, kept in storage. At start the counts are
//! added to the popularity data, so what users actually pull is layered as
//! shared; during a run the data stays fixed, so a running registry's
//! layers do not drift.

use std::collections::BTreeMap;
use std::sync::Mutex;

use bytes::Bytes;

use crate::layers::RuntimeGraph;
use crate::storage::{Storage, StorageError};

const RECORD: &str = "popularity/learned";

/// The counts, in memory and in storage.
pub struct Learned {
    storage: Storage,
    counts: Mutex<BTreeMap<String, u64>>,
}

impl Learned {
    /// The counts kept in `storage` (none yet: empty). Unreadable counts
    /// start afresh rather than stop the registry.
    pub async fn load(storage: Storage) -> Result<Self, StorageError> {
        let counts = match storage.get_record(RECORD).await? {
            Some(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|error| {
                tracing::warn!(%error, "ignoring unreadable learned popularity");
                BTreeMap::new()
            }),
            None => BTreeMap::new(),
        };
        Ok(Learned {
            storage,
            counts: Mutex::new(counts),
        })
    }

    /// The counts as popularity JSON (`{"name-version": count}`).
    pub fn json(&self) -> Vec<u8> {
        serde_json::to_vec(&*self.counts.lock().expect("not poisoned")).expect("counts serialise")
    }

    /// Counts one more image holding each path of `graph`, and stores the counts.
    pub async fn record(&self, graph: &RuntimeGraph) -> Result<(), StorageError> {
        let json = {
            let mut counts = self.counts.lock().expect("not poisoned");
            for info in &graph.paths {
                *counts
                    .entry(crate::layers::package_id(&info.path).to_owned())
                    .or_default() += 1;
            }
            serde_json::to_vec(&*counts).expect("counts serialise")
        };
        self.storage.put_record(RECORD, Bytes::from(json)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::{PathInfo, Popularity};

    fn graph(paths: &[&str]) -> RuntimeGraph {
        let infos = paths
            .iter()
            .map(|p| PathInfo {
                path: format!("/nix/store/{:0<32}-{p}", "h"),
                nar_size: 1,
                ..Default::default()
            })
            .collect();
        RuntimeGraph::new(vec![], infos).unwrap()
    }

    #[tokio::test]
    async fn counts_images_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let learned = Learned::load(Storage::filesystem(dir.path()).await.unwrap())
            .await
            .unwrap();
        assert_eq!(learned.json(), b"{}");
        learned.record(&graph(&["libz-1.3", "app-1"])).await.unwrap();
        learned.record(&graph(&["libz-1.3", "tool-2"])).await.unwrap();

        let again = Learned::load(Storage::filesystem(dir.path()).await.unwrap())
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8(again.json()).unwrap(),
            r#"{"app-1":1,"libz-1.3":2,"tool-2":1}"#
        );
        let data = Popularity::from_json(br#"{"libz-1.3": 40}"#).unwrap();
        let merged = data.with_learned(&again.json()).unwrap();
        assert_eq!(merged.of("/nix/store/x-libz-1.3"), 42);
        assert_eq!(
            merged.of("/nix/store/x-tool-2"),
            1,
            "1 learned + 0: a count is at least 1"
        );
        assert_ne!(merged.id(), data.id());
    }
}
