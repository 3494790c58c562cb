//! The shard and leads the dispatch benchmark and `examples/dispatch_profile.rs` both use
//! (included by path from each), so the profile measures exactly what the bench measures.
#![allow(dead_code)]

use rota::core::*;
use rota::ids::{CategoryId, ClientId, LeadId, Millis, ProId, ShardKey, TenantId, ZoneId, DAY_MS};
use std::collections::BTreeMap;
use std::sync::Arc;

pub const T0: Millis = 1_795_424_400_000;

pub fn key() -> ShardKey {
    ShardKey {
        tenant: TenantId::new("t"),
        zone: ZoneId::new("bologna"),
        category: CategoryId::new("painting"),
    }
}

pub fn policy(mode: &str) -> Arc<Policy> {
    let text = match mode {
        "matched" => {
            "tenant = \"t\"\nmode = \"matched\"\n[leads]\noffer_fanout = 4\nresponse_window_s = 259200\n\
             duplicate_window_s = 0\n[money]\ncharge_on = \"never\"\n"
        }
        _ => {
            "tenant = \"t\"\nmode = \"auto_buy\"\n[leads]\nduplicate_window_s = 0\n[autobuy]\ngroup_size = 4\n\
             [money]\ncharge_on = \"dispatch\"\nflat_price_credits = 10\n\
             [pricing]\ntenant_factor_permille = 1000\nmin_price_credits = 1\nmax_price_credits = 40\n\
             credit_value_cents = 100\nchat_only_discount_permille = 300\nthin_details_discount_permille = 150\n\
             far_away_discount_permille = 200\nfar_away_km = 30\nproposals_ema_permille = 50\n\
             [pricing.default_category]\navg_job_value_cents = 5000\nconversion_permille = 200\n\
             avg_proposals_milli = 4000\n"
        }
    };
    Arc::new(Policy::from_toml(text).expect("bench policy is valid"))
}

pub fn all_week() -> WeeklyWindows {
    let days =
        [Weekday::Mon, Weekday::Tue, Weekday::Wed, Weekday::Thu, Weekday::Fri, Weekday::Sat, Weekday::Sun];
    WeeklyWindows {
        time_zone: "Europe/Rome".into(),
        intervals: days.iter().map(|&day| WeeklyInterval { day, start_min: 0, end_min: 1440 }).collect(),
    }
}

pub fn shard(mode: &str, pros: usize, paused_every: usize) -> Shard {
    shard_with_closed(mode, pros, paused_every, 0)
}

/// A window that is closed whenever the workloads run (one minute, Sunday 03:00 in Rome).
fn closed_week() -> WeeklyWindows {
    WeeklyWindows {
        time_zone: "Europe/Rome".into(),
        intervals: vec![WeeklyInterval { day: Weekday::Sun, start_min: 180, end_min: 181 }],
    }
}

/// [`shard`] where, with `open_every > 0`, only one pro in `open_every` is inside its
/// weekly schedule (the others' window is closed: a shard at night).
pub fn shard_with_closed(mode: &str, pros: usize, paused_every: usize, open_every: usize) -> Shard {
    let mut s = Shard::new(key(), policy(mode));
    for i in 0..pros {
        let pro = Pro {
            id: ProId::new(format!("pro-{i}")),
            categories: vec![CategoryId::new("painting")],
            zones: vec![ZoneId::new("bologna")],
            base: Some(GeoPoint { lat: 44.49, lon: 11.34 }),
            radius_km: Some(50.0),
            quality: Quality {
                reviews: (i % 50) as u32,
                rating_centi: 400,
                projects: 3,
                profile_permille: 800,
            },
            refuses: vec![],
            availability: Availability {
                paused_until: (paused_every > 0 && i % paused_every == 0).then_some(Millis::MAX / 4),
                vacation: None,
                schedule: Some(if open_every > 0 && i % open_every != 0 {
                    closed_week()
                } else {
                    all_week()
                }),
            },
            autobuy: vec![AutoBuyConfig {
                name: "weekly".into(),
                zones: vec![ZoneId::new("bologna")],
                categories: vec![CategoryId::new("painting")],
                weekly_budget_credits: 1000,
                max_price_credits: None,
                active: true,
                paused_until: None,
            }],
        };
        let d = s.decide(T0, &Command::UpsertPro { pro }, &Unlimited).expect("valid pro");
        for ev in &d.events {
            s.apply(ev);
        }
    }
    s
}

pub fn lead(n: u64, now: Millis) -> Lead {
    Lead {
        id: LeadId::new(format!("lead-{n}")),
        category: CategoryId::new("painting"),
        zone: ZoneId::new("bologna"),
        location: Some(GeoPoint { lat: 44.50, lon: 11.35 }),
        description: "Tinteggiatura di un appartamento di 80 mq, due camere".into(),
        details: BTreeMap::from([("rooms".into(), "3".into())]).into(),
        attributes: vec![],
        client: Client {
            id: ClientId::new(format!("client-{n}")),
            name: "Anna Rossi".into(),
            phone: "+39 333 1234567".into(),
            phone_verified: true,
            contact: ContactPrefs { call: true, whatsapp: false, chat: true },
            address: None,
            pro_id: None,
        },
        direct: vec![],
        kind: JobKind::Match,
        created_at: now,
    }
}

/// Closes and forgets every lead (outside the timed section).
pub fn drain(s: &mut Shard, now: &mut Millis) {
    for _ in 0..2 {
        *now += 30 * DAY_MS;
        let d = s.decide(*now, &Command::Tick, &Unlimited).expect("tick never fails");
        for ev in &d.events {
            s.apply(ev);
        }
    }
}
