//! One garbage collection, step by step (the protocol is in `mod.rs`):
//! scan the records and blobs, decide what is kept, delete records, settle,
//! scan again, delete blobs. Each step says its counts and bytes through
//! the caller's `say`; the [`Report`] sums them up.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::status::LastGc;
use super::{GC_LEASE, Options, SETTLE, SWEEPING};
use crate::archive::LayerDigests;
use crate::cache::{ImageRecord, ManifestRecord};
use crate::digest::Digest;
use crate::leases::{Lease, Leases, Take};
use crate::storage::{Listed, Storage, StorageError};

/// Reads and deletes in flight at once.
const AT_ONCE: usize = 16;

/// How a collection ended.
#[derive(Debug)]
pub enum Outcome {
    Done(Report),
    /// Another collector holds the lease.
    Busy {
        holder: String,
    },
}

/// What a collection found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub dry_run: bool,
    pub images_kept: usize,
    pub images_dropped: usize,
    pub indexes_kept: usize,
    pub indexes_dropped: usize,
    /// Blobs, and their bytes, that kept records reach.
    pub blobs_kept: usize,
    pub bytes_kept: u64,
    /// Blobs no kept record reaches, kept because they are younger than the grace.
    pub blobs_young: usize,
    pub records_deleted: usize,
    pub blobs_deleted: usize,
    pub bytes_deleted: u64,
    /// Everything in storage, before and after.
    pub store_bytes_before: u64,
    pub store_objects_before: u64,
    pub store_bytes_after: u64,
    pub store_objects_after: u64,
}

impl Report {
    /// The machine-readable last line.
    pub fn line(&self) -> String {
        format!(
            "gc dry_run={} images_kept={} images_dropped={} indexes_kept={} indexes_dropped={} blobs_kept={} bytes_kept={} blobs_young={} records_deleted={} blobs_deleted={} bytes_deleted={} store_bytes_before={} store_objects_before={} store_bytes_after={} store_objects_after={}",
            self.dry_run,
            self.images_kept,
            self.images_dropped,
            self.indexes_kept,
            self.indexes_dropped,
            self.blobs_kept,
            self.bytes_kept,
            self.blobs_young,
            self.records_deleted,
            self.blobs_deleted,
            self.bytes_deleted,
            self.store_bytes_before,
            self.store_objects_before,
            self.store_bytes_after,
            self.store_objects_after,
        )
    }
}

/// An image record and what it reaches.
struct Image {
    key: String,
    /// Unix seconds of its last pull or build.
    last: u64,
    modified: SystemTime,
    /// Hex digests of its manifests, config and layers.
    blobs: HashSet<String>,
}

/// An index record and what it names.
struct Index {
    key: String,
    modified: SystemTime,
    /// Hex digests of the index, and of its manifests.
    document: String,
    manifests: Vec<String>,
}

/// What a collection drops: images, indexes, and blobs with their sizes.
struct Going<'a> {
    images: &'a [&'a Image],
    indexes: &'a [&'a Index],
    blobs: &'a HashMap<String, u64>,
}

/// The records and blobs in storage at one moment.
struct Scan {
    blobs: HashMap<String, Listed>,
    images: Vec<Image>,
    indexes: Vec<Index>,
}

/// Runs one collection with `options`, saying each step's figures.
pub async fn collect(
    storage: &Storage,
    leases: &Leases,
    options: &Options,
    say: &(dyn Fn(&str) + Sync),
) -> Result<Outcome, StorageError> {
    let mut lease = match options.dry_run {
        true => None,
        false => match leases.take(GC_LEASE, options.lease_ttl, Some("marking")).await? {
            Take::Held { lease, .. } => Some(Held::new(*lease)),
            Take::Busy(state) => return Ok(Outcome::Busy { holder: state.holder }),
            Take::Unsupported => {
                say(
                    "gc: this store cannot create objects conditionally: no lease; run gc only while no replica builds",
                );
                None
            }
        },
    };
    let result = run(storage, options, say, &mut lease).await;
    if let Some(held) = lease {
        held.lease.release().await?;
    }
    let mut report = result?;
    if !options.dry_run {
        (report.store_bytes_after, report.store_objects_after) = storage.usage().await?;
        say(&format!(
            "gc: {} objects ({}) in storage now",
            report.store_objects_after,
            bytes(report.store_bytes_after)
        ));
    }
    Ok(Outcome::Done(report))
}

