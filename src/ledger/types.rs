//! Op ids, reasons, rules and the events (facts) the ledger emits.
//!
//! Events are what the WAL stores. They carry amounts, never resulting
//! balances, so that applying them is a sum and the order of application does
//! not matter (see [`super::Ledger::apply`]).

use crate::ids::{LeadId, Millis, ProId, TenantId, MAX_ID_LEN};
use serde::{Deserialize, Serialize};
// Names the `string_id!` expansion refers to.
use crate::ids::{validate_id, IdError};
use smol_str::SmolStr;
use std::fmt;

crate::ids::string_id!(
    /// The idempotency key of one ledger operation, unique within an account
    /// (credits of one pro, or one auto-buy budget). Callers derive it from what
    /// the operation is about, e.g. `charge:<lead>:<pro>`, so that a retry after
    /// a crash or a timeout carries the same id and is answered, not re-applied.
    OpId
);

crate::ids::string_id!(
    /// The name a pro gave one of its auto-buy configs (R19).
    BudgetName
);

/// Longest op id the ledger accepts.
///
/// Op ids are not wire ids: the shell derives them from up to two wire ids (each at
/// most [`MAX_ID_LEN`] bytes, checked at the wire) plus a kind, `:` separators and
/// numbers. The longest derivation is [`OpId::set_budget`]'s
/// `budget:<pro>:<config>:<at_ms>:<weekly>`, two ids and 50 bytes (`budget`, four
/// `:`, an `i64` and a `u64` of at most 20 digits each); the others
/// ([`OpId::for_lead`], whose format the core's money intents share, `week:`,
/// `resume:`, `grant:`) take less. 64 bytes of margin cover them all, so every id
/// derived from valid wire ids is accepted (the tests check each derivation at its
/// longest); the bound remains, as every op id is kept for as long as its lead lives.
pub const MAX_OP_ID_LEN: usize = 2 * MAX_ID_LEN + 64;

impl OpId {
    /// The conventional id of an operation about one lead and one pro:
    /// `<kind>:<lead>:<pro>`, e.g. `OpId::for_lead("charge", &lead, &pro)`. The core
    /// builds the ids of its money intents (`charge`, `hold`, `buy`) the same way.
    pub fn for_lead(kind: &str, lead: &LeadId, pro: &ProId) -> Self {
        Self::new(format!("{kind}:{lead}:{pro}"))
    }

    /// `grant:<payment>`: a grant of credits, keyed on the platform's payment id.
    pub fn grant(payment: &str) -> Self {
        Self::new(format!("grant:{payment}"))
    }

    /// `budget:<pro>:<config>:<at>:<n>`: the `n`-th setting of the weekly amount of
    /// auto-buy config `budget` of `pro`, made at `at` (R19). Numbered, not keyed on the
    /// amount: two changes in one millisecond that set an amount back (24, 48, 24) are
    /// three settings, where an id of time and amount made the third a repeat of the
    /// first, answered and ignored.
    pub fn set_budget(pro: &ProId, budget: &BudgetName, at: Millis, n: u64) -> Self {
        Self::new(format!("budget:{pro}:{budget}:{at}:{n}"))
    }

    /// `week:<pro>:<config>:<monday>`: the weekly recharge (R20) of the local week
    /// that starts on `monday`.
    pub fn weekly_recharge(pro: &ProId, budget: &BudgetName, monday: chrono::NaiveDate) -> Self {
        Self::new(format!("week:{pro}:{budget}:{monday}"))
    }

    /// `resume:<pro>:<config>:<at>`: the recharge of a config resuming (R24), keyed on
    /// the time its pause ended.
    pub fn resume(pro: &ProId, budget: &BudgetName, at: Millis) -> Self {
        Self::new(format!("resume:{pro}:{budget}:{at}"))
    }

