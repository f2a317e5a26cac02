//! The HTTP client both webhooks (auth and config) use, with ContainerSSH's transport rules
//! (`containerssh-reference.md` §2.1): `POST` JSON, each call bounded by `timeout`, any
//! non-200 answer, transport error or undecodable body a *soft* failure retried (with
//! backoff, not a fixed 10 s) until `authTimeout` runs out, redirects refused unless
//! `allowRedirects`, https with a configured CA, optional client certificate, TLS 1.3 unless
//! `tlsVersion: "1.2"`. Response bodies are capped.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::Full;
use rustls::pki_types::ServerName;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::time::Instant;

use crate::config::model::{AlgorithmList, HttpServerConfig, WebhookConfig};
use crate::http::tls::{self, TlsPart};
use crate::http::{self as httpc, HttpError};

/// Largest response body accepted (login files travel base64-encoded in it).
pub const MAX_WEBHOOK_RESPONSE_BYTES: usize = 4 << 20;
/// Redirects followed when `allowRedirects` is set.
const MAX_REDIRECTS: usize = 5;
/// First pause between attempts; doubled each time up to [`MAX_RETRY_PAUSE`].
const FIRST_RETRY_PAUSE: Duration = Duration::from_millis(200);
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(5);
/// The shortest attempt still made before `authTimeout` runs out.
const MIN_LAST_ATTEMPT: Duration = Duration::from_millis(100);
/// Where system CA certificates are looked for when `https` has no `cacert`.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Why one attempt failed; every one is a soft failure until the overall timeout.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("{url}: {reason}")]
    Transport { url: String, reason: String },
    #[error("{url}: HTTP status {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: redirect to {location:?} refused (allowRedirects is false)")]
    Redirect { url: String, location: String },
    #[error(
        "{url}: redirect to {location:?} refused: it leaves the webhook's origin (scheme, host \
         and port), and the request carries the login's credentials"
    )]
    RedirectOffOrigin { url: String, location: String },
    #[error("{url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("{url}: {source}")]
    Http {
        url: String,
        #[source]
        source: HttpError,
    },
    #[error("{url}: cannot decode the response: {reason}")]
    Decode { url: String, reason: String },
    #[error("{what}: gave up after {attempts} attempt(s) within {within:?}; last error: {last}")]
    GaveUp {
        what: String,
        attempts: u32,
        within: Duration,
        last: Box<WebhookError>,
    },
}

/// A webhook endpoint as configured.
#[derive(Clone)]
pub struct Webhook {
    inner: Arc<Inner>,
}

impl WebhookError {
    /// A short code for metrics' `reason` label.
    pub fn reason(&self) -> &'static str {
        match self {
            WebhookError::Transport { .. } => "transport",
            WebhookError::Status { .. } => "status",
            WebhookError::Redirect { .. } | WebhookError::RedirectOffOrigin { .. } => "redirect",
            WebhookError::Timeout { .. } => "timeout",
            WebhookError::Http { .. } => "http",
            WebhookError::Decode { .. } => "decode",
            WebhookError::GaveUp { .. } => "gaveup",
        }
    }
}

/// Which ContainerSSH metrics count a webhook's requests.
fn count_request(key: &str, retry: bool, failure: Option<(&str, &WebhookError)>) {
    let m = crate::metrics::get();
    let retry = if retry { "1" } else { "0" };
    let authtype = match key {
        "configserver" => {
            match failure {
                None => m.config_server_requests.inc(&[retry]),
                Some((kind, _)) => m.config_server_failures.inc(&[kind, retry]),
            }
            return;
        }
        "auth.password.webhook" => "password",
        "auth.publicKey.webhook" => "pubkey",
        "auth.authz.webhook" => "authz",
        // `--healthcheck`'s client and anything else: not ContainerSSH's auth metrics.
        _ => return,
    };
    match failure {
        None => m.auth_server_requests.inc(&[authtype, retry]),
        Some((kind, e)) => m
            .auth_server_failures
            .inc(&[kind, authtype, retry, e.reason()]),
    }
}

