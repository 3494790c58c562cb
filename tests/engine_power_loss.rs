//! The whole engine, in-process, under simulated power loss and disk faults.
//!
//! Each seed starts an [`Engine`] on a fresh [`MemFs`] (manual clock, `wal.fsync =
//! "always"`), drives a seeded random workload through `Engine::request` with many
//! requests in flight at once, and cuts the power at a random moment: either at a
//! random disk operation (often between a write and its sync) or from the outside
//! while a batch is half answered. The engine that lost power is abandoned (its
//! actor system is stopped) and a new one recovers from the same filesystem. An
//! auditor then compares it with what the client was told:
//!
//! * every acknowledged lead is there: `explain` answers, a republish answers the
//!   original result;
//! * every acknowledged response is charged, exactly once: the offers a pro has
//!   responded to (the contact is revealed) include every acknowledged response and
//!   nothing beyond the responses still in flight, and `captured` is exactly the sum
//!   of their prices;
//! * every acknowledged grant is counted once; `granted` lies between the
//!   acknowledged grants and those plus the grants in flight, and is exact once the
//!   in-flight grants are retried (grants are idempotent by op id);
//! * money is conserved: `granted + refunded = available + held + captured`;
//! * nothing is invented: every offer a pro sees belongs to a lead that was sent.
//!
//! Snapshots are taken between batches and, in one batch of four, on another thread
//! while the batch's requests are being decided: the snapshot's cut lands in the
//! middle of traffic, and shards, accounts and leads changed while it is encoded are
//! copied on write. Recovery then starts from such a snapshot (or from the log, when
//! the power went out during one).
//!
//! The same check, run with the WAL's hidden `unsafe_skip_sync` switch, must fail for
//! most seeds: that is what shows it can tell a log that syncs from one that does not.
//!
//! `ROTA_SIM_SEEDS=N` runs N seeds (default 100); `ROTA_SIM_SEED=S` runs only seed S.

mod engine_support;
use engine_support::{in_system, req};
use futures_util::future::join_all;
use futures_util::stream::{FuturesUnordered, StreamExt};
use rota::config::{Config, Sources};
use rota::engine::Engine;
use rota::ids::TenantId;
use rota::protocol::{ApiError, OkResult, Request};
use rota::wal::{Fault, MemFs};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PROS: usize = 6;
const T0: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
const LIVES: usize = 3;
/// Guards against a hang only (a request that never answers is a bug); never a
/// timing assertion.
const HANG: Duration = Duration::from_secs(60);

/// xorshift64*: small, seeded, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform enough in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        (!items.is_empty()).then(|| &items[self.below(items.len() as u64) as usize])
    }
}

fn pro_id(i: usize) -> String {
    format!("p{i}")
}

fn lead_body(id: &str, direct: &[String]) -> Value {
    json!({
        "id": id, "category": "painting", "zone": "bologna",
        "description": "Repaint a two-room flat in Bologna, walls and ceilings",
        "client": {"id": format!("client-{id}"), "name": "Anna Rossi", "phone": "+39 333 1234567",
                   "phone_verified": true, "contact": {"call": true, "chat": true}},
        "direct": direct, "created_at": T0
    })
}

/// `spilling`: a stream buffer small enough that the history on disk is written
/// during the test (not where a test injects a fault into the next write or sync:
/// the history's writer, a thread of its own, could take it instead of the log).
fn config(skip_sync: bool, preallocate: bool, spilling: bool) -> Config {
    let flags = [
        "clock=\"manual\"".to_string(),
        format!("manual_clock_start_ms={T0}"),
        "data_dir=\"/mem\"".into(),
        "arbiters=2".into(),
        "wal.fsync=\"always\"".into(),
        // Small segments: snapshots compact several, and with preallocation later
        // segments are made from recycled files, so cuts land on those too.
        "wal.segment_bytes=16384".into(),
        // A small stream buffer: most of the stream lives in the history on disk,
        // which the cuts hit too (small segments: several per life).
        format!("stream_retention_events={}", if spilling { 16 } else { 1_000_000 }),
        "stream_spill_bytes=4194304".into(),
        format!("wal.preallocate={preallocate}"),
    ];
    let mut cfg = Config::load(&Sources { flags: flags.to_vec(), ..Default::default() })
        .expect("the test configuration is valid");
    cfg.wal.unsafe_skip_sync = skip_sync;
    cfg
}

