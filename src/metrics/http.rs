//! The two HTTP endpoints, on the hyper the clients already use (its server half): `metrics`
//! (the exposition text at `metrics.path`, 404 elsewhere) and `health` (any path: 200 `ok`
//! while serving, 503 `not ok` before the SSH listener is up and from SIGTERM on, so a
//! readiness probe takes the server out of rotation before the drain; JSON unless the client
//! asks for `text/plain`, as ContainerSSH). Both bound before the sandbox, optionally with TLS
//! (`cert`, `key`; `clientcacert` for client certificates).
//!
//! Bounded: [`MAX_HTTP_CONNECTIONS`] at once (the rest wait in the kernel's backlog), request
//! headers within [`HEADER_TIMEOUT`], a connection for at most [`CONNECTION_TIMEOUT`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::model::HttpServerConfig;

pub const MAX_HTTP_CONNECTIONS: usize = 64;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

const STARTING: u8 = 0;
const RUNNING: u8 = 1;
const STOPPING: u8 = 2;

/// The server's state as the health endpoint reports it.
#[derive(Clone)]
pub struct Health(Arc<AtomicU8>);

impl Default for Health {
    /// Starting: not yet serving.
    fn default() -> Self {
        Self(Arc::new(AtomicU8::new(STARTING)))
    }
}

impl Health {
    /// The SSH listener serves.
    pub fn running(&self) {
        self.0.store(RUNNING, Ordering::Release);
    }

    /// Draining (SIGTERM): no longer ready.
    pub fn stopping(&self) {
        self.0.store(STOPPING, Ordering::Release);
    }

    pub fn is_ok(&self) -> bool {
        self.0.load(Ordering::Acquire) == RUNNING
    }
}

/// What an endpoint answers.
#[derive(Clone)]
pub enum Endpoint {
    Metrics { path: String },
    Health(Health),
}

/// A bound endpoint, not yet serving.
pub struct Bound {
    listener: std::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    pub addr: SocketAddr,
}

/// Why an endpoint cannot be set up; names the key.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("{key}.listen: cannot listen on {addr}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}: {reason}")]
    Tls { key: &'static str, reason: String },
}

/// Binds `listen` (before the sandbox) and reads the TLS material.
pub fn bind(
    key: &'static str,
    listen: SocketAddr,
    cfg: &HttpServerConfig,
) -> Result<Bound, EndpointError> {
    let tls = if cfg.cert.is_empty() && cfg.key.is_empty() {
        None
    } else {
        let tls = crate::webhook::server_tls(key, cfg)
            .map_err(|reason| EndpointError::Tls { key, reason })?;
        Some(Arc::new(tls))
    };
    let failed = |source| EndpointError::Bind {
        key,
        addr: listen,
        source,
    };
    let listener = crate::server::listen(listen).map_err(failed)?;
    listener.set_nonblocking(true).map_err(failed)?;
    let addr = listener.local_addr().map_err(failed)?;
    Ok(Bound {
        listener,
        tls,
        addr,
    })
}

/// Serves `endpoint` on `bound` until the process ends.
pub async fn serve(bound: Bound, endpoint: Endpoint) {
    let listener = match TcpListener::from_std(bound.listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(code = "METRICS_ENDPOINT_FAILED", error = %e, "cannot serve the HTTP endpoint");
            return;
        }
    };
    let acceptor = bound.tls.map(tokio_rustls::TlsAcceptor::from);
    let places = Arc::new(Semaphore::new(MAX_HTTP_CONNECTIONS));
    loop {
        let Ok(place) = Arc::clone(&places).acquire_owned().await else {
            return;
        };
        let (tcp, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(code = "METRICS_ENDPOINT_ACCEPT_FAILED", error = %e, "HTTP endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let endpoint = endpoint.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let _place = place;
            let work = async {
                match acceptor {
                    Some(a) => match a.accept(tcp).await {
                        Ok(tls) => connection(TokioIo::new(tls), endpoint).await,
                        Err(e) => {
                            tracing::debug!(error = %e, "HTTP endpoint: TLS handshake failed")
                        }
                    },
                    None => connection(TokioIo::new(tcp), endpoint).await,
                }
            };
            let _ = tokio::time::timeout(CONNECTION_TIMEOUT, work).await;
        });
    }
}

async fn connection<T>(io: TokioIo<T>, endpoint: Endpoint)
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let response = answer(&endpoint, &req);
        async move { Ok::<_, std::convert::Infallible>(response) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(io, service)
        .await;
    if let Err(e) = served {
        tracing::debug!(error = %e, "HTTP endpoint: connection ended with an error");
    }
}

fn answer(endpoint: &Endpoint, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &'static str, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(content_type),
        );
        r
    };
    match endpoint {
        Endpoint::Metrics { path } if req.uri().path() == path => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            super::get().render(),
        ),
        Endpoint::Metrics { .. } => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found\n".into(),
        ),
        Endpoint::Health(h) => {
            let (status, word) = if h.is_ok() {
                (StatusCode::OK, "ok")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "not ok")
            };
            let plain = req
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("text/plain"));
            if plain {
                reply(status, "text/plain; charset=utf-8", word.into())
            } else {
                reply(status, "application/json", format!("\"{word}\""))
            }
        }
    }
}

/// `containerssh --healthcheck`: one GET of `health.client.url`; Ok when it answers 200.
pub async fn check(cfg: &crate::config::model::HealthClientConfig) -> Result<(), String> {
    let hook = crate::webhook::Webhook::new("health.client", &cfg.as_webhook())?;
    match tokio::time::timeout(cfg.timeout.0, hook.probe()).await {
        Ok(Ok(StatusCode::OK)) => Ok(()),
        Ok(Ok(status)) => Err(format!("{} answered {status}", cfg.url)),
        Ok(Err(e)) => Err(crate::backend::one_line(&e)),
        Err(_) => Err(format!(
            "{} did not answer within {:?}",
            cfg.url, cfg.timeout.0
        )),
    }
}
