//! R11: the price of a lead in credits. Pure integer functions, no floats.
//!
//! ```text
//! expected value (cents) = avg job value x conversion / avg proposals per lead
//! credits                = expected value / credit value
//!                          x tenant factor
//!                          x (1 - chat-only discount) x (1 - thin-details discount)
//!                          x (1 - far-away discount)          (only the risks present)
//! price                  = round half up, then clamp to [min, max]
//! ```
//!
//! The average proposals per lead counts as at least one (1000 thousandths, as
//! configured and as learned): a lead with no response lowers it, but a pro that responds is one
//! proposal at least, so a lead never costs more than being its only proposal is
//! worth.
//!
//! The whole chain is one fraction of `u128` integers, rounded once at the
//! end (half up: 2.5 -> 3, 2.49 -> 2), so the price does not depend on the
//! order of the factors and adding a risk never raises it. The intermediate
//! values in [`PriceComponents`] are rounded separately, for display only.
//!
//! Configuration is a [`PricingPolicy`] (serde, TOML, unknown keys refused,
//! units in key names) validated into a [`Pricing`] by
//! [`PricingPolicy::validate`]:
//!
//! ```toml
//! tenant_factor_permille = 1000        # 1.0x
//! min_price_credits = 1
//! max_price_credits = 40
//! credit_value_cents = 100             # one credit is worth 1.00
//! chat_only_discount_permille = 300    # chat-only leads cost 30% less
//! thin_details_discount_permille = 150
//! far_away_discount_permille = 200
//! far_away_km = 30
//! proposals_ema_permille = 50          # learning rate of avg proposals
//!
//! [default_category]
//! avg_job_value_cents = 50000
//! conversion_permille = 200
//! avg_proposals_milli = 4000
//!
//! [categories.painting]
//! avg_job_value_cents = 120000
//! conversion_permille = 250
//! avg_proposals_milli = 5000
//! ```

use crate::ids::CategoryId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Largest tenant factor accepted: 100x.
pub const MAX_TENANT_FACTOR_PERMILLE: u32 = 100_000;
/// Largest average of proposals per lead: 1,000 proposals.
pub const MAX_PROPOSALS_MILLI: u64 = 1_000_000;
/// Smallest: one proposal. The figure divides the expected value of *responding*, and a
/// pro that responds is one proposal at least: below one, the price would exceed the
/// value of being the lead's only proposal (leads closed with no response pull the
/// learned average down, R11, and a category most leads of which get none would
/// otherwise be priced at the maximum, fewer responses pushing it higher still).
pub const MIN_PROPOSALS_MILLI: u64 = 1_000;
/// Largest value of one credit.
pub const MAX_CREDIT_VALUE_CENTS: u64 = u32::MAX as u64;

/// A fraction in thousandths, 0..=1000.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Permille(u16);

impl Permille {
    pub const ZERO: Self = Self(0);
    pub const ONE: Self = Self(1000);

    /// `None` above 1000.
    pub fn new(value: u32) -> Option<Self> {
        u16::try_from(value).ok().filter(|v| *v <= 1000).map(Self)
    }

    pub fn get(self) -> u32 {
        u32::from(self.0)
    }
}

impl TryFrom<u32> for Permille {
    type Error = String;
    fn try_from(value: u32) -> Result<Self, String> {
        Self::new(value).ok_or_else(|| format!("{value} is above 1000 permille"))
    }
}

impl From<Permille> for u32 {
    fn from(p: Permille) -> u32 {
        p.get()
    }
}

/// What a category's leads are worth, from config, possibly learned online.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CategoryStats {
    /// Average price of a job in this category.
    pub avg_job_value_cents: u64,
    /// Share of responding pros that get the job, in thousandths (0..=1000).
    pub conversion_permille: u32,
    /// Average number of proposals a lead gets, in thousandths (4500 = 4.5).
    pub avg_proposals_milli: u64,
}

