//! Admission control at the websocket gateway: shed new leads when a connection's
//! requests wait unread, before any work is done for them.
//!
//! When a gateway worker falls behind a connection, the excess never reaches rota's own
//! bounds (per-shard in-flight commands, the WAL queue): it waits in the kernel's socket
//! buffer, held back by TCP, where no queue of rota's sees it. So the gateway looks at
//! the socket's unread bytes (`FIONREAD`) every 16 frames, and on every frame while it
//! sheds:
//!
//! * a backlog that stays beyond `shed_backlog_bytes` for [`Admission::SUSTAIN`] is a
//!   standing queue (within [`Admission::RECENT`] of an overloaded second, crossing it
//!   is enough): the connection is overloaded, and for the next second
//!   ([`Admission::MEMORY`]) new leads are answered `overloaded` whenever the backlog is
//!   beyond the lower `shed_backlog_overloaded_bytes`, so what is accepted waits behind
//!   a few requests, not behind the whole budget;
//! * beyond four times `shed_backlog_bytes` every request but `subscribe` is refused at
//!   once, overloaded or not (the hard bound on what waits).
//!
//! A host that can take the traffic crosses the limit only in a hiccup (a slow sync,
//! a worker descheduled for a few milliseconds) and drains the backlog within
//! milliseconds: that is ridden out, not shed, as CoDel does with a queue that drains
//! (acting on a queue that stays, not on a burst). Until 2026-12-06 one crossing made
//! the connection overloaded: on a single connection carrying 20,000 leads/s, half this
//! host's capacity, every hiccup then shed leads for a second (1-2 % of them).
//! An overloaded host keeps its backlog beyond the limit, sheds at the lower limit and
//! keeps the latency of what it accepts (docs/RELIABILITY.md, "Overload"). Only new
//! leads are shed below four times the limit: responses, top-ups and the like are
//! small, refer to leads already accepted, and refusing them would strand work in
//! progress.

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
    /// Since when the backlog has been beyond `limit` (at every look since).
    above_since: Option<Instant>,
    /// Overloaded until then: the backlog stayed beyond `limit` for [`Self::SUSTAIN`]
    /// less than [`Self::MEMORY`] ago.
    overloaded_until: Option<Instant>,
    /// Whether new leads are shed now.
    shedding: bool,
}

impl Admission {
    const CHECK_EVERY: u32 = 16;
    /// How long a connection counts as overloaded after its backlog stood beyond `limit`.
    pub const MEMORY: Duration = Duration::from_secs(1);
    /// How long the backlog must stay beyond `limit` to be a standing queue rather than
    /// a hiccup being drained. At four times the limit nothing waits for it.
    pub const SUSTAIN: Duration = Duration::from_millis(20);
    /// For this long after an overloaded second, crossing `limit` makes the connection
    /// overloaded again at once.
    pub const RECENT: Duration = Duration::from_secs(5);
    /// The shortest `retry_after_ms` of a shed request.
    pub const RETRY_MIN: Duration = Duration::from_millis(100);

    pub fn new(limit: usize, overloaded_limit: usize) -> Self {
        let overloaded_limit = overloaded_limit.min(limit);
        Self {
            limit,
            overloaded_limit,
            backlog: 0,
            until_check: 0,
            above_since: None,
            overloaded_until: None,
            shedding: false,
        }
    }

    /// Called once per frame: looks at the socket's unread bytes every
    /// [`Self::CHECK_EVERY`] frames, and on every frame while shedding or beyond the
    /// limit.
    pub fn refresh(&mut self, fd: RawFd) {
        if self.limit == 0 {
            return;
        }
        if self.shedding || self.above_since.is_some() || self.until_check == 0 {
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
            let since = *self.above_since.get_or_insert(now);
            // A connection overloaded within the last `RECENT` is taken at its word:
            // under sustained overload the lower limit keeps the backlog under `limit`
            // and the overloaded second runs out; waiting `SUSTAIN` again each time
            // would let a queue build once a second.
            let recent = self.overloaded_until.is_some_and(|u| now < u + Self::RECENT);
            if recent || now.duration_since(since) >= Self::SUSTAIN {
                self.overloaded_until = Some(now + Self::MEMORY);
            }
        } else {
            self.above_since = None;
        }
        let overloaded = self.overloaded_until.is_some_and(|u| now < u);
        let limit = if overloaded { self.overloaded_limit } else { self.hard_limit() };
        self.shedding = backlog > limit;
    }

    /// Beyond it every request but `subscribe` is refused, overloaded or not.
    fn hard_limit(&self) -> usize {
        self.limit.saturating_mul(4)
    }

    /// Whether new leads are refused now.
    pub fn shedding(&self) -> bool {
        self.limit > 0 && self.shedding
    }

    /// `retry_after_ms` of a request shed now: what is left of the overloaded second
    /// (a request sent again sooner would meet the same lower limit), at least
    /// [`Self::RETRY_MIN`]; a burst beyond four times the limit on a connection that
    /// is not overloaded drains within milliseconds: [`Self::RETRY_MIN`].
    pub fn retry_after_ms(&self, now: Instant) -> u64 {
        let left = self.overloaded_until.map_or(Duration::ZERO, |u| u.saturating_duration_since(now));
        left.clamp(Self::RETRY_MIN, Self::MEMORY).as_millis() as u64
    }

