//! Every decoder that reads bytes from outside never panics on random or mutated input:
//! the wire protocol (both encodings), WAL records, tenant policies, the config file and
//! WAL segment scanning. Each returns an error or a value; a panic fails the property.
//!
//! These stand in for coverage-guided fuzzing (cargo-fuzz needs a nightly toolchain);
//! mutating valid samples gets the inputs past the first byte checks.
//!
//! Also: the two encodings of a request answer alike (names given as numbers, nesting
//! at and beyond the limit), and the search for a frame's bad field does bounded work
//! whatever the frame.

mod engine_support;
mod wal_support;

use proptest::prelude::*;
use rota::protocol::{decode, Encoding};
use rota::wal::{Fs, MemFs, OpenMode, Wal};
use serde_json::json;
use std::path::Path;
use wal_support::*;

fn publish_json() -> Vec<u8> {
    json!({"id": "c1", "type": "publish_lead", "lead": {
        "id": "L1", "category": "painting", "zone": "bologna",
        "location": {"lat": 44.49, "lon": 11.34},
        "description": "Repaint a two-room flat, walls and ceilings",
        "details": {"rooms": "2"}, "attributes": ["x"], "direct": ["p1", "p2"], "kind": "match",
        "created_at": 1_764_000_000_000i64,
        "client": {"id": "c-9", "name": "Anna Rossi", "phone": "+39 333 1234567", "phone_verified": true,
                   "contact": {"call": true, "whatsapp": false, "chat": true}, "address": null, "pro_id": null}}})
    .to_string()
    .into_bytes()
}

fn publish_msgpack() -> Vec<u8> {
    let v: serde_json::Value = serde_json::from_slice(&publish_json()).unwrap();
    rmp_serde::to_vec_named(&v).unwrap()
}

fn repo_file(rel: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
}

/// Overwrites, inserts and truncates: random edits of a valid sample.
fn mutate(mut b: Vec<u8>, edits: &[(usize, u8, u8)], cut: Option<usize>) -> Vec<u8> {
    for &(at, byte, how) in edits {
        if b.is_empty() {
            b.push(byte);
            continue;
        }
        let at = at % b.len();
        match how % 3 {
            0 => b[at] = byte,
            1 => b.insert(at, byte),
            _ => {
                b.remove(at);
            }
        }
    }
    if let Some(cut) = cut {
        let len = b.len();
        b.truncate(cut % (len + 1));
    }
    b
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    prop::collection::vec(any::<(usize, u8, u8)>(), 0..8)
}

/// A valid WAL segment holding a few records, as bytes.
fn valid_segment() -> (MemFs, std::path::PathBuf, Vec<u8>) {
    let fs = MemFs::new();
    let (wal, _) = Wal::open(small_cfg(MEM_DIR), as_dyn(&fs)).unwrap();
    for i in 1..=5u64 {
        wal.append_blocking(vec![(4, rmp_serde::to_vec_named(&json!({"lead": i})).unwrap())]).unwrap();
    }
    wal.shutdown().unwrap();
    let seg = segments(&fs, Path::new(MEM_DIR))[0].clone();
    let bytes = fs.file_bytes(&seg).unwrap();
    (fs, seg, bytes)
}

/// A stream history on disk of `n` events in small segments (all but the buffer's
/// last 10 events), and the events as published.
fn valid_history(n: u64) -> (std::sync::Arc<MemFs>, Vec<std::path::PathBuf>) {
    use rota::engine::hub::StreamHub;
    use rota::engine::spill::Spill;
    let fs = std::sync::Arc::new(MemFs::new());
    let spill = Spill::open(fs.clone(), Path::new("/h"), &rota::ids::TenantId::new("t"), 64 << 10, 100_000);
    let hub = StreamHub::with_spill(10, Some(spill.clone()));
    hub.publish((1..=n).map(history_event));
    spill.drain();
    let dir = Path::new("/h/t");
    let mut segs: Vec<_> =
        fs.list(dir).unwrap().into_iter().filter(|f| f.ends_with(".spill")).map(|f| dir.join(f)).collect();
    segs.sort();
    (fs, segs)
}

