//! The agent binary this server copies into containers (`agent.binary`): found once at
//! start-up, checked to be a static ELF executable (it must run in images without a libc, or
//! with a different one), and held in memory for every injection.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::model::AgentConfig;

/// The file name looked for next to the server's own executable.
pub const AGENT_FILE_NAME: &str = "containerssh-agent";

/// A larger file is not our agent (it is about 1.5 MiB); refuse rather than hold it.
pub const MAX_AGENT_BINARY_BYTES: u64 = 32 * 1024 * 1024;

/// The agent as loaded.
#[derive(Clone)]
pub struct AgentBinary {
    pub path: PathBuf,
    pub bytes: Arc<[u8]>,
}

impl std::fmt::Debug for AgentBinary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentBinary")
            .field("path", &self.path)
            .field("len", &self.bytes.len())
            .finish()
    }
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
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return Some("not an ELF executable");
    }
    if bytes[4] != 2 || bytes[5] != 1 {
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
    let meta = std::fs::metadata(path).map_err(read)?;
    if meta.len() > MAX_AGENT_BINARY_BYTES {
        return Err(AgentBinaryError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    let bytes = std::fs::read(path).map_err(read)?;
    if let Some(reason) = static_elf_problem(&bytes) {
        return Err(AgentBinaryError::Unusable {
            path: path.to_path_buf(),
            reason,
        });
    }
    Ok(AgentBinary {
        path: path.to_path_buf(),
        bytes: bytes.into(),
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
        tracing::info!(looked_at = %candidate.display(), "no agent to inject: images must carry it at docker.execution.agentPath");
        return Ok(None);
    }
    match load(&candidate) {
        Ok(a) => Ok(Some(a)),
        Err(e) => {
            tracing::warn!(error = %e, "not injecting this agent: images must carry it at docker.execution.agentPath");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            inject: true,
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
