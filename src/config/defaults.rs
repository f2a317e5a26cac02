//! Default values, each a named function with the reason it is what it is.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::duration::GoDuration;

/// ContainerSSH's default; the embedded default (no config file) overrides it with loopback.
pub fn listen() -> String {
    "0.0.0.0:2222".into()
}

/// ContainerSSH's banner; carries no library or version information.
pub fn server_version() -> String {
    "SSH-2.0-ContainerSSH".into()
}

/// OpenSSH's ClientAliveCountMax.
pub fn client_alive_count_max() -> u32 {
    3
}

/// OpenSSH's LoginGraceTime is 120 s; a container server has no slow interactive PAM step,
/// so a minute is plenty and halves how long a silent client can hold a pre-auth slot.
pub fn login_grace_time() -> GoDuration {
    GoDuration(Duration::from_secs(60))
}

/// The engine's standard socket.
pub fn docker_host() -> String {
    "unix:///var/run/docker.sock".into()
}

/// ContainerSSH's guest image: public, has bash and sftp-server.
pub const DEFAULT_IMAGE: &str = "containerssh/containerssh-guest-image";

pub fn docker_container() -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("image".into(), json!(DEFAULT_IMAGE));
    m
}

/// ContainerSSH's idle process, present in its guest image.
pub fn idle_command() -> Vec<String> {
    [
        "/usr/bin/containerssh-agent",
        "wait-signal",
        "--signal",
        "INT",
        "--signal",
        "TERM",
    ]
    .map(String::from)
    .to_vec()
}

/// ContainerSSH's agent location, which its default `idleCommand` names.
pub fn agent_path() -> String {
    "/usr/bin/containerssh-agent".into()
}

/// ContainerSSH's default shell.
pub fn shell_command() -> Vec<String> {
    vec!["/bin/bash".into()]
}

/// Debian's and ContainerSSH's location of OpenSSH's SFTP server.
pub fn subsystems() -> BTreeMap<String, String> {
    BTreeMap::from([("sftp".into(), "/usr/lib/openssh/sftp-server".into())])
}

/// ContainerSSH's `kubernetes.connection.host`: the API server's in-cluster DNS name.
pub fn kubernetes_host() -> String {
    "kubernetes.default.svc".into()
}

/// ContainerSSH's `kubernetes.connection.path`: client-go's core API path.
pub fn kubernetes_path() -> String {
    "/api".into()
}

/// client-go's default client-side rate limit, which ContainerSSH keeps.
pub fn kubernetes_qps() -> f32 {
    5.0
}

pub fn kubernetes_burst() -> u32 {
    10
}

/// ContainerSSH's `kubernetes.pod.metadata` default.
pub fn kubernetes_metadata() -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("namespace".into(), json!("default"));
    m.insert("generateName".into(), json!("containerssh-"));
    m
}

/// ContainerSSH's `kubernetes.pod.spec` default: one container, the guest image.
pub fn kubernetes_spec() -> Map<String, Value> {
    let mut m = Map::new();
    m.insert(
        "containers".into(),
        json!([{"name": "shell", "image": DEFAULT_IMAGE}]),
    );
    m
}
