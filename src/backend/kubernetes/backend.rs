//! The Kubernetes backend proper: turns `kubernetes.pod` into pods (one per connection, one
//! per session, or an existing named one), runs programs in them over exec or attach, brings
//! the agent in through an init container, and deletes what it created.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::io::AsyncWriteExt;

use super::client::KubeClient;
use super::config::KubeSettings;
use super::connection;
use super::exec;
use super::pods::{self, PodError};
use super::session::{self, capture, Limits, PodRef};
use super::wire::{self, Pod, PodState};
use crate::auth::metadata::{LoginFile, LoginMetadata};
use crate::backend::agent::{self, console_argv};
use crate::backend::pool::{Members, Pool, LABEL_POOL};
use crate::backend::process::{pid_channel, Captured, Process, ProcessControl, ProcessOutput};
use crate::backend::{
    AgentAt, AgentStreams, ConnMeta, Container, Engine, Handle, ProgramSpec, Runtime, SessionStart,
    StartError,
};
use crate::config::model::{AgentConfig, ExecutionMode, KubernetesPodConfig, KubernetesTimeouts};

/// Where the init container puts the agent (an `emptyDir` mounted read-only into every
/// container of the pod), and its path there.
pub use crate::backend::agent::{AGENT_DIR, INJECTED_AGENT_PATH};
/// The `emptyDir` volume and the init container that fills it.
pub const AGENT_VOLUME: &str = "containerssh-agent";
pub const AGENT_INIT_CONTAINER: &str = "containerssh-agent";
/// `kubernetes.pod.agentInitImage` when empty: this project's own image, which carries the
/// agent at `kubernetes.pod.agentPath` (`/usr/bin/containerssh-agent`).
pub const DEFAULT_AGENT_INIT_IMAGE: &str = concat!(
    "ghcr.io/containerssh-rs/containerssh:",
    env!("CARGO_PKG_VERSION")
);
/// Marks a persistent-mode pod we created; it carries no instance or connection label, so
/// neither the reaper nor connection cleanup ever deletes it.
pub const LABEL_PERSISTENT: &str = "containerssh_persistent";
/// Grace period of the delete at disconnect: the program gets TERM, then the pod goes.
const DISCONNECT_GRACE_SECONDS: u32 = 2;
/// The key that turns the agent off, for messages.
const DISABLE_AGENT_KEY: &str = "kubernetes.pod.disableAgent";

/// How programs reach the agent.
struct Agent {
    /// The agent's path in pods we create.
    path: String,
    /// `Some(image)` when an init container copies the agent in; `None`: images carry it.
    init_image: Option<String>,
    /// The agent's path in the init image (`kubernetes.pod.agentPath`).
    source: String,
    /// `agent.sessionServer`: connection pods run the agent's `session-server`.
    session_server: bool,
}

/// The Kubernetes backend; its pods share it.
pub type KubeBackend = Engine<Kube>;

/// The Kubernetes [`Runtime`].
pub struct Kube {
    client: KubeClient,
    /// `kubernetes.pod` with `metadata.namespace` filled in.
    pod: KubernetesPodConfig,
    namespace: String,
    console: String,
    timeouts: KubernetesTimeouts,
    instance: String,
    agent: Option<Agent>,
    /// `pod.pool`: pods started ahead, each claimed by one connection.
    pool: Option<Arc<Pool>>,
}

