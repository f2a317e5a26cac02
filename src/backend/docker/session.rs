//! The Docker backend proper: turns ContainerSSH's `docker.execution` settings into containers
//! and execs, labels everything it creates, and removes it again (per connection, per session,
//! and at start-up for what a crashed run of the same instance left behind).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::OnceCell;

use super::archive::{build_tar, ArchiveError, TarData, TarEntry};
use super::config::{get_ci, DockerSettings};
use super::{
    Demuxer, DockerClient, DockerError, ExecSpec, HijackedReader, HijackedWriter, ReadSizer,
    StreamKind,
};
use crate::auth::metadata::{LoginFile, LoginMetadata};
use crate::backend::agent::{self, console_argv, AgentBinary};
use crate::backend::pool::{Members, Pool};
use crate::backend::process::{
    keep, pid_channel, Captured, ControlError, OutputSource, Process, ProcessControl,
    ProcessOutput, Program, UNKNOWN_EXIT_STATUS,
};
use crate::backend::{
    AgentAt, AgentStreams, Backend, BoxFuture, ConnMeta, Container, Engine, Handle, OutputKind,
    ProgramSpec, Runtime, SessionStart, StartError,
};
use crate::config::model::{DockerExecutionConfig, DockerTimeouts, ExecutionMode, PullPolicy};
use crate::config::Settings;

pub const LABEL_INSTANCE: &str = "containerssh_instance";
pub const LABEL_CONNECTION_ID: &str = "containerssh_connection_id";
pub const LABEL_USERNAME: &str = "containerssh_username";
pub const LABEL_IP: &str = "containerssh_ip";
/// Marks a persistent-mode container we created; it carries no instance or connection label,
/// so neither the reaper nor connection cleanup ever removes it.
pub const LABEL_PERSISTENT: &str = "containerssh_persistent";
pub use crate::backend::pool::LABEL_POOL;
/// Marks the volumes that hold an agent build (`containerssh-agent-<digest>`).
pub const LABEL_AGENT_VOLUME: &str = "containerssh_agent";
/// The marker written after the agent into its volume: a volume without it was never filled
/// completely.
const AGENT_VOLUME_READY: &str = "ready";

/// First API version that applies `ConsoleSize` at container and exec creation (Docker 23).
const CONSOLE_SIZE_API: (u32, u32) = (1, 42);

/// The key that turns the agent off, for messages.
const DISABLE_AGENT_KEY: &str = "docker.execution.disableAgent";

struct ApiLevel {
    console_size: bool,
}

/// The agent archives uploaded into every container we start.
#[derive(Clone)]
struct AgentTars {
    /// The parent directory of `agentPath`, for the upload that assumes it exists.
    dir: String,
    /// The file's name in `dir`.
    name: String,
    /// `dir` and its parents, extracted into `/` first when `dir` is missing (small).
    dirs: Bytes,
    /// The agent, read for each archive ([`Self::in_dir`], [`Self::volume`]): not held.
    binary: AgentBinary,
    /// The archive of [`Self::in_dir`] while an upload still holds it: logins starting at
    /// once (persistent mode, or no volume) share one copy instead of each reading its own.
    in_dir_shared: Arc<tokio::sync::Mutex<std::sync::Weak<Vec<u8>>>>,
    /// `containerssh-agent-<first 16 hex digits of the agent's SHA-256>`: one volume per
    /// agent build, shared by every container and every server on the engine.
    volume_name: String,
}

/// The volume the agent reaches fresh containers through (connection and session modes),
/// mounted read-only at [`agent::AGENT_DIR`]; filled at the first container start of this
/// process, shared by the backends derived for logins.
struct AgentVolume {
    /// `Some(true)`: filled and used; `Some(false)`: the engine would not have it (logged),
    /// the agent is uploaded into each container as before.
    ready: OnceCell<bool>,
}

/// How programs reach the agent: `None` in [`Docker`] when `disableAgent` is set.
#[derive(Clone)]
struct AgentUse {
    /// `docker.execution.agentPath`.
    path: String,
    /// What we upload; `None` when the image is expected to carry the agent.
    inject: Option<AgentTars>,
    /// The agent volume's state (with `inject`).
    volume: Arc<AgentVolume>,
    /// `agent.sessionServer`: connection containers run the agent's `session-server`.
    session_server: bool,
}

/// The Docker backend; its containers share it.
pub type DockerBackend = Engine<Docker>;

/// The Docker [`Runtime`].
pub struct Docker {
    client: DockerClient,
    exec: DockerExecutionConfig,
    image: String,
    platform: Option<String>,
    timeouts: DockerTimeouts,
    instance: String,
    api: OnceCell<ApiLevel>,
    agent: Option<AgentUse>,
    /// `execution.pool`: shared with the backends derived for logins (a login whose
    /// container would differ takes nothing from it).
    pool: Option<Arc<Pool>>,
}

/// Runs a short non-interactive exec to completion: optional stdin, output kept up to
/// [`MAX_CAPTURE_BYTES`] per stream. Unbounded in time; callers wrap it in a timeout.
pub async fn run_capture(
    client: &DockerClient,
    container: &str,
    cmd: Vec<String>,
    stdin: Option<&[u8]>,
    deadline: Duration,
) -> Result<Captured, DockerError> {
    let spec = ExecSpec {
        cmd,
        ..ExecSpec::default()
    };
    let id = client.create_exec(container, &spec).await?;
    let hijacked = client.start_exec(&id, false).await?;
    let mut writer = hijacked.writer;
    let feed = async move {
        if let Some(data) = stdin {
            writer.write_all(data).await?;
        }
        writer.shutdown().await
    };
    let mut demux = Demuxer::new(hijacked.reader);
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let read = async {
        while let Some((kind, data)) = demux.next_frame().await? {
            let buf = match kind {
                StreamKind::Stdout => &mut stdout,
                StreamKind::Stderr => &mut stderr,
                _ => continue,
            };
            keep(buf, &data);
        }
        Ok::<(), io::Error>(())
    };
    let (fed, read) = tokio::join!(feed, read);
    read.map_err(|source| DockerError::Stream {
        op: "exec output",
        source,
    })?;
    if let Err(e) = fed {
        tracing::debug!(error = %e, "helper exec closed its stdin early");
    }
    let code = client.exec_exit_code(&id, deadline).await?;
    Ok(Captured {
        code,
        stdout,
        stderr,
    })
}

