//! One auto-buy budget (R19-R24, "hard budgets"): pure state, decisions and
//! the infallible `apply`, shaped like [`super::account`].
//!
//! A budget is a spending cap per recharge period, separate from the pro's
//! credits. The auto-buy path spends the budget first (the reservation that
//! makes the cap hard) and then charges the credits; if the charge is refused,
//! it gives the spend back with `refund_spend`. Each step is one account lock,
//! never two at once.

use super::error::LedgerError;
use super::types::{BudgetFact, BudgetName, OpId, RecentOps};
use crate::ids::Millis;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::collections::hash_map::Entry;
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum BudgetRequest {
    Set {
        weekly: u64,
    },
    /// Top up for the week that ends at `until` (see [`BudgetFact::Recharged`]).
    Recharge {
        until: Option<Millis>,
    },
    /// Spend at time `at` (`None`: whatever the time).
    Spend {
        amount: u64,
        at: Option<Millis>,
    },
    /// Give a spend back, at time `at` (`None`: whatever the time).
    Refund {
        spend: OpId,
        at: Option<Millis>,
    },
}

impl BudgetRequest {
    fn answered_by(&self, fact: &BudgetFact) -> bool {
        match (self, fact) {
            (Self::Set { weekly }, BudgetFact::Set { weekly: w, .. }) => weekly == w,
            (Self::Recharge { .. }, BudgetFact::Recharged { .. }) => true,
            (Self::Spend { amount, .. }, BudgetFact::Spent { amount: a, .. }) => amount == a,
            (Self::Refund { spend, .. }, BudgetFact::Refunded { spend: s, .. }) => spend == s,
            _ => false,
        }
    }
}

#[derive(Debug)]
pub(crate) enum BudgetDecision {
    New(BudgetFact),
    Replay(BudgetFact),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct PeriodTotals {
    spent: u64,
    /// Refunds of this period's own spends.
    refunded: u64,
    /// Refunds of earlier periods' spends credited to this one
    /// ([`BudgetFact::Refunded`]'s `into`).
    #[serde(default)]
    late: u64,
}

/// Invariant: `available + spent == base + refunded + late` for the current period,
/// `refunded <= spent` and `spent - refunded <= base + late`: the net spend of a
/// period never exceeds what it was topped up to plus what earlier periods' refunds
/// gave back to it, not by one credit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Budget {
    pub(crate) weekly_budget: u64,
    weekly_version: u64,
    /// Number of recharges so far; 0 means never recharged (nothing to spend).
    pub(crate) period: u64,
    /// What the current period was topped up to.
    pub(crate) base: u64,
    /// Spent and refunded in the current period.
    current: PeriodTotals,
    /// Only during an out-of-order replay: totals of periods whose recharge has
    /// not been applied yet. Empty whenever a whole history has been applied.
    early: BTreeMap<u64, PeriodTotals>,
    ops: FxHashMap<OpId, BudgetFact>,
    /// spend op -> the refund op.
    refunds: FxHashMap<OpId, OpId>,
    /// The newest settings ([`KEPT_SET_OPS`]) and recharges ([`KEPT_RECHARGE_OPS`]);
    /// older ones leave `ops` (no lead forgets them).
    #[serde(default)]
    pub(crate) recent_sets: RecentOps,
    #[serde(default)]
    recent_recharges: RecentOps,
    /// The end of the week the current period was topped up for (its recharge's
    /// `until`): nothing is spent from it at or after that time (R20).
    #[serde(default)]
    pub(crate) spendable_until: Option<Millis>,
}

/// Settings of the weekly amount a budget remembers. Their op ids carry the time of
/// the change, so none is ever sent again; a few are kept for the record.
pub(crate) const KEPT_SET_OPS: usize = 8;

/// Recharges a budget remembers. The housekeeping retries only this week's recharge
/// and the resumes of pauses that ended this week (`Engine::housekeeping`), both among
/// the newest unless a config is paused and resumed dozens of times in one week.
pub(crate) const KEPT_RECHARGE_OPS: usize = 64;

impl Budget {
    /// How many times the weekly amount was set (the version of the newest setting).
    pub(crate) fn settings(&self) -> u64 {
        self.weekly_version
    }

