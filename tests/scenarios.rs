//! Data-driven dispatch timelines: every `tests/scenarios/*.toml` file is one scenario.
//!
//! A scenario names the rule(s) it checks (`rule`), a `title`, a policy (a file from
//! `config/tenants/` and/or an inline `[policy]` table merged over it), the pros present
//! at the start, the funds, and a timeline of `[[step]]`s. Each step has a time `at`
//! (`"+30m"`, `"+48h"`, `"+1d2h"`, `"-5m"` relative to `start`, an integer number of ms
//! after `start`, or an absolute RFC 3339 time), a `command` and what to `expect`.
//! The keys are documented on the `Scenario`, `CommandSpec` and `Expect` types below.
//!
//! The runner drives the shard like the daemon: `decide`, settle the money intents on a
//! map-based ledger, `apply` every event, then `check_invariants()` after every step. At
//! the end it replays all events onto a fresh shard and requires an equal shard.

mod common;

use common::{key, MapFunds, CATEGORY, T0, ZONE};
use rota::core::policy::RawPolicy;
use rota::core::shard::{Candidates, ExplainOutcome, Explanation};
use rota::core::*;
use rota::ids::{CategoryId, ClientId, LeadId, Millis, ProId, ZoneId, DAY_MS, HOUR_MS, MINUTE_MS, SECOND_MS};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

// ---------------------------------------------------------------------------------
// File format
// ---------------------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Scenario {
    rule: OneOrMany,
    title: String,
    /// Free text for the reader; the runner ignores it.
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    /// RFC 3339 start of the timeline; default Monday 2026-11-23 09:00 UTC.
    #[serde(default)]
    start: Option<String>,
    /// A file under `config/tenants/`.
    #[serde(default)]
    policy_file: Option<String>,
    /// Policy keys (as in a tenant file), merged over `policy_file`.
    #[serde(default)]
    policy: Option<toml::Table>,
    #[serde(default)]
    funds: FundsSpec,
    /// Pros upserted at `start`, before the first step.
    #[serde(default)]
    pros: Vec<ProSpec>,
    #[serde(rename = "step")]
    steps: Vec<Step>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FundsSpec {
    /// Credits of pros not listed in `credits` (default: plenty).
    #[serde(default)]
    default_credits: Option<u64>,
    /// Budget of auto-buy configs not listed in `budgets` (default: their weekly budget
    /// is not consulted; plenty).
    #[serde(default)]
    default_budget: Option<u64>,
    #[serde(default)]
    credits: BTreeMap<String, u64>,
    /// `"pro/config" = credits`.
    #[serde(default)]
    budgets: BTreeMap<String, u64>,
}

/// A time: `"+30m"` / `"-5m"` / `"+1d2h30m15s"` relative to the start, ms after the
/// start, or an RFC 3339 instant.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum At {
    Ms(i64),
    Text(String),
}

impl At {
    fn resolve(&self, start: Millis) -> Result<Millis, String> {
        match self {
            At::Ms(ms) => Ok(start + ms),
            At::Text(t) => {
                let t = t.trim();
                if let Some(rest) = t.strip_prefix('+') {
                    Ok(start + parse_duration(rest)?)
                } else if let Some(rest) = t.strip_prefix('-') {
                    Ok(start - parse_duration(rest)?)
                } else {
                    chrono::DateTime::parse_from_rfc3339(t)
                        .map(|d| d.timestamp_millis())
                        .map_err(|e| format!("bad time {t:?}: {e} (want +30m, ms or RFC 3339)"))
                }
            }
        }
    }
}

fn parse_duration(s: &str) -> Result<Millis, String> {
    let mut total = 0;
    let mut num = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: i64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
        num.clear();
        total += n * match c {
            'd' => DAY_MS,
            'h' => HOUR_MS,
            'm' => MINUTE_MS,
            's' => SECOND_MS,
            _ => return Err(format!("bad unit {c:?} in duration {s:?} (d, h, m, s)")),
        };
    }
    if !num.is_empty() {
        return Err(format!("duration {s:?} needs a unit (d, h, m, s)"));
    }
    Ok(total)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProSpec {
    id: String,
    #[serde(default)]
    categories: Option<Vec<String>>,
    #[serde(default)]
    zones: Option<Vec<String>>,
    /// `[lat, lon]`.
    #[serde(default)]
    base: Option<[f64; 2]>,
    #[serde(default)]
    radius_km: Option<f64>,
    #[serde(default)]
    quality: Quality,
    #[serde(default)]
    refuses: Vec<String>,
    #[serde(flatten)]
    availability: AvailabilitySpec,
    #[serde(default)]
    autobuy: Vec<AutoBuySpec>,
}

