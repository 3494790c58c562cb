//! The credits of one pro: pure state, decisions and the infallible `apply`.
//!
//! The concurrent shell in `mod.rs` locks one account, calls [`Account::decide`]
//! and then [`Account::apply`] with the decided fact; WAL replay calls only
//! `apply`. Both paths therefore change balances through the same code.

use super::error::LedgerError;
use super::types::{CreditFact, OpId, RecentOps, RefundReason, TopupRequest, TopupRule};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::collections::hash_map::Entry;

/// What a caller asks of an account; compared with the stored fact when an op
/// id is replayed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum CreditRequest {
    Grant { amount: u64 },
    Hold { amount: u64 },
    Capture { hold: OpId },
    Release { hold: OpId },
    Charge { amount: u64 },
    Refund { charge: OpId, reason: RefundReason },
    SetTopupRule { rule: Option<TopupRule> },
}

impl CreditRequest {
    /// Whether `fact` is what this request produced when it was first applied.
    fn answered_by(&self, fact: &CreditFact) -> bool {
        match (self, fact) {
            (Self::Grant { amount }, CreditFact::Granted { amount: a }) => amount == a,
            (Self::Hold { amount }, CreditFact::Held { amount: a, .. }) => amount == a,
            (Self::Capture { hold }, CreditFact::Captured { hold: h, .. }) => hold == h,
            (Self::Release { hold }, CreditFact::Released { hold: h, .. }) => hold == h,
            (Self::Charge { amount }, CreditFact::Charged { amount: a, .. }) => amount == a,
            (Self::Refund { charge, reason }, CreditFact::Refunded { charge: c, reason: r, .. }) => {
                charge == c && reason == r
            }
            (Self::SetTopupRule { rule }, CreditFact::TopupRuleSet { rule: r, .. }) => rule == r,
            _ => false,
        }
    }
}

/// The outcome of [`Account::decide`].
#[derive(Debug)]
pub(crate) enum Decision {
    /// A new fact to apply.
    New(CreditFact),
    /// The op id was applied before with the same request: this is its fact.
    Replay(CreditFact),
}

/// Balances and the op-id registry of one pro.
///
/// Invariant: `granted + refunded == available + held + captured`, i.e.
/// `granted == available + held + captured - refunded`; `held` is the sum of
/// the open holds; `refunded <= captured`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Account {
    pub(crate) available: u64,
    pub(crate) held: u64,
    pub(crate) captured: u64,
    pub(crate) refunded: u64,
    pub(crate) granted: u64,
    /// Number of grants applied: clears a pending top-up request (R10).
    grants_posted: u64,
    topup_rule: Option<TopupRule>,
    topup_rule_version: u64,
    /// `grants_posted` at the newest top-up request; pending while equal.
    topup_requested_after: Option<u64>,
    /// Every applied op not yet forgotten, with the fact it produced.
    ops: FxHashMap<OpId, CreditFact>,
    /// hold op -> how it was settled. The kind is kept here, not looked up
    /// through the settling op, because that op may be forgotten first.
    settled: FxHashMap<OpId, Settlement>,
    /// charge op (or captured hold op) -> the refund op.
    refunds: FxHashMap<OpId, OpId>,
    /// The newest grant ops ([`KEPT_ACCOUNT_OPS`]); older ones leave `ops` (no lead
    /// forgets them). Snapshots written before `recent_rules` existed hold top-up rule
    /// ops here too.
    #[serde(default)]
    pub(crate) recent: RecentOps,
    /// The newest top-up rule ops ([`KEPT_RULE_OPS`]), in a queue of their own: rule
    /// changes (a platform saving a pro's settings at every profile edit) never push
    /// a payment id out of `recent`, where it would be credited again on a retry.
    #[serde(default)]
    pub(crate) recent_rules: RecentOps,
}

/// How many of a pro's newest grants an account remembers. A grant's op id is the
/// platform's payment id: a retry of one of these is answered (`replayed`), a retry
/// after this many newer grants to the same pro would be credited again, however many
/// top-up rule changes came between.
pub(crate) const KEPT_ACCOUNT_OPS: usize = 256;

/// How many of a pro's newest top-up rule changes an account remembers. Their op ids
/// are never sent again by a client (each change is the next version,
/// `topup-rule:v<n>`); a rule fact applied again once evicted changes nothing (its
/// version is not newer than the rule in force).
pub(crate) const KEPT_RULE_OPS: usize = 16;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Settlement {
    by: OpId,
    captured: bool,
}

fn add(field: &'static str, balance: u64, amount: u64) -> Result<u64, LedgerError> {
    balance.checked_add(amount).ok_or(LedgerError::AmountOverflow { field, amount })
}

