//! The configured backend behind one interface for the SSH side: start the connection's
//! container or pod, run programs, run session containers or pods, helper programs through
//! the agent, and cleanup.

use std::sync::Arc;

use tokio::io::AsyncWrite;

use super::docker::session::DockerBackend;
use super::docker::session::OutputStream;
use super::kubernetes::backend::{KubeBackend, KubeTarget, DEFAULT_AGENT_INIT_IMAGE};
use super::process::{Captured, OutputSource, Process};
use super::{ConnMeta, ProgramSpec, StartError};
use crate::auth::metadata::LoginMetadata;
use crate::config::model::{BackendName, ExecutionMode};
use crate::config::Settings;

/// Two configuration blocks with the same JSON form.
fn same<T: serde::Serialize>(a: &T, b: &T) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

pub enum Backend {
    Docker(Box<DockerBackend>),
    Kubernetes(Box<KubeBackend>),
}

/// The connection's container (Docker) or pod (Kubernetes).
#[derive(Clone, Debug)]
pub enum Target {
    Docker(String),
    Kube(KubeTarget),
}

/// An agent command's output and stdin.
pub type AgentStreams = (OutputSource, Box<dyn AsyncWrite + Send + Unpin>);

impl Backend {
    /// The configured backend, with the agent it injects.
    pub fn build(settings: &Settings) -> Result<Backend, Box<dyn std::error::Error>> {
        if settings.backend == BackendName::Kubernetes {
            let k = &settings.kubernetes.pod;
            let backend =
                KubeBackend::new(&settings.kubernetes, &settings.agent, &settings.instance_id)?;
            match backend.agent_path() {
                None => tracing::info!(
                    "the agent is disabled: no signals to exec'd programs, no forwarding, no files"
                ),
                Some(p) if settings.agent.inject => {
                    let image = if k.agent_init_image.is_empty() {
                        DEFAULT_AGENT_INIT_IMAGE
                    } else {
                        &k.agent_init_image
                    };
                    tracing::info!(%image, path = %p, "pods get the agent from an init container");
                }
                Some(p) => tracing::info!(path = %p, "pods' images carry the agent"),
            }
            return Ok(Backend::Kubernetes(Box::new(backend)));
        }
        let agent = super::agent::locate(&settings.agent)?;
        if settings.docker.execution.disable_agent {
            tracing::info!(
                "the agent is disabled: no signals to exec'd programs, no forwarding, no files"
            );
        } else if let Some(a) = &agent {
            tracing::info!(binary = %a.path.display(), bytes = a.bytes.len(), to = %settings.docker.execution.agent_path, "injecting the agent into containers");
        }
        // The backend keeps its own archive of the agent.
        let docker = DockerBackend::new(&settings.docker, &settings.instance_id)?
            .inject_agent(agent.as_ref())?;
        Ok(Backend::Docker(Box::new(docker)))
    }

    /// The backend for a login whose merged settings are `login` (`base`: the file's): this
    /// one when the backend blocks are unchanged; a Docker backend sharing the engine client
    /// and agent archive when only the execution changed; else one built for the login.
    pub fn for_login(
        self: &Arc<Self>,
        base: &Settings,
        login: &Settings,
    ) -> Result<Arc<Backend>, String> {
        if base.backend == login.backend
            && same(&base.docker, &login.docker)
            && same(&base.kubernetes, &login.kubernetes)
        {
            return Ok(Arc::clone(self));
        }
        if let (Backend::Docker(d), BackendName::Docker) = (self.as_ref(), login.backend) {
            let same_conn = same(&base.docker.connection, &login.docker.connection);
            if let Some(derived) = d.derive(&login.docker, same_conn) {
                return Ok(Arc::new(Backend::Docker(Box::new(derived))));
            }
        }
        Backend::build(login)
            .map(Arc::new)
            .map_err(|e| format!("cannot set up the login's backend: {e}"))
    }

    pub fn mode(&self) -> ExecutionMode {
        match self {
            Backend::Docker(d) => d.mode(),
            Backend::Kubernetes(k) => k.mode(),
        }
    }

