//! The HTTP side: the router and access control. The registry's read API
//! is in `registry.rs`, its errors in `error.rs`, ranges and conditional
//! requests in `http.rs`, and what every request passes first (its id and
//! log span, its client, its count) in `frame.rs`; the web pages (`web`)
//! at `/` and `/image/<name>` are mounted here too, with `/metrics`,
//! `/healthz` and `/readyz`.

mod error;
mod frame;
mod http;
mod registry;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
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
use crate::listen;

/// The registry's routes, with `pages` (the web pages' routes) among them,
/// behind the frame every request passes (`frame.rs`); clients are told
/// apart by their address, or behind `trusted_proxies` by the address those
/// forward for.
pub fn router(state: AppState, trusted_proxies: TrustedProxies, pages: Router<Arc<AppState>>) -> Registry {
    let frame = Arc::new(frame::Frame {
        metrics: Arc::clone(&state.metrics),
        proxies: trusted_proxies,
        ids: frame::RequestIds::default(),
    });
    let routes = Router::new()
        .route("/v2", any(ping))
        .route("/v2/", any(ping))
        .route("/v2/{*rest}", any(registry::registry))
        .merge(pages)
        .route("/metrics", get(metrics))
        .route(PUBLIC_KEY_PATH, get(public_key))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready));
    let routes = match &state.auth {
        Some(auth) => routes.layer(axum::middleware::from_fn_with_state(Arc::clone(auth), check_access)),
        None => routes,
    };
    Registry {
        routes: routes.with_state(Arc::new(state)),
        frame,
    }
}

/// Where the public key that verifies the registry's signatures is served.
pub const PUBLIC_KEY_PATH: &str = "/signing-key.pub";

/// `GET /signing-key.pub`: the public key (PEM) that verifies the
/// signatures, for `policy.json`'s `keyPath`; unknown when nothing is signed.
async fn public_key(State(state): State<Arc<AppState>>) -> Result<Response, RegistryError> {
    let signing = state.signing.as_ref().ok_or_else(RegistryError::unknown_route)?;
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-pem-file")
        .body(axum::body::Body::from(signing.signer.public_pem().to_owned()))
        .expect("headers are valid"))
}

/// The registry as the listener serves it.
#[derive(Clone)]
pub struct Registry {
    routes: Router,
    frame: Arc<frame::Frame>,
}

impl listen::App for Registry {
    async fn answer(&self, request: Request, peer: SocketAddr) -> Response {
        frame::frame(&self.frame, peer, request, self.routes.clone()).await
    }
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

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.encode(),
    )
        .into_response()
}

/// Ready when storage answers and Nix can reach its store (as probed in
/// the last few seconds).
async fn ready(State(state): State<Arc<AppState>>) -> Response {
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
