//! One program in a pod as the SSH side sees it: an exec (connection and persistent modes) or
//! an attach (session mode) split into a stdin writer, an output stream and a control handle.
//!
//! The WebSocket's sending half is owned by one task that takes stdin chunks, stdin EOF,
//! resizes and the final Close from bounded queues, so a slow API server holds the writer
//! back (through the SSH stdin queue's flow rules) instead of growing memory.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::client::KubeClient;
use crate::backend::process::QueuedStdin;

use super::exec::{self, ExecError, ExecReceiver, ExecSender, ExitOutcome, Output, STDIN_CHUNK};
use super::pods;
use crate::backend::process::{
    keep, Captured, ControlError, OutputSource, Program, UNKNOWN_EXIT_STATUS,
};
use crate::backend::{BoxFuture, OutputKind};

/// Stdin chunks (of at most [`STDIN_CHUNK`] bytes) queued for the WebSocket writer.
const STDIN_QUEUE_CHUNKS: usize = 4;
/// Resizes and the Close queued for the WebSocket writer.
const CONTROL_QUEUE: usize = 8;
/// How long the writer spends sending our Close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

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
                        tracing::info!(
                            code = "KUBERNETES_STDIN_EOF_UNSUPPORTED",
                            "stdin EOF not passed on: the API server speaks only v4.channel.k8s.io, which cannot close stdin"
                        );
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

impl OutputSource for KubeOutput {
    fn next(&mut self) -> BoxFuture<'_, io::Result<Option<(OutputKind, Bytes)>>> {
        Box::pin(async move { Ok(self.next_chunk().await) })
    }
}

impl KubeOutput {
    async fn next_chunk(&mut self) -> Option<(OutputKind, Bytes)> {
        let rx = self.rx.as_mut()?;
        match rx.next_output().await {
            Some(Output::Stdout(b)) => Some((OutputKind::Stdout, b)),
            Some(Output::Stderr(b)) => Some((OutputKind::Stderr, b)),
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

/// What only the cluster can do for a program in a pod: resize and its exit code.
pub struct KubeProgram {
    client: KubeClient,
    at: PodRef,
    cmds: mpsc::Sender<Cmd>,
    exit: Exit,
    window_timeout: Duration,
}

/// The pieces [`split`] makes of a stream.
pub struct Parts {
    /// Shutting it down sends stdin EOF (v5; on v4 the EOF cannot be passed on and is logged).
    pub stdin: QueuedStdin,
    pub output: KubeOutput,
    pub program: KubeProgram,
}

/// Timeouts for one program.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub window: Duration,
    /// Session mode: how long the console container may take to show as terminated.
    pub exit: Duration,
}

/// Splits an exec or attach session into stdin, output and what controls it.
pub fn split(
    session: exec::ExecSession,
    client: &KubeClient,
    at: PodRef,
    attach: bool,
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
        stdin: QueuedStdin::new(stdin_tx, STDIN_CHUNK),
        output: KubeOutput {
            rx: Some(receiver),
            outcome: outcome_tx,
            cmds: cmd_tx.clone(),
        },
        program: KubeProgram {
            client: client.clone(),
            at,
            cmds: cmd_tx,
            exit,
            window_timeout: limits.window,
        },
    }
}

/// Why a helper program ([`capture`]) did not run to completion.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("the helper program could not be started")]
    Start(#[source] ExecError),
    #[error("the helper program's stdin could not be written")]
    Stdin(#[source] ExecError),
    #[error("the exec failed: {reason}: {message}")]
    Failed { reason: String, message: String },
    #[error("the exec ended without an exit status: {0}")]
    Lost(String),
    #[error("the helper program did not finish within {0:?}")]
    Timeout(Duration),
}

/// Runs a helper program in a pod to completion: optional stdin (then EOF), output kept up to
/// the capture limit. Bounded by `limit`.
pub async fn capture(
    client: &KubeClient,
    at: &PodRef,
    argv: &[String],
    stdin: Option<&[u8]>,
    limit: Duration,
) -> Result<Captured, CaptureError> {
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
        .map_err(CaptureError::Start)?;
        if let Some(data) = stdin {
            s.send_stdin(data).await.map_err(CaptureError::Stdin)?;
            s.close_stdin().await.map_err(CaptureError::Stdin)?;
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
            ExitOutcome::Failed { reason, message } => {
                Err(CaptureError::Failed { reason, message })
            }
            ExitOutcome::Lost(why) => Err(CaptureError::Lost(why)),
        }
    };
    tokio::time::timeout(limit, run)
        .await
        .unwrap_or(Err(CaptureError::Timeout(limit)))
}

impl KubeProgram {
    async fn exit_code_now(&self) -> Result<u32, ControlError> {
        match &self.exit {
            Exit::Stream(rx) => {
                let mut rx = rx.clone();
                let outcome = match rx.wait_for(Option::is_some).await {
                    Ok(o) => o.clone(),
                    Err(_) => None,
                };
                match outcome {
                    Some(ExitOutcome::Exited(c)) => Ok(c),
                    Some(ExitOutcome::Failed { reason, message }) => Err(ControlError::Backend(
                        format!("the exec failed: {reason}: {message}").into(),
                    )),
                    Some(ExitOutcome::Lost(why)) => Err(ControlError::Backend(
                        format!("the exec ended without an exit status: {why}").into(),
                    )),
                    None => Ok(UNKNOWN_EXIT_STATUS),
                }
            }
            Exit::Container { within } => {
                let at = &self.at;
                let code =
                    pods::wait_exit(&self.client, &at.namespace, &at.pod, &at.container, *within)
                        .await
                        .map_err(|e| ControlError::Backend(e.into()))?;
                Ok(u32::try_from(code).unwrap_or(UNKNOWN_EXIT_STATUS))
            }
        }
    }
}

impl Program for KubeProgram {
    fn resize(&self, rows: u32, cols: u32) -> BoxFuture<'_, Result<(), ControlError>> {
        Box::pin(async move {
            let dim = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
            let cmd = Cmd::Resize {
                cols: dim(cols),
                rows: dim(rows),
            };
            match tokio::time::timeout(self.window_timeout, self.cmds.send(cmd)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(ControlError::Backend("the stream is closed".into())),
                Err(_) => Err(ControlError::Timeout("resize")),
            }
        })
    }

    fn exit_code(&self) -> BoxFuture<'_, Result<u32, ControlError>> {
        Box::pin(self.exit_code_now())
    }

    fn is_exec(&self) -> bool {
        matches!(self.exit, Exit::Stream(_))
    }
}
