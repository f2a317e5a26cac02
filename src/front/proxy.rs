//! The PROXY protocol, v1 (text) and v2 (binary), as HAProxy's `proxy-protocol.txt` specifies
//! it: a trusted load balancer sends one header before the client's bytes, naming the client's
//! address. Our own small parser rather than a crate: the header must be consumed exactly (the
//! SSH client's bytes follow it and belong to russh), every length is bounded here, and only the
//! TCP subset is accepted. Fuzzed (`fuzz_targets/proxy_header.rs`).
//!
//! Trust follows the specification: a peer in `ssh.proxyProtocol.trustedProxies` **must** send
//! a header (never guessed), any other peer must not (see [`looks_like_header`]).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::cidr::Cidr;

/// v2's fixed signature.
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// v1's prefix.
const V1_PREFIX: &[u8] = b"PROXY ";
/// The specification's bound on a v1 line, CR LF included.
const V1_MAX_BYTES: usize = 107;
/// v2 headers are 16 bytes plus addresses and TLVs; HAProxy's own stay far below this (the
/// specification allows 64 KiB, which nothing we serve needs).
pub const V2_MAX_BYTES: usize = 16 + 1024;

/// The checked `ssh.proxyProtocol`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyRules {
    pub trusted: Vec<Cidr>,
    pub header_timeout: Duration,
}

impl ProxyRules {
    pub fn trusts(&self, ip: IpAddr) -> bool {
        super::cidr::any_contains(&self.trusted, ip)
    }
}

