//! Pod lifecycle, independent of SSH (`shared/docs/kubernetes.md` §1.1, §1.2, §1.4):
//! [`pod_body`] builds the pod from the configuration, [`create_and_wait`] creates it and
//! waits (list, then watch) until it is ready for exec, deleting it when it will never be;
//! [`delete`] and [`reap`] remove pods.

use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::time::Instant;

use super::client::{KubeClient, KubeError};
use super::wire::{self, Pod, PodState, WatchEvent};
use crate::backend::ConnMeta;
use crate::config::model::KubernetesPodConfig;

/// Label: the SSH connection's ID.
pub const LABEL_CONNECTION_ID: &str = "containerssh_connection_id";
/// Label: the (sanitised) user name.
pub const LABEL_USERNAME: &str = "containerssh_username";
/// Label: this server instance; [`reap`] selects on it.
pub const LABEL_INSTANCE: &str = "containerssh_instance";
/// Annotation: the client's IP address.
pub const ANNOTATION_IP: &str = "containerssh_ip";

/// The longest label value Kubernetes accepts.
const MAX_LABEL_VALUE: usize = 63;
/// `timeoutSeconds` of each watch request; the watch is restarted when it ends.
const WATCH_TIMEOUT_SECONDS: u64 = 290;
/// Waiting reasons that mean the image cannot be had.
const IMAGE_REASONS: [&str; 4] = [
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
];
/// Client-facing messages are cut to this many characters.
const MAX_MESSAGE_CHARS: usize = 512;

/// Why a pod could not be created, made ready or deleted. Every `Display` is one line, fit to
/// show the SSH client.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// A request failed (network, TLS, HTTP error status).
    #[error("Kubernetes API request failed: {}", one_line(&.0.to_string()))]
    Api(#[from] KubeError),
    /// The pod will not become ready (image pull failure, container error, unschedulable,
    /// terminated, deleted). `reason` is machine-readable (`ImagePullBackOff`, ...).
    #[error("{message}")]
    NotReady { reason: String, message: String },
    /// The pod was not ready within the timeout.
    #[error("the pod {pod} did not become ready within {timeout:?}")]
    Timeout { pod: String, timeout: Duration },
    /// The server answered something this client cannot use.
    #[error("unexpected Kubernetes API response: {0}")]
    Protocol(String),
}

impl PodError {
    /// The machine-readable reason of a [`PodError::NotReady`].
    pub fn reason(&self) -> Option<&str> {
        match self {
            PodError::NotReady { reason, .. } => Some(reason),
            _ => None,
        }
    }
}

/// Control characters become spaces; the text is cut at [`MAX_MESSAGE_CHARS`].
fn one_line(s: &str) -> String {
    s.chars()
        .take(MAX_MESSAGE_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// A label value made from `s`: ASCII letters and digits kept, everything else replaced by
/// `-` (as ContainerSSH does), then leading and trailing `-` trimmed (a value must begin and
/// end with an alphanumeric character, or the API server refuses the pod with 422). `None`
/// when the result is empty or longer than 63 characters.
pub fn label_value(s: &str) -> Option<String> {
    let v: String = s
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    let v = v.trim_matches('-');
    (!v.is_empty() && v.len() <= MAX_LABEL_VALUE).then(|| v.to_string())
}

/// The name of the console container (`spec.containers[consoleContainerNumber].name`).
pub fn console_container_name(cfg: &KubernetesPodConfig) -> Option<String> {
    cfg.spec
        .get("containers")?
        .as_array()?
        .get(cfg.console_container_number)?
        .get("name")?
        .as_str()
        .map(str::to_string)
}

/// Percent-encodes a query value (everything but RFC 3986 unreserved characters).
pub(super) fn encode_query(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-encodes a path segment (namespace and pod names are DNS labels; this is defence).
fn seg(s: &str) -> String {
    encode_query(s)
}

/// The API path of pod `name` in `namespace`.
pub fn pod_path(namespace: &str, name: &str) -> String {
    format!("/api/v1/namespaces/{}/pods/{}", seg(namespace), seg(name))
}

/// `v` as an object; anything else (null, a string, ...) is replaced by an empty one first.
fn as_object(v: &mut Value) -> &mut Map<String, Value> {
    match v {
        Value::Object(map) => map,
        other => {
            *other = Value::Object(Map::new());
            // An object now: this call takes the first arm.
            as_object(other)
        }
    }
}

/// The object at `path` below `v` (`&[]`: `v` itself), made where missing: every value on
/// the way that is not an object is replaced by an empty one, a missing key is added.
pub(super) fn object_at<'a>(v: &'a mut Value, path: &[&str]) -> &'a mut Map<String, Value> {
    path.iter().fold(as_object(v), |map, key| {
        as_object(map.entry(*key).or_insert(Value::Null))
    })
}

/// The array under `key` in `map`, made (empty) where missing or not an array.
pub(super) fn array_at<'a>(map: &'a mut Map<String, Value>, key: &str) -> &'a mut Vec<Value> {
    as_array(map.entry(key).or_insert(Value::Null))
}

