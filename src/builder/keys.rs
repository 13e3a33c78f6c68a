//! Every key the builder records its work under, and the format versions
//! inside them. A key is the SHA-256 of everything that decides the bytes
//! recorded under it, so a record is found again only when rebuilding
//! would give the same bytes.
//!
//! When to bump which version:
//! - [`STORE_LAYERS`] when anything changes how a store path's layer is
//!   packed: the tar stream (ordering, headers, modes, times) or the
//!   compressor's output. Every layer record then misses, and with it
//!   every image.
//! - [`IMAGES`] when anything else in an image changes: the config, the
//!   manifests, the root filesystem layer (links, `/etc`, `/tmp`), the
//!   SBOMs and provenance made with it. Image records and root layer
//!   records miss; store-path layers are reused.
//! - Neither for a new setting that shapes images: add it to
//!   [`ImageKey`] instead, so each value gets its own records.
//!
//! Indexes need no version: they are recorded under their own digest.

use serde::Serialize;

use crate::archive::Compression;
use crate::digest::Digest;
use crate::meta::User;
use crate::oci::Format;

/// The version of how store paths are packed into layers.
pub const STORE_LAYERS: &str = "nixery-v2";
/// The version of everything else that shapes images.
pub const IMAGES: &str = "nixery-image-v5";

/// Everything that decides one architecture's manifests, besides the
/// package set's revision.
#[derive(Serialize)]
pub struct ImageKey<'a> {
    pub arch: &'a str,
    pub revision: Option<&'a str>,
    pub packages: &'a [String],
    pub user: Option<&'a User>,
    pub entrypoint: bool,
    /// The popularity data's id.
    pub popularity: &'a str,
    pub layering: &'a str,
    pub layer_budget: usize,
    pub compression: Compression,
    /// The manifest formats made from this layer set.
    pub formats: Vec<Format>,
    /// The id of the key the provenance is signed with; absent when it is
    /// not signed (so that keys without one stay what they were).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signer: Option<&'a str>,
}

/// The key of an image record: the hash of the key's JSON with the
/// version first, `{"format":"<IMAGES>","arch":…}`, as it always was.
/// (Spliced rather than serialised through `#[serde(flatten)]`, which gave
/// the same bytes at several times the cost, on every pull.)
pub fn image(key: &ImageKey) -> String {
    let fields = serde_json::to_vec(key).expect("keys serialise");
    let mut json = format!(r#"{{"format":"{IMAGES}","#).into_bytes();
    json.extend_from_slice(&fields[1..]);
    hash(&json)
}

/// The key of a layer of whole store paths: store paths never change
/// contents, so the paths and the compression decide the bytes.
pub fn store_layer(paths: &[String], compression: Compression) -> String {
    let key = serde_json::json!([STORE_LAYERS, "store", compression, paths]);
    hash(key.to_string().as_bytes())
}

/// The key of the root filesystem layer of `packages`, run as `user`.
pub fn root_layer(packages: &[String], user: Option<&User>, compression: Compression) -> String {
    let key = serde_json::json!([IMAGES, "rootfs", compression, packages, user]);
    hash(key.to_string().as_bytes())
}

/// The key of an index: its own digest.
pub fn index(document: &Digest) -> String {
    document.hex().to_owned()
}

fn hash(bytes: &[u8]) -> String {
    Digest::of(bytes).hex().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(compression: Compression) -> ImageKey<'static> {
        static PACKAGES: std::sync::LazyLock<Vec<String>> =
            std::sync::LazyLock::new(|| vec!["cacert".into(), "hello".into(), "iana-etc".into()]);
        ImageKey {
            arch: "amd64",
            revision: Some("path:0123"),
            packages: &PACKAGES,
            user: None,
            entrypoint: true,
            popularity: "none",
            layering: "stable",
            layer_budget: 96,
            compression,
            formats: vec![Format::Docker, Format::Oci],
            signer: None,
        }
    }

    /// Keys are what records already in storage are found by: they change
    /// only with a version bump.
    #[test]
    fn keys_stay_what_they_were() {
        const PINNED_IMAGE: &str = "078e73b4d6bb4c59ba1ad44b51e647ba575b6ac6bbc0b58f4a834d7f99521d7d";
        const PINNED_STORE_LAYER: &str = "cb08404c42d594e6698b3ec0d56ded210308c385e01975136d0af7c81357c17b";
        const PINNED_ROOT_LAYER: &str = "0f21caff0f51c83ac7f12a1e403a2e7ae401158661969e6ea8b9f4690408f120";
        let gzip = Compression::Gzip(6);
        assert_eq!(image(&key(gzip)), PINNED_IMAGE);
        let paths = ["/nix/store/0000-hello-2.12.1".to_owned()];
        assert_eq!(store_layer(&paths, gzip), PINNED_STORE_LAYER);
        assert_eq!(root_layer(&paths, None, gzip), PINNED_ROOT_LAYER);
    }

    #[test]
    fn every_field_counts() {
        let gzip = Compression::Gzip(6);
        let base = image(&key(gzip));
        let mut other = key(gzip);
        other.layer_budget = 95;
        assert_ne!(image(&other), base);
        assert_ne!(image(&key(Compression::Gzip(9))), base);
        let mut other = key(gzip);
        other.revision = None;
        assert_ne!(image(&other), base);
    }
}
