//! ContainerSSH's config webhook, end to end: the real OpenSSH client logs in to the real
//! server, which (after authentication and authz) POSTs the login to `configserver.url` on a
//! strict test webhook server (tests/support/webhook.rs) and runs the login with the answer's
//! configuration merged onto the file's, on a real Docker engine. Every test ends by
//! asserting that the webhook saw no protocol violation.

use crate::support;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{json, Value};
use support::webhook::{
    assert_connection_fields, assert_no_violations, assert_refused, base64, config_reply, ctx,
    str_field, success, Reply, WebhookServer,
};
use support::{
    free_tcp_port, poll_until, random_hex, run_with_timeout, sha256_hex, test_image, Background,
    TestEnv, TestServer,
};

const CMD_TIMEOUT: Duration = Duration::from_secs(90);
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const POLL_STEP: Duration = Duration::from_millis(100);
/// Bound for a pod to disappear after a disconnect.
const GONE_TIMEOUT: Duration = Duration::from_secs(30);
const PASSWORD: &str = "Correct-Horse 42!";
/// The marker file of [`bob_image`], and the command that prints it (or `no-marker`).
const MARKER: &str = "/etc/containerssh-test-which";
const SHOW_MARKER: &str = "cat /etc/containerssh-test-which 2>/dev/null || echo no-marker";
/// The log message of a login refused because of the webhook's configuration.
const REFUSED: &str = "login refused: the config webhook's configuration cannot be used";

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// `base` (a harness config) with a `configserver` block for `hook`'s `/config`; `extra`
/// holds further lines of that block, 2-space indented.
fn with_configserver(base: &str, hook: &WebhookServer, extra: &str) -> String {
    format!(
        "{base}configserver:\n  url: {}\n  timeout: 2s\n{extra}",
        json!(format!("{}/config", hook.url))
    )
}

/// The harness's connection-mode config (authorized keys and password file) with the
/// config webhook.
fn keys_config(env: &TestEnv, hook: &WebhookServer) -> String {
    with_configserver(&env.config_yaml("connection"), hook, "")
}

/// The harness's connection-mode config with its `auth:` block replaced by a password
/// webhook on `hook` (as in tests/webhook_auth.rs).
fn password_webhook_config(env: &TestEnv, hook: &WebhookServer) -> String {
    let base = env.config_yaml("connection");
    let start = base.find("auth:\n").expect("config_yaml has `auth:`");
    let end = base
        .find("backend: docker\n")
        .expect("config_yaml has `backend: docker`");
    assert!(start < end, "config_yaml layout changed");
    let auth = format!(
        "auth:\n  password:\n    method: webhook\n    webhook:\n      url: {}\n      \
         timeout: 2s\n      authTimeout: 30s\n",
        json!(hook.url)
    );
    format!("{}{auth}{}", &base[..start], &base[end..])
}

// ---------------------------------------------------------------------------
// The second image
// ---------------------------------------------------------------------------

/// The test image plus [`MARKER`] containing `bob-image`, built offline (legacy builder,
/// nothing pulled) once per test process and tagged by content, so an existing build is
/// reused.
fn bob_image() -> String {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let base = test_image();
            let inspect = Command::new("docker")
                .args(["image", "inspect", "--format", "{{.Id}}", &base])
                .stdin(Stdio::null())
                .output()
                .expect("docker image inspect");
            assert!(
                inspect.status.success(),
                "the test image {base} is missing: {}",
                String::from_utf8_lossy(&inspect.stderr)
            );
            let base_id = String::from_utf8_lossy(&inspect.stdout).trim().to_string();
            let dockerfile =
                format!("FROM {base}\nCOPY which {MARKER}\nLABEL containerssh_test_image=\"1\"\n");
            let content = format!("{base_id}\n{dockerfile}bob-image\n");
            let tag = format!(
                "containerssh-test-bob:{}",
                &sha256_hex(content.as_bytes())[..12]
            );
            let exists = Command::new("docker")
                .args(["image", "inspect", &tag])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if exists {
                return tag;
            }
            let ctx = tempfile::Builder::new()
                .prefix("containerssh-bob-image-")
                .tempdir()
                .expect("temp dir for the second image");
            std::fs::write(ctx.path().join("which"), "bob-image\n").expect("write the marker");
            std::fs::write(ctx.path().join("Dockerfile"), dockerfile).expect("write Dockerfile");
            let out = Command::new("docker")
                .env("DOCKER_BUILDKIT", "0")
                .args(["build", "--rm", "--force-rm", "-q", "-t", &tag])
                .arg(ctx.path())
                .stdin(Stdio::null())
                .output()
                .expect("docker build");
            assert!(
                out.status.success(),
                "docker build of {tag} failed:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            tag
        })
        .clone()
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn run(cmd: &mut Command) -> Output {
    run_with_timeout(cmd, None, CMD_TIMEOUT)
}

