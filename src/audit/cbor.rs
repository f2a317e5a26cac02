//! The part of CBOR (RFC 8949) that ContainerSSH's binary audit format uses: maps with text
//! keys, unsigned and negative integers, text, byte strings, booleans and null. The encoder
//! writes what Go's fxamacker/cbor writes for the same values (definite lengths, shortest
//! heads); the decoder reads any well-formed item of these kinds (floats and tags too) into
//! JSON, bounded in depth and in what one item may claim.

use base64::Engine as _;

/// A value to encode.
pub enum Item<'a> {
    Uint(u64),
    Text(&'a str),
    Bytes(&'a [u8]),
    Bool(bool),
    Null,
    Map(Vec<(&'static str, Item<'a>)>),
}

fn head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    if n < 24 {
        out.push(m | n as u8);
    } else if let Ok(b) = u8::try_from(n) {
        out.extend_from_slice(&[m | 24, b]);
    } else if let Ok(h) = u16::try_from(n) {
        out.push(m | 25);
        out.extend_from_slice(&h.to_be_bytes());
    } else if let Ok(w) = u32::try_from(n) {
        out.push(m | 26);
        out.extend_from_slice(&w.to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

impl Item<'_> {
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Item::Uint(n) => head(out, 0, *n),
            Item::Bytes(b) => {
                head(out, 2, b.len() as u64);
                out.extend_from_slice(b);
            }
            Item::Text(t) => {
                head(out, 3, t.len() as u64);
                out.extend_from_slice(t.as_bytes());
            }
            Item::Map(entries) => {
                head(out, 5, entries.len() as u64);
                for (k, v) in entries {
                    head(out, 3, k.len() as u64);
                    out.extend_from_slice(k.as_bytes());
                    v.encode(out);
                }
            }
            Item::Bool(false) => out.push(0xf4),
            Item::Bool(true) => out.push(0xf5),
            Item::Null => out.push(0xf6),
        }
    }
}

/// Nesting deeper than this is refused (the format nests three levels).
const MAX_DEPTH: usize = 32;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The item continues past the bytes given: read more and try again.
    #[error("the item is cut short")]
    Incomplete,
    #[error("not CBOR this decoder reads: {0}")]
    Invalid(&'static str),
}

struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], DecodeError> {
        let end = self.pos.checked_add(n).ok_or(DecodeError::Incomplete)?;
        let s = self.b.get(self.pos..end).ok_or(DecodeError::Incomplete)?;
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        Ok(u8::from_be_bytes(self.array::<1>()?))
    }

    /// The argument of a head whose low five bits are `info`.
    fn arg(&mut self, info: u8) -> Result<u64, DecodeError> {
        let n = match info {
            0..=23 => return Ok(u64::from(info)),
            24 => 1,
            25 => 2,
            26 => 4,
            27 => 8,
            31 => return Err(DecodeError::Invalid("indefinite lengths")),
            _ => return Err(DecodeError::Invalid("reserved head")),
        };
        let mut v = 0u64;
        for &b in self.take(n)? {
            v = (v << 8) | u64::from(b);
        }
        Ok(v)
    }

    /// A length that must fit in what is left (a claim past it is only "incomplete" when
    /// more bytes could still come).
    fn len(&mut self, info: u8) -> Result<usize, DecodeError> {
        usize::try_from(self.arg(info)?).map_err(|_| DecodeError::Invalid("length"))
    }

    fn item(&mut self, depth: usize) -> Result<serde_json::Value, DecodeError> {
        use serde_json::Value;
        if depth > MAX_DEPTH {
            return Err(DecodeError::Invalid("nested too deeply"));
        }
        let first = self.byte()?;
        let (major, info) = (first >> 5, first & 0x1f);
        Ok(match major {
            0 => Value::from(self.arg(info)?),
            1 => {
                let n = self.arg(info)?;
                match i64::try_from(n) {
                    Ok(n) => Value::from(-1 - n),
                    Err(_) => Value::from(-1.0 - n as f64),
                }
            }
            2 => {
                let n = self.len(info)?;
                Value::from(base64::engine::general_purpose::STANDARD.encode(self.take(n)?))
            }
            3 => {
                let n = self.len(info)?;
                let t = std::str::from_utf8(self.take(n)?)
                    .map_err(|_| DecodeError::Invalid("text is not UTF-8"))?;
                Value::from(t)
            }
            4 => {
                let n = self.len(info)?;
                // Grown as elements come (a claimed count is only a claim).
                let mut items = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    items.push(self.item(depth + 1)?);
                }
                Value::Array(items)
            }
            5 => {
                let n = self.len(info)?;
                let mut map = serde_json::Map::new();
                for _ in 0..n {
                    let key = match self.item(depth + 1)? {
                        Value::String(s) => s,
                        // A container as a key would be its JSON text, escaped again at each
                        // level of nesting: exponential in the depth (found by the fuzzer).
                        Value::Array(_) | Value::Object(_) => {
                            return Err(DecodeError::Invalid("map key is an array or a map"))
                        }
                        scalar => scalar.to_string(),
                    };
                    let value = self.item(depth + 1)?;
                    map.insert(key, value);
                }
                Value::Object(map)
            }
            6 => {
                // A tag: its content stands for it.
                self.arg(info)?;
                self.item(depth + 1)?
            }
            _ => match info {
                20 => Value::Bool(false),
                21 => Value::Bool(true),
                22 | 23 => Value::Null,
                25 => Value::from(f16(u16::from_be_bytes(self.array()?))),
                26 => Value::from(f64::from(f32::from_be_bytes(self.array()?))),
                27 => Value::from(f64::from_be_bytes(self.array()?)),
                _ => return Err(DecodeError::Invalid("simple value")),
            },
        })
    }
}

