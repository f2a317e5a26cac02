//! Listeners inside the container, one request's life each: `tcpip-forward` and
//! `streamlocal-forward@openssh.com` (`-R`), X11 displays (`x11-req`) and the `ssh -A` agent
//! socket, all through the connection's forwarding agent (`ssh/forward.rs`).
//!
//! | phase | from | what can happen |
//! |---|---|---|
//! | Requested | the client's request, within `MAX_LISTENERS_PER_CONNECTION` (pending ones count) | a task waits for the agent (started with the container) and asks it to listen (bounded: `FORWARD_SETUP_TIMEOUT`); the client's request is answered then (russh vendor patch 0003), without holding up the connection; a cancel marks it |
//! | Listening | the agent listens | connections it accepts become forwarded channels (`ssh/forward.rs`); a cancel stops it at once |
//! | Gone | the listen failed, a cancel, the connection ends | its place is given back; a listener cancelled while requested is stopped as soon as the agent listens |
//!
//! X11 displays and the agent socket are requested by the session channel's task before its
//! program starts, with one agent request each.

use std::sync::{Arc, Mutex, MutexGuard};

use russh::server::GlobalRequestReply;
use tokio::sync::OnceCell;

use super::connection::{ConnCtx, InUse};
use super::forward::mux_for;
use super::session_channel::X11Request;
use crate::forward::{ForwardError, Mux};
use crate::limits::{
    FORWARD_SETUP_TIMEOUT, MAX_LISTENERS_PER_CONNECTION, X11_DISPLAY_OFFSET, X11_MAX_DISPLAYS,
};

/// What a listener inside the container was opened for; decides the channel type we open
/// for each connection it accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenerKind {
    /// `tcpip-forward`: the address and port as the client asked (port: the bound one).
    Tcp {
        address: String,
        port: u32,
    },
    /// `streamlocal-forward@openssh.com`.
    Unix {
        path: String,
    },
    X11,
    AuthAgent,
}

struct ListenerEntry {
    kind: ListenerKind,
    /// The agent's listener id, once it listens.
    id: Option<u32>,
    /// The client cancelled it before it was listening.
    cancelled: bool,
    _in_use: InUse,
}

/// A connection's listeners.
#[derive(Default)]
pub struct Listeners {
    entries: Mutex<Vec<ListenerEntry>>,
    /// The `ssh -A` socket inside the container, once made.
    agent_socket: OnceCell<Result<String, String>>,
}

impl Listeners {
    fn lock(&self) -> MutexGuard<'_, Vec<ListenerEntry>> {
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the agent's listener `id` was opened for.
    pub fn kind_of(&self, id: u32) -> Option<ListenerKind> {
        self.lock()
            .iter()
            .find(|l| l.id == Some(id))
            .map(|l| l.kind.clone())
    }
}

/// Registers a listener request before it is sent; `Err` at the connection's limit.
fn add_listener(conn: &Arc<ConnCtx>, kind: ListenerKind) -> Result<(), String> {
    let mut listeners = conn.forwards.listeners.lock();
    if listeners.len() >= MAX_LISTENERS_PER_CONNECTION {
        return Err(format!(
            "at most {MAX_LISTENERS_PER_CONNECTION} listeners per connection"
        ));
    }
    listeners.push(ListenerEntry {
        kind,
        id: None,
        cancelled: false,
        _in_use: conn.in_use(),
    });
    Ok(())
}

/// Records how a listen request ended: the listener id, or (on failure, or when the client
/// cancelled it meanwhile) its removal. `false` when it was cancelled.
fn listen_done(
    conn: &ConnCtx,
    mux: Option<&Mux>,
    kind: &ListenerKind,
    outcome: Option<(u32, ListenerKind)>,
) -> bool {
    let mut listeners = conn.forwards.listeners.lock();
    let Some((i, listener)) = listeners
        .iter_mut()
        .enumerate()
        .find(|(_, l)| l.id.is_none() && &l.kind == kind)
    else {
        return false;
    };
    match outcome {
        Some((id, bound)) if !listener.cancelled => {
            listener.id = Some(id);
            listener.kind = bound;
            true
        }
        Some((id, _)) => {
            listeners.remove(i);
            if let Some(m) = mux {
                m.unlisten(id);
            }
            false
        }
        None => {
            listeners.remove(i);
            false
        }
    }
}

