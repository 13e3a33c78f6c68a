//! What an image is made of, as documents scanners and policy engines read:
//! an SPDX 2.3 and a CycloneDX 1.5 SBOM (`spdx.rs`, `cyclonedx.rs`) with one
//! package per store path of the closure, and an in-toto statement of SLSA
//! provenance (`provenance.rs`). Built from what the build knows exactly
//! (the closure with its hashes and references, the requested packages'
//! `meta`, the package set and its revision), never guessed from names.
//! Of `meta`, only valid SPDX license expressions and web homepages reach
//! them (`declared.rs`). The same image gives the same bytes on every
//! machine: the creation time is fixed, and identifiers derive from the
//! image's ID (its config digest).

mod cyclonedx;
mod declared;
mod provenance;
mod spdx;

pub use cyclonedx::cyclonedx;
pub use provenance::{Provenance, provenance};
pub use spdx::spdx;

use base64::Engine;

use crate::digest::Digest;
use crate::layers::RuntimeGraph;
use crate::nix::Package;

/// The creation time every document carries (the Unix epoch, as
/// `SOURCE_DATE_EPOCH=0` would give): the documents describe the image's
/// contents, which do not depend on when they were built.
pub use crate::oci::CREATED;
/// Who made the documents.
pub const TOOL: &str = concat!("nixery-", env!("CARGO_PKG_VERSION"));

/// What the documents of one image manifest describe.
pub struct Image<'a> {
    /// The image as pulled: `shell/hello:latest`.
    pub name: &'a str,
    /// The image's ID: its config's digest, the same for each manifest
    /// format of it.
    pub id: &'a Digest,
    pub graph: &'a RuntimeGraph,
    /// The requested packages' store paths and what their `meta` says.
    pub packages: &'a [Package],
    /// The package set, without secrets, and its revision.
    pub source: &'a str,
    pub revision: Option<&'a str>,
}

/// A store path read for the documents: `/nix/store/<hash>-<name>-<version>[-<output>]`.
#[derive(Debug, PartialEq, Eq)]
pub struct StorePath<'a> {
    pub path: &'a str,
    /// The 32 characters of its hash part.
    pub hash: &'a str,
    pub name: &'a str,
    pub version: Option<&'a str>,
    /// A non-default output (`dev`, `lib`, `man`…), when the name ends with one.
    pub output: Option<&'a str>,
}

/// Outputs nixpkgs appends to a package's name.
const OUTPUTS: &[&str] = &[
    "bin", "dev", "doc", "info", "lib", "man", "out", "static", "debug", "devdoc",
];

impl<'a> StorePath<'a> {
    /// Splits a store path as Nix's `parseDrvName` splits a name: the
    /// version starts at the first dash followed by something other than a
    /// letter.
    pub fn parse(path: &'a str) -> Self {
        let base = path.rsplit('/').next().unwrap_or(path);
        let (hash, rest) = base.split_once('-').unwrap_or(("", base));
        let (mut rest, output) = match rest.rsplit_once('-') {
            Some((head, tail)) if OUTPUTS.contains(&tail) && tail != "out" => (head, Some(tail)),
            _ => (rest, None),
        };
        let split = rest
            .char_indices()
            .find(|&(i, c)| c == '-' && rest[i + 1..].chars().next().is_some_and(|n| !n.is_ascii_alphabetic()));
        let version = split.map(|(i, _)| {
            let version = &rest[i + 1..];
            rest = &rest[..i];
            version
        });
        StorePath {
            path,
            hash,
            name: rest,
            version,
            output,
        }
    }

    /// Its package URL, as syft's nix cataloger writes it:
    /// `pkg:nix/<name>@<version>?output=<output>&outputhash=<hash>`.
    pub fn purl(&self) -> String {
        let mut purl = format!("pkg:nix/{}", percent(self.name));
        if let Some(version) = self.version {
            purl.push('@');
            purl.push_str(&percent(version));
        }
        let mut qualifiers = Vec::new();
        if let Some(output) = self.output {
            qualifiers.push(format!("output={output}"));
        }
        if !self.hash.is_empty() {
            qualifiers.push(format!("outputhash={}", self.hash));
        }
        if !qualifiers.is_empty() {
            purl.push('?');
            purl.push_str(&qualifiers.join("&"));
        }
        purl
    }
}

/// A NAR hash as lowercase hex SHA-256, from Nix's SRI form
/// (`sha256-<base64>`); `None` for other forms.
pub fn nar_sha256(nar_hash: &str) -> Option<String> {
    let encoded = nar_hash.strip_prefix("sha256-")?;
    let bytes = base64::engine::general_purpose::STANDARD.decode(encoded).ok()?;
    (bytes.len() == 32).then(|| hex::encode(bytes))
}

