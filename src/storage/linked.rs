//! Values that hold a folder's blob file open (the open file itself, or a
//! document with its bytes), kept by digest for as long as the file is still
//! linked at its address. A kept value is handed out after one `fstat` of
//! its file, which says without a path lookup or a wait for the disk
//! whether the file was removed (its link count is 0); a removed one is
//! forgotten, so its blob is looked for again and found lost. Past the
//! budget (of weight: a count of files, or of bytes) or the count of open
//! files, the oldest go first.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::RwLock;

use crate::digest::Digest;

/// What a kept value holds open, and what it weighs against the budget.
pub trait Linked: Clone {
    fn file(&self) -> &File;
    fn weight(&self) -> usize;
}

/// The values kept.
#[derive(Debug)]
pub struct Kept<V> {
    budget: usize,
    /// Files held open at most.
    max_files: usize,
    pub(super) map: RwLock<Map<V>>,
}

#[derive(Debug)]
pub(super) struct Map<V> {
    pub(super) by_digest: HashMap<Digest, V>,
    /// Oldest first.
    pub(super) order: VecDeque<Digest>,
    pub(super) weight: usize,
}

impl<V: Linked> Kept<V> {
    /// Keeps values up to a `budget` of weight and `max_files` open files.
    pub fn new(budget: usize, max_files: usize) -> Self {
        Kept {
            budget,
            max_files,
            map: RwLock::new(Map {
                by_digest: HashMap::new(),
                order: VecDeque::new(),
                weight: 0,
            }),
        }
    }

    /// The value kept for `digest`, if its file is still linked.
    pub fn get(&self, digest: &Digest) -> io::Result<Option<V>> {
        let kept = self
            .map
            .read()
            .expect("no panics under the lock")
            .by_digest
            .get(digest)
            .cloned();
        let Some(value) = kept else {
            return Ok(None);
        };
        if value.file().metadata()?.nlink() > 0 {
            return Ok(Some(value));
        }
        let map = &mut *self.map.write().expect("no panics under the lock");
        if let Some(gone) = map.by_digest.remove(digest) {
            map.weight -= gone.weight();
            map.order.retain(|d| d != digest);
        }
        Ok(None)
    }

    /// Keeps `value` for `digest`, then drops the oldest past the budget.
    pub fn keep(&self, digest: &Digest, value: V) {
        let map = &mut *self.map.write().expect("no panics under the lock");
        map.weight += value.weight();
        match map.by_digest.insert(digest.clone(), value) {
            Some(old) => map.weight -= old.weight(),
            None => map.order.push_back(digest.clone()),
        }
        while map.weight > self.budget || map.by_digest.len() > self.max_files {
            let Some(oldest) = map.order.pop_front() else { break };
            if let Some(gone) = map.by_digest.remove(&oldest) {
                map.weight -= gone.weight();
            }
        }
    }
}
