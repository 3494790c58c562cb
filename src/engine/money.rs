//! Carries out the core's money intents on the shared ledger.
//!
//! The core decides with a read-only view of the ledger ([`LedgerFunds`]); between
//! that read and the ledger operation another shard may have spent the same credits.
//! So every intent is executed here, atomically per account, and:
//! * a failed response charge refuses the command (`insufficient_credits`), nothing
//!   changed;
//! * a failed auto-buy budget spend drops that buyer from the decision (it goes to
//!   the retry list, R22) instead of overshooting the budget;
//! * what gives credits or budget back (a hold released, a refund) is decided with
//!   the decision but applied only once its record is queued in the log
//!   ([`execute_noting_drops`]'s `deferred`), so no spend can rely on it from a record
//!   earlier in the log (the log is durable in order).
//!
//! Ledger operations are idempotent by op id, so a replayed intent changes nothing.

use crate::core::shard::{Charge, ChargeMode, Event, Funds, RefundReason as CoreRefund, Reply, Shard, Skip};
use crate::core::Reject;
use crate::engine::lead_index::LeadIndex;
use crate::ids::{LeadId, ProId, ShardKey, TenantId};
use crate::ledger::{BudgetName, GiveBack, Ledger, LedgerError, LedgerEvent, OpId, RefundReason};
use rustc_hash::{FxHashMap, FxHashSet};

/// The tenant's pro directory, as the engine keeps it.
pub type Directory =
    dashmap::DashMap<(TenantId, ProId), std::sync::Arc<crate::core::model::Pro>, rustc_hash::FxBuildHasher>;

/// The ledger (and the pro directory) as the core's read-only [`Funds`] view for one
/// tenant.
pub struct LedgerFunds<'a> {
    pub ledger: &'a Ledger,
    pub tenant: &'a TenantId,
    pub directory: Option<&'a Directory>,
    /// The decision's time: a budget whose week is over has nothing to spend until
    /// its weekly recharge (R20, [`crate::ledger::BudgetBalance::available_at`]).
    pub now: crate::ids::Millis,
}

impl Funds for LedgerFunds<'_> {
    fn credits(&self, pro: &ProId) -> u64 {
        self.ledger.balance(self.tenant, pro).available
    }
    fn budget(&self, pro: &ProId, config: &str) -> u64 {
        self.ledger.budget(self.tenant, pro, &BudgetName::new(config)).map_or(0, |b| b.available_at(self.now))
    }
    fn offers_category(&self, pro: &ProId, category: &crate::ids::CategoryId) -> bool {
        let Some(directory) = self.directory else { return false };
        directory.get(&(self.tenant.clone(), pro.clone())).is_some_and(|p| p.categories.contains(category))
    }
}

fn refund_reason(r: CoreRefund) -> RefundReason {
    match r {
        CoreRefund::NotViewed => RefundReason::NotViewed,
        CoreRefund::InvalidContact => RefundReason::InvalidContact,
    }
}

/// R5/R21: whether `events` are a publish whose direct targets buy the lead from an
/// auto-buy budget (its `LeadAccepted`, then a direct `Offered` with a budget charge):
/// their spends are executed before the release's, which is planned again if the
/// ledger refuses one (`actor::execute`, `Shard::replan_release`).
pub fn buys_at_publish(events: &[Event]) -> bool {
    matches!(
        events,
        [Event::LeadAccepted { .. }, Event::Offered { release: false, grants, .. }, ..]
            if grants.iter().any(|g| matches!(g.charge, Some(Charge { mode: ChargeMode::Budget { .. }, .. })))
    )
}

/// Executes the money intents of `events` (decided at `now`) in order, editing the
/// events where a budget spend lost a race, and applies what they give back at once.
/// Returns the ledger facts to log with them. (The engine uses
/// [`execute_noting_drops`], which applies give-backs once their records are queued.)
pub fn execute(
    shard: &Shard,
    ledger: &Ledger,
    tenant: &TenantId,
    now: crate::ids::Millis,
    events: &mut [Event],
) -> Result<Vec<LedgerEvent>, Reject> {
    let mut deferred = Vec::new();
    let facts = execute_noting_drops(shard, ledger, tenant, now, events, &mut Vec::new(), &mut deferred)?;
    for fact in &deferred {
        ledger.apply(fact);
    }
    Ok(facts)
}

