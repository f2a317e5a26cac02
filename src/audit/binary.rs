//! ContainerSSH's binary audit format, version 2, one file per connection named by its id:
//! a 40-byte header (`ContainerSSH-Auditlog` NUL-padded to 32 bytes, then the version as a
//! little-endian `u64`), then a gzip stream of CBOR messages, one after another. A message is
//! the map `{connectionId, timestamp (ns), type, payload, channelId}` with ContainerSSH's type
//! numbers and payload keys, so its decoder reads our files.
//!
//! What we record differently, on purpose: a password is never written (`auth_password*`
//! messages only with `intercept.passwords`, and then with an empty password: the flag that
//! one was tried); an environment variable's value only for the terminal, locale and time
//! zone variables (a client's `SendEnv` may carry secrets); an X11 cookie never; bytes a
//! recording had to drop are said in a `channel_request_unknown` message of type
//! `containerssh-audit-dropped`. Forwarded connections are recorded as they open (their
//! ContainerSSH messages), their data (`io`, stream 0 from the client, 1 to it) only with
//! `intercept.forwarding`.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use super::cbor::Item;

/// The header's magic and the version we write.
pub const MAGIC: &str = "ContainerSSH-Auditlog";
pub const VERSION: u64 = 2;
pub const HEADER_LEN: usize = 40;

/// The request type of the message that says a recording dropped bytes.
pub const DROPPED_REQUEST: &str = "containerssh-audit-dropped";

pub fn header() -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    for (slot, b) in h.iter_mut().zip(MAGIC.bytes()) {
        *slot = b;
    }
    for (slot, b) in h.iter_mut().skip(32).zip(VERSION.to_le_bytes()) {
        *slot = b;
    }
    h
}

/// A connection-level or channel-level event of the binary format (program data, window
/// changes and exits come as the recording's own events).
#[derive(Debug, Clone)]
pub enum Msg {
    Connect {
        remote: String,
    },
    /// `intercept.passwords` only: that a password was tried, and what came of it.
    AuthPassword {
        user: String,
        ok: Option<bool>,
    },
    AuthPubkey {
        user: String,
        key: String,
        ok: bool,
    },
    HandshakeSuccessful {
        user: String,
    },
    NewChannel {
        kind: &'static str,
        ok: bool,
        reason: String,
    },
    Pty {
        term: String,
        cols: u32,
        rows: u32,
    },
    SetEnv {
        name: String,
        value: String,
    },
    Exec {
        program: String,
    },
    Shell,
    Subsystem {
        name: String,
    },
    Signal {
        name: String,
    },
    Close,
    /// `x11-req` (the cookie is never recorded).
    X11Request {
        screen: u32,
    },
    /// A client's `tcpip-forward` / `cancel-tcpip-forward`.
    ForwardTcp {
        host: String,
        port: u32,
        cancel: bool,
    },
    /// A client's `streamlocal-forward@openssh.com` / its cancel.
    ForwardUnix {
        path: String,
        cancel: bool,
    },
    /// A `direct-tcpip` channel: the client connects through the container.
    DirectTcp {
        host: String,
        port: u32,
        from_host: String,
        from_port: u32,
    },
    DirectUnix {
        path: String,
    },
    /// A `forwarded-tcpip` channel: a connection to a forwarded port in the container.
    ForwardedTcp {
        host: String,
        port: u32,
        from_host: String,
        from_port: u32,
    },
    ForwardedUnix {
        path: String,
    },
    X11Channel {
        from_host: String,
        from_port: u32,
    },
    /// An `auth-agent@openssh.com` channel (ContainerSSH has no message of its own for it).
    AgentChannel,
}

