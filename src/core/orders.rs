//! Order requests (R25-R27): whether a client's order starts at once or waits for the
//! pro's approval, the order request's life, custom offers, and the pro's response and
//! cancellation rates.
//!
//! Same shape as [`super::shard`]: [`OrderBook::decide`] reads the state and `now` and
//! returns facts ([`OrderEvent`]) plus the reply, or an [`OrderReject`] with nothing
//! changed; [`OrderBook::apply`] is infallible and is used both live and during WAL
//! replay. One book per tenant, keyed by pro. No clock, no I/O, no randomness.
//!
//! # Acceptance mode (R25)
//!
//! Each pro has one mode per service ([`CategoryId`], the gig): [`AcceptanceMode::AutoAccept`]
//! (the default for a service never configured) or
//! [`AcceptanceMode::ApprovalRequired`] with [`ApprovalRules`]. An order needs approval
//! when **all** the configured conditions match:
//!
//! * **audience**: `all_clients`, or `new_clients`: a client is *new* unless the
//!   platform says it ordered from this pro before (`returning_client`) or this book
//!   has recorded an order of that client with that pro (any status: a cancelled order
//!   still means the two have worked together; the fact outlives the order, see
//!   *Retention*);
//! * **packages**: the ordered package is in the list; no list = every package;
//! * **windows**: `now`, in the windows' own IANA time zone (the pro's), falls inside one
//!   of the weekly intervals; no windows = at all times. The intervals are alternatives
//!   (several windows, OR), each a `[start, end)` of one local day; a night window is two
//!   intervals around midnight (`21:00-24:00` and `00:00-06:00` of the next day), as the
//!   source article suggests. Local wall-clock time is used, so the window follows the
//!   pro's clock across daylight-saving changes.
//!
//! An order that matches none of this is placed at once (`outside_approval_rules`): the
//! article's point is that approval is a filter the pro narrows, never a wall.
//!
//! Exemption (article: "clients who already received a custom offer may order without a
//! request"): a client holding a valid custom offer from the pro (open, not expired) for
//! a service has its orders of that service with that pro placed at once, whatever the
//! rules say. The offer itself stays open: placing a gig order does not use it up. An
//! offer for another service is no pass: the pro's approval rules are per service
//! (R25), and an open-ended offer for one (offers need no expiry) would otherwise lift
//! every other service's rules for that client for good.
//!
//! # Order requests and custom offers (R26)
//!
//! The platform's order id is the idempotency key of [`OrderCommand::PlaceOrder`]; when
//! the order needs approval, the pending order request is known by that same id.
//!
//! ```text
//! request:  pending --approve(custom offer)--> approved
//!           pending --decline--------------->  declined
//!           pending --respond_by passes----->  expired        (all three terminal)
//! offer:    open --client accepts (before expires_at)--> accepted (creates an order)
//!           open --expires_at passes-------------------> expired      (both terminal)
//! order:    active --cancel---> cancelled
//!           active --complete-> completed               (both terminal)
//! ```
//!
//! A request must be answered within the tenant policy's `orders.order_request_ttl_s`
//! (`respond_by` is fixed when the request opens). Past `respond_by` a request is
//! expired even if no `Tick` has recorded it yet; likewise a custom offer at or after
//! its `expires_at`. A custom offer without `expires_at` never expires.
//!
//! # Idempotency
//!
//! Every command carries the platform's id: the order id (place, accept, cancel,
//! complete), the request id (answer), the custom offer id (send, approve). Repeating a
//! command with the same ids and payload answers the same reply and emits nothing; the
//! same id with another payload is `idempotency_conflict`. This is why declining a
//! request twice, or cancelling or completing an order twice, is answered as a retry,
//! while declining an approved or expired request, approving a declined one, approving
//! an approved one with another offer, completing a cancelled order or cancelling a
//! completed one is `illegal_transition` (an expired request answers
//! `order_request_expired`). Setting a mode or availability to what it already is emits
//! nothing.
//!
//! Ids are remembered for as long as their record is (see *Retention*): a repeat that
//! arrives after its record was forgotten is not recognised. Like payment APIs'
//! idempotency keys (kept for a day or so), the retention is set long past any
//! retry: a week by default, never less than an hour.
//!
//! # Retention
//!
//! A daemon that runs for months must not keep every request, offer and order. Records
//! are forgotten as *chains*: a request, the custom offer that approved it and the order
//! that offer became; or a custom offer sent outside any request and its order; or an
//! order placed directly. A chain has *ended* when its last record is terminal (request
//! declined or expired, offer expired, order cancelled or completed); it ended at the
//! time of the event that recorded that (`answered_at`, `expired_at`, `cancelled_at`,
//! `completed_at`). An active order or an open offer is live state and keeps its whole
//! chain (its request and offer are what an idempotent accept or approve answers from).
//!
//! A chain is forgotten once `orders.idempotency_retention_s` of the tenant policy has
//! passed since it ended: a `Tick` at or after `ended + retention` emits
//! [`OrderEvent::RequestForgotten`] / [`OrderEvent::CustomOfferForgotten`] /
//! [`OrderEvent::OrderForgotten`], naming the chain's first record, and `apply` removes
//! the whole chain and anything that still refers to it (deadlines, indexes). Only
//! `decide` reads the retention (like `order_request_ttl_s`): replay applies the logged
//! facts, so a policy change never rewrites history. A `Tick` records at most
//! [`MAX_EXPIRED_PER_TICK`] expiries and forgets at most [`MAX_FORGOTTEN_PER_TICK`]
//! chains; the rest wait for the next one, so its record stays far below the log's
//! record limit.
//!
//! What forgetting keeps, because the rules need it:
//!
//! * **R27 rates**: [`ProStats`] are counters, never recomputed from the records, so
//!   forgetting changes no rate. What the forgotten records had contributed is kept in
//!   [`ProOrders::forgotten`], so that [`OrderBook::check_invariants`] still proves the
//!   counters exactly: `stats = records still held + forgotten`.
//! * **R25 new clients**: per pro, the set of clients who ever placed an order with it
//!   (one client id per pro and client, [`ProOrders::has_ordered`]), kept when the orders
//!   are forgotten: a returning client stays returning.
//!
//! After forgetting, a command naming a forgotten id is answered as for an id never
//! seen: `unknown_order_request`, `unknown_custom_offer`, `unknown_order`, with a message
//! that says the id was never recorded or was forgotten. Telling the two apart would
//! need a tombstone per forgotten id, which is the unbounded growth retention removes.
//! A `place_order`, `send_custom_offer` or approval that reuses a forgotten id is a new
//! command (the same rule as payment APIs' expired idempotency keys).
//!
//! # Rates (R27)
//!
//! * Cancellation rate = cancelled orders / orders. A declined request never became an
//!   order, so it counts in neither. A completed order is an order that was not
//!   cancelled: it counts in the base only (and in `orders_completed`).
//! * Response rate = requests answered (approved or declined) before `respond_by` /
//!   requests that count. A request counts unless it arrived while the pro was marked
//!   unavailable (paused or on vacation, [`Availability`]); being outside the weekly
//!   schedule is normal working hours and does count. A request that does not count is
//!   left out of both sides, so answering it anyway cannot push the rate above 100 %.
//!
//! A pro becomes known to the book when the platform first sets its acceptance mode or
//! availability; orders and custom offers for a pro never configured are
//! `unknown_pro`, so typos surface instead of silently auto-accepting.

use super::model::{field_err, Availability, FieldError, Unavailable, WeeklyWindows, MAX_CREDITS};
use super::policy::Policy;
use crate::ids::{CategoryId, ClientId, Millis, ProId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
// Names the `string_id!` expansion refers to.
use crate::ids::{validate_id, IdError};
use smol_str::SmolStr;
use std::fmt;

crate::ids::string_id!(
    /// The platform's order id; also the id of the order request it becomes when the
    /// order needs approval (R26).
    OrderId
);
crate::ids::string_id!(
    /// A package of a service ("basic", "standard", "premium").
    PackageId
);
crate::ids::string_id!(
    /// The platform's id of a custom offer a pro sends a client.
    CustomOfferId
);

/// Most packages one approval rule may list, and most weekly intervals: bounds the
/// work of every placement.
const MAX_PACKAGES: usize = 64;
const MAX_INTERVALS: usize = 7 * 24;

/// Most chains one `Tick` forgets: bounds the tick's work and its WAL record (a backlog,
/// e.g. after a long stop, drains over the following ticks).
pub const MAX_FORGOTTEN_PER_TICK: usize = 1024;

/// Most requests and custom offers one `Tick` records as expired, for the same reason:
/// after a long stop every pending request of a tenant can be due at once, and one
/// record of all their expiries could exceed the log's record limit (it was refused
/// after the book had changed). They are refused as expired from their deadline on
/// whether or not a tick recorded it yet; the rest are recorded by the next ticks.
pub const MAX_EXPIRED_PER_TICK: usize = 4096;

// ---------------------------------------------------------------------------------
// Settings (R25)
// ---------------------------------------------------------------------------------

/// Which clients an approval rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Audience {
    /// Only clients who never ordered from this pro.
    NewClients,
    AllClients,
}

