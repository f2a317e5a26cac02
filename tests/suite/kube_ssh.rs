//! End-to-end conformance of the Kubernetes backend: the real OpenSSH client (and russh's
//! client for `signal` requests) against the server configured with `backend: kubernetes`,
//! pointed at the Docker-backed fake API server (`tests/support/kubefake/kubefake.py`).
//!
//! The Docker-backend suites' assertions (session.rs, files.rs, signals.rs, forwarding.rs,
//! lifecycle.rs, persistent.rs) are repeated here in the modes where they apply, plus what is
//! specific to Kubernetes: image pull errors, pod deletion, the reaper, persistent pods, the
//! v4 exec fallback, kubeconfig files and bearer token rotation.
//!
//! Every test starts its own fake (dropped last: locals drop in reverse order, so the
//! server's SIGTERM cleanup runs while the fake still answers). Pods are observed through the
//! fake's REST API with its client certificate (independent of token rotation) and through
//! its Docker containers. Every wait is bounded; nothing sleeps in place of a condition.

use crate::support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use russh::client::Msg;
use russh::{Channel, ChannelMsg, Sig};
use support::russh_client::connect;
use support::{
    describe, free_tcp_port, poll_until, random_hex, run_with_timeout, sha256_hex,
    tty_command_line, Background, KubeFake, TestEnv, TestServer, Tmux,
};

const MODES: [&str; 4] = ["connection", "connection-exec", "session", "persistent"];
const CMD_TIMEOUT: Duration = Duration::from_secs(90);
/// Bound for pods to disappear after a disconnect / a reap.
const GONE_TIMEOUT: Duration = Duration::from_secs(30);
const POLL_STEP: Duration = Duration::from_millis(100);
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const NS: &str = "default";

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// The `kubernetes.pod` line that lets persistent mode create its pod (the name goes into
/// `metadata`, see [`with_pod_name`]).
const CREATE_MISSING: &str = "    createMissingPods: true\n";

/// Puts `name` into `kubernetes.pod.metadata` of a YAML made by `kube_config_yaml*`.
fn with_pod_name(yaml: &str, name: &str) -> String {
    let anchor = "    metadata:\n      namespace: default\n";
    assert!(yaml.contains(anchor), "test setup: {yaml}");
    yaml.replacen(
        anchor,
        &format!("    metadata:\n      name: {name}\n      namespace: default\n"),
        1,
    )
}

/// A unique persistent pod name (a DNS label).
fn persistent_name() -> String {
    format!("cssh-persistent-{}", random_hex(4))
}

/// The server configuration for `mode` against `fake`; in persistent mode with a fresh pod
/// name (created on first login), returned too.
fn mode_yaml(env: &TestEnv, fake: &KubeFake, mode: &str, extra: &str) -> (String, Option<String>) {
    if mode == "persistent" {
        let name = persistent_name();
        let yaml = env.kube_config_yaml(fake, mode, &format!("{CREATE_MISSING}{extra}"));
        (with_pod_name(&yaml, &name), Some(name))
    } else {
        (env.kube_config_yaml(fake, mode, extra), None)
    }
}

fn start_mode(env: &TestEnv, fake: &KubeFake, mode: &str) -> TestServer {
    env.start(&mode_yaml(env, fake, mode, "").0)
}

/// The top-level block that enables TCP forwarding both ways (tests/forwarding.rs).
const FORWARDING_ENABLED: &str = "security:
  forwarding:
    forwardingMode: enable
    reverseForwardingMode: enable
    socketForwardingMode: enable
    socketListenMode: enable
";

// ---------------------------------------------------------------------------
// Observing the fake
// ---------------------------------------------------------------------------

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A command's outcome, the server's output and the tail of the fake's log.
fn ctx(out: &Output, server: &TestServer, fake: &KubeFake) -> String {
    format!(
        "{}\n--- kubefake log (tail) ---\n{}",
        describe(out, server),
        tail(&fake.log(), 40)
    )
}

