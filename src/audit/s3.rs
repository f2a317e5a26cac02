//! `audit.storage: s3`: recordings are written to `audit.s3.local` first, then uploaded when
//! they end (a connection's binary file at its disconnect, a channel's asciicast file at its
//! exit) and removed from there. A file of `uploadPartSize` or more goes as a multipart upload,
//! up to `parallelUploads` parts at a time; a smaller one as one PUT. Each object carries
//! ContainerSSH's metadata (`timestamp`, `authenticated`, `country`, and `username` / `ip`
//! when `metadata.username` / `metadata.ip` say so), kept beside the file in
//! `<file>.metadata.json` until the upload is done. Whatever is still staged when the server
//! starts (it was killed, or uploads kept failing) is uploaded then.
//!
//! Requests are signed with AWS Signature Version 4 and sent through the HTTP client the
//! webhooks and engines use ([`crate::http`]). An upload that fails is logged
//! (`AUDIT_S3_UPLOAD_FAILED`), counted (`containerssh_audit_upload_failures_total`) and tried
//! again after 1, 5 and 30 seconds; after that the file waits for the next start. Sessions
//! never wait for any of it.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use ring::{digest, hmac};
use tokio::sync::{mpsc, Semaphore};

use crate::config::validate::AuditS3;
use crate::dirfd::WritableDir;
use crate::http as httpc;

/// Bytes of parts held in memory for uploads at once, whatever `parallelUploads` says.
pub const MAX_UPLOAD_BUFFER: u64 = 64 * 1024 * 1024;
/// Finished recordings waiting for their upload (past it they wait for the next start).
const MAX_WAITING: usize = 4096;
/// Recordings uploaded at once (each holds at most its parts in flight, below).
const MAX_CONCURRENT_FILES: usize = 4;
/// S3's largest part count: a larger recording gets larger parts.
const MAX_PARTS: u64 = 10_000;
/// A user name longer than this is cut in the object's metadata (S3 allows 2 KiB in all).
const MAX_METADATA_VALUE: usize = 256;
/// What an S3 answer may be.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;
/// One request's time limit.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Pauses between tries of an upload.
const RETRIES: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(5),
    Duration::from_secs(30),
];
/// The suffix of the metadata kept beside a staged recording.
pub const METADATA_SUFFIX: &str = ".metadata.json";

/// A request body and its SHA-256 (hex), which the signature covers.
struct Body {
    data: Bytes,
    sha256: String,
}

impl Body {
    /// A small body (empty, or the completion's XML), hashed where it is made.
    fn small(data: Bytes) -> Self {
        Self {
            sha256: hex::encode(digest::digest(&digest::SHA256, &data)),
            data,
        }
    }
}

