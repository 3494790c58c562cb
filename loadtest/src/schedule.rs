//! The open-loop schedule: when each request is *meant* to be sent.
//!
//! Intended times are fixed before the run from the trace and the pacing, never from
//! replies; latency is measured from them, so a daemon that stalls is charged for
//! every request that should have gone out meanwhile (coordinated omission corrected,
//! as wrk2 does).
//!
//! Pacing: `Speed(x)` keeps the trace's own timeline (bursts included) x times faster;
//! `Rate(r)` spaces the records evenly so that leads go out at `r` per second (other
//! records keep their share of the trace; the tail after the last lead keeps its
//! trace distance from that lead). With a duration the trace is replayed in laps until
//! the duration is reached.

/// How to turn trace time into replay time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pacing {
    /// The trace's timeline, this many times faster (1.0 = as recorded).
    Speed(f64),
    /// Evenly spaced records, this many leads per second.
    Rate(f64),
}

/// One timed record of the trace as the planner sees it.
#[derive(Debug, Clone, Copy)]
pub struct TimedRecord {
    pub at_ms: u64,
    pub is_lead: bool,
}

/// One send: trace record `rec` (index among the timed records) in lap `lap`,
/// intended `t_ns` after the start of the timed phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanItem {
    pub t_ns: u64,
    pub rec: u32,
    pub lap: u32,
    /// Dense lead ordinal (`lap * leads_per_lap + position`) for publishes, else `u32::MAX`.
    pub lead_ord: u32,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub items: Vec<PlanItem>,
    /// Plan index of each lead ordinal's publish.
    pub lead_item: Vec<u32>,
    pub leads_per_lap: u32,
    /// Trace milliseconds per replay millisecond (e.g. 10.0 at `--speed 10x`).
    pub speedup: f64,
    /// Intended duration of the timed phase.
    pub span_ns: u64,
}

/// Largest plan accepted: bounds memory whatever the flags say.
pub const MAX_ITEMS: usize = 40_000_000;
/// Most laps of the trace one plan replays (a very short trace and a long duration):
/// a duration that needs more is refused, not cut short.
pub const MAX_LAPS: u32 = 100_000;

