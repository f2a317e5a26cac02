//! The accept loop and each connection's life. A place among [`MAX_CONNECTIONS`] is taken
//! before `accept`; then the front door ([`crate::front`]) decides on the client's address
//! (after a trusted proxy's PROXY header) before anything is sent or read; then the russh
//! session runs under two deadlines counted from the accept, the handshake's and the login
//! grace time, and its ending is recorded as the source's penalty. On shutdown the loop stops
//! accepting, every connection is told and closed, and their containers are removed.

use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::front::cidr::canonical;
use crate::front::penalty::Penalty;
use crate::front::proxy::{self, Header, Prefixed};
use crate::front::{Refusal, Refused, Startup};
use crate::limits::{
    ACCEPT_ERROR_BACKOFF, DISCONNECT_FLUSH, LISTEN_BACKLOG, MAX_CONNECTIONS, SHUTDOWN_DRAIN,
};
use crate::metrics::{GaugeGuard, COUNTRY};
use crate::shared::Shared;
use crate::ssh::connection::ConnCtx;
use crate::ssh::handler::Handler;
use crate::ssh::version::VersionRecorder;

/// The listening socket (std's `bind` would listen with a backlog of 128): deep enough that a
/// burst of connections the front door then turns away does not make the kernel drop other
/// clients' SYNs, each drop costing that client a one-second retransmit.
pub fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // As std's `bind` does on Unix: a restart need not wait for TIME_WAIT sockets.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Serves until `shared.shutdown` is cancelled, then drains; whether every connection was
/// gone by the drain deadline.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener) -> bool {
    if let Some(audit) = &shared.audit {
        audit.run();
    }
    shared.backend.warm(shared.shutdown.clone());
    let total = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let connections = TaskTracker::new();
    loop {
        // A place first: at the limit we stop accepting, and the kernel's backlog holds the
        // rest, instead of accepting sockets we cannot serve.
        let permit = tokio::select! {
            p = Arc::clone(&total).acquire_owned() => p,
            () = shared.shutdown.cancelled() => break,
        };
        let Ok(permit) = permit else { break };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = shared.shutdown.cancelled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; never stop serving.
                tracing::warn!(code = "SSH_ACCEPT_FAILED", error = %e, "accept failed");
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let accepted_at = Instant::now();
        let peer = canonical(peer);
        let shared2 = Arc::clone(&shared);
        match &shared.settings.ssh.proxy {
            Some(rules) if rules.trusts(peer.ip()) => {
                connections.spawn(proxied(shared2, stream, peer, accepted_at, permit));
            }
            // Decided here, before a task exists: a flood from one source costs an accept
            // and a close per socket.
            _ => match shared.door.admit(peer.ip()) {
                Ok(startup) => {
                    let admitted = Admitted {
                        stream: Prefixed::new(Vec::new(), stream),
                        peer,
                        via: None,
                        startup,
                        place: permit,
                        accepted_at,
                    };
                    connections.spawn(guarded(shared2, admitted));
                }
                Err(r) => refuse(&stream, peer, None, r),
            },
        }
    }
    drop(listener);
    connections.close();
    tracing::info!(
        code = "CORE_DRAIN",
        connections = connections.len(),
        "shutting down: closing connections"
    );
    if tokio::time::timeout(SHUTDOWN_DRAIN, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            code = "CORE_DRAIN_TIMEOUT",
            "connections did not close within the drain deadline"
        );
        return false;
    }
    true
}

/// Turns a connection away: OpenSSH's one line, then the close.
fn refuse(stream: &TcpStream, peer: SocketAddr, via: Option<SocketAddr>, r: Refused) {
    crate::metrics::get().refused.inc(&[r.why.name()]);
    let _ = stream.try_write(r.why.line());
    let Some(count) = r.log else { return };
    // Only when there was one (a `None` field is not written).
    let via = via.map(tracing::field::display);
    match r.why {
        Refusal::Penalised { last, remaining } => tracing::info!(
            code = "SSH_CONNECTION_REFUSED_PENALTY",
            remote = %peer, proxy = via, penalty = last.name(), remaining = ?remaining, refused = count,
            "connection refused: the source is penalised (ssh.perSourcePenalties; logged once per penalty)"
        ),
        Refusal::PerSource { limit } => tracing::info!(
            code = "SSH_CONNECTION_REFUSED_STARTUPS",
            remote = %peer, proxy = via, limit, refused = count,
            "connection refused: the source has ssh.perSourceMaxStartups unauthenticated connections"
        ),
        Refusal::Full { pending } | Refusal::Early { pending } => tracing::info!(
            code = "SSH_CONNECTION_REFUSED_STARTUPS",
            remote = %peer, proxy = via, unauthenticated = pending, refused = count,
            "connection refused: ssh.maxStartups"
        ),
    }
}

