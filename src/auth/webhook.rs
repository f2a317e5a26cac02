//! ContainerSSH's auth webhook (`containerssh-reference.md` §2.2): `POST {url}/password`,
//! `/pubkey` and `/authz`, with the 0.5/0.6 JSON. A login's metadata, environment and files
//! accumulate over the calls (later answers add or overwrite entries) and end up in the
//! login's [`LoginMetadata`]. Passwords and sensitive values are never logged.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use super::metadata::{
    env_name_ok, LoginFile, LoginMetadata, MAX_LOGIN_FILES, MAX_LOGIN_FILE_BYTES,
};
use crate::webhook::{Webhook, WebhookError};

/// Metadata/environment entries kept per login.
pub const MAX_METADATA_ENTRIES: usize = 256;
/// Longest metadata or environment value.
pub const MAX_METADATA_VALUE_BYTES: usize = 64 * 1024;
/// Mode of files the webhook sends (they carry none).
const WEBHOOK_FILE_MODE: u32 = 0o600;

/// One metadata or environment value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Value {
    pub value: String,
    pub sensitive: bool,
}

/// One file: `value` is base64 on the wire.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct FileValue {
    pub value: String,
    pub sensitive: bool,
}

impl std::fmt::Debug for FileValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileValue")
            .field("len", &self.value.len())
            .finish()
    }
}

/// Who is logging in, for every request.
#[derive(Clone, Debug)]
pub struct Peer {
    pub connection_id: String,
    /// `IP:port` (`[v6]:port`).
    pub remote_address: String,
    pub client_version: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PasswordRequest<'a> {
    username: &'a str,
    remote_address: &'a str,
    connection_id: &'a str,
    client_version: &'a str,
    password_base64: String,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PublicKeyRequest<'a> {
    username: &'a str,
    remote_address: &'a str,
    connection_id: &'a str,
    client_version: &'a str,
    public_key: &'a str,
}

/// The authz (and config webhook) request: the login so far.
#[derive(Serialize, Debug)]
#[serde(rename_all = "camelCase")]
pub struct LoginRequest<'a> {
    pub username: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub authenticated_username: &'a str,
    pub remote_address: &'a str,
    pub connection_id: &'a str,
    pub client_version: &'a str,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, Value>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub environment: BTreeMap<String, Value>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, FileValue>,
}

/// The answer of `/password`, `/pubkey` and `/authz`. The echo fields are accepted and
/// ignored; other unknown fields are ignored too (the Go server would refuse them).
#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct AuthResponse {
    success: bool,
    #[serde(default)]
    authenticated_username: Option<String>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    environment: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    files: Option<BTreeMap<String, FileValue>>,
}

/// What the webhooks said about one login so far.
#[derive(Clone, Debug, Default)]
pub struct LoginState {
    pub authenticated_username: String,
    pub metadata: BTreeMap<String, Value>,
    pub environment: BTreeMap<String, Value>,
    pub files: BTreeMap<String, FileValue>,
}

/// The outcome of one webhook step.
#[derive(Debug)]
pub enum Verdict {
    Allowed(LoginState),
    Denied,
}

/// Why a login step could not be decided (logged; the login is refused).
#[derive(Debug, thiserror::Error)]
pub enum AuthWebhookError {
    #[error(transparent)]
    Webhook(#[from] WebhookError),
    #[error("the answer is unusable: {0}")]
    Invalid(String),
}

impl LoginState {
    /// Adds (or overwrites) what `resp` brings, checking names, paths and sizes.
    fn merge(&mut self, resp: AuthResponse) -> Result<(), String> {
        if let Some(u) = resp.authenticated_username.filter(|u| !u.is_empty()) {
            self.authenticated_username = u;
        }
        for (k, v) in resp.metadata.unwrap_or_default() {
            check_value("metadata", &k, &v.value)?;
            self.metadata.insert(k, v);
        }
        for (k, v) in resp.environment.unwrap_or_default() {
            if !env_name_ok(&k) {
                return Err(format!("environment: {k:?} is not a variable name"));
            }
            check_value("environment", &k, &v.value)?;
            self.environment.insert(k, v);
        }
        for (path, f) in resp.files.unwrap_or_default() {
            if !path.starts_with('/') || path.contains('\0') || path.ends_with('/') {
                return Err(format!("files: {path:?} is not an absolute file path"));
            }
            let len = decode_file(&f.value).map_err(|e| format!("files: {path}: {e}"))?;
            if len as u64 > MAX_LOGIN_FILE_BYTES {
                return Err(format!(
                    "files: {path}: larger than {MAX_LOGIN_FILE_BYTES} bytes"
                ));
            }
            self.files.insert(path, f);
        }
        if self.metadata.len() > MAX_METADATA_ENTRIES
            || self.environment.len() > MAX_METADATA_ENTRIES
        {
            return Err(format!("more than {MAX_METADATA_ENTRIES} entries"));
        }
        if self.files.len() > MAX_LOGIN_FILES {
            return Err(format!("more than {MAX_LOGIN_FILES} files"));
        }
        Ok(())
    }

