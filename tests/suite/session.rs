//! Session basics with the real OpenSSH client against a real engine, in both execution modes:
//! output, stderr kept apart, exit codes, environment, stdin EOF, bulk data, terminals.

use crate::support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{describe, run_with_timeout, tty_command_line, TestEnv, Tmux};

const MODES: [&str; 3] = ["connection", "connection-exec", "session"];
const CMD_TIMEOUT: Duration = Duration::from_secs(90);

#[test]
fn stdout_stderr_and_exit_status_are_exact() {
    for mode in MODES {
        let env = TestEnv::new();
        let server = env.start_mode(mode);
        let out = run_with_timeout(
            env.ssh(&server, "alice")
                .arg("echo out1; echo err1 >&2; echo out2; echo err2 >&2; exit 42"),
            None,
            CMD_TIMEOUT,
        );
        let info = describe(&out, &server);
        assert_eq!(out.status.code(), Some(42), "{mode}: {info}");
        assert_eq!(out.stdout, b"out1\nout2\n", "{mode}: {info}");
        assert_eq!(out.stderr, b"err1\nerr2\n", "{mode}: {info}");
    }
}

#[test]
fn environment_from_send_env_reaches_the_program() {
    for mode in MODES {
        let env = TestEnv::new();
        let server = env.start_mode(mode);
        let out = run_with_timeout(
            env.ssh_opts(&server)
                .env("LC_CSSH_TEST", "hello world")
                .args(["-o", "SendEnv=LC_CSSH_TEST"])
                .arg(env.destination("alice"))
                .arg("printf '%s' \"$LC_CSSH_TEST\""),
            None,
            CMD_TIMEOUT,
        );
        assert_eq!(
            out.stdout,
            b"hello world",
            "{mode}: {}",
            describe(&out, &server)
        );
    }
}

#[test]
fn stdin_eof_reaches_the_program() {
    for mode in MODES {
        let env = TestEnv::new();
        let server = env.start_mode(mode);
        // `wc -c` only prints after EOF; the command only exits after it.
        let out = run_with_timeout(
            env.ssh(&server, "alice").arg("wc -c; echo after-eof"),
            Some(b"12345"),
            CMD_TIMEOUT,
        );
        let info = describe(&out, &server);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            text.split_whitespace().collect::<Vec<_>>(),
            ["5", "after-eof"],
            "{mode}: {info}"
        );
        assert_eq!(out.status.code(), Some(0), "{mode}: {info}");
    }
}

/// `ssh -tt host 'echo hello; stty size' </dev/null` (GNU stty: busybox's refuses a 0×0 terminal), as scripts and CI jobs run it: the client's
/// EOF comes at once and must not cost the program's output (it hung the terminal up), and the
/// 0×0 size the client sends stays 0×0, as under sshd. Three rounds: it was a race.
#[test]
fn a_terminal_keeps_its_output_when_stdin_ends_at_once() {
    for mode in MODES {
        let env = TestEnv::new();
        let server = env.start_mode(mode);
        for round in 0..3 {
            let out = env.ssh_tty_stdin_at_eof(&server, "echo hello; /usr/bin/stty size");
            let info = describe(&out, &server);
            let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
            assert_eq!(text, "hello\n0 0\n", "{mode}, round {round}: {info}");
            assert_eq!(out.status.code(), Some(0), "{mode}: {info}");
        }
    }
}

fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    let mut stdin = child.stdin.take().expect("stdin");
    let data = data.to_vec();
    let writer = std::thread::spawn(move || {
        use std::io::Write;
        stdin.write_all(&data).expect("write sha256sum");
    });
    let out = child.wait_with_output().expect("sha256sum output");
    writer.join().expect("writer");
    String::from_utf8_lossy(&out.stdout)[..64].to_string()
}

fn random_bytes(n: usize) -> Vec<u8> {
    let out = Command::new("head")
        .args(["-c", &n.to_string(), "/dev/urandom"])
        .output()
        .expect("head /dev/urandom");
    assert_eq!(out.stdout.len(), n);
    out.stdout
}

