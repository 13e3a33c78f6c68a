//! Signatures as cosign writes them, verified by podman and skopeo with the
//! README's policy, as written there (`sigstoreSigned` by the registry's
//! public key, sigstore attachments in registries.d): the signed image is
//! accepted; the same image from a registry with no key, signed with
//! another key, or served with a signature that does not match it (by a
//! proxy that changes it), are refused. The signature is among the
//! manifest's referrers and linked from the image's page, the provenance
//! is a DSSE envelope that openssl verifies, and the public key is served
//! and shown on the landing page; a bad key, or a file too large to be
//! one, stops the registry with a clear message, and a key file open to
//! others is warned about.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use base64::Engine;
use common::{Registry, run, sha256};

const IN_TOTO: &str = "application/vnd.in-toto+json";
const DSSE_ENVELOPE: &str = "application/vnd.dsse.envelope.v1+json";
const SIGNATURE_ARTIFACT: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
/// What the README's examples name the registry and its public key.
const EXAMPLE_REGISTRY: &str = "registry.example.com:8080";
const EXAMPLE_KEY: &str = "/etc/containers/nixery.pub";

/// trixie's `program` (skopeo or podman), which verifies sigstore
/// signatures (setup.sh).
fn trixie(program: &str) -> PathBuf {
    let path = (common::buckets::tools().parent().unwrap()).join(format!("trixie/bin/{program}-sigstore"));
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
    common::signing_key(&private);
    run(
        "openssl",
        &[
            "pkey",
            "-in",
            private.to_str().unwrap(),
            "-pubout",
            "-out",
            public.to_str().unwrap(),
        ],
    );
    (private, public)
}

/// The fenced blocks of the README's podman policy section: each block's
/// language and text, read once.
static README_BLOCKS: std::sync::LazyLock<Vec<(String, String)>> = std::sync::LazyLock::new(readme_blocks);

fn readme_blocks() -> Vec<(String, String)> {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let section = readme
        .split("#### A podman policy")
        .nth(1)
        .expect("the README's podman policy");
    let section = section.split("\n## ").next().unwrap();
    let mut blocks = Vec::new();
    let mut parts = section.split("```");
    parts.next();
    while let (Some(block), Some(_)) = (parts.next(), parts.next()) {
        let (language, text) = block.split_once('\n').unwrap();
        blocks.push((language.to_owned(), text.to_owned()));
    }
    blocks
}

/// The README's block in `language`, `nth` of them, for `address` and the
/// public key at `public`.
fn readme_block(language: &str, nth: usize, address: &str, public: &Path) -> String {
    let (_, text) = (README_BLOCKS.iter().filter(|(l, _)| l == language).nth(nth))
        .unwrap_or_else(|| panic!("the README's podman policy has a {language} block #{nth}"));
    text.replace(EXAMPLE_REGISTRY, address)
        .replace(EXAMPLE_KEY, public.to_str().unwrap())
}

/// The README's policy, registries.d and registries.conf files in a home
/// of their own, trusting `public` for `registry`; podman and skopeo read
/// them from there as they would from /etc/containers.
struct Trust {
    home: tempfile::TempDir,
}

impl Trust {
    fn new(registry: &impl Address, public: &Path) -> Trust {
        let home = tempfile::tempdir().unwrap();
        let address = registry.address();
        let config = home.path().join(".config/containers");
        for folder in ["registries.d", "registries.conf.d"] {
            std::fs::create_dir_all(config.join(folder)).unwrap();
        }
        let policy = readme_block("json", 0, address, public);
        serde_json::from_str::<serde_json::Value>(&policy).expect("the README's policy is JSON");
        std::fs::write(config.join("policy.json"), policy).unwrap();
        let attachments = readme_block("yaml", 0, address, public);
        std::fs::write(config.join("registries.d/nixery.yaml"), attachments).unwrap();
        let insecure = readme_block("toml", 0, address, public);
        std::fs::write(config.join("registries.conf.d/nixery.conf"), insecure).unwrap();
        // podman's own storage and run folders, and trixie's helpers.
        let at = |name: &str| home.path().join(name).display().to_string();
        let storage = format!(
            "[storage]\ndriver = \"vfs\"\nrunroot = \"{}\"\ngraphroot = \"{}\"\n",
            at("run"),
            at("graph")
        );
        std::fs::write(home.path().join("storage.conf"), storage).unwrap();
        let helpers = trixie("podman").parent().unwrap().join("../root/usr/lib/podman");
        let engine = format!(
            "[engine]\ntmp_dir = \"{}\"\nhelper_binaries_dir = [\"{}\"]\n",
            at("libpod"),
            helpers.display()
        );
        std::fs::write(home.path().join("containers.conf"), engine).unwrap();
        Trust { home }
    }

