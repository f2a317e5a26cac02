//! Logging set-up: ContainerSSH's levels and formats on top of `tracing`, with a per-login
//! level (the config webhook's `log.level`) for the events of that login's connection.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::model::{LogConfig, LogDestination, LogFormat, LogLevel};

pub mod sink;

pub fn filter(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::Debug => LevelFilter::DEBUG,
        // tracing has no "notice"; connection-level events are INFO and belong at the default.
        LogLevel::Info | LogLevel::Notice => LevelFilter::INFO,
        LogLevel::Warning => LevelFilter::WARN,
        LogLevel::Error | LogLevel::Critical | LogLevel::Alert | LogLevel::Emergency => {
            LevelFilter::ERROR
        }
    }
}

/// Connection ID → that login's level, for connections whose level differs from the file's.
fn overrides() -> &'static Mutex<HashMap<String, LevelFilter>> {
    static MAP: OnceLock<Mutex<HashMap<String, LevelFilter>>> = OnceLock::new();
    MAP.get_or_init(Default::default)
}

/// Set while any override exists: events are only searched for a connection ID then.
static ANY_OVERRIDE: AtomicBool = AtomicBool::new(false);

/// Logs the events of one connection at `level` (until [`clear_connection_level`]).
pub fn set_connection_level(connection_id: &str, level: LogLevel) {
    let mut map = overrides().lock().unwrap_or_else(|e| e.into_inner());
    map.insert(connection_id.to_string(), filter(level));
    ANY_OVERRIDE.store(true, Ordering::Release);
}

pub fn clear_connection_level(connection_id: &str) {
    let mut map = overrides().lock().unwrap_or_else(|e| e.into_inner());
    if map.remove(connection_id).is_some() && map.is_empty() {
        ANY_OVERRIDE.store(false, Ordering::Release);
    }
}

/// Finds an event's `connection_id` field.
#[derive(Default)]
struct ConnectionId(Option<String>);

impl Visit for ConnectionId {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "connection_id" {
            self.0 = Some(value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "connection_id" {
            self.0 = Some(format!("{value:?}").trim_matches('"').to_string());
        }
    }
}

/// Lets an event through at the file's level, or at its connection's own level.
struct Levels {
    base: LevelFilter,
    /// The most verbose level any login may ask for.
    most: LevelFilter,
}

impl<S: Subscriber> Layer<S> for Levels {
    fn event_enabled(&self, event: &Event<'_>, _ctx: Context<'_, S>) -> bool {
        let level = *event.metadata().level();
        if level <= self.base {
            return true;
        }
        if !ANY_OVERRIDE.load(Ordering::Acquire) {
            return false;
        }
        let mut id = ConnectionId::default();
        event.record(&mut id);
        let Some(id) = id.0 else {
            return false;
        };
        let map = overrides().lock().unwrap_or_else(|e| e.into_inner());
        map.get(&id).is_some_and(|l| level <= *l)
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        Some(self.most.max(self.base))
    }
}

/// The log file, when `log.destination` is `file` (reopened on SIGHUP).
static FILE: OnceLock<Arc<sink::FileSink>> = OnceLock::new();

/// SIGHUP: reopens the log file (logrotate moved it away); nothing for other destinations.
pub fn reopen() {
    if let Some(f) = FILE.get() {
        match f.reopen() {
            Ok(()) => tracing::info!(code = "LOG_REOPENED", "log file reopened (SIGHUP)"),
            Err(e) => {
                tracing::error!(code = "LOG_REOPEN_FAILED", error = %e, "cannot reopen the log file: logging goes on into the old one")
            }
        }
    }
}

/// The directory the log file is reopened in, for the sandbox.
pub fn writable_dir() -> Option<std::os::fd::BorrowedFd<'static>> {
    FILE.get().map(|f| f.dir())
}

