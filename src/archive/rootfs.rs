//! The root filesystem layer: a symlink forest that makes the requested
//! packages visible at `/` (`/bin/hello` → `/nix/store/…-hello/bin/hello`),
//! plus what a container expects to find: `/tmp` (mode 1777), `/usr/bin/env`
//! and `/bin/sh` when the image has an `env` and a `bash`. Built from the
//! store paths on disk, without Nix.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use walkdir::WalkDir;

use super::{Compression, LayerDigests, LayerWriter};

#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    Dir { mode: u32 },
    Link(PathBuf),
}

/// The planned contents of the root filesystem layer, by path relative to `/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootFs {
    entries: BTreeMap<String, Node>,
}

impl RootFs {
    /// Merges the top-level trees of `packages` (store paths): directories
    /// become real directories, everything else a symlink into the store.
    /// Where two packages provide the same path, the first one wins. A
    /// package that is a single file adds nothing.
    pub fn plan(packages: &[String]) -> io::Result<Self> {
        let mut entries = BTreeMap::new();
        for package in packages {
            merge_package(&mut entries, Path::new(package))?;
        }
        let mut rootfs = RootFs { entries };
        rootfs.add_conventions();
        Ok(rootfs)
    }

    fn add_conventions(&mut self) {
        self.entries.insert("tmp".into(), Node::Dir { mode: 0o1777 });
        if let Some(env) = self.link_target("bin/env") {
            self.add_link("usr/bin/env", env);
        }
        if let Some(bash) = self.link_target("bin/bash") {
            self.add_link("bin/sh", bash);
        }
    }

    fn link_target(&self, path: &str) -> Option<PathBuf> {
        match self.entries.get(path) {
            Some(Node::Link(target)) => Some(target.clone()),
            _ => None,
        }
    }

    /// Adds a link and its parent directories, unless something of the image
    /// already stands at any of those places.
    fn add_link(&mut self, path: &str, target: PathBuf) {
        let parents: Vec<&str> = path.match_indices('/').map(|(i, _)| &path[..i]).collect();
        let blocked = parents
            .iter()
            .any(|p| matches!(self.entries.get(*p), Some(Node::Link(_))));
        if blocked || self.entries.contains_key(path) {
            return;
        }
        for parent in parents {
            self.entries
                .entry(parent.to_owned())
                .or_insert(Node::Dir { mode: 0o755 });
        }
        self.entries.insert(path.to_owned(), Node::Link(target));
    }

    /// Writes the layer.
    pub fn write<W: Write>(&self, out: W, compression: Compression) -> io::Result<(W, LayerDigests)> {
        let mut layer = LayerWriter::new(out, compression)?;
        for (path, node) in &self.entries {
            match node {
                Node::Dir { mode } => layer.directory(path, *mode)?,
                Node::Link(target) => layer.symlink(path, target)?,
            }
        }
        layer.finish()
    }
}

