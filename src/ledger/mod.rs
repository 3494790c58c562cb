//! Credits and auto-buy budgets: concurrent, idempotent, replayable.
//!
//! One [`Ledger`] is shared by every shard actor: a pro that covers twelve
//! zones has one balance. No I/O, no clock, no async: the shell writes the
//! returned [`LedgerEvent`] to the WAL and replays it with [`Ledger::apply`].
//!
//! # Credit operations (per account `(tenant, pro)`)
//!
//! | operation | effect | refused with |
//! |---|---|---|
//! | [`grant`](Ledger::grant)`(op, t, p, n)` | `available += n`, `granted += n`; clears a pending top-up (R10) | `InvalidAmount`, `AmountOverflow` |
//! | [`hold`](Ledger::hold)`(op, t, p, n)` | `available -= n`, `held += n` (chat-only response, R9) | `InsufficientCredits`, `InvalidAmount` |
//! | [`capture`](Ledger::capture)`(op, t, p, hold)` | `held -= n`, `captured += n` (the client replied) | `UnknownHold`, `HoldAlreadySettled` |
//! | [`release`](Ledger::release)`(op, t, p, hold)` | `held -= n`, `available += n` (closed without reply) | `UnknownHold`, `HoldAlreadySettled` |
//! | [`charge`](Ledger::charge)`(op, t, p, n)` | `available -= n`, `captured += n` (hold + capture at once) | `InsufficientCredits`, `InvalidAmount` |
//! | [`refund`](Ledger::refund)`(op, t, p, charge, reason)` | full amount: `available += n`, `refunded += n`, at most once (R12) | `UnknownCharge`, `HoldNotCaptured`, `AlreadyRefunded` |
//! | [`set_topup_rule`](Ledger::set_topup_rule)`(op, t, p, rule)` | R10 threshold and amount (or none) | `InvalidAmount` |
//! | [`change_topup_rule`](Ledger::change_topup_rule)`(t, p, rule)` | the same, as the next rule change (op id from the rule version; last write wins) | `InvalidAmount` |
//!
//! `capture`, `release` and `refund` name their target by its op id; `refund`
//! accepts a charge op or a captured hold op.
//!
//! R10: a `hold` or `charge` that leaves `available` below the rule's threshold
//! carries `topup_requested: Some(amount)` in its [`Receipt`] (and event), unless
//! a request is already pending; a request stays pending until the next grant.
//! Releases and refunds raise the balance but post nothing, so they do not
//! clear it.
//!
//! **Invariant** (checked by [`Ledger::check_invariants`]) for every account:
//!
//! ```text
//! granted == available + held + captured - refunded
//! ```
//!
//! `captured` counts every capture ever made and `refunded` every credit given
//! back: a refund moves captured credits back to `available` without lowering
//! `captured`. Also `held` is the sum of the open holds and
//! `refunded <= captured`. All balances are `u64` and never negative.
//!
//! # Budget operations (per budget `(tenant, pro, name)`, R19-R24)
//!
//! | operation | effect | refused with |
//! |---|---|---|
//! | [`set_budget`](Ledger::set_budget)`(op, t, p, b, weekly)` | the weekly budget; applies from the next recharge | `InvalidAmount` |
//! | [`recharge`](Ledger::recharge)`(op, t, p, b)` | a new period: `available = weekly`, `spent = refunded = 0` (topped up, not added, R20) | `UnknownBudget` |
//! | [`spend`](Ledger::spend)`(op, t, p, b, n)` | `available -= n`, `spent += n` | `BudgetExhausted`, `UnknownBudget` |
//! | [`refund_spend`](Ledger::refund_spend)`(op, t, p, b, spend)` | gives a spend back to the current period's budget, at most once (a spend of an earlier period too: its refund is credited to this one, and lapses at the next recharge if unspent) | `UnknownSpend`, `AlreadyRefunded` |
//!
//! **Invariant**: `available + spent - refunded == weekly budget at the last
//! recharge`, so the net spend of a period never exceeds its budget plus what was
//! refunded into it, not even by one lead. A refund of a spend from an earlier
//! period (an R12 guarantee of a week or more always is one) is credited to the
//! current period: the budget is what the pro's pack pays for, so a refunded lead
//! must give back something the pro can use. Unspent, it lapses at the next
//! recharge with the rest of the week's budget (R20: topped up, not added).
//!
//! # Idempotency and errors
//!
//! Every operation carries an [`OpId`], unique within its account or budget
//! (non-empty, at most [`MAX_OP_ID_LEN`] bytes, no control characters: else
//! `InvalidOpId`). Op ids are derived from wire ids (`charge:<lead>:<pro>`), so
//! the bound is that of the longest derivation, not the 128 bytes of one wire id.
//! Repeating an applied op id with the same parameters returns the original
//! event with `replayed: true` and changes nothing; with other parameters it is
//! an `OpConflict`. A refused operation changes nothing, and an operation on
//! an account or budget that does not exist does not create it (only `grant`,
//! `set_topup_rule` and `set_budget` create).
//!
//! # Replay
//!
//! Events carry amounts, not resulting balances. [`Ledger::apply`] adds the
//! deltas (mod 2^64) and registers the op id without any check, so it is
//! infallible, idempotent (for the ordered facts below, while their id is among the
//! newest kept), and commutative: events of different shards may be
//! replayed in any interleaving and end in the same state. Config-like facts
//! (top-up rule, weekly budget) carry a version and the highest wins; budget
//! spends carry their recharge period. The facts whose ids join a queue of
//! newest ids (grants, top-up rules, budget settings and recharges,
//! [`LedgerEvent::is_ordered`]; see Memory) are the exception: replay applies
//! them in the order they were applied live. The engine gives it: it applies
//! them under its exclusive gate and logs them before opening it, and replays
//! the log in order.
//!
//! # Memory
//!
//! Op ids are kept so that retries are answered. They are pruned per lead:
//! when a shard forgets a lead (it closed, and its refund window and idempotency
//! retention are over), the shell calls [`Ledger::forget`] /
//! [`Ledger::forget_budget_ops`] with the op ids it built for that lead (it
//! knows them: they are derived from the lead id), at that point of the log,
//! live and in replay alike (`engine::money::forget_lead`). After that, a retry
//! of a forgotten id would be applied again, which is what a lead id published
//! again after retention needs: a new lead, charged again. So forget only ids
//! that no caller can still retry, and at the same point of the log in replay
//! as live (`forget` is not an event: replay must call it itself). Open holds
//! are never forgotten.
//!
//! Grants, top-up rules, budget settings and recharges belong to no lead: an
//! account keeps the ids of its newest 256 grants (`KEPT_ACCOUNT_OPS`) and, apart,
//! of its newest 16 rule changes (`KEPT_RULE_OPS`), a budget its newest 8 settings and 64
//! recharges, and forgets older ones as newer ones are applied. So a retry of
//! a grant is answered as long as fewer than 256 newer grants reached the same
//! pro (a platform retries a payment within minutes; 256 payments take a pro
//! years); the weekly housekeeping retries only this week's recharge and resumes,
//! always among the newest 64.
//!
//! # Concurrency
//!
//! Accounts live in a `DashMap` of `Arc<parking_lot::Mutex<_>>`: the map's shard
//! lock is released before an account is locked, each operation locks exactly
//! one account, and no code path holds two account locks, so there is no lock
//! order to get wrong. Check and update happen under the same account lock, so
//! racing debits never overdraw.

