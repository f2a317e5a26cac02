//! Forwarded channels: `-L` to TCP and unix sockets (dialled from inside the container), and
//! the connections that listeners inside the container accept (`ssh/listen.rs`), all on top
//! of the agent's `forward-server` ([`crate::forward::Mux`]), one per connection.
//!
//! The forwarding agent starts in the background as soon as the connection's container is
//! ready and the login may forward ([`wanted`], [`start_agent`]); nothing here runs inside a
//! russh callback. A forwarded channel's life:
//!
//! | phase | from | what can happen |
//! |---|---|---|
//! | Opening | the client's `direct-tcpip`/`direct-streamlocal`, or a connection a listener in the container accepted | it takes one of the connection's `MAX_FORWARD_CHANNELS_PER_CONNECTION` places and its first window from the budget, or is refused (client: `ResourceShortage`; container side: closed, logged at most once a second); a client's open waits for the agent's dial (bounded), ours for the client's confirmation (bounded: `FORWARD_SETUP_TIMEOUT`), and a confirmation that comes later is closed |
//! | Bridging | accepted / confirmed | data both ways: to the container within the mux credit, to the client within its window; EOF each way; the client's window granted as the agent takes the data |
//! | Closing | either side closed, the agent stopped, the connection ends | after the client's close, what it sent still goes through, up to `FORWARD_CLOSE_DRAIN`; the place is given back |

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use russh::server::{ChannelOpenHandle, Handle, Msg};
use russh::{Channel, ChannelId, ChannelOpenFailure, ChannelWriteHalf};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;

use super::connection::{ConnCtx, InUse};
use super::flow::{self, Granter, InboundRx, InboundTx};
use super::listen::{ListenerKind, Listeners};
use crate::agent::proto::{MAX_HOST_LEN, MAX_PATH_LEN};
use crate::config::model::ExecutionMode;
use crate::forward::{ForwardError, Incoming, Mux, MuxStream, StreamEvent};
use crate::limits::{
    CHANNEL_WINDOW_INITIAL, FORWARD_CLOSE_DRAIN, FORWARD_SETUP_TIMEOUT,
    MAX_FORWARD_CHANNELS_PER_CONNECTION,
};

/// Where a client's `-L` connection goes.
pub enum DirectTarget {
    Tcp { host: String, port: u16 },
    Unix { path: String },
}

/// The forwarding agent of a connection.
#[derive(Clone)]
enum AgentSlot {
    NotStarted,
    Starting,
    Ready(Arc<Mux>),
    Failed(Arc<str>),
}

/// The client-to-container side of one forwarded channel, as the handler sees it.
#[derive(Clone)]
pub struct ForwardEntry {
    pub stdin: Arc<InboundTx>,
    pub closed: CancellationToken,
}

/// A connection's forwarding state.
pub struct ConnForwards {
    agent: watch::Sender<AgentSlot>,
    /// Bridged channels, for the handler's data, EOF and close.
    channels: Mutex<HashMap<ChannelId, ForwardEntry>>,
    /// Forwarded channels in any phase, opening included.
    places: AtomicUsize,
    /// First windows reserved for channels we opened and the client has not confirmed.
    unconfirmed: AtomicUsize,
    /// Queues of channels we opened, from the confirmation until their task takes them.
    opened: Mutex<HashMap<ChannelId, (InboundRx, CancellationToken)>>,
    opened_changed: Notify,
    pub listeners: Listeners,
}

