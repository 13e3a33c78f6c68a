//! Real clients pull from `nixery serve` by tag and by digest, in OCI and in
//! Docker format (two registries, one preferring each; every client here
//! accepts both), and the engines run a program from the image: skopeo,
//! podman, containerd (`ctr`) and Docker. containerd and dockerd are started
//! privately for each test, in temporary folders, and stopped after it.
//!
//! An engine that cannot start on this machine skips its test with a
//! message, unless `NIXERY_REQUIRE_ENGINES=1` (set by `scripts/test.sh`),
//! where that is a failure.

mod common;

use std::process::Command;

use common::engines::{Podman, containerd, docker_host, dockerd};
use common::{Registry, Unpacked, request, run, sha256};

const IMAGE: &str = "shell/hello";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

/// A registry that serves `IMAGE` in one format, and that format's digest.
struct Served {
    registry: Registry,
    media_type: &'static str,
    digest: String,
}

impl Served {
    fn reference(&self) -> String {
        format!("{}/{IMAGE}", self.registry.address)
    }

    fn by_digest(&self) -> String {
        format!("{}@{}", self.reference(), self.digest)
    }
}

/// One registry preferring OCI manifests, one preferring Docker's.
fn both_formats() -> [Served; 2] {
    [("oci", OCI_MANIFEST), ("docker", DOCKER_MANIFEST)].map(|(format, media_type)| {
        let registry = Registry::start_with(&[("NIXERY_MANIFEST_FORMAT", format)]);
        let manifest = request(
            "GET",
            &registry.url(&format!("/v2/{IMAGE}/manifests/latest")),
            &[("Accept", media_type)],
        );
        assert_eq!(manifest.status, 200);
        let digest = manifest.header("docker-content-digest").to_owned();
        Served {
            registry,
            media_type,
            digest,
        }
    })
}

#[test]
fn skopeo_pulls_both_formats_by_tag_and_digest() {
    for served in both_formats() {
        let work = tempfile::tempdir().unwrap();
        for (reference, folder) in [
            (format!("{}:latest", served.reference()), "by-tag"),
            (served.by_digest(), "by-digest"),
        ] {
            let destination = work.path().join(folder);
            run(
                "skopeo",
                &[
                    "copy",
                    "--src-tls-verify=false",
                    &format!("docker://{reference}"),
                    &format!("dir:{}", destination.display()),
                ],
            );
            // `dir:` keeps the manifest exactly as the registry sent it.
            let manifest = std::fs::read(destination.join("manifest.json")).unwrap();
            assert_eq!(sha256(&manifest), served.digest, "{reference}");
            let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
            assert_eq!(manifest["mediaType"], served.media_type);
        }
    }
}

#[test]
fn podman_pulls_and_runs_both_formats() {
    let podman = Podman::new();
    let podman = |args: &[&str]| podman.run(args);
    for served in both_formats() {
        let tagged = format!("{}:latest", served.reference());
        podman(&["pull", "--tls-verify=false", &tagged]);
        // Both formats share a config, so podman holds them as one image
        // with one repository digest per registry.
        let digests = podman(&[
            "image",
            "inspect",
            "--format",
            "{{range .RepoDigests}}{{.}}\n{{end}}",
            &tagged,
        ]);
        assert!(digests.lines().any(|d| d == served.by_digest()), "{digests}");
        podman(&["pull", "--tls-verify=false", &served.by_digest()]);
        for reference in [tagged.as_str(), &served.by_digest()] {
            let output = podman(&["run", "--rm", reference, "hello"]);
            assert_eq!(output, "Hello, world!\n", "{reference}");
        }
        let output = podman(&["run", "--rm", &tagged, "bash", "-c", "echo $((6 * 7))"]);
        assert_eq!(output, "42\n");
    }
}

