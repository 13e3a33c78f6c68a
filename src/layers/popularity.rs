//! Popularity data for layering: how many packages of the package set refer
//! to each store path, keyed as the original keys it (`name-version`, the
//! store path without `/nix/store/<hash>-`), and where it comes from
//! (`NIX_POPULARITY_URL`: http(s), `file://` or a plain path). A path whose
//! exact `name-version` is not in the data gets the count of its name, so
//! data made for another revision of the package set still helps.

use std::collections::HashMap;

use crate::digest::Digest;

/// Popularity of paths that are in every image (`cacert`, `iana-etc`), as in
/// the original, so they always get a layer of their own.
const IN_EVERY_IMAGE: u64 = 500_000;
const IN_EVERY_IMAGE_PREFIXES: [&str; 2] = ["nss-cacert", "iana-etc"];

/// Reference counts by package id; a path not listed counts 1.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Popularity {
    counts: HashMap<String, u64>,
    /// The highest count of each package name (the id without its version).
    by_name: HashMap<String, u64>,
    /// Digest of the data it was read from (`None` for no data), so that
    /// caches can tell layer plans from different data apart.
    digest: Option<Digest>,
}

#[derive(Debug, thiserror::Error)]
pub enum PopularityError {
    #[error("popularity data is not a JSON object of counts: {0}")]
    Json(#[from] serde_json::Error),
    #[error("could not read popularity data from {url}: {source}")]
    Read { url: String, source: std::io::Error },
    #[error("could not fetch popularity data from {url}: {source}")]
    Fetch { url: String, source: reqwest::Error },
}

impl Popularity {
    pub fn from_json(json: &[u8]) -> Result<Self, PopularityError> {
        Ok(Self::from_counts(serde_json::from_slice(json)?, Some(Digest::of(json))))
    }

    fn from_counts(counts: HashMap<String, u64>, digest: Option<Digest>) -> Self {
        let mut by_name: HashMap<String, u64> = HashMap::new();
        for (id, &count) in &counts {
            let highest = by_name.entry(package_name(id).to_owned()).or_default();
            *highest = (*highest).max(count);
        }
        Popularity {
            counts,
            by_name,
            digest,
        }
    }

    /// This data plus counts learned from the registry's own builds (JSON
    /// of the same shape): each id's counts are added.
    pub fn with_learned(&self, learned: &[u8]) -> Result<Self, PopularityError> {
        let learned: HashMap<String, u64> = serde_json::from_slice(learned)?;
        let mut counts = self.counts.clone();
        for (id, count) in learned {
            *counts.entry(id).or_default() += count;
        }
        let digest =
            Digest::of(format!("{}+learned:{}", self.id(), Digest::of(&serde_json::to_vec(&counts)?)).as_bytes());
        Ok(Self::from_counts(counts, Some(digest)))
    }

    /// What identifies this data: the digest of its JSON, or `none`.
    pub fn id(&self) -> &str {
        self.digest.as_ref().map_or("none", Digest::as_str)
    }

    /// Loads popularity data from an http(s) URL, a `file://` URL or a path.
    pub async fn load(url: &str) -> Result<Self, PopularityError> {
        if url.starts_with("http://") || url.starts_with("https://") {
            let fetch = |source: reqwest::Error| PopularityError::Fetch {
                url: crate::redact::url(url),
                source: source.without_url(),
            };
            let response = reqwest::get(url)
                .await
                .map_err(fetch)?
                .error_for_status()
                .map_err(fetch)?;
            return Self::from_json(&response.bytes().await.map_err(fetch)?);
        }
        let path = url.strip_prefix("file://").unwrap_or(url);
        let bytes = tokio::fs::read(path).await.map_err(|source| PopularityError::Read {
            url: crate::redact::url(url),
            source,
        })?;
        Self::from_json(&bytes)
    }

