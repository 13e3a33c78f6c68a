//! Image requests: a repository name and tag (checked against the
//! reference grammar, `reference.rs`), its leading meta-packages expanded
//! (`meta.rs`), made into the canonical request the rest of nixery works
//! from. Nothing here runs Nix.

use crate::arch::Arch;
use crate::meta::{MetaPackages, User};
use crate::reference::{self, NameError};
use std::fmt;

/// Packages every image gets, as in the original since 2019-10.
pub const ALWAYS: [&str; 2] = ["cacert", "iana-etc"];

/// The package whose presence makes `bash` the image's default command.
pub const BASH: &str = "bashInteractive";

/// A request for one image: what to put in it and, when the name pins one,
/// for which architecture.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRequest {
    /// The requested components, meta-packages included, sorted and without
    /// duplicates: `shell/htop/htop` and `htop/shell` are both `htop/shell`.
    pub name: String,
    /// The name as the client wrote it (`shell/htop`): what pages, logs and
    /// documents show.
    pub asked: String,
    pub tag: String,
    /// The packages to install, meta-packages expanded and `cacert` and
    /// `iana-etc` added, sorted and without duplicates.
    pub packages: Vec<String>,
    /// The packages the name asks for, meta-packages expanded, without the
    /// ones every image gets.
    pub requested: Vec<String>,
    /// Set when a leading meta-package pins an architecture (`arm64`);
    /// otherwise the registry's configured architectures apply.
    pub pinned_arch: Option<Arch>,
    /// The user the image runs as when a meta-package names one; else root.
    pub user: Option<User>,
    /// The meta-packages the name starts with, and the packages each adds.
    pub metas: Vec<(String, Vec<String>)>,
}

impl ImageRequest {
    /// Parses the repository name of a pull (`shell/git/htop`) and its tag.
    /// Meta-packages count only as a leading run of components; elsewhere
    /// their names are ordinary package names, as in the original.
    pub fn parse(name: &str, tag: &str, metas: &MetaPackages) -> Result<Self, NameError> {
        reference::validate_name(name)?;
        if !reference::is_tag(tag) {
            return Err(NameError::InvalidTag(tag.to_owned()));
        }
        let components: Vec<&str> = name.split('/').collect();
        let meta_len = components.iter().take_while(|c| metas.get(c).is_some()).count();
        let (meta_names, named) = components.split_at(meta_len);
        let meta: Vec<_> = meta_names.iter().filter_map(|c| metas.get(c)).collect();

        let mut requested: Vec<String> = named.iter().map(|s| s.to_string()).collect();
        requested.extend(meta.iter().flat_map(|m| m.packages.iter().cloned()));
        requested.sort();
        requested.dedup();
        let mut packages = requested.clone();
        packages.extend(ALWAYS.iter().map(|s| s.to_string()));
        packages.sort();
        packages.dedup();

        let mut canonical = components.clone();
        canonical.sort_unstable();
        canonical.dedup();

        Ok(ImageRequest {
            name: canonical.join("/"),
            asked: name.to_owned(),
            tag: tag.to_owned(),
            packages,
            requested,
            pinned_arch: meta.iter().find_map(|m| m.architecture),
            user: meta.iter().find_map(|m| m.user.clone()),
            metas: (meta_names.iter().zip(&meta))
                .map(|(name, m)| (name.to_string(), m.packages.clone()))
                .collect(),
        })
    }

    /// The one package the name asks for, if it asks for exactly one.
    pub fn sole_package(&self) -> Option<&str> {
        match self.requested.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }

    /// Whether the image's default command is `bash`.
    pub fn has_bash(&self) -> bool {
        self.packages.iter().any(|p| p == BASH)
    }
}

/// The image as asked for: `shell/htop:latest`.
impl fmt::Display for ImageRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.asked, self.tag)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(name: &str) -> ImageRequest {
        ImageRequest::parse(name, "latest", &MetaPackages::default()).unwrap()
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn shown_as_asked_and_cached_as_canonical() {
        let (a, b) = (parse("shell/hello"), parse("shell/hello/hello"));
        assert_eq!(
            (a.to_string(), b.to_string()),
            ("shell/hello:latest".into(), "shell/hello/hello:latest".into())
        );
        assert_eq!((a.name, a.packages), (b.name, b.packages));
    }

    // The five cases of the original's builder_test.go.
    #[test]
    fn original_single_package() {
        let r = parse("hello");
        assert_eq!(r.name, "hello");
        assert_eq!(r.packages, strings(&["cacert", "hello", "iana-etc"]));
        assert_eq!(r.pinned_arch, None);
    }

