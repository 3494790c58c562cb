//! The rotation ring: weighted fair rotation by stride scheduling (R21, R28).
//!
//! Every pro in a shard has a *weight* (from quality and responsiveness, see
//! [`super::rank`]) and a *pass*. Its *stride* is `STRIDE_SCALE / weight`. A selection
//! walks pros in increasing `(pass, served, slot)` order, takes the first `n` that are
//! eligible for the lead, and advances each taken pro's pass by its stride. Among equal
//! passes the pro served longest ago goes first (`served`: when it was last taken), then
//! the slot (a pro that joins takes the lowest slot left free), so among equal weights the rotation is strictly cyclic: with
//! 8 equal pros and groups of 4, lead 1 goes to pros 1-4, lead 2 to 5-8, lead 3 to 1-4
//! again. Ties are common: a skip or a park clamps a pro to the pass of those just
//! served; broken by slot alone, the pros that joined first won every such tie (one
//! of two equal pros that can take only every other lead got all of them).
//!
//! # Fairness bound
//!
//! Let `V` be the virtual time (the largest pass taken so far). For a fixed set of
//! always-eligible pros selected one at a time, every pass stays within
//! `[V, V + stride_i]`, so after `N` leads pro `i` with weight `w_i` (total `W`, `n` pros)
//! has received `k_i` leads with
//!
//! ```text
//! | k_i - N * w_i / W |  <  1 + n * w_i / W
//! ```
//!
//! With equal weights (`w_i / W = 1/n`) that is fewer than 2 leads of drift, ever. Group
//! selections (`n` pros per lead, the auto-buy `group_size`) add at most the group size
//! to the bound; `tests/core_props.rs` checks `|k_i - N*g*w_i/W| < g + 1 + n*g*w_i/W` by
//! property testing, and the daemon exports the observed drift as a metric.
//!
//! # No catch-up bursts, no lost turns
//!
//! A pro that is scanned but skipped (paused, outside its schedule, too far, out of
//! budget) keeps its place, so it is first in line for the next lead it can take: it
//! does not lose its turn. But its pass is clamped to at most `max_catch_up_turns - 1`
//! strides behind `V` (the pros just served sit between `V` and `V + stride`), so after a
//! week of vacation it gets one lead early (with the default of 1), never a burst of the
//! leads it missed; with 0 it goes to the back of the queue. A pro that joins starts at the
//! back of the queue (`V + stride`), so leaving and re-joining cannot jump the line.
//! A lead bought late under the retry window (R22, when a spent budget comes back) is
//! taken in rotation order among the pros whose budget came back and advances the
//! buyer's pass like any other lead, so the leads a pro catches up on are counted
//! against its share instead of coming on top of its next turns.
//!
//! # Parked pros
//!
//! A pro that is unavailable for *every* lead for a while (paused or on vacation until a
//! known time, outside its weekly schedule until the schedule's next opening, with no
//! auto-buy config that buys, until its profile changes, or with every auto-buy budget
//! spent, until budget comes back: [`UNTIL_BUDGET`]) is
//! *parked*: taken out of the scanned order, keeping its pass, so it costs nothing per
//! lead. It is put back (*unparked*) when its time comes, lazily: a selection at `now`
//! already sees every pro whose park ended by `now` (see [`Ring::select_at`]), and
//! applying that selection's event unparks them first ([`Ring::commit_at`]), so `apply`
//! does exactly what `decide` assumed and replay reproduces it. The shard also unparks a
//! pro when its profile or availability changes. Unparking applies the same clamp as a
//! skip (at most `max_catch_up_turns - 1` strides behind `V`), so a parked pro returns
//! with the same turn it would have had if it had been scanned and skipped on every
//! lead meanwhile: the fairness bound and the no-burst rule above hold unchanged.
//!
//! Each selection costs `O(log n + scanned)`, where `scanned` is the pros looked at
//! before `n` eligible ones were found: no full scan of the ring per lead. Parked pros
//! are never scanned, so `scanned` counts only pros skipped for a reason of the lead
//! (distance, refused attribute, already offered, a price above a config's maximum).