/// The server's output and the fake's log tail.
fn logs(server: &TestServer, fake: &KubeFake) -> String {
    format!(
        "--- server ---\n{}\n--- kubefake log (tail) ---\n{}",
        server.output(),
        tail(&fake.log(), 40)
    )
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Names of the pods in `default` labelled `containerssh_instance=<instance>`.
fn instance_pods(fake: &KubeFake, instance: &str) -> Vec<String> {
    let (code, list) = fake.api_get(&format!(
        "/api/v1/namespaces/{NS}/pods?labelSelector=containerssh_instance%3D{instance}"
    ));
    assert_eq!(code, 200, "list pods: {list}");
    list["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Every pod in `default`.
fn all_pods(fake: &KubeFake) -> Vec<String> {
    let (code, list) = fake.api_get(&format!("/api/v1/namespaces/{NS}/pods"));
    assert_eq!(code, 200, "list pods: {list}");
    list["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|p| p["metadata"]["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The pod's phase, `None` when it does not exist (404).
fn pod_phase(fake: &KubeFake, name: &str) -> Option<String> {
    let (code, pod) = fake.api_get(&format!("/api/v1/namespaces/{NS}/pods/{name}"));
    match code {
        200 => Some(pod["status"]["phase"].as_str().unwrap_or("").to_string()),
        404 => None,
        other => panic!("GET pod {name}: HTTP {other}: {pod}"),
    }
}

/// Waits until no pod of `instance` is listed and the fake has no Docker container left
/// (the latter only when `no_containers`); true on success.
fn wait_no_instance_pods(fake: &KubeFake, instance: &str, no_containers: bool) -> bool {
    poll_until(GONE_TIMEOUT, POLL_STEP, || {
        (instance_pods(fake, instance).is_empty()
            && (!no_containers || fake.docker_containers(None).is_empty()))
        .then_some(())
    })
    .is_some()
}

// ---------------------------------------------------------------------------
// Client helpers
// ---------------------------------------------------------------------------

/// [`TestEnv::hold_session`], explained with the fake API server's log.
fn hold_session(env: &TestEnv, server: &TestServer, fake: &KubeFake, cmd: &str) -> Child {
    env.hold_session(server, cmd, || logs(server, fake))
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf
}

/// Like `support::run_with_timeout`, for bulk data: on timeout the client is killed and this
/// panics with how many bytes went each way (not the bytes), the server's output and the
/// fake's log.
fn run_bulk(
    cmd: &mut Command,
    input: &[u8],
    server: &TestServer,
    fake: &KubeFake,
    what: &str,
) -> Output {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot spawn {cmd:?}: {e}"));
    let written = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (mut pipe, data, written) = (
            child.stdin.take().expect("stdin"),
            input.to_vec(),
            written.clone(),
        );
        thread::spawn(move || {
            for chunk in data.chunks(64 * 1024) {
                if pipe.write_all(chunk).is_err() {
                    return;
                }
                written.fetch_add(chunk.len(), Ordering::SeqCst);
            }
        })
    };
    let collect = |mut pipe: Box<dyn Read + Send>| {
        let sink = Arc::new(Mutex::new(Vec::new()));
        let s = sink.clone();
        let t = thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                s.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        (sink, t)
    };
    let (stdout, t_out) = collect(Box::new(child.stdout.take().expect("stdout")));
    let (stderr, t_err) = collect(Box::new(child.stderr.take().expect("stderr")));
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        let status = child.wait();
        let _ = tx.send(());
        status
    });
    if rx.recv_timeout(CMD_TIMEOUT).is_err() {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        let _ = waiter.join();
        let _ = (writer.join(), t_out.join(), t_err.join());
        panic!(
            "{what}: timed out after {CMD_TIMEOUT:?}: {} of {} bytes written, {} bytes read\n\
             --- stderr ---\n{}\n{}",
            written.load(Ordering::SeqCst),
            input.len(),
            stdout.lock().unwrap().len(),
            text(&stderr.lock().unwrap()),
            logs(server, fake)
        );
    }
    let status = waiter.join().expect("waiter").expect("wait for ssh");
    let _ = (writer.join(), t_out.join(), t_err.join());
    let stdout = std::mem::take(&mut *stdout.lock().unwrap());
    let stderr = std::mem::take(&mut *stderr.lock().unwrap());
    Output {
        status,
        stdout,
        stderr,
    }
}

fn sha256_file(p: &std::path::Path) -> String {
    sha256_hex(&std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display())))
}

// ---------------------------------------------------------------------------
// 1-3. exec, environment, stdin EOF
// ---------------------------------------------------------------------------

#[test]
fn exec_stdout_stderr_and_exit_status_are_exact() {
    let fake = KubeFake::start();
    for mode in MODES {
        let env = TestEnv::new();
        let server = start_mode(&env, &fake, mode);
        let out = run_with_timeout(
            env.ssh(&server, "alice")
                .arg("echo out1; echo err1 >&2; echo out2; echo err2 >&2; exit 3"),
            None,
            CMD_TIMEOUT,
        );
        let info = ctx(&out, &server, &fake);
        assert_eq!(out.status.code(), Some(3), "{mode}: {info}");
        assert_eq!(text(&out.stdout), "out1\nout2\n", "{mode}: {info}");
        assert_eq!(text(&out.stderr), "err1\nerr2\n", "{mode}: {info}");
    }
}

#[test]
fn environment_from_setenv_and_sendenv_reaches_the_program() {
    let fake = KubeFake::start();
    for mode in MODES {
        let env = TestEnv::new();
        let server = start_mode(&env, &fake, mode);
        let out = run_with_timeout(
            env.ssh_opts(&server)
                .env("LC_CSSH_TEST", "hello world")
                .args(["-o", "SendEnv=LC_CSSH_TEST"])
                .args(["-o", "SetEnv=CSSH_SET=set-value"])
                .arg(env.destination("alice"))
                .arg("printf '%s|%s' \"$LC_CSSH_TEST\" \"$CSSH_SET\""),
            None,
            CMD_TIMEOUT,
        );
        let info = ctx(&out, &server, &fake);
        assert_eq!(text(&out.stdout), "hello world|set-value", "{mode}: {info}");
        assert_eq!(out.status.code(), Some(0), "{mode}: {info}");
    }
}

#[test]
fn stdin_eof_reaches_the_program() {
    let fake = KubeFake::start();
    for mode in MODES {
        let env = TestEnv::new();
        let server = start_mode(&env, &fake, mode);
        // `wc -l` only prints after EOF; the command only exits after it.
        let out = run_with_timeout(
            env.ssh(&server, "alice").arg("wc -l; echo after-eof"),
            Some(b"a\nb\n"),
            CMD_TIMEOUT,
        );
        let info = ctx(&out, &server, &fake);
        assert_eq!(
            text(&out.stdout).split_whitespace().collect::<Vec<_>>(),
            ["2", "after-eof"],
            "{mode}: {info}"
        );
        assert_eq!(out.status.code(), Some(0), "{mode}: {info}");
    }
}

/// `ssh -tt host 'echo hello; stty size' </dev/null` keeps the program's output in every mode
/// (the client's EOF hung the terminal up), and the 0×0 size stays 0×0, as under sshd.
#[test]
fn a_terminal_keeps_its_output_when_stdin_ends_at_once() {
    let fake = KubeFake::start();
    for mode in MODES {
        let env = TestEnv::new();
        let server = start_mode(&env, &fake, mode);
        for round in 0..3 {
            let out = env.ssh_tty_stdin_at_eof(&server, "echo hello; /usr/bin/stty size");
            let info = ctx(&out, &server, &fake);
            assert_eq!(
                text(&out.stdout).replace('\r', ""),
                "hello\n0 0\n",
                "{mode}, round {round}: {info}"
            );
            assert_eq!(out.status.code(), Some(0), "{mode}: {info}");
        }
    }
}