pub fn plan(timed: &[TimedRecord], pacing: Pacing, duration_ns: Option<u64>) -> anyhow::Result<Plan> {
    anyhow::ensure!(!timed.is_empty(), "the trace has no timed records (nothing after the setup)");
    let leads_per_lap = timed.iter().filter(|r| r.is_lead).count() as u32;
    anyhow::ensure!(leads_per_lap > 0, "the trace has no publish_lead records");
    let first = timed[0].at_ms;
    let last = timed[timed.len() - 1].at_ms;
    let trace_span_ms = (last - first) as f64;
    // One lap's length on the trace clock: the span plus one mean gap, so the first
    // record of the next lap does not land on the last of this one.
    let lap_ms = trace_span_ms + (trace_span_ms / timed.len() as f64).max(1.0);
    let trace_lead_rate = f64::from(leads_per_lap) / (lap_ms / 1000.0);
    let (speedup, step_ns) = match pacing {
        Pacing::Speed(x) => {
            anyhow::ensure!(x > 0.0 && x.is_finite(), "speed must be a positive number");
            (x, 0.0)
        }
        Pacing::Rate(r) => {
            anyhow::ensure!(r > 0.0 && r.is_finite(), "rate must be a positive number");
            (r / trace_lead_rate, 1e9 / r)
        }
    };
    // Rate pacing: lead j at j / r; the m other records between lead j and lead j+1
    // evenly in between, so leads go out at exactly r whatever the trace's local mix.
    // The records after a lap's last lead (replies to its last leads, seconds of trace
    // time) keep their trace distance from that lead, scaled like the rest; they
    // overlap the next lap's first leads instead of all landing in one gap.
    let last_lead = timed.iter().rposition(|r| r.is_lead).expect("a lead was counted above");
    // The tail is scaled by the lead density of the lap's leads (the trace's own
    // rate while it publishes), not by the lap's average, which the tail dilutes.
    let first_lead = timed.iter().position(|r| r.is_lead).expect("a lead was counted above");
    let lead_span_ms = (timed[last_lead].at_ms - timed[first_lead].at_ms) as f64;
    let tail_speedup = match pacing {
        Pacing::Rate(r) if leads_per_lap > 1 && lead_span_ms > 0.0 => {
            r / (f64::from(leads_per_lap - 1) / (lead_span_ms / 1000.0))
        }
        _ => speedup,
    };
    let mut between = vec![0u32; timed.len()];
    let mut rank = vec![0u32; timed.len()];
    {
        let mut group_start = 0;
        for (i, r) in timed.iter().enumerate().take(last_lead + 1) {
            if r.is_lead {
                let m = (i - group_start) as u32;
                for (k, j) in (group_start..i).enumerate() {
                    between[j] = m;
                    rank[j] = k as u32 + 1;
                }
                group_start = i + 1;
            }
        }
    }
    let laps = if duration_ns.is_some() { MAX_LAPS } else { 1 };
    let mut leads_seen: u64 = 0;
    let mut items = Vec::new();
    let mut lead_item = Vec::new();
    let mut reached_duration = duration_ns.is_none();
    'laps: for lap in 0..laps {
        let mut pos = 0u32;
        for (i, r) in timed.iter().enumerate() {
            let t_ns = match pacing {
                Pacing::Speed(x) => {
                    let trace_ms = f64::from(lap) * lap_ms + (r.at_ms - first) as f64;
                    (trace_ms / x * 1e6) as u64
                }
                Pacing::Rate(_) if r.is_lead => (leads_seen as f64 * step_ns) as u64,
                Pacing::Rate(_) if i > last_lead => {
                    let since_ms = (r.at_ms - timed[last_lead].at_ms) as f64;
                    ((leads_seen as f64 - 1.0) * step_ns + since_ms * 1e6 / tail_speedup) as u64
                }
                Pacing::Rate(_) => {
                    // After lead `leads_seen - 1`, before lead `leads_seen`.
                    let base = leads_seen as f64 - 1.0;
                    let frac = f64::from(rank[i]) / f64::from(between[i] + 1);
                    ((base + frac).max(0.0) * step_ns) as u64
                }
            };
            if duration_ns.is_some_and(|d| t_ns >= d) {
                // Times rise monotonically except for a lap's tail (see above).
                if matches!(pacing, Pacing::Rate(_)) && i > last_lead {
                    continue;
                }
                reached_duration = true;
                break 'laps;
            }
            anyhow::ensure!(items.len() < MAX_ITEMS, "more than {MAX_ITEMS} sends planned; shorten the run");
            let lead_ord = if r.is_lead {
                let ord = u64::from(lap) * u64::from(leads_per_lap) + u64::from(pos);
                anyhow::ensure!(ord < u64::from(u32::MAX), "too many leads planned");
                pos += 1;
                leads_seen += 1;
                lead_item.push(items.len() as u32);
                ord as u32
            } else {
                u32::MAX
            };
            items.push(PlanItem { t_ns, rec: i as u32, lap, lead_ord });
        }
    }
    if !reached_duration {
        // The laps ran out first: the run would stop early without a word.
        let planned_ms = items.last().map_or(0, |it| it.t_ns / 1_000_000);
        anyhow::bail!(
            "--duration {:.1} s needs more than {MAX_LAPS} laps of this trace ({MAX_LAPS} laps last \
             {:.1} s at this pace): use a longer trace, a slower pace or a shorter --duration",
            duration_ns.unwrap_or(0) as f64 / 1e9,
            planned_ms as f64 / 1e3
        );
    }
    if matches!(pacing, Pacing::Rate(_)) && laps > 1 {
        // A lap's tail interleaves with the next lap's first records.
        items.sort_by_key(|it| it.t_ns);
        lead_item.clear();
        lead_item.extend(
            items.iter().enumerate().filter(|(_, it)| it.lead_ord != u32::MAX).map(|(k, _)| k as u32),
        );
    }
    let span_ns = match (duration_ns, items.last()) {
        (Some(d), _) => d,
        (None, Some(l)) => l.t_ns,
        (None, None) => 0,
    };
    Ok(Plan { items, lead_item, leads_per_lap, speedup, span_ns })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recs(ats: &[(u64, bool)]) -> Vec<TimedRecord> {
        ats.iter().map(|&(at_ms, is_lead)| TimedRecord { at_ms, is_lead }).collect()
    }

    #[test]
    fn speed_scales_the_trace_timeline_from_its_first_record() {
        let t = recs(&[(100, true), (110, false), (300, true)]);
        let p = plan(&t, Pacing::Speed(10.0), None).unwrap();
        let ts: Vec<u64> = p.items.iter().map(|i| i.t_ns).collect();
        assert_eq!(ts, vec![0, 1_000_000, 20_000_000]);
        assert_eq!(p.speedup, 10.0);
        assert_eq!(p.lead_item, vec![0, 2]);
        assert_eq!(p.items[1].lead_ord, u32::MAX);
        let p = plan(&t, Pacing::Speed(0.5), None).unwrap();
        assert_eq!(p.items[2].t_ns, 400_000_000);
    }

    #[test]
    fn rate_spaces_records_evenly_so_leads_go_at_the_rate() {
        // Leads at exactly 1 ms apart; the records between two leads share the gap.
        let t = recs(&[(0, true), (1, false), (2, false), (5, true), (9, true), (12, false)]);
        let p = plan(&t, Pacing::Rate(1_000.0), None).unwrap();
        let ts: Vec<u64> = p.items.iter().map(|i| i.t_ns).collect();
        // The record after the last lead keeps its trace distance (3 ms) at the leads'
        // own pace (2 leads in 9 ms of trace time, here 2 ms).
        assert_eq!(ts, vec![0, 333_333, 666_666, 1_000_000, 2_000_000, 2_666_666]);
    }

    #[test]
    fn rate_keeps_the_trace_distance_of_records_after_the_last_lead() {
        // Two leads 1 ms apart in the trace, then replies 1 and 4 ms after the last one.
        // At 1,000 leads/s the trace runs at its own speed: the replies go 1 and 4 ms
        // after the last lead, not both squeezed into the next lead gap.
        let t = recs(&[(0, true), (1, true), (2, false), (5, false)]);
        let p = plan(&t, Pacing::Rate(1_000.0), None).unwrap();
        let ts: Vec<u64> = p.items.iter().map(|i| i.t_ns / 1_000).collect();
        assert_eq!(ts, vec![0, 1_000, 2_000, 5_000]);
        // In laps, the tail of one lap overlaps the next lap's first leads, times stay
        // ordered and lead ordinals map to their publishes.
        let p = plan(&t, Pacing::Rate(1_000.0), Some(6_000_000)).unwrap();
        let got: Vec<(u64, u32, bool)> =
            p.items.iter().map(|i| (i.t_ns / 1_000, i.lap, i.lead_ord != u32::MAX)).collect();
        assert_eq!(
            got,
            vec![
                (0, 0, true),
                (1_000, 0, true),
                (2_000, 0, false),
                (2_000, 1, true),
                (3_000, 1, true),
                (4_000, 1, false),
                (4_000, 2, true),
                (5_000, 0, false),
                (5_000, 2, true),
            ]
        );
        for (ord, &k) in p.lead_item.iter().enumerate() {
            assert_eq!(p.items[k as usize].lead_ord, ord as u32);
        }
    }

    #[test]
    fn a_duration_replays_the_trace_in_laps_with_fresh_lead_ordinals() {
        let t = recs(&[(0, true), (10, true)]);
        // Lap length = span 10 ms + one mean gap 5 ms = 15 ms of trace time.
        let p = plan(&t, Pacing::Speed(1.0), Some(40_000_000)).unwrap();
        let got: Vec<(u64, u32, u32)> =
            p.items.iter().map(|i| (i.t_ns / 1_000_000, i.lap, i.lead_ord)).collect();
        assert_eq!(got, vec![(0, 0, 0), (10, 0, 1), (15, 1, 2), (25, 1, 3), (30, 2, 4)]);
        assert_eq!(p.span_ns, 40_000_000);
        assert!(p.items.windows(2).all(|w| w[0].t_ns <= w[1].t_ns), "intended times never go back");
    }

    #[test]
    fn intended_times_do_not_depend_on_anything_but_trace_and_pacing() {
        let t = recs(&[(0, true), (3, false), (7, true)]);
        let a = plan(&t, Pacing::Rate(20_000.0), Some(1_000_000_000)).unwrap();
        let b = plan(&t, Pacing::Rate(20_000.0), Some(1_000_000_000)).unwrap();
        assert_eq!(a.items, b.items);
        // 20,000 leads/s for one second.
        assert_eq!(a.lead_item.len(), 20_000);
    }

    #[test]
    fn a_duration_beyond_the_lap_limit_is_refused_not_cut_short() {
        // One record: a lap is 1 ms of trace time, so 200 s at 1x is 200,000 laps.
        let t = recs(&[(0, true)]);
        let e = plan(&t, Pacing::Speed(1.0), Some(200_000_000_000)).unwrap_err().to_string();
        assert!(e.contains("--duration") && e.contains("laps"), "{e}");
        // Within the limit it plans the whole duration.
        let p = plan(&t, Pacing::Speed(1.0), Some(50_000_000_000)).unwrap();
        assert_eq!(p.lead_item.len(), 50_000);
        // Rate pacing is not bound to the trace's own timeline, but to its laps all the same.
        assert!(plan(&t, Pacing::Rate(1_000_000.0), Some(1_000_000_000)).is_err());
    }

    #[test]
    fn bad_pacing_is_refused() {
        let t = recs(&[(0, true)]);
        assert!(plan(&t, Pacing::Rate(0.0), None).is_err());
        assert!(plan(&t, Pacing::Speed(-1.0), None).is_err());
        assert!(plan(&[], Pacing::Speed(1.0), None).is_err());
    }
}
