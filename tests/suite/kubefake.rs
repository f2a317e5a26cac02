//! The fake Kubernetes API server (`tests/support/kubefake/kubefake.py`), checked with
//! the real kubectl (the Google Cloud SDK's versioned `kubectl.1.32` binary) over TLS:
//! discovery + get, token / wrong token / rotated token / client certificate, `run -i`
//! (attach + exit code from the pod status), exec (separate stdout/stderr, exit code,
//! stdin EOF through the v5 CLOSE signal), `exec -it` with a resize, `attach -it`,
//! graceful delete (Docker container removed) and an image that cannot be pulled.
//! `KUBEFAKE_KUBECTL_MINOR=31` selects another installed `kubectl.1.<minor>`.

use crate::support;

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use support::{kubectl_binary, poll_until, run_with_timeout, test_image, KubeFake};

const CMD_TIMEOUT: Duration = Duration::from_secs(60);

/// Drives a command on a pseudo-terminal: `ptydrive ROWS COLS STEPS_JSON -- CMD...`.
/// Steps: `["expect", text, seconds]`, `["send", text]`, `["resize", rows, cols]`
/// (TIOCSWINSZ on the pty + SIGWINCH). Prints the transcript; exits with the child's
/// status, or 99 when an expectation times out (98: child did not exit).
const PTY_DRIVER: &str = r#"
import fcntl, json, os, pty, select, signal, struct, sys, termios, time
rows, cols, steps = int(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
cmd = sys.argv[5:]
pid, fd = pty.fork()
if pid == 0:
    os.execvp(cmd[0], cmd)
def setsize(r, c):
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", r, c, 0, 0))
setsize(rows, cols)
buf = b""
def pump(t):
    global buf
    r, _, _ = select.select([fd], [], [], t)
    if r:
        try:
            d = os.read(fd, 65536)
        except OSError:
            d = b""
        if not d:
            return False
        buf += d
    return True
def done(code, why=""):
    sys.stdout.write(buf.decode(errors="replace"))
    if why:
        sys.stdout.write("\n[ptydrive] " + why + "\n")
    sys.stdout.flush()
    os._exit(code)
pos = 0
for st in steps:
    if st[0] == "expect":
        deadline = time.monotonic() + st[2]
        while st[1].encode() not in buf[pos:]:
            left = deadline - time.monotonic()
            if left <= 0 or (not pump(min(left, 0.2)) and st[1].encode() not in buf[pos:]):
                os.kill(pid, signal.SIGKILL)
                done(99, "timeout/EOF waiting for %r" % st[1])
        pos = buf.index(st[1].encode(), pos) + len(st[1])
    elif st[0] == "send":
        os.write(fd, st[1].encode())
    elif st[0] == "resize":
        setsize(st[1], st[2])
        os.kill(pid, signal.SIGWINCH)
deadline = time.monotonic() + 30
eof = False
while time.monotonic() < deadline:
    if not eof:
        eof = not pump(0.2)
    else:
        time.sleep(0.05)
    p, status = os.waitpid(pid, os.WNOHANG)
    if p:
        while pump(0.1):
            pass
        done(os.waitstatus_to_exitcode(status))
os.kill(pid, signal.SIGKILL)
done(98, "child did not exit")
"#;

struct Kube {
    fake: KubeFake,
    bin: PathBuf,
}

impl Kube {
    fn start() -> Kube {
        // KUBEFAKE_KUBECTL_MINOR=30 (etc.) runs the suite with another installed kubectl.
        let minor = std::env::var("KUBEFAKE_KUBECTL_MINOR")
            .ok()
            .and_then(|m| m.trim().parse().ok());
        let bin = kubectl_binary(minor)
            .expect("no versioned kubectl (kubectl.1.3x from the kubectl package) installed");
        Kube {
            fake: KubeFake::start(),
            bin,
        }
    }

    /// kubectl with the bearer-token kubeconfig.
    fn kubectl(&self) -> Command {
        self.fake.kubectl(&self.bin, &self.fake.kubeconfig_token)
    }

    fn run(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        run_with_timeout(self.kubectl().args(args), stdin, CMD_TIMEOUT)
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args, None);
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            self.describe(&out)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    }

    fn describe(&self, out: &Output) -> String {
        format!(
            "status {:?}\n--- stdout\n{}\n--- stderr\n{}\n--- kubefake log (tail)\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            tail(&self.fake.log(), 40)
        )
    }

    /// A running pod whose PID 1 exits on SIGTERM.
    fn idle_pod(&self, name: &str) {
        self.ok(&[
            "run",
            name,
            &format!("--image={}", test_image()),
            "--restart=Never",
            "--command",
            "--",
            "sh",
            "-c",
            "trap 'exit 0' TERM; while true; do sleep 1; done",
        ]);
        self.wait_ready(name);
    }

    fn wait_ready(&self, name: &str) {
        self.ok(&[
            "wait",
            "--for=condition=Ready",
            &format!("pod/{name}"),
            "--timeout=40s",
        ]);
    }

    /// Runs `kubectl ARGS` on a pty (rows x cols) following `steps`.
    fn pty(&self, rows: u16, cols: u16, steps: &str, args: &[&str]) -> Output {
        let kubectl = self.kubectl();
        let mut cmd = Command::new("python3");
        cmd.args([
            "-c",
            PTY_DRIVER,
            &rows.to_string(),
            &cols.to_string(),
            steps,
            "--",
        ])
        .arg(kubectl.get_program());
        cmd.args(kubectl.get_args());
        for (k, v) in kubectl.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd.args(args);
        run_with_timeout(&mut cmd, None, CMD_TIMEOUT)
    }
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).to_string()
}