/// What a reply tells the client about whether a request took effect.
enum Outcome {
    Acked(Value),
    /// `unavailable`: the request may or may not have become durable.
    InDoubt,
    /// Refused before anything was logged.
    Refused,
}

fn outcome(r: Result<OkResult, ApiError>) -> Outcome {
    match r {
        Ok(ok) => Outcome::Acked(serde_json::to_value(ok).expect("replies serialise")),
        Err(e) if e.code == "unavailable" => Outcome::InDoubt,
        Err(_) => Outcome::Refused,
    }
}

/// What the client was told, and what it is still unsure about.
#[derive(Default)]
struct Model {
    /// Acknowledged publishes: body and result.
    leads: BTreeMap<String, (Value, Value)>,
    leads_in_doubt: BTreeMap<String, Value>,
    price: BTreeMap<String, u64>,
    /// (lead, pro) offers of acknowledged accepted leads.
    offers: Vec<(String, String)>,
    responses: BTreeSet<(String, String)>,
    responses_in_doubt: BTreeSet<(String, String)>,
    /// op -> (pro, credits)
    grants: BTreeMap<String, (String, u64)>,
    grants_in_doubt: BTreeMap<String, (String, u64)>,
    next_lead: u64,
    next_grant: u64,
    now: i64,
    /// The tenant's stream as a resume from 0 got it at the last audit.
    stream: Vec<(u64, rota::protocol::StreamEvent)>,
}

impl Model {
    fn granted(&self, p: &str, with_doubt: bool) -> u64 {
        let doubt = self.grants_in_doubt.values().filter(|_| with_doubt);
        self.grants.values().chain(doubt).filter(|(q, _)| q == p).map(|(_, c)| c).sum()
    }
}

#[derive(Default)]
struct Figures {
    acked: u64,
    in_doubt: u64,
    audited: u64,
    /// In-doubt publishes and responses found durable, and found lost, after a cut.
    doubt_kept: u64,
    doubt_lost: u64,
    /// Leads and responses known at the end of a seed.
    leads: u64,
    responses: u64,
    /// WAL segments made from recycled files.
    reused: u64,
}

/// One planned request and how to book its reply.
enum Planned {
    Publish(String, Value),
    Respond(String, String),
    Grant(String, String, u64),
    Other,
}

fn plan(rng: &mut Rng, m: &mut Model, used: &mut BTreeSet<(String, String)>) -> (Planned, Request) {
    loop {
        let roll = rng.below(100);
        let pair = rng.pick(&m.offers).cloned().filter(|p| !used.contains(p));
        match roll {
            0..=24 => {
                m.next_lead += 1;
                let l = format!("L{}", m.next_lead);
                let direct: Vec<String> = if rng.below(2) == 0 {
                    let a = rng.below(PROS as u64) as usize;
                    let b = (a + 1 + rng.below(PROS as u64 - 1) as usize) % PROS;
                    vec![pro_id(a), pro_id(b)]
                } else {
                    vec![]
                };
                let body = lead_body(&l, &direct);
                let r = req(json!({"type": "publish_lead", "lead": body}));
                return (Planned::Publish(l, body), r);
            }
            25..=59 => {
                let Some((l, p)) = pair else { continue };
                used.insert((l.clone(), p.clone()));
                let r = req(json!({"type": "offer", "lead": l, "pro": p, "action": "respond"}));
                return (Planned::Respond(l, p), r);
            }
            60..=64 => {
                let Some((l, p)) = rng.pick(&m.responses.iter().cloned().collect::<Vec<_>>()).cloned() else {
                    continue;
                };
                if !used.insert((l.clone(), p.clone())) {
                    continue;
                }
                let r = req(json!({"type": "offer", "lead": l, "pro": p, "action": "respond"}));
                return (Planned::Respond(l, p), r);
            }
            65..=71 => {
                let Some((l, p)) = pair else { continue };
                used.insert((l.clone(), p.clone()));
                let by = if rng.below(2) == 0 { "pro" } else { "client" };
                let r = req(json!({"type": "offer", "lead": l, "pro": p, "action": "decline", "by": by}));
                return (Planned::Other, r);
            }
            72..=78 => {
                let Some((l, p)) = pair else { continue };
                used.insert((l.clone(), p.clone()));
                let action = ["open", "client_replied", "pro_replied"][rng.below(3) as usize];
                let r = req(json!({"type": "offer", "lead": l, "pro": p, "action": action}));
                return (Planned::Other, r);
            }
            79..=89 => {
                m.next_grant += 1;
                let op = format!("g{}", m.next_grant);
                let p = pro_id(rng.below(PROS as u64) as usize);
                let credits = 1 + rng.below(40);
                let r = req(json!({"type": "grant_credits", "pro": p, "op": op, "credits": credits}));
                return (Planned::Grant(op, p, credits), r);
            }
            90..=92 => {
                m.now += 1_000 * (1 + rng.below(120)) as i64;
                return (Planned::Other, req(json!({"type": "advance_clock", "to_ms": m.now})));
            }
            _ => {
                let p = pro_id(rng.below(PROS as u64) as usize);
                return (Planned::Other, req(json!({"type": "balance", "pro": p})));
            }
        }
    }
}

