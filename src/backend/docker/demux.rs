//! Docker's multiplexed stream framing for non-TTY attach/exec output.
//!
//! The engine prefixes every chunk of output with an 8-byte header
//! `[stream, 0, 0, 0, len_be32]`. [`DemuxState`] is a synchronous,
//! allocation-free push parser for it; [`Demuxer`] drives it over an
//! `AsyncRead` and hands out payload chunks of at most [`MAX_FRAME_BYTES`].
//! TTY streams are raw and need no demuxing.

use std::io;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::MAX_FRAME_BYTES;

/// Which stream a multiplexed frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamKind {
    Stdin,
    Stdout,
    Stderr,
    /// Type 3: an error message from the engine itself, not process output.
    SystemErr,
}

impl StreamKind {
    fn from_byte(b: u8) -> Option<Self> {
        Some(match b {
            0 => Self::Stdin,
            1 => Self::Stdout,
            2 => Self::Stderr,
            3 => Self::SystemErr,
            _ => return None,
        })
    }
}

/// Malformed multiplexed stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DemuxError {
    #[error("unknown stream type {0} in multiplexed Docker stream")]
    UnknownStream(u8),
    #[error("multiplexed Docker stream ended inside a frame header ({have} of 8 bytes)")]
    TruncatedHeader { have: usize },
    #[error("multiplexed Docker stream ended inside a frame ({missing} payload bytes missing)")]
    TruncatedPayload { missing: usize },
}

/// One step of [`DemuxState::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// This many leading input bytes were header bytes, now consumed.
    Header(usize),
    /// The next `len` input bytes (`len >= 1`) are payload of this stream.
    Payload(StreamKind, usize),
}

/// Push parser for the multiplexed framing; keeps only 8 bytes of state.
#[derive(Debug, Clone, Default)]
pub struct DemuxState {
    header: [u8; 8],
    have: usize,
    remaining: u32,
    kind: Option<StreamKind>,
}

impl DemuxState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes from the front of `input` (must be non-empty). Call again
    /// with the rest. After an error the state must not be used further.
    pub fn step(&mut self, input: &[u8]) -> Result<Step, DemuxError> {
        if self.remaining > 0 {
            if let Some(kind) = self.kind {
                let n = input.len().min(self.remaining as usize);
                self.remaining -= n as u32;
                return Ok(Step::Payload(kind, n));
            }
        }
        // `have` is below 8 between calls (it is reset when it reaches 8), so there is room
        // for at least one more header byte.
        let free = self.header.get_mut(self.have..).unwrap_or_default();
        let n = free.len().min(input.len());
        free.iter_mut().zip(input).for_each(|(slot, &b)| *slot = b);
        self.have += n;
        if self.have == 8 {
            self.have = 0;
            let kind = StreamKind::from_byte(self.header[0])
                .ok_or(DemuxError::UnknownStream(self.header[0]))?;
            let [_, _, _, _, a, b, c, d] = self.header;
            self.kind = Some(kind);
            self.remaining = u32::from_be_bytes([a, b, c, d]);
        }
        Ok(Step::Header(n))
    }

    /// Checks that the input ended on a frame boundary.
    pub fn finish(&self) -> Result<(), DemuxError> {
        if self.have > 0 {
            Err(DemuxError::TruncatedHeader { have: self.have })
        } else if self.remaining > 0 {
            Err(DemuxError::TruncatedPayload {
                missing: self.remaining as usize,
            })
        } else {
            Ok(())
        }
    }
}

/// `input` cut after its first `n` bytes (after all of it when it is shorter). [`DemuxState::step`]
/// never counts more bytes than it was given, so for its counts nothing is cut short.
fn split_at_most(input: &[u8], n: usize) -> (&[u8], &[u8]) {
    input.split_at_checked(n).unwrap_or((input, &[]))
}

/// Parses a complete multiplexed buffer into (stream, payload) slices;
/// empty frames are skipped. Allocates at most one entry per 8 input bytes.
pub fn parse_frames(input: &[u8]) -> Result<Vec<(StreamKind, &[u8])>, DemuxError> {
    let mut out = Vec::new();
    let mut state = DemuxState::new();
    let mut rest = input;
    while !rest.is_empty() {
        match state.step(rest)? {
            Step::Header(n) => rest = split_at_most(rest, n).1,
            Step::Payload(kind, n) => {
                let (payload, after) = split_at_most(rest, n);
                out.push((kind, payload));
                rest = after;
            }
        }
    }
    state.finish()?;
    Ok(out)
}

