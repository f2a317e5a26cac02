//! SSH forwarding on top of the agent's `forward-server` ([`crate::forward::Mux`]): `-L` to TCP
//! and unix sockets (dialled from inside the container), `-R` listeners inside the container,
//! X11 displays and `ssh -A` agent sockets. One forward-server exec per connection, started at
//! the first use; each forwarded connection is an SSH channel bridged to one mux stream.
//!
//! Channels we open towards the client (`forwarded-tcpip`, `x11`, `auth-agent@openssh.com`)
//! get their client-to-server queue from the handler when the client confirms them, before
//! any of their data can arrive, and the bridge task picks it up from [`ConnForwards`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use russh::server::{ChannelOpenHandle, Handle, Msg};
use russh::{Channel, ChannelId, ChannelOpenFailure, ChannelWriteHalf};
use tokio::sync::{Notify, OnceCell};
use tokio_util::sync::CancellationToken;

use super::conn::ConnCtx;
use super::stdin::{forward_queue, StdinRx, StdinTx};
use crate::config::model::ExecutionMode;
use crate::forward::{ForwardError, Incoming, Mux, MuxStream, StreamEvent};
use crate::limits::{
    FORWARD_CLOSE_DRAIN, FORWARD_SETUP_TIMEOUT, MAX_FORWARD_CHANNELS_PER_CONNECTION,
    MAX_LISTENERS_PER_CONNECTION, X11_DISPLAY_OFFSET, X11_MAX_DISPLAYS,
};

