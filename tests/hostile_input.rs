//! Hostile input against the real binary: oversized frames, deep nesting, huge arrays,
//! wrong types, invalid UTF-8, the wrong frame kind, bad upgrades, other tenants'
//! tokens, idle connections and request floods. Each gets its specific answer and the
//! daemon keeps serving everyone else.

mod e2e_support;

use e2e_support::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

/// The example tenants (so isolation can be checked), and `extra` config lines on top.
fn config(dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
    tenants_config(dir, extra)
}

fn start(dir: &tempfile::TempDir, extra: &str) -> Daemon {
    let cfg = config(dir.path(), extra);
    Daemon::start_with(&dir.path().join("data"), &cfg)
}

fn lead(id: &str) -> Value {
    json!({
        "id": id, "category": "painting", "zone": "bologna",
        "location": {"lat": 44.49, "lon": 11.34},
        "description": "Repaint a two-room flat, walls and ceilings, next week",
        "details": {"rooms": "2"}, "attributes": [], "direct": [], "kind": "match",
        "client": {"id": format!("client-{id}"), "name": "Anna Rossi", "phone": "+39 333 1234567",
                   "phone_verified": true, "contact": {"call": true, "whatsapp": false, "chat": true},
                   "address": null, "pro_id": null},
        "created_at": T0
    })
}

/// The connection still answers requests.
async fn still_serves(c: &mut Client) {
    let b = c.ok(json!({"type": "balance", "pro": "nobody"})).await;
    assert_eq!(b["available"], 0);
}

async fn recv_raw(c: &mut Client) -> Option<Message> {
    tokio::time::timeout(Duration::from_secs(20), c.ws.next()).await.expect("an answer within 20 s")?.ok()
}

#[tokio::test(flavor = "current_thread")]
async fn a_frame_over_max_frame_bytes_closes_with_1009_and_others_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(&dir, "max_frame_bytes = 4096");
    let mut other = Client::connect(&d.addr, "pp-token", false).await;
    let mut big = Client::connect(&d.addr, "pp-token", false).await;
    let mut l = lead("BIG");
    l["description"] = json!("x".repeat(200_000));
    big.ws
        .send(Message::Text(json!({"id": "b", "type": "publish_lead", "lead": l}).to_string()))
        .await
        .unwrap();
    let (code, reason) = big.drain_until_close().await;
    assert_eq!(code, 1009, "a frame over max_frame_bytes closes with 1009: {reason}");
    still_serves(&mut other).await;
    let mut fresh = Client::connect(&d.addr, "pp-token", true).await;
    still_serves(&mut fresh).await;
    // Just under the limit is fine.
    let mut l = lead("FITS");
    l["description"] = json!("y".repeat(3000));
    let (r, _) = other.call(json!({"type": "publish_lead", "lead": l})).await;
    assert_eq!(r["type"], "ok", "{r}");
}

#[tokio::test(flavor = "current_thread")]
async fn deep_nesting_and_huge_arrays_get_specific_errors_without_crashing() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(&dir, "");
    for msgpack in [false, true] {
        let mut c = Client::connect(&d.addr, "pp-token", msgpack).await;
        // 100,000 nested arrays.
        let frame = if msgpack {
            let mut b = vec![0x91u8; 100_000];
            b.push(0xc0);
            Message::Binary(b)
        } else {
            Message::Text("[".repeat(100_000))
        };
        c.ws.send(frame).await.unwrap();
        let v = c.recv().await;
        assert_eq!(v["code"], "bad_frame", "msgpack={msgpack}: {v}");
        // The same depth inside a request with an id: beyond the nesting limit, so
        // `bad_frame`, with the id read before it.
        let deep = if msgpack {
            let mut b = b"\x83\xa2id\xa1n\xa4type\xacpublish_lead\xa4lead".to_vec();
            b.extend(vec![0x91u8; 100_000]);
            b.push(0xc0);
            Message::Binary(b)
        } else {
            Message::Text(format!(r#"{{"id":"n","type":"publish_lead","lead":{}}}"#, "[".repeat(100_000)))
        };
        c.ws.send(deep).await.unwrap();
        let v = c.recv().await;
        assert_eq!(
            (v["code"].as_str(), v["id"].as_str()),
            (Some("bad_frame"), Some("n")),
            "msgpack={msgpack}: {v}"
        );
        still_serves(&mut c).await;
    }
    // Huge arrays: 50,000 direct targets are over the cap (64) and refused, naming the
    // field; nothing is stored.
    let mut c = Client::connect(&d.addr, "pp-token", false).await;
    let mut l = lead("HUGE1");
    l["direct"] = json!((0..50_000).map(|i| format!("p{i}")).collect::<Vec<_>>());
    let (r, _) = c.call(json!({"type": "publish_lead", "lead": l})).await;
    assert_eq!(
        (r["code"].as_str(), r["field"].as_str()),
        (Some("invalid_field"), Some("lead.direct")),
        "{r}"
    );
    let (r, _) = c.call(json!({"type": "explain", "lead": "HUGE1"})).await;
    assert_eq!(r["code"], "unknown_lead", "{r}");
    // 100,000 attributes: over the cap (64), refused naming the field; nothing stored.
    let mut l = lead("HUGE2");
    l["attributes"] = json!(vec!["a"; 100_000]);
    let (r, _) = c.call(json!({"type": "publish_lead", "lead": l})).await;
    assert_eq!(
        (r["code"].as_str(), r["field"].as_str()),
        (Some("invalid_field"), Some("lead.attributes")),
        "100,000 attributes: {r}"
    );
    let (r, _) = c.call(json!({"type": "explain", "lead": "HUGE2"})).await;
    assert_eq!(r["code"], "unknown_lead", "{r}");
    still_serves(&mut c).await;
}

/// R3/R4: a `candidates` query's attributes are capped as a lead's are (each is compared
/// with every pro's refused ones under the shard's lock): 64 of 1..=128 bytes answer;
/// more, an empty one or a longer one is `invalid_field` naming `attributes`, on an
/// empty shard as on one with pros.
#[tokio::test(flavor = "current_thread")]
async fn r3_r4_candidates_with_too_many_or_oversized_attributes_are_refused_naming_attributes() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(&dir, "");
    let mut c = Client::connect(&d.addr, "pp-token", false).await;
    let candidates = |zone: &str, attributes: Vec<String>| json!({"type": "candidates", "zone": zone, "category": "painting", "attributes": attributes});
    c.ok(json!({"type": "upsert_pro", "pro": {"id": "p1", "categories": ["painting"], "zones": ["bologna"],
                                              "refuses": ["dropshipper"]}}))
        .await;
    for zone in ["bologna", "empty-zone"] {
        let most: Vec<String> = (0..64).map(|i| format!("{i:0>128}")).collect();
        let (r, _) = c.call(candidates(zone, most)).await;
        assert_eq!(r["type"], "ok", "{zone}: 64 attributes of 128 bytes: {r}");
        let over: [(&str, Vec<String>); 4] = [
            ("65 attributes", vec!["z".to_string(); 65]),
            ("10,000 attributes", vec!["z".to_string(); 10_000]),
            ("an empty attribute", vec!["dropshipper".to_string(), String::new()]),
            ("an attribute of 129 bytes", vec!["x".repeat(129)]),
        ];
        for (what, attributes) in over {
            let (r, _) = c.call(candidates(zone, attributes)).await;
            assert_eq!(
                (r["code"].as_str(), r["field"].as_str()),
                (Some("invalid_field"), Some("attributes")),
                "{zone}: {what}: {r}"
            );
        }
    }
    still_serves(&mut c).await;
}

