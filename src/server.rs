//! The HTTP side: the registry's read API under `/v2/` (manifests by tag
//! and digest, blobs, tags/list, referrers), its error envelope, GET/HEAD
//! parity, digest headers and byte ranges; `/metrics`, `/healthz` and
//! `/readyz`; the web pages (`web.rs`) at `/` and `/image/<name>`. Every
//! request gets an id (`x-request-id`) that its log lines, and those of a
//! build it starts, carry. It parses requests and maps results to
//! responses; the negotiate module picks the manifest format and the builder
//! makes images.

use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::extract::rejection::QueryRejection;
use axum::extract::{ConnectInfo, Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use bytes::Bytes;
use serde_json::json;

use crate::auth::Auth;
use crate::builder::{BuildError, Builder};
use crate::client::{Client, TrustedProxies};
use crate::digest::{Digest, DigestError};
use crate::image::ImageRequest;
use crate::negotiate;
use crate::nix::NixError;
use crate::oci;
use crate::redact;
use crate::reference::{self, NameError};
use crate::source::LATEST;
use crate::storage::StorageError;
use crate::web;

/// Seconds a client should wait after storage was unavailable.
const RETRY_AFTER_SECONDS: &str = "5";
/// Most bytes of request headers a request may carry.
const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Larger blobs are never manifests; they are not read to find out.
const MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;
const API_VERSION: &str = "registry/2.0";

/// How requests are treated, besides their routes.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// `None`: anyone may pull.
    pub auth: Option<Arc<Auth>>,
    /// Whose forwarding headers name the client.
    pub trusted_proxies: TrustedProxies,
    pub web: web::Settings,
}

/// The registry's routes.
pub fn router(builder: Arc<Builder>, settings: Settings) -> Router {
    use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
    let routes = Router::new()
        .route("/v2", any(ping))
        .route("/v2/", any(ping))
        .route("/v2/{*rest}", any(registry))
        .layer(axum::middleware::map_response(add_api_version))
        .route("/", get(web::index))
        .route("/image/{*name}", get(web::image))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&builder),
            count_request,
        ))
        .layer(axum::Extension(settings.web))
        .with_state(builder);
    let routes = match settings.auth {
        Some(auth) => routes.layer(axum::middleware::from_fn_with_state(auth, check_access)),
        None => routes,
    };
    routes
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(settings.trusted_proxies),
            identify_client,
        ))
        .layer(axum::middleware::from_fn(limit_headers))
        .layer(tower_http::trace::TraceLayer::new_for_http().make_span_with(request_span))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

/// Refuses requests whose headers together are larger than
/// [`MAX_HEADER_BYTES`] with a JSON 431 (hyper itself cuts off far larger
/// ones, without a body).
async fn limit_headers(request: Request, next: Next) -> Response {
    let size: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    if size > MAX_HEADER_BYTES {
        return RegistryError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "UNSUPPORTED",
            format!("request headers are {size} bytes; at most {MAX_HEADER_BYTES} are read"),
        )
        .into_response();
    }
    next.run(request).await
}

/// Tells the handlers which client a request counts against (see the
/// client module).
async fn identify_client(
    State(proxies): State<Arc<TrustedProxies>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    mut request: Request,
    next: Next,
) -> Response {
    let client = proxies.client(peer.ip(), request.headers());
    request.extensions_mut().insert(client);
    next.run(request).await
}

/// Lets a request through when it needs no credentials or shows good ones;
/// else the spec's 401 with a Basic challenge. Health checks stay open, and
/// the web pages and metrics unless they are protected too; an open page
/// asked for without good credentials is marked [`Unverified`], so that it
/// starts nothing.
async fn check_access(State(auth): State<Arc<Auth>>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let health = matches!(path, "/healthz" | "/readyz");
    let open_page = !path.starts_with("/v2") && !auth.protect_web;
    let credentials = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if health {
        return next.run(request).await;
    }
    let verified = auth.allows(credentials);
    if verified || open_page {
        if !verified {
            request.extensions_mut().insert(Unverified);
        }
        return next.run(request).await;
    }
    let mut response = RegistryError::new(
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
        "authentication required: HTTP basic (a user of the registry) or a bearer token",
    )
    .into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"nixery\""),
    );
    headers.insert("Docker-Distribution-API-Version", HeaderValue::from_static(API_VERSION));
    response
}

