//! What the HTTP side shares: the one [`AppState`] every registry route and
//! web page is given, so that handlers reach each part directly instead of
//! through the builder.

use std::sync::Arc;

use crate::activity::Activity;
use crate::auth::Auth;
use crate::builder::Builder;
use crate::digest::Digest;
use crate::gc::Status;
use crate::meta::MetaPackages;
use crate::metrics::Metrics;
use crate::source::PackageSource;
use crate::storage::Storage;

/// The parts a request may use.
#[derive(Clone)]
pub struct AppState {
    /// Makes the images pulls and pages ask for, and makes again what
    /// storage lost.
    pub builder: Arc<Builder>,
    /// Where manifests and blobs are read from (the builder writes them).
    pub storage: Arc<Storage>,
    /// Requests, bytes served, builds and cache hits, for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// Recent builds and failures, for the landing page.
    pub activity: Arc<Activity>,
    /// Storage use and the last garbage collection, as last measured.
    pub storage_use: Status,
    /// The package set: its tags and what they resolve to.
    pub source: Arc<PackageSource>,
    /// What leading image name components stand for.
    pub meta_packages: Arc<MetaPackages>,
    /// Who may pull; `None`: anyone.
    pub auth: Option<Arc<Auth>>,
    /// What signs manifests, and the signatures made lately (served by
    /// digest); `None`: nothing is signed.
    pub signing: Option<Arc<Signing>>,
}

/// The signing key, the name signatures give the registry, the names and
/// documents tags resolved to here (the only pairs signed), and the
/// signatures made lately.
pub struct Signing {
    pub signer: Arc<crate::signing::Signer>,
    /// The host signatures name (`registry.example.com`).
    pub identity: String,
    /// `<name>@<digest>` of every manifest or index a tag of `name`
    /// resolved to here lately, and of the manifests such an index names.
    pub resolved: moka::sync::Cache<String, ()>,
    /// Signature manifests made lately, by what they sign
    /// (`<host>/<name>@<digest>`).
    pub signatures: moka::sync::Cache<String, crate::oci::Document>,
    /// Those manifests and their payloads, by digest (hex).
    pub documents: moka::sync::Cache<String, bytes::Bytes>,
}

impl Signing {
    /// Notes that a tag of `name` resolved here to `documents` (a manifest,
    /// or an index and the manifests it names): these pairs may be signed.
    /// A pair noted already is only looked up, so that a cached pull
    /// writes nothing here.
    pub fn note_resolved<'a>(&self, name: &str, documents: impl IntoIterator<Item = &'a Digest>) {
        for digest in documents {
            self.resolved.entry(pair(name, digest)).or_insert(());
        }
    }

    /// Whether a tag of `name` resolved here to `digest` lately.
    pub fn was_resolved(&self, name: &str, digest: &Digest) -> bool {
        self.resolved.contains_key(&pair(name, digest))
    }
}

fn pair(name: &str, digest: &Digest) -> String {
    format!("{name}@{digest}")
}
