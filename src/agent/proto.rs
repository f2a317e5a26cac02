//! The framing of `forward-server`'s stdin/stdout (see `docs/agent-protocol.md`): pure code, no
//! I/O, shared by the agent and the server side.
//!
//! A frame is `u32 len`, `u8 type`, `u32 id`, then `len - 5` bytes of payload; every integer is
//! big-endian. [`decode`] checks the length before it looks at anything else, so a hostile
//! length never makes it allocate or wait for more than [`HEADER_LEN`] + [`MAX_PAYLOAD`] bytes.

/// Bytes before the payload: `u32 len`, `u8 type`, `u32 id`.
pub const HEADER_LEN: usize = 9;
/// The largest payload of any frame.
pub const MAX_PAYLOAD: usize = 32 * 1024 + 1024;
/// The most bytes one `Data` frame carries.
pub const MAX_DATA: usize = 32 * 1024;
/// Bytes of `Data` a sender may have un-`Ack`ed per stream and direction.
pub const INITIAL_CREDIT: u32 = 256 * 1024;
/// The agent's send credit on the two streams of a program started by `Spawn` (its output;
/// its stdin keeps [`INITIAL_CREDIT`]): a session's bulk output crosses the engine's attach
/// stream, whose round trip (through dockerd) held 256 KiB windows to half of what an exec
/// delivers.
pub const PROGRAM_CREDIT: u32 = 1024 * 1024;
/// Stream ids the agent allocates (for accepted connections) are `>=` this; the server's own
/// ids are below it.
pub const AGENT_ID_BASE: u32 = 0x8000_0000;
/// Live streams (dials in progress included) per `forward-server`.
pub const MAX_STREAMS: usize = 1024;
/// Listeners per `forward-server`.
pub const MAX_LISTENERS: usize = 64;
/// The longest host name in `DialTcp`/`ListenTcp` and peer address in `Accepted`.
pub const MAX_HOST_LEN: usize = 255;
/// The longest unix socket path in `DialUnix`/`ListenUnix`.
pub const MAX_PATH_LEN: usize = 1024;
/// The longest message in `Failed`.
pub const MAX_MESSAGE_LEN: usize = 512;

/// The smallest valid `len` (type and id, no payload).
const MIN_LEN: usize = 5;

/// Frame type bytes.
mod kind {
    pub const DIAL_TCP: u8 = 1;
    pub const DIAL_UNIX: u8 = 2;
    pub const LISTEN_TCP: u8 = 3;
    pub const LISTEN_UNIX: u8 = 4;
    pub const UNLISTEN: u8 = 5;
    pub const LISTEN_X11: u8 = 6;
    pub const SPAWN: u8 = 7;
    pub const RESIZE: u8 = 8;
    pub const SIGNAL: u8 = 9;
    pub const OPENED: u8 = 16;
    pub const FAILED: u8 = 17;
    pub const ACCEPTED: u8 = 18;
    pub const EXITED: u8 = 19;
    pub const DATA: u8 = 32;
    pub const EOF: u8 = 33;
    pub const CLOSE: u8 = 34;
    pub const ACK: u8 = 35;
}

/// `ListenUnix` flag: the agent creates (and later removes) the socket's parent directory.
const FLAG_PRIVATE_DIR: u8 = 1;
/// `Spawn` flag: the program runs on a new pseudo-terminal.
const FLAG_TTY: u8 = 1;
/// The highest signal number `Signal` may carry (Linux's real-time signals end at 64).
pub const MAX_SIGNAL: u8 = 64;

