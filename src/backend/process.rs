//! A started program, whichever backend runs it: stdin as a writer, output as chunks of
//! stdout and stderr with the agent's PID report taken off the front, and a control that
//! resizes, signals and waits.
//!
//! Backends supply what only they can do ([`Program`]: resize, the raw exit code, a signal
//! without the agent); everything about the agent is here and in [`super::agent`], once:
//! signals go to the PID the agent reported, and an exit code of 128+N is told apart from a
//! death by signal N by asking the agent (exec'd programs) or by the signal we sent.

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWrite;
use tokio::sync::watch;

use super::{agent, signal_number, BoxFuture, Container, ExitReport, OutputKind};

/// The program's stdin. Shutting it down passes EOF on (where the backend can).
pub type ProcessInput = Box<dyn AsyncWrite + Send + Unpin>;

/// A program's stdin as an [`AsyncWrite`] over a bounded queue of chunks that a backend's
/// task delivers (the Kubernetes exec WebSocket's writer, the agent's stream): a write waits
/// for room in the queue; shutting down (or dropping) closes the queue, which the task takes
/// as stdin EOF.
pub struct QueuedStdin {
    tx: tokio_util::sync::PollSender<Bytes>,
    /// The largest chunk one write queues.
    chunk: usize,
}

impl QueuedStdin {
    pub(crate) fn new(tx: tokio::sync::mpsc::Sender<Bytes>, chunk: usize) -> Self {
        Self {
            tx: tokio_util::sync::PollSender::new(tx),
            chunk,
        }
    }
}

fn stdin_closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the program's stdin is closed")
}

impl AsyncWrite for QueuedStdin {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        use std::task::Poll;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        match self.tx.poll_reserve(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(_)) => return Poll::Ready(Err(stdin_closed())),
            Poll::Ready(Ok(())) => {}
        }
        let chunk = buf.get(..self.chunk).unwrap_or(buf);
        let n = chunk.len();
        let item = Bytes::copy_from_slice(chunk);
        self.tx.send_item(item).map_err(|_| stdin_closed())?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.tx.close();
        std::task::Poll::Ready(Ok(()))
    }
}

/// Exit status reported when the backend cannot tell one (ContainerSSH sends 137 too).
pub const UNKNOWN_EXIT_STATUS: u32 = 137;

/// A started program: its stdin, its output and a handle to control it.
pub struct Process {
    pub stdin: ProcessInput,
    pub output: ProcessOutput,
    pub control: ProcessControl,
}

/// Where a program's (or an agent command's) output comes from.
pub trait OutputSource: Send {
    /// The next chunk; `None` at its end.
    fn next(&mut self) -> BoxFuture<'_, io::Result<Option<(OutputKind, Bytes)>>>;
}

/// What only the backend can do for a running program.
pub trait Program: Send + Sync {
    /// Resizes its terminal (a size the client knows: both dimensions above 0).
    fn resize(&self, rows: u32, cols: u32) -> BoxFuture<'_, Result<(), ControlError>>;

    /// Its exit code, once its output has ended.
    fn exit_code(&self) -> BoxFuture<'_, Result<u32, ControlError>>;

    /// Delivers a signal without the agent, where the backend can (a session container's
    /// main process). `key` names the setting that turned the agent off, for the refusal.
    fn signal_directly<'a>(
        &'a self,
        name: &'a str,
        key: &'static str,
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        let _ = name;
        Box::pin(async move { Err(ControlError::SignalUnsupported(key)) })
    }

    /// Whether it was exec'd into a running container: only then can the agent say whether
    /// an exit code of 128+N was a death by signal N.
    fn is_exec(&self) -> bool;

    /// The signal that killed it, when the backend knows (after [`Self::exit_code`]).
    fn killed_by(&self) -> Option<String> {
        None
    }
}

