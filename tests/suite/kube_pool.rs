//! The warm pool on Kubernetes (`kubernetes.pod.pool`) against the fake API server: pods
//! started ahead carry nothing of any user; a login claims one, which is then labelled as its
//! connection's (with the login's exposed metadata) by a merge patch, gets the login's
//! environment through the agent, and is deleted after the connection; the pool refills; a
//! member that died is skipped; a killed server's members are reaped at its next start.

use crate::support;

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::webhook::{success, WebhookServer};
use support::{poll_until, run_with_timeout, KubeFake, TestEnv, TestServer};

const CMD_TIMEOUT: Duration = Duration::from_secs(90);
const POOL_WAIT: Duration = Duration::from_secs(60);
const STEP: Duration = Duration::from_millis(100);

/// Connection mode with a pool of `size`; public keys checked by `hook` (which gives the
/// login metadata), exposed as a label and as a variable.
fn pooled_yaml(env: &TestEnv, fake: &KubeFake, hook: &WebhookServer, size: u32) -> String {
    let yaml = env.kube_config_yaml(
        fake,
        "connection",
        &format!(
            "    exposeAuthMetadataAsLabels:\n      GITHUB_LOGIN: example.com/gh\n    \
             exposeAuthMetadataAsEnv:\n      GITHUB_LOGIN: GH_LOGIN\n    \
             pool:\n      size: {size}\n"
        ),
    );
    let start = yaml.find("auth:\n").expect("config has `auth:`");
    let end = yaml
        .find("backend: kubernetes\n")
        .expect("config has `backend: kubernetes`");
    let auth = format!(
        "auth:\n  publicKey:\n    method: webhook\n    webhook:\n      url: {}\n      \
         timeout: 5s\n",
        serde_json::json!(hook.url)
    );
    format!("{}{auth}{}", &yaml[..start], &yaml[end..])
}

/// The pods of this instance matching `selector` (an extra label selector), by name.
fn pods(fake: &KubeFake, env: &TestEnv, selector: &str) -> Vec<Value> {
    let (code, list) = fake.api_get(&format!(
        "/api/v1/namespaces/default/pods?labelSelector=containerssh_instance%3D{}{selector}",
        env.instance
    ));
    assert_eq!(code, 200, "{list}");
    list["items"].as_array().cloned().unwrap_or_default()
}