/// When an order needs the pro's approval: audience AND package AND window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRules {
    pub audience: Audience,
    /// Packages the rule applies to; `None` = every package.
    #[serde(default)]
    pub packages: Option<Vec<PackageId>>,
    /// Weekly windows in the pro's time zone; `None` = at all times.
    #[serde(default)]
    pub windows: Option<WeeklyWindows>,
}

impl ApprovalRules {
    pub fn validate(&self, field: &str) -> Result<(), FieldError> {
        if let Some(packages) = &self.packages {
            if packages.is_empty() {
                return Err(field_err(
                    format!("{field}.packages"),
                    "list at least one package, or leave packages out for every package",
                ));
            }
            if packages.len() > MAX_PACKAGES {
                return Err(field_err(format!("{field}.packages"), "at most 64 packages"));
            }
            for (i, p) in packages.iter().enumerate() {
                if let Err(e) = p.validate("package") {
                    return Err(field_err(format!("{field}.packages[{i}]"), e.reason));
                }
                if packages[..i].contains(p) {
                    return Err(field_err(format!("{field}.packages[{i}]"), "duplicate package"));
                }
            }
        }
        if let Some(w) = &self.windows {
            w.validate(&format!("{field}.windows"))?;
            if w.intervals.is_empty() {
                return Err(field_err(
                    format!("{field}.windows.intervals"),
                    "list at least one interval, or leave windows out for at all times",
                ));
            }
            if w.intervals.len() > MAX_INTERVALS {
                return Err(field_err(format!("{field}.windows.intervals"), "at most 168 intervals"));
            }
        }
        Ok(())
    }

    /// Whether an order of `package` by a (new or returning) client at `now` needs
    /// approval under these rules.
    pub fn applies(&self, now: Millis, package: &PackageId, new_client: bool) -> bool {
        let audience = match self.audience {
            Audience::AllClients => true,
            Audience::NewClients => new_client,
        };
        let package = self.packages.as_ref().is_none_or(|ps| ps.contains(package));
        // `WeeklyWindows::contains` treats no intervals as always; validate() refuses
        // an empty list, so that never decides here.
        let window = self.windows.as_ref().is_none_or(|w| w.contains(now));
        audience && package && window
    }
}

/// How a pro takes orders for one service (R25).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum AcceptanceMode {
    #[default]
    AutoAccept,
    ApprovalRequired(ApprovalRules),
}

// ---------------------------------------------------------------------------------
// Commands, events, replies, rejects
// ---------------------------------------------------------------------------------

/// What a client orders: the payload of [`OrderCommand::PlaceOrder`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub pro: ProId,
    pub client: ClientId,
    pub service: CategoryId,
    pub package: PackageId,
    /// The platform knows this client ordered from this pro before (history older than
    /// this book). Orders recorded here count as well.
    #[serde(default)]
    pub returning_client: bool,
}

impl Placement {
    fn validate(&self) -> Result<(), FieldError> {
        self.pro.validate("command.placement.pro")?;
        self.client.validate("command.placement.client")?;
        self.service.validate("command.placement.service")?;
        self.package.validate("command.placement.package")?;
        Ok(())
    }
}

/// A custom offer's terms as the pro sends them (R26).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomOfferTerms {
    pub id: CustomOfferId,
    /// Price in cents of the platform's currency.
    pub price_cents: u64,
    /// The client may accept until this time (exclusive); `None` = no expiry.
    #[serde(default)]
    pub expires_at: Option<Millis>,
}

/// Highest price of one custom offer, in cents (as [`MAX_CREDITS`]: far from `u64`
/// overflow when summed).
pub const MAX_PRICE_CENTS: u64 = MAX_CREDITS;

impl CustomOfferTerms {
    /// `field` is where the terms are in the request (`command.offer`,
    /// `command.answer.offer`).
    fn validate(&self, now: Millis, field: &str) -> Result<(), FieldError> {
        if let Err(e) = self.id.validate("id") {
            return Err(field_err(format!("{field}.id"), e.reason));
        }
        if self.price_cents == 0 {
            return Err(field_err(format!("{field}.price_cents"), "must be at least 1 cent"));
        }
        if self.price_cents > MAX_PRICE_CENTS {
            return Err(field_err(format!("{field}.price_cents"), "must be at most 10^12 cents"));
        }
        if matches!(self.expires_at, Some(t) if t <= now) {
            return Err(field_err(
                format!("{field}.expires_at"),
                "must be in the future, or left out for no expiry",
            ));
        }
        Ok(())
    }
}

/// The pro's answer to an order request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Answer {
    /// Approve by sending the client a custom offer.
    Approve {
        offer: CustomOfferTerms,
    },
    Decline,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OrderCommand {
    /// Set how a pro takes orders for one service; registers the pro.
    SetAcceptanceMode {
        pro: ProId,
        service: CategoryId,
        /// Tagged, and read from serde's buffer of this command: names only as strings
        /// (`"mode": 0` is no mode; see [`crate::protocol::names`]).
        #[serde(deserialize_with = "crate::protocol::names::strict")]
        mode: AcceptanceMode,
    },
    /// Mark the pro available or not (R16, R27); registers the pro.
    SetAvailability { pro: ProId, availability: Availability },
    /// A client orders a package of a pro's service.
    PlaceOrder { order: OrderId, placement: Placement },
    /// The pro approves (with a custom offer) or declines a pending request.
    AnswerRequest {
        request: OrderId,
        /// As `mode` above: `"answer": 1` is no answer.
        #[serde(deserialize_with = "crate::protocol::names::strict")]
        answer: Answer,
    },
    /// The pro sends a client a custom offer outside any request.
    SendCustomOffer { pro: ProId, client: ClientId, service: CategoryId, offer: CustomOfferTerms },
    /// The client accepts a custom offer; `order` is the platform's id of the order.
    AcceptCustomOffer { offer: CustomOfferId, order: OrderId },
    /// An order is cancelled (counts in the cancellation rate, R27).
    CancelOrder { order: OrderId },
    /// An order is finished: it ends its chain without counting as a cancellation (R27).
    CompleteOrder { order: OrderId },
    /// Record what expired at `now` (requests past `respond_by`, offers past expiry).
    /// rota's own clock sends it (`Engine::order_tick`); never read from a client
    /// (`"type": "tick"` is an unknown command there).
    #[serde(skip_deserializing)]
    Tick,
}

/// Why an order started without approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "via", rename_all = "snake_case")]
pub enum OrderVia {
    /// The service is in auto-accept mode.
    AutoAccept,
    /// Approval is required, but not for this client, package or time.
    OutsideApprovalRules,
    /// The client holds a valid custom offer from the pro.
    HeldCustomOffer { offer: CustomOfferId },
    /// The client accepted this custom offer.
    CustomOffer { offer: CustomOfferId },
}

/// Facts, as logged in the WAL and replayed by [`OrderBook::apply`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OrderEvent {
    AcceptanceModeSet {
        pro: ProId,
        service: CategoryId,
        mode: AcceptanceMode,
        at: Millis,
    },
    AvailabilitySet {
        pro: ProId,
        availability: Availability,
        at: Millis,
    },
    /// An order started without approval.
    OrderPlaced {
        order: OrderId,
        placement: Placement,
        via: OrderVia,
        at: Millis,
    },
    /// An order waits for the pro's approval.
    RequestOpened {
        request: OrderId,
        placement: Placement,
        /// Arrived while the pro was available: counts for the response rate.
        counts: bool,
        respond_by: Millis,
        at: Millis,
    },
    RequestApproved {
        request: OrderId,
        offer: CustomOfferTerms,
        at: Millis,
    },
    RequestDeclined {
        request: OrderId,
        at: Millis,
    },
    RequestExpired {
        request: OrderId,
        at: Millis,
    },
    CustomOfferSent {
        pro: ProId,
        client: ClientId,
        service: CategoryId,
        offer: CustomOfferTerms,
        at: Millis,
    },
    /// The client accepted the offer: order `order` starts.
    CustomOfferAccepted {
        offer: CustomOfferId,
        order: OrderId,
        at: Millis,
    },
    CustomOfferExpired {
        offer: CustomOfferId,
        at: Millis,
    },
    OrderCancelled {
        order: OrderId,
        at: Millis,
    },
    /// The order is finished: it ends like a cancellation but is not counted as one.
    OrderCompleted {
        order: OrderId,
        at: Millis,
    },
    /// A request that ended `orders.idempotency_retention_s` ago is forgotten, with the
    /// custom offer that approved it and the order that offer became (see *Retention*).
    RequestForgotten {
        request: OrderId,
        at: Millis,
    },
    /// A custom offer sent outside any request is forgotten, with the order it became.
    CustomOfferForgotten {
        offer: CustomOfferId,
        at: Millis,
    },
    /// An order placed directly (not from a custom offer) is forgotten.
    OrderForgotten {
        order: OrderId,
        at: Millis,
    },
}

