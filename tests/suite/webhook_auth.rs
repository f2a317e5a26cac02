//! ContainerSSH-compatible authentication webhooks, end to end: the real OpenSSH client logs
//! in to the real server, which asks a strict test webhook server (tests/support/webhook.rs)
//! over HTTP or HTTPS (`/password`, `/pubkey`, `/authz`), and a real Docker engine runs the
//! container. Every test ends by asserting that the webhook saw no protocol violation.

use crate::support;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::webhook::{
    assert_connection_fields, assert_no_violations, assert_refused, base64, ctx, failure, read_pem,
    str_field, success, Pki, Reply, WebhookServer,
};
use support::{poll_until, run_with_timeout, Background, TestEnv, TestServer};

const CMD_TIMEOUT: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// One `auth.<kind>` block with `method: webhook`. `extra` holds further lines of the
/// `webhook:` mapping, 6-space indented.
struct Hook<'a> {
    /// `password`, `publicKey` or `authz`.
    kind: &'a str,
    url: &'a str,
    timeout: &'a str,
    auth_timeout: &'a str,
    extra: String,
}

impl<'a> Hook<'a> {
    fn new(kind: &'a str, url: &'a str) -> Self {
        Hook {
            kind,
            url,
            timeout: "2s",
            auth_timeout: "60s",
            extra: String::new(),
        }
    }

    fn timeouts(mut self, timeout: &'a str, auth_timeout: &'a str) -> Self {
        self.timeout = timeout;
        self.auth_timeout = auth_timeout;
        self
    }

    /// `key: "value"` (a file path, say).
    fn string(mut self, key: &str, value: &str) -> Self {
        self.extra
            .push_str(&format!("      {key}: {}\n", serde_json::json!(value)));
        self
    }

    /// `key: |` followed by the PEM text, as an inline value.
    fn pem(mut self, key: &str, pem: &str) -> Self {
        self.extra.push_str(&format!("      {key}: |\n"));
        for line in pem.lines() {
            self.extra.push_str(&format!("        {line}\n"));
        }
        self
    }

    fn yaml(&self) -> String {
        format!(
            "  {kind}:\n    method: webhook\n    webhook:\n      url: {url}\n      \
             timeout: {timeout}\n      authTimeout: {auth}\n      allowRedirects: false\n{extra}",
            kind = self.kind,
            url = serde_json::json!(self.url),
            timeout = self.timeout,
            auth = self.auth_timeout,
            extra = self.extra,
        )
    }
}

/// The harness's connection-mode config with its whole `auth:` block replaced by `hooks`.
fn config(env: &TestEnv, hooks: &[Hook]) -> String {
    let base = env.config_yaml("connection");
    let start = base.find("auth:\n").expect("config_yaml has `auth:`");
    let end = base
        .find("backend: docker\n")
        .expect("config_yaml has `backend: docker`");
    assert!(start < end, "config_yaml layout changed");
    let mut auth = String::from("auth:\n");
    for h in hooks {
        auth.push_str(&h.yaml());
    }
    format!("{}{auth}{}", &base[..start], &base[end..])
}

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn run(cmd: &mut Command) -> Output {
    run_with_timeout(cmd, None, CMD_TIMEOUT)
}

/// The client's public key in authorized_keys form without its comment.
fn client_key_line(env: &TestEnv) -> String {
    let text = std::fs::read_to_string(env.client_key.with_extension("pub")).unwrap();
    let mut parts = text.split_whitespace();
    format!("{} {}", parts.next().unwrap(), parts.next().unwrap())
}

/// Waits (bounded poll on the log) for a line about the webhook (it says `webhook` or the
/// webhook's address) that contains one of `needles` (case-insensitive); returns it.
fn log_line_about_webhook(
    server: &TestServer,
    hook: &WebhookServer,
    needles: &[&str],
) -> Option<String> {
    let authority = hook
        .url
        .split("://")
        .nth(1)
        .unwrap_or(&hook.url)
        .to_string();
    poll_until(Duration::from_secs(10), Duration::from_millis(100), || {
        server.output().lines().find_map(|l| {
            let low = l.to_ascii_lowercase();
            let about = low.contains("webhook") || l.contains(&authority);
            (about
                && needles
                    .iter()
                    .any(|n| low.contains(&n.to_ascii_lowercase())))
            .then(|| l.to_string())
        })
    })
}

const PASSWORD: &str = "Correct-Horse 42!";

