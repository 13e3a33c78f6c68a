//! Tags already answered from records, remembered by the question as the
//! client put it: the image name and tag as written and its `Accept`
//! headers. A pull of a cached tag would otherwise parse the name, choose
//! the format, compute each architecture's key and look up each record,
//! and that was most of what a cached pull cost the registry.
//!
//! An answer holds while the tag names the revision it was found at: each
//! recall asks the package source (whose answer is cached, `fresh.rs`), and
//! a new revision asks again. Storage is the truth: a manifest or index
//! found missing (a collection deleted it) forgets the answers that name
//! it, as the manifest or index they answer or as one an index names
//! ([`Answers::forget_naming`]); a collection, or a record the builder
//! forgets, clears them all. Past [`MAX_ANSWERS`], all go at once too:
//! answers are found again at the cost of one full lookup each.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::cache::ManifestRecord;
use crate::digest::Digest;
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
    /// The manifests an index names (none for a manifest).
    pub manifests: Vec<Digest>,
    /// The last-pull marks of the image records it stands for (one per
    /// architecture); each counts as a cache hit too.
    pub marks: Vec<Arc<Mark>>,
}

impl Answer {
    /// The documents the answer stands on.
    fn documents(&self) -> impl Iterator<Item = &Digest> {
        std::iter::once(&self.record.digest).chain(&self.manifests)
    }
}

/// The answers remembered.
#[derive(Debug, Default)]
pub struct Answers {
    kept: RwLock<Kept>,
}

#[derive(Debug, Default)]
struct Kept {
    by_question: HashMap<Question, Arc<Answer>>,
    /// The questions whose answers stand on each document.
    by_document: HashMap<Digest, Vec<Question>>,
}

impl Answers {
    pub fn get(&self, question: &Question) -> Option<Arc<Answer>> {
        self.kept
            .read()
            .expect("no panics under the lock")
            .by_question
            .get(question)
            .cloned()
    }

    pub fn put(&self, question: Question, answer: Answer) {
        let mut kept = self.kept.write().expect("no panics under the lock");
        // The notes of answers replaced since count too.
        if kept.by_question.len() >= MAX_ANSWERS || kept.by_document.len() >= 4 * MAX_ANSWERS {
            *kept = Kept::default();
        }
        for document in answer.documents() {
            let questions = kept.by_document.entry(document.clone()).or_default();
            if !questions.contains(&question) {
                questions.push(question.clone());
            }
        }
        kept.by_question.insert(question, Arc::new(answer));
    }

    /// Forgets the answers that stand on `document`; whether there were any.
    pub fn forget_naming(&self, document: &Digest) -> bool {
        let mut kept = self.kept.write().expect("no panics under the lock");
        let Some(questions) = kept.by_document.remove(document) else {
            return false;
        };
        for question in questions {
            // Answered again since with other documents: those stay.
            let stands_on = |answer: &Arc<Answer>| answer.documents().any(|d| d == document);
            if kept.by_question.get(&question).is_some_and(stands_on) {
                kept.by_question.remove(&question);
            }
        }
        true
    }

    /// Forgets every answer.
    pub fn clear(&self) {
        *self.kept.write().expect("no panics under the lock") = Kept::default();
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
            manifests: vec![Digest::of(format!("{revision}-amd64").as_bytes())],
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
        assert!(answers.kept.read().unwrap().by_question.len() <= MAX_ANSWERS);
        assert!(answers.get(&question(MAX_ANSWERS)).is_some(), "the newest is kept");
    }

    #[test]
    fn a_missing_document_forgets_the_answers_that_stand_on_it() {
        let answers = Answers::default();
        let question = |name: &str| Question::new(name, "latest", std::iter::empty());
        answers.put(question("a"), answer("r1"));
        answers.put(question("b"), answer("r1"));
        answers.put(question("c"), answer("r2"));
        assert!(!answers.forget_naming(&Digest::of(b"unknown")));
        assert!(
            answers.forget_naming(&Digest::of(b"r1-amd64")),
            "a manifest an index names"
        );
        assert!(answers.get(&question("a")).is_none());
        assert!(answers.get(&question("b")).is_none());
        assert!(answers.get(&question("c")).is_some());
        // Answered again with another document: a late miss of the old one
        // leaves the new answer alone.
        answers.put(question("a"), answer("r1"));
        answers.put(question("a"), answer("r3"));
        assert!(answers.forget_naming(&Digest::of(b"r1")));
        assert_eq!(answers.get(&question("a")).unwrap().revision, "r3");
        assert!(answers.forget_naming(&Digest::of(b"r2")), "the index itself");
        assert!(answers.get(&question("c")).is_none());
    }
}