/// One frame of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Server → agent: connect stream `id` to `host:port` over TCP.
    DialTcp {
        /// New stream id (below [`AGENT_ID_BASE`]).
        id: u32,
        /// Destination port.
        port: u16,
        /// Destination host name or IP literal.
        host: String,
    },
    /// Server → agent: connect stream `id` to the unix socket `path`.
    DialUnix {
        /// New stream id (below [`AGENT_ID_BASE`]).
        id: u32,
        /// Socket path (bytes, not necessarily UTF-8).
        path: Vec<u8>,
    },
    /// Server → agent: listen on `host:port` (port 0: any free port) as listener `id`.
    ListenTcp {
        /// New listener id (below [`AGENT_ID_BASE`]).
        id: u32,
        /// Port to bind, 0 for any.
        port: u16,
        /// Address to bind: "", "*", "0.0.0.0", "localhost", "::" or an IP literal.
        host: String,
    },
    /// Server → agent: listen on the unix socket `path` as listener `id`.
    ListenUnix {
        /// New listener id (below [`AGENT_ID_BASE`]).
        id: u32,
        /// The agent creates the parent directory (mode 0700, must not exist) and removes it
        /// when the listener ends.
        private_dir: bool,
        /// Socket path.
        path: Vec<u8>,
    },
    /// Server → agent: listen on the first free X11 display `127.0.0.1:6000+N`, N in
    /// `first..first+count`, as listener `id`; `Opened` carries N.
    ListenX11 {
        /// New listener id (below [`AGENT_ID_BASE`]).
        id: u32,
        /// The first display number tried.
        first: u16,
        /// How many are tried.
        count: u16,
    },
    /// Server → agent (`session-server`): start a program as stream `id` (stdin and stdout,
    /// or the terminal), its stderr as stream `stderr_id` (0 with a terminal).
    Spawn {
        /// The program's stream (below [`AGENT_ID_BASE`]).
        id: u32,
        /// Run it on a new pseudo-terminal of `rows` × `cols`.
        tty: bool,
        /// The stderr stream without a terminal (below [`AGENT_ID_BASE`]), else 0.
        stderr_id: u32,
        /// Terminal rows (0: the kernel's default).
        rows: u16,
        /// Terminal columns.
        cols: u16,
        /// The program and its arguments (at least the program; no NUL bytes).
        argv: Vec<Vec<u8>>,
        /// `NAME=value` entries added to the agent's environment.
        env: Vec<Vec<u8>>,
    },
    /// Server → agent: the program's terminal size changed. No reply.
    Resize {
        /// The program.
        id: u32,
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// Server → agent: send signal `signal` (1..=[`MAX_SIGNAL`]) to the program. No reply.
    Signal {
        /// The program.
        id: u32,
        /// The signal number.
        signal: u8,
    },
    /// Agent → server: the program ended and its output streams reached their end; both
    /// streams are released without `Close`.
    Exited {
        /// The program.
        id: u32,
        /// Its exit code, or 128+N when signal N killed it.
        status: u32,
        /// N when signal N killed it, else 0.
        signal: u8,
    },
    /// Server → agent: stop listener `id`; accepted streams go on. No reply.
    Unlisten {
        /// The listener.
        id: u32,
    },
    /// Agent → server: a dial or listen succeeded.
    Opened {
        /// The stream or listener.
        id: u32,
        /// The bound port for `ListenTcp`, else 0.
        port: u16,
    },
    /// Agent → server: a dial or listen failed.
    Failed {
        /// The stream or listener.
        id: u32,
        /// Why, human readable, at most [`MAX_MESSAGE_LEN`] bytes.
        message: String,
    },
    /// Agent → server: listener `listener` accepted a connection, now stream `id`.
    Accepted {
        /// The listener (the frame's id).
        listener: u32,
        /// The new stream (`>=` [`AGENT_ID_BASE`]).
        id: u32,
        /// The peer's port (0 for unix sockets).
        peer_port: u16,
        /// The peer's IP address as text ("" for unix sockets).
        peer: String,
    },
    /// Both ways: bytes of stream `id` (1..=[`MAX_DATA`] of them).
    Data {
        /// The stream.
        id: u32,
        /// The bytes.
        data: Vec<u8>,
    },
    /// Both ways: the sender sends no more `Data` on stream `id`.
    Eof {
        /// The stream.
        id: u32,
    },
    /// Both ways: the sender released stream `id`; the receiver releases it too, no reply.
    Close {
        /// The stream.
        id: u32,
    },
    /// Both ways: the sender delivered `bytes` more bytes of stream `id`; credit returns.
    Ack {
        /// The stream.
        id: u32,
        /// Bytes delivered since the last `Ack`.
        bytes: u32,
    },
}

