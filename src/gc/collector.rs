//! One garbage collection, step by step (the protocol is in `mod.rs`):
//! scan the records and blobs (`scan.rs`), decide what is kept, delete
//! records, settle, scan again for records written meanwhile, delete blobs. Each step says its counts and bytes through
//! the caller's `say`; the [`Report`] sums them up.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime};

use futures::{StreamExt, TryStreamExt};

use super::scan::{Image, Index, Scan, images, indexes, manifest_blobs, read_all, scan, unix};
use super::status::LastGc;
use super::{GC_LEASE, Options, SETTLE, SWEEPING};
use crate::archive::LayerDigests;
use crate::cache::REFERRERS;
use crate::digest::Digest;
use crate::leases::{Lease, Leases, Take};
use crate::storage::{Storage, StorageError};

/// Reads and deletes in flight at once.
pub(super) const AT_ONCE: usize = 16;

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

/// What a collection drops: images, indexes, and blobs with their sizes.
struct Going<'a> {
    images: &'a [&'a Image],
    indexes: &'a [&'a Index],
    blobs: &'a HashMap<String, u64>,
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
    let Decision {
        dropped,
        dropped_indexes,
        reachable,
        mut doomed,
        young,
    } = decide(&scan, options);
    report.images_kept = scan.images.len() - dropped.len();
    report.images_dropped = dropped.len();
    report.indexes_kept = scan.indexes.len() - dropped_indexes.len();
    report.indexes_dropped = dropped_indexes.len();
    report.blobs_kept = reachable.iter().filter(|h| scan.blobs.contains_key(*h)).count();
    report.bytes_kept = reachable.iter().filter_map(|h| scan.blobs.get(h)).map(|b| b.size).sum();
    report.blobs_young = young;
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
    let going = Going {
        images: &dropped,
        indexes: &dropped_indexes,
        blobs: &doomed,
    };
    let records = records_going(storage, &scan, &going, options.grace).await?;
    report.records_deleted = records.len();
    if options.dry_run {
        report.blobs_deleted = doomed.len();
        report.bytes_deleted = doomed.values().sum();
        report.store_bytes_after = report.store_bytes_before - report.bytes_deleted;
        report.store_objects_after =
            report.store_objects_before - (report.blobs_deleted + report.records_deleted) as u64;
        say(&format!(
            "gc: dry run: would delete {} records and {} blobs ({}); nothing changed",
            report.records_deleted,
            report.blobs_deleted,
            bytes(report.bytes_deleted)
        ));
        return Ok(report);
    }
    delete_records(storage, &records, lease).await?;
    say(&format!("gc: deleted {} records", report.records_deleted));
    let temporary = storage.remove_stale_temp_files("").await?;
    if temporary > 0 {
        say(&format!("gc: deleted {temporary} temporary files of killed writes"));
    }

    if let Some(held) = lease.as_mut() {
        held.settle().await?;
    }
    let spared = spare_new_records(storage, &scan, &mut doomed).await?;
    if spared > 0 {
        say(&format!(
            "gc: {spared} blobs spared: records written meanwhile name them"
        ));
    }
    let (count, deleted) = delete_blobs(storage, &doomed, lease).await?;
    // The other notes of the deleted blobs (those of dropped images went
    // with their records).
    let dropped_keys: HashSet<&str> = dropped.iter().map(|i| i.key.as_str()).collect();
    let notes: Vec<String> = (scan.notes.iter())
        .filter(|(blob, image)| doomed.contains_key(blob) && !dropped_keys.contains(image.as_str()))
        .map(|(blob, image)| format!("blob-users/{blob}/{image}"))
        .collect();
    delete_records(storage, &notes, lease).await?;
    report.records_deleted += notes.len();
    report.blobs_deleted = count;
    report.bytes_deleted = deleted;
    say(&format!("gc: deleted {count} blobs ({})", bytes(deleted)));

    LastGc::from_report(&report).write(storage).await?;
    Ok(report)
}