/// `v` as an array; anything else (null, a string, ...) is replaced by an empty one first.
fn as_array(v: &mut Value) -> &mut Vec<Value> {
    match v {
        Value::Array(list) => list,
        other => {
            *other = Value::Array(Vec::new());
            // An array now: this call takes the first arm.
            as_array(other)
        }
    }
}

/// The labels and annotation that tie a pod to one connection: labels
/// `containerssh_connection_id`, `containerssh_username` (see [`label_value`]; left out when
/// unusable), annotation `containerssh_ip` (the client's address).
pub fn connection_metadata(meta: &ConnMeta) -> (Map<String, Value>, Map<String, Value>) {
    let mut labels = Map::new();
    labels.insert(LABEL_CONNECTION_ID.into(), json!(meta.connection_id));
    if let Some(u) = label_value(&meta.username) {
        labels.insert(LABEL_USERNAME.into(), json!(u));
    }
    let mut annotations = Map::new();
    annotations.insert(ANNOTATION_IP.into(), json!(meta.remote_ip));
    (labels, annotations)
}

/// The pod to create for one connection (or session):
/// - `metadata` from the configuration; `namespace` defaults to `default`, and without `name`
///   or `generateName` the pod gets `generateName: containerssh-`;
/// - label `containerssh_instance` = `instance` (sanitised as in [`label_value`]; [`reap`]
///   selects on it) and, for a connection's pod (`meta`; a pool member has none until its
///   claim), [`connection_metadata`];
/// - `spec` from the configuration, with the console container's `command` replaced by
///   `command` when given (the idle command in connection mode), and `env` appended to every
///   container and init container.
pub fn pod_body(
    cfg: &KubernetesPodConfig,
    meta: Option<&ConnMeta>,
    instance: &str,
    command: Option<&[String]>,
    env: &[(String, String)],
) -> Value {
    let mut metadata = Value::Object(cfg.metadata.clone());
    let fields = object_at(&mut metadata, &[]);
    let empty = |v: Option<&Value>| v.and_then(Value::as_str).is_none_or(str::is_empty);
    if empty(fields.get("namespace")) {
        fields.insert("namespace".into(), json!("default"));
    }
    if empty(fields.get("name")) && empty(fields.get("generateName")) {
        fields.remove("name");
        fields.insert("generateName".into(), json!("containerssh-"));
    }
    let labels = object_at(&mut metadata, &["labels"]);
    if let Some(i) = label_value(instance) {
        labels.insert(LABEL_INSTANCE.into(), json!(i));
    }
    if let Some(meta) = meta {
        let (labels, annotations) = connection_metadata(meta);
        object_at(&mut metadata, &["labels"]).extend(labels);
        object_at(&mut metadata, &["annotations"]).extend(annotations);
    }

    let mut spec = Value::Object(cfg.spec.clone());
    if let Some(command) = command {
        if let Some(c) = spec
            .get_mut("containers")
            .and_then(Value::as_array_mut)
            .and_then(|a| a.get_mut(cfg.console_container_number))
            .and_then(Value::as_object_mut)
        {
            c.insert("command".into(), json!(command));
            // The configured args would be appended to the replaced command.
            c.remove("args");
        }
    }
    if !env.is_empty() {
        for key in ["initContainers", "containers"] {
            let Some(list) = spec.get_mut(key).and_then(Value::as_array_mut) else {
                continue;
            };
            for c in list.iter_mut().filter_map(Value::as_object_mut) {
                let list = array_at(c, "env");
                for (k, v) in env {
                    list.push(json!({"name": k, "value": v}));
                }
            }
        }
    }
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
}

