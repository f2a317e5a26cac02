//! The server side of the agent's `forward-server` protocol (docs/agent-protocol.md): many
//! forwarded connections multiplexed over one exec's stdin and stdout.
//!
//! [`Mux::start`] takes the exec's streams and runs two tasks: a writer that sends encoded
//! frames in order, and a reader that decodes the agent's frames and routes them to the
//! waiting dial/listen call, to a stream's buffer, or (accepted connections) to the
//! [`Incoming`] queue.
//!
//! The container side is untrusted, so everything it can make us hold is bounded: each
//! stream's buffer by the credit ([`INITIAL_CREDIT`] unacknowledged bytes, however many frames
//! carry them), at most one `Eof` per stream, live streams by [`MAX_STREAMS`], accepted
//! connections waiting for the SSH side by [`MAX_PENDING_ACCEPTS`] (the reader waits for
//! room, so a burst is held back, not buffered), and frames waiting to be written to an agent
//! that does not read by [`MAX_MUX_QUEUE_BYTES`] (data waits for room; control frames beyond
//! twice that mean the agent has stopped reading). An agent that breaks a bound is cut off:
//! forwarding for that connection stops, with a log line; its sessions go on.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::agent::proto::{
    self, Frame, AGENT_ID_BASE, INITIAL_CREDIT, MAX_DATA, MAX_STREAMS, PROGRAM_CREDIT,
};
use crate::backend::process::OutputSource;
use crate::backend::{BoxFuture, OutputKind};
use crate::limits::{MAX_MUX_QUEUE_BYTES, MAX_PENDING_ACCEPTS};

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
#[derive(Debug, PartialEq, Eq)]
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

/// A plain byte stream as an agent's stdout (tests, other transports).
pub struct ReadOutput<R>(pub R);

impl<R: AsyncRead + Unpin + Send + 'static> OutputSource for ReadOutput<R> {
    fn next(&mut self) -> BoxFuture<'_, io::Result<Option<(OutputKind, Bytes)>>> {
        Box::pin(async move {
            let mut buf = vec![0u8; 64 * 1024];
            let n = self.0.read(&mut buf).await?;
            if n == 0 {
                return Ok(None);
            }
            buf.truncate(n);
            Ok(Some((OutputKind::Stdout, Bytes::from(buf))))
        })
    }
}

/// A request's id, where its reply arrives, and (dials) the stream registered for it.
type Begun = (
    u32,
    oneshot::Receiver<Result<u16, String>>,
    Option<MuxStream>,
);

/// What the agent sent on one stream and we have not handed on: bounded by the credit.
#[derive(Default)]
struct Inbox {
    state: Mutex<InboxState>,
    ready: Notify,
}

#[derive(Default)]
struct InboxState {
    /// What arrived and was not taken yet (bounded by the stream's credit).
    data: BytesMut,
    eof: bool,
    /// The stream is over (closed by the agent, or the mux stopped).
    closed: bool,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, InboxState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn close(&self) {
        self.lock().closed = true;
        self.ready.notify_one();
    }
}

struct StreamSlot {
    /// What the agent may send us un-`Ack`ed ([`INITIAL_CREDIT`], [`PROGRAM_CREDIT`] for a
    /// program's output); what we may send it is always [`INITIAL_CREDIT`].
    limit: u32,
    inbox: Arc<Inbox>,
    /// Bytes we may still send to the agent.
    credit: Arc<Semaphore>,
    /// Bytes the agent sent that we have not acknowledged yet.
    unacked: u32,
    /// Of those, bytes delivered and to be acknowledged with the next `Ack`, which goes once
    /// they reach a quarter of `limit` (the agent, having sent `limit`, is then owed at least
    /// that much: it never waits on bytes held back here).
    delivered: u32,
    /// The agent sent its `Eof`.
    eof: bool,
}

