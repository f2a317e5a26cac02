//! `write-file`: replaces a file with stdin, atomically (temp file in the same directory, then
//! rename), with a bounded size.

use std::fs::{self, OpenOptions, Permissions};
use std::io::{self, Read};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::AgentError;

/// Builds the error for a failed step on `path` (for `map_err`).
fn err(path: &Path, step: &'static str) -> impl FnOnce(io::Error) -> AgentError {
    let path = path.to_path_buf();
    move |source| AgentError::WriteFile { path, step, source }
}

/// `write-file PATH --mode MODE [--size N]` with stdin as the content.
pub fn from_stdin(path: &Path, mode: u32, max: u64, size: Option<u64>) -> Result<(), AgentError> {
    let mut stdin = io::stdin().lock();
    match size {
        None => atomic(path, mode, &mut stdin, max),
        Some(n) => exactly(path, mode, &mut stdin, max, n),
    }
}

/// Writes exactly `size` bytes of `content` (not reading past them); fewer is
/// [`AgentError::ShortInput`] and `path` is untouched.
pub fn exactly(
    path: &Path,
    mode: u32,
    content: &mut dyn Read,
    max: u64,
    size: u64,
) -> Result<(), AgentError> {
    if size > max {
        return Err(AgentError::TooLarge {
            path: path.to_path_buf(),
            max,
        });
    }
    atomic_checked(path, mode, &mut content.take(size), max, |got| {
        (got == size).then_some(()).ok_or(AgentError::ShortInput {
            path: path.to_path_buf(),
            size,
            got,
        })
    })
}

/// Writes at most `max` bytes of `content` to `path` with exactly `mode` (not masked by the
/// umask), via a temporary file next to it; on any failure `path` is untouched.
pub fn atomic(path: &Path, mode: u32, content: &mut dyn Read, max: u64) -> Result<(), AgentError> {
    atomic_checked(path, mode, content, max, |_| Ok(()))
}

/// [`atomic`], with `check(bytes written)` deciding before the rename whether to keep it.
fn atomic_checked(
    path: &Path,
    mode: u32,
    content: &mut dyn Read,
    max: u64,
    check: impl FnOnce(u64) -> Result<(), AgentError>,
) -> Result<(), AgentError> {
    let name = path
        .file_name()
        .ok_or_else(|| err(path, "use it as a file name")(io::ErrorKind::InvalidInput.into()))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(AgentError::NoParent(path.to_path_buf()));
    }
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".containerssh-{}.tmp", std::process::id()));
    let tmp: PathBuf = dir.join(tmp_name);
    // A leftover from a crashed run with our PID would make create_new fail.
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err(&tmp, "create the temporary file"))?;
    let result = (|| {
        let written = io::copy(&mut content.take(max + 1), &mut file)
            .map_err(err(&tmp, "write the temporary file"))?;
        if written > max {
            return Err(AgentError::TooLarge {
                path: path.to_path_buf(),
                max,
            });
        }
        check(written)?;
        file.set_permissions(Permissions::from_mode(mode))
            .map_err(err(&tmp, "set the mode"))?;
        file.sync_all()
            .map_err(err(&tmp, "flush the temporary file"))?;
        fs::rename(&tmp, path).map_err(err(path, "rename the temporary file over it"))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_with_exact_mode_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        atomic(&p, 0o640, &mut &b"one"[..], 10).unwrap();
        atomic(&p, 0o604, &mut &b"two!"[..], 10).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two!");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o7777,
            0o604
        );
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn too_large_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        atomic(&p, 0o600, &mut &b"exactly10!"[..], 10).unwrap();
        let e = atomic(&p, 0o600, &mut &b"eleven byte"[..], 10).unwrap_err();
        assert!(matches!(e, AgentError::TooLarge { .. }), "{e}");
        assert_eq!(fs::read(&p).unwrap(), b"exactly10!");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn exact_size_reads_no_further_and_short_input_leaves_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        // Bytes after the size are not read: no EOF is needed.
        let mut input = &b"abcdef-not-read"[..];
        exactly(&p, 0o600, &mut input, 10, 6).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"abcdef");
        assert_eq!(input, b"-not-read");
        let e = exactly(&p, 0o600, &mut &b"xyz"[..], 10, 6).unwrap_err();
        assert!(
            matches!(
                e,
                AgentError::ShortInput {
                    size: 6,
                    got: 3,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(fs::read(&p).unwrap(), b"abcdef", "untouched");
        let e = exactly(&p, 0o600, &mut &b""[..], 10, 11).unwrap_err();
        assert!(matches!(e, AgentError::TooLarge { .. }), "{e}");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn missing_parent_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let e = atomic(&dir.path().join("no/f"), 0o600, &mut &b""[..], 10).unwrap_err();
        assert!(matches!(e, AgentError::NoParent(_)), "{e}");
    }
}
