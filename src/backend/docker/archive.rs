//! A minimal in-memory tar writer (POSIX ustar, no pax or GNU extensions)
//! for `PUT /containers/{id}/archive`: enough to inject a few files and
//! their parent directories into a container before it starts.
//!
//! Every entry is owned by uid/gid 0 with mtime 0. Paths are relative
//! (the engine extracts them below the `path` query parameter) and must
//! fit ustar's 100-byte name field, or split at a `/` into a prefix of at
//! most 155 bytes and a name of at most 100.

use bytes::Bytes;
use http::{Method, StatusCode};

use super::api::{q, seg};
use super::client::{error_message, status_error, DockerClient};
use super::{DockerError, MAX_UPLOAD_BYTES};

impl DockerClient {
    /// `PUT /containers/{id}/archive?path=` with a tar stream (see
    /// [`build_tar`]), extracted below the directory `path` in the
    /// container's filesystem; works on created, not yet started containers.
    /// `path` must exist in the container, so to inject below a directory an
    /// image may lack, use `path=/` and put that directory into the archive.
    ///
    /// 404 for the container becomes [`DockerError::NoSuchContainer`]; a
    /// missing `path` (also 404, "Could not find the file ...") and other
    /// failures become [`DockerError::Status`] with the engine's message.
    /// Docker 20.10 answers 500 (not the documented 400/403) when `path` is
    /// not a directory, the rootfs is read-only or the tar is malformed.
    /// Bodies over [`MAX_UPLOAD_BYTES`] fail with
    /// [`DockerError::UploadTooLarge`] before anything is sent. Untimed like
    /// create/start (the engine may be slow under load); bound it from outside.
    pub async fn put_archive(
        &self,
        id: &str,
        path: &str,
        tar: impl Into<Bytes>,
    ) -> Result<(), DockerError> {
        const OP: &str = "container archive upload";
        // Bytes: the agent's archive is shared by every upload, never copied per login.
        let tar: Bytes = tar.into();
        if tar.len() > MAX_UPLOAD_BYTES {
            return Err(DockerError::UploadTooLarge {
                op: OP,
                size: tar.len(),
                limit: MAX_UPLOAD_BYTES,
            });
        }
        let url = self
            .versioned(&format!("/containers/{}/archive?path={}", seg(id), q(path)))
            .await?;
        let headers = [("content-type", "application/x-tar")];
        let (status, body) = self
            .call_untimed_with(OP, Method::PUT, &url, Some(tar), &headers)
            .await?;
        match status {
            StatusCode::OK => Ok(()),
            StatusCode::NOT_FOUND if error_message(&body).starts_with("No such container") => {
                Err(DockerError::NoSuchContainer { id: id.to_string() })
            }
            s => Err(status_error(OP, s, &body)),
        }
    }
}

/// Size of a tar header and of the blocks data is padded to.
const BLOCK: usize = 512;
/// ustar `name` field width.
const NAME_LEN: usize = 100;
/// ustar `prefix` field width.
const PREFIX_LEN: usize = 155;
/// Largest size the 11 octal digits of the `size` field can hold.
const MAX_ENTRY_BYTES: u64 = 0o777_7777_7777;
/// Permission and set-id/sticky bits; anything above is not a mode.
const MAX_MODE: u32 = 0o7777;

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TarData<'a> {
    /// A directory (typeflag `5`); its path gets a trailing `/`.
    Dir,
    /// A regular file (typeflag `0`) with this content.
    File(&'a [u8]),
}

/// One archive member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TarEntry<'a> {
    /// Relative `/`-separated path, e.g. `cssh/agent`; no `..`, no leading `/`.
    pub path: &'a str,
    /// Permission bits, e.g. `0o755` (at most `0o7777`).
    pub mode: u32,
    pub data: TarData<'a>,
}

