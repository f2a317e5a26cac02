//! A stock auditor against the server: `ssh-audit` 3.9 (PyPI, installed by tests/run.sh), with
//! its DHEat connection-rate test (never `--skip-rate-test`). On the default configuration it
//! reports no failure and no warning but the post-quantum advisory on the X25519 exchange kept
//! for OpenSSH clients before 9.9; with only the post-quantum exchange it is clean (exit 0); an
//! explicitly listed weak algorithm is offered and named in a warning at start.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::{describe, run_with_timeout, TestEnv, TestServer};

const AUDIT_TIMEOUT: Duration = Duration::from_secs(120);

/// ssh-audit's verdict: its exit code (0 good, 2 warnings, 3 failures) and its JSON report.
fn audit(server: &TestServer) -> (i32, Value) {
    let out = run_with_timeout(
        Command::new("python3")
            .args(["-m", "ssh_audit", "-j", "-p"])
            .arg(server.port().to_string())
            .arg("127.0.0.1"),
        None,
        AUDIT_TIMEOUT,
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "ssh-audit printed no JSON report ({e}): {}",
            describe(&out, server)
        )
    });
    (out.status.code().expect("ssh-audit exit code"), report)
}

/// Every `(section, algorithm, note)` at `level` (`fail`, `warn`).
fn notes(report: &Value, level: &str) -> Vec<(String, String, String)> {
    let mut found = Vec::new();
    for section in ["kex", "key", "enc", "mac"] {
        for alg in report[section].as_array().into_iter().flatten() {
            for note in alg["notes"][level].as_array().into_iter().flatten() {
                found.push((
                    section.to_string(),
                    alg["algorithm"].as_str().unwrap_or("").to_string(),
                    note.as_str().unwrap_or("").to_string(),
                ));
            }
        }
    }
    found
}

fn algorithms(report: &Value, section: &str) -> Vec<String> {
    report[section]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| a["algorithm"].as_str().map(String::from))
        .collect()
}

fn additional_notes(report: &Value) -> String {
    report["additional_notes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect::<Vec<_>>()
        .join("\n")
}

const NOT_PQ: &str = "does not provide protection against post-quantum attacks";

/// The harness's configuration with the auditor's address (127.0.0.1) not exempt from the
/// per-source penalties, which are what throttles its rate test, and `ssh_extra` under `ssh:`.
fn config(env: &TestEnv, ssh_extra: &str) -> String {
    env.config_yaml("connection").replacen(
        "ssh:\n",
        &format!("ssh:\n  perSourcePenaltyExemptList: []\n{ssh_extra}"),
        1,
    )
}

#[test]
fn the_default_configuration_passes_the_auditor() {
    let env = TestEnv::new();
    let server = env.start(&config(&env, ""));
    let (code, report) = audit(&server);
    assert_eq!(notes(&report, "fail"), vec![], "{report:#}");
    assert_eq!(
        notes(&report, "warn"),
        vec![("kex".into(), "curve25519-sha256".into(), NOT_PQ.into())],
        "{report:#}"
    );
    assert_eq!(code, 2, "warnings only: {report:#}");
    assert_eq!(
        algorithms(&report, "kex"),
        [
            "mlkem768x25519-sha256",
            "curve25519-sha256",
            "ext-info-s",
            "kex-strict-s-v00@openssh.com"
        ]
    );
    assert_eq!(algorithms(&report, "key"), ["ssh-ed25519"]);
    // X25519 is in ssh-audit's DHEat list, so its rate test ran: throttled.
    let extra = additional_notes(&report);
    assert!(!extra.contains("DHEat"), "{extra}");
    assert!(
        server.wait_for_output("source penalised", Duration::from_secs(10)),
        "the rate test's burst was throttled:\n{}",
        server.output()
    );
}

#[test]
fn post_quantum_only_is_clean() {
    let env = TestEnv::new();
    let server = env.start(&config(&env, "  kex: [mlkem768x25519-sha256]\n"));
    let (code, report) = audit(&server);
    assert_eq!(notes(&report, "fail"), vec![], "{report:#}");
    assert_eq!(notes(&report, "warn"), vec![], "{report:#}");
    assert!(!additional_notes(&report).contains("DHEat"), "{report:#}");
    assert_eq!(code, 0, "{report:#}");
}

#[test]
fn a_weak_algorithm_listed_is_offered_and_warned_about() {
    let env = TestEnv::new();
    let server = env.start(&config(
        &env,
        "  kex: [curve25519-sha256, diffie-hellman-group14-sha256]\n  \
         macs: [hmac-sha2-256-etm@openssh.com, hmac-sha2-256]\n  \
         ciphers: [aes128-ctr]\n",
    ));
    let log = server.output();
    for (key, name) in [
        ("ssh.kex", "diffie-hellman-group14-sha256"),
        ("ssh.macs", "hmac-sha2-256"),
    ] {
        let line = log
            .lines()
            .find(|l| l.contains("WARN") && l.contains(key))
            .unwrap_or_else(|| panic!("no warning about {key}:\n{log}"));
        assert!(line.contains(name), "{line}");
    }
    // Honoured: a client that insists on the weak exchange and MAC gets in.
    let out = run_with_timeout(
        env.ssh_opts(&server)
            .args(["-o", "KexAlgorithms=diffie-hellman-group14-sha256"])
            .args(["-o", "MACs=hmac-sha2-256", "-o", "Ciphers=aes128-ctr"])
            .arg(env.destination("alice"))
            .arg("echo in"),
        None,
        Duration::from_secs(90),
    );
    assert_eq!(out.stdout, b"in\n", "{}", describe(&out, &server));
    let (_, report) = audit(&server);
    assert!(algorithms(&report, "kex").contains(&"diffie-hellman-group14-sha256".to_string()));
    assert!(algorithms(&report, "mac").contains(&"hmac-sha2-256".to_string()));
    // The finite-field group brings the DHEat rate test; the throttling passes it.
    assert!(!additional_notes(&report).contains("DHEat"), "{report:#}");
}