struct Inner {
    /// The configuration key, for messages (`auth.password.webhook`).
    key: String,
    base: String,
    timeout: Duration,
    auth_timeout: Duration,
    allow_redirects: bool,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("key", &self.inner.key)
            .field("url", &self.inner.base)
            .finish_non_exhaustive()
    }
}

/// PEM given inline or as a file name.
fn pem(key: &str, field: &str, value: &str) -> Result<Option<Vec<u8>>, String> {
    if value.trim().is_empty() {
        return Ok(None);
    }
    if value.trim_start().starts_with("-----BEGIN") {
        return Ok(Some(value.as_bytes().to_vec()));
    }
    std::fs::read(value)
        .map(Some)
        .map_err(|e| format!("{key}.{field}: cannot read {value}: {e}"))
}

fn kx_group(name: &str) -> Option<Option<&'static dyn rustls::crypto::SupportedKxGroup>> {
    use rustls::crypto::ring::kx_group;
    Some(match name {
        "x25519" | "X25519" => Some(kx_group::X25519),
        "secp256r1" | "P-256" => Some(kx_group::SECP256R1),
        "secp384r1" | "P-384" => Some(kx_group::SECP384R1),
        // Named by ContainerSSH's defaults, not offered by this TLS stack: skipped.
        "secp521r1" | "P-521" => None,
        _ => return None,
    })
}

fn cipher_suite(name: &str) -> Option<rustls::SupportedCipherSuite> {
    use rustls::crypto::ring::cipher_suite as cs;
    Some(match name {
        "TLS_AES_128_GCM_SHA256" => cs::TLS13_AES_128_GCM_SHA256,
        "TLS_AES_256_GCM_SHA384" => cs::TLS13_AES_256_GCM_SHA384,
        "TLS_CHACHA20_POLY1305_SHA256" => cs::TLS13_CHACHA20_POLY1305_SHA256,
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" => cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384" => cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256" => cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384" => cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256" => {
            cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256
        }
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256" => {
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256
        }
        _ => return None,
    })
}

/// ContainerSSH's TLS keys (`tlsVersion`, `curves`, `cipher`) as a provider and versions;
/// errors name `key`'s field.
fn crypto(
    key: &str,
    tls_version: &str,
    curves: &AlgorithmList,
    cipher: &AlgorithmList,
) -> Result<
    (
        rustls::crypto::CryptoProvider,
        &'static [&'static rustls::SupportedProtocolVersion],
    ),
    String,
> {
    let mut provider = rustls::crypto::ring::default_provider();
    if !curves.0.is_empty() {
        let mut groups = Vec::new();
        for name in &curves.0 {
            match kx_group(name) {
                Some(Some(g)) => groups.push(g),
                Some(None) => {}
                None => return Err(format!("{key}.curves: unknown curve {name:?}")),
            }
        }
        if groups.is_empty() {
            return Err(format!("{key}.curves: none of these curves is supported"));
        }
        provider.kx_groups = groups;
    }
    if !cipher.0.is_empty() {
        provider.cipher_suites = cipher
            .0
            .iter()
            .map(|n| cipher_suite(n).ok_or_else(|| format!("{key}.cipher: unknown cipher {n:?}")))
            .collect::<Result<_, _>>()?;
    }
    let versions = match tls_version {
        "" | "1.3" => tls::TLS13_ONLY,
        "1.2" => tls::TLS12_AND_13,
        other => {
            return Err(format!(
                "{key}.tlsVersion: {other:?} is not supported; use \"1.3\" or \"1.2\""
            ))
        }
    };
    Ok((provider, versions))
}

