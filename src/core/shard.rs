//! One shard `(tenant, zone, category)`: its rotation ring, its pros, its open leads and
//! their offers, and every rule that decides what happens to them.
//!
//! ```text
//! decide(&self, now, &Command, &dyn Funds) -> Result<Decision { events, reply }, Reject>
//! apply(&mut self, &Event)                     // infallible; live and WAL replay
//! next_deadline() -> Option<Millis>            // the shell arms one timer for it
//! ```
//!
//! `decide` never changes the shard; it reads the shard, `now` and a read-only view of
//! the pros' money ([`Funds`]). Money *intents* (charge, hold, capture, release, refund,
//! budget spend) travel inside the events; the shell carries them out on the shared
//! ledger before the events are logged, and refuses the command if the ledger does
//! (another shard spent the same credits first). `apply` only updates this shard.
//!
//! Determinism: the same events applied in the same order give the same shard. No
//! hash-map iteration decides anything: the ring is a B-tree, deadlines are a B-tree,
//! offers are kept in the order they were made.

use super::deadlines::Deadlines;
use super::model::*;
use super::policy::{ChargeOn, DispatchMode, Policy};
use super::rank::{self, ProStats, WeightBreakdown};
use super::ring::{self, Ring, Selection, Verdict};
use crate::ids::{ClientId, LeadId, Millis, OptMillis, ProId, ShardKey};
use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};
use smol_str::SmolStr;
use std::collections::BTreeSet;
use std::sync::Arc;

/// Read-only view of the pros' money, supplied by the shell (the ledger).
pub trait Funds {
    /// Credits the pro can spend now.
    fn credits(&self, pro: &ProId) -> u64;
    /// What is left of an auto-buy config's weekly budget.
    fn budget(&self, pro: &ProId, config: &str) -> u64;
    /// Whether the tenant has a pro `pro` offering `category` in any zone (R2's
    /// competitor check looks past the shard's own zone). The default knows of no
    /// pro beyond the shard.
    fn offers_category(&self, _pro: &ProId, _category: &crate::ids::CategoryId) -> bool {
        false
    }
}

/// Funds for tests and tenants that never charge: everyone can pay anything.
pub struct Unlimited;

impl Funds for Unlimited {
    fn credits(&self, _: &ProId) -> u64 {
        u64::MAX
    }
    fn budget(&self, _: &ProId, _: &str) -> u64 {
        u64::MAX
    }
}

// ---------------------------------------------------------------------------------
// Commands, events, replies, rejections
// ---------------------------------------------------------------------------------

/// Who declines an offer (R17: "declined by the pro or the client").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Party {
    Pro,
    Client,
}

/// What a pro, the client or the platform does to one offer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum OfferAction {
    /// The pro opened the offer (R17 new -> opened).
    Open,
    /// The pro responds: pays the price and gets the contact (R6, R8, R9).
    Respond,
    /// R14 / R17.
    Decline {
        by: Party,
    },
    /// The client answered the pro (R9 chat capture; replied -> awaiting_response).
    ClientReplied,
    /// The pro answered the client (awaiting_response -> replied).
    ProReplied,
    /// The client viewed the pro's proposal (R12 guarantee).
    ClientViewed,
    Complete,
    /// Internal note of the pro (R18).
    AddNote {
        text: String,
    },
    /// The platform confirmed the pro's report that the contact is invalid (R23):
    /// refunds the charge.
    ConfirmInvalidContact,
}

impl OfferAction {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Respond => "respond",
            Self::Decline { .. } => "decline",
            Self::ClientReplied => "client_replied",
            Self::ProReplied => "pro_replied",
            Self::ClientViewed => "client_viewed",
            Self::Complete => "complete",
            Self::AddNote { .. } => "add_note",
            Self::ConfirmInvalidContact => "confirm_invalid_contact",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    UpsertPro {
        pro: Pro,
    },
    /// The pro leaves the tenant: its history here goes with it.
    RemovePro {
        pro: ProId,
    },
    /// The pro stops covering this shard's zone or category (a changed profile): its
    /// history here is kept for when it comes back (R14, R15).
    LeaveShard {
        pro: ProId,
    },
    SetAvailability {
        pro: ProId,
        availability: Availability,
    },
    PublishLead {
        /// Shared with the `LeadAccepted` event it becomes: no copy of the payload.
        lead: std::sync::Arc<Lead>,
    },
    Offer {
        lead: LeadId,
        pro: ProId,
        #[serde(flatten)]
        action: OfferAction,
    },
    /// Budget came back for these pros (weekly recharge, config resumed, refunded spends):
    /// retry the auto-buy leads they missed within the retry window (R22), in rotation
    /// order among them. One command per shard for every pro of one recharge, so the
    /// rotation, not the order of the recharges, decides who gets a seat.
    BudgetAvailable {
        pros: Vec<ProId>,
    },
    /// Emit whatever is due at `now` (head start ends, expiries, closes, refunds).
    Tick,
}

/// How money moves, decided by the core, executed on the ledger by the shell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Charge {
    /// Ledger operation id (idempotency key of the money movement). A `SmolStr`: the
    /// ids it is made of are short, so it usually lives inline, with no allocation.
    pub op: SmolStr,
    pub credits: u64,
    pub mode: ChargeMode,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "mode")]
pub enum ChargeMode {
    /// Charge credits now (hold + capture).
    Capture,
    /// Hold credits; capture or release later (R9 chat-only).
    Hold,
    /// Spend from an auto-buy config's weekly budget.
    Budget { config: SmolStr },
}

/// Why a charge is refunded (R12, R23).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefundReason {
    NotViewed,
    InvalidContact,
}

/// One offer made in a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub pro: ProId,
    pub kind: OfferKind,
    /// Auto-buy: the budget spend.
    pub charge: Option<Charge>,
}

/// Why a pro did not get a lead (explain, R28).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Skip {
    Paused,
    Vacation,
    OutsideSchedule,
    TooFar {
        distance_km: f64,
        radius_km: f64,
    },
    RefusesAttribute {
        attribute: String,
    },
    CannotPay {
        available: u64,
        price: u64,
    },
    NoAutoBuyConfig,
    AutoBuyPaused,
    BudgetExhausted {
        available: u64,
        price: u64,
    },
    PriceAboveMax {
        max_price: u64,
        price: u64,
    },
    /// The pro is the client (or the same business).
    IsClient,
    /// Already has this lead (e.g. as a direct target).
    AlreadyOffered,
    /// A direct target that does not cover this shard.
    NotInShard,
    /// Generic slots are all taken by direct targets (R6).
    NoGenericSlots,
    /// Not its turn: the rotation's group was full before reaching it.
    TurnNotReached,
    /// A direct target under auto-buy after as many targets as the lead has responder
    /// seats bought it (R6): it would have paid for a lead it could not answer.
    SeatsFull,
}

impl From<Unavailable> for Skip {
    fn from(u: Unavailable) -> Self {
        match u {
            Unavailable::Paused => Skip::Paused,
            Unavailable::Vacation => Skip::Vacation,
            Unavailable::OutsideSchedule => Skip::OutsideSchedule,
        }
    }
}

/// Quality gate reasons (R2) and duplicate protection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    PhoneUnverified,
    InsufficientDetails,
    Competitor,
    Duplicate,
}

impl RejectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::PhoneUnverified => "phone_unverified",
            Self::InsufficientDetails => "insufficient_details",
            Self::Competitor => "competitor",
            Self::Duplicate => "duplicate",
        }
    }
}

/// Facts, as logged in the WAL and replayed by [`Shard::apply`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    ProUpserted {
        pro: Arc<Pro>,
        at: Millis,
        /// A pro new to the shard takes the lowest slot left free. `false` in records
        /// of releases before slots were reused: such a pro took a new slot at the end,
        /// and the selections logged after it name that slot, so replay does the same.
        #[serde(default)]
        reuse_slot: bool,
    },
    ProRemoved {
        pro: ProId,
        at: Millis,
        /// Left this shard only (`Command::LeaveShard`), its history kept; `false`
        /// (and in records from before the field): removed for good.
        #[serde(default)]
        left: bool,
    },
    AvailabilitySet {
        pro: ProId,
        availability: Availability,
        at: Millis,
    },
    /// The pro's auto-buy budget came back (`BudgetAvailable`) while the rotation had
    /// it parked for a spent budget: back into the scan.
    BudgetReturned {
        pro: ProId,
        at: Millis,
    },
    LeadRejected {
        lead: LeadId,
        client: ClientId,
        fingerprint: u64,
        reason: RejectReason,
        at: Millis,
    },
    LeadAccepted {
        lead: Arc<Lead>,
        fingerprint: u64,
        price: u64,
        /// R11: why the lead costs what it costs (`None` with a flat price).
        #[serde(default)]
        price_components: Option<crate::pricing::PriceComponents>,
        at: Millis,
        /// Generic release time; `None` = no generic release (direct/contact jobs, or
        /// direct targets fill every responder slot).
        release_at: Option<Millis>,
        expires_at: Millis,
        /// R6: responder seats the direct targets took, those that received the lead
        /// at the publish (see [`LeadState::direct_seats`]). `None` in records written
        /// before 2026-12-07: every target named took one, as then decided.
        #[serde(default)]
        direct_seats: Option<u32>,
    },
    Offered {
        lead: LeadId,
        at: Millis,
        /// This is the generic release (clears the pending release).
        release: bool,
        grants: Vec<Grant>,
        /// Rotation slots taken and skipped (replay advances the ring exactly).
        rotation: Selection,
        /// Why scanned pros were skipped (explain): the first
        /// [`MAX_RECORDED_SKIPS`] of them.
        skipped: Vec<(ProId, Skip)>,
        /// Scanned and skipped pros past [`MAX_RECORDED_SKIPS`], counted only.
        #[serde(default)]
        skipped_more: u32,
        /// R22: pros past [`MAX_RECORDED_SKIPS`] skipped for a spent budget, not
        /// parked, and not short of budget already (see `ProSlot::budget_short_since`):
        /// each pro is listed once per spell without budget, so the list stays short.
        #[serde(default)]
        budget_short: Vec<ProId>,
    },
    OfferOpened {
        lead: LeadId,
        pro: ProId,
        at: Millis,
    },
    Responded {
        lead: LeadId,
        pro: ProId,
        at: Millis,
        charge: Option<Charge>,
    },
    Declined {
        lead: LeadId,
        pro: ProId,
        by: Party,
        at: Millis,
    },
    OfferExpired {
        lead: LeadId,
        pro: ProId,
        at: Millis,
    },
    ClientReplied {
        lead: LeadId,
        pro: ProId,
        at: Millis,
        capture: Option<Charge>,
    },
    ProReplied {
        lead: LeadId,
        pro: ProId,
        at: Millis,
    },
    ClientViewed {
        lead: LeadId,
        pro: ProId,
        at: Millis,
    },
    Completed {
        lead: LeadId,
        pro: ProId,
        at: Millis,
    },
    NoteAdded {
        lead: LeadId,
        pro: ProId,
        text: String,
        at: Millis,
    },
    Refunded {
        lead: LeadId,
        pro: ProId,
        charge: Charge,
        reason: RefundReason,
        at: Millis,
    },
    LeadClosed {
        lead: LeadId,
        at: Millis,
        releases: Vec<(ProId, Charge)>,
    },
    LeadForgotten {
        lead: LeadId,
    },
    /// A tick handled every deadline up to `upto`: they leave the deadline set, whether
    /// or not they still had something to do (an offer answered before its window ended,
    /// a proposal viewed before its guarantee ran out). Logged first in the tick's
    /// decision, so deadlines the tick's own events add are kept for the next tick.
    Ticked {
        upto: Millis,
    },
}

impl Event {
    /// Stable name of the event (stream frames, metrics label).
    pub fn name(&self) -> &'static str {
        match self {
            Event::ProUpserted { .. } => "pro_upserted",
            Event::ProRemoved { .. } => "pro_removed",
            Event::AvailabilitySet { .. } => "availability_set",
            Event::BudgetReturned { .. } => "budget_returned",
            Event::LeadRejected { .. } => "lead_rejected",
            Event::LeadAccepted { .. } => "lead_accepted",
            Event::Offered { .. } => "offered",
            Event::OfferOpened { .. } => "offer_opened",
            Event::Responded { .. } => "responded",
            Event::Declined { .. } => "declined",
            Event::OfferExpired { .. } => "offer_expired",
            Event::ClientReplied { .. } => "client_replied",
            Event::ProReplied { .. } => "pro_replied",
            Event::ClientViewed { .. } => "client_viewed",
            Event::Completed { .. } => "completed",
            Event::NoteAdded { .. } => "note_added",
            Event::Refunded { .. } => "refunded",
            Event::LeadClosed { .. } => "lead_closed",
            Event::LeadForgotten { .. } => "lead_forgotten",
            Event::Ticked { .. } => "ticked",
        }
    }

    /// The time the event happened at (a tick: the time it handled deadlines up to);
    /// `None` for a forgotten lead, which carries none.
    pub fn at(&self) -> Option<Millis> {
        match self {
            Event::ProUpserted { at, .. }
            | Event::ProRemoved { at, .. }
            | Event::AvailabilitySet { at, .. }
            | Event::BudgetReturned { at, .. }
            | Event::LeadRejected { at, .. }
            | Event::LeadAccepted { at, .. }
            | Event::Offered { at, .. }
            | Event::OfferOpened { at, .. }
            | Event::Responded { at, .. }
            | Event::Declined { at, .. }
            | Event::OfferExpired { at, .. }
            | Event::ClientReplied { at, .. }
            | Event::ProReplied { at, .. }
            | Event::ClientViewed { at, .. }
            | Event::Completed { at, .. }
            | Event::NoteAdded { at, .. }
            | Event::Refunded { at, .. }
            | Event::LeadClosed { at, .. } => Some(*at),
            Event::Ticked { upto } => Some(*upto),
            Event::LeadForgotten { .. } => None,
        }
    }
}

/// A refusal: nothing changed. `code()` is the stable wire error code.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
pub enum Reject {
    #[error(transparent)]
    InvalidField(#[from] FieldError),
    #[error("unknown pro {0}")]
    UnknownPro(ProId),
    #[error("unknown lead {0}")]
    UnknownLead(LeadId),
    #[error("pro {pro} has no offer for lead {lead}")]
    NotOffered { lead: LeadId, pro: ProId },
    #[error("lead {0} already has all the responders it may have")]
    LeadFull(LeadId),
    #[error("lead {0} has expired")]
    LeadExpired(LeadId),
    #[error("the offer of lead {lead} to pro {pro} has expired")]
    OfferExpired { lead: LeadId, pro: ProId },
    #[error("not enough credits: {available} available, {needed} needed")]
    InsufficientCredits { available: u64, needed: u64 },
    #[error("cannot {action} an offer that is {from}")]
    IllegalTransition { from: &'static str, action: &'static str },
    #[error("lead id {0} was already used with a different payload")]
    IdempotencyConflict(LeadId),
}

impl Reject {
    pub fn code(&self) -> &'static str {
        match self {
            Reject::InvalidField(_) => "invalid_field",
            Reject::UnknownPro(_) => "unknown_pro",
            Reject::UnknownLead(_) => "unknown_lead",
            Reject::NotOffered { .. } => "not_offered",
            Reject::LeadFull(_) => "lead_full",
            Reject::LeadExpired(_) => "lead_expired",
            Reject::OfferExpired { .. } => "offer_expired",
            Reject::InsufficientCredits { .. } => "insufficient_credits",
            Reject::IllegalTransition { .. } => "illegal_transition",
            Reject::IdempotencyConflict(_) => "idempotency_conflict",
        }
    }
}

/// What a publish answered; republishing the same lead answers the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeadOutcome {
    pub lead: LeadId,
    #[serde(flatten)]
    pub status: LeadStatus,
    pub price: u64,
    pub offers: Vec<(ProId, OfferKind)>,
    pub release_at: Option<Millis>,
    pub expires_at: Option<Millis>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", content = "reason", rename_all = "snake_case")]
pub enum LeadStatus {
    Accepted,
    Rejected(RejectReason),
}

/// One offer as a pro (or the platform) sees it. Client PII only after responding (R8).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OfferView {
    pub lead: LeadId,
    pub pro: ProId,
    pub kind: OfferKind,
    pub status: OfferStatus,
    pub price: u64,
    pub offered_at: Millis,
    pub respond_by: Option<Millis>,
    pub contact: Option<RevealedContact>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Lead(LeadOutcome),
    Offer(OfferView),
    Done,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub events: Vec<Event>,
    pub reply: Reply,
}

// ---------------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProSlot {
    pub pro: Arc<Pro>,
    pub stats: ProStats,
    pub weight: WeightBreakdown,
    /// R22: since when a lead's scan has skipped this pro for a spent auto-buy budget
    /// without it receiving a lead since (set by the first such skip, cleared by a
    /// grant). A lead left short after that time scanned it and missed it, so it is
    /// retried when the budget comes back, like a pro parked for its budget; this is
    /// what covers the pros a lead's bounded retry list leaves out.
    #[serde(default)]
    budget_short_since: OptMillis,
    /// The pro's schedule zone, parsed once when the pro or its availability changes
    /// (not stored: [`Shard::restore`] fills it); parsing it per candidate was a tenth
    /// of a decision.
    #[serde(skip)]
    schedule_tz: Option<chrono_tz::Tz>,
}

impl ProSlot {
    fn new(pro: Arc<Pro>, stats: ProStats, weight: WeightBreakdown) -> Self {
        let schedule_tz = pro.availability.schedule_tz();
        Self { pro, stats, weight, budget_short_since: OptMillis::NONE, schedule_tz }
    }

    /// R4/R16 availability of the pro at `now`.
    pub fn available(&self, now: Millis) -> Result<(), Unavailable> {
        self.pro.availability.check_in(now, self.schedule_tz)
    }
}

/// One offer of a lead to a pro. 64 bytes: what only an answered or annotated offer
/// has (response time, guarantee deadline, notes) is boxed in [`OfferReply`], allocated
/// when the pro responds, writes a note or buys the lead (auto-buy, with a guarantee);
/// most offers never are. Serialised as the flat record [`OfferStateWire`], so
/// snapshots are the same as with inline fields.
#[derive(Debug, Clone, PartialEq)]
pub struct OfferState {
    pub pro: ProId,
    pub kind: OfferKind,
    pub status: OfferStatus,
    pub captured: bool,
    pub viewed: bool,
    pub refunded: bool,
    pub offered_at: Millis,
    pub respond_by: OptMillis,
    /// Money taken for this offer and not refunded/released. Boxed: most offers are
    /// never charged, and a `None` then takes 8 bytes instead of 56 in every offer.
    pub charge: Option<Box<Charge>>,
    reply: Option<Box<OfferReply>>,
}

/// The part of an offer that exists once the pro responded, wrote a note or bought it.
#[derive(Debug, Clone, Default, PartialEq)]
struct OfferReply {
    responded_at: OptMillis,
    /// When this offer's guarantee deadline (R12) is due, so that forgetting the lead
    /// removes it by key (and is not done before it: `LeadClosed`). Set when the offer
    /// is charged: by the response that charged it, or, for an auto-buy offer, by its
    /// purchase (`Offered`), under the guarantee window of the policy in force then.
    /// `None` = no guarantee deadline (or a snapshot from before this field: forgetting
    /// then scans the deadlines).
    guarantee_at: OptMillis,
    notes: Vec<String>,
}

impl OfferState {
    fn new(pro: ProId, kind: OfferKind, offered_at: Millis, respond_by: OptMillis) -> Self {
        Self {
            pro,
            kind,
            status: OfferStatus::New,
            captured: false,
            viewed: false,
            refunded: false,
            offered_at,
            respond_by,
            charge: None,
            reply: None,
        }
    }

    pub fn responded_at(&self) -> Option<Millis> {
        self.reply.as_ref().and_then(|r| r.responded_at.get())
    }

    pub fn guarantee_at(&self) -> Option<Millis> {
        self.reply.as_ref().and_then(|r| r.guarantee_at.get())
    }

    pub fn notes(&self) -> &[String] {
        self.reply.as_ref().map_or(&[], |r| r.notes.as_slice())
    }

    fn reply_mut(&mut self) -> &mut OfferReply {
        self.reply.get_or_insert_with(Box::default)
    }
}

/// [`OfferState`] as snapshots hold it: every field inline, in this order.
#[derive(Serialize, Deserialize)]
#[serde(rename = "OfferState")]
struct OfferStateWire<P, C, N> {
    pro: P,
    kind: OfferKind,
    status: OfferStatus,
    offered_at: Millis,
    respond_by: OptMillis,
    responded_at: OptMillis,
    charge: C,
    captured: bool,
    viewed: bool,
    refunded: bool,
    notes: N,
    #[serde(default)]
    guarantee_at: OptMillis,
}

