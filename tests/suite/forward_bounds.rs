//! Forwarding within bounds, with russh's client doing what OpenSSH's would not: connections
//! made inside the container count against the connection's forwarded-channel limit as soon
//! as they arrive (a client that never confirms them cannot make them pile up), host names
//! longer than the protocol's 255 bytes are refused without ending forwarding, and requests
//! that need the container (`-R`, `-X`, `-A`) do not hold up the connection while it starts.

use crate::support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use russh::client::{self, ChannelOpenHandle, Msg};
use russh::keys::PublicKeyOrCertificate;
use russh::{Channel, ChannelMsg};
use support::russh_client::{connect, connect_with, reply, run};
use support::{poll_until, KubeFake, TestEnv};

/// The server's limit (`limits::MAX_FORWARD_CHANNELS_PER_CONNECTION`).
const MAX_FORWARD_CHANNELS: usize = 64;

const ALL_ENABLED: &str = "security:
  forwarding:
    forwardingMode: enable
    reverseForwardingMode: enable
    x11ForwardingMode: enable
    agentForwardingMode: enable
";

/// Forwarded channels the server opened, with their unanswered open replies.
type Unanswered = Arc<Mutex<Vec<(Channel<Msg>, ChannelOpenHandle)>>>;

/// A client that keeps every forwarded channel the server opens unanswered.
#[derive(Clone, Default)]
struct NeverConfirms {
    held: Unanswered,
}

impl client::Handler for NeverConfirms {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        _key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        Ok(true)
    }

    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<Msg>,
        _connected_address: &str,
        _connected_port: u32,
        _originator_address: &str,
        _originator_port: u32,
        reply: ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        self.held.lock().unwrap().push((channel, reply));
        Ok(())
    }
}

/// [`run`] with the output as text.
async fn run_text<H: client::Handler>(
    handle: &client::Handle<H>,
    cmd: &str,
) -> (String, Option<u32>) {
    let (out, status) = run(handle, cmd).await;
    (String::from_utf8_lossy(&out).into_owned(), status)
}

/// 100 connections to a `-R` listener inside the container while the client confirms none of
/// the channels the server opens for them: the server opens 64 and refuses the rest at once,
/// with a log line, and the connection's sessions carry on.
#[tokio::test(flavor = "multi_thread")]
async fn unconfirmed_forwarded_channels_count_against_the_limit() {
    let env = TestEnv::new();
    let server = env.start(&format!("{}{ALL_ENABLED}", env.config_yaml("connection")));
    let client = NeverConfirms::default();
    let held = Arc::clone(&client.held);
    let handle = connect_with(&env, &server, client).await;
    let port = tokio::time::timeout(
        Duration::from_secs(60),
        handle.tcpip_forward("127.0.0.1", 0),
    )
    .await
    .expect("the forward is answered")
    .expect("listening in the container");
    assert!(port > 0);
    let (out, status) = run_text(
        &handle,
        &format!(
            "for i in $(seq 100); do socat -u OPEN:/dev/null TCP:127.0.0.1:{port} & done; wait; echo made"
        ),
    )
    .await;
    assert_eq!((out.as_str(), status), ("made\n", Some(0)));
    let refused = poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
        server
            .output()
            .contains("connections made inside the container refused")
            .then_some(())
    });
    assert!(refused.is_some(), "no refusal logged: {}", server.output());
    let opened = poll_until(Duration::from_secs(30), Duration::from_millis(50), || {
        (held.lock().unwrap().len() >= MAX_FORWARD_CHANNELS).then_some(())
    });
    assert!(opened.is_some(), "{} opened", held.lock().unwrap().len());
    // The connection's sessions go on meanwhile, and no more than the limit was opened.
    let (out, status) = run_text(&handle, "echo still").await;
    assert_eq!((out.as_str(), status), ("still\n", Some(0)));
    assert_eq!(held.lock().unwrap().len(), MAX_FORWARD_CHANNELS);
}

