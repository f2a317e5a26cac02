//! One program in a pod as the SSH side sees it: an exec (connection and persistent modes) or
//! an attach (session mode) split into a stdin writer, an output stream and a control handle.
//!
//! The WebSocket's sending half is owned by one task that takes stdin chunks, stdin EOF,
//! resizes and the final Close from bounded queues, so a slow API server holds the writer
//! back (through the SSH stdin queue's flow rules) instead of growing memory.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWrite;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::PollSender;

use super::client::KubeClient;
use super::exec::{self, ExecReceiver, ExecSender, ExitOutcome, Output, STDIN_CHUNK};
use super::pods;
use crate::backend::docker::StreamKind;
use crate::backend::process::{keep, reported_pid, Captured, ControlError, PidReceiver};
use crate::backend::{signal_number, ExitReport};

/// Stdin chunks (of at most [`STDIN_CHUNK`] bytes) queued for the WebSocket writer.
const STDIN_QUEUE_CHUNKS: usize = 4;
/// Resizes and the Close queued for the WebSocket writer.
const CONTROL_QUEUE: usize = 8;
/// How long the writer spends sending our Close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Exit status reported when the cluster cannot tell one (ContainerSSH sends 137 too).
pub const UNKNOWN_EXIT_STATUS: u32 = 137;

/// Where a program runs.
#[derive(Clone, Debug)]
pub struct PodRef {
    pub namespace: String,
    pub pod: String,
    pub container: String,
}

enum Cmd {
    Resize { cols: u16, rows: u16 },
    Close,
}

/// The program's stdin as an [`AsyncWrite`]; shutting it down sends stdin EOF (v5; on v4 the
/// EOF cannot be passed on and is logged).
pub struct KubeStdin {
    tx: PollSender<Bytes>,
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the exec stream is closed")
}

impl AsyncWrite for KubeStdin {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        match self.tx.poll_reserve(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(_)) => return Poll::Ready(Err(closed())),
            Poll::Ready(Ok(())) => {}
        }
        let n = buf.len().min(STDIN_CHUNK);
        self.tx
            .send_item(Bytes::copy_from_slice(&buf[..n]))
            .map_err(|_| closed())?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tx.close();
        Poll::Ready(Ok(()))
    }
}

/// The task owning the sending half: stdin, stdin EOF, resizes, and Close at the end.
async fn write_loop(
    mut sender: ExecSender,
    mut stdin: mpsc::Receiver<Bytes>,
    mut cmds: mpsc::Receiver<Cmd>,
) {
    let mut stdin_open = true;
    loop {
        tokio::select! {
            data = stdin.recv(), if stdin_open => match data {
                Some(b) => {
                    if let Err(e) = sender.send_stdin(&b).await {
                        tracing::debug!(error = %e, "stdin not delivered");
                        stdin_open = false;
                    }
                }
                None => {
                    stdin_open = false;
                    if !sender.protocol().can_close_stdin() {
                        tracing::info!("stdin EOF not passed on: the API server speaks only v4.channel.k8s.io, which cannot close stdin");
                    }
                    if let Err(e) = sender.close_stdin().await {
                        tracing::debug!(error = %e, "stdin EOF not delivered");
                    }
                }
            },
            cmd = cmds.recv() => match cmd {
                Some(Cmd::Resize { cols, rows }) => {
                    if let Err(e) = sender.resize(cols, rows).await {
                        tracing::debug!(error = %e, "resize not delivered");
                    }
                }
                Some(Cmd::Close) | None => {
                    let _ = tokio::time::timeout(CLOSE_TIMEOUT, sender.close()).await;
                    return;
                }
            },
        }
    }
}

/// The stream's output; when it ends, the outcome goes to the control handle and the writer
/// is told to close.
pub struct KubeOutput {
    rx: Option<ExecReceiver>,
    outcome: watch::Sender<Option<ExitOutcome>>,
    cmds: mpsc::Sender<Cmd>,
}

