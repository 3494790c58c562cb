//! R21/R22: pros whose auto-buy budget is spent are parked out of the rotation's scan
//! (a lead does not look each of them up) and lose nothing by it: they wait for the
//! leads left short like scanned pros do, and come back with their budget.

mod common;

use common::*;
use rota::core::*;
use rota::ids::ProId;

/// Eight buyers, each with a budget of exactly one lead (price 10), groups of four.
fn spent_shard() -> Harness {
    let mut h = Harness::new(autobuy_policy(4));
    for i in 1..=8 {
        let mut p = pro(&format!("p{i}"));
        p.autobuy = vec![autobuy("weekly", 10)];
        h.add_pro(p);
        h.funds.set_budget(&format!("p{i}"), "weekly", 10);
    }
    h
}

/// The pros `explain` lists as skipped for a spent budget: those on the lead's R22
/// retry list.
fn waiting_for_budget(explain: &rota::core::shard::Explanation) -> Vec<&str> {
    use rota::core::shard::{ExplainOutcome, Skip};
    explain
        .entries
        .iter()
        .filter(|e| matches!(e.outcome, ExplainOutcome::Skipped(Skip::BudgetExhausted { .. })))
        .map(|e| e.pro.as_str())
        .collect()
}

/// L1 to p1-p4, L2 to p5-p8 (R21): every budget spent.
fn spend_all(h: &mut Harness) {
    assert_eq!(offered(&h.publish(T0, lead("L1", T0))).len(), 4);
    assert_eq!(offered(&h.publish(T0 + M, lead("L2", T0 + M))).len(), 4);
}

#[test]
fn r21_r22_spent_budgets_are_parked_out_of_the_scan_and_still_wait_for_short_leads() {
    let mut h = spent_shard();
    spend_all(&mut h);
    // L3 scans all eight, finds no budget, and parks them.
    let l3 = h.publish(T0 + 2 * M, lead("L3", T0 + 2 * M));
    assert!(offered(&l3).is_empty());
    assert_eq!(h.shard.parked_pros(), 8, "every spent budget parked");
    // L4 scans nobody, yet every parked buyer waits for it as for L3 (R22).
    let l4 = h.publish(T0 + 3 * M, lead("L4", T0 + 3 * M));
    assert!(offered(&l4).is_empty());
    let explain = h.shard.explain(&lid("L4")).expect("L4 is open");
    assert_eq!(waiting_for_budget(&explain).len(), 8, "{explain:?}");
    // p3's budget comes back (a recharge or a refund, then BudgetAvailable): it is back
    // in the scan and gets the older of the two short leads at once (R22).
    h.funds.set_budget("p3", "weekly", 10);
    let back = h.ok(T0 + 4 * M, Command::BudgetAvailable { pros: vec![pid("p3")] });
    assert_eq!(names(&back.events)[0], "budget_returned");
    assert_eq!(offered_ids(&back.events), vec!["p3"]);
    assert_eq!(h.shard.offer_view(&lid("L3"), &pid("p3")).map(|o| o.kind).ok(), Some(OfferKind::AutoBuy));
    assert_eq!(h.shard.parked_pros(), 7);
    // Its budget spent again by L3, the next lead parks it again; the others stay.
    h.publish(T0 + 5 * M, lead("L5", T0 + 5 * M));
    assert_eq!(h.shard.parked_pros(), 8);
    h.assert_replay_equal();
}

#[test]
fn r21_a_budget_below_the_cheapest_price_parks_but_one_that_can_still_buy_does_not() {
    let mut h = spent_shard();
    spend_all(&mut h);
    // p8 keeps 9 credits (one short of the price): parked like the others; p7 keeps
    // exactly the price: it buys the next lead instead of being parked.
    h.funds.set_budget("p8", "weekly", 9);
    h.funds.set_budget("p7", "weekly", 10);
    let l3 = h.publish(T0 + 2 * M, lead("L3", T0 + 2 * M));
    assert_eq!(offered_ids(&l3.events), vec!["p7"]);
    assert_eq!(h.shard.parked_pros(), 7, "p1-p6 and p8");
    h.assert_replay_equal();
}

