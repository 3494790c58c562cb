//! The kill -9 loop driven by the load tool: `rota-loadtest replay` (the real binary)
//! plays a generated trace at a fixed rate against `rota serve` (`wal.fsync =
//! "always"`, wall clock), the test SIGKILLs the daemon at a random moment of the
//! timed phase and restarts it on the same data dir, and again, for every cycle. The
//! tool's `--record` file says what it sent and what it was told; after every restart
//! an auditor checks the daemon against it:
//!
//! * every acknowledged lead is there: `explain` answers and a republish answers the
//!   original result, offers included (R1);
//! * before the requests whose replies were lost are settled, each pro's charges lie
//!   between "acknowledged responses" and "acknowledged plus in-doubt responses"; after
//!   they are retried (both requests are idempotent), each pro's `held + captured` is
//!   exactly the sum of the prices of the leads it responded to (R9: one charge per
//!   response, never two, none lost) and `available + held + captured = granted`;
//! * a subscriber that resumes with `resume_from` across every restart sees contiguous
//!   sequence numbers, and what it saw before a crash is what the restarted daemon
//!   replays;
//! * after a final restart the whole stream, replayed from 0, holds each lead once
//!   (`lead_accepted` / `lead_rejected`), no offer `(lead, pro)` twice, every offer of
//!   every acknowledged publish, nothing of a publish answered with an error, and one
//!   charge or hold per response, for the same credits.
//!
//! Snapshots are taken every second, during the load, so recovery starts from
//! snapshots cut in the middle of traffic (and from the log when a kill landed in
//! one).
//!
//! The trace (`rota-loadtest gen`) has no auto-buy, no top-ups and no pros joining
//! during the run, so every credit that moves is a response to an offer.
//!
//! `ROTA_LT_CRASH_CYCLES` sets the number of cycles (default 10), `ROTA_LT_CRASH_SEED`
//! the seed (printed, also on failure).
//!
//! The load tool is built with `cargo build -p rota-loadtest` from this test (a no-op
//! after `cargo test --workspace`, which builds every binary of the workspace first),
//! so the test also works alone (`cargo test --test crash_loop_loadtest`).

mod e2e_support;

use e2e_support::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

/// Leads per second the tool sends.
const RATE: u32 = 400;
/// Credits each pro of the trace is granted at setup (`gen --initial-credits`).
const CREDITS: u64 = 100_000;

/// Builds the load tool with cargo (same profile as this test) and returns its path.
fn loadtest_binary() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| env!("CARGO").to_string());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(env!("CARGO_MANIFEST_DIR")).args([
        "build",
        "--quiet",
        "-p",
        "rota-loadtest",
        "--bin",
        "rota-loadtest",
        "--message-format=json",
    ]);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    let out = cmd.stderr(Stdio::inherit()).output().expect("cargo runs");
    assert!(out.status.success(), "cargo build -p rota-loadtest failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "rota-loadtest")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo names the rota-loadtest executable")
}

/// Small segments, so each second's snapshot compacts several and later ones are
/// made from recycled files: kills land while records overwrite a reused file's old
/// ones, and recovery must tell those from its own.
const SMALL_SEGMENTS: &[&str] = &["wal.segment_bytes=16384", "wal.recycle_segments=4"];

fn config(dir: &Path) -> PathBuf {
    let path = dir.join("rota.toml");
    // The final audit replays the whole stream from 0, so keep all of it. The auditor
    // pipelines thousands of requests at once: no admission control (that has its own
    // test in hostile_input.rs), so the audit needs no retries. A snapshot every
    // second: they are taken while the load runs (the cut, then the lead index, the
    // encoding and the write beside the traffic), and some kills land in one.
    std::fs::write(
        &path,
        "stream_retention_events = 10000000\nshed_backlog_bytes = 0\nsnapshot_interval_s = 1\n[wal]\nfsync = \"always\"\n",
    )
    .unwrap();
    path
}