/// Runs `cmd`, asserts exit 0, returns stdout.
fn run_ok(cmd: &mut Command, server: &TestServer, hook: &WebhookServer) -> String {
    let out = run(cmd);
    assert!(out.status.success(), "{}", ctx(&out, server, hook));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The usernames of the recorded `/config` requests, in order.
fn config_users(hook: &WebhookServer) -> Vec<String> {
    hook.requests("/config")
        .iter()
        .map(|r| str_field(r, "username").to_string())
        .collect()
}

/// Waits (bounded poll on the log) for the refusal line for a config the webhook gave that
/// also contains every one of `needles`; returns it.
fn refusal_line(server: &TestServer, needles: &[&str]) -> Option<String> {
    poll_until(Duration::from_secs(10), POLL_STEP, || {
        server.output().lines().find_map(|l| {
            (l.contains(REFUSED) && needles.iter().all(|n| l.contains(n))).then(|| l.to_string())
        })
    })
}

/// `ssh -S <control> USER@127.0.0.1`; append the command.
fn via(env: &TestEnv, server: &TestServer, control: &Path, user: &str) -> Command {
    let mut cmd = env.ssh_control(server, control);
    cmd.arg(env.destination(user));
    cmd
}

/// Sends `data` through a local TCP port and reads as many bytes back.
fn echo_round_trip(port: u16, data: &[u8]) -> io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(20)))?;
    s.set_write_timeout(Some(Duration::from_secs(20)))?;
    s.write_all(data)?;
    let mut got = vec![0u8; data.len()];
    s.read_exact(&mut got)?;
    Ok(got)
}

// ---------------------------------------------------------------------------
// 1: per-user image
// ---------------------------------------------------------------------------

/// alice gets no `config` (her container runs the file's image), bob gets another image
/// (`image`, then `Image`: Docker API keys match case-insensitively, replacing the file's).
#[test]
fn the_webhook_picks_the_image_per_user() {
    let bob = bob_image();
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    hook.set_for_user("/config", "alice", config_reply(Value::Null));
    hook.set_for_user(
        "/config",
        "bob",
        config_reply(json!({"docker": {"execution": {"container": {"image": bob}}}})),
    );
    let server = env.start(&keys_config(&env, &hook));

    let out = run_ok(env.ssh(&server, "alice").arg(SHOW_MARKER), &server, &hook);
    assert_eq!(out, "no-marker\n", "alice runs the file's image");
    let out = run_ok(env.ssh(&server, "bob").arg(SHOW_MARKER), &server, &hook);
    assert_eq!(out, "bob-image\n", "bob runs the webhook's image");

    hook.set_for_user(
        "/config",
        "bob",
        config_reply(json!({"docker": {"execution": {"container": {"Image": bob}}}})),
    );
    let out = run_ok(env.ssh(&server, "bob").arg(SHOW_MARKER), &server, &hook);
    assert_eq!(
        out,
        "bob-image\n",
        "`Image` replaces the file's `image`\n--- server ---\n{}",
        server.output()
    );
    let out = run_ok(env.ssh(&server, "alice").arg(SHOW_MARKER), &server, &hook);
    assert_eq!(
        out, "no-marker\n",
        "bob's image does not stick to the server"
    );

    assert_eq!(
        config_users(&hook),
        ["alice", "bob", "bob", "alice"],
        "one /config request per login: {}",
        hook.describe()
    );
    assert_no_violations(&hook, &server);
}