/// Marks a request that reached an open page without good credentials
/// while access control is on: it may see what is built, and start nothing.
#[derive(Clone, Copy, Debug)]
pub struct Unverified;

/// The span of a request's log lines: its id, method and path.
fn request_span(request: &Request) -> tracing::Span {
    let id = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    tracing::info_span!("request", id, method = %request.method(), uri = %request.uri())
}

/// Counts requests by route and status, and the bytes of manifests and
/// blobs served.
async fn count_request(State(builder): State<Arc<Builder>>, request: Request, next: Next) -> Response {
    let route = route_of(request.uri().path());
    let get = request.method() == Method::GET;
    let response = next.run(request).await;
    let metrics = builder.metrics();
    metrics.request(route, response.status().as_u16());
    let length = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    if let (true, true, Some(length), "manifest" | "blob") = (get, response.status().is_success(), length, route) {
        metrics.served(route, length);
    }
    response
}

/// The route a path belongs to, for metrics.
fn route_of(path: &str) -> &'static str {
    let Some(rest) = path.strip_prefix("/v2") else {
        return match path {
            "/metrics" => "metrics",
            "/healthz" | "/readyz" => "health",
            "/" => "web",
            _ if path.starts_with("/image/") => "web",
            _ => "other",
        };
    };
    match rest {
        "" | "/" => "ping",
        _ if rest.contains("/manifests/") => "manifest",
        _ if rest.contains("/blobs/") => "blob",
        _ if rest.ends_with("/tags/list") => "tags",
        _ if rest.contains("/referrers/") => "referrers",
        _ => "other",
    }
}

async fn metrics(State(builder): State<Arc<Builder>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        builder.metrics().encode(),
    )
        .into_response()
}

