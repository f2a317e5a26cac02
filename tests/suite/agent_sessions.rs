//! `containerssh-agent session-server`'s programs (`Spawn`, `Resize`, `Signal`, `Exited`),
//! driven over its stdin/stdout with real processes on this machine (no Docker). Every wait
//! has a timeout (the helper's).

use std::time::{Duration, Instant};

use containerssh::agent::proto::{Frame, INITIAL_CREDIT, PROGRAM_CREDIT};

use super::agent_forward::Agent;

fn strings(v: &[&str]) -> Vec<Vec<u8>> {
    v.iter().map(|s| s.as_bytes().to_vec()).collect()
}

fn spawn_pipes(agent: &mut Agent, id: u32, argv: &[&str], env: &[&str]) {
    agent.send(Frame::Spawn {
        id,
        tty: false,
        stderr_id: id + 1,
        rows: 0,
        cols: 0,
        argv: strings(argv),
        env: strings(env),
    });
    expect_opened(agent, id);
}

/// Waits for `Opened` of `id`, passing over what earlier programs still send.
fn expect_opened(agent: &mut Agent, id: u32) {
    loop {
        match agent.recv() {
            Frame::Opened { id: o, port: 0 } if o == id => return,
            Frame::Data { id: o, .. } | Frame::Eof { id: o } | Frame::Ack { id: o, .. }
                if o < id => {}
            Frame::Exited { id: o, .. } if o < id => {}
            other => panic!("expected Opened for {id}, got {other:?}"),
        }
    }
}

fn spawn_tty(agent: &mut Agent, id: u32, argv: &[&str], rows: u16, cols: u16) {
    agent.send(Frame::Spawn {
        id,
        tty: true,
        stderr_id: 0,
        rows,
        cols,
        argv: strings(argv),
        env: strings(&["TERM=xterm"]),
    });
    expect_opened(agent, id);
}

/// What a program sent until its `Exited`: output per stream id, the order of `Eof`s, and
/// `(status, signal)`. Acks everything, as the server does.
#[derive(Default, Debug)]
struct Ran {
    out: std::collections::HashMap<u32, Vec<u8>>,
    eofs: Vec<u32>,
    exit: Option<(u32, u8)>,
}

