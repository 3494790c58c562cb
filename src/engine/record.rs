//! What rota writes to the WAL, and what subscribers see of it.
//!
//! One [`WalRecord`] per decision: the core's events for one shard plus the ledger
//! facts the shell executed for them. Replay applies both; stream events are derived
//! from the same record by the same function live and during replay, so stream
//! sequence numbers survive restarts.

use crate::core::shard::{ChargeMode, Event, Shard};
use crate::core::{OfferStatus, Pro, RevealedContact};
use crate::ids::{ProId, ShardKey, TenantId};
use crate::ledger::{CreditFact, LedgerEvent};
use crate::protocol::{LeadSummary, StreamEvent};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// WAL record type byte for [`WalRecord`] (MessagePack payload).
pub const RECORD_KIND: u8 = 1;

/// One record of a shard decision logged as several (see
/// [`crate::engine::actor::split_record`]): replay applies the decision's records only
/// once the last is there, so a crash between two of them leaves none applied (a tick's
/// first record sweeps every due deadline; the events that handle them may be in the
/// later ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    /// The decision's id: the same in each of its records, unique in the log.
    pub group: u64,
    /// Whether this is the decision's last record.
    pub last: bool,
}

impl Part {
    /// A new decision's id: unique in this process (a counter) and across restarts
    /// (the counter starts from the wall clock's nanoseconds at the first call).
    pub fn next_group() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        if NEXT.load(Ordering::Relaxed) == 0 {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                .max(1);
            let _ = NEXT.compare_exchange(0, nanos, Ordering::Relaxed, Ordering::Relaxed);
        }
        NEXT.fetch_add(1, Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WalRecord {
    /// A shard decision: its events, and the money moved for them. `part` is set when
    /// the decision is logged as several records (absent in records written before
    /// 2026-12-07: each applied as it comes).
    Shard {
        key: ShardKey,
        events: Vec<Event>,
        money: Vec<LedgerEvent>,
        #[serde(default)]
        part: Option<Part>,
    },
    /// Money moved outside any shard (grants, top-up rules, budgets).
    Ledger { tenant: TenantId, money: Vec<LedgerEvent> },
    /// Order-request facts of one tenant (R25-R27).
    Orders { tenant: TenantId, events: Vec<crate::core::orders::OrderEvent> },
    /// The tenant's pro directory (which shards a pro covers).
    ProDirectory { tenant: TenantId, pro: ProId, profile: Option<Arc<Pro>> },
    /// The tenant's policy from this point of the log on (its policy file's text,
    /// [`crate::core::Policy::to_toml`]): logged at a start that finds the
    /// configuration's policy differs from the last one logged, and at a reload that
    /// changes it, with no decision in flight. Recovery replays every decision under
    /// the policy it was made with (stride weights, response and guarantee windows,
    /// caps are applied from the policy, not carried by each event).
    Policy { tenant: TenantId, policy: String },
}

pub fn encode(rec: &WalRecord) -> Vec<u8> {
    crate::protocol::with_scratch(|buf| {
        rmp_serde::encode::write(buf, rec).expect("WAL records are plain data and always serialise");
        buf.to_vec()
    })
}

pub fn decode(bytes: &[u8]) -> Result<WalRecord, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}

/// Stream events of one core event, computed against the shard state *before* the
/// event is applied (the lead is still there).
pub fn shard_stream_events(shard: &Shard, ev: &Event, out: &mut Vec<StreamEvent>) {
    match ev {
        Event::LeadAccepted { lead, price, at, release_at, expires_at, .. } => {
            out.push(StreamEvent::LeadAccepted {
                lead: lead.id.clone(),
                zone: lead.zone.clone(),
                category: lead.category.clone(),
                price: *price,
                release_at: *release_at,
                expires_at: *expires_at,
                at: *at,
            })
        }
        Event::LeadRejected { lead, reason, at, .. } => out.push(StreamEvent::LeadRejected {
            lead: lead.clone(),
            reason: reason.as_str().into(),
            at: *at,
        }),
        Event::Offered { lead, at, grants, .. } => {
            let Some(st) = shard.lead(lead) else { return };
            // Built once per release and shared by every offer of it.
            let summary = std::sync::Arc::new(LeadSummary::of(&st.lead));
            let components = st.price_components.as_deref().cloned().map(std::sync::Arc::new);
            let window = shard.policy().response_window;
            for g in grants {
                let respond_by = match g.kind {
                    crate::core::OfferKind::Contact | crate::core::OfferKind::AutoBuy => None,
                    _ => window.map(|w| at.saturating_add(w)),
                };
                // R11: a pro farther than `far_away_km` pays the far-away price; its
                // offer shows that price and the components that make it.
                let price = shard.price_of(st, &g.pro);
                let components = if price == st.price {
                    components.clone()
                } else {
                    shard.price_components_of(st, &g.pro).map(std::sync::Arc::new)
                };
                out.push(StreamEvent::Offered {
                    lead: lead.clone(),
                    pro: g.pro.clone(),
                    kind: g.kind,
                    price,
                    respond_by,
                    at: *at,
                    summary: summary.clone(),
                    price_components: components,
                });
            }
        }
        Event::Responded { lead, pro, at, .. } => {
            if let Some(st) = shard.lead(lead) {
                out.push(StreamEvent::Responded {
                    lead: lead.clone(),
                    pro: pro.clone(),
                    at: *at,
                    contact: RevealedContact::for_client(&st.lead.client),
                });
                // R6: the response that fills the lead closes it to the others.
                for other in shard.inactivated_by(ev) {
                    out.push(status(lead, &other, OfferStatus::Inactive, *at));
                }
            }
        }
        Event::OfferOpened { lead, pro, at } => out.push(status(lead, pro, OfferStatus::Opened, *at)),
        Event::Declined { lead, pro, at, .. } => out.push(status(lead, pro, OfferStatus::Declined, *at)),
        Event::OfferExpired { lead, pro, at } => out.push(status(lead, pro, OfferStatus::Expired, *at)),
        Event::ClientReplied { lead, pro, at, .. } => {
            out.push(status(lead, pro, OfferStatus::AwaitingResponse, *at))
        }
        Event::ProReplied { lead, pro, at } => out.push(status(lead, pro, OfferStatus::Replied, *at)),
        Event::Completed { lead, pro, at } => out.push(status(lead, pro, OfferStatus::Completed, *at)),
        Event::LeadClosed { lead, at, .. } => {
            // Each pro still holding an open offer learns it on its own feed (a
            // `lead_closed` names no pro).
            for pro in shard.inactivated_by(ev) {
                out.push(status(lead, &pro, OfferStatus::Inactive, *at));
            }
            out.push(StreamEvent::LeadClosed { lead: lead.clone(), at: *at })
        }
        _ => {}
    }
}

fn status(lead: &crate::ids::LeadId, pro: &ProId, s: OfferStatus, at: i64) -> StreamEvent {
    StreamEvent::OfferStatus { lead: lead.clone(), pro: pro.clone(), status: s.as_str().into(), at }
}

/// Stream events of ledger facts (money moved, top-ups requested).
pub fn money_stream_events(money: &[LedgerEvent], out: &mut Vec<StreamEvent>) {
    for m in money {
        match m {
            LedgerEvent::Credit { op, pro, fact, .. } => {
                let (movement, credits, reason) = match fact {
                    CreditFact::Granted { amount } => ("granted", *amount, None),
                    CreditFact::Held { amount, .. } => ("held", *amount, None),
                    CreditFact::Captured { amount, .. } => ("captured", *amount, None),
                    CreditFact::Released { amount, .. } => ("released", *amount, None),
                    CreditFact::Charged { amount, .. } => ("charged", *amount, None),
                    CreditFact::Refunded { amount, reason, .. } => {
                        ("refunded", *amount, Some(reason.code().into()))
                    }
                    CreditFact::TopupRuleSet { .. } => continue,
                };
                out.push(StreamEvent::Credits {
                    pro: pro.clone(),
                    op: op.as_str().into(),
                    movement: movement.into(),
                    credits,
                    reason,
                });
                if let Some(amount) = fact.topup_requested() {
                    out.push(StreamEvent::TopupRequested { pro: pro.clone(), credits: amount });
                }
            }
            LedgerEvent::Budget { op, pro, fact, .. } => {
                use crate::ledger::BudgetFact as B;
                let (movement, credits) = match fact {
                    B::Spent { amount, .. } => ("budget_spent", *amount),
                    B::Recharged { to, .. } => ("budget_recharged", *to),
                    B::Refunded { amount, .. } => ("budget_refunded", *amount),
                    B::Set { .. } => continue,
                };
                out.push(StreamEvent::Credits {
                    pro: pro.clone(),
                    op: op.as_str().into(),
                    movement: movement.into(),
                    credits,
                    reason: None,
                });
            }
        }
    }
}

/// Whether a charge mode takes credits (as opposed to a budget).
pub fn is_credit(mode: &ChargeMode) -> bool {
    !matches!(mode, ChargeMode::Budget { .. })
}