impl OrderEvent {
    /// When the fact happened.
    pub fn at(&self) -> Millis {
        match self {
            Self::AcceptanceModeSet { at, .. }
            | Self::AvailabilitySet { at, .. }
            | Self::OrderPlaced { at, .. }
            | Self::RequestOpened { at, .. }
            | Self::RequestApproved { at, .. }
            | Self::RequestDeclined { at, .. }
            | Self::RequestExpired { at, .. }
            | Self::CustomOfferSent { at, .. }
            | Self::CustomOfferAccepted { at, .. }
            | Self::CustomOfferExpired { at, .. }
            | Self::OrderCancelled { at, .. }
            | Self::OrderCompleted { at, .. }
            | Self::RequestForgotten { at, .. }
            | Self::CustomOfferForgotten { at, .. }
            | Self::OrderForgotten { at, .. } => *at,
        }
    }

    /// Stable name (log lines, metrics labels).
    pub fn name(&self) -> &'static str {
        match self {
            Self::AcceptanceModeSet { .. } => "acceptance_mode_set",
            Self::AvailabilitySet { .. } => "availability_set",
            Self::OrderPlaced { .. } => "order_placed",
            Self::RequestOpened { .. } => "order_request_opened",
            Self::RequestApproved { .. } => "order_request_approved",
            Self::RequestDeclined { .. } => "order_request_declined",
            Self::RequestExpired { .. } => "order_request_expired",
            Self::CustomOfferSent { .. } => "custom_offer_sent",
            Self::CustomOfferAccepted { .. } => "custom_offer_accepted",
            Self::CustomOfferExpired { .. } => "custom_offer_expired",
            Self::OrderCancelled { .. } => "order_cancelled",
            Self::OrderCompleted { .. } => "order_completed",
            Self::RequestForgotten { .. } => "order_request_forgotten",
            Self::CustomOfferForgotten { .. } => "custom_offer_forgotten",
            Self::OrderForgotten { .. } => "order_forgotten",
        }
    }
}

/// What a command answered. Made of facts that never change, so a repeated command
/// answers exactly the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum OrderReply {
    OrderPlaced { order: OrderId, pro: ProId, via: OrderVia },
    RequestPending { request: OrderId, pro: ProId, respond_by: Millis },
    RequestApproved { request: OrderId, offer: CustomOfferId },
    RequestDeclined { request: OrderId },
    CustomOfferSent { offer: CustomOfferId, expires_at: Option<Millis> },
    OrderCancelled { order: OrderId },
    OrderCompleted { order: OrderId },
    Done,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OrderDecision {
    pub events: Vec<OrderEvent>,
    pub reply: OrderReply,
}

/// A refusal: nothing changed. `code()` is the stable wire error code.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
pub enum OrderReject {
    #[error(transparent)]
    InvalidField(#[from] FieldError),
    #[error("unknown pro {0}")]
    UnknownPro(ProId),
    #[error("unknown order request {0}: never placed, or forgotten (orders.idempotency_retention_s after it ended)")]
    UnknownRequest(OrderId),
    #[error(
        "unknown custom offer {0}: never sent, or forgotten (orders.idempotency_retention_s after it ended)"
    )]
    UnknownCustomOffer(CustomOfferId),
    #[error("unknown order {0}: never placed, or forgotten (orders.idempotency_retention_s after it ended)")]
    UnknownOrder(OrderId),
    #[error("order request {0} has expired")]
    RequestExpired(OrderId),
    #[error("custom offer {0} has expired")]
    CustomOfferExpired(CustomOfferId),
    #[error("cannot {action} {what} {id}: it is {from}")]
    IllegalTransition { what: &'static str, id: String, from: &'static str, action: &'static str },
    #[error("{field} {id} was already used with a different payload")]
    IdempotencyConflict { field: &'static str, id: String },
}

impl OrderReject {
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidField(_) => "invalid_field",
            Self::UnknownPro(_) => "unknown_pro",
            Self::UnknownRequest(_) => "unknown_order_request",
            Self::UnknownCustomOffer(_) => "unknown_custom_offer",
            Self::UnknownOrder(_) => "unknown_order",
            Self::RequestExpired(_) => "order_request_expired",
            Self::CustomOfferExpired(_) => "custom_offer_expired",
            Self::IllegalTransition { .. } => "illegal_transition",
            Self::IdempotencyConflict { .. } => "idempotency_conflict",
        }
    }
}

impl From<IdError> for OrderReject {
    fn from(e: IdError) -> Self {
        Self::InvalidField(e.into())
    }
}

fn conflict(field: &'static str, id: impl fmt::Display) -> OrderReject {
    OrderReject::IdempotencyConflict { field, id: id.to_string() }
}

// ---------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestStatus {
    Pending,
    Approved,
    Declined,
    Expired,
}

impl RequestStatus {
    pub fn is_terminal(self) -> bool {
        self != Self::Pending
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Declined => "declined",
            Self::Expired => "expired",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderRequest {
    pub id: OrderId,
    pub placement: Placement,
    pub status: RequestStatus,
    /// Counts for the pro's response rate (the pro was available when it arrived).
    pub counts: bool,
    pub opened_at: Millis,
    pub respond_by: Millis,
    pub answered_at: Option<Millis>,
    /// The custom offer that approved it.
    pub offer: Option<CustomOfferId>,
    /// When a `Tick` recorded the expiry (the retention counts from then). Absent in
    /// snapshots of older releases: restored as `respond_by`.
    #[serde(default)]
    pub expired_at: Option<Millis>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CustomOfferStatus {
    Open,
    Accepted,
    Expired,
}

impl CustomOfferStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Accepted => "accepted",
            Self::Expired => "expired",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomOffer {
    pub terms: CustomOfferTerms,
    pub pro: ProId,
    pub client: ClientId,
    pub service: CategoryId,
    /// The request this offer approved; `None` = sent outside any request.
    pub request: Option<OrderId>,
    pub status: CustomOfferStatus,
    pub sent_at: Millis,
    /// The order it became.
    pub order: Option<OrderId>,
    /// When a `Tick` recorded the expiry (the retention counts from then). Absent in
    /// snapshots of older releases: restored as `expires_at`.
    #[serde(default)]
    pub expired_at: Option<Millis>,
}

impl CustomOffer {
    /// Open and not past its expiry at `now`.
    pub fn is_valid(&self, now: Millis) -> bool {
        self.status == CustomOfferStatus::Open && !matches!(self.terms.expires_at, Some(t) if now >= t)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub id: OrderId,
    pub pro: ProId,
    pub client: ClientId,
    pub service: CategoryId,
    pub via: OrderVia,
    /// What the client ordered, for orders placed on the service (`None` for orders
    /// that come from a custom offer).
    pub placement: Option<Placement>,
    pub placed_at: Millis,
    pub cancelled_at: Option<Millis>,
    /// When the order was completed. Absent in snapshots of older releases, which had
    /// no completion: `None`.
    #[serde(default)]
    pub completed_at: Option<Millis>,
}

impl Order {
    /// Derived from `cancelled_at` / `completed_at`; at most one is set
    /// (`check_invariants`).
    pub fn status(&self) -> OrderStatus {
        match (self.cancelled_at, self.completed_at) {
            (Some(_), _) => OrderStatus::Cancelled,
            (None, Some(_)) => OrderStatus::Completed,
            (None, None) => OrderStatus::Active,
        }
    }

    /// When the order reached its terminal status; `None` while active.
    pub fn ended_at(&self) -> Option<Millis> {
        self.cancelled_at.or(self.completed_at)
    }
}

/// Where an order is in its life: `active` until cancelled or completed (both terminal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    Active,
    Cancelled,
    Completed,
}

impl OrderStatus {
    pub fn is_terminal(self) -> bool {
        self != Self::Active
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Cancelled => "cancelled",
            Self::Completed => "completed",
        }
    }
}

/// The counters behind a pro's rates (R27).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProStats {
    /// Every order request the pro received.
    pub requests: u64,
    /// Requests that arrived while the pro was available: the response rate's base.
    pub requests_counted: u64,
    /// Counted requests answered (approved or declined) before they expired.
    pub requests_responded: u64,
    pub requests_approved: u64,
    pub requests_declined: u64,
    pub requests_expired: u64,
    /// Orders started (directly or from a custom offer).
    pub orders: u64,
    pub orders_cancelled: u64,
    /// Orders completed: orders all the same, never cancellations. Absent in snapshots
    /// of older releases, which had no completion: 0.
    #[serde(default)]
    pub orders_completed: u64,
}

impl ProStats {
    /// Responded / counted requests, per mille; `None` before any counted request.
    pub fn response_rate_permille(&self) -> Option<u32> {
        permille(self.requests_responded, self.requests_counted)
    }

