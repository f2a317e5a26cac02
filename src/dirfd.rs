//! Directories kept open from before the sandbox, in which files are created afterwards (audit
//! recordings; the log file, reopened on SIGHUP): the seccomp filter allows a writable
//! `openat` only relative to such a descriptor (`writable_dirs` of
//! [`crate::sandbox::enter`]), so every file the server writes after start-up is created here.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags};

/// How [`WritableDir::create`] opens a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Create {
    /// A new file; an existing one is an error.
    New,
    /// Appended to, created when missing.
    Append,
}

pub struct WritableDir(OwnedFd);

impl WritableDir {
    pub fn open(path: &Path) -> io::Result<Self> {
        let fd = rustix::fs::open(
            path,
            OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self(fd))
    }

    /// The descriptor, for the sandbox.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    /// Opens `name` (one path component) in the directory for writing, never through a
    /// symlink.
    pub fn create(&self, name: &str, how: Create, mode: u32) -> io::Result<File> {
        let how = match how {
            Create::New => OFlags::EXCL,
            Create::Append => OFlags::APPEND,
        };
        let fd = rustix::fs::openat(
            &self.0,
            Path::new(name),
            OFlags::CREATE | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | how,
            Mode::from_raw_mode(mode),
        )?;
        Ok(File::from(fd))
    }

    /// Opens `name` for reading (never through a symlink).
    pub fn open_read(&self, name: &str) -> io::Result<File> {
        let fd = rustix::fs::openat(
            &self.0,
            Path::new(name),
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(File::from(fd))
    }

    /// Reads all of `name`, refusing more than `max` bytes.
    pub fn read(&self, name: &str, max: u64) -> io::Result<Vec<u8>> {
        use std::io::Read;
        let mut out = Vec::new();
        self.open_read(name)?.take(max + 1).read_to_end(&mut out)?;
        if out.len() as u64 > max {
            return Err(io::Error::other(format!(
                "{name} is larger than {max} bytes"
            )));
        }
        Ok(out)
    }

    /// `len` bytes of `name` from `offset`.
    pub fn read_at(&self, name: &str, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let f = self.open_read(name)?;
        let mut buf = vec![0u8; usize::try_from(len).map_err(io::Error::other)?];
        f.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }

    /// The size of `name`.
    pub fn size(&self, name: &str) -> io::Result<u64> {
        Ok(self.open_read(name)?.metadata()?.len())
    }

    /// Removes `name` (a missing file is not an error).
    pub fn remove(&self, name: &str) -> io::Result<()> {
        match rustix::fs::unlinkat(&self.0, Path::new(name), rustix::fs::AtFlags::empty()) {
            Err(e) if e == rustix::io::Errno::NOENT => Ok(()),
            r => r.map_err(io::Error::from),
        }
    }
}
