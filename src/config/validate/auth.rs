//! `auth`: which methods authenticate, their files and webhooks (ContainerSSH 0.4's flat form
//! included), and the metadata every login gets.

use std::path::{Path, PathBuf};

use super::invalid;
use crate::config::model::{AuthConfig, WebhookConfig};
use crate::config::ConfigError;

/// `auth`, checked.
pub(super) struct Auth {
    pub authorized_keys: Option<String>,
    pub password_file: Option<PathBuf>,
    pub password_webhook: Option<WebhookConfig>,
    pub pubkey_webhook: Option<WebhookConfig>,
    pub authz_webhook: Option<WebhookConfig>,
    pub trusted_user_ca_keys: Option<PathBuf>,
    pub metadata: crate::auth::metadata::MetadataTemplate,
}

pub(super) fn check(
    file: &str,
    a: &AuthConfig,
    warnings: &mut Vec<String>,
) -> Result<Auth, ConfigError> {
    let authorized_keys = match a.public_key.method.as_str() {
        "" => None,
        "authorizedKeys" => {
            let p = a.public_key.authorized_keys.path.clone();
            if p.is_empty() {
                return Err(invalid(
                    file,
                    "auth.publicKey.authorizedKeys.path",
                    "required",
                ));
            }
            Some(p)
        }
        "webhook" => None,
        other => {
            return Err(invalid(
                file,
                "auth.publicKey.method",
                format!("unknown method {other:?}; expected authorizedKeys or webhook"),
            ))
        }
    };
    let mut pubkey_webhook = webhook(
        file,
        "auth.publicKey.webhook",
        &a.public_key.method,
        &a.public_key.webhook,
    )?;
    // ContainerSSH 0.4's flat form: auth.url with auth.password: true / auth.pubkey: true.
    let legacy = if a.url.is_empty() {
        if a.password.flag == Some(true) || a.pubkey {
            return Err(invalid(
                file,
                "auth.url",
                "required with auth.password: true or auth.pubkey: true",
            ));
        }
        None
    } else {
        if a.password.flag != Some(true) && !a.pubkey {
            return Err(invalid(
                file,
                "auth.url",
                "set auth.password: true and/or auth.pubkey: true (or use auth.password.webhook)",
            ));
        }
        let defaults = WebhookConfig::default();
        let hook = WebhookConfig {
            url: a.url.clone(),
            timeout: a.timeout.unwrap_or(defaults.timeout),
            auth_timeout: a.auth_timeout.unwrap_or(defaults.auth_timeout),
            cacert: a.cacert.clone(),
            cert: a.cert.clone(),
            key: a.key.clone(),
            ..defaults
        };
        warnings.push(
            "deprecated configuration: auth.url with auth.password/auth.pubkey is ContainerSSH 0.4's form: use auth.password.webhook and auth.publicKey.webhook".to_string(),
        );
        webhook(file, "auth", "webhook", &hook)?
    };
    if a.pubkey {
        if pubkey_webhook.is_some() || !a.public_key.method.is_empty() {
            return Err(invalid(
                file,
                "auth.pubkey",
                "conflicts with auth.publicKey.method",
            ));
        }
        pubkey_webhook = legacy.clone();
    }
    let password_file = match a.password.method.as_str() {
        "" => None,
        "passwordFile" => {
            let p = &a.password.password_file.path;
            if p.is_empty() {
                return Err(invalid(file, "auth.password.passwordFile.path", "required"));
            }
            Some(PathBuf::from(p))
        }
        "webhook" => None,
        "kerberos" => {
            return Err(invalid(
                file,
                "auth.password.method",
                "kerberos authentication is not available in this version",
            ))
        }
        other => {
            return Err(invalid(
                file,
                "auth.password.method",
                format!("unknown method {other:?}; expected passwordFile or webhook"),
            ))
        }
    };
    let mut password_webhook = webhook(
        file,
        "auth.password.webhook",
        &a.password.method,
        &a.password.webhook,
    )?;
    if a.password.flag == Some(true) {
        password_webhook = legacy;
    }
    let authz_webhook = match a.authz.method.as_str() {
        "" => None,
        "webhook" => webhook(file, "auth.authz.webhook", "webhook", &a.authz.webhook)?,
        other => {
            return Err(invalid(
                file,
                "auth.authz.method",
                format!("unknown method {other:?}; expected webhook"),
            ))
        }
    };
    let trusted_user_ca_keys = match a.public_key.trusted_user_ca_keys.as_str() {
        "" => None,
        p => {
            crate::auth::certificate::TrustedCas::load(Path::new(p))
                .map_err(|e| invalid(file, "auth.publicKey.trustedUserCAKeys", e))?;
            Some(PathBuf::from(p))
        }
    };
    if authorized_keys.is_none()
        && password_file.is_none()
        && pubkey_webhook.is_none()
        && password_webhook.is_none()
        && trusted_user_ca_keys.is_none()
    {
        return Err(invalid(
            file,
            "auth",
            "no authentication method configured: set auth.publicKey.method or auth.password.method",
        ));
    }

    Ok(Auth {
        authorized_keys,
        password_file,
        password_webhook,
        pubkey_webhook,
        authz_webhook,
        trusted_user_ca_keys,
        metadata: crate::auth::metadata::MetadataTemplate::from_config(&a.metadata)
            .map_err(|e| invalid(file, &format!("auth.metadata.{}", e.key), e.message))?,
    })
}

/// A webhook block when `method` is `webhook`: the URL is required, and the URL and TLS
/// settings are checked by building the client once.
pub(super) fn webhook(
    file: &str,
    key: &str,
    method: &str,
    cfg: &WebhookConfig,
) -> Result<Option<WebhookConfig>, ConfigError> {
    if method != "webhook" {
        return Ok(None);
    }
    if cfg.url.is_empty() {
        return Err(invalid(file, &format!("{key}.url"), "required"));
    }
    crate::webhook::Webhook::new(key, cfg).map_err(|message| {
        // The message starts with the key it is about.
        let (k, m) = message.split_once(": ").unwrap_or((key, &message));
        invalid(file, k, m)
    })?;
    Ok(Some(cfg.clone()))
}
