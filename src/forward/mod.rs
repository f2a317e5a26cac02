//! The server side of the agent's `forward-server` protocol (docs/agent-protocol.md): many
//! forwarded connections multiplexed over one exec's stdin and stdout.
//!
//! [`Mux::start`] takes the exec's streams and runs two tasks: a writer that sends encoded
//! frames in order, and a reader that decodes the agent's frames and routes them to the
//! waiting dial/listen call, to a stream's event queue, or (accepted connections) to the
//! [`Incoming`] queue. Both directions of every stream are credit-limited to
//! [`INITIAL_CREDIT`] unacknowledged bytes, so one slow connection never holds up the others
//! and the memory per stream is bounded.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::agent::proto::{self, Frame, AGENT_ID_BASE, INITIAL_CREDIT, MAX_DATA};
use crate::backend::docker::StreamKind;
use crate::backend::process::OutputSource;

/// Largest stderr line from the agent copied into our log.
const MAX_AGENT_LOG_BYTES: usize = 1024;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ForwardError {
    /// The agent answered `Failed`.
    #[error("{0}")]
    Refused(String),
    /// The forward-server is gone (exited, protocol error, connection closing).
    #[error("the forwarding agent has stopped")]
    Stopped,
}

/// What the agent sends for one stream.
#[derive(Debug)]
pub enum StreamEvent {
    Data(Bytes),
    Eof,
}

/// A connection a listener inside the container accepted.
pub struct Incoming {
    pub listener: u32,
    pub peer: String,
    pub peer_port: u16,
    pub stream: MuxStream,
}

/// A request's id, where its reply arrives, and (dials) the stream registered for it.
type Begun = (
    u32,
    oneshot::Receiver<Result<u16, String>>,
    Option<MuxStream>,
);

struct StreamSlot {
    events: mpsc::UnboundedSender<StreamEvent>,
    /// Bytes we may still send to the agent.
    credit: Arc<Semaphore>,
    /// Bytes the agent sent that we have not acknowledged yet.
    unacked: u32,
}

#[derive(Default)]
struct State {
    next_id: u32,
    streams: HashMap<u32, StreamSlot>,
    pending: HashMap<u32, oneshot::Sender<Result<u16, String>>>,
    stopped: bool,
}

pub struct Mux {
    out: mpsc::UnboundedSender<Vec<u8>>,
    state: Mutex<State>,
    /// Cancelled when the forward-server has ended, for whatever reason.
    stopped: CancellationToken,
}

/// One forwarded connection. When it (or both halves of it) is dropped the stream is
/// released and the agent told.
pub struct MuxStream {
    guard: Arc<StreamGuard>,
    events: mpsc::UnboundedReceiver<StreamEvent>,
    credit: Arc<Semaphore>,
}

/// The sending half of a [`MuxStream`].
pub struct MuxSink {
    guard: Arc<StreamGuard>,
    credit: Arc<Semaphore>,
}

/// The receiving half of a [`MuxStream`].
pub struct MuxSource {
    guard: Arc<StreamGuard>,
    events: mpsc::UnboundedReceiver<StreamEvent>,
}

struct StreamGuard {
    id: u32,
    mux: Arc<Mux>,
}

impl Mux {
    /// Runs the protocol over a started `forward-server` exec. `cancel` ends it (closing the
    /// agent's stdin, which makes it exit and remove its sockets).
    pub fn start<W>(
        output: OutputSource,
        input: W,
        cancel: CancellationToken,
    ) -> (Arc<Mux>, mpsc::UnboundedReceiver<Incoming>)
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (out, out_rx) = mpsc::unbounded_channel();
        let mux = Arc::new(Mux {
            out,
            state: Mutex::new(State {
                next_id: 1,
                ..State::default()
            }),
            stopped: CancellationToken::new(),
        });
        let (incoming_tx, incoming_rx) = mpsc::unbounded_channel();
        tokio::spawn(write_frames(out_rx, input, cancel, mux.stopped.clone()));
        tokio::spawn(read_frames(Arc::clone(&mux), output, incoming_tx));
        (mux, incoming_rx)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing forwarding, so keep going with the data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn send(&self, frame: &Frame) {
        let mut buf = Vec::new();
        frame.encode(&mut buf);
        let _ = self.out.send(buf);
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.is_cancelled()
    }

    /// A new stream or listener id with its reply slot; `register_stream` also creates the
    /// stream's queue before the request leaves, so nothing the agent sends can miss it.
    fn begin(self: &Arc<Self>, register_stream: bool) -> Result<Begun, ForwardError> {
        let mut st = self.state();
        if st.stopped {
            return Err(ForwardError::Stopped);
        }
        let id = st.next_id;
        if id >= AGENT_ID_BASE {
            return Err(ForwardError::Refused("out of stream ids".into()));
        }
        st.next_id += 1;
        let (tx, rx) = oneshot::channel();
        st.pending.insert(id, tx);
        let stream = register_stream.then(|| new_stream(&mut st, Arc::clone(self), id));
        Ok((id, rx, stream))
    }