    /// The recharge of an auto-buy config made active again on local day `day` (R20).
    pub fn reactivated(pro: &ProId, budget: &BudgetName, day: chrono::NaiveDate) -> Self {
        Self::new(format!("resume:{pro}:{budget}:day:{day}"))
    }
}

/// Why a charge is refunded (R12). Serialized as a snake_case code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefundReason {
    /// The client never viewed the pro's proposal within the guarantee window (R12).
    NotViewed,
    /// The contact was confirmed invalid: wrong number or wrong category (R23).
    InvalidContact,
    /// A manual refund by the platform.
    Platform,
}

impl RefundReason {
    pub fn code(self) -> &'static str {
        match self {
            Self::NotViewed => "not_viewed",
            Self::InvalidContact => "invalid_contact",
            Self::Platform => "platform",
        }
    }
}

/// R10: when `available` falls below `threshold`, ask the platform for `amount`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TopupRule {
    pub threshold: u64,
    pub amount: u64,
}

/// A top-up request raised by a debit (R10).
///
/// `after_grants` is the number of grants the account had seen when the
/// request was raised: the request is pending until a later grant is posted.
/// Counting grants instead of toggling a flag keeps replay order-independent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct TopupRequest {
    pub amount: u64,
    pub after_grants: u64,
}

/// What happened to the credits of one pro.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CreditFact {
    /// Credits posted by the platform (a purchase or an R10 top-up).
    Granted { amount: u64 },
    /// Credits reserved for a chat-only response (R9).
    Held { amount: u64, topup: Option<TopupRequest> },
    /// A hold turned into a charge: the client replied (R9).
    Captured { hold: OpId, amount: u64 },
    /// A hold given back: the lead closed without a reply (R9).
    Released { hold: OpId, amount: u64 },
    /// Hold and capture at once: a response or an auto-buy (R9).
    Charged { amount: u64, topup: Option<TopupRequest> },
    /// A full refund of a charge or of a captured hold (R12).
    Refunded { charge: OpId, amount: u64, reason: RefundReason },
    /// The R10 rule changed; the highest `version` wins.
    TopupRuleSet { rule: Option<TopupRule>, version: u64 },
}

/// What happened to one auto-buy budget (R19-R24).
///
/// `period` numbers the recharges of the budget: 1 after the first recharge,
/// 2 after the next, ... A spend belongs to the period it was made in, so a
/// spend that was made before a recharge never eats into the recharged budget,
/// whatever order replay applies them in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetFact {
    /// The weekly budget changed; the highest `version` wins. Takes effect at
    /// the next recharge.
    Set { weekly: u64, version: u64 },
    /// The available budget was topped up to `to` (the weekly budget) (R20), for the
    /// local week that ends at `until` (the next Monday 00:00 in the tenant's time
    /// zone): from then on the period is last week's, and nothing more is spent from
    /// it until the next recharge (made by the housekeeping at the week's start, and
    /// the leads a pro missed meanwhile retried, R22). `None` (and in records written
    /// before this field): spendable until the next recharge, whenever it comes.
    Recharged {
        period: u64,
        to: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        until: Option<Millis>,
    },
    /// A lead was bought within the budget.
    Spent { period: u64, amount: u64 },
    /// A spend of `period` was refunded (R12/R23). A refund decided in a later
    /// period than the spend's (a guarantee of a week or more always is) is credited
    /// to that later period, `into`: the pro may buy that much more until the next
    /// recharge, which tops up to the weekly budget as always (R20: topped up, not
    /// added, so an unspent refund lapses with the rest of the week). `None` (and in
    /// records written before this field): credited to the spend's own period.
    Refunded {
        spend: OpId,
        period: u64,
        amount: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        into: Option<u64>,
    },
}

/// Signed changes a credit fact makes to the five balances of an account.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CreditDeltas {
    pub available: i128,
    pub held: i128,
    pub captured: i128,
    pub refunded: i128,
    pub granted: i128,
}

