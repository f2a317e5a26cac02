//! Byte transports to the Docker engine: parses the `host` setting
//! (`unix://` path or `tcp://host:port`, TLS when cacert, cert and key are
//! all set) and opens unix socket, TCP or TLS connections.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

use super::{DockerConnection, DockerError};

/// Default plain-text engine port when `tcp://host` has none.
const DEFAULT_TCP_PORT: u16 = 2375;
/// Default TLS engine port when `tcp://host` has none.
const DEFAULT_TLS_PORT: u16 = 2376;

/// A bidirectional byte stream to the engine.
pub(super) trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

enum Kind {
    Unix(PathBuf),
    Tcp(String),
    Tls {
        addr: String,
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
            let kind = match tls {
                Some((ca, cert, key)) => Kind::Tls {
                    addr: addr.clone(),
                    server_name: ServerName::try_from(hostname.to_string())
                        .map_err(|_| invalid("host is not a valid TLS server name"))?,
                    config: Arc::new(tls_config(ca, cert, key)?),
                },
                None => {
                    if [&conn.cacert, &conn.cert, &conn.key]
                        .iter()
                        .any(|v| v.as_deref().is_some_and(|s| !s.is_empty()))
                    {
                        tracing::warn!(host = %conn.host, "Docker TLS needs cacert, cert and key; some are missing, connecting without TLS");
                    }
                    Kind::Tcp(addr.clone())
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

    pub(super) async fn connect(&self) -> Result<Box<dyn Io>, DockerError> {
        let err = |source| DockerError::Connect {
            host: self.host.clone(),
            source,
        };
        Ok(match &self.kind {
            Kind::Unix(path) => Box::new(UnixStream::connect(path).await.map_err(err)?),
            Kind::Tcp(addr) => {
                let s = TcpStream::connect(addr).await.map_err(err)?;
                s.set_nodelay(true).map_err(err)?;
                Box::new(s)
            }
            Kind::Tls {
                addr,
                server_name,
                config,
            } => {
                let s = TcpStream::connect(addr).await.map_err(err)?;
                s.set_nodelay(true).map_err(err)?;
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                Box::new(
                    connector
                        .connect(server_name.clone(), s)
                        .await
                        .map_err(err)?,
                )
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

fn tls_config(ca: &str, cert: &str, key: &str) -> Result<rustls::ClientConfig, DockerError> {
    let bad = |what: &str, e: &dyn std::fmt::Display| DockerError::TlsConfig {
        reason: format!("{what}: {e}"),
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        let c = c.map_err(|e| bad("cacert", &e))?;
        roots.add(c).map_err(|e| bad("cacert", &e))?;
    }
    if roots.is_empty() {
        return Err(bad("cacert", &"no certificate found"));
    }
    let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("cert", &e))?;
    if chain.is_empty() {
        return Err(bad("cert", &"no certificate found"));
    }
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| bad("key", &e))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("protocol versions", &e))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| bad("client certificate", &e))
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
            Err(DockerError::TlsConfig { .. })
        ));
    }
}
