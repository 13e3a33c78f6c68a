//! Layer archives: deterministic tar streams, compressed (`compress.rs`),
//! with the uncompressed digest (diff_id) and the compressed digest and size
//! computed in the same streaming pass: tar → sha256 → compressor → sha256
//! and byte count → the storage writer, through bounded buffers.
//!
//! Every entry is normalised so that the bytes depend only on the store
//! contents: sorted entries, `nix` and `nix/store` first, directory entries
//! included, uid/gid 0 (`root`), mtime 1 (1970-01-01T00:00:01, as
//! dockerTools and nix2container), modes 0555/0444 for store contents,
//! hardlinks written as regular files, names relative to `/`, GNU long-name
//! records for long paths and link targets. The gzip header carries no name
//! and no time.

mod compress;
mod rootfs;

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use tar::{EntryType, Header};
use walkdir::WalkDir;

use crate::digest::{Digest, DigestWriter};

pub use compress::{Compression, Compressor, DEFAULT_GZIP_LEVEL, DEFAULT_ZSTD_LEVEL};
pub use rootfs::RootFs;

/// Modification time of every entry.
const MTIME: u64 = 1;

/// What identifies a packed layer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerDigests {
    /// sha256 of the compressed blob.
    pub digest: Digest,
    /// sha256 of the uncompressed tar.
    pub diff_id: Digest,
    /// Size of the compressed blob.
    pub size: u64,
}

type Stream<W> = DigestWriter<Compressor<DigestWriter<W>>>;

/// Writes one layer: entries in, compressed bytes to `out`, digests at the end.
pub struct LayerWriter<W: Write> {
    tar: tar::Builder<Stream<W>>,
}

impl<W: Write> LayerWriter<W> {
    pub fn new(out: W, compression: Compression) -> io::Result<Self> {
        let compressor = Compressor::new(DigestWriter::new(out), compression)?;
        let mut tar = tar::Builder::new(DigestWriter::new(compressor));
        tar.follow_symlinks(false);
        Ok(LayerWriter { tar })
    }

    /// A directory entry of root's; `name` is relative to `/`.
    pub fn directory(&mut self, name: &str, mode: u32) -> io::Result<()> {
        self.directory_owned(name, mode, (0, 0))
    }

    /// A directory entry owned by `(uid, gid)`.
    pub fn directory_owned(&mut self, name: &str, mode: u32, (uid, gid): (u32, u32)) -> io::Result<()> {
        let mut header = header(EntryType::Directory, mode, 0);
        if (uid, gid) != (0, 0) {
            header.set_uid(uid.into());
            header.set_gid(gid.into());
            header.set_username("")?;
            header.set_groupname("")?;
        }
        self.tar.append_data(&mut header, name, io::empty())
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &Path) -> io::Result<()> {
        let mut header = header(EntryType::Symlink, 0o777, 0);
        self.tar.append_link(&mut header, name, target)
    }

    /// A regular file with `size` bytes read from `data`.
    pub fn file(&mut self, name: &str, mode: u32, size: u64, data: impl io::Read) -> io::Result<()> {
        let mut header = header(EntryType::Regular, mode, size);
        self.tar.append_data(&mut header, name, data)
    }

    /// A store path and everything below it, in name order.
    pub fn store_path(&mut self, store_path: &Path) -> io::Result<()> {
        for entry in WalkDir::new(store_path).follow_links(false).sort_by_file_name() {
            let entry = entry?;
            let path = entry.path();
            let name = path
                .strip_prefix("/")
                .map_err(|_| io::Error::other(format!("{} is not an absolute path", path.display())))?
                .to_str()
                .ok_or_else(|| io::Error::other(format!("{} is not UTF-8", path.display())))?;
            let file_type = entry.file_type();
            if file_type.is_dir() {
                self.directory(name, 0o555)?;
            } else if file_type.is_symlink() {
                self.symlink(name, &std::fs::read_link(path)?)?;
            } else if file_type.is_file() {
                let file = File::open(path)?;
                let meta = file.metadata()?;
                let mode = if meta.permissions().mode() & 0o111 != 0 {
                    0o555
                } else {
                    0o444
                };
                self.file(name, mode, meta.len(), file)?;
            } else {
                return Err(io::Error::other(format!(
                    "{} is not a file, directory or symlink",
                    path.display()
                )));
            }
        }
        Ok(())
    }

