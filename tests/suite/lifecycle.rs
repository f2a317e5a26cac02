//! Container lifecycle: removal on disconnect, the start-up reaper after a crash, draining on
//! SIGTERM, and clear errors when the engine or the image is missing.

use crate::support;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use support::{run_with_timeout, TestEnv, TestServer};

const CMD_TIMEOUT: Duration = Duration::from_secs(90);

/// A session whose program runs until the client goes (its container exists).
fn hold_session(env: &TestEnv, server: &TestServer) -> Child {
    env.hold_session(server, "echo ready; sleep 300", || server.output())
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

/// A unix-socket proxy in front of the engine's socket that a test can cut (every stream
/// through it broken, the socket gone) and restore: an engine outage.
struct EngineProxy {
    path: std::path::PathBuf,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
    streams: std::sync::Arc<std::sync::Mutex<Vec<std::os::unix::net::UnixStream>>>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

impl EngineProxy {
    fn start(path: std::path::PathBuf) -> Self {
        let mut p = Self {
            path,
            up: Default::default(),
            streams: Default::default(),
            acceptor: None,
        };
        p.restore();
        p
    }

    fn restore(&mut self) {
        use std::os::unix::net::{UnixListener, UnixStream};
        use std::sync::atomic::Ordering;
        let listener = UnixListener::bind(&self.path).expect("bind the proxy socket");
        self.up.store(true, Ordering::SeqCst);
        let (up, streams) = (self.up.clone(), self.streams.clone());
        self.acceptor = Some(std::thread::spawn(move || {
            for client in listener.incoming() {
                if !up.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(engine) = UnixStream::connect("/var/run/docker.sock") else {
                    continue;
                };
                let mut held = streams.lock().unwrap();
                held.push(client.try_clone().unwrap());
                held.push(engine.try_clone().unwrap());
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), engine.try_clone().unwrap()),
                    (engine, client),
                ] {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        }));
    }

    /// The engine is gone: the socket refuses, every open stream is broken.
    fn cut(&mut self) {
        use std::sync::atomic::Ordering;
        self.up.store(false, Ordering::SeqCst);
        // Wakes the acceptor, which sees `up` false and drops the listener.
        let _ = std::os::unix::net::UnixStream::connect(&self.path);
        if let Some(a) = self.acceptor.take() {
            a.join().unwrap();
        }
        std::fs::remove_file(&self.path).unwrap();
        for s in self.streams.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The measurement: an engine outage cut three sessions and left their three
/// containers running until the next restart. Their removal is now retried in the background
/// and succeeds once the engine answers again, with the server still running.
#[test]
fn removals_that_fail_during_an_engine_outage_are_retried_when_it_returns() {
    let env = TestEnv::new();
    let socket = env.path().join("engine.sock");
    let mut proxy = EngineProxy::start(socket.clone());
    let yaml = env.config_yaml("connection").replace(
        "docker:\n",
        &format!(
            "docker:\n  connection:\n    host: unix://{}\n",
            socket.display()
        ),
    );
    let server = env.start(&yaml);
    let mut clients: Vec<Child> = (0..3).map(|_| hold_session(&env, &server)).collect();
    assert_eq!(env.containers().len(), 3, "{}", server.output());

    proxy.cut();
    for c in &mut clients {
        let _ = c.kill();
        let _ = c.wait();
    }
    // Each connection's removal has been tried, and failed.
    let retrying = |s: &TestServer| s.output().matches("cannot remove containers").count();
    assert_eq!(
        support::poll_until(Duration::from_secs(60), Duration::from_millis(100), || {
            (retrying(&server) >= 3).then_some(())
        }),
        Some(()),
        "three removals should wait for the engine: {}",
        server.output()
    );
    assert_eq!(
        env.containers().len(),
        3,
        "the engine was away: nothing could be removed"
    );

    proxy.restore();
    assert!(
        env.wait_no_containers(Duration::from_secs(60)),
        "containers left after the engine came back: {:?}\n{}",
        env.containers(),
        server.output()
    );
    assert_eq!(
        server
            .output()
            .matches("connection cleaned up: the engine answers again")
            .count(),
        3,
        "{}",
        server.output()
    );
}
