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
//! rewinding it. Forward steps are taken as they come: deadlines due in the skipped
//! interval run as after a pause of the process, within a minute (below).
//!
//! Shard timers (`engine::actor`) sleep on tokio's monotonic clock, not on this one;
//! both kinds of step reach them:
//! - during a hold, a timer is armed for when the wall clock reaches the deadline
//!   ([`Clock::ms_until`]), not for its distance from the held time, which does not
//!   shrink: a shard whose deadline is a few ms past the floor would wake every few
//!   ms, finding nothing due, for the whole hold;
//! - a forward step of the wall clock, or a suspend of the machine (the monotonic
//!   clock stops, the wall clock does not), moves no timer already armed, so no timer
//!   sleeps longer than `engine::actor::MAX_TIMER_DELAY` (60 s): a deadline the step
//!   made due runs at the shard's next wake-up, within a minute of the step. A shard
//!   whose next deadline is further away wakes once a minute to arm again (the cost
//!   is in `MAX_TIMER_DELAY`'s docs).

use crate::ids::Millis;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

#[derive(Clone, Debug)]
pub enum Clock {
    /// The wall clock, never earlier than the floor it holds (see the module docs).
    Wall(Arc<Wall>),
    Manual(Arc<AtomicI64>),
}

/// The state of [`Clock::Wall`]: its floor, and where it reads the wall time.
pub struct Wall {
    /// The latest time handed out (or recovered): no `now` is earlier.
    floor: AtomicI64,
    /// The wall time: [`wall_now`] when `None`; a stand-in given to
    /// [`Clock::wall_reading`] otherwise.
    read: Option<WallSource>,
}

/// A stand-in for the system's wall clock ([`Clock::wall_reading`]).
pub type WallSource = Box<dyn Fn() -> Millis + Send + Sync>;

impl Wall {
    fn read(&self) -> Millis {
        match &self.read {
            None => wall_now(),
            Some(read) => read(),
        }
    }
}

impl std::fmt::Debug for Wall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wall")
            .field("floor", &self.floor.load(Ordering::Relaxed))
            .field("system", &self.read.is_none())
            .finish()
    }
}

impl Clock {
    /// The wall clock, with no floor yet.
    pub fn wall() -> Self {
        Clock::Wall(Arc::new(Wall { floor: AtomicI64::new(0), read: None }))
    }

    /// A wall clock (floor and all) that reads the wall time from `read` rather than
    /// from the system: the tests that step the wall clock back and forward.
    pub fn wall_reading(read: impl Fn() -> Millis + Send + Sync + 'static) -> Self {
        Clock::Wall(Arc::new(Wall { floor: AtomicI64::new(0), read: Some(Box::new(read)) }))
    }

    pub fn manual(start: Millis) -> Self {
        Clock::Manual(Arc::new(AtomicI64::new(start)))
    }

    pub fn now(&self) -> Millis {
        match self {
            Clock::Wall(w) => floored(&w.floor, w.read()),
            Clock::Manual(t) => t.load(Ordering::Acquire),
        }
    }

    /// How many milliseconds of wall-clock time until `now` reaches `t` (0 if it has).
    /// While the wall clock is behind the floor that includes the hold: `now` stays at
    /// the floor until the wall clock catches up, and only then moves towards `t`, so
    /// this is `t` minus the wall time, not minus `now`. For a manual clock, `t` minus
    /// `now` (it moves only when told).
    pub fn ms_until(&self, t: Millis) -> Millis {
        match self {
            Clock::Wall(w) => {
                let wall = w.read();
                if t <= floored(&w.floor, wall) {
                    0
                } else {
                    // `t` is past the floor, which is not before `wall`.
                    t - wall
                }
            }
            Clock::Manual(m) => (t - m.load(Ordering::Acquire)).max(0),
        }
    }

    /// How many milliseconds the wall clock is behind the latest time handed out (0
    /// when it is not, and for a manual clock).
    pub fn behind_ms(&self) -> Millis {
        match self {
            Clock::Wall(w) => (w.floor.load(Ordering::Acquire) - w.read()).max(0),
            Clock::Manual(_) => 0,
        }
    }

    /// Raises the wall clock's floor to `t` (the latest time of the recovered state):
    /// no later `now` is earlier. Returns by how many milliseconds the wall clock is
    /// behind the floor now (0 when it is not). A manual clock is left alone: it
    /// moves only when told to.
    pub fn not_before(&self, t: Millis) -> Millis {
        match self {
            Clock::Wall(w) => {
                w.floor.fetch_max(t, Ordering::AcqRel);
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
    fn the_wait_for_a_deadline_past_the_floor_counts_from_the_wall_clock() {
        let wall = Arc::new(AtomicI64::new(10_000));
        let read = wall.clone();
        let c = Clock::wall_reading(move || read.load(Ordering::Relaxed));
        assert_eq!(c.ms_until(10_500), 500);
        assert_eq!(c.ms_until(9_000), 0, "already due");
        assert_eq!(c.now(), 10_000);
        // A step back of an hour: time holds at 10_000 until the wall clock is back
        // there, so a deadline 5 ms past the floor is an hour and 5 ms away, not 5 ms.
        wall.store(10_000 - 3_600_000, Ordering::Relaxed);
        assert_eq!(c.now(), 10_000);
        assert_eq!(c.behind_ms(), 3_600_000);
        assert_eq!(c.ms_until(10_005), 3_600_005);
        assert_eq!(c.ms_until(10_000), 0, "due at the held time");
        assert_eq!(c.ms_until(9_999), 0);
        // A manual clock counts from its own time.
        let m = Clock::manual(100);
        assert_eq!(m.ms_until(150), 50);
        assert_eq!(m.ms_until(50), 0);
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