/// What the writer turns into one message.
pub enum Record<'a> {
    Msg(&'a Msg),
    Io(u8, &'a [u8]),
    Window(u32, u32),
    Exit(&'a crate::backend::ExitReport),
    Dropped(u64),
    Disconnect,
}

impl Record<'_> {
    fn type_and_payload(&self) -> (u64, Item<'_>) {
        use Item::{Bool, Bytes, Map, Text, Uint};
        let rid = || ("requestId", Uint(0));
        match self {
            Record::Msg(m) => match m {
                Msg::Connect { remote } => (
                    0,
                    Map(vec![("remoteAddr", Text(remote)), ("country", Text("XX"))]),
                ),
                Msg::AuthPassword { user, ok } => {
                    let t = match ok {
                        None => 100,
                        Some(true) => 101,
                        Some(false) => 102,
                    };
                    let mut m = vec![("username", Text(user))];
                    if *ok == Some(true) {
                        m.push(("authenticatedUsername", Text(user)));
                    }
                    m.push(("password", Bytes(b"")));
                    (t, Map(m))
                }
                Msg::AuthPubkey { user, key, ok } => (
                    if *ok { 105 } else { 106 },
                    Map(vec![("username", Text(user)), ("key", Text(key))]),
                ),
                Msg::HandshakeSuccessful { user } => (199, Map(vec![("username", Text(user))])),
                Msg::NewChannel { kind, ok, reason } => {
                    if *ok {
                        (301, Map(vec![("channelType", Text(kind))]))
                    } else {
                        (
                            302,
                            Map(vec![("channelType", Text(kind)), ("reason", Text(reason))]),
                        )
                    }
                }
                Msg::Pty { term, cols, rows } => (
                    404,
                    Map(vec![
                        rid(),
                        ("term", Text(term)),
                        ("columns", Uint((*cols).into())),
                        ("rows", Uint((*rows).into())),
                        ("width", Uint(0)),
                        ("height", Uint(0)),
                        ("modelist", Bytes(b"")),
                    ]),
                ),
                Msg::SetEnv { name, value } => (
                    402,
                    Map(vec![rid(), ("name", Text(name)), ("value", Text(value))]),
                ),
                Msg::Exec { program } => (403, Map(vec![rid(), ("program", Text(program))])),
                Msg::Shell => (405, Map(vec![rid()])),
                Msg::Subsystem { name } => (407, Map(vec![rid(), ("subsystem", Text(name))])),
                Msg::Signal { name } => (406, Map(vec![rid(), ("signal", Text(name))])),
                Msg::Close => (497, Item::Null),
                Msg::X11Request { screen } => (
                    409,
                    Map(vec![
                        rid(),
                        ("singleConnection", Bool(false)),
                        ("authProtocol", Text("MIT-MAGIC-COOKIE-1")),
                        ("cookie", Text("")),
                        ("screen", Uint((*screen).into())),
                    ]),
                ),
                Msg::ForwardTcp { host, port, cancel } => (
                    if *cancel { 203 } else { 202 },
                    Map(vec![
                        ("BindHost", Text(host)),
                        ("BindPort", Uint((*port).into())),
                    ]),
                ),
                Msg::ForwardUnix { path, cancel } => (
                    if *cancel { 205 } else { 204 },
                    Map(vec![("Path", Text(path))]),
                ),
                Msg::DirectTcp {
                    host,
                    port,
                    from_host,
                    from_port,
                } => (
                    303,
                    Map(vec![
                        ("HostToConnect", Text(host)),
                        ("PortToConnect", Uint((*port).into())),
                        ("OriginatorHost", Text(from_host)),
                        ("OriginatorPort", Uint((*from_port).into())),
                    ]),
                ),
                Msg::DirectUnix { path } => (306, Map(vec![("Path", Text(path))])),
                Msg::ForwardedTcp {
                    host,
                    port,
                    from_host,
                    from_port,
                } => (
                    304,
                    Map(vec![
                        ("ConnectedHost", Text(host)),
                        ("ConnectedPort", Uint((*port).into())),
                        ("OriginatorHost", Text(from_host)),
                        ("OriginatorPort", Uint((*from_port).into())),
                    ]),
                ),
                Msg::ForwardedUnix { path } => (307, Map(vec![("Path", Text(path))])),
                Msg::X11Channel {
                    from_host,
                    from_port,
                } => (
                    305,
                    Map(vec![
                        ("OriginatorHost", Text(from_host)),
                        ("OriginatorPort", Uint((*from_port).into())),
                    ]),
                ),
                Msg::AgentChannel => (
                    301,
                    Map(vec![("channelType", Text("auth-agent@openssh.com"))]),
                ),
            },
            Record::Io(stream, data) => (
                500,
                Map(vec![
                    ("stream", Uint((*stream).into())),
                    ("data", Bytes(data)),
                ]),
            ),
            Record::Window(cols, rows) => (
                408,
                Map(vec![
                    rid(),
                    ("columns", Uint((*cols).into())),
                    ("rows", Uint((*rows).into())),
                    ("width", Uint(0)),
                    ("height", Uint(0)),
                ]),
            ),
            Record::Exit(crate::backend::ExitReport::Status(s)) => {
                (499, Map(vec![("exitStatus", Uint((*s).into()))]))
            }
            Record::Exit(crate::backend::ExitReport::Signal { name }) => (
                498,
                Map(vec![
                    ("signal", Text(name)),
                    ("coreDumped", Bool(false)),
                    ("errorMessage", Text("")),
                    ("languageTag", Text("")),
                ]),
            ),
            Record::Dropped(_) => (400, Item::Null),
            Record::Disconnect => (1, Item::Null),
        }
    }

    /// Appends the message's CBOR to `out`.
    pub fn encode(&self, connection_id: &str, ns: u64, channel: Option<u32>, out: &mut Vec<u8>) {
        let (t, payload) = self.type_and_payload();
        let dropped_text;
        let payload = match self {
            Record::Dropped(n) => {
                dropped_text = format!("{n} bytes not recorded (the recording fell behind)");
                Item::Map(vec![
                    ("requestId", Item::Uint(0)),
                    ("requestType", Item::Text(DROPPED_REQUEST)),
                    ("payload", Item::Bytes(dropped_text.as_bytes())),
                ])
            }
            _ => payload,
        };
        Item::Map(vec![
            ("connectionId", Item::Text(connection_id)),
            ("timestamp", Item::Uint(ns)),
            ("type", Item::Uint(t)),
            ("payload", payload),
            (
                "channelId",
                channel.map_or(Item::Null, |c| Item::Uint(c.into())),
            ),
        ])
        .encode(out);
    }
}

/// Wall-clock nanoseconds of an instant, from a pair taken at the recording's start (so that
/// a clock step does not reorder a recording's messages).
#[derive(Clone, Copy)]
pub struct Clock {
    instant: Instant,
    wall_ns: u64,
}

impl Clock {
    pub fn now() -> Self {
        let wall_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Self {
            instant: Instant::now(),
            wall_ns,
        }
    }

    pub fn ns(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.instant).as_nanos();
        self.wall_ns
            .saturating_add(u64::try_from(since).unwrap_or(u64::MAX))
    }
}

