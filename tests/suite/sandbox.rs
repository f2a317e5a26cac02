//! The sandbox on a live server: started as root with a `sandbox` block it serves as the
//! configured uid/gid/groups with no capabilities, no_new_privs and the seccomp filter on every
//! thread — and shell, exec, sftp and forwarding still work. Without `sandbox.user` root is
//! refused; with `allowRoot` it serves as uid 0 with every capability dropped.
//!
//! These tests need root (CI runs as root): they fail, naming the reason, when not.

use crate::support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::{
    describe, poll_until, random_hex, run_with_timeout, Background, TestEnv, TestServer, SERVER_BIN,
};

const CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// A uid and gid with no passwd entry: the server never asks NSS for names.
const UID: u32 = 64123;
const NO_CAPS: &str = "0000000000000000";

fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    assert!(
        status_field(&status, "Uid:").starts_with('0'),
        "the sandbox tests start the server as root and must run as root (CI does)"
    );
}

fn status_field<'a>(status: &'a str, name: &str) -> &'a str {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no {name} line in:\n{status}"))
}

fn docker_socket_gid() -> u32 {
    std::fs::metadata("/var/run/docker.sock")
        .expect("the Docker engine's socket at /var/run/docker.sock")
        .gid()
}

/// Asserts the confinement every server thread must show.
fn assert_confined(pid: u32, uid: u32, gid: u32, groups: &[u32], server: &TestServer) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("server status");
    let ids = |v: u32| [v; 4].map(|x| x.to_string()).join("\t");
    assert_eq!(status_field(&status, "Uid:"), ids(uid), "{status}");
    assert_eq!(status_field(&status, "Gid:"), ids(gid), "{status}");
    let got: Vec<u32> = status_field(&status, "Groups:")
        .split_whitespace()
        .map(|g| g.parse().expect("numeric group"))
        .collect();
    assert_eq!(got, groups, "{status}");
    for set in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
        assert_eq!(status_field(&status, set), NO_CAPS, "{set}\n{status}");
    }
    assert_eq!(status_field(&status, "NoNewPrivs:"), "1", "{status}");
    let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("server tasks")
        .map(|t| t.expect("task entry").path())
        .collect();
    assert!(
        tasks.len() > 1,
        "the runtime's threads are missing: {tasks:?}"
    );
    for t in &tasks {
        let s = std::fs::read_to_string(t.join("status")).expect("task status");
        assert_eq!(
            status_field(&s, "Seccomp:"),
            "2",
            "{} has no seccomp filter\n{}",
            t.display(),
            server.output()
        );
        assert_eq!(status_field(&s, "NoNewPrivs:"), "1", "{}", t.display());
        assert_eq!(status_field(&s, "CapEff:"), NO_CAPS, "{}", t.display());
    }
}

/// Lets `uid` read what the server reads per login (authorized keys, the password file).
fn open_to_others(env: &TestEnv) {
    let mode = |p: &Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).expect("chmod")
    };
    mode(env.path(), 0o755);
    mode(&env.path().join("keys"), 0o755);
    for f in std::fs::read_dir(env.path().join("keys")).expect("keys dir") {
        mode(&f.expect("key file").path(), 0o644);
    }
    mode(&env.path().join("passwords"), 0o644);
}

fn ok(out: &std::process::Output, server: &TestServer, what: &str) -> String {
    assert!(out.status.success(), "{what}: {}", describe(out, server));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A one-shot TCP server on the client side for `-R`: answers a line with `pong <line>`.
fn pong_server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let _ = conn.set_read_timeout(Some(CMD_TIMEOUT));
            let mut line = String::new();
            let mut writer = conn.try_clone().expect("clone");
            if BufReader::new(conn).read_line(&mut line).is_ok() {
                let _ = writer.write_all(format!("pong {line}").as_bytes());
            }
        }
    });
    port
}

