use super::ssh::server_version_ok;
use super::*;
use crate::config::load::parse_yaml;
use crate::config::model::SeccompMode;
use std::time::Duration;

fn base() -> String {
    "auth:\n  publicKey:\n    method: authorizedKeys\n    authorizedKeys:\n      path: /k/%u\n"
        .into()
}

#[test]
fn minimal_config_is_valid() {
    let cfg = parse_yaml("c", &base()).unwrap();
    let s = validate("c", cfg).unwrap();
    assert_eq!(s.ssh.listen.port(), 2222);
    assert_eq!(s.ssh.kex[0], "mlkem768x25519-sha256");
    assert_eq!(s.ssh.server_version, "SSH-2.0-ContainerSSH");
}

#[test]
fn sandbox_block_is_checked_by_key() {
    let ok = base() + "sandbox:\n  user: 65532\n  supplementaryGroups: [998]\n  seccomp: log\n";
    let s = validate("c", parse_yaml("c", &ok).unwrap()).unwrap();
    assert_eq!(s.sandbox.user, Some(65532));
    assert_eq!(s.sandbox.group, None);
    assert_eq!(s.sandbox.seccomp, SeccompMode::Log);
    let default = validate("c", parse_yaml("c", &base()).unwrap()).unwrap();
    assert_eq!(default.sandbox.seccomp, SeccompMode::Enforce);
    assert!(!default.sandbox.allow_root && default.sandbox.user.is_none());
    for (block, key) in [
        ("  user: 0\n", "sandbox.user"),
        ("  user: 10\n  group: 0\n", "sandbox.group"),
        ("  group: 10\n", "sandbox.group"),
        ("  user: 10\n  allowRoot: true\n", "sandbox.allowRoot"),
        ("  user: -1\n", "sandbox.user"),
        ("  user: alice\n", "sandbox.user"),
        ("  seccomp: strict\n", "sandbox.seccomp"),
        ("  users: 10\n", "sandbox"),
    ] {
        let y = format!("{}sandbox:\n{block}", base());
        let err = parse_yaml("c", &y)
            .map_err(|e| e.to_string())
            .and_then(|c| validate("c", c).map_err(|e| e.to_string()))
            .unwrap_err();
        assert!(err.contains(key), "{block:?}: {err}");
    }
    let many: Vec<String> = (1..=40).map(|g| g.to_string()).collect();
    let y = format!(
        "{}sandbox:\n  supplementaryGroups: [{}]\n",
        base(),
        many.join(", ")
    );
    let err = validate("c", parse_yaml("c", &y).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("sandbox.supplementaryGroups"), "{err}");
}

#[test]
fn no_auth_is_refused() {
    let err = validate("c", AppConfig::default()).unwrap_err().to_string();
    assert!(err.contains("auth"), "{err}");
}

#[test]
fn weak_algorithms_are_refused_by_key() {
    let y = base() + "ssh:\n  kex: [diffie-hellman-group1-sha1]\n";
    let err = validate("c", parse_yaml("c", &y).unwrap())
        .unwrap_err()
        .to_string();
    assert!(err.contains("ssh.kex") && err.contains("weak"), "{err}");
}

#[test]
fn forwarding_is_off_by_default_and_filter_is_refused() {
    let s = validate("c", parse_yaml("c", &base()).unwrap()).unwrap();
    assert!(!s.forwarding.any());
    let y = base()
        + "security:\n  forwarding:\n    forwardingMode: enable\n    x11ForwardingMode: disable\n";
    let s = validate("c", parse_yaml("c", &y).unwrap()).unwrap();
    assert!(s.forwarding.local_tcp && !s.forwarding.x11 && !s.forwarding.remote_tcp);
    let y = base() + "security:\n  forwarding:\n    socketListenMode: filter\n";
    let err = validate("c", parse_yaml("c", &y).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("security.forwarding.socketListenMode"),
        "{err}"
    );
}

