//! Sessions started by the agent's `session-server` instead of the engine's exec API, for
//! every backend that reaches one ([`super::Runtime::attach_agent`]): a program costs one
//! `Spawn` frame on a stream that is already open, not an exec round trip through the
//! engine (or, on Kubernetes, through the API server to the kubelet).
//!
//! A started program is the same [`Process`] as an exec'd one: stdin is the program
//! stream's sending half, output its receiving half and the stderr stream's, and the control
//! sends `Resize` and `Signal` frames and reads the status from `Exited` (which also says
//! which signal killed it: no exit record to ask for).

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::process::{keep, Captured, ControlError, OutputSource, Program, QueuedStdin};
use super::{
    signal_number, AgentStreams, BoxFuture, Cause, Container, OutputKind, Process, ProcessControl,
    ProcessOutput, ProgramSpec, StartError,
};
use crate::forward::{
    ForwardError, Mux, MuxSink, MuxSource, ProgramExit, SpawnRequest, SpawnedProgram, StreamEvent,
    StreamHold,
};

/// A container's `session-server`, reached over its attach (or exec) stream. Dropping the
/// last handle closes the stream; the agent, the container's main process, stays until the
/// container goes.
pub struct AgentSessions {
    mux: Arc<Mux>,
    cancel: CancellationToken,
    /// Bound on a helper program ([`Self::capture`]), the backend's for its helper execs.
    helper_limit: Duration,
}

impl Drop for AgentSessions {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl std::fmt::Debug for AgentSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSessions")
            .field("stopped", &self.mux.is_stopped())
            .finish()
    }
}

impl AgentSessions {
    /// Speaks the agent protocol over a started `session-server`'s streams.
    pub fn start((output, input): AgentStreams, helper_limit: Duration) -> Arc<Self> {
        let cancel = CancellationToken::new();
        // A session-server accepts nothing: no listener is ever opened on it.
        let (mux, _incoming) = Mux::start("sessions", output, input, cancel.clone());
        Arc::new(Self {
            mux,
            cancel,
            helper_limit,
        })
    }

    /// Runs a helper program (`agent write-file`, `agent signal`, ...) to completion through
    /// the agent, as [`Container::capture`] does through the exec API; `None` when the agent
    /// cannot.
    pub async fn capture(
        &self,
        argv: &[String],
        stdin: Option<&[u8]>,
    ) -> Option<Result<Captured, Cause>> {
        let request = SpawnRequest {
            argv: argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
            env: Vec::new(),
            tty: None,
        };
        if self.mux.is_stopped() || !request.fits() {
            return None;
        }
        let run = async {
            let spawned = match self.spawn(request).await {
                Ok(s) => s,
                Err(SpawnFailed::Stopped) => return None,
                Err(SpawnFailed::Refused(why)) => return Some(Err(why.into())),
            };
            let (sink, source) = spawned.stream.split();
            let mut output = AgentOutput {
                out: Some(source),
                err: spawned.stderr.map(|s| s.split().1),
            };
            let feed = async {
                if let Some(data) = stdin {
                    sink.send(data).await?;
                }
                sink.eof();
                Ok::<(), ForwardError>(())
            };
            let read = async {
                let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
                while let Some((kind, data)) = output.next_chunk().await? {
                    match kind {
                        OutputKind::Stdout => keep(&mut stdout, &data),
                        OutputKind::Stderr => keep(&mut stderr, &data),
                    }
                }
                Ok::<_, io::Error>((stdout, stderr))
            };
            let (fed, read) = tokio::join!(feed, read);
            if let Err(e) = fed {
                tracing::debug!(error = %e, "helper program closed its stdin early");
            }
            let (stdout, stderr) = match read {
                Ok(r) => r,
                Err(e) => return Some(Err(e.into())),
            };
            let Ok(exit) = spawned.exit.await else {
                return Some(Err(
                    "the agent stopped before the helper program ended".into()
                ));
            };
            Some(Ok(Captured {
                code: i64::from(exit.status),
                stdout,
                stderr,
            }))
        };
        match tokio::time::timeout(self.helper_limit, run).await {
            Ok(r) => r,
            Err(_) => Some(Err(format!(
                "the helper program did not end within {:?}",
                self.helper_limit
            )
            .into())),
        }
    }