    /// `program` with this home and its settings.
    fn command(&self, program: &Path) -> Command {
        let at = |name: &str| self.home.path().join(name);
        let mut command = Command::new(program);
        command
            .env("HOME", self.home.path())
            .env("CONTAINERS_STORAGE_CONF", at("storage.conf"))
            .env("CONTAINERS_CONF", at("containers.conf"))
            .env("PODMAN_IGNORE_CGROUPSV1_WARNING", "1");
        command
    }

    /// The README's `podman pull` of `shell/hello` from `registry`.
    fn podman_pull(&self, registry: &impl Address) -> Output {
        let line = readme_block("sh", 1, registry.address(), Path::new(EXAMPLE_KEY));
        let mut words = line.split_whitespace();
        assert_eq!(words.next(), Some("podman"), "{line}");
        self.command(&trixie("podman")).args(words).output().unwrap()
    }

    /// The README's `skopeo copy` of `shell/hello` from `registry` into an
    /// OCI layout.
    fn skopeo_copy(&self, registry: &impl Address) -> Output {
        let destination = tempfile::tempdir_in(self.home.path()).unwrap();
        let line = readme_block("sh", 2, registry.address(), Path::new(EXAMPLE_KEY));
        let line = line.replace("oci:hello:", &format!("oci:{}:", destination.path().display()));
        let mut words = line.split_whitespace();
        assert_eq!(words.next(), Some("skopeo"), "{line}");
        self.command(&trixie("skopeo")).args(words).output().unwrap()
    }
}

/// The README's `curl` that saves the public key of `registry` at `path`.
fn save_public_key(registry: &Registry, path: &Path) {
    let line = readme_block("sh", 0, &registry.address, path);
    run("sh", &["-c", &line]);
}

/// What a man in the middle changes.
#[derive(Clone, Copy)]
enum Change {
    /// The signature in every signature manifest (`….sig`).
    Signature,
    /// The answer to `shell/hello:latest`: `hello:latest`'s manifest.
    Manifest,
}

/// A free port on loopback, for a registry that must know its address
/// before it starts (its signing identity).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A registry signing with `private`, whose identity is its own address.
fn signing_registry(private: &Path) -> Registry {
    let port = free_port().to_string();
    let identity = format!("127.0.0.1:{port}");
    Registry::start_with(&[
        ("PORT", &port),
        ("NIXERY_SIGNING_KEY", private.to_str().unwrap()),
        ("NIXERY_SIGNING_IDENTITY", &identity),
    ])
}

/// A registry in front of `upstream` on `listener` that passes everything
/// through but makes `change`.
fn proxy(listener: std::net::TcpListener, upstream: &Registry, change: Change) -> Proxy {
    let address = listener.local_addr().unwrap().to_string();
    let (upstream, host) = (upstream.address.clone(), address.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let (upstream, host) = (upstream.clone(), host.clone());
            std::thread::spawn(move || forward(stream.unwrap(), &upstream, &host, change));
        }
    });
    Proxy { address }
}

fn tampering_proxy(upstream: &Registry) -> Proxy {
    proxy(
        std::net::TcpListener::bind("127.0.0.1:0").unwrap(),
        upstream,
        Change::Signature,
    )
}

/// What [`Trust`] needs of a registry: its address.
struct Proxy {
    address: String,
}