#[test]
fn webhook_blocks_are_checked_with_their_keys() {
    let hook = |block: &str| {
        format!("ssh:\n  hostkeys: [/k]\nauth:\n{block}docker:\n  execution:\n    container:\n      image: img\n")
    };
    let ok = hook("  password:\n    method: webhook\n    webhook:\n      url: http://127.0.0.1:8080\n      timeout: 1s\n      authTimeout: 5s\n  authz:\n    method: webhook\n    webhook:\n      url: http://127.0.0.1:8080\n");
    let s = validate("c", parse_yaml("c", &ok).unwrap()).unwrap();
    assert_eq!(s.password_webhook.as_ref().unwrap().timeout.0.as_secs(), 1);
    assert!(s.authz_webhook.is_some() && s.pubkey_webhook.is_none());
    for (block, key) in [
        ("  publicKey:\n    method: webhook\n", "auth.publicKey.webhook.url"),
        ("  password:\n    method: webhook\n    webhook:\n      url: ftp://x\n", "auth.password.webhook.url"),
        ("  password:\n    method: webhook\n    webhook:\n      url: https://x\n      cacert: /does/not/exist\n", "auth.password.webhook.cacert"),
        ("  password:\n    method: webhook\n    webhook:\n      url: http://x\n      curve: [x25519]\n      timeout: 0s\n", "auth.password.webhook"),
        ("  password:\n    method: passwordFile\n    passwordFile: {path: /p}\n  authz:\n    method: ldap\n", "auth.authz.method"),
    ] {
        let err = validate("c", parse_yaml("c", &hook(block)).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{key}: {err}");
    }
}

#[test]
fn security_policy_modes_lists_and_defaults() {
    let p = |sec: &str| {
        let y = base() + "security:\n" + sec;
        validate("c", parse_yaml("c", &y).unwrap()).map(|s| s.policy)
    };
    // Nothing set: everything enabled, no forced command, no session limit.
    let all = p("  maxSessions: -1\n").unwrap();
    assert!(all.shell && all.tty && all.signal.allows("TERM") && all.env.allows("X"));
    assert_eq!(all.max_sessions, None);
    // defaultMode fills what is left empty; each kind reads its own mode (ContainerSSH's
    // signal rule read the shell's).
    let q = p("  defaultMode: disable\n  shell:\n    mode: enable\n  signal:\n    mode: filter\n    allow: [INT]\n").unwrap();
    assert!(q.shell && !q.tty && !q.env.allows("X") && !q.command.allows("id"));
    assert!(q.signal.allows("INT") && !q.signal.allows("TERM"));
    let q = p("  signal:\n    deny: [KILL]\n  tty:\n    mode: filter\n  maxSessions: 3\n").unwrap();
    assert!(!q.signal.allows("KILL") && q.signal.allows("TERM") && !q.tty);
    assert_eq!(q.max_sessions, Some(3));
    assert_eq!(
        p("  forceCommand: /bin/true\n")
            .unwrap()
            .force_command
            .as_deref(),
        Some("/bin/true")
    );
    for (sec, key) in [
        ("  maxSessions: -2\n", "security.maxSessions"),
        ("  command:\n    deny: [id]\n", "security.command.deny"),
        ("  env:\n    mode: sometimes\n", "security.env"),
    ] {
        let y = base() + "security:\n" + sec;
        let err = match parse_yaml::<AppConfig>("c", &y) {
            Ok(cfg) => validate("c", cfg).unwrap_err().to_string(),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(key), "{key}: {err}");
    }
}

#[test]
fn legacy_flat_auth_form_maps_to_the_webhooks() {
    let y = |auth: &str| {
        format!("auth:\n{auth}docker:\n  execution:\n    container:\n      image: img\n")
    };
    let s = validate(
        "c",
        parse_yaml("c", &y("  url: http://127.0.0.1:8080\n  password: true\n  pubkey: true\n  authTimeout: 5s\n")).unwrap(),
    )
    .unwrap();
    let p = s.password_webhook.unwrap();
    assert_eq!(p.url, "http://127.0.0.1:8080");
    assert_eq!(p.auth_timeout.0.as_secs(), 5);
    assert_eq!(s.pubkey_webhook.unwrap().url, "http://127.0.0.1:8080");
    assert_eq!(s.warnings.len(), 1);
    let s = validate(
        "c",
        parse_yaml(
            "c",
            &y("  url: http://h\n  password: true\n  pubkey: false\n"),
        )
        .unwrap(),
    )
    .unwrap();
    assert!(s.password_webhook.is_some() && s.pubkey_webhook.is_none());
    for (auth, key) in [
        ("  url: http://h\n", "auth.url"),
        ("  password: true\n", "auth.url"),
        ("  url: ftp://h\n  password: true\n", "auth.url"),
        ("  url: http://h\n  pubkey: true\n  publicKey:\n    method: authorizedKeys\n    authorizedKeys: {path: /k}\n", "auth.pubkey"),
    ] {
        let err = validate("c", parse_yaml("c", &y(auth)).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains(key), "{auth}: {err}");
    }
    // The block form still reports unknown keys.
    let err = parse_yaml::<AppConfig>("c", &y("  password:\n    methd: webhook\n"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("methd"), "{err}");
}

#[test]
fn server_version_rules() {
    assert!(server_version_ok("SSH-2.0-ContainerSSH"));
    assert!(server_version_ok("SSH-2.0-Foo_1.0 hello world"));
    assert!(!server_version_ok("SSH-2.0-russh-0.65"));
    assert!(!server_version_ok("SSH-1.99-Foo"));
    assert!(!server_version_ok("SSH-2.0-"));
    assert!(!server_version_ok("SSH-2.0-Foo bad\tcomment"));
}

fn kube(extra: &str) -> Result<Settings, ConfigError> {
    let y = base() + "backend: kubernetes\nkubernetes:\n" + extra;
    validate("c", parse_yaml("c", &y)?)
}

#[test]
fn kubernetes_defaults_validate() {
    let s = kube("  timeouts:\n    http: 5s\n").unwrap();
    assert_eq!(s.backend, BackendName::Kubernetes);
    let k = &s.kubernetes;
    assert_eq!(k.connection.host, "kubernetes.default.svc");
    assert_eq!(k.connection.path, "/api");
    assert_eq!((k.connection.qps, k.connection.burst), (5.0, 10));
    assert_eq!(k.pod.metadata["generateName"], "containerssh-");
    assert_eq!(k.pod.metadata["namespace"], "default");
    assert_eq!(
        k.pod.spec["containers"][0]["image"],
        "containerssh/containerssh-guest-image"
    );
    assert_eq!(k.timeouts.pod_start.0, Duration::from_secs(60));
    assert_eq!(k.timeouts.http.0, Duration::from_secs(5));
    assert_eq!(
        k.connection.in_cluster,
        crate::config::model::InClusterMode::Auto
    );
}

#[test]
fn unknown_kubernetes_keys_are_parse_errors_naming_the_path() {
    // Unknown keys in the block itself are parse errors naming the path.
    let err = kube("  pod:\n    agentInitImag: x\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("kubernetes.pod") && err.contains("agentInitImag"),
        "{err}"
    );
    let err = kube("  connection:\n    inCluster: maybe\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("kubernetes.connection.inCluster"), "{err}");
}

#[test]
fn kubernetes_full_block_parses_and_round_trips() {
    let block = "  connection:\n    host: https://k.example:6443\n    cacert: \"-----BEGIN CERTIFICATE-----\\nx\\n-----END CERTIFICATE-----\\n\"\n    bearerTokenFile: /t\n    inCluster: false\n  pod:\n    metadata: {name: lab, namespace: ns}\n    spec:\n      containers:\n      - {name: shell, image: img}\n      - {name: side, image: img2}\n    consoleContainerNumber: 1\n    mode: persistent\n    createMissingPods: true\n    exposeAuthMetadataAsEnv: {GITHUB_LOGIN: GH_USER}\n    exposeAuthMetadataAsLabels: {a: b}\n    exposeAuthMetadataAsAnnotations: {c: d}\n    agentInitImage: registry/agent:1\n  timeouts: {podStart: 2m, podStop: 10s, commandStart: 1s, signal: 1s, window: 1s, http: 3s}\n";
    let s = kube(block).unwrap();
    assert_eq!(s.kubernetes.pod.console_container_number, 1);
    let y = base() + "backend: kubernetes\nkubernetes:\n" + block;
    let cfg: AppConfig = parse_yaml("c", &y).unwrap();
    let dumped = serde_yaml::to_string(&cfg).unwrap();
    assert!(dumped.contains("backend: kubernetes"), "{dumped}");
    let again: AppConfig = parse_yaml("d", &dumped).unwrap();
    assert_eq!(serde_yaml::to_string(&again).unwrap(), dumped);
    assert!(validate("d", again).is_ok());
    // The defaults dump and reload too (inCluster: auto as a string).
    let dumped = serde_yaml::to_string(&AppConfig::default()).unwrap();
    assert!(dumped.contains("inCluster: auto"), "{dumped}");
    let again: AppConfig = parse_yaml("d", &dumped).unwrap();
    assert_eq!(serde_yaml::to_string(&again).unwrap(), dumped);
}

#[test]
fn audit_s3_is_checked_by_key() {
    let audit = |s3: &str| {
        format!(
            "{}audit:\n  enable: true\n  format: binary\n  storage: s3\n  s3:\n    local: /var/lib/audit\n{s3}",
            base()
        )
    };
    let full = "    accessKey: a\n    secretKey: s\n    bucket: b\n";
    let s = validate("c", parse_yaml("c", &audit(full)).unwrap()).unwrap();
    let a = s.audit.unwrap();
    let s3 = a.s3.unwrap();
    assert_eq!(a.directory, std::path::Path::new("/var/lib/audit"));
    assert_eq!(
        (s3.host.as_str(), s3.connect_host.as_str(), s3.port),
        (
            "s3.us-east-1.amazonaws.com",
            "s3.us-east-1.amazonaws.com",
            443
        )
    );
    assert_eq!((s3.part_size, s3.parallel), (5 * 1024 * 1024, 20));
    let with = |extra: &str| {
        let y = audit(&format!("{full}{extra}"));
        validate("c", parse_yaml("c", &y).unwrap())
    };
    let s3 = with("    endpoint: http://[::1]:9000/\n")
        .unwrap()
        .audit
        .unwrap()
        .s3
        .unwrap();
    assert_eq!(
        (s3.host.as_str(), s3.connect_host.as_str(), s3.port),
        ("[::1]:9000", "::1", 9000)
    );
    for (extra, key) in [
        ("    uploadPartSize: 1048576\n", "audit.s3.uploadPartSize"),
        ("    parallelUploads: 0\n", "audit.s3.parallelUploads"),
        ("    endpoint: ftp://x\n", "audit.s3.endpoint"),
        ("    endpoint: http://x/prefix\n", "audit.s3.endpoint"),
    ] {
        let err = with(extra).unwrap_err().to_string();
        assert!(err.contains(key), "{extra:?}: {err}");
    }
    let err = validate(
        "c",
        parse_yaml("c", &audit("    accessKey: a\n    secretKey: s\n")).unwrap(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("audit.s3.bucket"), "{err}");
}
