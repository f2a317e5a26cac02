//! HTTP/1.1 exchanges with the Docker engine: one hyper connection per
//! request, capped body reads, timeouts, API version negotiation and
//! connection hijacking.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::sync::OnceCell;

use super::stream::Hijacked;
use super::transport::Transport;
use super::{
    DockerConnection, DockerError, MAX_API_VERSION, MAX_ERROR_MESSAGE_BYTES, MAX_RESPONSE_BYTES,
    MIN_API_VERSION,
};
use crate::http::ConnGuard;
use crate::http::{self as httpc, HttpError};

struct Inner {
    transport: Transport,
    http_timeout: Duration,
    version: OnceCell<String>,
}

/// Cheaply clonable handle to one Docker engine.
#[derive(Clone)]
pub struct DockerClient {
    inner: Arc<Inner>,
}

/// Outcome of a hijack request: the raw stream, or the engine's error reply.
pub(super) enum HijackReply {
    Stream(Hijacked),
    Failed(StatusCode, Bytes),
}

impl DockerClient {
    /// Parses the connection settings; no network traffic happens here.
    pub fn new(conn: &DockerConnection, http_timeout: Duration) -> Result<Self, DockerError> {
        let transport = Transport::parse(conn)?;
        Ok(Self {
            inner: Arc::new(Inner {
                transport,
                http_timeout,
                version: OnceCell::new(),
            }),
        })
    }

    /// Negotiates the API version (once; later calls return the cached
    /// choice): `GET /version`, then min(engine, [`MAX_API_VERSION`]).
    pub async fn negotiate(&self) -> Result<String, DockerError> {
        self.inner
            .version
            .get_or_try_init(|| async {
                let (status, body) = self.call("version", Method::GET, "/version", None).await?;
                if status != StatusCode::OK {
                    return Err(status_error("version", status, &body));
                }
                #[derive(serde::Deserialize)]
                struct Version {
                    #[serde(rename = "ApiVersion")]
                    api_version: String,
                }
                let v: Version =
                    serde_json::from_slice(&body).map_err(|source| DockerError::Decode {
                        op: "version",
                        source,
                    })?;
                let chosen = choose_api_version(&v.api_version)?;
                tracing::debug!(server = %v.api_version, %chosen, "negotiated Docker API version");
                Ok(chosen)
            })
            .await
            .cloned()
    }

    /// `/v{version}{path}`, negotiating first if needed.
    pub(super) async fn versioned(&self, path: &str) -> Result<String, DockerError> {
        let v = self.negotiate().await?;
        Ok(format!("/v{v}{path}"))
    }

    fn build(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        headers: &[(&'static str, &str)],
    ) -> Result<Request<Full<Bytes>>, DockerError> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.inner.transport.host_header)
            .header(header::USER_AGENT, "containerssh");
        let typed = headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case(header::CONTENT_TYPE.as_str()));
        if body.is_some() && !typed {
            b = b.header(header::CONTENT_TYPE, "application/json");
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(Full::new(body.unwrap_or_default()))
            .map_err(|e| DockerError::Http {
                op,
                source: HttpError::Build(e),
            })
    }

    /// Sends one request on a fresh connection; the guard keeps it alive.
    async fn send(
        &self,
        op: &'static str,
        req: Request<Full<Bytes>>,
        upgrades: bool,
    ) -> Result<(Response<Incoming>, ConnGuard), DockerError> {
        let sent = async {
            let io = self.inner.transport.connect().await?;
            httpc::send(io, req, upgrades).await
        };
        sent.await
            .map_err(|source| DockerError::Http { op, source })
    }

    /// Runs `fut` under the HTTP timeout.
    async fn timed<T>(
        &self,
        op: &'static str,
        fut: impl Future<Output = Result<T, DockerError>>,
    ) -> Result<T, DockerError> {
        tokio::time::timeout(self.inner.http_timeout, fut)
            .await
            .map_err(|_| DockerError::Timeout { op })?
    }

    /// A complete request/response under the HTTP timeout; body capped at [`MAX_RESPONSE_BYTES`].
    pub(super) async fn call(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), DockerError> {
        self.timed(op, self.call_untimed(op, method, path, body))
            .await
    }

    /// Like [`call`](Self::call) but without any timeout (for long waits).
    pub(super) async fn call_untimed(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), DockerError> {
        self.call_untimed_with(op, method, path, body.map(Bytes::from), &[])
            .await
    }