async fn run(
    storage: &Storage,
    options: &Options,
    say: &(dyn Fn(&str) + Sync),
    lease: &mut Option<Held>,
) -> Result<Report, StorageError> {
    let mut report = Report {
        dry_run: options.dry_run,
        ..Default::default()
    };
    (report.store_bytes_before, report.store_objects_before) = storage.usage().await?;
    let scan = scan(storage).await?;
    say(&format!(
        "gc: scanned {} images, {} indexes, {} blobs ({}); {} objects ({}) in storage",
        scan.images.len(),
        scan.indexes.len(),
        scan.blobs.len(),
        bytes(scan.blobs.values().map(|b| b.size).sum()),
        report.store_objects_before,
        bytes(report.store_bytes_before),
    ));
    let kept = keep(&scan, options);
    let dropped: Vec<&Image> = scan.images.iter().filter(|i| !kept.contains(i.key.as_str())).collect();
    let kept_manifests: HashSet<&str> = scan
        .images
        .iter()
        .filter(|i| kept.contains(i.key.as_str()))
        .flat_map(|i| i.blobs.iter().map(String::as_str))
        .collect();
    let (kept_indexes, dropped_indexes): (Vec<&Index>, Vec<&Index>) = scan
        .indexes
        .iter()
        .partition(|index| index.manifests.iter().all(|m| kept_manifests.contains(m.as_str())));
    let mut reachable: HashSet<String> = kept_manifests.iter().map(|&m| m.to_owned()).collect();
    reachable.extend(kept_indexes.iter().map(|i| i.document.clone()));
    report.images_kept = kept.len();
    report.images_dropped = dropped.len();
    report.indexes_kept = kept_indexes.len();
    report.indexes_dropped = dropped_indexes.len();
    let present = |hex: &String| scan.blobs.contains_key(hex);
    report.blobs_kept = reachable.iter().filter(|h| present(h)).count();
    report.bytes_kept = reachable.iter().filter_map(|h| scan.blobs.get(h)).map(|b| b.size).sum();
    let cutoff = SystemTime::now() - options.grace;
    let mut doomed: HashMap<String, u64> = HashMap::new();
    for (hex, blob) in &scan.blobs {
        if reachable.contains(hex) {
            continue;
        }
        match blob.modified < cutoff {
            true => drop(doomed.insert(hex.clone(), blob.size)),
            false => report.blobs_young += 1,
        }
    }
    say(&format!(
        "gc: keep {} images and {} indexes ({} blobs, {}); drop {} images and {} indexes; {} blobs ({}) unreached, {} of them within the grace",
        report.images_kept,
        report.indexes_kept,
        report.blobs_kept,
        bytes(report.bytes_kept),
        report.images_dropped,
        report.indexes_dropped,
        doomed.len() + report.blobs_young,
        bytes(doomed.values().sum::<u64>()),
        report.blobs_young,
    ));
    for image in &dropped {
        say(&format!(
            "gc: drop image {} (last pulled {})",
            image.key,
            ago(image.last)
        ));
    }
    if options.dry_run {
        report.blobs_deleted = doomed.len();
        report.bytes_deleted = doomed.values().sum();
        report.store_bytes_after = report.store_bytes_before - report.bytes_deleted;
        report.store_objects_after = report.store_objects_before - report.blobs_deleted as u64;
        say(&format!(
            "gc: dry run: would delete {} blobs ({}) and the records of what is dropped; nothing changed",
            report.blobs_deleted,
            bytes(report.bytes_deleted)
        ));
        return Ok(report);
    }

    report.records_deleted = delete_records(
        storage,
        &scan,
        &Going {
            images: &dropped,
            indexes: &dropped_indexes,
            blobs: &doomed,
        },
        options.grace,
        lease,
    )
    .await?;
    say(&format!("gc: deleted {} records", report.records_deleted));

    if let Some(held) = lease.as_mut() {
        held.renew(Some(SWEEPING)).await?;
        let settled = Instant::now() + SETTLE;
        while Instant::now() < settled {
            tokio::time::sleep(held.every().min(settled - Instant::now())).await;
            held.renew(Some(SWEEPING)).await?;
        }
    }
    let spared = spare_new_records(storage, &scan, &mut doomed).await?;
    if spared > 0 {
        say(&format!(
            "gc: {spared} blobs spared: records written meanwhile name them"
        ));
    }
    let (count, deleted) = delete_blobs(storage, &doomed, lease).await?;
    report.blobs_deleted = count;
    report.bytes_deleted = deleted;
    say(&format!("gc: deleted {count} blobs ({})", bytes(deleted)));

    LastGc::from_report(&report).write(storage).await?;
    Ok(report)
}

