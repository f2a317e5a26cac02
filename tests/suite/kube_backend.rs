//! The Kubernetes backend's pod lifecycle (`backend::kubernetes::pods`) and exec
//! (`backend::kubernetes::exec`) against the Docker-backed fake API server
//! (`tests/support/kubefake/kubefake.py`), over real TLS with a bearer token.
//! Every wait is bounded by [`T`].

use crate::support;

use std::time::{Duration, Instant};

use containerssh::backend::kubernetes::client::KubeClient;
use containerssh::backend::kubernetes::exec::{exec, ExecSession, ExitOutcome, Output};
use containerssh::backend::kubernetes::pods::{self, PodError};
use containerssh::backend::kubernetes::wire::Protocol;
use containerssh::backend::kubernetes::{ClusterConnection, TokenSource};
use containerssh::backend::ConnMeta;
use containerssh::config::model::KubernetesPodConfig;
use serde_json::{json, Value};
use support::{poll_until, test_image, KubeFake};

/// Bound of every single wait.
const T: Duration = Duration::from_secs(60);
/// Pod start timeout given to `create_and_wait`.
const POD_START: Duration = Duration::from_secs(60);
const NS: &str = "default";
const IDLE: &str = "trap 'exit 0' TERM; while :; do sleep 1; done";

async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(T, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no result within {T:?}"))
}

struct Env {
    fake: KubeFake,
    client: KubeClient,
}

impl Env {
    fn start() -> Env {
        Self::start_with(&[])
    }

    fn start_with(args: &[&str]) -> Env {
        let fake = KubeFake::start_with(args);
        let conn = ClusterConnection {
            server: fake.url.clone(),
            ca_pem: Some(std::fs::read(&fake.ca_cert).expect("read CA")),
            token: Some(TokenSource::Static(fake.token.clone())),
            ..Default::default()
        };
        let client = KubeClient::new(&conn, Duration::from_secs(20)).expect("client");
        Env { fake, client }
    }

    fn cfg(image: &str) -> KubernetesPodConfig {
        KubernetesPodConfig {
            metadata: serde_json::Map::new(),
            spec: serde_json::from_value(json!({
                "containers": [{"name": "shell", "image": image}]
            }))
            .unwrap(),
            ..Default::default()
        }
    }

    fn body(image: &str, instance: &str, user: &str) -> Value {
        let meta = ConnMeta {
            connection_id: support::random_hex(16),
            username: user.into(),
            remote_ip: "127.0.0.1".into(),
        };
        let idle: Vec<String> = ["/bin/sh", "-c", IDLE].map(String::from).into();
        pods::pod_body(
            &Self::cfg(image),
            Some(&meta),
            instance,
            Some(&idle),
            &[("FOO".into(), "bar".into())],
        )
    }

    /// A ready idle pod; returns its name.
    async fn idle_pod(&self, instance: &str) -> String {
        let body = Self::body(&test_image(), instance, "alice");
        let pod = within(
            "create_and_wait",
            pods::create_and_wait(&self.client, &body, "shell", POD_START),
        )
        .await
        .unwrap_or_else(|e| panic!("create_and_wait: {e}\n{}", self.log_tail()));
        pod.metadata.name.expect("pod name")
    }

    async fn exists(&self, name: &str) -> bool {
        let r = within(
            "GET pod",
            self.client
                .get_json::<Value>(&format!("/api/v1/namespaces/{NS}/pods/{name}")),
        )
        .await;
        match r {
            Ok(_) => true,
            Err(e) if e.http_code() == Some(404) => false,
            Err(e) => panic!("GET pod {name}: {e}"),
        }
    }

    async fn exec(&self, pod: &str, argv: &[&str], tty: bool, stdin: bool) -> ExecSession {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        within(
            "exec",
            exec(&self.client, NS, pod, "shell", &argv, tty, stdin),
        )
        .await
        .unwrap_or_else(|e| panic!("exec: {e}\n{}", self.log_tail()))
    }

