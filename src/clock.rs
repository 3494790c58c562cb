//! The only place that reads the wall clock.
//!
//! The core takes `now: Millis` as a parameter; the shell gets it from a [`Clock`].
//! `Wall` is the default. `Manual` is an explicit, off-by-default mode (config
//! `clock = "manual"`, admin scope to move it) that lets tests and load replays run a
//! 48-hour timeline in milliseconds: time only moves when an admin says so.

use crate::ids::Millis;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

#[derive(Clone, Debug)]
pub enum Clock {
    Wall,
    Manual(Arc<AtomicI64>),
}

impl Clock {
    pub fn manual(start: Millis) -> Self {
        Clock::Manual(Arc::new(AtomicI64::new(start)))
    }

    pub fn now(&self) -> Millis {
        match self {
            Clock::Wall => wall_now(),
            Clock::Manual(t) => t.load(Ordering::Acquire),
        }
    }

    pub fn is_manual(&self) -> bool {
        matches!(self, Clock::Manual(_))
    }

    /// Moves a manual clock forward to `to` (never backwards: time in rota is
    /// monotonic). Returns the new time, or `None` for the wall clock.
    pub fn advance_to(&self, to: Millis) -> Option<Millis> {
        match self {
            Clock::Wall => None,
            Clock::Manual(t) => Some(t.fetch_max(to, Ordering::AcqRel).max(to)),
        }
    }
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
        assert_eq!(Clock::Wall.advance_to(1), None);
    }
}
