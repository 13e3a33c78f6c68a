//! The registry's errors as clients see them: a status, the
//! distribution spec's JSON envelope (`{"errors": [{"code", "message",
//! "detail"}]}`, messages without secrets), `Retry-After` where trying
//! again later helps, and the one mapping from every domain error (name,
//! digest, storage, build) to them. The web pages take their statuses from
//! [`RegistryError::kind`] too.

use std::sync::Arc;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::builder::BuildError;
use crate::digest::DigestError;
use crate::nix::NixError;
use crate::redact;
use crate::reference::NameError;
use crate::source::{LATEST, SourceError};
use crate::storage::StorageError;

/// Seconds a client should wait after storage was unavailable, or after
/// its share of builds was used up.
const RETRY_AFTER_SECONDS: u64 = 5;

/// A registry error: a status and the spec's JSON envelope.
#[derive(Debug)]
pub struct RegistryError {
    status: StatusCode,
    code: &'static str,
    message: String,
    detail: serde_json::Value,
    content_range: Option<String>,
    /// Seconds after which the client should try again.
    retry_after: Option<u64>,
}

impl RegistryError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        RegistryError {
            status,
            code,
            message: message.into(),
            detail: json!(null),
            content_range: None,
            retry_after: None,
        }
    }

    pub fn unsupported_method() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "UNSUPPORTED",
            "this registry serves pulls only",
        )
    }

    pub fn unknown_route() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "UNSUPPORTED",
            "this registry does not serve that route",
        )
    }

    pub fn manifest_unknown(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN", message)
    }

    pub fn blob_unknown(digest: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "BLOB_UNKNOWN",
            format!("blob {digest} is not known"),
        )
    }

    pub fn pagination_invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "PAGINATION_NUMBER_INVALID", message)
    }

    pub fn range_not_satisfiable(size: u64) -> Self {
        let mut e = Self::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            "RANGE_INVALID",
            "the requested range is outside the blob",
        );
        e.content_range = Some(format!("bytes */{size}"));
        e
    }

    pub(super) fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "UNKNOWN", message)
    }

    /// Storage cannot be reached or failed: worth retrying later.
    fn unavailable(error: &StorageError) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            format!("storage is unavailable: {error}"),
        );
        e.retry_after = Some(RETRY_AFTER_SECONDS);
        e
    }

    /// The status and code clients see, for the web pages' statuses.
    pub fn kind(&self) -> (StatusCode, &'static str) {
        (self.status, self.code)
    }
}

/// The one mapping from a failed build (or lookup) to what clients see.
impl From<&BuildError> for RegistryError {
    fn from(error: &BuildError) -> Self {
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
                e.retry_after = Some(RETRY_AFTER_SECONDS);
                e
            }
            BuildError::TooManyPackages { .. } => Self::new(StatusCode::BAD_REQUEST, "NAME_INVALID", error.to_string()),
            BuildError::TooManyBuilds(_) => {
                let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS", error.to_string());
                e.retry_after = Some(RETRY_AFTER_SECONDS);
                e
            }
            BuildError::TooManyNewImages { retry_after_secs, .. } => {
                let mut e = Self::new(StatusCode::TOO_MANY_REQUESTS, "TOOMANYREQUESTS", error.to_string());
                e.retry_after = Some(*retry_after_secs);
                e
            }
            BuildError::Nix(nix @ (NixError::Eval { packages, .. } | NixError::Build { packages, .. })) => {
                let mut e = Self::internal(nix.to_string());
                e.detail = json!({ "packages": packages });
                e
            }
            BuildError::Lost(_) => Self::internal(error.to_string()),
            other => Self::internal(format!("image build failed: {other}")),
        }
    }
}

impl From<Arc<BuildError>> for RegistryError {
    fn from(error: Arc<BuildError>) -> Self {
        Self::from(error.as_ref())
    }
}

impl From<SourceError> for RegistryError {
    fn from(error: SourceError) -> Self {
        Self::from(&BuildError::Source(error))
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
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(range) = self.content_range {
            response
                .headers_mut()
                .insert(header::CONTENT_RANGE, HeaderValue::from_str(&range).expect("ascii"));
        }
        response
    }
}
