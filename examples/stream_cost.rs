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
use rota::protocol::{Encoding, LeadSummary, StreamEvent};
use std::sync::Arc;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let enc =
        if args.get(2).map(String::as_str) == Some("json") { Encoding::Json } else { Encoding::Msgpack };
    let summary: LeadSummary = serde_json::from_value(serde_json::json!({
        "zone":"bologna","category":"painting","description":"Repaint a two-room flat, walls and ceilings, about 60 square metres, this month",
        "details":{"rooms":"2","surface_m2":"60","when":"this month"},"attributes":["ceilings"],
        "approx_location":{"lat":44.49,"lon":11.34},"contact":{"call":true,"whatsapp":false,"chat":true},"created_at":1795424400000i64
    })).unwrap();
    let summary = Arc::new(summary);
    let hub = StreamHub::new(16);
    let _sub = hub.subscribe(None, None, 1 << 20, enc).unwrap();
    let mut total = 0usize;
    for r in 0..n {
        let evs: Vec<StreamEvent> = (0..5)
            .map(|i| StreamEvent::Offered {
                lead: rota::ids::LeadId::new(format!("L{r}")),
                pro: rota::ids::ProId::new(format!("pro-{i:03}")),
                kind: rota::core::OfferKind::Generic,
                price: 12,
                respond_by: Some(1_795_683_600_000),
                at: 1_795_424_400_000,
                summary: summary.clone(),
                price_components: None,
            })
            .collect();
        let prepared: Vec<Prepared> = Prepared::batch(evs, &hub);
        for p in prepared {
            total += Outgoing::new(r as u64, p).bytes(enc).len();
        }
    }
    println!("{total}");
}
