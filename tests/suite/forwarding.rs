//! SSH forwarding with the real OpenSSH client against a real engine: `-L` (TCP and unix
//! sockets, dialled from inside the container), `-R` (listeners inside the container), X11
//! (`-Y`) and agent (`-A`) forwarding; off by default and refused in session mode.
//!
//! Each test drives one SSH connection through an `ssh -M -N` master (so in connection mode
//! every command and every forward shares one container); servers inside the container run
//! as background sessions of that master. Readiness is polled on observable state (a round
//! trip through the tunnel, a line in the master's stderr), every wait is bounded, and every
//! background process is killed by a drop guard.

use crate::support;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use support::{
    describe, free_tcp_port, poll_until, random_hex, run_with_timeout, sha256_hex, Background,
    RemoveByName, TestEnv, TestServer,
};

const CMD_TIMEOUT: Duration = Duration::from_secs(90);
/// Bound for a tunnel (or a server inside the container) to start answering.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound for every single read or write on a forwarded connection.
const IO_TIMEOUT: Duration = Duration::from_secs(30);
const POLL_STEP: Duration = Duration::from_millis(100);

/// In-container echo server (TCP 9000) and checksum server (TCP 9001: replies with the
/// `sha256sum` of everything received once the client half-closes).
const TCP_SERVERS: &str = "socat -t 30 TCP-LISTEN:9000,fork,reuseaddr EXEC:cat & \
                           socat -t 30 TCP-LISTEN:9001,fork,reuseaddr SYSTEM:sha256sum & wait";

/// The top-level block that enables every kind of forwarding.
const ALL_ENABLED: &str = "security:
  forwarding:
    forwardingMode: enable
    reverseForwardingMode: enable
    socketForwardingMode: enable
    socketListenMode: enable
    x11ForwardingMode: enable
    agentForwardingMode: enable
";

fn enabled_yaml(env: &TestEnv, mode: &str) -> String {
    format!("{}{ALL_ENABLED}", env.config_yaml(mode))
}

// ---------------------------------------------------------------------------
// Connecting to forwarded endpoints
// ---------------------------------------------------------------------------

/// Where the client side of a forward is reached.
#[derive(Clone, Debug)]
enum Target {
    Tcp(u16),
    Unix(PathBuf),
}

trait Conn: Read + Write + Send {
    fn shutdown_write(&self) -> io::Result<()>;
}

impl Conn for TcpStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

impl Conn for UnixStream {
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }
}

impl Target {
    fn connect(&self) -> io::Result<Box<dyn Conn>> {
        Ok(match self {
            Target::Tcp(port) => {
                let s = TcpStream::connect(("127.0.0.1", *port))?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                Box::new(s)
            }
            Target::Unix(path) => {
                let s = UnixStream::connect(path)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
                Box::new(s)
            }
        })
    }
}

/// Sends `data` to an echo server behind `target` and reads as many bytes back.
fn echo_round_trip(target: &Target, data: &[u8]) -> io::Result<Vec<u8>> {
    let mut s = target.connect()?;
    s.write_all(data)?;
    let mut got = vec![0u8; data.len()];
    s.read_exact(&mut got)?;
    Ok(got)
}

/// Sends `data` to the checksum server behind `target`, half-closes, and returns the first
/// word of its reply (the in-container `sha256sum` of what arrived).
fn remote_sha256(target: &Target, data: &[u8]) -> io::Result<String> {
    let mut s = target.connect()?;
    let mut sent = 0;
    for chunk in data.chunks(64 * 1024) {
        s.write_all(chunk).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("write stalled after {sent} of {} bytes: {e}", data.len()),
            )
        })?;
        sent += chunk.len();
    }
    s.shutdown_write()?;
    let mut reply = String::new();
    s.read_to_string(&mut reply).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("all {sent} bytes sent and half-closed, but no checksum reply: {e}"),
        )
    })?;
    Ok(reply.split_whitespace().next().unwrap_or("").to_string())
}

/// Waits (bounded) until the echo server behind `target` answers a probe.
fn wait_echo(target: &Target, what: &str, master: &mut Background, server: &TestServer) {
    let mut last = String::new();
    let ok = poll_until(READY_TIMEOUT, POLL_STEP, || {
        if master.exited().is_some() {
            return Some(false);
        }
        let probe = format!("probe-{}\n", random_hex(8));
        match echo_round_trip(target, probe.as_bytes()) {
            Ok(got) if got == probe.as_bytes() => Some(true),
            Ok(got) => {
                last = format!("wrong echo {:?}", String::from_utf8_lossy(&got));
                None
            }
            Err(e) => {
                last = e.to_string();
                None
            }
        }
    });
    assert_eq!(
        ok,
        Some(true),
        "{what} never echoed through {target:?} (last attempt: {last}; master exited: {:?})\n\
         --- master stderr ---\n{}\n--- server ---\n{}",
        master.exited(),
        master.stderr(),
        server.output()
    );
}

/// Waits (bounded) until the master's stderr contains `needle`; returns that stderr.
fn wait_master_says(master: &Background, needle: &str, server: &TestServer) -> String {
    poll_until(READY_TIMEOUT, POLL_STEP, || {
        let text = master.stderr();
        text.contains(needle).then_some(text)
    })
    .unwrap_or_else(|| {
        panic!(
            "the ssh master never said {needle:?}\n--- master stderr ---\n{}\n--- server ---\n{}",
            master.stderr(),
            server.output()
        )
    })
}

