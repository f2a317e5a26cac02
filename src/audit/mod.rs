//! Audit recordings (`audit`, ContainerSSH's block): one asciicast v2 file per session
//! channel, `<connection id>-<channel>.cast` in `audit.file.directory`, that `asciinema play`
//! replays. The header has the terminal's real size, `TERM` and `SHELL` only (never the
//! client's other variables); `o` events carry stdout and stderr (`intercept.stdout`,
//! `intercept.stderr`; a marker `stderr` / `stdout` says when the stream switches), `i` events
//! stdin (`intercept.stdin`), `r` every window change, and a marker `exit status N` or
//! `signal NAME` the end. Times count from the program's start. A UTF-8 character split across
//! chunks is joined, not replaced.
//!
//! A recording never slows or stops its session: events are queued (at most
//! [`MAX_QUEUED_BYTES`] per recording; past it the bytes are dropped, counted, and a marker in
//! the file says how many), and a write that fails is logged and counted once and ends that
//! recording only. The directory is opened before the sandbox; the seccomp filter lets files
//! be created in it and nowhere else.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::backend::ExitReport;
use crate::config::model::{AuditFormat, AuditIntercept};
use crate::config::validate::Audit;
use crate::dirfd::{Create, WritableDir};

pub mod binary;
mod binary_writer;
mod cast;
pub mod cbor;
pub mod decode;
pub mod s3;

pub use binary::Msg;

/// Bytes of events a recording may have queued for its writer.
pub const MAX_QUEUED_BYTES: usize = 4 * 1024 * 1024;
/// Events queued (each at most one channel packet).
const MAX_QUEUED_EVENTS: usize = 4096;

/// Why recordings cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{key}: cannot open {path}")]
    Directory {
        key: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("audit.s3.cacert: cannot read {path}")]
    CaFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("audit.s3.cacert: {0}")]
    Tls(#[source] crate::http::tls::TlsError),
}

/// The CA bundle an `https` endpoint is checked against when `audit.s3.cacert` is not set.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Makes recordings (shared by the connections).
pub struct Recorder {
    dir: Arc<WritableDir>,
    intercept: AuditIntercept,
    format: AuditFormat,
    /// `storage: s3`: the uploader of finished recordings.
    uploads: Option<Arc<s3::Uploads>>,
}

impl Recorder {
    /// Opens the directory, and for S3 reads the CA and lists what a previous run left
    /// staged (before the sandbox).
    pub fn open(audit: &Audit) -> Result<Self, AuditError> {
        let key = if audit.s3.is_some() {
            "audit.s3.local"
        } else {
            "audit.file.directory"
        };
        let failed = |source| AuditError::Directory {
            key,
            path: audit.directory.display().to_string(),
            source,
        };
        let dir = Arc::new(WritableDir::open(&audit.directory).map_err(failed)?);
        let uploads = match &audit.s3 {
            Some(c) => {
                let waiting = s3::staged(&audit.directory).map_err(failed)?;
                let target = s3_target(c)?;
                Some(Arc::new(s3::Uploads::new(
                    target,
                    Arc::clone(&dir),
                    waiting,
                )))
            }
            None => None,
        };
        Ok(Self {
            dir,
            intercept: audit.intercept.clone(),
            format: audit.format,
            uploads,
        })
    }

    /// Starts the uploads (`storage: s3`), in the runtime.
    pub fn run(&self) {
        if let Some(u) = &self.uploads {
            u.run();
        }
    }