/// The keys of the images kept: pulled within the period, then the most
/// recently pulled of those whose blobs fit the budget.
fn keep<'a>(scan: &'a Scan, options: &Options) -> HashSet<&'a str> {
    let since = unix_now().saturating_sub(options.keep_pulled_within.as_secs());
    let mut recent: Vec<&Image> = scan.images.iter().filter(|i| i.last >= since).collect();
    recent.sort_by(|a, b| b.last.cmp(&a.last).then_with(|| a.key.cmp(&b.key)));
    let Some(budget) = options.max_bytes else {
        return recent.iter().map(|i| i.key.as_str()).collect();
    };
    let (mut kept, mut blobs, mut total) = (HashSet::new(), HashSet::new(), 0u64);
    for image in recent {
        let new: Vec<&String> = image.blobs.iter().filter(|b| !blobs.contains(*b)).collect();
        let adds: u64 = new.iter().filter_map(|b| scan.blobs.get(*b)).map(|b| b.size).sum();
        if total + adds > budget {
            break;
        }
        total += adds;
        blobs.extend(new.into_iter().cloned());
        kept.insert(image.key.as_str());
    }
    kept
}

/// Lists blobs and reads every image and index record and the manifests
/// they name.
async fn scan(storage: &Storage) -> Result<Scan, StorageError> {
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
    Ok(Scan { blobs, images, indexes })
}

/// The image records, with what they reach; only those not in `known`
/// (with the same write time) when it is given.
async fn images(
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
    }
    let last = pulled
        .get(&listed.key)
        .copied()
        .unwrap_or_else(|| unix(listed.modified));
    Ok(Image {
        key: listed.key,
        last,
        modified: listed.modified,
        blobs,
    })
}