impl KubeOutput {
    pub(crate) async fn next(&mut self) -> Option<(StreamKind, Bytes)> {
        let rx = self.rx.as_mut()?;
        match rx.next_output().await {
            Some(Output::Stdout(b)) => Some((StreamKind::Stdout, b)),
            Some(Output::Stderr(b)) => Some((StreamKind::Stderr, b)),
            None => {
                let rx = self.rx.take()?;
                self.outcome.send_replace(Some(rx.exit().await));
                // A full queue means the writer is busy; it closes when the channel ends.
                let _ = self.cmds.try_send(Cmd::Close);
                None
            }
        }
    }
}

/// How the program's exit status is learned.
enum Exit {
    /// Exec: the stream's channel-3 `Status`.
    Stream(watch::Receiver<Option<ExitOutcome>>),
    /// Attach: the console container's terminated state in the pod.
    Container { within: Duration },
}

/// The agent's view of one program: where it is and its PID.
struct AgentCtl {
    path: String,
    pid: PidReceiver,
}

/// Resize, signal and wait for a program in a pod.
pub struct KubeControl {
    client: KubeClient,
    at: PodRef,
    cmds: mpsc::Sender<Cmd>,
    exit: Exit,
    agent: Option<AgentCtl>,
    last_signal: Arc<Mutex<Option<String>>>,
    signal_timeout: Duration,
    window_timeout: Duration,
}

/// The pieces [`split`] makes of a stream.
pub struct Parts {
    pub stdin: KubeStdin,
    pub output: KubeOutput,
    pub control: KubeControl,
}

/// Timeouts for one program.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub signal: Duration,
    pub window: Duration,
    /// Session mode: how long the console container may take to show as terminated.
    pub exit: Duration,
}

/// Splits an exec or attach session into stdin, output and control.
#[allow(clippy::too_many_arguments)]
pub fn split(
    session: exec::ExecSession,
    client: &KubeClient,
    at: PodRef,
    attach: bool,
    agent_path: Option<&str>,
    pid: PidReceiver,
    limits: Limits,
) -> Parts {
    let (sender, receiver) = session.split();
    let (stdin_tx, stdin_rx) = mpsc::channel(STDIN_QUEUE_CHUNKS);
    let (cmd_tx, cmd_rx) = mpsc::channel(CONTROL_QUEUE);
    tokio::spawn(write_loop(sender, stdin_rx, cmd_rx));
    let (outcome_tx, outcome_rx) = watch::channel(None);
    let exit = if attach {
        Exit::Container {
            within: limits.exit,
        }
    } else {
        Exit::Stream(outcome_rx)
    };
    Parts {
        stdin: KubeStdin {
            tx: PollSender::new(stdin_tx),
        },
        output: KubeOutput {
            rx: Some(receiver),
            outcome: outcome_tx,
            cmds: cmd_tx.clone(),
        },
        control: KubeControl {
            client: client.clone(),
            at,
            cmds: cmd_tx,
            exit,
            agent: agent_path.map(|p| AgentCtl {
                path: p.to_string(),
                pid,
            }),
            last_signal: Arc::new(Mutex::new(None)),
            signal_timeout: limits.signal,
            window_timeout: limits.window,
        },
    }
}

/// Runs a helper program in a pod to completion: optional stdin (then EOF), output kept up to
/// the capture limit. Bounded by `limit`.
pub async fn capture(
    client: &KubeClient,
    at: &PodRef,
    argv: &[String],
    stdin: Option<&[u8]>,
    limit: Duration,
) -> Result<Captured, String> {
    let run = async {
        let mut s = exec::exec(
            client,
            &at.namespace,
            &at.pod,
            &at.container,
            argv,
            false,
            stdin.is_some(),
        )
        .await
        .map_err(|e| e.to_string())?;
        if let Some(data) = stdin {
            s.send_stdin(data).await.map_err(|e| e.to_string())?;
            s.close_stdin().await.map_err(|e| e.to_string())?;
        }
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(out) = s.next_output().await {
            match out {
                Output::Stdout(b) => keep(&mut stdout, &b),
                Output::Stderr(b) => keep(&mut stderr, &b),
            }
        }
        match s.exit().await {
            ExitOutcome::Exited(code) => Ok(Captured {
                code: i64::from(code),
                stdout,
                stderr,
            }),
            ExitOutcome::Failed { reason, message } => Err(format!("{reason}: {message}")),
            ExitOutcome::Lost(why) => Err(why),
        }
    };
    tokio::time::timeout(limit, run)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {limit:?}")))
}