    /// The configuration key that turns the agent off, for messages.
    pub fn disable_agent_key(&self) -> &'static str {
        match self {
            Backend::Docker(_) => "docker.execution.disableAgent",
            Backend::Kubernetes(_) => "kubernetes.pod.disableAgent",
        }
    }

    /// The agent's path in `target`, when programs there run under the agent.
    pub fn agent_in(&self, target: &Target) -> Option<String> {
        match (self, target) {
            (Backend::Docker(d), _) => d.agent_path().map(str::to_string),
            (Backend::Kubernetes(_), Target::Kube(t)) => t.agent.as_ref().map(|a| a.0.clone()),
            (Backend::Kubernetes(_), Target::Docker(_)) => None,
        }
    }

    /// Whether programs run under the agent at all (before any target exists).
    pub fn has_agent(&self) -> bool {
        match self {
            Backend::Docker(d) => d.agent_path().is_some(),
            Backend::Kubernetes(k) => k.agent_path().is_some(),
        }
    }

    /// Connection and persistent modes: the connection's container or pod, ready, with the
    /// login's files written into it.
    pub async fn start_connection(
        &self,
        meta: &ConnMeta,
        login: &LoginMetadata,
    ) -> Result<Target, StartError> {
        let persistent = self.mode() == ExecutionMode::Persistent;
        match self {
            Backend::Docker(d) => {
                let id = if persistent {
                    d.find_persistent_container(meta).await?
                } else {
                    d.start_idle_container(meta).await?
                };
                d.write_files(&id, &login.files, true).await;
                Ok(Target::Docker(id))
            }
            Backend::Kubernetes(k) => {
                let t = if persistent {
                    k.find_persistent_pod(meta, login).await?
                } else {
                    k.start_idle_pod(meta, login).await?
                };
                k.write_files(&t, &login.files).await;
                Ok(Target::Kube(t))
            }
        }
    }

    /// One program in the connection's container or pod.
    pub async fn exec(&self, target: &Target, spec: &ProgramSpec) -> Result<Process, StartError> {
        match (self, target) {
            (Backend::Docker(d), Target::Docker(id)) => d.exec(id, spec).await,
            (Backend::Kubernetes(k), Target::Kube(t)) => k.exec(t, spec).await,
            _ => Err(StartError::ExecFailed("backend mismatch".into())),
        }
    }

    /// Session mode: a container or pod of the program's own; remove it with
    /// [`Self::remove_session`].
    pub async fn run_session(
        &self,
        meta: &ConnMeta,
        spec: &ProgramSpec,
    ) -> Result<(String, Process), StartError> {
        match self {
            Backend::Docker(d) => d.run_session_container(meta, spec).await,
            Backend::Kubernetes(k) => k.run_session_pod(meta, spec).await,
        }
    }

    pub async fn remove_session(&self, id: &str) {
        match self {
            Backend::Docker(d) => {
                if let Err(e) = d.remove_container(id).await {
                    tracing::warn!(container = %id, error = %e, "cannot remove session container");
                }
            }
            Backend::Kubernetes(k) => k.remove_pod(id).await,
        }
    }

    /// Removes everything of one connection (found by label); how many were removed.
    pub async fn remove_connection(&self, connection_id: &str) -> Result<usize, String> {
        match self {
            Backend::Docker(d) => d
                .remove_connection(connection_id)
                .await
                .map_err(|e| e.to_string()),
            Backend::Kubernetes(k) => k
                .remove_connection(connection_id)
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Removes what a crashed run of this instance left behind.
    pub async fn reap(&self) -> Result<usize, String> {
        match self {
            Backend::Docker(d) => d.reap().await.map_err(|e| e.to_string()),
            Backend::Kubernetes(k) => k.reap().await.map_err(|e| e.to_string()),
        }
    }

    /// Runs a helper program (`agent write-file`, ...) in the target to completion.
    pub async fn capture(
        &self,
        target: &Target,
        argv: Vec<String>,
        stdin: Option<&[u8]>,
    ) -> Result<Captured, String> {
        match (self, target) {
            (Backend::Docker(d), Target::Docker(id)) => {
                d.capture(id, argv, stdin).await.map_err(|e| e.to_string())
            }
            (Backend::Kubernetes(k), Target::Kube(t)) => k.capture(t, &argv, stdin).await,
            _ => Err("backend mismatch".into()),
        }
    }

    /// Starts a long-running agent command (`forward-server`); it ends when its stdin closes.
    pub async fn start_agent_command(
        &self,
        target: &Target,
        args: &[&str],
    ) -> Result<AgentStreams, StartError> {
        match (self, target) {
            (Backend::Docker(d), Target::Docker(id)) => {
                let (out, input) = d.start_agent_command(id, args).await?;
                let out = OutputSource::Docker(OutputStream::Muxed(out));
                Ok((out, Box::new(input)))
            }
            (Backend::Kubernetes(k), Target::Kube(t)) => k.start_agent_command(t, args).await,
            _ => Err(StartError::ExecFailed("backend mismatch".into())),
        }
    }
}
