//! `forward-server`: TCP and unix socket forwarding for the server, multiplexed over stdin and
//! stdout with the framing of [`super::proto`] (the reference is `docs/agent-protocol.md`).
//!
//! Plain threads and blocking sockets: the main thread reads frames from stdin and dispatches
//! them; one writer thread owns stdout and writes whole frames it gets from a channel; each dial
//! runs in its own thread; each listener has an accept thread; each stream has a socket-reader
//! thread (socket → `Data`, bounded by the server's credit) and a socket-writer thread (`Data` →
//! socket, then `Ack`). The process ends when stdin ends (exit 0), stdout fails (exit 0) or the
//! server breaks the protocol (exit 3); unix sockets and private directories the agent created
//! are removed first, and the process exit takes the remaining threads down.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File};
use std::io::{self, BufWriter, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs,
};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use super::proto::{
    decode, Frame, AGENT_ID_BASE, INITIAL_CREDIT, MAX_DATA, MAX_LISTENERS, MAX_MESSAGE_LEN,
    MAX_STREAMS, PROGRAM_CREDIT,
};
use super::AgentError;

/// How long a `DialTcp` tries one address.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Stack size of every thread the agent starts (a few thousand may run at once).
const STACK_SIZE: usize = 256 * 1024;
/// Exit code for a protocol violation by the server.
const EXIT_VIOLATION: i32 = 3;

/// What a stream carries: a connected socket, or a program's descriptors.
enum Sock {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// A program's stdout (or terminal) and stdin (none for its stderr stream, or once
    /// closed).
    Program {
        read: File,
        write: Mutex<Option<Arc<File>>>,
    },
}

impl Sock {
    fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => (&*s).read(buf),
            Sock::Unix(s) => (&*s).read(buf),
            // A terminal's master reads EIO once every slave is closed: its end of file.
            Sock::Program { read, .. } => match (&*read).read(buf) {
                Err(e) if e.kind() != io::ErrorKind::Interrupted => Ok(0),
                other => other,
            },
        }
    }

    fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => (&*s).write_all(buf),
            Sock::Unix(s) => (&*s).write_all(buf),
            Sock::Program { write, .. } => {
                // Not under the lock: a write blocked on a full pipe must not block a
                // shutdown (the main thread's, on Close).
                let file = write.lock().unwrap_or_else(|e| e.into_inner()).clone();
                match file {
                    Some(f) => (&*f).write_all(buf),
                    None => Err(io::ErrorKind::BrokenPipe.into()),
                }
            }
        }
    }

    fn shutdown(&self, how: Shutdown) {
        // ENOTCONN after the peer went away changes nothing.
        let _ = match self {
            Sock::Tcp(s) => s.shutdown(how),
            Sock::Unix(s) => s.shutdown(how),
            // Closing the program's stdin is its end of file; its output is read to the end.
            Sock::Program { write, .. } => {
                if how != Shutdown::Read {
                    write.lock().unwrap_or_else(|e| e.into_inner()).take();
                }
                Ok(())
            }
        };
    }
}

/// A program started by `Spawn`, shared by its streams.
struct Program {
    /// Its stream (the frame id of `Spawn`), and its stderr stream (0 on a terminal).
    id: u32,
    stderr_id: u32,
    pid: rustix::process::Pid,
    /// The terminal's master side, for resizes and the hang-up.
    master: Option<File>,
    end: Mutex<ProgramEnd>,
}

/// What must happen before `Exited` goes out.
struct ProgramEnd {
    /// `(status, signal)` once reaped.
    status: Option<(u32, u8)>,
    /// Output streams that have not reached end of file yet.
    readers_left: u8,
    /// `Exited` was sent, or the server closed the program.
    over: bool,
}

/// What the socket-writer thread of a stream works through.
enum ToSocket {
    Data(Vec<u8>),
    Eof,
    Stop,
}

/// The half-close state of a stream.
#[derive(Default)]
struct Progress {
    /// We sent `Eof` (the socket's read side ended).
    sent_eof: bool,
    /// The server's `Eof` went through: queue drained, socket write side shut down.
    peer_eof_done: bool,
    /// The stream was released; its threads stop quietly.
    released: bool,
}

/// One live stream.
struct Stream {
    id: u32,
    sock: Sock,
    /// The program whose stdout/terminal or stderr this stream is.
    program: Option<Arc<Program>>,
    /// Our send credit: [`INITIAL_CREDIT`], or [`PROGRAM_CREDIT`] for a program's output.
    /// (What the server may send us is always [`INITIAL_CREDIT`].)
    limit: u32,
    /// Our remaining send credit (bytes of `Data` we may still send un-`Ack`ed).
    credit: Mutex<u32>,
    credit_changed: Condvar,
    /// Bytes of the server's `Data` not yet `Ack`ed by us.
    unacked: AtomicU32,
    /// The server sent `Eof`.
    server_eof: AtomicBool,
    progress: Mutex<Progress>,
    queue: Sender<ToSocket>,
}

