//! Hijacked attach/exec connections: the raw bidirectional stream handed
//! over by the engine after `101 UPGRADED`, split into a read and a write
//! half (non-TTY output on the read half is framed, see `demux.rs`), plus an
//! `AsyncRead` over a streamed response body.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Incoming};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};

use crate::http::ConnGuard;

/// A hijacked engine connection: output comes from `reader`, stdin goes to
/// `writer`. `writer.shutdown()` half-closes the socket, which the engine
/// passes on as EOF on the process's stdin.
pub struct Hijacked {
    pub reader: HijackedReader,
    pub writer: HijackedWriter,
}

/// Read side of a hijacked stream (raw for TTYs, else see `Demuxer`).
pub struct HijackedReader {
    inner: ReaderInner,
}

enum ReaderInner {
    Upgraded(ReadHalf<TokioIo<Upgraded>>),
    /// Engine answered 200 without upgrading: output is the response body.
    Body {
        reader: BodyReader,
        _guard: ConnGuard,
    },
}

/// `AsyncRead` over a streamed response body.
pub(super) struct BodyReader {
    body: Incoming,
    pending: Bytes,
}

impl BodyReader {
    pub(super) fn new(body: Incoming) -> Self {
        Self {
            body,
            pending: Bytes::new(),
        }
    }
}

impl AsyncRead for BodyReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending.split_to(n));
                return Poll::Ready(Ok(()));
            }
            match Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        this.pending = data;
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(io::Error::other(e))),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Write side of a hijacked stream; `None` when the engine did not upgrade.
pub struct HijackedWriter {
    inner: Option<WriteHalf<TokioIo<Upgraded>>>,
}

impl Hijacked {
    pub(super) fn from_upgraded(up: Upgraded) -> Self {
        let (r, w) = tokio::io::split(TokioIo::new(up));
        Self {
            reader: HijackedReader {
                inner: ReaderInner::Upgraded(r),
            },
            writer: HijackedWriter { inner: Some(w) },
        }
    }

    /// Read-only fallback for an engine that answered 200 instead of 101.
    pub(super) fn from_body(body: Incoming, guard: ConnGuard) -> Self {
        Self {
            reader: HijackedReader {
                inner: ReaderInner::Body {
                    reader: BodyReader::new(body),
                    _guard: guard,
                },
            },
            writer: HijackedWriter { inner: None },
        }
    }
}

impl HijackedWriter {
    /// False when the engine answered without upgrading, so stdin cannot be sent.
    pub fn is_writable(&self) -> bool {
        self.inner.is_some()
    }
}

impl AsyncRead for HijackedReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.inner {
            ReaderInner::Upgraded(r) => Pin::new(r).poll_read(cx, buf),
            ReaderInner::Body { reader, .. } => Pin::new(reader).poll_read(cx, buf),
        }
    }
}

fn not_upgraded() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "Docker did not upgrade the connection; stdin is unavailable",
    )
}

impl AsyncWrite for HijackedWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.inner {
            Some(w) => Pin::new(w).poll_write(cx, buf),
            None => Poll::Ready(Err(not_upgraded())),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Some(w) => Pin::new(w).poll_flush(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    /// Half-closes the connection (socket `shutdown(SHUT_WR)`, or TLS
    /// close_notify + shutdown): the process sees EOF on stdin.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.inner {
            Some(w) => Pin::new(w).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}
