//! Identity and capabilities: inherited fds, the uid/gid/groups switch and its verification, the
//! capability sets, the bounding set and no_new_privs. Ids are read back from
//! `/proc/self/status`, the same place an operator checks them.

use std::io;

use rustix::thread::{CapabilitySet, CapabilitySets};

use super::{step, SandboxError};

/// Closes every file descriptor above stderr. Call first thing in `main`: at that point nothing
/// in this process owns a descriptor ≥ 3, so whatever is open was inherited (a leaked socket or
/// file of whoever started us) and must not reach the sessions we serve.
pub fn close_inherited_fds() -> io::Result<()> {
    // SAFETY: close_range only closes descriptors; it is called before this process has opened
    // any (see above), so no Rust object's descriptor is closed under it.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The process's ids as the kernel reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ids {
    /// Effective uid and gid.
    pub uid: u32,
    pub gid: u32,
    /// Real, effective, saved and filesystem ids.
    pub uids: [u32; 4],
    pub gids: [u32; 4],
    pub groups: Vec<u32>,
}

impl Ids {
    pub fn current() -> io::Result<Ids> {
        parse_status(&std::fs::read_to_string("/proc/self/status")?)
            .ok_or_else(|| io::Error::other("/proc/self/status has no Uid/Gid/Groups lines"))
    }

    pub fn is_root(&self) -> bool {
        self.uids.contains(&0)
    }
}

fn parse_status(status: &str) -> Option<Ids> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|rest| {
                rest.split_whitespace()
                    .map(str::parse::<u32>)
                    .collect::<Result<Vec<_>, _>>()
            })
    };
    let four = |v: Vec<u32>| <[u32; 4]>::try_from(v).ok();
    let uids = four(field("Uid:")?.ok()?)?;
    let gids = four(field("Gid:")?.ok()?)?;
    let groups = field("Groups:")?.ok()?;
    Some(Ids {
        uid: uids[1],
        gid: gids[1],
        uids,
        gids,
        groups,
    })
}

pub fn thread_count() -> io::Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| io::Error::other("/proc/self/status has no Threads line"))
}

fn last_cap() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(40)
        .min(63)
}

fn bounding_set_caps() -> impl Iterator<Item = CapabilitySet> {
    (0..=last_cap()).map(|n| CapabilitySet::from_bits_retain(1 << n))
}

/// Empties the bounding set, so that no capability can come back through an exec of a
/// privileged file. Needs CAP_SETPCAP, i.e. runs while still root.
pub fn drop_bounding_set() -> Result<(), SandboxError> {
    for cap in bounding_set_caps() {
        rustix::thread::remove_capability_from_bounding_set(cap)
            .map_err(|e| step("emptying the capability bounding set")(e.into()))?;
    }
    Ok(())
}

/// As [`drop_bounding_set`] for a process that may lack CAP_SETPCAP.
pub fn drop_bounding_set_if_permitted() {
    for cap in bounding_set_caps() {
        if rustix::thread::remove_capability_from_bounding_set(cap).is_err() {
            return;
        }
    }
}

/// setgroups → setgid → setuid, all three ids of each kind, process-wide.
pub fn switch(uid: u32, gid: u32, groups: &[u32]) -> Result<(), SandboxError> {
    let groups: Vec<libc::gid_t> = groups.to_vec();
    // SAFETY: the pointer and length describe `groups`, which outlives the call; glibc's
    // setgroups applies to every thread (and `enter` checked that there is only one).
    let rc = unsafe { libc::setgroups(groups.len(), groups.as_ptr()) };
    check(rc, "setgroups")?;
    // SAFETY: plain integer arguments; glibc applies the change to every thread.
    let rc = unsafe { libc::setresgid(gid, gid, gid) };
    check(rc, "setresgid")?;
    // SAFETY: plain integer arguments; glibc applies the change to every thread. After this the
    // process has no capabilities left to undo it (verified by `verify_dropped`).
    let rc = unsafe { libc::setresuid(uid, uid, uid) };
    check(rc, "setresuid")
}

fn check(rc: libc::c_int, what: &'static str) -> Result<(), SandboxError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(step(what)(io::Error::last_os_error()))
    }
}

/// After [`switch`]: every id is the new one, and root's cannot be taken back.
pub fn verify_dropped(now: &Ids) -> Result<(), SandboxError> {
    if now.uids.iter().any(|u| *u != now.uid) || now.gids.iter().any(|g| *g != now.gid) {
        return Err(SandboxError::Verify(format!(
            "ids after the drop are mixed: uid {:?} gid {:?}",
            now.uids, now.gids
        )));
    }
    // SAFETY: plain integer argument; expected to fail with EPERM, which is the point.
    if unsafe { libc::setuid(0) } == 0 {
        return Err(SandboxError::Verify(
            "setuid(0) succeeded after the drop".into(),
        ));
    }
    // SAFETY: as above.
    if unsafe { libc::setgid(0) } == 0 {
        return Err(SandboxError::Verify(
            "setgid(0) succeeded after the drop".into(),
        ));
    }
    Ok(())
}

/// Effective, permitted, inheritable and ambient sets emptied, then read back.
pub fn clear_capabilities() -> Result<(), SandboxError> {
    let none = CapabilitySets {
        effective: CapabilitySet::empty(),
        permitted: CapabilitySet::empty(),
        inheritable: CapabilitySet::empty(),
    };
    rustix::thread::set_capabilities(None, none)
        .map_err(|e| step("clearing the capability sets")(e.into()))?;
    // Ambient capabilities need Linux 4.3; an older kernel has none to clear.
    match rustix::thread::clear_ambient_capability_set() {
        Ok(()) | Err(rustix::io::Errno::INVAL) => {}
        Err(e) => return Err(step("clearing the ambient capability set")(e.into())),
    }
    let got = rustix::thread::capabilities(None)
        .map_err(|e| step("reading the capability sets")(e.into()))?;
    if !(got.effective.is_empty() && got.permitted.is_empty() && got.inheritable.is_empty()) {
        return Err(SandboxError::Verify(format!(
            "capabilities remain after clearing: {got:?}"
        )));
    }
    Ok(())
}

pub fn set_no_new_privs() -> Result<(), SandboxError> {
    rustix::thread::set_no_new_privs(true).map_err(|e| step("PR_SET_NO_NEW_PRIVS")(e.into()))?;
    match rustix::thread::no_new_privs() {
        Ok(true) => Ok(()),
        Ok(false) => Err(SandboxError::Verify("no_new_privs did not stick".into())),
        Err(e) => Err(step("PR_GET_NO_NEW_PRIVS")(e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_ids_parse() {
        let s = "Name:\tx\nUid:\t0\t1\t2\t3\nGid:\t4\t5\t6\t7\nGroups:\t998 27 \nThreads:\t1\n";
        let ids = parse_status(s).unwrap();
        assert_eq!(ids.uid, 1);
        assert_eq!(ids.gid, 5);
        assert_eq!(ids.uids, [0, 1, 2, 3]);
        assert_eq!(ids.groups, vec![998, 27]);
        assert!(ids.is_root());
        let none = "Uid:\t5\t5\t5\t5\nGid:\t5\t5\t5\t5\nGroups:\n";
        let ids = parse_status(none).unwrap();
        assert!(ids.groups.is_empty());
        assert!(!ids.is_root());
        assert!(parse_status("Uid:\t1\t2\nGid:\t1\t1\t1\t1\nGroups:\n").is_none());
    }
}