#[derive(Default)]
struct State {
    next_id: u32,
    streams: HashMap<u32, StreamSlot>,
    pending: HashMap<u32, oneshot::Sender<Result<u16, String>>>,
    /// Started programs by stream id: where their `Exited` goes, and their stderr stream.
    exits: HashMap<u32, (oneshot::Sender<ProgramExit>, u32)>,
    stopped: bool,
}

/// How a program started with [`Mux::spawn`] ended: its exit code (128+N after signal N)
/// and N (0 when no signal killed it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProgramExit {
    pub status: u32,
    pub signal: u8,
}

/// A program the agent started: its output (and stdin) streams and its exit.
pub struct SpawnedProgram {
    /// Its stdin and stdout, or its terminal.
    pub stream: MuxStream,
    /// Its stderr (none on a terminal).
    pub stderr: Option<MuxStream>,
    /// Resolved by its `Exited`; dropped when the agent stops first.
    pub exit: oneshot::Receiver<ProgramExit>,
}

/// What [`Mux::spawn`] starts.
pub struct SpawnRequest {
    pub argv: Vec<Vec<u8>>,
    pub env: Vec<Vec<u8>>,
    /// On a new terminal of `(rows, cols)` (0 × 0: the kernel's default).
    pub tty: Option<(u16, u16)>,
}

impl SpawnRequest {
    /// Whether the request fits one `Spawn` frame (a longer command line goes through the
    /// exec API instead).
    pub fn fits(&self) -> bool {
        let strings: usize = self.argv.iter().chain(&self.env).map(|s| 2 + s.len()).sum();
        !self.argv.is_empty()
            && self.argv.len() <= usize::from(u16::MAX)
            && self.env.len() <= usize::from(u16::MAX)
            && 13 + strings <= proto::MAX_PAYLOAD
            && !self.argv.iter().chain(&self.env).any(|s| s.contains(&0))
    }
}

/// Frames waiting for the writer.
#[derive(Default)]
struct Outbox {
    frames: Mutex<VecDeque<Vec<u8>>>,
    bytes: AtomicUsize,
    /// Woken when frames are queued (the writer) and when they are written (data senders).
    queued: Notify,
    written: Notify,
}

pub struct Mux {
    /// What the agent does for us, for the log: "forwarding" or "sessions".
    role: &'static str,
    state: Mutex<State>,
    outbox: Outbox,
    /// Cancelled when the forward-server has ended, for whatever reason.
    stopped: CancellationToken,
}

/// One forwarded connection. When it (or both halves of it) is dropped the stream is
/// released and the agent told.
pub struct MuxStream {
    guard: Arc<StreamGuard>,
    inbox: Arc<Inbox>,
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
    inbox: Arc<Inbox>,
}

struct StreamGuard {
    id: u32,
    mux: Arc<Mux>,
}

impl Mux {
    /// Runs the protocol over a started `forward-server` exec (or a `session-server`'s
    /// stream; `role` names which in the log). `cancel` ends it (closing the agent's stdin,
    /// which makes it exit and remove its sockets).
    pub fn start<W>(
        role: &'static str,
        output: Box<dyn OutputSource>,
        input: W,
        cancel: CancellationToken,
    ) -> (Arc<Mux>, mpsc::Receiver<Incoming>)
    where
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mux = Arc::new(Mux {
            role,
            state: Mutex::new(State {
                next_id: 1,
                ..State::default()
            }),
            outbox: Outbox::default(),
            stopped: CancellationToken::new(),
        });
        let (incoming_tx, incoming_rx) = mpsc::channel(MAX_PENDING_ACCEPTS);
        tokio::spawn(write_frames(Arc::clone(&mux), input, cancel));
        tokio::spawn(read_frames(Arc::clone(&mux), output, incoming_tx));
        (mux, incoming_rx)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing forwarding, so keep going with the data.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn frames(&self) -> MutexGuard<'_, VecDeque<Vec<u8>>> {
        self.outbox.frames.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enqueue(&self, frame: &Frame) -> usize {
        let mut buf = Vec::new();
        frame.encode(&mut buf);
        let n = buf.len();
        self.frames().push_back(buf);
        let queued = self.outbox.bytes.fetch_add(n, Ordering::AcqRel) + n;
        self.outbox.queued.notify_one();
        queued
    }

