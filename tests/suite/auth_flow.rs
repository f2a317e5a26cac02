//! Authentication behaves like sshd's: a mistyped password gets another prompt, every request is
//! answered at once with every configured method still offered, `ssh.maxAuthTries` counts all
//! methods together and ends the connection with the reason, and the user name may not change
//! between requests. With the real OpenSSH client, and russh's client for raw sequences.

use crate::support;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use russh::client::AuthResult;
use russh::MethodKind;
use support::russh_client::{connect_from, Recorder};
use support::{describe, run_with_timeout, TestEnv, TestServer};

const CMD_TIMEOUT: Duration = Duration::from_secs(90);
const SERVER_BIN: &str = env!("CARGO_BIN_EXE_containerssh");
const PASSWORD: &str = "right horse battery";
const LOCALHOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
/// The server's fixed delay on every refusal is 0.5 s; an answer must come well within this.
const ANSWERED_WITHIN: Duration = Duration::from_secs(1);

fn hash(password: &str) -> String {
    let out = run_with_timeout(
        std::process::Command::new(SERVER_BIN).arg("--hash-password"),
        Some(format!("{password}\n").as_bytes()),
        Duration::from_secs(30),
    );
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The harness's server with alice's password set, and `ssh_extra` lines under `ssh:`.
fn start(env: &TestEnv, ssh_extra: &str) -> TestServer {
    std::fs::write(&env.password_file, format!("alice:{}\n", hash(PASSWORD))).unwrap();
    let yaml = env
        .config_yaml("connection")
        .replacen("ssh:\n", &format!("ssh:\n{ssh_extra}"), 1);
    env.start(&yaml)
}

fn methods(r: &AuthResult) -> Vec<MethodKind> {
    match r {
        AuthResult::Success => panic!("expected a refusal"),
        AuthResult::Failure {
            remaining_methods, ..
        } => remaining_methods.iter().copied().collect(),
    }
}

async fn disconnect_message(rec: &Recorder) -> Option<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some((_, m)) = rec.disconnect.lock().unwrap().as_ref() {
            return Some(m.clone());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

#[test]
fn a_mistyped_password_gets_another_prompt() {
    let env = TestEnv::new();
    let server = start(&env, "");
    let (mut ssh, prompts) = env.ssh_passwords(&server, "alice", &["wrong horse", PASSWORD], 3);
    let out = run_with_timeout(ssh.arg("echo in"), None, CMD_TIMEOUT);
    assert_eq!(out.stdout, b"in\n", "{}", describe(&out, &server));
    assert_eq!(std::fs::read_to_string(prompts).unwrap().trim(), "2");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied, please try again"),
        "{}",
        describe(&out, &server)
    );
}

#[test]
fn max_auth_tries_ends_the_connection_with_the_reason() {
    let env = TestEnv::new();
    let server = start(&env, "  maxAuthTries: 3\n");
    let (mut ssh, prompts) = env.ssh_passwords(&server, "alice", &["wrong"], 10);
    let out = run_with_timeout(ssh.arg("echo in"), None, CMD_TIMEOUT);
    assert_eq!(out.status.code(), Some(255), "{}", describe(&out, &server));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Too many authentication failures"),
        "{}",
        describe(&out, &server)
    );
    // The third refusal ends it; the client may have asked for a fourth password before the
    // disconnect reached it, never more.
    let asked: u32 = std::fs::read_to_string(prompts)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!((3..=4).contains(&asked), "asked {asked} times");
    assert!(server.wait_for_output(
        "too many authentication failures (ssh.maxAuthTries)",
        Duration::from_secs(5)
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn every_request_is_answered_at_once_with_every_method_still_offered() {
    let env = TestEnv::new();
    let server = start(&env, "");
    let (mut h, _rec) = connect_from(&server, LOCALHOST).await;
    let want = [MethodKind::PublicKey, MethodKind::Password];
    // The first `none` probe, then wrong passwords: each answered, password still offered.
    let r = h.authenticate_none("alice").await.expect("none answered");
    assert_eq!(methods(&r), want);
    for _ in 0..2 {
        let t = Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            h.authenticate_password("alice", "wrong"),
        )
        .await
        .expect("a password after a refused one is answered")
        .expect("no error");
        assert!(
            t.elapsed() < ANSWERED_WITHIN,
            "answered in {:?}",
            t.elapsed()
        );
        assert_eq!(methods(&r), want);
    }
    // A method we do not offer is answered too.
    let t = Instant::now();
    let r = tokio::time::timeout(
        Duration::from_secs(5),
        h.authenticate_keyboard_interactive_start("alice", None::<String>),
    )
    .await
    .expect("keyboard-interactive answered")
    .expect("no error");
    assert!(
        t.elapsed() < ANSWERED_WITHIN,
        "answered in {:?}",
        t.elapsed()
    );
    assert!(
        matches!(
            r,
            russh::client::KeyboardInteractiveAuthResponse::Failure { .. }
        ),
        "{r:?}"
    );
    // And the right password still logs in on the same connection.
    let r = h.authenticate_password("alice", PASSWORD).await.unwrap();
    assert!(r.success(), "{}", server.output());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_user_name_is_disconnected() {
    let env = TestEnv::new();
    let server = start(&env, "");
    let (mut h, rec) = connect_from(&server, LOCALHOST).await;
    let r = h.authenticate_password("alice", "wrong").await.unwrap();
    assert!(!r.success());
    // bob's attempt, even with alice's password, never logs anyone in.
    let r = h.authenticate_password("bob", PASSWORD).await;
    assert!(!matches!(r, Ok(AuthResult::Success)), "{r:?}");
    let message = disconnect_message(&rec).await;
    assert_eq!(
        message.as_deref(),
        Some("Change of username or service not allowed"),
        "{}",
        server.output()
    );
    assert!(server.wait_for_output("the user name changed", Duration::from_secs(10)));
}

/// The list a `none` probe gets back.
async fn offered(server: &TestServer) -> Vec<MethodKind> {
    let (mut h, _rec) = connect_from(server, LOCALHOST).await;
    let r = h.authenticate_none("alice").await.expect("none answered");
    methods(&r)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_configured_method_is_offered() {
    let env = TestEnv::new();
    let yaml = env.config_yaml("connection");
    let (a, b) = (
        yaml.find("auth:\n").unwrap(),
        yaml.find("backend:").unwrap(),
    );
    let with_auth = |auth: &str| format!("{}{auth}{}", &yaml[..a], &yaml[b..]);
    let ca = env.path().join("ca.pub");
    std::fs::write(&ca, format!("{}\n", env.client_pubkey)).unwrap();
    // The webhook is never called by a `none` probe: any URL will do.
    let hook = "    webhook:\n      url: http://127.0.0.1:9\n";
    let keys = format!(
        "  publicKey:\n    method: authorizedKeys\n    authorizedKeys:\n      path: \"{}/keys/%u\"\n",
        env.path().display()
    );
    let cases = [
        (
            format!(
                "auth:\n  publicKey:\n    trustedUserCAKeys: {}\n",
                ca.display()
            ),
            vec![MethodKind::PublicKey],
        ),
        (
            format!("auth:\n  publicKey:\n    method: webhook\n{hook}"),
            vec![MethodKind::PublicKey],
        ),
        (
            format!("auth:\n  password:\n    method: webhook\n{hook}"),
            vec![MethodKind::Password],
        ),
        (
            format!("auth:\n{keys}  password:\n    method: webhook\n{hook}"),
            vec![MethodKind::PublicKey, MethodKind::Password],
        ),
    ];
    for (auth, want) in cases {
        let server = env.start(&with_auth(&auth));
        assert_eq!(offered(&server).await, want, "{auth}");
    }
}

/// The login grace time counts from the accept: a client that took most of it for its version
/// line is not given the whole grace time again after it (a login could take twice as long).
#[tokio::test(flavor = "multi_thread")]
async fn the_login_grace_time_counts_from_the_accept() {
    let env = TestEnv::new();
    let server = start(&env, "  loginGraceTime: 3s\n");
    let t = Instant::now();
    let stream = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rec = Recorder::default();
    let config = std::sync::Arc::new(russh::client::Config::default());
    let mut handle = russh::client::connect_stream(config, stream, rec.clone())
        .await
        .expect("the handshake completes within the grace time");
    // Into authentication (as OpenSSH's client goes at once), then nothing more from the
    // client: the server ends it at 3 s after the accept, not at 2 + 3.
    let r = handle.authenticate_none("alice").await.unwrap();
    assert!(!r.success());
    let message = disconnect_message(&rec).await;
    let took = t.elapsed();
    assert_eq!(
        message.as_deref(),
        Some("login grace time exceeded"),
        "{}",
        server.output()
    );
    assert!(
        took < Duration::from_millis(4500),
        "disconnected {took:?} after the accept"
    );
    drop(handle);
}

/// paramiko asks for the authentication service again before every `auth_*` call on a
/// transport. A wrong password and then the right one, on one transport: the second call is
/// answered at once (it used to wait for paramiko's 30 s auth timeout) and logs in.
#[test]
fn paramiko_a_second_password_on_one_transport_is_answered_at_once() {
    let env = TestEnv::new();
    let server = start(&env, "");
    let script = r#"
import sys, time, paramiko
port, right = int(sys.argv[1]), sys.argv[2]
t = paramiko.Transport(("127.0.0.1", port))
t.start_client(timeout=10)
began = time.monotonic()
try:
    t.auth_password("alice", "wrong horse")
    print("wrong password accepted")
    sys.exit(1)
except paramiko.AuthenticationException:
    pass
first = time.monotonic() - began
began = time.monotonic()
t.auth_password("alice", right)
second = time.monotonic() - began
chan = t.open_session(timeout=30)
chan.exec_command("echo in")
out = chan.makefile("rb").read().decode()
status = chan.recv_exit_status()
print(f"first={first:.3f} second={second:.3f} status={status} out={out.strip()}")
t.close()
"#;
    let out = run_with_timeout(
        std::process::Command::new("python3")
            .args(["-c", script])
            .arg(server.port().to_string())
            .arg(PASSWORD),
        None,
        CMD_TIMEOUT,
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", describe(&out, &server));
    let field = |name: &str| -> String {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .unwrap_or_else(|| panic!("no {name} in {text:?}"))
            .to_string()
    };
    let second: f64 = field("second").parse().unwrap();
    assert!(
        second < ANSWERED_WITHIN.as_secs_f64() * 5.0,
        "the second password took {second} s: {}",
        describe(&out, &server)
    );
    assert_eq!(field("status"), "0", "{text}");
    assert_eq!(field("out"), "in", "{text}");
}
