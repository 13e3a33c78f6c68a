//! Package sources: where the package set comes from (a local path, a
//! nixpkgs channel tarball, a git repository, a flake), which image tags name
//! a revision of it, what Nix is told to import for such a tag, the revision
//! string that identifies the package set's contents so images can be
//! cached, and the labels that tell an image's users where it came from.
//! Listing a git repository's refs (`git ls-remote`) and locking a flake
//! (`nix flake metadata`) are run by [`crate::programs`], within
//! `GIT_LIST_TIMEOUT` and `FLAKE_LOCK_TIMEOUT`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};
use walkdir::WalkDir;

use crate::fresh::Fresh;
use crate::programs::{Invocation, Program, Programs, RunError};
use crate::redact;

/// How long a path source's content hash is trusted before it is taken again.
const PATH_REVISION_TTL: Duration = Duration::from_secs(5);
/// How long a git repository's list of refs, or a flake's lock, is trusted.
const GIT_REFS_TTL: Duration = Duration::from_secs(10);
/// How old a revision may be and still be used while it is refreshed, so
/// that requests do not wait for a refresh (hashing, `git ls-remote`).
const STALE_REVISION: Duration = Duration::from_secs(300);
/// How long locking a flake may take.
const FLAKE_LOCK_TIMEOUT: Duration = Duration::from_secs(60);
/// Where nixpkgs channel tarballs come from unless configured otherwise;
/// `{channel}` is the branch or commit.
pub const DEFAULT_CHANNEL_URL: &str = "https://github.com/NixOS/nixpkgs/archive/{channel}.tar.gz";
/// The channel allow-list entry that lets a tag name any nixpkgs commit.
pub const ANY_COMMIT: &str = "commits";
pub const SOURCE_LABEL: &str = "org.opencontainers.image.source";
pub const REVISION_LABEL: &str = "org.opencontainers.image.revision";
/// How long listing a git repository's refs may take.
const GIT_LIST_TIMEOUT: Duration = Duration::from_secs(30);
/// The tag that names a source's default revision.
pub const LATEST: &str = "latest";

/// Where packages come from, as configured.
#[derive(Debug)]
pub enum PackageSource {
    /// A package set on local disk (`NIXERY_PKGS_PATH`).
    Path {
        path: PathBuf,
        revision: Fresh<String, SourceError>,
    },
    /// A nixpkgs branch or commit, fetched as a tarball (`NIXERY_CHANNEL`).
    Channel(Channel),
    /// A git repository; the tag picks the revision (`NIXERY_PKGS_REPO`).
    Git {
        url: String,
        /// What `latest` names instead of `HEAD` (`NIXERY_DEFAULT_TAG`).
        default_tag: Option<String>,
        refs: Fresh<Arc<GitRefs>, SourceError>,
        /// Runs `git ls-remote`.
        programs: Programs,
    },
    /// A flake's `legacyPackages` (or `packages`) (`NIXERY_FLAKE`).
    Flake {
        reference: String,
        locked: Fresh<LockedFlake, SourceError>,
        /// Runs `nix flake metadata`.
        programs: Programs,
    },
}

/// A channel source: the channel `latest` names, where tarballs come from,
/// and the other channels (or any commit) a tag may name.
#[derive(Debug)]
pub struct Channel {
    pub channel: String,
    /// A URL with `{channel}` where the branch or commit goes.
    pub url_template: String,
    /// Channel names a tag may select, and [`ANY_COMMIT`] for any commit.
    pub allowed_tags: Vec<String>,
}

/// A flake locked to its current contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockedFlake {
    /// The locked flake reference Nix evaluates.
    url: String,
    /// Its content hash.
    nar_hash: String,
    /// Its commit, for flakes in git.
    rev: Option<String>,
}

/// The `srcType`/`srcArgs` pair the lookup expression imports from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NixSource {
    pub kind: &'static str,
    pub args: String,
}

