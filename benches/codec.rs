//! Protocol codec: decode of a `publish_lead` request frame, encode of its reply and of
//! a dispatched offer's stream frame, JSON against MessagePack; the cost of refusing a
//! request of a flood; the error path (the diagnosis of a frame that fails to decode),
//! for a small bad frame and for a large one built to make the search for its bad field
//! expensive.
//!
//! `cargo bench --bench codec`. Results and machine: BENCHMARKS.md, "Codec".

use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rota::core::Lead;
use rota::engine::hub::{Outgoing, Prepared, StreamHub};
use rota::protocol::{self, Encoding, Envelope, LeadSummary, OkResult, Reply, Request, StreamEvent};
use serde::Serialize;
use serde_json::json;
use std::sync::Arc;

fn publish_frame() -> serde_json::Value {
    json!({
        "id": "c-000123456",
        "type": "publish_lead",
        "lead": {
            "id": "run7-L000123456",
            "category": "painting",
            "zone": "bologna",
            "location": {"lat": 44.4949, "lon": 11.3426},
            "description": "Repaint a two-room flat: walls and ceilings, about 70 square metres, \
                            furniture moved by us, start within two weeks",
            "details": {"rooms": "2", "surface_m2": "70", "when": "within 2 weeks"},
            "attributes": ["residential"],
            "client": {
                "id": "client-88231",
                "name": "Anna Rossi",
                "phone": "+39 333 1234567",
                "phone_verified": true,
                "contact": {"call": true, "whatsapp": false, "chat": true}
            },
            "direct": [],
            "created_at": 1_795_424_400_000u64
        }
    })
}

fn offer_frame() -> serde_json::Value {
    json!({"id": "c-000123457", "type": "offer", "lead": "run7-L000123456", "pro": "pro-017",
           "action": "decline", "by": "pro"})
}

fn order_frame() -> serde_json::Value {
    json!({"id": "c-000123458", "type": "order", "command": {"type": "place_order", "order": "o-000123",
           "placement": {"pro": "pro-017", "client": "client-88231", "service": "painting",
                         "package": "basic", "returning_client": false}}})
}

fn frame_bytes(enc: Encoding) -> Vec<u8> {
    let v = publish_frame();
    match enc {
        Encoding::Json => serde_json::to_vec(&v).unwrap(),
        Encoding::Msgpack => rmp_serde::to_vec_named(&v).unwrap(),
    }
}

fn envelope() -> Envelope {
    protocol::decode(Encoding::Json, &frame_bytes(Encoding::Json)).expect("the bench frame is valid")
}

fn reply() -> Reply {
    let lead = match envelope().request {
        Request::PublishLead { lead } => lead,
        _ => unreachable!(),
    };
    let json = json!({
        "lead": lead.id, "status": "accepted", "price": 12,
        "offers": [["pro-001", "match"], ["pro-017", "match"], ["pro-101", "match"], ["pro-240", "match"]],
        "release_at": null, "expires_at": 1_795_683_600_000u64
    });
    Reply::Ok { id: "c-000123456".into(), result: OkResult::Lead(serde_json::from_value(json).unwrap()) }
}

