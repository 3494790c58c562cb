//! `--max-rate`: the highest lead rate whose p99 delivery latency stays within a bound.
//!
//! Doubling from the starting rate until a step fails (halving instead if the first
//! step fails), then bisecting between the last pass and the first failure. A step
//! passes when nothing fails a plain replay ([`Summary::failures`]: exactly-once, every
//! request answered once, a continuous stream, every planned request sent), p99
//! delivery <= the bound, at least 95% of the target rate was acknowledged and errors
//! stayed under 1%. Each step is a fresh replay (its own run tag), so steps do not
//! share leads.

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
    /// What the verdict bounds: p99 delivery with refused leads counted above the bound.
    pub delivery_p99_counting_refused_ms: f64,
    pub leads_refused: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SearchResult {
    pub p99_bound_ms: f64,
    pub best_rate: Option<f64>,
    pub steps: Vec<Step>,
    pub best: Option<Summary>,
}

/// Whether a step passes, and why not. First every check a plain replay fails on
/// ([`Summary::failures`]: exactly-once, unanswered or twice-answered requests, stream
/// gaps or a stream closed by the daemon, requests never sent), then the search's own
/// bounds.
pub fn verdict(s: &Summary, bound_ms: f64) -> (bool, String) {
    let failures = s.failures();
    if !failures.is_empty() {
        return (false, failures.join("; "));
    }
    let errors: u64 = s.errors_by_code.values().sum();
    if s.delivery.count == 0 {
        return (false, "no deliveries measured".into());
    }
    // Refused leads count as delivered above the bound: shedding is not a way to
    // keep the tail short.
    let p99 = s.delivery_counting_refused.p99;
    if p99 > bound_ms {
        if s.leads_refused > 0 {
            return (
                false,
                format!(
                    "p99 delivery {p99:.2} ms > {bound_ms} ms, counting the {} leads refused with an error \
                     as above the bound (p99 of the delivered ones {:.2} ms)",
                    s.leads_refused, s.delivery.p99
                ),
            );
        }
        return (false, format!("p99 delivery {p99:.2} ms > {bound_ms} ms"));
    }
    if s.achieved_leads_per_s < 0.95 * s.target_leads_per_s {
        return (
            false,
            format!("achieved {:.0}/s < 95% of {:.0}/s", s.achieved_leads_per_s, s.target_leads_per_s),
        );
    }
    if errors * 100 > s.sent.max(1) {
        return (false, format!("{errors} errors (over 1%)"));
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
    // Without a duration each step is one pass of the trace, shorter the higher the rate.
    anyhow::ensure!(base.duration.is_some(), "--max-rate needs --duration (how long each step sends)");
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
            delivery_p99_counting_refused_ms: s.delivery_counting_refused.p99,
            leads_refused: s.leads_refused,
        });
        if pass && best.as_ref().is_none_or(|b| b.target_leads_per_s < rate) {
            best = Some(s);
        }
        // Let the daemon settle between steps.
        std::thread::sleep(std::time::Duration::from_secs(1));
        Ok(pass)
    };
    let best_rate = search_rates(start_rate, ceiling, bisect_steps, |rate| run(rate, &mut steps))?;
    Ok(SearchResult { p99_bound_ms: bound_ms, best_rate, steps, best })
}