/// Why bytes are not a valid frame. Every one is a protocol violation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// `len` is below 5 or above 5 + [`MAX_PAYLOAD`].
    #[error("frame length {0} is out of range (5..={max})", max = MIN_LEN + MAX_PAYLOAD)]
    BadLength(u32),
    /// The type byte names no frame.
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// The payload size does not fit the frame type.
    #[error("{kind} frame has a payload of {len} bytes, which is invalid for it")]
    BadPayloadSize {
        /// Frame type name.
        kind: &'static str,
        /// Payload bytes.
        len: usize,
    },
    /// A text field is not UTF-8.
    #[error("{kind} frame: the {field} is not UTF-8")]
    BadUtf8 {
        /// Frame type name.
        kind: &'static str,
        /// Field name.
        field: &'static str,
    },
    /// A host, path, peer or message is longer than its limit.
    #[error("{kind} frame: the {field} is {len} bytes long, more than {max}")]
    TooLong {
        /// Frame type name.
        kind: &'static str,
        /// Field name.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// `ListenUnix` has flag bits other than `private_dir`.
    #[error("ListenUnix frame has unknown flags {0:#04x}")]
    BadFlags(u8),
    /// `Spawn` has flag bits other than `tty`.
    #[error("Spawn frame has unknown flags {0:#04x}")]
    BadSpawnFlags(u8),
    /// `Spawn`'s strings are malformed: no program, a NUL byte, a stderr id with a terminal
    /// (or none without), or bytes left over.
    #[error("Spawn frame: {0}")]
    BadSpawn(&'static str),
    /// `Signal` outside 1..=[`MAX_SIGNAL`].
    #[error("Signal frame carries signal {0}, outside 1..={MAX_SIGNAL}")]
    BadSignal(u8),
    /// A `Data` frame without bytes.
    #[error("Data frame is empty")]
    EmptyData,
    /// A `Data` frame with more than [`MAX_DATA`] bytes.
    #[error("Data frame has {0} bytes, more than {MAX_DATA}")]
    DataTooLarge(usize),
}

impl Frame {
    /// The frame's header id: the stream or listener it is about (for `Accepted`, the listener).
    pub fn id(&self) -> u32 {
        match self {
            Frame::DialTcp { id, .. }
            | Frame::DialUnix { id, .. }
            | Frame::ListenTcp { id, .. }
            | Frame::ListenUnix { id, .. }
            | Frame::ListenX11 { id, .. }
            | Frame::Spawn { id, .. }
            | Frame::Resize { id, .. }
            | Frame::Signal { id, .. }
            | Frame::Exited { id, .. }
            | Frame::Unlisten { id }
            | Frame::Opened { id, .. }
            | Frame::Failed { id, .. }
            | Frame::Data { id, .. }
            | Frame::Eof { id }
            | Frame::Close { id }
            | Frame::Ack { id, .. } => *id,
            Frame::Accepted { listener, .. } => *listener,
        }
    }

    /// Appends the encoded frame to `out`. Fields are written as they are; a frame that
    /// [`decode`] would reject (oversize host, empty data, ...) encodes to such bytes.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&[0; 4]);
        let (ty, id) = (self.type_byte(), self.id());
        out.push(ty);
        out.extend_from_slice(&id.to_be_bytes());
        match self {
            Frame::DialTcp { port, host, .. } | Frame::ListenTcp { port, host, .. } => {
                out.extend_from_slice(&port.to_be_bytes());
                out.extend_from_slice(host.as_bytes());
            }
            Frame::DialUnix { path, .. } => out.extend_from_slice(path),
            Frame::ListenUnix {
                private_dir, path, ..
            } => {
                out.push(if *private_dir { FLAG_PRIVATE_DIR } else { 0 });
                out.extend_from_slice(path);
            }
            Frame::ListenX11 { first, count, .. } => {
                out.extend_from_slice(&first.to_be_bytes());
                out.extend_from_slice(&count.to_be_bytes());
            }
            Frame::Spawn {
                tty,
                stderr_id,
                rows,
                cols,
                argv,
                env,
                ..
            } => {
                out.push(if *tty { FLAG_TTY } else { 0 });
                out.extend_from_slice(&stderr_id.to_be_bytes());
                out.extend_from_slice(&rows.to_be_bytes());
                out.extend_from_slice(&cols.to_be_bytes());
                // Counts and lengths saturate only for frames decode refuses anyway.
                let count = |n: usize| u16::try_from(n).unwrap_or(u16::MAX).to_be_bytes();
                out.extend_from_slice(&count(argv.len()));
                out.extend_from_slice(&count(env.len()));
                for s in argv.iter().chain(env) {
                    out.extend_from_slice(&count(s.len()));
                    out.extend_from_slice(s);
                }
            }
            Frame::Resize { rows, cols, .. } => {
                out.extend_from_slice(&rows.to_be_bytes());
                out.extend_from_slice(&cols.to_be_bytes());
            }
            Frame::Signal { signal, .. } => out.push(*signal),
            Frame::Exited { status, signal, .. } => {
                out.extend_from_slice(&status.to_be_bytes());
                out.push(*signal);
            }
            Frame::Unlisten { .. } | Frame::Eof { .. } | Frame::Close { .. } => {}
            Frame::Opened { port, .. } => out.extend_from_slice(&port.to_be_bytes()),
            Frame::Failed { message, .. } => out.extend_from_slice(message.as_bytes()),
            Frame::Accepted {
                id,
                peer_port,
                peer,
                ..
            } => {
                out.extend_from_slice(&id.to_be_bytes());
                out.extend_from_slice(&peer_port.to_be_bytes());
                out.extend_from_slice(peer.as_bytes());
            }
            Frame::Data { data, .. } => out.extend_from_slice(data),
            Frame::Ack { bytes, .. } => out.extend_from_slice(&bytes.to_be_bytes()),
        }
        // Saturates only for frames far beyond anything decode accepts.
        let len = u32::try_from(out.len() - start - 4).unwrap_or(u32::MAX);
        // The 4 placeholder bytes pushed at `start` above, so always there.
        if let Some(slot) = out.get_mut(start..).and_then(<[u8]>::first_chunk_mut) {
            *slot = len.to_be_bytes();
        }
    }

    fn type_byte(&self) -> u8 {
        match self {
            Frame::DialTcp { .. } => kind::DIAL_TCP,
            Frame::DialUnix { .. } => kind::DIAL_UNIX,
            Frame::ListenTcp { .. } => kind::LISTEN_TCP,
            Frame::ListenUnix { .. } => kind::LISTEN_UNIX,
            Frame::ListenX11 { .. } => kind::LISTEN_X11,
            Frame::Spawn { .. } => kind::SPAWN,
            Frame::Resize { .. } => kind::RESIZE,
            Frame::Signal { .. } => kind::SIGNAL,
            Frame::Exited { .. } => kind::EXITED,
            Frame::Unlisten { .. } => kind::UNLISTEN,
            Frame::Opened { .. } => kind::OPENED,
            Frame::Failed { .. } => kind::FAILED,
            Frame::Accepted { .. } => kind::ACCEPTED,
            Frame::Data { .. } => kind::DATA,
            Frame::Eof { .. } => kind::EOF,
            Frame::Close { .. } => kind::CLOSE,
            Frame::Ack { .. } => kind::ACK,
        }
    }
}

