//! Unit tests of every ledger operation and error, named after the rule they
//! protect. Every test checks the invariants after each step.

use super::*;
use crate::ids::LeadId;

fn t() -> TenantId {
    TenantId::new("acme")
}
fn p() -> ProId {
    ProId::new("pro-1")
}
fn op(s: &str) -> OpId {
    OpId::new(s)
}
fn b() -> BudgetName {
    BudgetName::new("express")
}

/// A ledger where pro-1 has `credits`.
fn funded(credits: u64) -> Ledger {
    let l = Ledger::new();
    l.grant(op("grant:0"), &t(), &p(), credits).unwrap();
    l.check_invariants().unwrap();
    l
}

/// Runs `f`, asserts it fails with `expected` and that nothing changed.
fn refused(l: &Ledger, expected: LedgerError, f: impl FnOnce(&Ledger) -> Result<Receipt, LedgerError>) {
    let before = l.snapshot();
    assert_eq!(f(l), Err(expected));
    assert_eq!(l.snapshot(), before, "a refused op must change nothing");
    l.check_invariants().unwrap();
}

fn bal(l: &Ledger) -> (u64, u64, u64, u64, u64) {
    let b = l.balance(&t(), &p());
    (b.available, b.held, b.captured, b.refunded, b.granted)
}

#[test]
fn r10_a_grant_posts_credits_and_creates_the_account() {
    let l = Ledger::new();
    assert_eq!(l.balance(&t(), &p()), Balance::default());
    let r = l.grant(op("g1"), &t(), &p(), 50).unwrap();
    assert!(!r.replayed);
    assert_eq!(r.topup_requested, None);
    assert_eq!(
        r.event,
        LedgerEvent::Credit { op: op("g1"), tenant: t(), pro: p(), fact: CreditFact::Granted { amount: 50 } }
    );
    assert_eq!(bal(&l), (50, 0, 0, 0, 50));
    l.check_invariants().unwrap();
}

#[test]
fn r9_charge_takes_the_price_at_response() {
    let l = funded(10);
    let r = l.charge(op("charge:l1:pro-1"), &t(), &p(), 4).unwrap();
    assert_eq!(r.event.op(), &op("charge:l1:pro-1"));
    assert_eq!(bal(&l), (6, 0, 4, 0, 10));
    // Exactly the last credits are fine.
    l.charge(op("charge:l2:pro-1"), &t(), &p(), 6).unwrap();
    assert_eq!(bal(&l), (0, 0, 10, 0, 10));
    l.check_invariants().unwrap();
}

#[test]
fn r9_insufficient_credits_changes_nothing() {
    let l = funded(5);
    refused(&l, LedgerError::InsufficientCredits { available: 5, needed: 6 }, |l| {
        l.charge(op("c"), &t(), &p(), 6)
    });
    refused(&l, LedgerError::InsufficientCredits { available: 5, needed: 6 }, |l| {
        l.hold(op("h"), &t(), &p(), 6)
    });
    // The refused op id is not burnt: it works once credits are there.
    l.grant(op("g2"), &t(), &p(), 1).unwrap();
    l.charge(op("c"), &t(), &p(), 6).unwrap();
    assert_eq!(bal(&l), (0, 0, 6, 0, 6));
}

#[test]
fn r9_unknown_pro_cannot_pay_and_is_not_created() {
    let l = Ledger::new();
    refused(&l, LedgerError::InsufficientCredits { available: 0, needed: 3 }, |l| {
        l.charge(op("c"), &t(), &p(), 3)
    });
    assert_eq!(l.snapshot(), LedgerSnapshot::default());
}

#[test]
fn r9_chat_only_hold_is_captured_when_the_client_replies() {
    let l = funded(10);
    l.hold(op("hold:l1"), &t(), &p(), 4).unwrap();
    assert_eq!(bal(&l), (6, 4, 0, 0, 10));
    l.check_invariants().unwrap();
    let r = l.capture(op("capture:l1"), &t(), &p(), &op("hold:l1")).unwrap();
    assert!(matches!(r.event, LedgerEvent::Credit { fact: CreditFact::Captured { amount: 4, .. }, .. }));
    assert_eq!(bal(&l), (6, 0, 4, 0, 10));
    l.check_invariants().unwrap();
}

#[test]
fn r9_chat_only_hold_is_released_when_the_lead_closes_without_reply() {
    let l = funded(10);
    l.hold(op("hold:l1"), &t(), &p(), 4).unwrap();
    l.release(op("release:l1"), &t(), &p(), &op("hold:l1")).unwrap();
    assert_eq!(bal(&l), (10, 0, 0, 0, 10));
    l.check_invariants().unwrap();
}

/// R9/R12: what gives credits back can be decided without being applied
/// (`give_back_deferred`): nothing is spendable until the fact is applied, which the
/// engine does once the fact is durable in the log. Applied, it is the same as a
/// release or refund done at once, and a repeat of the op is answered as such.
#[test]
fn r9_r12_credits_given_back_are_spendable_only_once_the_fact_is_applied() {
    let l = funded(10);
    l.hold(op("hold:l1"), &t(), &p(), 4).unwrap();
    l.charge(op("charge:l2"), &t(), &p(), 6).unwrap();
    let release = l
        .give_back_deferred(op("release:l1"), &t(), &p(), GiveBack::Release { hold: &op("hold:l1") })
        .unwrap();
    let refund = l
        .give_back_deferred(
            op("refund:l2"),
            &t(),
            &p(),
            GiveBack::Refund { charge: &op("charge:l2"), reason: RefundReason::NotViewed },
        )
        .unwrap();
    assert!(!release.replayed && !refund.replayed);
    assert_eq!(bal(&l), (0, 4, 6, 0, 10), "decided, nothing given back yet");
    refused(&l, LedgerError::InsufficientCredits { available: 0, needed: 1 }, |l| {
        l.charge(op("charge:l3"), &t(), &p(), 1)
    });
    l.apply(&release.event);
    l.apply(&refund.event);
    assert_eq!(bal(&l), (10, 0, 6, 6, 10), "given back once applied");
    l.check_invariants().unwrap();
    let again = l.release(op("release:l1"), &t(), &p(), &op("hold:l1")).unwrap();
    assert!(again.replayed && again.event == release.event);
    l.charge(op("charge:l3"), &t(), &p(), 1).unwrap();
}

#[test]
fn r9_a_hold_is_settled_once() {
    let l = funded(10);
    l.hold(op("h"), &t(), &p(), 4).unwrap();
    l.capture(op("cap"), &t(), &p(), &op("h")).unwrap();
    let settled = LedgerError::HoldAlreadySettled { hold: op("h"), by: op("cap") };
    refused(&l, settled.clone(), |l| l.release(op("rel"), &t(), &p(), &op("h")));
    refused(&l, settled, |l| l.capture(op("cap2"), &t(), &p(), &op("h")));
}

