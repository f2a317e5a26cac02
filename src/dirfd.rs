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
}