/// Checks a text field's length and encoding.
fn text(
    kind: &'static str,
    field: &'static str,
    b: &[u8],
    max: usize,
) -> Result<String, ProtoError> {
    if b.len() > max {
        return Err(ProtoError::TooLong {
            kind,
            field,
            len: b.len(),
            max,
        });
    }
    match std::str::from_utf8(b) {
        Ok(s) => Ok(s.to_owned()),
        Err(_) => Err(ProtoError::BadUtf8 { kind, field }),
    }
}

fn path(kind: &'static str, b: &[u8]) -> Result<Vec<u8>, ProtoError> {
    if b.len() > MAX_PATH_LEN {
        return Err(ProtoError::TooLong {
            kind,
            field: "path",
            len: b.len(),
            max: MAX_PATH_LEN,
        });
    }
    Ok(b.to_vec())
}

/// A `Spawn`'s argv and environment.
type SpawnStrings = (Vec<Vec<u8>>, Vec<Vec<u8>>);

/// `Spawn`'s payload after its 13 fixed bytes: `argc` then `envc` strings, each `u16 len` +
/// bytes, filling the payload exactly.
fn spawn_strings(mut p: &[u8], argc: usize, envc: usize) -> Result<SpawnStrings, ProtoError> {
    if argc == 0 {
        return Err(ProtoError::BadSpawn("no program"));
    }
    let mut take = |n: usize| -> Result<Vec<Vec<u8>>, ProtoError> {
        // Each string needs at least its 2 length bytes, so a count beyond that is a lie
        // (and this bounds the allocation by the payload).
        if n > p.len() / 2 {
            return Err(ProtoError::BadSpawn("more strings than the frame holds"));
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let Some((len, rest)) = p.split_first_chunk::<2>() else {
                return Err(ProtoError::BadSpawn("a string's length is cut off"));
            };
            let len = u16::from_be_bytes(*len) as usize;
            let Some((s, rest)) = rest.split_at_checked(len) else {
                return Err(ProtoError::BadSpawn("a string is cut off"));
            };
            if s.contains(&0) {
                return Err(ProtoError::BadSpawn("a string contains a NUL byte"));
            }
            out.push(s.to_vec());
            p = rest;
        }
        Ok(out)
    };
    let argv = take(argc)?;
    let env = take(envc)?;
    if !p.is_empty() {
        return Err(ProtoError::BadSpawn("bytes after the last string"));
    }
    Ok((argv, env))
}

/// The header of a `Data` frame of `len` payload bytes (`len` at most [`MAX_DATA`]), for a
/// writer that sends the payload from where it is instead of copying it into an encoded frame.
pub fn data_header(id: u32, len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    // MIN_LEN + MAX_DATA fits a u32 by far; a larger len is the caller's bug, encoded as is.
    let body = u32::try_from(MIN_LEN + len).unwrap_or(u32::MAX);
    let (l, rest) = h.split_at_mut(4);
    l.copy_from_slice(&body.to_be_bytes());
    if let Some((ty, idb)) = rest.split_first_mut() {
        *ty = kind::DATA;
        idb.copy_from_slice(&id.to_be_bytes());
    }
    h
}

