//! `metrics`, `health` and `audit`: what operators see.

use std::net::SocketAddr;

use super::invalid;
use crate::config::model::{
    AuditConfig, AuditFormat, AuditIntercept, AuditStorage, HealthConfig, HttpServerConfig,
    MetricsConfig,
};
use crate::config::ConfigError;

/// An endpoint to serve: where, and its TLS keys (read when it is bound).
#[derive(Clone, Debug)]
pub struct Served {
    pub listen: SocketAddr,
    pub server: HttpServerConfig,
}

fn served(file: &str, key: &str, server: HttpServerConfig) -> Result<Served, ConfigError> {
    let listen = server.listen.parse().map_err(|e| {
        invalid(
            file,
            &format!("{key}.listen"),
            format!("{:?} is not an address:port ({e})", server.listen),
        )
    })?;
    if server.cert.is_empty() != server.key.is_empty() {
        return Err(invalid(
            file,
            &format!("{key}.cert"),
            "cert and key go together",
        ));
    }
    if !server.clientcacert.is_empty() && server.cert.is_empty() {
        return Err(invalid(
            file,
            &format!("{key}.clientcacert"),
            "client certificates need TLS: set cert and key",
        ));
    }
    Ok(Served { listen, server })
}

/// `metrics`, when enabled: the endpoint and its path.
pub(super) fn metrics(
    file: &str,
    m: &MetricsConfig,
) -> Result<Option<(Served, String)>, ConfigError> {
    if !m.enable {
        return Ok(None);
    }
    if !m.path.starts_with('/') {
        return Err(invalid(file, "metrics.path", "must start with /"));
    }
    Ok(Some((served(file, "metrics", m.server())?, m.path.clone())))
}

/// `health`, when enabled.
pub(super) fn health(file: &str, h: &HealthConfig) -> Result<Option<Served>, ConfigError> {
    if !h.enable {
        return Ok(None);
    }
    served(file, "health", h.server()).map(Some)
}

/// Recordings to make: asciicast files in a directory.
#[derive(Clone, Debug)]
pub struct Audit {
    pub directory: std::path::PathBuf,
    pub intercept: AuditIntercept,
}

/// `audit`, when enabled with a format and a storage.
pub(super) fn audit(file: &str, a: &AuditConfig) -> Result<Option<Audit>, ConfigError> {
    if !a.enable || a.format == AuditFormat::None || a.storage == AuditStorage::None {
        return Ok(None);
    }
    if a.format == AuditFormat::Binary {
        return Err(invalid(
            file,
            "audit.format",
            "binary is not built yet: use asciinema (one asciicast file per session channel)",
        ));
    }
    if a.storage == AuditStorage::S3 {
        return Err(invalid(
            file,
            "audit.storage",
            "s3 is not built yet: use file",
        ));
    }
    if a.intercept.forwarding {
        return Err(invalid(
            file,
            "audit.intercept.forwarding",
            "forwarded data is not recorded by the asciinema format (it has no place for it)",
        ));
    }
    if !std::path::Path::new(&a.file.directory).is_absolute() {
        return Err(invalid(
            file,
            "audit.file.directory",
            "must be an absolute path",
        ));
    }
    Ok(Some(Audit {
        directory: a.file.directory.clone().into(),
        intercept: a.intercept.clone(),
    }))
}