/// Runs `cmd` through the master; asserts exit 0; returns stdout.
fn run_ok(cmd: &mut Command, server: &TestServer, what: &str) -> String {
    let out = run_with_timeout(cmd, None, CMD_TIMEOUT);
    assert!(
        out.status.success(),
        "{what} failed: {}",
        describe(&out, server)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A connection through the forward fails: it is closed (or reset) without the echo.
fn assert_refused(target: &Target, what: &str, master: &Background, server: &TestServer) {
    let probe = format!("must-not-arrive-{}\n", random_hex(4));
    match echo_round_trip(target, probe.as_bytes()) {
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::UnexpectedEof
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::NotFound
            ) => {}
        other => panic!(
            "{what}: a connection through {target:?} must be closed at once, got {other:?}\n\
             --- master stderr ---\n{}\n--- server ---\n{}",
            master.stderr(),
            server.output()
        ),
    }
}

/// An in-container client for [`ClientSideServer`]'s ping: it sends `<ping>\n` to the socat
/// address `addr`, reads one reply line and only then ends its side, so the exchange does
/// not depend on half-close; bounded by `timeout 20`. Prints the reply.
fn in_container_ping(ping: &str, addr: &str) -> String {
    format!(
        "timeout 20 socat -t 5 {addr} SYSTEM:'echo {ping}; head -n 1 > /tmp/reply' && \
         cat /tmp/reply"
    )
}

// ---------------------------------------------------------------------------
// A TCP server on the client side (the target of -R)
// ---------------------------------------------------------------------------

/// Accepts connections forever (detached thread). Each connection starts with a line:
/// `ping-…` is answered at once with `pong ping-…` and the connection closed (no half-close
/// involved); `sum` makes it read to EOF and then reply `got <len> <sha256>` (the reply
/// travels after the peer's half-close). It reports what followed `sum`, or the ping line.
struct ClientSideServer {
    port: u16,
    received: Receiver<Vec<u8>>,
}

impl ClientSideServer {
    fn start() -> ClientSideServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the client-side server");
        let port = listener.local_addr().expect("local addr").port();
        let (tx, received) = mpsc::channel();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let tx = tx.clone();
                thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
                    let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
                    let Ok(mut writer) = conn.try_clone() else {
                        return;
                    };
                    let mut reader = BufReader::new(conn);
                    let mut first = String::new();
                    if reader.read_line(&mut first).is_err() {
                        return;
                    }
                    if first.starts_with("ping-") {
                        let _ = writer.write_all(format!("pong {first}").as_bytes());
                        let _ = tx.send(first.into_bytes());
                    } else if first == "sum\n" {
                        let mut data = Vec::new();
                        if reader.read_to_end(&mut data).is_err() {
                            return;
                        }
                        let reply = format!("got {} {}\n", data.len(), sha256_hex(&data));
                        let _ = writer.write_all(reply.as_bytes());
                        let _ = tx.send(data);
                    }
                });
            }
        });
        ClientSideServer { port, received }
    }

    fn next(&self, server: &TestServer) -> Vec<u8> {
        self.received.recv_timeout(IO_TIMEOUT).unwrap_or_else(|_| {
            panic!(
                "the client-side server got no connection\n{}",
                server.output()
            )
        })
    }
}

// ---------------------------------------------------------------------------
// Persistent mode
// ---------------------------------------------------------------------------

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

/// Without a `security.forwarding` block nothing is forwarded — -L (TCP and unix socket),
/// -R (TCP and unix socket), X11 and the agent are all refused — and the sessions of the
/// same connection keep working.
#[test]
fn forwarding_is_disabled_by_default() {
    let env = TestEnv::new();
    let server = env.start_mode("connection");
    assert_nothing_is_forwarded(&env, &server);
}

/// With every kind of forwarding enabled, a key line marked `restrict` (or
/// `no-port-forwarding,no-agent-forwarding,no-X11-forwarding`) forwards nothing: it once
/// carried `-L` into the container while only its pty was refused.
#[test]
fn a_restricted_key_forwards_nothing() {
    for options in [
        "restrict",
        "no-port-forwarding,no-agent-forwarding,no-X11-forwarding",
    ] {
        let env = TestEnv::new();
        std::fs::write(
            env.path().join("keys/alice"),
            format!("{options} {}\n", env.client_pubkey),
        )
        .unwrap();
        let server = env.start(&enabled_yaml(&env, "connection"));
        assert_nothing_is_forwarded(&env, &server);
        assert!(
            server
                .output()
                .contains("the login's key or certificate does not permit it"),
            "{options}: the refusals are logged: {}",
            server.output()
        );
    }
}

