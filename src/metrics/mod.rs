//! What operators see: Prometheus metrics (ContainerSSH's names, types, labels and help texts,
//! plus ours), served with the health endpoint by [`http`].
//!
//! One registry for the process ([`get`]): the events it counts happen all over (the accept
//! loop, authentication, webhooks, backends), and a count is a few atomic or locked adds, so
//! it always counts; `metrics.enable` only decides whether it is served. Every label takes its
//! values from a fixed set (method names, `0`/`1`, reason codes, backend names; `country` is
//! `XX` until GeoIP exists), so the number of series is bounded by construction.
//!
//! The text is Prometheus' exposition format 0.0.4 (what `promtool check metrics` checks).

pub mod http;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::Duration;

/// `country` until GeoIP exists (ContainerSSH's value for an unknown country).
pub const COUNTRY: &str = "XX";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// The upper bounds of [`Kind::Histogram`] buckets, in seconds: container and pod starts take
/// from a fraction of a second (a local image) to minutes (a pull).
const START_BUCKETS: &[f64] = &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];

#[derive(Default)]
struct Series {
    value: f64,
    /// Histograms: a count per bucket (not cumulative), and the sum.
    buckets: Vec<u64>,
    sum: f64,
}

/// One metric family: a name, its help, its labels, and a value per label set.
pub struct Family {
    name: &'static str,
    help: &'static str,
    kind: Kind,
    labels: &'static [&'static str],
    series: Mutex<BTreeMap<Vec<String>, Series>>,
}

impl Family {
    const fn new(
        name: &'static str,
        kind: Kind,
        labels: &'static [&'static str],
        help: &'static str,
    ) -> Self {
        Self {
            name,
            help,
            kind,
            labels,
            series: Mutex::new(BTreeMap::new()),
        }
    }

    fn with(&self, values: &[&str], f: impl FnOnce(&mut Series)) {
        debug_assert_eq!(values.len(), self.labels.len(), "{}", self.name);
        let key = values.iter().map(|v| (*v).to_owned()).collect();
        let mut series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        f(series.entry(key).or_default());
    }

    /// Counters and gauges: adds 1.
    pub fn inc(&self, values: &[&str]) {
        self.add(values, 1.0);
    }

    /// Gauges: takes 1 away.
    pub fn dec(&self, values: &[&str]) {
        self.add(values, -1.0);
    }

    pub fn add(&self, values: &[&str], by: f64) {
        self.with(values, |s| s.value += by);
    }

    /// Histograms: one observation.
    pub fn observe(&self, values: &[&str], took: Duration) {
        let secs = took.as_secs_f64();
        self.with(values, |s| {
            if s.buckets.is_empty() {
                s.buckets = vec![0; START_BUCKETS.len()];
            }
            if let Some(i) = START_BUCKETS.iter().position(|b| secs <= *b) {
                if let Some(b) = s.buckets.get_mut(i) {
                    *b += 1;
                }
            }
            s.value += 1.0;
            s.sum += secs;
        });
    }

    /// A series' value (counters, gauges; a histogram's count), for tests.
    pub fn value(&self, values: &[&str]) -> f64 {
        let key: Vec<String> = values.iter().map(|v| (*v).to_owned()).collect();
        let series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        series.get(&key).map_or(0.0, |s| s.value)
    }

    fn render(&self, out: &mut String) {
        let kind = match self.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        let _ = writeln!(out, "# HELP {} {}", self.name, escape_help(self.help));
        let _ = writeln!(out, "# TYPE {} {kind}", self.name);
        let series = self.series.lock().unwrap_or_else(PoisonError::into_inner);
        for (values, s) in series.iter() {
            let labels = label_text(self.labels, values, None);
            match self.kind {
                Kind::Counter | Kind::Gauge => {
                    let _ = writeln!(out, "{}{labels} {}", self.name, number(s.value));
                }
                Kind::Histogram => {
                    let mut cumulative = 0;
                    for (bound, n) in START_BUCKETS.iter().zip(&s.buckets) {
                        cumulative += n;
                        let labels = label_text(self.labels, values, Some(&number(*bound)));
                        let _ = writeln!(out, "{}_bucket{labels} {cumulative}", self.name);
                    }
                    let labels_inf = label_text(self.labels, values, Some("+Inf"));
                    let count = number(s.value);
                    let _ = writeln!(out, "{}_bucket{labels_inf} {count}", self.name);
                    let _ = writeln!(out, "{}_sum{labels} {}", self.name, number(s.sum));
                    let _ = writeln!(out, "{}_count{labels} {count}", self.name);
                }
            }
        }
    }
}

fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v}")
    }
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn label_text(names: &[&str], values: &[String], le: Option<&str>) -> String {
    let mut parts: Vec<String> = names
        .iter()
        .zip(values)
        .map(|(n, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{n}=\"{v}\"")
        })
        .collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("{{{}}}", parts.join(","))
    }
}

/// Bytes through session channels, by direction: counted on the hot path, so plain atomics.
pub struct Bytes {
    from_clients: AtomicU64,
    to_clients: AtomicU64,
}

impl Bytes {
    pub fn from_client(&self, n: usize) {
        self.from_clients.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn to_client(&self, n: usize) {
        self.to_clients.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String) {
        let name = "containerssh_ssh_channel_bytes_total";
        let _ = writeln!(
            out,
            "# HELP {name} Bytes through session channels since start, by direction (in: from clients)."
        );
        let _ = writeln!(out, "# TYPE {name} counter");
        for (dir, v) in [("in", &self.from_clients), ("out", &self.to_clients)] {
            let _ = writeln!(
                out,
                "{name}{{direction=\"{dir}\"}} {}",
                v.load(Ordering::Relaxed)
            );
        }
    }
}

/// Every metric.
pub struct Metrics {
    pub connections: Family,
    pub current_connections: Family,
    pub handshakes_ok: Family,
    pub handshakes_failed: Family,
    pub auth_success: Family,
    pub auth_failures: Family,
    pub auth_server_requests: Family,
    pub auth_server_failures: Family,
    pub config_server_requests: Family,
    pub config_server_failures: Family,
    pub backend_requests: Family,
    pub backend_errors: Family,
    // Ours.
    pub current_sessions: Family,
    pub backend_start: Family,
    pub refused: Family,
    pub penalties: Family,
    pub audit_failures: Family,
    pub audit_dropped: Family,
    pub audit_upload_failures: Family,
    pub pool_ready: Family,
    pub pool_logins: Family,
    pub bytes: Bytes,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| {
    Metrics {
    connections: Family::new(
        "containerssh_ssh_connections_total",
        Kind::Counter,
        &["country"],
        "Number of connections since start",
    ),
    current_connections: Family::new(
        "containerssh_ssh_current_connections",
        Kind::Gauge,
        &["country"],
        "Current open SSH connections",
    ),
    handshakes_ok: Family::new(
        "containerssh_ssh_successful_handshakes_total",
        Kind::Counter,
        &["country"],
        "Successful SSH handshakes since start",
    ),
    handshakes_failed: Family::new(
        "containerssh_ssh_failed_handshakes_total",
        Kind::Counter,
        &["country"],
        "Failed SSH handshakes since start",
    ),
    auth_success: Family::new(
        "containerssh_auth_success_total",
        Kind::Counter,
        &["country", "authtype", "retry"],
        "The number of successful authentications.",
    ),
    auth_failures: Family::new(
        "containerssh_auth_failures_total",
        Kind::Counter,
        &["country", "authtype", "retry"],
        "The number of failed authentications.",
    ),
    // ContainerSSH's help texts, which say "configuration server" here too.
    auth_server_requests: Family::new(
        "containerssh_auth_server_requests_total",
        Kind::Counter,
        &["authtype", "retry"],
        "The number of requests sent to the configuration server.",
    ),
    auth_server_failures: Family::new(
        "containerssh_auth_server_failures_total",
        Kind::Counter,
        &["type", "authtype", "retry", "reason"],
        "The number of request failures to the configuration server.",
    ),
    config_server_requests: Family::new(
        "containerssh_config_server_requests_total",
        Kind::Counter,
        &["retry"],
        "The number of requests sent to the configuration server.",
    ),
    config_server_failures: Family::new(
        "containerssh_config_server_failures_total",
        Kind::Counter,
        &["type", "retry"],
        "The number of request failures to the configuration server.",
    ),
    backend_requests: Family::new(
        "containerssh_backend_requests_total",
        Kind::Counter,
        &["backend"],
        "The number of requests to the backend.",
    ),
    backend_errors: Family::new(
        "containerssh_backend_errors_total",
        Kind::Counter,
        &["backend"],
        "The number of failed requests to the backend.",
    ),
    current_sessions: Family::new(
        "containerssh_ssh_current_sessions",
        Kind::Gauge,
        &[],
        "Session channels open now.",
    ),
    backend_start: Family::new(
        "containerssh_backend_start_seconds",
        Kind::Histogram,
        &["backend"],
        "How long starting a container or pod took, to ready (failed starts included).",
    ),
    refused: Family::new(
        "containerssh_ssh_refused_connections_total",
        Kind::Counter,
        &["reason"],
        "Connections turned away at the door (maxStartups, perSourceMaxStartups, per-source penalties).",
    ),
    penalties: Family::new(
        "containerssh_ssh_penalties_total",
        Kind::Counter,
        &["kind"],
        "Per-source penalties given (perSourcePenalties), by what earned them.",
    ),
    audit_failures: Family::new(
        "containerssh_audit_failures_total",
        Kind::Counter,
        &[],
        "Audit recordings that could not be created or written (the sessions went on).",
    ),
    audit_dropped: Family::new(
        "containerssh_audit_dropped_bytes_total",
        Kind::Counter,
        &[],
        "Bytes left out of audit recordings that fell behind (a marker in each says how many).",
    ),
    pool_ready: Family::new(
        "containerssh_pool_ready_containers",
        Kind::Gauge,
        &[],
        "Warm-pool containers waiting for a login.",
    ),
    pool_logins: Family::new(
        "containerssh_pool_logins_total",
        Kind::Counter,
        &["result"],
        "Connection-mode logins of a backend with a warm pool: claimed a member, or started cold.",
    ),
    audit_upload_failures: Family::new(
        "containerssh_audit_upload_failures_total",
        Kind::Counter,
        &[],
        "Audit recording uploads to S3 that failed (each try; the recording stays staged).",
    ),
    bytes: Bytes {
        from_clients: AtomicU64::new(0),
        to_clients: AtomicU64::new(0),
    },
}
});

/// The process' metrics.
pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in [
            &self.connections,
            &self.current_connections,
            &self.handshakes_ok,
            &self.handshakes_failed,
            &self.auth_success,
            &self.auth_failures,
            &self.auth_server_requests,
            &self.auth_server_failures,
            &self.config_server_requests,
            &self.config_server_failures,
            &self.backend_requests,
            &self.backend_errors,
            &self.current_sessions,
            &self.backend_start,
            &self.refused,
            &self.penalties,
            &self.audit_failures,
            &self.audit_dropped,
            &self.audit_upload_failures,
            &self.pool_ready,
            &self.pool_logins,
        ] {
            f.render(&mut out);
        }
        self.bytes.render(&mut out);
        out
    }
}