impl CategoryStats {
    /// Learns from a closed lead that got `n` proposals: an exponential moving
    /// average `avg += (n - avg) x ema`, in milli-units, rounded half up.
    /// Deterministic, so replaying the same observations gives the same stats.
    /// The result stays in `MIN_PROPOSALS_MILLI..=MAX_PROPOSALS_MILLI`.
    pub fn observe_proposals(&mut self, n: u32, ema: Permille) {
        let old = self.avg_proposals_milli.min(MAX_PROPOSALS_MILLI);
        let sample = (u64::from(n) * 1000).min(MAX_PROPOSALS_MILLI);
        let alpha = u64::from(ema.get());
        // Both terms are at most 10^6 x 10^3: no overflow in u64.
        let new = (old * (1000 - alpha) + sample * alpha + 500) / 1000;
        self.avg_proposals_milli = new.clamp(MIN_PROPOSALS_MILLI, MAX_PROPOSALS_MILLI);
    }
}

/// R11 configuration of one tenant, as written in its policy file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PricingPolicy {
    /// Multiplier on the expected value, in thousandths (1000 = 1.0x).
    pub tenant_factor_permille: u32,
    pub min_price_credits: u64,
    pub max_price_credits: u64,
    /// What one credit is worth.
    pub credit_value_cents: u64,
    pub chat_only_discount_permille: u32,
    pub thin_details_discount_permille: u32,
    pub far_away_discount_permille: u32,
    /// A lead farther than this from the pro's base is "far away".
    pub far_away_km: u32,
    /// Learning rate of [`CategoryStats::observe_proposals`] (0 = never learn).
    pub proposals_ema_permille: u32,
    /// Stats for categories not listed in `categories`.
    pub default_category: CategoryStats,
    #[serde(default)]
    pub categories: BTreeMap<CategoryId, CategoryStats>,
}

/// A configuration value out of range; `key` is the full TOML path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct PricingError {
    pub key: String,
    pub reason: String,
}

fn bad(key: impl Into<String>, reason: impl Into<String>) -> PricingError {
    PricingError { key: key.into(), reason: reason.into() }
}

fn permille(key: &str, value: u32) -> Result<Permille, PricingError> {
    Permille::new(value).ok_or_else(|| {
        bad(format!("pricing.{key}"), format!("{value} is out of range: must be 0..=1000 (thousandths)"))
    })
}

fn validate_stats(key: &str, s: &CategoryStats) -> Result<(), PricingError> {
    permille(&format!("{key}.conversion_permille"), s.conversion_permille)?;
    // Below `MIN_PROPOSALS_MILLI` is accepted, and priced as one proposal: refusing it
    // would refuse the policies older releases stored in snapshots and the log (which
    // accepted it), and stop the start.
    if !(1..=MAX_PROPOSALS_MILLI).contains(&s.avg_proposals_milli) {
        return Err(bad(
            format!("pricing.{key}.avg_proposals_milli"),
            format!(
                "{} is out of range: must be 1..={MAX_PROPOSALS_MILLI} (thousandths of a proposal; \
                 below 1000 counts as 1000)",
                s.avg_proposals_milli
            ),
        ));
    }
    Ok(())
}

impl PricingPolicy {
    /// Checks every key and returns the typed policy, or the first bad key.
    pub fn validate(self) -> Result<Pricing, PricingError> {
        let f = self.tenant_factor_permille;
        if !(1..=MAX_TENANT_FACTOR_PERMILLE).contains(&f) {
            return Err(bad(
                "pricing.tenant_factor_permille",
                format!("{f} is out of range: must be 1..={MAX_TENANT_FACTOR_PERMILLE} (1000 = 1.0x)"),
            ));
        }
        if self.min_price_credits == 0 {
            return Err(bad(
                "pricing.min_price_credits",
                "must be at least 1: the ledger refuses charges of zero credits",
            ));
        }
        if self.min_price_credits > self.max_price_credits {
            return Err(bad(
                "pricing.min_price_credits",
                format!(
                    "pricing.min_price_credits ({}) > pricing.max_price_credits ({}): the minimum must not exceed the maximum",
                    self.min_price_credits, self.max_price_credits
                ),
            ));
        }
        if !(1..=MAX_CREDIT_VALUE_CENTS).contains(&self.credit_value_cents) {
            return Err(bad(
                "pricing.credit_value_cents",
                format!("{} is out of range: must be 1..={MAX_CREDIT_VALUE_CENTS}", self.credit_value_cents),
            ));
        }
        let chat_only = permille("chat_only_discount_permille", self.chat_only_discount_permille)?;
        let thin_details = permille("thin_details_discount_permille", self.thin_details_discount_permille)?;
        let far_away = permille("far_away_discount_permille", self.far_away_discount_permille)?;
        let proposals_ema = permille("proposals_ema_permille", self.proposals_ema_permille)?;
        validate_stats("default_category", &self.default_category)?;
        for (category, stats) in &self.categories {
            validate_stats(&format!("categories.{category}"), stats)?;
        }
        Ok(Pricing {
            chat_only,
            thin_details,
            far_away,
            proposals_ema,
            far_away_m: u64::from(self.far_away_km) * 1000,
            policy: self,
        })
    }
}

