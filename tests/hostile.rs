//! Hostile requests and clients. Requests sent as raw HTTP, so that
//! nothing normalises them on the way, get the right 4xx JSON error at once,
//! none reaches Nix unless it names valid packages, and none creates files.
//! Outsiders cost nothing unbounded: pages go through the build admission of
//! pulls (and run nothing without credentials when access control is on),
//! connections that send nothing are closed and never lock clients out,
//! source refreshes and readiness probes run one at a time, the build share
//! follows the client behind a trusted proxy. Secrets in source URLs appear
//! nowhere; ranges, conditions and pagination follow the RFCs.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::{Registry, Response, request};

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
fn a_client_may_start_only_so_many_new_images_a_minute() {
    let registry = Registry::start_with(&[("NIXERY_CLIENT_BUILD_RATE", "6")]);
    for i in 0..6 {
        let missing = registry.get(&format!("/v2/nosuchpackage{i}/manifests/latest"));
        assert_eq!(missing.status, 404, "new images within the rate start");
    }
    let refused = registry.get("/v2/hello/manifests/latest");
    assert_eq!(
        (refused.status, refused.error_code().as_str()),
        (429, "TOOMANYREQUESTS")
    );
    let wait: u64 = refused.header("retry-after").parse().unwrap();
    assert!((1..=10).contains(&wait), "the next token comes within 60 s / 6: {wait}");
    let message = refused.json()["errors"][0]["message"].as_str().unwrap().to_owned();
    assert!(message.contains(&format!("in {wait} s")), "{message}");
    assert_eq!(
        registry.get("/v2/nosuchpackage0/manifests/latest").status,
        429,
        "a failed image is no running flight to join"
    );
    std::thread::sleep(Duration::from_secs(wait));
    assert_eq!(
        registry.get("/v2/hello/manifests/latest").status,
        200,
        "after the wait it builds"
    );
    assert_eq!(
        registry.get("/v2/hello/manifests/latest").status,
        200,
        "a cached image costs no token"
    );
}