/// A stream slot: a dial in progress or a live stream.
enum Slot {
    Dialing,
    Live(Arc<Stream>),
}

/// One listener. The accept thread owns the socket; this is how to stop it and clean up.
struct Listener {
    stopped: Arc<AtomicBool>,
    /// Where to connect to wake the accept thread.
    wake: Wake,
    /// The socket file we created, and the private directory around it.
    unix_path: Option<PathBuf>,
    private_dir: Option<PathBuf>,
}

enum Wake {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

#[derive(Default)]
struct State {
    streams: HashMap<u32, Slot>,
    listeners: HashMap<u32, Listener>,
    /// The next id for an accepted stream (`None` when exhausted).
    next_agent_id: Option<u32>,
    /// Running programs by PID, until reaped. The reaper takes this lock to reap, and a
    /// `Spawn` holds it from the spawn until the PID is in here, so no exit is missed.
    programs: HashMap<i32, Arc<Program>>,
}

/// What every thread shares.
struct Shared {
    state: Mutex<State>,
    out: Sender<Frame>,
    /// `session-server`: the agent's own executable, to start programs through.
    exe: Option<PathBuf>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, frame: Frame) {
        // Fails only once the writer is gone, and then the process is exiting.
        let _ = self.out.send(frame);
    }
}

/// Set by the first thread that ends the process; others then wait for the exit.
static EXITING: AtomicBool = AtomicBool::new(false);

/// Removes what the agent created on disk and exits with `code`.
fn finish(shared: &Shared, code: i32) -> ! {
    if EXITING.swap(true, Ordering::SeqCst) {
        loop {
            thread::park();
        }
    }
    let listeners: Vec<Listener> = shared.lock().listeners.drain().map(|(_, l)| l).collect();
    for l in &listeners {
        remove_files(l);
    }
    std::process::exit(code);
}

fn remove_files(l: &Listener) {
    if let Some(p) = &l.unix_path {
        let _ = fs::remove_file(p);
    }
    if let Some(d) = &l.private_dir {
        let _ = fs::remove_dir(d);
    }
}

fn violation(shared: &Shared, msg: impl std::fmt::Display) -> ! {
    eprintln!("containerssh-agent: forward-server: protocol violation: {msg}");
    finish(shared, EXIT_VIOLATION);
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) {
    // Failing to start a thread (out of memory or threads) is fatal for the agent anyway.
    if let Err(e) = thread::Builder::new()
        .name(name.to_owned())
        .stack_size(STACK_SIZE)
        .spawn(f)
    {
        eprintln!("containerssh-agent: forward-server: cannot start a thread: {e}");
        std::process::exit(1);
    }
}

/// A `Failed` reply, its message cut to [`MAX_MESSAGE_LEN`] bytes at a character boundary.
fn failed(id: u32, message: String) -> Frame {
    let mut message = message;
    if message.len() > MAX_MESSAGE_LEN {
        let mut end = MAX_MESSAGE_LEN;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    Frame::Failed { id, message }
}

/// `forward-server` (`exe` none) or `session-server` (programs start from `exe`): serves frames
/// from stdin until it ends; returns only on setup failure.
pub fn run(exe: Option<PathBuf>) -> Result<i32, AgentError> {
    let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().map(File::from);
    let mut input = dup(io::stdin().as_fd()).map_err(AgentError::Stdio)?;
    let output = dup(io::stdout().as_fd()).map_err(AgentError::Stdio)?;
    if exe.is_some() {
        // session-server (no seccomp filter; forward-server's allows no such fcntl): where
        // our output is a pipe (the engine's attach or exec stream), room for programs'
        // output while the engine reads; a socket or a refusing kernel keeps its size.
        let _ = rustix::pipe::fcntl_setpipe_size(&output, super::programs::OUTPUT_PIPE_BYTES);
    }
    let (tx, rx) = mpsc::channel();
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            next_agent_id: Some(AGENT_ID_BASE),
            ..State::default()
        }),
        out: tx,
        exe,
    });
    {
        let shared = Arc::clone(&shared);
        spawn("stdout", move || writer(&shared, rx, output));
    }
    if shared.exe.is_some() {
        // Before the first spawn, so no SIGCHLD is missed.
        let signals =
            super::signal::listen(&[rustix::process::Signal::INT, rustix::process::Signal::TERM])?;
        let shared = Arc::clone(&shared);
        spawn("reaper", move || reaper(&shared, signals));
    }
    let mut buf: Vec<u8> = Vec::with_capacity(128 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match input.read(&mut chunk) {
            Ok(0) => finish(&shared, 0),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => finish(&shared, 0),
        };
        // A read never reports more bytes than the buffer holds.
        buf.extend(chunk.iter().take(n));
        let mut rest = buf.as_slice();
        loop {
            match decode(rest) {
                Ok(Some((frame, len))) => {
                    // `len` is at most `rest.len()`: decode never consumes more than it has.
                    rest = rest.get(len..).unwrap_or_default();
                    handle(&shared, frame);
                }
                Ok(None) => break,
                Err(e) => violation(&shared, e),
            }
        }
        let used = buf.len() - rest.len();
        buf.drain(..used);
    }
}