// ---------------------------------------------------------------------------
// 1, 2: password
// ---------------------------------------------------------------------------

#[test]
fn password_login_through_the_webhook() {
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    hook.set_default("/password", success("alice"));
    let server = env.start(&config(&env, &[Hook::new("password", &hook.url)]));

    let out = run(env.ssh_password(&server, "alice", PASSWORD).arg("echo hi"));
    assert!(out.status.success(), "{}", ctx(&out, &server, &hook));
    assert_eq!(out.stdout, b"hi\n", "{}", ctx(&out, &server, &hook));

    let recorded = hook.recorded("/password");
    assert_eq!(recorded.len(), 1, "{}", hook.describe());
    let r = &recorded[0];
    assert!(
        r.header("accept")
            .is_some_and(|a| a.contains("application/json")),
        "Accept: {:?}",
        r.header("accept")
    );
    let req = r.json.as_ref().expect("a valid /password request");
    assert_connection_fields(req, "alice");
    assert_eq!(
        str_field(req, "passwordBase64"),
        base64(PASSWORD.as_bytes()),
        "{req}"
    );

    let log = server.output();
    assert!(
        !log.contains(PASSWORD),
        "the password reached the log:\n{log}"
    );
    assert!(
        !log.contains(&base64(PASSWORD.as_bytes())),
        "the base64 password reached the log:\n{log}"
    );
    assert_eq!(hook.count("/pubkey") + hook.count("/authz"), 0);
    assert_no_violations(&hook, &server);
}

/// With `authorizedKeys` next to a password webhook both methods are offered: the OpenSSH
/// client was never offered `password` when only the key file and the password file counted.
#[test]
fn authorized_keys_next_to_a_password_webhook_offers_both() {
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    hook.set_default("/password", success("alice"));
    let keys = format!(
        "  publicKey:\n    method: authorizedKeys\n    authorizedKeys:\n      path: {}\n",
        serde_json::json!(format!("{}/keys/%u", env.path().display()))
    );
    let yaml = config(&env, &[Hook::new("password", &hook.url)]).replacen(
        "auth:\n",
        &format!("auth:\n{keys}"),
        1,
    );
    let server = env.start(&yaml);
    let out = run(env.ssh_password(&server, "alice", PASSWORD).arg("echo pw"));
    assert_eq!(out.stdout, b"pw\n", "{}", ctx(&out, &server, &hook));
    assert_eq!(hook.count("/password"), 1, "{}", hook.describe());
    let out = run(env.ssh(&server, "bob").arg("echo key"));
    assert_eq!(out.stdout, b"key\n", "{}", ctx(&out, &server, &hook));
    assert_no_violations(&hook, &server);
}

#[test]
fn a_password_the_webhook_denies_is_refused() {
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    hook.set_default("/password", failure());
    let server = env.start(&config(&env, &[Hook::new("password", &hook.url)]));

    let out = run(env
        .ssh_password(&server, "alice", "wrong password")
        .arg("echo in"));
    assert_refused(&out, &server, &hook);
    let reqs = hook.requests("/password");
    assert_eq!(
        reqs.len(),
        1,
        "a denial is final, not retried: {}",
        hook.describe()
    );
    assert_eq!(
        str_field(&reqs[0], "passwordBase64"),
        base64(b"wrong password")
    );
    assert!(
        env.containers().is_empty(),
        "a container for a refused login"
    );
    assert_no_violations(&hook, &server);
}

// ---------------------------------------------------------------------------
// 3: public key
// ---------------------------------------------------------------------------

#[test]
fn public_key_login_through_the_webhook() {
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    hook.set_default("/pubkey", success("alice"));
    let server = env.start(&config(&env, &[Hook::new("publicKey", &hook.url)]));
    let key = client_key_line(&env);

    let out = run(env.ssh(&server, "alice").arg("echo hi"));
    assert_eq!(out.stdout, b"hi\n", "{}", ctx(&out, &server, &hook));
    let reqs = hook.requests("/pubkey");
    assert!(!reqs.is_empty(), "{}", hook.describe());
    for req in &reqs {
        assert_connection_fields(req, "alice");
        assert_eq!(str_field(req, "publicKey"), key, "{req}");
    }
    // One connection: the same connection ID in each call.
    let ids: Vec<&str> = reqs.iter().map(|r| str_field(r, "connectionId")).collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]), "{ids:?}");

    hook.set_default("/pubkey", failure());
    let before = hook.count("/pubkey");
    let out = run(env.ssh(&server, "alice").arg("echo hi"));
    assert_refused(&out, &server, &hook);
    assert!(hook.count("/pubkey") > before, "{}", hook.describe());
    assert_eq!(hook.count("/password") + hook.count("/authz"), 0);
    assert_no_violations(&hook, &server);
}

