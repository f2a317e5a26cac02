//! The `kubernetes` block checked into what the Kubernetes backend runs on. Every error names
//! its key path. Checked at start-up whichever backend is selected (a config webhook may switch a
//! login to this one), and again for a login whose configuration changes the block. Resolving
//! the connection (kubeconfig files, the in-cluster environment) happens when the backend is
//! built; what needs neither is checked here.

use serde_json::{Map, Value};

use super::connection::{self, ConnectionError};
use super::pods;
use crate::config::model::{
    ExecutionMode, KubernetesConfig, KubernetesConnectionConfig, KubernetesPodConfig,
    KubernetesTimeouts,
};
use crate::config::KeyError;

/// `kubernetes`, checked.
#[derive(Clone, Debug)]
pub struct KubeSettings {
    /// `kubernetes.connection`, checked; resolved when the backend is built.
    pub connection: KubernetesConnectionConfig,
    /// `kubernetes.pod`: its `metadata` and `spec` go to the API server as they are, with
    /// our labels, the agent's init container and (session mode) the console set for attach.
    pub pod: KubernetesPodConfig,
    /// The name of the console container (`spec.containers[consoleContainerNumber]`).
    pub console: String,
    pub timeouts: KubernetesTimeouts,
}

impl KubeSettings {
    pub fn check(k: &KubernetesConfig) -> Result<Self, KeyError> {
        check_block(k)?;
        throttle(&k.connection)?;
        let console = pods::console_container_name(&k.pod).ok_or_else(|| {
            bad(
                "kubernetes.pod.consoleContainerNumber",
                "the console container has no name",
            )
        })?;
        Ok(Self {
            connection: k.connection.clone(),
            pod: k.pod.clone(),
            console,
            timeouts: k.timeouts.clone(),
        })
    }
}

fn bad(key: &str, message: impl Into<String>) -> KeyError {
    KeyError::new(key, message)
}

/// `qps` and `burst`: client-go throttles each ContainerSSH connection's client to them. This
/// server's client is shared by all connections and bounds what each connection can ask for
/// instead (its channels, signals and forwards), so a value other than the default would be
/// a promise it does not keep: refused, with the reason.
fn throttle(c: &KubernetesConnectionConfig) -> Result<(), KeyError> {
    let (qps, burst) = (
        crate::config::defaults::kubernetes_qps(),
        crate::config::defaults::kubernetes_burst(),
    );
    // Exact: the default as parsed, or 0 (unset, in Go's terms).
    if !(c.qps == qps || c.qps == 0.0) {
        return Err(bad(
            "kubernetes.connection.qps",
            format!(
                "only the default ({qps}) is accepted: this server does not throttle API calls                  per connection as client-go does (each connection's calls are bounded by its                  channel, signal and forwarding limits); remove the key"
            ),
        ));
    }
    if !(c.burst == burst || c.burst == 0) {
        return Err(bad(
            "kubernetes.connection.burst",
            format!(
                "only the default ({burst}) is accepted: this server does not throttle API                  calls per connection as client-go does; remove the key"
            ),
        ));
    }
    Ok(())
}

/// `ObjectMeta` fields (Kubernetes JSON names); ContainerSSH parses `pod.metadata` strictly.
const OBJECT_META_FIELDS: &[&str] = &[
    "name",
    "generateName",
    "namespace",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

/// `PodSpec` fields (Kubernetes 1.35).
const POD_SPEC_FIELDS: &[&str] = &[
    "activeDeadlineSeconds",
    "affinity",
    "automountServiceAccountToken",
    "containers",
    "dnsConfig",
    "dnsPolicy",
    "enableServiceLinks",
    "ephemeralContainers",
    "hostAliases",
    "hostIPC",
    "hostNetwork",
    "hostPID",
    "hostUsers",
    "hostname",
    "hostnameOverride",
    "imagePullSecrets",
    "initContainers",
    "nodeName",
    "nodeSelector",
    "os",
    "overhead",
    "preemptionPolicy",
    "priority",
    "priorityClassName",
    "readinessGates",
    "resourceClaims",
    "resources",
    "restartPolicy",
    "runtimeClassName",
    "schedulerName",
    "schedulingGates",
    "securityContext",
    "serviceAccount",
    "serviceAccountName",
    "setHostnameAsFQDN",
    "shareProcessNamespace",
    "subdomain",
    "terminationGracePeriodSeconds",
    "tolerations",
    "topologySpreadConstraints",
    "volumes",
    "workloadRef",
];

/// `Container` fields (Kubernetes 1.35).
const CONTAINER_FIELDS: &[&str] = &[
    "args",
    "command",
    "env",
    "envFrom",
    "image",
    "imagePullPolicy",
    "lifecycle",
    "livenessProbe",
    "name",
    "ports",
    "readinessProbe",
    "resizePolicy",
    "resources",
    "restartPolicy",
    "restartPolicyRules",
    "securityContext",
    "startupProbe",
    "stdin",
    "stdinOnce",
    "terminationMessagePath",
    "terminationMessagePolicy",
    "tty",
    "volumeDevices",
    "volumeMounts",
    "workingDir",
];

fn known_fields(key: &str, map: &Map<String, Value>, known: &[&str]) -> Result<(), KeyError> {
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(bad(
            &format!("{key}.{k}"),
            "unknown field (Kubernetes JSON names are case-sensitive camelCase)",
        )),
        None => Ok(()),
    }
}