use crate::ids::Millis;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The end of a park that lasts until the pro's auto-buy budget comes back (a
/// `BudgetReturned` event unparks it): later than any time, so never due, and the
/// budget-parked slots are the last ones of the wake index.
pub const UNTIL_BUDGET: Millis = Millis::MAX;

/// `stride = STRIDE_SCALE / weight`. Weights are at most 100,000 (policy validation), so
/// strides stay above 40,000 and the rounding error of an integer stride is below
/// 0.003 %.
pub const STRIDE_SCALE: u64 = 1 << 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingEntry {
    pub pass: u64,
    pub stride: u64,
    pub weight: u32,
    /// When the pro was last taken (the ring's `served` count then; 0: never, or
    /// before this was kept): among equal passes, the one served longest ago goes
    /// first.
    #[serde(default)]
    pub served: u64,
}

impl RingEntry {
    /// Its place in the scanned order of `slot`.
    fn key(&self, slot: u32) -> (u64, u64, u32) {
        (self.pass, self.served, slot)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ring {
    /// Indexed by slot; `None` for a slot whose pro left the shard.
    entries: Vec<Option<RingEntry>>,
    /// `(pass, served, slot)` of the slots not parked, in rotation order.
    #[serde(skip)]
    order: BTreeSet<(u64, u64, u32)>,
    /// Virtual time: the largest pass ever taken.
    vt: u64,
    /// Parked slots (not in `order`) and until when; `None` = until the shard unparks
    /// them (a change to the pro).
    #[serde(default)]
    parked: BTreeMap<u32, Option<Millis>>,
    /// `(until, slot)` of the parked slots with an end, to find those due.
    #[serde(skip)]
    wake: BTreeSet<(Millis, u32)>,
    /// `(pass, served, slot)` of the slots parked for a spent budget ([`UNTIL_BUDGET`]),
    /// in rotation order: a short auto-buy lead lists the first of them as waiting for
    /// it (R22) without walking them all.
    #[serde(skip)]
    budget_order: BTreeSet<(u64, u64, u32)>,
    /// Since when each slot parked for a spent budget ([`UNTIL_BUDGET`]) has been
    /// parked, without a break: it missed every lead of the shard since then for want of
    /// budget (R22; see `Shard::decide` of `BudgetAvailable`). Stored with the ring
    /// (older snapshots have none: their budget parks then rely on the leads' retry
    /// lists alone).
    #[serde(default)]
    budget_since: BTreeMap<u32, Millis>,
    /// Pros taken (and joined) so far: the `served` of the last one. Last, and
    /// defaulted: rmp-serde writes a struct as an array, so a snapshot of a release
    /// without it still loads (its entries' `served` all 0).
    #[serde(default)]
    served: u64,
}

/// The result of a selection, as recorded in an event so replay reproduces it exactly.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selection {
    /// Slots taken, in rotation order.
    pub taken: Vec<u32>,
    /// Slots scanned and skipped before the last taken one (their passes get clamped).
    pub skipped: Vec<u32>,
    /// Slots found unavailable for every lead, to park, with until when (`None` = until
    /// the pro changes). A slot may also be in `skipped` (clamped first, then parked).
    #[serde(default)]
    pub parked: Vec<(u32, Option<Millis>)>,
}

/// What a selection does with one scanned slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Take,
    /// Not for this lead; keeps its turn.
    Skip,
    /// Not for any lead until then (`None` = until the pro changes): skip and park.
    Park(Option<Millis>),
}

pub fn stride_for(weight: u32) -> u64 {
    STRIDE_SCALE / u64::from(weight.max(1))
}

impl Ring {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn vt(&self) -> u64 {
        self.vt
    }

    /// Pros taken (and joined) so far: the `served` the next one taken gets, less one.
    pub fn served(&self) -> u64 {
        self.served
    }