impl Serialize for OfferState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        OfferStateWire {
            pro: &self.pro,
            kind: self.kind,
            status: self.status,
            offered_at: self.offered_at,
            respond_by: self.respond_by,
            responded_at: self.responded_at().into(),
            charge: &self.charge,
            captured: self.captured,
            viewed: self.viewed,
            refunded: self.refunded,
            notes: self.notes(),
            guarantee_at: self.guarantee_at().into(),
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for OfferState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = OfferStateWire::<ProId, Option<Box<Charge>>, Vec<String>>::deserialize(d)?;
        let reply =
            (w.responded_at.is_some() || w.guarantee_at.is_some() || !w.notes.is_empty()).then(|| {
                Box::new(OfferReply {
                    responded_at: w.responded_at,
                    guarantee_at: w.guarantee_at,
                    notes: w.notes,
                })
            });
        Ok(Self {
            pro: w.pro,
            kind: w.kind,
            status: w.status,
            captured: w.captured,
            viewed: w.viewed,
            refunded: w.refunded,
            offered_at: w.offered_at,
            respond_by: w.respond_by,
            charge: w.charge,
            reply,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeadState {
    pub lead: Arc<Lead>,
    pub fingerprint: u64,
    pub price: u64,
    pub accepted_at: Millis,
    pub release_at: OptMillis,
    pub expires_at: Millis,
    pub closed_at: OptMillis,
    pub offers: Vec<OfferState>,
    pub responders: u32,
    pub generic_responders: u32,
    /// Explain: why pros were skipped in this lead's releases, at most
    /// [`MAX_RECORDED_SKIPS`]; the rest are counted in `skipped_more`.
    pub skipped: Vec<(ProId, Skip)>,
    #[serde(default)]
    pub skipped_more: u64,
    /// When the generic release ran (explain tells parked pros' reasons as of then).
    #[serde(default)]
    pub released_at: OptMillis,
    /// R22: auto-buy pros skipped for lack of budget, retried until `retry_until`.
    pub budget_waitlist: Vec<ProId>,
    /// R1: what the publish answered, kept so that a republish answers the same even
    /// after the release: the release time it announced, and how many of `offers` (a
    /// prefix: nothing is offered before the publish) it made.
    pub published_release_at: OptMillis,
    pub published_offers: u32,
    /// R11: the price's inputs and intermediates (`None` with a flat price). Boxed:
    /// 104 bytes inline in every lead, flat-priced ones included.
    pub price_components: Option<Box<crate::pricing::PriceComponents>>,
    /// When the lead is forgotten (set when it closes), so that its `Forget` deadline
    /// is removed by key.
    #[serde(default)]
    pub forget_at: OptMillis,
    /// This lead's number in the shard (orders its deadlines, see [`Deadline::seq`]).
    #[serde(default)]
    pub seq: u64,
    /// R6: responder seats held for the direct targets: those that received the lead
    /// at its publish. A target that did not (not in the shard, unavailable, or under
    /// auto-buy unable to buy) holds none: its seat goes to the generic release
    /// (2 targets of which one is on vacation -> 4 generic seats of 5). `None` for
    /// leads decided before 2026-12-07: every target named holds one.
    #[serde(default)]
    pub direct_seats: Option<u32>,
}

impl LeadState {
    fn offer(&self, pro: &ProId) -> Option<&OfferState> {
        self.offers.iter().find(|o| &o.pro == pro)
    }
    fn offer_mut(&mut self, pro: &ProId) -> Option<&mut OfferState> {
        self.offers.iter_mut().find(|o| &o.pro == pro)
    }
    fn generic_cap(&self, policy: &Policy) -> u32 {
        let direct = self.direct_seats.unwrap_or(self.lead.direct.len() as u32);
        policy.max_responders.saturating_sub(direct)
    }

    /// R6 with `responders` responses of which `generic` took a generic seat: whether
    /// every seat is taken, and whether every generic seat is.
    fn seats_full(&self, policy: &Policy, responders: u32, generic: u32) -> (bool, bool) {
        (responders >= policy.max_responders, generic >= self.generic_cap(policy))
    }
    fn is_open(&self) -> bool {
        self.closed_at.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct RejectedLead {
    fingerprint: u64,
    reason: RejectReason,
    #[serde(default)]
    forget_at: OptMillis,
    #[serde(default)]
    seq: u64,
}

/// Something the shard must do at a time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Due {
    Release,
    /// One pro's response window (R15). Only in snapshots of older releases:
    /// [`Shard::restore`] turns these into [`Due::ExpireOffers`].
    ExpireOffer(ProId),
    /// The response window (R15) of every offer of the lead whose `respond_by` is the
    /// deadline's time: one deadline per release rather than one per offer (the offers
    /// of a release share their window), a fifth of the entries for 5 offers per lead.
    /// Expired in pro-id order, the order the per-offer deadlines had.
    ExpireOffers,
    Guarantee(ProId),
    Close,
    Forget,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Deadline {
    pub at: Millis,
    /// The lead's number in this shard (unique per lead): deadlines at the same
    /// millisecond order by an integer, not by comparing lead-id strings.
    #[serde(default)]
    pub seq: u64,
    pub lead: LeadId,
    pub due: Due,
}

/// Most skip reasons recorded per release and per lead for `explain` (R28). A scan
/// skips few pros (parked ones are not scanned), but a shard where most pros are too far
/// from a lead could skip thousands; past this bound they are counted, not listed, so
/// the event and the lead state stay small. The R22 retry list of a lead (pros skipped
/// for a spent budget) is filled from these records, so it holds at most this many
/// pros too; a pro past the bound is still retried: one parked for its spent budget
/// since before the lead (the ring keeps since when: `Ring::budget_parked_since`), and
/// one skipped for its budget without being parked (a budget below this lead's price
/// but not below the shard's cheapest) since before it (`ProSlot::budget_short_since`,
/// set from the event's `budget_short`).
pub const MAX_RECORDED_SKIPS: usize = 64;

/// Most pros one release offers a lead to, `offer_fanout = "all"` included (a larger
/// number is refused by the policy's validation). No marketplace shows one job to more
/// pros at once, and the bound keeps a release's event, logged whole in one record,
/// about a megabyte at most, far below the log's 16 MiB record limit: a shard of
/// 200,000 pros under "all" would otherwise make an event the log refuses after the
/// shard had changed. When more pros than this are eligible, the release takes the
/// first this-many in rotation order and, as for a number, their turns are used: the
/// next lead starts where this one stopped, so every pro gets its share in turn.
pub const MAX_OFFERS_PER_RELEASE: usize = 10_000;

/// Why a publish of `lead` at `now` under `policy` is refused whatever the shard holds
/// (after a republish of a lead it remembers, which answers the original result), if it
/// is: the lead's own fields, a creation time far ahead of the clock, a lifetime already
/// over. Checked before the quality gate, so that such a lead leaves no trace (not even
/// a logged rejection), and by the engine before a publish creates the lead's shard: a
/// refused publish must not create one (it would count against
/// `max_shards_per_tenant` and exist in memory only, not in the log).
pub fn publish_refusal(policy: &Policy, now: Millis, lead: &Lead) -> Option<Reject> {
    match lead.validate() {
        Err(e) => Some(e.into()),
        Ok(()) => timing_refusal(policy, now, lead),
    }
}

/// [`publish_refusal`] of a lead already validated.
fn timing_refusal(policy: &Policy, now: Millis, lead: &Lead) -> Option<Reject> {
    // A creation time far ahead of the daemon's clock is a client's mistake (seconds or
    // microseconds where milliseconds are meant, a local time sent as UTC), and the
    // lead's lifetime, head start and duplicate window all count from it: such a lead
    // would never close, hold its chat-only credits for ever and refuse the client's
    // next leads as duplicates. Refused, naming the field; a platform clock a few
    // minutes ahead is within the margin.
    if lead.created_at > now.saturating_add(MAX_CREATED_AHEAD_MS) {
        return Some(
            field_err(
                "lead.created_at",
                format!(
                    "{} is {} s ahead of the daemon's clock ({now}); at most {} s ahead is accepted \
                     (a Unix time in milliseconds is expected)",
                    lead.created_at,
                    (lead.created_at - now) / 1000,
                    MAX_CREATED_AHEAD_MS / 1000
                ),
            )
            .into(),
        );
    }
    if lead.created_at.saturating_add(policy.lead_ttl) <= now {
        return Some(Reject::LeadExpired(lead.id.clone()));
    }
    None
}

/// Whether `pro` is paused (or on vacation, or has an auto-buy config paused) until
/// past any time accepted on the wire: only profiles logged before times were bounded
/// (a pause "for ever" as `i64::MAX`). Releases before then parked such a pro as if its
/// budget were spent (the end read as [`ring::UNTIL_BUDGET`]); the parks they logged or
/// snapshotted are dropped as shortages when the pause is lifted, so no R22 retry buys
/// it the leads released while it was paused. (A second config of the pro that was
/// really short meanwhile loses its retries with it.)
fn paused_past_any_time(pro: &Pro) -> bool {
    let past = |t: Millis| t > crate::core::model::MAX_TIME_MS;
    let a = &pro.availability;
    a.paused_until.is_some_and(past)
        || a.vacation.is_some_and(|(_, to)| past(to))
        || pro.autobuy.iter().any(|c| c.paused_until.is_some_and(past))
}

/// How far ahead of the daemon's clock a lead's `created_at` may be: a platform's clock
/// a little ahead is accepted (its lead then lives that much longer); more is refused.
pub const MAX_CREATED_AHEAD_MS: Millis = 10 * crate::ids::MINUTE_MS;

/// Most notes on one offer, and longest note.
const MAX_NOTES: usize = 100;
const MAX_NOTE_LEN: usize = 4096;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shard {
    pub key: ShardKey,
    #[serde(skip, default = "placeholder_policy")]
    policy: Arc<Policy>,
    pros: Vec<Option<ProSlot>>,
    slots: FxHashMap<ProId, u32>,
    ring: Ring,
    /// Behind a pointer: a hash table keeps free buckets (an eighth to more than half
    /// of them, depending on where it is between two doublings), and a free bucket of
    /// a pointer costs 8 bytes where an inline state cost the whole state. An `Arc`
    /// (16 bytes more than a `Box`) so that copying a shard for a snapshot copies
    /// pointers, and a lead changed while a snapshot holds it is copied then, alone
    /// (`Arc::make_mut`).
    leads: FxHashMap<LeadId, Arc<LeadState>>,
    rejected: FxHashMap<LeadId, RejectedLead>,
    deadlines: Deadlines,
    /// Duplicate protection: the newest accepted lead of each client in this shard.
    last_by_client: FxHashMap<ClientId, (Millis, LeadId)>,
    /// R11: average proposals per lead (thousandths) learned online from closed leads;
    /// `None` until the first close (the policy's figure applies). Only this figure is
    /// learned: the category's job value and conversion rate are always the policy's in
    /// force, so a reload that changes them changes the next prices.
    ///
    /// Serialised where, and under the name, snapshots of older releases kept a whole
    /// copy of the category's figures (`CategoryStats`, frozen at the first close);
    /// such a snapshot loads with the proposals figure of that copy
    /// ([`learned_proposals_compat`]).
    #[serde(default, rename = "learned", deserialize_with = "learned_proposals_compat")]
    learned_proposals_milli: Option<u64>,
    /// Numbers leads (accepted and rejected) in apply order; deterministic on replay.
    #[serde(default)]
    next_seq: u64,
    /// R14, R15, R29: the history of pros that left this shard, given back if they
    /// come back, so that leaving a zone or category for a while does not wipe the
    /// declines and expiries it lowered their ranking for. Only pros with some
    /// history are kept. (Last, and defaulted: older snapshots decode.)
    #[serde(default)]
    departed: FxHashMap<ProId, ProStats>,
    /// The slots no pro holds (`None` in `pros`), for the next pro that joins: without
    /// reuse every leave-and-return (a zone or category change back and forth, a pro
    /// removed and added again) left a dead slot in `pros` and in the ring for the
    /// shard's lifetime, and in every snapshot.
    #[serde(skip)]
    free: FreeSlots,
}

/// The slots no pro holds, lowest first. Derived from `pros` (built on first use,
/// then kept in step by joins and removals), so not stored and not compared: a
/// shard restored from a snapshot or replayed from the log reuses the same slots as
/// the one that wrote them, which keeps every logged [`Selection`] naming the same
/// pros.
#[derive(Debug, Clone, Default)]
struct FreeSlots(Option<std::collections::BTreeSet<u32>>);

impl PartialEq for FreeSlots {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl FreeSlots {
    /// The lowest slot no pro holds, taken, if any.
    fn take_lowest(&mut self, pros: &[Option<ProSlot>]) -> Option<u32> {
        let set = self.0.get_or_insert_with(|| {
            pros.iter().enumerate().filter(|(_, p)| p.is_none()).map(|(i, _)| i as u32).collect()
        });
        set.pop_first()
    }

    /// `slot`'s pro left (its entry in `pros` is `None` now).
    fn freed(&mut self, slot: u32) {
        if let Some(set) = &mut self.0 {
            set.insert(slot);
        }
    }
}

/// Reads [`Shard::learned_proposals_milli`] as this release writes it (a number) or as
/// older ones did (the whole `CategoryStats` of the category, of which only the
/// proposals figure was learned).
fn learned_proposals_compat<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Learned {
        Proposals(u64),
        Stats(crate::pricing::CategoryStats),
    }
    Ok(Option::<Learned>::deserialize(d)?.map(|l| match l {
        Learned::Proposals(p) => p,
        Learned::Stats(s) => s.avg_proposals_milli,
    }))
}

fn placeholder_policy() -> Arc<Policy> {
    Arc::new(Policy::shared_default("placeholder"))
}

impl Shard {
    pub fn new(key: ShardKey, policy: Arc<Policy>) -> Self {
        Self {
            key,
            policy,
            pros: Vec::new(),
            slots: FxHashMap::default(),
            ring: Ring::new(),
            leads: FxHashMap::default(),
            rejected: FxHashMap::default(),
            deadlines: Deadlines::new(),
            last_by_client: FxHashMap::default(),
            learned_proposals_milli: None,
            next_seq: 0,
            departed: FxHashMap::default(),
            free: FreeSlots::default(),
        }
    }

    /// The pros whose open offers `ev` makes inactive when applied (computed before it
    /// is): the others of a lead a response fills (R6), every open one of a lead that
    /// closes (R7). The stream tells each of them (`offer_status` `inactive`).
    pub fn inactivated_by(&self, ev: &Event) -> Vec<ProId> {
        fn open(st: &LeadState) -> impl Iterator<Item = &OfferState> {
            st.offers.iter().filter(|o| o.status.is_open())
        }
        match ev {
            Event::Responded { lead, pro, .. } => {
                let Some(st) = self.leads.get(lead) else { return Vec::new() };
                let Some(o) = st.offer(pro) else { return Vec::new() };
                let generic = st.generic_responders + u32::from(o.kind.takes_a_generic_seat());
                let (all_full, generic_full) = st.seats_full(&self.policy, st.responders + 1, generic);
                open(st)
                    .filter(|x| {
                        &x.pro != pro && (all_full || (generic_full && x.kind.takes_a_generic_seat()))
                    })
                    .map(|x| x.pro.clone())
                    .collect()
            }
            Event::LeadClosed { lead, .. } => {
                self.leads.get(lead).map_or_else(Vec::new, |st| open(st).map(|o| o.pro.clone()).collect())
            }
            _ => Vec::new(),
        }
    }

    /// After deserialising a snapshot: attach the policy and rebuild derived indexes.
    pub fn restore(&mut self, policy: Arc<Policy>) {
        self.policy = policy;
        self.ring.rebuild_index();
        for ps in self.pros.iter_mut().flatten() {
            ps.schedule_tz = ps.pro.availability.schedule_tz();
        }
        // Older releases kept one response-window deadline per offer: one per lead and
        // time now, which expires the same offers (those whose `respond_by` it is).
        let per_offer: Vec<Deadline> =
            self.deadlines.iter().filter(|d| matches!(d.due, Due::ExpireOffer(_))).collect();
        for d in per_offer {
            self.deadlines.remove(&d);
            self.deadlines.insert(Deadline { due: Due::ExpireOffers, ..d });
        }
    }

    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// Policies can change at run time (reload); weights are recomputed.
    pub fn set_policy(&mut self, policy: Arc<Policy>) {
        self.policy = policy;
        // What parks a pro depends on the policy (charging at dispatch): re-examine all,
        // keeping since when each one parked for its budget was short of it (R22).
        for slot in self.ring.parked_for_budget().collect::<Vec<_>>() {
            if let Some(ps) = self.pros.get(slot as usize).and_then(|p| p.as_ref()) {
                let since = self.short_of_budget_since(slot, ps.budget_short_since);
                if let Some(ps) = self.pros[slot as usize].as_mut() {
                    ps.budget_short_since = since;
                }
            }
        }
        self.ring.unpark_all(self.policy.max_catch_up_turns);
        for slot in 0..self.pros.len() {
            self.reweigh(slot as u32);
        }
    }

    /// Since when the pro in `slot` has been short of budget: the earlier of `marked`
    /// (its `budget_short_since`) and the start of its park for a spent budget, which
    /// an unpark forgets.
    fn short_of_budget_since(&self, slot: u32, marked: OptMillis) -> OptMillis {
        match (marked.get(), self.ring.budget_parked_since(slot)) {
            (Some(a), Some(b)) => OptMillis::some(a.min(b)),
            (a, b) => a.or(b).map_or(OptMillis::NONE, OptMillis::some),
        }
    }

    /// Pros parked until their auto-buy budget comes back (counted in `parked_pros`).
    pub fn budget_parked_pros(&self) -> usize {
        self.ring.parked_for_budget().count()
    }

    /// Pros parked out of the rotation's scan (unavailable for every lead for a while).
    pub fn parked_pros(&self) -> usize {
        self.ring.parked_len()
    }

    pub fn pro_count(&self) -> usize {
        self.slots.len()
    }

    pub fn open_leads(&self) -> usize {
        self.leads.values().filter(|l| l.is_open()).count()
    }

    /// Every lead the shard holds: open, or closed and not forgotten yet.
    pub fn lead_ids(&self) -> impl Iterator<Item = &LeadId> {
        self.leads.keys()
    }

    /// Every lead id the shard answers for (R1): its leads, and the ids its quality
    /// gate refused, until each is forgotten. What the lead index names this shard for.
    pub fn remembered_ids(&self) -> (impl Iterator<Item = &LeadId>, impl Iterator<Item = &LeadId>) {
        (self.leads.keys(), self.rejected.keys())
    }

    pub fn lead(&self, id: &LeadId) -> Option<&LeadState> {
        self.leads.get(id).map(|st| &**st)
    }

    /// Whether `pro` left this shard with a history kept for its return (R14/R15).
    /// The pros that left this shard keeping their history here.
    pub fn departed_pros(&self) -> impl Iterator<Item = &ProId> {
        self.departed.keys()
    }

    pub fn has_departed(&self, pro: &ProId) -> bool {
        self.departed.contains_key(pro)
    }

    /// Whether this shard remembers lead id `id`: a lead it holds, or one its quality
    /// gate refused whose publish is not forgotten yet (R1: repeats of either are
    /// answered here, so the id is taken).
    pub fn remembers(&self, id: &LeadId) -> bool {
        self.leads.contains_key(id) || self.rejected.contains_key(id)
    }

    pub fn pro(&self, id: &ProId) -> Option<&ProSlot> {
        self.slots.get(id).and_then(|&s| self.pros[s as usize].as_ref())
    }

    pub fn next_deadline(&self) -> Option<Millis> {
        self.deadlines.first_at()
    }

    fn slot_pro(&self, slot: u32) -> &ProSlot {
        self.pros[slot as usize].as_ref().expect("ring slots always hold a pro: remove() clears both")
    }

    // -----------------------------------------------------------------------------
    // decide
    // -----------------------------------------------------------------------------

    pub fn decide(&self, now: Millis, cmd: &Command, funds: &dyn Funds) -> Result<Decision, Reject> {
        match cmd {
            Command::UpsertPro { pro } => self.decide_upsert(now, pro),
            Command::RemovePro { pro } | Command::LeaveShard { pro } => {
                // A pro removed for good also takes the history it left here when it
                // stopped covering the shard (R14/R15 stats kept for a rejoin).
                let removing_history =
                    matches!(cmd, Command::RemovePro { .. }) && self.departed.contains_key(pro);
                if !self.slots.contains_key(pro) && !removing_history {
                    return Err(Reject::UnknownPro(pro.clone()));
                }
                let left = matches!(cmd, Command::LeaveShard { .. });
                Ok(done(vec![Event::ProRemoved { pro: pro.clone(), at: now, left }]))
            }
            Command::SetAvailability { pro, availability } => {
                if !self.slots.contains_key(pro) {
                    return Err(Reject::UnknownPro(pro.clone()));
                }
                availability.validate("availability")?;
                Ok(done(vec![Event::AvailabilitySet {
                    pro: pro.clone(),
                    availability: availability.clone(),
                    at: now,
                }]))
            }
            Command::PublishLead { lead } => self.decide_publish(now, lead, funds),
            Command::Offer { lead, pro, action } => self.decide_offer(now, lead, pro, action, funds),
            Command::BudgetAvailable { pros } => Ok(self.decide_budget_retry(now, pros, funds)),
            Command::Tick => Ok(self.decide_tick(now, funds)),
        }
    }

    fn decide_upsert(&self, now: Millis, pro: &Pro) -> Result<Decision, Reject> {
        pro.validate()?;
        if !pro.zones.contains(&self.key.zone) || !pro.categories.contains(&self.key.category) {
            return Err(
                field_err("pro.zones", format!("pro {} does not cover shard {}", pro.id, self.key)).into()
            );
        }
        Ok(done(vec![Event::ProUpserted { pro: Arc::new(pro.clone()), at: now, reuse_slot: true }]))
    }

    fn decide_publish(&self, now: Millis, lead: &Arc<Lead>, funds: &dyn Funds) -> Result<Decision, Reject> {
        lead.validate()?;
        if lead.zone != self.key.zone || lead.category != self.key.category {
            return Err(
                field_err("lead.zone", format!("lead belongs to another shard than {}", self.key)).into()
            );
        }
        let fp = lead.fingerprint();
        // R1: idempotent republish.
        if let Some(st) = self.leads.get(&lead.id) {
            if !lead.has_fingerprint(st.fingerprint, fp) {
                return Err(Reject::IdempotencyConflict(lead.id.clone()));
            }
            return Ok(Decision { events: vec![], reply: Reply::Lead(self.outcome(st)) });
        }
        if let Some(r) = self.rejected.get(&lead.id) {
            if !lead.has_fingerprint(r.fingerprint, fp) {
                return Err(Reject::IdempotencyConflict(lead.id.clone()));
            }
            return Ok(Decision { events: vec![], reply: Reply::Lead(rejected_outcome(&lead.id, r.reason)) });
        }
        if let Some(refusal) = timing_refusal(&self.policy, now, lead) {
            return Err(refusal);
        }
        // R2: quality gate, then duplicate protection, before anyone is charged.
        if let Some(reason) = self.gate(lead, funds) {
            let ev = Event::LeadRejected {
                lead: lead.id.clone(),
                client: lead.client.id.clone(),
                fingerprint: fp,
                reason,
                at: now,
            };
            return Ok(Decision { events: vec![ev], reply: Reply::Lead(rejected_outcome(&lead.id, reason)) });
        }
        let p = &self.policy;
        let (price, price_components) = self.price(lead);
        let expires_at = lead.created_at.saturating_add(p.lead_ttl);
        let arc = Arc::clone(lead);
        // Accepted, then at most a direct and a generic release: sized once (an event is
        // a few hundred bytes, and growing the vector copied them).
        let mut events = Vec::with_capacity(3);
        events.push(Event::LeadAccepted {
            lead: arc.clone(),
            fingerprint: fp,
            price,
            price_components,
            at: now,
            // Set below, once the direct targets are served.
            release_at: None,
            expires_at,
            direct_seats: Some(0),
        });
        // R5: direct targets at once.
        let mut offers = Vec::new();
        if !lead.direct.is_empty() {
            let kind = if lead.kind == JobKind::Contact { OfferKind::Contact } else { OfferKind::Direct };
            // Under auto-buy (charged at dispatch) a direct target buys the lead as a
            // buyer does, from a covering config's budget, or does not get it (the reason
            // is recorded): the client chose it, but the budget is what pays for every
            // lead of such a tenant, and a target never paying would get leads others pay
            // for. A `contact` job is a message, not a lead: never charged.
            let buying = (p.charge_on == ChargeOn::Dispatch && kind == OfferKind::Direct)
                .then(|| provisional(arc.clone(), fp, price, far_components(&events[0]), now, expires_at));
            let mut grants = Vec::new();
            let mut skipped = Vec::new();
            // R4 for a target: available now, and the lead within its preferences (a
            // pro that refuses "dropshipper" leads is not sent one because a client
            // picked it). Its radius does not apply (the client chose this pro, where it
            // is), nor, where responses are charged, its credits (it pays when it
            // responds, and may top up first).
            let refused = |slot: u32| {
                let pro = &self.slot_pro(slot).pro;
                lead.attributes.iter().find(|a| pro.refuses.contains(a)).cloned()
            };
            for target in &lead.direct {
                match self.slots.get(target) {
                    None => skipped.push((target.clone(), Skip::NotInShard)),
                    Some(&slot) => match (self.slot_pro(slot).available(now), &buying) {
                        (Err(u), _) => skipped.push((target.clone(), u.into())),
                        (Ok(()), _) if refused(slot).is_some() => {
                            let attribute = refused(slot).unwrap_or_default();
                            skipped.push((target.clone(), Skip::RefusesAttribute { attribute }))
                        }
                        (Ok(()), None) => grants.push(Grant { pro: target.clone(), kind, charge: None }),
                        // R6: no more buyers than the lead's responder seats, taken by
                        // the targets in the order the client listed them.
                        (Ok(()), Some(_)) if grants.len() >= p.max_responders as usize => {
                            skipped.push((target.clone(), Skip::SeatsFull))
                        }
                        (Ok(()), Some(st)) => match self.purchase(now, st, &self.slot_pro(slot).pro, funds) {
                            Ok(c) => grants.push(Grant { pro: target.clone(), kind, charge: Some(c) }),
                            Err(skip) => skipped.push((target.clone(), skip)),
                        },
                    },
                }
            }
            offers.extend(grants.iter().map(|g| (g.pro.clone(), g.kind)));
            events.push(Event::Offered {
                lead: lead.id.clone(),
                at: now,
                release: false,
                grants,
                rotation: Selection::default(),
                skipped,
                skipped_more: 0,
                budget_short: Vec::new(),
            });
        }
        // R5/R6: the generic release, with the seats the direct targets did not take.
        let release_at = self.plan_release(now, &mut events, &[], funds);
        if let Some(Event::Offered { grants, release: true, .. }) = events.last() {
            offers.extend(grants.iter().map(|g| (g.pro.clone(), g.kind)));
        }
        let reply = Reply::Lead(LeadOutcome {
            lead: lead.id.clone(),
            status: LeadStatus::Accepted,
            price,
            offers,
            release_at,
            expires_at: Some(expires_at),
        });
        Ok(Decision { events, reply })
    }

    /// R5/R6: the generic release of a lead being published, planned after its direct
    /// offer. `events` holds the publish's `LeadAccepted`, then its direct `Offered` if
    /// the lead names targets; the release gets the responder seats the targets that
    /// received the lead did not take, after their head start, or in this decision if
    /// none of them took a seat (none named, none could receive it) or the head start
    /// is over. Sets the `LeadAccepted`'s `release_at` and `direct_seats`, adds the
    /// release to `events` when it is now, and returns `release_at`.
    ///
    /// `lost`: direct targets that did not receive the lead after all (their purchase
    /// refused by the ledger, [`Shard::replan_release`]): left out of the release as
    /// offered already, so they keep their turn and are parked only if their budgets
    /// say so (one refused spend of one config at this price does not).
    fn plan_release(
        &self,
        now: Millis,
        events: &mut Vec<Event>,
        lost: &[ProId],
        funds: &dyn Funds,
    ) -> Option<Millis> {
        let direct: Vec<(ProId, OfferKind)> = match events.get(1) {
            Some(Event::Offered { release: false, grants, .. }) => {
                grants.iter().map(|g| (g.pro.clone(), g.kind)).collect()
            }
            _ => Vec::new(),
        };
        let direct_seats = direct.len() as u32;
        let p = &self.policy;
        let generic_slots = p.max_responders.saturating_sub(direct_seats);
        let far = far_components(&events[0]);
        let Some(Event::LeadAccepted {
            lead,
            fingerprint,
            price,
            expires_at,
            release_at: planned,
            direct_seats: seats,
            ..
        }) = events.first_mut()
        else {
            debug_assert!(false, "a publish's first event is its LeadAccepted");
            return None;
        };
        let release_at = match lead.kind {
            JobKind::Direct | JobKind::Contact => None,
            // R6: the direct targets took every seat; a release would offer (and under
            // auto-buy charge) a lead nobody else may respond to.
            JobKind::Match if generic_slots == 0 => None,
            // No target received it (none named, or none could): no head start to give.
            JobKind::Match if direct_seats == 0 => Some(now),
            JobKind::Match => Some(lead.created_at.saturating_add(p.head_start).max(now)),
        };
        *planned = release_at;
        *seats = Some(direct_seats);
        // No head start: generic release in the same decision.
        if release_at == Some(now) {
            // The release must see the direct offers made just above (a lead published
            // after its head start is over), or a direct target would be offered twice.
            let mut st = provisional(Arc::clone(lead), *fingerprint, *price, far, now, *expires_at);
            st.direct_seats = Some(direct_seats);
            st.offers = direct
                .into_iter()
                .map(|(pro, kind)| OfferState::new(pro, kind, now, OptMillis::NONE))
                .collect();
            let as_offered =
                lost.iter().map(|pro| OfferState::new(pro.clone(), OfferKind::Direct, now, OptMillis::NONE));
            st.offers.extend(as_offered);
            let mut ev = self.release(now, &st, funds);
            // Their skip is the direct offer's (the refused purchase), not this one's.
            if let Event::Offered { skipped, .. } = &mut ev {
                skipped.retain(|(pro, skip)| !(lost.contains(pro) && *skip == Skip::AlreadyOffered));
            }
            events.push(ev);
        }
        release_at
    }

    /// R5/R6 under auto-buy: the release of a publish planned again once the ledger
    /// refused the purchases of some of its direct targets (`lost`: another shard spent
    /// their budget between the decision and its spend; `money::execute_noting_drops`
    /// took them out of the direct offer). They did not receive the lead, so they hold
    /// no seat and give no head start: planned with the targets they left, the release
    /// gets their seats, and runs now if no target holds one. `events` are the
    /// publish's, not applied and with no money executed past the direct offer (the
    /// release planned before is dropped); the lost targets are left out of the new one
    /// (they keep their turn, and wait for the lead as any pro refused for its budget,
    /// R22). `reply` is the publish's answer, made to say the same.
    pub fn replan_release(
        &self,
        now: Millis,
        events: &mut Vec<Event>,
        lost: &[ProId],
        reply: &mut Reply,
        funds: &dyn Funds,
    ) {
        events.truncate(2);
        let release_at = self.plan_release(now, events, lost, funds);
        if let Reply::Lead(outcome) = reply {
            outcome.release_at = release_at;
            outcome.offers = events
                .iter()
                .filter_map(|ev| match ev {
                    Event::Offered { grants, .. } => Some(grants),
                    _ => None,
                })
                .flatten()
                .map(|g| (g.pro.clone(), g.kind))
                .collect();
        }
    }

    /// The cheapest a lead of this shard can cost (R11 prices are clamped to the
    /// policy's minimum; a flat price is the same for all).
    fn min_price(&self) -> u64 {
        match &self.policy.pricing {
            Some(p) => p.policy().min_price_credits,
            None => self.policy.flat_price_credits,
        }
    }

    /// The pros parked for a spent budget, and those short of it without a park (skipped
    /// for it, `ProSlot::budget_short_since`). After recovery the shell sends them all a
    /// `BudgetAvailable` (a recharge logged just before a crash, or one made by a
    /// profile update whose retry was queued in memory, told no shard): those whose
    /// budget came back are retried the leads they missed (R22) and unparked, the
    /// others are unparked and parked again by the next lead that scans them.
    pub fn budget_parked(&self) -> Vec<ProId> {
        let parked: rustc_hash::FxHashSet<u32> = self.ring.parked_for_budget().collect();
        self.slots
            .iter()
            .filter(|(_, slot)| {
                parked.contains(*slot)
                    || self
                        .pros
                        .get(**slot as usize)
                        .and_then(Option::as_ref)
                        .is_some_and(|ps| ps.budget_short_since.get().is_some())
            })
            .map(|(pro, _)| pro.clone())
            .collect()
    }

    /// R11: the lead's price in credits, with its components when the policy prices
    /// from category statistics: chat-only contact and thin details (no form answers,
    /// or a description shorter than twice the gate's minimum) lower it. The far-away
    /// risk depends on the pro, not the lead: see [`Shard::price_for`].
    fn price(&self, lead: &Lead) -> (u64, Option<crate::pricing::PriceComponents>) {
        let p = &self.policy;
        if p.charge_on == ChargeOn::Never {
            return (0, None);
        }
        let Some(pricing) = &p.pricing else { return (p.flat_price_credits, None) };
        let mut stats = *pricing.stats(&lead.category);
        if let Some(learned) = self.learned_proposals() {
            stats.avg_proposals_milli = learned;
        }
        let risk = crate::pricing::RiskInputs {
            chat_only: lead.client.contact.chat_only(),
            thin_details: lead.details.is_empty()
                || lead.description.chars().count() < 2 * p.min_description_chars as usize,
            distance_m: None,
        };
        let price = crate::pricing::price(&stats, &risk, pricing);
        (price.credits, Some(price.components))
    }

    /// R11: the learned proposals per lead that prices use, if any: none while the
    /// policy in force does not learn (`proposals_ema_permille = 0`), whose configured
    /// figure then applies as written.
    fn learned_proposals(&self) -> Option<u64> {
        let pricing = self.policy.pricing.as_ref()?;
        self.learned_proposals_milli.filter(|_| pricing.proposals_ema().get() > 0)
    }

    /// R11, per pro: the distance in meters from `pro`'s base to the lead when it is
    /// farther than the far-away distance the lead was priced with (and that pricing
    /// has a far-away discount), else `None`. "Farther" is the radius check's rule
    /// (R4): a pro exactly at the distance is not far away.
    fn far_away_m(st: &LeadState, pro: &Pro) -> Option<u64> {
        let c = st.price_components.as_deref()?;
        if c.far_away_pro_discount_permille == 0 {
            return None;
        }
        let (loc, base) = (st.lead.location.as_ref()?, pro.base.as_ref()?);
        if base.within_km(loc, f64::from(c.far_away_km)) {
            return None;
        }
        Some((base.distance_km(loc) * 1000.0).round() as u64)
    }

    /// R11: what `pro` pays for the lead. One price per lead (every pro pays the same,
    /// chat-only contact and thin details included), except for the far-away risk,
    /// which depends on the pro: a pro farther than `far_away_km` from the lead pays
    /// the lead's price with the far-away discount (`PriceComponents::far_away`). The
    /// distance is the pro's base at the time it pays (offer, response, retry): a
    /// charge, once made, keeps its credits.
    pub fn price_for(st: &LeadState, pro: &Pro) -> u64 {
        Self::far_price(st, pro).map_or(st.price, |p| p.credits)
    }

    /// The far-away price of the lead for `pro`, with its components, when it has one.
    fn far_price(st: &LeadState, pro: &Pro) -> Option<crate::pricing::Price> {
        let d = Self::far_away_m(st, pro)?;
        st.price_components.as_deref()?.far_away(d)
    }

    /// [`Shard::price_for`] by pro id; the lead's price for a pro no longer in the shard.
    pub fn price_of(&self, st: &LeadState, pro: &ProId) -> u64 {
        self.slots.get(pro).map_or(st.price, |&slot| Self::price_for(st, &self.slot_pro(slot).pro))
    }

    /// The price components of what `pro` pays for the lead ([`Shard::price_for`]).
    pub fn price_components_of(
        &self,
        st: &LeadState,
        pro: &ProId,
    ) -> Option<crate::pricing::PriceComponents> {
        let far = self.slots.get(pro).and_then(|&slot| Self::far_price(st, &self.slot_pro(slot).pro));
        far.map(|p| p.components).or_else(|| st.price_components.as_deref().cloned())
    }

    /// R2 quality gate and duplicate protection. `None` = the lead passes. A client
    /// who is a pro offering the lead's category is a competitor wherever that pro
    /// works ("a pro who offers this same category": no zone in the rule), so the
    /// tenant's directory is asked too, not only this zone's pros.
    fn gate(&self, lead: &Lead, funds: &dyn Funds) -> Option<RejectReason> {
        let p = &self.policy;
        if p.require_verified_phone && !lead.client.phone_verified {
            return Some(RejectReason::PhoneUnverified);
        }
        let desc_chars = lead.description.chars().count();
        let missing_key = p
            .required_details
            .get(&lead.category)
            .is_some_and(|keys| keys.iter().any(|k| lead.details.get(k).is_none_or(|v| v.trim().is_empty())));
        if desc_chars < p.min_description_chars as usize || missing_key {
            return Some(RejectReason::InsufficientDetails);
        }
        if p.reject_competitors {
            if let Some(pid) = &lead.client.pro_id {
                if self.slots.contains_key(pid) || funds.offers_category(pid, &lead.category) {
                    return Some(RejectReason::Competitor);
                }
            }
        }
        if let Some(window) = p.duplicate_window {
            if let Some((at, prev)) = self.last_by_client.get(&lead.client.id) {
                // Same client, zone and category within the window: recognised
                // before anyone is charged.
                if prev != &lead.id
                    && lead.created_at < at.saturating_add(window)
                    && self.leads.contains_key(prev)
                {
                    return Some(RejectReason::Duplicate);
                }
            }
        }
        None
    }

    /// Why `slot` may not take `st`'s lead now, if it may not (R4, R21).
    fn ineligible(&self, now: Millis, slot: u32, st: &LeadState, funds: &dyn Funds) -> Option<Skip> {
        let ps = self.slot_pro(slot);
        let pro = &ps.pro;
        let lead = &st.lead;
        if st.offer(&pro.id).is_some() {
            return Some(Skip::AlreadyOffered);
        }
        if lead.client.pro_id.as_ref() == Some(&pro.id) {
            return Some(Skip::IsClient);
        }
        if let Err(u) = ps.available(now) {
            return Some(u.into());
        }
        if let (Some(loc), Some(base), Some(radius)) = (&lead.location, &pro.base, pro.radius_km) {
            if !base.within_km(loc, radius) {
                return Some(Skip::TooFar { distance_km: base.distance_km(loc), radius_km: radius });
            }
        }
        if let Some(a) = lead.attributes.iter().find(|a| pro.refuses.contains(a)) {
            return Some(Skip::RefusesAttribute { attribute: a.clone() });
        }
        let price = Self::price_for(st, pro);
        match self.policy.charge_on {
            ChargeOn::Never => None,
            ChargeOn::Response => {
                let available = funds.credits(&pro.id);
                (available < price).then_some(Skip::CannotPay { available, price })
            }
            ChargeOn::Dispatch => self.cannot_buy(now, pro, price, funds),
        }
    }

    /// Why `pro` cannot buy a lead of this shard at `price` from an auto-buy budget
    /// now, or `None` if a covering config can pay (the one [`Shard::budget_config`]
    /// names).
    fn cannot_buy(&self, now: Millis, pro: &Pro, price: u64, funds: &dyn Funds) -> Option<Skip> {
        let mut covering = pro.autobuy.iter().filter(|c| c.covers(&self.key.zone, &self.key.category));
        let mut first_skip = None;
        let mut any = false;
        for c in &mut covering {
            any = true;
            let skip = if !c.is_buying(now) {
                Skip::AutoBuyPaused
            } else if c.max_price_credits.is_some_and(|m| m < price) {
                Skip::PriceAboveMax { max_price: c.max_price_credits.unwrap_or(0), price }
            } else {
                let available = funds.budget(&pro.id, &c.name);
                if available >= price {
                    return None;
                }
                Skip::BudgetExhausted { available, price }
            };
            first_skip.get_or_insert(skip);
        }
        if !any {
            return Some(Skip::NoAutoBuyConfig);
        }
        Some(first_skip.expect("set in the loop: `any` is true"))
    }

    /// An auto-buy purchase of `st` by `pro` from the config that pays for it.
    fn purchase(&self, now: Millis, st: &LeadState, pro: &Pro, funds: &dyn Funds) -> Result<Charge, Skip> {
        let price = Self::price_for(st, pro);
        match self.budget_config(now, pro, price, funds) {
            Some(config) => Ok(Charge {
                op: op_id("buy", &st.lead.id, &pro.id),
                credits: price,
                mode: ChargeMode::Budget { config },
            }),
            None => Err(self.cannot_buy(now, pro, price, funds).unwrap_or(Skip::NoAutoBuyConfig)),
        }
    }

    /// The auto-buy config that pays for `st` for this pro (first by name with budget).
    fn budget_config(&self, now: Millis, pro: &Pro, price: u64, funds: &dyn Funds) -> Option<SmolStr> {
        // The smallest name among the configs that can pay: no sorted copy of the list.
        pro.autobuy
            .iter()
            .filter(|c| c.covers(&self.key.zone, &self.key.category) && c.is_buying(now))
            .filter(|c| c.max_price_credits.is_none_or(|m| m >= price))
            .filter(|c| funds.budget(&pro.id, &c.name) >= price)
            .min_by(|a, b| a.name.cmp(&b.name))
            .map(|c| SmolStr::new(&c.name))
    }

    /// The generic release of a lead: who gets it, in rotation order (R5, R6a, R21).
    fn release(&self, now: Millis, st: &LeadState, funds: &dyn Funds) -> Event {
        self.release_on(&self.ring, now, st, funds)
    }

    /// [`Shard::release`] on `ring`: the shard's, or a copy that already holds the
    /// turns of the releases decided before it in the same tick.
    fn release_on(&self, ring: &Ring, now: Millis, st: &LeadState, funds: &dyn Funds) -> Event {
        let p = &self.policy;
        let (n, kind) = match p.mode {
            DispatchMode::Shared => (p.offer_fanout.map_or(usize::MAX, |n| n as usize), OfferKind::Generic),
            DispatchMode::Matched => (p.offer_fanout.map_or(usize::MAX, |n| n as usize), OfferKind::Match),
            DispatchMode::AutoBuy => {
                // R6 with R21: no more buyers than the seats the direct targets left,
                // or the last to answer would have paid for a full lead.
                let have = st.offers.iter().filter(|o| o.kind == OfferKind::AutoBuy).count();
                let seats = p.group_size.min(st.generic_cap(p)) as usize;
                (seats.saturating_sub(have), OfferKind::AutoBuy)
            }
        };
        let all = n == usize::MAX;
        let n = n.min(MAX_OFFERS_PER_RELEASE);
        let mut skipped = Vec::new();
        let mut skipped_more = 0u32;
        let mut budget_short = Vec::new();
        let catch_up = p.max_catch_up_turns;
        let rotation = ring.select_at(now, catch_up, n, |slot| match self.ineligible(now, slot, st, funds) {
            None => Verdict::Take,
            Some(skip) => {
                let ps = self.slot_pro(slot);
                let pro = &ps.pro;
                let parking = self.parking(now, pro, funds);
                if skipped.len() < MAX_RECORDED_SKIPS {
                    skipped.push((pro.id.clone(), skip));
                } else {
                    skipped_more = skipped_more.saturating_add(1);
                    if matches!(skip, Skip::BudgetExhausted { .. })
                        && parking.is_none()
                        && ps.budget_short_since.get().is_none()
                    {
                        budget_short.push(pro.id.clone());
                    }
                }
                parking.map_or(Verdict::Skip, Verdict::Park)
            }
        });
        // A group left short: the pros parked for a spent budget would have been
        // scanned and skipped for it, so they wait for this lead like those (R22), up to
        // the same bound. (One whose budget has just come back is eligible again but
        // still parked until its `BudgetReturned`, which retries this lead for it.)
        // Past the bound, those next in the rotation (by pass, as a scan meets them).
        if kind == OfferKind::AutoBuy && rotation.taken.len() < n {
            let room = MAX_RECORDED_SKIPS.saturating_sub(skipped.len());
            // The first `room` in rotation order, from the ring's index of them: not a
            // walk of every budget-parked pro (most of a shard's, late in a week).
            let parked: Vec<u32> = ring.budget_parked_in_order().take(room).collect();
            for slot in parked {
                let skip = self.ineligible(now, slot, st, funds).unwrap_or(Skip::BudgetExhausted {
                    available: 0,
                    price: Self::price_for(st, &self.slot_pro(slot).pro),
                });
                skipped.push((self.slot_pro(slot).pro.id.clone(), skip));
            }
        }
        let mut grants = Vec::with_capacity(rotation.taken.len());
        let mut rotation = rotation;
        let mut i = 0;
        while i < rotation.taken.len() {
            let slot = rotation.taken[i];
            let pro = &self.slot_pro(slot).pro;
            let charge = match kind {
                OfferKind::AutoBuy => match self.purchase(now, st, pro, funds) {
                    Ok(c) => Some(c),
                    // The budget the scan saw was spent since by another shard's
                    // decision (the ledger is shared, read live): as a spend the ledger
                    // refuses, the pro keeps its turn and waits for the lead (R22).
                    Err(skip) => {
                        rotation.taken.remove(i);
                        rotation.skipped.push(slot);
                        skipped.push((pro.id.clone(), skip));
                        continue;
                    }
                },
                _ => None,
            };
            grants.push(Grant { pro: pro.id.clone(), kind, charge });
            i += 1;
        }
        // With fanout "all" the rotation order only orders delivery; nobody's turn is
        // consumed, so the ring does not move, unless the release stopped at
        // `MAX_OFFERS_PER_RELEASE` (then the turns are used, as for a number).
        // Parking is no turn: it stays.
        let rotation = if all && rotation.taken.len() < n {
            Selection { parked: rotation.parked, ..Selection::default() }
        } else {
            rotation
        };
        // Only skips the scan actually recorded before the last taken pro count;
        // pros scanned after it (fanout "all") are genuinely ineligible too.
        Event::Offered {
            lead: st.lead.id.clone(),
            at: now,
            release: true,
            grants,
            rotation,
            skipped,
            skipped_more,
            budget_short,
        }
    }

    /// Whether `pro` is unavailable for *every* lead of this shard at `now`, whatever
    /// the lead and the funds, and until when: `Some(Some(t))` = until `t`,
    /// `Some(None)` = until the pro changes (upsert, availability), `None` = not
    /// parkable. The rotation parks such pros instead of scanning them per lead.
    /// Outside its weekly schedule a pro is parked until the schedule's next opening
    /// (`WeeklyWindows::next_open_in`, never later than the true opening), so a
    /// shard at night does not scan every closed pro on every lead. A pro whose every
    /// buying auto-buy budget is below the cheapest price of this shard is parked until
    /// [`ring::UNTIL_BUDGET`]: until its budget comes back (`BudgetReturned`), so late in
    /// the week a shard of spent budgets does not look each one up on every lead.
    fn parking(&self, now: Millis, pro: &Pro, funds: &dyn Funds) -> Option<Option<Millis>> {
        // Ineligible while any condition holds: until the last of them ends.
        let mut until: Option<Option<Millis>> = None;
        let mut hold = |end: Option<Millis>| {
            until = Some(match (until, end) {
                (Some(None), _) | (_, None) => None,
                (Some(Some(a)), Some(b)) => Some(a.max(b)),
                (None, Some(b)) => Some(b),
            });
        };
        // A pro's own end of a pause is a time, never the "until budget comes back"
        // mark: profiles logged before times were bounded on the wire (a pause "for
        // ever" as `i64::MAX`) would otherwise park it as if its budget were spent, and
        // an R22 retry would later buy it leads released while it was paused.
        let time = |t: Millis| t.min(ring::UNTIL_BUDGET - 1);
        let a = &pro.availability;
        if let Some(t) = a.paused_until.filter(|&t| now < t) {
            hold(Some(time(t)));
        }
        if let Some((_, to)) = a.vacation.filter(|&(from, to)| from <= now && now < to) {
            hold(Some(time(to)));
        }
        if let Some(schedule) = &a.schedule {
            let tz = schedule.tz();
            if !schedule.contains_in(tz, now) {
                // No opening found (impossible after validation): not parked at all
                // rather than parked until the pro changes.
                hold(Some(schedule.next_open_in(tz, now)?));
            }
        }
        if self.policy.charge_on == ChargeOn::Dispatch {
            let covering = pro.autobuy.iter().filter(|c| c.covers(&self.key.zone, &self.key.category));
            if !covering.clone().any(|c| c.is_buying(now)) {
                // Inactive configs (and none at all) wait for an upsert; paused ones
                // resume by themselves.
                hold(covering.filter(|c| c.active).filter_map(|c| c.paused_until).min().map(time));
            } else if covering
                .filter(|c| c.is_buying(now))
                .all(|c| funds.budget(&pro.id, &c.name) < self.min_price())
            {
                // Every budget that buys here is below the cheapest price a lead of this
                // shard can have: parked until budget comes back. Every way it comes back
                // tells this shard: a recharge or a refund sends `BudgetAvailable`
                // (`BudgetReturned` unparks), a changed config upserts the pro, and
                // after recovery every one of them is sent `BudgetAvailable` (a recharge
                // logged just before a crash).
                hold(Some(ring::UNTIL_BUDGET));
            }
        }
        until
    }

    fn decide_offer(
        &self,
        now: Millis,
        lead_id: &LeadId,
        pro: &ProId,
        action: &OfferAction,
        funds: &dyn Funds,
    ) -> Result<Decision, Reject> {
        let st = self.leads.get(lead_id).ok_or_else(|| Reject::UnknownLead(lead_id.clone()))?;
        let offer =
            st.offer(pro).ok_or_else(|| Reject::NotOffered { lead: lead_id.clone(), pro: pro.clone() })?;
        let illegal = || Reject::IllegalTransition { from: offer.status.as_str(), action: action.name() };
        // R15: once the response window is over no action is possible on the offer (the
        // article: "no action can be taken on expired jobs", an internal note included),
        // and the answer must not depend on whether the expiry timer has fired yet.
        let window_over = offer.status == OfferStatus::Expired
            || (offer.status.is_open() && offer.respond_by.get().is_some_and(|t| now >= t));
        if window_over
            && matches!(
                action,
                OfferAction::Open
                    | OfferAction::Respond
                    | OfferAction::Decline { .. }
                    | OfferAction::AddNote { .. }
            )
        {
            return Err(Reject::OfferExpired { lead: lead_id.clone(), pro: pro.clone() });
        }
        let (l, p) = (lead_id.clone(), pro.clone());
        let view =
            |status: OfferStatus, revealed: bool| Reply::Offer(self.view(st, offer, Some(status), revealed));
        use OfferStatus as S;
        let event = match action {
            // R17: opening an offer seen already (opened, answered, declined, or made
            // inactive since) changes nothing: an `open` sent again after the pro
            // went on (pipelined with its response, both resent after a lost
            // connection) is answered with the offer as it is, not refused.
            OfferAction::Open => match offer.status {
                S::New => Event::OfferOpened { lead: l, pro: p, at: now },
                _ => return Ok(Decision { events: vec![], reply: view(offer.status, false) }),
            },
            OfferAction::Respond => {
                match offer.status {
                    // The same response twice charges once; also once the offer moved
                    // on (declined by the client, the lead closed): a response sent
                    // again is answered with the offer as it is, which says the pro
                    // responded (and was charged).
                    S::Replied | S::AwaitingResponse | S::Completed => {
                        return Ok(Decision { events: vec![], reply: view(offer.status, true) })
                    }
                    _ if offer.responded_at().is_some() => {
                        return Ok(Decision { events: vec![], reply: view(offer.status, true) })
                    }
                    S::New | S::Opened => {}
                    // Made inactive by the lead closing or its cap filling: answer why,
                    // as a response a moment earlier (before the timer fired) would be.
                    S::Inactive if !st.is_open() => return Err(Reject::LeadExpired(l)),
                    S::Inactive => return Err(Reject::LeadFull(l)),
                    _ => return Err(illegal()),
                }
                if !st.is_open() || now >= st.expires_at {
                    return Err(Reject::LeadExpired(l));
                }
                if offer.respond_by.get().is_some_and(|t| now >= t) {
                    return Err(Reject::OfferExpired { lead: l, pro: p });
                }
                let cap_full = st.responders >= self.policy.max_responders
                    || (offer.kind.takes_a_generic_seat()
                        && st.generic_responders >= st.generic_cap(&self.policy));
                if cap_full {
                    return Err(Reject::LeadFull(l));
                }
                let price = self.price_of(st, pro);
                let charge = match (self.policy.charge_on, offer.charge.is_some()) {
                    // R13: a `contact` job is a prospect writing to the pro, a message
                    // and not a lead: answering it is never charged.
                    (ChargeOn::Response, false) if price > 0 && offer.kind != OfferKind::Contact => {
                        let available = funds.credits(pro);
                        if available < price {
                            return Err(Reject::InsufficientCredits { available, needed: price });
                        }
                        let hold = st.lead.client.contact.chat_only();
                        Some(Charge {
                            op: op_id(if hold { "hold" } else { "charge" }, &l, &p),
                            credits: price,
                            mode: if hold { ChargeMode::Hold } else { ChargeMode::Capture },
                        })
                    }
                    _ => None,
                };
                let ev = Event::Responded { lead: l, pro: p, at: now, charge };
                return Ok(Decision { events: vec![ev], reply: view(S::Replied, true) });
            }
            OfferAction::Decline { by } => match (offer.status, by) {
                (S::New | S::Opened | S::Replied | S::AwaitingResponse, _) => {
                    Event::Declined { lead: l, pro: p, by: *by, at: now }
                }
                // R14: declining is final; a decline sent again (by either party: the
                // offer is declined whoever asks) is answered as the first was, with
                // no second penalty.
                (S::Declined, _) => return Ok(Decision { events: vec![], reply: view(S::Declined, false) }),
                _ => return Err(illegal()),
            },
            OfferAction::ClientReplied => match offer.status {
                S::Replied => {
                    let capture = offer
                        .charge
                        .as_ref()
                        .filter(|c| c.mode == ChargeMode::Hold && !offer.captured)
                        .map(|c| Charge::clone(c));
                    Event::ClientReplied { lead: l, pro: p, at: now, capture }
                }
                S::AwaitingResponse => {
                    return Ok(Decision { events: vec![], reply: view(offer.status, true) })
                }
                _ => return Err(illegal()),
            },
            OfferAction::ProReplied => match offer.status {
                S::AwaitingResponse => Event::ProReplied { lead: l, pro: p, at: now },
                S::Replied => return Ok(Decision { events: vec![], reply: view(offer.status, true) }),
                _ => return Err(illegal()),
            },
            OfferAction::ClientViewed => match offer.status {
                S::Replied | S::AwaitingResponse | S::Completed if !offer.viewed => {
                    Event::ClientViewed { lead: l, pro: p, at: now }
                }
                // Viewed, then declined by the client: the view sent again.
                S::Replied | S::AwaitingResponse | S::Completed | S::Declined if offer.viewed => {
                    return Ok(Decision { events: vec![], reply: view(offer.status, true) })
                }
                _ => return Err(illegal()),
            },
            OfferAction::Complete => match offer.status {
                S::Replied | S::AwaitingResponse => Event::Completed { lead: l, pro: p, at: now },
                S::Completed => return Ok(Decision { events: vec![], reply: view(offer.status, true) }),
                _ => return Err(illegal()),
            },
            OfferAction::AddNote { text } => {
                if text.trim().is_empty() || text.len() > MAX_NOTE_LEN {
                    return Err(field_err("text", "a note must be 1..=4096 bytes").into());
                }
                if offer.notes().len() >= MAX_NOTES {
                    return Err(field_err("text", "an offer holds at most 100 notes").into());
                }
                Event::NoteAdded { lead: l, pro: p, text: text.clone(), at: now }
            }
            OfferAction::ConfirmInvalidContact => match (&offer.charge, offer.refunded) {
                (Some(c), false) if offer.captured || c.mode != ChargeMode::Hold => Event::Refunded {
                    lead: l,
                    pro: p,
                    charge: Charge::clone(c),
                    reason: RefundReason::InvalidContact,
                    at: now,
                },
                (Some(_), true) => return Ok(Decision { events: vec![], reply: view(offer.status, true) }),
                _ => return Err(Reject::IllegalTransition { from: "not_charged", action: action.name() }),
            },
        };
        let status_after = match &event {
            Event::OfferOpened { .. } => S::Opened,
            Event::Declined { .. } => S::Declined,
            Event::ClientReplied { .. } => S::AwaitingResponse,
            Event::ProReplied { .. } => S::Replied,
            Event::Completed { .. } => S::Completed,
            _ => offer.status,
        };
        let revealed = offer.responded_at().is_some();
        // R12: a client who answered the proposal has seen it ("the client views your
        // proposal" is what the guarantee promises): the reply records the view too,
        // unless the platform already sent `client_viewed`.
        let view_too = matches!(event, Event::ClientReplied { .. }) && !offer.viewed;
        let mut events = Vec::with_capacity(3);
        // R12: a view recorded once the guarantee window is over (the platform sent it
        // late, or the shard's timer has not reached the deadline yet) does not take
        // the refund away: it is made first, as the timer would have, so the outcome
        // does not depend on which came first (the timer then finds it refunded).
        // A chat-only hold (R9) is captured by this very reply: refunded right after it,
        // so a reply past the window costs the pro nothing either.
        let viewing = view_too || matches!(event, Event::ClientViewed { .. });
        let captured_now = matches!(&event, Event::ClientReplied { capture: Some(_), .. });
        let mut refund_after = None;
        if let (true, false, Some(due), Some(c)) =
            (viewing, offer.refunded, offer.guarantee_at(), &offer.charge)
        {
            let refund = |at: Millis| Event::Refunded {
                lead: lead_id.clone(),
                pro: pro.clone(),
                charge: Charge::clone(c),
                reason: RefundReason::NotViewed,
                at,
            };
            let settled = offer.captured || c.mode != ChargeMode::Hold;
            if now >= due && settled {
                events.push(refund(due));
            } else if now >= due && captured_now {
                refund_after = Some(refund(now));
            }
        }
        events.push(event);
        if view_too {
            events.push(Event::ClientViewed { lead: lead_id.clone(), pro: pro.clone(), at: now });
        }
        events.extend(refund_after);
        Ok(Decision { reply: view(status_after, revealed), events })
    }

    /// R22: budget came back for `pros` (a recharge, resumed configs, refunds); the
    /// open auto-buy leads they missed for want of it within the retry window, and
    /// whose group is not full, are bought now.
    ///
    /// A pro missed a lead for want of budget if the lead's scan skipped it for that
    /// (the lead's retry list, bounded by [`MAX_RECORDED_SKIPS`]) or if the pro was
    /// parked for a spent budget, or short of budget (skipped for it, not parked, and
    /// no lead received since), without a break, since before the lead's release (its
    /// scan for buyers) and was available then (its schedule, pause and vacation as set
    /// now: any change to them would have ended the park). A lead with open seats scanned every
    /// pro not parked, so a pro short of budget since before it was skipped by it. The
    /// second covers the pros a large shard's bounded retry list leaves out.
    ///
    /// Who gets a seat follows the rotation (R21, R28), not the order in which budgets
    /// came back: the shell sends every pro of one recharge in one command, leads are
    /// taken oldest first, and each lead's open seats go to its waiting pros in
    /// `(pass, slot)` order. A retried lead counts as a turn (the pro's pass advances by
    /// its stride, as for a lead of the release), so with a Monday recharge of eight
    /// equal pros and groups of four the first short lead goes to the four next in the
    /// rotation and the second to the other four; and a pro that catches up on missed
    /// leads goes to the back of the queue for the next fresh one instead of getting
    /// them on top of its turns (no catch-up burst).
    fn decide_budget_retry(&self, now: Millis, pros: &[ProId], funds: &dyn Funds) -> Decision {
        struct Waiting {
            /// The pass after the events before the offers (a parked pro's is clamped).
            pass: u64,
            /// When it was last taken (the ring's order among equal passes).
            served: u64,
            slot: u32,
            stride: u64,
            /// Parked for its budget since then, without a break.
            since: Option<Millis>,
        }
        let mut events = Vec::new();
        let mut waiting: Vec<Waiting> = Vec::with_capacity(pros.len());
        let mut seen: FxHashSet<u32> = FxHashSet::default();
        for pro in pros {
            let Some(&slot) = self.slots.get(pro) else { continue };
            if !seen.insert(slot) {
                continue;
            }
            let Some(e) = self.ring.entry(slot) else { continue };
            let mut pass = e.pass;
            if self.ring.is_parked(slot) {
                events.push(Event::BudgetReturned { pro: pro.clone(), at: now });
                pass = self.ring.unpark_pass(e, self.policy.max_catch_up_turns);
            }
            waiting.push(Waiting {
                pass,
                served: e.served,
                slot,
                stride: e.stride,
                // The earlier of the two: short of budget (skipped for it), then parked.
                since: self.short_of_budget_since(slot, self.slot_pro(slot).budget_short_since).get(),
            });
        }
        if waiting.is_empty() {
            return done(events);
        }
        let index: FxHashMap<&ProId, usize> =
            waiting.iter().enumerate().map(|(i, w)| (&self.slot_pro(w.slot).pro.id, i)).collect();
        let first_since = waiting.iter().filter_map(|w| w.since).min();
        // A lead's scan for buyers ran at its release (after the head start, or late
        // after a stop), not when it was accepted: who was short of budget or available
        // is judged then.
        let released = |st: &LeadState| st.released_at.get().unwrap_or(st.accepted_at);
        let mut leads: Vec<&LeadState> = self
            .leads
            .values()
            .filter(|st| {
                st.is_open()
                    && (first_since.is_some_and(|s| s <= released(st))
                        || st.budget_waitlist.iter().any(|p| index.contains_key(p)))
            })
            .filter(|st| now < st.accepted_at.saturating_add(self.policy.retry_window))
            // Only leads the rotation has released to buyers: not a direct or contact
            // job (R13: its targets only), nor one whose head start still runs (R5: the
            // release comes first; it buys for whoever can pay then).
            .filter(|st| {
                st.lead.kind == JobKind::Match && st.release_at.is_none() && st.released_at.is_some()
            })
            .map(|st| &**st)
            .collect();
        leads.sort_by(|a, b| {
            (released(a), a.accepted_at, &a.lead.id).cmp(&(released(b), b.accepted_at, &b.lead.id))
        });
        // The parked pros join `missed` (in rotation order) as the leads, oldest first,
        // reach the time they were parked since.
        let mut by_since: Vec<usize> = (0..waiting.len()).filter(|&i| waiting[i].since.is_some()).collect();
        by_since.sort_unstable_by_key(|&i| waiting[i].since);
        let mut joined = 0;
        let mut missed: BTreeSet<(u64, u64, u32, usize)> = BTreeSet::new();
        // The ring's count of pros taken, as the offers below take them in turn.
        let mut served = self.ring.served();
        let cheapest = self.min_price();
        let mut spent: FxHashMap<(ProId, SmolStr), u64> = FxHashMap::default();
        let mut listed: Vec<(u64, u64, u32, usize)> = Vec::new();
        for st in leads {
            while let Some(&i) = by_since.get(joined) {
                if waiting[i].since.is_some_and(|s| s > released(st)) {
                    break;
                }
                missed.insert((waiting[i].pass, waiting[i].served, waiting[i].slot, i));
                joined += 1;
            }
            // R6 with R21, as the release: no more buyers than the seats the direct
            // targets left.
            let bought = st.offers.iter().filter(|o| o.kind == OfferKind::AutoBuy).count();
            let seats =
                (self.policy.group_size.min(st.generic_cap(&self.policy)) as usize).saturating_sub(bought);
            if seats == 0 {
                continue;
            }
            // This lead's retry list among the pros whose budget came back, merged with
            // the pros parked since before it, next in the rotation first.
            listed.clear();
            listed.extend(st.budget_waitlist.iter().filter_map(|p| {
                index.get(p).map(|&i| (waiting[i].pass, waiting[i].served, waiting[i].slot, i))
            }));
            listed.sort_unstable();
            listed.dedup();
            let mut taken: Vec<usize> = Vec::new();
            let mut spent_out: Vec<usize> = Vec::new();
            let mut grants = Vec::new();
            let (mut a, mut b) = (listed.iter().peekable(), missed.iter().peekable());
            while grants.len() < seats {
                // The smaller of the two heads (both, when the same pro is in both).
                let key = match (a.peek(), b.peek()) {
                    (Some(&&x), Some(&&y)) if x == y => {
                        a.next();
                        b.next();
                        x
                    }
                    (Some(&&x), Some(&&y)) if x < y => {
                        a.next();
                        x
                    }
                    (_, Some(&&y)) => {
                        b.next();
                        y
                    }
                    (Some(&&x), None) => {
                        a.next();
                        x
                    }
                    (None, None) => break,
                };
                let (_, _, slot, i) = key;
                let ps = self.slot_pro(slot);
                if ps.available(released(st)).is_err() {
                    continue; // not for want of budget: unavailable at the release
                }
                let view = SpentFunds { inner: funds, spent: &spent };
                if self.ineligible(now, slot, st, &view).is_some() {
                    continue;
                }
                let price = Self::price_for(st, &ps.pro);
                let Some(config) = self.budget_config(now, &ps.pro, price, &view) else {
                    continue;
                };
                *spent.entry((ps.pro.id.clone(), config.clone())).or_default() += price;
                taken.push(i);
                let view = SpentFunds { inner: funds, spent: &spent };
                if self.budget_config(now, &ps.pro, cheapest, &view).is_none() {
                    spent_out.push(i); // nothing more it can buy
                }
                grants.push(Grant {
                    pro: ps.pro.id.clone(),
                    kind: OfferKind::AutoBuy,
                    charge: Some(Charge {
                        op: op_id("buy", &st.lead.id, &ps.pro.id),
                        credits: price,
                        mode: ChargeMode::Budget { config },
                    }),
                });
            }
            if grants.is_empty() {
                continue;
            }
            let mut rotation = Selection::default();
            for &i in &taken {
                let w = &mut waiting[i];
                rotation.taken.push(w.slot);
                served += 1;
                let next = (w.pass.saturating_add(w.stride), served);
                if missed.remove(&(w.pass, w.served, w.slot, i)) && !spent_out.contains(&i) {
                    missed.insert((next.0, next.1, w.slot, i));
                }
                (w.pass, w.served) = next;
            }
            events.push(Event::Offered {
                lead: st.lead.id.clone(),
                at: now,
                release: false,
                grants,
                rotation,
                skipped: vec![],
                skipped_more: 0,
                budget_short: Vec::new(),
            });
        }
        done(events)
    }

    fn decide_tick(&self, now: Millis, funds: &dyn Funds) -> Decision {
        let mut events = Vec::new();
        // Several releases due in one tick (leads created together, a late tick) each
        // see the turns the ones before took, as separate decisions would (R21/R28:
        // else every one went to the same pros, a burst and then a drought), and the
        // budgets they spent: a copy of the ring once a second one comes.
        let mut ring: Option<Ring> = None;
        let mut last_rotation: Option<Selection> = None;
        let mut spent: FxHashMap<(ProId, SmolStr), u64> = FxHashMap::default();
        for d in self.deadlines.iter().take_while(|d| d.at <= now) {
            let st = self.leads.get(&d.lead);
            match (&d.due, st) {
                // A release runs when the tick runs: normally a few milliseconds after
                // its deadline, but after a stop (or a stalled disk) possibly hours
                // later. Its offers are dated now, so each pro gets its whole response
                // window (R15) and the rotation and funds are those of now; dated at the
                // deadline they could reach pros already expired. A lead whose lifetime
                // (R7) ended meanwhile is not released: the `Close` deadline, also due,
                // closes it in this tick, and nobody could answer it.
                (Due::Release, Some(st))
                    if st.is_open() && st.release_at.is_some() && st.expires_at > now =>
                {
                    // (A release that moved nothing, as under fanout "all", needs no copy.)
                    if let Some(sel) = last_rotation.take().filter(|s| s != &Selection::default()) {
                        let catch_up = self.policy.max_catch_up_turns;
                        ring.get_or_insert_with(|| self.ring.clone()).commit_at(&sel, now, catch_up);
                    }
                    let view = SpentFunds { inner: funds, spent: &spent };
                    let ev = self.release_on(ring.as_ref().unwrap_or(&self.ring), now, st, &view);
                    if let Event::Offered { grants, rotation, .. } = &ev {
                        for g in grants {
                            if let Some(Charge { credits, mode: ChargeMode::Budget { config }, .. }) =
                                &g.charge
                            {
                                *spent.entry((g.pro.clone(), config.clone())).or_default() += credits;
                            }
                        }
                        last_rotation = Some(rotation.clone());
                    }
                    events.push(ev);
                }
                (Due::ExpireOffer(pro), Some(st)) if st.offer(pro).is_some_and(|o| o.status.is_open()) => {
                    events.push(Event::OfferExpired { lead: d.lead.clone(), pro: pro.clone(), at: d.at });
                }
                (Due::ExpireOffers, Some(st)) => {
                    let mut due: Vec<&ProId> = st
                        .offers
                        .iter()
                        .filter(|o| o.status.is_open() && o.respond_by == Some(d.at))
                        .map(|o| &o.pro)
                        .collect();
                    due.sort_unstable();
                    events.extend(due.into_iter().map(|pro| Event::OfferExpired {
                        lead: d.lead.clone(),
                        pro: pro.clone(),
                        at: d.at,
                    }));
                }
                (Due::Guarantee(pro), Some(st)) => {
                    if let Some(o) = st.offer(pro) {
                        let settled = o.charge.as_ref().filter(|c| o.captured || c.mode != ChargeMode::Hold);
                        if let (Some(c), false, false) = (settled, o.viewed, o.refunded) {
                            events.push(Event::Refunded {
                                lead: d.lead.clone(),
                                pro: pro.clone(),
                                charge: Charge::clone(c),
                                reason: RefundReason::NotViewed,
                                at: d.at,
                            });
                        }
                    }
                }
                (Due::Close, Some(st)) if st.is_open() => {
                    let releases = st
                        .offers
                        .iter()
                        .filter_map(|o| {
                            let c = o.charge.as_ref()?;
                            (c.mode == ChargeMode::Hold && !o.captured)
                                .then(|| (o.pro.clone(), Charge::clone(c)))
                        })
                        .collect();
                    events.push(Event::LeadClosed { lead: d.lead.clone(), at: d.at, releases });
                }
                (Due::Forget, _) => events.push(Event::LeadForgotten { lead: d.lead.clone() }),
                _ => {}
            }
        }
        // Every due deadline was handled: without this fact, one that had nothing left
        // to do would stay due forever and a wall-clock shard would re-arm its timer
        // for the past in a loop.
        if self.deadlines.first_at().is_some_and(|at| at <= now) {
            events.insert(0, Event::Ticked { upto: now });
        }
        done(events)
    }

    // -----------------------------------------------------------------------------
    // apply
    // -----------------------------------------------------------------------------

    /// Applies one fact. Infallible: an event that no longer finds its subject (e.g. an
    /// offer action for a forgotten lead) changes nothing.
    pub fn apply(&mut self, ev: &Event) {
        match ev {
            Event::ProUpserted { pro, reuse_slot, .. } => {
                let slot = match self.slots.get(&pro.id) {
                    Some(&s) => s,
                    None => {
                        let reused = if *reuse_slot { self.free.take_lowest(&self.pros) } else { None };
                        let s = reused.unwrap_or_else(|| {
                            self.pros.push(None);
                            (self.pros.len() - 1) as u32
                        });
                        self.slots.insert(pro.id.clone(), s);
                        s
                    }
                };
                let (stats, short_since) = match self.pros[slot as usize].take() {
                    // A park for a spent budget that was a pause "for ever" misread (see
                    // `paused_past_any_time`) is no shortage of budget: nothing to retry.
                    Some(p) if paused_past_any_time(&p.pro) => {
                        self.ring.forget_budget_park(slot);
                        (p.stats, OptMillis::NONE)
                    }
                    Some(p) => (p.stats, p.budget_short_since),
                    None => (self.departed.remove(&pro.id).unwrap_or_default(), OptMillis::NONE),
                };
                let weight = rank::weight(&self.policy, &pro.quality, &stats);
                let w = weight.weight;
                let mut ps = ProSlot::new(pro.clone(), stats, weight);
                // R22: short of budget since then, whatever the update changed: the leads
                // it missed meanwhile are still retried when its budget comes back.
                ps.budget_short_since = self.short_of_budget_since(slot, short_since);
                self.pros[slot as usize] = Some(ps);
                self.ring.upsert(slot, w);
                // Its configs or availability may have changed: back to the scan.
                self.ring.unpark(slot, self.policy.max_catch_up_turns);
            }
            Event::BudgetReturned { pro, .. } => {
                if let Some(&slot) = self.slots.get(pro) {
                    // R22: the unpark ends a park for a spent budget, which held since
                    // when the pro has been short of it: kept, as for an availability
                    // change (the budget back may not cover every lead it missed, and
                    // after a restart every parked pro is told, budget back or not).
                    let marked =
                        self.pros[slot as usize].as_ref().map_or(OptMillis::NONE, |ps| ps.budget_short_since);
                    let short_since = self.short_of_budget_since(slot, marked);
                    if let Some(ps) = self.pros[slot as usize].as_mut() {
                        ps.budget_short_since = short_since;
                    }
                    self.ring.unpark(slot, self.policy.max_catch_up_turns);
                }
            }
            Event::ProRemoved { pro, left, .. } => {
                if let Some(slot) = self.slots.remove(pro) {
                    self.ring.remove(slot);
                    if let Some(ps) = self.pros[slot as usize].take() {
                        if *left && ps.stats != ProStats::default() {
                            self.departed.insert(pro.clone(), ps.stats);
                        }
                    }
                    self.free.freed(slot);
                }
                if !*left {
                    self.departed.remove(pro);
                }
            }
            Event::AvailabilitySet { pro, availability, .. } => {
                if let Some(&slot) = self.slots.get(pro) {
                    if self.pros[slot as usize].as_ref().is_some_and(|ps| paused_past_any_time(&ps.pro)) {
                        // As for an upsert: a misread pause "for ever" was no shortage.
                        self.ring.forget_budget_park(slot);
                        if let Some(ps) = self.pros[slot as usize].as_mut() {
                            ps.budget_short_since = OptMillis::NONE;
                        }
                    }
                    let marked =
                        self.pros[slot as usize].as_ref().map_or(OptMillis::NONE, |ps| ps.budget_short_since);
                    // R22: the unpark below ends a park for a spent budget, which held
                    // since when the pro has been short of it.
                    let short_since = self.short_of_budget_since(slot, marked);
                    if let Some(ps) = self.pros[slot as usize].as_mut() {
                        let mut p = (*ps.pro).clone();
                        p.availability = availability.clone();
                        ps.pro = Arc::new(p);
                        ps.schedule_tz = ps.pro.availability.schedule_tz();
                        ps.budget_short_since = short_since;
                    }
                    self.ring.unpark(slot, self.policy.max_catch_up_turns);
                }
            }
            Event::LeadRejected { lead, fingerprint, reason, at, .. } => {
                // R1: remembered as an accepted lead is, for the retention after its
                // lifetime would have ended (it was created at most
                // `MAX_CREATED_AHEAD_MS` after `at`): until then the same payload can
                // still be published (`timing_refusal` takes it), and forgotten sooner
                // it would be decided again, a second `lead_rejected`, or accepted and
                // dispatched once the reason is gone (a competitor removed, the gate
                // relaxed by a reload) after the platform was told it was refused.
                let lifetime = self.policy.lead_ttl.saturating_add(MAX_CREATED_AHEAD_MS);
                let forget_at = at.saturating_add(lifetime).saturating_add(self.policy.idempotency_retention);
                self.next_seq += 1;
                let seq = self.next_seq;
                self.rejected.insert(
                    lead.clone(),
                    RejectedLead {
                        fingerprint: *fingerprint,
                        reason: *reason,
                        forget_at: OptMillis::some(forget_at),
                        seq,
                    },
                );
                self.deadlines.insert(Deadline { at: forget_at, seq, lead: lead.clone(), due: Due::Forget });
            }
            Event::LeadAccepted {
                lead,
                fingerprint,
                price,
                price_components,
                at,
                release_at,
                expires_at,
                direct_seats,
            } => {
                self.next_seq += 1;
                let seq = self.next_seq;
                let components = price_components.clone().map(Box::new);
                let st = provisional(lead.clone(), *fingerprint, *price, components, *at, *expires_at);
                let st = LeadState {
                    release_at: (*release_at).into(),
                    published_release_at: (*release_at).into(),
                    seq,
                    direct_seats: *direct_seats,
                    ..st
                };
                if let Some(r) = release_at {
                    if r > at {
                        self.deadlines.insert(Deadline {
                            at: *r,
                            seq,
                            lead: lead.id.clone(),
                            due: Due::Release,
                        });
                    }
                }
                self.deadlines.insert(Deadline {
                    at: *expires_at,
                    seq,
                    lead: lead.id.clone(),
                    due: Due::Close,
                });
                self.last_by_client.insert(lead.client.id.clone(), (lead.created_at, lead.id.clone()));
                self.leads.insert(lead.id.clone(), Arc::new(st));
            }
            Event::Offered { lead, at, release, grants, rotation, skipped, skipped_more, budget_short } => {
                // R22: who is short of budget since when (see `ProSlot::budget_short_since`).
                let short = skipped
                    .iter()
                    .filter(|(_, skip)| matches!(skip, Skip::BudgetExhausted { .. }))
                    .map(|(p, _)| p)
                    .chain(budget_short);
                for pro in short {
                    if let Some(ps) = self.slots.get(pro).and_then(|&slot| self.pros[slot as usize].as_mut())
                    {
                        if ps.budget_short_since.get().is_none() {
                            ps.budget_short_since = OptMillis::some(*at);
                        }
                    }
                }
                self.ring.commit_at(rotation, *at, self.policy.max_catch_up_turns);
                let response_window = self.policy.response_window;
                let guarantee_window = self.policy.guarantee_window;
                let Some(st) = self.leads.get_mut(lead).map(Arc::make_mut) else {
                    return;
                };
                if *release {
                    st.released_at = OptMillis::some(*at);
                    // The only `Release` deadline of a lead is at its `release_at` (set
                    // by `LeadAccepted`, cleared here and by `LeadClosed`), so it is
                    // removed by key: O(log deadlines), not a scan of every deadline of
                    // every open lead (that scan was most of a decision's cost).
                    if let Some(r) = st.release_at.take() {
                        self.deadlines.remove(&Deadline {
                            at: r,
                            seq: st.seq,
                            lead: lead.clone(),
                            due: Due::Release,
                        });
                    }
                }
                // Offers come in one or two events per lead (direct targets, then the
                // release): room for exactly these, not the doubling growth of `push`
                // (5 offers would take room for 8).
                st.offers.reserve_exact(grants.len());
                let mut expiry_armed = None;
                for g in grants {
                    // The publish decision's own offers: the direct ones and an
                    // immediate release (a later release has a later time).
                    if *at == st.accepted_at
                        && (*release || matches!(g.kind, OfferKind::Direct | OfferKind::Contact))
                    {
                        st.published_offers += 1;
                    }
                    let respond_by = match g.kind {
                        OfferKind::Contact | OfferKind::AutoBuy => None,
                        _ => response_window.map(|w| at.saturating_add(w)),
                    };
                    if let Some(t) = respond_by.filter(|&t| expiry_armed != Some(t)) {
                        expiry_armed = Some(t);
                        self.deadlines.insert(Deadline {
                            at: t,
                            seq: st.seq,
                            lead: lead.clone(),
                            due: Due::ExpireOffers,
                        });
                    }
                    let bought = g.charge.is_some();
                    let mut offer = OfferState {
                        charge: g.charge.clone().map(Box::new),
                        captured: bought,
                        ..OfferState::new(g.pro.clone(), g.kind, *at, respond_by.into())
                    };
                    // R12 for a bought lead (auto-buy, charged here at dispatch, not at
                    // the response): its guarantee runs from the purchase, as a
                    // response's runs from the response that charged it. The charge is
                    // what the guarantee covers, and "a bought contact the client never
                    // views within the window is refunded" (habitissimo policy) counts
                    // the window from the buying: a buyer who never answers gets its
                    // spend back too (the client cannot view what was never sent), and
                    // one who answers late does not stretch the window.
                    if let (true, Some(w)) = (bought, guarantee_window) {
                        let t = at.saturating_add(w);
                        offer.reply_mut().guarantee_at = OptMillis::some(t);
                        self.deadlines.insert(Deadline {
                            at: t,
                            seq: st.seq,
                            lead: lead.clone(),
                            due: Due::Guarantee(g.pro.clone()),
                        });
                    }
                    st.offers.push(offer);
                    st.budget_waitlist.retain(|p| p != &g.pro);
                    if let Some(&slot) = self.slots.get(&g.pro) {
                        if let Some(ps) = self.pros[slot as usize].as_mut() {
                            // A lead received: no longer short of budget (R22).
                            ps.budget_short_since = OptMillis::NONE;
                            ps.stats.offered += 1;
                            if ps.available(*at).is_ok() {
                                ps.stats.rate_relevant += 1;
                                // R29: one more offer that counts may move the response
                                // rate; the weight is recomputed only if it did (a pro that
                                // never answers stays at 0: nothing to do).
                                if self.policy.response_rate_share_permille > 0 {
                                    let counted = ps.stats.rate_relevant
                                        >= u64::from(self.policy.response_rate_min_offers);
                                    let rate = counted.then(|| ps.stats.response_rate_permille());
                                    if rate != ps.weight.response_rate_permille {
                                        ps.weight = rank::weight(&self.policy, &ps.pro.quality, &ps.stats);
                                        self.ring.upsert(slot, ps.weight.weight);
                                    }
                                }
                            }
                        }
                    }
                }
                st.skipped_more += u64::from(*skipped_more);
                st.skipped
                    .reserve_exact(skipped.len().min(MAX_RECORDED_SKIPS.saturating_sub(st.skipped.len())));
                for (pro, skip) in skipped {
                    if matches!(skip, Skip::BudgetExhausted { .. }) && !st.budget_waitlist.contains(pro) {
                        st.budget_waitlist.push(pro.clone());
                    }
                    if !st.skipped.iter().any(|(p, _)| p == pro) {
                        if st.skipped.len() < MAX_RECORDED_SKIPS {
                            st.skipped.push((pro.clone(), skip.clone()));
                        } else {
                            st.skipped_more += 1;
                        }
                    }
                }
                // Kept while the lead is open: no room left over from `push` doubling.
                st.budget_waitlist.shrink_to_fit();
            }
            Event::OfferOpened { lead, pro, .. } => {
                self.with_offer(lead, pro, |_, o| o.status = OfferStatus::Opened);
            }
            Event::Responded { lead, pro, at, charge } => {
                let policy = self.policy.clone();
                let mut response_time = None;
                if let Some(st) = self.leads.get_mut(lead).map(Arc::make_mut) {
                    let Some(o) = st.offer_mut(pro) else { return };
                    o.status = OfferStatus::Replied;
                    o.reply_mut().responded_at = OptMillis::some(*at);
                    response_time = Some(at.saturating_sub(o.offered_at).max(0) as u64);
                    if charge.is_some() {
                        o.charge = charge.clone().map(Box::new);
                        o.captured = matches!(charge, Some(c) if c.mode == ChargeMode::Capture);
                    }
                    let generic = o.kind.takes_a_generic_seat();
                    st.responders += 1;
                    if generic {
                        st.generic_responders += 1;
                    }
                    // R6: once the cap is reached the lead is no longer available to
                    // those who have not responded (`Shard::inactivated_by` tells which).
                    let (all_full, generic_full) =
                        st.seats_full(&policy, st.responders, st.generic_responders);
                    for o in st.offers.iter_mut().filter(|o| o.status.is_open()) {
                        if all_full || (generic_full && o.kind.takes_a_generic_seat()) {
                            o.status = OfferStatus::Inactive;
                        }
                    }
                    if let (Some(w), Some(_)) = (policy.guarantee_window, charge) {
                        let t = at.saturating_add(w);
                        if let Some(o) = st.offer_mut(pro) {
                            o.reply_mut().guarantee_at = OptMillis::some(t);
                        }
                        self.deadlines.insert(Deadline {
                            at: t,
                            seq: st.seq,
                            lead: lead.clone(),
                            due: Due::Guarantee(pro.clone()),
                        });
                    }
                }
                if let (Some(rt), Some(ps)) = (response_time, self.slot_mut(pro)) {
                    ps.stats.responded += 1;
                    ps.stats.response_time_ms_sum += rt;
                    // R29: the response rate and time feed the weight.
                    self.reweigh_pro(pro);
                }
            }
            Event::Declined { lead, pro, by, .. } => {
                self.with_offer(lead, pro, |_, o| o.status = OfferStatus::Declined);
                if *by == Party::Pro {
                    if let Some(ps) = self.slot_mut(pro) {
                        ps.stats.declined += 1;
                    }
                    self.reweigh_pro(pro);
                }
            }
            Event::OfferExpired { lead, pro, .. } => {
                self.with_offer(lead, pro, |_, o| o.status = OfferStatus::Expired);
                if let Some(ps) = self.slot_mut(pro) {
                    ps.stats.expired += 1;
                }
                self.reweigh_pro(pro);
            }
            Event::ClientReplied { lead, pro, capture, .. } => {
                self.with_offer(lead, pro, |_, o| {
                    o.status = OfferStatus::AwaitingResponse;
                    if capture.is_some() {
                        o.captured = true;
                    }
                });
            }
            Event::ProReplied { lead, pro, .. } => {
                self.with_offer(lead, pro, |_, o| o.status = OfferStatus::Replied);
            }
            Event::ClientViewed { lead, pro, .. } => {
                self.with_offer(lead, pro, |_, o| o.viewed = true);
            }
            Event::Completed { lead, pro, .. } => {
                self.with_offer(lead, pro, |_, o| o.status = OfferStatus::Completed);
            }
            Event::NoteAdded { lead, pro, text, .. } => {
                self.with_offer(lead, pro, |_, o| {
                    o.reply_mut().notes.push(text.clone());
                });
            }
            Event::Refunded { lead, pro, .. } => {
                self.with_offer(lead, pro, |_, o| o.refunded = true);
            }
            Event::LeadClosed { lead, at, .. } => {
                let retention = self.policy.idempotency_retention;
                let guarantee = self.policy.guarantee_window.unwrap_or(0);
                if let (Some(pricing), Some(st)) = (&self.policy.pricing, self.leads.get(lead)) {
                    // R11: learn proposals per lead from what this lead got (from the
                    // policy's figure the first time).
                    let mut stats = *pricing.stats(&self.key.category);
                    if let Some(learned) = self.learned_proposals_milli {
                        stats.avg_proposals_milli = learned;
                    }
                    stats.observe_proposals(st.responders, pricing.proposals_ema());
                    self.learned_proposals_milli = Some(stats.avg_proposals_milli);
                }
                let mut seq = 0;
                if let Some(st) = self.leads.get_mut(lead).map(Arc::make_mut) {
                    seq = st.seq;
                    // Release, offer expiry and close deadlines sit at times the lead
                    // state records (`release_at`, each offer's `respond_by`,
                    // `expires_at`): removed by key, no scan of every deadline.
                    let dl = |at: Millis, due: Due| Deadline { at, seq, lead: lead.clone(), due };
                    if st.closed_at.is_none() {
                        self.deadlines.remove(&dl(st.expires_at, Due::Close));
                    }
                    if let Some(r) = st.release_at.take() {
                        self.deadlines.remove(&dl(r, Due::Release));
                    }
                    st.closed_at = OptMillis::some(*at);
                    // Freed, not just emptied: a closed lead stays until it is forgotten.
                    st.budget_waitlist = Vec::new();
                    let mut expiry_removed = None;
                    for o in &mut st.offers {
                        if let Some(t) = o.respond_by.get().filter(|&t| expiry_removed != Some(t)) {
                            expiry_removed = Some(t);
                            self.deadlines.remove(&dl(t, Due::ExpireOffers));
                        }
                        if o.status.is_open() {
                            o.status = OfferStatus::Inactive;
                        }
                        if o.charge.as_ref().is_some_and(|c| c.mode == ChargeMode::Hold) && !o.captured {
                            o.charge = None; // released
                        }
                    }
                }
                let mut forget_at = at.saturating_add(retention.max(guarantee));
                if let Some(st) = self.leads.get_mut(lead).map(Arc::make_mut) {
                    // R12: forgetting the lead drops its guarantee deadlines, so it is
                    // not forgotten before the last one that can still refund: each was
                    // set by the policy in force when its charge was made, which a
                    // reload since may have shortened (the window above is today's).
                    // At one time a guarantee is handled before the forget (`Due`
                    // order), so no margin is needed. From the lead's state only: the
                    // same on replay.
                    let pending = st
                        .offers
                        .iter()
                        .filter(|o| !o.viewed && !o.refunded)
                        .filter_map(OfferState::guarantee_at)
                        .max();
                    forget_at = forget_at.max(pending.unwrap_or(forget_at));
                    st.forget_at = OptMillis::some(forget_at);
                }
                self.deadlines.insert(Deadline { at: forget_at, seq, lead: lead.clone(), due: Due::Forget });
            }
            Event::Ticked { upto } => {
                while self.deadlines.first_at().is_some_and(|at| at <= *upto) {
                    self.deadlines.pop_first();
                }
            }
            Event::LeadForgotten { lead } => {
                // What is left of a closed lead's deadlines (guarantees, the forget
                // itself) is removed by key where the state recorded their times;
                // state restored from an older snapshot falls back to a scan.
                let dl = |at: Millis, seq: u64, due: Due| Deadline { at, seq, lead: lead.clone(), due };
                let mut by_key = false;
                if let Some(st) = self.leads.remove(lead) {
                    if self.last_by_client.get(&st.lead.client.id).is_some_and(|(_, l)| l == lead) {
                        self.last_by_client.remove(&st.lead.client.id);
                    }
                    if let Some(f) = st.forget_at.get() {
                        by_key = true;
                        self.deadlines.remove(&dl(f, st.seq, Due::Forget));
                        for o in &st.offers {
                            if let Some(g) = o.guarantee_at() {
                                self.deadlines.remove(&dl(g, st.seq, Due::Guarantee(o.pro.clone())));
                            }
                        }
                    }
                }
                if let Some(r) = self.rejected.remove(lead) {
                    if let Some(f) = r.forget_at.get() {
                        by_key = true;
                        self.deadlines.remove(&dl(f, r.seq, Due::Forget));
                    }
                }
                if !by_key {
                    self.deadlines.retain(|d| d.lead != *lead);
                }
            }
        }
    }

    fn with_offer(&mut self, lead: &LeadId, pro: &ProId, f: impl FnOnce(&LeadId, &mut OfferState)) {
        if let Some(o) = self.leads.get_mut(lead).map(Arc::make_mut).and_then(|st| st.offer_mut(pro)) {
            f(lead, o);
        }
    }

    fn slot_mut(&mut self, pro: &ProId) -> Option<&mut ProSlot> {
        let &slot = self.slots.get(pro)?;
        self.pros[slot as usize].as_mut()
    }

    fn reweigh_pro(&mut self, pro: &ProId) {
        if let Some(&slot) = self.slots.get(pro) {
            self.reweigh(slot);
        }
    }

    fn reweigh(&mut self, slot: u32) {
        if let Some(ps) = self.pros[slot as usize].as_mut() {
            ps.weight = rank::weight(&self.policy, &ps.pro.quality, &ps.stats);
            self.ring.upsert(slot, ps.weight.weight);
        }
    }

    // -----------------------------------------------------------------------------
    // Queries
    // -----------------------------------------------------------------------------

    fn outcome(&self, st: &LeadState) -> LeadOutcome {
        LeadOutcome {
            lead: st.lead.id.clone(),
            status: LeadStatus::Accepted,
            price: st.price,
            offers: st
                .offers
                .iter()
                .take(st.published_offers as usize)
                .map(|o| (o.pro.clone(), o.kind))
                .collect(),
            release_at: st.published_release_at.get(),
            expires_at: Some(st.expires_at),
        }
    }

    fn view(&self, st: &LeadState, o: &OfferState, status: Option<OfferStatus>, revealed: bool) -> OfferView {
        OfferView {
            lead: st.lead.id.clone(),
            pro: o.pro.clone(),
            kind: o.kind,
            status: status.unwrap_or(o.status),
            // What the pro paid, if it did (its price then, R11: a far-away price
            // counts its distance at the charge), else what it would pay now.
            price: o.charge.as_ref().map_or_else(|| self.price_of(st, &o.pro), |c| c.credits),
            offered_at: o.offered_at,
            respond_by: o.respond_by.get(),
            contact: (revealed || o.responded_at().is_some() || o.kind == OfferKind::AutoBuy)
                .then(|| RevealedContact::for_client(&st.lead.client)),
        }
    }

    /// The offer of `lead` to `pro`, as that pro may see it (R8).
    pub fn offer_view(&self, lead: &LeadId, pro: &ProId) -> Result<OfferView, Reject> {
        let st = self.leads.get(lead).ok_or_else(|| Reject::UnknownLead(lead.clone()))?;
        let o = st.offer(pro).ok_or_else(|| Reject::NotOffered { lead: lead.clone(), pro: pro.clone() })?;
        Ok(self.view(st, o, None, false))
    }

    /// R3: ranked eligible pros for a client who wants to choose; empty with
    /// `not_enough_pros` below `min_list_size`.
    /// R3: the pros a client may choose from (each eligible for a lead of this shard at
    /// `location` with `attributes`, R4, able to pay at least the shard's cheapest
    /// price), ranked; empty with `not_enough_pros` below `min_list_size`.
    pub fn candidates(
        &self,
        now: Millis,
        location: Option<GeoPoint>,
        attributes: &[String],
        funds: &dyn Funds,
    ) -> Candidates {
        // R4's "can pay": the lead's price is not known yet, the cheapest is a bound.
        let cheapest = self.min_price();
        let can_pay = |pro: &Pro| match self.policy.charge_on {
            ChargeOn::Never => true,
            ChargeOn::Response => funds.credits(&pro.id) >= cheapest,
            ChargeOn::Dispatch => self.cannot_buy(now, pro, cheapest, funds).is_none(),
        };
        let mut list: Vec<(u32, u32)> = self
            .ring
            .iter()
            .chain(self.ring.iter_parked().map(|(slot, _)| slot))
            .filter(|&slot| {
                let ps = self.slot_pro(slot);
                let pro = &ps.pro;
                if ps.available(now).is_err() {
                    return false;
                }
                if let (Some(loc), Some(base), Some(r)) = (&location, &pro.base, pro.radius_km) {
                    if !base.within_km(loc, r) {
                        return false;
                    }
                }
                !attributes.iter().any(|a| pro.refuses.contains(a)) && can_pay(pro)
            })
            .map(|slot| (slot, self.slot_pro(slot).weight.weight))
            .collect();
        if list.len() < self.policy.min_list_size as usize {
            return Candidates { pros: vec![], reason: Some("not_enough_pros".into()) };
        }
        // Ranked by weight (quality and responsiveness), ties in rotation order.
        list.sort_by_key(|&(_, w)| std::cmp::Reverse(w));
        Candidates {
            pros: list.into_iter().map(|(slot, w)| (self.slot_pro(slot).pro.id.clone(), w)).collect(),
            reason: None,
        }
    }

    /// R28 explain: for every pro of the shard, why it was or was not offered the lead,
    /// with its ranking inputs.
    pub fn explain(&self, lead: &LeadId) -> Result<Explanation, Reject> {
        let Some(st) = self.leads.get(lead) else {
            // R2: a lead the quality gate refused is explained by its reason, for as long
            // as its publish is remembered (`expires_at` = when it is forgotten).
            let r = self.rejected.get(lead).ok_or_else(|| Reject::UnknownLead(lead.clone()))?;
            return Ok(Explanation {
                lead: lead.clone(),
                price: 0,
                price_components: None,
                responders: 0,
                max_responders: self.policy.max_responders,
                generic_cap: 0,
                release_at: None,
                expires_at: r.forget_at.get().unwrap_or(0),
                entries: Vec::new(),
                skipped_unrecorded: 0,
                rejected: Some(r.reason),
            });
        };
        let mut entries = Vec::new();
        let mut seen = BTreeSet::new();
        for o in &st.offers {
            seen.insert(o.pro.clone());
            let outcome = ExplainOutcome::Offered { kind: o.kind, status: o.status };
            entries.push(self.explain_entry(st, &o.pro, outcome, o.charge.as_ref().map(|c| c.credits)));
        }
        for (pro, skip) in &st.skipped {
            if seen.insert(pro.clone()) {
                entries.push(self.explain_entry(st, pro, ExplainOutcome::Skipped(skip.clone()), None));
            }
        }
        let pending = st.release_at.is_some();
        // A direct or contact job (R13) goes to its targets only; a lead that closed
        // before its release went to no one else either.
        let never_released = !pending && st.released_at.get().is_none();
        let released = st.released_at.get().unwrap_or(st.accepted_at);
        for slot in self.ring.iter().chain(self.ring.iter_parked().map(|(slot, _)| slot)) {
            let pro = &self.slot_pro(slot).pro;
            let id = &pro.id;
            if seen.insert(id.clone()) {
                // A pro unavailable at the release was parked, so not scanned (or it
                // would be among the recorded skips): say why, as of the release, also
                // once it has come back (its parking now says nothing of then).
                let parked =
                    (!pending && !never_released).then(|| self.parked_reason(released, slot)).flatten();
                let why = if let Some(skip) = parked {
                    ExplainOutcome::Skipped(skip)
                } else if pending {
                    ExplainOutcome::AwaitingRelease
                } else if never_released {
                    ExplainOutcome::NotReleased
                } else if st.generic_cap(&self.policy) == 0 {
                    ExplainOutcome::Skipped(Skip::NoGenericSlots)
                } else {
                    ExplainOutcome::Skipped(Skip::TurnNotReached)
                };
                entries.push(self.explain_entry(st, id, why, None));
            }
        }
        Ok(Explanation {
            lead: lead.clone(),
            price: st.price,
            price_components: st.price_components.as_deref().cloned(),
            responders: st.responders,
            max_responders: self.policy.max_responders,
            generic_cap: st.generic_cap(&self.policy),
            release_at: st.release_at.get(),
            expires_at: st.expires_at,
            entries,
            skipped_unrecorded: st.skipped_more,
            rejected: None,
        })
    }

    /// Why a parked pro is ineligible at `at` (availability or auto-buy configs).
    fn parked_reason(&self, at: Millis, slot: u32) -> Option<Skip> {
        let ps = self.slot_pro(slot);
        if let Err(u) = ps.available(at) {
            return Some(u.into());
        }
        if self.policy.charge_on == ChargeOn::Dispatch {
            let mut covering = ps.pro.autobuy.iter().filter(|c| c.covers(&self.key.zone, &self.key.category));
            if covering.clone().next().is_none() {
                return Some(Skip::NoAutoBuyConfig);
            }
            if !covering.any(|c| c.is_buying(at)) {
                return Some(Skip::AutoBuyPaused);
            }
        }
        None
    }

    /// `charged`: what the pro paid for the lead, if it did (its price then, whatever
    /// its distance now).
    fn explain_entry(
        &self,
        st: &LeadState,
        pro: &ProId,
        outcome: ExplainOutcome,
        charged: Option<u64>,
    ) -> ExplainEntry {
        let ps = self.pro(pro);
        ExplainEntry {
            pro: pro.clone(),
            outcome,
            price: charged.or_else(|| ps.map(|p| Self::price_for(st, &p.pro))).filter(|&c| c != st.price),
            weight: ps.map(|p| p.weight.clone()),
            response_rate_permille: ps.map(|p| p.stats.response_rate_permille()),
            mean_response_time_ms: ps.and_then(|p| p.stats.mean_response_time_ms()),
        }
    }

    /// R18: a pro's offers whose client name (once revealed), description, details or
    /// notes contain `query` (case-insensitive), newest first.
    pub fn search(&self, pro: &ProId, query: &str) -> Vec<OfferView> {
        let q = query.to_lowercase();
        let mut hits: Vec<OfferView> = self
            .leads
            .values()
            .filter_map(|st| {
                // R13: contact jobs reach the pro on the notification channel only,
                // never in its job list.
                let o = st.offer(pro).filter(|o| o.kind != OfferKind::Contact)?;
                let l = &st.lead;
                let revealed = o.responded_at().is_some();
                let hit = q.is_empty()
                    || (revealed && l.client.name.to_lowercase().contains(&q))
                    || l.description.to_lowercase().contains(&q)
                    || l.details.values().any(|v| v.to_lowercase().contains(&q))
                    || o.notes().iter().any(|n| n.to_lowercase().contains(&q));
                hit.then(|| self.view(st, o, None, false))
            })
            .collect();
        hits.sort_by(|a, b| (b.offered_at, &b.lead).cmp(&(a.offered_at, &a.lead)));
        hits
    }

    /// Every pro in the shard's rotation (parked ones included), in no particular order.
    pub fn pro_ids(&self) -> impl Iterator<Item = &ProId> {
        self.slots.keys()
    }

    /// Offered counts (lifetime), weights and whether parked out of the rotation now,
    /// of every pro, for the fairness figure.
    pub fn fairness_inputs(&self) -> impl Iterator<Item = (&ProId, u64, u32, bool)> {
        self.pros.iter().flatten().map(|p| {
            let parked = self.slots.get(&p.pro.id).is_some_and(|&slot| self.ring.is_parked(slot));
            (&p.pro.id, p.stats.offered, p.weight.weight, parked)
        })
    }

    /// Removes `pro`'s grant from an `Offered` event whose budget spend lost a race
    /// with another shard: the pro keeps its rotation turn (it moves from taken to
    /// skipped) and waits for the retry window (R22).
    pub fn drop_grant(&self, ev: &mut Event, pro: &ProId, skip: Skip) {
        if let Event::Offered { grants, rotation, skipped, .. } = ev {
            grants.retain(|g| &g.pro != pro);
            if let Some(&slot) = self.slots.get(pro) {
                if let Some(i) = rotation.taken.iter().position(|&s| s == slot) {
                    rotation.taken.remove(i);
                    rotation.skipped.push(slot);
                }
            }
            skipped.push((pro.clone(), skip));
        }
    }

    /// Internal consistency, checked by tests after every step.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.ring.check_invariants()?;
        if self.ring.len() != self.slots.len() {
            return Err(format!("{} pros but {} in the ring", self.slots.len(), self.ring.len()));
        }
        // Deadlines are removed by key when a lead closes and is forgotten: a leak here
        // would mean a key computed differently from the one inserted.
        for d in self.deadlines.iter() {
            if !self.leads.contains_key(&d.lead) && !self.rejected.contains_key(&d.lead) {
                return Err(format!("deadline {:?} at {} of a forgotten lead {}", d.due, d.at, d.lead));
            }
            if d.due == Due::Release
                && self.leads.get(&d.lead).and_then(|st| st.release_at.get()) != Some(d.at)
            {
                return Err(format!("release deadline of lead {} at {} is not its release_at", d.lead, d.at));
            }
        }
        for st in self.leads.values() {
            let max = self.policy.max_responders;
            if st.responders > max {
                return Err(format!("lead {} has {} responders > cap {}", st.lead.id, st.responders, max));
            }
            if st.generic_responders > st.generic_cap(&self.policy) {
                return Err(format!("lead {} exceeds its generic cap", st.lead.id));
            }
            let mut pros = BTreeSet::new();
            for o in &st.offers {
                if !pros.insert(&o.pro) {
                    return Err(format!("lead {} offered twice to {}", st.lead.id, o.pro));
                }
            }
            if self.policy.mode == DispatchMode::AutoBuy {
                let bought = st.offers.iter().filter(|o| o.kind == OfferKind::AutoBuy).count();
                if bought > self.policy.group_size as usize {
                    return Err(format!("lead {} bought by {} > group size", st.lead.id, bought));
                }
            }
            let responded = st.offers.iter().filter(|o| o.responded_at().is_some()).count() as u32;
            if responded != st.responders {
                return Err(format!(
                    "lead {} counts {} responders, offers say {}",
                    st.lead.id, st.responders, responded
                ));
            }
        }
        Ok(())
    }
}

/// A read-only funds view that subtracts what this decision already spent.
struct SpentFunds<'a> {
    inner: &'a dyn Funds,
    /// Budget already spent per pro and auto-buy config by the decision being made.
    spent: &'a FxHashMap<(ProId, SmolStr), u64>,
}

impl Funds for SpentFunds<'_> {
    fn credits(&self, pro: &ProId) -> u64 {
        self.inner.credits(pro)
    }
    fn budget(&self, pro: &ProId, config: &str) -> u64 {
        let b = self.inner.budget(pro, config);
        // No allocation for the lookup of a pro that spent nothing in this decision.
        if self.spent.is_empty() {
            return b;
        }
        b.saturating_sub(self.spent.get(&(pro.clone(), SmolStr::new(config))).copied().unwrap_or(0))
    }
}

/// `<kind>:<lead>:<pro>`, the ledger op id of a money intent, built without the
/// formatting machinery (inline, no allocation, up to 23 bytes).
fn op_id(kind: &str, lead: &LeadId, pro: &ProId) -> SmolStr {
    let mut op = smol_str::SmolStrBuilder::new();
    op.push_str(kind);
    op.push(':');
    op.push_str(lead.as_str());
    op.push(':');
    op.push_str(pro.as_str());
    op.finish()
}

fn done(events: Vec<Event>) -> Decision {
    Decision { events, reply: Reply::Done }
}

fn rejected_outcome(id: &LeadId, reason: RejectReason) -> LeadOutcome {
    LeadOutcome {
        lead: id.clone(),
        status: LeadStatus::Rejected(reason),
        price: 0,
        offers: vec![],
        release_at: None,
        expires_at: None,
    }
}

/// R11: the price components a purchase or a release needs from a publish's
/// `LeadAccepted`: only for a far-away price (a discount and a located lead).
fn far_components(accepted: &Event) -> Option<Box<crate::pricing::PriceComponents>> {
    match accepted {
        Event::LeadAccepted { price_components: Some(c), lead, .. }
            if c.far_away_pro_discount_permille > 0 && lead.location.is_some() =>
        {
            Some(Box::new(c.clone()))
        }
        _ => None,
    }
}

fn provisional(
    lead: Arc<Lead>,
    fingerprint: u64,
    price: u64,
    price_components: Option<Box<crate::pricing::PriceComponents>>,
    at: Millis,
    expires_at: Millis,
) -> LeadState {
    LeadState {
        seq: 0,
        lead,
        fingerprint,
        price,
        accepted_at: at,
        release_at: OptMillis::NONE,
        expires_at,
        closed_at: OptMillis::NONE,
        offers: Vec::new(),
        responders: 0,
        generic_responders: 0,
        skipped: Vec::new(),
        budget_waitlist: Vec::new(),
        published_release_at: OptMillis::NONE,
        published_offers: 0,
        price_components,
        forget_at: OptMillis::NONE,
        skipped_more: 0,
        released_at: OptMillis::NONE,
        direct_seats: None,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidates {
    /// Pro ids with their rotation weight, best first.
    pub pros: Vec<(ProId, u32)>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum ExplainOutcome {
    Offered {
        kind: OfferKind,
        status: OfferStatus,
    },
    Skipped(Skip),
    AwaitingRelease,
    /// The lead goes to no one beyond its targets: a `direct` or `contact` job (R13),
    /// a lead whose direct targets hold every seat (R6), or one that closed before its
    /// release.
    NotReleased,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExplainEntry {
    pub pro: ProId,
    #[serde(flatten)]
    pub outcome: ExplainOutcome,
    /// What this pro pays for the lead when it differs from the lead's price: the
    /// far-away price of a pro farther than `far_away_km` from the lead (R11); for a
    /// pro charged already, what it was charged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<u64>,
    pub weight: Option<WeightBreakdown>,
    pub response_rate_permille: Option<u32>,
    pub mean_response_time_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Explanation {
    pub lead: LeadId,
    pub price: u64,
    /// R11: why the lead costs what it costs.
    pub price_components: Option<crate::pricing::PriceComponents>,
    pub responders: u32,
    pub max_responders: u32,
    pub generic_cap: u32,
    pub release_at: Option<Millis>,
    pub expires_at: Millis,
    pub entries: Vec<ExplainEntry>,
    /// Pros scanned and skipped past [`MAX_RECORDED_SKIPS`]: counted, not listed (they
    /// appear above as `turn_not_reached`).
    #[serde(default)]
    pub skipped_unrecorded: u64,
    /// R2: the quality gate's reason, for a lead that was refused (then nothing else is
    /// set: no price, no entries).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rejected: Option<RejectReason>,
}

#[cfg(test)]
mod test_support {
    //! Fixtures shared by this file's test modules: a one-shard tenant, its pros, leads.
    use super::*;
    use crate::ids::{CategoryId, TenantId, ZoneId};

    pub const T0: Millis = 1_795_424_400_000;

    /// The shard `t / bologna / painting` under the policy `toml`.
    pub fn shard_with(toml: &str) -> Shard {
        let key = ShardKey {
            tenant: TenantId::new("t"),
            zone: ZoneId::new("bologna"),
            category: CategoryId::new("painting"),
        };
        Shard::new(key, Arc::new(Policy::from_toml(toml).expect("test policy is valid")))
    }

    pub fn pro(id: &str) -> Pro {
        Pro {
            id: ProId::new(id),
            categories: vec![CategoryId::new("painting")],
            zones: vec![ZoneId::new("bologna")],
            base: None,
            radius_km: None,
            quality: Quality::default(),
            refuses: vec![],
            availability: Availability::default(),
            autobuy: vec![],
        }
    }

    pub fn lead(n: u32, now: Millis) -> Lead {
        Lead {
            id: LeadId::new(format!("L{n}")),
            category: CategoryId::new("painting"),
            zone: ZoneId::new("bologna"),
            location: None,
            description: "Tinteggiatura di un appartamento di 80 mq".into(),
            details: Default::default(),
            attributes: vec![],
            client: Client {
                id: ClientId::new(format!("c{n}")),
                name: "Anna".into(),
                phone: "+39 333".into(),
                phone_verified: true,
                contact: ContactPrefs { call: true, whatsapp: false, chat: true },
                address: None,
                pro_id: None,
            },
            direct: vec![],
            kind: JobKind::Match,
            created_at: now,
        }
    }
}

#[cfg(test)]
mod parking_tests {
    use super::test_support::*;
    use super::*;
    use crate::ids::DAY_MS;

    fn shard() -> Shard {
        shard_with(
            "tenant = \"t\"\nmode = \"matched\"\n[leads]\noffer_fanout = 1\nduplicate_window_s = 0\n\
             [money]\ncharge_on = \"never\"\n",
        )
    }

    fn run(s: &mut Shard, log: &mut Vec<Event>, now: Millis, cmd: Command) -> Decision {
        let d = s.decide(now, &cmd, &Unlimited).expect("valid command");
        for ev in &d.events {
            s.apply(ev);
            log.push(ev.clone());
        }
        s.check_invariants().expect("invariants hold after every step");
        d
    }

    fn publish(s: &mut Shard, log: &mut Vec<Event>, n: u32, now: Millis) -> (Vec<String>, Vec<String>) {
        let d = run(s, log, now, Command::PublishLead { lead: lead(n, now).into() });
        let mut got = (vec![], vec![]);
        for ev in &d.events {
            if let Event::Offered { grants, skipped, .. } = ev {
                got.0.extend(grants.iter().map(|g| g.pro.to_string()));
                got.1.extend(skipped.iter().map(|(p, _)| p.to_string()));
            }
        }
        got
    }

    #[test]
    fn r16_pro_on_vacation_is_not_scanned_and_returns_with_one_early_lead() {
        let (mut s, mut log) = (shard(), Vec::new());
        for id in ["e1", "e2", "e3"] {
            run(&mut s, &mut log, T0, Command::UpsertPro { pro: pro(id) });
        }
        let back = T0 + 3 * DAY_MS;
        let availability = Availability { vacation: Some((T0, back)), ..Default::default() };
        run(&mut s, &mut log, T0, Command::SetAvailability { pro: ProId::new("e1"), availability });
        // The first lead scans e1, skips it and parks it until the vacation ends.
        assert_eq!(publish(&mut s, &mut log, 1, T0 + 1), (vec!["e2".into()], vec!["e1".into()]));
        assert_eq!(s.parked_pros(), 1);
        // Later leads do not look at it at all.
        for n in 2..=4 {
            let (_, skipped) = publish(&mut s, &mut log, n, T0 + i64::from(n));
            assert!(skipped.is_empty(), "lead {n} scanned a parked pro: {skipped:?}");
        }
        // Back: the first decision after the end sees it again, with one lead early
        // (max_catch_up_turns = 1), then the rotation is strictly cyclic (e1, just
        // served, after the two others at the same pass: not twice in a row).
        let got: Vec<String> =
            (5..=10).map(|n| publish(&mut s, &mut log, n, back + i64::from(n)).0[0].clone()).collect();
        assert_eq!(got, ["e1", "e2", "e3", "e1", "e2", "e3"]);
        assert_eq!(s.parked_pros(), 0);
        // Replay of the log reproduces the shard, parking included.
        let mut replayed = shard();
        for ev in &log {
            replayed.apply(ev);
        }
        assert_eq!(replayed, s);
    }

    #[test]
    fn r4_pro_outside_its_schedule_is_parked_until_the_window_opens_and_returns_on_time() {
        use crate::core::model::{WeeklyInterval, WeeklyWindows};
        use crate::ids::HOUR_MS;
        let (mut s, mut log) = (shard(), Vec::new());
        for id in ["e1", "e2", "e3"] {
            run(&mut s, &mut log, T0, Command::UpsertPro { pro: pro(id) });
        }
        // e1 works 10:00-11:00 UTC every day.
        let days = [
            Weekday::Mon,
            Weekday::Tue,
            Weekday::Wed,
            Weekday::Thu,
            Weekday::Fri,
            Weekday::Sat,
            Weekday::Sun,
        ];
        let schedule = WeeklyWindows {
            time_zone: "UTC".into(),
            intervals: days.iter().map(|&day| WeeklyInterval { day, start_min: 600, end_min: 660 }).collect(),
        };
        let availability = Availability { schedule: Some(schedule), ..Default::default() };
        run(&mut s, &mut log, T0, Command::SetAvailability { pro: ProId::new("e1"), availability });
        let midnight = T0 - T0.rem_euclid(DAY_MS) + DAY_MS;
        let (closed, opens) = (midnight + 8 * HOUR_MS, midnight + 10 * HOUR_MS);
        // The first lead scans e1, skips it and parks it until 10:00.
        let (_, skipped) = publish(&mut s, &mut log, 1, closed);
        assert_eq!(skipped, vec!["e1".to_string()]);
        assert_eq!(s.parked_pros(), 1);
        for n in 2..=4 {
            let (_, skipped) = publish(&mut s, &mut log, n, closed + i64::from(n) * 60_000);
            assert!(skipped.is_empty(), "lead {n} scanned a pro outside its schedule: {skipped:?}");
        }
        // A minute before the window it is still away; at 10:00 it is back.
        let (granted, _) = publish(&mut s, &mut log, 5, opens - 60_000);
        assert_ne!(granted, vec!["e1".to_string()]);
        assert_eq!(s.parked_pros(), 1);
        let (granted, _) = publish(&mut s, &mut log, 6, opens);
        assert_eq!(granted, vec!["e1".to_string()], "back the moment its window opens");
        assert_eq!(s.parked_pros(), 0);
        // After the window, when its turn comes, it is skipped and parked again until
        // the next day's window.
        let skipped: Vec<String> =
            (7..=9).flat_map(|n| publish(&mut s, &mut log, n, opens + HOUR_MS + i64::from(n)).1).collect();
        assert_eq!(skipped, vec!["e1".to_string()]);
        assert_eq!(s.parked_pros(), 1);
        let (granted, _) = publish(&mut s, &mut log, 10, opens + DAY_MS);
        assert_eq!(granted, vec!["e1".to_string()]);
        // Replay of the log reproduces the shard, parking included.
        let mut replayed = shard();
        for ev in &log {
            replayed.apply(ev);
        }
        assert_eq!(replayed, s);
    }

    #[test]
    fn r16_parked_pro_comes_back_when_its_availability_changes() {
        let (mut s, mut log) = (shard(), Vec::new());
        for id in ["e1", "e2"] {
            run(&mut s, &mut log, T0, Command::UpsertPro { pro: pro(id) });
        }
        let paused = Availability { paused_until: Some(T0 + 30 * DAY_MS), ..Default::default() };
        run(&mut s, &mut log, T0, Command::SetAvailability { pro: ProId::new("e1"), availability: paused });
        publish(&mut s, &mut log, 1, T0 + 1);
        assert_eq!(s.parked_pros(), 1);
        let e = s.explain(&LeadId::new("L1")).expect("lead is known");
        assert!(e
            .entries
            .iter()
            .any(|x| x.pro.as_str() == "e1" && x.outcome == ExplainOutcome::Skipped(Skip::Paused)));
        let publish2 = publish(&mut s, &mut log, 2, T0 + 2);
        assert_eq!(publish2.1, Vec::<String>::new());
        let e = s.explain(&LeadId::new("L2")).expect("lead is known");
        assert!(
            e.entries
                .iter()
                .any(|x| x.pro.as_str() == "e1" && x.outcome == ExplainOutcome::Skipped(Skip::Paused)),
            "explain names the reason of a parked pro: {e:?}"
        );
        run(
            &mut s,
            &mut log,
            T0 + 3,
            Command::SetAvailability { pro: ProId::new("e1"), availability: Availability::default() },
        );
        assert_eq!(s.parked_pros(), 0);
        assert_eq!(publish(&mut s, &mut log, 3, T0 + 4).0, vec!["e1".to_string()]);
    }
}

#[cfg(test)]
mod expiry_tests {
    use super::test_support::*;
    use super::*;
    use crate::ids::HOUR_MS;

    fn shard() -> Shard {
        shard_with(
            "tenant = \"t\"\nmode = \"matched\"\n[leads]\noffer_fanout = 3\nresponse_window_s = 3600\n\
             duplicate_window_s = 0\n[money]\ncharge_on = \"never\"\n",
        )
    }

    fn run(s: &mut Shard, now: Millis, cmd: Command) -> Vec<Event> {
        let d = s.decide(now, &cmd, &Unlimited).expect("valid command");
        for ev in &d.events {
            s.apply(ev);
        }
        s.check_invariants().expect("invariants hold after every step");
        d.events
    }

    fn expired(events: &[Event]) -> Vec<&str> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::OfferExpired { pro, .. } => Some(pro.as_str()),
                _ => None,
            })
            .collect()
    }

    fn setup() -> Shard {
        let mut s = shard();
        // Joined out of id order: the rotation offers c, a, b.
        for id in ["c", "a", "b"] {
            run(&mut s, T0, Command::UpsertPro { pro: pro(id) });
        }
        run(&mut s, T0, Command::PublishLead { lead: lead(1, T0).into() });
        s
    }

    #[test]
    fn r15_offers_of_one_release_share_one_expiry_deadline_and_expire_in_pro_order() {
        let mut s = setup();
        let st = s.lead(&LeadId::new("L1")).unwrap();
        assert_eq!(st.offers.len(), 3);
        assert_eq!(st.offers.capacity(), 3, "the offer list is sized exactly");
        let expiries = s.deadlines.iter().filter(|d| d.due == Due::ExpireOffers).count();
        assert_eq!(expiries, 1);
        assert_eq!(s.deadlines.len(), 2, "the close and one response window");
        // `b` answers: only `a` and `c` expire, in pro-id order.
        run(
            &mut s,
            T0 + 1,
            Command::Offer { lead: LeadId::new("L1"), pro: ProId::new("b"), action: OfferAction::Respond },
        );
        let events = run(&mut s, T0 + HOUR_MS, Command::Tick);
        assert_eq!(expired(&events), ["a", "c"]);
        assert!(!s.deadlines.iter().any(|d| d.due == Due::ExpireOffers));
    }

    #[test]
    fn r15_per_offer_expiry_deadlines_of_older_snapshots_still_expire_the_offers() {
        let mut s = setup();
        // The state an older release would have snapshotted: one deadline per offer.
        let d = s.deadlines.iter().find(|d| d.due == Due::ExpireOffers).unwrap();
        s.deadlines.remove(&d);
        for pro in ["c", "a", "b"] {
            s.deadlines.insert(Deadline { due: Due::ExpireOffer(ProId::new(pro)), ..d.clone() });
        }
        let bytes = rmp_serde::to_vec(&s).unwrap();
        let mut back: Shard = rmp_serde::from_slice(&bytes).unwrap();
        back.restore(s.policy().clone());
        back.check_invariants().unwrap();
        assert_eq!(back.deadlines.len(), 2, "converted to one deadline per release");
        let events = run(&mut back, T0 + HOUR_MS, Command::Tick);
        assert_eq!(expired(&events), ["a", "b", "c"]);
        // It ends where a shard that never went through the old format ends.
        let mut fresh = setup();
        run(&mut fresh, T0 + HOUR_MS, Command::Tick);
        assert_eq!(back, fresh);
    }

    /// The offer as earlier releases declared it, fields inline: snapshots must keep
    /// this form whatever the offer's layout in memory.
    #[derive(Serialize)]
    struct FlatOffer {
        pro: ProId,
        kind: OfferKind,
        status: OfferStatus,
        offered_at: Millis,
        respond_by: Option<Millis>,
        responded_at: Option<Millis>,
        charge: Option<Box<Charge>>,
        captured: bool,
        viewed: bool,
        refunded: bool,
        notes: Box<[String]>,
        guarantee_at: Option<Millis>,
    }

    #[test]
    fn offers_serialise_as_the_flat_record_of_earlier_releases_and_back() {
        let mut s = setup();
        let l1 = LeadId::new("L1");
        let (b, note) = (ProId::new("b"), "call back after 6 pm".to_string());
        run(
            &mut s,
            T0 + 1,
            Command::Offer { lead: l1.clone(), pro: b.clone(), action: OfferAction::Respond },
        );
        let add = OfferAction::AddNote { text: note.clone() };
        run(&mut s, T0 + 2, Command::Offer { lead: l1.clone(), pro: b.clone(), action: add });
        let st = s.lead(&l1).unwrap();
        assert_eq!(std::mem::size_of::<OfferState>(), 64);
        for o in &st.offers {
            let answered = o.pro == b;
            assert_eq!(o.responded_at(), answered.then_some(T0 + 1));
            assert_eq!(o.notes().len(), usize::from(answered));
            let flat = FlatOffer {
                pro: o.pro.clone(),
                kind: o.kind,
                status: o.status,
                offered_at: o.offered_at,
                respond_by: o.respond_by.get(),
                responded_at: answered.then_some(T0 + 1),
                charge: o.charge.clone(),
                captured: o.captured,
                viewed: o.viewed,
                refunded: o.refunded,
                notes: if answered { vec![note.clone()].into() } else { Box::default() },
                guarantee_at: o.guarantee_at(),
            };
            assert_eq!(rmp_serde::to_vec(o).unwrap(), rmp_serde::to_vec(&flat).unwrap());
            assert_eq!(serde_json::to_value(o).unwrap(), serde_json::to_value(&flat).unwrap());
            let back: OfferState = rmp_serde::from_slice(&rmp_serde::to_vec(&flat).unwrap()).unwrap();
            assert_eq!(&back, o);
        }
        let mut back: Shard = rmp_serde::from_slice(&rmp_serde::to_vec(&s).unwrap()).unwrap();
        back.restore(s.policy().clone());
        back.check_invariants().unwrap();
        assert_eq!(back, s);
    }
}

#[cfg(test)]
mod responsiveness_tests {
    use super::test_support::*;
    use super::*;

    /// R29 in the rotation: of two equal pros offered leads one at a time, the one that
    /// answers every offer gets more of the later leads than the one that answers none
    /// (100 : 80 by weight, once ten offers each count).
    #[test]
    fn r29_a_pro_that_answers_its_offers_gets_more_leads_than_one_that_never_does() {
        let mut s = shard_with(
            "tenant = \"t\"\nmode = \"shared\"\n[leads]\noffer_fanout = 1\nduplicate_window_s = 0\n",
        );
        for id in ["a", "b"] {
            let d = s.decide(T0, &Command::UpsertPro { pro: pro(id) }, &Unlimited).expect("valid");
            d.events.iter().for_each(|ev| s.apply(ev));
        }
        let mut offered = std::collections::BTreeMap::<String, u32>::new();
        for n in 1..=200u32 {
            let now = T0 + Millis::from(n) * 1000;
            let d = s
                .decide(now, &Command::PublishLead { lead: lead(n, now).into() }, &Unlimited)
                .expect("valid");
            d.events.iter().for_each(|ev| s.apply(ev));
            let got: Vec<ProId> = d
                .events
                .iter()
                .filter_map(|e| match e {
                    Event::Offered { grants, .. } => Some(grants.iter().map(|g| g.pro.clone())),
                    _ => None,
                })
                .flatten()
                .collect();
            assert_eq!(got.len(), 1, "one pro per lead");
            if got[0].as_str() == "a" {
                let respond = Command::Offer {
                    lead: LeadId::new(format!("L{n}")),
                    pro: got[0].clone(),
                    action: OfferAction::Respond,
                };
                let d = s.decide(now + 60_000, &respond, &Unlimited).expect("a responds");
                d.events.iter().for_each(|ev| s.apply(ev));
            }
            if n > 40 {
                *offered.entry(got[0].to_string()).or_default() += 1;
            }
            s.check_invariants().expect("invariants hold");
        }
        let (a, b) = (offered["a"], offered["b"]);
        assert!(a > b + b / 10, "the responsive pro gets the larger share: a {a}, b {b}");
        assert_eq!(s.slot_pro(s.slots[&ProId::new("b")]).weight.response_rate_permille, Some(0));
    }
}

#[cfg(test)]
mod departed_tests {
    use super::test_support::*;
    use super::*;

    /// Decides `cmd` at `now` (it must be valid), applies its events, checks the
    /// shard's invariants.
    fn run(s: &mut Shard, now: Millis, cmd: Command) -> Decision {
        let d = s.decide(now, &cmd, &Unlimited).expect("valid");
        d.events.iter().for_each(|ev| s.apply(ev));
        s.check_invariants().expect("invariants hold");
        d
    }

    /// R14, R15: declines lower a pro's ranking, and leaving the shard (a profile sent
    /// without this zone) and coming back does not wipe them.
    #[test]
    fn r14_r15_declines_survive_leaving_and_rejoining_a_shard() {
        let mut s = shard_with(
            "tenant = \"t\"\nmode = \"shared\"\n[leads]\noffer_fanout = \"all\"\nduplicate_window_s = 0\n",
        );
        run(&mut s, T0, Command::UpsertPro { pro: pro("a") });
        let fresh = s.slot_pro(s.slots[&ProId::new("a")]).weight.weight;
        for n in 1..=3u32 {
            let now = T0 + Millis::from(n) * 1000;
            run(&mut s, now, Command::PublishLead { lead: lead(n, now).into() });
            let decline = OfferAction::Decline { by: Party::Pro };
            run(
                &mut s,
                now + 1,
                Command::Offer { lead: LeadId::new(format!("L{n}")), pro: ProId::new("a"), action: decline },
            );
        }
        let lowered = s.slot_pro(s.slots[&ProId::new("a")]).weight.weight;
        assert!(lowered < fresh, "three declines lower the weight: {fresh} -> {lowered}");
        run(&mut s, T0 + 10_000, Command::LeaveShard { pro: ProId::new("a") });
        run(&mut s, T0 + 20_000, Command::UpsertPro { pro: pro("a") });
        let back = s.slot_pro(s.slots[&ProId::new("a")]).weight.clone();
        assert_eq!((back.weight, back.declines), (lowered, 3), "remembered across the absence");
        // Removed from the tenant, its history goes too (nothing kept for it).
        run(&mut s, T0 + 30_000, Command::RemovePro { pro: ProId::new("a") });
        assert!(s.departed.is_empty());
        run(&mut s, T0 + 40_000, Command::UpsertPro { pro: pro("a") });
        assert_eq!(s.slot_pro(s.slots[&ProId::new("a")]).weight.weight, fresh, "a fresh start");
    }

    /// Churn (a zone dropped and added back, a pro removed and added again) reuses the
    /// slots left free: the slot table and the ring stay the size of the shard's pros,
    /// and a shard restored from a snapshot reuses the same slots as the one that
    /// wrote it, so the log's selections name the same pros on replay.
    #[test]
    fn pros_leaving_and_coming_back_reuse_free_slots_the_same_way_after_a_restore() {
        let mut s = shard_with(
            "tenant = \"t\"\nmode = \"shared\"\n[leads]\noffer_fanout = 2\nduplicate_window_s = 0\n",
        );
        for id in ["a", "b", "c", "d"] {
            run(&mut s, T0, Command::UpsertPro { pro: pro(id) });
        }
        for n in 1..=500u32 {
            let now = T0 + Millis::from(n) * 1000;
            run(&mut s, now, Command::LeaveShard { pro: ProId::new("b") });
            run(&mut s, now, Command::RemovePro { pro: ProId::new("d") });
            run(&mut s, now + 1, Command::UpsertPro { pro: pro("d") });
            run(&mut s, now + 1, Command::UpsertPro { pro: pro("b") });
            run(&mut s, now + 2, Command::PublishLead { lead: lead(n, now + 2).into() });
        }
        assert_eq!((s.pros.len(), s.ring.slot_capacity(), s.pro_count()), (4, 4, 4));

        // Two slots free, then a restore: the copy takes the same slots for newcomers.
        run(&mut s, T0 + crate::ids::DAY_MS, Command::RemovePro { pro: ProId::new("c") });
        run(&mut s, T0 + crate::ids::DAY_MS, Command::LeaveShard { pro: ProId::new("a") });
        let mut back: Shard = rmp_serde::from_slice(&rmp_serde::to_vec(&s).unwrap()).unwrap();
        back.restore(s.policy().clone());
        for id in ["e", "f", "g"] {
            run(&mut s, T0 + crate::ids::DAY_MS + 1, Command::UpsertPro { pro: pro(id) });
            run(&mut back, T0 + crate::ids::DAY_MS + 1, Command::UpsertPro { pro: pro(id) });
            assert_eq!(s.slots[&ProId::new(id)], back.slots[&ProId::new(id)], "{id}");
        }
        assert_eq!((s.slots[&ProId::new("e")], s.slots[&ProId::new("f")], s.pros.len()), (0, 2, 5));
        assert_eq!(s, back);
    }

    /// R22, R24: a park that a release before times were bounded made for a config
    /// paused "for ever" (`i64::MAX`, read as the "until budget comes back" mark), in
    /// its snapshot or log, is no shortage of budget: once the pause is lifted, a retry
    /// does not buy the pro the leads released while it was paused.
    #[test]
    fn r22_r24_an_old_budget_park_of_a_pause_for_ever_is_not_retried_once_lifted() {
        let mut s = shard_with(
            "tenant = \"t\"\nmode = \"auto_buy\"\n[autobuy]\ngroup_size = 2\nretry_window_s = 86400\n\
             [money]\ncharge_on = \"dispatch\"\nflat_price_credits = 10\n",
        );
        let buying = |id: &str, paused_until: Option<Millis>| {
            let mut p = pro(id);
            p.autobuy = vec![crate::core::model::AutoBuyConfig {
                name: "week".into(),
                zones: p.zones.clone(),
                categories: p.categories.clone(),
                weekly_budget_credits: 1_000,
                max_price_credits: None,
                active: true,
                paused_until,
            }];
            p
        };
        run(&mut s, T0, Command::UpsertPro { pro: buying("anna", None) });
        // As an older release logged it.
        let paused = Arc::new(buying("bruno", Some(Millis::MAX)));
        s.apply(&Event::ProUpserted { pro: paused, at: T0, reuse_slot: true });
        let at = T0 + 1000;
        run(&mut s, at, Command::PublishLead { lead: lead(1, at).into() });
        // The park that release made: until budget comes back, since the release.
        let bruno = s.slots[&ProId::new("bruno")];
        let old_park =
            ring::Selection { parked: vec![(bruno, Some(ring::UNTIL_BUDGET))], ..Default::default() };
        s.ring.commit_at(&old_park, at, s.policy.max_catch_up_turns);
        assert_eq!(s.budget_parked_pros(), 1);

        run(&mut s, at + 1000, Command::UpsertPro { pro: buying("bruno", None) });
        let d = run(&mut s, at + 2000, Command::BudgetAvailable { pros: vec![ProId::new("bruno")] });
        let bought: Vec<&ProId> = d
            .events
            .iter()
            .filter_map(|ev| match ev {
                Event::Offered { grants, .. } => Some(grants.iter().map(|g| &g.pro)),
                _ => None,
            })
            .flatten()
            .collect();
        assert!(bought.is_empty(), "bruno bought a lead released while it was paused: {bought:?}");
    }

    /// A log written before slots were reused: a pro that joined after another left
    /// took a new slot at the end, and the selections logged after it name that slot.
    /// Such a record (without `reuse_slot`) replays the same way; this release's
    /// records reuse the free slot.
    #[test]
    fn a_pro_joining_in_a_record_from_before_slot_reuse_takes_a_new_slot_as_it_did() {
        let mut s = shard_with("tenant = \"t\"\nmode = \"shared\"\n");
        for id in ["a", "b", "c"] {
            run(&mut s, T0, Command::UpsertPro { pro: pro(id) });
        }
        run(&mut s, T0, Command::RemovePro { pro: ProId::new("b") });
        let ev = Event::ProUpserted { pro: Arc::new(pro("d")), at: T0, reuse_slot: false };
        let mut bytes = rmp_serde::to_vec(&ev).unwrap();
        assert_eq!((bytes.pop(), bytes[0]), (Some(0xc2), 0x94), "an array ending in `false`");
        bytes[0] = 0x93;
        let old: Event = rmp_serde::from_slice(&bytes).expect("an older record loads");
        assert_eq!(old, ev);
        s.apply(&old);
        s.check_invariants().expect("invariants hold");
        assert_eq!(s.slots[&ProId::new("d")], 3, "a new slot, as the release that logged it gave");
        run(&mut s, T0, Command::UpsertPro { pro: pro("e") });
        assert_eq!(s.slots[&ProId::new("e")], 1, "this release's records reuse the free slot");
    }
}

#[cfg(test)]
mod fanout_bound_tests {
    use super::test_support::*;
    use super::*;

    fn granted(events: &[Event]) -> Vec<ProId> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Offered { grants, .. } => Some(grants.iter().map(|g| g.pro.clone())),
                _ => None,
            })
            .flatten()
            .collect()
    }

    #[test]
    fn r6a_fanout_all_stops_at_the_release_bound_and_the_next_lead_starts_where_it_stopped() {
        let mut s = shard_with(
            "tenant = \"t\"\nmode = \"shared\"\n[leads]\noffer_fanout = \"all\"\nduplicate_window_s = 0\n",
        );
        let over = 50;
        let ids: Vec<ProId> =
            (0..MAX_OFFERS_PER_RELEASE + over).map(|i| ProId::new(format!("p{i:05}"))).collect();
        for id in &ids {
            let d = s.decide(T0, &Command::UpsertPro { pro: pro(id.as_str()) }, &Unlimited).expect("valid");
            d.events.iter().for_each(|ev| s.apply(ev));
        }
        let order: Vec<ProId> = s.ring.iter().map(|slot| s.slot_pro(slot).pro.id.clone()).collect();
        let publish = |s: &mut Shard, n: u32| {
            let d = s
                .decide(T0 + 1, &Command::PublishLead { lead: lead(n, T0).into() }, &Unlimited)
                .expect("valid");
            d.events.iter().for_each(|ev| s.apply(ev));
            s.check_invariants().expect("invariants hold");
            d.events
        };
        let first = publish(&mut s, 1);
        assert_eq!(granted(&first), order[..MAX_OFFERS_PER_RELEASE], "the first pros in rotation order");
        // The release's event is logged whole in one record: far below the log's limit.
        let rec = crate::engine::record::WalRecord::Shard {
            key: s.key.clone(),
            events: first,
            money: vec![],
            part: None,
        };
        let bytes = crate::engine::record::encode(&rec).len();
        assert!(bytes < crate::wal::MAX_RECORD_BYTES / 8, "a bounded release is {bytes} bytes");
        // Their turns were used: the next lead goes first to the pros left out.
        let second = granted(&publish(&mut s, 2));
        assert_eq!(second.len(), MAX_OFFERS_PER_RELEASE);
        assert_eq!(second[..over], order[MAX_OFFERS_PER_RELEASE..], "left out last time, first now");
        assert_eq!(second[over..], order[..MAX_OFFERS_PER_RELEASE - over]);
    }

    #[test]
    fn r6a_fanout_all_under_the_bound_offers_everyone_and_keeps_the_rotation_still() {
        let mut s = shard_with(
            "tenant = \"t\"\nmode = \"shared\"\n[leads]\noffer_fanout = \"all\"\nduplicate_window_s = 0\n",
        );
        for id in ["c", "a", "b"] {
            let d = s.decide(T0, &Command::UpsertPro { pro: pro(id) }, &Unlimited).expect("valid");
            d.events.iter().for_each(|ev| s.apply(ev));
        }
        let ring = s.ring.clone();
        let mut got = Vec::new();
        for n in 1..=2 {
            let d = s
                .decide(T0 + 1, &Command::PublishLead { lead: lead(n, T0).into() }, &Unlimited)
                .expect("valid");
            d.events.iter().for_each(|ev| s.apply(ev));
            got.push(granted(&d.events));
        }
        assert_eq!(got[0].len(), 3);
        assert_eq!(got[0], got[1], "no turn used under \"all\" when everyone got it");
        assert_eq!(s.ring, ring, "the rotation did not move");
    }
}

#[cfg(test)]
mod learned_proposals_tests {
    use super::*;
    use crate::pricing::CategoryStats;

