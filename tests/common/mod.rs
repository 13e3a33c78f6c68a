//! The harness the end-to-end tests share: `nixery serve` started on a
//! free loopback port with the shipped package set and its own empty
//! storage, counting the Nix and git commands it runs; HTTP requests;
//! package sets with slow packages; a static file server; running programs.
#![allow(dead_code)]

pub mod buckets;
pub mod engines;
pub mod store;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;
use sha2::{Digest as _, Sha256};

/// A running registry with its own empty storage, counting Nix runs.
pub struct Registry {
    child: Child,
    pub address: String,
    dir: tempfile::TempDir,
}

impl Registry {
    /// A registry with the default settings.
    pub fn start() -> Registry {
        Registry::start_with(&[])
    }

    /// A registry with these environment variables set as well (or, when
    /// the value is empty, removed).
    pub fn start_with(env: &[(&str, &str)]) -> Registry {
        Registry::start_limited(env, None)
    }

    /// Like [`start_with`](Self::start_with), with at most `open_files`
    /// file descriptors (soft and hard limit, as `ulimit -n` sets them).
    pub fn start_limited(env: &[(&str, &str)], open_files: Option<u32>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        // Wrappers that count the Nix and git commands the registry runs.
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        for program in COUNTED {
            write_counting_wrapper(&bin, program, &dir.path().join("runs"), "");
        }
        let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());

        let mut command = match open_files {
            Some(limit) => {
                let mut shell = Command::new("/bin/sh");
                shell
                    .arg("-c")
                    .arg(format!("ulimit -n {limit} && exec \"$0\" \"$@\""))
                    .arg(env!("CARGO_BIN_EXE_nixery"));
                shell
            }
            None => Command::new(env!("CARGO_BIN_EXE_nixery")),
        };
        command
            .arg("serve")
            .env("PATH", path)
            .env("PORT", "0")
            .env("NIXERY_LISTEN_ADDRESS", "127.0.0.1")
            .env("NIXERY_PKGS_PATH", Path::new(env!("CARGO_MANIFEST_DIR")).join("pkgs"))
            .env("NIXERY_STORAGE_BACKEND", "filesystem")
            .env("STORAGE_PATH", dir.path().join("storage"))
            .env("NIXERY_SPOOL_PATH", dir.path().join("spool"))
            .env_remove("NIXERY_CHANNEL")
            .env_remove("NIXERY_PKGS_REPO")
            .env("RUST_LOG", "info");
        for (key, value) in env {
            match value.is_empty() {
                true => command.env_remove(key),
                false => command.env(key, value),
            };
        }
        let mut child = command.stderr(Stdio::piped()).spawn().unwrap();
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let mut early = Vec::new();
        let address = loop {
            let line = lines
                .next()
                .unwrap_or_else(|| panic!("nixery exited before serving:\n{}", early.join("\n")))
                .unwrap();
            let serving = line
                .strip_prefix("nixery is serving on http://")
                .map(|a| a.trim().to_owned());
            early.push(line);
            if let Some(address) = serving {
                break address;
            }
        };
        let log = dir.path().join("log");
        std::thread::spawn(move || {
            use std::io::Write;
            let mut file = std::fs::File::create(log).unwrap();
            for line in early.into_iter().chain(lines.map_while(Result::ok)) {
                writeln!(file, "{line}").unwrap();
            }
        });
        Registry { child, address, dir }
    }

    /// The registry's storage folder.
    /// The registry's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn storage(&self) -> std::path::PathBuf {
        self.dir.path().join("storage")
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// How often Nix was asked to evaluate (`nix-instantiate` ran).
    pub fn nix_runs(&self) -> usize {
        self.runs("nix-instantiate")
    }

    /// How many of the counted commands the registry ran contain `command`
    /// (`git ls-remote`, `store ping`).
    pub fn runs(&self, command: &str) -> usize {
        std::fs::read_to_string(self.dir.path().join("runs"))
            .map(|s| s.lines().filter(|l| l.contains(command)).count())
            .unwrap_or(0)
    }

    /// Makes the counted `program` run the shell code `before` first.
    pub fn wrap(&self, program: &str, before: &str) {
        write_counting_wrapper(&self.bin(), program, &self.dir.path().join("runs"), before);
    }

    /// The folder of the wrappers the registry finds first on its PATH.
    pub fn bin(&self) -> std::path::PathBuf {
        self.dir.path().join("bin")
    }

    pub fn get(&self, path: &str) -> Response {
        request("GET", &self.url(path), &[])
    }

    /// Sends SIGTERM, as a service manager stopping the registry would.
    pub fn terminate(&self) {
        run("kill", &["-TERM", &self.child.id().to_string()]);
    }

    /// Waits for the registry to exit.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }

    /// Kills the registry at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// What the registry logged so far, from its start.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An htpasswd file in `dir` with the user `alice` (password `s3cret`),