    async fn reply(
        &self,
        id: u32,
        rx: oneshot::Receiver<Result<u16, String>>,
    ) -> Result<u16, ForwardError> {
        match rx.await {
            Ok(Ok(port)) => Ok(port),
            Ok(Err(message)) => {
                self.state().streams.remove(&id);
                Err(ForwardError::Refused(message))
            }
            Err(_) => Err(ForwardError::Stopped),
        }
    }

    async fn dial(
        self: &Arc<Self>,
        make: impl FnOnce(u32) -> Frame,
    ) -> Result<MuxStream, ForwardError> {
        let (id, rx, stream) = self.begin(true)?;
        self.send(&make(id));
        let stream = stream.ok_or(ForwardError::Stopped)?;
        self.reply(id, rx).await?;
        Ok(stream)
    }

    /// Connects to `host:port` from inside the container.
    pub async fn dial_tcp(
        self: &Arc<Self>,
        host: &str,
        port: u16,
    ) -> Result<MuxStream, ForwardError> {
        let host = host.to_string();
        self.dial(|id| Frame::DialTcp { id, port, host }).await
    }

    /// Connects to a unix socket inside the container.
    pub async fn dial_unix(self: &Arc<Self>, path: &str) -> Result<MuxStream, ForwardError> {
        let path = path.as_bytes().to_vec();
        self.dial(|id| Frame::DialUnix { id, path }).await
    }

    /// Listens on `host:port` inside the container; returns the listener id and bound port.
    pub async fn listen_tcp(
        self: &Arc<Self>,
        host: &str,
        port: u16,
    ) -> Result<(u32, u16), ForwardError> {
        let (id, rx, _) = self.begin(false)?;
        self.send(&Frame::ListenTcp {
            id,
            port,
            host: host.to_string(),
        });
        Ok((id, self.reply(id, rx).await?))
    }

    /// Listens on a unix socket inside the container; `private_dir`: the agent creates the
    /// socket's directory (mode 0700) and removes it afterwards.
    pub async fn listen_unix(
        self: &Arc<Self>,
        path: &str,
        private_dir: bool,
    ) -> Result<u32, ForwardError> {
        let (id, rx, _) = self.begin(false)?;
        self.send(&Frame::ListenUnix {
            id,
            private_dir,
            path: path.as_bytes().to_vec(),
        });
        self.reply(id, rx).await?;
        Ok(id)
    }

    /// Stops a listener; connections it accepted go on.
    pub fn unlisten(&self, id: u32) {
        self.send(&Frame::Unlisten { id });
    }

    /// Ends everything: pending calls fail, streams see their end.
    fn stop(&self, why: &str) {
        let mut st = self.state();
        if st.stopped {
            return;
        }
        st.stopped = true;
        for (_, slot) in st.streams.drain() {
            slot.credit.close();
        }
        for (_, tx) in st.pending.drain() {
            let _ = tx.send(Err(why.to_string()));
        }
        drop(st);
        self.stopped.cancel();
    }

    /// Handles one frame from the agent; `Err` is a protocol violation.
    fn dispatch(
        self: &Arc<Self>,
        frame: Frame,
        incoming: &mpsc::UnboundedSender<Incoming>,
    ) -> Result<(), String> {
        let mut st = self.state();
        match frame {
            Frame::Opened { id, port } => {
                if let Some(tx) = st.pending.remove(&id) {
                    let _ = tx.send(Ok(port));
                }
            }
            Frame::Failed { id, message } => {
                if let Some(tx) = st.pending.remove(&id) {
                    let _ = tx.send(Err(message));
                }
            }
            Frame::Accepted {
                listener,
                id,
                peer_port,
                peer,
            } => {
                if id < AGENT_ID_BASE || st.streams.contains_key(&id) {
                    return Err(format!(
                        "accepted stream id {id} is not the agent's or in use"
                    ));
                }
                let stream = new_stream(&mut st, Arc::clone(self), id);
                drop(st);
                let accepted = Incoming {
                    listener,
                    peer,
                    peer_port,
                    stream,
                };
                // Nobody listening any more: the stream's drop closes it.
                let _ = incoming.send(accepted);
            }
            Frame::Data { id, data } => {
                if let Some(slot) = st.streams.get_mut(&id) {
                    slot.unacked = slot.unacked.saturating_add(data.len() as u32);
                    if slot.unacked > INITIAL_CREDIT {
                        return Err(format!("stream {id}: data beyond the credit"));
                    }
                    let _ = slot.events.send(StreamEvent::Data(Bytes::from(data)));
                }
            }
            Frame::Eof { id } => {
                if let Some(slot) = st.streams.get(&id) {
                    let _ = slot.events.send(StreamEvent::Eof);
                }
            }
            Frame::Close { id } => {
                if let Some(slot) = st.streams.remove(&id) {
                    slot.credit.close();
                }
            }
            Frame::Ack { id, bytes } => {
                if let Some(slot) = st.streams.get(&id) {
                    let granted = slot.credit.available_permits() as u64 + u64::from(bytes);
                    if granted > u64::from(INITIAL_CREDIT) {
                        return Err(format!("stream {id}: acknowledged more than was sent"));
                    }
                    slot.credit.add_permits(bytes as usize);
                }
            }
            other => return Err(format!("unexpected frame from the agent: {other:?}")),
        }
        Ok(())
    }
}