    /// The field as snapshots of older releases wrote it: the whole category figures.
    #[derive(Serialize)]
    struct Old {
        learned: Option<CategoryStats>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct New {
        #[serde(default, deserialize_with = "learned_proposals_compat")]
        learned: Option<u64>,
    }

    #[test]
    fn r11_a_snapshot_holding_the_old_copy_of_the_category_figures_loads_its_proposals_only() {
        let stats = CategoryStats {
            avg_job_value_cents: 120_000,
            conversion_permille: 200,
            avg_proposals_milli: 3_250,
        };
        for old in [Old { learned: Some(stats) }, Old { learned: None }] {
            let want = New { learned: old.learned.map(|s| s.avg_proposals_milli) };
            let bytes = rmp_serde::to_vec(&old).expect("plain data");
            assert_eq!(rmp_serde::from_slice::<New>(&bytes).expect("old MessagePack loads"), want);
            let json = serde_json::to_string(&old).expect("plain data");
            assert_eq!(serde_json::from_str::<New>(&json).expect("old JSON loads"), want);
        }
    }

    #[test]
    fn r11_the_learned_proposals_survive_a_snapshot_round_trip() {
        let mut s = super::test_support::shard_with("tenant = \"t\"\nmode = \"shared\"\n");
        s.learned_proposals_milli = Some(3_250);
        let bytes = rmp_serde::to_vec(&s).expect("plain data");
        let back: Shard = rmp_serde::from_slice(&bytes).expect("loads");
        assert_eq!(back.learned_proposals_milli, Some(3_250));
    }
}

#[cfg(test)]
mod direct_seats_tests {
    use super::test_support::*;
    use super::*;

