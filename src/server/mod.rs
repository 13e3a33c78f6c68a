//! The HTTP side: the router and the middleware every request passes.
//! The registry's read API is in `registry.rs`, its errors in `error.rs`,
//! ranges and conditional requests in `http.rs`; the web pages (`web`) at
//! `/` and `/image/<name>` are mounted here too, with `/metrics`,
//! `/healthz` and `/readyz`. Each request gets an id (`x-request-id`) that
//! its log lines, and those of a build it starts, carry; it is identified
//! as a client (for build shares), checked against access control, and
//! counted by route and status.

mod error;
mod http;
mod registry;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use serde_json::json;

pub use error::RegistryError;
pub use registry::Route;

use crate::app::AppState;
use crate::auth::Auth;
use crate::client::TrustedProxies;

/// Most bytes of request headers a request may carry.
const MAX_HEADER_BYTES: usize = 16 * 1024;

/// The registry's routes, with `pages` (the web pages' routes) among them;
/// clients are told apart by their address, or behind `trusted_proxies` by
/// the address those forward for.
pub fn router(state: AppState, trusted_proxies: TrustedProxies, pages: Router<AppState>) -> Router {
    use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
    let routes = Router::new()
        .route("/v2", any(ping))
        .route("/v2/", any(ping))
        .route("/v2/{*rest}", any(registry::registry))
        .merge(pages)
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .layer(axum::middleware::from_fn_with_state(state.clone(), count_request));
    let routes = match &state.auth {
        Some(auth) => routes.layer(axum::middleware::from_fn_with_state(Arc::clone(auth), check_access)),
        None => routes,
    };
    routes
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(trusted_proxies),
            identify_client,
        ))
        .layer(axum::middleware::from_fn(limit_headers))
        .layer(axum::middleware::from_fn(add_api_version))
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
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"nixery\""),
    );
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
async fn count_request(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = route_of(request.uri().path());
    let get = request.method() == Method::GET;
    let response = next.run(request).await;
    state.metrics.request(route, response.status().as_u16());
    let length = response
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    if let (true, true, Some(length), "manifest" | "blob") = (get, response.status().is_success(), length, route) {
        state.metrics.served(route, length);
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

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.encode(),
    )
        .into_response()
}

/// Ready when storage answers and Nix can reach its store (as probed in
/// the last few seconds).
async fn ready(State(state): State<AppState>) -> Response {
    let crate::builder::Readiness { storage, nix } = state.builder.readiness().await;
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

/// Every response to a `/v2` path says which API it speaks, errors of the
/// middleware (a 401, a 431) included.
async fn add_api_version(request: Request, next: Next) -> Response {
    let api = request.uri().path().starts_with("/v2");
    let mut response = next.run(request).await;
    if api {
        response
            .headers_mut()
            .insert(http::API_VERSION, http::API_VERSION_VALUE);
    }
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

#[cfg(test)]
pub(crate) mod tests;
