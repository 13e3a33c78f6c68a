//! The web pages in a real browser: headless Chromium (Debian's `chromium`,
//! without a sandbox or GPU, with its own empty profile and no background
//! traffic)
//! loads the landing page and an image page from a running registry; the
//! rendered DOM is checked and screenshots are saved under
//! `target/tmp/web/`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Registry, request};

/// Chromium, headless, with a fresh profile in `profile`.
fn chromium(profile: &Path, args: &[&str]) -> String {
    let output = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,900",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("chromium is not installed ({e}): run scripts/setup.sh test"));
    assert!(
        output.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// The page's DOM after Chromium rendered it, and a screenshot of it.
fn load(url: &str, screenshot: &Path) -> String {
    let profile = tempfile::tempdir().unwrap();
    let dom = chromium(&profile.path().join("a"), &["--dump-dom", url]);
    chromium(
        &profile.path().join("b"),
        &[&format!("--screenshot={}", screenshot.display()), url],
    );
    assert!(std::fs::metadata(screenshot).unwrap().len() > 10_000, "a real picture");
    dom
}

fn screenshots() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_pages_show_pulls_builds_errors_and_layer_plans() {
    let registry = Registry::start();
    assert_eq!(registry.get("/v2/shell/hello/manifests/latest").status, 200);
    assert_eq!(registry.get("/v2/nosuchpackage/manifests/latest").status, 404);

    let dom = load(&registry.url("/"), &screenshots().join("index.png"));
    for text in [
        &format!("docker pull {}/shell/hello", registry.address),
        "the package set in ",
        "revision",
        "nonroot",
        "adds bashInteractive, coreutils, moreutils, nano",
        "shell/hello:latest",
        "could not find Nix packages: nosuchpackage",
    ] {
        assert!(dom.contains(text), "{text} on the landing page:\n{dom}");
    }
    assert!(
        !dom.contains("https://") && !dom.contains("http://cdn"),
        "no assets from elsewhere"
    );

    // The page builds the image as its pull would; the pull then finds it.
    let dom = load(
        &registry.url("/image/shell/git"),
        &screenshots().join("image-shell-git.png"),
    );
    let runs = registry.nix_runs();
    let manifest = registry.get("/v2/shell/git/manifests/latest").json();
    assert_eq!(registry.nix_runs(), runs, "built once, by the page");
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(dom.matches("class=\"layer\"").count(), layers.len());
    let first = &layers[0]["digest"].as_str().unwrap()[..19];
    for text in [
        &format!("docker pull {}/shell/git", registry.address),
        "git-2.47.1",
        first,
        "shared with shell/hello:latest",
        "built and cached",
    ] {
        assert!(dom.contains(text), "{text} on the image page:\n{dom}");
    }

    let missing = request("GET", &registry.url("/image/nosuchpackage"), &[]);
    assert_eq!(missing.status, 404);
    assert!(String::from_utf8_lossy(&missing.body).contains("nosuchpackage"));
}
