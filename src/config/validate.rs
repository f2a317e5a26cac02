//! Raw config → checked settings. Every error names the key path it is about.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Map, Value};

use super::model::{
    AgentConfig, AppConfig, BackendName, DockerConfig, ExecutionMode, ForwardingConfig,
    KubernetesConfig, LogConfig, SandboxConfig, SecurityMode, WebhookConfig,
};
use super::ConfigError;

/// Key exchange methods offered unless `ssh.kex` says otherwise: the post-quantum hybrid first,
/// then X25519 for OpenSSH clients before 9.9 (Debian 12, Ubuntu 22.04/24.04), which have no
/// mlkem768 and would otherwise be locked out (russh has no sntrup761). ssh-audit's only remark
/// on these is the post-quantum advisory on X25519.
pub const DEFAULT_KEX: &[&str] = &["mlkem768x25519-sha256", "curve25519-sha256"];
/// AEAD ciphers only: no MAC is negotiated with them at all.
pub const DEFAULT_CIPHERS: &[&str] = &[
    "chacha20-poly1305@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-gcm@openssh.com",
];
/// Encrypt-then-MAC only (for CTR ciphers an operator may list).
pub const DEFAULT_MACS: &[&str] = &[
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
];
/// Offered when listed, without remark.
const OTHER_KEX: &[&str] = &["curve25519-sha256@libssh.org"];
const OTHER_CIPHERS: &[&str] = &["aes256-ctr", "aes192-ctr", "aes128-ctr"];
/// Offered when listed, with a warning at start naming them: auditors flag them (NIST curves,
/// finite-field groups open to DHEat, encrypt-and-MAC).
const WEAK_KEX: &[&str] = &[
    "ecdh-sha2-nistp521",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp256",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
    "diffie-hellman-group14-sha256",
];
const WEAK_MACS: &[&str] = &["hmac-sha2-256", "hmac-sha2-512"];
/// Names the Go product allowed that we refuse: broken or weak.
const REFUSED: &[&str] = &[
    "arcfour",
    "arcfour128",
    "arcfour256",
    "tripledescbcID",
    "3des-cbc",
    "aes128-cbc",
    "diffie-hellman-group1-sha1",
    "diffie-hellman-group14-sha1",
    "hmac-sha1",
    "hmac-sha1-96",
];

#[derive(Clone, Debug)]
pub struct Settings {
    pub listen: SocketAddr,
    pub host_keys: Vec<String>,
    pub server_version: String,
    pub banner: Option<String>,
    /// (interval, max unanswered) for server→client keepalives.
    pub client_alive: Option<(Duration, usize)>,
    pub kex: Vec<&'static str>,
    pub ciphers: Vec<&'static str>,
    pub macs: Vec<&'static str>,
    pub login_grace_time: Duration,
    /// `ssh.handshakeTimeout`: version and key exchange, from the accept.
    pub handshake_timeout: Duration,
    /// `ssh.maxAuthTries`.
    pub max_auth_tries: u32,
    /// `ssh.maxStartups`, `ssh.perSource*`: who may start a connection.
    pub door: crate::front::DoorRules,
    /// `ssh.proxyProtocol`, when it names trusted proxies.
    pub proxy: Option<crate::front::proxy::ProxyRules>,
    /// `ssh.buffers`: (per connection, total) bytes clients may make us hold.
    pub buffers: Buffers,
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

/// Which kinds of forwarding clients may use (all off by default).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Forwarding {
    pub local_tcp: bool,
    pub remote_tcp: bool,
    pub local_socket: bool,
    pub remote_socket: bool,
    pub x11: bool,
    pub agent: bool,
}

impl Forwarding {
    pub fn any(&self) -> bool {
        self.local_tcp
            || self.remote_tcp
            || self.local_socket
            || self.remote_socket
            || self.x11
            || self.agent
    }
}

/// One request kind's rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Everything but these.
    Enable {
        deny: Vec<String>,
    },
    /// Only these.
    Filter {
        allow: Vec<String>,
    },
    Disable,
}

impl Rule {
    pub fn allows(&self, name: &str) -> bool {
        match self {
            Rule::Enable { deny } => !deny.iter().any(|d| d == name),
            Rule::Filter { allow } => allow.iter().any(|a| a == name),
            Rule::Disable => false,
        }
    }
}

/// The `security` block, resolved: every mode left at `""` takes `defaultMode`, and `enable`
/// when that is empty too. ContainerSSH's signal rule read the shell's mode; here each kind
/// reads its own.
#[derive(Clone, Debug)]
pub struct Policy {
    pub env: Rule,
    pub command: Rule,
    pub shell: bool,
    pub subsystem: Rule,
    pub tty: bool,
    pub signal: Rule,
    pub force_command: Option<String>,
    /// Session channels open at once per connection.
    pub max_sessions: Option<usize>,
    /// `security.timeouts`.
    pub timeouts: Timeouts,
}

/// `security.timeouts`, checked: `None` is off.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub idle: Option<Duration>,
    pub session: Option<Duration>,
    pub unused_connection: Option<Duration>,
    pub grace: Duration,
    /// An SSH signal name without `SIG` (`HUP`).
    pub signal: String,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            idle: None,
            session: None,
            unused_connection: None,
            grace: super::defaults::timeout_grace().0,
            signal: super::defaults::timeout_signal(),
        }
    }
}

/// `ssh.buffers`, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffers {
    pub per_connection: usize,
    pub total: usize,
}

fn buffers(file: &str, b: &crate::config::model::BuffersConfig) -> Result<Buffers, ConfigError> {
    use crate::limits::CHANNEL_WINDOW_MAX;
    let size = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    let (per_connection, total) = (size(b.per_connection.0), size(b.total.0));
    // One full window: every channel can at least get going, and one busy channel can use
    // all of it.
    if per_connection < CHANNEL_WINDOW_MAX {
        return Err(invalid(
            file,
            "ssh.buffers.perConnection",
            format!(
                "must be at least {} (one channel's full window)",
                super::size::ByteSize(CHANNEL_WINDOW_MAX as u64)
            ),
        ));
    }
    if total < per_connection {
        return Err(invalid(
            file,
            "ssh.buffers.total",
            "must be at least ssh.buffers.perConnection",
        ));
    }
    Ok(Buffers {
        per_connection,
        total,
    })
}

