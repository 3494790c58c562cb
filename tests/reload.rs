//! Configuration reload (SIGHUP) against the real binary: tokens revoked and added,
//! a tenant's policy changed for the decisions that follow (R6a), a tenant added and
//! served at once, and reloads that are refused whole (a tenant removed, a file that
//! does not parse) with the daemon running on.

mod e2e_support;

use e2e_support::*;
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn hash(token: &str) -> String {
    rota::config::hex(&rota::config::hash_token(token))
}

fn zaask_pro(id: &str) -> serde_json::Value {
    json!({"type": "upsert_pro", "pro": {"id": id, "categories": ["painting"], "zones": ["lisboa"]}})
}

/// A zaask connection on `d`, after adding `pros` with `credits` each.
async fn zaask_with_pros(d: &Daemon, pros: &[&str], credits: u64) -> Client {
    let mut zk = Client::connect(&d.addr, "zk-token", false).await;
    for p in pros {
        zk.ok(zaask_pro(p)).await;
        zk.ok(json!({"type": "grant_credits", "pro": p, "op": format!("pay-{p}"), "credits": credits})).await;
    }
    zk
}

/// Credits refunded to `pro` so far.
async fn refunded(zk: &mut Client, pro: &str) -> u64 {
    zk.ok(json!({"type": "balance", "pro": pro})).await["refunded"].as_u64().expect("refunded")
}

fn zaask_lead(id: &str) -> serde_json::Value {
    json!({"type": "publish_lead", "lead": {
        "id": id, "category": "painting", "zone": "lisboa",
        "description": "Repaint a two-room flat, walls and ceilings, next week",
        "details": {"rooms": "2"},
        "client": {"id": format!("client-{id}"), "name": "Ana Garcia", "phone": "+34 600 000 000",
                   "phone_verified": true, "contact": {"call": true, "chat": true}},
        "created_at": T0
    }})
}

/// Polls the metric until it reaches `want` (the daemon handles SIGHUP on its own
/// time); fails after 30 s with what it saw.
fn wait_metric(d: &Daemon, name: &str, labels: &[(&str, &str)], want: f64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = d.metric_with(name, labels);
        if v == want {
            return;
        }
        assert!(Instant::now() < deadline, "{name}{labels:?} is {v}, expected {want}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "current_thread")]
async fn r6a_a_reload_revokes_tokens_at_once_and_applies_new_policies_to_later_decisions() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tenants_config(dir.path(), "");
    let d = Daemon::start_with(dir.path(), &cfg);
    let pid = d.child.id();
    let mut revoked = Client::connect(&d.addr, "pp-token", false).await;
    revoked.ok(json!({"type": "subscribe"})).await;
    let mut zk = zaask_with_pros(&d, &["z1", "z2", "z3"], 100).await;
    let before = zk.ok(zaask_lead("Z1")).await;
    assert_eq!(before["offers"].as_array().unwrap().len(), 3, "offer_fanout = \"all\": {before}");

    // The platform rotates prontopro's token and zaask narrows its releases to one pro.
    let text = std::fs::read_to_string(&cfg).unwrap();
    assert!(text.contains(&hash("pp-token")));
    std::fs::write(&cfg, text.replace(&hash("pp-token"), &hash("pp-token-2"))).unwrap();
    let policy = dir.path().join("zaask.toml");
    let p = std::fs::read_to_string(&policy).unwrap();
    assert!(p.contains("offer_fanout = \"all\""));
    std::fs::write(&policy, p.replace("offer_fanout = \"all\"", "offer_fanout = 1")).unwrap();
    unsafe_kill(pid, "HUP");

    // The connection made with the old token is closed as soon as the reload applies.
    let (code, reason) = revoked.drain_until_close().await;
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.starts_with("token revoked"), "{reason}");
    let refused = connect(&d.addr, "pp-token", "rota.v1.json").await;
    assert!(refused.is_err(), "the old token no longer connects");
    let mut rotated = Client::connect(&d.addr, "pp-token-2", false).await;
    rotated.ok(json!({"type": "subscribe"})).await;
    // zaask's token did not change: its connection stays, and its next lead follows
    // the new policy; the lead decided before keeps its three offers.
    let after = zk.ok(zaask_lead("Z2")).await;
    assert_eq!(after["offers"].as_array().unwrap().len(), 1, "offer_fanout = 1 after the reload: {after}");
    let z1 = zk.ok(json!({"type": "explain", "lead": "Z1"})).await;
    let offered = z1["entries"].as_array().unwrap().iter().filter(|e| e["outcome"] == "offered").count();
    assert_eq!(offered, 3);
    assert_eq!(d.metric_with("rota_config_reloads_total", &[("result", "ok")]), 1.0);
    assert_eq!(d.metric_with("rota_auth_failures_total", &[("reason", "token_revoked")]), 1.0);

    // A reload that removes a tenant is refused whole: nothing changes (the token
    // rotated in the same file is not applied, and the tenant keeps working).
    let good = std::fs::read_to_string(&cfg).unwrap();
    let cut = good.find("[[tenants]]\nid = \"zaask\"").expect("zaask is configured");
    std::fs::write(&cfg, good[..cut].replace(&hash("pp-token-2"), &hash("pp-token-3"))).unwrap();
    unsafe_kill(pid, "HUP");
    wait_metric(&d, "rota_config_reloads_total", &[("result", "error")], 1.0);
    assert!(connect(&d.addr, "pp-token-3", "rota.v1.json").await.is_err(), "not applied in part");
    Client::connect(&d.addr, "pp-token-2", false).await;
    zk.ok(zaask_lead("Z2b")).await;

    // So is a file that does not parse; the daemon keeps serving.
    std::fs::write(&cfg, "listen = [unclosed").unwrap();
    unsafe_kill(pid, "HUP");
    wait_metric(&d, "rota_config_reloads_total", &[("result", "error")], 2.0);
    zk.ok(zaask_lead("Z3")).await;
    rotated.ok(json!({"type": "balance", "pro": "nobody"})).await;
    assert_eq!(d.metric_with("rota_config_reloads_total", &[("result", "ok")]), 1.0);
}

