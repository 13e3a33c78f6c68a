//! The web pages, rendered on the server from escaped templates
//! (`templates/`, askama) with no assets from elsewhere: the landing page
//! (how to pull from this host, the package set and its revision, the
//! meta-packages, recent builds and errors, storage use and the last
//! garbage collection) and an image's page (its layer
//! plan drawn as bars sized by bytes, what each layer holds, its blob and
//! which other images share it, the pull command). An image's page builds
//! the image as its pull would, through the same admission; a request that
//! shows no credentials while access control is on sees only what is built
//! already, and neither page runs anything for it. Nix's log lines appear
//! only where the operator allows them (`NIXERY_WEB_SHOW_LOGS`, or
//! protected pages); otherwise an error shows its packages and Nix's first
//! error line.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use askama::Template;
use axum::Router;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;

use crate::app::AppState;
use crate::builder::ImagePlan;
use crate::client::Client;
use crate::gc::StorageUse;
use crate::image::ImageRequest;
use crate::meta::Meta;
use crate::redact;
use crate::server::{RegistryError, Unverified};
use crate::source::LATEST;

/// What the pages may show.
#[derive(Clone, Copy, Debug, Default)]
pub struct Settings {
    /// Show the last lines of Nix's log of failed builds.
    pub show_logs: bool,
}

/// The pages' routes, for the server's router.
pub fn routes(settings: Settings) -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(index))
        .route("/image/{*name}", get(image))
        .layer(axum::Extension(settings))
}

#[derive(Template)]
#[template(path = "index.html")]
struct IndexPage {
    host: String,
    source: String,
    revision: Option<String>,
    tags: Vec<String>,
    metas: Vec<(String, String)>,
    builds: Vec<BuildRow>,
    failures: Vec<FailureRow>,
    /// Storage use and the last garbage collection, when measured.
    storage: Option<StorageRow>,
    /// The public key that verifies the signatures; `None`: unsigned.
    public_key: Option<String>,
    public_key_path: &'static str,
}

struct StorageRow {
    objects: u64,
    size: String,
    measured: String,
    /// `None`: no collection has run.
    last_gc: Option<String>,
}

struct BuildRow {
    image: String,
    /// The image's page path: the name without the tag.
    path: String,
    arch: &'static str,
    ago: String,
    millis: u64,
    layers: usize,
    newly_packed: usize,
    digest: String,
}

struct FailureRow {
    image: String,
    ago: String,
    message: String,
    /// Nix's last lines, one string.
    log: String,
}

#[derive(Template)]
#[template(path = "image.html")]
struct ImagePage {
    host: String,
    name: String,
    plan: Result<PlanView, String>,
}

