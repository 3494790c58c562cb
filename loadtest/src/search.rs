//! `--max-rate`: the highest lead rate whose p99 delivery latency stays within a bound.
//!
//! Doubling from the starting rate until a step fails (halving instead if the first
//! step fails), then bisecting between the last pass and the first failure. A step
//! passes when nothing fails a plain replay ([`Summary::failures`]: exactly-once, every
//! request answered once, a continuous stream, every planned request sent, every frame
//! read), p99 delivery <= the bound, at least 95% of the target rate was acknowledged
//! and errors stayed under 1%. Each step is a fresh replay (its own run tag), so steps
//! do not share leads.

use crate::replay::{self, ReplayConfig, Summary};
use crate::schedule::Pacing;
use crate::trace::Record;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub rate: f64,
    pub pass: bool,
    pub why: String,
    /// The replay could not run (`why` says why); counted as a failed step.
    pub error: bool,
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
    /// Set when steps that could not run stopped the search before it finished:
    /// `best_rate` is then only what the steps before found.
    pub stopped: Option<String>,
}

/// Whether a step passes, and why not. First every check a plain replay fails on
/// ([`Summary::failures`]: exactly-once, unanswered or twice-answered requests, stream
/// gaps or a stream closed by the daemon, requests never sent, frames the tool could
/// not read), then the search's own bounds.
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
/// Steps in a row that end in an error (the replay could not run: a failed connect,
/// a setup without replies) before the search stops: the daemon is gone, not slow.
const MAX_ERRORS_IN_A_ROW: u32 = 3;

/// How one step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StepOutcome {
    Pass,
    Fail,
    /// The replay did not run to a verdict; the step counts as failed.
    Error,
}

pub fn max_rate(
    base: &ReplayConfig,
    records: &[Record],
    start_rate: f64,
    ceiling: f64,
    bisect_steps: u32,
    bound_ms: f64,
) -> anyhow::Result<SearchResult> {
    anyhow::ensure!(start_rate > 0.0 && ceiling >= start_rate, "need 0 < start rate <= ceiling");
    anyhow::ensure!(
        bound_ms.is_finite() && bound_ms > 0.0,
        "--p99-bound-ms must be a finite number of milliseconds above 0, not {bound_ms}"
    );
    // Without a duration each step is one pass of the trace, shorter the higher the rate.
    anyhow::ensure!(base.duration.is_some(), "--max-rate needs --duration (how long each step sends)");
    let mut steps = Vec::new();
    let mut best: Option<Summary> = None;
    let mut run = |rate: f64, steps: &mut Vec<Step>| -> StepOutcome {
        let mut cfg = base.clone();
        cfg.pacing = Pacing::Rate(rate);
        cfg.run_tag = format!("{}-s{}", base.run_tag, steps.len());
        let outcome = match replay::run(&cfg, records) {
            Ok(o) => {
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
                    error: false,
                    achieved: s.achieved_leads_per_s,
                    ack_p99_ms: s.ack.p99,
                    delivery_p99_ms: s.delivery.p99,
                    delivery_p99_counting_refused_ms: s.delivery_counting_refused.p99,
                    leads_refused: s.leads_refused,
                });
                if pass && best.as_ref().is_none_or(|b| b.target_leads_per_s < rate) {
                    best = Some(s);
                }
                if pass {
                    StepOutcome::Pass
                } else {
                    StepOutcome::Fail
                }
            }
            // Recorded as a failed step; the search goes on (and stops after a few in a
            // row), keeping what the steps before it found.
            Err(e) => {
                eprintln!("rate {rate:>9.0}/s: FAIL (the step could not run: {e:#})");
                steps.push(Step {
                    rate,
                    pass: false,
                    why: format!("error: {e:#}"),
                    error: true,
                    achieved: 0.0,
                    ack_p99_ms: 0.0,
                    delivery_p99_ms: 0.0,
                    delivery_p99_counting_refused_ms: 0.0,
                    leads_refused: 0,
                });
                StepOutcome::Error
            }
        };
        // Let the daemon settle between steps.
        std::thread::sleep(std::time::Duration::from_secs(1));
        outcome
    };
    let (best_rate, gave_up) = search_rates(start_rate, ceiling, bisect_steps, |rate| run(rate, &mut steps));
    let stopped = gave_up
        .then(|| format!("{MAX_ERRORS_IN_A_ROW} steps in a row could not run; the search stopped there"));
    Ok(SearchResult { p99_bound_ms: bound_ms, best_rate, steps, best, stopped })
}

/// Runs the steps of one search within its bounds.
struct Stepper<F> {
    f: F,
    tries: usize,
    errors_in_a_row: u32,
}

impl<F: FnMut(f64) -> StepOutcome> Stepper<F> {
    /// Whether the step at `rate` passed; `None` when the search must stop instead
    /// ([`MAX_STEPS`] spent, or [`MAX_ERRORS_IN_A_ROW`] errors in a row).
    fn step(&mut self, rate: f64) -> Option<bool> {
        if self.tries >= MAX_STEPS || self.errors_in_a_row >= MAX_ERRORS_IN_A_ROW {
            return None;
        }
        self.tries += 1;
        let outcome = (self.f)(rate);
        self.errors_in_a_row = if outcome == StepOutcome::Error { self.errors_in_a_row + 1 } else { 0 };
        Some(outcome == StepOutcome::Pass)
    }
}