fn timeouts(file: &str, t: &crate::config::model::TimeoutsConfig) -> Result<Timeouts, ConfigError> {
    let off_or = |d: super::duration::GoDuration| (!d.is_zero()).then_some(d.0);
    let signal = t
        .signal
        .trim()
        .trim_start_matches("SIG")
        .to_ascii_uppercase();
    if crate::backend::signal_number(&signal).is_none() {
        return Err(invalid(
            file,
            "security.timeouts.signal",
            format!(
                "{:?} is not a signal SSH can send (HUP, INT, TERM, KILL, USR1, ...)",
                t.signal
            ),
        ));
    }
    let on = [t.idle, t.session].iter().any(|d| !d.is_zero());
    if on && t.grace.0 < Duration::from_secs(1) {
        return Err(invalid(
            file,
            "security.timeouts.grace",
            "must be at least 1s when idle or session is set",
        ));
    }
    Ok(Timeouts {
        idle: off_or(t.idle),
        session: off_or(t.session),
        unused_connection: off_or(t.unused_connection),
        grace: t.grace.0,
        signal,
    })
}

impl Default for Policy {
    fn default() -> Self {
        let all = Rule::Enable { deny: Vec::new() };
        Self {
            env: all.clone(),
            command: all.clone(),
            shell: true,
            subsystem: all.clone(),
            tty: true,
            signal: all,
            force_command: None,
            max_sessions: None,
            timeouts: Timeouts::default(),
        }
    }
}

fn policy(file: &str, s: &crate::config::model::SecurityConfig) -> Result<Policy, ConfigError> {
    let mode = |m: SecurityMode| match (m, s.default_mode) {
        (SecurityMode::Default, SecurityMode::Default) => SecurityMode::Enable,
        (SecurityMode::Default, d) => d,
        (m, _) => m,
    };
    let list = |key: &str, l: &crate::config::model::SecurityListConfig, deny_ok: bool| {
        if !deny_ok && !l.deny.is_empty() {
            return Err(invalid(
                file,
                &format!("security.{key}.deny"),
                "not supported: use mode filter with allow",
            ));
        }
        Ok(match mode(l.mode) {
            SecurityMode::Enable | SecurityMode::Default => Rule::Enable {
                deny: l.deny.clone(),
            },
            SecurityMode::Filter => Rule::Filter {
                allow: l.allow.clone(),
            },
            SecurityMode::Disable => Rule::Disable,
        })
    };
    let on = |m: SecurityMode| matches!(mode(m), SecurityMode::Enable | SecurityMode::Default);
    let max_sessions = match s.max_sessions {
        n if n < -1 => {
            return Err(invalid(
                file,
                "security.maxSessions",
                "must be -1 (no limit) or a positive number",
            ))
        }
        -1 | 0 => None,
        n => Some(usize::try_from(n).unwrap_or(usize::MAX)),
    };
    Ok(Policy {
        env: list("env", &s.env, true)?,
        command: list("command", &s.command, false)?,
        shell: on(s.shell.mode),
        subsystem: list("subsystem", &s.subsystem, true)?,
        tty: on(s.tty.mode),
        signal: list("signal", &s.signal, true)?,
        force_command: (!s.force_command.is_empty()).then(|| s.force_command.clone()),
        max_sessions,
        timeouts: timeouts(file, &s.timeouts)?,
    })
}

fn forwarding(file: &str, f: &ForwardingConfig) -> Result<Forwarding, ConfigError> {
    let mode = |key: &str, m: SecurityMode| match m {
        SecurityMode::Enable => Ok(true),
        SecurityMode::Default | SecurityMode::Disable => Ok(false),
        SecurityMode::Filter => Err(invalid(
            file,
            &format!("security.forwarding.{key}"),
            "filter is not supported for forwarding (use enable or disable)",
        )),
    };
    Ok(Forwarding {
        local_tcp: mode("forwardingMode", f.forwarding_mode)?,
        remote_tcp: mode("reverseForwardingMode", f.reverse_forwarding_mode)?,
        local_socket: mode("socketForwardingMode", f.socket_forwarding_mode)?,
        remote_socket: mode("socketListenMode", f.socket_listen_mode)?,
        x11: mode("x11ForwardingMode", f.x11_forwarding_mode)?,
        agent: mode("agentForwardingMode", f.agent_forwarding_mode)?,
    })
}

/// A webhook block when `method` is `webhook`: the URL is required, and the URL and TLS
/// settings are checked by building the client once.
fn webhook(
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

fn invalid(file: &str, key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        file: file.into(),
        key: key.into(),
        message: message.into(),
    }
}

/// An algorithm list: the defaults when empty, else the names listed, each one known; the weak
/// ones listed are named in a warning.
fn pick(
    file: &str,
    key: &str,
    wanted: &[String],
    groups: [&'static [&'static str]; 3],
    warnings: &mut Vec<String>,
) -> Result<Vec<&'static str>, ConfigError> {
    let [defaults, other, weak] = groups;
    if wanted.is_empty() {
        return Ok(defaults.to_vec());
    }
    let allowed: Vec<&'static str> = [defaults, other, weak].concat();
    let mut out = Vec::new();
    let mut weak_listed = Vec::new();
    for name in wanted {
        if REFUSED.contains(&name.as_str()) {
            return Err(invalid(
                file,
                key,
                format!("{name} is weak and not offered by this server; remove it"),
            ));
        }
        let known = allowed.iter().find(|a| **a == name).ok_or_else(|| {
            invalid(
                file,
                key,
                format!(
                    "unknown algorithm {name}; supported: {}",
                    allowed.join(", ")
                ),
            )
        })?;
        if !out.contains(known) {
            out.push(*known);
            if weak.contains(known) {
                weak_listed.push(*known);
            }
        }
    }
    if !weak_listed.is_empty() {
        warnings.push(format!(
            "{key}: offering {} because the configuration lists it; auditors flag it as weak \
             (the defaults are {})",
            weak_listed.join(", "),
            defaults.join(", ")
        ));
    }
    Ok(out)
}

/// ContainerSSH's rule: `^SSH-2.0-[!-,.-~]+( [a-zA-Z0-9- _.]+)?$`, at most 253 characters.
fn server_version_ok(v: &str) -> bool {
    let Some(rest) = v.strip_prefix("SSH-2.0-") else {
        return false;
    };
    if v.len() > 253 {
        return false;
    }
    let (software, comment) = match rest.split_once(' ') {
        Some((s, c)) => (s, Some(c)),
        None => (rest, None),
    };
    !software.is_empty()
        && software
            .bytes()
            .all(|b| (b'!'..=b'~').contains(&b) && b != b'-')
        && comment.is_none_or(|c| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b" -_.".contains(&b))
        })
}

