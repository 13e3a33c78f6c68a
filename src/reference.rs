//! The reference grammar of the distribution spec: which repository names
//! and tags a registry may serve. Pure checks, no allocation on success.

use std::sync::LazyLock;

use regex::Regex;

/// Longest repository name clients accept (the Docker reference limit).
pub const MAX_NAME_LEN: usize = 255;

/// One path component of a repository name (distribution-spec grammar).
static COMPONENT: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*$").unwrap());

/// A tag (distribution-spec grammar).
static TAG: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$").unwrap());

/// Why an image name or tag cannot be served.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("invalid repository name {0:?}: components must match [a-z0-9]+ joined by '.', '_', '__' or '-'")]
    InvalidName(String),
    #[error("repository name is longer than {MAX_NAME_LEN} characters")]
    NameTooLong,
    #[error("invalid tag {0:?}: must match [A-Za-z0-9_][A-Za-z0-9._-]{{0,127}}")]
    InvalidTag(String),
}

/// Checks a repository name against the distribution-spec grammar.
pub fn validate_name(name: &str) -> Result<(), NameError> {
    if name.len() > MAX_NAME_LEN {
        return Err(NameError::NameTooLong);
    }
    if name.split('/').all(|c| COMPONENT.is_match(c)) {
        Ok(())
    } else {
        Err(NameError::InvalidName(name.to_owned()))
    }
}

/// Whether `reference` is a valid tag.
pub fn is_tag(reference: &str) -> bool {
    TAG.is_match(reference)
}
