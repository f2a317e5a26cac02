//! What operators see: the metrics endpoint scraped by a real Prometheus (Debian's package)
//! and checked by its `promtool`; the health endpoint and `--healthcheck`, during service and
//! during a SIGTERM drain.

use crate::support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{free_tcp_port, poll_until, run_with_timeout, Background, TestEnv, TestServer};

const CMD_TIMEOUT: Duration = Duration::from_secs(90);

/// One HTTP/1.1 GET on `port`: the status line's code and the body; `None` when nothing
/// listens.
fn get(port: u16, path: &str, accept: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let code = text.split(' ').nth(1)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n")?.1.to_string();
    Some((code, body))
}

fn with_metrics(yaml: &str, port: u16) -> String {
    format!("{yaml}metrics:\n  enable: true\n  listen: 127.0.0.1:{port}\n")
}

/// A Prometheus server scraping `target` every second.
struct Prometheus {
    port: u16,
    process: Background,
}

impl Prometheus {
    fn start(env: &TestEnv, target: u16) -> Self {
        let dir = env.path().join("prometheus");
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: containerssh\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n"
            ),
        )
        .unwrap();
        let port = free_tcp_port();
        let process = Background::spawn(
            Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}")),
            &dir,
            "prometheus",
        );
        Self { port, process }
    }

    /// The value of `query` (one sample), once Prometheus has it.
    fn value(&self, query: &str) -> Option<f64> {
        let encoded: String = query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let path = format!("/api/v1/query?query={encoded}");
        let (code, body) = get(self.port, &path, "application/json")?;
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// Waits (bounded) until `query` reads `want`; the last value seen otherwise.
    fn wait_for(&self, query: &str, want: f64) -> Result<(), String> {
        let mut last = None;
        poll_until(Duration::from_secs(60), Duration::from_millis(250), || {
            last = self.value(query);
            (last == Some(want)).then_some(())
        })
        .ok_or_else(|| {
            format!(
                "{query}: wanted {want}, Prometheus says {last:?}\n{}",
                self.process.stderr()
            )
        })
    }
}

#[test]
fn prometheus_scrapes_logins_failures_and_a_failed_start() {
    let env = TestEnv::new();
    let port = free_tcp_port();
    // Session mode without the agent: a program that does not exist fails its container's
    // start, a backend error.
    let yaml = env.config_yaml("session").replace(
        "    shellCommand: [\"/bin/sh\"]\n",
        "    shellCommand: [\"/bin/sh\"]\n    disableAgent: true\n",
    );
    let server = env.start(&with_metrics(&yaml, port));
    let prometheus = Prometheus::start(&env, port);

    const LOGINS: usize = 3;
    const WRONG: usize = 2;
    for _ in 0..LOGINS {
        let out = run_with_timeout(env.ssh(&server, "alice").arg("true"), None, CMD_TIMEOUT);
        assert_eq!(out.status.code(), Some(0), "{}", server.output());
    }
    for _ in 0..WRONG {
        let out = run_with_timeout(
            &mut env.ssh_password(&server, "alice", "not the password"),
            None,
            CMD_TIMEOUT,
        );
        assert_ne!(out.status.code(), Some(0));
    }
    let out = run_with_timeout(
        env.ssh(&server, "alice").arg("/no/such/program"),
        None,
        CMD_TIMEOUT,
    );
    assert_ne!(out.status.code(), Some(0));

    let text = get(port, "/metrics", "*/*").expect("the metrics endpoint answers");
    assert_eq!(text.0, 200);
    assert_eq!(get(port, "/other", "*/*").map(|r| r.0), Some(404));
    // One `true` per login, then the failed program: every started container counted.
    for (query, want) in [
        (
            r#"containerssh_auth_success_total{authtype="pubkey",country="XX",retry="0"}"#,
            (LOGINS + 1) as f64,
        ),
        (
            r#"containerssh_auth_failures_total{authtype="password",country="XX",retry="0"}"#,
            WRONG as f64,
        ),
        (
            r#"containerssh_ssh_connections_total{country="XX"}"#,
            (LOGINS + WRONG + 1) as f64,
        ),
        (
            r#"containerssh_ssh_successful_handshakes_total{country="XX"}"#,
            (LOGINS + WRONG + 1) as f64,
        ),
        (r#"containerssh_ssh_current_connections{country="XX"}"#, 0.0),
        (
            r#"containerssh_backend_requests_total{backend="docker"}"#,
            (LOGINS + 1) as f64,
        ),
        (
            r#"containerssh_backend_errors_total{backend="docker"}"#,
            1.0,
        ),
        (
            r#"containerssh_backend_start_seconds_count{backend="docker"}"#,
            (LOGINS + 1) as f64,
        ),
    ] {
        if let Err(e) = prometheus.wait_for(query, want) {
            panic!("{e}\n--- /metrics ---\n{}\n{}", text.1, server.output());
        }
    }

    let check = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "curl -sf http://127.0.0.1:{port}/metrics | promtool check metrics"
        ))
        .output()
        .expect("promtool");
    assert!(
        check.status.success(),
        "promtool check metrics: {}{}\n--- /metrics ---\n{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr),
        text.1
    );
}

