//! OpenSSH 9.8's per-source penalties: each way a connection can end badly adds time to its
//! source's penalty; once a source has more than `min` ahead of it, its connections are refused
//! at accept until the penalty runs out. The table is bounded: past [`MAX_PENALISED_SOURCES`]
//! the entries closest to expiry go, so a spray of addresses cannot grow memory.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use tokio::time::Instant;

use super::cidr::Source;
use crate::limits::MAX_PENALISED_SOURCES;

/// How a connection ended, for the penalty it earns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Penalty {
    /// The connection's task panicked.
    Crash,
    /// Authentication was attempted and failed.
    AuthFail,
    /// The client left without attempting authentication.
    NoAuth,
    /// The handshake deadline or the login grace time ran out.
    GraceExceeded,
    /// We refused the connection on purpose (a PROXY header from an untrusted peer).
    RefuseConnection,
}

impl Penalty {
    pub fn name(self) -> &'static str {
        match self {
            Penalty::Crash => "crash",
            Penalty::AuthFail => "authfail",
            Penalty::NoAuth => "noauth",
            Penalty::GraceExceeded => "graceExceeded",
            Penalty::RefuseConnection => "refuseConnection",
        }
    }
}

/// The checked `ssh.perSourcePenalties`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PenaltyRules {
    pub crash: Duration,
    pub authfail: Duration,
    pub noauth: Duration,
    pub grace_exceeded: Duration,
    pub refuse_connection: Duration,
    pub min: Duration,
    pub max: Duration,
}

impl From<&crate::config::model::PenaltiesConfig> for PenaltyRules {
    fn from(c: &crate::config::model::PenaltiesConfig) -> Self {
        Self {
            crash: c.crash.0,
            authfail: c.authfail.0,
            noauth: c.noauth.0,
            grace_exceeded: c.grace_exceeded.0,
            refuse_connection: c.refuse_connection.0,
            min: c.min.0,
            max: c.max.0,
        }
    }
}

impl PenaltyRules {
    fn duration(&self, p: Penalty) -> Duration {
        match p {
            Penalty::Crash => self.crash,
            Penalty::AuthFail => self.authfail,
            Penalty::NoAuth => self.noauth,
            Penalty::GraceExceeded => self.grace_exceeded,
            Penalty::RefuseConnection => self.refuse_connection,
        }
    }
}

#[derive(Debug)]
struct Entry {
    expiry: Instant,
    active: bool,
    /// The latest penalty, for the log.
    last: Penalty,
    /// Refusals not yet logged, and until when the next one stays quiet (once per period).
    unlogged: u64,
    quiet_until: Option<Instant>,
}

/// What [`PenaltyBox::check`] found.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub last: Penalty,
    pub remaining: Duration,
    /// `Some(n)`: log this refusal, which stands for `n` refusals (the ones kept quiet since
    /// the last line plus this one); `None`: stay quiet.
    pub log: Option<u64>,
}

#[derive(Debug)]
pub struct PenaltyBox {
    rules: PenaltyRules,
    entries: HashMap<Source, Entry>,
    /// The same entries by expiry, soonest first: expiry and eviction without a scan.
    by_expiry: BTreeSet<(Instant, Source)>,
    capacity: usize,
}

impl PenaltyBox {
    pub fn new(rules: PenaltyRules) -> Self {
        Self::with_capacity(rules, MAX_PENALISED_SOURCES)
    }

    fn with_capacity(rules: PenaltyRules, capacity: usize) -> Self {
        Self {
            rules,
            entries: HashMap::new(),
            by_expiry: BTreeSet::new(),
            capacity,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(at, src)) = self.by_expiry.first() {
            if at > now {
                break;
            }
            self.by_expiry.pop_first();
            self.entries.remove(&src);
        }
    }

    /// Adds `p`'s time to `src`'s penalty (OpenSSH `srclimit_penalise`): a new entry lasts the
    /// penalty's time, an existing one grows by it, both capped at `max`; the entry is enforced
    /// once more than `min` remains. Returns whether this made it enforced.
    pub fn penalise(&mut self, src: Source, p: Penalty, now: Instant) -> bool {
        let add = self.rules.duration(p);
        if add.is_zero() {
            return false;
        }
        self.expire(now);
        let cap = now + self.rules.max;
        if let Some(e) = self.entries.get_mut(&src) {
            self.by_expiry.remove(&(e.expiry, src));
            e.expiry = (e.expiry + add).min(cap);
            e.last = p;
            self.by_expiry.insert((e.expiry, src));
            if !e.active && e.expiry.saturating_duration_since(now) > self.rules.min {
                e.active = true;
                return true;
            }
            return false;
        }
        if self.entries.len() >= self.capacity {
            if let Some((_, old)) = self.by_expiry.pop_first() {
                self.entries.remove(&old);
            }
        }
        let expiry = (now + add).min(cap);
        let active = add > self.rules.min;
        self.entries.insert(
            src,
            Entry {
                expiry,
                active,
                last: p,
                unlogged: 0,
                quiet_until: None,
            },
        );
        self.by_expiry.insert((expiry, src));
        active
    }

