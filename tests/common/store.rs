//! Where the replicas of a test keep their data: a folder, or a bucket of
//! a store started here; and what the tests look at in it: keys, records,
//! what an image record reaches, totals, and `nixery gc` runs (whole, or
//! killed after a step).

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde_json::Value;

use super::Registry;
use super::buckets::{BUCKET, Kind, ObjectServer};

pub struct Store {
    env: Vec<(String, String)>,
    objects: Arc<dyn ObjectStore>,
    /// For fake-gcs-server: its JSON API, which writes go to (it has no XML API puts).
    gcs_json: Option<String>,
    runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
    _server: Option<ObjectServer>,
}

impl Store {
    pub fn folder() -> Store {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("storage");
        std::fs::create_dir_all(&root).unwrap();
        let objects = Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&root).unwrap());
        let env = vec![
            ("NIXERY_STORAGE_BACKEND".to_owned(), "filesystem".to_owned()),
            ("STORAGE_PATH".to_owned(), root.display().to_string()),
        ];
        Store::new(env, objects, dir, None)
    }

    pub fn bucket(server: ObjectServer) -> Store {
        let (env, objects) = (server.registry_env(), server.store());
        let gcs_json = (server.kind == Kind::Gcs).then(|| server.endpoint.clone());
        let mut store = Store::new(env, objects, tempfile::tempdir().unwrap(), Some(server));
        store.gcs_json = gcs_json;
        store
    }

    fn new(
        env: Vec<(String, String)>,
        objects: Arc<dyn ObjectStore>,
        dir: tempfile::TempDir,
        server: Option<ObjectServer>,
    ) -> Store {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        Store {
            env,
            objects,
            gcs_json: None,
            runtime,
            _dir: dir,
            _server: server,
        }
    }

    /// A registry on this store, with these settings too.
    pub fn registry(&self, settings: &[(String, String)]) -> Registry {
        let all: Vec<(&str, &str)> = (self.env.iter().chain(settings))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Registry::start_with(&all)
    }

    /// Every key below `prefix`.
    pub fn keys(&self, prefix: &str) -> BTreeSet<String> {
        self.runtime.block_on(async {
            self.objects
                .list(Some(&StorePath::from(prefix)))
                .map_ok(|meta| meta.location.to_string())
                .try_collect()
                .await
                .unwrap()
        })
    }

    fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.runtime.block_on(async {
            match self.objects.get(&StorePath::from(key)).await {
                Ok(result) => Some(result.bytes().await.unwrap().to_vec()),
                Err(object_store::Error::NotFound { .. }) => None,
                Err(e) => panic!("{key}: {e}"),
            }
        })
    }

    fn json(&self, key: &str) -> Option<Value> {
        self.get(key).map(|bytes| serde_json::from_slice(&bytes).unwrap())
    }

    /// Sets an image's recorded last pull.
    pub fn set_pulled(&self, image_key: &str, at: u64) {
        let record = format!(r#"{{"at":{at}}}"#);
        let key = format!("cache/pulled/{image_key}");
        if let Some(endpoint) = &self.gcs_json {
            let url = format!("{endpoint}/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name={key}");
            let response = reqwest::blocking::Client::new().post(url).body(record).send().unwrap();
            assert!(response.status().is_success(), "{:?}", response.text());
            return;
        }
        self.runtime.block_on(async {
            let path = StorePath::from(key);
            self.objects.put(&path, PutPayload::from(record)).await.unwrap();
        });
    }

    /// The blobs (hex) an image record reaches: its manifests, their
    /// configs and layers, and the artifacts recorded as referring to them
    /// (SBOMs, provenance) with theirs; a missing manifest fails the test.
    pub fn reached(&self, image_key: &str) -> Vec<String> {
        let record = self
            .json(&format!("cache/images/{image_key}"))
            .unwrap_or_else(|| panic!("no image record {image_key}"));
        let manifests = record["manifests"].as_array().unwrap();
        let digests: Vec<String> = manifests.iter().map(|m| hex(&m[1]["digest"])).collect();
        let mut reached: Vec<String> = digests.iter().flat_map(|m| self.manifest_blobs(m)).collect();
        for manifest in &digests {
            let referrers = self.json(&format!("cache/referrers/{manifest}")).unwrap_or_default();
            for referrer in referrers.as_array().into_iter().flatten() {
                reached.extend(self.manifest_blobs(&hex(&referrer["digest"])));
            }
        }
        reached.sort();
        reached.dedup();
        reached
    }

    fn manifest_blobs(&self, manifest: &str) -> Vec<String> {
        let document = self
            .json(&format!("blobs/sha256/{manifest}"))
            .unwrap_or_else(|| panic!("a record names the missing manifest {manifest}"));
        let layers = document["layers"].as_array().unwrap();
        let mut blobs = vec![manifest.to_owned(), hex(&document["config"]["digest"])];
        blobs.extend(layers.iter().map(|layer| hex(&layer["digest"])));
        blobs
    }

    /// Every record names blobs that exist: image records (manifests,
    /// configs, layers), index records (the index and its manifests) and
    /// layer records.
    pub fn assert_consistent(&self) {
        let blobs = self.keys("blobs/sha256");
        let present = |hex: &str| blobs.contains(&format!("blobs/sha256/{hex}"));
        for key in self.keys("cache/images") {
            for blob in self.reached(&last_part(&key)) {
                assert!(present(&blob), "{key} names the missing blob {blob}");
            }
        }
        for key in self.keys("cache/indexes") {
            let Some(record) = self.json(&key) else { continue };
            let index = hex(&record["digest"]);
            let document = self.json(&format!("blobs/sha256/{index}"));
            let document = document.unwrap_or_else(|| panic!("{key} names the missing index {index}"));
            for manifest in document["manifests"].as_array().unwrap() {
                assert!(present(&hex(&manifest["digest"])), "{key} names a missing manifest");
            }
        }
        for key in self.keys("cache/layers") {
            let Some(record) = self.json(&key) else { continue };
            assert!(present(&hex(&record["digest"])), "{key} names a missing blob");
        }
    }

    /// Bytes and objects in the whole store.
    pub fn total(&self) -> (u64, u64) {
        self.runtime.block_on(async {
            let all: Vec<_> = self.objects.list(None).try_collect().await.unwrap();
            (all.iter().map(|m| m.size).sum(), all.len() as u64)
        })
    }

    /// Pulls `image` (`name:tag`) with skopeo; the manifest's digest.
    pub fn pull_digest(&self, registry: &Registry, image: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let (_, tag) = image.split_once(':').unwrap();
        super::skopeo_copy(
            &format!("docker://{}/{image}", registry.address),
            &format!("oci:{}:{tag}", dir.path().display()),
        );
        let index: Value = serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).unwrap()).unwrap();
        index["manifests"][0]["digest"].as_str().unwrap().to_owned()
    }

    fn gc_command(&self, settings: &[(String, String)], args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_nixery"));
        command
            .arg("gc")
            .args(args)
            .env_remove("NIXERY_CHANNEL")
            .env_remove("NIXERY_PKGS_REPO")
            .env_remove("NIXERY_PKGS_PATH")
            .env("RUST_LOG", "warn");
        for (key, value) in self.env.iter().chain(settings) {
            match value.is_empty() {
                true => command.env_remove(key),
                false => command.env(key, value),
            };
        }
        command
    }

    /// Runs `nixery gc` to its end: what it printed, and its last line's fields.
    pub fn gc(&self, settings: &[(String, String)], args: &[&str]) -> (String, HashMap<String, String>) {
        let output = self.gc_command(settings, args).output().unwrap();
        let stdout = String::from_utf8(output.stdout).unwrap();
        assert!(
            output.status.success(),
            "gc failed: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let fields = stdout
            .lines()
            .last()
            .unwrap_or_default()
            .split(' ')
            .filter_map(|field| field.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        (stdout, fields)
    }

    /// Runs `nixery gc` to its end once no other collection holds the lease.
    pub fn gc_when_free(&self, settings: &[(String, String)]) -> (String, HashMap<String, String>) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (stdout, fields) = self.gc(settings, &["--grace", "0s"]);
            if !stdout.contains("gc busy") {
                return (stdout, fields);
            }
            assert!(Instant::now() < deadline, "the gc lease was never freed");
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Starts `nixery gc` and kills it (SIGKILL) once it prints a line that
    /// starts with `step`.
    pub fn gc_killed_after(&self, settings: &[(String, String)], step: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let mut child = self
                .gc_command(settings, &["--grace", "0s"])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let lines = BufReader::new(child.stdout.take().unwrap()).lines();
            let mut seen = Vec::new();
            for line in lines.map_while(Result::ok) {
                if line.starts_with(step) {
                    child.kill().unwrap();
                    child.wait().unwrap();
                    return;
                }
                seen.push(line);
            }
            child.wait().unwrap();
            assert!(
                seen.iter().any(|l| l.contains("gc busy")),
                "gc ended before {step:?}: {seen:?}"
            );
            assert!(Instant::now() < deadline, "the gc lease was never freed");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// The last `/`-separated part of a key.
pub fn last_part(key: &str) -> String {
    key.rsplit('/').next().unwrap().to_owned()
}

fn hex(digest: &Value) -> String {
    digest.as_str().unwrap().trim_start_matches("sha256:").to_owned()
}
