//! `security`: which requests clients may make, which kinds of forwarding, and the session
//! timeouts.

use std::time::Duration;

use super::invalid;
use crate::config::model::{ForwardingConfig, SecurityMode};
use crate::config::ConfigError;

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
            grace: crate::config::defaults::timeout_grace().0,
            signal: crate::config::defaults::timeout_signal(),
        }
    }
}

pub(super) fn timeouts(
    file: &str,
    t: &crate::config::model::TimeoutsConfig,
) -> Result<Timeouts, ConfigError> {
    let off_or = |d: crate::config::duration::GoDuration| (!d.is_zero()).then_some(d.0);
    let signal = t
        .signal
        .trim()
        .trim_start_matches("SIG")
        .to_ascii_uppercase();
    if crate::agent::signal::ssh_signal_number(&signal).is_none() {
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

pub(super) fn policy(
    file: &str,
    s: &crate::config::model::SecurityConfig,
) -> Result<Policy, ConfigError> {
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

pub(super) fn forwarding(file: &str, f: &ForwardingConfig) -> Result<Forwarding, ConfigError> {
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