/// What the tool was told over the whole run, and what it is still unsure about.
#[derive(Default)]
struct Model {
    pros: BTreeSet<String>,
    granted: BTreeMap<String, u64>,
    /// Acknowledged publishes: lead -> result.
    leads: BTreeMap<String, Value>,
    /// Acknowledged in the cycle that just ended (audited in full after the restart).
    leads_new: Vec<String>,
    /// Publishes sent whose reply never came: lead -> body.
    leads_in_doubt: BTreeMap<String, Value>,
    /// Publishes answered with an error: never dispatched.
    leads_refused: BTreeSet<String>,
    bodies: BTreeMap<String, Value>,
    /// Acknowledged responses (lead, pro).
    responses: BTreeSet<(String, String)>,
    responses_in_doubt: BTreeSet<(String, String)>,
}

impl Model {
    fn price(&self, lead: &str) -> u64 {
        self.leads.get(lead).and_then(|r| r["price"].as_u64()).unwrap_or(0)
    }

    fn charged(&self, pro: &str) -> u64 {
        self.responses.iter().filter(|(_, p)| p == pro).map(|(l, _)| self.price(l)).sum()
    }

    fn in_doubt_charge(&self, pro: &str) -> u64 {
        self.responses_in_doubt.iter().filter(|(_, p)| p == pro).map(|(l, _)| self.price(l)).sum()
    }
}

#[derive(Default)]
struct Figures {
    cycles: u64,
    sent: u64,
    acked: u64,
    refused: u64,
    in_doubt: u64,
    audited: u64,
    events: u64,
    /// Kills that left compacted segments kept for reuse on disk.
    kills_with_recycled: u64,
}

/// Reads one `--record` file into the model: replies pair with requests by id.
fn absorb(m: &mut Model, path: &Path, fig: &mut Figures, cycle: u64) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut sent: BTreeMap<String, Value> = BTreeMap::new();
    let mut order = Vec::new();
    let mut replies: BTreeMap<String, Value> = BTreeMap::new();
    for line in text.lines() {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("cycle {cycle}: record line {line}: {e}"));
        if let Some(req) = v.get("sent") {
            let id = req["id"].as_str().unwrap().to_string();
            order.push(id.clone());
            assert!(sent.insert(id, req.clone()).is_none(), "cycle {cycle}: id sent twice: {req}");
        } else if let Some(rep) = v.get("reply") {
            let id = rep["id"].as_str().unwrap_or_else(|| panic!("cycle {cycle}: a reply without id: {rep}"));
            assert!(
                replies.insert(id.to_string(), rep.clone()).is_none(),
                "cycle {cycle}: second reply to {id}"
            );
        }
    }
    for id in replies.keys() {
        assert!(sent.contains_key(id), "cycle {cycle}: a reply to nothing: {id}");
    }
    for id in order {
        let req = &sent[&id];
        let reply = replies.get(&id);
        fig.sent += 1;
        match reply {
            Some(r) if r["type"] == "ok" => fig.acked += 1,
            Some(_) => fig.refused += 1,
            None => fig.in_doubt += 1,
        }
        let ok = reply.filter(|r| r["type"] == "ok");
        match req["type"].as_str().unwrap() {
            "upsert_pro" => {
                assert!(ok.is_some(), "cycle {cycle}: setup {req} answered {reply:?}");
                m.pros.insert(req["pro"]["id"].as_str().unwrap().to_string());
            }
            "grant_credits" => {
                assert!(ok.is_some(), "cycle {cycle}: setup {req} answered {reply:?}");
                *m.granted.entry(req["pro"].as_str().unwrap().to_string()).or_default() +=
                    req["credits"].as_u64().unwrap();
            }
            "publish_lead" => {
                let l = req["lead"]["id"].as_str().unwrap().to_string();
                match (reply, ok) {
                    (_, Some(r)) => {
                        m.bodies.insert(l.clone(), req["lead"].clone());
                        m.leads.insert(l.clone(), r["result"].clone());
                        m.leads_new.push(l);
                    }
                    (Some(_), None) => {
                        m.leads_refused.insert(l);
                    }
                    (None, _) => {
                        m.leads_in_doubt.insert(l, req["lead"].clone());
                    }
                }
            }
            "offer" if req["action"] == "respond" => {
                let pair =
                    (req["lead"].as_str().unwrap().to_string(), req["pro"].as_str().unwrap().to_string());
                if ok.is_some() {
                    m.responses_in_doubt.remove(&pair);
                    m.responses.insert(pair);
                } else if reply.is_none() && !m.responses.contains(&pair) {
                    m.responses_in_doubt.insert(pair);
                }
            }
            _ => {}
        }
    }
}