fn f16(h: u16) -> f64 {
    let exp = (h >> 10) & 0x1f;
    let mant = f64::from(h & 0x3ff);
    let v = match exp {
        0 => mant * 2f64.powi(-24),
        31 if mant == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        e => (1.0 + mant / 1024.0) * 2f64.powi(i32::from(e) - 15),
    };
    if h & 0x8000 != 0 {
        -v
    } else {
        v
    }
}

/// Decodes the first item of `b`: the value and how many bytes it took.
pub fn decode(b: &[u8]) -> Result<(serde_json::Value, usize), DecodeError> {
    let mut r = Reader { b, pos: 0 };
    let v = r.item(0)?;
    Ok((v, r.pos))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Maps as keys of maps, nested: refused at once, not stringified (whose escaping grew
    /// exponentially with the depth: a fuzzer timeout).
    #[test]
    fn maps_as_map_keys_are_refused() {
        // Maps of one pair, each the key of the one before.
        let mut b = vec![0xa1; 40];
        b.extend_from_slice(&[0x61, b'k', 0x01]);
        assert!(decode(&b).is_err());
        assert!(
            decode(&[0xa1, 0x01, 0x02]).is_ok(),
            "a number key stays a key"
        );
    }

    /// Byte for byte what RFC 8949's appendix A lists for these values.
    #[test]
    fn heads_are_the_shortest_form() {
        let enc = |i: Item| {
            let mut v = Vec::new();
            i.encode(&mut v);
            hex::encode(v)
        };
        assert_eq!(enc(Item::Uint(23)), "17");
        assert_eq!(enc(Item::Uint(24)), "1818");
        assert_eq!(enc(Item::Uint(1000)), "1903e8");
        assert_eq!(enc(Item::Uint(1_000_000)), "1a000f4240");
        assert_eq!(enc(Item::Uint(1_000_000_000_000)), "1b000000e8d4a51000");
        assert_eq!(enc(Item::Text("IETF")), "6449455446");
        assert_eq!(enc(Item::Bytes(&[1, 2, 3, 4])), "4401020304");
        assert_eq!(enc(Item::Null), "f6");
        assert_eq!(
            enc(Item::Map(vec![
                ("a", Item::Uint(1)),
                ("b", Item::Bool(true))
            ])),
            "a26161016162f5"
        );
    }

    #[test]
    fn what_is_encoded_decodes_and_cut_items_are_incomplete() {
        let mut v = Vec::new();
        Item::Map(vec![
            ("n", Item::Uint(u64::MAX)),
            ("b", Item::Bytes(b"hi")),
            ("t", Item::Text("☃")),
            ("z", Item::Null),
        ])
        .encode(&mut v);
        let (value, used) = decode(&v).unwrap();
        assert_eq!(used, v.len());
        assert_eq!(
            value,
            serde_json::json!({"n": u64::MAX, "b": "aGk=", "t": "☃", "z": null})
        );
        for cut in 0..v.len() {
            assert_eq!(decode(&v[..cut]), Err(DecodeError::Incomplete), "{cut}");
        }
        // RFC 8949 appendix A: -1000, 1.5 (half), 100000.0 (single), [1, [2, 3]].
        assert_eq!(decode(&hex::decode("3903e7").unwrap()).unwrap().0, -1000);
        assert_eq!(decode(&hex::decode("f93e00").unwrap()).unwrap().0, 1.5);
        assert_eq!(
            decode(&hex::decode("fa47c35000").unwrap()).unwrap().0,
            100000.0
        );
        assert_eq!(
            decode(&hex::decode("8201820203").unwrap()).unwrap().0,
            serde_json::json!([1, [2, 3]])
        );
        // A huge claimed array is cut short, not allocated.
        assert_eq!(
            decode(&hex::decode("9bffffffffffffffff").unwrap()),
            Err(DecodeError::Incomplete)
        );
        let deep = vec![0x81u8; 100];
        assert!(matches!(decode(&deep), Err(DecodeError::Invalid(_))));
    }
}
