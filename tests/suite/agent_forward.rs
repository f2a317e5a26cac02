//! `containerssh-agent forward-server`, driven over its stdin/stdout with the frames of
//! `containerssh::agent::proto` against local sockets (no Docker). Every wait has a timeout.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use containerssh::agent::proto::{decode, Frame, AGENT_ID_BASE, INITIAL_CREDIT, MAX_DATA};

/// Bound for every wait on the agent or a socket.
const TIMEOUT: Duration = Duration::from_secs(20);

/// A running `forward-server` (or `session-server`) with a thread decoding its stdout.
pub(crate) struct Agent {
    pub(crate) child: Child,
    stdin: Option<ChildStdin>,
    frames: Receiver<Frame>,
}

impl Agent {
    fn start() -> Agent {
        Agent::start_command("forward-server")
    }

    pub(crate) fn start_command(command: &str) -> Agent {
        let mut child = Command::new(env!("CARGO_BIN_EXE_containerssh-agent"))
            .arg(command)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the agent");
        let mut stdout = child.stdout.take().expect("stdout");
        let stdin = child.stdin.take();
        let (tx, frames) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                let n = match stdout.read(&mut chunk) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                let mut used = 0;
                while let Some((f, len)) = decode(&buf[used..]).expect("the agent's frames decode")
                {
                    used += len;
                    if tx.send(f).is_err() {
                        return;
                    }
                }
                buf.drain(..used);
            }
        });
        Agent {
            child,
            stdin,
            frames,
        }
    }

    pub(crate) fn send(&mut self, frame: Frame) {
        let mut bytes = Vec::new();
        frame.encode(&mut bytes);
        self.send_raw(&bytes);
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        self.stdin
            .as_mut()
            .expect("stdin open")
            .write_all(bytes)
            .expect("write to the agent");
    }

    pub(crate) fn recv(&self) -> Frame {
        match self.frames.recv_timeout(TIMEOUT) {
            Ok(f) => f,
            Err(e) => panic!("no frame from the agent: {e}"),
        }
    }

    /// Waits for the agent to exit (its stdout ends first), discarding frames.
    pub(crate) fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.frames.recv_timeout(left) {
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!("the agent did not exit"),
            }
        }
        self.child.wait().expect("wait for the agent")
    }

    fn close_stdin(&mut self) {
        self.stdin = None;
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An echo server on 127.0.0.1: each connection gets back what it sends, then EOF after EOF.
fn echo_server() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind echo");
    let port = l.local_addr().unwrap().port();
    thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { return };
            thread::spawn(move || {
                let mut out = conn.try_clone().expect("clone");
                let _ = std::io::copy(&mut conn, &mut out);
                let _ = out.shutdown(Shutdown::Write);
            });
        }
    });
    port
}

/// Deterministic pseudo-random bytes.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// The state of one stream seen from the server side of the protocol.
#[derive(Default)]
struct Seen {
    data: Vec<u8>,
    acked: u64,
    eof: bool,
    close: bool,
}

/// Receives frames for stream `id` into `seen` until `done` holds, acknowledging Data.
fn collect(agent: &mut Agent, id: u32, seen: &mut Seen, done: impl Fn(&Seen) -> bool) {
    while !done(seen) {
        match agent.recv() {
            Frame::Data { id: i, data } if i == id => {
                assert!(!seen.eof, "Data after Eof");
                agent.send(Frame::Ack {
                    id,
                    bytes: data.len() as u32,
                });
                seen.data.extend_from_slice(&data);
            }
            Frame::Ack { id: i, bytes } if i == id => seen.acked += u64::from(bytes),
            Frame::Eof { id: i } if i == id => seen.eof = true,
            Frame::Close { id: i } if i == id => seen.close = true,
            other => panic!("unexpected frame for stream {id}: {other:?}"),
        }
    }
}