/// The index records, with what they name; only those
/// not in `known` (with the same write time) when it is given.
async fn indexes(storage: &Storage, known: Option<&HashMap<&str, SystemTime>>) -> Result<Vec<Index>, StorageError> {
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
    let manifests = match storage.read_small_blob(&record.digest, None).await? {
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
async fn manifest_blobs(storage: &Storage, manifest: &Digest) -> Result<Vec<String>, StorageError> {
    let mut blobs = vec![manifest.hex().to_owned()];
    if let Some(bytes) = storage.read_small_blob(manifest, None).await? {
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
async fn read_all<T>(
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

/// Deletes the records of what is dropped and of the blobs to delete; how many.
async fn delete_records(
    storage: &Storage,
    scan: &Scan,
    going: &Going<'_>,
    grace: Duration,
    lease: &mut Option<Held>,
) -> Result<usize, StorageError> {
    let Going {
        images: dropped,
        indexes: dropped_indexes,
        blobs: doomed,
    } = going;
    let image_keys: HashSet<&str> = scan.images.iter().map(|i| i.key.as_str()).collect();
    let mut records: Vec<String> = Vec::new();
    for image in dropped.iter() {
        // The image record first: a collector killed after it leaves only
        // records nothing reads.
        records.push(format!("images/{}", image.key));
        records.push(format!("plans/{}", image.key));
        records.push(format!("pulled/{}", image.key));
        records.extend(image.blobs.iter().map(|b| format!("blob-users/{b}/{}", image.key)));
    }
    records.extend(dropped_indexes.iter().map(|i| format!("indexes/{}", i.key)));
    // Plans and last pulls are written around an image record; those
    // without one, and older than the grace, belong to no build.
    let grace_cutoff = SystemTime::now() - grace;
    for kind in ["plans", "pulled"] {
        let orphans = storage.list_records_meta(kind).await?;
        records.extend(
            orphans
                .into_iter()
                .filter(|o| !image_keys.contains(o.key.as_str()) && o.modified < grace_cutoff)
                .map(|o| format!("{kind}/{}", o.key)),
        );
    }
    // Build leases go with their image, and those of builds that recorded
    // nothing (they failed) once older than the grace.
    let dropped_keys: HashSet<&str> = dropped.iter().map(|i| i.key.as_str()).collect();
    for lease in storage.list_records_meta("leases/build").await? {
        let image = lease.key.split('/').next().unwrap_or_default();
        let orphan = !image_keys.contains(image) && lease.modified < grace_cutoff;
        if dropped_keys.contains(image) || orphan {
            records.push(format!("leases/build/{}", lease.key));
        }
    }
    let layers = read_all(storage, "layers", |bytes| {
        serde_json::from_slice::<LayerDigests>(bytes).ok()
    })
    .await?;
    records.extend(
        layers
            .into_iter()
            .filter(|(_, layer)| doomed.contains_key(layer.digest.hex()))
            .map(|(listed, _)| format!("layers/{}", listed.key)),
    );
    records.sort();
    records.dedup();
    // Image records before everything else they lead to.
    records.sort_by_key(|r| !r.starts_with("images/"));
    for chunk in records.chunks(AT_ONCE * 4) {
        keep_lease(lease, None).await?;
        futures::stream::iter(chunk.iter().cloned().map(|record| delete_record(storage, record)))
            .buffer_unordered(AT_ONCE)
            .try_collect::<()>()
            .await?;
    }
    Ok(records.len())
}

/// Takes out of `doomed` the blobs that records written since the scan
/// reach; how many.
async fn spare_new_records(
    storage: &Storage,
    scan: &Scan,
    doomed: &mut HashMap<String, u64>,
) -> Result<usize, StorageError> {
    let known_images: HashMap<&str, SystemTime> = scan.images.iter().map(|i| (i.key.as_str(), i.modified)).collect();
    let known_indexes: HashMap<&str, SystemTime> = scan.indexes.iter().map(|i| (i.key.as_str(), i.modified)).collect();
    let mut reached: HashSet<String> = HashSet::new();
    for image in images(storage, &HashMap::new(), Some(&known_images)).await? {
        reached.extend(image.blobs);
    }
    for index in indexes(storage, Some(&known_indexes)).await? {
        reached.insert(index.document);
        for manifest in &index.manifests {
            let digest: Digest = format!("sha256:{manifest}").parse().expect("parsed from a digest");
            reached.extend(manifest_blobs(storage, &digest).await?);
        }
    }
    let before = doomed.len();
    doomed.retain(|hex, _| !reached.contains(hex));
    Ok(before - doomed.len())
}

/// Deletes the doomed blobs while the lease holds, then the notes of who
/// used them; how many blobs, and their bytes.
async fn delete_blobs(
    storage: &Storage,
    doomed: &HashMap<String, u64>,
    lease: &mut Option<Held>,
) -> Result<(usize, u64), StorageError> {
    let doomed: Vec<(&String, &u64)> = doomed.iter().collect();
    let (mut count, mut deleted) = (0, 0);
    for chunk in doomed.chunks(AT_ONCE * 4) {
        keep_lease(lease, Some(SWEEPING)).await?;
        let hexes: Vec<String> = chunk.iter().map(|(hex, _)| (*hex).clone()).collect();
        futures::stream::iter(hexes.into_iter().map(|hex| delete_blob(storage, hex)))
            .buffer_unordered(AT_ONCE)
            .try_collect::<()>()
            .await?;
        count += chunk.len();
        deleted += chunk.iter().map(|(_, size)| **size).sum::<u64>();
    }
    Ok((count, deleted))
}

async fn delete_record(storage: &Storage, record: String) -> Result<(), StorageError> {
    storage.delete_record(&record).await
}

/// Deletes a blob, then the notes of who used it.
async fn delete_blob(storage: &Storage, hex: String) -> Result<(), StorageError> {
    let digest: Digest = format!("sha256:{hex}")
        .parse()
        .expect("listed blobs are named by digest");
    storage.delete_blob(&digest).await?;
    for user in storage.list_records(&format!("blob-users/{hex}")).await? {
        storage.delete_record(&format!("blob-users/{hex}/{user}")).await?;
    }
    Ok(())
}

/// The collector's lease, and when it was last renewed.
struct Held {
    lease: Lease,
    renewed: Instant,
}

impl Held {
    fn new(lease: Lease) -> Self {
        Held {
            lease,
            renewed: Instant::now(),
        }
    }

    /// How often to renew: a third of the lease's time to live.
    fn every(&self) -> Duration {
        self.lease.ttl() / 3
    }

    /// Renews the lease; an error if it may have run out meanwhile (the
    /// collector stalled): a builder may then have seen no sweep.
    async fn renew(&mut self, phase: Option<&str>) -> Result<(), StorageError> {
        if self.renewed.elapsed() >= self.lease.ttl() || !self.lease.renew(phase).await? {
            return Err(lost());
        }
        self.renewed = Instant::now();
        Ok(())
    }
}

/// Renews the lease when due; an error if it was lost (the collector was
/// stalled past its expiry), so that nothing more is deleted.
async fn keep_lease(lease: &mut Option<Held>, phase: Option<&str>) -> Result<(), StorageError> {
    match lease {
        Some(held) if held.renewed.elapsed() >= held.every() => held.renew(phase).await,
        _ => Ok(()),
    }
}

fn lost() -> StorageError {
    StorageError::Io(std::io::Error::other(
        "the gc lease ran out before it was renewed: stopping before deleting more",
    ))
}

fn bytes(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / 1048576.0)
}

fn ago(at: u64) -> String {
    let seconds = unix_now().saturating_sub(at);
    match seconds {
        s if s >= 86400 => format!("{} days ago", s / 86400),
        s if s >= 3600 => format!("{} hours ago", s / 3600),
        s => format!("{s} s ago"),
    }
}

fn unix(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn unix_now() -> u64 {
    unix(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(key: &str, size: u64) -> (String, Listed) {
        let listed = Listed {
            key: key.into(),
            size,
            modified: SystemTime::now(),
        };
        (key.into(), listed)
    }

    fn image(key: &str, last: u64, blobs: &[&str]) -> Image {
        Image {
            key: key.into(),
            last,
            modified: SystemTime::now(),
            blobs: blobs.iter().map(|b| (*b).to_owned()).collect(),
        }
    }

    #[test]
    fn the_budget_drops_the_least_recently_pulled_first() {
        let now = unix_now();
        let scan = Scan {
            blobs: [listed("a", 10), listed("b", 10), listed("shared", 5), listed("c", 100)]
                .into_iter()
                .collect(),
            images: vec![
                image("new", now, &["a", "shared"]),
                image("middle", now - 10, &["b", "shared"]),
                image("old", now - 20, &["c"]),
                image("ancient", now - 90 * 86400, &["a"]),
            ],
            indexes: vec![],
        };
        let mut options = Options {
            keep_pulled_within: Duration::from_secs(30 * 86400),
            max_bytes: None,
            grace: Duration::ZERO,
            dry_run: true,
            lease_ttl: Duration::from_secs(30),
        };
        fn sorted(kept: HashSet<&str>) -> Vec<String> {
            let mut kept: Vec<String> = kept.into_iter().map(str::to_owned).collect();
            kept.sort();
            kept
        }
        assert_eq!(sorted(keep(&scan, &options)), ["middle", "new", "old"]);
        options.max_bytes = Some(25);
        assert_eq!(
            sorted(keep(&scan, &options)),
            ["middle", "new"],
            "shared blobs count once"
        );
        options.max_bytes = Some(24);
        assert_eq!(sorted(keep(&scan, &options)), ["new"]);
        options.max_bytes = Some(0);
        assert!(keep(&scan, &options).is_empty());
    }

    #[tokio::test]
    async fn a_record_it_cannot_read_stops_the_collection() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::filesystem(dir.path()).await.unwrap();
        let orphan = Digest::of(b"unreached");
        storage
            .put_blob(&orphan, bytes::Bytes::from_static(b"unreached"))
            .await
            .unwrap();
        storage
            .put_record(
                "images/newer",
                bytes::Bytes::from_static(b"{\"format\":\"from a newer version\"}"),
            )
            .await
            .unwrap();
        let options = Options {
            keep_pulled_within: Duration::ZERO,
            max_bytes: None,
            grace: Duration::ZERO,
            dry_run: true,
            lease_ttl: Duration::from_secs(30),
        };
        let outcome = collect(&storage, &Leases::new(storage.clone()), &options, &|_| {}).await;
        let error = outcome.unwrap_err().to_string();
        assert!(error.contains("cannot read the record images/newer"), "{error}");
        assert!(storage.blob_size(&orphan).await.unwrap().is_some());
    }

    #[test]
    fn reports_end_with_one_machine_readable_line() {
        let line = Report::default().line();
        assert!(line.starts_with("gc dry_run=false "));
        assert!(!line.contains('\n'));
    }
}
