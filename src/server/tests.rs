//! The HTTP layer in process: the router answers requests given to it with
//! tower's `oneshot`, over memory storage holding an image recorded in
//! advance. No Nix, no sockets, milliseconds per test: 304s, ranges,
//! HEAD/GET parity, the error envelope and access control. The web pages'
//! tests use the same fixture.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use bytes::Bytes;

use super::*;
use crate::activity::Activity;
use crate::arch::Arch;
use crate::archive::{Compression, LayerDigests};
use crate::builder::{Builder, Parts, Settings};
use crate::cache::{ImageRecord, ManifestRecord};
use crate::digest::Digest;
use crate::image::ImageRequest;
use crate::layers::Popularity;
use crate::listen::App;
use crate::meta::MetaPackages;
use crate::metrics::Metrics;
use crate::nix::Nix;
use crate::oci::{self, Format};
use crate::programs::Programs;
use crate::source::PackageSource;
use crate::storage::{Backend, Storage, StorageConfig};

/// A router over memory storage where `hello:latest` is built already,
/// with `pages` among its routes.
pub(crate) struct Served {
    app: super::Registry,
    state: AppState,
    manifest: oci::Document,
    layer: Bytes,
    layer_digest: Digest,
    _dir: tempfile::TempDir,
}

/// What a response said.
pub(crate) struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", |v| v.to_str().unwrap())
    }

    /// The error envelope's first code.
    fn code(&self) -> String {
        let body: serde_json::Value = serde_json::from_slice(&self.body).expect("a JSON body");
        body["errors"][0]["code"].as_str().expect("a code").to_owned()
    }
}

pub(crate) async fn served(auth: Option<Auth>, pages: Router<Arc<AppState>>) -> Served {
    let dir = tempfile::tempdir().unwrap();
    let pkgs = dir.path().join("pkgs");
    std::fs::create_dir(&pkgs).unwrap();
    std::fs::write(pkgs.join("default.nix"), "{ system ? null }: { }\n").unwrap();
    let storage = Storage::open(&StorageConfig {
        backend: Backend::Memory,
        redirect: None,
        spool: dir.path().join("spool"),
        blob_cache_bytes: 0,
    })
    .await
    .unwrap();
    let metrics = Arc::new(Metrics::default());
    let activity = Arc::new(Activity::default());
    let programs = Programs::new(Arc::clone(&metrics));
    let source = Arc::new(PackageSource::path(pkgs).with_programs(programs.clone()));
    let parts = Parts {
        source: Arc::clone(&source),
        nix: Nix::new(Duration::from_secs(60), programs),
        storage: storage.clone(),
        popularity: Popularity::default(),
        learned: None,
        metrics: Arc::clone(&metrics),
        activity: Arc::clone(&activity),
    };
    let settings = Settings {
        layering: Default::default(),
        layer_budget: 96,
        gzip: Compression::Gzip(6),
        oci_layers: Compression::Zstd(3),
        parallel: 1,
        max_builds: 1,
        architectures: vec![Arch::Amd64],
        preferred_format: Format::Oci,
        entrypoint: true,
        max_packages: 20,
        builds_per_client: 1,
        client_build_rate: 30,
        lease_ttl: std::time::Duration::from_secs(30),
        builder_id: "urn:nixery:test".into(),
        signer: None,
    };
    let builder = Builder::new(parts, settings);

    let layer = Bytes::from((0..=255u8).cycle().take(1000).collect::<Vec<u8>>());
    let layer_digest = Digest::of(&layer);
    storage.put_blob(&layer_digest, layer.clone()).await.unwrap();
    let layers = [LayerDigests {
        digest: layer_digest.clone(),
        diff_id: layer_digest.clone(),
        size: layer.len() as u64,
    }];
    let runtime = oci::Runtime {
        bash: false,
        user: None,
        entrypoint: None,
        labels: Default::default(),
    };
    let config = oci::image_config(Arch::Amd64, &layers, &runtime).unwrap();
    storage
        .put_blob(&config.digest, Bytes::from(config.bytes.clone()))
        .await
        .unwrap();
    let manifest = oci::manifest(Format::Oci, &config, &layers, Compression::Zstd(3)).unwrap();
    storage
        .put_blob(&manifest.digest, Bytes::from(manifest.bytes.clone()))
        .await
        .unwrap();
    let request = ImageRequest::parse("hello", "latest", &MetaPackages::default()).unwrap();
    let record = ManifestRecord {
        digest: manifest.digest.clone(),
        media_type: oci::OCI_MANIFEST.to_owned(),
        size: manifest.bytes.len() as u64,
    };
    let image = ImageRecord {
        manifests: vec![(Format::Oci, record)],
    };
    builder.record_built(&request, Format::Oci, image).await;

    let state = AppState {
        signing: None,
        storage_use: crate::gc::Status::default(),
        builder,
        storage: Arc::new(storage),
        metrics,
        activity,
        source,
        meta_packages: Arc::new(MetaPackages::default()),
        auth: auth.map(Arc::new),
    };
    let app = router(state.clone(), TrustedProxies::default(), pages);
    Served {
        app,
        state,
        manifest,
        layer,
        layer_digest,
        _dir: dir,
    }
}

