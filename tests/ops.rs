//! Running the registry: metrics after real pulls, health and readiness,
//! request ids in responses and in the log lines of the builds they start,
//! and a graceful stop on SIGTERM that finishes an open request.

mod common;

use std::time::{Duration, Instant};

use common::{Registry, request, skopeo_copy};

#[test]
fn metrics_count_builds_caches_nix_and_bytes() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    for (n, image) in ["shell/hello", "shell/git", "shell/hello"].into_iter().enumerate() {
        let layout = format!("oci:{}:latest", work.path().join(n.to_string()).display());
        skopeo_copy(&format!("docker://{}/{image}", registry.address), &layout);
    }
    let metrics = String::from_utf8(registry.get("/metrics").body).unwrap();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} in\n{metrics}"))
    };
    assert_eq!(value("nixery_builds_started_total"), 2.0);
    assert_eq!(value("nixery_builds_finished_total"), 2.0);
    assert_eq!(value("nixery_builds_failed_total"), 0.0);
    for stage in ["nix", "layering", "packing", "storage"] {
        assert_eq!(
            value(&format!("nixery_build_stage_seconds_count{{stage=\"{stage}\"}}")),
            2.0
        );
    }
    assert!(
        value("nixery_cache_hits_total{cache=\"layer\"}") >= 1.0,
        "shell/git reuses shell/hello's layers"
    );
    assert!(value("nixery_cache_misses_total{cache=\"manifest\"}") >= 2.0);
    assert!(
        value("nixery_cache_hits_total{cache=\"manifest\"}") >= 1.0,
        "the second pull of shell/hello"
    );
    assert_eq!(value("nixery_nix_invocations_total{command=\"nix-instantiate\"}"), 2.0);
    assert!(value("nixery_bytes_served_total{kind=\"blob\"}") > 100_000.0);
    assert!(value("nixery_http_requests_total{route=\"manifest\",status=\"200\"}") >= 2.0);
    eprintln!(
        "{}",
        metrics
            .lines()
            .filter(|l| !l.starts_with('#') && !l.contains("_bucket"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn health_readiness_and_request_ids() {
    let registry = Registry::start();
    let health = registry.get("/healthz");
    assert_eq!(
        (health.status, String::from_utf8_lossy(&health.body).as_ref()),
        (200, "ok\n")
    );
    let ready = registry.get("/readyz");
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json(), serde_json::json!({ "nix": "ok", "storage": "ok" }));

    let response = registry.get("/v2/hello/manifests/latest");
    let id = response.header("x-request-id").to_owned();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    let log = registry.log();
    let nix_line = log.lines().find(|l| l.contains("nix finished")).unwrap();
    assert!(
        nix_line.contains(&id),
        "the build's log lines carry the request id: {nix_line}"
    );
    let given = request("GET", &registry.url("/v2/"), &[("x-request-id", "from-the-proxy")]);
    assert_eq!(
        given.header("x-request-id"),
        "from-the-proxy",
        "an id from a proxy is kept"
    );
}

#[test]
fn sigterm_finishes_the_open_request_then_stops() {
    let set = common::slow_package_set(3);
    let mut registry = Registry::start_with(&[("NIXERY_PKGS_PATH", set.path().to_str().unwrap())]);
    let url = registry.url("/v2/slow/manifests/latest");
    let open = std::thread::spawn(move || request("GET", &url, &[]).status);
    let started = Instant::now();
    while !registry.log().contains("slow-1.0.drv") {
        assert!(started.elapsed() < Duration::from_secs(20), "the build starts");
        std::thread::sleep(Duration::from_millis(50));
    }

    registry.terminate();
    std::thread::sleep(Duration::from_millis(300));
    let refused = reqwest::blocking::Client::new()
        .get(registry.url("/v2/"))
        .timeout(Duration::from_secs(2))
        .send();
    assert!(refused.is_err(), "no new connections once stopping");
    assert_eq!(open.join().unwrap(), 200, "the open request is answered");
    assert!(
        started.elapsed() > Duration::from_secs(3),
        "after the build ran its course"
    );
    let status = registry.wait();
    assert!(status.success(), "{status}");
    assert!(registry.log().contains("stopping: no new connections"));
}