async fn bounded<T>(
    fut: impl std::future::Future<Output = Result<T, ForwardError>>,
) -> Result<T, String> {
    tokio::time::timeout(FORWARD_SETUP_TIMEOUT, fut)
        .await
        .map_err(|_| "the agent did not answer in time".to_string())?
        .map_err(|e| e.to_string())
}

/// `tcpip-forward`: listens inside the container and answers `reply` when it does (with the
/// bound port when the client asked for port 0). Returns at once.
pub fn listen_tcp(conn: &Arc<ConnCtx>, address: String, port: u16, reply: GlobalRequestReply) {
    let asked = ListenerKind::Tcp {
        address: address.clone(),
        port: u32::from(port),
    };
    if let Err(e) = add_listener(conn, asked.clone()) {
        tracing::info!(code = "FORWARD_LISTEN_REFUSED", connection_id = %conn.id, error = %e, "remote forwarding refused");
        return reply.failure();
    }
    let conn = Arc::clone(conn);
    conn.clone().tasks.spawn(async move {
        let result = async {
            let mux = mux_for(&conn).await?;
            let (id, bound) = bounded(mux.listen_tcp(&address, port)).await?;
            Ok::<_, String>((mux, id, bound))
        }
        .await;
        match result {
            Ok((mux, id, bound)) => {
                let kind = ListenerKind::Tcp {
                    address: address.clone(),
                    port: u32::from(bound),
                };
                if listen_done(&conn, Some(&mux), &asked, Some((id, kind))) {
                    tracing::info!(code = "FORWARD_LISTEN_OPENED", connection_id = %conn.id, address = %address.escape_debug(), port = bound, "remote forwarding listener opened in the container");
                }
                if port == 0 {
                    reply.success_with_port(u32::from(bound));
                } else {
                    reply.success();
                }
            }
            Err(e) => {
                listen_done(&conn, None, &asked, None);
                tracing::info!(code = "FORWARD_LISTEN_REFUSED", connection_id = %conn.id, error = %e, "remote forwarding refused");
                reply.failure();
            }
        }
    });
}

/// `streamlocal-forward@openssh.com`: a unix socket listener inside the container, answered
/// as [`listen_tcp`].
pub fn listen_unix(conn: &Arc<ConnCtx>, path: String, reply: GlobalRequestReply) {
    let kind = ListenerKind::Unix { path: path.clone() };
    if let Err(e) = add_listener(conn, kind.clone()) {
        tracing::info!(code = "FORWARD_LISTEN_REFUSED", connection_id = %conn.id, error = %e, "remote socket forwarding refused");
        return reply.failure();
    }
    let conn = Arc::clone(conn);
    conn.clone().tasks.spawn(async move {
        let result = async {
            let mux = mux_for(&conn).await?;
            let id = bounded(mux.listen_unix(&path, false)).await?;
            Ok::<_, String>((mux, id))
        }
        .await;
        match result {
            Ok((mux, id)) => {
                listen_done(&conn, Some(&mux), &kind, Some((id, kind.clone())));
                reply.success();
            }
            Err(e) => {
                listen_done(&conn, None, &kind, None);
                tracing::info!(code = "FORWARD_LISTEN_REFUSED", connection_id = %conn.id, error = %e, "remote socket forwarding refused");
                reply.failure();
            }
        }
    });
}

/// `cancel-tcpip-forward` / `cancel-streamlocal-forward@openssh.com`: a listener that is not
/// listening yet stops as soon as it is.
fn cancel(conn: &ConnCtx, matches: impl Fn(&ListenerKind) -> bool) -> bool {
    let mut listeners = conn.forwards.listeners.lock();
    let Some((i, listener)) = listeners
        .iter_mut()
        .enumerate()
        .find(|(_, l)| !l.cancelled && matches(&l.kind))
    else {
        return false;
    };
    match listener.id {
        Some(id) => {
            listeners.remove(i);
            drop(listeners);
            if let Some(mux) = conn.forwards.ready_mux() {
                mux.unlisten(id);
            }
        }
        None => listener.cancelled = true,
    }
    true
}

pub fn cancel_tcp(conn: &ConnCtx, address: &str, port: u32) -> bool {
    cancel(
        conn,
        |k| matches!(k, ListenerKind::Tcp { address: a, port: p } if a == address && *p == port),
    )
}

