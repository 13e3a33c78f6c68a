//! The registry's metrics, in the Prometheus text format at `/metrics`:
//! builds, build time per stage, cache hits and misses, external program
//! invocations (Nix and git, under the name `nix_invocations`), bytes
//! served, requests by route and status, connections (open, and closed
//! by the registry, by why), storage use, the last garbage collection, and
//! build lease waits and takeovers.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A stage of an image build.
#[derive(Clone, Copy, Debug)]
pub enum Stage {
    Nix,
    Layering,
    Packing,
    Storage,
}

/// A cache the builder looks in.
#[derive(Clone, Copy, Debug)]
pub enum CacheKind {
    Manifest,
    Layer,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabel {
    cache: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CommandLabel {
    command: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    status: u16,
}

/// Every metric, and the registry that encodes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    builds_started: Counter,
    builds_finished: Counter,
    builds_failed: Counter,
    stage_seconds: Family<StageLabel, Histogram>,
    cache_hits: Family<CacheLabel, Counter>,
    cache_misses: Family<CacheLabel, Counter>,
    nix_invocations: Family<CommandLabel, Counter>,
    bytes_served: Family<KindLabel, Counter>,
    requests: Family<RequestLabels, Counter>,
    connections_open: Gauge,
    connections_closed: Family<ReasonLabel, Counter>,
    storage_bytes: Gauge,
    storage_objects: Gauge,
    gc_last_run: Gauge,
    gc_last_deleted_bytes: Gauge,
    gc_last_deleted_objects: Gauge,
    lease_waits: Counter,
    lease_takeovers: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("nixery");
        let metrics = Metrics {
            builds_started: Counter::default(),
            builds_finished: Counter::default(),
            builds_failed: Counter::default(),
            stage_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.005, 2.0, 16))),
            cache_hits: Family::default(),
            cache_misses: Family::default(),
            nix_invocations: Family::default(),
            bytes_served: Family::default(),
            requests: Family::default(),
            connections_open: Gauge::default(),
            connections_closed: Family::default(),
            storage_bytes: Gauge::default(),
            storage_objects: Gauge::default(),
            gc_last_run: Gauge::default(),
            gc_last_deleted_bytes: Gauge::default(),
            gc_last_deleted_objects: Gauge::default(),
            lease_waits: Counter::default(),
            lease_takeovers: Counter::default(),
            registry: Registry::default(),
        };
        registry.register("builds_started", "Image builds started", metrics.builds_started.clone());
        registry.register(
            "builds_finished",
            "Image builds that finished",
            metrics.builds_finished.clone(),
        );
        registry.register(
            "builds_failed",
            "Image builds that failed",
            metrics.builds_failed.clone(),
        );
        registry.register(
            "build_stage_seconds",
            "Time image builds spent per stage (nix, layering, packing, storage)",
            metrics.stage_seconds.clone(),
        );
        registry.register("cache_hits", "Cache hits (manifest, layer)", metrics.cache_hits.clone());
        registry.register(
            "cache_misses",
            "Cache misses (manifest, layer)",
            metrics.cache_misses.clone(),
        );
        registry.register(
            "nix_invocations",
            "External program invocations (Nix and git), by command",
            metrics.nix_invocations.clone(),
        );
        registry.register(
            "bytes_served",
            "Bytes of manifests and blobs served",
            metrics.bytes_served.clone(),
        );
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            metrics.requests.clone(),
        );
        registry.register(
            "connections_open",
            "Client connections open",
            metrics.connections_open.clone(),
        );
        registry.register(
            "connections_closed",
            "Client connections the registry closed, by reason (no_request, idle, evicted, refused, stopping)",
            metrics.connections_closed.clone(),
        );
        registry.register(
            "storage_bytes",
            "Bytes in storage, as last measured",
            metrics.storage_bytes.clone(),
        );
        registry.register(
            "storage_objects",
            "Objects in storage, as last measured",
            metrics.storage_objects.clone(),
        );
        registry.register(
            "gc_last_run_timestamp_seconds",
            "When the last garbage collection of this storage ended (by any replica)",
            metrics.gc_last_run.clone(),
        );
        registry.register(
            "gc_last_deleted_bytes",
            "Bytes of blobs the last garbage collection deleted",
            metrics.gc_last_deleted_bytes.clone(),
        );
        registry.register(
            "gc_last_deleted_objects",
            "Objects (blobs and records) the last garbage collection deleted",
            metrics.gc_last_deleted_objects.clone(),
        );
        registry.register(
            "build_lease_waits",
            "Builds that waited for another replica holding the image's lease",
            metrics.lease_waits.clone(),
        );
        registry.register(
            "build_lease_takeovers",
            "Build leases taken over after their holder let them expire",
            metrics.lease_takeovers.clone(),
        );
        Metrics { registry, ..metrics }
    }
}

