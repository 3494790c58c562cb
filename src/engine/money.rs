//! Carries out the core's money intents on the shared ledger.
//!
//! The core decides with a read-only view of the ledger ([`LedgerFunds`]); between
//! that read and the ledger operation another shard may have spent the same credits.
//! So every intent is executed here, atomically per account, and:
//! * a failed response charge refuses the command (`insufficient_credits`), nothing
//!   changed;
//! * a failed auto-buy budget spend drops that buyer from the decision (it goes to
//!   the retry list, R22) instead of overshooting the budget.
//!
//! Ledger operations are idempotent by op id, so a replayed intent changes nothing.

use crate::core::shard::{Charge, ChargeMode, Event, Funds, RefundReason as CoreRefund, Shard, Skip};
use crate::core::Reject;
use crate::ids::{ProId, TenantId};
use crate::ledger::{BudgetName, Ledger, LedgerError, LedgerEvent, OpId, RefundReason};

/// The ledger as the core's read-only [`Funds`] view for one tenant.
pub struct LedgerFunds<'a> {
    pub ledger: &'a Ledger,
    pub tenant: &'a TenantId,
}

impl Funds for LedgerFunds<'_> {
    fn credits(&self, pro: &ProId) -> u64 {
        self.ledger.balance(self.tenant, pro).available
    }
    fn budget(&self, pro: &ProId, config: &str) -> u64 {
        self.ledger.budget(self.tenant, pro, &BudgetName::new(config)).map_or(0, |b| b.available)
    }
}

fn refund_reason(r: CoreRefund) -> RefundReason {
    match r {
        CoreRefund::NotViewed => RefundReason::NotViewed,
        CoreRefund::InvalidContact => RefundReason::InvalidContact,
    }
}

/// Executes the money intents of `events` in order, editing the events where a
/// budget spend lost a race. Returns the ledger facts to log with them.
pub fn execute(
    shard: &Shard,
    ledger: &Ledger,
    tenant: &TenantId,
    events: &mut [Event],
) -> Result<Vec<LedgerEvent>, Reject> {
    let mut facts = Vec::new();
    let keep = |r: crate::ledger::Receipt, facts: &mut Vec<LedgerEvent>| {
        if !r.replayed {
            facts.push(r.event);
        }
    };
    for ev in events.iter_mut() {
        match ev {
            Event::Offered { grants, .. } => {
                let mut lost = Vec::new();
                for g in grants.iter() {
                    let Some(Charge { op, credits, mode: ChargeMode::Budget { config } }) = &g.charge else {
                        continue;
                    };
                    match ledger.spend(OpId::new(op), tenant, &g.pro, &BudgetName::new(config), *credits) {
                        Ok(r) => keep(r, &mut facts),
                        Err(LedgerError::BudgetExhausted { available, needed }) => {
                            lost.push((g.pro.clone(), Skip::BudgetExhausted { available, price: needed }))
                        }
                        Err(e) => {
                            tracing::error!(tenant = %tenant, pro_id = %g.pro, error = %e, "auto-buy spend failed");
                            lost.push((
                                g.pro.clone(),
                                Skip::BudgetExhausted { available: 0, price: *credits },
                            ))
                        }
                    }
                }
                // Lost a race with another shard for the same budget: that buyer keeps
                // its rotation turn and waits for the retry window (R22).
                for (pro, skip) in lost {
                    shard.drop_grant(ev, &pro, skip);
                }
            }
            Event::Responded { pro, charge: Some(c), .. } => {
                let res = match c.mode {
                    ChargeMode::Capture => ledger.charge(OpId::new(&c.op), tenant, pro, c.credits),
                    ChargeMode::Hold => ledger.hold(OpId::new(&c.op), tenant, pro, c.credits),
                    ChargeMode::Budget { .. } => continue,
                };
                match res {
                    Ok(r) => keep(r, &mut facts),
                    // A response decision carries exactly one money intent, so nothing
                    // was taken before this refusal.
                    Err(LedgerError::InsufficientCredits { available, needed }) => {
                        return Err(Reject::InsufficientCredits { available, needed });
                    }
                    Err(e) => {
                        return Err(Reject::InvalidField(crate::core::field_err("credits", e.to_string())))
                    }
                }
            }
            Event::ClientReplied { lead, pro, capture: Some(c), .. } => {
                let op = OpId::for_lead("capture", lead, pro);
                match ledger.capture(op, tenant, pro, &OpId::new(&c.op)) {
                    Ok(r) => keep(r, &mut facts),
                    Err(e) => tracing::error!(tenant = %tenant, pro_id = %pro, error = %e, "capture failed"),
                }
            }
            Event::LeadClosed { lead, releases, .. } => {
                for (pro, c) in releases.iter() {
                    let op = OpId::for_lead("release", lead, pro);
                    match ledger.release(op, tenant, pro, &OpId::new(&c.op)) {
                        Ok(r) => keep(r, &mut facts),
                        Err(e) => {
                            tracing::error!(tenant = %tenant, pro_id = %pro, error = %e, "release failed")
                        }
                    }
                }
            }
            Event::Refunded { lead, pro, charge, reason, .. } => {
                let op = OpId::for_lead("refund", lead, pro);
                let res = match &charge.mode {
                    ChargeMode::Budget { config } => {
                        ledger.refund_spend(op, tenant, pro, &BudgetName::new(config), &OpId::new(&charge.op))
                    }
                    _ => ledger.refund(op, tenant, pro, &OpId::new(&charge.op), refund_reason(*reason)),
                };
                match res {
                    Ok(r) => keep(r, &mut facts),
                    Err(e) => tracing::error!(tenant = %tenant, pro_id = %pro, error = %e, "refund failed"),
                }
            }
            _ => {}
        }
    }
    Ok(facts)
}
