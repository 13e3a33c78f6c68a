//! Every package source, offline, with package sets whose `hello` says which
//! revision it comes from, pulled with skopeo and run in a chroot: a git
//! repository (branch, tag, commit, `latest` and `NIXERY_DEFAULT_TAG`), a
//! channel of tarballs served on loopback with its tag allow-list, and a
//! flake.

mod common;

use std::process::Command;

use common::{Registry, Unpacked, git, package_set};

fn greeting(registry: &Registry, tag: &str) -> String {
    Unpacked::pull(registry, "hello", tag).run_default()
}

#[test]
fn git_branches_tags_and_commits_select_revisions() {
    let repo = tempfile::tempdir().unwrap();
    git(repo.path(), &["init", "-q"]);
    package_set(repo.path(), "Hello from v1");
    git(repo.path(), &["add", "default.nix"]);
    git(repo.path(), &["commit", "-q", "-m", "first"]);
    git(repo.path(), &["tag", "-a", "v1", "-m", "first release"]);
    let first = git(repo.path(), &["rev-parse", "HEAD"]);
    package_set(repo.path(), "Hello from main");
    git(repo.path(), &["commit", "-q", "-am", "second"]);
    let second = git(repo.path(), &["rev-parse", "HEAD"]);

    let url = format!("file://{}", repo.path().display());
    let registry = Registry::start_with(&[("NIXERY_PKGS_PATH", ""), ("NIXERY_PKGS_REPO", &url)]);
    assert_eq!(greeting(&registry, "main"), "Hello from main\n");
    assert_eq!(greeting(&registry, "v1"), "Hello from v1\n");
    assert_eq!(greeting(&registry, &first), "Hello from v1\n");
    let latest = Unpacked::pull(&registry, "hello", "latest");
    assert_eq!(latest.run_default(), "Hello from main\n");
    let labels = &latest.config["config"]["Labels"];
    assert_eq!(labels["org.opencontainers.image.source"], url.as_str());
    assert_eq!(labels["org.opencontainers.image.revision"], second.as_str());

    let pinned = Registry::start_with(&[
        ("NIXERY_PKGS_PATH", ""),
        ("NIXERY_PKGS_REPO", &url),
        ("NIXERY_DEFAULT_TAG", "v1"),
    ]);
    assert_eq!(greeting(&pinned, "latest"), "Hello from v1\n");
}

#[test]
fn a_channel_serves_latest_and_the_tags_it_allows() {
    let mirror = tempfile::tempdir().unwrap();
    for (channel, greeting) in [("stable", "Hello from stable"), ("unstable", "Hello from unstable")] {
        let tree = tempfile::tempdir().unwrap();
        package_set(&tree.path().join(format!("nixpkgs-{channel}")), greeting);
        let tarball = mirror.path().join(format!("{channel}.tar.gz"));
        let status = Command::new("tar")
            .arg("-czf")
            .arg(&tarball)
            .arg("-C")
            .arg(tree.path())
            .arg(format!("nixpkgs-{channel}"))
            .status()
            .unwrap();
        assert!(status.success());
    }
    let template = format!("http://{}/{{channel}}.tar.gz", common::serve_files(mirror.path()));
    let registry = Registry::start_with(&[
        ("NIXERY_PKGS_PATH", ""),
        ("NIXERY_CHANNEL", "stable"),
        ("NIXERY_CHANNEL_URL", &template),
        ("NIXERY_CHANNEL_TAGS", "unstable"),
    ]);
    let latest = Unpacked::pull(&registry, "hello", "latest");
    assert_eq!(latest.run_default(), "Hello from stable\n");
    assert_eq!(
        latest.config["config"]["Labels"]["org.opencontainers.image.source"],
        template.replace("{channel}", "stable")
    );
    assert_eq!(greeting(&registry, "unstable"), "Hello from unstable\n");

    let runs = registry.nix_runs();
    let refused = registry.get("/v2/hello/manifests/nixos-23.11");
    assert_eq!(
        (refused.status, refused.error_code().as_str()),
        (404, "MANIFEST_UNKNOWN")
    );
    assert_eq!(registry.nix_runs(), runs, "a tag off the allow-list runs no Nix");
    assert_eq!(
        registry.get("/v2/hello/tags/list").json()["tags"],
        serde_json::json!(["latest", "unstable"])
    );
}

#[test]
fn a_flake_is_a_package_set() {
    let flake = tempfile::tempdir().unwrap();
    package_set(&flake.path().join("pkgs"), "Hello from a flake");
    // A flake is evaluated purely: the host files the set imports are copied in.
    std::fs::copy("/usr/bin/busybox", flake.path().join("busybox")).unwrap();
    std::fs::copy("/etc/ssl/certs/ca-certificates.crt", flake.path().join("ca.crt")).unwrap();
    std::fs::write(
        flake.path().join("flake.nix"),
        r#"{
          outputs = { self }: {
            legacyPackages.x86_64-linux = import ./pkgs {
              system = "x86_64-linux";
              busyboxBinary = ./busybox;
              caBundle = ./ca.crt;
            };
          };
        }"#,
    )
    .unwrap();
    let reference = format!("path:{}", flake.path().display());
    let registry = Registry::start_with(&[("NIXERY_PKGS_PATH", ""), ("NIXERY_FLAKE", &reference)]);
    let hello = Unpacked::pull(&registry, "hello", "latest");
    assert_eq!(hello.run_default(), "Hello from a flake\n");
    let labels = &hello.config["config"]["Labels"];
    assert_eq!(labels["org.opencontainers.image.source"], reference.as_str());
    assert!(
        labels["org.opencontainers.image.revision"]
            .as_str()
            .unwrap()
            .starts_with("sha256-")
    );

    // The flake's lock is its revision: a second pull is cached.
    let runs = registry.nix_runs();
    Unpacked::pull(&registry, "hello", "latest");
    assert_eq!(registry.nix_runs(), runs);
}
