//! The root filesystem layer: a symlink forest that makes the requested
//! packages visible at `/` (`/bin/hello` → `/nix/store/…-hello/bin/hello`),
//! plus what a container expects to find: `/tmp` (mode 1777), `/usr/bin/env`
//! and `/bin/sh` when the image has an `env` and a `bash`, and
//! `/etc/passwd`, `/etc/group` and `/etc/nsswitch.conf` naming root, nobody
//! and the image's own user if it has one (with its home directory), unless
//! a package brings them. Built from the store paths on disk, without Nix.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use walkdir::WalkDir;

use super::{Compression, LayerDigests, LayerWriter};
use crate::meta::User;

const NSSWITCH: &str = "passwd: files\ngroup: files\nshadow: files\nhosts: files dns\n";

#[derive(Clone, Debug, PartialEq, Eq)]
enum Node {
    Dir { mode: u32, owner: (u32, u32) },
    Link(PathBuf),
    File { mode: u32, contents: String },
}

/// A directory of root's.
const fn dir(mode: u32) -> Node {
    Node::Dir { mode, owner: (0, 0) }
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
    pub fn plan(packages: &[String], user: Option<&User>) -> io::Result<Self> {
        let mut entries = BTreeMap::new();
        for package in packages {
            merge_package(&mut entries, Path::new(package))?;
        }
        let mut rootfs = RootFs { entries };
        rootfs.add_conventions();
        rootfs.add_accounts(user);
        Ok(rootfs)
    }

    fn add_conventions(&mut self) {
        self.entries.insert("tmp".into(), dir(0o1777));
        if let Some(env) = self.link_target("bin/env") {
            self.add("usr/bin/env", Node::Link(env));
        }
        if let Some(bash) = self.link_target("bin/bash") {
            self.add("bin/sh", Node::Link(bash));
        }
    }

    /// The account files, and the user's home directory.
    fn add_accounts(&mut self, user: Option<&User>) {
        let mut passwd = String::from("root:x:0:0:root:/root:/bin/sh\n");
        let mut group = String::from("root:x:0:\n");
        if let Some(user) = user {
            let home = user.home();
            passwd += &format!("{0}:x:{1}:{2}:{0}:{home}:/bin/sh\n", user.name, user.uid, user.gid);
            group += &format!("{}:x:{}:\n", user.name, user.gid);
            self.add(
                home.trim_start_matches('/'),
                Node::Dir {
                    mode: 0o755,
                    owner: (user.uid, user.gid),
                },
            );
        }
        passwd += "nobody:x:65534:65534:nobody:/var/empty:/bin/false\n";
        group += "nogroup:x:65534:\n";
        let file = |contents: String| Node::File { mode: 0o644, contents };
        self.add("etc/passwd", file(passwd));
        self.add("etc/group", file(group));
        self.add("etc/nsswitch.conf", file(NSSWITCH.to_owned()));
        self.add("root", dir(0o700));
    }

    fn link_target(&self, path: &str) -> Option<PathBuf> {
        match self.entries.get(path) {
            Some(Node::Link(target)) => Some(target.clone()),
            _ => None,
        }
    }

    /// Adds an entry and its parent directories, unless something of the
    /// image already stands there or a link stands at a parent.
    fn add(&mut self, path: &str, node: Node) {
        let parents: Vec<&str> = path.match_indices('/').map(|(i, _)| &path[..i]).collect();
        let blocked = parents
            .iter()
            .any(|p| matches!(self.entries.get(*p), Some(Node::Link(_))));
        if blocked || self.entries.contains_key(path) {
            return;
        }
        for parent in parents {
            self.entries.entry(parent.to_owned()).or_insert(dir(0o755));
        }
        self.entries.insert(path.to_owned(), node);
    }

    /// Writes the layer.
    pub fn write<W: Write>(&self, out: W, compression: Compression) -> io::Result<(W, LayerDigests)> {
        let mut layer = LayerWriter::new(out, compression)?;
        for (path, node) in &self.entries {
            match node {
                Node::Dir { mode, owner } => layer.directory_owned(path, *mode, *owner)?,
                Node::Link(target) => layer.symlink(path, target)?,
                Node::File { mode, contents } => layer.file(path, *mode, contents.len() as u64, contents.as_bytes())?,
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
                    entries.insert(relative, dir(0o755));
                }
                Some(Node::Dir { .. }) => {}
                Some(Node::Link(_) | Node::File { .. }) => walk.skip_current_dir(),
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

        let rootfs = RootFs::plan(&[bash.clone(), core.clone(), hello.clone(), single], None).unwrap();
        let link = |n: &str, t: String| (n.to_owned(), EntryType::Symlink, 0o777, Some(t));
        let dir_entry = |n: &str, mode| (n.to_owned(), EntryType::Directory, mode, None);
        let file = |n: &str| (n.to_owned(), EntryType::Regular, 0o644, None);
        assert_eq!(
            listing(&rootfs),
            vec![
                dir_entry("bin", 0o755),
                link("bin/bash", format!("{bash}/bin/bash")),
                link("bin/env", format!("{core}/bin/env")),
                link("bin/hello", format!("{hello}/bin/hello")),
                link("bin/ls", format!("{core}/bin/ls")),
                link("bin/sh", format!("{bash}/bin/bash")),
                dir_entry("etc", 0o755),
                file("etc/group"),
                file("etc/nsswitch.conf"),
                file("etc/passwd"),
                link("lib", format!("{hello}/lib")),
                dir_entry("lib64", 0o755),
                dir_entry("root", 0o700),
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
        let names: Vec<String> = listing(&RootFs::plan(&[hello], None).unwrap())
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(
            names,
            [
                "bin",
                "bin/hello",
                "etc",
                "etc/group",
                "etc/nsswitch.conf",
                "etc/passwd",
                "root",
                "tmp"
            ]
        );
    }

    /// The contents of `name` in the written layer.
    fn contents(rootfs: &RootFs, name: &str) -> String {
        let (gz, _) = rootfs.write(Vec::new(), Compression::Gzip(6)).unwrap();
        let entry = entries(&gz).into_iter().find(|e| e.0 == name).unwrap();
        String::from_utf8(entry.6).unwrap()
    }

    #[test]
    fn accounts_name_root_nobody_and_the_image_user() {
        let dir = tempfile::tempdir().unwrap();
        let hello = package(dir.path(), "h-hello", &["bin/hello"], &[]);
        let plain = RootFs::plan(std::slice::from_ref(&hello), None).unwrap();
        assert_eq!(
            contents(&plain, "etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/var/empty:/bin/false\n"
        );
        assert_eq!(contents(&plain, "etc/group"), "root:x:0:\nnogroup:x:65534:\n");
        assert!(contents(&plain, "etc/nsswitch.conf").starts_with("passwd: files\n"));

        let user = User {
            name: "app".into(),
            uid: 1000,
            gid: 1001,
            home: None,
        };
        let with_user = RootFs::plan(&[hello], Some(&user)).unwrap();
        assert!(contents(&with_user, "etc/passwd").contains("\napp:x:1000:1001:app:/home/app:/bin/sh\n"));
        assert!(contents(&with_user, "etc/group").contains("\napp:x:1001:\n"));
        let (gz, _) = with_user.write(Vec::new(), Compression::Gzip(6)).unwrap();
        let home = entries(&gz).into_iter().find(|e| e.0 == "home/app").unwrap();
        assert_eq!((home.1, home.2, home.3), (EntryType::Directory, 0o755, 1000));
    }

    #[test]
    fn a_package_with_its_own_passwd_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let accounts = package(dir.path(), "a-accounts", &["etc/passwd"], &[]);
        let rootfs = RootFs::plan(std::slice::from_ref(&accounts), None).unwrap();
        assert_eq!(
            rootfs.link_target("etc/passwd"),
            Some(PathBuf::from(format!("{accounts}/etc/passwd")))
        );
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
        let rootfs = RootFs::plan(std::slice::from_ref(&bash), None).unwrap();
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
        let (x, dx) = RootFs::plan(&[a.clone(), b.clone()], None)
            .unwrap()
            .write(Vec::new(), Compression::Gzip(6))
            .unwrap();
        let (y, dy) = RootFs::plan(&[a, b], None)
            .unwrap()
            .write(Vec::new(), Compression::Gzip(6))
            .unwrap();
        assert_eq!((x, dx), (y, dy));
    }
}