mod account;
mod budget;
mod error;
mod types;

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;

pub use error::{InvariantViolation, LedgerError};
pub use types::{
    BudgetFact, BudgetName, CreditDeltas, CreditFact, LedgerEvent, OpId, RefundReason, TopupRequest,
    TopupRule, MAX_OP_ID_LEN,
};

use crate::ids::{Millis, ProId, TenantId};
use account::{Account, CreditRequest, Decision};
use budget::{Budget, BudgetDecision, BudgetRequest};
use dashmap::DashMap;
use parking_lot::Mutex;
use rustc_hash::FxBuildHasher;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

type AccountKey = (TenantId, ProId);
type BudgetKey = (TenantId, ProId, BudgetName);

/// The answer to a successful (or replayed) operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The fact to write to the WAL (already applied to this ledger).
    pub event: LedgerEvent,
    /// True if the op id had been applied before: nothing changed now, and the
    /// event is the original one (already logged by the first caller).
    pub replayed: bool,
    /// R10: ask the platform for this many credits. Raised once; not again
    /// until a grant is posted. Part of the original fact, so a replay repeats it.
    pub topup_requested: Option<u64>,
}

/// The balances of one pro.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balance {
    pub available: u64,
    pub held: u64,
    pub captured: u64,
    pub refunded: u64,
    pub granted: u64,
    /// A top-up was requested and no grant has been posted since (R10).
    pub topup_pending: bool,
    pub topup_rule: Option<TopupRule>,
}

