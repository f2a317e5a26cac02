//! Embedded authentication and config errors, from the outside: real `ssh`, real files.

use crate::support;

use std::process::Command;
use std::time::Duration;

use support::{run_with_timeout, TestEnv};

const CMD_TIMEOUT: Duration = Duration::from_secs(90);
const SERVER_BIN: &str = env!("CARGO_BIN_EXE_containerssh");

/// Runs the server on `yaml` (expected to be refused) and returns its exit code and stderr.
fn refused_config(env: &TestEnv, yaml: &str) -> (Option<i32>, String) {
    let path = env.path().join("bad.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = run_with_timeout(
        Command::new(SERVER_BIN).arg("--config").arg(&path),
        None,
        Duration::from_secs(30),
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn hash(password: &str) -> String {
    let out = run_with_timeout(
        Command::new(SERVER_BIN).arg("--hash-password"),
        Some(format!("{password}\n").as_bytes()),
        Duration::from_secs(30),
    );
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn wrong_key_and_unknown_user_are_refused() {
    let env = TestEnv::new();
    let server = env.start_mode("connection");
    // dave's file holds a different key than the one the client offers.
    let other = env.path().join("other_key");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other)
        .status()
        .expect("ssh-keygen");
    assert!(st.success());
    std::fs::copy(other.with_extension("pub"), env.path().join("keys/dave")).unwrap();
    let out = run_with_timeout(env.ssh(&server, "dave").arg("echo in"), None, CMD_TIMEOUT);
    assert_eq!(out.status.code(), Some(255), "{}", server.output());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    assert!(out.stdout.is_empty());

    // carol has no authorized_keys file at all.
    let out = run_with_timeout(env.ssh(&server, "carol").arg("echo in"), None, CMD_TIMEOUT);
    assert_eq!(out.status.code(), Some(255));
    assert!(out.stdout.is_empty());
    // Nothing was started for refused logins.
    assert!(env.containers().is_empty());
}

#[test]
fn password_file_accepts_the_right_password_only() {
    let env = TestEnv::new();
    std::fs::write(
        &env.password_file,
        format!("# users\nalice:{}\n", hash("s3cret pass")),
    )
    .unwrap();
    let server = env.start_mode("connection");
    let out = run_with_timeout(
        env.ssh_password(&server, "alice", "s3cret pass")
            .arg("echo in"),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(out.stdout, b"in\n", "{}", server.output());
    let out = run_with_timeout(
        env.ssh_password(&server, "alice", "wrong").arg("echo in"),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(255));
    assert!(out.stdout.is_empty());
    let out = run_with_timeout(
        env.ssh_password(&server, "mallory", "s3cret pass")
            .arg("echo in"),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(255));
    assert!(
        !server.output().contains("s3cret"),
        "a password reached the log"
    );
}

#[test]
fn authorized_keys_forced_command_and_environment_apply() {
    let env = TestEnv::new();
    std::fs::write(
        env.path().join("keys/alice"),
        format!(
            "command=\"echo forced:$SSH_ORIGINAL_COMMAND:$TEAM\",environment=\"TEAM=blue\" {}\n",
            env.client_pubkey
        ),
    )
    .unwrap();
    let server = env.start_mode("connection");
    let out = run_with_timeout(env.ssh(&server, "alice").arg("id -u"), None, CMD_TIMEOUT);
    assert_eq!(out.stdout, b"forced:id -u:blue\n", "{}", server.output());
}

#[test]
fn unknown_config_key_names_the_key_and_line() {
    let env = TestEnv::new();
    let yaml = env.config_yaml("connection").replace(
        "    imagePullPolicy: Never\n",
        "    imagePullPolicy: Never\n    imagePullPolcy: Always\n",
    );
    let line = yaml
        .lines()
        .position(|l| l.contains("imagePullPolcy"))
        .expect("typo line")
        + 1;
    let (code, stderr) = refused_config(&env, &yaml);
    assert_eq!(code, Some(2), "stderr: {stderr}");
    assert!(stderr.contains("docker.execution"), "{stderr}");
    assert!(stderr.contains("imagePullPolcy"), "{stderr}");
    assert!(
        stderr.contains(&format!("line {line}")),
        "want line {line}: {stderr}"
    );
}

#[test]
fn invalid_value_names_the_key() {
    let env = TestEnv::new();
    let yaml = env
        .config_yaml("connection")
        .replace("    mode: \"connection\"\n", "    mode: sometimes\n");
    assert!(yaml.contains("sometimes"), "test setup");
    let (code, stderr) = refused_config(&env, &yaml);
    assert_eq!(code, Some(2), "stderr: {stderr}");
    assert!(stderr.contains("docker.execution.mode"), "{stderr}");
}

#[test]
fn banner_is_shown_before_authentication() {
    let env = TestEnv::new();
    let yaml = env
        .config_yaml("connection")
        .replace("ssh:\n", "ssh:\n  banner: \"Authorised use only.\\n\"\n");
    let server = env.start(&yaml);
    let out = run_with_timeout(
        env.ssh_opts(&server)
            .args(["-o", "LogLevel=INFO"])
            .arg(env.destination("alice"))
            .arg("true"),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(0), "{}", server.output());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Authorised use only."),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn dump_config_round_trips() {
    let env = TestEnv::new();
    let path = env.path().join("c.yaml");
    std::fs::write(&path, env.config_yaml("session")).unwrap();
    let dump = |p: &std::path::Path| {
        let out = run_with_timeout(
            Command::new(SERVER_BIN)
                .arg("--config")
                .arg(p)
                .arg("--dump-config"),
            None,
            Duration::from_secs(30),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let first = dump(&path);
    assert!(first.contains("mode: session"), "{first}");
    assert!(
        first.contains("clientAliveCountMax: 3"),
        "defaults are shown: {first}"
    );
    let again = env.path().join("dumped.yaml");
    std::fs::write(&again, &first).unwrap();
    assert_eq!(dump(&again), first, "the dump is itself a valid config");
}
