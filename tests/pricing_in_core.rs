//! R11 wired into the dispatch core: the lead's price comes from the tenant's
//! category statistics, riskier leads cost less, the components travel with the
//! lead (explain), and proposals per lead are learned from closed leads.

use rota::core::shard::{Command, Shard};
use rota::core::{Client, ContactPrefs, JobKind, Lead, Policy, Pro};
use rota::ids::{CategoryId, ClientId, LeadId, ProId, ShardKey, TenantId, ZoneId, HOUR_MS};
use std::sync::Arc;

const T0: i64 = 1_764_000_000_000;

const POLICY: &str = r#"
tenant = "t"
mode = "shared"
[leads]
duplicate_window_s = 0
[gate]
min_description_chars = 10
[money]
charge_on = "response"
flat_price_credits = 10
[pricing]
tenant_factor_permille = 1000
min_price_credits = 1
max_price_credits = 100
credit_value_cents = 100
chat_only_discount_permille = 300
thin_details_discount_permille = 150
far_away_discount_permille = 200
far_away_km = 30
proposals_ema_permille = 500
[pricing.default_category]
avg_job_value_cents = 50000
conversion_permille = 200
avg_proposals_milli = 4000
[pricing.categories.painting]
avg_job_value_cents = 120000
conversion_permille = 250
avg_proposals_milli = 5000
"#;

fn shard() -> Shard {
    let policy = Arc::new(Policy::from_toml(POLICY).expect("the test policy is valid"));
    let key = ShardKey {
        tenant: TenantId::new("t"),
        zone: ZoneId::new("bo"),
        category: CategoryId::new("painting"),
    };
    let mut s = Shard::new(key, policy);
    for i in 0..6 {
        let pro = Pro {
            id: ProId::new(format!("p{i}")),
            categories: vec![CategoryId::new("painting")],
            zones: vec![ZoneId::new("bo")],
            base: None,
            radius_km: None,
            quality: Default::default(),
            refuses: vec![],
            availability: Default::default(),
            autobuy: vec![],
        };
        run(&mut s, T0, Command::UpsertPro { pro });
    }
    s
}

fn run(s: &mut Shard, now: i64, cmd: Command) -> rota::core::Reply {
    let d = s.decide(now, &cmd, &rota::core::Unlimited).expect("command accepted");
    for e in &d.events {
        s.apply(e);
    }
    s.check_invariants().unwrap();
    d.reply
}

fn lead(id: &str, chat_only: bool, details: bool) -> Lead {
    Lead {
        id: LeadId::new(id),
        category: CategoryId::new("painting"),
        zone: ZoneId::new("bo"),
        location: None,
        description: "Repaint the whole flat, three rooms".into(),
        details: if details {
            [("rooms".to_string(), "3".to_string())].into_iter().collect()
        } else {
            Default::default()
        },
        attributes: vec![],
        client: Client {
            id: ClientId::new(format!("c-{id}")),
            name: "Anna".into(),
            phone: "+39 1".into(),
            phone_verified: true,
            contact: ContactPrefs { call: !chat_only, whatsapp: false, chat: true },
            address: None,
            pro_id: None,
        },
        direct: vec![],
        kind: JobKind::Match,
        created_at: T0,
    }
}

fn price_of(s: &mut Shard, l: Lead) -> u64 {
    match run(s, T0, Command::PublishLead { lead: l.into() }) {
        rota::core::Reply::Lead(o) => o.price,
        other => panic!("{other:?}"),
    }
}

#[test]
fn r11_price_comes_from_category_statistics_with_components() {
    let mut s = shard();
    // 1200.00 x 25 % / 5 proposals = 60.00 = 60 credits of 1.00.
    assert_eq!(price_of(&mut s, lead("a", false, true)), 60);
    let ex = s.explain(&LeadId::new("a")).unwrap();
    let c = ex.price_components.expect("the explanation carries the price components");
    assert_eq!((c.avg_job_value_cents, c.conversion_permille, c.avg_proposals_milli), (120_000, 250, 5_000));
    assert_eq!(c.expected_value_cents, 6_000);
}

#[test]
fn r11_riskier_leads_cost_less() {
    let mut s = shard();
    let full = price_of(&mut s, lead("a", false, true));
    let chat = price_of(&mut s, lead("b", true, true));
    let thin = price_of(&mut s, lead("c", false, false));
    assert_eq!(chat, 42, "30 % chat-only discount");
    assert_eq!(thin, 51, "15 % thin-details discount");
    assert!(chat < full && thin < full);
}

#[test]
fn r11_proposals_per_lead_are_learned_from_closed_leads() {
    let mut s = shard();
    assert_eq!(price_of(&mut s, lead("a", false, true)), 60);
    // Nobody responds; the lead closes after 48 h: 0 proposals observed, the moving
    // average (rate 0.5) halves to 2.5 proposals, so the next lead is worth more.
    run(&mut s, T0 + 49 * HOUR_MS, Command::Tick);
    let mut next = lead("b", false, true);
    next.created_at = T0 + 49 * HOUR_MS;
    let d = s
        .decide(T0 + 49 * HOUR_MS, &Command::PublishLead { lead: next.into() }, &rota::core::Unlimited)
        .unwrap();
    match d.reply {
        rota::core::Reply::Lead(o) => assert_eq!(o.price, 100, "clamped to max 100 (120 before the clamp)"),
        other => panic!("{other:?}"),
    }
}
