//! Signatures as cosign writes them, verified by skopeo with a policy that
//! requires `sigstoreSigned` by the registry's public key (and sigstore
//! attachments in registries.d): the signed image is accepted; the same
//! image from a registry with no key, signed with another key, or served
//! with a signature that does not match it (by a proxy that changes it),
//! are refused. The public key is served and shown on the landing page; a bad
//! key stops the registry with a clear message.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Registry, run};

/// trixie's skopeo, which verifies sigstore signatures (setup.sh).
fn skopeo() -> PathBuf {
    let path = (common::buckets::tools().parent().unwrap()).join("trixie/bin/skopeo-sigstore");
    assert!(
        path.exists(),
        "{} is missing: run scripts/setup.sh test",
        path.display()
    );
    path
}

/// Where a registry (or what stands in for one) listens.
trait Address {
    fn address(&self) -> &str;
}

impl Address for Registry {
    fn address(&self) -> &str {
        &self.address
    }
}

impl Address for Proxy {
    fn address(&self) -> &str {
        &self.address
    }
}

/// A new P-256 key in `dir`: the private key's path and the public key's.
fn key(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (private, public) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.pub")));
    let private_arg = private.to_str().unwrap();
    run(
        "openssl",
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            private_arg,
        ],
    );
    run(
        "openssl",
        &["pkey", "-in", private_arg, "-pubout", "-out", public.to_str().unwrap()],
    );
    (private, public)
}

/// A policy that requires images from `registry` to be signed by `public`,
/// and the registries.d folder that turns sigstore attachments on for it.
fn policy(dir: &Path, registry: &impl Address, public: &Path) -> (PathBuf, PathBuf) {
    let address = registry.address();
    let policy = serde_json::json!({
        "default": [{ "type": "reject" }],
        "transports": {
            "docker": { address: [{
                "type": "sigstoreSigned",
                "keyPath": public,
                "signedIdentity": { "type": "matchRepository" },
            }] },
            "oci": { "": [{ "type": "insecureAcceptAnything" }] },
        },
    });
    let (file, registries) = (
        dir.join(format!("policy-{}.json", registry.address())),
        dir.join("registries.d"),
    );
    std::fs::write(&file, policy.to_string()).unwrap();
    std::fs::create_dir_all(&registries).unwrap();
    let attachments = format!(
        "docker:\n  {}:\n    use-sigstore-attachments: true\n",
        registry.address()
    );
    std::fs::write(
        registries.join(format!("{}.yaml", registry.address().replace(':', "-"))),
        attachments,
    )
    .unwrap();
    (file, registries)
}

/// skopeo copying `shell/hello` from `registry` under the policy.
fn pull(dir: &Path, registry: &impl Address, (policy, registries): &(PathBuf, PathBuf)) -> Output {
    let destination = tempfile::tempdir_in(dir).unwrap();
    Command::new(skopeo())
        .arg("--policy")
        .arg(policy)
        .arg("--registries.d")
        .arg(registries)
        .args(["copy", "--src-tls-verify=false", "--remove-signatures"])
        .arg(format!("docker://{}/shell/hello", registry.address()))
        .arg(format!("oci:{}:latest", destination.path().display()))
        .output()
        .unwrap()
}

/// A registry in front of `upstream` that passes everything through but
/// changes the signature in every signature manifest (`….sig`).
fn tampering_proxy(upstream: &Registry) -> Proxy {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let (upstream, host) = (upstream.address.clone(), address.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let (upstream, host) = (upstream.clone(), host.clone());
            std::thread::spawn(move || forward(stream.unwrap(), &upstream, &host));
        }
    });
    Proxy { address }
}

/// What [`pull`] and [`policy`] need of a registry: its address.
struct Proxy {
    address: String,
}

