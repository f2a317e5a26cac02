//! HTTPS requests to the Kubernetes API server: our own hyper 1 client over tokio-rustls (the
//! ring provider, TLS 1.2+), trusting only the cluster CA, with bearer-token (static or a
//! re-read file), basic or client-certificate authentication.
//!
//! One TCP+TLS connection per request: the backend makes a handful of calls per SSH
//! connection (create, watch, exec, delete), so a pool is not worth its state yet.
//! Bodies are capped ([`MAX_RESPONSE_BYTES`], watch lines at [`MAX_WATCH_LINE_BYTES`]); every
//! call except the body of a watch runs under the HTTP timeout. Errors name the failed
//! operation as `METHOD /path` (the query is left out: exec commands travel there).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::Stream;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use rustls::pki_types::ServerName;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::AsyncReadExt;

use super::{ClusterConnection, TokenSource};
use crate::http::tls::{self, TlsError, TlsPart};
use crate::http::{self as httpc, ConnGuard, HttpError};

/// Largest response body read into memory.
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;
/// Largest single line of a watch stream (one event object).
pub const MAX_WATCH_LINE_BYTES: usize = 4 << 20;
/// Largest token file accepted.
const MAX_TOKEN_FILE_BYTES: u64 = 64 << 10;
/// A file token older than this is re-read before use (client-go and kube-rs use a minute).
const TOKEN_MAX_AGE: Duration = Duration::from_secs(60);
/// Error messages taken from response bodies are cut to this many bytes.
const MAX_ERROR_MESSAGE_BYTES: usize = 1024;
/// Default port of an `https://` server without one.
const DEFAULT_HTTPS_PORT: u16 = 443;
/// The `User-Agent` of every request.
pub(super) const USER_AGENT: &str = concat!("containerssh/", env!("CARGO_PKG_VERSION"));