/// Where and how to upload: `audit.s3`, and its TLS settings for `https` endpoints (the CA
/// of `audit.s3.cacert` or the system's).
#[derive(Clone, Debug)]
pub struct Target {
    pub s3: AuditS3,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// What goes into the object's metadata (and the sidecar file until then).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Meta {
    /// When the connection came (Unix seconds).
    pub timestamp: u64,
    pub ip: String,
    pub username: Option<String>,
    pub authenticated: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error(transparent)]
    Http(#[from] httpc::HttpError),
    #[error("{method} {what}: HTTP {status}: {message}")]
    Status {
        method: Method,
        what: String,
        status: u16,
        message: String,
    },
    #[error("{0}: no answer within {REQUEST_TIMEOUT:?}")]
    Timeout(String),
    #[error("{0}")]
    Answer(String),
    #[error("reading the staged file {name}: {source}")]
    File {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// The uploader: takes finished recordings' names.
pub struct Uploads {
    tx: mpsc::Sender<String>,
    /// Until [`Uploads::run`]: what the uploader starts with.
    pending: std::sync::Mutex<Option<Pending>>,
}

/// The uploader's start: its queue, its state, and what a previous run left.
type Pending = (mpsc::Receiver<String>, Arc<Shared>, Vec<String>);

impl Uploads {
    /// The uploader over the staging directory; `waiting`: the files a previous run left
    /// there (listed before the sandbox). Nothing is sent before [`Uploads::run`].
    pub fn new(target: Target, dir: Arc<WritableDir>, waiting: Vec<String>) -> Self {
        let (tx, rx) = mpsc::channel::<String>(MAX_WAITING);
        let permits = (MAX_UPLOAD_BUFFER / target.s3.part_size.max(1)).clamp(1, 64);
        let permits = permits.min(u64::from(target.s3.parallel.max(1)));
        let shared = Arc::new(Shared {
            target,
            dir,
            requests: Semaphore::new(permits as usize),
            files: Semaphore::new(MAX_CONCURRENT_FILES),
        });
        Self {
            tx,
            pending: std::sync::Mutex::new(Some((rx, shared, waiting))),
        }
    }

    /// Starts uploading (in the runtime): first what a previous run left.
    pub fn run(&self) {
        let pending = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let Some((mut rx, shared, waiting)) = pending else {
            return;
        };
        if !waiting.is_empty() {
            tracing::info!(
                code = "AUDIT_S3_RECOVERING",
                files = waiting.len(),
                "uploading the audit recordings a previous run left staged"
            );
        }
        tokio::spawn(async move {
            for name in waiting {
                tokio::spawn(Arc::clone(&shared).upload_with_retries(name));
            }
            while let Some(name) = rx.recv().await {
                tokio::spawn(Arc::clone(&shared).upload_with_retries(name));
            }
        });
    }

    /// A recording is complete: upload it (never waits).
    pub fn ready(&self, name: String) {
        if let Err(e) = self.tx.try_send(name) {
            tracing::warn!(code = "AUDIT_S3_UPLOAD_FAILED", file = %e.into_inner(), "too many recordings waiting for upload: this one waits for the next start");
        }
    }
}

struct Shared {
    target: Target,
    dir: Arc<WritableDir>,
    /// Requests carrying a body in flight (each holds one part in memory).
    requests: Semaphore,
    /// Recordings being uploaded.
    files: Semaphore,
}

/// The staged files to upload: everything but sidecars and hidden files.
pub fn staged(dir: &std::path::Path) -> std::io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if !name.starts_with('.') && !name.ends_with(METADATA_SUFFIX) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

impl Shared {
    async fn upload_with_retries(self: Arc<Self>, name: String) {
        let mut tries = RETRIES.iter();
        loop {
            let upload = async {
                let _file = self.files.acquire().await;
                self.upload(&name).await
            };
            match upload.await {
                Ok(how) => {
                    tracing::info!(code = how, file = %name, bucket = %self.target.s3.bucket, "audit recording uploaded");
                    for n in [name.clone(), format!("{name}{METADATA_SUFFIX}")] {
                        if let Err(e) = self.dir.remove(&n) {
                            tracing::warn!(code = "AUDIT_STORAGE_FAILED", file = %n, error = %e, "cannot remove an uploaded audit recording from audit.s3.local");
                        }
                    }
                    return;
                }
                Err(e) => {
                    crate::metrics::get().audit_upload_failures.inc(&[]);
                    let next = tries.next();
                    tracing::warn!(code = "AUDIT_S3_UPLOAD_FAILED", file = %name, error = %crate::backend::one_line(&e), retry_in = ?next, "audit recording upload failed");
                    match next {
                        Some(pause) => tokio::time::sleep(*pause).await,
                        None => return,
                    }
                }
            }
        }
    }

    fn meta(&self, name: &str) -> Meta {
        let mut meta: Meta = self
            .dir
            .read(&format!("{name}{METADATA_SUFFIX}"), 64 * 1024)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        // A binary recording says who logged in (the sidecar was written at the connect).
        if meta.username.is_none() && !name.contains('.') {
            if let Some(user) = self
                .dir
                .open_read(name)
                .ok()
                .and_then(super::decode::login_of)
            {
                meta.username = Some(user);
                meta.authenticated = true;
            }
        }
        meta
    }

    /// `len` bytes of a staged file from `offset` and their SHA-256 (the signature's payload
    /// hash), read and hashed on the blocking pool.
    async fn read_part(
        self: &Arc<Self>,
        name: &str,
        offset: u64,
        len: u64,
    ) -> Result<Body, S3Error> {
        let (this, n) = (Arc::clone(self), name.to_string());
        tokio::task::spawn_blocking(move || {
            this.dir.read_at(&n, offset, len).map(|data| Body {
                sha256: hex::encode(digest::digest(&digest::SHA256, &data)),
                data: Bytes::from(data),
            })
        })
        .await
        .map_err(|e| S3Error::Answer(e.to_string()))?
        .map_err(|source| S3Error::File {
            name: name.to_string(),
            source,
        })
    }

    async fn upload(self: &Arc<Self>, name: &str) -> Result<&'static str, S3Error> {
        let file_err = |source| S3Error::File {
            name: name.to_string(),
            source,
        };
        let size = self.dir.size(name).map_err(file_err)?;
        let meta = self.meta(name);
        let t = &self.target;
        let mut headers = vec![
            (
                "x-amz-meta-timestamp".to_string(),
                meta.timestamp.to_string(),
            ),
            (
                "x-amz-meta-authenticated".to_string(),
                meta.authenticated.to_string(),
            ),
            ("x-amz-meta-country".to_string(), "XX".to_string()),
        ];
        if t.s3.metadata_username {
            if let Some(u) = &meta.username {
                headers.push(("x-amz-meta-username".into(), header_safe(u)));
            }
        }
        if t.s3.metadata_ip && !meta.ip.is_empty() {
            headers.push(("x-amz-meta-ip".into(), meta.ip.clone()));
        }
        if !t.s3.acl.is_empty() {
            headers.push(("x-amz-acl".into(), t.s3.acl.clone()));
        }
        let content_type = if name.ends_with(".cast") {
            "application/x-asciicast"
        } else {
            "application/octet-stream"
        };
        headers.push(("content-type".into(), content_type.into()));

        if size < t.s3.part_size {
            let _permit = self.requests.acquire().await;
            let body = self.read_part(name, 0, size).await?;
            self.request(Method::PUT, name, "", &headers, body).await?;
            return Ok("AUDIT_S3_SINGLE_UPLOAD");
        }
        let answer = self
            .request(
                Method::POST,
                name,
                "uploads=",
                &headers,
                Body::small(Bytes::new()),
            )
            .await?;
        let upload_id = xml_value(&answer, "UploadId")
            .ok_or_else(|| S3Error::Answer("CreateMultipartUpload: no UploadId".into()))?;
        match self.parts(name, size, &upload_id).await {
            Ok(()) => Ok("AUDIT_S3_MULTIPART_UPLOAD"),
            Err(e) => {
                let q = format!("uploadId={}", uri_encode(&upload_id, true));
                if let Err(abort) = self
                    .request(Method::DELETE, name, &q, &[], Body::small(Bytes::new()))
                    .await
                {
                    tracing::warn!(code = "AUDIT_S3_UPLOAD_FAILED", file = %name, error = %crate::backend::one_line(&abort), "aborting the failed multipart upload failed too: its parts stay in the bucket until a lifecycle rule (AbortIncompleteMultipartUpload) removes them");
                }
                Err(e)
            }
        }
    }

    /// Uploads the parts (at most `parallelUploads` at once) and completes the upload.
    async fn parts(
        self: &Arc<Self>,
        name: &str,
        size: u64,
        upload_id: &str,
    ) -> Result<(), S3Error> {
        let t = &self.target;
        // At most S3's 10,000 parts: a larger recording gets larger parts.
        let part_size = t.s3.part_size.max(size.div_ceil(MAX_PARTS));
        let count = size.div_ceil(part_size);
        let id = uri_encode(upload_id, true);
        let mut etags: Vec<Option<String>> = vec![None; count as usize];
        let mut next = 0u64;
        let mut running = tokio::task::JoinSet::new();
        let in_flight_max = u64::from(t.s3.parallel.max(1));
        loop {
            while next < count && (running.len() as u64) < in_flight_max {
                let number = next + 1;
                let offset = next * part_size;
                let len = part_size.min(size - offset);
                let query = format!("partNumber={number}&uploadId={id}");
                let this = Arc::clone(self);
                let name = name.to_string();
                running.spawn(async move {
                    let _permit = this.requests.acquire().await;
                    let body = this.read_part(&name, offset, len).await?;
                    let (etag, _) = this.exchange(Method::PUT, &name, &query, &[], body).await?;
                    let etag = etag.ok_or_else(|| S3Error::Answer("UploadPart: no ETag".into()))?;
                    Ok::<_, S3Error>((number, etag))
                });
                next += 1;
            }
            let Some(done) = running.join_next().await else {
                break;
            };
            let (number, etag) = done.map_err(|e| S3Error::Answer(e.to_string()))??;
            if let Some(slot) = etags.get_mut((number - 1) as usize) {
                *slot = Some(etag);
            }
        }
        let mut body = String::from("<CompleteMultipartUpload>");
        for (i, etag) in etags.iter().enumerate() {
            let etag = etag
                .as_deref()
                .ok_or_else(|| S3Error::Answer(format!("part {} has no ETag", i + 1)))?;
            let _ = write!(
                body,
                "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>",
                i + 1,
                xml_escape(etag)
            );
        }
        body.push_str("</CompleteMultipartUpload>");
        let answer = self
            .request(
                Method::POST,
                name,
                &format!("uploadId={id}"),
                &[("content-type".into(), "application/xml".into())],
                Body::small(Bytes::from(body)),
            )
            .await?;
        // S3 may answer 200 and still fail the completion.
        if answer.contains("<Error>") {
            return Err(S3Error::Answer(format!(
                "CompleteMultipartUpload: {}",
                xml_value(&answer, "Message").unwrap_or(answer)
            )));
        }
        Ok(())
    }

    async fn request(
        &self,
        method: Method,
        key: &str,
        query: &str,
        headers: &[(String, String)],
        body: Body,
    ) -> Result<String, S3Error> {
        self.exchange(method, key, query, headers, body)
            .await
            .map(|(_, text)| text)
    }

    /// One signed request; the ETag header and the body of a 2xx answer.
    async fn exchange(
        &self,
        method: Method,
        key: &str,
        query: &str,
        headers: &[(String, String)],
        body: Body,
    ) -> Result<(Option<String>, String), S3Error> {
        let t = &self.target;
        let (host, path) = t.location(key);
        let signed = sign(
            &Signing {
                method: method.as_str(),
                host: &host,
                path: &path,
                query,
                headers,
                payload_sha256: &body.sha256,
                region: &t.s3.region,
                access_key: &t.s3.access_key,
                secret_key: &t.s3.secret_key,
            },
            SystemTime::now(),
        );
        let uri = if query.is_empty() {
            path.clone()
        } else {
            format!("{path}?{query}")
        };
        let mut req = Request::builder().method(method.clone()).uri(&uri);
        for (k, v) in &signed {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req
            .header("content-length", body.data.len())
            .body(Full::new(body.data))
            .map_err(httpc::HttpError::Build)?;
        let what = format!("s3://{}/{key}", t.s3.bucket);
        let exchange = async {
            let tcp = httpc::connect_tcp(&t.s3.connect_host, t.s3.port).await?;
            let (resp, guard) = match &t.tls {
                Some(tls) => {
                    let name = rustls::pki_types::ServerName::try_from(t.s3.connect_host.clone())
                        .map_err(|e| httpc::HttpError::Tls {
                        to: t.s3.host.clone(),
                        source: std::io::Error::other(e),
                    })?;
                    let io = httpc::connect_tls(tcp, Arc::clone(tls), name).await?;
                    httpc::send(io, req, false).await?
                }
                None => httpc::send(tcp, req, false).await?,
            };
            let status = resp.status();
            let etag = resp
                .headers()
                .get("etag")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let body = httpc::read_capped(resp.into_body(), MAX_RESPONSE_BYTES).await?;
            drop(guard);
            Ok::<_, httpc::HttpError>((status, etag, String::from_utf8_lossy(&body).into_owned()))
        };
        let (status, etag, text) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| S3Error::Timeout(what.clone()))??;
        if !status.is_success() {
            let message = match (xml_value(&text, "Code"), xml_value(&text, "Message")) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(c), None) => c,
                _ => text.chars().take(200).collect(),
            };
            return Err(S3Error::Status {
                method,
                what,
                status: status.as_u16(),
                message,
            });
        }
        Ok((etag, text))
    }
}

