//! Meta-packages: names that stand, at the start of an image name, for more
//! than one package (`shell`), for an architecture (`arm64`) or for a
//! non-root user (`nonroot`). The defaults are the original Nixery's two and
//! `nonroot`; a TOML file (`NIXERY_META_PACKAGES`) replaces them:
//!
//! ```toml
//! [shell]
//! packages = ["bashInteractive", "coreutils", "moreutils", "nano"]
//!
//! [arm64]
//! architecture = "arm64"
//!
//! [nonroot]
//! user = { name = "nixery", uid = 1000, gid = 1000 }
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use crate::arch::Arch;
use crate::reference;

/// The meta-packages a registry knows, by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetaPackages {
    by_name: BTreeMap<String, Meta>,
}

/// What one meta-package stands for.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Meta {
    /// Packages it adds.
    #[serde(default)]
    pub packages: Vec<String>,
    /// The architecture it pins.
    #[serde(default, deserialize_with = "architecture")]
    pub architecture: Option<Arch>,
    /// The user the image runs as.
    pub user: Option<User>,
}

/// A user an image runs as, with its own group and home directory.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Default `/home/<name>`.
    #[serde(default)]
    pub home: Option<String>,
}

impl User {
    pub fn home(&self) -> String {
        self.home.clone().unwrap_or_else(|| format!("/home/{}", self.name))
    }
}

/// Why a meta-package file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    #[error("cannot read {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path} is not a meta-package file: {source}")]
    Parse { path: String, source: toml::de::Error },
    #[error("meta-package {0:?} can never match: names are image name components ([a-z0-9], '.', '_', '-')")]
    BadName(String),
    #[error("meta-package {0:?} stands for nothing: give it packages, an architecture or a user")]
    Empty(String),
    #[error("the user of meta-package {0:?} must have a name of [a-z_][a-z0-9_-]* and a uid and gid other than 0")]
    BadUser(String),
}

impl Default for MetaPackages {
    fn default() -> Self {
        let meta = |packages: &[&str], architecture, user| Meta {
            packages: packages.iter().map(|p| p.to_string()).collect(),
            architecture,
            user,
        };
        let nonroot = User {
            name: "nixery".into(),
            uid: 1000,
            gid: 1000,
            home: None,
        };
        MetaPackages {
            by_name: BTreeMap::from([
                (
                    "shell".into(),
                    meta(&["bashInteractive", "coreutils", "moreutils", "nano"], None, None),
                ),
                ("arm64".into(), meta(&[], Some(Arch::Arm64), None)),
                ("nonroot".into(), meta(&[], None, Some(nonroot))),
            ]),
        }
    }
}

impl MetaPackages {
    /// Reads a TOML file of meta-packages, which replace the defaults.
    pub fn load(path: &Path) -> Result<Self, MetaError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| MetaError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            MetaError::Parse { source, .. } => MetaError::Parse { path: shown, source },
            other => other,
        })
    }

    fn parse(text: &str) -> Result<Self, MetaError> {
        let by_name: BTreeMap<String, Meta> = toml::from_str(text).map_err(|source| MetaError::Parse {
            path: String::new(),
            source,
        })?;
        for (name, meta) in &by_name {
            if reference::validate_name(name).is_err() || name.contains('/') {
                return Err(MetaError::BadName(name.clone()));
            }
            if meta == &Meta::default() {
                return Err(MetaError::Empty(name.clone()));
            }
            if let Some(user) = &meta.user
                && !valid_user(user)
            {
                return Err(MetaError::BadUser(name.clone()));
            }
        }
        Ok(MetaPackages { by_name })
    }

    pub fn get(&self, name: &str) -> Option<&Meta> {
        self.by_name.get(name)
    }

    /// The names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }
}

/// A name fit for /etc/passwd, and not root.
fn valid_user(user: &User) -> bool {
    let mut chars = user.name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    first_ok
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
        && user.uid != 0
        && user.gid != 0
        && user.home().starts_with('/')
        && !user.home().contains([':', '\n'])
}

fn architecture<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Arch>, D::Error> {
    let name = String::deserialize(deserializer)?;
    name.parse().map(Some).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_the_originals_and_nonroot() {
        let defaults = MetaPackages::default();
        assert_eq!(defaults.names().collect::<Vec<_>>(), ["arm64", "nonroot", "shell"]);
        assert_eq!(defaults.get("arm64").unwrap().architecture, Some(Arch::Arm64));
        assert_eq!(
            defaults.get("nonroot").unwrap().user.as_ref().unwrap().home(),
            "/home/nixery"
        );
    }

    #[test]
    fn a_file_replaces_the_defaults() {
        let metas = MetaPackages::parse(
            r#"
            [dev]
            packages = ["git", "curl"]
            [aarch64]
            architecture = "arm64"
            [app]
            user = { name = "app", uid = 10001, gid = 10001, home = "/srv/app" }
            "#,
        )
        .unwrap();
        assert_eq!(metas.names().collect::<Vec<_>>(), ["aarch64", "app", "dev"]);
        assert_eq!(metas.get("dev").unwrap().packages, ["git", "curl"]);
        assert_eq!(metas.get("app").unwrap().user.as_ref().unwrap().home(), "/srv/app");
        assert_eq!(metas.get("shell"), None);
    }

    #[test]
    fn bad_files_are_refused_by_name() {
        for (text, needle) in [
            ("[Shell]\npackages = [\"x\"]", "can never match"),
            ("[x]\n", "stands for nothing"),
            ("[x]\narchitecture = \"riscv\"", "riscv"),
            ("[x]\npackage = [\"a\"]", "unknown field"),
            ("[x]\nuser = { name = \"root\", uid = 0, gid = 0 }", "other than 0"),
            ("[x]\nuser = { name = \"a:b\", uid = 5, gid = 5 }", "must have a name"),
        ] {
            let error = MetaPackages::parse(text).unwrap_err().to_string();
            assert!(error.contains(needle), "{text}: {error}");
        }
    }
}
