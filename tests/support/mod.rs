//! Shared harness for the integration tests (`mod support;`).
//!
//! A [`TestEnv`] is one isolated world: a temp directory with a client key, a
//! host key, authorized-keys files for `alice` and `bob`, and a unique
//! `instanceId` that labels every container the server starts for it
//! (`containerssh_instance=<instance>`), so a test only ever sees and cleans up
//! its own containers. [`TestEnv::start`] runs the real server binary;
//! [`TestEnv::start_in_process`] runs it in the test's own process on a backend of the
//! test's choosing (the fake, for the SSH side without an engine);
//! [`TestEnv::ssh`] / [`TestEnv::scp`] / [`TestEnv::sftp`] build commands for
//! the real OpenSSH clients; [`run_with_timeout`] runs them with a deadline.
//!
//! The container image comes from [`test_image`]: `CONTAINERSSH_TEST_IMAGE`
//! (set by `tests/run.sh`) or, when unset, `tests/support/image/build.sh`.
#![allow(dead_code)] // each test crate uses its own subset of the harness

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The test server for the authentication webhooks (tests/suite/webhook_auth.rs).
pub mod webhook;

/// Programs for the fake backend: a very small shell.
pub mod fake_sh;

/// How long [`TestEnv::start`] waits for the server's `listening on ADDR` line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);

/// The server binary under test.
pub const SERVER_BIN: &str = env!("CARGO_BIN_EXE_containerssh");

// ---------------------------------------------------------------------------
// The test image
// ---------------------------------------------------------------------------

/// The image reference the tests run containers from.
///
/// `CONTAINERSSH_TEST_IMAGE` when set (tests/run.sh exports it); otherwise
/// `tests/support/image/build.sh` is run once per test process (the script
/// takes its own flock, so parallel test binaries are safe, and it reuses an
/// existing image) and the last line it prints is the reference.
pub fn test_image() -> String {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            if let Ok(image) = std::env::var("CONTAINERSSH_TEST_IMAGE") {
                let image = image.trim().to_string();
                if !image.is_empty() {
                    return image;
                }
            }
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/image/build.sh");
            let out = Command::new("bash")
                .arg(&script)
                .stdin(Stdio::null())
                .output()
                .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            let image = stdout
                .lines()
                .map(str::trim)
                .rfind(|l| !l.is_empty())
                .unwrap_or("")
                .to_string();
            if !out.status.success() || image.is_empty() {
                panic!(
                    "{} failed ({}); set CONTAINERSSH_TEST_IMAGE or run `bash tests/run.sh`\n\
                     --- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
                    script.display(),
                    out.status
                );
            }
            image
        })
        .clone()
}

// ---------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------

/// `n` random bytes from the kernel, as lowercase hex.
/// The agent built the way it ships (static glibc, release), once per test process:
/// `$CONTAINERSSH_TEST_AGENT` when set (tests/run.sh builds it first), else built here.
pub fn static_agent() -> PathBuf {
    static AGENT_PATH: OnceLock<PathBuf> = OnceLock::new();
    AGENT_PATH
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("CONTAINERSSH_TEST_AGENT") {
                return PathBuf::from(p);
            }
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let target_dir = root.join("target/static");
            let out = Command::new(env!("CARGO"))
                .current_dir(root)
                .args([
                    "build",
                    "--release",
                    "--target",
                    "x86_64-unknown-linux-gnu",
                    "--bin",
                    "containerssh-agent",
                ])
                .env("RUSTFLAGS", "-C target-feature=+crt-static")
                .env("CARGO_TARGET_DIR", &target_dir)
                .stdin(Stdio::null())
                .output()
                .expect("run cargo build for the static agent");
            assert!(
                out.status.success(),
                "static agent build failed:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            target_dir.join("x86_64-unknown-linux-gnu/release/containerssh-agent")
        })
        .clone()
}

pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf.iter().fold(String::with_capacity(2 * n), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// A YAML double-quoted scalar.
fn yaml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Runs a command that must succeed, returning its stdout.
fn must_run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Removes ANSI escape sequences (`ESC [ ... final-byte` and lone `ESC x`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if let Some('[') = chars.next() {
            for c in chars.by_ref() {
                if ('\u{40}'..='\u{7e}').contains(&c) {
                    break;
                }
            }
        }
    }
    out
}

/// Finds `listening on <ADDR>` in one log line (the `listening on (\S+)` rule),
/// tolerating quotes or trailing punctuation around the address.
fn parse_listening(line: &str) -> Option<SocketAddr> {
    let mut rest = line;
    while let Some(i) = rest.find("listening on ") {
        rest = &rest[i + "listening on ".len()..];
        let token = rest.split_whitespace().next().unwrap_or("");
        let token =
            token.trim_matches(|c: char| matches!(c, '"' | '\'' | '`' | ',' | ';' | ')' | '('));
        let token = token.trim_end_matches('.');
        if let Ok(addr) = token.parse::<SocketAddr>() {
            return Some(addr);
        }
    }
    None
}

// ---------------------------------------------------------------------------
// Running commands with a deadline
// ---------------------------------------------------------------------------

/// Spawns `cmd` with stdout and stderr captured, writes `stdin` (if any) from
/// a separate thread and then closes it (stdin is `/dev/null` when `None`),
/// and waits at most `timeout`. On timeout the child is killed and this
/// panics with everything it printed so far.
///
/// Waiting is event-driven: a thread blocks in `wait()` and reports over a
/// channel; the caller blocks on the channel with the deadline.
pub fn run_with_timeout(cmd: &mut Command, stdin: Option<&[u8]>, timeout: Duration) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {desc}: {e}"));
    let pid = child.id();

    let writer = match (stdin, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => {
            let data = data.to_vec();
            // A child that exits without reading gives EPIPE: not an error here.
            Some(thread::spawn(move || {
                let _ = pipe.write_all(&data);
            }))
        }
        _ => None,
    };
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let readers = [
        spawn_collector(child.stdout.take().expect("stdout piped"), stdout.clone()),
        spawn_collector(child.stderr.take().expect("stderr piped"), stderr.clone()),
    ];

    let (tx, rx) = mpsc::channel();
    let waiter = thread::spawn(move || {
        let status = child.wait();
        let _ = tx.send(());
        status
    });
    let timed_out = rx.recv_timeout(timeout).is_err();
    if timed_out {
        // The waiter has not reaped the child yet, so the pid is still ours.
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    }
    let status = waiter
        .join()
        .expect("waiter thread")
        .unwrap_or_else(|e| panic!("wait for {desc}: {e}"));
    if let Some(w) = writer {
        let _ = w.join();
    }
    // The pipes close when the child (and anything it left holding them) exits.
    for r in readers {
        let _ = r.join();
    }
    let stdout = std::mem::take(&mut *stdout.lock().unwrap());
    let stderr = std::mem::take(&mut *stderr.lock().unwrap());
    if timed_out {
        panic!(
            "timed out after {timeout:?}: {desc}\n--- stdout so far ---\n{}\n--- stderr so far ---\n{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        );
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

fn spawn_collector<R: Read + Send + 'static>(
    mut pipe: R,
    sink: Arc<Mutex<Vec<u8>>>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match pipe.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => sink.lock().unwrap().extend_from_slice(&buf[..n]),
            }
        }
    })
}

// ---------------------------------------------------------------------------
// The server process
// ---------------------------------------------------------------------------

/// Everything the server printed (stdout and stderr interleaved by line, ANSI
/// escapes removed), with a condition variable signalled on every new line.
#[derive(Default)]
struct SharedLog {
    text: Mutex<String>,
    changed: Condvar,
    /// Number of pipes (stdout, stderr) still open.
    open_pipes: AtomicUsize,
}