fn history_event(i: u64) -> rota::protocol::StreamEvent {
    rota::protocol::StreamEvent::LeadClosed { lead: rota::ids::LeadId::new(format!("L{i}")), at: i as i64 }
}

/// `PROPTEST_CASES` scales every property for a long run.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(1024), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn protocol_decode_never_panics_on_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(Encoding::Json, &bytes);
        let _ = decode(Encoding::Msgpack, &bytes);
    }

    #[test]
    fn protocol_decode_never_panics_on_mutated_requests(e in edits(), cut in any::<Option<usize>>()) {
        let _ = decode(Encoding::Json, &mutate(publish_json(), &e, cut));
        let _ = decode(Encoding::Msgpack, &mutate(publish_msgpack(), &e, cut));
    }

    #[test]
    fn wal_record_decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512), e in edits()) {
        let _ = rota::engine::record::decode(&bytes);
        let _ = rota::engine::record::decode(&mutate(publish_msgpack(), &e, None));
    }

    #[test]
    fn policy_from_toml_never_panics(e in edits(), cut in any::<Option<usize>>(), junk in ".{0,200}") {
        let text = mutate(repo_file("config/tenants/prontopro.toml"), &e, cut);
        let _ = rota::core::Policy::from_toml(&String::from_utf8_lossy(&text));
        let _ = rota::core::Policy::from_toml(&junk);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn config_load_never_panics_on_a_random_file_body(
        e in edits(), cut in any::<Option<usize>>(), junk in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rota.toml");
        for body in [mutate(repo_file("config/rota.toml"), &e, cut), junk.clone()] {
            std::fs::write(&path, &body).unwrap();
            let src = rota::config::Sources { file: Some(path.clone()), ..Default::default() };
            let _ = rota::config::Config::load(&src);
        }
    }

    /// The stream history's segments are read back at start and on resume: damage
    /// never panics and never serves a wrong event, only a shorter history.
    #[test]
    fn stream_history_never_serves_a_wrong_event_from_damaged_segments(
        which in any::<usize>(), e in edits(), cut in any::<Option<usize>>(),
    ) {
        let (fs, segs) = valid_history(600);
        prop_assume!(segs.len() >= 2);
        let seg = &segs[which % segs.len()];
        let damaged = mutate(fs.read(seg).unwrap(), &e, cut);
        let mut f = fs.open(seg, OpenMode::Create).unwrap();
        f.write_at(0, &damaged).unwrap();
        drop(f);
        let spill = rota::engine::spill::Spill::open(fs.clone(), Path::new("/h"), &rota::ids::TenantId::new("t"), 64 << 10, 100_000);
        let mut after = spill.oldest_kept().map_or(0, |o| o - 1);
        loop {
            match spill.read_after(after, 97, 1 << 20) {
                Ok(chunk) if chunk.is_empty() => break,
                Ok(chunk) => {
                    for o in &chunk {
                        prop_assert_eq!(o.seq, after + 1, "consecutive");
                        prop_assert_eq!(&o.event, &history_event(o.seq), "the event published with that seq");
                        after = o.seq;
                    }
                }
                Err(rota::engine::spill::Unserved::Lost(lost)) => match lost.oldest {
                    Some(o) if o > after + 1 => after = o - 1,
                    _ => break,
                },
                Err(e) => prop_assert!(false, "an intact in-memory disk is always readable: {:?}", e),
            }
        }
    }

    #[test]
    fn wal_verify_never_panics_on_a_damaged_segment(
        e in edits(), cut in any::<Option<usize>>(), junk in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let (fs, seg, bytes) = valid_segment();
        let damaged = mutate(bytes, &e, cut);
        let mut f = fs.open(&seg, OpenMode::Create).unwrap();
        f.write_at(0, &damaged).unwrap();
        drop(f);
        let _ = rota::wal::tools::verify(&fs, Path::new(MEM_DIR));
        // A segment of pure junk after the valid one, on the real filesystem.
        let dir = tempfile::tempdir().unwrap();
        let real = rota::wal::RealFs;
        let mut f = real.open(&dir.path().join(seg.file_name().unwrap()), OpenMode::Create).unwrap();
        f.write_at(0, &damaged).unwrap();
        drop(f);
        let mut f = real.open(&dir.path().join("00000000000000001000.wal"), OpenMode::Create).unwrap();
        f.write_at(0, &junk).unwrap();
        drop(f);
        let _ = rota::wal::tools::verify(&real, dir.path());
    }
}