/// The same for a certificate without the permit-*-forwarding extensions (`-O clear`).
#[test]
fn a_certificate_without_forwarding_extensions_forwards_nothing() {
    let env = TestEnv::new();
    let ca = env.path().join("user_ca");
    let keygen = |args: &[&str]| {
        let out = Command::new("ssh-keygen").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    keygen(&[
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-f",
        &ca.display().to_string(),
    ]);
    let client_pub = format!("{}.pub", env.client_key.display());
    keygen(&[
        "-q",
        "-s",
        &ca.display().to_string(),
        "-I",
        "restricted",
        "-n",
        "alice",
        "-O",
        "clear",
        &client_pub,
    ]);
    // Only the certificate logs in: the plain key is not in authorized_keys.
    std::fs::write(env.path().join("keys/alice"), "").unwrap();
    let yaml = enabled_yaml(&env, "connection").replacen(
        "  publicKey:\n",
        &format!(
            "  publicKey:\n    trustedUserCAKeys: {}.pub\n",
            ca.display()
        ),
        1,
    );
    let server = env.start(&yaml);
    assert_nothing_is_forwarded(&env, &server);
    assert!(server.output().contains("publickey-certificate"));
}

/// Opens a master asking for -L (TCP and unix socket) to servers that answer inside the
/// container, then -R, X11 and agent forwarding: all are refused, sessions keep working.
fn assert_nothing_is_forwarded(env: &TestEnv, server: &TestServer) {
    let tcp_port = free_tcp_port();
    let local_sock = env.path().join("l.sock");
    let (mut master, ctl) = env.forwarding_master(
        server,
        "off",
        &[
            "-L",
            &format!("{tcp_port}:127.0.0.1:9000"),
            "-L",
            &format!("{}:/tmp/x.sock", local_sock.display()),
        ],
    );
    let _servers = Background::spawn(
        env.ssh_via(server, &ctl).arg(
            "socat -t 30 TCP-LISTEN:9000,fork,reuseaddr EXEC:cat & \
             socat -t 30 UNIX-LISTEN:/tmp/x.sock,fork EXEC:cat & wait",
        ),
        env.path(),
        "servers",
    );
    // The servers really answer inside the container, so what fails below is the refusal.
    let ready = poll_until(READY_TIMEOUT, POLL_STEP, || {
        let out = run_with_timeout(
            env.ssh_via(server, &ctl).arg(
                "echo in-tcp | socat -t 5 - TCP:127.0.0.1:9000 && \
                 echo in-unix | socat -t 5 - UNIX-CONNECT:/tmp/x.sock",
            ),
            None,
            CMD_TIMEOUT,
        );
        (out.stdout == b"in-tcp\nin-unix\n").then_some(())
    });
    assert!(
        ready.is_some(),
        "in-container servers never answered: {}",
        server.output()
    );

    assert_refused(&Target::Tcp(tcp_port), "-L tcp (disabled)", &master, server);
    assert_refused(
        &Target::Unix(local_sock),
        "-L unix (disabled)",
        &master,
        server,
    );
    let said = wait_master_says(&master, "open failed", server);
    assert!(
        said.contains("administratively prohibited"),
        "the refusal must be 'administratively prohibited':\n{said}"
    );

    for spec in ["0:127.0.0.1:9", "/tmp/r.sock:127.0.0.1:9"] {
        let out = run_with_timeout(
            env.ssh_control(server, &ctl)
                .args(["-O", "forward", "-R", spec])
                .arg(env.destination("alice")),
            None,
            CMD_TIMEOUT,
        );
        assert!(
            !out.status.success(),
            "-R {spec} must be refused: {}",
            describe(&out, server)
        );
    }

    // X11 and agent forwarding requests are refused, and the session still runs.
    let agent = SshAgent::start(env);
    let out = run_with_timeout(
        agent
            .forwarding(&mut env.ssh_opts(server))
            .env("DISPLAY", ":999")
            .args(["-Y", "-o", "XAuthLocation=/nonexistent/xauth"])
            .arg(env.destination("alice"))
            .arg("echo \"display=[$DISPLAY] agent=[$SSH_AUTH_SOCK]\""),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "display=[] agent=[]\n",
        "{}",
        describe(&out, server)
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out, server));

    let out = run_ok(
        env.ssh_via(server, &ctl).arg("echo still-works"),
        server,
        "a session after the refusals",
    );
    assert_eq!(out, "still-works\n");
    assert!(
        master.exited().is_none(),
        "the master must survive: {}",
        master.stderr()
    );
}

