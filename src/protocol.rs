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
        /// Read from serde's buffer of the flattened fields: strictly, or an integer
        /// would be taken as the action's index, and checked against the fields, or an
        /// unknown one would be skipped (see [`names`], [`tree::known`]).
        #[serde(flatten, deserialize_with = "tree::known")]
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
        /// Internally tagged, so read by serde from a buffer of its fields: checked
        /// against them (see [`tree::known`]).
        #[serde(deserialize_with = "tree::known")]
        command: crate::core::orders::OrderCommand,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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
    /// A fact of the order-request flow (R25-R27), with the pro it is about (so it
    /// reaches that pro's per-pro stream too). `pro` is last and may be absent: events
    /// kept from before it was added have none.
    Order {
        fact: crate::core::orders::OrderEvent,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pro: Option<ProId>,
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
            StreamEvent::Order { pro, .. } => pro.as_ref(),
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
    match parse(enc, bytes) {
        Ok(env) if env.id.len() > MAX_CORRELATION_ID => Err(DecodeError {
            id: None,
            code: "invalid_field",
            message: "id: longer than 128 bytes".into(),
            field: Some("id".into()),
        }),
        Ok(env) => Ok(env),
        // Only a frame that failed is looked at again.
        Err(message) => Err(diagnose::failed(enc, bytes, message)),
    }
}

/// The frame decoded, or the decoder's message. Both encodings are read through
/// [`nesting::Limited`] (one depth limit) and [`names::Strict`] (names only as strings,
/// no field the request does not have, a record only as a map), and to their end: a
/// frame holds one request.
#[inline]
fn parse(enc: Encoding, bytes: &[u8]) -> Result<Envelope, String> {
    match enc {
        Encoding::Json => {
            let mut de = serde_json::Deserializer::from_slice(bytes);
            Envelope::deserialize(names::Strict(nesting::Limited::new(&mut de)))
                .and_then(|env| de.end().map(|()| env))
                .map_err(|e| e.to_string())
        }
        Encoding::Msgpack => {
            let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
            let env = Envelope::deserialize(names::Strict(nesting::Limited::new(&mut de)))
                .map_err(|e| e.to_string())?;
            msgpack_end(&mut de)?;
            Ok(env)
        }
    }
}

/// Why a MessagePack frame that holds more than one value is refused.
const MSGPACK_TRAILING: &str = "trailing bytes after the frame's map: a frame holds one request";

/// Checks that a MessagePack frame was read to its end (what `end()` does for JSON;
/// rmp_serde has no such call, nor a way to tell how much of the frame it read). Reads
/// one more value's marker: only the end of the frame fails with an unexpected end of
/// input. Anything else, a value or garbage, is trailing bytes. The read is bounded by
/// the bytes left (no allocation: the reader borrows from the frame, and a map or array
/// marker is refused before its entries are read).
fn msgpack_end<'de, R: rmp_serde::decode::ReadSlice<'de>>(
    de: &mut rmp_serde::Deserializer<R>,
) -> Result<(), String> {
    match bool::deserialize(de) {
        Err(rmp_serde::decode::Error::InvalidMarkerRead(e))
            if e.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            Ok(())
        }
        _ => Err(MSGPACK_TRAILING.into()),
    }
}

pub use diagnose::Work as DiagnosisWork;

/// For tests of the bound on the error path: the error [`decode`] answers for a frame
/// the decoder refuses, and the work its search for the bad field did ([`DiagnosisWork`]:
/// zero when the error was told without one); `None` for a frame the decoder reads.
#[doc(hidden)]
pub fn diagnosis(enc: Encoding, bytes: &[u8]) -> Option<(DecodeError, DiagnosisWork)> {
    let message = parse(enc, bytes).err()?;
    Some(diagnose::failed_with_work(enc, bytes, message))
}

/// Best effort: the correlation id of a frame that failed to decode, so the error
/// reply can still be matched to its request; also of a frame refused unread (one pass
/// over the frame that builds nothing but the id). Only a map has an id: `None` for
/// anything else, for an `id` that is not a string, is repeated or is longer than
/// [`MAX_CORRELATION_ID`].
pub fn peek_id(enc: Encoding, bytes: &[u8]) -> Option<String> {
    diagnose::scan(enc, bytes).0.reply_id()
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

pub mod nesting {
    //! One nesting limit for both encodings: a frame holds at most [`MAX_DEPTH`] levels of
    //! maps and sequences, its own map being the first, wherever they are (in a field the
    //! request reads, or in one it does not have).
    //!
    //! The decoders' own limits differ: serde_json counts 128 levels only in values it
    //! builds and skips an ignored value at any depth (no setting changes that); rmp_serde
    //! counts 1,024 levels in everything it reads, ignored values included. A frame nested
    //! 2,000 levels deep in a field nobody reads was therefore accepted in JSON and refused
    //! in MessagePack. [`Limited`] counts the levels itself, below both decoders' limits,
    //! so it is always the one that refuses, and it reads an ignored value as any other
    //! (through `deserialize_any`, with a visitor that builds nothing) so that its levels
    //! are counted too. The top-level scan of a failed frame reads through it as well, so
    //! a frame nested too deep is `bad_frame` in both encodings, whatever else is wrong
    //! with it (a request's decode refuses an unknown field before reading its value: see
    //! [`super::names`]; the scan reads every value).
    //!
    //! Like [`super::names::Strict`], it passes every call on to the deserializer it wraps
    //! and wraps what that hands out; the count is a number carried down by value, one
    //! comparison per map or sequence.

    use serde::de::{self, DeserializeSeed, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};
    use serde::Deserializer;
    use std::fmt;

    /// Most levels of maps and sequences in a frame, its own map being the first. Below
    /// serde_json's 128 and rmp_serde's 1,024, so that this limit is the one that applies,
    /// and far above any request's own depth.
    pub const MAX_DEPTH: usize = 64;

    fn too_deep<E: de::Error>() -> E {
        E::custom(format_args!("nesting deeper than {MAX_DEPTH} levels"))
    }

    /// A deserializer that refuses values nested deeper than [`MAX_DEPTH`] levels (see the
    /// [module](self)).
    pub struct Limited<D> {
        de: D,
        /// How many more maps or sequences may be opened, this value's included.
        left: usize,
    }

    impl<D> Limited<D> {
        /// The frame's top-level value.
        pub fn new(de: D) -> Self {
            Limited { de, left: MAX_DEPTH }
        }
    }

    macro_rules! forward {
        ($($method:ident)*) => {$(
            #[inline]
            fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
                self.de.$method(Nest { v, left: self.left })
            }
        )*};
    }

    impl<'de, D: Deserializer<'de>> Deserializer<'de> for Limited<D> {
        type Error = D::Error;

        forward! {
            deserialize_any deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32
            deserialize_i64 deserialize_i128 deserialize_u8 deserialize_u16 deserialize_u32
            deserialize_u64 deserialize_u128 deserialize_f32 deserialize_f64 deserialize_char
            deserialize_str deserialize_string deserialize_bytes deserialize_byte_buf
            deserialize_option deserialize_unit deserialize_seq deserialize_map
            deserialize_identifier
        }

        /// Read, not skipped: serde_json would skip it at any depth.
        #[inline]
        fn deserialize_ignored_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
            self.de.deserialize_any(Nest { v, left: self.left })
        }

        #[inline]
        fn deserialize_enum<V: Visitor<'de>>(
            self,
            name: &'static str,
            variants: &'static [&'static str],
            v: V,
        ) -> Result<V::Value, D::Error> {
            self.de.deserialize_enum(name, variants, Nest { v, left: self.left })
        }

        #[inline]
        fn deserialize_unit_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            v: V,
        ) -> Result<V::Value, D::Error> {
            self.de.deserialize_unit_struct(name, Nest { v, left: self.left })
        }

        #[inline]
        fn deserialize_newtype_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            v: V,
        ) -> Result<V::Value, D::Error> {
            self.de.deserialize_newtype_struct(name, Nest { v, left: self.left })
        }

        #[inline]
        fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, D::Error> {
            self.de.deserialize_tuple(len, Nest { v, left: self.left })
        }

        #[inline]
        fn deserialize_tuple_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            len: usize,
            v: V,
        ) -> Result<V::Value, D::Error> {
            self.de.deserialize_tuple_struct(name, len, Nest { v, left: self.left })
        }

        #[inline]
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            fields: &'static [&'static str],
            v: V,
        ) -> Result<V::Value, D::Error> {
            self.de.deserialize_struct(name, fields, Nest { v, left: self.left })
        }

        fn is_human_readable(&self) -> bool {
            self.de.is_human_readable()
        }
    }

    /// A visitor of a value with `left` levels still allowed: a map or sequence takes one,
    /// and its entries get the rest.
    struct Nest<V> {
        v: V,
        left: usize,
    }

    macro_rules! scalar {
        ($($method:ident: $t:ty)*) => {$(
            #[inline]
            fn $method<E: de::Error>(self, v: $t) -> Result<V::Value, E> {
                self.v.$method(v)
            }
        )*};
    }

    impl<'de, V: Visitor<'de>> Visitor<'de> for Nest<V> {
        type Value = V::Value;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            self.v.expecting(f)
        }

        scalar! {
            visit_bool: bool visit_i8: i8 visit_i16: i16 visit_i32: i32 visit_i64: i64
            visit_i128: i128 visit_u8: u8 visit_u16: u16 visit_u32: u32 visit_u64: u64
            visit_u128: u128 visit_f32: f32 visit_f64: f64 visit_char: char visit_str: &str
            visit_borrowed_str: &'de str visit_string: String visit_bytes: &[u8]
            visit_borrowed_bytes: &'de [u8] visit_byte_buf: Vec<u8>
        }

        #[inline]
        fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
            self.v.visit_none()
        }
        #[inline]
        fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
            self.v.visit_unit()
        }
        #[inline]
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
            self.v.visit_some(Limited { de: d, left: self.left })
        }
        #[inline]
        fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
            self.v.visit_newtype_struct(Limited { de: d, left: self.left })
        }
        #[inline]
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
            match self.left.checked_sub(1) {
                Some(left) => self.v.visit_seq(Entries { access: seq, left }),
                None => Err(too_deep()),
            }
        }
        #[inline]
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
            match self.left.checked_sub(1) {
                Some(left) => self.v.visit_map(Entries { access: map, left }),
                None => Err(too_deep()),
            }
        }
        /// An enum given as a map (`{"variant": body}`) takes a level when its body is
        /// read; a unit variant given as a string takes none.
        #[inline]
        fn visit_enum<A: EnumAccess<'de>>(self, e: A) -> Result<V::Value, A::Error> {
            self.v.visit_enum(Enum { access: e, left: self.left })
        }
    }

    /// Reads a value with `left` levels still allowed.
    struct Seed<S> {
        seed: S,
        left: usize,
    }

    impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Seed<S> {
        type Value = S::Value;
        #[inline]
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
            self.seed.deserialize(Limited { de: d, left: self.left })
        }
    }

    /// The entries of a map or elements of a sequence (keys too: in MessagePack a key may
    /// be any value).
    struct Entries<A> {
        access: A,
        left: usize,
    }

    impl<'de, A: MapAccess<'de>> MapAccess<'de> for Entries<A> {
        type Error = A::Error;
        #[inline]
        fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
            self.access.next_key_seed(Seed { seed, left: self.left })
        }
        #[inline]
        fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, A::Error> {
            self.access.next_value_seed(Seed { seed, left: self.left })
        }
        fn size_hint(&self) -> Option<usize> {
            self.access.size_hint()
        }
    }

    impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Entries<A> {
        type Error = A::Error;
        #[inline]
        fn next_element_seed<T: DeserializeSeed<'de>>(
            &mut self,
            seed: T,
        ) -> Result<Option<T::Value>, A::Error> {
            self.access.next_element_seed(Seed { seed, left: self.left })
        }
        fn size_hint(&self) -> Option<usize> {
            self.access.size_hint()
        }
    }

    struct Enum<A> {
        access: A,
        left: usize,
    }

    impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for Enum<A> {
        type Error = A::Error;
        type Variant = Enum<A::Variant>;
        #[inline]
        fn variant_seed<S: DeserializeSeed<'de>>(
            self,
            seed: S,
        ) -> Result<(S::Value, Self::Variant), A::Error> {
            let (v, body) = self.access.variant_seed(Seed { seed, left: self.left })?;
            Ok((v, Enum { access: body, left: self.left }))
        }
    }

    impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Enum<A> {
        type Error = A::Error;
        fn unit_variant(self) -> Result<(), A::Error> {
            self.access.unit_variant()
        }
        fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
            match self.left.checked_sub(1) {
                Some(left) => self.access.newtype_variant_seed(Seed { seed, left }),
                None => Err(too_deep()),
            }
        }
        fn tuple_variant<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, A::Error> {
            match self.left.checked_sub(1) {
                Some(left) => self.access.tuple_variant(len, Nest { v, left }),
                None => Err(too_deep()),
            }
        }
        fn struct_variant<V: Visitor<'de>>(
            self,
            fields: &'static [&'static str],
            v: V,
        ) -> Result<V::Value, A::Error> {
            match self.left.checked_sub(1) {
                Some(left) => self.access.struct_variant(fields, Nest { v, left }),
                None => Err(too_deep()),
            }
        }
    }
}

pub mod names {
    //! Names on the wire are strings, every name is one the request has, and a record is
    //! a map of named fields.
    //!
    //! Serde's derived identifiers also take an integer as the index of a variant or field
    //! (`0` for the first), so a number where a name belongs would be read as some name:
    //! `"action": 5` as `client_viewed`, `"kind": 1` as `direct`, `{"type": 7}` as the
    //! eighth order command. There are two ways in:
    //!
    //! * rmp_serde reads identifiers with `deserialize_any`, so every variant, tag and
    //!   field key of a MessagePack frame takes an integer, and so does a map key
    //!   (`{"audience": {0: nil}}`, the externally tagged form of a unit variant).
    //!   serde_json reads identifiers and keys only from strings.
    //! * Serde's own buffer (behind `flatten` and internally tagged enums) takes an integer
    //!   as a tag in either encoding: the `offer`'s flattened `action`, and the `mode` and
    //!   `answer` of an order command (internally tagged enums buffered inside another).
    //!   Unit variants read from the buffer take only a string or a map, whose keys were
    //!   checked as the buffer was filled.
    //!
    //! Serde's derives also skip a field they do not know (`client.contcat`,
    //! `autobuy[0].max_price`: a typo would be answered `done` with the field left at its
    //! default) and read a struct from a sequence, by position (`"location": [11.34,
    //! 44.49]` as `lat`, `lon`, though GeoJSON puts the longitude first). The model types
    //! cannot refuse either themselves: the WAL and snapshots decode them too, and records
    //! written by an older release must keep loading.
    //!
    //! [`Strict`] closes all of these on the wire. It is a deserializer that passes
    //! everything on to the one it wraps, except that every identifier and every map key
    //! must be a string (MessagePack bytes pass, as they do for a `String`), a value serde
    //! would skip (an unknown field's) is an error, and a struct given as a sequence is an
    //! error. [`super::decode`] answers each as `invalid_field` naming the field. It wraps
    //! what it hands out (maps, sequences, enums, options), so it holds at any depth, but it
    //! cannot reach into serde's buffer: a field read from the buffer that holds a tagged
    //! enum is read through [`strict`] (`#[serde(deserialize_with = ...)]`), which wraps
    //! the buffer's deserializer in turn, and a request serde reads from a buffer as a
    //! whole (an `offer`'s action, an order's `command`) is read through
    //! `tree::known`, which also checks what serde read against what the frame holds.
    //!
    //! Chosen over hand-written `Deserialize` impls per type (the derives stay as they are,
    //! and WAL records and snapshots, whose variant names rmp_serde writes as strings, are
    //! read as before) and over a separate check of the frame (a second read): the adapter
    //! is a few inlined calls per value and builds nothing, and a skipped field or a
    //! positional struct stops the decode where it is found, so the error path (the
    //! diagnosis of the frame) names it.
    //!
    //! Used around both readers in [`super::decode`] (and the diagnosis that re-reads a
    //! failed frame), and on `OrderCommand`'s `mode` and `answer`.