/// A `-L` host name longer than the protocol's 255 bytes is refused at once; forwarding on the
/// connection goes on (the agent used to treat it as a protocol violation and stop).
#[tokio::test(flavor = "multi_thread")]
async fn an_overlong_forwarding_host_is_refused_without_ending_forwarding() {
    let env = TestEnv::new();
    let server = env.start(&format!("{}{ALL_ENABLED}", env.config_yaml("connection")));
    let handle = connect_with(&env, &server, NeverConfirms::default()).await;
    let long = "a".repeat(256);
    let t = Instant::now();
    let r = handle
        .channel_open_direct_tcpip(long.as_str(), 80, "127.0.0.1", 1234)
        .await;
    assert!(r.is_err(), "a 256-byte host name was accepted");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // Forwarding still works: a listener in the container, reached from inside it.
    let port = handle.tcpip_forward("127.0.0.1", 0).await.expect("listens");
    assert!(port > 0);
    let (out, _) = run_text(&handle, "echo ok").await;
    assert_eq!(out, "ok\n");
    assert!(
        !server.output().contains("cut off the agent"),
        "{}",
        server.output()
    );
}

/// While the connection's pod takes seconds to start (an init container sleeps), `-R`,
/// `x11-req` and `auth-agent-req` are asked for: the connection keeps answering (a new
/// channel opens, the X11 and agent requests are answered at once), and the forward is
/// answered once the container listens.
#[tokio::test(flavor = "multi_thread")]
async fn requests_while_the_container_starts_do_not_hold_up_the_connection() {
    let fake = KubeFake::start();
    let env = TestEnv::new();
    let image = support::test_image();
    let yaml = env
        .kube_config_yaml(&fake, "connection", "")
        .replacen(
            "    spec:\n      containers:\n",
            &format!(
                "    spec:\n      initContainers:\n        - name: slow\n          image: {image}\n          command: [/bin/sh, -c, 'sleep 6']\n      containers:\n"
            ),
            1,
        );
    assert!(yaml.contains("name: slow"), "{yaml}");
    let server = env.start(&format!("{yaml}{ALL_ENABLED}"));
    let handle = connect(&env, &server).await;
    let t = Instant::now();
    let forward = handle.tcpip_forward("127.0.0.1", 0);
    let meanwhile = async {
        let mut ch = handle
            .channel_open_session()
            .await
            .expect("a channel opens");
        let opened = t.elapsed();
        ch.request_x11(
            true,
            false,
            "MIT-MAGIC-COOKIE-1",
            "00112233445566778899aabbccddeeff",
            0,
        )
        .await
        .unwrap();
        assert!(reply(&mut ch).await, "x11-req refused");
        ch.agent_forward(true).await.unwrap();
        assert!(reply(&mut ch).await, "auth-agent-req refused");
        let answered = t.elapsed();
        ch.exec(true, "echo started").await.unwrap();
        let mut out = Vec::new();
        while let Some(msg) = ch.wait().await {
            if let ChannelMsg::Data { data } = msg {
                out.extend_from_slice(&data);
            }
        }
        (opened, answered, String::from_utf8_lossy(&out).into_owned())
    };
    let (port, (opened, answered, out)) = tokio::time::timeout(
        Duration::from_secs(120),
        futures_util::future::join(forward, meanwhile),
    )
    .await
    .expect("everything is answered once the pod runs");
    let forwarded = t.elapsed();
    eprintln!("channel opened after {opened:?}, X11 and agent answered after {answered:?}, the forward after the pod started ({forwarded:?})");
    assert!(port.expect("the forward listens") > 0);
    assert_eq!(out, "started\n", "{}", server.output());
    assert!(
        opened < Duration::from_secs(1),
        "channel opened after {opened:?}"
    );
    assert!(
        answered < Duration::from_secs(2),
        "answered after {answered:?}"
    );
    assert!(
        forwarded > Duration::from_secs(3),
        "the pod started too fast to tell ({forwarded:?})"
    );
    drop(handle);
    drop(server);
    drop(fake);
}
