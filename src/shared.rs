//! What every connection shares: the checked settings, the russh configuration, the loaded
//! credentials, the backend, the webhooks, the front door, the byte budget for what clients
//! send, and the shutdown latch. Built once in `main`, read by the accept loop and the SSH side.

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::auth::authorized_keys::AuthorizedKeys;
use crate::auth::hashing::PasswordChecker;
use crate::backend::Backend;
use crate::config::Settings;
use crate::front::Door;
use crate::ssh::flow::Budget;
use crate::webhook::Webhook;

/// What every connection shares.
pub struct Shared {
    pub settings: Arc<Settings>,
    pub ssh: Arc<russh::server::Config>,
    pub authorized_keys: Option<AuthorizedKeys>,
    /// `auth.publicKey.trustedUserCAKeys`, loaded.
    pub trusted_cas: Option<crate::auth::certificate::TrustedCas>,
    pub passwords: Option<PasswordChecker>,
    pub backend: Arc<Backend>,
    pub webhooks: AuthWebhooks,
    /// Cancelled on SIGTERM/SIGINT.
    pub shutdown: CancellationToken,
    /// Who may start a connection (`ssh.maxStartups`, `ssh.perSource*`).
    pub door: Arc<Door>,
    /// `ssh.buffers.total`: every connection's budget draws on it.
    pub buffers: Arc<Budget>,
}

/// The auth webhooks configured (`auth.{password,publicKey,authz}.method: webhook`).
#[derive(Default)]
pub struct AuthWebhooks {
    pub password: Option<Webhook>,
    pub public_key: Option<Webhook>,
    pub authz: Option<Webhook>,
    /// `configserver.url`.
    pub config: Option<Webhook>,
}

impl AuthWebhooks {
    pub fn new(settings: &Settings) -> Result<Self, String> {
        let make = |key: &str, cfg: &Option<crate::config::model::WebhookConfig>| {
            cfg.as_ref().map(|c| Webhook::new(key, c)).transpose()
        };
        Ok(Self {
            password: make("auth.password.webhook", &settings.password_webhook)?,
            public_key: make("auth.publicKey.webhook", &settings.pubkey_webhook)?,
            authz: make("auth.authz.webhook", &settings.authz_webhook)?,
            config: make("configserver", &settings.config_webhook)?,
        })
    }
}
