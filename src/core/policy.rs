//! Tenant policy: every number a rule uses, loaded from one TOML file per tenant.
//!
//! The raw file is parsed into [`RawPolicy`] (serde, unknown keys rejected with the key
//! named), then [`RawPolicy::validate`] turns it into the typed [`Policy`] the core uses.
//! No rule's number is a constant in code: the defaults below only fill keys a file
//! leaves out, and the example policies under `config/tenants/` spell every key out.
//!
//! Units are the last word of a key (`lead_ttl_s`, `preferred_radius_km`,
//! `decline_penalty_permille`).

use crate::ids::{CategoryId, Millis, SECOND_MS};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// How a lead's generic release uses the rotation (R6a).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DispatchMode {
    /// Shared leads (ProntoPro): offered to eligible pros; the first `max_responders`
    /// who respond pay and get the contact.
    Shared,
    /// Matched jobs (Shopify Experts): the rotation picks `offer_fanout` pros; each has a
    /// response window to reply or decline.
    Matched,
    /// Auto-buy (Habitissimo): the rotation picks `group_size` buyers among pros with an
    /// active auto-buy config and enough weekly budget; they are charged at dispatch.
    AutoBuy,
}

/// How many pros one generic release offers the lead to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Fanout {
    /// `offer_fanout = "all"`: every eligible pro, in rotation order, up to
    /// [`crate::core::shard::MAX_OFFERS_PER_RELEASE`] (beyond, the turns move as for a
    /// number).
    All(AllMarker),
    /// `offer_fanout = N`: the next N eligible pros in rotation (N at most
    /// [`crate::core::shard::MAX_OFFERS_PER_RELEASE`]).
    Next(u32),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AllMarker {
    All,
}

/// What responding to (or receiving) a lead costs (R9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChargeOn {
    /// Leads are free (matched jobs: the marketplace earns on the job itself).
    Never,
    /// The responding pro pays the lead's price when responding (chat-only: held).
    Response,
    /// The buyer pays at dispatch from its auto-buy budget (auto-buy mode).
    Dispatch,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawPolicy {
    /// Tenant id this policy belongs to.
    pub tenant: String,
    /// IANA time zone of the tenant (weekly recharge on Monday 00:00 there, R20).
    #[serde(default = "default_tz")]
    pub time_zone: String,
    pub mode: DispatchMode,
    #[serde(default)]
    pub leads: RawLeads,
    #[serde(default)]
    pub gate: RawGate,
    #[serde(default)]
    pub ranking: RawRanking,
    #[serde(default)]
    pub autobuy: RawAutoBuy,
    #[serde(default)]
    pub money: RawMoney,
    /// R11 lead pricing from category statistics; absent = `money.flat_price_credits`.
    #[serde(default)]
    pub pricing: Option<crate::pricing::PricingPolicy>,
    #[serde(default)]
    pub orders: RawOrders,
}