/// A tag resolved against the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Resolved {
    pub nix: NixSource,
    /// What identifies the packages the tag names; `None` when only Nix can
    /// tell (an unpinned channel), so images must not be cached.
    pub revision: Option<String>,
    /// The image's labels: the source and, when known, its revision.
    pub labels: BTreeMap<String, String>,
}

/// The labels of an image from `source` (a URL loses its user-info and query).
fn labels(source: &str, revision: Option<&str>) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([(SOURCE_LABEL.to_owned(), redact::url(source))]);
    if let Some(revision) = revision {
        labels.insert(REVISION_LABEL.to_owned(), revision.to_owned());
    }
    labels
}

/// What a tag names in a source, before it is spelled out for Nix and for
/// the labels.
enum Pin<'a> {
    /// The package set's folder and its content hash.
    Path {
        folder: &'a Path,
        hash: String,
    },
    /// A channel's tarball, and the commit when the channel is one.
    Channel {
        url: String,
        commit: Option<String>,
    },
    /// A git commit, and the ref it was found at.
    Git {
        url: &'a str,
        reference: Option<String>,
        commit: String,
    },
    Flake {
        reference: &'a str,
        lock: LockedFlake,
    },
}

impl Pin<'_> {
    fn revision(&self) -> Option<String> {
        match self {
            Pin::Path { hash, .. } => Some(format!("path:{hash}")),
            Pin::Channel { url, commit } => commit.as_ref().map(|_| format!("tarball:{url}")),
            Pin::Git { url, commit, .. } => Some(format!("git:{url}#{commit}")),
            Pin::Flake { lock, .. } => Some(format!("flake:{}", lock.nar_hash)),
        }
    }

    fn resolved(self) -> Resolved {
        let revision = self.revision();
        let (nix, labels) = match self {
            Pin::Path { folder, hash } => (
                NixSource {
                    kind: "path",
                    args: folder.display().to_string(),
                },
                // Not the folder, which differs from machine to machine.
                labels("path", Some(&hash)),
            ),
            Pin::Channel { url, commit } => {
                let labels = labels(&url, commit.as_deref());
                (
                    NixSource {
                        kind: "tarball",
                        args: url,
                    },
                    labels,
                )
            }
            Pin::Git { url, reference, commit } => {
                let mut spec = serde_json::json!({ "url": url, "rev": commit });
                match reference {
                    Some(reference) => spec["ref"] = reference.into(),
                    None => spec["allRefs"] = true.into(),
                }
                let nix = NixSource {
                    kind: "git",
                    args: spec.to_string(),
                };
                (nix, labels(url, Some(&commit)))
            }
            Pin::Flake { reference, lock } => {
                let labels = labels(reference, Some(lock.rev.as_deref().unwrap_or(&lock.nar_hash)));
                (
                    NixSource {
                        kind: "flake",
                        args: lock.url,
                    },
                    labels,
                )
            }
        };
        Resolved { nix, revision, labels }
    }
}

/// Why a source could not tell its revisions. URLs in it have lost their
/// secrets; so have the messages of the commands it quotes.
#[derive(Clone, Debug, thiserror::Error)]
pub enum SourceError {
    #[error("hashing the package set failed: {0}")]
    Hash(String),
    #[error("listing the refs of {url} failed: {reason}")]
    GitList { url: String, reason: String },
    #[error("locking the flake {reference} failed: {reason}")]
    FlakeLock { reference: String, reason: String },
}

/// A git repository's branches and tags and the commits they point at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GitRefs {
    /// The branch `HEAD` points at and its commit.
    head: Option<(String, String)>,
    /// Short name → (full ref, commit). A branch wins over a tag of the same name.
    named: BTreeMap<String, (String, String)>,
}

/// Whether a lookup may refresh what the source knows (hash the folder,
/// list the git refs, lock the flake) or must make do with what it knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lookup {
    Refresh,
    KnownOnly,
}