impl Default for ConnForwards {
    fn default() -> Self {
        Self {
            agent: watch::channel(AgentSlot::NotStarted).0,
            channels: Mutex::default(),
            places: AtomicUsize::new(0),
            unconfirmed: AtomicUsize::new(0),
            opened: Mutex::default(),
            opened_changed: Notify::new(),
            listeners: Listeners::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One of the connection's forwarded-channel places, given back on drop.
pub struct Place {
    conn: Arc<ConnCtx>,
    _in_use: InUse,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.conn.forwards.places.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ConnForwards {
    pub fn entry(&self, id: ChannelId) -> Option<ForwardEntry> {
        lock(&self.channels).get(&id).cloned()
    }

    pub fn remove(&self, id: ChannelId) -> Option<ForwardEntry> {
        lock(&self.channels).remove(&id)
    }

    /// The client confirmed a channel we opened (all of ours are forwarding channels): its
    /// queue, with the first window reserved before the open. `false`: nothing of ours is
    /// waiting for it (its open was abandoned), and the caller closes it.
    pub fn confirmed(&self, conn: &Arc<ConnCtx>, id: ChannelId, handle: Handle) -> bool {
        let taken = self
            .unconfirmed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if taken.is_err() {
            return false;
        }
        let (tx, rx) = flow::inbound_reserved(&conn.buffers);
        tx.set_granter(Granter::new(handle.clone(), id));
        let closed = CancellationToken::new();
        lock(&self.channels).insert(
            id,
            ForwardEntry {
                stdin: Arc::new(tx),
                closed: closed.clone(),
            },
        );
        lock(&self.opened).insert(id, (rx, closed));
        self.opened_changed.notify_waiters();
        // Its task takes it at once; one whose open timed out meanwhile never will.
        let conn2 = Arc::clone(conn);
        conn.tasks.spawn(async move {
            tokio::time::sleep(FORWARD_SETUP_TIMEOUT).await;
            let forwards = &conn2.forwards;
            if lock(&forwards.opened).remove(&id).is_some() {
                forwards.remove(id);
                let _ = handle.close(id).await;
            }
        });
        true
    }

    async fn take_opened(&self, id: ChannelId) -> Option<(InboundRx, CancellationToken)> {
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

    /// The mux, when the agent is running.
    pub fn ready_mux(&self) -> Option<Arc<Mux>> {
        match &*self.agent.borrow() {
            AgentSlot::Ready(mux) => Some(Arc::clone(mux)),
            _ => None,
        }
    }

    /// The mux, waiting for the agent to start (its own start is bounded by the backend's
    /// timeouts).
    async fn mux(&self) -> Result<Arc<Mux>, String> {
        let mut rx = self.agent.subscribe();
        let slot = rx
            .wait_for(|s| matches!(s, AgentSlot::Ready(_) | AgentSlot::Failed(_)))
            .await
            .map(|s| s.clone())
            .map_err(|_| "the connection is closing".to_string())?;
        match slot {
            AgentSlot::Ready(mux) if mux.is_stopped() => {
                Err("the forwarding agent has stopped".into())
            }
            AgentSlot::Ready(mux) => Ok(mux),
            AgentSlot::Failed(e) => Err(e.to_string()),
            AgentSlot::NotStarted | AgentSlot::Starting => Err("forwarding unavailable".into()),
        }
    }
}

/// Takes a forwarded-channel place; `None` at the connection's limit.
fn take_place(conn: &Arc<ConnCtx>) -> Option<Place> {
    let forwards = &conn.forwards;
    forwards
        .places
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < MAX_FORWARD_CHANNELS_PER_CONNECTION).then_some(n + 1)
        })
        .ok()?;
    Some(Place {
        conn: Arc::clone(conn),
        _in_use: conn.in_use(),
    })
}

/// A host name or socket path the agent accepts: not empty, no NUL, within its limit.
pub fn target_ok(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && !s.contains('\0')
}

/// The longest host name in a forwarding request (the protocol's and the agent's limit).
pub const MAX_FORWARD_HOST_BYTES: usize = MAX_HOST_LEN;
/// The longest socket path in a forwarding request.
pub const MAX_FORWARD_PATH_BYTES: usize = MAX_PATH_LEN;

/// Whether the connection can forward at all: some kind enabled and not forbidden by the
/// login's key, programs run under the agent, and not session mode (no shared container).
pub fn wanted(conn: &ConnCtx) -> bool {
    let settings = conn.settings();
    let f = &settings.forwarding;
    let opts = conn.user().and_then(|u| u.key_options.as_ref());
    let port_ok = !opts.is_some_and(|o| o.no_port_forwarding);
    let x11_ok = !opts.is_some_and(|o| o.no_x11_forwarding);
    let agent_ok = !opts.is_some_and(|o| o.no_agent_forwarding);
    let some = (port_ok && (f.local_tcp || f.remote_tcp || f.local_socket || f.remote_socket))
        || (x11_ok && f.x11)
        || (agent_ok && f.agent);
    some && conn.backend().has_agent() && conn.backend().mode() != ExecutionMode::Session
}

/// Starts the connection's forwarding agent (once) in its container and its accept loop.
pub async fn start_agent(conn: &Arc<ConnCtx>) {
    let begun = conn.forwards.agent.send_if_modified(|s| {
        let fresh = matches!(s, AgentSlot::NotStarted);
        if fresh {
            *s = AgentSlot::Starting;
        }
        fresh
    });
    if !begun {
        return;
    }
    let slot = match start(conn).await {
        Ok(mux) => AgentSlot::Ready(mux),
        Err(e) => {
            tracing::warn!(code = "FORWARD_UNAVAILABLE", connection_id = %conn.id, error = %e, "forwarding unavailable");
            AgentSlot::Failed(Arc::from(e))
        }
    };
    conn.forwards.agent.send_replace(slot);
}

async fn start(conn: &Arc<ConnCtx>) -> Result<Arc<Mux>, String> {
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
    let container = conn
        .container()
        .await
        .map_err(|e| crate::backend::one_line(&e))?;
    let (output, input) = container
        .start_agent_command(&["forward-server"])
        .await
        .map_err(|e| crate::backend::one_line(&e))?;
    let (mux, incoming) = Mux::start("forwarding", output, input, conn.cancel.clone());
    let Some(handle) = conn.handle() else {
        return Err("the connection is closing".into());
    };
    conn.tasks
        .spawn(accept_loop(Arc::clone(conn), handle, incoming));
    tracing::debug!(connection_id = %conn.id, "forwarding agent started");
    Ok(mux)
}

/// The mux for a forwarding request: the agent is started now if it was not (a login that
/// could not forward at first cannot ask, so this is rare).
pub(super) async fn mux_for(conn: &Arc<ConnCtx>) -> Result<Arc<Mux>, String> {
    if matches!(*conn.forwards.agent.borrow(), AgentSlot::NotStarted) {
        let conn2 = Arc::clone(conn);
        conn.tasks.spawn(async move { start_agent(&conn2).await });
    }
    conn.forwards.mux().await
}

/// Refusals of connections made inside the container, logged at most once a second with a
/// count: a flood of them must not flood the log.
#[derive(Default)]
struct Refusals {
    last: Option<tokio::time::Instant>,
    unlogged: u64,
}

impl Refusals {
    fn refused(&mut self, conn: &ConnCtx, kind: &ListenerKind, why: &str) {
        self.unlogged += 1;
        let now = tokio::time::Instant::now();
        if self
            .last
            .is_some_and(|t| now < t + std::time::Duration::from_secs(1))
        {
            return;
        }
        tracing::info!(code = "FORWARD_CONNECTION_REFUSED", connection_id = %conn.id, ?kind, refused = self.unlogged, "connections made inside the container refused: {why}");
        self.last = Some(now);
        self.unlogged = 0;
    }
}

async fn accept_loop(conn: Arc<ConnCtx>, handle: Handle, mut incoming: mpsc::Receiver<Incoming>) {
    let mut refusals = Refusals::default();
    while let Some(inc) = incoming.recv().await {
        let kind = conn.forwards.listeners.kind_of(inc.listener);
        let Some(kind) = kind else {
            continue; // an unlistened listener's late connection: dropping closes it
        };
        // Counted now, before anything is spent on it: the client may be slow to confirm.
        let Some(place) = take_place(&conn) else {
            refusals.refused(&conn, &kind, "the connection's forwarded channels are all open or opening (MAX_FORWARD_CHANNELS_PER_CONNECTION)");
            continue;
        };
        let Some(reserved) = Reserved::take(&conn) else {
            refusals.refused(&conn, &kind, "buffer budget exhausted (ssh.buffers)");
            continue;
        };
        let (c, h) = (Arc::clone(&conn), handle.clone());
        conn.tasks
            .spawn(async move { open_incoming(c, h, kind, inc, place, reserved).await });
    }
}

/// A first window reserved for a channel we are opening, for its confirmation to take
/// ([`ConnForwards::confirmed`]). Dropped unsettled (the client refused the channel), it is
/// given back.
struct Reserved {
    conn: Arc<ConnCtx>,
    settled: bool,
}

impl Reserved {
    fn take(conn: &Arc<ConnCtx>) -> Option<Reserved> {
        if conn
            .buffers
            .take(CHANNEL_WINDOW_INITIAL, CHANNEL_WINDOW_INITIAL)
            == 0
        {
            return None;
        }
        conn.forwards.unconfirmed.fetch_add(1, Ordering::AcqRel);
        Some(Reserved {
            conn: Arc::clone(conn),
            settled: false,
        })
    }

    /// The client confirmed: its confirmation took the reservation.
    fn confirmed(mut self) {
        self.settled = true;
    }

    /// We stopped waiting: a confirmation that still comes takes it (and is closed).
    fn abandoned(mut self) {
        self.settled = true;
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let forwards = &self.conn.forwards;
        if forwards
            .unconfirmed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
        {
            self.conn.buffers.give(CHANNEL_WINDOW_INITIAL);
        }
    }
}

async fn open_incoming(
    conn: Arc<ConnCtx>,
    handle: Handle,
    kind: ListenerKind,
    inc: Incoming,
    place: Place,
    reserved: Reserved,
) {
    let peer = if inc.peer.is_empty() {
        "127.0.0.1".to_string()
    } else {
        inc.peer.clone()
    };
    let port = u32::from(inc.peer_port);
    let open = async {
        match &kind {
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
        }
    };
    let channel = match tokio::time::timeout(FORWARD_SETUP_TIMEOUT, open).await {
        Ok(Ok(c)) => {
            reserved.confirmed();
            c
        }
        Ok(Err(e)) => {
            tracing::info!(code = "FORWARD_CLIENT_REFUSED", connection_id = %conn.id, ?kind, error = %e, "the client refused a forwarded connection");
            return;
        }
        Err(_) => {
            reserved.abandoned();
            tracing::info!(code = "FORWARD_CLIENT_TIMEOUT", connection_id = %conn.id, ?kind, "the client did not answer a forwarded connection in time");
            return;
        }
    };
    let id = channel.id();
    let (from_host, from_port) = (inc.peer.clone(), u32::from(inc.peer_port));
    let msg = match &kind {
        ListenerKind::Tcp {
            address,
            port: bound,
        } => crate::audit::Msg::ForwardedTcp {
            host: address.clone(),
            port: *bound,
            from_host,
            from_port,
        },
        ListenerKind::Unix { path } => crate::audit::Msg::ForwardedUnix { path: path.clone() },
        ListenerKind::X11 => crate::audit::Msg::X11Channel {
            from_host,
            from_port,
        },
        ListenerKind::AuthAgent => crate::audit::Msg::AgentChannel,
    };
    conn.audit(Some(id.into()), msg);
    let write = write_half(channel);
    let Some((rx, closed)) = conn.forwards.take_opened(id).await else {
        let _ = write.close().await;
        return;
    };
    bridge(conn, id, inc.stream, write, rx, closed, place).await;
}

/// Accepts or refuses a client's `direct-tcpip`/`direct-streamlocal` channel once the agent
/// has connected (or failed to), then bridges it. Called from the handler: returns at once.
pub fn open_direct(
    conn: &Arc<ConnCtx>,
    handle: Handle,
    channel: Channel<Msg>,
    reply: ChannelOpenHandle,
    target: DirectTarget,
) {
    let id = channel.id();
    let taken = take_place(conn).ok_or("too many open").and_then(|p| {
        Ok((
            p,
            flow::inbound(&conn.buffers).map_err(|_| "buffer budget exhausted")?,
        ))
    });
    let (place, (tx, rx)) = match taken {
        Ok(x) => x,
        Err(why) => {
            tracing::info!(code = "FORWARD_CONNECTION_REFUSED", connection_id = %conn.id, "forwarded connection refused: {why}");
            conn.tasks
                .spawn(reply.reject(ChannelOpenFailure::ResourceShortage));
            return;
        }
    };
    tx.set_granter(Granter::new(handle, id));
    // Registered before the accept: the client's data may follow it at once.
    let closed = CancellationToken::new();
    lock(&conn.forwards.channels).insert(
        id,
        ForwardEntry {
            stdin: Arc::new(tx),
            closed: closed.clone(),
        },
    );
    let conn = Arc::clone(conn);
    conn.clone().tasks.spawn(async move {
        let dialled = async {
            let mux = mux_for(&conn).await?;
            let dial = async {
                match &target {
                    DirectTarget::Tcp { host, port } => mux.dial_tcp(host, *port).await,
                    DirectTarget::Unix { path } => mux.dial_unix(path).await,
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
                bridge(conn, id, stream, write, rx, closed, place).await;
            }
            Err(e) => {
                tracing::info!(code = "FORWARD_CONNECT_FAILED", connection_id = %conn.id, error = %e, "forwarded connection failed");
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
    mut from_client: InboundRx,
    closed: CancellationToken,
    _place: Place,
) {
    let (sink, mut source) = stream.split();
    let up = async {
        while let Some(data) = from_client.next().await {
            conn.audit_forwarded(id.into(), false, &data);
            if sink.send(&data).await.is_err() {
                return;
            }
            from_client.delivered(data.len());
        }
        sink.eof();
    };
    let down = async {
        let mut out = write.make_writer();
        while let Some(ev) = source.recv().await {
            match ev {
                StreamEvent::Data(data) => {
                    conn.audit_forwarded(id.into(), true, &data);
                    if out.write_all(&data).await.is_err() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_targets_within_the_agents_limits() {
        assert!(target_ok("example.com", MAX_FORWARD_HOST_BYTES));
        assert!(!target_ok("", MAX_FORWARD_HOST_BYTES));
        assert!(!target_ok("a\0b", MAX_FORWARD_HOST_BYTES));
        assert!(target_ok(&"a".repeat(255), MAX_FORWARD_HOST_BYTES));
        assert!(!target_ok(&"a".repeat(256), MAX_FORWARD_HOST_BYTES));
    }
}