/// Why an archive could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ArchiveError {
    /// The path does not fit ustar's name (100) and prefix (155) fields.
    #[error("tar path {path:?} is too long for ustar (name ≤ 100 bytes, prefix ≤ 155 bytes)")]
    PathTooLong { path: String },
    /// The path is empty, absolute, contains NUL or a `.`/`..` component.
    #[error("invalid tar path {path:?}: {reason}")]
    InvalidPath { path: String, reason: &'static str },
    /// The mode has bits above `0o7777`.
    #[error("invalid mode {mode:#o} for tar entry {path:?}")]
    InvalidMode { path: String, mode: u32 },
    /// The file is larger than the ustar size field can express (8 GiB).
    #[error("tar entry {path:?} is too large ({size} bytes)")]
    FileTooLarge { path: String, size: u64 },
}

/// Serialises `entries` in order into a complete tar archive (ending in two zero blocks).
pub fn build_tar(entries: &[TarEntry]) -> Result<Vec<u8>, ArchiveError> {
    let data_len: usize = entries
        .iter()
        .map(|e| match e.data {
            TarData::Dir => BLOCK,
            TarData::File(d) => BLOCK + d.len().div_ceil(BLOCK) * BLOCK,
        })
        .sum();
    let mut out = Vec::with_capacity(data_len + 2 * BLOCK);
    for e in entries {
        out.extend_from_slice(&header(e)?);
        if let TarData::File(d) = e.data {
            out.extend_from_slice(d);
            out.resize(out.len().div_ceil(BLOCK) * BLOCK, 0);
        }
    }
    out.resize(out.len() + 2 * BLOCK, 0);
    Ok(out)
}

fn header(e: &TarEntry) -> Result<[u8; BLOCK], ArchiveError> {
    validate_path(e.path)?;
    if e.mode > MAX_MODE {
        return Err(ArchiveError::InvalidMode {
            path: e.path.to_string(),
            mode: e.mode,
        });
    }
    let (typeflag, size, path) = match e.data {
        TarData::Dir if e.path.ends_with('/') => (b'5', 0, e.path.to_string()),
        TarData::Dir => (b'5', 0, format!("{}/", e.path)),
        TarData::File(d) => (b'0', d.len() as u64, e.path.to_string()),
    };
    if size > MAX_ENTRY_BYTES {
        return Err(ArchiveError::FileTooLarge {
            path: e.path.to_string(),
            size,
        });
    }
    let too_long = || ArchiveError::PathTooLong {
        path: e.path.to_string(),
    };
    let (prefix, name) = split_path(&path).ok_or_else(too_long)?;

    let mut h = [0u8; BLOCK];
    put_bytes(&mut h[..NAME_LEN], name.as_bytes()).ok_or_else(too_long)?;
    put_octal(&mut h[100..108], u64::from(e.mode));
    put_octal(&mut h[108..116], 0); // uid
    put_octal(&mut h[116..124], 0); // gid
    put_octal(&mut h[124..136], size);
    put_octal(&mut h[136..148], 0); // mtime
    h[156] = typeflag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    put_bytes(&mut h[345..345 + PREFIX_LEN], prefix.as_bytes()).ok_or_else(too_long)?;
    // The checksum is summed with its own field filled with spaces, then
    // stored as six octal digits, NUL, space.
    h[148..156].fill(b' ');
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..154].copy_from_slice(format!("{sum:06o}").as_bytes());
    h[154] = 0;
    Ok(h)
}

fn validate_path(path: &str) -> Result<(), ArchiveError> {
    let invalid = |reason| ArchiveError::InvalidPath {
        path: path.to_string(),
        reason,
    };
    if path.is_empty() || path == "/" {
        return Err(invalid("empty"));
    }
    if path.starts_with('/') {
        return Err(invalid("absolute"));
    }
    if path.contains('\0') {
        return Err(invalid("contains NUL"));
    }
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    if trimmed
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(invalid("empty, `.` or `..` component"));
    }
    Ok(())
}