    /// Pros in the ring, parked ones included.
    pub fn len(&self) -> usize {
        self.order.len() + self.parked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Pros parked out of the scanned order.
    pub fn parked_len(&self) -> usize {
        self.parked.len()
    }

    pub fn is_parked(&self, slot: u32) -> bool {
        self.parked.contains_key(&slot)
    }

    /// Parked slots with until when, by slot.
    pub fn iter_parked(&self) -> impl Iterator<Item = (u32, Option<Millis>)> + '_ {
        self.parked.iter().map(|(&s, &u)| (s, u))
    }

    /// Slots the ring has room for, held or free.
    pub fn slot_capacity(&self) -> usize {
        self.entries.len()
    }

    pub fn entry(&self, slot: u32) -> Option<&RingEntry> {
        self.entries.get(slot as usize).and_then(|e| e.as_ref())
    }

    /// Puts `slot` in the ring at the back of the queue, or updates its weight keeping
    /// its place in the rotation.
    pub fn upsert(&mut self, slot: u32, weight: u32) {
        let stride = stride_for(weight);
        let idx = slot as usize;
        if self.entries.len() <= idx {
            self.entries.resize(idx + 1, None);
        }
        match &mut self.entries[idx] {
            Some(e) => {
                e.weight = weight;
                e.stride = stride;
            }
            slot_entry @ None => {
                // At the back of the queue: behind every pro served so far at that pass.
                self.served += 1;
                let e =
                    RingEntry { pass: self.vt.saturating_add(stride), stride, weight, served: self.served };
                *slot_entry = Some(e);
                self.order.insert(e.key(slot));
            }
        }
    }

    pub fn remove(&mut self, slot: u32) {
        if let Some(Some(e)) = self.entries.get(slot as usize).copied() {
            self.order.remove(&e.key(slot));
            self.budget_order.remove(&e.key(slot));
            if let Some(Some(t)) = self.parked.remove(&slot) {
                self.wake.remove(&(t, slot));
            }
            self.budget_since.remove(&slot);
            self.entries[slot as usize] = None;
        }
    }

    /// Forgets since when `slot` has been parked for a spent budget (it stays parked,
    /// if it is, until unparked): that park was no shortage of budget.
    pub fn forget_budget_park(&mut self, slot: u32) {
        self.budget_since.remove(&slot);
    }

    /// The pass a parked entry gets back when unparked: the skip clamp.
    pub fn unpark_pass(&self, e: &RingEntry, max_catch_up_turns: u32) -> u64 {
        let floor = self
            .vt
            .saturating_add(e.stride)
            .saturating_sub(e.stride.saturating_mul(u64::from(max_catch_up_turns)));
        e.pass.max(floor)
    }

    /// Takes `slot` out of the scanned order until `until` (`None` = until
    /// [`Ring::unpark`]). Parking a parked slot updates its end.
    pub fn park(&mut self, slot: u32, until: Option<Millis>) {
        let Some(e) = self.entry(slot).copied() else { return };
        if until != Some(UNTIL_BUDGET) {
            self.budget_since.remove(&slot);
        }
        match self.parked.insert(slot, until) {
            Some(Some(old)) => {
                self.wake.remove(&(old, slot));
                if old == UNTIL_BUDGET {
                    self.budget_order.remove(&e.key(slot));
                }
            }
            Some(None) => {}
            None => {
                self.order.remove(&e.key(slot));
            }
        }
        if let Some(t) = until {
            self.wake.insert((t, slot));
            if t == UNTIL_BUDGET {
                self.budget_order.insert(e.key(slot));
            }
        }
    }

    /// Puts a parked slot back in the order, clamped like a skip (no catch-up burst).
    pub fn unpark(&mut self, slot: u32, max_catch_up_turns: u32) {
        let Some(until) = self.parked.remove(&slot) else { return };
        self.budget_since.remove(&slot);
        if let Some(t) = until {
            self.wake.remove(&(t, slot));
            if t == UNTIL_BUDGET {
                if let Some(e) = self.entry(slot) {
                    let key = e.key(slot);
                    self.budget_order.remove(&key);
                }
            }
        }
        let idx = slot as usize;
        if let Some(Some(e)) = self.entries.get(idx).copied() {
            let e = RingEntry { pass: self.unpark_pass(&e, max_catch_up_turns), ..e };
            self.entries[idx] = Some(e);
            self.order.insert(e.key(slot));
        }
    }

