//! A MessagePack reader for the one frame shape the tool reads most: [`Incoming`].
//!
//! At 20,000 leads/s the tool reads about 150,000 stream events a second, each a map
//! carrying a lead summary (description, details, location) the tool never looks at.
//! Decoding them through serde validated every skipped string as UTF-8 and walked
//! every skipped value through the visitor machinery: together about 15 % of the tool's
//! CPU, taken from the same cores as the daemon under test. This reader walks the map,
//! keeps the handful of fields [`Incoming`] holds (borrowed, validated) and jumps over
//! everything else by its length prefix without looking inside.
//!
//! It reads these fields as the serde path does (`rmp_serde` with `Incoming`'s derive;
//! the tests compare both on random maps): a map with string keys, `type` a string, `id`/`code` strings
//! or nil, `seq` an unsigned integer or nil, `event` a map or nil; unknown keys ignored
//! (serde would also take a struct written as an array of its fields; no daemon frame
//! is one, and this reader refuses it);
//! a malformed or truncated frame is an error, never a panic. The tests check both
//! paths agree.

use crate::wire::{EventPart, Incoming};
use serde::de::IgnoredAny;
use std::borrow::Cow;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScanError {
    #[error("frame ends inside a value")]
    Truncated,
    #[error("expected {0}")]
    Unexpected(&'static str),
    #[error("a string is not UTF-8")]
    Utf8,
    #[error("missing field `{0}`")]
    Missing(&'static str),
    #[error("nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// Nesting bound of skipped values (the daemon's frames nest 4 deep).
const MAX_DEPTH: usize = 64;

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> Result<u8, ScanError> {
        let v = *self.b.get(self.at).ok_or(ScanError::Truncated)?;
        self.at += 1;
        Ok(v)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ScanError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len()).ok_or(ScanError::Truncated)?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn be(&mut self, n: usize) -> Result<u64, ScanError> {
        Ok(self.take(n)?.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)))
    }

    fn peek(&self) -> Result<u8, ScanError> {
        self.b.get(self.at).copied().ok_or(ScanError::Truncated)
    }

    /// A map header's entry count.
    fn map_len(&mut self) -> Result<u64, ScanError> {
        match self.byte()? {
            m @ 0x80..=0x8f => Ok(u64::from(m & 0x0f)),
            0xde => self.be(2),
            0xdf => self.be(4),
            _ => Err(ScanError::Unexpected("a map")),
        }
    }

    /// An array header's element count.
    fn array_len(&mut self) -> Result<u64, ScanError> {
        match self.byte()? {
            m @ 0x90..=0x9f => Ok(u64::from(m & 0x0f)),
            0xdc => self.be(2),
            0xdd => self.be(4),
            _ => Err(ScanError::Unexpected("an array")),
        }
    }

    /// A string's bytes, if the next value is a string.
    fn str_bytes(&mut self) -> Result<&'a [u8], ScanError> {
        let n = match self.byte()? {
            m @ 0xa0..=0xbf => u64::from(m & 0x1f),
            0xd9 => self.be(1)?,
            0xda => self.be(2)?,
            0xdb => self.be(4)?,
            _ => return Err(ScanError::Unexpected("a string")),
        };
        self.take(usize::try_from(n).map_err(|_| ScanError::Truncated)?)
    }

    fn str(&mut self) -> Result<&'a str, ScanError> {
        std::str::from_utf8(self.str_bytes()?).map_err(|_| ScanError::Utf8)
    }

    fn opt_str(&mut self) -> Result<Option<&'a str>, ScanError> {
        if self.peek()? == 0xc0 {
            self.at += 1;
            return Ok(None);
        }
        self.str().map(Some)
    }

    fn opt_u64(&mut self) -> Result<Option<u64>, ScanError> {
        match self.byte()? {
            0xc0 => Ok(None),
            m @ 0x00..=0x7f => Ok(Some(u64::from(m))),
            0xcc => self.be(1).map(Some),
            0xcd => self.be(2).map(Some),
            0xce => self.be(4).map(Some),
            0xcf => self.be(8).map(Some),
            // Signed encodings of non-negative values are accepted, as serde does.
            0xd0 => self.signed(1),
            0xd1 => self.signed(2),
            0xd2 => self.signed(4),
            0xd3 => self.signed(8),
            _ => Err(ScanError::Unexpected("an unsigned integer")),
        }
    }

    fn signed(&mut self, n: usize) -> Result<Option<u64>, ScanError> {
        let raw = self.be(n)?;
        let shift = 64 - 8 * n as u32;
        let v = ((raw << shift) as i64) >> shift;
        u64::try_from(v).map(Some).map_err(|_| ScanError::Unexpected("an unsigned integer"))
    }

    /// Jumps over one value of any type (iteratively, bounded depth).
    fn skip(&mut self) -> Result<(), ScanError> {
        // Values still to skip at each open level.
        let mut pending: [u64; MAX_DEPTH] = [0; MAX_DEPTH];
        let mut depth = 0usize;
        pending[0] = 1;
        loop {
            while pending[depth] == 0 {
                if depth == 0 {
                    return Ok(());
                }
                depth -= 1;
            }
            pending[depth] -= 1;
            let m = self.byte()?;
            let (skip, children): (u64, u64) = match m {
                0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
                0x80..=0x8f => (0, 2 * u64::from(m & 0x0f)),
                0x90..=0x9f => (0, u64::from(m & 0x0f)),
                0xa0..=0xbf => (u64::from(m & 0x1f), 0),
                0xc4 | 0xd9 => (self.be(1)?, 0),
                0xc5 | 0xda => (self.be(2)?, 0),
                0xc6 | 0xdb => (self.be(4)?, 0),
                0xc7 => (self.be(1)? + 1, 0),
                0xc8 => (self.be(2)? + 1, 0),
                0xc9 => (self.be(4)? + 1, 0),
                0xca => (4, 0),
                0xcb => (8, 0),
                0xcc | 0xd0 => (1, 0),
                0xcd | 0xd1 => (2, 0),
                0xce | 0xd2 => (4, 0),
                0xcf | 0xd3 => (8, 0),
                0xd4 => (2, 0),
                0xd5 => (3, 0),
                0xd6 => (5, 0),
                0xd7 => (9, 0),
                0xd8 => (17, 0),
                0xdc => (0, self.be(2)?),
                0xdd => (0, self.be(4)?),
                0xde => (0, 2 * self.be(2)?),
                0xdf => (0, 2 * self.be(4)?),
                0xc1 => return Err(ScanError::Unexpected("a value (0xc1 is never used)")),
            };
            self.take(usize::try_from(skip).map_err(|_| ScanError::Truncated)?)?;
            if children > 0 {
                // Each child takes at least one byte: a count beyond the frame is a lie.
                if children > (self.b.len() - self.at) as u64 {
                    return Err(ScanError::Truncated);
                }
                depth += 1;
                if depth == MAX_DEPTH {
                    return Err(ScanError::TooDeep);
                }
                pending[depth] = children;
            }
        }
    }

    fn event(&mut self) -> Result<Option<EventPart<'a>>, ScanError> {
        if self.peek()? == 0xc0 {
            self.at += 1;
            return Ok(None);
        }
        let n = self.map_len()?;
        let (mut event, mut lead, mut pro) = (None, None, None);
        for _ in 0..n {
            match self.str_bytes()? {
                b"event" => event = Some(self.str()?),
                b"lead" => lead = self.opt_str()?,
                b"pro" => pro = self.opt_str()?,
                _ => self.skip()?,
            }
        }
        let event = event.ok_or(ScanError::Missing("event"))?;
        Ok(Some(EventPart {
            event: Cow::Borrowed(event),
            lead: lead.map(Cow::Borrowed),
            pro: pro.map(Cow::Borrowed),
        }))
    }
}

