//! Flow control: a channel whose program does not read holds at most its window, while the
//! connection's other channels and other connections carry on; what all channels may hold is
//! bounded by the per-connection and total budgets. Real engine, russh's client and OpenSSH's.

use crate::support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use russh::ChannelMsg;
use support::russh_client::{connect, run};
use support::{describe, run_with_timeout, TestEnv};
use tokio::io::AsyncWriteExt;

/// The server grants a channel at most this much window (`limits::CHANNEL_WINDOW_MAX`), and
/// starts it with `limits::CHANNEL_WINDOW_INITIAL`.
const WINDOW_MAX: usize = 2 * 1024 * 1024;
/// A write the client cannot make for this long is waiting for window.
const BLOCKED: Duration = Duration::from_secs(2);

/// Writes up to `total` bytes into the channel in 64 KiB pieces until a piece waits longer
/// than [`BLOCKED`] for window; returns what was written.
async fn push_until_blocked(
    writer: &mut (impl tokio::io::AsyncWrite + Unpin),
    total: usize,
) -> usize {
    let piece = vec![b'x'; 64 * 1024];
    let mut sent = 0;
    while sent < total {
        match tokio::time::timeout(BLOCKED, writer.write_all(&piece)).await {
            Ok(Ok(())) => sent += piece.len(),
            Ok(Err(e)) => panic!("write failed after {sent} bytes: {e}"),
            Err(_) => break,
        }
    }
    sent
}

/// A program that never reads its stdin while the client pushes 30 MiB into it: the server
/// takes no more than the channel's window, and a second channel on the same connection opens
/// and runs at once (it used to time out: the server stopped reading the whole connection).
#[tokio::test(flavor = "multi_thread")]
async fn a_program_that_does_not_read_stalls_only_its_own_channel() {
    let env = TestEnv::new();
    let server = env.start_mode("connection");
    let handle = connect(&env, &server).await;
    let stalled = handle.channel_open_session().await.unwrap();
    stalled.exec(true, "sleep 120").await.unwrap();
    let (_read, write) = stalled.split();
    let mut writer = write.make_writer();
    let sent = push_until_blocked(&mut writer, 30 * 1024 * 1024).await;
    // Beyond the window, what the path to the program buffers: the unix socket to the engine
    // (its send and receive buffers, ~208 KiB each by default, autotuned), the engine's copy
    // buffers and the container's pipe (64 KiB). Typically 2.19 MiB gets in; one loaded suite
    // run saw 2.44 MiB. The old server took the whole 30 MiB.
    assert!(
        sent <= WINDOW_MAX + 1024 * 1024,
        "the server took {sent} bytes for a program that does not read: {}",
        server.output()
    );

    let t = Instant::now();
    let second = tokio::time::timeout(Duration::from_secs(1), handle.channel_open_session()).await;
    let opened_in = t.elapsed();
    assert!(
        matches!(second, Ok(Ok(_))),
        "a second channel did not open within 1 s ({opened_in:?}) with {sent} bytes pushed: {}",
        server.output()
    );
    drop(second);
    let (out, status) = tokio::time::timeout(Duration::from_secs(30), run(&handle, "echo fine"))
        .await
        .expect("a command on the same connection runs");
    assert_eq!((out.as_slice(), status), (&b"fine\n"[..], Some(0)));
    eprintln!(
        "pushed {sent} bytes before the window closed; second channel opened in {opened_in:?}"
    );
}

/// OpenSSH's ControlMaster: one `ssh -S` session pushes endless stdin into a program that
/// never reads, another runs commands on the same connection, unaffected.
#[test]
fn control_master_sessions_do_not_stall_each_other() {
    let env = TestEnv::new();
    let server = env.start_mode("connection");
    let (mut master, control) = env.control_master(&server, "flow");
    let mut blocked = env
        .ssh_via(&server, &control)
        .arg("sleep 120")
        .stdin(std::fs::File::open("/dev/zero").unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The blocked session's channel is open and its window exhausted long before this runs
    // twice (2 MiB of zeroes); each run must still take no longer than an unloaded one.
    for _ in 0..3 {
        let t = Instant::now();
        let out = run_with_timeout(
            env.ssh_via(&server, &control).arg("echo working"),
            None,
            Duration::from_secs(30),
        );
        assert_eq!(out.stdout, b"working\n", "{}", describe(&out, &server));
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "took {:?}",
            t.elapsed()
        );
    }
    let _ = blocked.kill();
    let _ = blocked.wait();
    let _ = master.kill();
    let _ = master.wait();
}

