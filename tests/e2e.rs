//! End to end: `nixery serve` on a free loopback port with the shipped
//! package set, real Nix, and real clients (curl-like requests, skopeo,
//! umoci, chroot). Needs root (chroot) and the tools `scripts/setup.sh`
//! installs.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;
use sha2::{Digest as _, Sha256};

/// A running registry with its own empty storage, counting Nix runs.
struct Registry {
    child: Child,
    address: String,
    dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Registry {
        let dir = tempfile::tempdir().unwrap();
        // Wrappers that count how often Nix is asked to evaluate.
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        let real = which("nix-instantiate");
        let wrapper = format!(
            "#!/bin/sh\necho run >> {}\nexec {} \"$@\"\n",
            dir.path().join("nix-runs").display(),
            real.display()
        );
        std::fs::write(bin.join("nix-instantiate"), wrapper).unwrap();
        std::fs::set_permissions(
            bin.join("nix-instantiate"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());

        let mut child = Command::new(env!("CARGO_BIN_EXE_nixery"))
            .arg("serve")
            .env("PATH", path)
            .env("PORT", "0")
            .env("NIXERY_LISTEN_ADDRESS", "127.0.0.1")
            .env("NIXERY_PKGS_PATH", Path::new(env!("CARGO_MANIFEST_DIR")).join("pkgs"))
            .env("NIXERY_STORAGE_BACKEND", "filesystem")
            .env("STORAGE_PATH", dir.path().join("storage"))
            .env_remove("NIXERY_CHANNEL")
            .env_remove("NIXERY_PKGS_REPO")
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let address = loop {
            let line = lines.next().expect("nixery exited before serving").unwrap();
            if let Some(rest) = line.strip_prefix("nixery is serving on http://") {
                break rest.trim().to_owned();
            }
        };
        let log = dir.path().join("log");
        std::thread::spawn(move || {
            use std::io::Write;
            let mut file = std::fs::File::create(log).unwrap();
            for line in lines.map_while(Result::ok) {
                writeln!(file, "{line}").unwrap();
            }
        });
        Registry { child, address, dir }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    fn nix_runs(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("nix-runs"))
            .map(|s| s.lines().count())
            .unwrap_or(0)
    }

    fn get(&self, path: &str) -> Response {
        request("GET", &self.url(path), &[])
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Response {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or_else(|| panic!("no {name} header"))
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// The registry error code of an error response, checking the envelope.
    fn error_code(&self) -> String {
        assert_eq!(self.header("content-type"), "application/json");
        let body = self.json();
        let errors = body["errors"].as_array().expect("errors array");
        assert_eq!(errors.len(), 1);
        assert!(errors[0]["message"].is_string());
        errors[0]["code"].as_str().unwrap().to_owned()
    }
}

fn request(method: &str, url: &str, headers: &[(&str, &str)]) -> Response {
    let client = reqwest::blocking::Client::new();
    let mut request = client.request(method.parse().unwrap(), url);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.bytes().unwrap().to_vec();
    Response { status, headers, body }
}

fn which(program: &str) -> PathBuf {
    std::env::var("PATH")
        .unwrap()
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{program} is not installed: run scripts/setup.sh"))
}

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Pulls `source` (a docker:// reference) into the OCI layout `destination`.
fn skopeo_copy(source: &str, destination: &str) {
    run("skopeo", &["copy", "--src-tls-verify=false", source, destination]);
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

#[test]
fn pull_unpack_and_run_shell_hello() {
    let registry = Registry::start();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("oci");
    let image = format!("docker://{}/shell/hello", registry.address);

    skopeo_copy(&image, &format!("oci:{}:latest", layout.display()));
    let runs_after_first_pull = registry.nix_runs();
    assert_eq!(runs_after_first_pull, 1, "one evaluation for one image");

    let bundle = work.path().join("bundle");
    run(
        "umoci",
        &[
            "unpack",
            "--image",
            &format!("{}:latest", layout.display()),
            bundle.to_str().unwrap(),
        ],
    );
    let rootfs = bundle.join("rootfs");
    let rootfs = rootfs.to_str().unwrap();
    assert_eq!(run("chroot", &[rootfs, "hello"]), "Hello, world!\n");
    assert_eq!(run("chroot", &[rootfs, "bash", "-c", "echo ok"]), "ok\n");
    assert_eq!(run("chroot", &[rootfs, "/bin/sh", "-c", "stat -c %a /tmp"]), "1777\n");
    assert_eq!(
        run("chroot", &[rootfs, "/usr/bin/env", "echo", "env works"]),
        "env works\n"
    );

    // A second pull is served from the cache: Nix does not run again.
    skopeo_copy(&image, &format!("oci:{}:again", layout.display()));
    assert_eq!(registry.nix_runs(), runs_after_first_pull);

    // Pull by digest.
    let digest = registry
        .get("/v2/shell/hello/manifests/latest")
        .header("docker-content-digest")
        .to_owned();
    let by_digest = format!("docker://{}/shell/hello@{digest}", registry.address);
    skopeo_copy(&by_digest, &format!("oci:{}:bydigest", layout.display()));
    assert_eq!(registry.nix_runs(), runs_after_first_pull);
}

#[test]
fn every_blob_matches_its_digest_and_diff_id() {
    let registry = Registry::start();
    let manifest = registry.get("/v2/shell/hello/git/manifests/latest");
    assert_eq!(manifest.status, 200);
    assert_eq!(
        manifest.header("content-type"),
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    assert_eq!(manifest.header("docker-content-digest"), sha256(&manifest.body));
    assert_eq!(manifest.header("content-length"), manifest.body.len().to_string());
    let manifest_json = manifest.json();

    let config_digest = manifest_json["config"]["digest"].as_str().unwrap();
    let config = registry.get(&format!("/v2/shell/hello/git/blobs/{config_digest}"));
    assert_eq!(sha256(&config.body), config_digest);
    let config = config.json();
    assert_eq!(config["architecture"], "amd64");
    assert_eq!(config["config"]["Cmd"], serde_json::json!(["bash"]));
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    let layers = manifest_json["layers"].as_array().unwrap();
    assert_eq!(layers.len(), diff_ids.len());
    assert!(layers.len() >= 3, "store paths are spread over layers");

    for (layer, diff_id) in layers.iter().zip(diff_ids) {
        let digest = layer["digest"].as_str().unwrap();
        let blob = registry.get(&format!("/v2/shell/hello/git/blobs/{digest}"));
        assert_eq!(blob.status, 200);
        assert_eq!(blob.header("docker-content-digest"), digest);
        assert_eq!(blob.body.len() as u64, layer["size"].as_u64().unwrap());
        assert_eq!(sha256(&blob.body), digest);
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(&blob.body[..])
            .read_to_end(&mut tar)
            .unwrap();
        assert_eq!(sha256(&tar), diff_id.as_str().unwrap());
    }
}

#[test]
fn two_registries_build_the_same_image() {
    let (a, b) = (Registry::start(), Registry::start());
    let path = "/v2/shell/hello/manifests/latest";
    let (ma, mb) = (a.get(path), b.get(path));
    assert_eq!(ma.status, 200);
    assert_eq!(ma.header("docker-content-digest"), mb.header("docker-content-digest"));
    assert_eq!(ma.body, mb.body);
}

#[test]
fn missing_packages_are_named_in_a_404() {
    let registry = Registry::start();
    let response = registry.get("/v2/hello/nosuchpackage/othermissing/manifests/latest");
    assert_eq!(response.status, 404);
    assert_eq!(response.error_code(), "MANIFEST_UNKNOWN");
    let message = response.json()["errors"][0]["message"].as_str().unwrap().to_owned();
    assert!(
        message.contains("nosuchpackage") && message.contains("othermissing"),
        "{message}"
    );
    assert!(!message.contains("hello"), "found packages are not named: {message}");

    let response = registry.get("/v2/tools/manifests/latest");
    assert_eq!(response.status, 404);
    assert_eq!(response.error_code(), "MANIFEST_UNKNOWN");
}

#[test]
fn package_lookup_follows_the_original() {
    let registry = Registry::start();
    for name in [
        "bashinteractive",
        "python3packages.numpy",
        "tools.jq",
        "7zip",
        "arm64/hello",
    ] {
        let response = registry.get(&format!("/v2/{name}/manifests/latest"));
        if name.starts_with("arm64/") {
            // No aarch64 builder here: a build error, reported as such.
            assert_eq!(response.status, 500, "{name}");
            assert_eq!(response.error_code(), "UNKNOWN");
            continue;
        }
        assert_eq!(
            response.status,
            200,
            "{name}: {}",
            String::from_utf8_lossy(&response.body)
        );
    }
}

#[test]
fn protocol_edges() {
    let registry = Registry::start();
    let ping = registry.get("/v2/");
    assert_eq!(ping.status, 200);
    assert_eq!(ping.header("docker-distribution-api-version"), "registry/2.0");
    assert_eq!(registry.get("/v2").status, 200);

    // Query strings do not break routing; HEAD answers like GET without a body.
    let get = registry.get("/v2/hello/manifests/latest?foo=bar");
    assert_eq!(get.status, 200);
    let head = request("HEAD", &registry.url("/v2/hello/manifests/latest"), &[]);
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    for h in ["content-type", "content-length", "docker-content-digest"] {
        assert_eq!(head.header(h), get.header(h), "{h}");
    }
    let digest = get.header("docker-content-digest").to_owned();
    let by_digest = registry.get(&format!("/v2/anything/manifests/{digest}"));
    assert_eq!((by_digest.status, &by_digest.body), (200, &get.body));
    assert_eq!(by_digest.header("content-type"), get.header("content-type"));

    // Blobs: HEAD, ranges, unknown and malformed digests.
    let layer = get.json()["layers"][0]["digest"].as_str().unwrap().to_owned();
    let blob = registry.get(&format!("/v2/hello/blobs/{layer}"));
    let head = request("HEAD", &registry.url(&format!("/v2/hello/blobs/{layer}")), &[]);
    assert_eq!(
        (head.status, head.header("content-length")),
        (200, blob.body.len().to_string().as_str())
    );
    assert!(head.body.is_empty());
    let ranged = request(
        "GET",
        &registry.url(&format!("/v2/hello/blobs/{layer}")),
        &[("Range", "bytes=10-19")],
    );
    assert_eq!(ranged.status, 206);
    assert_eq!(ranged.body, blob.body[10..20]);
    assert_eq!(
        ranged.header("content-range"),
        format!("bytes 10-19/{}", blob.body.len())
    );
    let beyond = format!("bytes={}-", blob.body.len());
    let unsatisfiable = request(
        "GET",
        &registry.url(&format!("/v2/hello/blobs/{layer}")),
        &[("Range", &beyond)],
    );
    assert_eq!(
        (unsatisfiable.status, unsatisfiable.error_code().as_str()),
        (416, "RANGE_INVALID")
    );
    assert_eq!(
        unsatisfiable.header("content-range"),
        format!("bytes */{}", blob.body.len())
    );

    let absent = format!("sha256:{}", "0".repeat(64));
    let missing = registry.get(&format!("/v2/hello/blobs/{absent}"));
    assert_eq!((missing.status, missing.error_code().as_str()), (404, "BLOB_UNKNOWN"));
    let missing = registry.get(&format!("/v2/hello/manifests/{absent}"));
    assert_eq!(
        (missing.status, missing.error_code().as_str()),
        (404, "MANIFEST_UNKNOWN")
    );
    let not_a_manifest = registry.get(&format!("/v2/hello/manifests/{layer}"));
    assert_eq!(
        (not_a_manifest.status, not_a_manifest.error_code().as_str()),
        (404, "MANIFEST_UNKNOWN")
    );
    let malformed = registry.get("/v2/hello/manifests/sha256:totallywrong");
    assert_eq!(
        (malformed.status, malformed.error_code().as_str()),
        (400, "DIGEST_INVALID")
    );
    let malformed = registry.get("/v2/hello/blobs/sha256:zz");
    assert_eq!(
        (malformed.status, malformed.error_code().as_str()),
        (400, "DIGEST_INVALID")
    );

    // Bad names and tags never reach Nix.
    let runs = registry.nix_runs();
    let invalid = registry.get("/v2/Hello/manifests/latest");
    assert_eq!((invalid.status, invalid.error_code().as_str()), (400, "NAME_INVALID"));
    let invalid = registry.get("/v2/hello/manifests/.INVALID_MANIFEST_NAME");
    assert_eq!(
        (invalid.status, invalid.error_code().as_str()),
        (404, "MANIFEST_UNKNOWN")
    );
    assert_eq!(registry.nix_runs(), runs);

    // Writes are refused; unknown routes are JSON 404s.
    for (method, path) in [
        ("POST", "/v2/hello/blobs/uploads/"),
        ("PUT", "/v2/hello/manifests/latest"),
        ("DELETE", "/v2/hello/manifests/latest"),
        ("PATCH", "/v2/hello/blobs/uploads/x"),
    ] {
        let response = request(method, &registry.url(path), &[]);
        assert_eq!(
            (response.status, response.error_code().as_str()),
            (405, "UNSUPPORTED"),
            "{method} {path}"
        );
    }
    let unknown = registry.get("/v2/hello/tags/list");
    assert_eq!((unknown.status, unknown.error_code().as_str()), (404, "UNSUPPORTED"));
    let unknown = registry.get("/v2/_catalog");
    assert_eq!(unknown.status, 404);
}