    pub(crate) fn available(&self) -> u64 {
        let gross = u128::from(self.base) + u128::from(self.current.refunded) + u128::from(self.current.late);
        let left = gross.saturating_sub(u128::from(self.current.spent));
        // Live, decide() keeps spent - refunded <= base, so `left <= base` fits;
        // the clamp only matters in the middle of an out-of-order replay.
        u64::try_from(left).unwrap_or(u64::MAX)
    }

    /// What can be spent at time `at`: nothing once the week the current period was
    /// topped up for is over (R20: last week's leftover is not this week's budget).
    pub(crate) fn available_at(&self, at: Millis) -> u64 {
        if self.stale_at(at) {
            0
        } else {
            self.available()
        }
    }

    /// Whether the week the current period was topped up for is over at `at`.
    fn stale_at(&self, at: Millis) -> bool {
        self.spendable_until.is_some_and(|until| at >= until)
    }

    pub(crate) fn spent(&self) -> u64 {
        self.current.spent
    }

    /// Refunded into the current period: its own spends' refunds and earlier
    /// periods' credited to it.
    pub(crate) fn refunded(&self) -> u64 {
        self.current.refunded.saturating_add(self.current.late)
    }

    pub(crate) fn decide(
        &self,
        budget: &BudgetName,
        op: &OpId,
        request: &BudgetRequest,
    ) -> Result<BudgetDecision, LedgerError> {
        if let Some(fact) = self.ops.get(op) {
            return if request.answered_by(fact) {
                Ok(BudgetDecision::Replay(fact.clone()))
            } else {
                Err(LedgerError::OpConflict { op: op.clone(), existing: fact.kind() })
            };
        }
        let unknown = || LedgerError::UnknownBudget { budget: budget.clone() };
        let fact = match request {
            BudgetRequest::Set { weekly } => {
                if *weekly == 0 {
                    return Err(LedgerError::InvalidAmount { field: "weekly_budget" });
                }
                BudgetFact::Set { weekly: *weekly, version: self.weekly_version + 1 }
            }
            BudgetRequest::Recharge { until } => {
                if self.weekly_version == 0 {
                    return Err(unknown());
                }
                BudgetFact::Recharged { period: self.period + 1, to: self.weekly_budget, until: *until }
            }
            BudgetRequest::Spend { amount, at } => {
                if self.weekly_version == 0 {
                    return Err(unknown());
                }
                if *amount == 0 {
                    return Err(LedgerError::InvalidAmount { field: "amount" });
                }
                let available = at.map_or_else(|| self.available(), |at| self.available_at(at));
                if available < *amount {
                    return Err(LedgerError::BudgetExhausted { available, needed: *amount });
                }
                // spent can only outgrow base through spend/refund cycles; keep
                // the counter exact rather than wrap.
                self.current
                    .spent
                    .checked_add(*amount)
                    .ok_or(LedgerError::AmountOverflow { field: "spent", amount: *amount })?;
                BudgetFact::Spent { period: self.period, amount: *amount }
            }
            BudgetRequest::Refund { spend, at } => {
                let Some(&BudgetFact::Spent { period, amount }) = self.ops.get(spend) else {
                    return Err(LedgerError::UnknownSpend { budget: budget.clone(), spend: spend.clone() });
                };
                if let Some(by) = self.refunds.get(spend) {
                    return Err(LedgerError::AlreadyRefunded { op: spend.clone(), by: by.clone() });
                }
                // The current period's week is over (R20): the refund goes to the period
                // its coming recharge opens, as a refund after that recharge would; in
                // the current one the recharge would replace it, and it would be lost.
                if at.is_some_and(|at| self.stale_at(at)) {
                    let into = Some(self.period + 1);
                    return Ok(BudgetDecision::New(BudgetFact::Refunded {
                        spend: spend.clone(),
                        period,
                        amount,
                        into,
                    }));
                }
                // A later period than the spend's: the refund is credited to the
                // current one (the spend's own is over and its budget gone).
                let into = (period < self.period).then_some(self.period);
                if into.is_some() {
                    self.current
                        .late
                        .checked_add(amount)
                        .ok_or(LedgerError::AmountOverflow { field: "refunded", amount })?;
                }
                BudgetFact::Refunded { spend: spend.clone(), period, amount, into }
            }
        };
        Ok(BudgetDecision::New(fact))
    }

