//! The example Kubernetes deployment in `deploy/kubernetes/`: every manifest parses, the Role
//! grants exactly what the backend needs, the server runs locked down, and the embedded server
//! configuration is accepted by the server's own loader and validator.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::Value;

use containerssh::backend::build::checked_settings;
use containerssh::backend::kubernetes::connection::resolve_with;
use containerssh::config::load::parse_yaml;
use containerssh::config::model::{AppConfig, BackendName, InClusterMode};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes")
}

/// `(file name, document)` for every YAML document in `deploy/kubernetes/*.yaml`.
fn documents() -> Vec<(String, Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .expect("deploy/kubernetes exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests found");
    let mut docs = Vec::new();
    for path in files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        for de in serde_yaml::Deserializer::from_str(&text) {
            let doc = Value::deserialize(de).unwrap_or_else(|e| panic!("{name}: {e}"));
            if doc.is_null() {
                continue; // an empty document (e.g. a trailing `---`)
            }
            docs.push((name.clone(), doc));
        }
    }
    docs
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(v, path)?.as_str()
}

fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

/// The single document of `kind` named `name`.
fn find<'a>(docs: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .map(|(_, d)| d)
        .filter(|d| str_at(d, &["kind"]) == Some(kind))
        .filter(|d| str_at(d, &["metadata", "name"]) == Some(name))
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind} {name}");
    found[0]
}

#[test]
fn every_document_has_api_version_kind_and_name() {
    let docs = documents();
    for (file, doc) in &docs {
        for path in [&["apiVersion"][..], &["kind"], &["metadata", "name"]] {
            let v = str_at(doc, path).unwrap_or("");
            assert!(!v.is_empty(), "{file}: a document lacks {}", path.join("."));
        }
    }
    let kinds: BTreeSet<&str> = docs
        .iter()
        .filter_map(|(_, d)| str_at(d, &["kind"]))
        .collect();
    for kind in [
        "Namespace",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "Deployment",
        "Service",
        "NetworkPolicy",
        "Kustomization",
    ] {
        assert!(kinds.contains(kind), "no {kind} in deploy/kubernetes");
    }
}

#[test]
fn kustomization_lists_every_manifest() {
    let docs = documents();
    let k = find(&docs, "Kustomization", "containerssh");
    let listed: BTreeSet<&str> = at(k, &["resources"])
        .and_then(Value::as_sequence)
        .expect("resources")
        .iter()
        .map(|v| v.as_str().expect("resource is a string"))
        .collect();
    let files: BTreeSet<&str> = docs
        .iter()
        .map(|(f, _)| f.as_str())
        .filter(|f| *f != "kustomization.yaml")
        .collect();
    assert_eq!(listed, files);
}

#[test]
fn guest_namespace_enforces_restricted_pod_security() {
    let docs = documents();
    find(&docs, "Namespace", "containerssh");
    let ns = find(&docs, "Namespace", "containerssh-guests");
    assert_eq!(
        str_at(
            ns,
            &["metadata", "labels", "pod-security.kubernetes.io/enforce"]
        ),
        Some("restricted")
    );
}