/// The interactive shell (no command) runs `shellCommand` and reads commands from stdin.
#[test]
fn interactive_shell_runs_the_shell_command() {
    let fake = KubeFake::start();
    for mode in MODES {
        let env = TestEnv::new();
        let server = start_mode(&env, &fake, mode);
        let out = run_with_timeout(
            env.ssh_opts(&server)
                .arg("-T")
                .arg(env.destination("alice")),
            Some(b"echo from-shell $((6*7))\nexit 3\n"),
            CMD_TIMEOUT,
        );
        let info = ctx(&out, &server, &fake);
        assert_eq!(text(&out.stdout), "from-shell 42\n", "{mode}: {info}");
        assert_eq!(out.status.code(), Some(3), "{mode}: {info}");
    }
}

// ---------------------------------------------------------------------------
// 4. bulk data
// ---------------------------------------------------------------------------

#[test]
fn twenty_mib_round_trip_through_cat() {
    let data = random_bytes(20 * 1024 * 1024);
    let want = sha256_hex(&data);
    let fake = KubeFake::start();
    for mode in MODES {
        let env = TestEnv::new();
        let server = start_mode(&env, &fake, mode);
        let out = run_bulk(
            env.ssh(&server, "alice").arg("cat"),
            &data,
            &server,
            &fake,
            &format!("{mode}: cat"),
        );
        let brief = || {
            format!(
                "status {}, {} bytes back\n--- stderr ---\n{}\n{}",
                out.status,
                out.stdout.len(),
                text(&out.stderr),
                logs(&server, &fake)
            )
        };
        assert_eq!(out.status.code(), Some(0), "{mode}: {}", brief());
        assert_eq!(out.stdout.len(), data.len(), "{mode}: length; {}", brief());
        assert!(
            sha256_hex(&out.stdout) == want,
            "{mode}: checksum differs; {}",
            brief()
        );
        // And the checksum computed inside the pod agrees.
        let out = run_bulk(
            env.ssh(&server, "alice").arg("sha256sum"),
            &data,
            &server,
            &fake,
            &format!("{mode}: sha256sum"),
        );
        assert_eq!(
            text(&out.stdout).get(..64),
            Some(want.as_str()),
            "{mode}: {}",
            ctx(&out, &server, &fake)
        );
    }
}

// ---------------------------------------------------------------------------
// 5. terminals
// ---------------------------------------------------------------------------

#[test]
fn pty_size_is_right_at_start_and_after_resize() {
    let fake = KubeFake::start();
    for mode in ["connection", "session"] {
        let env = TestEnv::new();
        let server = start_mode(&env, &fake, mode);
        let remote = "echo TERM=$TERM; stty size; while read x; do stty size; done";
        let shell_line = format!(
            "{}; sleep 60",
            tty_command_line(&env.ssh(&server, "alice"), remote)
        );
        let tmux = Tmux::new(&env);
        tmux.start(91, 27, &shell_line);
        assert!(
            tmux.wait_for("27 91", CMD_TIMEOUT),
            "{mode}: initial size not seen; screen:\n{}\n{}",
            tmux.screen(),
            logs(&server, &fake)
        );
        let screen = tmux.screen();
        assert!(
            screen.contains("TERM=screen") || screen.contains("TERM=tmux"),
            "{mode}: TERM not passed: {screen}"
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
            "{mode}: resized size not seen; screen:\n{}\n{}",
            tmux.screen(),
            logs(&server, &fake)
        );
    }
}

// ---------------------------------------------------------------------------
// 6. file transfer
// ---------------------------------------------------------------------------

/// sftp put + get of 10 MiB in one batch, then scp (SFTP mode and legacy `-O`) up, a
/// checksum inside the pod and down again, all over one connection (so one pod).
#[test]
fn sftp_and_scp_ten_mib_in_connection_mode() {
    const SIZE: usize = 10 * 1024 * 1024;
    let fake = KubeFake::start();
    let env = TestEnv::new();
    let server = start_mode(&env, &fake, "connection");
    let src = env.path().join("up.bin");
    std::fs::write(&src, random_bytes(SIZE)).expect("write up.bin");
    let sum = sha256_file(&src);

    let (mut master, control) = env.control_master(&server, "files");
    let with_control = |mut c: Command| {
        c.arg("-o")
            .arg(format!("ControlPath={}", control.display()));
        c
    };

    let back = env.path().join("down-sftp.bin");
    let out = env.sftp_put_get(
        with_control(env.sftp(&server)),
        "alice",
        (&src, "/tmp/up.bin", &back),
        CMD_TIMEOUT,
    );
    assert!(out.status.success(), "sftp: {}", ctx(&out, &server, &fake));
    assert_eq!(sha256_file(&back), sum, "sftp: downloaded file differs");

    for (flag, name) in [(None, "scp-sftp-mode"), (Some("-O"), "scp-legacy")] {
        let target = format!("/tmp/{name}.bin");
        let mut up = with_control(env.scp(&server));
        up.args(flag).arg(&src).arg(env.remote("alice", &target));
        let out = run_with_timeout(&mut up, None, CMD_TIMEOUT);
        assert!(
            out.status.success(),
            "{name} upload: {}",
            ctx(&out, &server, &fake)
        );

        let mut check = with_control(env.ssh_opts(&server));
        check
            .arg(env.destination("alice"))
            .arg(format!("sha256sum {target}"));
        let out = run_with_timeout(&mut check, None, CMD_TIMEOUT);
        assert_eq!(
            text(&out.stdout).get(..64),
            Some(sum.as_str()),
            "{name}: checksum inside the pod; {}",
            ctx(&out, &server, &fake)
        );

        let back = env.path().join(format!("back-{name}.bin"));
        let mut down = with_control(env.scp(&server));
        down.args(flag).arg(env.remote("alice", &target)).arg(&back);
        let out = run_with_timeout(&mut down, None, CMD_TIMEOUT);
        assert!(
            out.status.success(),
            "{name} download: {}",
            ctx(&out, &server, &fake)
        );
        assert_eq!(sha256_file(&back), sum, "{name}: downloaded file differs");
    }
    // All of it happened in one pod.
    assert_eq!(
        instance_pods(&fake, &env.instance).len(),
        1,
        "one pod per connection\n{}",
        logs(&server, &fake)
    );
    let _ = master.kill();
    let _ = master.wait();
}