/// Answers one request on `stream` from `upstream`, naming `host` as the
/// host, with `change` made.
fn forward(mut stream: std::net::TcpStream, upstream: &str, host: &str, change: Change) {
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
    let (method, mut path) = (parts.next().unwrap_or("GET"), parts.next().unwrap_or("/"));
    if let Change::Manifest = change
        && path == "/v2/shell/hello/manifests/latest"
    {
        path = "/v2/hello/manifests/latest";
    }
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
    if let Change::Signature = change
        && path.contains("/manifests/")
        && path.ends_with(".sig")
        && method == "GET"
    {
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

/// Pulls `shell/hello` from `registry` with podman and skopeo under
/// `trust`; each one's output, printed.
fn pulls(trust: &Trust, registry: &impl Address, what: &str) -> [Output; 2] {
    let outputs = [trust.podman_pull(registry), trust.skopeo_copy(registry)];
    for (client, output) in ["podman", "skopeo"].iter().zip(&outputs) {
        let (verdict, said) = match output.status.success() {
            true => ("accepted", String::from_utf8_lossy(&output.stdout).into_owned()),
            false => ("refused", says(output)),
        };
        let last = said.lines().last().unwrap_or_default();
        println!("{client}, {what}: {verdict}: {last}");
    }
    outputs
}

#[test]
fn signed_images_are_accepted_and_others_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = key(dir.path(), "registry");
    let (_, other_public) = key(dir.path(), "other");
    let signed = signing_registry(&private);
    let saved = dir.path().join("saved.pub");
    save_public_key(&signed, &saved);
    assert_eq!(std::fs::read(&saved).unwrap(), std::fs::read(&public).unwrap());

    for accepted in pulls(&Trust::new(&signed, &saved), &signed, "signed") {
        assert!(
            accepted.status.success(),
            "the signed image is accepted: {}",
            says(&accepted)
        );
    }
    for refused in pulls(&Trust::new(&signed, &other_public), &signed, "another key") {
        assert!(!refused.status.success(), "refused under another key");
        assert!(says(&refused).contains("signature"), "{}", says(&refused));
    }
    let unsigned = Registry::start();
    for refused in pulls(&Trust::new(&unsigned, &public), &unsigned, "no key") {
        assert!(!refused.status.success(), "refused from a registry that signs nothing");
    }
    let tampering = tampering_proxy(&signed);
    for refused in pulls(&Trust::new(&tampering, &public), &tampering, "tampered signature") {
        assert!(!refused.status.success(), "refused when the signature does not match");
        assert!(says(&refused).contains("signature"), "{}", says(&refused));
    }

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
    signature_and_provenance_are_referrers(&signed, &public);
}

/// The signature is listed among the manifest's referrers and linked from
/// the image's page; the provenance is a DSSE envelope whose signature
/// openssl verifies with the public key.
fn signature_and_provenance_are_referrers(registry: &Registry, public: &Path) {
    let accept = [("accept", "application/vnd.oci.image.manifest.v1+json")];
    let manifest = common::request("GET", &registry.url("/v2/shell/hello/manifests/latest"), &accept);
    let digest = sha256(&manifest.body);
    let hex = &digest["sha256:".len()..];
    let referrers = registry.get(&format!("/v2/shell/hello/referrers/{digest}")).json();
    let listed = referrers["manifests"].as_array().unwrap();
    let of_type = |wanted: &str| {
        let found = listed.iter().find(|r| r["artifactType"] == wanted);
        found.unwrap_or_else(|| panic!("a {wanted} referrer: {referrers}"))["digest"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let tagged = registry.get(&format!("/v2/shell/hello/manifests/sha256-{hex}.sig"));
    assert_eq!(
        of_type(SIGNATURE_ARTIFACT),
        sha256(&tagged.body),
        "the signature is a referrer"
    );
    let by_digest = registry.get(&format!("/v2/shell/hello/manifests/{}", of_type(SIGNATURE_ARTIFACT)));
    assert_eq!(by_digest.body, tagged.body, "and served by its digest");
    let page = String::from_utf8(registry.get("/image/shell/hello").body).unwrap();
    assert!(
        page.contains(&format!("/v2/shell/hello/manifests/sha256-{hex}.sig")),
        "{page}"
    );

    let artifact = registry
        .get(&format!("/v2/shell/hello/manifests/{}", of_type(IN_TOTO)))
        .json();
    let layer = &artifact["layers"][0];
    assert_eq!(layer["mediaType"], DSSE_ENVELOPE);
    assert_eq!(
        layer["annotations"]["org.opencontainers.image.title"],
        "provenance.dsse.json"
    );
    let envelope = registry
        .get(&format!("/v2/shell/hello/blobs/{}", layer["digest"].as_str().unwrap()))
        .json();
    assert_eq!(envelope["payloadType"], IN_TOTO);
    let base64 = &base64::engine::general_purpose::STANDARD;
    let payload = base64.decode(envelope["payload"].as_str().unwrap()).unwrap();
    let statement: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(statement["predicateType"], "https://slsa.dev/provenance/v1");
    let signature = base64
        .decode(envelope["signatures"][0]["sig"].as_str().unwrap())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut encoded = format!("DSSEv1 {} {IN_TOTO} {} ", IN_TOTO.len(), payload.len()).into_bytes();
    encoded.extend_from_slice(&payload);
    let (pae, sig) = (dir.path().join("pae"), dir.path().join("sig"));
    std::fs::write(&pae, encoded).unwrap();
    std::fs::write(&sig, signature).unwrap();
    let at = |p: &Path| p.to_str().unwrap().to_owned();
    let verified = run(
        "openssl",
        &[
            "dgst",
            "-sha256",
            "-verify",
            &at(public),
            "-signature",
            &at(&sig),
            &at(&pae),
        ],
    );
    assert_eq!(verified.trim(), "Verified OK");
}

/// What `nixery serve` with the signing key `key` (and no identity) says
/// as it refuses to start.
fn refused_start(dir: &Path, key: &std::ffi::OsStr) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_nixery"))
        .arg("serve")
        .env("NIXERY_SIGNING_KEY", key)
        .env_remove("NIXERY_SIGNING_IDENTITY")
        .env("NIXERY_PKGS_PATH", Path::new(env!("CARGO_MANIFEST_DIR")).join("pkgs"))
        .env("STORAGE_PATH", dir.join("storage"))
        .env("PORT", "0")
        .output()
        .unwrap();
    assert!(!output.status.success());
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_bad_signing_key_stops_the_registry_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "not a key\n").unwrap();
    let message = refused_start(dir.path(), &bad.as_ref());
    assert!(
        message.contains("NIXERY_SIGNING_KEY") && message.contains("is not a PEM ECDSA P-256 private key"),
        "{message}"
    );
}

#[test]
fn a_key_file_too_large_to_be_a_key_stops_the_registry_unread() {
    let dir = tempfile::tempdir().unwrap();
    let message = refused_start(dir.path(), "/dev/zero".as_ref());
    assert!(
        message.contains("NIXERY_SIGNING_KEY") && message.contains("/dev/zero is larger than 64 KiB"),
        "{message}"
    );
}

#[test]
fn a_key_file_open_to_others_is_warned_about_and_a_private_one_is_not() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (private, _) = key(dir.path(), "signing");
    let warning = "the signing key's file is open to its group or others";
    for (mode, warned) in [(0o644, true), (0o640, true), (0o600, false), (0o400, false)] {
        std::fs::set_permissions(&private, std::fs::Permissions::from_mode(mode)).unwrap();
        let registry = Registry::start_with(&[
            ("NIXERY_SIGNING_KEY", private.to_str().unwrap()),
            ("NIXERY_SIGNING_IDENTITY", "registry.example.com"),
            ("NIXERY_LOG_FORMAT", "json"),
        ]);
        let log = started_log(&registry);
        let warnings: Vec<serde_json::Value> = log
            .lines()
            .filter(|line| line.contains(warning))
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        match warned {
            true => {
                assert_eq!(warnings.len(), 1, "mode {mode:o}:\n{log}");
                assert_eq!(warnings[0]["level"], "WARN");
                assert_eq!(warnings[0]["fields"]["mode"], format!("{mode:o}"));
                assert_eq!(warnings[0]["fields"]["key"], private.to_str().unwrap());
            }
            false => assert!(warnings.is_empty(), "mode {mode:o}:\n{log}"),
        }
    }
}

