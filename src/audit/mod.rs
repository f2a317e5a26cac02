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
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::config::model::AuditIntercept;
use crate::config::validate::Audit;
use crate::dirfd::{Create, WritableDir};

/// Bytes of events a recording may have queued for its writer.
pub const MAX_QUEUED_BYTES: usize = 4 * 1024 * 1024;
/// Events queued (each at most one channel packet).
const MAX_QUEUED_EVENTS: usize = 4096;

/// Why recordings cannot be made.
#[derive(Debug, thiserror::Error)]
#[error("audit.file.directory: cannot open {path}")]
pub struct AuditError {
    path: String,
    #[source]
    source: std::io::Error,
}

/// Makes recordings (shared by the connections).
pub struct Recorder {
    dir: WritableDir,
    intercept: AuditIntercept,
}

impl Recorder {
    /// Opens the directory (before the sandbox).
    pub fn open(audit: &Audit) -> Result<Self, AuditError> {
        let failed = |source| AuditError {
            path: audit.directory.display().to_string(),
            source,
        };
        let dir = WritableDir::open(&audit.directory).map_err(failed)?;
        Ok(Self {
            dir,
            intercept: audit.intercept.clone(),
        })
    }

    /// The directory's descriptor, for the sandbox (files are created in it afterwards).
    pub fn dir(&self) -> std::os::fd::BorrowedFd<'_> {
        self.dir.fd()
    }

    /// Starts the recording of one session channel's program.
    pub fn start(&self, connection_id: &str, channel: u32, header: &Header) -> Option<Recording> {
        let name = format!("{connection_id}-{channel}.cast");
        let file = self.dir.create(&name, Create::New, 0o600);
        let file = match file {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(code = "AUDIT_STORAGE_FAILED", connection_id, file = %name, error = %e, "cannot create the audit recording: the session is not recorded");
                crate::metrics::get().audit_failures.inc(&[]);
                return None;
            }
        };
        let (tx, rx) = mpsc::channel(MAX_QUEUED_EVENTS);
        let shared = Arc::new(Queue::default());
        tokio::spawn(write(
            tokio::fs::File::from_std(file),
            header.line(),
            rx,
            Arc::clone(&shared),
            name,
        ));
        Some(Recording {
            tx,
            queue: shared,
            started: Instant::now(),
            intercept: self.intercept.clone(),
            last_output: std::sync::Mutex::new(Stream::Stdout),
        })
    }
}

/// What the header says.
pub struct Header {
    pub cols: u32,
    pub rows: u32,
    pub term: Option<String>,
    pub shell: Option<String>,
    pub command: String,
}

