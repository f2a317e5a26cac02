//! The in-container agent (`containerssh-agent`), built static and run inside real containers:
//! the test image (busybox) with the agent bind-mounted read-only, and an image that holds
//! nothing but the agent.

use crate::support;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use support::{random_hex, run_with_timeout, static_agent, test_image};

/// Bound for each docker command.
const DOCKER_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound for waits on state inside a container (a reaped zombie, output from a program).
const STATE_TIMEOUT: Duration = Duration::from_secs(20);
/// Where the agent is mounted in containers.
const AGENT: &str = "/cssh/agent";

fn docker(args: &[&str], stdin: Option<&[u8]>) -> Output {
    run_with_timeout(Command::new("docker").args(args), stdin, DOCKER_TIMEOUT)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn mount() -> String {
    format!("{}:{AGENT}:ro", static_agent().display())
}

/// `docker run --rm` of the test image with the agent mounted; `flags` go before the image.
fn run(flags: &[&str], cmd: &[&str], stdin: Option<&[u8]>) -> Output {
    let mount = mount();
    let image = test_image();
    let mut args = vec![
        "run",
        "--rm",
        "--network",
        "none",
        "--label",
        "containerssh_test=1",
    ];
    args.extend(["-v", &mount]);
    args.extend(flags);
    args.push(&image);
    args.extend(cmd);
    docker(&args, stdin)
}

/// Splits `--pid` output into the reported PID and the rest.
fn split_pid(out: &[u8]) -> (u32, &[u8]) {
    assert!(out.len() >= 4, "no PID report in {out:?}");
    (u32::from_le_bytes(out[..4].try_into().unwrap()), &out[4..])
}

/// A detached container removed on drop.
struct Container {
    id: String,
}

impl Container {
    /// The test image with the agent mounted.
    fn start(cmd: &[&str]) -> Container {
        let mount = mount();
        Container::run(&["-v", &mount, &test_image()], cmd)
    }

    /// An image that carries the agent itself.
    fn start_image(image: &str, cmd: &[&str]) -> Container {
        Container::run(&[image], cmd)
    }

    fn run(flags_and_image: &[&str], cmd: &[&str]) -> Container {
        let mut args = vec![
            "run",
            "-d",
            "--network",
            "none",
            "--label",
            "containerssh_test=1",
        ];
        args.extend(flags_and_image);
        args.extend(cmd);
        let out = docker(&args, None);
        assert!(out.status.success(), "docker run -d: {}", text(&out.stderr));
        Container {
            id: text(&out.stdout).trim().to_string(),
        }
    }

    fn exec(&self, cmd: &[&str]) -> Output {
        let mut args = vec!["exec", self.id.as_str()];
        args.extend(cmd);
        docker(&args, None)
    }

    /// `docker exec` left running, stdout piped.
    fn spawn_exec(&self, cmd: &[&str]) -> Child {
        Command::new("docker")
            .args(["exec", &self.id])
            .args(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn docker exec")
    }

    /// `/proc/<pid>/status` fields `State` and `PPid` inside the container, `None` once gone.
    fn proc_state(&self, pid: u32) -> Option<(String, String)> {
        let out = self.exec(&["cat", &format!("/proc/{pid}/status")]);
        if !out.status.success() {
            return None;
        }
        let status = text(&out.stdout);
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        Some((field("State:"), field("PPid:")))
    }

    /// Waits (bounded) until `pred` holds for the state of `pid`; returns the last state.
    fn wait_state(
        &self,
        pid: u32,
        pred: impl Fn(&Option<(String, String)>) -> bool,
    ) -> Option<(String, String)> {
        let deadline = Instant::now() + STATE_TIMEOUT;
        loop {
            let state = self.proc_state(pid);
            if pred(&state) || Instant::now() > deadline {
                return state;
            }
            thread::yield_now();
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Reads `n` bytes from a child's stdout, within [`STATE_TIMEOUT`].
fn read_prefix(mut stdout: ChildStdout, n: usize) -> (Vec<u8>, ChildStdout) {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut prefix = vec![0u8; n];
        let res = stdout.read_exact(&mut prefix);
        let _ = tx.send(res.map(|()| (prefix, stdout)));
    });
    rx.recv_timeout(STATE_TIMEOUT)
        .expect("timed out reading the program's first output")
        .expect("read the program's first output")
}

/// Reads `n` bytes then one line from a child's stdout, within [`STATE_TIMEOUT`].
fn read_prefix_and_line(stdout: ChildStdout, n: usize) -> (Vec<u8>, String, ChildStdout) {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut prefix = vec![0u8; n];
        let res = r.read_exact(&mut prefix).and_then(|()| {
            let mut line = String::new();
            r.read_line(&mut line).map(|_| line)
        });
        // The BufReader holds nothing more: the program writes one line and waits.
        let _ = tx.send(res.map(|line| (prefix, line, r.into_inner())));
    });
    rx.recv_timeout(STATE_TIMEOUT)
        .expect("timed out reading the program's first output")
        .expect("read the program's first output")
}

/// Waits for a spawned child within [`STATE_TIMEOUT`]; returns its exit code and the rest of its
/// stdout.
fn finish(mut child: Child, mut rest: ChildStdout) -> (Option<i32>, String) {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut out = String::new();
        let _ = rest.read_to_string(&mut out);
        let status = child.wait().expect("wait for docker exec");
        let _ = tx.send((status.code(), out));
    });
    rx.recv_timeout(STATE_TIMEOUT)
        .expect("the program did not end in time")
}