    /// A `Spawn` and its answer, bounded by the helper limit (the agent is untrusted: one that
    /// never answers must not hold a session's start forever). A stop meanwhile means the
    /// exec API should serve.
    async fn spawn(&self, request: SpawnRequest) -> Result<SpawnedProgram, SpawnFailed> {
        match tokio::time::timeout(self.helper_limit, self.mux.spawn(request)).await {
            Ok(Ok(s)) => Ok(s),
            Ok(Err(_)) if self.mux.is_stopped() => Err(SpawnFailed::Stopped),
            Ok(Err(ForwardError::Stopped)) => Err(SpawnFailed::Stopped),
            Ok(Err(ForwardError::Refused(why))) => Err(SpawnFailed::Refused(why)),
            Err(_) => Err(SpawnFailed::Refused(format!(
                "the agent did not start the program within {:?}",
                self.helper_limit
            ))),
        }
    }

    /// Starts `spec` through the agent; `None` when it cannot (the agent has stopped, or the
    /// command line does not fit a frame), and the exec API should.
    pub async fn start_program(
        &self,
        spec: &ProgramSpec,
        container: Arc<dyn Container>,
        disable_agent_key: &'static str,
    ) -> Option<Result<Process, StartError>> {
        let dim = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        let request = SpawnRequest {
            argv: spec.argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
            env: spec.env.iter().map(|e| e.as_bytes().to_vec()).collect(),
            tty: spec.tty.as_ref().map(|t| {
                t.size()
                    .map_or((0, 0), |(rows, cols)| (dim(rows), dim(cols)))
            }),
        };
        if self.mux.is_stopped() || !request.fits() {
            return None;
        }
        let spawned = match self.spawn(request).await {
            Ok(s) => s,
            Err(SpawnFailed::Stopped) => return None,
            Err(SpawnFailed::Refused(why)) => {
                return Some(Err(StartError::ExecFailed(why.into())));
            }
        };
        let id = spawned.stream.id();
        let hold = spawned.stream.hold();
        let (sink, source) = spawned.stream.split();
        let output = AgentOutput {
            out: Some(source),
            err: spawned.stderr.map(|s| s.split().1),
        };
        let program = AgentProgram {
            mux: Arc::clone(&self.mux),
            id,
            exit: tokio::sync::Mutex::new(Some(spawned.exit)),
            ended: Mutex::new(None),
            hold: Mutex::new(Some(hold)),
        };
        // No PID report: signals and the exit travel as frames.
        let control = ProcessControl::new(
            Box::new(program),
            container,
            None,
            disable_agent_key,
            std::time::Duration::ZERO,
        );
        Some(Ok(Process {
            stdin: Box::new(agent_input(sink)),
            output: ProcessOutput::new(Box::new(output), None),
            control,
        }))
    }
}

/// Why a program did not start through the agent.
enum SpawnFailed {
    /// The agent is gone: the exec API serves instead.
    Stopped,
    /// The agent refused or did not answer.
    Refused(String),
}

/// A spawned program's stdout (or terminal) and stderr, until both have ended.
struct AgentOutput {
    out: Option<MuxSource>,
    err: Option<MuxSource>,
}

impl Drop for AgentOutput {
    /// Output nobody reads any more is still read (and acknowledged) to its end, as a pipe
    /// reader that went away would let the program go on: otherwise the agent would wait
    /// for credit, never reach the end of the output, and never report the exit.
    fn drop(&mut self) {
        for mut source in [self.out.take(), self.err.take()].into_iter().flatten() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    while let Some(event) = source.recv().await {
                        if let StreamEvent::Data(d) = event {
                            source.ack(d.len());
                        }
                    }
                });
            }
        }
    }
}