/// Sends `reqs` pipelined (windows of 256) on one JSON connection; replies in order.
async fn pipelined(addr: &str, reqs: &[Value]) -> Vec<Value> {
    let mut c = Client::new(addr, false).await;
    let mut out = Vec::with_capacity(reqs.len());
    for (w, window) in reqs.chunks(256).enumerate() {
        let mut want = BTreeMap::new();
        for (i, r) in window.iter().enumerate() {
            let id = format!("a{w}-{i}");
            let mut r = r.clone();
            r["id"] = json!(id);
            want.insert(id, i);
            c.ws.feed(Message::Text(r.to_string())).await.unwrap();
        }
        c.ws.flush().await.unwrap();
        let mut got = vec![Value::Null; window.len()];
        for _ in 0..window.len() {
            let v = c.recv().await;
            let i = want[v["id"].as_str().unwrap_or_else(|| panic!("a reply without id: {v}"))];
            got[i] = v;
        }
        out.extend(got);
    }
    out
}

fn ok(reply: &Value, what: &str) -> Value {
    assert_eq!(reply["type"], "ok", "{what} answered {reply}");
    reply["result"].clone()
}

/// After a restart: compares the daemon with what the tool was told, then settles the
/// requests whose replies were lost. `all` audits every acknowledged lead, otherwise
/// those of the last cycle and a sample of the older ones.
async fn audit(addr: &str, m: &mut Model, cycle: u64, all: bool, rng: &mut Rng, fig: &mut Figures) {
    // Acknowledged leads: `explain` answers, a republish answers the original result.
    let mut check: BTreeSet<String> = std::mem::take(&mut m.leads_new).into_iter().collect();
    if all {
        check.extend(m.leads.keys().cloned());
    } else if !m.leads.is_empty() {
        for _ in 0..200 {
            let k = rng.range(0, m.leads.len() as u64 - 1) as usize;
            check.insert(m.leads.keys().nth(k).unwrap().clone());
        }
    }
    // (A rejected one is checked by its republish, which must answer the same rejection.)
    let mut reqs = Vec::new();
    for l in &check {
        reqs.push(json!({"type": "publish_lead", "lead": m.bodies[l]}));
        if m.leads[l]["status"] == "accepted" {
            reqs.push(json!({"type": "explain", "lead": l}));
        }
    }
    let replies = pipelined(addr, &reqs).await;
    fig.audited += reqs.len() as u64;
    let mut replies = replies.iter();
    for l in &check {
        let again =
            ok(replies.next().unwrap(), &format!("cycle {cycle}: republish of acknowledged lead {l}"));
        assert_eq!(
            again, m.leads[l],
            "cycle {cycle}: R1: acknowledged lead {l} answers differently after a crash"
        );
        if m.leads[l]["status"] == "accepted" {
            ok(replies.next().unwrap(), &format!("cycle {cycle}: explain of acknowledged lead {l}"));
        }
    }

    // In-doubt publishes: a republish settles them (the original result if it was
    // durable, a first dispatch if not); either way the lead now exists.
    let doubt: Vec<(String, Value)> = std::mem::take(&mut m.leads_in_doubt).into_iter().collect();
    let reqs: Vec<Value> = doubt.iter().map(|(_, b)| json!({"type": "publish_lead", "lead": b})).collect();
    let replies = pipelined(addr, &reqs).await;
    fig.audited += reqs.len() as u64;
    for ((l, body), r) in doubt.into_iter().zip(replies) {
        let res = ok(&r, &format!("cycle {cycle}: republish of in-doubt lead {l}"));
        m.bodies.insert(l.clone(), body);
        m.leads.insert(l, res);
    }

    // Before settling the responses: charges between the acknowledged ones and the
    // acknowledged plus every in-doubt one.
    let pros: Vec<String> = m.pros.iter().cloned().collect();
    let balances =
        |pros: &[String]| pros.iter().map(|p| json!({"type": "balance", "pro": p})).collect::<Vec<_>>();
    let replies = pipelined(addr, &balances(&pros)).await;
    fig.audited += pros.len() as u64;
    for (p, r) in pros.iter().zip(&replies) {
        let b = ok(r, &format!("cycle {cycle}: balance of {p}"));
        let charges = b["held"].as_u64().unwrap() + b["captured"].as_u64().unwrap();
        let lo = m.charged(p);
        let hi = lo + m.in_doubt_charge(p);
        assert!(
            (lo..=hi).contains(&charges),
            "cycle {cycle}: {p} was charged {charges}, expected {lo}..={hi}: {b}"
        );
    }

    // Settle: retry every in-doubt response. Repeating a durable response answers ok
    // and charges nothing more; an error means the first one never became durable.
    let doubt: Vec<(String, String)> = std::mem::take(&mut m.responses_in_doubt).into_iter().collect();
    let reqs: Vec<Value> = doubt
        .iter()
        .map(|(l, p)| json!({"type": "offer", "lead": l, "pro": p, "action": "respond"}))
        .collect();
    let replies = pipelined(addr, &reqs).await;
    fig.audited += reqs.len() as u64;
    for (pair, r) in doubt.into_iter().zip(replies) {
        if r["type"] == "ok" {
            m.responses.insert(pair);
        }
    }

    // Settled: exact charges, and money adds up.
    let replies = pipelined(addr, &balances(&pros)).await;
    fig.audited += pros.len() as u64;
    for (p, r) in pros.iter().zip(&replies) {
        let b = ok(r, &format!("cycle {cycle}: balance of {p}"));
        let get = |k: &str| b[k].as_u64().unwrap();
        assert_eq!(get("granted"), m.granted[p], "cycle {cycle}: {p}: acknowledged grants: {b}");
        assert_eq!(get("refunded"), 0, "cycle {cycle}: {p}: nothing can be refunded within the run: {b}");
        assert_eq!(
            get("held") + get("captured"),
            m.charged(p),
            "cycle {cycle}: R9: {p} must be charged once per response: {b}"
        );
        assert_eq!(
            get("available") + get("held") + get("captured"),
            get("granted"),
            "cycle {cycle}: money not conserved for {p}: {b}"
        );
    }
}

