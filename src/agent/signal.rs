//! Signal names, the `signal` command, and `wait-signal` (the idle PID 1 that reaps zombies).
//!
//! Signal handlers come from `signal-hook` (a self-pipe behind a safe iterator), so this crate
//! stays free of `unsafe`; rustix has `kill` and `waitpid` but no `sigaction` wrapper. Handlers
//! installed this way are reset to the default by `execve`, so a program the agent starts never
//! inherits them (an ignored signal, by contrast, would be inherited).

use rustix::process::{kill_process, wait, Pid, Signal, WaitOptions, WaitStatus};
use signal_hook::iterator::Signals;

use super::AgentError;

/// A signal the agent knows by name. `rfc4254` marks the names SSH's `signal` and
/// `exit-signal` messages carry without an `@domain` suffix (RFC 4254 §6.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalName {
    /// The name without the `SIG` prefix, as SSH spells it.
    pub name: &'static str,
    /// The signal.
    pub signal: Signal,
    /// Whether RFC 4254 defines this name.
    pub rfc4254: bool,
}

const fn sig(name: &'static str, signal: Signal, rfc4254: bool) -> SignalName {
    SignalName {
        name,
        signal,
        rfc4254,
    }
}

/// Every signal accepted by name (`signal`, `wait-signal`) and reported by name (`exit-info`).
pub const SIGNALS: &[SignalName] = &[
    sig("ABRT", Signal::ABORT, true),
    sig("ALRM", Signal::ALARM, true),
    sig("FPE", Signal::FPE, true),
    sig("HUP", Signal::HUP, true),
    sig("ILL", Signal::ILL, true),
    sig("INT", Signal::INT, true),
    sig("KILL", Signal::KILL, true),
    sig("PIPE", Signal::PIPE, true),
    sig("QUIT", Signal::QUIT, true),
    sig("SEGV", Signal::SEGV, true),
    sig("TERM", Signal::TERM, true),
    sig("USR1", Signal::USR1, true),
    sig("USR2", Signal::USR2, true),
    sig("BUS", Signal::BUS, false),
    sig("CHLD", Signal::CHILD, false),
    sig("CONT", Signal::CONT, false),
    sig("IO", Signal::IO, false),
    sig("PROF", Signal::PROF, false),
    sig("PWR", Signal::POWER, false),
    sig("STKFLT", Signal::STKFLT, false),
    sig("STOP", Signal::STOP, false),
    sig("SYS", Signal::SYS, false),
    sig("TRAP", Signal::TRAP, false),
    sig("TSTP", Signal::TSTP, false),
    sig("TTIN", Signal::TTIN, false),
    sig("TTOU", Signal::TTOU, false),
    sig("URG", Signal::URG, false),
    sig("VTALRM", Signal::VTALARM, false),
    sig("WINCH", Signal::WINCH, false),
    sig("XCPU", Signal::XCPU, false),
    sig("XFSZ", Signal::XFSZ, false),
];

/// Looks a signal up by name; `TERM` and `SIGTERM` both work, case matters.
pub fn by_name(name: &str) -> Option<SignalName> {
    let bare = name.strip_prefix("SIG").unwrap_or(name);
    SIGNALS.iter().copied().find(|s| s.name == bare)
}

/// The number of a signal SSH names without an `@domain` suffix (RFC 4254 §6.10): `TERM` → 15;
/// `None` for any other name (`SIGTERM`, `WINCH`).
pub fn ssh_signal_number(name: &str) -> Option<i32> {
    SIGNALS
        .iter()
        .find(|s| s.rfc4254 && s.name == name)
        .map(|s| s.signal.as_raw())
}

/// The name of signal number `n`, or `SIG<n>` for one without a name (real-time signals).
pub fn name_of(n: i32) -> String {
    SIGNALS
        .iter()
        .find(|s| s.signal.as_raw() == n)
        .map_or_else(|| format!("SIG{n}"), |s| s.name.to_string())
}

/// `signal --pid N --signal NAME`.
pub fn send(pid: i32, signal: SignalName) -> Result<(), AgentError> {
    let target = Pid::from_raw(pid).ok_or(AgentError::BadPid(pid))?;
    kill_process(target, signal.signal).map_err(|e| AgentError::Kill {
        pid,
        signal: signal.name,
        source: e.into(),
    })
}

/// Installs handlers for `signals` plus `SIGCHLD` (whose arrival means "try to reap").
pub fn listen(signals: &[Signal]) -> Result<Signals, AgentError> {
    let mut raw: Vec<i32> = signals.iter().map(|s| s.as_raw()).collect();
    raw.push(Signal::CHILD.as_raw());
    Signals::new(raw).map_err(AgentError::SignalHandlers)
}

/// Reaps every child that has exited, without blocking; returns them.
pub fn reap_exited() -> Vec<(i32, WaitStatus)> {
    let mut reaped = Vec::new();
    // `wait` is wait4(-1): any child. (rustix's `waitpid(None, ..)` is wait4(0), which only
    // sees children in our process group, and orphans are in theirs.) ECHILD (no children at
    // all) ends the loop like "none exited yet" does.
    while let Ok(Some((pid, status))) = wait(WaitOptions::NOHANG) {
        reaped.push((pid.as_raw_nonzero().get(), status));
    }
    reaped
}

/// `wait-signal`: blocks until one of `wanted` arrives, reaping any child that exits meanwhile
/// (as PID 1 of a container, orphans are re-parented to us).
pub fn wait_signal(wanted: &[SignalName]) -> Result<(), AgentError> {
    let wanted: Vec<Signal> = wanted.iter().map(|s| s.signal).collect();
    let mut signals = listen(&wanted)?;
    // Children that exited before the handler existed sent their SIGCHLD to nobody.
    reap_exited();
    for raw in signals.forever() {
        if wanted.iter().any(|s| s.as_raw() == raw) {
            return Ok(());
        }
        if raw == Signal::CHILD.as_raw() {
            reap_exited();
        }
    }
    Err(AgentError::SignalIteratorClosed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in SIGNALS {
            assert_eq!(by_name(s.name), Some(*s));
            assert_eq!(by_name(&format!("SIG{}", s.name)), Some(*s));
            assert_eq!(name_of(s.signal.as_raw()), s.name);
        }
        assert_eq!(by_name("term"), None);
        assert_eq!(by_name(""), None);
        assert_eq!(name_of(40), "SIG40");
    }

    #[test]
    fn rfc_names_are_the_thirteen_of_rfc4254() {
        let rfc: Vec<_> = SIGNALS
            .iter()
            .filter(|s| s.rfc4254)
            .map(|s| s.name)
            .collect();
        assert_eq!(rfc.len(), 13);
    }
}