#[test]
fn unknown_hold_is_refused() {
    let l = funded(10);
    l.charge(op("c"), &t(), &p(), 2).unwrap();
    let unknown = |h: &str| LedgerError::UnknownHold { hold: op(h) };
    refused(&l, unknown("nope"), |l| l.capture(op("x"), &t(), &p(), &op("nope")));
    refused(&l, unknown("nope"), |l| l.release(op("x"), &t(), &p(), &op("nope")));
    // A charge is not a hold.
    refused(&l, unknown("c"), |l| l.capture(op("x"), &t(), &p(), &op("c")));
    // Nor on an account that does not exist.
    let empty = Ledger::new();
    refused(&empty, unknown("h"), |l| l.capture(op("x"), &t(), &p(), &op("h")));
    assert_eq!(empty.snapshot(), LedgerSnapshot::default());
}

#[test]
fn r12_refund_gives_the_full_charge_back() {
    let l = funded(10);
    l.charge(op("c"), &t(), &p(), 7).unwrap();
    let r = l.refund(op("refund:c"), &t(), &p(), &op("c"), RefundReason::NotViewed).unwrap();
    assert!(matches!(
        r.event,
        LedgerEvent::Credit {
            fact: CreditFact::Refunded { amount: 7, reason: RefundReason::NotViewed, .. },
            ..
        }
    ));
    assert_eq!(bal(&l), (10, 0, 7, 7, 10));
    l.check_invariants().unwrap();
}

#[test]
fn r12_refund_happens_at_most_once() {
    let l = funded(10);
    l.charge(op("c"), &t(), &p(), 7).unwrap();
    l.refund(op("r1"), &t(), &p(), &op("c"), RefundReason::NotViewed).unwrap();
    // A second refund under another op id (e.g. a second guarantee timer, or
    // an invalid-contact report after the not-viewed refund) is refused.
    refused(&l, LedgerError::AlreadyRefunded { op: op("c"), by: op("r1") }, |l| {
        l.refund(op("r2"), &t(), &p(), &op("c"), RefundReason::InvalidContact)
    });
    assert_eq!(bal(&l).3, 7, "never more than the charge");
}

#[test]
fn r12_r23_captured_hold_is_refundable_open_or_released_is_not() {
    let l = funded(10);
    l.hold(op("h1"), &t(), &p(), 3).unwrap();
    refused(&l, LedgerError::HoldNotCaptured { hold: op("h1") }, |l| {
        l.refund(op("r"), &t(), &p(), &op("h1"), RefundReason::InvalidContact)
    });
    l.release(op("rel1"), &t(), &p(), &op("h1")).unwrap();
    refused(&l, LedgerError::HoldNotCaptured { hold: op("h1") }, |l| {
        l.refund(op("r"), &t(), &p(), &op("h1"), RefundReason::InvalidContact)
    });
    l.hold(op("h2"), &t(), &p(), 3).unwrap();
    l.capture(op("cap2"), &t(), &p(), &op("h2")).unwrap();
    l.refund(op("r"), &t(), &p(), &op("h2"), RefundReason::InvalidContact).unwrap();
    assert_eq!(bal(&l), (10, 0, 3, 3, 10));
    l.check_invariants().unwrap();
}

#[test]
fn r12_refund_of_unknown_charge_is_refused() {
    let l = funded(10);
    refused(&l, LedgerError::UnknownCharge { charge: op("c") }, |l| {
        l.refund(op("r"), &t(), &p(), &op("c"), RefundReason::Platform)
    });
    // A grant or a refund is not a charge either.
    refused(&l, LedgerError::UnknownCharge { charge: op("grant:0") }, |l| {
        l.refund(op("r"), &t(), &p(), &op("grant:0"), RefundReason::Platform)
    });
}

#[test]
fn zero_amounts_are_invalid() {
    let l = funded(10);
    let zero = LedgerError::InvalidAmount { field: "amount" };
    refused(&l, zero.clone(), |l| l.grant(op("g"), &t(), &p(), 0));
    refused(&l, zero.clone(), |l| l.hold(op("h"), &t(), &p(), 0));
    refused(&l, zero.clone(), |l| l.charge(op("c"), &t(), &p(), 0));
    let empty = Ledger::new();
    refused(&empty, zero, |l| l.charge(op("c"), &t(), &p(), 0));
    refused(&empty, LedgerError::InvalidAmount { field: "amount" }, |l| l.grant(op("g"), &t(), &p(), 0));
}

#[test]
fn error_messages_name_the_amounts_and_ops() {
    let msg = |e: LedgerError| e.to_string();
    assert_eq!(
        msg(LedgerError::InsufficientCredits { available: 5, needed: 6 }),
        "insufficient credits: 5 available, 6 needed"
    );
    assert_eq!(
        msg(LedgerError::BudgetExhausted { available: 1, needed: 11 }),
        "auto-buy budget exhausted: 1 available, 11 needed"
    );
    assert_eq!(
        msg(LedgerError::AlreadyRefunded { op: op("charge:l1:p1"), by: op("refund:l1:p1") }),
        "charge:l1:p1 was already refunded by op refund:l1:p1"
    );
    assert_eq!(
        msg(LedgerError::OpConflict { op: op("c"), existing: "charge" }),
        "op id c was already used for a different charge operation"
    );
    assert_eq!(
        msg(LedgerError::AmountOverflow { field: "available", amount: 2 }),
        "adding 2 credits would overflow the available balance"
    );
}

#[test]
fn unusable_op_ids_are_refused() {
    let l = funded(10);
    let e = l.charge(op(""), &t(), &p(), 1).unwrap_err();
    assert!(matches!(e, LedgerError::InvalidOpId(_)), "{e}");
    assert_eq!(e.to_string(), "invalid op id: op_id: must not be empty");
    refused(&l, e, |l| l.charge(op(""), &t(), &p(), 1));
    let long = "x".repeat(MAX_OP_ID_LEN + 1);
    let e = l.spend(op(&long), &t(), &p(), &b(), 1).unwrap_err();
    assert_eq!(e.to_string(), format!("invalid op id: op_id: longer than {MAX_OP_ID_LEN} bytes"));
    assert!(matches!(l.grant(op("a\nb"), &t(), &p(), 1), Err(LedgerError::InvalidOpId(_))));
}

