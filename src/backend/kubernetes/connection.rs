//! `kubernetes.connection` resolved into a [`ClusterConnection`].
//!
//! Precedence (the first that applies wins; see [`resolve`]):
//! 1. **Explicit fields**, ContainerSSH's way: the block is explicit when `host` differs from
//!    its default `kubernetes.default.svc` or any of `serverName`, `cert`/`certFile`,
//!    `key`/`keyFile`, `cacert`/`cacertFile`, `bearerToken`/`bearerTokenFile`, `username`,
//!    `password` is set. Combining them with `kubeconfig`, `context` or `inCluster: true` is a
//!    configuration error (never a silently ignored setting).
//! 2. `inCluster: true`: the pod's service account, required to be there.
//! 3. A **kubeconfig**: the `kubeconfig` key, else `$KUBECONFIG` (a `:`-separated list merged as
//!    kubectl merges it), with `context` or the file's `current-context`.
//! 4. `inCluster: auto` (the default) and `KUBERNETES_SERVICE_HOST`/`_PORT` set, and no
//!    `context` chosen: the **in-cluster** service account (client-go's `InClusterConfig`).
//! 5. `$HOME/.kube/config` when it exists (kubectl's default).
//! 6. Otherwise an error saying what to configure.
//!
//! Host and path, as client-go does with ContainerSSH's `Host` and `APIPath`: `host` is
//! `name`, `name:port`, `[v6]:port`, a bare IPv6 address or `https://name[:port][/prefix]`;
//! the port defaults to 443. `path` is the core API path and must end in `/api`: requests go to
//! `<path>/v1/namespaces/…`, so `/api` (the default) gives server `https://host:443`, and
//! `/k8s/api` gives `https://host:443/k8s`. The server string always carries the port.
//! `http://` is refused: credentials would travel in clear.
//!
//! No CA, no connection: the server's certificate is verified against `cacert`/`cacertFile`
//! (or the kubeconfig/in-cluster CA), never against system roots and never skipped.

use std::net::Ipv6Addr;
use std::path::{Path, PathBuf};

use super::kubeconfig::{self, KubeconfigError};
use super::{ClusterConnection, TokenSource};
use crate::config::defaults;
use crate::config::model::{InClusterMode, KubernetesConnectionConfig};

/// Where Kubernetes mounts a pod's service-account credentials.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Certificates, keys and tokens are a few kilobytes.
pub const MAX_CREDENTIAL_FILE_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// A configuration key (under `kubernetes.connection`) is wrong.
    #[error("kubernetes.connection.{key}: {message}")]
    Invalid { key: String, message: String },
    #[error(transparent)]
    Kubeconfig(#[from] KubeconfigError),
    #[error("in-cluster configuration: {0}")]
    InCluster(String),
    #[error(
        "no Kubernetes connection configured: set kubernetes.connection (host, cacert, \
         credentials), kubernetes.connection.kubeconfig or KUBECONFIG, or run inside a cluster"
    )]
    NotConfigured,
}

fn bad(key: &str, message: impl Into<String>) -> ConnectionError {
    ConnectionError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

/// Reads a PEM file (capped), checking it looks like PEM.
pub(super) fn read_pem_file(path: &Path) -> Result<Vec<u8>, String> {
    let bytes = read_small(path)?;
    if !contains(&bytes, b"-----BEGIN ") {
        return Err("not a PEM file (no -----BEGIN line)".into());
    }
    Ok(bytes)
}

/// Checks a token file can be read and holds a token (it is re-read later by the client).
pub(super) fn read_token_file(path: &Path) -> Result<(), String> {
    let bytes = read_small(path)?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err("empty".into());
    }
    Ok(())
}

