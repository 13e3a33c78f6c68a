//! Package sources: where the package set comes from (a local path, a
//! nixpkgs channel, a git repository), what Nix is told to import for a
//! given tag, and the revision that identifies the package set's contents so
//! that images built from it can be cached.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use walkdir::WalkDir;

/// How long a path source's content hash is trusted before it is taken again.
const PATH_REVISION_TTL: Duration = Duration::from_secs(5);

/// Where packages come from, as configured.
#[derive(Debug)]
pub enum PackageSource {
    /// A package set on local disk (`NIXERY_PKGS_PATH`).
    Path {
        path: PathBuf,
        revision: Mutex<Option<(Instant, String)>>,
    },
    /// A nixpkgs branch or commit on GitHub (`NIXERY_CHANNEL`).
    Channel(String),
    /// A git repository; the tag picks the revision (`NIXERY_PKGS_REPO`).
    Git(String),
}

/// The `srcType`/`srcArgs` pair the lookup expression imports from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NixSource {
    pub kind: &'static str,
    pub args: String,
}

impl PackageSource {
    pub fn path(path: PathBuf) -> Self {
        PackageSource::Path {
            path,
            revision: Mutex::new(None),
        }
    }

    /// What Nix imports for an image with this tag. Only git sources give
    /// the tag a meaning: a 40-hex commit or a branch; `latest` is the
    /// repository's default branch.
    pub fn for_tag(&self, tag: &str) -> NixSource {
        match self {
            PackageSource::Path { path, .. } => NixSource {
                kind: "path",
                args: path.display().to_string(),
            },
            PackageSource::Channel(channel) => NixSource {
                kind: "nixpkgs",
                args: channel.clone(),
            },
            PackageSource::Git(url) => {
                let mut spec = serde_json::json!({ "url": url });
                if is_commit(tag) {
                    spec["rev"] = tag.into();
                } else if tag != "latest" {
                    spec["ref"] = tag.into();
                }
                NixSource {
                    kind: "git",
                    args: spec.to_string(),
                }
            }
        }
    }

    /// A string that changes whenever the packages an image with this tag
    /// would get can change, or `None` when that cannot be known without
    /// asking Nix (a branch), so the image must not be cached.
    pub async fn revision(&self, tag: &str) -> std::io::Result<Option<String>> {
        Ok(match self {
            PackageSource::Path { path, revision } => {
                if let Some((at, known)) = revision.lock().expect("not poisoned").as_ref()
                    && at.elapsed() < PATH_REVISION_TTL
                {
                    return Ok(Some(known.clone()));
                }
                let root = path.clone();
                let hash = tokio::task::spawn_blocking(move || tree_hash(&root))
                    .await
                    .expect("hashing does not panic")?;
                let known = format!("path:{hash}");
                *revision.lock().expect("not poisoned") = Some((Instant::now(), known.clone()));
                Some(known)
            }
            PackageSource::Channel(channel) => is_commit(channel).then(|| format!("nixpkgs:{channel}")),
            PackageSource::Git(url) => is_commit(tag).then(|| format!("git:{url}#{tag}")),
        })
    }
}

fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// sha256 over a directory tree's names, kinds, executable bits, file
/// contents and link targets, in name order; `.git` folders are left out.
fn tree_hash(root: &Path) -> std::io::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut hasher = Sha256::new();
    let walk = WalkDir::new(root).follow_links(false).sort_by_file_name().into_iter();
    for entry in walk.filter_entry(|e| e.file_name() != ".git") {
        let entry = entry?;
        let relative = entry.path().strip_prefix(root).expect("below root");
        hasher.update(relative.as_os_str().as_encoded_bytes());
        let kind = entry.file_type();
        if kind.is_dir() {
            hasher.update(b"\0dir\0");
        } else if kind.is_symlink() {
            hasher.update(b"\0link\0");
            hasher.update(std::fs::read_link(entry.path())?.as_os_str().as_encoded_bytes());
        } else {
            let executable = entry.metadata()?.permissions().mode() & 0o111 != 0;
            let contents = std::fs::read(entry.path())?;
            hasher.update(if executable { b"\0exe\0" } else { b"\0file" });
            hasher.update((contents.len() as u64).to_le_bytes());
            hasher.update(&contents);
        }
        hasher.update(b"\0");
    }
    Ok(hex::encode(hasher.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn git_tags_select_revisions() {
        let git = PackageSource::Git("https://example.invalid/pkgs.git".into());
        assert_eq!(
            git.for_tag("latest").args,
            r#"{"url":"https://example.invalid/pkgs.git"}"#
        );
        assert_eq!(
            git.for_tag("main").args,
            r#"{"ref":"main","url":"https://example.invalid/pkgs.git"}"#
        );
        assert_eq!(
            git.for_tag(COMMIT).args,
            format!(r#"{{"rev":"{COMMIT}","url":"https://example.invalid/pkgs.git"}}"#)
        );
        assert_eq!(git.for_tag("x").kind, "git");
    }

    #[tokio::test]
    async fn only_pinned_sources_have_revisions() {
        let git = PackageSource::Git("u".into());
        assert_eq!(git.revision("main").await.unwrap(), None);
        assert_eq!(git.revision(COMMIT).await.unwrap(), Some(format!("git:u#{COMMIT}")));
        assert_eq!(
            PackageSource::Channel("nixos-unstable".into())
                .revision("x")
                .await
                .unwrap(),
            None
        );
        assert_eq!(
            PackageSource::Channel(COMMIT.into()).revision("latest").await.unwrap(),
            Some(format!("nixpkgs:{COMMIT}"))
        );
    }

    #[tokio::test]
    async fn path_revision_follows_contents_not_location() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        for dir in [a.path(), b.path()] {
            std::fs::create_dir_all(dir.join("sub/.git")).unwrap();
            std::fs::write(dir.join("default.nix"), "{ }: { }").unwrap();
            std::fs::write(dir.join("sub/.git/HEAD"), dir.display().to_string()).unwrap();
        }
        let rev = |dir: &Path| tree_hash(dir).unwrap();
        assert_eq!(rev(a.path()), rev(b.path()), "same contents, other place, other .git");
        std::fs::write(b.path().join("sub/new.nix"), "1").unwrap();
        assert_ne!(rev(a.path()), rev(b.path()));

        let source = PackageSource::path(a.path().to_owned());
        let first = source.revision("latest").await.unwrap().unwrap();
        assert!(first.starts_with("path:"));
        assert_eq!(
            source.for_tag("anything"),
            NixSource {
                kind: "path",
                args: a.path().display().to_string()
            }
        );
    }
}
