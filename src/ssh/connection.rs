//! One SSH connection's life, and the state its tasks share ([`ConnCtx`]).
//!
//! | phase | from | what can happen, and the answer |
//! |---|---|---|
//! | Handshake | the front door let it in (`server.rs`) | version and key exchange, in russh, within `ssh.handshakeTimeout` from the accept; anything else is russh's protocol error |
//! | Authenticating | the first authentication request | requests of every method, each answered after the fixed delay (`ssh/auth.rs`); the user may not change; `ssh.maxAuthTries` refusals or the login grace time end it; channels and global requests are refused by russh |
//! | Authenticated | the login's last check passed: [`ConnCtx::authenticated`] sets the [`Login`], once | channels (`ssh/session_channel.rs`, `ssh/forward.rs`) and forwarding requests; in connection and persistent modes the container starts in the background, then the forwarding agent when the login may forward; `security.timeouts.unusedConnection` closes it while it has no channel and no listener |
//! | Closing | the client left, a deadline, a disconnect we sent, shutdown | [`ConnCtx::cancel`]: channels end (with a notice on shutdown), tasks get the stop timeout, then every container labelled with the connection goes |
//!
//! Nothing in this file waits on the backend inside a russh callback: the container start and
//! the forwarding agent run as tasks, and callbacks read what they need from watch channels.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::sync::{watch, Notify, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::flow::Budget;
use crate::auth::authorized_keys::KeyOptions;
use crate::auth::metadata::LoginMetadata;
use crate::backend::{Backend, ConnMeta, Container, StartError};
use crate::config::model::ExecutionMode;
use crate::config::Settings;
use crate::front::Startup;
use crate::limits::DISCONNECT_FLUSH;
use crate::shared::Shared;

#[derive(Clone, Debug)]
pub struct AuthedUser {
    pub name: String,
    /// Present for public-key logins: the matching authorized_keys line's options.
    pub key_options: Option<KeyOptions>,
    /// Environment and files the login brings.
    pub metadata: Arc<LoginMetadata>,
}

/// Who logged in and what the connection runs with, fixed once every check has passed.
pub struct Login {
    pub user: AuthedUser,
    /// The login's own settings (from the config webhook) or the file's.
    pub settings: Arc<Settings>,
    pub backend: Arc<dyn Backend>,
}

/// The connection-mode container or pod as sessions see it.
#[derive(Clone, Debug)]
pub enum ContainerSlot {
    Starting,
    Ready(Arc<dyn Container>),
    Failed(Arc<str>),
}

/// Channels and listeners a connection has open, for `unusedConnection`.
#[derive(Default)]
pub struct Usage {
    open: AtomicUsize,
    changed: Notify,
}

/// One channel or listener counted in [`Usage`] while it lives.
pub struct InUse(Arc<ConnCtx>);

impl Drop for InUse {
    fn drop(&mut self) {
        let usage = &self.0.usage;
        usage.open.fetch_sub(1, Ordering::AcqRel);
        usage.changed.notify_waiters();
    }
}

pub struct ConnCtx {
    pub id: String,
    /// The client's address: the TCP peer's, or the one a trusted proxy's header names
    /// (IPv4-mapped addresses as plain IPv4).
    pub peer: SocketAddr,
    pub shared: Arc<Shared>,
    login: OnceLock<Login>,
    container: watch::Sender<ContainerSlot>,
    /// Cancelled when the connection ends or the server drains.
    pub cancel: CancellationToken,
    /// Every task working for this connection (container start, channels).
    pub tasks: TaskTracker,
    /// Forwarded connections and listeners.
    pub forwards: super::forward::ConnForwards,
    /// The client's identification line once read, and whether it opened with a PROXY header.
    pub hello: Arc<super::version::ClientHello>,
    /// `ssh.buffers.perConnection`: what this connection's channels may hold.
    pub buffers: Arc<Budget>,
    usage: Usage,
    /// The russh session's handle, once the version exchange is done.
    handle: OnceLock<russh::server::Handle>,
    /// Cancelled at the client's first authentication request: the key exchange is done.
    pub handshaken: CancellationToken,
    /// Cancelled when the connection is over: every read and write of the socket then fails.
    pub stream_end: CancellationToken,
    /// This connection's place among the unauthenticated ones (given back at login, or when the
    /// connection is gone).
    startup: Mutex<Option<Startup>>,
    /// Its place among all connections, given back when the connection is gone: when this
    /// task and russh's have both let go.
    _place: OwnedSemaphorePermit,
    /// Authentication requests refused so far (for the penalty of a connection that ends).
    auth_failures: AtomicU32,
    /// A disconnect was asked for already.
    disconnecting: AtomicBool,
    /// Cancelled once the login succeeded.
    authenticated: CancellationToken,
    /// The connection's binary audit recording (`audit.format: binary`).
    audit: Option<crate::audit::Log>,
}

/// Drops a connection's own log level when its cleanup is done.
struct LevelReset<'a>(&'a str);