/// -L to TCP servers inside the container: a round trip, 50 short connections (10 at a
/// time) with distinct data, and 20 MiB whose in-container sha256 matches.
#[test]
fn local_tcp_forward_reaches_the_container() {
    let env = TestEnv::new();
    let server = env.start(&enabled_yaml(&env, "connection"));
    let echo_port = free_tcp_port();
    let mut sum_port = free_tcp_port();
    while sum_port == echo_port {
        sum_port = free_tcp_port();
    }
    let (mut master, ctl) = env.forwarding_master(
        &server,
        "tcp",
        &[
            "-L",
            &format!("{echo_port}:127.0.0.1:9000"),
            "-L",
            &format!("{sum_port}:127.0.0.1:9001"),
        ],
    );
    let _servers = Background::spawn(
        env.ssh_via(&server, &ctl).arg(TCP_SERVERS),
        env.path(),
        "servers",
    );
    let echo = Target::Tcp(echo_port);
    let sums = Target::Tcp(sum_port);
    wait_echo(&echo, "the echo server", &mut master, &server);

    let data = b"hello through the tunnel\n";
    assert_eq!(echo_round_trip(&echo, data).expect("round trip"), data);

    // 50 connections, 10 at a time, each with its own data.
    let next = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..10)
        .map(|_| {
            let (next, failures, echo) = (next.clone(), failures.clone(), echo.clone());
            thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= 50 {
                    return;
                }
                let data = format!("conn-{i}-{}\n", random_hex(16 + 50 * i)).into_bytes();
                match echo_round_trip(&echo, &data) {
                    Ok(got) if got == data => {}
                    Ok(got) => failures
                        .lock()
                        .unwrap()
                        .push(format!("connection {i}: wrong echo ({} bytes)", got.len())),
                    Err(e) => failures
                        .lock()
                        .unwrap()
                        .push(format!("connection {i}: {e}")),
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    let failures = failures.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{failures:#?}\n--- master stderr ---\n{}\n--- server ---\n{}",
        master.stderr(),
        server.output()
    );

    // 20 MiB, checksummed inside the container; an empty probe first (sha of nothing).
    let empty = poll_until(READY_TIMEOUT, POLL_STEP, || remote_sha256(&sums, b"").ok())
        .expect("the checksum server never answered");
    assert_eq!(empty, sha256_hex(b""), "{}", server.output());
    let mut big = vec![0u8; 20 * 1024 * 1024];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut big))
        .expect("read /dev/urandom");
    let got = remote_sha256(&sums, &big).unwrap_or_else(|e| {
        panic!(
            "20 MiB through -L: {e}\n--- master stderr ---\n{}\n--- server ---\n{}",
            master.stderr(),
            server.output()
        )
    });
    assert_eq!(
        got,
        sha256_hex(&big),
        "checksum inside the container differs"
    );
    assert!(master.exited().is_none(), "{}", master.stderr());
}

/// -R: listeners inside the container (port 0 → "Allocated port N", and a fixed port via
/// `-O forward`) reach a TCP server on the client side; bytes go both ways.
#[test]
fn remote_tcp_forward_listens_in_the_container() {
    let env = TestEnv::new();
    let server = env.start(&enabled_yaml(&env, "connection"));
    let target = ClientSideServer::start();
    let (master, ctl) = env.forwarding_master(
        &server,
        "rtcp",
        &["-R", &format!("0:127.0.0.1:{}", target.port)],
    );
    let said = wait_master_says(&master, "Allocated port ", &server);
    let allocated: u16 = said
        .split("Allocated port ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no port in: {said}"));
    assert_ne!(allocated, 0);

    let ping = format!("ping-{}", random_hex(8));
    let out = run_ok(
        env.ssh_via(&server, &ctl).arg(in_container_ping(
            &ping,
            &format!("TCP:127.0.0.1:{allocated}"),
        )),
        &server,
        "in-container client to the allocated port",
    );
    assert_eq!(target.next(&server), format!("{ping}\n").into_bytes());
    assert_eq!(out, format!("pong {ping}\n"), "{}", server.output());

    // A fixed port, added to the running connection, and 4 MiB through it; the checksum
    // reply comes back after the in-container client's half-close.
    let out = run_with_timeout(
        env.ssh_control(&server, &ctl)
            .args(["-O", "forward", "-R"])
            .arg(format!("127.0.0.1:9100:127.0.0.1:{}", target.port))
            .arg(env.destination("alice")),
        None,
        CMD_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "-O forward -R: {}",
        describe(&out, &server)
    );
    let out = run_ok(
        env.ssh_via(&server, &ctl).arg(
            "head -c 4194304 /dev/urandom > /tmp/r.bin && sha256sum < /tmp/r.bin && \
             { echo sum; cat /tmp/r.bin; } | socat -t 30 - TCP:127.0.0.1:9100",
        ),
        &server,
        "4 MiB to the fixed port",
    );
    let received = target.next(&server);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines.len(),
        2,
        "the reply after the half-close is missing: {out:?}\n{}",
        server.output()
    );
    let sum = lines[0].split_whitespace().next().unwrap_or("");
    assert_eq!(received.len(), 4 * 1024 * 1024);
    assert_eq!(sha256_hex(&received), sum, "bytes changed on the way out");
    assert_eq!(
        lines[1],
        format!("got 4194304 {sum}"),
        "the reply changed on the way in"
    );
}

