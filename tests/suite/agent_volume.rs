//! The agent reaches fresh Docker containers through one read-only volume per agent build
//! (`containerssh-agent-<digest>`, mounted at `/.containerssh`), filled once, instead of an
//! upload into every container between its create and its start.

use crate::support;

use std::process::Command;
use std::time::Duration;

use support::{run_with_timeout, TestEnv};

const CMD_TIMEOUT: Duration = Duration::from_secs(90);

fn agent_volumes() -> Vec<String> {
    let out = run_with_timeout(
        Command::new("docker").args([
            "volume",
            "ls",
            "-q",
            "--filter",
            "label=containerssh_agent=1",
        ]),
        None,
        CMD_TIMEOUT,
    );
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn the_agent_reaches_containers_through_one_read_only_volume() {
    let env = TestEnv::new();
    let server = env.start(&env.config_yaml("connection"));
    let probe = "grep ' /.containerssh ' /proc/mounts; ls /.containerssh; \
                 touch /.containerssh/x 2>&1 || echo refused";
    for _ in 0..2 {
        let out = run_with_timeout(env.ssh(&server, "alice").arg(probe), None, CMD_TIMEOUT);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(out.status.code(), Some(0), "{text}\n{}", server.output());
        let mount = text.lines().next().unwrap_or_default();
        assert!(
            mount
                .split_whitespace()
                .nth(3)
                .unwrap_or("")
                .starts_with("ro"),
            "mounted read-only: {text}"
        );
        assert!(text.contains("containerssh-agent\nready\n"), "{text}");
        assert!(
            text.contains("Read-only file system") && text.contains("refused"),
            "{text}"
        );
    }
    // Filled (or found filled) once by this server, however many containers it starts.
    let output = server.output();
    assert_eq!(
        output.matches("code=\"BACKEND_AGENT_VOLUME\"").count(),
        1,
        "{output}"
    );
    let volume = output
        .split("volume=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_default()
        .trim_matches('"')
        .to_string();
    assert!(
        volume.starts_with("containerssh-agent-")
            && volume.len() == "containerssh-agent-".len() + 16,
        "{volume:?}"
    );
    assert!(agent_volumes().contains(&volume), "{:?}", agent_volumes());
    // The agent is in use (its console runs every program): a terminal session works.
    let out = env.ssh_tty_stdin_at_eof(&server, "tty >/dev/null && echo has-a-terminal");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("has-a-terminal"),
        "{}",
        server.output()
    );
}

/// A container with a read-only root file system: no upload could place the agent, the volume
/// does (before, every login failed: "cannot copy the agent into the container").
#[test]
fn a_read_only_root_file_system_still_gets_the_agent() {
    let env = TestEnv::new();
    let yaml = env.config_yaml("connection").replace(
        "    mode: \"connection\"\n",
        "    host:\n      ReadonlyRootfs: true\n    mode: \"connection\"\n",
    );
    assert!(yaml.contains("ReadonlyRootfs"));
    let server = env.start(&yaml);
    let out = run_with_timeout(
        env.ssh(&server, "alice")
            .arg("touch /probe 2>&1; echo agent-at-$(ls /.containerssh/containerssh-agent)"),
        None,
        CMD_TIMEOUT,
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(0), "{text}\n{}", server.output());
    assert!(text.contains("Read-only file system"), "{text}");
    assert!(
        text.contains("agent-at-/.containerssh/containerssh-agent"),
        "{text}"
    );
}
