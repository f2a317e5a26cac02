//! Container lifecycle: removal on disconnect, the start-up reaper after a crash, draining on
//! SIGTERM, and clear errors when the engine or the image is missing.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{run_with_timeout, TestEnv, TestServer};

const CMD_TIMEOUT: Duration = Duration::from_secs(90);

/// Starts `ssh … 'echo ready; sleep 300'` in the background and returns once the program
/// runs (its first line arrived), i.e. its container exists and the session is live.
fn hold_session(env: &TestEnv, server: &TestServer) -> Child {
    use std::io::BufRead;
    let mut child = env
        .ssh(server, "alice")
        .arg("echo ready; sleep 300")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ssh");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .unwrap_or_else(|_| panic!("session never started: {}", server.output()));
    assert_eq!(line, "ready\n", "server: {}", server.output());
    child
}

#[test]
fn containers_are_gone_within_two_seconds_of_disconnect() {
    for mode in ["connection", "session"] {
        let env = TestEnv::new();
        let server = env.start_mode(mode);
        let out = run_with_timeout(env.ssh(&server, "alice").arg("true"), None, CMD_TIMEOUT);
        assert_eq!(out.status.code(), Some(0), "{mode}: {}", server.output());
        let t = Instant::now();
        assert!(
            env.wait_no_containers(Duration::from_secs(2)),
            "{mode}: containers still there 2 s after disconnect: {:?}",
            env.containers()
        );
        eprintln!(
            "{mode}: containers gone {:?} after the client exited",
            t.elapsed()
        );
    }
}

#[test]
fn reaper_removes_what_a_killed_server_left() {
    let env = TestEnv::new();
    let yaml = env.config_yaml("connection");
    let mut server = env.start(&yaml);
    let mut client = hold_session(&env, &server);
    server.kill9();
    let _ = client.kill();
    let _ = client.wait();
    let leftovers = env.containers();
    assert_eq!(
        leftovers.len(),
        1,
        "the killed server should leave its container behind"
    );
    let restarted = env.start(&yaml);
    assert!(
        env.containers().is_empty(),
        "the restarted server did not reap {leftovers:?}: {}",
        restarted.output()
    );
    assert!(restarted.output().contains("left behind"));
}

#[test]
fn sigterm_drains_sessions_and_removes_containers() {
    for mode in ["connection", "session"] {
        let env = TestEnv::new();
        let mut server = env.start_mode(mode);
        let client = hold_session(&env, &server);
        let status = server.sigterm_and_wait(Duration::from_secs(30));
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "{mode}: server did not exit 0 on SIGTERM: {}",
            server.output()
        );
        assert!(
            env.containers().is_empty(),
            "{mode}: containers left after drain"
        );
        let out = client.wait_with_output().expect("ssh client");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("shutting down"),
            "{mode}: the session was not told: {stderr}"
        );
    }
}

#[test]
fn unreachable_engine_gives_one_clear_line_and_keeps_serving() {
    let env = TestEnv::new();
    let yaml = env.config_yaml("connection").replace(
        "docker:\n",
        &format!(
            "docker:\n  connection:\n    host: unix://{}/no-engine.sock\n",
            env.path().display()
        ),
    );
    let server = env.start(&yaml);
    for _ in 0..2 {
        let out = run_with_timeout(env.ssh(&server, "alice").arg("echo hi"), None, CMD_TIMEOUT);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0));
        assert!(out.stdout.is_empty());
        assert!(
            stderr.contains("cannot start your container: the container engine is not reachable"),
            "stderr: {stderr}\nserver: {}",
            server.output()
        );
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    }
}

#[test]
fn missing_image_is_named_to_the_user() {
    for mode in ["connection", "session"] {
        let env = TestEnv::new();
        let image = support::test_image();
        let yaml = env
            .config_yaml(mode)
            .replace(&image, "containerssh-test:no-such-tag");
        let server = env.start(&yaml);
        let out = run_with_timeout(env.ssh(&server, "alice").arg("echo hi"), None, CMD_TIMEOUT);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0));
        assert!(
            stderr.contains("containerssh-test:no-such-tag") && stderr.contains("not found"),
            "{mode}: stderr: {stderr}\nserver: {}",
            server.output()
        );
        assert!(
            env.containers().is_empty(),
            "{mode}: nothing may be left behind"
        );
    }
}

#[test]
fn generated_host_key_is_stable_across_restarts() {
    let env = TestEnv::new();
    let yaml = env.config_yaml("connection").replace(
        &format!("  hostkeys:\n    - \"{}\"\n", env.host_key.display()),
        "",
    );
    assert!(!yaml.contains("hostkeys"), "test setup: {yaml}");
    let fingerprint = |server: &TestServer| {
        let out = Command::new("ssh-keyscan")
            .args([
                "-t",
                "ed25519",
                "-p",
                &server.port().to_string(),
                "127.0.0.1",
            ])
            .output()
            .expect("ssh-keyscan");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let mut first = env.start(&yaml);
    let a = fingerprint(&first);
    first.kill9();
    let second = env.start(&yaml);
    let b = fingerprint(&second);
    assert!(a.contains("ssh-ed25519"), "keyscan: {a:?}");
    assert_eq!(a.split_whitespace().last(), b.split_whitespace().last());
}

#[test]
fn a_container_that_cannot_start_is_reported_and_removed() {
    for mode in ["connection", "session"] {
        let env = TestEnv::new();
        // Connection mode: the idle command cannot start. Session mode: the program itself,
        // which only fails the container start without the agent in front of it.
        let yaml = env.config_yaml(mode).replace(
            "    shellCommand: [\"/bin/sh\"]\n",
            "    shellCommand: [\"/bin/sh\"]\n    idleCommand: [\"/no/such/idle\"]\n    disableAgent: true\n",
        );
        let server = env.start(&yaml);
        let cmd = if mode == "session" {
            "/no/such/program"
        } else {
            "echo hi"
        };
        let out = run_with_timeout(env.ssh(&server, "alice").arg(cmd), None, CMD_TIMEOUT);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{mode}");
        assert!(
            stderr.starts_with("cannot start your container: the container failed to start"),
            "{mode}: stderr: {stderr}\nserver: {}",
            server.output()
        );
        assert!(
            env.wait_no_containers(Duration::from_secs(10)),
            "{mode}: leftovers"
        );
    }
}

#[test]
fn a_missing_program_under_the_agent_exits_127_with_a_message() {
    for mode in ["connection", "session"] {
        let env = TestEnv::new();
        let server = env.start(&env.config_yaml(mode));
        let out = run_with_timeout(
            env.ssh(&server, "alice").arg("/no/such/program"),
            None,
            CMD_TIMEOUT,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(127), "{mode}: {stderr}");
        assert!(
            stderr.contains("cannot execute /no/such/program"),
            "{mode}: stderr: {stderr}\nserver: {}",
            server.output()
        );
    }
}
