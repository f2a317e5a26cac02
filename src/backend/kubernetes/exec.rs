//! One exec into a pod's container over WebSocket (`shared/docs/kubernetes.md` §1.3, §2.2):
//! [`exec`] upgrades, offering `v5.channel.k8s.io` then `v4.channel.k8s.io`; the
//! [`ExecSession`] sends stdin, stdin EOF (v5) and resizes, yields stdout/stderr, and finally
//! the exit status from the channel-3 `Status`. [`ExecSession::split`] gives a sender and a
//! receiver half for separate tasks.

use bytes::Bytes;

use super::client::{KubeClient, KubeError};
use super::pods::encode_query;
use super::wire::{self, ErrorChannel, ExecOutcome, Incoming, Protocol};
use super::ws::{WsReceiver, WsSender};

/// How long [`ExecSession::exit`] spends sending our Close.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Stdin is sent in messages of at most this many bytes.
pub const STDIN_CHUNK: usize = 32 * 1024;

/// Why an exec could not be started or driven.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    Kube(#[from] KubeError),
    #[error("the server chose an unsupported subprotocol {0:?}")]
    Protocol(String),
}

/// One piece of output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    Stdout(Bytes),
    /// Never sent with a tty (stderr is merged into stdout).
    Stderr(Bytes),
}

/// How the exec ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitOutcome {
    /// The process exited with this code (0..=255).
    Exited(u32),
    /// The exec itself failed (container not found, internal error, ...).
    Failed { reason: String, message: String },
    /// The stream ended without a usable status: connection lost, abnormal close, malformed
    /// frames or `Status`.
    Lost(String),
}

/// The `…/exec` path and query for `argv` (each element one `command=` parameter).
pub fn exec_path(
    namespace: &str,
    pod: &str,
    container: &str,
    argv: &[String],
    tty: bool,
    stdin: bool,
) -> String {
    let mut p = format!(
        "/api/v1/namespaces/{}/pods/{}/exec?container={}",
        encode_query(namespace),
        encode_query(pod),
        encode_query(container)
    );
    for a in argv {
        p.push_str("&command=");
        p.push_str(&encode_query(a));
    }
    p.push_str(&format!(
        "&stdin={stdin}&stdout=true&stderr={}&tty={tty}",
        !tty
    ));
    p
}

/// The `…/attach` path and query.
pub fn attach_path(namespace: &str, pod: &str, container: &str, tty: bool) -> String {
    format!(
        "/api/v1/namespaces/{}/pods/{}/attach?container={}&stdin=true&stdout=true&stderr={}&tty={tty}",
        encode_query(namespace),
        encode_query(pod),
        encode_query(container),
        !tty
    )
}

/// Attaches to the main process of `container` in `pod` (session mode). The stream carries
/// no exit status: read it from the pod afterwards.
pub async fn attach(
    client: &KubeClient,
    namespace: &str,
    pod: &str,
    container: &str,
    tty: bool,
) -> Result<ExecSession, ExecError> {
    open(client, &attach_path(namespace, pod, container, tty)).await
}

/// Starts `argv` in `container` of `pod`. With `tty`, stderr is merged into stdout.
pub async fn exec(
    client: &KubeClient,
    namespace: &str,
    pod: &str,
    container: &str,
    argv: &[String],
    tty: bool,
    stdin: bool,
) -> Result<ExecSession, ExecError> {
    open(
        client,
        &exec_path(namespace, pod, container, argv, tty, stdin),
    )
    .await
}

async fn open(client: &KubeClient, path: &str) -> Result<ExecSession, ExecError> {
    let (ws, chosen) = client.upgrade(path, wire::OFFER).await?;
    let protocol = Protocol::from_header(&chosen).ok_or(ExecError::Protocol(chosen))?;
    let (tx, rx) = ws.split();
    Ok(ExecSession {
        sender: ExecSender {
            tx,
            protocol,
            stdin_closed: false,
        },
        receiver: ExecReceiver {
            rx,
            errors: ErrorChannel::new(),
            lost: None,
            ended: false,
        },
    })
}

/// A running exec; see [`split`](Self::split) to drive input and output concurrently.
pub struct ExecSession {
    sender: ExecSender,
    receiver: ExecReceiver,
}

impl ExecSession {
    /// The channel protocol the server chose.
    pub fn protocol(&self) -> Protocol {
        self.sender.protocol
    }

    pub async fn send_stdin(&mut self, data: &[u8]) -> Result<(), ExecError> {
        self.sender.send_stdin(data).await
    }

    pub async fn close_stdin(&mut self) -> Result<(), ExecError> {
        self.sender.close_stdin().await
    }

    pub async fn resize(&mut self, cols: u16, rows: u16) -> Result<(), ExecError> {
        self.sender.resize(cols, rows).await
    }

    pub async fn next_output(&mut self) -> Option<Output> {
        self.receiver.next_output().await
    }

