//! Ranking inputs -> rotation weight (R14, R15, R21, R28, R29).
//!
//! A pro's weight is its share of the rotation among pros that are equally eligible.
//! Quality (rating, reviews, projects, profile) moves it between the policy's
//! `base_weight` and `max_weight`; declines of this job type and expired offers take
//! a per-mille off each; responsiveness (R29) scales it by the response rate (a share
//! of the weight, once enough offers count) and takes a per-mille off a pro whose mean
//! time to first response is above the policy's target; down to `min_weight`. Since `min_weight >= 1`, every pro keeps
//! a share; since weights are capped, better pros earn a proportionally larger share,
//! never all of it.
//!
//! "Job type" is the category: a shard is one `(zone, category)`, and the declines it
//! remembers are the pro's declines of that category in that zone.
//!
//! R21 names two factors for auto-buy: profile quality and "dynamic price" (article
//! 003: "Prezzo dinamico", without saying how it counts). The lead's price is
//! dynamic (R11); what a buyer sets against it is a config's `max_price_credits`. rota
//! reads the factor as that match, a filter and not a rank: a buyer whose cap is below
//! the lead's price does not buy it (`price_above_max`), the others rotate by weight
//! as above. A rank by how high a buyer's cap is would let the highest cap take every
//! contested lead of a shard, against the article's "on equal terms, cyclically".

use super::model::Quality;
use super::policy::Policy;
use serde::{Deserialize, Serialize};

/// Responsiveness history of one pro in one shard (R14, R15, R29).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProStats {
    /// Offers received here (the fairness figure counts these).
    pub offered: u64,
    /// Offers answered by responding.
    pub responded: u64,
    pub declined: u64,
    pub expired: u64,
    /// Sum of times from offer to first response, ms (mean = sum / responded).
    pub response_time_ms_sum: u64,
    /// Offers that arrived while the pro was marked unavailable do not count against
    /// its response rate (R27); this counts the ones that do.
    pub rate_relevant: u64,
}

impl ProStats {
    /// Response rate, per mille, over offers that count (R27, R29).
    pub fn response_rate_permille(&self) -> u32 {
        if self.rate_relevant == 0 {
            return 1000;
        }
        (self.responded.min(self.rate_relevant) * 1000 / self.rate_relevant) as u32
    }

    pub fn mean_response_time_ms(&self) -> Option<u64> {
        (self.responded > 0).then(|| self.response_time_ms_sum / self.responded)
    }
}

/// Quality in per mille: 40 % rating, 30 % reviews (saturating at 100), 15 % projects
/// (saturating at 100), 15 % profile completeness.
pub fn quality_permille(q: &Quality) -> u32 {
    let rating = q.rating_centi.min(500) * 400 / 500;
    let reviews = q.reviews.min(100) * 300 / 100;
    let projects = q.projects.min(100) * 150 / 100;
    let profile = q.profile_permille.min(1000) * 150 / 1000;
    rating + reviews + projects + profile
}

/// Penalties stop compounding after this many events, so the weight has a floor above
/// zero (with the policy's `min_weight`): a pro with many declines or expiries still
/// gets its smaller share. The counts do not decay; a better response rate (R29) and
/// quality raise the weight again.
const MAX_PENALTY_EVENTS: u64 = 20;

/// The rotation weight of a pro, with every input, for `explain`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightBreakdown {
    pub quality_permille: u32,
    pub declines: u64,
    pub expiries: u64,
    pub weight: u32,
    /// The response rate the weight used (R29); `None` while too few offers count.
    /// (Last, and defaulted: snapshots from before it decode.)
    #[serde(default)]
    pub response_rate_permille: Option<u32>,
    /// The mean time to first response is above the policy's target (R29).
    #[serde(default)]
    pub slow_responder: bool,
}