// ---------------------------------------------------------------------------
// 2: per-user execution mode
// ---------------------------------------------------------------------------

/// The hostnames of two sessions over one connection (an `ssh -M` master) as `user`.
fn two_hostnames(
    env: &TestEnv,
    server: &TestServer,
    hook: &WebhookServer,
    user: &str,
) -> (String, String) {
    let (mut m, ctl) = env.forwarding_master_as(server, user, user, &[]);
    let first = run_ok(via(env, server, &ctl, user).arg("hostname"), server, hook);
    let second = run_ok(via(env, server, &ctl, user).arg("hostname"), server, hook);
    assert!(
        m.exited().is_none(),
        "the master of {user} died: {}",
        m.stderr()
    );
    m.kill();
    (first.trim().to_string(), second.trim().to_string())
}

/// bob gets session mode (a container per session), alice keeps the file's connection mode
/// (one container for both sessions of her connection).
#[test]
fn the_webhook_picks_the_execution_mode_per_user() {
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    hook.set_for_user(
        "/config",
        "alice",
        config_reply(json!({})).with_empty_maps(),
    );
    hook.set_for_user(
        "/config",
        "bob",
        config_reply(json!({"docker": {"execution": {"mode": "session"}}})),
    );
    let server = env.start(&keys_config(&env, &hook));

    let (b1, b2) = two_hostnames(&env, &server, &hook, "bob");
    assert!(!b1.is_empty() && !b2.is_empty(), "{b1:?} {b2:?}");
    assert_ne!(
        b1,
        b2,
        "bob's two sessions share a container: not session mode\n--- server ---\n{}",
        server.output()
    );
    let (a1, a2) = two_hostnames(&env, &server, &hook, "alice");
    assert!(!a1.is_empty(), "{a1:?}");
    assert_eq!(
        a1,
        a2,
        "alice's two sessions ran in different containers: not connection mode\n--- server ---\n{}",
        server.output()
    );
    assert_eq!(
        config_users(&hook),
        ["bob", "alice"],
        "one /config request per connection, not per session: {}",
        hook.describe()
    );
    assert!(
        env.wait_no_containers(Duration::from_secs(30)),
        "containers left: {:?}",
        env.containers()
    );
    assert_no_violations(&hook, &server);
}

// ---------------------------------------------------------------------------
// 3: the request
// ---------------------------------------------------------------------------

/// One password login (through the password webhook) with `yaml`; returns the /password
/// and /config requests of that login.
fn login_and_requests(
    env: &TestEnv,
    hook: &WebhookServer,
    yaml: &str,
) -> (Value, Value, TestServer) {
    let before = (hook.count("/password"), hook.count("/config"));
    let server = env.start(yaml);
    let out = run(env.ssh_password(&server, "alice", PASSWORD).arg("echo in"));
    assert_eq!(out.stdout, b"in\n", "{}", ctx(&out, &server, hook));
    let password = hook.requests("/password");
    let config = hook.requests("/config");
    assert_eq!(
        (password.len(), config.len()),
        (before.0 + 1, before.1 + 1),
        "one /password and one /config request: {}",
        hook.describe()
    );
    (
        password.last().unwrap().clone(),
        config.last().unwrap().clone(),
        server,
    )
}