/// Holds a gauge up while it lives (a connection, a session).
pub struct GaugeGuard {
    family: &'static Family,
    values: Vec<&'static str>,
}

impl GaugeGuard {
    pub fn new(family: &'static Family, values: Vec<&'static str>) -> Self {
        family.inc(&values);
        Self { family, values }
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.family.dec(&self.values);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_format() {
        let f = Family::new("x_total", Kind::Counter, &["a", "b"], "Help \\ me\nnow");
        f.inc(&["1", "q\"\\\n"]);
        f.add(&["1", "q\"\\\n"], 2.0);
        let mut out = String::new();
        f.render(&mut out);
        assert_eq!(
            out,
            "# HELP x_total Help \\\\ me\\nnow\n# TYPE x_total counter\nx_total{a=\"1\",b=\"q\\\"\\\\\\n\"} 3\n"
        );
        let h = Family::new("s_seconds", Kind::Histogram, &[], "h");
        h.observe(&[], Duration::from_millis(300));
        h.observe(&[], Duration::from_secs(500));
        let mut out = String::new();
        h.render(&mut out);
        assert!(out.contains("s_seconds_bucket{le=\"0.25\"} 0\n"), "{out}");
        assert!(out.contains("s_seconds_bucket{le=\"0.5\"} 1\n"), "{out}");
        assert!(out.contains("s_seconds_bucket{le=\"120\"} 1\n"), "{out}");
        assert!(out.contains("s_seconds_bucket{le=\"+Inf\"} 2\n"), "{out}");
        assert!(out.contains("s_seconds_sum 500.3\n"), "{out}");
        assert!(out.contains("s_seconds_count 2\n"), "{out}");
    }

    #[test]
    fn a_gauge_guard_gives_back() {
        static G: LazyLock<Family> = LazyLock::new(|| Family::new("g", Kind::Gauge, &[], "g"));
        let a = GaugeGuard::new(&G, vec![]);
        let b = GaugeGuard::new(&G, vec![]);
        assert_eq!(G.value(&[]), 2.0);
        drop((a, b));
        assert_eq!(G.value(&[]), 0.0);
    }
}