// ---------------------------------------------------------------------------
// 4: authz
// ---------------------------------------------------------------------------

#[test]
fn authz_sees_the_login_and_can_refuse_it() {
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    hook.set_default(
        "/password",
        success("alice.smith").metadata("team", "blue", false),
    );
    // The first login is authorized, every later one is not.
    hook.push("/authz", success("alice.smith"));
    hook.set_default("/authz", failure());
    let server = env.start(&config(
        &env,
        &[
            Hook::new("password", &hook.url),
            Hook::new("authz", &hook.url),
        ],
    ));

    let out = run(env.ssh_password(&server, "alice", PASSWORD).arg("echo in"));
    assert_eq!(out.stdout, b"in\n", "{}", ctx(&out, &server, &hook));
    assert!(env.wait_no_containers(Duration::from_secs(30)));

    let out = run(env.ssh_password(&server, "alice", PASSWORD).arg("echo in"));
    assert_refused(&out, &server, &hook);
    assert!(
        env.wait_no_containers(Duration::from_secs(30)),
        "a container left for a refused login"
    );

    let passwords = hook.requests("/password");
    let authz = hook.requests("/authz");
    assert_eq!(passwords.len(), 2, "{}", hook.describe());
    assert_eq!(authz.len(), 2, "{}", hook.describe());
    for (p, a) in passwords.iter().zip(&authz) {
        assert_connection_fields(a, "alice");
        assert_eq!(
            a.get("authenticatedUsername").and_then(Value::as_str),
            Some("alice.smith"),
            "{a}"
        );
        assert_eq!(
            a.pointer("/metadata/team/value").and_then(Value::as_str),
            Some("blue"),
            "the auth response's metadata is passed on: {a}"
        );
        for k in ["connectionId", "remoteAddress", "clientVersion"] {
            assert_eq!(p.get(k), a.get(k), "{k}: {p} vs {a}");
        }
    }
    assert_no_violations(&hook, &server);
}

// ---------------------------------------------------------------------------
// 5, 6, 7: soft failures, retries, timeouts
// ---------------------------------------------------------------------------

/// The webhook answers `first` once, then success: the login works after exactly one
/// retry, for the same connection, with no long fixed pause in between.
fn retried_once(first: Reply) {
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    hook.push("/password", first);
    hook.set_default("/password", success("alice"));
    let server = env.start(&config(&env, &[Hook::new("password", &hook.url)]));

    let out = run(env.ssh_password(&server, "alice", PASSWORD).arg("echo hi"));
    assert_eq!(out.stdout, b"hi\n", "{}", ctx(&out, &server, &hook));
    let recorded = hook.recorded("/password");
    assert_eq!(recorded.len(), 2, "{}", hook.describe());
    let gap = recorded[1].at - recorded[0].at;
    assert!(
        gap < Duration::from_secs(6),
        "the retry came {gap:?} after the failure"
    );
    let id = |i: usize| str_field(recorded[i].json.as_ref().unwrap(), "connectionId").to_string();
    assert_eq!(id(0), id(1), "a retry is for the same connection");
    assert_no_violations(&hook, &server);
}