    /// Ends the archive and the compressed stream; returns `out` and the digests.
    pub fn finish(self) -> io::Result<(W, LayerDigests)> {
        let (compressor, diff_id, _) = self.tar.into_inner()?.finish();
        let (out, digest, size) = compressor.finish()?.finish();
        Ok((out, LayerDigests { digest, diff_id, size }))
    }
}

fn header(kind: EntryType, mode: u32, size: u64) -> Header {
    let mut header = Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(MTIME);
    // Both names are short ASCII: these cannot fail.
    header.set_username("root").expect("fits");
    header.set_groupname("root").expect("fits");
    header
}

/// Packs whole store paths into one layer: `nix/`, `nix/store/`, then each
/// path in sorted order.
pub fn write_store_layer<W: Write>(
    store_paths: &[String],
    out: W,
    compression: Compression,
) -> io::Result<(W, LayerDigests)> {
    let mut sorted: Vec<&String> = store_paths.iter().collect();
    sorted.sort();
    let mut layer = LayerWriter::new(out, compression)?;
    layer.directory("nix", 0o755)?;
    layer.directory("nix/store", 0o755)?;
    for path in sorted {
        layer.store_path(Path::new(path))?;
    }
    layer.finish()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::io::Read;
    use std::os::unix::fs::symlink;

    use super::*;

    /// The entries of a gzip-compressed tar: (name, type, mode, uid, mtime, link target, data).
    pub(crate) type EntryInfo = (String, EntryType, u32, u64, u64, Option<String>, Vec<u8>);

    pub(crate) fn entries(gz: &[u8]) -> Vec<EntryInfo> {
        let mut archive = tar::Archive::new(flate2::read::MultiGzDecoder::new(gz));
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let name = e.path().unwrap().to_str().unwrap().to_owned();
                let link = e.link_name().unwrap().map(|l| l.to_str().unwrap().to_owned());
                let h = e.header().clone();
                let mut data = Vec::new();
                e.read_to_end(&mut data).unwrap();
                (
                    name,
                    h.entry_type(),
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    h.mtime().unwrap(),
                    link,
                    data,
                )
            })
            .collect()
    }

    fn gunzip(gz: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(gz).read_to_end(&mut out).unwrap();
        out
    }

    /// A fake store path with a file, an executable, a symlink, an empty
    /// directory, a hardlink and a long name, made with the given umask-ish
    /// permissions so that normalisation is visible.
    fn fake_store_path(root: &Path, name: &str) -> String {
        let p = root.join(name);
        std::fs::create_dir_all(p.join("bin")).unwrap();
        std::fs::create_dir_all(p.join("share/empty")).unwrap();
        std::fs::write(p.join("bin/tool"), b"#!/bin/sh\necho tool\n").unwrap();
        std::fs::set_permissions(p.join("bin/tool"), std::fs::Permissions::from_mode(0o751)).unwrap();
        std::fs::write(p.join("share/data"), vec![7u8; 10_000]).unwrap();
        std::fs::hard_link(p.join("share/data"), p.join("share/data-hardlink")).unwrap();
        symlink("../bin/tool", p.join("share/link")).unwrap();
        let long = format!("share/{}", "long-name-".repeat(15));
        std::fs::write(p.join(&long), b"long").unwrap();
        symlink(format!("/nix/store/{}", "t".repeat(120)), p.join("share/long-target")).unwrap();
        p.display().to_string()
    }

    #[test]
    fn store_layer_is_normalised_and_complete() {
        let dir = tempfile::tempdir().unwrap();
        let path = fake_store_path(dir.path(), "abc-pkg");
        let (gz, digests) = write_store_layer(std::slice::from_ref(&path), Vec::new(), Compression::Gzip(6)).unwrap();
        let prefix = path.trim_start_matches('/');
        let got = entries(&gz);
        let names: Vec<&str> = got.iter().map(|e| e.0.as_str()).collect();
        let long = format!("{prefix}/share/{}", "long-name-".repeat(15));
        assert_eq!(names[..2], ["nix", "nix/store"]);
        let own: Vec<String> = names[2..].iter().map(|n| n.to_string()).collect();
        let mut expected_own = vec![
            prefix.to_owned(),
            format!("{prefix}/bin"),
            format!("{prefix}/bin/tool"),
            format!("{prefix}/share"),
            format!("{prefix}/share/data"),
            format!("{prefix}/share/data-hardlink"),
            format!("{prefix}/share/empty"),
            format!("{prefix}/share/link"),
            format!("{prefix}/share/long-target"),
            long.clone(),
        ];
        expected_own.sort();
        // The walk is depth-first in name order; within `share` that is sorted.
        assert_eq!(own, expected_own);
        for (name, kind, mode, uid, mtime, link, data) in &got {
            assert_eq!((*uid, *mtime), (0, 1), "{name}");
            match kind {
                EntryType::Directory if name.starts_with("nix/store/") || name.starts_with("tmp") => {
                    assert_eq!(*mode, 0o555, "{name}")
                }
                EntryType::Directory => assert_eq!(*mode, 0o755, "{name}"),
                EntryType::Symlink => assert_eq!(*mode, 0o777, "{name}"),
                EntryType::Regular => assert!(*mode == 0o444 || *mode == 0o555, "{name}"),
                other => panic!("{name}: unexpected entry type {other:?}"),
            }
            if name.ends_with("bin/tool") {
                assert_eq!(*mode, 0o555);
            }
            if name.ends_with("data-hardlink") {
                assert_eq!(*kind, EntryType::Regular, "hardlinks become files");
                assert_eq!(data.len(), 10_000);
            }
            if name.ends_with("long-target") {
                assert_eq!(
                    link.as_deref(),
                    Some(format!("/nix/store/{}", "t".repeat(120)).as_str())
                );
            }
        }
        assert_eq!(digests.size, gz.len() as u64);
        assert_eq!(digests.digest, Digest::of(&gz));
        assert_eq!(digests.diff_id, Digest::of(&gunzip(&gz)));
    }

    #[test]
    fn same_contents_give_same_bytes() {
        let one = tempfile::tempdir().unwrap();
        let path = fake_store_path(one.path(), "xyz-same");
        let (first, d1) = write_store_layer(std::slice::from_ref(&path), Vec::new(), Compression::Gzip(6)).unwrap();
        std::fs::remove_dir_all(one.path().join("xyz-same")).unwrap();
        // Recreate with other timestamps and a different creation order.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let again = fake_store_path(one.path(), "xyz-same");
        assert_eq!(again, path);
        let (second, d2) = write_store_layer(&[path], Vec::new(), Compression::Gzip(6)).unwrap();
        assert_eq!(first, second);
        assert_eq!(d1, d2);
    }

    #[test]
    fn store_paths_are_sorted_whatever_the_input_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = fake_store_path(dir.path(), "aaa-one");
        let b = fake_store_path(dir.path(), "bbb-two");
        let (x, _) = write_store_layer(&[a.clone(), b.clone()], Vec::new(), Compression::Gzip(6)).unwrap();
        let (y, _) = write_store_layer(&[b, a], Vec::new(), Compression::Gzip(6)).unwrap();
        assert_eq!(x, y);
    }

    #[test]
    fn gzip_header_has_no_name_and_no_time() {
        let (gz, _) = LayerWriter::new(Vec::new(), Compression::Gzip(6))
            .unwrap()
            .finish()
            .unwrap();
        assert_eq!(&gz[..4], &[0x1f, 0x8b, 8, 0], "no FNAME/FEXTRA/FCOMMENT flags");
        assert_eq!(&gz[4..8], &[0, 0, 0, 0], "mtime 0");
    }
}