    /// Cancelled / started orders, per mille; declined requests are not orders, and a
    /// completed order counts in the base only.
    pub fn cancellation_rate_permille(&self) -> Option<u32> {
        permille(self.orders_cancelled, self.orders)
    }
}

impl ProStats {
    fn add(&mut self, o: &ProStats) {
        self.requests += o.requests;
        self.requests_counted += o.requests_counted;
        self.requests_responded += o.requests_responded;
        self.requests_approved += o.requests_approved;
        self.requests_declined += o.requests_declined;
        self.requests_expired += o.requests_expired;
        self.orders += o.orders;
        self.orders_cancelled += o.orders_cancelled;
        self.orders_completed += o.orders_completed;
    }

    /// What one request, in its current status, contributes to the counters.
    fn tally_request(&mut self, r: &OrderRequest) {
        self.requests += 1;
        self.requests_counted += u64::from(r.counts);
        match r.status {
            RequestStatus::Pending => {}
            RequestStatus::Approved => self.requests_approved += 1,
            RequestStatus::Declined => self.requests_declined += 1,
            RequestStatus::Expired => self.requests_expired += 1,
        }
        let answered = matches!(r.status, RequestStatus::Approved | RequestStatus::Declined);
        self.requests_responded += u64::from(answered && r.counts);
    }

    /// What one order contributes to the counters.
    fn tally_order(&mut self, o: &Order) {
        self.orders += 1;
        self.orders_cancelled += u64::from(o.cancelled_at.is_some());
        self.orders_completed += u64::from(o.completed_at.is_some());
    }
}

fn permille(part: u64, whole: u64) -> Option<u32> {
    // `part <= whole` (check_invariants), so the result is at most 1000.
    (whole > 0).then(|| (u128::from(part) * 1000 / u128::from(whole)) as u32)
}

/// Services of one pro with an acceptance mode other than auto-accept (R25): as many
/// as a profile's categories.
pub const MAX_MODES_PER_PRO: usize = 256;

/// One pro's settings and counters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProOrders {
    /// Per service; a service not listed is auto-accept.
    pub modes: BTreeMap<CategoryId, AcceptanceMode>,
    pub availability: Availability,
    pub stats: ProStats,
    /// Clients who ever placed an order with this pro (R25 new vs returning). Kept when
    /// their orders are forgotten: a superset of the clients of the orders held.
    clients: BTreeSet<ClientId>,
    /// Open custom offers by client (derived from the offers).
    open_offers: BTreeSet<(ClientId, CustomOfferId)>,
    /// What forgotten requests and orders had contributed to `stats` (see *Retention*):
    /// `stats` = the records still held + this.
    #[serde(default)]
    pub forgotten: ProStats,
}

impl ProOrders {
    pub fn mode(&self, service: &CategoryId) -> &AcceptanceMode {
        static AUTO: AcceptanceMode = AcceptanceMode::AutoAccept;
        self.modes.get(service).unwrap_or(&AUTO)
    }

    /// Whether `client` ever placed an order with this pro (its orders may be forgotten).
    pub fn has_ordered(&self, client: &ClientId) -> bool {
        self.clients.contains(client)
    }
}

/// Something the book must record at a time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Due {
    Request(OrderId),
    Offer(CustomOfferId),
}

/// A chain of records that is forgotten as one (see *Retention*), named by its first
/// record: a request (then the offer that approved it, then that offer's order), a
/// custom offer sent outside any request (then its order), or an order placed directly.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Chain {
    Request(OrderId),
    Offer(CustomOfferId),
    Order(OrderId),
}

impl Chain {
    fn forgotten(self, at: Millis) -> OrderEvent {
        match self {
            Chain::Request(request) => OrderEvent::RequestForgotten { request, at },
            Chain::Offer(offer) => OrderEvent::CustomOfferForgotten { offer, at },
            Chain::Order(order) => OrderEvent::OrderForgotten { order, at },
        }
    }
}

fn default_retention() -> Millis {
    7 * 24 * 3600 * crate::ids::SECOND_MS
}

/// One tenant's order requests, custom offers and orders, keyed by pro.
///
/// Deserialised through [`StoredBook`], which rebuilds the derived `ended` index and
/// fills what snapshots of older releases lack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "StoredBook")]
pub struct OrderBook {
    /// `orders.order_request_ttl_s` of the tenant policy, in ms. Only `decide` reads it:
    /// each request's `respond_by` is in its event, so replay never depends on it.
    request_ttl: Millis,
    pros: BTreeMap<ProId, ProOrders>,
    requests: BTreeMap<OrderId, OrderRequest>,
    offers: BTreeMap<CustomOfferId, CustomOffer>,
    orders: BTreeMap<OrderId, Order>,
    deadlines: BTreeSet<(Millis, Due)>,
    /// `orders.idempotency_retention_s` of the tenant policy, in ms. Only `decide` (and
    /// `next_deadline`) read it: forgetting is a logged fact, so replay never does.
    retention: Millis,
    /// Chains that have ended, by the time they ended (derived from the records; not
    /// stored, rebuilt on load). A chain is forgotten at `ended + retention`.
    #[serde(skip)]
    ended: BTreeSet<(Millis, Chain)>,
}

/// The stored form of [`OrderBook`] (same fields, same order), so that loading rebuilds
/// the derived index and accepts snapshots of releases without retention.
#[derive(Deserialize)]
struct StoredBook {
    request_ttl: Millis,
    pros: BTreeMap<ProId, ProOrders>,
    requests: BTreeMap<OrderId, OrderRequest>,
    offers: BTreeMap<CustomOfferId, CustomOffer>,
    orders: BTreeMap<OrderId, Order>,
    deadlines: BTreeSet<(Millis, Due)>,
    #[serde(default = "default_retention")]
    retention: Millis,
}

impl From<StoredBook> for OrderBook {
    fn from(s: StoredBook) -> Self {
        let mut book = OrderBook {
            request_ttl: s.request_ttl,
            pros: s.pros,
            requests: s.requests,
            offers: s.offers,
            orders: s.orders,
            deadlines: s.deadlines,
            retention: s.retention,
            ended: BTreeSet::new(),
        };
        // Older releases recorded an expiry without its time: the deadline it was due at
        // is the closest fact (and no later than the tick that recorded it).
        for r in book.requests.values_mut() {
            if r.status == RequestStatus::Expired && r.expired_at.is_none() {
                r.expired_at = Some(r.respond_by);
            }
        }
        for o in book.offers.values_mut() {
            if o.status == CustomOfferStatus::Expired && o.expired_at.is_none() {
                o.expired_at = Some(o.terms.expires_at.unwrap_or(o.sent_at));
            }
        }
        book.ended = book.ended_index();
        book
    }
}

fn done(events: Vec<OrderEvent>) -> OrderDecision {
    OrderDecision { events, reply: OrderReply::Done }
}

impl OrderBook {
    pub fn new(policy: &Policy) -> Self {
        Self {
            request_ttl: policy.order_request_ttl,
            pros: BTreeMap::new(),
            requests: BTreeMap::new(),
            offers: BTreeMap::new(),
            orders: BTreeMap::new(),
            deadlines: BTreeSet::new(),
            retention: policy.order_retention,
            ended: BTreeSet::new(),
        }
    }

    /// Policies can change at run time; only requests opened afterwards use the new TTL.
    /// A new retention applies to every ended chain from the next `Tick` on.
    pub fn set_policy(&mut self, policy: &Policy) {
        self.request_ttl = policy.order_request_ttl;
        self.retention = policy.order_retention;
    }

    pub fn pro(&self, pro: &ProId) -> Option<&ProOrders> {
        self.pros.get(pro)
    }

    /// The pro's counters; `None` for an unknown pro (R27).
    pub fn stats(&self, pro: &ProId) -> Option<ProStats> {
        self.pros.get(pro).map(|p| p.stats)
    }

