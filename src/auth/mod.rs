//! Embedded authentication: OpenSSH-style `authorized_keys` files for public
//! keys and a `user:HASH` file for passwords.
//!
//! Both sources are re-read on every attempt so that an operator's edits take
//! effect without a restart; both are size-capped because a runaway file must
//! not turn a login attempt into an unbounded allocation.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

pub mod authorized_keys;
pub mod certificate;
pub mod hashing;
mod key_options;
pub mod metadata;
pub mod password;
pub mod webhook;

/// Why an authentication source could not be consulted.
///
/// These are operational failures (unreadable or oversized files, a broken
/// path template, an RNG failure); a wrong key or password is not an error
/// but `Ok(None)` / `Ok(false)`.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot expand authorized keys path template {template:?}: {reason}")]
    ExpandAuthorizedKeysPath {
        template: String,
        reason: &'static str,
    },
    #[error("cannot read authorized keys file {}", path.display())]
    ReadAuthorizedKeys {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("authorized keys file {} exceeds the limit of {limit} bytes", path.display())]
    AuthorizedKeysTooLarge { path: PathBuf, limit: u64 },
    #[error("cannot read password file {}", path.display())]
    ReadPasswordFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("password file {} exceeds the limit of {limit} bytes", path.display())]
    PasswordFileTooLarge { path: PathBuf, limit: u64 },
    #[error("cannot hash a password longer than {limit} bytes")]
    HashPasswordTooLong { limit: usize },
    #[error("cannot generate a random salt")]
    GenerateSalt {
        #[source]
        source: getrandom::Error,
    },
    #[error("the password hashing threads are gone")]
    HashWorkers,
    #[error("every password check was busy for {waited:?}: attempt refused")]
    HashBusy { waited: std::time::Duration },
    #[error("cannot hash password")]
    HashPassword {
        #[source]
        source: argon2::password_hash::Error,
    },
}

/// Reads at most `limit` bytes of `path`; `Ok(None)` means the file is larger.
///
/// The limit is enforced on the bytes actually read rather than on the
/// metadata length, so FIFOs, device files and files growing during the read
/// are bounded too.
pub(crate) fn read_capped(path: &Path, limit: u64) -> io::Result<Option<Vec<u8>>> {
    let file = std::fs::File::open(path)?;
    let mut buf = Vec::new();
    file.take(limit.saturating_add(1)).read_to_end(&mut buf)?;
    if u64::try_from(buf.len()).unwrap_or(u64::MAX) > limit {
        return Ok(None);
    }
    Ok(Some(buf))
}

/// Splits file contents into numbered lines (1-based), dropping a trailing
/// `\r` so files edited on Windows behave like their Unix counterparts.
pub(crate) fn numbered_lines(contents: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    contents
        .split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, line)| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            (i + 1, line)
        })
}
