//! HTTP details the registry routes share: byte ranges (RFC 9110 §14),
//! conditional requests (`If-None-Match`, §13.1.2, evaluated before
//! `Range`, §13.2.2), and the names of the headers the distribution spec
//! adds, spelled once.

use std::ops::Range;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::Response;

use crate::digest::Digest;

/// The digest of the manifest or blob a response carries.
pub const DOCKER_CONTENT_DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
/// Which registry API a `/v2/` response speaks.
pub const API_VERSION: HeaderName = HeaderName::from_static("docker-distribution-api-version");
pub const API_VERSION_VALUE: HeaderValue = HeaderValue::from_static("registry/2.0");
/// The referrers filters a referrers list applied.
pub const OCI_FILTERS_APPLIED: HeaderName = HeaderName::from_static("oci-filters-applied");

/// The strong `ETag` of content addressed by `digest`.
pub fn etag(digest: &Digest) -> String {
    let mut etag = String::with_capacity(digest.as_str().len() + 2);
    for part in ["\"", digest.as_str(), "\""] {
        etag.push_str(part);
    }
    etag
}

/// [`etag`] as a header value.
pub fn etag_value(digest: &Digest) -> HeaderValue {
    HeaderValue::try_from(etag(digest)).expect("a quoted digest is a header value")
}

/// A `Docker-Content-Digest` value.
pub fn digest_value(digest: &Digest) -> HeaderValue {
    HeaderValue::from_str(digest.as_str()).expect("a digest is a header value")
}

/// A 304 without a body in place of a 200 or 206 whose `ETag` the client
/// already has.
pub fn not_modified_if_current(request: &HeaderMap, response: Response) -> Response {
    let Some(etag) = response.headers().get(header::ETAG).and_then(|v| v.to_str().ok()) else {
        return response;
    };
    let served = matches!(response.status(), StatusCode::OK | StatusCode::PARTIAL_CONTENT);
    if !served || !has_current_etag(request, etag) {
        return response;
    }
    let mut not_modified = Response::new(Body::empty());
    *not_modified.status_mut() = StatusCode::NOT_MODIFIED;
    for name in [header::ETAG, DOCKER_CONTENT_DIGEST, header::CACHE_CONTROL, header::VARY] {
        if let Some(value) = response.headers().get(&name) {
            not_modified.headers_mut().insert(name, value.clone());
        }
    }
    not_modified
}

/// Whether `If-None-Match` names `etag` (or `*`).
pub fn has_current_etag(request: &HeaderMap, etag: &str) -> bool {
    request
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|tag| tag.trim().trim_start_matches("W/"))
        .any(|tag| tag == "*" || tag == etag)
}

/// A number written in decimal digits only (no sign, no spaces).
pub fn decimal(text: &str) -> Option<u64> {
    let digits = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    digits.then(|| text.parse().ok()).flatten()
}

/// The single byte range a `Range` header asks for, `Ok(None)` to send the
/// whole blob (no usable range: several ranges, another unit, bad syntax,
/// as RFC 9110 allows), `Err` when the range lies outside the blob.
pub fn byte_range(value: &str, size: u64) -> Result<Option<Range<u64>>, ()> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