fn nonzero(amount: u64) -> Result<u64, LedgerError> {
    if amount == 0 {
        Err(LedgerError::InvalidAmount { field: "amount" })
    } else {
        Ok(amount)
    }
}

impl Account {
    pub(crate) fn topup_pending(&self) -> bool {
        self.topup_requested_after == Some(self.grants_posted)
    }

    pub(crate) fn topup_rule(&self) -> Option<TopupRule> {
        self.topup_rule
    }

    /// The version of the rule in force (0: never set).
    pub(crate) fn topup_rule_version(&self) -> u64 {
        self.topup_rule_version
    }

    /// Checks `request` against the current state without changing it.
    pub(crate) fn decide(&self, op: &OpId, request: &CreditRequest) -> Result<Decision, LedgerError> {
        if let Some(fact) = self.ops.get(op) {
            return if request.answered_by(fact) {
                Ok(Decision::Replay(fact.clone()))
            } else {
                Err(LedgerError::OpConflict { op: op.clone(), existing: fact.kind() })
            };
        }
        let fact = match request {
            CreditRequest::Grant { amount } => {
                let amount = nonzero(*amount)?;
                add("available", self.available, amount)?;
                add("granted", self.granted, amount)?;
                CreditFact::Granted { amount }
            }
            CreditRequest::Hold { amount } => {
                let amount = nonzero(*amount)?;
                self.debit(amount)?;
                add("held", self.held, amount)?;
                CreditFact::Held { amount, topup: self.topup_for_debit(amount) }
            }
            CreditRequest::Charge { amount } => {
                let amount = nonzero(*amount)?;
                self.debit(amount)?;
                add("captured", self.captured, amount)?;
                CreditFact::Charged { amount, topup: self.topup_for_debit(amount) }
            }
            CreditRequest::Capture { hold } => {
                let amount = self.open_hold(hold)?;
                add("captured", self.captured, amount)?;
                CreditFact::Captured { hold: hold.clone(), amount }
            }
            CreditRequest::Release { hold } => {
                let amount = self.open_hold(hold)?;
                add("available", self.available, amount)?;
                CreditFact::Released { hold: hold.clone(), amount }
            }
            CreditRequest::Refund { charge, reason } => {
                let amount = self.refundable(charge)?;
                add("available", self.available, amount)?;
                add("refunded", self.refunded, amount)?;
                CreditFact::Refunded { charge: charge.clone(), amount, reason: *reason }
            }
            CreditRequest::SetTopupRule { rule } => {
                if let Some(rule) = rule {
                    nonzero(rule.amount)
                        .map_err(|_| LedgerError::InvalidAmount { field: "topup_rule.amount" })?;
                    nonzero(rule.threshold)
                        .map_err(|_| LedgerError::InvalidAmount { field: "topup_rule.threshold" })?;
                }
                CreditFact::TopupRuleSet { rule: *rule, version: self.topup_rule_version + 1 }
            }
        };
        Ok(Decision::New(fact))
    }

    fn debit(&self, amount: u64) -> Result<(), LedgerError> {
        if self.available < amount {
            return Err(LedgerError::InsufficientCredits { available: self.available, needed: amount });
        }
        Ok(())
    }

    /// R10: a debit that leaves `available` below the threshold asks for a
    /// top-up, unless one is already pending (asked and no grant since).
    fn topup_for_debit(&self, amount: u64) -> Option<TopupRequest> {
        let rule = self.topup_rule?;
        let after = self.available - amount; // debit() checked available >= amount
        (after < rule.threshold && !self.topup_pending())
            .then_some(TopupRequest { amount: rule.amount, after_grants: self.grants_posted })
    }

    /// The amount of an open hold, or why it cannot be settled.
    fn open_hold(&self, hold: &OpId) -> Result<u64, LedgerError> {
        let Some(CreditFact::Held { amount, .. }) = self.ops.get(hold) else {
            return Err(LedgerError::UnknownHold { hold: hold.clone() });
        };
        if let Some(s) = self.settled.get(hold) {
            return Err(LedgerError::HoldAlreadySettled { hold: hold.clone(), by: s.by.clone() });
        }
        Ok(*amount)
    }

    /// The full amount of a charge or captured hold that was not refunded yet.
    fn refundable(&self, charge: &OpId) -> Result<u64, LedgerError> {
        let amount = match self.ops.get(charge) {
            Some(CreditFact::Charged { amount, .. }) => *amount,
            Some(CreditFact::Held { amount, .. }) => {
                if !self.settled.get(charge).is_some_and(|s| s.captured) {
                    return Err(LedgerError::HoldNotCaptured { hold: charge.clone() });
                }
                *amount
            }
            _ => return Err(LedgerError::UnknownCharge { charge: charge.clone() }),
        };
        if let Some(by) = self.refunds.get(charge) {
            return Err(LedgerError::AlreadyRefunded { op: charge.clone(), by: by.clone() });
        }
        Ok(amount)
    }