    /// The directory's descriptor, for the sandbox (files are created in it afterwards).
    pub fn dir(&self) -> std::os::fd::BorrowedFd<'_> {
        self.dir.fd()
    }

    /// Creates a recording's file (and for S3 its metadata beside it); `None` (logged and
    /// counted) when it cannot be.
    fn create(&self, connection_id: &str, name: &str, meta: &s3::Meta) -> Option<tokio::fs::File> {
        let created = self.dir.create(name, Create::New, 0o600).and_then(|f| {
            if self.uploads.is_some() {
                use std::io::Write as _;
                let sidecar = format!("{name}{}", s3::METADATA_SUFFIX);
                let mut m = self.dir.create(&sidecar, Create::New, 0o600)?;
                m.write_all(&serde_json::to_vec(meta).unwrap_or_default())?;
            }
            Ok(f)
        });
        match created {
            Ok(f) => Some(tokio::fs::File::from_std(f)),
            Err(e) => {
                tracing::error!(code = "AUDIT_STORAGE_FAILED", connection_id, file = %name, error = %e, "cannot create the audit recording: the session is not recorded");
                crate::metrics::get().audit_failures.inc(&[]);
                None
            }
        }
    }

    fn done(&self, queue: &Arc<Queue>, name: String) -> Done {
        Done {
            queue: Arc::clone(queue),
            name,
            uploads: self.uploads.clone(),
        }
    }

    /// The connection's recording in the binary format (one file per connection, named by its
    /// id), beginning with the connect message; `None` for the asciinema format, whose files
    /// are per session channel.
    pub fn connect(&self, connection_id: &str, remote: std::net::SocketAddr) -> Option<Log> {
        if self.format != AuditFormat::Binary {
            return None;
        }
        let meta = s3::Meta {
            timestamp: unix_now(),
            ip: remote.ip().to_string(),
            username: None,
            authenticated: false,
        };
        let file = self.create(connection_id, connection_id, &meta)?;
        let (tx, rx) = mpsc::channel(MAX_QUEUED_EVENTS);
        let queue = Arc::new(Queue::default());
        tokio::spawn(binary_writer::write(
            file,
            connection_id.to_string(),
            rx,
            self.done(&queue, connection_id.to_string()),
        ));
        let log = Log {
            sink: Sink { tx, queue },
            intercept: self.intercept.clone(),
        };
        log.event(
            None,
            Msg::Connect {
                remote: remote.ip().to_string(),
            },
        );
        Some(log)
    }

    /// Starts the recording of one session channel's program: its own asciicast file, or
    /// its part of the connection's binary recording (`log`).
    pub fn start(
        &self,
        connection_id: &str,
        channel: u32,
        header: &Header,
        log: Option<&Log>,
    ) -> Option<Recording> {
        let sink = match log {
            Some(log) => log.sink.clone(),
            None => {
                let name = format!("{connection_id}-{channel}.cast");
                let meta = s3::Meta {
                    timestamp: unix_now(),
                    ip: header.remote.clone(),
                    username: header.user.clone(),
                    authenticated: header.user.is_some(),
                };
                let file = self.create(connection_id, &name, &meta)?;
                let (tx, rx) = mpsc::channel(MAX_QUEUED_EVENTS);
                let queue = Arc::new(Queue::default());
                tokio::spawn(cast::write(
                    file,
                    header.line(),
                    Instant::now(),
                    rx,
                    self.done(&queue, name),
                ));
                Sink { tx, queue }
            }
        };
        Some(Recording {
            sink,
            channel,
            binary: log.is_some(),
            intercept: self.intercept.clone(),
            last_output: std::sync::Mutex::new(Stream::Stdout),
        })
    }
}