/// Frames at least this large skip the writer's buffer: their payload goes out from where it
/// is, with its header, in one `writev`.
const BULK_FRAME: usize = 16 * 1024;

/// The stdout writer: whole frames, flushed when the channel runs dry (during a long burst the
/// `BufWriter` writes out whenever its buffer fills). Bulk `Data` is not copied into the
/// buffer (nor into an encoded frame).
fn writer(shared: &Shared, rx: Receiver<Frame>, output: File) {
    let mut out = BufWriter::with_capacity(BULK_FRAME, output);
    let mut bytes = Vec::with_capacity(MAX_MESSAGE_LEN + 64);
    while let Ok(mut frame) = rx.recv() {
        loop {
            let written = match &frame {
                Frame::Data { id, data } if data.len() >= BULK_FRAME => {
                    let header = super::proto::data_header(*id, data.len());
                    out.flush()
                        .and_then(|()| write_all_vectored(out.get_mut(), &header, data))
                }
                _ => {
                    bytes.clear();
                    frame.encode(&mut bytes);
                    out.write_all(&bytes)
                }
            };
            if written.is_err() {
                finish(shared, 0);
            }
            match rx.try_recv() {
                Ok(f) => frame = f,
                Err(_) => break,
            }
        }
        if out.flush().is_err() {
            finish(shared, 0);
        }
    }
}