    /// Reads (and drops) any remaining output, reports how the exec ended, and answers the
    /// server's Close (newer API servers wait for it).
    pub async fn exit(self) -> ExitOutcome {
        let ExecSession {
            mut sender,
            receiver,
        } = self;
        let outcome = receiver.exit().await;
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, sender.close()).await;
        outcome
    }

    /// The sending half (stdin, EOF, resize) and the receiving half (output, exit).
    pub fn split(self) -> (ExecSender, ExecReceiver) {
        (self.sender, self.receiver)
    }
}

/// The sending half of an [`ExecSession`].
pub struct ExecSender {
    tx: WsSender,
    protocol: Protocol,
    stdin_closed: bool,
}

impl ExecSender {
    /// The channel protocol the server chose.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Sends `data` on stdin, in messages of at most [`STDIN_CHUNK`] bytes. Ignored after
    /// [`close_stdin`](Self::close_stdin).
    pub async fn send_stdin(&mut self, data: &[u8]) -> Result<(), ExecError> {
        if self.stdin_closed {
            return Ok(());
        }
        for chunk in data.chunks(STDIN_CHUNK) {
            self.tx.send_binary(wire::stdin(chunk)).await?;
        }
        Ok(())
    }

    /// Signals stdin EOF: `[0xFF, 0x00]` on v5. v4 has no way to say it: nothing is sent
    /// (the process keeps waiting for input) and later stdin is dropped.
    pub async fn close_stdin(&mut self) -> Result<(), ExecError> {
        if std::mem::replace(&mut self.stdin_closed, true) {
            return Ok(());
        }
        if let Some(msg) = wire::close_stdin(self.protocol) {
            self.tx.send_binary(msg).await?;
        }
        Ok(())
    }

    /// Whether [`close_stdin`](Self::close_stdin) was called.
    pub fn stdin_closed(&self) -> bool {
        self.stdin_closed
    }

    /// Sends a terminal size (meaningful with a tty only).
    pub async fn resize(&mut self, cols: u16, rows: u16) -> Result<(), ExecError> {
        self.tx.send_binary(wire::resize(cols, rows)).await?;
        Ok(())
    }

    /// Closes the WebSocket (code 1000); the server ends the exec's streams.
    pub async fn close(&mut self) -> Result<(), ExecError> {
        self.tx.close().await?;
        Ok(())
    }
}

/// The receiving half of an [`ExecSession`]. Once [`next_output`](Self::next_output) has
/// returned `None`, the owner of the [`ExecSender`] should call [`ExecSender::close`] (or
/// drop it) so that the server gets its Close.
pub struct ExecReceiver {
    rx: WsReceiver,
    errors: ErrorChannel,
    /// Why the stream ended abnormally.
    lost: Option<String>,
    ended: bool,
}

impl ExecReceiver {
    /// The next piece of output; `None` once the stream has ended (then call
    /// [`exit`](Self::exit)). Channel-3 data is collected, not returned.
    pub async fn next_output(&mut self) -> Option<Output> {
        while !self.ended {
            let msg = match self.rx.recv().await {
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    self.end(e.to_string());
                    break;
                }
                None => {
                    self.ended = true;
                    break;
                }
            };
            match wire::decode(&msg) {
                Ok(Incoming::Stdout(d)) => return Some(Output::Stdout(Bytes::copy_from_slice(d))),
                Ok(Incoming::Stderr(d)) => return Some(Output::Stderr(Bytes::copy_from_slice(d))),
                Ok(Incoming::Error(d)) => {
                    if let Err(e) = self.errors.push(d) {
                        self.end(e.to_string());
                    }
                }
                Ok(Incoming::Empty) => {}
                Err(e) => self.end(e.to_string()),
            }
        }
        None
    }

    fn end(&mut self, why: String) {
        self.ended = true;
        self.lost.get_or_insert(why);
    }

    /// Reads (and drops) any remaining output, then reports how the exec ended.
    pub async fn exit(mut self) -> ExitOutcome {
        while self.next_output().await.is_some() {}
        let status = self.errors.status();
        match (status, self.lost) {
            (Ok(Some(s)), _) => match wire::exit_from_status(&s) {
                ExecOutcome::Exited(c) => ExitOutcome::Exited(c),
                ExecOutcome::Failed { reason, message } => ExitOutcome::Failed { reason, message },
            },
            (Err(e), _) => ExitOutcome::Lost(e.to_string()),
            (Ok(None), Some(why)) => ExitOutcome::Lost(why),
            (Ok(None), None) => {
                ExitOutcome::Lost("the stream ended without an exit status".to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_encodes_each_argument() {
        let argv: Vec<String> = ["sh", "-c", "echo a&b=c"].map(String::from).into();
        assert_eq!(
            exec_path("default", "p1", "shell", &argv, false, true),
            "/api/v1/namespaces/default/pods/p1/exec?container=shell&command=sh&command=-c\
             &command=echo%20a%26b%3Dc&stdin=true&stdout=true&stderr=true&tty=false"
        );
        assert!(exec_path("d", "p", "c", &[], true, false)
            .ends_with("&stdin=false&stdout=true&stderr=false&tty=true"));
    }
}
