//! Audit recordings (`audit`, format asciinema, storage file), replayed by the real
//! `asciinema` (PyPI 2.x): a terminal session through tmux with a resize and typed input, an
//! exec with stdout and stderr, a password login that leaves no trace of the password.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{
    audit_data, audit_decode, finished_binary_recording, poll_until, run_with_timeout,
    tty_command_line, TestEnv, Tmux,
};

const CMD_TIMEOUT: Duration = Duration::from_secs(90);

fn with_audit(yaml: &str, dir: &Path, stdin: bool) -> String {
    format!(
        "{yaml}audit:\n  enable: true\n  format: asciinema\n  storage: file\n  file:\n    directory: {}\n  intercept:\n    stdin: {stdin}\n    stdout: true\n    stderr: true\n",
        dir.display()
    )
}

/// alice's password in the password file the test config uses.
fn use_password(env: &TestEnv, password: &str) {
    let hash = run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_containerssh")).arg("--hash-password"),
        Some(format!("{password}\n").as_bytes()),
        CMD_TIMEOUT,
    );
    std::fs::write(
        &env.password_file,
        format!("alice:{}\n", String::from_utf8_lossy(&hash.stdout).trim()),
    )
    .unwrap();
}

fn audit_dir(env: &TestEnv) -> PathBuf {
    let dir = env.path().join("audit");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Waits (bounded) for the one recording in `dir` to hold its exit marker; its lines.
fn finished_recording(dir: &Path) -> (PathBuf, Vec<Value>) {
    let found = poll_until(Duration::from_secs(30), Duration::from_millis(100), || {
        let one = support::only_file(dir)?;
        let text = std::fs::read_to_string(&one).ok()?;
        text.contains("\"exit status").then_some((one, text))
    });
    let (path, text) = found.unwrap_or_else(|| {
        panic!(
            "no finished recording in {}: {:?}",
            dir.display(),
            std::fs::read_dir(dir).map(|d| d.count())
        )
    });
    let lines = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    (path, lines)
}

fn events<'a>(lines: &'a [Value], code: &str) -> Vec<&'a str> {
    lines
        .iter()
        .skip(1)
        .filter(|e| e[1] == code)
        .filter_map(|e| e[2].as_str())
        .collect()
}