    /// Infallible, idempotent by op id, and order-independent: a recharge
    /// replaces the period only if it is newer; spends and refunds add to the
    /// totals of their own period (ignored once that period is over).
    pub(crate) fn apply(&mut self, op: &OpId, fact: &BudgetFact) -> bool {
        let Entry::Vacant(slot) = self.ops.entry(op.clone()) else {
            return false;
        };
        slot.insert(fact.clone());
        let evicted = match fact {
            BudgetFact::Set { .. } => self.recent_sets.push(op, KEPT_SET_OPS),
            BudgetFact::Recharged { .. } => self.recent_recharges.push(op, KEPT_RECHARGE_OPS),
            BudgetFact::Spent { .. } | BudgetFact::Refunded { .. } => None,
        };
        if let Some(old) = evicted {
            self.ops.remove(&old);
        }
        match fact {
            BudgetFact::Set { weekly, version } => {
                if *version > self.weekly_version {
                    self.weekly_budget = *weekly;
                    self.weekly_version = *version;
                }
            }
            BudgetFact::Recharged { period, to, until } => {
                if *period > self.period {
                    self.period = *period;
                    self.base = *to;
                    self.spendable_until = *until;
                    self.current = self.early.remove(period).unwrap_or_default();
                    self.early.retain(|p, _| *p > *period);
                }
            }
            BudgetFact::Spent { period, amount } => {
                if let Some(t) = self.totals_mut(*period) {
                    t.spent = t.spent.wrapping_add(*amount);
                }
            }
            BudgetFact::Refunded { spend, period, amount, into } => {
                match into {
                    Some(into) if into != period => {
                        if let Some(t) = self.totals_mut(*into) {
                            t.late = t.late.wrapping_add(*amount);
                        }
                    }
                    _ => {
                        if let Some(t) = self.totals_mut(*period) {
                            t.refunded = t.refunded.wrapping_add(*amount);
                        }
                    }
                }
                self.refunds.insert(spend.clone(), op.clone());
            }
        }
        true
    }

    /// The totals a fact of `period` adds to; `None` for a period that is over.
    fn totals_mut(&mut self, period: u64) -> Option<&mut PeriodTotals> {
        use std::cmp::Ordering;
        match period.cmp(&self.period) {
            Ordering::Equal => Some(&mut self.current),
            Ordering::Greater => Some(self.early.entry(period).or_default()),
            Ordering::Less => None,
        }
    }

    /// Whether `op` is applied and remembered.
    pub(crate) fn knows(&self, op: &OpId) -> bool {
        self.ops.contains_key(op)
    }

    /// Number of op ids remembered.
    pub(crate) fn registered_ops(&self) -> usize {
        self.ops.len()
    }

    /// Every op id registered.
    pub(crate) fn op_ids(&self) -> impl Iterator<Item = &OpId> {
        self.ops.keys()
    }

    /// Drops registry entries (see `Ledger::forget_budget_ops`).
    pub(crate) fn forget(&mut self, ops: &[OpId]) -> usize {
        let mut forgotten = 0;
        for op in ops {
            if self.ops.remove(op).is_some() {
                forgotten += 1;
            }
            self.refunds.remove(op);
        }
        forgotten
    }

    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        let PeriodTotals { spent, refunded, late } = self.current;
        if refunded > spent {
            return Err(format!("refunded {refunded} > spent {spent}"));
        }
        if u128::from(spent - refunded) > u128::from(self.base) + u128::from(late) {
            return Err(format!(
                "net spend {} exceeds the period's budget {} plus {late} refunded from earlier periods",
                spent - refunded,
                self.base
            ));
        }
        // Refunds decided once the current period's week was over wait for the
        // recharge of the next period (`late` only); anything else early means spends
        // applied without their period's recharge.
        let waiting = |p: &u64, t: &PeriodTotals| *p == self.period + 1 && t.spent == 0 && t.refunded == 0;
        if !self.early.iter().all(|(p, t)| waiting(p, t)) {
            return Err(format!(
                "spends of periods {:?} were applied but their recharge was not",
                self.early.keys().collect::<Vec<_>>()
            ));
        }
        Ok(())
    }
}
