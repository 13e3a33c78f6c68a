//! The container engines the tests pull with and run images in: podman
//! with its own storage and settings, and a private containerd and dockerd,
//! each in temporary folders and stopped when dropped. An engine that
//! cannot start on this machine skips its test with a message, unless
//! `NIXERY_REQUIRE_ENGINES=1` (set by `scripts/test.sh`), where that is a
//! failure.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Skips (returns `None`) or fails when an engine cannot start.
pub fn unavailable<T>(engine: &str, reason: String) -> Option<T> {
    if std::env::var("NIXERY_REQUIRE_ENGINES").as_deref() == Ok("1") {
        panic!("{engine} cannot start: {reason}");
    }
    eprintln!("SKIPPED: {engine} cannot start on this machine: {reason}");
    None
}

/// A daemon of ours, stopped when dropped, with its folder.
pub struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
    pub socket: PathBuf,
}

impl Daemon {
    /// A folder for a daemon: short, as its sockets' paths must be.
    fn folder() -> tempfile::TempDir {
        tempfile::Builder::new().prefix("nx").tempdir_in("/tmp").unwrap()
    }

    /// Starts `program` with `args`, listening on `{name}.sock` in `dir`,
    /// and waits until `ready` says it answers.
    fn start(
        name: &str,
        dir: tempfile::TempDir,
        program: &str,
        args: &[String],
        ready: impl Fn(&Daemon) -> bool,
    ) -> Option<Daemon> {
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let child = match Command::new(program)
            .args(args)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
        {
            Ok(child) => child,
            Err(e) => panic!("{program} is not installed ({e}): run scripts/setup.sh test"),
        };
        let socket = dir.path().join(format!("{name}.sock"));
        let mut daemon = Daemon { child, dir, socket };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                return unavailable(name, format!("exited with {status}: {}", daemon.log()));
            }
            if ready(&daemon) {
                return Some(daemon);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        unavailable(name, format!("not ready after 30 s: {}", daemon.log()))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM lets the daemon unmount what it mounted before its folder goes.
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A private containerd: its own root, state and socket, no CRI plugin.
pub fn containerd() -> Option<Daemon> {
    let dir = Daemon::folder();
    let config = format!(
        r#"version = 2
root = "{dir}/root"
state = "{dir}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{dir}/containerd.sock"
[ttrpc]
  address = "{dir}/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
"#,
        dir = dir.path().display()
    );
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config).unwrap();
    let args = ["--config".to_owned(), path.display().to_string()];
    Daemon::start("containerd", dir, "containerd", &args, |daemon| {
        daemon.socket.exists() && succeeds("ctr", &["--address", daemon.socket.to_str().unwrap(), "version"])
    })
}

/// A private dockerd on a containerd of ours: no iptables, no bridge.
pub fn dockerd(containerd: &Daemon) -> Option<Daemon> {
    let dir = Daemon::folder();
    let at = |name: &str| dir.path().join(name).display().to_string();
    let args = [
        format!("--host=unix://{}", at("docker.sock")),
        format!("--data-root={}", at("root")),
        format!("--exec-root={}", at("exec")),
        format!("--pidfile={}", at("docker.pid")),
        "--iptables=false".to_owned(),
        "--ip6tables=false".to_owned(),
        "--bridge=none".to_owned(),
        format!("--containerd={}", containerd.socket.display()),
    ];
    Daemon::start("docker", dir, "dockerd", &args, |daemon| {
        succeeds("docker", &["-H", &docker_host(daemon), "version"])
    })
}

pub fn docker_host(daemon: &Daemon) -> String {
    format!("unix://{}", daemon.socket.display())
}

/// podman with its own storage and settings in a temporary folder.
pub struct Podman {
    home: tempfile::TempDir,
    driver: &'static str,
}

impl Podman {
    /// With the vfs storage driver: nothing shared with the host, each
    /// container a copy of its image.
    pub fn new() -> Podman {
        Podman::with_driver("vfs")
    }

    /// With the overlay storage driver: containers start in milliseconds
    /// whatever the image's size.
    pub fn overlay() -> Podman {
        Podman::with_driver("overlay")
    }

    fn with_driver(driver: &'static str) -> Podman {
        let home = tempfile::tempdir().unwrap();
        // Limits podman may set here, and runc (crun refuses this machine's cgroups).
        std::fs::write(
            home.path().join("containers.conf"),
            "[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\nnetns = \"none\"\n[engine]\nruntime = \"runc\"\n",
        )
        .unwrap();
        Podman { home, driver }
    }

    /// Runs podman with `args`; its standard output.
    pub fn run(&self, args: &[&str]) -> String {
        let output = self
            .command(args)
            .output()
            .expect("podman is not installed: run scripts/setup.sh test");
        assert!(
            output.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Runs podman with `args`; its exit status.
    pub fn status(&self, args: &[&str]) -> Option<i32> {
        let status = self.command(args).stdout(Stdio::null()).stderr(Stdio::null()).status();
        status
            .expect("podman is not installed: run scripts/setup.sh test")
            .code()
    }

    fn command(&self, args: &[&str]) -> Command {
        let at = |name: &str| self.home.path().join(name).display().to_string();
        let mut command = Command::new("podman");
        command
            .env("CONTAINERS_CONF", at("containers.conf"))
            .args([
                "--root",
                &at("root"),
                "--runroot",
                &at("runroot"),
                "--storage-driver",
                self.driver,
            ])
            .args(args);
        command
    }
}
