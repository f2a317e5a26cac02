//! PROXY protocol v1 and v2 behind a real HAProxy (Debian's, started here on the loopback
//! range with `send-proxy` and `send-proxy-v2`): the OpenSSH client binds 127.0.0.3, and the
//! auth webhook's `remoteAddress`, the container's `containerssh_ip` label, the logs and the
//! per-source limit all see 127.0.0.3, not HAProxy's 127.0.0.1. HAProxy's own health checks
//! (`check-send-proxy`: v2 LOCAL) are accepted and closed; a header from a peer that is not a
//! trusted proxy is refused, and so is a trusted peer that sends none.

use crate::support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::{Command, Output};
use std::time::Duration;

use support::webhook::{assert_no_violations, str_field, success, WebhookServer};
use support::{free_tcp_port, poll_until, run_with_timeout, Background, TestEnv, TestServer};

const CMD_TIMEOUT: Duration = Duration::from_secs(90);
const CLIENT: &str = "127.0.0.3";
const OTHER_CLIENT: &str = "127.0.0.4";

/// Our server trusting 127.0.0.1 (where HAProxy connects from) as a proxy, with the public
/// key webhook (which records `remoteAddress`) and `ssh_extra` under `ssh:`.
fn start(env: &TestEnv, hook: &WebhookServer, ssh_extra: &str) -> TestServer {
    let yaml = env.config_yaml("connection");
    let (a, b) = (
        yaml.find("auth:\n").unwrap(),
        yaml.find("backend:").unwrap(),
    );
    let auth = format!(
        "auth:\n  publicKey:\n    method: webhook\n    webhook:\n      url: {}\n      \
         timeout: 2s\n      authTimeout: 10s\n",
        serde_json::json!(hook.url)
    );
    let yaml = format!("{}{auth}{}", &yaml[..a], &yaml[b..]).replacen(
        "ssh:\n",
        &format!(
            "ssh:\n  proxyProtocol:\n    trustedProxies: [127.0.0.1/32]\n    \
             headerTimeout: 2s\n{ssh_extra}"
        ),
        1,
    );
    env.start(&yaml)
}

/// HAProxy in the foreground: `v1` and `v2` frontends in front of `backend`, the v2 one with
/// health checks that speak the PROXY protocol.
struct Haproxy {
    _proc: Background,
    v1: u16,
    v2: u16,
}

fn haproxy(env: &TestEnv, backend: SocketAddr) -> Haproxy {
    let (v1, v2) = (free_tcp_port(), free_tcp_port());
    let cfg = format!(
        "global\n  maxconn 200\n\
         defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
         frontend v1\n  bind 127.0.0.1:{v1}\n  default_backend b1\n\
         backend b1\n  server s1 {backend} send-proxy\n\
         frontend v2\n  bind 127.0.0.1:{v2}\n  default_backend b2\n\
         backend b2\n  server s2 {backend} send-proxy-v2 check check-send-proxy inter 500ms\n"
    );
    let path = env.path().join("haproxy.cfg");
    std::fs::write(&path, cfg).unwrap();
    let proc = Background::spawn(
        Command::new("haproxy").arg("-db").arg("-f").arg(&path),
        env.path(),
        "haproxy",
    );
    for port in [v1, v2] {
        let up = poll_until(Duration::from_secs(20), Duration::from_millis(50), || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        assert!(
            up.is_some(),
            "haproxy did not listen on {port}: {}",
            proc.stderr()
        );
    }
    Haproxy {
        _proc: proc,
        v1,
        v2,
    }
}

/// `ssh -b from -p port alice@127.0.0.1 cmd` with the harness's client settings.
fn ssh_via(env: &TestEnv, server: &TestServer, port: u16, from: &str, cmd: &str) -> Output {
    run_with_timeout(
        Command::new("ssh")
            .env_remove("SSH_AUTH_SOCK")
            .arg("-F")
            .arg(env.ssh_config(server))
            .args(["-p", &port.to_string(), "-b", from])
            .arg(env.destination("alice"))
            .arg(cmd),
        None,
        CMD_TIMEOUT,
    )
}

fn container_ips(env: &TestEnv) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "--filter"])
        .arg(format!("label=containerssh_instance={}", env.instance))
        .args(["--format", "{{.Label \"containerssh_ip\"}}"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

#[test]
fn the_client_address_comes_from_haproxys_header_v1_and_v2() {
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    hook.set_default("/pubkey", success("alice"));
    let server = start(&env, &hook, "");
    let proxy = haproxy(&env, server.addr);
    for (version, port) in [("v1", proxy.v1), ("v2", proxy.v2)] {
        let before = hook.requests("/pubkey").len();
        // Long enough to read the container's label while it runs.
        let session = std::thread::scope(|s| {
            let h = s.spawn(|| ssh_via(&env, &server, port, CLIENT, "echo in; sleep 4"));
            let ips = poll_until(Duration::from_secs(30), Duration::from_millis(100), || {
                let ips = container_ips(&env);
                (!ips.is_empty()).then_some(ips)
            });
            (h.join().unwrap(), ips)
        });
        let (out, ips) = session;
        assert_eq!(
            out.stdout,
            b"in\n",
            "{version}: {}",
            support::describe(&out, &server)
        );
        assert_eq!(
            ips,
            Some(vec![CLIENT.to_string()]),
            "{version}: containerssh_ip"
        );
        let reqs = hook.requests("/pubkey");
        assert!(reqs.len() > before, "{version}: {}", hook.describe());
        for r in &reqs[before..] {
            let addr: SocketAddr = str_field(r, "remoteAddress").parse().unwrap();
            assert_eq!(addr.ip().to_string(), CLIENT, "{version}: {r}");
        }
        assert!(env.wait_no_containers(Duration::from_secs(30)));
    }
    let log = server.output();
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("remote={CLIENT}:")) && l.contains("proxy=127.0.0.1:")),
        "{log}"
    );
    // HAProxy's v2 health checks: LOCAL, accepted and closed without a session.
    assert!(
        server.wait_for_output(
            "PROXY LOCAL (a health check): closed",
            Duration::from_secs(10)
        ),
        "{log}"
    );
    assert_no_violations(&hook, &server);
}