/// What a scan leads to.
struct Decision<'a> {
    dropped: Vec<&'a Image>,
    dropped_indexes: Vec<&'a Index>,
    /// Blobs (hex) that kept records reach.
    reachable: HashSet<String>,
    /// Blobs to delete, with their sizes: unreached and older than the grace.
    doomed: HashMap<String, u64>,
    /// Blobs unreached but within the grace.
    young: usize,
}

/// Which images and indexes go, and which blobs with them.
fn decide<'a>(scan: &'a Scan, options: &Options) -> Decision<'a> {
    let kept = keep(scan, options);
    let (kept_images, dropped): (Vec<&Image>, Vec<&Image>) =
        scan.images.iter().partition(|i| kept.contains(i.key.as_str()));
    let kept_blobs: HashSet<&str> = (kept_images.iter())
        .flat_map(|i| i.blobs.iter().map(String::as_str))
        .collect();
    let (kept_indexes, dropped_indexes): (Vec<&Index>, Vec<&Index>) =
        (scan.indexes.iter()).partition(|index| index.manifests.iter().all(|m| kept_blobs.contains(m.as_str())));
    let mut reachable: HashSet<String> = kept_blobs.iter().map(|&b| b.to_owned()).collect();
    reachable.extend(kept_indexes.iter().map(|i| i.document.clone()));
    let cutoff = SystemTime::now() - options.grace;
    let unreached = scan.blobs.iter().filter(|(hex, _)| !reachable.contains(*hex));
    let (old, young): (Vec<_>, Vec<_>) = unreached.partition(|(_, blob)| blob.modified < cutoff);
    Decision {
        dropped,
        dropped_indexes,
        doomed: old.into_iter().map(|(hex, blob)| (hex.clone(), blob.size)).collect(),
        young: young.len(),
        reachable,
    }
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

/// The records of what is dropped and of the blobs to delete, in the order
/// they go.
async fn records_going(
    storage: &Storage,
    scan: &Scan,
    going: &Going<'_>,
    grace: Duration,
) -> Result<Vec<String>, StorageError> {
    let image_keys: HashSet<&str> = scan.images.iter().map(|i| i.key.as_str()).collect();
    let dropped: HashSet<&str> = going.images.iter().map(|i| i.key.as_str()).collect();
    let mut records: Vec<String> = Vec::new();
    // A manifest two image records share keeps its referrers while one is kept.
    let kept_manifests: HashSet<&str> = (scan.images.iter())
        .filter(|i| !dropped.contains(i.key.as_str()))
        .flat_map(|i| i.manifests.iter().map(String::as_str))
        .collect();
    for image in going.images {
        records.push(format!("images/{}", image.key));
        records.push(format!("plans/{}", image.key));
        records.push(format!("pulled/{}", image.key));
        let unshared = image.manifests.iter().filter(|m| !kept_manifests.contains(m.as_str()));
        records.extend(unshared.map(|m| format!("{REFERRERS}/{m}")));
    }
    records.extend(going.indexes.iter().map(|i| format!("indexes/{}", i.key)));
    let noted = scan.notes.iter().filter(|(_, image)| dropped.contains(image.as_str()));
    records.extend(noted.map(|(blob, image)| format!("blob-users/{blob}/{image}")));
    // Plans and last pulls are written around an image record; those
    // without one, and older than the grace, belong to no build.
    let cutoff = SystemTime::now() - grace;
    for kind in ["plans", "pulled"] {
        let orphans = storage.list_records_meta(kind).await?;
        records.extend(
            orphans
                .into_iter()
                .filter(|o| !image_keys.contains(o.key.as_str()) && o.modified < cutoff)
                .map(|o| format!("{kind}/{}", o.key)),
        );
    }
    records.extend(build_leases_going(storage, &image_keys, &dropped).await?);
    let layers = read_all(storage, "layers", |bytes| {
        serde_json::from_slice::<LayerDigests>(bytes).ok()
    })
    .await?;
    records.extend(
        layers
            .into_iter()
            .filter(|(_, layer)| going.blobs.contains_key(layer.digest.hex()))
            .map(|(listed, _)| format!("layers/{}", listed.key)),
    );
    records.sort();
    records.dedup();
    // Image records before everything else they lead to: a collector
    // killed after them leaves only records nothing reads.
    records.sort_by_key(|r| !r.starts_with("images/"));
    Ok(records)
}