    /// Like [`call_untimed`](Self::call_untimed) with extra request headers;
    /// a `content-type` among them replaces the default `application/json`.
    pub(super) async fn call_untimed_with(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        headers: &[(&'static str, &str)],
    ) -> Result<(StatusCode, Bytes), DockerError> {
        let req = self.build(op, method, path, body, headers)?;
        self.exchange(op, req).await
    }

    async fn exchange(
        &self,
        op: &'static str,
        req: Request<Full<Bytes>>,
    ) -> Result<(StatusCode, Bytes), DockerError> {
        let (resp, _guard) = self.send(op, req, false).await?;
        let status = resp.status();
        let bytes = read_capped(op, resp.into_body()).await?;
        Ok((status, bytes))
    }

    /// Sends a request whose body is streamed back (image pull); the HTTP
    /// timeout covers only connecting and the response head.
    pub(super) async fn stream(
        &self,
        op: &'static str,
        method: Method,
        path: &str,
        headers: &[(&'static str, &str)],
    ) -> Result<(Response<Incoming>, ConnGuard), DockerError> {
        let req = self.build(op, method, path, None, headers)?;
        self.timed(op, self.send(op, req, false)).await
    }

    /// Hijacks the connection (`Upgrade: tcp`); the HTTP timeout covers
    /// connecting and the response head only, not the stream.
    pub(super) async fn hijack(
        &self,
        op: &'static str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<HijackReply, DockerError> {
        let req = self.build(
            op,
            Method::POST,
            path,
            body.map(Bytes::from),
            &[("connection", "Upgrade"), ("upgrade", "tcp")],
        )?;
        self.timed(op, async {
            let (resp, guard) = self.send(op, req, true).await?;
            match resp.status() {
                StatusCode::SWITCHING_PROTOCOLS => {
                    let upgraded =
                        hyper::upgrade::on(resp)
                            .await
                            .map_err(|e| DockerError::Http {
                                op,
                                source: HttpError::Exchange(e),
                            })?;
                    Ok(HijackReply::Stream(Hijacked::from_upgraded(upgraded)))
                }
                StatusCode::OK => Ok(HijackReply::Stream(Hijacked::from_body(
                    resp.into_body(),
                    guard,
                ))),
                status => {
                    let bytes = read_capped(op, resp.into_body()).await?;
                    Ok(HijackReply::Failed(status, bytes))
                }
            }
        })
        .await
    }
}

/// Reads a whole body, up to [`MAX_RESPONSE_BYTES`].
async fn read_capped(op: &'static str, body: Incoming) -> Result<Bytes, DockerError> {
    httpc::read_capped(body, MAX_RESPONSE_BYTES)
        .await
        .map_err(|source| DockerError::Http { op, source })
}

/// Message from Docker's `{"message": "..."}` error body, else the (truncated) raw text.
pub(super) fn error_message(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Msg {
        message: String,
    }
    let text = match serde_json::from_slice::<Msg>(body) {
        Ok(m) => m.message,
        Err(_) => String::from_utf8_lossy(body).trim().to_string(),
    };
    truncate(text, MAX_ERROR_MESSAGE_BYTES)
}

/// Truncates at a char boundary to at most `max` bytes.
pub(super) fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Generic error for an unexpected status.
pub(super) fn status_error(op: &'static str, status: StatusCode, body: &[u8]) -> DockerError {
    DockerError::Status {
        op,
        status: status.as_u16(),
        message: error_message(body),
    }
}

/// Parses `"1.41"` into `(1, 41)`.
pub(super) fn parse_api_version(v: &str) -> Option<(u32, u32)> {
    let (major, minor) = v.trim().split_once('.')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// min(server, MAX_API_VERSION), rejecting servers below MIN_API_VERSION.
pub(super) fn choose_api_version(server: &str) -> Result<String, DockerError> {
    let parsed = parse_api_version(server).ok_or_else(|| DockerError::BadApiVersion {
        version: server.to_string(),
    })?;
    let min = parse_api_version(MIN_API_VERSION).unwrap_or((1, 40));
    let max = parse_api_version(MAX_API_VERSION).unwrap_or((1, 47));
    if parsed < min {
        return Err(DockerError::ApiTooOld {
            server: server.to_string(),
            minimum: MIN_API_VERSION,
        });
    }
    let (a, b) = parsed.min(max);
    Ok(format!("{a}.{b}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_choice() {
        assert_eq!(choose_api_version("1.41").unwrap(), "1.41");
        assert_eq!(choose_api_version("1.40").unwrap(), "1.40");
        assert_eq!(choose_api_version("1.47").unwrap(), "1.47");
        assert_eq!(choose_api_version("1.50").unwrap(), "1.47");
        assert_eq!(choose_api_version("2.0").unwrap(), "1.47");
        assert!(matches!(
            choose_api_version("1.39"),
            Err(DockerError::ApiTooOld { .. })
        ));
        assert!(matches!(
            choose_api_version("banana"),
            Err(DockerError::BadApiVersion { .. })
        ));
        // numeric, not lexicographic
        assert!(parse_api_version("1.9") < parse_api_version("1.10"));
    }

    #[test]
    fn error_messages() {
        assert_eq!(error_message(br#"{"message":"boom"}"#), "boom");
        assert_eq!(error_message(b"plain text\n"), "plain text");
        let long = "é".repeat(MAX_ERROR_MESSAGE_BYTES);
        assert!(error_message(long.as_bytes()).len() <= MAX_ERROR_MESSAGE_BYTES);
    }
}