#[tokio::test(flavor = "current_thread")]
async fn every_publish_field_with_the_wrong_type_is_named_in_invalid_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(&dir, "");
    let mut c = Client::connect(&d.addr, "pp-token", false).await;
    let cases: &[(&str, Value)] = &[
        ("id", json!(12)),
        ("category", json!(12)),
        ("zone", json!(["bologna"])),
        ("location", json!("here")),
        ("location.lat", json!("north")),
        ("location.lon", json!(true)),
        ("description", json!({"text": "x"})),
        ("details", json!([1, 2])),
        ("attributes", json!("a,b")),
        ("direct", json!("p1")),
        ("kind", json!(7)),
        ("kind", json!("one_off")),
        ("created_at", json!("yesterday")),
        ("client", json!("Anna")),
        ("client.id", json!(9)),
        ("client.name", json!(false)),
        ("client.phone", json!(393331234567u64)),
        ("client.phone_verified", json!("yes")),
        ("client.contact", json!(1)),
        ("client.contact.call", json!("yes")),
        ("client.address", json!(5)),
        ("client.pro_id", json!(5)),
    ];
    let mut wrong = Vec::new();
    let mut m = Client::connect(&d.addr, "pp-token", true).await;
    for (tag, c) in [("json", &mut c), ("msgpack", &mut m)] {
        for (i, (path, value)) in cases.iter().enumerate() {
            let id = format!("W-{tag}-{i}");
            let mut l = lead(&id);
            let mut slot = &mut l;
            for part in path.split('.') {
                slot = &mut slot[part];
            }
            *slot = value.clone();
            let (r, _) = c.call(json!({"type": "publish_lead", "lead": l})).await;
            let want = format!("lead.{path}");
            if r["code"] != "invalid_field" || r["field"] != json!(want) {
                wrong.push(format!("{tag}: {want} = {value}: {r}"));
            }
            let (r, _) = c.call(json!({"type": "explain", "lead": id})).await;
            assert_eq!(r["code"], "unknown_lead", "a refused publish stored nothing: {r}");
        }
    }
    assert!(wrong.is_empty(), "not named in invalid_field:\n{}", wrong.join("\n"));
    still_serves(&mut c).await;
}