/// The search itself, over any `step(rate)`: doubling from `start_rate` while steps
/// pass (up to `ceiling`); if the very first step fails, halving instead until one
/// passes (down to `start_rate / 64`: a host that cannot even do that has nothing to
/// report); then bisecting between the best pass and the lowest failure, at most
/// `bisect_steps` times, stopping when they are within 5 %. Rates are whole numbers,
/// and none is tried twice in a row: the search stops when halving or bisecting would
/// repeat the last rate. A step that ends in an error counts as failed; after
/// [`MAX_ERRORS_IN_A_ROW`] in a row the search stops. At most [`MAX_STEPS`] steps in
/// all. Returns the highest rate that passed, and whether errors stopped the search.
fn search_rates(
    start_rate: f64,
    ceiling: f64,
    bisect_steps: u32,
    step: impl FnMut(f64) -> StepOutcome,
) -> (Option<f64>, bool) {
    let mut s = Stepper { f: step, tries: 0, errors_in_a_row: 0 };
    let (mut lo, mut hi) = (0.0f64, None::<f64>);
    let mut rate = start_rate;
    loop {
        match s.step(rate) {
            Some(true) => {
                lo = rate;
                if rate >= ceiling {
                    break;
                }
                rate = (rate * 2.0).min(ceiling);
            }
            Some(false) => {
                hi = Some(rate);
                break;
            }
            None => break,
        }
    }
    if lo == 0.0 && hi.is_some() {
        let floor = start_rate / 64.0;
        let mut last = start_rate;
        loop {
            let down = (last / 2.0).round();
            // Rounding 0.5 up to 1 would try rate 1 again and again.
            if down < floor || down < 1.0 || down == last {
                break;
            }
            match s.step(down) {
                Some(true) => {
                    lo = down;
                    break;
                }
                Some(false) => {
                    hi = Some(down);
                    last = down;
                }
                None => break,
            }
        }
    }
    if let Some(mut h) = hi {
        for _ in 0..bisect_steps {
            if lo <= 0.0 || h / lo < 1.05 {
                break;
            }
            let mid = ((lo + h) / 2.0).round();
            if mid <= lo || mid >= h {
                break;
            }
            match s.step(mid) {
                Some(true) => lo = mid,
                Some(false) => h = mid,
                None => break,
            }
        }
    }
    ((lo > 0.0).then_some(lo), s.errors_in_a_row >= MAX_ERRORS_IN_A_ROW)
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
            Summary { errors_by_code: [(replay::UNREADABLE_EVENT.to_string(), 1)].into(), ..good_step() },
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
        let (best, gave_up) = search_rates(start, 200_000.0, bisect, |r| {
            tried.push(r);
            if r <= capacity {
                StepOutcome::Pass
            } else {
                StepOutcome::Fail
            }
        });
        assert!(!gave_up);
        (best, tried)
    }

    #[test]
    fn a_low_start_rate_does_not_retry_the_same_rate() {
        for start in [1.0, 2.0, 3.0] {
            let (best, tried) = against(0.0, start, 4);
            assert_eq!(best, None);
            let mut distinct = tried.clone();
            distinct.dedup();
            assert_eq!(distinct, tried, "start {start}: a rate tried twice in a row");
            assert!(tried.len() <= 3, "start {start}: {tried:?}");
        }
        let (_, tried) = against(0.0, 3.0, 4);
        assert_eq!(tried, vec![3.0, 2.0, 1.0]);
        // Bisecting between two neighbours has nothing left to try either.
        let (best, tried) = against(1.0, 2.0, 10);
        assert_eq!((best, tried), (Some(1.0), vec![2.0, 1.0]));
    }

    #[test]
    fn a_step_that_cannot_run_counts_as_failed_and_the_search_goes_on() {
        // The first try at 20,000/s cannot connect; the search bisects below it.
        let mut tried = Vec::new();
        let (best, gave_up) = search_rates(5_000.0, 200_000.0, 4, |r| {
            tried.push(r);
            match r {
                20_000.0 => StepOutcome::Error,
                r if r <= 12_345.0 => StepOutcome::Pass,
                _ => StepOutcome::Fail,
            }
        });
        assert!(!gave_up);
        assert!(tried.len() > 3, "{tried:?}");
        assert!((11_000.0..=12_345.0).contains(&best.unwrap()), "{best:?} from {tried:?}");
    }

    #[test]
    fn repeated_step_errors_stop_the_search_with_what_it_found() {
        // The daemon went away after 10,000/s passed.
        let mut tried = Vec::new();
        let (best, gave_up) = search_rates(5_000.0, 200_000.0, 4, |r| {
            tried.push(r);
            if r <= 10_000.0 && tried.len() <= 2 {
                StepOutcome::Pass
            } else {
                StepOutcome::Error
            }
        });
        assert!(gave_up);
        assert_eq!(best, Some(10_000.0));
        assert_eq!(tried.len(), 2 + MAX_ERRORS_IN_A_ROW as usize, "{tried:?}");
    }

    /// Against a port nobody listens on every step fails to connect: the steps are
    /// recorded as failed and the search stops after a few, instead of ending in an
    /// error that loses them.
    #[test]
    fn max_rate_records_steps_that_cannot_connect() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cfg = ReplayConfig {
            duration: Some(std::time::Duration::from_millis(100)),
            drain: std::time::Duration::from_secs(1),
            batch: std::time::Duration::from_micros(50),
            run_tag: "t".into(),
            ..ReplayConfig::new(format!("ws://127.0.0.1:{port}"), "t", Pacing::Rate(100.0))
        };
        let (records, _) = crate::gen::generate(&crate::gen::GenConfig { leads: 10, ..Default::default() });
        let res = max_rate(&cfg, &records, 100.0, 1_000.0, 2, 3.0).expect("the search reports its steps");
        assert_eq!(res.best_rate, None);
        assert_eq!(res.steps.len(), MAX_ERRORS_IN_A_ROW as usize, "{:?}", res.steps);
        assert!(
            res.steps.iter().all(|s| s.error && !s.pass && s.why.contains("connecting")),
            "{:?}",
            res.steps
        );
        assert!(res.stopped.is_some());
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
