//! The Docker backend proper: turns ContainerSSH's `docker.execution` settings into containers
//! and execs, labels everything it creates, and removes it again (per connection, per session,
//! and at start-up for what a crashed run of the same instance left behind).

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{watch, OnceCell};

use super::archive::{build_tar, ArchiveError, TarData, TarEntry};
use super::{
    Demuxer, DockerClient, DockerConnection, DockerError, ExecSpec, HijackedReader, HijackedWriter,
    ReadSizer, StreamKind,
};
use crate::auth::metadata::LoginFile;
use crate::backend::agent::AgentBinary;
use crate::backend::process::{
    console_argv, keep, pid_channel, reported_pid, Captured, ControlError, OutputSource, Process,
    ProcessOutput,
};
use crate::backend::{signal_number, ConnMeta, ExitReport, ProgramSpec, StartError};
use crate::config::model::{DockerConfig, DockerExecutionConfig, DockerTimeouts, PullPolicy};

pub const LABEL_INSTANCE: &str = "containerssh_instance";
pub const LABEL_CONNECTION_ID: &str = "containerssh_connection_id";
pub const LABEL_USERNAME: &str = "containerssh_username";
pub const LABEL_IP: &str = "containerssh_ip";
/// Marks a persistent-mode container we created; it carries no instance or connection label,
/// so neither the reaper nor connection cleanup ever removes it.
pub const LABEL_PERSISTENT: &str = "containerssh_persistent";

/// First API version that applies `ConsoleSize` at container and exec creation (Docker 23).
const CONSOLE_SIZE_API: (u32, u32) = (1, 42);

/// Exit status reported when the engine cannot tell one (ContainerSSH sends 137 too).
const UNKNOWN_EXIT_STATUS: u32 = 137;

struct ApiLevel {
    console_size: bool,
}

/// The agent archives uploaded into every container we start.
#[derive(Clone)]
struct AgentTars {
    /// The parent directory of `agentPath`, for the upload that assumes it exists.
    dir: String,
    /// Just the file, extracted into `dir`.
    in_dir: Bytes,
    /// `dir` and its parents, extracted into `/` first when `dir` is missing (small; the
    /// file is never held twice).
    dirs: Bytes,
}

/// How programs reach the agent: `None` in [`DockerBackend`] when `disableAgent` is set.
#[derive(Clone)]
struct AgentUse {
    /// `docker.execution.agentPath`.
    path: String,
    /// What we upload; `None` when the image is expected to carry the agent.
    inject: Option<AgentTars>,
}

pub struct DockerBackend {
    client: DockerClient,
    exec: DockerExecutionConfig,
    timeouts: DockerTimeouts,
    instance: String,
    api: OnceCell<ApiLevel>,
    agent: Option<AgentUse>,
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
    pub(crate) async fn next(&mut self) -> io::Result<Option<(StreamKind, Bytes)>> {
        match self {
            OutputStream::Raw(r, buf, sizer) => {
                sizer.prepare(buf);
                let n = r.read_buf(buf).await?;
                sizer.record(n);
                Ok((n > 0).then(|| (StreamKind::Stdout, buf.split_to(n).freeze())))
            }
            OutputStream::Muxed(d) => d.next_frame().await,
        }
    }
}

#[derive(Clone)]
enum Target {
    Exec(String),
    Container(String),
}

/// The agent's view of one program: where to run `agent signal`, and the program's PID.
#[derive(Clone)]
struct AgentCtl {
    path: String,
    container: String,
    pid: watch::Receiver<Option<u32>>,
}

/// Resize, signal and wait for a started program.
#[derive(Clone)]
pub struct ProcessControl {
    client: DockerClient,
    target: Target,
    last_signal: Arc<Mutex<Option<String>>>,
    agent: Option<AgentCtl>,
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

impl ProcessControl {
    pub async fn resize(&self, rows: u32, cols: u32) -> Result<(), DockerError> {
        within(self.resize_timeout, "resize", async {
            match &self.target {
                Target::Exec(id) => self.client.resize_exec(id, rows, cols).await,
                Target::Container(id) => self.client.resize_container(id, rows, cols).await,
            }
        })
        .await
    }

