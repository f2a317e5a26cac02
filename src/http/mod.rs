//! The HTTP client plumbing the webhooks, the Docker engine client and the Kubernetes API
//! client share: opening TCP and TLS connections ([`connect_tcp`], [`connect_tls`]), one
//! HTTP/1.1 exchange on a fresh connection ([`send`], upgrades allowed), capped body reads
//! ([`read_capped`]), the rustls client settings ([`tls`]), and one [`HttpError`] the three
//! clients wrap as the `#[source]` of their own errors.
//!
//! Each client keeps what is its own: the webhook its retries and redirects, Docker its
//! unix-socket transport and hijacked streams, Kubernetes its authentication and watches.
//! Deadlines are the clients' (each bounds a whole call by its configured timeout); dropping
//! a call's future drops its connection, and a [`ConnGuard`] ends the connection's task.
//!
//! One connection per request: each client makes a handful of calls per SSH login, so a pool
//! is not worth its state; hyper-util's pooling client is not used. For the same reason the
//! Docker socket does not go through `hyperlocal`, whose connector serves that pooling client:
//! a unix socket is one more [`tokio::net::UnixStream`] under [`send`], and the hijacked
//! attach/exec streams need the connection's upgrade, which [`send`] keeps.

pub mod tls;

use std::io;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;

/// Why one HTTP exchange failed, below the clients' own meaning of it.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// No connection: refused, unreachable, a missing socket. The peer may come back.
    #[error("connecting to {to}: {source}")]
    Connect {
        to: String,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with {to}: {source}")]
    Tls {
        to: String,
        #[source]
        source: io::Error,
    },
    #[error("building the request: {0}")]
    Build(#[source] http::Error),
    /// The HTTP exchange itself (handshake, request, response head, upgrade).
    #[error("HTTP: {0}")]
    Exchange(#[source] hyper::Error),
    #[error("reading the response body: {0}")]
    Body(#[source] hyper::Error),
    #[error("response body larger than {limit} bytes")]
    TooLarge { limit: usize },
}

impl HttpError {
    /// The peer could not be reached at all (as opposed to answering badly).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, HttpError::Connect { .. })
    }
}

/// A TCP connection with Nagle off (requests are small and answered at once).
pub async fn connect_tcp(host: &str, port: u16) -> Result<TcpStream, HttpError> {
    let failed = |source| HttpError::Connect {
        to: if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        },
        source,
    };
    let tcp = TcpStream::connect((host, port)).await.map_err(failed)?;
    tcp.set_nodelay(true).map_err(failed)?;
    Ok(tcp)
}

/// TLS over `tcp`, verifying the server as `name`.
pub async fn connect_tls(
    tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
) -> Result<TlsStream<TcpStream>, HttpError> {
    let to = name.to_str().into_owned();
    tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|source| HttpError::Tls { to, source })
}

/// Aborts a connection's task when dropped: when the caller is done with the response (or
/// gave up on it), the connection goes too.
pub struct ConnGuard(JoinHandle<()>);

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Sends `request` as the one request of the connection `io`; `upgrades`: the connection may
/// be taken over after the response (`101`, or Docker's hijack). The response's body is read
/// while the guard lives.
pub async fn send<T>(
    io: T,
    request: Request<Full<Bytes>>,
    upgrades: bool,
) -> Result<(Response<Incoming>, ConnGuard), HttpError>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(HttpError::Exchange)?;
    let task = tokio::spawn(async move {
        let ended = if upgrades {
            conn.with_upgrades().await
        } else {
            conn.await
        };
        if let Err(error) = ended {
            tracing::debug!(%error, "HTTP connection ended with an error");
        }
    });
    let guard = ConnGuard(task);
    let response = sender
        .send_request(request)
        .await
        .map_err(HttpError::Exchange)?;
    Ok((response, guard))
}

/// Reads a whole body, failing as soon as it would exceed `limit` bytes.
pub async fn read_capped(mut body: Incoming, limit: usize) -> Result<Bytes, HttpError> {
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(HttpError::Body)?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(HttpError::TooLarge { limit });
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}
