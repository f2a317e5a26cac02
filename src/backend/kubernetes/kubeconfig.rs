//! Kubeconfig files (`apiVersion: v1, kind: Config`), which ContainerSSH never supported.
//!
//! Parsed leniently, as kubectl does: unknown fields are ignored. What we cannot honour is an
//! error rather than a silent difference: `insecure-skip-tls-verify: true`, `proxy-url`,
//! `exec` and `auth-provider` credential plugins and impersonation (`as`, `as-groups`, …).
//!
//! - Relative file paths (`certificate-authority`, `client-certificate`, `client-key`,
//!   `tokenFile`) resolve against the directory of the kubeconfig that names them.
//! - `…-data` fields (base64) win over their file twins, as in client-go.
//! - A user with both `token` and `tokenFile` uses the file (it is re-read, so it can rotate).
//! - A cluster without a CA is refused: we never use system roots nor skip verification.
//! - Several files (`KUBECONFIG=a:b:c`, [`load_list`]) merge as kubectl merges them: files
//!   that do not exist are skipped, the first file that defines a cluster, user or context of a
//!   given name wins, and `current-context` comes from the first file that sets it.
//! - Every file, and every file a kubeconfig references, is capped at 1 MiB.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;

use super::connection::{normalize_server, read_pem_file, read_token_file};
use super::{ClusterConnection, TokenSource};

/// A kubeconfig is a few kilobytes; anything beyond this is not one.
pub const MAX_KUBECONFIG_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum KubeconfigError {
    #[error("cannot read kubeconfig {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kubeconfig {path} is larger than {max} bytes")]
    TooLarge { path: PathBuf, max: u64 },
    /// `file` names the kubeconfig (or the `:`-separated list of merged files).
    #[error("{message} in {file}")]
    Invalid { file: String, message: String },
}

// ---- the file format (only the fields we read; everything else is ignored) ----

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawConfig {
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    kind: Option<String>,
    clusters: Option<Vec<Named<RawCluster>>>,
    users: Option<Vec<NamedUser>>,
    contexts: Option<Vec<Named<RawContext>>>,
    #[serde(rename = "current-context")]
    current_context: Option<String>,
}

#[derive(Deserialize)]
struct Named<T> {
    #[serde(default)]
    name: Option<String>,
    #[serde(alias = "cluster", alias = "context", default = "Option::default")]
    value: Option<T>,
}

#[derive(Deserialize)]
struct NamedUser {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    user: Option<RawUser>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
struct RawCluster {
    server: Option<String>,
    #[serde(rename = "certificate-authority")]
    certificate_authority: Option<String>,
    #[serde(rename = "certificate-authority-data")]
    certificate_authority_data: Option<String>,
    #[serde(rename = "tls-server-name")]
    tls_server_name: Option<String>,
    #[serde(rename = "insecure-skip-tls-verify")]
    insecure_skip_tls_verify: Option<bool>,
    #[serde(rename = "proxy-url")]
    proxy_url: Option<String>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
struct RawUser {
    #[serde(rename = "client-certificate")]
    client_certificate: Option<String>,
    #[serde(rename = "client-certificate-data")]
    client_certificate_data: Option<String>,
    #[serde(rename = "client-key")]
    client_key: Option<String>,
    #[serde(rename = "client-key-data")]
    client_key_data: Option<String>,
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<String>,
    username: Option<String>,
    password: Option<String>,
    exec: Option<serde_yaml::Value>,
    #[serde(rename = "auth-provider")]
    auth_provider: Option<serde_yaml::Value>,
    #[serde(rename = "as")]
    act_as: Option<String>,
    #[serde(rename = "as-uid")]
    act_as_uid: Option<String>,
    #[serde(rename = "as-groups")]
    act_as_groups: Option<Vec<String>>,
    #[serde(rename = "as-user-extra")]
    act_as_user_extra: Option<serde_yaml::Value>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(default)]
struct RawContext {
    cluster: Option<String>,
    user: Option<String>,
    namespace: Option<String>,
}

/// An entry together with where it came from (for relative paths and error messages).
struct Sourced<T> {
    value: T,
    file: String,
    base_dir: PathBuf,
}

/// One or more kubeconfig files merged the way kubectl merges them.
#[derive(Default)]
struct Merged {
    clusters: BTreeMap<String, Sourced<RawCluster>>,
    users: BTreeMap<String, Sourced<RawUser>>,
    contexts: BTreeMap<String, Sourced<RawContext>>,
    current_context: Option<String>,
    /// The files that took part, `:`-separated, for errors about the whole set.
    files: String,
    /// `false` (fuzzing): files the kubeconfig references are not read.
    read_files: bool,
}

fn invalid(file: &str, message: impl Into<String>) -> KubeconfigError {
    KubeconfigError::Invalid {
        file: file.to_string(),
        message: message.into(),
    }
}

fn non_empty(s: &Option<String>) -> Option<&str> {
    s.as_deref().filter(|s| !s.is_empty())
}

impl Merged {
    fn new() -> Self {
        Self {
            read_files: true,
            ..Self::default()
        }
    }