#[derive(Debug, Clone, Deserialize, Default)]
struct AvailabilitySpec {
    #[serde(default)]
    paused_until: Option<At>,
    /// `[from, until]`.
    #[serde(default)]
    vacation: Option<[At; 2]>,
    #[serde(default)]
    schedule: Option<ScheduleSpec>,
}

/// `{ time_zone = "Europe/Rome", intervals = ["mon 22:00-24:00", "tue 00:00-06:00"] }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScheduleSpec {
    time_zone: String,
    intervals: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AutoBuySpec {
    name: String,
    #[serde(default)]
    zones: Option<Vec<String>>,
    #[serde(default)]
    categories: Option<Vec<String>>,
    weekly_budget_credits: u64,
    #[serde(default)]
    max_price_credits: Option<u64>,
    #[serde(default = "yes")]
    active: bool,
    #[serde(default)]
    paused_until: Option<At>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct LeadSpec {
    id: String,
    /// Creation time; default: the step's time.
    #[serde(default)]
    created: Option<At>,
    #[serde(default)]
    category: Option<String>,
    #[serde(default)]
    zone: Option<String>,
    /// `[lat, lon]`.
    #[serde(default)]
    location: Option<[f64; 2]>,
    #[serde(default)]
    description: Option<String>,
    /// Form answers; default `{ rooms = "3" }` (the example tenants require it for painting).
    #[serde(default)]
    details: Option<BTreeMap<String, String>>,
    #[serde(default)]
    attributes: Vec<String>,
    #[serde(default)]
    direct: Vec<String>,
    #[serde(default)]
    kind: JobKind,
    #[serde(default)]
    client: ClientSpec,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct ClientSpec {
    /// Default: `client-<lead id>` (a new client per lead).
    id: Option<String>,
    name: String,
    phone: String,
    phone_verified: bool,
    call: bool,
    whatsapp: bool,
    chat: bool,
    address: Option<String>,
    pro_id: Option<String>,
}

impl Default for ClientSpec {
    fn default() -> Self {
        Self {
            id: None,
            name: "Anna Rossi".into(),
            phone: "+39 333 1234567".into(),
            phone_verified: true,
            call: true,
            whatsapp: false,
            chat: true,
            address: Some("Via Indipendenza 1, Bologna".into()),
            pro_id: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum CommandSpec {
    UpsertPro(ProSpec),
    RemovePro {
        pro: String,
    },
    SetAvailability {
        pro: String,
        #[serde(flatten)]
        availability: AvailabilitySpec,
    },
    Publish(LeadSpec),
    Offer {
        lead: String,
        pro: String,
        /// `open`, `respond`, `decline`, `client_replied`, `pro_replied`,
        /// `client_viewed`, `complete`, `add_note`, `confirm_invalid_contact`.
        action: String,
        /// For `decline`: `pro` (default) or `client`.
        #[serde(default)]
        by: Option<Party>,
        /// For `add_note`.
        #[serde(default)]
        text: Option<String>,
    },
    Tick,
    /// `pro = "p1"` for one pro, or `pros = ["p1", "p2"]` for every pro of one recharge.
    BudgetAvailable {
        #[serde(default)]
        pro: Option<String>,
        #[serde(default)]
        pros: Vec<String>,
    },
    /// Not a core command: sets a pro's credits in the test ledger.
    SetCredits {
        pro: String,
        credits: u64,
    },
    /// Not a core command: sets an auto-buy config's budget in the test ledger.
    SetBudget {
        pro: String,
        config: String,
        credits: u64,
    },
    /// Queries (no events): `explain`, the offer `view` a pro sees, `search`,
    /// `candidates` (R3).
    Explain {
        lead: String,
    },
    View {
        lead: String,
        pro: String,
    },
    Search {
        pro: String,
        query: String,
    },
    Candidates {
        #[serde(default)]
        location: Option<[f64; 2]>,
        #[serde(default)]
        attributes: Vec<String>,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    at: At,
    command: CommandSpec,
    #[serde(default)]
    expect: Expect,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Expect {
    /// `Reject::code()` of a refused command.
    reject: Option<String>,
    /// The field named by an `invalid_field` rejection.
    field: Option<String>,
    /// Event names, exactly and in order.
    events: Option<Vec<String>>,
    /// `"pro:kind"` of every offer made by the step, exactly and in order.
    offered: Option<Vec<String>>,
    /// `"pro:reason"` skips recorded by the step's offers (each must be present).
    skipped: Option<Vec<String>>,
    /// Publish reply: `accepted` or the reject reason (`phone_unverified`, ...).
    lead_status: Option<String>,
    /// Publish reply: `"pro:kind"` offers, exactly.
    reply_offers: Option<Vec<String>>,
    /// Publish reply: the generic release time (`"none"` or a time).
    release_at: Option<At>,
    /// Publish reply is exactly the same as the one of an earlier step (its index, from 1).
    same_reply_as_step: Option<usize>,
    /// Offer reply/view: the offer status.
    status: Option<String>,
    /// Offer reply/view: whether contact details are shown at all.
    contact: Option<bool>,
    /// Offer reply/view: the phone shown (`"none"` = hidden).
    phone: Option<String>,
    /// Offer reply/view: whether the client's name is shown.
    name_shown: Option<bool>,
    /// Responded charge: `capture`, `hold`, `budget` or `none`.
    charge: Option<String>,
    /// `lead -> pro -> status` after the step.
    statuses: Option<BTreeMap<String, BTreeMap<String, String>>>,
    /// Explain: `pro -> outcome`, where outcome is `offered:<kind>:<status>`,
    /// `skipped:<reason>`, `awaiting_release` or `not_released`; a prefix up to a `:`
    /// matches.
    explain: Option<BTreeMap<String, String>>,
    /// Explain of a lead the quality gate refused: its reason (R2).
    explain_rejected: Option<String>,
    /// Search hits (lead ids), in order.
    search: Option<Vec<String>>,
    /// Candidates (pro ids), in order, and the reason of an empty list.
    candidates: Option<Vec<String>>,
    candidates_reason: Option<String>,
    /// `[[a, b], ...]`: pro `a`'s rotation weight is below `b`'s after the step.
    weight_below: Option<Vec<[String; 2]>>,
    /// `pro -> credits` in the test ledger after the step.
    credits: Option<BTreeMap<String, u64>>,
    /// `"pro/config" -> credits` after the step.
    budgets: Option<BTreeMap<String, u64>>,
    /// `lead -> responders` after the step.
    responders: Option<BTreeMap<String, u32>>,
    /// The shard's next deadline after the step (`"none"` or a time).
    next_deadline: Option<At>,
}

// ---------------------------------------------------------------------------------
// Building core values from the file
// ---------------------------------------------------------------------------------

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (k, v) in over {
        match (base.get_mut(k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(k.clone(), v.clone());
            }
        }
    }
}

fn load_policy(sc: &Scenario) -> Result<Arc<Policy>, String> {
    let mut table = match &sc.policy_file {
        Some(f) => {
            let path = repo().join("config/tenants").join(f);
            let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            text.parse::<toml::Table>().map_err(|e| format!("{f}: {e}"))?
        }
        None => toml::Table::new(),
    };
    if let Some(over) = &sc.policy {
        merge(&mut table, over);
    }
    if table.is_empty() {
        return Err("a scenario needs policy_file or [policy]".into());
    }
    let raw: RawPolicy = table.try_into().map_err(|e| format!("policy: {e}"))?;
    raw.validate().map(Arc::new).map_err(|e| format!("policy: {e}"))
}

fn ids<T>(list: &Option<Vec<String>>, default: &str, f: impl Fn(&str) -> T) -> Vec<T> {
    match list {
        Some(l) => l.iter().map(|s| f(s)).collect(),
        None => vec![f(default)],
    }
}

fn schedule(s: &ScheduleSpec) -> Result<WeeklyWindows, String> {
    let mut intervals = Vec::new();
    for iv in &s.intervals {
        let bad = || format!("bad interval {iv:?}: want \"mon 22:00-24:00\"");
        let (day, range) = iv.split_once(' ').ok_or_else(bad)?;
        let day: Weekday =
            toml::Value::String(day.to_lowercase()).try_into().map_err(|_| format!("bad day in {iv:?}"))?;
        let (a, b) = range.split_once('-').ok_or_else(bad)?;
        let minute = |t: &str| -> Result<u16, String> {
            let (h, m) = t.trim().split_once(':').ok_or_else(bad)?;
            Ok(h.parse::<u16>().map_err(|_| bad())? * 60 + m.parse::<u16>().map_err(|_| bad())?)
        };
        intervals.push(WeeklyInterval { day, start_min: minute(a)?, end_min: minute(b)? });
    }
    Ok(WeeklyWindows { time_zone: s.time_zone.clone(), intervals })
}

fn availability(a: &AvailabilitySpec, start: Millis) -> Result<Availability, String> {
    Ok(Availability {
        paused_until: a.paused_until.as_ref().map(|t| t.resolve(start)).transpose()?,
        vacation: match &a.vacation {
            Some([f, u]) => Some((f.resolve(start)?, u.resolve(start)?)),
            None => None,
        },
        schedule: a.schedule.as_ref().map(schedule).transpose()?,
    })
}

fn build_pro(p: &ProSpec, start: Millis) -> Result<Pro, String> {
    let mut autobuy = Vec::new();
    for c in &p.autobuy {
        autobuy.push(AutoBuyConfig {
            name: c.name.clone(),
            zones: ids(&c.zones, ZONE, |s| ZoneId::new(s)),
            categories: ids(&c.categories, CATEGORY, |s| CategoryId::new(s)),
            weekly_budget_credits: c.weekly_budget_credits,
            max_price_credits: c.max_price_credits,
            active: c.active,
            paused_until: c.paused_until.as_ref().map(|t| t.resolve(start)).transpose()?,
        });
    }
    Ok(Pro {
        id: ProId::new(&p.id),
        categories: ids(&p.categories, CATEGORY, |s| CategoryId::new(s)),
        zones: ids(&p.zones, ZONE, |s| ZoneId::new(s)),
        base: p.base.map(|[lat, lon]| GeoPoint { lat, lon }),
        radius_km: p.radius_km,
        quality: p.quality.clone(),
        refuses: p.refuses.clone(),
        availability: availability(&p.availability, start)?,
        autobuy,
    })
}

fn build_lead(l: &LeadSpec, start: Millis, now: Millis) -> Result<Lead, String> {
    let c = &l.client;
    Ok(Lead {
        id: LeadId::new(&l.id),
        category: CategoryId::new(l.category.as_deref().unwrap_or(CATEGORY)),
        zone: ZoneId::new(l.zone.as_deref().unwrap_or(ZONE)),
        location: l.location.map(|[lat, lon]| GeoPoint { lat, lon }),
        description: l
            .description
            .clone()
            .unwrap_or_else(|| "Tinteggiatura di un appartamento di 80 mq, due camere".into()),
        details: l.details.clone().unwrap_or_else(|| BTreeMap::from([("rooms".into(), "3".into())])).into(),
        attributes: l.attributes.clone(),
        client: Client {
            id: ClientId::new(c.id.clone().unwrap_or_else(|| format!("client-{}", l.id))),
            name: c.name.clone(),
            phone: c.phone.clone(),
            phone_verified: c.phone_verified,
            contact: ContactPrefs { call: c.call, whatsapp: c.whatsapp, chat: c.chat },
            address: c.address.clone(),
            pro_id: c.pro_id.as_deref().map(ProId::new),
        },
        direct: l.direct.iter().map(ProId::new).collect(),
        kind: l.kind,
        created_at: match &l.created {
            Some(t) => t.resolve(start)?,
            None => now,
        },
    })
}

fn action(a: &str, by: Option<Party>, text: &Option<String>) -> Result<OfferAction, String> {
    Ok(match a {
        "open" => OfferAction::Open,
        "respond" => OfferAction::Respond,
        "decline" => OfferAction::Decline { by: by.unwrap_or(Party::Pro) },
        "client_replied" => OfferAction::ClientReplied,
        "pro_replied" => OfferAction::ProReplied,
        "client_viewed" => OfferAction::ClientViewed,
        "complete" => OfferAction::Complete,
        "add_note" => OfferAction::AddNote { text: text.clone().unwrap_or_default() },
        "confirm_invalid_contact" => OfferAction::ConfirmInvalidContact,
        other => return Err(format!("unknown offer action {other:?}")),
    })
}

// ---------------------------------------------------------------------------------
// Names as the files spell them
// ---------------------------------------------------------------------------------

fn snake<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v).expect("plain enums serialise") {
        serde_json::Value::String(s) => s,
        serde_json::Value::Object(m) => m.get("reason").and_then(|r| r.as_str()).unwrap_or("?").to_string(),
        other => other.to_string(),
    }
}

fn explain_outcome(o: &ExplainOutcome) -> String {
    match o {
        ExplainOutcome::Offered { kind, status } => format!("offered:{}:{}", snake(kind), status.as_str()),
        ExplainOutcome::Skipped(s) => format!("skipped:{}", snake(s)),
        ExplainOutcome::AwaitingRelease => "awaiting_release".into(),
        ExplainOutcome::NotReleased => "not_released".into(),
    }
}

fn prefix_match(actual: &str, expected: &str) -> bool {
    actual == expected || actual.starts_with(&format!("{expected}:"))
}

fn grants(events: &[Event]) -> Vec<String> {
    let mut out = Vec::new();
    for e in events {
        if let Event::Offered { grants, .. } = e {
            out.extend(grants.iter().map(|g| format!("{}:{}", g.pro, snake(&g.kind))));
        }
    }
    out
}

fn skips(events: &[Event]) -> Vec<String> {
    let mut out = Vec::new();
    for e in events {
        if let Event::Offered { skipped, .. } = e {
            out.extend(skipped.iter().map(|(p, s)| format!("{p}:{}", snake(s))));
        }
    }
    out
}

// ---------------------------------------------------------------------------------
// Running
// ---------------------------------------------------------------------------------

macro_rules! check {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(format!($($fmt)*));
        }
    };
}

fn check_eq<T: PartialEq + std::fmt::Debug>(what: &str, actual: T, expected: T) -> Result<(), String> {
    check!(actual == expected, "{what}: expected {expected:?}, got {actual:?}");
    Ok(())
}

struct Run {
    shard: Shard,
    funds: MapFunds,
    log: Vec<Event>,
    start: Millis,
    now: Millis,
    replies: Vec<Option<Reply>>,
}

/// What one step produced, for the expectations.
enum Outcome {
    Decided(Result<Decision, Reject>),
    Explained(Result<Explanation, Reject>),
    Viewed(Result<OfferView, Reject>),
    Searched(Vec<OfferView>),
    Candidates(Candidates),
    Ledger,
}

impl Run {
    fn decide(&mut self, cmd: &Command) -> Result<Decision, Reject> {
        let before = self.shard.clone();
        let result = self.shard.decide(self.now, cmd, &self.funds);
        if let Ok(d) = &result {
            for ev in &d.events {
                self.funds.settle(ev);
                common::apply_checked(&mut self.shard, ev);
                self.log.push(ev.clone());
            }
        } else {
            // decide takes &self, but make the guarantee explicit: a refusal changes nothing.
            assert!(self.shard == before);
        }
        result
    }

    fn step(&mut self, step: &Step) -> Result<Outcome, String> {
        let start = self.start;
        let now = self.now;
        let cmd = match &step.command {
            CommandSpec::UpsertPro(p) => Command::UpsertPro { pro: build_pro(p, start)? },
            CommandSpec::RemovePro { pro } => Command::RemovePro { pro: ProId::new(pro) },
            CommandSpec::SetAvailability { pro, availability: a } => {
                Command::SetAvailability { pro: ProId::new(pro), availability: availability(a, start)? }
            }
            CommandSpec::Publish(l) => Command::PublishLead { lead: build_lead(l, start, now)?.into() },
            CommandSpec::Offer { lead, pro, action: a, by, text } => Command::Offer {
                lead: LeadId::new(lead),
                pro: ProId::new(pro),
                action: action(a, *by, text)?,
            },
            CommandSpec::Tick => Command::Tick,
            CommandSpec::BudgetAvailable { pro, pros } => {
                if pro.is_none() && pros.is_empty() {
                    return Err("budget_available needs `pro` or `pros`".into());
                }
                Command::BudgetAvailable { pros: pro.iter().chain(pros).map(ProId::new).collect() }
            }
            CommandSpec::SetCredits { pro, credits } => {
                self.funds.set_credits(pro, *credits);
                return Ok(Outcome::Ledger);
            }
            CommandSpec::SetBudget { pro, config, credits } => {
                self.funds.set_budget(pro, config, *credits);
                return Ok(Outcome::Ledger);
            }
            CommandSpec::Explain { lead } => {
                return Ok(Outcome::Explained(self.shard.explain(&LeadId::new(lead))))
            }
            CommandSpec::View { lead, pro } => {
                return Ok(Outcome::Viewed(self.shard.offer_view(&LeadId::new(lead), &ProId::new(pro))))
            }
            CommandSpec::Search { pro, query } => {
                return Ok(Outcome::Searched(self.shard.search(&ProId::new(pro), query)))
            }
            CommandSpec::Candidates { location, attributes } => {
                let loc = location.map(|[lat, lon]| GeoPoint { lat, lon });
                return Ok(Outcome::Candidates(self.shard.candidates(now, loc, attributes, &self.funds)));
            }
        };
        Ok(Outcome::Decided(self.decide(&cmd)))
    }

    fn expect(&self, out: &Outcome, ex: &Expect) -> Result<(), String> {
        let start = self.start;
        // Refusals first: a refused step has nothing else to check except state.
        let mut events: &[Event] = &[];
        let mut reply = None;
        let mut offer_view = None;
        match out {
            Outcome::Decided(Err(e)) => {
                let Some(code) = &ex.reject else {
                    return Err(format!("refused with {} ({e}), expected success", e.code()));
                };
                check_eq("reject code", e.code(), code.as_str())?;
                if let Some(field) = &ex.field {
                    match e {
                        Reject::InvalidField(f) => check_eq("invalid field", f.field.as_str(), field)?,
                        other => return Err(format!("expected invalid field {field}, got {other:?}")),
                    }
                }
            }
            Outcome::Decided(Ok(d)) => {
                if let Some(code) = &ex.reject {
                    return Err(format!(
                        "expected refusal {code}, got events {:?}",
                        common::names(&d.events)
                    ));
                }
                events = &d.events;
                reply = Some(&d.reply);
                if let Reply::Offer(v) = &d.reply {
                    offer_view = Some(v);
                }
            }
            Outcome::Viewed(Err(e)) => {
                let Some(code) = &ex.reject else { return Err(format!("view refused: {e}")) };
                check_eq("reject code", e.code(), code.as_str())?;
            }
            Outcome::Viewed(Ok(v)) => offer_view = Some(v),
            Outcome::Explained(Err(e)) => {
                let Some(code) = &ex.reject else { return Err(format!("explain refused: {e}")) };
                check_eq("reject code", e.code(), code.as_str())?;
            }
            Outcome::Explained(Ok(x)) => {
                let rejected = x.rejected.map(|r| format!("{r:?}"));
                if let Some(want) = &ex.explain_rejected {
                    let got = serde_json::to_value(x.rejected).unwrap();
                    check!(
                        got == serde_json::json!(want),
                        "explain rejected: expected {want}, got {rejected:?}"
                    );
                    check!(
                        x.entries.is_empty() && x.price == 0,
                        "a refused lead has no entries and no price"
                    );
                } else {
                    check!(rejected.is_none(), "explain: unexpected rejection {rejected:?}");
                }
                if let Some(want) = &ex.explain {
                    for (pro, outcome) in want {
                        let entry = x.entries.iter().find(|e| e.pro.as_str() == pro);
                        let Some(entry) = entry else {
                            return Err(format!("explain has no entry for {pro}"));
                        };
                        let got = explain_outcome(&entry.outcome);
                        check!(prefix_match(&got, outcome), "explain {pro}: expected {outcome}, got {got}");
                    }
                }
            }
            Outcome::Searched(hits) => {
                if let Some(want) = &ex.search {
                    let got: Vec<String> = hits.iter().map(|v| v.lead.to_string()).collect();
                    check_eq("search hits", &got, want)?;
                }
            }
            Outcome::Candidates(c) => {
                if let Some(want) = &ex.candidates {
                    let got: Vec<String> = c.pros.iter().map(|(p, _)| p.to_string()).collect();
                    check_eq("candidates", &got, want)?;
                }
                if let Some(r) = &ex.candidates_reason {
                    check_eq("candidates reason", c.reason.as_deref(), Some(r.as_str()))?;
                }
            }
            Outcome::Ledger => {}
        }
        if let Some(want) = &ex.events {
            check_eq("events", &common::names(events), &want.iter().map(String::as_str).collect::<Vec<_>>())?;
        }
        if let Some(want) = &ex.offered {
            check_eq("offered", &grants(events), want)?;
        }
        if let Some(want) = &ex.skipped {
            let got = skips(events);
            for s in want {
                check!(got.contains(s), "skipped: expected {s} among {got:?}");
            }
        }
        if let Some(Reply::Lead(o)) = reply {
            if let Some(want) = &ex.lead_status {
                let got = match o.status {
                    LeadStatus::Accepted => "accepted".to_string(),
                    LeadStatus::Rejected(r) => r.as_str().to_string(),
                };
                check_eq("lead status", got.as_str(), want)?;
            }
            if let Some(want) = &ex.reply_offers {
                let got: Vec<String> = o.offers.iter().map(|(p, k)| format!("{p}:{}", snake(k))).collect();
                check_eq("reply offers", &got, want)?;
            }
            if let Some(want) = &ex.release_at {
                let want = match want {
                    At::Text(t) if t == "none" => None,
                    t => Some(t.resolve(start)?),
                };
                check_eq("release_at", o.release_at, want)?;
            }
        } else if ex.lead_status.is_some() || ex.reply_offers.is_some() || ex.release_at.is_some() {
            return Err(format!("expected a publish reply, got {reply:?}"));
        }
        if let Some(i) = ex.same_reply_as_step {
            let earlier = self.replies.get(i - 1).cloned().flatten();
            check!(earlier.as_ref() == reply, "reply differs from step {i}: {earlier:?} vs {reply:?}");
        }
        if ex.status.is_some() || ex.contact.is_some() || ex.phone.is_some() || ex.name_shown.is_some() {
            let Some(v) = offer_view else { return Err(format!("expected an offer view, got {reply:?}")) };
            if let Some(s) = &ex.status {
                check_eq("offer status", v.status.as_str(), s)?;
            }
            if let Some(c) = ex.contact {
                check_eq("contact shown", v.contact.is_some(), c)?;
            }
            if let Some(p) = &ex.phone {
                let got = v.contact.as_ref().and_then(|c| c.phone.clone()).unwrap_or_else(|| "none".into());
                check_eq("phone", got.as_str(), p)?;
            }
            if let Some(n) = ex.name_shown {
                check_eq("name shown", v.contact.as_ref().is_some_and(|c| !c.name.is_empty()), n)?;
            }
        }
        if let Some(want) = &ex.charge {
            let got: Vec<String> = events
                .iter()
                .filter_map(|e| match e {
                    Event::Responded { charge, .. } => Some(match charge {
                        None => "none".to_string(),
                        Some(c) => match c.mode {
                            ChargeMode::Capture => "capture".into(),
                            ChargeMode::Hold => "hold".into(),
                            ChargeMode::Budget { .. } => "budget".into(),
                        },
                    }),
                    _ => None,
                })
                .collect();
            check_eq("charge", &got, &vec![want.clone()])?;
        }
        self.expect_state(ex)
    }

    fn expect_state(&self, ex: &Expect) -> Result<(), String> {
        if let Some(want) = &ex.statuses {
            for (lead, pros) in want {
                for (pro, status) in pros {
                    let v = self
                        .shard
                        .offer_view(&LeadId::new(lead), &ProId::new(pro))
                        .map_err(|e| format!("status of {lead}/{pro}: {e}"))?;
                    check_eq(&format!("status of {lead}/{pro}"), v.status.as_str(), status)?;
                }
            }
        }
        if let Some(pairs) = &ex.weight_below {
            for [a, b] in pairs {
                let w = |p: &str| {
                    self.shard.pro(&ProId::new(p)).map(|s| s.weight.weight).ok_or(format!("no pro {p}"))
                };
                let (wa, wb) = (w(a)?, w(b)?);
                check!(wa < wb, "weight of {a} ({wa}) should be below {b} ({wb})");
            }
        }
        if let Some(want) = &ex.credits {
            for (p, c) in want {
                check_eq(&format!("credits of {p}"), self.funds.credits(&ProId::new(p)), *c)?;
            }
        }
        if let Some(want) = &ex.budgets {
            for (k, c) in want {
                let (p, cfg) = k.split_once('/').ok_or(format!("budget key {k:?} is not pro/config"))?;
                check_eq(&format!("budget of {k}"), self.funds.budget(&ProId::new(p), cfg), *c)?;
            }
        }
        if let Some(want) = &ex.responders {
            for (l, n) in want {
                let st = self.shard.lead(&LeadId::new(l)).ok_or(format!("no lead {l}"))?;
                check_eq(&format!("responders of {l}"), st.responders, *n)?;
            }
        }
        if let Some(want) = &ex.next_deadline {
            let want = match want {
                At::Text(t) if t == "none" => None,
                t => Some(t.resolve(self.start)?),
            };
            check_eq("next deadline", self.shard.next_deadline(), want)?;
        }
        Ok(())
    }
}

fn describe(cmd: &CommandSpec) -> String {
    let s = format!("{cmd:?}");
    s.chars().take(160).collect()
}

/// Runs one scenario file; `Err` names the step that failed.
fn run_file(path: &Path) -> Result<(), String> {
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{name}: {e}"))?;
    let sc: Scenario = toml::from_str(&text).map_err(|e| format!("{name}: not a valid scenario: {e}"))?;
    let rules = match &sc.rule {
        OneOrMany::One(r) => vec![r.clone()],
        OneOrMany::Many(r) => r.clone(),
    };
    if rules.is_empty() || rules.iter().any(|r| !r.starts_with('R')) {
        return Err(format!("{name}: `rule` must name rules like \"R6\""));
    }
    let header = format!("{name} [{}] {}", rules.join(", "), sc.title);
    let start = match &sc.start {
        Some(s) => At::Text(s.clone()).resolve(0).map_err(|e| format!("{header}: start: {e}"))?,
        None => T0,
    };
    let policy = load_policy(&sc).map_err(|e| format!("{header}: {e}"))?;
    let mut funds = MapFunds::plenty();
    if let Some(c) = sc.funds.default_credits {
        funds.default_credits = c;
    }
    if let Some(b) = sc.funds.default_budget {
        funds.default_budget = b;
    }
    for (p, c) in &sc.funds.credits {
        funds.set_credits(p, *c);
    }
    for (k, c) in &sc.funds.budgets {
        let (p, cfg) =
            k.split_once('/').ok_or_else(|| format!("{header}: budget key {k:?}: want pro/config"))?;
        funds.set_budget(p, cfg, *c);
    }
    let mut run = Run {
        shard: Shard::new(key(), policy.clone()),
        funds,
        log: Vec::new(),
        start,
        now: start,
        replies: Vec::new(),
    };
    for p in &sc.pros {
        let pro = build_pro(p, start).map_err(|e| format!("{header}: pro {}: {e}", p.id))?;
        run.decide(&Command::UpsertPro { pro })
            .map_err(|e| format!("{header}: set-up pro {} refused: {} ({e})", p.id, e.code()))?;
        run.shard.check_invariants().map_err(|e| format!("{header}: invariant after set-up: {e}"))?;
    }
    for (i, step) in sc.steps.iter().enumerate() {
        let n = i + 1;
        let at = step.at.resolve(start).map_err(|e| format!("{header}: step {n}: {e}"))?;
        let ctx = || format!("{header}\n  step {n} (at {:?}): {}", step.at, describe(&step.command));
        if at < run.now {
            return Err(format!("{}\n  time goes backwards", ctx()));
        }
        run.now = at;
        let out = run.step(step).map_err(|e| format!("{}\n  {e}", ctx()))?;
        run.expect(&out, &step.expect).map_err(|e| format!("{}\n  {e}", ctx()))?;
        run.replies.push(match out {
            Outcome::Decided(Ok(d)) => Some(d.reply),
            _ => None,
        });
        run.shard.check_invariants().map_err(|e| format!("{}\n  invariant broken: {e}", ctx()))?;
    }
    // Replay: the log alone rebuilds the same shard (WAL recovery, determinism).
    let mut fresh = Shard::new(key(), policy);
    for ev in &run.log {
        fresh.apply(ev);
    }
    if fresh != run.shard {
        return Err(format!("{header}: replaying {} events gave a different shard", run.log.len()));
    }
    Ok(())
}

fn scenario_dir() -> PathBuf {
    repo().join("tests/scenarios")
}

fn scenario(file: &str) {
    if let Err(e) = run_file(&scenario_dir().join(file)) {
        panic!("scenario failed: {e}");
    }
}

macro_rules! scenarios {
    ($($test:ident => $file:literal,)*) => {
        $(
            #[test]
            fn $test() {
                scenario($file);
            }
        )*

        /// Every file in `tests/scenarios/` has a named test above (none is forgotten).
        #[test]
        fn every_scenario_file_has_a_test() {
            let listed = [$($file),*];
            let mut missing = String::new();
            for entry in std::fs::read_dir(scenario_dir()).expect("tests/scenarios exists") {
                let name = entry.expect("readable dir").file_name().to_string_lossy().to_string();
                if name.ends_with(".toml") && !listed.contains(&name.as_str()) {
                    let _ = writeln!(missing, "  {name}");
                }
            }
            assert!(missing.is_empty(), "scenario files without a test in tests/scenarios.rs:\n{missing}");
        }
    };
}

scenarios! {
    r1_idempotent_republish_and_conflict => "r1_idempotency.toml",
    r2_quality_gate_rejects_each_reason => "r2_quality_gate.toml",
    r3_candidate_list_needs_min_list_size => "r3_candidates.toml",
    r4_eligibility_distance_pause_vacation_schedule_attributes => "r4_eligibility.toml",
    r4_r25_night_window_is_two_intervals_in_the_pros_zone => "r4_night_schedule.toml",
    r4_a_direct_target_keeps_its_refused_attributes_not_its_radius => "r4_direct_targets_keep_their_preferences.toml",
    r5_direct_first_then_generic_after_head_start => "r5_head_start.toml",
    r5_late_publish_offers_direct_targets_once => "r5_late_publish.toml",
    r5_r15_a_late_release_gives_each_pro_its_whole_response_window => "r5_r15_late_release.toml",
    r5_r7_no_release_of_a_lead_whose_lifetime_ended => "r5_r7_no_release_after_lifetime.toml",
    r5_r6_a_direct_target_that_did_not_receive_the_lead_holds_no_seat => "r5_r6_unreachable_direct_targets.toml",
    r28_explain_says_why_as_of_the_release_also_once_the_pro_is_back => "r28_explain_as_of_the_release.toml",
    r6_r13_r22_a_retry_keeps_the_seats_and_never_buys_a_direct_job => "r6_r13_r22_retry_keeps_the_seats.toml",
    r21_r28_releases_in_one_tick_take_turns_as_separate_ticks_would => "r21_r28_releases_in_one_tick_take_turns.toml",
    r6_two_direct_three_generic_one_direct_four_then_lead_full => "r6_responder_cap.toml",
    r6_matched_partners_keep_the_seats_of_the_direct_targets => "r6_matched_and_autobuy_seats.toml",
    r6_r21_autobuy_buys_only_the_seats_the_direct_targets_left => "r6_r21_autobuy_seats.toml",
    r7_lead_closes_after_48h_then_lead_expired => "r7_lifetime.toml",
    r8_no_pii_before_responding_phone_only_for_call_or_whatsapp => "r8_privacy.toml",
    r13_direct_and_contact_jobs_reach_only_their_targets => "r13_job_kinds.toml",
    r13_answering_a_contact_job_is_never_charged => "r13_contact_jobs_are_not_charged.toml",
    r14_declines_are_final_and_lower_ranking => "r14_declines.toml",
    r15_offers_expire_after_the_response_window => "r15_response_window.toml",
    r16_vacation_blocks_offers_without_catch_up_burst => "r16_vacation.toml",
    r17_illegal_transitions_are_refused => "r17_transitions.toml",
    r18_notes_and_search => "r18_notes_search.toml",
    r21_autobuy_groups_of_four_cycle_through_eight_pros => "r21_autobuy_groups.toml",
    r22_autobuy_retry_within_window_when_budget_returns => "r22_autobuy_retry.toml",
}
