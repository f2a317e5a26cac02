//! An in-memory backend for tests of the SSH side: no engine, programs scripted by the test.
//!
//! A test gives a function from what a channel asked to run ([`ProgramSpec`]) to a
//! [`Script`]: an async function of the program's [`FakeIo`] (stdin, stdout, stderr, the
//! signals and terminal sizes it is sent) that returns its exit status. Starts can be made
//! slow or fail; everything the SSH side asked of the backend is recorded as [`FakeEvent`]s.
//! There is no agent: signals are delivered directly, and a program that ends with 128+N
//! after signal N counts as killed by it, as with an engine.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, DuplexStream};
use tokio::sync::{mpsc, watch};

use super::process::{
    Captured, ControlError, OutputSource, Process, ProcessControl, ProcessOutput, Program,
};
use super::{
    AgentAt, AgentStreams, BoxFuture, ConnMeta, Container, Engine, Handle, OutputKind, ProgramSpec,
    Runtime, SessionStart, StartError,
};
use crate::auth::metadata::{LoginFile, LoginMetadata};
use crate::config::model::ExecutionMode;

/// What a fake program is given.
pub struct FakeIo {
    pub spec: ProgramSpec,
    /// Everything the client sends; EOF when it closes its side.
    pub stdin: DuplexStream,
    out: mpsc::Sender<(OutputKind, Bytes)>,
    /// Signals sent to the program, in order.
    pub signals: mpsc::UnboundedReceiver<String>,
    /// The terminal's size (rows, cols) after each resize.
    pub size: watch::Receiver<Option<(u32, u32)>>,
}

impl FakeIo {
    pub async fn stdout(&self, data: impl Into<Bytes>) {
        let _ = self.out.send((OutputKind::Stdout, data.into())).await;
    }

    pub async fn stderr(&self, data: impl Into<Bytes>) {
        let _ = self.out.send((OutputKind::Stderr, data.into())).await;
    }

    /// Reads stdin to its end.
    pub async fn read_all(&mut self) -> Vec<u8> {
        let mut all = Vec::new();
        let _ = self.stdin.read_to_end(&mut all).await;
        all
    }
}

/// A program: its behaviour, returning its exit status (128+N for a death by signal N).
pub type Script = Box<dyn FnOnce(FakeIo) -> BoxFuture<'static, u32> + Send>;

/// Makes a [`Script`] from an async closure.
pub fn script<F, Fut>(f: F) -> Script
where
    F: FnOnce(FakeIo) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = u32> + Send + 'static,
{
    Box::new(move |io| Box::pin(f(io)))
}

/// Copies stdin to stdout, then exits 0.
pub fn echo() -> Script {
    script(|mut io| async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match io.stdin.read(&mut buf).await {
                Ok(0) | Err(_) => return 0,
                Ok(n) => {
                    io.stdout(Bytes::copy_from_slice(buf.get(..n).unwrap_or(&buf)))
                        .await
                }
            }
        }
    })
}

/// Prints `stdout`, then exits with `status`.
pub fn print(stdout: impl Into<Bytes>, status: u32) -> Script {
    let stdout = stdout.into();
    script(move |io| async move {
        io.stdout(stdout).await;
        status
    })
}

/// What the SSH side asked of the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FakeEvent {
    /// A container or pod is being started (before the delay).
    Starting,
    /// A connection's container (`connection_id`).
    Started(String),
    /// A program, as asked.
    Ran {
        argv: Vec<String>,
        env: Vec<String>,
        tty: Option<(u32, u32)>,
    },
    Resized(u32, u32),
    Signalled(String),
    /// A session's own container was removed.
    RemovedSession,
    /// Everything of a connection was removed.
    RemovedConnection(String),
    /// What a crashed run (or, at shutdown, this one) left was removed.
    Reaped,
}

type Programs = Arc<dyn Fn(&ProgramSpec) -> Script + Send + Sync>;

/// What the fake's cleanup and helpers fail with.
#[derive(Debug, thiserror::Error)]
pub enum FakeError {
    #[error("the container engine is not reachable")]
    Unreachable,
    #[error("the fake backend has no agent to run helper programs")]
    NoAgent,
}

/// The fake [`Runtime`].
#[derive(Clone)]
pub struct Fake {
    mode: ExecutionMode,
    programs: Programs,
    start_delay: Duration,
    fail_start: Option<String>,
    log: Arc<Log>,
}

