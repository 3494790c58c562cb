//! `rota serve --demo`: a small synthetic marketplace feeding the daemon itself, so a
//! newcomer sees leads flow, offers go out and metrics move.

use crate::core::{Client, ContactPrefs, GeoPoint, JobKind, Lead, OfferAction, Pro, Quality};
use crate::engine::Engine;
use crate::ids::{CategoryId, ClientId, LeadId, ProId, TenantId, ZoneId};
use crate::protocol::{OkResult, Request};
use std::time::Duration;
use tokio::sync::watch;

const ZONES: [&str; 2] = ["bologna", "milano"];
const CATEGORIES: [&str; 2] = ["painting", "plumbing"];

pub async fn feed(engine: Engine, mut stop: watch::Receiver<bool>) {
    let tenant = match engine.tenants().into_iter().next() {
        Some(t) => t.id.clone(),
        None => return,
    };
    if let Err(e) = setup(&engine, &tenant).await {
        tracing::warn!(error = %e, "demo setup failed");
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut n: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        n += 1;
        let now = engine.inner.clock.now();
        let lead = Lead {
            id: LeadId::new(format!("demo-{now}-{n}")),
            category: CategoryId::new(CATEGORIES[(n % 2) as usize]),
            zone: ZoneId::new(ZONES[((n / 2) % 2) as usize]),
            location: Some(GeoPoint { lat: 44.49 + (n % 7) as f64 * 0.01, lon: 11.34 }),
            description: "Repaint a two-room flat, walls and ceilings".into(),
            details: [("rooms".to_string(), "2".to_string())].into_iter().collect(),
            attributes: vec![],
            client: Client {
                id: ClientId::new(format!("client-{now}-{n}")),
                name: "Demo Client".into(),
                phone: "+39 000 0000".into(),
                phone_verified: true,
                contact: ContactPrefs { call: n % 3 != 0, whatsapp: false, chat: true },
                address: None,
                pro_id: None,
            },
            direct: vec![],
            kind: JobKind::Match,
            created_at: now,
        };
        let id = lead.id.clone();
        let Ok(OkResult::Lead(outcome)) = engine.request(&tenant, Request::PublishLead { lead }).await else {
            continue;
        };
        // The first pro offered responds: it pays and gets the contact.
        if let Some((pro, _)) = outcome.offers.first() {
            let req = Request::Offer { lead: id, pro: pro.clone(), action: OfferAction::Respond };
            let _ = engine.request(&tenant, req).await;
        }
    }
}

async fn setup(engine: &Engine, tenant: &TenantId) -> Result<(), crate::protocol::ApiError> {
    for i in 0..12u32 {
        let pro = Pro {
            id: ProId::new(format!("demo-pro-{i}")),
            categories: CATEGORIES.iter().map(CategoryId::new).collect(),
            zones: ZONES.iter().map(ZoneId::new).collect(),
            base: Some(GeoPoint { lat: 44.49, lon: 11.34 }),
            radius_km: Some(500.0),
            quality: Quality {
                reviews: i * 5,
                rating_centi: 300 + i * 15,
                projects: i * 3,
                profile_permille: 800,
            },
            refuses: vec![],
            availability: Default::default(),
            autobuy: vec![],
        };
        let id = pro.id.clone();
        engine.request(tenant, Request::UpsertPro { pro }).await?;
        let grant = Request::GrantCredits { pro: id, op: format!("demo-grant-{i}"), credits: 1_000_000 };
        engine.request(tenant, grant).await?;
    }
    Ok(())
}
