//! The registry's read API below `/v2/`: manifests by tag (built on
//! demand, in the format the client's `Accept` asks for) and by digest,
//! blobs (whole, by range, or redirected to a bucket's signed URL),
//! tags/list with pagination, and referrers. GET and HEAD answer alike but
//! for the body; anything else is refused.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use serde_json::json;

use super::error::RegistryError;
use super::http::{self, DOCKER_CONTENT_DIGEST, OCI_FILTERS_APPLIED};
use crate::app::AppState;
use crate::builder::{Question, Resolution, Want};
use crate::client::Client;
use crate::digest::{Digest, DigestError};
use crate::image::ImageRequest;
use crate::negotiate;
use crate::oci;
use crate::reference;
use crate::signing;

/// Larger blobs are never manifests; they are not read to find out.
const MAX_MANIFEST_SIZE: u64 = 4 * 1024 * 1024;

/// `/v2/<name>/manifests/<reference>`, `/v2/<name>/blobs/<digest>`,
/// `/v2/<name>/tags/list` and `/v2/<name>/referrers/<digest>`.
pub async fn registry(
    State(state): State<Arc<AppState>>,
    Extension(client): Extension<Client>,
    Path(rest): Path<String>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    request: Request,
) -> Result<Response, RegistryError> {
    let (method, headers) = (request.method(), request.headers());
    if method != Method::GET && method != Method::HEAD {
        return Err(RegistryError::unsupported_method());
    }
    let head = method == Method::HEAD;
    let Some(Route { name, kind, reference }) = Route::parse(&rest) else {
        return Err(RegistryError::unknown_route());
    };
    let query = query.map(|Query(q)| q).ok();
    let response = match (kind, reference) {
        ("manifests", _) => manifest(&state, name, reference, headers, head, client).await,
        ("blobs", _) => blob(&state, name, reference, headers, head).await,
        ("tags", "list") => tags(&state, name, query.as_deref(), head).await,
        ("referrers", _) => {
            let query = query.as_deref().unwrap_or_default();
            referrers(&state, name, reference, query, head).await
        }
        _ => Err(RegistryError::unknown_route()),
    }?;
    Ok(http::not_modified_if_current(headers, response))
}

/// A path below `/v2/`: `<name>/<kind>/<reference>`, the name being one or
/// more components (`shell/git/manifests/latest`, `a/tags/list`).
#[derive(Debug, PartialEq, Eq)]
pub struct Route<'a> {
    pub name: &'a str,
    pub kind: &'a str,
    pub reference: &'a str,
}

impl<'a> Route<'a> {
    pub fn parse(rest: &'a str) -> Option<Self> {
        let (rest, reference) = rest.rsplit_once('/')?;
        let (name, kind) = rest.rsplit_once('/')?;
        Some(Route { name, kind, reference })
    }
}

async fn manifest(
    state: &AppState,
    name: &str,
    reference: &str,
    headers: &HeaderMap,
    head: bool,
    client: Client,
) -> Result<Response, RegistryError> {
    if reference.contains(':') {
        reference::validate_name(name)?;
        return manifest_by_digest(state, reference, head).await;
    }
    if !reference::is_tag(reference) {
        reference::validate_name(name)?;
        return Err(RegistryError::manifest_unknown(format!(
            "{reference:?} is not a valid tag"
        )));
    }
    if let Some(subject) = referrers_tag(reference) {
        reference::validate_name(name)?;
        return referrers_by_tag(state, name, &subject, head).await;
    }
    if let Some(subject) = signing::signature_tag(reference) {
        reference::validate_name(name)?;
        return signature_by_tag(state, name, &subject, head).await;
    }
    let builder = &state.builder;
    let accept = headers.get_all(header::ACCEPT).iter().map(HeaderValue::as_bytes);
    let question = Question::new(name, reference, accept);
    let want = if head { Want::Presence } else { Want::Bytes };
    let resolution = match builder.recall(&question, reference, want).await {
        Some(found) => found,
        None => {
            // Checks the name too.
            let request = ImageRequest::parse(name, reference, &state.meta_packages)?;
            let multi_arch = builder.architectures(&request).len() > 1;
            let choice = negotiate::choose(headers, multi_arch, builder.preferred_format());
            (builder.fetch(&request, choice, Some(client), Some(&question), want)).await?
        }
    };
    let Resolution {
        record,
        manifests,
        bytes,
    } = resolution;
    if let Some(signing) = &state.signing {
        signing.note_resolved(name, std::iter::once(&record.digest).chain(&manifests));
    }
    let body = match bytes {
        Some(bytes) => ManifestBody::Get(bytes),
        None => ManifestBody::Head(record.size),
    };
    let mut response = manifest_response(&record.media_type, &record.digest, body);
    // What a tag resolves to depends on the client's Accept header.
    response
        .headers_mut()
        .insert(header::VARY, HeaderValue::from_static("Accept"));
    Ok(response)
}

/// A manifest response's body: the bytes, or for HEAD their length only.
enum ManifestBody {
    Get(Bytes),
    Head(u64),
}