#[test]
fn drops_to_the_configured_user_and_still_serves() {
    require_root();
    let env = TestEnv::new();
    open_to_others(&env);
    let sock_gid = docker_socket_gid();
    let yaml = format!(
        "{}security:\n  forwarding:\n    reverseForwardingMode: enable\n\
         sandbox:\n  user: {UID}\n  group: {UID}\n  supplementaryGroups: [{sock_gid}]\n",
        env.config_yaml("connection")
    );
    let server = env.start(&yaml);
    assert!(
        server.output().contains("sandbox entered"),
        "{}",
        server.output()
    );

    // exec: stdout, stderr and the exit status.
    let out = run_with_timeout(
        env.ssh(&server, "alice")
            .arg("echo hello; echo oops >&2; exit 7"),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out, &server));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");

    // A shell reading its script from stdin.
    let out = run_with_timeout(
        env.ssh(&server, "alice").arg("-T"),
        Some(b"echo $((6 * 7))\nexit 3\n"),
        CMD_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out, &server));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "42\n");

    // sftp up and down.
    let up = env.path().join("up.txt");
    let down = env.path().join("down.txt");
    let content = format!("sandboxed {}\n", random_hex(16));
    std::fs::write(&up, &content).expect("write upload");
    let out = env.sftp_put_get(
        env.sftp(&server),
        "alice",
        (&up, "/tmp/up.txt", &down),
        CMD_TIMEOUT,
    );
    ok(&out, &server, "sftp");
    assert_eq!(std::fs::read_to_string(&down).expect("download"), content);

    // -R: a listener inside the container reaching a server on the client side.
    let target = pong_server();
    let (master, ctl) = env.forwarding_master(
        &server,
        "sandbox",
        &["-R", &format!("0:127.0.0.1:{target}")],
    );
    let allocated: u16 = poll_until(CMD_TIMEOUT, Duration::from_millis(20), || {
        let err = master.stderr();
        err.split("Allocated port ")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
    })
    .unwrap_or_else(|| {
        panic!(
            "no allocated port: {}\n{}",
            master.stderr(),
            server.output()
        )
    });
    let ping = format!("ping-{}", random_hex(8));
    let out = run_with_timeout(
        env.ssh_via(&server, &ctl).arg(format!(
            "echo {ping} | timeout 20 socat -t 5 - TCP:127.0.0.1:{allocated}"
        )),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(ok(&out, &server, "-R"), format!("pong {ping}\n"));
    drop(master);

    // After all of that, every thread is still confined (and the process alive).
    assert_confined(server.pid(), UID, UID, &[sock_gid], &server);
}

#[test]
fn root_is_refused_without_a_user() {
    require_root();
    let env = TestEnv::new();
    let config = env.path().join("config.yaml");
    let yaml = format!(
        "{}sandbox:\n  seccomp: enforce\n",
        env.config_yaml("connection")
    );
    std::fs::write(&config, yaml).expect("write config");
    let out = run_with_timeout(
        Command::new(SERVER_BIN).arg("--config").arg(&config),
        None,
        CMD_TIMEOUT,
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("sandbox.user"), "{text}");
    assert!(!text.contains("listening on"), "{text}");
}

/// `allowRoot`: uid 0, but without a single capability (and the rest of the sandbox). This is
/// also how every other test's server runs in CI.
#[test]
fn allow_root_serves_as_root_without_capabilities() {
    require_root();
    let env = TestEnv::new();
    let server = env.start(&env.config_yaml("connection"));
    let out = run_with_timeout(env.ssh(&server, "alice").arg("echo hi"), None, CMD_TIMEOUT);
    assert_eq!(ok(&out, &server, "exec"), "hi\n");
    assert!(
        server.output().contains("SERVING AS ROOT"),
        "{}",
        server.output()
    );
    // The groups are whatever root had: allowRoot changes no ids.
    let own = std::fs::read_to_string("/proc/self/status").expect("own status");
    let groups: Vec<u32> = status_field(&own, "Groups:")
        .split_whitespace()
        .map(|g| g.parse().expect("numeric group"))
        .collect();
    assert_confined(server.pid(), 0, 0, &groups, &server);
}

/// Descriptors the server inherits are closed before it serves anything.
#[test]
fn inherited_descriptors_are_closed() {
    let env = TestEnv::new();
    let config = env.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "{}sandbox:\n  allowRoot: true\n",
            env.config_yaml("connection")
        ),
    )
    .expect("write config");
    let secret = env.path().join("inherited");
    std::fs::write(&secret, "not for the server").expect("write");
    let mut sh = Command::new("sh");
    sh.arg("-c")
        .arg(r#"exec 7<"$1" 8>>"$1"; exec "$2" --config "$3""#)
        .arg("sh")
        .arg(&secret)
        .arg(SERVER_BIN)
        .arg(&config);
    let server = Background::spawn(&mut sh, env.path(), "fd-server");
    let listening = poll_until(Duration::from_secs(20), Duration::from_millis(20), || {
        server.stdout().contains("listening on").then_some(())
    });
    assert!(
        listening.is_some(),
        "{}{}",
        server.stdout(),
        server.stderr()
    );
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
        .expect("fd dir")
        .filter_map(|e| {
            let e = e.ok()?;
            let target = std::fs::read_link(e.path()).ok()?;
            Some(format!(
                "{} -> {}",
                e.file_name().to_string_lossy(),
                target.display()
            ))
        })
        .collect();
    assert!(
        !fds.iter().any(|f| f.contains("inherited")),
        "inherited descriptors survived: {fds:?}"
    );
}
