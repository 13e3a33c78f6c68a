//! Real programs: images of the Debian package set (`pkgs-debian`, whose
//! .deb files `scripts/setup.sh` fetches), pulled and run by podman and by
//! Docker. git, curl, python3 (also by its Debian name, `python3.11`), jq,
//! bash, coreutils and perl do real work in the container; a `nonroot`
//! image runs git as uid 1000 in its home; curl verifies a loopback TLS
//! server against the CA bundle, which has a test CA added through the
//! set's `extraCertificates`. Every package of the set answers to its own
//! name.

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::engines::{Podman, containerd, docker_host, dockerd};
use common::{Registry, run};
use nixery::nix::{self, attributes};
use nixery::reference;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// One image with most of the programs the checks run (`python3.11` by the
/// name of its Debian package, which has a `.`).
const TOOLS: &str = "shell/git/curl/python3/python3.11/jq/perl";
const NONROOT: &str = "nonroot/shell/git";

fn debian_set() -> PathBuf {
    Path::new(ROOT).join("pkgs-debian")
}

/// The upstream part of the version `pkgs-debian/packages.nix` pins for
/// `package`'s node: `2.39.5` of `1:2.39.5-0+deb12u3`.
fn pinned_upstream(package: &str) -> String {
    let set = std::fs::read_to_string(debian_set().join("packages.nix")).unwrap();
    let node = set
        .split(&format!("\n    \"{package}\" = {{\n      version = \""))
        .nth(1)
        .unwrap_or_else(|| panic!("{package} is a node of the set"));
    let version = node.split('"').next().unwrap();
    let without_epoch = version.split_once(':').map_or(version, |(_, v)| v);
    without_epoch
        .rsplit_once('-')
        .map_or(without_epoch, |(v, _)| v)
        .to_owned()
}

/// How a test runs a command in an image: `engine run --rm --network host
/// IMAGE ARGS…`, returning its standard output.
type Runner<'a> = dyn Fn(&str, &[&str]) -> String + 'a;

/// What every engine must be able to do with the tools image.
fn check_programs(registry: &Registry, web: &str, engine: &Runner) {
    let tools = format!("{}/{TOOLS}", registry.address);
    let git = engine(&tools, &["git", "--version"]);
    assert_eq!(git, format!("git version {}\n", pinned_upstream("git")));
    let history = engine(
        &tools,
        &[
            "bash",
            "-c",
            "cd /tmp && git init -q repo && cd repo && echo hi > a && git add a \
             && git -c user.name=N -c user.email=n@example.org commit -q -m first && git log --format=%s",
        ],
    );
    assert_eq!(history, "first\n");
    let fetched = engine(&tools, &["curl", "-fsS", &format!("http://{web}/greeting.txt")]);
    assert_eq!(fetched, "hello from the host\n");
    let python = engine(
        &tools,
        &[
            "python3",
            "-c",
            "import json, sqlite3, ssl, hashlib; print(ssl.OPENSSL_VERSION)",
        ],
    );
    assert!(python.starts_with("OpenSSL 3."), "{python}");
    assert_eq!(engine(&tools, &["python3.11", "-c", "print(1)"]), "1\n");
    let filtered = engine(&tools, &["bash", "-c", "echo '{\"a\": [1, 2]}' | jq -c .a"]);
    assert_eq!(filtered, "[1,2]\n");
    let bash = engine(&tools, &["bash", "--version"]);
    assert!(bash.starts_with("GNU bash, version 5."), "{bash}");
    let ls = engine(&tools, &["ls", "--version"]);
    assert!(ls.starts_with("ls (GNU coreutils)"), "{ls}");
    assert_eq!(engine(&tools, &["perl", "-MPOSIX", "-e", "print floor(2.5)"]), "2");

    let nonroot = format!("{}/{NONROOT}", registry.address);
    let as_user = engine(
        &nonroot,
        &[
            "bash",
            "-c",
            "id -u; pwd; git init -q repo && test -d repo/.git && echo made",
        ],
    );
    assert_eq!(as_user, "1000\n/home/nixery\nmade\n");
}

/// podman's arguments to run `args` in `image` on the host's network.
fn run_on_host<'a>(image: &'a str, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["run", "--rm", "--tls-verify=false", "--network", "host", image];
    all.extend_from_slice(args);
    all
}