#[test]
fn r19_r20_a_changed_config_unparks_a_spent_buyer_and_recovery_names_the_others_for_a_retry() {
    let mut h = spent_shard();
    spend_all(&mut h);
    h.publish(T0 + 2 * M, lead("L3", T0 + 2 * M));
    assert_eq!(h.shard.parked_pros(), 8);
    // A new weekly amount is an upsert of the pro: back in the scan.
    let mut p = pro("p2");
    p.autobuy = vec![autobuy("weekly", 20)];
    h.add_pro(p);
    assert_eq!(h.shard.parked_pros(), 7);
    // After a restart every pro parked for its budget is named for a BudgetAvailable
    // (a recharge logged just before a crash told no shard), which unparks them all;
    // so is p2, back in the scan but still short of budget (the update's own retry was
    // in memory only).
    let parked = h.shard.budget_parked();
    assert_eq!(parked.len(), 8);
    assert!(parked.contains(&pid("p2")), "p2 is short of budget, in the scan");
    let back = h.ok(T0 + 3 * M, Command::BudgetAvailable { pros: parked });
    assert_eq!(names(&back.events).iter().filter(|n| **n == "budget_returned").count(), 7, "the parked ones");
    assert_eq!(h.shard.parked_pros(), 0);
}

/// 70 buyers (`p1`..`p70`, those for which `ranks_higher` holds with top quality), each
/// with a budget of one lead, and leads published until every budget is spent: the
/// harness and the time of the last lead.
fn seventy_buyers_spent(ranks_higher: impl Fn(u32) -> bool) -> (Harness, i64) {
    let mut h = Harness::new(autobuy_policy(4));
    for i in 1..=70 {
        let mut p = pro(&format!("p{i}"));
        p.autobuy = vec![autobuy("weekly", 10)];
        if ranks_higher(i) {
            p.quality = Quality { reviews: 200, rating_centi: 500, projects: 100, profile_permille: 1000 };
        }
        h.add_pro(p);
        h.funds.set_budget(&format!("p{i}"), "weekly", 10);
    }
    let mut bought = 0;
    let mut t = T0;
    while bought < 70 {
        t += M;
        bought += offered(&h.publish(t, lead(&format!("B{t}"), t))).len();
    }
    (h, t)
}

#[test]
fn r22_past_the_bound_the_parked_buyers_next_in_the_rotation_wait_for_a_short_lead() {
    // 70 buyers with one lead of budget each; p65-p70 rank higher (a shorter stride:
    // after one lead each they are the next in the rotation).
    let (mut h, t) = seventy_buyers_spent(|i| i > 64);
    // Every budget spent; one more lead parks them all, the next one is left short
    // with only parked buyers: 64 of the 70 wait for it, those next in the rotation.
    h.publish(t + M, lead("S1", t + M));
    h.publish(t + 2 * M, lead("S2", t + 2 * M));
    assert_eq!(h.shard.parked_pros(), 70);
    let explain = h.shard.explain(&lid("S2")).expect("S2 is open");
    let weight =
        |id: &str| explain.entries.iter().find(|e| e.pro.as_str() == id).and_then(|e| e.weight.clone());
    let waiting = waiting_for_budget(&explain);
    assert_eq!(waiting.len(), 64, "{explain:?}");
    assert!(weight("p70").map(|w| w.weight) > weight("p1").map(|w| w.weight), "p65-p70 rank higher");
    for i in 65..=70 {
        assert!(waiting.contains(&format!("p{i}").as_str()), "p{i} is next in the rotation: {waiting:?}");
    }
}

/// The pros each lead is offered to by `events`, lead by lead, in event order.
fn offers_by_lead(events: &[Event]) -> Vec<(String, Vec<String>)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Offered { lead, grants, .. } => {
                Some((lead.as_str().to_string(), grants.iter().map(|g| g.pro.as_str().to_string()).collect()))
            }
            _ => None,
        })
        .collect()
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn r21_r22_r28_a_recharge_hands_the_missed_leads_out_in_rotation_order_not_recharge_order() {
    let mut h = spent_shard();
    spend_all(&mut h);
    // L3 and L4 find no budget: all eight wait for both (R22).
    assert!(offered(&h.publish(T0 + 2 * M, lead("L3", T0 + 2 * M))).is_empty());
    assert!(offered(&h.publish(T0 + 3 * M, lead("L4", T0 + 3 * M))).is_empty());
    // The weekly recharge gives each one lead of budget; the shell names the pros in
    // whatever order it recharged them (here the reverse of the rotation).
    let pros: Vec<ProId> = (1..=8).rev().map(|i| pid(&format!("p{i}"))).collect();
    for p in &pros {
        h.funds.set_budget(p.as_str(), "weekly", 10);
    }
    let back = h.ok(T0 + 4 * M, Command::BudgetAvailable { pros });
    // Cyclic as for fresh leads (R21): the older lead to the four next in the rotation,
    // the next one to the other four; nobody gets both.
    assert_eq!(
        offers_by_lead(&back.events),
        vec![
            ("L3".to_string(), strs(&["p1", "p2", "p3", "p4"])),
            ("L4".to_string(), strs(&["p5", "p6", "p7", "p8"]))
        ]
    );
    assert_eq!(names(&back.events).iter().filter(|n| **n == "budget_returned").count(), 8);
    h.assert_replay_equal();
}