// ---------------------------------------------------------------------------
// 7. signals (russh client)
// ---------------------------------------------------------------------------

#[derive(Debug, Default)]
struct Outcome {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: Option<u32>,
    signal: Option<String>,
}

/// Runs `command`, sends `signal` (if any) once `ready` has been printed, collects the
/// outcome until the channel closes.
async fn run_channel(channel: &mut Channel<Msg>, command: &str, signal: Option<Sig>) -> Outcome {
    channel.exec(true, command).await.expect("exec");
    let mut out = Outcome::default();
    let mut sent = signal.is_none();
    loop {
        let msg = tokio::time::timeout(CMD_TIMEOUT, channel.wait())
            .await
            .unwrap_or_else(|_| panic!("timed out waiting for the channel; so far: {out:?}"));
        match msg {
            Some(ChannelMsg::Data { data }) => {
                out.stdout.extend_from_slice(&data);
                if !sent && out.stdout.ends_with(b"ready\n") {
                    channel
                        .signal(signal.clone().expect("a signal"))
                        .await
                        .expect("signal");
                    sent = true;
                }
            }
            Some(ChannelMsg::ExtendedData { data, .. }) => out.stderr.extend_from_slice(&data),
            Some(ChannelMsg::ExitStatus { exit_status }) => out.status = Some(exit_status),
            Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                out.signal = Some(format!("{signal_name:?}"));
            }
            Some(ChannelMsg::Close) | None => break,
            Some(_) => {}
        }
    }
    out
}

/// USR1 to a trap, TERM to a sleeping program (exit-signal TERM), and a program that merely
/// exits 143 (an exit status, not a signal).
async fn signals_in_mode(mode: &str) {
    let fake = KubeFake::start();
    let env = TestEnv::new();
    let server = start_mode(&env, &fake, mode);
    let handle = connect(&env, &server).await;

    let mut ch = handle.channel_open_session().await.expect("channel");
    let out = run_channel(
        &mut ch,
        "trap 'echo trapped; exit 7' USR1; echo ready; while :; do sleep 0.1; done",
        Some(Sig::USR1),
    )
    .await;
    assert_eq!(
        (
            text(&out.stdout).as_str(),
            out.status,
            out.signal.as_deref()
        ),
        ("ready\ntrapped\n", Some(7), None),
        "{mode}: USR1 to a trap: {out:?}\n{}",
        logs(&server, &fake)
    );

    let mut ch = handle.channel_open_session().await.expect("channel");
    let out = run_channel(&mut ch, "echo ready; exec sleep 60", Some(Sig::TERM)).await;
    assert_eq!(
        (out.signal.as_deref(), out.status),
        (Some("TERM"), None),
        "{mode}: TERM must be reported as exit-signal TERM: {out:?}\n{}",
        logs(&server, &fake)
    );

    // 143 = 128 + TERM, but no signal was involved.
    let mut ch = handle.channel_open_session().await.expect("channel");
    let out = run_channel(&mut ch, "exit 143", None).await;
    assert_eq!(
        (out.status, out.signal.as_deref()),
        (Some(143), None),
        "{mode}: `exit 143` is an exit status: {out:?}\n{}",
        logs(&server, &fake)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_in_connection_mode() {
    signals_in_mode("connection").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_in_session_mode() {
    signals_in_mode("session").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_in_persistent_mode() {
    signals_in_mode("persistent").await;
}

// ---------------------------------------------------------------------------
// 8. forwarding
// ---------------------------------------------------------------------------

/// Sends `data` to the echo server on `port` and reads as many bytes back.
fn echo_round_trip(port: u16, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.write_all(data)?;
    let mut got = vec![0u8; data.len()];
    s.read_exact(&mut got)?;
    Ok(got)
}

/// Waits (bounded) until the in-pod echo server answers a probe through `-L` on `port`.
fn wait_echo(port: u16, master: &mut Background, server: &TestServer, fake: &KubeFake) {
    let mut last = String::new();
    let ready = poll_until(IO_TIMEOUT, POLL_STEP, || {
        if master.exited().is_some() {
            return Some(false);
        }
        let probe = format!("probe-{}\n", random_hex(8));
        match echo_round_trip(port, probe.as_bytes()) {
            Ok(got) if got == probe.as_bytes() => Some(true),
            Ok(got) => {
                last = format!("wrong echo {:?}", text(&got));
                None
            }
            Err(e) => {
                last = e.to_string();
                None
            }
        }
    });
    assert_eq!(
        ready,
        Some(true),
        "-L: the in-pod echo server never answered (last: {last}; master exited: {:?})\n\
         --- master stderr ---\n{}\n{}",
        master.exited(),
        master.stderr(),
        logs(server, fake)
    );
}

/// A client-side TCP server for -R: each connection's first line `L` is answered with
/// `pong L` and reported.
fn client_side_server() -> (u16, mpsc::Receiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the client-side server");
    let port = listener.local_addr().expect("local addr").port();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let tx = tx.clone();
            thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
                let Ok(mut writer) = conn.try_clone() else {
                    return;
                };
                let mut first = String::new();
                if BufReader::new(conn).read_line(&mut first).is_err() {
                    return;
                }
                let _ = writer.write_all(format!("pong {first}").as_bytes());
                let _ = tx.send(first);
            });
        }
    });
    (port, rx)
}

