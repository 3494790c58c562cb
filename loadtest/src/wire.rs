//! Protocol v1 as `docs/PROTOCOL.md` documents it, written from the document and not
//! imported from the daemon: the load tool is a client like any platform's, so a
//! change to the daemon's types that breaks the documented protocol breaks this tool
//! (and its integration test) instead of silently moving both sides together.
//!
//! Requests are the ingest requests a trace replays. Incoming frames are decoded
//! partially: only the fields the tool measures or checks, borrowed from the frame.

use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::collections::BTreeMap;

pub const SUBPROTOCOL_JSON: &str = "rota.v1.json";
pub const SUBPROTOCOL_MSGPACK: &str = "rota.v1.msgpack";

/// Frame encoding on the websocket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    Json,
    #[default]
    Msgpack,
}

impl Encoding {
    pub fn subprotocol(self) -> &'static str {
        match self {
            Encoding::Json => SUBPROTOCOL_JSON,
            Encoding::Msgpack => SUBPROTOCOL_MSGPACK,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GeoPoint {
    pub lat: f64,
    pub lon: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactPrefs {
    pub call: bool,
    pub whatsapp: bool,
    pub chat: bool,
}

impl ContactPrefs {
    pub fn chat_only(&self) -> bool {
        !self.call && !self.whatsapp
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Client {
    pub id: String,
    pub name: String,
    pub phone: String,
    pub phone_verified: bool,
    pub contact: ContactPrefs,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pro_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lead {
    pub id: String,
    pub category: String,
    pub zone: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<GeoPoint>,
    pub description: String,
    #[serde(default)]
    pub details: BTreeMap<String, String>,
    #[serde(default)]
    pub attributes: Vec<String>,
    pub client: Client,
    #[serde(default)]
    pub direct: Vec<String>,
    /// `match`, `direct` or `contact`.
    #[serde(default = "match_kind")]
    pub kind: String,
    /// Unix ms. Replay moves it to the replay's clock (see `trace`).
    pub created_at: i64,
}

fn match_kind() -> String {
    "match".into()
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quality {
    pub reviews: u32,
    pub rating_centi: u32,
    pub projects: u32,
    pub profile_permille: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Availability {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_until: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vacation: Option<(i64, i64)>,
    /// Passed through as written (weekly windows in the pro's time zone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoBuyConfig {
    pub name: String,
    pub zones: Vec<String>,
    pub categories: Vec<String>,
    pub weekly_budget_credits: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_price_credits: Option<u64>,
    pub active: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_until: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pro {
    pub id: String,
    pub categories: Vec<String>,
    pub zones: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<GeoPoint>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub radius_km: Option<f64>,
    #[serde(default)]
    pub quality: Quality,
    #[serde(default)]
    pub refuses: Vec<String>,
    #[serde(default)]
    pub availability: Availability,
    #[serde(default)]
    pub autobuy: Vec<AutoBuyConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum OfferAction {
    Open,
    Respond,
    /// `by`: `pro` or `client`.
    Decline {
        by: String,
    },
    ClientReplied,
    ProReplied,
    ClientViewed,
    Complete,
    AddNote {
        text: String,
    },
    ConfirmInvalidContact,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopupRule {
    pub threshold_credits: u64,
    pub amount_credits: u64,
}

/// The ingest requests of protocol v1 (the ones a trace replays).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    PublishLead {
        lead: Lead,
    },
    UpsertPro {
        pro: Pro,
    },
    RemovePro {
        pro: String,
    },
    SetAvailability {
        pro: String,
        availability: Availability,
    },
    Offer {
        lead: String,
        pro: String,
        #[serde(flatten)]
        action: OfferAction,
    },
    GrantCredits {
        pro: String,
        op: String,
        credits: u64,
    },
    SetTopupRule {
        pro: String,
        rule: Option<TopupRule>,
    },
}

impl Request {
    pub fn name(&self) -> &'static str {
        match self {
            Request::PublishLead { .. } => "publish_lead",
            Request::UpsertPro { .. } => "upsert_pro",
            Request::RemovePro { .. } => "remove_pro",
            Request::SetAvailability { .. } => "set_availability",
            Request::Offer { .. } => "offer",
            Request::GrantCredits { .. } => "grant_credits",
            Request::SetTopupRule { .. } => "set_topup_rule",
        }
    }
}

/// A request frame: the correlation id and the request, flattened into one map.
#[derive(Serialize)]
pub struct Envelope<'a> {
    pub id: &'a str,
    #[serde(flatten)]
    pub request: &'a Request,
}

/// Encodes one frame into `out` (cleared first). MessagePack uses named maps.
pub fn encode_into<T: Serialize>(enc: Encoding, msg: &T, out: &mut Vec<u8>) {
    out.clear();
    match enc {
        Encoding::Json => serde_json::to_writer(&mut *out, msg).expect("plain data always encodes as JSON"),
        Encoding::Msgpack => {
            rmp_serde::encode::write_named(out, msg).expect("plain data always encodes as msgpack")
        }
    }
}

/// What the tool reads from any incoming frame: a reply (`ok` / `error`) or a stream
/// event. Everything else in the frame is skipped.
#[derive(Debug, Deserialize)]
pub struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    pub kind: Cow<'a, str>,
    #[serde(default, borrow)]
    pub id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub code: Option<Cow<'a, str>>,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default, borrow)]
    pub event: Option<EventPart<'a>>,
    #[serde(default)]
    pub result: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
pub struct EventPart<'a> {
    #[serde(borrow)]
    pub event: Cow<'a, str>,
    #[serde(default, borrow)]
    pub lead: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub pro: Option<Cow<'a, str>>,
}

/// The result of a `publish_lead` reply: its status and the offers made at once.
#[derive(Debug, Deserialize)]
pub struct LeadReply<'a> {
    #[serde(borrow)]
    pub result: LeadResult<'a>,
}

#[derive(Debug, Deserialize)]
pub struct LeadResult<'a> {
    #[serde(borrow)]
    pub status: Cow<'a, str>,
    #[serde(default, borrow)]
    pub offers: Vec<(Cow<'a, str>, IgnoredAny)>,
}

/// The result of a `subscribe` reply.
#[derive(Debug, Deserialize)]
pub struct SubscribedReply {
    pub result: Subscribed,
}

#[derive(Debug, Deserialize)]
pub struct Subscribed {
    pub subscribed: bool,
    pub next_seq: u64,
}

impl<'a> Incoming<'a> {
    /// Reads a reply or stream event; MessagePack through [`crate::mpscan`], which skips
    /// the fields the tool does not read without decoding them.
    pub fn read(enc: Encoding, bytes: &'a [u8]) -> anyhow::Result<Self> {
        Ok(match enc {
            Encoding::Json => serde_json::from_slice(bytes)?,
            Encoding::Msgpack => crate::mpscan::incoming(bytes)?,
        })
    }
}

impl<'a> Incoming<'a> {
    /// Calls `f` with the frame, or with each frame of an `events` frame (a batched
    /// subscription), in order.
    pub fn read_each(enc: Encoding, bytes: &'a [u8], mut f: impl FnMut(Incoming<'a>)) -> anyhow::Result<()> {
        match enc {
            Encoding::Json => {
                let one: Incoming<'a> = serde_json::from_slice(bytes)?;
                if one.kind == "events" {
                    let batch: EventsFrame<'a> = serde_json::from_slice(bytes)?;
                    batch.events.into_iter().for_each(f);
                } else {
                    f(one);
                }
            }
            Encoding::Msgpack => crate::mpscan::each(bytes, f)?,
        }
        Ok(())
    }
}

/// `{"type":"events","events":[...]}`: what a `batch: true` subscription receives.
#[derive(Deserialize)]
struct EventsFrame<'a> {
    #[serde(borrow)]
    events: Vec<Incoming<'a>>,
}

/// An `error` reply: its code and message.
#[derive(Debug, Deserialize)]
pub struct ErrorReply {
    pub code: String,
    #[serde(default)]
    pub message: String,
}

pub fn decode<'a, T: Deserialize<'a>>(enc: Encoding, bytes: &'a [u8]) -> anyhow::Result<T> {
    Ok(match enc {
        Encoding::Json => serde_json::from_slice(bytes)?,
        Encoding::Msgpack => rmp_serde::from_slice(bytes)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_each_takes_every_frame_of_an_events_frame_in_both_encodings() {
        let e = |seq: u64| serde_json::json!({"type": "event", "seq": seq, "event": {"event": "lead_closed", "lead": "L1", "at": 1}});
        let batch = serde_json::json!({"type": "events", "events": [e(1), e(2), e(3)]});
        let reply = serde_json::json!({"id": "sub", "type": "ok", "result": {"subscribed": true}});
        for enc in [Encoding::Json, Encoding::Msgpack] {
            let bytes = |v: &serde_json::Value| match enc {
                Encoding::Json => serde_json::to_vec(v).unwrap(),
                Encoding::Msgpack => rmp_serde::to_vec_named(v).unwrap(),
            };
            let b = bytes(&batch);
            let mut seqs = Vec::new();
            Incoming::read_each(enc, &b, |f| seqs.push((f.kind.to_string(), f.seq))).unwrap();
            assert_eq!(
                seqs,
                vec![("event".into(), Some(1)), ("event".into(), Some(2)), ("event".into(), Some(3))]
            );
            let r = bytes(&reply);
            let mut kinds = Vec::new();
            Incoming::read_each(enc, &r, |f| kinds.push((f.kind.to_string(), f.id.map(|i| i.to_string()))))
                .unwrap();
            assert_eq!(kinds, vec![("ok".to_string(), Some("sub".to_string()))], "{enc:?}");
        }
    }

    #[test]
    fn offer_request_matches_the_documented_json() {
        let r = Request::Offer {
            lead: "L1".into(),
            pro: "p1".into(),
            action: OfferAction::Decline { by: "pro".into() },
        };
        let mut out = Vec::new();
        encode_into(Encoding::Json, &Envelope { id: "c1", request: &r }, &mut out);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            r#"{"id":"c1","type":"offer","lead":"L1","pro":"p1","action":"decline","by":"pro"}"#
        );
    }

    #[test]
    fn incoming_frames_decode_in_both_encodings() {
        let v = serde_json::json!({"type":"event","seq":42,"event":{"event":"offered","lead":"L1","pro":"p3",
            "kind":"generic","summary":{"details":{}}}});
        for enc in [Encoding::Json, Encoding::Msgpack] {
            let bytes = match enc {
                Encoding::Json => serde_json::to_vec(&v).unwrap(),
                Encoding::Msgpack => rmp_serde::to_vec_named(&v).unwrap(),
            };
            let f: Incoming = decode(enc, &bytes).unwrap();
            assert_eq!(f.kind, "event");
            assert_eq!(f.seq, Some(42));
            let e = f.event.unwrap();
            assert_eq!(
                (e.event.as_ref(), e.lead.as_deref(), e.pro.as_deref()),
                ("offered", Some("L1"), Some("p3"))
            );
        }
        let ok = br#"{"type":"ok","id":"7","result":{"lead":"L1","status":"accepted","price":10,"offers":[["p1","direct"]]}}"#;
        let f: Incoming = decode(Encoding::Json, ok).unwrap();
        assert_eq!(f.id.as_deref(), Some("7"));
        let l: LeadReply = decode(Encoding::Json, ok).unwrap();
        assert_eq!(l.result.status, "accepted");
        assert_eq!(l.result.offers[0].0, "p1");
        let err = br#"{"type":"error","id":null,"code":"bad_frame","message":"x"}"#;
        let f: Incoming = decode(Encoding::Json, err).unwrap();
        assert_eq!((f.id, f.code.as_deref()), (None, Some("bad_frame")));
    }
}
