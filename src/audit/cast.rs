//! The asciicast v2 writer: one file per session channel.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::{Done, Event, Header, Kind, Stream};

impl Header {
    pub(super) fn line(&self) -> String {
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

/// Turns bytes into text without splitting a character: a sequence cut at the end of a chunk
/// waits for the next chunk; invalid bytes become U+FFFD.
#[derive(Default)]
pub(super) struct Utf8Joiner {
    carry: Vec<u8>,
}

impl Utf8Joiner {
    pub(super) fn text(&mut self, data: &[u8]) -> String {
        let mut bytes = std::mem::take(&mut self.carry);
        bytes.extend_from_slice(data);
        let keep = incomplete_tail(&bytes);
        let split = bytes.len() - keep;
        self.carry = bytes.split_off(split);
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// How many bytes at the end start a UTF-8 sequence that is not complete yet (0 to 3).
pub(super) fn incomplete_tail(b: &[u8]) -> usize {
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

/// Writes one channel's recording until its events end.
pub(super) async fn write(
    file: tokio::fs::File,
    header: String,
    started: Instant,
    mut rx: mpsc::Receiver<Event>,
    done: Done,
) {
    let mut joiners = [
        Utf8Joiner::default(),
        Utf8Joiner::default(),
        Utf8Joiner::default(),
    ];
    // Lines are batched: one file write per 256 KiB rather than per event.
    let mut file = tokio::io::BufWriter::with_capacity(256 * 1024, file);
    if let Err(e) = file.write_all(header.as_bytes()).await {
        done.failed(&e);
        return;
    }
    // One line, encoded straight from the event (no JSON value in between), reused.
    let mut line: Vec<u8> = Vec::with_capacity(64 * 1024);
    while let Some(event) = rx.recv().await {
        line.clear();
        let t = event.at.saturating_duration_since(started).as_secs_f64();
        let encoded = match &event.kind {
            Kind::Data(stream, data) => {
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
            Kind::Marker(label) => serde_json::to_writer(&mut line, &(t, "m", label)),
            Kind::Dropped(n) => serde_json::to_writer(
                &mut line,
                &(
                    t,
                    "m",
                    format!("audit: {n} bytes not recorded (the recording fell behind)"),
                ),
            ),
            Kind::Exit(how) => serde_json::to_writer(&mut line, &(t, "m", how.to_string())),
            Kind::Resize(cols, rows) => {
                serde_json::to_writer(&mut line, &(t, "r", format!("{cols}x{rows}")))
            }
            Kind::Msg(_) => Ok(()),
        };
        if encoded.is_ok() && !line.is_empty() {
            line.push(b'\n');
        } else {
            line.clear();
        }
        done.queue.written(event.size());
        let mut written = file.write_all(&line).await;
        // Nothing more waiting: out to the file, so an idle session's recording is current.
        if written.is_ok() && rx.is_empty() {
            written = file.flush().await;
        }
        if let Err(e) = written {
            done.failed(&e);
            return;
        }
    }
    if let Err(e) = file.flush().await {
        done.failed(&e);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