/// The TLS of a `metrics` or `health` endpoint (ContainerSSH's HTTP server keys).
pub fn server_tls(key: &str, cfg: &HttpServerConfig) -> Result<rustls::ServerConfig, String> {
    let (provider, versions) = crypto(key, &cfg.tls_version, &cfg.curves, &cfg.cipher)?;
    let (Some(cert), Some(private)) = (pem(key, "cert", &cfg.cert)?, pem(key, "key", &cfg.key)?)
    else {
        return Err(format!("{key}: cert and key go together"));
    };
    let client_ca = pem(key, "clientcacert", &cfg.clientcacert)?;
    tls::server_config(tls::ServerTls {
        cert: &cert,
        key: &private,
        client_ca: client_ca.as_deref(),
        versions,
        provider,
    })
    .map_err(|e| {
        let field = match e.part {
            TlsPart::Ca => "clientcacert",
            TlsPart::Key => "key",
            TlsPart::Versions => "tlsVersion",
            TlsPart::Cert => "cert",
        };
        format!("{key}.{field}: {}", e.reason)
    })
}

fn tls_config(key: &str, cfg: &WebhookConfig) -> Result<rustls::ClientConfig, String> {
    let ca = match pem(key, "cacert", &cfg.cacert)? {
        Some(ca) => ca,
        None => std::fs::read(SYSTEM_CA_BUNDLE).map_err(|e| {
            format!("{key}.cacert: required for https (no {SYSTEM_CA_BUNDLE}: {e})")
        })?,
    };
    let (provider, versions) = crypto(key, &cfg.tls_version, &cfg.curves, &cfg.cipher)?;
    let (cert, client_key) = (pem(key, "cert", &cfg.cert)?, pem(key, "key", &cfg.key)?);
    tls::client_config(tls::ClientTls {
        ca: &ca,
        cert: cert.as_deref(),
        key: client_key.as_deref(),
        versions,
        provider: Some(provider),
        alpn_http1: true,
    })
    .map_err(|e| {
        let field = match e.part {
            TlsPart::Ca => "cacert",
            TlsPart::Cert => "cert",
            TlsPart::Key => "key",
            TlsPart::Versions => "tlsVersion",
        };
        format!("{key}.{field}: {}", e.reason)
    })
}

