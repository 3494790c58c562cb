//! R6/R7 on the stream: a pro whose open offer a response fills or a close ends is
//! told on its own feed (`offer_status` `inactive`; `lead_closed` names no pro).

mod common;

use common::*;
use rota::core::shard::{Command, OfferAction};
use rota::protocol::StreamEvent;

/// The stream events of one decision, as the engine builds them (each against the
/// state before its event is applied).
fn stream(h: &mut Harness, now: i64, cmd: Command) -> Vec<StreamEvent> {
    let d = h.shard.decide(now, &cmd, &h.funds).unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let mut out = Vec::new();
    for ev in &d.events {
        rota::engine::record::shard_stream_events(&h.shard, ev, &mut out);
        apply_checked(&mut h.shard, ev);
    }
    out
}

/// `(pro, status)` of every `offer_status` event.
fn statuses(events: &[StreamEvent]) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = events
        .iter()
        .filter_map(|e| match e {
            StreamEvent::OfferStatus { pro, status, .. } => Some((pro.to_string(), status.clone())),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

fn respond(lead: &str, pro: &str) -> Command {
    Command::Offer { lead: lid(lead), pro: pid(pro), action: OfferAction::Respond }
}

#[test]
fn r6_r7_pros_whose_offers_a_response_fills_or_a_close_ends_are_told_inactive() {
    let mut h = Harness::new(shared_policy());
    let pros = ["d", "g1", "g2", "g3", "g4", "g5", "g6"];
    for p in pros {
        h.ok(T0, Command::UpsertPro { pro: pro(p) });
    }
    // One direct target: four generic seats of five (R6).
    let mut l = lead("L1", T0);
    l.direct = vec![pid("d")];
    h.ok(T0, Command::PublishLead { lead: l.into() });
    h.ok(T0 + 30 * M, Command::Tick);
    for p in ["g1", "g2", "g3"] {
        assert_eq!(statuses(&stream(&mut h, T0 + 31 * M, respond("L1", p))), vec![]);
    }
    // The fourth generic response fills the generic seats: the other generic offers
    // end, the direct target's stays open (its own seat).
    let s = stream(&mut h, T0 + 32 * M, respond("L1", "g4"));
    let inactive = |v: &[&str]| v.iter().map(|p| (p.to_string(), "inactive".to_string())).collect::<Vec<_>>();
    assert_eq!(statuses(&s), inactive(&["g5", "g6"]));
    assert_eq!(statuses(&stream(&mut h, T0 + 33 * M, respond("L1", "d"))), vec![]);

    // A close ends every offer still open, each told on its own feed, then
    // `lead_closed`.
    h.ok(T0 + 34 * M, Command::PublishLead { lead: lead("L2", T0 + 34 * M).into() });
    assert!(h.shard.lead(&lid("L2")).is_some_and(|st| !st.offers.is_empty()));
    stream(&mut h, T0 + 35 * M, respond("L2", "g1"));
    let s = stream(&mut h, T0 + 34 * M + 48 * 60 * M, Command::Tick);
    // (g1 replied: its offer is not inactive; L1 closes in the same tick with no offer
    // left open.)
    assert_eq!(statuses(&s), inactive(&["d", "g2", "g3", "g4", "g5", "g6"]));
    assert!(matches!(s.last(), Some(StreamEvent::LeadClosed { .. })), "{s:?}");
}