pub fn cancel_unix(conn: &ConnCtx, path: &str) -> bool {
    cancel(
        conn,
        |k| matches!(k, ListenerKind::Unix { path: p } if p == path),
    )
}

/// An X11 display for a session (one agent request), its Xauthority file with the client's
/// cookie written into the container, and the environment that points X clients at it.
pub async fn x11_env(conn: &Arc<ConnCtx>, req: &X11Request) -> Result<Vec<String>, String> {
    add_listener(conn, ListenerKind::X11)?;
    let mux = match mux_for(conn).await {
        Ok(m) => m,
        Err(e) => {
            listen_done(conn, None, &ListenerKind::X11, None);
            return Err(e);
        }
    };
    let display = match bounded(mux.listen_x11(X11_DISPLAY_OFFSET, X11_MAX_DISPLAYS)).await {
        Ok((id, display)) => {
            if !listen_done(
                conn,
                Some(&mux),
                &ListenerKind::X11,
                Some((id, ListenerKind::X11)),
            ) {
                return Err("the connection is closing".into());
            }
            display
        }
        Err(e) => {
            listen_done(conn, None, &ListenerKind::X11, None);
            return Err(e);
        }
    };
    let container = conn
        .container()
        .await
        .map_err(|e| crate::backend::one_line(&e))?;
    let path = format!("/tmp/.containerssh-Xauthority-{display}");
    let file = xauthority(display, &req.protocol, &req.cookie);
    crate::backend::agent::write_file(container.as_ref(), &path, 0o600, &file)
        .await
        .map_err(|e| crate::backend::one_line(&e))?;
    Ok(vec![
        format!("DISPLAY=localhost:{display}.{}", req.screen),
        format!("XAUTHORITY={path}"),
    ])
}

/// The `ssh -A` socket inside the container (one per connection), in a fresh 0700 directory.
pub async fn agent_socket(conn: &Arc<ConnCtx>) -> Result<String, String> {
    conn.forwards
        .listeners
        .agent_socket
        .get_or_init(|| async {
            add_listener(conn, ListenerKind::AuthAgent)?;
            let path = format!("/tmp/ssh-{}/agent.sock", &conn.id[..12]);
            let result = async {
                let mux = mux_for(conn).await?;
                let id = bounded(mux.listen_unix(&path, true)).await?;
                Ok::<_, String>((mux, id))
            }
            .await;
            match result {
                Ok((mux, id)) => {
                    let kind = ListenerKind::AuthAgent;
                    listen_done(conn, Some(&mux), &kind, Some((id, kind.clone())));
                    Ok(path)
                }
                Err(e) => {
                    listen_done(conn, None, &ListenerKind::AuthAgent, None);
                    Err(e)
                }
            }
        })
        .await
        .clone()
}

/// The Xauthority file for one display: a single FamilyWild entry with the client's cookie,
/// so any X client in the container that reads `$XAUTHORITY` authenticates.
pub fn xauthority(display: u16, protocol: &str, cookie: &[u8]) -> Vec<u8> {
    const FAMILY_WILD: u16 = 0xffff;
    let mut out = Vec::new();
    let mut field = |b: &[u8]| {
        out.extend_from_slice(&(b.len() as u16).to_be_bytes());
        out.extend_from_slice(b);
    };
    let number = display.to_string();
    field(&[]);
    field(number.as_bytes());
    field(protocol.as_bytes());
    field(cookie);
    let mut file = FAMILY_WILD.to_be_bytes().to_vec();
    file.extend_from_slice(&out);
    file
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xauthority_entry_layout() {
        let f = xauthority(10, "MIT-MAGIC-COOKIE-1", &[0xab; 16]);
        assert_eq!(&f[..2], &[0xff, 0xff]);
        assert_eq!(&f[2..4], &[0, 0]); // empty address
        assert_eq!(&f[4..8], &[0, 2, b'1', b'0']);
        assert_eq!(&f[8..10], &[0, 18]);
        assert_eq!(&f[10..28], b"MIT-MAGIC-COOKIE-1");
        assert_eq!(&f[28..30], &[0, 16]);
        assert_eq!(&f[30..], &[0xab; 16]);
    }
}