/// What [`Ledger::give_back_deferred`] gives back.
#[derive(Debug, Clone, Copy)]
pub enum GiveBack<'a> {
    /// A hold, released (R9).
    Release { hold: &'a OpId },
    /// A charge or captured hold, refunded in full (R12).
    Refund { charge: &'a OpId, reason: RefundReason },
    /// An auto-buy spend, back to its budget (R12, R23), decided at `at` (a refund
    /// once the budget's week is over goes to the next week's, R20).
    RefundSpend { budget: &'a BudgetName, spend: &'a OpId, at: Millis },
}

/// The state of one auto-buy budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BudgetBalance {
    pub weekly_budget: u64,
    /// Left to spend in the current period.
    pub available: u64,
    /// Spent in the current period (refunds not subtracted).
    pub spent: u64,
    /// Refunded into the current period (refunds of earlier periods' spends
    /// included: they are credited to the period they were decided in).
    pub refunded: u64,
    /// Number of recharges so far (0: never recharged, nothing to spend).
    pub period: u64,
    /// Number of times the weekly amount was set.
    pub settings: u64,
    /// The end of the local week the current period was topped up for (R20); from
    /// then on nothing is spent until the next recharge ([`BudgetBalance::available_at`]).
    pub spendable_until: Option<Millis>,
}

impl BudgetBalance {
    /// What can be spent at time `at` (nothing once its week is over, R20).
    pub fn available_at(&self, at: Millis) -> u64 {
        if self.spendable_until.is_some_and(|until| at >= until) {
            0
        } else {
            self.available
        }
    }

    /// Whether the current period's week is over at `at`: the budget awaits its
    /// weekly recharge.
    pub fn stale_at(&self, at: Millis) -> bool {
        self.spendable_until.is_some_and(|until| at >= until)
    }
}

/// The whole ledger state, for WAL snapshots. Opaque; restore with
/// [`Ledger::restore`]. Sorted by key, so equal ledgers give equal snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerSnapshot {
    accounts: Vec<(TenantId, ProId, Arc<Account>)>,
    budgets: Vec<(TenantId, ProId, BudgetName, Arc<Budget>)>,
}

/// An account or budget: behind its lock, and shared copy-on-write with a snapshot
/// (the first change after a snapshot took it copies it, once), so a snapshot copies
/// no op-id registry.
type Shared<T> = Arc<Mutex<Arc<T>>>;

impl LedgerSnapshot {
    /// Every tenant with an account or a budget.
    pub fn tenants(&self) -> impl Iterator<Item = &TenantId> {
        self.accounts.iter().map(|(t, _, _)| t).chain(self.budgets.iter().map(|(t, _, _, _)| t))
    }
}

/// Credits and budgets of every pro of every tenant.
#[derive(Default)]
pub struct Ledger {
    // FxHash: keys are platform-issued ids of authenticated tenants, and the
    // hash is on the hot path of every charge.
    accounts: DashMap<AccountKey, Shared<Account>, FxBuildHasher>,
    budgets: DashMap<BudgetKey, Shared<Budget>, FxBuildHasher>,
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Posts credits bought by the pro (or an R10 top-up).
    pub fn grant(
        &self,
        op: OpId,
        tenant: &TenantId,
        pro: &ProId,
        amount: u64,
    ) -> Result<Receipt, LedgerError> {
        self.credit(op, tenant, pro, CreditRequest::Grant { amount }, true)
    }

    /// Reserves credits (chat-only response, R9).
    pub fn hold(
        &self,
        op: OpId,
        tenant: &TenantId,
        pro: &ProId,
        amount: u64,
    ) -> Result<Receipt, LedgerError> {
        self.credit(op, tenant, pro, CreditRequest::Hold { amount }, false)
    }

