//! The client's side of the connection as russh sees it: a pass-through stream that records the
//! SSH identification line (`SSH-2.0-OpenSSH_9.6`) for the webhooks' `clientVersion`, refuses a
//! PROXY protocol header (only trusted proxies may send one, and theirs is read before this),
//! and ends every read and write once the connection is over, so russh's task cannot keep the
//! socket after we are done with it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// What the stream learns about the client, shared with the connection.
#[derive(Debug, Default)]
pub struct ClientHello {
    /// The identification line, once read (control characters removed).
    pub version: OnceLock<String>,
    /// The client opened with a PROXY protocol header.
    pub proxy_header: AtomicBool,
}

/// RFC 4253 §4.2: the identification line is at most 255 bytes with CR LF; lines before it
/// (which clients should not send) are looked through up to this many bytes in all.
const MAX_SCANNED_BYTES: usize = 1024;
const MAX_LINE_BYTES: usize = 255;

/// Bytes from the start of the stream enough to tell a PROXY header from an SSH version.
const HEAD_BYTES: usize = 6;

pub struct VersionRecorder<S> {
    inner: S,
    line: Vec<u8>,
    scanned: usize,
    done: bool,
    head: Vec<u8>,
    hello: Arc<ClientHello>,
    ended: Pin<Box<WaitForCancellationFutureOwned>>,
}

impl<S> VersionRecorder<S> {
    /// `ended`: once cancelled, every read and write fails.
    pub fn new(inner: S, hello: Arc<ClientHello>, ended: CancellationToken) -> Self {
        Self {
            inner,
            line: Vec::new(),
            scanned: 0,
            done: false,
            head: Vec::with_capacity(HEAD_BYTES),
            hello,
            ended: Box::pin(ended.cancelled_owned()),
        }
    }

    fn check_ended(&mut self, cx: &mut Context<'_>) -> Result<(), io::Error> {
        match self.ended.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the connection is over",
            )),
            Poll::Pending => Ok(()),
        }
    }

    /// Whether the stream opened with a PROXY header (then it is refused).
    fn proxy_header(&mut self, data: &[u8]) -> bool {
        if self.head.len() >= HEAD_BYTES {
            return false;
        }
        let room = HEAD_BYTES - self.head.len();
        self.head
            .extend_from_slice(data.get(..room).unwrap_or(data));
        if crate::front::proxy::looks_like_header(&self.head) {
            self.hello.proxy_header.store(true, Ordering::Relaxed);
            return true;
        }
        false
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
                        .hello
                        .version
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
        self.check_ended(cx)?;
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if !self.done {
            if let Poll::Ready(Ok(())) = &r {
                let new = buf.filled().get(before..).unwrap_or_default().to_vec();
                if self.proxy_header(&new) {
                    buf.set_filled(before);
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "a PROXY protocol header from a peer that is not a trusted proxy",
                    )));
                }
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
        self.check_ended(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check_ended(cx)?;
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
        self.check_ended(cx)?;
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

    fn recorder<S>(inner: S) -> (VersionRecorder<S>, Arc<ClientHello>, CancellationToken) {
        let hello = Arc::new(ClientHello::default());
        let end = CancellationToken::new();
        let r = VersionRecorder::new(inner, Arc::clone(&hello), end.clone());
        (r, hello, end)
    }

    #[tokio::test]
    async fn records_the_identification_line_in_pieces() {
        let data: &[u8] = b"SSH-2.0-Open\x00SSH_9.6\r\n\x00\x00\x01binary";
        let (mut r, hello, _end) = recorder(data);
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
        assert_eq!(
            hello.version.get().map(String::as_str),
            Some("SSH-2.0-OpenSSH_9.6")
        );
    }

    #[tokio::test]
    async fn gives_up_on_garbage() {
        let data = vec![b'x'; 4096];
        let (mut r, hello, _end) = recorder(&data[..]);
        let mut out = Vec::new();
        r.read_to_end(&mut out).await.unwrap();
        assert_eq!(out.len(), 4096);
        assert!(hello.version.get().is_none());
        assert!(r.done);
    }

    #[tokio::test]
    async fn refuses_a_proxy_header() {
        for data in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nSSH-2.0-x\r\n"[..],
            &b"\r\n\r\n\0\r\nQUIT\n\x21\x11\0\x0c"[..],
        ] {
            let (mut r, hello, _end) = recorder(data);
            let mut out = Vec::new();
            let e = r.read_to_end(&mut out).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            assert!(hello.proxy_header.load(Ordering::Relaxed));
        }
    }

    #[tokio::test]
    async fn ends_reads_and_writes_when_told() {
        let (client, server) = tokio::io::duplex(64);
        let (mut r, _hello, end) = recorder(server);
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            r.read(&mut buf).await
        });
        end.cancel();
        let e = reader.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        drop(client);
    }
}