/// `-L` to an echo server inside the pod (one short and one 1 MiB round trip) and `-R` from
/// inside the pod to a server on the client side, over one connection.
#[test]
fn local_and_remote_tcp_forwarding_in_connection_mode() {
    let fake = KubeFake::start();
    let env = TestEnv::new();
    let yaml = format!(
        "{}{FORWARDING_ENABLED}",
        env.kube_config_yaml(&fake, "connection", "")
    );
    let server = env.start(&yaml);
    let echo_port = free_tcp_port();
    let (target_port, received) = client_side_server();
    let (mut master, ctl) = env.forwarding_master(
        &server,
        "kube",
        &[
            "-L",
            &format!("{echo_port}:127.0.0.1:9000"),
            "-R",
            &format!("0:127.0.0.1:{target_port}"),
        ],
    );
    let _servers = Background::spawn(
        env.ssh_via(&server, &ctl)
            .arg("socat -t 30 TCP-LISTEN:9000,fork,reuseaddr EXEC:cat"),
        env.path(),
        "servers",
    );

    // -L: wait until the echo server answers through the tunnel, then check the bytes.
    wait_echo(echo_port, &mut master, &server, &fake);
    let big = random_bytes(1024 * 1024);
    let got = echo_round_trip(echo_port, &big).unwrap_or_else(|e| {
        panic!(
            "-L 1 MiB: {e}\n--- master stderr ---\n{}\n{}",
            master.stderr(),
            logs(&server, &fake)
        )
    });
    assert!(got == big, "-L: 1 MiB came back changed");

    // -R: the allocated port listens inside the pod and reaches the client side.
    let said = poll_until(IO_TIMEOUT, POLL_STEP, || {
        let t = master.stderr();
        t.contains("Allocated port ").then_some(t)
    })
    .unwrap_or_else(|| {
        panic!(
            "-R: no `Allocated port`\n--- master stderr ---\n{}\n{}",
            master.stderr(),
            logs(&server, &fake)
        )
    });
    let allocated: u16 = said
        .split("Allocated port ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no port in: {said}"));
    assert_ne!(allocated, 0);
    let ping = format!("ping-{}", random_hex(8));
    let out = run_with_timeout(
        env.ssh_via(&server, &ctl).arg(format!(
            "timeout 20 socat -t 5 TCP:127.0.0.1:{allocated} \
             SYSTEM:'echo {ping}; head -n 1 > /tmp/reply' && cat /tmp/reply"
        )),
        None,
        CMD_TIMEOUT,
    );
    let info = ctx(&out, &server, &fake);
    let got = received
        .recv_timeout(IO_TIMEOUT)
        .unwrap_or_else(|_| panic!("-R: the client-side server got no connection\n{info}"));
    assert_eq!(got, format!("{ping}\n"), "{info}");
    assert_eq!(text(&out.stdout), format!("pong {ping}\n"), "{info}");
    assert!(master.exited().is_none(), "{}", master.stderr());
}

// ---------------------------------------------------------------------------
// 9. Kubernetes specifics
// ---------------------------------------------------------------------------

/// An image the fake cannot "pull": the user is told (naming the image), quickly, the exit
/// is non-zero, and the pod is deleted.
#[test]
fn an_image_that_cannot_be_pulled_is_reported_quickly_and_cleaned_up() {
    let fake = KubeFake::start();
    // The console container's image, then the agent's init image (whose failure shows only
    // in initContainerStatuses while the containers wait in PodInitializing).
    let cases = [
        ("console", support::test_image()),
        ("agent init", support::agent_init_image()),
    ];
    for ((which, replaced), mode) in cases
        .iter()
        .flat_map(|c| ["connection", "session"].map(|m| (c, m)))
    {
        let label = format!("{mode} ({which} image)");
        let env = TestEnv::new();
        let image = "kubefake.invalid/does-not-exist:1";
        let yaml = env
            .kube_config_yaml(&fake, mode, "")
            .replace(replaced.as_str(), image);
        assert!(yaml.contains(image), "test setup");
        let server = env.start(&yaml);
        let t0 = Instant::now();
        let out = run_with_timeout(env.ssh(&server, "alice").arg("echo hi"), None, CMD_TIMEOUT);
        let took = t0.elapsed();
        let info = ctx(&out, &server, &fake);
        let stderr = text(&out.stderr);
        assert_ne!(out.status.code(), Some(0), "{label}: {info}");
        assert!(out.stdout.is_empty(), "{label}: {info}");
        assert!(
            stderr.contains(image) || stderr.to_lowercase().contains("pull"),
            "{label}: the message must name the image or the pull: {info}"
        );
        // The default pod start timeout is 60 s; the pull error must end it far sooner.
        assert!(
            took < Duration::from_secs(20),
            "{label}: took {took:?}; {info}"
        );
        assert!(
            wait_no_instance_pods(&fake, &env.instance, true),
            "{label}: pods left: {:?}, containers: {:?}\n{}",
            instance_pods(&fake, &env.instance),
            fake.docker_containers(None),
            logs(&server, &fake)
        );
        eprintln!(
            "{label}: pull error reported after {took:?}: {}",
            stderr.trim()
        );
    }
}

/// The pod a login ran in (its hostname is the pod name) is deleted when the client
/// disconnects, with its Docker containers.
#[test]
fn pods_are_deleted_on_disconnect() {
    let fake = KubeFake::start();
    for mode in ["connection", "session"] {
        let env = TestEnv::new();
        let server = start_mode(&env, &fake, mode);
        let out = run_with_timeout(env.ssh(&server, "alice").arg("hostname"), None, CMD_TIMEOUT);
        let info = ctx(&out, &server, &fake);
        assert_eq!(out.status.code(), Some(0), "{mode}: {info}");
        let pod = text(&out.stdout).trim().to_string();
        assert!(!pod.is_empty(), "{mode}: no hostname; {info}");
        let t0 = Instant::now();
        let gone = poll_until(GONE_TIMEOUT, POLL_STEP, || {
            (pod_phase(&fake, &pod).is_none()
                && instance_pods(&fake, &env.instance).is_empty()
                && fake.docker_containers(Some(&pod)).is_empty())
            .then_some(())
        });
        assert!(
            gone.is_some(),
            "{mode}: pod {pod} still there {GONE_TIMEOUT:?} after disconnect \
             (phase {:?}, instance pods {:?}, containers {:?})\n{}",
            pod_phase(&fake, &pod),
            instance_pods(&fake, &env.instance),
            fake.docker_containers(Some(&pod)),
            logs(&server, &fake)
        );
        eprintln!(
            "{mode}: pod {pod} gone {:?} after the client exited",
            t0.elapsed()
        );
    }
}