#[test]
fn the_per_source_limit_sees_the_proxied_address() {
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    hook.set_default("/pubkey", success("alice"));
    let server = start(&env, &hook, "  perSourceMaxStartups: 1\n");
    let proxy = haproxy(&env, server.addr);
    // One unauthenticated connection from 127.0.0.3 through HAProxy, held open.
    let socket = socket_from(CLIENT, proxy.v2);
    assert!(server.wait_for_output(&format!("remote={CLIENT}:"), Duration::from_secs(10)));
    // A second one from 127.0.0.3 is refused; 127.0.0.4, behind the same proxy, gets in.
    let out = ssh_via(&env, &server, proxy.v2, CLIENT, "echo in");
    assert_eq!(
        out.status.code(),
        Some(255),
        "{}",
        support::describe(&out, &server)
    );
    let out = ssh_via(&env, &server, proxy.v2, OTHER_CLIENT, "echo in");
    assert_eq!(out.stdout, b"in\n", "{}", support::describe(&out, &server));
    // (Which refusal the once-a-second log line names is not asserted: HAProxy's readiness
    // probes above are refused from 127.0.0.1 too, and may be the one named.)
    drop(socket);
}

/// A TCP connection from `from` to 127.0.0.1:`port` that sends nothing.
fn socket_from(from: &str, port: u16) -> std::net::TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::new(from.parse().unwrap(), 0)).unwrap();
        let stream = s
            .connect(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port))
            .await
            .unwrap();
        let stream = stream.into_std().unwrap();
        stream.set_nonblocking(false).unwrap();
        stream
    })
}

/// Reads what the server sends until it closes (bounded).
fn read_until_closed(mut s: TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    all
}

#[test]
fn headers_only_from_trusted_proxies_and_always_from_them() {
    let env = TestEnv::new();
    let hook = WebhookServer::http();
    let server = start(&env, &hook, "");
    // 127.0.0.5 is not a trusted proxy: its header is refused and logged.
    let mut s = socket_from("127.0.0.5", server.port());
    s.write_all(b"PROXY TCP4 10.9.8.7 127.0.0.1 5555 22\r\nSSH-2.0-OpenSSH_9.6\r\n")
        .unwrap();
    let got = read_until_closed(s);
    assert!(got.starts_with(b"SSH-2.0-"), "our banner goes first");
    assert!(server.wait_for_output(
        "a PROXY protocol header from a peer that is not in ssh.proxyProtocol.trustedProxies",
        Duration::from_secs(10)
    ));
    assert!(
        !server.output().contains("10.9.8.7"),
        "the claimed address is never used"
    );
    // 127.0.0.1 is: without a header it is refused (never guessed), before our banner; and a
    // header without the client's address is refused too (the proxy's would stand for all).
    for (sent, logged) in [
        (
            &b"SSH-2.0-OpenSSH_9.6\r\n"[..],
            "connection refused: no valid PROXY header from a trusted proxy",
        ),
        (
            b"PROXY UNKNOWN\r\nSSH-2.0-OpenSSH_9.6\r\n",
            "a PROXY header without the client's address",
        ),
    ] {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.write_all(sent).unwrap();
        let got = read_until_closed(s);
        assert!(
            !got.starts_with(b"SSH-"),
            "{:?}",
            String::from_utf8_lossy(&got)
        );
        assert!(server.wait_for_output(logged, Duration::from_secs(10)));
    }
    // A silent trusted peer is dropped at headerTimeout.
    let s = TcpStream::connect(server.addr).unwrap();
    let t = std::time::Instant::now();
    let _ = read_until_closed(s);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(server.wait_for_output("no PROXY header within", Duration::from_secs(5)));
}
