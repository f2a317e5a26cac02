//! Configuration: the ContainerSSH-compatible file model ([`model`]), loading with precise
//! errors ([`load`]), defaults ([`defaults`]) and validation into checked [`Settings`].

pub mod defaults;
pub mod duration;
pub mod load;
pub mod merge;
pub mod model;
pub mod size;
pub mod validate;

use std::path::Path;

pub use load::{ConfigError, KeyError};
pub use model::AppConfig;
pub use validate::Settings;

/// Reads, parses and validates a config file.
pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
    let raw = load::load_file(path)?;
    validate::validate(&path.display().to_string(), raw)
}

/// The raw model used when no config file is given: loopback only, the invoking user's own
/// `~/.ssh/authorized_keys` for any user name, the local engine and ContainerSSH's guest image.
pub fn embedded_default() -> AppConfig {
    let mut cfg = AppConfig::default();
    cfg.ssh.listen = "127.0.0.1:2222".into();
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    cfg.auth.public_key.method = "authorizedKeys".into();
    // No `%u`: every user name maps to the operator's own keys.
    cfg.auth.public_key.authorized_keys.path = format!("{home}/.ssh/authorized_keys");
    // A developer default on loopback that reads the invoking user's own keys: started as root,
    // it serves as root (capabilities dropped, logged as a warning) rather than refusing.
    cfg.sandbox.allow_root = true;
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_validates_on_loopback() {
        let s = validate::validate("(embedded)", embedded_default()).unwrap();
        assert!(s.ssh.listen.ip().is_loopback());
        assert_eq!(s.ssh.listen.port(), 2222);
        assert!(s
            .authorized_keys
            .unwrap()
            .ends_with("/.ssh/authorized_keys"));
    }
}
