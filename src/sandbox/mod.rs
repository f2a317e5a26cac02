//! The server's confinement, entered once at start-up after binding and reading keys and before
//! the async runtime exists (architecture.md, "Start-up order"):
//!
//! 1. [`close_inherited_fds`] and [`return_large_allocations`] first thing in `main`;
//! 2. [`enter`]: sanitize the environment, drop to `sandbox.user`/`group`/`supplementaryGroups`
//!    (verified: root cannot be regained), clear every capability set and the bounding set,
//!    `PR_SET_NO_NEW_PRIVS`, then the seccomp allow-list ([`seccomp`]) on every thread.
//!
//! This is the only module with `unsafe`; every block says why it holds. Everything fails
//! closed: a step that cannot be done aborts start-up unless the configuration switched it off.

mod memory;
mod privileges;
pub mod seccomp;

use std::fmt;

use crate::config::model::{SandboxConfig, SeccompMode};

pub use memory::return_large_allocations;
pub use privileges::close_inherited_fds;

/// The environment variables the server still reads after start-up (a per-login backend built
/// for a config webhook's answer resolves its Kubernetes connection, and the state directory
/// default, then). Everything else — including secrets an init system passed along — is removed
/// before serving.
pub const KEPT_ENV: [&str; 6] = [
    "HOME",
    "XDG_STATE_HOME",
    "KUBECONFIG",
    "KUBERNETES_SERVICE_HOST",
    "KUBERNETES_SERVICE_PORT",
    "TZ",
];

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(
        "started as root without sandbox.user: set sandbox.user (and sandbox.supplementaryGroups \
         with the Docker socket's group) to the uid to serve as, or sandbox.allowRoot: true to \
         serve as root (not recommended)"
    )]
    RootRefused,
    #[error("{key}: started as {current}, which cannot switch to {wanted} (only root can)")]
    CannotSwitch {
        key: &'static str,
        current: String,
        wanted: String,
    },
    #[error(
        "the sandbox must be entered before any other thread exists ({0} threads are running)"
    )]
    Threads(usize),
    #[error("{step}: {source}")]
    Step {
        step: &'static str,
        source: std::io::Error,
    },
    #[error("{0}")]
    Verify(String),
    #[error("seccomp filter: {0}")]
    Seccomp(String),
}

pub(crate) fn step(step: &'static str) -> impl FnOnce(std::io::Error) -> SandboxError {
    move |source| SandboxError::Step { step, source }
}

/// What [`enter`] did, for the start-up log line.
#[derive(Debug)]
pub struct Report {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// The ids changed (started as root with `sandbox.user`).
    pub dropped: bool,
    /// Serving as uid 0 because `sandbox.allowRoot` said so.
    pub as_root: bool,
    pub seccomp: SeccompMode,
    pub env_removed: usize,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "uid {} gid {} groups {:?}, no capabilities, no_new_privs, seccomp {}",
            self.uid,
            self.gid,
            self.groups,
            match self.seccomp {
                SeccompMode::Enforce => "enforced",
                SeccompMode::Log => "logging only",
                SeccompMode::Off => "off",
            }
        )
    }
}

/// Confines the process. Call once, after every privileged act (binding, reading host keys and
/// TLS material) and before any thread is started.
/// `writable_dirs`: directories (opened before) where files may be created afterwards (the
/// audit recordings); every other open is read-only once the filter is on.
pub fn enter(
    cfg: &SandboxConfig,
    writable_dirs: &[std::os::fd::BorrowedFd<'_>],
) -> Result<Report, SandboxError> {
    let threads = privileges::thread_count().map_err(step("reading /proc/self/status"))?;
    if threads != 1 {
        return Err(SandboxError::Threads(threads));
    }
    let env_removed = sanitize_env();
    let ids = privileges::Ids::current().map_err(step("reading the process's ids"))?;
    let mut report = Report {
        uid: ids.uid,
        gid: ids.gid,
        groups: ids.groups.clone(),
        dropped: false,
        as_root: false,
        seccomp: cfg.seccomp,
        env_removed,
    };
    if ids.is_root() {
        // Only root (CAP_SETPCAP) may shrink the bounding set, so it goes first.
        privileges::drop_bounding_set()?;
        match cfg.user {
            Some(uid) => {
                let gid = cfg.group.unwrap_or(uid);
                privileges::switch(uid, gid, &cfg.supplementary_groups)?;
                report.dropped = true;
            }
            None if cfg.allow_root => report.as_root = true,
            None => return Err(SandboxError::RootRefused),
        }
    } else {
        check_unprivileged(cfg, &ids)?;
        // Without CAP_SETPCAP the bounding set cannot shrink; no_new_privs below keeps any
        // capability in it from ever being gained (no set-id or file-capability exec).
        privileges::drop_bounding_set_if_permitted();
    }
    privileges::clear_capabilities()?;
    privileges::set_no_new_privs()?;
    let now = privileges::Ids::current().map_err(step("reading the process's ids"))?;
    report.uid = now.uid;
    report.gid = now.gid;
    report.groups = now.groups.clone();
    if report.dropped {
        privileges::verify_dropped(&now)?;
    }
    match cfg.seccomp {
        SeccompMode::Off => {}
        mode => {
            use std::os::fd::AsRawFd;
            let dirs: Vec<u32> = writable_dirs
                .iter()
                .filter_map(|d| u32::try_from(d.as_raw_fd()).ok())
                .collect();
            seccomp::install(mode, &dirs)?
        }
    }
    Ok(report)
}

/// Started without root: the configured ids must be the ones we already have.
fn check_unprivileged(cfg: &SandboxConfig, ids: &privileges::Ids) -> Result<(), SandboxError> {
    let current = || format!("uid {} gid {} groups {:?}", ids.uid, ids.gid, ids.groups);
    if let Some(u) = cfg.user.filter(|u| *u != ids.uid) {
        return Err(SandboxError::CannotSwitch {
            key: "sandbox.user",
            current: current(),
            wanted: format!("uid {u}"),
        });
    }
    if let Some(g) = cfg.group.or(cfg.user).filter(|g| *g != ids.gid) {
        return Err(SandboxError::CannotSwitch {
            key: "sandbox.group",
            current: current(),
            wanted: format!("gid {g}"),
        });
    }
    if let Some(g) = cfg
        .supplementary_groups
        .iter()
        .find(|g| !ids.groups.contains(g) && **g != ids.gid)
    {
        return Err(SandboxError::CannotSwitch {
            key: "sandbox.supplementaryGroups",
            current: current(),
            wanted: format!("group {g}"),
        });
    }
    Ok(())
}

/// Removes every environment variable but [`KEPT_ENV`]. Returns how many went.
///
/// `enter` calls this only after checking that no other thread exists, which is what makes
/// changing the environment sound.
fn sanitize_env() -> usize {
    let doomed: Vec<_> = std::env::vars_os()
        .map(|(k, _)| k)
        .filter(|k| !KEPT_ENV.iter().any(|kept| k == kept))
        .collect();
    for k in &doomed {
        std::env::remove_var(k);
    }
    doomed.len()
}
