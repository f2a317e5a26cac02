//! The in-container agent, for every backend: the binary this server copies into containers
//! (`agent.binary`: found once at start-up, checked to be a static ELF executable, since it
//! must run in images without a libc or with another one, and held in memory for every
//! injection), and every command line the server runs it with, with what its answers mean.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::process::ControlError;
use super::{signal_number, AgentAt, Container, Terminal};
use crate::auth::metadata::LoginFile;
use crate::config::model::AgentConfig;

/// The file name looked for next to the server's own executable.
pub const AGENT_FILE_NAME: &str = "containerssh-agent";
/// Where an injected agent is mounted read-only into containers (a Docker volume filled once
/// per engine and agent build; a Kubernetes `emptyDir` filled by an init container).
pub const AGENT_DIR: &str = "/.containerssh";
/// The injected agent's path inside containers.
pub const INJECTED_AGENT_PATH: &str = "/.containerssh/containerssh-agent";

/// A larger file is not our agent (it is about 1.5 MiB); refuse rather than hold it.
pub const MAX_AGENT_BINARY_BYTES: u64 = 32 * 1024 * 1024;

/// The agent as checked at start. Its bytes are not kept (1.7 MiB of a server whose whole
/// idle footprint is a few MiB): they are read again from the file opened at start (the
/// same inode, whatever happens to the path since) each time they are needed, and checked
/// against the digest taken then.
#[derive(Clone)]
pub struct AgentBinary {
    pub path: PathBuf,
    file: Arc<std::fs::File>,
    len: usize,
    sha256: [u8; 32],
}

impl std::fmt::Debug for AgentBinary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentBinary")
            .field("path", &self.path)
            .field("len", &self.len)
            .finish()
    }
}

impl AgentBinary {
    /// Its size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never: an empty file is no agent.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The SHA-256 of its bytes, in hex.
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }

    /// Its bytes, read again (blocking: a file read of ~2 MiB), as they were at start.
    pub fn read(&self) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; self.len];
        self.file.read_exact_at(&mut buf, 0)?;
        if sha256(&buf) != self.sha256 {
            return Err(std::io::Error::other(format!(
                "{} changed since the server started (restart the server to inject the new agent)",
                self.path.display()
            )));
        }
        Ok(buf)
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

#[derive(Debug, thiserror::Error)]
pub enum AgentBinaryError {
    #[error("agent.binary {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("agent.binary {path}: larger than {MAX_AGENT_BINARY_BYTES} bytes, not the agent")]
    TooLarge { path: PathBuf },
    #[error("agent.binary {path}: {reason}; build it static (see README: the agent binary)")]
    Unusable { path: PathBuf, reason: &'static str },
}

/// Why an ELF file cannot be injected, or `None` when it is a static 64-bit executable.
pub fn static_elf_problem(bytes: &[u8]) -> Option<&'static str> {
    const PT_INTERP: u32 = 3;
    let header = match bytes.first_chunk::<64>() {
        Some(h) if h.starts_with(b"\x7fELF") => h,
        _ => return Some("not an ELF executable"),
    };
    if header[4] != 2 || header[5] != 1 {
        return Some("not a 64-bit little-endian ELF file");
    }
    let u16_at = |o: usize| -> Option<usize> {
        let b = bytes.get(o..o.checked_add(2)?)?;
        Some(u16::from_le_bytes(b.try_into().ok()?) as usize)
    };
    let u32_at = |o: usize| -> Option<u32> {
        let b = bytes.get(o..o.checked_add(4)?)?;
        Some(u32::from_le_bytes(b.try_into().ok()?))
    };
    let Some(phoff) = bytes
        .get(0x20..0x28)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .and_then(|o| usize::try_from(o).ok())
    else {
        return Some("truncated ELF header");
    };
    let (Some(phentsize), Some(phnum)) = (u16_at(0x36), u16_at(0x38)) else {
        return Some("truncated ELF header");
    };
    for i in 0..phnum {
        let Some(kind) = phoff
            .checked_add(i.saturating_mul(phentsize))
            .and_then(u32_at)
        else {
            return Some("truncated program headers");
        };
        if kind == PT_INTERP {
            return Some("dynamically linked (it names a program interpreter)");
        }
    }
    None
}