    /// Turns the hold `hold` into a charge.
    pub fn capture(
        &self,
        op: OpId,
        tenant: &TenantId,
        pro: &ProId,
        hold: &OpId,
    ) -> Result<Receipt, LedgerError> {
        let hold = hold.clone();
        self.credit(op, tenant, pro, CreditRequest::Capture { hold }, false)
    }

    /// Gives the hold `hold` back to `available`.
    pub fn release(
        &self,
        op: OpId,
        tenant: &TenantId,
        pro: &ProId,
        hold: &OpId,
    ) -> Result<Receipt, LedgerError> {
        let hold = hold.clone();
        self.credit(op, tenant, pro, CreditRequest::Release { hold }, false)
    }

    /// Charges at once (a response or an auto-buy, R9).
    pub fn charge(
        &self,
        op: OpId,
        tenant: &TenantId,
        pro: &ProId,
        amount: u64,
    ) -> Result<Receipt, LedgerError> {
        self.credit(op, tenant, pro, CreditRequest::Charge { amount }, false)
    }

    /// Refunds a charge (or captured hold) in full, at most once (R12).
    pub fn refund(
        &self,
        op: OpId,
        tenant: &TenantId,
        pro: &ProId,
        charge: &OpId,
        reason: RefundReason,
    ) -> Result<Receipt, LedgerError> {
        let charge = charge.clone();
        let request = CreditRequest::Refund { charge, reason };
        self.credit(op, tenant, pro, request, false)
    }

    /// Sets (or with `None` removes) the automatic top-up rule (R10).
    pub fn set_topup_rule(
        &self,
        op: OpId,
        tenant: &TenantId,
        pro: &ProId,
        rule: Option<TopupRule>,
    ) -> Result<Receipt, LedgerError> {
        self.credit(op, tenant, pro, CreditRequest::SetTopupRule { rule }, true)
    }

    /// Sets (or with `None` removes) the R10 rule as the account's next rule change,
    /// for a caller with no idempotency key of its own (the wire's `set_topup_rule`
    /// carries none). The op id is `topup-rule:v<n>`, `n` the next rule version, taken
    /// under the account's lock: every call is one change and the last one wins, even
    /// several within one millisecond (a key built from the time made the second an
    /// `OpConflict`, and one built from the time and the rule answered a change back
    /// to an earlier rule as a replay of it, leaving the later rule in force). A call
    /// repeated after a timeout sets the same rule again, which changes nothing.
    pub fn change_topup_rule(
        &self,
        tenant: &TenantId,
        pro: &ProId,
        rule: Option<TopupRule>,
    ) -> Result<Receipt, LedgerError> {
        let request = CreditRequest::SetTopupRule { rule };
        self.credit_with(tenant, pro, request, true, true, |a| {
            OpId::new(format!("topup-rule:v{}", a.topup_rule_version() + 1))
        })
    }

    /// Sets the weekly budget of an auto-buy config (R19); creates the budget.
    pub fn set_budget(
        &self,
        op: OpId,
        tenant: &TenantId,
        pro: &ProId,
        budget: &BudgetName,
        weekly: u64,
    ) -> Result<Receipt, LedgerError> {
        let request = BudgetRequest::Set { weekly };
        self.budget_op(op, tenant, pro, budget, request, true)
    }

    /// Tops the budget up to its weekly budget (R20, R24): Monday 00:00 in the
    /// tenant's zone, and when a paused config resumes. The shell decides when.
    pub fn recharge(
        &self,
        op: OpId,
        tenant: &TenantId,
        pro: &ProId,
        budget: &BudgetName,
    ) -> Result<Receipt, LedgerError> {
        self.recharge_until(op, tenant, pro, budget, None)
    }

    /// [`Ledger::recharge`] for the local week that ends at `until` (R20): the budget
    /// is not spent from at or after it ([`Ledger::spend_at`]) until the next recharge.
    pub fn recharge_until(
        &self,
        op: OpId,
        tenant: &TenantId,
        pro: &ProId,
        budget: &BudgetName,
        until: Option<Millis>,
    ) -> Result<Receipt, LedgerError> {
        self.budget_op(op, tenant, pro, budget, BudgetRequest::Recharge { until }, false)
    }