#[test]
fn get_pods_and_authentication() {
    let k = Kube::start();
    let out = k.run(&["get", "pods"], None);
    assert!(out.status.success(), "{}", k.describe(&out));
    assert!(
        text(&out.stderr).contains("No resources found"),
        "{}",
        k.describe(&out)
    );

    k.idle_pod("p1");
    let listed = k.ok(&["get", "pods"]);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("p1 ") && l.contains("Running")),
        "get pods: {listed}"
    );
    let name = k.ok(&["get", "pod", "p1", "-o", "jsonpath={.metadata.name}"]);
    assert_eq!(name, "p1");

    // A wrong token is refused.
    let wrong = k.fake.kubeconfig_with_token("not-the-token");
    let out = run_with_timeout(
        k.fake.kubectl(&k.bin, &wrong).args(["get", "pods"]),
        None,
        CMD_TIMEOUT,
    );
    assert!(!out.status.success(), "{}", k.describe(&out));
    assert!(
        text(&out.stderr).contains("Unauthorized"),
        "{}",
        k.describe(&out)
    );

    // The client certificate works without any token.
    let out = run_with_timeout(
        k.fake
            .kubectl(&k.bin, &k.fake.kubeconfig_cert)
            .args(["get", "pods"]),
        None,
        CMD_TIMEOUT,
    );
    assert!(out.status.success(), "{}", k.describe(&out));
    assert!(text(&out.stdout).contains("p1"), "{}", k.describe(&out));

    // Rotating the token: the old one stops working, the new one works.
    k.fake.set_token("rotated-token");
    let out = k.run(&["get", "pods"], None);
    assert!(
        text(&out.stderr).contains("Unauthorized"),
        "{}",
        k.describe(&out)
    );
    let rotated = k.fake.kubeconfig_with_token("rotated-token");
    let out = run_with_timeout(
        k.fake.kubectl(&k.bin, &rotated).args(["get", "pods"]),
        None,
        CMD_TIMEOUT,
    );
    assert!(out.status.success(), "{}", k.describe(&out));
}

