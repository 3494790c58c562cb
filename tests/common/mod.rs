//! Shared test helpers: builders for pros and leads, a map-based [`Funds`] that follows
//! the money intents of the events like the ledger would, and a [`Harness`] that drives a
//! shard exactly like the daemon does (decide -> settle money -> apply), checks the
//! invariants after every step and can replay its event log onto a fresh shard.

#![allow(dead_code)] // each test binary uses a different subset

use rota::core::*;
use rota::ids::{CategoryId, ClientId, LeadId, Millis, ProId, ShardKey, TenantId, ZoneId, MINUTE_MS};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Monday 2026-11-23 09:00:00 UTC (10:00 in Rome): the default start of every timeline.
pub const T0: Millis = 1_795_424_400_000;

pub const ZONE: &str = "bologna";
pub const CATEGORY: &str = "painting";

pub fn key() -> ShardKey {
    ShardKey { tenant: TenantId::new("t"), zone: ZoneId::new(ZONE), category: CategoryId::new(CATEGORY) }
}

/// A pro covering the test shard, always available, no distance limit.
pub fn pro(id: &str) -> Pro {
    Pro {
        id: ProId::new(id),
        categories: vec![CategoryId::new(CATEGORY)],
        zones: vec![ZoneId::new(ZONE)],
        base: None,
        radius_km: None,
        quality: Quality::default(),
        refuses: vec![],
        availability: Availability::default(),
        autobuy: vec![],
    }
}

/// An auto-buy config covering the test shard.
pub fn autobuy(name: &str, weekly_budget_credits: u64) -> AutoBuyConfig {
    AutoBuyConfig {
        name: name.into(),
        zones: vec![ZoneId::new(ZONE)],
        categories: vec![CategoryId::new(CATEGORY)],
        weekly_budget_credits,
        max_price_credits: None,
        active: true,
        paused_until: None,
    }
}

/// A lead of the test shard that passes the default quality gate; its client is unique
/// to the lead so duplicate protection never kicks in by accident.
pub fn lead(id: &str, created_at: Millis) -> Lead {
    Lead {
        id: LeadId::new(id),
        category: CategoryId::new(CATEGORY),
        zone: ZoneId::new(ZONE),
        location: None,
        description: "Tinteggiatura di un appartamento di 80 mq, due camere".into(),
        details: Default::default(),
        attributes: vec![],
        client: Client {
            id: ClientId::new(format!("client-{id}")),
            name: "Anna Rossi".into(),
            phone: "+39 333 1234567".into(),
            phone_verified: true,
            contact: ContactPrefs { call: true, whatsapp: false, chat: true },
            address: Some("Via Indipendenza 1, Bologna".into()),
            pro_id: None,
        },
        direct: vec![],
        kind: JobKind::Match,
        created_at,
    }
}

pub fn pid(s: &str) -> ProId {
    ProId::new(s)
}

pub fn lid(s: &str) -> LeadId {
    LeadId::new(s)
}

/// Parses a policy from TOML text, panicking with the error (test set-up only).
pub fn policy(text: &str) -> Arc<Policy> {
    Arc::new(Policy::from_toml(text).unwrap_or_else(|e| panic!("test policy is invalid: {e}\n{text}")))
}

pub fn shared_policy() -> Arc<Policy> {
    policy(
        r#"
        tenant = "t"
        mode = "shared"
        [leads]
        head_start_s = 1800
        max_responders = 5
        lead_ttl_s = 172800
        "#,
    )
}

pub fn matched_policy(fanout: u32) -> Arc<Policy> {
    policy(&format!(
        r#"
        tenant = "t"
        mode = "matched"
        [leads]
        offer_fanout = {fanout}
        response_window_s = 259200
        [money]
        charge_on = "never"
        "#
    ))
}

pub fn autobuy_policy(group_size: u32) -> Arc<Policy> {
    policy(&format!(
        r#"
        tenant = "t"
        mode = "auto_buy"
        [autobuy]
        group_size = {group_size}
        retry_window_s = 86400
        [money]
        charge_on = "dispatch"
        flat_price_credits = 10
        "#
    ))
}

/// Credits and auto-buy budgets kept in maps. [`MapFunds::settle`] carries out the money
/// intents of an event, as the ledger does in the daemon, so later decisions see them.
#[derive(Debug, Clone, Default)]
pub struct MapFunds {
    pub default_credits: u64,
    pub default_budget: u64,
    pub credits: BTreeMap<ProId, u64>,
    pub budgets: BTreeMap<(ProId, String), u64>,
}