/// The /config request is the authz shape (decoded strictly by the test server) with the
/// connection's fields and what the auth webhook said; values marked sensitive are left out
/// unless `transmitSensitiveMetadata: true`.
#[test]
fn the_request_carries_the_login_and_sensitive_values_only_when_allowed() {
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    hook.set_default(
        "/password",
        success("alice.smith")
            .metadata("team", "blue", false)
            .metadata("token", "s3cr3t", true)
            .env("PUBLIC_VAR", "p", false)
            .env("SECRET_VAR", "hidden", true)
            .file("/tmp/secret.txt", b"secret file\n", true),
    );
    hook.set_default("/config", config_reply(Value::Null));

    let yaml = password_webhook_config(&env, &hook);
    let (password, config, server) =
        login_and_requests(&env, &hook, &with_configserver(&yaml, &hook, ""));
    let recorded = hook.recorded("/config");
    let r = recorded.last().unwrap();
    assert!(
        r.header("accept")
            .is_some_and(|a| a.contains("application/json")),
        "Accept: {:?}",
        r.header("accept")
    );
    assert!(
        hook.all_requests()
            .iter()
            .all(|r| r.path == "/password" || r.path == "/config"),
        "POSTed to configserver.url exactly: {}",
        hook.describe()
    );
    assert_connection_fields(&config, "alice");
    for k in ["connectionId", "remoteAddress", "clientVersion"] {
        assert_eq!(
            password.get(k),
            config.get(k),
            "{k}: {password} vs {config}"
        );
    }
    assert_eq!(
        config.get("authenticatedUsername").and_then(Value::as_str),
        Some("alice.smith"),
        "{config}"
    );
    assert_eq!(
        config.pointer("/metadata/team"),
        Some(&json!({"value": "blue", "sensitive": false})),
        "{config}"
    );
    assert_eq!(
        config.pointer("/environment/PUBLIC_VAR/value"),
        Some(&json!("p")),
        "{config}"
    );
    for hidden in [
        "/metadata/token",
        "/environment/SECRET_VAR",
        "/files/~1tmp~1secret.txt",
    ] {
        assert!(
            config.pointer(hidden).is_none(),
            "{hidden} is sensitive and transmitSensitiveMetadata is off: {config}"
        );
    }
    assert!(
        !r.body.contains("s3cr3t") && !r.body.contains("hidden"),
        "{}",
        r.body
    );
    assert_no_violations(&hook, &server);
    drop(server);

    let (_, config, server) = login_and_requests(
        &env,
        &hook,
        &with_configserver(&yaml, &hook, "  transmitSensitiveMetadata: true\n"),
    );
    assert_connection_fields(&config, "alice");
    assert_eq!(
        config.pointer("/metadata/team/value"),
        Some(&json!("blue")),
        "{config}"
    );
    assert_eq!(
        config.pointer("/metadata/token"),
        Some(&json!({"value": "s3cr3t", "sensitive": true})),
        "transmitSensitiveMetadata: true sends sensitive metadata: {config}"
    );
    assert_eq!(
        config.pointer("/environment/SECRET_VAR/value"),
        Some(&json!("hidden")),
        "{config}"
    );
    assert_eq!(
        config.pointer("/files/~1tmp~1secret.txt/value"),
        Some(&json!(base64(b"secret file\n"))),
        "{config}"
    );
    assert_no_violations(&hook, &server);
}

// ---------------------------------------------------------------------------
// 4: unusable configurations
// ---------------------------------------------------------------------------

/// A merged configuration that is invalid, names an unknown key or changes a key that is
/// not per login refuses the login, says why in the log, and starts no container; a good
/// answer afterwards logs in.
#[test]
fn an_unusable_configuration_refuses_the_login() {
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    let server = env.start(&keys_config(&env, &hook));
    for (overlay, needles) in [
        (
            json!({"docker": {"execution": {"mode": "persistent"}}}),
            &["containername"][..],
        ),
        (
            json!({"docker": {"execution": {"imagee": "x"}}}),
            &["imagee"][..],
        ),
        (json!({"ssh": {"banner": "x"}}), &["\"ssh\""][..]),
        (json!({"backend": "podman"}), &["backend", "podman"][..]),
    ] {
        hook.set_default("/config", config_reply(overlay.clone()));
        let before = hook.count("/config");
        let out = run(env.ssh(&server, "alice").arg("echo in"));
        assert_refused(&out, &server, &hook);
        assert_eq!(
            hook.count("/config"),
            before + 1,
            "one /config request for {overlay}: {}",
            hook.describe()
        );
        let line = refusal_line(&server, needles);
        assert!(
            line.is_some(),
            "no log line {REFUSED:?} naming {needles:?} for {overlay}\n{}",
            ctx(&out, &server, &hook)
        );
        assert!(
            env.containers().is_empty(),
            "a container for a refused login ({overlay}): {:?}",
            env.containers()
        );
    }

    hook.set_default(
        "/config",
        config_reply(json!({"docker": {"execution": {"mode": "session"}}})),
    );
    let out = run_ok(env.ssh(&server, "alice").arg("echo in"), &server, &hook);
    assert_eq!(out, "in\n");
    assert!(env.wait_no_containers(Duration::from_secs(30)));
    assert_no_violations(&hook, &server);
}