fn dial_tcp(agent: &mut Agent, id: u32, port: u16) {
    agent.send(Frame::DialTcp {
        id,
        port,
        host: "127.0.0.1".into(),
    });
    assert_eq!(agent.recv(), Frame::Opened { id, port: 0 });
}

#[test]
fn dial_tcp_round_trip_half_close_and_close() {
    let port = echo_server();
    let mut agent = Agent::start();
    dial_tcp(&mut agent, 1, port);
    agent.send(Frame::Data {
        id: 1,
        data: b"hello".to_vec(),
    });
    let mut seen = Seen::default();
    collect(&mut agent, 1, &mut seen, |s| {
        s.data.len() == 5 && s.acked == 5
    });
    assert_eq!(seen.data, b"hello");
    // Our Eof reaches the echo server, which ends its side; the agent sends Eof, then Close
    // (both directions are done).
    agent.send(Frame::Eof { id: 1 });
    collect(&mut agent, 1, &mut seen, |s| s.close);
    assert!(seen.eof, "Eof precedes Close");
    // Frames for the released id are ignored; the agent keeps serving.
    agent.send(Frame::Data {
        id: 1,
        data: b"late".to_vec(),
    });
    agent.send(Frame::Close { id: 1 });
    dial_tcp(&mut agent, 2, port);
    agent.close_stdin();
    assert_eq!(agent.wait_exit().code(), Some(0));
}