    fn add(&mut self, text: &str, file: &str, base_dir: &Path) -> Result<(), KubeconfigError> {
        let raw: RawConfig = if text.trim().is_empty() {
            RawConfig::default()
        } else {
            serde_yaml::from_str(text)
                .map_err(|e| invalid(file, format!("not a valid kubeconfig: {e}")))?
        };
        if let Some(v) = non_empty(&raw.api_version) {
            if v != "v1" {
                return Err(invalid(
                    file,
                    format!("apiVersion {v:?} is not supported (expected v1)"),
                ));
            }
        }
        if let Some(k) = non_empty(&raw.kind) {
            if k != "Config" {
                return Err(invalid(
                    file,
                    format!("kind {k:?} is not a kubeconfig (expected Config)"),
                ));
            }
        }
        if !self.files.is_empty() {
            self.files.push(':');
        }
        self.files.push_str(file);
        let sourced = |value| Sourced {
            value,
            file: file.to_string(),
            base_dir: base_dir.to_path_buf(),
        };
        for (i, c) in raw.clusters.unwrap_or_default().into_iter().enumerate() {
            let name = named(file, "clusters", i, c.name)?;
            self.clusters
                .entry(name)
                .or_insert_with(|| sourced(c.value.unwrap_or_default()));
        }
        for (i, u) in raw.users.unwrap_or_default().into_iter().enumerate() {
            let name = named(file, "users", i, u.name)?;
            self.users.entry(name).or_insert_with(|| Sourced {
                value: u.user.unwrap_or_default(),
                file: file.to_string(),
                base_dir: base_dir.to_path_buf(),
            });
        }
        for (i, c) in raw.contexts.unwrap_or_default().into_iter().enumerate() {
            let name = named(file, "contexts", i, c.name)?;
            self.contexts.entry(name).or_insert_with(|| Sourced {
                value: c.value.unwrap_or_default(),
                file: file.to_string(),
                base_dir: base_dir.to_path_buf(),
            });
        }
        if self.current_context.is_none() {
            self.current_context = non_empty(&raw.current_context).map(String::from);
        }
        Ok(())
    }

    fn select(&self, context: Option<&str>) -> Result<ClusterConnection, KubeconfigError> {
        let files = if self.files.is_empty() {
            "(no kubeconfig)"
        } else {
            &self.files
        };
        let ctx_name = match context.filter(|c| !c.is_empty()) {
            Some(c) => c,
            None => self
                .current_context
                .as_deref()
                .ok_or_else(|| invalid(files, "no current-context set and no context chosen"))?,
        };
        let ctx = self
            .contexts
            .get(ctx_name)
            .ok_or_else(|| invalid(files, format!("context {ctx_name:?} not found")))?;
        let cluster_name = non_empty(&ctx.value.cluster)
            .ok_or_else(|| invalid(&ctx.file, format!("context {ctx_name:?} names no cluster")))?;
        let cluster = self.clusters.get(cluster_name).ok_or_else(|| {
            invalid(
                files,
                format!("cluster {cluster_name:?} (of context {ctx_name:?}) not found"),
            )
        })?;
        let mut conn = cluster_connection(cluster_name, cluster, self.read_files)?;
        if let Some(user_name) = non_empty(&ctx.value.user) {
            let user = self.users.get(user_name).ok_or_else(|| {
                invalid(
                    files,
                    format!("user {user_name:?} (of context {ctx_name:?}) not found"),
                )
            })?;
            apply_user(user_name, user, &mut conn, self.read_files)?;
        }
        conn.namespace = non_empty(&ctx.value.namespace).map(String::from);
        Ok(conn)
    }
}

fn named(
    file: &str,
    list: &str,
    i: usize,
    name: Option<String>,
) -> Result<String, KubeconfigError> {
    name.filter(|n| !n.is_empty())
        .ok_or_else(|| invalid(file, format!("{list}[{i}] has no name")))
}

fn resolve_path(base_dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    }
}

fn decode_data(file: &str, what: &str, data: &str) -> Result<Vec<u8>, KubeconfigError> {
    let compact: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|e| invalid(file, format!("{what}: not valid base64: {e}")))
}