fn new_stream(st: &mut State, mux: Arc<Mux>, id: u32) -> MuxStream {
    let (tx, rx) = mpsc::unbounded_channel();
    let credit = Arc::new(Semaphore::new(INITIAL_CREDIT as usize));
    st.streams.insert(
        id,
        StreamSlot {
            events: tx,
            credit: Arc::clone(&credit),
            unacked: 0,
        },
    );
    MuxStream {
        guard: Arc::new(StreamGuard { id, mux }),
        events: rx,
        credit,
    }
}

async fn write_frames<W: AsyncWrite + Unpin>(
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    mut input: W,
    cancel: CancellationToken,
    stopped: CancellationToken,
) {
    loop {
        let frame = tokio::select! {
            f = rx.recv() => f,
            () = cancel.cancelled() => None,
            () = stopped.cancelled() => None,
        };
        let Some(frame) = frame else { break };
        if input.write_all(&frame).await.is_err() {
            break;
        }
    }
    // EOF on the agent's stdin: it closes everything and exits.
    let _ = input.shutdown().await;
}

async fn read_frames(
    mux: Arc<Mux>,
    mut output: OutputSource,
    incoming: mpsc::UnboundedSender<Incoming>,
) {
    let mut buf = BytesMut::new();
    let why = loop {
        let chunk = match output.next().await {
            Ok(Some((StreamKind::Stdout, data))) => data,
            Ok(Some((StreamKind::Stderr, data))) => {
                let text = String::from_utf8_lossy(&data[..data.len().min(MAX_AGENT_LOG_BYTES)]);
                tracing::info!(message = %text.trim_end(), "forwarding agent");
                continue;
            }
            Ok(Some(_)) => continue,
            Ok(None) => break "the forwarding agent exited".to_string(),
            Err(e) => break format!("reading from the forwarding agent failed: {e}"),
        };
        buf.extend_from_slice(&chunk);
        let mut violation = None;
        loop {
            match proto::decode(&buf) {
                Ok(Some((frame, used))) => {
                    let _ = buf.split_to(used);
                    if let Err(e) = mux.dispatch(frame, &incoming) {
                        violation = Some(e);
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    violation = Some(e.to_string());
                    break;
                }
            }
        }
        if let Some(v) = violation {
            tracing::warn!(error = %v, "forwarding stopped: the agent in the container does not speak this server's protocol (an image's own ContainerSSH agent? inject ours with agent.binary)");
            break v;
        }
    };
    tracing::debug!(reason = %why, "forwarding stopped");
    mux.stop(&why);
}

impl MuxStream {
    pub fn id(&self) -> u32 {
        self.guard.id
    }

    pub fn split(self) -> (MuxSink, MuxSource) {
        (
            MuxSink {
                guard: Arc::clone(&self.guard),
                credit: self.credit,
            },
            MuxSource {
                guard: self.guard,
                events: self.events,
            },
        )
    }
}

impl MuxSink {
    /// Sends data to the container side, waiting for credit; `Err` when the stream is gone.
    pub async fn send(&self, data: &[u8]) -> Result<(), ForwardError> {
        let StreamGuard { id, mux } = &*self.guard;
        for chunk in data.chunks(MAX_DATA) {
            let permits = self
                .credit
                .acquire_many(chunk.len() as u32)
                .await
                .map_err(|_| ForwardError::Stopped)?;
            permits.forget();
            mux.send(&Frame::Data {
                id: *id,
                data: chunk.to_vec(),
            });
        }
        Ok(())
    }

    /// No more data from our side.
    pub fn eof(&self) {
        self.guard.mux.send(&Frame::Eof { id: self.guard.id });
    }
}

impl MuxSource {
    /// The next event; `None` when the agent closed the stream (or stopped).
    pub async fn recv(&mut self) -> Option<StreamEvent> {
        self.events.recv().await
    }

    /// Returns credit for `n` bytes received and delivered.
    pub fn ack(&self, n: usize) {
        let StreamGuard { id, mux } = &*self.guard;
        if let Some(slot) = mux.state().streams.get_mut(id) {
            slot.unacked = slot.unacked.saturating_sub(n as u32);
        }
        mux.send(&Frame::Ack {
            id: *id,
            bytes: n as u32,
        });
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let released = self.mux.state().streams.remove(&self.id).is_some();
        if released {
            self.mux.send(&Frame::Close { id: self.id });
        }
    }
}
