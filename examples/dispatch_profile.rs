//! A fixed workload for profilers: builds one shard and publishes leads into it, with no
//! timing of its own, so `valgrind --tool=callgrind` (instruction counts, repeatable on a
//! noisy machine) or `perf record` see only the dispatch decision and the shard setup.
//!
//! ```text
//! cargo build --release --example dispatch_profile
//! valgrind --tool=callgrind --toggle-collect='*decide*' --toggle-collect='*Shard*apply*' \
//!     target/release/examples/dispatch_profile matched 1000 0 20000
//! callgrind_annotate --inclusive=yes callgrind.out.<pid> | head -60
//! ```
//!
//! Arguments: mode (`matched` | `auto_buy`), pros, paused_every (0 = none), leads,
//! open_every (optional; 0 = every pro inside its schedule, N = one in N, the others'
//! weekly window closed: a shard at night), budget_every (optional, auto-buy; 0 = every
//! budget can pay, N = one in N, the others spent: a shard late in the week).

use rota::core::*;
use rota::ids::ProId;

#[path = "../benches/support/dispatch_setup.rs"]
mod setup;
use setup::*;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map_or("matched", String::as_str);
    let pros: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let paused_every: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(0);
    let leads: u64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let open_every: usize = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(0);
    let budget_every: usize = args.get(6).and_then(|s| s.parse().ok()).unwrap_or(0);
    let funds = SomeBudgets(budget_every);
    let mut s = shard_with_closed(mode, pros, paused_every, open_every);
    let mut now = T0;
    let mut offers = 0usize;
    for n in 0..leads {
        let cmd = Command::PublishLead { lead: lead(n, now).into() };
        let d = s.decide(now, &cmd, &funds).expect("the profile lead is valid");
        for ev in &d.events {
            s.apply(ev);
        }
        if let Reply::Lead(o) = &d.reply {
            offers += o.offers.len();
        }
        if n % 4096 == 4095 {
            drain(&mut s, &mut now);
        }
    }
    println!("{leads} leads, {offers} offers");
}

/// Credits for everyone; auto-buy budgets for one pro in `N` (`pro-{i}`, `i % N == 0`),
/// spent for the others (0 = everyone's budget can pay).
struct SomeBudgets(usize);

impl Funds for SomeBudgets {
    fn credits(&self, _: &ProId) -> u64 {
        u64::MAX
    }
    fn budget(&self, pro: &ProId, _: &str) -> u64 {
        let i: usize = pro.as_str().trim_start_matches("pro-").parse().unwrap_or(0);
        if self.0 == 0 || i % self.0 == 0 {
            u64::MAX
        } else {
            0
        }
    }
}
