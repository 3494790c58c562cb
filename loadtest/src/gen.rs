//! A synthetic marketplace at peak, deterministic from a seed.
//!
//! The model: zones and categories have Zipf-skewed popularity (a few cities and
//! services get most of the traffic); pros cover a few of each (also skewed, less
//! steeply); clients post leads at a Poisson rate with periodic bursts; a share of
//! leads names direct targets; pros respond, decline, pause, join, get topped up;
//! clients reply to pros. The generator keeps a small model of who covers which shard
//! and who is paused, so responses go to pros that were actually offered the lead
//! under a shared policy with `offer_fanout = "all"` (the demo tenant's).

use crate::trace::{Record, TRACE_EPOCH_MS};
use crate::wire::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, clap::Args)]
pub struct GenConfig {
    /// Seed: the same seed and options give the same trace, byte for byte.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Leads in the trace.
    #[arg(long, default_value_t = 100_000)]
    pub leads: u64,
    /// Base lead rate of the trace's own timeline, leads/s (replay can retime it).
    #[arg(long, default_value_t = 2_000.0)]
    pub lead_rate: f64,
    /// Pros present at the start.
    #[arg(long, default_value_t = 400)]
    pub pros: u32,
    #[arg(long, default_value_t = 40)]
    pub zones: u32,
    #[arg(long, default_value_t = 20)]
    pub categories: u32,
    /// Zipf exponent of lead popularity over zones and categories.
    #[arg(long, default_value_t = 1.0)]
    pub zipf: f64,
    /// Zipf exponent of pro coverage (pros are less concentrated than demand).
    #[arg(long, default_value_t = 0.6)]
    pub pro_zipf: f64,
    /// Tenants; 1 = every record goes to the default tenant (no `tenant` field).
    #[arg(long, default_value_t = 1)]
    pub tenants: u32,
    /// Share of leads with direct targets (R5).
    #[arg(long, default_value_t = 0.1)]
    pub direct_share: f64,
    /// Share of leads that get at least one response.
    #[arg(long, default_value_t = 0.4)]
    pub respond_share: f64,
    /// Share of leads that get a decline.
    #[arg(long, default_value_t = 0.1)]
    pub decline_share: f64,
    /// Share of responses the client replies to.
    #[arg(long, default_value_t = 0.5)]
    pub client_reply_share: f64,
    /// Share of pros with auto-buy configs.
    #[arg(long, default_value_t = 0.2)]
    pub autobuy_share: f64,
    /// Pros joining per second of trace time.
    #[arg(long, default_value_t = 0.5)]
    pub joins_per_s: f64,
    /// Pauses (set_availability) per second of trace time.
    #[arg(long, default_value_t = 1.0)]
    pub pauses_per_s: f64,
    /// Credit top-ups (grant_credits) per second of trace time.
    #[arg(long, default_value_t = 2.0)]
    pub topups_per_s: f64,
    /// A burst starts every this many seconds of trace time (0 = no bursts).
    #[arg(long, default_value_t = 10.0)]
    pub burst_every_s: f64,
    #[arg(long, default_value_t = 1.0)]
    pub burst_len_s: f64,
    /// Lead rate multiplier during a burst.
    #[arg(long, default_value_t = 3.0)]
    pub burst_factor: f64,
    /// Share of leads that repeat a recent client in the same shard (rejected as `duplicate`).
    #[arg(long, default_value_t = 0.005)]
    pub duplicate_share: f64,
    /// Share of leads with an unverified phone (rejected as `phone_unverified`).
    #[arg(long, default_value_t = 0.005)]
    pub unverified_share: f64,
    /// Credits each pro gets when it joins.
    #[arg(long, default_value_t = 100_000)]
    pub initial_credits: u64,
}

impl Default for GenConfig {
    fn default() -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct P {
            #[command(flatten)]
            g: GenConfig,
        }
        P::parse_from(["gen"]).g
    }
}

