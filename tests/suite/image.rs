//! The server image as it ships: the FROM scratch image of deploy/docker/Dockerfile.scratch
//! with the static-pie binaries of scripts/build-static.sh, run as a container that talks to
//! the host's engine through its socket, as non-root (65532) with the socket's group.
//!
//! Needs (tests/run.sh builds and exports both):
//! - `CONTAINERSSH_TEST_SERVER_IMAGE`: the image (`bash deploy/docker/build-scratch.sh`),
//! - `CONTAINERSSH_TEST_STATIC_SERVER`: the static server binary in it.
//!
//! Every container a test starts is removed by a guard, also when the test fails: the server
//! container by [`Container`], the login containers (labelled with the environment's
//! `instanceId`) by [`TestEnv`].

use crate::support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{poll_until, random_hex, run_with_timeout, test_image, TestEnv};

/// The user the image runs as (distroless's `nonroot`).
const IMAGE_UID: u32 = 65532;
/// How long the server container may take to say `listening on`.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const DOCKER_SOCKET: &str = "/var/run/docker.sock";

fn required_env(name: &str, how: &str) -> String {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v.trim().to_string(),
        _ => panic!("{name} is not set: {how} (bash tests/run.sh builds and exports it)"),
    }
}

fn server_image() -> String {
    required_env(
        "CONTAINERSSH_TEST_SERVER_IMAGE",
        "set it to the image `bash deploy/docker/build-scratch.sh` prints last",
    )
}

