//! Every cap and timeout that bounds what a client or a container can make us hold, in one
//! place. Each is enforced where the bytes are read or the item is created.

use std::time::Duration;

/// A config file is hand-written; anything larger is a mistake.
pub const MAX_CONFIG_BYTES: u64 = 4 * 1024 * 1024;

/// The largest `ssh.maxAuthTries` accepted: each try may cost a webhook call or a hash.
pub const MAX_AUTH_TRIES_LIMIT: u32 = 100;

/// The largest `full` of `ssh.maxStartups`: unauthenticated connections across the server
/// (each holds a socket and a key-exchange state, ~100 KiB at most).
pub const MAX_STARTUPS_LIMIT: u32 = 4096;

/// The listening socket's backlog (the kernel caps it at `net.core.somaxconn`, 4096 by
/// default): a flood the front door turns away must not crowd out other clients' connects.
pub const LISTEN_BACKLOG: i32 = 4096;

/// Connections served at once, authenticated or not, and sockets awaiting a PROXY header: the
/// accept loop waits for a place before it accepts (file descriptors are the bound).
pub const MAX_CONNECTIONS: usize = 4096;

/// Sources remembered with a penalty (OpenSSH's `max-sources4`/`max-sources6`, together); past
/// this the entries closest to expiry are dropped, so a spray of addresses costs at most this
/// many entries (~100 bytes each).
pub const MAX_PENALISED_SOURCES: usize = 65_536;

/// Threads verifying password hashes (one per core up to this): each argon2id verification
/// holds its memory cost (19 MiB by default) while it runs, so this bounds that memory.
pub const MAX_HASH_WORKERS: usize = 4;

/// Verifications queued or running; further attempts wait (asynchronously) for a place, at
/// most `MAX_HASH_WAIT`, then are refused: the wait holds a russh callback.
pub const MAX_HASH_QUEUE: usize = 64;
pub const MAX_HASH_WAIT: Duration = Duration::from_secs(10);

/// The most expensive password hashes accepted in a password file (beyond them a line is
/// unusable, logged): argon2 memory in KiB (64 MiB; OWASP suggests 19–46), bcrypt's cost,
/// SHA-crypt's rounds.
pub const MAX_ARGON2_MEMORY_KIB: u32 = 64 * 1024;
pub const MAX_ARGON2_PASSES: u32 = 64;
pub const MAX_BCRYPT_COST: u32 = 16;
pub const MAX_SHA_CRYPT_ROUNDS: u32 = 1_000_000;

/// `ssh.perSourcePenaltyExemptList` and `ssh.proxyProtocol.trustedProxies` entries.
pub const MAX_ADDRESS_LIST_ENTRIES: usize = 1024;

/// Session channels open at once on one connection (OpenSSH's MaxSessions).
pub const MAX_CHANNELS_PER_CONNECTION: usize = 10;

/// `env` requests accepted per channel, and the size of each name and value.
pub const MAX_ENV_VARS: usize = 64;
pub const MAX_ENV_NAME_BYTES: usize = 256;
pub const MAX_ENV_VALUE_BYTES: usize = 32 * 1024;

/// `exec` command length: Linux's own per-argument limit (MAX_ARG_STRLEN).
pub const MAX_COMMAND_BYTES: usize = 128 * 1024;

/// TERM value from `pty-req`.
pub const MAX_TERM_BYTES: usize = 64;

/// Terminal dimensions passed to the engine.
pub const MAX_TERMINAL_DIMENSION: u32 = 10_000;

/// The first window a channel is given (russh's `window_size`), reserved from the byte budgets
/// when it opens: what a channel that is open but unused holds. Two packets.
pub const CHANNEL_WINDOW_INITIAL: usize = 64 * 1024;

/// The most window one channel is granted, as its consumer drains it (OpenSSH's session and
/// TCP forwarding windows): what a program that stops reading can make us hold for it.
pub const CHANNEL_WINDOW_MAX: usize = 2 * 1024 * 1024;

/// Window grants wait until at least this much (one packet) can be granted, unless the client
/// has none left: fewer, larger `WINDOW_ADJUST` messages.
pub const MIN_WINDOW_GRANT: usize = 32 * 1024;

/// Forwarded connections (`-L`, `-R`, X11, agent) open at once on one connection.
pub const MAX_FORWARD_CHANNELS_PER_CONNECTION: usize = 64;

/// `tcpip-forward`/`streamlocal-forward` listeners, X11 displays and agent sockets per
/// connection.
pub const MAX_LISTENERS_PER_CONNECTION: usize = 16;

/// Forwarded connections a listener inside the container accepted that wait for the SSH side
/// to open their channel; an agent that announces more is cut off.
pub const MAX_PENDING_ACCEPTS: usize = 64;

/// Frames waiting to be written to a forwarding agent: data waits for room; control frames
/// beyond twice this mean the agent stopped reading its input, and it is cut off.
pub const MAX_MUX_QUEUE_BYTES: usize = 1024 * 1024;

/// Signals a session channel keeps while its program starts; more are refused.
pub const MAX_PENDING_SIGNALS: usize = 16;

/// Bound on setting up forwarding (starting the agent's forward-server, a dial or a listen
/// inside the container); the client waits on it.
pub const FORWARD_SETUP_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a forwarded connection the client has closed may take to deliver its last bytes
/// inside the container before it is cut.
pub const FORWARD_CLOSE_DRAIN: Duration = Duration::from_secs(5);

/// X11 displays tried inside the container, from `X11_DISPLAY_OFFSET` on (OpenSSH: 10, 1000).
pub const X11_DISPLAY_OFFSET: u16 = 10;
pub const X11_MAX_DISPLAYS: u16 = 100;

/// Events (resize, signal, EOF, close) queued per channel before the reader waits.
pub const CHANNEL_EVENT_QUEUE: usize = 64;

/// How long draining may take on SIGTERM before the remaining containers are removed anyway
/// (ContainerSSH gives 20 s).
pub const SHUTDOWN_DRAIN: Duration = Duration::from_secs(20);

/// How long a connection the server ends (a deadline, shutdown) is given to take its
/// disconnect message before the socket is closed under it.
pub const DISCONNECT_FLUSH: Duration = Duration::from_secs(2);

/// Back-off after a failed `accept` (e.g. EMFILE), so the loop does not spin.
pub const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// `sandbox.supplementaryGroups` entries (the kernel allows 65536; a server needs one or two).
pub const MAX_SUPPLEMENTARY_GROUPS: usize = 32;