    /// The popularity of a store path.
    pub fn of(&self, store_path: &str) -> u64 {
        let id = package_id(store_path);
        if IN_EVERY_IMAGE_PREFIXES.iter().any(|p| id.starts_with(p)) {
            return IN_EVERY_IMAGE;
        }
        self.counts
            .get(id)
            .or_else(|| self.by_name.get(package_name(id)))
            .copied()
            .unwrap_or(1)
            .max(1)
    }
}

/// `name-1.0` → `name`: Nix's rule (`builtins.parseDrvName`), the name ends
/// at the first `-` that is not followed by a letter.
fn package_name(id: &str) -> &str {
    let bytes = id.as_bytes();
    (0..bytes.len())
        .find(|&i| bytes[i] == b'-' && bytes.get(i + 1).is_some_and(|b| !b.is_ascii_alphabetic()))
        .map_or(id, |i| &id[..i])
}

/// `/nix/store/<hash>-name-1.0` → `name-1.0`.
pub fn package_id(store_path: &str) -> &str {
    let base = store_path.rsplit('/').next().unwrap_or(store_path);
    match base.split_once('-') {
        Some((hash, rest)) if hash.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()) => rest,
        _ => base,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_name_and_version() {
        let p = Popularity::from_json(br#"{"glibc-2.40-66": 40000, "zlib-1.3": 500}"#).unwrap();
        assert_eq!(p.of("/nix/store/s9qbqh7gzacs7h68b2jfmn9l6q4jwfjz-glibc-2.40-66"), 40000);
        assert_eq!(
            p.of("/nix/store/abc-glibc-2.33-59"),
            40000,
            "another version counts as its name"
        );
        assert_eq!(p.of("/nix/store/abc-unknown-1"), 1);
        assert_eq!(p.of("/nix/store/abc-zlib-ng-2.0"), 1, "another name that starts alike");
        assert_eq!(p.of("/nix/store/abc-nss-cacert-3.107"), IN_EVERY_IMAGE);
        assert_eq!(Popularity::default().of("/nix/store/abc-iana-etc-2024"), IN_EVERY_IMAGE);
    }

    #[test]
    fn names_end_where_nix_says() {
        assert_eq!(package_name("glibc-2.40-66"), "glibc");
        assert_eq!(package_name("python3.11-numpy-1.26.4"), "python3.11-numpy");
        assert_eq!(package_name("gcc-12-base-12.2.0"), "gcc");
        assert_eq!(package_name("hello"), "hello");
        assert_eq!(package_name("x-"), "x-");
    }

    #[test]
    fn rejects_other_json() {
        assert!(Popularity::from_json(b"[1,2]").is_err());
        assert!(Popularity::from_json(br#"{"a": -1}"#).is_err());
    }

    #[tokio::test]
    async fn loads_files_and_file_urls() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pop.json");
        std::fs::write(&file, br#"{"hello-2.12": 7}"#).unwrap();
        for url in [file.display().to_string(), format!("file://{}", file.display())] {
            assert_eq!(Popularity::load(&url).await.unwrap().of("/nix/store/x-hello-2.12"), 7);
        }
        assert!(matches!(
            Popularity::load("/nonexistent/pop.json").await,
            Err(PopularityError::Read { .. })
        ));
    }

    #[tokio::test]
    async fn loads_http_urls() {
        let app = axum::Router::new()
            .route("/pop.json", axum::routing::get(|| async { r#"{"hello-2.12": 9}"# }))
            .route(
                "/gone",
                axum::routing::get(|| async { (axum::http::StatusCode::NOT_FOUND, "no") }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let loaded = Popularity::load(&format!("http://{address}/pop.json")).await.unwrap();
        assert_eq!(loaded.of("/nix/store/x-hello-2.12"), 9);
        assert!(matches!(
            Popularity::load(&format!("http://{address}/gone")).await,
            Err(PopularityError::Fetch { .. })
        ));
    }

    #[tokio::test]
    async fn loads_the_debian_corpus() {
        let json = super::super::graph::tests::shared_data("debian-bookworm/popularity-direct.json");
        let p = Popularity::from_json(&json).unwrap();
        assert_eq!(
            p.of("/nix/store/ri3sz7x41572q35g4g0ihnywf5gkq7v3-libc6-2.36-9+deb12u14"),
            21820
        );
    }
}