/// Every op id the shell derives, from the longest valid wire ids and the longest
/// numbers, is within [`MAX_OP_ID_LEN`]: a hold on such ids can be captured and
/// released, a grant on a 128-byte payment id is posted.
#[test]
fn r9_op_ids_derived_from_the_longest_valid_ids_are_accepted() {
    use crate::ids::MAX_ID_LEN;
    let id = |c: &str| c.repeat(MAX_ID_LEN);
    let (lead, pro, name) = (LeadId::new(id("L")), ProId::new(id("p")), BudgetName::new(id("n")));
    let mut derived: Vec<OpId> = ["charge", "hold", "buy", "capture", "release", "refund"]
        .iter()
        .map(|k| OpId::for_lead(k, &lead, &pro))
        .collect();
    derived.push(OpId::grant(&id("g")));
    derived.push(OpId::set_budget(&pro, &name, i64::MIN, u64::MAX));
    derived.push(OpId::weekly_recharge(&pro, &name, chrono::NaiveDate::MIN));
    derived.push(OpId::weekly_recharge(&pro, &name, chrono::NaiveDate::MAX));
    derived.push(OpId::resume(&pro, &name, i64::MIN));
    derived.push(OpId::reactivated(&pro, &name, chrono::NaiveDate::MIN));
    derived.push(OpId::reactivated(&pro, &name, chrono::NaiveDate::MAX));
    for op in &derived {
        assert_eq!(validate_op(op), Ok(()), "{} bytes", op.as_str().len());
    }
    let longest = derived.iter().map(|o| o.as_str().len()).max().unwrap();
    assert_eq!(longest, 2 * MAX_ID_LEN + 50, "the derivation MAX_OP_ID_LEN's docs name");
    // And on a ledger: a hold on the longest ids is settled.
    let l = Ledger::new();
    l.grant(OpId::grant(&id("g")), &t(), &pro, 10).unwrap();
    l.hold(OpId::for_lead("hold", &lead, &pro), &t(), &pro, 4).unwrap();
    let hold = OpId::for_lead("hold", &lead, &pro);
    l.release(OpId::for_lead("release", &lead, &pro), &t(), &pro, &hold).unwrap();
    assert_eq!(l.balance(&t(), &pro).held, 0);
    l.check_invariants().unwrap();
}

/// R10: with no idempotency key of its own, each rule change is the next one and the
/// last wins, however many arrive in one millisecond, a change back to an earlier
/// rule included; replay ends in the same rule.
#[test]
fn r10_each_topup_rule_change_applies_and_the_last_one_wins() {
    let l = funded(10);
    let (a, b2) = (TopupRule { threshold: 5, amount: 50 }, TopupRule { threshold: 7, amount: 50 });
    let mut log = Vec::new();
    for rule in [Some(a), Some(b2), Some(a)] {
        let r = l.change_topup_rule(&t(), &p(), rule).unwrap();
        assert!(!r.replayed);
        log.push(r.event);
    }
    assert_eq!(l.balance(&t(), &p()).topup_rule, Some(a));
    refused(&l, LedgerError::InvalidAmount { field: "topup_rule.threshold" }, |l| {
        l.change_topup_rule(&t(), &p(), Some(TopupRule { threshold: 0, amount: 5 }))
    });
    // Replayed in any order, the highest version wins (the engine replays rules in
    // log order; the version makes the rule itself independent of it).
    let replayed = funded(10);
    for e in log.iter().rev() {
        replayed.apply(e);
    }
    assert_eq!(replayed.balance(&t(), &p()), l.balance(&t(), &p()));
    let in_order = funded(10);
    for e in &log {
        in_order.apply(e);
    }
    assert_eq!(in_order.snapshot(), l.snapshot());
    // An account is created by a rule, as by `set_topup_rule`.
    let fresh = Ledger::new();
    fresh.change_topup_rule(&t(), &p(), Some(a)).unwrap();
    assert_eq!(fresh.balance(&t(), &p()).topup_rule, Some(a));
}

#[test]
fn overflowing_amounts_are_refused() {
    let l = funded(u64::MAX - 1);
    refused(&l, LedgerError::AmountOverflow { field: "available", amount: 2 }, |l| {
        l.grant(op("g"), &t(), &p(), 2)
    });
    l.grant(op("g"), &t(), &p(), 1).unwrap();
    assert_eq!(bal(&l).0, u64::MAX);
    // captured at u64::MAX, then a refund and a new charge would overflow captured.
    l.charge(op("c"), &t(), &p(), u64::MAX).unwrap();
    l.refund(op("r"), &t(), &p(), &op("c"), RefundReason::Platform).unwrap();
    refused(&l, LedgerError::AmountOverflow { field: "captured", amount: 1 }, |l| {
        l.charge(op("c2"), &t(), &p(), 1)
    });
}

#[test]
fn replaying_each_op_returns_the_original_and_changes_nothing() {
    let l = funded(20);
    let mut firsts = vec![];
    type Op = Box<dyn Fn(&Ledger) -> Result<Receipt, LedgerError>>;
    let ops: Vec<Op> = vec![
        Box::new(|l| l.grant(op("g"), &t(), &p(), 5)),
        Box::new(|l| {
            let rule = TopupRule { threshold: 10, amount: 50 };
            l.set_topup_rule(op("rule"), &t(), &p(), Some(rule))
        }),
        Box::new(|l| l.hold(op("h"), &t(), &p(), 3)),
        Box::new(|l| l.capture(op("cap"), &t(), &p(), &op("h"))),
        Box::new(|l| l.hold(op("h2"), &t(), &p(), 3)),
        Box::new(|l| l.release(op("rel"), &t(), &p(), &op("h2"))),
        Box::new(|l| l.charge(op("c"), &t(), &p(), 15)),
        Box::new(|l| l.refund(op("r"), &t(), &p(), &op("c"), RefundReason::NotViewed)),
    ];
    for f in &ops {
        let first = f(&l).unwrap();
        assert!(!first.replayed);
        firsts.push(first);
        l.check_invariants().unwrap();
    }
    assert_eq!(firsts[6].topup_requested, Some(50), "the charge crossed the threshold");
    let state = l.snapshot();
    for (f, first) in ops.iter().zip(&firsts) {
        let again = f(&l).unwrap();
        assert!(again.replayed);
        assert_eq!(again.event, first.event);
        assert_eq!(again.topup_requested, first.topup_requested);
        assert_eq!(l.snapshot(), state);
    }
}

#[test]
fn reusing_an_op_id_with_other_parameters_is_a_conflict() {
    let l = funded(20);
    l.charge(op("c"), &t(), &p(), 5).unwrap();
    let conflict = |existing| LedgerError::OpConflict { op: op("c"), existing };
    refused(&l, conflict("charge"), |l| l.charge(op("c"), &t(), &p(), 6));
    refused(&l, conflict("charge"), |l| l.hold(op("c"), &t(), &p(), 5));
    refused(&l, conflict("charge"), |l| l.grant(op("c"), &t(), &p(), 5));
    l.refund(op("r"), &t(), &p(), &op("c"), RefundReason::NotViewed).unwrap();
    refused(&l, LedgerError::OpConflict { op: op("r"), existing: "refund" }, |l| {
        l.refund(op("r"), &t(), &p(), &op("c"), RefundReason::Platform)
    });
}

#[test]
fn op_ids_are_scoped_per_account() {
    let l = funded(10);
    let other = ProId::new("pro-2");
    l.grant(op("grant:0"), &t(), &other, 3).unwrap();
    assert_eq!(l.balance(&t(), &other).available, 3);
    assert_eq!(l.balance(&TenantId::new("other"), &p()), Balance::default());
}