    /// Adds this state to the login's metadata from the configuration (the webhook's
    /// entries win).
    pub fn apply(&self, base: &LoginMetadata) -> LoginMetadata {
        let mut out = base.clone();
        for (k, v) in &self.environment {
            out.environment.retain(|(name, _)| name != k);
            out.environment.push((k.clone(), v.value.clone()));
        }
        for (path, f) in &self.files {
            let data = base64::engine::general_purpose::STANDARD
                .decode(&f.value)
                .unwrap_or_default();
            out.files.retain(|x| &x.path != path);
            out.files.push(LoginFile {
                path: path.clone(),
                data,
                mode: WEBHOOK_FILE_MODE,
            });
        }
        for (k, v) in &self.metadata {
            out.values.insert(k.clone(), v.value.clone());
        }
        out
    }

    /// The request describing this login to the authz (or config) webhook. Sensitive values
    /// are left out unless `sensitive` is true.
    pub fn request<'a>(
        &'a self,
        username: &'a str,
        peer: &'a Peer,
        sensitive: bool,
    ) -> LoginRequest<'a> {
        let keep = |v: &Value| sensitive || !v.sensitive;
        LoginRequest {
            username,
            authenticated_username: &self.authenticated_username,
            remote_address: &peer.remote_address,
            connection_id: &peer.connection_id,
            client_version: &peer.client_version,
            metadata: self
                .metadata
                .iter()
                .filter(|(_, v)| keep(v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            environment: self
                .environment
                .iter()
                .filter(|(_, v)| keep(v))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            files: self
                .files
                .iter()
                .filter(|(_, f)| sensitive || !f.sensitive)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }
}

fn check_value(what: &str, key: &str, value: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > 256 || key.contains('\0') {
        return Err(format!("{what}: unusable name {key:?}"));
    }
    if value.len() > MAX_METADATA_VALUE_BYTES || value.contains('\0') {
        return Err(format!("{what}: {key}: value too long or contains NUL"));
    }
    Ok(())
}

fn decode_file(b64: &str) -> Result<usize, String> {
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map(|d| d.len())
        .map_err(|e| format!("not base64: {e}"))
}

fn verdict(resp: AuthResponse, mut state: LoginState) -> Result<Verdict, AuthWebhookError> {
    if !resp.success {
        return Ok(Verdict::Denied);
    }
    state.merge(resp).map_err(AuthWebhookError::Invalid)?;
    Ok(Verdict::Allowed(state))
}

/// `POST {url}/password`.
pub async fn password(
    hook: &Webhook,
    username: &str,
    password: &[u8],
    peer: &Peer,
) -> Result<Verdict, AuthWebhookError> {
    let req = PasswordRequest {
        username,
        remote_address: &peer.remote_address,
        connection_id: &peer.connection_id,
        client_version: &peer.client_version,
        password_base64: base64::engine::general_purpose::STANDARD.encode(password),
    };
    let resp: AuthResponse = hook.call("/password", &req).await?;
    verdict(resp, LoginState::default())
}

/// `POST {url}/pubkey` with the key in authorized_keys form (`ssh-ed25519 AAAA…`).
pub async fn public_key(
    hook: &Webhook,
    username: &str,
    key: &str,
    peer: &Peer,
) -> Result<Verdict, AuthWebhookError> {
    let req = PublicKeyRequest {
        username,
        remote_address: &peer.remote_address,
        connection_id: &peer.connection_id,
        client_version: &peer.client_version,
        public_key: key,
    };
    let resp: AuthResponse = hook.call("/pubkey", &req).await?;
    verdict(resp, LoginState::default())
}

/// `POST {url}/authz` after a successful authentication; the state grows with its answer.
pub async fn authz(
    hook: &Webhook,
    username: &str,
    state: LoginState,
    peer: &Peer,
) -> Result<Verdict, AuthWebhookError> {
    let resp: AuthResponse = hook
        .call("/authz", &state.request(username, peer, true))
        .await?;
    verdict(resp, state)
}

/// The config webhook's answer: the per-login configuration and more metadata.
#[derive(Deserialize, Debug)]
#[serde(rename_all = "camelCase")]
struct ConfigResponse {
    #[serde(default)]
    config: Option<serde_json::Value>,
    #[serde(default)]
    metadata: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    environment: Option<BTreeMap<String, Value>>,
    #[serde(default)]
    files: Option<BTreeMap<String, FileValue>>,
}

/// `POST <configserver.url>` (exactly) with the login so far; sensitive values only when
/// `transmitSensitiveMetadata` is set. Returns the grown state and the answer's `config`
/// (`None` when it brings none).
pub async fn config(
    hook: &Webhook,
    username: &str,
    mut state: LoginState,
    peer: &Peer,
    sensitive: bool,
) -> Result<(LoginState, Option<serde_json::Value>), AuthWebhookError> {
    let resp: ConfigResponse = hook
        .call("", &state.request(username, peer, sensitive))
        .await?;
    state
        .merge(AuthResponse {
            success: true,
            authenticated_username: None,
            metadata: resp.metadata,
            environment: resp.environment,
            files: resp.files,
        })
        .map_err(AuthWebhookError::Invalid)?;
    let config = resp
        .config
        .filter(|c| !c.is_null() && c.as_object().is_none_or(|o| !o.is_empty()));
    Ok((state, config))
}

/// Fuzz entry: decoding and merging an arbitrary response never panics.
pub fn fuzz_auth_response(data: &[u8]) {
    if let Ok(resp) = serde_json::from_slice::<AuthResponse>(data) {
        let mut state = LoginState::default();
        if state.merge(resp).is_ok() {
            let _ = state.apply(&LoginMetadata::default());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses_merge_and_apply() {
        let resp: AuthResponse = serde_json::from_str(
            r#"{"success":true,"authenticatedUsername":"bob","username":"alice","connectionId":"x",
                "metadata":{"team":{"value":"blue","sensitive":false},"tok":{"value":"s3","sensitive":true}},
                "environment":{"GREETING":{"value":"hi"}},
                "files":{"/tmp/f":{"value":"aGkK","sensitive":true}}}"#,
        )
        .unwrap();
        let Verdict::Allowed(state) = verdict(resp, LoginState::default()).unwrap() else {
            panic!("allowed");
        };
        assert_eq!(state.authenticated_username, "bob");
        let base = LoginMetadata {
            environment: vec![("GREETING".into(), "old".into()), ("A".into(), "1".into())],
            ..Default::default()
        };
        let m = state.apply(&base);
        assert_eq!(
            m.environment,
            vec![("A".into(), "1".into()), ("GREETING".into(), "hi".into())]
        );
        assert_eq!(m.files[0].data, b"hi\n");
        assert_eq!(m.files[0].mode, 0o600);
        assert_eq!(m.values["team"], "blue");
        let peer = Peer {
            connection_id: "c".into(),
            remote_address: "127.0.0.1:1".into(),
            client_version: "SSH-2.0-x".into(),
        };
        let without = serde_json::to_value(state.request("alice", &peer, false)).unwrap();
        assert!(without["metadata"].get("tok").is_none());
        assert!(without.get("files").is_none());
        assert_eq!(without["authenticatedUsername"], "bob");
        let with = serde_json::to_value(state.request("alice", &peer, true)).unwrap();
        assert_eq!(with["metadata"]["tok"]["value"], "s3");
        assert_eq!(with["files"]["/tmp/f"]["value"], "aGkK");
    }

    #[test]
    fn bad_answers_are_refused() {
        for body in [
            r#"{"success":true,"environment":{"A B":{"value":"x"}}}"#,
            r#"{"success":true,"files":{"relative":{"value":"aGk="}}}"#,
            r#"{"success":true,"files":{"/x":{"value":"***"}}}"#,
        ] {
            let resp: AuthResponse = serde_json::from_str(body).unwrap();
            assert!(verdict(resp, LoginState::default()).is_err(), "{body}");
        }
        let resp: AuthResponse = serde_json::from_str(r#"{"success":false}"#).unwrap();
        assert!(matches!(
            verdict(resp, LoginState::default()).unwrap(),
            Verdict::Denied
        ));
        assert!(serde_json::from_str::<AuthResponse>(r#"{"success":"yes"}"#).is_err());
        assert!(serde_json::from_str::<AuthResponse>(r#"{}"#).is_err());
    }
}