pub fn weight(policy: &Policy, q: &Quality, stats: &ProStats) -> WeightBreakdown {
    let qp = quality_permille(q);
    let span = u64::from(policy.max_weight - policy.base_weight);
    let mut w = u64::from(policy.base_weight) + span * u64::from(qp) / 1000;
    let mut penalise = |n: u64, permille: u32| {
        for _ in 0..n.min(MAX_PENALTY_EVENTS) {
            w = w * u64::from(1000 - permille) / 1000;
        }
    };
    penalise(stats.declined, policy.decline_penalty_permille);
    penalise(stats.expired, policy.expiry_penalty_permille);
    // R29: responsiveness. The rate once enough offers count; the time once the pro
    // responded at all.
    let share = u64::from(policy.response_rate_share_permille.min(1000));
    let rate = (share > 0 && stats.rate_relevant >= u64::from(policy.response_rate_min_offers))
        .then(|| stats.response_rate_permille());
    if let Some(r) = rate {
        w = w * (1000 - share + share * u64::from(r) / 1000) / 1000;
    }
    let slow = policy
        .response_time_target
        .is_some_and(|t| stats.mean_response_time_ms().is_some_and(|m| m > t.max(0) as u64));
    if slow {
        w = w * u64::from(1000 - policy.slow_response_penalty_permille.min(1000)) / 1000;
    }
    let w = (w as u32).clamp(policy.min_weight, policy.max_weight);
    WeightBreakdown {
        quality_permille: qp,
        declines: stats.declined,
        expiries: stats.expired,
        response_rate_permille: rate,
        slow_responder: slow,
        weight: w,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r28_better_quality_earns_more_weight_within_bounds() {
        let p = Policy::shared_default("t");
        let none = weight(&p, &Quality::default(), &ProStats::default()).weight;
        let best = Quality { reviews: 500, rating_centi: 500, projects: 500, profile_permille: 1000 };
        let top = weight(&p, &best, &ProStats::default()).weight;
        assert_eq!(none, p.base_weight);
        assert_eq!(top, p.max_weight);
    }

    #[test]
    fn r14_r15_declines_and_expiries_lower_the_weight_but_never_below_min() {
        let p = Policy::shared_default("t");
        let q = Quality::default();
        let base = weight(&p, &q, &ProStats::default()).weight;
        let declined = weight(&p, &q, &ProStats { declined: 3, ..Default::default() }).weight;
        let expired = weight(&p, &q, &ProStats { expired: 3, ..Default::default() }).weight;
        assert!(declined < base && expired < declined, "{base} {declined} {expired}");
        let floor = weight(&p, &q, &ProStats { declined: 1000, expired: 1000, ..Default::default() });
        assert_eq!(floor.weight, p.min_weight);
    }

    #[test]
    fn r29_response_rate_and_time_to_first_response_feed_the_weight() {
        let p = Policy::shared_default("t");
        let q = Quality::default();
        let counted = |responded: u64, mean_ms: u64| ProStats {
            offered: 20,
            rate_relevant: 20,
            responded,
            response_time_ms_sum: responded * mean_ms,
            ..Default::default()
        };
        let new = weight(&p, &q, &ProStats { offered: 5, rate_relevant: 5, ..Default::default() });
        assert_eq!(
            (new.weight, new.response_rate_permille),
            (p.base_weight, None),
            "too few offers to judge"
        );
        let silent = weight(&p, &q, &counted(0, 0));
        let half = weight(&p, &q, &counted(10, 60_000));
        let diligent = weight(&p, &q, &counted(20, 60_000));
        assert_eq!(diligent.weight, p.base_weight, "answers every offer within the target");
        assert_eq!(silent.weight, p.base_weight * 800 / 1000, "answers none: keeps 1000 - the share");
        assert!(silent.weight < half.weight && half.weight < diligent.weight);
        assert_eq!(half.response_rate_permille, Some(500));
        let slow = weight(&p, &q, &counted(20, 2 * 86_400_000));
        assert!(slow.slow_responder && !diligent.slow_responder);
        assert_eq!(slow.weight, p.base_weight * 900 / 1000, "slower than the target on average");
        // Off when the policy says so.
        let mut off = p.clone();
        off.response_rate_share_permille = 0;
        off.response_time_target = None;
        let w = weight(&off, &q, &counted(0, 0));
        assert_eq!(w.weight, p.base_weight);
    }
}
