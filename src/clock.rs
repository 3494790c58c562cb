//! The only place that reads the wall clock.
//!
//! The core takes `now: Millis` as a parameter; the shell gets it from a [`Clock`].
//! `Wall` is the default. `Manual` is an explicit, off-by-default mode (config
//! `clock = "manual"`, admin scope to move it) that lets tests and load replays run a
//! 48-hour timeline in milliseconds: time only moves when an admin says so.
//!
//! Time in rota never runs backwards. The wall clock can (an NTP step, a VM restored
//! from a snapshot, an operator's `date -s`): a decision then would get an earlier
//! `now` than one already logged, and windows measured from the later one (response
//! windows, R12 guarantees, R22 retry windows) would stretch by the step. So `Wall`
//! keeps a floor: the latest time it handed out, raised at start-up to the latest time
//! in the recovered state ([`Clock::not_before`]). While the wall clock is behind the
//! floor, `now` stays at the floor, and rota's time resumes once the wall clock
//! catches up: a step back of a few seconds holds time for that long instead of
//! rewinding it. Forward steps are taken as they come (deadlines due in the skipped
//! interval run at the next tick, as after a pause of the process).

use crate::ids::Millis;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

#[derive(Clone, Debug)]
pub enum Clock {
    /// The wall clock, never earlier than the floor it holds (see the module docs).
    Wall(Arc<AtomicI64>),
    Manual(Arc<AtomicI64>),
}

impl Clock {
    /// The wall clock, with no floor yet.
    pub fn wall() -> Self {
        Clock::Wall(Arc::new(AtomicI64::new(0)))
    }

    pub fn manual(start: Millis) -> Self {
        Clock::Manual(Arc::new(AtomicI64::new(start)))
    }

    pub fn now(&self) -> Millis {
        match self {
            Clock::Wall(floor) => floored(floor, wall_now()),
            Clock::Manual(t) => t.load(Ordering::Acquire),
        }
    }

    /// How many milliseconds the wall clock is behind the latest time handed out (0
    /// when it is not, and for a manual clock).
    pub fn behind_ms(&self) -> Millis {
        match self {
            Clock::Wall(floor) => (floor.load(Ordering::Acquire) - wall_now()).max(0),
            Clock::Manual(_) => 0,
        }
    }

    /// Raises the wall clock's floor to `t` (the latest time of the recovered state):
    /// no later `now` is earlier. Returns by how many milliseconds the wall clock is
    /// behind the floor now (0 when it is not). A manual clock is left alone: it
    /// moves only when told to.
    pub fn not_before(&self, t: Millis) -> Millis {
        match self {
            Clock::Wall(floor) => {
                floor.fetch_max(t, Ordering::AcqRel);
                self.behind_ms()
            }
            Clock::Manual(_) => 0,
        }
    }

    pub fn is_manual(&self) -> bool {
        matches!(self, Clock::Manual(_))
    }

    /// Moves a manual clock forward to `to` (never backwards: time in rota is
    /// monotonic). Returns the new time, or `None` for the wall clock.
    pub fn advance_to(&self, to: Millis) -> Option<Millis> {
        match self {
            Clock::Wall(_) => None,
            Clock::Manual(t) => Some(t.fetch_max(to, Ordering::AcqRel).max(to)),
        }
    }
}

/// `wall`, or the floor when the wall is behind it; raises the floor to what it
/// returns. The common case (the wall clock at or past the floor) is one load and, at
/// most once per millisecond and thread, one `fetch_max`.
fn floored(floor: &AtomicI64, wall: Millis) -> Millis {
    let f = floor.load(Ordering::Acquire);
    if wall <= f {
        return f;
    }
    floor.fetch_max(wall, Ordering::AcqRel).max(wall)
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn wall_now() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// A monotonic instant for latency measurement (not for decisions).
pub fn instant() -> std::time::Instant {
    std::time::Instant::now()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_only_moves_forward() {
        let c = Clock::manual(1_000);
        assert_eq!(c.now(), 1_000);
        assert_eq!(c.advance_to(5_000), Some(5_000));
        assert_eq!(c.advance_to(2_000), Some(5_000));
        assert_eq!(c.now(), 5_000);
        assert_eq!(Clock::wall().advance_to(1), None);
    }

    #[test]
    fn the_floor_holds_time_while_the_wall_clock_is_behind_it() {
        let floor = AtomicI64::new(0);
        assert_eq!(floored(&floor, 5_000), 5_000);
        // A step back of two seconds: time holds at the latest it handed out.
        assert_eq!(floored(&floor, 3_000), 5_000);
        assert_eq!(floored(&floor, 4_999), 5_000);
        // Resumes once the wall clock has caught up.
        assert_eq!(floored(&floor, 5_001), 5_001);
        assert_eq!(floored(&floor, 5_000), 5_001);
    }

    #[test]
    fn a_recovered_time_ahead_of_the_wall_clock_becomes_the_floor() {
        let c = Clock::wall();
        let ahead = wall_now() + 3_600_000;
        let behind = c.not_before(ahead);
        assert!(behind > 3_500_000, "reported {behind} ms behind");
        assert!(c.behind_ms() > 3_500_000, "and so does the gauge's source");
        assert!(c.now() >= ahead);
        // A recovered time in the past changes nothing.
        let c = Clock::wall();
        assert_eq!(c.not_before(1_000), 0);
        assert!(c.now() > 1_000);
        assert_eq!(c.behind_ms(), 0);
        // A manual clock moves only when told.
        let m = Clock::manual(10);
        assert_eq!(m.not_before(99), 0);
        assert_eq!(m.now(), 10);
    }
}
