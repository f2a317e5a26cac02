//! Raw config → checked settings. Every error names the key path it is about.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::model::{
    AgentConfig, AppConfig, DockerConfig, ExecutionMode, ForwardingConfig, LogConfig, SecurityMode,
};
use super::ConfigError;

/// Key exchange methods we offer, strongest first: the post-quantum hybrid leads.
pub const MODERN_KEX: &[&str] = &[
    "mlkem768x25519-sha256",
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp521",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp256",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
    "diffie-hellman-group14-sha256",
];
/// AEAD first; CTR modes stay for clients that insist (they are paired with an ETM MAC).
pub const MODERN_CIPHERS: &[&str] = &[
    "chacha20-poly1305@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-gcm@openssh.com",
    "aes256-ctr",
    "aes192-ctr",
    "aes128-ctr",
];
pub const MODERN_MACS: &[&str] = &[
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "hmac-sha2-256",
    "hmac-sha2-512",
];
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
    pub authorized_keys: Option<String>,
    pub password_file: Option<PathBuf>,
    pub docker: DockerConfig,
    pub log: LogConfig,
    pub agent: AgentConfig,
    pub forwarding: Forwarding,
    /// `auth.metadata`: environment and files every login gets.
    pub metadata: crate::auth::metadata::MetadataTemplate,
    pub instance_id: String,
    pub state_directory: PathBuf,
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

fn invalid(file: &str, key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        file: file.into(),
        key: key.into(),
        message: message.into(),
    }
}

fn pick(
    file: &str,
    key: &str,
    wanted: &[String],
    allowed: &'static [&'static str],
) -> Result<Vec<&'static str>, ConfigError> {
    if wanted.is_empty() {
        return Ok(allowed.to_vec());
    }
    let mut out = Vec::new();
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
        }
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
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    !rest.is_empty()
        && !path.contains('\0')
        && rest
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

pub fn validate(file: &str, cfg: AppConfig) -> Result<Settings, ConfigError> {
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
        "webhook" => {
            return Err(invalid(
                file,
                "auth.publicKey.method",
                "webhook authentication is not available in this version",
            ))
        }
        other => {
            return Err(invalid(
                file,
                "auth.publicKey.method",
                format!("unknown method {other:?}; expected authorizedKeys"),
            ))
        }
    };
    let password_file = match cfg.auth.password.method.as_str() {
        "" => None,
        "passwordFile" => {
            let p = &cfg.auth.password.password_file.path;
            if p.is_empty() {
                return Err(invalid(file, "auth.password.passwordFile.path", "required"));
            }
            Some(PathBuf::from(p))
        }
        "webhook" | "kerberos" => {
            return Err(invalid(
                file,
                "auth.password.method",
                format!(
                    "{} authentication is not available in this version",
                    cfg.auth.password.method
                ),
            ))
        }
        other => {
            return Err(invalid(
                file,
                "auth.password.method",
                format!("unknown method {other:?}; expected passwordFile"),
            ))
        }
    };
    if authorized_keys.is_none() && password_file.is_none() {
        return Err(invalid(
            file,
            "auth",
            "no authentication method configured: set auth.publicKey.method or auth.password.method",
        ));
    }

    let exec = &cfg.docker.execution;
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
    let host = &cfg.docker.connection.host;
    if !(host.starts_with("unix://") || host.starts_with("tcp://")) {
        return Err(invalid(
            file,
            "docker.connection.host",
            "must start with unix:// or tcp://",
        ));
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
        kex: pick(file, "ssh.kex", &cfg.ssh.kex.0, MODERN_KEX)?,
        ciphers: pick(file, "ssh.ciphers", &cfg.ssh.ciphers.0, MODERN_CIPHERS)?,
        macs: pick(file, "ssh.macs", &cfg.ssh.macs.0, MODERN_MACS)?,
        login_grace_time: cfg.ssh.login_grace_time.0,
        authorized_keys,
        password_file,
        docker: cfg.docker,
        log: cfg.log,
        agent: cfg.agent,
        forwarding: forwarding(file, &cfg.security.forwarding)?,
        metadata: crate::auth::metadata::MetadataTemplate::from_config(&cfg.auth.metadata)
            .map_err(|e| invalid(file, &format!("auth.metadata.{}", e.key), e.message))?,
        instance_id,
        state_directory,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::parse_yaml;

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
}