/// Runs `docker args` (60 s deadline) and returns stdout; panics with the output on failure.
fn docker(args: &[&str]) -> String {
    let out = run_with_timeout(
        Command::new("docker").args(args),
        None,
        Duration::from_secs(60),
    );
    assert!(
        out.status.success(),
        "docker {args:?} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The group of the host's Docker socket, which the server container gets with `--group-add`.
fn socket_gid() -> u32 {
    std::fs::metadata(DOCKER_SOCKET)
        .unwrap_or_else(|e| {
            panic!("stat {DOCKER_SOCKET}: {e} (the tests need the engine's socket)")
        })
        .gid()
}

/// A container started by a test; dropping it removes it (`docker rm -f -v`), never panicking.
struct Container {
    name: String,
}

impl Container {
    /// `docker run -d --name <name> <args>`; the guard exists before the run, so a container
    /// that was created although `docker run` reported an error is removed too.
    fn run(args: &[&str]) -> Container {
        let c = Container {
            name: format!("containerssh-image-test-{}", random_hex(6)),
        };
        let mut full = vec![
            "run",
            "-d",
            "--name",
            &c.name,
            "--label",
            "containerssh_test=1",
        ];
        full.extend_from_slice(args);
        docker(&full);
        c
    }

    fn logs(&self) -> String {
        let out = run_with_timeout(
            Command::new("docker").args(["logs", &self.name]),
            None,
            Duration::from_secs(30),
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    fn inspect(&self, format: &str) -> String {
        docker(&["inspect", "-f", format, &self.name])
            .trim()
            .to_string()
    }

    /// Waits until the log says `listening on`; panics with the log when the container stops
    /// or the deadline passes first. The log gives no event to wait on: a bounded poll.
    fn wait_listening(&self) {
        let found = poll_until(START_TIMEOUT, Duration::from_millis(100), || {
            if self.logs().contains("listening on ") {
                return Some(true);
            }
            (self.inspect("{{.State.Running}}") != "true").then_some(false)
        });
        match found {
            Some(true) => {}
            _ => panic!(
                "the server container did not report `listening on` within {START_TIMEOUT:?} \
                 (state: {})\n--- logs ---\n{}",
                self.inspect("{{.State.Status}} exit={{.State.ExitCode}}"),
                self.logs()
            ),
        }
    }

    /// The host port published for the container's 2222/tcp.
    fn host_port(&self) -> u16 {
        let out = docker(&["port", &self.name, "2222/tcp"]);
        let first = out.lines().next().unwrap_or("").trim();
        first
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or_else(|| panic!("cannot read the host port from `docker port`: {out:?}"))
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", "-v", &self.name])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Writes `<env>/image-config/`, mounted at /etc/containerssh (over the image's default
/// config): `config.yaml` with the given `sandbox` block, the environment's host key (owned by
/// `run_as`, 0600) and `keys/alice` with its client key. Everything else is world-readable.
fn write_config_dir(env: &TestEnv, run_as: u32, sandbox: &str) -> PathBuf {
    let dir = env.path().join("image-config");
    let keys = dir.join("keys");
    std::fs::create_dir_all(&keys).expect("create the config dir");
    std::fs::write(keys.join("alice"), format!("{}\n", env.client_pubkey))
        .expect("write authorized keys");
    let host_key = dir.join("host_ed25519");
    std::fs::copy(&env.host_key, &host_key).expect("copy the host key");
    std::os::unix::fs::chown(&host_key, Some(run_as), Some(run_as)).expect("chown the host key");
    std::fs::set_permissions(&host_key, std::fs::Permissions::from_mode(0o600))
        .expect("chmod the host key");
    let config = format!(
        r#"ssh:
  listen: 0.0.0.0:2222
  hostkeys:
    - /etc/containerssh/host_ed25519
auth:
  publicKey:
    method: authorizedKeys
    authorizedKeys:
      path: /etc/containerssh/keys/%u
backend: docker
docker:
  connection:
    host: unix://{DOCKER_SOCKET}
  execution:
    container:
      image: "{image}"
      user: "4242"
      labels:
        containerssh_test: "1"
    mode: connection
    imagePullPolicy: Never
    shellCommand: ["/bin/sh"]
log:
  level: debug
  format: text
instanceId: "{instance}"
stateDirectory: /var/lib/containerssh
{sandbox}
"#,
        image = test_image(),
        instance = env.instance,
    );
    std::fs::write(dir.join("config.yaml"), config).expect("write config.yaml");
    for d in [&dir, &keys] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    }
    dir
}

/// `docker run` arguments for the server container: as `user:user` plus the socket's group,
/// the socket and the config directory mounted, 2222 published on a random loopback port.
fn server_args<'a>(user: &'a str, gid: &'a str, config: &'a str, image: &'a str) -> Vec<&'a str> {
    vec![
        "--user",
        user,
        "--group-add",
        gid,
        "-v",
        "/var/run/docker.sock:/var/run/docker.sock",
        "-v",
        config,
        "-p",
        "127.0.0.1::2222",
        image,
    ]
}

/// An OpenSSH client config for the published port: key-only, non-interactive, the host key
/// accepted on first use into `<env>/known_hosts`, nothing from ~/.ssh or an agent.
fn ssh_command(env: &TestEnv, port: u16) -> Command {
    let path = env.path().join(format!("ssh_config-image-{port}"));
    std::fs::write(
        &path,
        format!(
            "Host *\n  HostName 127.0.0.1\n  Port {port}\n  BatchMode yes\n  IdentitiesOnly yes\n  \
             IdentityFile {key}\n  IdentityAgent none\n  UserKnownHostsFile {known_hosts}\n  \
             GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking accept-new\n  \
             CheckHostIP no\n  UpdateHostKeys no\n  LogLevel ERROR\n  ConnectTimeout 10\n  \
             ControlMaster no\n  ControlPath none\n",
            key = env.client_key.display(),
            known_hosts = env.known_hosts.display(),
        ),
    )
    .expect("write the ssh config");
    let mut cmd = Command::new("ssh");
    cmd.env_remove("SSH_AUTH_SOCK")
        .arg("-F")
        .arg(&path)
        .arg("alice@127.0.0.1");
    cmd
}

/// The whitespace-separated values of `Key:` in a /proc status file.
fn status_field<'a>(status: &'a str, key: &str) -> Vec<&'a str> {
    let prefix = format!("{key}:");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no `{key}:` line in\n{status}"))
        .split_whitespace()
        .collect()
}

fn read_status(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

#[test]
fn static_server_binary_is_static_pie() {
    let server = required_env(
        "CONTAINERSSH_TEST_STATIC_SERVER",
        "set it to the server binary `bash scripts/build-static.sh` builds",
    );
    let out = run_with_timeout(
        Command::new("file").arg("-b").arg(&server),
        None,
        Duration::from_secs(30),
    );
    assert!(
        out.status.success(),
        "file {server} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let what = String::from_utf8_lossy(&out.stdout);
    assert!(
        what.contains("static-pie linked"),
        "{server} is not a static-pie executable; file says: {what}"
    );
}

#[test]
fn scratch_image_serves_a_login_as_nonroot_sandboxed() {
    let image = server_image();
    let env = TestEnv::new();
    let gid = socket_gid();
    let config_dir = write_config_dir(
        &env,
        IMAGE_UID,
        &format!(
            "sandbox:\n  user: {IMAGE_UID}\n  group: {IMAGE_UID}\n  supplementaryGroups: [{gid}]"
        ),
    );
    let user = format!("{IMAGE_UID}:{IMAGE_UID}");
    let gid_s = gid.to_string();
    let mount = format!("{}:/etc/containerssh:ro", config_dir.display());
    let server = Container::run(&server_args(&user, &gid_s, &mount, &image));
    server.wait_listening();
    let port = server.host_port();

    // A real OpenSSH login, served from the image, runs in a container of the test image
    // (as the configured user, which the host's `id -u` would not print).
    let out = run_with_timeout(
        ssh_command(&env, port).arg("echo hello; id -u"),
        None,
        Duration::from_secs(60),
    );
    let describe = || {
        format!(
            "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- server logs ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            server.logs()
        )
    };
    assert_eq!(out.status.code(), Some(0), "{}", describe());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello\n4242\n",
        "{}",
        describe()
    );

    // The server process, as the host sees it: non-root, the socket's group, no capabilities,
    // no_new_privs, and the seccomp filter on every thread (also those that served the login).
    let pid = server.inspect("{{.State.Pid}}");
    assert!(
        pid.parse::<u32>().is_ok_and(|p| p > 0),
        "server container has no pid ({pid}); logs:\n{}",
        server.logs()
    );
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let status = read_status(&proc_dir.join("status"));
    let id = IMAGE_UID.to_string();
    assert_eq!(status_field(&status, "Uid"), [id.as_str(); 4], "{status}");
    assert_eq!(status_field(&status, "Gid"), [id.as_str(); 4], "{status}");
    assert!(
        status_field(&status, "Groups").contains(&gid_s.as_str()),
        "the socket's group {gid} is not among the server's groups:\n{status}"
    );
    for cap in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        assert_eq!(
            status_field(&status, cap),
            ["0000000000000000"],
            "{cap}:\n{status}"
        );
    }
    assert_eq!(status_field(&status, "NoNewPrivs"), ["1"], "{status}");
    let tasks: Vec<PathBuf> = std::fs::read_dir(proc_dir.join("task"))
        .expect("read /proc/<pid>/task")
        .map(|e| e.expect("task entry").path())
        .collect();
    assert!(!tasks.is_empty(), "no threads under {}", proc_dir.display());
    for task in &tasks {
        let status = read_status(&task.join("status"));
        assert_eq!(
            status_field(&status, "Seccomp"),
            ["2"],
            "thread {} has no seccomp filter:\n{status}",
            task.display()
        );
    }

    // The client has gone: the login container goes too.
    assert!(
        env.wait_no_containers(Duration::from_secs(30)),
        "the login container is still there 30 s after the client left: {:?}\n--- server logs ---\n{}",
        env.containers(),
        server.logs()
    );
    assert_eq!(
        server.inspect("{{.State.Running}}"),
        "true",
        "the server stopped: {}",
        server.logs()
    );
}

#[test]
fn scratch_image_refuses_to_run_as_another_user_than_configured() {
    let image = server_image();
    let env = TestEnv::new();
    let gid = socket_gid();
    let other = IMAGE_UID + 1;
    let config_dir = write_config_dir(
        &env,
        other,
        &format!("sandbox:\n  user: {IMAGE_UID}\n  group: {IMAGE_UID}"),
    );
    let user = format!("{other}:{other}");
    let gid_s = gid.to_string();
    let mount = format!("{}:/etc/containerssh:ro", config_dir.display());
    let server = Container::run(&server_args(&user, &gid_s, &mount, &image));

    // `docker wait` blocks until the container stops and prints its exit code.
    let out = run_with_timeout(
        Command::new("docker").args(["wait", &server.name]),
        None,
        START_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "docker wait failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let code = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let logs = server.logs();
    assert!(
        code.parse::<i32>().is_ok_and(|c| c != 0),
        "the server ran as {user} although its config says user {IMAGE_UID}: exit code {code:?}\n{logs}"
    );
    assert!(
        logs.contains("sandbox.user"),
        "the refusal does not name sandbox.user:\n{logs}"
    );
    assert!(env.containers().is_empty(), "a login container was started");
}