fn has_key_ci(map: &serde_json::Map<String, serde_json::Value>, key: &str) -> bool {
    map.iter()
        .any(|(k, v)| k.eq_ignore_ascii_case(key) && !v.is_null() && v != "")
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

/// An absolute file path the tar upload can name: `/usr/bin/containerssh-agent`.
fn agent_path_ok(path: &str) -> bool {
    crate::auth::metadata::container_path_ok(path)
}

fn validate_docker(file: &str, docker: &DockerConfig) -> Result<(), ConfigError> {
    let exec = &docker.execution;
    if !has_key_ci(&exec.container, "image") {
        return Err(invalid(
            file,
            "docker.execution.container.image",
            "required",
        ));
    }
    if exec.shell_command.is_empty() {
        return Err(invalid(
            file,
            "docker.execution.shellCommand",
            "must not be empty",
        ));
    }
    if exec.mode == ExecutionMode::Persistent && exec.container_name.is_empty() {
        return Err(invalid(
            file,
            "docker.execution.containername",
            "persistent mode needs the name of the container to exec into",
        ));
    }
    if exec.mode != ExecutionMode::Persistent && exec.create_missing_container {
        return Err(invalid(
            file,
            "docker.execution.createMissingContainer",
            "only meaningful in persistent mode",
        ));
    }
    if exec.mode != ExecutionMode::Session && exec.idle_command.is_empty() {
        return Err(invalid(
            file,
            "docker.execution.idleCommand",
            "connection and persistent modes need an idle command",
        ));
    }
    if !exec.disable_agent && !agent_path_ok(&exec.agent_path) {
        return Err(invalid(
            file,
            "docker.execution.agentPath",
            "must be an absolute path to a file, without `.` or `..` components",
        ));
    }
    if exec.mode == ExecutionMode::Session {
        let restart = exec
            .host
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("restartpolicy"))
            .and_then(|(_, v)| v.as_object())
            .and_then(|o| o.iter().find(|(k, _)| k.eq_ignore_ascii_case("name")))
            .and_then(|(_, v)| v.as_str())
            .unwrap_or("");
        if !(restart.is_empty() || restart == "no") {
            return Err(invalid(
                file,
                "docker.execution.host.restartpolicy",
                "session mode cannot use a restart policy",
            ));
        }
    }
    let host = &docker.connection.host;
    if !(host.starts_with("unix://") || host.starts_with("tcp://")) {
        return Err(invalid(
            file,
            "docker.connection.host",
            "must start with unix:// or tcp://",
        ));
    }
    Ok(())
}

/// `ObjectMeta` fields (Kubernetes JSON names); ContainerSSH parses `pod.metadata` strictly.
const OBJECT_META_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

/// `PodSpec` fields (Kubernetes 1.35).
const POD_SPEC_FIELDS: &[&str] = &[
    "activeDeadlineSeconds",
    "affinity",
    "automountServiceAccountToken",
    "containers",
    "dnsConfig",
    "dnsPolicy",
    "enableServiceLinks",
    "ephemeralContainers",
    "hostAliases",
    "hostIPC",
    "hostNetwork",
    "hostPID",
    "hostUsers",
    "hostname",
    "hostnameOverride",
    "imagePullSecrets",
    "initContainers",
    "nodeName",
    "nodeSelector",
    "os",
    "overhead",
    "preemptionPolicy",
    "priority",
    "priorityClassName",
    "readinessGates",
    "resourceClaims",
    "resources",
    "restartPolicy",
    "runtimeClassName",
    "schedulerName",
    "schedulingGates",
    "securityContext",
    "serviceAccount",
    "serviceAccountName",
    "setHostnameAsFQDN",
    "shareProcessNamespace",
    "subdomain",
    "terminationGracePeriodSeconds",
    "tolerations",
    "topologySpreadConstraints",
    "volumes",
    "workloadRef",
];

/// `Container` fields (Kubernetes 1.35).
const CONTAINER_FIELDS: &[&str] = &[
    "args",
    "command",
    "env",
    "envFrom",
    "image",
    "imagePullPolicy",
    "lifecycle",
    "livenessProbe",
    "name",
    "ports",
    "readinessProbe",
    "resizePolicy",
    "resources",
    "restartPolicy",
    "restartPolicyRules",
    "securityContext",
    "startupProbe",
    "stdin",
    "stdinOnce",
    "terminationMessagePath",
    "terminationMessagePolicy",
    "tty",
    "volumeDevices",
    "volumeMounts",
    "workingDir",
];

fn known_fields(
    file: &str,
    key: &str,
    map: &Map<String, Value>,
    known: &[&str],
) -> Result<(), ConfigError> {
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(invalid(
            file,
            &format!("{key}.{k}"),
            "unknown field (Kubernetes JSON names are case-sensitive camelCase)",
        )),
        None => Ok(()),
    }
}

fn string_field<'a>(
    file: &str,
    key: &str,
    map: &'a Map<String, Value>,
    field: &str,
) -> Result<&'a str, ConfigError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(""),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(invalid(file, &format!("{key}.{field}"), "must be a string")),
    }
}

fn string_map(
    file: &str,
    key: &str,
    map: &Map<String, Value>,
    field: &str,
) -> Result<(), ConfigError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Object(o)) if o.values().all(Value::is_string) => Ok(()),
        Some(_) => Err(invalid(
            file,
            &format!("{key}.{field}"),
            "must be a map of strings",
        )),
    }
}

/// The containers of `spec.<field>`: a list of objects with known fields and a name each.
fn containers<'a>(
    file: &str,
    spec: &'a Map<String, Value>,
    field: &str,
) -> Result<Vec<&'a Map<String, Value>>, ConfigError> {
    let key = format!("kubernetes.pod.spec.{field}");
    let list = match spec.get(field) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(invalid(file, &key, "must be a list of containers")),
    };
    let mut out = Vec::new();
    let mut names = Vec::new();
    for (i, c) in list.iter().enumerate() {
        let ckey = format!("{key}[{i}]");
        let c = c
            .as_object()
            .ok_or_else(|| invalid(file, &ckey, "must be a container object"))?;
        known_fields(file, &ckey, c, CONTAINER_FIELDS)?;
        let name = string_field(file, &ckey, c, "name")?;
        if name.is_empty() {
            return Err(invalid(file, &format!("{ckey}.name"), "required"));
        }
        if names.contains(&name) {
            return Err(invalid(
                file,
                &format!("{ckey}.name"),
                format!("duplicate container name {name:?}"),
            ));
        }
        names.push(name);
        string_field(file, &ckey, c, "image")?;
        out.push(c);
    }
    Ok(out)
}