    fn log_tail(&self) -> String {
        let log = self.fake.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// Reads all output, then the exit.
async fn collect(s: ExecSession) -> (Vec<u8>, Vec<u8>, ExitOutcome) {
    let (_tx, mut rx) = s.split();
    within("output", async move {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        while let Some(o) = rx.next_output().await {
            match o {
                Output::Stdout(b) => out.extend_from_slice(&b),
                Output::Stderr(b) => err.extend_from_slice(&b),
            }
        }
        (out, err, rx.exit().await)
    })
    .await
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_streams_and_exit_code() {
    let t0 = Instant::now();
    let env = Env::start();
    let pod = env.idle_pod("inst-a").await;
    let s = env
        .exec(
            &pod,
            &["sh", "-c", "echo out; echo err >&2; exit 3"],
            false,
            false,
        )
        .await;
    let (out, err, exit) = collect(s).await;
    assert_eq!(text(&out), "out\n");
    assert_eq!(text(&err), "err\n");
    assert_eq!(exit, ExitOutcome::Exited(3));
    // The env from pod_body reached the container.
    let s = env
        .exec(&pod, &["sh", "-c", "echo $FOO"], false, false)
        .await;
    let (out, _, exit) = collect(s).await;
    assert_eq!(
        (text(&out).as_str(), exit),
        ("bar\n", ExitOutcome::Exited(0))
    );
    within("delete", pods::delete(&env.client, NS, &pod, Some(0)))
        .await
        .unwrap();
    eprintln!("exec_streams_and_exit_code: {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn exec_stdin_eof_one_mebibyte() {
    let t0 = Instant::now();
    let env = Env::start();
    let pod = env.idle_pod("inst-b").await;
    let s = env.exec(&pod, &["wc", "-c"], false, true).await;
    let (mut tx, rx) = s.split();
    // Input and output run concurrently (the pipe would otherwise fill up in bigger cases).
    let writer = tokio::spawn(async move {
        let data = vec![b'x'; 1 << 20];
        tx.send_stdin(&data).await?;
        tx.close_stdin().await?;
        Ok::<_, containerssh::backend::kubernetes::exec::ExecError>(tx)
    });
    let reader = tokio::spawn(async move {
        let mut rx = rx;
        let mut out = Vec::new();
        while let Some(o) = rx.next_output().await {
            if let Output::Stdout(b) = o {
                out.extend_from_slice(&b);
            }
        }
        (out, rx.exit().await)
    });
    let _tx = within("stdin", writer).await.unwrap().expect("send stdin");
    let (out, exit) = within("output", reader).await.unwrap();
    assert_eq!(text(&out).trim(), "1048576");
    assert_eq!(exit, ExitOutcome::Exited(0));
    eprintln!("exec_stdin_eof_one_mebibyte: {:?}", t0.elapsed());
}

/// The resize is sent first, then a newline the command waits for before `stty size`: the
/// server handles the frames of one stream in order (the fake applies a resize before it
/// forwards later stdin), so the size seen is the resized one, with no race.
#[tokio::test(flavor = "multi_thread")]
async fn exec_tty_resize() {
    let t0 = Instant::now();
    let env = Env::start();
    let pod = env.idle_pod("inst-c").await;
    let mut s = env
        .exec(&pod, &["sh", "-c", "read x; stty size"], true, true)
        .await;
    within("resize", s.resize(120, 40)).await.unwrap();
    within("stdin", s.send_stdin(b"\n")).await.unwrap();
    let (out, err, exit) = collect(s).await;
    assert!(err.is_empty(), "a tty has no stderr stream");
    assert!(text(&out).contains("40 120"), "{:?}", text(&out));
    assert_eq!(exit, ExitOutcome::Exited(0));
    eprintln!("exec_tty_resize: {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_image_fails_fast_and_cleans_up() {
    let t0 = Instant::now();
    let env = Env::start();
    let image = "kubefake.invalid/nonexistent:1";
    let body = Env::body(image, "inst-d", "bob");
    let started = Instant::now();
    let e = within(
        "create_and_wait",
        pods::create_and_wait(&env.client, &body, "shell", POD_START),
    )
    .await
    .expect_err("a missing image must fail");
    let took = started.elapsed();
    let msg = e.to_string();
    assert!(matches!(e, PodError::NotReady { .. }), "{msg}");
    assert!(msg.contains(&format!("image \"{image}\"")), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");
    assert!(took < POD_START / 2, "took {took:?}");
    // The pod is gone: nothing with our instance label is left, and no Docker container.
    let list: Value = within(
        "list",
        env.client
            .get_json(&format!("/api/v1/namespaces/{NS}/pods")),
    )
    .await
    .unwrap();
    assert_eq!(list["items"].as_array().map(Vec::len), Some(0), "{list}");
    let left = poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
        let c = env.fake.docker_containers(None);
        c.is_empty().then_some(())
    });
    assert!(
        left.is_some(),
        "containers left: {:?}",
        env.fake.docker_containers(None)
    );
    eprintln!(
        "missing_image ({msg}): failed after {took:?}, total {:?}",
        t0.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn reap_deletes_only_our_instance() {
    let t0 = Instant::now();
    let env = Env::start();
    let (ours1, ours2, other) = tokio::join!(
        env.idle_pod("inst-e"),
        env.idle_pod("inst-e"),
        env.idle_pod("someone-else")
    );
    let n = within("reap", pods::reap(&env.client, NS, "inst-e"))
        .await
        .unwrap();
    assert_eq!(n, 2);
    assert!(!env.exists(&ours1).await);
    assert!(!env.exists(&ours2).await);
    assert!(env.exists(&other).await);
    // Nothing left to reap.
    let n = within("reap", pods::reap(&env.client, NS, "inst-e"))
        .await
        .unwrap();
    assert_eq!(n, 0);
    within("delete", pods::delete(&env.client, NS, &other, Some(0)))
        .await
        .unwrap();
    eprintln!("reap_deletes_only_our_instance: {:?}", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_running_pod() {
    let t0 = Instant::now();
    let env = Env::start();
    let pod = env.idle_pod("inst-f").await;
    assert!(env.exists(&pod).await);
    within("delete", pods::delete(&env.client, NS, &pod, Some(0)))
        .await
        .unwrap();
    assert!(!env.exists(&pod).await);
    // Deleting again: 404 counts as done.
    within("delete", pods::delete(&env.client, NS, &pod, Some(0)))
        .await
        .unwrap();
    let gone = poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
        env.fake
            .docker_containers(Some(&pod))
            .is_empty()
            .then_some(())
    });
    assert!(gone.is_some(), "the pod's Docker container remains");
    eprintln!("delete_running_pod: {:?}", t0.elapsed());
}

/// A server offering only `v4.channel.k8s.io`: the fallback is taken, exit codes still
/// arrive, and stdin EOF cannot be signalled (close_stdin sends nothing).
#[tokio::test(flavor = "multi_thread")]
async fn exec_falls_back_to_v4() {
    let t0 = Instant::now();
    let env = Env::start_with(&["--max-subprotocol", "v4"]);
    let pod = env.idle_pod("inst-g").await;
    let mut s = env
        .exec(&pod, &["sh", "-c", "echo v4; exit 7"], false, true)
        .await;
    assert_eq!(s.protocol(), Protocol::V4);
    within("close_stdin", s.close_stdin()).await.unwrap();
    let (out, _, exit) = collect(s).await;
    assert_eq!(
        (text(&out).as_str(), exit),
        ("v4\n", ExitOutcome::Exited(7))
    );
    eprintln!("exec_falls_back_to_v4: {:?}", t0.elapsed());
}

/// In-cluster configuration end to end: a service-account directory (token, ca.crt,
/// namespace) and `KUBERNETES_SERVICE_HOST`/`_PORT` resolve into a client that lists pods on
/// the fake, in the namespace the directory names; the token is read from the file.
#[tokio::test(flavor = "multi_thread")]
async fn in_cluster_service_account_reaches_the_api() {
    use containerssh::backend::kubernetes::connection::resolve_with;
    use containerssh::config::model::{InClusterMode, KubernetesConnectionConfig};
    let fake = KubeFake::start();
    let sa = tempfile::tempdir().expect("temp dir");
    std::fs::write(sa.path().join("token"), format!("{}\n", fake.token)).unwrap();
    std::fs::copy(&fake.ca_cert, sa.path().join("ca.crt")).unwrap();
    std::fs::write(sa.path().join("namespace"), "default").unwrap();
    let port = fake.port.to_string();
    let env = |k: &str| match k {
        "KUBERNETES_SERVICE_HOST" => Some("127.0.0.1".to_string()),
        "KUBERNETES_SERVICE_PORT" => Some(port.clone()),
        _ => None,
    };
    let cfg = KubernetesConnectionConfig {
        in_cluster: InClusterMode::True,
        ..Default::default()
    };
    let conn = resolve_with(&cfg, &env, sa.path()).expect("in-cluster resolution");
    assert_eq!(conn.namespace.as_deref(), Some("default"));
    assert!(matches!(conn.token, Some(TokenSource::File(_))), "{conn:?}");
    let client = KubeClient::new(&conn, Duration::from_secs(20)).expect("client");
    let list: Value = within(
        "list pods",
        client.get_json("/api/v1/namespaces/default/pods"),
    )
    .await
    .unwrap_or_else(|e| panic!("list through the service account: {e}\n{}", fake.log()));
    assert_eq!(list["kind"], "PodList", "{list}");

    // A wrong token in the file is refused: the credentials really come from the directory.
    std::fs::write(sa.path().join("token"), "not-the-token\n").unwrap();
    let conn = resolve_with(&cfg, &env, sa.path()).expect("in-cluster resolution");
    let client = KubeClient::new(&conn, Duration::from_secs(20)).expect("client");
    let err = within(
        "list pods",
        client.get_json::<Value>("/api/v1/namespaces/default/pods"),
    )
    .await
    .expect_err("a wrong token must be refused");
    assert_eq!(err.http_code(), Some(401), "{err}");
}