impl CreditFact {
    /// The balance changes of this fact: the single source of truth for both the
    /// live path and replay.
    pub fn deltas(&self) -> CreditDeltas {
        let zero = CreditDeltas::default();
        match *self {
            Self::Granted { amount } => {
                CreditDeltas { available: amount.into(), granted: amount.into(), ..zero }
            }
            Self::Held { amount, .. } => {
                CreditDeltas { available: -i128::from(amount), held: amount.into(), ..zero }
            }
            Self::Captured { amount, .. } => {
                CreditDeltas { held: -i128::from(amount), captured: amount.into(), ..zero }
            }
            Self::Released { amount, .. } => {
                CreditDeltas { held: -i128::from(amount), available: amount.into(), ..zero }
            }
            Self::Charged { amount, .. } => {
                CreditDeltas { available: -i128::from(amount), captured: amount.into(), ..zero }
            }
            Self::Refunded { amount, .. } => {
                CreditDeltas { available: amount.into(), refunded: amount.into(), ..zero }
            }
            Self::TopupRuleSet { .. } => zero,
        }
    }

    /// The top-up this fact asked for, if any (R10).
    pub fn topup_requested(&self) -> Option<u64> {
        match self {
            Self::Held { topup, .. } | Self::Charged { topup, .. } => topup.map(|t| t.amount),
            _ => None,
        }
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Granted { .. } => "grant",
            Self::Held { .. } => "hold",
            Self::Captured { .. } => "capture",
            Self::Released { .. } => "release",
            Self::Charged { .. } => "charge",
            Self::Refunded { .. } => "refund",
            Self::TopupRuleSet { .. } => "set_topup_rule",
        }
    }
}

impl BudgetFact {
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Set { .. } => "set_budget",
            Self::Recharged { .. } => "recharge",
            Self::Spent { .. } => "spend",
            Self::Refunded { .. } => "refund_spend",
        }
    }
}

/// One fact about money, as written to the WAL. Compact under MessagePack:
/// amounts and counters only, no balances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LedgerEvent {
    Credit { op: OpId, tenant: TenantId, pro: ProId, fact: CreditFact },
    Budget { op: OpId, tenant: TenantId, pro: ProId, budget: BudgetName, fact: BudgetFact },
}

impl LedgerEvent {
    pub fn op(&self) -> &OpId {
        match self {
            Self::Credit { op, .. } | Self::Budget { op, .. } => op,
        }
    }

    /// Whether this fact's op id joins a queue of newest ids ([`RecentOps`]): grants,
    /// top-up rules, budget settings and recharges. These are applied in one order,
    /// live and in replay (the log's); every other fact commutes.
    pub fn is_ordered(&self) -> bool {
        matches!(
            self,
            Self::Credit { fact: CreditFact::Granted { .. } | CreditFact::TopupRuleSet { .. }, .. }
                | Self::Budget { fact: BudgetFact::Set { .. } | BudgetFact::Recharged { .. }, .. }
        )
    }
}

/// The newest op ids of one kind that a registry keeps, oldest first: the ops no lead
/// forgets (grants, top-up rules, budget settings and recharges), which would
/// otherwise be remembered for as long as the pro exists.
///
/// Deterministic: every op that enters one is applied under the engine's exclusive
/// gate, so live and replay apply them in the log's order, and the queue (part of the
/// snapshot) evicts the same ids at the same point. A snapshot written before these
/// queues existed restores empty ones: the ids it holds are kept, the later ones are
/// bounded.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct RecentOps(std::collections::VecDeque<OpId>);

impl RecentOps {
    /// Notes `op`, newly registered, and returns the oldest id once more than `keep`
    /// are held (the caller drops it from its registry).
    pub(crate) fn push(&mut self, op: &OpId, keep: usize) -> Option<OpId> {
        self.0.push_back(op.clone());
        (self.0.len() > keep).then(|| self.0.pop_front()).flatten()
    }
}