    use serde::de::{self, DeserializeSeed, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor};
    use serde::{Deserialize, Deserializer};
    use std::fmt;

    /// `T` read with names only as strings, at any depth (see the [module](self)):
    /// for `#[serde(deserialize_with = "crate::protocol::names::strict")]` on a field
    /// serde reads from its buffers.
    pub fn strict<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<T, D::Error> {
        T::deserialize(Strict(d))
    }

    /// A deserializer that reads names only from strings (see the [module](self)).
    pub struct Strict<D>(pub D);

    macro_rules! plain {
        ($($method:ident)*) => {$(
            #[inline]
            fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
                self.0.$method(Values(v))
            }
        )*};
    }

    impl<'de, D: Deserializer<'de>> Deserializer<'de> for Strict<D> {
        type Error = D::Error;

        plain! {
            deserialize_any deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32
            deserialize_i64 deserialize_i128 deserialize_u8 deserialize_u16 deserialize_u32
            deserialize_u64 deserialize_u128 deserialize_f32 deserialize_f64 deserialize_char
            deserialize_str deserialize_string deserialize_bytes deserialize_byte_buf
            deserialize_option deserialize_unit deserialize_seq deserialize_map
        }

        #[inline]
        fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
            self.0.deserialize_identifier(Name(v))
        }

        /// Serde skips only what it does not know: a field the request does not have.
        /// Refused without reading it (the diagnosis of the frame names it).
        #[inline]
        fn deserialize_ignored_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, D::Error> {
            Err(de::Error::custom(UNKNOWN_FIELD))
        }

        #[inline]
        fn deserialize_enum<V: Visitor<'de>>(
            self,
            name: &'static str,
            variants: &'static [&'static str],
            v: V,
        ) -> Result<V::Value, D::Error> {
            self.0.deserialize_enum(name, variants, Values(v))
        }

        #[inline]
        fn deserialize_unit_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            v: V,
        ) -> Result<V::Value, D::Error> {
            self.0.deserialize_unit_struct(name, Values(v))
        }

        #[inline]
        fn deserialize_newtype_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            v: V,
        ) -> Result<V::Value, D::Error> {
            self.0.deserialize_newtype_struct(name, Values(v))
        }

        #[inline]
        fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, D::Error> {
            self.0.deserialize_tuple(len, Values(v))
        }

        #[inline]
        fn deserialize_tuple_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            len: usize,
            v: V,
        ) -> Result<V::Value, D::Error> {
            self.0.deserialize_tuple_struct(name, len, Values(v))
        }

        #[inline]
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            fields: &'static [&'static str],
            v: V,
        ) -> Result<V::Value, D::Error> {
            self.0.deserialize_struct(name, fields, Record(v))
        }

        fn is_human_readable(&self) -> bool {
            self.0.is_human_readable()
        }
    }

    /// The message of the decode error for a field the request does not have.
    pub const UNKNOWN_FIELD: &str = "unknown field";

    /// A name: a map key, or a field, variant or tag identifier. Every way of asking
    /// for one reads it with [`Name`], which takes only a string.
    struct NameDe<D>(D);

    macro_rules! name {
        ($($method:ident)*) => {$(
            #[inline]
            fn $method<V: Visitor<'de>>(self, v: V) -> Result<V::Value, D::Error> {
                self.0.$method(Name(v))
            }
        )*};
    }

    impl<'de, D: Deserializer<'de>> Deserializer<'de> for NameDe<D> {
        type Error = D::Error;

        name! {
            deserialize_any deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32
            deserialize_i64 deserialize_i128 deserialize_u8 deserialize_u16 deserialize_u32
            deserialize_u64 deserialize_u128 deserialize_f32 deserialize_f64 deserialize_char
            deserialize_str deserialize_string deserialize_bytes deserialize_byte_buf
            deserialize_option deserialize_unit deserialize_seq deserialize_map
            deserialize_identifier deserialize_ignored_any
        }

        fn deserialize_enum<V: Visitor<'de>>(
            self,
            name: &'static str,
            variants: &'static [&'static str],
            v: V,
        ) -> Result<V::Value, D::Error> {
            self.0.deserialize_enum(name, variants, Name(v))
        }

        fn deserialize_unit_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            v: V,
        ) -> Result<V::Value, D::Error> {
            self.0.deserialize_unit_struct(name, Name(v))
        }

        fn deserialize_newtype_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            v: V,
        ) -> Result<V::Value, D::Error> {
            self.0.deserialize_newtype_struct(name, Name(v))
        }

        fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, D::Error> {
            self.0.deserialize_tuple(len, Name(v))
        }

        fn deserialize_tuple_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            len: usize,
            v: V,
        ) -> Result<V::Value, D::Error> {
            self.0.deserialize_tuple_struct(name, len, Name(v))
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            name: &'static str,
            fields: &'static [&'static str],
            v: V,
        ) -> Result<V::Value, D::Error> {
            self.0.deserialize_struct(name, fields, Name(v))
        }

        fn is_human_readable(&self) -> bool {
            self.0.is_human_readable()
        }
    }

    /// A visitor that takes only a string (MessagePack bytes too, as a `String` does);
    /// any other value is an `invalid type` error expecting what `V` expects.
    struct Name<V>(V);

    impl<'de, V: Visitor<'de>> Visitor<'de> for Name<V> {
        type Value = V::Value;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            self.0.expecting(f)
        }

        #[inline]
        fn visit_str<E: de::Error>(self, v: &str) -> Result<V::Value, E> {
            self.0.visit_str(v)
        }
        #[inline]
        fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<V::Value, E> {
            self.0.visit_borrowed_str(v)
        }
        #[inline]
        fn visit_string<E: de::Error>(self, v: String) -> Result<V::Value, E> {
            self.0.visit_string(v)
        }
        #[inline]
        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<V::Value, E> {
            self.0.visit_bytes(v)
        }
        #[inline]
        fn visit_borrowed_bytes<E: de::Error>(self, v: &'de [u8]) -> Result<V::Value, E> {
            self.0.visit_borrowed_bytes(v)
        }
        #[inline]
        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<V::Value, E> {
            self.0.visit_byte_buf(v)
        }
    }

    /// A visitor of any value: scalars go to `V` as they are; what holds more values
    /// (maps, sequences, enums, options, newtypes) is wrapped so that those are read
    /// strictly too.
    struct Values<V>(V);

    macro_rules! scalar {
        ($($method:ident: $t:ty)*) => {$(
            #[inline]
            fn $method<E: de::Error>(self, v: $t) -> Result<V::Value, E> {
                self.0.$method(v)
            }
        )*};
    }

    impl<'de, V: Visitor<'de>> Visitor<'de> for Values<V> {
        type Value = V::Value;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            self.0.expecting(f)
        }

        scalar! {
            visit_bool: bool visit_i8: i8 visit_i16: i16 visit_i32: i32 visit_i64: i64
            visit_i128: i128 visit_u8: u8 visit_u16: u16 visit_u32: u32 visit_u64: u64
            visit_u128: u128 visit_f32: f32 visit_f64: f64 visit_char: char visit_str: &str
            visit_borrowed_str: &'de str visit_string: String visit_bytes: &[u8]
            visit_borrowed_bytes: &'de [u8] visit_byte_buf: Vec<u8>
        }

        #[inline]
        fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
            self.0.visit_none()
        }
        #[inline]
        fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
            self.0.visit_unit()
        }
        #[inline]
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
            self.0.visit_some(Strict(d))
        }
        #[inline]
        fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
            self.0.visit_newtype_struct(Strict(d))
        }
        #[inline]
        fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
            self.0.visit_seq(Seq(seq))
        }
        #[inline]
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
            self.0.visit_map(Map(map))
        }
        #[inline]
        fn visit_enum<A: EnumAccess<'de>>(self, e: A) -> Result<V::Value, A::Error> {
            self.0.visit_enum(Enum(e))
        }
    }

    /// A struct's visitor: a map of named fields, never a sequence of them by position.
    /// Anything else goes on to [`Values`] (and is refused by the struct's own visitor).
    struct Record<V>(V);

    macro_rules! to_values {
        ($($method:ident: $t:ty)*) => {$(
            #[inline]
            fn $method<E: de::Error>(self, v: $t) -> Result<V::Value, E> {
                Values(self.0).$method(v)
            }
        )*};
    }

    impl<'de, V: Visitor<'de>> Visitor<'de> for Record<V> {
        type Value = V::Value;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            self.0.expecting(f)
        }

        to_values! {
            visit_bool: bool visit_i8: i8 visit_i16: i16 visit_i32: i32 visit_i64: i64
            visit_i128: i128 visit_u8: u8 visit_u16: u16 visit_u32: u32 visit_u64: u64
            visit_u128: u128 visit_f32: f32 visit_f64: f64 visit_char: char visit_str: &str
            visit_borrowed_str: &'de str visit_string: String visit_bytes: &[u8]
            visit_borrowed_bytes: &'de [u8] visit_byte_buf: Vec<u8>
        }

        #[inline]
        fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
            Values(self.0).visit_none()
        }
        #[inline]
        fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
            Values(self.0).visit_unit()
        }
        #[inline]
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
            Values(self.0).visit_some(d)
        }
        #[inline]
        fn visit_newtype_struct<D: Deserializer<'de>>(self, d: D) -> Result<V::Value, D::Error> {
            Values(self.0).visit_newtype_struct(d)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<V::Value, A::Error> {
            Err(de::Error::invalid_type(de::Unexpected::Seq, &self))
        }
        #[inline]
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
            Values(self.0).visit_map(map)
        }
        #[inline]
        fn visit_enum<A: EnumAccess<'de>>(self, e: A) -> Result<V::Value, A::Error> {
            Values(self.0).visit_enum(e)
        }
    }

    /// Reads a value with [`Strict`].
    struct ValueSeed<S>(S);

    impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for ValueSeed<S> {
        type Value = S::Value;
        #[inline]
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
            self.0.deserialize(Strict(d))
        }
    }

    /// Reads a name with [`NameDe`].
    struct NameSeed<S>(S);

    impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for NameSeed<S> {
        type Value = S::Value;
        #[inline]
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<S::Value, D::Error> {
            self.0.deserialize(NameDe(d))
        }
    }

    /// A map: keys are names, values are read strictly.
    struct Map<A>(A);

    impl<'de, A: MapAccess<'de>> MapAccess<'de> for Map<A> {
        type Error = A::Error;
        #[inline]
        fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
            self.0.next_key_seed(NameSeed(seed))
        }
        #[inline]
        fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, A::Error> {
            self.0.next_value_seed(ValueSeed(seed))
        }
        fn size_hint(&self) -> Option<usize> {
            self.0.size_hint()
        }
    }

    struct Seq<A>(A);

    impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for Seq<A> {
        type Error = A::Error;
        #[inline]
        fn next_element_seed<T: DeserializeSeed<'de>>(
            &mut self,
            seed: T,
        ) -> Result<Option<T::Value>, A::Error> {
            self.0.next_element_seed(ValueSeed(seed))
        }
        fn size_hint(&self) -> Option<usize> {
            self.0.size_hint()
        }
    }

    /// An enum: the variant is a name, its content is read strictly.
    struct Enum<A>(A);

    impl<'de, A: EnumAccess<'de>> EnumAccess<'de> for Enum<A> {
        type Error = A::Error;
        type Variant = Variant<A::Variant>;
        #[inline]
        fn variant_seed<S: DeserializeSeed<'de>>(
            self,
            seed: S,
        ) -> Result<(S::Value, Self::Variant), A::Error> {
            let (v, content) = self.0.variant_seed(NameSeed(seed))?;
            Ok((v, Variant(content)))
        }
    }

    struct Variant<A>(A);

    impl<'de, A: VariantAccess<'de>> VariantAccess<'de> for Variant<A> {
        type Error = A::Error;
        fn unit_variant(self) -> Result<(), A::Error> {
            self.0.unit_variant()
        }
        fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, A::Error> {
            self.0.newtype_variant_seed(ValueSeed(seed))
        }
        fn tuple_variant<V: Visitor<'de>>(self, len: usize, v: V) -> Result<V::Value, A::Error> {
            self.0.tuple_variant(len, Values(v))
        }
        fn struct_variant<V: Visitor<'de>>(
            self,
            fields: &'static [&'static str],
            v: V,
        ) -> Result<V::Value, A::Error> {
            self.0.struct_variant(fields, Record(v))
        }
    }
}