/// A connection from a trusted proxy: its PROXY header names the client, who then goes
/// through the door like any other.
async fn proxied(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    proxy_addr: SocketAddr,
    accepted_at: Instant,
    place: OwnedSemaphorePermit,
) {
    let Some(rules) = shared.settings.ssh.proxy.as_ref() else {
        return;
    };
    let (client, rest) = match proxy::read_header(&mut stream, rules.header_timeout).await {
        Ok((Header::Local, _)) => {
            tracing::debug!(proxy = %proxy_addr, "PROXY LOCAL (a health check): closed");
            return;
        }
        Ok((Header::Unknown, _)) => {
            // The specification would have the proxy's own address stand in, which would put
            // every such client in one source and let one of them get all penalised.
            tracing::warn!(code = "SSH_PROXY_HEADER_INVALID", proxy = %proxy_addr, "connection refused: a PROXY header without the client's address (UNKNOWN, UNSPEC)");
            return;
        }
        Ok((Header::Tcp { source, .. }, rest)) => (canonical(source), rest),
        Err(e) => {
            // The proxy is trusted, so it is not penalised; the client behind it is unknown.
            tracing::warn!(code = "SSH_PROXY_HEADER_INVALID", proxy = %proxy_addr, error = %e, "connection refused: no valid PROXY header from a trusted proxy");
            return;
        }
    };
    match shared.door.admit(client.ip()) {
        Ok(startup) => {
            let admitted = Admitted {
                stream: Prefixed::new(rest, stream),
                peer: client,
                via: Some(proxy_addr),
                startup,
                place,
                accepted_at,
            };
            guarded(shared, admitted).await;
        }
        Err(r) => refuse(&stream, client, Some(proxy_addr), r),
    }
}

/// A connection the front door let in.
struct Admitted {
    stream: Prefixed<TcpStream>,
    /// The client: the TCP peer, or the address a trusted proxy's header names.
    peer: SocketAddr,
    /// The trusted proxy it came through.
    via: Option<SocketAddr>,
    startup: Startup,
    /// Its place among `MAX_CONNECTIONS`, held until the connection is gone entirely.
    place: OwnedSemaphorePermit,
    accepted_at: Instant,
}

/// Runs a connection; a panic in it ends that connection alone and penalises its source.
async fn guarded(shared: Arc<Shared>, admitted: Admitted) {
    let (door, peer) = (Arc::clone(&shared.door), admitted.peer);
    // Ends the socket's I/O however this task ends, panics included, so russh's task (which
    // holds the connection's places) cannot outlive it for long.
    let stream_end = CancellationToken::new();
    let run = connection(shared, admitted, stream_end.clone());
    let panicked = AssertUnwindSafe(run).catch_unwind().await.is_err();
    stream_end.cancel();
    if panicked {
        tracing::error!(code = "SSH_CONNECTION_PANICKED", remote = %peer, "a connection's task panicked: connection closed");
        door.penalise(peer.ip(), Penalty::Crash);
    }
}

/// How a connection ended, as far as its source's penalty goes.
enum Ending {
    /// The client or the session ended it.
    Closed,
    /// The handshake deadline or the login grace time ran out.
    TimedOut,
    /// russh's task for it panicked.
    Crashed,
    /// The server is shutting down.
    Shutdown,
}

fn penalty(ending: &Ending, conn: &ConnCtx) -> Option<Penalty> {
    match ending {
        Ending::Shutdown => None,
        Ending::Crashed => Some(Penalty::Crash),
        Ending::TimedOut => Some(Penalty::GraceExceeded),
        Ending::Closed
            if conn
                .hello
                .proxy_header
                .load(std::sync::atomic::Ordering::Relaxed) =>
        {
            Some(Penalty::RefuseConnection)
        }
        Ending::Closed if conn.is_authenticated() => None,
        Ending::Closed if conn.auth_failures() > 0 => Some(Penalty::AuthFail),
        Ending::Closed => Some(Penalty::NoAuth),
    }
}

fn is_crash(e: &crate::ssh::handler::HandlerError) -> bool {
    matches!(
        e,
        crate::ssh::handler::HandlerError::Ssh(russh::Error::Join(_))
    )
}

/// Resolves at `at` unless `done` is cancelled first (then never).
async fn deadline_unless(at: Instant, done: &CancellationToken) {
    tokio::select! {
        () = tokio::time::sleep_until(at) => {}
        () = done.cancelled() => std::future::pending().await,
    }
}

async fn connection(shared: Arc<Shared>, admitted: Admitted, stream_end: CancellationToken) {
    let Admitted {
        stream,
        peer,
        via,
        startup,
        place,
        accepted_at,
    } = admitted;
    // The places go with the last reference: this task's or russh's, whichever ends later.
    let conn = ConnCtx::new(Arc::clone(&shared), peer, (startup, place), stream_end);
    let metrics = crate::metrics::get();
    metrics.connections.inc(&[COUNTRY]);
    let open = GaugeGuard::new(&metrics.current_connections, vec![COUNTRY]);
    let ending = run_session(&shared, &conn, stream, via, accepted_at).await;
    if conn.handshaken.is_cancelled() {
        metrics.handshakes_ok.inc(&[COUNTRY]);
    } else {
        metrics.handshakes_failed.inc(&[COUNTRY]);
    }
    conn.close().await;
    conn.stream_end.cancel();
    if let Some(p) = penalty(&ending, &conn) {
        if shared.door.penalise(peer.ip(), p) {
            tracing::info!(code = "SSH_SOURCE_PENALISED", connection_id = %conn.id, remote = %peer, penalty = p.name(), "source penalised: its connections are refused for a while (ssh.perSourcePenalties)");
        }
    }
    drop(open);
    tracing::info!(code = "SSH_DISCONNECTED", connection_id = %conn.id, "disconnected");
}