fn default_tz() -> String {
    "UTC".into()
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RawLeads {
    /// Lifetime of a lead from its creation (R7).
    pub lead_ttl_s: i64,
    /// Head start of direct targets before the generic release (R5).
    pub head_start_s: i64,
    /// Most pros that may respond to one lead (R6).
    pub max_responders: u32,
    /// Pros per generic release: `"all"` or a number (R6a).
    pub offer_fanout: Fanout,
    /// Time a pro has to reply or decline an offer; 0 = no window (R15).
    pub response_window_s: i64,
    /// Fewest matching pros for a candidate list to be shown (R3).
    pub min_list_size: u32,
    /// Same client + category + zone within this window is a duplicate; 0 = off.
    pub duplicate_window_s: i64,
    /// How long a lead id is remembered after the lead closes, for idempotent
    /// republish answers (R1).
    pub idempotency_retention_s: i64,
}

impl Default for RawLeads {
    fn default() -> Self {
        Self {
            lead_ttl_s: 48 * 3600,
            head_start_s: 30 * 60,
            max_responders: 5,
            offer_fanout: Fanout::All(AllMarker::All),
            response_window_s: 0,
            min_list_size: 3,
            duplicate_window_s: 24 * 3600,
            idempotency_retention_s: 7 * 24 * 3600,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RawGate {
    /// Refuse leads whose client phone is not verified (R2 `phone_unverified`).
    pub require_verified_phone: bool,
    /// Shortest description accepted (R2 `insufficient_details`).
    pub min_description_chars: u32,
    /// Refuse leads from clients who are pros offering the same category (R2 `competitor`).
    pub reject_competitors: bool,
    /// Form keys a lead's details must contain, per category.
    pub required_details: BTreeMap<String, Vec<String>>,
}

impl Default for RawGate {
    fn default() -> Self {
        Self {
            require_verified_phone: true,
            min_description_chars: 20,
            reject_competitors: true,
            required_details: BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RawRanking {
    /// Weight of a pro with no quality signal at all. Weights set the share of leads
    /// each pro gets among equally eligible pros (R28).
    pub base_weight: u32,
    /// Best weight any pro can reach; `max_weight / base_weight` bounds how much larger
    /// a better pro's share can be ("never all of it").
    pub max_weight: u32,
    /// Smallest weight after penalties; > 0 so every pro keeps a share.
    pub min_weight: u32,
    /// Per-mille of the weight lost per remembered decline of this job type (R14).
    pub decline_penalty_permille: u32,
    /// Per-mille of the weight lost per expired offer (R15).
    pub expiry_penalty_permille: u32,
    /// How many turns a skipped pro may keep credit for (R28 "no catch-up burst").
    pub max_catch_up_turns: u32,
    /// R29: per-mille of the weight that follows the pro's response rate (offers
    /// answered by responding, over the offers that count, R27): a pro that answers
    /// every offer keeps its weight, one that answers none keeps `1000 - this`. 0 = the
    /// rate is not used.
    pub response_rate_share_permille: u32,
    /// Offers that count before the response rate is used: a new pro is not judged on
    /// its first few.
    pub response_rate_min_offers: u32,
    /// R29: a pro whose mean time from offer to first response is above this many
    /// seconds loses `slow_response_penalty_permille` of its weight. 0 = the time is
    /// not used.
    pub response_time_target_s: i64,
    /// Per-mille of the weight a slow responder loses (R29).
    pub slow_response_penalty_permille: u32,
}

impl Default for RawRanking {
    fn default() -> Self {
        Self {
            base_weight: 100,
            max_weight: 300,
            min_weight: 25,
            decline_penalty_permille: 50,
            expiry_penalty_permille: 100,
            max_catch_up_turns: 1,
            response_rate_share_permille: 200,
            response_rate_min_offers: 10,
            response_time_target_s: 24 * 3600,
            slow_response_penalty_permille: 100,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RawAutoBuy {
    /// Buyers per lead (R21).
    pub group_size: u32,
    /// A buyer that missed a lead for lack of budget gets it if budget returns within
    /// this window and the group is not full (R22). When several buyers' budgets come
    /// back at once (the weekly recharge), the missed leads go round among them in
    /// rotation order, and each retried lead counts as the buyer's turn (R21, R28).
    pub retry_window_s: i64,
}

impl Default for RawAutoBuy {
    fn default() -> Self {
        Self { group_size: 4, retry_window_s: 24 * 3600 }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RawMoney {
    pub charge_on: ChargeOn,
    /// Price of a lead when no pricing statistics apply (credits).
    pub flat_price_credits: u64,
    /// A charge is refunded if the client has not viewed the proposal within this
    /// window; 0 = no guarantee (R12).
    pub guarantee_window_s: i64,
}

impl Default for RawMoney {
    fn default() -> Self {
        Self { charge_on: ChargeOn::Response, flat_price_credits: 10, guarantee_window_s: 0 }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RawOrders {
    /// Time a pro has to approve or decline an order request before it expires (R26).
    pub order_request_ttl_s: i64,
    /// How long an ended order request, custom offer or order is remembered (for
    /// idempotent retries and commands that name it) before it is forgotten. At least
    /// [`MIN_ORDER_RETENTION_S`]: a shorter period would forget a record while the
    /// platform may still be retrying the command that ended it.
    pub idempotency_retention_s: i64,
}

impl Default for RawOrders {
    fn default() -> Self {
        Self { order_request_ttl_s: 48 * 3600, idempotency_retention_s: 7 * 24 * 3600 }
    }
}

/// Shortest `orders.idempotency_retention_s` (one hour): retries of a command are over
/// in seconds or minutes; an hour leaves a wide margin for a platform's retry queue.
pub const MIN_ORDER_RETENTION_S: i64 = 3600;

/// A policy file that does not make sense, with the key that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy file is not valid TOML or has an unknown/mistyped key: {0}")]
    Parse(String),
    #[error("{key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> PolicyError {
    PolicyError::Invalid { key, reason: reason.into() }
}

/// The validated, typed policy the core reads. Times are in milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub tenant: String,
    pub time_zone: Tz,
    pub mode: DispatchMode,
    pub lead_ttl: Millis,
    pub head_start: Millis,
    pub max_responders: u32,
    /// `None` = all eligible.
    pub offer_fanout: Option<u32>,
    /// `None` = offers have no response window.
    pub response_window: Option<Millis>,
    pub min_list_size: u32,
    pub duplicate_window: Option<Millis>,
    pub idempotency_retention: Millis,
    pub require_verified_phone: bool,
    pub min_description_chars: u32,
    pub reject_competitors: bool,
    pub required_details: BTreeMap<CategoryId, Vec<String>>,
    pub base_weight: u32,
    pub max_weight: u32,
    pub min_weight: u32,
    pub decline_penalty_permille: u32,
    pub expiry_penalty_permille: u32,
    pub max_catch_up_turns: u32,
    pub response_rate_share_permille: u32,
    pub response_rate_min_offers: u32,
    /// `None`: the response time is not used (R29).
    pub response_time_target: Option<Millis>,
    pub slow_response_penalty_permille: u32,
    pub group_size: u32,
    pub retry_window: Millis,
    pub charge_on: ChargeOn,
    pub flat_price_credits: u64,
    pub guarantee_window: Option<Millis>,
    /// R11 pricing, validated; `None` = every lead costs `flat_price_credits`.
    pub pricing: Option<crate::pricing::Pricing>,
    /// Response window of an order request (R26).
    pub order_request_ttl: Millis,
    /// How long an ended order request, custom offer or order is remembered before
    /// the order book forgets it (`orders.idempotency_retention_s`).
    pub order_retention: Millis,
    /// What this policy was validated from: the engine logs it ([`Policy::to_toml`])
    /// so that recovery replays each decision under the policy it was made with.
    source: RawPolicy,
}

/// Longest duration any window may have (one year): keeps every `now + window` sum far
/// from overflow.
const MAX_WINDOW_S: i64 = 366 * 24 * 3600;

fn secs(key: &'static str, v: i64, allow_zero: bool) -> Result<Millis, PolicyError> {
    if v < 0 || (!allow_zero && v == 0) {
        let want = if allow_zero { ">= 0" } else { "> 0" };
        return Err(invalid(key, format!("must be {want} seconds, got {v}")));
    }
    if v > MAX_WINDOW_S {
        return Err(invalid(key, format!("must be at most {MAX_WINDOW_S} seconds, got {v}")));
    }
    Ok(v * SECOND_MS)
}

impl RawPolicy {
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        toml::from_str(text).map_err(|e| PolicyError::Parse(e.to_string()))
    }

    pub fn validate(&self) -> Result<Policy, PolicyError> {
        crate::ids::validate_id(&self.tenant, "tenant").map_err(|e| invalid("tenant", e.reason))?;
        let time_zone: Tz = self
            .time_zone
            .parse()
            .map_err(|_| invalid("time_zone", format!("unknown IANA time zone {:?}", self.time_zone)))?;
        let l = &self.leads;
        let lead_ttl = secs("leads.lead_ttl_s", l.lead_ttl_s, false)?;
        let head_start = secs("leads.head_start_s", l.head_start_s, true)?;
        if head_start >= lead_ttl {
            return Err(invalid(
                "leads.head_start_s",
                "must be shorter than leads.lead_ttl_s, or no generic release would ever happen",
            ));
        }
        if l.max_responders == 0 {
            return Err(invalid("leads.max_responders", "must be at least 1"));
        }
        let offer_fanout = match l.offer_fanout {
            Fanout::All(_) => None,
            Fanout::Next(0) => return Err(invalid("leads.offer_fanout", "must be \"all\" or a number >= 1")),
            Fanout::Next(n) if n as usize > crate::core::shard::MAX_OFFERS_PER_RELEASE => {
                return Err(invalid(
                    "leads.offer_fanout",
                    format!(
                        "at most {} pros per release (\"all\" offers to that many at most)",
                        crate::core::shard::MAX_OFFERS_PER_RELEASE
                    ),
                ))
            }
            Fanout::Next(n) => Some(n),
        };
        let response_window = match secs("leads.response_window_s", l.response_window_s, true)? {
            0 => None,
            w => Some(w),
        };
        let duplicate_window = match secs("leads.duplicate_window_s", l.duplicate_window_s, true)? {
            0 => None,
            w => Some(w),
        };
        let idempotency_retention = secs("leads.idempotency_retention_s", l.idempotency_retention_s, true)?;
        let g = &self.gate;
        let mut required_details = BTreeMap::new();
        for (cat, keys) in &g.required_details {
            crate::ids::validate_id(cat, "gate.required_details")
                .map_err(|e| invalid("gate.required_details", e.reason))?;
            if keys.iter().any(|k| k.is_empty()) {
                return Err(invalid("gate.required_details", format!("category {cat:?} lists an empty key")));
            }
            required_details.insert(CategoryId::new(cat), keys.clone());
        }
        let r = &self.ranking;
        if r.min_weight == 0 {
            return Err(invalid("ranking.min_weight", "must be >= 1 so every pro keeps a share"));
        }
        if !(r.min_weight <= r.base_weight && r.base_weight <= r.max_weight) {
            return Err(invalid(
                "ranking.base_weight",
                format!(
                    "need min_weight <= base_weight <= max_weight, got {} <= {} <= {}",
                    r.min_weight, r.base_weight, r.max_weight
                ),
            ));
        }
        if r.max_weight > 100_000 {
            return Err(invalid("ranking.max_weight", "must be at most 100000"));
        }
        for (key, v) in [
            ("ranking.decline_penalty_permille", r.decline_penalty_permille),
            ("ranking.expiry_penalty_permille", r.expiry_penalty_permille),
            ("ranking.response_rate_share_permille", r.response_rate_share_permille),
            ("ranking.slow_response_penalty_permille", r.slow_response_penalty_permille),
        ] {
            if v > 1000 {
                return Err(invalid(key, format!("must be at most 1000 per mille, got {v}")));
            }
        }
        if r.max_catch_up_turns > 1000 {
            return Err(invalid("ranking.max_catch_up_turns", "must be at most 1000"));
        }
        if r.response_rate_min_offers > 1_000_000 {
            return Err(invalid("ranking.response_rate_min_offers", "must be at most 1000000"));
        }
        let response_time_target = secs("ranking.response_time_target_s", r.response_time_target_s, true)?;
        let a = &self.autobuy;
        if a.group_size == 0 {
            return Err(invalid("autobuy.group_size", "must be at least 1"));
        }
        let retry_window = secs("autobuy.retry_window_s", a.retry_window_s, true)?;
        let m = &self.money;
        if self.mode == DispatchMode::AutoBuy && m.charge_on != ChargeOn::Dispatch {
            return Err(invalid(
                "money.charge_on",
                "auto_buy mode charges buyers at dispatch: set charge_on = \"dispatch\"",
            ));
        }
        if self.mode != DispatchMode::AutoBuy && m.charge_on == ChargeOn::Dispatch {
            return Err(invalid("money.charge_on", "\"dispatch\" is only valid with mode = \"auto_buy\""));
        }
        if m.charge_on != ChargeOn::Never && m.flat_price_credits == 0 {
            return Err(invalid("money.flat_price_credits", "must be >= 1 when leads are charged"));
        }
        let pricing = match &self.pricing {
            None => None,
            Some(pp) => Some(
                pp.clone()
                    .validate()
                    .map_err(|e| PolicyError::Invalid { key: "pricing", reason: e.to_string() })?,
            ),
        };
        let guarantee_window = match secs("money.guarantee_window_s", m.guarantee_window_s, true)? {
            0 => None,
            w => Some(w),
        };
        let order_request_ttl = secs("orders.order_request_ttl_s", self.orders.order_request_ttl_s, false)?;
        let order_retention =
            secs("orders.idempotency_retention_s", self.orders.idempotency_retention_s, false)?;
        if self.orders.idempotency_retention_s < MIN_ORDER_RETENTION_S {
            return Err(invalid(
                "orders.idempotency_retention_s",
                format!(
                    "must be at least {MIN_ORDER_RETENTION_S} seconds (1 h) so that retries are over before a \
                     record is forgotten, got {}",
                    self.orders.idempotency_retention_s
                ),
            ));
        }
        Ok(Policy {
            tenant: self.tenant.clone(),
            time_zone,
            mode: self.mode,
            lead_ttl,
            head_start,
            max_responders: l.max_responders,
            offer_fanout,
            response_window,
            min_list_size: l.min_list_size,
            duplicate_window,
            idempotency_retention,
            require_verified_phone: g.require_verified_phone,
            min_description_chars: g.min_description_chars,
            reject_competitors: g.reject_competitors,
            required_details,
            base_weight: r.base_weight,
            max_weight: r.max_weight,
            min_weight: r.min_weight,
            decline_penalty_permille: r.decline_penalty_permille,
            expiry_penalty_permille: r.expiry_penalty_permille,
            max_catch_up_turns: r.max_catch_up_turns,
            response_rate_share_permille: r.response_rate_share_permille,
            response_rate_min_offers: r.response_rate_min_offers,
            response_time_target: (response_time_target > 0).then_some(response_time_target),
            slow_response_penalty_permille: r.slow_response_penalty_permille,
            group_size: a.group_size,
            retry_window,
            charge_on: m.charge_on,
            flat_price_credits: m.flat_price_credits,
            guarantee_window,
            pricing,
            order_request_ttl,
            order_retention,
            source: self.clone(),
        })
    }
}

impl Policy {
    /// Parses and validates a policy file's text.
    pub fn from_toml(text: &str) -> Result<Self, PolicyError> {
        RawPolicy::from_toml(text)?.validate()
    }

    /// The policy as a policy file's text: [`Policy::from_toml`] of it gives this
    /// policy back.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.source).expect("a policy's source is plain data and always serialises")
    }

    /// A policy for tests and the built-in demo tenant: the shared-leads numbers.
    pub fn shared_default(tenant: &str) -> Self {
        RawPolicy {
            tenant: tenant.into(),
            time_zone: "Europe/Rome".into(),
            mode: DispatchMode::Shared,
            leads: RawLeads::default(),
            gate: RawGate::default(),
            ranking: RawRanking::default(),
            autobuy: RawAutoBuy::default(),
            money: RawMoney::default(),
            pricing: None,
            orders: RawOrders::default(),
        }
        .validate()
        .expect("the built-in defaults are valid: checked by a unit test")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_written_as_toml_reads_back_equal() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/tenants");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            let p = Policy::from_toml(&text).unwrap();
            assert_eq!(Policy::from_toml(&p.to_toml()).unwrap(), p, "{}", p.tenant);
            seen += 1;
        }
        assert!(seen >= 3, "the example tenants' policies are read");
        let demo = Policy::shared_default("demo");
        assert_eq!(Policy::from_toml(&demo.to_toml()).unwrap(), demo);
    }

    #[test]
    fn built_in_defaults_are_valid() {
        let p = Policy::shared_default("demo");
        assert_eq!(p.max_responders, 5);
        assert_eq!(p.head_start, 30 * 60 * 1000);
        assert_eq!(p.order_retention, 7 * 24 * 3600 * 1000);
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name() {
        let e = Policy::from_toml("tenant = \"t\"\nmode = \"shared\"\n[leads]\nlead_ttl_hours = 4\n")
            .unwrap_err();
        assert!(e.to_string().contains("lead_ttl_hours"), "{e}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let cases = [
            ("[leads]\nmax_responders = 0", "leads.max_responders"),
            ("[leads]\nlead_ttl_s = -5", "leads.lead_ttl_s"),
            ("[leads]\nhead_start_s = 999999\nlead_ttl_s = 3600", "leads.head_start_s"),
            ("[leads]\noffer_fanout = 0", "leads.offer_fanout"),
            ("[leads]\noffer_fanout = 10001", "leads.offer_fanout"),
            ("[ranking]\nmin_weight = 0", "ranking.min_weight"),
            ("[autobuy]\ngroup_size = 0", "autobuy.group_size"),
            ("[orders]\norder_request_ttl_s = 0", "orders.order_request_ttl_s"),
            ("[orders]\norder_request_ttl_s = -1", "orders.order_request_ttl_s"),
            ("[orders]\nidempotency_retention_s = 0", "orders.idempotency_retention_s"),
            ("[orders]\nidempotency_retention_s = -1", "orders.idempotency_retention_s"),
            ("[orders]\nidempotency_retention_s = 3599", "orders.idempotency_retention_s"),
            ("[orders]\nidempotency_retention_s = 99999999", "orders.idempotency_retention_s"),
        ];
        for (body, key) in cases {
            let text = format!("tenant = \"t\"\nmode = \"shared\"\n{body}\n");
            match Policy::from_toml(&text) {
                Err(PolicyError::Invalid { key: k, .. }) => assert_eq!(k, key, "{body}"),
                other => panic!("{body}: expected invalid {key}, got {other:?}"),
            }
        }
        let e =
            Policy::from_toml("tenant = \"t\"\nmode = \"shared\"\ntime_zone = \"Mars/Base\"\n").unwrap_err();
        assert!(matches!(e, PolicyError::Invalid { key: "time_zone", .. }));
    }

    #[test]
    fn fanout_accepts_all_or_a_number() {
        let p = Policy::from_toml("tenant = \"t\"\nmode = \"matched\"\n[leads]\noffer_fanout = 3\n").unwrap();
        assert_eq!(p.offer_fanout, Some(3));
        let p = Policy::from_toml("tenant = \"t\"\nmode = \"shared\"\n[leads]\noffer_fanout = \"all\"\n")
            .unwrap();
        assert_eq!(p.offer_fanout, None);
    }
}