#[test]
fn twenty_mib_both_ways_within_credit() {
    const TOTAL: usize = 20 * 1024 * 1024;
    let port = echo_server();
    let mut agent = Agent::start();
    dial_tcp(&mut agent, 7, port);
    let payload = pattern(TOTAL, 7);
    let (mut sent, mut credit, mut sent_eof) = (0usize, INITIAL_CREDIT as usize, false);
    let (mut received, mut unacked) = (Vec::with_capacity(TOTAL), 0usize);
    let (mut eof, mut close) = (false, false);
    while !(eof && close) {
        while credit > 0 && sent < TOTAL {
            let n = credit.min(MAX_DATA).min(TOTAL - sent);
            agent.send(Frame::Data {
                id: 7,
                data: payload[sent..sent + n].to_vec(),
            });
            sent += n;
            credit -= n;
        }
        if sent == TOTAL && !sent_eof {
            agent.send(Frame::Eof { id: 7 });
            sent_eof = true;
        }
        match agent.recv() {
            Frame::Ack { id: 7, bytes } => {
                credit += bytes as usize;
                assert!(
                    credit <= INITIAL_CREDIT as usize,
                    "Ack beyond what was sent"
                );
            }
            Frame::Data { id: 7, data } => {
                assert!(!eof);
                received.extend_from_slice(&data);
                unacked += data.len();
                // Acks go out in batches, so an agent ignoring its credit would show here.
                assert!(
                    unacked <= INITIAL_CREDIT as usize,
                    "agent exceeded its credit"
                );
                if unacked >= INITIAL_CREDIT as usize / 2 {
                    agent.send(Frame::Ack {
                        id: 7,
                        bytes: unacked as u32,
                    });
                    unacked = 0;
                }
            }
            Frame::Eof { id: 7 } => {
                eof = true;
                if unacked > 0 {
                    agent.send(Frame::Ack {
                        id: 7,
                        bytes: unacked as u32,
                    });
                    unacked = 0;
                }
            }
            Frame::Close { id: 7 } => close = true,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(sent, TOTAL);
    assert_eq!(
        credit, INITIAL_CREDIT as usize,
        "every byte was acknowledged"
    );
    assert_eq!(received.len(), TOTAL);
    assert!(received == payload, "the echoed bytes differ");
}

#[test]
fn agent_stops_at_its_credit() {
    // A server that writes 1 MiB at once; the agent may forward only INITIAL_CREDIT of it
    // until we acknowledge.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let writer = thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        c.write_all(&pattern(1 << 20, 3)).unwrap();
    });
    let mut agent = Agent::start();
    dial_tcp(&mut agent, 3, port);
    let mut got = 0usize;
    while got < INITIAL_CREDIT as usize {
        match agent.recv() {
            Frame::Data { id: 3, data } => got += data.len(),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(got, INITIAL_CREDIT as usize);
    // Nothing more without credit (a negative check: a short quiet period).
    match agent.frames.recv_timeout(Duration::from_millis(300)) {
        Err(RecvTimeoutError::Timeout) => {}
        other => panic!("the agent sent beyond its credit: {other:?}"),
    }
    agent.send(Frame::Ack { id: 3, bytes: 100 });
    match agent.recv() {
        Frame::Data { id: 3, data } => {
            assert!(data.len() <= 100);
            got += data.len();
        }
        other => panic!("unexpected {other:?}"),
    }
    // Acknowledge the rest of what arrived; `collect` then acknowledges as it goes.
    agent.send(Frame::Ack {
        id: 3,
        bytes: (got - 100) as u32,
    });
    let mut seen = Seen::default();
    collect(&mut agent, 3, &mut seen, |s| s.eof);
    assert_eq!(got + seen.data.len(), 1 << 20);
    writer.join().unwrap();
}

#[test]
fn dial_failures_reply_failed() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut agent = Agent::start();
    agent.send(Frame::DialTcp {
        id: 1,
        port,
        host: "127.0.0.1".into(),
    });
    match agent.recv() {
        Frame::Failed { id: 1, message } => {
            assert!(message.contains("127.0.0.1"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
    agent.send(Frame::DialUnix {
        id: 2,
        path: b"/nonexistent/containerssh/sock".to_vec(),
    });
    assert!(matches!(agent.recv(), Frame::Failed { id: 2, .. }));
    agent.send(Frame::DialTcp {
        id: 3,
        port: 80,
        host: "name.invalid".into(),
    });
    assert!(matches!(agent.recv(), Frame::Failed { id: 3, .. }));
}

#[test]
fn listen_tcp_accepts_and_forwards_both_ways() {
    let mut agent = Agent::start();
    agent.send(Frame::ListenTcp {
        id: 5,
        port: 0,
        host: "127.0.0.1".into(),
    });
    let port = match agent.recv() {
        Frame::Opened { id: 5, port } => port,
        other => panic!("unexpected {other:?}"),
    };
    assert_ne!(port, 0);
    let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    let id = match agent.recv() {
        Frame::Accepted {
            listener: 5,
            id,
            peer_port,
            peer,
        } => {
            assert_eq!(peer, "127.0.0.1");
            assert_eq!(peer_port, client.local_addr().unwrap().port());
            id
        }
        other => panic!("unexpected {other:?}"),
    };
    assert!(id >= AGENT_ID_BASE);
    agent.send(Frame::Data {
        id,
        data: b"ping".to_vec(),
    });
    let mut buf = [0u8; 4];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    client.write_all(b"pong").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut seen = Seen::default();
    collect(&mut agent, id, &mut seen, |s| s.eof && s.acked == 4);
    assert_eq!(seen.data, b"pong");
    agent.send(Frame::Eof { id });
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    collect(&mut agent, id, &mut seen, |s| s.close);
    agent.send(Frame::Unlisten { id: 5 });
}

#[test]
fn listen_unix_private_dir_and_unlisten() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("priv");
    let sock = dir.join("agent.sock");
    let mut agent = Agent::start();
    agent.send(Frame::ListenUnix {
        id: 9,
        private_dir: true,
        path: sock.as_os_str().as_encoded_bytes().to_vec(),
    });
    assert_eq!(agent.recv(), Frame::Opened { id: 9, port: 0 });
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "private dir mode {mode:o}");
    assert!(sock.exists());
    // The directory exists now, so a second private listener there fails.
    agent.send(Frame::ListenUnix {
        id: 10,
        private_dir: true,
        path: dir
            .join("other.sock")
            .as_os_str()
            .as_encoded_bytes()
            .to_vec(),
    });
    assert!(matches!(agent.recv(), Frame::Failed { id: 10, .. }));
    // Without private_dir, an existing file at the path is an error.
    agent.send(Frame::ListenUnix {
        id: 11,
        private_dir: false,
        path: sock.as_os_str().as_encoded_bytes().to_vec(),
    });
    assert!(matches!(agent.recv(), Frame::Failed { id: 11, .. }));

    let mut client = UnixStream::connect(&sock).unwrap();
    client.set_read_timeout(Some(TIMEOUT)).unwrap();
    let id = match agent.recv() {
        Frame::Accepted {
            listener: 9,
            id,
            peer_port: 0,
            peer,
        } => {
            assert_eq!(peer, "");
            id
        }
        other => panic!("unexpected {other:?}"),
    };
    client.write_all(b"up").unwrap();
    let mut seen = Seen::default();
    collect(&mut agent, id, &mut seen, |s| s.data.len() == 2);
    agent.send(Frame::Data {
        id,
        data: b"down".to_vec(),
    });
    let mut buf = [0u8; 4];
    client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"down");

    agent.send(Frame::Unlisten { id: 9 });
    // Frames are handled in order: once the next reply arrives, Unlisten is done.
    agent.send(Frame::DialUnix {
        id: 12,
        path: b"/nonexistent/sock".to_vec(),
    });
    // The Ack for "down" may come before or after the reply.
    let mut failed = false;
    while !failed || seen.acked < 4 {
        match agent.recv() {
            Frame::Failed { id: 12, .. } => failed = true,
            Frame::Ack { id: i, bytes } if i == id => seen.acked += u64::from(bytes),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(!sock.exists(), "socket removed");
    assert!(!dir.exists(), "private dir removed");
    // The accepted stream goes on.
    client.write_all(b"still").unwrap();
    collect(&mut agent, id, &mut seen, |s| s.data.len() == 7);
    assert_eq!(seen.data, b"upstill");
}

#[test]
fn dial_unix() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("srv.sock");
    let l = UnixListener::bind(&path).unwrap();
    let server = thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        c.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        c.write_all(&got).unwrap();
        c.write_all(b"!").unwrap();
    });
    let mut agent = Agent::start();
    agent.send(Frame::DialUnix {
        id: 4,
        path: path.as_os_str().as_encoded_bytes().to_vec(),
    });
    assert_eq!(agent.recv(), Frame::Opened { id: 4, port: 0 });
    agent.send(Frame::Data {
        id: 4,
        data: b"abc".to_vec(),
    });
    agent.send(Frame::Eof { id: 4 });
    let mut seen = Seen::default();
    collect(&mut agent, 4, &mut seen, |s| s.close);
    assert_eq!(seen.data, b"abc!");
    assert!(seen.eof);
    server.join().unwrap();
}

#[test]
fn data_beyond_credit_exits_3() {
    // A unix peer that never reads: once its buffers are full, the agent's socket writer
    // blocks and the server's credit is used up for good.
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("sink.sock");
    let l = UnixListener::bind(&path).unwrap();
    let (held_tx, held_rx) = mpsc::channel();
    thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        let _ = held_tx.send(c);
    });
    let mut agent = Agent::start();
    agent.send(Frame::DialUnix {
        id: 1,
        path: path.as_os_str().as_encoded_bytes().to_vec(),
    });
    assert_eq!(agent.recv(), Frame::Opened { id: 1, port: 0 });
    let _held = held_rx.recv_timeout(TIMEOUT).unwrap();
    let chunk = vec![0x55u8; MAX_DATA];
    let mut credit = INITIAL_CREDIT as usize;
    let deadline = Instant::now() + TIMEOUT;
    loop {
        while credit > 0 {
            let n = credit.min(MAX_DATA);
            agent.send(Frame::Data {
                id: 1,
                data: chunk[..n].to_vec(),
            });
            credit -= n;
        }
        // No Ack for a second with all credit used: the writer is stuck.
        match agent.frames.recv_timeout(Duration::from_secs(1)) {
            Ok(Frame::Ack { id: 1, bytes }) => credit += bytes as usize,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => break,
        }
        assert!(Instant::now() < deadline, "the sink never filled up");
    }
    agent.send(Frame::Data {
        id: 1,
        data: vec![1],
    });
    assert_eq!(agent.wait_exit().code(), Some(3));
}