/// Creates the pod `body` (its `metadata.namespace` is used; `default` if absent) and waits
/// until [`wire::evaluate`] says it is ready for exec into `console_container`: a list with
/// `fieldSelector=metadata.name=<name>`, then a watch from the list's `resourceVersion`,
/// restarted when it ends and listed again after a 410. When the pod fails, terminates, is
/// deleted, or is not ready within `timeout`, it is deleted (grace 0) and the error returned.
pub async fn create_and_wait(
    client: &KubeClient,
    body: &Value,
    console_container: &str,
    timeout: Duration,
) -> Result<Pod, PodError> {
    let deadline = Instant::now() + timeout;
    let ns = body
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .unwrap_or("default")
        .to_string();
    let path = format!("/api/v1/namespaces/{}/pods", seg(&ns));
    let created: Pod = tokio::time::timeout_at(deadline, client.post_json(&path, body))
        .await
        .map_err(|_| PodError::Timeout {
            pod: "(being created)".into(),
            timeout,
        })??;
    let name = created
        .metadata
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| PodError::Protocol("the created pod has no name".into()))?;
    let result = match tokio::time::timeout_at(
        deadline,
        wait_ready(client, &ns, &name, console_container, body),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(PodError::Timeout {
            pod: name.clone(),
            timeout,
        }),
    };
    if result.is_err() {
        if let Err(e) = delete(client, &ns, &name, Some(0)).await {
            tracing::warn!(code = "KUBERNETES_POD_REMOVE_FAILED", namespace = ns, pod = name, error = %e, "deleting a failed pod");
        }
    }
    result
}

/// What one look at the pod decided.
enum Verdict {
    Ready(Box<Pod>),
    Wait,
    Fail(PodError),
}

fn judge(pod: Pod, raw: Option<&Value>, container: &str, body: &Value) -> Verdict {
    match wire::evaluate(&pod, container) {
        PodState::Ready => Verdict::Ready(Box::new(pod)),
        PodState::Pending => Verdict::Wait,
        PodState::Failed { reason, message } => {
            let message = if IMAGE_REASONS.contains(&reason.as_str()) {
                let image = failing_image(raw, &reason)
                    .or_else(|| container_image(body, container))
                    .unwrap_or_else(|| "?".into());
                format!("image {image:?} cannot be pulled: {reason}: {message}")
            } else {
                format!("the pod could not be started: {reason}: {message}")
            };
            Verdict::Fail(PodError::NotReady {
                reason,
                message: one_line(&message),
            })
        }
        PodState::Terminated { exit_code } => Verdict::Fail(PodError::NotReady {
            reason: "Terminated".into(),
            message: format!(
                "the pod's container {container:?} exited with code {exit_code} before it was ready"
            ),
        }),
    }
}

/// The image of the container whose status waits for `reason`.
fn failing_image(raw: Option<&Value>, reason: &str) -> Option<String> {
    let raw = raw?;
    ["containerStatuses", "initContainerStatuses"]
        .iter()
        .filter_map(|k| raw.get("status")?.get(k)?.as_array())
        .flatten()
        .find(|c| c.pointer("/state/waiting/reason").and_then(Value::as_str) == Some(reason))
        .and_then(|c| c.get("image")?.as_str())
        .map(str::to_string)
}

/// The image of `container` in a pod body.
fn container_image(body: &Value, container: &str) -> Option<String> {
    body.pointer("/spec/containers")?
        .as_array()?
        .iter()
        .find(|c| c.get("name").and_then(Value::as_str) == Some(container))?
        .get("image")?
        .as_str()
        .map(str::to_string)
}

fn gone(name: &str) -> PodError {
    PodError::NotReady {
        reason: "Deleted".into(),
        message: format!("the pod {name} was deleted"),
    }
}

async fn wait_ready(
    client: &KubeClient,
    ns: &str,
    name: &str,
    container: &str,
    body: &Value,
) -> Result<Pod, PodError> {
    watch_pod(client, ns, name, |pod, raw| {
        match judge(pod, raw, container, body) {
            Verdict::Ready(p) => Some(Ok(*p)),
            Verdict::Fail(e) => Some(Err(e)),
            Verdict::Wait => None,
        }
    })
    .await
}

/// Waits until the existing pod `name` is ready for exec into `container` (persistent mode,
/// a pod another connection is starting), up to `timeout`. It is never deleted here.
pub async fn wait_ready_existing(
    client: &KubeClient,
    ns: &str,
    name: &str,
    container: &str,
    timeout: Duration,
) -> Result<Pod, PodError> {
    let wait = wait_ready(client, ns, name, container, &Value::Null);
    tokio::time::timeout(timeout, wait)
        .await
        .unwrap_or_else(|_| {
            Err(PodError::Timeout {
                pod: name.to_string(),
                timeout,
            })
        })
}

