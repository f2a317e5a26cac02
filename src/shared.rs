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
    pub backend: Arc<dyn Backend>,
    /// `audit`: makes the recordings, when configured.
    pub audit: Option<crate::audit::Recorder>,
    /// Retries removals that failed, and cleans every backend used up at shutdown.
    pub janitor: Arc<crate::backend::janitor::Janitor>,
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

/// What the server reads before it confines itself: host keys, credentials, webhooks (with
/// their TLS material) and the backend. [`Prepared::into_shared`] finishes the job once the
/// sandbox is entered.
pub struct Prepared {
    ssh: Arc<russh::server::Config>,
    authorized_keys: Option<AuthorizedKeys>,
    passwords: Option<crate::auth::password::PasswordFile>,
    trusted_cas: Option<crate::auth::certificate::TrustedCas>,
    webhooks: AuthWebhooks,
    backend: Arc<dyn Backend>,
    /// The janitor's ledger, and the places a previous run recorded in it.
    ledger: Option<crate::backend::ledger::Ledger>,
    leftovers: Vec<crate::backend::janitor::Leftover>,
    audit: Option<crate::audit::Recorder>,
}

impl Prepared {
    pub fn read(
        settings: &Settings,
        backend: Arc<dyn Backend>,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let keys = if settings.host_keys.is_empty() {
            vec![crate::ssh::hostkey::load_or_generate(
                &settings.state_directory,
            )?]
        } else {
            crate::ssh::hostkey::load(&settings.host_keys)?
        };
        let (ledger, leftovers) = open_ledger(settings);
        let authorized_keys = settings.authorized_keys.clone().map(AuthorizedKeys::new);
        if let Some(ak) = &authorized_keys {
            ak.check_template()?;
        }
        let trusted_cas = settings
            .trusted_user_ca_keys
            .as_deref()
            .map(crate::auth::certificate::TrustedCas::load)
            .transpose()?;
        Ok(Self {
            ssh: crate::ssh::russh_config(settings, keys)?,
            authorized_keys,
            passwords: settings
                .password_file
                .clone()
                .map(crate::auth::password::PasswordFile::new),
            trusted_cas,
            webhooks: AuthWebhooks::new(settings)?,
            backend,
            ledger,
            leftovers,
            audit: settings
                .audit
                .as_ref()
                .map(crate::audit::Recorder::open)
                .transpose()?,
        })
    }

    /// Directories files are created in after the sandbox (the audit recordings').
    pub fn writable_dirs(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        self.audit.iter().map(crate::audit::Recorder::dir).collect()
    }

    /// What connections share: starts the password hashing threads (so, after the sandbox,
    /// which must be entered while the process has one thread).
    pub fn into_shared(
        self,
        settings: Settings,
    ) -> Result<Arc<Shared>, Box<dyn std::error::Error>> {
        let passwords = self.passwords.map(PasswordChecker::start).transpose()?;
        let janitor = crate::backend::janitor::Janitor::new(
            crate::backend::build::place(&settings),
            Arc::clone(&self.backend),
            self.ledger,
            self.leftovers,
        );
        Ok(Arc::new(Shared {
            audit: self.audit,
            janitor: Arc::new(janitor),
            door: Door::new(settings.ssh.door.clone()),
            buffers: Budget::total(settings.ssh.buffers.total),
            settings: Arc::new(settings),
            ssh: self.ssh,
            authorized_keys: self.authorized_keys,
            trusted_cas: self.trusted_cas,
            passwords,
            backend: self.backend,
            webhooks: self.webhooks,
            shutdown: CancellationToken::new(),
        }))
    }
}

/// The janitor's ledger in the state directory, and a backend for each place a previous run
/// recorded there (before the sandbox: opening it for writing and building backends read
/// files). Without it the server still runs; a warning says what is lost.
fn open_ledger(
    settings: &Settings,
) -> (
    Option<crate::backend::ledger::Ledger>,
    Vec<crate::backend::janitor::Leftover>,
) {
    use crate::backend::{build, ledger::Ledger, one_line};
    let (ledger, records) = match Ledger::open(&settings.state_directory) {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(code = "BACKEND_LEDGER_UNUSABLE", error = %one_line(&e), "the janitor's ledger cannot be used: containers a crash leaves on a login's own engine or cluster are not reaped at the next start");
            return (None, Vec::new());
        }
    };
    let mut leftovers = Vec::new();
    for r in records {
        match build::leftover(settings, &r.block) {
            Ok(backend) => leftovers.push((r.place, backend)),
            Err(e) => {
                tracing::warn!(code = "BACKEND_REAP_FAILED", place = %r.place, error = %e, "a place the previous run recorded cannot be reaped: its backend cannot be built");
                ledger.remove(&r.place);
            }
        }
    }
    (Some(ledger), leftovers)
}
