//! A session channel's phases (`src/ssh/session_channel.rs`) driven with russh's client
//! against the server in this process on the fake backend: what each request gets in each
//! phase, and what arrives while a container starts (a window change, signals, EOF, a close)
//! is neither lost nor waited on. No engine: the fake's programs are scripted here.

use crate::support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use containerssh::backend::fake::{self, FakeBackend, FakeEvent};
use containerssh::config::model::ExecutionMode;
use russh::client::Msg;
use russh::{Channel, ChannelMsg, Sig};
use support::russh_client::{connect, reply};
use support::{TestEnv, TestServer};
use tokio::io::AsyncReadExt;

const SLOW: Duration = Duration::from_secs(2);

fn serve(env: &TestEnv, mode: &str, backend: FakeBackend) -> (TestServer, FakeBackend) {
    let server = env.start_in_process(&env.config_yaml(mode), Arc::new(backend.clone()));
    (server, backend)
}

/// What a channel reported until it closed.
#[derive(Debug, Default)]
struct Seen {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    status: Option<u32>,
    signal: Option<String>,
}

async fn collect(ch: &mut Channel<Msg>) -> Seen {
    let mut seen = Seen::default();
    while let Some(msg) = ch.wait().await {
        match msg {
            ChannelMsg::Data { data } => seen.stdout.extend_from_slice(&data),
            ChannelMsg::ExtendedData { data, .. } => seen.stderr.extend_from_slice(&data),
            ChannelMsg::ExitStatus { exit_status } => seen.status = Some(exit_status),
            ChannelMsg::ExitSignal { signal_name, .. } => {
                seen.signal = Some(format!("{signal_name:?}"))
            }
            _ => {}
        }
    }
    seen
}

/// Requested: a terminal, variables and the program are recorded and reach the program;
/// once it runs, a second terminal, variables and a second program are refused.
#[tokio::test(flavor = "multi_thread")]
async fn requests_before_and_after_the_program() {
    let env = TestEnv::new();
    let (server, fake) = serve(
        &env,
        "connection",
        FakeBackend::new(ExecutionMode::Connection, |_| {
            // One line back, then the end (a terminal does not pass the client's EOF on).
            fake::script(|mut io| async move {
                let mut line = Vec::new();
                let mut byte = [0u8; 1];
                while io.stdin.read_exact(&mut byte).await.is_ok() {
                    line.push(byte[0]);
                    if byte[0] == b'\n' {
                        break;
                    }
                }
                io.stdout(line).await;
                0
            })
        }),
    );
    let handle = connect(&env, &server).await;
    let mut ch = handle.channel_open_session().await.unwrap();
    ch.request_pty(true, "xterm", 100, 40, 0, 0, &[])
        .await
        .unwrap();
    assert!(reply(&mut ch).await);
    ch.set_env(true, "LC_ONE", "1").await.unwrap();
    assert!(reply(&mut ch).await);
    ch.exec(true, "cat").await.unwrap();
    assert!(reply(&mut ch).await);
    // Running: too late for these.
    ch.request_pty(true, "xterm", 80, 24, 0, 0, &[])
        .await
        .unwrap();
    assert!(!reply(&mut ch).await, "a second pty-req");
    ch.set_env(true, "LC_TWO", "2").await.unwrap();
    assert!(!reply(&mut ch).await, "env after the start");
    ch.exec(true, "cat").await.unwrap();
    assert!(!reply(&mut ch).await, "a second program");
    ch.data(&b"through\n"[..]).await.unwrap();
    let seen = collect(&mut ch).await;
    assert_eq!(seen.stdout, b"through\n");
    assert_eq!(seen.status, Some(0));
    let ran = fake
        .events()
        .into_iter()
        .find(|e| matches!(e, FakeEvent::Ran { .. }))
        .unwrap();
    let FakeEvent::Ran {
        argv,
        env: vars,
        tty,
    } = ran
    else {
        unreachable!()
    };
    assert_eq!(argv, ["/bin/sh", "-c", "cat"]);
    assert!(vars.contains(&"LC_ONE=1".to_string()), "{vars:?}");
    assert!(vars.contains(&"TERM=xterm".to_string()), "{vars:?}");
    assert!(!vars.iter().any(|v| v.starts_with("LC_TWO")), "{vars:?}");
    assert_eq!(tty, Some((40, 100)));
}

/// Starting (the container takes 2 s): a window change, two signals, data and EOF sent
/// meanwhile are all answered at once, and reach the program once it runs, in order: the
/// terminal starts at the latest size, the signals arrive, stdin holds the data then ends.
#[tokio::test(flavor = "multi_thread")]
async fn what_comes_while_the_container_starts_is_kept_for_the_program() {
    let env = TestEnv::new();
    let backend = FakeBackend::new(ExecutionMode::Connection, |_| {
        fake::script(|mut io| async move {
            let size = *io.size.borrow();
            // What was typed ahead (a terminal does not pass the client's EOF on).
            let mut input = vec![0u8; "typed ahead".len()];
            let _ = io.stdin.read_exact(&mut input).await;
            let mut signals = Vec::new();
            while let Ok(s) = io.signals.try_recv() {
                signals.push(s);
            }
            io.stdout(format!(
                "size={size:?} signals={signals:?} stdin={}\n",
                String::from_utf8_lossy(&input)
            ))
            .await;
            0
        })
    })
    .with_start_delay(SLOW);
    let (server, _fake) = serve(&env, "connection", backend);
    let handle = connect(&env, &server).await;
    let mut ch = handle.channel_open_session().await.unwrap();
    ch.request_pty(true, "xterm", 80, 24, 0, 0, &[])
        .await
        .unwrap();
    assert!(reply(&mut ch).await);
    let t = Instant::now();
    ch.exec(true, "program").await.unwrap();
    assert!(reply(&mut ch).await);
    ch.window_change(120, 50, 0, 0).await.unwrap();
    ch.signal(Sig::USR1).await.unwrap();
    ch.signal(Sig::HUP).await.unwrap();
    ch.data(&b"typed ahead"[..]).await.unwrap();
    ch.eof().await.unwrap();
    // None of that waited for the container (the data and EOF only use up window).
    let answered = t.elapsed();
    assert!(answered < SLOW, "answered after {answered:?}");
    let seen = collect(&mut ch).await;
    assert!(t.elapsed() >= SLOW);
    assert_eq!(
        String::from_utf8_lossy(&seen.stdout),
        "size=Some((50, 120)) signals=[\"USR1\", \"HUP\"] stdin=typed ahead\n",
        "{}",
        server.output()
    );
}

