//! The deadlines of one shard, in the order the tick handles them: by time, then lead
//! number, lead id and what is due ([`Deadline`]'s order).
//!
//! Almost every deadline is one of a lead's own (release, response windows, close,
//! forget) and names no pro. Those are kept as 48-byte entries with what is due as a
//! number; the few that name a pro (R12 guarantees, and per-offer expiries of older
//! snapshots) are kept whole in a second set. A whole [`Deadline`] is 64 bytes, and a
//! B-tree holds its entries in nodes that monotone times leave about half full, so the
//! split saves about 60 bytes per open lead. Iteration merges the two sets in
//! [`Deadline`] order; serialised, the deadlines are the one ordered list of
//! [`Deadline`]s that a single set gave, so snapshots do not change.

use super::shard::{Deadline, Due};
use crate::ids::{LeadId, Millis};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::{btree_set, BTreeSet};
use std::iter::Peekable;

/// A deadline that names no pro. Field order = [`Deadline`]'s, `due` = [`rank`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Slim {
    at: Millis,
    seq: u64,
    lead: LeadId,
    due: u8,
}

/// [`Due`]'s variant order, which orders deadlines of one lead at one time.
fn rank(due: &Due) -> u8 {
    match due {
        Due::Release => 0,
        Due::ExpireOffer(_) => 1,
        Due::ExpireOffers => 2,
        Due::Guarantee(_) => 3,
        Due::Close => 4,
        Due::Forget => 5,
    }
}

impl Slim {
    /// `None` for the deadlines that name a pro.
    fn of(d: &Deadline) -> Option<Slim> {
        match d.due {
            Due::ExpireOffer(_) | Due::Guarantee(_) => None,
            _ => Some(Slim { at: d.at, seq: d.seq, lead: d.lead.clone(), due: rank(&d.due) }),
        }
    }

    fn deadline(&self) -> Deadline {
        let due = match self.due {
            0 => Due::Release,
            2 => Due::ExpireOffers,
            4 => Due::Close,
            5 => Due::Forget,
            r => unreachable!("slim deadlines are only made from pro-less ones (rank {r})"),
        };
        Deadline { at: self.at, seq: self.seq, lead: self.lead.clone(), due }
    }

    /// Before `d` in [`Deadline`] order. Never equal: a slim entry and a whole one
    /// always differ in what is due.
    fn before(&self, d: &Deadline) -> bool {
        (self.at, self.seq, &self.lead, self.due) < (d.at, d.seq, &d.lead, rank(&d.due))
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Deadlines {
    slim: BTreeSet<Slim>,
    /// Deadlines that name a pro.
    whole: BTreeSet<Deadline>,
}

impl Deadlines {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether it was not there yet (as [`BTreeSet::insert`]).
    pub fn insert(&mut self, d: Deadline) -> bool {
        match Slim::of(&d) {
            Some(s) => self.slim.insert(s),
            None => self.whole.insert(d),
        }
    }

    /// Whether it was there (as [`BTreeSet::remove`]).
    pub fn remove(&mut self, d: &Deadline) -> bool {
        match Slim::of(d) {
            Some(s) => self.slim.remove(&s),
            None => self.whole.remove(d),
        }
    }

    pub fn len(&self) -> usize {
        self.slim.len() + self.whole.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slim.is_empty() && self.whole.is_empty()
    }

    /// The time of the first deadline.
    pub fn first_at(&self) -> Option<Millis> {
        match (self.slim.first(), self.whole.first()) {
            (Some(s), Some(w)) => Some(s.at.min(w.at)),
            (Some(s), None) => Some(s.at),
            (None, w) => w.map(|w| w.at),
        }
    }

    pub fn pop_first(&mut self) -> Option<Deadline> {
        let slim_first = match (self.slim.first(), self.whole.first()) {
            (Some(s), Some(w)) => s.before(w),
            (s, _) => s.is_some(),
        };
        if slim_first {
            self.slim.pop_first().map(|s| s.deadline())
        } else {
            self.whole.pop_first()
        }
    }

    /// Every deadline, in [`Deadline`] order.
    pub fn iter(&self) -> Iter<'_> {
        Iter { slim: self.slim.iter().peekable(), whole: self.whole.iter().peekable() }
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&Deadline) -> bool) {
        self.slim.retain(|s| keep(&s.deadline()));
        self.whole.retain(keep);
    }
}