fn validate_kubernetes(file: &str, k: &KubernetesConfig) -> Result<(), ConfigError> {
    use crate::backend::kubernetes::connection::{check, ConnectionError};
    check(&k.connection).map_err(|e| match e {
        ConnectionError::Invalid { key, message } => {
            invalid(file, &format!("kubernetes.connection.{key}"), message)
        }
        other => invalid(file, "kubernetes.connection", other.to_string()),
    })?;

    let pod = &k.pod;
    let meta = &pod.metadata;
    known_fields(file, "kubernetes.pod.metadata", meta, OBJECT_META_FIELDS)?;
    let name = string_field(file, "kubernetes.pod.metadata", meta, "name")?;
    string_field(file, "kubernetes.pod.metadata", meta, "generateName")?;
    string_field(file, "kubernetes.pod.metadata", meta, "namespace")?;
    string_map(file, "kubernetes.pod.metadata", meta, "labels")?;
    string_map(file, "kubernetes.pod.metadata", meta, "annotations")?;

    let spec = &pod.spec;
    known_fields(file, "kubernetes.pod.spec", spec, POD_SPEC_FIELDS)?;
    let main = containers(file, spec, "containers")?;
    containers(file, spec, "initContainers")?;
    if main.is_empty() {
        return Err(invalid(
            file,
            "kubernetes.pod.spec.containers",
            "at least one container is required",
        ));
    }
    for (i, c) in main.iter().enumerate() {
        if string_field(file, "", c, "image")?.is_empty() {
            return Err(invalid(
                file,
                &format!("kubernetes.pod.spec.containers[{i}].image"),
                "required",
            ));
        }
    }
    if pod.console_container_number >= main.len() {
        return Err(invalid(
            file,
            "kubernetes.pod.consoleContainerNumber",
            format!(
                "{} is out of range: spec.containers has {} container(s)",
                pod.console_container_number,
                main.len()
            ),
        ));
    }
    let restart = string_field(file, "kubernetes.pod.spec", spec, "restartPolicy")?;
    if pod.mode == ExecutionMode::Session && !(restart.is_empty() || restart == "Never") {
        return Err(invalid(
            file,
            "kubernetes.pod.spec.restartPolicy",
            "session mode needs restartPolicy Never (or unset)",
        ));
    }
    if pod.mode == ExecutionMode::Persistent && name.is_empty() {
        return Err(invalid(
            file,
            "kubernetes.pod.metadata.name",
            "persistent mode needs the name of the pod to exec into",
        ));
    }
    if pod.mode != ExecutionMode::Persistent && pod.create_missing_pods {
        return Err(invalid(
            file,
            "kubernetes.pod.createMissingPods",
            "only meaningful in persistent mode",
        ));
    }
    if pod.shell_command.is_empty() {
        return Err(invalid(
            file,
            "kubernetes.pod.shellCommand",
            "must not be empty",
        ));
    }
    if pod.mode != ExecutionMode::Session && pod.idle_command.is_empty() {
        return Err(invalid(
            file,
            "kubernetes.pod.idleCommand",
            "connection and persistent modes need an idle command",
        ));
    }
    if !pod.disable_agent && !agent_path_ok(&pod.agent_path) {
        return Err(invalid(
            file,
            "kubernetes.pod.agentPath",
            "must be an absolute path to a file, without `.` or `..` components",
        ));
    }
    if pod
        .agent_init_image
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(invalid(
            file,
            "kubernetes.pod.agentInitImage",
            "must be an image reference",
        ));
    }
    for (key, map) in [
        ("exposeAuthMetadataAsEnv", &pod.expose_auth_metadata_as_env),
        (
            "exposeAuthMetadataAsLabels",
            &pod.expose_auth_metadata_as_labels,
        ),
        (
            "exposeAuthMetadataAsAnnotations",
            &pod.expose_auth_metadata_as_annotations,
        ),
    ] {
        if let Some((m, _)) = map.iter().find(|(m, v)| m.is_empty() || v.is_empty()) {
            return Err(invalid(
                file,
                &format!("kubernetes.pod.{key}"),
                format!("empty name in entry {m:?}"),
            ));
        }
    }
    let t = &k.timeouts;
    for (key, d) in [
        ("podStart", t.pod_start),
        ("podStop", t.pod_stop),
        ("commandStart", t.command_start),
        ("signal", t.signal),
        ("window", t.window),
        ("http", t.http),
    ] {
        if d.is_zero() {
            return Err(invalid(
                file,
                &format!("kubernetes.timeouts.{key}"),
                "must be more than 0",
            ));
        }
    }
    Ok(())
}

