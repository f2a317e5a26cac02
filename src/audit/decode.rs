//! `containerssh audit decode FILE` and `containerssh audit replay FILE [--channel N]`: read
//! a binary recording (ours or ContainerSSH's, versions 1 and 2).
//!
//! A recording whose server stopped while writing it ends without gzip's trailer, maybe in
//! the middle of a message: everything before that is read, and the end is reported.

use std::io::{BufReader, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use flate2::read::GzDecoder;

use super::binary::{type_id, HEADER_LEN, MAGIC};
use super::cbor::{self, DecodeError};

/// One message claiming more than this is refused rather than buffered.
const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not a ContainerSSH audit recording (its header is not {MAGIC:?})")]
    Magic,
    #[error("audit recording version {0} is not one this decoder reads (1 and 2)")]
    Version(u64),
    #[error("the recording is damaged at byte {offset} of its messages: {reason}")]
    Damaged { offset: u64, reason: String },
}

/// The messages of a recording, one at a time.
pub struct Messages {
    inner: GzDecoder<BufReader<std::fs::File>>,
    buf: Vec<u8>,
    pos: usize,
    eof: bool,
    offset: u64,
    /// Version 1 keeps all messages in one array, read whole.
    v1: Option<std::vec::IntoIter<serde_json::Value>>,
    /// Set when the stream ended early (the last message cut short, no gzip trailer).
    pub truncated: bool,
}

pub fn open(path: &Path) -> Result<Messages, ReadError> {
    let failed = |source| ReadError::Open {
        path: path.display().to_string(),
        source,
    };
    open_file(std::fs::File::open(path).map_err(failed)?)
}

/// Who logged in on a binary recording's connection (its `handshake_successful` message,
/// among the first messages), for a recording whose metadata was written before the login.
pub fn login_of(file: std::fs::File) -> Option<String> {
    let mut m = open_file(file).ok()?;
    for _ in 0..64 {
        let msg = m.next_message().ok()??;
        if msg.get("type").and_then(serde_json::Value::as_u64) == Some(199) {
            return msg
                .get("payload")?
                .get("username")?
                .as_str()
                .map(str::to_string);
        }
    }
    None
}

pub fn open_file(mut f: std::fs::File) -> Result<Messages, ReadError> {
    let mut head = [0u8; HEADER_LEN];
    f.read_exact(&mut head).map_err(|_| ReadError::Magic)?;
    let magic_end = head.iter().take(32).position(|&b| b == 0).unwrap_or(32);
    if head.get(..magic_end) != Some(MAGIC.as_bytes()) {
        return Err(ReadError::Magic);
    }
    let mut v = [0u8; 8];
    v.copy_from_slice(head.get(32..40).unwrap_or(&[0; 8]));
    let version = u64::from_le_bytes(v);
    if version != 1 && version != 2 {
        return Err(ReadError::Version(version));
    }
    let mut m = Messages {
        inner: GzDecoder::new(BufReader::new(f)),
        buf: Vec::new(),
        pos: 0,
        eof: false,
        offset: 0,
        v1: None,
        truncated: false,
    };
    if version == 1 {
        let all = match m.next_item(usize::MAX)? {
            Some(serde_json::Value::Array(a)) => a,
            Some(_) => {
                return Err(ReadError::Damaged {
                    offset: 0,
                    reason: "version 1 holds one array of messages".into(),
                })
            }
            None => Vec::new(),
        };
        m.v1 = Some(all.into_iter());
    }
    Ok(m)
}

