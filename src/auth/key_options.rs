//! The options field of an `authorized_keys` line, parsed the way OpenSSH's
//! `auth-options.c` does it.
//!
//! ssh-key's `ConfigOpts` is not used: it splits the options from the key at
//! the first space even inside quotes, and toggles quoting on an escaped
//! `\"`, so `command="echo a, b"` or `command="say \"hi\""` would be mangled.

use std::net::IpAddr;

use super::authorized_keys::KeyOptions;

/// Everything an options field can say about one line.
#[derive(Debug, Default)]
pub(crate) struct LineOptions {
    pub(crate) granted: KeyOptions,
    pub(crate) from: Option<FromPatterns>,
    /// Last second (Unix time, UTC) at which the key is still accepted.
    pub(crate) expiry: Option<i64>,
    pub(crate) cert_authority: bool,
    pub(crate) no_touch_required: bool,
}

/// Why a line was rejected; shown in the operator-facing warning.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LineError {
    #[error("no valid public key")]
    InvalidKey,
    #[error("unsupported option {0:?}")]
    UnknownOption(String),
    #[error("option {0:?} needs a double-quoted value")]
    MissingValue(String),
    #[error("missing closing quote")]
    UnterminatedQuote,
    #[error("expected ',' between options")]
    MissingComma,
    #[error("option list ends with ','")]
    TrailingComma,
    #[error("more than one {0} option")]
    Duplicate(&'static str),
    #[error("environment value must be NAME=value with NAME of [A-Za-z0-9_]")]
    Environment,
    #[error("expiry-time must be YYYYMMDD[HHMM[SS]][Z]")]
    ExpiryTime,
    #[error("invalid from pattern: {0}")]
    From(&'static str),
}

/// Splits a line into its options field and the rest, at the first
/// whitespace outside double quotes (OpenSSH `sshkey_advance_past_options`).
pub(crate) fn split_options(line: &str) -> (&str, &str) {
    let bytes = line.as_bytes();
    let mut quoted = false;
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'\\' if bytes.get(i + 1) == Some(&b'"') => i += 1,
            b'"' => quoted = !quoted,
            b' ' | b'\t' if !quoted => break,
            _ => {}
        }
        i += 1;
    }
    let (opts, rest) = line.split_at(i.min(line.len()));
    (opts, rest.trim_start_matches([' ', '\t']))
}

pub(crate) fn parse(opts: &str) -> Result<LineOptions, LineError> {
    let mut out = LineOptions::default();
    let mut rest = opts;
    loop {
        let name_end = rest.find(['=', ',']).unwrap_or(rest.len());
        let (name, after) = rest.split_at(name_end);
        let (value, after) = match after.strip_prefix('=') {
            Some(quoted) => {
                let (value, after) = dequote(quoted, name)?;
                (Some(value), after)
            }
            None => (None, after),
        };
        apply(&mut out, name, value)?;
        if after.is_empty() {
            return Ok(out);
        }
        rest = after.strip_prefix(',').ok_or(LineError::MissingComma)?;
        if rest.is_empty() {
            return Err(LineError::TrailingComma);
        }
    }
}

/// OpenSSH `opt_dequote`: only `\"` is an escape; other backslashes are kept
/// literally so commands keep their shell escapes.
fn dequote<'a>(s: &'a str, name: &str) -> Result<(String, &'a str), LineError> {
    let body = s
        .strip_prefix('"')
        .ok_or_else(|| LineError::MissingValue(name.to_owned()))?;
    let mut value = String::new();
    let mut chars = body.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' if body[i + 1..].starts_with('"') => {
                value.push('"');
                chars.next();
            }
            '"' => return Ok((value, &body[i + 1..])),
            c => value.push(c),
        }
    }
    Err(LineError::UnterminatedQuote)
}

