//! Container backends. A backend turns "run this program for this user" into a process with
//! stdin, output and control (resize, signal, exit status) inside a container it owns, and
//! guarantees that what it created is removed.

pub mod agent;
mod dispatch;
pub mod docker;
pub mod kubernetes;
pub mod process;

use std::fmt;

pub use dispatch::{AgentStreams, Backend, Target};

/// Who a container is for; written into labels so cleanup can find it again.
#[derive(Clone, Debug)]
pub struct ConnMeta {
    /// 32 lowercase hex characters, as ContainerSSH's connection IDs.
    pub connection_id: String,
    pub username: String,
    pub remote_ip: String,
}

/// Terminal requested with `pty-req`, updated by `window-change`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Terminal {
    pub term: String,
    pub cols: u32,
    pub rows: u32,
}

impl Terminal {
    /// `(rows, cols)` to give the engine; `None` for a size the client does not know (`ssh -tt`
    /// without a terminal sends 0×0), which stays 0×0 as under sshd.
    pub fn size(&self) -> Option<(u32, u32)> {
        (self.rows > 0 && self.cols > 0).then_some((self.rows, self.cols))
    }
}

/// What a session channel asked to run.
#[derive(Clone, Debug)]
pub struct ProgramSpec {
    pub argv: Vec<String>,
    /// `NAME=value` entries from `env` requests (and TERM when a terminal was requested).
    pub env: Vec<String>,
    pub tty: Option<Terminal>,
    /// What the login brings; its files are written into session containers before start.
    pub login: std::sync::Arc<crate::auth::metadata::LoginMetadata>,
}

/// How a program ended, in SSH terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReport {
    Status(u32),
    /// Died of a signal; `name` is the SSH name without `SIG` (`TERM`, `KILL`).
    Signal {
        name: String,
    },
}

/// Why a program could not be started; `Display` is the one line the user sees.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the container engine is not reachable ({0})")]
    EngineUnreachable(String),
    #[error("image {0} not found")]
    ImageNotFound(String),
    #[error("image {image} could not be pulled: {message}")]
    PullFailed { image: String, message: String },
    #[error("the container failed to start: {0}")]
    ContainerFailed(String),
    #[error("the program could not be started: {0}")]
    ExecFailed(String),
    #[error("starting the container took longer than {0:?}")]
    Timeout(std::time::Duration),
    #[error("the connection is closing")]
    Closing,
    /// A failure already reported once (the shared connection-mode container), repeated to
    /// each session that waited for it.
    #[error("{0}")]
    Earlier(std::sync::Arc<str>),
}

/// Signal names SSH uses (RFC 4254 §6.10) and their Linux numbers.
pub const SIGNALS: &[(&str, i32)] = &[
    ("HUP", 1),
    ("INT", 2),
    ("QUIT", 3),
    ("ILL", 4),
    ("ABRT", 6),
    ("FPE", 8),
    ("KILL", 9),
    ("USR1", 10),
    ("SEGV", 11),
    ("USR2", 12),
    ("PIPE", 13),
    ("ALRM", 14),
    ("TERM", 15),
];

pub fn signal_number(name: &str) -> Option<i32> {
    SIGNALS.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
}

impl fmt::Display for ExitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReport::Status(c) => write!(f, "exit status {c}"),
            ExitReport::Signal { name } => write!(f, "signal {name}"),
        }
    }
}