/// What happened, shared with the programs.
#[derive(Default)]
struct Log {
    events: Mutex<Vec<FakeEvent>>,
    running: AtomicUsize,
    /// Removals and reaps fail while set, as with an engine that does not answer.
    unreachable: std::sync::atomic::AtomicBool,
}

impl Log {
    fn lock(&self) -> MutexGuard<'_, Vec<FakeEvent>> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, e: FakeEvent) {
        self.lock().push(e);
    }
}

/// The fake backend; cheap to clone, clones share their record.
pub type FakeBackend = Engine<Fake>;

impl FakeBackend {
    /// A backend in `mode` whose programs `programs` scripts.
    pub fn new(
        mode: ExecutionMode,
        programs: impl Fn(&ProgramSpec) -> Script + Send + Sync + 'static,
    ) -> Self {
        Engine::of(Fake {
            mode,
            programs: Arc::new(programs),
            start_delay: Duration::ZERO,
            fail_start: None,
            log: Arc::default(),
        })
    }

    /// Configures the backend; meant before it is shared. A shared one is copied: the result
    /// shares the record with the other clones, which keep their own settings.
    fn edit(self, f: impl FnOnce(&mut Fake)) -> Self {
        let mut inner = Arc::unwrap_or_clone(self.0);
        f(&mut inner);
        Engine::of(inner)
    }

    /// Every container or pod takes this long to start.
    pub fn with_start_delay(self, delay: Duration) -> Self {
        self.edit(|i| i.start_delay = delay)
    }

    /// Every container or pod fails to start with this message.
    pub fn failing(self, message: &str) -> Self {
        let message = message.to_string();
        self.edit(|i| i.fail_start = Some(message))
    }

    pub fn events(&self) -> Vec<FakeEvent> {
        self.0.log.lock().clone()
    }

    /// Programs started and not yet ended.
    pub fn running(&self) -> usize {
        self.0.log.running.load(Ordering::Acquire)
    }

    /// Makes removals and reaps fail (`true`), as when the engine does not answer, or
    /// succeed again; shared by every clone.
    pub fn set_unreachable(&self, unreachable: bool) {
        self.0.log.unreachable.store(unreachable, Ordering::Release);
    }
}

impl Fake {
    fn record(&self, e: FakeEvent) {
        self.log.record(e);
    }

    fn reachable(&self) -> Result<(), FakeError> {
        if self.log.unreachable.load(Ordering::Acquire) {
            return Err(FakeError::Unreachable);
        }
        Ok(())
    }

    async fn start(&self) -> Result<(), StartError> {
        self.record(FakeEvent::Starting);
        tokio::time::sleep(self.start_delay).await;
        match &self.fail_start {
            Some(m) => Err(StartError::ContainerFailed(m.clone().into())),
            None => Ok(()),
        }
    }

    fn run(&self, spec: &ProgramSpec, exec: bool, container: Arc<dyn Container>) -> Process {
        self.record(FakeEvent::Ran {
            argv: spec.argv.clone(),
            env: spec.env.clone(),
            tty: spec.tty.as_ref().map(|t| (t.rows, t.cols)),
        });
        let (stdin, program_stdin) = tokio::io::duplex(64 * 1024);
        let (out_tx, out_rx) = mpsc::channel(16);
        let (sig_tx, sig_rx) = mpsc::unbounded_channel();
        let (size_tx, size_rx) = watch::channel(spec.tty.as_ref().and_then(|t| t.size()));
        let (exit_tx, exit_rx) = watch::channel(None);
        let io = FakeIo {
            spec: spec.clone(),
            stdin: program_stdin,
            out: out_tx,
            signals: sig_rx,
            size: size_rx,
        };
        let body = (self.programs)(spec);
        let log = Arc::clone(&self.log);
        log.running.fetch_add(1, Ordering::AcqRel);
        // The output ends when the program does (as a process's does at its exit), whatever
        // of its `FakeIo` the script kept.
        let open_until_exit = io.out.clone();
        tokio::spawn(async move {
            let status = body(io).await;
            drop(open_until_exit);
            log.running.fetch_sub(1, Ordering::AcqRel);
            exit_tx.send_replace(Some(status));
        });
        let program = FakeProgram {
            log: Arc::clone(&self.log),
            signals: sig_tx,
            size: size_tx,
            exit: exit_rx,
            exec,
        };
        Process {
            stdin: Box::new(stdin),
            output: ProcessOutput::new(Box::new(FakeOutput(out_rx)), None),
            control: ProcessControl::new(
                Box::new(program),
                container,
                None,
                Self::DISABLE_AGENT_KEY,
                Duration::from_secs(5),
            ),
        }
    }
}