/// and the `Authorization` value that logs her in.
pub fn alice(dir: &Path) -> (PathBuf, String) {
    use base64::Engine;
    let htpasswd = dir.join("htpasswd");
    std::fs::write(&htpasswd, format!("alice:{}\n", bcrypt::hash("s3cret", 4).unwrap())).unwrap();
    let basic = base64::engine::general_purpose::STANDARD.encode("alice:s3cret");
    (htpasswd, format!("Basic {basic}"))
}

/// The commands whose runs are counted.
const COUNTED: [&str; 4] = ["nix-instantiate", "nix", "nix-store", "git"];

/// Writes `bin/program`, which appends its command line to `log`, runs
/// `before` (shell) and then the real program.
pub fn write_counting_wrapper(bin: &Path, program: &str, log: &Path, before: &str) {
    let real = which(program);
    let wrapper = format!(
        "#!/bin/sh\nprintf '%s\\n' \"$(echo \"{program} $*\" | tr '\\n' ' ')\" >> {log}\n{before}\nexec {} \"$@\"\n",
        real.display(),
        log = log.display(),
    );
    let (path, new) = (bin.join(program), bin.join(format!(".{program}.new")));
    std::fs::write(&new, wrapper).unwrap();
    std::fs::set_permissions(&new, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&new, &path).unwrap();
}

pub struct Response {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or_else(|| panic!("no {name} header"))
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// The registry error code of an error response, checking the envelope.
    pub fn error_code(&self) -> String {
        assert_eq!(self.header("content-type"), "application/json");
        let body = self.json();
        let errors = body["errors"].as_array().expect("errors array");
        assert_eq!(errors.len(), 1);
        assert!(errors[0]["message"].is_string());
        errors[0]["code"].as_str().unwrap().to_owned()
    }
}