impl Target {
    /// The Host header and the path of an object.
    fn location(&self, key: &str) -> (String, String) {
        let key = uri_encode(key, false);
        if self.s3.path_style {
            (
                self.s3.host.clone(),
                format!("/{}/{key}", uri_encode(&self.s3.bucket, false)),
            )
        } else {
            (
                format!("{}.{}", self.s3.bucket, self.s3.host),
                format!("/{key}"),
            )
        }
    }
}

/// What a request's signature covers.
pub struct Signing<'a> {
    pub method: &'a str,
    pub host: &'a str,
    /// Already URI-encoded.
    pub path: &'a str,
    /// Already encoded, `k=v&k=v` (any order).
    pub query: &'a str,
    pub headers: &'a [(String, String)],
    pub payload_sha256: &'a str,
    pub region: &'a str,
    pub access_key: &'a str,
    pub secret_key: &'a str,
}

/// AWS Signature Version 4 for S3: the headers to send (the request's own, `host`,
/// `x-amz-date`, `x-amz-content-sha256` and `authorization`).
pub fn sign(s: &Signing<'_>, now: SystemTime) -> Vec<(String, String)> {
    let (date, stamp) = amz_date(now);
    let mut headers: Vec<(String, String)> = s
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    headers.push(("host".into(), s.host.to_string()));
    headers.push(("x-amz-content-sha256".into(), s.payload_sha256.to_string()));
    headers.push(("x-amz-date".into(), stamp.clone()));
    headers.sort();
    let mut query: Vec<(&str, &str)> = s
        .query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    query.sort();
    let query = query
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let signed_headers = headers
        .iter()
        .map(|(k, _)| k.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let mut canonical = format!("{}\n{}\n{query}\n", s.method, s.path);
    for (k, v) in &headers {
        let _ = writeln!(canonical, "{k}:{v}");
    }
    let _ = write!(canonical, "\n{signed_headers}\n{}", s.payload_sha256);
    let scope = format!("{date}/{}/s3/aws4_request", s.region);
    let to_sign = format!(
        "AWS4-HMAC-SHA256\n{stamp}\n{scope}\n{}",
        hex::encode(digest::digest(&digest::SHA256, canonical.as_bytes()))
    );
    let mac = |key: &[u8], data: &str| {
        hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data.as_bytes())
    };
    let k_date = mac(format!("AWS4{}", s.secret_key).as_bytes(), &date);
    let k_region = mac(k_date.as_ref(), s.region);
    let k_service = mac(k_region.as_ref(), "s3");
    let k_signing = mac(k_service.as_ref(), "aws4_request");
    let signature = hex::encode(mac(k_signing.as_ref(), &to_sign).as_ref());
    headers.push((
        "authorization".into(),
        format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope},SignedHeaders={signed_headers},Signature={signature}",
            s.access_key
        ),
    ));
    headers
}

