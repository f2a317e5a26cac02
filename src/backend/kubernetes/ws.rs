//! The WebSocket upgrade for exec/attach (`shared/docs/kubernetes.md` §2.1): the handshake goes
//! through our hyper client (so TLS, authentication and the 401 token re-read are the same as
//! for REST calls); tokio-tungstenite then frames the upgraded connection.
//!
//! [`WsStream`] carries binary messages only (the channel protocols we offer,
//! `v5.channel.k8s.io` and `v4.channel.k8s.io`, never use text frames); text frames are
//! ignored. Pings are answered automatically.

use base64::Engine as _;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, Stream, StreamExt};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, StatusCode};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use super::client::{http_error, op_name, read_capped, KubeClient, KubeError};

/// Largest incoming WebSocket message and frame.
pub const MAX_WS_MESSAGE_BYTES: usize = 16 << 20;
/// RFC 6455's fixed GUID for `Sec-WebSocket-Accept`.
const WS_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

type Io = TokioIo<Upgraded>;

/// `base64(sha1(key + GUID))`.
fn accept_for(key: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key.as_bytes());
    ctx.update(WS_GUID);
    base64::engine::general_purpose::STANDARD.encode(ctx.finish().as_ref())
}

fn header_str(h: &http::HeaderMap, name: HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

impl KubeClient {
    /// Opens a WebSocket on `path_and_query` (`…/exec?…`, `…/attach?…`), offering the
    /// comma-separated subprotocols in `protocols` (e.g. `"v5.channel.k8s.io,
    /// v4.channel.k8s.io"`). Returns the stream and the protocol the server chose, which is
    /// always one of the offered ones (empty only when nothing was offered). The HTTP timeout
    /// covers connecting and the handshake; a non-101 answer is [`KubeError::Http`].
    pub async fn upgrade(
        &self,
        path_and_query: &str,
        protocols: &str,
    ) -> Result<(WsStream, String), KubeError> {
        let op = op_name(&Method::GET, path_and_query);
        let handshake = |reason: String| KubeError::Handshake {
            op: op.clone(),
            reason,
        };
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce)
            .map_err(|e| handshake(format!("no randomness for the key: {e}")))?;
        let key = base64::engine::general_purpose::STANDARD.encode(nonce);
        let offered: Vec<&str> = protocols
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .collect();
        let mut headers = vec![
            (header::CONNECTION, HeaderValue::from_static("Upgrade")),
            (header::UPGRADE, HeaderValue::from_static("websocket")),
            (
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            ),
            (
                header::SEC_WEBSOCKET_KEY,
                HeaderValue::from_str(&key).map_err(|e| handshake(e.to_string()))?,
            ),
        ];
        if !offered.is_empty() {
            let offer = HeaderValue::from_str(&offered.join(", "))
                .map_err(|_| handshake("invalid characters in the subprotocol offer".into()))?;
            headers.push((header::SEC_WEBSOCKET_PROTOCOL, offer));
        }

        let (upgraded, chosen) = self
            .timed(&op, async {
                let (resp, _guard) = self
                    .send(&op, Method::GET, path_and_query, None, &headers, true)
                    .await?;
                let status = resp.status();
                if status != StatusCode::SWITCHING_PROTOCOLS {
                    let body = read_capped(&op, resp.into_body()).await?;
                    return Err(http_error(op.clone(), status, &body));
                }
                let h = resp.headers();
                if !header_str(h, header::UPGRADE)
                    .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
                {
                    return Err(handshake("the response lacks `Upgrade: websocket`".into()));
                }
                let connection_upgrade = header_str(h, header::CONNECTION).is_some_and(|v| {
                    v.split(',')
                        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
                });
                if !connection_upgrade {
                    return Err(handshake("the response lacks `Connection: Upgrade`".into()));
                }
                if header_str(h, header::SEC_WEBSOCKET_ACCEPT) != Some(accept_for(&key).as_str()) {
                    return Err(handshake("wrong or missing Sec-WebSocket-Accept".into()));
                }
                let chosen = header_str(h, header::SEC_WEBSOCKET_PROTOCOL).unwrap_or("");
                let chosen = match (chosen, offered.is_empty()) {
                    ("", true) => String::new(),
                    (c, _) if offered.contains(&c) => c.to_string(),
                    ("", false) => return Err(handshake("the server chose no subprotocol".into())),
                    (c, _) => {
                        return Err(handshake(format!(
                            "the server chose subprotocol {c:?}, which was not offered"
                        )))
                    }
                };
                let upgraded =
                    hyper::upgrade::on(resp)
                        .await
                        .map_err(|e| KubeError::Transport {
                            op: op.clone(),
                            source: crate::http::HttpError::Exchange(e),
                        })?;
                Ok((upgraded, chosen))
            })
            .await?;

        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_WS_MESSAGE_BYTES))
            .max_frame_size(Some(MAX_WS_MESSAGE_BYTES));
        let ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Client, Some(config))
                .await;
        tracing::debug!(op, protocol = %chosen, "Kubernetes WebSocket open");
        Ok((
            WsStream {
                op,
                ws,
                done: false,
            },
            chosen,
        ))
    }
}

