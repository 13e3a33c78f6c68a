//! What a package set the registry builds can reach of the registry's
//! secrets: a registry with a signing key, bearer tokens and bucket
//! credentials in its environment builds an image whose one package, while
//! evaluated, reads those variables with `builtins.getEnv`, and whose
//! builder dumps its environment and that of every process it can see,
//! reads the key file named in any of them, tries the key and token files
//! by path and tries to write to the host. With Nix as
//! `scripts/run.sh` sets it up (in the sandbox as the nixbld users, or as
//! those users alone where there is no sandbox), none of the secrets is
//! anywhere in the image and nothing is written. The secret files have
//! mode 600, as the README asks.

mod common;

use std::io::Read;
use std::path::Path;

use common::{Registry, request};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// The token pulls show.
const TOKEN: &str = "token-4c1d0e";
/// Bucket credentials, as a deployment would set them.
const BUCKET_SECRETS: [(&str, &str); 5] = [
    ("S3_ACCESS_KEY", "s3-access-9f2e7a"),
    ("S3_SECRET_KEY", "s3-secret-b83c51"),
    ("AWS_ACCESS_KEY_ID", "aws-access-07d4e2"),
    ("AWS_SECRET_ACCESS_KEY", "aws-secret-5a61fc"),
    ("AWS_SESSION_TOKEN", "aws-session-e9b03d"),
];
/// The variables the package's evaluation asks Nix for.
const ASKED: [&str; 8] = [
    "NIXERY_SIGNING_KEY",
    "NIXERY_TOKENS",
    "S3_ACCESS_KEY",
    "S3_SECRET_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS",
];
/// Nix as `scripts/setup.sh` configures it (builds as root, no sandbox).
const SETUP_NIX: &str = "substituters =\nexperimental-features = nix-command\nbuild-users-group =";
/// What `scripts/run.sh` adds to that: the sandbox as the nixbld users, and
/// where it does not work, the nixbld users alone.
const RUN_NIX: [&str; 2] = [
    "build-users-group = nixbld\nsandbox = true\nextra-sandbox-paths = /bin /usr /lib /lib64 /etc/alternatives",
    "build-users-group = nixbld\nsandbox = false",
];

/// The shipped package set plus `snoop`, a new derivation on every call.
const SNOOP_SET: &str = r#"{ system ? builtins.currentSystem }:
let
  pkgs = import @PKGS@ { inherit system; };
  bin = "${pkgs.busybox}/bin";
in
pkgs // {
  snoop = derivation {
    name = "snoop";
    inherit system;
    nonce = "@NONCE@";
    evaluated = builtins.concatStringsSep "\n" (map (name: "${name}=${builtins.getEnv name}") [ @ASKED@ ]);
    builder = "${bin}/sh";
    PATH = bin;
    args = [ "-c" ''
      {
        echo "== builder environment"; env
        echo "== builder user"; id
        echo "== evaluated"; echo "$evaluated"
        for environ in /proc/[0-9]*/environ; do
          echo "== $environ"; tr '\0' '\n' < "$environ" 2>&1
        done > environs
        cat environs
        echo "== key named in an environment"
        sed -n 's/^NIXERY_SIGNING_KEY=//p' environs | while read -r key; do cat "$key"; done
        echo "== key file"; cat "$(echo @KEY@ | base64 -d)" 2>/dev/null || echo "key: unreadable"
        echo "== token file"; cat "$(echo @TOKENS@ | base64 -d)" 2>/dev/null || echo "tokens: unreadable"
        echo "== host"; touch @WRITE@ 2>/dev/null || echo "host: unwritable"
      } > $out 2>&1
    '' ];
  };
}
"#;

/// A folder with [`SNOOP_SET`], trying `key` and `tokens` by path (kept out
/// of the builder's own error messages) and writing `write`.
fn snoop_set(key: &Path, tokens: &Path, write: &Path) -> tempfile::TempDir {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let encode = |path: &Path| base64::engine::general_purpose::STANDARD.encode(path.to_str().unwrap());
    let asked: Vec<String> = ASKED.iter().map(|name| format!("\"{name}\"")).collect();
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let nix = SNOOP_SET
        .replace("@PKGS@", concat!(env!("CARGO_MANIFEST_DIR"), "/pkgs"))
        .replace(
            "@NONCE@",
            &format!("{}-{}", since_epoch.as_nanos(), dir.path().display()),
        )
        .replace("@ASKED@", &asked.join(" "))
        .replace("@KEY@", &encode(key))
        .replace("@TOKENS@", &encode(tokens))
        .replace("@WRITE@", write.to_str().unwrap());
    std::fs::write(dir.path().join("default.nix"), nix).unwrap();
    dir
}

