//! The in-container helper (`containerssh-agent`): a small static binary the server injects into
//! containers to do what the Docker and Kubernetes exec APIs cannot — report the PID of an exec'd
//! program, deliver signals to it, learn which signal killed it, idle as a reaping PID 1, and
//! write files.
//!
//! It has no async runtime and must not pull in the server's code: [`main`] touches only this
//! module, so link-time optimisation leaves russh, tokio and hyper out of the binary.
//!
//! # `console`: PID report and exit signals
//! The agent stays the *parent* of the program instead of `exec`ing it (as ContainerSSH's agent
//! does), because only a parent can learn that the program died of a signal: the exec API just
//! reports an exit code, and 143 could be `exit 143` as well as SIGTERM. The program is started
//! through a trampoline: the agent spawns itself as `exec-child [--pid] -- PROG ARGS`, and that
//! child writes *its own* PID (4 bytes, little-endian) to the shared stdout and then `execve`s
//! PROG, which keeps the PID. So the PID is always the first thing on stdout, before any byte
//! PROG writes, with no synchronisation between parent and child and without `unsafe`
//! (`fork` + code before `exec` would need `pre_exec`).
//!
//! The parent forwards HUP, INT, QUIT, TERM, USR1, USR2 and ALRM sent to it to the program (when
//! stdin is a terminal, INT and QUIT are not forwarded: the terminal already sends them to the
//! whole foreground process group, program included). It reaps any child (it may be PID 1), and
//! when the program ends it exits with the program's code, or with 128+N when signal N killed it,
//! after recording the signal's name in `EXIT_RECORD_DIRS/EXIT_RECORD_PREFIX<pid>`. `exit-info
//! --pid <pid>` prints that name and removes the record.
//!
//! # `forward-server`: port and socket forwarding
//! Dials and listens on TCP and unix sockets inside the container for the server, with all
//! streams multiplexed over stdin/stdout in the frames of [`proto`] (reference:
//! `docs/agent-protocol.md`). Threads and blocking sockets, no async runtime.
//!
//! # `session-server`: programs without an exec
//! The same protocol, plus `Spawn`: programs on pipes or a new terminal, with resizes,
//! signals and their exit status as frames. Run as the container's main process and reached
//! through the engine's attach stream, it lets a session start without an exec.

pub mod cli;
mod console;
mod exit_record;
mod forward;
mod programs;
pub mod proto;
pub mod signal;
mod write_file;

use std::ffi::OsString;
use std::io;
use std::path::PathBuf;

use cli::{Command, USAGE};

/// The largest file `write-file` accepts; the agent holds no more than one buffer of it, but a
/// bound keeps a runaway sender from filling the container's disk through us.
pub const MAX_WRITE_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// `install` refuses to copy an executable larger than this (the agent is about 1.6 MiB).
pub const MAX_INSTALL_BYTES: u64 = 32 * 1024 * 1024;

/// `write-file`'s mode when `--mode` is absent: files from authentication are often credentials.
pub const DEFAULT_FILE_MODE: u32 = 0o600;

/// Where `console` records the signal that killed its program, first writable one wins.
/// `/dev/shm` is a tmpfs that Docker and Kubernetes mount writable for every user even when the
/// root file system is read-only, and it never ends up in a committed image; `/tmp` is the
/// fallback. (The agent's own directory is often a read-only mount, so it is not used.)
pub const EXIT_RECORD_DIRS: &[&str] = &["/dev/shm", "/tmp"];

/// File name prefix of an exit record; the program's PID follows.
pub const EXIT_RECORD_PREFIX: &str = ".containerssh-agent-exit-";