fn apply(out: &mut LineOptions, name: &str, value: Option<String>) -> Result<(), LineError> {
    let g = &mut out.granted;
    // Option names are case-insensitive in OpenSSH (`no-X11-forwarding`).
    match (name.to_ascii_lowercase().as_str(), value) {
        ("restrict", None) => {
            g.no_pty = true;
            g.no_port_forwarding = true;
            g.no_agent_forwarding = true;
            g.no_x11_forwarding = true;
        }
        ("pty", None) => g.no_pty = false,
        ("no-pty", None) => g.no_pty = true,
        ("port-forwarding", None) => g.no_port_forwarding = false,
        ("no-port-forwarding", None) => g.no_port_forwarding = true,
        ("agent-forwarding", None) => g.no_agent_forwarding = false,
        ("no-agent-forwarding", None) => g.no_agent_forwarding = true,
        ("x11-forwarding", None) => g.no_x11_forwarding = false,
        ("no-x11-forwarding", None) => g.no_x11_forwarding = true,
        // We never run ~/.ssh/rc, so these can be honoured by doing nothing;
        // rejecting them would break common `restrict`-style lines.
        ("user-rc" | "no-user-rc", None) => {}
        ("cert-authority", None) => out.cert_authority = true,
        ("no-touch-required", None) => out.no_touch_required = true,
        ("command", Some(v)) => {
            if g.command.replace(v).is_some() {
                return Err(LineError::Duplicate("command"));
            }
        }
        ("environment", Some(v)) => {
            let (var, val) = v.split_once('=').ok_or(LineError::Environment)?;
            if var.is_empty() || !var.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                return Err(LineError::Environment);
            }
            // OpenSSH keeps the first value given for a name.
            if !g.environment.iter().any(|(n, _)| n == var) {
                g.environment.push((var.to_owned(), val.to_owned()));
            }
        }
        ("from", Some(v)) => {
            if out.from.replace(FromPatterns::parse(&v)?).is_some() {
                return Err(LineError::Duplicate("from"));
            }
        }
        ("expiry-time", Some(v)) => {
            let t = parse_expiry(&v)?;
            // OpenSSH keeps the earliest of several expiry times.
            out.expiry = Some(out.expiry.map_or(t, |e| e.min(t)));
        }
        ("command" | "environment" | "from" | "expiry-time", None) => {
            return Err(LineError::MissingValue(name.to_owned()));
        }
        _ => return Err(LineError::UnknownOption(name.to_owned())),
    }
    Ok(())
}

/// Parses `YYYYMMDD[HHMM[SS]]` with an optional `Z`, always as UTC.
///
/// OpenSSH reads the value without `Z` as the server's local time; a
/// container host's zone is rarely meaningful, so UTC is used throughout.
fn parse_expiry(s: &str) -> Result<i64, LineError> {
    let digits = s.strip_suffix(['Z', 'z']).unwrap_or(s);
    if !matches!(digits.len(), 8 | 12 | 14) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(LineError::ExpiryTime);
    }
    let field = |from: usize, to: usize| -> i64 {
        digits
            .get(from..to)
            .and_then(|f| f.parse().ok())
            .unwrap_or(0)
    };
    let (year, month, day) = (field(0, 4), field(4, 6), field(6, 8));
    let (hour, minute, second) = (field(8, 10), field(10, 12), field(12, 14));
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let month_days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err(LineError::ExpiryTime),
    };
    if !(1..=month_days).contains(&day) || hour > 23 || minute > 59 || second > 59 {
        return Err(LineError::ExpiryTime);
    }
    Ok(days_from_civil(year, month, day) * 86_400 + hour * 3_600 + minute * 60 + second)
}

/// Days since 1970-01-01 in the proleptic Gregorian calendar (H. Hinnant's
/// `days_from_civil`), to avoid a date-time dependency for one conversion.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// A `from="..."` pattern list, matched against the client address only:
/// with no DNS lookups the host name OpenSSH would also try is the address.
#[derive(Debug)]
pub(crate) struct FromPatterns {
    text: String,
    entries: Vec<FromEntry>,
}

#[derive(Debug)]
struct FromEntry {
    negated: bool,
    pattern: Pattern,
}

#[derive(Debug)]
enum Pattern {
    Network(IpAddr, u32),
    Glob(String),
}