/// A server killed with SIGKILL leaves its pod; a new server with the same instanceId
/// deletes it.
#[test]
fn reaper_deletes_pods_a_killed_server_left() {
    let fake = KubeFake::start();
    let env = TestEnv::new();
    let yaml = env.kube_config_yaml(&fake, "connection", "");
    let mut server = env.start(&yaml);
    let mut client = hold_session(&env, &server, &fake, "echo ready; sleep 600");
    let before = instance_pods(&fake, &env.instance);
    server.kill9();
    let _ = client.kill();
    let _ = client.wait();
    assert_eq!(
        before.len(),
        1,
        "one pod for the session: {before:?}\n{}",
        logs(&server, &fake)
    );
    let left = instance_pods(&fake, &env.instance);
    assert_eq!(left, before, "the killed server must leave its pod behind");
    let restarted = env.start(&yaml);
    assert!(
        wait_no_instance_pods(&fake, &env.instance, true),
        "the restarted server did not reap {left:?} (pods now {:?}, containers {:?})\n{}",
        instance_pods(&fake, &env.instance),
        fake.docker_containers(None),
        logs(&restarted, &fake)
    );
    // And it serves logins.
    let out = run_with_timeout(
        env.ssh(&restarted, "alice").arg("echo after-reap"),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(
        text(&out.stdout),
        "after-reap\n",
        "{}",
        ctx(&out, &restarted, &fake)
    );
}

/// Persistent mode: the named pod is created when missing, shared by later logins (a file
/// written by the first is read by the second, same hostname) and not deleted on disconnect.
#[test]
fn persistent_pod_is_created_reused_and_kept() {
    let fake = KubeFake::start();
    let env = TestEnv::new();
    let (yaml, name) = mode_yaml(&env, &fake, "persistent", "");
    let name = name.expect("persistent pod name");
    assert_eq!(
        pod_phase(&fake, &name),
        None,
        "test setup: the pod must not exist yet"
    );
    let server = env.start(&yaml);

    let out = run_with_timeout(
        env.ssh(&server, "alice")
            .arg("echo kept > /tmp/state; hostname"),
        None,
        CMD_TIMEOUT,
    );
    let info = ctx(&out, &server, &fake);
    assert_eq!(out.status.code(), Some(0), "{info}");
    assert_eq!(
        text(&out.stdout).trim(),
        name,
        "the login ran in the named pod: {info}"
    );

    let out = run_with_timeout(
        env.ssh(&server, "bob").arg("cat /tmp/state; hostname"),
        None,
        CMD_TIMEOUT,
    );
    let info = ctx(&out, &server, &fake);
    assert_eq!(
        text(&out.stdout).lines().collect::<Vec<_>>(),
        ["kept", name.as_str()],
        "the second login must see the first one's file: {info}"
    );
    assert_eq!(out.status.code(), Some(0), "{info}");
    assert_eq!(
        pod_phase(&fake, &name).as_deref(),
        Some("Running"),
        "the pod must outlive the connections\n{}",
        logs(&server, &fake)
    );
    assert_eq!(
        all_pods(&fake),
        [name.as_str()],
        "exactly the named pod exists"
    );
}

/// A fake that offers only `v4.channel.k8s.io`: output and exit status still arrive, and a
/// program that does not read its stdin to EOF finishes normally (EOF cannot be passed on v4).
#[test]
fn exec_works_on_a_v4_only_cluster() {
    let fake = KubeFake::start_with(&["--max-subprotocol", "v4"]);
    for mode in ["connection", "session"] {
        let env = TestEnv::new();
        // A login file: written through the agent's stdin, which v4 cannot close (the agent
        // is told the size instead).
        let block = "auth:\n  metadata:\n    files:\n      /tmp/motd:\n        value: \"written on v4\\n\"\n";
        let yaml = mode_yaml(&env, &fake, mode, "")
            .0
            .replacen("auth:\n", block, 1);
        let server = env.start(&yaml);
        let t0 = Instant::now();
        let out = run_with_timeout(
            env.ssh(&server, "alice").arg("cat /tmp/motd"),
            None,
            CMD_TIMEOUT,
        );
        let info = ctx(&out, &server, &fake);
        assert_eq!(text(&out.stdout), "written on v4\n", "{mode}: {info}");
        // Well under commandStart (60 s), which a file waiting for EOF would run into.
        assert!(t0.elapsed() < Duration::from_secs(20), "{mode}: {info}");
        let out = run_with_timeout(
            env.ssh(&server, "alice")
                .arg("echo hi; echo err >&2; exit 4"),
            None,
            CMD_TIMEOUT,
        );
        let info = ctx(&out, &server, &fake);
        assert_eq!(text(&out.stdout), "hi\n", "{mode}: {info}");
        assert_eq!(text(&out.stderr), "err\n", "{mode}: {info}");
        assert_eq!(out.status.code(), Some(4), "{mode}: {info}");

        let out = run_with_timeout(
            env.ssh(&server, "alice").arg("head -c 3"),
            Some(b"abcdef"),
            CMD_TIMEOUT,
        );
        let info = ctx(&out, &server, &fake);
        assert_eq!(text(&out.stdout), "abc", "{mode}: {info}");
        assert_eq!(out.status.code(), Some(0), "{mode}: {info}");
    }
    let log = fake.log();
    assert!(
        log.contains("proto=v4.channel.k8s.io") && !log.contains("proto=v5.channel.k8s.io"),
        "the exec streams must have used v4: {}",
        tail(&log, 40)
    );
}

/// `kubernetes.connection.kubeconfig` instead of explicit fields: with a bearer token and
/// with a client certificate.
#[test]
fn kubeconfig_files_with_token_and_client_certificate() {
    let fake = KubeFake::start();
    for (what, kubeconfig) in [
        ("token", &fake.kubeconfig_token),
        ("client certificate", &fake.kubeconfig_cert),
    ] {
        let env = TestEnv::new();
        let connection = format!("    kubeconfig: \"{}\"\n", kubeconfig.display());
        let yaml = env.kube_config_yaml_with(&connection, "connection", "");
        let server = env.start(&yaml);
        let out = run_with_timeout(
            env.ssh(&server, "alice").arg("echo via-kubeconfig"),
            None,
            CMD_TIMEOUT,
        );
        let info = ctx(&out, &server, &fake);
        assert_eq!(text(&out.stdout), "via-kubeconfig\n", "{what}: {info}");
        assert_eq!(out.status.code(), Some(0), "{what}: {info}");
        assert!(
            wait_no_instance_pods(&fake, &env.instance, false),
            "{what}: the pod must be deleted with the same credentials\n{}",
            logs(&server, &fake)
        );
    }
}

/// `bearerTokenFile`: the token is rotated while a session is open; the next login works (the
/// server re-reads the file after a 401) and the open session's pod is deleted when it ends.
#[test]
fn a_rotated_bearer_token_file_is_reread() {
    let fake = KubeFake::start();
    let env = TestEnv::new();
    let connection = format!(
        "    host: \"{}\"\n    cacertFile: \"{}\"\n    bearerTokenFile: \"{}\"\n",
        fake.url,
        fake.ca_cert.display(),
        fake.token_file.display()
    );
    let server = env.start(&env.kube_config_yaml_with(&connection, "connection", ""));
    let mut first = hold_session(&env, &server, &fake, "echo ready; sleep 600");
    let first_pods = instance_pods(&fake, &env.instance);
    assert_eq!(first_pods.len(), 1, "{}", logs(&server, &fake));

    let rotated = format!("rotated-{}", random_hex(16));
    fake.set_token(&rotated);
    assert_eq!(
        std::fs::read_to_string(&fake.token_file)
            .expect("token file")
            .trim(),
        rotated,
        "test setup: set_token rewrites the file the server reads"
    );
    let out = run_with_timeout(
        env.ssh(&server, "alice").arg("echo after-rotation"),
        None,
        CMD_TIMEOUT,
    );
    let info = ctx(&out, &server, &fake);
    assert_eq!(text(&out.stdout), "after-rotation\n", "{info}");
    assert_eq!(out.status.code(), Some(0), "{info}");

    // The first session's pod is deleted (with the new token) when it ends.
    let _ = first.kill();
    let _ = first.wait();
    assert!(
        wait_no_instance_pods(&fake, &env.instance, true),
        "pods left after rotation: {:?}\n{}",
        instance_pods(&fake, &env.instance),
        logs(&server, &fake)
    );
}

/// Persistent mode: `-L` reaches a listener in the named pod; a second login (another
/// connection, same pod) reaches the same listener directly.
#[test]
fn persistent_mode_local_forward() {
    let fake = KubeFake::start();
    let env = TestEnv::new();
    let (yaml, name) = mode_yaml(&env, &fake, "persistent", "");
    let name = name.expect("persistent pod name");
    let server = env.start(&format!("{yaml}{FORWARDING_ENABLED}"));
    let echo_port = free_tcp_port();
    let (mut master, ctl) = env.forwarding_master(
        &server,
        "persistent",
        &["-L", &format!("{echo_port}:127.0.0.1:9000")],
    );
    let _servers = Background::spawn(
        env.ssh_via(&server, &ctl)
            .arg("socat -t 30 TCP-LISTEN:9000,fork,reuseaddr EXEC:cat"),
        env.path(),
        "servers",
    );
    wait_echo(echo_port, &mut master, &server, &fake);
    let data = format!("persistent-{}\n", random_hex(64)).into_bytes();
    let got = echo_round_trip(echo_port, &data).unwrap_or_else(|e| {
        panic!(
            "-L round trip: {e}\n--- master stderr ---\n{}\n{}",
            master.stderr(),
            logs(&server, &fake)
        )
    });
    assert!(got == data, "-L: the echo came back changed");
    // The listener really is in the named pod.
    let out = run_with_timeout(
        env.ssh(&server, "bob")
            .arg("hostname; echo direct | socat -t 5 - TCP:127.0.0.1:9000"),
        None,
        CMD_TIMEOUT,
    );
    let info = ctx(&out, &server, &fake);
    assert_eq!(text(&out.stdout), format!("{name}\ndirect\n"), "{info}");
    assert!(master.exited().is_none(), "{}", master.stderr());
}

/// Session mode: forwarding is refused even when enabled (no pod per connection to forward
/// into), and sessions keep working.
#[test]
fn session_mode_refuses_forwarding() {
    let fake = KubeFake::start();
    let env = TestEnv::new();
    let yaml = format!(
        "{}{FORWARDING_ENABLED}",
        env.kube_config_yaml(&fake, "session", "")
    );
    let server = env.start(&yaml);
    let port = free_tcp_port();
    let (master, ctl) = env.forwarding_master(
        &server,
        "session",
        &["-L", &format!("{port}:127.0.0.1:9000")],
    );
    let probe = format!("must-not-arrive-{}\n", random_hex(4));
    match echo_round_trip(port, probe.as_bytes()) {
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            ) => {}
        other => panic!(
            "-L in session mode must be closed at once, got {other:?}\n\
             --- master stderr ---\n{}\n{}",
            master.stderr(),
            logs(&server, &fake)
        ),
    }
    let said = poll_until(IO_TIMEOUT, POLL_STEP, || {
        let t = master.stderr();
        t.contains("open failed").then_some(t)
    });
    assert!(
        said.is_some(),
        "the master never reported the refusal\n--- master stderr ---\n{}\n{}",
        master.stderr(),
        logs(&server, &fake)
    );
    let out = run_with_timeout(
        env.ssh_control(&server, &ctl)
            .args(["-O", "forward", "-R", "0:127.0.0.1:9"])
            .arg(env.destination("alice")),
        None,
        CMD_TIMEOUT,
    );
    assert!(
        !out.status.success(),
        "-R must be refused in session mode: {}",
        ctx(&out, &server, &fake)
    );
    let out = run_with_timeout(
        env.ssh_via(&server, &ctl).arg("echo still-works"),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(
        text(&out.stdout),
        "still-works\n",
        "{}",
        ctx(&out, &server, &fake)
    );
}

/// A program that does not exist, started through the agent: exit status 127 and a message
/// naming it.
#[test]
fn a_missing_program_exits_127_with_a_message() {
    let fake = KubeFake::start();
    for mode in ["connection", "session"] {
        let env = TestEnv::new();
        let server = start_mode(&env, &fake, mode);
        let out = run_with_timeout(
            env.ssh(&server, "alice").arg("/no/such/program"),
            None,
            CMD_TIMEOUT,
        );
        let info = ctx(&out, &server, &fake);
        assert_eq!(out.status.code(), Some(127), "{mode}: {info}");
        assert!(
            text(&out.stderr).contains("/no/such/program"),
            "{mode}: the message must name the program: {info}"
        );
    }
}

/// SIGTERM: the server tells open sessions it is shutting down, deletes their pods and
/// exits 0.
#[test]
fn sigterm_drains_sessions_and_deletes_pods() {
    let fake = KubeFake::start();
    for mode in ["connection", "session"] {
        let env = TestEnv::new();
        let mut server = start_mode(&env, &fake, mode);
        let client = hold_session(&env, &server, &fake, "echo ready; sleep 600");
        assert_eq!(
            instance_pods(&fake, &env.instance).len(),
            1,
            "{mode}: one pod for the session\n{}",
            logs(&server, &fake)
        );
        let status = server.sigterm_and_wait(Duration::from_secs(30));
        assert_eq!(
            status.and_then(|s| s.code()),
            Some(0),
            "{mode}: the server did not exit 0 on SIGTERM\n{}",
            logs(&server, &fake)
        );
        assert!(
            wait_no_instance_pods(&fake, &env.instance, true),
            "{mode}: pods left after the drain: {:?}\n{}",
            instance_pods(&fake, &env.instance),
            logs(&server, &fake)
        );
        let out = client.wait_with_output().expect("ssh client");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("shutting down"),
            "{mode}: the session was not told: {stderr}\n{}",
            logs(&server, &fake)
        );
    }
}