/// What one received message means to the reader.
enum Step {
    Data(Vec<u8>),
    /// Ping, pong or text: read on.
    Skip,
    End,
    Fail(KubeError),
}

fn classify(op: &str, msg: Option<Result<Message, WsError>>) -> Step {
    match msg {
        Some(Ok(Message::Binary(b))) => Step::Data(b.into()),
        // tungstenite has queued the pong; it is written before the next read.
        Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Step::Skip,
        Some(Ok(Message::Text(_))) => {
            tracing::debug!(op, "ignoring a WebSocket text message");
            Step::Skip
        }
        Some(Ok(Message::Close(frame))) => match frame {
            Some(f) if f.code != CloseCode::Normal => Step::Fail(KubeError::WebSocketClosed {
                op: op.to_string(),
                code: f.code.into(),
                reason: f.reason.to_string(),
            }),
            _ => Step::End,
        },
        None | Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => Step::End,
        Some(Err(source)) => Step::Fail(KubeError::WebSocket {
            op: op.to_string(),
            source,
        }),
    }
}

/// Reads until a binary message, the end, or an error.
async fn next_binary<S>(op: &str, ws: &mut S, done: &mut bool) -> Option<Result<Vec<u8>, KubeError>>
where
    S: Stream<Item = Result<Message, WsError>> + Unpin,
{
    while !*done {
        match classify(op, ws.next().await) {
            Step::Data(d) => return Some(Ok(d)),
            Step::Skip => {}
            Step::End => *done = true,
            Step::Fail(e) => {
                *done = true;
                return Some(Err(e));
            }
        }
    }
    None
}

fn normal_close() -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }))
}

/// Sending a close after the peer's close (tungstenite already answered it) is not an error.
fn close_result(op: &str, r: Result<(), WsError>) -> Result<(), KubeError> {
    match r {
        Ok(())
        | Err(WsError::ConnectionClosed | WsError::AlreadyClosed)
        | Err(WsError::Protocol(
            tokio_tungstenite::tungstenite::error::ProtocolError::SendAfterClosing,
        )) => Ok(()),
        Err(source) => Err(KubeError::WebSocket {
            op: op.to_string(),
            source,
        }),
    }
}

fn send_result(op: &str, r: Result<(), WsError>) -> Result<(), KubeError> {
    r.map_err(|source| KubeError::WebSocket {
        op: op.to_string(),
        source,
    })
}

/// A WebSocket carrying binary messages, as returned by [`KubeClient::upgrade`].
///
/// [`recv`](Self::recv) is cancel-safe, so one task can `select!` between it and
/// [`send_binary`](Self::send_binary); or [`split`](Self::split) it for two tasks.
pub struct WsStream {
    op: String,
    ws: WebSocketStream<Io>,
    done: bool,
}

impl WsStream {
    /// Sends one binary message (channel byte + payload) and flushes it.
    pub async fn send_binary(&mut self, data: Vec<u8>) -> Result<(), KubeError> {
        send_result(&self.op, self.ws.send(Message::Binary(data.into())).await)
    }

