//! Docker persistent mode: logins exec into one named container that outlives them.

use crate::support;

use std::process::Command;
use std::time::Duration;

use support::{describe, run_with_timeout, RemoveByName, TestEnv};

const CMD_TIMEOUT: Duration = Duration::from_secs(90);

fn persistent_yaml(env: &TestEnv, name: &str, create: bool) -> String {
    let yaml = env.config_yaml("persistent");
    let extra = format!("    containername: {name}\n    createMissingContainer: {create}\n");
    let out = yaml.replace(
        "    mode: \"persistent\"\n",
        &format!("    mode: \"persistent\"\n{extra}"),
    );
    assert_ne!(out, yaml, "test setup");
    out
}

fn running(name: &str) -> bool {
    let out = Command::new("docker")
        .args(["inspect", "-f", "{{.State.Running}}", name])
        .output()
        .expect("docker inspect");
    String::from_utf8_lossy(&out.stdout).trim() == "true"
}

#[test]
fn logins_share_one_container_that_survives_disconnects() {
    let env = TestEnv::new();
    let name = format!("cssh-persistent-{}", env.instance);
    let _cleanup = RemoveByName(name.clone());
    let server = env.start(&persistent_yaml(&env, &name, true));

    let out = run_with_timeout(
        env.ssh(&server, "alice")
            .arg("echo kept > /tmp/state; hostname"),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out, &server));
    let first_host = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(running(&name), "the container must outlive the connection");

    let out = run_with_timeout(
        env.ssh(&server, "bob").arg("cat /tmp/state; hostname"),
        None,
        CMD_TIMEOUT,
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        ["kept", first_host.as_str()],
        "{}",
        describe(&out, &server)
    );
    assert!(running(&name));
    // Neither the connection cleanup nor the instance's containers include it.
    assert!(env.containers().is_empty());
}

#[test]
fn a_missing_container_is_refused_unless_creation_is_allowed() {
    let env = TestEnv::new();
    let name = format!("cssh-missing-{}", env.instance);
    let _cleanup = RemoveByName(name.clone());
    let server = env.start(&persistent_yaml(&env, &name, false));
    let out = run_with_timeout(env.ssh(&server, "alice").arg("echo hi"), None, CMD_TIMEOUT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr.contains(&format!("container {name} does not exist")),
        "stderr: {stderr}"
    );
    assert!(!running(&name), "nothing may be created");
}

/// As in session.rs: `ssh -tt` with stdin at EOF keeps the program's output.
#[test]
fn a_terminal_keeps_its_output_when_stdin_ends_at_once() {
    let env = TestEnv::new();
    let name = format!("cssh-persistent-{}", env.instance);
    let _cleanup = RemoveByName(name.clone());
    let server = env.start(&persistent_yaml(&env, &name, true));
    for round in 0..3 {
        let out = env.ssh_tty_stdin_at_eof(&server, "echo hello; /usr/bin/stty size");
        let info = describe(&out, &server);
        let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
        assert_eq!(text, "hello\n0 0\n", "round {round}: {info}");
        assert_eq!(out.status.code(), Some(0), "{info}");
    }
}