#[test]
fn r10_topup_requested_once_until_credits_posted() {
    let l = funded(100);
    let rule = TopupRule { threshold: 20, amount: 80 };
    let r = l.set_topup_rule(op("rule"), &t(), &p(), Some(rule)).unwrap();
    assert_eq!(r.topup_requested, None);
    // 100 -> 30: above the threshold.
    assert_eq!(l.charge(op("c1"), &t(), &p(), 70).unwrap().topup_requested, None);
    // 30 -> 19: falls below: one request.
    assert_eq!(l.hold(op("h1"), &t(), &p(), 11).unwrap().topup_requested, Some(80));
    assert!(l.balance(&t(), &p()).topup_pending);
    // Still below: not repeated.
    assert_eq!(l.charge(op("c2"), &t(), &p(), 5).unwrap().topup_requested, None);
    assert_eq!(l.charge(op("c3"), &t(), &p(), 5).unwrap().topup_requested, None);
    // A release raises the balance but posts nothing: still pending.
    l.release(op("rel1"), &t(), &p(), &op("h1")).unwrap();
    assert_eq!(l.charge(op("c4"), &t(), &p(), 1).unwrap().topup_requested, None);
    // The platform posts the credits: the flag clears.
    l.grant(op("topup-1"), &t(), &p(), 80).unwrap();
    assert!(!l.balance(&t(), &p()).topup_pending);
    assert_eq!(bal(&l).0, 99);
    assert_eq!(l.charge(op("c5"), &t(), &p(), 79).unwrap().topup_requested, None);
    assert_eq!(l.charge(op("c6"), &t(), &p(), 1).unwrap().topup_requested, Some(80));
    l.check_invariants().unwrap();
    // Removing the rule stops requests.
    l.grant(op("topup-2"), &t(), &p(), 1).unwrap();
    l.set_topup_rule(op("rule-off"), &t(), &p(), None).unwrap();
    assert_eq!(l.charge(op("c7"), &t(), &p(), 15).unwrap().topup_requested, None);
}

#[test]
fn r10_topup_rule_must_be_positive() {
    let l = Ledger::new();
    let rule = TopupRule { threshold: 5, amount: 0 };
    refused(&l, LedgerError::InvalidAmount { field: "topup_rule.amount" }, |l| {
        l.set_topup_rule(op("rule"), &t(), &p(), Some(rule))
    });
}

#[test]
fn r9_forget_drops_closed_ops_but_keeps_open_holds() {
    let l = funded(10);
    l.charge(op("c"), &t(), &p(), 2).unwrap();
    l.refund(op("r"), &t(), &p(), &op("c"), RefundReason::NotViewed).unwrap();
    l.hold(op("h"), &t(), &p(), 3).unwrap();
    l.hold(op("h2"), &t(), &p(), 1).unwrap();
    l.capture(op("cap2"), &t(), &p(), &op("h2")).unwrap();
    let n = l.forget(&t(), &p(), &[op("c"), op("r"), op("h"), op("cap2"), op("missing")]);
    assert_eq!(n, 3, "the open hold is kept");
    l.check_invariants().unwrap();
    // The open hold can still be settled.
    l.release(op("rel"), &t(), &p(), &op("h")).unwrap();
    // The captured hold whose capture op was forgotten is still refundable once.
    l.refund(op("r2"), &t(), &p(), &op("h2"), RefundReason::Platform).unwrap();
    // A forgotten charge is unknown now (its refund window is over).
    refused(&l, LedgerError::UnknownCharge { charge: op("c") }, |l| {
        l.refund(op("r3"), &t(), &p(), &op("c"), RefundReason::Platform)
    });
    assert_eq!(l.forget(&t(), &ProId::new("nobody"), &[op("c")]), 0);
}

#[test]
fn snapshot_restores_the_same_state() {
    let l = funded(10);
    l.charge(op("c"), &t(), &p(), 2).unwrap();
    l.hold(op("h"), &t(), &p(), 3).unwrap();
    l.set_budget(op("sb"), &t(), &p(), &b(), 30).unwrap();
    l.recharge(op("rc"), &t(), &p(), &b()).unwrap();
    l.spend(op("sp"), &t(), &p(), &b(), 4).unwrap();
    let snap = l.snapshot();
    let bytes = rmp_serde::to_vec(&snap).unwrap();
    let back: LedgerSnapshot = rmp_serde::from_slice(&bytes).unwrap();
    let restored = Ledger::restore(back);
    assert_eq!(restored.snapshot(), snap);
    restored.check_invariants().unwrap();
    // Idempotency survives the restore.
    assert!(restored.charge(op("c"), &t(), &p(), 2).unwrap().replayed);
    assert!(restored.spend(op("sp"), &t(), &p(), &b(), 4).unwrap().replayed);
}

#[test]
fn events_round_trip_through_messagepack_and_json() {
    let l = funded(10);
    let e = l.charge(op("charge:l1:pro-1"), &t(), &p(), 3).unwrap().event;
    let bytes = rmp_serde::to_vec(&e).unwrap();
    assert!(bytes.len() < 64, "compact: {} bytes", bytes.len());
    assert_eq!(rmp_serde::from_slice::<LedgerEvent>(&bytes).unwrap(), e);
    let json = serde_json::to_string(&e).unwrap();
    assert_eq!(serde_json::from_str::<LedgerEvent>(&json).unwrap(), e);
    assert!(json.contains("\"charged\""), "{json}");
}

#[test]
fn apply_is_idempotent_and_matches_the_live_state() {
    let l = funded(10);
    let e1 = l.hold(op("h"), &t(), &p(), 4).unwrap().event;
    let e2 = l.capture(op("cap"), &t(), &p(), &op("h")).unwrap().event;
    let e3 = l.refund(op("r"), &t(), &p(), &op("h"), RefundReason::NotViewed).unwrap().event;
    let replica = Ledger::new();
    let grant = LedgerEvent::Credit {
        op: op("grant:0"),
        tenant: t(),
        pro: p(),
        fact: CreditFact::Granted { amount: 10 },
    };
    // Out of order, twice each: a refund before its charge exists.
    for e in [&e3, &e2, &e1, &grant, &e3, &e1, &grant, &e2] {
        replica.apply(e);
    }
    assert_eq!(replica.snapshot(), l.snapshot());
    replica.check_invariants().unwrap();
}

#[test]
fn deltas_describe_every_fact() {
    let d = CreditFact::Captured { hold: op("h"), amount: 4 }.deltas();
    assert_eq!((d.held, d.captured, d.available), (-4, 4, 0));
    let d = CreditFact::Refunded { charge: op("c"), amount: 2, reason: RefundReason::Platform }.deltas();
    assert_eq!((d.available, d.refunded, d.captured), (2, 2, 0));
    assert_eq!(RefundReason::InvalidContact.code(), "invalid_contact");
    assert_eq!(OpId::for_lead("charge", &LeadId::new("l1"), &p()), op("charge:l1:pro-1"));
}

// ---- auto-buy budgets -------------------------------------------------------

fn budget(l: &Ledger) -> BudgetBalance {
    l.budget(&t(), &p(), &b()).expect("the test set the budget")
}

fn weekly(l: &Ledger, weekly: u64) {
    l.set_budget(op(&format!("set:{weekly}")), &t(), &p(), &b(), weekly).unwrap();
}