#[test]
fn run_interactive_exit_code() {
    let k = Kube::start();
    let out = k.run(
        &[
            "run",
            "t1",
            &format!("--image={}", test_image()),
            "--restart=Never",
            "-i",
            "--command",
            "--",
            "sh",
            "-c",
            "read x; echo got $x; exit 3",
        ],
        Some(b"hi\n"),
    );
    assert_eq!(out.status.code(), Some(3), "{}", k.describe(&out));
    assert!(text(&out.stdout).contains("got hi"), "{}", k.describe(&out));
    let phase = k.ok(&["get", "pod", "t1", "-o", "jsonpath={.status.phase}"]);
    assert_eq!(phase, "Failed");
    // The output is also available through pods/log.
    let logs = k.ok(&["logs", "t1"]);
    assert!(logs.contains("got hi"), "logs: {logs}");
}

#[test]
fn exec_streams_exit_code_and_stdin_eof() {
    let k = Kube::start();
    k.idle_pod("e1");
    let out = k.run(
        &[
            "exec",
            "e1",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 42",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(42), "{}", k.describe(&out));
    assert_eq!(text(&out.stdout), "out\n", "{}", k.describe(&out));
    let stderr = text(&out.stderr);
    assert!(stderr.starts_with("err\n"), "{}", k.describe(&out));
    assert!(
        stderr.contains("command terminated with exit code 42"),
        "{}",
        k.describe(&out)
    );
    assert!(!text(&out.stdout).contains("err"));

    let out = k.run(&["exec", "-i", "e1", "--", "wc", "-l"], Some(b"a\nb\n"));
    assert!(out.status.success(), "{}", k.describe(&out));
    assert_eq!(text(&out.stdout).trim(), "2", "{}", k.describe(&out));
    assert!(k.fake.log().contains("proto=v5.channel.k8s.io"));

    // A missing binary is an InternalError (as with containerd), not exit 127.
    let out = k.run(&["exec", "e1", "--", "/no/such/binary"], None);
    assert!(!out.status.success(), "{}", k.describe(&out));
    assert!(
        text(&out.stderr).contains("Internal error occurred"),
        "{}",
        k.describe(&out)
    );
}

#[test]
fn exec_tty_follows_resize() {
    let k = Kube::start();
    k.idle_pod("e2");
    let steps = r##"[["expect","# ",20],["send","stty size\r"],["expect","30 100",10],
        ["resize",40,120],["send","stty size\r"],["expect","40 120",10],["send","exit 5\r"]]"##;
    let out = k.pty(30, 100, steps, &["exec", "-it", "e2", "--", "sh"]);
    assert_eq!(out.status.code(), Some(5), "{}", k.describe(&out));
    assert!(text(&out.stdout).contains("40 120"), "{}", k.describe(&out));
}

#[test]
fn attach_tty() {
    let k = Kube::start();
    let pod = format!(
        r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"a1"}},"spec":{{"restartPolicy":"Never",
        "containers":[{{"name":"a1","image":"{}","command":["sh"],"stdin":true,"stdinOnce":true,"tty":true}}]}}}}"#,
        test_image()
    );
    let out = k.run(
        &["create", "--validate=false", "-f", "-"],
        Some(pod.as_bytes()),
    );
    assert!(out.status.success(), "{}", k.describe(&out));
    k.wait_ready("a1");
    let steps = r##"[["expect","pressing enter",20],["send","\r"],["expect","# ",10],
        ["send","echo hello-$((6*7))\r"],["expect","hello-42",10],
        ["send","stty size\r"],["expect","30 100",10],["send","exit 4\r"]]"##;
    let out = k.pty(30, 100, steps, &["attach", "-it", "a1"]);
    assert!(out.status.success(), "{}", k.describe(&out));
    // attach carries no exit code: it is in the pod status.
    let code = poll_until(Duration::from_secs(20), Duration::from_millis(200), || {
        let c = k.ok(&[
            "get",
            "pod",
            "a1",
            "-o",
            "jsonpath={.status.containerStatuses[0].state.terminated.exitCode}",
        ]);
        (!c.is_empty()).then_some(c)
    });
    assert_eq!(code.as_deref(), Some("4"), "{}", tail(&k.fake.log(), 40));
}

