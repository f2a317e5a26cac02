//! `security.timeouts` with short values, with the real OpenSSH client: the idle warning on a
//! terminal, the signal seen by the program's trap, the close, the container removed (or, in
//! persistent mode, kept); keepalives do not keep an idle session alive; a connection with
//! nothing open is closed after `unusedConnection`.

use crate::support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{
    describe, poll_until, run_with_timeout, tty_command_line, KubeFake, RemoveByName, TestEnv, Tmux,
};

const CMD_TIMEOUT: Duration = Duration::from_secs(90);
const GONE: Duration = Duration::from_secs(30);

fn with_timeouts(yaml: String, timeouts: &str) -> String {
    format!("{yaml}security:\n  timeouts:\n{timeouts}")
}

/// A terminal session nobody types into: the warning appears on the terminal, the program's
/// HUP trap runs (and ends it with its own status), and the container goes with the
/// connection.
#[test]
fn an_idle_terminal_is_warned_then_signalled() {
    let env = TestEnv::new();
    let server = env.start(&with_timeouts(
        env.config_yaml("connection"),
        "    idle: 2s\n    grace: 2s\n",
    ));
    let remote = "trap \"echo trapped-HUP; exit 7\" HUP; while :; do sleep 1; done";
    let tmux = Tmux::new(&env);
    let t = Instant::now();
    tmux.start(
        100,
        30,
        &format!(
            "{}; echo exit=$?; sleep 60",
            tty_command_line(&env.ssh(&server, "alice"), remote)
        ),
    );
    assert!(
        tmux.wait_for("containerssh: idle for 2s, closing in 2s", CMD_TIMEOUT),
        "no warning; screen:\n{}\nserver:\n{}",
        tmux.screen(),
        server.output()
    );
    assert!(
        tmux.wait_for("trapped-HUP", Duration::from_secs(20)),
        "no trap; screen:\n{}",
        tmux.screen()
    );
    assert!(
        tmux.wait_for("exit=7", Duration::from_secs(20)),
        "screen:\n{}",
        tmux.screen()
    );
    let took = t.elapsed();
    assert!(took >= Duration::from_secs(4), "ended after {took:?}");
    assert!(env.wait_no_containers(GONE), "{}", server.output());
}

/// Keepalives (`ServerAliveInterval=1`) are not activity: a program that prints nothing is
/// warned, sent HUP (which ends `sleep`) and its session ends.
#[test]
fn keepalives_do_not_keep_an_idle_session_alive() {
    let env = TestEnv::new();
    let server = env.start(&with_timeouts(
        env.config_yaml("connection"),
        "    idle: 2s\n    grace: 1s\n",
    ));
    let t = Instant::now();
    let out = run_with_timeout(
        env.ssh(&server, "alice").args([
            "-o",
            "ServerAliveInterval=1",
            "-o",
            "ServerAliveCountMax=100",
            "sleep 1000",
        ]),
        None,
        CMD_TIMEOUT,
    );
    let took = t.elapsed();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("containerssh: idle for 2s, closing in 1s"),
        "{}",
        describe(&out, &server)
    );
    assert_ne!(out.status.code(), Some(0), "{}", describe(&out, &server));
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

/// The session limit, in every Docker mode and on Kubernetes: a program that ignores HUP is
/// closed after the second grace; the container goes (persistent mode: it stays).
#[test]
fn the_session_limit_closes_a_program_that_ignores_hup() {
    for mode in ["connection", "session", "persistent"] {
        let env = TestEnv::new();
        let name = format!("cssh-timeouts-{}", env.instance);
        let _cleanup = RemoveByName(name.clone());
        let mut yaml = env.config_yaml(mode);
        if mode == "persistent" {
            yaml = yaml.replace(
                "    mode: \"persistent\"\n",
                &format!(
                    "    mode: \"persistent\"\n    containername: {name}\n    createMissingContainer: true\n"
                ),
            );
        }
        let server = env.start(&with_timeouts(yaml, "    session: 3s\n    grace: 1s\n"));
        session_limit(&env, &server, mode);
        if mode == "persistent" {
            let out = Command::new("docker")
                .args(["inspect", "-f", "{{.State.Running}}", &name])
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "true");
        } else {
            assert!(env.wait_no_containers(GONE), "{mode}: {}", server.output());
        }
    }
}

#[test]
fn the_session_limit_on_kubernetes() {
    let fake = KubeFake::start();
    let env = TestEnv::new();
    let server = env.start(&with_timeouts(
        env.kube_config_yaml(&fake, "connection", ""),
        "    session: 3s\n    grace: 1s\n",
    ));
    session_limit(&env, &server, "kubernetes connection");
    drop(server);
    drop(fake);
}

fn session_limit(env: &TestEnv, server: &support::TestServer, what: &str) {
    let t = Instant::now();
    let out = run_with_timeout(
        env.ssh(server, "alice")
            .arg("trap '' HUP; echo running; sleep 1000"),
        None,
        CMD_TIMEOUT,
    );
    let took = t.elapsed();
    assert_eq!(
        out.stdout,
        b"running\n",
        "{what}: {}",
        describe(&out, server)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("containerssh: session time limit of 3s reached, closing in 1s"),
        "{what}: {}",
        describe(&out, server)
    );
    assert_ne!(out.status.code(), Some(0));
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(40),
        "{what}: took {took:?}"
    );
    assert!(server.wait_for_output("session closed: time limit", Duration::from_secs(10)));
}

/// A control master with no session and no forwarding is closed after `unusedConnection`,
/// and its container with it.
#[test]
fn an_unused_connection_is_closed() {
    let env = TestEnv::new();
    let server = env.start(&with_timeouts(
        env.config_yaml("connection"),
        "    unusedConnection: 2s\n",
    ));
    let t = Instant::now();
    let (mut master, _control) = env.control_master(&server, "unused");
    let ended = poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
        master.try_wait().ok().flatten()
    });
    assert!(ended.is_some(), "still connected: {}", server.output());
    assert!(t.elapsed() >= Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(server.wait_for_output("unusedConnection", Duration::from_secs(5)));
    assert!(env.wait_no_containers(GONE), "{}", server.output());
}
