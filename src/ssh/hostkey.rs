//! Host keys: read from OpenSSH key files (or inline PEM, as ContainerSSH allows), or generated
//! once into the state directory and reused, so clients see a stable identity.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use russh::keys::ssh_key::private::Ed25519Keypair;
use russh::keys::ssh_key::LineEnding;
use russh::keys::{Algorithm, HashAlg, PrivateKey};

/// Name of the generated key inside the state directory (OpenSSH's naming).
pub const GENERATED_KEY_FILE: &str = "ssh_host_ed25519_key";

#[derive(Debug, thiserror::Error)]
pub enum HostKeyError {
    #[error("cannot read host key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("host key {path} is not an OpenSSH private key: {source}")]
    Parse {
        path: String,
        source: russh::keys::ssh_key::Error,
    },
    #[error("host key {path} is encrypted; host keys must be stored without a passphrase")]
    Encrypted { path: String },
    #[error("host key {path} is {algorithm}: only ed25519 and ecdsa host keys are served (RSA signing is exposed to RUSTSEC-2023-0071)")]
    Unsupported { path: String, algorithm: String },
    #[error("cannot create state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write generated host key {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot generate host key: {0}")]
    Generate(String),
}

fn parse(label: &str, pem: &str) -> Result<PrivateKey, HostKeyError> {
    let key = PrivateKey::from_openssh(pem).map_err(|source| HostKeyError::Parse {
        path: label.into(),
        source,
    })?;
    if key.is_encrypted() {
        return Err(HostKeyError::Encrypted { path: label.into() });
    }
    match key.algorithm() {
        Algorithm::Ed25519 | Algorithm::Ecdsa { .. } => Ok(key),
        other => Err(HostKeyError::Unsupported {
            path: label.into(),
            algorithm: other.to_string(),
        }),
    }
}

/// Loads configured keys: each entry is a file path or inline PEM text.
pub fn load(entries: &[String]) -> Result<Vec<PrivateKey>, HostKeyError> {
    entries
        .iter()
        .map(|e| {
            if e.contains("-----BEGIN") {
                parse("(inline key)", e)
            } else {
                let text = std::fs::read_to_string(e).map_err(|source| HostKeyError::Read {
                    path: e.clone(),
                    source,
                })?;
                parse(e, &text)
            }
        })
        .collect()
}

/// Returns the key in `dir`, generating it first if it does not exist yet. The file is created
/// with mode 0600 and O_EXCL, so a concurrent start never sees half a key.
pub fn load_or_generate(dir: &Path) -> Result<PrivateKey, HostKeyError> {
    let path = dir.join(GENERATED_KEY_FILE);
    if path.exists() {
        return load(&[path.display().to_string()]).map(|mut v| v.remove(0));
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| HostKeyError::StateDir {
            path: dir.to_owned(),
            source,
        })?;
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| HostKeyError::Generate(e.to_string()))?;
    let key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    seed.fill(0);
    let pem = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| HostKeyError::Generate(e.to_string()))?;
    let tmp = dir.join(format!("{GENERATED_KEY_FILE}.{}.tmp", std::process::id()));
    let write = |p: &Path| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(p)?;
        f.write_all(pem.as_bytes())?;
        f.sync_all()
    };
    write(&tmp).map_err(|source| HostKeyError::Write {
        path: tmp.clone(),
        source,
    })?;
    // hard_link fails if another process won the race; then theirs is the key.
    let linked = std::fs::hard_link(&tmp, &path);
    let _ = std::fs::remove_file(&tmp);
    if linked.is_err() {
        return load(&[path.display().to_string()]).map(|mut v| v.remove(0));
    }
    tracing::info!(
        code = "SSH_HOST_KEY_GENERATED",
        path = %path.display(),
        fingerprint = %key.public_key().fingerprint(HashAlg::Sha256),
        "generated a new host key"
    );
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn generates_once_with_mode_0600_and_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        let a = load_or_generate(&state).unwrap();
        let b = load_or_generate(&state).unwrap();
        assert_eq!(a.public_key(), b.public_key());
        let mode = std::fs::metadata(state.join(GENERATED_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn rsa_host_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("rsa");
        let st = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "rsa", "-b", "2048", "-N", "", "-f"])
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success());
        let err = load(&[p.display().to_string()]).unwrap_err().to_string();
        assert!(err.contains("only ed25519 and ecdsa"), "{err}");
    }

    #[test]
    fn ecdsa_key_files_load() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ec");
        let st = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ecdsa", "-N", "", "-f"])
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(load(&[p.display().to_string()]).unwrap().len(), 1);
    }
}