impl SharedLog {
    fn push_line(&self, line: &str) {
        let mut text = self.text.lock().unwrap();
        text.push_str(line);
        text.push('\n');
        drop(text);
        self.changed.notify_all();
    }

    fn pipe_closed(&self) {
        self.open_pipes.fetch_sub(1, Ordering::SeqCst);
        let _guard = self.text.lock().unwrap();
        self.changed.notify_all();
    }

    /// Blocks until `pred(text)` returns `Some`, the deadline passes, or both
    /// pipes are closed (the process is gone) and `pred` still says `None`.
    fn wait_for<T>(&self, timeout: Duration, mut pred: impl FnMut(&str) -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut text = self.text.lock().unwrap();
        loop {
            if let Some(v) = pred(&text) {
                return Some(v);
            }
            if self.open_pipes.load(Ordering::SeqCst) == 0 {
                return None;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            text = self.changed.wait_timeout(text, deadline - now).unwrap().0;
        }
    }
}

/// `yaml` with 127.0.0.1 exempt from the per-source penalties unless it sets the list: the
/// tests log in from there many times, failing on purpose included.
fn exempt_loopback(yaml: &str) -> String {
    if yaml.contains("perSourcePenaltyExemptList") {
        return yaml.to_string();
    }
    yaml.replacen(
        "ssh:\n",
        "ssh:\n  perSourcePenaltyExemptList: [127.0.0.1/32]\n",
        1,
    )
}

/// Where a server in this process logs: each event's lines into the [`SharedLog`].
struct LogSink(Arc<SharedLog>);

/// One event's text, pushed line by line when the event is written out.
struct LogLines {
    log: Arc<SharedLog>,
    buf: Vec<u8>,
}

impl std::io::Write for LogLines {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LogLines {
    fn drop(&mut self) {
        for line in String::from_utf8_lossy(&self.buf).lines() {
            eprintln!("[server] {line}");
            self.log.push_line(line);
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = LogLines;

    fn make_writer(&'a self) -> LogLines {
        LogLines {
            log: Arc::clone(&self.0),
            buf: Vec::new(),
        }
    }
}

fn spawn_log_reader<R: Read + Send + 'static>(
    pipe: R,
    log: Arc<SharedLog>,
    tag: &'static str,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(pipe);
        let mut raw = Vec::new();
        loop {
            raw.clear();
            match reader.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&raw);
                    let line = strip_ansi(line.trim_end_matches(['\n', '\r']));
                    eprintln!("[server {tag}] {line}");
                    log.push_line(&line);
                }
            }
        }
        log.pipe_closed();
    })
}

/// A running server. Dropping it kills the process (SIGKILL) if still alive.
pub struct TestServer {
    /// The address from the server's `listening on ADDR` line.
    pub addr: SocketAddr,
    /// The server process; `None` for one in this process ([`TestEnv::start_in_process`]).
    child: Option<Child>,
    in_process: Option<containerssh::testing::Running>,
    log: Arc<SharedLog>,
}

impl TestServer {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    fn child(&mut self) -> &mut Child {
        self.child
            .as_mut()
            .expect("a server process (not one in this process)")
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .expect("a server process (not one in this process)")
            .id()
    }

    /// Everything the server printed so far (stdout + stderr, by line).
    pub fn output(&self) -> String {
        self.log.text.lock().unwrap().clone()
    }

    /// Waits (event-driven, on each new output line) until the output contains
    /// `needle`; false on timeout or if the process closed its output first.
    pub fn wait_for_output(&self, needle: &str, timeout: Duration) -> bool {
        self.log
            .wait_for(timeout, |t| t.contains(needle).then_some(()))
            .is_some()
    }

    /// Waits (up to `timeout`) for one log line holding every one of `needles`.
    pub fn wait_for_line(&self, needles: &[&str], timeout: Duration) -> bool {
        self.log
            .wait_for(timeout, |t| {
                t.lines()
                    .any(|l| needles.iter().all(|n| l.contains(n)))
                    .then_some(())
            })
            .is_some()
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        let _ = self.child().kill();
        let _ = self.child().wait();
    }

    /// `Some(status)` if the process has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child().try_wait().expect("try_wait on the server")
    }

    /// Sends SIGTERM and waits up to `within` for the process to exit; `None`
    /// if it is still running then (it is left running; Drop kills it).
    ///
    /// The exit is watched with a short bounded `try_wait` loop (10 ms steps):
    /// std offers no blocking wait with a deadline on a borrowed `Child`.
    pub fn sigterm_and_wait(&mut self, within: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.try_wait() {
            return Some(status);
        }
        let pid = self.pid();
        let ok = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok, "kill -TERM {pid} failed");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TestServer {
    /// Stops the server the way an operator would (SIGTERM, so it removes what it created,
    /// including a container whose creation was still in flight), then SIGKILL if it hangs.
    /// Never panics: it may run while unwinding from a failed test.
    fn drop(&mut self) {
        if let Some(mut running) = self.in_process.take() {
            running.stop();
            self.log.pipe_closed();
        }
        let Some(child) = self.child.as_mut() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
        }
        let _ = child.wait();
    }
}

// ---------------------------------------------------------------------------
// The test environment
// ---------------------------------------------------------------------------

/// One isolated test world. Dropping it removes every container labelled
/// `containerssh_instance=<instance>` and the temp directory.
pub struct TestEnv {
    pub dir: tempfile::TempDir,
    /// Unique per environment ("t-" + 12 hex digits); the server's
    /// `instanceId`, and so the `containerssh_instance` label value.
    pub instance: String,
    /// The client's ed25519 private key (`<client_key>.pub` is its public key).
    pub client_key: PathBuf,
    /// The server's ed25519 host key (OpenSSH format).
    pub host_key: PathBuf,
    /// The client's public key line (as written to `keys/alice`, `keys/bob`).
    pub client_pubkey: String,
    /// `<dir>/known_hosts`, which the clients fill (accept-new).
    pub known_hosts: PathBuf,
    /// `<dir>/passwords`, the `passwordFile` of the config (created empty).
    pub password_file: PathBuf,
    askpass_counter: AtomicUsize,
}

impl Default for TestEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl TestEnv {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("containerssh-test-")
            .tempdir()
            .expect("create temp dir");
        let path = dir.path();
        let instance = format!("t-{}", random_hex(6));

        let client_key = path.join("client_ed25519");
        let host_key = path.join("host_ed25519");
        for (key, comment) in [(&client_key, "test-client"), (&host_key, "test-host")] {
            must_run(
                Command::new("ssh-keygen")
                    .args(["-t", "ed25519", "-N", "", "-q", "-C", comment, "-f"])
                    .arg(key),
            );
        }
        let client_pubkey = std::fs::read_to_string(client_key.with_extension("pub"))
            .expect("read client public key")
            .trim()
            .to_string();

        let keys = path.join("keys");
        std::fs::create_dir(&keys).expect("create keys dir");
        for user in ["alice", "bob"] {
            std::fs::write(keys.join(user), format!("{client_pubkey}\n"))
                .expect("write authorized keys");
        }
        let password_file = path.join("passwords");
        std::fs::write(&password_file, "").expect("write password file");
        let known_hosts = path.join("known_hosts");

