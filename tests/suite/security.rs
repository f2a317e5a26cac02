//! The `security` block with the real OpenSSH client: env, command, shell, subsystem and tty
//! rules with their allow/deny lists and `defaultMode`, `forceCommand` with
//! `SSH_ORIGINAL_COMMAND`, and `maxSessions` as a limit on sessions open at once.
//! (Signals, which OpenSSH's client cannot send, are checked through the same rule type in
//! the unit tests of `config::validate`.)
//!
//! The filter is the SSH side's: these run the server in this process on the fake backend,
//! whose programs are a very small shell (`support::fake_sh`), so no engine is needed.

use crate::support;

use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use containerssh::backend::fake::FakeBackend;
use containerssh::config::model::ExecutionMode;
use support::{describe, run_with_timeout, TestEnv, TestServer};

const CMD_TIMEOUT: Duration = Duration::from_secs(90);

fn fake() -> Arc<FakeBackend> {
    Arc::new(FakeBackend::new(
        ExecutionMode::Connection,
        support::fake_sh::sh,
    ))
}

fn start(env: &TestEnv, security: &str) -> TestServer {
    let yaml = format!("{}security:\n{security}", env.config_yaml("connection"));
    env.start_in_process(&yaml, fake())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn env_allow_list_and_deny_list() {
    let env = TestEnv::new();
    let server = start(&env, "  env:\n    mode: filter\n    allow: [LC_ALLOWED]\n");
    let out = run_with_timeout(
        env.ssh(&server, "alice")
            .args(["-o", "SetEnv=LC_ALLOWED=yes LC_OTHER=no"])
            .arg("echo \"[$LC_ALLOWED][$LC_OTHER]\""),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(
        text(&out.stdout),
        "[yes][]\n",
        "{}",
        describe(&out, &server)
    );
    assert!(server.wait_for_output(
        "environment variable refused: security.env",
        Duration::from_secs(10)
    ));

    let env = TestEnv::new();
    let server = start(&env, "  env:\n    mode: enable\n    deny: [LC_SECRET]\n");
    let out = run_with_timeout(
        env.ssh(&server, "alice")
            .args(["-o", "SetEnv=LC_SECRET=x LC_FINE=y"])
            .arg("echo \"[$LC_SECRET][$LC_FINE]\""),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(text(&out.stdout), "[][y]\n", "{}", describe(&out, &server));
}

#[test]
fn command_filter_allows_exact_commands_only() {
    let env = TestEnv::new();
    let server = start(
        &env,
        "  command:\n    mode: filter\n    allow: [\"echo allowed\"]\n",
    );
    let out = run_with_timeout(
        env.ssh(&server, "alice").arg("echo allowed"),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(
        text(&out.stdout),
        "allowed\n",
        "{}",
        describe(&out, &server)
    );
    for refused in ["echo allowed; id", "id", "echo  allowed"] {
        let out = run_with_timeout(env.ssh(&server, "alice").arg(refused), None, CMD_TIMEOUT);
        assert_ne!(
            out.status.code(),
            Some(0),
            "{refused}: {}",
            describe(&out, &server)
        );
        assert!(
            out.stdout.is_empty(),
            "{refused}: {}",
            describe(&out, &server)
        );
        assert!(
            text(&out.stderr).contains("exec request failed"),
            "{refused}: {}",
            describe(&out, &server)
        );
    }
}

#[test]
fn default_mode_disable_with_the_shell_enabled() {
    let env = TestEnv::new();
    let server = start(&env, "  defaultMode: disable\n  shell:\n    mode: enable\n");
    // A shell works (commands on its stdin)...
    let out = run_with_timeout(
        env.ssh(&server, "alice").arg("-T"),
        Some(b"echo from-the-shell\n"),
        CMD_TIMEOUT,
    );
    assert_eq!(
        text(&out.stdout),
        "from-the-shell\n",
        "{}",
        describe(&out, &server)
    );
    // ...exec, subsystems and terminals do not.
    let out = run_with_timeout(env.ssh(&server, "alice").arg("echo no"), None, CMD_TIMEOUT);
    assert!(
        out.stdout.is_empty() && !out.status.success(),
        "{}",
        describe(&out, &server)
    );
    let out = run_with_timeout(
        env.sftp(&server)
            .arg("-b")
            .arg("-")
            .arg(env.destination("alice")),
        Some(b"ls\n"),
        CMD_TIMEOUT,
    );
    assert!(!out.status.success(), "sftp: {}", describe(&out, &server));
    assert!(server.wait_for_output(
        "subsystem refused: security.subsystem",
        Duration::from_secs(10)
    ));
    let out = run_with_timeout(
        env.ssh(&server, "alice").arg("-tt"),
        Some(b"tty; exit\n"),
        CMD_TIMEOUT,
    );
    assert!(
        text(&out.stderr).contains("PTY allocation request failed"),
        "{}",
        describe(&out, &server)
    );
    // OpenSSH's client gives up when a forced terminal is refused.
    assert!(server.wait_for_output("terminal refused: security.tty", Duration::from_secs(10)));
}

#[test]
fn shell_disabled_and_subsystem_deny_list() {
    let env = TestEnv::new();
    let server = start(
        &env,
        "  shell:\n    mode: filter\n  subsystem:\n    mode: enable\n    deny: [sftp]\n",
    );
    // `filter` means disable for shells, as in ContainerSSH.
    let out = run_with_timeout(
        env.ssh(&server, "alice").arg("-T"),
        Some(b"echo x\n"),
        CMD_TIMEOUT,
    );
    assert!(out.stdout.is_empty(), "{}", describe(&out, &server));
    assert!(
        text(&out.stderr).contains("shell request failed"),
        "{}",
        describe(&out, &server)
    );
    let out = run_with_timeout(
        env.sftp(&server)
            .arg("-b")
            .arg("-")
            .arg(env.destination("alice")),
        Some(b"ls\n"),
        CMD_TIMEOUT,
    );
    assert!(!out.status.success(), "sftp: {}", describe(&out, &server));
    // Exec is untouched.
    let out = run_with_timeout(
        env.ssh(&server, "alice").arg("echo exec-ok"),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(
        text(&out.stdout),
        "exec-ok\n",
        "{}",
        describe(&out, &server)
    );
}

#[test]
fn force_command_replaces_every_request() {
    let env = TestEnv::new();
    let server = start(
        &env,
        "  forceCommand: 'echo \"forced:[$SSH_ORIGINAL_COMMAND]\"'\n",
    );
    let out = run_with_timeout(env.ssh(&server, "alice").arg("id -u"), None, CMD_TIMEOUT);
    assert_eq!(
        text(&out.stdout),
        "forced:[id -u]\n",
        "{}",
        describe(&out, &server)
    );
    let out = run_with_timeout(
        env.ssh(&server, "alice").arg("-T"),
        Some(b"id\n"),
        CMD_TIMEOUT,
    );
    assert_eq!(
        text(&out.stdout),
        "forced:[]\n",
        "{}",
        describe(&out, &server)
    );
    let out = run_with_timeout(
        env.ssh(&server, "alice").args(["-s", "sftp"]),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(
        text(&out.stdout),
        "forced:[sftp]\n",
        "{}",
        describe(&out, &server)
    );
}

/// The first line a child prints, waited for up to a minute.
fn first_line(child: &mut Child) -> Option<String> {
    use std::io::BufRead;
    let stdout = child.stdout.take()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line.trim_end().to_string());
    });
    rx.recv_timeout(Duration::from_secs(60)).ok()
}

/// A session held open on the control master until its stdin closes.
fn held(env: &TestEnv, server: &TestServer, ctl: &std::path::Path) -> Child {
    env.ssh_via(server, ctl)
        .arg("echo held; cat >/dev/null")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ssh")
}

#[test]
fn max_sessions_limits_sessions_open_at_once() {
    let env = TestEnv::new();
    let server = start(&env, "  maxSessions: 2\n");
    let (mut master, ctl) = env.control_master(&server, "max");
    let mut first = held(&env, &server, &ctl);
    let mut second = held(&env, &server, &ctl);
    // Both sessions run (each says so) before the third is tried.
    for child in [&mut first, &mut second] {
        assert_eq!(
            first_line(child).as_deref(),
            Some("held"),
            "a held session did not start: {}",
            server.output()
        );
    }
    let out = run_with_timeout(
        env.ssh_via(&server, &ctl).arg("echo third"),
        None,
        CMD_TIMEOUT,
    );
    // OpenSSH's mux client then falls back to a connection of its own (with its own sessions).
    assert!(
        text(&out.stderr).contains("Session open refused by peer"),
        "a third session at once: {}",
        describe(&out, &server)
    );
    assert!(server.wait_for_output(
        "session refused: security.maxSessions",
        Duration::from_secs(10)
    ));

    // Sessions that ended give their place back (ContainerSSH counted every session ever).
    for child in [&mut first, &mut second] {
        drop(child.stdin.take());
        let status = child.wait().expect("wait");
        assert!(status.success(), "{}", server.output());
    }
    for n in 0..3 {
        let out = run_with_timeout(
            env.ssh_via(&server, &ctl).arg("echo again"),
            None,
            CMD_TIMEOUT,
        );
        assert_eq!(
            text(&out.stdout),
            "again\n",
            "session {n} after the others ended: {}",
            describe(&out, &server)
        );
    }
    let _ = master.kill();
    let _ = master.wait();
}

/// With a command forced (`forceCommand`, authorized_keys `command=`), the client cannot set
/// variables that run code before it or change what it runs (`LD_*`, `BASH_ENV`, `ENV`,
/// `SHELLOPTS`, `BASHOPTS`, `PS4`, `IFS`, `PATH`, interpreters' own such as `PERL5OPT`); the
/// locale still passes.
#[test]
fn a_forced_command_gets_no_code_running_variables_from_the_client() {
    let sent = "LD_PRELOAD=/tmp/x.so LD_LIBRARY_PATH=/tmp BASH_ENV=/tmp/e ENV=/tmp/e \
                SHELLOPTS=xtrace BASHOPTS=extdebug PS4=x IFS=x PATH=/evil PERL5OPT=-d \
                NODE_OPTIONS=--require=/tmp/x LC_FINE=ok";
    let refused = [
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "BASH_ENV",
        "ENV",
        "SHELLOPTS",
        "BASHOPTS",
        "PS4",
        "IFS",
        "PERL5OPT",
        "NODE_OPTIONS",
    ];
    for how in ["forceCommand", "command="] {
        let env = TestEnv::new();
        let server = if how == "forceCommand" {
            start(&env, "  forceCommand: env\n")
        } else {
            std::fs::write(
                env.path().join("keys/alice"),
                format!("command=\"env\" {}\n", env.client_pubkey),
            )
            .unwrap();
            env.start_in_process(&env.config_yaml("connection"), fake())
        };
        let out = run_with_timeout(
            env.ssh(&server, "alice")
                .args(["-o", &format!("SetEnv={sent}")])
                .arg("ignored"),
            None,
            CMD_TIMEOUT,
        );
        let info = describe(&out, &server);
        let vars = text(&out.stdout);
        for name in refused {
            assert!(
                !vars.lines().any(|l| l.starts_with(&format!("{name}="))),
                "{how}: {name} reached the forced command: {info}"
            );
        }
        assert!(!vars.lines().any(|l| l == "PATH=/evil"), "{how}: {info}");
        assert!(vars.lines().any(|l| l == "LC_FINE=ok"), "{how}: {info}");
        assert!(
            server
                .output()
                .contains("environment variable refused: a command is forced"),
            "{how}: {info}"
        );
    }
}