#[test]
fn a_failed_build_leaves_no_lease() {
    let registry = Registry::start();
    let missing = registry.get("/v2/nosuchpackage/manifests/latest");
    assert_eq!(
        (missing.status, missing.error_code().as_str()),
        (404, "MANIFEST_UNKNOWN")
    );
    let leases = registry.storage().join("cache/leases/build");
    // The lease objects, `<image key>/<seq>`.
    let objects = || -> Vec<String> {
        match leases.exists() {
            true => walk(&leases).into_iter().filter(|name| name.contains('/')).collect(),
            false => vec![],
        }
    };
    assert_eq!(objects(), Vec::<String>::new(), "nothing of the build's lease is left");
    assert_eq!(registry.get("/v2/hello/manifests/latest").status, 200);
    assert_eq!(objects().len(), 1, "a build that recorded its image keeps its lease");
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

/// Sends `method path` with `headers` from a thread of its own.
fn in_background(
    registry: &Registry,
    method: &'static str,
    path: &str,
    headers: &[(&str, &str)],
) -> JoinHandle<Response> {
    let url = registry.url(path);
    let headers: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    std::thread::spawn(move || {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        request(method, &url, &headers)
    })
}

/// Waits until `registry`'s log mentions `text`.
fn wait_for_log(registry: &Registry, text: &str) {
    let started = Instant::now();
    while !registry.log().contains(text) {
        assert!(started.elapsed() < Duration::from_secs(30), "{text} in the log");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn image_pages_start_nothing_without_credentials() {
    let set = common::slow_packages(2, 12);
    let dir = tempfile::tempdir().unwrap();
    let (htpasswd, basic) = common::alice(dir.path());
    let registry = Registry::start_with(&[
        ("NIXERY_PKGS_PATH", set.path().to_str().unwrap()),
        ("NIXERY_HTPASSWD", htpasswd.to_str().unwrap()),
        ("NIXERY_MAX_BUILDS", "1"),
        ("NIXERY_CLIENT_BUILDS", "1"),
    ]);
    let pages: Vec<_> = (1..=12)
        .map(|i| {
            let method = if i % 2 == 0 { "HEAD" } else { "GET" };
            in_background(&registry, method, &format!("/image/slow{i}"), &[])
        })
        .collect();
    for (i, page) in pages.into_iter().enumerate() {
        let page = page.join().unwrap();
        assert_eq!(page.status, 404, "slow{}", i + 1);
        if i % 2 == 0 {
            assert!(String::from_utf8_lossy(&page.body).contains("not built yet"));
        }
    }
    assert_eq!(registry.get("/").status, 200, "the landing page is open");
    assert_eq!(registry.get("/image/Hello").status, 400);
    assert_eq!(
        registry.runs("nix"),
        0,
        "no Nix and no git for anyone without credentials"
    );

    // What was built is shown to anyone, from its records.
    let pulled = request(
        "GET",
        &registry.url("/v2/hello/manifests/latest"),
        &[("Authorization", &basic)],
    );
    assert_eq!(pulled.status, 200);
    let runs = registry.runs("nix");
    let page = registry.get("/image/hello");
    assert_eq!(page.status, 200);
    assert!(String::from_utf8_lossy(&page.body).contains("hello-2.12.1"));
    assert_eq!(registry.runs("nix"), runs, "a built image's page runs nothing");

    // With credentials, a page builds what it shows, as a pull would.
    let page = request("GET", &registry.url("/image/slow1"), &[("Authorization", &basic)]);
    assert_eq!(page.status, 200, "{}", String::from_utf8_lossy(&page.body));
    assert_eq!(registry.nix_runs(), 2);
}

#[test]
fn image_pages_are_admitted_like_pulls() {
    let set = common::slow_packages(2, 14);
    let registry = Registry::start_with(&[
        ("NIXERY_PKGS_PATH", set.path().to_str().unwrap()),
        ("NIXERY_MAX_BUILDS", "1"),
        ("NIXERY_CLIENT_BUILDS", "1"),
    ]);
    // Twelve pages of new images from one client: one build within its
    // share, the others are told to come back.
    let pages: Vec<_> = (1..=12)
        .map(|i| in_background(&registry, "GET", &format!("/image/slow{i}"), &[]))
        .collect();
    let statuses: Vec<u16> = pages.into_iter().map(|p| p.join().unwrap().status).collect();
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 1, "{statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 11, "{statuses:?}");
    assert_eq!(registry.runs("nix-store --realise"), 1);

    // Twenty HEADs of one new image, one none of the twelve asked for
    // (whichever of them won the build slot is built now): one flight.
    let before = registry.nix_runs();
    let heads: Vec<_> = (0..20)
        .map(|_| in_background(&registry, "HEAD", "/image/slow13", &[]))
        .collect();
    for head in heads {
        assert_eq!(head.join().unwrap().status, 200);
    }
    assert_eq!(registry.nix_runs(), before + 1);

    // A page and a pull of the same image wait for the same build.
    let page = in_background(&registry, "GET", "/image/slow14", &[]);
    let pull = in_background(&registry, "GET", "/v2/slow14/manifests/latest", &[]);
    assert_eq!(page.join().unwrap().status, 200);
    assert_eq!(pull.join().unwrap().status, 200);
    assert_eq!(registry.nix_runs(), before + 2);
    assert_eq!(registry.runs("nix-store --realise"), 3);
}

/// Lets this process open the connections a test opens.
fn raise_own_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct they are given.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max.min(1 << 16);
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
    }
}

/// Reads from `stream` until the server closes it or `deadline` passes;
/// whether it was closed.
fn closed_by(stream: &mut TcpStream, deadline: Instant) -> bool {
    let mut buffer = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// HTTP/2 with prior knowledge: the preface and an empty SETTINGS frame.
const H2_HELLO: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[test]
fn connections_that_send_nothing_are_closed_and_never_lock_clients_out() {
    raise_own_fd_limit();
    let registry = Registry::start_limited(
        &[("NIXERY_HEADER_TIMEOUT", "2"), ("NIXERY_IDLE_TIMEOUT", "2")],
        Some(256),
    );
    let work = tempfile::tempdir().unwrap();
    let pull = |n: usize| {
        let layout = format!("oci:{}:latest", work.path().join(n.to_string()).display());
        common::skopeo_copy(&format!("docker://{}/shell/hello", registry.address), &layout);
    };
    pull(0);

    let opened = Instant::now();
    let mut silent: Vec<TcpStream> = (0..400)
        .map(|_| TcpStream::connect(&registry.address).unwrap())
        .collect();
    let mut idle_h2: Vec<TcpStream> = (0..50)
        .map(|_| {
            let mut stream = TcpStream::connect(&registry.address).unwrap();
            stream.write_all(H2_HELLO).unwrap();
            stream
        })
        .collect();
    let started = Instant::now();
    pull(1);
    let took = started.elapsed();
    eprintln!("skopeo pulled in {took:?} past 400 silent and 50 idle HTTP/2 connections");
    assert!(took < Duration::from_secs(2), "{took:?}");

    // Each is closed: to make room, or at its first-request deadline. Those
    // past the cap wait in the listen backlog until evicted ones are gone
    // (each gets a close grace), so their deadline starts up to a header
    // timeout late; a loaded machine (the full suite) adds seconds more.
    let deadline = opened + Duration::from_secs(2 * 2 + 3);
    let mut open = 0;
    for stream in silent.iter_mut().chain(idle_h2.iter_mut()) {
        if !closed_by(stream, deadline) {
            open += 1;
        }
    }
    eprintln!("all closed {:?} after they were opened", opened.elapsed());
    assert_eq!(open, 0, "connections still open after the header timeout");
    assert!(!registry.log().contains("cannot accept"), "descriptors never ran out");

    // A keep-alive connection is closed once idle for the idle timeout.
    let mut keep_alive = TcpStream::connect(&registry.address).unwrap();
    keep_alive.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = [0u8; 1024];
    keep_alive.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let n = keep_alive.read(&mut answer).unwrap();
    assert!(String::from_utf8_lossy(&answer[..n]).starts_with("HTTP/1.1 200"));
    let answered = Instant::now();
    assert!(closed_by(&mut keep_alive, answered + Duration::from_secs(4)));
    assert!(
        answered.elapsed() >= Duration::from_millis(1900),
        "not before the idle timeout"
    );
    let metrics = String::from_utf8(registry.get("/metrics").body).unwrap();
    for reason in ["no_request", "evicted", "idle"] {
        assert!(
            metrics.contains(&format!("nixery_connections_closed_total{{reason=\"{reason}\"}}")),
            "{reason}:\n{metrics}"
        );
    }
}

#[test]
fn past_the_cap_new_connections_are_refused_and_busy_ones_kept() {
    let gate = tempfile::NamedTempFile::new().unwrap();
    let set = common::gated_package_set(gate.path());
    let registry = Registry::start_with(&[
        ("NIXERY_PKGS_PATH", set.path().to_str().unwrap()),
        ("NIXERY_MAX_CONNECTIONS", "4"),
    ]);
    let waiting: Vec<_> = (0..4)
        .map(|_| in_background(&registry, "GET", "/v2/slow/manifests/latest", &[]))
        .collect();
    wait_for_log(&registry, "slow-1.0.drv");
    std::thread::sleep(Duration::from_millis(200));
    let mut refused = TcpStream::connect(&registry.address).unwrap();
    let _ = refused.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        closed_by(&mut refused, Instant::now() + Duration::from_secs(2)),
        "closed at once"
    );
    drop(gate);
    for pull in waiting {
        assert_eq!(pull.join().unwrap().status, 200, "the busy ones kept working");
    }
    assert!(
        String::from_utf8(registry.get("/metrics").body)
            .unwrap()
            .contains("nixery_connections_closed_total{reason=\"refused\"} 1")
    );
}

#[test]
fn secrets_in_source_urls_are_never_shown() {
    const SECRETS: [&str; 3] = ["S3CRET-TOKEN", "S3CRET-QUERY", "deploy"];
    let assert_hidden = |place: &str, text: &str| {
        for secret in SECRETS {
            assert!(!text.contains(secret), "{secret} in {place}:\n{text}");
        }
    };

    // A git repository that cannot be reached, as in the report.
    let registry = Registry::start_with(&[
        ("NIXERY_PKGS_PATH", ""),
        (
            "NIXERY_PKGS_REPO",
            "http://deploy:S3CRET-TOKEN@127.0.0.1:9/nixpkgs.git?access_token=S3CRET-QUERY",
        ),
        ("NIXERY_WEB_SHOW_LOGS", "true"),
    ]);
    let listing = registry.get("/v2/hello/manifests/latest");
    assert_eq!(listing.status, 500);
    let message = listing.json()["errors"][0]["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("listing the refs of http://127.0.0.1:9/nixpkgs.git failed"),
        "{message}"
    );
    let fetch = registry.get("/v2/hello/manifests/0123456789abcdef0123456789abcdef01234567");
    assert_eq!(fetch.status, 500);
    let page = String::from_utf8(registry.get("/").body).unwrap();
    assert!(
        page.contains("the git repository http://127.0.0.1:9/nixpkgs.git"),
        "{page}"
    );
    assert!(
        page.contains("Nix&#39;s last lines") || page.contains("Nix's last lines"),
        "{page}"
    );
    assert_hidden("the pull's error", &String::from_utf8_lossy(&listing.body));
    assert_hidden("the fetch's error", &String::from_utf8_lossy(&fetch.body));
    assert_hidden("the landing page", &page);
    assert_hidden(
        "the metrics",
        &String::from_utf8(registry.get("/metrics").body).unwrap(),
    );
    assert_hidden("the log", &registry.log());

    // A channel whose URL carries a user, a password and a token.
    let mirror = tempfile::tempdir().unwrap();
    let tree = tempfile::tempdir().unwrap();
    common::package_set(tree.path(), "Hello from a mirror");
    common::tarball(tree.path(), "nixpkgs-nixos", &mirror.path().join("nixos.tar.gz"));
    let address = common::serve_files(mirror.path());
    let template = format!("http://deploy:S3CRET-TOKEN@{address}/{{channel}}.tar.gz?access_token=S3CRET-QUERY");
    let registry = Registry::start_with(&[
        ("NIXERY_PKGS_PATH", ""),
        ("NIXERY_CHANNEL", "nixos"),
        ("NIXERY_CHANNEL_URL", &template),
        ("NIXERY_CHANNEL_TAGS", "missing"),
        ("NIXERY_WEB_SHOW_LOGS", "true"),
    ]);
    let hello = common::Unpacked::pull(&registry, "hello", "latest");
    assert_eq!(hello.run_default(), "Hello from a mirror\n");
    let labels = &hello.config["config"]["Labels"];
    assert_eq!(
        labels["org.opencontainers.image.source"],
        format!("http://{address}/nixos.tar.gz")
    );
    let missing = registry.get("/v2/hello/manifests/missing");
    assert_eq!(missing.status, 500, "the mirror has no missing.tar.gz");
    assert_hidden("the labels", &labels.to_string());
    assert_hidden("the download's error", &String::from_utf8_lossy(&missing.body));
    assert_hidden("the landing page", &String::from_utf8(registry.get("/").body).unwrap());
    assert_hidden(
        "the image page",
        &String::from_utf8(registry.get("/image/hello").body).unwrap(),
    );
    assert_hidden(
        "the metrics",
        &String::from_utf8(registry.get("/metrics").body).unwrap(),
    );
    assert_hidden("the log", &registry.log());
}

/// A git repository with the shipped package set in one commit; its URL.
fn git_package_set() -> (tempfile::TempDir, String) {
    let repo = tempfile::tempdir().unwrap();
    common::git(repo.path(), &["init", "-q"]);
    common::package_set(repo.path(), "Hello from git");
    common::git(repo.path(), &["add", "default.nix"]);
    common::git(repo.path(), &["commit", "-q", "-m", "first"]);
    let url = format!("file://{}", repo.path().display());
    (repo, url)
}

/// Sends `count` GETs of `path` at once; each must answer 200.
fn all_at_once(registry: &Registry, path: &str, count: usize) {
    let requests: Vec<_> = (0..count).map(|_| in_background(registry, "GET", path, &[])).collect();
    for request in requests {
        assert_eq!(request.join().unwrap().status, 200, "{path}");
    }
}

#[test]
fn revision_refreshes_run_one_at_a_time() {
    let (_repo, url) = git_package_set();
    let git = Registry::start_with(&[("NIXERY_PKGS_PATH", ""), ("NIXERY_PKGS_REPO", &url)]);
    all_at_once(&git, "/", 30);
    assert_eq!(git.runs("git ls-remote"), 1, "thirty pages, one listing");

    let path = Registry::start_with(&[("RUST_LOG", "info,nixery::source=debug")]);
    all_at_once(&path, "/", 40);
    wait_for_log(&path, "hashed the package set");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        path.log().matches("hashed the package set").count(),
        1,
        "forty pages, one hash"
    );
}