        TestEnv {
            dir,
            instance,
            client_key,
            host_key,
            client_pubkey,
            known_hosts,
            password_file,
            askpass_counter: AtomicUsize::new(0),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The harness's server configuration for `mode` ("connection", "session", "persistent",
    /// or "connection-exec": connection mode with `agent.sessionServer: false`).
    pub fn config_yaml(&self, mode: &str) -> String {
        let d = self.dir.path().display().to_string();
        let image = test_image();
        // "connection-exec": connection mode with every program an exec (no session-server).
        let (mode, session_server) = match mode {
            "connection-exec" => ("connection", false),
            other => (other, true),
        };
        format!(
            r#"ssh:
  listen: 127.0.0.1:0
  hostkeys:
    - {host_key}
auth:
  publicKey:
    method: authorizedKeys
    authorizedKeys:
      path: {keys}
  password:
    method: passwordFile
    passwordFile:
      path: {passwords}
backend: docker
docker:
  execution:
    container:
      image: {image}
      labels:
        containerssh_test: "1"
    mode: {mode}
    imagePullPolicy: Never
    shellCommand: ["/bin/sh"]
agent:
  binary: {agent}
  sessionServer: {session_server}
log:
  level: debug
  format: text
instanceId: {instance}
stateDirectory: {state}
"#,
            host_key = yaml_str(&self.host_key.display().to_string()),
            keys = yaml_str(&format!("{d}/keys/%u")),
            passwords = yaml_str(&self.password_file.display().to_string()),
            image = yaml_str(&image),
            mode = yaml_str(mode),
            instance = yaml_str(&self.instance),
            state = yaml_str(&format!("{d}/state")),
            agent = yaml_str(&static_agent().display().to_string()),
        )
    }

    /// Writes `yaml` to `<dir>/config.yaml`, starts the server with
    /// `--config` and waits (up to [`STARTUP_TIMEOUT`]) for its
    /// `listening on ADDR` line. Panics with the server's output if it exits
    /// or never says so.
    ///
    /// A configuration without a top-level `sandbox` block gets `sandbox: {allowRoot: true}`,
    /// so that (in CI, as root) every test server runs with its capabilities dropped, no_new_privs
    /// and the seccomp filter enforced: the whole suite exercises the allow-list.
    ///
    /// One without `perSourcePenaltyExemptList` gets `[127.0.0.1/32]`: the tests log in from
    /// there many times, failures on purpose included, and a penalty earned by one check must
    /// not refuse the next. Penalties are tested from other loopback addresses
    /// (tests/front_door.rs) and by the auditor (tests/audit.rs), which clear the list.
    pub fn start(&self, yaml: &str) -> TestServer {
        self.start_reporting(yaml, None)
    }

    /// [`TestEnv::start`] for a server that logs elsewhere than stdout: `listening` finds its
    /// `listening on ADDR` there (polled until [`STARTUP_TIMEOUT`]).
    pub fn start_reporting(
        &self,
        yaml: &str,
        listening: Option<&dyn Fn() -> Option<SocketAddr>>,
    ) -> TestServer {
        let config = self.dir.path().join("config.yaml");
        let yaml = exempt_loopback(yaml);
        let yaml = if yaml.lines().any(|l| l.starts_with("sandbox:")) {
            yaml.to_string()
        } else {
            // CONTAINERSSH_TEST_SECCOMP=log runs the suite with violations logged instead of
            // fatal: how the allow-list is maintained (SECURITY.md).
            let seccomp = std::env::var("CONTAINERSSH_TEST_SECCOMP")
                .unwrap_or_else(|_| "enforce".to_string());
            format!("{yaml}\nsandbox:\n  allowRoot: true\n  seccomp: {seccomp}\n")
        };
        std::fs::write(&config, &yaml).expect("write config.yaml");
        let mut child = Command::new(SERVER_BIN)
            .arg("--config")
            .arg(&config)
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {SERVER_BIN}: {e}"));
        let log = Arc::new(SharedLog {
            open_pipes: AtomicUsize::new(2),
            ..SharedLog::default()
        });
        spawn_log_reader(child.stdout.take().expect("stdout"), log.clone(), "out");
        spawn_log_reader(child.stderr.take().expect("stderr"), log.clone(), "err");
        // From here on a panic drops the TestServer, which kills the process.
        let mut server = TestServer {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            child: Some(child),
            in_process: None,
            log,
        };
        let found = match listening {
            None => server
                .log
                .wait_for(STARTUP_TIMEOUT, |t| t.lines().find_map(parse_listening)),
            Some(f) => poll_until(STARTUP_TIMEOUT, Duration::from_millis(50), || {
                if server.try_wait().is_some() {
                    return Some(None);
                }
                f().map(Some)
            })
            .flatten(),
        };
        match found {
            Some(addr) => {
                server.addr = addr;
                server
            }
            None => {
                let exited = server.try_wait();
                panic!(
                    "server did not report `listening on ADDR` within {STARTUP_TIMEOUT:?} \
                     (exit status: {exited:?})\n--- config ---\n{yaml}\n--- server output ---\n{}",
                    server.output()
                );
            }
        }
    }

    /// `start(&config_yaml(mode))`.
    pub fn start_mode(&self, mode: &str) -> TestServer {
        self.start(&self.config_yaml(mode))
    }

    /// The server in this process on `backend` (the fake, usually) with `yaml`'s settings:
    /// the whole SSH side without an engine. Its log lines are kept as a process's would be.
    pub fn start_in_process(
        &self,
        yaml: &str,
        backend: Arc<dyn containerssh::backend::Backend>,
    ) -> TestServer {
        let yaml = exempt_loopback(yaml);
        let raw =
            containerssh::config::load::parse_yaml("config.yaml", &yaml).unwrap_or_else(|e| {
                panic!(
                    "test configuration: {e}
{yaml}"
                )
            });
        let settings = containerssh::backend::build::checked_settings("config.yaml", raw)
            .unwrap_or_else(|e| {
                panic!(
                    "test configuration: {e}
{yaml}"
                )
            });
        let log = Arc::new(SharedLog {
            open_pipes: AtomicUsize::new(1),
            ..SharedLog::default()
        });
        let running = containerssh::testing::serve(settings, backend, LogSink(Arc::clone(&log)))
            .unwrap_or_else(|e| panic!("cannot start the server: {e}"));
        TestServer {
            addr: running.addr,
            child: None,
            in_process: Some(running),
            log,
        }
    }

    /// Writes (once per port) and returns the OpenSSH client config for
    /// `server`: key-only, non-interactive, host key accepted on first use
    /// into `<dir>/known_hosts`, nothing read from the user's ~/.ssh or agent.
    pub fn ssh_config(&self, server: &TestServer) -> PathBuf {
        let path = self
            .dir
            .path()
            .join(format!("ssh_config-{}", server.addr.port()));
        if !path.exists() {
            let text = format!(
                "Host *\n\
                 \x20 HostName 127.0.0.1\n\
                 \x20 Port {port}\n\
                 \x20 BatchMode yes\n\
                 \x20 IdentitiesOnly yes\n\
                 \x20 IdentityFile {key}\n\
                 \x20 IdentityAgent none\n\
                 \x20 UserKnownHostsFile {known_hosts}\n\
                 \x20 GlobalKnownHostsFile /dev/null\n\
                 \x20 StrictHostKeyChecking accept-new\n\
                 \x20 CheckHostIP no\n\
                 \x20 HashKnownHosts no\n\
                 \x20 UpdateHostKeys no\n\
                 \x20 LogLevel ERROR\n\
                 \x20 ConnectTimeout 10\n\
                 \x20 ServerAliveInterval 0\n\
                 \x20 ControlMaster no\n\
                 \x20 ControlPath none\n\
                 \x20 ForwardAgent no\n\
                 \x20 ForwardX11 no\n",
                port = server.addr.port(),
                key = self.client_key.display(),
                known_hosts = self.known_hosts.display(),
            );
            // Write-then-rename so concurrent callers never see a partial file.
            let tmp = path.with_extension(format!("tmp-{}", random_hex(4)));
            std::fs::write(&tmp, text).expect("write ssh config");
            std::fs::rename(&tmp, &path).expect("rename ssh config");
        }
        path
    }

    fn client(&self, program: &str, server: &TestServer, port_flag: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env_remove("SSH_AUTH_SOCK")
            .arg("-F")
            .arg(self.ssh_config(server))
            .args([port_flag, &server.addr.port().to_string()]);
        cmd
    }

    /// `ssh -F <config> -p PORT`, without a destination: add options such as
    /// `-tt`, then [`TestEnv::destination`], then the remote command.
    pub fn ssh_opts(&self, server: &TestServer) -> Command {
        self.client("ssh", server, "-p")
    }

    /// `ssh -F <config> -p PORT USER@127.0.0.1`; append the remote command.
    /// Starts `ssh alice@… '<cmd>'` (which must print `ready` first) in the background and
    /// returns once `ready` arrived, i.e. its container or pod exists and the session is live;
    /// panics otherwise, with `context()` (the server's output, and what else explains it).
    pub fn hold_session(
        &self,
        server: &TestServer,
        cmd: &str,
        context: impl Fn() -> String,
    ) -> Child {
        let mut child = self
            .ssh(server, "alice")
            .arg(cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("ssh");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(90))
            .unwrap_or_else(|_| {
                let _ = child.kill();
                panic!("session never started\n{}", context())
            });
        if line != "ready\n" {
            let _ = child.kill();
            let out = child.wait_with_output().expect("ssh output");
            panic!(
                "expected `ready`, got {line:?}; stderr: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                context()
            );
        }
        child
    }

    pub fn ssh(&self, server: &TestServer, user: &str) -> Command {
        let mut cmd = self.ssh_opts(server);
        cmd.arg(self.destination(user));
        cmd
    }

    /// `ssh` for password authentication: key auth off, the password supplied
    /// through an SSH_ASKPASS helper (SSH_ASKPASS_REQUIRE=force), so no tty is
    /// needed. Append the remote command.
    pub fn ssh_password(&self, server: &TestServer, user: &str, password: &str) -> Command {
        self.ssh_passwords(server, user, &[password], 1).0
    }

    /// `ssh` for password authentication that answers the client's successive prompts with
    /// `passwords` in turn (the last one repeated), as a user retyping would; `prompts` is the
    /// client's NumberOfPasswordPrompts. Returns the command and a file counting the prompts.
    /// Append the remote command.
    pub fn ssh_passwords(
        &self,
        server: &TestServer,
        user: &str,
        passwords: &[&str],
        prompts: u32,
    ) -> (Command, PathBuf) {
        let n = self.askpass_counter.fetch_add(1, Ordering::SeqCst);
        let dir = self.dir.path().join(format!("askpass-seq-{n}"));
        std::fs::create_dir(&dir).expect("askpass dir");
        for (i, p) in passwords.iter().enumerate() {
            std::fs::write(dir.join(format!("pw{}", i + 1)), p).expect("write askpass password");
        }
        let count = dir.join("count");
        let script = dir.join("askpass.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nd='{d}'\nn=$(cat $d/count 2>/dev/null || echo 0)\nn=$((n+1))\n\
                 echo $n > $d/count\n[ $n -gt {last} ] && n={last}\ncat $d/pw$n\necho\n",
                d = dir.display(),
                last = passwords.len(),
            ),
        )
        .expect("write askpass script");
        must_run(Command::new("chmod").arg("700").arg(&script));
        let mut cmd = self.ssh_opts(server);
        cmd.env("SSH_ASKPASS", &script)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("DISPLAY", ":0")
            .args([
                "-o",
                "BatchMode=no",
                "-o",
                "PubkeyAuthentication=no",
                "-o",
                "PreferredAuthentications=password",
                "-o",
            ])
            .arg(format!("NumberOfPasswordPrompts={prompts}"))
            .arg(self.destination(user));
        (cmd, count)
    }

