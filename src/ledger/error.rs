//! Why a ledger operation was refused. A refused operation changes nothing.

use super::types::{BudgetName, OpId};
use crate::ids::IdError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    /// R9: the pro cannot pay; `insufficient_credits` on the wire.
    #[error("insufficient credits: {available} available, {needed} needed")]
    InsufficientCredits { available: u64, needed: u64 },
    /// Hard budget: buying would overshoot the auto-buy budget.
    #[error("auto-buy budget exhausted: {available} available, {needed} needed")]
    BudgetExhausted { available: u64, needed: u64 },
    #[error("no hold with op id {hold} on this account")]
    UnknownHold { hold: OpId },
    #[error("no charge or captured hold with op id {charge} on this account")]
    UnknownCharge { charge: OpId },
    #[error("hold {hold} was not captured, so there is nothing to refund")]
    HoldNotCaptured { hold: OpId },
    #[error("hold {hold} was already settled by op {by}")]
    HoldAlreadySettled { hold: OpId, by: OpId },
    #[error("{op} was already refunded by op {by}")]
    AlreadyRefunded { op: OpId, by: OpId },
    #[error("no spend with op id {spend} on budget {budget}")]
    UnknownSpend { budget: BudgetName, spend: OpId },
    #[error("no auto-buy budget named {budget} for this pro (set_budget first)")]
    UnknownBudget { budget: BudgetName },
    #[error("op id {op} was already used for a different {existing} operation")]
    OpConflict { op: OpId, existing: &'static str },
    /// Empty, longer than [`MAX_OP_ID_LEN`](super::MAX_OP_ID_LEN) bytes, or with
    /// control characters.
    #[error("invalid op id: {0}")]
    InvalidOpId(IdError),
    #[error("{field} must be greater than zero")]
    InvalidAmount { field: &'static str },
    #[error("adding {amount} credits would overflow the {field} balance")]
    AmountOverflow { field: &'static str, amount: u64 },
}

/// A broken ledger invariant: a bug, never an expected outcome.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ledger invariant broken for {account}: {detail}")]
pub struct InvariantViolation {
    pub account: String,
    pub detail: String,
}
