//! OpenSSH user certificates (`auth.publicKey.trustedUserCAKeys`) with the real `ssh-keygen`
//! and `ssh`: the client's key is certified by a CA the server trusts (or not), and the
//! certificate's validity window, principals and critical options decide the login.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{describe, run_with_timeout, TestEnv, TestServer};

const CMD_TIMEOUT: Duration = Duration::from_secs(90);

/// A new CA key pair in the environment's directory.
fn ca(env: &TestEnv, name: &str) -> PathBuf {
    let key = env.path().join(name);
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
        .arg(&key)
        .status()
        .expect("ssh-keygen");
    assert!(st.success());
    key
}

/// Certifies the client's key with `ca`: `ssh-keygen -s ca -I id -n principals [extra]`;
/// the certificate lands next to the key, where `ssh` picks it up.
fn certify(env: &TestEnv, ca: &Path, principals: &str, extra: &[&str]) {
    let cert = PathBuf::from(format!("{}-cert.pub", env.client_key.display()));
    let _ = std::fs::remove_file(&cert);
    let out = Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(ca)
        .args(["-I", "lab-cert-7", "-n", principals])
        .args(extra)
        .arg(format!("{}.pub", env.client_key.display()))
        .output()
        .expect("ssh-keygen -s");
    assert!(
        out.status.success(),
        "ssh-keygen -s: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(cert.exists());
}

/// The server trusting `ca` only (no authorized_keys): only certificates log in.
fn start(env: &TestEnv, ca: &Path, extra_auth: &str) -> TestServer {
    let yaml = env.config_yaml("connection");
    let start = yaml.find("auth:\n").unwrap();
    let end = yaml.find("backend:").unwrap();
    let auth = format!(
        "auth:\n  publicKey:\n    trustedUserCAKeys: {}.pub\n{extra_auth}",
        ca.display()
    );
    env.start(&format!("{}{auth}{}", &yaml[..start], &yaml[end..]))
}

fn login(env: &TestEnv, server: &TestServer, user: &str) -> std::process::Output {
    run_with_timeout(env.ssh(server, user).arg("echo in"), None, CMD_TIMEOUT)
}

#[test]
fn a_certificate_from_the_trusted_ca_logs_in_its_principals() {
    let env = TestEnv::new();
    let ca = ca(&env, "user_ca");
    let server = start(&env, &ca, "");
    // The plain key alone is not enough.
    let out = login(&env, &server, "alice");
    assert_eq!(out.status.code(), Some(255), "{}", describe(&out, &server));

    certify(&env, &ca, "alice,ops", &["-V", "-5m:+1h"]);
    for user in ["alice", "ops"] {
        let out = login(&env, &server, user);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "in\n",
            "{user}: {}",
            describe(&out, &server)
        );
    }
    // Not a principal.
    let out = login(&env, &server, "bob");
    assert_eq!(out.status.code(), Some(255), "{}", describe(&out, &server));
    assert!(server.wait_for_output(
        "is not among the certificate's principals",
        Duration::from_secs(10)
    ));
}

#[test]
fn expired_and_unknown_ca_certificates_are_refused() {
    let env = TestEnv::new();
    let trusted = ca(&env, "trusted_ca");
    let other = ca(&env, "other_ca");
    let server = start(&env, &trusted, "");
    certify(&env, &trusted, "alice", &["-V", "20200101:20200102"]);
    let out = login(&env, &server, "alice");
    assert_eq!(
        out.status.code(),
        Some(255),
        "expired: {}",
        describe(&out, &server)
    );
    certify(&env, &other, "alice", &["-V", "-5m:+1h"]);
    let out = login(&env, &server, "alice");
    assert_eq!(
        out.status.code(),
        Some(255),
        "unknown CA: {}",
        describe(&out, &server)
    );
    assert!(server.wait_for_output("not signed by a trusted CA", Duration::from_secs(10)));
    certify(&env, &trusted, "alice", &["-V", "-5m:+1h"]);
    let out = login(&env, &server, "alice");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "in\n",
        "{}",
        describe(&out, &server)
    );
}

#[test]
fn critical_options_force_command_and_source_address() {
    let env = TestEnv::new();
    let ca = ca(&env, "user_ca");
    let server = start(&env, &ca, "");
    certify(
        &env,
        &ca,
        "alice",
        &[
            "-O",
            "force-command=echo \"forced [$SSH_ORIGINAL_COMMAND]\"",
        ],
    );
    let out = login(&env, &server, "alice");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "forced [echo in]\n",
        "{}",
        describe(&out, &server)
    );
    certify(&env, &ca, "alice", &["-O", "source-address=10.9.9.0/24"]);
    let out = login(&env, &server, "alice");
    assert_eq!(out.status.code(), Some(255), "{}", describe(&out, &server));
    assert!(server.wait_for_output("source-address does not allow", Duration::from_secs(10)));
    certify(
        &env,
        &ca,
        "alice",
        &["-O", "source-address=10.9.9.0/24,127.0.0.1/32"],
    );
    let out = login(&env, &server, "alice");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "in\n",
        "{}",
        describe(&out, &server)
    );
    // No permit-pty extension: no terminal.
    certify(&env, &ca, "alice", &["-O", "no-pty"]);
    let out = run_with_timeout(
        env.ssh(&server, "alice").args(["-tt", "tty"]),
        None,
        CMD_TIMEOUT,
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("PTY allocation request failed"),
        "{}",
        describe(&out, &server)
    );
}

/// The certificate's key id and principals reach the authz webhook as metadata.
#[test]
fn the_certificate_is_named_to_the_webhooks() {
    use support::webhook::{success, WebhookServer};
    let env = TestEnv::new();
    let ca = ca(&env, "user_ca");
    let hook = WebhookServer::http();
    hook.set_default("/authz", success("alice"));
    let authz = format!(
        "  authz:\n    method: webhook\n    webhook:\n      url: {}\n",
        serde_json::json!(hook.url)
    );
    let server = start(&env, &ca, &authz);
    certify(&env, &ca, "alice,ops", &[]);
    let out = login(&env, &server, "alice");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "in\n",
        "{}",
        describe(&out, &server)
    );
    let requests = hook.requests("/authz");
    assert_eq!(requests.len(), 1, "{}", hook.describe());
    let md = &requests[0]["metadata"];
    assert_eq!(
        md["sshCertificateKeyId"]["value"], "lab-cert-7",
        "{}",
        requests[0]
    );
    assert_eq!(
        md["sshCertificatePrincipals"]["value"], "alice,ops",
        "{}",
        requests[0]
    );
    assert!(hook.errors().is_empty(), "{:?}", hook.errors());
}