impl PackageSource {
    pub fn path(path: PathBuf) -> Self {
        PackageSource::Path {
            path,
            revision: revision_cache(PATH_REVISION_TTL),
        }
    }

    /// A git source; it runs git with a runner of its own until
    /// [`with_programs`](Self::with_programs) gives it the registry's.
    pub fn git(url: String, default_tag: Option<String>) -> Self {
        PackageSource::Git {
            url,
            default_tag,
            refs: revision_cache(GIT_REFS_TTL),
            programs: Programs::default(),
        }
    }

    /// A flake source; it runs Nix with a runner of its own until
    /// [`with_programs`](Self::with_programs) gives it the registry's.
    pub fn flake(reference: String) -> Self {
        PackageSource::Flake {
            reference,
            locked: revision_cache(GIT_REFS_TTL),
            programs: Programs::default(),
        }
    }

    /// The source, running git and Nix through `programs` (so that they are
    /// counted in its metrics). Path and channel sources run nothing.
    pub fn with_programs(mut self, programs: Programs) -> Self {
        match &mut self {
            PackageSource::Git { programs: own, .. } | PackageSource::Flake { programs: own, .. } => {
                *own = programs;
            }
            PackageSource::Path { .. } | PackageSource::Channel(_) => {}
        }
        self
    }

    /// What an image with this tag is built from, or `None` when the tag
    /// names no revision of this source. Path and flake sources have one
    /// revision, `latest`; a channel has `latest` and the channels (or
    /// commits) its allow-list names; a git source has `latest` (its `HEAD`,
    /// or the default tag), its branches and tags, and any commit by its
    /// 40-hex id. At most one refresh of what the source knows runs at a
    /// time; while it runs, callers get what was known before.
    pub async fn resolve(&self, tag: &str) -> Result<Option<Resolved>, SourceError> {
        Ok(self.pin(tag, Lookup::Refresh).await?.map(Pin::resolved))
    }

    /// Like [`resolve`](Self::resolve), from what the source knows already,
    /// without running anything: `None` when that is nothing yet.
    pub async fn resolve_known(&self, tag: &str) -> Option<Resolved> {
        self.pin(tag, Lookup::KnownOnly).await.ok().flatten().map(Pin::resolved)
    }

    /// The pinned revision the tag names ([`Resolved::revision`]), and
    /// nothing else: what a pull of a tag answered before checks, without
    /// spelling out the rest.
    pub async fn revision(&self, tag: &str) -> Result<Option<String>, SourceError> {
        Ok(self.pin(tag, Lookup::Refresh).await?.and_then(|pin| pin.revision()))
    }

