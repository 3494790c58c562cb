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

/// One request frame: a client correlation id and the request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Echoed in the reply; any string up to 128 bytes.
    pub id: String,
    #[serde(flatten)]
    pub request: Request,
}

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
    pub details: std::collections::BTreeMap<String, String>,
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
            let code = if message.contains("unknown variant") {
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

/// Best effort: the path of the field that failed to decode. The request enum is
/// internally tagged and flattened, which hides the path from serde, so the payload of
/// the requests with nested bodies is decoded again on its own, tracking the path.
fn field_path(enc: Encoding, bytes: &[u8]) -> Option<String> {
    let v: serde_json::Value = match enc {
        Encoding::Json => serde_json::from_slice(bytes).ok()?,
        Encoding::Msgpack => rmp_serde::from_slice(bytes).ok()?,
    };
    let obj = v.as_object()?;
    match obj.get("type")?.as_str()? {
        "publish_lead" => path_in::<Lead>("lead", obj.get("lead")?),
        "upsert_pro" => path_in::<Pro>("pro", obj.get("pro")?),
        _ => None,
    }
}

fn path_in<T: serde::de::DeserializeOwned>(name: &str, v: &serde_json::Value) -> Option<String> {
    let err = serde_path_to_error::deserialize::<_, T>(v).err()?;
    let path = err.path().to_string();
    Some(if path == "." { name.to_string() } else { format!("{name}.{path}") })
}

/// Best effort: the correlation id of a frame that failed to decode, so the error
/// reply can still be matched to its request.
fn peek_id(enc: Encoding, bytes: &[u8]) -> Option<String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_round_trips_in_both_encodings() {
        let env = Envelope {
            id: "c1".into(),
            request: Request::Offer {
                lead: LeadId::new("L1"),
                pro: ProId::new("p1"),
                action: OfferAction::Decline { by: crate::core::Party::Pro },
            },
        };
        for enc in [Encoding::Json, Encoding::Msgpack] {
            let bytes = encode(enc, &env);
            assert_eq!(decode(enc, &bytes).unwrap(), env);
        }
        let json = String::from_utf8(encode(Encoding::Json, &env)).unwrap();
        assert_eq!(
            json,
            r#"{"id":"c1","type":"offer","lead":"L1","pro":"p1","action":"decline","by":"pro"}"#
        );
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