impl Webhook {
    /// Checks the URL and builds the TLS settings; `key` names the block in messages.
    pub fn new(key: &str, cfg: &WebhookConfig) -> Result<Self, String> {
        let base = cfg.url.trim_end_matches('/').to_string();
        let uri: Uri = base
            .parse()
            .map_err(|e| format!("{key}.url: {:?} is not a URL: {e}", cfg.url))?;
        let tls = match uri.scheme_str() {
            Some("http") => None,
            Some("https") => Some(Arc::new(tls_config(key, cfg)?)),
            _ => return Err(format!("{key}.url: must start with http:// or https://")),
        };
        if uri.host().is_none_or(str::is_empty) {
            return Err(format!("{key}.url: no host in {:?}", cfg.url));
        }
        // The URL is logged with every failed call: it must not carry credentials.
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(format!(
                "{key}.url: credentials in the URL are not supported (they would be logged); use cert and key"
            ));
        }
        if cfg.timeout.0.is_zero() || cfg.auth_timeout.0.is_zero() {
            return Err(format!(
                "{key}: timeout and authTimeout must be more than 0"
            ));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                key: key.to_string(),
                base,
                timeout: cfg.timeout.0,
                auth_timeout: cfg.auth_timeout.0,
                allow_redirects: cfg.allow_redirects,
                tls,
            }),
        })
    }

    /// `POST {url}{path}` with `body`, retried on soft failures with backoff until
    /// `authTimeout`; the decoded 200 answer.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        body: &Req,
    ) -> Result<Resp, WebhookError> {
        let url = format!("{}{path}", self.inner.base);
        let json = serde_json::to_vec(body).map_err(|e| WebhookError::Decode {
            url: url.clone(),
            reason: format!("encoding the request: {e}"),
        })?;
        let json = Bytes::from(json);
        let deadline = Instant::now() + self.inner.auth_timeout;
        let mut pause = FIRST_RETRY_PAUSE;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let limit = self.inner.timeout.min(left);
            count_request(&self.inner.key, attempts > 1, None);
            let result = match tokio::time::timeout(limit, self.attempt(&url, json.clone())).await {
                Ok(r) => r,
                Err(_) => Err(WebhookError::Timeout {
                    url: url.clone(),
                    timeout: limit,
                }),
            };
            let err = match result {
                Ok(bytes) => match serde_json::from_slice::<Resp>(&bytes) {
                    Ok(v) => return Ok(v),
                    Err(e) => WebhookError::Decode {
                        url: url.clone(),
                        reason: e.to_string(),
                    },
                },
                Err(e) => e,
            };
            tracing::info!(code = "AUTH_BACKEND_ERROR", webhook = %self.inner.key, attempt = attempts, error = %err, "webhook call failed; retrying within authTimeout");
            count_request(&self.inner.key, attempts > 1, Some(("soft", &err)));
            // The whole authTimeout is used: the last pause is cut short so that one more
            // attempt of at least MIN_LAST_ATTEMPT fits.
            let left = deadline.saturating_duration_since(Instant::now());
            if left <= MIN_LAST_ATTEMPT {
                count_request(&self.inner.key, attempts > 1, Some(("hard", &err)));
                return Err(WebhookError::GaveUp {
                    what: self.inner.key.clone(),
                    attempts,
                    within: self.inner.auth_timeout,
                    last: Box::new(err),
                });
            }
            tokio::time::sleep(pause.min(left - MIN_LAST_ATTEMPT)).await;
            pause = (pause * 2).min(MAX_RETRY_PAUSE);
        }
    }

    /// One POST (following allowed redirects): the 200 body.
    async fn attempt(&self, url: &str, body: Bytes) -> Result<Bytes, WebhookError> {
        let mut target = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let (status, location, bytes) = self.post_once(&target, body.clone()).await?;
            if status == StatusCode::OK {
                return Ok(bytes);
            }
            if status.is_redirection() {
                let location = location.unwrap_or_default();
                if !self.inner.allow_redirects {
                    return Err(WebhookError::Redirect {
                        url: target,
                        location,
                    });
                }
                let next = resolve_location(&target, &location).ok_or(WebhookError::Transport {
                    url: target.clone(),
                    reason: format!("unusable redirect location {location:?}"),
                })?;
                // The body is re-posted (a password, a key): only to the same origin, so a
                // redirect can neither downgrade https to http nor hand it to another host.
                if origin(&next) != origin(&target) {
                    return Err(WebhookError::RedirectOffOrigin {
                        url: target,
                        location,
                    });
                }
                target = next;
                continue;
            }
            return Err(WebhookError::Status {
                url: target,
                status: status.as_u16(),
            });
        }
        Err(WebhookError::Transport {
            url: url.to_string(),
            reason: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }

    async fn post_once(
        &self,
        url: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Option<String>, Bytes), WebhookError> {
        self.exchange(Method::POST, url, body).await
    }

    /// One `GET` of the URL itself, no retry, no redirect followed: its status
    /// (`--healthcheck`).
    pub async fn probe(&self) -> Result<StatusCode, WebhookError> {
        let url = format!("{}/", self.inner.base);
        let (status, _, _) = self.exchange(Method::GET, &url, Bytes::new()).await?;
        Ok(status)
    }

    /// One request: its status, `Location` and body (capped).
    async fn exchange(
        &self,
        method: Method,
        url: &str,
        body: Bytes,
    ) -> Result<(StatusCode, Option<String>, Bytes), WebhookError> {
        let transport = |reason: String| WebhookError::Transport {
            url: url.to_string(),
            reason,
        };
        let failed = |source| WebhookError::Http {
            url: url.to_string(),
            source,
        };
        let uri: Uri = url.parse().map_err(|e| transport(format!("{e}")))?;
        let https = uri.scheme_str() == Some("https");
        let host = uri.host().unwrap_or_default().to_string();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let bare = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let tcp = httpc::connect_tcp(&bare, port).await.map_err(failed)?;
        let authority = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .unwrap_or_default();
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_else(|| "/".into());
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, authority)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json")
            .header(http::header::USER_AGENT, "containerssh")
            .body(Full::new(body))
            .map_err(|e| failed(HttpError::Build(e)))?;
        let (response, _guard) = if https {
            let Some(tls) = self.inner.tls.clone() else {
                return Err(transport(
                    "https after a redirect from http is not set up".into(),
                ));
            };
            let name = ServerName::try_from(bare.clone())
                .map_err(|_| transport(format!("{bare:?} is not a TLS server name")))?;
            let stream = httpc::connect_tls(tcp, tls, name).await.map_err(failed)?;
            httpc::send(stream, request, false).await
        } else {
            httpc::send(tcp, request, false).await
        }
        .map_err(failed)?;
        let status = response.status();
        let location = response
            .headers()
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = httpc::read_capped(response.into_body(), MAX_WEBHOOK_RESPONSE_BYTES)
            .await
            .map_err(failed)?;
        Ok((status, location, body))
    }
}