    /// `bytes` (a MessagePack array at `at`, whose last element is a `nil` written for
    /// a `None` field) as a release before that field wrote it: one element fewer.
    fn without_last_field(mut bytes: Vec<u8>, at: usize) -> Vec<u8> {
        assert_eq!(bytes.pop(), Some(0xc0), "the last field is a None");
        match bytes[at] {
            0x91..=0x9f => bytes[at] -= 1,
            0xdc => {
                let n = u16::from_be_bytes([bytes[at + 1], bytes[at + 2]]) - 1;
                bytes[at + 1..at + 3].copy_from_slice(&n.to_be_bytes());
            }
            other => panic!("not an array header: {other:#x}"),
        }
        bytes
    }

    fn accepted(direct_seats: Option<u32>) -> Event {
        let mut lead = lead(1, T0);
        lead.direct = vec![ProId::new("p1"), ProId::new("p2")];
        Event::LeadAccepted {
            lead: Arc::new(lead),
            fingerprint: 1,
            price: 1,
            price_components: None,
            at: T0,
            release_at: Some(T0 + 60_000),
            expires_at: T0 + 3_600_000,
            direct_seats,
        }
    }

    /// R6: a lead logged (or held in a snapshot) before the direct targets' seats were
    /// recorded keeps what was decided then: a seat per target named (2 -> 3 generic
    /// seats of 5); one logged since holds the seats of the targets reached (1 -> 4).
    #[test]
    fn r6_a_lead_decided_before_direct_seats_were_recorded_keeps_a_seat_per_target_named() {
        // An internally tagged event: one array, its tag first.
        let old = without_last_field(rmp_serde::to_vec(&accepted(None)).unwrap(), 0);
        let old: Event = rmp_serde::from_slice(&old).expect("an older record loads");
        assert_eq!(old, accepted(None));
        for (ev, generic) in [(old, 3), (accepted(Some(1)), 4)] {
            let mut s = shard_with("tenant = \"t\"\nmode = \"shared\"\n");
            s.apply(&ev);
            let st = s.lead(&LeadId::new("L1")).expect("accepted");
            assert_eq!(st.generic_cap(&s.policy), generic, "{ev:?}");
            let older = without_last_field(
                rmp_serde::to_vec(&LeadState { direct_seats: None, ..st.clone() }).unwrap(),
                0,
            );
            let back: LeadState = rmp_serde::from_slice(&older).expect("an older snapshot's lead loads");
            assert_eq!((back.direct_seats, back.generic_cap(&s.policy)), (None, 3));
        }
    }
}