/// What the Kubernetes backend's cleanup and helper programs fail with.
#[derive(Debug, thiserror::Error)]
pub enum KubeRuntimeError {
    #[error(transparent)]
    Pod(#[from] PodError),
    #[error(transparent)]
    Capture(#[from] session::CaptureError),
}

/// A start failure from a pod error.
fn start_error(e: PodError) -> StartError {
    match e {
        PodError::Timeout { timeout, .. } => StartError::Timeout(timeout),
        PodError::Api(e) => StartError::EngineUnreachable(e.into()),
        other => StartError::ContainerFailed(other.into()),
    }
}

fn exec_error(e: exec::ExecError) -> StartError {
    StartError::ExecFailed(e.into())
}

impl Kube {
    /// Resolves where the cluster is and builds the client; no network traffic.
    pub fn backend(
        cfg: &KubeSettings,
        agent: &AgentConfig,
        instance: &str,
    ) -> Result<KubeBackend, Box<dyn std::error::Error>> {
        let conn = connection::resolve(&cfg.connection, &|k| std::env::var(k).ok())?;
        let client = KubeClient::new(&conn, cfg.timeouts.http.0)?;
        tracing::info!(code = "KUBERNETES_API_CONFIGURED", server = %client.server(), connection = ?conn, "Kubernetes API");
        let kube = Self::with_client(client, conn.namespace, cfg, agent, instance)?;
        Ok(Engine::of(kube))
    }

    /// [`Self::new`] with the client made; `namespace` is the connection's suggestion, used
    /// when `kubernetes.pod.metadata.namespace` is empty.
    pub fn with_client(
        client: KubeClient,
        namespace: Option<String>,
        cfg: &KubeSettings,
        agent: &AgentConfig,
        instance: &str,
    ) -> Result<Self, Box<dyn std::error::Error>> {
        let mut pod = cfg.pod.clone();
        // ContainerSSH's default metadata names `default`; left as it is, the connection's
        // namespace (kubeconfig context, in-cluster namespace file) is the better guess.
        let defaulted = pod.metadata == crate::config::defaults::kubernetes_metadata();
        let configured = pod
            .metadata
            .get("namespace")
            .filter(|_| !defaulted)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        let namespace = configured.or(namespace).unwrap_or_else(|| "default".into());
        pod.metadata.insert("namespace".into(), json!(namespace));
        let console = cfg.console.clone();
        let agent = (!pod.disable_agent).then(|| {
            if agent.inject {
                let image = if pod.agent_init_image.is_empty() {
                    DEFAULT_AGENT_INIT_IMAGE.to_string()
                } else {
                    pod.agent_init_image.clone()
                };
                Agent {
                    path: INJECTED_AGENT_PATH.into(),
                    init_image: Some(image),
                    source: pod.agent_path.clone(),
                    session_server: agent.session_server,
                }
            } else {
                Agent {
                    path: pod.agent_path.clone(),
                    init_image: None,
                    source: pod.agent_path.clone(),
                    session_server: false,
                }
            }
        });
        tracing::info!(code = "KUBERNETES_NAMESPACE", namespace = %namespace, "pods are created in this namespace");
        let mut kube = Kube {
            client,
            pod,
            namespace,
            console,
            timeouts: cfg.timeouts.clone(),
            instance: instance.to_string(),
            agent,
            pool: None,
        };
        let pool = &kube.pod.pool;
        if pool.size > 0 {
            kube.pool = Some(Pool::new(pool.size, pool.max_age.0, kube.identity()));
        }
        Ok(kube)
    }

    /// What a connection's pod is, for the pool: the configuration it is created from, with
    /// nothing of a login's (connection labels, exposed metadata, the login's environment).
    fn identity(&self) -> String {
        json!([
            self.pod.metadata,
            self.pod.spec,
            self.pod.console_container_number,
            self.idle_command(),
            self.namespace,
            self.agent
                .as_ref()
                .map(|a| (&a.path, &a.init_image, &a.source, a.session_server)),
        ])
        .to_string()
    }

    /// The labels and annotations of one login's pod beyond the configuration's: the
    /// connection's, and the login's metadata exposed as labels and annotations. A cold pod
    /// is created with them; a pool member gets them by a patch at its claim.
    fn login_metadata(
        &self,
        meta: &ConnMeta,
        login: &LoginMetadata,
    ) -> (Map<String, Value>, Map<String, Value>) {
        let (mut labels, mut annotations) = pods::connection_metadata(meta);
        for (k, v) in exposed(&self.pod.expose_auth_metadata_as_labels, login) {
            if let Some(v) = pods::label_value(&v) {
                labels.insert(k, json!(v));
            }
        }
        for (k, v) in exposed(&self.pod.expose_auth_metadata_as_annotations, login) {
            annotations.insert(k, json!(v));
        }
        (labels, annotations)
    }

    /// Connection mode: a pool member for this connection, claimed (checked alive) and
    /// labelled as the connection's; `None`: start cold.
    async fn claim(&self, meta: &ConnMeta, login: &LoginMetadata) -> Option<String> {
        let pool = self.pool.as_ref()?;
        if self.pod.mode != ExecutionMode::Connection {
            return None;
        }
        let name = pool
            .claim_checked(self, &self.identity(), &meta.connection_id)
            .await?;
        let (mut labels, annotations) = self.login_metadata(meta, login);
        labels.insert(LABEL_POOL.into(), Value::Null);
        let patch = json!({"metadata": {"labels": labels, "annotations": annotations}});
        let path = pods::pod_path(&self.namespace, &name);
        if let Err(e) = self.client.merge_patch::<_, Value>(&path, &patch).await {
            tracing::warn!(code = "BACKEND_POOL_START_FAILED", pod = %name, error = %e, "cannot label a pool member for its connection: removed, the login starts another");
            self.remove(&name).await;
            pool.released(&meta.connection_id);
            return None;
        }
        tracing::info!(code = "BACKEND_POOL_CLAIM", pod = %name, connection_id = %meta.connection_id, user = %meta.username, "a pool member serves this connection");
        Some(name)
    }

    /// Where the agent is in our pods, for the start-up log.
    pub fn agent_path(&self) -> Option<&str> {
        self.agent.as_ref().map(|a| a.path.as_str())
    }

    fn at(&self, pod: &str) -> PodRef {
        PodRef {
            namespace: self.namespace.clone(),
            pod: pod.to_string(),
            container: self.console.clone(),
        }
    }

    fn limits(&self) -> Limits {
        let t = &self.timeouts;
        Limits {
            window: t.window.0,
            exit: t.pod_stop.0,
        }
    }

    /// The idle command with the agent's path in the image replaced by the injected one.
    fn idle_command(&self) -> Vec<String> {
        let mut cmd = self.pod.idle_command.clone();
        if let (Some(a), Some(first)) = (&self.agent, cmd.first_mut()) {
            if a.init_image.is_some() && *first == a.source {
                first.clone_from(&a.path);
            }
        }
        cmd
    }

    /// The pod for one connection or session (`who`): the configured pod with our labels, the
    /// agent's init container and volume, and (session mode) the console container set up for
    /// attach. Without `who`, a pool member: nothing of any login, and the pool's label.
    fn body(
        &self,
        who: Option<(&ConnMeta, &LoginMetadata)>,
        command: &[String],
        session: Option<&ProgramSpec>,
    ) -> Value {
        let mut env = Vec::new();
        if let Some((_, login)) = who {
            env.extend(login.environment.iter().cloned());
            env.extend(exposed(&self.pod.expose_auth_metadata_as_env, login));
        }
        let mut body = pods::pod_body(&self.pod, None, &self.instance, Some(command), &env);
        let (labels, annotations) = match who {
            Some((meta, login)) => self.login_metadata(meta, login),
            None => {
                let mut labels = Map::new();
                labels.insert(LABEL_POOL.into(), json!("1"));
                (labels, Map::new())
            }
        };
        pods::object_at(&mut body, &["metadata", "labels"]).extend(labels);
        pods::object_at(&mut body, &["metadata", "annotations"]).extend(annotations);
        if let Some(image) = self
            .agent
            .as_ref()
            .and_then(|a| a.init_image.as_ref().map(|i| (i.clone(), a.source.clone())))
        {
            add_agent(&mut body, &image.0, &image.1);
        }
        if let Some(spec) = session {
            let pod_spec = pods::object_at(&mut body, &["spec"]);
            pod_spec.insert("restartPolicy".into(), json!("Never"));
            if let Some(c) = pod_spec
                .get_mut("containers")
                .and_then(Value::as_array_mut)
                .and_then(|a| a.get_mut(self.pod.console_container_number))
            {
                let c = pods::object_at(c, &[]);
                c.insert("stdin".into(), json!(true));
                c.insert("stdinOnce".into(), json!(true));
                c.insert("tty".into(), json!(spec.tty.is_some()));
            }
        }
        body
    }

    async fn create(&self, body: &Value) -> Result<String, StartError> {
        let pod = pods::create_and_wait(&self.client, body, &self.console, self.start_timeout())
            .await
            .map_err(start_error)?;
        pod.metadata
            .name
            .ok_or_else(|| StartError::ContainerFailed("the pod has no name".into()))
    }

    fn start_timeout(&self) -> Duration {
        self.timeouts.pod_start.0
    }

    /// The agent in a pod: ours when the init container put it there (a persistent pod we
    /// did not create may have none), else the image's own.
    fn agent_in(&self, spec: Option<&wire::PodSpec>) -> Option<AgentAt> {
        self.agent.as_ref().map(|a| {
            let injected = a.init_image.is_some()
                && spec.is_none_or(|s| {
                    s.init_containers
                        .iter()
                        .any(|c| c.name == AGENT_INIT_CONTAINER)
                });
            if injected {
                AgentAt {
                    path: a.path.clone(),
                    ours: true,
                }
            } else {
                AgentAt {
                    path: a.source.clone(),
                    ours: false,
                }
            }
        })
    }

    /// Whether connection pods' sessions start through the agent's `session-server`, exec'd
    /// once per connection: connection mode with the agent injected. (Not as the console
    /// container's main process, reached by attach as on Docker: a container's output is
    /// always in the node's logs, and the session-server's output is every session's.)
    fn uses_session_server(&self) -> bool {
        self.pod.mode == ExecutionMode::Connection
            && self
                .agent
                .as_ref()
                .is_some_and(|a| a.session_server && a.init_image.is_some())
    }

    /// Connection mode: the per-connection pod running the idle command.
    async fn start_idle_pod(
        &self,
        meta: &ConnMeta,
        login: &LoginMetadata,
    ) -> Result<(String, Option<AgentAt>), StartError> {
        let body = self.body(Some((meta, login)), &self.idle_command(), None);
        let name = self.create(&body).await?;
        tracing::debug!(pod = %name, connection_id = %meta.connection_id, "pod started");
        Ok((name, self.agent_in(None)))
    }

    /// Persistent mode: the pod named by `metadata.name`, created (running the idle command,
    /// without instance or connection labels) when missing and `createMissingPods` allows.
    async fn find_persistent_pod(
        &self,
        meta: &ConnMeta,
        login: &LoginMetadata,
    ) -> Result<(String, Option<AgentAt>), StartError> {
        let name = self
            .pod
            .metadata
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let path = pods::pod_path(&self.namespace, &name);
        match self.client.get_json::<Pod>(&path).await {
            Ok(pod) => return self.persistent_ready(&name, pod).await,
            Err(e) if e.http_code() == Some(404) && self.pod.create_missing_pods => {}
            Err(e) if e.http_code() == Some(404) => {
                return Err(StartError::ContainerFailed(
                    format!("pod {name} does not exist in namespace {}", self.namespace).into(),
                ))
            }
            Err(e) => return Err(StartError::EngineUnreachable(e.into())),
        }
        let mut body = self.body(Some((meta, login)), &self.idle_command(), None);
        if let Some(labels) = body
            .pointer_mut("/metadata/labels")
            .and_then(Value::as_object_mut)
        {
            labels.remove(pods::LABEL_INSTANCE);
            labels.remove(pods::LABEL_CONNECTION_ID);
            labels.insert(LABEL_PERSISTENT.into(), json!("1"));
        }
        match pods::create_and_wait(&self.client, &body, &self.console, self.start_timeout()).await
        {
            Ok(pod) => {
                tracing::info!(code = "KUBERNETES_POD_CREATE", pod = %name, "created persistent pod");
                Ok((name, self.agent_in(Some(&pod.spec))))
            }
            // Another connection created it first: use theirs once it is ready.
            Err(PodError::Api(e)) if e.http_code() == Some(409) => {
                let pod = self
                    .client
                    .get_json::<Pod>(&path)
                    .await
                    .map_err(|e| StartError::EngineUnreachable(e.into()))?;
                self.persistent_ready(&name, pod).await
            }
            Err(e) => Err(start_error(e)),
        }
    }

    async fn persistent_ready(
        &self,
        name: &str,
        pod: Pod,
    ) -> Result<(String, Option<AgentAt>), StartError> {
        match wire::evaluate(&pod, &self.console) {
            PodState::Ready => Ok((name.to_string(), self.agent_in(Some(&pod.spec)))),
            PodState::Pending => {
                let ready = pods::wait_ready_existing(
                    &self.client,
                    &self.namespace,
                    name,
                    &self.console,
                    self.start_timeout(),
                )
                .await
                .map_err(start_error)?;
                Ok((name.to_string(), self.agent_in(Some(&ready.spec))))
            }
            PodState::Failed { reason, message } => Err(StartError::ContainerFailed(
                format!("pod {name}: {reason}: {message}").into(),
            )),
            PodState::Terminated { exit_code } => Err(StartError::ContainerFailed(
                format!("pod {name} has terminated (exit code {exit_code})").into(),
            )),
        }
    }

    /// The command a program runs as: under the agent's `console` (which also sets the
    /// environment, as exec has none of its own), else through `env`.
    fn program_argv(&self, agent: Option<&AgentAt>, spec: &ProgramSpec, wait: bool) -> Vec<String> {
        match agent {
            Some(a) if a.ours => {
                console_argv(a, spec.tty.as_ref(), &spec.env, wait, spec.argv.clone())
            }
            Some(a) => console_argv(a, None, &[], wait, with_env(spec)),
            None => with_env(spec),
        }
    }

    async fn process(
        &self,
        started: exec::ExecSession,
        at: PodRef,
        attach: bool,
        container: Arc<dyn Container>,
        spec: &ProgramSpec,
    ) -> Process {
        let (pid_tx, pid_rx) = pid_channel(container.agent().is_some());
        let parts = session::split(started, &self.client, at, attach, self.limits());
        let control = ProcessControl::new(
            Box::new(parts.program),
            container,
            pid_rx,
            DISABLE_AGENT_KEY,
            self.timeouts.signal.0,
        );
        if let Some(t) = &spec.tty {
            if let Err(e) = control.resize(t.rows, t.cols).await {
                tracing::debug!(error = %e, "initial resize failed");
            }
        }
        Process {
            stdin: Box::new(parts.stdin),
            output: ProcessOutput::new(Box::new(parts.output), pid_tx),
            control,
        }
    }

    /// Starts `argv` in the console container over exec, bounded by `commandStart`.
    async fn exec_at(
        &self,
        at: &PodRef,
        argv: &[String],
        tty: bool,
    ) -> Result<exec::ExecSession, StartError> {
        let limit = self.timeouts.command_start.0;
        let started = exec::exec(
            &self.client,
            &at.namespace,
            &at.pod,
            &at.container,
            argv,
            tty,
            true,
        );
        tokio::time::timeout(limit, started)
            .await
            .map_err(|_| StartError::Timeout(limit))?
            .map_err(exec_error)
    }

    async fn attach_session(
        &self,
        container: Arc<dyn Container>,
        spec: &ProgramSpec,
    ) -> Result<Process, StartError> {
        agent::write_login_files(container.as_ref(), &spec.login.files).await;
        let at = self.at(container.name());
        let limit = self.timeouts.command_start.0;
        let tty = spec.tty.is_some();
        let started = tokio::time::timeout(
            limit,
            exec::attach(&self.client, &at.namespace, &at.pod, &at.container, tty),
        )
        .await
        .map_err(|_| StartError::Timeout(limit))?
        .map_err(exec_error)?;
        let with_agent = container.agent().is_some();
        let mut process = self.process(started, at, true, container, spec).await;
        if with_agent {
            // `console --wait` starts the program on this byte, now that we are attached.
            process.stdin.write_all(b"\n").await.map_err(|e| {
                StartError::ExecFailed(format!("cannot start the program: {e}").into())
            })?;
        }
        Ok(process)
    }
}

impl Runtime for Kube {
    const DISABLE_AGENT_KEY: &'static str = DISABLE_AGENT_KEY;
    const KIND: &'static str = "kubernetes";
    type Error = KubeRuntimeError;

    fn mode(&self) -> ExecutionMode {
        self.pod.mode
    }

    fn has_agent(&self) -> bool {
        self.agent.is_some()
    }

    async fn connection_container(
        &self,
        meta: &ConnMeta,
        login: &LoginMetadata,
    ) -> Result<(String, Option<AgentAt>), StartError> {
        if self.mode() == ExecutionMode::Persistent {
            self.find_persistent_pod(meta, login).await
        } else if let Some(name) = self.claim(meta, login).await {
            Ok((name, self.agent_in(None)))
        } else {
            self.start_idle_pod(meta, login).await
        }
    }

    /// Without the pod's environment (a pool member has none of the login's), sessions
    /// get the exposed metadata as theirs; a cold pod has it twice, with the same values.
    fn login_env(&self, login: &LoginMetadata) -> Vec<String> {
        exposed(&self.pod.expose_auth_metadata_as_env, login)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect()
    }

    fn warm(self: &Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        if let Some(pool) = &self.pool {
            tokio::spawn(Arc::clone(pool).run(Arc::clone(self), stop));
        }
    }

    /// Files need the agent here: there is no archive API.
    async fn put_files(&self, pod: &str, _files: &[LoginFile]) {
        tracing::warn!(
            code = "BACKEND_LOGIN_FILE_FAILED",
            pod,
            "login files need the agent ({DISABLE_AGENT_KEY} is set): not written"
        );
    }

    /// A pod whose console container runs the program under `agent console --wait`, attached
    /// before the start byte is sent so that no output is lost.
    async fn run_session(
        self: &Arc<Self>,
        meta: &ConnMeta,
        spec: &ProgramSpec,
    ) -> Result<SessionStart, StartError> {
        let agent = self.agent_in(None);
        let argv = self.program_argv(agent.as_ref(), spec, agent.is_some());
        let body = self.body(Some((meta, &spec.login)), &argv, Some(spec));
        let name = self.create(&body).await?;
        let container: Arc<dyn Container> =
            Arc::new(Handle::new(Arc::clone(self), name.clone(), agent, true));
        match self.attach_session(Arc::clone(&container), spec).await {
            Ok(p) => Ok((container, p)),
            Err(e) => {
                self.remove(&name).await;
                Err(e)
            }
        }
    }

    /// Deletes every pod of one connection, found by label.
    async fn remove_connection(&self, connection_id: &str) -> Result<usize, KubeRuntimeError> {
        let limit = self.timeouts.pod_stop.0;
        let del =
            pods::delete_connection(&self.client, &self.namespace, &self.instance, connection_id);
        let removed = tokio::time::timeout(limit, del).await.unwrap_or_else(|_| {
            Err(PodError::Timeout {
                pod: format!("(connection {connection_id})"),
                timeout: limit,
            })
        })?;
        // A claimed member is labelled as the connection's; one whose claim stopped before
        // the label (the login gave up) is known by name to the pool only.
        if let Some(pool) = &self.pool {
            if let Some(name) = pool.claimed_by(connection_id) {
                if removed == 0 {
                    self.remove(&name).await;
                }
                pool.released(connection_id);
                return Ok(removed.max(1));
            }
        }
        Ok(removed)
    }

    /// Deletes every pod this instance labelled.
    async fn reap(&self) -> Result<usize, KubeRuntimeError> {
        Ok(pods::reap(&self.client, &self.namespace, &self.instance).await?)
    }

    /// Connection and persistent modes: one program as an exec in the connection's pod.
    async fn exec(
        &self,
        pod: &str,
        spec: &ProgramSpec,
        container: Arc<dyn Container>,
    ) -> Result<Process, StartError> {
        let argv = self.program_argv(container.agent(), spec, false);
        let at = self.at(pod);
        let started = self.exec_at(&at, &argv, spec.tty.is_some()).await?;
        Ok(self.process(started, at, false, container, spec).await)
    }

    /// Runs a helper program in a pod, bounded by `commandStart`.
    async fn capture(
        &self,
        pod: &str,
        argv: Vec<String>,
        stdin: Option<&[u8]>,
    ) -> Result<Captured, KubeRuntimeError> {
        let at = self.at(pod);
        let limit = self.timeouts.command_start.0;
        Ok(capture(&self.client, &at, &argv, stdin, limit).await?)
    }

    /// Its stderr goes to the log. It ends when its stdin is closed or the stream ends.
    async fn start_agent_command(
        &self,
        pod: &str,
        agent: Option<&AgentAt>,
        args: &[&str],
    ) -> Result<AgentStreams, StartError> {
        let Some(agent) = agent else {
            return Err(StartError::ExecFailed(
                format!("the in-pod agent is disabled ({DISABLE_AGENT_KEY})").into(),
            ));
        };
        let argv = agent::command_argv(agent, args);
        let at = self.at(pod);
        let started = self.exec_at(&at, &argv, false).await?;
        let parts = session::split(started, &self.client, at, false, self.limits());
        Ok((Box::new(parts.output), Box::new(parts.stdin)))
    }

    async fn attach_agent(&self, pod: &str) -> Option<AgentStreams> {
        if !self.uses_session_server() {
            return None;
        }
        let agent = self.agent_in(None);
        match self
            .start_agent_command(pod, agent.as_ref(), &["session-server"])
            .await
        {
            Ok(streams) => Some(streams),
            Err(e) => {
                tracing::warn!(code = "BACKEND_AGENT_ATTACH_FAILED", pod = %pod, error = %e, "cannot start the session agent; sessions start with exec");
                None
            }
        }
    }

    fn helper_timeout(&self) -> Duration {
        self.timeouts.command_start.0
    }

    /// Deletes the pod (short grace), bounded by `podStop`.
    async fn remove(&self, name: &str) {
        let limit = self.timeouts.pod_stop.0;
        let del = pods::delete(
            &self.client,
            &self.namespace,
            name,
            Some(DISCONNECT_GRACE_SECONDS),
        );
        match tokio::time::timeout(limit, del).await {
            Ok(Ok(())) => tracing::debug!(pod = %name, "pod deleted"),
            Ok(Err(e)) => {
                tracing::warn!(code = "KUBERNETES_POD_REMOVE_FAILED", pod = %name, error = %e, "cannot delete pod")
            }
            Err(_) => {
                tracing::warn!(code = "KUBERNETES_POD_REMOVE_FAILED", pod = %name, "deleting the pod timed out")
            }
        }
    }
}

impl Members for Kube {
    async fn start_member(&self) -> Result<String, StartError> {
        let name = self
            .create(&self.body(None, &self.idle_command(), None))
            .await?;
        tracing::debug!(pod = %name, "pool member started");
        Ok(name)
    }

    /// Ready as at its start, and not being deleted.
    async fn member_alive(&self, name: &str) -> bool {
        let path = pods::pod_path(&self.namespace, name);
        match self.client.get_json::<Pod>(&path).await {
            Ok(pod) => matches!(wire::evaluate(&pod, &self.console), PodState::Ready),
            Err(_) => false,
        }
    }

    async fn remove_member(&self, name: &str) -> bool {
        let limit = self.timeouts.pod_stop.0;
        let del = pods::delete(&self.client, &self.namespace, name, Some(0));
        matches!(tokio::time::timeout(limit, del).await, Ok(Ok(())))
    }
}

/// `(name, value)` for each configured `metadata name → name` whose metadata the login has.
fn exposed(
    map: &std::collections::BTreeMap<String, String>,
    login: &LoginMetadata,
) -> Vec<(String, String)> {
    map.iter()
        .filter_map(|(from, to)| Some((to.clone(), login.values.get(from)?.clone())))
        .collect()
}

/// The program's argv with the environment set through `env` (exec has no environment).
fn with_env(spec: &ProgramSpec) -> Vec<String> {
    if spec.env.is_empty() {
        return spec.argv.clone();
    }
    let mut argv = vec!["env".to_string()];
    argv.extend(spec.env.iter().cloned());
    argv.extend(spec.argv.iter().cloned());
    argv
}

/// Adds the agent's volume, the init container that copies the agent into it, and the
/// read-only mount of it in every container.
fn add_agent(body: &mut Value, image: &str, source: &str) {
    let spec = pods::object_at(body, &["spec"]);
    let mount = json!({"name": AGENT_VOLUME, "mountPath": AGENT_DIR, "readOnly": true});
    if let Some(list) = spec.get_mut("containers").and_then(Value::as_array_mut) {
        for c in list.iter_mut().filter_map(Value::as_object_mut) {
            pods::array_at(c, "volumeMounts").push(mount.clone());
        }
    }
    pods::array_at(spec, "volumes").push(json!({"name": AGENT_VOLUME, "emptyDir": {}}));
    let init = json!({
        "name": AGENT_INIT_CONTAINER,
        "image": image,
        "command": [source, "install", INJECTED_AGENT_PATH],
        "volumeMounts": [{"name": AGENT_VOLUME, "mountPath": AGENT_DIR}],
        "securityContext": {
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"drop": ["ALL"]}
        }
    });
    // First: later init containers may already use the agent.
    pods::array_at(spec, "initContainers").insert(0, init);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_init_container_and_mounts() {
        let mut body = json!({"spec": {"containers": [
            {"name": "shell", "image": "img"},
            {"name": "side", "image": "s", "volumeMounts": [{"name": "x", "mountPath": "/x"}]}
        ], "initContainers": [{"name": "theirs", "image": "i"}]}});
        add_agent(&mut body, "agent:1", "/usr/bin/containerssh-agent");
        let spec = &body["spec"];
        assert_eq!(spec["initContainers"][0]["name"], AGENT_INIT_CONTAINER);
        assert_eq!(
            spec["initContainers"][0]["command"],
            json!([
                "/usr/bin/containerssh-agent",
                "install",
                INJECTED_AGENT_PATH
            ])
        );
        assert_eq!(spec["initContainers"][1]["name"], "theirs");
        assert_eq!(spec["volumes"][0]["emptyDir"], json!({}));
        assert_eq!(
            spec["containers"][0]["volumeMounts"][0]["mountPath"],
            AGENT_DIR
        );
        assert_eq!(spec["containers"][1]["volumeMounts"][1]["readOnly"], true);
    }

    fn backend(pod: serde_json::Value, inject: bool) -> Kube {
        static CA: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        let ca = CA.get_or_init(|| super::super::client::testing::certs().ca.clone());
        let conn = crate::backend::kubernetes::ClusterConnection {
            server: "https://127.0.0.1:6443".into(),
            ca_pem: Some(ca.clone()),
            ..Default::default()
        };
        let client = KubeClient::new(&conn, Duration::from_secs(1)).unwrap();
        let cfg = crate::config::model::KubernetesConfig {
            pod: serde_json::from_value(pod).unwrap(),
            ..Default::default()
        };
        let agent = AgentConfig {
            inject,
            ..Default::default()
        };
        let cfg = KubeSettings::check(&cfg).unwrap();
        Kube::with_client(client, Some("from-context".into()), &cfg, &agent, "inst").unwrap()
    }

    fn meta() -> ConnMeta {
        ConnMeta {
            connection_id: "c0ffee".into(),
            username: "alice".into(),
            remote_ip: "10.1.2.3".into(),
        }
    }

    #[test]
    fn pod_body_carries_metadata_env_labels_annotations_and_the_agent() {
        let k = backend(
            json!({
                "spec": {"containers": [{"name": "shell", "image": "img"}, {"name": "side", "image": "s"}]},
                "exposeAuthMetadataAsEnv": {"GITHUB_USER": "GH_USER"},
                "exposeAuthMetadataAsLabels": {"team": "example.com/team"},
                "exposeAuthMetadataAsAnnotations": {"note": "example.com/note", "missing": "x"},
                "agentInitImage": "agent:1"
            }),
            true,
        );
        let mut login = LoginMetadata {
            environment: vec![("LAB".into(), "7".into())],
            ..Default::default()
        };
        login.values.insert("GITHUB_USER".into(), "octo".into());
        login.values.insert("team".into(), "blue team".into());
        login.values.insert("note".into(), "free text: ok".into());
        let body = k.body(Some((&meta(), &login)), &k.idle_command(), None);
        assert_eq!(body["metadata"]["namespace"], "from-context");
        assert_eq!(body["metadata"]["labels"]["example.com/team"], "blue-team");
        assert_eq!(
            body["metadata"]["annotations"]["example.com/note"],
            "free text: ok"
        );
        assert!(body["metadata"]["annotations"].get("x").is_none());
        for c in body["spec"]["containers"].as_array().unwrap() {
            assert_eq!(
                c["env"],
                json!([{"name": "LAB", "value": "7"}, {"name": "GH_USER", "value": "octo"}])
            );
            assert_eq!(c["volumeMounts"][0]["mountPath"], AGENT_DIR);
        }
        // The idle command runs the injected agent.
        assert_eq!(
            body["spec"]["containers"][0]["command"][0],
            INJECTED_AGENT_PATH
        );
        assert_eq!(body["spec"]["initContainers"][0]["image"], "agent:1");
        assert!(body["spec"].get("restartPolicy").is_none());
    }

    #[test]
    fn session_pod_is_set_up_for_attach() {
        let k = backend(
            json!({"metadata": {"namespace": "labs"}, "spec": {"containers": [{"name": "shell", "image": "img"}]}, "mode": "session"}),
            true,
        );
        let spec = ProgramSpec {
            argv: vec!["sh".into()],
            env: vec!["A=1".into()],
            tty: Some(crate::backend::Terminal {
                term: "xterm".into(),
                cols: 80,
                rows: 24,
            }),
            login: Default::default(),
        };
        let agent = k.agent_in(None);
        let argv = k.program_argv(agent.as_ref(), &spec, true);
        assert_eq!(
            argv,
            [
                INJECTED_AGENT_PATH,
                "console",
                "--pid",
                "--wait",
                "--rows",
                "24",
                "--cols",
                "80",
                "--env",
                "A=1",
                "--",
                "sh"
            ]
        );
        let body = k.body(Some((&meta(), &spec.login)), &argv, Some(&spec));
        assert_eq!(body["metadata"]["namespace"], "labs");
        assert_eq!(body["spec"]["restartPolicy"], "Never");
        let c = &body["spec"]["containers"][0];
        assert_eq!(
            (&c["stdin"], &c["stdinOnce"], &c["tty"]),
            (&json!(true), &json!(true), &json!(true))
        );
        assert_eq!(c["command"], json!(argv));
    }

    #[test]
    fn without_injection_the_images_agent_is_used() {
        let k = backend(
            json!({"spec": {"containers": [{"name": "shell", "image": "img"}]}}),
            false,
        );
        let body = k.body(
            Some((&meta(), &LoginMetadata::default())),
            &k.idle_command(),
            None,
        );
        assert!(body["spec"].get("initContainers").is_none());
        assert_eq!(
            body["spec"]["containers"][0]["command"][0],
            "/usr/bin/containerssh-agent"
        );
        assert_eq!(body["metadata"]["namespace"], "from-context");
    }

    #[test]
    fn env_without_the_agent_goes_through_env() {
        let spec = ProgramSpec {
            argv: vec!["sh".into(), "-c".into(), "x".into()],
            env: vec!["A=1".into()],
            tty: None,
            login: Default::default(),
        };
        assert_eq!(with_env(&spec), ["env", "A=1", "sh", "-c", "x"]);
    }
}