    async fn pin(&self, tag: &str, mode: Lookup) -> Result<Option<Pin<'_>>, SourceError> {
        match self {
            PackageSource::Path { path, revision } => {
                if tag != LATEST {
                    return Ok(None);
                }
                let hash = path_revision(path, revision, mode).await?;
                Ok(hash.map(|hash| Pin::Path { folder: path, hash }))
            }
            PackageSource::Channel(channel) => Ok(channel.pin(tag)),
            PackageSource::Git {
                url,
                default_tag,
                refs,
                programs,
            } => {
                let tag = match (tag, default_tag) {
                    (LATEST, Some(default)) => default.as_str(),
                    _ => tag,
                };
                let pinned = if is_commit(tag) {
                    Some((None, tag.to_owned()))
                } else {
                    let Some(refs) = git_refs(programs, url, refs, mode).await? else {
                        return Ok(None);
                    };
                    let named = match tag {
                        LATEST => refs.head.as_ref(),
                        _ => refs.named.get(tag),
                    };
                    named.map(|(name, commit)| (Some(name.clone()), commit.clone()))
                };
                Ok(pinned.map(|(reference, commit)| Pin::Git { url, reference, commit }))
            }
            PackageSource::Flake {
                reference,
                locked,
                programs,
            } => {
                if tag != LATEST {
                    return Ok(None);
                }
                let lock = lock_flake(programs, reference, locked, mode).await?;
                Ok(lock.map(|lock| Pin::Flake { reference, lock }))
            }
        }
    }

    /// What the source is, in words, for people (URLs without their secrets).
    pub fn describe(&self) -> String {
        match self {
            PackageSource::Path { path, .. } => format!("the package set in {}", path.display()),
            PackageSource::Channel(channel) => format!(
                "nixpkgs {} from {}",
                channel.channel,
                redact::url(&channel.url_template.replace("{channel}", &channel.channel))
            ),
            PackageSource::Git { url, .. } => format!("the git repository {}", redact::url(url)),
            PackageSource::Flake { reference, .. } => format!("the flake {}", redact::url(reference)),
        }
    }

    /// Every tag `resolve` accepts that can be listed (not bare commits), sorted.
    pub async fn tags(&self) -> Result<Vec<String>, SourceError> {
        self.list_tags(Lookup::Refresh).await
    }

    /// Like [`tags`](Self::tags), from what the source knows already.
    pub async fn tags_known(&self) -> Vec<String> {
        self.list_tags(Lookup::KnownOnly).await.unwrap_or_default()
    }

    async fn list_tags(&self, mode: Lookup) -> Result<Vec<String>, SourceError> {
        match self {
            PackageSource::Path { .. } | PackageSource::Flake { .. } => Ok(vec![LATEST.to_owned()]),
            PackageSource::Channel(channel) => {
                let mut tags: Vec<String> = channel
                    .allowed_tags
                    .iter()
                    .filter(|t| *t != ANY_COMMIT && crate::reference::is_tag(t))
                    .cloned()
                    .chain([LATEST.to_owned()])
                    .collect();
                tags.sort();
                tags.dedup();
                Ok(tags)
            }
            PackageSource::Git {
                url, refs, programs, ..
            } => {
                let Some(refs) = git_refs(programs, url, refs, mode).await? else {
                    return Ok(vec![]);
                };
                let mut tags: Vec<String> = refs
                    .named
                    .keys()
                    .filter(|name| crate::reference::is_tag(name))
                    .cloned()
                    .collect();
                if refs.head.is_some() && !tags.iter().any(|t| t == LATEST) {
                    tags.push(LATEST.to_owned());
                }
                tags.sort();
                Ok(tags)
            }
        }
    }
}

/// What a source knows of its revision, refreshed at most every `ttl`.
fn revision_cache<T>(ttl: Duration) -> Fresh<T, SourceError>
where
    T: Clone + Send + Sync + 'static,
{
    Fresh::new(ttl, STALE_REVISION)
}

/// The value `known` holds, refreshed by `refresh` when the lookup may;
/// `None` when it may not and nothing is known yet.
async fn refreshed<T, Fut>(
    known: &Fresh<T, SourceError>,
    mode: Lookup,
    refresh: impl FnOnce() -> Fut,
) -> Result<Option<T>, SourceError>
where
    T: Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<T, SourceError>> + Send + 'static,
{
    match mode {
        Lookup::Refresh => known.get(refresh).await.map(Some),
        Lookup::KnownOnly => Ok(known.known()),
    }
}

impl Channel {
    /// `latest` is the configured channel; another tag must be on the
    /// allow-list, or be a commit when the list allows any.
    fn pin(&self, tag: &str) -> Option<Pin<'static>> {
        let channel = if tag == LATEST {
            self.channel.as_str()
        } else if self.allowed_tags.iter().any(|t| t == tag)
            || (is_commit(tag) && self.allowed_tags.iter().any(|t| t == ANY_COMMIT))
        {
            tag
        } else {
            return None;
        };
        Some(Pin::Channel {
            url: self.url_template.replace("{channel}", channel),
            commit: is_commit(channel).then(|| channel.to_owned()),
        })
    }
}