    /// The program's PID as the agent reported it, waiting for the report up to `limit`.
    async fn pid(&self, limit: Duration) -> Option<u32> {
        reported_pid(&Some(self.agent.as_ref()?.pid.clone()), limit).await
    }

    pub async fn signal(&self, name: &str) -> Result<(), ControlError> {
        if signal_number(name).is_none() {
            return Err(ControlError::UnknownSignal(name.into()));
        }
        if let Some(agent) = &self.agent {
            let pid = self
                .pid(self.signal_timeout)
                .await
                .ok_or(ControlError::NoPid)?;
            if let Ok(mut last) = self.last_signal.lock() {
                *last = Some(name.to_string());
            }
            let cmd = [
                &agent.path,
                "signal",
                "--pid",
                &pid.to_string(),
                "--signal",
                name,
            ]
            .map(String::from)
            .to_vec();
            let out = within(
                self.signal_timeout,
                "signal",
                run_capture(
                    &self.client,
                    &agent.container,
                    cmd,
                    None,
                    self.signal_timeout,
                ),
            )
            .await
            .map_err(|e| ControlError::Backend(e.to_string()))?;
            if out.code != 0 {
                return Err(ControlError::Agent(out.message()));
            }
            return Ok(());
        }
        let Target::Container(id) = &self.target else {
            return Err(ControlError::SignalUnsupported(
                "docker.execution.disableAgent",
            ));
        };
        if let Ok(mut last) = self.last_signal.lock() {
            *last = Some(name.to_string());
        }
        let sig = format!("SIG{name}");
        within(
            self.signal_timeout,
            "signal",
            self.client.kill_container(id, &sig),
        )
        .await
        .map_err(|e| ControlError::Backend(e.to_string()))?;
        Ok(())
    }

    /// How the program ended. Call after its output stream has ended.
    pub async fn wait(&self) -> ExitReport {
        let code = match &self.target {
            Target::Exec(id) => self.client.exec_exit_code(id, self.exit_deadline).await,
            Target::Container(id) => self.client.wait_container(id).await,
        };
        let code = match code {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read exit status");
                return ExitReport::Status(UNKNOWN_EXIT_STATUS);
            }
        };
        // Docker reports death by signal N as 128+N, the same as `exit 128+N`. The agent knows
        // which it was while the container runs (exec programs); otherwise it is only
        // unambiguous for a signal we delivered ourselves.
        if let (Some(name), Target::Exec(_)) = (self.exit_signal(code).await, &self.target) {
            return ExitReport::Signal { name };
        }
        let last = self.last_signal.lock().ok().and_then(|l| l.clone());
        if let Some(name) = last {
            if signal_number(&name).map(|n| 128 + i64::from(n)) == Some(code) {
                return ExitReport::Signal { name };
            }
        }
        ExitReport::Status(u32::try_from(code).unwrap_or(UNKNOWN_EXIT_STATUS))
    }

