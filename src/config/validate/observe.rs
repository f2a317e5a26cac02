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

/// Recordings to make: asciicast files per session channel or a binary file per connection,
/// in a directory.
#[derive(Clone, Debug)]
pub struct Audit {
    pub format: AuditFormat,
    /// `audit.file.directory`, or `audit.s3.local` where recordings wait for their upload.
    pub directory: std::path::PathBuf,
    pub intercept: AuditIntercept,
    /// `storage: s3`: where they go.
    pub s3: Option<AuditS3>,
}

/// `audit.s3`, checked.
#[derive(Clone)]
pub struct AuditS3 {
    pub https: bool,
    /// `host` or `host:port` as the Host header names it.
    pub host: String,
    /// What to connect to: the host name or address, and the port.
    pub connect_host: String,
    pub port: u16,
    pub bucket: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
    pub cacert: Option<std::path::PathBuf>,
    pub acl: String,
    pub path_style: bool,
    pub part_size: u64,
    pub parallel: u32,
    pub metadata_ip: bool,
    pub metadata_username: bool,
}

impl std::fmt::Debug for AuditS3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditS3")
            .field("host", &self.host)
            .field("bucket", &self.bucket)
            .finish_non_exhaustive()
    }
}

/// S3's smallest part (but the last).
const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;

fn s3(file: &str, a: &AuditConfig) -> Result<AuditS3, ConfigError> {
    let c = &a.s3;
    for (key, value) in [
        ("accessKey", &c.access_key),
        ("secretKey", &c.secret_key),
        ("bucket", &c.bucket),
    ] {
        if value.is_empty() {
            return Err(invalid(
                file,
                &format!("audit.s3.{key}"),
                "required with storage: s3",
            ));
        }
    }
    if c.upload_part_size < MIN_PART_SIZE {
        return Err(invalid(
            file,
            "audit.s3.uploadPartSize",
            format!("at least {MIN_PART_SIZE} bytes (S3's smallest part)"),
        ));
    }
    if c.parallel_uploads == 0 {
        return Err(invalid(file, "audit.s3.parallelUploads", "at least 1"));
    }
    if !std::path::Path::new(&c.local).is_absolute() {
        return Err(invalid(file, "audit.s3.local", "must be an absolute path"));
    }
    let region = if c.region.is_empty() {
        "us-east-1".to_string()
    } else {
        c.region.clone()
    };
    let endpoint = if c.endpoint.is_empty() {
        format!("https://s3.{region}.amazonaws.com")
    } else {
        c.endpoint.trim_end_matches('/').to_string()
    };
    let bad = |why: &str| invalid(file, "audit.s3.endpoint", format!("{endpoint:?}: {why}"));
    let uri: http::Uri = endpoint.parse().map_err(|_| bad("not a URL"))?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(bad("the scheme must be http or https")),
    };
    if uri.path() != "/" && !uri.path().is_empty() || uri.query().is_some() {
        return Err(bad("an endpoint has no path"));
    }
    let authority = uri.authority().ok_or_else(|| bad("no host"))?;
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    Ok(AuditS3 {
        https,
        host: authority.as_str().to_string(),
        connect_host: authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port,
        bucket: c.bucket.clone(),
        region,
        access_key: c.access_key.clone(),
        secret_key: c.secret_key.clone(),
        cacert: (!c.cacert.is_empty()).then(|| c.cacert.clone().into()),
        acl: c.acl.clone(),
        path_style: c.path_style_access,
        part_size: c.upload_part_size,
        parallel: c.parallel_uploads,
        metadata_ip: c.metadata.ip,
        metadata_username: c.metadata.username,
    })
}

/// `audit`, when enabled with a format and a storage.
pub(super) fn audit(file: &str, a: &AuditConfig) -> Result<Option<Audit>, ConfigError> {
    if !a.enable || a.format == AuditFormat::None || a.storage == AuditStorage::None {
        return Ok(None);
    }
    if a.intercept.forwarding && a.format == AuditFormat::Asciinema {
        return Err(invalid(
            file,
            "audit.intercept.forwarding",
            "the asciinema format has no place for forwarded data: use format binary",
        ));
    }
    let s3 = match a.storage {
        AuditStorage::S3 => Some(s3(file, a)?),
        _ => None,
    };
    let directory = match &s3 {
        Some(_) => a.s3.local.clone(),
        None => {
            if !std::path::Path::new(&a.file.directory).is_absolute() {
                return Err(invalid(
                    file,
                    "audit.file.directory",
                    "must be an absolute path",
                ));
            }
            a.file.directory.clone()
        }
    };
    Ok(Some(Audit {
        format: a.format,
        s3,
        directory: directory.into(),
        intercept: a.intercept.clone(),
    }))
}