#[test]
fn r22_r28_a_retried_lead_counts_as_a_turn_so_a_catch_up_is_no_burst() {
    let mut h = spent_shard();
    spend_all(&mut h);
    assert!(offered(&h.publish(T0 + 2 * M, lead("L3", T0 + 2 * M))).is_empty());
    // p1's budget comes back first (a refund of two leads' worth): it gets L3 (R22).
    h.funds.set_budget("p1", "weekly", 20);
    let back = h.ok(T0 + 3 * M, Command::BudgetAvailable { pros: vec![pid("p1")] });
    assert_eq!(offers_by_lead(&back.events), vec![("L3".to_string(), strs(&["p1"]))]);
    // Then everyone's: L3's other three seats go to the next in the rotation.
    for i in 2..=8 {
        h.funds.set_budget(&format!("p{i}"), "weekly", 10);
    }
    let rest: Vec<ProId> = (2..=8).map(|i| pid(&format!("p{i}"))).collect();
    let back = h.ok(T0 + 4 * M, Command::BudgetAvailable { pros: rest });
    assert_eq!(offers_by_lead(&back.events), vec![("L3".to_string(), strs(&["p2", "p3", "p4"]))]);
    // p1 still has budget for a lead, but L3 was its turn: the next fresh lead goes to
    // the four who have had fewer leads, p1 waits for the next round.
    let l5 = h.publish(T0 + 5 * M, lead("L5", T0 + 5 * M));
    assert_eq!(offered_ids(&l5.events), strs(&["p5", "p6", "p7", "p8"]));
    h.assert_replay_equal();
}

/// Seventy spent buyers, then S1 and S2 published: S1 parks all 70, both are left
/// short, and each lead's retry list holds 64 of them (checked). The harness, the time
/// of the last buying round and a buyer on neither list.
fn short_leads_and_a_buyer_on_neither_list() -> (Harness, i64, String) {
    let (mut h, t) = seventy_buyers_spent(|_| false);
    assert!(offered(&h.publish(t + M, lead("S1", t + M))).is_empty());
    assert!(offered(&h.publish(t + 2 * M, lead("S2", t + 2 * M))).is_empty());
    let listed = |h: &Harness, l: &str| -> Vec<String> {
        let ex = h.shard.explain(&lid(l)).expect("open");
        waiting_for_budget(&ex).into_iter().map(str::to_string).collect()
    };
    let (s1, s2) = (listed(&h, "S1"), listed(&h, "S2"));
    assert_eq!((s1.len(), s2.len()), (64, 64));
    let left_out = (1..=70)
        .map(|i| format!("p{i}"))
        .find(|p| !s1.contains(p) && !s2.contains(p))
        .expect("a buyer on neither retry list");
    (h, t, left_out)
}

/// The end of the R22 tests on `short_leads_and_a_buyer_on_neither_list`: the buyer's
/// budget comes back at `t + 4 min`; it gets S1 and S2, last (with any older short
/// lead it missed), and replay gives the same shard.
fn gets_both_short_leads_when_its_budget_comes_back(mut h: Harness, t: i64, left_out: &str) {
    h.funds.set_budget(left_out, "weekly", 1000);
    let back = h.ok(t + 4 * M, Command::BudgetAvailable { pros: vec![pid(left_out)] });
    let leads: Vec<String> = offers_by_lead(&back.events).into_iter().map(|(l, _)| l).collect();
    assert!(leads.ends_with(&["S1".to_string(), "S2".to_string()]), "{leads:?}");
    h.assert_replay_equal();
}