struct FakeOutput(mpsc::Receiver<(OutputKind, Bytes)>);

impl OutputSource for FakeOutput {
    fn next(&mut self) -> BoxFuture<'_, std::io::Result<Option<(OutputKind, Bytes)>>> {
        Box::pin(async move { Ok(self.0.recv().await) })
    }
}

struct FakeProgram {
    log: Arc<Log>,
    signals: mpsc::UnboundedSender<String>,
    size: watch::Sender<Option<(u32, u32)>>,
    exit: watch::Receiver<Option<u32>>,
    exec: bool,
}

impl Program for FakeProgram {
    fn resize(&self, rows: u32, cols: u32) -> BoxFuture<'_, Result<(), ControlError>> {
        self.log.record(FakeEvent::Resized(rows, cols));
        self.size.send_replace(Some((rows, cols)));
        Box::pin(async { Ok(()) })
    }

    fn exit_code(&self) -> BoxFuture<'_, Result<u32, ControlError>> {
        let mut exit = self.exit.clone();
        Box::pin(async move {
            let code = exit
                .wait_for(Option::is_some)
                .await
                .map_err(|_| ControlError::Backend("the program vanished".into()))?;
            Ok(code.unwrap_or_default())
        })
    }

    fn signal_directly<'a>(
        &'a self,
        name: &'a str,
        _key: &'static str,
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        self.log.record(FakeEvent::Signalled(name.to_string()));
        let sent = self.signals.send(name.to_string());
        Box::pin(
            async move { sent.map_err(|_| ControlError::Backend("the program has ended".into())) },
        )
    }

    fn is_exec(&self) -> bool {
        self.exec
    }
}

impl Runtime for Fake {
    const DISABLE_AGENT_KEY: &'static str = "the fake backend has no agent";
    const KIND: &'static str = "fake";
    type Error = FakeError;

    fn mode(&self) -> ExecutionMode {
        self.mode
    }

    fn has_agent(&self) -> bool {
        false
    }

    async fn connection_container(
        &self,
        meta: &ConnMeta,
        _login: &LoginMetadata,
    ) -> Result<(String, Option<AgentAt>), StartError> {
        self.start().await?;
        self.record(FakeEvent::Started(meta.connection_id.clone()));
        Ok((format!("fake-{}", meta.connection_id), None))
    }

    async fn put_files(&self, _name: &str, _files: &[LoginFile]) {}

    async fn run_session(
        self: &Arc<Self>,
        meta: &ConnMeta,
        spec: &ProgramSpec,
    ) -> Result<SessionStart, StartError> {
        self.start().await?;
        let name = format!("fake-session-{}", meta.connection_id);
        let own: Arc<dyn Container> = Arc::new(Handle::new(Arc::clone(self), name, None, true));
        let process = self.run(spec, false, Arc::clone(&own));
        Ok((own, process))
    }

    async fn remove_connection(&self, connection_id: &str) -> Result<usize, FakeError> {
        self.reachable()?;
        self.record(FakeEvent::RemovedConnection(connection_id.to_string()));
        Ok(1)
    }

    async fn reap(&self) -> Result<usize, FakeError> {
        self.reachable()?;
        self.record(FakeEvent::Reaped);
        Ok(0)
    }

    async fn exec(
        &self,
        _name: &str,
        spec: &ProgramSpec,
        handle: Arc<dyn Container>,
    ) -> Result<Process, StartError> {
        Ok(self.run(spec, true, handle))
    }

    async fn capture(
        &self,
        _name: &str,
        _argv: Vec<String>,
        _stdin: Option<&[u8]>,
    ) -> Result<Captured, FakeError> {
        Err(FakeError::NoAgent)
    }

    async fn start_agent_command(
        &self,
        _name: &str,
        _agent: Option<&AgentAt>,
        _args: &[&str],
    ) -> Result<AgentStreams, StartError> {
        Err(StartError::ExecFailed(Self::DISABLE_AGENT_KEY.into()))
    }

    async fn remove(&self, _name: &str) {
        self.record(FakeEvent::RemovedSession);
    }
}