/// The envelope's decoder and encoder.
///
/// Decoding reads the frame's keys in order: `id` and `type` are taken as they come;
/// at the first other key, if `type` is known, the rest of the map is handed to the
/// request's variant as its fields (a later `id` is still picked out). Nothing is
/// buffered, so a `publish_lead` decodes about twice as fast as with serde's internally
/// tagged `flatten`. A frame whose `type` comes after the request's fields is valid too:
/// its fields are then buffered (as a [`tree::Node`], which holds every value of either
/// encoding) and decoded once `type` is known, as strictly as the fast path.
pub mod envelope_de {
    use super::tree::{self, Node};
    use super::{Envelope, Request};
    use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};
    use serde::ser::SerializeMap;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::borrow::Cow;
    use std::fmt;

    /// How the message for an unknown `type` starts. The reply's code
    /// (`unknown_message`) is decided from the frame, never from this text.
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
    pub(super) struct Key<'de>(pub(super) Cow<'de, str>);

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
            let seen = std::cell::Cell::new(0);
            let request = Request::deserialize(Tagged {
                tag: &t,
                body: de::value::MapDeserializer::<_, A::Error>::new(tree::entries(&[], &seen)),
            })?;
            Ok(Envelope { id, request })
        }
    }

    /// The slow path: fields before `type`, collected as a tree of values.
    fn buffered<'de, A: MapAccess<'de>>(
        first: Cow<'de, str>,
        map: &mut A,
        id: &mut Option<String>,
        tag: &mut Option<String>,
    ) -> Result<Request, A::Error> {
        let mut fields = vec![(first.into_owned(), map.next_value::<Node>()?)];
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
        let seen = std::cell::Cell::new(0);
        Request::deserialize(Tagged {
            tag: t,
            body: de::value::MapDeserializer::<_, A::Error>::new(tree::entries(&fields, &seen)),
        })
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

/// What is wrong with a frame that failed to decode: the error code, the id to answer
/// with and, for `invalid_field`, the path of the bad field. Runs only after a failure:
/// the decode of a valid frame pays nothing for it.
///
/// The code is decided from the frame's structure ([`scan`]: readable to its end within
/// the [nesting limit](nesting), a map, with one string `id` and one string `type`
/// naming a known request), never from the text of the decoder's error, which quotes the
/// frame's own values.
///
/// The field is found by decoding the frame again from a tree of its values ([`Node`],
/// the same for both encodings) through a deserializer whose errors are typed
/// ([`NodeErr`]: a missing field says which), with the path tracked. Serde loses the
/// path inside values it buffers before decoding them (internally tagged enums such as
/// an order's `command`, the `offer` action flattened into its request); there the bad
/// field is found by probing: the tree is decoded again with one entry removed (or the
/// missing one added) to see which entry the error depends on. Each probe decodes the
/// whole tree, so probes are bounded in number and in the tree nodes they visit
/// together: a few times the frame's own nodes ([`diagnose::VISIT_FACTOR`]), so that the
/// error path of any frame costs a few decodes of it, however the frame is built.
mod diagnose {
    use super::envelope_de::{Key, UNKNOWN_TYPE};
    use super::names::Strict;
    use super::nesting::Limited;
    use super::tree::{self, Node, NodeDe};
    use super::{DecodeError, Encoding, Envelope, Request, MAX_CORRELATION_ID};
    use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Unexpected, Visitor};
    use serde::{Deserialize, Deserializer};
    use std::cell::Cell;
    use std::fmt;

    /// The error for a frame `decode` refused with `message`.
    pub(super) fn failed(enc: Encoding, bytes: &[u8], message: String) -> DecodeError {
        failed_with_work(enc, bytes, message).0
    }

    /// [`failed`], and the work the search for the bad field did (zero when there was
    /// none).
    pub(super) fn failed_with_work(enc: Encoding, bytes: &[u8], message: String) -> (DecodeError, Work) {
        let (head, unreadable) = scan(enc, bytes);
        let id = head.reply_id();
        let error = |code, message: String, field: Option<&str>| {
            (DecodeError { id: id.clone(), code, message, field: field.map(str::to_owned) }, Work::default())
        };
        if let Some(why) = unreadable {
            // Not readable to its end (syntax, nesting deeper than the limit, a key that
            // is not a string), whatever else is wrong with it: why the scan stopped.
            return error("bad_frame", why, None);
        }
        if !head.map {
            return error("bad_frame", message, None);
        }
        if head.dup_id || head.dup_ty {
            let f = if head.dup_id { "id" } else { "type" };
            return error(
                "bad_frame",
                format!("duplicate field `{f}`: `id` and `type` may appear once each"),
                None,
            );
        }
        match (&head.id, &head.ty) {
            (Slot::Absent, _) => error("bad_frame", "missing field `id`".into(), None),
            (_, Slot::Absent) => error("bad_frame", "missing field `type`".into(), None),
            (Slot::Wrong, _) => error("invalid_field", "id: must be a string".into(), Some("id")),
            (Slot::Str(s), _) if s.len() > MAX_CORRELATION_ID => {
                error("invalid_field", "id: longer than 128 bytes".into(), Some("id"))
            }
            (_, Slot::Wrong) => error("invalid_field", "type: must be a string".into(), Some("type")),
            (_, Slot::Str(t)) if !Request::TYPES.contains(&t.as_str()) => error(
                "unknown_message",
                format!("{UNKNOWN_TYPE} `{t}`, expected one of: {}", Request::TYPES.join(", ")),
                None,
            ),
            _ => {
                let (found, work) = field_path(enc, bytes);
                let (field, message) = match found {
                    Found::Field(field) => (field, message),
                    // The decoder's message does not say which field; the field does.
                    Found::Unread { field, not_a_map: false } => {
                        (Some(field), super::names::UNKNOWN_FIELD.into())
                    }
                    Found::Unread { field, not_a_map: true } => {
                        (Some(field), "must be a map of named fields, not an array".into())
                    }
                };
                (DecodeError { id, code: "invalid_field", message, field }, work)
            }
        }
    }

    // ---------------------------------------------------------------------------------
    // The frame's top level
    // ---------------------------------------------------------------------------------

    /// The top level of a frame, as far as it could be read.
    #[derive(Default)]
    pub(super) struct Head {
        /// The frame is a map.
        map: bool,
        id: Slot,
        ty: Slot,
        dup_id: bool,
        dup_ty: bool,
    }

    #[derive(Default)]
    enum Slot {
        #[default]
        Absent,
        Str(String),
        /// Present, not a string.
        Wrong,
    }

    impl Head {
        /// The id an error reply carries: a string id, once, of at most
        /// [`MAX_CORRELATION_ID`] bytes.
        pub(super) fn reply_id(&self) -> Option<String> {
            match &self.id {
                Slot::Str(s) if !self.dup_id && s.len() <= MAX_CORRELATION_ID => Some(s.clone()),
                _ => None,
            }
        }
    }

    /// Reads the frame's top level: whether it is a map, and its `id` and `type` (other
    /// values are read, not built, within the [nesting limit](super::nesting)). Also
    /// says why the whole frame could not be read, if it could not.
    pub(super) fn scan(enc: Encoding, bytes: &[u8]) -> (Head, Option<String>) {
        let mut head = Head::default();
        let read = match enc {
            Encoding::Json => {
                let mut de = serde_json::Deserializer::from_slice(bytes);
                HeadSeed(&mut head)
                    .deserialize(Limited::new(&mut de))
                    .and_then(|()| de.end())
                    .map_err(|e| e.to_string())
            }
            Encoding::Msgpack => {
                let mut de = rmp_serde::Deserializer::from_read_ref(bytes);
                HeadSeed(&mut head)
                    .deserialize(Limited::new(&mut de))
                    .map_err(|e| e.to_string())
                    .and_then(|()| super::msgpack_end(&mut de))
            }
        };
        (head, read.err())
    }

    struct HeadSeed<'h>(&'h mut Head);

    impl<'de> DeserializeSeed<'de> for HeadSeed<'_> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for HeadSeed<'_> {
        type Value = ();

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let head = self.0;
            head.map = true;
            while let Some(key) = map.next_key::<Key<'de>>()? {
                let (slot, dup) = match &*key.0 {
                    "id" => (&mut head.id, &mut head.dup_id),
                    "type" => (&mut head.ty, &mut head.dup_ty),
                    _ => {
                        map.next_value::<IgnoredAny>()?;
                        continue;
                    }
                };
                if matches!(slot, Slot::Absent) {
                    *slot = map.next_value()?;
                } else {
                    *dup = true;
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(())
        }
    }

    impl<'de> Deserialize<'de> for Slot {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Slot, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Slot;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("any value")
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Slot, E> {
                    Ok(Slot::Str(v.to_owned()))
                }
                fn visit_string<E: de::Error>(self, v: String) -> Result<Slot, E> {
                    Ok(Slot::Str(v))
                }
                // As a `String` is read: MessagePack bytes that are UTF-8 pass.
                fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Slot, E> {
                    Ok(std::str::from_utf8(v).map_or(Slot::Wrong, |s| Slot::Str(s.to_owned())))
                }
                fn visit_bool<E: de::Error>(self, _: bool) -> Result<Slot, E> {
                    Ok(Slot::Wrong)
                }
                fn visit_i64<E: de::Error>(self, _: i64) -> Result<Slot, E> {
                    Ok(Slot::Wrong)
                }
                fn visit_u64<E: de::Error>(self, _: u64) -> Result<Slot, E> {
                    Ok(Slot::Wrong)
                }
                fn visit_i128<E: de::Error>(self, _: i128) -> Result<Slot, E> {
                    Ok(Slot::Wrong)
                }
                fn visit_u128<E: de::Error>(self, _: u128) -> Result<Slot, E> {
                    Ok(Slot::Wrong)
                }
                fn visit_f64<E: de::Error>(self, _: f64) -> Result<Slot, E> {
                    Ok(Slot::Wrong)
                }
                fn visit_unit<E: de::Error>(self) -> Result<Slot, E> {
                    Ok(Slot::Wrong)
                }
                fn visit_none<E: de::Error>(self) -> Result<Slot, E> {
                    Ok(Slot::Wrong)
                }
                fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Slot, D::Error> {
                    IgnoredAny::deserialize(d).map(|_| Slot::Wrong)
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Slot, A::Error> {
                    while seq.next_element::<IgnoredAny>()?.is_some() {}
                    Ok(Slot::Wrong)
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Slot, A::Error> {
                    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                    Ok(Slot::Wrong)
                }
            }
            d.deserialize_any(V)
        }
    }

    // ---------------------------------------------------------------------------------
    // The bad field's path
    // ---------------------------------------------------------------------------------

    /// Most probes for one frame (after the decode that finds the error).
    const MAX_PROBES: usize = 64;
    /// Most entries of one map (or elements of one sequence) probed.
    const MAX_FANOUT: usize = 32;
    /// Most tree nodes the decodes of one search visit together: this many times the
    /// frame's nodes, or [`VISIT_FLOOR`] if more. Each probe decodes the whole tree again
    /// (serde buffers the value searched in, with everything around it), so a probe of a
    /// large frame costs as much as the frame's decode: bounded in nodes visited, the
    /// search costs a few decodes of the frame however it is built. A large frame gets
    /// few probes or none, and its error names the field the search got to (the
    /// enclosing field serde reports, `command` in an order); a small one (up to about
    /// [`VISIT_FLOOR`] / [`MAX_PROBES`] nodes) gets all [`MAX_PROBES`]. Only the nodes
    /// this tree hands out are counted: a decode of an order or an offer also copies its
    /// command or action once into a tree of its own ([`super::tree::known`]), a
    /// constant factor more work per decode, not more decodes.
    const VISIT_FACTOR: usize = 4;
    const VISIT_FLOOR: usize = 4096;

    /// The work of one search for a bad field.
    #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
    pub struct Work {
        /// Nodes in the frame's tree (values, maps and sequences).
        pub nodes: usize,
        /// Decodes of the tree: the first, which finds the error, and the probes.
        pub runs: usize,
        /// Tree nodes those decodes visited, together.
        pub visited: usize,
    }

    /// What a search may still do (see [`VISIT_FACTOR`]).
    struct Budget {
        work: Work,
        /// Most nodes all runs may visit.
        limit: usize,
    }

    impl Budget {
        fn new(nodes: usize) -> Self {
            Budget {
                work: Work { nodes, ..Work::default() },
                limit: nodes.saturating_mul(VISIT_FACTOR).max(VISIT_FLOOR),
            }
        }

        /// Whether `n` more probes fit, each visiting at worst every node of the tree
        /// (and the one an [`Edit::Add`] gives it).
        fn allows(&self, n: usize) -> bool {
            self.work.runs + n <= MAX_PROBES + 1
                && self.work.visited.saturating_add(n.saturating_mul(self.work.nodes + 1)) <= self.limit
        }

        /// Decodes the tree, counting the nodes visited.
        fn run(&mut self, root: &Node) -> Option<Failure> {
            let seen = Cell::new(0);
            let out =
                serde_path_to_error::deserialize::<_, Envelope>(NodeDe::<NodeErr>::new(root, &seen)).err();
            self.work.runs += 1;
            self.work.visited += seen.get();
            let e = out?;
            Some((segments(e.path()), e.into_inner()))
        }
    }

    /// What the search found.
    enum Found {
        /// The path of the field that failed to decode, when it can be told.
        Field(Option<String>),
        /// A field the request does not have, or, `not_a_map`, a record given as a
        /// sequence ([`super::names`]): always told.
        Unread { field: String, not_a_map: bool },
    }

    /// The path of the field that failed to decode (`lead.location.lat`,
    /// `command.offer.id`), `None` when it cannot be told; and the search's work.
    fn field_path(enc: Encoding, bytes: &[u8]) -> (Found, Work) {
        let tree = match enc {
            Encoding::Json => {
                let mut de = serde_json::Deserializer::from_slice(bytes);
                Node::deserialize(Limited::new(&mut de)).and_then(|n| de.end().map(|()| n)).ok()
            }
            Encoding::Msgpack => {
                Node::deserialize(Limited::new(&mut rmp_serde::Deserializer::from_read_ref(bytes))).ok()
            }
        };
        match tree {
            Some(Node::Map(entries)) => {
                let root = Node::Map(envelope_first(entries));
                let mut budget = Budget::new(root.size());
                let found = locate(root, &mut budget);
                (found, budget.work)
            }
            // A value the tree does not hold (a MessagePack extension, a map key that
            // is not a string): the path as the frame's own decoder tracks it.
            _ => (Found::Field(tracked(enc, bytes)), Work::default()),
        }
    }

    /// The path serde tracks while decoding the frame itself.
    fn tracked(enc: Encoding, bytes: &[u8]) -> Option<String> {
        fn run<'de, D: Deserializer<'de>>(d: D) -> Option<String> {
            let e = serde_path_to_error::deserialize::<_, Envelope>(d).err()?;
            render(&segments(e.path()), None)
        }
        match enc {
            Encoding::Json => run(Strict(Limited::new(&mut serde_json::Deserializer::from_slice(bytes)))),
            Encoding::Msgpack => {
                run(Strict(Limited::new(&mut rmp_serde::Deserializer::from_read_ref(bytes))))
            }
        }
    }

    /// `id` and `type` moved to the front, as the decoder's fast path reads them: fields
    /// that come before `type` are buffered, which hides their path.
    fn envelope_first(mut entries: Vec<(String, Node)>) -> Vec<(String, Node)> {
        let mut front = Vec::with_capacity(entries.len());
        for key in ["id", "type"] {
            if let Some(i) = entries.iter().position(|(k, _)| k == key) {
                front.push(entries.remove(i));
            }
        }
        front.extend(entries);
        front
    }

    #[derive(Debug, Clone, PartialEq)]
    enum Seg {
        Key(String),
        Index(usize),
    }

    /// Where decoding the tree failed, and how.
    type Failure = (Vec<Seg>, NodeErr);

    fn segments(path: &serde_path_to_error::Path) -> Vec<Seg> {
        use serde_path_to_error::Segment;
        let mut out = Vec::new();
        for s in path.iter() {
            out.push(match s {
                Segment::Seq { index } => Seg::Index(*index),
                Segment::Map { key } => Seg::Key(key.clone()),
                // An externally tagged variant: `{"variant": body}`.
                Segment::Enum { variant } => Seg::Key(variant.clone()),
                Segment::Unknown => break,
            });
        }
        out
    }

    /// `lead.location.lat`, `command.windows.intervals[0].day`.
    fn render(path: &[Seg], tail: Option<&str>) -> Option<String> {
        let mut s = String::new();
        for seg in path {
            match seg {
                Seg::Key(k) => {
                    if !s.is_empty() {
                        s.push('.');
                    }
                    s.push_str(k);
                }
                Seg::Index(i) => s.push_str(&format!("[{i}]")),
            }
        }
        if let Some(t) = tail {
            if !s.is_empty() && !t.starts_with('[') {
                s.push('.');
            }
            s.push_str(t);
        }
        (!s.is_empty()).then_some(s)
    }

    /// The bad field: where the tracked path ends, or below it where serde buffered.
    fn locate(mut root: Node, budget: &mut Budget) -> Found {
        let Some(first) = budget.run(&root) else { return Found::Field(None) };
        let (mut path, err) = first.clone();
        if let Kind::Unread { rel, not_a_map } = &err.kind {
            // Told where it is, below the tracked path (a value read whole, `known`) or at
            // it (`rel` empty).
            let field = render(&path, (!rel.is_empty()).then_some(rel.as_str())).unwrap_or_default();
            return Found::Unread { field, not_a_map: *not_a_map };
        }
        let mut tail = None;
        while let Some(node) = at(&root, &path) {
            if let Kind::Missing(name) = err.kind {
                tail = Some(name);
                if let Node::Map(m) = node {
                    if !m.iter().any(|(k, _)| k == name) {
                        // Missing here, or in a value below that lacks it too: here if
                        // giving it here changes the error.
                        if !budget.allows(1) {
                            break;
                        }
                        if differs(&mut root, &path, &first, Edit::Add(name), budget) {
                            break;
                        }
                    }
                }
            }
            let Some(node) = at(&root, &path) else { break };
            if let (Kind::UnknownField(f), Node::Map(m)) = (&err.kind, node) {
                if m.iter().any(|(k, _)| k == f) {
                    path.push(Seg::Key(f.clone()));
                }
                break;
            }
            // The entries that may hold the error (maps and sequences) or be its value.
            let may_hold = |n: &Node| match err.kind {
                Kind::Missing(_) => n.is_container(),
                _ => n.is_container() || err.kind.may_be(n),
            };
            let at_root = path.is_empty();
            let candidates: Vec<(usize, Seg, bool)> = match node {
                Node::Map(m) => m
                    .iter()
                    .enumerate()
                    .filter(|(_, (k, v))| !(at_root && (k == "id" || k == "type")) && may_hold(v))
                    .take(MAX_FANOUT + 1)
                    .map(|(i, (k, v))| (i, Seg::Key(k.clone()), v.is_container()))
                    .collect(),
                Node::Seq(items) => items
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| may_hold(v))
                    .take(MAX_FANOUT + 1)
                    .map(|(i, v)| (i, Seg::Index(i), v.is_container()))
                    .collect(),
                _ => break,
            };
            if candidates.len() > MAX_FANOUT || !budget.allows(candidates.len()) {
                break;
            }
            // The one entry whose removal changes the error holds it.
            let mut holders = candidates
                .into_iter()
                .filter(|(i, _, _)| differs(&mut root, &path, &first, Edit::Remove(*i), budget))
                .collect::<Vec<_>>();
            if holders.len() > 1 {
                // A tag (`"action": "decline"`) holds any error of its variant: keep the
                // string whose change leaves the complaint as it was (the same kind of
                // error, wanting the same thing, at the same place).
                holders.retain(|(i, _, _)| {
                    budget.allows(1) && same_complaint(&mut root, &path, &first, *i, budget)
                });
            }
            match holders.pop() {
                Some((_, seg, container)) if holders.is_empty() => {
                    path.push(seg);
                    if !container {
                        break;
                    }
                }
                _ => break,
            }
        }
        Found::Field(render(&path, tail))
    }

    enum Edit {
        /// Takes out the map's entry or the sequence's element at this index.
        Remove(usize),
        /// Gives the map this key (with `null`), after its other entries.
        Add(&'static str),
    }

    /// Whether the tree, with `edit` made to the value at `path`, fails differently
    /// from `first` (or not at all). The tree is left as it was.
    fn differs(root: &mut Node, path: &[Seg], first: &Failure, edit: Edit, budget: &mut Budget) -> bool {
        enum Undo {
            Entry(usize, (String, Node)),
            Element(usize, Node),
            Pop,
        }
        let undo = match (at_mut(root, path), edit) {
            (Some(Node::Map(m)), Edit::Remove(i)) if i < m.len() => Undo::Entry(i, m.remove(i)),
            (Some(Node::Seq(v)), Edit::Remove(i)) if i < v.len() => Undo::Element(i, v.remove(i)),
            (Some(Node::Map(m)), Edit::Add(k)) => {
                m.push((k.to_owned(), Node::Null));
                Undo::Pop
            }
            _ => return false,
        };
        let now = budget.run(root);
        match (at_mut(root, path), undo) {
            (Some(Node::Map(m)), Undo::Entry(i, e)) => m.insert(i, e),
            (Some(Node::Seq(v)), Undo::Element(i, e)) => v.insert(i, e),
            (Some(Node::Map(m)), Undo::Pop) => {
                m.pop();
            }
            _ => {}
        }
        now.as_ref() != Some(first)
    }

    /// Whether the string at `path`'s entry `i`, changed to another (invalid) one, fails
    /// as `first` did but for the value: the entry is the value `first` is about.
    fn same_complaint(root: &mut Node, path: &[Seg], first: &Failure, i: usize, budget: &mut Budget) -> bool {
        let Some(Node::Str(s)) = entry_mut(root, path, i) else { return false };
        s.push('\u{1}');
        let now = budget.run(root);
        if let Some(Node::Str(s)) = entry_mut(root, path, i) {
            s.pop();
        }
        now.is_some_and(|(p, e)| {
            p == first.0
                && std::mem::discriminant(&e.kind) == std::mem::discriminant(&first.1.kind)
                && e.wanted == first.1.wanted
        })
    }

    /// The value of entry (or element) `i` of the map (or sequence) at `path`.
    fn entry_mut<'n>(root: &'n mut Node, path: &[Seg], i: usize) -> Option<&'n mut Node> {
        match at_mut(root, path)? {
            Node::Map(m) => m.get_mut(i).map(|(_, v)| v),
            Node::Seq(v) => v.get_mut(i),
            _ => None,
        }
    }

    fn at<'n>(mut node: &'n Node, path: &[Seg]) -> Option<&'n Node> {
        for seg in path {
            node = match (node, seg) {
                (Node::Map(m), Seg::Key(k)) => &m.iter().find(|(key, _)| key == k)?.1,
                (Node::Seq(v), Seg::Index(i)) => v.get(*i)?,
                _ => return None,
            };
        }
        Some(node)
    }

    fn at_mut<'n>(mut node: &'n mut Node, path: &[Seg]) -> Option<&'n mut Node> {
        for seg in path {
            node = match (node, seg) {
                (Node::Map(m), Seg::Key(k)) => &mut m.iter_mut().find(|(key, _)| key == k)?.1,
                (Node::Seq(v), Seg::Index(i)) => v.get_mut(*i)?,
                _ => return None,
            };
        }
        Some(node)
    }

    // ---------------------------------------------------------------------------------
    // Typed errors
    // ---------------------------------------------------------------------------------

    /// A decoding error, typed where serde says what it is.
    #[derive(Debug, Clone, PartialEq)]
    struct NodeErr {
        kind: Kind,
        /// What the decoder wanted instead, when it says.
        wanted: String,
        message: String,
    }

    #[derive(Debug, Clone, PartialEq)]
    enum Kind {
        /// A required field is absent.
        Missing(&'static str),
        /// A value of the wrong type or out of range: that value.
        Value(Unexp),
        UnknownVariant(String),
        UnknownField(String),
        /// A field the request does not have, or, `not_a_map`, a record given as a
        /// sequence: `rel` below the tracked path ([`tree::unread`]).
        Unread {
            rel: String,
            not_a_map: bool,
        },
        Other,
    }

    /// The bad value of a [`Kind::Value`] error, as far as it tells.
    #[derive(Debug, Clone, PartialEq)]
    enum Unexp {
        Bool(bool),
        Number,
        Str(String),
        Bytes,
        Unit,
        Seq,
        Map,
        Other,
    }

    impl Unexp {
        fn of(u: Unexpected) -> Self {
            match u {
                Unexpected::Bool(b) => Unexp::Bool(b),
                Unexpected::Unsigned(_) | Unexpected::Signed(_) | Unexpected::Float(_) => Unexp::Number,
                Unexpected::Char(c) => Unexp::Str(c.to_string()),
                Unexpected::Str(s) => Unexp::Str(s.to_owned()),
                Unexpected::Bytes(_) => Unexp::Bytes,
                Unexpected::Unit => Unexp::Unit,
                Unexpected::Seq => Unexp::Seq,
                Unexpected::Map => Unexp::Map,
                _ => Unexp::Other,
            }
        }
    }

    impl Kind {
        /// Whether `n` may be the value this error is about.
        fn may_be(&self, n: &Node) -> bool {
            match (self, n) {
                (Kind::Value(u), n) => match (u, n) {
                    (Unexp::Bool(a), Node::Bool(b)) => a == b,
                    (Unexp::Number, Node::U64(_) | Node::I64(_) | Node::F64(_)) => true,
                    (Unexp::Str(a), Node::Str(b)) => a == b,
                    (Unexp::Str(_) | Unexp::Bytes, Node::Bytes(_)) => true,
                    (Unexp::Unit, Node::Null) => true,
                    (Unexp::Seq, Node::Seq(_)) | (Unexp::Map, Node::Map(_)) => true,
                    (Unexp::Other, _) => true,
                    _ => false,
                },
                (Kind::UnknownVariant(v), Node::Str(s)) => v == s,
                (Kind::UnknownVariant(v), Node::Map(m)) => m.len() == 1 && m[0].0 == *v,
                (Kind::UnknownVariant(_), _) => false,
                _ => true,
            }
        }
    }

    impl fmt::Display for NodeErr {
        fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(&self.message)
        }
    }

    impl std::error::Error for NodeErr {}

    impl de::Error for NodeErr {
        fn custom<T: fmt::Display>(msg: T) -> Self {
            NodeErr { kind: Kind::Other, wanted: String::new(), message: msg.to_string() }
        }
        fn invalid_type(u: Unexpected, exp: &dyn de::Expected) -> Self {
            let wanted = exp.to_string();
            NodeErr {
                kind: Kind::Value(Unexp::of(u)),
                message: format!("invalid type: {u}, expected {wanted}"),
                wanted,
            }
        }
        fn invalid_value(u: Unexpected, exp: &dyn de::Expected) -> Self {
            let wanted = exp.to_string();
            NodeErr {
                kind: Kind::Value(Unexp::of(u)),
                message: format!("invalid value: {u}, expected {wanted}"),
                wanted,
            }
        }
        fn unknown_variant(v: &str, expected: &'static [&'static str]) -> Self {
            NodeErr {
                kind: Kind::UnknownVariant(v.to_owned()),
                wanted: expected.join(", "),
                message: format!("unknown variant `{v}`, expected one of {expected:?}"),
            }
        }
        fn unknown_field(f: &str, expected: &'static [&'static str]) -> Self {
            if expected == tree::UNKNOWN || expected == tree::NOT_A_MAP {
                let not_a_map = expected == tree::NOT_A_MAP;
                return NodeErr {
                    kind: Kind::Unread { rel: f.to_owned(), not_a_map },
                    wanted: String::new(),
                    message: format!("unknown field `{f}`"),
                };
            }
            NodeErr {
                kind: Kind::UnknownField(f.to_owned()),
                wanted: expected.join(", "),
                message: format!("unknown field `{f}`, expected one of {expected:?}"),
            }
        }
        fn missing_field(f: &'static str) -> Self {
            NodeErr { kind: Kind::Missing(f), wanted: String::new(), message: format!("missing field `{f}`") }
        }
    }
}