impl Served {
    async fn send(&self, method: &str, uri: &str, headers: &[(&str, &str)]) -> Answer {
        let mut request = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Body::empty()).unwrap();
        let peer = SocketAddr::from(([192, 0, 2, 1], 40000));
        let response = self.app.answer(request, peer).await;
        let (parts, body) = response.into_parts();
        let body = axum::body::to_bytes(body, usize::MAX).await.unwrap();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    pub(crate) async fn get(&self, uri: &str, headers: &[(&str, &str)]) -> Answer {
        self.send("GET", uri, headers).await
    }

    fn blob_uri(&self) -> String {
        format!("/v2/hello/blobs/{}", self.layer_digest)
    }

    /// Nothing here may start Nix or git.
    pub(crate) fn ran_nothing(&self) -> bool {
        !self.state.metrics.encode().contains("nix_invocations_total{")
    }
}

const ACCEPT_OCI: (&str, &str) = ("accept", oci::OCI_MANIFEST);

/// HEAD answers with GET's status and headers, and no body.
async fn assert_head_like_get(served: &Served, uri: &str, headers: &[(&str, &str)]) -> Answer {
    let get = served.get(uri, headers).await;
    let head = served.send("HEAD", uri, headers).await;
    assert_eq!(head.status, get.status, "{uri}");
    assert!(head.body.is_empty(), "{uri}");
    for name in [
        "content-type",
        "content-length",
        "docker-content-digest",
        "etag",
        "content-range",
    ] {
        assert_eq!(head.header(name), get.header(name), "{uri}: {name}");
    }
    get
}

#[tokio::test]
async fn manifests_by_tag_and_digest() {
    let served = served(None, Router::new()).await;
    let by_tag = assert_head_like_get(&served, "/v2/hello/manifests/latest", &[ACCEPT_OCI]).await;
    assert_eq!(by_tag.status, StatusCode::OK);
    assert_eq!(by_tag.body, served.manifest.bytes);
    let digest = served.manifest.digest.to_string();
    assert_eq!(by_tag.header("docker-content-digest"), digest);
    assert_eq!(by_tag.header("content-type"), oci::OCI_MANIFEST);
    assert_eq!(by_tag.header("vary"), "Accept");
    assert_eq!(by_tag.header("docker-distribution-api-version"), "registry/2.0");

    let by_digest = assert_head_like_get(&served, &format!("/v2/hello/manifests/{digest}"), &[]).await;
    assert_eq!(by_digest.status, StatusCode::OK);
    assert_eq!(by_digest.body, served.manifest.bytes);

    let etag = by_tag.header("etag").to_owned();
    assert_eq!(etag, format!("\"{digest}\""));
    for uri in [
        "/v2/hello/manifests/latest".to_owned(),
        format!("/v2/hello/manifests/{digest}"),
    ] {
        let again = served.get(&uri, &[ACCEPT_OCI, ("if-none-match", &etag)]).await;
        assert_eq!(again.status, StatusCode::NOT_MODIFIED, "{uri}");
        assert!(again.body.is_empty());
        assert_eq!(again.header("docker-content-digest"), digest);
        assert_eq!(again.header("etag"), etag);
    }
    let other = served.get(
        "/v2/hello/manifests/latest",
        &[ACCEPT_OCI, ("if-none-match", "\"sha256:00\"")],
    );
    assert_eq!(other.await.status, StatusCode::OK);
    assert!(served.ran_nothing());
}