async fn manifest_by_digest(state: &AppState, reference: &str, head: bool) -> Result<Response, RegistryError> {
    let unknown = || RegistryError::manifest_unknown(format!("manifest {reference} is not known"));
    let digest = match reference.parse::<Digest>() {
        Ok(digest) => digest,
        Err(DigestError::UnsupportedAlgorithm(_)) => return Err(unknown()),
        Err(e) => return Err(e.into()),
    };
    let stored = (state.storage)
        .read_document(&digest, MAX_MANIFEST_SIZE, is_manifest)
        .await?;
    // Not stored: perhaps a signature, signed lately.
    let signed = || state.signing.as_ref().and_then(|s| s.documents.get(digest.hex()));
    let Some(bytes) = stored.or_else(signed) else {
        // Perhaps a collection deleted it: what memory answers with it goes.
        state.builder.document_missing(&digest).await;
        return Err(unknown());
    };
    let media_type = oci::manifest_media_type(&bytes).ok_or_else(unknown)?;
    let body = if head {
        ManifestBody::Head(bytes.len() as u64)
    } else {
        ManifestBody::Get(bytes)
    };
    Ok(manifest_response(media_type, &digest, body))
}

/// Whether `bytes` are a manifest or index (and so worth keeping in memory).
fn is_manifest(bytes: &[u8]) -> bool {
    oci::manifest_media_type(bytes).is_some()
}

/// A manifest made for this request (of `media_type`) as the response.
fn made_manifest_response(media_type: &str, manifest: oci::Document, head: bool) -> Response {
    let body = match head {
        true => ManifestBody::Head(manifest.bytes.len() as u64),
        false => ManifestBody::Get(Bytes::from(manifest.bytes)),
    };
    manifest_response(media_type, &manifest.digest, body)
}

fn manifest_response(media_type: &str, digest: &Digest, body: ManifestBody) -> Response {
    let (length, body) = match body {
        ManifestBody::Get(bytes) => (bytes.len() as u64, Body::from(bytes)),
        ManifestBody::Head(length) => (length, Body::empty()),
    };
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    // Room for these, `Vary` and the frame's two, without growing.
    headers.reserve(8);
    if let Ok(media_type) = HeaderValue::from_str(media_type) {
        headers.insert(header::CONTENT_TYPE, media_type);
    }
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    headers.insert(DOCKER_CONTENT_DIGEST, http::digest_value(digest));
    headers.insert(header::ETAG, http::etag_value(digest));
    response
}

/// `GET /v2/<name>/tags/list[?n=&last=]`: the tags the package source can
/// name, sorted, the page after `last`, at most `n`, with a `Link` to the
/// next page when there is one.
async fn tags(
    state: &AppState,
    name: &str,
    query: Option<&[(String, String)]>,
    head: bool,
) -> Result<Response, RegistryError> {
    reference::validate_name(name)?;
    let query = query.ok_or_else(|| RegistryError::pagination_invalid("the query string cannot be read"))?;
    let limit = match single(query, "n")? {
        Some(n) => Some(
            http::decimal(n)
                .and_then(|n| usize::try_from(n).ok())
                .ok_or_else(|| RegistryError::pagination_invalid(format!("n={n:?} is not a number of tags")))?,
        ),
        None => None,
    };
    let last = single(query, "last")?;
    let all = state.source.tags().await?;
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

/// `GET /v2/<name>/referrers/<digest>[?artifactType=]`: the SBOMs,
/// provenance and signature of a manifest built here (an empty index for
/// any other), from their record; nothing is built.
async fn referrers(
    state: &AppState,
    name: &str,
    reference: &str,
    query: &[(String, String)],
    head: bool,
) -> Result<Response, RegistryError> {
    reference::validate_name(name)?;
    let subject = reference.parse::<Digest>()?;
    let wanted = single(query, "artifactType")?;
    let mut referrers = referrers_of(state, name, &subject).await?;
    if let Some(wanted) = wanted {
        referrers.retain(|r| r.artifact_type == wanted);
    }
    let index = oci::referrers_index(&referrers);
    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, oci::OCI_INDEX)
        .header(header::CONTENT_LENGTH, index.bytes.len());
    if wanted.is_some() {
        response = response.header(OCI_FILTERS_APPLIED, "artifactType");
    }
    let body = if head { Body::empty() } else { Body::from(index.bytes) };
    Ok(response.body(body).expect("headers are valid"))
}

/// The subject a tag of the referrers tag scheme (`sha256-<hex>`) names,
/// for clients without the referrers API.
fn referrers_tag(tag: &str) -> Option<Digest> {
    let hex = tag.strip_prefix("sha256-")?;
    format!("sha256:{hex}").parse().ok()
}

/// `GET /v2/<name>/manifests/sha256-<hex>.sig`: the signature of a
/// manifest or index stored here. Unknown without a key, and for anything
/// that is not a manifest stored here.
async fn signature_by_tag(
    state: &AppState,
    name: &str,
    subject: &Digest,
    head: bool,
) -> Result<Response, RegistryError> {
    let unknown = || RegistryError::manifest_unknown(format!("no signature of {subject} here"));
    let manifest = signature(state, name, subject).await?.ok_or_else(unknown)?;
    Ok(made_manifest_response(oci::OCI_MANIFEST, manifest, head))
}