fn read_small(path: &Path) -> Result<Vec<u8>, String> {
    match crate::auth::read_capped(path, MAX_CREDENTIAL_FILE_BYTES) {
        Ok(Some(b)) => Ok(b),
        Ok(None) => Err(format!("larger than {MAX_CREDENTIAL_FILE_BYTES} bytes")),
        Err(e) => Err(format!("cannot read: {e}")),
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// `host`, `host:port`, `[v6]:port`, bare IPv6, `https://host[:port][/prefix]` →
/// `https://host:port[/prefix]` (no trailing slash).
pub fn normalize_server(input: &str) -> Result<String, String> {
    let s = input.trim();
    if s.is_empty() {
        return Err("empty".into());
    }
    if s.len() > 2048 {
        return Err("too long".into());
    }
    let rest = if let Some(r) = s.strip_prefix("https://") {
        r
    } else if s.starts_with("http://") {
        return Err(format!(
            "{s:?}: plain http is not supported (credentials would travel in clear); use https"
        ));
    } else if s.contains("://") {
        return Err(format!("{s:?}: only https:// URLs are supported"));
    } else {
        s
    };
    if rest.contains(['?', '#', '@']) || rest.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "{s:?}: expected host, host:port or https://host[:port][/path]"
        ));
    }
    // A bare IPv6 address has no path and several colons.
    let (authority, path) = if !rest.starts_with('[') && rest.matches(':').count() > 1 {
        (rest, "")
    } else {
        match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        }
    };
    let (host, port) = if let Some(inner) = authority.strip_prefix('[') {
        let (addr, after) = inner
            .split_once(']')
            .ok_or_else(|| format!("{s:?}: unclosed [ in IPv6 address"))?;
        let addr: Ipv6Addr = addr
            .parse()
            .map_err(|_| format!("{s:?}: {addr:?} is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("{s:?}: expected :port after ]"))?,
            ),
        };
        (format!("[{addr}]"), port)
    } else if authority.matches(':').count() > 1 {
        let addr: Ipv6Addr = authority
            .parse()
            .map_err(|_| format!("{s:?}: not a host, host:port or IPv6 address"))?;
        (format!("[{addr}]"), None)
    } else {
        let (h, p) = match authority.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        };
        if h.is_empty()
            || !h
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
        {
            return Err(format!("{s:?}: {h:?} is not a valid host name"));
        }
        (h.to_ascii_lowercase(), p)
    };
    let port: u16 = match port {
        None => 443,
        Some(p) => p
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{s:?}: {p:?} is not a port number"))?,
    };
    let path = path.trim_end_matches('/');
    Ok(format!("https://{host}:{port}{path}"))
}

/// The prefix before client-go's core API path: `/api` → ``, `/k8s/api` → `/k8s`.
fn api_prefix(path: &str) -> Result<&str, String> {
    let p = path.trim_end_matches('/');
    if p.is_empty() {
        return Ok("");
    }
    let prefix = p.strip_suffix("/api").ok_or_else(|| {
        format!("{path:?} must end in /api (the core API path; what precedes it is a prefix)")
    })?;
    if !(prefix.is_empty() || prefix.starts_with('/'))
        || prefix.contains(['?', '#'])
        || prefix.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(format!("{path:?} is not a URL path"));
    }
    Ok(prefix)
}

/// `true` when the block sets anything besides the defaults and our own source-selection keys.
pub fn is_explicit(c: &KubernetesConnectionConfig) -> bool {
    c.host != defaults::kubernetes_host()
        || [
            &c.server_name,
            &c.cert,
            &c.cert_file,
            &c.key,
            &c.key_file,
            &c.cacert,
            &c.cacert_file,
            &c.bearer_token,
            &c.bearer_token_file,
            &c.username,
            &c.password,
        ]
        .iter()
        .any(|v| !v.is_empty())
}

