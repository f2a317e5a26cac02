//! The `docker` block checked into what the Docker backend runs on. Every error names its key
//! path. Checked at start-up whichever backend is selected (a config webhook may switch a login
//! to this one), and again for a login whose configuration changes the block.

use serde_json::{Map, Value};

use super::transport::Transport;
use super::{DockerConnection, DockerError};
use crate::config::model::{DockerConfig, DockerExecutionConfig, DockerTimeouts, ExecutionMode};
use crate::config::KeyError;
use crate::http::tls::TlsPart;

/// `docker`, checked.
#[derive(Clone, Debug)]
pub struct DockerSettings {
    /// `docker.connection`: the engine's address (parsed) and TLS material (usable).
    pub connection: DockerConnection,
    /// `docker.execution`; its `container`, `host` and `network` maps go to the engine as they
    /// are (ContainerSSH's pass-through), with our labels and settings added.
    pub execution: DockerExecutionConfig,
    /// `docker.execution.container.image`.
    pub image: String,
    /// `docker.execution.platform` as the engine's `platform` query (`linux/arm64/v8`).
    pub platform: Option<String>,
    pub timeouts: DockerTimeouts,
}

/// A key of a Docker JSON map, matched as the engine does (case-insensitively).
pub(super) fn get_ci<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v)
}

fn bad(key: &str, message: impl Into<String>) -> KeyError {
    KeyError::new(format!("docker.{key}"), message)
}

/// A string field of a Docker map, if present: `None` when missing, null or empty.
fn string<'a>(
    map: &'a Map<String, Value>,
    block: &str,
    field: &str,
) -> Result<Option<&'a str>, KeyError> {
    match get_ci(map, field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok((!s.is_empty()).then_some(s.as_str())),
        Some(_) => Err(bad(&format!("{block}.{field}"), "must be a string")),
    }
}

impl DockerSettings {
    pub fn check(cfg: &DockerConfig) -> Result<Self, KeyError> {
        let exec = &cfg.execution;
        let image = string(&exec.container, "execution.container", "image")?
            .ok_or_else(|| bad("execution.container.image", "required"))?
            .to_string();
        let platform = platform(&exec.platform)?;
        check_execution(exec)?;
        let connection = connection(cfg)?;
        let t = &cfg.timeouts;
        KeyError::positive_durations(
            "docker.timeouts",
            &[
                ("containerStart", t.container_start),
                ("containerStop", t.container_stop),
                ("commandStart", t.command_start),
                ("signal", t.signal),
                ("window", t.window),
                ("http", t.http),
            ],
        )?;
        Ok(Self {
            connection,
            execution: exec.clone(),
            image,
            platform,
            timeouts: cfg.timeouts.clone(),
        })
    }
}

/// `os/architecture[/variant]`, when an architecture is given.
fn platform(map: &Map<String, Value>) -> Result<Option<String>, KeyError> {
    let field = |k: &str| string(map, "execution.platform", k);
    let os = field("os")?.unwrap_or("linux");
    let Some(arch) = field("architecture")? else {
        return Ok(None);
    };
    Ok(Some(match field("variant")? {
        Some(v) => format!("{os}/{arch}/{v}"),
        None => format!("{os}/{arch}"),
    }))
}

fn check_execution(exec: &DockerExecutionConfig) -> Result<(), KeyError> {
    if exec.shell_command.is_empty() {
        return Err(bad("execution.shellCommand", "must not be empty"));
    }
    if exec.mode == ExecutionMode::Persistent && exec.container_name.is_empty() {
        return Err(bad(
            "execution.containername",
            "persistent mode needs the name of the container to exec into",
        ));
    }
    if exec.mode != ExecutionMode::Persistent && exec.create_missing_container {
        return Err(bad(
            "execution.createMissingContainer",
            "only meaningful in persistent mode",
        ));
    }
    crate::backend::pool::check_config(&exec.pool, exec.mode, !exec.container_name.is_empty())
        .map_err(|(key, message)| bad(&format!("execution.pool.{key}"), message))?;
    if exec.mode != ExecutionMode::Session && exec.idle_command.is_empty() {
        return Err(bad(
            "execution.idleCommand",
            "connection and persistent modes need an idle command",
        ));
    }
    if !exec.disable_agent && !crate::auth::metadata::container_path_ok(&exec.agent_path) {
        return Err(bad(
            "execution.agentPath",
            "must be an absolute path to a file, without `.` or `..` components",
        ));
    }
    if exec.mode == ExecutionMode::Session {
        let restart = get_ci(&exec.host, "restartpolicy")
            .and_then(Value::as_object)
            .and_then(|o| get_ci(o, "name"))
            .and_then(Value::as_str)
            .unwrap_or("");
        if !(restart.is_empty() || restart == "no") {
            return Err(bad(
                "execution.host.restartpolicy",
                "session mode cannot use a restart policy",
            ));
        }
    }
    Ok(())
}

