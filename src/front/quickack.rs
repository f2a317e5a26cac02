//! Prompt acknowledgements for the client's packets.
//!
//! An SSH client sends several small packets in a row that the server answers only together
//! (its key exchange init, then its key exchange reply; a channel request that wants no reply,
//! then the next). The OpenSSH client leaves Nagle's algorithm on for a session without a
//! terminal, so its second packet waits until the first is acknowledged, and the kernel delays
//! that acknowledgement by up to 40 ms because the server has nothing to send yet. Measured:
//! a third of all logins took 40 ms longer. After every read that returns data the socket is
//! put back into quick-ACK mode (Linux `TCP_QUICKACK`, which the kernel leaves again by
//! itself), so what was read is acknowledged at once. One cheap system call per read.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// `inner` with prompt acknowledgements of what is read from it.
pub struct QuickAck<S> {
    inner: S,
}

impl<S> QuickAck<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: AsFd> AsFd for QuickAck<S> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl<S: AsyncRead + AsFd + Unpin> AsyncRead for QuickAck<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            // Not a socket (a test's pipe), or a kernel without it: acknowledgements are
            // merely later.
            let _ = rustix::net::sockopt::set_tcp_quickack(self.inner.as_fd(), true);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for QuickAck<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
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

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes pass both ways unchanged, and after a read the socket is in quick-ACK mode
    /// (which `getsockopt` reports while the kernel has not left it again).
    #[tokio::test]
    async fn passes_bytes_and_sets_quick_ack() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        rustix::net::sockopt::set_tcp_quickack(server.as_fd(), false).unwrap();
        let mut server = QuickAck::new(server);
        client.write_all(b"SSH-2.0-x\r\n").await.unwrap();
        let mut got = [0u8; 11];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"SSH-2.0-x\r\n");
        assert!(rustix::net::sockopt::tcp_quickack(server.as_fd()).unwrap());
        server.write_all(b"pong").await.unwrap();
        let mut pong = [0u8; 4];
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"pong");
    }
}