/// What the header says (and the object's metadata when stored in S3).
pub struct Header {
    pub cols: u32,
    pub rows: u32,
    pub term: Option<String>,
    pub shell: Option<String>,
    pub command: String,
    /// The client's address and who logged in (S3 metadata only).
    pub remote: String,
    pub user: Option<String>,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The S3 target of `audit.s3`: its TLS settings read now.
fn s3_target(c: &crate::config::validate::AuditS3) -> Result<s3::Target, AuditError> {
    let tls = if c.https {
        let path = c.cacert.clone().unwrap_or_else(|| SYSTEM_CA_BUNDLE.into());
        let ca = std::fs::read(&path).map_err(|source| AuditError::CaFile {
            path: path.display().to_string(),
            source,
        })?;
        let config = crate::http::tls::client_config(crate::http::tls::ClientTls {
            ca: &ca,
            cert: None,
            key: None,
            versions: crate::http::tls::TLS12_AND_13,
            provider: None,
            alpn_http1: true,
        })
        .map_err(AuditError::Tls)?;
        Some(Arc::new(config))
    } else {
        None
    };
    Ok(s3::Target { s3: c.clone(), tls })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stream {
    Stdin,
    Stdout,
    Stderr,
}

/// One event for a writer.
struct Event {
    at: Instant,
    channel: Option<u32>,
    kind: Kind,
}

enum Kind {
    Data(Stream, Bytes),
    /// The asciicast's stream switch markers.
    Marker(String),
    /// Bytes the recording had to drop.
    Dropped(u64),
    Resize(u32, u32),
    Exit(ExitReport),
    /// The binary format's connection and channel messages.
    Msg(Msg),
}

impl Event {
    /// What the event counts for against [`MAX_QUEUED_BYTES`].
    fn size(&self) -> usize {
        match &self.kind {
            Kind::Data(_, d) => d.len(),
            Kind::Marker(l) => l.len(),
            Kind::Dropped(_) | Kind::Resize(..) | Kind::Exit(_) => 16,
            Kind::Msg(_) => 128,
        }
    }
}

#[derive(Default)]
struct Queue {
    bytes: AtomicUsize,
    dropped: AtomicU64,
}

impl Queue {
    /// `size` bytes are out of the queue (never below zero).
    fn written(&self, size: usize) {
        let _ = self
            .bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                Some(b.saturating_sub(size))
            });
    }
}

/// What a writer has to tell when it ends: the recording is complete (for S3: upload it).
struct Done {
    queue: Arc<Queue>,
    name: String,
    uploads: Option<Arc<s3::Uploads>>,
}

impl Drop for Done {
    fn drop(&mut self) {
        if let Some(u) = &self.uploads {
            u.ready(std::mem::take(&mut self.name));
        }
    }
}

impl Done {
    fn failed(&self, e: &std::io::Error) {
        tracing::error!(code = "AUDIT_STORAGE_FAILED", file = %self.name, error = %e, "writing the audit recording failed: the rest of it is lost");
        crate::metrics::get().audit_failures.inc(&[]);
    }
}

/// The sending side of one writer: events are queued, never waited for.
#[derive(Clone)]
struct Sink {
    tx: mpsc::Sender<Event>,
    queue: Arc<Queue>,
}

impl Sink {
    /// Queues an event unless the queue is full; the writer gives its size back once
    /// written ([`Queue::written`]). Every queued event is counted, markers too.
    fn enqueue(&self, event: Event) -> bool {
        let q = &self.queue;
        let size = event.size();
        if q.bytes.load(Ordering::Acquire).saturating_add(size) > MAX_QUEUED_BYTES {
            return false;
        }
        q.bytes.fetch_add(size, Ordering::AcqRel);
        if self.tx.try_send(event).is_err() {
            q.written(size);
            return false;
        }
        true
    }

    /// Queues an event; one that does not fit is dropped and counted, and the next one that
    /// fits is preceded by a note of how many bytes were lost.
    fn push(&self, channel: Option<u32>, kind: Kind) {
        let q = &self.queue;
        let at = Instant::now();
        let dropped = q.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let note = Event {
                at,
                channel,
                kind: Kind::Dropped(dropped),
            };
            if !self.enqueue(note) {
                q.dropped.fetch_add(dropped, Ordering::Relaxed);
            }
        }
        let event = Event { at, channel, kind };
        let size = event.size();
        if !self.enqueue(event) {
            q.dropped.fetch_add(size as u64, Ordering::Relaxed);
            crate::metrics::get().audit_dropped.add(&[], size as f64);
        }
    }
}

/// A connection's recording in the binary format.
pub struct Log {
    sink: Sink,
    intercept: AuditIntercept,
}