pub fn validate(file: &str, cfg: AppConfig) -> Result<Settings, ConfigError> {
    let source = std::sync::Arc::new(cfg.clone());
    let config_webhook = if cfg.configserver.url.is_empty() {
        None
    } else {
        webhook(file, "configserver", "webhook", &cfg.configserver.webhook())?
    };
    let listen: SocketAddr = cfg.ssh.listen.parse().map_err(|_| {
        invalid(
            file,
            "ssh.listen",
            format!("{:?} is not an IP:port address", cfg.ssh.listen),
        )
    })?;
    if !server_version_ok(&cfg.ssh.server_version) {
        return Err(invalid(
            file,
            "ssh.serverVersion",
            "must look like SSH-2.0-Name (optionally followed by a space and a comment)",
        ));
    }
    let client_alive = if cfg.ssh.client_alive_interval.is_zero() {
        None
    } else {
        if cfg.ssh.client_alive_interval.0 < Duration::from_secs(1) {
            return Err(invalid(file, "ssh.clientAliveInterval", "minimum is 1s"));
        }
        Some((
            cfg.ssh.client_alive_interval.0,
            usize::try_from(cfg.ssh.client_alive_count_max.max(1)).unwrap_or(3),
        ))
    };
    if cfg.ssh.login_grace_time.is_zero() {
        return Err(invalid(file, "ssh.loginGraceTime", "must be more than 0"));
    }
    if cfg.ssh.handshake_timeout.is_zero() {
        return Err(invalid(file, "ssh.handshakeTimeout", "must be more than 0"));
    }
    // Both count from the accept, so a handshake never gets longer than the whole login.
    let handshake_timeout = cfg.ssh.handshake_timeout.0.min(cfg.ssh.login_grace_time.0);
    let max_auth_tries = cfg.ssh.max_auth_tries;
    if !(1..=crate::limits::MAX_AUTH_TRIES_LIMIT).contains(&max_auth_tries) {
        return Err(invalid(
            file,
            "ssh.maxAuthTries",
            format!("must be 1 to {}", crate::limits::MAX_AUTH_TRIES_LIMIT),
        ));
    }
    let door = door_rules(file, &cfg.ssh)?;
    let proxy = proxy_rules(file, &cfg.ssh.proxy_protocol)?;
    let buffers = buffers(file, &cfg.ssh.buffers)?;

    let authorized_keys = match cfg.auth.public_key.method.as_str() {
        "" => None,
        "authorizedKeys" => {
            let p = cfg.auth.public_key.authorized_keys.path.clone();
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
        &cfg.auth.public_key.method,
        &cfg.auth.public_key.webhook,
    )?;
    // ContainerSSH 0.4's flat form: auth.url with auth.password: true / auth.pubkey: true.
    let mut warnings = Vec::new();
    let legacy = if cfg.auth.url.is_empty() {
        if cfg.auth.password.flag == Some(true) || cfg.auth.pubkey {
            return Err(invalid(
                file,
                "auth.url",
                "required with auth.password: true or auth.pubkey: true",
            ));
        }
        None
    } else {
        if cfg.auth.password.flag != Some(true) && !cfg.auth.pubkey {
            return Err(invalid(
                file,
                "auth.url",
                "set auth.password: true and/or auth.pubkey: true (or use auth.password.webhook)",
            ));
        }
        let a = &cfg.auth;
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
    if cfg.auth.pubkey {
        if pubkey_webhook.is_some() || !cfg.auth.public_key.method.is_empty() {
            return Err(invalid(
                file,
                "auth.pubkey",
                "conflicts with auth.publicKey.method",
            ));
        }
        pubkey_webhook = legacy.clone();
    }
    let password_file = match cfg.auth.password.method.as_str() {
        "" => None,
        "passwordFile" => {
            let p = &cfg.auth.password.password_file.path;
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
        &cfg.auth.password.method,
        &cfg.auth.password.webhook,
    )?;
    if cfg.auth.password.flag == Some(true) {
        password_webhook = legacy;
    }
    let authz_webhook = match cfg.auth.authz.method.as_str() {
        "" => None,
        "webhook" => webhook(
            file,
            "auth.authz.webhook",
            "webhook",
            &cfg.auth.authz.webhook,
        )?,
        other => {
            return Err(invalid(
                file,
                "auth.authz.method",
                format!("unknown method {other:?}; expected webhook"),
            ))
        }
    };
    let trusted_user_ca_keys = match cfg.auth.public_key.trusted_user_ca_keys.as_str() {
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

    match cfg.backend {
        BackendName::Docker => validate_docker(file, &cfg.docker)?,
        BackendName::Kubernetes => validate_kubernetes(file, &cfg.kubernetes)?,
    }

    let instance_id = if cfg.instance_id.is_empty() {
        format!("{}-{}", hostname(), listen.port())
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
    let kex = pick(
        file,
        "ssh.kex",
        &cfg.ssh.kex.0,
        [DEFAULT_KEX, OTHER_KEX, WEAK_KEX],
        &mut warnings,
    )?;
    let ciphers = pick(
        file,
        "ssh.ciphers",
        &cfg.ssh.ciphers.0,
        [DEFAULT_CIPHERS, OTHER_CIPHERS, &[]],
        &mut warnings,
    )?;
    let macs = pick(
        file,
        "ssh.macs",
        &cfg.ssh.macs.0,
        [DEFAULT_MACS, &[], WEAK_MACS],
        &mut warnings,
    )?;
    let state_directory = if cfg.state_directory.is_empty() {
        default_state_directory()
    } else {
        PathBuf::from(&cfg.state_directory)
    };

    Ok(Settings {
        listen,
        host_keys: cfg.ssh.hostkeys.clone(),
        server_version: cfg.ssh.server_version.clone(),
        banner: (!cfg.ssh.banner.is_empty()).then(|| cfg.ssh.banner.clone()),
        client_alive,
        kex,
        ciphers,
        macs,
        login_grace_time: cfg.ssh.login_grace_time.0,
        handshake_timeout,
        max_auth_tries,
        door,
        proxy,
        buffers,
        authorized_keys,
        password_file,
        password_webhook,
        pubkey_webhook,
        authz_webhook,
        warnings,
        trusted_user_ca_keys,
        config_webhook,
        transmit_sensitive_metadata: cfg.configserver.transmit_sensitive_metadata,
        file: source,
        backend: cfg.backend,
        docker: cfg.docker,
        kubernetes: cfg.kubernetes,
        log: cfg.log,
        agent: cfg.agent,
        forwarding: forwarding(file, &cfg.security.forwarding)?,
        policy: policy(file, &cfg.security)?,
        metadata: crate::auth::metadata::MetadataTemplate::from_config(&cfg.auth.metadata)
            .map_err(|e| invalid(file, &format!("auth.metadata.{}", e.key), e.message))?,
        sandbox: sandbox(file, cfg.sandbox)?,
        instance_id,
        state_directory,
    })
}

/// `ssh.maxStartups`, `ssh.perSourceMaxStartups`, `ssh.perSourceNetBlockSize`,
/// `ssh.perSourcePenalties`, `ssh.perSourcePenaltyExemptList`.
fn door_rules(
    file: &str,
    ssh: &super::model::SshConfig,
) -> Result<crate::front::DoorRules, ConfigError> {
    use crate::front::{cidr::NetBlock, penalty::PenaltyRules, MaxStartups};
    let max_startups =
        MaxStartups::parse(&ssh.max_startups.0).map_err(|e| invalid(file, "ssh.maxStartups", e))?;
    if max_startups.full > crate::limits::MAX_STARTUPS_LIMIT {
        return Err(invalid(
            file,
            "ssh.maxStartups",
            format!("full is at most {}", crate::limits::MAX_STARTUPS_LIMIT),
        ));
    }
    let per_source = ssh.per_source_max_startups.0;
    if per_source == Some(0) {
        return Err(invalid(
            file,
            "ssh.perSourceMaxStartups",
            "must be at least 1 (or \"none\")",
        ));
    }
    let net_block = NetBlock::parse(&ssh.per_source_net_block_size.0)
        .map_err(|e| invalid(file, "ssh.perSourceNetBlockSize", e))?;
    let p = &ssh.per_source_penalties;
    let penalties = if p.enabled {
        if p.max.0 < p.min.0 {
            return Err(invalid(
                file,
                "ssh.perSourcePenalties.max",
                "must be at least min",
            ));
        }
        Some(PenaltyRules::from(p))
    } else {
        None
    };
    let exempt = cidr_list(
        file,
        "ssh.perSourcePenaltyExemptList",
        &ssh.per_source_penalty_exempt_list,
    )?;
    Ok(crate::front::DoorRules {
        max_startups,
        per_source,
        net_block,
        penalties,
        exempt,
    })
}

fn cidr_list(
    file: &str,
    key: &str,
    list: &[String],
) -> Result<Vec<crate::front::cidr::Cidr>, ConfigError> {
    if list.len() > crate::limits::MAX_ADDRESS_LIST_ENTRIES {
        return Err(invalid(
            file,
            key,
            format!(
                "at most {} entries",
                crate::limits::MAX_ADDRESS_LIST_ENTRIES
            ),
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, c)| {
            crate::front::cidr::Cidr::parse(c).map_err(|e| invalid(file, &format!("{key}[{i}]"), e))
        })
        .collect()
}

/// `ssh.proxyProtocol`: on when `trustedProxies` names at least one range.
fn proxy_rules(
    file: &str,
    p: &super::model::ProxyProtocolConfig,
) -> Result<Option<crate::front::proxy::ProxyRules>, ConfigError> {
    let trusted = cidr_list(file, "ssh.proxyProtocol.trustedProxies", &p.trusted_proxies)?;
    if trusted.is_empty() {
        return Ok(None);
    }
    if p.header_timeout.is_zero() || p.header_timeout.0 > Duration::from_secs(60) {
        return Err(invalid(
            file,
            "ssh.proxyProtocol.headerTimeout",
            "must be more than 0 and at most 60s",
        ));
    }
    Ok(Some(crate::front::proxy::ProxyRules {
        trusted,
        header_timeout: p.header_timeout.0,
    }))
}

/// `sandbox`: what can be checked without knowing who starts us (the rest is
/// `sandbox::enter`'s, at start-up).
fn sandbox(file: &str, s: SandboxConfig) -> Result<SandboxConfig, ConfigError> {
    if s.user == Some(0) {
        return Err(invalid(
            file,
            "sandbox.user",
            "0 is root: leave it unset and set sandbox.allowRoot: true to serve as root",
        ));
    }
    if s.group == Some(0) {
        return Err(invalid(file, "sandbox.group", "0 is root's group"));
    }
    if s.group.is_some() && s.user.is_none() {
        return Err(invalid(file, "sandbox.group", "needs sandbox.user"));
    }
    if s.supplementary_groups.len() > crate::limits::MAX_SUPPLEMENTARY_GROUPS {
        return Err(invalid(
            file,
            "sandbox.supplementaryGroups",
            format!("at most {} groups", crate::limits::MAX_SUPPLEMENTARY_GROUPS),
        ));
    }
    if s.allow_root && s.user.is_some() {
        return Err(invalid(
            file,
            "sandbox.allowRoot",
            "conflicts with sandbox.user (which drops root)",
        ));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::parse_yaml;
    use crate::config::model::SeccompMode;

    fn base() -> String {
        "auth:\n  publicKey:\n    method: authorizedKeys\n    authorizedKeys:\n      path: /k/%u\n"
            .into()
    }

    #[test]
    fn minimal_config_is_valid() {
        let cfg = parse_yaml("c", &base()).unwrap();
        let s = validate("c", cfg).unwrap();
        assert_eq!(s.listen.port(), 2222);
        assert_eq!(s.kex[0], "mlkem768x25519-sha256");
        assert_eq!(s.server_version, "SSH-2.0-ContainerSSH");
    }

    #[test]
    fn sandbox_block_is_checked_by_key() {
        let ok = base() + "sandbox:\n  user: 65532\n  supplementaryGroups: [998]\n  seccomp: log\n";
        let s = validate("c", parse_yaml("c", &ok).unwrap()).unwrap();
        assert_eq!(s.sandbox.user, Some(65532));
        assert_eq!(s.sandbox.group, None);
        assert_eq!(s.sandbox.seccomp, SeccompMode::Log);
        let default = validate("c", parse_yaml("c", &base()).unwrap()).unwrap();
        assert_eq!(default.sandbox.seccomp, SeccompMode::Enforce);
        assert!(!default.sandbox.allow_root && default.sandbox.user.is_none());
        for (block, key) in [
            ("  user: 0\n", "sandbox.user"),
            ("  user: 10\n  group: 0\n", "sandbox.group"),
            ("  group: 10\n", "sandbox.group"),
            ("  user: 10\n  allowRoot: true\n", "sandbox.allowRoot"),
            ("  user: -1\n", "sandbox.user"),
            ("  user: alice\n", "sandbox.user"),
            ("  seccomp: strict\n", "sandbox.seccomp"),
            ("  users: 10\n", "sandbox"),
        ] {
            let y = format!("{}sandbox:\n{block}", base());
            let err = parse_yaml("c", &y)
                .map_err(|e| e.to_string())
                .and_then(|c| validate("c", c).map_err(|e| e.to_string()))
                .unwrap_err();
            assert!(err.contains(key), "{block:?}: {err}");
        }
        let many: Vec<String> = (1..=40).map(|g| g.to_string()).collect();
        let y = format!(
            "{}sandbox:\n  supplementaryGroups: [{}]\n",
            base(),
            many.join(", ")
        );
        let err = validate("c", parse_yaml("c", &y).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("sandbox.supplementaryGroups"), "{err}");
    }

    #[test]
    fn no_auth_is_refused() {
        let err = validate("c", AppConfig::default()).unwrap_err().to_string();
        assert!(err.contains("auth"), "{err}");
    }

    #[test]
    fn weak_algorithms_are_refused_by_key() {
        let y = base() + "ssh:\n  kex: [diffie-hellman-group1-sha1]\n";
        let err = validate("c", parse_yaml("c", &y).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("ssh.kex") && err.contains("weak"), "{err}");
    }

    #[test]
    fn missing_image_is_refused() {
        let y = base() + "docker:\n  execution:\n    container:\n      env: [A=1]\n";
        let err = validate("c", parse_yaml("c", &y).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("docker.execution.container.image"), "{err}");
    }

    #[test]
    fn persistent_mode_needs_a_container_name() {
        let y = base() + "docker:\n  execution:\n    mode: persistent\n";
        let err = validate("c", parse_yaml("c", &y).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("docker.execution.containername"), "{err}");
        let y = base() + "docker:\n  execution:\n    mode: persistent\n    containername: lab\n";
        assert!(validate("c", parse_yaml("c", &y).unwrap()).is_ok());
        let y = base() + "docker:\n  execution:\n    createMissingContainer: true\n";
        let err = validate("c", parse_yaml("c", &y).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("createMissingContainer"), "{err}");
    }

    #[test]
    fn agent_path_must_be_absolute_and_plain() {
        for bad in ["agent", "/", "/usr/../agent", "/usr//agent", "/usr/./agent"] {
            assert!(!agent_path_ok(bad), "{bad}");
            let y = base() + &format!("docker:\n  execution:\n    agentPath: \"{bad}\"\n");
            let err = validate("c", parse_yaml("c", &y).unwrap())
                .unwrap_err()
                .to_string();
            assert!(err.contains("docker.execution.agentPath"), "{err}");
        }
        assert!(agent_path_ok("/usr/bin/containerssh-agent"));
        let y = base() + "docker:\n  execution:\n    disableAgent: true\n    agentPath: x\n";
        assert!(validate("c", parse_yaml("c", &y).unwrap()).is_ok());
    }

    #[test]
    fn forwarding_is_off_by_default_and_filter_is_refused() {
        let s = validate("c", parse_yaml("c", &base()).unwrap()).unwrap();
        assert!(!s.forwarding.any());
        let y = base() + "security:\n  forwarding:\n    forwardingMode: enable\n    x11ForwardingMode: disable\n";
        let s = validate("c", parse_yaml("c", &y).unwrap()).unwrap();
        assert!(s.forwarding.local_tcp && !s.forwarding.x11 && !s.forwarding.remote_tcp);
        let y = base() + "security:\n  forwarding:\n    socketListenMode: filter\n";
        let err = validate("c", parse_yaml("c", &y).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("security.forwarding.socketListenMode"),
            "{err}"
        );
    }

    #[test]
    fn webhook_blocks_are_checked_with_their_keys() {
        let hook = |block: &str| {
            format!("ssh:\n  hostkeys: [/k]\nauth:\n{block}docker:\n  execution:\n    container:\n      image: img\n")
        };
        let ok = hook("  password:\n    method: webhook\n    webhook:\n      url: http://127.0.0.1:8080\n      timeout: 1s\n      authTimeout: 5s\n  authz:\n    method: webhook\n    webhook:\n      url: http://127.0.0.1:8080\n");
        let s = validate("c", parse_yaml("c", &ok).unwrap()).unwrap();
        assert_eq!(s.password_webhook.as_ref().unwrap().timeout.0.as_secs(), 1);
        assert!(s.authz_webhook.is_some() && s.pubkey_webhook.is_none());
        for (block, key) in [
            ("  publicKey:\n    method: webhook\n", "auth.publicKey.webhook.url"),
            ("  password:\n    method: webhook\n    webhook:\n      url: ftp://x\n", "auth.password.webhook.url"),
            ("  password:\n    method: webhook\n    webhook:\n      url: https://x\n      cacert: /does/not/exist\n", "auth.password.webhook.cacert"),
            ("  password:\n    method: webhook\n    webhook:\n      url: http://x\n      curve: [x25519]\n      timeout: 0s\n", "auth.password.webhook"),
            ("  password:\n    method: passwordFile\n    passwordFile: {path: /p}\n  authz:\n    method: ldap\n", "auth.authz.method"),
        ] {
            let err = validate("c", parse_yaml("c", &hook(block)).unwrap())
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn security_policy_modes_lists_and_defaults() {
        let p = |sec: &str| {
            let y = base() + "security:\n" + sec;
            validate("c", parse_yaml("c", &y).unwrap()).map(|s| s.policy)
        };
        // Nothing set: everything enabled, no forced command, no session limit.
        let all = p("  maxSessions: -1\n").unwrap();
        assert!(all.shell && all.tty && all.signal.allows("TERM") && all.env.allows("X"));
        assert_eq!(all.max_sessions, None);
        // defaultMode fills what is left empty; each kind reads its own mode (ContainerSSH's
        // signal rule read the shell's).
        let q = p("  defaultMode: disable\n  shell:\n    mode: enable\n  signal:\n    mode: filter\n    allow: [INT]\n").unwrap();
        assert!(q.shell && !q.tty && !q.env.allows("X") && !q.command.allows("id"));
        assert!(q.signal.allows("INT") && !q.signal.allows("TERM"));
        let q =
            p("  signal:\n    deny: [KILL]\n  tty:\n    mode: filter\n  maxSessions: 3\n").unwrap();
        assert!(!q.signal.allows("KILL") && q.signal.allows("TERM") && !q.tty);
        assert_eq!(q.max_sessions, Some(3));
        assert_eq!(
            p("  forceCommand: /bin/true\n")
                .unwrap()
                .force_command
                .as_deref(),
            Some("/bin/true")
        );
        for (sec, key) in [
            ("  maxSessions: -2\n", "security.maxSessions"),
            ("  command:\n    deny: [id]\n", "security.command.deny"),
            ("  env:\n    mode: sometimes\n", "security.env"),
        ] {
            let y = base() + "security:\n" + sec;
            let err = match parse_yaml::<AppConfig>("c", &y) {
                Ok(cfg) => validate("c", cfg).unwrap_err().to_string(),
                Err(e) => e.to_string(),
            };
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn legacy_flat_auth_form_maps_to_the_webhooks() {
        let y = |auth: &str| {
            format!("auth:\n{auth}docker:\n  execution:\n    container:\n      image: img\n")
        };
        let s = validate(
            "c",
            parse_yaml("c", &y("  url: http://127.0.0.1:8080\n  password: true\n  pubkey: true\n  authTimeout: 5s\n")).unwrap(),
        )
        .unwrap();
        let p = s.password_webhook.unwrap();
        assert_eq!(p.url, "http://127.0.0.1:8080");
        assert_eq!(p.auth_timeout.0.as_secs(), 5);
        assert_eq!(s.pubkey_webhook.unwrap().url, "http://127.0.0.1:8080");
        assert_eq!(s.warnings.len(), 1);
        let s = validate(
            "c",
            parse_yaml(
                "c",
                &y("  url: http://h\n  password: true\n  pubkey: false\n"),
            )
            .unwrap(),
        )
        .unwrap();
        assert!(s.password_webhook.is_some() && s.pubkey_webhook.is_none());
        for (auth, key) in [
            ("  url: http://h\n", "auth.url"),
            ("  password: true\n", "auth.url"),
            ("  url: ftp://h\n  password: true\n", "auth.url"),
            ("  url: http://h\n  pubkey: true\n  publicKey:\n    method: authorizedKeys\n    authorizedKeys: {path: /k}\n", "auth.pubkey"),
        ] {
            let err = validate("c", parse_yaml("c", &y(auth)).unwrap())
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{auth}: {err}");
        }
        // The block form still reports unknown keys.
        let err = parse_yaml::<AppConfig>("c", &y("  password:\n    methd: webhook\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("methd"), "{err}");
    }

    #[test]
    fn server_version_rules() {
        assert!(server_version_ok("SSH-2.0-ContainerSSH"));
        assert!(server_version_ok("SSH-2.0-Foo_1.0 hello world"));
        assert!(!server_version_ok("SSH-2.0-russh-0.65"));
        assert!(!server_version_ok("SSH-1.99-Foo"));
        assert!(!server_version_ok("SSH-2.0-"));
        assert!(!server_version_ok("SSH-2.0-Foo bad\tcomment"));
    }

    #[test]
    fn session_mode_refuses_restart_policy() {
        let y = base()
            + "docker:\n  execution:\n    mode: session\n    host:\n      restartpolicy:\n        name: always\n";
        let err = validate("c", parse_yaml("c", &y).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("restartpolicy"), "{err}");
    }

    fn kube(extra: &str) -> Result<Settings, ConfigError> {
        let y = base() + "backend: kubernetes\nkubernetes:\n" + extra;
        validate("c", parse_yaml("c", &y)?)
    }

    #[test]
    fn kubernetes_defaults_validate() {
        let s = kube("  timeouts:\n    http: 5s\n").unwrap();
        assert_eq!(s.backend, BackendName::Kubernetes);
        let k = &s.kubernetes;
        assert_eq!(k.connection.host, "kubernetes.default.svc");
        assert_eq!(k.connection.path, "/api");
        assert_eq!((k.connection.qps, k.connection.burst), (5.0, 10));
        assert_eq!(k.pod.metadata["generateName"], "containerssh-");
        assert_eq!(k.pod.metadata["namespace"], "default");
        assert_eq!(
            k.pod.spec["containers"][0]["image"],
            "containerssh/containerssh-guest-image"
        );
        assert_eq!(k.timeouts.pod_start.0, Duration::from_secs(60));
        assert_eq!(k.timeouts.http.0, Duration::from_secs(5));
        assert_eq!(
            k.connection.in_cluster,
            crate::config::model::InClusterMode::Auto
        );
        // The docker block is not checked when the backend is kubernetes.
        let y =
            base() + "backend: kubernetes\ndocker:\n  execution:\n    container: {env: [A=1]}\n";
        assert!(validate("c", parse_yaml("c", &y).unwrap()).is_ok());
    }

    #[test]
    fn kubernetes_errors_name_the_key() {
        let cases = [
            ("  pod:\n    spec: {}\n", "kubernetes.pod.spec.containers"),
            (
                "  pod:\n    spec: {containers: [{name: a}]}\n",
                "kubernetes.pod.spec.containers[0].image",
            ),
            (
                "  pod:\n    spec: {containers: [{image: a}]}\n",
                "kubernetes.pod.spec.containers[0].name",
            ),
            (
                "  pod:\n    consoleContainerNumber: 1\n",
                "kubernetes.pod.consoleContainerNumber",
            ),
            (
                "  pod:\n    mode: session\n    spec: {restartPolicy: Always, containers: [{name: a, image: b}]}\n",
                "kubernetes.pod.spec.restartPolicy",
            ),
            ("  pod:\n    mode: persistent\n", "kubernetes.pod.metadata.name"),
            ("  pod:\n    createMissingPods: true\n", "kubernetes.pod.createMissingPods"),
            (
                "  pod:\n    spec: {containers: [{name: a, image: b}], hostnetwork: true}\n",
                "kubernetes.pod.spec.hostnetwork",
            ),
            (
                "  pod:\n    spec: {containers: [{name: a, image: b, Image: c}]}\n",
                "kubernetes.pod.spec.containers[0].Image",
            ),
            ("  pod:\n    metadata: {nam: x}\n", "kubernetes.pod.metadata.nam"),
            (
                "  connection:\n    cert: x\n    certFile: y\n",
                "kubernetes.connection.cert",
            ),
            ("  connection:\n    host: http://h\n", "kubernetes.connection.host"),
            ("  connection:\n    path: /apis\n", "kubernetes.connection.path"),
            (
                "  connection:\n    host: h\n    kubeconfig: /k\n",
                "kubernetes.connection.kubeconfig",
            ),
            ("  timeouts:\n    podStart: 0s\n", "kubernetes.timeouts.podStart"),
        ];
        for (extra, key) in cases {
            let err = kube(extra).unwrap_err().to_string();
            assert!(err.contains(&format!("{key}:")), "{extra}: {err}");
        }
        // Unknown keys in the block itself are parse errors naming the path.
        let err = kube("  pod:\n    agentInitImag: x\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("kubernetes.pod") && err.contains("agentInitImag"),
            "{err}"
        );
        let err = kube("  connection:\n    inCluster: maybe\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("kubernetes.connection.inCluster"), "{err}");
    }

    #[test]
    fn kubernetes_full_block_parses_and_round_trips() {
        let block = "  connection:\n    host: https://k.example:6443\n    cacert: \"-----BEGIN CERTIFICATE-----\\nx\\n-----END CERTIFICATE-----\\n\"\n    bearerTokenFile: /t\n    qps: 20\n    burst: 40\n    inCluster: false\n  pod:\n    metadata: {name: lab, namespace: ns}\n    spec:\n      containers:\n      - {name: shell, image: img}\n      - {name: side, image: img2}\n    consoleContainerNumber: 1\n    mode: persistent\n    createMissingPods: true\n    exposeAuthMetadataAsEnv: {GITHUB_LOGIN: GH_USER}\n    exposeAuthMetadataAsLabels: {a: b}\n    exposeAuthMetadataAsAnnotations: {c: d}\n    agentInitImage: registry/agent:1\n  timeouts: {podStart: 2m, podStop: 10s, commandStart: 1s, signal: 1s, window: 1s, http: 3s}\n";
        let s = kube(block).unwrap();
        assert_eq!(s.kubernetes.pod.console_container_number, 1);
        assert_eq!(s.kubernetes.connection.qps, 20.0);
        let y = base() + "backend: kubernetes\nkubernetes:\n" + block;
        let cfg: AppConfig = parse_yaml("c", &y).unwrap();
        let dumped = serde_yaml::to_string(&cfg).unwrap();
        assert!(dumped.contains("backend: kubernetes"), "{dumped}");
        let again: AppConfig = parse_yaml("d", &dumped).unwrap();
        assert_eq!(serde_yaml::to_string(&again).unwrap(), dumped);
        assert!(validate("d", again).is_ok());
        // The defaults dump and reload too (inCluster: auto as a string).
        let dumped = serde_yaml::to_string(&AppConfig::default()).unwrap();
        assert!(dumped.contains("inCluster: auto"), "{dumped}");
        let again: AppConfig = parse_yaml("d", &dumped).unwrap();
        assert_eq!(serde_yaml::to_string(&again).unwrap(), dumped);
    }
}