impl MapFunds {
    pub fn plenty() -> Self {
        Self { default_credits: 1_000_000, default_budget: 1_000_000, ..Self::default() }
    }

    pub fn set_credits(&mut self, pro: &str, credits: u64) {
        self.credits.insert(pid(pro), credits);
    }

    pub fn set_budget(&mut self, pro: &str, config: &str, credits: u64) {
        self.budgets.insert((pid(pro), config.to_string()), credits);
    }

    fn credits_mut(&mut self, pro: &ProId) -> &mut u64 {
        let d = self.default_credits;
        self.credits.entry(pro.clone()).or_insert(d)
    }

    fn budget_mut(&mut self, pro: &ProId, config: &str) -> &mut u64 {
        let d = self.default_budget;
        self.budgets.entry((pro.clone(), config.to_string())).or_insert(d)
    }

    fn take(&mut self, pro: &ProId, c: &Charge) {
        match &c.mode {
            ChargeMode::Capture | ChargeMode::Hold => {
                let b = self.credits_mut(pro);
                assert!(*b >= c.credits, "the core charged {pro} {} credits with only {b}", c.credits);
                *b -= c.credits;
            }
            ChargeMode::Budget { config } => {
                let b = self.budget_mut(pro, config);
                assert!(*b >= c.credits, "the core spent {} of {pro}/{config} with only {b}", c.credits);
                *b -= c.credits;
            }
        }
    }

    fn give_back(&mut self, pro: &ProId, c: &Charge) {
        match &c.mode {
            ChargeMode::Capture | ChargeMode::Hold => *self.credits_mut(pro) += c.credits,
            ChargeMode::Budget { config } => *self.budget_mut(pro, config) += c.credits,
        }
    }

    /// Carries out the money intents of one event.
    pub fn settle(&mut self, ev: &Event) {
        match ev {
            Event::Offered { grants, .. } => {
                for g in grants {
                    if let Some(c) = &g.charge {
                        self.take(&g.pro, c);
                    }
                }
            }
            Event::Responded { pro, charge: Some(c), .. } => self.take(pro, c),
            Event::Refunded { pro, charge, .. } => self.give_back(pro, charge),
            Event::LeadClosed { releases, .. } => {
                for (pro, c) in releases {
                    self.give_back(pro, c);
                }
            }
            _ => {}
        }
    }
}

impl Funds for MapFunds {
    fn credits(&self, pro: &ProId) -> u64 {
        self.credits.get(pro).copied().unwrap_or(self.default_credits)
    }
    fn budget(&self, pro: &ProId, config: &str) -> u64 {
        self.budgets.get(&(pro.clone(), config.to_string())).copied().unwrap_or(self.default_budget)
    }
}

/// Drives one shard like the daemon: decide, settle the money, apply, check invariants.
pub struct Harness {
    pub shard: Shard,
    pub funds: MapFunds,
    /// Every event applied, in order (the WAL).
    pub log: Vec<Event>,
    pub now: Millis,
}

/// Applies `ev` to `shard`, checking that [`Shard::inactivated_by`] (what the stream
/// tells, R6/R7) names exactly the pros whose open offers the event makes inactive.
pub fn apply_checked(shard: &mut Shard, ev: &Event) {
    let told: std::collections::BTreeSet<ProId> = shard.inactivated_by(ev).into_iter().collect();
    let lead = match ev {
        Event::Responded { lead, .. } | Event::LeadClosed { lead, .. } => Some(lead.clone()),
        _ => None,
    };
    let open_before: Vec<ProId> = lead
        .as_ref()
        .and_then(|l| shard.lead(l))
        .map(|st| st.offers.iter().filter(|o| o.status.is_open()).map(|o| o.pro.clone()).collect())
        .unwrap_or_default();
    shard.apply(ev);
    let became: std::collections::BTreeSet<ProId> = match lead.as_ref().and_then(|l| shard.lead(l)) {
        Some(st) => open_before
            .into_iter()
            .filter(|p| st.offers.iter().any(|o| &o.pro == p && o.status == OfferStatus::Inactive))
            .collect(),
        None => Default::default(),
    };
    assert_eq!(told, became, "offers made inactive by {ev:?}");
}

