//! Writes to a GCS bucket through its JSON API: small puts, streamed
//! uploads of staged files, copies (rewrites) and deletes. Reads, listing
//! and URL signing go through object_store's GCS client, whose writes use
//! the XML API; the JSON API is GCS's main one and the one emulators such as
//! fake-gcs-server implement. Requests carry the bearer token of
//! object_store's credentials (service account, application default or
//! metadata server).

use std::time::Duration;

use bytes::Bytes;
use object_store::gcp::GcpCredentialProvider;
use object_store::path::Path as StorePath;
use reqwest::{Body, Method, StatusCode, Url};

const STORE: &str = "GCS";
const GOOGLE: &str = "https://storage.googleapis.com";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The JSON API of one bucket.
#[derive(Debug)]
pub struct JsonWrites {
    http: reqwest::Client,
    base: Url,
    bucket: String,
    credentials: GcpCredentialProvider,
}

impl JsonWrites {
    pub fn new(
        endpoint: Option<&str>,
        bucket: &str,
        credentials: GcpCredentialProvider,
    ) -> Result<Self, object_store::Error> {
        let base = Url::parse(endpoint.unwrap_or(GOOGLE)).map_err(generic)?;
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .build()
            .map_err(generic)?;
        Ok(JsonWrites {
            http,
            base,
            bucket: bucket.to_owned(),
            credentials,
        })
    }

    /// Puts `bytes` at `path`; with `if_absent`, only if nothing is there
    /// (`AlreadyExists` otherwise). A conditional put is a multipart upload:
    /// GCS keeps `ifGenerationMatch=0` on every upload type, but
    /// fake-gcs-server only on that one.
    pub async fn put(&self, path: &StorePath, bytes: Bytes, if_absent: bool) -> Result<(), object_store::Error> {
        if !if_absent {
            return self.upload(path, Body::from(bytes), false).await;
        }
        let mut url = self.url(&["upload", "storage", "v1", "b", &self.bucket, "o"]);
        url.query_pairs_mut()
            .append_pair("uploadType", "multipart")
            .append_pair("ifGenerationMatch", "0");
        let (boundary, body) = multipart(path, &bytes);
        let content_type = format!("multipart/related; boundary={boundary}");
        self.send_typed(Method::POST, url, Body::from(body), path, Some(&content_type))
            .await
            .map(drop)
    }

    /// Streams a local file to `path` in one request.
    pub async fn upload_file(&self, path: &StorePath, file: tokio::fs::File) -> Result<(), object_store::Error> {
        self.upload(path, Body::from(file), false).await
    }

    async fn upload(&self, path: &StorePath, body: Body, if_absent: bool) -> Result<(), object_store::Error> {
        let mut url = self.url(&["upload", "storage", "v1", "b", &self.bucket, "o"]);
        url.query_pairs_mut()
            .append_pair("uploadType", "media")
            .append_pair("name", path.as_ref());
        if if_absent {
            url.query_pairs_mut().append_pair("ifGenerationMatch", "0");
        }
        self.send(Method::POST, url, body, path).await.map(drop)
    }

    /// Copies `from` to `to` unless something is at `to` (`AlreadyExists`);
    /// a rewrite, repeated until GCS says it is done.
    pub async fn copy_if_absent(&self, from: &StorePath, to: &StorePath) -> Result<(), object_store::Error> {
        let mut token: Option<String> = None;
        loop {
            let mut url = self.url(&[
                "storage",
                "v1",
                "b",
                &self.bucket,
                "o",
                from.as_ref(),
                "rewriteTo",
                "b",
                &self.bucket,
                "o",
                to.as_ref(),
            ]);
            url.query_pairs_mut().append_pair("ifGenerationMatch", "0");
            if let Some(token) = &token {
                url.query_pairs_mut().append_pair("rewriteToken", token);
            }
            let response = self.send(Method::POST, url, Body::from(""), to).await?;
            let progress: serde_json::Value = serde_json::from_slice(&response).map_err(generic)?;
            if progress["done"].as_bool() == Some(true) {
                return Ok(());
            }
            token = progress["rewriteToken"].as_str().map(str::to_owned);
            if token.is_none() {
                return Err(generic("a rewrite that is not done has no rewriteToken"));
            }
        }
    }

    /// Deletes `path` (`NotFound` if nothing is there).
    pub async fn delete(&self, path: &StorePath) -> Result<(), object_store::Error> {
        let url = self.url(&["storage", "v1", "b", &self.bucket, "o", path.as_ref()]);
        self.send(Method::DELETE, url, Body::from(""), path).await.map(drop)
    }

    /// The base URL with `segments` appended, each percent-encoded whole.
    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("an http(s) base URL")
            .pop_if_empty()
            .extend(segments);
        url
    }

    /// Sends an authorised request; the body of a success, else the error
    /// its status means for `path`.
    async fn send(&self, method: Method, url: Url, body: Body, path: &StorePath) -> Result<Bytes, object_store::Error> {
        self.send_typed(method, url, body, path, None).await
    }

    async fn send_typed(
        &self,
        method: Method,
        url: Url,
        body: Body,
        path: &StorePath,
        content_type: Option<&str>,
    ) -> Result<Bytes, object_store::Error> {
        let credential = self.credentials.get_credential().await?;
        let mut request = self.http.request(method, url).bearer_auth(&credential.bearer);
        if let Some(content_type) = content_type {
            request = request.header(reqwest::header::CONTENT_TYPE, content_type);
        }
        let response = request.body(body).send().await.map_err(generic)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(generic)?;
        let path = path.to_string();
        match status {
            s if s.is_success() => Ok(bytes),
            StatusCode::NOT_FOUND => Err(object_store::Error::NotFound {
                path,
                source: String::from_utf8_lossy(&bytes).into(),
            }),
            StatusCode::PRECONDITION_FAILED => Err(object_store::Error::AlreadyExists {
                path,
                source: "an object is there already".into(),
            }),
            s => Err(generic(format!("{s} for {path}: {}", String::from_utf8_lossy(&bytes)))),
        }
    }
}

/// A `multipart/related` upload body of the object's metadata and bytes,
/// and its boundary: the bytes' own digest, which they cannot hold.
fn multipart(path: &StorePath, bytes: &[u8]) -> (String, Vec<u8>) {
    let boundary = format!("nixery-{}", crate::digest::Digest::of(bytes).hex());
    let metadata = serde_json::json!({ "name": path.as_ref() });
    let mut body = format!(
        "--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n{metadata}\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (boundary, body)
}

fn generic(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> object_store::Error {
    object_store::Error::Generic {
        store: STORE,
        source: error.into(),
    }
}