    #[test]
    fn original_several_packages_are_sorted() {
        let r = parse("hello/git/htop");
        assert_eq!(r.name, "git/hello/htop");
        assert_eq!(r.packages, strings(&["cacert", "git", "hello", "htop", "iana-etc"]));
    }

    #[test]
    fn original_solo_meta_package() {
        let r = parse("shell");
        assert_eq!(r.name, "shell");
        assert_eq!(
            r.packages,
            strings(&[
                "bashInteractive",
                "cacert",
                "coreutils",
                "iana-etc",
                "moreutils",
                "nano"
            ])
        );
        assert!(r.has_bash());
    }

    #[test]
    fn original_meta_package_and_package() {
        let r = parse("shell/htop");
        assert_eq!(r.name, "htop/shell");
        assert_eq!(
            r.packages,
            strings(&[
                "bashInteractive",
                "cacert",
                "coreutils",
                "htop",
                "iana-etc",
                "moreutils",
                "nano"
            ])
        );
    }

    #[test]
    fn original_arm64() {
        let r = parse("shell/arm64");
        assert_eq!(r.name, "arm64/shell");
        assert_eq!(r.packages, parse("shell").packages);
        assert_eq!(r.pinned_arch, Some(Arch::Arm64));
        assert_eq!(Arch::Arm64.nix_system(), "aarch64-linux");
    }

    #[test]
    fn duplicates_are_removed() {
        let r = parse("shell/shell/hello/hello");
        assert_eq!(r.name, "hello/shell");
        assert_eq!(r.packages, parse("shell/hello").packages);
        let r = parse("hello/hello/shell");
        assert_eq!(r.packages, strings(&["cacert", "hello", "iana-etc", "shell"]));
        assert!(!r.has_bash(), "shell after a package is an ordinary package name");
        assert_eq!(
            parse("cacert/hello").packages,
            strings(&["cacert", "hello", "iana-etc"])
        );
    }

    #[test]
    fn meta_packages_only_lead() {
        let r = parse("arm64/shell/arm64/hello");
        assert_eq!(r.pinned_arch, Some(Arch::Arm64));
        assert!(r.has_bash());
        let r = parse("hello/arm64");
        assert_eq!(r.pinned_arch, None);
        assert!(r.packages.contains(&"arm64".to_string()));
    }

    #[test]
    fn nonroot_names_a_user_and_no_package() {
        let r = parse("nonroot/hello");
        assert_eq!(r.user.as_ref().map(|u| u.uid), Some(1000));
        assert_eq!(r.sole_package(), Some("hello"));
        assert_eq!(parse("hello").user, None);
        assert_eq!(parse("shell/hello").sole_package(), None, "shell adds packages");
        assert_eq!(parse("hello/git").sole_package(), None);
    }

    #[test]
    fn order_does_not_matter() {
        assert_eq!(parse("shell/htop/git").packages, parse("shell/git/htop").packages);
        assert_eq!(parse("arm64/shell/htop").name, parse("shell/arm64/htop").name);
    }

    #[test]
    fn names_follow_the_reference_grammar() {
        for good in [
            "a",
            "7zip",
            "python3packages.numpy",
            "a_b",
            "a__b",
            "a---b",
            "tools.jq/x.y",
        ] {
            assert!(
                ImageRequest::parse(good, "latest", &MetaPackages::default()).is_ok(),
                "{good}"
            );
        }
        for bad in [
            "", "Hello", "a//b", "/a", "a/", "_a", "a.", "a..b", "a___b", "a+b", "a b", "a/../b",
        ] {
            assert_eq!(
                ImageRequest::parse(bad, "latest", &MetaPackages::default()),
                Err(NameError::InvalidName(bad.to_owned())),
                "{bad:?}"
            );
        }
        let long = vec!["abcdefghij"; 24].join("/");
        assert!(long.len() > reference::MAX_NAME_LEN);
        assert_eq!(
            ImageRequest::parse(&long, "latest", &MetaPackages::default()),
            Err(NameError::NameTooLong)
        );
    }

    #[test]
    fn tags_follow_the_reference_grammar() {
        for good in ["latest", "v1.2.3", "_x", "A-b.c_d", &"a".repeat(128)] {
            assert!(reference::is_tag(good), "{good}");
        }
        for bad in [
            "",
            ".INVALID_MANIFEST_NAME",
            "-x",
            "a:b",
            "sha256:abc",
            &"a".repeat(129),
        ] {
            assert!(!reference::is_tag(bad), "{bad}");
            assert_eq!(
                ImageRequest::parse("hello", bad, &MetaPackages::default()),
                Err(NameError::InvalidTag(bad.to_owned()))
            );
        }
    }
}