    /// `ssh -tt USER@host CMD` with stdin at EOF from the start, as scripts and CI jobs run it
    /// (`</dev/null`): the client sends EOF at once, and a 0x0 terminal size.
    pub fn ssh_tty_stdin_at_eof(&self, server: &TestServer, cmd: &str) -> Output {
        run_with_timeout(
            self.ssh_opts(server)
                .arg("-tt")
                .arg(self.destination("alice"))
                .arg(cmd),
            Some(b""),
            Duration::from_secs(90),
        )
    }

    /// `scp -F <config> -P PORT`; append options, then sources and target
    /// (remote paths via [`TestEnv::remote`]). OpenSSH 9 uses the SFTP
    /// protocol by default; add `-O` for the legacy scp protocol.
    pub fn scp(&self, server: &TestServer) -> Command {
        self.client("scp", server, "-P")
    }

    /// `sftp -F <config> -P PORT`; append options (e.g. `-b -` to read a batch
    /// from stdin), then [`TestEnv::destination`].
    pub fn sftp(&self, server: &TestServer) -> Command {
        self.client("sftp", server, "-P")
    }

    /// Runs `sftp` (as made by [`TestEnv::sftp`], options appended) as `user` with a batch
    /// that puts the local `up` at `remote`, then gets it back into the local `down`.
    pub fn sftp_put_get(
        &self,
        mut sftp: Command,
        user: &str,
        (up, remote, down): (&Path, &str, &Path),
        timeout: Duration,
    ) -> Output {
        let batch = format!(
            "put {} {remote}\nget {remote} {}\n",
            up.display(),
            down.display()
        );
        sftp.args(["-b", "-"]).arg(self.destination(user));
        run_with_timeout(&mut sftp, Some(batch.as_bytes()), timeout)
    }

    /// `USER@127.0.0.1`
    pub fn destination(&self, user: &str) -> String {
        format!("{user}@127.0.0.1")
    }

    /// `USER@127.0.0.1:PATH`, for scp.
    pub fn remote(&self, user: &str, path: &str) -> String {
        format!("{user}@127.0.0.1:{path}")
    }

    /// IDs of all containers (running or not) labelled with this instance.
    pub fn containers(&self) -> Vec<String> {
        must_run(Command::new("docker").args([
            "ps",
            "-aq",
            "--no-trunc",
            "--filter",
            &format!("label=containerssh_instance={}", self.instance),
        ]))
        .split_whitespace()
        .map(str::to_string)
        .collect()
    }