pub fn request(method: &str, url: &str, headers: &[(&str, &str)]) -> Response {
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

pub fn which(program: &str) -> PathBuf {
    std::env::var("PATH")
        .unwrap()
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{program} is not installed: run scripts/setup.sh"))
}

pub fn run(program: &str, args: &[&str]) -> String {
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

/// An image pulled with skopeo and unpacked with umoci.
pub struct Unpacked {
    _dir: tempfile::TempDir,
    pub rootfs: PathBuf,
    /// The runtime config umoci made from the image config (`process`:
    /// args, env, user, cwd).
    pub process: Value,
    /// The image config.
    pub config: Value,
}

impl Unpacked {
    /// Pulls `image:tag` from `registry` and unpacks it.
    pub fn pull(registry: &Registry, image: &str, tag: &str) -> Unpacked {
        let dir = tempfile::tempdir().unwrap();
        let layout = dir.path().join("oci");
        skopeo_copy(
            &format!("docker://{}/{image}:{tag}", registry.address),
            &format!("oci:{}:{tag}", layout.display()),
        );
        Unpacked::from_layout(dir, &layout, tag)
    }

    /// Unpacks `tag` of the OCI layout `layout` into `dir`, which it keeps.
    pub fn from_layout(dir: tempfile::TempDir, layout: &Path, tag: &str) -> Unpacked {
        let bundle = dir.path().join("bundle");
        let reference = format!("{}:{tag}", layout.display());
        run("umoci", &["unpack", "--image", &reference, bundle.to_str().unwrap()]);
        let runtime: Value = serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
        let blob = |digest: &Value| -> Value {
            let hex = &digest.as_str().unwrap()["sha256:".len()..];
            serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(hex)).unwrap()).unwrap()
        };
        let index: Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
        let manifest = blob(&index["manifests"][0]["digest"]);
        let config = blob(&manifest["config"]["digest"]);
        Unpacked {
            rootfs: bundle.join("rootfs"),
            process: runtime["process"].clone(),
            config,
            _dir: dir,
        }
    }

    /// Runs `args` in a chroot of the image as its user, with its
    /// environment and (when it has a shell to get there) working directory;
    /// returns stdout.
    pub fn run(&self, args: &[&str]) -> String {
        let user = &self.process["user"];
        let userspec = format!("{}:{}", user["uid"], user["gid"]);
        let env: Vec<String> = self.process["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap().to_owned())
            .collect();
        let cwd = self.process["cwd"].as_str().unwrap_or("/");
        let mut command: Vec<String> = vec!["-i".into()];
        command.extend(env);
        command.extend(["chroot".into(), format!("--userspec={userspec}")]);
        command.push(self.rootfs.display().to_string());
        if cwd != "/" {
            command.extend(["/bin/sh", "-c", r#"cd "$0" && exec "$@""#, cwd].map(String::from));
        }
        command.extend(args.iter().map(|a| a.to_string()));
        let borrowed: Vec<&str> = command.iter().map(String::as_str).collect();
        run("env", &borrowed)
    }

    /// Runs the image's own command (entrypoint and cmd).
    pub fn run_default(&self) -> String {
        let args: Vec<String> = self.process["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_owned())
            .collect();
        self.run(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }
}

/// The shipped package set plus `slow`, whose build sleeps `seconds` and
/// which is a new derivation on every call (so it is never built already).
pub fn slow_package_set(seconds: u32) -> tempfile::TempDir {
    package_set_with_slow(&format!("/bin/sleep {seconds}"), &["slow"])
}

/// Like [`slow_package_set`], with the packages `slow1` … `slow<count>`.
pub fn slow_packages(seconds: u32, count: usize) -> tempfile::TempDir {
    let names: Vec<String> = (1..=count).map(|i| format!("slow{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    package_set_with_slow(&format!("/bin/sleep {seconds}"), &names)
}

/// Like [`slow_package_set`], but `slow`'s build waits (up to a minute)
/// for the file `gate` to go away.
pub fn gated_package_set(gate: &Path) -> tempfile::TempDir {
    package_set_with_slow(
        &format!(
            "i=0; while [ -e {} ] && [ $i -lt 600 ]; do /bin/sleep 0.1; i=$((i+1)); done",
            gate.display()
        ),
        &["slow"],
    )
}

fn package_set_with_slow(wait: &str, names: &[&str]) -> tempfile::TempDir {
    let set = tempfile::tempdir().unwrap();
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let nonce = format!("{}-{}", since_epoch.as_nanos(), set.path().display());
    let packages: String = names
        .iter()
        .map(|name| {
            format!(
                r#"{name} = derivation {{
                name = "{name}-1.0";
                inherit system;
                nonce = "{nonce}";
                builder = "/bin/sh";
                args = [ "-c" "{wait}; echo done > $out" ];
              }};
              "#
            )
        })
        .collect();
    std::fs::write(
        set.path().join("default.nix"),
        format!(
            r#"{{ system ? builtins.currentSystem }}:
            import {pkgs} {{ inherit system; }} // {{
              {packages}
            }}"#,
            pkgs = concat!(env!("CARGO_MANIFEST_DIR"), "/pkgs"),
        ),
    )
    .unwrap();
    set
}

/// The shipped package set, written to `dir/default.nix` with `hello`
/// saying `greeting`.
pub fn package_set(dir: &Path, greeting: &str) {
    const PKGS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/pkgs/default.nix");
    std::fs::create_dir_all(dir).unwrap();
    let text = std::fs::read_to_string(PKGS).unwrap();
    assert!(text.contains("Hello, world!"));
    std::fs::write(dir.join("default.nix"), text.replace("Hello, world!", greeting)).unwrap();
}

/// `dir` packed as `tarball` with the folder `name` at its top (as GitHub's
/// archives are).
pub fn tarball(dir: &Path, name: &str, tarball: &Path) {
    let staging = tempfile::tempdir().unwrap();
    run(
        "cp",
        &["-r", dir.to_str().unwrap(), staging.path().join(name).to_str().unwrap()],
    );
    run(
        "tar",
        &[
            "-czf",
            tarball.to_str().unwrap(),
            "-C",
            staging.path().to_str().unwrap(),
            name,
        ],
    );
}

/// Serves the files of `dir` over HTTP on a loopback port, for as long as
/// the test runs, ignoring query strings and credentials; returns the
/// address (`127.0.0.1:port`).
pub fn serve_files(dir: &Path) -> String {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let dir = dir.to_owned();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut request = String::new();
            BufReader::new(&stream).read_line(&mut request).unwrap();
            let target = request.split(' ').nth(1).unwrap_or("/");
            let path = target.split('?').next().unwrap_or("").trim_start_matches('/');
            let response = match std::fs::read(dir.join(path)) {
                Ok(body) => [
                    format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes(),
                    body,
                ]
                .concat(),
                Err(_) => b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_vec(),
            };
            let _ = stream.write_all(&response);
        }
    });
    address
}

/// Runs git in `repo` as a test user, with `main` as the default branch;
/// returns its stdout, trimmed.
pub fn git(repo: &Path, args: &[&str]) -> String {
    let output = Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@localhost",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(repo)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap().trim().to_owned()
}

/// Pulls `source` (a docker:// reference) into the OCI layout `destination`.
pub fn skopeo_copy(source: &str, destination: &str) {
    run("skopeo", &["copy", "--src-tls-verify=false", source, destination]);
}

/// Writes a new PEM P-256 private key (PKCS#8) at `path`, as the README's
/// `openssl genpkey` makes one.
pub fn signing_key(path: &Path) {
    let path = path.to_str().unwrap();
    let args = [
        "genpkey",
        "-algorithm",
        "EC",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-out",
        path,
    ];
    run("openssl", &args);
}

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}