/// Follows the stream from `resume_from` until the connection dies; with `batch`, as
/// a `batch: true` subscription (its `events` frames flattened).
async fn follow(addr: String, resume_from: u64, batch: bool, ready: Arc<AtomicUsize>) -> (Value, Vec<Value>) {
    let mut c = Client::new(&addr, true).await;
    let (sub, mut events) =
        c.call(json!({"type": "subscribe", "resume_from": resume_from, "batch": batch})).await;
    ready.store(1, Ordering::SeqCst);
    loop {
        match c.ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                let v: Value = rmp_serde::from_slice(&b).unwrap();
                if v["type"] == "events" {
                    assert!(batch, "an events frame on an unbatched subscription: {v}");
                    events.extend(v["events"].as_array().expect("an array of events").iter().cloned());
                } else {
                    events.push(v);
                }
            }
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return (sub, events),
            Some(Ok(_)) => {}
        }
    }
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Checks the whole stream, replayed from 0 by the last daemon, against the model and
/// against what the subscriber saw piecewise across the restarts.
fn check_stream(all: &[Value], seen: &BTreeMap<u64, Value>, m: &Model) {
    let mut delivered: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
    let mut offered: BTreeSet<(&str, &str)> = BTreeSet::new();
    let mut charges: BTreeMap<&str, u64> = BTreeMap::new();
    let mut charge_events = 0usize;
    for (i, e) in all.iter().enumerate() {
        let seq = e["seq"].as_u64().unwrap();
        assert_eq!(seq, i as u64 + 1, "the full replay has no gaps");
        if let Some(before) = seen.get(&seq) {
            assert_eq!(before, e, "streamed event {seq} differs in the full replay");
        }
        let ev = &e["event"];
        let lead = ev["lead"].as_str();
        if let Some(l) = lead {
            assert!(!m.leads_refused.contains(l), "a publish answered with an error was dispatched: {e}");
        }
        match ev["event"].as_str().unwrap_or("") {
            "lead_accepted" => delivered.entry(lead.unwrap()).or_default().0 += 1,
            "lead_rejected" => delivered.entry(lead.unwrap()).or_default().1 += 1,
            "offered" => {
                let p = ev["pro"].as_str().unwrap();
                assert!(offered.insert((lead.unwrap(), p)), "offer ({}, {p}) streamed twice", lead.unwrap());
            }
            "credits" => match ev["movement"].as_str().unwrap() {
                "charged" | "held" => {
                    *charges.entry(ev["pro"].as_str().unwrap()).or_default() +=
                        ev["credits"].as_u64().unwrap();
                    charge_events += 1;
                }
                "granted" | "captured" => {}
                other => panic!("no credits can be {other} within the run: {e}"),
            },
            _ => {}
        }
    }
    for (l, res) in &m.leads {
        let (acc, rej) = delivered.get(l.as_str()).copied().unwrap_or_default();
        let want = if res["status"] == "accepted" { (1, 0) } else { (0, 1) };
        assert_eq!((acc, rej), want, "lead {l} ({}) is dispatched exactly once", res["status"]);
        for o in res["offers"].as_array().into_iter().flatten() {
            let p = o[0].as_str().unwrap();
            assert!(offered.contains(&(l.as_str(), p)), "acknowledged offer ({l}, {p}) never streamed");
        }
    }
    assert_eq!(delivered.len(), m.leads.len(), "only acknowledged (or settled) leads are dispatched");
    assert_eq!(charge_events, m.responses.len(), "R9: one charge (or hold) per response, never two");
    for p in &m.pros {
        assert_eq!(charges.get(p.as_str()).copied().unwrap_or(0), m.charged(p), "streamed charges of {p}");
    }
}