/// Every byte of the image: its manifest, config and unpacked layers.
fn image_bytes(registry: &Registry, name: &str) -> Vec<u8> {
    let bearer = format!("Bearer {TOKEN}");
    let get = |path: &str, accept: &str| {
        let response = request(
            "GET",
            &registry.url(path),
            &[("Authorization", &bearer), ("Accept", accept)],
        );
        assert_eq!(
            response.status,
            200,
            "{path}: {}",
            String::from_utf8_lossy(&response.body)
        );
        response.body
    };
    let manifest = get(&format!("/v2/{name}/manifests/latest"), OCI_MANIFEST);
    let parsed: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let blob = |descriptor: &serde_json::Value| {
        get(
            &format!("/v2/{name}/blobs/{}", descriptor["digest"].as_str().unwrap()),
            "*/*",
        )
    };
    let mut bytes = manifest.clone();
    bytes.extend(blob(&parsed["config"]));
    for layer in parsed["layers"].as_array().unwrap() {
        let packed = blob(layer);
        flate2::read::MultiGzDecoder::new(&packed[..])
            .read_to_end(&mut bytes)
            .unwrap();
    }
    bytes
}

#[test]
fn builds_reach_none_of_the_registry_secrets() {
    let run_sh = include_str!("../scripts/run.sh");
    for nix in RUN_NIX {
        assert!(
            run_sh.contains(&nix.replace('\n', "\\n")),
            "run.sh sets up Nix so:\n{nix}"
        );
        let config = format!("{SETUP_NIX}\n{nix}");
        snoop_with(&config);
    }
}

/// Builds the snooping package with Nix configured by `nix_config`, and
/// checks it got nothing.
fn snoop_with(nix_config: &str) {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("signing.pem");
    common::signing_key(&key);
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("{TOKEN}\n")).unwrap();
    let credentials = dir.path().join("gcs.json");
    std::fs::write(&credentials, "{\"private_key\": \"gcs-secret-61a7d0\"}").unwrap();
    for private in [&key, &tokens, &credentials] {
        std::fs::set_permissions(private, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    }
    let file_name = dir.path().file_name().unwrap().to_str().unwrap();
    let write = Path::new("/usr/local").join(format!("nixery-snoop{file_name}"));
    let set = snoop_set(&key, &tokens, &write);

    let mut env = vec![
        ("NIX_CONFIG", nix_config),
        ("NIXERY_PKGS_PATH", set.path().to_str().unwrap()),
        ("NIXERY_SIGNING_KEY", key.to_str().unwrap()),
        ("NIXERY_SIGNING_IDENTITY", "registry.example.com"),
        ("NIXERY_TOKENS", tokens.to_str().unwrap()),
        ("GOOGLE_APPLICATION_CREDENTIALS", credentials.to_str().unwrap()),
    ];
    env.extend(BUCKET_SECRETS);
    let registry = Registry::start_with(&env);
    let image = String::from_utf8_lossy(&image_bytes(&registry, "snoop")).into_owned();
    let written = std::fs::remove_file(&write).is_ok();

    let dump_at = image.find("== builder environment").expect("the dump is in the image");
    let dump = &image[dump_at..];
    let pem = std::fs::read_to_string(&key).unwrap();
    let key_body = pem.lines().nth(1).unwrap();
    let mut secrets = vec![
        key.to_str().unwrap(),
        key_body,
        tokens.to_str().unwrap(),
        TOKEN,
        credentials.to_str().unwrap(),
        "gcs-secret-61a7d0",
    ];
    secrets.extend(BUCKET_SECRETS.map(|(_, value)| value));
    for secret in secrets {
        let lines: Vec<&str> = image.lines().filter(|line| line.contains(secret)).collect();
        assert!(lines.is_empty(), "{nix_config}:\n{secret} is in the image: {lines:#?}");
    }
    assert!(!written, "{nix_config}:\nthe build wrote {}", write.display());
    for looked in [
        "== evaluated\nNIXERY_SIGNING_KEY=\n",
        "== /proc/1/environ",
        "key: unreadable",
        "tokens: unreadable",
        "host: unwritable",
    ] {
        assert!(
            dump.contains(looked),
            "{nix_config}:\nthe builder tried: {looked}\n{dump}"
        );
    }
}