/// Ready when storage answers and Nix can reach its store (as probed in
/// the last few seconds).
async fn ready(State(builder): State<Arc<Builder>>) -> Response {
    let crate::builder::Readiness { storage, nix } = builder.readiness().await;
    let problem = |result: Result<(), String>| result.err().map_or(json!("ok"), |e| json!(e));
    let ok = storage.is_ok() && nix.is_ok();
    let body = json!({ "storage": problem(storage), "nix": problem(nix) });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn add_api_version(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert("Docker-Distribution-API-Version", HeaderValue::from_static(API_VERSION));
    response
}

async fn ping(method: Method) -> Response {
    match method {
        Method::GET | Method::HEAD => (
            [(header::CONTENT_TYPE, "application/json")],
            if method == Method::GET { "{}" } else { "" },
        )
            .into_response(),
        _ => RegistryError::unsupported_method().into_response(),
    }
}

/// `/v2/<name>/manifests/<reference>`, `/v2/<name>/blobs/<digest>`,
/// `/v2/<name>/tags/list` and `/v2/<name>/referrers/<digest>`.
async fn registry(
    State(builder): State<Arc<Builder>>,
    Extension(client): Extension<Client>,
    method: Method,
    Path(rest): Path<String>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, RegistryError> {
    if method != Method::GET && method != Method::HEAD {
        return Err(RegistryError::unsupported_method());
    }
    let head = method == Method::HEAD;
    let Some(Route { name, kind, reference }) = Route::parse(&rest) else {
        return Err(RegistryError::unknown_route());
    };
    let query = query.map(|Query(q)| q).ok();
    let response = match (kind, reference) {
        ("manifests", _) => manifest(&builder, &name, reference, &headers, head, client).await,
        ("blobs", _) => blob(&builder, &name, reference, &headers, head).await,
        ("tags", "list") => tags(&builder, &name, query.as_deref(), head).await,
        ("referrers", _) => referrers(&name, reference, query.as_deref().unwrap_or_default(), head),
        _ => Err(RegistryError::unknown_route()),
    }?;
    Ok(not_modified_if_current(&headers, response))
}

/// A 304 without a body in place of a 200 or 206 whose `ETag` the client
/// already has (`If-None-Match`, RFC 9110 §13.1.2; it is evaluated before
/// `Range`, §13.2.2).
fn not_modified_if_current(request: &HeaderMap, response: Response) -> Response {
    let Some(etag) = response.headers().get(header::ETAG).and_then(|v| v.to_str().ok()) else {
        return response;
    };
    let served = matches!(response.status(), StatusCode::OK | StatusCode::PARTIAL_CONTENT);
    if !served || !has_current_etag(request, etag) {
        return response;
    }
    let mut not_modified = Response::new(Body::empty());
    *not_modified.status_mut() = StatusCode::NOT_MODIFIED;
    for name in [
        header::ETAG,
        header::HeaderName::from_static("docker-content-digest"),
        header::CACHE_CONTROL,
        header::VARY,
    ] {
        if let Some(value) = response.headers().get(&name) {
            not_modified.headers_mut().insert(name, value.clone());
        }
    }
    not_modified
}

/// Whether `If-None-Match` names `etag` (or `*`).
fn has_current_etag(request: &HeaderMap, etag: &str) -> bool {
    request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == "*" || tag == etag)
}

/// A path below `/v2/`: `<name>/<kind>/<reference>`, the name being one or
/// more components (`shell/git/manifests/latest`, `a/tags/list`).
#[derive(Debug, PartialEq, Eq)]
pub struct Route<'a> {
    pub name: String,
    pub kind: &'a str,
    pub reference: &'a str,
}

impl<'a> Route<'a> {
    pub fn parse(rest: &'a str) -> Option<Self> {
        let mut parts: Vec<&str> = rest.split('/').collect();
        match (parts.pop(), parts.pop()) {
            (Some(reference), Some(kind)) if !parts.is_empty() => Some(Route {
                name: parts.join("/"),
                kind,
                reference,
            }),
            _ => None,
        }
    }
}

async fn manifest(
    builder: &Arc<Builder>,
    name: &str,
    reference: &str,
    headers: &HeaderMap,
    head: bool,
    client: Client,
) -> Result<Response, RegistryError> {
    reference::validate_name(name)?;
    if reference.contains(':') {
        return manifest_by_digest(builder, reference, head).await;
    }
    if !reference::is_tag(reference) {
        return Err(RegistryError::manifest_unknown(format!(
            "{reference:?} is not a valid tag"
        )));
    }
    let request = ImageRequest::parse(name, reference, builder.meta_packages())?;
    let multi_arch = builder.architectures(&request).len() > 1;
    let choice = negotiate::choose(headers, multi_arch, builder.preferred_format());
    let record = builder
        .resolve(&request, choice, Some(client))
        .await
        .map_err(|e| RegistryError::from_build(&e))?;
    let (record, body) = if head {
        (record.clone(), ManifestBody::Head(record.size))
    } else {
        match builder.storage().read_blob_bytes(&record.digest).await? {
            Some(bytes) => (record, ManifestBody::Get(bytes)),
            None => rebuild(builder, &request, choice, client, &record.digest).await?,
        }
    };
    let mut response = manifest_response(&record.media_type, &record.digest, body);
    // What a tag resolves to depends on the client's Accept header.
    response
        .headers_mut()
        .insert(header::VARY, HeaderValue::from_static("Accept"));
    Ok(response)
}