fn asciinema_cat(path: &Path) -> String {
    let out = Command::new("python3")
        .args(["-m", "asciinema", "cat"])
        .arg(path)
        .output()
        .expect("asciinema");
    assert!(
        out.status.success(),
        "asciinema cat: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_terminal_session_is_recorded_with_its_size_resizes_input_and_exit() {
    let env = TestEnv::new();
    let dir = audit_dir(&env);
    let server = env.start(&with_audit(&env.config_yaml("connection"), &dir, true));
    let remote = "echo hello-$((6*7)); stty size; while read x; do stty size; [ \"$x\" = q ] && exit 3; done";
    let tmux = Tmux::new(&env);
    tmux.start(
        91,
        27,
        &format!(
            "{}; sleep 60",
            tty_command_line(&env.ssh(&server, "alice"), remote)
        ),
    );
    assert!(
        tmux.wait_for("27 91", Duration::from_secs(60)),
        "{}\n{}",
        tmux.screen(),
        server.output()
    );
    tmux.run(&["resize-window", "-t", "t", "-x", "120", "-y", "40"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut resized = false;
    while Instant::now() < deadline && !resized {
        tmux.run(&["send-keys", "-t", "t", "Enter"]);
        resized = tmux.wait_for("40 120", Duration::from_millis(500));
    }
    assert!(resized, "{}", tmux.screen());
    tmux.run(&["send-keys", "-t", "t", "q", "Enter"]);

    let (path, lines) = finished_recording(&dir);
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    assert!(name.ends_with(".cast") && name.len() > 32 + 5, "{name}");
    let header = &lines[0];
    assert_eq!(header["version"], 2);
    assert_eq!(
        (header["width"].as_u64(), header["height"].as_u64()),
        (Some(91), Some(27))
    );
    let env_keys: Vec<&String> = header["env"].as_object().unwrap().keys().collect();
    assert!(
        env_keys.iter().all(|k| *k == "TERM" || *k == "SHELL")
            && env_keys.contains(&&"TERM".to_string()),
        "{header}"
    );
    assert!(events(&lines, "r").contains(&"120x40"), "{lines:?}");
    assert!(
        events(&lines, "i").concat().contains('q'),
        "typed input is recorded: {lines:?}"
    );
    assert_eq!(
        events(&lines, "m").last(),
        Some(&"exit status 3"),
        "{lines:?}"
    );
    let times: Vec<f64> = lines[1..].iter().filter_map(|e| e[0].as_f64()).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");

    let played = asciinema_cat(&path);
    assert!(played.contains("hello-42"), "{played}");
    assert!(played.contains("40 120"), "{played}");
}

#[test]
fn an_exec_keeps_stdout_and_stderr_and_a_password_leaves_no_trace() {
    let env = TestEnv::new();
    let dir = audit_dir(&env);
    let password = "Zebra-Quokka-77";
    use_password(&env, password);
    let server = env.start(&with_audit(&env.config_yaml("connection"), &dir, false));
    let out = run_with_timeout(
        env.ssh_password(&server, "alice", password)
            .arg("echo to-out; echo to-err >&2; cat >/dev/null; exit 5"),
        Some(b"typed but not intercepted\n"),
        CMD_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(5), "{}", server.output());
    let (path, lines) = finished_recording(&dir);
    let output = events(&lines, "o").concat();
    assert!(
        output.contains("to-out") && output.contains("to-err"),
        "{lines:?}"
    );
    assert!(events(&lines, "m").contains(&"stderr"), "{lines:?}");
    assert!(
        events(&lines, "i").is_empty(),
        "stdin is not intercepted: {lines:?}"
    );
    assert_eq!(events(&lines, "m").last(), Some(&"exit status 5"));
    let raw = std::fs::read_to_string(&path).unwrap();
    assert!(
        !raw.contains(password) && !raw.contains("typed but"),
        "{raw}"
    );
    // Without a terminal: ContainerSSH's 80 columns.
    assert_eq!(lines[0]["width"].as_u64(), Some(80));
    // The recording's end did nothing the sandbox forbids: the server still serves.
    let out = run_with_timeout(env.ssh(&server, "alice").arg("true"), None, CMD_TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "{}", server.output());
}

#[test]
fn a_missing_directory_stops_the_start_naming_the_key() {
    let env = TestEnv::new();
    let file = env.path().join("bad.yaml");
    std::fs::write(
        &file,
        with_audit(
            &env.config_yaml("connection"),
            &env.path().join("nowhere"),
            false,
        ),
    )
    .unwrap();
    let out = run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_containerssh"))
            .arg("--config")
            .arg(&file),
        None,
        CMD_TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr.contains("audit.file.directory"), "{stderr}");
}

fn with_binary_audit(yaml: &str, dir: &Path) -> String {
    format!(
        "{yaml}audit:\n  enable: true\n  format: binary\n  storage: file\n  file:\n    directory: {}\n  intercept:\n    stdin: true\n    stdout: true\n    stderr: true\n    passwords: true\n",
        dir.display()
    )
}

/// The same file read by an independent CBOR decoder (Python's cbor2), the way ContainerSSH's
/// decoder reads it: the 40-byte header, then a gzip stream of CBOR items one after another.
fn cbor2_decode(path: &Path) -> Vec<Value> {
    let script = r#"
import base64, cbor2, io, json, sys, zlib
raw = open(sys.argv[1], "rb").read()
assert raw[:32].rstrip(b"\0") == b"ContainerSSH-Auditlog", raw[:32]
assert int.from_bytes(raw[32:40], "little") == 2
stream = io.BytesIO(zlib.decompress(raw[40:], 31))
end = len(stream.getbuffer())
dec = cbor2.CBORDecoder(stream)
def plain(v):
    if isinstance(v, bytes):
        return {"bytes": base64.b64encode(v).decode()}
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    return v
while stream.tell() < end:
    print(json.dumps(plain(dec.decode())))
"#;
    let out = run_with_timeout(
        Command::new("python3").arg("-c").arg(script).arg(path),
        None,
        CMD_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "cbor2: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_binary_recording_is_containerssh_s_format_and_replays_at_its_pace() {
    let env = TestEnv::new();
    let dir = audit_dir(&env);
    let password = "Walrus-Pelican-93";
    use_password(&env, password);
    let server = env.start(&with_binary_audit(&env.config_yaml("connection"), &dir));
    let out = run_with_timeout(
        env.ssh_password(&server, "alice", password)
            .arg("read x; echo got-$x; echo to-err >&2; sleep 1; echo later; exit 5"),
        Some(b"typed\n"),
        CMD_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(5), "{}", server.output());

    // One file for the connection, named by its id (32 hex characters, no extension); done
    // when its disconnect message is in.
    let (path, _) = finished_binary_recording(&dir, || server.output());
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    assert!(
        name.len() == 32 && name.chars().all(|c| c.is_ascii_hexdigit()),
        "{name}"
    );
    let (msgs, stderr) = audit_decode(&path).unwrap();
    assert!(stderr.is_empty(), "{stderr}");
    let types: Vec<u64> = msgs.iter().map(|m| m["type"].as_u64().unwrap()).collect();
    let ids: Vec<&str> = msgs.iter().map(|m| m["typeId"].as_str().unwrap()).collect();
    for want in [
        "connect",
        "auth_password_successful",
        "handshake_successful",
        "new_channel_successful",
        "exec",
        "io",
        "exit",
        "disconnect",
    ] {
        assert!(ids.contains(&want), "{want} missing: {ids:?}");
    }
    assert_eq!(types.first(), Some(&0));
    assert_eq!(types.last(), Some(&1));
    assert_eq!(io_text(&msgs, 0), "typed\n");
    assert_eq!(io_text(&msgs, 1), "got-typed\nlater\n");
    assert_eq!(io_text(&msgs, 2), "to-err\n");
    let exit = msgs.iter().find(|m| m["type"] == 499).unwrap();
    assert_eq!(exit["payload"]["exitStatus"], 5);
    assert!(exit["channelId"].is_u64());
    let exec = msgs.iter().find(|m| m["type"] == 403).unwrap();
    assert!(exec["payload"]["program"]
        .as_str()
        .unwrap()
        .starts_with("read x;"));

    // An independent decoder reads the same messages with ContainerSSH's keys.
    let others = cbor2_decode(&path);
    assert_eq!(others.len(), msgs.len());
    for (m, o) in msgs.iter().zip(&others) {
        let mut keys: Vec<&String> = o.as_object().unwrap().keys().collect();
        keys.sort();
        assert_eq!(
            keys,
            ["channelId", "connectionId", "payload", "timestamp", "type"]
        );
        assert_eq!(m["type"], o["type"]);
        assert_eq!(m["timestamp"], o["timestamp"]);
        assert_eq!(o["connectionId"], name.as_str());
    }
    let auth = others.iter().find(|o| o["type"] == 101).unwrap();
    assert_eq!(auth["payload"]["username"], "alice");
    assert_eq!(
        auth["payload"]["password"]["bytes"], "",
        "a flag, never the text"
    );
    // No trace of the password anywhere in the decompressed stream either.
    let raw = std::fs::read(&path).unwrap();
    let mut plain = Vec::new();
    use std::io::Read as _;
    flate2::read::GzDecoder::new(&raw[40..])
        .read_to_end(&mut plain)
        .unwrap();
    assert!(
        !plain
            .windows(password.len())
            .any(|w| w == password.as_bytes()),
        "the password is in the recording"
    );

    // Replay: the program's output, at its pace (the recorded second between "to-err" and
    // "later" is waited for).
    let started = Instant::now();
    let out = run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_containerssh"))
            .args(["audit", "replay"])
            .arg(&path),
        None,
        CMD_TIMEOUT,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // stdout and stderr are two streams: the first two lines come in either order.
    let played = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines: Vec<&str> = played.lines().collect();
    assert_eq!(lines.pop(), Some("later"), "{played}");
    lines.sort_unstable();
    assert_eq!(lines, ["got-typed", "to-err"], "{played}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );

    // A recording whose server stopped mid-write (no gzip trailer): what is there decodes, and
    // the end is reported.
    let cut = env.path().join("cut");
    std::fs::write(&cut, &raw[..raw.len() - 8]).unwrap();
    let (some, stderr) = audit_decode(&cut).unwrap();
    assert!(
        some.len() + 1 >= msgs.len(),
        "{} of {}",
        some.len(),
        msgs.len()
    );
    assert!(stderr.contains("ends early"), "{stderr}");
}

/// What a recording's `io` messages of `stream` hold, as text.
fn io_text(msgs: &[Value], stream: u64) -> String {
    let bytes: Vec<u8> = msgs
        .iter()
        .filter(|m| m["type"] == 500 && m["payload"]["stream"] == stream)
        .flat_map(audit_data)
        .collect();
    String::from_utf8(bytes).unwrap()
}

/// Recordings follow the login whatever runs it: session mode (a container per session) on
/// Docker, and pods on Kubernetes (the fake API server).
#[test]
fn recordings_follow_the_login_in_session_mode_and_on_kubernetes() {
    let env = TestEnv::new();
    let dir = audit_dir(&env);
    let server = env.start(&with_binary_audit(&env.config_yaml("session"), &dir));
    let out = run_with_timeout(
        env.ssh(&server, "alice").arg("echo in-a-session-container"),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(0), "{}", server.output());
    let (_, msgs) = finished_binary_recording(&dir, || server.output());
    assert_eq!(io_text(&msgs, 1), "in-a-session-container\n");
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::create_dir_all(&dir).unwrap();

    let fake = support::KubeFake::start();
    let server = env.start(&with_binary_audit(
        &env.kube_config_yaml(&fake, "connection", ""),
        &dir,
    ));
    let out = run_with_timeout(
        env.ssh(&server, "alice").arg("echo in-a-pod"),
        None,
        CMD_TIMEOUT,
    );
    assert_eq!(out.status.code(), Some(0), "{}", server.output());
    let (_, msgs) = finished_binary_recording(&dir, || server.output());
    assert_eq!(io_text(&msgs, 1), "in-a-pod\n");
    assert!(msgs.iter().any(|m| m["typeId"] == "exit"), "{msgs:?}");
}