/// A signal before any program is requested goes nowhere; more signals than the channel
/// keeps while its program starts are refused, logged.
#[tokio::test(flavor = "multi_thread")]
async fn signals_before_the_program_and_beyond_the_limit() {
    let env = TestEnv::new();
    let backend =
        FakeBackend::new(ExecutionMode::Connection, |_| fake::print("", 0)).with_start_delay(SLOW);
    let (server, fake) = serve(&env, "connection", backend);
    let handle = connect(&env, &server).await;
    let mut ch = handle.channel_open_session().await.unwrap();
    ch.signal(Sig::TERM).await.unwrap();
    ch.exec(true, "true").await.unwrap();
    assert!(reply(&mut ch).await);
    for _ in 0..20 {
        ch.signal(Sig::USR1).await.unwrap();
    }
    let seen = collect(&mut ch).await;
    assert_eq!(seen.status, Some(0));
    assert!(server.wait_for_output("signals waiting for the program to start", SLOW));
    let delivered = fake
        .events()
        .iter()
        .filter(|e| matches!(e, FakeEvent::Signalled(_)))
        .count();
    assert!(delivered <= 16, "{delivered} delivered");
    assert!(
        !fake.events().contains(&FakeEvent::Signalled("TERM".into())),
        "a signal before the program reached it"
    );
}

/// A channel closed while its session container starts: the start completes (so nothing is
/// left unknown), the container is removed, nothing waits.
#[tokio::test(flavor = "multi_thread")]
async fn a_close_while_starting_removes_the_session_container() {
    let env = TestEnv::new();
    let backend = FakeBackend::new(ExecutionMode::Session, |_| {
        fake::script(|mut io| async move {
            io.read_all().await;
            0
        })
    })
    .with_start_delay(SLOW);
    let (server, fake) = serve(&env, "session", backend);
    let handle = connect(&env, &server).await;
    let ch = handle.channel_open_session().await.unwrap();
    ch.exec(true, "sleep").await.unwrap();
    let starting = support::poll_until(SLOW, Duration::from_millis(5), || {
        fake.events().contains(&FakeEvent::Starting).then_some(())
    });
    assert!(starting.is_some(), "{}", server.output());
    ch.close().await.unwrap();
    let removed = support::poll_until(SLOW * 5, Duration::from_millis(20), || {
        fake.events()
            .contains(&FakeEvent::RemovedSession)
            .then_some(())
    });
    assert!(
        removed.is_some(),
        "{:?}\n{}",
        fake.events(),
        server.output()
    );
    assert_eq!(fake.running(), 0, "the program still runs");
}

/// How a program ended: its status, or the signal it died of (128+N after signal N).
#[tokio::test(flavor = "multi_thread")]
async fn exit_status_and_exit_signal() {
    let env = TestEnv::new();
    let backend = FakeBackend::new(ExecutionMode::Connection, |spec| {
        if spec.argv.last().is_some_and(|c| c == "three") {
            return fake::print("bye\n", 3);
        }
        fake::script(|mut io| async move {
            match io.signals.recv().await {
                Some(s) if s == "TERM" => 128 + 15,
                _ => 1,
            }
        })
    });
    let (server, _fake) = serve(&env, "connection", backend);
    let handle = connect(&env, &server).await;
    let mut ch = handle.channel_open_session().await.unwrap();
    ch.exec(true, "three").await.unwrap();
    let seen = collect(&mut ch).await;
    assert_eq!(
        (seen.stdout.as_slice(), seen.status),
        (&b"bye\n"[..], Some(3))
    );

    let mut ch = handle.channel_open_session().await.unwrap();
    ch.exec(true, "wait").await.unwrap();
    assert!(reply(&mut ch).await);
    ch.signal(Sig::TERM).await.unwrap();
    let seen = collect(&mut ch).await;
    assert_eq!(
        seen.signal.as_deref(),
        Some("TERM"),
        "{seen:?}\n{}",
        server.output()
    );
}

/// A container that cannot start: one line on stderr, exit status 1.
#[tokio::test(flavor = "multi_thread")]
async fn a_start_failure_is_one_line_and_status_1() {
    let env = TestEnv::new();
    let backend = FakeBackend::new(ExecutionMode::Connection, |_| fake::print("", 0))
        .failing("no room at the inn");
    let (server, _fake) = serve(&env, "connection", backend);
    let handle = connect(&env, &server).await;
    let mut ch = handle.channel_open_session().await.unwrap();
    ch.exec(true, "true").await.unwrap();
    let seen = collect(&mut ch).await;
    assert_eq!(seen.status, Some(1));
    assert_eq!(
        String::from_utf8_lossy(&seen.stderr),
        "cannot start your container: the container failed to start: no room at the inn\n",
        "{}",
        server.output()
    );
}
