//! The only place that names the backends: the one the configuration selects, and the one a
//! login's own configuration (from the config webhook) needs.

use std::sync::Arc;

use super::docker::config::DockerSettings;
use super::docker::session::Docker;
use super::janitor::Janitor;
use super::kubernetes::backend::{Kube, DEFAULT_AGENT_INIT_IMAGE};
use super::kubernetes::config::KubeSettings;
use super::Backend;
use crate::config::model::BackendName;
use crate::config::{AppConfig, ConfigError, KeyError, Settings};

/// Two configuration blocks with the same JSON form.
fn same<T: serde::Serialize>(a: &T, b: &T) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

const NO_AGENT: &str =
    "the agent is disabled: no signals to exec'd programs, no forwarding, no files";

/// Checks both backend blocks, the configured one and the other (a config webhook may switch a
/// login to it): a mistake in either is found at start, not at a login.
pub fn check_blocks(settings: &Settings) -> Result<(), KeyError> {
    DockerSettings::check(&settings.docker)?;
    KubeSettings::check(&settings.kubernetes)?;
    Ok(())
}

/// A configuration read from `file`, checked whole: the settings
/// ([`crate::config::validate::validate`]), then both backend blocks ([`check_blocks`]).
pub fn checked_settings(file: &str, raw: AppConfig) -> Result<Settings, ConfigError> {
    let settings = crate::config::validate::validate(file, raw)?;
    check_blocks(&settings).map_err(|e| e.in_file(file))?;
    Ok(settings)
}

/// The configured backend, with the agent it injects.
pub fn build(settings: &Settings) -> Result<Arc<dyn Backend>, Box<dyn std::error::Error>> {
    if settings.backend == BackendName::Kubernetes {
        let k = &settings.kubernetes.pod;
        let checked = KubeSettings::check(&settings.kubernetes)?;
        let backend = Kube::backend(&checked, &settings.agent, &settings.instance_id)?;
        match backend.runtime().agent_path() {
            None => tracing::info!(code = "BACKEND_AGENT_DISABLED", "{NO_AGENT}"),
            Some(p) if settings.agent.inject => {
                let image = if k.agent_init_image.is_empty() {
                    DEFAULT_AGENT_INIT_IMAGE
                } else {
                    &k.agent_init_image
                };
                tracing::info!(code = "BACKEND_AGENT_INIT_CONTAINER", %image, path = %p, "pods get the agent from an init container");
            }
            Some(p) => {
                tracing::info!(code = "BACKEND_AGENT_IN_IMAGE", path = %p, "pods' images carry the agent")
            }
        }
        return Ok(Arc::new(backend));
    }
    let agent = super::agent::locate(&settings.agent)?;
    if settings.docker.execution.disable_agent {
        tracing::info!(code = "BACKEND_AGENT_DISABLED", "{NO_AGENT}");
    } else if let Some(a) = &agent {
        tracing::info!(code = "BACKEND_AGENT_INJECTED", binary = %a.path.display(), bytes = a.len(), to = crate::backend::agent::INJECTED_AGENT_PATH, uploaded_to = %settings.docker.execution.agent_path, "injecting the agent into containers: a read-only volume, or an upload where the volume cannot be used (persistent mode)");
    }
    // The backend keeps its own archive of the agent.
    let checked = DockerSettings::check(&settings.docker)?;
    let docker = Docker::backend(
        &checked,
        &settings.instance_id,
        agent.as_ref(),
        settings.agent.session_server,
    )?;
    Ok(Arc::new(docker))
}

/// The backend for a login whose merged settings are `login` (`base`: the file's, which
/// `current` was built from): `current` when the backend blocks are unchanged; one sharing
/// its engine client and agent when the backend can take the change over; else one built for
/// the login.
pub fn for_login(
    current: &Arc<dyn Backend>,
    janitor: &Janitor,
    base: &Settings,
    login: &Settings,
) -> Result<Arc<dyn Backend>, String> {
    let backend = choose(current, base, login)?;
    if !Arc::ptr_eq(&backend, current) {
        janitor.track(place(login), &backend, record(login));
    }
    Ok(backend)
}

