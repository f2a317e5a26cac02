//! A session channel's life: what the client may ask in each phase, and what the channel's
//! own task does.
//!
//! | phase | from | client requests (answered at once by the handler) | the task |
//! |---|---|---|---|
//! | Requested | `channel_open_session` | `pty-req`, `env`, `x11-req`, `auth-agent-req` are recorded (at most one each, `env` up to `MAX_ENV_VARS`); `shell`/`exec`/`subsystem` moves on to Starting; `window-change` is kept (the latest) for the terminal; `signal` is dropped (no program yet); data is queued for the program; EOF is kept; close ends it | waits for the program |
//! | Starting | the program request | `pty-req`, `env`, `x11-req`, `auth-agent-req`, a second program: refused (`Refused::Started`); `window-change` kept (the latest); `signal` kept (up to `MAX_PENDING_SIGNALS`); data queued within the window; EOF kept; close noted | sets up X11 and the agent socket, then starts the program (in the connection's container, or a container of its own); the start is never cancelled midway, so whatever it creates is known and removed |
//! | Running | the program started | as in Starting; the kept size and signals are applied at once, later ones as they come | pumps stdin in (window granted as it drains: `ssh/flow.rs`) and stdout/stderr out, applies resizes and signals, enforces `security.timeouts` (`ssh/timeouts.rs`) |
//! | Closing | the output ended, the client closed, a timeout, the connection ends | everything is refused or dropped | sends the exit status (or signal), EOF and close; removes a session-mode container |
//!
//! The handler never waits on the task: what it records goes into the channel's [`Inbox`],
//! which is bounded by construction, and the task picks it up whatever it is doing.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use russh::server::{Handle, Msg};
use russh::{Channel, ChannelId, ChannelWriteHalf};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::connection::{ConnCtx, InUse};
use super::flow::{self, BudgetExhausted, Granter, InboundRx, InboundTx};
use super::timeouts::{Activity, Enforcer, Step};
use crate::backend::process::{Process, ProcessControl, ProcessOutput};
use crate::backend::{Container, ExitReport, OutputKind, ProgramSpec, StartError, Terminal};
use crate::config::model::ExecutionMode;
use crate::limits::{MAX_ENV_VARS, MAX_PENDING_SIGNALS};

/// Exit status sent when the program could not be started at all.
pub const START_FAILED_STATUS: u32 = 1;

/// An accepted `x11-req`.
#[derive(Clone, Debug)]
pub struct X11Request {
    pub screen: u32,
    pub protocol: String,
    pub cookie: Vec<u8>,
}

/// What a `shell`, `exec` or `subsystem` request runs.
#[derive(Clone, Debug)]
pub struct Program {
    pub argv: Vec<String>,
    pub env: Vec<String>,
}

/// Why a request was refused in the channel's phase.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("the program has already been requested")]
    Started,
    #[error("asked for twice")]
    Twice,
    #[error("more than {MAX_ENV_VARS} environment variables")]
    TooManyVariables,
    #[error("more than {MAX_PENDING_SIGNALS} signals waiting for the program to start")]
    TooManySignals,
}

/// What the handler recorded for the task.
#[derive(Default)]
struct Requests {
    pty: Option<Terminal>,
    env: Vec<String>,
    x11: Option<X11Request>,
    agent: bool,
    program: Option<Program>,
    /// The latest `window-change` not yet applied.
    size: Option<(u32, u32)>,
    signals: VecDeque<String>,
}

/// Requests on their way from the handler to the task.
#[derive(Default)]
struct Inbox {
    requests: Mutex<Requests>,
    changed: Notify,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, Requests> {
        self.requests.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut Requests)) {
        f(&mut self.lock());
        self.changed.notify_one();
    }

    /// Waits for a change, then takes what `take` returns (looking once before waiting).
    async fn next<T>(&self, mut take: impl FnMut(&mut Requests) -> Option<T>) -> T {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(v) = take(&mut self.lock()) {
                return v;
            }
            changed.await;
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Requested,
    Started,
}

