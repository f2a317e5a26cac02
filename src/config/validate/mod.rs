//! Raw config → checked settings, one file a section (`ssh`, `auth`, `security`, `sandbox`);
//! the backend blocks are checked by their backends (`backend::{docker,kubernetes}::config`).
//! Every error names the key path it is about.

mod auth;
mod observe;
mod sandbox;
mod security;
mod ssh;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use observe::{Audit, AuditS3, Served};
pub use security::{Forwarding, Policy, Rule, Timeouts};
pub use ssh::{Buffers, Ssh, DEFAULT_CIPHERS, DEFAULT_KEX, DEFAULT_MACS};

use super::model::{
    AgentConfig, AppConfig, BackendName, DockerConfig, KubernetesConfig, LogConfig, SandboxConfig,
    WebhookConfig,
};
use super::ConfigError;

#[derive(Clone, Debug)]
pub struct Settings {
    /// `ssh`, checked.
    pub ssh: Ssh,
    pub host_keys: Vec<String>,
    pub authorized_keys: Option<String>,
    pub password_file: Option<PathBuf>,
    /// `auth.password.webhook`, `auth.publicKey.webhook`, `auth.authz.webhook` when their
    /// method is `webhook` (checked: URL, TLS files).
    pub password_webhook: Option<WebhookConfig>,
    pub pubkey_webhook: Option<WebhookConfig>,
    pub authz_webhook: Option<WebhookConfig>,
    /// Deprecated settings that were accepted, to be logged once logging is up.
    pub warnings: Vec<String>,
    /// `auth.publicKey.trustedUserCAKeys`, checked to hold CA keys.
    pub trusted_user_ca_keys: Option<PathBuf>,
    /// `configserver` when its `url` is set, and whether sensitive metadata goes to it.
    pub config_webhook: Option<WebhookConfig>,
    pub transmit_sensitive_metadata: bool,
    /// The configuration these settings came from: the base of per-login merges.
    pub file: std::sync::Arc<AppConfig>,
    /// Which backend runs the containers; only its block is validated.
    pub backend: BackendName,
    pub docker: DockerConfig,
    /// The raw `kubernetes` block; the backend resolves `connection` when it starts
    /// (`backend::kubernetes::connection::resolve`, which needs the environment and files).
    pub kubernetes: KubernetesConfig,
    pub log: LogConfig,
    pub agent: AgentConfig,
    pub forwarding: Forwarding,
    /// `security`: which requests clients may make.
    pub policy: Policy,
    /// `auth.metadata`: environment and files every login gets.
    pub metadata: crate::auth::metadata::MetadataTemplate,
    /// `sandbox`, checked for what does not depend on who starts the server.
    pub sandbox: SandboxConfig,
    pub instance_id: String,
    pub state_directory: PathBuf,
    /// `metrics`, when enabled: the endpoint and the path.
    pub metrics: Option<(Served, String)>,
    /// `health`, when enabled.
    pub health: Option<Served>,
    /// `health.client`: what `--healthcheck` asks.
    pub health_client: crate::config::model::HealthClientConfig,
    /// `audit`, when it records.
    pub audit: Option<Audit>,
}

impl Settings {
    /// The execution mode of the configured backend.
    pub fn mode(&self) -> crate::config::model::ExecutionMode {
        match self.backend {
            BackendName::Docker => self.docker.execution.mode,
            BackendName::Kubernetes => self.kubernetes.pod.mode,
        }
    }

    /// The program a shell request runs.
    pub fn shell_command(&self) -> &[String] {
        match self.backend {
            BackendName::Docker => &self.docker.execution.shell_command,
            BackendName::Kubernetes => &self.kubernetes.pod.shell_command,
        }
    }

    /// The program a subsystem request runs.
    pub fn subsystem(&self, name: &str) -> Option<&String> {
        match self.backend {
            BackendName::Docker => self.docker.execution.subsystems.get(name),
            BackendName::Kubernetes => self.kubernetes.pod.subsystems.get(name),
        }
    }

    /// How long a connection's cleanup may take.
    pub fn stop_timeout(&self) -> std::time::Duration {
        match self.backend {
            BackendName::Docker => self.docker.timeouts.container_stop.0,
            BackendName::Kubernetes => self.kubernetes.timeouts.pod_stop.0,
        }
    }
}

fn invalid(file: &str, key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        file: file.into(),
        key: key.into(),
        message: message.into(),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// Where generated state goes when `stateDirectory` is unset: `$XDG_STATE_HOME/containerssh`,
/// else `~/.local/state/containerssh`, else `/var/lib/containerssh`.
pub fn default_state_directory() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("containerssh");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h).join(".local/state/containerssh");
    }
    PathBuf::from("/var/lib/containerssh")
}

pub fn validate(file: &str, cfg: AppConfig) -> Result<Settings, ConfigError> {
    let source = std::sync::Arc::new(cfg.clone());
    let config_webhook = if cfg.configserver.url.is_empty() {
        None
    } else {
        auth::webhook(file, "configserver", "webhook", &cfg.configserver.webhook())?
    };
    let mut warnings = Vec::new();
    let ssh = ssh::check(file, &cfg.ssh, &mut warnings)?;
    let auth = auth::check(file, &cfg.auth, &mut warnings)?;
    let instance_id = if cfg.instance_id.is_empty() {
        format!("{}-{}", hostname(), ssh.listen.port())
    } else {
        cfg.instance_id.clone()
    };
    if instance_id.len() > 128 || instance_id.chars().any(|c| c.is_control()) {
        return Err(invalid(
            file,
            "instanceId",
            "at most 128 printable characters",
        ));
    }
    let state_directory = if cfg.state_directory.is_empty() {
        default_state_directory()
    } else {
        PathBuf::from(&cfg.state_directory)
    };
    Ok(Settings {
        host_keys: cfg.ssh.hostkeys.clone(),
        ssh,
        authorized_keys: auth.authorized_keys,
        password_file: auth.password_file,
        password_webhook: auth.password_webhook,
        pubkey_webhook: auth.pubkey_webhook,
        authz_webhook: auth.authz_webhook,
        warnings,
        trusted_user_ca_keys: auth.trusted_user_ca_keys,
        config_webhook,
        transmit_sensitive_metadata: cfg.configserver.transmit_sensitive_metadata,
        file: source,
        backend: cfg.backend,
        docker: cfg.docker,
        kubernetes: cfg.kubernetes,
        log: cfg.log,
        agent: cfg.agent,
        forwarding: security::forwarding(file, &cfg.security.forwarding)?,
        policy: security::policy(file, &cfg.security)?,
        metadata: auth.metadata,
        metrics: observe::metrics(file, &cfg.metrics)?,
        health: observe::health(file, &cfg.health)?,
        health_client: cfg.health.client.clone(),
        audit: observe::audit(file, &cfg.audit)?,
        sandbox: sandbox::check(file, cfg.sandbox)?,
        instance_id,
        state_directory,
    })
}