/// `head` then `body`, with as few `writev` calls as the pipe takes.
fn write_all_vectored(out: &mut File, head: &[u8], body: &[u8]) -> io::Result<()> {
    let mut bufs = [io::IoSlice::new(head), io::IoSlice::new(body)];
    let mut bufs = &mut bufs[..];
    while !bufs.is_empty() {
        match out.write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Dispatches one frame from the server (main thread).
fn handle(shared: &Arc<Shared>, frame: Frame) {
    match frame {
        Frame::DialTcp { id, .. }
        | Frame::DialUnix { id, .. }
        | Frame::ListenTcp { id, .. }
        | Frame::ListenUnix { id, .. }
        | Frame::ListenX11 { id, .. } => {
            if id >= AGENT_ID_BASE {
                violation(shared, format!("the server used agent id {id:#x}"));
            }
            let mut state = shared.lock();
            if state.streams.contains_key(&id) || state.listeners.contains_key(&id) {
                drop(state);
                violation(shared, format!("id {id} is already in use"));
            }
            match frame {
                Frame::DialTcp { .. } | Frame::DialUnix { .. } => {
                    if state.streams.len() >= MAX_STREAMS {
                        drop(state);
                        shared.send(failed(id, format!("too many streams ({MAX_STREAMS})")));
                        return;
                    }
                    state.streams.insert(id, Slot::Dialing);
                    drop(state);
                    let shared = Arc::clone(shared);
                    spawn("dial", move || dial(&shared, frame));
                }
                _ => {
                    if state.listeners.len() >= MAX_LISTENERS {
                        drop(state);
                        shared.send(failed(id, format!("too many listeners ({MAX_LISTENERS})")));
                        return;
                    }
                    drop(state);
                    listen(shared, frame);
                }
            }
        }
        Frame::Spawn { .. } => spawn_program(shared, frame),
        Frame::Resize { id, rows, cols } => {
            if let Some(master) = program_of(shared, id)
                .as_ref()
                .and_then(|p| p.master.as_ref())
            {
                let _ = super::programs::resize(master, rows, cols);
            }
        }
        Frame::Signal { id, signal } => {
            let sig = rustix::process::Signal::from_named_raw(i32::from(signal));
            if let (Some(p), Some(sig)) = (program_of(shared, id), sig) {
                // Only while unreaped: a reaped PID may belong to another process already.
                // The reaper reaps and records the status under the state lock, held here
                // across the check and the kill.
                let _state = shared.lock();
                let end = p.end.lock().unwrap_or_else(|e| e.into_inner());
                if !end.over && end.status.is_none() {
                    let _ = rustix::process::kill_process(p.pid, sig);
                }
            }
        }
        Frame::Unlisten { id } => {
            let Some(l) = shared.lock().listeners.remove(&id) else {
                return;
            };
            l.stopped.store(true, Ordering::SeqCst);
            // The accept thread is blocked in accept(); a connection wakes it, it sees `stopped`
            // and drops the listening socket.
            match &l.wake {
                Wake::Tcp(addr) => {
                    let _ = TcpStream::connect_timeout(addr, Duration::from_secs(1));
                }
                Wake::Unix(path) => {
                    let _ = UnixStream::connect(path);
                }
            }
            remove_files(&l);
        }
        Frame::Data { id, data } => {
            let Some(stream) = live(shared, id) else {
                return;
            };
            if stream.server_eof.load(Ordering::SeqCst) {
                violation(shared, format!("Data after Eof on stream {id}"));
            }
            if stream.program.as_ref().is_some_and(|p| p.stderr_id == id) {
                violation(shared, format!("Data on the stderr stream {id}"));
            }
            let len = data.len() as u32;
            let before = stream.unacked.fetch_add(len, Ordering::SeqCst);
            if u64::from(before) + u64::from(len) > u64::from(INITIAL_CREDIT) {
                violation(
                    shared,
                    format!("Data beyond the credit on stream {id} ({before} + {len} bytes)"),
                );
            }
            let _ = stream.queue.send(ToSocket::Data(data));
        }
        Frame::Eof { id } => {
            if let Some(stream) = live(shared, id) {
                if !stream.server_eof.swap(true, Ordering::SeqCst) {
                    let _ = stream.queue.send(ToSocket::Eof);
                }
            }
        }
        Frame::Close { id } => {
            let mut state = shared.lock();
            match state.streams.get(&id) {
                Some(Slot::Live(stream)) => {
                    let stream = Arc::clone(stream);
                    drop(state);
                    match &stream.program {
                        Some(p) if p.id == id => close_program(shared, p),
                        _ => release(shared, &stream, false),
                    }
                }
                // A dial in progress: its thread finds the slot gone and drops the socket.
                Some(Slot::Dialing) => {
                    state.streams.remove(&id);
                }
                None => {}
            }
        }
        Frame::Ack { id, bytes } => {
            let Some(stream) = live(shared, id) else {
                return;
            };
            let mut credit = stream.credit.lock().unwrap_or_else(|e| e.into_inner());
            match credit.checked_add(bytes) {
                Some(c) if c <= stream.limit => *credit = c,
                _ => {
                    drop(credit);
                    violation(shared, format!("Ack of more than was sent on stream {id}"));
                }
            }
            stream.credit_changed.notify_all();
        }
        Frame::Opened { id, .. }
        | Frame::Failed { id, .. }
        | Frame::Accepted { id, .. }
        | Frame::Exited { id, .. } => {
            violation(
                shared,
                format!("agent-only frame from the server (id {id})"),
            );
        }
    }
}

/// The live stream `id`; a dial in progress is a violation for frames that need a stream.
fn live(shared: &Shared, id: u32) -> Option<Arc<Stream>> {
    let state = shared.lock();
    match state.streams.get(&id) {
        Some(Slot::Live(s)) => Some(Arc::clone(s)),
        Some(Slot::Dialing) => {
            drop(state);
            violation(shared, format!("stream {id} used before Opened"));
        }
        None => None,
    }
}

/// Host text to an IP for listening.
fn listen_ip(host: &str) -> Option<IpAddr> {
    match host {
        "" | "*" | "0.0.0.0" => Some(Ipv4Addr::UNSPECIFIED.into()),
        "localhost" => Some(Ipv4Addr::LOCALHOST.into()),
        _ => strip_brackets(host).parse().ok(),
    }
}

fn strip_brackets(host: &str) -> &str {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// `ListenTcp`, `ListenUnix` and `ListenX11` (main thread; binding does not block).
fn listen(shared: &Arc<Shared>, frame: Frame) {
    let id = frame.id();
    let stopped = Arc::new(AtomicBool::new(false));
    let (accept, listener) = match frame {
        Frame::ListenTcp { port, host, .. } => {
            let addrs: Vec<SocketAddr> = match listen_ip(&host) {
                Some(ip) => vec![SocketAddr::new(ip, port)],
                None => match (host.as_str(), port).to_socket_addrs() {
                    Ok(a) => a.collect(),
                    Err(e) => {
                        shared.send(failed(id, format!("resolve {host}: {e}")));
                        return;
                    }
                },
            };
            let sock = match TcpListener::bind(&addrs[..]) {
                Ok(s) => s,
                Err(e) => {
                    shared.send(failed(id, format!("listen {host}:{port}: {e}")));
                    return;
                }
            };
            let bound = match sock.local_addr() {
                Ok(a) => a,
                Err(e) => {
                    shared.send(failed(id, format!("listen {host}:{port}: {e}")));
                    return;
                }
            };
            // Waking connects to the address itself, or to loopback for a wildcard.
            let wake_ip = match bound.ip() {
                IpAddr::V4(ip) if ip.is_unspecified() => Ipv4Addr::LOCALHOST.into(),
                IpAddr::V6(ip) if ip.is_unspecified() => Ipv6Addr::LOCALHOST.into(),
                ip => ip,
            };
            let l = Listener {
                stopped: Arc::clone(&stopped),
                wake: Wake::Tcp(SocketAddr::new(wake_ip, bound.port())),
                unix_path: None,
                private_dir: None,
            };
            (Accepting::Tcp(sock, bound.port()), l)
        }
        Frame::ListenX11 { first, count, .. } => {
            // OpenSSH's X11 displays: the first free 127.0.0.1:6000+N, tried in one request.
            let found = (first..first.saturating_add(count)).find_map(|display| {
                let port = 6000u16.checked_add(display)?;
                let addr = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
                TcpListener::bind(addr).ok().map(|s| (s, display, addr))
            });
            let Some((sock, display, addr)) = found else {
                let last = first.saturating_add(count).saturating_sub(1);
                shared.send(failed(
                    id,
                    format!("no free X11 display in {first}..={last}"),
                ));
                return;
            };
            let l = Listener {
                stopped: Arc::clone(&stopped),
                wake: Wake::Tcp(addr),
                unix_path: None,
                private_dir: None,
            };
            // `Opened` carries the display number.
            (Accepting::Tcp(sock, display), l)
        }
        Frame::ListenUnix {
            private_dir, path, ..
        } => {
            let path = PathBuf::from(OsStr::from_bytes(&path));
            let shown = path.display();
            let mut dir = None;
            if private_dir {
                let parent = match path.parent() {
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => {
                        shared.send(failed(id, format!("listen {shown}: no parent directory")));
                        return;
                    }
                };
                if let Err(e) = DirBuilder::new().mode(0o700).create(parent) {
                    let msg = format!("create directory {}: {e}", parent.display());
                    shared.send(failed(id, msg));
                    return;
                }
                dir = Some(parent.to_path_buf());
            }
            let sock = match UnixListener::bind(&path) {
                Ok(s) => s,
                Err(e) => {
                    if let Some(d) = &dir {
                        let _ = fs::remove_dir(d);
                    }
                    shared.send(failed(id, format!("listen {shown}: {e}")));
                    return;
                }
            };
            let l = Listener {
                stopped: Arc::clone(&stopped),
                wake: Wake::Unix(path.clone()),
                unix_path: Some(path),
                private_dir: dir,
            };
            (Accepting::Unix(sock), l)
        }
        _ => return,
    };
    let port = match accept {
        Accepting::Tcp(_, port) => port,
        Accepting::Unix(_) => 0,
    };
    {
        let mut state = shared.lock();
        state.listeners.insert(id, listener);
        // Opened goes out before any Accepted: the accept thread starts after this.
        shared.send(Frame::Opened { id, port });
    }
    let shared = Arc::clone(shared);
    spawn("accept", move || accept_loop(&shared, id, accept, &stopped));
}

enum Accepting {
    Tcp(TcpListener, u16),
    Unix(UnixListener),
}

/// Accepts connections of listener `id` until it is stopped.
fn accept_loop(shared: &Arc<Shared>, id: u32, listener: Accepting, stopped: &AtomicBool) {
    loop {
        let accepted = match &listener {
            Accepting::Tcp(l, _) => l.accept().map(|(s, peer)| {
                let _ = s.set_nodelay(true);
                (Sock::Tcp(s), peer.port(), peer.ip().to_string())
            }),
            Accepting::Unix(l) => l.accept().map(|(s, _)| (Sock::Unix(s), 0, String::new())),
        };
        if stopped.load(Ordering::SeqCst) {
            return;
        }
        let (sock, peer_port, peer) = match accepted {
            Ok(a) => a,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                // Out of descriptors or an aborted connection: retry without spinning.
                thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let mut state = shared.lock();
        let Some(stream_id) = state.next_agent_id else {
            continue; // ids exhausted (2^31 connections): refuse by closing
        };
        if state.streams.len() >= MAX_STREAMS {
            continue; // dropping `sock` closes it at once
        }
        state.next_agent_id = stream_id.checked_add(1);
        shared.send(Frame::Accepted {
            listener: id,
            id: stream_id,
            peer_port,
            peer,
        });
        start_stream(shared, &mut state, stream_id, sock, None);
    }
}

/// `DialTcp`/`DialUnix` in its own thread: connect, then Opened (and the stream starts) or
/// Failed. If the server closed the id meanwhile, the socket is dropped without a reply.
fn dial(shared: &Arc<Shared>, frame: Frame) {
    let id = frame.id();
    let result = match frame {
        Frame::DialTcp { port, host, .. } => dial_tcp(&host, port).map(Sock::Tcp),
        Frame::DialUnix { path, .. } => {
            let path = Path::new(OsStr::from_bytes(&path));
            UnixStream::connect(path)
                .map(Sock::Unix)
                .map_err(|e| format!("connect {}: {e}", path.display()))
        }
        _ => return,
    };
    let mut state = shared.lock();
    if !matches!(state.streams.get(&id), Some(Slot::Dialing)) {
        return;
    }
    match result {
        Ok(sock) => {
            shared.send(Frame::Opened { id, port: 0 });
            start_stream(shared, &mut state, id, sock, None);
        }
        Err(message) => {
            state.streams.remove(&id);
            shared.send(failed(id, message));
        }
    }
}

fn dial_tcp(host: &str, port: u16) -> Result<TcpStream, String> {
    let addrs: Vec<SocketAddr> = match host {
        "localhost" => vec![SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port)],
        _ => match strip_brackets(host).parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => match (host, port).to_socket_addrs() {
                Ok(a) => a.collect(),
                Err(e) => return Err(format!("resolve {host}: {e}")),
            },
        },
    };
    let mut last = format!("resolve {host}: no addresses");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = format!("connect {addr}: {e}"),
        }
    }
    Err(last)
}