/// A Docker program's output stream.
pub enum OutputStream {
    /// TTY: one raw stream, all of it stdout.
    Raw(HijackedReader, BytesMut, ReadSizer),
    /// No TTY (and agent commands): the engine's multiplexed stdout/stderr frames.
    Muxed(Demuxer<HijackedReader>),
}

impl OutputStream {
    async fn next_chunk(&mut self) -> io::Result<Option<(OutputKind, Bytes)>> {
        match self {
            OutputStream::Raw(r, buf, sizer) => {
                sizer.prepare(buf);
                let n = r.read_buf(buf).await?;
                sizer.record(n);
                Ok((n > 0).then(|| (OutputKind::Stdout, buf.split_to(n).freeze())))
            }
            OutputStream::Muxed(d) => loop {
                return Ok(match d.next_frame().await? {
                    Some((StreamKind::Stdout, b)) => Some((OutputKind::Stdout, b)),
                    Some((StreamKind::Stderr, b)) => Some((OutputKind::Stderr, b)),
                    // Not the program's output.
                    Some((StreamKind::Stdin | StreamKind::SystemErr, _)) => continue,
                    None => None,
                });
            },
        }
    }
}

impl OutputSource for OutputStream {
    fn next(&mut self) -> BoxFuture<'_, io::Result<Option<(OutputKind, Bytes)>>> {
        Box::pin(self.next_chunk())
    }
}

#[derive(Clone)]
enum Target {
    Exec(String),
    Container(String),
}

/// What only the engine can do for a started program.
struct DockerProgram {
    client: DockerClient,
    target: Target,
    exit_deadline: Duration,
    /// `docker.timeouts.window` and `.signal`.
    resize_timeout: Duration,
    signal_timeout: Duration,
}

/// Bounds one engine call by a configured timeout.
async fn within<T>(
    limit: Duration,
    op: &'static str,
    fut: impl std::future::Future<Output = Result<T, DockerError>>,
) -> Result<T, DockerError> {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or(Err(DockerError::Timeout { op }))
}

impl DockerProgram {
    async fn resize_now(&self, rows: u32, cols: u32) -> Result<(), DockerError> {
        within(self.resize_timeout, "resize", async {
            match &self.target {
                Target::Exec(id) => self.client.resize_exec(id, rows, cols).await,
                Target::Container(id) => self.client.resize_container(id, rows, cols).await,
            }
        })
        .await
    }
}

impl Program for DockerProgram {
    fn resize(&self, rows: u32, cols: u32) -> BoxFuture<'_, Result<(), ControlError>> {
        Box::pin(async move {
            self.resize_now(rows, cols)
                .await
                .map_err(|e| ControlError::Backend(e.into()))
        })
    }

    fn exit_code(&self) -> BoxFuture<'_, Result<u32, ControlError>> {
        Box::pin(async move {
            let code = match &self.target {
                Target::Exec(id) => self.client.exec_exit_code(id, self.exit_deadline).await,
                Target::Container(id) => self.client.wait_container(id).await,
            }
            .map_err(|e| ControlError::Backend(e.into()))?;
            Ok(u32::try_from(code).unwrap_or(UNKNOWN_EXIT_STATUS))
        })
    }

    /// A session container's main process can be signalled through the engine.
    fn signal_directly<'a>(
        &'a self,
        name: &'a str,
        key: &'static str,
    ) -> BoxFuture<'a, Result<(), ControlError>> {
        Box::pin(async move {
            let Target::Container(id) = &self.target else {
                return Err(ControlError::SignalUnsupported(key));
            };
            let sig = format!("SIG{name}");
            let kill = self.client.kill_container(id, &sig);
            within(self.signal_timeout, "signal", kill)
                .await
                .map_err(|e| ControlError::Backend(e.into()))
        })
    }

    fn is_exec(&self) -> bool {
        matches!(self.target, Target::Exec(_))
    }
}

impl AgentTars {
    fn new(path: &str, binary: &AgentBinary) -> Result<Self, ArchiveError> {
        let rel = path.trim_start_matches('/');
        let (dir, name) = match rel.rsplit_once('/') {
            Some((d, n)) => (d, n),
            None => ("", rel),
        };
        // The path and modes are checked now: building with the bytes later cannot fail.
        build_tar(&[TarEntry {
            path: name,
            mode: 0o755,
            data: TarData::File(b""),
        }])?;
        let mut dirs: Vec<String> = Vec::new();
        for component in dir.split('/').filter(|c| !c.is_empty()) {
            let next = match dirs.last() {
                Some(prev) => format!("{prev}/{component}"),
                None => component.to_string(),
            };
            dirs.push(next);
        }
        let entries: Vec<TarEntry> = dirs
            .iter()
            .map(|d| TarEntry {
                path: d,
                mode: 0o755,
                data: TarData::Dir,
            })
            .collect();
        let hex = binary.sha256_hex();
        Ok(Self {
            dir: format!("/{dir}"),
            name: name.to_string(),
            dirs: build_tar(&entries)?.into(),
            binary: binary.clone(),
            in_dir_shared: Arc::default(),
            volume_name: format!("containerssh-agent-{}", hex.get(..16).unwrap_or(&hex)),
        })
    }