/// What rebuilds the backend `settings` select at the next start ([`leftover`]): its name and
/// its block.
pub fn record(settings: &Settings) -> serde_json::Value {
    let block = match settings.backend {
        BackendName::Docker => serde_json::to_value(&settings.docker),
        BackendName::Kubernetes => serde_json::to_value(&settings.kubernetes),
    };
    let name = serde_json::to_value(settings.backend).unwrap_or_default();
    serde_json::json!({"backend": name, "block": block.unwrap_or_default()})
}

/// A backend for a place a previous run recorded ([`record`]): the file's settings with the
/// recorded backend block, checked and built.
pub fn leftover(
    file: &Settings,
    recorded: &serde_json::Value,
) -> Result<Arc<dyn Backend>, Box<dyn std::error::Error>> {
    let mut settings = file.clone();
    settings.backend = serde_json::from_value(recorded["backend"].clone())?;
    match settings.backend {
        BackendName::Docker => {
            settings.docker = serde_json::from_value(recorded["block"].clone())?;
        }
        BackendName::Kubernetes => {
            settings.kubernetes = serde_json::from_value(recorded["block"].clone())?;
        }
    }
    check_blocks(&settings)?;
    build(&settings)
}

/// Where the backend `settings` select creates containers or pods, for the shutdown reap
/// ([`Janitor`]): the engine, or the cluster and namespace.
pub fn place(settings: &Settings) -> String {
    // Names only, never credentials: it is logged.
    match settings.backend {
        BackendName::Docker => format!("docker engine {}", settings.docker.connection.host),
        BackendName::Kubernetes => {
            let c = &settings.kubernetes.connection;
            let namespace = settings
                .kubernetes
                .pod
                .metadata
                .get("namespace")
                .and_then(|v| v.as_str())
                .unwrap_or("default");
            format!(
                "kubernetes {}{} (kubeconfig {:?}, context {:?}) namespace {namespace}",
                c.host, c.path, c.kubeconfig, c.context
            )
        }
    }
}

fn choose(
    current: &Arc<dyn Backend>,
    base: &Settings,
    login: &Settings,
) -> Result<Arc<dyn Backend>, String> {
    if base.backend == login.backend
        && same(&base.docker, &login.docker)
        && same(&base.kubernetes, &login.kubernetes)
    {
        return Ok(Arc::clone(current));
    }
    check_blocks(login).map_err(|e| format!("the login's configuration: {e}"))?;
    if base.backend == login.backend {
        let same_connection = match login.backend {
            BackendName::Docker => same(&base.docker.connection, &login.docker.connection),
            BackendName::Kubernetes => {
                same(&base.kubernetes.connection, &login.kubernetes.connection)
            }
        };
        if let Some(derived) = current.derive(login, same_connection) {
            return Ok(derived);
        }
    }
    build(login).map_err(|e| format!("cannot set up the login's backend: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::parse_yaml;

    const BASE: &str = "auth:\n  publicKey:\n    method: authorizedKeys\n    authorizedKeys: {path: /k/%u}\ndocker:\n  execution:\n    container: {image: base}\n";

    #[test]
    fn a_mistake_in_the_unselected_block_stops_the_start() {
        let yaml = format!("{BASE}kubernetes:\n  pod:\n    spec:\n      containers: []\n");
        let e = checked_settings("c.yaml", parse_yaml("c.yaml", &yaml).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("c.yaml") && e.contains("kubernetes.pod.spec.containers"),
            "{e}"
        );
        let yaml = format!("{BASE}kubernetes:\n  connection:\n    qps: 20\n");
        let e = checked_settings("c.yaml", parse_yaml("c.yaml", &yaml).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("kubernetes.connection.qps"), "{e}");
        assert!(checked_settings("c.yaml", parse_yaml("c.yaml", BASE).unwrap()).is_ok());
    }

    #[test]
    fn a_login_configuration_is_checked_before_its_backend_is_built() {
        let file = parse_yaml("c.yaml", BASE).unwrap();
        let overlay = serde_json::json!({"docker": {"execution": {"mode": "persistent"}}});
        let login = crate::config::merge::merge("webhook", &file, &overlay).unwrap();
        let e = check_blocks(&login).unwrap_err().to_string();
        assert!(e.contains("containername"), "{e}");
    }
}