/// A session channel as the handler sees it.
pub struct SessionChannel {
    /// The audit recording, once the program runs (stdin is recorded as it arrives).
    recording: Arc<std::sync::OnceLock<crate::audit::Recording>>,
    phase: Phase,
    inbox: Arc<Inbox>,
    stdin: InboundTx,
    /// Cancelled when the client closes the channel.
    closed: CancellationToken,
    activity: Arc<Activity>,
    pty: bool,
    x11: bool,
    agent: bool,
    env_count: usize,
}

impl SessionChannel {
    /// A new channel with its first window reserved from the connection's budget, and its
    /// task started; `Err` when the budget cannot cover the window.
    pub fn open(
        conn: &Arc<ConnCtx>,
        handle: Handle,
        channel: Channel<Msg>,
    ) -> Result<Self, BudgetExhausted> {
        let (tx, rx) = flow::inbound(&conn.buffers)?;
        tx.set_granter(Granter::new(handle.clone(), channel.id()));
        let me = Self {
            recording: Arc::default(),
            phase: Phase::Requested,
            inbox: Arc::default(),
            stdin: tx,
            closed: CancellationToken::new(),
            activity: Arc::default(),
            pty: false,
            x11: false,
            agent: false,
            env_count: 0,
        };
        // Requests and data reach us through the handler; the read half is dropped so russh
        // never waits on it.
        let (_read, write) = channel.split();
        let task = Task {
            conn: Arc::clone(conn),
            handle,
            write,
            inbox: Arc::clone(&me.inbox),
            closed: me.closed.clone(),
            activity: Arc::clone(&me.activity),
            recording: Arc::clone(&me.recording),
            _in_use: conn.in_use(),
        };
        conn.tasks.spawn(task.run(rx));
        Ok(me)
    }

    fn requested(&self) -> Result<(), Refused> {
        match self.phase {
            Phase::Requested => Ok(()),
            Phase::Started => Err(Refused::Started),
        }
    }

    pub fn has_pty(&self) -> bool {
        self.pty
    }

    pub fn pty(&mut self, t: Terminal) -> Result<(), Refused> {
        self.requested()?;
        if self.pty {
            return Err(Refused::Twice);
        }
        self.pty = true;
        self.inbox.update(|r| r.pty = Some(t));
        Ok(())
    }

    pub fn env(&mut self, var: String) -> Result<(), Refused> {
        self.requested()?;
        if self.env_count >= MAX_ENV_VARS {
            return Err(Refused::TooManyVariables);
        }
        self.env_count += 1;
        self.inbox.update(|r| r.env.push(var));
        Ok(())
    }

    pub fn x11(&mut self, req: X11Request) -> Result<(), Refused> {
        self.requested()?;
        if self.x11 {
            return Err(Refused::Twice);
        }
        self.x11 = true;
        self.inbox.update(|r| r.x11 = Some(req));
        Ok(())
    }

    pub fn agent(&mut self) -> Result<(), Refused> {
        self.requested()?;
        if self.agent {
            return Err(Refused::Twice);
        }
        self.agent = true;
        self.inbox.update(|r| r.agent = true);
        Ok(())
    }

    /// The program request: Requested → Starting.
    pub fn start(&mut self, program: Program) -> Result<(), Refused> {
        self.requested()?;
        self.phase = Phase::Started;
        self.inbox.update(|r| r.program = Some(program));
        Ok(())
    }

    /// `window-change`: the latest size is kept until the terminal can take it.
    pub fn resize(&self, cols: u32, rows: u32) {
        self.inbox.update(|r| r.size = Some((cols, rows)));
    }

    /// A signal for the program: dropped before a program is requested (there is none to
    /// signal), kept until it runs, then delivered.
    pub fn signal(&self, name: String) -> Result<(), Refused> {
        if self.phase == Phase::Requested {
            return Ok(());
        }
        let mut refused = false;
        self.inbox.update(|r| {
            if r.signals.len() >= MAX_PENDING_SIGNALS {
                refused = true;
            } else {
                r.signals.push_back(name);
            }
        });
        if refused {
            Err(Refused::TooManySignals)
        } else {
            Ok(())
        }
    }

    /// Data for the program (within the window russh enforces): queued, never waits.
    pub fn data(&self, data: &[u8]) {
        self.activity.touch();
        crate::metrics::get().bytes.from_client(data.len());
        self.stdin.push(data);
    }