    /// A tar of the agent's bytes as `name` (and an empty `extra` file after it), built off
    /// the runtime's threads: a file read and a copy of ~2 MiB.
    async fn archive(
        &self,
        name: &str,
        extra: Option<&'static str>,
    ) -> Result<Vec<u8>, DockerError> {
        let binary = self.binary.clone();
        let name = name.to_string();
        let built = tokio::task::spawn_blocking(move || {
            let bytes = binary.read()?;
            let mut entries = vec![TarEntry {
                path: &name,
                mode: 0o755,
                data: TarData::File(&bytes),
            }];
            if let Some(marker) = extra {
                entries.push(TarEntry {
                    path: marker,
                    mode: 0o644,
                    data: TarData::File(b""),
                });
            }
            build_tar(&entries).map_err(std::io::Error::other)
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        built.map_err(DockerError::AgentFile)
    }

    /// Just the file, extracted into `dir`: the archive an upload in progress holds, else a
    /// new one (freed when the last upload holding it is done).
    async fn in_dir(&self) -> Result<Bytes, DockerError> {
        struct Shared(Arc<Vec<u8>>);
        impl AsRef<[u8]> for Shared {
            fn as_ref(&self) -> &[u8] {
                &self.0
            }
        }
        let mut shared = self.in_dir_shared.lock().await;
        let tar = match shared.upgrade() {
            Some(tar) => tar,
            None => {
                let tar = Arc::new(self.archive(&self.name, None).await?);
                *shared = Arc::downgrade(&tar);
                tar
            }
        };
        Ok(Bytes::from_owner(Shared(tar)))
    }

    /// What fills the agent volume: the agent, then the ready marker.
    async fn volume(&self) -> Result<Bytes, DockerError> {
        self.archive(agent::AGENT_FILE_NAME, Some(AGENT_VOLUME_READY))
            .await
            .map(Bytes::from)
    }
}

/// The program's argv. Engines before API 1.42 ignore `ConsoleSize` for containers and execs
/// alike, and a resize can only follow the start, racing the program's first look at its
/// terminal; so there the terminal is sized from inside before the program is exec'd.
fn sized_argv(spec: &ProgramSpec, api: &ApiLevel) -> Vec<String> {
    let Some(t) = spec.tty.as_ref().filter(|_| !api.console_size) else {
        return spec.argv.clone();
    };
    let mut wrapped: Vec<String> = [
        "/bin/sh",
        "-c",
        "stty rows \"$1\" cols \"$2\" 2>/dev/null; shift 2; exec \"$@\"",
        "containerssh",
    ]
    .map(String::from)
    .to_vec();
    wrapped.push(t.rows.to_string());
    wrapped.push(t.cols.to_string());
    wrapped.extend(spec.argv.iter().cloned());
    wrapped
}

/// Sets `key` in a Docker API object whose keys the engine matches case-insensitively,
/// replacing every spelling of it, and returns what was there before.
fn replace_ci(map: &mut Map<String, Value>, key: &str, value: Value) -> Option<Value> {
    let old_keys: Vec<String> = map
        .keys()
        .filter(|k| k.eq_ignore_ascii_case(key))
        .cloned()
        .collect();
    let mut old = None;
    for k in old_keys {
        old = map.remove(&k).or(old);
    }
    map.insert(key.to_string(), value);
    old
}

impl Docker {
    fn new(cfg: &DockerSettings, instance: &str) -> Result<Self, DockerError> {
        Ok(Self {
            client: DockerClient::new(&cfg.connection, cfg.timeouts.http.0)?,
            exec: cfg.execution.clone(),
            image: cfg.image.clone(),
            platform: cfg.platform.clone(),
            timeouts: cfg.timeouts.clone(),
            instance: instance.to_string(),
            api: OnceCell::new(),
            agent: (!cfg.execution.disable_agent).then(|| AgentUse {
                path: cfg.execution.agent_path.clone(),
                inject: None,
                volume: Arc::new(AgentVolume {
                    ready: OnceCell::new(),
                }),
                session_server: false,
            }),
            pool: None,
        })
    }

    /// Copies `binary` into every container before it starts (unless the agent is disabled).
    fn inject_agent(mut self, binary: Option<&AgentBinary>) -> Result<Self, ArchiveError> {
        if let (Some(agent), Some(binary)) = (self.agent.as_mut(), binary) {
            agent.inject = Some(AgentTars::new(&agent.path, binary)?);
        }
        Ok(self)
    }

    /// The agent as programs in our containers see it.
    fn agent_at(&self) -> Option<AgentAt> {
        self.agent.as_ref().map(|a| AgentAt {
            path: if self.agent_volume_used() {
                agent::INJECTED_AGENT_PATH.to_string()
            } else {
                a.path.clone()
            },
            ours: a.inject.is_some(),
        })
    }

    /// What a container of this backend is, for the pool: the configuration it is created
    /// from (labels of ours aside, which are per connection).
    fn identity(&self) -> String {
        json!([
            self.exec.container,
            self.exec.host,
            self.exec.network,
            self.exec.idle_command,
            self.image,
            self.platform,
            self.agent
                .as_ref()
                .map(|a| (&a.path, a.inject.is_some(), a.session_server)),
        ])
        .to_string()
    }

    /// Connection mode: a pool member for this connection, when the pool has one for a
    /// container like this backend's.
    async fn claim(&self, meta: &ConnMeta) -> Option<String> {
        let pool = self.pool.as_ref()?;
        if self.exec.mode != ExecutionMode::Connection || self.ready().await.is_err() {
            return None;
        }
        let id = pool
            .claim_checked(self, &self.identity(), &meta.connection_id)
            .await?;
        tracing::info!(code = "BACKEND_POOL_CLAIM", container = %id, connection_id = %meta.connection_id, user = %meta.username, "a pool member serves this connection");
        Some(id)
    }

    /// The idle command with the agent's configured path replaced by the volume's, when the
    /// containers get it from there.
    fn idle_command(&self) -> Vec<String> {
        let mut cmd = self.exec.idle_command.clone();
        if let (Some(a), Some(first)) = (&self.agent, cmd.first_mut()) {
            if self.agent_volume_used() && *first == a.path {
                *first = agent::INJECTED_AGENT_PATH.to_string();
            }
        }
        cmd
    }

    /// Whether connection containers run the agent's `session-server` as their main process
    /// (sessions then start without an exec): connection mode, our agent, and the idle
    /// command the agent's `wait-signal` (the server serves in its place and ends on the same
    /// INT and TERM). A persistent container outlives us, so it keeps its idle command.
    /// Its output carries every session's bytes, so only where the engine logs nothing of
    /// the main process (`LogConfig` unset, which we make `none`, or `none`).
    fn runs_session_server(&self) -> bool {
        let cmd = &self.exec.idle_command;
        let unlogged = get_ci(&self.exec.host, "LogConfig").is_none_or(|l| {
            l.as_object()
                .and_then(|l| get_ci(l, "Type"))
                .and_then(Value::as_str)
                == Some("none")
        });
        self.uses_session_server()
            && unlogged
            && self
                .agent
                .as_ref()
                .is_some_and(|a| cmd.first() == Some(&a.path))
            && cmd.get(1).map(String::as_str) == Some("wait-signal")
    }

    /// Whether connection containers' sessions start through a `session-server`: the main
    /// process ([`Self::runs_session_server`]), or one exec'd per connection.
    fn uses_session_server(&self) -> bool {
        self.exec.mode == ExecutionMode::Connection
            && self
                .agent
                .as_ref()
                .is_some_and(|a| a.session_server && a.inject.is_some())
    }

    /// Whether the containers we create get the agent through its volume: we inject it, the
    /// volume is filled, and the mode creates fresh containers (a persistent container may
    /// predate the volume, so it keeps getting uploads).
    fn agent_volume_used(&self) -> bool {
        self.exec.mode != ExecutionMode::Persistent
            && self
                .agent
                .as_ref()
                .is_some_and(|a| a.inject.is_some() && a.volume.ready.get() == Some(&true))
    }

    /// Makes sure the agent volume is filled (once per process; the image must be present:
    /// an unstarted container of it mounts the volume for the upload). A failure is logged
    /// once and the agent is uploaded into each container instead.
    async fn prepare_agent_volume(&self) {
        if self.exec.mode == ExecutionMode::Persistent {
            return;
        }
        let Some((tars, state)) = self
            .agent
            .as_ref()
            .and_then(|a| Some((a.inject.as_ref()?, &a.volume)))
        else {
            return;
        };
        state
            .ready
            .get_or_init(|| async {
                let limit = self.timeouts.container_start.0;
                match within(limit, "agent volume", self.fill_agent_volume(tars)).await {
                    Ok(filled) => {
                        tracing::info!(code = "BACKEND_AGENT_VOLUME", volume = %tars.volume_name, filled, "the agent reaches containers through a read-only volume");
                        true
                    }
                    Err(e) => {
                        tracing::warn!(code = "BACKEND_AGENT_VOLUME_FAILED", volume = %tars.volume_name, error = %e, "the agent volume cannot be used: the agent is copied into each container instead");
                        false
                    }
                }
            })
            .await;
    }

    /// Creates the agent volume unless it exists, and fills it unless its ready marker is
    /// there (whether it was filled now). Servers sharing the engine fill it one at a time.
    async fn fill_agent_volume(&self, tars: &AgentTars) -> Result<bool, DockerError> {
        let name = &tars.volume_name;
        self.client
            .create_volume(name, &[(LABEL_AGENT_VOLUME, "1")])
            .await?;
        let mut host = Map::new();
        host.insert(
            "Mounts".into(),
            json!([{"Type": "volume", "Source": name, "Target": agent::AGENT_DIR}]),
        );
        host.insert("LogConfig".into(), json!({"Type": "none"}));
        host.insert("NetworkMode".into(), json!("none"));
        let body = json!({
            "Image": self.image,
            "Cmd": ["/nonexistent"],
            "Labels": {LABEL_INSTANCE: self.instance},
            "HostConfig": host,
        });
        let ready = format!("{}/{AGENT_VOLUME_READY}", agent::AGENT_DIR);
        // The helper's name is the lock: one server at a time writes the volume (two writing
        // it at once could replace the agent under a container that is starting it).
        let lock = format!("{name}-fill");
        let helper = loop {
            match self
                .client
                .create_container(Some(&lock), self.platform.as_deref(), &body)
                .await
            {
                Ok(id) => break id,
                // Another server fills it: done when its marker is there; its helper gone
                // without one, try to take the lock again (the caller bounds the wait).
                Err(DockerError::Status { status: 409, .. }) => {
                    match self.client.path_exists(&lock, &ready).await {
                        Ok(true) => return Ok(false),
                        Ok(false) | Err(DockerError::NoSuchContainer { .. }) => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(e) => return Err(e),
            }
        };
        let filled = async {
            if self.client.path_exists(&helper, &ready).await? {
                return Ok(false);
            }
            self.client
                .put_archive(&helper, agent::AGENT_DIR, tars.volume().await?)
                .await?;
            Ok(true)
        }
        .await;
        if let Err(e) = self.remove_container(&helper).await {
            tracing::warn!(code = "DOCKER_CONTAINER_REMOVE_FAILED", container = %helper, error = %e, "cannot remove the agent volume's helper container");
        }
        // Other builds' volumes are left alone: another server on this engine may still
        // mount one into its next container (each is one agent binary, ~2 MiB).
        filled
    }

    /// Uploads the agent into a container (created or running), bounded by `containerStart`.
    async fn put_agent(&self, id: &str) -> Result<(), StartError> {
        if self.agent_volume_used() {
            return Ok(());
        }
        let Some(tars) = self.agent.as_ref().and_then(|a| a.inject.as_ref()) else {
            return Ok(());
        };
        let upload = async {
            let in_dir = tars.in_dir().await?;
            match self.client.put_archive(id, &tars.dir, in_dir.clone()).await {
                // The directory is missing from the image: create it, then try again.
                Err(DockerError::Status { status: 404, .. }) => {
                    self.client.put_archive(id, "/", tars.dirs.clone()).await?;
                    self.client.put_archive(id, &tars.dir, in_dir).await
                }
                other => other,
            }
        };
        within(self.timeouts.container_start.0, "agent upload", upload)
            .await
            .map_err(|e| {
                StartError::ContainerFailed(format!(
                    "cannot copy the agent into the container (a read-only root file system needs the agent in the image and agent.inject: false, or docker.execution.disableAgent): {e}"
                ).into())
            })
    }

    async fn put_file(&self, container: &str, f: &LoginFile) -> Result<(), String> {
        let (dir, name) = f.path.rsplit_once('/').ok_or("not an absolute path")?;
        let tar = build_tar(&[TarEntry {
            path: name,
            mode: f.mode,
            data: TarData::File(&f.data),
        }])
        .map_err(|e| e.to_string())?;
        let dir = if dir.is_empty() { "/" } else { dir };
        let upload = self.client.put_archive(container, dir, tar);
        within(self.timeouts.container_start.0, "file upload", upload)
            .await
            .map_err(|e| e.to_string())
    }

    /// Negotiates the API version once; an engine that is down now may be up for the next login.
    async fn ready(&self) -> Result<&ApiLevel, StartError> {
        self.api
            .get_or_try_init(|| async {
                let v = self
                    .client
                    .negotiate()
                    .await
                    .map_err(|e| StartError::EngineUnreachable(e.into()))?;
                let parsed = v
                    .split_once('.')
                    .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                    .unwrap_or((1, 0));
                tracing::info!(code = "DOCKER_ENGINE_CONNECTED", api_version = %v, "connected to the Docker engine");
                Ok(ApiLevel {
                    console_size: parsed >= CONSOLE_SIZE_API,
                })
            })
            .await
    }

    /// Force-removes one container, bounded by `docker.timeouts.containerStop`.
    async fn remove_container(&self, id: &str) -> Result<(), DockerError> {
        let limit = self.timeouts.container_stop.0;
        within(limit, "container remove", self.client.remove_container(id)).await
    }

    async fn ensure_image(&self) -> Result<(), StartError> {
        let image = self.image.clone();
        let pull = match self.exec.image_pull_policy {
            PullPolicy::Never => false,
            PullPolicy::Always => true,
            PullPolicy::IfNotPresent => !self
                .client
                .image_exists(&image)
                .await
                .map_err(|e| StartError::EngineUnreachable(e.into()))?,
        };
        if !pull {
            return Ok(());
        }
        let auth = (!self.exec.auth.is_empty()).then(|| {
            base64::engine::general_purpose::URL_SAFE
                .encode(Value::Object(self.exec.auth.clone()).to_string())
        });
        self.client
            .pull_image(&image, auth.as_deref())
            .await
            .map_err(|e| match e {
                DockerError::ImageNotFound { image } => StartError::ImageNotFound(image),
                other => StartError::PullFailed {
                    image: image.clone(),
                    source: other.into(),
                },
            })
    }

    fn labels(&self, meta: &ConnMeta) -> Value {
        let mut labels = get_ci(&self.exec.container, "labels")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        labels.insert(LABEL_INSTANCE.into(), json!(self.instance));
        labels.insert(LABEL_CONNECTION_ID.into(), json!(meta.connection_id));
        labels.insert(LABEL_USERNAME.into(), json!(meta.username));
        labels.insert(LABEL_IP.into(), json!(meta.remote_ip));
        Value::Object(labels)
    }

    /// The container create body: the user's `container`/`host`/`network` blocks as written
    /// (the engine matches keys case-insensitively), with our command, labels and stdio set.
    fn create_body(&self, meta: &ConnMeta, cmd: &[String], session: Option<&ProgramSpec>) -> Value {
        let mut body = self.exec.container.clone();
        replace_ci(&mut body, "Cmd", json!(cmd));
        replace_ci(&mut body, "Labels", self.labels(meta));
        let mut host = self.exec.host.clone();
        if get_ci(&host, "LogConfig").is_none() {
            // json-file logging halves throughput and keeps a copy of everything users type.
            host.insert("LogConfig".into(), json!({"Type": "none"}));
        }
        if let Some(spec) = session {
            let mut env: Vec<Value> = get_ci(&body, "Env")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            env.extend(spec.env.iter().map(|e| json!(e)));
            replace_ci(&mut body, "Env", Value::Array(env));
            replace_ci(&mut body, "Tty", json!(spec.tty.is_some()));
            for k in [
                "OpenStdin",
                "StdinOnce",
                "AttachStdin",
                "AttachStdout",
                "AttachStderr",
            ] {
                replace_ci(&mut body, k, json!(true));
            }
            if let Some((rows, cols)) = spec.tty.as_ref().and_then(|t| t.size()) {
                replace_ci(&mut host, "ConsoleSize", json!([rows, cols]));
            }
        }
        if self.agent_volume_used() {
            let mut mounts: Vec<Value> = get_ci(&host, "Mounts")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            mounts.push(json!({
                "Type": "volume",
                "Source": self.agent.as_ref().and_then(|a| a.inject.as_ref()).map(|t| t.volume_name.clone()),
                "Target": agent::AGENT_DIR,
                "ReadOnly": true,
            }));
            replace_ci(&mut host, "Mounts", Value::Array(mounts));
        }
        replace_ci(&mut body, "HostConfig", Value::Object(host));
        if !self.exec.network.is_empty() {
            replace_ci(
                &mut body,
                "NetworkingConfig",
                Value::Object(self.exec.network.clone()),
            );
        }
        Value::Object(body)
    }

    /// `os/architecture[/variant]` from the OCI platform block, as the engine's query wants it.
    fn name(&self) -> Option<&str> {
        (!self.exec.container_name.is_empty()).then_some(self.exec.container_name.as_str())
    }

    async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, StartError>>,
    ) -> Result<T, StartError> {
        let limit = self.timeouts.container_start.0;
        tokio::time::timeout(limit, fut)
            .await
            .unwrap_or(Err(StartError::Timeout(limit)))
    }

    /// Connection mode: a container running `idleCommand`, for `meta`'s connection, or (none)
    /// a pool member: our instance and pool labels, none of a connection or user.
    async fn start_idle_container(&self, meta: Option<&ConnMeta>) -> Result<String, StartError> {
        self.bounded(async {
            self.ready().await?;
            self.ensure_image().await?;
            self.prepare_agent_volume().await;
            let nobody = ConnMeta {
                connection_id: String::new(),
                username: String::new(),
                remote_ip: String::new(),
            };
            let mut cmd = self.idle_command();
            if self.runs_session_server() {
                cmd.truncate(1);
                cmd.push("session-server".into());
            }
            let mut body = self.create_body(meta.unwrap_or(&nobody), &cmd, None);
            if self.runs_session_server() {
                // Reached through attach; stdin stays open between attaches.
                for (k, v) in [
                    ("OpenStdin", true),
                    ("StdinOnce", false),
                    ("AttachStdin", true),
                    ("AttachStdout", true),
                    ("AttachStderr", true),
                    ("Tty", false),
                ] {
                    if let Some(obj) = body.as_object_mut() {
                        replace_ci(obj, k, json!(v));
                    }
                }
            }
            if meta.is_none() {
                if let Some(labels) = body.get_mut("Labels").and_then(Value::as_object_mut) {
                    for per_connection in [LABEL_CONNECTION_ID, LABEL_USERNAME, LABEL_IP] {
                        labels.remove(per_connection);
                    }
                    labels.insert(LABEL_POOL.into(), json!("1"));
                }
            }
            let id = self.create(&body).await?;
            if let Err(e) = self.put_agent(&id).await {
                self.discard(&id).await;
                return Err(e);
            }
            if let Err(e) = self.client.start_container(&id).await {
                self.discard(&id).await;
                return Err(StartError::ContainerFailed(e.into()));
            }
            let connection_id = meta.map_or("(pool)", |m| m.connection_id.as_str());
            tracing::debug!(container = %id, connection_id, "container started");
            Ok(id)
        })
        .await
    }

    /// Removes a container that failed to start, at once rather than at disconnect.
    async fn discard(&self, id: &str) {
        if let Err(e) = self.remove_container(id).await {
            tracing::warn!(code = "DOCKER_CONTAINER_REMOVE_FAILED", container = %id, error = %e, "cannot remove a container that failed to start");
        }
    }

    /// Persistent mode: the container named `containername`, started if it is stopped, created
    /// (running `idleCommand`) if missing and `createMissingContainer` allows.
    async fn find_persistent_container(&self, meta: &ConnMeta) -> Result<String, StartError> {
        self.bounded(async {
            self.ready().await?;
            let name = self.exec.container_name.clone();
            let failed = |e: DockerError| StartError::ContainerFailed(e.into());
            match self.client.inspect_container(&name).await {
                Ok(info) => {
                    // Refreshed every time: the container may predate us or this version.
                    self.put_agent(&name).await?;
                    if !info.running {
                        self.client.start_container(&name).await.map_err(failed)?;
                    }
                    return Ok(name);
                }
                Err(DockerError::NoSuchContainer { .. }) if self.exec.create_missing_container => {}
                Err(DockerError::NoSuchContainer { .. }) => {
                    return Err(StartError::ContainerFailed(
                        format!("container {name} does not exist").into(),
                    ))
                }
                Err(e) => return Err(StartError::EngineUnreachable(e.into())),
            }
            self.ensure_image().await?;
            let mut body = self.create_body(meta, &self.idle_command(), None);
            if let Some(labels) = body.get_mut("Labels").and_then(Value::as_object_mut) {
                for ours in [
                    LABEL_INSTANCE,
                    LABEL_CONNECTION_ID,
                    LABEL_USERNAME,
                    LABEL_IP,
                ] {
                    labels.remove(ours);
                }
                labels.insert(LABEL_PERSISTENT.into(), json!("1"));
            }
            match self
                .client
                .create_container(Some(&name), self.platform.as_deref(), &body)
                .await
            {
                Ok(_) => self.put_agent(&name).await?,
                // 409: another connection created it first; use theirs.
                Err(DockerError::Status { status: 409, .. }) => {}
                Err(DockerError::ImageNotFound { .. }) => {
                    return Err(StartError::ImageNotFound(self.image.clone()))
                }
                Err(e) => return Err(failed(e)),
            }
            self.client.start_container(&name).await.map_err(failed)?;
            tracing::info!(code = "DOCKER_CONTAINER_CREATE", container = %name, "created persistent container");
            Ok(name)
        })
        .await
    }

    async fn create(&self, body: &Value) -> Result<String, StartError> {
        self.client
            .create_container(self.name(), self.platform.as_deref(), body)
            .await
            .map_err(|e| match e {
                // The engine's 404 does not say which image; we know.
                DockerError::ImageNotFound { .. } => StartError::ImageNotFound(self.image.clone()),
                e if e.is_unreachable() => StartError::EngineUnreachable(e.into()),
                other => StartError::ContainerFailed(other.into()),
            })
    }

    fn program(&self, target: Target) -> DockerProgram {
        DockerProgram {
            client: self.client.clone(),
            target,
            exit_deadline: self.timeouts.command_start.0,
            resize_timeout: self.timeouts.window.0,
            signal_timeout: self.timeouts.signal.0,
        }
    }

    /// The command a program really runs as: under the agent's `console` (ours sizes the
    /// terminal itself; before an image's own agent, a shell does), or on its own.
    fn program_argv(&self, spec: &ProgramSpec, api: &ApiLevel) -> Vec<String> {
        match self.agent_at() {
            Some(a) if a.ours => console_argv(&a, spec.tty.as_ref(), &[], false, spec.argv.clone()),
            Some(a) => console_argv(&a, spec.tty.as_ref(), &[], false, sized_argv(spec, api)),
            None => sized_argv(spec, api),
        }
    }

    async fn process(
        &self,
        reader: HijackedReader,
        writer: HijackedWriter,
        spec: &ProgramSpec,
        target: Target,
        container: Arc<dyn Container>,
    ) -> Process {
        let (pid, pid_rx) = pid_channel(self.agent.is_some());
        let control = ProcessControl::new(
            Box::new(self.program(target)),
            container,
            pid_rx,
            DISABLE_AGENT_KEY,
            self.timeouts.signal.0,
        );
        let stream = match &spec.tty {
            Some(t) => {
                // Also resize after start: covers engines that ignore ConsoleSize.
                if let Err(e) = control.resize(t.rows, t.cols).await {
                    tracing::debug!(error = %e, "initial resize failed");
                }
                OutputStream::Raw(reader, BytesMut::new(), ReadSizer::default())
            }
            None => OutputStream::Muxed(Demuxer::new(reader)),
        };
        Process {
            stdin: Box::new(writer),
            output: ProcessOutput::new(Box::new(stream), pid),
            control,
        }
    }
}

impl Docker {
    /// The backend for `docker`, copying `agent` into every container it starts (unless the
    /// agent is disabled); `session_server`: connection containers run the agent's
    /// `session-server`, which starts their sessions.
    pub fn backend(
        cfg: &DockerSettings,
        instance: &str,
        agent: Option<&AgentBinary>,
        session_server: bool,
    ) -> Result<DockerBackend, Box<dyn std::error::Error>> {
        let mut docker = Docker::new(cfg, instance)?.inject_agent(agent)?;
        if let Some(a) = docker.agent.as_mut() {
            a.session_server = session_server;
        }
        let pool = &cfg.execution.pool;
        if pool.size > 0 {
            docker.pool = Some(Pool::new(pool.size, pool.max_age.0, docker.identity()));
        }
        Ok(Engine::of(docker))
    }

    /// Where the agent is in our containers, for the start-up log.
    pub fn agent_path(&self) -> Option<&str> {
        self.agent.as_ref().map(|a| a.path.as_str())
    }
}

impl Runtime for Docker {
    const DISABLE_AGENT_KEY: &'static str = DISABLE_AGENT_KEY;
    const KIND: &'static str = "docker";
    type Error = DockerError;

    fn mode(&self) -> ExecutionMode {
        self.exec.mode
    }

    fn has_agent(&self) -> bool {
        self.agent.is_some()
    }

    fn warm(self: &Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        if let Some(pool) = &self.pool {
            tokio::spawn(Arc::clone(pool).run(Arc::clone(self), stop));
        }
    }

    fn login_env(&self, login: &LoginMetadata) -> Vec<String> {
        if !self.exec.expose_auth_metadata_as_env {
            return Vec::new();
        }
        login
            .values
            .iter()
            .filter(|(k, _)| crate::auth::metadata::env_name_ok(k))
            .map(|(k, v)| format!("{k}={v}"))
            .collect()
    }

    async fn connection_container(
        &self,
        meta: &ConnMeta,
        _login: &LoginMetadata,
    ) -> Result<(String, Option<AgentAt>), StartError> {
        let id = if self.mode() == ExecutionMode::Persistent {
            self.find_persistent_container(meta).await?
        } else if let Some(id) = self.claim(meta).await {
            id
        } else {
            self.start_idle_container(Some(meta)).await?
        };
        Ok((id, self.agent_at()))
    }

    /// With the archive API (owned by root): the only way before a session container starts,
    /// or without the agent. Failures are logged, as in ContainerSSH.
    async fn put_files(&self, container: &str, files: &[LoginFile]) {
        for f in files {
            if let Err(e) = self.put_file(container, f).await {
                tracing::warn!(code = "BACKEND_LOGIN_FILE_FAILED", container, path = %f.path, error = %e, "cannot write a login file into the container");
            }
        }
    }

    /// A container whose main process is the program, attached before it starts so that no
    /// output is lost.
    async fn run_session(
        self: &Arc<Self>,
        meta: &ConnMeta,
        spec: &ProgramSpec,
    ) -> Result<SessionStart, StartError> {
        self.bounded(async {
            let api = self.ready().await?;
            self.ensure_image().await?;
            self.prepare_agent_volume().await;
            let body = self.create_body(meta, &self.program_argv(spec, api), Some(spec));
            let id = self.create(&body).await?;
            if let Err(e) = self.put_agent(&id).await {
                self.discard(&id).await;
                return Err(e);
            }
            self.put_files(&id, &spec.login.files).await;
            let started = async {
                let hijacked = self.client.attach_container(&id).await?;
                self.client.start_container(&id).await?;
                Ok::<_, DockerError>(hijacked)
            };
            let hijacked = match started.await {
                Ok(h) => h,
                Err(e) => {
                    self.discard(&id).await;
                    return Err(StartError::ContainerFailed(e.into()));
                }
            };
            let container: Arc<dyn Container> = Arc::new(Handle::new(
                Arc::clone(self),
                id.clone(),
                self.agent_at(),
                true,
            ));
            let process = self
                .process(
                    hijacked.reader,
                    hijacked.writer,
                    spec,
                    Target::Container(id),
                    Arc::clone(&container),
                )
                .await;
            Ok((container, process))
        })
        .await
    }

    /// Every container of one connection, found by label, so that nothing created while the
    /// connection was closing escapes.
    async fn remove_connection(&self, connection_id: &str) -> Result<usize, DockerError> {
        if self.api.get().is_none() {
            // Never reached the engine for this connection: nothing can exist.
            return Ok(0);
        }
        let removed = async {
            let ids = self
                .client
                .list_containers(&[
                    (LABEL_INSTANCE, &self.instance),
                    (LABEL_CONNECTION_ID, connection_id),
                ])
                .await?;
            for id in &ids {
                self.remove_container(id).await?;
                tracing::debug!(container = %id, connection_id, "container removed");
            }
            let mut removed = ids.len();
            // A pool member has no label of the connection's: the pool knows its claim.
            if let Some(pool) = &self.pool {
                if let Some(id) = pool.claimed_by(connection_id) {
                    self.remove_container(&id).await?;
                    pool.released(connection_id);
                    tracing::debug!(container = %id, connection_id, "pool member removed");
                    removed += 1;
                }
            }
            Ok::<_, DockerError>(removed)
        };
        removed.await
    }

    /// Every container this instance labelled.
    async fn reap(&self) -> Result<usize, DockerError> {
        let ids = async {
            self.client.negotiate().await?;
            self.client
                .list_containers(&[(LABEL_INSTANCE, &self.instance)])
                .await
        };
        let ids = ids.await?;
        let mut removed = 0;
        for id in &ids {
            // One stuck container must not keep the others alive.
            match self.remove_container(id).await {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(code = "DOCKER_CONTAINER_REMOVE_FAILED", container = %id, error = %e, "cannot remove leftover container")
                }
            }
        }
        Ok(removed)
    }

    /// A login's own `docker` block (the config webhook's) that names the same engine and
    /// keeps the agent where it is: this backend's client and agent archive, shared.
    fn derive(&self, login: &Settings, same_connection: bool) -> Option<Arc<dyn Backend>> {
        // Checked by the caller (build::for_login); not taken over otherwise.
        let cfg = DockerSettings::check(&login.docker).ok()?;
        let same_agent = self.agent_path()
            == (!cfg.execution.disable_agent).then_some(cfg.execution.agent_path.as_str());
        (same_connection && same_agent).then(|| {
            Arc::new(Engine::of(Docker {
                client: self.client.clone(),
                exec: cfg.execution,
                image: cfg.image,
                platform: cfg.platform,
                timeouts: cfg.timeouts,
                instance: self.instance.clone(),
                api: OnceCell::new(),
                agent: self.agent.clone(),
                pool: self.pool.clone(),
            })) as Arc<dyn Backend>
        })
    }

    /// Connection and persistent modes: one program as an exec in the container.
    async fn exec(
        &self,
        container: &str,
        spec: &ProgramSpec,
        handle: Arc<dyn Container>,
    ) -> Result<Process, StartError> {
        let api = self.ready().await?;
        let cmd = self.program_argv(spec, api);
        let exec_spec = ExecSpec {
            cmd,
            env: spec.env.clone(),
            tty: spec.tty.is_some(),
            console_size: spec.tty.as_ref().and_then(|t| t.size()),
            user: None,
            working_dir: None,
        };
        let fail = |e: DockerError| StartError::ExecFailed(e.into());
        let exec_id = self
            .client
            .create_exec(container, &exec_spec)
            .await
            .map_err(fail)?;
        let hijacked = self
            .client
            .start_exec(&exec_id, exec_spec.tty)
            .await
            .map_err(fail)?;
        Ok(self
            .process(
                hijacked.reader,
                hijacked.writer,
                spec,
                Target::Exec(exec_id),
                handle,
            )
            .await)
    }

    /// A helper exec, bounded by `docker.timeouts.commandStart`.
    async fn capture(
        &self,
        container: &str,
        cmd: Vec<String>,
        stdin: Option<&[u8]>,
    ) -> Result<Captured, DockerError> {
        let limit = self.timeouts.command_start.0;
        let run = run_capture(&self.client, container, cmd, stdin, limit);
        within(limit, "helper exec", run).await
    }

    async fn start_agent_command(
        &self,
        container: &str,
        _agent: Option<&AgentAt>,
        args: &[&str],
    ) -> Result<AgentStreams, StartError> {
        let Some(agent) = self.agent_at() else {
            return Err(StartError::ExecFailed(
                format!("the in-container agent is disabled ({DISABLE_AGENT_KEY})").into(),
            ));
        };
        let cmd = agent::command_argv(&agent, args);
        let spec = ExecSpec {
            cmd,
            ..ExecSpec::default()
        };
        let fail = |e: DockerError| StartError::ExecFailed(e.into());
        let limit = self.timeouts.command_start.0;
        let started = within(limit, "agent exec", async {
            let id = self.client.create_exec(container, &spec).await?;
            self.client.start_exec(&id, false).await
        })
        .await
        .map_err(fail)?;
        let output = OutputStream::Muxed(Demuxer::new(started.reader));
        Ok((Box::new(output), Box::new(started.writer)))
    }

    async fn attach_agent(&self, name: &str) -> Option<AgentStreams> {
        if !self.uses_session_server() {
            return None;
        }
        if !self.runs_session_server() {
            // Logged main process or another idle command: one exec for the connection.
            return match self
                .start_agent_command(name, None, &["session-server"])
                .await
            {
                Ok(streams) => Some(streams),
                Err(e) => {
                    tracing::warn!(code = "BACKEND_AGENT_ATTACH_FAILED", container = %name, error = %e, "cannot start the session agent; sessions start with exec");
                    None
                }
            };
        }
        let limit = self.timeouts.command_start.0;
        match within(limit, "agent attach", self.client.attach_container(name)).await {
            Ok(h) => Some((
                Box::new(OutputStream::Muxed(Demuxer::new(h.reader))),
                Box::new(h.writer),
            )),
            Err(e) => {
                tracing::warn!(code = "BACKEND_AGENT_ATTACH_FAILED", container = %name, error = %e, "cannot reach the session agent; sessions start with exec");
                None
            }
        }
    }

    fn helper_timeout(&self) -> Duration {
        self.timeouts.command_start.0
    }

    async fn remove(&self, name: &str) {
        if let Err(e) = self.remove_container(name).await {
            tracing::warn!(code = "DOCKER_CONTAINER_REMOVE_FAILED", container = %name, error = %e, "cannot remove session container");
        }
    }
}

impl Members for Docker {
    async fn start_member(&self) -> Result<String, StartError> {
        self.start_idle_container(None).await
    }

    async fn member_alive(&self, id: &str) -> bool {
        matches!(self.client.inspect_container(id).await, Ok(info) if info.running)
    }

    async fn remove_member(&self, id: &str) -> bool {
        match self.remove_container(id).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(code = "DOCKER_CONTAINER_REMOVE_FAILED", container = %id, error = %e, "cannot remove a pool member: the reaper removes it at the next start");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace_ci_replaces_every_spelling() {
        let mut m = Map::new();
        m.insert("cmd".into(), json!(["a"]));
        m.insert("CMD".into(), json!(["b"]));
        let old = replace_ci(&mut m, "Cmd", json!(["c"]));
        assert!(old.is_some());
        assert_eq!(m.len(), 1);
        assert_eq!(m["Cmd"], json!(["c"]));
    }

    #[test]
    fn create_body_keeps_user_labels_and_adds_ours() {
        let mut cfg = crate::config::model::DockerConfig::default();
        cfg.execution.container =
            serde_json::from_str(r#"{"image":"img","labels":{"team":"blue"},"env":["A=1"]}"#)
                .unwrap();
        let b = Docker::new(&DockerSettings::check(&cfg).unwrap(), "inst").unwrap();
        let meta = ConnMeta {
            connection_id: "c1".into(),
            username: "alice".into(),
            remote_ip: "127.0.0.1".into(),
        };
        let spec = ProgramSpec {
            argv: vec!["sh".into()],
            env: vec!["B=2".into()],
            tty: None,
            login: Default::default(),
        };
        let body = b.create_body(&meta, &spec.argv, Some(&spec));
        assert_eq!(body["Labels"]["team"], "blue");
        assert_eq!(body["Labels"][LABEL_INSTANCE], "inst");
        assert_eq!(body["Labels"][LABEL_CONNECTION_ID], "c1");
        assert_eq!(body["Env"], json!(["A=1", "B=2"]));
        assert_eq!(body["HostConfig"]["LogConfig"]["Type"], "none");
        assert_eq!(body["OpenStdin"], true);
        assert!(body.get("labels").is_none());
    }
}