/// Unix sockets: -L LPORT:/container/socket and -L /local/path:/container/socket reach a
/// socat listener inside the container; -R /container/path:host:port creates a socket
/// inside the container that reaches a TCP server on the client side.
#[test]
fn unix_socket_forwards_both_ways() {
    let env = TestEnv::new();
    let server = env.start(&enabled_yaml(&env, "connection"));
    let target = ClientSideServer::start();
    let tcp_port = free_tcp_port();
    let local_sock = env.path().join("l.sock");
    let (mut master, ctl) = env.forwarding_master(
        &server,
        "unix",
        &[
            "-L",
            &format!("{tcp_port}:/tmp/x.sock"),
            "-L",
            &format!("{}:/tmp/x.sock", local_sock.display()),
            "-R",
            &format!("/tmp/r.sock:127.0.0.1:{}", target.port),
        ],
    );
    let _servers = Background::spawn(
        env.ssh_via(&server, &ctl)
            .arg("socat -t 30 UNIX-LISTEN:/tmp/x.sock,fork EXEC:cat"),
        env.path(),
        "servers",
    );
    let by_port = Target::Tcp(tcp_port);
    let by_path = Target::Unix(local_sock);
    wait_echo(
        &by_port,
        "the unix echo server (-L port)",
        &mut master,
        &server,
    );
    for t in [&by_port, &by_path] {
        for i in 0..5 {
            let data = format!("unix-{i}-{}\n", random_hex(32));
            let got = echo_round_trip(t, data.as_bytes())
                .unwrap_or_else(|e| panic!("{t:?}: {e}\n{}", server.output()));
            assert_eq!(got, data.as_bytes(), "{t:?}");
        }
    }

    let ping = format!("ping-unix-{}", random_hex(8));
    let out = run_ok(
        env.ssh_via(&server, &ctl).arg(format!(
            "test -S /tmp/r.sock && {}",
            in_container_ping(&ping, "UNIX-CONNECT:/tmp/r.sock")
        )),
        &server,
        "in-container client to the -R socket",
    );
    assert_eq!(target.next(&server), format!("{ping}\n").into_bytes());
    assert_eq!(out, format!("pong {ping}\n"), "{}", server.output());
    assert!(master.exited().is_none(), "{}", master.stderr());
}

// ---------------------------------------------------------------------------
// X11
// ---------------------------------------------------------------------------

/// A fake X server on /tmp/.X11-unix/X<n>: for each connection it reads one X11 connection
/// setup (12-byte header, then the padded name and data), reports those bytes, replies
/// `reply` and closes. The socket file is removed on drop.
struct FakeX {
    display: u32,
    path: PathBuf,
    reply: String,
    setups: Receiver<io::Result<Vec<u8>>>,
}

impl FakeX {
    fn start() -> FakeX {
        let dir = Path::new("/tmp/.X11-unix");
        if !dir.exists() {
            let _ = std::fs::create_dir(dir);
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777));
        }
        let (display, path, listener) = (0..100)
            .find_map(|_| {
                let n = 500 + u32::from_str_radix(&random_hex(2), 16).unwrap() % 4000;
                let path = dir.join(format!("X{n}"));
                if path.exists() {
                    return None;
                }
                UnixListener::bind(&path).ok().map(|l| (n, path, l))
            })
            .expect("no free X display socket under /tmp/.X11-unix");
        let reply = format!("FAKE-X11-REPLY-{}", random_hex(8));
        let (tx, setups) = mpsc::channel();
        let answer = reply.clone();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
                let setup = read_x11_setup(&mut conn);
                if setup.is_ok() {
                    let _ = conn.write_all(format!("{answer}\n").as_bytes());
                }
                if tx.send(setup).is_err() {
                    return;
                }
            }
        });
        FakeX {
            display,
            path,
            reply,
            setups,
        }
    }
}

impl Drop for FakeX {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn read_x11_setup(conn: &mut UnixStream) -> io::Result<Vec<u8>> {
    let mut setup = vec![0u8; 12];
    conn.read_exact(&mut setup)?;
    let u16_at = |b: &[u8], i: usize| {
        if b[0] == b'B' {
            u16::from_be_bytes([b[i], b[i + 1]])
        } else {
            u16::from_le_bytes([b[i], b[i + 1]])
        }
    };
    let pad4 = |n: u16| (usize::from(n) + 3) & !3;
    let rest = pad4(u16_at(&setup, 6)) + pad4(u16_at(&setup, 8));
    let mut tail = vec![0u8; rest];
    conn.read_exact(&mut tail)?;
    setup.extend_from_slice(&tail);
    Ok(setup)
}

/// One Xauthority entry.
struct XauthEntry {
    family: u16,
    address: Vec<u8>,
    number: Vec<u8>,
    name: Vec<u8>,
    data: Vec<u8>,
}

/// Parses one Xauthority entry (big-endian u16 lengths); returns it and the unparsed rest.
fn parse_xauth(b: &[u8]) -> Option<(XauthEntry, &[u8])> {
    let family = u16::from_be_bytes([*b.first()?, *b.get(1)?]);
    let mut rest = &b[2..];
    let mut field = || -> Option<Vec<u8>> {
        let len = usize::from(u16::from_be_bytes([*rest.first()?, *rest.get(1)?]));
        let v = rest.get(2..2 + len)?.to_vec();
        rest = &rest[2 + len..];
        Some(v)
    };
    let (address, number, name, data) = (field()?, field()?, field()?, field()?);
    Some((
        XauthEntry {
            family,
            address,
            number,
            name,
            data,
        },
        rest,
    ))
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex"))
        .collect()
}

/// `-Y`: DISPLAY and XAUTHORITY in the session; an X11 client inside the container that
/// presents the cookie from $XAUTHORITY reaches the client's (fake) X server and gets its
/// reply.
#[test]
fn x11_forwarding_reaches_the_clients_display() {
    let env = TestEnv::new();
    let server = env.start(&enabled_yaml(&env, "connection"));
    let fake = FakeX::start();
    // X11 connection setup, little-endian: 'l', pad, major 11, minor 0, name length 18,
    // data length 16, pad; "MIT-MAGIC-COOKIE-1" + 2 pad bytes; the 16-byte cookie. Like a
    // real X client it does not half-close: it reads the reply line, then exits.
    let script = r#"
echo "DISPLAY=$DISPLAY"
echo "XAUTHORITY=$XAUTHORITY"
echo "XAUTH_HEX=$(od -An -v -tx1 "$XAUTHORITY" | tr -d ' \n')"
n=${DISPLAY#localhost:}
n=${n%.0}
cat > /tmp/xclient.sh <<'END'
printf 'l\000\013\000\000\000\022\000\020\000\000\000MIT-MAGIC-COOKIE-1\000\000'
tail -c 16 "$XAUTHORITY"
head -n 1 > /tmp/xreply
END
timeout 20 socat -t 5 TCP:127.0.0.1:$((6000 + n)) EXEC:'sh /tmp/xclient.sh'
cat /tmp/xreply
"#;
    let out = run_with_timeout(
        env.ssh_opts(&server)
            .env("DISPLAY", format!(":{}", fake.display))
            .env_remove("XAUTHORITY")
            .args(["-Y", "-o", "XAuthLocation=/nonexistent/xauth"])
            .arg(env.destination("alice"))
            .arg(script),
        None,
        CMD_TIMEOUT,
    );
    let info = describe(&out, &server);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let value = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key}= line: {info}"))
            .to_string()
    };

