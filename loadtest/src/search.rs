//! `--max-rate`: the highest lead rate whose p99 delivery latency stays within a bound.
//!
//! Doubling from the starting rate until a step fails, then bisecting between the last
//! pass and the first failure. A step passes when p99 delivery <= the bound, at least
//! 95% of the target rate was acknowledged, every request got a reply, errors stayed
//! under 1% and the exactly-once checks found nothing. Each step is a fresh replay
//! (its own run tag), so steps do not share leads.

use crate::replay::{self, ReplayConfig, Summary};
use crate::schedule::Pacing;
use crate::trace::Record;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub rate: f64,
    pub pass: bool,
    pub why: String,
    pub achieved: f64,
    pub ack_p99_ms: f64,
    pub delivery_p99_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SearchResult {
    pub p99_bound_ms: f64,
    pub best_rate: Option<f64>,
    pub steps: Vec<Step>,
    pub best: Option<Summary>,
}

pub fn verdict(s: &Summary, bound_ms: f64) -> (bool, String) {
    let errors: u64 = s.errors_by_code.values().sum();
    if s.delivery.count == 0 {
        return (false, "no deliveries measured".into());
    }
    if s.delivery.p99 > bound_ms {
        return (false, format!("p99 delivery {:.2} ms > {bound_ms} ms", s.delivery.p99));
    }
    if s.achieved_leads_per_s < 0.95 * s.target_leads_per_s {
        return (
            false,
            format!("achieved {:.0}/s < 95% of {:.0}/s", s.achieved_leads_per_s, s.target_leads_per_s),
        );
    }
    if s.missing_replies > 0 {
        return (false, format!("{} requests unanswered", s.missing_replies));
    }
    if errors * 100 > s.sent.max(1) {
        return (false, format!("{errors} errors (over 1%)"));
    }
    if s.violations.total() > 0 {
        return (false, format!("{} exactly-once violations", s.violations.total()));
    }
    (true, "ok".into())
}

/// Most replays one search makes.
const MAX_STEPS: usize = 24;

pub fn max_rate(
    base: &ReplayConfig,
    records: &[Record],
    start_rate: f64,
    ceiling: f64,
    bisect_steps: u32,
    bound_ms: f64,
) -> anyhow::Result<SearchResult> {
    anyhow::ensure!(start_rate > 0.0 && ceiling >= start_rate, "need 0 < start rate <= ceiling");
    let mut steps = Vec::new();
    let mut best: Option<Summary> = None;
    let mut run = |rate: f64, steps: &mut Vec<Step>| -> anyhow::Result<bool> {
        let mut cfg = base.clone();
        cfg.pacing = Pacing::Rate(rate);
        cfg.run_tag = format!("{}-s{}", base.run_tag, steps.len());
        let o = replay::run(&cfg, records)?;
        let s = o.summary;
        let (pass, why) = verdict(&s, bound_ms);
        let busy = s.host.as_ref().map_or(String::new(), |h| {
            format!(", cores busy {:.2} of {} (tool {:.2})", h.busy_cores, h.cpus, h.tool_cores)
        });
        eprintln!(
            "rate {rate:>9.0}/s: {} ({why}); achieved {:.0}/s, ack p99 {:.2} ms, delivery p99 {:.2} ms{busy}",
            if pass { "pass" } else { "FAIL" },
            s.achieved_leads_per_s,
            s.ack.p99,
            s.delivery.p99
        );
        steps.push(Step {
            rate,
            pass,
            why,
            achieved: s.achieved_leads_per_s,
            ack_p99_ms: s.ack.p99,
            delivery_p99_ms: s.delivery.p99,
        });
        if pass && best.as_ref().is_none_or(|b| b.target_leads_per_s < rate) {
            best = Some(s);
        }
        // Let the daemon settle between steps.
        std::thread::sleep(std::time::Duration::from_secs(1));
        Ok(pass)
    };
    let (mut lo, mut hi) = (0.0f64, None::<f64>);
    let mut rate = start_rate;
    while steps.len() < MAX_STEPS {
        if run(rate, &mut steps)? {
            lo = rate;
            if rate >= ceiling {
                break;
            }
            rate = (rate * 2.0).min(ceiling);
        } else {
            hi = Some(rate);
            break;
        }
    }
    if let Some(mut h) = hi {
        for _ in 0..bisect_steps {
            if steps.len() >= MAX_STEPS || lo <= 0.0 || h / lo < 1.05 {
                break;
            }
            let mid = ((lo + h) / 2.0).round();
            if run(mid, &mut steps)? {
                lo = mid;
            } else {
                h = mid;
            }
        }
    }
    Ok(SearchResult { p99_bound_ms: bound_ms, best_rate: (lo > 0.0).then_some(lo), steps, best })
}