    /// Spends from the budget, or refuses with `BudgetExhausted`: never
    /// overshoots.
    pub fn spend(
        &self,
        op: OpId,
        tenant: &TenantId,
        pro: &ProId,
        budget: &BudgetName,
        amount: u64,
    ) -> Result<Receipt, LedgerError> {
        let request = BudgetRequest::Spend { amount, at: None };
        self.budget_op(op, tenant, pro, budget, request, false)
    }

    /// [`Ledger::spend`] at time `at`: refused with `BudgetExhausted` (nothing
    /// available) once the week the budget was last topped up for is over (R20).
    pub fn spend_at(
        &self,
        op: OpId,
        tenant: &TenantId,
        pro: &ProId,
        budget: &BudgetName,
        amount: u64,
        at: Millis,
    ) -> Result<Receipt, LedgerError> {
        let request = BudgetRequest::Spend { amount, at: Some(at) };
        self.budget_op(op, tenant, pro, budget, request, false)
    }

    /// What gives credits or budget back ([`Ledger::release`], [`Ledger::refund`],
    /// [`Ledger::refund_spend`]), decided but not applied: nothing changes until the
    /// returned event (unless `replayed`) is passed to [`Ledger::apply`]. For a
    /// decision that must queue its log record before anyone can spend what it gives
    /// back (`engine::money`): a spend decided meanwhile would otherwise come before
    /// that record in the log, and survive a power cut that the record did not. Two
    /// of these for one op id must not be in flight at once (the engine decides a
    /// lead's money under its shard's lock).
    pub fn give_back_deferred(
        &self,
        op: OpId,
        tenant: &TenantId,
        pro: &ProId,
        what: GiveBack<'_>,
    ) -> Result<Receipt, LedgerError> {
        match what {
            GiveBack::Release { hold } => {
                let request = CreditRequest::Release { hold: hold.clone() };
                self.credit_with(tenant, pro, request, false, false, |_| op.clone())
            }
            GiveBack::Refund { charge, reason } => {
                let request = CreditRequest::Refund { charge: charge.clone(), reason };
                self.credit_with(tenant, pro, request, false, false, |_| op.clone())
            }
            GiveBack::RefundSpend { budget, spend, at } => {
                let request = BudgetRequest::Refund { spend: spend.clone(), at: Some(at) };
                self.budget_op_applying(op, tenant, pro, budget, request, false, false)
            }
        }
    }

    /// Refunds a spend, at most once (R12, R23).
    pub fn refund_spend(
        &self,
        op: OpId,
        tenant: &TenantId,
        pro: &ProId,
        budget: &BudgetName,
        spend: &OpId,
    ) -> Result<Receipt, LedgerError> {
        let request = BudgetRequest::Refund { spend: spend.clone(), at: None };
        self.budget_op(op, tenant, pro, budget, request, false)
    }

    /// Applies a logged event (WAL replay, or a follower). Infallible,
    /// idempotent and order-independent: see the module docs.
    pub fn apply(&self, event: &LedgerEvent) {
        match event {
            LedgerEvent::Credit { op, tenant, pro, fact } => {
                let account = self.account_or_create(tenant, pro);
                Arc::make_mut(&mut *account.lock()).apply(op, fact);
            }
            LedgerEvent::Budget { op, tenant, pro, budget, fact } => {
                let b = self.budget_or_create(tenant, pro, budget);
                Arc::make_mut(&mut *b.lock()).apply(op, fact);
            }
        }
    }

    /// The balances of a pro (all zero if it never had credits).
    pub fn balance(&self, tenant: &TenantId, pro: &ProId) -> Balance {
        let Some(account) = self.account(tenant, pro) else {
            return Balance::default();
        };
        let a = account.lock();
        Balance {
            available: a.available,
            held: a.held,
            captured: a.captured,
            refunded: a.refunded,
            granted: a.granted,
            topup_pending: a.topup_pending(),
            topup_rule: a.topup_rule(),
        }
    }

    /// The state of an auto-buy budget, if it was ever set.
    pub fn budget(&self, tenant: &TenantId, pro: &ProId, budget: &BudgetName) -> Option<BudgetBalance> {
        let b = self.budget_cell(tenant, pro, budget)?;
        let b = b.lock();
        Some(BudgetBalance {
            weekly_budget: b.weekly_budget,
            available: b.available(),
            spent: b.spent(),
            refunded: b.refunded(),
            period: b.period,
            settings: b.settings(),
            spendable_until: b.spendable_until,
        })
    }