impl FromPatterns {
    pub(crate) fn parse(list: &str) -> Result<Self, LineError> {
        let mut entries = Vec::new();
        for item in list.split(',') {
            let (negated, body) = match item.strip_prefix('!') {
                Some(body) => (true, body),
                None => (false, item),
            };
            if body.is_empty() {
                return Err(LineError::From("empty entry"));
            }
            let pattern = match parse_network(body)? {
                Some((addr, len)) => Pattern::Network(addr, len),
                None => Pattern::Glob(body.to_owned()),
            };
            entries.push(FromEntry { negated, pattern });
        }
        Ok(Self {
            text: list.to_owned(),
            entries,
        })
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.text
    }

    /// A matching negated entry denies outright; otherwise any match allows.
    pub(crate) fn matches(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        let text = ip.to_string();
        let mut allowed = false;
        for entry in &self.entries {
            let hit = match &entry.pattern {
                Pattern::Network(net, len) => in_network(ip, *net, *len),
                Pattern::Glob(glob) => glob_match(glob.as_bytes(), text.as_bytes()),
            };
            if hit && entry.negated {
                return false;
            }
            allowed |= hit;
        }
        allowed
    }
}

/// Like OpenSSH `addr_pton_cidr`: `Ok(None)` when the entry is not an
/// address (so it is a wildcard pattern), an error when it is an address with
/// an impossible prefix or host bits set, since that is surely a typo.
fn parse_network(s: &str) -> Result<Option<(IpAddr, u32)>, LineError> {
    let (addr, len) = match s.split_once('/') {
        Some((addr, len)) => match len.parse::<u32>() {
            Ok(len) => (addr, Some(len)),
            Err(_) => return Ok(None),
        },
        None => (s, None),
    };
    let Ok(addr) = addr.parse::<IpAddr>() else {
        return Ok(None);
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len = len.unwrap_or(max);
    if len > max {
        return Err(LineError::From("prefix length out of range"));
    }
    if masked(addr, len) != addr {
        return Err(LineError::From("address has bits set beyond the prefix"));
    }
    Ok(Some((addr, len)))
}

fn masked(addr: IpAddr, len: u32) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            IpAddr::V4((u32::from(a) & mask).into())
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            IpAddr::V6((u128::from(a) & mask).into())
        }
    }
}

fn in_network(ip: IpAddr, net: IpAddr, len: u32) -> bool {
    ip.is_ipv4() == net.is_ipv4() && masked(ip, len) == net
}