/// `(scheme, host, port)` of a URL, the port defaulted by scheme.
fn origin(url: &str) -> Option<(String, String, u16)> {
    let uri: Uri = url.parse().ok()?;
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let port = uri
        .port_u16()
        .unwrap_or(if scheme == "https" { 443 } else { 80 });
    Some((scheme, uri.host()?.to_ascii_lowercase(), port))
}

/// An absolute `Location`, or a path on the same origin.
fn resolve_location(current: &str, location: &str) -> Option<String> {
    if location.starts_with("http://") || location.starts_with("https://") {
        return Some(location.to_string());
    }
    if !location.starts_with('/') {
        return None;
    }
    let uri: Uri = current.parse().ok()?;
    Some(format!(
        "{}://{}{location}",
        uri.scheme_str()?,
        uri.authority()?.as_str()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_tls_settings_are_checked() {
        let cfg = |url: &str| WebhookConfig {
            url: url.into(),
            ..Default::default()
        };
        assert!(Webhook::new("k", &cfg("http://127.0.0.1:8080")).is_ok());
        let e = Webhook::new("auth.password.webhook", &cfg("ftp://x")).unwrap_err();
        assert!(e.starts_with("auth.password.webhook.url"), "{e}");
        assert!(Webhook::new("k", &cfg("not a url")).is_err());
        let e = Webhook::new("k", &cfg("http://user:secret@127.0.0.1:8080")).unwrap_err();
        assert!(e.contains("credentials") && !e.contains("secret"), "{e}");
        let mut c = cfg("https://auth.example:8443");
        c.cacert = "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n".into();
        assert!(Webhook::new("k", &c).unwrap_err().contains("k.cacert"));
        let mut c = cfg("http://x");
        c.tls_version = "1.1".into();
        // Plain http never builds TLS settings.
        assert!(Webhook::new("k", &c).is_ok());
        assert!(kx_group("x25519").is_some() && kx_group("nope").is_none());
        assert!(cipher_suite("TLS_AES_128_GCM_SHA256").is_some());
        assert!(cipher_suite("TLS_RSA_WITH_RC4").is_none());
    }

    #[test]
    fn redirect_locations() {
        assert_eq!(
            resolve_location("http://h:1/a", "/b").as_deref(),
            Some("http://h:1/b")
        );
        assert_eq!(
            resolve_location("http://h:1/a", "https://o/c").as_deref(),
            Some("https://o/c")
        );
        assert_eq!(resolve_location("http://h:1/a", "rel"), None);
        assert_eq!(origin("http://H:80/a"), origin("http://h/b"));
        assert_ne!(origin("https://h/a"), origin("http://h:443/a"));
        assert_ne!(origin("http://h:1/a"), origin("http://h:2/a"));
        assert_ne!(origin("http://a/x"), origin("http://b/x"));
    }
}
