//! A started program, whichever backend runs it: stdin as a writer, output as a stream of
//! stdout/stderr chunks with the agent's PID report taken off the front, and a control handle
//! for resize, signals and the exit status.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWrite;
use tokio::sync::watch;

use super::docker::session::{OutputStream, ProcessControl as DockerControl};
use super::docker::StreamKind;
use super::kubernetes::session::{KubeControl, KubeOutput};
use super::ExitReport;

/// The program's stdin. Shutting it down passes EOF on (where the backend can).
pub type ProcessInput = Box<dyn AsyncWrite + Send + Unpin>;

/// A started program: its stdin, its output and a handle to control it.
pub struct Process {
    pub stdin: ProcessInput,
    pub output: ProcessOutput,
    pub control: ProcessControl,
}

/// Where a program's output comes from.
pub enum OutputSource {
    Docker(OutputStream),
    Kube(KubeOutput),
}

impl OutputSource {
    /// The next chunk of output; `None` at its end.
    pub async fn next(&mut self) -> io::Result<Option<(StreamKind, Bytes)>> {
        match self {
            OutputSource::Docker(s) => s.next().await,
            OutputSource::Kube(s) => Ok(s.next().await),
        }
    }
}

/// A program's output, with the agent's PID report taken off the front.
pub struct ProcessOutput {
    source: OutputSource,
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
pub(crate) async fn reported_pid(rx: &PidReceiver, limit: Duration) -> Option<u32> {
    let mut rx = rx.as_ref()?.clone();
    let waited = tokio::time::timeout(limit, rx.wait_for(Option::is_some)).await;
    match waited {
        Ok(Ok(pid)) => *pid,
        _ => None,
    }
}

impl ProcessOutput {
    pub(crate) fn new(source: OutputSource, pid: PidSender) -> Self {
        Self {
            source,
            pid: pid.map(|tx| PidReport {
                got: Vec::with_capacity(4),
                tx,
            }),
        }
    }

    /// The next chunk of output; `None` when the program's output has ended.
    pub async fn next(&mut self) -> io::Result<Option<(StreamKind, Bytes)>> {
        loop {
            let item = self.source.next().await?;
            let Some(report) = self.pid.as_mut() else {
                return Ok(item);
            };
            match item {
                Some((StreamKind::Stdout, data)) => {
                    let take = (4 - report.got.len()).min(data.len());
                    report.got.extend_from_slice(&data[..take]);
                    if let Ok(bytes) = <[u8; 4]>::try_from(report.got.as_slice()) {
                        report.tx.send_replace(Some(u32::from_le_bytes(bytes)));
                        self.pid = None;
                    }
                    let rest = data.slice(take..);
                    if !rest.is_empty() {
                        return Ok(Some((StreamKind::Stdout, rest)));
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
    Backend(String),
}

/// Resize, signal and wait for a started program.
pub enum ProcessControl {
    Docker(DockerControl),
    Kube(KubeControl),
}

impl ProcessControl {
    pub async fn resize(&self, rows: u32, cols: u32) -> Result<(), ControlError> {
        if rows == 0 || cols == 0 {
            // An unknown size: the terminal keeps the one it has.
            return Ok(());
        }
        match self {
            ProcessControl::Docker(c) => c
                .resize(rows, cols)
                .await
                .map_err(|e| ControlError::Backend(e.to_string())),
            ProcessControl::Kube(c) => c.resize(rows, cols).await,
        }
    }

    pub async fn signal(&self, name: &str) -> Result<(), ControlError> {
        match self {
            ProcessControl::Docker(c) => c.signal(name).await,
            ProcessControl::Kube(c) => c.signal(name).await,
        }
    }

    /// How the program ended. Call after its output stream has ended.
    pub async fn wait(&self) -> ExitReport {
        match self {
            ProcessControl::Docker(c) => c.wait().await,
            ProcessControl::Kube(c) => c.wait().await,
        }
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
    buf.extend_from_slice(&data[..data.len().min(room)]);
}

/// The agent's `console` in front of a program: it reports the program's PID first on stdout,
/// sizes the terminal before the program starts, and (`env`, exec APIs without an environment
/// of their own) sets variables. `ours` is false for an image's own agent, which may be
/// ContainerSSH's and know only `--pid`.
pub(crate) fn console_argv(
    agent: &str,
    tty: Option<&super::Terminal>,
    env: &[String],
    wait: bool,
    program: Vec<String>,
    ours: bool,
) -> Vec<String> {
    let mut argv: Vec<String> = vec![agent.into(), "console".into(), "--pid".into()];
    if wait {
        argv.push("--wait".into());
    }
    if ours {
        if let Some((rows, cols)) = tty.and_then(|t| t.size()) {
            let dim = |v: u32| u16::try_from(v).unwrap_or(u16::MAX).to_string();
            argv.extend(["--rows".into(), dim(rows), "--cols".into(), dim(cols)]);
        }
        for e in env {
            argv.extend(["--env".into(), e.clone()]);
        }
    }
    argv.push("--".into());
    argv.extend(program);
    argv
}
