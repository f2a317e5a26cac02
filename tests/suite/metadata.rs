//! Environment and files a login brings into its container (`auth.metadata`): written before
//! any session starts, the operator's environment winning over the client's, a login refused
//! when one of its files cannot be read.

use crate::support;

use std::time::Duration;

use support::{describe, run_with_timeout, TestEnv};

const CMD_TIMEOUT: Duration = Duration::from_secs(90);

fn config(env: &TestEnv, mode: &str) -> String {
    let secrets = env.path().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("alice"), "alice's token\n").unwrap();
    let block = format!(
        "auth:\n  metadata:\n    environment:\n      LAB_NAME: lab-1\n    files:\n      /tmp/welcome.txt:\n        value: \"hello from the operator\\n\"\n        mode: \"0644\"\n      /tmp/token:\n        source: \"{}/%u\"\n",
        secrets.display()
    );
    env.config_yaml(mode).replacen("auth:\n", &block, 1)
}

#[test]
fn files_and_environment_reach_every_session() {
    for mode in ["connection", "session"] {
        let env = TestEnv::new();
        let server = env.start(&config(&env, mode));
        // The client tries to set the operator's variable too; the operator's value wins.
        let out = run_with_timeout(
            env.ssh(&server, "alice")
                .args(["-o", "SetEnv=LAB_NAME=client CLIENT_VAR=kept"])
                .arg("cat /tmp/welcome.txt /tmp/token; stat -c %a /tmp/welcome.txt /tmp/token; echo $LAB_NAME $CLIENT_VAR"),
            None,
            CMD_TIMEOUT,
        );
        assert!(out.status.success(), "{mode}: {}", describe(&out, &server));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello from the operator\nalice's token\n644\n600\nlab-1 kept\n",
            "{mode}: {}",
            describe(&out, &server)
        );
    }
}

#[test]
fn a_login_whose_file_is_missing_is_refused() {
    let env = TestEnv::new();
    let server = env.start(&config(&env, "connection"));
    // bob has a key but no secrets/bob file.
    let out = run_with_timeout(
        env.ssh(&server, "bob")
            .args(["-o", "BatchMode=yes"])
            .arg("true"),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(255), "{}", describe(&out, &server));
    assert!(
        server.wait_for_output("login refused: auth.metadata", Duration::from_secs(10)),
        "{}",
        server.output()
    );
    assert!(!server.output().contains("alice's token"));
}

#[test]
fn a_bad_metadata_key_is_a_config_error_naming_it() {
    let env = TestEnv::new();
    let yaml = env.config_yaml("connection").replacen(
        "auth:\n",
        "auth:\n  metadata:\n    files:\n      relative/path:\n        value: x\n",
        1,
    );
    std::fs::write(env.path().join("bad.yaml"), yaml).unwrap();
    let out = run_with_timeout(
        std::process::Command::new(support::SERVER_BIN)
            .arg("--config")
            .arg(env.path().join("bad.yaml")),
        None,
        CMD_TIMEOUT,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("auth.metadata.files.relative/path"), "{err}");
}