async fn run(seed: u64, cycles: u64, tool: PathBuf) -> Figures {
    let mut rng = Rng(seed | 1);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let data = dir.path().join("data");
    let trace = dir.path().join("trace.msgpack");
    let gen = Command::new(&tool)
        .args(["gen", "--seed", &seed.to_string(), "--leads", "20000", "--lead-rate", "80"])
        .args([
            "--pros",
            "40",
            "--zones",
            "4",
            "--categories",
            "3",
            "--initial-credits",
            &CREDITS.to_string(),
        ])
        .args(["--autobuy-share", "0", "--topups-per-s", "0", "--joins-per-s", "0", "--out"])
        .arg(&trace)
        .output()
        .unwrap();
    assert!(gen.status.success(), "gen: {}", String::from_utf8_lossy(&gen.stderr));

    let mut m = Model::default();
    let mut fig = Figures { cycles, ..Default::default() };
    let mut seen: BTreeMap<u64, Value> = BTreeMap::new();
    for cycle in 0..cycles {
        let mut d = Daemon::start_wall_with_flags(&data, &cfg, SMALL_SEGMENTS);
        if cycle > 0 {
            audit(&d.addr, &mut m, cycle, false, &mut rng, &mut fig).await;
        }
        let resume = seen.keys().next_back().copied().unwrap_or(0).saturating_sub(2);
        let ready = Arc::new(AtomicUsize::new(0));
        // Every other cycle the subscriber resumes as a batched one.
        let follower = tokio::spawn(follow(d.addr.clone(), resume, cycle % 2 == 1, ready.clone()));
        wait_until("the subscription", || ready.load(Ordering::SeqCst) == 1).await;

        let record = dir.path().join(format!("record-{cycle}.jsonl"));
        let mut cmd = Command::new(&tool);
        cmd.args(["replay", "--url", &format!("ws://{}", d.addr), "--trace"])
            .arg(&trace)
            .args(["--rate", &RATE.to_string(), "--connections", "2", "--drain", "5s", "--no-progress"])
            .args(["--run-tag", &format!("c{cycle}"), "--record"])
            .arg(&record)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if cycle > 0 {
            cmd.arg("--skip-setup");
        }
        let mut child = cmd.spawn().expect("the load tool starts");
        let (started_tx, started_rx) = tokio::sync::oneshot::channel();
        let stderr = child.stderr.take().unwrap();
        let tool_log = std::thread::spawn(move || {
            let mut started = Some(started_tx);
            let mut log = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("timed phase started") {
                    if let Some(tx) = started.take() {
                        let _ = tx.send(());
                    }
                }
                log += &line;
                log.push('\n');
            }
            log
        });
        if tokio::time::timeout(Duration::from_secs(120), started_rx).await.is_err() {
            let _ = child.kill();
            panic!(
                "cycle {cycle}: the load tool never started its timed phase: {}",
                tool_log.join().unwrap()
            );
        }
        // The kill falls at a random moment of the timed phase, requests in flight.
        tokio::time::sleep(Duration::from_millis(rng.range(50, 1_500))).await;
        unsafe_kill(d.child.id(), "KILL");
        d.child.wait().unwrap();
        // Compacted segments kept for reuse at the kill: the next life makes segments
        // from them (and recovery must tell their old records from the new ones).
        let kept = std::fs::read_dir(data.join("wal"))
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("recycled-"))
                    .count()
            })
            .unwrap_or(0);
        fig.kills_with_recycled += u64::from(kept > 0);
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "cycle {cycle}: the load tool did not stop after the kill");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let log = tool_log.join().unwrap();
        // 0: everything answered before the kill; 1: requests left unanswered (the kill).
        assert!(
            matches!(status.code(), Some(0 | 1)),
            "cycle {cycle}: the load tool failed ({status}): {log}"
        );
        absorb(&mut m, &record, &mut fig, cycle);

        let (sub, events) = follower.await.unwrap();
        assert_eq!(sub["type"], "ok", "resume from {resume}: {sub}");
        for (expect, e) in (resume + 1..).zip(events) {
            let seq = e["seq"].as_u64().unwrap();
            assert_eq!(
                seq, expect,
                "cycle {cycle}: stream gap or duplicate across the restart: got {seq}, wanted {expect}"
            );
            match seen.get(&seq) {
                Some(before) => assert_eq!(before, &e, "seq {seq} changed across the restart"),
                None => {
                    seen.insert(seq, e);
                }
            }
        }
        drop(d);
    }

    let d = Daemon::start_wall_with_flags(&data, &cfg, SMALL_SEGMENTS);
    audit(&d.addr, &mut m, cycles, true, &mut rng, &mut fig).await;
    let mut c = Client::new(&d.addr, true).await;
    let sub = c.ok(json!({"type": "subscribe", "resume_from": 0})).await;
    let next = sub["next_seq"].as_u64().unwrap();
    let all = c.events((next - 1) as usize).await;
    check_stream(&all, &seen, &m);
    fig.events = all.len() as u64;
    eprintln!(
        "load-tool crash loop: {} leads acknowledged, {} responses acknowledged, {} pros",
        m.leads.len(),
        m.responses.len(),
        m.pros.len()
    );
    fig
}

