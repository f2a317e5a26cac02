//! Requests the OpenSSH client cannot send, driven with russh's client: `signal` in session
//! mode, `exit-signal` reporting, and the per-connection channel limit.

use crate::support;

use std::time::Duration;

use russh::client::Msg;
use russh::{Channel, ChannelMsg, Sig};
use support::russh_client::connect;
use support::TestEnv;

#[derive(Debug, Default)]
struct Outcome {
    stdout: Vec<u8>,
    status: Option<u32>,
    signal: Option<String>,
}

/// Runs `command`, sends `signal` once `ready` has been printed, collects the outcome.
async fn run_and_signal(channel: &mut Channel<Msg>, command: &str, signal: Sig) -> Outcome {
    channel.exec(true, command).await.expect("exec");
    let mut out = Outcome::default();
    let mut sent = false;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), channel.wait())
            .await
            .expect("timed out waiting for the channel");
        match msg {
            Some(ChannelMsg::Data { data }) => {
                out.stdout.extend_from_slice(&data);
                if !sent && out.stdout.ends_with(b"ready\n") {
                    channel.signal(signal.clone()).await.expect("signal");
                    sent = true;
                }
            }
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

/// USR1 to a trap, TERM to a sleeping program (exit-signal TERM, through the agent), KILL, and
/// a program that merely exits 143 (an exit status, not a signal).
async fn signals_in_mode(mode: &str) {
    let env = TestEnv::new();
    let server = env.start_mode(mode);
    let handle = connect(&env, &server).await;

    let mut ch = handle.channel_open_session().await.expect("channel");
    let out = run_and_signal(
        &mut ch,
        "trap 'echo trapped; exit 7' USR1; echo ready; while :; do sleep 0.1; done",
        Sig::USR1,
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "ready\ntrapped\n",
        "{mode}: {}",
        server.output()
    );
    assert_eq!(out.status, Some(7), "{mode}");
    assert_eq!(out.signal, None, "{mode}");

    // A program that dies of the signal is reported with exit-signal, not a number.
    for sig in [Sig::TERM, Sig::KILL] {
        let mut ch = handle.channel_open_session().await.expect("channel");
        let out = run_and_signal(&mut ch, "echo ready; exec sleep 60", sig.clone()).await;
        assert_eq!(
            out.signal,
            Some(format!("{sig:?}")),
            "{mode}: {out:?}\n{}",
            server.output()
        );
        assert_eq!(out.status, None, "{mode}");
    }

    // 143 = 128 + TERM, but no signal was involved: the agent knows the difference.
    let mut ch = handle.channel_open_session().await.expect("channel");
    ch.exec(true, "exit 143").await.expect("exec");
    let mut out = Outcome::default();
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(60), ch.wait())
        .await
        .expect("timed out waiting for the channel")
    {
        match msg {
            ChannelMsg::ExitStatus { exit_status } => out.status = Some(exit_status),
            ChannelMsg::ExitSignal { signal_name, .. } => {
                out.signal = Some(format!("{signal_name:?}"))
            }
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    assert_eq!((out.status, out.signal), (Some(143), None), "{mode}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_reach_the_program_in_session_mode() {
    signals_in_mode("session").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_reach_programs_in_connection_mode_through_the_session_server() {
    signals_in_mode("connection").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_reach_exec_programs_in_connection_mode_through_the_agent() {
    signals_in_mode("connection-exec").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_reach_exec_programs_in_persistent_mode() {
    let env = TestEnv::new();
    let name = format!("containerssh-test-sig-{}", support::random_hex(6));
    let yaml = env.config_yaml("persistent").replace(
        "    mode: \"persistent\"\n",
        &format!("    mode: \"persistent\"\n    containername: {name}\n    createMissingContainer: true\n"),
    );
    let server = env.start(&yaml);
    let handle = connect(&env, &server).await;
    let mut ch = handle.channel_open_session().await.expect("channel");
    let out = run_and_signal(&mut ch, "echo ready; exec sleep 60", Sig::TERM).await;
    let _ = std::process::Command::new("docker")
        .args(["rm", "-f", &name])
        .output();
    assert_eq!(
        out.signal.as_deref(),
        Some("TERM"),
        "{out:?}\n{}",
        server.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_agent_exec_signals_are_refused_and_logged() {
    let env = TestEnv::new();
    let yaml = env.config_yaml("connection").replace(
        "    shellCommand: [\"/bin/sh\"]\n",
        "    shellCommand: [\"/bin/sh\"]\n    idleCommand: [\"/bin/sleep\", \"infinity\"]\n    disableAgent: true\n",
    );
    let server = env.start(&yaml);
    let handle = connect(&env, &server).await;
    let mut ch = handle.channel_open_session().await.expect("channel");
    ch.exec(true, "echo ready; read x; echo still here")
        .await
        .expect("exec");
    let mut stdout = Vec::new();
    while !stdout.ends_with(b"ready\n") {
        match tokio::time::timeout(Duration::from_secs(60), ch.wait()).await {
            Ok(Some(ChannelMsg::Data { data })) => stdout.extend_from_slice(&data),
            Ok(Some(_)) => {}
            other => panic!("no ready: {other:?}\n{}", server.output()),
        }
    }
    ch.signal(Sig::TERM).await.expect("signal");
    assert!(
        server.wait_for_output("signal not delivered", Duration::from_secs(20)),
        "{}",
        server.output()
    );
    ch.data(&b"\n"[..]).await.expect("data");
    let mut out = Outcome::default();
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(60), ch.wait())
        .await
        .expect("timed out")
    {
        match msg {
            ChannelMsg::Data { data } => out.stdout.extend_from_slice(&data),
            ChannelMsg::ExitStatus { exit_status } => out.status = Some(exit_status),
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    assert_eq!(String::from_utf8_lossy(&out.stdout), "still here\n");
    assert_eq!(out.status, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_beyond_the_limit_are_refused_and_the_rest_keep_working() {
    let env = TestEnv::new();
    let server = env.start_mode("connection");
    let handle = connect(&env, &server).await;
    let mut open = Vec::new();
    for _ in 0..containerssh::limits::MAX_CHANNELS_PER_CONNECTION {
        open.push(
            handle
                .channel_open_session()
                .await
                .expect("channel within the limit"),
        );
    }
    assert!(
        handle.channel_open_session().await.is_err(),
        "a channel beyond the limit must be refused"
    );
    // The connection is still usable: close one and run a command on a new one.
    let first = open.remove(0);
    first.close().await.expect("close");
    // The server handles the close before the open that follows it on the same connection.
    let mut ch = handle
        .channel_open_session()
        .await
        .expect("a freed slot can be used again");
    ch.exec(true, "echo still-here").await.expect("exec");
    let mut stdout = Vec::new();
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(60), ch.wait())
        .await
        .expect("timed out")
    {
        match msg {
            ChannelMsg::Data { data } => stdout.extend_from_slice(&data),
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    assert_eq!(stdout, b"still-here\n", "{}", server.output());
}

/// `security.signal` with a deny list: a denied signal is dropped (and logged) while the
/// program keeps running; an allowed one is delivered. The rule reads its own mode
/// (ContainerSSH's read the shell's).
#[tokio::test(flavor = "multi_thread")]
async fn the_signal_filter_drops_denied_signals() {
    let env = TestEnv::new();
    let yaml = format!(
        "{}security:\n  signal:\n    mode: enable\n    deny: [TERM]\n  shell:\n    mode: disable\n",
        env.config_yaml("connection")
    );
    let server = env.start(&yaml);
    let handle = connect(&env, &server).await;
    // TERM is denied: the trap never fires; USR1 (allowed) ends the program afterwards.
    let mut channel = handle.channel_open_session().await.expect("session");
    channel
        .exec(
            true,
            "trap 'echo got-term; exit 3' TERM; trap 'echo got-usr1; exit 7' USR1; echo ready; while :; do sleep 0.1; done",
        )
        .await
        .expect("exec");
    let mut stdout = Vec::new();
    let mut status = None;
    let mut sent_term = false;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), channel.wait())
            .await
            .expect("timed out waiting for the channel");
        match msg {
            Some(ChannelMsg::Data { data }) => {
                stdout.extend_from_slice(&data);
                if !sent_term && stdout.ends_with(b"ready\n") {
                    channel.signal(Sig::TERM).await.expect("signal");
                    sent_term = true;
                    // USR1 only once the TERM refusal is logged: had TERM been delivered,
                    // its trap would have run first.
                    assert!(
                        server.wait_for_output(
                            "signal refused: security.signal",
                            Duration::from_secs(10)
                        ),
                        "{}",
                        server.output()
                    );
                    channel.signal(Sig::USR1).await.expect("signal");
                }
            }
            Some(ChannelMsg::ExitStatus { exit_status }) => status = Some(exit_status),
            Some(ChannelMsg::Close) | None => break,
            Some(_) => {}
        }
    }
    assert_eq!(
        String::from_utf8_lossy(&stdout),
        "ready\ngot-usr1\n",
        "{}",
        server.output()
    );
    assert_eq!(status, Some(7), "{}", server.output());
}