/// Executes the money intents of `events` in order, editing the events where a budget
/// spend lost a race, and returns the ledger facts to log with them; adds to `dropped` the `(lead, pro)` offers it took out of `events`
/// (their budget spend was refused), for [`without_dropped`], and to `deferred` the
/// facts that give credits or budget back (releases, refunds): decided and among the
/// returned facts to log, but not applied. The caller applies them
/// ([`Ledger::apply`]) once the records holding them are queued in the log, so that
/// no other shard can spend what they give back in a record that comes before theirs
/// (and would survive a power cut theirs did not): a spend decided after that is
/// queued after them, and the log is durable in order.
pub fn execute_noting_drops(
    shard: &Shard,
    ledger: &Ledger,
    tenant: &TenantId,
    now: crate::ids::Millis,
    events: &mut [Event],
    dropped: &mut Vec<(LeadId, ProId)>,
    deferred: &mut Vec<LedgerEvent>,
) -> Result<Vec<LedgerEvent>, Reject> {
    let mut facts = Vec::new();
    let keep = |r: crate::ledger::Receipt, facts: &mut Vec<LedgerEvent>| {
        if !r.replayed {
            facts.push(r.event);
        }
    };
    let give_back = |op: OpId,
                     pro: &ProId,
                     what: GiveBack<'_>,
                     facts: &mut Vec<LedgerEvent>,
                     deferred: &mut Vec<LedgerEvent>| {
        let r = ledger.give_back_deferred(op, tenant, pro, what)?;
        if !r.replayed {
            deferred.push(r.event.clone());
            facts.push(r.event);
        }
        Ok::<(), LedgerError>(())
    };
    for ev in events.iter_mut() {
        match ev {
            Event::Offered { grants, at, .. } => {
                let mut lost = Vec::new();
                for g in grants.iter() {
                    let Some(Charge { op, credits, mode: ChargeMode::Budget { config } }) = &g.charge else {
                        continue;
                    };
                    let budget = BudgetName::new(config);
                    match ledger.spend_at(OpId::new(op), tenant, &g.pro, &budget, *credits, *at) {
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
                // its rotation turn and waits for the retry window (R22). A direct
                // target of a publish did not receive the lead: its seat goes to the
                // release (`Shard::replan_release`, called by `actor::execute`).
                for (pro, skip) in lost {
                    shard.drop_grant(ev, &pro, skip);
                    if let Event::Offered { lead, .. } = ev {
                        dropped.push((lead.clone(), pro));
                    }
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
                let op = OpId::for_lead(CAPTURE, lead, pro);
                match ledger.capture(op, tenant, pro, &OpId::new(&c.op)) {
                    Ok(r) => keep(r, &mut facts),
                    Err(e) => settle_failed("capture", tenant, lead, pro, &e),
                }
            }
            Event::LeadClosed { lead, releases, .. } => {
                for (pro, c) in releases.iter() {
                    let op = OpId::for_lead(RELEASE, lead, pro);
                    let hold = OpId::new(&c.op);
                    match give_back(op, pro, GiveBack::Release { hold: &hold }, &mut facts, deferred) {
                        Ok(()) => {}
                        Err(e) => settle_failed("release", tenant, lead, pro, &e),
                    }
                }
            }
            Event::Refunded { lead, pro, charge, reason, at } => {
                let op = OpId::for_lead(REFUND, lead, pro);
                let paid = OpId::new(&charge.op);
                // Decided now, whatever time it is dated (a guarantee's refund is dated
                // at its deadline, and a tick may run it after the week ended): a budget
                // whose week is over by then gets it in the next week (R20).
                let decided = (*at).max(now);
                let what = match &charge.mode {
                    ChargeMode::Budget { config } => {
                        GiveBack::RefundSpend { budget: &BudgetName::new(config), spend: &paid, at: decided }
                    }
                    _ => GiveBack::Refund { charge: &paid, reason: refund_reason(*reason) },
                };
                match give_back(op, pro, what, &mut facts, deferred) {
                    Ok(()) => {}
                    Err(e) => settle_failed("refund", tenant, lead, pro, &e),
                }
            }
            _ => {}
        }
    }
    Ok(facts)
}

/// Kinds of the op ids this module derives for a lead and a pro (`<kind>:<lead>:<pro>`,
/// [`OpId::for_lead`]).
const CAPTURE: &str = "capture";
const RELEASE: &str = "release";
const REFUND: &str = "refund";
/// Every op id kind about one lead and one pro on the pro's credits: the core's
/// response intents (`charge`, `hold`, see `op_id` in `core::shard`) and this module's
/// settlements of them.
const CREDIT_KINDS: [&str; 5] = ["charge", "hold", CAPTURE, RELEASE, REFUND];

/// R1/R9: a lead id the shard forgets (its idempotency retention is over) may be
/// published again as a new lead, whose money ops get the same ids as the old one's
/// (`charge:<lead>:<pro>`...): the ledger forgets the old ones with it, or it would
/// answer the new lead's charge as a repeat of the old, and charge nothing.
///
/// The op ids are read from the shard as it is *before* it applies `LeadForgotten {
/// lead }` and forgotten after the ledger facts logged in the same decision: in replay
/// (`actor::replay_into`) here, live in two halves ([`lead_ops`] as the decision is
/// applied, [`forget_ops`] once its records are queued and their give-backs applied,
/// `actor::execute`). The same op ids are forgotten at the same point of the log, so
/// replay ends in the live state. Safe: nothing can still retry an op
/// of the lead (requests about it are answered `unknown_lead` from here on, its
/// deadlines are gone, a chat-only hold was settled when it closed; the ledger keeps
/// an open hold anyway). Other leads' ops never share these ids.
pub fn forget_lead(shard: &Shard, ledger: &Ledger, tenant: &TenantId, lead: &LeadId) {
    let mut ops = Vec::new();
    lead_ops(shard, tenant, lead, &mut ops);
    forget_ops(ledger, &ops);
}

/// The op ids one forgotten lead leaves in the ledger ([`forget_lead`]'s first half,
/// read from the shard before it applies `LeadForgotten`): live, they are forgotten
/// ([`forget_ops`]) once the decision's records are queued and the facts they give
/// back are applied, as replay does (a record's facts, then its events).
pub fn lead_ops(shard: &Shard, tenant: &TenantId, lead: &LeadId, out: &mut Vec<LeadOps>) {
    let Some(st) = shard.lead(lead) else { return };
    // Only a pro that responded or bought has ops on the lead.
    for o in st.offers.iter().filter(|o| o.responded_at().is_some() || o.charge.is_some()) {
        let credit: Vec<OpId> = CREDIT_KINDS.iter().map(|k| OpId::for_lead(k, lead, &o.pro)).collect();
        let budget = o.charge.as_deref().and_then(|c| match &c.mode {
            ChargeMode::Budget { config } => {
                debug_assert!(c.op.starts_with(BUDGET_KINDS[0]), "a spend's op id is buy:<lead>:<pro>");
                Some((BudgetName::new(config), vec![OpId::new(&c.op), OpId::for_lead(REFUND, lead, &o.pro)]))
            }
            _ => None,
        });
        out.push(LeadOps { tenant: tenant.clone(), pro: o.pro.clone(), credit, budget });
    }
}

/// One pro's op ids on a forgotten lead ([`lead_ops`]).
pub struct LeadOps {
    tenant: TenantId,
    pro: ProId,
    credit: Vec<OpId>,
    budget: Option<(BudgetName, Vec<OpId>)>,
}

/// Forgets what [`lead_ops`] listed.
pub fn forget_ops(ledger: &Ledger, ops: &[LeadOps]) {
    for o in ops {
        ledger.forget(&o.tenant, &o.pro, &o.credit);
        if let Some((budget, ops)) = &o.budget {
            ledger.forget_budget_ops(&o.tenant, &o.pro, budget, ops);
        }
    }
}

/// The op ids of leads no shard holds any more, forgotten: what a ledger restored from
/// a snapshot of a release before [`forget_lead`] still remembers of the leads it
/// forgot (each would make the same id, published again, answered as a repeat of its
/// old charge). Called once a snapshot is restored, before the log after it is
/// replayed, with the snapshot's own shards: the leads they hold at its cut are
/// exactly those whose ops [`forget_lead`] has not forgotten; for a snapshot of this
/// release it finds nothing. Returns how many were forgotten.
///
/// Whether a shard holds a lead: `index` (the snapshot's lead index) names the shard of
/// nearly every one; it is copied after the cut, so a lead forgotten since is missing
/// from it, and the set of every lead the shards hold is built only for a lead it does
/// not name (367 ms for a million leads, BENCHMARKS).
pub fn forget_ops_of_leads_not_held(
    ledger: &Ledger,
    index: &LeadIndex,
    shards: &FxHashMap<ShardKey, Shard>,
) -> usize {
    let all: std::cell::OnceCell<FxHashSet<(&TenantId, &LeadId)>> = std::cell::OnceCell::new();
    let held = |t: &TenantId, lead: &str| {
        let lead = LeadId::new(lead);
        let named = index.shard_of(t, &lead).and_then(|k| shards.get(&k));
        named.is_some_and(|sh| sh.lead(&lead).is_some())
            || all
                .get_or_init(|| {
                    shards.values().flat_map(|sh| sh.lead_ids().map(move |l| (&sh.key.tenant, l))).collect()
                })
                .contains(&(t, &lead))
    };
    ledger.forget_lead_ops_where(&CREDIT_KINDS, &BUDGET_KINDS, held)
}

/// Every op id kind about one lead and one pro in an auto-buy budget: the core's spend
/// (`buy`, see `op_id` in `core::shard`) and its refund.
const BUDGET_KINDS: [&str; 2] = ["buy", REFUND];

/// A capture, release or refund the core decided and the ledger refused. Its inputs
/// are ids the core took from the ledger's own facts (the hold, the charge) and an op
/// id that always fits (`MAX_OP_ID_LEN` admits every id derived from valid ids), so
/// this is a core and ledger that disagree: a bug, never an expected outcome. The
/// decision stays logged (the shard has moved on), so it is logged loudly, and tests
/// (debug builds) stop at it. Counted in `rota_ledger_settle_failures_total` (alert
/// `RotaLedgerSettleFailed`).
fn settle_failed(what: &'static str, tenant: &TenantId, lead: &LeadId, pro: &ProId, e: &LedgerError) {
    // Registered at 0 for each `op` at start (`telemetry::Metrics`), so that the
    // alert's `increase` sees the first one.
    metrics::counter!(crate::telemetry::LEDGER_SETTLE_FAILURES, "op" => what).increment(1);
    tracing::error!(
        tenant = %tenant, lead_id = %lead, pro_id = %pro, error = %e,
        "{what} refused by the ledger: the core and the ledger disagree"
    );
    if cfg!(debug_assertions) {
        panic!("{what} of lead {lead} for pro {pro} refused by the ledger: {e}");
    }
}

/// R1: the publish reply lists what was bought. The core builds the reply with the
/// decision, before [`execute`] carried it out; an auto-buy spend the ledger refused
/// there took its offer out of the events (`dropped`), so it leaves the reply too,
/// which then says what the events say, as a republish (answered from the state the
/// events built) does.
pub fn without_dropped(reply: &mut Reply, dropped: &[(LeadId, ProId)]) {
    if let Reply::Lead(outcome) = reply {
        outcome.offers.retain(|(pro, _)| !dropped.iter().any(|(l, p)| l == &outcome.lead && p == pro));
    }
}
