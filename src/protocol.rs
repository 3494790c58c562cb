//! Protocol v1: the messages on the websocket, and their two encodings.
//!
//! * `rota.v1.json`: one JSON object per text frame.
//! * `rota.v1.msgpack`: one MessagePack map per binary frame, with the same field
//!   names as JSON (named maps, never positional arrays), so any language's msgpack
//!   library can read it.
//!
//! Pure: no I/O. `docs/PROTOCOL.md` documents every message with examples.

use crate::core::shard::{Candidates, Explanation, LeadOutcome, OfferView};
use crate::core::{Availability, GeoPoint, Lead, OfferAction, OfferKind, Pro};
use crate::ids::{CategoryId, LeadId, Millis, ProId, ZoneId};
use serde::{Deserialize, Serialize};

pub const SUBPROTOCOL_JSON: &str = "rota.v1.json";
pub const SUBPROTOCOL_MSGPACK: &str = "rota.v1.msgpack";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Json,
    Msgpack,
}

impl Encoding {
    pub fn from_subprotocol(s: &str) -> Option<Self> {
        match s.trim() {
            SUBPROTOCOL_JSON => Some(Encoding::Json),
            SUBPROTOCOL_MSGPACK => Some(Encoding::Msgpack),
            _ => None,
        }
    }

    pub fn subprotocol(self) -> &'static str {
        match self {
            Encoding::Json => SUBPROTOCOL_JSON,
            Encoding::Msgpack => SUBPROTOCOL_MSGPACK,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::Msgpack => "msgpack",
        }
    }
}

/// What a token may do (checked per request).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Publish leads, pro and ledger updates, offer actions.
    Ingest,
    /// Subscribe to dispatched events.
    Stream,
    /// Explain, candidates, search, balances, the manual clock.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ingest => "ingest",
            Scope::Stream => "stream",
            Scope::Admin => "admin",
        }
    }
}

/// One request frame: a client correlation id, the request's `type` and the
/// request's fields, all in one flat map:
/// `{"id": "c1", "type": "publish_lead", "lead": {...}}`.
///
/// Decoding streams the request's fields straight into the request (see
/// [`envelope_de`]) instead of buffering the whole frame the way serde's internally
/// tagged enums and `flatten` do; encoding (clients and tests only) goes through
/// `serde_json::Value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// Echoed in the reply; any string up to 128 bytes.
    pub id: String,
    pub request: Request,
}

/// A request. Serde sees it externally tagged (`{"publish_lead": {"lead": ...}}`);
/// on the wire the tag is the envelope's `type` field (see [`Envelope`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    PublishLead {
        lead: Lead,
    },
    UpsertPro {
        pro: Pro,
    },
    RemovePro {
        pro: ProId,
    },
    SetAvailability {
        pro: ProId,
        availability: Availability,
    },
    Offer {
        lead: LeadId,
        pro: ProId,
        #[serde(flatten)]
        action: OfferAction,
    },
    GrantCredits {
        pro: ProId,
        /// The platform's payment id: the idempotency key of the grant.
        op: String,
        credits: u64,
    },
    SetTopupRule {
        pro: ProId,
        /// `null` removes the rule.
        rule: Option<TopupRuleWire>,
    },
    Balance {
        pro: ProId,
    },
    Subscribe {
        /// Deliver everything after this stream sequence number, then live events.
        #[serde(default)]
        resume_from: Option<u64>,
        /// Only events about this pro (a per-pro feed).
        #[serde(default)]
        pro: Option<ProId>,
        /// Deliver consecutive events together in `events` frames (one frame for
        /// what is ready at once, instead of one frame per event).
        #[serde(default)]
        batch: bool,
    },
    Explain {
        lead: LeadId,
    },
    Candidates {
        zone: ZoneId,
        category: CategoryId,
        #[serde(default)]
        location: Option<GeoPoint>,
        #[serde(default)]
        attributes: Vec<String>,
    },
    /// R18: the pro's offers (in every shard it covers) matching `query`.
    Search {
        pro: ProId,
        query: String,
    },
    AdvanceClock {
        to_ms: Millis,
    },
    /// Order requests (R25-R27): acceptance modes, orders, approvals, custom offers.
    Order {
        command: crate::core::orders::OrderCommand,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopupRuleWire {
    pub threshold_credits: u64,
    pub amount_credits: u64,
}

impl Request {
    /// Every request `type`, as on the wire.
    pub const TYPES: &'static [&'static str] = &[
        "publish_lead",
        "upsert_pro",
        "remove_pro",
        "set_availability",
        "offer",
        "grant_credits",
        "set_topup_rule",
        "balance",
        "subscribe",
        "explain",
        "candidates",
        "search",
        "advance_clock",
        "order",
    ];

    pub fn name(&self) -> &'static str {
        match self {
            Request::PublishLead { .. } => "publish_lead",
            Request::UpsertPro { .. } => "upsert_pro",
            Request::RemovePro { .. } => "remove_pro",
            Request::SetAvailability { .. } => "set_availability",
            Request::Offer { .. } => "offer",
            Request::GrantCredits { .. } => "grant_credits",
            Request::SetTopupRule { .. } => "set_topup_rule",
            Request::Balance { .. } => "balance",
            Request::Subscribe { .. } => "subscribe",
            Request::Explain { .. } => "explain",
            Request::Candidates { .. } => "candidates",
            Request::Search { .. } => "search",
            Request::AdvanceClock { .. } => "advance_clock",
            Request::Order { .. } => "order",
        }
    }

    pub fn scope(&self) -> Scope {
        match self {
            Request::PublishLead { .. }
            | Request::UpsertPro { .. }
            | Request::RemovePro { .. }
            | Request::SetAvailability { .. }
            | Request::Offer { .. }
            | Request::GrantCredits { .. }
            | Request::SetTopupRule { .. }
            | Request::Order { .. } => Scope::Ingest,
            Request::Subscribe { .. } => Scope::Stream,
            Request::Balance { .. }
            | Request::Explain { .. }
            | Request::Candidates { .. }
            | Request::Search { .. }
            | Request::AdvanceClock { .. } => Scope::Admin,
        }
    }
}