// ---------------------------------------------------------------------------
// Login files and environment (auth.metadata), as tests/metadata.rs for Docker
// ---------------------------------------------------------------------------

/// `auth.metadata` files are written into the pod (through the agent, before any session
/// starts; in session mode while `console --wait` holds the program) with their modes, and
/// the operator's environment wins over the client's, in all three modes.
#[test]
fn login_files_and_environment_reach_every_session() {
    for mode in MODES {
        let env = TestEnv::new();
        let fake = KubeFake::start();
        let secrets = env.path().join("secrets");
        std::fs::create_dir_all(&secrets).unwrap();
        std::fs::write(secrets.join("alice"), "alice's token\n").unwrap();
        let block = format!(
            "auth:\n  metadata:\n    environment:\n      LAB_NAME: lab-1\n    files:\n      /tmp/welcome.txt:\n        value: \"hello from the operator\\n\"\n        mode: \"0644\"\n      /tmp/token:\n        source: \"{}/%u\"\n",
            secrets.display()
        );
        let yaml = mode_yaml(&env, &fake, mode, "")
            .0
            .replacen("auth:\n", &block, 1);
        let server = env.start(&yaml);
        let out = run_with_timeout(
            env.ssh(&server, "alice")
                .args(["-o", "SetEnv=LAB_NAME=client CLIENT_VAR=kept"])
                .arg("cat /tmp/welcome.txt /tmp/token; stat -c %a /tmp/welcome.txt /tmp/token; echo $LAB_NAME $CLIENT_VAR"),
            None,
            CMD_TIMEOUT,
        );
        assert_eq!(
            text(&out.stdout),
            "hello from the operator\nalice's token\n644\n600\nlab-1 kept\n",
            "{mode}: {}",
            ctx(&out, &server, &fake)
        );
        assert!(
            out.status.success(),
            "{mode}: {}",
            ctx(&out, &server, &fake)
        );
        assert!(
            !server.output().contains("alice's token"),
            "{mode}: a file's content reached the log"
        );
    }
}