    /// Whether a request of type `ty` (its `type` field) is refused with `overloaded`:
    /// new leads while shedding, everything but `subscribe` beyond four times the limit.
    pub fn sheds(&self, ty: &str) -> bool {
        match ty {
            _ if !self.shedding() => false,
            "subscribe" => false,
            "publish_lead" => true,
            _ => self.backlog > self.hard_limit(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_backlog_beyond_the_limit_that_drains_within_the_sustain_time_is_ridden_out() {
        let t0 = Instant::now();
        let mut a = Admission::new(32_768, 4_096);
        a.observe(20_000, t0);
        assert!(!a.sheds("publish_lead"), "below the limit");
        // A hiccup: beyond the limit for 15 ms, then drained.
        a.observe(60_000, t0 + MS);
        assert!(!a.sheds("publish_lead"), "a hiccup is not shed");
        a.observe(90_000, t0 + 15 * MS);
        assert!(!a.sheds("publish_lead"));
        a.observe(10_000, t0 + 16 * MS);
        assert!(!a.sheds("publish_lead"));
        // Not overloaded afterwards: a burst under the limit is taken.
        a.observe(30_000, t0 + 30 * MS);
        assert!(!a.sheds("publish_lead"), "no lower limit after a hiccup");
        // A second hiccup starts its own count.
        a.observe(40_000, t0 + 40 * MS);
        a.observe(40_000, t0 + 55 * MS);
        assert!(!a.sheds("publish_lead"));
    }

    #[test]
    fn a_backlog_that_stands_beyond_the_limit_sheds_new_leads_only() {
        let t0 = Instant::now();
        let mut a = Admission::new(32_768, 4_096);
        a.observe(40_000, t0);
        assert!(!a.sheds("publish_lead"));
        a.observe(45_000, t0 + Admission::SUSTAIN);
        assert!(a.sheds("publish_lead"), "a standing queue is shed");
        // Only new leads: work on accepted leads and subscriptions go on.
        assert!(!a.sheds("respond"));
        assert!(!a.sheds("subscribe"));
    }

    #[test]
    fn beyond_four_times_the_limit_everything_but_subscribe_is_refused_at_once() {
        let t0 = Instant::now();
        let mut a = Admission::new(32_768, 4_096);
        a.observe(140_000, t0);
        assert!(a.sheds("publish_lead"));
        assert!(a.sheds("respond"));
        assert!(!a.sheds("subscribe"));
        // Back under it, and never overloaded: nothing is shed.
        a.observe(40_000, t0 + MS);
        assert!(!a.sheds("publish_lead"));
    }

    #[test]
    fn once_overloaded_the_lower_limit_holds_for_a_second() {
        let t0 = Instant::now();
        let mut a = Admission::new(32_768, 8_192);
        a.observe(10_000, t0);
        assert!(!a.sheds("publish_lead"), "not overloaded yet: 10 KB is a burst");
        a.observe(33_000, t0 + MS);
        a.observe(33_000, t0 + MS + Admission::SUSTAIN);
        assert!(a.sheds("publish_lead"));
        // Caught up below the lower limit: accepted again.
        a.observe(8_000, t0 + 30 * MS);
        assert!(!a.sheds("publish_lead"));
        // Still overloaded: the lower limit applies.
        a.observe(10_000, t0 + 500 * MS);
        assert!(a.sheds("publish_lead"));
        // A second after the backlog last stood beyond the limit, 10 KB is a burst again.
        a.observe(10_000, t0 + MS + Admission::SUSTAIN + Admission::MEMORY);
        assert!(!a.sheds("publish_lead"));
    }

    #[test]
    fn a_connection_overloaded_a_moment_ago_is_overloaded_again_at_the_first_crossing() {
        let t0 = Instant::now();
        let mut a = Admission::new(32_768, 4_096);
        a.observe(40_000, t0);
        a.observe(40_000, t0 + Admission::SUSTAIN);
        assert!(a.sheds("publish_lead"));
        // The overloaded second runs out with the backlog held low...
        let later = t0 + Admission::SUSTAIN + Admission::MEMORY + 100 * MS;
        a.observe(3_000, later);
        assert!(!a.sheds("publish_lead"));
        // ...and the next crossing sheds at once, no queue built for `SUSTAIN`.
        a.observe(40_000, later + MS);
        assert!(a.sheds("publish_lead"));
        // Long after, a crossing is a hiccup again.
        let much_later = later + Admission::MEMORY + Admission::RECENT + MS;
        a.observe(3_000, much_later);
        a.observe(40_000, much_later + MS);
        assert!(!a.sheds("publish_lead"));
    }

    #[test]
    fn a_shed_request_is_told_to_retry_once_the_overloaded_second_is_over() {
        let t0 = Instant::now();
        let mut a = Admission::new(32_768, 4_096);
        // A burst beyond four times the limit, never overloaded: it drains at once.
        a.observe(140_000, t0);
        assert!(a.sheds("publish_lead"));
        assert_eq!(a.retry_after_ms(t0), 100);
        // Overloaded: the rest of the second.
        a.observe(40_000, t0 + MS);
        a.observe(40_000, t0 + MS + Admission::SUSTAIN);
        let until = t0 + MS + Admission::SUSTAIN + Admission::MEMORY;
        assert!(a.sheds("publish_lead"));
        assert_eq!(a.retry_after_ms(t0 + MS + Admission::SUSTAIN), 1_000);
        assert_eq!(a.retry_after_ms(until - 400 * MS), 400);
        // Near its end, never below the floor.
        assert_eq!(a.retry_after_ms(until - 10 * MS), 100);
        assert_eq!(a.retry_after_ms(until + 10 * MS), 100);
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
        a.observe(9_000, t0 + Admission::SUSTAIN);
        assert!(a.sheds("publish_lead"));
        a.observe(9_000, t0 + Admission::SUSTAIN + MS);
        assert!(a.sheds("publish_lead"));
    }
}
