//! The front door: what decides, between `accept` and a successful login, whether a connection
//! is served at all. OpenSSH 9.8's semantics under its names (camelCase, under `ssh:`):
//!
//! - `maxStartups` `start:rate:full`: with `start` or more unauthenticated connections, new
//!   ones are refused at random with a probability rising from `rate` % to 100 % at `full`;
//!   at `full` every new one is refused. One difference, on purpose: a source with no
//!   unauthenticated connection of its own is refused only at `full`, never at random, so a
//!   few busy sources cannot turn everyone else's login into a lottery.
//! - `perSourceMaxStartups`: unauthenticated connections per source (net block).
//! - `perSourcePenalties`: see [`penalty`]; a penalised source is refused before any crypto.
//!
//! Every table here is bounded: the startup counts hold only sources with a connection in
//! progress (at most `full` of them), the penalties at most
//! [`crate::limits::MAX_PENALISED_SOURCES`].

pub mod cidr;
pub mod penalty;
pub mod proxy;
pub mod quickack;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use cidr::{Cidr, NetBlock, Source};
use penalty::{Penalty, PenaltyBox, PenaltyRules};

/// Refusals for the startup limits are logged at most this often, with a count of the rest.
const STARTUP_REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// The line OpenSSH writes before closing a connection refused for a penalty.
pub const PENALTY_REFUSAL: &[u8] = b"Not allowed at this time\r\n";
/// The line OpenSSH writes before closing a connection refused by MaxStartups.
pub const STARTUPS_REFUSAL: &[u8] = b"Exceeded MaxStartups\r\n";

/// OpenSSH's MaxStartups `start:rate:full`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxStartups {
    pub start: u32,
    pub rate: u32,
    pub full: u32,
}

impl MaxStartups {
    /// `start:rate:full`, or one number `n` (= `n:100:n`, a hard limit), as in sshd_config.
    pub fn parse(text: &str) -> Result<Self, String> {
        let num = |s: &str| {
            s.trim()
                .parse::<u32>()
                .map_err(|_| format!("{text:?}: expected start:rate:full or a number"))
        };
        let parts: Vec<&str> = text.split(':').collect();
        let m = match parts.as_slice() {
            [n] => {
                let n = num(n)?;
                Self {
                    start: n,
                    rate: 100,
                    full: n,
                }
            }
            [s, r, f] => Self {
                start: num(s)?,
                rate: num(r)?,
                full: num(f)?,
            },
            _ => return Err(format!("{text:?}: expected start:rate:full or a number")),
        };
        if m.full == 0 || m.start > m.full || m.rate > 100 {
            return Err(format!(
                "{text:?}: needs 0 < full, start <= full and rate <= 100"
            ));
        }
        Ok(m)
    }

    /// Whether a connection arriving while `pending` are unauthenticated is refused (OpenSSH
    /// `drop_connection`); `roll` is uniform in 0..100.
    fn refuses(&self, pending: u32, roll: u32) -> bool {
        if pending >= self.full {
            return true;
        }
        if pending < self.start {
            return false;
        }
        // `start == full` leaves no span: refused from there on.
        let p = ((100 - self.rate) * (pending - self.start))
            .checked_div(self.full - self.start)
            .map_or(100, |rise| self.rate + rise);
        roll < p
    }
}

/// The checked front-door settings (from `ssh:`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DoorRules {
    pub max_startups: MaxStartups,
    pub per_source: Option<u32>,
    pub net_block: NetBlock,
    pub penalties: Option<PenaltyRules>,
    /// Never penalised (they still count towards the startup limits).
    pub exempt: Vec<Cidr>,
}

/// Why a connection was turned away at the door.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    Penalised { last: Penalty, remaining: Duration },
    PerSource { limit: u32 },
    Full { pending: u32 },
    Early { pending: u32 },
}

impl Refusal {
    /// Its name, as metrics label it.
    pub fn name(&self) -> &'static str {
        match self {
            Refusal::Penalised { .. } => "penalised",
            Refusal::PerSource { .. } => "perSourceMaxStartups",
            Refusal::Full { .. } => "maxStartupsFull",
            Refusal::Early { .. } => "maxStartups",
        }
    }

    /// What the client reads before the close (the lines OpenSSH sends, which auditors know).
    pub fn line(&self) -> &'static [u8] {
        match self {
            Refusal::Penalised { .. } => PENALTY_REFUSAL,
            _ => STARTUPS_REFUSAL,
        }
    }
}

/// A refusal and whether to log it: `Some(n)` stands for `n` refusals (this one and those kept
/// quiet before it), `None` is one of those kept quiet.
#[derive(Debug)]
pub struct Refused {
    pub why: Refusal,
    pub log: Option<u64>,
}