#[test]
fn r19_budget_must_be_set_before_use() {
    let l = Ledger::new();
    let unknown = LedgerError::UnknownBudget { budget: b() };
    refused(&l, unknown.clone(), |l| l.recharge(op("rc"), &t(), &p(), &b()));
    refused(&l, unknown.clone(), |l| l.spend(op("s"), &t(), &p(), &b(), 1));
    refused(&l, unknown, |l| l.refund_spend(op("r"), &t(), &p(), &b(), &op("s")));
    refused(&l, LedgerError::InvalidAmount { field: "weekly_budget" }, |l| {
        l.set_budget(op("sb"), &t(), &p(), &b(), 0)
    });
    assert_eq!(l.budget(&t(), &p(), &b()), None);
    // Set but never recharged: nothing to spend yet.
    weekly(&l, 10);
    refused(&l, LedgerError::BudgetExhausted { available: 0, needed: 1 }, |l| {
        l.spend(op("s"), &t(), &p(), &b(), 1)
    });
}

#[test]
fn r20_recharge_tops_up_not_adds() {
    let l = Ledger::new();
    weekly(&l, 100);
    l.recharge(op("week-1"), &t(), &p(), &b()).unwrap();
    assert_eq!(budget(&l).available, 100);
    l.spend(op("s1"), &t(), &p(), &b(), 30).unwrap();
    assert_eq!((budget(&l).available, budget(&l).spent), (70, 30));
    l.recharge(op("week-2"), &t(), &p(), &b()).unwrap();
    let got = budget(&l);
    assert_eq!((got.available, got.spent, got.period), (100, 0, 2), "not 170");
    // R24: resuming a paused config recharges the same way; unspent is not kept.
    l.recharge(op("resume"), &t(), &p(), &b()).unwrap();
    assert_eq!(budget(&l).available, 100);
    l.check_invariants().unwrap();
}

#[test]
fn r20_a_new_weekly_budget_applies_from_the_next_recharge() {
    let l = Ledger::new();
    weekly(&l, 100);
    l.recharge(op("w1"), &t(), &p(), &b()).unwrap();
    weekly(&l, 40);
    let now = budget(&l);
    assert_eq!((now.weekly_budget, now.available), (40, 100));
    l.recharge(op("w2"), &t(), &p(), &b()).unwrap();
    assert_eq!(budget(&l).available, 40);
}

#[test]
fn r19_r21_a_hard_budget_is_never_overshot_by_one_lead() {
    let l = Ledger::new();
    weekly(&l, 100);
    l.recharge(op("w1"), &t(), &p(), &b()).unwrap();
    for i in 0..9 {
        l.spend(op(&format!("s{i}")), &t(), &p(), &b(), 11).unwrap();
    }
    // 99 spent, 1 left: an 11-credit lead would overshoot by 10.
    refused(&l, LedgerError::BudgetExhausted { available: 1, needed: 11 }, |l| {
        l.spend(op("s9"), &t(), &p(), &b(), 11)
    });
    l.spend(op("s9"), &t(), &p(), &b(), 1).unwrap();
    assert_eq!(budget(&l).available, 0);
    refused(&l, LedgerError::BudgetExhausted { available: 0, needed: 1 }, |l| {
        l.spend(op("s10"), &t(), &p(), &b(), 1)
    });
}

#[test]
fn r22_r23_refunded_spend_returns_to_the_budget_once() {
    let l = Ledger::new();
    weekly(&l, 20);
    l.recharge(op("w1"), &t(), &p(), &b()).unwrap();
    l.spend(op("s1"), &t(), &p(), &b(), 20).unwrap();
    l.refund_spend(op("r1"), &t(), &p(), &b(), &op("s1")).unwrap();
    let got = budget(&l);
    assert_eq!((got.available, got.spent, got.refunded), (20, 20, 20));
    refused(&l, LedgerError::AlreadyRefunded { op: op("s1"), by: op("r1") }, |l| {
        l.refund_spend(op("r2"), &t(), &p(), &b(), &op("s1"))
    });
    refused(&l, LedgerError::UnknownSpend { budget: b(), spend: op("nope") }, |l| {
        l.refund_spend(op("r3"), &t(), &p(), &b(), &op("nope"))
    });
    // R22: budget returned, so a retried lead can be bought.
    l.spend(op("s2"), &t(), &p(), &b(), 20).unwrap();
    l.check_invariants().unwrap();
}

#[test]
fn r12_r20_refund_of_last_weeks_spend_is_credited_to_this_week_and_lapses_at_the_next_recharge() {
    let l = Ledger::new();
    weekly(&l, 20);
    l.recharge(op("w1"), &t(), &p(), &b()).unwrap();
    l.spend(op("s1"), &t(), &p(), &b(), 15).unwrap();
    l.recharge(op("w2"), &t(), &p(), &b()).unwrap();
    l.spend(op("s2"), &t(), &p(), &b(), 20).unwrap();
    // A week-long guarantee refunds last week's lead: this week's budget gets it.
    let r = l.refund_spend(op("r1"), &t(), &p(), &b(), &op("s1")).unwrap();
    assert!(matches!(
        r.event,
        LedgerEvent::Budget { fact: BudgetFact::Refunded { period: 1, into: Some(2), .. }, .. }
    ));
    let got = budget(&l);
    assert_eq!((got.available, got.spent, got.refunded), (15, 20, 15));
    l.check_invariants().unwrap();
    // Still at most once.
    assert!(matches!(
        l.refund_spend(op("r2"), &t(), &p(), &b(), &op("s1")),
        Err(LedgerError::AlreadyRefunded { .. })
    ));
    // Spent within the week, like the rest of it (R22: a retried lead can be bought)...
    l.spend(op("s3"), &t(), &p(), &b(), 10).unwrap();
    assert_eq!(budget(&l).available, 5);
    // ...and what is left lapses at the recharge: topped up, not added (R20).
    l.recharge(op("w3"), &t(), &p(), &b()).unwrap();
    let got = budget(&l);
    assert_eq!((got.available, got.spent, got.refunded), (20, 0, 0));
    l.check_invariants().unwrap();
    // Replayed in reverse order, the same facts end in the same state: the period a
    // refund is credited to is in its fact, not taken from the replaying ledger.
    let live = Ledger::new();
    let events = [
        live.set_budget(op("set"), &t(), &p(), &b(), 20).unwrap().event,
        live.recharge(op("w1"), &t(), &p(), &b()).unwrap().event,
        live.spend(op("s1"), &t(), &p(), &b(), 15).unwrap().event,
        live.recharge(op("w2"), &t(), &p(), &b()).unwrap().event,
        live.refund_spend(op("r1"), &t(), &p(), &b(), &op("s1")).unwrap().event,
    ];
    let replayed = Ledger::new();
    for e in events.iter().rev() {
        replayed.apply(e);
    }
    assert_eq!(replayed.budget(&t(), &p(), &b()), live.budget(&t(), &p(), &b()));
    assert_eq!(live.budget(&t(), &p(), &b()).unwrap().available, 35);
}