/// The one reply every request gets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Ok {
        id: String,
        result: OkResult,
    },
    Error {
        id: Option<String>,
        #[serde(flatten)]
        error: ApiError,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OkResult {
    Lead(LeadOutcome),
    Offer(OfferView),
    Explain(Explanation),
    Candidates(Candidates),
    Search { offers: Vec<OfferView> },
    Balance(BalanceWire),
    Subscribed { subscribed: bool, next_seq: u64 },
    Clock { now_ms: Millis },
    Order(crate::core::orders::OrderReply),
    Done { done: bool },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalanceWire {
    pub pro: ProId,
    pub available: u64,
    pub held: u64,
    pub captured: u64,
    pub refunded: u64,
    pub granted: u64,
    pub topup_pending: bool,
}

/// An error with a stable code. `field` names the bad field for `invalid_field`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl ApiError {
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self { code: code.into(), message: message.into(), field: None, retry_after_ms: None }
    }

    pub fn overloaded(retry_after_ms: u64) -> Self {
        Self {
            retry_after_ms: Some(retry_after_ms),
            ..Self::new("overloaded", "rota is at capacity; retry later")
        }
    }

    pub fn unavailable(why: impl Into<String>) -> Self {
        Self::new("unavailable", why)
    }
}

impl From<crate::core::orders::OrderReject> for ApiError {
    fn from(r: crate::core::orders::OrderReject) -> Self {
        let field = match &r {
            crate::core::orders::OrderReject::InvalidField(f) => Some(f.field.clone()),
            _ => None,
        };
        Self { code: r.code().into(), message: r.to_string(), field, retry_after_ms: None }
    }
}

impl From<crate::core::Reject> for ApiError {
    fn from(r: crate::core::Reject) -> Self {
        let field = match &r {
            crate::core::Reject::InvalidField(f) => Some(f.field.clone()),
            _ => None,
        };
        Self { code: r.code().into(), message: r.to_string(), field, retry_after_ms: None }
    }
}

/// One event on a stream, with its per-tenant sequence number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamFrame {
    #[serde(rename = "type")]
    pub kind: StreamTag,
    pub seq: u64,
    pub event: StreamEvent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamTag {
    Event,
}

/// The frame a `subscribe` with `batch: true` receives: `{"type":"events","events":[..]}`,
/// each element exactly the [`StreamFrame`] an unbatched subscriber would get as a frame
/// of its own, in sequence order. Built from already encoded frames by concatenation
/// (the events are not encoded again).
pub struct EventsFrame {
    enc: Encoding,
    buf: Vec<u8>,
    count: u32,
}

/// `{"type":"events","events":[` (JSON).
const EVENTS_JSON_HEAD: &[u8] = br#"{"type":"events","events":["#;
/// A map of two, `"type": "events"`, `"events":` and an array32 header whose count is
/// filled in by [`EventsFrame::finish`] (MessagePack).
const EVENTS_MSGPACK_HEAD: &[u8] = b"\x82\xa4type\xa6events\xa6events\xdd\0\0\0\0";

impl EventsFrame {
    pub fn new(enc: Encoding) -> Self {
        let head = match enc {
            Encoding::Json => EVENTS_JSON_HEAD,
            Encoding::Msgpack => EVENTS_MSGPACK_HEAD,
        };
        let mut buf = Vec::with_capacity(8 << 10);
        buf.extend_from_slice(head);
        EventsFrame { enc, buf, count: 0 }
    }

    /// Appends one encoded [`StreamFrame`] (the bytes an unbatched subscriber gets).
    pub fn push(&mut self, frame: &[u8]) {
        if self.enc == Encoding::Json && self.count > 0 {
            self.buf.push(b',');
        }
        self.buf.extend_from_slice(frame);
        self.count += 1;
    }

