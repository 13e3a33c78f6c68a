//! What a collection reads: every blob's size and age, every image record
//! with the blobs its manifests reach and its last pull, every index record
//! with the manifests it names, and which image uses which blob.

use std::collections::{HashMap, HashSet};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::collector::AT_ONCE;
use crate::cache::{ImageRecord, ManifestRecord, REFERRERS};
use crate::digest::Digest;
use crate::oci::Referrer;
use crate::storage::{Listed, Storage, StorageError};

/// An image record and what it reaches.
pub(super) struct Image {
    pub key: String,
    /// Unix seconds of its last pull or build.
    pub last: u64,
    pub modified: SystemTime,
    /// Hex digests of its manifests.
    pub manifests: Vec<String>,
    /// Hex digests of its manifests, config and layers, and of the
    /// artifacts that refer to its manifests (SBOMs, provenance) and theirs.
    pub blobs: HashSet<String>,
}

/// An index record and what it names.
pub(super) struct Index {
    pub key: String,
    pub modified: SystemTime,
    /// Hex digests of the index, and of its manifests.
    pub document: String,
    pub manifests: Vec<String>,
}

/// The records and blobs in storage at one moment.
pub(super) struct Scan {
    pub blobs: HashMap<String, Listed>,
    pub images: Vec<Image>,
    pub indexes: Vec<Index>,
    /// Which image uses which blob: `(blob hex, image key)`.
    pub notes: Vec<(String, String)>,
}

/// Lists blobs and reads every image and index record and the manifests
/// they name.
pub(super) async fn scan(storage: &Storage) -> Result<Scan, StorageError> {
    let blobs = storage
        .list_blobs()
        .await?
        .into_iter()
        .map(|b| (b.key.clone(), b))
        .collect();
    let pulled: HashMap<String, u64> = read_all(storage, "pulled", |bytes| {
        serde_json::from_slice::<serde_json::Value>(bytes).ok()?["at"].as_u64()
    })
    .await?
    .into_iter()
    .map(|(listed, at)| (listed.key, at))
    .collect();
    let images = images(storage, &pulled, None).await?;
    let indexes = indexes(storage, None).await?;
    let notes = storage
        .list_records_meta("blob-users")
        .await?
        .into_iter()
        .filter_map(|note| {
            let (blob, image) = note.key.split_once('/')?;
            Some((blob.to_owned(), image.to_owned()))
        })
        .collect();
    Ok(Scan {
        blobs,
        images,
        indexes,
        notes,
    })
}

/// The image records, with what they reach; only those not in `known`
/// (with the same write time) when it is given.
pub(super) async fn images(
    storage: &Storage,
    pulled: &HashMap<String, u64>,
    known: Option<&HashMap<&str, SystemTime>>,
) -> Result<Vec<Image>, StorageError> {
    let records = read_all_strictly(storage, "images", |bytes| {
        serde_json::from_slice::<ImageRecord>(bytes).ok()
    })
    .await?;
    let fresh = records
        .into_iter()
        .filter(|(listed, _)| known.is_none_or(|k| k.get(listed.key.as_str()) != Some(&listed.modified)));
    let fresh: Vec<(Listed, ImageRecord)> = fresh.collect();
    futures::stream::iter(
        fresh
            .into_iter()
            .map(|(listed, record)| image(storage, pulled, listed, record)),
    )
    .buffer_unordered(AT_ONCE)
    .try_collect()
    .await
}

async fn image(
    storage: &Storage,
    pulled: &HashMap<String, u64>,
    listed: Listed,
    record: ImageRecord,
) -> Result<Image, StorageError> {
    let mut blobs = HashSet::new();
    for (_, manifest) in &record.manifests {
        blobs.extend(manifest_blobs(storage, &manifest.digest).await?);
        blobs.extend(referrer_blobs(storage, &manifest.digest).await?);
    }
    let last = pulled
        .get(&listed.key)
        .copied()
        .unwrap_or_else(|| unix(listed.modified));
    Ok(Image {
        key: listed.key,
        last,
        modified: listed.modified,
        manifests: (record.manifests.iter())
            .map(|(_, m)| m.digest.hex().to_owned())
            .collect(),
        blobs,
    })
}

/// The blobs of the artifacts recorded as referring to `manifest`.
async fn referrer_blobs(storage: &Storage, manifest: &Digest) -> Result<Vec<String>, StorageError> {
    let Some(bytes) = storage.get_record(&format!("{REFERRERS}/{}", manifest.hex())).await? else {
        return Ok(vec![]);
    };
    let referrers: Vec<Referrer> = serde_json::from_slice(&bytes).unwrap_or_default();
    let mut blobs = Vec::new();
    for referrer in &referrers {
        blobs.extend(manifest_blobs(storage, &referrer.digest).await?);
    }
    Ok(blobs)
}

