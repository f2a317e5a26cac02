//! `console` (the parent that stays) and `exec-child` (the trampoline that reports its own PID
//! and becomes the program). The design is described in the [module docs](super).

use std::ffi::OsString;
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

use rustix::process::Signal;
use rustix::termios::{
    isatty, tcgetattr, tcsetattr, tcsetwinsize, LocalModes, OptionalActions, OutputModes,
    SpecialCodeIndex, Winsize,
};

use super::cli::Console;
use super::{exit_record, signal, AgentError};

/// Signals sent to the agent that are passed on to the program.
const FORWARDED: &[Signal] = &[
    Signal::HUP,
    Signal::INT,
    Signal::QUIT,
    Signal::TERM,
    Signal::USR1,
    Signal::USR2,
    Signal::ALARM,
];

/// Signals a terminal sends to the whole foreground process group (the program gets them
/// itself; forwarding would deliver them twice).
const FROM_TERMINAL: &[Signal] = &[Signal::INT, Signal::QUIT];

/// The agent's own executable, to start the trampoline from.
pub(super) fn self_exe(argv0: Option<OsString>) -> Result<PathBuf, AgentError> {
    std::env::current_exe().or_else(|e| match argv0 {
        Some(a) if a.to_string_lossy().contains('/') => Ok(PathBuf::from(a)),
        _ => Err(AgentError::SelfExe(e)),
    })
}

fn read_start_byte(tty: bool) -> Result<(), AgentError> {
    // On a terminal the byte must neither wait for a line nor be echoed into the program's
    // first output: the terminal is put in non-canonical, no-echo mode for the read.
    let stdin = io::stdin();
    let saved = if tty { tcgetattr(&stdin).ok() } else { None };
    if let Some(t) = &saved {
        let mut quiet = t.clone();
        quiet
            .local_modes
            .remove(LocalModes::ICANON | LocalModes::ECHO);
        quiet.special_codes[SpecialCodeIndex::VMIN] = 1;
        quiet.special_codes[SpecialCodeIndex::VTIME] = 0;
        let _ = tcsetattr(&stdin, OptionalActions::Now, &quiet);
    }
    let mut byte = [0u8; 1];
    let read = loop {
        // Unbuffered: the bytes after the start byte belong to the program.
        match rustix::io::read(&stdin, &mut byte) {
            Ok(1) => break Ok(()),
            Ok(_) => break Err(AgentError::StartByte(io::ErrorKind::UnexpectedEof.into())),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => break Err(AgentError::StartByte(e.into())),
        }
    };
    if let Some(t) = &saved {
        let _ = tcsetattr(&stdin, OptionalActions::Now, t);
    }
    read
}

/// `console`: returns the exit code the agent should exit with.
pub fn run(c: &Console, argv0: Option<OsString>) -> Result<i32, AgentError> {
    let stdin = io::stdin();
    let tty = isatty(&stdin);
    if let (Some((rows, cols)), true) = (c.size, tty) {
        let size = Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        tcsetwinsize(&stdin, size).map_err(|e| AgentError::WindowSize(e.into()))?;
    }
    if c.wait {
        read_start_byte(tty)?;
    }
    let forwarded: Vec<Signal> = FORWARDED
        .iter()
        .copied()
        .filter(|s| !(tty && FROM_TERMINAL.contains(s)))
        .collect();
    // Before the spawn, so no SIGCHLD is missed.
    let mut signals = signal::listen(&forwarded)?;

    let mut cmd = Command::new(self_exe(argv0)?);
    cmd.arg("exec-child");
    if c.report_pid {
        cmd.arg("--pid");
    }
    cmd.arg("--").args(&c.argv);
    cmd.envs(c.env.iter().map(|(k, v)| (k, v)));
    let child = cmd.spawn().map_err(|source| AgentError::Spawn {
        program: c
            .argv
            .first()
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default(),
        source,
    })?;
    let Some(child_pid) = rustix::process::Pid::from_raw(child.id() as i32) else {
        return Err(AgentError::BadPid(child.id() as i32));
    };
    // We reap with waitpid(-1) ourselves (we may be PID 1 with orphans to reap too), so the
    // std handle is never waited on.
    drop(child);
    let child_raw = child_pid.as_raw_nonzero().get();
    loop {
        for (pid, status) in signal::reap_exited() {
            if pid != child_raw {
                continue;
            }
            if let Some(n) = status.terminating_signal() {
                exit_record::record(pid, &signal::name_of(n));
                return Ok(128 + n);
            }
            exit_record::clear(pid);
            return Ok(status.exit_status().unwrap_or(1));
        }
        for raw in signals.wait() {
            if let Some(s) = forwarded.iter().find(|s| s.as_raw() == raw) {
                // The child may just have exited; ESRCH then is expected.
                let _ = rustix::process::kill_process(child_pid, *s);
            }
        }
    }
}

/// Writes the 4 PID bytes to stdout unchanged. On a terminal, output processing is off while
/// they are written: with the usual `ONLCR`, a 0x0a byte (PID 10, 266, ...) would reach the
/// reader as 0x0d 0x0a and shift everything after it.
fn write_pid(pid: u32) -> io::Result<()> {
    let mut out = io::stdout().lock();
    let saved = if isatty(&out) {
        let saved = tcgetattr(&out)?;
        let mut raw = saved.clone();
        raw.output_modes.remove(OutputModes::OPOST);
        tcsetattr(&out, OptionalActions::Now, &raw)?;
        Some(saved)
    } else {
        None
    };
    let written = out.write_all(&pid.to_le_bytes()).and_then(|()| out.flush());
    if let Some(saved) = saved {
        // Drain: the PID bytes leave with OPOST off, everything after with it on again.
        tcsetattr(&out, OptionalActions::Drain, &saved)?;
    }
    written
}

/// `exec-child`: write our PID (which the program keeps), then become the program.
pub fn exec_child(report_pid: bool, ctty: bool, argv: &[OsString]) -> Result<i32, AgentError> {
    if ctty {
        if let Err(e) = super::programs::take_terminal() {
            eprintln!("containerssh-agent: cannot take the terminal: {e}");
            return Ok(126);
        }
    }
    if report_pid {
        write_pid(std::process::id()).map_err(AgentError::ReportPid)?;
    }
    // The parser refuses `exec-child` without a program; were there none, nothing is found.
    let Some((program, args)) = argv.split_first() else {
        eprintln!("containerssh-agent: exec-child: no program to execute");
        return Ok(127);
    };
    let err = Command::new(program).args(args).exec();
    eprintln!(
        "containerssh-agent: cannot execute {}: {err}",
        program.to_string_lossy()
    );
    // The shell's codes: 127 not found, 126 found but not executable.
    Ok(if err.kind() == io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}