/// Failures talking to the API server. `op` is the request (`GET /api/v1/...`, no query).
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("invalid Kubernetes server address {server:?}: {reason}")]
    InvalidServer {
        server: String,
        reason: &'static str,
    },
    #[error("Kubernetes TLS configuration: {0}")]
    TlsConfig(#[source] TlsError),
    #[error("Kubernetes API server name {name:?}: not a valid TLS server name")]
    ServerName { name: String },
    #[error("Kubernetes bearer token file {path}: {source}")]
    TokenFile { path: PathBuf, source: io::Error },
    #[error("Kubernetes credentials: {reason}")]
    Credentials { reason: &'static str },
    /// The exchange failed: no connection, TLS, HTTP, an oversized body.
    #[error("{op}: {source}")]
    Transport {
        op: String,
        #[source]
        source: HttpError,
    },
    #[error("{op}: encoding the request body: {source}")]
    Encode {
        op: String,
        source: serde_json::Error,
    },
    #[error("{op}: no response within {timeout:?}")]
    Timeout { op: String, timeout: Duration },
    #[error("{op}: watch line longer than {limit} bytes")]
    LineTooLong { op: String, limit: usize },
    #[error("{op}: decoding the response: {source}")]
    Decode {
        op: String,
        source: serde_json::Error,
    },
    /// A non-success HTTP status; `status` is the decoded `Status` body when there was one.
    #[error("{op}: HTTP {code}: {message}")]
    Http {
        op: String,
        code: u16,
        status: Option<Box<ApiStatus>>,
        message: String,
    },
    /// The server answered the WebSocket upgrade but broke the handshake rules.
    #[error("{op}: WebSocket handshake: {reason}")]
    Handshake { op: String, reason: String },
    #[error("{op}: WebSocket: {source}")]
    WebSocket {
        op: String,
        source: tokio_tungstenite::tungstenite::Error,
    },
    /// The server closed the WebSocket with a code other than 1000.
    #[error("{op}: WebSocket closed with code {code}: {reason}")]
    WebSocketClosed {
        op: String,
        code: u16,
        reason: String,
    },
}

impl KubeError {
    /// The HTTP status of an [`Http`](Self::Http) error (404 for a missing object, ...).
    pub fn http_code(&self) -> Option<u16> {
        match self {
            KubeError::Http { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The `Status.reason` of an [`Http`](Self::Http) error (`NotFound`, `AlreadyExists`, ...).
    pub fn reason(&self) -> Option<&str> {
        match self {
            KubeError::Http {
                status: Some(s), ..
            } => s.reason.as_deref(),
            _ => None,
        }
    }
}

/// The fields of a `metav1.Status` error body this client reports. Lenient: every field is
/// optional and unknown ones are ignored. (Minimal on purpose; `wire` owns the full type.)
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(default)]
pub struct ApiStatus {
    pub status: Option<String>,
    pub message: Option<String>,
    pub reason: Option<String>,
    pub code: Option<u16>,
}

/// `Failure` bodies decode as [`ApiStatus`]; anything else is kept as (truncated) text.
pub(super) fn http_error(op: String, code: StatusCode, body: &[u8]) -> KubeError {
    let status = serde_json::from_slice::<ApiStatus>(body)
        .ok()
        .filter(|s| s.status.is_some() || s.message.is_some() || s.reason.is_some())
        .map(Box::new);
    let message = match status.as_ref() {
        Some(s) => match (&s.reason, &s.message) {
            (Some(r), Some(m)) => format!("{r}: {m}"),
            (None, Some(m)) => m.clone(),
            (Some(r), None) => r.clone(),
            (None, None) => code.to_string(),
        },
        None => {
            let text = String::from_utf8_lossy(body).trim().to_string();
            if text.is_empty() {
                code.to_string()
            } else {
                text
            }
        }
    };
    KubeError::Http {
        op,
        code: code.as_u16(),
        status,
        message: truncate(message, MAX_ERROR_MESSAGE_BYTES),
    }
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// `METHOD /path` without the query, for errors and logs.
pub(super) fn op_name(method: &Method, path: &str) -> String {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    format!("{method} {path}")
}

/// Where the API server is.
#[derive(Debug)]
struct Endpoint {
    /// The configured URL, for errors.
    server: String,
    /// Host name or IP (no brackets), for connecting.
    host: String,
    port: u16,
    /// The `Host` header: the URL's authority.
    authority: String,
    /// Path prefix without a trailing slash (often empty).
    prefix: String,
}

impl Endpoint {
    fn parse(server: &str) -> Result<Self, KubeError> {
        let invalid = |reason| KubeError::InvalidServer {
            server: server.to_string(),
            reason,
        };
        let rest = server
            .strip_prefix("https://")
            .ok_or_else(|| invalid("only https:// servers are supported"))?;
        let (authority, prefix) = match rest.find(['/', '?', '#']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if prefix.contains(['?', '#']) {
            return Err(invalid("a query or fragment is not allowed"));
        }
        if authority.contains('@') {
            return Err(invalid("user information in the URL is not supported"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| invalid("unterminated IPv6 address"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(invalid("garbage after the IPv6 address")),
            };
            (h, port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port = match port {
            Some(p) => p.parse().map_err(|_| invalid("the port is not a number"))?,
            None => DEFAULT_HTTPS_PORT,
        };
        if host.is_empty() {
            return Err(invalid("the host is empty"));
        }
        Ok(Self {
            server: server.to_string(),
            host: host.to_string(),
            port,
            authority: authority.to_string(),
            prefix: prefix.trim_end_matches('/').to_string(),
        })
    }
}

/// The TLS client configuration: only the cluster CA(s) as roots, an optional client
/// certificate, TLS 1.2 and 1.3, ALPN `http/1.1`.
fn tls_config(conn: &ClusterConnection) -> Result<rustls::ClientConfig, KubeError> {
    let ca = conn.ca_pem.as_deref().ok_or_else(|| {
        KubeError::TlsConfig(TlsError {
            part: TlsPart::Ca,
            reason: "none configured; the server cannot be verified".into(),
        })
    })?;
    tls::client_config(tls::ClientTls {
        ca,
        cert: conn.client_cert_pem.as_deref(),
        key: conn.client_key_pem.as_deref(),
        versions: tls::TLS12_AND_13,
        provider: None,
        alpn_http1: true,
    })
    .map_err(KubeError::TlsConfig)
}

/// A bearer token file, re-read when stale or rejected; the last good token survives failed
/// reads. Neither the token nor its length is ever logged.
struct FileToken {
    path: PathBuf,
    state: Mutex<(HeaderValue, Instant)>,
}

/// The `Authorization: Bearer` value from token file contents.
fn bearer_from_file(bytes: &[u8]) -> io::Result<HeaderValue> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "the token is not UTF-8"))?
        .trim();
    if text.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the file is empty",
        ));
    }
    bearer(text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "the token contains characters not allowed in an HTTP header",
        )
    })
}

fn bearer(token: &str) -> Option<HeaderValue> {
    let mut v = HeaderValue::from_str(&format!("Bearer {}", token.trim())).ok()?;
    v.set_sensitive(true);
    Some(v)
}

fn too_big() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("larger than {MAX_TOKEN_FILE_BYTES} bytes"),
    )
}

impl FileToken {
    fn load(path: &Path) -> Result<Self, KubeError> {
        use std::io::Read;
        let read = || -> io::Result<HeaderValue> {
            let mut buf = Vec::new();
            std::fs::File::open(path)?
                .take(MAX_TOKEN_FILE_BYTES + 1)
                .read_to_end(&mut buf)?;
            if buf.len() as u64 > MAX_TOKEN_FILE_BYTES {
                return Err(too_big());
            }
            bearer_from_file(&buf)
        };
        let value = read().map_err(|source| KubeError::TokenFile {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            state: Mutex::new((value, Instant::now())),
        })
    }