/// Decoding errors over the wire, in both encodings: a missing or mistyped field is
/// `invalid_field` naming its path (inside an order command and the `offer` action
/// too), a value that reads like an error message is judged as the value it is, and a
/// frame that is not a map is a `bad_frame` without an id.
#[tokio::test(flavor = "current_thread")]
async fn decoding_errors_get_the_documented_code_and_name_the_field_in_both_encodings() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(&dir, "");
    for msgpack in [false, true] {
        let mut c = Client::connect(&d.addr, "pp-token", msgpack).await;
        let mut no_id = lead("X1");
        no_id.as_object_mut().unwrap().remove("id");
        let mut no_client_id = lead("X2");
        no_client_id["client"].as_object_mut().unwrap().remove("id");
        let offer = |action: Value| {
            let mut req = json!({"type": "offer", "lead": "L", "pro": "p1"});
            req.as_object_mut().unwrap().extend(action.as_object().unwrap().clone());
            req
        };
        let cases = [
            (json!({"type": "publish_lead", "lead": no_id}), "lead.id"),
            (json!({"type": "publish_lead", "lead": no_client_id}), "lead.client.id"),
            (
                json!({"type": "upsert_pro", "pro": {"categories": ["painting"], "zones": ["bologna"]}}),
                "pro.id",
            ),
            (json!({"type": "order", "command": {"order": "o1"}}), "command.type"),
            (
                json!({"type": "order", "command": {"type": "send_custom_offer", "pro": "p1", "client": "c1",
                       "service": "painting", "offer": {"price_cents": 500}}}),
                "command.offer.id",
            ),
            (
                json!({"type": "grant_credits", "pro": "p1", "op": "o", "credits": "unknown message type"}),
                "credits",
            ),
            (offer(json!({"action": "teleport"})), "action"),
            (offer(json!({"action": "decline", "by": 3})), "by"),
            (offer(json!({"action": "decline"})), "by"),
            (offer(json!({"action": "add_note"})), "text"),
        ];
        for (req, field) in cases {
            let (r, _) = c.call(req.clone()).await;
            assert_eq!(
                (r["code"].as_str(), r["field"].as_str()),
                (Some("invalid_field"), Some(field)),
                "msgpack={msgpack} {req}: {r}"
            );
        }
        // Not a map: no id, whatever the array holds.
        let frame = json!(["r99", "balance", "p1"]);
        c.ws.send(if msgpack {
            Message::Binary(rmp_serde::to_vec(&frame).unwrap())
        } else {
            Message::Text(frame.to_string())
        })
        .await
        .unwrap();
        let v = c.recv().await;
        assert_eq!(
            (v["code"].as_str(), &v["id"]),
            (Some("bad_frame"), &Value::Null),
            "msgpack={msgpack}: {v}"
        );
        still_serves(&mut c).await;
    }
}

/// A frame value built in a given key order (serde_json's own maps sort their keys), so
/// that `id` and `type` come first (the decoder's fast path) and a tag before the
/// fields it selects; a map key may be a number (MessagePack; JSON writes it as a
/// string).
#[derive(Clone)]
enum F {
    V(Value),
    M(Vec<(F, F)>),
    S(Vec<F>),
}

impl serde::Serialize for F {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            F::V(v) => v.serialize(s),
            F::M(entries) => {
                let mut m = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    m.serialize_entry(k, v)?;
                }
                m.end()
            }
            F::S(items) => s.collect_seq(items),
        }
    }
}

/// A map of string keys, in this order.
fn m(entries: Vec<(&str, F)>) -> F {
    F::M(entries.into_iter().map(|(k, v)| (F::V(json!(k)), v)).collect())
}

fn v(x: Value) -> F {
    F::V(x)
}

/// `{n: nil}`: a unit variant in its externally tagged form, named by its index.
fn indexed(n: u64) -> F {
    F::M(vec![(F::V(json!(n)), F::V(Value::Null))])
}

/// Tuesday 00:00-06:00 in Rome, `day` standing for Tuesday (the daemon's clock starts on
/// a Monday afternoon: a pro with this schedule is unavailable).
fn night_schedule(day: F) -> F {
    let interval = m(vec![("day", day), ("start_min", v(json!(0))), ("end_min", v(json!(360)))]);
    m(vec![("time_zone", v(json!("Europe/Rome"))), ("intervals", F::S(vec![interval]))])
}