/// Makes `id` a live stream and starts its two threads (caller holds the state lock, after
/// sending Opened/Accepted, so those precede the stream's first Data).
fn start_stream(
    shared: &Arc<Shared>,
    state: &mut State,
    id: u32,
    sock: Sock,
    program: Option<Arc<Program>>,
) {
    let (queue, rx) = mpsc::channel();
    let limit = if program.is_some() {
        PROGRAM_CREDIT
    } else {
        INITIAL_CREDIT
    };
    let stream = Arc::new(Stream {
        id,
        sock,
        program,
        limit,
        credit: Mutex::new(limit),
        credit_changed: Condvar::new(),
        unacked: AtomicU32::new(0),
        server_eof: AtomicBool::new(false),
        progress: Mutex::new(Progress::default()),
        queue,
    });
    state.streams.insert(id, Slot::Live(Arc::clone(&stream)));
    {
        let (shared, stream) = (Arc::clone(shared), Arc::clone(&stream));
        spawn("sock-read", move || {
            socket_reader(&shared, &stream);
            // A program's output ends here, at its end of file or when the server released
            // the stream (the program may still run; its exit still counts).
            if let Some(p) = &stream.program {
                output_ended(&shared, p);
            }
        });
    }
    let shared = Arc::clone(shared);
    spawn("sock-write", move || socket_writer(&shared, &stream, rx));
}

