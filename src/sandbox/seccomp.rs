//! The system-call allow-lists, as commented data, and their installation on every thread.
//!
//! Two filters are installed, both with TSYNC (every existing thread; threads started later
//! inherit them):
//! 1. `clone3` → `ENOSYS`, so glibc falls back to `clone`, whose flags a filter can read
//!    (`clone3` passes them in memory);
//! 2. the allow-list: anything else kills the process (`enforce`) or is logged by the kernel as
//!    audit type 1326 and allowed (`log`).
//!
//! The kernel applies the strictest answer of all filters, so `clone3` is on the allow-list too
//! and the first filter's `ENOSYS` wins.
//!
//! **Maintaining the lists** (SECURITY.md has the procedure): run the test suite with the server
//! under `strace -f -c` (or with `sandbox.seccomp: log` and read `dmesg` for `type=1326`), add
//! what a code path needs with the path named, and keep arguments filtered where the kernel
//! lets a filter see them. Argument compares are 32-bit (`Dword`) where the kernel's argument is
//! an `int`, so a caller's garbage in the upper half cannot slip past.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use libc::*;

use super::SandboxError;
use crate::config::model::SeccompMode;

/// What a system call's arguments must be for it to be allowed.
#[derive(Debug, Clone, Copy)]
pub enum Args {
    Any,
    /// The argument at this index (its low 32 bits) is one of these values.
    OneOf(u8, &'static [u32]),
    /// `(argument & mask) == value`, on the low 32 bits.
    Masked(u8, u32, u32),
}

/// One allowed system call and the code path that needs it.
#[derive(Debug, Clone, Copy)]
pub struct Allowed {
    pub nr: libc::c_long,
    pub args: Args,
    pub why: &'static str,
}

const fn any(nr: libc::c_long, why: &'static str) -> Allowed {
    Allowed {
        nr,
        args: Args::Any,
        why,
    }
}

const fn with(nr: libc::c_long, args: Args, why: &'static str) -> Allowed {
    Allowed { nr, args, why }
}

/// Socket families the server opens: the Docker socket (unix), TCP to Kubernetes, webhooks and
/// engines over TCP, and UDP to the resolver when a URL names a host.
const SOCKET_FAMILIES: &[u32] = &[AF_UNIX as u32, AF_INET as u32, AF_INET6 as u32];

/// `ioctl` requests: non-blocking and close-on-exec flags (std, mio), and the size of a pending
/// datagram (glibc's resolver, before reading a DNS answer).
const IOCTLS: &[u32] = &[FIONBIO as u32, FIOCLEX as u32, FIONREAD as u32];

/// `openat` flags that would write: any access mode but `O_RDONLY`, creating, truncating.
const OPEN_WRITE_FLAGS: u32 = (O_ACCMODE | O_CREAT | O_TRUNC) as u32;

/// `fcntl` commands: descriptor and status flags (std, mio, tokio).
const FCNTLS: &[u32] = &[
    F_GETFD as u32,
    F_SETFD as u32,
    F_GETFL as u32,
    F_SETFL as u32,
    F_DUPFD_CLOEXEC as u32,
];

/// `prctl` options: thread names (std's thread builder, tokio's `thread_name`), and the naming of
/// anonymous mappings newer glibc does for thread stacks (`PR_SET_VMA`).
const PRCTLS: &[u32] = &[PR_SET_NAME as u32, PR_GET_NAME as u32, 0x5356_4d41];

/// What any of our threaded programs needs once running (the server's tokio runtime, the agent's
/// forwarding threads): memory, threads, signals, clocks and descriptors.
pub const RUNTIME: &[Allowed] = &[
    // Memory.
    any(SYS_brk, "malloc"),
    any(SYS_mmap, "malloc, thread stacks"),
    any(SYS_munmap, "free, thread exit"),
    any(SYS_mremap, "realloc of large buffers"),
    any(SYS_mprotect, "thread-stack guard pages"),
    any(SYS_madvise, "malloc returning memory"),
    // Threads and scheduling.
    with(
        SYS_clone,
        Args::Masked(0, CLONE_THREAD as u32, CLONE_THREAD as u32),
        "threads only: a clone without CLONE_THREAD is a fork",
    ),
    any(
        SYS_clone3,
        "answered ENOSYS by the first filter, so glibc uses clone",
    ),
    any(SYS_futex, "locks, condition variables, thread join"),
    any(SYS_set_robust_list, "new threads (glibc)"),
    any(SYS_rseq, "new threads (glibc)"),
    any(SYS_sched_yield, "spin loops in locks and channels"),
    any(SYS_sched_getaffinity, "std::thread::available_parallelism"),
    any(SYS_exit, "thread exit"),
    any(SYS_exit_group, "process exit"),
    any(SYS_gettid, "thread ids (glibc)"),
    any(SYS_getpid, "glibc"),
    with(SYS_prctl, Args::OneOf(0, PRCTLS), "thread names"),
    // Signals.
    any(SYS_rt_sigaction, "signal handlers"),
    any(SYS_rt_sigprocmask, "glibc around thread creation"),
    any(SYS_rt_sigreturn, "return from a signal handler"),
    any(
        SYS_sigaltstack,
        "std's stack-overflow handler on new threads",
    ),
    any(
        SYS_tgkill,
        "abort() after a double panic (SIGABRT to ourselves)",
    ),
    // Time.
    any(
        SYS_clock_gettime,
        "Instant::now when the vDSO cannot answer",
    ),
    any(SYS_clock_nanosleep, "std::thread::sleep"),
    any(SYS_nanosleep, "std::thread::sleep"),
    any(
        SYS_restart_syscall,
        "the kernel restarting an interrupted sleep",
    ),
    // Descriptors and files.
    any(SYS_read, "sockets, files, pipes"),
    any(SYS_write, "sockets, logs, pipes"),
    any(SYS_readv, "sockets"),
    any(SYS_writev, "sockets, logs"),
    any(SYS_pread64, "file reads"),
    any(SYS_close, "sockets, files"),
    with(
        SYS_openat,
        Args::Masked(2, OPEN_WRITE_FLAGS, 0),
        "read-only opens: authorized_keys, password, token and CA files re-read per login; \
         glibc's resolver reading /etc/hosts and /etc/resolv.conf. Nothing is opened for \
         writing after start-up (the host key is generated and the janitor's ledger opened \
         before the sandbox)",
    ),
    any(SYS_fstat, "file reads (std)"),
    any(SYS_newfstatat, "file metadata (std)"),
    any(SYS_statx, "file metadata (std)"),
    any(SYS_lseek, "file reads; the server's ledger rewrite"),
    any(
        SYS_getdents64,
        "directory listing (cgroup and /proc reads by std)",
    ),
    any(SYS_getrandom, "keys, nonces, hash seeds"),
    with(
        SYS_ioctl,
        Args::OneOf(1, IOCTLS),
        "non-blocking and close-on-exec flags",
    ),
    with(SYS_fcntl, Args::OneOf(1, FCNTLS), "descriptor flags"),
    any(SYS_ppoll, "glibc's resolver"),
    #[cfg(target_arch = "x86_64")]
    any(SYS_poll, "glibc's resolver"),
    // Sockets, both directions; what may be *created* is each program's own list.
    any(SYS_connect, "outgoing connections, the resolver"),
    any(SYS_shutdown, "half-closing streams"),
    any(SYS_getsockname, "local addresses"),
    any(SYS_getpeername, "peer addresses"),
    any(SYS_setsockopt, "TCP_NODELAY, keepalive"),
    any(SYS_getsockopt, "SO_ERROR after a non-blocking connect"),
    any(SYS_sendto, "sockets, resolver"),
    any(SYS_recvfrom, "sockets, resolver"),
    any(SYS_sendmsg, "sockets"),
    any(SYS_recvmsg, "sockets"),
    any(SYS_sendmmsg, "glibc's resolver (A and AAAA at once)"),
    any(
        SYS_uname,
        "glibc's resolver (gethostname for the default search domain)",
    ),
];

/// The server after start-up, on top of [`RUNTIME`]: the tokio runtime and its blocking pool,
/// russh, hyper over unix and TCP sockets, rustls, file reads for authorized_keys, password and
/// token files. Not here, among others: `execve` (the server never runs a program),
/// `bind`/`listen` (listeners exist before the sandbox; forwarded ports are opened by the agent
/// inside the container), `fork` (a `clone` without `CLONE_THREAD`), `ptrace`, `mount`,
/// `setuid` and friends, `bpf`, `keyctl`, `unshare`, `kill`.
pub const SERVER: &[Allowed] = &[
    any(
        SYS_ftruncate,
        "rewriting the janitor's ledger in place (its descriptor is opened before the sandbox)",
    ),
    any(
        SYS_mlock,
        "russh keeps key material out of swap (CryptoVec)",
    ),
    any(SYS_munlock, "russh's CryptoVec on drop"),
    any(SYS_epoll_create1, "tokio's I/O driver"),
    any(SYS_epoll_ctl, "tokio's I/O driver"),
    any(SYS_epoll_pwait, "tokio's I/O driver"),
    #[cfg(target_arch = "x86_64")]
    any(SYS_epoll_wait, "tokio's I/O driver"),
    any(SYS_eventfd2, "tokio's waker"),
    any(SYS_pipe2, "tokio's signal driver"),
    any(SYS_socketpair, "tokio's signal driver"),
    with(
        SYS_socket,
        Args::OneOf(0, SOCKET_FAMILIES),
        "Docker socket, TCP to APIs and webhooks, UDP to the resolver",
    ),
    any(SYS_accept4, "the SSH listener"),
];

/// The agent's `forward-server` inside a container, on top of [`RUNTIME`]: dials and listens on
/// TCP and unix sockets, creates the `ssh -A` socket directory and removes its sockets. It runs
/// no program and signals nothing.
pub const AGENT_FORWARD: &[Allowed] = &[
    with(
        SYS_socket,
        Args::OneOf(0, SOCKET_FAMILIES),
        "forwarded TCP and unix connections, the resolver",
    ),
    any(SYS_bind, "-R and X11 listeners, the ssh-agent socket"),
    any(SYS_listen, "-R and X11 listeners, the ssh-agent socket"),
    any(SYS_accept4, "connections to those listeners"),
    any(SYS_mkdirat, "the ssh-agent socket's 0700 directory"),
    #[cfg(target_arch = "x86_64")]
    any(SYS_mkdir, "the ssh-agent socket's 0700 directory"),
    any(
        SYS_unlinkat,
        "removing listeners' sockets and the ssh-agent directory",
    ),
    #[cfg(target_arch = "x86_64")]
    any(SYS_unlink, "removing listeners' sockets"),
    #[cfg(target_arch = "x86_64")]
    any(SYS_rmdir, "removing the ssh-agent directory"),
    any(SYS_fchmodat, "socket file modes"),
    #[cfg(target_arch = "x86_64")]
    any(SYS_chmod, "socket file modes"),
    any(SYS_fchmod, "socket file modes"),
];

/// Builds the two programs for the union of `lists` (see the module header); `writable_dirs`:
/// directory descriptors opened before the sandbox in which `openat` may create and write
/// files (the audit directory) and `unlinkat` may remove them; every other `openat` stays
/// read-only.
pub fn programs(
    lists: &[&[Allowed]],
    mode: SeccompMode,
    writable_dirs: &[u32],
) -> Result<Vec<BpfProgram>, SandboxError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|e| SandboxError::Seccomp(format!("{}: {e}", std::env::consts::ARCH)))?;
    let err = |e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string());
    let mismatch = match mode {
        SeccompMode::Enforce => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Off => return Ok(Vec::new()),
    };
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(SYS_clone3, Vec::new())]),
        SeccompAction::Allow,
        SeccompAction::Errno(ENOSYS as u32),
        arch,
    )
    .map_err(err)?;
    // None: allowed whatever the arguments (an unconditional entry wins over conditional ones).
    let mut rules: BTreeMap<i64, Option<Vec<SeccompRule>>> = BTreeMap::new();
    for a in lists.iter().copied().flatten() {
        let entry = rules.entry(a.nr).or_insert_with(|| Some(Vec::new()));
        let Some(conditional) = entry else { continue };
        match a.args {
            Args::Any => *entry = None,
            Args::OneOf(i, values) => {
                for v in values {
                    conditional
                        .push(SeccompRule::new(vec![cond(i, SeccompCmpOp::Eq, *v)?]).map_err(err)?);
                }
            }
            Args::Masked(i, mask, value) => conditional.push(
                SeccompRule::new(vec![cond(i, SeccompCmpOp::MaskedEq(mask.into()), value)?])
                    .map_err(err)?,
            ),
        }
    }
    if let Some(Some(openat)) = rules.get_mut(&SYS_openat) {
        for fd in writable_dirs {
            openat.push(SeccompRule::new(vec![cond(0, SeccompCmpOp::Eq, *fd)?]).map_err(err)?);
        }
    }
    // Files in those directories may be removed too (audit recordings once uploaded to S3),
    // and nothing else.
    if !writable_dirs.is_empty() {
        let entry = rules
            .entry(SYS_unlinkat)
            .or_insert_with(|| Some(Vec::new()));
        if let Some(unlinkat) = entry {
            for fd in writable_dirs {
                unlinkat
                    .push(SeccompRule::new(vec![cond(0, SeccompCmpOp::Eq, *fd)?]).map_err(err)?);
            }
        }
    }
    let rules = rules
        .into_iter()
        .map(|(nr, r)| (nr, r.unwrap_or_default()))
        .collect();
    let allow = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, arch).map_err(err)?;
    [clone3, allow]
        .into_iter()
        .map(|f| BpfProgram::try_from(f).map_err(|e| SandboxError::Seccomp(e.to_string())))
        .collect()
}