/// A validated [`PricingPolicy`]: every value is within the bounds that keep
/// [`price`] free of overflow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pricing {
    policy: PricingPolicy,
    chat_only: Permille,
    thin_details: Permille,
    far_away: Permille,
    proposals_ema: Permille,
    far_away_m: u64,
}

impl Pricing {
    pub fn policy(&self) -> &PricingPolicy {
        &self.policy
    }

    /// The configured stats of `category`, or the default ones.
    pub fn stats(&self, category: &CategoryId) -> &CategoryStats {
        self.policy.categories.get(category).unwrap_or(&self.policy.default_category)
    }

    /// The learning rate for [`CategoryStats::observe_proposals`].
    pub fn proposals_ema(&self) -> Permille {
        self.proposals_ema
    }
}

/// What makes a lead riskier for the pro (R11: riskier leads cost less).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RiskInputs {
    /// The client accepts chat only: no phone (R8).
    pub chat_only: bool,
    /// The details are thin (optional form answers missing, short description).
    pub thin_details: bool,
    /// Distance from the pro's base to the lead, when both are known.
    pub distance_m: Option<u64>,
}

/// Which bound, if any, the price was clamped to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Clamp {
    None,
    Min,
    Max,
}

/// Every input and intermediate of a price, so a pro can see why a lead
/// costs what it costs. Rounded intermediates are for display; the price is
/// computed from the exact fraction.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriceComponents {
    pub avg_job_value_cents: u64,
    pub conversion_permille: u32,
    pub avg_proposals_milli: u64,
    /// avg job value x conversion / avg proposals, rounded half up.
    pub expected_value_cents: u64,
    pub credit_value_cents: u64,
    pub tenant_factor_permille: u32,
    /// The discounts applied to this lead (0 for a risk it does not have).
    pub chat_only_discount_permille: u32,
    pub thin_details_discount_permille: u32,
    pub far_away_discount_permille: u32,
    pub distance_m: Option<u64>,
    pub far_away_km: u32,
    /// Product of (1 - discount) over the applied discounts, rounded half up.
    pub risk_factor_permille: u32,
    /// The price before clamping, rounded half up (saturates at `u64::MAX`).
    pub unclamped_credits: u64,
    pub min_price_credits: u64,
    pub max_price_credits: u64,
    pub clamped: Clamp,
    /// The discount a pro farther than `far_away_km` from the lead gets (R11: the
    /// price is per lead, but distance is per pro; see [`PriceComponents::far_away`]).
    /// 0 in records written before per-pro pricing: no far-away price for those leads.
    #[serde(default)]
    pub far_away_pro_discount_permille: u32,
}

/// A lead's price in credits, with its explanation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Price {
    pub credits: u64,
    pub components: PriceComponents,
}

/// `num / den` rounded half up. `den > 0`.
fn div_round_half_up(num: u128, den: u128) -> u128 {
    // (2n + d) / 2d == floor(n/d + 1/2); 2n + d cannot overflow for the bounded
    // values used here (n < 2^122, d < 2^93).
    (2 * num + den) / (2 * den)
}