fn book(m: &mut Model, fig: &mut Figures, planned: Planned, out: Outcome) {
    match &out {
        Outcome::Acked(_) => fig.acked += 1,
        Outcome::InDoubt => fig.in_doubt += 1,
        Outcome::Refused => {}
    }
    match (planned, out) {
        (Planned::Publish(l, body), Outcome::Acked(res)) => accept_lead(m, l, body, res),
        (Planned::Publish(l, body), Outcome::InDoubt) => {
            m.leads_in_doubt.insert(l, body);
        }
        (Planned::Respond(l, p), Outcome::Acked(_)) => {
            m.responses_in_doubt.remove(&(l.clone(), p.clone()));
            m.responses.insert((l, p));
        }
        (Planned::Respond(l, p), Outcome::InDoubt) if !m.responses.contains(&(l.clone(), p.clone())) => {
            m.responses_in_doubt.insert((l, p));
        }
        (Planned::Grant(op, p, c), Outcome::Acked(_)) => {
            m.grants.insert(op, (p, c));
        }
        (Planned::Grant(op, p, c), Outcome::InDoubt) => {
            m.grants_in_doubt.insert(op, (p, c));
        }
        _ => {}
    }
}

fn accept_lead(m: &mut Model, l: String, body: Value, res: Value) {
    if res["status"] == "accepted" {
        m.price.insert(l.clone(), res["price"].as_u64().expect("an accepted lead has a price"));
        for o in res["offers"].as_array().into_iter().flatten() {
            m.offers.push((l.clone(), o[0].as_str().expect("offer names a pro").to_string()));
        }
    }
    m.leads.insert(l, (body, res));
}

async fn call(e: &Engine, t: &TenantId, r: Request) -> Result<OkResult, ApiError> {
    match tokio::time::timeout(HANG, e.request(t, r)).await {
        Ok(r) => r,
        Err(_) => panic!("a request got no answer within {HANG:?}"),
    }
}

async fn ok(e: &Engine, t: &TenantId, v: Value) -> Result<Value, String> {
    call(e, t, req(v.clone()))
        .await
        .map(|r| serde_json::to_value(r).expect("replies serialise"))
        .map_err(|err| format!("{v} answered {err}"))
}

/// How the power goes out in one life.
#[derive(Clone, Copy)]
enum Cut {
    /// At the n-th mutating disk operation from the start of batch `batch`.
    DiskOp { batch: usize, ops: u64 },
    /// From the outside, after `after` replies of batch `batch` arrived.
    Outside { batch: usize, after: usize },
}

