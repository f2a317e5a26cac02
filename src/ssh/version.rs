//! Records the client's SSH identification line (`SSH-2.0-OpenSSH_9.6`) as russh reads it, for
//! the webhooks' `clientVersion`: a pass-through stream that looks at the first bytes only.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// RFC 4253 §4.2: the identification line is at most 255 bytes with CR LF; lines before it
/// (which clients should not send) are looked through up to this many bytes in all.
const MAX_SCANNED_BYTES: usize = 1024;
const MAX_LINE_BYTES: usize = 255;

pub struct VersionRecorder<S> {
    inner: S,
    line: Vec<u8>,
    scanned: usize,
    done: bool,
    slot: Arc<OnceLock<String>>,
}

impl<S> VersionRecorder<S> {
    pub fn new(inner: S, slot: Arc<OnceLock<String>>) -> Self {
        Self {
            inner,
            line: Vec::new(),
            scanned: 0,
            done: false,
            slot,
        }
    }

    fn look(&mut self, data: &[u8]) {
        for &b in data {
            self.scanned += 1;
            if b == b'\n' {
                let line = String::from_utf8_lossy(&self.line);
                let line = line.trim_end_matches('\r');
                if line.starts_with("SSH-") {
                    // Control characters never travel on to webhooks or logs.
                    let _ = self
                        .slot
                        .set(line.chars().filter(|c| !c.is_control()).collect());
                    self.done = true;
                    return;
                }
                self.line.clear();
            } else if self.line.len() < MAX_LINE_BYTES {
                self.line.push(b);
            }
            if self.scanned >= MAX_SCANNED_BYTES {
                self.done = true;
                return;
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for VersionRecorder<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if !self.done {
            if let Poll::Ready(Ok(())) = &r {
                let new = buf.filled()[before..].to_vec();
                self.look(&new);
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for VersionRecorder<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn records_the_identification_line_in_pieces() {
        let slot = Arc::new(OnceLock::new());
        let data: &[u8] = b"SSH-2.0-Open\x00SSH_9.6\r\n\x00\x00\x01binary";
        let mut r = VersionRecorder::new(data, Arc::clone(&slot));
        let mut out = Vec::new();
        let mut buf = [0u8; 5];
        loop {
            let n = r.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        assert_eq!(out, data, "passes everything through");
        assert_eq!(slot.get().map(String::as_str), Some("SSH-2.0-OpenSSH_9.6"));
    }

    #[tokio::test]
    async fn gives_up_on_garbage() {
        let slot = Arc::new(OnceLock::new());
        let data = vec![b'x'; 4096];
        let mut r = VersionRecorder::new(&data[..], Arc::clone(&slot));
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        assert_eq!(out.len(), 4096);
        assert!(slot.get().is_none());
        assert!(r.done);
    }
}