#[test]
fn podman_runs_zstd_layers() {
    let registry = Registry::start_with(&[("NIXERY_COMPRESSION", "zstd")]);
    let image = format!("{}/{IMAGE}", registry.address);
    let output = Podman::new().run(&["run", "--rm", "--tls-verify=false", &image, "hello"]);
    assert_eq!(output, "Hello, world!\n");
    let manifest = request(
        "GET",
        &registry.url(&format!("/v2/{IMAGE}/manifests/latest")),
        &[("Accept", OCI_MANIFEST)],
    );
    assert!(String::from_utf8_lossy(&manifest.body).contains("tar+zstd"));
}

#[test]
fn containerd_pulls_and_runs_both_formats() {
    let Some(containerd) = containerd() else { return };
    let address = containerd.socket.to_str().unwrap().to_owned();
    let ctr = |args: &[&str]| {
        let mut all = vec!["--address", &address];
        all.extend_from_slice(args);
        run("ctr", &all)
    };
    for (n, served) in both_formats().iter().enumerate() {
        let tagged = format!("{}:latest", served.reference());
        ctr(&["images", "pull", "--plain-http", &tagged]);
        // `ctr images ls`: REF TYPE DIGEST SIZE PLATFORMS LABELS
        let listing = ctr(&["images", "ls"]);
        let line = listing
            .lines()
            .find(|l| l.starts_with(&format!("{tagged} ")))
            .unwrap_or_else(|| panic!("{tagged} not in {listing}"));
        let columns: Vec<&str> = line.split_whitespace().collect();
        assert_eq!((columns[1], columns[2]), (served.media_type, served.digest.as_str()));
        ctr(&["images", "pull", "--plain-http", &served.by_digest()]);
        // ctr can lose the output of a task that exits at once (containerd
        // issue 770), so the check runs inside the container and its exit
        // status, which ctr passes on, says how it went.
        let check = r#"test "$(hello)" = "Hello, world!""#;
        for (m, reference) in [tagged.as_str(), &served.by_digest()].into_iter().enumerate() {
            ctr(&["run", "--rm", reference, &format!("t{n}{m}"), "bash", "-c", check]);
        }
        let failing = Command::new("ctr")
            .args([
                "--address",
                &address,
                "run",
                "--rm",
                &tagged,
                &format!("f{n}"),
                "bash",
                "-c",
                "exit 3",
            ])
            .status()
            .unwrap();
        assert_eq!(failing.code(), Some(3), "ctr passes the exit status on");
    }
}

#[test]
fn docker_pulls_and_runs_both_formats() {
    let Some(containerd) = containerd() else { return };
    let Some(dockerd) = dockerd(&containerd) else { return };
    let host = docker_host(&dockerd);
    let docker = |args: &[&str]| {
        let mut all = vec!["-H", &host];
        all.extend_from_slice(args);
        run("docker", &all)
    };
    for served in both_formats() {
        let tagged = format!("{}:latest", served.reference());
        let pulled = docker(&["pull", &tagged]);
        assert!(pulled.contains(&format!("Digest: {}", served.digest)), "{pulled}");
        docker(&["pull", &served.by_digest()]);
        for reference in [tagged.as_str(), &served.by_digest()] {
            let output = docker(&["run", "--rm", "--network", "none", reference, "hello"]);
            assert_eq!(output, "Hello, world!\n", "{reference}");
        }
    }
}

/// Runs `nixery build` with the shipped package set and storage in `cache`.
fn nixery_build(cache: &std::path::Path, args: &[&str]) {
    let output = Command::new(env!("CARGO_BIN_EXE_nixery"))
        .arg("build")
        .args(args)
        .env("NIXERY_PKGS_PATH", concat!(env!("CARGO_MANIFEST_DIR"), "/pkgs"))
        .env("STORAGE_PATH", cache)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "nixery build {args:?}: {stderr}");
    assert!(
        stderr.contains("wrote shell/hello:latest"),
        "plain progress lines: {stderr}"
    );
}