#[test]
fn delete_removes_container() {
    let k = Kube::start();
    k.idle_pod("d1");
    assert_eq!(k.fake.docker_containers(Some("d1")).len(), 1);
    let out = k.run(&["delete", "pod", "d1"], None);
    assert!(out.status.success(), "{}", k.describe(&out));
    assert!(
        text(&out.stdout).contains("deleted"),
        "{}",
        k.describe(&out)
    );
    let out = k.run(&["get", "pod", "d1"], None);
    assert!(!out.status.success(), "{}", k.describe(&out));
    assert!(
        text(&out.stderr).contains(r#"pods "d1" not found"#),
        "{}",
        k.describe(&out)
    );
    let gone = poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
        k.fake
            .docker_containers(Some("d1"))
            .is_empty()
            .then_some(())
    });
    assert!(gone.is_some(), "container of d1 still exists");
}

/// `kubectl label` and `annotate` (JSON merge patches) change a running pod's metadata, a
/// `-` removes a key, a bad label value is refused with the API's message, and a patch of
/// anything else is refused as the API server refuses pod spec changes.
#[test]
fn label_annotate_and_patch_metadata() {
    let k = Kube::start();
    k.idle_pod("lp1");
    k.ok(&["label", "pod", "lp1", "team=blue", "tier=lab"]);
    k.ok(&["annotate", "pod", "lp1", "example.com/who=alice"]);
    k.ok(&["label", "pod", "lp1", "tier-"]);
    let labels = k.ok(&["get", "pod", "lp1", "-o", "jsonpath={.metadata.labels}"]);
    assert!(labels.contains(r#""team":"blue""#), "{labels}");
    assert!(!labels.contains("tier"), "{labels}");
    let who = k.ok(&[
        "get",
        "pod",
        "lp1",
        "-o",
        r"jsonpath={.metadata.annotations.example\.com/who}",
    ]);
    assert_eq!(who, "alice");
    let selected = k.ok(&["get", "pods", "-l", "team=blue", "-o", "name"]);
    assert_eq!(selected.trim(), "pod/lp1");

    // kubectl checks a label's value itself; a merge patch reaches the server's check.
    let out = k.run(
        &[
            "patch",
            "pod",
            "lp1",
            "--type=merge",
            "-p",
            r#"{"metadata":{"labels":{"bad":"not valid!"}}}"#,
        ],
        None,
    );
    assert!(!out.status.success(), "{}", k.describe(&out));
    assert!(
        text(&out.stderr).contains("Invalid value"),
        "{}",
        k.describe(&out)
    );
    let out = k.run(
        &[
            "patch",
            "pod",
            "lp1",
            "--type=merge",
            "-p",
            r#"{"spec":{"restartPolicy":"Always","activeDeadlineSeconds":5}}"#,
        ],
        None,
    );
    assert!(!out.status.success(), "{}", k.describe(&out));
    assert!(
        text(&out.stderr).contains("Forbidden"),
        "{}",
        k.describe(&out)
    );
    // The pod is as it was: still running, its labels unchanged by the refused patches.
    let labels = k.ok(&["get", "pod", "lp1", "-o", "jsonpath={.metadata.labels}"]);
    assert!(
        labels.contains(r#""team":"blue""#) && !labels.contains("bad"),
        "{labels}"
    );
}

#[test]
fn missing_image_is_image_pull_backoff() {
    let k = Kube::start();
    k.ok(&[
        "run",
        "bad",
        "--image=kubefake.invalid/nonexistent:1",
        "--restart=Never",
    ]);
    let status = poll_until(Duration::from_secs(20), Duration::from_millis(200), || {
        let out = k.ok(&["get", "pod", "bad"]);
        (out.contains("ImagePullBackOff") || out.contains("ErrImagePull")).then_some(out)
    });
    assert!(status.is_some(), "{}", tail(&k.fake.log(), 40));
    assert!(k.fake.docker_containers(Some("bad")).is_empty());
}