#[derive(Debug, Default)]
struct Quiet {
    until: Option<Instant>,
    unlogged: u64,
}

impl Quiet {
    fn tick(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        match self.until {
            Some(t) if now < t => None,
            _ => {
                self.until = Some(now + STARTUP_REFUSAL_LOG_INTERVAL);
                Some(std::mem::take(&mut self.unlogged))
            }
        }
    }
}

#[derive(Debug)]
struct State {
    pending: u32,
    per_source: HashMap<Source, u32>,
    penalties: Option<PenaltyBox>,
    quiet: Quiet,
}

/// The shared front door of one listener.
#[derive(Debug)]
pub struct Door {
    rules: DoorRules,
    state: Mutex<State>,
}

/// An admitted connection's place among the unauthenticated ones; given back on drop (the
/// login succeeded or the connection ended).
#[derive(Debug)]
pub struct Startup {
    door: Arc<Door>,
    source: Source,
}

impl Drop for Startup {
    fn drop(&mut self) {
        let mut st = self.door.lock();
        st.pending = st.pending.saturating_sub(1);
        if let Some(n) = st.per_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                st.per_source.remove(&self.source);
            }
        }
    }
}

impl Door {
    pub fn new(rules: DoorRules) -> Arc<Self> {
        let penalties = rules.penalties.map(PenaltyBox::new);
        Arc::new(Self {
            rules,
            state: Mutex::new(State {
                pending: 0,
                per_source: HashMap::new(),
                penalties,
                quiet: Quiet::default(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn source(&self, ip: IpAddr) -> Source {
        self.rules.net_block.source(ip)
    }

    /// Decides on a connection from `ip` before anything is read from it or sent to it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Startup, Refused> {
        self.admit_at(ip, Instant::now(), roll())
    }

    fn admit_at(self: &Arc<Self>, ip: IpAddr, now: Instant, roll: u32) -> Result<Startup, Refused> {
        let source = self.source(ip);
        // As OpenSSH: an exempt address is never refused for a penalty, even one its net block
        // earned.
        let exempt = cidr::any_contains(&self.rules.exempt, ip);
        let mut st = self.lock();
        let penalised = if exempt {
            None
        } else {
            st.penalties.as_mut().and_then(|b| b.check(source, now))
        };
        if let Some(r) = penalised {
            return Err(Refused {
                why: Refusal::Penalised {
                    last: r.last,
                    remaining: r.remaining,
                },
                log: r.log,
            });
        }
        let mine = st.per_source.get(&source).copied().unwrap_or(0);
        let why = match self.rules.per_source {
            Some(limit) if mine >= limit => Some(Refusal::PerSource { limit }),
            _ => {
                let pending = st.pending;
                let m = self.rules.max_startups;
                if pending >= m.full {
                    Some(Refusal::Full { pending })
                } else if mine > 0 && m.refuses(pending, roll) {
                    Some(Refusal::Early { pending })
                } else {
                    None
                }
            }
        };
        if let Some(why) = why {
            let log = st.quiet.tick(now);
            return Err(Refused { why, log });
        }
        st.pending += 1;
        *st.per_source.entry(source).or_insert(0) += 1;
        drop(st);
        Ok(Startup {
            door: Arc::clone(self),
            source,
        })
    }

    /// Records how a connection from `ip` ended badly. Returns whether the source is refused
    /// from now on (its penalty just went above `min`).
    pub fn penalise(&self, ip: IpAddr, p: Penalty) -> bool {
        if cidr::any_contains(&self.rules.exempt, ip) {
            return false;
        }
        let source = self.source(ip);
        let mut st = self.lock();
        match st.penalties.as_mut() {
            Some(b) => {
                crate::metrics::get().penalties.inc(&[p.name()]);
                b.penalise(source, p, Instant::now())
            }
            None => false,
        }
    }

    /// Unauthenticated connections admitted and not yet done.
    pub fn pending(&self) -> u32 {
        self.lock().pending
    }
}

/// Uniform in 0..100.
fn roll() -> u32 {
    getrandom::u32().unwrap_or(0) % 100
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(max: &str, per_source: Option<u32>) -> DoorRules {
        DoorRules {
            max_startups: MaxStartups::parse(max).unwrap(),
            per_source,
            net_block: NetBlock::parse("32:128").unwrap(),
            penalties: Some(PenaltyRules::from(&crate::config::defaults::penalties())),
            exempt: vec![Cidr::parse("192.0.2.0/24").unwrap()],
        }
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4([127, 0, 0, n].into())
    }

    #[test]
    fn max_startups_parses_like_sshd() {
        assert_eq!(
            MaxStartups::parse("10:30:100").unwrap(),
            MaxStartups {
                start: 10,
                rate: 30,
                full: 100
            }
        );
        assert_eq!(
            MaxStartups::parse("50").unwrap(),
            MaxStartups {
                start: 50,
                rate: 100,
                full: 50
            }
        );
        for bad in ["", "0", "10:30", "20:30:10", "10:101:100", "a:b:c"] {
            assert!(MaxStartups::parse(bad).is_err(), "{bad}");
        }
        let m = MaxStartups::parse("10:30:100").unwrap();
        assert!(!m.refuses(9, 0));
        assert!(m.refuses(10, 29) && !m.refuses(10, 30), "30 % at start");
        assert!(m.refuses(55, 64) && !m.refuses(55, 65), "65 % half way");
        assert!(m.refuses(100, 99));
    }

    #[test]
    fn one_source_is_held_to_its_share() {
        let door = Door::new(rules("100:30:200", Some(3)));
        let t = Instant::now();
        let held: Vec<_> = (0..3)
            .map(|_| door.admit_at(ip(2), t, 0).unwrap())
            .collect();
        let r = door.admit_at(ip(2), t, 99).unwrap_err();
        assert_eq!(r.why, Refusal::PerSource { limit: 3 });
        assert_eq!(r.log, Some(1));
        assert_eq!(door.admit_at(ip(2), t, 99).unwrap_err().log, None, "quiet");
        assert!(door.admit_at(ip(1), t, 0).is_ok(), "others get in");
        drop(held);
        assert_eq!(door.pending(), 0);
        assert!(door.admit_at(ip(2), t, 0).is_ok(), "places are given back");
    }

    #[test]
    fn random_refusal_spares_a_sources_first_connection() {
        let door = Door::new(rules("2:100:10", None));
        let t = Instant::now();
        let _a: Vec<_> = (0..5).map(|_| door.admit_at(ip(2), t, 99)).collect();
        // 2 admitted below start; from then on ip(2)'s extra connections always lose the roll.
        assert_eq!(door.pending(), 2);
        let first = door.admit_at(ip(1), t, 0).expect("a new source gets in");
        assert!(matches!(
            door.admit_at(ip(1), t, 0).unwrap_err().why,
            Refusal::Early { .. }
        ));
        drop(first);
        let _b: Vec<_> = (3..11)
            .map(|n| door.admit_at(ip(n), t, 0).unwrap())
            .collect();
        assert_eq!(door.pending(), 10);
        assert!(matches!(
            door.admit_at(ip(20), t, 0).unwrap_err().why,
            Refusal::Full { pending: 10 }
        ));
    }

    #[test]
    fn penalised_sources_are_refused_and_exempt_ones_never() {
        let door = Door::new(rules("10:30:100", Some(10)));
        for _ in 0..3 {
            assert!(!door.penalise(ip(4), Penalty::AuthFail));
        }
        assert!(door.penalise(ip(4), Penalty::AuthFail), "20s > 15s");
        let r = door.admit(ip(4)).unwrap_err();
        assert!(matches!(
            r.why,
            Refusal::Penalised {
                last: Penalty::AuthFail,
                ..
            }
        ));
        assert_eq!(r.why.line(), PENALTY_REFUSAL);
        assert!(door.admit(ip(5)).is_ok());
        let exempt = IpAddr::V4([192, 0, 2, 9].into());
        for _ in 0..10 {
            assert!(!door.penalise(exempt, Penalty::Crash));
        }
        assert!(door.admit(exempt).is_ok());
    }

    #[test]
    fn an_exempt_address_is_let_in_although_its_net_block_is_penalised() {
        let mut r = rules("10:30:100", None);
        r.net_block = NetBlock::parse("24:64").unwrap();
        let door = Door::new(r);
        let (bad, exempt) = (ip(4), IpAddr::V4([127, 0, 0, 9].into()));
        door.penalise(bad, Penalty::Crash);
        assert!(door.admit(ip(7)).is_err(), "the whole /24 is penalised");
        let door = {
            let mut r = rules("10:30:100", None);
            r.net_block = NetBlock::parse("24:64").unwrap();
            r.exempt = vec![Cidr::parse("127.0.0.9").unwrap()];
            Door::new(r)
        };
        door.penalise(bad, Penalty::Crash);
        assert!(door.admit(exempt).is_ok());
        assert!(door.admit(ip(7)).is_err());
    }

    #[test]
    fn without_penalties_nothing_is_recorded() {
        let mut r = rules("10:30:100", None);
        r.penalties = None;
        let door = Door::new(r);
        for _ in 0..10 {
            assert!(!door.penalise(ip(4), Penalty::Crash));
        }
        assert!(door.admit(ip(4)).is_ok());
    }
}