struct PlanView {
    arch: &'static str,
    cached: bool,
    total: String,
    layers: Vec<LayerView>,
    /// Each document's name and blob digest.
    documents: Vec<(&'static str, String)>,
    /// The signature's tag (`sha256-<hex>.sig`), when images are signed.
    signature: Option<String>,
}

struct LayerView {
    contents: Vec<String>,
    size: String,
    /// Bar width in percent, from 0.5 to 100.
    percent: String,
    /// `shared` or nothing.
    class: &'static str,
    state: String,
    shared_with: Vec<String>,
}

/// `GET /`.
async fn index(
    State(state): State<Arc<AppState>>,
    Extension(settings): Extension<Settings>,
    unverified: Option<Extension<Unverified>>,
    headers: HeaderMap,
) -> Response {
    let source = &state.source;
    let (resolved, tags) = match unverified {
        Some(_) => (source.resolve_known(LATEST).await, source.tags_known().await),
        None => (
            source.resolve(LATEST).await.ok().flatten(),
            source.tags().await.unwrap_or_default(),
        ),
    };
    let revision = resolved.and_then(|r| r.labels.get("org.opencontainers.image.revision").cloned());
    let now = SystemTime::now();
    let page = IndexPage {
        host: host(&headers),
        source: source.describe(),
        revision,
        tags,
        metas: state
            .meta_packages
            .names()
            .map(|name| {
                let meta = state.meta_packages.get(name).expect("listed");
                (name.to_owned(), meta_meaning(meta))
            })
            .collect(),
        builds: state
            .activity
            .builds()
            .into_iter()
            .map(|b| BuildRow {
                path: b.image.split(':').next().unwrap_or(&b.image).to_owned(),
                image: b.image,
                arch: b.arch,
                ago: ago(now, b.when),
                millis: b.millis,
                layers: b.layers,
                newly_packed: b.newly_packed,
                digest: short_digest(&b.digest),
            })
            .collect(),
        failures: state
            .activity
            .failures()
            .into_iter()
            .map(|f| FailureRow {
                image: f.image,
                ago: ago(now, f.when),
                message: f.message,
                log: match settings.show_logs {
                    true => f.log.join("\n"),
                    false => String::new(),
                },
            })
            .collect(),
        storage: state.storage_use.get().map(|measured| storage_row(now, &measured)),
        public_key: state.signing.as_ref().map(|s| s.signer.public_pem().to_owned()),
        public_key_path: crate::server::PUBLIC_KEY_PATH,
    };
    render(StatusCode::OK, &page)
}

fn storage_row(now: SystemTime, measured: &StorageUse) -> StorageRow {
    let at = |unix: u64| UNIX_EPOCH + Duration::from_secs(unix);
    StorageRow {
        objects: measured.objects,
        size: mib(measured.bytes),
        measured: ago(now, at(measured.measured_at)),
        last_gc: measured.last_gc.as_ref().map(|gc| {
            format!(
                "{}: deleted {} objects ({}), leaving {} objects ({})",
                ago(now, at(gc.at)),
                gc.deleted_objects,
                mib(gc.deleted_bytes),
                gc.store_objects,
                mib(gc.store_bytes)
            )
        }),
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / 1048576.0)
}

/// `GET /image/<name>`: the layer plan of `name:latest`, built first
/// (as a pull would) when it is not built yet and the request may start it.
async fn image(
    State(state): State<Arc<AppState>>,
    Extension(client): Extension<Client>,
    unverified: Option<Extension<Unverified>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let may_build = unverified.is_none().then_some(client);
    let (status, plan) = match ImageRequest::parse(&name, LATEST, &state.meta_packages) {
        Err(e) => {
            let message = e.to_string();
            (status_of(RegistryError::from(e)), Err(message))
        }
        Ok(request) => match state.builder.describe(&request, may_build).await {
            Ok(Some(plan)) => (StatusCode::OK, Ok(plan_view(plan, state.signing.is_some()))),
            Ok(None) => (
                StatusCode::NOT_FOUND,
                Err(format!(
                    "{name} is not built yet: a pull with this registry's credentials builds it"
                )),
            ),
            Err(e) => (
                status_of(RegistryError::from(e.as_ref())),
                Err(redact::scrub(&e.to_string()).into_owned()),
            ),
        },
    };
    let page = ImagePage {
        host: host(&headers),
        name,
        plan,
    };
    render(status, &page)
}

/// A page's status: the one a registry route would answer the error with.
fn status_of(error: RegistryError) -> StatusCode {
    error.kind().0
}

/// What the page shows of `plan`; `signed` when images are signed here.
fn plan_view(plan: ImagePlan, signed: bool) -> PlanView {
    let largest = plan.layers.iter().map(|l| l.bytes).max().unwrap_or(0).max(1);
    let total = plan.layers.iter().map(|l| l.bytes).sum();
    let layers = plan
        .layers
        .into_iter()
        .map(|layer| {
            let class = if layer.shared_with.is_empty() { "" } else { "shared" };
            let state = format!(
                "{} compressed, {}",
                human(layer.packed.size),
                short_digest(layer.packed.digest.as_str())
            );
            LayerView {
                percent: format!("{:.1}", (layer.bytes as f64 * 100.0 / largest as f64).max(0.5)),
                size: human(layer.bytes),
                contents: layer.contents,
                class,
                state,
                shared_with: layer.shared_with,
            }
        })
        .collect();
    PlanView {
        arch: plan.arch.oci_name(),
        cached: plan.cached,
        total: human(total),
        layers,
        signature: (plan.manifest.filter(|_| signed)).map(|m| format!("sha256-{}.sig", m.hex())),
        documents: (plan.documents.into_iter())
            .map(|(artifact_type, blob)| (document_name(&artifact_type), blob.to_string()))
            .collect(),
    }
}

/// What a document of an artifact type is called on the page.
fn document_name(artifact_type: &str) -> &'static str {
    match artifact_type {
        "application/spdx+json" => "SBOM (SPDX 2.3)",
        "application/vnd.cyclonedx+json" => "SBOM (CycloneDX 1.5)",
        "application/vnd.in-toto+json" => "provenance (SLSA v1)",
        _ => "document",
    }
}