    async fn read(&self) -> io::Result<HeaderValue> {
        let mut buf = Vec::new();
        tokio::fs::File::open(&self.path)
            .await?
            .take(MAX_TOKEN_FILE_BYTES + 1)
            .read_to_end(&mut buf)
            .await?;
        if buf.len() as u64 > MAX_TOKEN_FILE_BYTES {
            return Err(too_big());
        }
        bearer_from_file(&buf)
    }

    fn current(&self) -> (HeaderValue, Instant) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Re-reads the file; returns the token to use (the previous one when the read fails).
    async fn refresh(&self) -> HeaderValue {
        match self.read().await {
            Ok(v) => {
                let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
                *st = (v.clone(), Instant::now());
                v
            }
            Err(error) => {
                tracing::warn!(code = "KUBERNETES_TOKEN_REFRESH_FAILED", path = %self.path.display(), %error, "cannot re-read the Kubernetes token file; keeping the previous token");
                self.current().0
            }
        }
    }

    /// The token, re-read first when older than [`TOKEN_MAX_AGE`].
    async fn header(&self) -> HeaderValue {
        let (value, read_at) = self.current();
        if read_at.elapsed() < TOKEN_MAX_AGE {
            value
        } else {
            self.refresh().await
        }
    }
}

enum Auth {
    None,
    /// A fixed `Authorization` value (static bearer token or basic).
    Fixed(HeaderValue),
    File(FileToken),
}

impl Auth {
    fn new(conn: &ClusterConnection) -> Result<Self, KubeError> {
        Ok(match (&conn.token, &conn.basic) {
            (Some(TokenSource::Static(t)), _) => {
                Auth::Fixed(bearer(t).ok_or(KubeError::Credentials {
                    reason: "the bearer token contains characters not allowed in an HTTP header",
                })?)
            }
            (Some(TokenSource::File(path)), _) => Auth::File(FileToken::load(path)?),
            (None, Some((user, password))) => {
                use base64::Engine as _;
                let raw = format!("{user}:{password}");
                let enc = base64::engine::general_purpose::STANDARD.encode(raw.as_bytes());
                let mut v = HeaderValue::from_str(&format!("Basic {enc}")).map_err(|_| {
                    KubeError::Credentials {
                        reason: "basic authentication header is invalid",
                    }
                })?;
                v.set_sensitive(true);
                Auth::Fixed(v)
            }
            (None, None) => Auth::None,
        })
    }

    async fn header(&self) -> Option<HeaderValue> {
        match self {
            Auth::None => None,
            Auth::Fixed(v) => Some(v.clone()),
            Auth::File(f) => Some(f.header().await),
        }
    }
}

struct Inner {
    endpoint: Endpoint,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    auth: Auth,
    http_timeout: Duration,
}

/// Cheaply clonable handle to one API server.
#[derive(Clone)]
pub struct KubeClient {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KubeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeClient")
            .field("server", &self.inner.endpoint.server)
            .finish_non_exhaustive()
    }
}

impl KubeClient {
    /// Validates the connection settings, builds the TLS configuration and reads a token
    /// file; no network traffic happens here.
    pub fn new(conn: &ClusterConnection, http_timeout: Duration) -> Result<Self, KubeError> {
        let endpoint = Endpoint::parse(&conn.server)?;
        let name = conn
            .server_name
            .as_deref()
            .filter(|s| !s.is_empty())
            .unwrap_or(&endpoint.host);
        let server_name =
            ServerName::try_from(name.to_string()).map_err(|_| KubeError::ServerName {
                name: name.to_string(),
            })?;
        let tls = Arc::new(tls_config(conn)?);
        let auth = Auth::new(conn)?;
        Ok(Self {
            inner: Arc::new(Inner {
                endpoint,
                server_name,
                tls,
                auth,
                http_timeout,
            }),
        })
    }

    /// The configured server URL.
    pub fn server(&self) -> &str {
        &self.inner.endpoint.server
    }

    /// The HTTP timeout (connect + response head, and the whole body for plain calls).
    pub fn http_timeout(&self) -> Duration {
        self.inner.http_timeout
    }