fn string_field<'a>(
    key: &str,
    map: &'a Map<String, Value>,
    field: &str,
) -> Result<&'a str, KeyError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(""),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(bad(&format!("{key}.{field}"), "must be a string")),
    }
}

fn string_map(key: &str, map: &Map<String, Value>, field: &str) -> Result<(), KeyError> {
    match map.get(field) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Object(o)) if o.values().all(Value::is_string) => Ok(()),
        Some(_) => Err(bad(&format!("{key}.{field}"), "must be a map of strings")),
    }
}

/// The containers of `spec.<field>`: a list of objects with known fields and a name each.
fn containers<'a>(
    spec: &'a Map<String, Value>,
    field: &str,
) -> Result<Vec<&'a Map<String, Value>>, KeyError> {
    let key = format!("kubernetes.pod.spec.{field}");
    let list = match spec.get(field) {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad(&key, "must be a list of containers")),
    };
    let mut out = Vec::new();
    let mut names = Vec::new();
    for (i, c) in list.iter().enumerate() {
        let ckey = format!("{key}[{i}]");
        let c = c
            .as_object()
            .ok_or_else(|| bad(&ckey, "must be a container object"))?;
        known_fields(&ckey, c, CONTAINER_FIELDS)?;
        let name = string_field(&ckey, c, "name")?;
        if name.is_empty() {
            return Err(bad(&format!("{ckey}.name"), "required"));
        }
        if names.contains(&name) {
            return Err(bad(
                &format!("{ckey}.name"),
                format!("duplicate container name {name:?}"),
            ));
        }
        names.push(name);
        string_field(&ckey, c, "image")?;
        out.push(c);
    }
    Ok(out)
}