/// Releases a stream once: forget it, shut the socket down, wake its threads; sends Close
/// unless the server closed it.
fn release(shared: &Shared, stream: &Stream, send_close: bool) {
    {
        let mut p = stream.progress.lock().unwrap_or_else(|e| e.into_inner());
        if p.released {
            return;
        }
        p.released = true;
    }
    shared.lock().streams.remove(&stream.id);
    if send_close {
        shared.send(Frame::Close { id: stream.id });
    }
    stream.sock.shutdown(Shutdown::Both);
    let _ = stream.queue.send(ToSocket::Stop);
    drop(stream.credit.lock().unwrap_or_else(|e| e.into_inner()));
    stream.credit_changed.notify_all();
}

/// Marks one direction done; releases the stream when both are.
fn half_done(shared: &Shared, stream: &Stream, mark: impl FnOnce(&mut Progress)) {
    let both = {
        let mut p = stream.progress.lock().unwrap_or_else(|e| e.into_inner());
        mark(&mut p);
        // A program's streams end with its `Exited`, not with both directions' ends.
        p.sent_eof && p.peer_eof_done && !p.released && stream.program.is_none()
    };
    if both {
        release(shared, stream, true);
    }
}

fn is_released(stream: &Stream) -> bool {
    stream
        .progress
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .released
}