    pub fn request(&self, id: &OrderId) -> Option<&OrderRequest> {
        self.requests.get(id)
    }

    pub fn custom_offer(&self, id: &CustomOfferId) -> Option<&CustomOffer> {
        self.offers.get(id)
    }

    pub fn order(&self, id: &OrderId) -> Option<&Order> {
        self.orders.get(id)
    }

    /// When the next `Tick` has something to record (an expiry, or a chain to forget).
    pub fn next_deadline(&self) -> Option<Millis> {
        let due = self.deadlines.first().map(|(at, _)| *at);
        let forget = self.ended.first().map(|(at, _)| at.saturating_add(self.retention));
        match (due, forget) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Requests, custom offers and orders held (not yet forgotten).
    pub fn len(&self) -> usize {
        self.requests.len() + self.offers.len() + self.orders.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    // -----------------------------------------------------------------------------
    // decide
    // -----------------------------------------------------------------------------

    pub fn decide(&self, now: Millis, cmd: &OrderCommand) -> Result<OrderDecision, OrderReject> {
        match cmd {
            OrderCommand::SetAcceptanceMode { pro, service, mode } => {
                pro.validate("command.pro")?;
                service.validate("command.service")?;
                if let AcceptanceMode::ApprovalRequired(rules) = mode {
                    rules.validate("command.mode")?;
                }
                let unchanged = self.pros.get(pro).is_some_and(|p| p.mode(service) == mode);
                if unchanged {
                    return Ok(done(vec![]));
                }
                // Each service with a mode of its own is kept for the pro, for good: a
                // bound like a profile's categories (auto-accept, the default, is the
                // absence of one and always allowed).
                let held = self.pros.get(pro).map_or(0, |p| p.modes.len());
                let new_service = !self.pros.get(pro).is_some_and(|p| p.modes.contains_key(service));
                if *mode != AcceptanceMode::AutoAccept && new_service && held >= MAX_MODES_PER_PRO {
                    return Err(field_err(
                        "command.service",
                        format!("pro {pro} has an acceptance mode for {held} services, the most it may have"),
                    )
                    .into());
                }
                Ok(done(vec![OrderEvent::AcceptanceModeSet {
                    pro: pro.clone(),
                    service: service.clone(),
                    mode: mode.clone(),
                    at: now,
                }]))
            }
            OrderCommand::SetAvailability { pro, availability } => {
                pro.validate("command.pro")?;
                availability.validate("command.availability")?;
                if self.pros.get(pro).is_some_and(|p| &p.availability == availability) {
                    return Ok(done(vec![]));
                }
                Ok(done(vec![OrderEvent::AvailabilitySet {
                    pro: pro.clone(),
                    availability: availability.clone(),
                    at: now,
                }]))
            }
            OrderCommand::PlaceOrder { order, placement } => self.decide_place(now, order, placement),
            OrderCommand::AnswerRequest { request, answer } => self.decide_answer(now, request, answer),
            OrderCommand::SendCustomOffer { pro, client, service, offer } => {
                self.decide_send_offer(now, pro, client, service, offer)
            }
            OrderCommand::AcceptCustomOffer { offer, order } => self.decide_accept(now, offer, order),
            OrderCommand::CancelOrder { order } => self.decide_end(now, order, OrderStatus::Cancelled),
            OrderCommand::CompleteOrder { order } => self.decide_end(now, order, OrderStatus::Completed),
            OrderCommand::Tick => Ok(done(self.due_events(now))),
        }
    }

    /// Cancel or complete an active order (`to` is the terminal status). Reaching the
    /// status it already has is a retry; the other terminal status is final.
    fn decide_end(&self, now: Millis, id: &OrderId, to: OrderStatus) -> Result<OrderDecision, OrderReject> {
        id.validate("command.order")?;
        let o = self.orders.get(id).ok_or_else(|| OrderReject::UnknownOrder(id.clone()))?;
        let order = id.clone();
        let (reply, event, action) = match to {
            OrderStatus::Cancelled => (
                OrderReply::OrderCancelled { order: order.clone() },
                OrderEvent::OrderCancelled { order, at: now },
                "cancel",
            ),
            OrderStatus::Completed => (
                OrderReply::OrderCompleted { order: order.clone() },
                OrderEvent::OrderCompleted { order, at: now },
                "complete",
            ),
            OrderStatus::Active => unreachable!("an order is never moved back to active"),
        };
        match o.status() {
            OrderStatus::Active => Ok(OrderDecision { events: vec![event], reply }),
            from if from == to => Ok(OrderDecision { events: vec![], reply }),
            from => Err(OrderReject::IllegalTransition {
                what: "order",
                id: id.to_string(),
                from: from.as_str(),
                action,
            }),
        }
    }

    fn decide_place(&self, now: Millis, id: &OrderId, p: &Placement) -> Result<OrderDecision, OrderReject> {
        id.validate("command.order")?;
        p.validate()?;
        // Idempotency: the order id names either an order or a request.
        if let Some(o) = self.orders.get(id) {
            if o.placement.as_ref() != Some(p) {
                return Err(conflict("order", id));
            }
            return Ok(OrderDecision { events: vec![], reply: placed_reply(o) });
        }
        if let Some(r) = self.requests.get(id) {
            if &r.placement != p {
                return Err(conflict("order", id));
            }
            return Ok(OrderDecision { events: vec![], reply: pending_reply(r) });
        }
        let pro = self.pros.get(&p.pro).ok_or_else(|| OrderReject::UnknownPro(p.pro.clone()))?;
        let held = self.held_offer(pro, &p.client, &p.service, now);
        let via = match (held, pro.mode(&p.service)) {
            (Some(offer), _) => OrderVia::HeldCustomOffer { offer: offer.clone() },
            (None, AcceptanceMode::AutoAccept) => OrderVia::AutoAccept,
            (None, AcceptanceMode::ApprovalRequired(rules)) => {
                let new_client = !p.returning_client && !pro.clients.contains(&p.client);
                if rules.applies(now, &p.package, new_client) {
                    let counts = !matches!(
                        pro.availability.check(now),
                        Err(Unavailable::Paused | Unavailable::Vacation)
                    );
                    let respond_by = now.saturating_add(self.request_ttl);
                    let reply =
                        OrderReply::RequestPending { request: id.clone(), pro: p.pro.clone(), respond_by };
                    let ev = OrderEvent::RequestOpened {
                        request: id.clone(),
                        placement: p.clone(),
                        counts,
                        respond_by,
                        at: now,
                    };
                    return Ok(OrderDecision { events: vec![ev], reply });
                }
                OrderVia::OutsideApprovalRules
            }
        };
        let reply = OrderReply::OrderPlaced { order: id.clone(), pro: p.pro.clone(), via: via.clone() };
        let ev = OrderEvent::OrderPlaced { order: id.clone(), placement: p.clone(), via, at: now };
        Ok(OrderDecision { events: vec![ev], reply })
    }

    /// The client's first valid custom offer from this pro for `service`, if any.
    fn held_offer<'a>(
        &'a self,
        pro: &'a ProOrders,
        client: &ClientId,
        service: &CategoryId,
        now: Millis,
    ) -> Option<&'a CustomOfferId> {
        pro.open_offers
            .range((client.clone(), CustomOfferId::new(""))..)
            .take_while(|(c, _)| c == client)
            .map(|(_, id)| id)
            .find(|id| self.offers.get(*id).is_some_and(|o| &o.service == service && o.is_valid(now)))
    }