/// A directory with `greeting.txt`, served over HTTP on loopback.
fn web_server() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("greeting.txt"), "hello from the host\n").unwrap();
    let address = common::serve_files(dir.path());
    (dir, address)
}

#[test]
fn podman_runs_real_programs() {
    let registry = Registry::start_with(&[("NIXERY_PKGS_PATH", debian_set().to_str().unwrap())]);
    let (_files, web) = web_server();
    let podman = Podman::overlay();
    let engine = |image: &str, args: &[&str]| podman.run(&run_on_host(image, args));
    check_programs(&registry, &web, &engine);
}

#[test]
fn docker_runs_real_programs() {
    let Some(containerd) = containerd() else { return };
    let Some(dockerd) = dockerd(&containerd) else { return };
    let registry = Registry::start_with(&[("NIXERY_PKGS_PATH", debian_set().to_str().unwrap())]);
    let (_files, web) = web_server();
    let host = docker_host(&dockerd);
    let engine = |image: &str, args: &[&str]| {
        let mut all = vec!["-H", &host, "run", "--rm", "--network", "host", image];
        all.extend_from_slice(args);
        run("docker", &all)
    };
    check_programs(&registry, &web, &engine);
}

/// A CA of the test's own, and a certificate it signed for `localhost`.
struct TestCa {
    dir: tempfile::TempDir,
}