fn cond(i: u8, op: SeccompCmpOp, value: u32) -> Result<SeccompCondition, SandboxError> {
    SeccompCondition::new(i, SeccompCmpArgLen::Dword, op, value.into())
        .map_err(|e| SandboxError::Seccomp(e.to_string()))
}

/// Installs the server's list ([`RUNTIME`] + [`SERVER`]) on every thread of the process.
pub fn install(mode: SeccompMode, writable_dirs: &[u32]) -> Result<(), SandboxError> {
    install_lists(&[RUNTIME, SERVER], mode, writable_dirs)
}

/// Installs the union of `lists` on every thread of the process (seccompiler sets
/// no_new_privs first).
pub fn install_lists(
    lists: &[&[Allowed]],
    mode: SeccompMode,
    writable_dirs: &[u32],
) -> Result<(), SandboxError> {
    for p in programs(lists, mode, writable_dirs)? {
        seccompiler::apply_filter_all_threads(&p)
            .map_err(|e| SandboxError::Seccomp(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_compile_in_every_mode() {
        for mode in [SeccompMode::Enforce, SeccompMode::Log] {
            for lists in [[RUNTIME, SERVER], [RUNTIME, AGENT_FORWARD]] {
                let p = programs(&lists, mode, &[3]).unwrap();
                assert_eq!(p.len(), 2);
                assert!(p[1].len() > RUNTIME.len());
            }
        }
        assert!(programs(&[RUNTIME, SERVER], SeccompMode::Off, &[])
            .unwrap()
            .is_empty());
    }

    #[test]
    fn the_agent_may_listen_but_not_run_or_signal() {
        let allowed: Vec<_> = RUNTIME.iter().chain(AGENT_FORWARD).map(|a| a.nr).collect();
        assert!(allowed.contains(&SYS_listen));
        for nr in [
            SYS_execve,
            SYS_execveat,
            SYS_kill,
            SYS_ptrace,
            SYS_mount,
            SYS_setuid,
        ] {
            assert!(!allowed.contains(&nr), "syscall {nr} must not be allowed");
        }
    }

    #[test]
    fn nothing_dangerous_is_allowed() {
        let allowed: Vec<_> = RUNTIME.iter().chain(SERVER).map(|a| a.nr).collect();
        for nr in [
            SYS_execve,
            SYS_execveat,
            SYS_bind,
            SYS_listen,
            SYS_ptrace,
            SYS_mount,
            SYS_setuid,
            SYS_setresuid,
            SYS_setgroups,
            SYS_bpf,
            SYS_keyctl,
            SYS_unshare,
            SYS_setns,
            SYS_kill,
            SYS_process_vm_writev,
            SYS_seccomp,
        ] {
            assert!(!allowed.contains(&nr), "syscall {nr} must not be allowed");
        }
    }
}
