//! Container backends behind one seam. The SSH side sees only the two traits here:
//!
//! - [`Backend`]: starts a connection's container or pod (connection and persistent modes),
//!   a session's own (session mode), and removes what it created (per connection, and at
//!   start-up for what a crashed run left).
//! - [`Container`]: one running container or pod, carrying its own backend: run a program in
//!   it ([`Container::exec`]), a helper to completion ([`Container::capture`]), the agent's
//!   long-running `forward-server`, and (session containers) its removal.
//!
//! A started program is one [`Process`] (stdin, output chunks, and a [`ProcessControl`]
//! that resizes, signals and waits), defined once in [`process`] for every backend: the
//! backends supply only what differs ([`process::Program`]); signals through the agent and
//! the agent's exit records are [`agent`]'s, shared.
//!
//! A backend implements one trait, [`Runtime`] (plain `async fn`s); [`Engine`] makes the
//! [`Backend`] of it and [`Handle`] the [`Container`]s, once for every backend, so the
//! behaviour they share (login files after start, the agent's presence) is written once.
//!
//! Traits with boxed futures rather than one enum per operation: the backend is chosen per
//! login at run time (the config webhook may pick another engine or cluster), a test can plug
//! in its own ([`fake`]), and adding a backend touches its own directory and [`build`] only.

pub mod agent;
pub mod agent_sessions;
pub mod build;
pub mod docker;
#[cfg(any(test, feature = "test-support"))]
pub mod fake;
pub mod janitor;
pub mod kubernetes;
pub mod ledger;
pub mod pool;
pub mod process;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use agent_sessions::AgentSessions;
pub use process::{Process, ProcessControl, ProcessInput, ProcessOutput};

use crate::auth::metadata::LoginMetadata;
use crate::config::model::ExecutionMode;

/// The futures the traits return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A backend's own error (its [`Runtime::Error`], or a message), kept whole across the seam:
/// the user gets [`one_line`] of it, the log the same, with every cause.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// An error and its causes on one line, `outer: inner: innermost` (what the user and the log
/// see; a cause its parent's text already ends with is not repeated).
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !text.is_empty() && !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = s.source();
    }
    line
}

/// A container runtime: Docker, Kubernetes, or a test's fake.
pub trait Backend: Send + Sync {
    fn mode(&self) -> ExecutionMode;

    /// Whether programs run under the agent (signals to exec'd programs, forwarding and files
    /// need it).
    fn has_agent(&self) -> bool;

    /// The configuration key that turns the agent off, for messages.
    fn disable_agent_key(&self) -> &'static str;

    /// Variables a program gets from the login's metadata beyond its own environment
    /// (Docker's `exposeAuthMetadataAsEnv`; Kubernetes puts them into the pod).
    fn login_env(&self, login: &LoginMetadata) -> Vec<String>;

    /// Connection and persistent modes: the connection's container or pod, ready, with the
    /// login's files written into it.
    fn start_connection<'a>(
        &'a self,
        meta: &'a ConnMeta,
        login: &'a LoginMetadata,
    ) -> BoxFuture<'a, Result<Arc<dyn Container>, StartError>>;

    /// Session mode: a container or pod of the program's own, running it; remove it with
    /// [`Container::remove`].
    fn run_session<'a>(
        &'a self,
        meta: &'a ConnMeta,
        spec: &'a ProgramSpec,
    ) -> BoxFuture<'a, Result<SessionStart, StartError>>;

    /// Removes everything of one connection (found by label); how many were removed.
    fn remove_connection<'a>(
        &'a self,
        connection_id: &'a str,
    ) -> BoxFuture<'a, Result<usize, Cause>>;

    /// Removes what a crashed run of this instance left behind (at start) or what connections
    /// still open at the drain deadline leave (at shutdown).
    fn reap(&self) -> BoxFuture<'_, Result<usize, Cause>>;

    /// A backend for a login whose own settings (from the config webhook) differ from this
    /// one's in what it can take over while sharing its connection to the engine and its
    /// agent (`same_connection`: the login names the same engine or cluster); `None`: the
    /// login needs a backend of its own ([`build::for_login`]).
    fn derive(
        &self,
        login: &crate::config::Settings,
        same_connection: bool,
    ) -> Option<Arc<dyn Backend>>;

    /// Starts what runs ahead of logins (the warm pool), until `stop`.
    fn warm(&self, _stop: tokio_util::sync::CancellationToken) {}
}

/// Where the agent is in a container, and whether it is ours (every flag) or an image's own
/// (ContainerSSH's, which knows only `console --pid`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentAt {
    pub path: String,
    pub ours: bool,
}