/// The message type's name, as ContainerSSH's decoder prints it (`typeId`).
pub fn type_id(t: u64) -> &'static str {
    match t {
        0 => "connect",
        1 => "disconnect",
        100 => "auth_password",
        101 => "auth_password_successful",
        102 => "auth_password_failed",
        103 => "auth_password_backend_error",
        104 => "auth_pubkey",
        105 => "auth_pubkey_successful",
        106 => "auth_pubkey_failed",
        107 => "auth_pubkey_backend_error",
        108 => "auth_keyboard_interactive_challenge",
        109 => "auth_keyboard_interactive_answer",
        110 => "auth_keyboard_interactive_failed",
        111 => "auth_keyboard_interactive_backend_error",
        198 => "handshake_failed",
        199 => "handshake_successful",
        200 => "global_request_unknown",
        201 => "global_request_decode_failed",
        202 => "forward_tcpip",
        203 => "cancel_forward_tcpip",
        204 => "forward_streamlocal",
        205 => "cancel_forward_streamlocal",
        300 => "new_channel",
        301 => "new_channel_successful",
        302 => "new_channel_failed",
        303 => "new_channel_direct_tcpip",
        304 => "new_channel_forwarded_tcpip",
        305 => "new_channel_x11",
        306 => "new_channel_direct_streamlocal",
        307 => "new_channel_forwarded_streamlocal",
        400 => "channel_request_unknown",
        401 => "channel_request_decode_failed",
        402 => "setenv",
        403 => "exec",
        404 => "pty",
        405 => "shell",
        406 => "signal",
        407 => "subsystem",
        408 => "window",
        409 => "x11-req",
        496 => "close_write",
        497 => "close",
        498 => "exit_signal",
        499 => "exit",
        500 => "io",
        501 => "request_failed",
        _ => "unknown",
    }
}