#[test]
fn a_refresh_never_holds_up_a_cached_pull() {
    let (_repo, url) = git_package_set();
    let registry = Registry::start_with(&[("NIXERY_PKGS_PATH", ""), ("NIXERY_PKGS_REPO", &url)]);
    assert_eq!(registry.get("/v2/hello/manifests/latest").status, 200);

    // From now on, listing the refs waits for the gate to go.
    let gate = tempfile::NamedTempFile::new().unwrap();
    let entered = gate.path().with_extension("entered");
    registry.wrap(
        "git",
        &format!(
            r#"if [ "$1" = ls-remote ] && [ -e {gate} ]; then touch {entered}; while [ -e {gate} ]; do sleep 0.05; done; fi"#,
            gate = gate.path().display(),
            entered = entered.display()
        ),
    );
    std::thread::sleep(Duration::from_millis(10_500)); // the refs are no longer trusted
    let page = in_background(&registry, "GET", "/", &[]);
    let started = Instant::now();
    while !entered.exists() {
        assert!(started.elapsed() < Duration::from_secs(20), "the refresh starts");
        std::thread::sleep(Duration::from_millis(20));
    }
    let started = Instant::now();
    let pull = registry.get("/v2/hello/manifests/latest");
    eprintln!("a cached pull during a refresh took {:?}", started.elapsed());
    // The gate is still here, so the refresh cannot have finished: the
    // pull was answered from the refs known before.
    assert_eq!(pull.status, 200);
    assert_eq!(
        registry.runs("git ls-remote"),
        2,
        "the pull started no refresh of its own"
    );
    drop(gate);
    assert_eq!(page.join().unwrap().status, 200);
}

