//! Where log lines go (`log.destination`): stdout; a file (`log.file`), reopened on SIGHUP so
//! logrotate can move it away; or syslog (`log.syslog`): a unix socket (datagram, else stream)
//! or `host:port` over UDP, in RFC 3164 framing as ContainerSSH sends it
//! (`<PRI>Mmm dd hh:mm:ss TAG[pid]: MSG`, the time in UTC, MSG the line without its own time
//! and level).
//!
//! Everything is opened before the sandbox: the file's directory stays open so that a reopen
//! after SIGHUP creates the new file relative to it (the only writable open the seccomp filter
//! allows there), and the syslog socket is connected once (and again on a send error).

use std::fs::File;
use std::io::{self, Write};
use std::net::UdpSocket;
use std::os::fd::BorrowedFd;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

use crate::config::model::SyslogConfig;
use crate::dirfd::{Create, WritableDir};

/// Why a destination cannot be used; names the key.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("log.file: cannot open {path}")]
    File {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("log.file: {path} names no file in a directory")]
    FileName { path: String },
    #[error("log.syslog.facility: unknown facility {0:?} (kern, user, mail, daemon, auth, syslog, lpr, news, uucp, cron, authpriv, ftp, local0..local7)")]
    Facility(String),
    #[error("log.syslog.destination: cannot reach {destination}")]
    Syslog {
        destination: String,
        #[source]
        source: io::Error,
    },
}

/// A log file and the directory it is reopened in.
pub struct FileSink {
    dir: WritableDir,
    name: String,
    file: Mutex<File>,
}

fn open_in(dir: &WritableDir, name: &str) -> io::Result<File> {
    dir.create(name, Create::Append, 0o640)
}

impl FileSink {
    pub fn open(path: &str) -> Result<Self, SinkError> {
        let p = Path::new(path);
        let (Some(parent), Some(name)) = (p.parent(), p.file_name().and_then(|n| n.to_str()))
        else {
            return Err(SinkError::FileName { path: path.into() });
        };
        let parent = if parent.as_os_str().is_empty() {
            Path::new(".")
        } else {
            parent
        };
        let failed = |e: io::Error| SinkError::File {
            path: path.into(),
            source: e,
        };
        let dir = WritableDir::open(parent).map_err(failed)?;
        let file = open_in(&dir, name).map_err(failed)?;
        Ok(Self {
            dir,
            name: name.into(),
            file: Mutex::new(file),
        })
    }

    /// SIGHUP: the file is opened again by name (logrotate has moved the old one away).
    pub fn reopen(&self) -> io::Result<()> {
        let new = open_in(&self.dir, &self.name)?;
        *self.file.lock().unwrap_or_else(PoisonError::into_inner) = new;
        Ok(())
    }

    pub fn dir(&self) -> BorrowedFd<'_> {
        self.dir.fd()
    }

    fn write_line(&self, line: &[u8]) -> io::Result<()> {
        self.file
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write_all(line)
    }
}

enum Transport {
    Datagram(UnixDatagram),
    Stream(UnixStream),
    Udp(UdpSocket),
}

/// A syslog destination.
pub struct SyslogSink {
    destination: String,
    facility: u8,
    /// `TAG[pid]: ` or `TAG: `.
    prefix: String,
    transport: Mutex<Option<Transport>>,
}

fn facility(name: &str) -> Option<u8> {
    Some(match name {
        "kern" => 0,
        "user" => 1,
        "mail" => 2,
        "daemon" => 3,
        "auth" => 4,
        "syslog" => 5,
        "lpr" => 6,
        "news" => 7,
        "uucp" => 8,
        "cron" => 9,
        "authpriv" => 10,
        "ftp" => 11,
        "local0" => 16,
        "local1" => 17,
        "local2" => 18,
        "local3" => 19,
        "local4" => 20,
        "local5" => 21,
        "local6" => 22,
        "local7" => 23,
        _ => return None,
    })
}

/// Connects, non-blocking: a syslog daemon that stops reading must not stall the threads
/// that log (a full socket loses the line instead).
fn connect(destination: &str) -> io::Result<Transport> {
    if destination.starts_with('/') {
        let d = UnixDatagram::unbound()?;
        match d.connect(destination) {
            Ok(()) => {
                d.set_nonblocking(true)?;
                Ok(Transport::Datagram(d))
            }
            Err(_) => {
                let s = UnixStream::connect(destination)?;
                s.set_nonblocking(true)?;
                Ok(Transport::Stream(s))
            }
        }
    } else {
        let bind = if destination.starts_with('[') {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        };
        let u = UdpSocket::bind(bind)?;
        u.connect(destination)?;
        u.set_nonblocking(true)?;
        Ok(Transport::Udp(u))
    }
}

impl SyslogSink {
    pub fn open(cfg: &SyslogConfig) -> Result<Self, SinkError> {
        let facility =
            facility(&cfg.facility).ok_or_else(|| SinkError::Facility(cfg.facility.clone()))?;
        let transport = connect(&cfg.destination).map_err(|source| SinkError::Syslog {
            destination: cfg.destination.clone(),
            source,
        })?;
        let prefix = if cfg.pid {
            format!("{}[{}]: ", cfg.tag, std::process::id())
        } else {
            format!("{}: ", cfg.tag)
        };
        Ok(Self {
            destination: cfg.destination.clone(),
            facility,
            prefix,
            transport: Mutex::new(Some(transport)),
        })
    }