    pub fn len(&self) -> usize {
        self.count as usize
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes so far.
    pub fn bytes_len(&self) -> usize {
        self.buf.len()
    }

    pub fn finish(mut self) -> Vec<u8> {
        match self.enc {
            Encoding::Json => self.buf.extend_from_slice(b"]}"),
            Encoding::Msgpack => {
                let at = EVENTS_MSGPACK_HEAD.len() - 4;
                self.buf[at..at + 4].copy_from_slice(&self.count.to_be_bytes());
            }
        }
        self.buf
    }
}

/// What subscribers see. Offers carry no client PII before the pro responded (R8).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
// Built once per event and shared by every subscriber behind an `Arc`, so the size of
// the largest variant costs nothing per subscriber.
#[allow(clippy::large_enum_variant)]
pub enum StreamEvent {
    LeadAccepted {
        lead: LeadId,
        zone: ZoneId,
        category: CategoryId,
        price: u64,
        release_at: Option<Millis>,
        expires_at: Millis,
        at: Millis,
    },
    LeadRejected {
        lead: LeadId,
        reason: String,
        at: Millis,
    },
    Offered {
        lead: LeadId,
        pro: ProId,
        kind: OfferKind,
        price: u64,
        respond_by: Option<Millis>,
        at: Millis,
        summary: std::sync::Arc<LeadSummary>,
        /// R11: the price's inputs, so a pro can see why the lead costs what it costs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        price_components: Option<std::sync::Arc<crate::pricing::PriceComponents>>,
    },
    Responded {
        lead: LeadId,
        pro: ProId,
        at: Millis,
        contact: crate::core::RevealedContact,
    },
    OfferStatus {
        lead: LeadId,
        pro: ProId,
        status: String,
        at: Millis,
    },
    LeadClosed {
        lead: LeadId,
        at: Millis,
    },
    Credits {
        pro: ProId,
        op: String,
        /// granted, charged, held, captured, released, refunded, budget_spent,
        /// budget_recharged, budget_refunded.
        movement: String,
        credits: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    TopupRequested {
        pro: ProId,
        credits: u64,
    },
    /// A fact of the order-request flow (R25-R27).
    Order {
        fact: crate::core::orders::OrderEvent,
    },
}

impl StreamEvent {
    /// The pro this event is about, for per-pro feeds.
    pub fn pro(&self) -> Option<&ProId> {
        match self {
            StreamEvent::Offered { pro, .. }
            | StreamEvent::Responded { pro, .. }
            | StreamEvent::OfferStatus { pro, .. }
            | StreamEvent::Credits { pro, .. }
            | StreamEvent::TopupRequested { pro, .. } => Some(pro),
            _ => None,
        }
    }
}

/// A lead as a pro sees it before responding: no name, phone or exact address, and
/// the location rounded to about a kilometre (R8).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeadSummary {
    pub zone: ZoneId,
    pub category: CategoryId,
    pub description: String,
    pub details: crate::core::Details,
    pub attributes: Vec<String>,
    pub approx_location: Option<GeoPoint>,
    pub contact: crate::core::ContactPrefs,
    pub created_at: Millis,
}

impl LeadSummary {
    pub fn of(lead: &Lead) -> Self {
        let round = |x: f64| (x * 100.0).round() / 100.0;
        LeadSummary {
            zone: lead.zone.clone(),
            category: lead.category.clone(),
            description: lead.description.clone(),
            details: lead.details.clone(),
            attributes: lead.attributes.clone(),
            approx_location: lead.location.map(|g| GeoPoint { lat: round(g.lat), lon: round(g.lon) }),
            contact: lead.client.contact,
            created_at: lead.created_at,
        }
    }
}

/// Why a frame could not be read. Each maps to a specific error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    pub id: Option<String>,
    pub code: &'static str,
    pub message: String,
    /// The bad field, when it can be told (`lead.location.lat`).
    pub field: Option<String>,
}

/// Largest correlation id accepted.
pub const MAX_CORRELATION_ID: usize = 128;

pub fn decode(enc: Encoding, bytes: &[u8]) -> Result<Envelope, DecodeError> {
    let parsed = match enc {
        Encoding::Json => serde_json::from_slice::<Envelope>(bytes).map_err(|e| e.to_string()),
        Encoding::Msgpack => rmp_serde::from_slice::<Envelope>(bytes).map_err(|e| e.to_string()),
    };
    match parsed {
        Ok(env) if env.id.len() > MAX_CORRELATION_ID => Err(DecodeError {
            id: None,
            code: "invalid_field",
            message: "id: longer than 128 bytes".into(),
            field: Some("id".into()),
        }),
        Ok(env) => Ok(env),
        Err(message) => {
            let id = peek_id(enc, bytes);
            let code = if message.contains(envelope_de::UNKNOWN_TYPE) {
                "unknown_message"
            } else if message.contains("missing field `type`") || message.contains("missing field `id`") {
                "bad_frame"
            } else if id.is_some() {
                "invalid_field"
            } else {
                "bad_frame"
            };
            let field = if code == "invalid_field" { field_path(enc, bytes) } else { None };
            Err(DecodeError { id, code, message, field })
        }
    }
}

/// The path of the field that failed to decode (`lead.location.lat`): the frame is
/// decoded again, only after a failure, with the path tracked.
fn field_path(enc: Encoding, bytes: &[u8]) -> Option<String> {
    fn tracked<'de, D: serde::Deserializer<'de>>(d: D) -> Option<String> {
        let path = serde_path_to_error::deserialize::<_, Envelope>(d).err()?.path().to_string();
        (path != "." && !path.is_empty()).then_some(path)
    }
    let found = match enc {
        Encoding::Json => tracked(&mut serde_json::Deserializer::from_slice(bytes)),
        Encoding::Msgpack => tracked(&mut rmp_serde::Deserializer::from_read_ref(bytes)),
    };
    found.or_else(|| {
        // Fields before `type` are buffered, which hides their path: decode the frame
        // once more with `id` and `type` moved to the front.
        let v: serde_json::Value = match enc {
            Encoding::Json => serde_json::from_slice(bytes).ok()?,
            Encoding::Msgpack => rmp_serde::from_slice(bytes).ok()?,
        };
        let obj = v.as_object()?;
        let mut text = String::from("{");
        for (k, v) in ["id", "type"]
            .iter()
            .filter_map(|k| obj.get_key_value(*k))
            .chain(obj.iter().filter(|(k, _)| *k != "id" && *k != "type"))
        {
            if text.len() > 1 {
                text.push(',');
            }
            text.push_str(&serde_json::to_string(k).ok()?);
            text.push(':');
            text.push_str(&v.to_string());
        }
        text.push('}');
        tracked(&mut serde_json::Deserializer::from_str(&text))
    })
}