    /// Whether `src` is refused now (OpenSSH `srclimit_penalty_check_allow`).
    pub fn check(&mut self, src: Source, now: Instant) -> Option<Refused> {
        self.expire(now);
        let e = self.entries.get_mut(&src).filter(|e| e.active)?;
        e.unlogged += 1;
        let log = match e.quiet_until {
            Some(t) if now < t => None,
            _ => {
                e.quiet_until = Some(e.expiry);
                Some(std::mem::take(&mut e.unlogged))
            }
        };
        Some(Refused {
            last: e.last,
            remaining: e.expiry.saturating_duration_since(now),
            log,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::front::cidr::NetBlock;

    /// OpenSSH 9.9's defaults, which are ours.
    fn rules() -> PenaltyRules {
        PenaltyRules::from(&crate::config::defaults::penalties())
    }

    fn src(n: u32) -> Source {
        NetBlock { v4: 32, v6: 128 }.source(std::net::IpAddr::V4(n.into()))
    }

    #[test]
    fn penalties_accumulate_and_are_enforced_above_min() {
        let mut b = PenaltyBox::new(rules());
        let t = Instant::now();
        let a = src(1);
        assert!(!b.penalise(a, Penalty::AuthFail, t));
        assert!(!b.penalise(a, Penalty::AuthFail, t));
        assert!(b.check(a, t).is_none(), "10s is not above min");
        assert!(!b.penalise(a, Penalty::AuthFail, t), "15s is not above 15s");
        assert!(b.penalise(a, Penalty::NoAuth, t), "16s is");
        let r = b.check(a, t).expect("refused");
        assert_eq!(r.last, Penalty::NoAuth);
        assert_eq!(r.remaining, Duration::from_secs(16));
        assert_eq!(r.log, Some(1), "the first refusal is logged");
        assert_eq!(
            b.check(a, t).unwrap().log,
            None,
            "then quiet for the period"
        );
        assert!(
            b.check(src(2), t).is_none(),
            "another source is not affected"
        );
        // The penalty runs out, and the entry goes with it.
        assert!(b.check(a, t + Duration::from_secs(16)).is_none());
        assert!(b.is_empty());
    }

    #[test]
    fn one_large_penalty_is_enforced_at_once_and_capped_at_max() {
        let mut b = PenaltyBox::new(rules());
        let t = Instant::now();
        assert!(b.penalise(src(1), Penalty::Crash, t));
        for _ in 0..20 {
            b.penalise(src(1), Penalty::Crash, t);
        }
        let r = b.check(src(1), t).unwrap();
        assert_eq!(r.remaining, Duration::from_secs(600));
        // The quiet period ends with the penalty; a refusal after it is logged with the count.
        let later = t + Duration::from_secs(601);
        assert!(b.check(src(1), later).is_none());
    }

    #[test]
    fn the_table_is_bounded_and_drops_the_soonest_to_expire() {
        let mut b = PenaltyBox::with_capacity(rules(), 3);
        let t = Instant::now();
        b.penalise(src(1), Penalty::Crash, t); // 90s
        b.penalise(src(2), Penalty::NoAuth, t); // 1s: the first to go
        b.penalise(src(3), Penalty::Crash, t);
        b.penalise(src(4), Penalty::Crash, t);
        assert_eq!(b.len(), 3);
        assert!(b.check(src(1), t).is_some());
        assert!(b.check(src(4), t).is_some());
        for n in 10..10_000 {
            b.penalise(src(n), Penalty::Crash, t);
        }
        assert_eq!(b.len(), 3, "a spray of addresses does not grow the table");
    }

    #[test]
    fn zero_durations_record_nothing() {
        let mut r = rules();
        r.noauth = Duration::ZERO;
        let mut b = PenaltyBox::new(r);
        assert!(!b.penalise(src(1), Penalty::NoAuth, Instant::now()));
        assert!(b.is_empty());
    }
}