#[test]
fn r22_a_parked_buyer_past_the_bound_of_the_retry_list_still_gets_the_leads_it_missed() {
    // Every budget spent: S1 parks all 70, S1 and S2 are left short; each lead's retry
    // list holds 64 of them.
    let (mut h, t, left_out) = short_leads_and_a_buyer_on_neither_list();
    // Its budget comes back: parked for its budget since before both leads, it missed
    // both for want of it, and gets both (R22), with any other short lead of the
    // buying rounds that came after its budget ran out, oldest first.
    h.funds.set_budget(&left_out, "weekly", 1000);
    let back = h.ok(t + 3 * M, Command::BudgetAvailable { pros: vec![pid(&left_out)] });
    let got = offers_by_lead(&back.events);
    assert!(got.iter().all(|(_, pros)| pros == &vec![left_out.clone()]), "{got:?}");
    let leads: Vec<&str> = got.iter().map(|(l, _)| l.as_str()).collect();
    assert_eq!(&leads[leads.len() - 2..], &["S1", "S2"], "{leads:?}");
    h.assert_replay_equal();
}

/// R22 across a profile update: the update puts the buyer back in the scan (its park
/// for a spent budget ends), but it was short of budget since before both leads all
/// the same, and still gets both when its budget comes back.
#[test]
fn r22_a_buyer_past_the_bound_of_the_retry_lists_keeps_its_missed_leads_across_a_profile_update() {
    let (mut h, t, left_out) = short_leads_and_a_buyer_on_neither_list();
    let mut updated = pro(&left_out);
    updated.autobuy = vec![autobuy("weekly", 10)];
    updated.quality = Quality { reviews: 20, ..Default::default() };
    h.ok(t + 3 * M, Command::UpsertPro { pro: updated });
    gets_both_short_leads_when_its_budget_comes_back(h, t, &left_out);
}

/// The same across a change of availability (which also ends the park).
#[test]
fn r22_a_buyer_past_the_bound_of_the_retry_lists_keeps_its_missed_leads_across_an_availability_change() {
    let (mut h, t, left_out) = short_leads_and_a_buyer_on_neither_list();
    // A vacation planned for later: available at the leads' times as before.
    let later = Some((t + 10 * 24 * 60 * M, t + 11 * 24 * 60 * M));
    let availability = rota::core::Availability { vacation: later, ..Default::default() };
    h.ok(t + 3 * M, Command::SetAvailability { pro: pid(&left_out), availability });
    gets_both_short_leads_when_its_budget_comes_back(h, t, &left_out);
}

#[test]
fn r22_r16_a_parked_buyer_gets_no_lead_that_came_while_it_was_away() {
    let mut h = spent_shard();
    // p1 has a vacation planned from T0 + 10 min to T0 + 20 min.
    let mut p1 = pro("p1");
    p1.autobuy = vec![autobuy("weekly", 10)];
    p1.availability.vacation = Some((T0 + 10 * M, T0 + 20 * M));
    h.add_pro(p1);
    spend_all(&mut h);
    // L3 parks every spent budget, p1's included; L4 comes during p1's vacation, L5
    // after it. Both are left short.
    h.publish(T0 + 2 * M, lead("L3", T0 + 2 * M));
    h.publish(T0 + 12 * M, lead("L4", T0 + 12 * M));
    h.publish(T0 + 25 * M, lead("L5", T0 + 25 * M));
    h.funds.set_budget("p1", "weekly", 30);
    let back = h.ok(T0 + 26 * M, Command::BudgetAvailable { pros: vec![pid("p1")] });
    let got: Vec<String> = offers_by_lead(&back.events).into_iter().map(|(l, _)| l).collect();
    // L3 and L5 were missed for want of budget; L4 would have been missed anyway.
    assert_eq!(got, vec!["L3".to_string(), "L5".to_string()]);
    h.assert_replay_equal();
}

/// Auto-buy with R11 prices: a painting lead costs 60 credits here, the cheapest lead of
/// the shard 1 credit, so a pro with 30 credits left is skipped for its budget by this
/// lead but not parked (it could still buy a cheaper one).
fn priced_autobuy_policy() -> std::sync::Arc<Policy> {
    let text = R11_POLICY
        .replace("mode = \"shared\"", "mode = \"auto_buy\"")
        .replace("charge_on = \"response\"", "charge_on = \"dispatch\"");
    policy(&format!("{text}\n[autobuy]\ngroup_size = 4\nretry_window_s = 86400\n"))
}