    /// Unparks every slot whose park ended by `now`, in `(until, slot)` order.
    pub fn unpark_due(&mut self, now: Millis, max_catch_up_turns: u32) {
        while let Some(&(t, slot)) = self.wake.first() {
            if t > now {
                break;
            }
            self.unpark(slot, max_catch_up_turns);
        }
    }

    /// Unparks every parked slot (e.g. the policy changed what makes a pro ineligible).
    pub fn unpark_all(&mut self, max_catch_up_turns: u32) {
        let slots: Vec<u32> = self.parked.keys().copied().collect();
        for slot in slots {
            self.unpark(slot, max_catch_up_turns);
        }
    }

    /// Slots parked until their budget comes back ([`UNTIL_BUDGET`]), in rotation
    /// order (`(pass, served, slot)`).
    pub fn budget_parked_in_order(&self) -> impl Iterator<Item = u32> + '_ {
        self.budget_order.iter().map(|&(_, _, slot)| slot)
    }

    /// Slots parked until their budget comes back ([`UNTIL_BUDGET`]), by slot.
    pub fn parked_for_budget(&self) -> impl Iterator<Item = u32> + '_ {
        self.wake.range((UNTIL_BUDGET, 0)..).map(|&(_, slot)| slot)
    }

    /// Slots in rotation order (next to be served first), parked ones left out.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.order.iter().map(|&(_, _, slot)| slot)
    }

    /// Walks the rotation and takes up to `n` slots for which `eligible` holds.
    /// Parked slots are not seen. Pure: the ring is only changed by [`Ring::commit`].
    pub fn select(&self, n: usize, mut eligible: impl FnMut(u32) -> bool) -> Selection {
        self.select_at(Millis::MIN, 0, n, |slot| if eligible(slot) { Verdict::Take } else { Verdict::Skip })
    }

    /// Walks the rotation as it is at `now` (parked slots whose park ended by `now` are
    /// back, with the pass [`Ring::unpark_due`] will give them) and takes up to `n` slots
    /// that `verdict` takes. Pure: apply the result with [`Ring::commit_at`] at `now`.
    pub fn select_at(
        &self,
        now: Millis,
        max_catch_up_turns: u32,
        n: usize,
        mut verdict: impl FnMut(u32) -> Verdict,
    ) -> Selection {
        let mut sel = Selection::default();
        if n == 0 {
            return sel;
        }
        sel.taken.reserve_exact(n.min(16));
        // Usually empty: the slots whose park is over but not yet applied.
        let mut due: Vec<(u64, u64, u32)> = self
            .wake
            .range(..=(now, u32::MAX))
            .filter_map(|&(_, slot)| {
                self.entry(slot).map(|e| (self.unpark_pass(e, max_catch_up_turns), e.served, slot))
            })
            .collect();
        due.sort_unstable();
        let mut due = due.into_iter().peekable();
        let mut order = self.order.iter().copied().peekable();
        let mut pending_skips = Vec::new();
        loop {
            let next = match (order.peek(), due.peek()) {
                (Some(a), Some(b)) if b < a => due.next(),
                (Some(_), _) => order.next(),
                (None, _) => due.next(),
            };
            let Some((_, _, slot)) = next else { break };
            match verdict(slot) {
                Verdict::Take => {
                    sel.skipped.append(&mut pending_skips);
                    sel.taken.push(slot);
                    if sel.taken.len() == n {
                        break;
                    }
                }
                Verdict::Park(until) if until.is_none_or(|t| t > now) => {
                    pending_skips.push(slot);
                    sel.parked.push((slot, until));
                }
                Verdict::Skip | Verdict::Park(_) => pending_skips.push(slot),
            }
        }
        sel
    }

    /// Applies a selection made by [`Ring::select_at`] at `now`: unparks what is due,
    /// commits taken and skipped slots, then parks what the selection parks.
    pub fn commit_at(&mut self, sel: &Selection, now: Millis, max_catch_up_turns: u32) {
        self.unpark_due(now, max_catch_up_turns);
        // A taken slot is eligible: if it is parked (a selection made on an older state
        // of the ring), it comes back first.
        for &slot in &sel.taken {
            if self.is_parked(slot) {
                self.unpark(slot, max_catch_up_turns);
            }
        }
        self.commit(sel, max_catch_up_turns);
        for &(slot, until) in &sel.parked {
            self.park(slot, until);
            if until == Some(UNTIL_BUDGET) {
                self.budget_since.entry(slot).or_insert(now);
            }
        }
    }

    /// Since when `slot` has been parked for a spent budget, if it is.
    pub fn budget_parked_since(&self, slot: u32) -> Option<Millis> {
        self.budget_since.get(&slot).copied()
    }

    /// Applies a selection: taken slots advance by their stride, skipped slots are
    /// clamped to at most `max_catch_up_turns - 1` strides behind the virtual time, i.e.
    /// `max_catch_up_turns` turns ahead of a pro just served (at `V + stride`).
    pub fn commit(&mut self, sel: &Selection, max_catch_up_turns: u32) {
        for &slot in &sel.taken {
            if let Some(e) = self.entry(slot) {
                self.vt = self.vt.max(e.pass);
            }
        }
        for &slot in &sel.taken {
            self.served += 1;
            let served = self.served;
            self.set_entry(slot, |e| {
                e.pass = e.pass.saturating_add(e.stride);
                e.served = served;
            });
        }
        let vt = self.vt;
        for &slot in &sel.skipped {
            self.set_entry(slot, |e| {
                let floor = vt
                    .saturating_add(e.stride)
                    .saturating_sub(e.stride.saturating_mul(u64::from(max_catch_up_turns)));
                e.pass = e.pass.max(floor);
            });
        }
    }

    /// Changes `slot`'s entry with `f`, keeping the order index in step (a parked slot
    /// is not in it).
    fn set_entry(&mut self, slot: u32, f: impl FnOnce(&mut RingEntry)) {
        let parked = self.parked.contains_key(&slot);
        let Some(Some(e)) = self.entries.get_mut(slot as usize) else {
            return;
        };
        let old = *e;
        f(e);
        if *e != old {
            if !parked {
                self.order.remove(&old.key(slot));
                self.order.insert(e.key(slot));
            } else if self.budget_order.remove(&old.key(slot)) {
                self.budget_order.insert(e.key(slot));
            }
        }
    }

    /// Rebuilds the ordered indexes after deserialisation (they are not stored).
    pub fn rebuild_index(&mut self) {
        let parked = &self.parked;
        self.order = self
            .entries
            .iter()
            .enumerate()
            .filter(|(i, _)| !parked.contains_key(&(*i as u32)))
            .filter_map(|(i, e)| e.map(|e| e.key(i as u32)))
            .collect();
        self.wake = parked.iter().filter_map(|(&s, &u)| u.map(|t| (t, s))).collect();
        self.budget_order = parked
            .iter()
            .filter(|(_, &u)| u == Some(UNTIL_BUDGET))
            .filter_map(|(&s, _)| self.entries.get(s as usize).copied().flatten().map(|e| e.key(s)))
            .collect();
    }

    /// Checks the ring's internal consistency (tests call it after every step).
    pub fn check_invariants(&self) -> Result<(), String> {
        let live = self.entries.iter().filter(|e| e.is_some()).count();
        if live != self.order.len() + self.parked.len() {
            return Err(format!(
                "ring index has {} entries and {} parked, {} live slots",
                self.order.len(),
                self.parked.len(),
                live
            ));
        }
        for (&slot, &until) in &self.parked {
            let Some(e) = self.entry(slot) else {
                return Err(format!("parked slot {slot} is not in the ring"));
            };
            if self.order.contains(&e.key(slot)) {
                return Err(format!("parked slot {slot} is also in the scanned order"));
            }
            if until.is_some_and(|t| !self.wake.contains(&(t, slot))) {
                return Err(format!("parked slot {slot} has no wake-up entry"));
            }
        }
        for &slot in self.budget_since.keys() {
            if self.parked.get(&slot) != Some(&Some(UNTIL_BUDGET)) {
                return Err(format!("slot {slot} has a budget park time but is not parked for its budget"));
            }
        }
        if self.wake.len() != self.parked.values().filter(|u| u.is_some()).count() {
            return Err(format!("{} wake-up entries for {} timed parks", self.wake.len(), self.parked.len()));
        }
        let budget_parked: BTreeSet<(u64, u64, u32)> = self
            .parked
            .iter()
            .filter(|(_, &u)| u == Some(UNTIL_BUDGET))
            .filter_map(|(&s, _)| self.entry(s).map(|e| e.key(s)))
            .collect();
        if budget_parked != self.budget_order {
            return Err("the index of budget-parked slots does not match them".into());
        }
        for &(pass, served, slot) in &self.order {
            match self.entry(slot) {
                Some(e) if e.pass == pass && e.served == served => {}
                _ => {
                    return Err(format!(
                        "ring index entry ({pass}, {served}, {slot}) does not match its slot"
                    ))
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn r21_equal_pros_in_groups_of_four_cycle_strictly() {
        let mut ring = Ring::new();
        for slot in 0..8 {
            ring.upsert(slot, 100);
        }
        let mut groups = Vec::new();
        for _ in 0..4 {
            let sel = ring.select(4, |_| true);
            ring.commit(&sel, 1);
            groups.push(sel.taken);
        }
        assert_eq!(groups[0], vec![0, 1, 2, 3]);
        assert_eq!(groups[1], vec![4, 5, 6, 7]);
        assert_eq!(groups[2], vec![0, 1, 2, 3]);
        assert_eq!(groups[3], vec![4, 5, 6, 7]);
    }

    /// R28: pros that tie (a skip or a park clamps a pro to the pass of those just
    /// served) take turns, the one served longest ago first, not the one that joined
    /// first: here A and B can take only every other lead (the others are in C's area
    /// alone), and each is clamped to C's level in between.
    #[test]
    fn r28_equal_pros_that_tie_after_a_clamp_alternate_instead_of_the_first_joiner_winning() {
        let mut ring = Ring::new();
        for slot in 0..3 {
            ring.upsert(slot, 100);
        }
        let mut taken = [0u32; 3];
        for lead in 0..200 {
            let sel = if lead % 2 == 1 { ring.select(1, |s| s == 2) } else { ring.select(1, |s| s != 2) };
            ring.commit(&sel, 1);
            for &slot in &sel.taken {
                taken[slot as usize] += 1;
            }
            ring.check_invariants().unwrap();
        }
        assert_eq!(taken[2], 100, "every odd lead is C's");
        assert!(taken[0].abs_diff(taken[1]) <= 1, "A and B take turns: {taken:?}");
    }

    /// R28 with parking: six pros that are away every afternoon (parked) and come back
    /// every morning all at the same pass share the morning leads in turn.
    #[test]
    fn r28_pros_unparked_together_share_the_next_leads_in_turn() {
        let mut ring = Ring::new();
        for slot in 0..9 {
            ring.upsert(slot, 100);
        }
        let mut taken = [0u32; 9];
        for _day in 0..20 {
            // Morning: everyone; one lead for three.
            let sel = ring.select(3, |_| true);
            ring.commit(&sel, 1);
            sel.taken.iter().for_each(|&s| taken[s as usize] += 1);
            // Afternoon: slots 0-5 away (parked until the next morning), four leads.
            for slot in 0..6 {
                ring.park(slot, None);
            }
            for _ in 0..4 {
                let sel = ring.select(3, |_| true);
                ring.commit(&sel, 1);
            }
            for slot in 0..6 {
                ring.unpark(slot, 1);
            }
            ring.check_invariants().unwrap();
        }
        let morning: Vec<u32> = taken[..6].to_vec();
        let (lo, hi) = (morning.iter().min().unwrap(), morning.iter().max().unwrap());
        assert!(hi - lo <= 2, "the six share the mornings: {morning:?}");
    }

    /// A ring of a release before `served` (four fields, entries of three) loads, its
    /// rotation the same: every entry at 0, the slot breaking ties as it did.
    #[test]
    fn a_ring_written_before_served_was_kept_still_loads() {
        #[derive(Serialize)]
        struct OldEntry {
            pass: u64,
            stride: u64,
            weight: u32,
        }
        #[derive(Serialize)]
        struct OldRing {
            entries: Vec<Option<OldEntry>>,
            vt: u64,
            parked: BTreeMap<u32, Option<Millis>>,
            budget_since: BTreeMap<u32, Millis>,
        }
        let old = OldRing {
            entries: vec![
                Some(OldEntry { pass: 7, stride: 5, weight: 100 }),
                None,
                Some(OldEntry { pass: 3, stride: 5, weight: 100 }),
            ],
            vt: 3,
            parked: BTreeMap::from([(0, Some(UNTIL_BUDGET))]),
            budget_since: BTreeMap::from([(0, 42)]),
        };
        let mut ring: Ring =
            rmp_serde::from_slice(&rmp_serde::to_vec(&old).unwrap()).expect("an older ring loads");
        ring.rebuild_index();
        ring.check_invariants().unwrap();
        assert_eq!(ring.served(), 0);
        assert_eq!(ring.entry(2).map(|e| (e.pass, e.served)), Some((3, 0)));
        assert_eq!(ring.iter().collect::<Vec<_>>(), vec![2]);
        assert_eq!(ring.budget_parked_in_order().collect::<Vec<_>>(), vec![0]);
        assert_eq!(ring.budget_parked_since(0), Some(42));
    }

    #[test]
    fn r28_skipped_pro_keeps_its_turn_but_gets_no_burst() {
        let mut ring = Ring::new();
        for slot in 0..4 {
            ring.upsert(slot, 100);
        }
        // Slot 0 is unavailable for 40 leads.
        for _ in 0..40 {
            let sel = ring.select(1, |s| s != 0);
            ring.commit(&sel, 1);
        }
        // Back: it is first in line once, then the rotation is even again.
        let mut got = Vec::new();
        for _ in 0..8 {
            let sel = ring.select(1, |_| true);
            ring.commit(&sel, 1);
            got.push(sel.taken[0]);
        }
        assert_eq!(got[0], 0, "the returning pro keeps its turn");
        let zeros = got.iter().filter(|&&s| s == 0).count();
        assert!(zeros <= 3, "no catch-up burst: slot 0 got {zeros} of 8: {got:?}");
    }

    #[test]
    fn r28_returning_pro_gets_exactly_one_lead_early_with_one_catch_up_turn() {
        let mut ring = Ring::new();
        for slot in 0..3 {
            ring.upsert(slot, 100);
        }
        for _ in 0..4 {
            let sel = ring.select(1, |s| s != 2);
            ring.commit(&sel, 1);
        }
        let mut got = Vec::new();
        for _ in 0..7 {
            let sel = ring.select(1, |_| true);
            ring.commit(&sel, 1);
            got.push(sel.taken[0]);
        }
        // One early lead, then strictly cyclic again.
        assert_eq!(got, vec![2, 0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn r28_parked_pro_returns_with_the_turn_a_skipped_one_would_have() {
        // The same absence, once as skips on every lead and once as a park until a time.
        let (mut skipping, mut parking) = (Ring::new(), Ring::new());
        for slot in 0..3 {
            skipping.upsert(slot, 100);
            parking.upsert(slot, 100);
        }
        let back: Millis = 100;
        for t in 0..4 {
            let sel = skipping.select(1, |s| s != 2);
            skipping.commit(&sel, 1);
            let sel =
                parking.select_at(
                    t,
                    1,
                    1,
                    |s| if s == 2 { Verdict::Park(Some(back)) } else { Verdict::Take },
                );
            parking.commit_at(&sel, t, 1);
            parking.check_invariants().unwrap();
        }
        assert_eq!(parking.parked_len(), 1);
        let mut got = (Vec::new(), Vec::new());
        for t in back..back + 7 {
            let sel = skipping.select(1, |_| true);
            skipping.commit(&sel, 1);
            got.0.push(sel.taken[0]);
            let sel = parking.select_at(t, 1, 1, |_| Verdict::Take);
            parking.commit_at(&sel, t, 1);
            parking.check_invariants().unwrap();
            got.1.push(sel.taken[0]);
        }
        assert_eq!(got.0, vec![2, 0, 1, 2, 0, 1, 2]);
        assert_eq!(got.1, got.0);
        assert_eq!(parking.parked_len(), 0);
    }

    #[test]
    fn r16_r22_r28_a_parked_slot_is_not_scanned_and_survives_a_snapshot() {
        let mut ring = Ring::new();
        for slot in 0..3 {
            ring.upsert(slot, 100);
        }
        let sel = ring.select_at(0, 1, 1, |s| if s == 0 { Verdict::Park(None) } else { Verdict::Take });
        ring.commit_at(&sel, 0, 1);
        let mut seen = Vec::new();
        ring.select_at(1, 1, 3, |s| {
            seen.push(s);
            Verdict::Take
        });
        assert!(!seen.contains(&0), "{seen:?}");
        let bytes = rmp_serde::to_vec(&ring).unwrap();
        let mut back: Ring = rmp_serde::from_slice(&bytes).unwrap();
        back.rebuild_index();
        assert_eq!(back, ring);
        back.check_invariants().unwrap();
        back.unpark(0, 1);
        assert_eq!(back.parked_len(), 0);
        back.check_invariants().unwrap();
    }

    #[test]
    fn r28_a_returning_pro_gets_its_share_and_no_catch_up_burst() {
        let mut ring = Ring::new();
        for slot in 0..3 {
            ring.upsert(slot, 100);
        }
        for _ in 0..4 {
            let sel = ring.select(1, |s| s != 0);
            ring.commit(&sel, 0);
        }
        // No pro that kept being served is behind it: it has no credit left.
        let pass = |s| ring.entry(s).unwrap().pass;
        assert!(pass(0) >= pass(1) && pass(0) >= pass(2), "{} {} {}", pass(0), pass(1), pass(2));
        // Eligible again, it gets its share from now on and no more: one lead in each
        // round of three, never two in a row to make up for the four it missed.
        let next: Vec<u32> = (0..30)
            .map(|_| {
                let sel = ring.select(1, |_| true);
                ring.commit(&sel, 0);
                sel.taken[0]
            })
            .collect();
        for round in next.chunks(3) {
            let mut r = round.to_vec();
            r.sort_unstable();
            assert_eq!(r, [0, 1, 2], "each once a round: {next:?}");
        }
    }

    #[test]
    fn r28_higher_weight_gets_proportionally_more_never_all() {
        let mut ring = Ring::new();
        ring.upsert(0, 300);
        ring.upsert(1, 100);
        let mut counts = [0u32; 2];
        for _ in 0..400 {
            let sel = ring.select(1, |_| true);
            ring.commit(&sel, 1);
            counts[sel.taken[0] as usize] += 1;
        }
        assert!((299..=301).contains(&counts[0]), "{counts:?}");
        assert!((99..=101).contains(&counts[1]), "{counts:?}");
    }

    #[test]
    fn r28_a_joining_pro_starts_at_the_back() {
        let mut ring = Ring::new();
        for slot in 0..3 {
            ring.upsert(slot, 100);
        }
        let sel = ring.select(1, |_| true);
        ring.commit(&sel, 1);
        ring.upsert(3, 100);
        let order: Vec<u32> = ring.iter().collect();
        assert_eq!(order, vec![1, 2, 0, 3]);
        ring.check_invariants().unwrap();
    }
}