fn load(path: &Path) -> Result<AgentBinary, AgentBinaryError> {
    let read = |source| AgentBinaryError::Read {
        path: path.to_path_buf(),
        source,
    };
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(read)?;
    let meta = file.metadata().map_err(read)?;
    if meta.len() > MAX_AGENT_BINARY_BYTES {
        return Err(AgentBinaryError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    let mut bytes = Vec::new();
    (&file)
        .take(MAX_AGENT_BINARY_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read)?;
    if let Some(reason) = static_elf_problem(&bytes) {
        return Err(AgentBinaryError::Unusable {
            path: path.to_path_buf(),
            reason,
        });
    }
    Ok(AgentBinary {
        path: path.to_path_buf(),
        file: Arc::new(file),
        len: bytes.len(),
        sha256: sha256(&bytes),
    })
}

/// The agent to inject: `agent.binary` when set (any problem is fatal), else the static agent
/// next to this executable when there is one. `None`: images must carry the agent themselves.
pub fn locate(cfg: &AgentConfig) -> Result<Option<AgentBinary>, AgentBinaryError> {
    if !cfg.inject {
        return Ok(None);
    }
    if !cfg.binary.is_empty() {
        return load(Path::new(&cfg.binary)).map(Some);
    }
    let Some(candidate) = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join(AGENT_FILE_NAME)))
    else {
        return Ok(None);
    };
    if !candidate.exists() {
        tracing::info!(code = "BACKEND_AGENT_NOT_FOUND", looked_at = %candidate.display(), "no agent to inject: images must carry it at docker.execution.agentPath");
        return Ok(None);
    }
    match load(&candidate) {
        Ok(a) => Ok(Some(a)),
        Err(e) => {
            tracing::warn!(code = "BACKEND_AGENT_UNUSABLE", error = %e, "not injecting this agent: images must carry it at docker.execution.agentPath");
            Ok(None)
        }
    }
}

/// The agent's `console` in front of a program: it reports the program's PID first on stdout,
/// sizes the terminal before the program starts, and (`env`: exec APIs without an environment
/// of their own) sets variables. An image's own agent (`ours: false`), which may be
/// ContainerSSH's, gets `--pid` only. `wait`: the program starts on the first byte of stdin
/// (session mode on Kubernetes: attached before it runs).
pub fn console_argv(
    agent: &AgentAt,
    tty: Option<&Terminal>,
    env: &[String],
    wait: bool,
    program: Vec<String>,
) -> Vec<String> {
    let mut argv: Vec<String> = vec![agent.path.clone(), "console".into(), "--pid".into()];
    if wait {
        argv.push("--wait".into());
    }
    if agent.ours {
        if let Some((rows, cols)) = tty.and_then(|t| t.size()) {
            let dim = |v: u32| u16::try_from(v).unwrap_or(u16::MAX).to_string();
            argv.extend(["--rows".into(), dim(rows), "--cols".into(), dim(cols)]);
        }
        for e in env {
            argv.extend(["--env".into(), e.clone()]);
        }
    }
    argv.push("--".into());
    argv.extend(program);
    argv
}

/// `write-file` for `path` with `mode` and `size` bytes on stdin. Ours takes `--mode` and
/// `--size` (with `--size` a cut-off upload leaves the file untouched, and no stdin EOF is
/// needed, which Kubernetes' v4 exec cannot send); ContainerSSH's agent has neither.
pub fn write_file_argv(agent: &AgentAt, path: &str, mode: u32, size: usize) -> Vec<String> {
    let mut argv = vec![agent.path.clone(), "write-file".into(), path.to_string()];
    if agent.ours {
        argv.extend([
            "--mode".into(),
            format!("{mode:o}"),
            "--size".into(),
            size.to_string(),
        ]);
    }
    argv
}

/// Why a file could not be written into a container.
#[derive(Debug, thiserror::Error)]
pub enum WriteFileError {
    #[error("writing files needs the in-container agent")]
    NoAgent,
    #[error("cannot write {path}")]
    Backend {
        path: String,
        #[source]
        source: super::Cause,
    },
    #[error("cannot write {path}: {message}")]
    Agent { path: String, message: String },
}

/// Writes one file into a running container through its agent, as the container's user.
pub async fn write_file(
    container: &dyn Container,
    path: &str,
    mode: u32,
    data: &[u8],
) -> Result<(), WriteFileError> {
    let Some(agent) = container.agent() else {
        return Err(WriteFileError::NoAgent);
    };
    let argv = write_file_argv(agent, path, mode, data.len());
    let out = container
        .capture(argv, Some(data))
        .await
        .map_err(|source| WriteFileError::Backend {
            path: path.to_owned(),
            source,
        })?;
    if out.code != 0 {
        return Err(WriteFileError::Agent {
            path: path.to_owned(),
            message: out.message(),
        });
    }
    Ok(())
}

