//! The fairness figure (R21, R28) over a window: what each pro was offered in a shard
//! during the last [`WINDOW`], against what its weight entitles it to among the pros
//! rotating there (`rota_fairness_*`).
//!
//! Counted over a window, not a lifetime: a pro that worked a shard alone for months,
//! or joined it yesterday, or took a week's vacation, is judged by the last minute, in
//! which the rotation owes it its weight's share, not by history it cannot change.
//! Left out of a window: pros parked out of the rotation when it ends (a vacation, a
//! spent budget: entitled to nothing meanwhile), pros that were not in the shard when
//! it started, and shards offered fewer than [`MIN_OFFERS`] leads in it (a handful of
//! offers is noise, not unfairness). A pro parked for part of the window and back
//! before its end is judged on the whole of it (the figure reads high for it then).

use crate::ids::{ProId, ShardKey};
use rustc_hash::FxHashMap;
use std::time::{Duration, Instant};

/// How long one evaluation window lasts.
pub const WINDOW: Duration = Duration::from_secs(60);

/// Offers a shard must make in a window to be judged.
pub const MIN_OFFERS: u64 = 20;

/// One pro of a shard at the end of a window: its lifetime offered count, its weight,
/// and whether it is parked now.
pub type Input<'a> = (&'a ProId, u64, u32, bool);

/// The lifetime offered counts of every shard's pros when the current window started.
#[derive(Default)]
pub struct FairnessWindow {
    started: Option<Instant>,
    at_start: FxHashMap<ShardKey, FxHashMap<ProId, u64>>,
}

impl FairnessWindow {
    /// Whether the current window is over at `now` (or none was started yet).
    pub fn due(&self, now: Instant) -> bool {
        self.started.is_none_or(|t| now.saturating_duration_since(t) >= WINDOW)
    }

    /// Marks the start of the next window (the shards' counts are taken by [`Self::shard`]).
    pub fn restart(&mut self, now: Instant) {
        self.started = Some(now);
    }

    /// Ends the window for the shard `key`, whose pros are `pros` now: their
    /// `(offered, entitled)` counts over the window (empty if it is not judged), and
    /// their counts now kept as the next window's start.
    pub fn shard<'a>(&mut self, key: &ShardKey, pros: impl Iterator<Item = Input<'a>>) -> Vec<(f64, f64)> {
        let now: Vec<Input<'a>> = pros.collect();
        let out = shares(self.at_start.get(key), &now);
        self.at_start.insert(key.clone(), now.iter().map(|(p, n, _, _)| ((*p).clone(), *n)).collect());
        out
    }
}

/// `(offered, entitled)` per pro over a window that started at `at_start`.
fn shares(at_start: Option<&FxHashMap<ProId, u64>>, now: &[Input<'_>]) -> Vec<(f64, f64)> {
    let Some(at_start) = at_start else { return Vec::new() };
    let items: Vec<(u64, u32)> = now
        .iter()
        .filter(|(_, _, w, parked)| !parked && *w > 0)
        .filter_map(|(p, n, w, _)| at_start.get(*p).map(|before| (n.saturating_sub(*before), *w)))
        .collect();
    let total: u64 = items.iter().map(|x| x.0).sum();
    let wsum: u64 = items.iter().map(|x| u64::from(x.1)).sum();
    if total < MIN_OFFERS || wsum == 0 {
        return Vec::new();
    }
    items.into_iter().map(|(n, w)| (n as f64, total as f64 * f64::from(w) / wsum as f64)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::{CategoryId, TenantId, ZoneId};

    fn key() -> ShardKey {
        ShardKey { tenant: TenantId::new("t"), zone: ZoneId::new("z"), category: CategoryId::new("c") }
    }

    /// R28: a pro with a long history and a newcomer offered equally over the window,
    /// at equal weights, are equally served: deviation 0 for both (over their lifetime
    /// counts the newcomer read as 95 % short).
    #[test]
    fn r28_a_window_judges_the_last_minute_not_the_lifetime() {
        let (old, new) = (ProId::new("old"), ProId::new("new"));
        let mut w = FairnessWindow::default();
        assert!(w.shard(&key(), [(&old, 1_000, 100, false), (&new, 0, 100, false)].into_iter()).is_empty());
        let got = w.shard(&key(), [(&old, 1_025, 100, false), (&new, 25, 100, false)].into_iter());
        assert_eq!(got, vec![(25.0, 25.0), (25.0, 25.0)]);
    }

    /// R16/R22/R28: a pro parked when the window ends, and one that was not in the
    /// shard when it started, are left out; the others share the window by weight.
    #[test]
    fn r28_parked_pros_and_newcomers_are_left_out_of_the_window() {
        let (a, b, away, late) = (ProId::new("a"), ProId::new("b"), ProId::new("away"), ProId::new("late"));
        let mut w = FairnessWindow::default();
        w.shard(&key(), [(&a, 10, 200, false), (&b, 10, 100, false), (&away, 10, 100, false)].into_iter());
        let got = w.shard(
            &key(),
            [(&a, 30, 200, false), (&b, 20, 100, false), (&away, 10, 100, true), (&late, 5, 100, false)]
                .into_iter(),
        );
        assert_eq!(got, vec![(20.0, 20.0), (10.0, 10.0)]);
    }

    /// A shard offered fewer than `MIN_OFFERS` leads in the window is not judged.
    #[test]
    fn r28_a_quiet_shard_is_not_judged() {
        let (a, b) = (ProId::new("a"), ProId::new("b"));
        let mut w = FairnessWindow::default();
        w.shard(&key(), [(&a, 0, 100, false), (&b, 0, 100, false)].into_iter());
        let got = w.shard(&key(), [(&a, MIN_OFFERS - 1, 100, false), (&b, 0, 100, false)].into_iter());
        assert!(got.is_empty());
        assert!(FairnessWindow::default().due(Instant::now()));
    }
}