#[test]
fn readiness_is_probed_once_for_many_requests() {
    let registry = Registry::start();
    all_at_once(&registry, "/readyz", 200);
    assert_eq!(registry.runs("store ping"), 1);
}

#[test]
fn ranges_conditions_and_pages_follow_the_rfcs() {
    let registry = Registry::start();
    let manifest = registry.get("/v2/hello/manifests/latest").json();
    let layer = &manifest["layers"][0];
    let (digest, size) = (layer["digest"].as_str().unwrap(), layer["size"].as_u64().unwrap());
    let blob = format!("/v2/hello/blobs/{digest}");
    let ranged = |range: &str, extra: &[(&str, &str)]| {
        let mut headers = vec![("Range", range)];
        headers.extend_from_slice(extra);
        request("GET", &registry.url(&blob), &headers)
    };

    let huge = ranged("bytes=0-18446744073709551615", &[]);
    assert_eq!(huge.status, 206);
    assert_eq!(huge.header("content-range"), format!("bytes 0-{}/{size}", size - 1));
    assert_eq!(huge.body.len() as u64, size);
    for signed in ["bytes=+1-2", "bytes=-+5", "bytes=1-+2", "bytes= 1-2x"] {
        let whole = ranged(signed, &[]);
        assert_eq!(whole.status, 200, "{signed} is no range");
        assert_eq!(whole.body.len() as u64, size);
    }
    let etag = format!("\"{digest}\"");
    for range in ["bytes=0-9", "bytes=999999999-"] {
        let cached = ranged(range, &[("If-None-Match", &etag)]);
        assert_eq!(cached.status, 304, "{range}: the client has it");
        assert!(cached.body.is_empty());
    }

    for query in ["n=abc&n=1", "n=%zz&n=1", "n=1&n=1", "n=+1", "n=-1", "n=1&last=a&last=b"] {
        let (status, body) = get(&registry, &format!("/v2/hello/tags/list?{query}"));
        assert_eq!(
            (status, code(&body).as_str()),
            (400, "PAGINATION_NUMBER_INVALID"),
            "{query}"
        );
    }
    assert_eq!(get(&registry, "/v2/hello/tags/list?n=1").0, 200);
}