    /// Queues a control frame (never waits). An agent that lets twice the queue's bound
    /// pile up has stopped reading its input: it is cut off.
    fn send(&self, frame: &Frame) {
        if self.is_stopped() {
            return;
        }
        if self.enqueue(frame) > 2 * MAX_MUX_QUEUE_BYTES {
            tracing::warn!(
                code = "FORWARD_AGENT_STALLED",
                role = self.role,
                queued = self.outbox.bytes.load(Ordering::Acquire),
                "the agent in the container does not read its input: cut off"
            );
            self.stop("the agent does not read its input");
        }
    }

    /// Queues a data frame once the queue has room.
    async fn send_data(&self, frame: &Frame) -> Result<(), ForwardError> {
        loop {
            let written = self.outbox.written.notified();
            tokio::pin!(written);
            written.as_mut().enable();
            if self.is_stopped() {
                return Err(ForwardError::Stopped);
            }
            if self.outbox.bytes.load(Ordering::Acquire) < MAX_MUX_QUEUE_BYTES {
                self.enqueue(frame);
                return Ok(());
            }
            tokio::select! {
                () = written => {}
                () = self.stopped.cancelled() => return Err(ForwardError::Stopped),
            }
        }
    }

    pub fn is_stopped(&self) -> bool {
        self.stopped.is_cancelled()
    }

    /// A new stream or listener id with its reply slot; `register_stream` also creates the
    /// stream's buffer before the request leaves, so nothing the agent sends can miss it.
    fn begin(self: &Arc<Self>, register_stream: bool) -> Result<Begun, ForwardError> {
        self.begin_with(register_stream, INITIAL_CREDIT)
    }

    /// [`Self::begin`] with the stream's credit.
    fn begin_with(
        self: &Arc<Self>,
        register_stream: bool,
        limit: u32,
    ) -> Result<Begun, ForwardError> {
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
        let stream = register_stream.then(|| new_stream_with(&mut st, Arc::clone(self), id, limit));
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

    /// Sends a listen request; returns the listener id and the agent's answer (the bound
    /// port, or the X11 display).
    async fn listen(
        self: &Arc<Self>,
        make: impl FnOnce(u32) -> Frame,
    ) -> Result<(u32, u16), ForwardError> {
        let (id, rx, _) = self.begin(false)?;
        self.send(&make(id));
        Ok((id, self.reply(id, rx).await?))
    }

    /// Listens on `host:port` inside the container; returns the listener id and bound port.
    pub async fn listen_tcp(
        self: &Arc<Self>,
        host: &str,
        port: u16,
    ) -> Result<(u32, u16), ForwardError> {
        let host = host.to_string();
        self.listen(|id| Frame::ListenTcp { id, port, host }).await
    }

    /// Listens on a unix socket inside the container; `private_dir`: the agent creates the
    /// socket's directory (mode 0700) and removes it afterwards.
    pub async fn listen_unix(
        self: &Arc<Self>,
        path: &str,
        private_dir: bool,
    ) -> Result<u32, ForwardError> {
        let path = path.as_bytes().to_vec();
        let (id, _) = self
            .listen(|id| Frame::ListenUnix {
                id,
                private_dir,
                path,
            })
            .await?;
        Ok(id)
    }

    /// An X11 display inside the container: the agent listens on the first free
    /// `127.0.0.1:6000+N` for N in `first..first+count`; returns the listener id and N.
    pub async fn listen_x11(
        self: &Arc<Self>,
        first: u16,
        count: u16,
    ) -> Result<(u32, u16), ForwardError> {
        self.listen(|id| Frame::ListenX11 { id, first, count })
            .await
    }

    /// Starts a program (`session-server` only): its streams are live once this returns.
    pub async fn spawn(
        self: &Arc<Self>,
        request: SpawnRequest,
    ) -> Result<SpawnedProgram, ForwardError> {
        if !request.fits() {
            return Err(ForwardError::Refused(
                "the command line does not fit one frame".into(),
            ));
        }
        let (id, rx, stream) = self.begin_with(true, PROGRAM_CREDIT)?;
        let stream = stream.ok_or(ForwardError::Stopped)?;
        let (stderr, exit) = {
            let mut st = self.state();
            let stderr = if request.tty.is_none() {
                let err_id = st.next_id;
                if err_id >= AGENT_ID_BASE {
                    return Err(ForwardError::Refused("out of stream ids".into()));
                }
                st.next_id += 1;
                Some(new_stream_with(
                    &mut st,
                    Arc::clone(self),
                    err_id,
                    PROGRAM_CREDIT,
                ))
            } else {
                None
            };
            let (tx, exit) = oneshot::channel();
            st.exits
                .insert(id, (tx, stderr.as_ref().map_or(0, MuxStream::id)));
            (stderr, exit)
        };
        let (rows, cols) = request.tty.unwrap_or((0, 0));
        self.send(&Frame::Spawn {
            id,
            tty: request.tty.is_some(),
            stderr_id: stderr.as_ref().map_or(0, MuxStream::id),
            rows,
            cols,
            argv: request.argv,
            env: request.env,
        });
        if let Err(e) = self.reply(id, rx).await {
            self.state().exits.remove(&id);
            return Err(e);
        }
        Ok(SpawnedProgram {
            stream,
            stderr,
            exit,
        })
    }

    /// Resizes a spawned program's terminal.
    pub fn resize(&self, id: u32, rows: u16, cols: u16) {
        self.send(&Frame::Resize { id, rows, cols });
    }

    /// Sends signal number `signal` to a spawned program.
    pub fn signal(&self, id: u32, signal: u8) {
        self.send(&Frame::Signal { id, signal });
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
            slot.inbox.close();
        }
        for (_, tx) in st.pending.drain() {
            let _ = tx.send(Err(why.to_string()));
        }
        st.exits.clear();
        drop(st);
        self.frames().clear();
        self.stopped.cancel();
    }