    /// True once no container of this instance exists, false if some still
    /// exist after `within`.
    ///
    /// Event-driven: `docker events --since <before the first check>` (so no
    /// event can fall between the check and the subscription) wakes us on each
    /// destroy of one of our containers, and we re-check then. As a guard
    /// against a lost event stream it also re-checks every 500 ms: a short,
    /// bounded loop, acceptable here because this assertion is about a
    /// deadline.
    pub fn wait_no_containers(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .saturating_sub(Duration::from_secs(1));
        let mut events = Command::new("docker")
            .args([
                "events",
                "--since",
                &format!("{}.{:09}", since.as_secs(), since.subsec_nanos()),
                "--filter",
                "type=container",
                "--filter",
                "event=destroy",
                "--filter",
                &format!("label=containerssh_instance={}", self.instance),
                "--format",
                "{{.Actor.ID}}",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn docker events");
        let (tx, rx) = mpsc::channel::<()>();
        let stdout = events.stdout.take().expect("events stdout");
        let reader = thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if line.is_err() || tx.send(()).is_err() {
                    break;
                }
            }
        });
        let result = loop {
            if self.containers().is_empty() {
                break true;
            }
            let now = Instant::now();
            if now >= deadline {
                break false;
            }
            let step = (deadline - now).min(Duration::from_millis(500));
            // An event, a timeout or a closed stream: re-check either way.
            if let Err(mpsc::RecvTimeoutError::Disconnected) = rx.recv_timeout(step) {
                thread::sleep(step);
            }
        };
        let _ = events.kill();
        let _ = events.wait();
        let _ = reader.join();
        result
    }

    /// Force-removes every container of this instance (also done on drop).
    pub fn remove_containers(&self) {
        force_remove(self.containers().iter().map(String::as_str));
    }

    /// Starts `ssh -M -N` (a control master) and waits for its socket, so that several
    /// client commands share one SSH connection (and so one container in connection mode).
    /// Pass the returned path as `-o ControlPath=…` (or `-S`); kill the child to disconnect.
    pub fn control_master(&self, server: &TestServer, name: &str) -> (Child, PathBuf) {
        let control = self.dir.path().join(format!("ctl-{name}"));
        let child = self
            .ssh_opts(server)
            .args(["-M", "-N", "-o", "ControlPersist=no", "-S"])
            .arg(&control)
            .arg(self.destination("alice"))
            .stdin(Stdio::null())
            .spawn()
            .expect("ssh control master");
        // ssh offers no readiness signal but the socket itself: wait for it, bounded.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !control.exists() {
            assert!(
                Instant::now() < deadline,
                "control socket never appeared: {}",
                server.output()
            );
            thread::sleep(Duration::from_millis(20));
        }
        (child, control)
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        // Never panic in drop (it may run while unwinding from a failed test).
        let listed = Command::new("docker")
            .args([
                "ps",
                "-aq",
                "--filter",
                &format!("label=containerssh_instance={}", self.instance),
            ])
            .stdin(Stdio::null())
            .output();
        if let Ok(out) = listed {
            let text = String::from_utf8_lossy(&out.stdout);
            force_remove(text.split_whitespace());
        }
    }
}