impl Log {
    /// Records a connection-level (`channel` none) or channel-level message.
    pub fn event(&self, channel: Option<u32>, msg: Msg) {
        if matches!(msg, Msg::AuthPassword { .. }) && !self.intercept.passwords {
            return;
        }
        self.sink.push(channel, Kind::Msg(msg));
    }
}

impl Log {
    /// Data of a forwarded connection's channel (`intercept.forwarding`): `to_client`, or
    /// from it.
    pub fn forwarded(&self, channel: u32, to_client: bool, data: &[u8]) {
        if self.intercept.forwarding {
            let stream = if to_client {
                Stream::Stdout
            } else {
                Stream::Stdin
            };
            self.sink.push(
                Some(channel),
                Kind::Data(stream, Bytes::copy_from_slice(data)),
            );
        }
    }
}

/// One channel's recording; events are queued, never waited for.
pub struct Recording {
    sink: Sink,
    channel: u32,
    /// Part of a binary recording (else its own asciicast file).
    binary: bool,
    intercept: AuditIntercept,
    last_output: std::sync::Mutex<Stream>,
}

impl Recording {
    fn push(&self, kind: Kind) {
        self.sink.push(Some(self.channel), kind);
    }

    /// Input from the client (`intercept.stdin`).
    pub fn stdin(&self, data: &[u8]) {
        if self.intercept.stdin {
            self.push(Kind::Data(Stream::Stdin, Bytes::copy_from_slice(data)));
        }
    }

    /// The program's output (`intercept.stdout`, `intercept.stderr`).
    pub fn output(&self, stderr: bool, data: &Bytes) {
        let (stream, wanted) = if stderr {
            (Stream::Stderr, self.intercept.stderr)
        } else {
            (Stream::Stdout, self.intercept.stdout)
        };
        if !wanted {
            return;
        }
        if !self.binary {
            let mut last = self
                .last_output
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *last != stream {
                *last = stream;
                let label = if stderr { "stderr" } else { "stdout" };
                self.push(Kind::Marker(label.into()));
            }
        }
        self.push(Kind::Data(stream, data.clone()));
    }

    /// A window change.
    pub fn resize(&self, cols: u32, rows: u32) {
        self.push(Kind::Resize(cols, rows));
    }