/// Reads an [`Incoming`] from a MessagePack frame (see the module docs).
pub fn incoming(bytes: &[u8]) -> Result<Incoming<'_>, ScanError> {
    incoming_from(&mut Cursor { b: bytes, at: 0 })
}

/// Calls `f` with the frame's [`Incoming`], or, for an `events` frame (a batched
/// subscription: `{"type":"events","events":[frame, ...]}`), with each of its frames
/// in order. The daemon writes `type` first, so either is read in one pass; a frame
/// with other keys first is partly read twice.
pub fn each<'a>(bytes: &'a [u8], mut f: impl FnMut(Incoming<'a>)) -> Result<(), ScanError> {
    let mut c = Cursor { b: bytes, at: 0 };
    let n = c.map_len()?;
    let mut kind = None;
    let mut events_at = None;
    for _ in 0..n {
        match c.str_bytes()? {
            b"type" => {
                let k = c.str()?;
                if k != "events" {
                    // Any other frame: read as one (its keys before `type` twice).
                    f(incoming(bytes)?);
                    return Ok(());
                }
                kind = Some(k);
            }
            b"events" if kind == Some("events") => return each_element(&mut c, &mut f),
            b"events" => {
                events_at = Some(c.at);
                c.skip()?;
            }
            _ => c.skip()?,
        }
    }
    match (kind, events_at) {
        (Some("events"), Some(at)) => each_element(&mut Cursor { b: bytes, at }, &mut f),
        (Some("events"), None) => Err(ScanError::Missing("events")),
        _ => {
            f(incoming(bytes)?);
            Ok(())
        }
    }
}

