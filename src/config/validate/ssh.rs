//! `ssh`: the listener, the protocol's algorithms and timers, the front door's rules and the
//! byte budgets.

use std::net::SocketAddr;
use std::time::Duration;

use super::invalid;
use crate::config::model::SshConfig;
use crate::config::ConfigError;

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

/// `ssh`, checked.
#[derive(Clone, Debug)]
pub struct Ssh {
    pub listen: SocketAddr,
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
}

pub(super) fn check(
    file: &str,
    s: &SshConfig,
    warnings: &mut Vec<String>,
) -> Result<Ssh, ConfigError> {
    let listen: SocketAddr = s.listen.parse().map_err(|_| {
        invalid(
            file,
            "ssh.listen",
            format!("{:?} is not an IP:port address", s.listen),
        )
    })?;
    if !server_version_ok(&s.server_version) {
        return Err(invalid(
            file,
            "ssh.serverVersion",
            "must look like SSH-2.0-Name (optionally followed by a space and a comment)",
        ));
    }
    let client_alive = if s.client_alive_interval.is_zero() {
        None
    } else {
        if s.client_alive_interval.0 < Duration::from_secs(1) {
            return Err(invalid(file, "ssh.clientAliveInterval", "minimum is 1s"));
        }
        Some((
            s.client_alive_interval.0,
            usize::try_from(s.client_alive_count_max.max(1)).unwrap_or(3),
        ))
    };
    if s.login_grace_time.is_zero() {
        return Err(invalid(file, "ssh.loginGraceTime", "must be more than 0"));
    }
    if s.handshake_timeout.is_zero() {
        return Err(invalid(file, "ssh.handshakeTimeout", "must be more than 0"));
    }
    // Both count from the accept, so a handshake never gets longer than the whole login.
    let handshake_timeout = s.handshake_timeout.0.min(s.login_grace_time.0);
    let max_auth_tries = s.max_auth_tries;
    if !(1..=crate::limits::MAX_AUTH_TRIES_LIMIT).contains(&max_auth_tries) {
        return Err(invalid(
            file,
            "ssh.maxAuthTries",
            format!("must be 1 to {}", crate::limits::MAX_AUTH_TRIES_LIMIT),
        ));
    }
    let door = door_rules(file, s)?;
    let proxy = proxy_rules(file, &s.proxy_protocol)?;
    let buffers = buffers(file, &s.buffers)?;

    let kex = pick(
        file,
        "ssh.kex",
        &s.kex.0,
        [DEFAULT_KEX, OTHER_KEX, WEAK_KEX],
        warnings,
    )?;
    let ciphers = pick(
        file,
        "ssh.ciphers",
        &s.ciphers.0,
        [DEFAULT_CIPHERS, OTHER_CIPHERS, &[]],
        warnings,
    )?;
    let macs = pick(
        file,
        "ssh.macs",
        &s.macs.0,
        [DEFAULT_MACS, &[], WEAK_MACS],
        warnings,
    )?;
    Ok(Ssh {
        listen,
        server_version: s.server_version.clone(),
        banner: (!s.banner.is_empty()).then(|| s.banner.clone()),
        client_alive,
        kex,
        ciphers,
        macs,
        login_grace_time: s.login_grace_time.0,
        handshake_timeout,
        max_auth_tries,
        door,
        proxy,
        buffers,
    })
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
                crate::config::size::ByteSize(CHANNEL_WINDOW_MAX as u64)
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
pub(super) fn server_version_ok(v: &str) -> bool {
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

/// `ssh.maxStartups`, `ssh.perSourceMaxStartups`, `ssh.perSourceNetBlockSize`,
/// `ssh.perSourcePenalties`, `ssh.perSourcePenaltyExemptList`.
fn door_rules(
    file: &str,
    ssh: &crate::config::model::SshConfig,
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
    p: &crate::config::model::ProxyProtocolConfig,
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
