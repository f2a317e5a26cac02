//! Go-compatible durations: ContainerSSH writes `"60s"`, `"1m30s"`, `"500ms"` in YAML and integer
//! nanoseconds in JSON. Both forms are accepted everywhere.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A duration that (de)serializes the way Go's `time.Duration` does in ContainerSSH configs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct GoDuration(pub Duration);

impl GoDuration {
    pub const fn from_secs(secs: u64) -> Self {
        Self(Duration::from_secs(secs))
    }

    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }
}

/// Parses Go's `time.ParseDuration` syntax: a sequence of decimal numbers with units
/// `ns`, `us`/`µs`, `ms`, `s`, `m`, `h`. Negative durations are refused: no timeout in our
/// configuration has a meaning for them.
pub fn parse_go_duration(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err("empty duration".into());
    }
    if s.starts_with('-') {
        return Err(format!("negative duration {text:?}"));
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    let mut rest = s;
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("missing unit in duration {text:?}"))?;
        let (num, after) = rest.split_at(num_len);
        if num.is_empty() {
            return Err(format!("invalid duration {text:?}"));
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" | "μs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return Err(format!("unknown unit {unit:?} in duration {text:?}")),
        };
        let (int_part, frac_part) = num.split_once('.').unwrap_or((num, ""));
        if int_part.is_empty() && frac_part.is_empty() {
            return Err(format!("invalid duration {text:?}"));
        }
        let int: u128 = if int_part.is_empty() {
            0
        } else {
            int_part
                .parse()
                .map_err(|_| format!("invalid number in duration {text:?}"))?
        };
        let mut value = int
            .checked_mul(unit_nanos)
            .ok_or_else(|| format!("duration {text:?} overflows"))?;
        let mut scale = unit_nanos;
        for digit in frac_part.chars() {
            let d = digit
                .to_digit(10)
                .ok_or_else(|| format!("invalid number in duration {text:?}"))?;
            scale /= 10;
            value = value
                .checked_add(u128::from(d) * scale)
                .ok_or_else(|| format!("duration {text:?} overflows"))?;
        }
        total_nanos = total_nanos
            .checked_add(value)
            .ok_or_else(|| format!("duration {text:?} overflows"))?;
        rest = next;
    }
    let nanos = u64::try_from(total_nanos).map_err(|_| format!("duration {text:?} overflows"))?;
    Ok(Duration::from_nanos(nanos))
}

/// Formats like Go's `Duration.String()` for the common whole-unit cases (`1m30s`, `500ms`).
pub fn format_go_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    if d.subsec_nanos() != 0 && d.as_secs() == 0 {
        let nanos = d.subsec_nanos();
        return if nanos.is_multiple_of(1_000_000) {
            format!("{}ms", nanos / 1_000_000)
        } else {
            format!("{nanos}ns")
        };
    }
    let mut secs = d.as_secs();
    let mut out = String::new();
    if secs >= 3600 {
        out.push_str(&format!("{}h", secs / 3600));
        secs %= 3600;
    }
    // As Go: once a larger unit is written, the smaller ones follow even when zero.
    if secs >= 60 || !out.is_empty() {
        out.push_str(&format!("{}m", secs / 60));
        secs %= 60;
    }
    let nanos = d.subsec_nanos();
    if nanos != 0 {
        out.push_str(format!("{secs}.{nanos:09}").trim_end_matches('0'));
        out.push('s');
    } else {
        out.push_str(&format!("{secs}s"));
    }
    out
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format_go_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = GoDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as \"60s\" or an integer number of nanoseconds")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<GoDuration, E> {
                Ok(GoDuration(Duration::from_nanos(v)))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<GoDuration, E> {
                u64::try_from(v)
                    .map(|n| GoDuration(Duration::from_nanos(n)))
                    .map_err(|_| E::custom("negative duration"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<GoDuration, E> {
                parse_go_duration(v).map(GoDuration).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_forms() {
        assert_eq!(parse_go_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_go_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(
            parse_go_duration("1.5s").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(
            parse_go_duration("500ms").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(parse_go_duration("2h").unwrap(), Duration::from_secs(7200));
        assert_eq!(parse_go_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_go_duration("10").is_err());
        assert!(parse_go_duration("-1s").is_err());
        assert!(parse_go_duration("1x").is_err());
        assert!(parse_go_duration("").is_err());
        // Found by fuzzing: a fraction on top of a near-maximal whole part.
        assert!(parse_go_duration("94522879700260684295381835.9h").is_err());
    }

    #[test]
    fn integers_are_nanoseconds() {
        let d: GoDuration = serde_yaml::from_str("60000000000").unwrap();
        assert_eq!(d.0, Duration::from_secs(60));
        let d: GoDuration = serde_json::from_str("\"2s\"").unwrap();
        assert_eq!(d.0, Duration::from_secs(2));
    }

    #[test]
    fn formats_round_trip() {
        for s in ["60s", "1m30s", "500ms", "2h0m5s", "0s"] {
            let d = parse_go_duration(s).unwrap();
            assert_eq!(parse_go_duration(&format_go_duration(d)).unwrap(), d, "{s}");
        }
    }
}