/// Case-insensitive `*`/`?` wildcard match, iterative so a hostile pattern
/// cannot cause exponential backtracking.
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while let Some(&c) = text.get(t) {
        match pattern.get(p) {
            Some(b'*') => {
                backtrack = Some((p, t));
                p += 1;
            }
            Some(&pc) if pc == b'?' || pc.eq_ignore_ascii_case(&c) => {
                p += 1;
                t += 1;
            }
            _ => match backtrack {
                Some((star, from)) => {
                    p = star + 1;
                    t = from + 1;
                    backtrack = Some((star, from + 1));
                }
                None => return false,
            },
        }
    }
    pattern
        .get(p..)
        .unwrap_or_default()
        .iter()
        .all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn split_respects_quotes_and_escapes() {
        let line = r#"command="a \" b",from="x" ssh-ed25519 AAAA c"#;
        assert_eq!(
            split_options(line),
            (r#"command="a \" b",from="x""#, "ssh-ed25519 AAAA c")
        );
    }

    #[test]
    fn values_unescape_only_quotes() {
        let opts = parse(r#"command="printf \"%s\\n\" a,b",environment="P=a b,c""#)
            .expect("valid options");
        assert_eq!(
            opts.granted.command.as_deref(),
            Some(r#"printf "%s\\n" a,b"#)
        );
        assert_eq!(opts.granted.environment, [("P".into(), "a b,c".into())]);
    }

    #[test]
    fn malformed_option_lists_are_rejected() {
        let cases = [
            ("no-pty,", LineError::TrailingComma),
            ("command=ls", LineError::MissingValue("command".into())),
            ("command", LineError::MissingValue("command".into())),
            (r#"command="ls"#, LineError::UnterminatedQuote),
            (r#"command="ls"x"#, LineError::MissingComma),
            (
                r#"command="a",command="b""#,
                LineError::Duplicate("command"),
            ),
            (
                "permitopen=\"h:1\"",
                LineError::UnknownOption("permitopen".into()),
            ),
            ("no-pty=\"x\"", LineError::UnknownOption("no-pty".into())),
            (r#"environment="1A""#, LineError::Environment),
            (r#"environment="A-B=1""#, LineError::Environment),
            (
                r#"from="10.0.0.1/8""#,
                LineError::From("address has bits set beyond the prefix"),
            ),
            (
                r#"from="10.0.0.0/33""#,
                LineError::From("prefix length out of range"),
            ),
            (r#"from="a,,b""#, LineError::From("empty entry")),
        ];
        for (opts, want) in cases {
            assert_eq!(parse(opts).err(), Some(want), "{opts}");
        }
    }

    #[test]
    fn flags_are_case_insensitive_and_applied_in_order() {
        let opts = parse("No-X11-Forwarding,no-user-rc").expect("valid");
        assert!(opts.granted.no_x11_forwarding && !opts.granted.no_pty);
        let opts = parse("restrict,pty,port-forwarding").expect("valid");
        assert!(!opts.granted.no_pty && !opts.granted.no_port_forwarding);
        assert!(opts.granted.no_agent_forwarding && opts.granted.no_x11_forwarding);
        let opts = parse("pty,agent-forwarding,restrict").expect("valid");
        assert!(opts.granted.no_pty && opts.granted.no_agent_forwarding);
    }

    #[test]
    fn expiry_times_are_utc_seconds() {
        assert_eq!(parse_expiry("19700101"), Ok(0));
        assert_eq!(parse_expiry("20240101"), Ok(1_704_067_200));
        assert_eq!(parse_expiry("202402291230Z"), Ok(1_709_209_800));
        assert_eq!(parse_expiry("20240229123059"), Ok(1_709_209_859));
        for bad in [
            "2024010",
            "2024010112",
            "20230229",
            "20241301",
            "20240101246000",
            "2024-1-01",
        ] {
            assert_eq!(parse_expiry(bad), Err(LineError::ExpiryTime), "{bad}");
        }
        let opts = parse(r#"expiry-time="20300101",expiry-time="20250101""#).expect("valid");
        assert_eq!(opts.expiry, parse_expiry("20250101").ok());
    }

    #[test]
    fn from_patterns_match_cidr_globs_and_negation() {
        let p = FromPatterns::parse("10.0.0.0/8,!10.1.0.0/16,192.168.?.*,2001:DB8::/32,fe80::1")
            .expect("valid");
        for yes in [
            "10.2.3.4",
            "::ffff:10.2.3.4",
            "192.168.7.200",
            "2001:db8::5",
            "fe80::1",
        ] {
            assert!(p.matches(ip(yes)), "{yes}");
        }
        for no in [
            "10.1.2.3",
            "11.0.0.1",
            "192.168.10.1",
            "2001:db9::1",
            "fe80::2",
        ] {
            assert!(!p.matches(ip(no)), "{no}");
        }
        let p = FromPatterns::parse("!192.0.2.1,*").expect("valid");
        assert!(p.matches(ip("192.0.2.2")) && !p.matches(ip("192.0.2.1")));
        assert!(FromPatterns::parse("0.0.0.0/0")
            .expect("valid")
            .matches(ip("8.8.8.8")));
    }

    #[test]
    fn glob_handles_stars_without_blowup() {
        assert!(glob_match(b"a*b*c", b"axxbyyc"));
        assert!(!glob_match(b"a*b*c", b"axxbyy"));
        assert!(glob_match(b"*", b""));
        let text = [b'a'; 200];
        assert!(!glob_match(b"*a*a*a*a*a*a*a*a*b", &text));
    }
}