impl Harness {
    pub fn new(policy: Arc<Policy>) -> Self {
        Self { shard: Shard::new(key(), policy), funds: MapFunds::plenty(), log: Vec::new(), now: T0 }
    }

    /// Decides `cmd` at `now`; on success applies the events. Panics if an invariant
    /// breaks, naming the command.
    pub fn run(&mut self, now: Millis, cmd: &Command) -> Result<Decision, Reject> {
        assert!(now >= self.now, "time goes forward in tests: {now} < {}", self.now);
        self.now = now;
        let before = self.shard.clone();
        let result = self.shard.decide(now, cmd, &self.funds);
        match &result {
            Ok(d) => {
                for ev in &d.events {
                    self.funds.settle(ev);
                    apply_checked(&mut self.shard, ev);
                    self.log.push(ev.clone());
                }
            }
            Err(_) => assert!(self.shard == before, "a rejected command changed the shard: {cmd:?}"),
        }
        if let Err(e) = self.shard.check_invariants() {
            panic!("invariant broken after {cmd:?} at {now}: {e}");
        }
        result
    }

    /// Runs a command that must succeed.
    pub fn ok(&mut self, now: Millis, cmd: Command) -> Decision {
        match self.run(now, &cmd) {
            Ok(d) => d,
            Err(e) => panic!("{cmd:?} was refused: {} ({e})", e.code()),
        }
    }

    /// Runs a command that must be refused; returns the reject code.
    pub fn err(&mut self, now: Millis, cmd: Command) -> Reject {
        match self.run(now, &cmd) {
            Ok(d) => panic!("{cmd:?} should have been refused, got {d:?}"),
            Err(e) => e,
        }
    }

    pub fn add_pro(&mut self, p: Pro) {
        let now = self.now;
        self.ok(now, Command::UpsertPro { pro: p });
    }

    pub fn publish(&mut self, now: Millis, l: Lead) -> Decision {
        self.ok(now, Command::PublishLead { lead: l.into() })
    }

    pub fn act(
        &mut self,
        now: Millis,
        lead: &str,
        pro: &str,
        action: OfferAction,
    ) -> Result<Decision, Reject> {
        self.run(now, &Command::Offer { lead: lid(lead), pro: pid(pro), action })
    }

    /// Ticks at `now` until nothing more is due (one tick only emits what was due before
    /// it; offers made by a release may expire in the same instant).
    pub fn tick(&mut self, now: Millis) -> Vec<Event> {
        let mut all = Vec::new();
        for _ in 0..16 {
            let d = self.ok(now, Command::Tick);
            if d.events.is_empty() {
                break;
            }
            all.extend(d.events);
        }
        all
    }

    pub fn status(&self, lead: &str, pro: &str) -> OfferStatus {
        self.shard.offer_view(&lid(lead), &pid(pro)).expect("the offer exists").status
    }

    /// Replays the log onto a fresh shard and asserts it equals the live one (R1 replay,
    /// determinism of apply).
    pub fn assert_replay_equal(&self) {
        let mut fresh = Shard::new(self.shard.key.clone(), self.shard.policy().clone());
        for ev in &self.log {
            fresh.apply(ev);
        }
        assert!(fresh == self.shard, "replaying {} events gave a different shard", self.log.len());
    }
}

/// Pros (with kinds) offered in a decision, in order.
pub fn offered(d: &Decision) -> Vec<(String, OfferKind)> {
    d.events
        .iter()
        .filter_map(|e| match e {
            Event::Offered { grants, .. } => Some(grants.iter().map(|g| (g.pro.to_string(), g.kind))),
            _ => None,
        })
        .flatten()
        .collect()
}

pub fn offered_ids(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Offered { grants, .. } => Some(grants.iter().map(|g| g.pro.to_string())),
            _ => None,
        })
        .flatten()
        .collect()
}

/// Names of the events that change what a rule says (the `ticked` bookkeeping fact,
/// which only clears handled deadlines, is left out).
pub fn names(events: &[Event]) -> Vec<&'static str> {
    events.iter().filter(|e| !matches!(e, Event::Ticked { .. })).map(Event::name).collect()
}

pub const M: Millis = MINUTE_MS;

/// A shared-mode policy with R11 prices from category statistics: a painting lead costs
/// 60 credits (1200.00 x 25 % / 5 proposals), the cheapest lead 1 credit.
pub const R11_POLICY: &str = r#"
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
