//! Real object stores for the storage tests: SeaweedFS for S3 and
//! fake-gcs-server for GCS, both Go servers that PyPI wheels ship, installed
//! by `scripts/setup.sh test` and linked into `NIXERY_TEST_TOOLS` (default
//! `/opt/nixery-test/bin`). Each is started in a temporary folder on free
//! loopback ports with one bucket, `nixery`, and killed (SIGKILL) when
//! dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::gcp::GoogleCloudStorageBuilder;

pub const BUCKET: &str = "nixery";

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    S3,
    Gcs,
}

/// A running object store with one bucket.
pub struct ObjectServer {
    pub kind: Kind,
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
            kind: Kind::S3,
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

    /// fake-gcs-server, keeping objects in its folder.
    pub fn fake_gcs() -> ObjectServer {
        let dir = tempfile::Builder::new().prefix("nxgcs").tempdir().unwrap();
        let ports = free_ports(1);
        let endpoint = format!("http://127.0.0.1:{}", ports[0]);
        let args: Vec<String> = [
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            &ports[0].to_string(),
            "-backend",
            "filesystem",
            "-filesystem-root",
            &dir.path().join("data").display().to_string(),
            "-external-url",
            &endpoint,
            "-public-host",
            &format!("127.0.0.1:{}", ports[0]),
            "-log-level",
            "warn",
        ]
        .map(str::to_owned)
        .into();
        let mut server = ObjectServer {
            kind: Kind::Gcs,
            child: None,
            program: tools().join("fake-gcs-server"),
            args,
            ports,
            endpoint,
            dir,
        };
        server.start();
        let buckets = format!("{}/storage/v1/b?project=test", server.endpoint);
        let created = http()
            .post(&buckets)
            .header("content-type", "application/json")
            .body(format!(r#"{{"name":"{BUCKET}"}}"#))
            .send()
            .unwrap();
        assert!(created.status().is_success(), "bucket: {}", created.status());
        server.write_service_account();
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
        let probe = match self.kind {
            Kind::S3 => format!("{}/", self.endpoint),
            Kind::Gcs => format!("{}/storage/v1/b", self.endpoint),
        };
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

    fn service_account(&self) -> PathBuf {
        self.dir.path().join("service-account.json")
    }

    /// A service account whose key signs URLs and tokens locally (object_store
    /// makes self-signed JWTs; no token server is asked); fake-gcs-server
    /// checks no signature.
    fn write_service_account(&self) {
        let key = Command::new("openssl")
            .args(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
            .output()
            .unwrap();
        assert!(key.status.success(), "openssl genpkey failed");
        let account = serde_json::json!({
            "type": "service_account",
            "private_key": String::from_utf8(key.stdout).unwrap(),
            "private_key_id": "test",
            "client_email": "nixery@test.iam.gserviceaccount.com",
            "gcs_base_url": self.endpoint,
        });
        std::fs::write(self.service_account(), account.to_string()).unwrap();
    }

    /// The environment that makes a registry use this bucket.
    pub fn registry_env(&self) -> Vec<(String, String)> {
        let account = self.service_account().display().to_string();
        let pairs = match self.kind {
            Kind::S3 => vec![
                ("NIXERY_STORAGE_BACKEND", "s3"),
                ("S3_BUCKET", BUCKET),
                ("S3_ENDPOINT", &self.endpoint),
                ("S3_ACCESS_KEY", "test"),
                ("S3_SECRET_KEY", "test"),
            ],
            Kind::Gcs => vec![
                ("NIXERY_STORAGE_BACKEND", "gcs"),
                ("GCS_BUCKET", BUCKET),
                ("GCS_ENDPOINT", &self.endpoint),
                ("GOOGLE_APPLICATION_CREDENTIALS", &account),
            ],
        };
        pairs.into_iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
    }

    /// A client of the bucket, for checking what the registry left in it.
    pub fn store(&self) -> Arc<dyn ObjectStore> {
        let options = object_store::ClientOptions::new().with_allow_http(true);
        match self.kind {
            Kind::S3 => Arc::new(
                AmazonS3Builder::new()
                    .with_bucket_name(BUCKET)
                    .with_endpoint(&self.endpoint)
                    .with_region("us-east-1")
                    .with_access_key_id("test")
                    .with_secret_access_key("test")
                    .with_client_options(options)
                    .build()
                    .unwrap(),
            ),
            Kind::Gcs => Arc::new(
                GoogleCloudStorageBuilder::new()
                    .with_bucket_name(BUCKET)
                    .with_service_account_path(self.service_account().display().to_string())
                    .with_base_url(&self.endpoint)
                    .with_client_options(options)
                    .build()
                    .unwrap(),
            ),
        }
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

/// Where setup.sh puts the test servers' binaries (`NIXERY_TEST_TOOLS`);
/// its parent holds the other test tools.
pub fn tools() -> PathBuf {
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
