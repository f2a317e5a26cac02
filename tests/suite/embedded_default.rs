//! The README's first command: no config file at all. Loopback port 2222, a host key generated
//! into the state directory, the invoking user's own authorized_keys for any user name, and the
//! default image (which cannot be pulled on machines without a registry: then the user gets one
//! clear line naming it).

use crate::support;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::run_with_timeout;

const SERVER_BIN: &str = env!("CARGO_BIN_EXE_containerssh");

#[test]
fn no_config_serves_the_embedded_default() {
    let home = tempfile::tempdir().expect("temp home");
    let ssh_dir = home.path().join(".ssh");
    std::fs::create_dir(&ssh_dir).unwrap();
    let key = home.path().join("id");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::copy(key.with_extension("pub"), ssh_dir.join("authorized_keys")).unwrap();

    let dump = run_with_timeout(
        Command::new(SERVER_BIN)
            .arg("--dump-config")
            .env("HOME", home.path()),
        None,
        Duration::from_secs(30),
    );
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("listen: 127.0.0.1:2222"), "{dump}");

    let mut child = Command::new(SERVER_BIN)
        .env("HOME", home.path())
        .env_remove("XDG_STATE_HOME")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start server");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let mut log = String::new();
    let listening = loop {
        match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(l) => {
                log.push_str(&l);
                log.push('\n');
                if l.contains("listening on 127.0.0.1:2222") {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    let _guard = KillOnDrop(child);
    assert!(listening, "no listening line: {log}");

    let state_key = home
        .path()
        .join(".local/state/containerssh/ssh_host_ed25519_key");
    let mode = std::fs::metadata(&state_key)
        .expect("generated host key")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let out = run_with_timeout(
        Command::new("ssh")
            .args(["-F", "/dev/null", "-p", "2222", "-i"])
            .arg(&key)
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                "any-user-name@127.0.0.1",
                "echo hi",
            ]),
        None,
        Duration::from_secs(120),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Authentication succeeded (no "Permission denied"); then either the default image was
    // available and ran, or its pull failed with a line that names it.
    assert!(!stderr.contains("Permission denied"), "{stderr}");
    if out.status.code() != Some(0) {
        assert!(
            stderr.contains("cannot start your container")
                && stderr.contains("containerssh/containerssh-guest-image"),
            "stderr: {stderr}"
        );
    } else {
        assert_eq!(out.stdout, b"hi\n");
    }
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
