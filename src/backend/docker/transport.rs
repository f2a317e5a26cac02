//! Byte transports to the Docker engine: parses the `host` setting
//! (`unix://` path or `tcp://host:port`, TLS when cacert, cert and key are
//! all set) and opens unix socket, TCP or TLS connections.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::UnixStream;

use super::{DockerConnection, DockerError};
use crate::http::{self as httpc, tls, HttpError};

/// Default plain-text engine port when `tcp://host` has none.
const DEFAULT_TCP_PORT: u16 = 2375;
/// Default TLS engine port when `tcp://host` has none.
const DEFAULT_TLS_PORT: u16 = 2376;

/// A bidirectional byte stream to the engine.
pub(super) trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

enum Kind {
    Unix(PathBuf),
    Tcp {
        host: String,
        port: u16,
    },
    Tls {
        host: String,
        port: u16,
        server_name: ServerName<'static>,
        config: Arc<rustls::ClientConfig>,
    },
}

/// How to reach the engine, parsed from [`DockerConnection`].
pub(super) struct Transport {
    kind: Kind,
    /// The configured `host`, for error messages.
    host: String,
    /// Value of the HTTP `Host` header.
    pub(super) host_header: String,
}

impl Transport {
    /// Parses the connection settings; no network traffic happens here.
    pub(super) fn parse(conn: &DockerConnection) -> Result<Self, DockerError> {
        let invalid = |reason| DockerError::InvalidHost {
            host: conn.host.clone(),
            reason,
        };
        let (kind, host_header) = if let Some(path) = conn.host.strip_prefix("unix://") {
            if !path.starts_with('/') {
                return Err(invalid("unix socket path must be absolute"));
            }
            (Kind::Unix(PathBuf::from(path)), "docker".to_string())
        } else if let Some(rest) = conn.host.strip_prefix("tcp://") {
            let rest = rest.trim_end_matches('/');
            let tls = tls_material(conn);
            let default_port = if tls.is_some() {
                DEFAULT_TLS_PORT
            } else {
                DEFAULT_TCP_PORT
            };
            let (hostname, port) = split_host_port(rest, default_port).ok_or_else(|| {
                invalid("expected tcp://host:port with a non-empty host and numeric port")
            })?;
            let addr = if hostname.contains(':') {
                format!("[{hostname}]:{port}")
            } else {
                format!("{hostname}:{port}")
            };
            let host = hostname.to_string();
            let kind = match tls {
                Some((ca, cert, key)) => Kind::Tls {
                    host,
                    port,
                    server_name: ServerName::try_from(hostname.to_string())
                        .map_err(|_| invalid("host is not a valid TLS server name"))?,
                    config: Arc::new(tls_config(ca, cert, key)?),
                },
                None => {
                    if [&conn.cacert, &conn.cert, &conn.key]
                        .iter()
                        .any(|v| v.as_deref().is_some_and(|s| !s.is_empty()))
                    {
                        tracing::warn!(code = "DOCKER_TLS_INCOMPLETE", host = %conn.host, "Docker TLS needs cacert, cert and key; some are missing, connecting without TLS");
                    }
                    Kind::Tcp { host, port }
                }
            };
            (kind, addr)
        } else {
            return Err(invalid("only unix:// and tcp:// addresses are supported"));
        };
        Ok(Self {
            kind,
            host: conn.host.clone(),
            host_header,
        })
    }

    pub(super) async fn connect(&self) -> Result<Box<dyn Io>, HttpError> {
        Ok(match &self.kind {
            Kind::Unix(path) => {
                let socket = UnixStream::connect(path).await;
                Box::new(socket.map_err(|source| HttpError::Connect {
                    to: self.host.clone(),
                    source,
                })?)
            }
            Kind::Tcp { host, port } => Box::new(httpc::connect_tcp(host, *port).await?),
            Kind::Tls {
                host,
                port,
                server_name,
                config,
            } => {
                let tcp = httpc::connect_tcp(host, *port).await?;
                Box::new(httpc::connect_tls(tcp, config.clone(), server_name.clone()).await?)
            }
        })
    }
}

/// Splits `host[:port]` / `[v6]:port`; the host is returned without brackets.
fn split_host_port(s: &str, default_port: u16) -> Option<(&str, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        match after.strip_prefix(':') {
            Some(p) => (h, p.parse().ok()?),
            None if after.is_empty() => (h, default_port),
            None => return None,
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().ok()?),
            None => (s, default_port),
        }
    };
    if host.is_empty() || host.contains('/') {
        return None;
    }
    Some((host, port))
}

/// The three PEM texts when all are set and non-empty (ContainerSSH semantics).
fn tls_material(conn: &DockerConnection) -> Option<(&str, &str, &str)> {
    fn get(v: &Option<String>) -> Option<&str> {
        v.as_deref().filter(|s| !s.trim().is_empty())
    }
    Some((get(&conn.cacert)?, get(&conn.cert)?, get(&conn.key)?))
}

/// Only the given CA, and the client certificate: what the engine's `--tlsverify` expects.
fn tls_config(ca: &str, cert: &str, key: &str) -> Result<rustls::ClientConfig, DockerError> {
    tls::client_config(tls::ClientTls {
        ca: ca.as_bytes(),
        cert: Some(cert.as_bytes()),
        key: Some(key.as_bytes()),
        versions: tls::TLS12_AND_13,
        provider: None,
        alpn_http1: false,
    })
    .map_err(DockerError::TlsConfig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_parsing() {
        assert_eq!(split_host_port("h:1", 9), Some(("h", 1)));
        assert_eq!(split_host_port("h", 9), Some(("h", 9)));
        assert_eq!(split_host_port("[::1]:5", 9), Some(("::1", 5)));
        assert_eq!(split_host_port("[::1]", 9), Some(("::1", 9)));
        assert_eq!(split_host_port(":5", 9), None);
        assert_eq!(split_host_port("h:x", 9), None);
        let conn = |host: &str| DockerConnection {
            host: host.into(),
            ..Default::default()
        };
        assert!(Transport::parse(&conn("unix:///var/run/docker.sock")).is_ok());
        assert!(Transport::parse(&conn("tcp://127.0.0.1:2375")).is_ok());
        assert!(Transport::parse(&conn("unix://relative")).is_err());
        assert!(Transport::parse(&conn("http://x")).is_err());
        let bad_tls = DockerConnection {
            host: "tcp://127.0.0.1:2376".into(),
            cacert: Some("junk".into()),
            cert: Some("junk".into()),
            key: Some("junk".into()),
        };
        assert!(matches!(
            Transport::parse(&bad_tls),
            Err(DockerError::TlsConfig(_))
        ));
    }
}