impl Drop for LevelReset<'_> {
    fn drop(&mut self) {
        crate::log::clear_connection_level(self.0);
    }
}

/// 32 hex characters from 16 random bytes, ContainerSSH's connection ID format.
pub fn new_connection_id() -> String {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        // The OS RNG failing is not recoverable in any useful way; a time-derived ID still
        // keeps labels distinct enough for cleanup.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        b = t.to_le_bytes();
    }
    hex::encode(b)
}

impl ConnCtx {
    /// Records a message in the connection's binary audit recording, when there is one.
    pub fn audit(&self, channel: Option<u32>, msg: crate::audit::Msg) {
        if let Some(log) = &self.audit {
            log.event(channel, msg);
        }
    }

    /// Records a forwarded connection's data (`audit.intercept.forwarding`).
    pub fn audit_forwarded(&self, channel: u32, to_client: bool, data: &[u8]) {
        if let Some(log) = &self.audit {
            log.forwarded(channel, to_client, data);
        }
    }

    /// The binary audit recording, for the session channels' parts of it.
    pub fn audit_log(&self) -> Option<&crate::audit::Log> {
        self.audit.as_ref()
    }

    /// `stream_end` cuts the socket's I/O when cancelled (the connection's task does, at its
    /// end).
    pub fn new(
        shared: Arc<Shared>,
        peer: SocketAddr,
        (startup, place): (Startup, OwnedSemaphorePermit),
        stream_end: CancellationToken,
    ) -> Arc<Self> {
        let cancel = shared.shutdown.child_token();
        let buffers = shared
            .buffers
            .child(shared.settings.ssh.buffers.per_connection);
        let id = new_connection_id();
        let audit = shared.audit.as_ref().and_then(|r| r.connect(&id, peer));
        Arc::new(Self {
            id,
            audit,
            peer,
            shared,
            login: OnceLock::new(),
            container: watch::channel(ContainerSlot::Starting).0,
            cancel,
            tasks: TaskTracker::new(),
            forwards: Default::default(),
            hello: Arc::default(),
            buffers,
            usage: Usage::default(),
            handle: OnceLock::new(),
            handshaken: CancellationToken::new(),
            stream_end,
            startup: Mutex::new(Some(startup)),
            _place: place,
            auth_failures: AtomicU32::new(0),
            disconnecting: AtomicBool::new(false),
            authenticated: CancellationToken::new(),
        })
    }

    /// Cancelled once the login succeeded.
    pub fn authenticated_token(&self) -> CancellationToken {
        self.authenticated.clone()
    }

    pub fn set_handle(&self, handle: russh::server::Handle) {
        let _ = self.handle.set(handle);
    }

    /// The russh session's handle, once the version exchange is done.
    pub fn handle(&self) -> Option<russh::server::Handle> {
        self.handle.get().cloned()
    }

    /// Gives this connection's place among the unauthenticated ones back.
    pub fn release_startup(&self) {
        self.startup
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }

