//! The Docker backend proper: turns ContainerSSH's `docker.execution` settings into containers
//! and execs, labels everything it creates, and removes it again (per connection, per session,
//! and at start-up for what a crashed run of the same instance left behind).

use std::io;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use serde_json::{json, Map, Value};
use tokio::io::AsyncReadExt;
use tokio::sync::OnceCell;

use super::{
    Demuxer, DockerClient, DockerConnection, DockerError, ExecSpec, HijackedReader, HijackedWriter,
    ReadSizer, StreamKind,
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

pub struct DockerBackend {
    client: DockerClient,
    exec: DockerExecutionConfig,
    timeouts: DockerTimeouts,
    instance: String,
    api: OnceCell<ApiLevel>,
}

/// A started program: its stdin, its output and a handle to control it.
pub struct Process {
    pub stdin: HijackedWriter,
    pub output: ProcessOutput,
    pub control: ProcessControl,
}

pub enum ProcessOutput {
    /// TTY: one raw stream, all of it stdout.
    Raw(HijackedReader, BytesMut, ReadSizer),
    /// No TTY: the engine's multiplexed stdout/stderr frames.
    Muxed(Demuxer<HijackedReader>),
}

impl ProcessOutput {
    /// The next chunk of output; `None` when the program's output has ended.
    pub async fn next(&mut self) -> io::Result<Option<(StreamKind, Bytes)>> {
        match self {
            ProcessOutput::Raw(r, buf, sizer) => {
                sizer.prepare(buf);
                let n = r.read_buf(buf).await?;
                sizer.record(n);
                Ok((n > 0).then(|| (StreamKind::Stdout, buf.split_to(n).freeze())))
            }
            ProcessOutput::Muxed(d) => d.next_frame().await,
        }
    }
}

#[derive(Clone)]
enum Target {
    Exec(String),
    Container(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("signals to programs started with exec need the in-container agent")]
    SignalUnsupported,
    #[error("unknown signal {0}")]
    UnknownSignal(String),
    #[error(transparent)]
    Engine(#[from] DockerError),
}

/// Resize, signal and wait for a started program.
#[derive(Clone)]
pub struct ProcessControl {
    client: DockerClient,
    target: Target,
    last_signal: Arc<Mutex<Option<String>>>,
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

    pub async fn signal(&self, name: &str) -> Result<(), ControlError> {
        let Target::Container(id) = &self.target else {
            return Err(ControlError::SignalUnsupported);
        };
        if signal_number(name).is_none() {
            return Err(ControlError::UnknownSignal(name.into()));
        }
        if let Ok(mut last) = self.last_signal.lock() {
            *last = Some(name.to_string());
        }
        let sig = format!("SIG{name}");
        within(
            self.signal_timeout,
            "signal",
            self.client.kill_container(id, &sig),
        )
        .await?;
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
        // Docker reports death by signal N as 128+N. That is only unambiguous for a signal we
        // delivered ourselves; anything else stays an exit status.
        let last = self.last_signal.lock().ok().and_then(|l| l.clone());
        if let Some(name) = last {
            if signal_number(&name).map(|n| 128 + i64::from(n)) == Some(code) {
                return ExitReport::Signal { name };
            }
        }
        ExitReport::Status(u32::try_from(code).unwrap_or(UNKNOWN_EXIT_STATUS))
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
        })
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
            if let Some(t) = &spec.tty {
                replace_ci(&mut host, "ConsoleSize", json!([t.rows, t.cols]));
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
                Ok(info) if info.running => return Ok(name),
                Ok(_) => {
                    self.client.start_container(&name).await.map_err(failed)?;
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
                // 409: another connection created it first; use theirs.
                Ok(_) | Err(DockerError::Status { status: 409, .. }) => {}
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

    fn control(&self, target: Target) -> ProcessControl {
        ProcessControl {
            client: self.client.clone(),
            target,
            last_signal: Arc::new(Mutex::new(None)),
            exit_deadline: self.timeouts.command_start.0,
            resize_timeout: self.timeouts.window.0,
            signal_timeout: self.timeouts.signal.0,
        }
    }

    /// Connection mode: one program as an exec in the connection's container.
    pub async fn exec(&self, container: &str, spec: &ProgramSpec) -> Result<Process, StartError> {
        let api = self.ready().await?;
        let cmd = sized_argv(spec, api);
        let exec_spec = ExecSpec {
            cmd,
            env: spec.env.clone(),
            tty: spec.tty.is_some(),
            console_size: spec.tty.as_ref().map(|t| (t.rows, t.cols)),
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
        let control = self.control(Target::Exec(exec_id));
        Ok(self
            .process(hijacked.reader, hijacked.writer, spec, control)
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
            let body = self.create_body(meta, &sized_argv(spec, api), Some(spec));
            let id = self.create(&body).await?;
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
            let control = self.control(Target::Container(id.clone()));
            Ok((
                id,
                self.process(hijacked.reader, hijacked.writer, spec, control)
                    .await,
            ))
        })
        .await
    }

    async fn process(
        &self,
        reader: HijackedReader,
        writer: HijackedWriter,
        spec: &ProgramSpec,
        control: ProcessControl,
    ) -> Process {
        let output = match &spec.tty {
            Some(t) => {
                // Also resize after start: covers engines that ignore ConsoleSize.
                if let Err(e) = control.resize(t.rows, t.cols).await {
                    tracing::debug!(error = %e, "initial resize failed");
                }
                ProcessOutput::Raw(reader, BytesMut::new(), ReadSizer::default())
            }
            None => ProcessOutput::Muxed(Demuxer::new(reader)),
        };
        Process {
            stdin: writer,
            output,
            control,
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
