//! The config webhook's per-login configuration merged onto the file's, as ContainerSSH does
//! it (`mergo.WithOverride`, `containerssh-reference.md` §2.2): a deep merge where non-zero
//! values override and zero values (`false`, `""`, `0`, `null`) cannot reset anything, and
//! lists are replaced whole. The result is decoded strictly and validated again, so an
//! answer that names an unknown key or makes the configuration invalid refuses the login.
//!
//! Docker's `container`, `host`, `network` and `platform` blocks are matched
//! case-insensitively, as the engine does: `"Image"` from a webhook replaces `image` from the
//! file instead of standing next to it.

use serde_json::{Map, Value};

use super::model::AppConfig;
use super::validate::{validate, Settings};

/// The top-level keys a login's configuration may change.
pub const PER_LOGIN_KEYS: [&str; 5] = ["backend", "docker", "kubernetes", "security", "log"];

/// Why a per-login configuration cannot be used; shown in the log, one line.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error("the config webhook's `config` is not an object")]
    NotAnObject,
    #[error("the config webhook may not change {0:?} per login")]
    NotPerLogin(String),
    #[error("the merged configuration is invalid: {0}")]
    Invalid(String),
}

fn is_zero(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(_) | Value::Object(_) => false,
    }
}

/// Whether the object at `path` holds a Docker API block.
fn case_insensitive(path: &[&str]) -> bool {
    matches!(
        path,
        [
            "docker",
            "execution",
            "container" | "host" | "network" | "platform"
        ]
    )
}

fn merge_into(base: &mut Map<String, Value>, overlay: Map<String, Value>, path: &mut Vec<String>) {
    let ci = case_insensitive(&path.iter().map(String::as_str).collect::<Vec<_>>());
    for (k, v) in overlay {
        let existing = if ci {
            base.keys().find(|b| b.eq_ignore_ascii_case(&k)).cloned()
        } else {
            base.contains_key(&k).then(|| k.clone())
        };
        match (existing.as_ref().and_then(|e| base.get_mut(e)), v) {
            (Some(Value::Object(b)), Value::Object(o)) => {
                path.push(k);
                merge_into(b, o, path);
                path.pop();
            }
            (_, v) if is_zero(&v) => {}
            (_, v) => {
                if let Some(e) = existing {
                    base.remove(&e);
                }
                base.insert(k, v);
            }
        }
    }
}

/// `file` with the webhook's `overlay` merged on, decoded and validated.
pub fn merge(label: &str, file: &AppConfig, overlay: &Value) -> Result<Settings, MergeError> {
    let Value::Object(overlay) = overlay.clone() else {
        return Err(MergeError::NotAnObject);
    };
    if let Some(k) = overlay
        .keys()
        .find(|k| !PER_LOGIN_KEYS.contains(&k.as_str()))
    {
        return Err(MergeError::NotPerLogin(k.clone()));
    }
    // Of `log`, a login may change only its level: the destination is the process's.
    if let Some(Value::Object(log)) = overlay.get("log") {
        if let Some(k) = log.keys().find(|k| k.as_str() != "level") {
            return Err(MergeError::NotPerLogin(format!("log.{k}")));
        }
    }
    let Ok(Value::Object(mut base)) = serde_json::to_value(file) else {
        return Err(MergeError::Invalid(
            "the file configuration cannot be encoded".into(),
        ));
    };
    merge_into(&mut base, overlay, &mut Vec::new());
    let merged: AppConfig = serde_path_to_error::deserialize(Value::Object(base))
        .map_err(|e| MergeError::Invalid(format!("{}: {}", e.path(), e.inner())))?;
    validate(label, merged).map_err(|e| MergeError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn file() -> AppConfig {
        let yaml = "auth:\n  publicKey:\n    method: authorizedKeys\n    authorizedKeys: {path: /k/%u}\ndocker:\n  execution:\n    container:\n      image: base\n      env: [A=1, B=2]\n    mode: connection\nsecurity:\n  forwarding:\n    forwardingMode: enable\n";
        super::super::load::parse_yaml("file", yaml).unwrap()
    }

    #[test]
    fn non_zero_values_override_and_lists_are_replaced() {
        let s = merge(
            "webhook",
            &file(),
            &json!({"docker": {"execution": {"container": {"Image": "lab:1", "env": ["C=3"]}, "mode": "session"}},
                    "log": {"level": "debug"}}),
        )
        .unwrap();
        assert_eq!(
            s.docker.execution.container.get("Image"),
            Some(&json!("lab:1"))
        );
        assert!(s.docker.execution.container.get("image").is_none());
        assert_eq!(s.docker.execution.container["env"], json!(["C=3"]));
        assert_eq!(s.mode(), crate::config::model::ExecutionMode::Session);
        assert!(s.forwarding.local_tcp, "untouched settings stay");
    }

    #[test]
    fn zero_values_cannot_reset() {
        let s = merge(
            "webhook",
            &file(),
            &json!({"docker": {"execution": {"container": {"image": ""}, "mode": ""}}}),
        )
        .unwrap();
        assert_eq!(s.docker.execution.container["image"], "base");
        assert_eq!(s.mode(), crate::config::model::ExecutionMode::Connection);
    }

    #[test]
    fn unknown_keys_and_invalid_results_are_refused() {
        for (overlay, needle) in [
            (
                json!({"docker": {"execution": {"imagee": "x"}}}),
                "docker.execution",
            ),
            (json!({"ssh": {"listen": "0.0.0.0:1"}}), "\"ssh\""),
            (json!({"backend": "podman"}), "backend"),
            (json!(["x"]), "not an object"),
        ] {
            let e = merge("webhook", &file(), &overlay).unwrap_err().to_string();
            assert!(e.contains(needle), "{overlay}: {e}");
        }
    }
}