#[test]
fn r19_r20_budget_ops_are_idempotent_and_conflicts_are_refused() {
    let l = Ledger::new();
    let first = l.set_budget(op("sb"), &t(), &p(), &b(), 50).unwrap();
    let rc = l.recharge(op("w1"), &t(), &p(), &b()).unwrap();
    let sp = l.spend(op("s"), &t(), &p(), &b(), 5).unwrap();
    let rf = l.refund_spend(op("r"), &t(), &p(), &b(), &op("s")).unwrap();
    let state = l.snapshot();
    assert_eq!(l.set_budget(op("sb"), &t(), &p(), &b(), 50).unwrap().event, first.event);
    let again = l.recharge(op("w1"), &t(), &p(), &b()).unwrap();
    assert!(again.replayed);
    assert_eq!(again.event, rc.event);
    assert_eq!(l.spend(op("s"), &t(), &p(), &b(), 5).unwrap().event, sp.event);
    let r = l.refund_spend(op("r"), &t(), &p(), &b(), &op("s")).unwrap();
    assert_eq!((r.event, r.replayed), (rf.event, true));
    assert_eq!(l.snapshot(), state, "replays change nothing");
    refused(&l, LedgerError::OpConflict { op: op("s"), existing: "spend" }, |l| {
        l.spend(op("s"), &t(), &p(), &b(), 6)
    });
    refused(&l, LedgerError::OpConflict { op: op("w1"), existing: "recharge" }, |l| {
        l.spend(op("w1"), &t(), &p(), &b(), 1)
    });
    assert_eq!(l.forget_budget_ops(&t(), &p(), &b(), &[op("s"), op("r")]), 2);
    assert_eq!(l.forget_budget_ops(&t(), &p(), &BudgetName::new("x"), &[op("s")]), 0);
    l.check_invariants().unwrap();
}

#[test]
fn r20_budget_facts_commute_across_recharges() {
    let l = Ledger::new();
    let events = [
        l.set_budget(op("sb"), &t(), &p(), &b(), 10).unwrap().event,
        l.recharge(op("w1"), &t(), &p(), &b()).unwrap().event,
        l.spend(op("s1"), &t(), &p(), &b(), 7).unwrap().event,
        l.recharge(op("w2"), &t(), &p(), &b()).unwrap().event,
        l.spend(op("s2"), &t(), &p(), &b(), 4).unwrap().event,
        l.refund_spend(op("r2"), &t(), &p(), &b(), &op("s2")).unwrap().event,
        l.spend(op("s3"), &t(), &p(), &b(), 9).unwrap().event,
    ];
    let want = l.snapshot();
    // Spends and refunds commute with everything; the setting and the recharges (0, 1,
    // 3) keep their order, as the engine's log does.
    for order in [[6, 5, 4, 0, 2, 1, 3], [2, 4, 6, 5, 0, 1, 3], [0, 1, 2, 3, 4, 5, 6]] {
        let replica = Ledger::new();
        for i in order {
            replica.apply(&events[i]);
        }
        assert_eq!(replica.snapshot(), want, "order {order:?}");
        replica.check_invariants().unwrap();
    }
}

// ---- concurrency --------------------------------------------------------------

/// R9 + hard budgets under contention: 16 threads x 1000 ops race for the last
/// credits of one pro (charges, holds, captures, releases, refunds, replays)
/// and for one auto-buy budget. Nothing is overdrawn and money is conserved.
#[test]
fn r9_threads_racing_for_the_last_credits_never_overdraw() {
    const THREADS: usize = 16;
    const OPS: usize = 1000;
    let l = funded(5_000);
    weekly(&l, 1_000);
    l.recharge(op("w1"), &t(), &p(), &b()).unwrap();

    #[derive(Default)]
    struct Tally {
        charged: u64,
        held: u64,
        captured: u64,
        released: u64,
        refunded: u64,
        refused: u64,
        spent: u64,
    }
    let tallies: Vec<Tally> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|th| {
                let l = &l;
                s.spawn(move || {
                    let mut tally = Tally::default();
                    for i in 0..OPS {
                        let id = |k: &str| op(&format!("{k}:{th}:{i}"));
                        let amount = 1 + (th + i) as u64 % 5;
                        match i % 5 {
                            0 | 1 => match l.charge(id("c"), &t(), &p(), amount) {
                                Ok(r) => {
                                    assert!(!r.replayed);
                                    tally.charged += amount;
                                    // A retry of the same op is answered, not charged.
                                    let again = l.charge(id("c"), &t(), &p(), amount).unwrap();
                                    assert!(again.replayed);
                                    if i % 3 == 0 {
                                        l.refund(id("r"), &t(), &p(), &id("c"), RefundReason::NotViewed)
                                            .unwrap();
                                        tally.refunded += amount;
                                    }
                                }
                                Err(LedgerError::InsufficientCredits { .. }) => tally.refused += 1,
                                Err(e) => panic!("unexpected {e}"),
                            },
                            2 => match l.hold(id("h"), &t(), &p(), amount) {
                                Ok(_) => {
                                    tally.held += amount;
                                    if i % 2 == 0 {
                                        l.capture(id("cap"), &t(), &p(), &id("h")).unwrap();
                                        tally.captured += amount;
                                    } else {
                                        l.release(id("rel"), &t(), &p(), &id("h")).unwrap();
                                        tally.released += amount;
                                    }
                                }
                                Err(LedgerError::InsufficientCredits { .. }) => tally.refused += 1,
                                Err(e) => panic!("unexpected {e}"),
                            },
                            3 => match l.spend(id("s"), &t(), &p(), &b(), 3) {
                                Ok(_) => tally.spent += 3,
                                Err(LedgerError::BudgetExhausted { available, needed: 3 }) => {
                                    assert!(available < 3)
                                }
                                Err(e) => panic!("unexpected {e}"),
                            },
                            _ => {
                                // Read-only: a balance is never seen overdrawn.
                                let bal = l.balance(&t(), &p());
                                assert!(bal.available <= 5_000 && bal.held <= 5_000);
                            }
                        }
                    }
                    tally
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("worker thread panicked")).collect()
    });
    l.check_invariants().unwrap();
    let sum = |f: fn(&Tally) -> u64| tallies.iter().map(f).sum::<u64>();
    let bal = l.balance(&t(), &p());
    assert!(sum(|t| t.refused) > 0, "the threads did run out of credits");
    assert_eq!(bal.granted, 5_000);
    assert_eq!(bal.held, 0);
    assert_eq!(bal.captured, sum(|t| t.charged) + sum(|t| t.captured));
    assert_eq!(bal.refunded, sum(|t| t.refunded));
    assert_eq!(sum(|t| t.held), sum(|t| t.captured) + sum(|t| t.released));
    assert_eq!(bal.available + bal.captured - bal.refunded, 5_000, "money conserved");
    let spent = sum(|t| t.spent);
    assert_eq!(spent, 999, "333 leads of 3 fit in 1000, the 334th does not");
    let bb = budget(&l);
    assert_eq!((bb.spent, bb.available), (999, 1));
}