/// The flake locked now, or within the last few seconds.
async fn lock_flake(
    programs: &Programs,
    reference: &str,
    known: &Fresh<LockedFlake, SourceError>,
    mode: Lookup,
) -> Result<Option<LockedFlake>, SourceError> {
    let (programs, reference) = (programs.clone(), reference.to_owned());
    refreshed(known, mode, || async move {
        let failed = |reason: String| SourceError::FlakeLock {
            reference: redact::url(&reference),
            reason,
        };
        let metadata = Invocation::new(Program::Nix, "flake metadata", FLAKE_LOCK_TIMEOUT)
            .args(["--extra-experimental-features", "nix-command flakes"])
            .args(["flake", "metadata", "--json", "--", &reference]);
        let stdout = programs.run(metadata).await.map_err(|e| failed(reason(e)))?;
        let lock = LockedFlake::parse(&stdout).map_err(failed)?;
        tracing::debug!(flake = %redact::url(&reference), nar_hash = %lock.nar_hash, "locked the flake");
        Ok(lock)
    })
    .await
}

impl LockedFlake {
    /// Reads `nix flake metadata --json`.
    fn parse(json: &[u8]) -> Result<Self, String> {
        let metadata: serde_json::Value = serde_json::from_slice(json).map_err(|e| e.to_string())?;
        let text = |value: &serde_json::Value| value.as_str().map(str::to_owned);
        Ok(LockedFlake {
            url: text(&metadata["url"]).ok_or("no locked url")?,
            nar_hash: text(&metadata["locked"]["narHash"]).ok_or("no narHash")?,
            rev: text(&metadata["locked"]["rev"]),
        })
    }
}

/// The package set's content hash, taken again at most every few seconds,
/// off the async workers.
async fn path_revision(
    path: &Path,
    known: &Fresh<String, SourceError>,
    mode: Lookup,
) -> Result<Option<String>, SourceError> {
    refreshed(known, mode, || {
        let root = path.to_owned();
        async move {
            let started = Instant::now();
            let hash = tokio::task::spawn_blocking(move || tree_hash(&root))
                .await
                .expect("hashing does not panic")
                .map_err(|e| SourceError::Hash(e.to_string()))?;
            tracing::debug!(millis = started.elapsed().as_millis() as u64, "hashed the package set");
            Ok(hash)
        }
    })
    .await
}

/// The repository's refs, listed again at most every few seconds.
async fn git_refs(
    programs: &Programs,
    url: &str,
    known: &Fresh<Arc<GitRefs>, SourceError>,
    mode: Lookup,
) -> Result<Option<Arc<GitRefs>>, SourceError> {
    let (programs, url) = (programs.clone(), url.to_owned());
    refreshed(known, mode, || async move {
        let listing = Invocation::new(Program::Git, "ls-remote", GIT_LIST_TIMEOUT)
            .args(["ls-remote", "--symref", "--", &url])
            .env("GIT_TERMINAL_PROMPT", "0");
        let stdout = programs.run(listing).await.map_err(|e| SourceError::GitList {
            url: redact::url(&url),
            reason: reason(e),
        })?;
        tracing::debug!(repository = %redact::url(&url), "listed the git refs");
        Ok(Arc::new(GitRefs::parse(&String::from_utf8_lossy(&stdout))))
    })
    .await
}

/// Why a lookup's program gave no stdout, in the words a source error
/// quotes: it could not start, gave no answer in time, or failed (its last
/// lines of stderr, without secrets).
fn reason(error: RunError) -> String {
    match error {
        RunError::Spawn { source, .. } => source.to_string(),
        RunError::TimedOut { after, .. } => format!("no answer in {} s", after.as_secs()),
        RunError::Failed { stderr, .. } => stderr.join("\n").trim().to_owned(),
    }
}