/// The engine's address and TLS material, usable (no connection is made).
fn connection(cfg: &DockerConfig) -> Result<DockerConnection, KeyError> {
    let c = &cfg.connection;
    let opt = |s: &String| (!s.is_empty()).then(|| s.clone());
    let conn = DockerConnection {
        host: c.host.clone(),
        cacert: opt(&c.cacert),
        cert: opt(&c.cert),
        key: opt(&c.key),
    };
    match Transport::parse(&conn) {
        Ok(_) => Ok(conn),
        Err(DockerError::TlsConfig(e)) => {
            let key = match e.part {
                TlsPart::Ca => "cacert",
                TlsPart::Cert | TlsPart::Versions => "cert",
                TlsPart::Key => "key",
            };
            Err(bad(&format!("connection.{key}"), e.reason))
        }
        Err(DockerError::InvalidHost { reason, .. }) => Err(bad("connection.host", reason)),
        Err(e) => Err(bad("connection", e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::parse_yaml;

    fn check(yaml: &str) -> Result<DockerSettings, KeyError> {
        DockerSettings::check(&parse_yaml::<DockerConfig>("c", yaml).unwrap())
    }

    fn key_of(yaml: &str) -> String {
        check(yaml).unwrap_err().key
    }

    #[test]
    fn defaults_check() {
        let s = check("").unwrap();
        assert_eq!(s.image, "containerssh/containerssh-guest-image");
        assert_eq!(s.platform, None);
    }

    #[test]
    fn errors_name_the_key() {
        assert_eq!(
            key_of("execution:\n  container:\n    env: [A=1]\n"),
            "docker.execution.container.image"
        );
        assert_eq!(
            key_of("execution:\n  container:\n    image: 7\n"),
            "docker.execution.container.image"
        );
        assert_eq!(
            key_of("execution:\n  mode: persistent\n"),
            "docker.execution.containername"
        );
        assert!(check("execution:\n  mode: persistent\n  containername: lab\n").is_ok());
        assert_eq!(
            key_of("execution:\n  createMissingContainer: true\n"),
            "docker.execution.createMissingContainer"
        );
        assert_eq!(
            key_of(
                "execution:\n  mode: session\n  host:\n    restartpolicy:\n      name: always\n"
            ),
            "docker.execution.host.restartpolicy"
        );
        assert_eq!(
            key_of("connection:\n  host: http://x\n"),
            "docker.connection.host"
        );
        assert_eq!(
            key_of("connection:\n  host: tcp://h:2376\n  cacert: x\n  cert: y\n  key: z\n"),
            "docker.connection.cacert"
        );
        assert_eq!(
            key_of("timeouts:\n  signal: 0s\n"),
            "docker.timeouts.signal"
        );
        assert_eq!(
            key_of("execution:\n  platform: {architecture: 5}\n"),
            "docker.execution.platform.architecture"
        );
    }

    #[test]
    fn agent_path_must_be_absolute_and_plain() {
        for bad in ["agent", "/", "/usr/../agent", "/usr//agent", "/usr/./agent"] {
            let y = format!("execution:\n  agentPath: \"{bad}\"\n");
            assert_eq!(key_of(&y), "docker.execution.agentPath", "{bad}");
        }
        assert!(check("execution:\n  agentPath: /usr/bin/containerssh-agent\n").is_ok());
        assert!(check("execution:\n  disableAgent: true\n  agentPath: x\n").is_ok());
    }

    #[test]
    fn a_pool_serves_connection_mode_only_within_its_limits() {
        let ok = check("execution:\n  pool:\n    size: 3\n    maxAge: 5m\n").unwrap();
        assert_eq!(ok.execution.pool.size, 3);
        for (y, key) in [
            (
                "execution:\n  mode: session\n  pool:\n    size: 1\n",
                "docker.execution.pool.size",
            ),
            (
                "execution:\n  containername: x\n  pool:\n    size: 1\n",
                "docker.execution.pool.size",
            ),
            (
                "execution:\n  pool:\n    size: 1001\n",
                "docker.execution.pool.size",
            ),
            (
                "execution:\n  pool:\n    size: 1\n    maxAge: 0s\n",
                "docker.execution.pool.maxAge",
            ),
        ] {
            assert_eq!(key_of(y), key, "{y}");
        }
    }

    #[test]
    fn platform_becomes_the_query_form() {
        assert_eq!(check("").unwrap().platform, None);
        let s = check("execution:\n  platform: {Architecture: arm64, variant: v8}\n").unwrap();
        assert_eq!(s.platform.as_deref(), Some("linux/arm64/v8"));
    }
}