    /// Handles one frame from the agent: an accepted connection to hand on, or `Err` for a
    /// protocol violation.
    fn dispatch(self: &Arc<Self>, frame: Frame) -> Result<Option<Incoming>, String> {
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
                if st.streams.len() >= MAX_STREAMS {
                    return Err(format!("more than {MAX_STREAMS} streams at once"));
                }
                let stream = new_stream(&mut st, Arc::clone(self), id);
                return Ok(Some(Incoming {
                    listener,
                    peer,
                    peer_port,
                    stream,
                }));
            }
            Frame::Data { id, data } => return data_arrived(&mut st, id, &data).map(|()| None),
            Frame::Eof { id } => {
                if let Some(slot) = st.streams.get_mut(&id) {
                    if std::mem::replace(&mut slot.eof, true) {
                        return Err(format!("stream {id}: a second Eof"));
                    }
                    slot.inbox.lock().eof = true;
                    slot.inbox.ready.notify_one();
                }
            }
            Frame::Close { id } => {
                if let Some(slot) = st.streams.remove(&id) {
                    slot.credit.close();
                    slot.inbox.close();
                }
                // A program's stream closed by the agent: no exit will come.
                st.exits.remove(&id);
            }
            Frame::Exited { id, status, signal } => {
                let Some((tx, stderr_id)) = st.exits.remove(&id) else {
                    return Ok(None);
                };
                // Both streams end here, without Close; what they hold is still read.
                for sid in [id, stderr_id] {
                    if let Some(slot) = st.streams.remove(&sid) {
                        slot.credit.close();
                        slot.inbox.close();
                    }
                }
                let _ = tx.send(ProgramExit { status, signal });
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
        Ok(None)
    }
}

