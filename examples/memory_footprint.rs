//! Memory per pro and per open lead, measured on state built through the real code
//! paths: the ledger (credits, auto-buy budgets), every shard a pro covers
//! (`Shard::decide` + `apply` of `UpsertPro`), then leads published into their shard
//! (`decide`, the money intents executed on the ledger by `engine::money::execute`,
//! `apply`), the engine's lead index, and the stream hub's replay buffer fed with the
//! stream events of every decision.
//!
//! ```text
//! cargo run --release --example memory_footprint -- --pros 100000 --leads 1000000
//! ```
//!
//! Options: `--pros N`, `--leads N`, `--policy FILE` (a tenant policy, default
//! `config/tenants/fiverr.toml`: matched, 5 pros per lead with a response window),
//! `--zones N`, `--categories N`, `--retention N` (stream replay buffer, events),
//! `--seed N`.
//!
//! Bytes are counted by a global allocator that wraps the system one: live bytes
//! requested by the program (no allocator overhead), and live allocations. Resident
//! size (VmRSS) is printed too; it includes the allocator's per-chunk overhead and
//! freed memory it has not returned.
//!
//! Workload (deterministic for a seed, shaped like the load tool's generator): zones
//! and categories with Zipf popularity; each pro covers 1-3 zones and 1-2 categories
//! (Zipf 0.6), has credits and, one in five, an auto-buy config; leads fall on shards by
//! Zipf 1.0, one in ten names 1-2 direct targets, and every lead carries a location, a
//! description, a form answer and a client. Leads are published 10 ms apart (all stay
//! open: the lifetimes are days) and every shard is ticked at the end, so head starts
//! are over and every lead has had its release.

use rota::core::shard::{Command, Event, Reply};
use rota::core::*;
use rota::engine::hub::StreamHub;
use rota::engine::lead_index::LeadIndex;
use rota::engine::money::{self, LedgerFunds};
use rota::engine::record;
use rota::ids::{CategoryId, ClientId, LeadId, Millis, ProId, ShardKey, TenantId, ZoneId, MINUTE_MS};
use rota::ledger::{BudgetName, Ledger, OpId};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The system allocator, counting live bytes and allocations.
struct Counting;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);
static LIVE_ALLOCS: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
            LIVE_ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
            LIVE_ALLOCS.fetch_add(1, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        LIVE_ALLOCS.fetch_sub(1, Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE_BYTES.fetch_add(new_size as isize - layout.size() as isize, Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[derive(Clone, Copy, Debug)]
struct Mem {
    bytes: isize,
    allocs: isize,
    rss: isize,
}

fn mem() -> Mem {
    Mem {
        bytes: LIVE_BYTES.load(Ordering::Relaxed),
        allocs: LIVE_ALLOCS.load(Ordering::Relaxed),
        rss: rss_bytes(),
    }
}

/// VmRSS of this process, from `/proc/self/status` (0 where there is none).
fn rss_bytes() -> isize {
    let Ok(s) = std::fs::read_to_string("/proc/self/status") else { return 0 };
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<isize>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// A small deterministic generator (SplitMix64): the workload is the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Ranks 0..n with P(k) proportional to 1/(k+1)^s.
struct Zipf(Vec<f64>);

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n.max(1))
            .map(|k| {
                acc += 1.0 / (k as f64).powf(s);
                acc
            })
            .collect();
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf(cdf)
    }
    fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.0.partition_point(|&c| c < u).min(self.0.len() - 1)
    }
}

const ZONE_NAMES: [&str; 8] = ["milano", "roma", "torino", "napoli", "bologna", "firenze", "genova", "bari"];
const CATEGORY_NAMES: [&str; 8] =
    ["painting", "plumbing", "electrician", "cleaning", "moving", "gardening", "roofing", "tiling"];

fn zone_name(z: usize) -> String {
    ZONE_NAMES.get(z).map_or_else(|| format!("zone-{z:03}"), |s| s.to_string())
}

fn category_name(c: usize) -> String {
    CATEGORY_NAMES.get(c).map_or_else(|| format!("category-{c:03}"), |s| s.to_string())
}

struct Args {
    pros: usize,
    leads: usize,
    policy: String,
    zones: usize,
    categories: usize,
    retention: usize,
    seed: u64,
}