    /// The next binary message; pings are answered, pongs and text messages skipped.
    /// `None` after a normal close (code 1000 or none) or when the connection is gone after
    /// a close; a close with another code is [`KubeError::WebSocketClosed`].
    pub async fn recv(&mut self) -> Option<Result<Vec<u8>, KubeError>> {
        while !self.done {
            match classify(&self.op, self.ws.next().await) {
                Step::Data(d) => return Some(Ok(d)),
                // Push the queued pong out now rather than at the next read.
                Step::Skip => {
                    let _ = self.ws.flush().await;
                }
                Step::End => {
                    // Flushes the automatic close reply, if any.
                    let _ = self.ws.flush().await;
                    self.done = true;
                }
                Step::Fail(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        None
    }

    /// Sends a Close with code 1000 (no more messages can be sent); keep calling
    /// [`recv`](Self::recv) to read what the server still sends until its Close.
    pub async fn close(&mut self) -> Result<(), KubeError> {
        close_result(&self.op, self.ws.send(normal_close()).await)
    }

    /// Splits into a sending and a receiving half (for separate tasks).
    pub fn split(self) -> (WsSender, WsReceiver) {
        let (sink, stream) = self.ws.split();
        (
            WsSender {
                op: self.op.clone(),
                sink,
            },
            WsReceiver {
                op: self.op,
                stream,
                done: self.done,
            },
        )
    }
}

/// The sending half of a [`WsStream`].
pub struct WsSender {
    op: String,
    sink: SplitSink<WebSocketStream<Io>, Message>,
}

impl WsSender {
    /// Sends one binary message and flushes it.
    pub async fn send_binary(&mut self, data: Vec<u8>) -> Result<(), KubeError> {
        send_result(&self.op, self.sink.send(Message::Binary(data.into())).await)
    }

    /// Sends a Close with code 1000.
    pub async fn close(&mut self) -> Result<(), KubeError> {
        close_result(&self.op, self.sink.send(normal_close()).await)
    }
}

/// The receiving half of a [`WsStream`]; pongs go out with the next read.
pub struct WsReceiver {
    op: String,
    stream: SplitStream<WebSocketStream<Io>>,
    done: bool,
}

impl WsReceiver {
    /// As [`WsStream::recv`].
    pub async fn recv(&mut self) -> Option<Result<Vec<u8>, KubeError>> {
        next_binary(&self.op, &mut self.stream, &mut self.done).await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::client::testing::*;
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::sync::mpsc;

    const OFFER: &str = "v5.channel.k8s.io, v4.channel.k8s.io";

    #[test]
    fn accept_matches_rfc_6455() {
        assert_eq!(
            accept_for("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    /// Answers the upgrade with `protocol` (and a wrong accept when `bad_accept`), then runs
    /// a script: ping, a binary message, echo one message, report what it saw, close.
    fn ws_server(
        protocol: &'static str,
        bad_accept: bool,
        tx: mpsc::UnboundedSender<String>,
    ) -> Handler {
        handler(move |req: Req, mut s| {
            let tx = tx.clone();
            async move {
                let key = req.header("sec-websocket-key").unwrap_or("").to_string();
                let accept = if bad_accept {
                    accept_for("other")
                } else {
                    accept_for(&key)
                };
                let head = format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Protocol: {protocol}\r\n\r\n");
                let _ = s.write_all(head.as_bytes()).await;
                let mut ws = WebSocketStream::from_raw_socket(s, Role::Server, None).await;
                let _ = ws.send(Message::Ping(b"hi".to_vec().into())).await;
                let _ = ws.send(Message::Text("ignored".into())).await;
                let _ = ws.send(Message::Binary(vec![1].into())).await;
                while let Some(Ok(m)) = ws.next().await {
                    match m {
                        Message::Pong(p) => {
                            let _ = tx.send(format!("pong {}", String::from_utf8_lossy(&p)));
                        }
                        Message::Binary(b) => {
                            let _ = tx.send(format!("binary {:?}", &b[..]));
                            if b.first() == Some(&9) {
                                let _ = ws
                                    .close(Some(CloseFrame {
                                        code: CloseCode::Error,
                                        reason: "boom".into(),
                                    }))
                                    .await;
                            } else {
                                let _ = ws.send(Message::Binary(b)).await;
                            }
                        }
                        Message::Close(f) => {
                            let _ = tx.send(format!("close {:?}", f.map(|f| u16::from(f.code))));
                        }
                        _ => {}
                    }
                }
            }
        })
    }

    #[tokio::test]
    async fn upgrade_v4_round_trip_ping_and_close() {
        let certs = certs();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let srv = serve(&certs, false, ws_server("v4.channel.k8s.io", false, tx)).await;
        let mut conn = srv.conn(&certs);
        conn.token = Some(crate::backend::kubernetes::TokenSource::Static(
            "tok".into(),
        ));
        let c = KubeClient::new(&conn, Duration::from_secs(10)).unwrap();
        let (mut ws, proto) = c
            .upgrade(
                "/api/v1/namespaces/d/pods/p/exec?command=sh&stdin=true",
                OFFER,
            )
            .await
            .unwrap();
        assert_eq!(proto, "v4.channel.k8s.io");
        let r = &srv.requests()[0];
        assert_eq!(r.method, "GET");
        assert_eq!(r.header("sec-websocket-protocol"), Some(OFFER));
        assert_eq!(r.header("sec-websocket-version"), Some("13"));
        assert_eq!(r.header("upgrade"), Some("websocket"));
        assert_eq!(r.header("authorization"), Some("Bearer tok"));
        assert_eq!(r.header("sec-websocket-key").map(str::len), Some(24));

        assert_eq!(ws.recv().await.unwrap().unwrap(), [1]); // ping and text skipped
        assert_eq!(rx.recv().await.unwrap(), "pong hi");
        ws.send_binary(vec![0, b'a']).await.unwrap();
        assert_eq!(rx.recv().await.unwrap(), "binary [0, 97]");
        assert_eq!(ws.recv().await.unwrap().unwrap(), [0, b'a']);
        ws.close().await.unwrap();
        assert_eq!(rx.recv().await.unwrap(), "close Some(1000)");
        assert!(ws.recv().await.is_none());
        assert!(ws.recv().await.is_none());
    }

    #[tokio::test]
    async fn abnormal_close_is_an_error_split_halves() {
        let certs = certs();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let srv = serve(&certs, false, ws_server("v5.channel.k8s.io", false, tx)).await;
        let c = KubeClient::new(&srv.conn(&certs), Duration::from_secs(10)).unwrap();
        let (ws, proto) = c.upgrade("/exec", OFFER).await.unwrap();
        assert_eq!(proto, "v5.channel.k8s.io");
        let (mut tx_half, mut rx_half) = ws.split();
        assert_eq!(rx_half.recv().await.unwrap().unwrap(), [1]);
        tx_half.send_binary(vec![9]).await.unwrap();
        let e = rx_half.recv().await.unwrap().unwrap_err();
        assert!(
            matches!(&e, KubeError::WebSocketClosed { code: 1011, reason, .. } if reason == "boom"),
            "{e}"
        );
        assert!(rx_half.recv().await.is_none());
        assert_eq!(rx.recv().await.unwrap(), "pong hi");
    }

    #[tokio::test]
    async fn handshake_failures() {
        let certs = certs();
        let (tx, _rx) = mpsc::unbounded_channel();
        let srv = serve(
            &certs,
            false,
            ws_server("v4.channel.k8s.io", true, tx.clone()),
        )
        .await;
        let c = KubeClient::new(&srv.conn(&certs), Duration::from_secs(10)).unwrap();
        let e = c.upgrade("/exec", OFFER).await.err().unwrap();
        assert!(
            matches!(&e, KubeError::Handshake { reason, .. } if reason.contains("Accept")),
            "{e}"
        );

        let srv = serve(&certs, false, ws_server("v3.channel.k8s.io", false, tx)).await;
        let c = KubeClient::new(&srv.conn(&certs), Duration::from_secs(10)).unwrap();
        let e = c.upgrade("/exec", OFFER).await.err().unwrap();
        assert!(
            matches!(&e, KubeError::Handshake { reason, .. } if reason.contains("not offered")),
            "{e}"
        );

        let h = handler(|_, mut s| async move {
            respond(&mut s, "400 Bad Request", br#"{"status":"Failure","reason":"BadRequest","message":"pod p does not have a host assigned","code":400}"#).await
        });
        let srv = serve(&certs, false, h).await;
        let c = KubeClient::new(&srv.conn(&certs), Duration::from_secs(10)).unwrap();
        let e = c.upgrade("/exec?command=x", OFFER).await.err().unwrap();
        assert_eq!(e.http_code(), Some(400));
        assert_eq!(e.reason(), Some("BadRequest"));
    }
}