impl GitRefs {
    /// Reads `git ls-remote --symref` output.
    fn parse(listing: &str) -> Self {
        let mut head_branch = None;
        let mut commits: BTreeMap<&str, &str> = BTreeMap::new();
        for line in listing.lines() {
            match line.split_once('\t') {
                Some((symref, "HEAD")) if symref.starts_with("ref: ") => {
                    head_branch = Some(&symref["ref: ".len()..]);
                }
                Some((commit, name)) if is_commit(commit) => {
                    // An annotated tag's `^{}` line names the commit it points at.
                    match name.strip_suffix("^{}") {
                        Some(tag) => {
                            commits.insert(tag, commit);
                        }
                        None => {
                            commits.entry(name).or_insert(commit);
                        }
                    }
                }
                _ => {}
            }
        }
        let mut named = BTreeMap::new();
        for prefix in ["refs/tags/", "refs/heads/"] {
            for (full, commit) in commits.iter().filter(|(full, _)| full.starts_with(prefix)) {
                named.insert(full[prefix.len()..].to_owned(), (full.to_string(), commit.to_string()));
            }
        }
        let head = head_branch.and_then(|branch| Some((branch.to_owned(), commits.get(branch)?.to_string())));
        GitRefs { head, named }
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
    const OTHER: &str = "89abcdef0123456789abcdef0123456789abcdef";

    #[tokio::test]
    async fn path_and_channel_sources_serve_latest_only() {
        let dir = tempfile::tempdir().unwrap();
        let source = PackageSource::path(dir.path().to_owned());
        let latest = source.resolve("latest").await.unwrap().unwrap();
        assert_eq!(latest.nix.kind, "path");
        assert!(latest.revision.unwrap().starts_with("path:"));
        assert_eq!(source.resolve("missing-tag").await.unwrap(), None);
        assert_eq!(source.tags().await.unwrap(), ["latest"]);
    }

    fn channel(name: &str, allowed: &[&str]) -> PackageSource {
        PackageSource::Channel(Channel {
            channel: name.into(),
            url_template: "http://mirror/{channel}.tar.gz".into(),
            allowed_tags: allowed.iter().map(|t| t.to_string()).collect(),
        })
    }

    #[tokio::test]
    async fn channels_serve_latest_and_their_allow_list() {
        let unpinned = channel("nixos-unstable", &[]);
        let latest = unpinned.resolve("latest").await.unwrap().unwrap();
        assert_eq!(latest.revision, None, "a branch moves: not cached");
        assert_eq!(latest.nix.args, "http://mirror/nixos-unstable.tar.gz");
        assert_eq!(unpinned.resolve("v1").await.unwrap(), None);
        assert_eq!(
            unpinned.resolve(COMMIT).await.unwrap(),
            None,
            "commits need the allow-list"
        );

        let pinned = channel(COMMIT, &["nixos-24.05", ANY_COMMIT]);
        let latest = pinned.resolve("latest").await.unwrap().unwrap();
        assert_eq!(latest.revision, Some(format!("tarball:http://mirror/{COMMIT}.tar.gz")));
        assert_eq!(latest.labels[REVISION_LABEL], COMMIT);
        let other = pinned.resolve("nixos-24.05").await.unwrap().unwrap();
        assert_eq!(other.nix.args, "http://mirror/nixos-24.05.tar.gz");
        let commit = pinned.resolve(OTHER).await.unwrap().unwrap();
        assert_eq!(commit.nix.args, format!("http://mirror/{OTHER}.tar.gz"));
        assert_eq!(pinned.resolve("nixos-23.11").await.unwrap(), None);
        assert_eq!(pinned.tags().await.unwrap(), ["latest", "nixos-24.05"]);
    }

    #[test]
    fn flake_metadata_gives_the_lock() {
        let json = br#"{"locked":{"narHash":"sha256-x","rev":"abc","type":"git"},"url":"git+file:///r?rev=abc","originalUrl":"git+file:///r"}"#;
        let lock = LockedFlake::parse(json).unwrap();
        assert_eq!(lock.url, "git+file:///r?rev=abc");
        assert_eq!(lock.nar_hash, "sha256-x");
        assert_eq!(lock.rev.as_deref(), Some("abc"));
        assert!(LockedFlake::parse(b"{}").is_err());
    }

    #[test]
    fn git_listings_name_branches_tags_and_head() {
        let listing = format!(
            "ref: refs/heads/main\tHEAD\n{COMMIT}\tHEAD\n{COMMIT}\trefs/heads/main\n{OTHER}\trefs/heads/dev\n\
             {OTHER}\trefs/tags/dev\n{OTHER}\trefs/tags/v1\n{COMMIT}\trefs/tags/v1^{{}}\n{OTHER}\trefs/pull/1/head\n"
        );
        let refs = GitRefs::parse(&listing);
        assert_eq!(refs.head, Some(("refs/heads/main".into(), COMMIT.into())));
        assert_eq!(
            refs.named["dev"],
            ("refs/heads/dev".into(), OTHER.into()),
            "branches win"
        );
        assert_eq!(
            refs.named["v1"],
            ("refs/tags/v1".into(), COMMIT.into()),
            "tags are peeled"
        );
        assert_eq!(refs.named.keys().collect::<Vec<_>>(), ["dev", "main", "v1"]);
    }

    #[test]
    fn git_revisions_are_pinned_commits() {
        let git = |reference: Option<&str>, commit: &str| {
            let pin = Pin::Git {
                url: "u",
                reference: reference.map(str::to_owned),
                commit: commit.to_owned(),
            };
            let revision = pin.revision();
            let resolved = pin.resolved();
            assert_eq!(resolved.revision, revision, "the revision alone is the resolved one's");
            resolved
        };
        let branch = git(Some("refs/heads/dev"), OTHER);
        assert_eq!(
            branch.nix.args,
            format!(r#"{{"ref":"refs/heads/dev","rev":"{OTHER}","url":"u"}}"#)
        );
        assert_eq!(branch.revision, Some(format!("git:u#{OTHER}")));
        let commit = git(None, COMMIT);
        assert_eq!(
            commit.nix.args,
            format!(r#"{{"allRefs":true,"rev":"{COMMIT}","url":"u"}}"#)
        );
    }

    #[tokio::test]
    async fn a_git_repository_that_cannot_be_listed_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let source = PackageSource::git(dir.path().join("nothing").display().to_string(), None);
        assert!(matches!(source.resolve("main").await, Err(SourceError::GitList { .. })));
        let commit = source.resolve(COMMIT).await.unwrap().unwrap();
        assert_eq!(
            commit.revision.unwrap(),
            format!("git:{}#{COMMIT}", dir.path().join("nothing").display())
        );
    }

    #[tokio::test]
    async fn listing_git_refs_is_counted_in_the_given_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::default());
        let source = PackageSource::git(dir.path().join("nothing").display().to_string(), None)
            .with_programs(Programs::new(std::sync::Arc::clone(&metrics)));
        let Err(SourceError::GitList { reason, .. }) = source.resolve("main").await else {
            panic!("nothing to list");
        };
        assert!(!reason.is_empty(), "git's message");
        let counted = "nixery_nix_invocations_total{command=\"git\"} 1";
        assert!(metrics.encode().lines().any(|l| l == counted), "{}", metrics.encode());
    }

    #[test]
    fn reasons_read_as_before() {
        let timed_out = RunError::TimedOut {
            program: Program::Git,
            after: GIT_LIST_TIMEOUT,
        };
        assert_eq!(reason(timed_out), "no answer in 30 s");
        let failed = RunError::Failed {
            program: Program::Git,
            code: Some(128),
            stderr: vec!["fatal: one".into(), "fatal: two  ".into(), String::new()],
        };
        assert_eq!(reason(failed), "fatal: one\nfatal: two");
    }

    #[test]
    fn path_revision_follows_contents_not_location() {
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
    }
}