/// What a meta-package stands for, in words.
fn meta_meaning(meta: &Meta) -> String {
    let mut parts = Vec::new();
    if !meta.packages.is_empty() {
        parts.push(format!("adds {}", meta.packages.join(", ")));
    }
    if let Some(arch) = meta.architecture {
        parts.push(format!("builds for {} only", arch.oci_name()));
    }
    if let Some(user) = &meta.user {
        parts.push(format!("runs as {} (uid {}) in {}", user.name, user.uid, user.home()));
    }
    parts.join("; ")
}

/// The host clients reached this registry at.
fn host(headers: &HeaderMap) -> String {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost")
        .to_owned()
}

fn ago(now: SystemTime, then: SystemTime) -> String {
    let seconds = now.duration_since(then).map_or(0, |d| d.as_secs());
    match seconds {
        0..60 => format!("{seconds} s ago"),
        60..3600 => format!("{} min ago", seconds / 60),
        _ => format!("{} h ago", seconds / 3600),
    }
}

/// `sha256:0123456789ab` of a digest.
fn short_digest(digest: &str) -> String {
    digest.chars().take(19).collect()
}

fn human(bytes: u64) -> String {
    match bytes {
        0..1024 => format!("{bytes} B"),
        1024..1_048_576 => format!("{:.1} KiB", bytes as f64 / 1024.0),
        _ => format!("{:.1} MiB", bytes as f64 / 1_048_576.0),
    }
}

fn render(status: StatusCode, page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("rendering failed: {e}")).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        let page = ImagePage {
            host: "h<script>".into(),
            name: "a&b".into(),
            plan: Err("<b>raw Nix output</b>".into()),
        };
        let html = page.render().unwrap();
        assert!(!html.contains("<b>raw") && !html.contains("h<script>"), "{html}");
        assert!(html.contains("raw Nix output") && html.contains("a&#38;b"), "{html}");
    }

    /// With access control on, an open page asked for without credentials
    /// shows what is built and starts nothing for what is not.
    #[tokio::test]
    async fn unverified_pages_start_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let htpasswd = dir.path().join("htpasswd");
        std::fs::write(&htpasswd, format!("alice:{}\n", bcrypt::hash("s3cret", 4).unwrap())).unwrap();
        let auth = crate::auth::Auth::load(Some(&htpasswd), None, false).unwrap();
        let served = crate::server::tests::served(auth, routes(Settings::default())).await;
        let page = served.get("/image/shell/git", &[]).await;
        assert_eq!(page.status, StatusCode::NOT_FOUND);
        assert!(String::from_utf8_lossy(&page.body).contains("not built yet"));
        let landing = served.get("/", &[]).await;
        assert_eq!(landing.status, StatusCode::OK);
        assert_eq!(served.get("/image/Hello", &[]).await.status, StatusCode::BAD_REQUEST);
        assert!(served.ran_nothing());
    }

    #[test]
    fn sizes_and_ages_read_well() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(3 * 1024 * 1024 / 2), "1.5 MiB");
        let now = SystemTime::now();
        assert_eq!(ago(now, now - std::time::Duration::from_secs(125)), "2 min ago");
    }
}