/// Best effort: the correlation id of a frame that failed to decode, so the error
/// reply can still be matched to its request; also of a frame refused unread (one pass
/// over the frame that builds nothing but the id).
pub fn peek_id(enc: Encoding, bytes: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct IdOnly {
        id: String,
    }
    let id = match enc {
        Encoding::Json => serde_json::from_slice::<IdOnly>(bytes).ok()?.id,
        Encoding::Msgpack => rmp_serde::from_slice::<IdOnly>(bytes).ok()?.id,
    };
    (id.len() <= MAX_CORRELATION_ID).then_some(id)
}

/// The `id` and `type` of a frame that starts with them (in either order), read
/// without decoding the rest: what the gateway needs to refuse a request it sheds
/// (`overloaded`) for less than a full decode. `None` for anything else (other keys
/// first, escapes in JSON strings, an `id` over [`MAX_CORRELATION_ID`] bytes, a
/// malformed frame); the caller then decodes in full, which gives the precise error.
pub fn peek_head(enc: Encoding, bytes: &[u8]) -> Option<(&str, &str)> {
    let (k1, v1, k2, v2) = match enc {
        Encoding::Msgpack => peek_msgpack(bytes)?,
        Encoding::Json => peek_json(bytes)?,
    };
    let (id, ty) = match (k1, k2) {
        (b"id", b"type") => (v1, v2),
        (b"type", b"id") => (v2, v1),
        _ => return None,
    };
    if id.len() > MAX_CORRELATION_ID {
        return None;
    }
    Some((std::str::from_utf8(id).ok()?, std::str::from_utf8(ty).ok()?))
}

type Head<'a> = (&'a [u8], &'a [u8], &'a [u8], &'a [u8]);

fn peek_msgpack(b: &[u8]) -> Option<Head<'_>> {
    // A map of at least two entries: fixmap, map16, map32.
    let (entries, mut at) = match *b.first()? {
        m @ 0x80..=0x8f => (u32::from(m & 0x0f), 1),
        0xde => (u32::from(u16::from_be_bytes([*b.get(1)?, *b.get(2)?])), 3),
        0xdf => (u32::from_be_bytes([*b.get(1)?, *b.get(2)?, *b.get(3)?, *b.get(4)?]), 5),
        _ => return None,
    };
    if entries < 2 {
        return None;
    }
    let mut s = || -> Option<&[u8]> {
        let (len, head) = match *b.get(at)? {
            m @ 0xa0..=0xbf => (usize::from(m & 0x1f), 1),
            0xd9 => (usize::from(*b.get(at + 1)?), 2),
            0xda => (usize::from(u16::from_be_bytes([*b.get(at + 1)?, *b.get(at + 2)?])), 3),
            _ => return None,
        };
        let v = b.get(at + head..at + head + len)?;
        at += head + len;
        Some(v)
    };
    Some((s()?, s()?, s()?, s()?))
}

fn peek_json(b: &[u8]) -> Option<Head<'_>> {
    let mut at = 0;
    let ws = |at: &mut usize| {
        while b.get(*at).is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r')) {
            *at += 1;
        }
    };
    let byte = |at: &mut usize, want: u8| -> Option<()> {
        ws(at);
        (*b.get(*at)? == want).then(|| *at += 1)
    };
    // A string without escapes.
    let string = |at: &mut usize| -> Option<&[u8]> {
        ws(at);
        if *b.get(*at)? != b'"' {
            return None;
        }
        let start = *at + 1;
        let len = b.get(start..)?.iter().position(|&c| c == b'"' || c == b'\\')?;
        if b[start + len] != b'"' {
            return None;
        }
        *at = start + len + 1;
        Some(&b[start..start + len])
    };
    byte(&mut at, b'{')?;
    let k1 = string(&mut at)?;
    byte(&mut at, b':')?;
    let v1 = string(&mut at)?;
    byte(&mut at, b',')?;
    let k2 = string(&mut at)?;
    byte(&mut at, b':')?;
    let v2 = string(&mut at)?;
    Some((k1, v1, k2, v2))
}

/// Encodes any outgoing message. MessagePack uses named maps.
pub fn encode<T: Serialize>(enc: Encoding, msg: &T) -> Vec<u8> {
    with_scratch(|buf| {
        encode_into(enc, msg, buf);
        buf.to_vec()
    })
}

/// Appends the encoding of `msg` to `buf`.
pub fn encode_into<T: Serialize>(enc: Encoding, msg: &T, buf: &mut Vec<u8>) {
    match enc {
        Encoding::Json => {
            serde_json::to_writer(&mut *buf, msg).expect("protocol types always serialise to JSON")
        }
        Encoding::Msgpack => {
            rmp_serde::encode::write_named(buf, msg).expect("protocol types always serialise to msgpack")
        }
    }
}

/// Runs `f` with this thread's cleared scratch buffer. Encoders write there and copy
/// the result out once, at its exact size: a frame grown in a fresh `Vec` costs a
/// chain of reallocations (a third of the encoding time in profiles).
pub fn with_scratch<R>(f: impl FnOnce(&mut Vec<u8>) -> R) -> R {
    thread_local! {
        static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(Vec::with_capacity(4096));
    }
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buf) => {
            buf.clear();
            let r = f(&mut buf);
            // Do not keep a huge buffer around after one large frame.
            if buf.capacity() > 1 << 20 {
                *buf = Vec::with_capacity(4096);
            }
            r
        }
        // Re-entered (an encoder inside an encoder): use a buffer of its own.
        Err(_) => f(&mut Vec::with_capacity(1024)),
    })
}