/// PEM from `…-data` (base64) or from a file relative to the kubeconfig.
fn pem(
    src_file: &str,
    base_dir: &Path,
    what: &str,
    data: &Option<String>,
    path: &Option<String>,
    read_files: bool,
) -> Result<Option<Vec<u8>>, KubeconfigError> {
    if let Some(d) = non_empty(data) {
        return decode_data(src_file, &format!("{what}-data"), d).map(Some);
    }
    if let Some(p) = non_empty(path) {
        let full = resolve_path(base_dir, p);
        if !read_files {
            return Err(invalid(
                src_file,
                format!("{what}: files are not read here"),
            ));
        }
        return read_pem_file(&full)
            .map(Some)
            .map_err(|m| invalid(src_file, format!("{what} {}: {m}", full.display())));
    }
    Ok(None)
}

fn cluster_connection(
    name: &str,
    c: &Sourced<RawCluster>,
    read_files: bool,
) -> Result<ClusterConnection, KubeconfigError> {
    let file = c.file.as_str();
    let here = |m: String| invalid(file, format!("cluster {name:?}: {m}"));
    if c.value.insecure_skip_tls_verify == Some(true) {
        return Err(here("insecure-skip-tls-verify is not supported".into()));
    }
    if non_empty(&c.value.proxy_url).is_some() {
        return Err(here("proxy-url is not supported".into()));
    }
    let server = non_empty(&c.value.server).ok_or_else(|| here("server is missing".into()))?;
    let server = normalize_server(server).map_err(|m| here(format!("server: {m}")))?;
    let ca = pem(
        file,
        &c.base_dir,
        &format!("cluster {name:?}: certificate-authority"),
        &c.value.certificate_authority_data,
        &c.value.certificate_authority,
        read_files,
    )?
    .ok_or_else(|| {
        here(
            "no certificate-authority or certificate-authority-data: the server's certificate \
             cannot be verified"
                .into(),
        )
    })?;
    Ok(ClusterConnection {
        server,
        server_name: non_empty(&c.value.tls_server_name).map(String::from),
        ca_pem: Some(ca),
        ..ClusterConnection::default()
    })
}