async fn run_session(
    shared: &Arc<Shared>,
    conn: &Arc<ConnCtx>,
    stream: Prefixed<TcpStream>,
    via: Option<SocketAddr>,
    accepted_at: Instant,
) -> Ending {
    // russh applies `Config::nodelay` only in its own accept loop; without it Nagle and delayed
    // ACKs hold the last packets of every session back by ~40 ms.
    let _ = stream.get_ref().set_nodelay(shared.ssh.nodelay);
    let proxy = via.map(tracing::field::display);
    tracing::info!(code = "SSH_CONNECTED", connection_id = %conn.id, remote = %conn.peer, proxy, "connected");
    let handler = Handler::new(Arc::clone(conn));
    let handshake_deadline = accepted_at + shared.settings.ssh.handshake_timeout;
    let login_deadline = accepted_at + shared.settings.ssh.login_grace_time;
    let stream = VersionRecorder::new(
        crate::front::quickack::QuickAck::new(stream),
        Arc::clone(&conn.hello),
        conn.stream_end.clone(),
    );
    let started = tokio::select! {
        r = tokio::time::timeout_at(
            handshake_deadline,
            russh::server::run_stream(Arc::clone(&shared.ssh), stream, handler),
        ) => r,
        () = shared.shutdown.cancelled() => return Ending::Shutdown,
    };
    let mut session = match started {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            if conn
                .hello
                .proxy_header
                .load(std::sync::atomic::Ordering::Relaxed)
            {
                tracing::warn!(code = "SSH_PROXY_HEADER_UNTRUSTED", connection_id = %conn.id, remote = %conn.peer, "connection refused: a PROXY protocol header from a peer that is not in ssh.proxyProtocol.trustedProxies");
            } else {
                tracing::info!(code = "SSH_HANDSHAKE_FAILED", connection_id = %conn.id, error = %e, "handshake failed");
            }
            return Ending::Closed;
        }
        Err(_) => {
            tracing::info!(code = "SSH_HANDSHAKE_FAILED", connection_id = %conn.id, "no SSH version within ssh.handshakeTimeout");
            return Ending::TimedOut;
        }
    };
    conn.set_handle(session.handle());
    let handle = session.handle();
    let authenticated = conn.authenticated_token();
    let timed_out = |code: &'static str, what: &'static str| {
        tracing::info!(code, connection_id = %conn.id, remote = %conn.peer, "{what}");
        let h = handle.clone();
        async move {
            // Bounded: russh stops taking messages while a client's window is exhausted.
            let _ = tokio::time::timeout(
                DISCONNECT_FLUSH,
                h.disconnect(russh::Disconnect::ByApplication, what.into(), String::new()),
            )
            .await;
        }
    };
    let ending = tokio::select! {
        r = &mut session => match r {
            Err(e) if is_crash(&e) => {
                tracing::error!(code = "SSH_CONNECTION_PANICKED", connection_id = %conn.id, "the connection's session task panicked");
                Ending::Crashed
            }
            Err(e) => {
                tracing::debug!(connection_id = %conn.id, error = %e, "connection ended with an error");
                Ending::Closed
            }
            Ok(()) => Ending::Closed,
        },
        () = deadline_unless(handshake_deadline, &conn.handshaken) => {
            timed_out("SSH_HANDSHAKE_FAILED", "key exchange not completed within ssh.handshakeTimeout").await;
            Ending::TimedOut
        }
        () = deadline_unless(login_deadline, &authenticated) => {
            timed_out("SSH_LOGIN_GRACE_EXCEEDED", "login grace time exceeded").await;
            Ending::TimedOut
        }
        () = shared.shutdown.cancelled() => {
            // Channels print their notice and close when the connection token is cancelled.
            conn.cancel.cancel();
            conn.tasks.close();
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), conn.tasks.wait()).await;
            let bye = handle.disconnect(russh::Disconnect::ByApplication, "server shutting down".into(), String::new());
            let _ = tokio::time::timeout(DISCONNECT_FLUSH, bye).await;
            Ending::Shutdown
        }
    };
    if !matches!(ending, Ending::Closed | Ending::Crashed) {
        // We ended it: let russh send the disconnect before the stream is cut.
        let _ = tokio::time::timeout(DISCONNECT_FLUSH, &mut session).await;
    }
    ending
}
