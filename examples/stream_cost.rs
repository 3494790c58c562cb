//! The stream's cost per release, for instruction counts: N releases of five offers
//! sharing one lead summary, each prepared as the deciding thread does
//! (`Prepared::batch`) and framed as publishing does (`Outgoing::new`), for one
//! subscriber's encoding.
//!
//! ```sh
//! cargo build --release --example stream_cost
//! valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.out \
//!     target/release/examples/stream_cost 20000 msgpack   # or json
//! ```
//!
//! Prints the total frame bytes (so nothing is optimised away).

use rota::engine::hub::{Outgoing, Prepared, StreamHub};
use rota::protocol::Encoding;

#[path = "support/release.rs"]
mod release;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let enc =
        if args.get(2).map(String::as_str) == Some("json") { Encoding::Json } else { Encoding::Msgpack };
    let summary = release::summary();
    let hub = StreamHub::new(16);
    let _sub = hub.subscribe(None, None, 1 << 20, enc).unwrap();
    let mut total = 0usize;
    for r in 0..n {
        let evs = release::offers(r, &summary);
        let prepared: Vec<Prepared> = Prepared::batch(evs, &hub);
        for p in prepared {
            total += Outgoing::new(r as u64, p).bytes(enc).len();
        }
    }
    println!("{total}");
}