/// Installs the global subscriber, writing to `log.destination` (opened now, before the
/// sandbox). `per_login` (a config webhook is configured): logins may log more verbosely
/// than the file.
pub fn init(cfg: &LogConfig, per_login: bool) -> Result<(), sink::SinkError> {
    let base = filter(cfg.level);
    let levels = Levels {
        base,
        most: if per_login { LevelFilter::DEBUG } else { base },
    };
    let (out, syslog) = match cfg.destination {
        LogDestination::Stdout => (sink::Sink::Stdout, false),
        LogDestination::File => {
            let f = Arc::new(sink::FileSink::open(&cfg.file)?);
            let _ = FILE.set(Arc::clone(&f));
            (sink::Sink::File(f), false)
        }
        LogDestination::Syslog => (
            sink::Sink::Syslog(Arc::new(sink::SyslogSink::open(&cfg.syslog)?)),
            true,
        ),
    };
    let registry = tracing_subscriber::registry().with(levels);
    // A second init (tests) is harmless: the first subscriber stays. Syslog lines carry no
    // time or level of their own (the frame has both).
    let _ = match (cfg.format, syslog) {
        (LogFormat::Ljson, false) => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(out)
                    .with_target(false),
            )
            .try_init(),
        (LogFormat::Ljson, true) => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .without_time()
                    .with_level(false)
                    .with_writer(out)
                    .with_target(false),
            )
            .try_init(),
        (LogFormat::Text, false) => registry.with(text_layer(out)).try_init(),
        (LogFormat::Text, true) => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(false)
                    .without_time()
                    .with_level(false)
                    .with_writer(out)
                    .with_target(false)
                    .fmt_fields(EscapedFields),
            )
            .try_init(),
    };
    Ok(())
}

/// The text format: tracing's, with every field written through [`EscapedFields`].
fn text_layer<S, W>(writer: W) -> impl Layer<S>
where
    S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(writer)
        .with_target(false)
        .fmt_fields(EscapedFields)
}

/// Writes a text log line's message and `name=value` fields with control characters escaped
/// (`\n`, `\r`, `\t`, `\u{1b}`, …): values come from clients and containers (user names,
/// forwarding targets, the agent's messages), and one holding a newline must not be able to
/// write a line of its own. (The JSON format escapes by construction.)
pub struct EscapedFields;

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for EscapedFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        writer: tracing_subscriber::fmt::format::Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        let mut v = EscapingVisitor {
            writer,
            first: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

struct EscapingVisitor<'w> {
    writer: tracing_subscriber::fmt::format::Writer<'w>,
    first: bool,
    result: std::fmt::Result,
}

// `&str` fields reach `record_debug` (Visit's default), quoted and escaped as tracing prints
// them; `%display` fields and the message are where raw text arrives.
impl Visit for EscapingVisitor<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.write(field, &format!("{value:?}"));
    }
}

impl EscapingVisitor<'_> {
    fn write(&mut self, field: &Field, value: &str) {
        if self.result.is_err() {
            return;
        }
        let sep = if self.first { "" } else { " " };
        self.first = false;
        let text = escape_controls(value);
        self.result = if field.name() == "message" {
            write!(self.writer, "{sep}{text}")
        } else {
            write!(self.writer, "{sep}{}={text}", field.name())
        };
    }
}

/// `s` with every control character written as an escape sequence.
fn escape_controls(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn text_lines_cannot_be_forged_by_field_values() {
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::registry().with(text_layer(move || out.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let host = "evil\n2026-01-01T00:00:00Z  INFO authenticated user=root\r\x1b[2J";
            tracing::info!(host = %host, n = 3, "forwarded connection failed: {}", "a\nb");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.contains("forwarded connection failed: a\\nb"),
            "{text}"
        );
        assert!(
            text.contains(
                "host=evil\\n2026-01-01T00:00:00Z  INFO authenticated user=root\\r\\u{1b}[2J"
            ),
            "{text}"
        );
        assert!(text.contains(" n=3"), "{text}");
    }
}