/// Socket → `Data` frames, within the server's credit; `Eof` at the end, `Close` on error.
fn socket_reader(shared: &Shared, stream: &Stream) {
    let mut buf = vec![0u8; MAX_DATA];
    loop {
        let allowed = {
            let mut credit = stream.credit.lock().unwrap_or_else(|e| e.into_inner());
            while *credit == 0 {
                if is_released(stream) {
                    return;
                }
                credit = stream
                    .credit_changed
                    .wait(credit)
                    .unwrap_or_else(|e| e.into_inner());
            }
            (*credit as usize).min(MAX_DATA)
        };
        // `allowed` is at most MAX_DATA, the buffer's size.
        let window = buf.get_mut(..allowed).unwrap_or_default();
        let n = match stream.sock.read(window) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                release(shared, stream, true);
                return;
            }
        };
        if is_released(stream) {
            return;
        }
        if n == 0 {
            shared.send(Frame::Eof { id: stream.id });
            half_done(shared, stream, |p| p.sent_eof = true);
            return;
        }
        let n = n + more_output(&stream.sock, buf.get_mut(n..allowed).unwrap_or_default());
        *stream.credit.lock().unwrap_or_else(|e| e.into_inner()) -= n as u32;
        shared.send(Frame::Data {
            id: stream.id,
            data: buf.get(..n).unwrap_or_default().to_vec(),
        });
    }
}

/// After a short read of a program's output, how long its reader lets the program write more
/// before sending what it has. A program writing 4 KiB at a time (busybox) would otherwise
/// make a frame, and downstream a wake-up of every hop, per 4 KiB.
const COALESCE: Duration = Duration::from_micros(200);

/// What a program wrote within [`COALESCE`] after a short read, read into `room` (only what
/// the pipe holds: never blocks); 0 for a socket, or when `room` is most of the frame.
fn more_output(sock: &Sock, room: &mut [u8]) -> usize {
    let Sock::Program { read, .. } = sock else {
        return 0;
    };
    if room.len() < MAX_DATA / 2 {
        return 0;
    }
    thread::sleep(COALESCE);
    let held = rustix::io::ioctl_fionread(read).unwrap_or(0);
    let want = usize::try_from(held).unwrap_or(usize::MAX).min(room.len());
    match room.get_mut(..want) {
        Some(r) if want > 0 => (&*read).read(r).unwrap_or(0),
        _ => 0,
    }
}

/// `Data` → socket, then `Ack`; on the server's `Eof`, shuts the socket's write side down.
fn socket_writer(shared: &Shared, stream: &Stream, rx: Receiver<ToSocket>) {
    while let Ok(item) = rx.recv() {
        match item {
            ToSocket::Data(data) => {
                // A program that closed its stdin loses the rest (as with a pipe); the
                // credit still comes back.
                if stream.sock.write_all(&data).is_err() && stream.program.is_none() {
                    release(shared, stream, true);
                    return;
                }
                let n = data.len() as u32;
                stream.unacked.fetch_sub(n, Ordering::SeqCst);
                shared.send(Frame::Ack {
                    id: stream.id,
                    bytes: n,
                });
            }
            ToSocket::Eof => {
                stream.sock.shutdown(Shutdown::Write);
                half_done(shared, stream, |p| p.peer_eof_done = true);
            }
            ToSocket::Stop => return,
        }
    }
}

/// The program whose stream (either of its two) `id` is.
fn program_of(shared: &Shared, id: u32) -> Option<Arc<Program>> {
    match shared.lock().streams.get(&id) {
        Some(Slot::Live(s)) => s.program.clone(),
        _ => None,
    }
}