/// A valid, complete `Data` frame at the start of `buf`: its stream id and the frame's whole
/// length (header included), for a reader that keeps the payload where it is. `None` for
/// anything else (another kind, a partial or invalid frame): [`decode`] says what it is.
pub fn data_frame(buf: &[u8]) -> Option<(u32, usize)> {
    let (len_bytes, rest) = buf.split_first_chunk::<4>()?;
    let len = u32::from_be_bytes(*len_bytes) as usize;
    let (&[ty, i0, i1, i2, i3], _) = rest.split_first_chunk::<MIN_LEN>()?;
    let payload = len.checked_sub(MIN_LEN)?;
    (ty == kind::DATA && (1..=MAX_DATA).contains(&payload) && rest.len() >= len)
        .then(|| (u32::from_be_bytes([i0, i1, i2, i3]), 4 + len))
}

/// Decodes the frame at the start of `buf`: `Ok(None)` when `buf` holds only part of it,
/// `Ok(Some((frame, bytes consumed)))`, or why the bytes are no valid frame. Never panics.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, ProtoError> {
    let Some((len_bytes, rest)) = buf.split_first_chunk::<4>() else {
        return Ok(None);
    };
    let len32 = u32::from_be_bytes(*len_bytes);
    let len = len32 as usize;
    if !(MIN_LEN..=MIN_LEN + MAX_PAYLOAD).contains(&len) {
        return Err(ProtoError::BadLength(len32));
    }
    let Some(body) = rest.get(..len) else {
        return Ok(None);
    };
    // `len >= MIN_LEN`, so the type byte and the id are there; were they not, the length
    // would be the one at fault.
    let Some((&[ty, i0, i1, i2, i3], p)) = body.split_first_chunk::<MIN_LEN>() else {
        return Err(ProtoError::BadLength(len32));
    };
    let id = u32::from_be_bytes([i0, i1, i2, i3]);
    let bad_size = |kind: &'static str| ProtoError::BadPayloadSize { kind, len: p.len() };
    let empty = |kind: &'static str| {
        if p.is_empty() {
            Ok(())
        } else {
            Err(bad_size(kind))
        }
    };
    let frame = match ty {
        kind::DIAL_TCP | kind::LISTEN_TCP => {
            let name = if ty == kind::DIAL_TCP {
                "DialTcp"
            } else {
                "ListenTcp"
            };
            let &[p0, p1, ref host @ ..] = p else {
                return Err(bad_size(name));
            };
            let port = u16::from_be_bytes([p0, p1]);
            let host = text(name, "host", host, MAX_HOST_LEN)?;
            if ty == kind::DIAL_TCP {
                Frame::DialTcp { id, port, host }
            } else {
                Frame::ListenTcp { id, port, host }
            }
        }
        kind::DIAL_UNIX => Frame::DialUnix {
            id,
            path: path("DialUnix", p)?,
        },
        kind::LISTEN_UNIX => {
            let &[flags, ref socket @ ..] = p else {
                return Err(bad_size("ListenUnix"));
            };
            if flags & !FLAG_PRIVATE_DIR != 0 {
                return Err(ProtoError::BadFlags(flags));
            }
            Frame::ListenUnix {
                id,
                private_dir: flags & FLAG_PRIVATE_DIR != 0,
                path: path("ListenUnix", socket)?,
            }
        }
        kind::LISTEN_X11 => {
            let &[f0, f1, c0, c1] = p else {
                return Err(bad_size("ListenX11"));
            };
            Frame::ListenX11 {
                id,
                first: u16::from_be_bytes([f0, f1]),
                count: u16::from_be_bytes([c0, c1]),
            }
        }
        kind::SPAWN => {
            let &[flags, s0, s1, s2, s3, r0, r1, c0, c1, a0, a1, e0, e1, ref strings @ ..] = p
            else {
                return Err(bad_size("Spawn"));
            };
            if flags & !FLAG_TTY != 0 {
                return Err(ProtoError::BadSpawnFlags(flags));
            }
            let tty = flags & FLAG_TTY != 0;
            let stderr_id = u32::from_be_bytes([s0, s1, s2, s3]);
            if tty != (stderr_id == 0) {
                return Err(ProtoError::BadSpawn(
                    "a stderr stream is required without a terminal and refused with one",
                ));
            }
            let argc = u16::from_be_bytes([a0, a1]) as usize;
            let envc = u16::from_be_bytes([e0, e1]) as usize;
            let (argv, env) = spawn_strings(strings, argc, envc)?;
            Frame::Spawn {
                id,
                tty,
                stderr_id,
                rows: u16::from_be_bytes([r0, r1]),
                cols: u16::from_be_bytes([c0, c1]),
                argv,
                env,
            }
        }
        kind::RESIZE => {
            let &[r0, r1, c0, c1] = p else {
                return Err(bad_size("Resize"));
            };
            Frame::Resize {
                id,
                rows: u16::from_be_bytes([r0, r1]),
                cols: u16::from_be_bytes([c0, c1]),
            }
        }
        kind::SIGNAL => {
            let &[signal] = p else {
                return Err(bad_size("Signal"));
            };
            if !(1..=MAX_SIGNAL).contains(&signal) {
                return Err(ProtoError::BadSignal(signal));
            }
            Frame::Signal { id, signal }
        }
        kind::EXITED => {
            let &[s0, s1, s2, s3, signal] = p else {
                return Err(bad_size("Exited"));
            };
            Frame::Exited {
                id,
                status: u32::from_be_bytes([s0, s1, s2, s3]),
                signal,
            }
        }
        kind::UNLISTEN => {
            empty("Unlisten")?;
            Frame::Unlisten { id }
        }
        kind::OPENED => {
            let &[p0, p1] = p else {
                return Err(bad_size("Opened"));
            };
            Frame::Opened {
                id,
                port: u16::from_be_bytes([p0, p1]),
            }
        }
        kind::FAILED => Frame::Failed {
            id,
            message: text("Failed", "message", p, MAX_MESSAGE_LEN)?,
        },
        kind::ACCEPTED => {
            let &[s0, s1, s2, s3, p0, p1, ref peer @ ..] = p else {
                return Err(bad_size("Accepted"));
            };
            Frame::Accepted {
                listener: id,
                id: u32::from_be_bytes([s0, s1, s2, s3]),
                peer_port: u16::from_be_bytes([p0, p1]),
                peer: text("Accepted", "peer", peer, MAX_HOST_LEN)?,
            }
        }
        kind::DATA => {
            if p.is_empty() {
                return Err(ProtoError::EmptyData);
            }
            if p.len() > MAX_DATA {
                return Err(ProtoError::DataTooLarge(p.len()));
            }
            Frame::Data {
                id,
                data: p.to_vec(),
            }
        }
        kind::EOF => {
            empty("Eof")?;
            Frame::Eof { id }
        }
        kind::CLOSE => {
            empty("Close")?;
            Frame::Close { id }
        }
        kind::ACK => {
            let &[b0, b1, b2, b3] = p else {
                return Err(bad_size("Ack"));
            };
            Frame::Ack {
                id,
                bytes: u32::from_be_bytes([b0, b1, b2, b3]),
            }
        }
        other => return Err(ProtoError::UnknownType(other)),
    };
    Ok(Some((frame, 4 + len)))
}