/// The envelope's decoder and encoder.
///
/// Decoding reads the frame's keys in order: `id` and `type` are taken as they come;
/// at the first other key, if `type` is known, the rest of the map is handed to the
/// request's variant as its fields (a later `id` is still picked out). Nothing is
/// buffered, so a `publish_lead` decodes about twice as fast as with serde's internally
/// tagged `flatten`. A frame whose `type` comes after the request's fields is valid too:
/// its fields are then buffered (as a JSON value) and decoded once `type` is known.
pub mod envelope_de {
    use super::{Envelope, Request};
    use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
    use serde::ser::SerializeMap;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::borrow::Cow;
    use std::fmt;

    /// Marks the error for an unknown `type` (mapped to `unknown_message`).
    pub const UNKNOWN_TYPE: &str = "unknown message type";

    impl Serialize for Envelope {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::Error;
            let body = serde_json::to_value(&self.request).map_err(S::Error::custom)?;
            let serde_json::Value::Object(outer) = body else {
                return Err(S::Error::custom("a request serialises as a one-entry map"));
            };
            let (tag, fields) = outer.into_iter().next().ok_or_else(|| S::Error::custom("empty request"))?;
            let mut map = s.serialize_map(None)?;
            map.serialize_entry("id", &self.id)?;
            map.serialize_entry("type", &tag)?;
            if let serde_json::Value::Object(fields) = fields {
                for (k, v) in fields {
                    map.serialize_entry(&k, &v)?;
                }
            }
            map.end()
        }
    }

    impl<'de> Deserialize<'de> for Envelope {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_map(EnvelopeVisitor)
        }
    }

    /// A map key, borrowed from the frame when the format allows.
    struct Key<'de>(Cow<'de, str>);

    impl<'de> Deserialize<'de> for Key<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Key<'de>;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("a string key")
                }
                fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Key<'de>, E> {
                    Ok(Key(Cow::Borrowed(v)))
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Key<'de>, E> {
                    Ok(Key(Cow::Owned(v.to_owned())))
                }
                fn visit_string<E: de::Error>(self, v: String) -> Result<Key<'de>, E> {
                    Ok(Key(Cow::Owned(v)))
                }
                fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<Key<'de>, E> {
                    std::str::from_utf8(v).map(|s| Key(Cow::Borrowed(s))).map_err(E::custom)
                }
                fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Key<'de>, E> {
                    std::str::from_utf8(v).map(|s| Key(Cow::Owned(s.to_owned()))).map_err(E::custom)
                }
            }
            d.deserialize_str(V)
        }
    }

    struct EnvelopeVisitor;

    impl<'de> Visitor<'de> for EnvelopeVisitor {
        type Value = Envelope;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a request: a map with `id`, `type` and the request's fields")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Envelope, A::Error> {
            let mut id: Option<String> = None;
            let mut tag: Option<String> = None;
            while let Some(key) = map.next_key::<Key<'de>>()? {
                match &*key.0 {
                    "id" => {
                        if id.is_some() {
                            return Err(de::Error::duplicate_field("id"));
                        }
                        id = Some(map.next_value()?);
                    }
                    "type" => {
                        if tag.is_some() {
                            return Err(de::Error::duplicate_field("type"));
                        }
                        tag = Some(map.next_value()?);
                    }
                    _ => {
                        let request = match &tag {
                            Some(t) => {
                                let body = Body { first: Some(key.0), map: &mut map, id: &mut id };
                                Request::deserialize(Tagged { tag: t, body })?
                            }
                            // `type` comes later: keep the fields until it is known.
                            None => buffered(key.0, &mut map, &mut id, &mut tag)?,
                        };
                        let id = id.ok_or_else(|| de::Error::missing_field("id"))?;
                        return Ok(Envelope { id, request });
                    }
                }
            }
            let t = tag.ok_or_else(|| de::Error::missing_field("type"))?;
            let id = id.ok_or_else(|| de::Error::missing_field("id"))?;
            let empty = serde_json::Map::new();
            let request = Request::deserialize(Tagged {
                tag: &t,
                body: de::value::MapDeserializer::<_, A::Error>::new(
                    empty.into_iter().map(|(k, v)| (k, JsonValue(v))),
                ),
            })?;
            Ok(Envelope { id, request })
        }
    }

    /// The slow path: fields before `type`, collected as JSON values.
    fn buffered<'de, A: MapAccess<'de>>(
        first: Cow<'de, str>,
        map: &mut A,
        id: &mut Option<String>,
        tag: &mut Option<String>,
    ) -> Result<Request, A::Error> {
        let mut fields = vec![(first.into_owned(), map.next_value::<serde_json::Value>()?)];
        while let Some(key) = map.next_key::<Key<'de>>()? {
            match &*key.0 {
                "id" if id.is_none() => *id = Some(map.next_value()?),
                "type" if tag.is_none() => *tag = Some(map.next_value()?),
                "id" => return Err(de::Error::duplicate_field("id")),
                "type" => return Err(de::Error::duplicate_field("type")),
                _ => fields.push((key.0.into_owned(), map.next_value()?)),
            }
        }
        let t = tag.as_deref().ok_or_else(|| de::Error::missing_field("type"))?;
        Request::deserialize(Tagged {
            tag: t,
            body: de::value::MapDeserializer::<_, A::Error>::new(
                fields.into_iter().map(|(k, v)| (k, JsonValue(v))),
            ),
        })
    }

    /// A JSON value handed to a `MapDeserializer` (its errors converted to the
    /// frame's error type).
    struct JsonValue(serde_json::Value);

    impl<'de, E: de::Error> IntoDeserializer<'de, E> for JsonValue {
        type Deserializer = JsonValueDe<E>;
        fn into_deserializer(self) -> JsonValueDe<E> {
            JsonValueDe(self.0, std::marker::PhantomData)
        }
    }

    struct JsonValueDe<E>(serde_json::Value, std::marker::PhantomData<E>);

    impl<'de, E: de::Error> Deserializer<'de> for JsonValueDe<E> {
        type Error = E;
        fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, E> {
            self.0.deserialize_any(v).map_err(E::custom)
        }
        fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, E> {
            self.0.deserialize_option(v).map_err(E::custom)
        }
        fn deserialize_enum<V: Visitor<'de>>(
            self,
            name: &'static str,
            variants: &'static [&'static str],
            v: V,
        ) -> Result<V::Value, E> {
            self.0.deserialize_enum(name, variants, v).map_err(E::custom)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf unit unit_struct newtype_struct seq tuple
            tuple_struct map struct identifier ignored_any
        }
    }

    /// The rest of the frame's map, as the request's fields: starts with the key
    /// already read, and takes out an `id` that comes after the fields.
    struct Body<'a, 'de, A> {
        first: Option<Cow<'de, str>>,
        map: &'a mut A,
        id: &'a mut Option<String>,
    }

    impl<'de, A: MapAccess<'de>> MapAccess<'de> for Body<'_, 'de, A> {
        type Error = A::Error;

        fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
            let key = match self.first.take() {
                Some(k) => k,
                None => loop {
                    let Some(k) = self.map.next_key::<Key<'de>>()? else { return Ok(None) };
                    match &*k.0 {
                        "id" if self.id.is_none() => *self.id = Some(self.map.next_value()?),
                        "id" => return Err(de::Error::duplicate_field("id")),
                        "type" => return Err(de::Error::duplicate_field("type")),
                        _ => break k.0,
                    }
                },
            };
            match key {
                Cow::Borrowed(k) => seed.deserialize(de::value::BorrowedStrDeserializer::new(k)).map(Some),
                Cow::Owned(k) => seed.deserialize(k.into_deserializer()).map(Some),
            }
        }

        fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
            self.map.next_value_seed(seed)
        }
    }

    /// `Request` (externally tagged) read from the envelope's `type` and its fields.
    struct Tagged<'t, B> {
        tag: &'t str,
        body: B,
    }

    impl<'de, B: MapAccess<'de>> Deserializer<'de> for Tagged<'_, B> {
        type Error = B::Error;

        fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, B::Error> {
            v.visit_enum(self)
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map struct enum identifier ignored_any
        }
    }

    impl<'de, B: MapAccess<'de>> de::EnumAccess<'de> for Tagged<'_, B> {
        type Error = B::Error;
        type Variant = VariantBody<B>;

        fn variant_seed<S: DeserializeSeed<'de>>(
            self,
            seed: S,
        ) -> Result<(S::Value, VariantBody<B>), B::Error> {
            if !Request::TYPES.contains(&self.tag) {
                return Err(de::Error::custom(format_args!(
                    "{UNKNOWN_TYPE} `{}`, expected one of: {}",
                    self.tag,
                    Request::TYPES.join(", ")
                )));
            }
            let v =
                seed.deserialize::<de::value::StrDeserializer<'_, B::Error>>(self.tag.into_deserializer())?;
            Ok((v, VariantBody(self.body)))
        }
    }

    /// The fields of a request variant.
    struct VariantBody<B>(B);

    impl<'de, B: MapAccess<'de>> de::VariantAccess<'de> for VariantBody<B> {
        type Error = B::Error;
        fn unit_variant(self) -> Result<(), B::Error> {
            Ok(())
        }
        // A variant with a `flatten`ed field (`offer`) is read as a newtype of a map.
        fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, B::Error> {
            seed.deserialize(de::value::MapAccessDeserializer::new(self.0))
        }
        fn tuple_variant<V: Visitor<'de>>(self, _: usize, _: V) -> Result<V::Value, B::Error> {
            Err(de::Error::custom("requests are maps of fields"))
        }
        fn struct_variant<V: Visitor<'de>>(
            self,
            _: &'static [&'static str],
            v: V,
        ) -> Result<V::Value, B::Error> {
            v.visit_map(self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_events_frame_holds_exactly_the_frames_an_unbatched_subscriber_gets() {
        let frames: Vec<StreamFrame> = (1..=3)
            .map(|i| StreamFrame {
                kind: StreamTag::Event,
                seq: 40 + i,
                event: StreamEvent::LeadClosed { lead: LeadId::new(format!("L{i}")), at: i as i64 },
            })
            .collect();
        let as_values: Vec<serde_json::Value> =
            frames.iter().map(|f| serde_json::to_value(f).unwrap()).collect();
        for enc in [Encoding::Json, Encoding::Msgpack] {
            let mut batch = EventsFrame::new(enc);
            for f in &frames {
                batch.push(&encode(enc, f));
            }
            assert_eq!(batch.len(), 3);
            let bytes = batch.finish();
            let got: serde_json::Value = match enc {
                Encoding::Json => serde_json::from_slice(&bytes).unwrap(),
                Encoding::Msgpack => rmp_serde::from_slice(&bytes).unwrap(),
            };
            assert_eq!(got, serde_json::json!({"type": "events", "events": as_values}), "{enc:?}");
            // Each element reads back as the frame it was.
            let back: Vec<StreamFrame> = serde_json::from_value(got["events"].clone()).unwrap();
            assert_eq!(back, frames);
        }
        // Empty and single: still well-formed.
        for enc in [Encoding::Json, Encoding::Msgpack] {
            let bytes = EventsFrame::new(enc).finish();
            let got: serde_json::Value = match enc {
                Encoding::Json => serde_json::from_slice(&bytes).unwrap(),
                Encoding::Msgpack => rmp_serde::from_slice(&bytes).unwrap(),
            };
            assert_eq!(got, serde_json::json!({"type": "events", "events": []}));
        }
    }

    /// `{"id": id, "type": "offer", "lead": "L1", "pro": "p1", "action": "decline", "by": "pro"}`.
    fn decline(id: &str) -> Envelope {
        Envelope {
            id: id.into(),
            request: Request::Offer {
                lead: LeadId::new("L1"),
                pro: ProId::new("p1"),
                action: OfferAction::Decline { by: crate::core::Party::Pro },
            },
        }
    }

    #[test]
    fn request_round_trips_in_both_encodings() {
        let env = decline("c1");
        for enc in [Encoding::Json, Encoding::Msgpack] {
            let bytes = encode(enc, &env);
            assert_eq!(decode(enc, &bytes).unwrap(), env);
        }
        let json = String::from_utf8(encode(Encoding::Json, &env)).unwrap();
        assert!(json.starts_with(r#"{"id":"c1","type":"offer","#), "{json}");
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id":"c1","type":"offer","lead":"L1","pro":"p1","action":"decline","by":"pro"})
        );
    }

    #[test]
    fn peek_head_reads_id_and_type_of_frames_that_start_with_them_and_nothing_else() {
        let env = decline("c-\u{e8}1");
        for enc in [Encoding::Json, Encoding::Msgpack] {
            let bytes = encode(enc, &env);
            assert_eq!(peek_head(enc, &bytes), Some(("c-\u{e8}1", "offer")), "{enc:?}");
            // Every prefix is refused or read the same, never misread.
            for n in 0..bytes.len() {
                let p = peek_head(enc, &bytes[..n]);
                assert!(p.is_none() || p == Some(("c-\u{e8}1", "offer")), "{enc:?} prefix {n}: {p:?}");
            }
        }
        // `type` first, spaces around JSON tokens, a map16 header.
        let j = br#" { "type" : "publish_lead" , "id" : "x", "lead": {}}"#;
        assert_eq!(peek_head(Encoding::Json, j), Some(("x", "publish_lead")));
        let mut m = vec![0xde, 0x00, 0x03];
        m.extend_from_slice(b"\xa4type\xa9subscribe\xa2id\xa1y\xa3pro\xc0");
        assert_eq!(peek_head(Encoding::Msgpack, &m), Some(("y", "subscribe")));
        // Not the fast form: another key first, an escape, a long id, one entry, not a map.
        assert_eq!(peek_head(Encoding::Json, br#"{"lead":{},"id":"x","type":"publish_lead"}"#), None);
        assert_eq!(peek_head(Encoding::Json, br#"{"id":"x\"y","type":"offer"}"#), None);
        let long = format!(r#"{{"id":"{}","type":"offer"}}"#, "x".repeat(MAX_CORRELATION_ID + 1));
        assert_eq!(peek_head(Encoding::Json, long.as_bytes()), None);
        assert_eq!(peek_head(Encoding::Msgpack, b"\x81\xa2id\xa1x"), None);
        assert_eq!(peek_head(Encoding::Msgpack, b"\x92\xa2id\xa1x"), None);
        assert_eq!(peek_head(Encoding::Json, b"[1,2]"), None);
        assert_eq!(peek_head(Encoding::Json, br#"{"id":1,"type":"offer"}"#), None);
    }

    fn json(v: serde_json::Value) -> Result<Envelope, DecodeError> {
        decode(Encoding::Json, &serde_json::to_vec(&v).unwrap())
    }

    fn msgpack(v: serde_json::Value) -> Result<Envelope, DecodeError> {
        decode(Encoding::Msgpack, &rmp_serde::to_vec_named(&v).unwrap())
    }

    #[test]
    fn keys_may_come_in_any_order() {
        use serde_json::json;
        let want = Envelope { id: "k".into(), request: Request::Balance { pro: ProId::new("p1") } };
        /// A map that keeps its keys in the given order.
        struct Ordered(Vec<(&'static str, &'static str)>);
        impl Serialize for Ordered {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeMap;
                let mut m = s.serialize_map(Some(self.0.len()))?;
                for (k, v) in &self.0 {
                    m.serialize_entry(k, v)?;
                }
                m.end()
            }
        }
        let value = |k: &str| match k {
            "id" => "k",
            "type" => "balance",
            _ => "p1",
        };
        for order in [
            ["id", "type", "pro"],
            ["type", "id", "pro"],
            ["type", "pro", "id"],
            ["pro", "type", "id"],
            ["pro", "id", "type"],
        ] {
            let frame = Ordered(order.iter().map(|k| (*k, value(k))).collect());
            for enc in [Encoding::Json, Encoding::Msgpack] {
                assert_eq!(decode(enc, &encode(enc, &frame)).unwrap(), want, "{order:?} {enc:?}");
            }
        }
        // A request with only defaulted fields.
        assert_eq!(
            json(json!({"id": "s", "type": "subscribe"})).unwrap().request,
            Request::Subscribe { resume_from: None, pro: None, batch: false }
        );
    }

    #[test]
    fn repeated_id_or_type_is_refused() {
        for text in [
            r#"{"id":"a","type":"balance","id":"b","pro":"p"}"#,
            r#"{"id":"a","type":"balance","pro":"p","id":"b"}"#,
            r#"{"id":"a","type":"balance","pro":"p","type":"explain"}"#,
            r#"{"pro":"p","type":"balance","type":"explain","id":"a"}"#,
        ] {
            let e = decode(Encoding::Json, text.as_bytes()).unwrap_err();
            assert!(e.message.contains("duplicate field"), "{text}: {e:?}");
        }
    }

    #[test]
    fn a_wrong_field_is_named_in_every_request_type() {
        use serde_json::json;
        let cases = [
            (json!({"id": "1", "type": "grant_credits", "pro": "p", "op": "o", "credits": "ten"}), "credits"),
            (json!({"id": "2", "type": "set_availability", "pro": "p", "availability": 5}), "availability"),
            (json!({"id": "3", "type": "subscribe", "resume_from": "start"}), "resume_from"),
            (json!({"id": "4", "type": "advance_clock", "to_ms": "soon"}), "to_ms"),
            (json!({"id": "5", "type": "publish_lead", "lead": {"kind": "one_off"}}), "lead.kind"),
            (
                json!({"id": "6", "type": "offer", "lead": "L", "pro": "p", "action": "decline", "by": 3}),
                "by",
            ),
        ];
        for (v, field) in cases {
            for e in [json(v.clone()).unwrap_err(), msgpack(v.clone()).unwrap_err()] {
                assert_eq!(e.code, "invalid_field", "{v}: {e:?}");
                assert_eq!(e.id.as_deref(), v["id"].as_str(), "{v}");
                if v["type"] != "offer" {
                    // `offer` flattens its action: serde reports that one without a path.
                    assert_eq!(e.field.as_deref(), Some(field), "{v}: {e:?}");
                }
            }
        }
        let e = json(json!({"id": "7", "type": "teleport", "to": "mars"})).unwrap_err();
        assert_eq!((e.code, e.field), ("unknown_message", None), "{}", e.message);
        assert!(e.message.contains("publish_lead"), "lists the known types: {}", e.message);
        let e = json(json!({"id": "8", "pro": "p"})).unwrap_err();
        assert_eq!(e.code, "bad_frame", "{}", e.message);
        assert!(e.message.contains("type"), "{}", e.message);
    }

    #[test]
    fn r27_complete_order_goes_both_ways_in_both_encodings() {
        use crate::core::orders::{OrderCommand, OrderId, OrderReply};
        use serde_json::json;
        let v = json!({"id": "c1", "type": "order", "command": {"type": "complete_order", "order": "o1"}});
        let want = Request::Order { command: OrderCommand::CompleteOrder { order: OrderId::new("o1") } };
        for env in [json(v.clone()).unwrap(), msgpack(v.clone()).unwrap()] {
            assert_eq!((env.id.as_str(), &env.request), ("c1", &want));
        }
        let v = json!({"id": "c2", "type": "order", "command": {"type": "complete_order"}});
        for e in [json(v.clone()).unwrap_err(), msgpack(v).unwrap_err()] {
            assert_eq!((e.code, e.id.as_deref()), ("invalid_field", Some("c2")), "{e:?}");
            assert!(e.message.contains("order"), "{}", e.message);
        }
        let reply = Reply::Ok {
            id: "c1".into(),
            result: OkResult::Order(OrderReply::OrderCompleted { order: OrderId::new("o1") }),
        };
        let from_json: serde_json::Value = serde_json::from_slice(&encode(Encoding::Json, &reply)).unwrap();
        let from_msgpack: serde_json::Value =
            rmp_serde::from_slice(&encode(Encoding::Msgpack, &reply)).unwrap();
        let want = json!({"type": "ok", "id": "c1", "result": {"reply": "order_completed", "order": "o1"}});
        assert_eq!((from_json, from_msgpack), (want.clone(), want));
    }

    #[test]
    fn bad_frames_get_specific_codes_and_keep_the_id() {
        let e = decode(Encoding::Json, b"not json").unwrap_err();
        assert_eq!(e.code, "bad_frame");
        let e = decode(Encoding::Json, br#"{"id":"x","type":"teleport"}"#).unwrap_err();
        assert_eq!((e.code, e.id.as_deref()), ("unknown_message", Some("x")));
        let e = decode(Encoding::Json, br#"{"id":"y","type":"remove_pro"}"#).unwrap_err();
        assert_eq!((e.code, e.id.as_deref()), ("invalid_field", Some("y")));
        assert!(e.message.contains("pro"), "{}", e.message);
        let e = decode(Encoding::Msgpack, &[0xc1]).unwrap_err();
        assert_eq!(e.code, "bad_frame");
    }

    #[test]
    fn msgpack_frames_are_named_maps() {
        let r = Reply::Ok { id: "a".into(), result: OkResult::Clock { now_ms: 5 } };
        let bytes = encode(Encoding::Msgpack, &r);
        let v: serde_json::Value = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(v["type"], "ok");
        assert_eq!(v["result"]["now_ms"], 5);
    }
}