// ---------------------------------------------------------------------------
// 5: environment and files
// ---------------------------------------------------------------------------

/// The answer's environment and files reach the container, next to the environment its
/// configuration gives the container.
#[test]
fn environment_and_files_from_the_config_webhook_reach_the_container() {
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    let content = b"from the config webhook\n";
    hook.set_default(
        "/config",
        config_reply(
            json!({"docker": {"execution": {"container": {"env": ["FROM_CONTAINER=lab"]}}}}),
        )
        .env("CFG_VAR", "from-config", false)
        .file("/tmp/cfg.txt", content, true)
        .metadata("note", "x", false),
    );
    let server = env.start(&keys_config(&env, &hook));

    let out = run(env
        .ssh(&server, "alice")
        .arg("echo \"$CFG_VAR\"; echo \"$FROM_CONTAINER\"; cat /tmp/cfg.txt"));
    assert!(out.status.success(), "{}", ctx(&out, &server, &hook));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "from-config\nlab\nfrom the config webhook\n",
        "{}",
        ctx(&out, &server, &hook)
    );
    let log = server.output();
    assert!(
        !log.contains("from the config webhook") && !log.contains(&base64(content)),
        "a sensitive file's content reached the log:\n{log}"
    );
    assert_no_violations(&hook, &server);
}

// ---------------------------------------------------------------------------
// 6: a soft failure
// ---------------------------------------------------------------------------

/// The webhook answers `first` once, then bob's image: the login works after exactly one
/// retry, soon, for the same connection, and uses the second answer.
fn retried_once(first: Reply) {
    let bob = bob_image();
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    hook.push("/config", first);
    hook.set_default(
        "/config",
        config_reply(json!({"docker": {"execution": {"container": {"image": bob}}}})),
    );
    let server = env.start(&keys_config(&env, &hook));

    let out = run(env.ssh(&server, "alice").arg(SHOW_MARKER));
    assert_eq!(out.stdout, b"bob-image\n", "{}", ctx(&out, &server, &hook));
    let recorded = hook.recorded("/config");
    assert_eq!(recorded.len(), 2, "{}", hook.describe());
    let gap = recorded[1].at - recorded[0].at;
    assert!(
        gap < Duration::from_secs(6),
        "the retry came {gap:?} after the failure"
    );
    let id = |i: usize| str_field(recorded[i].json.as_ref().unwrap(), "connectionId").to_string();
    assert_eq!(id(0), id(1), "a retry is for the same connection");
    assert!(
        server
            .output()
            .lines()
            .any(|l| l.contains("configserver") && l.contains("fail")),
        "the failed attempt is logged\n--- server ---\n{}",
        server.output()
    );
    assert_no_violations(&hook, &server);
}