#[test]
fn the_build_share_follows_the_client_behind_a_trusted_proxy() {
    let set = common::slow_packages(3, 4);
    let registry = Registry::start_with(&[
        ("NIXERY_PKGS_PATH", set.path().to_str().unwrap()),
        ("NIXERY_CLIENT_BUILDS", "1"),
        ("NIXERY_MAX_BUILDS", "4"),
        ("NIXERY_TRUSTED_PROXIES", "127.0.0.0/8"),
    ]);
    let as_client = |path: &str, client: &str| in_background(&registry, "GET", path, &[("X-Forwarded-For", client)]);
    let first = as_client("/v2/slow1/manifests/latest", "203.0.113.1");
    wait_for_log(&registry, "slow1-1.0.drv");
    let other = as_client("/v2/slow2/manifests/latest", "203.0.113.2");
    let same = as_client("/v2/hello/manifests/latest", "198.51.100.7, 203.0.113.1")
        .join()
        .unwrap();
    assert_eq!(same.status, 429, "the proxy saw 203.0.113.1, whatever it claimed");
    let ipv6 = as_client("/v2/slow3/manifests/latest", "2001:db8:1:2::1");
    wait_for_log(&registry, "slow3-1.0.drv");
    let neighbour = request(
        "GET",
        &registry.url("/v2/hello/manifests/latest"),
        &[("Forwarded", r#"for="[2001:db8:1:2::99]:4711""#)],
    );
    assert_eq!(neighbour.status, 429, "one /64, one share");
    for build in [first, other, ipv6] {
        assert_eq!(build.join().unwrap().status, 200, "each client had its own share");
    }

    // Without trusted proxies the header means nothing: one share for all.
    let untrusting = Registry::start_with(&[
        ("NIXERY_PKGS_PATH", set.path().to_str().unwrap()),
        ("NIXERY_CLIENT_BUILDS", "1"),
    ]);
    let first = in_background(
        &untrusting,
        "GET",
        "/v2/slow4/manifests/latest",
        &[("X-Forwarded-For", "203.0.113.1")],
    );
    wait_for_log(&untrusting, "slow4-1.0.drv");
    let other = request(
        "GET",
        &untrusting.url("/v2/hello/manifests/latest"),
        &[("X-Forwarded-For", "203.0.113.2")],
    );
    assert_eq!(other.status, 429);
    assert_eq!(first.join().unwrap().status, 200);
}