#[test]
fn nixery_build_writes_what_skopeo_and_docker_load_accept() {
    let work = tempfile::tempdir().unwrap();
    let cache = work.path().join("cache");
    let layout = work.path().join("layout");
    nixery_build(&cache, &["shell/hello", "--output", layout.to_str().unwrap()]);
    let copy = work.path().join("copy");
    run(
        "skopeo",
        &[
            "copy",
            &format!("oci:{}:latest", layout.display()),
            &format!("oci:{}:latest", copy.display()),
        ],
    );
    let unpacked = Unpacked::from_layout(tempfile::tempdir().unwrap(), &copy, "latest");
    assert_eq!(unpacked.run(&["hello"]), "Hello, world!\n");

    // The same image as a registry serves it.
    let registry = Registry::start();
    let served = request(
        "GET",
        &registry.url(&format!("/v2/{IMAGE}/manifests/latest")),
        &[("Accept", OCI_MANIFEST)],
    );
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], served.header("docker-content-digest"));

    let archive = work.path().join("hello.tar");
    nixery_build(
        &cache,
        &[
            "shell/hello",
            "--output",
            archive.to_str().unwrap(),
            "--output-format",
            "docker-archive",
        ],
    );
    let Some(containerd) = containerd() else { return };
    let Some(dockerd) = dockerd(&containerd) else { return };
    let host = docker_host(&dockerd);
    let loaded = run("docker", &["-H", &host, "load", "-i", archive.to_str().unwrap()]);
    assert!(loaded.contains("shell/hello:latest"), "{loaded}");
    let output = run(
        "docker",
        &[
            "-H",
            &host,
            "run",
            "--rm",
            "--network",
            "none",
            "shell/hello:latest",
            "hello",
        ],
    );
    assert_eq!(output, "Hello, world!\n");
}

#[test]
fn pulls_need_credentials_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let (htpasswd, _) = common::alice(dir.path());
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "ci-token-1\n").unwrap();
    let registry = Registry::start_with(&[
        ("NIXERY_HTPASSWD", htpasswd.to_str().unwrap()),
        ("NIXERY_TOKENS", tokens.to_str().unwrap()),
    ]);

    let refused = request("GET", &registry.url("/v2/"), &[]);
    assert_eq!(refused.status, 401);
    assert_eq!(refused.error_code(), "UNAUTHORIZED");
    assert_eq!(refused.header("www-authenticate"), "Basic realm=\"nixery\"");
    let token = request("GET", &registry.url("/v2/"), &[("Authorization", "Bearer ci-token-1")]);
    assert_eq!(token.status, 200);
    assert_eq!(
        request("GET", &registry.url("/healthz"), &[]).status,
        200,
        "health stays open"
    );
    assert_eq!(
        request("GET", &registry.url("/"), &[]).status,
        200,
        "the web pages are open by default"
    );
    assert_eq!(registry.nix_runs(), 0);

    let layout = dir.path().join("oci");
    let source = format!("docker://{}/{IMAGE}", registry.address);
    let destination = format!("oci:{}:latest", layout.display());
    let without = Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false", &source, &destination])
        .output()
        .unwrap();
    assert!(!without.status.success(), "no credentials, no pull");
    assert_eq!(registry.nix_runs(), 0, "refused before anything is built");
    run(
        "skopeo",
        &[
            "copy",
            "--src-tls-verify=false",
            "--src-creds",
            "alice:s3cret",
            &source,
            &destination,
        ],
    );

    let guarded = Registry::start_with(&[
        ("NIXERY_HTPASSWD", htpasswd.to_str().unwrap()),
        ("NIXERY_PROTECT_WEB", "true"),
    ]);
    for (path, status) in [("/", 401), ("/metrics", 401), ("/image/hello", 401), ("/healthz", 200)] {
        assert_eq!(request("GET", &guarded.url(path), &[]).status, status, "{path}");
    }

    let podman = Podman::new();
    let auth_file = dir.path().join("auth.json");
    let auth_file = auth_file.to_str().unwrap();
    podman.run(&[
        "login",
        "--tls-verify=false",
        "--authfile",
        auth_file,
        "-u",
        "alice",
        "-p",
        "s3cret",
        &registry.address,
    ]);
    podman.run(&[
        "pull",
        "--tls-verify=false",
        "--authfile",
        auth_file,
        &format!("{}/{IMAGE}", registry.address),
    ]);
}