fn with_health(yaml: &str, port: u16) -> String {
    format!(
        "{yaml}health:\n  enable: true\n  listen: 127.0.0.1:{port}\n  client:\n    url: http://127.0.0.1:{port}/\n"
    )
}

fn healthcheck(env: &TestEnv, config: &str) -> Option<i32> {
    let file = env.path().join("healthcheck.yaml");
    std::fs::write(&file, config).unwrap();
    let out = run_with_timeout(
        Command::new(env!("CARGO_BIN_EXE_containerssh"))
            .arg("--healthcheck")
            .arg("--config")
            .arg(&file),
        None,
        CMD_TIMEOUT,
    );
    out.status.code()
}

#[test]
fn health_answers_while_serving_and_not_while_draining() {
    let env = TestEnv::new();
    let port = free_tcp_port();
    let yaml = with_health(&env.config_yaml("connection"), port);
    let mut server: TestServer = env.start(&yaml);

    assert_eq!(get(port, "/", "*/*"), Some((200, "\"ok\"".into())));
    assert_eq!(
        get(port, "/anything", "text/plain"),
        Some((200, "ok".into()))
    );
    assert_eq!(healthcheck(&env, &yaml), Some(0));

    // A session holds the drain open; from SIGTERM on the endpoint says "not ok".
    let mut client = env.hold_session(&server, "echo ready; sleep 300", || server.output());
    let pid = server.pid().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let started = Instant::now();
    let mut seen = None;
    while started.elapsed() < Duration::from_secs(30) {
        match get(port, "/", "text/plain") {
            Some((503, body)) => {
                seen = Some(body);
                break;
            }
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(
        seen.as_deref(),
        Some("not ok"),
        "no 503 while draining: {}",
        server.output()
    );
    assert_eq!(
        server
            .sigterm_and_wait(Duration::from_secs(30))
            .and_then(|s| s.code()),
        Some(0)
    );
    let _ = client.kill();
    let _ = client.wait();

    // Nothing listens any more: the check fails; with health off it is not asked.
    assert_eq!(healthcheck(&env, &yaml), Some(1));
    assert_eq!(healthcheck(&env, &env.config_yaml("connection")), Some(0));
}

#[test]
fn a_metrics_block_with_mistakes_is_refused_naming_the_key() {
    let env = TestEnv::new();
    for (block, key) in [
        (
            "metrics:\n  enable: true\n  listen: nowhere\n",
            "metrics.listen",
        ),
        (
            "metrics:\n  enable: true\n  path: metrics\n",
            "metrics.path",
        ),
        (
            "metrics:\n  enable: true\n  listen: 127.0.0.1:0\n  cert: /x.pem\n",
            "metrics.cert",
        ),
        ("health:\n  enable: true\n  listne: 127.0.0.1:0\n", "listne"),
    ] {
        let file = env.path().join("bad.yaml");
        std::fs::write(&file, format!("{}{block}", env.config_yaml("connection"))).unwrap();
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

/// `cert`/`key`/`clientcacert`: the endpoints over TLS, client certificates required; curl
/// and `--healthcheck` (its `client` block) present theirs.
#[test]
fn metrics_and_health_over_tls_with_client_certificates() {
    let env = TestEnv::new();
    let pki = support::webhook::Pki::generate(&env.path().join("pki"));
    let (mport, hport) = (free_tcp_port(), free_tcp_port());
    let tls = |indent: &str| {
        format!(
            "{indent}cert: {}\n{indent}key: {}\n{indent}clientcacert: {}\n",
            pki.server_cert.display(),
            pki.server_key.display(),
            pki.ca_cert.display()
        )
    };
    let yaml = format!(
        "{}metrics:\n  enable: true\n  listen: 127.0.0.1:{mport}\n{}health:\n  enable: true\n  listen: 127.0.0.1:{hport}\n{}  client:\n    url: https://127.0.0.1:{hport}/\n    cacert: {}\n    cert: {}\n    key: {}\n",
        env.config_yaml("connection"),
        tls("  "),
        tls("  "),
        pki.ca_cert.display(),
        pki.client_cert.display(),
        pki.client_key.display(),
    );
    let server = env.start(&yaml);
    let curl = |client_cert: bool| {
        let mut c = Command::new("curl");
        c.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
            .arg(&pki.ca_cert);
        if client_cert {
            c.arg("--cert").arg(&pki.client_cert);
            c.arg("--key").arg(&pki.client_key);
        }
        c.arg(format!("https://127.0.0.1:{mport}/metrics"));
        String::from_utf8_lossy(&c.output().expect("curl").stdout).to_string()
    };
    assert_eq!(curl(true), "200", "{}", server.output());
    assert_eq!(curl(false), "000", "no client certificate, no answer");
    assert_eq!(
        get(mport, "/metrics", "*/*").map(|r| r.0),
        None,
        "no plain HTTP"
    );
    assert_eq!(healthcheck(&env, &yaml), Some(0), "{}", server.output());
}
