//! File transfer with the real OpenSSH tools: `sftp` (the subsystem), `scp` in its default SFTP
//! mode and legacy `scp -O` (an exec of the image's scp), checked by SHA-256 on both ends.

use crate::support;

use std::process::Command;
use std::time::Duration;

use support::{describe, run_with_timeout, TestEnv, TestServer};

const MODES: [&str; 3] = ["connection", "connection-exec", "session"];
const CMD_TIMEOUT: Duration = Duration::from_secs(120);
const SIZE: usize = 10 * 1024 * 1024;

fn random_file(env: &TestEnv, name: &str) -> (std::path::PathBuf, String) {
    let p = env.path().join(name);
    let st = Command::new("head")
        .args(["-c", &SIZE.to_string(), "/dev/urandom"])
        .stdout(std::fs::File::create(&p).expect("create"))
        .status()
        .expect("head");
    assert!(st.success());
    let sum = sha256_file(&p);
    (p, sum)
}

fn sha256_file(p: &std::path::Path) -> String {
    let out = Command::new("sha256sum")
        .arg(p)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

fn ok(out: &std::process::Output, server: &TestServer, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        describe(out, server)
    );
}

/// Uploads, checks the checksum inside the container, downloads, checks it again — all on one
/// connection in connection mode (session mode: each command is its own container, so the
/// round trip happens within one sftp batch).
#[test]
fn sftp_put_and_get_ten_mib() {
    for mode in MODES {
        let env = TestEnv::new();
        let server = env.start_mode(mode);
        let (src, sum) = random_file(&env, "up.bin");
        let back = env.path().join("down.bin");
        let out = env.sftp_put_get(
            env.sftp(&server),
            "alice",
            (&src, "/tmp/up.bin", &back),
            CMD_TIMEOUT,
        );
        ok(&out, &server, &format!("{mode}: sftp"));
        assert_eq!(sha256_file(&back), sum, "{mode}: downloaded file differs");
    }
}

#[test]
fn scp_in_sftp_mode_and_legacy_mode() {
    let env = TestEnv::new();
    let server = env.start_mode("connection");
    let (src, sum) = random_file(&env, "up.bin");
    for (flag, name) in [(None, "sftp-mode"), (Some("-O"), "legacy")] {
        // The container lives as long as the connection: upload, check and download over one
        // connection shared through a control master.
        let (mut master, control) = env.control_master(&server, name);
        let with_control = |mut c: Command| {
            c.arg("-o")
                .arg(format!("ControlPath={}", control.display()));
            c
        };
        let mut up = with_control(env.scp(&server));
        up.args(flag)
            .arg(&src)
            .arg(env.remote("alice", "/tmp/up.bin"));
        let out = run_with_timeout(&mut up, None, CMD_TIMEOUT);
        ok(&out, &server, &format!("{name}: scp upload"));

        let mut check = with_control(env.ssh_opts(&server));
        check
            .arg(env.destination("alice"))
            .arg("sha256sum /tmp/up.bin");
        let out = run_with_timeout(&mut check, None, CMD_TIMEOUT);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).get(..64),
            Some(sum.as_str()),
            "{name}: checksum inside the container"
        );

        let back = env.path().join(format!("back-{name}.bin"));
        let mut down = with_control(env.scp(&server));
        down.args(flag)
            .arg(env.remote("alice", "/tmp/up.bin"))
            .arg(&back);
        let out = run_with_timeout(&mut down, None, CMD_TIMEOUT);
        ok(&out, &server, &format!("{name}: scp download"));
        assert_eq!(sha256_file(&back), sum, "{name}: downloaded file differs");
        let _ = master.kill();
        let _ = master.wait();
    }
}

#[test]
fn unknown_subsystem_is_refused() {
    let env = TestEnv::new();
    let server = env.start_mode("connection");
    let out = run_with_timeout(
        env.ssh_opts(&server)
            .arg("-s")
            .arg(env.destination("alice"))
            .arg("no-such-subsystem"),
        None,
        CMD_TIMEOUT,
    );
    assert!(!out.status.success(), "unknown subsystem must fail");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("subsystem request failed"),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