/// A frame value whose map keys may be numbers (MessagePack only; JSON writes a number
/// key as a string), maps in the order given.
#[derive(Clone, Debug)]
enum Tree {
    V(serde_json::Value),
    M(Vec<(Key, Tree)>),
    S(Vec<Tree>),
}

#[derive(Clone, Debug)]
enum Key {
    S(String),
    N(u64),
}

impl serde::Serialize for Tree {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            Tree::V(v) => v.serialize(s),
            Tree::M(entries) => {
                let mut m = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    match k {
                        Key::S(k) => m.serialize_entry(k, v)?,
                        Key::N(n) => m.serialize_entry(n, v)?,
                    }
                }
                m.end()
            }
            Tree::S(items) => s.collect_seq(items),
        }
    }
}

impl Tree {
    /// Every map and sequence as a tree (JSON maps in sorted key order), `id` and `type`
    /// first at the top when `head_first`, else last.
    fn of(v: &serde_json::Value, head_first: bool) -> Tree {
        fn go(v: &serde_json::Value) -> Tree {
            match v {
                serde_json::Value::Object(m) => {
                    Tree::M(m.iter().map(|(k, x)| (Key::S(k.clone()), go(x))).collect())
                }
                serde_json::Value::Array(a) => Tree::S(a.iter().map(go).collect()),
                v => Tree::V(v.clone()),
            }
        }
        let Tree::M(entries) = go(v) else { return go(v) };
        let is_head = |k: &Key| matches!(k, Key::S(k) if k == "id" || k == "type");
        let (head, rest): (Vec<_>, Vec<_>) = entries.into_iter().partition(|(k, _)| is_head(k));
        Tree::M(if head_first { [head, rest].concat() } else { [rest, head].concat() })
    }

    /// The paths of the maps below the top, depth first (sequence indices as numbers).
    fn map_paths(&self, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        match self {
            Tree::M(entries) => {
                if !at.is_empty() && !entries.is_empty() {
                    out.push(at.clone());
                }
                for (k, v) in entries {
                    if let Key::S(k) = k {
                        at.push(k.clone());
                        v.map_paths(at, out);
                        at.pop();
                    }
                }
            }
            Tree::S(items) => {
                for (i, x) in items.iter().enumerate() {
                    at.push(i.to_string());
                    x.map_paths(at, out);
                    at.pop();
                }
            }
            Tree::V(_) => {}
        }
    }

    /// The value at `path` (map keys; sequence indices as numbers).
    fn at_mut(&mut self, path: &[&str]) -> &mut Tree {
        let Some((p, rest)) = path.split_first() else { return self };
        match self {
            Tree::M(entries) => {
                entries.iter_mut().find(|(k, _)| matches!(k, Key::S(k) if k == p)).unwrap().1.at_mut(rest)
            }
            Tree::S(items) => items[p.parse::<usize>().unwrap()].at_mut(rest),
            Tree::V(v) => panic!("no {p} in {v}"),
        }
    }
}

/// An enum name's path in a frame, and the field an error about it names.
type Named = (Vec<&'static str>, &'static str);