    /// The client's EOF. On a terminal it is not passed on, as sshd does: closing the
    /// terminal would hang the program up and lose its output (`ssh -tt host cmd </dev/null`);
    /// on a terminal, end of input is the user's ^D.
    pub fn eof(&self) {
        if !self.pty {
            self.stdin.eof();
        }
    }

    /// The client closed the channel.
    pub fn close(self) {
        self.closed.cancel();
        self.stdin.eof();
    }
}

/// The channel's task and what it needs.
struct Task {
    conn: Arc<ConnCtx>,
    handle: Handle,
    write: ChannelWriteHalf<Msg>,
    inbox: Arc<Inbox>,
    closed: CancellationToken,
    activity: Arc<Activity>,
    recording: Arc<std::sync::OnceLock<crate::audit::Recording>>,
    /// Counts the channel for `unusedConnection` while the task lives.
    _in_use: InUse,
}

/// What the task took from the inbox when the program was requested.
struct Prepared {
    program: Program,
    tty: Option<Terminal>,
    env: Vec<String>,
    x11: Option<X11Request>,
    agent: bool,
}

/// How the Running phase ended.
enum Ended {
    /// The program's output ended: it exited.
    Exited,
    /// The client closed the channel or the connection is ending.
    Closed,
    /// A timeout closed it (which one).
    TimedOut(&'static str),
}

impl Task {
    fn id(&self) -> ChannelId {
        self.write.id()
    }

    async fn run(self, stdin: InboundRx) {
        let _open =
            crate::metrics::GaugeGuard::new(&crate::metrics::get().current_sessions, vec![]);
        // Requested.
        let prepared = tokio::select! {
            p = self.inbox.next(|r| r.program.take().map(|program| Prepared {
                program,
                tty: r.pty.take(),
                env: std::mem::take(&mut r.env),
                x11: r.x11.take(),
                agent: r.agent,
            })) => p,
            () = self.closed.cancelled() => return,
            () = self.conn.cancel.cancelled() => return,
        };

        // Starting: not cancelled midway; requests that come meanwhile stay in the inbox.
        let mut spec = self.spec(prepared).await;
        let started = self.start(&mut spec).await;
        let (session_container, process) = match started {
            Ok(x) => x,
            Err(StartError::Closing) if self.conn.shared.shutdown.is_cancelled() => {
                self.shutdown_notice().await;
                return;
            }
            Err(e) => {
                let e = crate::backend::one_line(&e);
                tracing::warn!(code = "BACKEND_START_FAILED", connection_id = %self.conn.id, error = %e, "program start failed");
                self.say(
                    spec.tty.is_some(),
                    &format!("cannot start your container: {e}"),
                )
                .await;
                self.finish(&ExitReport::Status(START_FAILED_STATUS)).await;
                return;
            }
        };

        // Running.
        self.record(&spec);
        let Process {
            stdin: writer,
            output,
            control,
        } = process;
        // Recorded as delivered: what the client sent before the program started too.
        let recording = Arc::clone(&self.recording);
        let stdin_task = self.conn.tasks.spawn(stdin.pump(writer, move |chunk| {
            if let Some(r) = recording.get() {
                r.stdin(chunk);
            }
        }));
        let ended = self.running(output, &control, spec.tty.is_some()).await;

        // Closing.
        match ended {
            Ended::Exited => {
                let exit = control.wait().await;
                tracing::debug!(connection_id = %self.conn.id, %exit, "program ended");
                if let Some(r) = self.recording.get() {
                    r.exit(&exit);
                }
                self.finish(&exit).await;
            }
            Ended::TimedOut(why) => {
                tracing::info!(code = "SECURITY_SESSION_TIME_LIMIT", connection_id = %self.conn.id, channel = %self.id(), limit = why, "session closed: time limit");
                if let Err(e) = control.signal("KILL").await {
                    tracing::debug!(connection_id = %self.conn.id, error = %e, "KILL after the timeout not delivered");
                }
                let _ = self.write.close().await;
            }
            Ended::Closed => {
                if self.conn.shared.shutdown.is_cancelled() && !self.closed.is_cancelled() {
                    self.shutdown_notice().await;
                }
            }
        }
        stdin_task.abort();
        if let Some(own) = session_container {
            own.remove().await;
        }
        if matches!(ended, Ended::TimedOut(_)) {
            // The connection goes with its last channel.
            let conn = Arc::clone(&self.conn);
            drop(self);
            conn.close_if_unused("session timeout");
        }
    }