/// What a header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Header {
    /// The balancer's own connection (a health check): accepted and closed.
    Local,
    /// A client connection the balancer does not know the addresses of (v1 `UNKNOWN`, v2
    /// `UNSPEC`). The specification says to use the real connection's; the server refuses it
    /// instead, since the proxy's address would stand for every such client.
    Unknown,
    /// A proxied TCP connection.
    Tcp {
        source: SocketAddr,
        destination: SocketAddr,
    },
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not a PROXY protocol header")]
    NotAHeader,
    #[error("PROXY v1 line longer than {V1_MAX_BYTES} bytes")]
    V1TooLong,
    #[error("malformed PROXY v1 line: {0}")]
    V1(&'static str),
    #[error("PROXY v2 header of {0} bytes is over the {V2_MAX_BYTES}-byte limit")]
    V2TooLong(usize),
    #[error("malformed PROXY v2 header: {0}")]
    V2(&'static str),
}

/// Parses a header at the start of `buf`: `Ok(None)` while more bytes are needed,
/// `Ok(Some((header, n)))` with `n` the header's length (what follows is the client's).
pub fn parse(buf: &[u8]) -> Result<Option<(Header, usize)>, ParseError> {
    if starts_like(buf, V2_SIGNATURE) {
        return match buf.split_first_chunk::<16>() {
            Some((fixed, rest)) => parse_v2(fixed, rest),
            None => Ok(None),
        };
    }
    if starts_like(buf, V1_PREFIX) {
        return parse_v1(buf);
    }
    Err(ParseError::NotAHeader)
}

/// Whether `buf` and `sig` agree on their common prefix.
fn starts_like(buf: &[u8], sig: &[u8]) -> bool {
    buf.iter().zip(sig).all(|(a, b)| a == b)
}

/// Whether a client's first bytes are a PROXY header (which only trusted proxies may send).
pub fn looks_like_header(first: &[u8]) -> bool {
    let long_enough = |sig: &[u8]| first.len() >= sig.len().min(6);
    (long_enough(V1_PREFIX) && starts_like(first, V1_PREFIX))
        || (long_enough(V2_SIGNATURE) && starts_like(first, V2_SIGNATURE))
}

fn parse_v1(buf: &[u8]) -> Result<Option<(Header, usize)>, ParseError> {
    let scan = buf.get(..V1_MAX_BYTES).unwrap_or(buf);
    // The bytes before the first LF; `None` without one.
    let Some(line) = scan
        .split_inclusive(|&b| b == b'\n')
        .next()
        .and_then(|l| l.strip_suffix(b"\n"))
    else {
        return if buf.len() >= V1_MAX_BYTES {
            Err(ParseError::V1TooLong)
        } else {
            Ok(None)
        };
    };
    let used = line.len() + 1;
    let line = line
        .strip_suffix(b"\r")
        .ok_or(ParseError::V1("no CR before LF"))?;
    let line = std::str::from_utf8(line).map_err(|_| ParseError::V1("not ASCII"))?;
    let mut fields = line.split(' ');
    if fields.next() != Some("PROXY") {
        return Err(ParseError::V1("no PROXY word"));
    }
    let header = match fields.next() {
        // Whatever follows UNKNOWN is to be ignored.
        Some("UNKNOWN") => Header::Unknown,
        Some(family @ ("TCP4" | "TCP6")) => {
            let v4 = family == "TCP4";
            let mut next = || fields.next().ok_or(ParseError::V1("missing field"));
            let (src, dst) = (v1_ip(next()?, v4)?, v1_ip(next()?, v4)?);
            let (sport, dport) = (v1_port(next()?)?, v1_port(next()?)?);
            if fields.next().is_some() {
                return Err(ParseError::V1("extra fields"));
            }
            Header::Tcp {
                source: SocketAddr::new(src, sport),
                destination: SocketAddr::new(dst, dport),
            }
        }
        _ => return Err(ParseError::V1("unknown protocol")),
    };
    Ok(Some((header, used)))
}

fn v1_ip(s: &str, v4: bool) -> Result<IpAddr, ParseError> {
    let ip = if v4 {
        s.parse::<Ipv4Addr>().map(IpAddr::V4)
    } else {
        s.parse::<Ipv6Addr>().map(IpAddr::V6)
    };
    ip.map_err(|_| ParseError::V1("bad address"))
}

fn v1_port(s: &str) -> Result<u16, ParseError> {
    let ok = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    ok.then(|| s.parse::<u16>().ok())
        .flatten()
        .ok_or(ParseError::V1("bad port"))
}

/// A v2 header: `fixed` is its first 16 bytes (signature, version and command, family,
/// length), `rest` what follows them.
fn parse_v2(fixed: &[u8; 16], rest: &[u8]) -> Result<Option<(Header, usize)>, ParseError> {
    let [.., ver_cmd, fam, len_hi, len_lo] = *fixed;
    let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
    let total = 16 + len;
    if total > V2_MAX_BYTES {
        return Err(ParseError::V2TooLong(total));
    }
    if ver_cmd >> 4 != 2 {
        return Err(ParseError::V2("version is not 2"));
    }
    let Some(body) = rest.get(..len) else {
        return Ok(None);
    };
    let header = match ver_cmd & 0x0f {
        0 => Header::Local,
        1 => match fam {
            0x00 => Header::Unknown,
            0x11 => {
                let (src, dst, sport, dport) =
                    v2_addresses::<4>(body).ok_or(ParseError::V2("short IPv4 addresses"))?;
                Header::Tcp {
                    source: SocketAddr::new(Ipv4Addr::from(src).into(), sport),
                    destination: SocketAddr::new(Ipv4Addr::from(dst).into(), dport),
                }
            }
            0x21 => {
                let (src, dst, sport, dport) =
                    v2_addresses::<16>(body).ok_or(ParseError::V2("short IPv6 addresses"))?;
                Header::Tcp {
                    source: SocketAddr::new(Ipv6Addr::from(src).into(), sport),
                    destination: SocketAddr::new(Ipv6Addr::from(dst).into(), dport),
                }
            }
            _ => return Err(ParseError::V2("not a TCP connection")),
        },
        _ => return Err(ParseError::V2("unknown command")),
    };
    Ok(Some((header, total)))
}

/// The start of a v2 TCP body: source and destination address (`N` bytes each), then source
/// and destination port; `None` when `body` is shorter. Bytes after them (TLVs) are ignored.
fn v2_addresses<const N: usize>(body: &[u8]) -> Option<([u8; N], [u8; N], u16, u16)> {
    let (src, rest) = body.split_first_chunk::<N>()?;
    let (dst, rest) = rest.split_first_chunk::<N>()?;
    let (sport, rest) = rest.split_first_chunk::<2>()?;
    let (dport, _) = rest.split_first_chunk::<2>()?;
    Some((
        *src,
        *dst,
        u16::from_be_bytes(*sport),
        u16::from_be_bytes(*dport),
    ))
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("the connection closed before its PROXY header was complete")]
    Eof,
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
    #[error(transparent)]
    Parse(#[from] ParseError),
}

/// Reads a trusted peer's header within `timeout`; returns it and any bytes read past it.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    timeout: Duration,
) -> Result<(Header, Vec<u8>), ReadError> {
    let mut buf = Vec::with_capacity(256);
    let read = async {
        let mut chunk = [0u8; 256];
        loop {
            if let Some((h, n)) = parse(&buf)? {
                // `n` is at most `buf.len()`: parse never claims more than it was given.
                return Ok((h, buf.get(n..).unwrap_or_default().to_vec()));
            }
            // Never more than a header can hold, plus one chunk of what follows.
            if buf.len() >= V2_MAX_BYTES {
                return Err(ParseError::V2TooLong(buf.len()).into());
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(ReadError::Eof);
            }
            buf.extend(chunk.iter().take(n));
        }
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| ReadError::Timeout(timeout))?
}