fn offered(lead: &Lead) -> StreamEvent {
    serde_json::from_value(json!({
        "event": "offered", "lead": lead.id, "pro": "pro-017", "kind": "match", "price": 12,
        "respond_by": 1_795_683_600_000u64, "at": 1_795_424_400_000u64,
        "summary": LeadSummary::of(lead),
    }))
    .expect("the bench event is valid")
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1));
    let lead = match envelope().request {
        Request::PublishLead { lead } => lead,
        _ => unreachable!(),
    };
    for enc in [Encoding::Json, Encoding::Msgpack] {
        let bytes = frame_bytes(enc);
        g.bench_function(format!("decode_publish_lead/{}", enc.label()), |b| {
            b.iter(|| protocol::decode(enc, black_box(&bytes)).unwrap())
        });
        // The same request with `id` and `type` first (as `Envelope` encodes it): its
        // full decode, and the peek that refusing it under overload does instead.
        let fast = protocol::encode(enc, &envelope());
        g.bench_function(format!("decode_publish_lead_id_type_first/{}", enc.label()), |b| {
            b.iter(|| protocol::decode(enc, black_box(&fast)).unwrap())
        });
        // Requests serde reads from a buffer of their fields (an `offer`'s flattened
        // action, an order's internally tagged command).
        for (name, frame) in [("decode_offer_decline", offer_frame()), ("decode_order_place", order_frame())]
        {
            // `id` and `type` first, as `Envelope` encodes it.
            let env: Envelope = protocol::decode(Encoding::Json, &serde_json::to_vec(&frame).unwrap())
                .expect("the bench frame is valid");
            let bytes = protocol::encode(enc, &env);
            g.bench_function(format!("{name}/{}", enc.label()), |b| {
                b.iter(|| protocol::decode(enc, black_box(&bytes)).unwrap())
            });
        }
        g.bench_function(format!("peek_publish_lead/{}", enc.label()), |b| {
            b.iter(|| protocol::peek_head(enc, black_box(&fast)).map(|(id, ty)| id.len() + ty.len()).unwrap())
        });
        let r = reply();
        g.bench_function(format!("encode_lead_reply/{}", enc.label()), |b| {
            b.iter(|| protocol::encode(enc, black_box(&r)))
        });
        let ev = Arc::new(offered(&lead));
        g.bench_function(format!("encode_offer_frame/{}", enc.label()), |b| {
            b.iter_batched(
                || Outgoing::new(42, (*ev).clone()),
                |out| out.bytes(enc).len(),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();

    // One release's offers (five pros, one shared lead summary) prepared on the
    // deciding thread and framed at publish: what the stream costs per release.
    let mut g = c.benchmark_group("stream");
    g.throughput(Throughput::Elements(5));
    let one = offered(&lead);
    let release: Vec<StreamEvent> = (0..5)
        .map(|i| {
            let mut ev = one.clone();
            if let StreamEvent::Offered { pro, .. } = &mut ev {
                *pro = rota::ids::ProId::new(format!("pro-{i:03}"));
            }
            ev
        })
        .collect();
    for enc in [Encoding::Json, Encoding::Msgpack] {
        let hub = StreamHub::new(16);
        let _sub = hub.subscribe(None, None, 16, enc).expect("a live subscription");
        g.bench_function(format!("release_5_offers/{}", enc.label()), |b| {
            b.iter_batched(
                || release.clone(),
                |evs| {
                    let prepared = Prepared::batch(evs, &hub);
                    prepared.into_iter().map(|p| Outgoing::new(42, p).bytes(enc).len()).sum::<usize>()
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();

    // Refusing a request of a flood: the head peeked, the bucket checked (spent), the
    // `rate_limited` reply encoded. `old_clock_per_refusal` is what each refusal also
    // paid until 2026-12-07: a governor clock made to tell `retry_after_ms`.
    let mut g = c.benchmark_group("refusal");
    let bytes = format!(r#"{{"id":"c-000123456","type":"publish_lead","lead":{}}}"#, publish_frame()["lead"])
        .into_bytes();
    let spent = rota::ratelimit::per_second(1).expect("a limit");
    let _ = rota::ratelimit::check(&spent);
    g.bench_function("rate_limited/json", |b| {
        b.iter(|| {
            let (id, _ty) = protocol::peek_head(Encoding::Json, black_box(&bytes)).expect("a head");
            // The bucket gets its one token back once a second: that check passes.
            let retry = rota::ratelimit::check(&spent).err().unwrap_or(1);
            let mut e = protocol::ApiError::new("rate_limited", "too many requests; retry later");
            e.retry_after_ms = Some(retry);
            protocol::encode(Encoding::Json, &Reply::Error { id: Some(id.to_string()), error: e }).len()
        })
    });
    g.bench_function("old_clock_per_refusal", |b| b.iter(governor::clock::DefaultClock::default));
    g.finish();
}

/// A map in the order given (the frame's keys in that order in both encodings).
enum W {
    V(serde_json::Value),
    M(Vec<(String, W)>),
}

impl Serialize for W {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            W::V(v) => v.serialize(s),
            W::M(entries) => {
                let mut m = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    m.serialize_entry(k, v)?;
                }
                m.end()
            }
        }
    }
}

/// An `order` frame whose command (buffered by serde, so its bad field is searched for
/// by probing) holds 31 arrays of `per_array` nulls next to its fields, and so does its
/// `offer`, whose `price_cents` is `price`: 32 candidates at each of two levels, and
/// one tree node per MessagePack byte. The arrays are fields the command does not have:
/// refused once the command decodes (a bad `price` is found first).
fn junk_order(price: serde_json::Value, per_array: usize) -> W {
    let junk =
        || (0..31).map(|i| (format!("j{i:02}"), W::V(json!(vec![serde_json::Value::Null; per_array]))));
    let s = |k: &str, v: &str| (k.to_string(), W::V(json!(v)));
    let offer =
        W::M([s("id", "o")].into_iter().chain(junk()).chain([("price_cents".into(), W::V(price))]).collect());
    let command = W::M(
        [s("type", "send_custom_offer"), s("pro", "p"), s("client", "c"), s("service", "painting")]
            .into_iter()
            .chain(junk())
            .chain([("offer".into(), offer)])
            .collect(),
    );
    W::M(vec![s("id", "h"), s("type", "order"), ("command".into(), command)])
}

fn encoded(enc: Encoding, w: &W) -> Vec<u8> {
    match enc {
        Encoding::Json => serde_json::to_vec(w).unwrap(),
        Encoding::Msgpack => rmp_serde::to_vec_named(w).unwrap(),
    }
}

fn error_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("error_path");
    for enc in [Encoding::Json, Encoding::Msgpack] {
        // A publish with a wrong type deep in the lead: decode, then the diagnosis.
        let mut v = publish_frame();
        v["lead"]["location"]["lat"] = json!("north");
        let bad = match enc {
            Encoding::Json => serde_json::to_vec(&v).unwrap(),
            Encoding::Msgpack => rmp_serde::to_vec_named(&v).unwrap(),
        };
        g.bench_function(format!("bad_field_publish/{}", enc.label()), |b| {
            b.iter(|| protocol::decode(enc, black_box(&bad)).unwrap_err())
        });
    }
    // About 128 KiB of MessagePack (and the same frame in JSON, about five times the
    // bytes): the error path of the frame with a good price (its first unknown field
    // named; until 2026-12 the frame was valid, its junk skipped), and of the bad one.
    g.sample_size(10);
    for enc in [Encoding::Msgpack, Encoding::Json] {
        let per_array = 128 * 1024 / 62;
        let unknown = encoded(enc, &junk_order(json!(500), per_array));
        let hostile = encoded(enc, &junk_order(json!("many"), per_array));
        g.bench_function(format!("unknown_junk_order_128k/{}", enc.label()), |b| {
            b.iter(|| protocol::decode(enc, black_box(&unknown)).unwrap_err())
        });
        g.bench_function(format!("hostile_junk_order_128k/{}", enc.label()), |b| {
            b.iter(|| protocol::decode(enc, black_box(&hostile)).unwrap_err())
        });
    }
    g.finish();
}

criterion_group!(benches, codec, error_path);
criterion_main!(benches);