impl KubeControl {
    pub async fn resize(&self, rows: u32, cols: u32) -> Result<(), ControlError> {
        let dim = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        let cmd = Cmd::Resize {
            cols: dim(cols),
            rows: dim(rows),
        };
        match tokio::time::timeout(self.window_timeout, self.cmds.send(cmd)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(ControlError::Backend("the stream is closed".into())),
            Err(_) => Err(ControlError::Backend("resize timed out".into())),
        }
    }

    pub async fn signal(&self, name: &str) -> Result<(), ControlError> {
        if signal_number(name).is_none() {
            return Err(ControlError::UnknownSignal(name.into()));
        }
        let Some(agent) = &self.agent else {
            return Err(ControlError::SignalUnsupported(
                "kubernetes.pod.disableAgent",
            ));
        };
        let pid = reported_pid(&agent.pid, self.signal_timeout)
            .await
            .ok_or(ControlError::NoPid)?;
        if let Ok(mut last) = self.last_signal.lock() {
            *last = Some(name.to_string());
        }
        let argv = [
            &agent.path,
            "signal",
            "--pid",
            &pid.to_string(),
            "--signal",
            name,
        ]
        .map(String::from);
        let out = capture(&self.client, &self.at, &argv, None, self.signal_timeout)
            .await
            .map_err(ControlError::Backend)?;
        if out.code != 0 {
            return Err(ControlError::Agent(out.message()));
        }
        Ok(())
    }

    /// How the program ended. Call after its output stream has ended.
    pub async fn wait(&self) -> ExitReport {
        let code = match &self.exit {
            Exit::Stream(rx) => {
                let mut rx = rx.clone();
                let outcome = match rx.wait_for(Option::is_some).await {
                    Ok(o) => o.clone(),
                    Err(_) => None,
                };
                match outcome {
                    Some(ExitOutcome::Exited(c)) => c,
                    Some(ExitOutcome::Failed { reason, message }) => {
                        tracing::warn!(pod = %self.at.pod, %reason, %message, "the exec failed");
                        return ExitReport::Status(UNKNOWN_EXIT_STATUS);
                    }
                    Some(ExitOutcome::Lost(why)) => {
                        tracing::warn!(pod = %self.at.pod, %why, "the exec ended without an exit status");
                        return ExitReport::Status(UNKNOWN_EXIT_STATUS);
                    }
                    None => return ExitReport::Status(UNKNOWN_EXIT_STATUS),
                }
            }
            Exit::Container { within } => {
                let at = &self.at;
                match pods::wait_exit(&self.client, &at.namespace, &at.pod, &at.container, *within)
                    .await
                {
                    Ok(c) => u32::try_from(c).unwrap_or(UNKNOWN_EXIT_STATUS),
                    Err(e) => {
                        tracing::warn!(pod = %at.pod, error = %e, "cannot read the exit status");
                        return ExitReport::Status(UNKNOWN_EXIT_STATUS);
                    }
                }
            }
        };
        // Death by signal N shows as 128+N, the same as `exit 128+N`. The agent knows which it
        // was while the pod runs (exec); otherwise only a signal we sent tells.
        if matches!(self.exit, Exit::Stream(_)) {
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

    /// Asks the agent whether an exec'd program that exited with `code` died of a signal.
    async fn exit_signal(&self, code: u32) -> Option<String> {
        let agent = self.agent.as_ref()?;
        if !(129..=128 + 64).contains(&code) {
            return None;
        }
        let pid = (*agent.pid.as_ref()?.borrow())?;
        let argv = [&agent.path, "exit-info", "--pid", &pid.to_string()].map(String::from);
        match capture(&self.client, &self.at, &argv, None, self.signal_timeout).await {
            Ok(out) if out.code == 0 => {
                let name = String::from_utf8_lossy(&out.stdout).trim().to_string();
                signal_number(&name).map(|_| name)
            }
            Ok(out) => {
                tracing::debug!(message = %out.message(), "agent exit-info failed");
                None
            }
            Err(e) => {
                tracing::debug!(error = %e, "agent exit-info failed");
                None
            }
        }
    }
}