/// A stream that yields `prefix` (bytes read past a PROXY header) before the rest.
pub struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    pub fn new(prefix: Vec<u8>, inner: S) -> Self {
        Self {
            prefix,
            pos: 0,
            inner,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: std::os::fd::AsFd> std::os::fd::AsFd for Prefixed<S> {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(rest) = this.prefix.get(this.pos..).filter(|r| !r.is_empty()) {
            let piece = rest.get(..buf.remaining()).unwrap_or(rest);
            buf.put_slice(piece);
            this.pos += piece.len();
            if this.pos == this.prefix.len() {
                this.prefix = Vec::new();
                this.pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(src: &str, dst: &str) -> Header {
        Header::Tcp {
            source: src.parse().unwrap(),
            destination: dst.parse().unwrap(),
        }
    }

    #[test]
    fn v1_lines() {
        let h = b"PROXY TCP4 127.0.0.3 127.0.0.1 40000 2222\r\nSSH-2.0-x\r\n";
        let (header, n) = parse(h).unwrap().unwrap();
        assert_eq!(header, tcp("127.0.0.3:40000", "127.0.0.1:2222"));
        assert_eq!(&h[n..], b"SSH-2.0-x\r\n");
        let h6 = b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n";
        assert_eq!(
            parse(h6).unwrap().unwrap().0,
            tcp("[2001:db8::1]:1", "[::1]:65535")
        );
        assert_eq!(
            parse(b"PROXY UNKNOWN whatever\r\n").unwrap().unwrap(),
            (Header::Unknown, 24)
        );
        for bad in [
            &b"PROXY TCP4 127.0.0.3 127.0.0.1 40000\r\n"[..],
            b"PROXY TCP4 ::1 127.0.0.1 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 +1 2\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n",
            b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n",
            b"PROXY UDP4 1.2.3.4 1.2.3.4 1 2\r\n",
            b"PROXY  TCP4 1.2.3.4 1.2.3.4 1 2\r\n",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        let long = [b"PROXY ".as_slice(), &[b'x'; 200]].concat();
        assert_eq!(parse(&long), Err(ParseError::V1TooLong));
    }

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut v = V2_SIGNATURE.to_vec();
        v.push(0x20 | cmd);
        v.push(fam);
        v.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn v2_headers() {
        let mut body = vec![127, 0, 0, 3, 127, 0, 0, 1, 0x9c, 0x40, 0x08, 0xae];
        body.extend_from_slice(&[0x03, 0x00, 0x04, 1, 2, 3, 4]); // a CRC32C TLV, ignored
        let mut h = v2(1, 0x11, &body);
        let len = h.len();
        h.extend_from_slice(b"SSH-2.0-x\r\n");
        assert_eq!(
            parse(&h).unwrap().unwrap(),
            (tcp("127.0.0.3:40000", "127.0.0.1:2222"), len)
        );
        let mut b6 = vec![0u8; 36];
        b6[15] = 1; // ::1
        b6[31] = 1;
        b6[32..34].copy_from_slice(&7u16.to_be_bytes());
        b6[34..36].copy_from_slice(&22u16.to_be_bytes());
        assert_eq!(
            parse(&v2(1, 0x21, &b6)).unwrap().unwrap().0,
            tcp("[::1]:7", "[::1]:22")
        );
        assert_eq!(parse(&v2(0, 0, &[])).unwrap().unwrap().0, Header::Local);
        assert_eq!(parse(&v2(1, 0, &[])).unwrap().unwrap().0, Header::Unknown);
        assert!(parse(&v2(1, 0x12, &[0; 12])).is_err(), "UDP");
        assert!(parse(&v2(1, 0x31, &[0; 216])).is_err(), "AF_UNIX");
        assert!(parse(&v2(1, 0x11, &[0; 4])).is_err(), "short");
        assert!(parse(&v2(2, 0x11, &[0; 12])).is_err(), "command");
        let mut wrong_version = v2(1, 0x11, &[0; 12]);
        wrong_version[12] = 0x11;
        assert!(parse(&wrong_version).is_err());
        let huge = v2(1, 0x11, &vec![0; 2000]);
        assert_eq!(parse(&huge[..16]), Err(ParseError::V2TooLong(2016)));
    }

    #[test]
    fn every_strict_prefix_is_incomplete() {
        let mut cases = vec![
            b"PROXY TCP4 127.0.0.3 127.0.0.1 40000 2222\r\n".to_vec(),
            b"PROXY UNKNOWN\r\n".to_vec(),
        ];
        cases.push(v2(1, 0x11, &[1; 12]));
        cases.push(v2(0, 0, &[]));
        for c in cases {
            for n in 0..c.len() {
                assert_eq!(parse(&c[..n]), Ok(None), "{n} of {c:?}");
            }
            assert!(parse(&c).unwrap().is_some());
        }
        assert_eq!(parse(b"SSH-2.0-x\r\n"), Err(ParseError::NotAHeader));
    }

    #[test]
    fn untrusted_headers_are_recognised() {
        assert!(looks_like_header(b"PROXY TCP4 1.2.3.4"));
        assert!(looks_like_header(&V2_SIGNATURE[..]));
        assert!(!looks_like_header(b"SSH-2.0-OpenSSH_9.6\r\n"));
        assert!(!looks_like_header(b"PROX"), "undecided is not a header");
    }

    #[tokio::test]
    async fn reads_exactly_the_header_and_keeps_the_rest() {
        let data = b"PROXY TCP4 127.0.0.3 127.0.0.1 40000 2222\r\nSSH-2.0-x\r\n".to_vec();
        let mut stream = &data[..];
        let (h, rest) = read_header(&mut stream, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(h, tcp("127.0.0.3:40000", "127.0.0.1:2222"));
        let mut joined = Prefixed::new(rest, stream);
        let mut out = Vec::new();
        joined.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, b"SSH-2.0-x\r\n");
        let mut short = &b"PROXY TCP4 1.2"[..];
        assert!(matches!(
            read_header(&mut short, Duration::from_secs(1)).await,
            Err(ReadError::Eof)
        ));
        let (_client, mut server) = tokio::io::duplex(64);
        assert!(matches!(
            read_header(&mut server, Duration::from_millis(50)).await,
            Err(ReadError::Timeout(_))
        ));
    }
}