impl TestCa {
    fn new() -> TestCa {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name).display().to_string();
        let openssl = |args: &[&str]| {
            run("openssl", args);
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=nixery test CA",
            "-keyout",
            &at("ca.key"),
            "-out",
            &at("ca.pem"),
        ]);
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &at("server.key"),
            "-out",
            &at("server.csr"),
        ]);
        std::fs::write(
            dir.path().join("san.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            &at("server.csr"),
            "-CA",
            &at("ca.pem"),
            "-CAkey",
            &at("ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &at("san.ext"),
            "-out",
            &at("server.pem"),
        ]);
        TestCa { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The Debian set with this CA added to its bundle.
    fn package_set(&self) -> PathBuf {
        let set = self.path("pkgs");
        std::fs::create_dir(&set).unwrap();
        std::fs::write(
            set.join("default.nix"),
            format!(
                "{{ system ? builtins.currentSystem }}:\nimport {} {{ inherit system; extraCertificates = [ {} ]; }}\n",
                debian_set().display(),
                self.path("ca.pem").display()
            ),
        )
        .unwrap();
        set
    }

    /// `openssl s_server -www` on a free loopback port, with the
    /// certificate the CA signed; stopped when dropped.
    fn serve(&self) -> (KillOnDrop, u16) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("openssl")
            .args(["s_server", "-quiet", "-www", "-accept", &format!("127.0.0.1:{port}")])
            .arg("-cert")
            .arg(self.path("server.pem"))
            .arg("-key")
            .arg(self.path("server.key"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "openssl s_server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        (KillOnDrop(child), port)
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn curl_verifies_tls_against_the_bundle() {
    let ca = TestCa::new();
    let set = ca.package_set();
    let registry = Registry::start_with(&[("NIXERY_PKGS_PATH", set.to_str().unwrap())]);
    let (_server, port) = ca.serve();
    let podman = Podman::overlay();
    let image = format!("{}/curl", registry.address);
    let url = format!("https://localhost:{port}/");
    let page = podman.run(&run_on_host(&image, &["curl", "-fsS", &url]));
    assert!(page.contains("s_server"), "{page}");

    // The same image without the test CA refuses the server.
    let plain = Registry::start_with(&[("NIXERY_PKGS_PATH", debian_set().to_str().unwrap())]);
    let image = format!("{}/curl", plain.address);
    let refused = podman.status(&run_on_host(&image, &["curl", "-fsS", &url]));
    assert_eq!(
        refused,
        Some(60),
        "curl's exit status for a certificate it cannot verify"
    );
}

/// Every Debian package of the set.
fn debian_packages() -> Vec<String> {
    let expression = format!("builtins.attrNames (import {ROOT}/pkgs-debian/packages.nix).packages");
    serde_json::from_str(&run(
        "nix-instantiate",
        &["--eval", "--strict", "--json", "-E", &expression],
    ))
    .unwrap()
}

/// The nixpkgs names people type, and every Debian package of the set
/// under its own name (`+` spelled `_plus`; the images of the public
/// request sequence among them), are image names that the registry's
/// lookup finds as derivations.
#[test]
fn nixpkgs_and_debian_names_are_attributes() {
    let nixpkgs = "git curl wget jq htop nano vim python3 perl openssh gnumake gcc nodejs ripgrep file zstd \
                   rsync tmux sqlite less findutils gnugrep gnused gawk openssl iproute2 procps strace tree \
                   unzip zip which bashinteractive coreutils moreutils cacert iana-etc";
    let debian = debian_packages();
    assert_eq!(debian.len(), 331);
    let names: Vec<String> = (nixpkgs.split_whitespace().map(str::to_owned))
        .chain(debian.iter().map(|name| attributes::spelled(name)))
        .collect();
    for name in &names {
        assert_eq!(reference::validate_name(name), Ok(()), "{name} is an image name");
    }
    let found = run(
        "nix-instantiate",
        &[
            "--read-write-mode",
            "--eval",
            "--strict",
            "--json",
            "--expr",
            nix::EVAL_NIX,
            "--argstr",
            "srcType",
            "path",
            "--argstr",
            "srcArgs",
            debian_set().to_str().unwrap(),
            "--argstr",
            "system",
            "x86_64-linux",
            "--argstr",
            "packages",
            &nix::lookup_requests(&names),
        ],
    );
    let found: Vec<serde_json::Value> = serde_json::from_str(&found).unwrap();
    let not_found: Vec<_> = (names.iter().zip(&found))
        .filter(|(_, record)| record["status"] != "ok")
        .map(|(name, record)| format!("{name}: {}", record["status"]))
        .collect();
    assert!(not_found.is_empty(), "{not_found:?}");
    assert_eq!(found.len(), names.len());
    let debian_found = &found[names.len() - debian.len()..];
    for (package, record) in debian.iter().zip(debian_found) {
        let drv = record["drv"].as_str().unwrap();
        let (_, drv_name) = drv.strip_prefix("/nix/store/").unwrap().split_once('-').unwrap();
        assert!(
            drv_name.starts_with(&format!("{package}-")) && drv_name.ends_with(".drv"),
            "{package} is its own environment: {drv}"
        );
    }

    let named = |name: &str| {
        let expression = format!("(import {ROOT}/pkgs-debian {{ }}).{name}.name");
        run("nix-instantiate", &["--eval", "-E", &expression])
    };
    assert!(
        named("gnumake").starts_with("\"gnumake-4."),
        "aliases keep their own name"
    );
    assert_eq!(
        named("libgcc-s1").split('-').next(),
        Some("\"libgcc"),
        "a member of a collapsed cycle is an attribute of its own"
    );
}

/// A .deb that is not in the cache fails the evaluation with its name.
#[test]
fn a_missing_deb_is_named() {
    let empty = tempfile::tempdir().unwrap();
    let output = Command::new("nix-instantiate")
        .env("NIXERY_DEBIAN_CACHE", empty.path())
        .args(["--eval", "-E", &format!("(import {ROOT}/pkgs-debian {{ }}).jq.drvPath")])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("_amd64.deb is not in") && stderr.contains("run scripts/setup.sh"),
        "{stderr}"
    );
}

/// The generator gives the same file from the same index, every time.
#[test]
fn the_set_is_generated_alike_from_one_index() {
    let dir = tempfile::tempdir().unwrap();
    let generate = |name: &str| {
        let output = dir.path().join(name);
        run(
            &format!("{ROOT}/scripts/debian-set.py"),
            &["--output", output.to_str().unwrap()],
        );
        std::fs::read_to_string(output).unwrap()
    };
    let first = generate("a.nix");
    assert_eq!(first, generate("b.nix"));
    assert!(
        first.contains("\"libgcc-s1\" = \"libc6\";"),
        "libc6 and libgcc-s1 depend on each other: one node"
    );
}

/// Two registries with their own storage serve the same bytes.
#[test]
fn two_registries_serve_the_same_digests() {
    let set = debian_set();
    let digests: Vec<String> = (0..2)
        .map(|_| {
            let registry = Registry::start_with(&[("NIXERY_PKGS_PATH", set.to_str().unwrap())]);
            let manifest = common::request(
                "GET",
                &registry.url("/v2/shell/jq/manifests/latest"),
                &[("Accept", "application/vnd.oci.image.manifest.v1+json")],
            );
            assert_eq!(manifest.status, 200);
            manifest.header("docker-content-digest").to_owned()
        })
        .collect();
    assert_eq!(digests[0], digests[1]);
}