#[test]
fn kill_9_under_load_tool_traffic_loses_nothing_acknowledged_and_charges_once() {
    // The daemon reads every `ROTA_*` variable as a config override and refuses unknown
    // keys, so the test's own knobs are taken out of the environment it inherits.
    let cycles = std::env::var("ROTA_LT_CRASH_CYCLES").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let seed = std::env::var("ROTA_LT_CRASH_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
            % 1_000_000_007
    });
    std::env::remove_var("ROTA_LT_CRASH_CYCLES");
    std::env::remove_var("ROTA_LT_CRASH_SEED");
    eprintln!("load-tool crash loop: seed {seed}, {cycles} cycles (replay with ROTA_LT_CRASH_SEED={seed})");
    let tool = loadtest_binary();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let started = Instant::now();
    match rt.block_on(async { tokio::spawn(run(seed, cycles, tool)).await }) {
        Ok(f) => eprintln!(
            "load-tool crash loop: seed {seed}: {} cycles, {} requests sent by the tool, {} acknowledged, {} refused, {} in doubt at a kill, {} audit requests, {} events, {} kills with recycled segments on disk, {:.1} s",
            f.cycles,
            f.sent,
            f.acked,
            f.refused,
            f.in_doubt,
            f.audited,
            f.events,
            f.kills_with_recycled,
            started.elapsed().as_secs_f64()
        ),
        Err(e) => panic!("load-tool crash loop failed with seed {seed} (ROTA_LT_CRASH_SEED={seed}): {e}"),
    }
}