impl Metrics {
    pub fn build_started(&self) {
        self.builds_started.inc();
    }

    pub fn build_ended(&self, ok: bool) {
        match ok {
            true => self.builds_finished.inc(),
            false => self.builds_failed.inc(),
        };
    }

    pub fn stage(&self, stage: Stage, took: Duration) {
        let stage = match stage {
            Stage::Nix => "nix",
            Stage::Layering => "layering",
            Stage::Packing => "packing",
            Stage::Storage => "storage",
        };
        self.stage_seconds
            .get_or_create(&StageLabel { stage })
            .observe(took.as_secs_f64());
    }

    pub fn cache(&self, cache: CacheKind, hit: bool) {
        let cache = match cache {
            CacheKind::Manifest => "manifest",
            CacheKind::Layer => "layer",
        };
        let family = if hit { &self.cache_hits } else { &self.cache_misses };
        family.get_or_create(&CacheLabel { cache }).inc();
    }

    /// One start of an external program (Nix or git), by its name
    /// (`nix`, `nix-instantiate`, `nix-store`, `git`).
    pub fn nix_invocation(&self, command: &'static str) {
        self.nix_invocations.get_or_create(&CommandLabel { command }).inc();
    }

    /// `kind`: `manifest` or `blob`.
    pub fn served(&self, kind: &'static str, bytes: u64) {
        self.bytes_served.get_or_create(&KindLabel { kind }).inc_by(bytes);
    }

    pub fn request(&self, route: &'static str, status: u16) {
        self.requests.get_or_create(&RequestLabels { route, status }).inc();
    }

    /// The Prometheus text format.
    pub fn connections_open(&self, open: usize) {
        self.connections_open.set(open as i64);
    }

    /// `count` connections the registry closed for `reason`.
    pub fn connections_closed(&self, reason: &'static str, count: usize) {
        if count > 0 {
            self.connections_closed
                .get_or_create(&ReasonLabel { reason })
                .inc_by(count as u64);
        }
    }

    /// Bytes and objects in storage, as last measured.
    pub fn storage(&self, bytes: u64, objects: u64) {
        self.storage_bytes.set(bytes as i64);
        self.storage_objects.set(objects as i64);
    }

    /// The last garbage collection: when it ended (unix seconds), and the
    /// bytes and objects it deleted.
    pub fn last_gc(&self, at: u64, bytes: u64, objects: u64) {
        self.gc_last_run.set(at as i64);
        self.gc_last_deleted_bytes.set(bytes as i64);
        self.gc_last_deleted_objects.set(objects as i64);
    }

    /// A build waited for another replica's lease on its image.
    pub fn lease_wait(&self) {
        self.lease_waits.inc();
    }

    /// A build took over a lease whose holder let it expire.
    pub fn lease_takeover(&self) {
        self.lease_takeovers.inc();
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_named_for_prometheus() {
        let metrics = Metrics::default();
        metrics.build_started();
        metrics.build_ended(true);
        metrics.stage(Stage::Packing, Duration::from_millis(30));
        metrics.cache(CacheKind::Layer, false);
        metrics.nix_invocation("nix-instantiate");
        metrics.served("blob", 1234);
        metrics.request("manifest", 200);
        metrics.storage(2048, 7);
        metrics.last_gc(1_700_000_000, 1024, 3);
        metrics.lease_wait();
        metrics.lease_takeover();
        let text = metrics.encode();
        for line in [
            "nixery_builds_started_total 1",
            "nixery_builds_finished_total 1",
            "nixery_builds_failed_total 0",
            "nixery_build_stage_seconds_count{stage=\"packing\"} 1",
            "nixery_cache_misses_total{cache=\"layer\"} 1",
            "nixery_nix_invocations_total{command=\"nix-instantiate\"} 1",
            "nixery_bytes_served_total{kind=\"blob\"} 1234",
            "nixery_http_requests_total{route=\"manifest\",status=\"200\"} 1",
            "nixery_storage_bytes 2048",
            "nixery_storage_objects 7",
            "nixery_gc_last_run_timestamp_seconds 1700000000",
            "nixery_gc_last_deleted_bytes 1024",
            "nixery_gc_last_deleted_objects 3",
            "nixery_build_lease_waits_total 1",
            "nixery_build_lease_takeovers_total 1",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in:\n{text}");
        }
    }
}