/// The failures of the agent's commands.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// `--pid` named no valid process ID.
    #[error("{0} is not a valid process ID")]
    BadPid(i32),
    /// `kill` failed.
    #[error("cannot send {signal} to process {pid}")]
    Kill {
        /// Target.
        pid: i32,
        /// Signal name.
        signal: &'static str,
        /// Why.
        source: io::Error,
    },
    /// Installing signal handlers failed.
    #[error("cannot install signal handlers")]
    SignalHandlers(#[source] io::Error),
    /// The signal iterator ended (it never does while we hold it).
    #[error("signal delivery stopped unexpectedly")]
    SignalIteratorClosed,
    /// Setting the terminal size failed.
    #[error("cannot set the terminal size")]
    WindowSize(#[source] io::Error),
    /// Reading the start byte failed or stdin ended first.
    #[error("cannot read the start byte from stdin")]
    StartByte(#[source] io::Error),
    /// The agent's own path is unknown (no /proc and a relative argv[0]).
    #[error("cannot find the agent's own executable to start the program")]
    SelfExe(#[source] io::Error),
    /// Spawning the trampoline failed.
    #[error("cannot start {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        source: io::Error,
    },
    /// Writing the PID report failed.
    #[error("cannot write the PID to stdout")]
    ReportPid(#[source] io::Error),
    /// `write-file`: the destination has no existing parent directory.
    #[error("{0}: the parent directory does not exist")]
    NoParent(PathBuf),
    /// `write-file`: stdin was larger than [`MAX_WRITE_FILE_BYTES`].
    #[error("{path}: input is larger than {max} bytes")]
    TooLarge {
        /// Destination.
        path: PathBuf,
        /// The limit.
        max: u64,
    },
    /// `write-file --size N`: stdin ended before N bytes.
    #[error("{path}: input ended after {got} of {size} bytes")]
    ShortInput {
        /// Destination.
        path: PathBuf,
        /// `--size`.
        size: u64,
        /// What arrived.
        got: u64,
    },
    /// `write-file`: an I/O step failed.
    #[error("{path}: cannot {step}")]
    WriteFile {
        /// The file the step worked on.
        path: PathBuf,
        /// What was being done.
        step: &'static str,
        /// Why.
        source: io::Error,
    },
    /// `forward-server`: duplicating stdin or stdout failed.
    #[error("cannot set up stdin and stdout")]
    Stdio(#[source] io::Error),
    /// `exit-info`: reading or removing the record failed.
    #[error("cannot read the exit record {path}")]
    ExitRecord {
        /// The record.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// Runs the agent with the full `argv` and returns the process exit code.
pub fn main(args: impl IntoIterator<Item = OsString>) -> i32 {
    let mut args = args.into_iter();
    let argv0 = args.next();
    let args: Vec<OsString> = args.collect();
    let command = match cli::parse(&args) {
        Ok(c) => c,
        Err(e) => {
            eprint!("containerssh-agent: {e}\n\n{USAGE}");
            return 2;
        }
    };
    match run(command, argv0) {
        Ok(code) => code,
        Err(e) => {
            let mut msg = format!("containerssh-agent: {e}");
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                msg.push_str(&format!(": {s}"));
                source = s.source();
            }
            eprintln!("{msg}");
            1
        }
    }
}

/// `forward-server` runs no program and signals nothing, so it gets its own seccomp filter
/// (`sandbox::seccomp::AGENT_FORWARD`). Best effort: a container runtime that refuses seccomp
/// still gets forwarding, with the reason on stderr.
fn confine_forward_server() {
    use crate::sandbox::seccomp::{install_lists, AGENT_FORWARD, RUNTIME};
    if let Err(e) = install_lists(
        &[RUNTIME, AGENT_FORWARD],
        crate::config::model::SeccompMode::Enforce,
        &[],
    ) {
        eprintln!("containerssh-agent: forward-server runs without a seccomp filter: {e}");
    }
}

fn run(command: Command, argv0: Option<OsString>) -> Result<i32, AgentError> {
    match command {
        Command::Help => {
            print!("{USAGE}");
            Ok(0)
        }
        Command::Version => {
            println!("containerssh-agent {}", env!("CARGO_PKG_VERSION"));
            Ok(0)
        }
        Command::Console(c) => console::run(&c, argv0),
        Command::ExecChild {
            report_pid,
            ctty,
            argv,
        } => console::exec_child(report_pid, ctty, &argv),
        Command::Signal { pid, signal } => signal::send(pid, signal).map(|()| 0),
        Command::WaitSignal { signals } => signal::wait_signal(&signals).map(|()| 0),
        Command::Install { path } => {
            let exe = console::self_exe(argv0)?;
            let mut file = std::fs::File::open(&exe).map_err(AgentError::SelfExe)?;
            write_file::atomic(&path, 0o755, &mut file, MAX_INSTALL_BYTES).map(|()| 0)
        }
        Command::WriteFile { path, mode, size } => {
            write_file::from_stdin(&path, mode, MAX_WRITE_FILE_BYTES, size).map(|()| 0)
        }
        Command::ForwardServer => {
            confine_forward_server();
            forward::run(None)
        }
        // No seccomp filter: the programs it starts would inherit it.
        Command::SessionServer => forward::run(Some(console::self_exe(argv0)?)),
        Command::ExitInfo { pid } => {
            if let Some(name) = exit_record::take(pid)? {
                println!("{name}");
            }
            Ok(0)
        }
    }
}