/// What a listener inside the container was opened for; decides the channel type we open
/// for each connection it accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
enum ListenerKind {
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

/// Where a client's `-L` connection goes.
pub enum DirectTarget {
    Tcp { host: String, port: u16 },
    Unix { path: String },
}

struct Forwarder {
    mux: Arc<Mux>,
    listeners: Mutex<HashMap<u32, ListenerKind>>,
}

/// The client-to-container side of one forwarded channel, as the handler sees it.
#[derive(Clone)]
pub struct ForwardEntry {
    pub stdin: Arc<StdinTx>,
    pub closed: CancellationToken,
}

/// A connection's forwarding state.
#[derive(Default)]
pub struct ConnForwards {
    forwarder: OnceCell<Result<Arc<Forwarder>, Arc<str>>>,
    /// The `ssh -A` socket inside the container, once made.
    agent_socket: OnceCell<Result<String, String>>,
    channels: Mutex<HashMap<ChannelId, ForwardEntry>>,
    /// Queues of channels we opened, until their bridge task takes them.
    opened: Mutex<HashMap<ChannelId, (StdinRx, CancellationToken)>>,
    opened_changed: Notify,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ConnForwards {
    pub fn entry(&self, id: ChannelId) -> Option<ForwardEntry> {
        lock(&self.channels).get(&id).cloned()
    }

    pub fn remove(&self, id: ChannelId) -> Option<ForwardEntry> {
        lock(&self.channels).remove(&id)
    }

    /// A queue for a new forwarded channel; `None` beyond the per-connection limit unless
    /// `always` (channels we opened were counted before we opened them).
    fn register(&self, id: ChannelId, always: bool) -> Option<(StdinRx, CancellationToken)> {
        let mut channels = lock(&self.channels);
        if !always && channels.len() >= MAX_FORWARD_CHANNELS_PER_CONNECTION {
            return None;
        }
        let (tx, rx) = forward_queue();
        let closed = CancellationToken::new();
        channels.insert(
            id,
            ForwardEntry {
                stdin: Arc::new(tx),
                closed: closed.clone(),
            },
        );
        Some((rx, closed))
    }

    fn full(&self) -> bool {
        lock(&self.channels).len() >= MAX_FORWARD_CHANNELS_PER_CONNECTION
    }

    /// The client confirmed a channel we opened (all of ours are forwarding channels).
    pub fn confirmed(&self, id: ChannelId) {
        if let Some(queue) = self.register(id, true) {
            lock(&self.opened).insert(id, queue);
            self.opened_changed.notify_waiters();
        }
    }

    async fn take_opened(&self, id: ChannelId) -> Option<(StdinRx, CancellationToken)> {
        let wait = async {
            loop {
                let changed = self.opened_changed.notified();
                tokio::pin!(changed);
                changed.as_mut().enable();
                if let Some(q) = lock(&self.opened).remove(&id) {
                    return q;
                }
                changed.await;
            }
        };
        tokio::time::timeout(FORWARD_SETUP_TIMEOUT, wait).await.ok()
    }
}

/// The connection's forward-server, started at the first use.
async fn forwarder(conn: &Arc<ConnCtx>, handle: &Handle) -> Result<Arc<Forwarder>, Arc<str>> {
    conn.forwards
        .forwarder
        .get_or_init(|| async {
            start(conn, handle).await.map_err(|e| {
                tracing::warn!(connection_id = %conn.id, error = %e, "forwarding unavailable");
                Arc::from(e)
            })
        })
        .await
        .clone()
}

async fn start(conn: &Arc<ConnCtx>, handle: &Handle) -> Result<Arc<Forwarder>, String> {
    let backend = conn.backend();
    if !backend.has_agent() {
        return Err(format!(
            "forwarding needs the in-container agent ({} is set)",
            backend.disable_agent_key()
        ));
    }
    if backend.mode() == ExecutionMode::Session {
        return Err("forwarding does not work in session mode".into());
    }
    let container = conn.container().await.map_err(|e| e.to_string())?;
    let (output, input) = backend
        .start_agent_command(&container, &["forward-server"])
        .await
        .map_err(|e| e.to_string())?;
    let (mux, incoming) = Mux::start(output, input, conn.cancel.clone());
    let fw = Arc::new(Forwarder {
        mux,
        listeners: Mutex::new(HashMap::new()),
    });
    conn.tasks.spawn(accept_loop(
        Arc::clone(conn),
        handle.clone(),
        Arc::clone(&fw),
        incoming,
    ));
    tracing::debug!(connection_id = %conn.id, "forwarding agent started");
    Ok(fw)
}

async fn accept_loop(
    conn: Arc<ConnCtx>,
    handle: Handle,
    fw: Arc<Forwarder>,
    mut incoming: tokio::sync::mpsc::UnboundedReceiver<Incoming>,
) {
    while let Some(inc) = incoming.recv().await {
        let kind = lock(&fw.listeners).get(&inc.listener).cloned();
        let Some(kind) = kind else {
            continue; // an unlistened listener's late connection: dropping closes it
        };
        if conn.forwards.full() {
            tracing::info!(connection_id = %conn.id, "forwarded connection refused: too many open");
            continue;
        }
        let (c, h) = (Arc::clone(&conn), handle.clone());
        conn.tasks
            .spawn(async move { open_incoming(c, h, kind, inc).await });
    }
}

async fn open_incoming(conn: Arc<ConnCtx>, handle: Handle, kind: ListenerKind, inc: Incoming) {
    let peer = if inc.peer.is_empty() {
        "127.0.0.1".to_string()
    } else {
        inc.peer.clone()
    };
    let port = u32::from(inc.peer_port);
    let opened = match &kind {
        ListenerKind::Tcp {
            address,
            port: bound,
        } => {
            handle
                .channel_open_forwarded_tcpip(address.clone(), *bound, peer, port)
                .await
        }
        ListenerKind::Unix { path } => {
            handle
                .channel_open_forwarded_streamlocal(path.clone())
                .await
        }
        ListenerKind::X11 => handle.channel_open_x11(peer, port).await,
        ListenerKind::AuthAgent => handle.channel_open_agent().await,
    };
    let channel = match opened {
        Ok(c) => c,
        Err(e) => {
            tracing::info!(connection_id = %conn.id, ?kind, error = %e, "the client refused a forwarded connection");
            return;
        }
    };
    let id = channel.id();
    let write = write_half(channel);
    let Some((rx, closed)) = conn.forwards.take_opened(id).await else {
        let _ = write.close().await;
        return;
    };
    bridge(conn, id, inc.stream, write, rx, closed).await;
}

/// Accepts or refuses a client's `direct-tcpip`/`direct-streamlocal` channel once the agent
/// has connected (or failed to), then bridges it.
pub fn open_direct(
    conn: &Arc<ConnCtx>,
    handle: Handle,
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
    target: DirectTarget,
) {
    let id = channel.id();
    let Some((rx, closed)) = conn.forwards.register(id, false) else {
        conn.tasks
            .spawn(reply.reject(ChannelOpenFailure::ResourceShortage));
        return;
    };
    let conn = Arc::clone(conn);
    conn.clone().tasks.spawn(async move {
        let dialled = async {
            let fw = forwarder(&conn, &handle).await.map_err(|e| e.to_string())?;
            let dial = async {
                match &target {
                    DirectTarget::Tcp { host, port } => fw.mux.dial_tcp(host, *port).await,
                    DirectTarget::Unix { path } => fw.mux.dial_unix(path).await,
                }
            };
            tokio::time::timeout(FORWARD_SETUP_TIMEOUT, dial)
                .await
                .map_err(|_| "the agent did not answer in time".to_string())?
                .map_err(|e: ForwardError| e.to_string())
        };
        match dialled.await {
            Ok(stream) => {
                reply.accept().await;
                let write = write_half(channel);
                bridge(conn, id, stream, write, rx, closed).await;
            }
            Err(e) => {
                tracing::info!(connection_id = %conn.id, error = %e, "forwarded connection failed");
                conn.forwards.remove(id);
                reply.reject(ChannelOpenFailure::ConnectFailed).await;
            }
        }
    });
}

/// The channel's write half. The read half is dropped at once: data reaches us through the
/// handler's callbacks, and an unread read half would make russh's session loop wait on it
/// once its buffer fills, stalling the whole connection.
fn write_half(channel: Channel<Msg>) -> ChannelWriteHalf<Msg> {
    let (read, write) = channel.split();
    drop(read);
    write
}

/// Copies between one SSH channel and one mux stream until either side closes.
async fn bridge(
    conn: Arc<ConnCtx>,
    id: ChannelId,
    stream: MuxStream,
    write: ChannelWriteHalf<Msg>,
    mut from_client: StdinRx,
    closed: CancellationToken,
) {
    let (sink, mut source) = stream.split();
    let gauge = from_client.gauge();
    let up = async {
        while let Some(chunk) = from_client.next().await {
            let Some(data) = chunk else {
                sink.eof();
                break;
            };
            if sink.send(&data).await.is_err() {
                break;
            }
            from_client.release(data.len());
        }
    };
    let down = async {
        let mut out = write.make_writer();
        while let Some(ev) = source.recv().await {
            match ev {
                StreamEvent::Data(data) => {
                    if gauge.write(&mut out, &data).await.is_err() {
                        return;
                    }
                    source.ack(data.len());
                }
                StreamEvent::Eof => {
                    let _ = write.eof().await;
                }
            }
        }
    };
    tokio::pin!(up, down);
    let mut up_done = false;
    // After the client's close, what it sent just before (data, EOF) still goes through, and
    // the agent gets the time to write it out and end the stream itself, up to a bound.
    let drain = tokio::time::sleep(std::time::Duration::MAX);
    tokio::pin!(drain);
    let mut client_closed = false;
    loop {
        tokio::select! {
            () = &mut up, if !up_done => up_done = true,
            () = &mut down => break,
            () = closed.cancelled(), if !client_closed => {
                client_closed = true;
                drain.as_mut().reset(tokio::time::Instant::now() + FORWARD_CLOSE_DRAIN);
            }
            () = &mut drain, if client_closed => break,
            () = conn.cancel.cancelled() => break,
        }
    }
    let _ = write.close().await;
    conn.forwards.remove(id);
}

fn remember(fw: &Forwarder, id: u32, kind: ListenerKind) -> Result<(), String> {
    let mut listeners = lock(&fw.listeners);
    if listeners.len() >= MAX_LISTENERS_PER_CONNECTION {
        drop(listeners);
        fw.mux.unlisten(id);
        return Err(format!(
            "at most {MAX_LISTENERS_PER_CONNECTION} listeners per connection"
        ));
    }
    listeners.insert(id, kind);
    Ok(())
}

async fn bounded<T>(
    fut: impl std::future::Future<Output = Result<T, ForwardError>>,
) -> Result<T, String> {
    tokio::time::timeout(FORWARD_SETUP_TIMEOUT, fut)
        .await
        .map_err(|_| "the agent did not answer in time".to_string())?
        .map_err(|e| e.to_string())
}

/// `tcpip-forward`: listens inside the container; returns the bound port.
pub async fn listen_tcp(
    conn: &Arc<ConnCtx>,
    handle: &Handle,
    address: &str,
    port: u32,
) -> Result<u32, String> {
    let port = u16::try_from(port).map_err(|_| format!("port {port} is out of range"))?;
    let fw = forwarder(conn, handle).await.map_err(|e| e.to_string())?;
    let (id, bound) = bounded(fw.mux.listen_tcp(address, port)).await?;
    let bound = u32::from(bound);
    remember(
        &fw,
        id,
        ListenerKind::Tcp {
            address: address.to_string(),
            port: bound,
        },
    )?;
    Ok(bound)
}

/// `streamlocal-forward@openssh.com`: a unix socket listener inside the container.
pub async fn listen_unix(conn: &Arc<ConnCtx>, handle: &Handle, path: &str) -> Result<(), String> {
    let fw = forwarder(conn, handle).await.map_err(|e| e.to_string())?;
    let id = bounded(fw.mux.listen_unix(path, false)).await?;
    remember(
        &fw,
        id,
        ListenerKind::Unix {
            path: path.to_string(),
        },
    )
}

/// `cancel-tcpip-forward` / `cancel-streamlocal-forward@openssh.com`.
fn cancel(conn: &ConnCtx, matches: impl Fn(&ListenerKind) -> bool) -> bool {
    let Some(Ok(fw)) = conn.forwards.forwarder.get() else {
        return false;
    };
    let mut listeners = lock(&fw.listeners);
    let Some(id) = listeners
        .iter()
        .find(|(_, k)| matches(k))
        .map(|(id, _)| *id)
    else {
        return false;
    };
    listeners.remove(&id);
    fw.mux.unlisten(id);
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

/// An X11 display inside the container: a listener on the first free `127.0.0.1:6000+N`
/// from [`X11_DISPLAY_OFFSET`]; returns N.
pub async fn listen_x11(conn: &Arc<ConnCtx>, handle: &Handle) -> Result<u16, String> {
    let fw = forwarder(conn, handle).await.map_err(|e| e.to_string())?;
    let mut last = String::new();
    for display in X11_DISPLAY_OFFSET..X11_DISPLAY_OFFSET + X11_MAX_DISPLAYS {
        match bounded(fw.mux.listen_tcp("127.0.0.1", 6000 + display)).await {
            Ok((id, _)) => {
                remember(&fw, id, ListenerKind::X11)?;
                return Ok(display);
            }
            Err(e) => last = e,
        }
        if fw.mux.is_stopped() {
            break;
        }
    }
    Err(format!("no free X11 display: {last}"))
}

/// The `ssh -A` socket inside the container (one per connection), in a fresh 0700 directory.
pub async fn agent_socket(conn: &Arc<ConnCtx>, handle: &Handle) -> Result<String, String> {
    conn.forwards
        .agent_socket
        .get_or_init(|| async {
            let fw = forwarder(conn, handle).await.map_err(|e| e.to_string())?;
            let path = format!("/tmp/ssh-{}/agent.sock", &conn.id[..12]);
            let id = bounded(fw.mux.listen_unix(&path, true)).await?;
            remember(&fw, id, ListenerKind::AuthAgent)?;
            Ok(path)
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