/// Sends batches of concurrent requests; loses power as `cut` says. Returns once
/// the power is out and every request sent has answered.
async fn workload(
    e: &Engine,
    t: &TenantId,
    fs: &MemFs,
    rng: &mut Rng,
    m: &mut Model,
    fig: &mut Figures,
    cut: Cut,
) {
    let cuts_before = fs.power_cuts();
    let batches = 3 + rng.below(6) as usize;
    for batch in 0..batches {
        if rng.below(6) == 0 {
            // Errors are expected once the power is out.
            let _ = e.snapshot();
        }
        if let Cut::DiskOp { batch: b, ops } = cut {
            if b == batch {
                fs.cut_power_after(ops);
            }
        }
        // A snapshot cut while this batch is being decided (errors are expected once
        // the power is out).
        let concurrent = (rng.below(4) == 0).then(|| {
            let e = e.clone();
            std::thread::spawn(move || {
                let _ = e.snapshot();
            })
        });
        let mut used = BTreeSet::new();
        let n = 1 + rng.below(24) as usize;
        let planned: Vec<(Planned, Request)> = (0..n).map(|_| plan(rng, m, &mut used)).collect();
        let mut pending: FuturesUnordered<_> = planned
            .into_iter()
            .enumerate()
            .map(|(i, (p, r))| async move { (i, p, call(e, t, r).await) })
            .collect();
        let mut answered = 0;
        while let Some((_, p, r)) = pending.next().await {
            answered += 1;
            book(m, fig, p, outcome(r));
            if let Cut::Outside { batch: b, after } = cut {
                if b == batch && answered == after.min(n) && fs.power_cuts() == cuts_before {
                    fs.power_cut();
                }
            }
        }
        if let Some(snapshot) = concurrent {
            snapshot.join().expect("the snapshot thread does not panic");
        }
        if fs.power_cuts() != cuts_before {
            return;
        }
    }
    if fs.power_cuts() == cuts_before {
        fs.power_cut();
    }
    fs.cut_power_after(u64::MAX);
}

/// Registers the pros and gives each some credits (all acknowledged).
async fn setup(e: &Engine, t: &TenantId, m: &mut Model) -> Result<(), String> {
    let calls = (0..PROS).map(|i| async move {
        ok(
            e,
            t,
            json!({"type": "upsert_pro", "pro": {"id": pro_id(i), "categories": ["painting"],
            "zones": ["bologna"], "quality": {"reviews": 3}}}),
        )
        .await?;
        ok(e, t, json!({"type": "grant_credits", "pro": pro_id(i), "op": format!("pay-{i}"), "credits": 200}))
            .await
    });
    for (i, r) in join_all(calls).await.into_iter().enumerate() {
        r.map_err(|err| format!("setup: {err}"))?;
        m.grants.insert(format!("pay-{i}"), (pro_id(i), 200));
    }
    Ok(())
}

