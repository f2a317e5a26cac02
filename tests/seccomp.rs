//! The server's seccomp allow-list kills a process that steps outside it, and in `log` mode
//! only logs. A child copy of this binary installs the filter (`containerssh::sandbox::seccomp`,
//! exactly what the server installs) and then starts a program — a `clone` without
//! `CLONE_THREAD`, which the server never does. The kernel's audit record (type 1326, in the
//! kernel log) names the process, the system call and the action.
//!
//! No libtest harness: the filter applies to the whole child process. Needs root to read the
//! kernel log (CI runs as root).

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use containerssh::config::model::SeccompMode;

const CHILD_ENV: &str = "CONTAINERSSH_SECCOMP_CHILD";

fn main() {
    if let Ok(mode) = std::env::var(CHILD_ENV) {
        child(&mode);
    }
    // `cargo test NAME` passes NAME on to every test binary: run only when it matches.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    if !filters.is_empty() && !filters.iter().any(|f| "seccomp".contains(f.as_str())) {
        return;
    }
    print!("test seccomp::enforce_kills ... ");
    enforce_kills();
    println!("ok");
    print!("test seccomp::log_mode_only_logs ... ");
    log_mode_only_logs();
    println!("ok");
}

fn child(mode: &str) -> ! {
    let mode = match mode {
        "enforce" => SeccompMode::Enforce,
        "log" => SeccompMode::Log,
        other => panic!("unknown mode {other}"),
    };
    println!("pid: {}", std::process::id());
    containerssh::sandbox::seccomp::install(mode, &[]).expect("install the filter");
    // Allowed: reading a file, writing to stdout.
    let status = std::fs::read_to_string("/proc/self/status").expect("read own status");
    let seccomp = status
        .lines()
        .find(|l| l.starts_with("Seccomp:"))
        .unwrap_or("no Seccomp line");
    println!("installed: {seccomp}");
    println!("spawning");
    std::io::stdout().flush().expect("flush");
    let st = Command::new("/bin/true").status();
    println!("spawned: {st:?}");
    std::io::stdout().flush().expect("flush");
    std::process::exit(0)
}

fn run_child(mode: &str) -> Output {
    Command::new(std::env::current_exe().expect("own path"))
        .env(CHILD_ENV, mode)
        .stdin(Stdio::null())
        .output()
        .expect("run the child")
}

/// The kernel's audit record for `pid` (polled: the log is written asynchronously).
fn audit_record(pid: u32) -> String {
    let needle = format!(" pid={pid} ");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new("dmesg").output().expect("run dmesg");
        assert!(
            out.status.success(),
            "dmesg failed (the test needs root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let log = String::from_utf8_lossy(&out.stdout);
        if let Some(line) = log
            .lines()
            .find(|l| l.contains("type=1326") && l.contains(&needle) && l.contains(SYSCALL))
        {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no seccomp audit record for pid {pid} and{SYSCALL} in the kernel log"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(target_arch = "x86_64")]
const SYSCALL: &str = " syscall=56 "; // clone
#[cfg(target_arch = "aarch64")]
const SYSCALL: &str = " syscall=220 "; // clone

fn child_pid(out: &Output) -> u32 {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("pid: "))
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("the child did not report its pid: {out:?}"))
}

fn enforce_kills() {
    let out = run_child("enforce");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGSYS),
        "not killed by SIGSYS: {:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("installed: Seccomp:\t2"), "{stdout}");
    assert!(stdout.contains("spawning"), "{stdout}");
    assert!(!stdout.contains("spawned"), "{stdout}");
    let record = audit_record(child_pid(&out));
    assert!(record.contains(" sig=31 "), "{record}");
}

fn log_mode_only_logs() {
    let out = run_child("log");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{:?}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("spawned: Ok(ExitStatus(unix_wait_status(0)))"),
        "{stdout}"
    );
    let record = audit_record(child_pid(&out));
    assert!(record.contains(" sig=0 "), "{record}");
}