/// The search itself, over any `passes(rate)`: doubling from `start_rate` while steps
/// pass (up to `ceiling`); if the very first step fails, halving instead until one
/// passes (down to `start_rate / 64`: a host that cannot even do that has nothing to
/// report); then bisecting between the best pass and the lowest failure, at most
/// `bisect_steps` times, stopping when they are within 5 %. At most [`MAX_STEPS`]
/// steps in all. Returns the highest rate that passed.
fn search_rates(
    start_rate: f64,
    ceiling: f64,
    bisect_steps: u32,
    mut passes: impl FnMut(f64) -> anyhow::Result<bool>,
) -> anyhow::Result<Option<f64>> {
    let tries = std::cell::Cell::new(0usize);
    let mut step = |rate: f64| {
        tries.set(tries.get() + 1);
        passes(rate)
    };
    let (mut lo, mut hi) = (0.0f64, None::<f64>);
    let mut rate = start_rate;
    loop {
        if step(rate)? {
            lo = rate;
            if rate >= ceiling || tries.get() >= MAX_STEPS {
                break;
            }
            rate = (rate * 2.0).min(ceiling);
        } else {
            hi = Some(rate);
            break;
        }
    }
    if lo == 0.0 {
        let floor = start_rate / 64.0;
        let mut down = (start_rate / 2.0).round();
        while down >= floor && down >= 1.0 && tries.get() < MAX_STEPS {
            if step(down)? {
                lo = down;
                break;
            }
            hi = Some(down);
            down = (down / 2.0).round();
        }
    }
    if let Some(mut h) = hi {
        for _ in 0..bisect_steps {
            if tries.get() >= MAX_STEPS || lo <= 0.0 || h / lo < 1.05 {
                break;
            }
            let mid = ((lo + h) / 2.0).round();
            if step(mid)? {
                lo = mid;
            } else {
                h = mid;
            }
        }
    }
    Ok((lo > 0.0).then_some(lo))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replay::Percentiles;

    /// A step at 1,000 leads/s that met every bound.
    fn good_step() -> Summary {
        Summary {
            target_leads_per_s: 1_000.0,
            achieved_leads_per_s: 1_000.0,
            sent: 10_000,
            sent_leads: 5_000,
            replies: 10_000,
            delivery: Percentiles { count: 5_000, p50: 0.5, p99: 1.0, ..Default::default() },
            delivery_counting_refused: Percentiles { count: 5_000, p50: 0.5, p99: 1.0, ..Default::default() },
            ..Default::default()
        }
    }

    #[test]
    fn a_step_fails_on_whatever_fails_a_replay() {
        assert_eq!(verdict(&good_step(), 3.0), (true, "ok".to_string()));
        let broken = [
            Summary { stream_seq_gaps: 1, ..good_step() },
            Summary { stream_closed_early: true, ..good_step() },
            Summary { duplicate_replies: 1, ..good_step() },
            Summary { missing_replies: 1, ..good_step() },
            Summary { not_sent: 1, ..good_step() },
        ];
        for s in broken {
            let failures = s.failures();
            assert!(!failures.is_empty(), "a replay fails on {s:?}");
            let (pass, why) = verdict(&s, 3.0);
            assert!(!pass, "a step passed with {failures:?}");
            assert_eq!(why, failures.join("; "));
        }
    }

    /// A host that passes every rate up to `capacity`, recording what was tried.
    fn against(capacity: f64, start: f64, bisect: u32) -> (Option<f64>, Vec<f64>) {
        let mut tried = Vec::new();
        let best = search_rates(start, 200_000.0, bisect, |r| {
            tried.push(r);
            Ok(r <= capacity)
        })
        .unwrap();
        (best, tried)
    }

    #[test]
    fn doubles_while_passing_then_bisects_below_the_first_failure() {
        let (best, tried) = against(12_345.0, 5_000.0, 4);
        assert_eq!(&tried[..3], &[5_000.0, 10_000.0, 20_000.0]);
        let best = best.unwrap();
        assert!((11_000.0..=12_345.0).contains(&best), "{best} from {tried:?}");
    }

    #[test]
    fn a_failing_first_step_searches_downward_instead_of_giving_up() {
        let (best, tried) = against(700.0, 5_000.0, 4);
        assert_eq!(&tried[..4], &[5_000.0, 2_500.0, 1_250.0, 625.0]);
        let best = best.unwrap();
        assert!((625.0..=700.0).contains(&best), "{best} from {tried:?}");
        // Nothing passes above the floor (start / 64): no rate to report.
        let (best, tried) = against(10.0, 5_000.0, 4);
        assert_eq!(best, None, "{tried:?}");
        assert!(tried.iter().all(|&r| r >= 5_000.0 / 64.0), "{tried:?}");
    }

    #[test]
    fn never_more_than_the_step_budget() {
        let (_, tried) = against(f64::INFINITY, 1.0, 100);
        assert!(tried.len() <= MAX_STEPS, "{}", tried.len());
    }
}