/// A `Data` payload for stream `id`, into its inbox within its credit.
fn data_arrived(st: &mut State, id: u32, data: &[u8]) -> Result<(), String> {
    if let Some(slot) = st.streams.get_mut(&id) {
        if slot.eof {
            return Err(format!("stream {id}: data after its Eof"));
        }
        slot.unacked = slot.unacked.saturating_add(data.len() as u32);
        if slot.unacked > slot.limit {
            return Err(format!("stream {id}: data beyond the credit"));
        }
        slot.inbox.lock().data.extend_from_slice(data);
        slot.inbox.ready.notify_one();
    }
    Ok(())
}

fn new_stream(st: &mut State, mux: Arc<Mux>, id: u32) -> MuxStream {
    new_stream_with(st, mux, id, INITIAL_CREDIT)
}

fn new_stream_with(st: &mut State, mux: Arc<Mux>, id: u32, limit: u32) -> MuxStream {
    let inbox = Arc::new(Inbox::default());
    let credit = Arc::new(Semaphore::new(INITIAL_CREDIT as usize));
    st.streams.insert(
        id,
        StreamSlot {
            limit,
            inbox: Arc::clone(&inbox),
            credit: Arc::clone(&credit),
            unacked: 0,
            delivered: 0,
            eof: false,
        },
    );
    MuxStream {
        guard: Arc::new(StreamGuard { id, mux }),
        inbox,
        credit,
    }
}

async fn write_frames<W: AsyncWrite + Unpin>(
    mux: Arc<Mux>,
    mut input: W,
    cancel: CancellationToken,
) {
    loop {
        let queued = mux.outbox.queued.notified();
        tokio::pin!(queued);
        queued.as_mut().enable();
        let frame = mux.frames().pop_front();
        let Some(frame) = frame else {
            tokio::select! {
                () = queued => continue,
                () = cancel.cancelled() => break,
                () = mux.stopped.cancelled() => break,
            }
        };
        let written = tokio::select! {
            r = input.write_all(&frame) => r.is_ok(),
            () = cancel.cancelled() => false,
            () = mux.stopped.cancelled() => false,
        };
        mux.outbox.bytes.fetch_sub(frame.len(), Ordering::AcqRel);
        mux.outbox.written.notify_waiters();
        if !written {
            break;
        }
    }
    // EOF on the agent's stdin: it closes everything and exits.
    let _ = input.shutdown().await;
    mux.stop("the forwarding agent's input closed");
}