#[test]
fn fifty_mib_round_trip_through_cat() {
    let data = random_bytes(50 * 1024 * 1024);
    let want = sha256(&data);
    for mode in MODES {
        let env = TestEnv::new();
        let server = env.start_mode(mode);
        let out = run_with_timeout(
            env.ssh(&server, "alice").arg("cat"),
            Some(&data),
            CMD_TIMEOUT,
        );
        assert_eq!(out.status.code(), Some(0), "{mode}: status {}", out.status);
        assert_eq!(out.stdout.len(), data.len(), "{mode}: length");
        assert_eq!(sha256(&out.stdout), want, "{mode}: checksum");
        // And the checksum computed inside the container agrees.
        let out = run_with_timeout(
            env.ssh(&server, "alice").arg("sha256sum"),
            Some(&data),
            CMD_TIMEOUT,
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).get(..64),
            Some(want.as_str()),
            "{mode}: {}",
            describe(&out, &server)
        );
    }
}

#[test]
fn pty_size_is_right_at_start_and_after_resize() {
    for mode in MODES {
        let env = TestEnv::new();
        let server = env.start_mode(mode);
        let remote = "echo TERM=$TERM; stty size; while read x; do stty size; done";
        let shell_line = format!(
            "{}; sleep 60",
            tty_command_line(&env.ssh(&server, "alice"), remote)
        );
        let tmux = Tmux::new(&env);
        tmux.start(91, 27, &shell_line);
        assert!(
            tmux.wait_for("27 91", Duration::from_secs(60)),
            "{mode}: initial size not seen; screen:\n{}\nserver:\n{}",
            tmux.screen(),
            server.output()
        );
        assert!(
            tmux.screen().contains("TERM=screen") || tmux.screen().contains("TERM=tmux"),
            "{mode}: TERM not passed: {}",
            tmux.screen()
        );
        tmux.run(&["resize-window", "-t", "t", "-x", "120", "-y", "40"]);
        // Each Enter makes the remote loop print its size again; the window-change may land
        // after the first Enter, so press until it shows (bounded).
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut seen = false;
        while Instant::now() < deadline && !seen {
            tmux.run(&["send-keys", "-t", "t", "Enter"]);
            seen = tmux.wait_for("40 120", Duration::from_millis(500));
        }
        assert!(
            seen,
            "{mode}: resized size not seen; screen:\n{}",
            tmux.screen()
        );
    }
}

#[test]
fn two_channels_on_one_connection_share_one_container() {
    let env = TestEnv::new();
    let server = env.start_mode("connection");
    let (mut master, control) = env.control_master(&server, "pair");
    let run = |cmd: &str| {
        run_with_timeout(
            env.ssh_opts(&server)
                .arg("-S")
                .arg(&control)
                .arg(env.destination("alice"))
                .arg(cmd),
            None,
            CMD_TIMEOUT,
        )
    };
    // Two channels at once: the first holds its exec open while the second runs.
    let a = std::thread::scope(|s| {
        let first = s.spawn(|| run("hostname; sleep 2"));
        let second = run("hostname; ls /proc | grep -c '^[0-9]'");
        (first.join().expect("first"), second)
    });
    let host_a = String::from_utf8_lossy(&a.0.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let host_b = String::from_utf8_lossy(&a.1.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    assert!(!host_a.is_empty(), "no output: {}", server.output());
    assert_eq!(host_a, host_b, "channels ran in different containers");
    assert_eq!(
        env.containers().len(),
        1,
        "exactly one container per connection"
    );
    let _ = master.kill();
    let _ = master.wait();
    assert!(env.wait_no_containers(Duration::from_secs(10)));
}

#[test]
fn interactive_shell_runs_the_shell_command() {
    for mode in MODES {
        let env = TestEnv::new();
        let server = env.start_mode(mode);
        // No command: a shell request; the shell reads commands from stdin.
        let out = run_with_timeout(
            env.ssh_opts(&server)
                .arg("-T")
                .arg(env.destination("alice")),
            Some(b"echo from-shell $((6*7))\nexit 3\n"),
            CMD_TIMEOUT,
        );
        assert_eq!(
            out.stdout,
            b"from-shell 42\n",
            "{mode}: {}",
            describe(&out, &server)
        );
        assert_eq!(out.status.code(), Some(3), "{mode}");
    }
}