    /// Whether `op` is applied to the budget (and still remembered): lets a caller
    /// skip repeating an operation it knows is done without taking any lock beyond
    /// the budget's own.
    pub fn budget_knows(&self, tenant: &TenantId, pro: &ProId, budget: &BudgetName, op: &OpId) -> bool {
        self.budget_cell(tenant, pro, budget).is_some_and(|b| b.lock().knows(op))
    }

    /// A budget's cell, out of the map (its shard lock released before it is locked).
    fn budget_cell(&self, tenant: &TenantId, pro: &ProId, budget: &BudgetName) -> Option<Shared<Budget>> {
        let key = (tenant.clone(), pro.clone(), budget.clone());
        self.budgets.get(&key).map(|e| Arc::clone(e.value()))
    }

    /// Drops the op-id records of a pro's credit ops (memory housekeeping; not
    /// an event). Returns how many were dropped; open holds are kept. See the
    /// module docs for when this is safe.
    pub fn forget(&self, tenant: &TenantId, pro: &ProId, ops: &[OpId]) -> usize {
        self.account(tenant, pro).map_or(0, |account| Arc::make_mut(&mut *account.lock()).forget(ops))
    }

    /// Like [`Ledger::forget`], for the ops of one budget.
    pub fn forget_budget_ops(
        &self,
        tenant: &TenantId,
        pro: &ProId,
        budget: &BudgetName,
        ops: &[OpId],
    ) -> usize {
        let key = (tenant.clone(), pro.clone(), budget.clone());
        let Some(b) = self.budgets.get(&key).map(|e| Arc::clone(e.value())) else {
            return 0;
        };
        let forgotten = Arc::make_mut(&mut *b.lock()).forget(ops);
        forgotten
    }

