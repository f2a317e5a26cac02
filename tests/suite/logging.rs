//! Log destinations: a file that logrotate moves away is reopened on SIGHUP; syslog to a unix
//! socket the test reads, in RFC 3164 framing; codes on the events operators alert on.

use crate::support;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{poll_until, run_with_timeout, TestEnv};

const CMD_TIMEOUT: Duration = Duration::from_secs(90);

/// The address of a JSON `listening on ADDR` line.
fn listening_in(text: &str) -> Option<std::net::SocketAddr> {
    text.lines().find_map(|l| {
        let (_, rest) = l.split_once("listening on ")?;
        let addr: String = rest
            .chars()
            .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | ':' | '[' | ']'))
            .collect();
        addr.parse().ok()
    })
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn a_log_file_is_reopened_on_sighup_after_a_rename() {
    let env = TestEnv::new();
    let logs = env.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let file = logs.join("containerssh.log");
    let yaml = env.config_yaml("connection").replace(
        "log:\n  level: debug\n  format: text\n",
        &format!(
            "log:\n  level: debug\n  format: ljson\n  destination: file\n  file: {}\n",
            file.display()
        ),
    );
    assert!(yaml.contains("destination: file"), "{yaml}");
    let find = || listening_in(&read(&file));
    let mut server = env.start_reporting(&yaml, Some(&find));
    let first = read(&file);
    let line: serde_json::Value =
        serde_json::from_str(first.lines().find(|l| l.contains("listening on")).unwrap()).unwrap();
    assert_eq!(line["code"], "SSH_AVAILABLE", "{line}");

    let out = run_with_timeout(env.ssh(&server, "alice").arg("true"), None, CMD_TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "{}", read(&file));
    std::fs::rename(&file, logs.join("containerssh.log.1")).unwrap();
    let pid = server.pid().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    assert!(
        poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
            read(&file).contains("LOG_REOPENED").then_some(())
        })
        .is_some(),
        "no new file after SIGHUP; the old one: {}",
        read(&logs.join("containerssh.log.1"))
    );
    let out = run_with_timeout(env.ssh(&server, "alice").arg("true"), None, CMD_TIMEOUT);
    assert_eq!(out.status.code(), Some(0));
    let rotated = read(&logs.join("containerssh.log.1"));
    let current = read(&file);
    assert_eq!(
        rotated.matches("\"SSH_AUTH_SUCCESSFUL\"").count(),
        1,
        "{rotated}"
    );
    assert!(
        poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
            read(&file).contains("\"SSH_DISCONNECTED\"").then_some(())
        })
        .is_some(),
        "{current}"
    );
    assert_eq!(read(&file).matches("\"SSH_AUTH_SUCCESSFUL\"").count(), 1);
    assert!(
        server.output().trim().is_empty(),
        "nothing on stdout: {}",
        server.output()
    );
    assert_eq!(
        server
            .sigterm_and_wait(Duration::from_secs(30))
            .and_then(|s| s.code()),
        Some(0)
    );
}

#[test]
fn syslog_messages_reach_a_unix_socket_framed_as_rfc3164() {
    let env = TestEnv::new();
    let socket = env.path().join("log.sock");
    let receiver = UnixDatagram::bind(&socket).unwrap();
    let messages = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = Arc::clone(&messages);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = receiver.recv(&mut buf) {
            sink.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    });
    let yaml = env.config_yaml("connection").replace(
        "log:\n  level: debug\n  format: text\n",
        &format!(
            "log:\n  level: info\n  format: ljson\n  destination: syslog\n  syslog:\n    destination: {}\n    facility: local3\n    tag: cssh-test\n    pid: true\n",
            socket.display()
        ),
    );
    let all = || messages.lock().unwrap().join("\n");
    let find = || listening_in(&all());
    let server = env.start_reporting(&yaml, Some(&find));
    let out = run_with_timeout(env.ssh(&server, "alice").arg("true"), None, CMD_TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "{}", all());
    let authenticated = poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
        messages
            .lock()
            .unwrap()
            .iter()
            .find(|m| m.contains("\"SSH_AUTH_SUCCESSFUL\""))
            .cloned()
    })
    .unwrap_or_else(|| panic!("no authentication message: {}", all()));
    // local3 (19) * 8 + info (6) = 158; then `Mmm dd hh:mm:ss TAG[pid]: ` and the JSON line
    // without its own time and level.
    let prefix = format!(" cssh-test[{}]: ", server.pid());
    assert!(authenticated.starts_with("<158>"), "{authenticated}");
    let (head, json) = authenticated.split_once(&prefix).expect("tag and pid");
    assert_eq!(
        head.len(),
        "<158>".len() + "Dec  7 16:00:00".len(),
        "{head}"
    );
    let json: serde_json::Value = serde_json::from_str(json).unwrap();
    assert!(
        json.get("timestamp").is_none() && json.get("level").is_none(),
        "{json}"
    );
    assert_eq!(json["code"], "SSH_AUTH_SUCCESSFUL");
}

#[test]
fn an_unusable_destination_stops_the_start_naming_the_key() {
    let env = TestEnv::new();
    for (block, key) in [
        (
            "log:\n  destination: file\n  file: /no/such/dir/c.log\n".to_string(),
            "log.file",
        ),
        (
            format!(
                "log:\n  destination: syslog\n  syslog:\n    destination: {}\n",
                env.path().join("nobody-listens.sock").display()
            ),
            "log.syslog.destination",
        ),
        (
            "log:\n  destination: syslog\n  syslog:\n    facility: nope\n".to_string(),
            "log.syslog.facility",
        ),
    ] {
        let file = env.path().join("bad.yaml");
        let base = env
            .config_yaml("connection")
            .replace("log:\n  level: debug\n  format: text\n", "");
        std::fs::write(&file, format!("{base}{block}")).unwrap();
        let out = run_with_timeout(
            Command::new(env!("CARGO_BIN_EXE_containerssh"))
                .arg("--config")
                .arg(&file),
            None,
            CMD_TIMEOUT,
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{block}: {stderr}");
        assert!(stderr.contains(key), "{block}: {stderr}");
    }
}