    /// Asks the agent whether an exec'd program that exited with `code` died of a signal.
    async fn exit_signal(&self, code: i64) -> Option<String> {
        let agent = self.agent.as_ref()?;
        if !(129..=128 + 64).contains(&code) || !matches!(self.target, Target::Exec(_)) {
            return None;
        }
        let pid = *agent.pid.borrow();
        let cmd = [&agent.path, "exit-info", "--pid", &pid?.to_string()]
            .map(String::from)
            .to_vec();
        let run = run_capture(
            &self.client,
            &agent.container,
            cmd,
            None,
            self.signal_timeout,
        );
        match within(self.signal_timeout, "exit-info", run).await {
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

impl AgentTars {
    fn new(path: &str, binary: &AgentBinary) -> Result<Self, ArchiveError> {
        let rel = path.trim_start_matches('/');
        let (dir, name) = match rel.rsplit_once('/') {
            Some((d, n)) => (d, n),
            None => ("", rel),
        };
        let in_dir = build_tar(&[TarEntry {
            path: name,
            mode: 0o755,
            data: TarData::File(&binary.bytes),
        }])?
        .into();
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
        Ok(Self {
            dir: format!("/{dir}"),
            in_dir,
            dirs: build_tar(&entries)?.into(),
        })
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

fn get_ci<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(key))
        .map(|(_, v)| v)
}

impl DockerBackend {
    pub fn new(cfg: &DockerConfig, instance: &str) -> Result<Self, DockerError> {
        let opt = |s: &String| (!s.is_empty()).then(|| s.clone());
        let conn = DockerConnection {
            host: cfg.connection.host.clone(),
            cacert: opt(&cfg.connection.cacert),
            cert: opt(&cfg.connection.cert),
            key: opt(&cfg.connection.key),
        };
        Ok(Self {
            client: DockerClient::new(&conn, cfg.timeouts.http.0)?,
            exec: cfg.execution.clone(),
            timeouts: cfg.timeouts.clone(),
            instance: instance.to_string(),
            api: OnceCell::new(),
            agent: (!cfg.execution.disable_agent).then(|| AgentUse {
                path: cfg.execution.agent_path.clone(),
                inject: None,
            }),
        })
    }

    /// Copies `binary` into every container before it starts (unless the agent is disabled).
    pub fn inject_agent(mut self, binary: Option<&AgentBinary>) -> Result<Self, ArchiveError> {
        if let (Some(agent), Some(binary)) = (self.agent.as_mut(), binary) {
            agent.inject = Some(AgentTars::new(&agent.path, binary)?);
        }
        Ok(self)
    }

    pub fn mode(&self) -> crate::config::model::ExecutionMode {
        self.exec.mode
    }

    /// This backend with a login's own `docker` block (the config webhook's), sharing the
    /// engine client and the agent archive; `None` when the block names another engine or
    /// moves or disables the agent (then a backend of its own is needed).
    pub fn derive(&self, cfg: &DockerConfig, same_connection: bool) -> Option<DockerBackend> {
        let same_agent = self.agent.as_ref().map(|a| a.path.as_str())
            == (!cfg.execution.disable_agent).then_some(cfg.execution.agent_path.as_str());
        (same_connection && same_agent).then(|| DockerBackend {
            client: self.client.clone(),
            exec: cfg.execution.clone(),
            timeouts: cfg.timeouts.clone(),
            instance: self.instance.clone(),
            api: OnceCell::new(),
            agent: self.agent.clone(),
        })
    }

    /// Whether programs run under the agent (signals, forwarding and files need it).
    pub fn agent_path(&self) -> Option<&str> {
        self.agent.as_ref().map(|a| a.path.as_str())
    }

    /// Uploads the agent into a container (created or running), bounded by `containerStart`.
    async fn put_agent(&self, id: &str) -> Result<(), StartError> {
        let Some(tars) = self.agent.as_ref().and_then(|a| a.inject.as_ref()) else {
            return Ok(());
        };
        let upload = async {
            match self
                .client
                .put_archive(id, &tars.dir, tars.in_dir.clone())
                .await
            {
                // The directory is missing from the image: create it, then try again.
                Err(DockerError::Status { status: 404, .. }) => {
                    self.client.put_archive(id, "/", tars.dirs.clone()).await?;
                    self.client
                        .put_archive(id, &tars.dir, tars.in_dir.clone())
                        .await
                }
                other => other,
            }
        };
        within(self.timeouts.container_start.0, "agent upload", upload)
            .await
            .map_err(|e| {
                StartError::ContainerFailed(format!(
                    "cannot copy the agent into the container (a read-only root file system needs the agent in the image and agent.inject: false, or docker.execution.disableAgent): {e}"
                ))
            })
    }

    /// Writes the login's files into a container: through the agent (as the container's user)
    /// when `running` and the agent is on, else with the archive API (owned by root; the only
    /// way before a session container starts). Failures are logged, as in ContainerSSH.
    pub async fn write_files(&self, container: &str, files: &[LoginFile], running: bool) {
        for f in files {
            let written = match (&self.agent, running) {
                (Some(agent), true) => {
                    let mut cmd = vec![agent.path.clone(), "write-file".into(), f.path.clone()];
                    if agent.inject.is_some() {
                        // ContainerSSH's agent has neither --mode nor --size (with which a
                        // cut-off upload leaves the file untouched).
                        cmd.extend([
                            "--mode".into(),
                            format!("{:o}", f.mode),
                            "--size".into(),
                            f.data.len().to_string(),
                        ]);
                    }
                    match self.capture(container, cmd, Some(&f.data)).await {
                        Ok(out) if out.code == 0 => Ok(()),
                        Ok(out) => Err(out.message()),
                        Err(e) => Err(e.to_string()),
                    }
                }
                _ => self.put_file(container, f).await,
            };
            if let Err(e) = written {
                tracing::warn!(container, path = %f.path, error = %e, "cannot write a login file into the container");
            }
        }
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

    /// Starts a long-running agent command (`forward-server`) with its stdio attached; it
    /// ends when its stdin is closed.
    pub async fn start_agent_command(
        &self,
        container: &str,
        args: &[&str],
    ) -> Result<(Demuxer<HijackedReader>, HijackedWriter), StartError> {
        let Some(agent) = &self.agent else {
            return Err(StartError::ExecFailed(
                "the in-container agent is disabled (docker.execution.disableAgent)".into(),
            ));
        };
        let mut cmd = vec![agent.path.clone()];
        cmd.extend(args.iter().map(|a| a.to_string()));
        let spec = ExecSpec {
            cmd,
            ..ExecSpec::default()
        };
        let fail = |e: DockerError| StartError::ExecFailed(e.to_string());
        let limit = self.timeouts.command_start.0;
        let started = within(limit, "agent exec", async {
            let id = self.client.create_exec(container, &spec).await?;
            self.client.start_exec(&id, false).await
        })
        .await
        .map_err(fail)?;
        Ok((Demuxer::new(started.reader), started.writer))
    }

    /// Runs a helper exec in a running container, bounded by `docker.timeouts.commandStart`.
    pub async fn capture(
        &self,
        container: &str,
        cmd: Vec<String>,
        stdin: Option<&[u8]>,
    ) -> Result<Captured, DockerError> {
        let limit = self.timeouts.command_start.0;
        within(
            limit,
            "helper exec",
            run_capture(&self.client, container, cmd, stdin, limit),
        )
        .await
    }

    pub fn image(&self) -> String {
        get_ci(&self.exec.container, "image")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    }

    /// Negotiates the API version once; an engine that is down now may be up for the next login.
    async fn ready(&self) -> Result<&ApiLevel, StartError> {
        self.api
            .get_or_try_init(|| async {
                let v = self
                    .client
                    .negotiate()
                    .await
                    .map_err(|e| StartError::EngineUnreachable(e.to_string()))?;
                let parsed = v
                    .split_once('.')
                    .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                    .unwrap_or((1, 0));
                tracing::info!(api_version = %v, "connected to the Docker engine");
                Ok(ApiLevel {
                    console_size: parsed >= CONSOLE_SIZE_API,
                })
            })
            .await
    }

    /// Removes every container this instance labelled: what a crashed run left behind.
    pub async fn reap(&self) -> Result<usize, DockerError> {
        self.client.negotiate().await?;
        let ids = self
            .client
            .list_containers(&[(LABEL_INSTANCE, &self.instance)])
            .await?;
        let mut removed = 0;
        for id in &ids {
            // One stuck container must not keep the others alive.
            match self.remove_container(id).await {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(container = %id, error = %e, "cannot remove leftover container")
                }
            }
        }
        Ok(removed)
    }

    /// Removes every container of one connection, found by label, so that nothing created
    /// while the connection was closing escapes.
    pub async fn remove_connection(&self, connection_id: &str) -> Result<usize, DockerError> {
        if self.api.get().is_none() {
            // Never reached the engine for this connection: nothing can exist.
            return Ok(0);
        }
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
        Ok(ids.len())
    }

    /// Force-removes one container, bounded by `docker.timeouts.containerStop`.
    pub async fn remove_container(&self, id: &str) -> Result<(), DockerError> {
        let limit = self.timeouts.container_stop.0;
        within(limit, "container remove", self.client.remove_container(id)).await
    }

    async fn ensure_image(&self) -> Result<(), StartError> {
        let image = self.image();
        let pull = match self.exec.image_pull_policy {
            PullPolicy::Never => false,
            PullPolicy::Always => true,
            PullPolicy::IfNotPresent => !self
                .client
                .image_exists(&image)
                .await
                .map_err(|e| StartError::EngineUnreachable(e.to_string()))?,
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
                    message: other.to_string(),
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
    fn platform(&self) -> Option<String> {
        let field = |k: &str| get_ci(&self.exec.platform, k).and_then(Value::as_str);
        let os = field("os").unwrap_or("linux");
        let arch = field("architecture")?;
        Some(match field("variant") {
            Some(v) => format!("{os}/{arch}/{v}"),
            None => format!("{os}/{arch}"),
        })
    }

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

    /// Connection mode: the per-connection container running `idleCommand`.
    pub async fn start_idle_container(&self, meta: &ConnMeta) -> Result<String, StartError> {
        self.bounded(async {
            self.ready().await?;
            self.ensure_image().await?;
            let body = self.create_body(meta, &self.exec.idle_command, None);
            let id = self.create(&body).await?;
            if let Err(e) = self.put_agent(&id).await {
                self.discard(&id).await;
                return Err(e);
            }
            if let Err(e) = self.client.start_container(&id).await {
                self.discard(&id).await;
                return Err(StartError::ContainerFailed(e.to_string()));
            }
            tracing::debug!(container = %id, connection_id = %meta.connection_id, "container started");
            Ok(id)
        })
        .await
    }

    /// Removes a container that failed to start, at once rather than at disconnect.
    async fn discard(&self, id: &str) {
        if let Err(e) = self.remove_container(id).await {
            tracing::warn!(container = %id, error = %e, "cannot remove a container that failed to start");
        }
    }

    /// Persistent mode: the container named `containername`, started if it is stopped, created
    /// (running `idleCommand`) if missing and `createMissingContainer` allows.
    pub async fn find_persistent_container(&self, meta: &ConnMeta) -> Result<String, StartError> {
        self.bounded(async {
            self.ready().await?;
            let name = self.exec.container_name.clone();
            let failed = |e: DockerError| StartError::ContainerFailed(e.to_string());
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
                    return Err(StartError::ContainerFailed(format!(
                        "container {name} does not exist"
                    )))
                }
                Err(e) => return Err(StartError::EngineUnreachable(e.to_string())),
            }
            self.ensure_image().await?;
            let mut body = self.create_body(meta, &self.exec.idle_command, None);
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
                .create_container(Some(&name), self.platform().as_deref(), &body)
                .await
            {
                Ok(_) => self.put_agent(&name).await?,
                // 409: another connection created it first; use theirs.
                Err(DockerError::Status { status: 409, .. }) => {}
                Err(DockerError::ImageNotFound { .. }) => {
                    return Err(StartError::ImageNotFound(self.image()))
                }
                Err(e) => return Err(failed(e)),
            }
            self.client.start_container(&name).await.map_err(failed)?;
            tracing::info!(container = %name, "created persistent container");
            Ok(name)
        })
        .await
    }

    async fn create(&self, body: &Value) -> Result<String, StartError> {
        self.client
            .create_container(self.name(), self.platform().as_deref(), body)
            .await
            .map_err(|e| match e {
                // The engine's 404 does not say which image; we know.
                DockerError::ImageNotFound { .. } => StartError::ImageNotFound(self.image()),
                DockerError::Connect { .. } => StartError::EngineUnreachable(e.to_string()),
                other => StartError::ContainerFailed(other.to_string()),
            })
    }

    fn control(
        &self,
        target: Target,
        container: &str,
        pid: Option<watch::Receiver<Option<u32>>>,
    ) -> ProcessControl {
        ProcessControl {
            client: self.client.clone(),
            target,
            last_signal: Arc::new(Mutex::new(None)),
            agent: self.agent.as_ref().zip(pid).map(|(a, pid)| AgentCtl {
                path: a.path.clone(),
                container: container.to_string(),
                pid,
            }),
            exit_deadline: self.timeouts.command_start.0,
            resize_timeout: self.timeouts.window.0,
            signal_timeout: self.timeouts.signal.0,
        }
    }

    /// Connection mode: one program as an exec in the connection's container.
    /// The command a program really runs as: under the agent's `console`, or on its own.
    fn program_argv(&self, spec: &ProgramSpec, api: &ApiLevel) -> Vec<String> {
        match &self.agent {
            Some(a) if a.inject.is_some() => console_argv(
                &a.path,
                spec.tty.as_ref(),
                &[],
                false,
                spec.argv.clone(),
                true,
            ),
            Some(a) => console_argv(
                &a.path,
                spec.tty.as_ref(),
                &[],
                false,
                sized_argv(spec, api),
                false,
            ),
            None => sized_argv(spec, api),
        }
    }

    pub async fn exec(&self, container: &str, spec: &ProgramSpec) -> Result<Process, StartError> {
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
        let fail = |e: DockerError| StartError::ExecFailed(e.to_string());
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
                container,
            )
            .await)
    }

    /// Session mode: a container whose main process is the program, attached before it starts
    /// so that no output is lost. The caller removes it with [`Self::remove_container`].
    pub async fn run_session_container(
        &self,
        meta: &ConnMeta,
        spec: &ProgramSpec,
    ) -> Result<(String, Process), StartError> {
        self.bounded(async {
            let api = self.ready().await?;
            self.ensure_image().await?;
            let body = self.create_body(meta, &self.program_argv(spec, api), Some(spec));
            let id = self.create(&body).await?;
            if let Err(e) = self.put_agent(&id).await {
                self.discard(&id).await;
                return Err(e);
            }
            self.write_files(&id, &spec.login.files, false).await;
            let started = async {
                let hijacked = self.client.attach_container(&id).await?;
                self.client.start_container(&id).await?;
                Ok::<_, DockerError>(hijacked)
            };
            let hijacked = match started.await {
                Ok(h) => h,
                Err(e) => {
                    self.discard(&id).await;
                    return Err(StartError::ContainerFailed(e.to_string()));
                }
            };
            let process = self
                .process(
                    hijacked.reader,
                    hijacked.writer,
                    spec,
                    Target::Container(id.clone()),
                    &id,
                )
                .await;
            Ok((id, process))
        })
        .await
    }

    async fn process(
        &self,
        reader: HijackedReader,
        writer: HijackedWriter,
        spec: &ProgramSpec,
        target: Target,
        container: &str,
    ) -> Process {
        let (pid, pid_rx) = pid_channel(self.agent.is_some());
        let control = self.control(target, container, pid_rx);
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
            output: ProcessOutput::new(OutputSource::Docker(stream), pid),
            control: crate::backend::process::ProcessControl::Docker(control),
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
    fn platform_becomes_the_query_form() {
        let mut cfg = DockerConfig::default();
        let b = DockerBackend::new(&cfg, "i").unwrap();
        assert_eq!(b.platform(), None);
        cfg.execution.platform =
            serde_json::from_str(r#"{"Architecture":"arm64","variant":"v8"}"#).unwrap();
        let b = DockerBackend::new(&cfg, "i").unwrap();
        assert_eq!(b.platform().as_deref(), Some("linux/arm64/v8"));
    }

    #[test]
    fn create_body_keeps_user_labels_and_adds_ours() {
        let mut cfg = DockerConfig::default();
        cfg.execution.container =
            serde_json::from_str(r#"{"image":"img","labels":{"team":"blue"},"env":["A=1"]}"#)
                .unwrap();
        let b = DockerBackend::new(&cfg, "inst").unwrap();
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