    fn decide_answer(
        &self,
        now: Millis,
        id: &OrderId,
        answer: &Answer,
    ) -> Result<OrderDecision, OrderReject> {
        id.validate("command.request")?;
        if let Answer::Approve { offer } = answer {
            offer.id.validate("command.answer.offer.id")?;
        }
        let r = self.requests.get(id).ok_or_else(|| OrderReject::UnknownRequest(id.clone()))?;
        let illegal = |action| OrderReject::IllegalTransition {
            what: "order request",
            id: id.to_string(),
            from: r.status.as_str(),
            action,
        };
        match (r.status, answer) {
            (RequestStatus::Expired, _) => Err(OrderReject::RequestExpired(id.clone())),
            // Retries of the answer already recorded.
            (RequestStatus::Declined, Answer::Decline) => Ok(OrderDecision {
                events: vec![],
                reply: OrderReply::RequestDeclined { request: id.clone() },
            }),
            (RequestStatus::Approved, Answer::Approve { offer }) if r.offer.as_ref() == Some(&offer.id) => {
                if self.offers.get(&offer.id).map(|o| &o.terms) != Some(offer) {
                    return Err(conflict("offer.id", &offer.id));
                }
                Ok(OrderDecision {
                    events: vec![],
                    reply: OrderReply::RequestApproved { request: id.clone(), offer: offer.id.clone() },
                })
            }
            (RequestStatus::Approved | RequestStatus::Declined, Answer::Approve { .. }) => {
                Err(illegal("approve"))
            }
            (RequestStatus::Approved, Answer::Decline) => Err(illegal("decline")),
            (RequestStatus::Pending, _) if now >= r.respond_by => {
                Err(OrderReject::RequestExpired(id.clone()))
            }
            (RequestStatus::Pending, Answer::Decline) => Ok(OrderDecision {
                events: vec![OrderEvent::RequestDeclined { request: id.clone(), at: now }],
                reply: OrderReply::RequestDeclined { request: id.clone() },
            }),
            (RequestStatus::Pending, Answer::Approve { offer }) => {
                if self.offers.contains_key(&offer.id) {
                    return Err(conflict("offer.id", &offer.id));
                }
                offer.validate(now, "command.answer.offer")?;
                Ok(OrderDecision {
                    events: vec![OrderEvent::RequestApproved {
                        request: id.clone(),
                        offer: offer.clone(),
                        at: now,
                    }],
                    reply: OrderReply::RequestApproved { request: id.clone(), offer: offer.id.clone() },
                })
            }
        }
    }

    fn decide_send_offer(
        &self,
        now: Millis,
        pro: &ProId,
        client: &ClientId,
        service: &CategoryId,
        offer: &CustomOfferTerms,
    ) -> Result<OrderDecision, OrderReject> {
        pro.validate("command.pro")?;
        client.validate("command.client")?;
        service.validate("command.service")?;
        offer.id.validate("command.offer.id")?;
        let reply = OrderReply::CustomOfferSent { offer: offer.id.clone(), expires_at: offer.expires_at };
        if let Some(o) = self.offers.get(&offer.id) {
            let same = o.request.is_none()
                && &o.pro == pro
                && &o.client == client
                && &o.service == service
                && &o.terms == offer;
            if !same {
                return Err(conflict("offer.id", &offer.id));
            }
            return Ok(OrderDecision { events: vec![], reply });
        }
        if !self.pros.contains_key(pro) {
            return Err(OrderReject::UnknownPro(pro.clone()));
        }
        offer.validate(now, "command.offer")?;
        let ev = OrderEvent::CustomOfferSent {
            pro: pro.clone(),
            client: client.clone(),
            service: service.clone(),
            offer: offer.clone(),
            at: now,
        };
        Ok(OrderDecision { events: vec![ev], reply })
    }

    fn decide_accept(
        &self,
        now: Millis,
        offer_id: &CustomOfferId,
        order: &OrderId,
    ) -> Result<OrderDecision, OrderReject> {
        offer_id.validate("command.offer")?;
        order.validate("command.order")?;
        let offer =
            self.offers.get(offer_id).ok_or_else(|| OrderReject::UnknownCustomOffer(offer_id.clone()))?;
        if let Some(o) = self.orders.get(order) {
            if o.via != (OrderVia::CustomOffer { offer: offer_id.clone() }) {
                return Err(conflict("order", order));
            }
            return Ok(OrderDecision { events: vec![], reply: placed_reply(o) });
        }
        if self.requests.contains_key(order) {
            return Err(conflict("order", order));
        }
        match offer.status {
            CustomOfferStatus::Accepted => {
                return Err(OrderReject::IllegalTransition {
                    what: "custom offer",
                    id: offer_id.to_string(),
                    from: "accepted",
                    action: "accept",
                })
            }
            CustomOfferStatus::Expired => return Err(OrderReject::CustomOfferExpired(offer_id.clone())),
            CustomOfferStatus::Open if !offer.is_valid(now) => {
                return Err(OrderReject::CustomOfferExpired(offer_id.clone()))
            }
            CustomOfferStatus::Open => {}
        }
        let via = OrderVia::CustomOffer { offer: offer_id.clone() };
        Ok(OrderDecision {
            events: vec![OrderEvent::CustomOfferAccepted {
                offer: offer_id.clone(),
                order: order.clone(),
                at: now,
            }],
            reply: OrderReply::OrderPlaced { order: order.clone(), pro: offer.pro.clone(), via },
        })
    }

    fn due_events(&self, now: Millis) -> Vec<OrderEvent> {
        let mut out = Vec::new();
        for (at, due) in self.deadlines.iter().take(MAX_EXPIRED_PER_TICK) {
            if *at > now {
                break;
            }
            match due {
                Due::Request(request) => {
                    out.push(OrderEvent::RequestExpired { request: request.clone(), at: now })
                }
                Due::Offer(offer) => {
                    out.push(OrderEvent::CustomOfferExpired { offer: offer.clone(), at: now })
                }
            }
        }
        // Chains ended at least `retention` ago. A chain this tick's own expiries end
        // ends at `now` (and the retention is at least an hour): a repeated tick has
        // nothing more to do.
        let forget = self
            .ended
            .iter()
            .take_while(|(ended, _)| ended.saturating_add(self.retention) <= now)
            .take(MAX_FORGOTTEN_PER_TICK);
        out.extend(forget.map(|(_, chain)| chain.clone().forgotten(now)));
        out
    }

    // -----------------------------------------------------------------------------
    // apply
    // -----------------------------------------------------------------------------

    /// Applies one fact. Infallible: an event that refers to something unknown (which
    /// `decide` never produces) changes nothing.
    /// The pro `ev` is about, as the book holds it before `ev` is applied (a fact
    /// about a request, custom offer or order names only its id): what routes the fact
    /// to that pro's per-pro stream. `None` for an id the book does not hold.
    pub fn pro_of(&self, ev: &OrderEvent) -> Option<ProId> {
        let of_order = |o: &OrderId| self.orders.get(o).map(|o| o.pro.clone());
        let of_request = |r: &OrderId| self.requests.get(r).map(|r| r.placement.pro.clone());
        let of_offer = |o: &CustomOfferId| self.offers.get(o).map(|o| o.pro.clone());
        match ev {
            OrderEvent::AcceptanceModeSet { pro, .. }
            | OrderEvent::AvailabilitySet { pro, .. }
            | OrderEvent::CustomOfferSent { pro, .. } => Some(pro.clone()),
            OrderEvent::OrderPlaced { placement, .. } | OrderEvent::RequestOpened { placement, .. } => {
                Some(placement.pro.clone())
            }
            OrderEvent::RequestApproved { request, .. }
            | OrderEvent::RequestDeclined { request, .. }
            | OrderEvent::RequestExpired { request, .. }
            | OrderEvent::RequestForgotten { request, .. } => of_request(request),
            OrderEvent::CustomOfferAccepted { offer, .. }
            | OrderEvent::CustomOfferExpired { offer, .. }
            | OrderEvent::CustomOfferForgotten { offer, .. } => of_offer(offer),
            OrderEvent::OrderCancelled { order, .. }
            | OrderEvent::OrderCompleted { order, .. }
            | OrderEvent::OrderForgotten { order, .. } => of_order(order),
        }
    }

