//! A release as the stream carries it, for the stream examples: five offers of one
//! lead sharing its summary.

use rota::protocol::{LeadSummary, StreamEvent};
use std::sync::Arc;

/// A lead summary of typical size (a painting job in Bologna).
pub fn summary() -> Arc<LeadSummary> {
    let summary: LeadSummary = serde_json::from_value(serde_json::json!({
        "zone":"bologna","category":"painting","description":"Repaint a two-room flat, walls and ceilings, about 60 square metres, this month",
        "details":{"rooms":"2","surface_m2":"60","when":"this month"},"attributes":["ceilings"],
        "approx_location":{"lat":44.49,"lon":11.34},"contact":{"call":true,"whatsapp":false,"chat":true},"created_at":1795424400000i64
    }))
    .expect("a valid summary");
    Arc::new(summary)
}

/// The five offers of lead `L<r>`, sharing `summary`.
pub fn offers(r: usize, summary: &Arc<LeadSummary>) -> Vec<StreamEvent> {
    (0..5)
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
        .collect()
}