/// Splits into (prefix, name) so both fit their fields, cutting at a `/`
/// (which is dropped: readers join them with `/`). `None` if impossible.
fn split_path(path: &str) -> Option<(&str, &str)> {
    if path.len() <= NAME_LEN {
        return Some(("", path));
    }
    // A trailing `/` (directories) stays with the name, so skip it when
    // looking for the cut; cut as far left as possible to keep the name short
    // enough, but the prefix must fit too.
    let body = path.strip_suffix('/').unwrap_or(path);
    body.match_indices('/')
        .map(|(i, _)| i)
        .filter(|&i| i > 0 && i <= PREFIX_LEN && path.len() - i - 1 <= NAME_LEN)
        .map(|i| (&path[..i], &path[i + 1..]))
        .next()
}

/// Writes `bytes` at the start of `field`; `None` when they do not fit (then nothing is written).
fn put_bytes(field: &mut [u8], bytes: &[u8]) -> Option<()> {
    field.get_mut(..bytes.len())?.copy_from_slice(bytes);
    Some(())
}

/// Writes `v` as zero-padded octal filling the field, then a terminating NUL.
fn put_octal(field: &mut [u8], v: u64) {
    let Some((nul, digits)) = field.split_last_mut() else {
        return;
    };
    let width = digits.len();
    let s = format!("{v:0width$o}");
    debug_assert_eq!(s.len(), width, "value {v} does not fit");
    digits.copy_from_slice(s.as_bytes());
    *nul = 0;
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};

    use super::*;

    fn file<'a>(path: &'a str, mode: u32, data: &'a [u8]) -> TarEntry<'a> {
        TarEntry {
            path,
            mode,
            data: TarData::File(data),
        }
    }

    fn dir(path: &str, mode: u32) -> TarEntry<'_> {
        TarEntry {
            path,
            mode,
            data: TarData::Dir,
        }
    }

    /// Runs the system tar with `args`, feeding `input` on stdin.
    fn tar(args: &[&str], cwd: &std::path::Path, input: &[u8]) -> String {
        use std::io::Write;
        let mut child = Command::new("tar")
            .args(args)
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run tar");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input)
            .expect("feed tar");
        let out = child.wait_with_output().expect("tar output");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "tar {args:?} failed: {stderr}");
        // GNU tar warns (exit 0) about checksum or format trouble it recovered from.
        assert!(stderr.is_empty(), "tar {args:?} complained: {stderr}");
        String::from_utf8(out.stdout).expect("utf-8 listing")
    }

    fn mode_of(p: &std::path::Path) -> u32 {
        std::fs::symlink_metadata(p)
            .expect("stat")
            .permissions()
            .mode()
            & 0o7777
    }

    #[test]
    fn system_tar_lists_and_extracts_what_we_wrote() {
        let script = b"#!/bin/sh\necho injected\n";
        let big: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let block: Vec<u8> = vec![b'x'; BLOCK];
        let long_dir = format!("{}/{}/{}", "d".repeat(60), "e".repeat(60), "g".repeat(30));
        let long_file = format!("{long_dir}/{}", "f".repeat(99));
        let entries = [
            dir("cssh", 0o755),
            file("cssh/hello.sh", 0o755, script),
            file("cssh/big.bin", 0o600, &big),
            file("cssh/block", 0o644, &block),
            file("cssh/empty", 0o640, b""),
            dir("cssh/sub/", 0o700),
            dir(&long_dir[..60], 0o755),
            dir(&long_dir[..121], 0o755),
            dir(&long_dir, 0o751),
            file(&long_file, 0o4755, b"long"),
        ];
        let archive = build_tar(&entries).expect("build");
        assert_eq!(archive.len() % BLOCK, 0);
        assert!(archive[archive.len() - 2 * BLOCK..].iter().all(|&b| b == 0));

        let tmp = tempfile::tempdir().expect("tempdir");
        let listing = tar(&["-tvf", "-"], tmp.path(), &archive);
        let lines: Vec<&str> = listing.lines().collect();
        assert_eq!(lines.len(), entries.len(), "{listing}");
        for (want, line) in [
            "drwxr-xr-x 0/0 0 1970-01-01 00:00 cssh/",
            "-rwxr-xr-x 0/0 24 1970-01-01 00:00 cssh/hello.sh",
            "-rw------- 0/0 100000 1970-01-01 00:00 cssh/big.bin",
            "-rw-r--r-- 0/0 512 1970-01-01 00:00 cssh/block",
            "-rw-r----- 0/0 0 1970-01-01 00:00 cssh/empty",
            "drwx------ 0/0 0 1970-01-01 00:00 cssh/sub/",
        ]
        .iter()
        .zip(&lines)
        {
            let got = line.split_whitespace().collect::<Vec<_>>().join(" ");
            assert_eq!(got, *want);
        }
        assert!(
            lines[7].ends_with(&format!("{}/", &long_dir[..121])),
            "{}",
            lines[7]
        );
        assert!(lines[9].starts_with("-rwsr-xr-x 0/0"), "{}", lines[9]);
        assert!(lines[9].ends_with(&long_file), "{}", lines[9]);

        tar(&["--no-same-owner", "-pxf", "-"], tmp.path(), &archive);
        let root = tmp.path();
        assert_eq!(std::fs::read(root.join("cssh/hello.sh")).unwrap(), script);
        assert_eq!(std::fs::read(root.join("cssh/big.bin")).unwrap(), big);
        assert_eq!(std::fs::read(root.join("cssh/block")).unwrap(), block);
        assert_eq!(std::fs::read(root.join("cssh/empty")).unwrap(), b"");
        assert_eq!(std::fs::read(root.join(&long_file)).unwrap(), b"long");
        assert!(root.join("cssh/sub").is_dir());
        assert!(root.join(&long_dir).is_dir());
        assert_eq!(mode_of(&root.join("cssh/hello.sh")), 0o755);
        assert_eq!(mode_of(&root.join("cssh/big.bin")), 0o600);
        assert_eq!(mode_of(&root.join("cssh/empty")), 0o640);
        assert_eq!(mode_of(&root.join("cssh/sub")), 0o700);
        assert_eq!(mode_of(&root.join(&long_dir)), 0o751);
        let out = Command::new(root.join("cssh/hello.sh"))
            .output()
            .expect("run");
        assert_eq!(out.stdout, b"injected\n");
    }

    #[test]
    fn empty_archive_is_two_zero_blocks() {
        assert_eq!(build_tar(&[]).unwrap(), vec![0u8; 2 * BLOCK]);
    }

    #[test]
    fn header_fields_and_checksum() {
        let archive = build_tar(&[file("a", 0o755, b"hi")]).unwrap();
        let h = &archive[..BLOCK];
        assert_eq!(&h[..2], b"a\0");
        assert_eq!(&h[100..108], b"0000755\0");
        assert_eq!(&h[124..136], b"00000000002\0");
        assert_eq!(h[156], b'0');
        assert_eq!(&h[257..265], b"ustar\x0000");
        let stored = std::str::from_utf8(&h[148..154]).unwrap();
        let mut blank = h.to_vec();
        blank[148..156].fill(b' ');
        let sum: u32 = blank.iter().map(|&b| u32::from(b)).sum();
        assert_eq!(u32::from_str_radix(stored, 8).unwrap(), sum);
        assert_eq!(&h[154..156], b"\0 ");
        assert_eq!(&archive[BLOCK..BLOCK + 3], b"hi\0");
        assert_eq!(archive.len(), 4 * BLOCK);
    }

    #[test]
    fn bad_entries_are_rejected() {
        let too_long = "x".repeat(101);
        assert!(matches!(
            build_tar(&[file(&too_long, 0o644, b"")]),
            Err(ArchiveError::PathTooLong { .. })
        ));
        // Exactly 100 bytes fits the name field alone.
        build_tar(&[file(&too_long[..100], 0o644, b"")]).expect("100-byte name");
        // Prefix of 156 bytes cannot be split.
        let p = format!("{}/{}", "p".repeat(156), "n");
        assert!(matches!(
            build_tar(&[file(&p, 0o644, b"")]),
            Err(ArchiveError::PathTooLong { .. })
        ));
        let p = format!("{}/{}", "p".repeat(155), "n".repeat(100));
        build_tar(&[file(&p, 0o644, b"")]).expect("155 + 100 fits");
        let p = format!("{}/{}", "p".repeat(155), "n".repeat(101));
        assert!(matches!(
            build_tar(&[file(&p, 0o644, b"")]),
            Err(ArchiveError::PathTooLong { .. })
        ));
        // A directory's trailing slash counts towards the name.
        let d = format!("{}/{}", "p".repeat(155), "n".repeat(100));
        assert!(matches!(
            build_tar(&[dir(&d, 0o755)]),
            Err(ArchiveError::PathTooLong { .. })
        ));
        for bad in ["", "/", "/abs", "a/../b", "./a", "a//b", "..", "a\0b"] {
            assert!(
                matches!(
                    build_tar(&[file(bad, 0o644, b"")]),
                    Err(ArchiveError::InvalidPath { .. })
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            build_tar(&[file("a", 0o10000, b"")]),
            Err(ArchiveError::InvalidMode { .. })
        ));
    }

    /// Random trees round-trip through GNU tar: same paths, modes and bytes.
    #[test]
    fn fuzz_tar_round_trips_through_system_tar() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let (mut built, mut too_long) = (0, 0);
        for round in 0..40 {
            let mut paths: Vec<String> = Vec::new();
            let mut contents: Vec<Vec<u8>> = Vec::new();
            let mut modes: Vec<u32> = Vec::new();
            let dirs = 1 + next() % 4;
            let mut dir_path = String::new();
            for i in 0..dirs {
                let len = 1 + (next() % 80) as usize;
                let comp: String = (0..len)
                    .map(|j| char::from(b'a' + ((i as usize + j + round) % 26) as u8))
                    .collect();
                if !dir_path.is_empty() {
                    dir_path.push('/');
                }
                dir_path.push_str(&comp);
            }
            for i in 0..1 + next() % 5 {
                let size = match next() % 4 {
                    0 => 0,
                    1 => BLOCK * (1 + (next() % 3) as usize),
                    _ => (next() % 5000) as usize,
                };
                paths.push(format!("{dir_path}/f{i}"));
                contents.push((0..size).map(|_| next() as u8).collect());
                modes.push(0o400 | (next() as u32 & 0o377));
            }
            let mut entries = Vec::new();
            // Parent directories first, like a real injection.
            let parents: Vec<&str> = dir_path
                .match_indices('/')
                .map(|(i, _)| &dir_path[..i])
                .chain([dir_path.as_str()])
                .collect();
            for p in &parents {
                entries.push(dir(p, 0o755));
            }
            for ((p, c), m) in paths.iter().zip(&contents).zip(&modes) {
                entries.push(file(p, *m, c));
            }
            let archive = match build_tar(&entries) {
                Ok(a) => a,
                Err(ArchiveError::PathTooLong { .. }) => {
                    assert!(entries.iter().any(|e| e.path.len() > NAME_LEN));
                    too_long += 1;
                    continue;
                }
                Err(e) => panic!("round {round}: {e}"),
            };
            let tmp = tempfile::tempdir().expect("tempdir");
            tar(&["--no-same-owner", "-pxf", "-"], tmp.path(), &archive);
            for ((p, c), m) in paths.iter().zip(&contents).zip(&modes) {
                let f = tmp.path().join(p);
                assert_eq!(&std::fs::read(&f).expect("read"), c, "round {round} {p}");
                assert_eq!(mode_of(&f), *m, "round {round} {p}");
            }
            built += 1;
        }
        assert!(
            built >= 10 && too_long >= 1,
            "built {built}, too long {too_long}"
        );
    }
}