/// Valid requests of every type that carries an enum, and where each enum's name is.
fn named_enums() -> Vec<(serde_json::Value, Vec<Named>)> {
    let publish: serde_json::Value = serde_json::from_slice(&publish_json()).unwrap();
    let windows =
        json!({"time_zone": "Europe/Rome", "intervals": [{"day": "fri", "start_min": 60, "end_min": 120}]});
    vec![
        (publish, vec![(vec!["type"], "type"), (vec!["lead", "kind"], "lead.kind")]),
        (
            json!({"id": "o", "type": "offer", "lead": "L1", "pro": "p1", "action": "decline", "by": "client"}),
            vec![(vec!["action"], "action"), (vec!["by"], "by")],
        ),
        (
            json!({"id": "a", "type": "upsert_pro", "pro": {"id": "p1", "categories": ["painting"],
                   "zones": ["bologna"], "availability": {"schedule": windows}}}),
            vec![(
                vec!["pro", "availability", "schedule", "intervals", "0", "day"],
                "pro.availability.schedule.intervals[0].day",
            )],
        ),
        (
            json!({"id": "m", "type": "order", "command": {"type": "set_acceptance_mode", "pro": "p1",
                   "service": "painting", "mode": {"mode": "approval_required", "audience": "new_clients",
                   "windows": windows}}}),
            vec![
                (vec!["command", "type"], "command.type"),
                (vec!["command", "mode", "mode"], "command.mode.mode"),
                (vec!["command", "mode", "audience"], "command.mode.audience"),
                (
                    vec!["command", "mode", "windows", "intervals", "0", "day"],
                    "command.mode.windows.intervals[0].day",
                ),
            ],
        ),
        (
            json!({"id": "r", "type": "order", "command": {"type": "answer_request", "request": "r1",
                   "answer": {"answer": "approve", "offer": {"id": "c1", "price_cents": 100}}}}),
            vec![(vec!["command", "answer", "answer"], "command.answer.answer")],
        ),
    ]
}

fn encoded(enc: Encoding, t: &Tree) -> Vec<u8> {
    match enc {
        Encoding::Json => serde_json::to_vec(t).unwrap(),
        Encoding::Msgpack => rmp_serde::to_vec_named(t).unwrap(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(512), failure_persistence: None, ..ProptestConfig::default() })]

    /// A number is never a name: any enum name of a valid request (its `type`, an offer's
    /// action, a job kind, a weekday, an order command, acceptance mode, audience or
    /// answer) replaced by any number is refused in both encodings and either key order,
    /// `invalid_field` naming the field.
    #[test]
    fn an_enum_name_replaced_by_any_number_is_refused_naming_it(
        which in any::<usize>(), n in prop_oneof![any::<u64>().prop_map(|n| json!(n)), any::<i64>().prop_map(|n| json!(n)),
                                                  (0u64..16).prop_map(|n| json!(n)), any::<f64>().prop_map(|x| json!(x))],
        head_first in any::<bool>(),
    ) {
        let frames = named_enums();
        let all: Vec<_> = frames.iter().flat_map(|(f, names)| names.iter().map(move |n| (f, n))).collect();
        let (frame, (path, field)) = all[which % all.len()];
        for enc in [Encoding::Json, Encoding::Msgpack] {
            let valid = Tree::of(frame, head_first);
            prop_assert!(decode(enc, &encoded(enc, &valid)).is_ok(), "{:?} {}", enc, frame);
            let mut bad = valid.clone();
            *bad.at_mut(path) = Tree::V(n.clone());
            let e = decode(enc, &encoded(enc, &bad)).unwrap_err();
            prop_assert_eq!(
                (e.code, e.id.as_deref(), e.field.as_deref()),
                ("invalid_field", frame["id"].as_str(), Some(*field)),
                "{:?} {} = {}: {:?}", enc, field, n, e
            );
        }
    }

    /// MessagePack: a valid request with any key of a map below the top replaced by a
    /// number (serde would take it as a field's or variant's index) never decodes.
    #[test]
    fn a_map_key_replaced_by_a_number_never_decodes(
        which in any::<usize>(), map in any::<usize>(), entry in any::<usize>(), n in prop_oneof![0u64..16, any::<u64>()],
        head_first in any::<bool>(),
    ) {
        // The frames that have a map below the top.
        let frames: Vec<_> = named_enums()
            .into_iter()
            .map(|(f, _)| {
                let mut maps = Vec::new();
                Tree::of(&f, head_first).map_paths(&mut Vec::new(), &mut maps);
                (f, maps)
            })
            .filter(|(_, maps)| !maps.is_empty())
            .collect();
        let (frame, maps) = &frames[which % frames.len()];
        let mut t = Tree::of(frame, head_first);
        let path: Vec<&str> = maps[map % maps.len()].iter().map(String::as_str).collect();
        let Tree::M(entries) = t.at_mut(&path) else { unreachable!() };
        let i = entry % entries.len();
        entries[i].0 = Key::N(n);
        let bytes = encoded(Encoding::Msgpack, &t);
        let got = decode(Encoding::Msgpack, &bytes);
        prop_assert!(got.is_err(), "{}: {:?}", serde_json::to_string(&t).unwrap(), got);
        let e = got.unwrap_err();
        prop_assert_eq!((e.code, e.id.as_deref()), ("invalid_field", frame["id"].as_str()), "{:?}", e);
    }
}