/// Makes again a manifest or index storage lost (someone removed it):
/// the records that name it are forgotten, so that the index is stored
/// again, or the image built again (its layers checked and packed again).
async fn rebuild(
    builder: &Arc<Builder>,
    request: &ImageRequest,
    choice: negotiate::Choice,
    client: Client,
    missing: &Digest,
) -> Result<(crate::cache::ManifestRecord, ManifestBody), RegistryError> {
    tracing::warn!(image = %request, %missing, "a manifest or index is missing from storage: making it again");
    builder
        .forget_missing(request, choice, missing)
        .await
        .map_err(|e| RegistryError::from_build(&e))?;
    let record = builder
        .resolve(request, choice, Some(client))
        .await
        .map_err(|e| RegistryError::from_build(&e))?;
    let bytes = builder
        .storage()
        .read_blob_bytes(&record.digest)
        .await?
        .ok_or_else(|| RegistryError::internal(format!("manifest {} is missing from storage", record.digest)))?;
    Ok((record, ManifestBody::Get(bytes)))
}

/// A manifest response's body: the bytes, or for HEAD their length only.
enum ManifestBody {
    Get(Bytes),
    Head(u64),
}

async fn manifest_by_digest(builder: &Arc<Builder>, reference: &str, head: bool) -> Result<Response, RegistryError> {
    let unknown = || RegistryError::manifest_unknown(format!("manifest {reference} is not known"));
    let digest = match reference.parse::<Digest>() {
        Ok(digest) => digest,
        Err(DigestError::UnsupportedAlgorithm(_)) => return Err(unknown()),
        Err(e) => return Err(e.into()),
    };
    let storage = builder.storage();
    match storage.blob_size(&digest).await? {
        Some(size) if size <= MAX_MANIFEST_SIZE => {}
        _ => return Err(unknown()),
    }
    let bytes = storage.read_blob_bytes(&digest).await?.ok_or_else(unknown)?;
    let media_type = oci::manifest_media_type(&bytes).ok_or_else(unknown)?;
    let body = if head {
        ManifestBody::Head(bytes.len() as u64)
    } else {
        ManifestBody::Get(bytes)
    };
    Ok(manifest_response(media_type, &digest, body))
}

fn manifest_response(media_type: &str, digest: &Digest, body: ManifestBody) -> Response {
    let (length, body) = match body {
        ManifestBody::Get(bytes) => (bytes.len() as u64, Body::from(bytes)),
        ManifestBody::Head(length) => (length, Body::empty()),
    };
    let headers = [
        (header::CONTENT_TYPE, media_type.to_owned()),
        (header::CONTENT_LENGTH, length.to_string()),
        (
            header::HeaderName::from_static("docker-content-digest"),
            digest.to_string(),
        ),
        (header::ETAG, format!("\"{digest}\"")),
    ];
    (headers, body).into_response()
}

/// `GET /v2/<name>/tags/list[?n=&last=]`: the tags the package source can
/// name, sorted, the page after `last`, at most `n`, with a `Link` to the
/// next page when there is one.
async fn tags(
    builder: &Arc<Builder>,
    name: &str,
    query: Option<&[(String, String)]>,
    head: bool,
) -> Result<Response, RegistryError> {
    reference::validate_name(name)?;
    let query = query.ok_or_else(|| RegistryError::pagination_invalid("the query string cannot be read"))?;
    let limit = match single(query, "n")? {
        Some(n) => Some(
            decimal(n)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| RegistryError::pagination_invalid(format!("n={n:?} is not a number of tags")))?,
        ),
        None => None,
    };
    let last = single(query, "last")?;
    let all = builder.tags().await.map_err(|e| RegistryError::from_build(&e.into()))?;
    let after: Vec<String> = match last {
        Some(last) => all.into_iter().filter(|t| t.as_str() > last).collect(),
        None => all,
    };
    let page: Vec<&String> = after.iter().take(limit.unwrap_or(usize::MAX)).collect();
    let body = json!({ "name": name, "tags": page }).to_string();
    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, body.len());
    if let (Some(n), Some(last)) = (limit, page.last())
        && page.len() < after.len()
    {
        response = response.header(
            header::LINK,
            format!("</v2/{name}/tags/list?n={n}&last={last}>; rel=\"next\""),
        );
    }
    let body = if head { Body::empty() } else { Body::from(body) };
    Ok(response.body(body).expect("headers are valid"))
}