/// A session's own container and the program running in it.
pub type SessionStart = (Arc<dyn Container>, Process);

/// An agent command's output and stdin.
pub type AgentStreams = (Box<dyn process::OutputSource>, ProcessInput);

/// One running container or pod.
pub trait Container: Send + Sync + fmt::Debug {
    /// Its id or name, for logs.
    fn name(&self) -> &str;

    /// The agent in it, when programs run under one.
    fn agent(&self) -> Option<&AgentAt>;

    /// Starts one program in it.
    fn exec<'a>(&'a self, spec: &'a ProgramSpec) -> BoxFuture<'a, Result<Process, StartError>>;

    /// Runs a helper program (`agent write-file`, `agent signal`, ...) to completion: optional
    /// stdin, output kept up to [`process::MAX_CAPTURE_BYTES`] per stream; bounded by the
    /// backend's command start timeout.
    fn capture<'a>(
        &'a self,
        argv: Vec<String>,
        stdin: Option<&'a [u8]>,
    ) -> BoxFuture<'a, Result<process::Captured, Cause>>;

    /// Starts a long-running agent command (`forward-server`) with its stdin and stdout; it
    /// ends when its stdin closes.
    fn start_agent_command<'a>(
        &'a self,
        args: &'a [&'a str],
    ) -> BoxFuture<'a, Result<AgentStreams, StartError>>;

    /// Removes it (session mode's own containers; the connection's go by label).
    fn remove(&self) -> BoxFuture<'_, ()>;
}

/// What one backend (Docker, Kubernetes, a test's fake) implements; [`Engine`] makes a
/// [`Backend`] of it and [`Handle`] a [`Container`], once for every backend.
pub trait Runtime: Send + Sync + Sized + 'static {
    /// The configuration key that turns the agent off, for messages.
    const DISABLE_AGENT_KEY: &'static str;

    /// Its name in metrics' `backend` label (`docker`, `kubernetes`).
    const KIND: &'static str;

    /// What its cleanup and helper programs fail with (the module's own error enum).
    type Error: std::error::Error + Send + Sync + 'static;

    fn mode(&self) -> ExecutionMode;

    /// See [`Backend::has_agent`].
    fn has_agent(&self) -> bool;

    /// See [`Backend::login_env`].
    fn login_env(&self, _login: &LoginMetadata) -> Vec<String> {
        Vec::new()
    }

    /// Connection mode: starts the connection's container or pod; persistent mode: finds or
    /// starts the user's. Its name, and the agent in it.
    fn connection_container(
        &self,
        meta: &ConnMeta,
        login: &LoginMetadata,
    ) -> impl Future<Output = Result<(String, Option<AgentAt>), StartError>> + Send;

    /// Writes the login's files into a container without the agent, where the backend can.
    fn put_files(
        &self,
        name: &str,
        files: &[crate::auth::metadata::LoginFile],
    ) -> impl Future<Output = ()> + Send;

    /// See [`Backend::run_session`].
    fn run_session(
        self: &Arc<Self>,
        meta: &ConnMeta,
        spec: &ProgramSpec,
    ) -> impl Future<Output = Result<SessionStart, StartError>> + Send;

    /// See [`Backend::remove_connection`].
    fn remove_connection(
        &self,
        connection_id: &str,
    ) -> impl Future<Output = Result<usize, Self::Error>> + Send;

    /// See [`Backend::reap`].
    fn reap(&self) -> impl Future<Output = Result<usize, Self::Error>> + Send;

    /// See [`Backend::derive`].
    fn derive(
        &self,
        _login: &crate::config::Settings,
        _same_connection: bool,
    ) -> Option<Arc<dyn Backend>> {
        None
    }

    /// See [`Backend::warm`].
    fn warm(self: &Arc<Self>, _stop: tokio_util::sync::CancellationToken) {}

    /// Starts a program in container `name`; `handle` is that container, for the program's
    /// control (signals through the agent run there).
    fn exec(
        &self,
        name: &str,
        spec: &ProgramSpec,
        handle: Arc<dyn Container>,
    ) -> impl Future<Output = Result<Process, StartError>> + Send;

    /// See [`Container::capture`].
    fn capture(
        &self,
        name: &str,
        argv: Vec<String>,
        stdin: Option<&[u8]>,
    ) -> impl Future<Output = Result<process::Captured, Self::Error>> + Send;

    /// See [`Container::start_agent_command`].
    fn start_agent_command(
        &self,
        name: &str,
        agent: Option<&AgentAt>,
        args: &[&str],
    ) -> impl Future<Output = Result<AgentStreams, StartError>> + Send;

    /// Removes a session's own container.
    fn remove(&self, name: &str) -> impl Future<Output = ()> + Send;

    /// The streams of connection container `name`'s `session-server`, when its main process
    /// is one (sessions then start without an exec); `None` otherwise or when it cannot be
    /// reached (the exec API serves instead).
    fn attach_agent(&self, _name: &str) -> impl Future<Output = Option<AgentStreams>> + Send {
        async { None }
    }

    /// Bound on a helper program run through the agent (the backend's for helper execs).
    fn helper_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(60)
    }
}