/// A map in the order given.
fn map(entries: Vec<(&str, Tree)>) -> Tree {
    Tree::M(entries.into_iter().map(|(k, v)| (Key::S(k.to_string()), v)).collect())
}

fn val(v: serde_json::Value) -> Tree {
    Tree::V(v)
}

/// Stands for the deep value in a frame until [`with_deep`] puts it in.
const DEEP: &str = "@deep@";

/// `levels` nested arrays (the innermost empty) or one-entry maps (`{"a": ...}`, the
/// innermost empty), in `enc`: built as bytes, for any depth.
fn deep(enc: Encoding, levels: usize, maps: bool) -> Vec<u8> {
    let inner = levels - 1;
    match (enc, maps) {
        (Encoding::Json, false) => ["[".repeat(inner), "[]".into(), "]".repeat(inner)].concat().into_bytes(),
        (Encoding::Json, true) => {
            [r#"{"a":"#.repeat(inner), "{}".into(), "}".repeat(inner)].concat().into_bytes()
        }
        (Encoding::Msgpack, false) => [vec![0x91; inner], vec![0x90]].concat(),
        (Encoding::Msgpack, true) => [b"\x81\xa1a".repeat(inner), vec![0x80]].concat(),
    }
}

/// `frame` in `enc`, its [`DEEP`] string replaced by `deep`.
fn with_deep(enc: Encoding, frame: &Tree, deep: &[u8]) -> Vec<u8> {
    let bytes = encoded(enc, frame);
    let mark = encoded(enc, &val(json!(DEEP)));
    let at = bytes.windows(mark.len()).position(|w| w == mark.as_slice()).expect("the frame holds DEEP");
    [&bytes[..at], deep, &bytes[at + mark.len()..]].concat()
}

/// What a decode answered, comparable across encodings: the request, or the error's
/// code, id and field.
fn answer(
    enc: Encoding,
    bytes: &[u8],
) -> Result<rota::protocol::Envelope, (&'static str, Option<String>, Option<String>)> {
    decode(enc, bytes).map_err(|e| (e.code, e.id, e.field))
}

/// Nesting: one limit ([`MAX_DEPTH`] levels, the frame's own map the first), counted
/// alike in both encodings wherever the deep value is: in a field the request does not
/// have, in one it reads, in a command serde buffers, before `id` and `type` or after
/// them, next to a bad field or not. Just within the limit, the frame is judged as any
/// other (a field the request does not have is `invalid_field` naming it); one level
/// more, or 2,000, it is `bad_frame` (with the id when it came before the deep value) in
/// both encodings, whatever else is wrong with it.
///
/// [`MAX_DEPTH`]: rota::protocol::nesting::MAX_DEPTH
#[test]
fn both_encodings_answer_deep_nesting_alike_at_and_beyond_the_limit() {
    use rota::protocol::nesting::MAX_DEPTH;
    let s = |v: &str| val(json!(v));
    let d = || s(DEEP);
    let lead = |details: Tree| {
        map(vec![
            ("id", s("L1")),
            ("category", s("painting")),
            ("zone", s("bologna")),
            ("description", s("Repaint a two-room flat, walls and ceilings")),
            ("details", details),
            ("created_at", val(json!(1_764_000_000_000i64))),
            (
                "client",
                map(vec![("id", s("c-9")), ("name", s("Anna Rossi")), ("phone", s("+39 333 1234567"))]),
            ),
        ])
    };
    // (frame, its id, level of the deep value's place (the top map's entries are at 2),
    // the invalid field within the limit (`None`: the frame is valid), the id a
    // `bad_frame` beyond it carries).
    type Case = (Tree, &'static str, usize, Option<&'static str>, Option<&'static str>);
    let cases: Vec<Case> = vec![
        // The example: a bad `pro`, and a deep value in a field the request does not have.
        (
            map(vec![("id", s("a")), ("type", s("balance")), ("pro", val(json!(5))), ("x", d())]),
            "a",
            2,
            Some("pro"),
            Some("a"),
        ),
        // The same with a valid `pro`: the unknown field is the error.
        (
            map(vec![("id", s("a")), ("type", s("balance")), ("pro", s("p")), ("x", d())]),
            "a",
            2,
            Some("x"),
            Some("a"),
        ),
        // The deep value first: the scan stops before the id.
        (
            map(vec![("x", d()), ("id", s("a")), ("type", s("balance")), ("pro", s("p"))]),
            "a",
            2,
            Some("x"),
            None,
        ),
        // Before `type` (buffered), before a bad field.
        (
            map(vec![("id", s("a")), ("x", d()), ("pro", val(json!([1]))), ("type", s("balance"))]),
            "a",
            2,
            Some("x"),
            Some("a"),
        ),
        // Before `type` (buffered), after a bad field.
        (
            map(vec![("id", s("a")), ("pro", val(json!([1]))), ("x", d()), ("type", s("balance"))]),
            "a",
            2,
            Some("pro"),
            Some("a"),
        ),
        // In a field the request reads (a lead's details: a map of strings).
        (
            map(vec![("id", s("b")), ("type", s("publish_lead")), ("lead", lead(d()))]),
            "b",
            3,
            Some("lead.details"),
            Some("b"),
        ),
        // Unknown inside an order command, which serde buffers.
        (
            map(vec![
                ("id", s("c")),
                ("type", s("order")),
                ("command", map(vec![("type", s("cancel_order")), ("order", s("o1")), ("x", d())])),
            ]),
            "c",
            3,
            Some("command.x"),
            Some("c"),
        ),
    ];
    for (frame, id, place, bad_field, id_beyond) in &cases {
        // The deepest value the limit lets in at `place`, one level more, and far more.
        let fits = MAX_DEPTH + 1 - place;
        for levels in [fits, fits + 1, 2_000] {
            for maps in [false, true] {
                let [j, m] = [Encoding::Json, Encoding::Msgpack]
                    .map(|enc| answer(enc, &with_deep(enc, frame, &deep(enc, levels, maps))));
                let text = format!(
                    "{}, {levels} levels of {}",
                    serde_json::to_string(frame).unwrap(),
                    if maps { "maps" } else { "arrays" }
                );
                assert_eq!(j, m, "json and msgpack differ: {text}");
                if levels > fits {
                    let got = j.map(|_| ()).map_err(|(code, id, _)| (code, id));
                    assert_eq!(got, Err(("bad_frame", id_beyond.map(str::to_owned))), "{text}");
                    continue;
                }
                match (j, bad_field) {
                    (Ok(_), None) => {}
                    // A deep map is another wrong value than a deep array: a field below.
                    (Err((code, got_id, field)), Some(want)) => {
                        assert_eq!((code, got_id.as_deref()), ("invalid_field", Some(*id)), "{text}");
                        assert!(field.as_deref().is_some_and(|f| f.starts_with(want)), "{text}: {field:?}");
                        assert!(maps || field.as_deref() == Some(want), "{text}: {field:?}");
                    }
                    (got, _) => panic!("{text}: {got:?}"),
                }
            }
        }
    }
}

/// An `order` frame whose command (buffered by serde: its bad field is searched for by
/// probing) holds `junk` arrays of `per_array` nulls next to its fields, and so does its
/// `offer`, whose `price_cents` is a string: `junk + 1` candidates at each of two levels.
/// (The arrays are fields the command does not have, refused too, but only once the
/// command decodes: the price is the error found.)
fn junk_order(junk: usize, per_array: usize) -> Tree {
    let s = |v: &str| val(json!(v));
    let arrays = || {
        (0..junk).map(|i| (Key::S(format!("j{i:02}")), val(json!(vec![serde_json::Value::Null; per_array]))))
    };
    let offer = Tree::M(
        [(Key::S("id".into()), s("o"))]
            .into_iter()
            .chain(arrays())
            .chain([(Key::S("price_cents".into()), s("many"))])
            .collect(),
    );
    let command = Tree::M(
        [("type", "send_custom_offer"), ("pro", "p"), ("client", "c"), ("service", "painting")]
            .into_iter()
            .map(|(k, v)| (Key::S(k.into()), s(v)))
            .chain(arrays())
            .chain([(Key::S("offer".into()), offer)])
            .collect(),
    );
    map(vec![("id", s("h")), ("type", s("order")), ("command", command)])
}

/// The search for the bad field of a frame built to make it expensive (about 128 KiB of
/// MessagePack, one tree node a byte, 32 candidates at each of two levels: 65 decodes of
/// the whole tree before the bound in nodes) visits at most four times the frame's
/// nodes, and still answers in both encodings alike, naming the command.
#[test]
fn the_search_for_a_bad_field_visits_a_bounded_number_of_nodes_on_a_hostile_frame() {
    let frame = junk_order(31, 128 * 1024 / 62);
    let mut answers = Vec::new();
    for enc in [Encoding::Json, Encoding::Msgpack] {
        let bytes = encoded(enc, &frame);
        let (e, work) = rota::protocol::diagnosis(enc, &bytes).expect("the frame is refused");
        assert_eq!((e.code, e.id.as_deref()), ("invalid_field", Some("h")), "{enc:?}: {e:?}");
        assert!(e.field.as_deref().is_some_and(|f| f.starts_with("command")), "{enc:?}: {e:?}");
        assert!(work.nodes > 128_000, "{enc:?}: {work:?}");
        assert!(work.visited <= 4 * work.nodes, "{enc:?}: the search visited {work:?}");
        assert!(work.runs <= 4, "{enc:?}: {work:?}");
        answers.push((e.code, e.id, e.field));
    }
    assert_eq!(answers[0], answers[1]);
}

/// A small frame of the same shape still gets its field named in full.
#[test]
fn a_small_frame_still_gets_its_bad_field_named_in_full() {
    for (junk, per_array) in [(0, 0), (3, 2), (15, 0)] {
        let frame = junk_order(junk, per_array);
        for enc in [Encoding::Json, Encoding::Msgpack] {
            let (e, work) = rota::protocol::diagnosis(enc, &encoded(enc, &frame)).expect("refused");
            assert_eq!(
                (e.code, e.id.as_deref(), e.field.as_deref()),
                ("invalid_field", Some("h"), Some("command.offer.price_cents")),
                "{enc:?} {junk} {per_array}: {e:?} {work:?}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(48), failure_persistence: None, ..ProptestConfig::default() })]

    /// Whatever the frame's shape, the search visits at most four times its nodes, or
    /// 4,096 nodes for a small frame, in at most 65 decodes of its tree.
    #[test]
    fn the_search_for_a_bad_field_is_bounded_in_nodes_visited(
        junk in 0usize..40, per_array in prop_oneof![0usize..4, 0usize..600], msgpack in any::<bool>(),
    ) {
        let enc = if msgpack { Encoding::Msgpack } else { Encoding::Json };
        let (e, work) = rota::protocol::diagnosis(enc, &encoded(enc, &junk_order(junk, per_array))).expect("refused");
        prop_assert_eq!((e.code, e.id.as_deref()), ("invalid_field", Some("h")));
        prop_assert!(work.visited <= (4 * work.nodes).max(4096), "{:?}", work);
        prop_assert!(work.runs <= 65, "{:?}", work);
    }
}

/// The body of a real snapshot: two pros with credits, one with a top-up rule, leads
/// offered, responded to and declined, the stream's replay buffer and the policy.
fn snapshot_body() -> &'static [u8] {
    static BODY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BODY.get_or_init(|| {
        let fs = MemFs::new();
        let flags = ["data_dir=\"/mem\"", "clock=\"manual\"", "manual_clock_start_ms=1764000000000"];
        let cfg = rota::config::Config::load(&rota::config::Sources {
            flags: flags.iter().map(|f| f.to_string()).collect(),
            ..Default::default()
        })
        .unwrap();
        engine_support::in_system(async {
            let (e, _) = rota::engine::Engine::start_with_fs(cfg, std::sync::Arc::new(fs.process_handle())).unwrap();
            let t = rota::ids::TenantId::new("demo");
            let mut requests = vec![];
            for p in ["p1", "p2"] {
                requests.push(json!({"type": "upsert_pro", "pro": {"id": p, "categories": ["painting"], "zones": ["bologna"]}}));
                requests.push(json!({"type": "grant_credits", "pro": p, "op": format!("pay-{p}"), "credits": 10_000}));
            }
            requests.push(json!({"type": "set_topup_rule", "pro": "p1", "rule": {"threshold_credits": 100, "amount_credits": 500}}));
            for i in 0..6 {
                let mut lead = serde_json::from_slice::<serde_json::Value>(&publish_json()).unwrap();
                lead["lead"]["id"] = json!(format!("L{i}"));
                lead["lead"]["direct"] = json!([]);
                lead["lead"]["kind"] = json!("match");
                lead["lead"]["client"]["id"] = json!(format!("client-{i}"));
                requests.push(lead);
            }
            requests.push(json!({"type": "offer", "lead": "L0", "pro": "p1", "action": "respond"}));
            requests.push(json!({"type": "offer", "lead": "L1", "pro": "p2", "action": "decline", "by": "pro"}));
            for r in requests {
                if let Err(err) = e.request(&t, engine_support::req(r.clone())).await {
                    panic!("{r} answered {err}");
                }
            }
            e.snapshot().unwrap();
        });
        let dir = Path::new("/mem/wal");
        let name = fs.list(dir).unwrap().into_iter().filter(|n| n.ends_with(".snap")).max().expect("a snapshot");
        let file = fs.read(&dir.join(name)).unwrap();
        rota::wal::decode_snapshot(&file).unwrap().1.to_vec()
    })
}

/// The sample is a real snapshot that restores with every invariant holding, so the
/// property below mutates something the restore accepts.
#[test]
fn a_real_snapshot_restores_with_its_invariants() {
    let body = snapshot_body();
    assert!(body.len() > 1_000, "the sample holds state: {} bytes", body.len());
    rota::engine::restore_snapshot_checked(body).unwrap();
    // The seed of the `engine_snapshot` fuzz target (fuzz/README.md).
    if let Ok(path) = std::env::var("ROTA_SNAPSHOT_SEED_OUT") {
        std::fs::write(path, body).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(256), failure_persistence: None, ..ProptestConfig::default() })]

    /// A snapshot's body read back at start (its CRC passed, its bytes damaged all the
    /// same, or written by another build): refused or restored, never a panic.
    #[test]
    fn a_damaged_snapshot_body_is_refused_or_restored_never_a_panic(e in edits(), cut in any::<Option<usize>>()) {
        let _ = rota::engine::restore_snapshot_checked(&mutate(snapshot_body().to_vec(), &e, cut));
    }
}

/// The properties can fail: a decoder that panics is caught.
#[test]
#[should_panic(expected = "decoder panicked")]
fn a_panicking_decoder_is_caught() {
    let runner_cfg = ProptestConfig { cases: 16, failure_persistence: None, ..ProptestConfig::default() };
    let mut runner = proptest::test_runner::TestRunner::new(runner_cfg);
    let r = runner.run(&prop::collection::vec(any::<u8>(), 1..8), |b| {
        if b[0] < 255 {
            panic!("decoder panicked on {b:?}");
        }
        Ok(())
    });
    r.unwrap();
}