    /// How the program ended (the last event).
    pub fn exit(&self, how: &ExitReport) {
        self.push(Kind::Exit(how.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Past the queue's limit bytes are dropped, then a marker says how many; the accounting
    /// of queued bytes (markers included) comes back to zero.
    #[tokio::test(flavor = "current_thread")]
    async fn a_recording_that_falls_behind_drops_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let recorder = Recorder::open(&Audit {
            format: AuditFormat::Asciinema,
            s3: None,
            directory: dir.path().to_owned(),
            intercept: AuditIntercept {
                stdout: true,
                ..AuditIntercept::default()
            },
        })
        .unwrap();
        let header = Header {
            cols: 0,
            rows: 0,
            term: None,
            shell: None,
            command: "x".into(),
            remote: String::new(),
            user: None,
        };
        let rec = recorder.start("c0ffee", 7, &header, None).unwrap();
        let chunk = Bytes::from(vec![b'a'; 64 * 1024]);
        // The writer cannot run before we yield: everything past the limit is dropped.
        for _ in 0..(MAX_QUEUED_BYTES / chunk.len() + 10) {
            rec.output(false, &chunk);
        }
        assert!(rec.sink.queue.dropped.load(Ordering::Relaxed) >= 10 * chunk.len() as u64);
        tokio::task::yield_now().await;
        let queue = Arc::clone(&rec.sink.queue);
        // Draining: the next output carries the marker first.
        drained(&queue).await;
        rec.output(false, &Bytes::from_static(b"after"));
        rec.exit(&ExitReport::Status(0));
        drop(rec);
        drained(&queue).await;
        let path = dir.path().join("c0ffee-7.cast");
        let text = poll_text(&path, "exit status 0").await;
        assert!(
            text.contains("bytes not recorded (the recording fell behind)"),
            "marker"
        );
        assert!(text.contains(r#""o","after"]"#));
        assert_eq!(queue.bytes.load(Ordering::Acquire), 0);
    }

    /// A binary recording holds the connection's messages in order, with ContainerSSH's type
    /// numbers and keys, ends with the disconnect when the connection and its channels are
    /// gone, and never holds a password's text.
    #[tokio::test(flavor = "current_thread")]
    async fn a_binary_recording_decodes_in_order_without_the_password() {
        let dir = tempfile::tempdir().unwrap();
        let recorder = Recorder::open(&Audit {
            format: AuditFormat::Binary,
            s3: None,
            directory: dir.path().to_owned(),
            intercept: AuditIntercept {
                stdin: true,
                stdout: true,
                stderr: true,
                passwords: true,
                ..AuditIntercept::default()
            },
        })
        .unwrap();
        let log = recorder
            .connect("ab12", "192.0.2.7:5555".parse().unwrap())
            .unwrap();
        log.event(
            None,
            Msg::AuthPassword {
                user: "alice".into(),
                ok: Some(true),
            },
        );
        log.event(Some(0), Msg::Shell);
        // Not recorded (intercept.forwarding is off): the io below are the session's three.
        log.forwarded(5, true, b"tunnelled");
        let header = Header {
            cols: 0,
            rows: 0,
            term: None,
            shell: None,
            command: "sh".into(),
            remote: String::new(),
            user: None,
        };
        let rec = recorder.start("ab12", 0, &header, Some(&log)).unwrap();
        rec.stdin(b"ls\n");
        rec.output(false, &Bytes::from_static(b"out"));
        rec.output(true, &Bytes::from_static(b"err"));
        rec.resize(100, 30);
        rec.exit(&ExitReport::Signal {
            name: "TERM".into(),
        });
        let queue = Arc::clone(&rec.sink.queue);
        drop(rec);
        drop(log);
        drained(&queue).await;
        let path = dir.path().join("ab12");
        let mut types = Vec::new();
        for _ in 0..10_000 {
            if let Ok(mut m) = decode::open(&path) {
                types.clear();
                let mut all = Vec::new();
                while let Ok(Some(msg)) = m.next_message() {
                    types.push(msg["type"].as_u64().unwrap());
                    all.push(msg);
                }
                if types.last() == Some(&1) && !m.truncated {
                    assert_eq!(all[0]["payload"]["remoteAddr"], "192.0.2.7");
                    assert_eq!(all[0]["connectionId"], "ab12");
                    assert_eq!(all[0]["channelId"], serde_json::Value::Null);
                    assert_eq!(all[1]["payload"]["password"], "", "no password text");
                    assert_eq!(all[3]["payload"]["data"], "bHMK"); // "ls\n"
                    assert_eq!(all[3]["channelId"], 0);
                    assert_eq!(all[5]["payload"]["stream"], 2);
                    assert_eq!(all[7]["payload"]["signal"], "TERM");
                    let ts: Vec<u64> = all
                        .iter()
                        .map(|m| m["timestamp"].as_u64().unwrap())
                        .collect();
                    assert!(ts.windows(2).all(|w| w[0] <= w[1]), "{ts:?}");
                    break;
                }
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        assert_eq!(types, [0, 101, 405, 500, 500, 500, 408, 498, 1]);

        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..21], b"ContainerSSH-Auditlog");
        assert_eq!(bytes[32..40], 2u64.to_le_bytes());
    }

    /// Lets the writer run until nothing is queued (bounded: a count that never comes back
    /// to zero fails the test).
    async fn drained(queue: &Queue) {
        for _ in 0..100_000 {
            if queue.bytes.load(Ordering::Acquire) == 0 {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!(
            "queued bytes never drained: {}",
            queue.bytes.load(Ordering::Acquire)
        );
    }

    async fn poll_text(path: &std::path::Path, needle: &str) -> String {
        for _ in 0..10_000 {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            if text.contains(needle) {
                return text;
            }
            tokio::task::yield_now().await;
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        panic!("{needle} never written to {}", path.display());
    }
}