/// `YYYYMMDD` and `YYYYMMDD'T'HHMMSS'Z'` in UTC.
fn amz_date(now: SystemTime) -> (String, String) {
    let t = crate::utc::Utc::from_unix(
        now.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    );
    let date = format!("{:04}{:02}{:02}", t.year, t.month, t.day);
    let stamp = format!("{date}T{:02}{:02}{:02}Z", t.hour, t.minute, t.second);
    (date, stamp)
}

/// URI encoding as SigV4 wants it: unreserved characters stay, `/` too unless `slash`.
pub fn uri_encode(s: &str, slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char);
            }
            b'/' if !slash => out.push('/'),
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// A metadata value as a header may carry it and its signature covers it unchanged: printable
/// ASCII but space and `%` stays, the rest is percent-encoded (SigV4 would fold runs of
/// spaces); at most [`MAX_METADATA_VALUE`] bytes of the value are kept.
fn header_safe(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let cut = s
        .char_indices()
        .map(|(i, c)| i + c.len_utf8())
        .take_while(|end| *end <= MAX_METADATA_VALUE)
        .last()
        .unwrap_or(0);
    for b in s.bytes().take(cut) {
        if (0x21..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn xml_value(text: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = text.find(&open)? + open.len();
    let end = text.get(start..)?.find(&format!("</{tag}>"))? + start;
    Some(xml_unescape(text.get(start..end)?))
}

fn xml_unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of AWS's "Signature Version 4: authenticating requests using the
    /// Authorization header" (GET Object with a Range header).
    #[test]
    fn the_signature_is_aws_s_own_example() {
        let headers = vec![("Range".to_string(), "bytes=0-9".to_string())];
        let out = sign(
            &Signing {
                method: "GET",
                host: "examplebucket.s3.amazonaws.com",
                path: "/test.txt",
                query: "",
                headers: &headers,
                payload_sha256: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
                region: "us-east-1",
                access_key: "AKIAIOSFODNN7EXAMPLE",
                secret_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            },
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_369_353_600),
        );
        let auth = out.iter().find(|(k, _)| k == "authorization").unwrap();
        assert_eq!(
            auth.1,
            "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        );
    }

    #[test]
    fn dates_encodings_and_answers() {
        let at = |s| amz_date(SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        assert_eq!(at(0).1, "19700101T000000Z");
        assert_eq!(at(951_782_400).0, "20000229");
        assert_eq!(at(1_796_601_600 + 3661).1, "20261207T010101Z");
        assert_eq!(uri_encode("a b/c~", false), "a%20b/c~");
        assert_eq!(uri_encode("a/b", true), "a%2Fb");
        assert_eq!(header_safe("zoë%"), "zo%C3%AB%25");
        assert_eq!(
            header_safe("a  b"),
            "a%20%20b",
            "spaces would be folded by SigV4"
        );
        assert_eq!(header_safe(&"é".repeat(200)).len(), 128 * 6);
        let answer = "<InitiateMultipartUploadResult><UploadId>a&amp;b</UploadId></InitiateMultipartUploadResult>";
        assert_eq!(xml_value(answer, "UploadId").as_deref(), Some("a&b"));
        assert_eq!(xml_value(answer, "Key"), None);
    }
}