/// The registry's log up to the line that says it serves.
fn started_log(registry: &Registry) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let log = registry.log();
        if log.contains("nixery is serving on") || std::time::Instant::now() > deadline {
            return log;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn a_manifest_swapped_in_transit_is_refused_and_other_names_are_not_signed() {
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = key(dir.path(), "registry");
    // The man in the middle stands where clients reach the registry.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let front = listener.local_addr().unwrap().to_string();
    let registry = Registry::start_with(&[
        ("NIXERY_SIGNING_KEY", private.to_str().unwrap()),
        ("NIXERY_SIGNING_IDENTITY", &front),
    ]);
    let swapping = proxy(listener, &registry, Change::Manifest);
    let hello = registry.get("/v2/hello/manifests/latest");
    assert_eq!(hello.status, 200);
    let hex = hello
        .header("docker-content-digest")
        .strip_prefix("sha256:")
        .unwrap()
        .to_owned();
    let sig = |name: &str, hex: &str| registry.get(&format!("/v2/{name}/manifests/sha256-{hex}.sig"));
    assert_eq!(sig("hello", &hex).status, 200, "hello's manifest is signed as hello");

    for refused in pulls(&Trust::new(&swapping, &public), &swapping, "another image's manifest") {
        assert!(!refused.status.success(), "a manifest of another name is refused");
        assert!(says(&refused).contains("signature"), "{}", says(&refused));
    }
    for name in ["shell/hello", "made/up", "python3"] {
        let refused = sig(name, &hex);
        assert_eq!(
            (refused.status, refused.error_code()),
            (404, "MANIFEST_UNKNOWN".into()),
            "{name}"
        );
    }
    let referrers = registry.get(&format!("/v2/hello/referrers/sha256:{hex}")).json();
    let artifacts: Vec<&str> = referrers["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["digest"].as_str().unwrap())
        .collect();
    assert!(artifacts.len() >= 3, "{referrers}");
    for artifact in artifacts {
        let artifact = artifact.strip_prefix("sha256:").unwrap();
        assert_eq!(sig("hello", artifact).status, 404, "an SBOM's manifest is not signed");
    }
}

#[test]
fn a_flood_of_made_up_names_neither_signs_nor_evicts_real_signatures() {
    const THREADS: usize = 8;
    const EACH: usize = 5_000;
    let dir = tempfile::tempdir().unwrap();
    let (private, public) = key(dir.path(), "registry");
    let registry = signing_registry(&private);
    let trust = Trust::new(&registry, &public);
    let hello = registry.get("/v2/shell/hello/manifests/latest");
    let hex = hello
        .header("docker-content-digest")
        .strip_prefix("sha256:")
        .unwrap()
        .to_owned();
    let flooding = std::sync::atomic::AtomicBool::new(true);
    let (statuses, pulled) = std::thread::scope(|scope| {
        let flood: Vec<_> = (0..THREADS)
            .map(|thread| {
                let (address, hex) = (&registry.address, &hex);
                scope.spawn(move || {
                    let client = reqwest::blocking::Client::new();
                    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
                    for i in 0..EACH {
                        let url = format!("http://{address}/v2/fake{thread}x{i}/manifests/sha256-{hex}.sig");
                        let status = client.get(url).send().map_or(0, |r| r.status().as_u16());
                        *statuses.entry(status).or_default() += 1;
                    }
                    statuses
                })
            })
            .collect();
        let mut pulled = vec![];
        let pulls_during = scope.spawn(|| {
            while flooding.load(std::sync::atomic::Ordering::SeqCst) {
                pulled.extend(pulls(&trust, &registry, "signed, during a flood"));
            }
            pulled
        });
        let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
        for thread in flood {
            for (status, count) in thread.join().unwrap() {
                *statuses.entry(status).or_default() += count;
            }
        }
        flooding.store(false, std::sync::atomic::Ordering::SeqCst);
        (statuses, pulls_during.join().unwrap())
    });
    println!(
        "{} made-up names: {statuses:?}; {} signed pulls during the flood",
        THREADS * EACH,
        pulled.len()
    );
    assert_eq!(statuses.into_iter().collect::<Vec<_>>(), [(404, THREADS * EACH)]);
    assert!(!pulled.is_empty());
    for output in &pulled {
        assert!(
            output.status.success(),
            "a signed pull during the flood: {}",
            says(output)
        );
    }
}

#[test]
fn a_signing_key_without_an_identity_stops_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let (private, _) = key(dir.path(), "signing");
    let message = refused_start(dir.path(), &private.as_ref());
    assert!(
        message.contains("NIXERY_SIGNING_KEY needs NIXERY_SIGNING_IDENTITY"),
        "{message}"
    );
}