    /// Starts the audit recording of the program (`audit`), when configured.
    fn record(&self, spec: &ProgramSpec) {
        let Some(recorder) = &self.conn.shared.audit else {
            return;
        };
        let header = crate::audit::Header {
            cols: spec.tty.as_ref().map_or(0, |t| t.cols),
            rows: spec.tty.as_ref().map_or(0, |t| t.rows),
            term: spec.tty.as_ref().map(|t| t.term.clone()),
            shell: self.conn.settings().shell_command().first().cloned(),
            command: spec.argv.join(" "),
            remote: self.conn.peer.ip().to_string(),
            user: self.conn.user().map(|u| u.name.clone()),
        };
        let log = self.conn.audit_log();
        if let Some(r) = recorder.start(&self.conn.id, self.id().into(), &header, log) {
            let _ = self.recording.set(r);
        }
    }

    /// The program's argv and environment: the client's variables, X11's and the agent
    /// socket's (set up now, through the in-container agent), and TERM.
    async fn spec(&self, p: Prepared) -> ProgramSpec {
        let mut env = p.env;
        let tty = p.tty;
        let on_tty = tty.is_some();
        if let Some(x11) = p.x11 {
            match super::listen::x11_env(&self.conn, &x11).await {
                Ok(vars) => env.extend(vars),
                Err(e) => {
                    tracing::warn!(code = "FORWARD_SETUP_FAILED", connection_id = %self.conn.id, error = %e, "X11 forwarding not set up");
                    self.say(
                        on_tty,
                        &format!("containerssh: X11 forwarding unavailable: {e}"),
                    )
                    .await;
                }
            }
        }
        if p.agent {
            match super::listen::agent_socket(&self.conn).await {
                Ok(path) => env.push(format!("SSH_AUTH_SOCK={path}")),
                Err(e) => {
                    tracing::warn!(code = "FORWARD_SETUP_FAILED", connection_id = %self.conn.id, error = %e, "agent forwarding not set up");
                    self.say(
                        on_tty,
                        &format!("containerssh: agent forwarding unavailable: {e}"),
                    )
                    .await;
                }
            }
        }
        env.extend(p.program.env);
        if let Some(t) = &tty {
            env.push(format!("TERM={}", t.term));
        }
        let login = self
            .conn
            .user()
            .map(|u| Arc::clone(&u.metadata))
            .unwrap_or_default();
        ProgramSpec {
            argv: p.program.argv,
            env,
            tty,
            login,
        }
    }

    /// Starts the program: an exec in the connection's container, or a container of its own.
    /// The terminal's size is the latest the client sent, as late as it can be: a window
    /// change while the container started sizes the terminal from the program's start.
    async fn start(
        &self,
        spec: &mut ProgramSpec,
    ) -> Result<(Option<Arc<dyn Container>>, Process), StartError> {
        let backend = self.conn.backend();
        match backend.mode() {
            ExecutionMode::Connection | ExecutionMode::Persistent => {
                let container = self.conn.container().await?;
                self.latest_size(spec);
                Ok((None, container.exec(spec).await?))
            }
            ExecutionMode::Session => {
                self.latest_size(spec);
                let (own, p) = backend.run_session(&self.conn.meta(), spec).await?;
                Ok((Some(own), p))
            }
        }
    }

    fn latest_size(&self, spec: &mut ProgramSpec) {
        if let Some(t) = spec.tty.as_mut() {
            if let Some((cols, rows)) = self.inbox.lock().size.take() {
                (t.cols, t.rows) = (cols, rows);
            }
        }
    }