#[test]
fn binary_is_static() {
    let bytes = std::fs::read(static_agent()).expect("read the agent");
    assert_eq!(&bytes[..4], b"\x7fELF");
    assert_eq!(bytes[4], 2, "64-bit ELF");
    let u16_at = |o: usize| u16::from_le_bytes(bytes[o..o + 2].try_into().unwrap()) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
    let phoff = u64::from_le_bytes(bytes[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    const PT_INTERP: u32 = 3;
    let types: Vec<u32> = (0..phnum).map(|i| u32_at(phoff + i * phentsize)).collect();
    // No program interpreter = no dynamic loader, no libc needed in the image (a static-pie
    // still has a PT_DYNAMIC for its own relocations).
    assert!(
        !types.contains(&PT_INTERP),
        "the agent asks for a dynamic loader"
    );
    eprintln!("static agent: {} bytes", bytes.len());
}

#[test]
fn console_reports_the_pid_before_any_output() {
    let out = run(
        &[],
        &[AGENT, "console", "--pid", "--", "/bin/sh", "-c", "echo $$"],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (pid, rest) = split_pid(&out.stdout);
    assert_eq!(text(rest), format!("{pid}\n"));
}

#[test]
fn console_applies_env_and_passes_exit_codes() {
    let out = run(
        &[],
        &[
            AGENT,
            "console",
            "--env",
            "A=1",
            "--env",
            "B=x y=z",
            "--",
            "/bin/sh",
            "-c",
            "echo \"$A|$B\"; exit 3",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "1|x y=z\n");
}

#[test]
fn console_wait_consumes_exactly_the_start_byte() {
    let out = run(
        &["-i"],
        &[AGENT, "console", "--wait", "--", "/bin/cat"],
        Some(b"Xrest"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "rest");
}

#[test]
fn console_sizes_the_terminal_and_keeps_pid_bytes_raw_on_a_tty() {
    // Fork until the last child got PID 9, so the program's PID in this fresh namespace is
    // 10 = 0x0a, the byte a terminal's ONLCR would turn into 0x0d 0x0a.
    let script = format!(
        "i=0; while [ $i -lt 100 ]; do p=$(/bin/sh -c 'echo $$'); [ $p -ge 9 ] && break; \
         i=$((i+1)); done; \
         exec {AGENT} console --pid --rows 33 --cols 101 -- /bin/sh -c 'echo $$; stty size'"
    );
    let out = run(&["-t"], &["/bin/sh", "-c", &script], None);
    assert!(out.status.success(), "{}", text(&out.stdout));
    let (pid, rest) = split_pid(&out.stdout);
    assert_eq!(
        pid, 10,
        "the PID this test arranges; output {:?}",
        out.stdout
    );
    assert_eq!(text(rest), "10\r\n33 101\r\n");
}

#[test]
fn signal_reaches_a_trap_and_death_by_signal_is_recorded() {
    let c = Container::start(&[AGENT, "wait-signal"]);
    // Starts `script` under `console --pid` and returns once it printed "ready".
    let start = |script: &str| {
        let mut child = c.spawn_exec(&[AGENT, "console", "--pid", "--", "/bin/sh", "-c", script]);
        let (prefix, line, rest) = read_prefix_and_line(child.stdout.take().unwrap(), 4);
        assert_eq!(line, "ready\n");
        (child, split_pid(&prefix).0.to_string(), rest)
    };
    let signal = |pid: &str, name: &str| c.exec(&[AGENT, "signal", "--pid", pid, "--signal", name]);

    let (trapped, pid, rest) =
        start("trap 'echo got; exit 5' USR1; echo ready; while :; do sleep 0.1; done");
    let sent = signal(&pid, "USR1");
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    assert_eq!(finish(trapped, rest), (Some(5), "got\n".to_string()));
    let info = c.exec(&[AGENT, "exit-info", "--pid", &pid]);
    assert_eq!(text(&info.stdout), "", "a normal exit leaves no record");

    let (killed, pid, rest) = start("echo ready; while :; do sleep 0.1; done");
    let sent = signal(&pid, "TERM");
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    assert_eq!(finish(killed, rest).0, Some(143));
    let info = c.exec(&[AGENT, "exit-info", "--pid", &pid]);
    assert!(info.status.success(), "{}", text(&info.stderr));
    assert_eq!(text(&info.stdout), "TERM\n");
    let again = c.exec(&[AGENT, "exit-info", "--pid", &pid]);
    assert_eq!(text(&again.stdout), "", "exit-info removes the record");

    let gone = signal(&pid, "TERM");
    assert_eq!(gone.status.code(), Some(1));
    assert!(
        text(&gone.stderr).contains("cannot send TERM"),
        "{}",
        text(&gone.stderr)
    );
}

#[test]
fn console_as_pid_1_forwards_signals_to_the_program() {
    let name = format!("containerssh-test-agent-{}", random_hex(6));
    let mount = mount();
    let image = test_image();
    let mut child = Command::new("docker")
        .args([
            "run",
            "--rm",
            "-i",
            "--network",
            "none",
            "--label",
            "containerssh_test=1",
        ])
        .args(["--name", &name, "-v", &mount, &image])
        .args([AGENT, "console", "--pid", "--", "/bin/sh", "-c"])
        .arg("trap 'echo term; exit 7' TERM; echo ready; while :; do sleep 0.1; done")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("docker run");
    let (_, line, rest) = read_prefix_and_line(child.stdout.take().unwrap(), 4);
    assert_eq!(line, "ready\n");
    let kill = docker(&["kill", "-s", "TERM", &name], None);
    assert!(kill.status.success(), "{}", text(&kill.stderr));
    let result = finish(child, rest);
    let _ = docker(&["rm", "-f", &name], None);
    assert_eq!(result, (Some(7), "term\n".to_string()));
}

#[test]
fn wait_signal_as_pid_1_reaps_orphans_and_exits_on_term() {
    reaps_orphans(&[AGENT, "wait-signal"], true);
}

#[test]
fn without_the_agent_an_orphan_stays_a_zombie() {
    // The control for the test above: busybox sleep as PID 1 never reaps.
    reaps_orphans(&["/bin/sleep", "1000"], false);
}

fn reaps_orphans(init: &[&str], reaps: bool) {
    let c = Container::start(init);
    // An orphan (its parent shell exits at once) that blocks on a FIFO until we release it.
    let out = c.exec(&[
        "/bin/sh",
        "-c",
        "mkfifo /tmp/go && /bin/sh -c 'read x </tmp/go' </dev/null >/dev/null 2>&1 & echo $!",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let pid: u32 = text(&out.stdout).trim().parse().expect("orphan pid");
    let state = c.wait_state(pid, |s| matches!(s, Some((_, ppid)) if ppid == "1"));
    assert!(
        matches!(&state, Some((st, ppid)) if ppid == "1" && st.starts_with('S')),
        "the orphan should sleep as a child of PID 1: {state:?}"
    );
    let released = c.exec(&["/bin/sh", "-c", "echo go >/tmp/go"]);
    assert!(released.status.success(), "{}", text(&released.stderr));
    if reaps {
        let state = c.wait_state(pid, Option::is_none);
        assert_eq!(state, None, "PID 1 left the orphan unreaped");
        let kill = docker(&["kill", "-s", "TERM", &c.id], None);
        assert!(kill.status.success(), "{}", text(&kill.stderr));
        let wait = docker(&["wait", &c.id], None);
        assert_eq!(
            text(&wait.stdout).trim(),
            "0",
            "wait-signal exits 0 on TERM"
        );
    } else {
        let state = c.wait_state(pid, |s| matches!(s, Some((st, _)) if st.starts_with('Z')));
        assert!(
            matches!(&state, Some((st, _)) if st.starts_with('Z')),
            "expected a zombie: {state:?}"
        );
    }
}

#[test]
fn write_file_is_atomic_bounded_and_sets_the_mode() {
    let script = format!(
        "{AGENT} write-file /tmp/out --mode 0640 && stat -c '%a %s' /tmp/out && cat /tmp/out"
    );
    let out = run(&["-i"], &["/bin/sh", "-c", &script], Some(b"hello\n"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "640 6\nhello\n");

    let out = run(
        &["-i"],
        &[AGENT, "write-file", "/nonexistent/dir/f"],
        Some(b"x"),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("parent directory does not exist"),
        "{}",
        text(&out.stderr)
    );

    let big = vec![b'a'; 16 * 1024 * 1024 + 1];
    let script = format!("{AGENT} write-file /tmp/big; echo rc=$?; ls -a /tmp");
    let out = run(&["-i"], &["/bin/sh", "-c", &script], Some(&big));
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("rc=1\n"),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(!stdout.contains("big"), "nothing is left behind: {stdout}");
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["bogus"][..],
        &["console", "true"],
        &["signal", "--pid", "1"],
    ] {
        let mut cmd = vec![AGENT];
        cmd.extend(args);
        let out = run(&[], &cmd, None);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(text(&out.stderr).contains("usage:"), "{args:?}");
    }
}

/// An image with nothing but the agent (no shell, no libc), tagged by the agent's bytes.
fn noshell_image() -> String {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let bytes = std::fs::read(static_agent()).expect("read the agent");
            // FNV-1a: a stable tag for the same binary, so reruns reuse the image.
            let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
            });
            let tag = format!("containerssh-test-noshell:{hash:016x}");
            if docker(&["image", "inspect", &tag], None).status.success() {
                return tag;
            }
            let ctx = tempfile::tempdir().expect("temp dir");
            std::fs::copy(static_agent(), ctx.path().join("agent")).expect("copy agent");
            std::fs::write(
                ctx.path().join("Dockerfile"),
                "FROM scratch\nCOPY agent /cssh/agent\nLABEL containerssh_test_image=\"1\"\n",
            )
            .expect("write Dockerfile");
            let out = run_with_timeout(
                Command::new("docker")
                    .env("DOCKER_BUILDKIT", "0")
                    .args(["build", "-q", "-t", &tag])
                    .arg(ctx.path()),
                None,
                DOCKER_TIMEOUT,
            );
            assert!(out.status.success(), "docker build: {}", text(&out.stderr));
            tag
        })
        .clone()
}

#[test]
fn runs_in_an_image_without_a_shell() {
    let image = noshell_image();
    let out = docker(
        &[
            "run",
            "--rm",
            "--network",
            "none",
            "--label",
            "containerssh_test=1",
            &image,
            AGENT,
            "console",
            "--pid",
            "--",
            AGENT,
            "--version",
        ],
        None,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let (pid, rest) = split_pid(&out.stdout);
    assert!(
        pid > 1,
        "the program is the agent's child, not PID 1: {pid}"
    );
    assert!(
        text(rest).starts_with("containerssh-agent "),
        "{}",
        text(rest)
    );

    // A signal death recorded and read back, with nothing but the agent in the image.
    let c = Container::start_image(&image, &[AGENT, "wait-signal"]);
    let mut victim = c.spawn_exec(&[AGENT, "console", "--pid", "--", AGENT, "wait-signal"]);
    let (prefix, rest) = read_prefix(victim.stdout.take().unwrap(), 4);
    let (pid, _) = split_pid(&prefix);
    let sent = c.exec(&[
        AGENT,
        "signal",
        "--pid",
        &pid.to_string(),
        "--signal",
        "KILL",
    ]);
    assert!(sent.status.success(), "{}", text(&sent.stderr));
    assert_eq!(finish(victim, rest), (Some(137), String::new()));
    let info = c.exec(&[AGENT, "exit-info", "--pid", &pid.to_string()]);
    assert_eq!(text(&info.stdout), "KILL\n", "{}", text(&info.stderr));
}

/// A server login into an image that has no shell and no `/usr/bin`: the injected agent lands
/// at its default path (directories created), idles as PID 1 and runs the program; and the same
/// image used with `agent.inject: false` and its own copy at `agentPath`.
#[test]
fn server_logins_into_an_image_without_a_shell() {
    let image = noshell_image();
    for inject in [true, false] {
        let env = support::TestEnv::new();
        let mut yaml = env.config_yaml("connection").replace(&test_image(), &image);
        if !inject {
            let binary = format!("  binary: \"{}\"\n", static_agent().display());
            yaml = yaml
                .replace(&binary, "  inject: false\n")
                .replace(
                    "    shellCommand:",
                    "    agentPath: /cssh/agent\n    idleCommand: [\"/cssh/agent\", \"wait-signal\"]\n    shellCommand:",
                );
        }
        let server = env.start(&yaml);
        let agent = if inject {
            // The injected agent's read-only volume.
            "/.containerssh/containerssh-agent"
        } else {
            AGENT
        };
        let out = run_with_timeout(
            env.ssh(&server, "alice").arg(format!("{agent} --version")),
            None,
            DOCKER_TIMEOUT,
        );
        assert!(
            text(&out.stdout).starts_with("containerssh-agent "),
            "inject={inject}: {}",
            support::describe(&out, &server)
        );
        assert_eq!(
            server.output().contains("injecting the agent"),
            inject,
            "{}",
            server.output()
        );
    }
}

/// `install` copies the agent (e.g. from an init container into a shared volume) as an
/// executable that runs.
#[test]
fn install_copies_a_runnable_agent() {
    let out = run(
        &[],
        &[
            "/bin/sh",
            "-c",
            "mkdir /tmp/shared && /cssh/agent install /tmp/shared/agent && stat -c %a /tmp/shared/agent && /tmp/shared/agent --version && /cssh/agent install /no/dir/agent",
        ],
        None,
    );
    let stdout = text(&out.stdout);
    assert!(stdout.starts_with("755\ncontainerssh-agent "), "{stdout}");
    assert!(
        text(&out.stderr).contains("/no/dir/agent: the parent directory does not exist"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(1));
}