fn merge_package(entries: &mut BTreeMap<String, Node>, package: &Path) -> io::Result<()> {
    if !std::fs::symlink_metadata(package)?.is_dir() {
        return Ok(());
    }
    let mut walk = WalkDir::new(package)
        .min_depth(1)
        .follow_links(false)
        .sort_by_file_name()
        .into_iter();
    while let Some(entry) = walk.next() {
        let entry = entry?;
        let relative = entry
            .path()
            .strip_prefix(package)
            .ok()
            .and_then(Path::to_str)
            .ok_or_else(|| io::Error::other(format!("{} is not UTF-8", entry.path().display())))?
            .to_owned();
        if entry.file_type().is_dir() {
            match entries.get(&relative) {
                None => {
                    entries.insert(relative, Node::Dir { mode: 0o755 });
                }
                Some(Node::Dir { .. }) => {}
                Some(Node::Link(_)) => walk.skip_current_dir(),
            }
        } else {
            entries
                .entry(relative)
                .or_insert_with(|| Node::Link(entry.path().to_owned()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use tar::EntryType;

    use super::super::tests::entries;
    use super::*;

    fn package(root: &Path, name: &str, files: &[&str], links: &[(&str, &str)]) -> String {
        let p = root.join(name);
        for f in files {
            std::fs::create_dir_all(p.join(f).parent().unwrap()).unwrap();
            std::fs::write(p.join(f), name).unwrap();
        }
        for (l, target) in links {
            std::fs::create_dir_all(p.join(l).parent().unwrap()).unwrap();
            symlink(target, p.join(l)).unwrap();
        }
        p.display().to_string()
    }

    /// (name, kind, mode, link target) of each entry of the written layer.
    fn listing(rootfs: &RootFs) -> Vec<(String, EntryType, u32, Option<String>)> {
        let (gz, _) = rootfs.write(Vec::new(), Compression::Gzip(6)).unwrap();
        entries(&gz)
            .into_iter()
            .map(|(n, k, m, _, _, l, _)| (n, k, m, l))
            .collect()
    }

    #[test]
    fn forest_merges_packages_and_adds_conventions() {
        let dir = tempfile::tempdir().unwrap();
        let bash = package(dir.path(), "b-bash", &["bin/bash"], &[]);
        let core = package(dir.path(), "c-coreutils", &["bin/env", "bin/ls", "share/doc/c"], &[]);
        let hello = package(
            dir.path(),
            "h-hello",
            &["bin/hello", "bin/ls", "share/doc/h"],
            &[("lib", "lib64")],
        );
        std::fs::create_dir_all(Path::new(&hello).join("lib64")).unwrap();
        let single = dir.path().join("s-file");
        std::fs::write(&single, "just a file").unwrap();
        let single = single.display().to_string();

        let rootfs = RootFs::plan(&[bash.clone(), core.clone(), hello.clone(), single]).unwrap();
        let link = |n: &str, t: String| (n.to_owned(), EntryType::Symlink, 0o777, Some(t));
        let dir_entry = |n: &str, mode| (n.to_owned(), EntryType::Directory, mode, None);
        assert_eq!(
            listing(&rootfs),
            vec![
                dir_entry("bin", 0o755),
                link("bin/bash", format!("{bash}/bin/bash")),
                link("bin/env", format!("{core}/bin/env")),
                link("bin/hello", format!("{hello}/bin/hello")),
                link("bin/ls", format!("{core}/bin/ls")),
                link("bin/sh", format!("{bash}/bin/bash")),
                link("lib", format!("{hello}/lib")),
                dir_entry("lib64", 0o755),
                dir_entry("share", 0o755),
                dir_entry("share/doc", 0o755),
                link("share/doc/c", format!("{core}/share/doc/c")),
                link("share/doc/h", format!("{hello}/share/doc/h")),
                dir_entry("tmp", 0o1777),
                dir_entry("usr", 0o755),
                dir_entry("usr/bin", 0o755),
                link("usr/bin/env", format!("{core}/bin/env")),
            ]
        );
    }

    #[test]
    fn no_env_or_shell_links_without_their_targets() {
        let dir = tempfile::tempdir().unwrap();
        let hello = package(dir.path(), "h-hello", &["bin/hello"], &[]);
        let names: Vec<String> = listing(&RootFs::plan(&[hello]).unwrap())
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(names, ["bin", "bin/hello", "tmp"]);
    }

    #[test]
    fn a_package_shell_or_usr_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let bash = package(
            dir.path(),
            "b-bash",
            &["bin/bash", "bin/sh", "bin/env"],
            &[("usr", "/elsewhere")],
        );
        let rootfs = RootFs::plan(std::slice::from_ref(&bash)).unwrap();
        assert_eq!(
            rootfs.link_target("bin/sh"),
            Some(PathBuf::from(format!("{bash}/bin/sh")))
        );
        assert_eq!(rootfs.link_target("usr"), Some(PathBuf::from(format!("{bash}/usr"))));
        assert!(!rootfs.entries.contains_key("usr/bin/env"));
    }

    #[test]
    fn plan_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let a = package(dir.path(), "a-a", &["bin/a", "etc/x"], &[]);
        let b = package(dir.path(), "b-b", &["bin/b", "etc/y"], &[]);
        let (x, dx) = RootFs::plan(&[a.clone(), b.clone()])
            .unwrap()
            .write(Vec::new(), Compression::Gzip(6))
            .unwrap();
        let (y, dy) = RootFs::plan(&[a, b])
            .unwrap()
            .write(Vec::new(), Compression::Gzip(6))
            .unwrap();
        assert_eq!((x, dx), (y, dy));
    }
}
