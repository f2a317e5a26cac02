//! Audit recordings (`audit`, format asciinema, storage file), replayed by the real
//! `asciinema` (PyPI 2.x): a terminal session through tmux with a resize and typed input, an
//! exec with stdout and stderr, a password login that leaves no trace of the password.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{poll_until, run_with_timeout, tty_command_line, TestEnv, Tmux};

const CMD_TIMEOUT: Duration = Duration::from_secs(90);

fn with_audit(yaml: &str, dir: &Path, stdin: bool) -> String {
    format!(
        "{yaml}audit:\n  enable: true\n  format: asciinema\n  storage: file\n  file:\n    directory: {}\n  intercept:\n    stdin: {stdin}\n    stdout: true\n    stderr: true\n",
        dir.display()
    )
}

fn audit_dir(env: &TestEnv) -> PathBuf {
    let dir = env.path().join("audit");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Waits (bounded) for the one recording in `dir` to hold its exit marker; its lines.
fn finished_recording(dir: &Path) -> (PathBuf, Vec<Value>) {
    let found = poll_until(Duration::from_secs(30), Duration::from_millis(100), || {
        let entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        let [one] = entries.as_slice() else {
            return None;
        };
        let text = std::fs::read_to_string(one).ok()?;
        text.contains("\"exit status").then(|| (one.clone(), text))
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