impl Header {
    fn line(&self) -> String {
        let mut env = serde_json::Map::new();
        if let Some(t) = &self.term {
            env.insert("TERM".into(), t.clone().into());
        }
        if let Some(s) = &self.shell {
            env.insert("SHELL".into(), s.clone().into());
        }
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut line = serde_json::json!({
            "version": 2,
            "width": if self.cols > 0 { self.cols } else { 80 },
            "height": if self.rows > 0 { self.rows } else { 24 },
            "timestamp": timestamp,
            "command": self.command,
            "env": env,
        })
        .to_string();
        line.push('\n');
        line
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stream {
    Stdin,
    Stdout,
    Stderr,
}

enum Event {
    Data(f64, Stream, Bytes),
    Marker(f64, String),
    Resize(f64, u32, u32),
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

/// One channel's recording; events are queued, never waited for.
pub struct Recording {
    tx: mpsc::Sender<Event>,
    queue: Arc<Queue>,
    started: Instant,
    intercept: AuditIntercept,
    last_output: std::sync::Mutex<Stream>,
}

impl Recording {
    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Queues an event of `size` bytes, unless the queue is full; the writer gives the bytes
    /// back once written ([`Queue::written`]). Every queued event is counted, markers too.
    fn enqueue(&self, event: Event, size: usize) -> bool {
        let q = &self.queue;
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

    fn push(&self, event: Event, size: usize) {
        let q = &self.queue;
        let dropped = q.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let note = format!("audit: {dropped} bytes not recorded (the recording fell behind)");
            let len = note.len();
            if !self.enqueue(Event::Marker(self.now(), note), len) {
                q.dropped.fetch_add(dropped, Ordering::Relaxed);
            }
        }
        if !self.enqueue(event, size) {
            q.dropped.fetch_add(size as u64, Ordering::Relaxed);
            crate::metrics::get().audit_dropped.add(&[], size as f64);
        }
    }

    /// Input from the client (`intercept.stdin`).
    pub fn stdin(&self, data: &[u8]) {
        if self.intercept.stdin {
            self.push(
                Event::Data(self.now(), Stream::Stdin, Bytes::copy_from_slice(data)),
                data.len(),
            );
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
        let t = self.now();
        {
            let mut last = self
                .last_output
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if *last != stream {
                *last = stream;
                let label = if stderr { "stderr" } else { "stdout" };
                self.push(Event::Marker(t, label.into()), label.len());
            }
        }
        self.push(Event::Data(t, stream, data.clone()), data.len());
    }

    /// A window change.
    pub fn resize(&self, cols: u32, rows: u32) {
        self.push(Event::Resize(self.now(), cols, rows), 16);
    }

    /// How the program ended (the last event).
    pub fn exit(&self, how: &str) {
        self.push(Event::Marker(self.now(), how.to_string()), how.len());
    }
}

/// Turns bytes into text without splitting a character: a sequence cut at the end of a chunk
/// waits for the next chunk; invalid bytes become U+FFFD.
#[derive(Default)]
struct Utf8Joiner {
    carry: Vec<u8>,
}

impl Utf8Joiner {
    fn text(&mut self, data: &[u8]) -> String {
        let mut bytes = std::mem::take(&mut self.carry);
        bytes.extend_from_slice(data);
        let keep = incomplete_tail(&bytes);
        let split = bytes.len() - keep;
        self.carry = bytes.split_off(split);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// How many bytes at the end start a UTF-8 sequence that is not complete yet (0 to 3).
fn incomplete_tail(b: &[u8]) -> usize {
    for back in 1..=3.min(b.len()) {
        let Some(&byte) = b.get(b.len() - back) else {
            return 0;
        };
        if byte & 0xC0 == 0x80 {
            continue;
        }
        let need = match byte {
            0xC0..=0xDF => 2,
            0xE0..=0xEF => 3,
            0xF0..=0xF7 => 4,
            _ => return 0,
        };
        return if need > back { back } else { 0 };
    }
    0
}

async fn write(
    file: tokio::fs::File,
    header: String,
    mut rx: mpsc::Receiver<Event>,
    queue: Arc<Queue>,
    name: String,
) {
    let mut joiners = [
        Utf8Joiner::default(),
        Utf8Joiner::default(),
        Utf8Joiner::default(),
    ];
    let failed = |e: std::io::Error| {
        tracing::error!(code = "AUDIT_STORAGE_FAILED", file = %name, error = %e, "writing the audit recording failed: the rest of this session is not recorded");
        crate::metrics::get().audit_failures.inc(&[]);
    };
    // Lines are batched: one file write per 256 KiB rather than per event.
    let mut file = tokio::io::BufWriter::with_capacity(256 * 1024, file);
    if let Err(e) = file.write_all(header.as_bytes()).await {
        failed(e);
        return;
    }
    // One line, encoded straight from the event (no JSON value in between), reused.
    let mut line: Vec<u8> = Vec::with_capacity(64 * 1024);
    while let Some(event) = rx.recv().await {
        line.clear();
        let encoded = match &event {
            Event::Data(t, stream, data) => {
                let (code, i) = match stream {
                    Stream::Stdin => ("i", 0),
                    Stream::Stdout => ("o", 1),
                    Stream::Stderr => ("o", 2),
                };
                let text = joiners.get_mut(i).map(|j| j.text(data)).unwrap_or_default();
                if text.is_empty() {
                    Ok(())
                } else {
                    serde_json::to_writer(&mut line, &(t, code, text.as_str()))
                }
            }
            Event::Marker(t, label) => serde_json::to_writer(&mut line, &(t, "m", label)),
            Event::Resize(t, cols, rows) => {
                serde_json::to_writer(&mut line, &(t, "r", format!("{cols}x{rows}")))
            }
        };
        let size = match &event {
            Event::Data(_, _, data) => data.len(),
            Event::Marker(_, label) => label.len(),
            Event::Resize(..) => 16,
        };
        if encoded.is_ok() && !line.is_empty() {
            line.push(b'\n');
        } else {
            line.clear();
        }
        queue.written(size);
        let mut written = file.write_all(&line).await;
        // Nothing more waiting: out to the file, so an idle session's recording is current.
        if written.is_ok() && rx.is_empty() {
            written = file.flush().await;
        }
        if let Err(e) = written {
            failed(e);
            return;
        }
    }
    if let Err(e) = file.flush().await {
        failed(e);
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
        };
        let rec = recorder.start("c0ffee", 7, &header).unwrap();
        let chunk = Bytes::from(vec![b'a'; 64 * 1024]);
        // The writer cannot run before we yield: everything past the limit is dropped.
        for _ in 0..(MAX_QUEUED_BYTES / chunk.len() + 10) {
            rec.output(false, &chunk);
        }
        assert!(rec.queue.dropped.load(Ordering::Relaxed) >= 10 * chunk.len() as u64);
        tokio::task::yield_now().await;
        let queue = Arc::clone(&rec.queue);
        // Draining: the next output carries the marker first.
        drained(&queue).await;
        rec.output(false, &Bytes::from_static(b"after"));
        rec.exit("exit status 0");
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

    #[test]
    fn a_character_split_across_chunks_is_joined() {
        let mut j = Utf8Joiner::default();
        let snow = "☃".as_bytes(); // 3 bytes
        assert_eq!(j.text(&[b'a', snow[0]]), "a");
        assert_eq!(j.text(&snow[1..2]), "");
        assert_eq!(j.text(&[snow[2], b'b']), "☃b");
        assert_eq!(
            j.text(&[0xff, b'c']),
            "\u{fffd}c",
            "invalid bytes are replaced"
        );
        assert_eq!(incomplete_tail("é".as_bytes()), 0);
        assert_eq!(incomplete_tail(&"😀".as_bytes()[..3]), 3);
    }
}