    /// Applies a fact unless its op id is already registered; returns whether it
    /// was applied.
    ///
    /// Infallible and order-independent: balances change by the fact's deltas in
    /// wrapping (mod 2^64) arithmetic, which commutes, so replaying a valid
    /// history in any order ends in exactly the live state even if an
    /// intermediate state of an out-of-order replay went "negative". The live
    /// path never wraps because `decide` checked every bound first. Grants and
    /// rule changes are the exception: their ids are kept for the newest
    /// [`KEPT_ACCOUNT_OPS`] only, so they are applied in log order, and one applied
    /// again once evicted counts again.
    pub(crate) fn apply(&mut self, op: &OpId, fact: &CreditFact) -> bool {
        // One lookup registers the op and tells whether it was known; the
        // entry borrows only `self.ops`, the balances below are other fields.
        let Entry::Vacant(slot) = self.ops.entry(op.clone()) else {
            return false;
        };
        slot.insert(fact.clone());
        let d = fact.deltas();
        // `as u64` on an i128 keeps the value mod 2^64: exactly the wrapping delta.
        self.available = self.available.wrapping_add(d.available as u64);
        self.held = self.held.wrapping_add(d.held as u64);
        self.captured = self.captured.wrapping_add(d.captured as u64);
        self.refunded = self.refunded.wrapping_add(d.refunded as u64);
        self.granted = self.granted.wrapping_add(d.granted as u64);
        let evicted = match fact {
            CreditFact::Granted { .. } => self.recent.push(op, KEPT_ACCOUNT_OPS),
            CreditFact::TopupRuleSet { .. } => self.recent_rules.push(op, KEPT_RULE_OPS),
            _ => None,
        };
        if let Some(old) = evicted {
            self.ops.remove(&old);
        }
        match fact {
            CreditFact::Granted { .. } => self.grants_posted += 1,
            CreditFact::Held { topup, .. } | CreditFact::Charged { topup, .. } => {
                if let Some(t) = topup {
                    self.topup_requested_after = self.topup_requested_after.max(Some(t.after_grants));
                }
            }
            CreditFact::Captured { hold, .. } | CreditFact::Released { hold, .. } => {
                let captured = matches!(fact, CreditFact::Captured { .. });
                let by = op.clone();
                self.settled.insert(hold.clone(), Settlement { by, captured });
            }
            CreditFact::Refunded { charge, .. } => {
                self.refunds.insert(charge.clone(), op.clone());
            }
            CreditFact::TopupRuleSet { rule, version } => {
                if *version > self.topup_rule_version {
                    self.topup_rule = *rule;
                    self.topup_rule_version = *version;
                }
            }
        }
        true
    }

    /// Number of op ids remembered.
    pub(crate) fn registered_ops(&self) -> usize {
        self.ops.len()
    }

    /// Every op id registered.
    pub(crate) fn op_ids(&self) -> impl Iterator<Item = &OpId> {
        self.ops.keys()
    }

    /// Drops the registry entries of `ops` (see `Ledger::forget`). Open holds
    /// are kept: forgetting one would strand its credits in `held`.
    pub(crate) fn forget(&mut self, ops: &[OpId]) -> usize {
        let mut forgotten = 0;
        for op in ops {
            let open_hold =
                matches!(self.ops.get(op), Some(CreditFact::Held { .. })) && !self.settled.contains_key(op);
            if open_hold {
                continue;
            }
            if self.ops.remove(op).is_some() {
                forgotten += 1;
            }
            self.settled.remove(op);
            self.refunds.remove(op);
        }
        forgotten
    }

    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        let lhs = u128::from(self.granted) + u128::from(self.refunded);
        let rhs = u128::from(self.available) + u128::from(self.held) + u128::from(self.captured);
        if lhs != rhs {
            return Err(format!(
                "granted {} + refunded {} != available {} + held {} + captured {}",
                self.granted, self.refunded, self.available, self.held, self.captured
            ));
        }
        if self.refunded > self.captured {
            return Err(format!("refunded {} > captured {}", self.refunded, self.captured));
        }
        let open: u128 = self
            .ops
            .iter()
            .filter(|(op, _)| !self.settled.contains_key(*op))
            .map(|(_, f)| match f {
                CreditFact::Held { amount, .. } => u128::from(*amount),
                _ => 0,
            })
            .sum();
        if open != u128::from(self.held) {
            return Err(format!("held {} != sum of open holds {open}", self.held));
        }
        if self.topup_requested_after > Some(self.grants_posted) {
            return Err("top-up requested after more grants than were posted".into());
        }
        Ok(())
    }
}
