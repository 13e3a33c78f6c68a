//! What every request passes through, in one function: its id
//! (`x-request-id`, kept when a proxy set one) and the log span that
//! carries it, its client (for build shares), the limit on its headers, the
//! API version on `/v2` answers, and its count by route and status, with
//! the bytes of manifests and blobs served.
//!
//! One function around the router rather than a tower layer for each (or
//! an axum middleware, which boxes and clones the routes it wraps for every
//! request): a pull of a cached manifest does little else, and each layer
//! cost it allocations and moves. Server errors, and bodies that fail while
//! streaming, are logged at the default level inside the span, so they
//! carry the request id; other answers are logged at debug.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body::Body as _;
use tower::ServiceExt;
use tracing::Instrument;

use super::error::RegistryError;
use super::http;
use crate::client::TrustedProxies;
use crate::metrics::Metrics;

/// Most bytes of request headers a request may carry.
const MAX_HEADER_BYTES: usize = 16 * 1024;
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What the frame needs.
pub struct Frame {
    pub metrics: Arc<Metrics>,
    /// Whose forwarding headers say who the client is.
    pub proxies: TrustedProxies,
    pub ids: RequestIds,
}

/// Request ids: UUID-shaped, a random number drawn at start followed by a
/// count, so they differ across requests and restarts without asking the
/// kernel for randomness each time.
pub struct RequestIds {
    start: u64,
    count: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let start = std::collections::hash_map::RandomState::new().build_hasher().finish();
        RequestIds {
            start,
            count: AtomicU64::new(0),
        }
    }
}

impl RequestIds {
    pub fn next(&self) -> HeaderValue {
        let n = self.count.fetch_add(1, Ordering::Relaxed);
        // 32 hex digits, dashed as a UUID is: 8-4-4-4-12.
        let digits = u128::from(self.start) << 64 | u128::from(n);
        let mut id = [b'-'; 36];
        let places = (0..36).filter(|i| ![8, 13, 18, 23].contains(i));
        for (shift, place) in (0..32).rev().zip(places) {
            id[place] = b"0123456789abcdef"[(digits >> (shift * 4)) as usize & 0xf];
        }
        HeaderValue::from_bytes(&id).expect("hex digits and dashes are a header value")
    }
}

/// A request from `peer` through the frame (see the module's comment) to
/// `routes`.
pub async fn frame(frame: &Frame, peer: SocketAddr, mut request: Request, routes: Router) -> Response {
    let id = match request.headers().get(REQUEST_ID) {
        Some(given) => given.clone(),
        None => {
            let id = frame.ids.next();
            request.headers_mut().insert(REQUEST_ID, id.clone());
            id
        }
    };
    // The id alone: fields are formatted when the span is made, for every
    // request; the method and path go on the lines that are logged.
    let span = tracing::info_span!("request", id = %id.to_str().unwrap_or("-"));
    let asked = (request.method().clone(), request.uri().clone());
    let started = Instant::now();
    let path = request.uri().path();
    let (route, api) = (route_of(path), path.starts_with("/v2"));
    let get = request.method() == Method::GET;
    let mut response = match oversized(&request) {
        Some(refused) => refused,
        None => {
            let client = frame.proxies.client(peer.ip(), request.headers());
            request.extensions_mut().insert(client);
            let answered = routes.oneshot(request).instrument(span.clone()).await;
            answered.unwrap_or_else(|never| match never {})
        }
    };
    let status = response.status();
    log(&span, &asked, status, started);
    frame.metrics.request(route, status.as_u16());
    if let (true, true, "manifest" | "blob") = (get, status.is_success(), route)
        && let Some(length) = content_length(&response)
    {
        frame.metrics.served(route, length);
    }
    let headers = response.headers_mut();
    headers.insert(REQUEST_ID, id);
    if api {
        headers.insert(http::API_VERSION, http::API_VERSION_VALUE);
    }
    if response.body().is_end_stream() || response.body().size_hint().exact().is_some() {
        return response;
    }
    response.map(|body| Body::new(Logged { body, span }))
}

fn log(span: &tracing::Span, (method, uri): &(Method, axum::http::Uri), status: StatusCode, started: Instant) {
    let latency_ms = started.elapsed().as_secs_f64() * 1000.0;
    let status = status.as_u16();
    if status >= 500 {
        tracing::error!(parent: span, %method, %uri, status, latency_ms, "answered with a server error");
    } else {
        tracing::debug!(parent: span, %method, %uri, status, latency_ms, "answered");
    }
}

fn content_length(response: &Response) -> Option<u64> {
    let length = response.headers().get(header::CONTENT_LENGTH)?;
    length.to_str().ok()?.parse().ok()
}

/// A JSON 431 for requests whose headers together are larger than
/// [`MAX_HEADER_BYTES`] (hyper itself cuts off far larger ones, without a
/// body).
fn oversized(request: &Request) -> Option<Response> {
    let size: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum();
    (size > MAX_HEADER_BYTES).then(|| {
        RegistryError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "UNSUPPORTED",
            format!("request headers are {size} bytes; at most {MAX_HEADER_BYTES} are read"),
        )
        .into_response()
    })
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

/// A streamed body whose failure is logged in its request's span.
struct Logged {
    body: Body,
    span: tracing::Span,
}

impl http_body::Body for Logged {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Err(error))) = &polled {
            tracing::error!(parent: &self.span, %error, "a response body failed while streaming");
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_uuid_shaped_and_differ() {
        let ids = RequestIds::default();
        let (a, b) = (ids.next(), ids.next());
        assert_ne!(a, b);
        let a = a.to_str().unwrap();
        let groups: Vec<usize> = a.split('-').map(str::len).collect();
        assert_eq!(groups, [8, 4, 4, 4, 12], "{a}");
        assert!(a.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()));
        assert_ne!(
            a[..18],
            RequestIds::default().next().to_str().unwrap()[..18],
            "another start, another prefix"
        );
    }

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
}