/// Percent-encodes what a purl component may not hold as is.
fn percent(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_' | b'~' => encoded.push(byte as char),
            _ => encoded.push_str(&format!("%{byte:02X}")),
        }
    }
    encoded
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_paths_split_as_nix_splits_names() {
        let path = StorePath::parse("/nix/store/11zpdvl73nqgkx0cvp6r5a630p344kr0-hello-2.12.1");
        assert_eq!((path.name, path.version, path.output), ("hello", Some("2.12.1"), None));
        assert_eq!(path.hash, "11zpdvl73nqgkx0cvp6r5a630p344kr0");
        assert_eq!(
            path.purl(),
            "pkg:nix/hello@2.12.1?outputhash=11zpdvl73nqgkx0cvp6r5a630p344kr0"
        );
        let path = StorePath::parse("/nix/store/aaaa-python3.11-requests-2.31.0-dev");
        assert_eq!(
            (path.name, path.version, path.output),
            ("python3.11-requests", Some("2.31.0"), Some("dev"))
        );
        assert_eq!(
            path.purl(),
            "pkg:nix/python3.11-requests@2.31.0?output=dev&outputhash=aaaa"
        );
        let path = StorePath::parse("/nix/store/bbbb-busybox-static-bin");
        assert_eq!(
            (path.name, path.version, path.output),
            ("busybox-static", None, Some("bin")),
            "a trailing output name counts as the output, as syft reads it"
        );
        let path = StorePath::parse("/nix/store/cccc-gtk+3-3.24");
        assert_eq!(path.purl(), "pkg:nix/gtk%2B3@3.24?outputhash=cccc");
    }

    fn closure() -> RuntimeGraph {
        let info = |hash: &str, name: &str, references: &[&str]| crate::layers::PathInfo {
            path: format!("/nix/store/{hash:a<32}-{name}"),
            nar_size: 1,
            references: references
                .iter()
                .map(|r| format!("/nix/store/{r:a<32}-glibc-2.40"))
                .collect(),
            nar_hash: Some("sha256-xlIoH4fD0YhqWOkhdcWvWJuQDC+iAIgwLpmWHOXBsLo=".into()),
            deriver: None,
        };
        let paths = vec![info("h", "hello-2.12.1", &["g"]), info("g", "glibc-2.40", &[])];
        RuntimeGraph::new(vec![paths[0].path.clone()], paths).unwrap()
    }

    #[test]
    fn documents_list_every_store_path_once_and_are_the_same_every_time() {
        let graph = closure();
        let manifest = Digest::of(b"config");
        let packages = [Package {
            attribute: "hello".into(),
            out: graph.roots[0].clone(),
            drv: "/nix/store/x-hello-2.12.1.drv".into(),
            licenses: vec!["GPL-3.0-or-later".into()],
            homepage: Some("https://www.gnu.org/software/hello/".into()),
        }];
        let image = Image {
            name: "hello:latest",
            id: &manifest,
            graph: &graph,
            packages: &packages,
            source: "https://example.org/pkgs.git",
            revision: Some("0123456789abcdef0123456789abcdef01234567"),
        };
        assert_eq!(spdx(&image), spdx(&image));
        let document: serde_json::Value = serde_json::from_slice(&spdx(&image)).unwrap();
        let names: Vec<&str> = (document["packages"].as_array().unwrap().iter())
            .map(|p| p["packageFileName"].as_str().unwrap())
            .collect();
        assert_eq!(names, [graph.paths[0].path.as_str(), graph.paths[1].path.as_str()]);
        let kinds: Vec<&str> = (document["relationships"].as_array().unwrap().iter())
            .map(|r| r["relationshipType"].as_str().unwrap())
            .collect();
        assert_eq!(kinds, ["DESCRIBES", "DEPENDS_ON"]);
        assert_eq!(document["creationInfo"]["created"], CREATED);

        let bom: serde_json::Value = serde_json::from_slice(&cyclonedx(&image)).unwrap();
        assert_eq!(bom["components"].as_array().unwrap().len(), 2);
        let serial = bom["serialNumber"].as_str().unwrap();
        assert_eq!(serial.len(), "urn:uuid:".len() + 36);
        assert_eq!(&serial[9..17], &manifest.hex()[..8], "derived from the image ID");

        let statement = provenance(&Provenance {
            image: "hello:latest",
            manifests: &[&manifest],
            requested: &["hello".into()],
            metas: &[],
            packages: &packages,
            source: image.source,
            revision: image.revision,
            settings: serde_json::json!({ "layering": "stable" }),
            builder: "urn:nixery:test",
        });
        let statement: serde_json::Value = serde_json::from_slice(&statement).unwrap();
        let dependencies = &statement["predicate"]["buildDefinition"]["resolvedDependencies"];
        assert_eq!(dependencies[0]["digest"]["gitCommit"], image.revision.unwrap());
        assert_eq!(dependencies[1]["uri"], "/nix/store/x-hello-2.12.1.drv");
    }

    #[test]
    fn nar_hashes_become_hex() {
        let hex = nar_sha256("sha256-xlIoH4fD0YhqWOkhdcWvWJuQDC+iAIgwLpmWHOXBsLo=").unwrap();
        assert_eq!(hex.len(), 64);
        assert!(hex.starts_with("c65228"));
        assert_eq!(
            nar_sha256("sha256:1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"),
            None
        );
    }
}