#[test]
fn data_after_eof_and_garbage_exit_3() {
    // A peer that holds the connection and never ends its side: after our Eof the stream stays
    // live (an echo peer would answer with its own EOF, and the agent could release the id
    // before it reads our Data, which it then ignores as late).
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (held_tx, held_rx) = mpsc::channel();
    thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        let _ = held_tx.send(c);
    });
    let mut agent = Agent::start();
    dial_tcp(&mut agent, 1, port);
    let _held = held_rx.recv_timeout(TIMEOUT).unwrap();
    agent.send(Frame::Eof { id: 1 });
    agent.send(Frame::Data {
        id: 1,
        data: b"x".to_vec(),
    });
    assert_eq!(agent.wait_exit().code(), Some(3));

    let mut agent = Agent::start();
    agent.send_raw(&[0, 0, 0, 5, 99, 0, 0, 0, 1]);
    assert_eq!(agent.wait_exit().code(), Some(3));
}

#[test]
fn stdin_eof_exits_0_and_removes_unix_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("l.sock");
    let private = tmp.path().join("p").join("l.sock");
    let mut agent = Agent::start();
    agent.send(Frame::ListenUnix {
        id: 1,
        private_dir: false,
        path: sock.as_os_str().as_encoded_bytes().to_vec(),
    });
    assert_eq!(agent.recv(), Frame::Opened { id: 1, port: 0 });
    agent.send(Frame::ListenUnix {
        id: 2,
        private_dir: true,
        path: private.as_os_str().as_encoded_bytes().to_vec(),
    });
    assert_eq!(agent.recv(), Frame::Opened { id: 2, port: 0 });
    assert!(sock.exists() && private.exists());
    agent.close_stdin();
    assert_eq!(agent.wait_exit().code(), Some(0));
    assert!(!sock.exists(), "socket removed");
    assert!(!private.parent().unwrap().exists(), "private dir removed");
}