fn args() -> Args {
    let mut a = Args {
        pros: 100_000,
        leads: 200_000,
        policy: "config/tenants/fiverr.toml".into(),
        zones: 40,
        categories: 20,
        retention: 100_000,
        seed: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        let num = || value.parse::<usize>().unwrap_or_else(|_| panic!("{flag}: not a number: {value}"));
        match flag.as_str() {
            "--pros" => a.pros = num(),
            "--leads" => a.leads = num(),
            "--zones" => a.zones = num(),
            "--categories" => a.categories = num(),
            "--retention" => a.retention = num(),
            "--seed" => a.seed = num() as u64,
            "--policy" => a.policy = value,
            other => panic!("unknown option {other}"),
        }
    }
    a
}

const T0: Millis = 1_795_424_400_000;

fn main() {
    let a = args();
    let text = std::fs::read_to_string(&a.policy).unwrap_or_else(|e| panic!("{}: {e}", a.policy));
    let policy = Arc::new(Policy::from_toml(&text).unwrap_or_else(|e| panic!("{}: {e}", a.policy)));
    let tenant = TenantId::new(policy.tenant.as_str());
    let mut rng = Rng(a.seed);
    let started = Instant::now();

    let m0 = mem();
    let ledger = Ledger::new();
    let mut shards: HashMap<(usize, usize), Shard> = HashMap::new();
    let key = |z: usize, c: usize| ShardKey {
        tenant: tenant.clone(),
        zone: ZoneId::new(zone_name(z)),
        category: CategoryId::new(category_name(c)),
    };
    // Pros: coverage less concentrated than demand (the load tool's defaults).
    let zone_cov = Zipf::new(a.zones, 0.6);
    let cat_cov = Zipf::new(a.categories, 0.6);
    let mut covering: HashMap<(usize, usize), Vec<u32>> = HashMap::new();
    let mut memberships = 0usize;
    for i in 0..a.pros {
        let (nz, nc) = (1 + rng.below(3) as usize, 1 + rng.below(2) as usize);
        let (mut zones, mut cats) = (Vec::new(), Vec::new());
        while zones.len() < nz.min(a.zones) {
            let z = zone_cov.sample(&mut rng);
            if !zones.contains(&z) {
                zones.push(z);
            }
        }
        while cats.len() < nc.min(a.categories) {
            let c = cat_cov.sample(&mut rng);
            if !cats.contains(&c) {
                cats.push(c);
            }
        }
        let id = ProId::new(format!("pro-{i}"));
        let autobuy = if rng.below(5) == 0 {
            vec![AutoBuyConfig {
                name: "main".into(),
                zones: vec![ZoneId::new(zone_name(zones[0]))],
                categories: vec![CategoryId::new(category_name(cats[0]))],
                weekly_budget_credits: (1 + rng.below(20)) * 100,
                max_price_credits: Some(50),
                active: true,
                paused_until: None,
            }]
        } else {
            vec![]
        };
        let pro = Pro {
            id: id.clone(),
            categories: cats.iter().map(|&c| CategoryId::new(category_name(c))).collect(),
            zones: zones.iter().map(|&z| ZoneId::new(zone_name(z))).collect(),
            base: None,
            radius_km: None,
            quality: Quality {
                reviews: rng.below(200) as u32,
                rating_centi: 300 + rng.below(201) as u32,
                projects: rng.below(100) as u32,
                profile_permille: 500 + rng.below(501) as u32,
            },
            refuses: vec![],
            availability: Availability::default(),
            autobuy,
        };
        ledger.grant(OpId::new(format!("grant:{i}")), &tenant, &id, 100_000).expect("a valid grant");
        for cfg in &pro.autobuy {
            let name = BudgetName::new(&cfg.name);
            ledger
                .set_budget(OpId::new(format!("budget:{i}")), &tenant, &id, &name, cfg.weekly_budget_credits)
                .expect("a valid budget");
            ledger.recharge(OpId::new(format!("week:{i}")), &tenant, &id, &name).expect("the budget exists");
        }
        for &z in &zones {
            for &c in &cats {
                let shard = shards.entry((z, c)).or_insert_with(|| Shard::new(key(z, c), policy.clone()));
                let cmd = Command::UpsertPro { pro: pro.clone() };
                let d = shard.decide(T0, &cmd, &Unlimited).expect("a valid pro");
                for ev in &d.events {
                    shard.apply(ev);
                }
                covering.entry((z, c)).or_default().push(i as u32);
                memberships += 1;
            }
        }
    }
    let m1 = mem();

    // Leads.
    let index = LeadIndex::new();
    let hub = StreamHub::new(a.retention);
    let zone_pop = Zipf::new(a.zones, 1.0);
    let cat_pop = Zipf::new(a.categories, 1.0);
    let mut payload_bytes = 0isize;
    let mut wire_bytes = 0usize;
    let (mut accepted, mut offers) = (0usize, 0usize);
    let mut now = T0;
    let mut stream = Vec::new();
    let decide = |shard: &mut Shard, now: Millis, cmd: &Command, stream: &mut Vec<_>| {
        let funds = LedgerFunds { ledger: &ledger, tenant: &tenant, directory: None, now };
        let d = match shard.decide(now, cmd, &funds) {
            Ok(d) => d,
            Err(r) => panic!("refused: {r}"),
        };
        let mut events = d.events;
        let moved = money::execute(shard, &ledger, &tenant, now, &mut events).expect("funds were checked");
        for ev in &events {
            record::shard_stream_events(shard, ev, stream);
            shard.apply(ev);
            index.on_event(&shard.key, ev);
        }
        record::money_stream_events(&moved, stream);
        hub.publish(stream.drain(..));
        (d.reply, events)
    };
    let m1b = mem();
    for n in 0..a.leads {
        now = T0 + 10 * n as Millis;
        let (z, c) = (zone_pop.sample(&mut rng), cat_pop.sample(&mut rng));
        let shard_key = (z, c);
        let direct: Vec<ProId> = match covering.get(&shard_key) {
            Some(pros) if rng.below(10) == 0 => {
                let k = 1 + rng.below(2.min(pros.len() as u64)) as usize;
                let mut d: Vec<ProId> = Vec::new();
                while d.len() < k {
                    let p = ProId::new(format!("pro-{}", pros[rng.below(pros.len() as u64) as usize]));
                    if !d.contains(&p) {
                        d.push(p);
                    }
                }
                d
            }
            _ => vec![],
        };
        let contact = match rng.below(10) {
            0..=5 => ContactPrefs { call: true, whatsapp: false, chat: true },
            6..=7 => ContactPrefs { call: false, whatsapp: true, chat: true },
            _ => ContactPrefs { call: false, whatsapp: false, chat: true },
        };
        let (category, zone) = (category_name(c), zone_name(z));
        let before = LIVE_BYTES.load(Ordering::Relaxed);
        let lead = Arc::new(Lead {
            id: LeadId::new(format!("L{n}")),
            category: CategoryId::new(&category),
            zone: ZoneId::new(&zone),
            location: Some(GeoPoint {
                lat: 44.0 + rng.below(100_000) as f64 / 1e5,
                lon: 11.0 + rng.below(100_000) as f64 / 1e5,
            }),
            description: format!("Looking for {category} help in {zone}, flexible on dates"),
            details: Details::from([(
                "size".to_string(),
                ["small", "medium", "large"][rng.below(3) as usize].to_string(),
            )]),
            attributes: vec![],
            client: Client {
                id: ClientId::new(format!("c{n}")),
                name: format!("Client {n}"),
                phone: format!("+39 3{:09}", n % 1_000_000_000),
                phone_verified: true,
                contact,
                address: None,
                pro_id: None,
            },
            direct,
            kind: JobKind::Match,
            created_at: now,
        });
        payload_bytes += LIVE_BYTES.load(Ordering::Relaxed) - before;
        wire_bytes += rmp_serde::to_vec_named(&*lead).expect("plain data").len();
        let shard = shards.entry(shard_key).or_insert_with(|| Shard::new(key(z, c), policy.clone()));
        let cmd = Command::PublishLead { lead };
        let (reply, events) = decide(shard, now, &cmd, &mut stream);
        offers += granted(&events);
        drop(cmd);
        if let Reply::Lead(o) = reply {
            if o.status == LeadStatus::Accepted {
                accepted += 1;
            }
        }
    }
    // Head starts are over: every lead has had its release.
    now += policy.head_start.max(0) + MINUTE_MS;
    let mut ticked: Vec<_> = shards.keys().copied().collect();
    ticked.sort_unstable();
    for k in ticked {
        let shard = shards.get_mut(&k).expect("listed above");
        offers += granted(&decide(shard, now, &Command::Tick, &mut stream).1);
    }
    let open: usize = shards.values().map(Shard::open_leads).sum();
    let m2 = mem();
    let hub_before = mem();
    drop(hub);
    let hub_bytes = hub_before.bytes - mem().bytes;
    // The example's own list of who covers what is not the daemon's.
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    drop(covering);
    let covering_bytes = before - LIVE_BYTES.load(Ordering::Relaxed);
    let elapsed = started.elapsed();

    let per = |d: isize, n: usize| d as f64 / n.max(1) as f64;
    let pros_bytes = m1.bytes - m0.bytes - covering_bytes;
    let leads_bytes = m2.bytes - m1b.bytes - hub_bytes;
    let payload = per(payload_bytes, a.leads);
    println!(
        "policy {} ({:?}), {} shards, {} pro memberships",
        a.policy,
        policy.mode,
        shards.len(),
        memberships
    );
    println!(
        "{} pros, {} leads published, {} accepted, {} open, {} offers ({:.2} per open lead), {:.1} s",
        a.pros,
        a.leads,
        accepted,
        open,
        offers,
        offers as f64 / open.max(1) as f64,
        elapsed.as_secs_f64()
    );
    println!();
    println!("| what | heap bytes | allocations | VmRSS |");
    println!("|---|---|---|---|");
    println!(
        "| per pro | {:.0} | {:.1} | {:.0} |",
        per(pros_bytes, a.pros),
        per(m1.allocs - m0.allocs, a.pros),
        per(m1.rss - m0.rss, a.pros)
    );
    println!(
        "| per open lead, everything | {:.0} | {:.1} | {:.0} |",
        per(leads_bytes, open),
        per(m2.allocs - m1b.allocs, open),
        per(m2.rss - m1b.rss, open)
    );
    println!("| lead payload (`Arc<Lead>` and its strings) | {payload:.0} | | |");
    println!("| **per open lead beyond its payload** | **{:.0}** | | |", per(leads_bytes, open) - payload);
    println!("| lead payload as MessagePack (for scale) | {:.0} | | |", per(wire_bytes as isize, a.leads));
    println!("| stream replay buffer ({} events), not per lead | {} total | | |", a.retention, hub_bytes);
    println!();
    println!(
        "heap total {:.1} MiB, VmRSS {:.1} MiB",
        m2.bytes as f64 / 1048576.0,
        rss_bytes() as f64 / 1048576.0
    );
    // What a start from a snapshot of this state spends in the pass that forgets the op
    // ids of leads no shard holds (left by releases before 2026-12-07, see
    // `money::forget_ops_of_leads_not_held`), with the lead index built above.
    let shards: rustc_hash::FxHashMap<ShardKey, Shard> =
        shards.into_values().map(|sh| (sh.key.clone(), sh)).collect();
    let held = shards.values().map(Shard::open_leads).sum::<usize>();
    // What every start spends rebuilding the lead index from the recovered shards.
    let rebuild = Instant::now();
    let rebuilt = LeadIndex::from_shards(shards.values());
    println!(
        "lead index rebuilt from the shards at start: {} entries, {:.0} ms",
        rebuilt.len(),
        rebuild.elapsed().as_secs_f64() * 1000.0
    );
    drop(rebuilt);
    let pass = Instant::now();
    let forgotten = money::forget_ops_of_leads_not_held(&ledger, &index, &shards);
    println!(
        "start-time pass over {} op ids and {} held leads: {:.0} ms ({} forgotten)",
        ledger.registered_ops(),
        held,
        pass.elapsed().as_secs_f64() * 1000.0,
        forgotten
    );
}

/// Offers made by a decision's events.
fn granted(events: &[Event]) -> usize {
    events.iter().map(|e| if let Event::Offered { grants, .. } = e { grants.len() } else { 0 }).sum()
}