/// The [`Backend`] of one [`Runtime`]; cheap to clone, clones share it.
pub struct Engine<R>(Arc<R>);

impl<R> Engine<R> {
    pub fn of(runtime: R) -> Self {
        Self(Arc::new(runtime))
    }

    pub fn runtime(&self) -> &Arc<R> {
        &self.0
    }
}

impl<R> Clone for Engine<R> {
    fn clone(&self) -> Self {
        Self(Arc::clone(&self.0))
    }
}

impl<R: Runtime> Backend for Engine<R> {
    fn mode(&self) -> ExecutionMode {
        self.0.mode()
    }

    fn has_agent(&self) -> bool {
        self.0.has_agent()
    }

    fn disable_agent_key(&self) -> &'static str {
        R::DISABLE_AGENT_KEY
    }

    fn login_env(&self, login: &LoginMetadata) -> Vec<String> {
        self.0.login_env(login)
    }

    fn start_connection<'a>(
        &'a self,
        meta: &'a ConnMeta,
        login: &'a LoginMetadata,
    ) -> BoxFuture<'a, Result<Arc<dyn Container>, StartError>> {
        Box::pin(async move {
            let (name, agent) = counted(R::KIND, self.0.connection_container(meta, login)).await?;
            let limit = self.0.helper_timeout();
            let attached = self.0.attach_agent(&name).await;
            let sessions = attached.map(|streams| AgentSessions::start(streams, limit));
            let mut container = Handle::new(Arc::clone(&self.0), name, agent, false);
            container.sessions = sessions;
            if container.agent().is_some() {
                agent::write_login_files(&container, &login.files).await;
            } else if !login.files.is_empty() {
                self.0.put_files(container.name(), &login.files).await;
            }
            Ok(Arc::new(container) as Arc<dyn Container>)
        })
    }

    fn run_session<'a>(
        &'a self,
        meta: &'a ConnMeta,
        spec: &'a ProgramSpec,
    ) -> BoxFuture<'a, Result<SessionStart, StartError>> {
        Box::pin(counted(R::KIND, self.0.run_session(meta, spec)))
    }

    fn remove_connection<'a>(
        &'a self,
        connection_id: &'a str,
    ) -> BoxFuture<'a, Result<usize, Cause>> {
        Box::pin(async move { Ok(self.0.remove_connection(connection_id).await?) })
    }

    fn reap(&self) -> BoxFuture<'_, Result<usize, Cause>> {
        Box::pin(async move { Ok(self.0.reap().await?) })
    }

    fn derive(
        &self,
        login: &crate::config::Settings,
        same_connection: bool,
    ) -> Option<Arc<dyn Backend>> {
        self.0.derive(login, same_connection)
    }

    fn warm(&self, stop: tokio_util::sync::CancellationToken) {
        self.0.warm(stop);
    }
}

/// A container or pod start, in the metrics: a request, its duration, and an error when it
/// fails.
async fn counted<T>(
    kind: &'static str,
    start: impl Future<Output = Result<T, StartError>>,
) -> Result<T, StartError> {
    let m = crate::metrics::get();
    m.backend_requests.inc(&[kind]);
    let began = std::time::Instant::now();
    let result = start.await;
    m.backend_start.observe(&[kind], began.elapsed());
    if result.is_err() {
        m.backend_errors.inc(&[kind]);
    }
    result
}

/// One container of a backend's: the connection's (or the persistent one), or a session's
/// own (`own`: removed with it).
pub struct Handle<R> {
    runtime: Arc<R>,
    name: String,
    agent: Option<AgentAt>,
    own: bool,
    /// Its `session-server`, when programs start through it rather than the exec API.
    sessions: Option<Arc<AgentSessions>>,
}

impl<R> Handle<R> {
    pub fn new(runtime: Arc<R>, name: String, agent: Option<AgentAt>, own: bool) -> Self {
        Self {
            runtime,
            name,
            agent,
            own,
            sessions: None,
        }
    }
}