#[test]
fn two_hundred_short_connections_through_one_listener() {
    let mut agent = Agent::start();
    agent.send(Frame::ListenTcp {
        id: 1,
        port: 0,
        host: "localhost".into(),
    });
    let port = match agent.recv() {
        Frame::Opened { id: 1, port } => port,
        other => panic!("unexpected {other:?}"),
    };
    let mut ids = HashMap::new();
    for i in 0..200u32 {
        let mut client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        client.set_read_timeout(Some(TIMEOUT)).unwrap();
        let id = match agent.recv() {
            Frame::Accepted {
                listener: 1, id, ..
            } => id,
            other => panic!("unexpected {other:?}"),
        };
        assert!(ids.insert(id, i).is_none(), "id {id} reused");
        let request = format!("request {i}");
        client.write_all(request.as_bytes()).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let mut seen = Seen::default();
        collect(&mut agent, id, &mut seen, |s| s.eof);
        assert_eq!(seen.data, request.as_bytes());
        let response = format!("response {i}");
        agent.send(Frame::Data {
            id,
            data: response.clone().into_bytes(),
        });
        agent.send(Frame::Eof { id });
        let mut got = String::new();
        client.read_to_string(&mut got).unwrap();
        assert_eq!(got, response);
        collect(&mut agent, id, &mut seen, |s| {
            s.close && s.acked == response.len() as u64
        });
    }
    agent.close_stdin();
    assert_eq!(agent.wait_exit().code(), Some(0));
}