    pub fn apply(&mut self, ev: &OrderEvent) {
        match ev {
            OrderEvent::AcceptanceModeSet { pro, service, mode, .. } => {
                let modes = &mut self.pros.entry(pro.clone()).or_default().modes;
                // Auto-accept is the default: not stored (the pro is registered all the
                // same).
                if *mode == AcceptanceMode::AutoAccept {
                    modes.remove(service);
                } else {
                    modes.insert(service.clone(), mode.clone());
                }
            }
            OrderEvent::AvailabilitySet { pro, availability, .. } => {
                self.pros.entry(pro.clone()).or_default().availability = availability.clone();
            }
            OrderEvent::OrderPlaced { order, placement, via, at } => {
                if self.orders.contains_key(order) || self.requests.contains_key(order) {
                    return;
                }
                self.add_order(Order {
                    id: order.clone(),
                    pro: placement.pro.clone(),
                    client: placement.client.clone(),
                    service: placement.service.clone(),
                    via: via.clone(),
                    placement: Some(placement.clone()),
                    placed_at: *at,
                    cancelled_at: None,
                    completed_at: None,
                });
            }
            OrderEvent::RequestOpened { request, placement, counts, respond_by, at } => {
                if self.orders.contains_key(request) || self.requests.contains_key(request) {
                    return;
                }
                let stats = &mut self.pros.entry(placement.pro.clone()).or_default().stats;
                stats.requests += 1;
                stats.requests_counted += u64::from(*counts);
                self.deadlines.insert((*respond_by, Due::Request(request.clone())));
                self.requests.insert(
                    request.clone(),
                    OrderRequest {
                        id: request.clone(),
                        placement: placement.clone(),
                        status: RequestStatus::Pending,
                        counts: *counts,
                        opened_at: *at,
                        respond_by: *respond_by,
                        answered_at: None,
                        offer: None,
                        expired_at: None,
                    },
                );
            }
            OrderEvent::RequestApproved { request, offer, at } => {
                if self.offers.contains_key(&offer.id) {
                    return;
                }
                let Some(r) = self.answer(request, RequestStatus::Approved, *at) else { return };
                r.offer = Some(offer.id.clone());
                let p = r.placement.clone();
                self.pro_stats(&p.pro).requests_approved += 1;
                self.add_offer(CustomOffer {
                    terms: offer.clone(),
                    pro: p.pro,
                    client: p.client,
                    service: p.service,
                    request: Some(request.clone()),
                    status: CustomOfferStatus::Open,
                    sent_at: *at,
                    order: None,
                    expired_at: None,
                });
            }
            OrderEvent::RequestDeclined { request, at } => {
                if let Some(r) = self.answer(request, RequestStatus::Declined, *at) {
                    let pro = r.placement.pro.clone();
                    self.pro_stats(&pro).requests_declined += 1;
                    self.mark_ended(Chain::Request(request.clone()));
                }
            }
            OrderEvent::RequestExpired { request, at } => {
                let Some(r) = self.requests.get_mut(request) else { return };
                if r.status != RequestStatus::Pending {
                    return;
                }
                r.status = RequestStatus::Expired;
                r.expired_at = Some(*at);
                self.deadlines.remove(&(r.respond_by, Due::Request(request.clone())));
                let pro = r.placement.pro.clone();
                self.pro_stats(&pro).requests_expired += 1;
                self.mark_ended(Chain::Request(request.clone()));
            }
            OrderEvent::CustomOfferSent { pro, client, service, offer, at } => {
                if self.offers.contains_key(&offer.id) {
                    return;
                }
                self.add_offer(CustomOffer {
                    terms: offer.clone(),
                    pro: pro.clone(),
                    client: client.clone(),
                    service: service.clone(),
                    request: None,
                    status: CustomOfferStatus::Open,
                    sent_at: *at,
                    order: None,
                    expired_at: None,
                });
            }
            OrderEvent::CustomOfferAccepted { offer, order, at } => {
                if self.orders.contains_key(order) || self.requests.contains_key(order) {
                    return;
                }
                let Some(o) = self.offers.get_mut(offer) else { return };
                if o.status != CustomOfferStatus::Open {
                    return;
                }
                o.status = CustomOfferStatus::Accepted;
                o.order = Some(order.clone());
                let o = o.clone();
                self.close_offer(&o);
                self.add_order(Order {
                    id: order.clone(),
                    pro: o.pro,
                    client: o.client,
                    service: o.service,
                    via: OrderVia::CustomOffer { offer: offer.clone() },
                    placement: None,
                    placed_at: *at,
                    cancelled_at: None,
                    completed_at: None,
                });
            }
            OrderEvent::CustomOfferExpired { offer, at } => {
                let Some(o) = self.offers.get_mut(offer) else { return };
                if o.status != CustomOfferStatus::Open {
                    return;
                }
                o.status = CustomOfferStatus::Expired;
                o.expired_at = Some(*at);
                let o = o.clone();
                self.close_offer(&o);
                self.mark_ended(self.offer_chain(offer));
            }
            OrderEvent::OrderCancelled { order, at } => {
                let Some(o) = self.orders.get_mut(order) else { return };
                if o.status().is_terminal() {
                    return;
                }
                o.cancelled_at = Some(*at);
                let pro = o.pro.clone();
                self.pro_stats(&pro).orders_cancelled += 1;
                let chain = self.order_chain(order);
                self.mark_ended(chain);
            }
            OrderEvent::OrderCompleted { order, at } => {
                let Some(o) = self.orders.get_mut(order) else { return };
                if o.status().is_terminal() {
                    return;
                }
                o.completed_at = Some(*at);
                let pro = o.pro.clone();
                self.pro_stats(&pro).orders_completed += 1;
                let chain = self.order_chain(order);
                self.mark_ended(chain);
            }
            OrderEvent::RequestForgotten { request, .. } => self.forget(Chain::Request(request.clone())),
            OrderEvent::CustomOfferForgotten { offer, .. } => self.forget(Chain::Offer(offer.clone())),
            OrderEvent::OrderForgotten { order, .. } => self.forget(Chain::Order(order.clone())),
        }
    }

    // -----------------------------------------------------------------------------
    // retention
    // -----------------------------------------------------------------------------

    /// The chain an offer belongs to: its request's, or its own.
    fn offer_chain(&self, offer: &CustomOfferId) -> Chain {
        match self.offers.get(offer).and_then(|o| o.request.clone()) {
            Some(request) => Chain::Request(request),
            None => Chain::Offer(offer.clone()),
        }
    }

    /// The chain an order belongs to: its custom offer's, or its own.
    fn order_chain(&self, order: &OrderId) -> Chain {
        match self.orders.get(order).map(|o| &o.via) {
            Some(OrderVia::CustomOffer { offer }) => self.offer_chain(offer),
            _ => Chain::Order(order.clone()),
        }
    }

    /// When the chain named by `chain` ended; `None` while any record of it is live, or
    /// if `chain` does not name the first record of a held chain.
    fn chain_end(&self, chain: &Chain) -> Option<Millis> {
        match chain {
            Chain::Request(id) => {
                let r = self.requests.get(id)?;
                match r.status {
                    RequestStatus::Pending => None,
                    RequestStatus::Declined => r.answered_at,
                    RequestStatus::Expired => r.expired_at,
                    RequestStatus::Approved => self.offer_end(r.offer.as_ref()?),
                }
            }
            Chain::Offer(id) => {
                self.offers.get(id)?.request.is_none().then_some(())?;
                self.offer_end(id)
            }
            Chain::Order(id) => {
                let o = self.orders.get(id)?;
                if matches!(o.via, OrderVia::CustomOffer { .. }) {
                    return None;
                }
                o.ended_at()
            }
        }
    }

    /// When an offer and the order it became ended; `None` while either is live.
    fn offer_end(&self, id: &CustomOfferId) -> Option<Millis> {
        let o = self.offers.get(id)?;
        match o.status {
            CustomOfferStatus::Open => None,
            CustomOfferStatus::Expired => o.expired_at,
            CustomOfferStatus::Accepted => self.orders.get(o.order.as_ref()?)?.ended_at(),
        }
    }

    /// Files a chain that may just have ended under the time it ended.
    fn mark_ended(&mut self, chain: Chain) {
        if let Some(end) = self.chain_end(&chain) {
            self.ended.insert((end, chain));
        }
    }

    /// Every ended chain, recomputed from the records (load, `check_invariants`).
    fn ended_index(&self) -> BTreeSet<(Millis, Chain)> {
        let requests = self.requests.keys().map(|id| Chain::Request(id.clone()));
        let offers =
            self.offers.iter().filter(|(_, o)| o.request.is_none()).map(|(id, _)| Chain::Offer(id.clone()));
        let orders = self
            .orders
            .iter()
            .filter(|(_, o)| !matches!(o.via, OrderVia::CustomOffer { .. }))
            .map(|(id, _)| Chain::Order(id.clone()));
        requests.chain(offers).chain(orders).filter_map(|c| Some((self.chain_end(&c)?, c))).collect()
    }

    /// Removes an ended chain and everything that refers to it. The pros' counters are
    /// untouched (R27); what the records contributed moves to `forgotten`, and their
    /// clients stay in the pro's client set (R25).
    fn forget(&mut self, chain: Chain) {
        // Only what decide emits: a held chain that has ended.
        let Some(end) = self.chain_end(&chain) else { return };
        self.ended.remove(&(end, chain.clone()));
        let (mut offer, mut order) = (None, None);
        match chain {
            Chain::Request(id) => {
                let r = self.requests.remove(&id).expect("chain_end found the request");
                self.deadlines.remove(&(r.respond_by, Due::Request(id)));
                self.pros.entry(r.placement.pro.clone()).or_default().forgotten.tally_request(&r);
                offer = r.offer;
            }
            Chain::Offer(id) => offer = Some(id),
            Chain::Order(id) => order = Some(id),
        }
        if let Some(o) = offer.and_then(|id| self.offers.remove(&id)) {
            // Terminal offers hold no deadline and no open-offer entry: removed by key
            // all the same, so nothing of a forgotten chain can be left behind.
            self.close_offer(&o);
            order = o.order;
        }
        if let Some(o) = order.and_then(|id| self.orders.remove(&id)) {
            self.pros.entry(o.pro.clone()).or_default().forgotten.tally_order(&o);
        }
    }