fn each_element<'a>(c: &mut Cursor<'a>, f: &mut impl FnMut(Incoming<'a>)) -> Result<(), ScanError> {
    for _ in 0..c.array_len()? {
        f(incoming_from(c)?);
    }
    Ok(())
}

/// Reads one [`Incoming`] map from where `c` is, leaving `c` after it.
fn incoming_from<'a>(c: &mut Cursor<'a>) -> Result<Incoming<'a>, ScanError> {
    let n = c.map_len()?;
    let (mut kind, mut id, mut code, mut seq, mut event, mut result) = (None, None, None, None, None, None);
    for _ in 0..n {
        match c.str_bytes()? {
            b"type" => kind = Some(c.str()?),
            b"id" => id = c.opt_str()?,
            b"code" => code = c.opt_str()?,
            b"seq" => seq = c.opt_u64()?,
            b"event" => event = c.event()?,
            b"result" => {
                if c.peek()? == 0xc0 {
                    c.at += 1;
                } else {
                    c.skip()?;
                    result = Some(IgnoredAny);
                }
            }
            _ => c.skip()?,
        }
    }
    let kind = kind.ok_or(ScanError::Missing("type"))?;
    Ok(Incoming {
        kind: Cow::Borrowed(kind),
        id: id.map(Cow::Borrowed),
        code: code.map(Cow::Borrowed),
        seq,
        event,
        result,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn frames_of(v: &serde_json::Value) -> Result<Vec<String>, ScanError> {
        let bytes = rmp_serde::to_vec_named(v).unwrap();
        let mut out = Vec::new();
        each(&bytes, |f| out.push(format!("{f:?}")))?;
        Ok(out)
    }

    #[test]
    fn each_reads_a_frame_or_every_frame_of_an_events_frame_in_order() {
        let e = |seq: u64| json!({"type": "event", "seq": seq, "event": {"event": "lead_closed", "lead": format!("L{seq}"), "at": 1}});
        let one =
            |v: &serde_json::Value| format!("{:?}", incoming(&rmp_serde::to_vec_named(v).unwrap()).unwrap());
        // A plain frame: itself.
        assert_eq!(frames_of(&e(7)).unwrap(), vec![one(&e(7))]);
        let reply = json!({"id": "sub", "type": "ok", "result": {"subscribed": true, "next_seq": 1}});
        assert_eq!(frames_of(&reply).unwrap(), vec![one(&reply)]);
        // An events frame, in the daemon's key order and in another: each element.
        let want: Vec<String> = (1..=3).map(|s| one(&e(s))).collect();
        let batch = json!({"type": "events", "events": [e(1), e(2), e(3)]});
        assert_eq!(frames_of(&batch).unwrap(), want);
        let mut reordered = serde_json::Map::new();
        reordered.insert("events".into(), json!([e(1), e(2), e(3)]));
        reordered.insert("type".into(), json!("events"));
        assert_eq!(frames_of(&serde_json::Value::Object(reordered)).unwrap(), want);
        // Malformed: an error, never a panic.
        assert_eq!(frames_of(&json!({"type": "events"})), Err(ScanError::Missing("events")));
        assert!(frames_of(&json!({"type": "events", "events": 3})).is_err());
        let bytes = rmp_serde::to_vec_named(&batch).unwrap();
        for cut in 0..bytes.len() {
            let _ = each(&bytes[..cut], |_| {});
        }
    }

    fn agree(v: &serde_json::Value) {
        let bytes = rmp_serde::to_vec_named(v).unwrap();
        let fast = incoming(&bytes);
        let slow: Result<Incoming, _> = rmp_serde::from_slice(&bytes);
        match (fast, slow) {
            (Ok(a), Ok(b)) => assert_eq!(format!("{a:?}"), format!("{b:?}"), "{v}"),
            (Err(_), Err(_)) => {}
            // serde also takes a struct as an array of its fields; the daemon never
            // sends one, and the scan refuses it.
            (Err(ScanError::Unexpected("a map")), Ok(_))
                if v.is_array() || v.get("event").is_some_and(serde_json::Value::is_array) => {}
            (a, b) => panic!("paths disagree on {v}: scan {a:?}, serde {b:?}"),
        }
    }

    #[test]
    fn stream_events_replies_and_errors_read_like_the_serde_path() {
        agree(
            &json!({"type":"event","seq":42,"event":{"event":"offered","lead":"L1","pro":"p3","kind":"generic",
            "price":10,"respond_by":null,"at":1764001800000i64,"summary":{"zone":"bologna","description":"Ripittura è",
            "details":{"rooms":"2"},"attributes":[],"approx_location":{"lat":44.49,"lon":11.34},"created_at":-5}}}),
        );
        agree(
            &json!({"type":"ok","id":"i7","result":{"lead":"L1","status":"accepted","offers":[["p1","direct"]]}}),
        );
        agree(&json!({"type":"error","id":null,"code":"bad_frame","message":"x","retry_after_ms":100}));
        agree(&json!({"type":"event","seq":300000,"event":{"event":"credits","pro":"p1","lead":null}}));
        let big = "x".repeat(70_000);
        agree(
            &json!({"type":"event","seq":1,"event":{"event":"offered","lead":"L","summary":{"description":big}}}),
        );
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        assert_eq!(incoming(&[]).unwrap_err(), ScanError::Truncated);
        assert_eq!(incoming(&[0x91, 0x01]).unwrap_err(), ScanError::Unexpected("a map"));
        // {"type": <missing>}
        assert_eq!(incoming(&[0x81, 0xa4, b't', b'y', b'p', b'e']).unwrap_err(), ScanError::Truncated);
        // {} lacks `type`
        assert_eq!(incoming(&[0x80]).unwrap_err(), ScanError::Missing("type"));
        // An array claiming 2^32-1 elements in a 10-byte frame.
        let lie = [0x82, 0xa1, b'x', 0xdd, 0xff, 0xff, 0xff, 0xff, 0xa1, b'y'];
        assert_eq!(incoming(&lie).unwrap_err(), ScanError::Truncated);
        // Deep nesting of skipped values is bounded.
        let mut deep = vec![0x81, 0xa1, b'x'];
        deep.extend(std::iter::repeat_n(0x91, 1000));
        deep.push(0x01);
        assert_eq!(incoming(&deep).unwrap_err(), ScanError::TooDeep);
        // Invalid UTF-8 in a kept field.
        assert_eq!(incoming(&[0x81, 0xa4, b't', b'y', b'p', b'e', 0xa1, 0xff]).unwrap_err(), ScanError::Utf8);
    }

    fn value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(serde_json::Value::from),
            "[a-z]{0,40}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                prop::collection::btree_map(
                    "(type|id|code|seq|event|lead|pro|result|[a-z]{1,6})",
                    inner,
                    0..6
                )
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn any_map_reads_like_the_serde_path(v in value()) {
            agree(&v);
        }

        #[test]
        fn any_bytes_never_panic(b in prop::collection::vec(any::<u8>(), 0..200)) {
            let _ = incoming(&b);
        }
    }
}
