//! Token buckets against request floods (`rate_limit_connection_per_s`,
//! `rate_limit_tenant_per_s`), all on one clock made once per process.
//!
//! governor's default clock (quanta) calibrates itself against the CPU's counter when it
//! is made: tens of microseconds of `cpuid` and calibration. Until 2026-12-07 a clock was
//! made for every refused request (to tell its `retry_after_ms`) and for every
//! connection's bucket, so a flood cost more to refuse than to serve: at 50,000
//! requests/s with 35,000 of them refused, making clocks was a fifth of the daemon's CPU
//! (BENCHMARKS "Refusing a flood"). Every bucket now reads the one clock below.

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use std::num::NonZeroU32;
use std::sync::OnceLock;

/// A token bucket of `n` requests per second (burst `n`).
pub type Limiter = DefaultDirectRateLimiter;

/// The process's one rate-limit clock.
fn clock() -> &'static DefaultClock {
    static CLOCK: OnceLock<DefaultClock> = OnceLock::new();
    CLOCK.get_or_init(DefaultClock::default)
}

/// A bucket of `per_second` requests per second; `None` for 0 (no limit).
pub fn per_second(per_second: u32) -> Option<Limiter> {
    NonZeroU32::new(per_second).map(|n| RateLimiter::direct_with_clock(Quota::per_second(n), clock()))
}

/// Takes one request from the bucket; `Err(retry_after_ms)` (at least 1) when it is
/// spent.
pub fn check(limiter: &Limiter) -> Result<(), u64> {
    limiter.check().map_err(|not_until| not_until.wait_time_from(clock().now()).as_millis().max(1) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_refuses_beyond_its_burst_with_a_retry_within_the_second() {
        let l = per_second(3).expect("a limit");
        for _ in 0..3 {
            assert_eq!(check(&l), Ok(()));
        }
        let retry = check(&l).expect_err("the fourth request in the same instant is refused");
        assert!((1..=1000).contains(&retry), "retry_after_ms {retry} is within a second");
    }

    #[test]
    fn zero_is_no_limit() {
        assert!(per_second(0).is_none());
    }
}