pub struct Iter<'a> {
    slim: Peekable<btree_set::Iter<'a, Slim>>,
    whole: Peekable<btree_set::Iter<'a, Deadline>>,
}

impl Iterator for Iter<'_> {
    type Item = Deadline;

    fn next(&mut self) -> Option<Deadline> {
        let slim_next = match (self.slim.peek(), self.whole.peek()) {
            (Some(s), Some(w)) => s.before(w),
            (s, _) => s.is_some(),
        };
        if slim_next {
            self.slim.next().map(Slim::deadline)
        } else {
            self.whole.next().cloned()
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.slim.len() + self.whole.len();
        (n, Some(n))
    }
}

impl ExactSizeIterator for Iter<'_> {}

impl Serialize for Deadlines {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for Deadlines {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut set = Deadlines::new();
        for dl in Vec::<Deadline>::deserialize(d)? {
            set.insert(dl);
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::ProId;

    fn dl(at: Millis, seq: u64, lead: &str, due: Due) -> Deadline {
        Deadline { at, seq, lead: LeadId::new(lead), due }
    }

    #[test]
    fn iterates_pops_and_serialises_exactly_as_one_ordered_set() {
        let p = |s: &str| ProId::new(s);
        let all = [
            dl(5, 1, "a", Due::Close),
            dl(5, 1, "a", Due::Guarantee(p("x"))),
            dl(5, 1, "a", Due::Release),
            dl(5, 1, "a", Due::ExpireOffer(p("y"))),
            dl(5, 1, "a", Due::ExpireOffers),
            dl(5, 1, "a", Due::Forget),
            dl(5, 1, "a", Due::Guarantee(p("w"))),
            dl(3, 9, "z", Due::Guarantee(p("x"))),
            dl(3, 2, "b", Due::Forget),
            dl(7, 0, "c", Due::Release),
            dl(5, 0, "b", Due::Guarantee(p("x"))),
        ];
        let mut want = BTreeSet::new();
        let mut got = Deadlines::new();
        for d in &all {
            assert_eq!(got.insert(d.clone()), want.insert(d.clone()));
        }
        assert!(!got.insert(all[1].clone()), "no duplicates");
        assert_eq!(got.len(), want.len());
        assert!(std::mem::size_of::<Slim>() < std::mem::size_of::<Deadline>());
        assert_eq!(got.iter().collect::<Vec<_>>(), want.iter().cloned().collect::<Vec<_>>());
        assert_eq!(got.iter().len(), want.len());
        assert_eq!(got.first_at(), want.first().map(|d| d.at));
        assert_eq!(rmp_serde::to_vec(&got).unwrap(), rmp_serde::to_vec(&want).unwrap());
        assert_eq!(serde_json::to_string(&got).unwrap(), serde_json::to_string(&want).unwrap());
        let back: Deadlines = rmp_serde::from_slice(&rmp_serde::to_vec(&want).unwrap()).unwrap();
        assert_eq!(back, got);
        assert!(got.remove(&all[0]) && want.remove(&all[0]));
        assert!(got.remove(&all[6]) && want.remove(&all[6]));
        assert!(!got.remove(&all[6]));
        got.retain(|d| d.lead.as_str() != "b");
        want.retain(|d| d.lead.as_str() != "b");
        while let Some(d) = want.pop_first() {
            assert_eq!(got.pop_first(), Some(d));
        }
        assert!(got.is_empty() && got.pop_first().is_none() && got.first_at().is_none());
    }
}