#[cfg(test)]
mod tests {
    /// The header written apart and the fast path of readers agree with `encode` and
    /// `decode`, and the fast path leaves every other frame (and every bad one) to `decode`.
    #[test]
    fn data_header_and_data_frame_agree_with_encode_and_decode() {
        for len in [1, 100, MAX_DATA] {
            let frame = Frame::Data {
                id: 0x8000_0007,
                data: vec![7; len],
            };
            let mut enc = Vec::new();
            frame.encode(&mut enc);
            assert_eq!(
                enc.get(..HEADER_LEN),
                Some(&data_header(0x8000_0007, len)[..])
            );
            assert_eq!(data_frame(&enc), Some((0x8000_0007, enc.len())));
            assert_eq!(
                data_frame(enc.get(..enc.len() - 1).unwrap()),
                None,
                "partial"
            );
            let (decoded, used) = decode(&enc).unwrap().unwrap();
            assert_eq!((decoded, used), (frame, enc.len()));
        }
        let mut ack = Vec::new();
        Frame::Ack { id: 1, bytes: 5 }.encode(&mut ack);
        assert_eq!(data_frame(&ack), None);
        // Empty and oversized Data are decode's errors, not the fast path's frames.
        let empty = data_header(1, 0);
        assert_eq!(data_frame(&empty), None);
        assert!(decode(&empty).is_err());
        let mut big = data_header(1, MAX_DATA + 1).to_vec();
        big.resize(HEADER_LEN + MAX_DATA + 1, 0);
        assert_eq!(data_frame(&big), None);
        assert!(decode(&big).is_err());
    }