/// The value of `name` in a query, if it is there; given twice, it is an error.
fn single<'q>(query: &'q [(String, String)], name: &str) -> Result<Option<&'q str>, RegistryError> {
    let mut values = query.iter().filter(|(key, _)| key == name).map(|(_, v)| v.as_str());
    let first = values.next();
    match values.next() {
        Some(_) => Err(RegistryError::pagination_invalid(format!(
            "{name} is given more than once"
        ))),
        None => Ok(first),
    }
}

/// A number written in decimal digits only (no sign, no spaces).
fn decimal(text: &str) -> Option<u64> {
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| text.parse().ok()).flatten()
}

/// `GET /v2/<name>/referrers/<digest>`: nothing here refers to anything
/// (images carry no signatures or attestations), so always an empty index.
fn referrers(name: &str, reference: &str, query: &[(String, String)], head: bool) -> Result<Response, RegistryError> {
    reference::validate_name(name)?;
    reference.parse::<Digest>()?;
    let index = oci::empty_index();
    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, oci::OCI_INDEX)
        .header(header::CONTENT_LENGTH, index.bytes.len());
    if query.iter().any(|(key, _)| key == "artifactType") {
        response = response.header("OCI-Filters-Applied", "artifactType");
    }
    let body = if head { Body::empty() } else { Body::from(index.bytes) };
    Ok(response.body(body).expect("headers are valid"))
}

async fn blob(
    builder: &Arc<Builder>,
    name: &str,
    reference: &str,
    headers: &HeaderMap,
    head: bool,
) -> Result<Response, RegistryError> {
    reference::validate_name(name)?;
    let unknown = || RegistryError::blob_unknown(reference);
    let digest = match reference.parse::<Digest>() {
        Ok(digest) => digest,
        Err(DigestError::UnsupportedAlgorithm(_)) => return Err(unknown()),
        Err(e) => return Err(e.into()),
    };
    let storage = builder.storage();
    let Some(size) = storage.blob_size(&digest).await? else {
        if let Err(error) = builder.blob_missing(&digest).await {
            tracing::warn!(%error, "could not look up the images of a missing blob");
        }
        return Err(unknown());
    };
    if !head && let Some(url) = storage.blob_url(&digest).await? {
        return Ok(Response::builder()
            .status(StatusCode::TEMPORARY_REDIRECT)
            .header(header::LOCATION, url)
            .header("Docker-Content-Digest", digest.to_string())
            .body(Body::empty())
            .expect("headers are valid"));
    }
    let etag = format!("\"{digest}\"");
    // A client that has the blob gets a 304, whatever range it asks for.
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(_) if has_current_etag(headers, &etag) => None,
        Some(value) => byte_range(value, size).map_err(|()| RegistryError::range_not_satisfiable(size))?,
        None => None,
    };

    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header("Docker-Content-Digest", digest.to_string())
        .header(header::ETAG, etag)
        .header(header::CACHE_CONTROL, "max-age=31536000");
    let length = match &range {
        Some(r) => {
            response = response
                .status(StatusCode::PARTIAL_CONTENT)
                .header(header::CONTENT_RANGE, format!("bytes {}-{}/{size}", r.start, r.end - 1));
            r.end - r.start
        }
        None => size,
    };
    response = response.header(header::CONTENT_LENGTH, length);
    let body = if head || length == 0 {
        Body::empty()
    } else {
        Body::from_stream(storage.read_blob(&digest, range).await?.ok_or_else(unknown)?)
    };
    Ok(response.body(body).expect("headers are valid"))
}