    /// Pumps output, applies resizes and signals, and enforces the timeouts until the
    /// program's output ends or the channel is closed.
    async fn running(&self, output: ProcessOutput, control: &ProcessControl, tty: bool) -> Ended {
        let out = pump_output(output, &self.write, &self.activity, self.recording.get());
        tokio::pin!(out);
        let controls = async {
            loop {
                let (size, signals) = self
                    .inbox
                    .next(|r| {
                        (r.size.is_some() || !r.signals.is_empty())
                            .then(|| (r.size.take(), std::mem::take(&mut r.signals)))
                    })
                    .await;
                if let Some((cols, rows)) = size {
                    if let Some(r) = self.recording.get() {
                        r.resize(cols, rows);
                    }
                    if let Err(e) = control.resize(rows, cols).await {
                        tracing::debug!(connection_id = %self.conn.id, error = %e, "resize failed");
                    }
                }
                for name in signals {
                    if let Err(e) = control.signal(&name).await {
                        tracing::info!(code = "BACKEND_SIGNAL_FAILED", connection_id = %self.conn.id, signal = %name, error = %e, "signal not delivered");
                    }
                }
            }
        };
        tokio::pin!(controls);
        let timeouts = &self.conn.settings().policy.timeouts;
        let mut limits = Enforcer::new(timeouts, Instant::now());
        loop {
            let step = async {
                match limits.as_mut() {
                    Some(l) => l.next(&self.activity).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                r = &mut out => {
                    if let Err(e) = r {
                        tracing::debug!(connection_id = %self.conn.id, error = %e, "output stream ended with an error");
                    }
                    return Ended::Exited;
                }
                () = &mut controls => {}
                () = self.closed.cancelled() => return Ended::Closed,
                () = self.conn.cancel.cancelled() => return Ended::Closed,
                s = step => match s {
                    Step::Warn(line) => {
                        tracing::info!(code = "SECURITY_SESSION_TIME_LIMIT_WARNING", connection_id = %self.conn.id, channel = %self.id(), warning = %line, "session time limit warning");
                        self.say(tty, &line).await;
                    }
                    Step::Signal(name) => {
                        if let Err(e) = control.signal(&name).await {
                            tracing::info!(code = "BACKEND_SIGNAL_FAILED", connection_id = %self.conn.id, signal = %name, error = %e, "timeout signal not delivered");
                        }
                    }
                    Step::Close(why) => return Ended::TimedOut(why),
                },
            }
        }
    }

    /// One line on the session's stderr (on a terminal, from the start of a line).
    async fn say(&self, tty: bool, line: &str) {
        let text = if tty {
            format!("\r\n{line}\r\n")
        } else {
            format!("{line}\n")
        };
        let _ = self.write.extended_data_bytes(1, Bytes::from(text)).await;
    }

    /// Reports how the program ended, then EOF and close. The exit report goes first: a
    /// client that has finished its own side answers our EOF with its CLOSE at once
    /// (OpenSSH's ControlMaster does), and once that CLOSE is in, the connection drops
    /// anything more we queue for the channel: an exit status sent after the EOF was lost
    /// under load, and the mux client exited 255.
    async fn finish(&self, exit: &ExitReport) {
        match exit {
            ExitReport::Status(code) => {
                let _ = self.write.exit_status(*code).await;
            }
            ExitReport::Signal { name } => {
                let _ = self
                    .handle
                    .exit_signal_request(
                        self.id(),
                        russh::Sig::Custom(name.clone()),
                        false,
                        String::new(),
                        String::new(),
                    )
                    .await;
            }
        }
        let _ = self.write.eof().await;
        let _ = self.write.close().await;
    }

    async fn shutdown_notice(&self) {
        let _ = self
            .write
            .extended_data_bytes(
                1,
                Bytes::from_static(b"\r\nThe server is shutting down.\r\n"),
            )
            .await;
        let _ = self.write.close().await;
    }
}

/// Copies the program's output to the channel; each write waits for the client's window.
async fn pump_output(
    mut output: ProcessOutput,
    write: &ChannelWriteHalf<Msg>,
    activity: &Activity,
    recording: Option<&crate::audit::Recording>,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut stdout = write.make_writer();
    let mut stderr = write.make_writer_ext(Some(1));
    while let Some((kind, data)) = output.next().await? {
        activity.touch();
        crate::metrics::get().bytes.to_client(data.len());
        if let Some(r) = recording {
            r.output(kind == OutputKind::Stderr, &data);
        }
        match kind {
            OutputKind::Stdout => stdout.write_all(&data).await?,
            OutputKind::Stderr => stderr.write_all(&data).await?,
        }
    }
    Ok(())
}