/// What the generator made, for the user and the tests.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GenStats {
    pub records: u64,
    pub setup_records: u64,
    pub leads: u64,
    pub direct_leads: u64,
    pub pros: u64,
    pub by_type: BTreeMap<String, u64>,
    /// Mean number of pros a lead is offered to, by the generator's model.
    pub mean_offers_per_lead: f64,
    pub span_ms: u64,
}

/// Samples ranks 0..n with P(k) proportional to 1/(k+1)^s.
pub struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub fn new(n: u32, s: f64) -> Self {
        let mut cdf = Vec::with_capacity(n as usize);
        let mut acc = 0.0;
        for k in 1..=n.max(1) {
            acc += 1.0 / (k as f64).powf(s);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf { cdf }
    }

    pub fn sample(&self, rng: &mut impl Rng) -> usize {
        let u: f64 = rng.gen();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

const CATEGORY_NAMES: [&str; 8] =
    ["painting", "plumbing", "electrician", "cleaning", "moving", "gardening", "roofing", "tiling"];
const ZONE_NAMES: [&str; 8] = ["milano", "roma", "torino", "napoli", "bologna", "firenze", "genova", "bari"];
const ZONE_CENTRES: [(f64, f64); 8] = [
    (45.46, 9.19),
    (41.90, 12.50),
    (45.07, 7.69),
    (40.85, 14.27),
    (44.49, 11.34),
    (43.77, 11.25),
    (44.41, 8.93),
    (41.12, 16.87),
];

fn zone_name(z: usize) -> String {
    ZONE_NAMES.get(z).map(|s| s.to_string()).unwrap_or_else(|| format!("zone-{z:03}"))
}

fn category_name(c: usize) -> String {
    CATEGORY_NAMES.get(c).map(|s| s.to_string()).unwrap_or_else(|| format!("service-{c:03}"))
}

fn zone_centre(z: usize) -> (f64, f64) {
    ZONE_CENTRES.get(z).copied().unwrap_or((44.0 + (z % 10) as f64 * 0.2, 9.0 + (z / 10) as f64 * 0.3))
}

struct ProModel {
    id: String,
    tenant: u32,
    paused_until_ms: u64,
}

struct Gen<'a> {
    cfg: &'a GenConfig,
    rng: StdRng,
    out: Vec<(u64, u64, Record)>,
    seq: u64,
    pros: Vec<ProModel>,
    /// (tenant, zone, category) -> pros covering it, in joining order.
    shards: HashMap<(u32, usize, usize), Vec<u32>>,
    /// Last client per shard, for duplicates.
    last_client: HashMap<(u32, usize, usize), String>,
    zone_pop: Zipf,
    cat_pop: Zipf,
    zone_cov: Zipf,
    cat_cov: Zipf,
    next_op: u64,
    stats: GenStats,
    offers_sum: u64,
}

impl Gen<'_> {
    fn push(&mut self, at_ms: u64, tenant: u32, request: Request) {
        let tenant = (self.cfg.tenants > 1).then(|| format!("tenant-{tenant}"));
        self.out.push((at_ms, self.seq, Record { at_ms, tenant, request }));
        self.seq += 1;
    }

    fn op(&mut self) -> String {
        self.next_op += 1;
        format!("pay-{}", self.next_op)
    }

    fn join_pro(&mut self, at_ms: u64) {
        let n = self.pros.len() as u32;
        let tenant = n % self.cfg.tenants.max(1);
        let id = format!("pro-{n}");
        let nz = self.rng.gen_range(1..=3);
        let nc = self.rng.gen_range(1..=2);
        let mut zones = Vec::new();
        let mut cats = Vec::new();
        while zones.len() < nz {
            let z = self.zone_cov.sample(&mut self.rng);
            if !zones.contains(&z) {
                zones.push(z);
            }
        }
        while cats.len() < nc {
            let c = self.cat_cov.sample(&mut self.rng);
            if !cats.contains(&c) {
                cats.push(c);
            }
        }
        for &z in &zones {
            for &c in &cats {
                self.shards.entry((tenant, z, c)).or_default().push(n);
            }
        }
        let autobuy = if self.rng.gen_bool(self.cfg.autobuy_share.clamp(0.0, 1.0)) {
            vec![AutoBuyConfig {
                name: "main".into(),
                zones: vec![zone_name(zones[0])],
                categories: vec![category_name(cats[0])],
                weekly_budget_credits: self.rng.gen_range(1..=20) * 100,
                max_price_credits: Some(50),
                active: true,
                paused_until: None,
            }]
        } else {
            vec![]
        };
        let pro = Pro {
            id: id.clone(),
            categories: cats.iter().map(|&c| category_name(c)).collect(),
            zones: zones.iter().map(|&z| zone_name(z)).collect(),
            base: None,
            radius_km: None,
            quality: Quality {
                reviews: self.rng.gen_range(0..200),
                rating_centi: self.rng.gen_range(300..=500),
                projects: self.rng.gen_range(0..100),
                profile_permille: self.rng.gen_range(500..=1000),
            },
            refuses: vec![],
            availability: Availability::default(),
            autobuy,
        };
        self.push(at_ms, tenant, Request::UpsertPro { pro });
        let op = self.op();
        self.push(
            at_ms,
            tenant,
            Request::GrantCredits { pro: id.clone(), op, credits: self.cfg.initial_credits },
        );
        if self.rng.gen_bool(0.3) {
            let rule = Some(TopupRule { threshold_credits: 100, amount_credits: 1_000 });
            self.push(at_ms, tenant, Request::SetTopupRule { pro: id.clone(), rule });
        }
        self.pros.push(ProModel { id, tenant, paused_until_ms: 0 });
        self.stats.pros += 1;
    }

    fn lead(&mut self, at_ms: u64, n: u64) {
        let cfg = self.cfg;
        let tenant = (n % u64::from(cfg.tenants.max(1))) as u32;
        let z = self.zone_pop.sample(&mut self.rng);
        let c = self.cat_pop.sample(&mut self.rng);
        let key = (tenant, z, c);
        let available: Vec<u32> = self
            .shards
            .get(&key)
            .map(|v| v.iter().copied().filter(|&p| self.pros[p as usize].paused_until_ms <= at_ms).collect())
            .unwrap_or_default();
        let lead_id = format!("L{n}");
        let mut client_id = format!("c{n}");
        let mut rejected = false;
        if let Some(prev) = self.last_client.get(&key) {
            if self.rng.gen_bool(cfg.duplicate_share.clamp(0.0, 1.0)) {
                client_id = prev.clone();
                rejected = true;
            }
        }
        let phone_verified = !self.rng.gen_bool(cfg.unverified_share.clamp(0.0, 1.0));
        rejected |= !phone_verified;
        if !rejected {
            self.last_client.insert(key, client_id.clone());
        }
        let mut direct = Vec::new();
        if !available.is_empty() && self.rng.gen_bool(cfg.direct_share.clamp(0.0, 1.0)) {
            let k = self.rng.gen_range(1..=2.min(available.len()));
            while direct.len() < k {
                let p = available[self.rng.gen_range(0..available.len())];
                if !direct.contains(&p) {
                    direct.push(p);
                }
            }
        }
        let contact = match self.rng.gen_range(0..10) {
            0..=5 => ContactPrefs { call: true, whatsapp: false, chat: true },
            6..=7 => ContactPrefs { call: false, whatsapp: true, chat: true },
            _ => ContactPrefs { call: false, whatsapp: false, chat: true },
        };
        let (lat0, lon0) = zone_centre(z);
        let round = |x: f64| (x * 1e5).round() / 1e5;
        let location = GeoPoint {
            lat: round(lat0 + self.rng.gen_range(-0.05..0.05)),
            lon: round(lon0 + self.rng.gen_range(-0.05..0.05)),
        };
        let category = category_name(c);
        let details: BTreeMap<String, String> = match c {
            0 => [("rooms".to_string(), self.rng.gen_range(1..6).to_string())].into(),
            1 => [("problem".to_string(), "leaking pipe under the sink".to_string())].into(),
            _ => [("size".to_string(), ["small", "medium", "large"][self.rng.gen_range(0..3)].to_string())]
                .into(),
        };
        let lead = Lead {
            id: lead_id.clone(),
            category: category.clone(),
            zone: zone_name(z),
            location: Some(location),
            description: format!("Looking for {category} help in {}, flexible on dates", zone_name(z)),
            details,
            attributes: vec![],
            client: Client {
                id: client_id,
                name: format!("Client {n}"),
                phone: format!("+39 3{:09}", n % 1_000_000_000),
                phone_verified,
                contact,
                address: None,
                pro_id: None,
            },
            direct: direct.iter().map(|&p| self.pros[p as usize].id.clone()).collect(),
            kind: "match".into(),
            created_at: TRACE_EPOCH_MS + at_ms as i64,
        };
        self.push(at_ms, tenant, Request::PublishLead { lead });
        self.stats.leads += 1;
        if rejected {
            return;
        }
        if !direct.is_empty() {
            self.stats.direct_leads += 1;
        }
        // Offered to: the direct targets now (generic release after the head start),
        // or every available covering pro (fanout "all").
        let offered: Vec<u32> = if direct.is_empty() { available } else { direct };
        self.offers_sum += offered.len() as u64;
        if offered.is_empty() {
            return;
        }
        let mut pool = offered;
        if self.rng.gen_bool(cfg.respond_share.clamp(0.0, 1.0)) {
            let k = self.rng.gen_range(1..=3.min(pool.len()));
            for _ in 0..k {
                let p = pool.swap_remove(self.rng.gen_range(0..pool.len()));
                let t = at_ms + self.rng.gen_range(200..5_000);
                let pro = self.pros[p as usize].id.clone();
                let respond =
                    Request::Offer { lead: lead_id.clone(), pro: pro.clone(), action: OfferAction::Respond };
                self.push(t, tenant, respond);
                if self.rng.gen_bool(cfg.client_reply_share.clamp(0.0, 1.0)) {
                    let t2 = t + self.rng.gen_range(1_000..10_000);
                    let reply =
                        Request::Offer { lead: lead_id.clone(), pro, action: OfferAction::ClientReplied };
                    self.push(t2, tenant, reply);
                }
            }
        }
        if !pool.is_empty() && self.rng.gen_bool(cfg.decline_share.clamp(0.0, 1.0)) {
            let p = pool[self.rng.gen_range(0..pool.len())];
            let t = at_ms + self.rng.gen_range(200..5_000);
            let decline = Request::Offer {
                lead: lead_id,
                pro: self.pros[p as usize].id.clone(),
                action: OfferAction::Decline { by: "pro".into() },
            };
            self.push(t, tenant, decline);
        }
    }

    fn pause(&mut self, at_ms: u64) {
        if self.pros.is_empty() {
            return;
        }
        let p = self.rng.gen_range(0..self.pros.len());
        let until = at_ms + self.rng.gen_range(5_000..60_000);
        self.pros[p].paused_until_ms = until;
        let (pro, tenant) = (self.pros[p].id.clone(), self.pros[p].tenant);
        let availability =
            Availability { paused_until: Some(TRACE_EPOCH_MS + until as i64), ..Default::default() };
        self.push(at_ms, tenant, Request::SetAvailability { pro, availability });
    }

    fn topup(&mut self, at_ms: u64) {
        if self.pros.is_empty() {
            return;
        }
        let p = self.rng.gen_range(0..self.pros.len());
        let (pro, tenant) = (self.pros[p].id.clone(), self.pros[p].tenant);
        let op = self.op();
        let credits = self.rng.gen_range(1..=10) * 100;
        self.push(at_ms, tenant, Request::GrantCredits { pro, op, credits });
    }
}