#[test]
fn a_500_is_retried_and_the_next_answer_used() {
    retried_once(Reply::new(500, r#"{"error":"try again"}"#));
}

#[test]
fn an_undecodable_answer_is_retried_and_the_next_answer_used() {
    retried_once(Reply::new(200, "this is {not json"));
}

// ---------------------------------------------------------------------------
// 7: per-user security
// ---------------------------------------------------------------------------

/// `ssh -L` as `user` to an echo server inside the container; true when data makes the
/// round trip, false when the forward is refused (the connection is closed at once and the
/// client reports "administratively prohibited").
fn local_forward_works(
    env: &TestEnv,
    server: &TestServer,
    hook: &WebhookServer,
    user: &str,
) -> bool {
    let port = free_tcp_port();
    let (mut m, ctl) = env.forwarding_master_as(
        server,
        user,
        &format!("fwd-{user}"),
        &["-L", &format!("{port}:127.0.0.1:9000")],
    );
    let _echo = Background::spawn(
        via(env, server, &ctl, user).arg("socat -t 30 TCP-LISTEN:9000,fork,reuseaddr EXEC:cat"),
        env.path(),
        &format!("echo-{user}"),
    );
    // The echo server answers inside the container, so a failure below is the forward's.
    let ready = poll_until(READY_TIMEOUT, POLL_STEP, || {
        let out = run_with_timeout(
            via(env, server, &ctl, user).arg("echo in | socat -t 5 - TCP:127.0.0.1:9000"),
            None,
            CMD_TIMEOUT,
        );
        (out.stdout == b"in\n").then_some(())
    });
    assert!(
        ready.is_some(),
        "{user}: the in-container echo server never answered: {}\n{}",
        server.output(),
        hook.describe()
    );
    let probe = format!("probe-{}\n", random_hex(8));
    let result = match echo_round_trip(port, probe.as_bytes()) {
        Ok(got) => {
            assert_eq!(got, probe.as_bytes(), "{user}: wrong echo");
            true
        }
        Err(e) => {
            assert!(
                matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::BrokenPipe
                ),
                "{user}: the forward neither worked nor was closed: {e}\n--- master ---\n{}",
                m.stderr()
            );
            let said = poll_until(READY_TIMEOUT, POLL_STEP, || {
                let t = m.stderr();
                t.contains("open failed").then_some(t)
            })
            .unwrap_or_else(|| m.stderr());
            assert!(
                said.contains("administratively prohibited"),
                "{user}: the refusal must be 'administratively prohibited':\n{said}\n\
                 --- server ---\n{}",
                server.output()
            );
            false
        }
    };
    assert!(m.exited().is_none(), "{user}: master died: {}", m.stderr());
    m.kill();
    result
}

/// The file disables TCP forwarding; the webhook enables it for bob only.
#[test]
fn the_webhook_enables_forwarding_per_user() {
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    hook.set_for_user("/config", "alice", config_reply(Value::Null));
    hook.set_for_user(
        "/config",
        "bob",
        config_reply(json!({"security": {"forwarding": {"forwardingMode": "enable"}}})),
    );
    let yaml = format!(
        "{}security:\n  forwarding:\n    forwardingMode: disable\n",
        keys_config(&env, &hook)
    );
    let server = env.start(&yaml);

    assert!(
        local_forward_works(&env, &server, &hook, "bob"),
        "bob's -L was refused\n--- server ---\n{}",
        server.output()
    );
    assert!(
        !local_forward_works(&env, &server, &hook, "alice"),
        "alice's -L worked although the file disables forwarding"
    );
    assert_eq!(config_users(&hook), ["bob", "alice"], "{}", hook.describe());
    assert_no_violations(&hook, &server);
}

// ---------------------------------------------------------------------------
// The test webhook's /config support itself (no SSH server involved)
// ---------------------------------------------------------------------------

/// `curl` POSTing `body` as JSON to `url`; returns (HTTP status, body).
fn curl(url: &str, body: &str) -> (u16, String) {
    let out = run(Command::new("curl")
        .args(["-sS", "--max-time", "10", "-X", "POST", "-H"])
        .arg("Content-Type: application/json")
        .args(["--data-binary", body, "-w", "\n%{http_code}"])
        .arg(url));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// /config requests are decoded strictly in the authz shape, and answers are chosen by the
/// request's username before the default.
#[test]
fn the_test_webhook_decodes_config_requests_strictly() {
    let hook = WebhookServer::http();
    let url = format!("{}/config", hook.url);
    hook.set_default("/config", config_reply(json!({})).with_empty_maps());
    hook.set_for_user(
        "/config",
        "bob",
        config_reply(json!({"log": {"level": "info"}})).env("E", "v", true),
    );
    let good = r#"{"username":"alice","remoteAddress":"127.0.0.1:5000","connectionId":"0123456789abcdef0123456789abcdef","clientVersion":"SSH-2.0-OpenSSH_9.2","metadata":{"m":{"value":"v","sensitive":false}}}"#;
    let (code, body) = curl(&url, good);
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"config": {}, "metadata": {}, "environment": {}, "files": {}})
    );
    let (code, body) = curl(&url, &good.replace("\"alice\"", "\"bob\""));
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap(),
        json!({"config": {"log": {"level": "info"}},
               "environment": {"E": {"value": "v", "sensitive": true}}})
    );
    assert!(hook.errors().is_empty(), "{}", hook.describe());

    for bad in [
        good.replace("\"username\"", "\"sessionId\":\"x\",\"username\""),
        good.replace("\"clientVersion\":\"SSH-2.0-OpenSSH_9.2\",", ""),
        good.replace("127.0.0.1:5000", "127.0.0.1"),
        good.replace("\"sensitive\":false", "\"sensitive\":false,\"extra\":1"),
    ] {
        let before = hook.errors().len();
        let (code, answer) = curl(&url, &bad);
        assert_eq!(code, 400, "{bad}: {answer}");
        assert_eq!(hook.errors().len(), before + 1, "{}", hook.describe());
    }
    assert_eq!(hook.requests("/config").len(), 2);
}