impl Messages {
    fn fill(&mut self) -> Result<(), ReadError> {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let mut chunk = [0u8; 64 * 1024];
        match self.inner.read(&mut chunk) {
            Ok(0) => self.eof = true,
            Ok(n) => self
                .buf
                .extend_from_slice(chunk.get(..n).unwrap_or_default()),
            // No trailer: the writer stopped (crash, kill): what came so far is the recording.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                self.eof = true;
                self.truncated = true;
            }
            Err(e) => {
                return Err(ReadError::Damaged {
                    offset: self.offset,
                    reason: e.to_string(),
                })
            }
        }
        Ok(())
    }

    fn next_item(&mut self, limit: usize) -> Result<Option<serde_json::Value>, ReadError> {
        loop {
            match cbor::decode(self.buf.get(self.pos..).unwrap_or_default()) {
                Ok((v, used)) => {
                    self.pos += used;
                    self.offset += used as u64;
                    return Ok(Some(v));
                }
                Err(DecodeError::Incomplete) => {
                    if self.eof {
                        if self.buf.len() > self.pos {
                            self.truncated = true;
                        }
                        return Ok(None);
                    }
                    if self.buf.len() - self.pos > limit.min(MAX_MESSAGE_BYTES * 4) {
                        return Err(ReadError::Damaged {
                            offset: self.offset,
                            reason: format!("a message longer than {MAX_MESSAGE_BYTES} bytes"),
                        });
                    }
                    self.fill()?;
                }
                Err(e) => {
                    return Err(ReadError::Damaged {
                        offset: self.offset,
                        reason: e.to_string(),
                    })
                }
            }
        }
    }

    /// The next message, or `None` at the end.
    pub fn next_message(&mut self) -> Result<Option<serde_json::Value>, ReadError> {
        if let Some(all) = &mut self.v1 {
            return Ok(all.next());
        }
        self.next_item(MAX_MESSAGE_BYTES)
    }
}

/// A message as `audit decode` prints it: ContainerSSH's extended form (the type's name
/// beside its number).
fn extended(mut m: serde_json::Value) -> serde_json::Value {
    if let Some(obj) = m.as_object_mut() {
        let t = obj.get("type").and_then(serde_json::Value::as_u64);
        if let Some(t) = t {
            obj.insert("typeId".into(), type_id(t).into());
        }
    }
    m
}

fn note_end(m: &Messages, err: &mut dyn Write) {
    if m.truncated {
        let _ = writeln!(
            err,
            "containerssh: the recording ends early (its server stopped while writing it)"
        );
    }
}

/// `audit decode FILE`: one JSON object per message on `out`.
pub fn decode(path: &Path, out: &mut dyn Write, err: &mut dyn Write) -> Result<(), ReadError> {
    let mut m = open(path)?;
    while let Some(msg) = m.next_message()? {
        let _ = writeln!(out, "{}", extended(msg));
    }
    note_end(&m, err);
    Ok(())
}

/// `audit replay FILE [--channel N]`: the program output of one session channel (the first
/// with output when none is named), at the pace it was recorded.
pub fn replay(
    path: &Path,
    channel: Option<u64>,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<(), ReadError> {
    let mut m = open(path)?;
    let mut chosen = channel;
    let mut first: Option<u64> = None;
    let start = Instant::now();
    while let Some(msg) = m.next_message()? {
        let get = |k: &str| msg.get(k).and_then(serde_json::Value::as_u64);
        if get("type") != Some(500) {
            continue;
        }
        let payload = msg.get("payload");
        let stream = payload
            .and_then(|p| p.get("stream"))
            .and_then(serde_json::Value::as_u64);
        if stream == Some(0) {
            continue;
        }
        let ch = get("channelId");
        match chosen {
            None => chosen = ch,
            Some(c) if Some(c) != ch => continue,
            Some(_) => {}
        }
        let Some(ts) = get("timestamp") else { continue };
        let base = *first.get_or_insert(ts);
        let due = start + Duration::from_nanos(ts.saturating_sub(base));
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let data = payload
            .and_then(|p| p.get("data"))
            .and_then(serde_json::Value::as_str)
            .and_then(|d| base64::engine::general_purpose::STANDARD.decode(d).ok())
            .unwrap_or_default();
        let _ = out.write_all(&data);
        let _ = out.flush();
    }
    note_end(&m, err);
    if chosen.is_none() {
        let _ = writeln!(err, "containerssh: the recording has no program output");
    }
    Ok(())
}