fn apply_user(
    name: &str,
    u: &Sourced<RawUser>,
    conn: &mut ClusterConnection,
    read_files: bool,
) -> Result<(), KubeconfigError> {
    let file = u.file.as_str();
    let here = |m: &str| invalid(file, format!("user {name:?}: {m}"));
    let v = &u.value;
    if v.exec.as_ref().is_some_and(|e| !e.is_null()) {
        return Err(here(
            "exec credential plugins are not supported (use a token, tokenFile or a client \
             certificate)",
        ));
    }
    if v.auth_provider.as_ref().is_some_and(|e| !e.is_null()) {
        return Err(here(
            "auth-provider plugins are not supported (use a token, tokenFile or a client \
             certificate)",
        ));
    }
    if non_empty(&v.act_as).is_some()
        || non_empty(&v.act_as_uid).is_some()
        || v.act_as_groups.as_ref().is_some_and(|g| !g.is_empty())
        || v.act_as_user_extra.as_ref().is_some_and(|e| !e.is_null())
    {
        return Err(here(
            "impersonation (as, as-uid, as-groups, as-user-extra) is not supported",
        ));
    }
    let who = format!("user {name:?}: client-certificate");
    conn.client_cert_pem = pem(
        file,
        &u.base_dir,
        &who,
        &v.client_certificate_data,
        &v.client_certificate,
        read_files,
    )?;
    let who = format!("user {name:?}: client-key");
    conn.client_key_pem = pem(
        file,
        &u.base_dir,
        &who,
        &v.client_key_data,
        &v.client_key,
        read_files,
    )?;
    match (
        conn.client_cert_pem.is_some(),
        conn.client_key_pem.is_some(),
    ) {
        (true, false) => return Err(here("client-certificate without client-key")),
        (false, true) => return Err(here("client-key without client-certificate")),
        _ => {}
    }
    conn.token = if let Some(p) = non_empty(&v.token_file) {
        let full = resolve_path(&u.base_dir, p);
        if !read_files {
            return Err(here("tokenFile: files are not read here"));
        }
        read_token_file(&full).map_err(|m| here(&format!("tokenFile {}: {m}", full.display())))?;
        Some(TokenSource::File(full))
    } else {
        non_empty(&v.token).map(|t| TokenSource::Static(t.to_string()))
    };
    conn.basic = non_empty(&v.username)
        .map(|user| (user.to_string(), v.password.clone().unwrap_or_default()));
    Ok(())
}

fn read_capped_text(path: &Path) -> Result<String, KubeconfigError> {
    let read_err = |source| KubeconfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let bytes = crate::auth::read_capped(path, MAX_KUBECONFIG_BYTES)
        .map_err(read_err)?
        .ok_or_else(|| KubeconfigError::TooLarge {
            path: path.to_path_buf(),
            max: MAX_KUBECONFIG_BYTES,
        })?;
    String::from_utf8(bytes).map_err(|_| invalid(&path.display().to_string(), "not UTF-8 text"))
}

fn base_dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Reads one kubeconfig file and picks `context` (or its `current-context`).
pub fn load(path: &Path, context: Option<&str>) -> Result<ClusterConnection, KubeconfigError> {
    let text = read_capped_text(path)?;
    let mut merged = Merged::new();
    merged.add(&text, &path.display().to_string(), &base_dir_of(path))?;
    merged.select(context)
}

/// A `KUBECONFIG`-style list of files (`:`-separated), merged as kubectl does (see the module
/// documentation). Files that do not exist are skipped; none existing is an error.
pub fn load_list(list: &str, context: Option<&str>) -> Result<ClusterConnection, KubeconfigError> {
    let mut merged = Merged::new();
    let mut any = false;
    for path in std::env::split_paths(list) {
        if path.as_os_str().is_empty() {
            continue;
        }
        match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            _ => {}
        }
        let text = read_capped_text(&path)?;
        merged.add(&text, &path.display().to_string(), &base_dir_of(&path))?;
        any = true;
    }
    if !any {
        return Err(invalid(list, "none of the kubeconfig files exist"));
    }
    merged.select(context)
}

/// Parses kubeconfig text; relative paths resolve against `base_dir`.
pub fn parse(
    text: &str,
    base_dir: &Path,
    context: Option<&str>,
) -> Result<ClusterConnection, KubeconfigError> {
    let mut merged = Merged::new();
    merged.add(text, "(kubeconfig text)", base_dir)?;
    merged.select(context)
}

/// Fuzz entry point: arbitrary bytes as kubeconfig text must never panic. Relative paths
/// resolve under a directory that does not exist, so nothing is read from the host.
pub fn fuzz_kubeconfig(data: &[u8]) {
    if u64::try_from(data.len()).unwrap_or(u64::MAX) > MAX_KUBECONFIG_BYTES {
        return;
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let base = Path::new("/nonexistent-containerssh-fuzz");
        for context in [None, Some("fuzz")] {
            let mut merged = Merged::default();
            if merged.add(text, "(fuzz)", base).is_ok() {
                let _ = merged.select(context);
            }
        }
    }
}
