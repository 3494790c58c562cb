//! Admission control at the websocket gateway: shed new leads when a connection's
//! requests wait unread, before any work is done for them.
//!
//! When a gateway worker falls behind a connection, the excess never reaches rota's own
//! bounds (per-shard in-flight commands, the WAL queue): it waits in the kernel's socket
//! buffer, held back by TCP, where no queue of rota's sees it. So the gateway looks at
//! the socket's unread bytes (`FIONREAD`) every 16 frames, and on every frame while it
//! sheds:
//!
//! * beyond `shed_backlog_bytes` new leads are answered `overloaded`, and beyond four
//!   times that every request but `subscribe` is;
//! * once that limit was crossed (the connection is overloaded, not just bursty), for
//!   the next second the limit for new leads is the lower `shed_backlog_overloaded_bytes`:
//!   what is accepted then waits behind a few requests, not behind the whole budget.
//!
//! A host that can take the traffic crosses the upper limit only in a hiccup, so it
//! sheds little; an overloaded one sheds at the lower limit and keeps the latency of
//! what it accepts (docs/RELIABILITY.md, "Overload"). Only new leads are shed below
//! four times the limit: responses, top-ups and the like are small, refer to leads
//! already accepted, and refusing them would strand work in progress.

use std::os::fd::RawFd;
use std::time::{Duration, Instant};

/// Bytes received on the socket and not read yet (0 if it cannot be told).
pub fn unread_bytes(fd: RawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD stores one c_int through the pointer; `fd` is this connection's
    // socket, open for as long as the connection task runs.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
    if r == 0 {
        n.max(0) as usize
    } else {
        0
    }
}

/// One connection's admission state (see the module docs).
#[derive(Debug)]
pub struct Admission {
    /// `shed_backlog_bytes`; 0 = off.
    limit: usize,
    /// `shed_backlog_overloaded_bytes`: the limit for new leads while overloaded.
    overloaded_limit: usize,
    /// Unread bytes at the last look.
    backlog: usize,
    /// Frames until the next look at the socket.
    until_check: u32,
    /// Overloaded until then: `limit` was crossed less than [`Self::MEMORY`] ago.
    overloaded_until: Option<Instant>,
    /// Whether new leads are shed now.
    shedding: bool,
}

impl Admission {
    const CHECK_EVERY: u32 = 16;
    /// How long a connection counts as overloaded after its backlog crossed `limit`.
    pub const MEMORY: Duration = Duration::from_secs(1);

    pub fn new(limit: usize, overloaded_limit: usize) -> Self {
        let overloaded_limit = overloaded_limit.min(limit);
        Self { limit, overloaded_limit, backlog: 0, until_check: 0, overloaded_until: None, shedding: false }
    }

    /// Called once per frame: looks at the socket's unread bytes every
    /// [`Self::CHECK_EVERY`] frames, and on every frame while shedding.
    pub fn refresh(&mut self, fd: RawFd) {
        if self.limit == 0 {
            return;
        }
        if self.shedding || self.until_check == 0 {
            self.observe(unread_bytes(fd), Instant::now());
            self.until_check = Self::CHECK_EVERY;
        } else {
            self.until_check -= 1;
        }
    }

    /// One look at the unread bytes, at `now`.
    fn observe(&mut self, backlog: usize, now: Instant) {
        self.backlog = backlog;
        if backlog > self.limit {
            self.overloaded_until = Some(now + Self::MEMORY);
        }
        let overloaded = self.overloaded_until.is_some_and(|u| now < u);
        let limit = if overloaded { self.overloaded_limit } else { self.limit };
        self.shedding = backlog > limit;
    }

    /// Whether new leads are refused now.
    pub fn shedding(&self) -> bool {
        self.limit > 0 && self.shedding
    }

    /// Whether a request of type `ty` (its `type` field) is refused with `overloaded`:
    /// new leads while shedding, everything but `subscribe` beyond four times the limit.
    pub fn sheds(&self, ty: &str) -> bool {
        match ty {
            _ if !self.shedding() => false,
            "subscribe" => false,
            "publish_lead" => true,
            _ => self.backlog > self.limit.saturating_mul(4),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn below_the_limit_nothing_is_shed_and_beyond_it_new_leads_are() {
        let t0 = Instant::now();
        let mut a = Admission::new(32_768, 8_192);
        a.observe(20_000, t0);
        assert!(!a.sheds("publish_lead"), "a burst below the limit is taken");
        a.observe(40_000, t0);
        assert!(a.sheds("publish_lead"));
        // Only new leads: work on accepted leads and subscriptions go on.
        assert!(!a.sheds("respond"));
        assert!(!a.sheds("subscribe"));
        // Beyond four times the limit everything but `subscribe` is refused.
        a.observe(140_000, t0);
        assert!(a.sheds("respond"));
        assert!(!a.sheds("subscribe"));
    }

    #[test]
    fn once_overloaded_the_lower_limit_holds_for_a_second() {
        let t0 = Instant::now();
        let mut a = Admission::new(32_768, 8_192);
        a.observe(10_000, t0);
        assert!(!a.sheds("publish_lead"), "not overloaded yet: 10 KB is a burst");
        a.observe(33_000, t0 + MS);
        assert!(a.sheds("publish_lead"));
        // Caught up below the lower limit: accepted again.
        a.observe(8_000, t0 + 2 * MS);
        assert!(!a.sheds("publish_lead"));
        // Still overloaded: the lower limit applies.
        a.observe(10_000, t0 + 500 * MS);
        assert!(a.sheds("publish_lead"));
        // A second after the upper limit was last crossed, 10 KB is a burst again.
        a.observe(10_000, t0 + MS + Admission::MEMORY);
        assert!(!a.sheds("publish_lead"));
    }

    #[test]
    fn a_zero_limit_turns_shedding_off() {
        let mut a = Admission::new(0, 0);
        a.observe(10_000_000, Instant::now());
        assert!(!a.shedding());
        assert!(!a.sheds("publish_lead"));
    }

    #[test]
    fn the_lower_limit_is_never_above_the_upper_one() {
        let t0 = Instant::now();
        let mut a = Admission::new(8_192, 65_536);
        a.observe(9_000, t0);
        assert!(a.sheds("publish_lead"));
        a.observe(9_000, t0 + MS);
        assert!(a.sheds("publish_lead"));
    }
}
