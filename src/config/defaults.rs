//! Default values, each a named function with the reason it is what it is.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Map, Value};

use super::duration::GoDuration;
use super::model::{PenaltiesConfig, PerSourceLimit, StartupsSpec};
use super::size::ByteSize;

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

/// Version exchange plus key exchange take a few round trips and milliseconds of CPU; ten
/// seconds covers a slow link, and a socket that never speaks gives its place back long
/// before the login grace time (the issue that made one source able to hold every slot).
pub fn handshake_timeout() -> GoDuration {
    GoDuration(Duration::from_secs(10))
}

/// Eight channels at the full window (2 MiB, OpenSSH's): a connection with more busy channels
/// than that shares this, and what one connection can pin stays a small part of the total.
pub fn buffers_per_connection() -> ByteSize {
    ByteSize(16 * 1024 * 1024)
}

/// What all connections together may make the server hold for data not yet read: well within
/// a small pod's memory, and sixteen connections' full budgets. Channels start with 64 KiB, so
/// it takes 4,096 connections with a session each to reserve it without sending anything.
pub fn buffers_total() -> ByteSize {
    ByteSize(256 * 1024 * 1024)
}

/// A minute between the warning, the signal and the close: time to save one's work.
pub fn timeout_grace() -> GoDuration {
    GoDuration(Duration::from_secs(60))
}

/// What a terminal's hang-up sends: shells save their history and exit; editors save.
pub fn timeout_signal() -> String {
    "HUP".into()
}

/// OpenSSH's MaxAuthTries (and ContainerSSH's hard-coded value).
pub fn max_auth_tries() -> u32 {
    6
}

/// OpenSSH's MaxStartups default: random early refusal from 10 unauthenticated connections
/// at 30 %, rising to every connection at 100.
pub fn max_startups() -> StartupsSpec {
    StartupsSpec("10:30:100".into())
}

/// OpenSSH has no per-source default (`none`); ten means one address can never hold more than
/// a tenth of `full`, so it cannot shut out the others.
pub fn per_source_max_startups() -> PerSourceLimit {
    PerSourceLimit(Some(10))
}

/// OpenSSH's PerSourceNetBlockSize default: each IPv4 address and each IPv6 address on its own.
pub fn per_source_net_block_size() -> StartupsSpec {
    StartupsSpec("32:128".into())
}

/// OpenSSH 9.9's PerSourcePenalties defaults (on): crash 90s, authfail 5s, noauth 1s,
/// grace-exceeded 10s, refuseconnection 10s; enforced above 15s, accumulated up to 10m.
pub fn penalties() -> PenaltiesConfig {
    let s = |n| GoDuration(Duration::from_secs(n));
    PenaltiesConfig {
        enabled: true,
        crash: s(90),
        authfail: s(5),
        noauth: s(1),
        grace_exceeded: s(10),
        refuse_connection: s(10),
        min: s(15),
        max: s(600),
    }
}

/// A load balancer sends its PROXY header at once; two seconds is generous and bounds how long
/// a trusted peer's silent socket is held (sshpiper waits 200 ms).
pub fn proxy_header_timeout() -> GoDuration {
    GoDuration(Duration::from_secs(2))
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