/// Answers one request on `stream` from `upstream`, naming `host` as the
/// host (so that signatures name the proxy), with the signature changed.
fn forward(mut stream: std::net::TcpStream, upstream: &str, host: &str) {
    use base64::Engine;
    use std::io::{BufRead, BufReader, Write};
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut read_line = || {
        let mut line = Vec::new();
        reader.read_until(b'\n', &mut line).ok()?;
        String::from_utf8(line).ok()
    };
    // skopeo tries TLS first: anything but plain HTTP is dropped.
    let Some(request_line) = read_line().filter(|l| l.ends_with("HTTP/1.1\r\n")) else {
        return;
    };
    let mut accept = Vec::new();
    while let Some(line) = read_line() {
        if line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("accept")
        {
            accept.push(value.trim().to_owned());
        }
    }
    let mut parts = request_line.split(' ');
    let (method, path) = (parts.next().unwrap_or("GET"), parts.next().unwrap_or("/"));
    let client = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut request = client
        .request(method.parse().unwrap(), format!("http://{upstream}{path}"))
        .header("host", host);
    for value in &accept {
        request = request.header("accept", value);
    }
    let response = request.send().unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let mut body = response.bytes().unwrap().to_vec();
    if path.contains("/manifests/") && path.ends_with(".sig") && method == "GET" {
        let mut manifest: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let annotation = &mut manifest["layers"][0]["annotations"]["dev.cosignproject.cosign/signature"];
        // A well-formed signature, one byte off: not the payload's.
        let mut der = base64::engine::general_purpose::STANDARD
            .decode(annotation.as_str().unwrap())
            .unwrap();
        *der.last_mut().unwrap() ^= 1;
        *annotation = serde_json::json!(base64::engine::general_purpose::STANDARD.encode(der));
        body = serde_json::to_vec(&manifest).unwrap();
    }
    let mut head = format!(
        "HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (name, value) in &headers {
        if name != "content-length" && name != "connection" {
            head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
        }
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    if method != "HEAD" {
        let _ = stream.write_all(&body);
    }
}

fn says(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn signed_images_are_accepted_and_others_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = key(dir.path(), "registry");
    let (_, other_public) = key(dir.path(), "other");
    let key_setting = private.to_str().unwrap();
    let signed = Registry::start_with(&[("NIXERY_SIGNING_KEY", key_setting)]);

    let accepted = pull(dir.path(), &signed, &policy(dir.path(), &signed, &public));
    assert!(
        accepted.status.success(),
        "the signed image is accepted: {}",
        says(&accepted)
    );
    println!(
        "accepted: {}",
        String::from_utf8_lossy(&accepted.stdout).lines().last().unwrap_or("")
    );

    let other_key = pull(dir.path(), &signed, &policy(dir.path(), &signed, &other_public));
    assert!(!other_key.status.success(), "refused under another key");
    println!("refused (another key): {}", says(&other_key).trim());
    assert!(says(&other_key).contains("signature"), "{}", says(&other_key));

    let unsigned = Registry::start();
    let refused = pull(dir.path(), &unsigned, &policy(dir.path(), &unsigned, &public));
    assert!(!refused.status.success(), "refused from a registry that signs nothing");
    println!("refused (no key): {}", says(&refused).trim());

    let tampering = tampering_proxy(&signed);
    let tampered = pull(dir.path(), &tampering, &policy(dir.path(), &tampering, &public));
    assert!(!tampered.status.success(), "refused when the signature does not match");
    println!("refused (tampered signature): {}", says(&tampered).trim());
    assert!(says(&tampered).contains("signature"), "{}", says(&tampered));

    let served = signed.get("/signing-key.pub");
    assert_eq!(served.status, 200);
    let pem = std::fs::read_to_string(&public).unwrap();
    assert_eq!(String::from_utf8(served.body).unwrap(), pem, "the public key is served");
    let page = String::from_utf8(signed.get("/").body).unwrap();
    assert!(
        page.contains(pem.lines().nth(1).unwrap()),
        "and shown on the landing page"
    );
    assert_eq!(unsigned.get("/signing-key.pub").status, 404);
}

#[test]
fn a_bad_signing_key_stops_the_registry_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "not a key\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_nixery"))
        .arg("serve")
        .env("NIXERY_SIGNING_KEY", &bad)
        .env("NIXERY_PKGS_PATH", Path::new(env!("CARGO_MANIFEST_DIR")).join("pkgs"))
        .env("STORAGE_PATH", dir.path().join("storage"))
        .env("PORT", "0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("NIXERY_SIGNING_KEY") && message.contains("is not a PEM ECDSA P-256 private key"),
        "{message}"
    );
}
