//! R11 wired into the dispatch core: the lead's price comes from the tenant's
//! category statistics, riskier leads cost less, the components travel with the
//! lead (explain), and proposals per lead are learned from closed leads.

use rota::core::shard::{Command, Event, OfferAction, Shard};
use rota::core::{Client, ContactPrefs, GeoPoint, JobKind, Lead, Policy, Pro};
use rota::ids::{CategoryId, ClientId, LeadId, ProId, ShardKey, TenantId, ZoneId, HOUR_MS};
use std::sync::Arc;

const T0: i64 = 1_764_000_000_000;

mod common;

/// R11 prices in a shared-mode shard (a painting lead costs 60 credits).
use common::R11_POLICY as POLICY;

fn shard() -> Shard {
    shard_with(POLICY, (0..6).map(|i| (format!("p{i}"), None)))
}

/// A painting shard of zone `bo` under `policy`, with pros `(id, base)`; a pro with a
/// base takes leads within 100 km of it, one without takes any.
fn shard_with(policy: &str, pros: impl IntoIterator<Item = (String, Option<GeoPoint>)>) -> Shard {
    let policy = Arc::new(Policy::from_toml(policy).expect("the test policy is valid"));
    let key = ShardKey {
        tenant: TenantId::new("t"),
        zone: ZoneId::new("bo"),
        category: CategoryId::new("painting"),
    };
    let mut s = Shard::new(key, policy);
    for (id, base) in pros {
        let pro = Pro {
            id: ProId::new(id),
            categories: vec![CategoryId::new("painting")],
            zones: vec![ZoneId::new("bo")],
            base,
            radius_km: base.map(|_| 100.0),
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

/// The lead is in Bologna; "near" is based 4 km away, "far" in Modena (about 37 km,
/// beyond the policy's `far_away_km = 30`), "nobase" has no base; all three take
/// leads within 100 km (or anywhere).
fn located_shard(policy: &str) -> Shard {
    shard_with(
        policy,
        [("near", Some(NEAR)), ("far", Some(MODENA)), ("nobase", None)].map(|(i, b)| (i.to_string(), b)),
    )
}

const BOLOGNA: GeoPoint = GeoPoint { lat: 44.4949, lon: 11.3426 };
const NEAR: GeoPoint = GeoPoint { lat: 44.53, lon: 11.35 };
const MODENA: GeoPoint = GeoPoint { lat: 44.6471, lon: 10.9252 };

fn located_lead(id: &str) -> Lead {
    Lead { location: Some(BOLOGNA), ..lead(id, false, true) }
}

#[test]
fn r8_r11_a_pro_farther_than_far_away_km_pays_the_far_away_price_and_sees_whole_km() {
    let mut s = located_shard(POLICY);
    // The lead's price (60) is what the publish answers; a pro 37 km away pays 20 %
    // less (48), one nearby or without a base the lead's price.
    assert_eq!(price_of(&mut s, located_lead("a")), 60);
    let lead = LeadId::new("a");
    let view = |s: &Shard, p: &str| s.offer_view(&lead, &ProId::new(p)).expect("offered").price;
    assert_eq!((view(&s, "near"), view(&s, "far"), view(&s, "nobase")), (60, 48, 60));
    // explain names the far pro's price; the lead's components stay the lead's.
    let ex = s.explain(&lead).unwrap();
    let entry = |p: &str| ex.entries.iter().find(|e| e.pro.as_str() == p).expect("explained").price;
    assert_eq!((entry("near"), entry("far"), entry("nobase")), (None, Some(48), None));
    assert_eq!(ex.price, 60);
    let st = s.lead(&lead).unwrap();
    let far = s.price_components_of(st, &ProId::new("far")).expect("priced from statistics");
    assert_eq!((far.far_away_discount_permille, far.risk_factor_permille), (200, 800));
    // R8: shown in whole kilometres, rounded down, not to the metre (with the pro's base
    // that would place the client's address).
    let exact_m = MODENA.distance_km(&BOLOGNA) * 1000.0;
    let shown = far.distance_m.expect("a far-away distance");
    assert_eq!(shown % 1000, 0, "{far:?}");
    assert!((shown as f64) <= exact_m && exact_m < (shown + 1000) as f64, "{shown} for {exact_m} m");
    assert!((30_000..45_000).contains(&shown), "{far:?}");
    // Responding charges each pro its own price (R9).
    for (pro, credits) in [("far", 48), ("near", 60)] {
        let respond =
            Command::Offer { lead: lead.clone(), pro: ProId::new(pro), action: OfferAction::Respond };
        let d = s.decide(T0 + 1, &respond, &rota::core::Unlimited).unwrap();
        let charged: Vec<u64> = d
            .events
            .iter()
            .filter_map(|e| match e {
                Event::Responded { charge: Some(c), .. } => Some(c.credits),
                _ => None,
            })
            .collect();
        assert_eq!(charged, vec![credits], "{pro}");
        for e in &d.events {
            s.apply(e);
        }
    }
    // R11/R28: once charged, explain shows what the pro paid, also after it moved
    // within `far_away_km` of the lead (its price now would be the lead's).
    let moved = Pro {
        id: ProId::new("far"),
        categories: vec![CategoryId::new("painting")],
        zones: vec![ZoneId::new("bo")],
        base: Some(NEAR),
        radius_km: Some(100.0),
        quality: Default::default(),
        refuses: vec![],
        availability: Default::default(),
        autobuy: vec![],
    };
    run(&mut s, T0 + 2, Command::UpsertPro { pro: moved });
    let ex = s.explain(&lead).unwrap();
    let entry = |p: &str| ex.entries.iter().find(|e| e.pro.as_str() == p).expect("explained").price;
    assert_eq!((entry("near"), entry("far")), (None, Some(48)), "what each paid");
    // R1/R11: and so does the offer as the pro sees it, and the answer to its
    // response sent again (it paid 48, not today's 60).
    assert_eq!(view(&s, "far"), 48);
    let respond = Command::Offer { lead: lead.clone(), pro: ProId::new("far"), action: OfferAction::Respond };
    match run(&mut s, T0 + 3, respond) {
        rota::core::Reply::Offer(v) => assert_eq!(v.price, 48, "{v:?}"),
        other => panic!("a response sent again answered {other:?}"),
    }
}

#[test]
fn r11_the_offered_stream_event_carries_each_pros_own_price_and_components() {
    let mut s = located_shard(POLICY);
    let publish = Command::PublishLead { lead: located_lead("a").into() };
    let d = s.decide(T0, &publish, &rota::core::Unlimited).unwrap();
    let mut stream = Vec::new();
    for e in &d.events {
        rota::engine::record::shard_stream_events(&s, e, &mut stream);
        s.apply(e);
    }
    let offered: Vec<(String, u64, u32)> = stream
        .iter()
        .filter_map(|e| match e {
            rota::protocol::StreamEvent::Offered { pro, price, price_components, .. } => Some((
                pro.as_str().to_string(),
                *price,
                price_components.as_ref().map_or(0, |c| c.far_away_discount_permille),
            )),
            _ => None,
        })
        .collect();
    let mut offered = offered;
    offered.sort();
    assert_eq!(
        offered,
        vec![("far".to_string(), 48, 200), ("near".to_string(), 60, 0), ("nobase".to_string(), 60, 0)]
    );
}

#[test]
fn r11_r4_an_auto_buyer_far_away_is_charged_and_checked_at_its_own_price() {
    let policy = POLICY
        .replace("mode = \"shared\"", "mode = \"auto_buy\"")
        .replace("charge_on = \"response\"", "charge_on = \"dispatch\"");
    let mut s = located_shard(&policy);
    for id in ["near", "far"] {
        let mut pro = s.pro(&ProId::new(id)).unwrap().pro.as_ref().clone();
        pro.autobuy = vec![rota::core::AutoBuyConfig {
            name: "weekly".into(),
            zones: vec![ZoneId::new("bo")],
            categories: vec![CategoryId::new("painting")],
            weekly_budget_credits: 50,
            paused_until: None,
            active: true,
            max_price_credits: None,
        }];
        run(&mut s, T0, Command::UpsertPro { pro });
    }
    // Both have 50 credits of budget: enough for the far-away price (48), not for the
    // lead's (60). The far buyer buys at 48; the near one is skipped for its budget.
    let funds = Budgets(50);
    let d = s.decide(T0, &Command::PublishLead { lead: located_lead("a").into() }, &funds).unwrap();
    let bought: Vec<(String, u64)> = d
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Offered { grants, .. } => Some(grants),
            _ => None,
        })
        .flatten()
        .map(|g| (g.pro.as_str().to_string(), g.charge.as_ref().map_or(0, |c| c.credits)))
        .collect();
    for e in &d.events {
        s.apply(e);
    }
    assert_eq!(bought, vec![("far".to_string(), 48)], "{:#?}", s.explain(&LeadId::new("a")));
}

/// Every budget holds `self.0` credits; credits are plenty.
struct Budgets(u64);

impl rota::core::Funds for Budgets {
    fn credits(&self, _: &ProId) -> u64 {
        u64::MAX
    }
    fn budget(&self, _: &ProId, _: &str) -> u64 {
        self.0
    }
}
