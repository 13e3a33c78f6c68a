//! Hostile requests, sent as raw HTTP so that nothing normalises them on
//! the way: each must get the right 4xx JSON error at once, none may reach
//! Nix unless it names valid packages, and none may create files.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::Registry;

/// Sends `request` as is; the status and body of the answer.
fn raw(registry: &Registry, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(&registry.address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"));
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

fn get(registry: &Registry, path: &str) -> (u16, String) {
    raw(
        registry,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

/// The registry error code of a JSON error body.
fn code(body: &str) -> String {
    let json: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body:?}"));
    json["errors"][0]["code"].as_str().unwrap().to_owned()
}

#[test]
fn hostile_names_tags_and_digests_get_quick_json_errors_without_nix() {
    let registry = Registry::start();
    let long = "a".repeat(300);
    let many: Vec<String> = (0..65).map(|i| format!("p{i}")).collect();
    let many = many.join("/");
    let cases: Vec<(String, u16, &str)> = [
        (format!("/v2/{long}/manifests/latest"), 400, "NAME_INVALID"),
        (format!("/v2/{many}/manifests/latest"), 400, "NAME_INVALID"),
        ("/v2/a//b/manifests/latest".into(), 400, "NAME_INVALID"),
        ("/v2/Hello/manifests/latest".into(), 400, "NAME_INVALID"),
        ("/v2/../etc/passwd/manifests/latest".into(), 400, "NAME_INVALID"),
        ("/v2/%2e%2e/etc/manifests/latest".into(), 400, "NAME_INVALID"),
        ("/v2/a%2fb%2f..%2fc/manifests/latest".into(), 400, "NAME_INVALID"),
        ("/v2/a%00b/manifests/latest".into(), 400, "NAME_INVALID"),
        ("/v2/a%22b/manifests/latest".into(), 400, "NAME_INVALID"),
        ("/v2/%24%7Bx%7D/manifests/latest".into(), 400, "NAME_INVALID"),
        ("/v2/.%2fx/manifests/latest".into(), 400, "NAME_INVALID"),
        ("/v2/%3Cnixpkgs%3E/manifests/latest".into(), 400, "NAME_INVALID"),
        ("/v2/hello/manifests/.INVALID".into(), 404, "MANIFEST_UNKNOWN"),
        ("/v2/hello/manifests/-x".into(), 404, "MANIFEST_UNKNOWN"),
        (
            format!("/v2/hello/manifests/{}", "t".repeat(200)),
            404,
            "MANIFEST_UNKNOWN",
        ),
        ("/v2/hello/manifests/sha256:short".into(), 400, "DIGEST_INVALID"),
        ("/v2/hello/blobs/sha256:zz".into(), 400, "DIGEST_INVALID"),
        ("/v2/hello/blobs/..%2f..%2fetc%2fpasswd".into(), 404, "UNSUPPORTED"),
        ("/v2/hello/blobs/sha256:..x".into(), 400, "DIGEST_INVALID"),
        ("/v2/hello/blobs/sha256:../../x".into(), 404, "UNSUPPORTED"),
        ("/v2/hello/manifests/latest?x=%00".into(), 200, ""),
    ]
    .into();
    for (path, status, expected) in &cases {
        let started = Instant::now();
        let (got, body) = get(&registry, path);
        assert_eq!(got, *status, "{path}: {body}");
        if !expected.is_empty() {
            assert_eq!(code(&body), *expected, "{path}");
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{path} took {:?}",
            started.elapsed()
        );
    }
    assert_eq!(registry.nix_runs(), 1, "only the valid name reached Nix");

    // A valid name that looks like Nix is only ever an attribute path.
    let (status, body) = get(&registry, "/v2/builtins.currentsystem/manifests/latest");
    assert_eq!((status, code(&body).as_str()), (404, "MANIFEST_UNKNOWN"), "{body}");

    // Large headers get a JSON 431; huge ones are cut off by the HTTP layer
    // (431 without a body) before anything reads them.
    let headers = |bytes: usize| {
        format!(
            "GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
            "b".repeat(bytes)
        )
    };
    let (status, body) = raw(&registry, headers(100 << 10).as_bytes());
    assert_eq!((status, code(&body).as_str()), (431, "UNSUPPORTED"));
    assert_eq!(raw(&registry, headers(1 << 20).as_bytes()).0, 431);

    // Nothing was written but the layout, blobs and records.
    let mut names: Vec<String> = walk(&registry.storage());
    names.retain(|n| !n.starts_with("blobs/sha256/") && !n.starts_with("cache/"));
    names.sort();
    assert_eq!(
        names,
        ["blobs", "blobs/sha256", "cache", "index.json", "oci-layout", "staging"]
    );
}

#[test]
fn a_limit_on_packages_per_image() {
    let registry = Registry::start_with(&[("NIXERY_MAX_PACKAGES", "2")]);
    let (status, body) = get(&registry, "/v2/hello/git/curl/manifests/latest");
    assert_eq!((status, code(&body).as_str()), (400, "NAME_INVALID"));
    assert!(body.contains("at most 2 packages"), "{body}");
    assert_eq!(registry.nix_runs(), 0);
    assert_eq!(get(&registry, "/v2/hello/git/manifests/latest").0, 200);
}

#[test]
fn a_client_may_start_only_so_many_builds_at_once() {
    let set = common::slow_package_set(2);
    let registry = Registry::start_with(&[
        ("NIXERY_PKGS_PATH", set.path().to_str().unwrap()),
        ("NIXERY_CLIENT_BUILDS", "1"),
    ]);
    let url = registry.url("/v2/slow/manifests/latest");
    let first = std::thread::spawn(move || common::request("GET", &url, &[]).status);
    let started = Instant::now();
    while !registry.log().contains("slow-1.0.drv") {
        assert!(started.elapsed() < Duration::from_secs(20), "the first build starts");
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = registry.get("/v2/hello/manifests/latest");
    assert_eq!((second.status, second.error_code().as_str()), (429, "TOOMANYREQUESTS"));
    assert_eq!(second.header("retry-after"), "5");
    let same = registry.get("/v2/slow/manifests/latest");
    assert_eq!(same.status, 200, "joining a build in flight is no new build");
    assert_eq!(first.join().unwrap(), 200);
    assert_eq!(
        registry.get("/v2/hello/manifests/latest").status,
        200,
        "the share is back"
    );
}

#[test]
fn slow_clients_are_cut_off_and_do_not_hold_up_others() {
    let registry = Registry::start_with(&[("NIXERY_HEADER_TIMEOUT", "1")]);
    let mut slow: Vec<TcpStream> = (0..100)
        .map(|_| {
            let mut stream = TcpStream::connect(&registry.address).unwrap();
            stream.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: ").unwrap();
            stream
        })
        .collect();
    let started = Instant::now();
    let (status, _) = get(&registry, "/v2/");
    assert_eq!(status, 200);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "others are served at once"
    );

    std::thread::sleep(Duration::from_millis(1500));
    for stream in &mut slow {
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buffer = [0u8; 512];
        // Closed by the server: end of stream (perhaps after a 408), or a reset.
        let closed = match stream.read(&mut buffer) {
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => false,
            Ok(0) | Err(_) => true,
            Ok(n) => String::from_utf8_lossy(&buffer[..n]).starts_with("HTTP/1.1 408"),
        };
        assert!(closed, "a client that never finished its headers is disconnected");
    }
}

/// Every path below `root`, relative to it.
fn walk(root: &std::path::Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            found.push(path.strip_prefix(root).unwrap().display().to_string());
            if path.is_dir() {
                stack.push(path);
            }
        }
    }
    found
}