    /// Forgets, in every account and budget, the op ids about one lead and the
    /// account's pro (`<kind>:<lead>:<pro>`, [`OpId::for_lead`]) of the given kinds
    /// whose lead `keep(tenant, lead)` does not keep; open holds stay, as with
    /// [`Ledger::forget`]. Returns how many were forgotten. For a ledger restored from
    /// a snapshot of a release that never forgot them (`engine::money`).
    pub fn forget_lead_ops_where(
        &self,
        credit_kinds: &[&str],
        budget_kinds: &[&str],
        keep: impl Fn(&TenantId, &str) -> bool,
    ) -> usize {
        // The lead id between `<kind>:` and `:<pro>`: exact even when it holds a `:`.
        fn lead_of<'a>(op: &'a OpId, kinds: &[&str], pro: &ProId) -> Option<&'a str> {
            let rest = op.as_str().strip_suffix(pro.as_str())?.strip_suffix(':')?;
            kinds.iter().find_map(|k| rest.strip_prefix(k)?.strip_prefix(':'))
        }
        let mut forgotten = 0;
        for e in self.accounts.iter() {
            let (tenant, pro) = e.key();
            let mut account = e.value().lock();
            let stale: Vec<OpId> = account
                .op_ids()
                .filter(|op| lead_of(op, credit_kinds, pro).is_some_and(|lead| !keep(tenant, lead)))
                .cloned()
                .collect();
            if !stale.is_empty() {
                forgotten += Arc::make_mut(&mut *account).forget(&stale);
            }
        }
        for e in self.budgets.iter() {
            let (tenant, pro, _) = e.key();
            let mut budget = e.value().lock();
            let stale: Vec<OpId> = budget
                .op_ids()
                .filter(|op| lead_of(op, budget_kinds, pro).is_some_and(|lead| !keep(tenant, lead)))
                .cloned()
                .collect();
            if !stale.is_empty() {
                forgotten += Arc::make_mut(&mut *budget).forget(&stale);
            }
        }
        forgotten
    }

    /// How many op ids the ledger remembers (every account and budget): what
    /// [`Ledger::forget`] keeps bounded. For tests and memory accounting; takes
    /// every lock in turn.
    pub fn registered_ops(&self) -> usize {
        let accounts: usize = self.accounts.iter().map(|e| e.value().lock().registered_ops()).sum();
        let budgets: usize = self.budgets.iter().map(|e| e.value().lock().registered_ops()).sum();
        accounts + budgets
    }

    /// Checks the invariants of every account and budget (tests call it after
    /// every step; the shell may call it after recovery).
    pub fn check_invariants(&self) -> Result<(), InvariantViolation> {
        let LedgerSnapshot { accounts, budgets } = self.snapshot();
        for (tenant, pro, account) in accounts {
            account.check_invariants().map_err(|detail| InvariantViolation {
                account: format!("credits {tenant}/{pro}"),
                detail,
            })?;
        }
        for (tenant, pro, name, budget) in budgets {
            budget.check_invariants().map_err(|detail| InvariantViolation {
                account: format!("budget {tenant}/{pro}/{name}"),
                detail,
            })?;
        }
        Ok(())
    }

    /// The whole state, each account and budget shared with the live ledger (copy on
    /// write, so this copies no registry). Each account is taken under its own lock;
    /// operations running meanwhile may or may not be included, which replay
    /// tolerates because `apply` skips op ids the snapshot already holds.
    pub fn snapshot(&self) -> LedgerSnapshot {
        let accounts =
            self.accounts.iter().map(|e| (e.key().clone(), Arc::clone(e.value()))).collect::<Vec<_>>();
        let mut accounts: Vec<_> =
            accounts.into_iter().map(|((t, p), a)| (t, p, Arc::clone(&*a.lock()))).collect();
        accounts.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        let budgets =
            self.budgets.iter().map(|e| (e.key().clone(), Arc::clone(e.value()))).collect::<Vec<_>>();
        let mut budgets: Vec<_> =
            budgets.into_iter().map(|((t, p, n), b)| (t, p, n, Arc::clone(&*b.lock()))).collect();
        budgets.sort_by(|a, b| (&a.0, &a.1, &a.2).cmp(&(&b.0, &b.1, &b.2)));
        LedgerSnapshot { accounts, budgets }
    }

    /// A ledger holding exactly the snapshot's state.
    pub fn restore(snapshot: LedgerSnapshot) -> Self {
        let ledger = Self::new();
        for (t, p, a) in snapshot.accounts {
            ledger.accounts.insert((t, p), Arc::new(Mutex::new(a)));
        }
        for (t, p, n, b) in snapshot.budgets {
            ledger.budgets.insert((t, p, n), Arc::new(Mutex::new(b)));
        }
        ledger
    }

    fn account(&self, tenant: &TenantId, pro: &ProId) -> Option<Shared<Account>> {
        // Clone the Arc so the DashMap shard lock is released before the
        // account lock is taken.
        let key = (tenant.clone(), pro.clone());
        self.accounts.get(&key).map(|e| Arc::clone(e.value()))
    }

    fn account_or_create(&self, tenant: &TenantId, pro: &ProId) -> Shared<Account> {
        if let Some(a) = self.account(tenant, pro) {
            return a;
        }
        let key = (tenant.clone(), pro.clone());
        Arc::clone(self.accounts.entry(key).or_default().value())
    }

    fn budget_or_create(&self, tenant: &TenantId, pro: &ProId, budget: &BudgetName) -> Shared<Budget> {
        let key = (tenant.clone(), pro.clone(), budget.clone());
        if let Some(b) = self.budgets.get(&key) {
            return Arc::clone(b.value());
        }
        Arc::clone(self.budgets.entry(key).or_default().value())
    }

    fn credit(
        &self,
        op: OpId,
        tenant: &TenantId,
        pro: &ProId,
        request: CreditRequest,
        creates: bool,
    ) -> Result<Receipt, LedgerError> {
        self.credit_with(tenant, pro, request, creates, true, |_| op.clone())
    }

    /// [`Ledger::credit`] with the op id derived from the account, under its lock.
    fn credit_with(
        &self,
        tenant: &TenantId,
        pro: &ProId,
        request: CreditRequest,
        creates: bool,
        apply_now: bool,
        op_of: impl Fn(&Account) -> OpId,
    ) -> Result<Receipt, LedgerError> {
        let account = match self.account(tenant, pro) {
            Some(a) => a,
            None => {
                // Decide against an empty account before inserting one, so a
                // refused op leaves no trace. The real decision is taken again
                // under the lock below: another thread may create it meanwhile.
                let empty = Account::default();
                let op = op_of(&empty);
                validate_op(&op)?;
                let probe = empty.decide(&op, &request);
                if !creates {
                    return Err(refusal_of_empty(probe));
                }
                probe?;
                self.account_or_create(tenant, pro)
            }
        };
        let mut account = account.lock();
        let op = op_of(&account);
        validate_op(&op)?;
        let (fact, replayed) = match account.decide(&op, &request)? {
            Decision::Replay(fact) => (fact, true),
            Decision::New(fact) => {
                if apply_now {
                    let account = Arc::make_mut(&mut *account);
                    account.apply(&op, &fact);
                    debug_assert_eq!(account.check_invariants(), Ok(()));
                }
                (fact, false)
            }
        };
        drop(account);
        let topup_requested = fact.topup_requested();
        Ok(Receipt {
            event: LedgerEvent::Credit { op, tenant: tenant.clone(), pro: pro.clone(), fact },
            replayed,
            topup_requested,
        })
    }

    fn budget_op(
        &self,
        op: OpId,
        tenant: &TenantId,
        pro: &ProId,
        budget: &BudgetName,
        request: BudgetRequest,
        creates: bool,
    ) -> Result<Receipt, LedgerError> {
        self.budget_op_applying(op, tenant, pro, budget, request, creates, true)
    }

    #[allow(clippy::too_many_arguments)]
    fn budget_op_applying(
        &self,
        op: OpId,
        tenant: &TenantId,
        pro: &ProId,
        budget: &BudgetName,
        request: BudgetRequest,
        creates: bool,
        apply_now: bool,
    ) -> Result<Receipt, LedgerError> {
        validate_op(&op)?;
        let key = (tenant.clone(), pro.clone(), budget.clone());
        let b = match self.budgets.get(&key).map(|e| Arc::clone(e.value())) {
            Some(b) => b,
            None if creates => {
                // As for accounts: refuse before inserting anything.
                Budget::default().decide(budget, &op, &request)?;
                Arc::clone(self.budgets.entry(key).or_default().value())
            }
            None => return Err(LedgerError::UnknownBudget { budget: budget.clone() }),
        };
        let mut b = b.lock();
        let (fact, replayed) = match b.decide(budget, &op, &request)? {
            BudgetDecision::Replay(fact) => (fact, true),
            BudgetDecision::New(fact) => {
                if apply_now {
                    let b = Arc::make_mut(&mut *b);
                    b.apply(&op, &fact);
                    debug_assert_eq!(b.check_invariants(), Ok(()));
                }
                (fact, false)
            }
        };
        drop(b);
        Ok(Receipt {
            event: LedgerEvent::Budget {
                op,
                tenant: tenant.clone(),
                pro: pro.clone(),
                budget: budget.clone(),
                fact,
            },
            replayed,
            topup_requested: None,
        })
    }
}

/// Op ids are stored for as long as their lead lives: refuse unusable ones
/// before they reach the registry. Not [`OpId::validate`], which bounds an id
/// from the wire: an op id is derived from up to two of them ([`MAX_OP_ID_LEN`]).
fn validate_op(op: &OpId) -> Result<(), LedgerError> {
    let s = op.as_str();
    let reason = if s.is_empty() {
        "must not be empty"
    } else if s.len() > MAX_OP_ID_LEN {
        TOO_LONG
    } else if s.chars().any(char::is_control) {
        "contains control characters"
    } else {
        return Ok(());
    };
    Err(LedgerError::InvalidOpId(crate::ids::IdError { field: "op_id", reason }))
}

/// The refusal of an op id over [`MAX_OP_ID_LEN`] (a test checks the number).
const TOO_LONG: &str = "longer than 320 bytes";
const _: () = assert!(MAX_OP_ID_LEN == 320, "update TOO_LONG");

/// The error an operation gets from an account that does not exist.
fn refusal_of_empty(decision: Result<Decision, LedgerError>) -> LedgerError {
    decision.expect_err(
        "an empty account has no credits, holds, charges or op ids, so every \
         request that does not create an account is refused by it",
    )
}