/// A number is never a name: an enum value, a tag or a map key given as a number (serde
/// would read it as the index of a variant or field) is refused in both encodings with
/// `invalid_field` naming the field (`id` and `type` first, so the request is read as
/// it comes, and a tag first in its map), and nothing changes: no event, no offer acted
/// on, no lead, pro or schedule stored.
#[tokio::test(flavor = "current_thread")]
async fn r17_r25_names_given_as_numbers_are_refused_naming_the_field_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(&dir, "");
    let mut c = Client::connect(&d.addr, "pp-token", false).await;
    // Three pros: candidates lists no fewer (`min_list_size`).
    for p in ["p1", "p3", "p4"] {
        let pro = json!({"id": p, "categories": ["painting"], "zones": ["bologna"]});
        c.ok(json!({"type": "upsert_pro", "pro": pro})).await;
        c.ok(json!({"type": "grant_credits", "pro": p, "op": "pay-1", "credits": 100})).await;
    }
    let mut l = lead("N1");
    l["kind"] = json!("direct");
    l["direct"] = json!(["p1"]);
    let out = c.ok(json!({"type": "publish_lead", "lead": l})).await;
    assert_eq!(out["offers"], json!([["p1", "direct"]]), "{out}");
    let mut sub = Client::connect(&d.addr, "pp-token", false).await;
    sub.ok(json!({"type": "subscribe"})).await;

    let offer = |action: Vec<(&'static str, F)>| {
        [vec![("type", v(json!("offer"))), ("lead", v(json!("N1"))), ("pro", v(json!("p1")))], action]
            .concat()
    };
    let mut kind_1 = lead("N2");
    kind_1["kind"] = json!(1);
    kind_1["direct"] = json!(["p1"]);
    let order = |command: F| vec![("type", v(json!("order"))), ("command", command)];
    let set_mode = |mode: F| {
        order(m(vec![
            ("type", v(json!("set_acceptance_mode"))),
            ("pro", v(json!("p1"))),
            ("service", v(json!("painting"))),
            ("mode", mode),
        ]))
    };
    let cases: Vec<(Vec<(&str, F)>, &str)> = vec![
        // R17: 5 was `client_viewed`, 1 `respond` (a charge), 0 `open`.
        (offer(vec![("action", v(json!(5)))]), "action"),
        (offer(vec![("action", v(json!(1)))]), "action"),
        (offer(vec![("action", v(json!(0)))]), "action"),
        (offer(vec![("action", v(json!(2))), ("by", v(json!("pro")))]), "action"),
        (offer(vec![("action", v(json!("decline"))), ("by", v(json!(0)))]), "by"),
        (offer(vec![("action", v(json!("decline"))), ("by", indexed(1))]), "by"),
        // R13: 1 was `direct`.
        (vec![("type", v(json!("publish_lead"))), ("lead", v(kind_1))], "lead.kind"),
        // R4: 1 was Tuesday.
        (
            vec![
                ("type", v(json!("set_availability"))),
                ("pro", v(json!("p1"))),
                ("availability", m(vec![("schedule", night_schedule(v(json!(1))))])),
            ],
            "availability.schedule.intervals[0].day",
        ),
        (
            vec![
                ("type", v(json!("upsert_pro"))),
                (
                    "pro",
                    m(vec![
                        ("id", v(json!("p2"))),
                        ("categories", v(json!(["painting"]))),
                        ("zones", v(json!(["bologna"]))),
                        ("availability", m(vec![("schedule", night_schedule(indexed(1)))])),
                    ]),
                ),
            ],
            "pro.availability.schedule.intervals[0].day",
        ),
        // R25-R27: command 0 was `set_acceptance_mode`, 1 `set_availability`.
        (
            order(m(vec![
                ("type", v(json!(0))),
                ("pro", v(json!("p1"))),
                ("service", v(json!("painting"))),
                ("mode", m(vec![("mode", v(json!("auto_accept")))])),
            ])),
            "command.type",
        ),
        (
            order(m(vec![("type", v(json!(1))), ("pro", v(json!("p1"))), ("availability", m(vec![]))])),
            "command.type",
        ),
        // R25: mode 1 was `approval_required`, audience 1 `all_clients`.
        (
            set_mode(m(vec![("mode", v(json!(1))), ("audience", v(json!("all_clients")))])),
            "command.mode.mode",
        ),
        (
            set_mode(m(vec![("mode", v(json!("approval_required"))), ("audience", v(json!(1)))])),
            "command.mode.audience",
        ),
        (
            set_mode(m(vec![("mode", v(json!("approval_required"))), ("audience", indexed(1))])),
            "command.mode.audience",
        ),
        (
            set_mode(m(vec![
                ("mode", v(json!("approval_required"))),
                ("audience", v(json!("all_clients"))),
                ("windows", night_schedule(v(json!(1)))),
            ])),
            "command.mode.windows.intervals[0].day",
        ),
        // R25: answer 1 was `decline`.
        (
            order(m(vec![
                ("type", v(json!("answer_request"))),
                ("request", v(json!("o1"))),
                ("answer", m(vec![("answer", v(json!(1)))])),
            ])),
            "command.answer.answer",
        ),
        (
            order(m(vec![
                ("type", v(json!("set_availability"))),
                ("pro", v(json!("p1"))),
                ("availability", m(vec![("schedule", night_schedule(v(json!(1))))])),
            ])),
            "command.availability.schedule.intervals[0].day",
        ),
        // The request's own type: a string or `invalid_field` naming it.
        (vec![("type", v(json!(3))), ("pro", v(json!("p1")))], "type"),
    ];
    let mut wrong = Vec::new();
    for msgpack in [false, true] {
        let mut k = Client::connect(&d.addr, "pp-token", msgpack).await;
        for (i, (pairs, field)) in cases.iter().enumerate() {
            let id = format!("num-{msgpack}-{i}");
            let frame = m([vec![("id", v(json!(id)))], pairs.clone()].concat());
            k.ws.send(if msgpack {
                Message::Binary(rmp_serde::to_vec_named(&frame).unwrap())
            } else {
                Message::Text(serde_json::to_string(&frame).unwrap())
            })
            .await
            .unwrap();
            let r = k.recv().await;
            if (r["code"].as_str(), r["field"].as_str(), r["id"].as_str())
                != (Some("invalid_field"), Some(*field), Some(id.as_str()))
            {
                wrong.push(format!("msgpack={msgpack} {}: {r}", serde_json::to_string(&frame).unwrap()));
            }
        }
        still_serves(&mut k).await;
    }
    assert!(wrong.is_empty(), "not refused as invalid_field naming the field:\n{}", wrong.join("\n"));

    // Nothing changed. No event: the next one is the grant sent now.
    c.ok(json!({"type": "grant_credits", "pro": "p1", "op": "pay-2", "credits": 1})).await;
    let ev = sub.events(1).await;
    assert_eq!(
        (ev[0]["event"]["event"].as_str(), ev[0]["event"]["op"].as_str()),
        (Some("credits"), Some("grant:pay-2"))
    );
    // The offer is still new (not opened, viewed, responded to or declined) and nothing
    // was charged.
    let explain = c.ok(json!({"type": "explain", "lead": "N1"})).await;
    assert!(explain.to_string().contains(r#""status":"new""#), "{explain}");
    assert_eq!(c.ok(json!({"type": "balance", "pro": "p1"})).await["available"], 101);
    // No second lead, no pro p2, and p1 is still available (no schedule).
    let (r, _) = c.call(json!({"type": "explain", "lead": "N2"})).await;
    assert_eq!(r["code"], "unknown_lead", "{r}");
    let (r, _) = c.call(json!({"type": "search", "pro": "p2", "query": "flat"})).await;
    assert_eq!(r["code"], "unknown_pro", "{r}");
    let cands = c.ok(json!({"type": "candidates", "zone": "bologna", "category": "painting"})).await;
    let mut pros: Vec<&str> =
        cands["pros"].as_array().unwrap().iter().map(|p| p[0].as_str().unwrap()).collect();
    pros.sort();
    assert_eq!(pros, ["p1", "p3", "p4"], "{cands}");
}

/// `subscribe` with `pro` checks the pro id as the other requests naming a pro do: an
/// empty, over-long or control-character id is `invalid_field` naming `pro`, and leaves
/// the connection unsubscribed: a subscribe with a good id then gets its feed.
#[tokio::test(flavor = "current_thread")]
async fn subscribe_with_a_bad_pro_id_is_refused_naming_pro() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(&dir, "");
    let mut admin = Client::connect(&d.addr, "pp-token", false).await;
    admin
        .ok(json!({"type": "upsert_pro", "pro": {"id": "p1", "categories": ["painting"], "zones": ["bologna"]}}))
        .await;
    for msgpack in [false, true] {
        let mut c = Client::connect(&d.addr, "pp-token", msgpack).await;
        for pro in [json!(""), json!("p".repeat(200)), json!("a\nb")] {
            let (r, _) = c.call(json!({"type": "subscribe", "pro": pro})).await;
            assert_eq!(
                (r["code"].as_str(), r["field"].as_str()),
                (Some("invalid_field"), Some("pro")),
                "msgpack={msgpack} pro={pro}: {r}"
            );
        }
        let r = c.ok(json!({"type": "subscribe", "pro": "p1"})).await;
        assert_eq!(r["subscribed"], true, "{r}");
        admin
            .ok(json!({"type": "grant_credits", "pro": "p1", "op": format!("pay-{msgpack}"), "credits": 5}))
            .await;
        let ev = c.events(1).await;
        assert_eq!(
            (ev[0]["event"]["event"].as_str(), ev[0]["event"]["pro"].as_str()),
            (Some("credits"), Some("p1"))
        );
    }
}