#[test]
fn r22_pros_skipped_for_their_budget_past_the_retry_list_still_wait_for_the_lead() {
    let mut h = Harness::new(priced_autobuy_policy());
    // 100 buyers with 30 credits (below this lead's price, not below the cheapest),
    // then two that can pay: the lead's scan skips the hundred and is left two short.
    for i in 1..=102 {
        let mut p = pro(&format!("p{i:03}"));
        p.autobuy = vec![autobuy("weekly", 1000)];
        h.add_pro(p);
        h.funds.set_budget(&format!("p{i:03}"), "weekly", if i <= 100 { 30 } else { 1000 });
    }
    let l1 = h.publish(T0, lead("L1", T0));
    let price = h.shard.lead(&lid("L1")).expect("accepted").price;
    assert!(price > 30, "the lead costs more than the skipped pros have: {price}");
    assert_eq!(offered_ids(&l1.events), vec!["p101", "p102"]);
    assert_eq!(h.shard.parked_pros(), 0, "30 credits can still buy a cheaper lead");
    // A second lead lists none of them again: they are short of budget already.
    let l2 = h.publish(T0 + M, lead("L2", T0 + M));
    match l2.events.iter().find(|e| matches!(e, Event::Offered { .. })) {
        Some(Event::Offered { budget_short, .. }) => assert!(budget_short.is_empty(), "{budget_short:?}"),
        other => panic!("L2 released: {other:?}"),
    }
    // p090 was skipped past the lead's 64-pro retry list; its budget comes back: it
    // gets the oldest lead it missed, L1 (R22), as p010 (on the list) does.
    for p in ["p090", "p010"] {
        h.funds.set_budget(p, "weekly", 1000);
        let back = h.ok(T0 + 2 * M, Command::BudgetAvailable { pros: vec![pid(p)] });
        let got: Vec<(String, String)> = back
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Offered { lead, grants, .. } => {
                    Some(grants.iter().map(|g| (lead.to_string(), g.pro.to_string())).collect::<Vec<_>>())
                }
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(got[0], ("L1".to_string(), p.to_string()), "{p} retried for L1: {got:?}");
    }
    h.assert_replay_equal();
}

/// Funds whose budget for one pro another shard spends while a decision is under way
/// (the ledger is shared and read live): its first `seen` reads of that pro's budget
/// see it, the later ones find it spent.
struct SpentMidway<'a> {
    funds: &'a MapFunds,
    pro: ProId,
    seen: u32,
    reads: std::cell::Cell<u32>,
}

impl Funds for SpentMidway<'_> {
    fn credits(&self, pro: &ProId) -> u64 {
        self.funds.credits(pro)
    }
    fn budget(&self, pro: &ProId, config: &str) -> u64 {
        if *pro != self.pro {
            return self.funds.budget(pro, config);
        }
        self.reads.set(self.reads.get() + 1);
        match self.reads.get() <= self.seen {
            true => self.funds.budget(pro, config),
            false => 0,
        }
    }
}

/// R21/R22: a budget the release's scan saw and another shard spent before the
/// purchase is a pro skipped for its budget (it keeps its turn and waits for the lead),
/// not a failed decision. It used to stop the decision with a panic: a publish never
/// answered, or a shard's timer gone until a restart.
#[test]
fn r21_r22_a_budget_spent_by_another_shard_during_a_release_skips_the_pro() {
    let mut h = spent_shard();
    let cmd = Command::PublishLead { lead: lead("L1", T0).into() };
    // How many times the release reads p2's budget, the purchase's read being the last.
    let counting = SpentMidway { funds: &h.funds, pro: pid("p2"), seen: u32::MAX, reads: 0.into() };
    let fine = h.shard.decide(T0, &cmd, &counting).expect("accepted");
    assert!(offered_ids(&fine.events).contains(&"p2".to_string()), "{:?}", fine.events);
    let racy =
        SpentMidway { funds: &h.funds, pro: pid("p2"), seen: counting.reads.get() - 1, reads: 0.into() };
    let d = h.shard.decide(T0, &cmd, &racy).expect("accepted");
    let got = offered_ids(&d.events);
    assert!(!got.contains(&"p2".to_string()) && got.len() == 3, "{got:?}");
    match d.events.iter().find(|e| matches!(e, Event::Offered { .. })) {
        Some(Event::Offered { skipped, .. }) => {
            assert!(
                skipped.iter().any(|(p, s)| p.as_str() == "p2"
                    && matches!(s, rota::core::shard::Skip::BudgetExhausted { .. })),
                "{skipped:?}"
            )
        }
        other => panic!("L1 released: {other:?}"),
    }
    for ev in &d.events {
        h.funds.settle(ev);
        apply_checked(&mut h.shard, ev);
        h.log.push(ev.clone());
    }
    h.shard.check_invariants().expect("invariants");
    h.assert_replay_equal();
    // p2 kept its turn: the next lead goes to it first.
    let l2 = h.publish(T0 + M, lead("L2", T0 + M));
    assert_eq!(offered_ids(&l2.events)[0], "p2", "{:?}", l2.events);
}