impl<R> Clone for Handle<R> {
    fn clone(&self) -> Self {
        Self {
            runtime: Arc::clone(&self.runtime),
            name: self.name.clone(),
            agent: self.agent.clone(),
            own: self.own,
            sessions: self.sessions.clone(),
        }
    }
}

impl<R> fmt::Debug for Handle<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Container")
            .field("name", &self.name)
            .field("own", &self.own)
            .finish()
    }
}

impl<R: Runtime> Container for Handle<R> {
    fn name(&self) -> &str {
        &self.name
    }

    fn agent(&self) -> Option<&AgentAt> {
        self.agent.as_ref()
    }

    fn exec<'a>(&'a self, spec: &'a ProgramSpec) -> BoxFuture<'a, Result<Process, StartError>> {
        let handle: Arc<dyn Container> = Arc::new(self.clone());
        Box::pin(async move {
            if let Some(sessions) = &self.sessions {
                let started =
                    sessions.start_program(spec, Arc::clone(&handle), R::DISABLE_AGENT_KEY);
                if let Some(result) = started.await {
                    return result;
                }
                tracing::debug!(container = %self.name, "the session agent cannot start this program; using exec");
            }
            self.runtime.exec(&self.name, spec, handle).await
        })
    }

    fn capture<'a>(
        &'a self,
        argv: Vec<String>,
        stdin: Option<&'a [u8]>,
    ) -> BoxFuture<'a, Result<process::Captured, Cause>> {
        Box::pin(async move {
            if let Some(sessions) = &self.sessions {
                if let Some(result) = sessions.capture(&argv, stdin).await {
                    return result;
                }
            }
            Ok(self.runtime.capture(&self.name, argv, stdin).await?)
        })
    }

    fn start_agent_command<'a>(
        &'a self,
        args: &'a [&'a str],
    ) -> BoxFuture<'a, Result<AgentStreams, StartError>> {
        Box::pin(
            self.runtime
                .start_agent_command(&self.name, self.agent.as_ref(), args),
        )
    }

    fn remove(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.own {
                self.runtime.remove(&self.name).await;
            }
        })
    }
}

/// Where a program's output comes from, per chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    Stdout,
    Stderr,
}

/// Who a container is for; written into labels so cleanup can find it again.
#[derive(Clone, Debug)]
pub struct ConnMeta {
    /// 32 lowercase hex characters, as ContainerSSH's connection IDs.
    pub connection_id: String,
    pub username: String,
    pub remote_ip: String,
}

/// Terminal requested with `pty-req`, updated by `window-change`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Terminal {
    pub term: String,
    pub cols: u32,
    pub rows: u32,
}

impl Terminal {
    /// `(rows, cols)` to give the engine; `None` for a size the client does not know (`ssh -tt`
    /// without a terminal sends 0×0), which stays 0×0 as under sshd.
    pub fn size(&self) -> Option<(u32, u32)> {
        (self.rows > 0 && self.cols > 0).then_some((self.rows, self.cols))
    }
}

/// What a session channel asked to run.
#[derive(Clone, Debug)]
pub struct ProgramSpec {
    pub argv: Vec<String>,
    /// `NAME=value` entries from `env` requests (and TERM when a terminal was requested).
    pub env: Vec<String>,
    pub tty: Option<Terminal>,
    /// What the login brings; its files are written into session containers before start.
    pub login: Arc<LoginMetadata>,
}

/// How a program ended, in SSH terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReport {
    Status(u32),
    /// Died of a signal; `name` is the SSH name without `SIG` (`TERM`, `KILL`).
    Signal {
        name: String,
    },
}

/// Why a program could not be started; `Display` is the one line the user sees.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the container engine is not reachable")]
    EngineUnreachable(#[source] Cause),
    #[error("image {0} not found")]
    ImageNotFound(String),
    #[error("image {image} could not be pulled")]
    PullFailed {
        image: String,
        #[source]
        source: Cause,
    },
    #[error("the container failed to start")]
    ContainerFailed(#[source] Cause),
    #[error("the program could not be started")]
    ExecFailed(#[source] Cause),
    #[error("starting the container took longer than {0:?}")]
    Timeout(std::time::Duration),
    #[error("the connection is closing")]
    Closing,
    /// A failure already reported once (the shared connection-mode container), repeated to
    /// each session that waited for it.
    #[error("{0}")]
    Earlier(std::sync::Arc<str>),
}

/// The signals SSH names (RFC 4254 §6.10): the agent's table, shared.
pub use crate::agent::signal::ssh_signal_number as signal_number;

impl fmt::Display for ExitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReport::Status(c) => write!(f, "exit status {c}"),
            ExitReport::Signal { name } => write!(f, "signal {name}"),
        }
    }
}