#[test]
fn role_grants_exactly_what_the_backend_needs() {
    let docs = documents();
    let role = find(&docs, "Role", "containerssh");
    assert_eq!(
        str_at(role, &["metadata", "namespace"]),
        Some("containerssh-guests")
    );
    let mut granted = BTreeSet::new();
    for rule in at(role, &["rules"])
        .and_then(Value::as_sequence)
        .expect("rules")
    {
        let rule = rule.as_mapping().expect("rule is a mapping");
        for key in rule.keys() {
            let key = key.as_str().unwrap();
            assert!(
                ["apiGroups", "resources", "verbs"].contains(&key),
                "unexpected rule field {key} (resourceNames, nonResourceURLs, …)"
            );
        }
        let list = |k: &str| -> Vec<String> {
            rule.get(k)
                .and_then(Value::as_sequence)
                .unwrap_or_else(|| panic!("rule without {k}"))
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        let (groups, resources, verbs) = (list("apiGroups"), list("resources"), list("verbs"));
        assert_eq!(groups, [""], "only the core API group");
        for r in &resources {
            for v in &verbs {
                assert!(!r.contains('*') && !v.contains('*'), "wildcard in {r} {v}");
                assert!(
                    granted.insert((r.clone(), v.clone())),
                    "{r} {v} granted twice"
                );
            }
        }
    }
    let expected: BTreeSet<(String, String)> = [
        ("pods", "create"),
        ("pods", "get"),
        ("pods", "list"),
        ("pods", "watch"),
        ("pods", "delete"),
        ("pods", "patch"),
        ("pods/exec", "create"),
        ("pods/exec", "get"),
        ("pods/attach", "create"),
        ("pods/attach", "get"),
        ("pods/log", "get"),
    ]
    .into_iter()
    .map(|(r, v)| (r.to_string(), v.to_string()))
    .collect();
    assert_eq!(granted, expected);

    let binding = find(&docs, "RoleBinding", "containerssh");
    assert_eq!(
        str_at(binding, &["metadata", "namespace"]),
        Some("containerssh-guests")
    );
    assert_eq!(str_at(binding, &["roleRef", "kind"]), Some("Role"));
    assert_eq!(str_at(binding, &["roleRef", "name"]), Some("containerssh"));
    let subjects = at(binding, &["subjects"])
        .and_then(Value::as_sequence)
        .expect("subjects");
    assert_eq!(subjects.len(), 1);
    assert_eq!(str_at(&subjects[0], &["kind"]), Some("ServiceAccount"));
    assert_eq!(str_at(&subjects[0], &["name"]), Some("containerssh"));
    assert_eq!(str_at(&subjects[0], &["namespace"]), Some("containerssh"));
    let sa = find(&docs, "ServiceAccount", "containerssh");
    assert_eq!(str_at(sa, &["metadata", "namespace"]), Some("containerssh"));

    // No cluster-wide grants anywhere.
    for (file, doc) in &docs {
        let kind = str_at(doc, &["kind"]).unwrap();
        assert!(
            kind != "ClusterRole" && kind != "ClusterRoleBinding",
            "{file}: {kind}"
        );
    }
}

fn assert_locked_down(what: &str, sc: &Value, container: bool) {
    let b = |k: &str| at(sc, &[k]).and_then(Value::as_bool);
    assert_eq!(b("runAsNonRoot"), Some(true), "{what}: runAsNonRoot");
    assert_eq!(
        str_at(sc, &["seccompProfile", "type"]),
        Some("RuntimeDefault"),
        "{what}: seccompProfile"
    );
    if container {
        assert_eq!(
            b("readOnlyRootFilesystem"),
            Some(true),
            "{what}: readOnlyRootFilesystem"
        );
        assert_eq!(
            b("allowPrivilegeEscalation"),
            Some(false),
            "{what}: allowPrivilegeEscalation"
        );
        let drop: Vec<&str> = at(sc, &["capabilities", "drop"])
            .and_then(Value::as_sequence)
            .unwrap_or_else(|| panic!("{what}: capabilities.drop"))
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(drop, ["ALL"], "{what}: capabilities.drop");
        assert!(
            at(sc, &["capabilities", "add"]).is_none(),
            "{what}: capabilities.add"
        );
        assert_ne!(b("privileged"), Some(true), "{what}: privileged");
    }
}

#[test]
fn server_deployment_is_locked_down() {
    let docs = documents();
    let d = find(&docs, "Deployment", "containerssh");
    let spec = at(d, &["spec", "template", "spec"]).expect("pod template");
    assert_eq!(str_at(spec, &["serviceAccountName"]), Some("containerssh"));
    let pod_sc = at(spec, &["securityContext"]).expect("pod securityContext");
    assert_locked_down("pod", pod_sc, false);
    // The pod-level settings the task also asks of the container, where Kubernetes has them.
    for k in ["hostNetwork", "hostPID", "hostIPC"] {
        assert_ne!(at(spec, &[k]).and_then(Value::as_bool), Some(true), "{k}");
    }
    assert_eq!(
        at(spec, &["terminationGracePeriodSeconds"]).and_then(Value::as_u64),
        Some(30)
    );
    let containers = at(spec, &["containers"])
        .and_then(Value::as_sequence)
        .expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    assert_locked_down(
        "container",
        at(c, &["securityContext"]).expect("container securityContext"),
        true,
    );
    // Non-root in fact, not just by promise: distroless nonroot's uid.
    for sc in [pod_sc, at(c, &["securityContext"]).unwrap()] {
        assert_eq!(at(sc, &["runAsUser"]).and_then(Value::as_u64), Some(65532));
    }
    assert!(at(c, &["resources", "limits", "memory"]).is_some());
    // Both probes ask the health endpoint, on the port config.yaml's `health` listens on.
    for probe in ["livenessProbe", "readinessProbe"] {
        assert_eq!(
            at(c, &[probe, "httpGet", "port"]).and_then(Value::as_str),
            Some("health"),
            "{probe}"
        );
    }
    let health_port = at(c, &["ports"])
        .and_then(Value::as_sequence)
        .and_then(|ports| {
            ports
                .iter()
                .find(|p| str_at(p, &["name"]) == Some("health"))
        })
        .and_then(|p| at(p, &["containerPort"]))
        .and_then(Value::as_u64)
        .expect("a port named health");
    let settings = server_settings();
    let health = settings
        .health
        .as_ref()
        .expect("config.yaml enables health");
    assert_eq!(u64::from(health.listen.port()), health_port);
    assert!(settings.metrics.is_some(), "config.yaml enables metrics");
    let port = at(c, &["ports"])
        .and_then(Value::as_sequence)
        .and_then(|p| p.first())
        .expect("ports");
    assert_eq!(str_at(port, &["name"]), Some("ssh"));
    assert_eq!(
        at(port, &["containerPort"]).and_then(Value::as_u64),
        Some(2222)
    );
    // Only the state directory and /tmp are writable.
    for m in at(c, &["volumeMounts"])
        .and_then(Value::as_sequence)
        .expect("volumeMounts")
    {
        let path = str_at(m, &["mountPath"]).unwrap();
        let ro = at(m, &["readOnly"]).and_then(Value::as_bool) == Some(true);
        assert!(
            ro || path == "/var/lib/containerssh" || path == "/tmp",
            "{path} is mounted writable"
        );
    }

    let svc = find(&docs, "Service", "containerssh");
    let p = at(svc, &["spec", "ports"])
        .and_then(Value::as_sequence)
        .and_then(|p| p.first())
        .expect("service port");
    assert_eq!(at(p, &["port"]).and_then(Value::as_u64), Some(22));
}

#[test]
fn guest_network_policy_denies_all_but_dns() {
    let docs = documents();
    let np = find(&docs, "NetworkPolicy", "guests-default-deny");
    assert_eq!(
        str_at(np, &["metadata", "namespace"]),
        Some("containerssh-guests")
    );
    let spec = at(np, &["spec"]).unwrap();
    assert_eq!(
        at(spec, &["podSelector"])
            .and_then(Value::as_mapping)
            .map(|m| m.len()),
        Some(0),
        "applies to every guest pod"
    );
    let types: Vec<&str> = at(spec, &["policyTypes"])
        .and_then(Value::as_sequence)
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(types, ["Ingress", "Egress"]);
    let ingress = at(spec, &["ingress"]).and_then(Value::as_sequence);
    assert!(ingress.is_none_or(|i| i.is_empty()), "no ingress allowed");
    let egress = at(spec, &["egress"]).and_then(Value::as_sequence).unwrap();
    assert_eq!(egress.len(), 1);
    for p in at(&egress[0], &["ports"])
        .and_then(Value::as_sequence)
        .unwrap()
    {
        assert_eq!(at(p, &["port"]).and_then(Value::as_u64), Some(53));
    }
    let to = at(&egress[0], &["to"])
        .and_then(Value::as_sequence)
        .unwrap();
    assert_eq!(
        str_at(&to[0], &["podSelector", "matchLabels", "k8s-app"]),
        Some("kube-dns")
    );
}

/// config.yaml's server configuration, checked as the server checks it.
fn server_settings() -> containerssh::config::Settings {
    let file = "deploy/kubernetes/config.yaml#config.yaml";
    let raw: AppConfig = parse_yaml(file, &server_config_text()).unwrap_or_else(|e| panic!("{e}"));
    checked_settings(file, raw).unwrap_or_else(|e| panic!("{e}"))
}

fn server_config_text() -> String {
    let docs = documents();
    let cm = find(&docs, "ConfigMap", "containerssh-config");
    str_at(cm, &["data", "config.yaml"])
        .expect("data.config.yaml")
        .to_string()
}

#[test]
fn embedded_server_config_loads_and_validates() {
    let s = server_settings();

    assert_eq!(s.ssh.listen.to_string(), "0.0.0.0:2222");
    assert_eq!(
        s.host_keys,
        ["/etc/containerssh/host-key/ssh_host_ed25519_key"]
    );
    assert_eq!(
        s.authorized_keys.as_deref(),
        Some("/etc/containerssh/authorized-keys/authorized_keys")
    );
    assert_eq!(s.state_directory, Path::new("/var/lib/containerssh"));
    assert!(!s.forwarding.any());
    assert_eq!(s.backend, BackendName::Kubernetes);

    let k = &s.kubernetes;
    assert_eq!(k.connection.in_cluster, InClusterMode::True);
    assert_eq!(k.pod.metadata["namespace"], "containerssh-guests");
    let spec = &k.pod.spec;
    assert_eq!(spec["automountServiceAccountToken"], false);
    assert_eq!(spec["enableServiceLinks"], false);
    let pod_sc = &spec["securityContext"];
    assert_eq!(pod_sc["runAsNonRoot"], true);
    assert_eq!(pod_sc["runAsUser"], 1000);
    assert_eq!(pod_sc["seccompProfile"]["type"], "RuntimeDefault");
    let c = &spec["containers"][k.pod.console_container_number];
    let sc = &c["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["runAsUser"], 1000);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(sc["readOnlyRootFilesystem"], false);
    assert!(c["resources"]["limits"]["cpu"].is_string());
    assert!(c["resources"]["limits"]["memory"].is_string());
}

/// `inCluster: true` resolves from what a pod has: the service-account directory and the
/// KUBERNETES_SERVICE_* variables (faked here; validation itself reads no files).
#[test]
fn embedded_connection_resolves_in_a_pod() {
    let raw: AppConfig = parse_yaml("config.yaml", &server_config_text()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "jwt").unwrap();
    std::fs::write(
        dir.path().join("ca.crt"),
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("namespace"), "containerssh\n").unwrap();
    let env = |k: &str| match k {
        "KUBERNETES_SERVICE_HOST" => Some("10.96.0.1".to_string()),
        "KUBERNETES_SERVICE_PORT" => Some("443".to_string()),
        // A stray kubeconfig in the environment must not win over inCluster: true.
        "KUBECONFIG" => Some("/nonexistent/kubeconfig".to_string()),
        _ => None,
    };
    let conn = resolve_with(&raw.kubernetes.connection, &env, dir.path())
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(conn.server, "https://10.96.0.1:443");
    assert!(conn.ca_pem.is_some());
    assert!(conn.token.is_some());
    // Outside a pod it fails clearly instead of falling back to something else.
    let none = |_: &str| None;
    assert!(resolve_with(&raw.kubernetes.connection, &none, dir.path()).is_err());
}
