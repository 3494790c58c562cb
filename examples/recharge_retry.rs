//! The cost of an R22 retry at scale: one auto-buy shard whose buyers all ran out of
//! budget while leads kept coming (every lead left short), then one weekly recharge of
//! every buyer, decided as the daemon does (one `BudgetAvailable` for the shard), and
//! applied. Prints the purchases and the time of the decision and of its application.
//!
//! ```text
//! cargo run --release --example recharge_retry -- 1000 20000
//! ```
//!
//! Arguments: buyers (default 1,000), short leads (default 20,000). Each buyer's budget
//! comes back for 1,000 leads, so the groups of four fill up: buyers x 1,000 / 4 leads
//! at most.

use rota::core::*;
use rota::ids::ProId;
use std::time::Instant;

#[path = "../benches/support/dispatch_setup.rs"]
mod setup;
use setup::*;

/// Every budget holds `self.0` credits.
struct Budgets(u64);

impl Funds for Budgets {
    fn credits(&self, _: &ProId) -> u64 {
        u64::MAX
    }
    fn budget(&self, _: &ProId, _: &str) -> u64 {
        self.0
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let pros: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let leads: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let mut s = shard_with_closed("auto_buy", pros, 0, 0);
    let spent = Budgets(0);
    for n in 0..leads {
        let d = s.decide(T0, &Command::PublishLead { lead: lead(n, T0).into() }, &spent).expect("valid lead");
        for ev in &d.events {
            s.apply(ev);
        }
    }
    let all: Vec<ProId> = (0..pros).map(|i| ProId::new(format!("pro-{i}"))).collect();
    let recharged = Budgets(1000 * 40);
    let started = Instant::now();
    let d = s.decide(T0 + 60_000, &Command::BudgetAvailable { pros: all }, &recharged).expect("a retry");
    let decided = started.elapsed();
    let started = Instant::now();
    for ev in &d.events {
        s.apply(ev);
    }
    let applied = started.elapsed();
    let bought: usize = d
        .events
        .iter()
        .map(|e| match e {
            Event::Offered { grants, .. } => grants.len(),
            _ => 0,
        })
        .sum();
    println!(
        "{pros} buyers, {leads} short leads: {bought} purchases in {} events; decide {:.1} ms ({:.2} us per purchase), apply {:.1} ms",
        d.events.len(),
        decided.as_secs_f64() * 1e3,
        decided.as_secs_f64() * 1e6 / bought.max(1) as f64,
        applied.as_secs_f64() * 1e3
    );
}