    let display = value("DISPLAY");
    let number: u32 = display
        .strip_prefix("localhost:")
        .and_then(|d| d.strip_suffix(".0"))
        .and_then(|d| d.parse().ok())
        .unwrap_or_else(|| panic!("DISPLAY {display:?} is not localhost:N.0: {info}"));
    assert!(number >= 10, "display number {number} < 10: {info}");

    let xauthority = value("XAUTHORITY");
    assert!(
        xauthority.starts_with("/tmp/"),
        "XAUTHORITY {xauthority:?}: {info}"
    );
    let xauth = hex_decode(&value("XAUTH_HEX"));
    let (entry, rest) =
        parse_xauth(&xauth).unwrap_or_else(|| panic!("bad Xauthority {xauth:02x?}: {info}"));
    assert_eq!(entry.family, 0xFFFF, "FamilyWild: {info}");
    assert!(entry.address.is_empty(), "address: {:?}", entry.address);
    assert_eq!(
        entry.number,
        number.to_string().into_bytes(),
        "display number in Xauthority"
    );
    assert_eq!(entry.name, b"MIT-MAGIC-COOKIE-1");
    assert_eq!(entry.data.len(), 16, "cookie length");
    assert!(rest.is_empty(), "exactly one entry: {xauth:02x?}");

    let setup = fake
        .setups
        .recv_timeout(IO_TIMEOUT)
        .unwrap_or_else(|_| panic!("the fake X server got no connection: {info}"))
        .unwrap_or_else(|e| panic!("the fake X server got no complete setup ({e}): {info}"));
    assert_eq!(setup[0], b'l', "byte order: {setup:02x?}");
    assert_eq!(
        u16::from_le_bytes([setup[2], setup[3]]),
        11,
        "major: {setup:02x?}"
    );
    assert_eq!(&setup[12..30], b"MIT-MAGIC-COOKIE-1", "{setup:02x?}");
    assert_eq!(setup.len(), 48, "{setup:02x?}");

    assert!(
        text.lines().any(|l| l == fake.reply),
        "the X11 client inside the container never got the reply: {info}"
    );
    assert_eq!(out.status.code(), Some(0), "{info}");
}

// ---------------------------------------------------------------------------
// Agent
// ---------------------------------------------------------------------------

/// A real `ssh-agent -D -a <sock>` holding one fresh ed25519 key; killed on drop.
struct SshAgent {
    _process: Background,
    sock: PathBuf,
    /// `SHA256:…` of the key in the agent.
    fingerprint: String,
    comment: String,
}

impl SshAgent {
    /// `ssh -A` with this agent. The harness's client config says `IdentityAgent none`,
    /// which makes ssh unset SSH_AUTH_SOCK and then skip agent forwarding (it checks for an
    /// agent first), so `IdentityAgent=<sock>` on the command line (which wins over the
    /// file) names it; `IdentitiesOnly yes` keeps its key out of authentication.
    fn forwarding<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("SSH_AUTH_SOCK", &self.sock)
            .arg("-o")
            .arg(format!("IdentityAgent={}", self.sock.display()))
            .arg("-A")
    }

    fn start(env: &TestEnv) -> SshAgent {
        let name = format!("agent-{}", random_hex(4));
        let sock = env.path().join(format!("{name}.sock"));
        let mut process = Background::spawn(
            Command::new("ssh-agent")
                .env_remove("SSH_AUTH_SOCK")
                .args(["-D", "-a"])
                .arg(&sock),
            env.path(),
            &name,
        );
        let up = poll_until(READY_TIMEOUT, Duration::from_millis(20), || {
            if sock.exists() {
                return Some(true);
            }
            process.exited().map(|_| false)
        });
        assert_eq!(
            up,
            Some(true),
            "ssh-agent did not start: {}",
            process.stderr()
        );

        let key = env.path().join(format!("{name}_ed25519"));
        let comment = format!("forwarded-key-{}", random_hex(4));
        let ok = |cmd: &mut Command, what: &str| {
            let out = run_with_timeout(cmd, None, CMD_TIMEOUT);
            assert!(
                out.status.success(),
                "{what}: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        ok(
            Command::new("ssh-keygen")
                .args(["-t", "ed25519", "-N", "", "-q", "-C", &comment, "-f"])
                .arg(&key),
            "ssh-keygen",
        );
        ok(
            Command::new("ssh-add")
                .env("SSH_AUTH_SOCK", &sock)
                .arg(&key),
            "ssh-add",
        );
        let listed = ok(
            Command::new("ssh-keygen")
                .arg("-lf")
                .arg(key.with_extension("pub")),
            "ssh-keygen -l",
        );
        let fingerprint = listed
            .split_whitespace()
            .find(|w| w.starts_with("SHA256:"))
            .unwrap_or_else(|| panic!("no fingerprint in {listed}"))
            .to_string();
        SshAgent {
            _process: process,
            sock,
            fingerprint,
            comment,
        }
    }
}