// ---------------------------------------------------------------------------
// Per-user backend: one user on Docker, another on Kubernetes
// ---------------------------------------------------------------------------

/// The config webhook moves bob to the Kubernetes backend (the Docker-backed fake API server,
/// connection block and pod spec all in the answer); alice stays on the file's Docker
/// backend. Bob's session runs in a pod (its hostname is the pod's name) that is deleted
/// when he disconnects.
#[test]
fn the_webhook_moves_a_user_to_kubernetes() {
    let fake = support::KubeFake::start();
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    let ca = std::fs::read_to_string(&fake.ca_cert).expect("the fake's CA");
    let kube = json!({
        "backend": "kubernetes",
        "kubernetes": {
            "connection": {"host": fake.url, "cacert": ca, "bearerToken": fake.token},
            "pod": {
                "metadata": {"namespace": "default", "labels": {"containerssh_test": "1"}},
                "spec": {"containers": [{"name": "shell", "image": test_image()}]},
                "shellCommand": ["/bin/sh"],
                "agentInitImage": support::agent_init_image()
            }
        }
    });
    hook.set_for_user("/config", "alice", config_reply(Value::Null));
    hook.set_for_user("/config", "bob", config_reply(kube));
    let server = env.start(&keys_config(&env, &hook));

    let bob = run_ok(env.ssh(&server, "bob").arg("hostname"), &server, &hook);
    assert!(
        bob.starts_with("containerssh-"),
        "bob's hostname {bob:?} is not a pod's generated name\n--- fake ---\n{}",
        fake.log()
    );
    assert!(
        fake.log().contains(&format!("exec default/{}", bob.trim())),
        "the fake never ran bob's exec: {}",
        fake.log()
    );
    let alice = run_ok(env.ssh(&server, "alice").arg("hostname"), &server, &hook);
    assert!(
        alice.trim().len() == 12 && alice.trim().chars().all(|c| c.is_ascii_hexdigit()),
        "alice's hostname {alice:?} is not a Docker container's"
    );
    // Bob's pod goes when he disconnects.
    let gone = poll_until(GONE_TIMEOUT, POLL_STEP, || {
        fake.docker_containers(Some(bob.trim()))
            .is_empty()
            .then_some(())
    });
    assert!(
        gone.is_some(),
        "bob's pod is still there: {}",
        server.output()
    );
    assert_no_violations(&hook, &server);
}