/// A frame's values as a tree, and a deserializer that reads the tree as the frame's
/// own decoders read the frame, strictly (as [`names::Strict`] reads the frame).
///
/// Used where a frame's values are held before they are decoded: the fields that come
/// before `type` (the envelope's slow path), the requests serde reads from its own buffer
/// as a whole ([`known`]), and the diagnosis of a failed frame, which decodes the tree
/// again with typed errors to find the bad field. The tree holds every value either
/// encoding has, MessagePack bytes included (read as a string is: see [`names`]), so a
/// request is read the same wherever its fields are held.
mod tree {
    use super::envelope_de::Key;
    use super::names;
    use serde::de::{
        self, DeserializeOwned, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Unexpected, Visitor,
    };
    use serde::ser::{self, Serialize};
    use serde::{Deserialize, Deserializer};
    use std::cell::Cell;
    use std::fmt;
    use std::marker::PhantomData;

    /// A frame's values, maps in the frame's order.
    #[derive(Debug, Clone, PartialEq)]
    pub(super) enum Node {
        Null,
        Bool(bool),
        U64(u64),
        I64(i64),
        F64(f64),
        Str(String),
        Bytes(Vec<u8>),
        Seq(Vec<Node>),
        Map(Vec<(String, Node)>),
    }

    impl Node {
        /// This node and every node below it (a tree within the nesting limit: the
        /// recursion is bounded).
        pub(super) fn size(&self) -> usize {
            match self {
                Node::Seq(items) => 1 + items.iter().map(Node::size).sum::<usize>(),
                Node::Map(entries) => 1 + entries.iter().map(|(_, n)| n.size()).sum::<usize>(),
                _ => 1,
            }
        }

        pub(super) fn is_container(&self) -> bool {
            matches!(self, Node::Seq(_) | Node::Map(_))
        }