/// A snapshot taken while other threads keep operating, restored and followed
/// by a replay of every event (including those it already holds), ends in the
/// live state: the documented recovery of a fuzzy snapshot plus the WAL.
#[test]
fn fuzzy_snapshot_plus_full_replay_equals_the_live_state() {
    let l = Ledger::new();
    let pros: Vec<ProId> = (0..8).map(|i| ProId::new(format!("pro-{i}"))).collect();
    let mut events = vec![];
    for p in &pros {
        events.push(l.grant(op("g"), &t(), p, 200).unwrap().event);
        events.push(l.set_budget(op("sb"), &t(), p, &b(), 50).unwrap().event);
        events.push(l.recharge(op("w1"), &t(), p, &b()).unwrap().event);
    }
    let (mid, logged): (LedgerSnapshot, Vec<Vec<LedgerEvent>>) = std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|th| {
                let (l, pros) = (&l, &pros);
                s.spawn(move || {
                    let mut log = vec![];
                    for i in 0..500 {
                        let p = &pros[(th + i) % pros.len()];
                        let id = |k: &str| op(&format!("{k}:{th}:{i}"));
                        if let Ok(r) = l.charge(id("c"), &t(), p, 1 + i as u64 % 4) {
                            log.push(r.event);
                            if i % 4 == 0 {
                                let r = l.refund(id("r"), &t(), p, &id("c"), RefundReason::NotViewed);
                                log.push(r.unwrap().event);
                            }
                        }
                        if let Ok(r) = l.spend(id("s"), &t(), p, &b(), 2) {
                            log.push(r.event);
                        }
                        if i == 250 {
                            log.push(l.recharge(id("w"), &t(), p, &b()).unwrap().event);
                        }
                    }
                    log
                })
            })
            .collect();
        let mid = l.snapshot();
        let logged = workers.into_iter().map(|w| w.join().expect("worker thread panicked")).collect();
        (mid, logged)
    });
    let recovered = Ledger::restore(mid);
    for e in events.iter().chain(logged.iter().flatten()) {
        recovered.apply(e);
    }
    assert_eq!(recovered.snapshot(), l.snapshot());
    recovered.check_invariants().unwrap();
}

#[test]
fn r9_op_ids_of_leads_not_kept_are_forgotten_and_open_holds_grants_and_kept_leads_stay() {
    let l = funded(100);
    // A lead id holding a `:`: the lead is what lies between `<kind>:` and `:<pro>`.
    let gone = LeadId::new("old:1");
    let kept = LeadId::new("L2");
    let charge = OpId::for_lead("charge", &gone, &p());
    l.charge(charge.clone(), &t(), &p(), 10).unwrap();
    l.refund(OpId::for_lead("refund", &gone, &p()), &t(), &p(), &charge, RefundReason::NotViewed).unwrap();
    l.charge(OpId::for_lead("charge", &kept, &p()), &t(), &p(), 10).unwrap();
    let open_hold = OpId::for_lead("hold", &LeadId::new("L3"), &p());
    l.hold(open_hold.clone(), &t(), &p(), 10).unwrap();
    let ops = l.registered_ops();
    let keep = |tenant: &TenantId, lead: &str| tenant == &t() && lead == kept.as_str();
    assert_eq!(l.forget_lead_ops_where(&["charge", "hold", "refund"], &["buy"], keep), 2);
    assert_eq!(l.registered_ops(), ops - 2);
    // The forgotten lead's charge can be made again; the kept one's is a repeat; the
    // open hold and the grant are still known.
    assert!(!l.charge(charge, &t(), &p(), 10).unwrap().replayed);
    assert!(l.charge(OpId::for_lead("charge", &kept, &p()), &t(), &p(), 10).unwrap().replayed);
    assert!(l.hold(open_hold, &t(), &p(), 10).unwrap().replayed);
    l.check_invariants().unwrap();
}

/// Grants and top-up rules are never forgotten with a lead: an account keeps the
/// newest [`account::KEPT_ACCOUNT_OPS`] of them, a budget its newest settings and
/// recharges, so a pro paid for every week for years does not grow the registry (and
/// the snapshot) for ever. Replay in log order forgets the same ids at the same point.
#[test]
fn r10_r20_grant_and_recharge_ids_are_kept_for_the_newest_only_and_replay_keeps_the_same() {
    let l = Ledger::new();
    let keep = account::KEPT_ACCOUNT_OPS;
    let mut events = vec![];
    for i in 0..keep + 10 {
        events.push(l.grant(op(&format!("grant:pay-{i}")), &t(), &p(), 1).unwrap().event);
    }
    events.push(l.change_topup_rule(&t(), &p(), Some(TopupRule { threshold: 5, amount: 10 })).unwrap().event);
    events.push(l.set_budget(op("budget:first"), &t(), &p(), &b(), 50).unwrap().event);
    for i in 0..budget::KEPT_SET_OPS + 3 {
        events.push(l.set_budget(op(&format!("budget:{i}")), &t(), &p(), &b(), 60 + i as u64).unwrap().event);
    }
    for i in 0..budget::KEPT_RECHARGE_OPS + 5 {
        events.push(l.recharge(op(&format!("week:{i}")), &t(), &p(), &b()).unwrap().event);
    }
    l.check_invariants().unwrap();
    let kept = keep + 1 + budget::KEPT_SET_OPS + budget::KEPT_RECHARGE_OPS;
    assert_eq!(l.registered_ops(), kept, "only the newest of each kind are remembered");
    // The newest are answered as repeats and change nothing...
    let before = l.snapshot();
    let last = keep + 9;
    assert!(l.grant(op(&format!("grant:pay-{last}")), &t(), &p(), 1).unwrap().replayed);
    assert!(l.grant(op("grant:pay-11"), &t(), &p(), 1).unwrap().replayed);
    let newest_week = format!("week:{}", budget::KEPT_RECHARGE_OPS + 4);
    assert!(l.recharge(op(&newest_week), &t(), &p(), &b()).unwrap().replayed);
    assert_eq!(l.snapshot(), before);
    // ...and the same history replayed in log order ends in the same state, with the
    // same ids forgotten.
    let recovered = Ledger::new();
    for e in &events {
        recovered.apply(e);
    }
    assert_eq!(recovered.snapshot(), before);
    // The oldest grant (the eleventh newest-but-256) was forgotten: sent again, it is
    // a new payment.
    assert!(!l.grant(op("grant:pay-9"), &t(), &p(), 1).unwrap().replayed);
    assert_eq!(l.balance(&t(), &p()).granted, (keep + 11) as u64);
    l.check_invariants().unwrap();
}