fn run_until(agent: &mut Agent, id: u32, ran: &mut Ran, done: impl Fn(&Ran) -> bool) {
    while !done(ran) {
        match agent.recv() {
            Frame::Data { id: s, data } => {
                agent.send(Frame::Ack {
                    id: s,
                    bytes: data.len() as u32,
                });
                ran.out.entry(s).or_default().extend_from_slice(&data);
            }
            Frame::Eof { id: s } => ran.eofs.push(s),
            Frame::Exited {
                id: e,
                status,
                signal,
            } if e == id => ran.exit = Some((status, signal)),
            // Our stdin delivered: the credit comes back.
            Frame::Ack { .. } => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

fn run_to_exit(agent: &mut Agent, id: u32) -> Ran {
    let mut ran = Ran::default();
    run_until(agent, id, &mut ran, |r| r.exit.is_some());
    ran
}

fn text(ran: &Ran, id: u32) -> String {
    String::from_utf8_lossy(ran.out.get(&id).map_or(&[][..], |v| v)).into_owned()
}

#[test]
fn pipes_keep_stdout_stderr_env_and_the_exit_code_apart() {
    let mut agent = Agent::start_command("session-server");
    spawn_pipes(
        &mut agent,
        1,
        &["/bin/sh", "-c", "echo out $GREETING; echo err >&2; exit 3"],
        &["GREETING=hello"],
    );
    let ran = run_to_exit(&mut agent, 1);
    assert_eq!(text(&ran, 1), "out hello\n");
    assert_eq!(text(&ran, 2), "err\n");
    // Both ends of output precede the exit.
    let mut eofs = ran.eofs.clone();
    eofs.sort_unstable();
    assert_eq!(eofs, [1, 2]);
    assert_eq!(ran.exit, Some((3, 0)));
}

#[test]
fn stdin_flows_in_and_its_eof_ends_cat() {
    let mut agent = Agent::start_command("session-server");
    spawn_pipes(&mut agent, 1, &["cat"], &[]);
    let big: Vec<u8> = (0..3 * PROGRAM_CREDIT as usize)
        .map(|i| (i % 251) as u8)
        .collect();
    let mut ran = Ran::default();
    // A program's stdin has the usual credit (its output the larger one).
    let mut credit = INITIAL_CREDIT as usize;
    let mut sent = 0;
    // Within the agent's credit: wait for its Acks (and read cat's output) as we go.
    while sent < big.len() {
        if credit == 0 {
            match agent.recv() {
                Frame::Ack { id: 1, bytes } => credit += bytes as usize,
                Frame::Data { id: s, data } => {
                    agent.send(Frame::Ack {
                        id: s,
                        bytes: data.len() as u32,
                    });
                    ran.out.entry(s).or_default().extend_from_slice(&data);
                }
                other => panic!("unexpected {other:?}"),
            }
            continue;
        }
        let n = credit.min(32 * 1024).min(big.len() - sent);
        agent.send(Frame::Data {
            id: 1,
            data: big[sent..sent + n].to_vec(),
        });
        sent += n;
        credit -= n;
    }
    agent.send(Frame::Eof { id: 1 });
    loop {
        match agent.recv() {
            Frame::Ack { .. } => {}
            Frame::Data { id: s, data } => {
                agent.send(Frame::Ack {
                    id: s,
                    bytes: data.len() as u32,
                });
                ran.out.entry(s).or_default().extend_from_slice(&data);
            }
            Frame::Eof { id } => ran.eofs.push(id),
            Frame::Exited {
                id: 1,
                status,
                signal,
            } => {
                ran.exit = Some((status, signal));
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ran.out.get(&1).map(Vec::len), Some(big.len()));
    assert!(ran.out.get(&1) == Some(&big), "cat echoed other bytes");
    assert_eq!(ran.exit, Some((0, 0)));
}

#[test]
fn a_terminal_has_its_size_follows_resizes_and_is_the_controlling_one() {
    let mut agent = Agent::start_command("session-server");
    spawn_tty(&mut agent, 1, &["/bin/sh"], 24, 80);
    let mut ran = Ran::default();
    agent.send(Frame::Data {
        id: 1,
        data: b"stty size; echo marker-$(tty)-$(tty </dev/tty)\n".to_vec(),
    });
    // `/dev/tty` opens only for a process with a controlling terminal.
    run_until(&mut agent, 1, &mut ran, |r| {
        text(r, 1).contains("-/dev/tty\r\n")
    });
    assert!(
        text(&ran, 1).contains("marker-/dev/pts/"),
        "{:?}",
        text(&ran, 1)
    );
    assert!(text(&ran, 1).contains("24 80"), "{:?}", text(&ran, 1));
    agent.send(Frame::Resize {
        id: 1,
        rows: 50,
        cols: 132,
    });
    agent.send(Frame::Data {
        id: 1,
        data: b"stty size; exit 7\n".to_vec(),
    });
    run_until(&mut agent, 1, &mut ran, |r| r.exit.is_some());
    assert!(text(&ran, 1).contains("50 132"), "{:?}", text(&ran, 1));
    assert_eq!(ran.exit, Some((7, 0)));
    assert_eq!(ran.eofs, [1]);
}

#[test]
fn a_signal_reaches_the_program_and_its_death_is_reported() {
    let mut agent = Agent::start_command("session-server");
    spawn_pipes(
        &mut agent,
        1,
        &["/bin/sh", "-c", "echo ready; exec sleep 100"],
        &[],
    );
    let mut ran = Ran::default();
    run_until(&mut agent, 1, &mut ran, |r| text(r, 1) == "ready\n");
    agent.send(Frame::Signal { id: 1, signal: 15 });
    run_until(&mut agent, 1, &mut ran, |r| r.exit.is_some());
    assert_eq!(ran.exit, Some((143, 15)));
}

#[test]
fn a_missing_program_exits_127_with_the_reason_on_stderr() {
    let mut agent = Agent::start_command("session-server");
    spawn_pipes(&mut agent, 1, &["/nonexistent/program"], &[]);
    let ran = run_to_exit(&mut agent, 1);
    assert_eq!(ran.exit, Some((127, 0)));
    assert!(
        text(&ran, 2).contains("cannot execute /nonexistent/program"),
        "{:?}",
        text(&ran, 2)
    );
}

#[test]
fn closing_a_terminal_program_hangs_it_up() {
    let mut agent = Agent::start_command("session-server");
    spawn_tty(
        &mut agent,
        1,
        &["/bin/sh", "-c", "echo pid=$$; exec sleep 100"],
        0,
        0,
    );
    let mut ran = Ran::default();
    run_until(&mut agent, 1, &mut ran, |r| text(r, 1).contains('\n'));
    let line = text(&ran, 1);
    let pid: u32 = line
        .trim()
        .strip_prefix("pid=")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"));
    let proc_dir = format!("/proc/{pid}");
    assert!(std::path::Path::new(&proc_dir).exists());
    agent.send(Frame::Close { id: 1 });
    // SIGHUP ends `sleep`; the agent reaps it and /proc forgets it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::path::Path::new(&proc_dir).exists() {
        assert!(
            Instant::now() < deadline,
            "the program outlived its hang-up"
        );
        std::thread::yield_now();
    }
    // The agent goes on serving.
    spawn_pipes(&mut agent, 3, &["/bin/sh", "-c", "exit 0"], &[]);
    assert_eq!(run_to_exit(&mut agent, 3).exit, Some((0, 0)));
}

/// A program that never reads its stdin fills the pipe and blocks the agent's write; the
/// server then closing it must not block the agent's frame loop.
#[test]
fn closing_a_program_whose_stdin_is_full_leaves_the_agent_serving() {
    let mut agent = Agent::start_command("session-server");
    spawn_pipes(&mut agent, 1, &["/bin/sh", "-c", "exec sleep 100"], &[]);
    // Four times a pipe's 64 KiB (within the credit), so the agent's write blocks.
    for _ in 0..(INITIAL_CREDIT as usize / (32 * 1024)) {
        agent.send(Frame::Data {
            id: 1,
            data: vec![b'x'; 32 * 1024],
        });
    }
    agent.send(Frame::Close { id: 1 });
    spawn_pipes(&mut agent, 3, &["/bin/sh", "-c", "echo still here"], &[]);
    let mut ran = Ran::default();
    run_until(&mut agent, 3, &mut ran, |r| r.exit.is_some());
    assert_eq!(text(&ran, 3), "still here\n");
}

#[test]
fn forward_server_refuses_to_start_programs() {
    let mut agent = Agent::start_command("forward-server");
    agent.send(Frame::Spawn {
        id: 1,
        tty: false,
        stderr_id: 2,
        rows: 0,
        cols: 0,
        argv: strings(&["true"]),
        env: vec![],
    });
    match agent.recv() {
        Frame::Failed { id: 1, message } => {
            assert!(message.contains("session-server"), "{message}")
        }
        other => panic!("expected Failed, got {other:?}"),
    }
}

#[test]
fn term_ends_the_session_server() {
    let mut agent = Agent::start_command("session-server");
    // Once a program has run, the signal thread is surely listening.
    spawn_pipes(&mut agent, 1, &["true"], &[]);
    assert_eq!(run_to_exit(&mut agent, 1).exit, Some((0, 0)));
    let pid = rustix::process::Pid::from_raw(agent.child.id() as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("kill");
    assert_eq!(agent.wait_exit().code(), Some(0));
}

// ---------------------------------------------------------------------------------------
// Through the server, against the real engine.
// ---------------------------------------------------------------------------------------

use crate::support::{describe, docker_exec_creates, run_with_timeout, TestEnv};

const CMD_TIMEOUT: Duration = Duration::from_secs(90);

fn inspect(container: &str, format: &str) -> String {
    let out = std::process::Command::new("docker")
        .args(["inspect", "-f", format, container])
        .output()
        .expect("docker inspect");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// How a connection's sessions reach its container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// The main process is the session-server, reached by attach: no exec at all.
    MainProcess,
    /// The engine logs the main process: one exec'd session-server for the connection.
    OneExec,
    /// `agent.sessionServer: false`: an exec per session.
    ExecEach,
}

/// Connection mode starts sessions through the container's session-server, not the exec API:
/// the container runs it as its main process and the engine records no exec at all, for a
/// command, a terminal session and an SFTP transfer on one connection. Where the engine logs
/// the main process (a `LogConfig` of the operator's), the session-server is one exec for the
/// connection, so no session's bytes reach the log. With `agent.sessionServer: false` each
/// session is an exec.
#[test]
fn connection_sessions_start_without_an_exec_unless_turned_off() {
    for (mode, path) in [
        ("connection", Path::MainProcess),
        ("connection-logged", Path::OneExec),
        ("connection-exec", Path::ExecEach),
    ] {
        let env = TestEnv::new();
        let yaml = match mode {
            "connection-logged" => env.config_yaml("connection").replace(
                "    mode: \"connection\"\n",
                "    mode: \"connection\"\n    host:\n      LogConfig:\n        Type: json-file\n",
            ),
            other => env.config_yaml(other),
        };
        assert!(mode != "connection-logged" || yaml.contains("json-file"));
        let server = env.start(&yaml);
        let (mut master, control) = env.control_master(&server, mode);
        let out = run_with_timeout(
            env.ssh_via(&server, &control)
                .arg("echo out; echo err >&2; exit 3"),
            None,
            CMD_TIMEOUT,
        );
        let info = describe(&out, &server);
        assert_eq!(out.status.code(), Some(3), "{mode}: {info}");
        assert_eq!(out.stdout, b"out\n", "{mode}: {info}");
        assert_eq!(out.stderr, b"err\n", "{mode}: {info}");
        let tty = run_with_timeout(
            env.ssh_via(&server, &control)
                .args(["-tt", "stty size; tty"]),
            None,
            CMD_TIMEOUT,
        );
        let text = String::from_utf8_lossy(&tty.stdout).into_owned();
        assert!(
            text.contains("/dev/pts/"),
            "{mode}: {}",
            describe(&tty, &server)
        );
        let data: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 253) as u8).collect();
        let sent = env.path().join(format!("{mode}.bin"));
        std::fs::write(&sent, &data).expect("write the upload");
        let got = env.path().join(format!("{mode}.back"));
        let mut over_master = env.sftp(&server);
        over_master
            .arg("-o")
            .arg(format!("ControlPath={}", control.display()));
        let sftp = env.sftp_put_get(
            over_master,
            "alice",
            (&sent, "/tmp/up.bin", &got),
            CMD_TIMEOUT,
        );
        assert!(
            sftp.status.success(),
            "{mode}: {}",
            describe(&sftp, &server)
        );
        assert!(
            std::fs::read(&got).expect("read the download") == data,
            "{mode}: sftp changed the file"
        );

        let containers = env.containers();
        assert_eq!(containers.len(), 1, "{mode}: {containers:?}");
        let cmd = inspect(&containers[0], "{{json .Config.Cmd}}");
        // The engine's own record of execs (a finished exec leaves no trace in ExecIDs).
        let created = inspect(&containers[0], "{{.Created}}");
        let execs = docker_exec_creates(&containers, &created);
        match path {
            Path::MainProcess => {
                assert!(cmd.contains("session-server"), "{mode}: main command {cmd}");
                assert_eq!(execs, 0, "{mode}: execs\n{}", server.output());
            }
            Path::OneExec => {
                assert!(cmd.contains("wait-signal"), "{mode}: main command {cmd}");
                assert_eq!(execs, 1, "{mode}: execs\n{}", server.output());
                let logs = std::process::Command::new("docker")
                    .args(["logs", &containers[0]])
                    .output()
                    .expect("docker logs");
                assert!(logs.stdout.is_empty(), "{mode}: the engine logged output");
            }
            Path::ExecEach => {
                assert!(cmd.contains("wait-signal"), "{mode}: main command {cmd}");
                // The command, the terminal session and sftp-server at least.
                assert!(execs >= 3, "{mode}: {execs} execs");
            }
        }
        let _ = master.kill();
        let _ = master.wait();
        assert!(
            env.wait_no_containers(Duration::from_secs(60)),
            "{mode}: the container outlived its connection"
        );
    }
}