    pub fn auth_failed(&self) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
    }

    pub fn auth_failures(&self) -> u32 {
        self.auth_failures.load(Ordering::Relaxed)
    }

    /// Disconnects the client with `reason` (once), without waiting: russh sends it after the
    /// packet being handled, so this is safe to call from its callbacks.
    pub fn disconnect(&self, reason: russh::Disconnect, text: &'static str) {
        if self.disconnecting.swap(true, Ordering::Relaxed) {
            return;
        }
        let Some(handle) = self.handle.get().cloned() else {
            // Before the version exchange finished there is no session to speak on.
            self.stream_end.cancel();
            return;
        };
        let end = self.stream_end.clone();
        self.tasks.spawn(async move {
            let bye = handle.disconnect(reason, text.into(), String::new());
            let _ = tokio::time::timeout(DISCONNECT_FLUSH, bye).await;
            // A client that ignores the disconnect loses the socket anyway.
            tokio::time::sleep(DISCONNECT_FLUSH).await;
            end.cancel();
        });
    }

    pub fn login(&self) -> Option<&Login> {
        self.login.get()
    }

    /// The settings this connection runs with: the login's own, or the file's.
    pub fn settings(&self) -> &Settings {
        self.login
            .get()
            .map(|l| l.settings.as_ref())
            .unwrap_or(&self.shared.settings)
    }

    /// The backend this connection's containers or pods come from.
    pub fn backend(&self) -> &Arc<dyn Backend> {
        self.login
            .get()
            .map_or(&self.shared.backend, |l| &l.backend)
    }

    pub fn user(&self) -> Option<&AuthedUser> {
        self.login.get().map(|l| &l.user)
    }

    pub fn is_authenticated(&self) -> bool {
        self.login.get().is_some()
    }

    pub fn meta(&self) -> ConnMeta {
        ConnMeta {
            connection_id: self.id.clone(),
            username: self.user().map(|u| u.name.clone()).unwrap_or_default(),
            remote_ip: self.peer.ip().to_string(),
        }
    }

    /// Counts a channel or listener as in use until the returned guard is dropped.
    pub fn in_use(self: &Arc<Self>) -> InUse {
        self.usage.open.fetch_add(1, Ordering::AcqRel);
        self.usage.changed.notify_waiters();
        InUse(Arc::clone(self))
    }

    /// Disconnects with `reason` when no channel or listener is left (a timeout closed the
    /// last one).
    pub fn close_if_unused(&self, reason: &'static str) {
        if self.usage.open.load(Ordering::Acquire) == 0 {
            tracing::info!(code = "SSH_UNUSED_CONNECTION_CLOSED", connection_id = %self.id, reason, "closing the connection: its last channel was closed");
            self.disconnect(russh::Disconnect::ByApplication, reason);
        }
    }

    /// Enters the Authenticated phase with `login` (once), and starts in the background what
    /// the login needs: the container (connection and persistent modes), then the forwarding
    /// agent when the login may forward; and the unused-connection timer. The SSH event loop
    /// never waits on any of them.
    pub fn authenticated(self: &Arc<Self>, login: Login) {
        if self.login.set(login).is_err() {
            return;
        }
        self.authenticated.cancel();
        if let Some(after) = self.settings().policy.timeouts.unused_connection {
            self.tasks
                .spawn(unused_connection_timer(Arc::clone(self), after));
        }
        if self.backend().mode() == ExecutionMode::Session {
            return;
        }
        let me = Arc::clone(self);
        self.tasks.spawn(async move {
            let meta = me.meta();
            let login = me
                .user()
                .map(|u| Arc::clone(&u.metadata))
                .unwrap_or_default();
            // Not cancelled midway: a create in flight must finish so cleanup can find it.
            // The files are written before the slot is ready, so no session starts without them.
            let started = me.backend().start_connection(&meta, &login).await;
            let slot = match started {
                Ok(t) => ContainerSlot::Ready(t),
                Err(e) => {
                    let e = crate::backend::one_line(&e);
                    tracing::warn!(code = "BACKEND_START_FAILED", connection_id = %me.id, error = %e, "container start failed");
                    ContainerSlot::Failed(Arc::from(e))
                }
            };
            let ready = matches!(slot, ContainerSlot::Ready(_));
            me.container.send_replace(slot);
            if ready && super::forward::wanted(&me) {
                super::forward::start_agent(&me).await;
            }
        });
    }

    /// Waits for the connection's container or pod (connection and persistent modes).
    pub async fn container(&self) -> Result<Arc<dyn Container>, StartError> {
        let mut rx = self.container.subscribe();
        let slot = tokio::select! {
            r = rx.wait_for(|s| !matches!(s, ContainerSlot::Starting)) => {
                r.map(|s| s.clone()).map_err(|_| StartError::Closing)?
            }
            () = self.cancel.cancelled() => return Err(StartError::Closing),
        };
        match slot {
            ContainerSlot::Ready(id) => Ok(id),
            ContainerSlot::Failed(msg) => Err(StartError::Earlier(msg)),
            ContainerSlot::Starting => Err(StartError::Closing),
        }
    }

    /// Ends the connection's work: cancel, let tasks finish (bounded), then remove every
    /// container labelled with this connection's ID.
    pub async fn close(&self) {
        self.cancel.cancel();
        // After the cleanup below is logged at the login's level.
        let _level = LevelReset(&self.id);
        self.tasks.close();
        let stop = self.settings().stop_timeout();
        if tokio::time::timeout(stop, self.tasks.wait()).await.is_err() {
            tracing::warn!(code = "SSH_CONNECTION_STOP_TIMEOUT", connection_id = %self.id, "connection tasks did not finish in time");
        }
        if !self.is_authenticated() {
            return;
        }
        self.shared
            .janitor
            .remove_connection(self.backend(), &self.id)
            .await;
    }
}

/// OpenSSH's UnusedConnectionTimeout: while the connection has no channel and no listener,
/// it is closed once `after` has passed.
async fn unused_connection_timer(conn: Arc<ConnCtx>, after: Duration) {
    let usage = &conn.usage;
    loop {
        let changed = usage.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if usage.open.load(Ordering::Acquire) > 0 {
            tokio::select! {
                () = changed => continue,
                () = conn.cancel.cancelled() => return,
            }
        }
        tokio::select! {
            () = changed => continue,
            () = conn.cancel.cancelled() => return,
            () = tokio::time::sleep(after) => {}
        }
        if usage.open.load(Ordering::Acquire) == 0 {
            tracing::info!(code = "SSH_UNUSED_CONNECTION_CLOSED", connection_id = %conn.id, after = ?after, "closing the connection: no channel or listener (security.timeouts.unusedConnection)");
            conn.disconnect(
                russh::Disconnect::ByApplication,
                "unused connection timeout",
            );
            return;
        }
    }
}