#[tokio::test(flavor = "current_thread")]
async fn a_reload_adds_a_tenant_that_is_served_at_once_and_kept_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tenants_config(dir.path(), "");
    let d = Daemon::start_with(dir.path(), &cfg);
    assert!(connect(&d.addr, "new-token", "rota.v1.json").await.is_err(), "not a tenant yet");
    let mut zk = Client::connect(&d.addr, "zk-token", false).await;
    zk.ok(zaask_pro("z1")).await;

    // The platform onboards a marketplace: its policy file and its entry, then SIGHUP.
    let policy = std::fs::read_to_string(dir.path().join("zaask.toml")).unwrap();
    std::fs::write(
        dir.path().join("newcomer.toml"),
        policy.replace("tenant = \"zaask\"", "tenant = \"newcomer\""),
    )
    .unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!(
            "{text}[[tenants]]\nid = \"newcomer\"\npolicy = \"newcomer.toml\"\n[[tenants.tokens]]\nsha256 = \"{}\"\nscopes = [\"ingest\", \"stream\", \"admin\"]\n",
            hash("new-token")
        ),
    )
    .unwrap();
    unsafe_kill(d.child.id(), "HUP");
    wait_metric(&d, "rota_config_reloads_total", &[("result", "ok")], 1.0);

    let mut nc = Client::connect(&d.addr, "new-token", false).await;
    let mut stream = Client::connect(&d.addr, "new-token", false).await;
    stream.ok(json!({"type": "subscribe"})).await;
    for p in ["n1", "n2"] {
        nc.ok(zaask_pro(p)).await;
        nc.ok(json!({"type": "grant_credits", "pro": p, "op": format!("pay-{p}"), "credits": 100})).await;
    }
    let lead = nc.ok(zaask_lead("N1")).await;
    assert_eq!(lead["offers"].as_array().unwrap().len(), 2, "its own pros only: {lead}");
    // Its stream: two grants, the lead accepted, two offers.
    let events = stream.events(5).await;
    let offered = events.iter().filter(|e| e["event"]["event"] == "offered").count();
    assert_eq!(offered, 2, "{events:?}");
    assert_eq!(d.metric_with("rota_leads_received_total", &[("tenant", "newcomer")]), 1.0);
    // Tenants stay apart: zaask sees none of it, and the newcomer none of zaask's.
    let other = zk.call(json!({"type": "explain", "lead": "N1"})).await.0;
    assert_eq!(other["code"], "unknown_lead", "{other}");
    let b = nc.ok(json!({"type": "balance", "pro": "z1"})).await;
    assert_eq!(b["granted"], 0, "{b}");

    // Its leads, money and stream are in the log and the snapshot like any tenant's.
    drop((nc, stream, zk));
    assert_eq!(d.stop(), 0);
    let d = Daemon::start_with(dir.path(), &cfg);
    let mut nc = Client::connect(&d.addr, "new-token", false).await;
    let ex = nc.ok(json!({"type": "explain", "lead": "N1"})).await;
    let offered = ex["entries"].as_array().unwrap().iter().filter(|e| e["outcome"] == "offered").count();
    assert_eq!(offered, 2, "{ex}");
    let b = nc.ok(json!({"type": "balance", "pro": "n1"})).await;
    assert_eq!(b["granted"], 100, "{b}");
    nc.ok(json!({"type": "subscribe", "resume_from": 0})).await;
    assert_eq!(nc.events(5).await, events, "the stream resumes from its start after the restart");
}