/// Fuzz entry point: parses `data` whole and in data-driven pieces and
/// checks that both agree, that no more payload than input comes out and
/// that nothing panics.
pub fn fuzz_demux(data: &[u8]) {
    let whole = parse_frames(data);
    if let Ok(frames) = &whole {
        let total: usize = frames.iter().map(|(_, p)| p.len()).sum();
        assert!(total + 8 * frames.len() <= data.len());
    }
    let mut state = DemuxState::new();
    let mut rest = data;
    // Piece sizes come from the input bytes in turn, starting over at its end.
    let mut sizes = data.iter().cycle();
    let mut total = 0usize;
    let mut result = Ok(());
    // Concatenated payload must match the whole-buffer parse, byte for byte.
    let mut expected = whole
        .as_ref()
        .ok()
        .map(|f| f.iter().flat_map(|(k, p)| p.iter().map(move |b| (*k, *b))));
    while !rest.is_empty() && result.is_ok() {
        let size = 1 + usize::from(sizes.next().map_or(0, |b| b % 13));
        let (mut chunk, after) = split_at_most(rest, size);
        rest = after;
        while !chunk.is_empty() {
            match state.step(chunk) {
                Ok(Step::Header(n)) => {
                    assert!((1..=8).contains(&n));
                    chunk = split_at_most(chunk, n).1;
                }
                Ok(Step::Payload(kind, n)) => {
                    assert!(n >= 1 && n <= chunk.len());
                    total += n;
                    let (payload, after) = split_at_most(chunk, n);
                    if let Some(exp) = expected.as_mut() {
                        for b in payload {
                            assert_eq!(exp.next(), Some((kind, *b)));
                        }
                    }
                    chunk = after;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
    }
    let result = result.and_then(|()| state.finish());
    assert!(total <= data.len());
    assert_eq!(result.is_ok(), whole.is_ok());
    if let Some(mut exp) = expected {
        assert_eq!(exp.next(), None);
    }
}

/// Read-buffer sizing for output streams: large while data streams, small while a session
/// idles, because an idle session's pending read holds its buffer for as long as it idles.
#[derive(Debug)]
pub struct ReadSizer {
    next: usize,
}

impl Default for ReadSizer {
    fn default() -> Self {
        Self {
            next: Self::MIN_READ,
        }
    }
}

impl ReadSizer {
    /// Smallest read buffer: an idle session costs this much.
    pub const MIN_READ: usize = 4 * 1024;

    /// Makes room for the next read; an empty buffer that grew large is replaced by a small one.
    pub fn prepare(&self, buf: &mut BytesMut) {
        if buf.is_empty() && buf.capacity() > 2 * self.next {
            *buf = BytesMut::with_capacity(self.next);
        } else {
            buf.reserve(self.next);
        }
    }

    /// Grows after a read that filled the buffer, shrinks after one that used little of it.
    pub fn record(&mut self, n: usize) {
        if n >= self.next {
            self.next = (self.next * 2).min(MAX_FRAME_BYTES);
        } else if n < self.next / 4 {
            self.next = (self.next / 2).max(Self::MIN_READ);
        }
    }
}

/// Async demultiplexer over a hijacked non-TTY stream.
pub struct Demuxer<R: AsyncRead + Unpin> {
    reader: R,
    buf: BytesMut,
    state: DemuxState,
    sizer: ReadSizer,
}

impl<R: AsyncRead + Unpin> Demuxer<R> {
    pub fn new(reader: R) -> Self {
        Self {
            reader,
            buf: BytesMut::new(),
            state: DemuxState::new(),
            sizer: ReadSizer::default(),
        }
    }

    /// Gives the reader back (buffered bytes are lost).
    pub fn into_inner(self) -> R {
        self.reader
    }

    /// Next payload chunk (≤ [`MAX_FRAME_BYTES`]; a big frame arrives in
    /// several chunks). `None` at EOF on a frame boundary; an error for a
    /// truncated frame, an unknown stream type, or an engine error frame
    /// (type 3, its text becomes the error message).
    pub async fn next_frame(&mut self) -> io::Result<Option<(StreamKind, Bytes)>> {
        loop {
            while !self.buf.is_empty() {
                match self.state.step(&self.buf).map_err(invalid)? {
                    Step::Header(n) => self.buf.advance(n),
                    Step::Payload(StreamKind::SystemErr, n) => {
                        let text = split_at_most(&self.buf, n).0;
                        let msg = String::from_utf8_lossy(text).into_owned();
                        return Err(io::Error::other(format!(
                            "error from Docker in stream: {}",
                            msg.trim()
                        )));
                    }
                    Step::Payload(kind, n) => {
                        return Ok(Some((kind, self.buf.split_to(n).freeze())));
                    }
                }
            }
            self.sizer.prepare(&mut self.buf);
            let n = self
                .reader
                .read_buf(&mut (&mut self.buf).limit(MAX_FRAME_BYTES))
                .await?;
            self.sizer.record(n);
            if n == 0 {
                self.state.finish().map_err(invalid)?;
                return Ok(None);
            }
        }
    }
}

fn invalid(e: DemuxError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_sizer_grows_under_load_and_shrinks_when_idle() {
        let mut s = ReadSizer::default();
        for _ in 0..10 {
            let next = s.next;
            s.record(next);
        }
        assert_eq!(s.next, MAX_FRAME_BYTES);
        let mut buf = BytesMut::with_capacity(MAX_FRAME_BYTES);
        for _ in 0..10 {
            s.record(1);
        }
        assert_eq!(s.next, ReadSizer::MIN_READ);
        s.prepare(&mut buf);
        assert!(
            buf.capacity() < 2 * ReadSizer::MIN_READ,
            "{}",
            buf.capacity()
        );
    }

    fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
        let mut v = vec![kind, 0, 0, 0];
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn parses_frames() {
        let mut data = frame(1, b"hi\n");
        data.extend(frame(2, b"err\n"));
        data.extend(frame(1, b""));
        let frames = parse_frames(&data).unwrap();
        assert_eq!(
            frames,
            vec![
                (StreamKind::Stdout, &b"hi\n"[..]),
                (StreamKind::Stderr, &b"err\n"[..])
            ]
        );
        assert_eq!(parse_frames(&[]).unwrap(), vec![]);
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(
            parse_frames(&frame(7, b"x")),
            Err(DemuxError::UnknownStream(7))
        );
        assert_eq!(
            parse_frames(&[1, 0, 0]),
            Err(DemuxError::TruncatedHeader { have: 3 })
        );
        let mut f = frame(1, b"hello");
        f.truncate(10);
        assert_eq!(
            parse_frames(&f),
            Err(DemuxError::TruncatedPayload { missing: 3 })
        );
    }

    #[tokio::test]
    async fn async_demuxer_splits_big_frames() {
        let big: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut data = frame(1, &big);
        data.extend(frame(2, b"tail"));
        // Feed through a tiny duplex pipe so reads are fragmented.
        let (mut tx, rx) = tokio::io::duplex(1000);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            tx.write_all(&data).await.unwrap();
        });
        let mut d = Demuxer::new(rx);
        let mut out = Vec::new();
        let mut err = Vec::new();
        while let Some((kind, chunk)) = d.next_frame().await.unwrap() {
            assert!(chunk.len() <= MAX_FRAME_BYTES && !chunk.is_empty());
            match kind {
                StreamKind::Stdout => out.extend_from_slice(&chunk),
                StreamKind::Stderr => err.extend_from_slice(&chunk),
                k => panic!("unexpected {k:?}"),
            }
        }
        writer.await.unwrap();
        assert_eq!(out, big);
        assert_eq!(err, b"tail");
    }

    #[tokio::test]
    async fn async_demuxer_errors() {
        let mut d = Demuxer::new(&[1u8, 0, 0, 0, 0, 0, 0, 9, b'a'][..]);
        assert_eq!(d.next_frame().await.unwrap().unwrap().1, &b"a"[..]);
        assert_eq!(
            d.next_frame().await.unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let data = frame(3, b"oops\n");
        let mut d = Demuxer::new(&data[..]);
        let e = d.next_frame().await.unwrap_err();
        assert!(e.to_string().contains("oops"), "{e}");
    }

    #[test]
    fn fuzz_smoke() {
        // Deterministic pseudo-random inputs plus structured ones.
        let mut seed = 0x1234_5678u32;
        for len in 0..300 {
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    // bias towards valid stream types and small lengths
                    match (seed >> 16) % 4 {
                        0 => 1,
                        1 => 0,
                        _ => (seed >> 8) as u8,
                    }
                })
                .collect();
            fuzz_demux(&data);
        }
        let mut valid = frame(1, &[9; 100]);
        valid.extend(frame(2, b"x"));
        valid.extend(frame(0, b""));
        fuzz_demux(&valid);
        for cut in 0..valid.len() {
            fuzz_demux(&valid[..cut]);
        }
    }
}