fn check_block(k: &KubernetesConfig) -> Result<(), KeyError> {
    connection::check(&k.connection).map_err(|e| match e {
        ConnectionError::Invalid { key, message } => {
            bad(&format!("kubernetes.connection.{key}"), message)
        }
        other => bad("kubernetes.connection", other.to_string()),
    })?;

    let pod = &k.pod;
    let meta = &pod.metadata;
    known_fields("kubernetes.pod.metadata", meta, OBJECT_META_FIELDS)?;
    let name = string_field("kubernetes.pod.metadata", meta, "name")?;
    string_field("kubernetes.pod.metadata", meta, "generateName")?;
    string_field("kubernetes.pod.metadata", meta, "namespace")?;
    string_map("kubernetes.pod.metadata", meta, "labels")?;
    string_map("kubernetes.pod.metadata", meta, "annotations")?;

    let spec = &pod.spec;
    known_fields("kubernetes.pod.spec", spec, POD_SPEC_FIELDS)?;
    let main = containers(spec, "containers")?;
    containers(spec, "initContainers")?;
    if main.is_empty() {
        return Err(bad(
            "kubernetes.pod.spec.containers",
            "at least one container is required",
        ));
    }
    for (i, c) in main.iter().enumerate() {
        if string_field("", c, "image")?.is_empty() {
            return Err(bad(
                &format!("kubernetes.pod.spec.containers[{i}].image"),
                "required",
            ));
        }
    }
    if pod.console_container_number >= main.len() {
        return Err(bad(
            "kubernetes.pod.consoleContainerNumber",
            format!(
                "{} is out of range: spec.containers has {} container(s)",
                pod.console_container_number,
                main.len()
            ),
        ));
    }
    let restart = string_field("kubernetes.pod.spec", spec, "restartPolicy")?;
    if pod.mode == ExecutionMode::Session && !(restart.is_empty() || restart == "Never") {
        return Err(bad(
            "kubernetes.pod.spec.restartPolicy",
            "session mode needs restartPolicy Never (or unset)",
        ));
    }
    if pod.mode == ExecutionMode::Persistent && name.is_empty() {
        return Err(bad(
            "kubernetes.pod.metadata.name",
            "persistent mode needs the name of the pod to exec into",
        ));
    }
    if pod.mode != ExecutionMode::Persistent && pod.create_missing_pods {
        return Err(bad(
            "kubernetes.pod.createMissingPods",
            "only meaningful in persistent mode",
        ));
    }
    crate::backend::pool::check_config(&pod.pool, pod.mode, !name.is_empty())
        .map_err(|(key, message)| bad(&format!("kubernetes.pod.pool.{key}"), message))?;
    if pod.shell_command.is_empty() {
        return Err(bad("kubernetes.pod.shellCommand", "must not be empty"));
    }
    if pod.mode != ExecutionMode::Session && pod.idle_command.is_empty() {
        return Err(bad(
            "kubernetes.pod.idleCommand",
            "connection and persistent modes need an idle command",
        ));
    }
    if !pod.disable_agent && !crate::auth::metadata::container_path_ok(&pod.agent_path) {
        return Err(bad(
            "kubernetes.pod.agentPath",
            "must be an absolute path to a file, without `.` or `..` components",
        ));
    }
    if pod
        .agent_init_image
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(bad(
            "kubernetes.pod.agentInitImage",
            "must be an image reference",
        ));
    }
    for (key, map) in [
        ("exposeAuthMetadataAsEnv", &pod.expose_auth_metadata_as_env),
        (
            "exposeAuthMetadataAsLabels",
            &pod.expose_auth_metadata_as_labels,
        ),
        (
            "exposeAuthMetadataAsAnnotations",
            &pod.expose_auth_metadata_as_annotations,
        ),
    ] {
        if let Some((m, _)) = map.iter().find(|(m, v)| m.is_empty() || v.is_empty()) {
            return Err(bad(
                &format!("kubernetes.pod.{key}"),
                format!("empty name in entry {m:?}"),
            ));
        }
    }
    let t = &k.timeouts;
    KeyError::positive_durations(
        "kubernetes.timeouts",
        &[
            ("podStart", t.pod_start),
            ("podStop", t.pod_stop),
            ("commandStart", t.command_start),
            ("signal", t.signal),
            ("window", t.window),
            ("http", t.http),
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load::parse_yaml;
    use crate::config::AppConfig;

    /// `kubernetes:` with `block` (indented by two) below it, checked.
    fn check(block: &str) -> Result<KubeSettings, KeyError> {
        let cfg: AppConfig = parse_yaml("c", &format!("kubernetes:\n{block}")).unwrap();
        KubeSettings::check(&cfg.kubernetes)
    }

    #[test]
    fn defaults_check() {
        let s = check("  timeouts:\n    http: 5s\n").unwrap();
        assert_eq!(s.console, "shell");
        assert_eq!(s.connection.host, "kubernetes.default.svc");
    }

    #[test]
    fn errors_name_the_key() {
        let cases = [
            ("  pod:\n    spec: {}\n", "kubernetes.pod.spec.containers"),
            (
                "  pod:\n    spec: {containers: [{name: a}]}\n",
                "kubernetes.pod.spec.containers[0].image",
            ),
            (
                "  pod:\n    spec: {containers: [{image: a}]}\n",
                "kubernetes.pod.spec.containers[0].name",
            ),
            (
                "  pod:\n    consoleContainerNumber: 1\n",
                "kubernetes.pod.consoleContainerNumber",
            ),
            (
                "  pod:\n    mode: session\n    spec: {restartPolicy: Always, containers: [{name: a, image: b}]}\n",
                "kubernetes.pod.spec.restartPolicy",
            ),
            ("  pod:\n    mode: persistent\n", "kubernetes.pod.metadata.name"),
            ("  pod:\n    createMissingPods: true\n", "kubernetes.pod.createMissingPods"),
            (
                "  pod:\n    spec: {containers: [{name: a, image: b}], hostnetwork: true}\n",
                "kubernetes.pod.spec.hostnetwork",
            ),
            (
                "  pod:\n    spec: {containers: [{name: a, image: b, Image: c}]}\n",
                "kubernetes.pod.spec.containers[0].Image",
            ),
            ("  pod:\n    metadata: {nam: x}\n", "kubernetes.pod.metadata.nam"),
            (
                "  connection:\n    cert: x\n    certFile: y\n",
                "kubernetes.connection.cert",
            ),
            ("  connection:\n    host: http://h\n", "kubernetes.connection.host"),
            ("  connection:\n    path: /apis\n", "kubernetes.connection.path"),
            (
                "  connection:\n    host: h\n    kubeconfig: /k\n",
                "kubernetes.connection.kubeconfig",
            ),
            ("  connection:\n    qps: 20\n", "kubernetes.connection.qps"),
            ("  connection:\n    burst: 40\n", "kubernetes.connection.burst"),
            ("  timeouts:\n    podStart: 0s\n", "kubernetes.timeouts.podStart"),
            (
                "  pod:\n    mode: session\n    pool: {size: 1}\n",
                "kubernetes.pod.pool.size",
            ),
            (
                "  pod:\n    metadata: {name: p}\n    pool: {size: 1}\n",
                "kubernetes.pod.pool.size",
            ),
            ("  pod:\n    pool: {size: 1001}\n", "kubernetes.pod.pool.size"),
            (
                "  pod:\n    pool: {size: 1, maxAge: 0s}\n",
                "kubernetes.pod.pool.maxAge",
            ),
        ];
        for (block, key) in cases {
            let err = check(block).unwrap_err();
            assert_eq!(err.key, key, "{block}: {err}");
        }
        // The defaults, written out, and 0 (unset) are accepted.
        assert!(check("  connection:\n    qps: 5\n    burst: 10\n").is_ok());
        assert!(check("  connection:\n    qps: 0\n    burst: 0\n").is_ok());
        let pooled = check("  pod:\n    pool: {size: 3, maxAge: 5m}\n").unwrap();
        assert_eq!(pooled.pod.pool.size, 3);
    }
}