/// `{"id": "n", "type": "balance", "pro": <pro>, "x": <levels nested arrays>}`, the
/// arrays written as bytes (any depth).
fn deep_balance(msgpack: bool, pro: &Value, levels: usize) -> Message {
    if msgpack {
        let enc = |v: Value| rmp_serde::to_vec(&v).unwrap();
        let mut b = vec![0x84];
        for part in
            [json!("id"), json!("n"), json!("type"), json!("balance"), json!("pro"), pro.clone(), json!("x")]
        {
            b.extend(enc(part));
        }
        b.extend(vec![0x91; levels - 1]);
        b.push(0x90);
        Message::Binary(b)
    } else {
        let x = format!("{}{}", "[".repeat(levels), "]".repeat(levels));
        Message::Text(format!(r#"{{"id":"n","type":"balance","pro":{pro},"x":{x}}}"#))
    }
}

/// One nesting limit for both encodings (64 levels, the frame's own map the first),
/// counted in a field the request does not have too: beyond it a frame is `bad_frame`
/// whatever else is wrong with it, within it the frame is judged as any other (the
/// unknown field is `invalid_field` naming it); JSON and MessagePack answer alike.
#[tokio::test(flavor = "current_thread")]
async fn deep_nesting_is_answered_alike_in_both_encodings_even_in_an_unknown_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(&dir, "");
    let levels = rota::protocol::nesting::MAX_DEPTH;
    // `x` is at the second level: 63 levels in it make a frame of 64.
    let cases = [
        (json!(5), levels - 1, ("error", Some("invalid_field"), Some("pro"))),
        (json!(5), levels, ("error", Some("bad_frame"), None)),
        (json!(5), 2_000, ("error", Some("bad_frame"), None)),
        (json!("nobody"), levels - 1, ("error", Some("invalid_field"), Some("x"))),
        (json!("nobody"), levels, ("error", Some("bad_frame"), None)),
        (json!("nobody"), 2_000, ("error", Some("bad_frame"), None)),
    ];
    let mut answers = Vec::new();
    for msgpack in [false, true] {
        let mut c = Client::connect(&d.addr, "pp-token", msgpack).await;
        let mut got = Vec::new();
        for (pro, n, want) in &cases {
            c.ws.send(deep_balance(msgpack, pro, *n)).await.unwrap();
            let r = c.recv().await;
            let answer = (r["type"].as_str(), r["code"].as_str(), r["field"].as_str(), r["id"].as_str());
            assert_eq!(
                answer,
                (Some(want.0), want.1, want.2, Some("n")),
                "msgpack={msgpack} pro={pro} {n} levels: {r}"
            );
            got.push(r);
        }
        still_serves(&mut c).await;
        answers.push(got);
    }
    let strip = |rs: &[Value]| -> Vec<(Value, Value, Value)> {
        rs.iter().map(|r| (r["type"].clone(), r["code"].clone(), r["field"].clone())).collect()
    };
    assert_eq!(strip(&answers[0]), strip(&answers[1]));
}

/// An `order` frame built to make the search for its bad field expensive (about 128 KiB
/// of MessagePack, one value a byte, 32 candidate entries at each of two levels of the
/// command; the junk entries are fields the command does not have, refused too, but only
/// once the command decodes: the bad price is the error found) is answered
/// `invalid_field` naming the command, in both encodings, and the connection and the
/// daemon keep serving.
#[tokio::test(flavor = "current_thread")]
async fn a_frame_built_to_make_the_search_for_its_bad_field_costly_is_answered() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(&dir, "");
    let arrays = || (0..31).map(|i| (F::V(json!(format!("j{i:02}"))), v(json!(vec![Value::Null; 2_114]))));
    let s = |k: &str, x: &str| (F::V(json!(k)), v(json!(x)));
    let offer = F::M([s("id", "o")].into_iter().chain(arrays()).chain([s("price_cents", "many")]).collect());
    let command = F::M(
        [s("type", "send_custom_offer"), s("pro", "p1"), s("client", "c1"), s("service", "painting")]
            .into_iter()
            .chain(arrays())
            .chain([(F::V(json!("offer")), offer)])
            .collect(),
    );
    let frame = m(vec![("id", v(json!("h"))), ("type", v(json!("order"))), ("command", command)]);
    for msgpack in [false, true] {
        let mut c = Client::connect(&d.addr, "pp-token", msgpack).await;
        let bytes = if msgpack {
            Message::Binary(rmp_serde::to_vec_named(&frame).unwrap())
        } else {
            Message::Text(serde_json::to_string(&frame).unwrap())
        };
        for _ in 0..3 {
            c.ws.send(bytes.clone()).await.unwrap();
            let r = c.recv().await;
            assert_eq!((r["code"].as_str(), r["id"].as_str()), (Some("invalid_field"), Some("h")), "{r}");
            assert!(r["field"].as_str().is_some_and(|f| f.starts_with("command")), "{r}");
        }
        still_serves(&mut c).await;
    }
}