/// Compares a freshly recovered engine with what the client was told, then settles
/// what was in doubt.
async fn audit(
    e: &Engine,
    t: &TenantId,
    m: &mut Model,
    fig: &mut Figures,
    life: usize,
) -> Result<(), String> {
    let ctx = |s: String| format!("life {life}: {s}");
    // The stream: a resume from 0 gets every event, numbered without a gap, and what
    // the last audit saw comes first, unchanged (recovery numbers the same events
    // again; the history on disk joins them).
    let hub = e.hub(t).ok_or("no stream")?;
    let stream = engine_support::stream_from_start(&hub).map_err(|err| ctx(format!("stream: {err}")))?;
    let seqs: Vec<u64> = stream.iter().map(|x| x.0).collect();
    if seqs != (1..hub.next_seq()).collect::<Vec<u64>>() {
        return Err(ctx(format!("stream from 0: {} events, not 1..{}", seqs.len(), hub.next_seq())));
    }
    if !stream.starts_with(&m.stream) {
        return Err(ctx("the stream changed what an earlier life had published".into()));
    }
    m.stream = stream;
    for (l, (body, res)) in &m.leads {
        if res["status"] == "accepted" {
            ok(e, t, json!({"type": "explain", "lead": l}))
                .await
                .map_err(|err| ctx(format!("acknowledged lead {l} lost: {err}")))?;
        }
        let again = ok(e, t, json!({"type": "publish_lead", "lead": body})).await.map_err(ctx)?;
        if &again != res {
            return Err(ctx(format!("acknowledged lead {l} answered {res}, after the cut {again}")));
        }
        fig.audited += 2;
    }
    // Leads in doubt: present or not, both are fine; a present one is now known.
    for (l, body) in std::mem::take(&mut m.leads_in_doubt) {
        fig.audited += 1;
        if ok(e, t, json!({"type": "explain", "lead": l})).await.is_err() {
            fig.doubt_lost += 1;
        } else {
            fig.doubt_kept += 1;
            let res = ok(e, t, json!({"type": "publish_lead", "lead": body})).await.map_err(ctx)?;
            accept_lead(m, l, body, res);
        }
    }
    let mut responded_now = BTreeSet::new();
    for i in 0..PROS {
        let p = pro_id(i);
        let found = ok(e, t, json!({"type": "search", "pro": p, "query": ""})).await.map_err(ctx)?;
        let mut responded = BTreeSet::new();
        for o in found["offers"].as_array().into_iter().flatten() {
            let l = o["lead"].as_str().unwrap_or_default().to_string();
            if !m.leads.contains_key(&l) {
                return Err(ctx(format!("{p} has an offer of lead {l}, which was never published")));
            }
            if !o["contact"].is_null() {
                responded.insert(l);
            }
        }
        for (l, q) in &m.responses {
            if q == &p && !responded.contains(l) {
                return Err(ctx(format!("acknowledged response of {p} to {l} lost")));
            }
        }
        for l in &responded {
            let pair = (l.clone(), p.clone());
            if !m.responses.contains(&pair) && !m.responses_in_doubt.contains(&pair) {
                return Err(ctx(format!("{p} responded to {l}, which was never acknowledged nor in flight")));
            }
        }
        let b = ok(e, t, json!({"type": "balance", "pro": p})).await.map_err(ctx)?;
        fig.audited += 2;
        let get = |k: &str| b[k].as_u64().unwrap_or_else(|| panic!("balance has {k}: {b}"));
        let charges: u64 = responded.iter().map(|l| m.price[l]).sum();
        if get("captured") != charges {
            return Err(ctx(format!(
                "{p}: captured {} but responded to {responded:?} ({charges}): {b}",
                get("captured")
            )));
        }
        let (lo, hi) = (m.granted(&p, false), m.granted(&p, true));
        if !(lo..=hi).contains(&get("granted")) {
            return Err(ctx(format!("{p}: granted {} outside {lo}..={hi}: {b}", get("granted"))));
        }
        if get("granted") + get("refunded") != get("available") + get("held") + get("captured") {
            return Err(ctx(format!("{p}: money not conserved: {b}")));
        }
        responded_now.extend(responded.into_iter().map(|l| (l, p.clone())));
    }
    // Settle: responses are what the engine shows; in-doubt grants are retried.
    let kept = m.responses_in_doubt.iter().filter(|r| responded_now.contains(*r)).count() as u64;
    fig.doubt_kept += kept;
    fig.doubt_lost += m.responses_in_doubt.len() as u64 - kept;
    m.responses_in_doubt.clear();
    m.responses = responded_now;
    for (op, (p, c)) in std::mem::take(&mut m.grants_in_doubt) {
        ok(e, t, json!({"type": "grant_credits", "pro": p, "op": op, "credits": c})).await.map_err(ctx)?;
        m.grants.insert(op, (p, c));
        fig.audited += 1;
    }
    for i in 0..PROS {
        let p = pro_id(i);
        let b = ok(e, t, json!({"type": "balance", "pro": p})).await.map_err(ctx)?;
        if b["granted"].as_u64() != Some(m.granted(&p, false)) {
            return Err(ctx(format!(
                "{p}: granted should be {} after retrying grants: {b}",
                m.granted(&p, false)
            )));
        }
        fig.audited += 1;
    }
    // The manual clock restarts at its configured start: bring it back.
    if m.now > T0 {
        ok(e, t, json!({"type": "advance_clock", "to_ms": m.now})).await.map_err(ctx)?;
    }
    Ok(())
}

fn tenant() -> TenantId {
    TenantId::new("demo")
}