    /// `GET path` and decode a JSON 2xx body.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Result<T, KubeError> {
        self.json(Method::GET, path, None).await
    }

    /// `POST path` with a JSON body and decode a JSON 2xx body.
    pub async fn post_json<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, KubeError> {
        let op = op_name(&Method::POST, path);
        let body = serde_json::to_vec(body).map_err(|source| KubeError::Encode { op, source })?;
        self.json(Method::POST, path, Some(body.into())).await
    }

    /// `DELETE path`, with a JSON body (`DeleteOptions`) when given; decodes the 2xx body (the
    /// object being deleted, or a `Status`). A 404 is an error: check [`KubeError::http_code`].
    pub async fn delete<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, KubeError> {
        let op = op_name(&Method::DELETE, path);
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|source| KubeError::Encode { op, source })?;
        self.json(Method::DELETE, path, body.map(Bytes::from)).await
    }

    /// `PATCH path` with a JSON merge patch (RFC 7386) and decode a JSON 2xx body.
    pub async fn merge_patch<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        patch: &B,
    ) -> Result<T, KubeError> {
        let op = op_name(&Method::PATCH, path);
        let body = serde_json::to_vec(patch).map_err(|source| KubeError::Encode { op, source })?;
        let kind = [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/merge-patch+json"),
        )];
        self.json_with(Method::PATCH, path, Some(body.into()), &kind)
            .await
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<T, KubeError> {
        self.json_with(method, path, body, &[]).await
    }

    async fn json_with<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        extra: &[(HeaderName, HeaderValue)],
    ) -> Result<T, KubeError> {
        let op = op_name(&method, path);
        let (status, bytes) = self.call(&op, method, path, body, extra).await?;
        if !status.is_success() {
            return Err(http_error(op, status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|source| KubeError::Decode { op, source })
    }

    /// One complete exchange under the HTTP timeout; the body is capped.
    async fn call(
        &self,
        op: &str,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        extra: &[(HeaderName, HeaderValue)],
    ) -> Result<(StatusCode, Bytes), KubeError> {
        self.timed(op, async {
            let (resp, _guard) = self.send(op, method, path, body, extra, false).await?;
            let status = resp.status();
            let bytes = read_capped(op, resp.into_body()).await?;
            Ok((status, bytes))
        })
        .await
    }

    /// Runs `fut` under the HTTP timeout.
    pub(super) async fn timed<T>(
        &self,
        op: &str,
        fut: impl std::future::Future<Output = Result<T, KubeError>>,
    ) -> Result<T, KubeError> {
        let timeout = self.inner.http_timeout;
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| KubeError::Timeout {
                op: op.to_string(),
                timeout,
            })?
    }

    /// `GET path` (a `watch=true` URL) and stream the body as newline-delimited JSON. The HTTP
    /// timeout covers connecting and the response head only; the stream ends when the server
    /// ends it (`timeoutSeconds`).
    pub async fn watch_lines(&self, path: &str) -> Result<WatchLines, KubeError> {
        let op = op_name(&Method::GET, path);
        let (resp, guard) = self
            .timed(&op, self.send(&op, Method::GET, path, None, &[], false))
            .await?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = self.timed(&op, read_capped(&op, resp.into_body())).await?;
            return Err(http_error(op, status, &bytes));
        }
        Ok(WatchLines {
            op,
            body: Some(resp.into_body()),
            buf: BytesMut::new(),
            _guard: guard,
        })
    }

    /// Sends one request on a fresh connection (no timeout here), with authentication.
    /// After a 401 with a token file, the file is re-read and, when the token changed, the
    /// request is sent once more.
    pub(super) async fn send(
        &self,
        op: &str,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        extra: &[(HeaderName, HeaderValue)],
        upgrades: bool,
    ) -> Result<(Response<Incoming>, ConnGuard), KubeError> {
        let auth = self.inner.auth.header().await;
        let first = self
            .send_once(
                op,
                &method,
                path,
                body.clone(),
                extra,
                auth.clone(),
                upgrades,
            )
            .await?;
        if first.0.status() != StatusCode::UNAUTHORIZED {
            return Ok(first);
        }
        let Auth::File(file) = &self.inner.auth else {
            return Ok(first);
        };
        let fresh = file.refresh().await;
        if auth.as_ref() == Some(&fresh) {
            return Ok(first);
        }
        drop(first);
        tracing::debug!(op, "401 Unauthorized; retrying with the re-read token file");
        self.send_once(op, &method, path, body, extra, Some(fresh), upgrades)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn send_once(
        &self,
        op: &str,
        method: &Method,
        path: &str,
        body: Option<Bytes>,
        extra: &[(HeaderName, HeaderValue)],
        auth: Option<HeaderValue>,
        upgrades: bool,
    ) -> Result<(Response<Incoming>, ConnGuard), KubeError> {
        let ep = &self.inner.endpoint;
        let mut b = Request::builder()
            .method(method.clone())
            .uri(format!("{}{}", ep.prefix, path))
            .header(header::HOST, &ep.authority)
            .header(header::USER_AGENT, USER_AGENT)
            .header(header::ACCEPT, "application/json");
        if body.is_some() && !extra.iter().any(|(k, _)| k == header::CONTENT_TYPE) {
            b = b.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(v) = auth {
            b = b.header(header::AUTHORIZATION, v);
        }
        for (k, v) in extra {
            b = b.header(k, v);
        }
        let sent = async {
            let req = b
                .body(Full::new(body.unwrap_or_default()))
                .map_err(HttpError::Build)?;
            let ep = &self.inner.endpoint;
            let tcp = httpc::connect_tcp(&ep.host, ep.port).await?;
            let tls = self.inner.tls.clone();
            let io = httpc::connect_tls(tcp, tls, self.inner.server_name.clone()).await?;
            httpc::send(io, req, upgrades).await
        };
        sent.await.map_err(|source| KubeError::Transport {
            op: op.to_string(),
            source,
        })
    }
}

/// Reads a whole body, up to [`MAX_RESPONSE_BYTES`].
pub(super) async fn read_capped(op: &str, body: Incoming) -> Result<Bytes, KubeError> {
    httpc::read_capped(body, MAX_RESPONSE_BYTES)
        .await
        .map_err(|source| KubeError::Transport {
            op: op.to_string(),
            source,
        })
}

/// The lines of a watch response, each one JSON event (`{"type":…,"object":…}`), without the
/// newline; empty lines are skipped. A line over [`MAX_WATCH_LINE_BYTES`] ends the stream with
/// [`KubeError::LineTooLong`].
pub struct WatchLines {
    op: String,
    /// `None` once finished (end of body or an error).
    body: Option<Incoming>,
    buf: BytesMut,
    _guard: ConnGuard,
}

impl WatchLines {
    /// The next line; `None` when the server ended the response.
    pub async fn next(&mut self) -> Option<Result<Bytes, KubeError>> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let mut line = self.buf.split_to(i + 1);
                line.truncate(i);
                if line.last() == Some(&b'\r') {
                    line.truncate(i - 1);
                }
                if line.len() > MAX_WATCH_LINE_BYTES {
                    return Some(Err(self.too_long()));
                }
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Some(Ok(line.freeze()));
            }
            if self.buf.len() > MAX_WATCH_LINE_BYTES {
                return Some(Err(self.too_long()));
            }
            let body = self.body.as_mut()?;
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(source)) => {
                    self.body = None;
                    return Some(Err(KubeError::Transport {
                        op: self.op.clone(),
                        source: HttpError::Body(source),
                    }));
                }
                None => {
                    self.body = None;
                    let rest = std::mem::take(&mut self.buf);
                    let trimmed = rest.iter().all(u8::is_ascii_whitespace);
                    return (!trimmed).then(|| Ok(rest.freeze()));
                }
            }
        }
    }

    fn too_long(&mut self) -> KubeError {
        self.body = None;
        self.buf = BytesMut::new();
        KubeError::LineTooLong {
            op: self.op.clone(),
            limit: MAX_WATCH_LINE_BYTES,
        }
    }

    /// The lines as a [`Stream`].
    pub fn into_stream(self) -> impl Stream<Item = Result<Bytes, KubeError>> + Send {
        futures_util::stream::unfold(self, |mut w| async move {
            let item = w.next().await?;
            Some((item, w))
        })
    }
}

