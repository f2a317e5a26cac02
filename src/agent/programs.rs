//! `session-server`'s programs: starting one (on pipes or a new pseudo-terminal) through the
//! `exec-child` trampoline, and its exit status in the protocol's terms. The streams and the
//! bookkeeping are [`super::forward`]'s, shared with forwarding.
//!
//! The trampoline does what must happen between `fork` and `execve` (a new session, the
//! terminal made the controlling one) in a process of its own, so the agent needs no
//! `pre_exec` and no `unsafe`.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::process::{Command, Stdio};

use rustix::process::{Pid, WaitStatus};
use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
use rustix::termios::{tcsetwinsize, Winsize};

/// A started program's descriptors.
pub struct Spawned {
    pub pid: Pid,
    /// Its stdout, or the terminal's master side.
    pub output: File,
    /// Its stdin, or the master side again.
    pub input: File,
    /// Its stderr (none on a terminal).
    pub stderr: Option<File>,
    /// The master side, for resizes (terminal only).
    pub master: Option<File>,
}

/// Starts `argv` with `env` added, through `exe exec-child`. `tty`: on a new pseudo-terminal
/// of that size (0 × 0: the kernel's default), as the leader of a new session.
pub fn start(
    exe: &Path,
    argv: &[Vec<u8>],
    env: &[Vec<u8>],
    tty: Option<(u16, u16)>,
) -> io::Result<Spawned> {
    let mut cmd = Command::new(exe);
    cmd.arg("exec-child");
    if tty.is_some() {
        cmd.arg("--ctty");
    }
    cmd.arg("--")
        .args(argv.iter().map(|a| OsStr::from_bytes(a)));
    for entry in env {
        let mut parts = entry.splitn(2, |&b| b == b'=');
        if let (Some(name), Some(value)) = (parts.next(), parts.next()) {
            cmd.env(OsStr::from_bytes(name), OsStr::from_bytes(value));
        }
    }
    let Some((rows, cols)) = tty else {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn()?;
        let pid = pid_of(&child)?;
        let missing = || io::Error::other("the program's pipes are missing");
        let output = child.stdout.take().map(into_file).ok_or_else(missing)?;
        // Room for the program to write on while a frame goes out (a pipe's default 64 KiB
        // is two frames); where the kernel refuses, the default stays.
        let _ = rustix::pipe::fcntl_setpipe_size(&output, OUTPUT_PIPE_BYTES);
        return Ok(Spawned {
            pid,
            input: child.stdin.take().map(into_file).ok_or_else(missing)?,
            output,
            stderr: Some(child.stderr.take().map(into_file).ok_or_else(missing)?),
            master: None,
        });
    };
    let master = File::from(openpt(
        OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC,
    )?);
    grantpt(&master)?;
    unlockpt(&master)?;
    if rows > 0 && cols > 0 {
        resize(&master, rows, cols)?;
    }
    let name = ptsname(&master, Vec::new())?;
    let slave = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(OsStr::from_bytes(name.as_bytes()))?;
    cmd.stdin(slave.try_clone()?)
        .stdout(slave.try_clone()?)
        .stderr(slave);
    let child = cmd.spawn()?;
    // The command holds our copies of the terminal's slave side: the master reads end of
    // file (EIO) only once the program and its children have closed theirs.
    drop(cmd);
    Ok(Spawned {
        pid: pid_of(&child)?,
        output: master.try_clone()?,
        input: master.try_clone()?,
        stderr: None,
        master: Some(master),
    })
}

/// The pipe buffer of a program's stdout (and of the session-server's own).
pub const OUTPUT_PIPE_BYTES: usize = 256 * 1024;

fn pid_of(child: &std::process::Child) -> io::Result<Pid> {
    // The trampoline is reaped by the agent's reaper (wait4(-1)), never through `child`.
    i32::try_from(child.id())
        .ok()
        .and_then(Pid::from_raw)
        .ok_or_else(|| io::Error::other("the program has no valid process ID"))
}

fn into_file(fd: impl Into<std::os::fd::OwnedFd>) -> File {
    File::from(fd.into())
}

/// Sets a terminal's size.
pub fn resize(master: &File, rows: u16, cols: u16) -> io::Result<()> {
    let size = Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    Ok(tcsetwinsize(master, size)?)
}

/// `(status, signal)` for `Exited`: the exit code, or 128+N and N when signal N killed it.
pub fn exit_of(status: WaitStatus) -> (u32, u8) {
    if let Some(n) = status.terminating_signal() {
        let n = u8::try_from(n).unwrap_or(u8::MAX);
        return (128 + u32::from(n), n);
    }
    (status.exit_status().map_or(1, |c| c as u32), 0)
}

/// `exec-child --ctty`: lead a new session whose controlling terminal is stdin.
pub fn take_terminal() -> io::Result<()> {
    rustix::process::setsid()?;
    rustix::process::ioctl_tiocsctty(io::stdin())?;
    Ok(())
}