fn exp_gap_ms(rng: &mut StdRng, rate_per_s: f64) -> f64 {
    let u: f64 = rng.gen_range(f64::EPSILON..1.0);
    -u.ln() / rate_per_s * 1000.0
}

/// Generates a trace. Setup (the initial pros and their credits) is at `at_ms = 0`;
/// the first lead comes after it.
pub fn generate(cfg: &GenConfig) -> (Vec<Record>, GenStats) {
    assert!(cfg.lead_rate > 0.0, "lead rate must be positive");
    let mut g = Gen {
        cfg,
        rng: StdRng::seed_from_u64(cfg.seed),
        out: Vec::new(),
        seq: 0,
        pros: Vec::new(),
        shards: HashMap::new(),
        last_client: HashMap::new(),
        zone_pop: Zipf::new(cfg.zones.max(1), cfg.zipf),
        cat_pop: Zipf::new(cfg.categories.max(1), cfg.zipf),
        zone_cov: Zipf::new(cfg.zones.max(1), cfg.pro_zipf),
        cat_cov: Zipf::new(cfg.categories.max(1), cfg.pro_zipf),
        next_op: 0,
        stats: GenStats::default(),
        offers_sum: 0,
    };
    for _ in 0..cfg.pros {
        g.join_pro(0);
    }
    let setup = g.out.len() as u64;
    // Leads: Poisson arrivals, faster during bursts. Background events: their own
    // Poisson processes, interleaved by time.
    let mut t = 1.0f64;
    let (mut next_join, mut next_pause, mut next_topup) = (f64::MAX, f64::MAX, f64::MAX);
    if cfg.joins_per_s > 0.0 {
        next_join = exp_gap_ms(&mut g.rng, cfg.joins_per_s);
    }
    if cfg.pauses_per_s > 0.0 {
        next_pause = exp_gap_ms(&mut g.rng, cfg.pauses_per_s);
    }
    if cfg.topups_per_s > 0.0 {
        next_topup = exp_gap_ms(&mut g.rng, cfg.topups_per_s);
    }
    for n in 1..=cfg.leads {
        let in_burst = cfg.burst_every_s > 0.0
            && (t / 1000.0) % cfg.burst_every_s >= cfg.burst_every_s - cfg.burst_len_s;
        let rate = if in_burst { cfg.lead_rate * cfg.burst_factor } else { cfg.lead_rate };
        t += exp_gap_ms(&mut g.rng, rate);
        while next_join.min(next_pause).min(next_topup) <= t {
            if next_join <= next_pause && next_join <= next_topup {
                g.join_pro(next_join as u64);
                next_join += exp_gap_ms(&mut g.rng, cfg.joins_per_s);
            } else if next_pause <= next_topup {
                g.pause(next_pause as u64);
                next_pause += exp_gap_ms(&mut g.rng, cfg.pauses_per_s);
            } else {
                g.topup(next_topup as u64);
                next_topup += exp_gap_ms(&mut g.rng, cfg.topups_per_s);
            }
        }
        g.lead(t as u64 + 1, n);
    }
    g.out.sort_by_key(|(at, seq, _)| (*at, *seq));
    let mut stats = g.stats;
    stats.records = g.out.len() as u64;
    stats.setup_records = setup;
    stats.mean_offers_per_lead = g.offers_sum as f64 / stats.leads.max(1) as f64;
    stats.span_ms = g.out.last().map(|r| r.0).unwrap_or(0);
    for (_, _, r) in &g.out {
        *stats.by_type.entry(r.request.name().to_string()).or_default() += 1;
    }
    (g.out.into_iter().map(|(_, _, r)| r).collect(), stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::{read_from, write_to, Format};

    fn small(seed: u64) -> GenConfig {
        GenConfig {
            seed,
            leads: 2_000,
            lead_rate: 200.0,
            pros: 50,
            zones: 6,
            categories: 4,
            ..GenConfig::default()
        }
    }

    #[test]
    fn same_seed_same_trace_different_seed_different_trace() {
        let (a, _) = generate(&small(7));
        let (b, _) = generate(&small(7));
        let (c, _) = generate(&small(8));
        let bytes = |r: &[Record]| {
            let mut v = Vec::new();
            write_to(Format::Msgpack, r, &mut v).unwrap();
            v
        };
        assert_eq!(bytes(&a), bytes(&b));
        assert_ne!(bytes(&a), bytes(&c));
    }

    #[test]
    fn trace_follows_the_format_in_both_encodings() {
        let (recs, stats) = generate(&small(3));
        assert_eq!(stats.leads, 2_000);
        assert_eq!(stats.records as usize, recs.len());
        // Setup first, at time zero, then leads; times never go backwards.
        let first_lead = recs.iter().position(|r| matches!(r.request, Request::PublishLead { .. })).unwrap();
        assert_eq!(first_lead as u64, stats.setup_records);
        assert!(recs[..first_lead].iter().all(|r| r.at_ms == 0));
        assert!(recs[first_lead].at_ms > 0);
        crate::trace::check(&recs).unwrap();
        for fmt in [Format::JsonLines, Format::Msgpack] {
            let mut buf = Vec::new();
            write_to(fmt, &recs, &mut buf).unwrap();
            let back = read_from(fmt, &buf[..]).unwrap();
            assert_eq!(back.len(), recs.len());
            if let Some(i) = (0..recs.len()).find(|&i| back[i] != recs[i]) {
                panic!("{fmt:?}: record {i} differs: {:?} != {:?}", back[i], recs[i]);
            }
        }
        // One JSON object per line, with at_ms and a protocol request with a type.
        let mut buf = Vec::new();
        write_to(Format::JsonLines, &recs[..3], &mut buf).unwrap();
        for line in std::str::from_utf8(&buf).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(v["at_ms"].is_u64(), "{line}");
            assert!(v["request"]["type"].is_string(), "{line}");
            assert!(v["request"].get("id").is_none(), "the replayer adds correlation ids: {line}");
        }
        // Every kind of traffic the brief asks for shows up.
        for t in
            ["publish_lead", "upsert_pro", "grant_credits", "offer", "set_availability", "set_topup_rule"]
        {
            assert!(stats.by_type.get(t).copied().unwrap_or(0) > 0, "no {t} in {:?}", stats.by_type);
        }
        assert!(stats.direct_leads > 0);
    }

    #[test]
    fn responses_come_after_their_lead_and_from_offered_pros() {
        let (recs, _) = generate(&small(5));
        let mut published = HashMap::new();
        for r in &recs {
            match &r.request {
                Request::PublishLead { lead } => {
                    published.insert(lead.id.clone(), lead.clone());
                }
                Request::Offer { lead, pro, action: OfferAction::Respond } => {
                    let l = published.get(lead).expect("respond after publish");
                    if !l.direct.is_empty() {
                        assert!(l.direct.contains(pro), "direct leads are answered by their targets");
                    }
                }
                _ => {}
            }
        }
    }

    #[test]
    fn zipf_is_skewed_towards_low_ranks() {
        let z = Zipf::new(10, 1.0);
        let mut rng = StdRng::seed_from_u64(1);
        let mut counts = [0u32; 10];
        for _ in 0..10_000 {
            counts[z.sample(&mut rng)] += 1;
        }
        assert!(counts[0] > 2 * counts[4] && counts[4] > counts[9], "{counts:?}");
    }
}
