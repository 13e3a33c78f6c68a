//! Tags already answered from records, remembered by the question as the
//! client put it: the image name and tag as written and its `Accept`
//! headers. A pull of a cached tag would otherwise parse the name, choose
//! the format, compute each architecture's key and look up each record,
//! and that was most of what a cached pull cost the registry.
//!
//! An answer holds while the tag names the revision it was found at: each
//! recall asks the package source (whose answer is cached, `fresh.rs`), and
//! a new revision asks again. Whenever the builder forgets a record
//! (storage lost what it names), every answer goes, so none can name a
//! forgotten record. Past [`MAX_ANSWERS`], all go at once too: answers are
//! found again at the cost of one full lookup each.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::cache::ManifestRecord;
use crate::pulls::Mark;

/// Answers kept at most.
const MAX_ANSWERS: usize = 10_000;

/// A manifest request as the client put it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Question(String);

impl Question {
    /// The question of `name` and `tag` asked with these `Accept` values.
    pub fn new<'a>(name: &str, tag: &str, accept: impl Iterator<Item = &'a [u8]>) -> Self {
        // Room for the Accept headers clients send (docker's and
        // containerd's are about 300 bytes), so that it is allocated once.
        let mut question = String::with_capacity(name.len() + tag.len() + 512);
        for part in [name, ":", tag] {
            question.push_str(part);
        }
        for value in accept {
            question.push('\n');
            question.push_str(&String::from_utf8_lossy(value));
        }
        Question(question)
    }
}

/// What a question was answered with.
#[derive(Clone, Debug)]
pub struct Answer {
    /// The revision the tag named.
    pub revision: String,
    /// The manifest or index.
    pub record: ManifestRecord,
    /// The last-pull marks of the image records it stands for (one per
    /// architecture); each counts as a cache hit too.
    pub marks: Vec<Arc<Mark>>,
}

/// The answers remembered.
#[derive(Debug, Default)]
pub struct Answers {
    kept: RwLock<HashMap<Question, Arc<Answer>>>,
}

impl Answers {
    pub fn get(&self, question: &Question) -> Option<Arc<Answer>> {
        self.kept
            .read()
            .expect("no panics under the lock")
            .get(question)
            .cloned()
    }

    pub fn put(&self, question: Question, answer: Answer) {
        let mut kept = self.kept.write().expect("no panics under the lock");
        if kept.len() >= MAX_ANSWERS {
            kept.clear();
        }
        kept.insert(question, Arc::new(answer));
    }

    /// Forgets every answer.
    pub fn clear(&self) {
        self.kept.write().expect("no panics under the lock").clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;

    fn answer(revision: &str) -> Answer {
        Answer {
            revision: revision.to_owned(),
            record: ManifestRecord {
                digest: Digest::of(revision.as_bytes()),
                media_type: "m".into(),
                size: 1,
            },
            marks: vec![],
        }
    }

    #[test]
    fn questions_differ_by_name_tag_and_accept() {
        let oci: &[u8] = b"application/vnd.oci.image.manifest.v1+json";
        let ask = |name, tag, accept: &[&[u8]]| Question::new(name, tag, accept.iter().copied());
        assert_eq!(ask("shell", "latest", &[oci]), ask("shell", "latest", &[oci]));
        assert_ne!(ask("shell", "latest", &[oci]), ask("shell", "latest", &[]));
        assert_ne!(ask("shell", "latest", &[oci]), ask("shell", "v1", &[oci]));
        assert_ne!(ask("shell/git", "latest", &[]), ask("git/shell", "latest", &[]));
        assert_ne!(ask("a", "b", &[b"x", b"y"]), ask("a", "b", &[b"x,y"]));
    }

    #[test]
    fn answers_are_kept_until_cleared_and_bounded() {
        let answers = Answers::default();
        let question = |i: usize| Question::new(&format!("p{i}"), "latest", std::iter::empty());
        answers.put(question(0), answer("r1"));
        assert_eq!(answers.get(&question(0)).unwrap().revision, "r1");
        answers.clear();
        assert!(answers.get(&question(0)).is_none());
        for i in 0..=MAX_ANSWERS {
            answers.put(question(i), answer("r"));
        }
        assert!(answers.kept.read().unwrap().len() <= MAX_ANSWERS);
        assert!(answers.get(&question(MAX_ANSWERS)).is_some(), "the newest is kept");
    }
}