        pub(super) fn unexpected(&self) -> Unexpected<'_> {
            match self {
                Node::Null => Unexpected::Unit,
                Node::Bool(b) => Unexpected::Bool(*b),
                Node::U64(n) => Unexpected::Unsigned(*n),
                Node::I64(n) => Unexpected::Signed(*n),
                Node::F64(x) => Unexpected::Float(*x),
                Node::Str(s) => Unexpected::Str(s),
                Node::Bytes(b) => Unexpected::Bytes(b),
                Node::Seq(_) => Unexpected::Seq,
                Node::Map(_) => Unexpected::Map,
            }
        }
    }

    impl<'de> Deserialize<'de> for Node {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Node;
                fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                    f.write_str("any value")
                }
                fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
                    Ok(Node::Bool(v))
                }
                fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
                    Ok(Node::I64(v))
                }
                fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
                    Ok(Node::U64(v))
                }
                fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
                    Ok(Node::F64(v))
                }
                fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
                    Ok(Node::Str(v.to_owned()))
                }
                fn visit_string<E: de::Error>(self, v: String) -> Result<Node, E> {
                    Ok(Node::Str(v))
                }
                // MessagePack bytes that are UTF-8 are a string, as a `String` reads them:
                // held as one, so that serde's own buffers (which take bytes for a
                // string but not for a name) read them as the frame's decoder does.
                fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Node, E> {
                    Ok(std::str::from_utf8(v)
                        .map_or_else(|_| Node::Bytes(v.to_vec()), |s| Node::Str(s.to_owned())))
                }
                fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Node, E> {
                    Ok(String::from_utf8(v).map_or_else(|e| Node::Bytes(e.into_bytes()), Node::Str))
                }
                fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
                    Ok(Node::Null)
                }
                fn visit_none<E: de::Error>(self) -> Result<Node, E> {
                    Ok(Node::Null)
                }
                fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
                    Node::deserialize(d)
                }
                fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
                    let mut items = Vec::new();
                    while let Some(n) = seq.next_element()? {
                        items.push(n);
                    }
                    Ok(Node::Seq(items))
                }
                fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
                    let mut entries = Vec::new();
                    while let Some(k) = map.next_key::<Key<'de>>()? {
                        entries.push((k.0.into_owned(), map.next_value()?));
                    }
                    Ok(Node::Map(entries))
                }
            }
            d.deserialize_any(V)
        }
    }

    // ---------------------------------------------------------------------------------
    // What the strict reader refuses, with the field it is about
    // ---------------------------------------------------------------------------------

    /// The `expected` list of the `unknown_field` error for a field the request does not
    /// have (see [`unread`]); the field is named relative to where the error is tracked.
    pub(super) const UNKNOWN: &[&str] = &["(no such field: unknown)"];
    /// The same for a record (a struct) given as a sequence instead of a map.
    pub(super) const NOT_A_MAP: &[&str] = &["(a map of named fields, not an array)"];

    /// The error for `rel` (a path below the value being read, `""` for the value
    /// itself): a field the request does not have, or, `not_a_map`, a record given as a
    /// sequence. Typed so that the diagnosis can tell it (an `unknown_field` error whose
    /// `expected` list is [`UNKNOWN`] or [`NOT_A_MAP`]) and name the field.
    pub(super) fn unread<E: de::Error>(rel: &str, not_a_map: bool) -> E {
        E::unknown_field(rel, if not_a_map { NOT_A_MAP } else { UNKNOWN })
    }

    /// `T`, read from a buffer of its value, checked against the value: every field the
    /// frame holds was read, and every record was a map.
    ///
    /// For the requests serde reads from its own buffer as a whole, out of reach of
    /// [`names::Strict`]: an order's `command` and the nested values in it (an internally
    /// tagged enum), an `offer`'s action (flattened into the request). Serde's buffer
    /// skips unknown fields and reads a record from a sequence, and nothing can be wrapped
    /// around it; so the value is read into a [`Node`] tree first, `T` is decoded from
    /// it, and `T` serialised again (by [`Covers`], which builds nothing) must have a
    /// record (or map) wherever the tree has a map, with every key of the tree among its
    /// fields, and wherever the tree has a sequence for one. Both are small (an order
    /// command, an offer action): the check costs less than their decode.
    pub(super) fn known<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: DeserializeOwned + Serialize,
    {
        let node = Node::deserialize(names::Strict(d))?;
        let seen = Cell::new(0);
        let value = T::deserialize(NodeDe::<D::Error>::new(&node, &seen))?;
        match value.serialize(Covers(&node)) {
            Ok(()) => Ok(value),
            Err(Uncovered::At { rel, not_a_map }) => Err(unread(&rel, not_a_map)),
            Err(Uncovered::Failed(why)) => Err(de::Error::custom(why)),
        }
    }

    /// `head` followed by `rel`, a path below it.
    fn join(head: &str, rel: &str) -> String {
        match rel.as_bytes().first() {
            None => head.to_owned(),
            Some(b'[') => format!("{head}{rel}"),
            Some(_) => format!("{head}.{rel}"),
        }
    }

    /// What [`Covers`] found in the frame that the decoded value does not have.
    #[derive(Debug)]
    enum Uncovered {
        /// A key (`not_a_map` false) or a sequence given for a record (true), at `rel`
        /// below the value checked.
        At { rel: String, not_a_map: bool },
        /// The value failed to serialise (no request type does).
        Failed(String),
    }

    impl Uncovered {
        /// The same, seen from `head`, the value above.
        fn under(self, head: &str) -> Self {
            match self {
                Uncovered::At { rel, not_a_map } => Uncovered::At { rel: join(head, &rel), not_a_map },
                failed => failed,
            }
        }
    }

    impl fmt::Display for Uncovered {
        fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
            match self {
                Uncovered::At { rel, .. } => write!(f, "not read: `{rel}`"),
                Uncovered::Failed(why) => f.write_str(why),
            }
        }
    }

    impl std::error::Error for Uncovered {}

    impl ser::Error for Uncovered {
        fn custom<T: fmt::Display>(msg: T) -> Self {
            Uncovered::Failed(msg.to_string())
        }
    }

    /// Serialises a decoded value against the frame's value it was decoded from
    /// (`node`): a record or map the value serialises must be a map in the frame, and
    /// every key of that map one of its fields (or keys). Values the frame does not hold
    /// (defaults) and scalars are not looked at; a form the check does not know (an
    /// externally tagged variant given other than as `{"variant": ...}`) passes.
    struct Covers<'a>(&'a Node);

    impl<'a> ser::Serializer for Covers<'a> {
        type Ok = ();
        type Error = Uncovered;
        type SerializeSeq = Items<'a>;
        type SerializeTuple = Items<'a>;
        type SerializeTupleStruct = Items<'a>;
        type SerializeTupleVariant = Items<'a>;
        type SerializeMap = Fields<'a>;
        type SerializeStruct = Fields<'a>;
        type SerializeStructVariant = Fields<'a>;

        fn serialize_bool(self, _: bool) -> Result<(), Uncovered> {
            Ok(())
        }
        fn serialize_i8(self, _: i8) -> Result<(), Uncovered> {
            Ok(())
        }
        fn serialize_i16(self, _: i16) -> Result<(), Uncovered> {
            Ok(())
        }
        fn serialize_i32(self, _: i32) -> Result<(), Uncovered> {
            Ok(())
        }
        fn serialize_i64(self, _: i64) -> Result<(), Uncovered> {
            Ok(())
        }
        fn serialize_u8(self, _: u8) -> Result<(), Uncovered> {
            Ok(())
        }
        fn serialize_u16(self, _: u16) -> Result<(), Uncovered> {
            Ok(())
        }
        fn serialize_u32(self, _: u32) -> Result<(), Uncovered> {
            Ok(())
        }
        fn serialize_u64(self, _: u64) -> Result<(), Uncovered> {
            Ok(())
        }
        fn serialize_f32(self, _: f32) -> Result<(), Uncovered> {
            Ok(())
        }
        fn serialize_f64(self, _: f64) -> Result<(), Uncovered> {
            Ok(())
        }
        fn serialize_char(self, _: char) -> Result<(), Uncovered> {
            Ok(())
        }
        fn serialize_str(self, _: &str) -> Result<(), Uncovered> {
            Ok(())
        }
        fn serialize_bytes(self, _: &[u8]) -> Result<(), Uncovered> {
            Ok(())
        }
        fn serialize_none(self) -> Result<(), Uncovered> {
            Ok(())
        }
        fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Result<(), Uncovered> {
            v.serialize(self)
        }
        fn serialize_unit(self) -> Result<(), Uncovered> {
            Ok(())
        }
        fn serialize_unit_struct(self, _: &'static str) -> Result<(), Uncovered> {
            Ok(())
        }
        fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> Result<(), Uncovered> {
            Ok(())
        }
        fn serialize_newtype_struct<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            v: &T,
        ) -> Result<(), Uncovered> {
            v.serialize(self)
        }
        fn serialize_newtype_variant<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            _: u32,
            variant: &'static str,
            v: &T,
        ) -> Result<(), Uncovered> {
            match body(self.0, variant) {
                Some(n) => v.serialize(Covers(n)).map_err(|e| e.under(variant)),
                None => Ok(()),
            }
        }
        fn serialize_seq(self, _: Option<usize>) -> Result<Items<'a>, Uncovered> {
            Ok(Items::of(Some(self.0)))
        }
        fn serialize_tuple(self, _: usize) -> Result<Items<'a>, Uncovered> {
            Ok(Items::of(Some(self.0)))
        }
        fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Items<'a>, Uncovered> {
            Ok(Items::of(Some(self.0)))
        }
        fn serialize_tuple_variant(
            self,
            _: &'static str,
            _: u32,
            variant: &'static str,
            _: usize,
        ) -> Result<Items<'a>, Uncovered> {
            Ok(Items::of(body(self.0, variant)))
        }
        fn serialize_map(self, _: Option<usize>) -> Result<Fields<'a>, Uncovered> {
            Fields::of(Some(self.0))
        }
        fn serialize_struct(self, _: &'static str, _: usize) -> Result<Fields<'a>, Uncovered> {
            Fields::of(Some(self.0))
        }
        fn serialize_struct_variant(
            self,
            _: &'static str,
            _: u32,
            variant: &'static str,
            _: usize,
        ) -> Result<Fields<'a>, Uncovered> {
            Fields::of(body(self.0, variant)).map_err(|e| e.under(variant))
        }
    }

    /// The body of an externally tagged variant given as `{"variant": body}`.
    fn body<'a>(node: &'a Node, variant: &str) -> Option<&'a Node> {
        match node {
            Node::Map(m) if m.len() == 1 && m[0].0 == variant => Some(&m[0].1),
            _ => None,
        }
    }

    /// The elements of a sequence, against the frame's sequence (if it is one).
    struct Items<'a> {
        frame: &'a [Node],
        next: usize,
    }

    impl<'a> Items<'a> {
        fn of(node: Option<&'a Node>) -> Self {
            match node {
                Some(Node::Seq(items)) => Items { frame: items, next: 0 },
                _ => Items { frame: &[], next: 0 },
            }
        }

        fn element<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Uncovered> {
            let i = self.next;
            self.next += 1;
            match self.frame.get(i) {
                Some(n) => v.serialize(Covers(n)).map_err(|e| e.under(&format!("[{i}]"))),
                None => Ok(()),
            }
        }
    }

    /// The four ways serde hands over the elements of a sequence, each to
    /// [`Items::element`].
    macro_rules! items_as {
        ($($trait:ident :: $method:ident),*) => {$(
            impl ser::$trait for Items<'_> {
                type Ok = ();
                type Error = Uncovered;
                fn $method<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Uncovered> {
                    self.element(v)
                }
                fn end(self) -> Result<(), Uncovered> {
                    Ok(())
                }
            }
        )*};
    }
    items_as!(
        SerializeSeq::serialize_element,
        SerializeTuple::serialize_element,
        SerializeTupleStruct::serialize_field,
        SerializeTupleVariant::serialize_field
    );

    /// The fields of a record (or the entries of a map), against the frame's map: each
    /// field the value has marks the frame's entries of that key; an entry left unmarked
    /// at the end is a field the value does not have.
    struct Fields<'a> {
        frame: &'a [(String, Node)],
        read: smallvec::SmallVec<[bool; 16]>,
        /// The frame's entry the map key serialised last names.
        key: Option<usize>,
    }

    impl<'a> Fields<'a> {
        fn of(node: Option<&'a Node>) -> Result<Self, Uncovered> {
            let frame: &[(String, Node)] = match node {
                Some(Node::Map(m)) => m,
                Some(Node::Seq(_)) => return Err(Uncovered::At { rel: String::new(), not_a_map: true }),
                _ => &[],
            };
            Ok(Fields { frame, read: smallvec::smallvec![false; frame.len()], key: None })
        }

        /// Marks the entries named `key`; the last is the one serde kept.
        fn mark(&mut self, key: &str) -> Option<usize> {
            let mut last = None;
            for (i, (k, _)) in self.frame.iter().enumerate() {
                if k == key {
                    self.read[i] = true;
                    last = Some(i);
                }
            }
            last
        }

        fn value<T: Serialize + ?Sized>(&self, at: Option<usize>, v: &T) -> Result<(), Uncovered> {
            match at {
                Some(i) => v.serialize(Covers(&self.frame[i].1)).map_err(|e| e.under(&self.frame[i].0)),
                None => Ok(()),
            }
        }

        fn finish(self) -> Result<(), Uncovered> {
            match self.read.iter().position(|read| !read) {
                Some(i) => Err(Uncovered::At { rel: self.frame[i].0.clone(), not_a_map: false }),
                None => Ok(()),
            }
        }
    }

    /// Struct fields and a struct variant's, each marked read and checked.
    macro_rules! fields_as {
        ($($trait:ident),*) => {$(
            impl ser::$trait for Fields<'_> {
                type Ok = ();
                type Error = Uncovered;
                fn serialize_field<T: Serialize + ?Sized>(
                    &mut self,
                    key: &'static str,
                    v: &T,
                ) -> Result<(), Uncovered> {
                    let at = self.mark(key);
                    self.value(at, v)
                }
                fn skip_field(&mut self, key: &'static str) -> Result<(), Uncovered> {
                    self.mark(key);
                    Ok(())
                }
                fn end(self) -> Result<(), Uncovered> {
                    self.finish()
                }
            }
        )*};
    }
    fields_as!(SerializeStruct, SerializeStructVariant);

    impl ser::SerializeMap for Fields<'_> {
        type Ok = ();
        type Error = Uncovered;
        fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), Uncovered> {
            // Keys of the maps in requests are strings (a key that is not does not match).
            self.key = key.serialize(KeyName).ok().flatten().and_then(|k| self.mark(&k));
            Ok(())
        }
        fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), Uncovered> {
            let at = self.key.take();
            self.value(at, v)
        }
        fn end(self) -> Result<(), Uncovered> {
            self.finish()
        }
    }

    /// A map key as a string (`None` for any other key).
    struct KeyName;

    impl ser::Serializer for KeyName {
        type Ok = Option<String>;
        type Error = Uncovered;
        type SerializeSeq = ser::Impossible<Option<String>, Uncovered>;
        type SerializeTuple = ser::Impossible<Option<String>, Uncovered>;
        type SerializeTupleStruct = ser::Impossible<Option<String>, Uncovered>;
        type SerializeTupleVariant = ser::Impossible<Option<String>, Uncovered>;
        type SerializeMap = ser::Impossible<Option<String>, Uncovered>;
        type SerializeStruct = ser::Impossible<Option<String>, Uncovered>;
        type SerializeStructVariant = ser::Impossible<Option<String>, Uncovered>;

        fn serialize_str(self, v: &str) -> Result<Option<String>, Uncovered> {
            Ok(Some(v.to_owned()))
        }
        fn serialize_newtype_struct<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            v: &T,
        ) -> Result<Option<String>, Uncovered> {
            v.serialize(self)
        }
        fn serialize_bool(self, _: bool) -> Result<Option<String>, Uncovered> {
            Ok(None)
        }
        fn serialize_i8(self, _: i8) -> Result<Option<String>, Uncovered> {
            Ok(None)
        }
        fn serialize_i16(self, _: i16) -> Result<Option<String>, Uncovered> {
            Ok(None)
        }
        fn serialize_i32(self, _: i32) -> Result<Option<String>, Uncovered> {
            Ok(None)
        }
        fn serialize_i64(self, _: i64) -> Result<Option<String>, Uncovered> {
            Ok(None)
        }
        fn serialize_u8(self, _: u8) -> Result<Option<String>, Uncovered> {
            Ok(None)
        }
        fn serialize_u16(self, _: u16) -> Result<Option<String>, Uncovered> {
            Ok(None)
        }
        fn serialize_u32(self, _: u32) -> Result<Option<String>, Uncovered> {
            Ok(None)
        }
        fn serialize_u64(self, _: u64) -> Result<Option<String>, Uncovered> {
            Ok(None)
        }
        fn serialize_f32(self, _: f32) -> Result<Option<String>, Uncovered> {
            Ok(None)
        }
        fn serialize_f64(self, _: f64) -> Result<Option<String>, Uncovered> {
            Ok(None)
        }
        fn serialize_char(self, _: char) -> Result<Option<String>, Uncovered> {
            Ok(None)
        }
        fn serialize_bytes(self, _: &[u8]) -> Result<Option<String>, Uncovered> {
            Ok(None)
        }
        fn serialize_none(self) -> Result<Option<String>, Uncovered> {
            Ok(None)
        }
        fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<Option<String>, Uncovered> {
            Ok(None)
        }
        fn serialize_unit(self) -> Result<Option<String>, Uncovered> {
            Ok(None)
        }
        fn serialize_unit_struct(self, _: &'static str) -> Result<Option<String>, Uncovered> {
            Ok(None)
        }
        fn serialize_unit_variant(
            self,
            _: &'static str,
            _: u32,
            variant: &'static str,
        ) -> Result<Option<String>, Uncovered> {
            Ok(Some(variant.to_owned()))
        }
        fn serialize_newtype_variant<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: &T,
        ) -> Result<Option<String>, Uncovered> {
            Ok(None)
        }
        fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq, Uncovered> {
            Err(ser::Error::custom("a map key is a string"))
        }
        fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple, Uncovered> {
            Err(ser::Error::custom("a map key is a string"))
        }
        fn serialize_tuple_struct(
            self,
            _: &'static str,
            _: usize,
        ) -> Result<Self::SerializeTupleStruct, Uncovered> {
            Err(ser::Error::custom("a map key is a string"))
        }
        fn serialize_tuple_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Self::SerializeTupleVariant, Uncovered> {
            Err(ser::Error::custom("a map key is a string"))
        }
        fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap, Uncovered> {
            Err(ser::Error::custom("a map key is a string"))
        }
        fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeStruct, Uncovered> {
            Err(ser::Error::custom("a map key is a string"))
        }
        fn serialize_struct_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Self::SerializeStructVariant, Uncovered> {
            Err(ser::Error::custom("a map key is a string"))
        }
    }

    // ---------------------------------------------------------------------------------
    // The tree's deserializer
    // ---------------------------------------------------------------------------------

    /// Reads a [`Node`] as serde_json and rmp_serde read the frame through
    /// [`names::Strict`], with errors of type `E`, counting in `seen` the nodes it hands
    /// out (the diagnosis bounds its work with it).
    pub(super) struct NodeDe<'a, E> {
        node: &'a Node,
        seen: &'a Cell<usize>,
        error: PhantomData<fn() -> E>,
    }

    impl<E> Clone for NodeDe<'_, E> {
        fn clone(&self) -> Self {
            *self
        }
    }

    impl<E> Copy for NodeDe<'_, E> {}

    impl<'a, E> NodeDe<'a, E> {
        pub(super) fn new(node: &'a Node, seen: &'a Cell<usize>) -> Self {
            seen.set(seen.get() + 1);
            NodeDe { node, seen, error: PhantomData }
        }
    }

    impl<'a, E: de::Error> IntoDeserializer<'a, E> for NodeDe<'a, E> {
        type Deserializer = Self;
        fn into_deserializer(self) -> Self {
            self
        }
    }

    /// A map key of the tree.
    pub(super) struct KeyDe<'a>(pub(super) &'a str);

    impl<'a, E: de::Error> IntoDeserializer<'a, E> for KeyDe<'a> {
        type Deserializer = de::value::BorrowedStrDeserializer<'a, E>;
        fn into_deserializer(self) -> Self::Deserializer {
            de::value::BorrowedStrDeserializer::new(self.0)
        }
    }

    /// The entries of a map of the tree, for a `MapDeserializer`.
    pub(super) fn entries<'a, E>(
        entries: &'a [(String, Node)],
        seen: &'a Cell<usize>,
    ) -> impl Iterator<Item = (KeyDe<'a>, NodeDe<'a, E>)> + 'a {
        entries.iter().map(move |(k, n)| (KeyDe(k.as_str()), NodeDe::new(n, seen)))
    }

    impl<'de, E: de::Error> Deserializer<'de> for NodeDe<'de, E> {
        type Error = E;

        fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, E> {
            let seen = self.seen;
            match self.node {
                Node::Null => v.visit_unit(),
                Node::Bool(b) => v.visit_bool(*b),
                Node::U64(n) => v.visit_u64(*n),
                Node::I64(n) => v.visit_i64(*n),
                Node::F64(x) => v.visit_f64(*x),
                Node::Str(s) => v.visit_borrowed_str(s),
                Node::Bytes(b) => v.visit_borrowed_bytes(b),
                Node::Seq(items) => {
                    let mut seq = de::value::SeqDeserializer::new(items.iter().map(|n| NodeDe::new(n, seen)));
                    let out = v.visit_seq(&mut seq)?;
                    seq.end()?;
                    Ok(out)
                }
                Node::Map(m) => {
                    let mut map = de::value::MapDeserializer::new(entries(m, seen));
                    let out = v.visit_map(&mut map)?;
                    map.end()?;
                    Ok(out)
                }
            }
        }

        fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, E> {
            match self.node {
                Node::Null => v.visit_none(),
                _ => v.visit_some(self),
            }
        }

        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _: &'static str,
            _: &'static [&'static str],
            v: V,
        ) -> Result<V::Value, E> {
            match self.node {
                // (MessagePack bytes that are UTF-8 are held as a string: see `Node`.)
                Node::Str(s) => v.visit_enum(de::value::BorrowedStrDeserializer::new(s)),
                Node::Map(m) if m.len() == 1 => {
                    v.visit_enum(EnumDe { variant: &m[0].0, body: NodeDe::new(&m[0].1, self.seen) })
                }
                n => Err(de::Error::invalid_type(n.unexpected(), &"string or map")),
            }
        }

        fn deserialize_newtype_struct<V: Visitor<'de>>(self, _: &'static str, v: V) -> Result<V::Value, E> {
            v.visit_newtype_struct(self)
        }

        /// A record is a map of named fields, never a sequence of them by position.
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            _: &'static [&'static str],
            v: V,
        ) -> Result<V::Value, E> {
            match self.node {
                Node::Seq(_) => Err(unread("", true)),
                _ => self.deserialize_any(v),
            }
        }

        /// Serde skips only a field the request does not have: refused, as
        /// [`names::Strict`] refuses it.
        fn deserialize_ignored_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, E> {
            Err(unread("", false))
        }

        // As serde_json (and [`names::Strict`]): a field or variant name is a string,
        // never an index.
        fn deserialize_identifier<V: Visitor<'de>>(self, v: V) -> Result<V::Value, E> {
            match self.node {
                Node::Str(s) => v.visit_borrowed_str(s),
                Node::Bytes(b) => v.visit_borrowed_bytes(b),
                n => Err(de::Error::invalid_type(n.unexpected(), &v)),
            }
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf unit unit_struct seq tuple tuple_struct map
        }
    }

    /// An externally tagged enum: `{"variant": body}`.
    struct EnumDe<'a, E> {
        variant: &'a str,
        body: NodeDe<'a, E>,
    }

    impl<'a, E: de::Error> de::EnumAccess<'a> for EnumDe<'a, E> {
        type Error = E;
        type Variant = BodyDe<'a, E>;
        fn variant_seed<S: DeserializeSeed<'a>>(self, seed: S) -> Result<(S::Value, BodyDe<'a, E>), E> {
            let v = seed.deserialize(de::value::BorrowedStrDeserializer::new(self.variant))?;
            Ok((v, BodyDe(self.body)))
        }
    }

    struct BodyDe<'a, E>(NodeDe<'a, E>);

    impl<'a, E: de::Error> de::VariantAccess<'a> for BodyDe<'a, E> {
        type Error = E;
        fn unit_variant(self) -> Result<(), E> {
            match self.0.node {
                Node::Null => Ok(()),
                n => Err(de::Error::invalid_type(n.unexpected(), &"unit variant")),
            }
        }
        fn newtype_variant_seed<T: DeserializeSeed<'a>>(self, seed: T) -> Result<T::Value, E> {
            seed.deserialize(self.0)
        }
        fn tuple_variant<V: Visitor<'a>>(self, _: usize, v: V) -> Result<V::Value, E> {
            self.0.deserialize_any(v)
        }
        fn struct_variant<V: Visitor<'a>>(
            self,
            fields: &'static [&'static str],
            v: V,
        ) -> Result<V::Value, E> {
            self.0.deserialize_struct("", fields, v)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An order event kept before order events named their pro (in a snapshot's replay
    /// buffer, as an array, or in the stream history, as a map) still loads, with no
    /// pro; one that names it round-trips in both forms.
    #[test]
    fn an_order_event_kept_before_it_named_its_pro_still_loads() {
        use crate::core::orders::{OrderEvent, OrderId};
        #[derive(Serialize)]
        #[serde(tag = "event", rename_all = "snake_case")]
        enum Before {
            Order { fact: OrderEvent },
        }
        let fact = OrderEvent::OrderCancelled { order: OrderId::new("o1"), at: 5 };
        let old = Before::Order { fact: fact.clone() };
        let want = StreamEvent::Order { fact: fact.clone(), pro: None };
        for bytes in [rmp_serde::to_vec(&old).unwrap(), rmp_serde::to_vec_named(&old).unwrap()] {
            assert_eq!(rmp_serde::from_slice::<StreamEvent>(&bytes).unwrap(), want);
        }
        let now = StreamEvent::Order { fact, pro: Some(ProId::new("s1")) };
        for bytes in [rmp_serde::to_vec(&now).unwrap(), rmp_serde::to_vec_named(&now).unwrap()] {
            assert_eq!(rmp_serde::from_slice::<StreamEvent>(&bytes).unwrap(), now);
        }
        let json = serde_json::to_value(&now).unwrap();
        assert_eq!(json["pro"], "s1");
        assert_eq!(serde_json::from_value::<StreamEvent>(json).unwrap(), now);
    }

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

    /// A map that keeps its entries in the given order, repeated keys too.
    struct Pairs(Vec<(&'static str, serde_json::Value)>);

    impl Serialize for Pairs {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap;
            let mut m = s.serialize_map(Some(self.0.len()))?;
            for (k, v) in &self.0 {
                m.serialize_entry(k, v)?;
            }
            m.end()
        }
    }

    /// Both encodings of `frame` decoded: they must fail alike; the JSON error.
    fn fails_alike(frame: &impl Serialize) -> DecodeError {
        let j = decode(Encoding::Json, &encode(Encoding::Json, frame)).unwrap_err();
        let m = decode(Encoding::Msgpack, &encode(Encoding::Msgpack, frame)).unwrap_err();
        assert_eq!((j.code, &j.id, &j.field), (m.code, &m.id, &m.field), "json {j:?}, msgpack {m:?}");
        j
    }

    #[test]
    fn repeated_id_or_type_is_a_bad_frame_in_both_encodings() {
        use serde_json::json;
        for (pairs, id) in [
            (
                vec![("id", json!("a")), ("type", json!("balance")), ("id", json!("b")), ("pro", json!("p"))],
                None,
            ),
            (
                vec![("id", json!("a")), ("type", json!("balance")), ("pro", json!("p")), ("id", json!("b"))],
                None,
            ),
            (
                vec![
                    ("id", json!("a")),
                    ("type", json!("balance")),
                    ("pro", json!("p")),
                    ("type", json!("explain")),
                ],
                Some("a"),
            ),
            (
                vec![
                    ("pro", json!("p")),
                    ("type", json!("balance")),
                    ("type", json!("explain")),
                    ("id", json!("a")),
                ],
                Some("a"),
            ),
            // Repeated after a bad field: still the envelope's fault.
            (
                vec![("id", json!("a")), ("type", json!("balance")), ("pro", json!(5)), ("type", json!("x"))],
                Some("a"),
            ),
        ] {
            let text = serde_json::to_string(&Pairs(pairs.clone())).unwrap();
            let e = fails_alike(&Pairs(pairs));
            assert_eq!((e.code, e.id.as_deref(), e.field.as_deref()), ("bad_frame", id, None), "{text}");
            assert!(e.message.contains("duplicate field"), "{text}: {e:?}");
        }
    }

    /// A publish's lead, complete.
    fn full_lead() -> serde_json::Value {
        serde_json::json!({
            "id": "L1", "category": "painting", "zone": "bologna", "kind": "match", "created_at": 1,
            "client": {"id": "c-9", "name": "Anna", "phone": "+39 333 1234567", "phone_verified": true}
        })
    }

    #[test]
    fn a_missing_field_is_invalid_field_naming_its_path_not_a_bad_frame() {
        use serde_json::json;
        let mut no_id = full_lead();
        no_id.as_object_mut().unwrap().remove("id");
        let mut no_client_id = full_lead();
        no_client_id["client"].as_object_mut().unwrap().remove("id");
        let mut no_created_at = full_lead();
        no_created_at.as_object_mut().unwrap().remove("created_at");
        let offer = json!({"price_cents": 500});
        let cases = [
            (json!({"type": "publish_lead", "lead": no_id}), "lead.id"),
            (json!({"type": "publish_lead", "lead": no_client_id}), "lead.client.id"),
            (json!({"type": "publish_lead", "lead": no_created_at}), "lead.created_at"),
            (json!({"type": "publish_lead"}), "lead"),
            (
                json!({"type": "upsert_pro", "pro": {"categories": ["painting"], "zones": ["bologna"]}}),
                "pro.id",
            ),
            (json!({"type": "remove_pro"}), "pro"),
            (json!({"type": "order", "command": {"order": "o1"}}), "command.type"),
            (json!({"type": "order", "command": {"type": "cancel_order"}}), "command.order"),
            (
                json!({"type": "order", "command": {"type": "send_custom_offer", "pro": "p", "client": "c",
                       "service": "s", "offer": offer}}),
                "command.offer.id",
            ),
            (
                json!({"type": "order", "command": {"type": "answer_request", "request": "r",
                       "answer": {"answer": "approve", "offer": offer}}}),
                "command.answer.offer.id",
            ),
            (
                json!({"type": "order", "command": {"type": "place_order", "order": "o1",
                       "placement": {"pro": "p", "client": "c", "service": "s"}}}),
                "command.placement.package",
            ),
        ];
        for (mut v, field) in cases {
            v["id"] = json!("m1");
            for e in [json(v.clone()).unwrap_err(), msgpack(v.clone()).unwrap_err()] {
                assert_eq!(
                    (e.code, e.id.as_deref(), e.field.as_deref()),
                    ("invalid_field", Some("m1"), Some(field)),
                    "{v}: {e:?}"
                );
            }
        }
    }

    /// R26/R27: the order book's tick is rota's clock (expiries recorded when due, on
    /// the wall clock once a minute); a client could otherwise run it at will.
    #[test]
    fn r26_r27_the_order_books_tick_is_not_a_client_command() {
        use serde_json::json;
        let v = json!({"id": "t1", "type": "order", "command": {"type": "tick"}});
        for e in [json(v.clone()).unwrap_err(), msgpack(v.clone()).unwrap_err()] {
            assert_eq!(
                (e.code, e.id.as_deref(), e.field.as_deref()),
                ("invalid_field", Some("t1"), Some("command.type")),
                "{e:?}"
            );
        }
    }

    #[test]
    fn a_value_that_quotes_an_error_message_is_an_invalid_field_of_its_own() {
        use serde_json::json;
        for text in ["unknown message type", "missing field `type`", "missing field `id`"] {
            let mut lead = full_lead();
            lead["kind"] = json!(text);
            for (v, field) in [
                (
                    json!({"id": "q", "type": "grant_credits", "pro": "p", "op": "o", "credits": text}),
                    "credits",
                ),
                (json!({"id": "q", "type": "publish_lead", "lead": lead}), "lead.kind"),
                (json!({"id": "q", "type": "advance_clock", "to_ms": text}), "to_ms"),
            ] {
                for e in [json(v.clone()).unwrap_err(), msgpack(v.clone()).unwrap_err()] {
                    assert_eq!(
                        (e.code, e.id.as_deref(), e.field.as_deref()),
                        ("invalid_field", Some("q"), Some(field)),
                        "{v}: {e:?}"
                    );
                }
            }
            // As the `type` itself: an unknown type, whatever it says.
            let v = json!({"id": "q", "type": text});
            for e in [json(v.clone()).unwrap_err(), msgpack(v.clone()).unwrap_err()] {
                assert_eq!((e.code, e.id.as_deref()), ("unknown_message", Some("q")), "{v}: {e:?}");
            }
        }
    }

    #[test]
    fn only_a_map_is_a_request_and_only_a_map_has_an_id() {
        use serde_json::json;
        for v in [json!(["x"]), json!(["x", "balance", "p"]), json!([]), json!("x"), json!(7), json!(null)] {
            for enc in [Encoding::Json, Encoding::Msgpack] {
                let bytes = encode(enc, &v);
                let e = decode(enc, &bytes).unwrap_err();
                assert_eq!(
                    (e.code, e.id.as_deref(), e.field.as_deref()),
                    ("bad_frame", None, None),
                    "{enc:?} {v}"
                );
                assert_eq!(peek_id(enc, &bytes), None, "{enc:?} {v}");
            }
        }
        // A map has one, also when the frame is bad otherwise or ends early.
        for (v, id) in [
            (json!({"lead": 5, "id": "p1", "type": "publish_lead"}), Some("p1")),
            (json!({"id": 5, "type": "balance"}), None),
            (json!({"id": "x".repeat(MAX_CORRELATION_ID + 1), "type": "balance"}), None),
        ] {
            for enc in [Encoding::Json, Encoding::Msgpack] {
                assert_eq!(peek_id(enc, &encode(enc, &v)).as_deref(), id, "{enc:?} {v}");
            }
        }
        let e = decode(Encoding::Json, br#"{"id":"t1","type":"balance","pro":"p""#).unwrap_err();
        assert_eq!((e.code, e.id.as_deref()), ("bad_frame", Some("t1")), "{e:?}");
    }

    #[test]
    fn the_envelope_is_judged_by_its_structure_in_both_encodings() {
        use serde_json::json;
        /// The frame's entries, and the code, id and field of the reply.
        type Case = (
            Vec<(&'static str, serde_json::Value)>,
            &'static str,
            Option<&'static str>,
            Option<&'static str>,
        );
        let cases: [Case; 8] = [
            // No `id` or no `type`: bad_frame, whatever else is wrong.
            (vec![("type", json!("balance")), ("pro", json!(5))], "bad_frame", None, None),
            (vec![("id", json!("m")), ("pro", json!(5))], "bad_frame", Some("m"), None),
            (vec![("pro", json!(5)), ("id", json!("m"))], "bad_frame", Some("m"), None),
            // An unknown type, before or after a bad field.
            (
                vec![("id", json!("u")), ("type", json!("teleport")), ("lead", json!(5))],
                "unknown_message",
                Some("u"),
                None,
            ),
            (
                vec![("lead", json!(5)), ("id", json!("u")), ("type", json!("teleport"))],
                "unknown_message",
                Some("u"),
                None,
            ),
            // `id` or `type` of the wrong type: invalid_field naming it.
            (
                vec![("id", json!(7)), ("type", json!("balance")), ("pro", json!("p"))],
                "invalid_field",
                None,
                Some("id"),
            ),
            (
                vec![("id", json!("t")), ("type", json!(["balance"])), ("pro", json!("p"))],
                "invalid_field",
                Some("t"),
                Some("type"),
            ),
            (
                vec![
                    ("id", json!("x".repeat(MAX_CORRELATION_ID + 1))),
                    ("type", json!("balance")),
                    ("pro", json!(5)),
                ],
                "invalid_field",
                None,
                Some("id"),
            ),
        ];
        for (pairs, code, id, field) in cases {
            let text = serde_json::to_string(&Pairs(pairs.clone())).unwrap();
            let e = fails_alike(&Pairs(pairs));
            assert_eq!((e.code, e.id.as_deref(), e.field.as_deref()), (code, id, field), "{text}: {e:?}");
        }
        let e = fails_alike(&json!({"pro": "p", "id": "m"}));
        assert!(e.message.contains("`type`"), "{e:?}");
    }

    #[test]
    fn an_error_in_the_offer_action_names_its_field_whatever_the_key_order() {
        use serde_json::json;
        let cases: [(Vec<(&str, serde_json::Value)>, &str); 9] = [
            (vec![("action", json!("teleport"))], "action"),
            (vec![("action", json!(true))], "action"),
            (vec![], "action"),
            (vec![("action", json!("decline")), ("by", json!(3))], "by"),
            // The bad value is the action's name: still `by`.
            (vec![("action", json!("decline")), ("by", json!("decline"))], "by"),
            (vec![("action", json!("decline")), ("by", json!({"pro": null, "client": null}))], "by"),
            (vec![("action", json!("decline"))], "by"),
            (vec![("action", json!("add_note"))], "text"),
            (vec![("action", json!("add_note")), ("text", json!(["a"]))], "text"),
        ];
        for (action, field) in cases {
            let fields = [vec![("lead", json!("L")), ("pro", json!("p"))], action].concat();
            let head = vec![("id", json!("6")), ("type", json!("offer"))];
            // `id` and `type` first (read as they come) and last (the fields buffered).
            for pairs in [[head.clone(), fields.clone()].concat(), [fields.clone(), head.clone()].concat()] {
                let text = serde_json::to_string(&Pairs(pairs.clone())).unwrap();
                let e = fails_alike(&Pairs(pairs));
                assert_eq!(
                    (e.code, e.id.as_deref(), e.field.as_deref()),
                    ("invalid_field", Some("6"), Some(field)),
                    "{text}: {e:?}"
                );
            }
        }
        // The frame itself is unchanged: a valid action still decodes.
        let v =
            json!({"id": "6", "type": "offer", "lead": "L", "pro": "p", "action": "add_note", "text": "hi"});
        for env in [json(v.clone()).unwrap(), msgpack(v).unwrap()] {
            assert_eq!(
                env.request,
                Request::Offer {
                    lead: LeadId::new("L"),
                    pro: ProId::new("p"),
                    action: OfferAction::AddNote { text: "hi".into() }
                }
            );
        }
    }

    #[test]
    fn the_search_for_the_bad_field_of_a_huge_frame_is_bounded() {
        use serde_json::json;
        // 5,000 maps next to a bad value inside an order command (buffered by serde,
        // so the field is searched for): answered, naming at least the command.
        let mut command = serde_json::Map::new();
        command.insert("type".into(), json!("send_custom_offer"));
        for i in 0..5_000 {
            command.insert(format!("k{i:05}"), json!({"a": [i]}));
        }
        command.insert("offer".into(), json!({"id": "o", "price_cents": "many"}));
        let v = json!({"id": "h", "type": "order", "command": command});
        for enc in [Encoding::Json, Encoding::Msgpack] {
            let bytes = encode(enc, &v);
            let (e, work) = diagnosis(enc, &bytes).unwrap();
            assert_eq!(decode(enc, &bytes), Err(e.clone()));
            assert_eq!((e.code, e.id.as_deref()), ("invalid_field", Some("h")), "{e:?}");
            assert!(e.field.as_deref().is_some_and(|f| f.starts_with("command")), "{e:?}");
            // Counted in tree nodes visited, never in time: a few decodes of the frame.
            assert!(work.nodes > 15_000 && work.visited <= 4 * work.nodes, "{work:?}");
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
                assert_eq!(e.field.as_deref(), Some(field), "{v}: {e:?}");
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
            assert_eq!(e.field.as_deref(), Some("command.order"), "{e:?}");
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

    // ---------------------------------------------------------------------------------
    // A number is never a name (see `names`)
    // ---------------------------------------------------------------------------------

    /// A value of a test frame: JSON, or a map or sequence of such values, so that a map
    /// may have a key that is not a string (an integer key exists only in MessagePack;
    /// JSON writes it as a string).
    #[derive(Clone, Debug)]
    enum W {
        J(serde_json::Value),
        Map(Vec<(W, W)>),
        Seq(Vec<W>),
        /// A MessagePack `bin` (JSON writes an array of numbers).
        Bin(Vec<u8>),
    }

    impl Serialize for W {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap;
            match self {
                W::J(v) => v.serialize(s),
                W::Map(entries) => {
                    let mut m = s.serialize_map(Some(entries.len()))?;
                    for (k, v) in entries {
                        m.serialize_entry(k, v)?;
                    }
                    m.end()
                }
                W::Seq(items) => s.collect_seq(items),
                W::Bin(b) => s.serialize_bytes(b),
            }
        }
    }

    fn j(v: serde_json::Value) -> W {
        W::J(v)
    }

    /// `{n: nil}`: the externally tagged form of a unit variant, named by an index.
    fn indexed(n: u64) -> W {
        W::Map(vec![(j(n.into()), j(serde_json::Value::Null))])
    }

    /// `v` with the value at `path` (map keys, and sequence indices as numbers) replaced
    /// by `leaf`. With `first`, each key on the path comes first in its map (a tag
    /// before the fields it selects); otherwise the maps keep their (sorted) order.
    fn put(v: &serde_json::Value, path: &[&str], leaf: &W, first: bool) -> W {
        let Some((at, rest)) = path.split_first() else { return leaf.clone() };
        match v {
            serde_json::Value::Object(m) => {
                assert!(m.contains_key(*at), "{at} in {v}");
                let mut entries: Vec<(W, W)> = m
                    .iter()
                    .map(|(k, x)| {
                        let x = if k == at { put(x, rest, leaf, first) } else { j(x.clone()) };
                        (j(k.as_str().into()), x)
                    })
                    .collect();
                if first {
                    let i = m.keys().position(|k| k == at).unwrap();
                    let e = entries.remove(i);
                    entries.insert(0, e);
                }
                W::Map(entries)
            }
            serde_json::Value::Array(items) => {
                let at: usize = at.parse().unwrap();
                W::Seq(
                    items
                        .iter()
                        .enumerate()
                        .map(|(i, x)| if i == at { put(x, rest, leaf, first) } else { j(x.clone()) })
                        .collect(),
                )
            }
            _ => panic!("no {at} in {v}"),
        }
    }

    /// The frame of request `ty` with `fields`, the value at `path` replaced by `leaf`:
    /// `id` and `type` first (read as they come) or last (the fields buffered).
    fn frame(
        ty: &str,
        fields: &serde_json::Value,
        path: &[&str],
        leaf: &W,
        head_first: bool,
        first: bool,
    ) -> W {
        let W::Map(mut entries) = put(fields, path, leaf, first) else { unreachable!() };
        let head = vec![(j("id".into()), j("n1".into())), (j("type".into()), j(ty.into()))];
        entries = if head_first { [head, entries].concat() } else { [entries, head].concat() };
        W::Map(entries)
    }

    /// Request `ty` with `fields` decodes in both encodings and every key order; with the
    /// value at `path` replaced by any of `bad`, it is refused as `invalid_field` naming
    /// `field`, with the request's id.
    fn names_are_strings(ty: &str, fields: serde_json::Value, path: &[&str], bad: &[W], field: &str) {
        let good = {
            let mut at = &fields;
            for p in path {
                at = match at {
                    serde_json::Value::Array(items) => &items[p.parse::<usize>().unwrap()],
                    v => &v[*p],
                };
            }
            j(at.clone())
        };
        let mut wrong = Vec::new();
        for enc in [Encoding::Json, Encoding::Msgpack] {
            for head_first in [true, false] {
                for first in [false, true] {
                    let ok = frame(ty, &fields, path, &good, head_first, first);
                    if let Err(e) = decode(enc, &encode(enc, &ok)) {
                        panic!("{enc:?} the valid {ok:?} is refused: {e:?}");
                    }
                    for leaf in bad {
                        let f = frame(ty, &fields, path, leaf, head_first, first);
                        let got = decode(enc, &encode(enc, &f));
                        let as_wanted = matches!(&got, Err(e)
                            if (e.code, e.id.as_deref(), e.field.as_deref()) == ("invalid_field", Some("n1"), Some(field)));
                        if !as_wanted {
                            let got = got.map(|env| env.request);
                            wrong.push(format!(
                                "{enc:?} {leaf:?} (head first {head_first}, key first {first}): {got:?}"
                            ));
                        }
                    }
                }
            }
        }
        assert!(wrong.is_empty(), "{ty} {path:?}: not refused naming {field}:\n{}", wrong.join("\n"));
    }

    /// Numbers, among them every index of an enum of `n` variants.
    fn numbers(n: u64) -> Vec<W> {
        (0..=n).map(|i| j(i.into())).chain([j((-1).into()), j(1.5.into())]).collect()
    }

    #[test]
    fn r17_an_offer_action_given_as_a_number_is_refused_naming_action() {
        use serde_json::json;
        let fields = json!({"lead": "L", "pro": "p", "action": "open"});
        names_are_strings("offer", fields, &["action"], &numbers(9), "action");
        // Also where the action needs a field of its own.
        let fields = json!({"lead": "L", "pro": "p", "action": "decline", "by": "pro"});
        names_are_strings("offer", fields, &["action"], &numbers(9), "action");
    }

    #[test]
    fn r17_the_party_of_a_decline_given_as_a_number_is_refused_naming_by() {
        use serde_json::json;
        let fields = json!({"lead": "L", "pro": "p", "action": "decline", "by": "client"});
        let bad = [numbers(2), vec![indexed(0), indexed(1)]].concat();
        names_are_strings("offer", fields, &["by"], &bad, "by");
    }

    #[test]
    fn r13_a_job_kind_given_as_a_number_is_refused_naming_lead_kind() {
        let mut lead = full_lead();
        lead["direct"] = serde_json::json!(["p1"]);
        lead["kind"] = serde_json::json!("direct");
        let fields = serde_json::json!({ "lead": lead });
        let bad = [numbers(3), vec![indexed(0), indexed(1), indexed(2)]].concat();
        names_are_strings("publish_lead", fields, &["lead", "kind"], &bad, "lead.kind");
    }

    /// A weekly schedule (R4) or approval window (R25) of one interval.
    fn windows() -> serde_json::Value {
        serde_json::json!({"time_zone": "Europe/Rome", "intervals": [{"day": "tue", "start_min": 0, "end_min": 360}]})
    }

    #[test]
    fn r4_a_schedule_day_given_as_a_number_is_refused_naming_its_path() {
        use serde_json::json;
        let bad = [numbers(7), vec![indexed(0), indexed(1)]].concat();
        let day = ["schedule", "intervals", "0", "day"];
        let fields = json!({"pro": "p1", "availability": {"schedule": windows()}});
        let path = [&["availability"][..], &day].concat();
        names_are_strings("set_availability", fields, &path, &bad, "availability.schedule.intervals[0].day");
        let pro = json!({"id": "p1", "categories": ["painting"], "zones": ["bologna"],
                         "availability": {"schedule": windows()}});
        let path = [&["pro", "availability"][..], &day].concat();
        names_are_strings(
            "upsert_pro",
            json!({ "pro": pro }),
            &path,
            &bad,
            "pro.availability.schedule.intervals[0].day",
        );
        let fields = json!({"command": {"type": "set_availability", "pro": "p1",
                                        "availability": {"schedule": windows()}}});
        let path = [&["command", "availability"][..], &day].concat();
        names_are_strings("order", fields, &path, &bad, "command.availability.schedule.intervals[0].day");
    }

    #[test]
    fn r25_r27_an_order_command_type_given_as_a_number_is_refused_naming_command_type() {
        use serde_json::json;
        // Index 8 would be the internal `tick`.
        for fields in [
            json!({"command": {"type": "cancel_order", "order": "o1"}}),
            json!({"command": {"type": "complete_order", "order": "o1"}}),
            json!({"command": {"type": "accept_custom_offer", "offer": "c1", "order": "o1"}}),
        ] {
            names_are_strings("order", fields, &["command", "type"], &numbers(9), "command.type");
        }
    }

    /// `set_acceptance_mode` with `mode`.
    fn set_mode(mode: serde_json::Value) -> serde_json::Value {
        serde_json::json!({"command": {"type": "set_acceptance_mode", "pro": "p1", "service": "painting", "mode": mode}})
    }

    #[test]
    fn r25_an_acceptance_mode_given_as_a_number_is_refused_naming_command_mode_mode() {
        use serde_json::json;
        let path = ["command", "mode", "mode"];
        names_are_strings(
            "order",
            set_mode(json!({"mode": "auto_accept"})),
            &path,
            &numbers(2),
            "command.mode.mode",
        );
        let approval = json!({"mode": "approval_required", "audience": "all_clients"});
        names_are_strings("order", set_mode(approval), &path, &numbers(2), "command.mode.mode");
    }

    #[test]
    fn r25_an_audience_given_as_a_number_is_refused_naming_command_mode_audience() {
        use serde_json::json;
        let mode = json!({"mode": "approval_required", "audience": "new_clients", "packages": ["basic"]});
        let bad = [numbers(2), vec![indexed(0), indexed(1)]].concat();
        names_are_strings(
            "order",
            set_mode(mode),
            &["command", "mode", "audience"],
            &bad,
            "command.mode.audience",
        );
    }

    #[test]
    fn r25_an_approval_window_day_given_as_a_number_is_refused_naming_its_path() {
        use serde_json::json;
        let mode = json!({"mode": "approval_required", "audience": "all_clients", "windows": windows()});
        let bad = [numbers(7), vec![indexed(0), indexed(6)]].concat();
        let path = ["command", "mode", "windows", "intervals", "0", "day"];
        names_are_strings("order", set_mode(mode), &path, &bad, "command.mode.windows.intervals[0].day");
    }

    #[test]
    fn r25_an_answer_given_as_a_number_is_refused_naming_command_answer_answer() {
        use serde_json::json;
        let path = ["command", "answer", "answer"];
        for answer in [
            json!({"answer": "decline"}),
            json!({"answer": "approve", "offer": {"id": "c1", "price_cents": 500}}),
        ] {
            let fields = json!({"command": {"type": "answer_request", "request": "r1", "answer": answer}});
            names_are_strings("order", fields, &path, &numbers(2), "command.answer.answer");
        }
    }

    #[test]
    fn a_request_type_given_as_a_number_is_invalid_field_naming_type() {
        use serde_json::json;
        let fields = json!({"pro": "p1"});
        for n in numbers(14) {
            for head_first in [true, false] {
                let f = frame("balance", &fields, &["pro"], &j(json!("p1")), head_first, false);
                let W::Map(mut entries) = f else { unreachable!() };
                for (k, v) in entries.iter_mut() {
                    if matches!(k, W::J(k) if k == "type") {
                        *v = n.clone();
                    }
                }
                let e = fails_alike(&W::Map(entries));
                assert_eq!(
                    (e.code, e.id.as_deref(), e.field.as_deref()),
                    ("invalid_field", Some("n1"), Some("type")),
                    "{n:?}: {e:?}"
                );
            }
        }
    }

    /// MessagePack: a map key that is a number is no field name either (serde would take
    /// it as the field's index): refused naming the map that has it.
    #[test]
    fn a_field_name_given_as_a_number_is_refused_in_msgpack() {
        use serde_json::json;
        let pro = |first: W| {
            W::Map(vec![
                (first, j(json!("p1"))),
                (j(json!("categories")), j(json!(["painting"]))),
                (j(json!("zones")), j(json!(["bologna"]))),
            ])
        };
        let cases = [
            // `id` as the index of `Pro`'s first field, directly and inside an order.
            (("upsert_pro", "pro"), pro(j(json!(0))), "pro"),
            (
                ("order", "command"),
                W::Map(vec![(j(json!("type")), j(json!("cancel_order"))), (j(json!(0)), j(json!("o1")))]),
                "command",
            ),
            (
                ("order", "command"),
                W::Map(vec![
                    (j(json!("type")), j(json!("place_order"))),
                    (j(json!("order")), j(json!("o1"))),
                    (
                        j(json!("placement")),
                        W::Map(vec![
                            (j(json!(0)), j(json!("p1"))),
                            (j(json!("client")), j(json!("c1"))),
                            (j(json!("service")), j(json!("painting"))),
                            (j(json!("package")), j(json!("basic"))),
                        ]),
                    ),
                ]),
                "command.placement",
            ),
        ];
        for ((ty, key), value, field) in cases {
            for head_first in [true, false] {
                let head = vec![(j(json!("id")), j(json!("n1"))), (j(json!("type")), j(json!(ty)))];
                let body = vec![(j(json!(key)), value.clone())];
                let f = W::Map(if head_first { [head, body].concat() } else { [body, head].concat() });
                let e = decode(Encoding::Msgpack, &encode(Encoding::Msgpack, &f)).unwrap_err();
                assert_eq!(e.code, "invalid_field", "{f:?}: {e:?}");
                assert_eq!(e.id.as_deref(), Some("n1"), "{f:?}: {e:?}");
                assert_eq!(e.field.as_deref(), Some(field), "{f:?}: {e:?}");
            }
        }
    }

    /// The strict reading changes nothing for valid frames: every enum a request carries,
    /// named, decodes as serde's own reading of the frame does, alike in both encodings.
    #[test]
    fn valid_names_still_decode_as_before_in_both_encodings() {
        use serde_json::json;
        let mut lead = full_lead();
        lead["kind"] = json!("contact");
        lead["direct"] = json!(["p1"]);
        let order = |command: serde_json::Value| json!({"type": "order", "command": command});
        let frames = [
            json!({"type": "publish_lead", "lead": lead}),
            json!({"type": "offer", "lead": "L", "pro": "p", "action": "decline", "by": "client"}),
            json!({"type": "offer", "lead": "L", "pro": "p", "action": "add_note", "text": "hi"}),
            json!({"type": "set_availability", "pro": "p", "availability": {"paused_until": 5, "schedule": windows()}}),
            order(
                set_mode(
                    json!({"mode": "approval_required", "audience": "new_clients", "windows": windows()}),
                )["command"]
                    .clone(),
            ),
            order(set_mode(json!({"mode": "auto_accept"}))["command"].clone()),
            order(json!({"type": "answer_request", "request": "r", "answer":
                   {"answer": "approve", "offer": {"id": "c", "price_cents": 5, "expires_at": 9}}})),
            order(json!({"type": "answer_request", "request": "r", "answer": {"answer": "decline"}})),
            json!({"type": "subscribe", "resume_from": 3, "batch": true}),
        ];
        for mut v in frames {
            v["id"] = json!("v1");
            let bytes = rmp_serde::to_vec_named(&v).unwrap();
            let serde_own = rmp_serde::from_slice::<Envelope>(&bytes).unwrap();
            assert_eq!(decode(Encoding::Msgpack, &bytes).unwrap(), serde_own, "{v}");
            assert_eq!(json(v.clone()).unwrap(), serde_own, "{v}");
        }
    }

    /// Request `ty` with `fields` (`fields` a map), `id` and `type` first (the request
    /// read as it comes) or last (its fields buffered first).
    fn framed(ty: &str, fields: &W, head_first: bool) -> W {
        let body = match fields {
            W::Map(body) => body.clone(),
            W::J(serde_json::Value::Object(m)) => {
                m.iter().map(|(k, v)| (j(k.as_str().into()), j(v.clone()))).collect()
            }
            _ => panic!("fields are a map: {fields:?}"),
        };
        let head = vec![(j("id".into()), j("n1".into())), (j("type".into()), j(ty.into()))];
        W::Map(if head_first { [head, body].concat() } else { [body, head].concat() })
    }

    /// Request `ty` with `fields` is refused in both encodings, read as it comes and
    /// buffered, as `invalid_field` naming `field`, with the request's id and `message`.
    fn refused_naming(ty: &str, fields: serde_json::Value, field: &str, message: &str) {
        for enc in [Encoding::Json, Encoding::Msgpack] {
            for head_first in [true, false] {
                let f = framed(ty, &j(fields.clone()), head_first);
                let got = decode(enc, &encode(enc, &f))
                    .map(|env| env.request)
                    .map_err(|e| (e.code, e.id, e.field, e.message));
                assert_eq!(
                    got,
                    Err(("invalid_field", Some("n1".into()), Some(field.into()), message.into())),
                    "{enc:?} head first {head_first}: {fields}"
                );
            }
        }
    }

    /// A typo in a field name (`client.contcat`, `autobuy[0].max_price`) would leave the
    /// field at its default and be answered `done`: how a lead is charged or what a pro
    /// pays would change silently. Every field a request does not have is refused, at
    /// any depth and in every request, naming its full path, in both encodings, whether
    /// the request is read as it comes or buffered, and inside the values serde buffers
    /// itself (an order's command, an offer's action).
    #[test]
    fn an_unknown_field_is_refused_naming_its_full_path_in_both_encodings() {
        use serde_json::json;
        let mut lead = full_lead();
        lead["client"]["contcat"] = json!({"call": true});
        let pro = json!({"id": "p1", "categories": ["painting"], "zones": ["bologna"], "autobuy": [
            {"name": "week", "zones": ["bologna"], "categories": ["painting"], "weekly_budget_credits": 100,
             "max_price": 5}]});
        let placement =
            json!({"pro": "p", "client": "c", "service": "s", "package": "basic", "returning": true});
        let offer = json!({"id": "co1", "price_cents": 500, "expires": 9});
        let order = |command: serde_json::Value| json!({"command": command});
        let cases = [
            ("publish_lead", json!({"lead": lead}), "lead.client.contcat"),
            ("upsert_pro", json!({"pro": pro}), "pro.autobuy[0].max_price"),
            ("balance", json!({"pro": "p1", "verbose": true}), "verbose"),
            ("subscribe", json!({"resume_form": 42}), "resume_form"),
            (
                "set_topup_rule",
                json!({"pro": "p1", "rule": {"threshold_credits": 1, "amount_credits": 2, "x": 0}}),
                "rule.x",
            ),
            (
                "set_availability",
                json!({"pro": "p1", "availability": {"paused_until": 5, "vacations": [1, 2]}}),
                "availability.vacations",
            ),
            (
                "order",
                order(json!({"type": "place_order", "order": "o1", "placement": placement})),
                "command.placement.returning",
            ),
            (
                "order",
                order(json!({"type": "cancel_order", "order": "o1", "reason": "late"})),
                "command.reason",
            ),
            (
                "order",
                order(
                    json!({"type": "answer_request", "request": "r1", "answer": {"answer": "approve", "offer": offer}}),
                ),
                "command.answer.offer.expires",
            ),
            (
                "order",
                order(
                    json!({"type": "answer_request", "request": "r1", "answer": {"answer": "decline", "offer": offer}}),
                ),
                "command.answer.offer",
            ),
            (
                "order",
                order(json!({"type": "set_acceptance_mode", "pro": "p1", "service": "s",
                             "mode": {"mode": "approval_required", "audience": "all_clients", "package": ["basic"]}})),
                "command.mode.package",
            ),
            ("offer", json!({"lead": "L1", "pro": "p1", "action": "open", "by": "pro"}), "by"),
            (
                "offer",
                json!({"lead": "L1", "pro": "p1", "action": "decline", "by": "pro", "note": "x"}),
                "note",
            ),
        ];
        for (ty, fields, field) in cases {
            refused_naming(ty, fields, field, names::UNKNOWN_FIELD);
        }
    }

    /// A record is a map of named fields: one given as an array would be read by
    /// position (`"location": [11.34, 44.49]` as lat 11.34, lon 44.49, though GeoJSON
    /// writes the longitude first). Refused naming the field, wherever the record is;
    /// what is documented as an array (a vacation `[from_ms, until_ms]`, lists) is not.
    #[test]
    fn a_record_given_as_an_array_is_refused_naming_it() {
        use serde_json::json;
        let message = "must be a map of named fields, not an array";
        let mut lead = full_lead();
        lead["location"] = json!([11.34, 44.49]);
        refused_naming("publish_lead", json!({"lead": lead}), "lead.location", message);
        let mut lead = full_lead();
        lead["client"] = json!(["c-9", "Anna", "+39 333 1234567", true]);
        refused_naming("publish_lead", json!({"lead": lead}), "lead.client", message);
        let pro =
            json!({"id": "p1", "categories": ["painting"], "zones": ["bologna"], "base": [44.49, 11.34]});
        refused_naming("upsert_pro", json!({"pro": pro}), "pro.base", message);
        let pro = json!({"id": "p1", "categories": ["painting"], "zones": ["bologna"], "quality": [10, 450, 3, 900]});
        refused_naming("upsert_pro", json!({"pro": pro}), "pro.quality", message);
        refused_naming(
            "candidates",
            json!({"zone": "bologna", "category": "painting", "location": [44.49, 11.34]}),
            "location",
            message,
        );
        refused_naming(
            "set_availability",
            json!({"pro": "p1", "availability": [null, [1, 2], null]}),
            "availability",
            message,
        );
        let order = |command: serde_json::Value| json!({"command": command});
        refused_naming(
            "order",
            order(json!({"type": "place_order", "order": "o1", "placement": ["p", "c", "s", "basic"]})),
            "command.placement",
            message,
        );
        refused_naming("order", order(json!(["cancel_order", "o1"])), "command", message);
        refused_naming(
            "order",
            order(
                json!({"type": "set_availability", "pro": "p1", "availability": {"schedule": ["Europe/Rome", []]}}),
            ),
            "command.availability.schedule",
            message,
        );
        // Arrays where the protocol has them.
        for enc in [Encoding::Json, Encoding::Msgpack] {
            for head_first in [true, false] {
                let fields = json!({"pro": "p1", "availability": {"vacation": [1, 2]}});
                let f = framed("set_availability", &j(fields), head_first);
                let got = decode(enc, &encode(enc, &f)).map(|env| env.request);
                let want = Request::SetAvailability {
                    pro: ProId::new("p1"),
                    availability: crate::core::Availability { vacation: Some((1, 2)), ..Default::default() },
                };
                assert_eq!(got, Ok(want), "{enc:?} head first {head_first}");
            }
        }
    }

    /// A MessagePack frame is one map, as a JSON frame is one object: two maps in one
    /// frame would get one reply and the second would be dropped unread. Bytes after the
    /// map are `bad_frame` (with the first map's id), in both encodings.
    #[test]
    fn bytes_after_the_frames_map_are_a_bad_frame_in_both_encodings() {
        use serde_json::json;
        let one = json!({"id": "a", "type": "balance", "pro": "p1"});
        let two = json!({"id": "b", "type": "balance", "pro": "p2"});
        for enc in [Encoding::Json, Encoding::Msgpack] {
            let first = encode(enc, &one);
            assert!(decode(enc, &first).is_ok(), "{enc:?}");
            for tail in [
                encode(enc, &two),
                encode(enc, &json!(1)),
                b"\xc1".to_vec(),
                b"\xdb\xff\xff\xff\xff".to_vec(),
            ] {
                if enc == Encoding::Json && tail.first() != Some(&b'{') && tail != b"1" {
                    continue;
                }
                let bytes = [first.clone(), tail.clone()].concat();
                let e = decode(enc, &bytes).unwrap_err();
                assert_eq!(
                    (e.code, e.id.as_deref(), e.field.as_deref()),
                    ("bad_frame", Some("a"), None),
                    "{enc:?} {tail:?}: {e:?}"
                );
                assert_eq!(peek_id(enc, &bytes).as_deref(), Some("a"), "{enc:?}");
            }
        }
    }

    /// `v` with every string value a MessagePack `bin` of its bytes (keys stay strings).
    fn bin_strings(v: &serde_json::Value) -> W {
        match v {
            serde_json::Value::String(s) => W::Bin(s.as_bytes().to_vec()),
            serde_json::Value::Array(items) => W::Seq(items.iter().map(bin_strings).collect()),
            serde_json::Value::Object(m) => {
                W::Map(m.iter().map(|(k, x)| (j(k.as_str().into()), bin_strings(x))).collect())
            }
            v => j(v.clone()),
        }
    }

    /// MessagePack strings may come as `bin` (UTF-8 bytes), read as a `String` reads
    /// them, the same wherever the request's fields are: read as they come, buffered
    /// because `type` comes after them, or buffered by serde (an order's command, an
    /// offer's action). Bytes that are not UTF-8 are `invalid_field` naming the field,
    /// the same in every case too.
    #[test]
    fn msgpack_bin_strings_are_read_as_strings_wherever_the_fields_are() {
        use serde_json::json;
        let mut lead = full_lead();
        lead["description"] = json!("Repaint a two-room flat");
        lead["direct"] = json!(["p1"]);
        lead["kind"] = json!("direct");
        let requests = [
            ("publish_lead", json!({"lead": lead})),
            ("offer", json!({"lead": "L1", "pro": "p1", "action": "decline", "by": "client"})),
            ("offer", json!({"lead": "L1", "pro": "p1", "action": "add_note", "text": "call back"})),
            (
                "order",
                json!({"command": {"type": "set_acceptance_mode", "pro": "p1", "service": "s",
                                   "mode": {"mode": "approval_required", "audience": "new_clients"}}}),
            ),
            (
                "order",
                json!({"command": {"type": "place_order", "order": "o1",
                                   "placement": {"pro": "p", "client": "c", "service": "s", "package": "basic"}}}),
            ),
        ];
        for (ty, fields) in requests {
            let want = msgpack(serde_json::to_value(framed(ty, &j(fields.clone()), true)).unwrap()).unwrap();
            for head_first in [true, false] {
                let bytes = encode(Encoding::Msgpack, &framed(ty, &bin_strings(&fields), head_first));
                assert_eq!(
                    decode(Encoding::Msgpack, &bytes),
                    Ok(want.clone()),
                    "head first {head_first}: {fields}"
                );
            }
        }
        let not_utf8 = || W::Bin(vec![b'a', 0xff, b'b']);
        let W::Map(mut lead) = bin_strings(&full_lead()) else { unreachable!() };
        lead.push((j("description".into()), not_utf8()));
        let W::Map(mut decline) = bin_strings(&json!({"lead": "L1", "pro": "p1", "action": "decline"}))
        else {
            unreachable!()
        };
        decline.push((j("by".into()), not_utf8()));
        for (ty, fields, field) in [
            ("publish_lead", W::Map(vec![(j("lead".into()), W::Map(lead))]), "lead.description"),
            ("offer", W::Map(decline), "by"),
        ] {
            for head_first in [true, false] {
                let e =
                    decode(Encoding::Msgpack, &encode(Encoding::Msgpack, &framed(ty, &fields, head_first)))
                        .unwrap_err();
                assert_eq!(
                    (e.code, e.id.as_deref(), e.field.as_deref()),
                    ("invalid_field", Some("n1"), Some(field)),
                    "{ty} head first {head_first}: {e:?}"
                );
            }
        }
    }
}