/// Agent forwarding: SSH_AUTH_SOCK=/tmp/ssh-XXXXXXXX/agent.sock in a 0700 directory, and
/// `ssh-add -l` inside the container lists the client's agent's key.
#[test]
fn agent_forwarding_lists_the_clients_keys() {
    let env = TestEnv::new();
    let server = env.start(&enabled_yaml(&env, "connection"));
    let agent = SshAgent::start(&env);
    let out = run_with_timeout(
        agent
            .forwarding(&mut env.ssh_opts(&server))
            .arg(env.destination("alice"))
            .arg("echo \"SOCK=$SSH_AUTH_SOCK\"; ls -ld \"${SSH_AUTH_SOCK%/*}\"; ssh-add -l"),
        None,
        CMD_TIMEOUT,
    );
    let info = describe(&out, &server);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let sock = text
        .lines()
        .find_map(|l| l.strip_prefix("SOCK="))
        .unwrap_or_else(|| panic!("no SOCK= line: {info}"));
    let middle = sock
        .strip_prefix("/tmp/ssh-")
        .and_then(|s| s.strip_suffix("/agent.sock"))
        .unwrap_or_else(|| {
            panic!("SSH_AUTH_SOCK {sock:?} is not /tmp/ssh-<name>/agent.sock: {info}")
        });
    assert!(
        middle.len() >= 8 && middle.chars().all(|c| c.is_ascii_alphanumeric()),
        "SSH_AUTH_SOCK {sock:?}: {info}"
    );
    assert!(
        text.lines().any(|l| l.starts_with("drwx------")),
        "the socket's directory must be 0700: {info}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains(&agent.fingerprint) && l.contains(&agent.comment)),
        "ssh-add -l inside the container must list {} {}: {info}",
        agent.fingerprint,
        agent.comment
    );
    assert_eq!(out.status.code(), Some(0), "{info}");
}

// ---------------------------------------------------------------------------
// Other execution modes
// ---------------------------------------------------------------------------

/// Persistent mode: -L reaches a server in the named container the same way.
#[test]
fn persistent_mode_local_forward() {
    let env = TestEnv::new();
    let name = format!("cssh-fwd-{}", env.instance);
    let _cleanup = RemoveByName(name.clone());
    let yaml = env.config_yaml("persistent");
    let persistent = yaml.replace(
        "    mode: \"persistent\"\n",
        &format!(
            "    mode: \"persistent\"\n    containername: {name}\n    createMissingContainer: true\n"
        ),
    );
    assert_ne!(persistent, yaml, "test setup");
    let server = env.start(&format!("{persistent}{ALL_ENABLED}"));
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
    let echo = Target::Tcp(echo_port);
    wait_echo(&echo, "the echo server", &mut master, &server);
    let workers: Vec<_> = (0..10)
        .map(|i| {
            let echo = echo.clone();
            thread::spawn(move || {
                let data = format!("persistent-{i}-{}\n", random_hex(64)).into_bytes();
                echo_round_trip(&echo, &data).map(|got| got == data)
            })
        })
        .collect();
    for w in workers {
        let r = w.join().expect("worker");
        assert!(
            matches!(r, Ok(true)),
            "{r:?}\n--- master stderr ---\n{}\n--- server ---\n{}",
            master.stderr(),
            server.output()
        );
    }
    // The listener really is in the named container.
    let out = run_ok(
        Command::new("docker").args([
            "exec",
            &name,
            "sh",
            "-c",
            "echo direct | socat -t 5 - TCP:127.0.0.1:9000",
        ]),
        &server,
        "docker exec into the persistent container",
    );
    assert_eq!(out, "direct\n");
}