/// Checks that need neither the environment nor files; the config validation runs them.
pub fn check(c: &KubernetesConnectionConfig) -> Result<(), ConnectionError> {
    for (inline, inline_key, file_key, file) in [
        (&c.cert, "cert", "certFile", &c.cert_file),
        (&c.key, "key", "keyFile", &c.key_file),
        (&c.cacert, "cacert", "cacertFile", &c.cacert_file),
    ] {
        if !inline.is_empty() && !file.is_empty() {
            return Err(bad(
                inline_key,
                format!("{inline_key} and {file_key} are both set; use one"),
            ));
        }
        if !inline.is_empty() && !inline.contains("-----BEGIN ") {
            return Err(bad(
                inline_key,
                format!("expected PEM text (-----BEGIN …); for a file path use {file_key}"),
            ));
        }
    }
    if !c.bearer_token.is_empty() && !c.bearer_token_file.is_empty() {
        return Err(bad(
            "bearerToken",
            "bearerToken and bearerTokenFile are both set; use one",
        ));
    }
    let has_cert = !(c.cert.is_empty() && c.cert_file.is_empty());
    let has_key = !(c.key.is_empty() && c.key_file.is_empty());
    if has_cert != has_key {
        let key = if has_cert { "key" } else { "cert" };
        return Err(bad(
            key,
            "a client certificate needs both cert (or certFile) and key (or keyFile)",
        ));
    }
    if c.username.is_empty() != c.password.is_empty() {
        return Err(bad(
            if c.username.is_empty() {
                "username"
            } else {
                "password"
            },
            "basic authentication needs both username and password",
        ));
    }
    normalize_server(&c.host).map_err(|m| bad("host", m))?;
    api_prefix(&c.path).map_err(|m| bad("path", m))?;
    if !c.qps.is_finite() || c.qps < 0.0 {
        return Err(bad(
            "qps",
            "must be a number of at least 0 (0: the default)",
        ));
    }
    let explicit = is_explicit(c);
    if explicit && !c.kubeconfig.is_empty() {
        return Err(bad(
            "kubeconfig",
            "cannot be combined with explicit connection settings (host, serverName, cert, key, \
             cacert, bearerToken, username, password and their File forms); remove one",
        ));
    }
    if explicit && !c.context.is_empty() {
        return Err(bad(
            "context",
            "selects a kubeconfig context; it cannot be combined with explicit connection settings",
        ));
    }
    if c.in_cluster == InClusterMode::True {
        if explicit {
            return Err(bad(
                "inCluster",
                "true cannot be combined with explicit connection settings",
            ));
        }
        if !c.kubeconfig.is_empty() || !c.context.is_empty() {
            return Err(bad(
                "inCluster",
                "true cannot be combined with kubeconfig or context",
            ));
        }
    }
    if !explicit && api_prefix(&c.path).map(str::is_empty) != Ok(true) {
        return Err(bad(
            "path",
            "applies only with an explicit host; kubeconfig servers carry their own prefix",
        ));
    }
    Ok(())
}