/// The single byte range a `Range` header asks for, `Ok(None)` to send the
/// whole blob (no usable range: several ranges, another unit, bad syntax,
/// as RFC 9110 allows), `Err` when the range lies outside the blob.
fn byte_range(value: &str, size: u64) -> Result<Option<Range<u64>>, ()> {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (first, last) = (first.trim(), last.trim());
    let parse = |s: &str| decimal(s).ok_or(());
    let range = match (first.is_empty(), last.is_empty()) {
        (true, true) => return Ok(None),
        (true, false) => match parse(last) {
            Ok(0) => return Err(()),
            Ok(n) => size.saturating_sub(n)..size,
            Err(()) => return Ok(None),
        },
        (false, _) => {
            let Ok(start) = parse(first) else {
                return Ok(None);
            };
            let end = if last.is_empty() {
                size
            } else {
                match parse(last) {
                    // A last byte past the end means the end (checked: it may be u64::MAX).
                    Ok(end) if end >= start => end.saturating_add(1).min(size),
                    _ => return Ok(None),
                }
            };
            start..end
        }
    };
    if range.start >= size { Err(()) } else { Ok(Some(range)) }
}

/// The status a failed build answers with, on every route.
pub fn status_of(error: &BuildError) -> StatusCode {
    RegistryError::from_build(error).status
}

/// A registry error: a status and the spec's JSON envelope.
#[derive(Debug)]
pub struct RegistryError {
    status: StatusCode,
    code: &'static str,
    message: String,
    detail: serde_json::Value,
    content_range: Option<String>,
    /// Tell the client when to try again.
    retry_after: bool,
}

impl RegistryError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        RegistryError {
            status,
            code,
            message: message.into(),
            detail: json!(null),
            content_range: None,
            retry_after: false,
        }
    }

    fn unsupported_method() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "this registry serves pulls only",
        )
    }

    fn unknown_route() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
            "this registry does not serve that route",
        )
    }

    fn manifest_unknown(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", message)
    }

    fn blob_unknown(digest: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            format!("blob {digest} is not known"),
        )
    }

    fn pagination_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "PAGINATION_NUMBER_INVALID", message)
    }

    fn range_not_satisfiable(size: u64) -> Self {
        let mut e = Self::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "RANGE_INVALID",
            "the requested range is outside the blob",
        );
        e.content_range = Some(format!("bytes */{size}"));
        e
    }

    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", message)
    }

    /// Storage cannot be reached or failed: worth retrying later.
    fn unavailable(error: &StorageError) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            format!("storage is unavailable: {error}"),
        );
        e.retry_after = true;
        e
    }

    fn from_build(error: &BuildError) -> Self {
        match error {
            BuildError::Nix(NixError::NotFound(packages)) => {
                let mut e = Self::manifest_unknown(format!("Could not find Nix packages: {}", packages.join(", ")));
                e.detail = json!({ "packages": packages });
                e
            }
            BuildError::Nix(NixError::NotAPackage(names)) => {
                let mut e = Self::manifest_unknown(format!(
                    "Not packages but attribute sets: {}; name a package inside them",
                    names.join(", ")
                ));
                e.detail = json!({ "packages": names });
                e
            }
            BuildError::UnknownTag(tag) => Self::manifest_unknown(format!(
                "tag {tag:?} names no revision of the package set (try {LATEST:?})"
            )),
            BuildError::Storage(error) => Self::unavailable(error),
            BuildError::Archive(io) if io.kind() == std::io::ErrorKind::StorageFull => {
                let mut e = Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "UNAVAILABLE",
                    format!("storage is full: {io}"),
                );
                e.retry_after = true;
                e
            }
            BuildError::TooManyPackages { .. } => Self::new(StatusCode::BAD_REQUEST, "NAME_INVALID", error.to_string()),
            BuildError::TooManyBuilds(_) => {
                let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS", error.to_string());
                e.retry_after = true;
                e
            }
            BuildError::Nix(nix @ (NixError::Eval { packages, .. } | NixError::Build { packages, .. })) => {
                let mut e = Self::internal(nix.to_string());
                e.detail = json!({ "packages": packages });
                e
            }
            other => Self::internal(format!("image build failed: {other}")),
        }
    }
}

