//! `security.timeouts.idle` and `.session` for one session channel: when a limit is reached
//! the user is warned on the session's stderr, after `grace` the program gets the `signal`,
//! after another `grace` the channel is closed. Idleness is channel data in neither direction
//! (keepalives are not data); any data during the warning or after the signal starts the idle
//! clock again. The session limit cannot be reset. (`unusedConnection` is the connection's:
//! `ssh/connection.rs`.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::duration::format_go_duration;
use crate::config::validate::Timeouts;

/// When a channel last carried data.
pub struct Activity {
    base: Instant,
    /// Milliseconds since `base`.
    last: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            last: AtomicU64::new(0),
        }
    }
}

impl Activity {
    pub fn touch(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.fetch_max(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.base + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }
}

/// What the channel's task does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Write this line to the session's stderr.
    Warn(String),
    /// Send the configured signal to the program.
    Signal(String),
    /// Close the channel.
    Close(&'static str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Idle,
    Session,
}

enum Phase {
    Watching,
    Warned { kind: Kind, at: Instant },
    Signalled { kind: Kind, at: Instant },
}

/// The limits of one running session channel.
pub struct Enforcer {
    idle: Option<Duration>,
    /// When the session limit is reached.
    session_end: Option<Instant>,
    session: Option<Duration>,
    grace: Duration,
    signal: String,
    phase: Phase,
}

impl Enforcer {
    /// `None` when neither limit is set.
    pub fn new(t: &Timeouts, started: Instant) -> Option<Self> {
        if t.idle.is_none() && t.session.is_none() {
            return None;
        }
        Some(Self {
            idle: t.idle,
            session_end: t.session.map(|d| started + d),
            session: t.session,
            grace: t.grace,
            signal: t.signal.clone(),
            phase: Phase::Watching,
        })
    }

    fn warning(&self, kind: Kind) -> String {
        let grace = format_go_duration(self.grace);
        match kind {
            Kind::Idle => format!(
                "containerssh: idle for {}, closing in {grace}",
                format_go_duration(self.idle.unwrap_or_default())
            ),
            Kind::Session => format!(
                "containerssh: session time limit of {} reached, closing in {grace}",
                format_go_duration(self.session.unwrap_or_default())
            ),
        }
    }

    /// Waits for the next step. Cancel-safe: dropping it loses nothing, so it can sit in a
    /// `select!` loop.
    pub async fn next(&mut self, activity: &Activity) -> Step {
        loop {
            match self.phase {
                Phase::Watching => {
                    let idle_at = self.idle.map(|d| activity.last() + d);
                    let at = [idle_at, self.session_end].into_iter().flatten().min();
                    let Some(at) = at else {
                        return std::future::pending().await;
                    };
                    tokio::time::sleep_until(at).await;
                    let now = Instant::now();
                    let kind = if self.session_end.is_some_and(|end| end <= now) {
                        Kind::Session
                    } else if self.idle.is_some_and(|d| activity.last() + d <= now) {
                        Kind::Idle
                    } else {
                        continue; // there was data meanwhile
                    };
                    self.phase = Phase::Warned { kind, at: now };
                    return Step::Warn(self.warning(kind));
                }
                Phase::Warned { kind, at } | Phase::Signalled { kind, at } => {
                    tokio::time::sleep_until(at + self.grace).await;
                    if kind == Kind::Idle && activity.last() > at {
                        self.phase = Phase::Watching;
                        continue;
                    }
                    let now = Instant::now();
                    return match self.phase {
                        Phase::Warned { .. } => {
                            self.phase = Phase::Signalled { kind, at: now };
                            Step::Signal(self.signal.clone())
                        }
                        _ => {
                            self.phase = Phase::Watching;
                            Step::Close(match kind {
                                Kind::Idle => "security.timeouts.idle",
                                Kind::Session => "security.timeouts.session",
                            })
                        }
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(idle: Option<u64>, session: Option<u64>) -> Timeouts {
        Timeouts {
            idle: idle.map(Duration::from_secs),
            session: session.map(Duration::from_secs),
            unused_connection: None,
            grace: Duration::from_secs(10),
            signal: "HUP".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_warns_signals_then_closes() {
        let activity = Activity::default();
        let mut e = Enforcer::new(&limits(Some(60), None), Instant::now()).unwrap();
        let t = Instant::now();
        assert_eq!(
            e.next(&activity).await,
            Step::Warn("containerssh: idle for 1m0s, closing in 10s".into())
        );
        assert_eq!(t.elapsed(), Duration::from_secs(60));
        assert_eq!(e.next(&activity).await, Step::Signal("HUP".into()));
        assert_eq!(
            e.next(&activity).await,
            Step::Close("security.timeouts.idle")
        );
        assert_eq!(t.elapsed(), Duration::from_secs(80));
    }

    #[tokio::test(start_paused = true)]
    async fn data_resets_the_idle_clock_even_after_the_warning() {
        let activity = Activity::default();
        let mut e = Enforcer::new(&limits(Some(60), None), Instant::now()).unwrap();
        let t = Instant::now();
        assert!(matches!(e.next(&activity).await, Step::Warn(_)));
        tokio::time::sleep(Duration::from_secs(5)).await;
        activity.touch();
        // The next warning comes 60 s after that data, not a signal 10 s after the first.
        assert!(matches!(e.next(&activity).await, Step::Warn(_)));
        assert_eq!(t.elapsed(), Duration::from_secs(125));
    }

    #[tokio::test(start_paused = true)]
    async fn the_session_limit_is_not_reset_by_data() {
        let activity = Activity::default();
        let mut e = Enforcer::new(&limits(None, Some(30)), Instant::now()).unwrap();
        let t = Instant::now();
        let step = e.next(&activity).await;
        assert_eq!(
            step,
            Step::Warn("containerssh: session time limit of 30s reached, closing in 10s".into())
        );
        activity.touch();
        assert_eq!(e.next(&activity).await, Step::Signal("HUP".into()));
        activity.touch();
        assert_eq!(
            e.next(&activity).await,
            Step::Close("security.timeouts.session")
        );
        assert_eq!(t.elapsed(), Duration::from_secs(50));
    }

    #[test]
    fn no_limits_no_enforcer() {
        assert!(Enforcer::new(&limits(None, None), Instant::now()).is_none());
    }
}