/// R11: the price of a lead in credits.
///
/// `stats` may come from online learning, so out-of-range values are clamped
/// into range (conversion to 1000, proposals to `1..=MAX_PROPOSALS_MILLI`)
/// instead of failing; the components show the values used.
pub fn price(stats: &CategoryStats, risk: &RiskInputs, pricing: &Pricing) -> Price {
    let p = &pricing.policy;
    let applied = |present: bool, d: Permille| if present { d.get() } else { 0 };
    let far_away = risk.distance_m.is_some_and(|d| d > pricing.far_away_m);
    let mut components = PriceComponents {
        avg_job_value_cents: stats.avg_job_value_cents,
        conversion_permille: stats.conversion_permille.min(1000),
        avg_proposals_milli: stats.avg_proposals_milli.clamp(MIN_PROPOSALS_MILLI, MAX_PROPOSALS_MILLI),
        expected_value_cents: 0,
        credit_value_cents: p.credit_value_cents,
        tenant_factor_permille: p.tenant_factor_permille,
        chat_only_discount_permille: applied(risk.chat_only, pricing.chat_only),
        thin_details_discount_permille: applied(risk.thin_details, pricing.thin_details),
        far_away_discount_permille: applied(far_away, pricing.far_away),
        // In whole km (see `far_away`); the threshold above used the exact distance.
        distance_m: risk.distance_m.map(|d| d / 1000 * 1000),
        far_away_km: p.far_away_km,
        risk_factor_permille: 0,
        unclamped_credits: 0,
        min_price_credits: p.min_price_credits,
        max_price_credits: p.max_price_credits,
        clamped: Clamp::None,
        far_away_pro_discount_permille: pricing.far_away.get(),
    };
    let credits = components.settle();
    Price { credits, components }
}

impl PriceComponents {
    /// R11, far away: this lead's price for a pro `distance_m` from it, farther than
    /// `far_away_km`, with the far-away discount of the policy the lead was priced
    /// under (kept in `far_away_pro_discount_permille`, so a later change of the
    /// policy does not reprice an open lead). `None` when that discount is 0.
    ///
    /// The distance kept in the components (and shown to the pro in its offer) is in
    /// whole kilometres, rounded down: to the metre, the pro's own base and the
    /// distance would place the client on an arc a metre wide, and two pros' arcs
    /// would cross at the client's address before either responded (R8). A kilometre
    /// is about as coarse as the lead's `approx_location`. The price does not depend
    /// on it beyond the far-away threshold, decided on the exact distance.
    pub fn far_away(&self, distance_m: u64) -> Option<Price> {
        if self.far_away_pro_discount_permille == 0 || self.far_away_discount_permille != 0 {
            return None;
        }
        let mut components = self.clone();
        components.far_away_discount_permille = self.far_away_pro_discount_permille;
        components.distance_m = Some(distance_m / 1000 * 1000);
        let credits = components.settle();
        Some(Price { credits, components })
    }