/// `Spawn` (main thread): start the program, then `Opened` and its live streams, or `Failed`.
fn spawn_program(shared: &Arc<Shared>, frame: Frame) {
    let Frame::Spawn {
        id,
        tty,
        stderr_id,
        rows,
        cols,
        argv,
        env,
    } = frame
    else {
        return;
    };
    let Some(exe) = shared.exe.as_deref() else {
        shared.send(failed(
            id,
            "forward-server does not start programs (session-server does)".into(),
        ));
        return;
    };
    let ids: &[u32] = if tty { &[id] } else { &[id, stderr_id] };
    if ids.iter().any(|&i| i >= AGENT_ID_BASE) || id == stderr_id {
        violation(
            shared,
            format!("Spawn {id} with stderr {stderr_id}: bad ids"),
        );
    }
    let mut state = shared.lock();
    if ids
        .iter()
        .any(|i| state.streams.contains_key(i) || state.listeners.contains_key(i))
    {
        drop(state);
        violation(shared, format!("Spawn {id}: an id is already in use"));
    }
    if state.streams.len() + ids.len() > MAX_STREAMS {
        drop(state);
        shared.send(failed(id, format!("too many streams ({MAX_STREAMS})")));
        return;
    }
    // Under the state lock: the reaper cannot reap the program before it is registered.
    let started = super::programs::start(exe, &argv, &env, tty.then_some((rows, cols)));
    let spawned = match started {
        Ok(s) => s,
        Err(e) => {
            drop(state);
            let program = argv
                .first()
                .map(|p| String::from_utf8_lossy(p).into_owned());
            shared.send(failed(
                id,
                format!("cannot start {}: {e}", program.unwrap_or_default()),
            ));
            return;
        }
    };
    let program = Arc::new(Program {
        id,
        stderr_id: if tty { 0 } else { stderr_id },
        pid: spawned.pid,
        master: spawned.master,
        end: Mutex::new(ProgramEnd {
            status: None,
            readers_left: ids.len() as u8,
            over: false,
        }),
    });
    state
        .programs
        .insert(spawned.pid.as_raw_nonzero().get(), Arc::clone(&program));
    shared.send(Frame::Opened { id, port: 0 });
    let main = Sock::Program {
        read: spawned.output,
        write: Mutex::new(Some(Arc::new(spawned.input))),
    };
    start_stream(shared, &mut state, id, main, Some(Arc::clone(&program)));
    if let Some(err) = spawned.stderr {
        let sock = Sock::Program {
            read: err,
            write: Mutex::new(None),
        };
        start_stream(shared, &mut state, stderr_id, sock, Some(program));
    }
}

/// One of a program's output streams reached its end.
fn output_ended(shared: &Shared, p: &Program) {
    let mut end = p.end.lock().unwrap_or_else(|e| e.into_inner());
    end.readers_left = end.readers_left.saturating_sub(1);
    drop(end);
    maybe_exited(shared, p);
}

/// Sends `Exited` once the program was reaped and its output has ended, and releases its
/// streams (without `Close`).
fn maybe_exited(shared: &Shared, p: &Program) {
    let mut end = p.end.lock().unwrap_or_else(|e| e.into_inner());
    let Some((status, signal)) = end.status else {
        return;
    };
    if end.readers_left > 0 || std::mem::replace(&mut end.over, true) {
        return;
    }
    drop(end);
    shared.send(Frame::Exited {
        id: p.id,
        status,
        signal,
    });
    release_program_streams(shared, p);
}

fn release_program_streams(shared: &Shared, p: &Program) {
    for id in [p.id, p.stderr_id] {
        let stream = match shared.lock().streams.get(&id) {
            Some(Slot::Live(s)) if s.program.is_some() => Arc::clone(s),
            _ => continue,
        };
        release(shared, &stream, false);
    }
}

/// The server closed the program's stream: a terminal is hung up (SIGHUP to the program's
/// process group), pipes lose their writer (stdin end of file); no `Exited` follows.
fn close_program(shared: &Shared, p: &Program) {
    let hang_up = {
        let mut end = p.end.lock().unwrap_or_else(|e| e.into_inner());
        !std::mem::replace(&mut end.over, true) && end.status.is_none() && p.master.is_some()
    };
    if hang_up {
        let _ = rustix::process::kill_process_group(p.pid, rustix::process::Signal::HUP);
    }
    release_program_streams(shared, p);
}

/// `session-server`'s signal thread: reaps every child (it may be PID 1, with orphans to
/// reap), records the status of the programs it started, and ends the agent on INT or TERM.
fn reaper(shared: &Shared, mut signals: signal_hook::iterator::Signals) {
    loop {
        let ended: Vec<Arc<Program>> = {
            let mut state = shared.lock();
            super::signal::reap_exited()
                .into_iter()
                .filter_map(|(pid, status)| {
                    let p = state.programs.remove(&pid)?;
                    // Under the state lock (order: state, then end), as `Signal` checks it.
                    p.end.lock().unwrap_or_else(|e| e.into_inner()).status =
                        Some(super::programs::exit_of(status));
                    Some(p)
                })
                .collect()
        };
        for p in ended {
            maybe_exited(shared, &p);
        }
        for raw in signals.wait() {
            if raw == rustix::process::Signal::INT.as_raw()
                || raw == rustix::process::Signal::TERM.as_raw()
            {
                finish(shared, 0);
            }
        }
    }
}
