//! What publishing an event costs the log's thread as a tenant's per-pro feeds grow:
//! one whole-stream subscriber and N per-pro feeds (one per pro), then E events each
//! naming a pro (a third of them one with a feed), published one at a time as the
//! durability callbacks do. Prints the time per event, median of five rounds.
//!
//! ```sh
//! cargo run --release --example hub_fanout -- 5000 200000
//! ```

use rota::engine::hub::StreamHub;
use rota::ids::ProId;
use rota::protocol::{Encoding, StreamEvent};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let feeds: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(5_000);
    let events: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let hub = StreamHub::new(1024);
    let mut whole = hub.subscribe(None, None, 1 << 20, Encoding::Msgpack).unwrap();
    let mut subs: Vec<_> = (0..feeds)
        .map(|i| hub.subscribe(None, Some(ProId::new(format!("p{i}"))), 1 << 16, Encoding::Msgpack).unwrap())
        .collect();
    let pros: Vec<ProId> = (0..3 * feeds.max(1)).map(|i| ProId::new(format!("p{i}"))).collect();
    let mut rounds = Vec::new();
    for round in 0..5 {
        let started = Instant::now();
        for i in 0..events {
            let pro = pros[(i * 7919 + round) % pros.len()].clone();
            hub.publish([StreamEvent::TopupRequested { pro, credits: i as u64 }]);
        }
        rounds.push(started.elapsed().as_nanos() as f64 / events as f64);
        // Drain the queues so that nobody is cut off for being slow.
        while whole.rx.try_recv().is_ok() {}
        for s in &mut subs {
            while s.rx.try_recv().is_ok() {}
        }
    }
    rounds.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{feeds} per-pro feeds, {events} events: {:.0} ns per event (median of 5; rounds {:?})",
        rounds[2],
        rounds.iter().map(|r| r.round() as u64).collect::<Vec<_>>()
    );
}