async fn respond_to_new_lead(zk: &mut Client, lead: &str, pro: &str) {
    zk.ok(zaask_lead(lead)).await;
    zk.ok(json!({"type": "offer", "lead": lead, "pro": pro, "action": "respond"})).await;
}

fn kill_9(d: Daemon) {
    unsafe_kill(d.child.id(), "KILL");
    let _ = d.wait_exit();
}

/// The zaask policy with a guarantee window of `days` days (R12).
fn set_guarantee_days(dir: &std::path::Path, days: i64) {
    let path = dir.join("zaask.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("guarantee_window_s"))
        .expect("zaask has a guarantee")
        .to_string();
    std::fs::write(&path, text.replace(&line, &format!("guarantee_window_s = {}", days * 24 * 3600)))
        .unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn r12_a_response_keeps_the_guarantee_of_the_policy_it_was_made_under_across_crashes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tenants_config(dir.path(), "");
    let d = Daemon::start_with(dir.path(), &cfg);
    let mut zk = zaask_with_pros(&d, &["z1", "z2"], 100).await;
    // Under the file's policy (7-day guarantee), z1 responds to Z1.
    respond_to_new_lead(&mut zk, "Z1", "z1").await;
    drop(zk);
    kill_9(d);

    // Changed while rota was down (1 day): z2 responds to Z2 under it.
    set_guarantee_days(dir.path(), 1);
    let d = Daemon::start_with(dir.path(), &cfg);
    let mut zk = Client::connect(&d.addr, "zk-token", false).await;
    respond_to_new_lead(&mut zk, "Z2", "z2").await;
    // Changed by a reload (3 days), then a crash before any snapshot: the log is
    // replayed from its start.
    set_guarantee_days(dir.path(), 3);
    unsafe_kill(d.child.id(), "HUP");
    wait_metric(&d, "rota_config_reloads_total", &[("result", "ok")], 1.0);
    drop(zk);
    kill_9(d);

    let d = Daemon::start_with(dir.path(), &cfg);
    let mut zk = Client::connect(&d.addr, "zk-token", false).await;
    // Day 2: z2's one-day guarantee has run out (never viewed: refunded); z1's has not.
    zk.ok(json!({"type": "advance_clock", "to_ms": T0 + 2 * 24 * HOUR})).await;
    assert_eq!(refunded(&mut zk, "z2").await, 40, "1-day guarantee of Z2");
    assert_eq!(refunded(&mut zk, "z1").await, 0);
    // Day 4: past the 3 days of the policy now in force, still within z1's 7.
    zk.ok(json!({"type": "advance_clock", "to_ms": T0 + 4 * 24 * HOUR})).await;
    assert_eq!(refunded(&mut zk, "z1").await, 0, "7-day guarantee of Z1");
    zk.ok(json!({"type": "advance_clock", "to_ms": T0 + 7 * 24 * HOUR + 60_000})).await;
    assert_eq!(refunded(&mut zk, "z1").await, 40);
}

#[tokio::test(flavor = "current_thread")]
async fn r12_the_policy_in_force_at_a_snapshot_replays_the_decisions_logged_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tenants_config(dir.path(), "");
    // A clean stop writes a snapshot (7-day guarantee in force).
    let d = Daemon::start_with(dir.path(), &cfg);
    let zk = zaask_with_pros(&d, &["z1"], 100).await;
    drop(zk);
    assert_eq!(d.stop(), 0);
    // The same policy: z1 responds after the snapshot, then a crash.
    let d = Daemon::start_with(dir.path(), &cfg);
    let mut zk = Client::connect(&d.addr, "zk-token", false).await;
    respond_to_new_lead(&mut zk, "Z1", "z1").await;
    drop(zk);
    kill_9(d);
    // Restarted with a one-day guarantee: the response replayed after the snapshot
    // keeps its seven days.
    set_guarantee_days(dir.path(), 1);
    let d = Daemon::start_with(dir.path(), &cfg);
    let mut zk = Client::connect(&d.addr, "zk-token", false).await;
    zk.ok(json!({"type": "advance_clock", "to_ms": T0 + 2 * 24 * HOUR})).await;
    assert_eq!(refunded(&mut zk, "z1").await, 0, "7-day guarantee");
    zk.ok(json!({"type": "advance_clock", "to_ms": T0 + 7 * 24 * HOUR + 60_000})).await;
    assert_eq!(refunded(&mut zk, "z1").await, 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn r6a_reloads_under_traffic_answer_every_request_and_each_lead_keeps_its_policys_offers() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tenants_config(dir.path(), "");
    let d = Daemon::start_with(dir.path(), &cfg);
    let zk = zaask_with_pros(&d, &["z1", "z2", "z3"], 1000).await;
    // Two clients publish without pause while the policy flips between releasing to
    // every pro and to one.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut publishers = Vec::new();
    for c in 0..2 {
        let (addr, stop) = (d.addr.clone(), stop.clone());
        publishers.push(tokio::spawn(async move {
            let mut client = Client::connect(&addr, "zk-token", false).await;
            let mut acked: Vec<(String, usize)> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let id = format!("R{c}-{}", acked.len());
                let out = client.ok(zaask_lead(&id)).await;
                acked.push((id, out["offers"].as_array().unwrap().len()));
            }
            acked
        }));
    }
    let policy = dir.path().join("zaask.toml");
    let all = std::fs::read_to_string(&policy).unwrap();
    let one = all.replace("offer_fanout = \"all\"", "offer_fanout = 1");
    for n in 1..=10 {
        std::fs::write(&policy, if n % 2 == 1 { &one } else { &all }).unwrap();
        unsafe_kill(d.child.id(), "HUP");
        wait_metric(&d, "rota_config_reloads_total", &[("result", "ok")], f64::from(n));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut acked = Vec::new();
    for p in publishers {
        acked.extend(p.await.expect("every publish was answered"));
    }
    let fanouts: std::collections::BTreeSet<usize> = acked.iter().map(|(_, n)| *n).collect();
    assert_eq!(fanouts, [1, 3].into(), "leads released under both policies");
    // A kill, then every acknowledged lead is there with the offers it was given.
    drop(zk);
    kill_9(d);
    let d = Daemon::start_with(dir.path(), &cfg);
    let mut zk = Client::connect(&d.addr, "zk-token", false).await;
    for (id, offers) in &acked {
        let ex = zk.ok(json!({"type": "explain", "lead": id})).await;
        let offered = ex["entries"].as_array().unwrap().iter().filter(|e| e["outcome"] == "offered").count();
        assert_eq!(offered, *offers, "lead {id}: {ex}");
    }
}