/// The signature manifest of `subject` (a manifest or index stored here),
/// naming the image as `<identity>/<name>`, if a tag of `name` resolved to
/// `subject` here lately (or to an index that names it). Made once per
/// name and subject while it is kept, with its payload, for the GETs by
/// digest that follow; kept in memory only. `None` without a key, or for
/// any other name or subject.
async fn signature(state: &AppState, name: &str, subject: &Digest) -> Result<Option<oci::Document>, RegistryError> {
    let Some(signing) = &state.signing else {
        return Ok(None);
    };
    // Only what a tag of this name resolved to here: a name that never
    // did costs nothing, and no other name is bound to the manifest.
    if !signing.was_resolved(name, subject) {
        return Ok(None);
    }
    let reference = format!("{}/{name}", signing.identity);
    let key = format!("{reference}@{subject}");
    if let Some(manifest) = signing.signatures.get(&key) {
        return Ok(Some(manifest));
    }
    let Some(bytes) = (state.storage)
        .read_document(subject, MAX_MANIFEST_SIZE, is_manifest)
        .await?
    else {
        return Ok(None);
    };
    let Some(media_type) = oci::manifest_media_type(&bytes) else {
        return Ok(None);
    };
    let target = oci::Subject {
        media_type,
        digest: subject,
        size: bytes.len() as u64,
    };
    let payload = oci::Document::new(signing::payload(&reference, subject));
    let signature = signing.signer.sign(&payload.bytes);
    let manifest =
        oci::signature_manifest(&payload, &signature, &target).map_err(|e| RegistryError::internal(e.to_string()))?;
    for document in [&payload, &manifest] {
        let bytes = Bytes::from(document.bytes.clone());
        signing.documents.insert(document.digest.hex().to_owned(), bytes);
    }
    signing.signatures.insert(key, manifest.clone());
    Ok(Some(manifest))
}

/// The referrers of `subject`: its documents, from their record, and its
/// signature when there is one.
async fn referrers_of(state: &AppState, name: &str, subject: &Digest) -> Result<Vec<oci::Referrer>, RegistryError> {
    let mut referrers = state.builder.referrers(subject).await?;
    if let Some(manifest) = signature(state, name, subject).await? {
        referrers.push(oci::Referrer {
            size: manifest.bytes.len() as u64,
            digest: manifest.digest,
            artifact_type: signing::SIGNATURE_ARTIFACT.to_owned(),
        });
    }
    Ok(referrers)
}

/// A signature's payload, signed lately here, as a blob.
fn signature_payload(digest: &Digest, payload: Bytes, head: bool) -> Response {
    let response = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, payload.len())
        .header(DOCKER_CONTENT_DIGEST, digest.to_string())
        .header(header::ETAG, http::etag(digest));
    let body = if head { Body::empty() } else { Body::from(payload) };
    response.body(body).expect("headers are valid")
}

/// `GET /v2/<name>/manifests/sha256-<hex>`: the referrers index, as a manifest.
async fn referrers_by_tag(
    state: &AppState,
    name: &str,
    subject: &Digest,
    head: bool,
) -> Result<Response, RegistryError> {
    let index = oci::referrers_index(&referrers_of(state, name, subject).await?);
    Ok(made_manifest_response(oci::OCI_INDEX, index, head))
}

async fn blob(
    state: &AppState,
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
    let storage = &state.storage;
    let Some(blob) = storage.open_blob(&digest).await? else {
        // Not stored: perhaps a signature's payload, signed lately.
        if let Some(payload) = state.signing.as_ref().and_then(|s| s.documents.get(digest.hex())) {
            return Ok(signature_payload(&digest, payload, head));
        }
        if let Err(error) = state.builder.blob_missing(&digest).await {
            tracing::warn!(%error, "could not look up the images of a missing blob");
        }
        return Err(unknown());
    };
    let size = blob.size();
    if !head && let Some(url) = storage.blob_url(&digest).await? {
        return Ok(Response::builder()
            .status(StatusCode::TEMPORARY_REDIRECT)
            .header(header::LOCATION, url)
            .header(DOCKER_CONTENT_DIGEST, digest.to_string())
            .body(Body::empty())
            .expect("headers are valid"));
    }
    let etag = http::etag(&digest);
    // A client that has the blob gets a 304, whatever range it asks for.
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(_) if http::has_current_etag(headers, &etag) => None,
        Some(value) => http::byte_range(value, size).map_err(|()| RegistryError::range_not_satisfiable(size))?,
        None => None,
    };

    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(DOCKER_CONTENT_DIGEST, digest.to_string())
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
        Body::from_stream(blob.stream(range).await?.ok_or_else(unknown)?)
    };
    Ok(response.body(body).expect("headers are valid"))
}