fn name(pod: &Value) -> String {
    pod["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Waits (bounded) for exactly `n` running members waiting in the pool.
fn full(fake: &KubeFake, env: &TestEnv, n: usize, server: &TestServer) -> Vec<String> {
    poll_until(POOL_WAIT, STEP, || {
        let waiting: Vec<String> = pods(fake, env, ",containerssh_pool%3D1")
            .iter()
            .filter(|p| {
                p["status"]["phase"] == "Running" && p["metadata"]["deletionTimestamp"].is_null()
            })
            .map(name)
            .collect();
        (waiting.len() == n).then_some(waiting)
    })
    .unwrap_or_else(|| {
        panic!(
            "the pool never held {n} running pods\n{}\n--- kubefake ---\n{}",
            server.output(),
            fake.log()
        )
    })
}

fn gone(fake: &KubeFake, pod: &str) -> bool {
    poll_until(POOL_WAIT, STEP, || {
        (fake
            .api_get(&format!("/api/v1/namespaces/default/pods/{pod}"))
            .0
            == 404)
            .then_some(())
    })
    .is_some()
}

/// A member: no connection, user or exposed label, no environment of a login, and the
/// agent's init container like every pod of ours.
fn assert_nothing_of_a_login(pod: &Value) {
    let labels = &pod["metadata"]["labels"];
    for key in [
        "containerssh_connection_id",
        "containerssh_username",
        "example.com/gh",
    ] {
        assert!(
            labels.get(key).is_none(),
            "{key} on a waiting member: {pod}"
        );
    }
    assert!(
        pod["metadata"]["annotations"]
            .get("containerssh_ip")
            .is_none(),
        "{pod}"
    );
    let env = &pod["spec"]["containers"][0]["env"];
    assert!(
        env.is_null() || env.as_array().is_some_and(Vec::is_empty),
        "{pod}"
    );
}

#[test]
fn a_member_serves_one_login_labelled_at_its_claim_and_the_pool_refills() {
    let env = TestEnv::new();
    let fake = KubeFake::start();
    let hook = WebhookServer::http();
    hook.set_default(
        "/pubkey",
        success("alice").metadata("GITHUB_LOGIN", "octo", false),
    );
    let server = env.start(&pooled_yaml(&env, &fake, &hook, 2));
    let before = full(&fake, &env, 2, &server);
    for pod in pods(&fake, &env, ",containerssh_pool%3D1") {
        assert_nothing_of_a_login(&pod);
    }

    // The login's pod is a member, labelled as the connection's and the user's at its claim;
    // the login's metadata reaches it as a variable through the agent.
    let mut held = env.hold_session(&server, "echo ready; sleep 120", || server.output());
    let claimed = poll_until(POOL_WAIT, STEP, || {
        let mine = pods(&fake, &env, ",containerssh_username%3Dalice");
        (mine.len() == 1).then(|| mine[0].clone())
    })
    .unwrap_or_else(|| panic!("no pod labelled for alice\n{}", server.output()));
    let claimed_name = name(&claimed);
    assert!(
        before.contains(&claimed_name),
        "{claimed_name} is not one of {before:?}"
    );
    let labels = &claimed["metadata"]["labels"];
    assert!(labels.get("containerssh_pool").is_none(), "{claimed}");
    assert_eq!(labels["example.com/gh"], "octo", "{claimed}");
    assert!(
        labels["containerssh_connection_id"].is_string(),
        "{claimed}"
    );
    assert_eq!(
        claimed["metadata"]["annotations"]["containerssh_ip"],
        "127.0.0.1"
    );
    assert!(
        server.output().contains("BACKEND_POOL_CLAIM"),
        "{}",
        server.output()
    );

    // A second login meanwhile takes the other member; the pool refills behind both.
    let out = run_with_timeout(
        env.ssh(&server, "alice")
            .arg("printf '%s %s' \"$GH_LOGIN\" \"$(cat /etc/hostname)\""),
        None,
        CMD_TIMEOUT,
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", server.output());
    let (gh, host) = text.split_once(' ').unwrap_or_default();
    assert_eq!(gh, "octo", "{text}");
    assert!(
        before.iter().any(|m| m == host),
        "{host} is not one of {before:?}"
    );
    assert_ne!(host, claimed_name);
    assert!(gone(&fake, host), "the second login's pod was not deleted");

    let _ = held.kill();
    let _ = held.wait();
    assert!(
        gone(&fake, &claimed_name),
        "the held login's pod was not deleted"
    );
    let after = full(&fake, &env, 2, &server);
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "{after:?} reuses {before:?}"
    );
}

#[test]
fn a_member_that_died_is_skipped_and_the_login_starts_its_own() {
    let env = TestEnv::new();
    let fake = KubeFake::start();
    let hook = WebhookServer::http();
    hook.set_default("/pubkey", success("alice"));
    let server = env.start(&pooled_yaml(&env, &fake, &hook, 1));
    let members = full(&fake, &env, 1, &server);
    // Its running container dies under it (OOM, a node problem): the pod fails.
    let running = run_with_timeout(
        Command::new("docker").args([
            "ps",
            "-q",
            "--filter",
            &format!("label=kubefake={}", fake.prefix),
            "--filter",
            &format!("label=kubefake.pod={}", members[0]),
        ]),
        None,
        CMD_TIMEOUT,
    );
    let running = String::from_utf8_lossy(&running.stdout).trim().to_string();
    assert_eq!(running.lines().count(), 1, "{running:?}");
    let killed = run_with_timeout(
        Command::new("docker").args(["kill", &running]),
        None,
        CMD_TIMEOUT,
    );
    assert!(killed.status.success(), "{killed:?}");
    poll_until(POOL_WAIT, STEP, || {
        let (_, pod) = fake.api_get(&format!("/api/v1/namespaces/default/pods/{}", members[0]));
        (pod["status"]["phase"] != "Running").then_some(())
    })
    .expect("the killed member's pod never left Running");
    let out = run_with_timeout(
        env.ssh(&server, "alice").arg("cat /etc/hostname"),
        None,
        CMD_TIMEOUT,
    );
    let host = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert_eq!(out.status.code(), Some(0), "{host}\n{}", server.output());
    assert_ne!(host, members[0], "the dead member served a login");
    assert!(gone(&fake, &members[0]), "the dead member was not removed");
}

#[test]
fn a_killed_server_s_members_are_reaped_at_its_next_start() {
    let env = TestEnv::new();
    let fake = KubeFake::start();
    let hook = WebhookServer::http();
    hook.set_default("/pubkey", success("alice"));
    let yaml = pooled_yaml(&env, &fake, &hook, 2);
    let mut first = env.start(&yaml);
    let old = full(&fake, &env, 2, &first);
    first.kill9();
    let second = env.start(&yaml);
    for pod in &old {
        assert!(gone(&fake, pod), "{pod} survived\n{}", second.output());
    }
    let new = full(&fake, &env, 2, &second);
    assert!(new.iter().all(|p| !old.contains(p)));
}