/// One seed: `LIVES` lives, each but the last ending in a power cut, each but the
/// first starting with an audit. `Err` describes the first broken promise.
fn power_cut_run(seed: u64, skip_sync: bool) -> Result<Figures, String> {
    let mut rng = Rng::new(seed);
    let fs = MemFs::new();
    fs.set_cut_seed(seed);
    let cfg = config(skip_sync, rng.below(2) == 0, true);
    let mut m = Model { now: T0, ..Default::default() };
    let mut fig = Figures::default();
    let t = tenant();
    for life in 0..LIVES {
        let cut = if rng.below(2) == 0 {
            Cut::DiskOp { batch: rng.below(5) as usize, ops: 1 + rng.below(40) }
        } else {
            Cut::Outside { batch: rng.below(5) as usize, after: 1 + rng.below(12) as usize }
        };
        let proc_fs: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
        let cfg = cfg.clone();
        in_system(async {
            let (e, _) =
                Engine::start_with_fs(cfg, proc_fs).map_err(|err| format!("life {life}: recovery: {err}"))?;
            if life == 0 {
                setup(&e, &t, &mut m).await?;
            } else {
                audit(&e, &t, &mut m, &mut fig, life).await?;
            }
            if life + 1 < LIVES {
                workload(&e, &t, &fs, &mut rng, &mut m, &mut fig, cut).await;
                fig.reused += e.inner.wal.stats().segments_reused;
            } else {
                e.shutdown().await.map_err(|err| format!("shutdown: {err}"))?;
            }
            Ok::<_, String>(())
        })?;
    }
    fig.leads = m.leads.len() as u64;
    fig.responses = m.responses.len() as u64;
    Ok(fig)
}

