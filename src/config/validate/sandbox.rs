//! `sandbox`: what can be checked without knowing who starts the server.

use super::invalid;
use crate::config::model::SandboxConfig;
use crate::config::ConfigError;

/// `sandbox`: what can be checked without knowing who starts us (the rest is
/// `sandbox::enter`'s, at start-up).
pub(super) fn check(file: &str, s: SandboxConfig) -> Result<SandboxConfig, ConfigError> {
    if s.user == Some(0) {
        return Err(invalid(
            file,
            "sandbox.user",
            "0 is root: leave it unset and set sandbox.allowRoot: true to serve as root",
        ));
    }
    if s.group == Some(0) {
        return Err(invalid(file, "sandbox.group", "0 is root's group"));
    }
    if s.group.is_some() && s.user.is_none() {
        return Err(invalid(file, "sandbox.group", "needs sandbox.user"));
    }
    if s.supplementary_groups.len() > crate::limits::MAX_SUPPLEMENTARY_GROUPS {
        return Err(invalid(
            file,
            "sandbox.supplementaryGroups",
            format!("at most {} groups", crate::limits::MAX_SUPPLEMENTARY_GROUPS),
        ));
    }
    if s.allow_root && s.user.is_some() {
        return Err(invalid(
            file,
            "sandbox.allowRoot",
            "conflicts with sandbox.user (which drops root)",
        ));
    }
    Ok(s)
}