    use super::*;

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::DialTcp {
                id: 1,
                port: 80,
                host: "example.com".into(),
            },
            Frame::DialTcp {
                id: 2,
                port: 65535,
                host: String::new(),
            },
            Frame::DialUnix {
                id: 3,
                path: b"/run/\xffsock".to_vec(),
            },
            Frame::ListenTcp {
                id: 4,
                port: 0,
                host: "::".into(),
            },
            Frame::ListenUnix {
                id: 5,
                private_dir: true,
                path: b"/tmp/d/s".to_vec(),
            },
            Frame::ListenX11 {
                id: 6,
                first: 10,
                count: 100,
            },
            Frame::ListenUnix {
                id: 6,
                private_dir: false,
                path: vec![],
            },
            Frame::Unlisten { id: 7 },
            Frame::Spawn {
                id: 20,
                tty: false,
                stderr_id: 21,
                rows: 0,
                cols: 0,
                argv: vec![b"/bin/sh".to_vec(), b"-c".to_vec(), b"echo \xff".to_vec()],
                env: vec![b"LANG=C".to_vec(), Vec::new()],
            },
            Frame::Spawn {
                id: 22,
                tty: true,
                stderr_id: 0,
                rows: 24,
                cols: 80,
                argv: vec![Vec::new()],
                env: vec![],
            },
            Frame::Resize {
                id: 22,
                rows: 50,
                cols: 132,
            },
            Frame::Signal { id: 22, signal: 15 },
            Frame::Exited {
                id: 20,
                status: 143,
                signal: 15,
            },
            Frame::Opened { id: 8, port: 4242 },
            Frame::Failed {
                id: 9,
                message: "connect 10.0.0.1:80: Connection refused".into(),
            },
            Frame::Accepted {
                listener: 10,
                id: AGENT_ID_BASE + 1,
                peer_port: 55000,
                peer: "127.0.0.1".into(),
            },
            Frame::Data {
                id: u32::MAX,
                data: vec![0xab; MAX_DATA],
            },
            Frame::Data {
                id: 11,
                data: vec![1],
            },
            Frame::Eof { id: 12 },
            Frame::Close { id: 13 },
            Frame::Ack {
                id: 14,
                bytes: INITIAL_CREDIT,
            },
        ]
    }

    fn enc(f: &Frame) -> Vec<u8> {
        let mut v = Vec::new();
        f.encode(&mut v);
        v
    }

    fn raw(ty: u8, id: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = ((payload.len() + 5) as u32).to_be_bytes().to_vec();
        v.push(ty);
        v.extend_from_slice(&id.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn round_trip_every_variant() {
        for f in all_frames() {
            let bytes = enc(&f);
            assert_eq!(decode(&bytes), Ok(Some((f.clone(), bytes.len()))), "{f:?}");
        }
    }

    #[test]
    fn wire_layout() {
        assert_eq!(
            enc(&Frame::DialTcp {
                id: 0x0102_0304,
                port: 0x1f90,
                host: "h".into()
            }),
            [0, 0, 0, 8, 1, 1, 2, 3, 4, 0x1f, 0x90, b'h']
        );
        assert_eq!(
            enc(&Frame::Accepted {
                listener: 1,
                id: AGENT_ID_BASE,
                peer_port: 2,
                peer: String::new()
            }),
            [0, 0, 0, 11, 18, 0, 0, 0, 1, 0x80, 0, 0, 0, 0, 2]
        );
        assert_eq!(Frame::Eof { id: 5 }.id(), 5);
    }

    #[test]
    fn spawn_errors() {
        // flags, stderr id, rows, cols, argc, envc, then the strings.
        let spawn = |flags: u8, stderr: u32, argc: u16, envc: u16, strings: &[u8]| {
            let mut p = vec![flags];
            p.extend_from_slice(&stderr.to_be_bytes());
            p.extend_from_slice(&[0, 24, 0, 80]);
            p.extend_from_slice(&argc.to_be_bytes());
            p.extend_from_slice(&envc.to_be_bytes());
            p.extend_from_slice(strings);
            decode(&raw(7, 1, &p))
        };
        assert!(matches!(
            spawn(0, 2, 1, 0, &[0, 2, b's', b'h']),
            Ok(Some(_))
        ));
        assert_eq!(
            spawn(2, 2, 1, 0, &[0, 0]),
            Err(ProtoError::BadSpawnFlags(2))
        );
        assert!(matches!(
            spawn(0, 0, 1, 0, &[0, 0]),
            Err(ProtoError::BadSpawn(_))
        ));
        assert!(matches!(
            spawn(1, 2, 1, 0, &[0, 0]),
            Err(ProtoError::BadSpawn(_))
        ));
        for (argc, envc, strings) in [
            (0u16, 0u16, &[][..]),
            (1, 0, &[0, 3, b'a']),
            (1, 0, &[0]),
            (1, 0, &[0, 1, 0]),
            (1, 0, &[0, 1, b'a', b'x']),
            (1, 1, &[0, 1, b'a']),
            (u16::MAX, u16::MAX, &[0, 0]),
        ] {
            assert!(
                matches!(
                    spawn(0, 2, argc, envc, strings),
                    Err(ProtoError::BadSpawn(_))
                ),
                "{argc} {envc} {strings:?}"
            );
        }
        assert_eq!(decode(&raw(9, 1, &[0])), Err(ProtoError::BadSignal(0)));
        assert_eq!(decode(&raw(9, 1, &[65])), Err(ProtoError::BadSignal(65)));
    }

    #[test]
    fn partial_and_concatenated_input() {
        let frames = all_frames();
        let mut stream = Vec::new();
        for f in &frames {
            f.encode(&mut stream);
        }
        // Every prefix that ends inside a frame asks for more.
        let first = enc(&frames[0]);
        for cut in 0..first.len() {
            assert_eq!(decode(&first[..cut]), Ok(None), "cut {cut}");
        }
        // Fed one byte at a time, the stream yields the same frames.
        let (mut buf, mut got) = (Vec::new(), Vec::new());
        for &b in &stream {
            buf.push(b);
            while let Some((f, n)) = decode(&buf).unwrap() {
                buf.drain(..n);
                got.push(f);
            }
        }
        assert!(buf.is_empty());
        assert_eq!(got, frames);
    }

    #[test]
    fn errors() {
        // Length checked first, before the rest arrives.
        assert_eq!(decode(&[0, 0, 0, 4]), Err(ProtoError::BadLength(4)));
        assert_eq!(
            decode(&[0xff, 0xff, 0xff, 0xff]),
            Err(ProtoError::BadLength(u32::MAX))
        );
        let too_long = (MIN_LEN + MAX_PAYLOAD + 1) as u32;
        assert_eq!(
            decode(&too_long.to_be_bytes()),
            Err(ProtoError::BadLength(too_long))
        );
        assert!(matches!(
            decode(&raw(10, 1, &[])),
            Err(ProtoError::UnknownType(10))
        ));
        assert!(matches!(
            decode(&raw(0, 1, &[])),
            Err(ProtoError::UnknownType(0))
        ));
        for (ty, payload) in [
            (1u8, &[0u8][..]),
            (3, &[]),
            (4, &[]),
            (5, &[0]),
            (6, &[0, 0, 0]),
            (16, &[0]),
            (16, &[0, 0, 0]),
            (18, &[0, 0, 0, 0, 0]),
            (33, &[1]),
            (34, &[1]),
            (35, &[0, 0, 0]),
            (35, &[0, 0, 0, 0, 0]),
            (7, &[0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0]),
            (8, &[0, 1, 0]),
            (9, &[]),
            (9, &[1, 1]),
            (19, &[0, 0, 0, 0]),
        ] {
            assert!(
                matches!(
                    decode(&raw(ty, 1, payload)),
                    Err(ProtoError::BadPayloadSize { .. })
                ),
                "type {ty} payload {payload:?}"
            );
        }
        assert!(matches!(
            decode(&raw(1, 1, &[0, 80, 0xff])),
            Err(ProtoError::BadUtf8 { field: "host", .. })
        ));
        assert!(matches!(
            decode(&raw(17, 1, &[0xc3])),
            Err(ProtoError::BadUtf8 {
                field: "message",
                ..
            })
        ));
        assert!(matches!(
            decode(&raw(18, 1, &[0, 0, 0, 0, 0, 0, 0xff])),
            Err(ProtoError::BadUtf8 { field: "peer", .. })
        ));
        let mut host = vec![0, 80];
        host.extend_from_slice(&[b'a'; MAX_HOST_LEN + 1]);
        assert!(matches!(
            decode(&raw(3, 1, &host)),
            Err(ProtoError::TooLong { field: "host", .. })
        ));
        assert!(matches!(
            decode(&raw(2, 1, &[b'/'; MAX_PATH_LEN + 1])),
            Err(ProtoError::TooLong { field: "path", .. })
        ));
        let mut lp = vec![1];
        lp.extend_from_slice(&[b'/'; MAX_PATH_LEN + 1]);
        assert!(matches!(
            decode(&raw(4, 1, &lp)),
            Err(ProtoError::TooLong { field: "path", .. })
        ));
        assert!(matches!(
            decode(&raw(17, 1, &[b'x'; MAX_MESSAGE_LEN + 1])),
            Err(ProtoError::TooLong {
                field: "message",
                ..
            })
        ));
        assert_eq!(decode(&raw(4, 1, &[2, b'/'])), Err(ProtoError::BadFlags(2)));
        assert_eq!(decode(&raw(32, 1, &[])), Err(ProtoError::EmptyData));
        assert_eq!(
            decode(&raw(32, 1, &vec![0; MAX_DATA + 1])),
            Err(ProtoError::DataTooLarge(MAX_DATA + 1))
        );
        // At the limits exactly: accepted.
        assert!(decode(&raw(32, 1, &vec![0; MAX_DATA])).unwrap().is_some());
        assert!(decode(&raw(17, 1, &[b'x'; MAX_MESSAGE_LEN]))
            .unwrap()
            .is_some());
        assert!(decode(&raw(2, 1, &[b'/'; MAX_PATH_LEN])).unwrap().is_some());
        // Errors display as readable text.
        assert_eq!(
            ProtoError::BadLength(3).to_string(),
            format!("frame length 3 is out of range (5..={})", 5 + MAX_PAYLOAD)
        );
    }
}