/// A program's output, with the agent's PID report taken off the front.
pub struct ProcessOutput {
    source: Box<dyn OutputSource>,
    /// Set while the 4 PID bytes the agent writes first are still being read.
    pid: Option<PidReport>,
}

struct PidReport {
    got: Vec<u8>,
    tx: watch::Sender<Option<u32>>,
}

/// The sending half of a PID report, present when the program runs under the agent.
pub(crate) type PidSender = Option<watch::Sender<Option<u32>>>;
/// Where control reads the PID the agent reported.
pub(crate) type PidReceiver = Option<watch::Receiver<Option<u32>>>;

/// A PID report channel when the program runs under the agent's `console --pid`.
pub(crate) fn pid_channel(agent: bool) -> (PidSender, PidReceiver) {
    if !agent {
        return (None, None);
    }
    let (tx, rx) = watch::channel(None);
    (Some(tx), Some(rx))
}

/// The PID the agent reported, waiting for the report up to `limit`.
async fn reported_pid(rx: &PidReceiver, limit: Duration) -> Option<u32> {
    let mut rx = rx.as_ref()?.clone();
    let waited = tokio::time::timeout(limit, rx.wait_for(Option::is_some)).await;
    match waited {
        Ok(Ok(pid)) => *pid,
        _ => None,
    }
}

impl ProcessOutput {
    pub(crate) fn new(source: Box<dyn OutputSource>, pid: PidSender) -> Self {
        Self {
            source,
            pid: pid.map(|tx| PidReport {
                got: Vec::with_capacity(4),
                tx,
            }),
        }
    }

    /// The next chunk of output; `None` when the program's output has ended.
    pub async fn next(&mut self) -> io::Result<Option<(OutputKind, Bytes)>> {
        loop {
            let item = self.source.next().await?;
            let Some(report) = self.pid.as_mut() else {
                return Ok(item);
            };
            match item {
                Some((OutputKind::Stdout, data)) => {
                    let take = (4 - report.got.len()).min(data.len());
                    report.got.extend(data.iter().take(take));
                    if let Ok(bytes) = <[u8; 4]>::try_from(report.got.as_slice()) {
                        report.tx.send_replace(Some(u32::from_le_bytes(bytes)));
                        self.pid = None;
                    }
                    let rest = data.slice(take..);
                    if !rest.is_empty() {
                        return Ok(Some((OutputKind::Stdout, rest)));
                    }
                }
                None => {
                    // Ended before the agent reported: dropping the sender tells waiters.
                    self.pid = None;
                    return Ok(None);
                }
                other => return Ok(other),
            }
        }
    }
}