/// `docker rm -f -v` of the given containers; errors ignored (cleanup path).
fn force_remove<'a>(ids: impl Iterator<Item = &'a str>) {
    let ids: Vec<&str> = ids.collect();
    if !ids.is_empty() {
        let _ = Command::new("docker")
            .args(["rm", "-f", "-v"])
            .args(&ids)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// How many execs the engine created in `containers` since `since` (a `docker events` time),
/// from its event log; waits up to 2 s for the engine to publish the latest.
pub fn docker_exec_creates(containers: &[String], since: &str) -> usize {
    let until = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 2;
    let mut cmd = Command::new("docker");
    cmd.args(["events", "--since", since, "--until", &until.to_string()]);
    for c in containers {
        cmd.args(["--filter", &format!("container={c}")]);
    }
    // Actions are "exec_create: COMMAND", which an event filter does not match.
    let out = must_run(cmd.args(["--format", "{{.Action}}"]));
    out.lines().filter(|a| a.starts_with("exec_create")).count()
}

/// A failed command's status, output and the server's log, for assertion messages.
pub fn describe(out: &Output, server: &TestServer) -> String {
    format!(
        "status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n--- server ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        server.output()
    )
}

// ---------------------------------------------------------------------------
// Forwarding helpers (tests/suite/forwarding.rs)
// ---------------------------------------------------------------------------

/// Calls `f` until it returns `Some` or `timeout` passes (then `None`), pausing `step`
/// between attempts: a bounded poll on observable state, for things that give no event.
pub fn poll_until<T>(
    timeout: Duration,
    step: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        let now = Instant::now();
        if now >= deadline {
            return None;
        }
        thread::sleep(step.min(deadline - now));
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released).
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// The SHA-256 of `data` as lowercase hex, computed by the host's `sha256sum`.
pub fn sha256_hex(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn sha256sum");
    let mut stdin = child.stdin.take().expect("sha256sum stdin");
    let data = data.to_vec();
    let writer = thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().expect("sha256sum output");
    writer
        .join()
        .expect("sha256sum writer")
        .expect("write to sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

/// A process running in the background (an `ssh -M -N` master, an ssh session holding a
/// server in the container, an `ssh-agent`), its stdout and stderr going to files.
/// Dropping it kills it (SIGKILL) and reaps it.
pub struct Background {
    child: Child,
    pub stdout_file: PathBuf,
    pub stderr_file: PathBuf,
}

impl Background {
    /// Spawns `cmd` (stdin `/dev/null`) with its output in `<dir>/<name>.out` / `.err`.
    pub fn spawn(cmd: &mut Command, dir: &Path, name: &str) -> Background {
        let stdout_file = dir.join(format!("{name}.out"));
        let stderr_file = dir.join(format!("{name}.err"));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout_file).expect("create stdout file"))
            .stderr(std::fs::File::create(&stderr_file).expect("create stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {cmd:?}: {e}"));
        Background {
            child,
            stdout_file,
            stderr_file,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_file).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_file).unwrap_or_default()
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// SIGKILL and reap (idempotent).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.kill();
    }
}

impl TestEnv {
    /// Starts `ssh -M -N` as `alice` with `extra` options (e.g. `-L`/`-R` specs), control
    /// socket `<dir>/fwd-<name>`, `ExitOnForwardFailure=yes` and `LogLevel=INFO` (so that
    /// "Allocated port N" and channel-open failures show in its stderr), and waits (bounded)
    /// for the control socket. Run commands in the same connection with
    /// [`TestEnv::ssh_via`]; `ssh -S <ctl> -O forward …` adds forwards.
    pub fn forwarding_master(
        &self,
        server: &TestServer,
        name: &str,
        extra: &[&str],
    ) -> (Background, PathBuf) {
        self.forwarding_master_as(server, "alice", name, extra)
    }

    /// [`TestEnv::forwarding_master`] logged in as `user`.
    pub fn forwarding_master_as(
        &self,
        server: &TestServer,
        user: &str,
        name: &str,
        extra: &[&str],
    ) -> (Background, PathBuf) {
        let control = self.dir.path().join(format!("fwd-{name}"));
        let mut cmd = self.ssh_opts(server);
        cmd.args([
            "-M",
            "-N",
            "-o",
            "ControlPersist=no",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "LogLevel=INFO",
            "-S",
        ])
        .arg(&control)
        .args(extra)
        .arg(self.destination(user));
        let mut master = Background::spawn(&mut cmd, self.dir.path(), &format!("master-{name}"));
        let up = poll_until(Duration::from_secs(30), Duration::from_millis(20), || {
            if control.exists() {
                return Some(true);
            }
            master.exited().map(|_| false)
        });
        assert_eq!(
            up,
            Some(true),
            "ssh master {name} never came up (exit: {:?})\n--- its stderr ---\n{}\n--- server ---\n{}",
            master.exited(),
            master.stderr(),
            server.output()
        );
        (master, control)
    }

    /// `ssh -S <control> alice@127.0.0.1`, over an existing master; append the command
    /// (or put `-O forward -L …` before the destination via [`TestEnv::ssh_control`]).
    pub fn ssh_via(&self, server: &TestServer, control: &Path) -> Command {
        let mut cmd = self.ssh_control(server, control);
        cmd.arg(self.destination("alice"));
        cmd
    }

    /// `ssh -S <control>` without a destination.
    pub fn ssh_control(&self, server: &TestServer, control: &Path) -> Command {
        let mut cmd = self.ssh_opts(server);
        cmd.arg("-S").arg(control);
        cmd
    }
}

// ---------------------------------------------------------------------------
// Fake Kubernetes API server (tests/support/kubefake/kubefake.py)
// ---------------------------------------------------------------------------

/// The versioned kubectl binary of the Google Cloud SDK package (the `kubectl` on
/// PATH is only a dispatcher): `kubectl.1.<minor>` when given and installed, else
/// 1.32, else the newest `kubectl.1.3x`. `None` when no kubectl package exists.
pub fn kubectl_binary(minor: Option<u32>) -> Option<PathBuf> {
    let out = Command::new("dpkg")
        .args(["-L", "kubectl"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let files: Vec<PathBuf> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("/kubectl.1.3"))
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .collect();
    let want = |m: u32| {
        files
            .iter()
            .find(|p| p.to_string_lossy().ends_with(&format!("kubectl.1.{m}")))
            .cloned()
    };
    if let Some(m) = minor {
        return want(m);
    }
    want(32).or_else(|| files.iter().max().cloned())
}

/// A running `kubefake.py` with TLS (CA, server certificate for 127.0.0.1, client
/// certificate) generated by `openssl` in its own temp dir, bearer-token auth through a
/// token file the fake re-reads on every request ([`KubeFake::set_token`]), and two
/// kubeconfigs: [`KubeFake::kubeconfig_token`] and [`KubeFake::kubeconfig_cert`].
/// Every Docker container/volume it creates is labelled `kubefake=<prefix>`.
/// Dropping it sends SIGTERM (the fake removes its containers), waits (bounded),
/// SIGKILLs if needed and removes any leftovers by label.
pub struct KubeFake {
    child: Child,
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub url: String,
    pub prefix: String,
    pub token: String,
    pub token_file: PathBuf,
    pub ca_cert: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub kubeconfig_token: PathBuf,
    pub kubeconfig_cert: PathBuf,
    pub stderr_file: PathBuf,
}

impl KubeFake {
    /// The fake's script.
    pub fn script() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/kubefake/kubefake.py")
    }

    /// Starts the fake with default options.
    pub fn start() -> KubeFake {
        Self::start_with(&[])
    }

    /// Starts the fake with extra CLI arguments (e.g. `["--max-subprotocol", "v4"]`).
    pub fn start_with(extra: &[&str]) -> KubeFake {
        let dir = tempfile::Builder::new()
            .prefix("kubefake-")
            .tempdir()
            .expect("temp dir");
        let d = dir.path().to_path_buf();
        let openssl = |args: &[&str]| openssl_in(&d, args);
        std::fs::write(
            d.join("srv.ext"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )
        .expect("write srv.ext");
        std::fs::write(d.join("cli.ext"), "extendedKeyUsage=clientAuth\n").expect("cli.ext");
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-days",
            "2",
            "-subj",
            "/CN=kubefake-ca",
        ]);
        for (name, subj, ext) in [
            ("srv", "/CN=127.0.0.1", "srv.ext"),
            ("cli", "/O=system:masters/CN=kubefake-admin", "cli.ext"),
        ] {
            openssl_issue(&d, name, &["-newkey", "rsa:2048"], subj, ext);
        }
        let token = format!("kubefake-{}", random_hex(16));
        let token_file = d.join("token");
        std::fs::write(&token_file, &token).expect("write token");
        let prefix = format!("kf{}", random_hex(4));
        let stderr_file = d.join("kubefake.log");
        let mut child = Command::new("python3")
            .arg(Self::script())
            .args(["--listen", "127.0.0.1:0", "--prefix", &prefix])
            .arg("--tls-cert")
            .arg(d.join("srv.crt"))
            .arg("--tls-key")
            .arg(d.join("srv.key"))
            .arg("--client-ca")
            .arg(d.join("ca.crt"))
            .arg("--token-file")
            .arg(&token_file)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_file).expect("create kubefake.log"))
            .spawn()
            .expect("spawn python3 kubefake.py");
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            for _ in lines {}
        });
        let line = match rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "kubefake did not start:\n{}",
                    std::fs::read_to_string(&stderr_file).unwrap_or_default()
                );
            }
        };
        let url = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected kubefake line {line:?}"))
            .to_string();
        let port: u16 = url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        let kubeconfig = |user: &str| {
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: kubefake\n  cluster:\n    \
                 server: {url}\n    certificate-authority: {ca}\nusers:\n- name: u\n  user:\n{user}\
                 contexts:\n- name: kubefake\n  context:\n    cluster: kubefake\n    user: u\n    \
                 namespace: default\ncurrent-context: kubefake\n",
                ca = d.join("ca.crt").display()
            )
        };
        let kubeconfig_token = d.join("kubeconfig-token");
        std::fs::write(
            &kubeconfig_token,
            kubeconfig(&format!("    token: {token}\n")),
        )
        .expect("write kubeconfig");
        let kubeconfig_cert = d.join("kubeconfig-cert");
        std::fs::write(
            &kubeconfig_cert,
            kubeconfig(&format!(
                "    client-certificate: {}\n    client-key: {}\n",
                d.join("cli.crt").display(),
                d.join("cli.key").display()
            )),
        )
        .expect("write kubeconfig");
        std::fs::create_dir_all(d.join("home")).expect("home dir");
        KubeFake {
            child,
            port,
            url,
            prefix,
            token,
            token_file,
            ca_cert: d.join("ca.crt"),
            client_cert: d.join("cli.crt"),
            client_key: d.join("cli.key"),
            kubeconfig_token,
            kubeconfig_cert,
            stderr_file,
            dir,
        }
    }

    /// Replaces the accepted bearer token (the fake re-reads the file on every request).
    pub fn set_token(&self, token: &str) {
        std::fs::write(&self.token_file, token).expect("write token file");
    }

    /// A kubeconfig that authenticates with `token` (which may be wrong).
    pub fn kubeconfig_with_token(&self, token: &str) -> PathBuf {
        let text = std::fs::read_to_string(&self.kubeconfig_token).expect("read kubeconfig");
        let path = self
            .dir
            .path()
            .join(format!("kubeconfig-{}", random_hex(4)));
        std::fs::write(&path, text.replace(&self.token, token)).expect("write kubeconfig");
        path
    }

    /// The fake's request log (its stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.stderr_file).unwrap_or_default()
    }

    /// `kubectl` (`bin`) with a throwaway HOME and cache dir and the given kubeconfig.
    pub fn kubectl(&self, bin: &Path, kubeconfig: &Path) -> Command {
        let home = self.dir.path().join("home");
        let mut cmd = Command::new(bin);
        cmd.env("HOME", &home)
            .env_remove("KUBECONFIG")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--cache-dir")
            .arg(home.join("cache"));
        cmd
    }

    /// Names of the Docker containers of this fake (label `kubefake=<prefix>`), optionally
    /// only those of pod `pod` (any namespace).
    pub fn docker_containers(&self, pod: Option<&str>) -> Vec<String> {
        let mut cmd = Command::new("docker");
        cmd.args(["ps", "-a", "--format", "{{.Names}}", "--filter"])
            .arg(format!("label=kubefake={}", self.prefix));
        if let Some(pod) = pod {
            cmd.arg("--filter").arg(format!("label=kubefake.pod={pod}"));
        }
        let out = cmd.output().expect("docker ps");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect()
    }

    fn remove_leftovers(&self) {
        let label = format!("label=kubefake={}", self.prefix);
        let ids = Command::new("docker")
            .args(["ps", "-aq", "--filter", &label])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(["rm", "-fv"])
                .args(&ids)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let vols = Command::new("docker")
            .args(["volume", "ls", "-q", "--filter", &label])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        let vols: Vec<&str> = vols.split_whitespace().collect();
        if !vols.is_empty() {
            let _ = Command::new("docker")
                .args(["volume", "rm", "-f"])
                .args(&vols)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

impl Drop for KubeFake {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .stderr(Stdio::null())
            .status();
        let exited = poll_until(Duration::from_secs(20), Duration::from_millis(50), || {
            self.child.try_wait().ok().flatten()
        });
        if exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.remove_leftovers();
    }
}

/// Removes the named container when dropped: persistent-mode containers carry no instance
/// label, so the harness's own cleanup (by instance) does not see them, by design.
pub struct RemoveByName(pub String);

impl Drop for RemoveByName {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["rm", "-f", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

// ---------------------------------------------------------------------------
// Kubernetes backend configuration (tests/suite/kube_ssh.rs)
// ---------------------------------------------------------------------------

/// The agent init image for the Kubernetes backend: `FROM scratch` plus the static agent
/// ([`static_agent`]) at `/usr/bin/containerssh-agent` (the default `agentPath`), built
/// offline with `docker build` once per test process and tagged
/// `containerssh-agent-init:<first 12 hex digits of the agent's sha256>`, so an existing
/// image for the same agent bytes is reused.
pub fn agent_init_image() -> String {
    static IMAGE: OnceLock<String> = OnceLock::new();
    IMAGE
        .get_or_init(|| {
            let agent = static_agent();
            let bytes = std::fs::read(&agent).unwrap_or_else(|e| {
                panic!("cannot read the static agent {}: {e}", agent.display())
            });
            let tag = format!("containerssh-agent-init:{}", &sha256_hex(&bytes)[..12]);
            let exists = Command::new("docker")
                .args(["image", "inspect", &tag])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if exists {
                return tag;
            }
            let ctx = tempfile::Builder::new()
                .prefix("containerssh-agent-init-")
                .tempdir()
                .expect("temp dir for the agent init image");
            let dst = ctx.path().join("containerssh-agent");
            std::fs::write(&dst, &bytes).expect("copy the agent into the build context");
            must_run(Command::new("chmod").arg("0755").arg(&dst));
            std::fs::write(
                ctx.path().join("Dockerfile"),
                "FROM scratch\n\
                 COPY containerssh-agent /usr/bin/containerssh-agent\n\
                 LABEL containerssh_test_image=\"1\"\n",
            )
            .expect("write Dockerfile");
            // The legacy builder needs nothing from a registry for FROM scratch.
            must_run(
                Command::new("docker")
                    .env("DOCKER_BUILDKIT", "0")
                    .args(["build", "--rm", "--force-rm", "-q", "-t", &tag])
                    .arg(ctx.path()),
            );
            tag
        })
        .clone()
}

impl KubeFake {
    /// The lines under `kubernetes.connection:` (4-space indented) for this fake: its URL,
    /// its CA file and its (initial) bearer token.
    /// GET `path` with the fake's client certificate (works whatever the bearer token is):
    /// the HTTP status and the JSON body (`Null` when it is not JSON).
    pub fn api_get(&self, path: &str) -> (u16, serde_json::Value) {
        let out = run_with_timeout(
            Command::new("curl")
                .args(["-sS", "--max-time", "20", "--cacert"])
                .arg(&self.ca_cert)
                .arg("--cert")
                .arg(&self.client_cert)
                .arg("--key")
                .arg(&self.client_key)
                .args(["-w", "\n%{http_code}"])
                .arg(format!("{}{path}", self.url)),
            None,
            Duration::from_secs(30),
        );
        let body = String::from_utf8_lossy(&out.stdout).into_owned();
        let (json, code) = body.rsplit_once('\n').unwrap_or(("", body.as_str()));
        let code: u16 = code.trim().parse().unwrap_or_else(|_| {
            panic!(
                "curl {path}: no HTTP status ({}): {body}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (
            code,
            serde_json::from_str(json).unwrap_or(serde_json::Value::Null),
        )
    }

    pub fn connection_yaml(&self) -> String {
        format!(
            "    host: {}\n    cacertFile: {}\n    bearerToken: {}\n",
            yaml_str(&self.url),
            yaml_str(&self.ca_cert.display().to_string()),
            yaml_str(&self.token)
        )
    }
}

impl TestEnv {
    /// [`TestEnv::config_yaml`] with the `backend: docker` + `docker:` block replaced by
    /// `backend: kubernetes` against `fake` (see [`TestEnv::kube_config_yaml_with`]).
    pub fn kube_config_yaml(&self, fake: &KubeFake, mode: &str, pod_extra: &str) -> String {
        self.kube_config_yaml_with(&fake.connection_yaml(), mode, pod_extra)
    }

    /// [`TestEnv::config_yaml`] with the Docker backend replaced by
    ///
    /// ```yaml
    /// backend: kubernetes
    /// kubernetes:
    ///   connection:
    ///     <connection: lines, 4-space indented>
    ///   pod:
    ///     metadata: {namespace: default, labels: {containerssh_test: "1"}}
    ///     spec: {containers: [{name: shell, image: <test image>}]}
    ///     mode: <mode>
    ///     shellCommand: ["/bin/sh"]
    ///     agentInitImage: <agent_init_image()>
    ///     <pod_extra: lines, 4-space indented>
    /// ```
    ///
    /// Everything else (ssh, auth, agent, log, instanceId, stateDirectory) is kept.
    pub fn kube_config_yaml_with(&self, connection: &str, mode: &str, pod_extra: &str) -> String {
        let base = self.config_yaml(mode);
        let start = base
            .find("backend: docker\n")
            .expect("config_yaml has `backend: docker`");
        let end = base.find("agent:\n").expect("config_yaml has `agent:`");
        assert!(start < end, "config_yaml layout changed");
        let mut connection = connection.to_string();
        if !connection.is_empty() && !connection.ends_with('\n') {
            connection.push('\n');
        }
        let mut pod_extra = pod_extra.to_string();
        if !pod_extra.is_empty() && !pod_extra.ends_with('\n') {
            pod_extra.push('\n');
        }
        let kube = format!(
            "backend: kubernetes\n\
             kubernetes:\n\
             \x20 connection:\n\
             {connection}\
             \x20 pod:\n\
             \x20   metadata:\n\
             \x20     namespace: default\n\
             \x20     labels:\n\
             \x20       containerssh_test: \"1\"\n\
             \x20   spec:\n\
             \x20     containers:\n\
             \x20       - name: shell\n\
             \x20         image: {image}\n\
             \x20   mode: {mode}\n\
             \x20   shellCommand: [\"/bin/sh\"]\n\
             \x20   agentInitImage: {init}\n\
             {pod_extra}",
            image = yaml_str(&test_image()),
            // "connection-exec" is connection mode; config_yaml above set sessionServer.
            mode = yaml_str(mode.strip_suffix("-exec").unwrap_or(mode)),
            init = yaml_str(&agent_init_image()),
        );
        format!("{}{kube}{}", &base[..start], &base[end..])
    }
}

/// `ssh` (as built by [`TestEnv::ssh`]) with `-tt` and `remote`, as one shell command line
/// for a terminal (tmux) to run.
pub fn tty_command_line(ssh: &Command, remote: &str) -> String {
    let mut line: Vec<String> = vec![ssh.get_program().to_string_lossy().into_owned()];
    line.extend(ssh.get_args().map(|a| format!("'{}'", a.to_string_lossy())));
    line.insert(1, "-tt".into());
    format!("{} '{}'", line.join(" "), remote)
}

/// A tmux server of our own, so a real terminal drives `ssh -tt`.
pub struct Tmux {
    socket: String,
}

impl Tmux {
    pub fn new(env: &TestEnv) -> Self {
        Self {
            socket: format!("cssh-{}", env.instance),
        }
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new("tmux");
        c.args(["-L", &self.socket, "-f", "/dev/null"]);
        c
    }

    /// Starts the terminal (`cols` × `rows`) running `line` in a shell.
    pub fn start(&self, cols: u16, rows: u16, line: &str) {
        let (cols, rows) = (cols.to_string(), rows.to_string());
        self.run(&[
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            &cols,
            "-y",
            &rows,
            line,
        ]);
    }

    pub fn run(&self, args: &[&str]) {
        let st = self.cmd().args(args).status().expect("tmux");
        assert!(st.success(), "tmux {args:?} failed");
    }

    pub fn screen(&self) -> String {
        let out = self
            .cmd()
            .args(["capture-pane", "-p", "-t", "t"])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits for `needle` on screen; the terminal offers no event to wait on, so this polls
    /// the screen until a deadline.
    pub fn wait_for(&self, needle: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.screen().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").status();
    }
}

/// A process's resident memory, from `/proc`.
pub mod rss {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    use std::thread;
    use std::time::Duration;

    /// `pid`'s resident memory now, in KiB (0 when it is gone).
    pub fn kib(pid: u32) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Samples `pid`'s resident memory every 20 ms until `stop`; the peak so far, in KiB.
    pub fn sample_peak(
        pid: u32,
        stop: Arc<AtomicBool>,
    ) -> (Arc<AtomicU64>, thread::JoinHandle<()>) {
        let peak = Arc::new(AtomicU64::new(0));
        let sampler = {
            let peak = Arc::clone(&peak);
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(kib(pid), Ordering::Relaxed);
                    thread::sleep(Duration::from_millis(20));
                }
            })
        };
        (peak, sampler)
    }
}

/// russh's client, for requests the OpenSSH client cannot send (signals, raw channel
/// requests): connects and logs in as `alice` with the environment's key.
pub mod russh_client {
    use std::sync::Arc;

    use russh::client::{self, Handle};
    use russh::keys::{load_secret_key, PrivateKeyWithHashAlg, PublicKeyOrCertificate};

    use super::{TestEnv, TestServer};

    /// Accepts any host key (the test server's is generated per run) and keeps the server's
    /// disconnect message.
    #[derive(Clone, Default)]
    pub struct Recorder {
        pub disconnect: Arc<std::sync::Mutex<Option<(russh::Disconnect, String)>>>,
    }

    impl client::Handler for Recorder {
        type Error = russh::Error;

        async fn check_server_key(
            &mut self,
            _key: &PublicKeyOrCertificate,
        ) -> Result<bool, Self::Error> {
            Ok(true)
        }

        async fn disconnected(
            &mut self,
            reason: client::DisconnectReason<Self::Error>,
        ) -> Result<(), Self::Error> {
            match reason {
                client::DisconnectReason::ReceivedDisconnect(info) => {
                    *self.disconnect.lock().unwrap() = Some((info.reason_code, info.message));
                    Ok(())
                }
                client::DisconnectReason::Error(e) => Err(e),
            }
        }
    }

    /// A session that has not authenticated, from `from` (an address on the loopback range)
    /// to `to`; an error when the server refuses it (at its door, say).
    pub async fn try_connect_from(
        to: std::net::SocketAddr,
        from: std::net::IpAddr,
    ) -> Result<(Handle<Recorder>, Recorder), russh::Error> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(std::net::SocketAddr::new(from, 0))?;
        let stream = socket.connect(to).await?;
        let recorder = Recorder::default();
        let config = Arc::new(client::Config::default());
        let handle = client::connect_stream(config, stream, recorder.clone()).await?;
        Ok((handle, recorder))
    }

    /// [`try_connect_from`] to `server`, which must let it in.
    pub async fn connect_from(
        server: &TestServer,
        from: std::net::IpAddr,
    ) -> (Handle<Recorder>, Recorder) {
        try_connect_from(server.addr, from)
            .await
            .expect("connect and SSH handshake")
    }

    pub async fn connect(env: &TestEnv, server: &TestServer) -> Handle<Recorder> {
        connect_with(env, server, Recorder::default()).await
    }

    /// [`connect`] with a client handler of the test's own.
    pub async fn connect_with<H: client::Handler + Send + 'static>(
        env: &TestEnv,
        server: &TestServer,
        handler: H,
    ) -> Handle<H> {
        let config = Arc::new(client::Config::default());
        let mut handle = client::connect(config, server.addr, handler)
            .await
            .expect("connect");
        let key = load_secret_key(&env.client_key, None).expect("client key");
        let auth = handle
            .authenticate_publickey("alice", PrivateKeyWithHashAlg::new(Arc::new(key), None))
            .await
            .expect("auth");
        assert!(auth.success(), "authentication failed");
        handle
    }

    /// The reply to the channel request just sent (`want_reply`): success or failure.
    pub async fn reply(ch: &mut russh::Channel<client::Msg>) -> bool {
        loop {
            match ch.wait().await {
                Some(russh::ChannelMsg::Success) => return true,
                Some(russh::ChannelMsg::Failure) => return false,
                Some(_) => {}
                None => panic!("channel closed before the reply"),
            }
        }
    }

    /// Runs `cmd` on a new channel of `handle`: its stdout and exit status.
    pub async fn run<H: client::Handler>(handle: &Handle<H>, cmd: &str) -> (Vec<u8>, Option<u32>) {
        let mut ch = handle.channel_open_session().await.expect("channel opens");
        ch.exec(true, cmd).await.expect("exec");
        let (mut out, mut status) = (Vec::new(), None);
        while let Some(msg) = ch.wait().await {
            match msg {
                russh::ChannelMsg::Data { data } => out.extend_from_slice(&data),
                russh::ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                _ => {}
            }
        }
        (out, status)
    }
}

/// Runs `openssl args` in `dir`; panics with its stderr when it fails.
pub fn openssl_in(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issues `<name>.key` and `<name>.crt` in `dir`: a new key made with `key_args` (e.g.
/// `["-newkey", "rsa:2048"]`), signed for 2 days by `ca.crt`/`ca.key` in `dir` with the
/// extensions in the file `ext`.
pub fn openssl_issue(dir: &Path, name: &str, key_args: &[&str], subj: &str, ext: &str) {
    let (key, csr, crt) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.crt"),
    );
    let mut args = vec!["req"];
    args.extend(key_args);
    args.extend(["-nodes", "-keyout", &key, "-out", &csr, "-subj", subj]);
    openssl_in(dir, &args);
    openssl_in(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &crt,
            "-days",
            "2",
            "-extfile",
            ext,
        ],
    );
}

/// `containerssh audit decode FILE`: its messages and what it said on stderr; `Err` (with
/// stderr) when it failed.
pub fn audit_decode(path: &Path) -> Result<(Vec<serde_json::Value>, String), String> {
    let out = run_with_timeout(
        Command::new(SERVER_BIN).args(["audit", "decode"]).arg(path),
        None,
        Duration::from_secs(90),
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if !out.status.success() {
        return Err(stderr);
    }
    let msgs = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    Ok((msgs, stderr))
}

/// The bytes of a decoded `io` message (base64 in the JSON).
pub fn audit_data(msg: &serde_json::Value) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(msg["payload"]["data"].as_str().unwrap_or(""))
        .expect("io data is base64")
}

/// Waits (bounded) for the one binary recording in `dir` to end (its disconnect message);
/// its path and messages.
pub fn finished_binary_recording(
    dir: &Path,
    context: impl Fn() -> String,
) -> (PathBuf, Vec<serde_json::Value>) {
    poll_until(Duration::from_secs(30), Duration::from_millis(100), || {
        let one = only_file(dir)?;
        let (msgs, _) = audit_decode(&one).ok()?;
        (msgs.last()?["type"] == 1).then_some((one, msgs))
    })
    .unwrap_or_else(|| {
        panic!(
            "no finished binary recording in {}\n{}",
            dir.display(),
            context()
        )
    })
}

/// The path of the one entry in `dir`; `None` while it has none or several.
pub fn only_file(dir: &Path) -> Option<PathBuf> {
    let entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    match entries.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    }
}

/// The first line of the metrics endpoint on `port` that starts with `line_start` (a sample);
/// `None` while the endpoint does not answer or has no such line.
pub fn metric_line(port: u16, line_start: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find(|l| l.starts_with(line_start))
        .map(str::to_string)
}
