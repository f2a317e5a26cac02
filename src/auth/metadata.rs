//! What a login brings into its container besides the user name: environment variables and
//! files (`auth.metadata` now; the auth and config webhooks add per-user ones later). Files are
//! written through the agent's `write-file`, as the container's user, before sessions start.

use std::path::PathBuf;

use super::authorized_keys::check_user_name;
use crate::config::model::{LoginFileConfig, LoginMetadataConfig};

/// Files one login may bring, and the size of each.
pub const MAX_LOGIN_FILES: usize = 32;
pub const MAX_LOGIN_FILE_BYTES: u64 = 1024 * 1024;

/// A file to write into the container.
#[derive(Clone, PartialEq, Eq)]
pub struct LoginFile {
    /// Absolute path inside the container.
    pub path: String,
    pub data: Vec<u8>,
    pub mode: u32,
}

impl std::fmt::Debug for LoginFile {
    // Contents are often credentials: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoginFile")
            .field("path", &self.path)
            .field("len", &self.data.len())
            .field("mode", &format_args!("{:o}", self.mode))
            .finish()
    }
}

/// A login's environment and files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoginMetadata {
    pub environment: Vec<(String, String)>,
    pub files: Vec<LoginFile>,
    /// Named values about the login (the auth webhook's `metadata`), which the Kubernetes
    /// backend exposes as env, labels or annotations (`exposeAuthMetadataAs*`).
    pub values: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Debug)]
enum Content {
    Inline(Vec<u8>),
    /// A host path template (`%u`).
    Source(String),
}

#[derive(Clone, Debug)]
struct FileTemplate {
    path: String,
    content: Content,
    mode: u32,
}

/// `auth.metadata`, validated.
#[derive(Clone, Debug, Default)]
pub struct MetadataTemplate {
    environment: Vec<(String, String)>,
    files: Vec<FileTemplate>,
}

/// Why `auth.metadata` is invalid: the key below `auth.metadata` and the reason.
#[derive(Debug, PartialEq, Eq)]
pub struct MetadataConfigError {
    pub key: String,
    pub message: String,
}

/// A variable name a shell accepts.
pub fn env_name_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= crate::limits::MAX_ENV_NAME_BYTES
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// An absolute container path without `.`/`..` components.
pub fn container_path_ok(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    !rest.is_empty()
        && !path.contains('\0')
        && rest
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

fn parse_mode(text: &str) -> Option<u32> {
    if text.is_empty() {
        return Some(0o600);
    }
    u32::from_str_radix(text, 8).ok().filter(|m| *m <= 0o7777)
}

impl MetadataTemplate {
    pub fn from_config(cfg: &LoginMetadataConfig) -> Result<Self, MetadataConfigError> {
        let err = |key: String, message: &str| MetadataConfigError {
            key,
            message: message.into(),
        };
        if cfg.environment.len() > crate::limits::MAX_ENV_VARS {
            return Err(err("environment".into(), "too many variables"));
        }
        let mut environment = Vec::new();
        for (k, v) in &cfg.environment {
            if !env_name_ok(k) {
                return Err(err(format!("environment.{k}"), "not a valid variable name"));
            }
            if v.len() > crate::limits::MAX_ENV_VALUE_BYTES || v.contains('\0') {
                return Err(err(
                    format!("environment.{k}"),
                    "value too long or contains NUL",
                ));
            }
            environment.push((k.clone(), v.clone()));
        }
        if cfg.files.len() > MAX_LOGIN_FILES {
            return Err(err("files".into(), "too many files"));
        }
        let mut files = Vec::new();
        for (path, f) in &cfg.files {
            let key = format!("files.{path}");
            if !container_path_ok(path) {
                return Err(err(
                    key,
                    "must be an absolute path without . or .. components",
                ));
            }
            let LoginFileConfig {
                value,
                source,
                mode,
            } = f;
            let content = match (value.is_empty(), source.is_empty()) {
                (false, true) => Content::Inline(value.as_bytes().to_vec()),
                (true, false) => Content::Source(source.clone()),
                _ => return Err(err(key, "needs exactly one of value and source")),
            };
            if let Content::Inline(v) = &content {
                if v.len() as u64 > MAX_LOGIN_FILE_BYTES {
                    return Err(err(key, "value is larger than 1 MiB"));
                }
            }
            let Some(mode) = parse_mode(mode) else {
                return Err(err(
                    format!("{key}.mode"),
                    "must be octal permission bits like \"0640\"",
                ));
            };
            files.push(FileTemplate {
                path: path.clone(),
                content,
                mode,
            });
        }
        Ok(Self { environment, files })
    }

    /// The metadata for one user: `source` files read now (blocking; call off the runtime).
    pub fn resolve(&self, user: &str) -> Result<LoginMetadata, String> {
        let mut files = Vec::with_capacity(self.files.len());
        for t in &self.files {
            let data = match &t.content {
                Content::Inline(v) => v.clone(),
                Content::Source(template) => {
                    check_user_name(user).map_err(|r| format!("user name {r}"))?;
                    let path = PathBuf::from(template.replace("%u", user));
                    match super::read_capped(&path, MAX_LOGIN_FILE_BYTES) {
                        Ok(Some(d)) => d,
                        Ok(None) => return Err(format!("{} is larger than 1 MiB", path.display())),
                        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
                    }
                }
            };
            files.push(LoginFile {
                path: t.path.clone(),
                data,
                mode: t.mode,
            });
        }
        Ok(LoginMetadata {
            values: Default::default(),
            environment: self.environment.clone(),
            files,
        })
    }

    pub fn has_files(&self) -> bool {
        !self.files.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str) -> LoginMetadataConfig {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn inline_and_source_files_resolve_per_user() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("alice.txt"), "alice's secret").unwrap();
        let t = MetadataTemplate::from_config(&cfg(&format!(
            "environment: {{LAB: \"1\"}}\nfiles:\n  /etc/motd: {{value: hi, mode: \"0644\"}}\n  /tmp/s: {{source: {}/%u.txt}}\n",
            dir.path().display()
        )))
        .unwrap();
        let m = t.resolve("alice").unwrap();
        assert_eq!(m.environment, vec![("LAB".into(), "1".into())]);
        assert_eq!(m.files[0].path, "/etc/motd");
        assert_eq!(m.files[0].mode, 0o644);
        assert_eq!(m.files[1].data, b"alice's secret");
        assert_eq!(m.files[1].mode, 0o600);
        assert!(t.resolve("bob").unwrap_err().contains("cannot read"));
        assert!(t.resolve("../alice").unwrap_err().contains("user name"));
        assert!(!format!("{:?}", m.files[1]).contains("secret"));
    }

    #[test]
    fn bad_entries_name_their_key() {
        for (yaml, key) in [
            ("environment: {\"1X\": a}", "environment.1X"),
            ("files: {relative: {value: a}}", "files.relative"),
            ("files: {/a/../b: {value: a}}", "files./a/../b"),
            ("files: {/a: {}}", "files./a"),
            ("files: {/a: {value: a, source: b}}", "files./a"),
            ("files: {/a: {value: a, mode: \"999\"}}", "files./a.mode"),
        ] {
            let e = MetadataTemplate::from_config(&cfg(yaml)).unwrap_err();
            assert_eq!(e.key, key, "{yaml}");
        }
    }
}