/// Writes the login's files into a running container; failures are logged, as in ContainerSSH.
pub async fn write_login_files(container: &dyn Container, files: &[LoginFile]) {
    for f in files {
        if let Err(e) = write_file(container, &f.path, f.mode, &f.data).await {
            tracing::warn!(code = "BACKEND_LOGIN_FILE_FAILED", container = container.name(), path = %f.path, error = %super::one_line(&e), "cannot write a login file into the container");
        }
    }
}

/// Sends `name` to the program the agent started as `pid`.
pub async fn signal(container: &dyn Container, pid: u32, name: &str) -> Result<(), ControlError> {
    let Some(agent) = container.agent() else {
        return Err(ControlError::Agent("no agent in the container".into()));
    };
    let argv = [
        &agent.path,
        "signal",
        "--pid",
        &pid.to_string(),
        "--signal",
        name,
    ]
    .map(String::from)
    .to_vec();
    let out = container
        .capture(argv, None)
        .await
        .map_err(ControlError::Backend)?;
    if out.code != 0 {
        return Err(ControlError::Agent(out.message()));
    }
    Ok(())
}

/// The signal the program the agent started as `pid` died of, when it did (the agent's
/// exit record); `None` when it exited, or the agent cannot tell.
pub async fn exit_signal(container: &dyn Container, pid: u32) -> Option<String> {
    let agent = container.agent()?;
    let argv = [&agent.path, "exit-info", "--pid", &pid.to_string()]
        .map(String::from)
        .to_vec();
    match container.capture(argv, None).await {
        Ok(out) if out.code == 0 => {
            let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
            signal_number(&name).map(|_| name)
        }
        Ok(out) => {
            tracing::debug!(message = %out.message(), "agent exit-info failed");
            None
        }
        Err(e) => {
            tracing::debug!(error = %e, "agent exit-info failed");
            None
        }
    }
}

/// The agent's command line for a long-running subcommand (`forward-server`).
pub fn command_argv(agent: &AgentAt, args: &[&str]) -> Vec<String> {
    let mut argv = vec![agent.path.clone()];
    argv.extend(args.iter().map(|a| a.to_string()));
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_for_our_agent_and_an_images_own() {
        let ours = AgentAt {
            path: "/a".into(),
            ours: true,
        };
        let theirs = AgentAt {
            path: "/b".into(),
            ours: false,
        };
        let tty = Terminal {
            term: "xterm".into(),
            cols: 80,
            rows: 24,
        };
        assert_eq!(
            console_argv(&ours, Some(&tty), &["A=1".into()], true, vec!["sh".into()]),
            [
                "/a", "console", "--pid", "--wait", "--rows", "24", "--cols", "80", "--env", "A=1",
                "--", "sh"
            ]
        );
        assert_eq!(
            console_argv(
                &theirs,
                Some(&tty),
                &["A=1".into()],
                false,
                vec!["sh".into()]
            ),
            ["/b", "console", "--pid", "--", "sh"]
        );
        assert_eq!(
            write_file_argv(&ours, "/f", 0o600, 5),
            ["/a", "write-file", "/f", "--mode", "600", "--size", "5"]
        );
        assert_eq!(
            write_file_argv(&theirs, "/f", 0o600, 5),
            ["/b", "write-file", "/f"]
        );
    }

    #[test]
    fn this_test_binary_is_dynamic_and_garbage_is_not_elf() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        // Test binaries link the system libc dynamically.
        assert_eq!(
            static_elf_problem(&me),
            Some("dynamically linked (it names a program interpreter)")
        );
        assert_eq!(
            static_elf_problem(b"#!/bin/sh\n"),
            Some("not an ELF executable")
        );
        let mut truncated = me[..64].to_vec();
        truncated[0x20..0x28].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(
            static_elf_problem(&truncated),
            Some("truncated program headers")
        );
    }

    #[test]
    fn an_explicit_unusable_binary_is_an_error() {
        // The system's own `true` is a small dynamically linked executable.
        let cfg = AgentConfig {
            binary: "/bin/true".into(),
            ..AgentConfig::default()
        };
        let err = locate(&cfg).unwrap_err().to_string();
        assert!(err.contains("dynamically linked"), "{err}");
        let off = AgentConfig {
            inject: false,
            ..cfg
        };
        assert!(locate(&off).unwrap().is_none());
    }
}