/// The index records, with what they name; only those
/// not in `known` (with the same write time) when it is given.
pub(super) async fn indexes(
    storage: &Storage,
    known: Option<&HashMap<&str, SystemTime>>,
) -> Result<Vec<Index>, StorageError> {
    let records = read_all_strictly(storage, "indexes", |bytes| {
        serde_json::from_slice::<ManifestRecord>(bytes).ok()
    })
    .await?;
    let fresh = records
        .into_iter()
        .filter(|(listed, _)| known.is_none_or(|k| k.get(listed.key.as_str()) != Some(&listed.modified)));
    let fresh: Vec<(Listed, ManifestRecord)> = fresh.collect();
    futures::stream::iter(fresh.into_iter().map(|(listed, record)| index(storage, listed, record)))
        .buffer_unordered(AT_ONCE)
        .try_collect()
        .await
}

async fn index(storage: &Storage, listed: Listed, record: ManifestRecord) -> Result<Index, StorageError> {
    let manifests = match storage.read_small_blob(&record.digest).await? {
        Some(bytes) => named(&bytes, "manifests").iter().map(|d| d.hex().to_owned()).collect(),
        None => vec![],
    };
    Ok(Index {
        key: listed.key,
        modified: listed.modified,
        document: record.digest.hex().to_owned(),
        manifests,
    })
}

/// A manifest's own digest, its config's and its layers', as hex.
pub(super) async fn manifest_blobs(storage: &Storage, manifest: &Digest) -> Result<Vec<String>, StorageError> {
    let mut blobs = vec![manifest.hex().to_owned()];
    if let Some(bytes) = storage.read_small_blob(manifest).await? {
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        if let Some(config) = value["config"]["digest"]
            .as_str()
            .and_then(|d| d.parse::<Digest>().ok())
        {
            blobs.push(config.hex().to_owned());
        }
        blobs.extend(named(&bytes, "layers").into_iter().map(|d| d.hex().to_owned()));
    }
    Ok(blobs)
}

/// The digests of the descriptors in a document's list `field`.
fn named(document: &[u8], field: &str) -> Vec<Digest> {
    let value: serde_json::Value = serde_json::from_slice(document).unwrap_or_default();
    value[field]
        .as_array()
        .map(|list| list.iter().filter_map(|d| d["digest"].as_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// Every record below `prefix` with what `parse` makes of it (those gone
/// since the listing are left out, and so are those it cannot read).
pub(super) async fn read_all<T>(
    storage: &Storage,
    prefix: &str,
    parse: impl Fn(&[u8]) -> Option<T>,
) -> Result<Vec<(Listed, T)>, StorageError> {
    let (read, _) = read_all_or_unreadable(storage, prefix, parse).await?;
    Ok(read)
}

/// Like [`read_all`], but those `parse` cannot read are an error: the
/// blobs of a record this version cannot read (one a newer version wrote)
/// must not be taken for unreached.
async fn read_all_strictly<T>(
    storage: &Storage,
    prefix: &str,
    parse: impl Fn(&[u8]) -> Option<T>,
) -> Result<Vec<(Listed, T)>, StorageError> {
    let (read, unreadable) = read_all_or_unreadable(storage, prefix, parse).await?;
    match unreadable.first() {
        None => Ok(read),
        Some(key) => Err(StorageError::Io(std::io::Error::other(format!(
            "cannot read the record {prefix}/{key} (and {} more): collecting nothing",
            unreadable.len() - 1
        )))),
    }
}

async fn read_all_or_unreadable<T>(
    storage: &Storage,
    prefix: &str,
    parse: impl Fn(&[u8]) -> Option<T>,
) -> Result<(Vec<(Listed, T)>, Vec<String>), StorageError> {
    let listed = storage.list_records_meta(prefix).await?;
    let read: Vec<(Listed, Option<Bytes>)> =
        futures::stream::iter(listed.into_iter().map(|listed| read_one(storage, prefix, listed)))
            .buffer_unordered(AT_ONCE)
            .try_collect()
            .await?;
    let (mut parsed, mut unreadable) = (Vec::new(), Vec::new());
    for (listed, bytes) in read {
        let Some(bytes) = bytes else { continue };
        match parse(&bytes) {
            Some(value) => parsed.push((listed, value)),
            None => unreadable.push(listed.key),
        }
    }
    Ok((parsed, unreadable))
}

async fn read_one(storage: &Storage, prefix: &str, listed: Listed) -> Result<(Listed, Option<Bytes>), StorageError> {
    let bytes = storage.get_record(&format!("{prefix}/{}", listed.key)).await?;
    Ok((listed, bytes))
}

pub(super) fn unix(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