/// Connection pods start sessions through the agent's `session-server`, exec'd once for the
/// connection (not the main process: the node logs a container's output): the kubelet (here
/// the fake's engine) sees that one exec for a command and a terminal session. With
/// `agent.sessionServer: false` each is an exec.
#[test]
fn connection_pods_start_sessions_without_an_exec_unless_turned_off() {
    let fake = KubeFake::start();
    for (mode, through_agent) in [("connection", true), ("connection-exec", false)] {
        let env = TestEnv::new();
        let since = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs()
            .saturating_sub(1)
            .to_string();
        let server = start_mode(&env, &fake, mode);
        let (mut master, control) = env.control_master(&server, mode);
        let out = run_with_timeout(
            env.ssh_via(&server, &control)
                .arg("echo out; echo err >&2; exit 3"),
            None,
            CMD_TIMEOUT,
        );
        let info = ctx(&out, &server, &fake);
        assert_eq!(out.status.code(), Some(3), "{mode}: {info}");
        assert_eq!(text(&out.stdout), "out\n", "{mode}: {info}");
        assert_eq!(text(&out.stderr), "err\n", "{mode}: {info}");
        let tty = run_with_timeout(
            env.ssh_via(&server, &control)
                .args(["-tt", "stty size; tty"]),
            None,
            CMD_TIMEOUT,
        );
        let info = ctx(&tty, &server, &fake);
        assert!(text(&tty.stdout).contains("/dev/pts/"), "{mode}: {info}");
        let execs = support::docker_exec_creates(&fake.docker_containers(None), &since);
        if through_agent {
            assert_eq!(execs, 1, "{mode}: {}", server.output());
        } else {
            assert!(execs >= 2, "{mode}: {execs} execs");
        }
        let _ = master.kill();
        let _ = master.wait();
    }
}
