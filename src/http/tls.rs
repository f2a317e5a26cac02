//! The rustls client settings of the three HTTP clients, built in one place: trust only the
//! given CA certificates, present a client certificate when one is given, the ring provider
//! (the caller may narrow its key exchange groups and cipher suites), the protocol versions
//! the caller allows, ALPN `http/1.1` where the peer negotiates it.

use std::fmt;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::SupportedProtocolVersion;

/// TLS 1.3 and 1.2.
pub const TLS12_AND_13: &[&SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];
/// TLS 1.3 only.
pub const TLS13_ONLY: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// What a client trusts and presents.
pub struct ClientTls<'a> {
    /// PEM: the CA certificates the server's chain must end in (nothing else is trusted).
    pub ca: &'a [u8],
    /// PEM: the client certificate chain and its key (PKCS#8, PKCS#1 or SEC1).
    pub cert: Option<&'a [u8]>,
    pub key: Option<&'a [u8]>,
    pub versions: &'a [&'static SupportedProtocolVersion],
    /// The ring provider, possibly narrowed; `None`: ring's defaults.
    pub provider: Option<CryptoProvider>,
    /// Offer ALPN `http/1.1` (for servers that negotiate it: the API server, webhooks).
    pub alpn_http1: bool,
}

/// Which part of the settings is unusable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsPart {
    Ca,
    Cert,
    Key,
    Versions,
}

impl fmt::Display for TlsPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsPart::Ca => "CA certificate",
            TlsPart::Cert => "client certificate",
            TlsPart::Key => "client key",
            TlsPart::Versions => "protocol versions",
        })
    }
}

/// Settings that cannot be used, with the part that is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{part}: {reason}")]
pub struct TlsError {
    pub part: TlsPart,
    pub reason: String,
}

fn bad(part: TlsPart, reason: impl fmt::Display) -> TlsError {
    TlsError {
        part,
        reason: reason.to_string(),
    }
}

/// The certificates in PEM data; at least one.
fn certificates(pem: &[u8], part: TlsPart) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(part, e))?;
    if certs.is_empty() {
        return Err(bad(part, "no certificate in the PEM data"));
    }
    Ok(certs)
}

/// The client configuration for `tls`.
pub fn client_config(tls: ClientTls<'_>) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certificates(tls.ca, TlsPart::Ca)? {
        roots.add(c).map_err(|e| bad(TlsPart::Ca, e))?;
    }
    let provider = tls
        .provider
        .unwrap_or_else(rustls::crypto::ring::default_provider);
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(tls.versions)
        .map_err(|e| bad(TlsPart::Versions, e))?
        .with_root_certificates(roots);
    let mut config = match (tls.cert, tls.key) {
        (Some(cert), Some(key)) => {
            let chain = certificates(cert, TlsPart::Cert)?;
            // Whichever form the PEM label says.
            let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| bad(TlsPart::Key, e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| bad(TlsPart::Cert, e))?
        }
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) => return Err(bad(TlsPart::Key, "missing: give it with the certificate")),
        (None, Some(_)) => return Err(bad(TlsPart::Cert, "missing: give it with the key")),
    };
    if tls.alpn_http1 {
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    Ok(config)
}

/// What a TLS server needs: its chain and key, and optionally the CA its clients' certificates
/// must chain to (PEM).
pub struct ServerTls<'a> {
    pub cert: &'a [u8],
    pub key: &'a [u8],
    pub client_ca: Option<&'a [u8]>,
    pub versions: &'a [&'static SupportedProtocolVersion],
    pub provider: CryptoProvider,
}

/// A rustls server configuration (HTTP/1.1); errors name the part.
pub fn server_config(tls: ServerTls<'_>) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(tls.provider);
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(tls.versions)
        .map_err(|e| bad(TlsPart::Versions, e))?;
    let builder = match tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certificates(ca, TlsPart::Ca)? {
                roots.add(c).map_err(|e| bad(TlsPart::Ca, e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| bad(TlsPart::Ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let chain = certificates(tls.cert, TlsPart::Cert)?;
    let key = PrivateKeyDer::from_pem_slice(tls.key).map_err(|e| bad(TlsPart::Key, e))?;
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| bad(TlsPart::Cert, e))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(ca: &[u8]) -> ClientTls<'_> {
        ClientTls {
            ca,
            cert: None,
            key: None,
            versions: TLS12_AND_13,
            provider: None,
            alpn_http1: true,
        }
    }

    #[test]
    fn each_unusable_part_is_named() {
        let e = client_config(tls(b"")).unwrap_err();
        assert_eq!(e.part, TlsPart::Ca);
        assert_eq!(
            e.to_string(),
            "CA certificate: no certificate in the PEM data"
        );
        let junk = b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n";
        assert_eq!(client_config(tls(junk)).unwrap_err().part, TlsPart::Ca);
    }
}