/// A snapshot written before the registries were bounded (an account and a budget
/// without their queues of newest ids) still loads: the queues start empty.
#[test]
fn snapshots_without_the_queues_of_newest_ids_still_load() {
    let l = Ledger::new();
    l.grant(op("grant:a"), &t(), &p(), 5).unwrap();
    l.set_budget(op("budget:a"), &t(), &p(), &b(), 50).unwrap();
    let snap = l.snapshot();
    let (_, _, account) = &snap.accounts[0];
    let (_, _, _, budget) = &snap.budgets[0];
    // rmp-serde writes a struct as an array; the queues are its last fields, an empty
    // array (0x90) each (a budget's are followed by its `spendable_until`, a nil
    // 0xc0 when none). The older layout is the same array without them.
    fn older(mut bytes: Vec<u8>, dropped: u8) -> Vec<u8> {
        for _ in 0..dropped {
            let last = bytes.pop();
            assert!(matches!(last, Some(0x90 | 0xc0)), "a trailing empty queue or nil: {last:?}");
        }
        bytes[0] -= dropped;
        bytes
    }
    let mut a = (**account).clone();
    a.recent = Default::default();
    a.recent_rules = Default::default();
    // Before the queue of rule changes, and before both queues.
    let old = older(rmp_serde::to_vec(&a).unwrap(), 1);
    assert_eq!(rmp_serde::from_slice::<account::Account>(&old).unwrap(), a);
    let old = older(rmp_serde::to_vec(&a).unwrap(), 2);
    assert_eq!(rmp_serde::from_slice::<account::Account>(&old).unwrap(), a);
    let mut bu = (**budget).clone();
    bu.recent_sets = Default::default();
    bu.spendable_until = None;
    // Before the week a period is spendable for, and before the queues too.
    let old = older(rmp_serde::to_vec(&bu).unwrap(), 1);
    assert_eq!(rmp_serde::from_slice::<budget::Budget>(&old).unwrap(), bu);
    let old = older(rmp_serde::to_vec(&bu).unwrap(), 3);
    assert_eq!(rmp_serde::from_slice::<budget::Budget>(&old).unwrap(), bu);
}

/// R10: top-up rule changes have their own queue of newest ids: a platform that saves
/// a pro's rule at every profile edit never pushes a payment id out of the grants'
/// queue, where a retry of that payment would be credited again. Replay in log order
/// keeps the same ids.
#[test]
fn r10_rule_changes_never_push_a_payment_id_out_of_memory() {
    let l = Ledger::new();
    let mut events = vec![l.grant(op("grant:pay-1"), &t(), &p(), 100).unwrap().event];
    for i in 0..account::KEPT_ACCOUNT_OPS + 10 {
        let rule = TopupRule { threshold: 5, amount: 10 + i as u64 };
        events.push(l.change_topup_rule(&t(), &p(), Some(rule)).unwrap().event);
    }
    assert!(l.grant(op("grant:pay-1"), &t(), &p(), 100).unwrap().replayed, "the payment is remembered");
    assert_eq!(l.balance(&t(), &p()).granted, 100, "and credited once");
    assert_eq!(l.registered_ops(), 1 + account::KEPT_RULE_OPS, "rule ids are bounded on their own");
    let recovered = Ledger::new();
    for e in &events {
        recovered.apply(e);
    }
    assert_eq!(recovered.snapshot(), l.snapshot());
    l.check_invariants().unwrap();
}

/// R20: a recharge made for a week is spent from until that week ends: a spend at or
/// after its end is refused `BudgetExhausted` with nothing available (last week's
/// leftover), and the next recharge makes it spendable again. A recharge logged before
/// the week was recorded (no `until`) decodes as spendable whenever.
#[test]
fn r20_a_budget_is_spent_from_only_in_the_week_it_was_topped_up_for() {
    let l = Ledger::new();
    l.set_budget(op("budget:a"), &t(), &p(), &b(), 50).unwrap();
    let end = 1_000;
    l.recharge_until(op("week:1"), &t(), &p(), &b(), Some(end)).unwrap();
    l.spend_at(op("buy:1"), &t(), &p(), &b(), 20, end - 1).unwrap();
    let balance = l.budget(&t(), &p(), &b()).unwrap();
    assert_eq!((balance.available_at(end - 1), balance.available_at(end)), (30, 0));
    match l.spend_at(op("buy:2"), &t(), &p(), &b(), 20, end) {
        Err(LedgerError::BudgetExhausted { available: 0, needed: 20 }) => {}
        other => panic!("a spend after the week answered {other:?}"),
    }
    l.recharge_until(op("week:2"), &t(), &p(), &b(), Some(2 * end)).unwrap();
    l.spend_at(op("buy:2"), &t(), &p(), &b(), 20, end).unwrap();
    assert_eq!(l.budget(&t(), &p(), &b()).unwrap().available, 30);
    l.check_invariants().unwrap();
    // The fact as records before `until` hold it: two fields.
    let old = rmp_serde::to_vec(&BudgetFact::Recharged { period: 3, to: 50, until: None }).unwrap();
    let with = rmp_serde::to_vec(&BudgetFact::Recharged { period: 3, to: 50, until: Some(7) }).unwrap();
    assert!(old.len() < with.len(), "no `until` is written when there is none");
    assert_eq!(
        rmp_serde::from_slice::<BudgetFact>(&with).unwrap(),
        BudgetFact::Recharged { period: 3, to: 50, until: Some(7) }
    );
    assert_eq!(
        rmp_serde::from_slice::<BudgetFact>(&old).unwrap(),
        BudgetFact::Recharged { period: 3, to: 50, until: None }
    );
}

/// R12/R20: a refund decided once the budget's week is over (a guarantee that comes due
/// in the moments before the week's recharge) is credited to the week that recharge
/// opens, as one decided just after it would be: in the period that is over, the
/// recharge replaced it and the pro lost it. Replay in any order ends the same.
#[test]
fn r12_r20_a_refund_after_the_week_ended_goes_to_the_next_week_not_to_the_one_replaced() {
    let l = Ledger::new();
    let mut events = vec![l.set_budget(op("budget:a"), &t(), &p(), &b(), 50).unwrap().event];
    let end = 1_000;
    events.push(l.recharge_until(op("week:1"), &t(), &p(), &b(), Some(end)).unwrap().event);
    events.push(l.spend_at(op("buy:1"), &t(), &p(), &b(), 20, end - 1).unwrap().event);
    let what = GiveBack::RefundSpend { budget: &b(), spend: &op("buy:1"), at: end };
    let refund = l.give_back_deferred(op("refund:1"), &t(), &p(), what).unwrap().event;
    l.apply(&refund);
    events.push(refund);
    assert_eq!(l.budget(&t(), &p(), &b()).unwrap().available_at(end), 0, "nothing spent before the recharge");
    l.check_invariants().unwrap();
    events.push(l.recharge_until(op("week:2"), &t(), &p(), &b(), Some(2 * end)).unwrap().event);
    let after = l.budget(&t(), &p(), &b()).unwrap();
    assert_eq!((after.period, after.available), (2, 50 + 20), "the week's 50 and the refund");
    l.check_invariants().unwrap();
    for order in [events.clone(), events.iter().rev().cloned().collect::<Vec<_>>()] {
        let replayed = Ledger::new();
        for e in &order {
            replayed.apply(e);
        }
        assert_eq!(replayed.budget(&t(), &p(), &b()).unwrap().available, 70);
    }
}
