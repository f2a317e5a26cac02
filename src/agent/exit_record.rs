//! The record `console` leaves when its program died of a signal, read once by `exit-info`.

use std::io;
use std::path::{Path, PathBuf};

use super::{write_file, AgentError, EXIT_RECORD_DIRS, EXIT_RECORD_PREFIX};

fn path(dir: &str, pid: i32) -> PathBuf {
    Path::new(dir).join(format!("{EXIT_RECORD_PREFIX}{pid}"))
}

/// Records that `pid` died of signal `name`. Best effort: the exit code (128+N) still tells
/// the server a signal was likely, so a full or missing directory is reported, not fatal.
pub fn record(pid: i32, name: &str) {
    let mut last = None;
    for dir in EXIT_RECORD_DIRS {
        match write_file::atomic(
            &path(dir, pid),
            0o600,
            &mut format!("{name}\n").as_bytes(),
            64,
        ) {
            Ok(()) => return,
            Err(e) => last = Some(e),
        }
    }
    if let Some(e) = last {
        eprintln!("containerssh-agent: cannot record the exit signal of {pid}: {e}");
    }
}

/// Removes any record for `pid` (a stale one from an earlier process with the same PID must not
/// be reported for a program that exited normally).
pub fn clear(pid: i32) {
    for dir in EXIT_RECORD_DIRS {
        let _ = std::fs::remove_file(path(dir, pid));
    }
}

/// Returns the recorded signal name for `pid`, if any, and removes the record.
pub fn take(pid: i32) -> Result<Option<String>, AgentError> {
    for dir in EXIT_RECORD_DIRS {
        let p = path(dir, pid);
        match std::fs::read(&p) {
            Ok(bytes) => {
                clear(pid);
                let name = String::from_utf8_lossy(&bytes).trim().to_string();
                return Ok(Some(name));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(AgentError::ExitRecord { path: p, source }),
        }
    }
    Ok(None)
}