/// A misspelt field name was skipped, the field left at its default and the request
/// answered `done`: an auto-buy config without its price cap (R19), a lead's client
/// without contact preferences (chat only, R9), a grant with an extra field. Each is
/// refused in both encodings as `invalid_field` naming the field's full path, saying
/// "unknown field", and nothing is stored.
#[tokio::test(flavor = "current_thread")]
async fn r9_r19_a_misspelt_field_is_refused_naming_its_path_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(&dir, "");
    for msgpack in [false, true] {
        let mut c = Client::connect(&d.addr, "pp-token", msgpack).await;
        let p = if msgpack { "typo-m" } else { "typo-j" };
        let refused = |r: &Value, field: &str| {
            assert_eq!(
                (r["code"].as_str(), r["field"].as_str(), r["message"].as_str()),
                (Some("invalid_field"), Some(field), Some("unknown field")),
                "msgpack={msgpack}: {r}"
            );
        };
        let config = json!({"name": "week", "zones": ["bologna"], "categories": ["painting"],
                            "weekly_budget_credits": 100, "max_price": 5});
        let pro = json!({"id": p, "categories": ["painting"], "zones": ["bologna"], "autobuy": [config]});
        let (r, _) = c.call(json!({"type": "upsert_pro", "pro": pro})).await;
        refused(&r, "pro.autobuy[0].max_price");
        let (r, _) = c.call(json!({"type": "remove_pro", "pro": p})).await;
        assert_eq!(r["code"], "unknown_pro", "msgpack={msgpack}: the profile was not stored: {r}");

        let id = format!("L-{p}");
        let mut l = lead(&id);
        let contact = l["client"].as_object_mut().unwrap().remove("contact").unwrap();
        l["client"]["contcat"] = contact;
        let (r, _) = c.call(json!({"type": "publish_lead", "lead": l})).await;
        refused(&r, "lead.client.contcat");
        let (r, _) = c.call(json!({"type": "explain", "lead": id})).await;
        assert_eq!(r["code"], "unknown_lead", "msgpack={msgpack}: the lead was not stored: {r}");

        let grant =
            json!({"type": "grant_credits", "pro": p, "op": "pay-1", "credits": 50, "currency": "eur"});
        let (r, _) = c.call(grant).await;
        refused(&r, "currency");
        let b = c.ok(json!({"type": "balance", "pro": p})).await;
        assert_eq!(
            (b["available"].as_u64(), b["granted"].as_u64()),
            (Some(0), Some(0)),
            "msgpack={msgpack}: {b}"
        );
        still_serves(&mut c).await;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn invalid_utf8_closes_with_1007_and_a_binary_frame_on_json_gets_bad_frame() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(&dir, "");
    let mut c = Client::connect(&d.addr, "pp-token", false).await;
    c.ws.send(Message::Binary(br#"{"id":"1","type":"balance","pro":"p"}"#.to_vec())).await.unwrap();
    let v = c.recv().await;
    assert_eq!(v["code"], "bad_frame", "{v}");
    let mut m = Client::connect(&d.addr, "pp-token", true).await;
    m.ws.send(Message::Text(r#"{"id":"1","type":"balance","pro":"p"}"#.into())).await.unwrap();
    let v = m.recv().await;
    assert_eq!(v["code"], "bad_frame", "{v}");
    still_serves(&mut c).await;
    still_serves(&mut m).await;

    let bad = vec![b'{', b'"', 0xff, 0xfe, b'"', b'}'];
    c.ws.send(Message::Frame(Frame::message(bad, OpCode::Data(Data::Text), true))).await.unwrap();
    let (code, _) = c.drain_until_close().await;
    assert_eq!(code, 1007, "invalid UTF-8 in a text frame");
    still_serves(&mut m).await;
}

#[tokio::test(flavor = "current_thread")]
async fn upgrades_without_a_subprotocol_or_with_a_bad_token_are_refused_and_tenants_are_isolated() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(&dir, "");
    // No subprotocol at all, and only unknown ones.
    let mut req = format!("ws://{}/", d.addr).into_client_request().unwrap();
    req.headers_mut().insert("authorization", "Bearer pp-token".parse().unwrap());
    let err = tokio_tungstenite::connect_async(req).await.unwrap_err().to_string();
    assert!(err.contains("400"), "{err}");
    let err = connect(&d.addr, "pp-token", "rota.v2.json").await.unwrap_err().to_string();
    assert!(err.contains("400"), "{err}");
    // No token, a wrong token, a token with another scheme.
    let mut req = format!("ws://{}/", d.addr).into_client_request().unwrap();
    req.headers_mut().insert("sec-websocket-protocol", "rota.v1.json".parse().unwrap());
    let err = tokio_tungstenite::connect_async(req.clone()).await.unwrap_err().to_string();
    assert!(err.contains("401"), "{err}");
    for auth in ["Bearer pp-tokenX", "Bearer ", "Basic cHAtdG9rZW4=", "pp-token"] {
        let mut r = req.clone();
        r.headers_mut().insert("authorization", auth.parse().unwrap());
        let err = tokio_tungstenite::connect_async(r).await.unwrap_err().to_string();
        assert!(err.contains("401"), "{auth}: {err}");
    }
    // Another tenant's token sees nothing of this one.
    let mut pp = Client::connect(&d.addr, "pp-token", false).await;
    let mut habi = Client::connect(&d.addr, "habi-token", true).await;
    pp.ok(
        json!({"type": "upsert_pro", "pro": {"id": "p1", "categories": ["painting"], "zones": ["bologna"]}}),
    )
    .await;
    pp.ok(json!({"type": "grant_credits", "pro": "p1", "op": "pay-1", "credits": 50})).await;
    let mut l = lead("ISO1");
    l["direct"] = json!(["p1"]);
    let out = pp.ok(json!({"type": "publish_lead", "lead": l})).await;
    assert_eq!(out["status"], "accepted", "{out}");
    let (r, _) = habi.call(json!({"type": "explain", "lead": "ISO1"})).await;
    assert_eq!(r["code"], "unknown_lead", "{r}");
    let (r, _) = habi.call(json!({"type": "offer", "lead": "ISO1", "pro": "p1", "action": "respond"})).await;
    assert_eq!(r["code"], "unknown_lead", "{r}");
    let b = habi.ok(json!({"type": "balance", "pro": "p1"})).await;
    assert_eq!(b["available"], 0, "the other tenant's pro has no money here: {b}");
    let b = pp.ok(json!({"type": "balance", "pro": "p1"})).await;
    assert_eq!(b["available"], 50, "nothing the other tenant did touched it: {b}");
}

/// Raises this process's soft open-file limit towards its hard limit; returns how many
/// descriptors it may now hold.
fn raise_open_file_limit(wanted: u64) -> u64 {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit fill or read one rlimit struct owned here.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        if r.rlim_cur < wanted {
            r.rlim_cur = wanted.min(r.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
    }
    r.rlim_cur
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_do_not_stop_a_new_client() {
    // Thousands of upgraded connections that send nothing (heartbeats answered by the
    // client library) hold a task and a socket each, nothing more: a new client is
    // served, and the idle ones still are. Fewer if this host's hard open-file limit
    // is low (the daemon raises its own limit to the hard one at start).
    let limit = raise_open_file_limit(4_096);
    let n = 2_000.min(limit.saturating_sub(300) as usize);
    assert!(n >= 500, "open-file limit {limit} leaves room for {n} connections only");
    let dir = tempfile::tempdir().unwrap();
    let d = start(&dir, "");
    let mut idle = Vec::new();
    for i in 0..n {
        idle.push(Client::connect(&d.addr, "pp-token", i % 2 == 0).await);
    }
    let mut c = Client::connect(&d.addr, "pp-token", false).await;
    still_serves(&mut c).await;
    let out = c.ok(json!({"type": "publish_lead", "lead": lead("IDLE1")})).await;
    assert!(out["status"].is_string(), "{out}");
    // The idle ones still work too.
    still_serves(&mut idle[0]).await;
    still_serves(&mut idle[n / 2]).await;
    still_serves(&mut idle[n - 1]).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_flood_of_2000_pipelined_requests_gets_exactly_one_reply_each() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(&dir, "");
    let mut c = Client::connect(&d.addr, "pp-token", false).await;
    let n = 2000;
    for i in 0..n {
        let req = match i % 4 {
            0 => json!({"id": format!("f{i}"), "type": "publish_lead", "lead": lead(&format!("F{i}"))}),
            1 => json!({"id": format!("f{i}"), "type": "balance", "pro": "p1"}),
            2 => json!({"id": format!("f{i}"), "type": "teleport"}),
            _ => json!({"id": format!("f{i}"), "type": "explain", "lead": "nope"}),
        };
        c.ws.feed(Message::Text(req.to_string())).await.unwrap();
    }
    c.ws.flush().await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < n {
        let Some(Message::Text(t)) = recv_raw(&mut c).await else { continue };
        let v: Value = serde_json::from_str(&t).unwrap();
        let id = v["id"].as_str().unwrap_or_else(|| panic!("a reply without id: {v}")).to_string();
        assert!(seen.insert(id.clone()), "a second reply to {id}: {v}");
        let i: usize = id[1..].parse().unwrap();
        match i % 4 {
            0 => assert!(v["type"] == "ok" || v["code"] == "overloaded", "{v}"),
            1 => assert!(v["type"] == "ok" || v["code"] == "overloaded", "{v}"),
            2 => assert_eq!(v["code"], "unknown_message", "{v}"),
            _ => assert!(v["code"] == "unknown_lead" || v["code"] == "overloaded", "{v}"),
        }
    }
    // Nothing more is queued behind them: the next reply is the next request's.
    let (r, _) = c.call(json!({"type": "balance", "pro": "p1"})).await;
    assert_eq!(r["type"], "ok", "{r}");
}

/// Admission control (issue #8, overload): requests waiting unread in the socket beyond
/// `shed_backlog_bytes` are refused with `overloaded` before any work is done for them.
/// A shed lead leaves nothing behind and can be published again; every request still
/// gets exactly one reply. The limit is tiny here so a pipelined burst exceeds it.
#[tokio::test(flavor = "current_thread")]
async fn a_backlog_of_unread_requests_is_shed_with_overloaded_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = start(&dir, "shed_backlog_bytes = 1");
    let mut c = Client::connect(&d.addr, "pp-token", false).await;
    let n = 1500;
    for i in 0..n {
        // Half the frames start with `id` and `type` (refused from those two fields
        // alone while shedding), half have `type` after `lead` (decoded in full first).
        let text = if i % 2 == 0 {
            format!(r#"{{"id":"s{i}","type":"publish_lead","lead":{}}}"#, lead(&format!("S{i}")))
        } else {
            json!({"lead": lead(&format!("S{i}")), "id": format!("s{i}"), "type": "publish_lead"}).to_string()
        };
        c.ws.feed(Message::Text(text)).await.unwrap();
    }
    c.ws.flush().await.unwrap();
    let (mut shed, mut accepted) = (Vec::new(), Vec::new());
    let mut seen = std::collections::BTreeSet::new();
    while seen.len() < n {
        let Some(Message::Text(t)) = recv_raw(&mut c).await else { continue };
        let v: Value = serde_json::from_str(&t).unwrap();
        let id = v["id"].as_str().unwrap_or_else(|| panic!("a reply without id: {v}")).to_string();
        assert!(seen.insert(id.clone()), "a second reply to {id}: {v}");
        let lead_id = format!("S{}", &id[1..]);
        if v["code"] == "overloaded" {
            assert!(v["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "a retry hint: {v}");
            shed.push(lead_id);
        } else {
            assert_eq!(v["type"], "ok", "{v}");
            accepted.push(lead_id);
        }
    }
    assert!(!shed.is_empty(), "a burst of {n} unread frames over a 1-byte limit sheds some");
    let odd = |l: &String| l[1..].parse::<usize>().unwrap() % 2 == 1;
    assert!(shed.iter().any(odd) && shed.iter().any(|l| !odd(l)), "both frame forms are shed");
    assert!(!accepted.is_empty(), "once caught up, the gateway accepts again");
    for l in shed.iter().take(50) {
        let (r, _) = c.call(json!({"type": "explain", "lead": l})).await;
        assert_eq!(r["code"], "unknown_lead", "a shed lead stored nothing: {r}");
    }
    for l in accepted.iter().take(50) {
        let (r, _) = c.call(json!({"type": "explain", "lead": l})).await;
        assert_eq!(r["type"], "ok", "an accepted lead is there: {r}");
    }
    // Retried one at a time (nothing waiting behind it), a shed lead goes through.
    let (r, _) = c.call(json!({"type": "publish_lead", "lead": lead(&shed[0])})).await;
    assert_eq!(r["type"], "ok", "{r}");
}

/// A daemon started with a low open-file limit (soft = hard = 320, as a service manager
/// might set) caps its connections to leave the log its descriptors: it says so at
/// start, a flood of 400 connections meets `connections_full` beyond the cap, and
/// meanwhile a client connected before keeps publishing while the log rolls over to
/// new segment files (16 KiB segments). Without the cap the flood took every
/// descriptor and the log could not open its next segment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connections_under_a_low_open_file_limit_leaves_the_log_its_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "");
    let data = dir.path().join("data");
    let (d, warning) = Daemon::start_with_nofile_limit(
        &data,
        &cfg,
        &["wal.segment_bytes=16384"],
        320,
        "open-file limit is below max_connections",
    );
    assert!(warning.contains("at most 64 connections"), "the cap is announced: {warning}");
    let mut c = Client::connect(&d.addr, "pp-token", false).await;
    still_serves(&mut c).await;
    // The flood: connections that never upgrade, more than the descriptors the
    // process may open.
    let mut flood = Vec::new();
    for _ in 0..400 {
        flood.push(tokio::net::TcpStream::connect(&d.addr).await.expect("the kernel takes the connection"));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while d.metric_with("rota_overload_refusals_total", &[("reason", "connections_full")]) < 337.0 {
        assert!(std::time::Instant::now() < deadline, "beyond the cap, connections are refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Meanwhile the log rolls over to new segment files, every publish acknowledged.
    let segments = || std::fs::read_dir(data.join("wal")).unwrap().count();
    let before = segments();
    for i in 0..120 {
        let out = c.ok(json!({"type": "publish_lead", "lead": lead(&format!("FD{i}"))})).await;
        assert!(out["status"].is_string(), "{out}");
    }
    assert!(segments() > before, "the log opened new segments: {before} -> {}", segments());
    still_serves(&mut c).await;
    // The flood gone, new clients get in again.
    drop(flood);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut b) =
            tokio::time::timeout(Duration::from_secs(5), Client::connect(&d.addr, "pp-token", true)).await
        {
            still_serves(&mut b).await;
            break;
        }
        assert!(std::time::Instant::now() < deadline, "a new client gets in once the flood is gone");
    }
    assert_eq!(d.metric_with("rota_overload_refusals_total", &[("reason", "fd_limit")]), 0.0);
}