/// Waits until `container` of pod `name` has terminated and returns its exit code (session
/// mode's exit status, `shared/docs/kubernetes.md` §1.3), up to `timeout`.
pub async fn wait_exit(
    client: &KubeClient,
    ns: &str,
    name: &str,
    container: &str,
    timeout: Duration,
) -> Result<i32, PodError> {
    let wait = watch_pod(client, ns, name, |pod, _| {
        wire::terminated_exit_code(&pod, container).map(Ok)
    });
    tokio::time::timeout(timeout, wait)
        .await
        .unwrap_or_else(|_| {
            Err(PodError::Timeout {
                pod: name.to_string(),
                timeout,
            })
        })
}

/// Looks at pod `name` (a list with its name as field selector, then a watch from the list's
/// `resourceVersion`, restarted when it ends and listed again after a 410) until `decide`
/// returns a result. A deleted pod is an error.
async fn watch_pod<T>(
    client: &KubeClient,
    ns: &str,
    name: &str,
    mut decide: impl FnMut(Pod, Option<&Value>) -> Option<Result<T, PodError>>,
) -> Result<T, PodError> {
    let base = format!(
        "/api/v1/namespaces/{}/pods?fieldSelector={}",
        seg(ns),
        encode_query(&format!("metadata.name={name}"))
    );
    'list: loop {
        let list: Value = client.get_json(&base).await?;
        let items = list
            .get("items")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let Some(raw) = items.into_iter().next() else {
            return Err(gone(name));
        };
        let pod: Pod = serde_json::from_value(raw.clone())
            .map_err(|e| PodError::Protocol(format!("decoding the pod: {e}")))?;
        if let Some(r) = decide(pod, Some(&raw)) {
            return r;
        }
        let mut rv = list
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        loop {
            let mut url = format!(
                "{base}&watch=true&allowWatchBookmarks=true&timeoutSeconds={WATCH_TIMEOUT_SECONDS}"
            );
            if !rv.is_empty() {
                url.push_str(&format!("&resourceVersion={}", encode_query(&rv)));
            }
            let mut lines = match client.watch_lines(&url).await {
                Ok(l) => l,
                Err(e) if e.http_code() == Some(410) => continue 'list,
                Err(e) => return Err(e.into()),
            };
            while let Some(line) = lines.next().await {
                let line = line?;
                let event = wire::decode_event(&line)
                    .map_err(|e| PodError::Protocol(format!("watch event: {e}")))?;
                let pod = match event {
                    WatchEvent::Added(p) | WatchEvent::Modified(p) => p,
                    WatchEvent::Deleted(_) => return Err(gone(name)),
                    WatchEvent::Bookmark { resource_version } => {
                        rv = resource_version;
                        continue;
                    }
                    WatchEvent::Error(status) => {
                        let api = wire::ApiError::from_status(
                            status
                                .code
                                .and_then(|c| u16::try_from(c).ok())
                                .unwrap_or(500),
                            status,
                        );
                        if api.is_gone() {
                            continue 'list;
                        }
                        return Err(PodError::Protocol(format!("watch error: {api}")));
                    }
                };
                if let Some(v) = pod.metadata.resource_version.clone() {
                    rv = v;
                }
                // The event's `object` (null when absent).
                let raw = serde_json::from_slice::<Value>(&line)
                    .ok()
                    .map(|mut v| v.get_mut("object").map_or(Value::Null, Value::take));
                if let Some(r) = decide(*pod, raw.as_ref()) {
                    return r;
                }
            }
            // The watch ended (timeoutSeconds, a dropped connection): watch again from `rv`.
        }
    }
}