    /// Fills in the intermediates and the clamp from the inputs; returns the price.
    fn settle(&mut self) -> u64 {
        let value = self.avg_job_value_cents;
        let conversion = self.conversion_permille.min(1000);
        let proposals = self.avg_proposals_milli.clamp(MIN_PROPOSALS_MILLI, MAX_PROPOSALS_MILLI);
        let keep = |d: u32| u128::from(1000 - d.min(1000));
        let (chat, thin, far) = (
            self.chat_only_discount_permille,
            self.thin_details_discount_permille,
            self.far_away_discount_permille,
        );
        // Bounds from validate(): value < 2^64, conversion <= 1000 < 2^10, factor
        // < 2^17, three (1000 - d) < 2^30: num < 2^121. proposals < 2^20, credit
        // value < 2^32, 1000^4 < 2^40: den < 2^92.
        let num = u128::from(value)
            * u128::from(conversion)
            * u128::from(self.tenant_factor_permille)
            * keep(chat)
            * keep(thin)
            * keep(far);
        let den = u128::from(proposals) * u128::from(self.credit_value_cents) * 1000u128.pow(4);
        let unclamped = div_round_half_up(num, den);
        let unclamped_credits = u64::try_from(unclamped).unwrap_or(u64::MAX);
        let (credits, clamped) = if unclamped_credits < self.min_price_credits {
            (self.min_price_credits, Clamp::Min)
        } else if unclamped_credits > self.max_price_credits {
            (self.max_price_credits, Clamp::Max)
        } else {
            (unclamped_credits, Clamp::None)
        };
        let expected = div_round_half_up(u128::from(value) * u128::from(conversion), u128::from(proposals));
        let risk_factor = div_round_half_up(keep(chat) * keep(thin) * keep(far), 1_000_000);
        // value x conversion / proposals <= value x 1000: may exceed u64 only for
        // absurd job values; saturate rather than wrap.
        self.expected_value_cents = u64::try_from(expected).unwrap_or(u64::MAX);
        self.risk_factor_permille =
            u32::try_from(risk_factor).expect("a product of three factors <= 1000, over 1000^2, is <= 1000");
        self.unclamped_credits = unclamped_credits;
        self.clamped = clamped;
        credits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &str = r#"
        tenant_factor_permille = 1000
        min_price_credits = 1
        max_price_credits = 40
        credit_value_cents = 100
        chat_only_discount_permille = 300
        thin_details_discount_permille = 150
        far_away_discount_permille = 200
        far_away_km = 30
        proposals_ema_permille = 50

        [default_category]
        avg_job_value_cents = 50000
        conversion_permille = 200
        avg_proposals_milli = 4000

        [categories.painting]
        avg_job_value_cents = 120000
        conversion_permille = 250
        avg_proposals_milli = 5000
    "#;

    fn policy() -> PricingPolicy {
        toml::from_str(EXAMPLE).expect("the example policy is valid TOML")
    }

    fn pricing() -> Pricing {
        policy().validate().expect("the example policy is valid")
    }

    fn stats(value: u64, conversion: u32, proposals: u64) -> CategoryStats {
        CategoryStats {
            avg_job_value_cents: value,
            conversion_permille: conversion,
            avg_proposals_milli: proposals,
        }
    }

    #[test]
    fn r11_price_is_expected_value_in_credits_times_tenant_factor() {
        let p = pricing();
        // 500.00 x 20% / 4 proposals = 25.00 = 25 credits of 1.00.
        let safe = RiskInputs::default();
        let got = price(p.stats(&"plumbing".into()), &safe, &p);
        assert_eq!(got.credits, 25);
        assert_eq!(got.components.expected_value_cents, 2500);
        assert_eq!(got.components.risk_factor_permille, 1000);
        assert_eq!(got.components.clamped, Clamp::None);
        // painting: 1200.00 x 25% / 5 = 60.00 -> 60 credits, clamped to 40.
        let painting = price(p.stats(&"painting".into()), &safe, &p);
        assert_eq!(painting.components.unclamped_credits, 60);
        assert_eq!(painting.credits, 40);
        assert_eq!(painting.components.clamped, Clamp::Max);

        let mut doubled = policy();
        doubled.tenant_factor_permille = 2000;
        let doubled = doubled.validate().unwrap();
        assert_eq!(price(p.stats(&"x".into()), &safe, &doubled).credits, 40);
        let mut half = policy();
        half.tenant_factor_permille = 500;
        let half = half.validate().unwrap();
        assert_eq!(price(p.stats(&"x".into()), &safe, &half).credits, 13); // 12.5 -> 13
    }

    #[test]
    fn r11_riskier_leads_cost_less() {
        let p = pricing();
        let s = stats(50000, 200, 4000);
        let base = price(&s, &RiskInputs::default(), &p).credits;
        let chat = RiskInputs { chat_only: true, ..RiskInputs::default() };
        let chat_price = price(&s, &chat, &p);
        // 25 x 0.7 = 17.5 -> 18 (half up).
        assert_eq!(chat_price.credits, 18);
        assert_eq!(chat_price.components.chat_only_discount_permille, 300);
        let all = RiskInputs { chat_only: true, thin_details: true, distance_m: Some(30_001) };
        let all_price = price(&s, &all, &p);
        // 25 x 0.7 x 0.85 x 0.8 = 11.9 -> 12.
        assert_eq!(all_price.credits, 12);
        assert_eq!(all_price.components.risk_factor_permille, 476);
        assert!(all_price.credits < chat_price.credits && chat_price.credits < base);
        // Exactly at the limit is not far away.
        let at_limit = RiskInputs { distance_m: Some(30_000), ..RiskInputs::default() };
        assert_eq!(price(&s, &at_limit, &p).credits, base);
    }

    #[test]
    fn r11_rounding_is_half_up_and_clamped_to_min() {
        let p = pricing();
        // 2.5 credits -> 3; 2.4999 -> 2.
        assert_eq!(price(&stats(1000, 1000, 4000), &RiskInputs::default(), &p).credits, 3);
        assert_eq!(price(&stats(999, 1000, 4000), &RiskInputs::default(), &p).credits, 2);
        let cheap = price(&stats(100, 10, 9000), &RiskInputs::default(), &p);
        assert_eq!(cheap.components.unclamped_credits, 0);
        assert_eq!((cheap.credits, cheap.components.clamped), (1, Clamp::Min));
    }

    #[test]
    fn r11_out_of_range_learned_stats_are_clamped_not_a_panic() {
        let p = pricing();
        let got = price(&stats(u64::MAX, 5000, 0), &RiskInputs::default(), &p);
        assert_eq!(got.credits, 40);
        assert_eq!(got.components.conversion_permille, 1000);
        assert_eq!(got.components.avg_proposals_milli, 1000);
        assert_eq!(
            got.components.unclamped_credits,
            u64::MAX / 100,
            "a value of u64::MAX cents in credits of 1.00"
        );
        assert_eq!(got.components.clamped, Clamp::Max);
    }

    /// R11: the expected value of responding is shared among the lead's proposals, and
    /// a responding pro is one: leads that closed with no response pull the learned
    /// average down, never below one proposal, so a lead is never priced above the
    /// value of being its only proposal (before, half a proposal doubled the price).
    #[test]
    fn r11_a_lead_is_never_priced_above_being_its_only_proposal() {
        let mut pol = policy();
        pol.max_price_credits = 1_000_000;
        let p = pol.validate().unwrap();
        let mut s = stats(120_000, 250, 4000);
        for _ in 0..50 {
            s.observe_proposals(0, Permille::new(500).unwrap());
        }
        assert_eq!(s.avg_proposals_milli, 1000);
        let got = price(&s, &RiskInputs::default(), &p);
        // 1,200.00 x 25 % / 1 proposal = 300.00 = 300 credits of 1.00.
        assert_eq!((got.components.expected_value_cents, got.credits), (30_000, 300));
        let old_snapshot = stats(120_000, 250, 500);
        assert_eq!(price(&old_snapshot, &RiskInputs::default(), &p).credits, 300);
        // A policy below one (accepted by older releases, stored in their snapshots and
        // logs) still loads, and prices as one.
        let mut below = policy();
        below.max_price_credits = 1_000_000;
        below.categories.get_mut(&"painting".into()).unwrap().avg_proposals_milli = 500;
        let below = below.validate().expect("accepted, counted as one proposal");
        let painting = *below.stats(&"painting".into());
        assert_eq!(price(&painting, &RiskInputs::default(), &below).credits, 300);
    }

    #[test]
    fn r11_components_serialize_for_explain() {
        let p = pricing();
        let got = price(&stats(50000, 200, 4000), &RiskInputs::default(), &p);
        let json = serde_json::to_value(&got).unwrap();
        assert_eq!(json["components"]["expected_value_cents"], 2500);
        assert_eq!(json["components"]["clamped"], "none");
        let back: Price = serde_json::from_value(json).unwrap();
        assert_eq!(back, got);
    }

    #[test]
    fn policy_validation_names_the_bad_key() {
        let mut p = policy();
        p.min_price_credits = 50;
        let e = p.validate().unwrap_err();
        assert_eq!(e.key, "pricing.min_price_credits");
        assert!(
            e.to_string().contains("pricing.min_price_credits (50) > pricing.max_price_credits (40)"),
            "{e}"
        );

        let mut p = policy();
        p.chat_only_discount_permille = 1001;
        assert_eq!(p.validate().unwrap_err().key, "pricing.chat_only_discount_permille");
        let mut p = policy();
        p.tenant_factor_permille = 0;
        assert_eq!(p.validate().unwrap_err().key, "pricing.tenant_factor_permille");
        let mut p = policy();
        p.credit_value_cents = 0;
        assert_eq!(p.validate().unwrap_err().key, "pricing.credit_value_cents");
        let mut p = policy();
        p.min_price_credits = 0;
        assert_eq!(p.validate().unwrap_err().key, "pricing.min_price_credits");
        let mut p = policy();
        p.categories.get_mut(&"painting".into()).unwrap().avg_proposals_milli = 0;
        assert_eq!(p.validate().unwrap_err().key, "pricing.categories.painting.avg_proposals_milli");
        let mut p = policy();
        p.default_category.conversion_permille = 2000;
        assert_eq!(p.validate().unwrap_err().key, "pricing.default_category.conversion_permille");
    }

    #[test]
    fn policy_refuses_unknown_keys() {
        let typo = EXAMPLE.replace("far_away_km", "far_away_kms");
        let e = toml::from_str::<PricingPolicy>(&typo).unwrap_err();
        assert!(e.to_string().contains("far_away_kms"), "{e}");
        let typo = EXAMPLE.replace("conversion_permille = 250", "conversion_pct = 25");
        assert!(toml::from_str::<PricingPolicy>(&typo).is_err());
    }

    #[test]
    fn r11_proposals_are_learned_as_a_deterministic_moving_average() {
        let ema = Permille::new(100).unwrap();
        let mut s = stats(50000, 200, 4000);
        s.observe_proposals(6, ema);
        // 4000 x 0.9 + 6000 x 0.1 = 4200.
        assert_eq!(s.avg_proposals_milli, 4200);
        for _ in 0..200 {
            s.observe_proposals(2, ema);
        }
        assert_eq!(s.avg_proposals_milli, 2005, "converges within rounding of 2000");
        let mut z = stats(1, 1, 1);
        z.observe_proposals(0, Permille::ONE);
        assert_eq!(z.avg_proposals_milli, 1000, "floored at one proposal: a responding pro is one");
        let mut frozen = stats(1, 1, 3000);
        frozen.observe_proposals(9, Permille::ZERO);
        assert_eq!(frozen.avg_proposals_milli, 3000);
        let mut big = stats(1, 1, 3000);
        big.observe_proposals(u32::MAX, Permille::ONE);
        assert_eq!(big.avg_proposals_milli, MAX_PROPOSALS_MILLI);
    }

    proptest! {
        #[test]
        fn r11_adding_a_risk_never_raises_the_price(
            value in 0u64..10_000_000,
            conversion in 0u32..=1000,
            proposals in 1u64..50_000,
            chat in any::<bool>(),
            thin in any::<bool>(),
            distance in proptest::option::of(0u64..100_000),
            factor in 1u32..5000,
        ) {
            let mut pol = policy();
            pol.tenant_factor_permille = factor;
            let p = pol.validate().unwrap();
            let s = stats(value, conversion, proposals);
            let risk = RiskInputs { chat_only: chat, thin_details: thin, distance_m: distance };
            let got = price(&s, &risk, &p);
            prop_assert!((1..=40).contains(&got.credits));
            for riskier in [
                RiskInputs { chat_only: true, ..risk },
                RiskInputs { thin_details: true, ..risk },
                RiskInputs { distance_m: Some(1_000_000), ..risk },
            ] {
                prop_assert!(price(&s, &riskier, &p).credits <= got.credits);
            }
            prop_assert_eq!(price(&s, &risk, &p), got, "pure: same inputs, same price");
        }

        #[test]
        fn r11_the_far_away_price_of_a_lead_is_its_price_at_that_distance(
            value in 0u64..10_000_000,
            conversion in 0u32..=1000,
            proposals in 1u64..50_000,
            chat in any::<bool>(),
            thin in any::<bool>(),
            distance in 30_001u64..1_000_000,
        ) {
            let p = pricing();
            let s = stats(value, conversion, proposals);
            let near = RiskInputs { chat_only: chat, thin_details: thin, distance_m: None };
            let lead = price(&s, &near, &p);
            let far = lead.components.far_away(distance).expect("the policy has a far-away discount");
            prop_assert_eq!(&far, &price(&s, &RiskInputs { distance_m: Some(distance), ..near }, &p));
            prop_assert!(far.credits <= lead.credits);
        }
    }

    #[test]
    fn r11_no_far_away_price_without_a_discount_or_for_records_before_it() {
        let mut pol = policy();
        pol.far_away_discount_permille = 0;
        let none = price(&stats(50000, 200, 4000), &RiskInputs::default(), &pol.validate().unwrap());
        assert_eq!(none.components.far_away(100_000), None);
        // Components logged before per-pro pricing lack the last field (WAL records
        // are MessagePack arrays): it reads as 0, so those leads keep one price.
        let c = price(&stats(50000, 200, 4000), &RiskInputs::default(), &pricing()).components;
        assert_eq!(c.far_away_pro_discount_permille, 200);
        let mut bytes = rmp_serde::to_vec(&c).unwrap();
        // array16 header with 17 elements; the last one is 200 as a uint8 (0xcc 0xc8).
        assert_eq!(&bytes[..3], &[0xdc, 0x00, 17]);
        assert_eq!(&bytes[bytes.len() - 2..], &[0xcc, 200]);
        bytes[2] = 16;
        bytes.truncate(bytes.len() - 2);
        let old: PriceComponents = rmp_serde::from_slice(&bytes).unwrap();
        assert_eq!(old, PriceComponents { far_away_pro_discount_permille: 0, ..c });
        assert_eq!(old.far_away(100_000), None);
    }
}