    fn pro_stats(&mut self, pro: &ProId) -> &mut ProStats {
        &mut self.pros.entry(pro.clone()).or_default().stats
    }

    /// Moves a pending request to an answered status; counts a timely answer.
    fn answer(&mut self, id: &OrderId, to: RequestStatus, at: Millis) -> Option<&mut OrderRequest> {
        let r = self.requests.get_mut(id)?;
        if r.status != RequestStatus::Pending {
            return None;
        }
        r.status = to;
        r.answered_at = Some(at);
        self.deadlines.remove(&(r.respond_by, Due::Request(id.clone())));
        if r.counts {
            self.pros.entry(r.placement.pro.clone()).or_default().stats.requests_responded += 1;
        }
        Some(r)
    }

    fn add_order(&mut self, o: Order) {
        let pro = self.pros.entry(o.pro.clone()).or_default();
        pro.stats.orders += 1;
        pro.clients.insert(o.client.clone());
        self.orders.insert(o.id.clone(), o);
    }

    fn add_offer(&mut self, o: CustomOffer) {
        if let Some(t) = o.terms.expires_at {
            self.deadlines.insert((t, Due::Offer(o.terms.id.clone())));
        }
        self.pros
            .entry(o.pro.clone())
            .or_default()
            .open_offers
            .insert((o.client.clone(), o.terms.id.clone()));
        self.offers.insert(o.terms.id.clone(), o);
    }

    fn close_offer(&mut self, o: &CustomOffer) {
        if let Some(t) = o.terms.expires_at {
            self.deadlines.remove(&(t, Due::Offer(o.terms.id.clone())));
        }
        if let Some(p) = self.pros.get_mut(&o.pro) {
            p.open_offers.remove(&(o.client.clone(), o.terms.id.clone()));
        }
    }

    // -----------------------------------------------------------------------------
    // invariants
    // -----------------------------------------------------------------------------

    /// Recomputes every derived index and counter from the requests, offers and orders
    /// and compares. Tests call it after every step.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut stats: BTreeMap<&ProId, ProStats> = BTreeMap::new();
        let mut deadlines = BTreeSet::new();
        let mut clients: BTreeMap<&ProId, BTreeSet<ClientId>> = BTreeMap::new();
        let mut open: BTreeMap<&ProId, BTreeSet<(ClientId, CustomOfferId)>> = BTreeMap::new();
        for (id, r) in &self.requests {
            if &r.id != id || self.orders.contains_key(id) {
                return Err(format!("request {id} is filed wrongly or is also an order"));
            }
            let pro = &r.placement.pro;
            if !self.pros.contains_key(pro) {
                return Err(format!("request {id} of unknown pro {pro}"));
            }
            stats.entry(pro).or_default().tally_request(r);
            if r.status == RequestStatus::Pending {
                deadlines.insert((r.respond_by, Due::Request(id.clone())));
            }
            let answered = matches!(r.status, RequestStatus::Approved | RequestStatus::Declined);
            if answered != r.answered_at.is_some() {
                return Err(format!(
                    "request {id} is {} but answered_at is {:?}",
                    r.status.as_str(),
                    r.answered_at
                ));
            }
            if (r.status == RequestStatus::Expired) != r.expired_at.is_some() {
                return Err(format!(
                    "request {id} is {} but expired_at is {:?}",
                    r.status.as_str(),
                    r.expired_at
                ));
            }
            match (&r.offer, r.status) {
                (Some(o), RequestStatus::Approved) => {
                    if self.offers.get(o).and_then(|o| o.request.as_ref()) != Some(id) {
                        return Err(format!("request {id} approved by offer {o}, which does not point back"));
                    }
                }
                (None, RequestStatus::Approved) => {
                    return Err(format!("request {id} approved without offer"))
                }
                (Some(_), _) => return Err(format!("request {id} has an offer but is not approved")),
                (None, _) => {}
            }
        }
        for (id, o) in &self.offers {
            if &o.terms.id != id || !self.pros.contains_key(&o.pro) {
                return Err(format!("offer {id} is filed wrongly or of an unknown pro"));
            }
            match o.status {
                CustomOfferStatus::Open => {
                    if let Some(t) = o.terms.expires_at {
                        deadlines.insert((t, Due::Offer(id.clone())));
                    }
                    open.entry(&o.pro).or_default().insert((o.client.clone(), id.clone()));
                }
                CustomOfferStatus::Accepted => {
                    let ok = o.order.as_ref().and_then(|n| self.orders.get(n)).map(|n| &n.via)
                        == Some(&OrderVia::CustomOffer { offer: id.clone() });
                    if !ok {
                        return Err(format!("offer {id} accepted but its order does not come from it"));
                    }
                }
                CustomOfferStatus::Expired => {}
            }
            if (o.status == CustomOfferStatus::Accepted) != o.order.is_some() {
                return Err(format!("offer {id} order link does not match its status"));
            }
            if (o.status == CustomOfferStatus::Expired) != o.expired_at.is_some() {
                return Err(format!(
                    "offer {id} is {} but expired_at is {:?}",
                    o.status.as_str(),
                    o.expired_at
                ));
            }
            if let Some(r) = &o.request {
                if self.requests.get(r).and_then(|r| r.offer.as_ref()) != Some(id) {
                    return Err(format!("offer {id} approves request {r}, which does not point back"));
                }
            }
        }
        for (id, o) in &self.orders {
            if &o.id != id || !self.pros.contains_key(&o.pro) {
                return Err(format!("order {id} is filed wrongly or of an unknown pro"));
            }
            if let Some(p) = &o.placement {
                if (&p.pro, &p.client, &p.service) != (&o.pro, &o.client, &o.service) {
                    return Err(format!("order {id} disagrees with its placement"));
                }
            }
            if o.cancelled_at.is_some() && o.completed_at.is_some() {
                return Err(format!("order {id} is both cancelled and completed"));
            }
            if let OrderVia::CustomOffer { offer } = &o.via {
                if self.offers.get(offer).and_then(|f| f.order.as_ref()) != Some(id) {
                    return Err(format!("order {id} comes from offer {offer}, which does not point back"));
                }
            }
            stats.entry(&o.pro).or_default().tally_order(o);
            clients.entry(&o.pro).or_default().insert(o.client.clone());
        }
        if deadlines != self.deadlines {
            return Err(format!("deadlines {:?} should be {:?}", self.deadlines, deadlines));
        }
        let ended = self.ended_index();
        if ended != self.ended {
            return Err(format!("ended chains {:?} should be {ended:?}", self.ended));
        }
        for (id, p) in &self.pros {
            // R27: forgetting moves a record's share of the counters to `forgotten`;
            // the counters themselves never change.
            let mut want = stats.get(id).copied().unwrap_or_default();
            want.add(&p.forgotten);
            if p.stats != want {
                return Err(format!(
                    "pro {id} stats {:?} should be {want:?} (forgotten {:?})",
                    p.stats, p.forgotten
                ));
            }
            if p.stats.requests_responded > p.stats.requests_counted
                || p.stats.orders_cancelled > p.stats.orders
            {
                return Err(format!("pro {id} has a rate above 100 %"));
            }
            // An order ends once, cancelled or completed: together at most every order.
            if p.stats.orders_cancelled + p.stats.orders_completed > p.stats.orders {
                return Err(format!(
                    "pro {id} has {} cancelled and {} completed of {} orders",
                    p.stats.orders_cancelled, p.stats.orders_completed, p.stats.orders
                ));
            }
            // R25: the clients of the orders held, and those of forgotten orders.
            let held = clients.remove(id).unwrap_or_default();
            if !held.is_subset(&p.clients) {
                return Err(format!("pro {id} client index misses clients of its orders"));
            }
            if p.forgotten.orders == 0 && held != p.clients {
                return Err(format!("pro {id} client index is stale"));
            }
            if p.clients.len() as u64 > p.stats.orders {
                return Err(format!("pro {id} has more clients who ordered than orders"));
            }
            if open.remove(id).unwrap_or_default() != p.open_offers {
                return Err(format!("pro {id} open offer index is stale"));
            }
        }
        Ok(())
    }
}

fn placed_reply(o: &Order) -> OrderReply {
    OrderReply::OrderPlaced { order: o.id.clone(), pro: o.pro.clone(), via: o.via.clone() }
}

fn pending_reply(r: &OrderRequest) -> OrderReply {
    OrderReply::RequestPending {
        request: r.id.clone(),
        pro: r.placement.pro.clone(),
        respond_by: r.respond_by,
    }
}