/// The objects of build leases that go: those of dropped images, and the
/// series of builds that recorded nothing (they failed, or their replica
/// was killed; left by versions that did not end such leases) once
/// released or expired. A series taken again meanwhile keeps the object
/// its new holder made, which the listing did not see.
async fn build_leases_going(
    storage: &Storage,
    image_keys: &HashSet<&str>,
    dropped: &HashSet<&str>,
) -> Result<Vec<String>, StorageError> {
    let mut series: HashMap<String, Vec<String>> = HashMap::new();
    for lease in storage.list_records_meta("leases/build").await? {
        let Some((image, object)) = lease.key.split_once('/') else {
            continue;
        };
        series.entry(image.to_owned()).or_default().push(object.to_owned());
    }
    let leases = Leases::new(storage.clone());
    let mut going = Vec::new();
    for (image, objects) in series {
        let unrecorded = !image_keys.contains(image.as_str());
        if dropped.contains(image.as_str()) || (unrecorded && !live(&leases, &image).await?) {
            going.extend(objects.iter().map(|object| format!("leases/build/{image}/{object}")));
        }
    }
    Ok(going)
}

/// Whether the build lease of `image` is held now.
async fn live(leases: &Leases, image: &str) -> Result<bool, StorageError> {
    let state = leases.current(&format!("build/{image}")).await?;
    Ok(state.is_some_and(|state| state.live()))
}

/// Deletes `records`, in their order, while the lease holds.
async fn delete_records(storage: &Storage, records: &[String], lease: &mut Option<Held>) -> Result<(), StorageError> {
    for chunk in records.chunks(AT_ONCE * 4) {
        keep_lease(lease, None).await?;
        futures::stream::iter(chunk.iter().cloned().map(|record| delete_record(storage, record)))
            .buffer_unordered(AT_ONCE)
            .try_collect::<()>()
            .await?;
    }
    Ok(())
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

/// Deletes the doomed blobs while the lease holds; how many, and their bytes.
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

async fn delete_blob(storage: &Storage, hex: String) -> Result<(), StorageError> {
    let digest: Digest = format!("sha256:{hex}")
        .parse()
        .expect("listed blobs are named by digest");
    storage.delete_blob(&digest).await
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

    /// Marks the lease sweeping and waits [`SETTLE`], renewing it.
    async fn settle(&mut self) -> Result<(), StorageError> {
        self.renew(Some(SWEEPING)).await?;
        let settled = Instant::now() + SETTLE;
        while Instant::now() < settled {
            tokio::time::sleep(self.every().min(settled - Instant::now())).await;
            self.renew(Some(SWEEPING)).await?;
        }
        Ok(())
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

fn unix_now() -> u64 {
    unix(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Listed;

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
            manifests: vec![],
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
            notes: vec![],
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

    #[tokio::test]
    async fn build_leases_of_no_image_go_once_released_or_expired() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::filesystem(dir.path()).await.unwrap();
        let leases = Leases::new(storage.clone());
        let hour = Duration::from_secs(3600);
        let held = |take| match take {
            Take::Held { lease, .. } => *lease,
            other => panic!("{other:?}"),
        };
        held(leases.take("build/failed", hour, None).await.unwrap())
            .release()
            .await
            .unwrap();
        let _killed = held(
            leases
                .take("build/killed", Duration::from_millis(1), None)
                .await
                .unwrap(),
        );
        let _running = held(leases.take("build/running", hour, None).await.unwrap());
        let _kept = held(leases.take("build/kept", hour, None).await.unwrap());
        let _dropped = held(leases.take("build/dropped", hour, None).await.unwrap());
        tokio::time::sleep(Duration::from_millis(20)).await;
        let images = HashSet::from(["kept", "dropped"]);
        let mut going = build_leases_going(&storage, &images, &HashSet::from(["dropped"]))
            .await
            .unwrap();
        going.sort();
        let object = |image: &str| format!("leases/build/{image}/00000000000000000001");
        assert_eq!(
            going,
            [object("dropped"), object("failed"), object("killed")],
            "a build still running keeps its lease, and so does a kept image"
        );
    }
}