impl From<NameError> for RegistryError {
    fn from(e: NameError) -> Self {
        match e {
            NameError::InvalidTag(_) => Self::manifest_unknown(e.to_string()),
            NameError::InvalidName(_) | NameError::NameTooLong => {
                Self::new(StatusCode::BAD_REQUEST, "NAME_INVALID", e.to_string())
            }
        }
    }
}

impl From<DigestError> for RegistryError {
    fn from(e: DigestError) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "DIGEST_INVALID", e.to_string())
    }
}

impl From<StorageError> for RegistryError {
    fn from(e: StorageError) -> Self {
        tracing::error!(error = %e, "storage failed");
        Self::unavailable(&e)
    }
}

impl IntoResponse for RegistryError {
    fn into_response(self) -> Response {
        let mut error = json!({ "code": self.code, "message": redact::scrub(&self.message) });
        if !self.detail.is_null() {
            error["detail"] = self.detail;
        }
        let body = json!({ "errors": [error] }).to_string();
        let mut response = (self.status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        if self.status == StatusCode::METHOD_NOT_ALLOWED {
            response
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        }
        if self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
        }
        if let Some(range) = self.content_range {
            response
                .headers_mut()
                .insert(header::CONTENT_RANGE, HeaderValue::from_str(&range).expect("ascii"));
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_for_metrics() {
        for (path, route) in [
            ("/v2/", "ping"),
            ("/v2/shell/hello/manifests/latest", "manifest"),
            ("/v2/a/b/blobs/sha256:00", "blob"),
            ("/v2/a/tags/list", "tags"),
            ("/v2/a/referrers/sha256:00", "referrers"),
            ("/image/shell/git", "web"),
            ("/", "web"),
            ("/readyz", "health"),
            ("/metrics", "metrics"),
            ("/v2/x", "other"),
            ("/favicon.ico", "other"),
        ] {
            assert_eq!(route_of(path), route, "{path}");
        }
    }

    #[test]
    fn byte_ranges() {
        assert_eq!(byte_range("bytes=0-0", 10), Ok(Some(0..1)));
        assert_eq!(byte_range("bytes=2-5", 10), Ok(Some(2..6)));
        assert_eq!(byte_range("bytes=5-", 10), Ok(Some(5..10)));
        assert_eq!(byte_range("bytes=5-100", 10), Ok(Some(5..10)));
        assert_eq!(byte_range("bytes=-3", 10), Ok(Some(7..10)));
        assert_eq!(byte_range("bytes=-30", 10), Ok(Some(0..10)));
        assert_eq!(byte_range("bytes=10-", 10), Err(()));
        assert_eq!(byte_range("bytes=-0", 10), Err(()));
        assert_eq!(byte_range("bytes=0-", 0), Err(()));
        assert_eq!(
            byte_range("bytes=0-18446744073709551615", 1_114_427),
            Ok(Some(0..1_114_427)),
            "a last byte past the end, however far, is the end"
        );
        for ignored in [
            "items=0-1",
            "bytes=0-1,3-4",
            "bytes=5-2",
            "bytes=x-1",
            "bytes=-",
            "bytes",
            "bytes=+1-2",
            "bytes=-+5",
            "bytes=1-+2",
            "bytes=0-18446744073709551616",
        ] {
            assert_eq!(byte_range(ignored, 10), Ok(None), "{ignored}");
        }
    }
}