/// Session mode: forwarding is refused even when enabled (there is no container per
/// connection to forward into), and sessions still work.
#[test]
fn session_mode_refuses_forwarding() {
    let env = TestEnv::new();
    let server = env.start(&enabled_yaml(&env, "session"));
    let tcp_port = free_tcp_port();
    let (master, ctl) = env.forwarding_master(
        &server,
        "session",
        &["-L", &format!("{tcp_port}:127.0.0.1:9000")],
    );
    let out = run_ok(
        env.ssh_via(&server, &ctl).arg("echo works-before"),
        &server,
        "a session",
    );
    assert_eq!(out, "works-before\n");

    assert_refused(
        &Target::Tcp(tcp_port),
        "-L in session mode",
        &master,
        &server,
    );
    wait_master_says(&master, "open failed", &server);
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
        describe(&out, &server)
    );

    let out: Output = run_with_timeout(
        env.ssh(&server, "alice").arg("echo works-after"),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(out.stdout, b"works-after\n", "{}", describe(&out, &server));
    // The master's own log goes into the message too: once (in ~35 runs) the mux client
    // exited 255 here with the right output and the program's exit status 0 in our log.
    let out = run_with_timeout(
        env.ssh_via(&server, &ctl)
            .args(["-o", "LogLevel=DEBUG1"])
            .arg("echo works-on-the-master"),
        None,
        CMD_TIMEOUT,
    );
    assert!(
        out.status.success() && out.stdout == b"works-on-the-master\n",
        "a session after the refusals: {}\n--- master's stderr ---\n{}",
        describe(&out, &server),
        master.stderr()
    );
}

/// Text logs escape what clients send: a `direct-tcpip` host holding a newline cannot write a
/// line of its own into the log.
#[test]
fn a_forwarding_target_cannot_forge_a_log_line() {
    let env = TestEnv::new();
    let server = env.start(&enabled_yaml(&env, "connection"));
    let forged = "2026-01-01T00:00:00.000000Z  INFO authenticated connection_id=forged user=root";
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let h = support::russh_client::connect(&env, &server).await;
        let host = format!("no-such-host\n{forged}");
        // Refused or failed: either way the attempt is logged.
        if let Ok(ch) = h
            .channel_open_direct_tcpip(host, 80, "127.0.0.1", 40000)
            .await
        {
            let _ = tokio::time::timeout(Duration::from_secs(20), async {
                let mut ch = ch;
                while ch.wait().await.is_some() {}
            })
            .await;
        }
    });
    let log = poll_until(Duration::from_secs(20), POLL_STEP, || {
        let log = server.output();
        log.contains("no-such-host\\n2026-01-01").then_some(log)
    })
    .unwrap_or_else(|| {
        panic!(
            "the target is not in the log, escaped:\n{}",
            server.output()
        )
    });
    assert!(
        !log.lines().any(|l| l.starts_with("2026-01-01T00:00:00")),
        "a forged line:\n{log}"
    );
}

/// `audit.format: binary` with `intercept.forwarding`: a `-L` connection is recorded as
/// ContainerSSH's `new_channel_direct_tcpip` with its target, and its bytes both ways as `io`
/// on that channel (stream 0 from the client, 1 to it).
#[test]
fn a_forwarded_connection_is_in_the_binary_recording_with_its_data() {
    let env = TestEnv::new();
    let dir = env.path().join("audit");
    std::fs::create_dir_all(&dir).unwrap();
    let yaml = format!(
        "{}audit:\n  enable: true\n  format: binary\n  storage: file\n  file:\n    directory: {}\n  intercept:\n    forwarding: true\n",
        enabled_yaml(&env, "connection"),
        dir.display()
    );
    let server = env.start(&yaml);
    let echo_port = free_tcp_port();
    let (mut master, ctl) = env.forwarding_master(
        &server,
        "audit",
        &["-L", &format!("{echo_port}:127.0.0.1:9000")],
    );
    let servers = Background::spawn(
        env.ssh_via(&server, &ctl).arg(TCP_SERVERS),
        env.path(),
        "servers",
    );
    let echo = Target::Tcp(echo_port);
    wait_echo(&echo, "the echo server", &mut master, &server);
    let data = b"hello-forwarded-and-recorded\n";
    assert_eq!(echo_round_trip(&echo, data).expect("round trip"), data);
    drop(servers);
    master.kill();
    let (_, decoded) = support::finished_binary_recording(&dir, || server.output());
    let opens: Vec<&serde_json::Value> = decoded
        .iter()
        .filter(|m| m["typeId"] == "new_channel_direct_tcpip")
        .collect();
    assert!(!opens.is_empty(), "{decoded:?}");
    // The probes of wait_echo opened channels too: the round trip's is the one whose data is
    // ours.
    let bytes = support::audit_data;
    let ours = opens
        .iter()
        .find(|open| {
            decoded.iter().any(|m| {
                m["type"] == 500
                    && m["channelId"] == open["channelId"]
                    && m["payload"]["stream"] == 0
                    && bytes(m) == data
            })
        })
        .unwrap_or_else(|| panic!("no io of ours on a direct-tcpip channel: {decoded:?}"));
    assert_eq!(ours["payload"]["HostToConnect"], "127.0.0.1");
    assert_eq!(ours["payload"]["PortToConnect"], 9000);
    let back: Vec<u8> = decoded
        .iter()
        .filter(|m| {
            m["type"] == 500 && m["channelId"] == ours["channelId"] && m["payload"]["stream"] == 1
        })
        .flat_map(bytes)
        .collect();
    assert_eq!(back, data, "the echo, recorded on its way to the client");
}