async fn read_frames(
    mux: Arc<Mux>,
    mut output: Box<dyn OutputSource>,
    incoming: mpsc::Sender<Incoming>,
) {
    let mut buf = BytesMut::new();
    let why = loop {
        let chunk = tokio::select! {
            r = output.next() => r,
            () = mux.stopped.cancelled() => break "stopped".to_string(),
        };
        let chunk = match chunk {
            Ok(Some((OutputKind::Stdout, data))) => data,
            Ok(Some((OutputKind::Stderr, data))) => {
                let text =
                    String::from_utf8_lossy(data.get(..MAX_AGENT_LOG_BYTES).unwrap_or(&data));
                tracing::info!(code = "FORWARD_AGENT_LOG", role = mux.role, message = %text.trim_end(), "the agent in the container says");
                continue;
            }
            Ok(None) => break "the forwarding agent exited".to_string(),
            Err(e) => break format!("reading from the forwarding agent failed: {e}"),
        };
        buf.extend_from_slice(&chunk);
        let mut violation = None;
        loop {
            // Data, the bulk, goes from `buf` into its stream's inbox without a decoded
            // frame in between; the rest is decoded.
            if let Some((id, len)) = proto::data_frame(&buf) {
                let payload = buf.get(proto::HEADER_LEN..len).unwrap_or_default();
                if let Err(e) = data_arrived(&mut mux.state(), id, payload) {
                    violation = Some(e);
                    break;
                }
                let _ = buf.split_to(len);
                continue;
            }
            match proto::decode(&buf) {
                Ok(Some((frame, used))) => {
                    let _ = buf.split_to(used);
                    match mux.dispatch(frame) {
                        Ok(None) => {}
                        // Waits for room: an agent announcing connections faster than the
                        // SSH side opens channels for them is held back here. Nobody
                        // listening any more: the stream's drop closes it.
                        Ok(Some(accepted)) => {
                            let _ = incoming.send(accepted).await;
                        }
                        Err(e) => {
                            violation = Some(e);
                            break;
                        }
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
            tracing::warn!(code = "FORWARD_AGENT_PROTOCOL_ERROR", role = mux.role, error = %v, "cut off the agent in the container: it broke the agent protocol or its limits (an image's own ContainerSSH agent? inject ours with agent.binary)");
            break v;
        }
    };
    tracing::debug!(role = mux.role, reason = %why, "agent stream ended");
    mux.stop(&why);
}

/// Keeps a stream from being closed while it is held, whatever happens to its halves.
pub struct StreamHold(#[allow(dead_code)] Arc<StreamGuard>);

impl MuxStream {
    pub fn id(&self) -> u32 {
        self.guard.id
    }

    /// A hold on the stream: it is not closed (no `Close` goes out) until the hold is
    /// dropped too. A spawned program's control holds its stream until `Exited`, since
    /// `Close` would tell the agent that nobody waits for the exit.
    pub fn hold(&self) -> StreamHold {
        StreamHold(Arc::clone(&self.guard))
    }

    pub fn split(self) -> (MuxSink, MuxSource) {
        (
            MuxSink {
                guard: Arc::clone(&self.guard),
                credit: self.credit,
            },
            MuxSource {
                guard: self.guard,
                inbox: self.inbox,
            },
        )
    }
}

impl MuxSink {
    /// Sends data to the container side, waiting for credit and for room in the queue;
    /// `Err` when the stream is gone.
    pub async fn send(&self, data: &[u8]) -> Result<(), ForwardError> {
        let StreamGuard { id, mux } = &*self.guard;
        for chunk in data.chunks(MAX_DATA) {
            let permits = self
                .credit
                .acquire_many(chunk.len() as u32)
                .await
                .map_err(|_| ForwardError::Stopped)?;
            permits.forget();
            mux.send_data(&Frame::Data {
                id: *id,
                data: chunk.to_vec(),
            })
            .await?;
        }
        Ok(())
    }

    /// No more data from our side.
    pub fn eof(&self) {
        self.guard.mux.send(&Frame::Eof { id: self.guard.id });
    }
}

impl MuxSource {
    /// Everything the agent sent since the last call, then its `Eof` once; `None` when the
    /// agent closed the stream (or stopped).
    pub async fn recv(&mut self) -> Option<StreamEvent> {
        loop {
            let ready = self.inbox.ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            {
                let mut st = self.inbox.lock();
                if !st.data.is_empty() {
                    return Some(StreamEvent::Data(st.data.split().freeze()));
                }
                if std::mem::take(&mut st.eof) {
                    return Some(StreamEvent::Eof);
                }
                if st.closed {
                    return None;
                }
            }
            ready.await;
        }
    }

    /// Returns credit for `n` bytes received and delivered: with the next `Ack`, once a
    /// quarter of the stream's credit was delivered (one frame per 32 KiB would be most of
    /// what crosses back to the agent).
    pub fn ack(&self, n: usize) {
        let StreamGuard { id, mux } = &*self.guard;
        let mut st = mux.state();
        let Some(slot) = st.streams.get_mut(id) else {
            return;
        };
        slot.delivered = slot.delivered.saturating_add(n as u32).min(slot.unacked);
        if slot.delivered < (slot.limit / 4).max(1) {
            return;
        }
        let bytes = std::mem::take(&mut slot.delivered);
        slot.unacked -= bytes;
        drop(st);
        mux.send(&Frame::Ack { id: *id, bytes });
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut st = self.mux.state();
        // Nobody waits for a dropped program's exit any more.
        st.exits.remove(&self.id);
        let released = st.streams.remove(&self.id).is_some();
        drop(st);
        if released {
            self.mux.send(&Frame::Close { id: self.id });
        }
    }
}

#[cfg(test)]
mod tests;
