//! End-to-end smoke tests: the real server, the real `ssh` client, a real
//! container per login, in both execution modes.

use crate::support;

use std::time::Duration;
use support::{describe, run_with_timeout, TestEnv};

const MODES: [&str; 3] = ["connection", "connection-exec", "session"];
const CMD_TIMEOUT: Duration = Duration::from_secs(60);
const CLEANUP_DEADLINE: Duration = Duration::from_secs(30);

#[test]
fn exec_echo() {
    for mode in MODES {
        let env = TestEnv::new();
        let server = env.start_mode(mode);
        let out = run_with_timeout(
            env.ssh(&server, "alice").arg("echo hello"),
            None,
            CMD_TIMEOUT,
        );
        let info = describe(&out, &server);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello\n",
            "mode {mode}: {info}"
        );
        assert_eq!(out.status.code(), Some(0), "mode {mode}: {info}");
        assert!(
            env.wait_no_containers(CLEANUP_DEADLINE),
            "mode {mode}: containers left {CLEANUP_DEADLINE:?} after the connection closed: {:?}\n{info}",
            env.containers()
        );
    }
}

#[test]
fn exit_code() {
    for mode in MODES {
        let env = TestEnv::new();
        let server = env.start_mode(mode);
        let out = run_with_timeout(env.ssh(&server, "alice").arg("exit 42"), None, CMD_TIMEOUT);
        assert_eq!(
            out.status.code(),
            Some(42),
            "mode {mode}: {}",
            describe(&out, &server)
        );
    }
}