    fn send(&self, severity: u8, line: &[u8]) -> io::Result<()> {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        let mut msg = format!(
            "<{}>{} {}",
            u32::from(self.facility) * 8 + u32::from(severity),
            rfc3164_now(),
            self.prefix
        )
        .into_bytes();
        msg.extend_from_slice(line);
        let mut transport = self
            .transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // One reconnect (the daemon restarted), then the line is lost rather than waited for.
        for _ in 0..2 {
            if transport.is_none() {
                *transport = connect(&self.destination).ok();
            }
            let sent = match transport.as_mut() {
                Some(Transport::Datagram(d)) => d.send(&msg).map(|_| ()),
                Some(Transport::Udp(u)) => u.send(&msg).map(|_| ()),
                Some(Transport::Stream(s)) => {
                    let mut framed = msg.clone();
                    framed.push(b'\n');
                    s.write_all(&framed)
                }
                None => Err(io::Error::other("not connected")),
            };
            match sent {
                Ok(()) => return Ok(()),
                // The daemon is behind: this line is lost; a datagram socket stays usable (a
                // stream may hold half a line, so it is reconnected).
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if matches!(transport.as_ref(), Some(Transport::Stream(_))) {
                        *transport = None;
                    }
                    return Err(e);
                }
                Err(_) => *transport = None,
            }
        }
        Err(io::Error::other("syslog unreachable"))
    }
}

/// `Mmm dd hh:mm:ss` (UTC).
fn rfc3164_now() -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let t = crate::utc::Utc::now();
    let name = usize::try_from(t.month.saturating_sub(1))
        .ok()
        .and_then(|i| MONTHS.get(i))
        .unwrap_or(&"Jan");
    format!(
        "{name} {:>2} {:02}:{:02}:{:02}",
        t.day, t.hour, t.minute, t.second
    )
}

fn severity(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        Level::DEBUG | Level::TRACE => 7,
    }
}

/// Where lines go.
#[derive(Clone)]
pub enum Sink {
    Stdout,
    File(Arc<FileSink>),
    Syslog(Arc<SyslogSink>),
}

/// One event's writer.
pub struct SinkWriter {
    sink: Sink,
    severity: u8,
    buf: Vec<u8>,
}

impl Write for SinkWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for SinkWriter {
    /// The event's line, whole, in one write (one datagram for syslog).
    fn drop(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let _ = match &self.sink {
            Sink::Stdout => io::stdout().lock().write_all(&self.buf),
            Sink::File(f) => f.write_line(&self.buf),
            Sink::Syslog(s) => s.send(self.severity, &self.buf),
        };
    }
}

impl<'a> MakeWriter<'a> for Sink {
    type Writer = SinkWriter;

    fn make_writer(&'a self) -> SinkWriter {
        SinkWriter {
            sink: self.clone(),
            severity: 6,
            buf: Vec::new(),
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> SinkWriter {
        SinkWriter {
            sink: self.clone(),
            severity: severity(meta.level()),
            buf: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_syslog_time_has_rfc3164s_shape() {
        let t = rfc3164_now();
        assert_eq!(t.len(), 15, "{t}");
        assert!(t.as_bytes()[3] == b' ' && t.as_bytes()[6] == b' ', "{t}");
    }

    #[test]
    fn a_datagram_per_line_with_priority_and_tag() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let sink = SyslogSink::open(&SyslogConfig {
            destination: path.display().to_string(),
            facility: "local3".into(),
            tag: "cssh".into(),
            pid: true,
        })
        .unwrap();
        sink.send(4, b"hello\n").unwrap();
        let mut buf = [0u8; 512];
        let n = server.recv(&mut buf).unwrap();
        let msg = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(msg.starts_with("<156>"), "{msg}");
        assert!(
            msg.ends_with(&format!(" cssh[{}]: hello", std::process::id())),
            "{msg}"
        );
        assert!(matches!(
            SyslogSink::open(&SyslogConfig {
                facility: "nope".into(),
                ..SyslogConfig::default()
            }),
            Err(SinkError::Facility(_))
        ));
    }

    /// A daemon that stops reading costs lines, never a wait.
    #[test]
    fn a_syslog_that_does_not_read_never_blocks_the_logger() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.sock");
        let _deaf = UnixDatagram::bind(&path).unwrap();
        let sink = SyslogSink::open(&SyslogConfig {
            destination: path.display().to_string(),
            ..SyslogConfig::default()
        })
        .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let line = vec![b'x'; 1024];
            let lost = (0..10_000).filter(|_| sink.send(6, &line).is_err()).count();
            let _ = tx.send(lost);
        });
        let lost = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("sending blocked on a full socket");
        assert!(lost > 0, "the socket's queue is smaller than 10,000 lines");
    }

    #[test]
    fn a_file_is_reopened_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        let sink = FileSink::open(path.to_str().unwrap()).unwrap();
        sink.write_line(b"one\n").unwrap();
        std::fs::rename(&path, dir.path().join("c.log.1")).unwrap();
        sink.write_line(b"two\n").unwrap();
        sink.reopen().unwrap();
        sink.write_line(b"three\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("c.log.1")).unwrap(),
            "one\ntwo\n"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "three\n");
    }
}