#[test]
fn a_500_is_retried() {
    retried_once(Reply::new(500, r#"{"error":"try again"}"#));
}

#[test]
fn an_undecodable_answer_is_retried() {
    retried_once(Reply::new(200, "this is {not json"));
}

/// The webhook always answers `reply`; with `authTimeout: 3s` the login is refused within a
/// few seconds, after retrying, and the log says why (a line about the webhook with one of
/// `why`).
fn failing_forever(reply: Reply, why: &[&str]) {
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    hook.set_default("/password", reply);
    let server = env.start(&config(
        &env,
        &[Hook::new("password", &hook.url).timeouts("1s", "3s")],
    ));

    let started = Instant::now();
    let out = run(env.ssh_password(&server, "alice", PASSWORD).arg("echo hi"));
    let took = started.elapsed();
    assert_eq!(
        out.status.code(),
        Some(255),
        "{}",
        ctx(&out, &server, &hook)
    );
    assert!(out.stdout.is_empty(), "{}", ctx(&out, &server, &hook));
    assert!(
        took < Duration::from_secs(8),
        "refused only after {took:?}: {}",
        ctx(&out, &server, &hook)
    );
    // Retried for the whole authTimeout, not given up early.
    assert!(
        took >= Duration::from_millis(2800),
        "refused after {took:?}, before authTimeout (3 s) ran out: {}",
        ctx(&out, &server, &hook)
    );
    assert!(
        hook.count("/password") >= 2,
        "a soft failure is retried within authTimeout: {}",
        ctx(&out, &server, &hook)
    );
    assert!(
        log_line_about_webhook(&server, &hook, why).is_some(),
        "no log line about the webhook saying any of {why:?}:\n{}",
        server.output()
    );
    assert!(env.containers().is_empty());
    assert_no_violations(&hook, &server);
}

#[test]
fn a_webhook_answering_500_forever_refuses_within_auth_timeout() {
    failing_forever(Reply::new(500, r#"{"error":"down"}"#), &["500"]);
}

#[test]
fn a_webhook_answering_garbage_forever_refuses_within_auth_timeout() {
    failing_forever(
        Reply::new(200, "<html>not json</html>"),
        &["decode", "json", "parse", "invalid", "expected"],
    );
}

#[test]
fn a_slow_webhook_times_out_and_a_fast_one_does_not() {
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    hook.set_default(
        "/password",
        success("alice").reply().delay(Duration::from_secs(3)),
    );
    let server = env.start(&config(
        &env,
        &[Hook::new("password", &hook.url).timeouts("1s", "2s")],
    ));

    let started = Instant::now();
    let out = run(env.ssh_password(&server, "alice", PASSWORD).arg("echo hi"));
    let took = started.elapsed();
    assert_eq!(
        out.status.code(),
        Some(255),
        "{}",
        ctx(&out, &server, &hook)
    );
    assert!(out.stdout.is_empty(), "{}", ctx(&out, &server, &hook));
    assert!(
        took < Duration::from_secs(8),
        "refused only after {took:?}: {}",
        ctx(&out, &server, &hook)
    );
    assert!(hook.count("/password") >= 1, "{}", hook.describe());

    hook.set_default(
        "/password",
        success("alice").reply().delay(Duration::from_millis(200)),
    );
    let out = run(env.ssh_password(&server, "alice", PASSWORD).arg("echo hi"));
    assert_eq!(out.stdout, b"hi\n", "{}", ctx(&out, &server, &hook));
    assert_no_violations(&hook, &server);
}

// ---------------------------------------------------------------------------
// 8: metadata
// ---------------------------------------------------------------------------

#[test]
fn environment_and_files_from_the_webhook_reach_the_container() {
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    let content = b"from webhook\n";
    hook.set_default(
        "/password",
        success("alice")
            .env("GREETING", "hi", false)
            .file("/tmp/webhook.txt", content, true),
    );
    let server = env.start(&config(&env, &[Hook::new("password", &hook.url)]));

    let out = run(env
        .ssh_password(&server, "alice", PASSWORD)
        .arg("echo $GREETING; cat /tmp/webhook.txt"));
    assert!(out.status.success(), "{}", ctx(&out, &server, &hook));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hi\nfrom webhook\n",
        "{}",
        ctx(&out, &server, &hook)
    );
    let log = server.output();
    assert!(
        !log.contains("from webhook") && !log.contains(&base64(content)),
        "a sensitive file's content reached the log:\n{log}"
    );
    assert_no_violations(&hook, &server);
}

/// ContainerSSH 0.4's flat form (`auth.url`, `auth.password: true`, `auth.pubkey: true`) still
/// works: it is mapped to the password and public-key webhooks, with a deprecation warning.
#[test]
fn the_legacy_flat_auth_form_still_works() {
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    hook.set_default("/password", success("alice"));
    let base = env.config_yaml("connection");
    let start = base.find("auth:\n").unwrap();
    let end = base.find("backend: docker\n").unwrap();
    let auth = format!(
        "auth:\n  url: {}\n  password: true\n  pubkey: true\n  authTimeout: 5s\n",
        hook.url
    );
    let server = env.start(&format!("{}{auth}{}", &base[..start], &base[end..]));
    assert!(server.wait_for_output("deprecated configuration", Duration::from_secs(10)));
    let out = run(env
        .ssh_password(&server, "alice", PASSWORD)
        .args(["-o", "PubkeyAuthentication=no"])
        .arg("echo legacy"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "legacy\n",
        "{}",
        ctx(&out, &server, &hook)
    );
    assert_eq!(hook.count("/password"), 1, "{}", ctx(&out, &server, &hook));
    assert_no_violations(&hook, &server);
}

/// `docker.execution.exposeAuthMetadataAsEnv: true` (ContainerSSH's bool): the webhook's
/// metadata values become variables of the same name; off (the default), they do not.
#[test]
fn docker_exposes_auth_metadata_as_env_when_asked() {
    for expose in [true, false] {
        let env = TestEnv::new();
        let hook = WebhookServer::http();
        hook.set_default(
            "/password",
            success("alice").metadata("GITHUB_LOGIN", "octo", false),
        );
        let mut yaml = config(&env, &[Hook::new("password", &hook.url)]);
        if expose {
            yaml = yaml.replacen(
                "docker:\n  execution:\n",
                "docker:\n  execution:\n    exposeAuthMetadataAsEnv: true\n",
                1,
            );
            assert!(yaml.contains("exposeAuthMetadataAsEnv"), "test setup");
        }
        let server = env.start(&yaml);
        let out = run(env
            .ssh_password(&server, "alice", PASSWORD)
            .arg("echo \"[$GITHUB_LOGIN]\""));
        let want = if expose { "[octo]\n" } else { "[]\n" };
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            want,
            "expose={expose}: {}",
            ctx(&out, &server, &hook)
        );
        assert_no_violations(&hook, &server);
    }
}

// ---------------------------------------------------------------------------
// 9: HTTPS
// ---------------------------------------------------------------------------

#[test]
fn https_webhook_with_the_right_ca_only() {
    let env = TestEnv::new();
    let pki = Pki::generate(&env.path().join("pki"));
    let hook = WebhookServer::https(&pki, false);
    hook.set_default("/password", success("alice"));

    // cacert as a file path.
    let server = env.start(&config(
        &env,
        &[Hook::new("password", &hook.url).string("cacert", &pki.ca_cert.display().to_string())],
    ));
    let out = run(env.ssh_password(&server, "alice", PASSWORD).arg("echo hi"));
    assert_eq!(out.stdout, b"hi\n", "{}", ctx(&out, &server, &hook));
    assert_eq!(hook.count("/password"), 1, "{}", hook.describe());
    assert_no_violations(&hook, &server);
    drop(server);

    // A CA that did not sign the webhook's certificate (inline PEM).
    let server = env.start(&config(
        &env,
        &[Hook::new("password", &hook.url)
            .timeouts("1s", "3s")
            .pem("cacert", &read_pem(&pki.other_ca_cert))],
    ));
    let out = run(env.ssh_password(&server, "alice", PASSWORD).arg("echo hi"));
    assert_eq!(
        out.status.code(),
        Some(255),
        "{}",
        ctx(&out, &server, &hook)
    );
    assert!(out.stdout.is_empty(), "{}", ctx(&out, &server, &hook));
    assert_eq!(
        hook.count("/password"),
        1,
        "no request over an untrusted connection: {}",
        hook.describe()
    );
    assert!(
        hook.wait_for_tls_error(Duration::from_secs(10)),
        "the client never tried the handshake: {}",
        ctx(&out, &server, &hook)
    );
    assert_no_violations(&hook, &server);
}

#[test]
fn https_webhook_requiring_a_client_certificate() {
    let env = TestEnv::new();
    let pki = Pki::generate(&env.path().join("pki"));
    let hook = WebhookServer::https(&pki, true);
    hook.set_default("/password", success("alice"));

    // cacert, cert and key as inline PEM.
    let server = env.start(&config(
        &env,
        &[Hook::new("password", &hook.url)
            .pem("cacert", &read_pem(&pki.ca_cert))
            .pem("cert", &read_pem(&pki.client_cert))
            .pem("key", &read_pem(&pki.client_key))],
    ));
    let out = run(env.ssh_password(&server, "alice", PASSWORD).arg("echo hi"));
    assert_eq!(out.stdout, b"hi\n", "{}", ctx(&out, &server, &hook));
    assert_eq!(hook.count("/password"), 1, "{}", hook.describe());
    assert!(hook.tls_errors().is_empty(), "{}", hook.describe());
    drop(server);

    // The same as file paths, but no client certificate: the webhook's handshake fails.
    let server = env.start(&config(
        &env,
        &[Hook::new("password", &hook.url)
            .timeouts("1s", "3s")
            .string("cacert", &pki.ca_cert.display().to_string())],
    ));
    let out = run(env.ssh_password(&server, "alice", PASSWORD).arg("echo hi"));
    assert_eq!(
        out.status.code(),
        Some(255),
        "{}",
        ctx(&out, &server, &hook)
    );
    assert!(out.stdout.is_empty(), "{}", ctx(&out, &server, &hook));
    assert_eq!(hook.count("/password"), 1, "{}", hook.describe());
    assert!(
        hook.wait_for_tls_error(Duration::from_secs(10)),
        "the client never tried the handshake: {}",
        ctx(&out, &server, &hook)
    );
    drop(server);

    // Client certificate and key as file paths: works again.
    let server = env.start(&config(
        &env,
        &[Hook::new("password", &hook.url)
            .string("cacert", &pki.ca_cert.display().to_string())
            .string("cert", &pki.client_cert.display().to_string())
            .string("key", &pki.client_key.display().to_string())],
    ));
    let out = run(env.ssh_password(&server, "alice", PASSWORD).arg("echo hi"));
    assert_eq!(out.stdout, b"hi\n", "{}", ctx(&out, &server, &hook));
    assert_eq!(hook.count("/password"), 2, "{}", hook.describe());
    assert_no_violations(&hook, &server);
}

// ---------------------------------------------------------------------------
// 10: redirects
// ---------------------------------------------------------------------------

#[test]
fn a_redirect_is_not_followed() {
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    let target = format!("{}/moved/password", hook.url);
    hook.set_default("/password", Reply::redirect(302, &target));
    // Following the redirect would log in.
    hook.set_default("/moved/password", success("alice"));
    let server = env.start(&config(
        &env,
        &[Hook::new("password", &hook.url).timeouts("1s", "3s")],
    ));

    let out = run(env.ssh_password(&server, "alice", PASSWORD).arg("echo hi"));
    assert_eq!(
        out.status.code(),
        Some(255),
        "{}",
        ctx(&out, &server, &hook)
    );
    assert!(out.stdout.is_empty(), "{}", ctx(&out, &server, &hook));
    assert!(hook.count("/password") >= 1, "{}", hook.describe());
    assert_eq!(
        hook.count("/moved/password"),
        0,
        "the redirect was followed: {}",
        hook.describe()
    );
    assert_no_violations(&hook, &server);
}

/// With `allowRedirects: true` a redirect that leaves the webhook's origin (another port here;
/// another host, or https to http, alike) is still refused: the request carries the password,
/// which must never reach the other server.
#[test]
fn a_redirect_to_another_origin_is_refused_even_when_allowed() {
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    let elsewhere = WebhookServer::http();
    hook.set_default(
        "/password",
        Reply::redirect(307, &format!("{}/password", elsewhere.url)),
    );
    elsewhere.set_default("/password", success("alice"));
    let yaml = config(
        &env,
        &[Hook::new("password", &hook.url).timeouts("1s", "3s")],
    )
    .replacen("allowRedirects: false", "allowRedirects: true", 1);
    let server = env.start(&yaml);
    let out = run(env.ssh_password(&server, "alice", PASSWORD).arg("echo hi"));
    assert_eq!(
        out.status.code(),
        Some(255),
        "{}",
        ctx(&out, &server, &hook)
    );
    assert_eq!(
        elsewhere.count("/password"),
        0,
        "the password went to another origin: {}",
        elsewhere.describe()
    );
    assert!(
        log_line_about_webhook(&server, &hook, &["leaves the webhook's origin"]).is_some(),
        "{}",
        server.output()
    );
    assert_no_violations(&hook, &server);
}

/// A dual-stack listener (`[::]`) sees IPv4 clients as `::ffff:a.b.c.d`; the webhooks get
/// `a.b.c.d:port`, as ContainerSSH sends it (IPv4 deny-lists in webhook servers match), and so
/// do the logs (and the container's `containerssh_ip` label, from the same address).
#[test]
fn a_dual_stack_listener_reports_ipv4_clients_as_ipv4() {
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    hook.set_default("/password", success("alice"));
    let yaml = config(&env, &[Hook::new("password", &hook.url)]).replacen(
        "listen: 127.0.0.1:0",
        "listen: \"[::]:0\"",
        1,
    );
    assert!(yaml.contains("[::]:0"), "test setup");
    let server = env.start(&yaml);
    let out = run(env
        .ssh_password(&server, "alice", PASSWORD)
        .arg("echo hi; sleep 1"));
    assert_eq!(out.stdout, b"hi\n", "{}", ctx(&out, &server, &hook));
    let recorded = hook.recorded("/password");
    let req = recorded[0].json.as_ref().expect("a /password request");
    // remoteAddress is 127.0.0.1:port, not [::ffff:127.0.0.1]:port.
    assert_connection_fields(req, "alice");
    assert!(
        !str_field(req, "remoteAddress").contains("::ffff:"),
        "{req}"
    );
    assert!(
        server.output().contains("remote=127.0.0.1:"),
        "{}",
        server.output()
    );
    assert_no_violations(&hook, &server);
}

/// With `allowRedirects: true` the same redirect is followed and the login works.
#[test]
fn a_redirect_is_followed_when_allowed() {
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    let target = format!("{}/moved/password", hook.url);
    hook.set_default("/password", Reply::redirect(302, &target));
    hook.set_default("/moved/password", success("alice"));
    let yaml = config(&env, &[Hook::new("password", &hook.url)]).replacen(
        "allowRedirects: false",
        "allowRedirects: true",
        1,
    );
    let server = env.start(&yaml);
    let out = run(env.ssh_password(&server, "alice", PASSWORD).arg("echo hi"));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hi\n",
        "{}",
        ctx(&out, &server, &hook)
    );
    assert_eq!(hook.count("/moved/password"), 1, "{}", hook.describe());
    assert_no_violations(&hook, &server);
}

// ---------------------------------------------------------------------------
// 11: authenticatedUsername
// ---------------------------------------------------------------------------

#[test]
fn the_authenticated_username_labels_the_container() {
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    hook.set_default("/password", success("bob"));
    let server = env.start(&config(&env, &[Hook::new("password", &hook.url)]));

    let mut held = Background::spawn(
        env.ssh_password(&server, "alice", PASSWORD)
            .arg("echo up; exec sleep 120"),
        env.path(),
        "held",
    );
    let up = poll_until(CMD_TIMEOUT, Duration::from_millis(100), || {
        if held.stdout().contains("up") {
            return Some(true);
        }
        held.exited().map(|_| false)
    });
    assert_eq!(
        up,
        Some(true),
        "the session never came up (exit {:?})\n--- ssh stderr ---\n{}\n--- server ---\n{}\n{}",
        held.exited(),
        held.stderr(),
        server.output(),
        hook.describe()
    );
    let ids = env.containers();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let labels = Command::new("docker")
        .args(["inspect", "--format", "{{json .Config.Labels}}", &ids[0]])
        .output()
        .expect("docker inspect");
    let labels: Value = serde_json::from_slice(&labels.stdout).unwrap_or_else(|e| {
        panic!(
            "docker inspect: {e}: {}",
            String::from_utf8_lossy(&labels.stderr)
        )
    });
    assert_eq!(
        labels.get("containerssh_username").and_then(Value::as_str),
        Some("bob"),
        "labels: {labels}\n--- server ---\n{}",
        server.output()
    );
    let req = &hook.requests("/password")[0];
    assert_eq!(str_field(req, "username"), "alice");
    assert_eq!(
        labels
            .get("containerssh_connection_id")
            .and_then(Value::as_str),
        Some(str_field(req, "connectionId")),
        "the webhook's connectionId is the connection's: {labels}"
    );
    held.kill();
    assert_no_violations(&hook, &server);
}

// ---------------------------------------------------------------------------
// The test webhook itself (no SSH server involved)
// ---------------------------------------------------------------------------

/// `curl` POSTing `body` to `url` with `content_type`; returns (HTTP status, body).
fn curl(url: &str, content_type: &str, body: &str, extra: &[&str]) -> (u16, String) {
    let out = run(Command::new("curl")
        .args(["-sS", "--max-time", "10", "-X", "POST", "-H"])
        .arg(format!("Content-Type: {content_type}"))
        .args(["--data-binary", body, "-w", "\n%{http_code}"])
        .args(extra)
        .arg(url));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn the_test_webhook_is_strict() {
    let hook = WebhookServer::http();
    hook.set_default("/password", success("alice").metadata("k", "v", true));
    let good = r#"{"username":"alice","remoteAddress":"127.0.0.1:5000","connectionId":"0123456789abcdef0123456789abcdef","clientVersion":"SSH-2.0-OpenSSH_9.2","passwordBase64":"cHc="}"#;
    let url = format!("{}/password", hook.url);
    let (code, body) = curl(&url, "application/json", good, &[]);
    assert_eq!(code, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        answer,
        serde_json::json!({"success": true, "authenticatedUsername": "alice",
            "metadata": {"k": {"value": "v", "sensitive": true}}})
    );
    assert!(hook.errors().is_empty(), "{}", hook.describe());
    assert_eq!(hook.requests("/password").len(), 1);

    let unknown = good.replace("\"username\"", "\"sessionId\":\"x\",\"username\"");
    let missing = good.replace(",\"passwordBase64\":\"cHc=\"", "");
    let bad_b64 = good.replace("cHc=", "not base64!");
    let bad_addr = good.replace("127.0.0.1:5000", "127.0.0.1");
    for (ct, body) in [
        ("application/json", unknown.as_str()),
        ("application/json", missing.as_str()),
        ("application/json", bad_b64.as_str()),
        ("application/json", bad_addr.as_str()),
        ("text/plain", good),
    ] {
        let before = hook.errors().len();
        let (code, answer) = curl(&url, ct, body, &[]);
        assert_eq!(code, 400, "{ct} {body}: {answer}");
        assert_eq!(hook.errors().len(), before + 1, "{}", hook.describe());
    }
    // Nothing scripted for /pubkey: 404 and an error.
    let (code, _) = curl(
        &format!("{}/pubkey", hook.url),
        "application/json",
        "{}",
        &[],
    );
    assert_eq!(code, 400, "an empty pubkey request lacks required fields");
    let pubkey = good.replace("passwordBase64\":\"cHc=", "publicKey\":\"ssh-ed25519 AAAA");
    let (code, _) = curl(
        &format!("{}/pubkey", hook.url),
        "application/json",
        &pubkey,
        &[],
    );
    assert_eq!(code, 404);
    assert_eq!(hook.errors().len(), 7, "{}", hook.describe());

    // Queue before default, then the default again.
    hook.push("/password", Reply::new(500, "{}"));
    assert_eq!(curl(&url, "application/json", good, &[]).0, 500);
    assert_eq!(curl(&url, "application/json", good, &[]).0, 200);
}

#[test]
fn the_test_webhook_speaks_tls_and_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::generate(dir.path());
    let good = r#"{"username":"a","remoteAddress":"[::1]:5000","connectionId":"0123456789abcdef0123456789abcdef","clientVersion":"SSH-2.0-x","authenticatedUsername":"b","metadata":{"m":{"value":"v","sensitive":false}},"files":{"/f":{"value":"eA==","sensitive":true}}}"#;
    let ca = pki.ca_cert.display().to_string();
    let (cert, key) = (
        pki.client_cert.display().to_string(),
        pki.client_key.display().to_string(),
    );

    let hook = WebhookServer::https(&pki, false);
    hook.set_default("/authz", failure());
    let url = format!("{}/authz", hook.url);
    let (code, body) = curl(&url, "application/json", good, &["--cacert", &ca]);
    assert_eq!(
        (code, body.as_str()),
        (200, r#"{"success":false}"#),
        "{}",
        hook.describe()
    );
    let other = pki.other_ca_cert.display().to_string();
    assert_eq!(
        curl(&url, "application/json", good, &["--cacert", &other]).0,
        0
    );
    assert!(hook.wait_for_tls_error(Duration::from_secs(10)));
    assert!(hook.errors().is_empty(), "{}", hook.describe());

    let hook = WebhookServer::https(&pki, true);
    hook.set_default("/authz", failure());
    let url = format!("{}/authz", hook.url);
    let (code, _) = curl(&url, "application/json", good, &["--cacert", &ca]);
    assert_ne!(code, 200, "no client certificate");
    assert!(hook.wait_for_tls_error(Duration::from_secs(10)));
    let (code, _) = curl(
        &url,
        "application/json",
        good,
        &["--cacert", &ca, "--cert", &cert, "--key", &key],
    );
    assert_eq!(code, 200, "{}", hook.describe());
    assert_eq!(hook.requests("/authz").len(), 1);
    assert!(hook.errors().is_empty(), "{}", hook.describe());
}