/// Resolves the connection with the real service-account directory.
pub fn resolve(
    cfg: &KubernetesConnectionConfig,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<ClusterConnection, ConnectionError> {
    resolve_with(cfg, env, Path::new(SERVICE_ACCOUNT_DIR))
}

/// [`resolve`] with the service-account directory injectable (tests).
pub fn resolve_with(
    cfg: &KubernetesConnectionConfig,
    env: &dyn Fn(&str) -> Option<String>,
    service_account_dir: &Path,
) -> Result<ClusterConnection, ConnectionError> {
    check(cfg)?;
    let var = |name: &str| env(name).filter(|v| !v.is_empty());
    if is_explicit(cfg) {
        return explicit(cfg);
    }
    if cfg.in_cluster == InClusterMode::True {
        return in_cluster(&var, service_account_dir);
    }
    let context = Some(cfg.context.as_str()).filter(|c| !c.is_empty());
    if !cfg.kubeconfig.is_empty() {
        return Ok(kubeconfig::load(Path::new(&cfg.kubeconfig), context)?);
    }
    if let Some(list) = var("KUBECONFIG") {
        return Ok(kubeconfig::load_list(&list, context)?);
    }
    if cfg.in_cluster == InClusterMode::Auto
        && context.is_none()
        && var("KUBERNETES_SERVICE_HOST").is_some()
        && var("KUBERNETES_SERVICE_PORT").is_some()
    {
        return in_cluster(&var, service_account_dir);
    }
    if let Some(home) = var("HOME") {
        let path = PathBuf::from(home).join(".kube/config");
        if path.is_file() {
            return Ok(kubeconfig::load(&path, context)?);
        }
    }
    if context.is_some() {
        return Err(bad(
            "context",
            "is set but no kubeconfig was found (kubeconfig key, KUBECONFIG or ~/.kube/config)",
        ));
    }
    Err(ConnectionError::NotConfigured)
}

/// Inline PEM, or the file's PEM, under the key that named it.
fn pem_of(inline: &str, file: &str, file_key: &str) -> Result<Option<Vec<u8>>, ConnectionError> {
    if !inline.is_empty() {
        return Ok(Some(inline.as_bytes().to_vec()));
    }
    if !file.is_empty() {
        return read_pem_file(Path::new(file))
            .map(Some)
            .map_err(|m| bad(file_key, format!("{file}: {m}")));
    }
    Ok(None)
}

fn explicit(c: &KubernetesConnectionConfig) -> Result<ClusterConnection, ConnectionError> {
    let server = normalize_server(&c.host).map_err(|m| bad("host", m))?;
    let prefix = api_prefix(&c.path).map_err(|m| bad("path", m))?;
    let ca = pem_of(&c.cacert, &c.cacert_file, "cacertFile")?.ok_or_else(|| {
        bad(
            "cacert",
            "no CA certificate (cacert or cacertFile): the API server's certificate cannot be \
             verified (system roots are not used)",
        )
    })?;
    let token = if !c.bearer_token.is_empty() {
        Some(TokenSource::Static(c.bearer_token.clone()))
    } else if !c.bearer_token_file.is_empty() {
        let p = PathBuf::from(&c.bearer_token_file);
        read_token_file(&p).map_err(|m| bad("bearerTokenFile", format!("{}: {m}", p.display())))?;
        Some(TokenSource::File(p))
    } else {
        None
    };
    Ok(ClusterConnection {
        server: format!("{server}{prefix}"),
        server_name: Some(c.server_name.clone()).filter(|s| !s.is_empty()),
        ca_pem: Some(ca),
        client_cert_pem: pem_of(&c.cert, &c.cert_file, "certFile")?,
        client_key_pem: pem_of(&c.key, &c.key_file, "keyFile")?,
        token,
        basic: (!c.username.is_empty()).then(|| (c.username.clone(), c.password.clone())),
        namespace: None,
    })
}

/// client-go's `InClusterConfig`: the service environment variables and the mounted
/// service-account token (re-read as it rotates), CA and namespace.
fn in_cluster(
    var: &dyn Fn(&str) -> Option<String>,
    dir: &Path,
) -> Result<ClusterConnection, ConnectionError> {
    let (Some(host), Some(port)) = (
        var("KUBERNETES_SERVICE_HOST"),
        var("KUBERNETES_SERVICE_PORT"),
    ) else {
        return Err(ConnectionError::InCluster(
            "KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT are not set: not running in a \
             cluster"
                .into(),
        ));
    };
    let host = host.trim();
    let authority = if host.parse::<Ipv6Addr>().is_ok() {
        format!("[{host}]:{}", port.trim())
    } else {
        format!("{host}:{}", port.trim())
    };
    let server = normalize_server(&authority)
        .map_err(|m| ConnectionError::InCluster(format!("KUBERNETES_SERVICE_HOST/PORT: {m}")))?;
    let token = dir.join("token");
    read_token_file(&token)
        .map_err(|m| ConnectionError::InCluster(format!("{}: {m}", token.display())))?;
    let ca_path = dir.join("ca.crt");
    let ca = read_pem_file(&ca_path)
        .map_err(|m| ConnectionError::InCluster(format!("{}: {m}", ca_path.display())))?;
    let namespace = read_small(&dir.join("namespace"))
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    Ok(ClusterConnection {
        server,
        server_name: None,
        ca_pem: Some(ca),
        client_cert_pem: None,
        client_key_pem: None,
        token: Some(TokenSource::File(token)),
        basic: None,
        namespace,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn cfg() -> KubernetesConnectionConfig {
        KubernetesConnectionConfig::default()
    }

    #[test]
    fn servers_are_normalized() {
        let ok = |i: &str, o: &str| assert_eq!(normalize_server(i).unwrap(), o, "{i}");
        ok(
            "kubernetes.default.svc",
            "https://kubernetes.default.svc:443",
        );
        ok("Example.COM:6443", "https://example.com:6443");
        ok("https://h:6443/", "https://h:6443");
        ok("https://h/base/", "https://h:443/base");
        ok("[fd00::1]:6443", "https://[fd00::1]:6443");
        ok("https://[::1]", "https://[::1]:443");
        ok("fd00::1", "https://[fd00::1]:443");
        for bad in [
            "", "http://h", "ftp://h", "h:0", "h:x", "[::1", "u@h", "h h", "[zz]:1",
        ] {
            assert!(normalize_server(bad).is_err(), "{bad}");
        }
        assert_eq!(api_prefix("/api").unwrap(), "");
        assert_eq!(api_prefix("/k8s/api/").unwrap(), "/k8s");
        assert!(api_prefix("/apis").is_err());
    }

    #[test]
    fn explicit_fields_inline_and_files() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, PEM).unwrap();
        let tok = dir.path().join("token");
        std::fs::write(&tok, "abc\n").unwrap();
        let mut c = cfg();
        c.host = "10.0.0.1:6443".into();
        c.path = "/prefix/api".into();
        c.cacert_file = ca.display().to_string();
        c.bearer_token_file = tok.display().to_string();
        c.server_name = "kubernetes".into();
        let conn = resolve_with(&c, &no_env, dir.path()).unwrap();
        assert_eq!(conn.server, "https://10.0.0.1:6443/prefix");
        assert_eq!(conn.server_name.as_deref(), Some("kubernetes"));
        assert_eq!(conn.ca_pem.as_deref(), Some(PEM.as_bytes()));
        assert!(conn.token == Some(TokenSource::File(tok)));
        let dbg = format!("{conn:?}");
        assert!(!dbg.contains("MIIB"), "{dbg}");

        let mut c = cfg();
        c.cacert = PEM.into();
        c.cert = PEM.into();
        c.key = KEY.into();
        c.bearer_token = "secret".into();
        let conn = resolve_with(&c, &no_env, dir.path()).unwrap();
        assert_eq!(conn.server, "https://kubernetes.default.svc:443");
        assert_eq!(conn.client_key_pem.as_deref(), Some(KEY.as_bytes()));
        assert!(conn.token == Some(TokenSource::Static("secret".into())));
        assert!(!format!("{conn:?}").contains("secret"));
    }

    #[test]
    fn explicit_conflicts_name_both_keys() {
        let mut c = cfg();
        c.cacert = PEM.into();
        c.cacert_file = "/x".into();
        let e = check(&c).unwrap_err().to_string();
        assert!(
            e.contains("kubernetes.connection.cacert") && e.contains("cacertFile"),
            "{e}"
        );
        let mut c = cfg();
        c.cacert = "/etc/ca.pem".into();
        let e = check(&c).unwrap_err().to_string();
        assert!(e.contains("cacertFile"), "{e}");
        let mut c = cfg();
        c.host = "h".into();
        c.kubeconfig = "/k".into();
        assert!(check(&c).unwrap_err().to_string().contains("kubeconfig"));
        let mut c = cfg();
        c.host = "h".into();
        let e = resolve_with(&c, &no_env, Path::new("/nonexistent"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("no CA"), "{e}");
        let mut c = cfg();
        c.cert = PEM.into();
        c.cacert = PEM.into();
        assert!(check(&c).unwrap_err().to_string().contains(".key"));
    }

    fn write_kubeconfig(dir: &Path, text: &str) -> PathBuf {
        let p = dir.join("config");
        std::fs::write(&p, text).unwrap();
        p
    }

    fn inline_kubeconfig() -> String {
        format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: a\nclusters:\n\
             - name: ca\n  cluster:\n    server: https://a.example:6443\n    certificate-authority-data: {}\n    tls-server-name: kubernetes\n\
             - name: cb\n  cluster:\n    server: https://[fd00::2]:8443\n    certificate-authority-data: {}\n\
             users:\n- name: ua\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n\
             - name: ub\n  user:\n    token: t0k\n\
             contexts:\n- name: a\n  context:\n    cluster: ca\n    user: ua\n    namespace: team\n\
             - name: b\n  context:\n    cluster: cb\n    user: ub\n\
             - name: nocluster\n  context:\n    cluster: missing\n    user: ua\n\
             - name: nouser\n  context:\n    cluster: ca\n    user: missing\n",
            b64(PEM),
            b64(PEM),
            b64(PEM),
            b64(KEY)
        )
    }

    #[test]
    fn kubeconfig_inline_data_and_contexts() {
        let dir = tempfile::tempdir().unwrap();
        let p = write_kubeconfig(dir.path(), &inline_kubeconfig());
        let conn = kubeconfig::load(&p, None).unwrap();
        assert_eq!(conn.server, "https://a.example:6443");
        assert_eq!(conn.server_name.as_deref(), Some("kubernetes"));
        assert_eq!(conn.client_cert_pem.as_deref(), Some(PEM.as_bytes()));
        assert_eq!(conn.client_key_pem.as_deref(), Some(KEY.as_bytes()));
        assert_eq!(conn.namespace.as_deref(), Some("team"));
        let conn = kubeconfig::load(&p, Some("b")).unwrap();
        assert_eq!(conn.server, "https://[fd00::2]:8443");
        assert!(conn.token == Some(TokenSource::Static("t0k".into())));
        assert_eq!(conn.namespace, None);

        let shown = p.display().to_string();
        let e = kubeconfig::load(&p, Some("x")).unwrap_err().to_string();
        assert_eq!(e, format!("context \"x\" not found in {shown}"));
        let e = kubeconfig::load(&p, Some("nocluster"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cluster \"missing\"") && e.contains(&shown),
            "{e}"
        );
        let e = kubeconfig::load(&p, Some("nouser"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("user \"missing\"") && e.contains(&shown), "{e}");

        // Through the config: kubeconfig key and context key.
        let mut c = cfg();
        c.kubeconfig = shown.clone();
        c.context = "b".into();
        let conn = resolve_with(&c, &no_env, dir.path()).unwrap();
        assert_eq!(conn.server, "https://[fd00::2]:8443");
        // Through KUBECONFIG, with a missing first entry.
        let list = format!("{}/nope:{shown}", dir.path().display());
        let env = move |k: &str| (k == "KUBECONFIG").then(|| list.clone());
        let conn = resolve_with(&cfg(), &env, dir.path()).unwrap();
        assert_eq!(conn.server, "https://a.example:6443");
    }

    #[test]
    fn kubeconfig_relative_files_and_token_file() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("kube");
        std::fs::create_dir_all(sub.join("pki")).unwrap();
        std::fs::write(sub.join("pki/ca.crt"), PEM).unwrap();
        std::fs::write(sub.join("pki/c.crt"), PEM).unwrap();
        std::fs::write(sub.join("pki/c.key"), KEY).unwrap();
        std::fs::write(sub.join("tok"), "abc").unwrap();
        let text = "clusters:\n- name: c\n  cluster:\n    server: k.example\n    certificate-authority: pki/ca.crt\n\
                    users:\n- name: u\n  user:\n    client-certificate: pki/c.crt\n    client-key: pki/c.key\n    tokenFile: tok\n    token: ignored\n    extra-unknown: 1\n\
                    contexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\n";
        let p = write_kubeconfig(&sub, text);
        let conn = kubeconfig::load(&p, None).unwrap();
        assert_eq!(conn.server, "https://k.example:443");
        assert_eq!(conn.ca_pem.as_deref(), Some(PEM.as_bytes()));
        assert_eq!(conn.client_key_pem.as_deref(), Some(KEY.as_bytes()));
        assert!(conn.token == Some(TokenSource::File(sub.join("tok"))));
        // parse() resolves against the given base directory.
        let conn = kubeconfig::parse(text, &sub, Some("x")).unwrap();
        assert_eq!(conn.ca_pem.as_deref(), Some(PEM.as_bytes()));
        let e = kubeconfig::parse(text, dir.path(), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("certificate-authority") && e.contains("pki/ca.crt"),
            "{e}"
        );
    }

    #[test]
    fn kubeconfig_refusals() {
        let base = format!(
            "clusters:\n- name: c\n  cluster:\n    server: https://h\n    certificate-authority-data: {}\n",
            b64(PEM)
        );
        let ctx = "contexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\n";
        let d = Path::new("/");
        let exec =
            format!("{base}users:\n- name: u\n  user:\n    exec:\n      command: aws\n{ctx}");
        let e = kubeconfig::parse(&exec, d, None).unwrap_err().to_string();
        assert!(
            e.contains("exec credential plugins are not supported"),
            "{e}"
        );
        let ap =
            format!("{base}users:\n- name: u\n  user:\n    auth-provider:\n      name: gcp\n{ctx}");
        assert!(kubeconfig::parse(&ap, d, None)
            .unwrap_err()
            .to_string()
            .contains("auth-provider"));
        let insecure = format!(
            "{}    insecure-skip-tls-verify: true\nusers:\n- name: u\n  user: {{}}\n{ctx}",
            base
        );
        let e = kubeconfig::parse(&insecure, d, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("insecure-skip-tls-verify is not supported"),
            "{e}"
        );
        let no_ca = "clusters:\n- name: c\n  cluster:\n    server: https://h\ncontexts:\n- name: x\n  context: {cluster: c}\ncurrent-context: x\n";
        assert!(kubeconfig::parse(no_ca, d, None)
            .unwrap_err()
            .to_string()
            .contains("certificate-authority"));
        let http = base.replace("https://h", "http://h") + ctx;
        assert!(kubeconfig::parse(&http, d, None).is_err());
        let e = kubeconfig::parse("kind: Pod\n", d, None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Config"), "{e}");
        let e = kubeconfig::parse("", d, None).unwrap_err().to_string();
        assert!(e.contains("current-context"), "{e}");
    }

    #[test]
    fn in_cluster_with_fake_service_account() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "jwt").unwrap();
        std::fs::write(dir.path().join("ca.crt"), PEM).unwrap();
        std::fs::write(dir.path().join("namespace"), "ns1\n").unwrap();
        let env = |k: &str| match k {
            "KUBERNETES_SERVICE_HOST" => Some("fd00::1".to_string()),
            "KUBERNETES_SERVICE_PORT" => Some("443".to_string()),
            _ => None,
        };
        let conn = resolve_with(&cfg(), &env, dir.path()).unwrap();
        assert_eq!(conn.server, "https://[fd00::1]:443");
        assert_eq!(conn.namespace.as_deref(), Some("ns1"));
        assert!(conn.token == Some(TokenSource::File(dir.path().join("token"))));
        assert_eq!(conn.ca_pem.as_deref(), Some(PEM.as_bytes()));

        // inCluster: false skips it; nothing else configured (no HOME) is an error.
        let mut c = cfg();
        c.in_cluster = InClusterMode::False;
        assert!(matches!(
            resolve_with(&c, &env, dir.path()),
            Err(ConnectionError::NotConfigured)
        ));
        // inCluster: true without the environment says so.
        let mut c = cfg();
        c.in_cluster = InClusterMode::True;
        let e = resolve_with(&c, &no_env, dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("KUBERNETES_SERVICE_HOST"), "{e}");
        // Missing token file.
        std::fs::remove_file(dir.path().join("token")).unwrap();
        let e = resolve_with(&cfg(), &env, dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("token"), "{e}");
    }

    #[test]
    fn home_kube_config_is_the_last_resort() {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir(home.path().join(".kube")).unwrap();
        write_kubeconfig(&home.path().join(".kube"), &inline_kubeconfig());
        let h = home.path().display().to_string();
        let env = move |k: &str| (k == "HOME").then(|| h.clone());
        let conn = resolve_with(&cfg(), &env, Path::new("/nonexistent")).unwrap();
        assert_eq!(conn.server, "https://a.example:6443");
    }

    #[test]
    fn fuzz_entry_survives_garbage() {
        for input in [
            &b""[..],
            b"\xff\xfe",
            b"clusters: 5",
            b"clusters:\n- name: c\n  cluster:\n    server: '[::1'\ncontexts:\n- name: fuzz\n  context: {cluster: c}\n",
            b"a: &a [*a]",
            b"users:\n- user:\n    exec: {}\n",
        ] {
            kubeconfig::fuzz_kubeconfig(input);
        }
    }
}