fn seeds() -> Vec<u64> {
    if let Some(s) = std::env::var("ROTA_SIM_SEED").ok().and_then(|v| v.parse().ok()) {
        return vec![s];
    }
    let n = std::env::var("ROTA_SIM_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(100);
    (0..n).collect()
}

#[test]
fn power_cuts_under_concurrent_traffic_lose_nothing_acknowledged_and_charge_once() {
    let started = Instant::now();
    let seeds = seeds();
    let mut total = Figures::default();
    for &seed in &seeds {
        match power_cut_run(seed, false) {
            Ok(f) => {
                total.acked += f.acked;
                total.in_doubt += f.in_doubt;
                total.audited += f.audited;
                total.doubt_kept += f.doubt_kept;
                total.doubt_lost += f.doubt_lost;
                total.leads += f.leads;
                total.responses += f.responses;
                total.reused += f.reused;
            }
            Err(e) => panic!("seed {seed} (replay with ROTA_SIM_SEED={seed}): {e}"),
        }
    }
    eprintln!(
        "engine power loss: {} seeds x {} power cuts, {} requests acknowledged ({} leads, {} responses audited at the end), {} in doubt at a cut (publishes and responses: {} found durable, {} lost), {} audit requests, {} WAL segments made from recycled files, {:.1} s",
        seeds.len(),
        LIVES - 1,
        total.acked,
        total.leads,
        total.responses,
        total.in_doubt,
        total.doubt_kept,
        total.doubt_lost,
        total.audited,
        total.reused,
        started.elapsed().as_secs_f64()
    );
    if seeds.len() >= 50 {
        assert!(
            total.reused >= 5,
            "only {} segments were made from recycled files: the cuts must land on those too",
            total.reused
        );
    }
}

#[test]
fn the_power_cut_audit_catches_an_engine_whose_log_does_not_sync() {
    let n = 10u64;
    let mut caught = 0;
    for seed in 0..n {
        if let Err(e) = power_cut_run(seed, true) {
            caught += 1;
            if caught == 1 {
                eprintln!("without syncs, seed {seed}: {e}");
            }
        }
    }
    eprintln!("without syncs: {caught} of {n} seeds caught");
    assert!(caught * 10 >= n * 8, "only {caught} of {n} seeds noticed that nothing was synced");
}

#[derive(Debug, Clone, Copy)]
enum DiskFault {
    Inject(Fault),
    Full,
}

/// One disk fault mid-workload: the first request that meets it and every request
/// after it answer `unavailable`, `health()` reports the failure, and a restart on
/// the same disk (fault cleared, power cut) recovers everything acknowledged before.
fn disk_fault_run(seed: u64, fault: DiskFault) -> Result<Figures, String> {
    let mut rng = Rng::new(seed);
    let fs = MemFs::new();
    fs.set_cut_seed(seed);
    // Without preallocation every append grows the file, so a full disk is met at once.
    let cfg = config(false, false, false);
    let mut m = Model { now: T0, ..Default::default() };
    let mut fig = Figures::default();
    let t = &tenant();
    let proc_fs: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
    in_system(async {
        let e = &Engine::start_with_fs(cfg.clone(), proc_fs).map_err(|err| format!("start: {err}"))?.0;
        setup(e, t, &mut m).await?;
        // Healthy traffic first, with requests in flight at once.
        for _ in 0..1 + rng.below(4) {
            let mut used = BTreeSet::new();
            let planned: Vec<_> = (0..1 + rng.below(16)).map(|_| plan(&mut rng, &mut m, &mut used)).collect();
            let replies =
                join_all(planned.into_iter().map(|(p, r)| async move { (p, call(e, t, r).await) })).await;
            for (p, r) in replies {
                if let Err(err) = &r {
                    if err.code == "unavailable" {
                        return Err(format!("unavailable before the fault: {err}"));
                    }
                }
                book(&mut m, &mut fig, p, outcome(r));
            }
        }
        match fault {
            DiskFault::Inject(f) => fs.inject(f),
            DiskFault::Full => fs.set_capacity(Some(fs.used_bytes() + rng.below(200))),
        }
        // One request at a time until one meets the fault.
        let mut met = false;
        for _ in 0..200 {
            let (p, r) = plan(&mut rng, &mut m, &mut BTreeSet::new());
            let r = call(e, t, r).await;
            match &r {
                Err(err) if err.code == "unavailable" => met = true,
                _ => {}
            }
            book(&mut m, &mut fig, p, outcome(r));
            if met {
                break;
            }
        }
        if !met {
            return Err("no request met the fault".into());
        }
        if e.health().is_ok() {
            return Err("health() reports no failure after a request met the fault".into());
        }
        // Nothing is acknowledged after it, reads included.
        let mut used = BTreeSet::new();
        let planned: Vec<_> = (0..20).map(|_| plan(&mut rng, &mut m, &mut used)).collect();
        let replies =
            join_all(planned.into_iter().map(|(p, r)| async move { (p, call(e, t, r).await) })).await;
        for (p, r) in replies {
            match &r {
                Err(err) if err.code == "unavailable" => {}
                other => return Err(format!("after the failure a request answered {other:?}")),
            }
            book(&mut m, &mut fig, p, outcome(r));
        }
        if e.snapshot().is_ok() {
            return Err("a snapshot succeeded after the failure".into());
        }
        Ok::<_, String>(())
    })?;
    fs.clear_faults();
    fs.power_cut();
    let proc_fs: Arc<dyn rota::wal::Fs> = Arc::new(fs.process_handle());
    in_system(async {
        let (e, _) = Engine::start_with_fs(cfg, proc_fs).map_err(|err| format!("restart: {err}"))?;
        audit(&e, t, &mut m, &mut fig, 1).await?;
        e.shutdown().await.map_err(|err| format!("shutdown: {err}"))
    })?;
    Ok(fig)
}

#[test]
fn a_failed_write_sync_or_full_disk_refuses_everything_after_it_and_loses_nothing_before() {
    let started = Instant::now();
    let cases = [
        DiskFault::Inject(Fault::WriteError),
        DiskFault::Inject(Fault::ShortWrite),
        DiskFault::Inject(Fault::SyncError),
        DiskFault::Full,
    ];
    let mut runs = 0;
    for seed in 0..8u64 {
        for fault in cases {
            if let Err(e) = disk_fault_run(seed, fault) {
                panic!("{fault:?}, seed {seed}: {e}");
            }
            runs += 1;
        }
    }
    eprintln!("disk faults: {runs} runs (4 faults x 8 seeds), {:.1} s", started.elapsed().as_secs_f64());
}
