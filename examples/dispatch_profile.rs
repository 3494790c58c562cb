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
//! Arguments: mode (`matched` | `auto_buy`), pros, paused_every (0 = none), leads.

use rota::core::*;
use rota::ids::{CategoryId, ClientId, LeadId, Millis, ProId, ShardKey, TenantId, ZoneId, DAY_MS};
use std::collections::BTreeMap;
use std::sync::Arc;

const T0: Millis = 1_795_424_400_000;

fn key() -> ShardKey {
    ShardKey {
        tenant: TenantId::new("t"),
        zone: ZoneId::new("bologna"),
        category: CategoryId::new("painting"),
    }
}

fn policy(mode: &str) -> Arc<Policy> {
    let text = match mode {
        "matched" => {
            "tenant = \"t\"\nmode = \"matched\"\n[leads]\noffer_fanout = 4\nresponse_window_s = 259200\n\
             duplicate_window_s = 0\n[money]\ncharge_on = \"never\"\n"
        }
        _ => {
            "tenant = \"t\"\nmode = \"auto_buy\"\n[leads]\nduplicate_window_s = 0\n[autobuy]\ngroup_size = 4\n\
             [money]\ncharge_on = \"dispatch\"\nflat_price_credits = 10\n"
        }
    };
    Arc::new(Policy::from_toml(text).expect("bench policy is valid"))
}

fn all_week() -> WeeklyWindows {
    let days =
        [Weekday::Mon, Weekday::Tue, Weekday::Wed, Weekday::Thu, Weekday::Fri, Weekday::Sat, Weekday::Sun];
    WeeklyWindows {
        time_zone: "Europe/Rome".into(),
        intervals: days.iter().map(|&day| WeeklyInterval { day, start_min: 0, end_min: 1440 }).collect(),
    }
}

fn shard(mode: &str, pros: usize, paused_every: usize) -> Shard {
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
                schedule: Some(all_week()),
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

fn lead(n: u64, now: Millis) -> Lead {
    Lead {
        id: LeadId::new(format!("lead-{n}")),
        category: CategoryId::new("painting"),
        zone: ZoneId::new("bologna"),
        location: Some(GeoPoint { lat: 44.50, lon: 11.35 }),
        description: "Tinteggiatura di un appartamento di 80 mq, due camere".into(),
        details: BTreeMap::from([("rooms".into(), "3".into())]),
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
fn drain(s: &mut Shard, now: &mut Millis) {
    for _ in 0..2 {
        *now += 30 * DAY_MS;
        let d = s.decide(*now, &Command::Tick, &Unlimited).expect("tick never fails");
        for ev in &d.events {
            s.apply(ev);
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map_or("matched", String::as_str);
    let pros: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let paused_every: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(0);
    let leads: u64 = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let mut s = shard(mode, pros, paused_every);
    let mut now = T0;
    let mut offers = 0usize;
    for n in 0..leads {
        let cmd = Command::PublishLead { lead: lead(n, now) };
        let d = s.decide(now, &cmd, &Unlimited).expect("the profile lead is valid");
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