impl AgentOutput {
    async fn next_chunk(&mut self) -> io::Result<Option<(OutputKind, Bytes)>> {
        loop {
            let (event, kind) = match (&mut self.out, &mut self.err) {
                (None, None) => return Ok(None),
                (Some(out), None) => (out.recv().await, OutputKind::Stdout),
                (None, Some(err)) => (err.recv().await, OutputKind::Stderr),
                (Some(out), Some(err)) => tokio::select! {
                    e = out.recv() => (e, OutputKind::Stdout),
                    e = err.recv() => (e, OutputKind::Stderr),
                },
            };
            let source = match kind {
                OutputKind::Stdout => &mut self.out,
                OutputKind::Stderr => &mut self.err,
            };
            match event {
                Some(StreamEvent::Data(data)) => {
                    // Handed on: the agent may send that much more.
                    if let Some(s) = source {
                        s.ack(data.len());
                    }
                    return Ok(Some((kind, data)));
                }
                Some(StreamEvent::Eof) | None => *source = None,
            }
        }
    }
}

impl OutputSource for AgentOutput {
    fn next(&mut self) -> BoxFuture<'_, io::Result<Option<(OutputKind, Bytes)>>> {
        Box::pin(self.next_chunk())
    }
}

/// Stdin chunks queued for the agent's stream.
const STDIN_QUEUE_CHUNKS: usize = 4;

/// A spawned program's stdin: a queue that one task sends on the program's stream (each chunk
/// within the agent's credit), then `Eof` when the queue is closed. The task ends with that,
/// or when the stream ends (the program's exit closes its credit; so does the agent stopping).
fn agent_input(sink: MuxSink) -> QueuedStdin {
    let (tx, mut rx) = mpsc::channel::<Bytes>(STDIN_QUEUE_CHUNKS);
    tokio::spawn(async move {
        while let Some(chunk) = rx.recv().await {
            if sink.send(&chunk).await.is_err() {
                return;
            }
        }
        sink.eof();
    });
    QueuedStdin::new(tx, crate::agent::proto::MAX_DATA)
}

/// Resize, signal and exit of a spawned program, as frames.
struct AgentProgram {
    mux: Arc<Mux>,
    id: u32,
    exit: tokio::sync::Mutex<Option<oneshot::Receiver<ProgramExit>>>,
    ended: Mutex<Option<ProgramExit>>,
    /// The program's stream stays open (no `Close`, which would forgo the exit) until the
    /// exit is read, even when its output has ended and its stdin is dropped.
    hold: Mutex<Option<StreamHold>>,
}

impl Program for AgentProgram {
    fn resize(&self, rows: u32, cols: u32) -> BoxFuture<'_, Result<(), ControlError>> {
        let dim = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        self.mux.resize(self.id, dim(rows), dim(cols));
        Box::pin(async { Ok(()) })
    }

    fn exit_code(&self) -> BoxFuture<'_, Result<u32, ControlError>> {
        Box::pin(async move {
            if let Some(e) = *self.ended.lock().unwrap_or_else(|e| e.into_inner()) {
                return Ok(e.status);
            }
            let Some(rx) = self.exit.lock().await.take() else {
                return Err(ControlError::Agent("the exit was already read".into()));
            };
            let exit = rx.await.map_err(|_| {
                ControlError::Agent("the agent stopped before the program ended".into())
            })?;
            *self.ended.lock().unwrap_or_else(|e| e.into_inner()) = Some(exit);
            self.hold.lock().unwrap_or_else(|e| e.into_inner()).take();
            Ok(exit.status)
        })
    }

    fn signal_directly<'a>(
        &'a self,
        name: &'a str,
        _key: &'static str,
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        Box::pin(async move {
            let n = signal_number(name)
                .and_then(|n| u8::try_from(n).ok())
                .ok_or_else(|| ControlError::UnknownSignal(name.into()))?;
            self.mux.signal(self.id, n);
            Ok(())
        })
    }

    fn is_exec(&self) -> bool {
        false
    }

    fn killed_by(&self) -> Option<String> {
        let ended = *self.ended.lock().unwrap_or_else(|e| e.into_inner());
        ended
            .filter(|e| e.signal != 0)
            .map(|e| crate::agent::signal::name_of(i32::from(e.signal)))
    }
}
