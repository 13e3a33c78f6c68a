//! What the registry did lately, for its web pages: the most recent builds
//! and errors, and which images each layer went into. Kept in memory only.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;
use std::time::SystemTime;

/// How many builds and errors are remembered.
const RECENT: usize = 50;

/// A finished build.
#[derive(Clone, Debug)]
pub struct Build {
    pub image: String,
    pub arch: &'static str,
    pub when: SystemTime,
    pub millis: u64,
    pub layers: usize,
    pub newly_packed: usize,
    pub digest: String,
}

/// A build that failed.
#[derive(Clone, Debug)]
pub struct Failure {
    pub image: String,
    pub when: SystemTime,
    /// Without secrets, as everything here.
    pub message: String,
    /// The last lines Nix wrote, when Nix failed (scrubbed as Nix wrote them).
    pub log: Vec<String>,
}

/// Recent builds and errors, newest first, and layer users.
#[derive(Debug, Default)]
pub struct Activity {
    builds: Mutex<VecDeque<Build>>,
    failures: Mutex<VecDeque<Failure>>,
    /// Layer (by cache key) → images it went into.
    layer_users: Mutex<BTreeMap<String, BTreeSet<String>>>,
}

impl Activity {
    pub fn built(&self, build: Build, layer_keys: &[String]) {
        let mut users = self.layer_users.lock().expect("not poisoned");
        for key in layer_keys {
            users.entry(key.clone()).or_default().insert(build.image.clone());
        }
        push(&self.builds, build);
    }

    pub fn failed(&self, failure: Failure) {
        push(&self.failures, failure);
    }

    pub fn builds(&self) -> Vec<Build> {
        self.builds.lock().expect("not poisoned").iter().cloned().collect()
    }

    pub fn failures(&self) -> Vec<Failure> {
        self.failures.lock().expect("not poisoned").iter().cloned().collect()
    }

    /// The images other than `image` that a layer went into.
    pub fn other_users(&self, layer_key: &str, image: &str) -> Vec<String> {
        let users = self.layer_users.lock().expect("not poisoned");
        users
            .get(layer_key)
            .map(|names| names.iter().filter(|n| *n != image).cloned().collect())
            .unwrap_or_default()
    }
}

fn push<T>(list: &Mutex<VecDeque<T>>, item: T) {
    let mut list = list.lock().expect("not poisoned");
    list.push_front(item);
    list.truncate(RECENT);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(image: &str) -> Build {
        Build {
            image: image.into(),
            arch: "amd64",
            when: SystemTime::UNIX_EPOCH,
            millis: 1,
            layers: 2,
            newly_packed: 2,
            digest: "sha256:x".into(),
        }
    }

    #[test]
    fn newest_first_bounded_and_layer_users_known() {
        let activity = Activity::default();
        for i in 0..RECENT + 5 {
            activity.built(build(&format!("image{i}")), &["base".into()]);
        }
        let builds = activity.builds();
        assert_eq!(builds.len(), RECENT);
        assert_eq!(builds[0].image, format!("image{}", RECENT + 4));
        assert_eq!(activity.other_users("base", "image0").len(), RECENT + 4);
        assert!(activity.other_users("unknown", "image0").is_empty());
    }
}