// ---------------------------------------------------------------------------
// Per-user log level
// ---------------------------------------------------------------------------

/// The file logs at `info`; the webhook gives bob `log.level: debug`. Bob's connection's
/// debug events are logged (the program's end, his container's start), alice's are not.
#[test]
fn the_webhook_raises_the_log_level_of_one_login() {
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    hook.set_for_user("/config", "alice", config_reply(Value::Null));
    hook.set_for_user(
        "/config",
        "bob",
        config_reply(json!({"log": {"level": "debug"}})),
    );
    let yaml =
        keys_config(&env, &hook).replacen("log:\n  level: debug\n", "log:\n  level: info\n", 1);
    assert!(yaml.contains("level: info"), "test setup");
    let server = env.start(&yaml);
    for user in ["alice", "bob"] {
        let out = run_ok(env.ssh(&server, user).arg("echo hi"), &server, &hook);
        assert_eq!(out, "hi\n");
    }
    let ids: Vec<String> = hook
        .requests("/config")
        .iter()
        .map(|r| str_field(r, "connectionId").to_string())
        .collect();
    assert_eq!(ids.len(), 2, "{}", hook.describe());
    let debug_lines = |id: &str| -> Vec<String> {
        server
            .output()
            .lines()
            .filter(|l| l.contains("DEBUG") && l.contains(id))
            .map(str::to_string)
            .collect()
    };
    // Bob's "program ended" (DEBUG) is written once his session is over.
    let bob = poll_until(Duration::from_secs(10), POLL_STEP, || {
        let lines = debug_lines(&ids[1]);
        lines
            .iter()
            .any(|l| l.contains("program ended"))
            .then_some(lines)
    });
    assert!(
        bob.is_some(),
        "bob's connection logged no debug events:\n{}",
        server.output()
    );
    assert!(
        debug_lines(&ids[0]).is_empty(),
        "alice's connection logged debug events at the file's info level:\n{}",
        server.output()
    );
    assert_no_violations(&hook, &server);
}

// ---------------------------------------------------------------------------
// Cleanup of a login's own engine
// ---------------------------------------------------------------------------

/// A login the webhook sends to another engine than the file's leaves a container there when
/// the server is killed; the next start reaps it (the janitor's ledger), as it reaps the
/// file's. Here the file's engine does not even exist, so only the ledger can find it.
#[test]
fn a_login_engine_is_reaped_at_the_next_start() {
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    hook.set_for_user(
        "/config",
        "alice",
        config_reply(json!({"docker": {"connection": {"host": "unix:///var/run/docker.sock"}}})),
    );
    let base = env.config_yaml("connection").replace(
        "docker:\n",
        &format!(
            "docker:\n  connection:\n    host: unix://{}/no-engine.sock\n",
            env.path().display()
        ),
    );
    let yaml = with_configserver(&base, &hook, "");
    let mut server = env.start(&yaml);
    let mut client = env.hold_session(&server, "echo ready; sleep 300", || {
        format!("{}\n{}", server.output(), hook.describe())
    });
    assert_eq!(env.containers().len(), 1, "{}", server.output());
    let ledger = std::fs::read_to_string(env.path().join("state/backends.json")).unwrap();
    assert!(ledger.contains("/var/run/docker.sock"), "{ledger}");
    assert!(
        !ledger.contains("no-engine.sock"),
        "the file's own engine is not recorded: {ledger}"
    );

    server.kill9();
    let _ = client.kill();
    let _ = client.wait();
    assert_eq!(env.containers().len(), 1, "the killed server leaves it");

    let restarted = env.start(&yaml);
    assert!(
        env.containers().is_empty(),
        "the login's engine was not reaped at start: {:?}\n{}",
        env.containers(),
        restarted.output()
    );
    assert!(restarted.output().contains("left behind"));
    let ledger = std::fs::read_to_string(env.path().join("state/backends.json")).unwrap();
    assert_eq!(ledger, r#"{"records":[]}"#, "reaped places are forgotten");
    assert_no_violations(&hook, &restarted);
}