/// Deletes pod `name` with `propagationPolicy: Background` and, when given, that grace
/// period (`None`: the pod's own, 30 s by default; `Some(0)`: removed at once). A pod that
/// does not exist counts as deleted.
pub async fn delete(
    client: &KubeClient,
    namespace: &str,
    name: &str,
    grace_seconds: Option<u32>,
) -> Result<(), PodError> {
    let path = pod_path(namespace, name);
    let mut opts =
        json!({"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"});
    if let Some(g) = grace_seconds {
        object_at(&mut opts, &[]).insert("gracePeriodSeconds".into(), json!(g));
    }
    match client.delete::<_, Value>(&path, Some(&opts)).await {
        Ok(_) => Ok(()),
        Err(e) if e.http_code() == Some(404) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes (grace 0) every pod in `namespace` labelled `containerssh_instance=<instance>`
/// (the instance sanitised as in [`pod_body`]); returns how many were deleted. Pods already
/// being deleted are deleted again with grace 0.
pub async fn reap(client: &KubeClient, namespace: &str, instance: &str) -> Result<usize, PodError> {
    let Some(value) = label_value(instance) else {
        return Ok(0);
    };
    delete_selected(client, namespace, &format!("{LABEL_INSTANCE}={value}")).await
}

/// Deletes (grace 0) every pod of one connection of this instance; returns how many.
pub async fn delete_connection(
    client: &KubeClient,
    namespace: &str,
    instance: &str,
    connection_id: &str,
) -> Result<usize, PodError> {
    let mut selector = format!("{LABEL_CONNECTION_ID}={connection_id}");
    if let Some(value) = label_value(instance) {
        selector.push_str(&format!(",{LABEL_INSTANCE}={value}"));
    }
    delete_selected(client, namespace, &selector).await
}

async fn delete_selected(
    client: &KubeClient,
    namespace: &str,
    selector: &str,
) -> Result<usize, PodError> {
    let path = format!(
        "/api/v1/namespaces/{}/pods?labelSelector={}",
        seg(namespace),
        encode_query(selector)
    );
    let list: Value = client.get_json(&path).await?;
    let mut n = 0;
    let items = list.get("items").and_then(Value::as_array);
    for item in items.into_iter().flatten() {
        let Some(name) = item.pointer("/metadata/name").and_then(Value::as_str) else {
            continue;
        };
        let ns = item
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or(namespace);
        delete(client, ns, name, Some(0)).await?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(user: &str) -> ConnMeta {
        ConnMeta {
            connection_id: "0123456789abcdef0123456789abcdef".into(),
            username: user.into(),
            remote_ip: "10.0.0.1".into(),
        }
    }

    #[test]
    fn labels_are_sanitised() {
        assert_eq!(label_value("alice").as_deref(), Some("alice"));
        assert_eq!(label_value("a.b@c").as_deref(), Some("a-b-c"));
        assert_eq!(label_value("_x_").as_deref(), Some("x"));
        assert_eq!(label_value(""), None);
        assert_eq!(label_value("@@"), None);
        assert_eq!(label_value(&"a".repeat(64)), None);
        assert_eq!(label_value(&"a".repeat(63)).map(|s| s.len()), Some(63));
        assert_eq!(encode_query("a b=c/ü"), "a%20b%3Dc%2F%C3%BC");
    }

    #[test]
    fn body_from_config() {
        let mut cfg = KubernetesPodConfig {
            spec: serde_json::from_value(json!({
                "initContainers": [{"name": "init", "image": "i"}],
                "containers": [{"name": "shell", "image": "img", "args": ["x"]},
                               {"name": "side", "image": "s", "env": [{"name": "A", "value": "1"}]}]
            }))
            .unwrap(),
            ..Default::default()
        };
        let cmd = vec!["sleep".to_string(), "1".to_string()];
        let env = vec![("K".to_string(), "V".to_string())];
        let b = pod_body(&cfg, Some(&meta("bob@x")), "inst-1", Some(&cmd), &env);
        assert_eq!(b["metadata"]["namespace"], "default");
        assert_eq!(b["metadata"]["generateName"], "containerssh-");
        let l = &b["metadata"]["labels"];
        assert_eq!(l[LABEL_USERNAME], "bob-x");
        assert_eq!(l[LABEL_INSTANCE], "inst-1");
        assert_eq!(l[LABEL_CONNECTION_ID], "0123456789abcdef0123456789abcdef");
        assert_eq!(b["metadata"]["annotations"][ANNOTATION_IP], "10.0.0.1");
        let c = &b["spec"]["containers"];
        assert_eq!(c[0]["command"], json!(["sleep", "1"]));
        assert!(c[0].get("args").is_none());
        assert_eq!(c[0]["env"], json!([{"name": "K", "value": "V"}]));
        assert_eq!(c[1]["env"][1], json!({"name": "K", "value": "V"}));
        assert!(c[1].get("command").is_none());
        assert_eq!(b["spec"]["initContainers"][0]["env"][0]["name"], "K");

        cfg.metadata = serde_json::from_value(json!({"name": "fixed", "namespace": "ns"})).unwrap();
        let b = pod_body(&cfg, Some(&meta(&"u".repeat(64))), "i", None, &[]);
        assert_eq!(b["metadata"]["name"], "fixed");
        assert_eq!(b["metadata"]["namespace"], "ns");
        assert!(b["metadata"].get("generateName").is_none());
        assert!(b["metadata"]["labels"].get(LABEL_USERNAME).is_none());
        assert_eq!(b["spec"]["containers"][0]["args"], json!(["x"]));
    }
}