/// Why a resize or signal did not happen; `Display` is one line for the log.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("signals to programs started with exec need the in-container agent ({0} is set)")]
    SignalUnsupported(&'static str),
    #[error("the agent did not report the program's process ID")]
    NoPid,
    #[error("the agent could not deliver the signal: {0}")]
    Agent(String),
    #[error("unknown signal {0}")]
    UnknownSignal(String),
    #[error("{0}")]
    Backend(#[source] super::Cause),
    #[error("{0} timed out")]
    Timeout(&'static str),
}

/// The agent's view of one program: the container to run `agent signal` in, and the PID.
struct AgentCtl {
    container: Arc<dyn Container>,
    pid: PidReceiver,
}

/// Resize, signal and wait for a started program.
pub struct ProcessControl {
    program: Box<dyn Program>,
    agent: Option<AgentCtl>,
    /// The setting that turns the agent off, for refusals.
    disable_agent_key: &'static str,
    last_signal: Mutex<Option<String>>,
    /// How long a signal (and the agent's exit record) may take.
    signal_timeout: Duration,
}

impl ProcessControl {
    /// The control of a program that runs under the agent in `container` (reporting its PID
    /// to `pid`) when `pid` is set.
    pub(crate) fn new(
        program: Box<dyn Program>,
        container: Arc<dyn Container>,
        pid: PidReceiver,
        disable_agent_key: &'static str,
        signal_timeout: Duration,
    ) -> Self {
        let agent =
            (pid.is_some() && container.agent().is_some()).then_some(AgentCtl { container, pid });
        Self {
            program,
            agent,
            disable_agent_key,
            last_signal: Mutex::new(None),
            signal_timeout,
        }
    }

    pub async fn resize(&self, rows: u32, cols: u32) -> Result<(), ControlError> {
        if rows == 0 || cols == 0 {
            // An unknown size: the terminal keeps the one it has.
            return Ok(());
        }
        self.program.resize(rows, cols).await
    }

    fn remember(&self, name: &str) {
        if let Ok(mut last) = self.last_signal.lock() {
            *last = Some(name.to_string());
        }
    }

    pub async fn signal(&self, name: &str) -> Result<(), ControlError> {
        if signal_number(name).is_none() {
            return Err(ControlError::UnknownSignal(name.into()));
        }
        let Some(agent) = &self.agent else {
            self.remember(name);
            return self
                .program
                .signal_directly(name, self.disable_agent_key)
                .await;
        };
        let pid = reported_pid(&agent.pid, self.signal_timeout)
            .await
            .ok_or(ControlError::NoPid)?;
        self.remember(name);
        let sent = agent::signal(agent.container.as_ref(), pid, name);
        tokio::time::timeout(self.signal_timeout, sent)
            .await
            .map_err(|_| ControlError::Timeout("the agent's signal"))?
    }

    /// How the program ended. Call after its output stream has ended.
    pub async fn wait(&self) -> ExitReport {
        let code = match self.program.exit_code().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(code = "BACKEND_EXIT_STATUS_UNKNOWN", error = %e, "cannot read exit status");
                return ExitReport::Status(UNKNOWN_EXIT_STATUS);
            }
        };
        if let Some(name) = self.program.killed_by() {
            return ExitReport::Signal { name };
        }
        // Death by signal N shows as 128+N, the same as `exit 128+N`. The agent knows which it
        // was while the container runs (exec'd programs); otherwise only a signal we sent
        // tells.
        if self.program.is_exec() {
            if let Some(name) = self.exit_signal(code).await {
                return ExitReport::Signal { name };
            }
        }
        let last = self.last_signal.lock().ok().and_then(|l| l.clone());
        if let Some(name) = last {
            if signal_number(&name).map(|n| 128 + n as u32) == Some(code) {
                return ExitReport::Signal { name };
            }
        }
        ExitReport::Status(code)
    }

    /// Asks the agent whether a program that exited with `code` died of a signal.
    async fn exit_signal(&self, code: u32) -> Option<String> {
        let agent = self.agent.as_ref()?;
        if !(129..=128 + 64).contains(&code) {
            return None;
        }
        let pid = (*agent.pid.as_ref()?.borrow())?;
        let asked = agent::exit_signal(agent.container.as_ref(), pid);
        tokio::time::timeout(self.signal_timeout, asked)
            .await
            .ok()
            .flatten()
    }
}

/// What a helper program (`agent signal`, `exit-info`, `write-file`) printed and how it exited.
#[derive(Debug)]
pub struct Captured {
    pub code: i64,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Captured {
    /// Stderr (or stdout) as one line for error messages.
    pub fn message(&self) -> String {
        let text = if self.stderr.is_empty() {
            &self.stdout
        } else {
            &self.stderr
        };
        String::from_utf8_lossy(text).trim().to_string()
    }
}

/// Output kept from a helper program per stream.
pub const MAX_CAPTURE_BYTES: usize = 64 * 1024;

/// Appends `data` to `buf` up to [`MAX_CAPTURE_BYTES`].
pub(crate) fn keep(buf: &mut Vec<u8>, data: &[u8]) {
    let room = MAX_CAPTURE_BYTES.saturating_sub(buf.len());
    buf.extend_from_slice(data.get(..room).unwrap_or(data));
}