/// The harness's configuration with `extra` lines under `ssh:`.
fn config(env: &TestEnv, mode: &str, extra: &str) -> String {
    env.config_yaml(mode)
        .replacen("ssh:\n", &format!("ssh:\n{extra}"), 1)
}

/// A channel running `cmd`, with the client pushing up to `total` bytes into it until the
/// window closes: what the server took.
async fn push_into(
    handle: &russh::client::Handle<support::russh_client::Recorder>,
    cmd: &str,
    total: usize,
) -> (russh::ChannelReadHalf, usize) {
    let ch = handle.channel_open_session().await.expect("channel opens");
    ch.exec(true, cmd).await.expect("exec");
    let (read, write) = ch.split();
    let mut writer = write.make_writer();
    let sent = push_until_blocked(&mut writer, total).await;
    // The writer stays open (its window is simply exhausted); the channel stays with `read`.
    std::mem::forget(writer);
    (read, sent)
}

/// 4 connections × 8 channels whose programs stop reading after 4 MiB, the client pushing
/// on: each connection holds at most `ssh.buffers.perConnection`, all of them at most
/// `total`, and the server's memory grows by no more than that (plus what 32 running execs
/// cost anyway). Meanwhile a fifth connection pipes 50 MiB through `cat` intact, and a fresh
/// OpenSSH login works.
#[tokio::test(flavor = "multi_thread")]
async fn budgets_bound_what_stalled_programs_make_the_server_hold() {
    const PER_CONNECTION: usize = 4 * 1024 * 1024;
    const TOTAL: usize = 24 * 1024 * 1024;
    let env = TestEnv::new();
    let yaml = config(
        &env,
        "connection",
        &format!("  buffers:\n    perConnection: {PER_CONNECTION}\n    total: 24MiB\n"),
    );
    let server = env.start(&yaml);
    let before = support::rss::kib(server.pid());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (peak, sampler) = support::rss::sample_peak(server.pid(), std::sync::Arc::clone(&stop));

    let mut held = Vec::new();
    let mut total_pushed = 0;
    for c in 0..4 {
        let handle = connect(&env, &server).await;
        let pushes = (0..8).map(|_| {
            push_into(
                &handle,
                "head -c 4194304 >/dev/null; exec sleep 600",
                16 * 1024 * 1024,
            )
        });
        let results = futures_util::future::join_all(pushes).await;
        // Each program read 4 MiB; the rest sits in our queues, the kernel's socket buffers
        // and the engine's, and the container's pipe.
        let beyond: usize = results
            .iter()
            .map(|(_, n)| n.saturating_sub(4 * 1024 * 1024))
            .sum();
        eprintln!("connection {c}: the 8 stalled programs' channels took {beyond} bytes beyond what they read");
        total_pushed += beyond;
        held.push((handle, results));
    }

    // A fifth connection: 50 MiB through cat, both ways at once, intact.
    let handle = connect(&env, &server).await;
    let data: Vec<u8> = (0..50 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let want = support::sha256_hex(&data);
    let ch = handle.channel_open_session().await.expect("cat channel");
    ch.exec(true, "cat").await.unwrap();
    let (mut read, write) = ch.split();
    let writer = tokio::spawn(async move {
        let mut w = write.make_writer();
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
        drop(w);
        write.eof().await.unwrap();
    });
    let mut got = Vec::with_capacity(50 * 1024 * 1024);
    let reading = async {
        while let Some(msg) = read.wait().await {
            match msg {
                ChannelMsg::Data { data } => got.extend_from_slice(&data),
                ChannelMsg::Eof | ChannelMsg::Close => break,
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), reading)
        .await
        .expect("50 MiB through cat within 2 minutes");
    writer.await.unwrap();
    assert_eq!(got.len(), 50 * 1024 * 1024);
    assert_eq!(support::sha256_hex(&got), want, "cat's output differs");

    let out = run_with_timeout(
        env.ssh(&server, "alice").arg("echo fresh"),
        None,
        Duration::from_secs(60),
    );
    assert_eq!(out.stdout, b"fresh\n", "{}", describe(&out, &server));

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    let peak = peak.load(std::sync::atomic::Ordering::Relaxed);
    let grew = peak.saturating_sub(before);
    eprintln!(
        "server RSS: {before} KiB before, {peak} KiB at the peak (+{grew} KiB); stalled programs hold {total_pushed} bytes; budgets {PER_CONNECTION} per connection, {TOTAL} in all"
    );
    // The budgets, plus what 33 execs' streams and tasks cost whatever they carry.
    assert!(
        grew <= (TOTAL as u64 / 1024) + 32 * 1024,
        "the server grew by {grew} KiB"
    );
    drop(held);
}
