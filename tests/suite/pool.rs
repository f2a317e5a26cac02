//! The warm pool (`docker.execution.pool`) against the real engine: each member serves one
//! login and is removed after it, the pool refills, a member that died is skipped, and a
//! killed server's members are reaped at its next start.

use crate::support;

use std::process::Command;
use std::time::Duration;

use support::{poll_until, run_with_timeout, TestEnv, TestServer};

const CMD_TIMEOUT: Duration = Duration::from_secs(90);
const POOL_WAIT: Duration = Duration::from_secs(60);

fn with_pool(env: &TestEnv, size: u32) -> String {
    let yaml = env.config_yaml("connection").replace(
        "    mode: \"connection\"\n",
        &format!("    mode: \"connection\"\n    pool:\n      size: {size}\n"),
    );
    assert!(yaml.contains("pool:"), "{yaml}");
    yaml
}

/// Running pool members of this environment's instance (full ids).
fn members(env: &TestEnv) -> Vec<String> {
    let out = run_with_timeout(
        Command::new("docker").args([
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            "label=containerssh_pool=1",
            "--filter",
            &format!("label=containerssh_instance={}", env.instance),
        ]),
        None,
        CMD_TIMEOUT,
    );
    assert!(out.status.success());
    let mut ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    ids.sort();
    ids
}

/// Waits (bounded) for exactly `n` running members.
fn full(env: &TestEnv, n: usize, server: &TestServer) -> Vec<String> {
    poll_until(POOL_WAIT, Duration::from_millis(100), || {
        let m = members(env);
        (m.len() == n).then_some(m)
    })
    .unwrap_or_else(|| {
        panic!(
            "the pool never held {n} members: {:?}\n{}",
            members(env),
            server.output()
        )
    })
}

/// The container a login's program runs in (its hostname is the id's first 12 characters).
fn login_container(env: &TestEnv, server: &TestServer) -> String {
    let out = run_with_timeout(
        env.ssh_opts(server)
            .env("LC_POOL_PROBE", "after-the-claim")
            .args(["-o", "SendEnv=LC_POOL_PROBE"])
            .arg(env.destination("alice"))
            .arg("printf '%s %s' \"$(cat /etc/hostname)\" \"$LC_POOL_PROBE\""),
        None,
        CMD_TIMEOUT,
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", server.output());
    let (host, probe) = text.split_once(' ').unwrap_or_default();
    // The login's own environment reaches a member claimed before it was known.
    assert_eq!(probe, "after-the-claim", "{text}");
    host.to_string()
}

fn gone(id: &str) -> bool {
    let out = run_with_timeout(
        Command::new("docker").args(["ps", "-aq", "--no-trunc", "--filter", &format!("id={id}")]),
        None,
        CMD_TIMEOUT,
    );
    out.status.success() && out.stdout.is_empty()
}

#[test]
fn each_member_serves_one_login_is_removed_after_it_and_the_pool_refills() {
    let env = TestEnv::new();
    let port = support::free_tcp_port();
    let server = env.start(&format!(
        "{}metrics:\n  enable: true\n  listen: 127.0.0.1:{port}\n",
        with_pool(&env, 2)
    ));
    let before = full(&env, 2, &server);
    let host = login_container(&env, &server);
    let used = before
        .iter()
        .find(|id| id.starts_with(&host))
        .unwrap_or_else(|| {
            panic!(
                "{host} is not a pool member: {before:?}\n{}",
                server.output()
            )
        })
        .clone();
    assert!(server.output().contains("BACKEND_POOL_CLAIM"));
    // Removed with its connection, never returned; the pool is back to two, the unused
    // member still among them.
    let removed = poll_until(POOL_WAIT, Duration::from_millis(100), || {
        gone(&used).then_some(())
    });
    assert!(removed.is_some(), "{}", server.output());
    let after = poll_until(POOL_WAIT, Duration::from_millis(100), || {
        let m = members(&env);
        (m.len() == 2 && !m.contains(&used)).then_some(m)
    })
    .unwrap_or_else(|| panic!("{:?}\n{}", members(&env), server.output()));
    let unused = before.iter().find(|id| **id != used).unwrap();
    assert!(after.contains(unused), "{after:?} {before:?}");
    // The next login takes another member (never the used one).
    let next = login_container(&env, &server);
    assert!(!used.starts_with(&next));
    // Operators see both claims and the refilled pool.
    let seen = poll_until(POOL_WAIT, Duration::from_millis(100), || {
        let claimed =
            support::metric_line(port, "containerssh_pool_logins_total{result=\"claimed\"}")?;
        let ready = support::metric_line(port, "containerssh_pool_ready_containers ")?;
        (claimed.ends_with(" 2") && ready.ends_with(" 2")).then_some(())
    });
    assert!(
        seen.is_some(),
        "{:?} {:?}",
        support::metric_line(port, "containerssh_pool_logins_total"),
        support::metric_line(port, "containerssh_pool_ready_containers")
    );
}

#[test]
fn a_member_that_died_is_skipped_and_the_login_starts_its_own() {
    let env = TestEnv::new();
    let server = env.start(&with_pool(&env, 1));
    let member = full(&env, 1, &server).remove(0);
    let killed = run_with_timeout(
        Command::new("docker").args(["kill", &member]),
        None,
        CMD_TIMEOUT,
    );
    assert!(killed.status.success());
    let host = login_container(&env, &server);
    assert!(
        !member.starts_with(&host),
        "the dead member served the login"
    );
    assert!(
        server.output().contains("BACKEND_POOL_MEMBER_DEAD"),
        "{}",
        server.output()
    );
    let removed = poll_until(POOL_WAIT, Duration::from_millis(100), || {
        gone(&member).then_some(())
    });
    assert!(removed.is_some(), "{}", server.output());
}

#[test]
fn a_killed_server_s_members_are_reaped_at_its_next_start() {
    let env = TestEnv::new();
    let yaml = with_pool(&env, 2);
    let mut first = env.start(&yaml);
    let old = full(&env, 2, &first);
    first.kill9();
    let second = env.start(&yaml);
    let reaped = poll_until(POOL_WAIT, Duration::from_millis(100), || {
        old.iter().all(|id| gone(id)).then_some(())
    });
    assert!(reaped.is_some(), "{:?}\n{}", members(&env), second.output());
    let new = full(&env, 2, &second);
    assert!(new.iter().all(|id| !old.contains(id)));
}