#[tokio::test]
async fn blobs_whole_by_range_and_conditionally() {
    let served = served(None, Router::new()).await;
    let uri = served.blob_uri();
    let whole = assert_head_like_get(&served, &uri, &[]).await;
    assert_eq!(whole.status, StatusCode::OK);
    assert_eq!(whole.body, served.layer);
    assert_eq!(whole.header("content-length"), "1000");
    assert_eq!(whole.header("accept-ranges"), "bytes");
    assert_eq!(whole.header("docker-content-digest"), served.layer_digest.to_string());

    let part = assert_head_like_get(&served, &uri, &[("range", "bytes=2-5")]).await;
    assert_eq!(part.status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.body, served.layer.slice(2..6));
    assert_eq!(part.header("content-range"), "bytes 2-5/1000");
    let tail = served.get(&uri, &[("range", "bytes=-10")]).await;
    assert_eq!(tail.body, served.layer.slice(990..));
    let ignored = served.get(&uri, &[("range", "bytes=0-1,4-5")]).await;
    assert_eq!(
        (ignored.status, ignored.body.len()),
        (StatusCode::OK, 1000),
        "several ranges: the whole blob"
    );

    let outside = served.get(&uri, &[("range", "bytes=1000-")]).await;
    assert_eq!(outside.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(outside.header("content-range"), "bytes */1000");
    assert_eq!(outside.code(), "RANGE_INVALID");

    let etag = whole.header("etag").to_owned();
    for range in ["bytes=2-5", "bytes=1000-"] {
        let cached = served.get(&uri, &[("if-none-match", &etag), ("range", range)]).await;
        assert_eq!(
            cached.status,
            StatusCode::NOT_MODIFIED,
            "If-None-Match before Range: {range}"
        );
        assert!(cached.body.is_empty());
    }
    assert!(served.ran_nothing());
}

#[tokio::test]
async fn errors_come_in_the_registry_envelope() {
    let served = served(None, Router::new()).await;
    let missing = format!("/v2/hello/blobs/sha256:{}", "0".repeat(64));
    for (method, uri, status, code) in [
        ("GET", missing.as_str(), StatusCode::NOT_FOUND, "BLOB_UNKNOWN"),
        (
            "GET",
            "/v2/hello/blobs/sha256:abc",
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        ),
        (
            "GET",
            "/v2/Hello/manifests/latest",
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/hello/manifests/-x",
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
        (
            "GET",
            "/v2/hello/manifests/v1",
            StatusCode::NOT_FOUND,
            "MANIFEST_UNKNOWN",
        ),
        (
            "GET",
            "/v2/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p/q/r/s/t/u/manifests/latest",
            StatusCode::BAD_REQUEST,
            "NAME_INVALID",
        ),
        (
            "GET",
            "/v2/hello/tags/list?n=x",
            StatusCode::BAD_REQUEST,
            "PAGINATION_NUMBER_INVALID",
        ),
        ("GET", "/v2/hello/nothing/here", StatusCode::NOT_FOUND, "UNSUPPORTED"),
        (
            "DELETE",
            "/v2/hello/manifests/latest",
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
        ),
    ] {
        let answer = served.send(method, uri, &[]).await;
        assert_eq!(answer.status, status, "{method} {uri}");
        assert_eq!(answer.code(), code, "{method} {uri}");
        assert_eq!(answer.header("content-type"), "application/json", "{uri}");
        assert_eq!(
            answer.header("docker-distribution-api-version"),
            "registry/2.0",
            "{uri}"
        );
    }
    let refused = served.send("PUT", "/v2/hello/blobs/uploads/x", &[]).await;
    assert_eq!(refused.header("allow"), "GET, HEAD");
    let big = "x".repeat(17 * 1024);
    let too_big = served.get("/v2/", &[("x-padding", &big)]).await;
    assert_eq!(too_big.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(too_big.code(), "UNSUPPORTED");
    assert!(served.ran_nothing(), "no Nix for a name or tag that cannot be served");
}

#[tokio::test]
async fn access_control_challenges_and_admits() {
    let dir = tempfile::tempdir().unwrap();
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("alice:{}\n", bcrypt::hash("s3cret", 4).unwrap())).unwrap();
    let auth = Auth::load(Some(&htpasswd), None, false).unwrap();
    let served = served(auth, Router::new()).await;
    let alice = ("authorization", "Basic YWxpY2U6czNjcmV0");
    let mallory = ("authorization", "Basic YWxpY2U6d3Jvbmc=");
    for headers in [&[][..], &[mallory][..]] {
        for uri in ["/v2/", "/v2/hello/manifests/latest"] {
            let refused = served.get(uri, headers).await;
            assert_eq!(refused.status, StatusCode::UNAUTHORIZED, "{uri}");
            assert_eq!(refused.code(), "UNAUTHORIZED");
            assert_eq!(refused.header("www-authenticate"), "Basic realm=\"nixery\"");
            assert_eq!(refused.header("docker-distribution-api-version"), "registry/2.0");
        }
    }
    let pulled = served.get("/v2/hello/manifests/latest", &[ACCEPT_OCI, alice]).await;
    assert_eq!(pulled.status, StatusCode::OK);
    assert_eq!(pulled.body, served.manifest.bytes);
    assert_eq!(served.get("/healthz", &[]).await.status, StatusCode::OK);
    assert!(served.ran_nothing());
}