/// A local TLS server for the client and WebSocket tests, with certificates made by the
/// `openssl` CLI (CA, server, client, and an unrelated CA).
#[cfg(test)]
pub(super) mod testing {
    use std::future::Future;
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::process::Command;
    use std::sync::{Arc, Mutex};

    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::server::TlsStream;

    use super::super::ClusterConnection;

    pub struct Certs {
        _dir: tempfile::TempDir,
        pub ca: Vec<u8>,
        pub other_ca: Vec<u8>,
        pub client_cert: Vec<u8>,
        /// SEC1 (`EC PRIVATE KEY`).
        pub client_key: Vec<u8>,
        server_cert: Vec<u8>,
        server_key: Vec<u8>,
    }

    const CNF: &str = "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = test\n\
        [ca_ext]\nbasicConstraints = critical,CA:TRUE\nkeyUsage = critical,keyCertSign,cRLSign\nsubjectKeyIdentifier = hash\n\
        [server_ext]\nbasicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\nextendedKeyUsage = serverAuth\n\
        subjectAltName = DNS:kubernetes.default.svc,IP:127.0.0.1\n\
        [client_ext]\nbasicConstraints = CA:FALSE\nkeyUsage = critical,digitalSignature\nextendedKeyUsage = clientAuth\n";

    fn openssl(dir: &std::path::Path, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn certs() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("cnf"), CNF).unwrap();
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ];
        for ca in ["ca", "other"] {
            let mut a = vec!["req", "-x509", "-config", "cnf", "-extensions", "ca_ext"];
            a.extend(ec);
            let (k, c, s) = (
                format!("{ca}.key"),
                format!("{ca}.pem"),
                format!("/CN={ca}"),
            );
            a.extend(["-keyout", &k, "-out", &c, "-days", "2", "-subj", &s]);
            openssl(d, &a);
        }
        for (leaf, subj) in [
            ("server", "/CN=server"),
            ("client", "/CN=alice/O=system:masters"),
        ] {
            let mut a = vec!["req", "-new", "-config", "cnf"];
            a.extend(ec);
            let (k, r) = (format!("{leaf}.key"), format!("{leaf}.csr"));
            a.extend(["-keyout", &k, "-out", &r, "-subj", subj]);
            openssl(d, &a);
            let (c, e) = (format!("{leaf}.pem"), format!("{leaf}_ext"));
            openssl(
                d,
                &[
                    "x509",
                    "-req",
                    "-in",
                    &r,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &c,
                    "-days",
                    "2",
                    "-extfile",
                    "cnf",
                    "-extensions",
                    &e,
                ],
            );
        }
        openssl(d, &["ec", "-in", "client.key", "-out", "client-sec1.key"]);
        let read = |f: &str| std::fs::read(d.join(f)).unwrap();
        Certs {
            ca: read("ca.pem"),
            other_ca: read("other.pem"),
            client_cert: read("client.pem"),
            client_key: read("client-sec1.key"),
            server_cert: read("server.pem"),
            server_key: read("server.key"),
            _dir: dir,
        }
    }

    /// One parsed request head (and body).
    #[derive(Clone, Debug)]
    pub struct Req {
        pub method: String,
        pub path: String,
        pub headers: Vec<(String, String)>,
        pub body: Vec<u8>,
    }

    impl Req {
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    pub type Stream = TlsStream<TcpStream>;
    pub type Handler =
        Arc<dyn Fn(Req, Stream) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

    pub fn handler<F, Fut>(f: F) -> Handler
    where
        F: Fn(Req, Stream) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Arc::new(move |r, s| Box::pin(f(r, s)))
    }

    pub struct Server {
        pub addr: SocketAddr,
        pub requests: Arc<Mutex<Vec<Req>>>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl Server {
        pub fn requests(&self) -> Vec<Req> {
            self.requests.lock().unwrap().clone()
        }

        /// A connection to this server trusting `certs.ca`.
        pub fn conn(&self, certs: &Certs) -> ClusterConnection {
            ClusterConnection {
                server: format!("https://127.0.0.1:{}", self.addr.port()),
                ca_pem: Some(certs.ca.clone()),
                ..Default::default()
            }
        }
    }

    async fn read_request(s: &mut Stream) -> Option<Req> {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            head.push(s.read_u8().await.ok()?);
            if head.len() > 65536 {
                return None;
            }
        }
        let text = String::from_utf8(head).ok()?;
        let mut lines = text.split("\r\n");
        let mut first = lines.next()?.split(' ');
        let (method, path) = (first.next()?.to_string(), first.next()?.to_string());
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let mut req = Req {
            method,
            path,
            headers,
            body: Vec::new(),
        };
        let len: usize = req
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        req.body = vec![0; len];
        s.read_exact(&mut req.body).await.ok()?;
        Some(req)
    }

    pub async fn serve(certs: &Certs, require_client_cert: bool, h: Handler) -> Server {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = CertificateDer::pem_slice_iter(&certs.server_cert)
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(&certs.server_key).unwrap();
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if require_client_cert {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&certs.ca) {
                roots.add(c.unwrap()).unwrap();
            }
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder.with_single_cert(chain, key).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let reqs = requests.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, h, reqs) = (acceptor.clone(), h.clone(), reqs.clone());
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(tcp).await else {
                        return;
                    };
                    if let Some(req) = read_request(&mut s).await {
                        reqs.lock().unwrap().push(req.clone());
                        h(req, s).await;
                    }
                });
            }
        });
        Server {
            addr,
            requests,
            task,
        }
    }

    /// Writes a complete response and closes.
    pub async fn respond(s: &mut Stream, status: &str, body: &[u8]) {
        let head = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        let _ = s.write_all(head.as_bytes()).await;
        let _ = s.write_all(body).await;
        let _ = s.shutdown().await;
    }

    pub fn ok_json(body: &'static str) -> Handler {
        handler(move |_, mut s| async move { respond(&mut s, "200 OK", body.as_bytes()).await })
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use serde_json::Value;
    use tokio::io::AsyncWriteExt;

    const T: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn tls_trusts_only_the_given_ca() {
        let certs = certs();
        let srv = serve(&certs, false, ok_json(r#"{"a":1}"#)).await;
        let c = KubeClient::new(&srv.conn(&certs), T).unwrap();
        let v: Value = c.get_json("/api").await.unwrap();
        assert_eq!(v["a"], 1);
        let r = &srv.requests()[0];
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/api"));
        assert_eq!(r.header("user-agent"), Some(USER_AGENT));
        assert_eq!(r.header("authorization"), None);

        let mut wrong = srv.conn(&certs);
        wrong.ca_pem = Some(certs.other_ca.clone());
        let c = KubeClient::new(&wrong, T).unwrap();
        let e = c.get_json::<Value>("/api").await.unwrap_err();
        assert!(
            matches!(
                e,
                KubeError::Transport {
                    source: HttpError::Tls { .. },
                    ..
                }
            ),
            "{e}"
        );

        let mut none = srv.conn(&certs);
        none.ca_pem = None;
        assert!(matches!(
            KubeClient::new(&none, T),
            Err(KubeError::TlsConfig(_))
        ));
        none.ca_pem = Some(b"junk".to_vec());
        assert!(matches!(
            KubeClient::new(&none, T),
            Err(KubeError::TlsConfig(_))
        ));
    }

    #[tokio::test]
    async fn server_name_override() {
        let certs = certs();
        let srv = serve(&certs, false, ok_json("{}")).await;
        let port = srv.addr.port();
        // The certificate names kubernetes.default.svc and 127.0.0.1, not localhost.
        let mut conn = srv.conn(&certs);
        conn.server = format!("https://localhost:{port}");
        let e = KubeClient::new(&conn, T)
            .unwrap()
            .get_json::<Value>("/")
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                KubeError::Transport {
                    source: HttpError::Tls { .. },
                    ..
                }
            ),
            "{e}"
        );
        conn.server_name = Some("kubernetes.default.svc".into());
        let c = KubeClient::new(&conn, T).unwrap();
        c.get_json::<Value>("/").await.unwrap();
        assert_eq!(
            srv.requests().last().unwrap().header("host"),
            Some(&*format!("localhost:{port}"))
        );
        conn.server_name = Some("other.example".into());
        let c = KubeClient::new(&conn, T).unwrap();
        assert!(c.get_json::<Value>("/").await.is_err());
        conn.server_name = Some("127.0.0.1".into()); // IP SAN
        let c = KubeClient::new(&conn, T).unwrap();
        c.get_json::<Value>("/").await.unwrap();
    }

    #[tokio::test]
    async fn client_certificate() {
        let certs = certs();
        let srv = serve(&certs, true, ok_json("{}")).await;
        let mut conn = srv.conn(&certs);
        let c = KubeClient::new(&conn, T).unwrap();
        assert!(c.get_json::<Value>("/").await.is_err());
        conn.client_cert_pem = Some(certs.client_cert.clone());
        conn.client_key_pem = Some(certs.client_key.clone());
        let c = KubeClient::new(&conn, T).unwrap();
        c.get_json::<Value>("/").await.unwrap();
        conn.client_key_pem = None;
        assert!(matches!(
            KubeClient::new(&conn, T),
            Err(KubeError::TlsConfig(_))
        ));
    }

    #[tokio::test]
    async fn bearer_and_basic_auth() {
        let certs = certs();
        let srv = serve(&certs, false, ok_json("{}")).await;
        let mut conn = srv.conn(&certs);
        conn.token = Some(TokenSource::Static(" s3cret\n".into()));
        let c = KubeClient::new(&conn, T).unwrap();
        c.get_json::<Value>("/").await.unwrap();
        assert_eq!(
            srv.requests()[0].header("authorization"),
            Some("Bearer s3cret")
        );
        assert!(!format!("{c:?}").contains("s3cret"));
        conn.token = None;
        conn.basic = Some(("u".into(), "p".into()));
        KubeClient::new(&conn, T)
            .unwrap()
            .get_json::<Value>("/")
            .await
            .unwrap();
        assert_eq!(
            srv.requests()[1].header("authorization"),
            Some("Basic dTpw")
        );
    }

    #[tokio::test]
    async fn token_file_reread_after_401() {
        let certs = certs();
        let h = handler(|req: Req, mut s| async move {
            if req.header("authorization") == Some("Bearer new") {
                respond(&mut s, "200 OK", b"{}").await
            } else {
                let body = br#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"Unauthorized","reason":"Unauthorized","code":401}"#;
                respond(&mut s, "401 Unauthorized", body).await
            }
        });
        let srv = serve(&certs, false, h).await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "old\n").unwrap();
        let mut conn = srv.conn(&certs);
        conn.token = Some(TokenSource::File(path.clone()));
        let c = KubeClient::new(&conn, T).unwrap();
        // Unchanged file: the 401 is reported, no retry.
        let e = c.get_json::<Value>("/x").await.unwrap_err();
        assert_eq!(e.http_code(), Some(401));
        assert_eq!(e.reason(), Some("Unauthorized"));
        assert_eq!(srv.requests().len(), 1);
        // Rotated: one retry with the new token.
        std::fs::write(&path, "  new \n").unwrap();
        c.get_json::<Value>("/x").await.unwrap();
        let auths: Vec<_> = srv
            .requests()
            .iter()
            .map(|r| r.header("authorization").unwrap().to_string())
            .collect();
        assert_eq!(auths, ["Bearer old", "Bearer old", "Bearer new"]);
        // A failed read keeps the last good token.
        std::fs::remove_file(&path).unwrap();
        let Auth::File(f) = &c.inner.auth else {
            panic!()
        };
        assert_eq!(f.refresh().await, "Bearer new");
        // Limits at construction.
        std::fs::write(&path, vec![b'a'; 64 * 1024 + 1]).unwrap();
        assert!(matches!(
            KubeClient::new(&conn, T),
            Err(KubeError::TokenFile { .. })
        ));
        std::fs::write(&path, " \n").unwrap();
        assert!(matches!(
            KubeClient::new(&conn, T),
            Err(KubeError::TokenFile { .. })
        ));
    }

    #[tokio::test]
    async fn status_errors_and_bodies() {
        let certs = certs();
        let h = handler(|req: Req, mut s| async move {
            match req.method.as_str() {
                "GET" => respond(&mut s, "404 Not Found", br#"{"kind":"Status","status":"Failure","message":"pods \"x\" not found","reason":"NotFound","details":{"name":"x","kind":"pods"},"code":404}"#).await,
                "POST" => respond(&mut s, "201 Created", &req.body).await,
                _ => respond(&mut s, "500 Internal Server Error", b"plain failure\n").await,
            }
        });
        let srv = serve(&certs, false, h).await;
        let c = KubeClient::new(&srv.conn(&certs), T).unwrap();
        let e = c
            .get_json::<Value>("/api/v1/namespaces/d/pods/x?a=b")
            .await
            .unwrap_err();
        assert_eq!(e.http_code(), Some(404));
        assert_eq!(e.reason(), Some("NotFound"));
        assert_eq!(
            e.to_string(),
            "GET /api/v1/namespaces/d/pods/x: HTTP 404: NotFound: pods \"x\" not found"
        );
        let v: Value = c
            .post_json("/p", &serde_json::json!({"k": "v"}))
            .await
            .unwrap();
        assert_eq!(v["k"], "v");
        assert_eq!(
            srv.requests()[1].header("content-type"),
            Some("application/json")
        );
        let e = c
            .delete::<_, Value>("/d", Some(&serde_json::json!({"gracePeriodSeconds": 0})))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, KubeError::Http { code: 500, status: None, message, .. } if message == "plain failure"),
            "{e}"
        );
        assert_eq!(srv.requests()[2].body, br#"{"gracePeriodSeconds":0}"#);
    }

    #[tokio::test]
    async fn timeout_and_bad_urls() {
        let certs = certs();
        let h = handler(|_, s| async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let srv = serve(&certs, false, h).await;
        let c = KubeClient::new(&srv.conn(&certs), Duration::from_millis(300)).unwrap();
        let e = c.get_json::<Value>("/slow").await.unwrap_err();
        assert!(matches!(e, KubeError::Timeout { .. }), "{e}");
        for bad in [
            "http://h",
            "https://",
            "https://h:x",
            "https://u@h",
            "https://[::1",
        ] {
            let conn = ClusterConnection {
                server: bad.into(),
                ca_pem: Some(certs.ca.clone()),
                ..Default::default()
            };
            assert!(
                matches!(
                    KubeClient::new(&conn, T),
                    Err(KubeError::InvalidServer { .. })
                ),
                "{bad}"
            );
        }
        let ep = Endpoint::parse("https://[::1]:6443/prefix/").unwrap();
        assert_eq!(
            (
                ep.host.as_str(),
                ep.port,
                ep.authority.as_str(),
                ep.prefix.as_str()
            ),
            ("::1", 6443, "[::1]:6443", "/prefix")
        );
        assert_eq!(Endpoint::parse("https://k").unwrap().port, 443);
    }

    async fn chunked(s: &mut testing::Stream, chunks: &[&[u8]]) {
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").await;
        for c in chunks {
            let _ = s.write_all(format!("{:x}\r\n", c.len()).as_bytes()).await;
            let _ = s.write_all(c).await;
            let _ = s.write_all(b"\r\n").await;
            let _ = s.flush().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = s.write_all(b"0\r\n\r\n").await;
        let _ = s.shutdown().await;
    }

    #[tokio::test]
    async fn watch_lines_split_and_capped() {
        let certs = certs();
        let h = handler(|req: Req, mut s| async move {
            if req.path.contains("big") {
                let big = vec![b'x'; MAX_WATCH_LINE_BYTES + 10];
                chunked(&mut s, &[b"{\"ok\":1}\n", &big]).await
            } else if req.path.contains("denied") {
                respond(
                    &mut s,
                    "403 Forbidden",
                    br#"{"status":"Failure","reason":"Forbidden","message":"no"}"#,
                )
                .await
            } else {
                chunked(
                    &mut s,
                    &[
                        b"{\"type\":\"ADDED\"",
                        b",\"n\":1}\n{\"type\":",
                        b"\"MODIFIED\"}\r\n\n",
                        b"{\"last\":true}",
                    ],
                )
                .await
            }
        });
        let srv = serve(&certs, false, h).await;
        let c = KubeClient::new(&srv.conn(&certs), Duration::from_millis(500)).unwrap();
        let mut w = c.watch_lines("/w?watch=true").await.unwrap();
        let mut got = Vec::new();
        while let Some(l) = w.next().await {
            got.push(String::from_utf8(l.unwrap().to_vec()).unwrap());
        }
        assert_eq!(
            got,
            [
                r#"{"type":"ADDED","n":1}"#,
                r#"{"type":"MODIFIED"}"#,
                r#"{"last":true}"#
            ]
        );

        let w = c.watch_lines("/big?watch=true").await.unwrap();
        let items: Vec<_> = futures_util::StreamExt::collect::<Vec<_>>(w.into_stream()).await;
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].as_ref().unwrap().as_ref(), b"{\"ok\":1}");
        assert!(matches!(items[1], Err(KubeError::LineTooLong { .. })));

        let e = c.watch_lines("/denied").await.err().unwrap();
        assert_eq!(e.reason(), Some("Forbidden"));
    }
}
