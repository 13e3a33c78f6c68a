//! Errors a user can act on: when Nix fails, the client's message names the
//! package that failed and the first line of Nix's error, the registry's log
//! has all of Nix's output, and `NIX_TIMEOUT` bounds all of Nix's work. The
//! landing page shows Nix's last lines only where the operator allows it.

mod common;

use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::{Registry, request};

/// The shipped package set plus a package that fails to evaluate, one whose
/// builder fails, and one whose evaluation waits on a server that never
/// answers (at `hang`).
fn troubled_package_set(hang: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let nix = format!(
        r#"{{ system ? builtins.currentSystem }}:
        let pkgs = import {pkgs} {{ inherit system; }};
        in pkgs // {{
          broken = throw "broken is marked as broken";
          failing = derivation {{
            name = "failing-1.0";
            inherit system;
            builder = "/bin/sh";
            args = [ "-c" "echo compiling; echo 'failing: compiler exploded' >&2; exit 3" ];
          }};
          hanging = import (builtins.fetchurl "{hang}");
        }}"#,
        pkgs = concat!(env!("CARGO_MANIFEST_DIR"), "/pkgs"),
    );
    std::fs::write(dir.path().join("default.nix"), nix).unwrap();
    dir
}

fn message(response: &common::Response) -> String {
    assert_eq!(response.error_code(), "UNKNOWN");
    response.json()["errors"][0]["message"].as_str().unwrap().to_owned()
}

#[test]
fn nix_failures_name_the_package_and_the_first_error_line() {
    // Accepts connections and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let hang = format!("http://{}/never.nix", silent.local_addr().unwrap());
    let set = troubled_package_set(&hang);
    let registry = Registry::start_with(&[("NIXERY_PKGS_PATH", set.path().to_str().unwrap()), ("NIX_TIMEOUT", "4")]);

    let broken = registry.get("/v2/hello/broken/manifests/latest");
    assert_eq!(broken.status, 500);
    let id = broken.header("x-request-id");
    let log = registry.log();
    let line = log
        .lines()
        .find(|l| l.contains("answered with a server error") && l.contains(id));
    assert!(line.is_some(), "the error is logged with the request id {id}:\n{log}");
    assert_eq!(
        message(&broken),
        "Nix could not evaluate broken: error: broken is marked as broken"
    );
    assert_eq!(
        broken.json()["errors"][0]["detail"]["packages"],
        serde_json::json!(["broken"])
    );

    let failing = registry.get("/v2/hello/failing/manifests/latest");
    let text = message(&failing);
    assert!(
        text.starts_with("Nix could not build failing: error: builder for '/nix/store/"),
        "{text}"
    );
    assert!(text.ends_with("-failing-1.0.drv' failed with exit code 3"), "{text}");
    assert!(
        registry.log().contains("failing: compiler exploded"),
        "the builder's output is logged"
    );
    let page = String::from_utf8(registry.get("/").body).unwrap();
    assert!(
        page.contains("Nix could not build failing"),
        "on the page of recent errors"
    );
    assert!(
        !page.contains("failing: compiler exploded"),
        "but not what the builder wrote: the page is open to anyone"
    );

    let started = Instant::now();
    let hanging = registry.get("/v2/hanging/manifests/latest");
    assert!(message(&hanging).contains("NIX_TIMEOUT (4 s)"), "{}", message(&hanging));
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "bounded: {:?}",
        started.elapsed()
    );
    drop(silent);

    // Nothing failed for good: other images still build.
    assert_eq!(registry.get("/v2/hello/manifests/latest").status, 200);
}

#[test]
fn nix_logs_are_shown_where_the_operator_allows() {
    let set = troubled_package_set("http://127.0.0.1:9/never.nix");
    let pkgs = set.path().to_str().unwrap();
    let shown = Registry::start_with(&[("NIXERY_PKGS_PATH", pkgs), ("NIXERY_WEB_SHOW_LOGS", "true")]);
    assert_eq!(shown.get("/v2/failing/manifests/latest").status, 500);
    let page = String::from_utf8(shown.get("/").body).unwrap();
    assert!(page.contains("failing: compiler exploded"), "{page}");

    let dir = tempfile::tempdir().unwrap();
    let (htpasswd, login) = common::alice(dir.path());
    let protected = Registry::start_with(&[
        ("NIXERY_PKGS_PATH", pkgs),
        ("NIXERY_HTPASSWD", htpasswd.to_str().unwrap()),
        ("NIXERY_PROTECT_WEB", "true"),
    ]);
    let url = protected.url("/v2/failing/manifests/latest");
    assert_eq!(request("GET", &url, &[("Authorization", &login)]).status, 500);
    let page = request("GET", &protected.url("/"), &[("Authorization", &login)]);
    assert!(
        String::from_utf8(page.body)
            .unwrap()
            .contains("failing: compiler exploded")
    );
}