/// R19/R22: a buyer with two configs covering the shard spends from one while the
/// other still has budget. When both come back, the retry buys the two short leads it
/// missed, one from each: what one config spent is not taken off the other.
#[test]
fn r19_r22_a_retry_buys_from_a_second_config_once_the_first_is_spent() {
    let mut h = Harness::new(autobuy_policy(4));
    let mut x = pro("x");
    x.autobuy = vec![autobuy("a", 10), autobuy("b", 10)];
    h.add_pro(x);
    h.funds.set_budget("x", "a", 10);
    h.funds.set_budget("x", "b", 10);
    assert_eq!(offered_ids(&h.publish(T0, lead("L1", T0)).events), vec!["x"]);
    assert_eq!(offered_ids(&h.publish(T0 + M, lead("L2", T0 + M)).events), vec!["x"]);
    // Both spent: L3 and L4 are left short, x waits for them (R22).
    assert!(offered(&h.publish(T0 + 2 * M, lead("L3", T0 + 2 * M))).is_empty());
    assert!(offered(&h.publish(T0 + 3 * M, lead("L4", T0 + 3 * M))).is_empty());
    h.funds.set_budget("x", "a", 10);
    h.funds.set_budget("x", "b", 10);
    let back = h.ok(T0 + 4 * M, Command::BudgetAvailable { pros: vec![pid("x")] });
    let got: Vec<String> = offers_by_lead(&back.events).into_iter().map(|(l, _)| l).collect();
    assert_eq!(got, strs(&["L3", "L4"]), "{:?}", back.events);
    h.assert_replay_equal();
}

/// R22 across a `BudgetReturned` that finds nothing to buy (after a restart every
/// parked buyer is told, budget back or not): the buyer stays short of budget since
/// it was parked, and still gets the leads it missed once its budget does come back.
#[test]
fn r22_a_buyer_past_the_bound_of_the_retry_lists_keeps_its_missed_leads_across_an_empty_budget_notice() {
    let (mut h, t, left_out) = short_leads_and_a_buyer_on_neither_list();
    let everyone: Vec<ProId> = (1..=70).map(|i| pid(&format!("p{i}"))).collect();
    let none = h.ok(t + 3 * M, Command::BudgetAvailable { pros: everyone });
    assert!(offers_by_lead(&none.events).is_empty(), "no budget came back");
    gets_both_short_leads_when_its_budget_comes_back(h, t, &left_out);
}

/// R6 with R21: under auto-buy, direct targets buy a lead only up to its responder
/// seats; a target listed after them is skipped (`seats_full`) instead of paying for a
/// lead it could not answer.
#[test]
fn r6_r21_direct_targets_beyond_the_responder_seats_do_not_pay() {
    let mut policy = (*autobuy_policy(4)).clone();
    policy.max_responders = 2;
    let mut h = Harness::new(std::sync::Arc::new(policy));
    for i in 1..=3 {
        let mut p = pro(&format!("d{i}"));
        p.autobuy = vec![autobuy("weekly", 1000)];
        h.add_pro(p);
        h.funds.set_budget(&format!("d{i}"), "weekly", 1000);
    }
    let mut l = lead("L1", T0);
    l.direct = vec![pid("d1"), pid("d2"), pid("d3")];
    let d = h.publish(T0, l);
    assert_eq!(offered_ids(&d.events), strs(&["d1", "d2"]));
    let ex = h.shard.explain(&lid("L1")).expect("open");
    let d3 = ex.entries.iter().find(|e| e.pro.as_str() == "d3").expect("d3 explained");
    assert!(
        matches!(d3.outcome, rota::core::shard::ExplainOutcome::Skipped(rota::core::shard::Skip::SeatsFull)),
        "{d3:?}"
    );
    assert_eq!(h.funds.budget(&pid("d3"), "weekly"), 1000, "d3 paid nothing");
    h.assert_replay_equal();
}
