//! Reading a config file into the raw model, with errors that name the file, the key path,
//! the line and the column.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use super::model::AppConfig;
use crate::limits::MAX_CONFIG_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is larger than {max} bytes")]
    TooLarge { path: PathBuf, max: u64 },
    #[error("{file}: {key}{location}: {message}")]
    Parse {
        file: String,
        key: String,
        location: String,
        message: String,
    },
    #[error("{file}: {key}: {message}")]
    Invalid {
        file: String,
        key: String,
        message: String,
    },
}

impl ConfigError {
    /// A value that is wrong: `key` is its path from the top of the file.
    pub fn invalid(file: &str, key: &str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            file: file.into(),
            key: key.into(),
            message: message.into(),
        }
    }
}

/// A value a block's own check (a backend's, say) found wrong, before it is known which file
/// it came from: the key path from the top of the file, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct KeyError {
    pub key: String,
    pub message: String,
}

impl KeyError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }

    /// The same, in `file`.
    pub fn in_file(self, file: &str) -> ConfigError {
        ConfigError::invalid(file, &self.key, self.message)
    }

    /// Every duration of a `timeouts` block (`prefix`: its key path) must be more than 0.
    pub fn positive_durations(
        prefix: &str,
        durations: &[(&str, super::duration::GoDuration)],
    ) -> Result<(), Self> {
        match durations.iter().find(|(_, d)| d.is_zero()) {
            Some((key, _)) => Err(Self::new(format!("{prefix}.{key}"), "must be more than 0")),
            None => Ok(()),
        }
    }
}

/// Loads YAML (`.yaml`/`.yml`, and anything else) or JSON (`.json`), as ContainerSSH does.
pub fn load_file(path: &Path) -> Result<AppConfig, ConfigError> {
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    if meta.len() > MAX_CONFIG_BYTES {
        return Err(ConfigError::TooLarge {
            path: path.to_owned(),
            max: MAX_CONFIG_BYTES,
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let file = path.display().to_string();
    if path.extension().is_some_and(|e| e == "json") {
        parse_json(&file, &text)
    } else {
        parse_yaml(&file, &text)
    }
}

pub fn parse_yaml<T: DeserializeOwned + Default>(file: &str, text: &str) -> Result<T, ConfigError> {
    if text.trim().is_empty() {
        return Ok(T::default());
    }
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let location = inner
            .location()
            .map(|l| format!(" (line {}, column {})", l.line(), l.column()))
            .unwrap_or_default();
        ConfigError::Parse {
            file: file.into(),
            key,
            location,
            message: strip_location(&inner.to_string()),
        }
    })
}

pub fn parse_json<T: DeserializeOwned>(file: &str, text: &str) -> Result<T, ConfigError> {
    let mut de = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        ConfigError::Parse {
            file: file.into(),
            key,
            location: format!(" (line {}, column {})", inner.line(), inner.column()),
            message: strip_location(&inner.to_string()),
        }
    })
}

/// serde_yaml and serde_json append " at line X column Y"; we print the location ourselves.
fn strip_location(msg: &str) -> String {
    match msg.find(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_key_names_path_and_line() {
        let yaml =
            "ssh:\n  listen: 127.0.0.1:2222\ndocker:\n  execution:\n    imagePulPolicy: Never\n";
        let err = parse_yaml::<AppConfig>("c.yaml", yaml)
            .unwrap_err()
            .to_string();
        assert!(err.contains("docker.execution"), "{err}");
        assert!(err.contains("imagePulPolicy"), "{err}");
        assert!(err.contains("line 5"), "{err}");
    }

    #[test]
    fn bad_value_names_key() {
        let yaml = "docker:\n  timeouts:\n    http: 5x\n";
        let err = parse_yaml::<AppConfig>("c.yaml", yaml)
            .unwrap_err()
            .to_string();
        assert!(err.contains("docker.timeouts.http"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn json_is_accepted() {
        let json = r#"{"docker":{"execution":{"container":{"Image":"x"},"mode":"session"}}}"#;
        let cfg: AppConfig = parse_json("c.json", json).unwrap();
        assert_eq!(cfg.docker.execution.container["Image"], "x");
    }

    #[test]
    fn algorithm_lists_take_both_forms() {
        let cfg: AppConfig = parse_yaml(
            "c",
            "ssh:\n  ciphers: aes256-ctr:chacha20-poly1305@openssh.com\n",
        )
        .unwrap();
        assert_eq!(cfg.ssh.ciphers.0.len(), 2);
        let cfg: AppConfig = parse_yaml("c", "ssh:\n  macs: [hmac-sha2-256]\n").unwrap();
        assert_eq!(cfg.ssh.macs.0, vec!["hmac-sha2-256"]);
    }

    #[test]
    fn log_level_numbers_and_names() {
        let cfg: AppConfig = parse_yaml("c", "log:\n  level: 7\n").unwrap();
        assert_eq!(cfg.log.level, super::super::model::LogLevel::Debug);
        let cfg: AppConfig = parse_yaml("c", "log:\n  level: warning\n").unwrap();
        assert_eq!(cfg.log.level, super::super::model::LogLevel::Warning);
        assert!(parse_yaml::<AppConfig>("c", "log:\n  level: loud\n").is_err());
    }
}
