//! Retention: which images storage keeps, and the garbage collector that
//! deletes the rest (`nixery gc`, or `serve` every `NIXERY_GC_INTERVAL`).
//! Images pulled or built within a period are kept, and when a byte budget
//! is set, only the most recently pulled of them that fit; everything a
//! kept image reaches stays, and everything else older than a grace period
//! goes. Whatever goes is built again, byte for byte, when next pulled.
//!
//! Deleting safely while other replicas build (`collector.rs`, `guard.rs`):
//! 1. the collector takes the `gc` lease (one collector at a time) and
//!    decides from the records what is kept;
//! 2. it deletes records first: dropped image records (and their plans,
//!    last-pull records and build leases), indexes that name a dropped
//!    manifest, and the layer records of blobs it will delete (and, in a
//!    folder, the temporary files of writes killed half-way). From then on
//!    no builder finds those layers packed;
//! 3. it marks its lease `sweeping` and waits [`SETTLE`], twice the
//!    builder's window ([`guard::WINDOW`]);
//! 4. it lists the records again and keeps the blobs of any record that
//!    appeared meanwhile;
//! 5. it deletes the blobs no record reaches that are older than the grace
//!    period, stopping if its lease runs out, and releases the lease.
//!
//! A builder writes an image or index record only through
//! [`guard::publish`]: not while a collector sweeps, after checking that
//! the record's blobs exist, within the window. A record written before the
//! sweep began is seen in step 4; one written after finds the deleted
//! blobs missing first, and the builder packs them again. A collector
//! killed at any step leaves records that name existing blobs, or blobs no
//! record names, which the next run deletes.

mod collector;
pub mod guard;
mod scan;
mod status;

use std::time::Duration;

pub use collector::{Outcome, Report, collect};
pub use status::{LastGc, NOTICE_EVERY, Status, StorageUse, Watch};

/// The collector's lease.
pub const GC_LEASE: &str = "gc";
/// The lease's phase while blobs are deleted.
pub const SWEEPING: &str = "sweeping";
/// How long the collector waits between marking its lease sweeping and
/// listing the records again: more than a builder's window.
pub const SETTLE: Duration = Duration::from_secs(2 * guard::WINDOW.as_secs());
/// What a collection keeps, and how it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Images pulled or built within this are kept.
    pub keep_pulled_within: Duration,
    /// At most this many bytes of blobs are kept: the least recently pulled
    /// images are dropped first.
    pub max_bytes: Option<u64>,
    /// Blobs younger than this are never deleted.
    pub grace: Duration,
    /// Report what would go; change nothing.
    pub dry_run: bool,
    /// How long the collector's lease lasts unless renewed.
    pub lease_ttl: Duration,
}
