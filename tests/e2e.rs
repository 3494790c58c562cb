//! End to end: the real `rota` binary on 127.0.0.1:0, real websockets, both encodings,
//! a manual clock so a 30-minute head start takes milliseconds.

mod e2e_support;

use e2e_support::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

fn pro(id: &str) -> Value {
    json!({"id": id, "categories": ["painting"], "zones": ["bologna"], "quality": {"reviews": 3}})
}

fn lead(id: &str, direct: &[&str], created_at: i64) -> Value {
    json!({
        "id": id, "category": "painting", "zone": "bologna",
        "description": "Repaint a two-room flat in Bologna, walls and ceilings",
        "client": {"id": format!("client-{id}"), "name": "Anna Rossi", "phone": "+39 333 1234567",
                   "phone_verified": true, "contact": {"call": true, "chat": true}},
        "direct": direct, "created_at": created_at
    })
}

#[tokio::test(flavor = "current_thread")]
async fn r5_r6_direct_then_generic_after_head_start_caps_idempotency_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let mut ingest = Client::new(&d.addr, false).await;
    let mut stream = Client::new(&d.addr, true).await;
    let sub = stream.ok(json!({"type": "subscribe"})).await;
    assert_eq!(sub["subscribed"], true);

    for i in 1..=7 {
        ingest.ok(json!({"type": "upsert_pro", "pro": pro(&format!("p{i}"))})).await;
        ingest.ok(json!({"type": "grant_credits", "pro": format!("p{i}"), "op": format!("pay-{i}"), "credits": 100})).await;
    }
    // R5: two direct targets get the lead at once; R6: 5 - 2 = 3 generic slots.
    let l = lead("L1", &["p1", "p2"], T0);
    let out = ingest.ok(json!({"type": "publish_lead", "lead": l})).await;
    assert_eq!(out["status"], "accepted");
    assert_eq!(out["offers"].as_array().unwrap().len(), 2);
    assert_eq!(out["release_at"], json!(T0 + 30 * MIN));
    // R1: republish answers the same; a different payload with the same id is refused.
    let again = ingest.ok(json!({"type": "publish_lead", "lead": l})).await;
    assert_eq!(again, out);
    let mut changed = l.clone();
    changed["description"] = json!("Something else entirely, not the same job at all");
    let (r, _) = ingest.call(json!({"type": "publish_lead", "lead": changed})).await;
    assert_eq!(r["error"]["code"].as_str().or(r["code"].as_str()), Some("idempotency_conflict"), "{r}");

    // Stream: credits granted (7), lead accepted, two direct offers, with no PII (R8).
    let evs = stream.events(7 + 1 + 2).await;
    let offered: Vec<&Value> = evs.iter().filter(|e| e["event"]["event"] == "offered").collect();
    assert_eq!(offered.len(), 2);
    assert!(offered.iter().all(|e| e["event"]["kind"] == "direct"));
    assert!(!offered[0].to_string().contains("333 1234567"), "no phone before responding (R8)");
    let seqs: Vec<u64> = evs.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "per-tenant sequence without gaps: {seqs:?}");

    // 29 minutes: nothing released yet. 30 minutes: generic release to the other 5.
    ingest.ok(json!({"type": "advance_clock", "to_ms": T0 + 29 * MIN})).await;
    ingest.ok(json!({"type": "advance_clock", "to_ms": T0 + 30 * MIN})).await;
    let evs = stream.events(5).await;
    assert!(
        evs.iter().all(|e| e["event"]["event"] == "offered" && e["event"]["kind"] == "generic"),
        "{evs:?}"
    );

    // Three generic responders fit; the fourth gets lead_full.
    for p in ["p3", "p4", "p5"] {
        let v = ingest.ok(json!({"type": "offer", "lead": "L1", "pro": p, "action": "respond"})).await;
        assert_eq!(v["contact"]["phone"], "+39 333 1234567", "R8: phone revealed after responding");
    }
    let (r, _) = ingest.call(json!({"type": "offer", "lead": "L1", "pro": "p6", "action": "respond"})).await;
    assert_eq!(r["code"], "lead_full", "{r}");
    let bal = ingest.ok(json!({"type": "balance", "pro": "p3"})).await;
    assert_eq!(bal["available"], 90, "R9: the price (10 credits) was charged once");

    let last_seq = {
        // responded + credits charged, per responder; the third fills the generic seats,
        // so p6 and p7 are told their offers are inactive (R6).
        let evs = stream.events(3 * 2 + 2).await;
        let inactive: Vec<&str> = evs
            .iter()
            .filter(|e| e["event"]["event"] == "offer_status" && e["event"]["status"] == "inactive")
            .filter_map(|e| e["event"]["pro"].as_str())
            .collect();
        assert_eq!(inactive, ["p6", "p7"], "{evs:?}");
        evs.last().unwrap()["seq"].as_u64().unwrap()
    };
    drop(stream);
    drop(ingest);
    assert_eq!(d.stop(), 0, "graceful shutdown exits 0");

    // Restart: state, money and the stream cursor survive.
    let d = Daemon::start(dir.path());
    let mut ingest = Client::new(&d.addr, false).await;
    let bal = ingest.ok(json!({"type": "balance", "pro": "p3"})).await;
    assert_eq!(bal["available"], 90);
    let ex = ingest.ok(json!({"type": "explain", "lead": "L1"})).await;
    assert_eq!(ex["responders"], 3);
    let (r, _) = ingest.call(json!({"type": "offer", "lead": "L1", "pro": "p3", "action": "respond"})).await;
    assert_eq!(r["type"], "ok", "responding twice charges once: {r}");
    let bal = ingest.ok(json!({"type": "balance", "pro": "p3"})).await;
    assert_eq!(bal["available"], 90);
    let mut stream = Client::new(&d.addr, false).await;
    let sub = stream.ok(json!({"type": "subscribe", "resume_from": last_seq - 2})).await;
    assert_eq!(sub["next_seq"].as_u64().unwrap(), last_seq + 1);
    let evs = stream.events(2).await;
    assert_eq!(evs[0]["seq"].as_u64().unwrap(), last_seq - 1);
    assert_eq!(evs[1]["seq"].as_u64().unwrap(), last_seq);
    drop(d);
}

#[tokio::test(flavor = "current_thread")]
async fn r1_the_same_lead_id_in_another_zone_is_an_idempotency_conflict_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let mut ingest = Client::new(&d.addr, false).await;
    ingest.ok(json!({"type": "upsert_pro", "pro": pro("p1")})).await;
    let l = lead("Z1", &[], T0);
    let out = ingest.ok(json!({"type": "publish_lead", "lead": l})).await;
    assert_eq!(out["status"], "accepted");
    // Another zone is another shard: the shard alone cannot see the repeat.
    let before = ingest.ok(json!({"type": "explain", "lead": "Z1"})).await;
    let mut moved = l.clone();
    moved["zone"] = json!("milano");
    let (r, _) = ingest.call(json!({"type": "publish_lead", "lead": moved})).await;
    assert_eq!(r["error"]["code"].as_str().or(r["code"].as_str()), Some("idempotency_conflict"), "{r}");
    let after = ingest.ok(json!({"type": "explain", "lead": "Z1"})).await;
    assert_eq!(after, before, "the lead is still the one in bologna");
    // The original publish still answers the original result.
    let again = ingest.ok(json!({"type": "publish_lead", "lead": l})).await;
    assert_eq!(again, out);
}

#[tokio::test(flavor = "current_thread")]
async fn auth_and_subprotocol_are_checked_at_the_upgrade_and_bad_frames_get_specific_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let err = connect(&d.addr, "wrong-token", "rota.v1.json").await.unwrap_err().to_string();
    assert!(err.contains("401"), "{err}");
    let err = connect(&d.addr, "demo-token", "graphql-ws").await.unwrap_err().to_string();
    assert!(err.contains("400"), "{err}");

    let mut c = Client::new(&d.addr, false).await;
    c.ws.send(Message::Text("not json".to_string())).await.unwrap();
    let v = c.recv().await;
    assert_eq!(v["code"], "bad_frame");
    let (v, _) = c.call(json!({"type": "teleport"})).await;
    assert_eq!(v["code"], "unknown_message");
    let (v, _) = c.call(json!({"type": "publish_lead", "lead": {"id": ""}})).await;
    assert_eq!(v["code"], "invalid_field");
    let mut bad = lead("L9", &[], T0);
    bad["location"] = json!({"lat": 123.0, "lon": 0.0});
    let (v, _) = c.call(json!({"type": "publish_lead", "lead": bad})).await;
    assert_eq!(
        (v["code"].as_str(), v["field"].as_str()),
        (Some("invalid_field"), Some("lead.location.lat")),
        "{v}"
    );
    // The connection still works after all that.
    let ok = c.ok(json!({"type": "balance", "pro": "nobody"})).await;
    assert_eq!(ok["available"], 0);
}

#[tokio::test(flavor = "current_thread")]
async fn sigterm_closes_streams_with_1001_and_a_resume_cursor_then_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let mut ingest = Client::new(&d.addr, false).await;
    let mut stream = Client::new(&d.addr, false).await;
    stream.ok(json!({"type": "subscribe"})).await;
    ingest.ok(json!({"type": "grant_credits", "pro": "p1", "op": "pay-1", "credits": 5})).await;
    let ev = stream.events(1).await;
    let seq = ev[0]["seq"].as_u64().unwrap();
    unsafe_kill(d.child.id(), "TERM");
    let (code, reason) = stream.drain_until_close().await;
    assert_eq!(code, 1001, "{reason}");
    assert!(reason.contains(&format!("resume_from={seq}")), "{reason}");
    assert_eq!(d.wait_exit(), 0, "graceful shutdown exits 0");
}

#[tokio::test(flavor = "current_thread")]
async fn a_flooding_connection_is_rate_limited_with_a_retry_hint_and_others_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with_flags(dir.path(), &["rate_limit_connection_per_s=20"]);
    let mut flood = Client::new(&d.addr, false).await;
    let n = 200;
    for i in 0..n {
        // Half the frames start with `id` and `type` (refused from their head), half
        // with other keys first (`json!` sorts them: refused after a decode).
        let req = if i % 2 == 0 {
            format!(r#"{{"id":"f{i}","type":"balance","pro":"p1"}}"#)
        } else {
            json!({"id": format!("f{i}"), "type": "balance", "pro": "p1"}).to_string()
        };
        flood.ws.feed(Message::Text(req)).await.unwrap();
    }
    flood.ws.flush().await.unwrap();
    let (mut ok, mut limited) = (0, 0);
    let mut answered = std::collections::BTreeSet::new();
    while ok + limited < n {
        let v = flood.recv().await;
        let id = v["id"].as_str().unwrap_or_else(|| panic!("every reply names its request: {v}")).to_string();
        assert!(answered.insert(id.clone()), "one reply per request: {id} twice");
        if v["type"] == "ok" {
            ok += 1;
        } else {
            assert_eq!(v["code"], "rate_limited", "{v}");
            assert!(v["retry_after_ms"].as_u64().unwrap() >= 1);
            limited += 1;
        }
    }
    let sent: std::collections::BTreeSet<String> = (0..n).map(|i| format!("f{i}")).collect();
    assert_eq!(answered, sent, "each request answered under its own id");
    assert!(ok >= 1 && limited >= n / 2, "a 20/s bucket lets about 20 of {n} through: ok {ok}");
    // Another connection has its own budget.
    let mut other = Client::new(&d.addr, false).await;
    other.ok(json!({"type": "balance", "pro": "p1"})).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_lone_refusal_is_written_without_waiting_for_more_traffic() {
    // Refusals are fed unflushed to share writes under a flood; one with nothing after
    // it must still go out (within 1 ms), not with the next heartbeat two minutes on.
    // `recv` gives up after 20 s.
    let dir = tempfile::tempdir().unwrap();
    let flags =
        ["rate_limit_connection_per_s=1", "heartbeat_interval_ms=120000", "heartbeat_timeout_ms=240000"];
    let d = Daemon::start_with_flags(dir.path(), &flags);
    let mut c = Client::new(&d.addr, false).await;
    let mut refused = 0;
    for i in 0..4 {
        let req = json!({"id": format!("q{i}"), "type": "balance", "pro": "p1"});
        c.ws.send(Message::Text(req.to_string())).await.unwrap();
        let v = c.recv().await;
        assert_eq!(v["id"], format!("q{i}"), "{v}");
        if v["code"] == "rate_limited" {
            refused += 1;
        }
    }
    assert!(refused >= 2, "a 1/s bucket refuses most of four requests sent one after another: {refused}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_subscription_that_got_no_event_yet_reports_the_cursor_it_started_from() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let mut ingest = Client::new(&d.addr, false).await;
    ingest.ok(json!({"type": "grant_credits", "pro": "p1", "op": "pay-1", "credits": 5})).await;
    ingest.ok(json!({"type": "grant_credits", "pro": "p1", "op": "pay-2", "credits": 5})).await;
    // A live subscription and a resume with nothing to replay: neither receives an
    // event before the daemon stops, and each is told to resume after the last one.
    let mut live = Client::new(&d.addr, false).await;
    let next = live.ok(json!({"type": "subscribe"})).await["next_seq"].as_u64().unwrap();
    let mut resumed = Client::new(&d.addr, false).await;
    resumed.ok(json!({"type": "subscribe", "resume_from": next - 1})).await;
    unsafe_kill(d.child.id(), "TERM");
    for c in [&mut live, &mut resumed] {
        let (code, reason) = c.drain_until_close().await;
        assert_eq!(code, 1001, "{reason}");
        assert!(reason.ends_with(&format!("resume_from={}", next - 1)), "{reason}");
    }
    assert_eq!(d.wait_exit(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn frames_of_the_wrong_kind_count_against_the_rate_limit() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with_flags(dir.path(), &["rate_limit_connection_per_s=5"]);
    let mut c = Client::new(&d.addr, false).await;
    let n = 40;
    for _ in 0..n {
        c.ws.feed(Message::Binary(vec![0x80])).await.unwrap();
    }
    c.ws.flush().await.unwrap();
    let (mut bad, mut limited) = (0, 0);
    while bad + limited < n {
        let v = c.recv().await;
        match v["code"].as_str() {
            Some("bad_frame") => bad += 1,
            Some("rate_limited") => limited += 1,
            _ => panic!("{v}"),
        }
    }
    assert!(
        limited >= n / 2,
        "a 5/s bucket refuses most of {n} binary frames on a JSON connection: {bad} bad_frame"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn pipelined_changes_of_one_pro_past_the_tenants_bound_are_refused_overloaded_one_reply_each() {
    // Changes of one pro run one at a time, each after its own sync: pipelined by the
    // thousand, those beyond the tenant's bound on changes in flight are refused
    // `overloaded` at once instead of queueing. Every request gets one reply, and what
    // was accepted is done. (The connection's own bound on requests in flight:
    // `tests/server_connection_in_flight.rs`.)
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let mut c = Client::new(&d.addr, false).await;
    let n = rota::server::ws::MAX_IN_FLIGHT_PER_CONNECTION + 2_000;
    for i in 0..n {
        let req = json!({"id": format!("u{i}"), "type": "upsert_pro", "pro": pro("p1")});
        c.ws.feed(Message::Text(req.to_string())).await.unwrap();
    }
    c.ws.flush().await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    let mut refused = 0;
    while seen.len() < n {
        let v = c.recv().await;
        assert!(seen.insert(v["id"].as_str().unwrap().to_string()), "one reply per request: {v}");
        if v["type"] != "ok" {
            assert_eq!(v["code"], "overloaded", "{v}");
            assert!(v["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{v}");
            refused += 1;
        }
    }
    // Each admitted change waits for a sync of its own, one after another, while the
    // thousands behind it are read in milliseconds: some are past the bound.
    assert!(refused > 0, "{n} pipelined changes of one pro: some beyond the bound are refused");
    let bound = rota::engine::MAX_PRO_CHANGES_PER_TENANT;
    assert!(n - refused >= bound, "the first {bound} are admitted: {refused} of {n} refused");
    c.ok(json!({"type": "set_availability", "pro": "p1", "availability": {}})).await;
}

#[tokio::test(flavor = "current_thread")]
async fn a_connection_that_never_upgrades_is_closed_after_the_handshake_timeout() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with_flags(dir.path(), &["handshake_timeout_ms=200"]);
    let mut idle = tokio::net::TcpStream::connect(&d.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(std::time::Duration::from_secs(20), idle.read(&mut buf))
        .await
        .expect("the server closes an idle, never-upgraded connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without data");
    let mut c = Client::new(&d.addr, false).await;
    c.ok(json!({"type": "balance", "pro": "p1"})).await;
}

/// The `THP_enabled` line of `/proc/<pid>/status` (Linux 5.0+): 0 once the process
/// opted out of transparent huge pages.
#[cfg(unix)]
#[test]
fn an_environment_variable_that_is_not_utf8_does_not_stop_the_daemon() {
    use std::os::unix::ffi::OsStrExt;
    let bad = std::ffi::OsStr::from_bytes(b"caf\xe9");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rota"))
        .args(["config", "check", "--set", "arbiters=3"])
        .env("SOME_OTHER_TOOL", bad)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("arbiters = 3"), "{stdout}");
}

#[cfg(target_os = "linux")]
#[test]
fn a_listen_address_in_use_is_named_and_the_daemon_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_rota"))
        .args(["serve", "--data-dir", &dir.path().to_string_lossy(), "--listen", &addr])
        .args(["--set", "admin_listen=\"127.0.0.1:0\"", "--set", "log_level=\"warn\""])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&format!("cannot listen on {addr} (listen)")), "{stderr}");
}

fn thp_enabled(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("THP_enabled:"));
    line.expect("the kernel reports THP_enabled").split_whitespace().nth(1).unwrap().to_string()
}

#[cfg(target_os = "linux")]
#[test]
fn the_daemon_opts_out_of_transparent_huge_pages_unless_configured_to_allow_them() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    assert_eq!(thp_enabled(d.child.id()), "0", "default: huge pages off for the daemon");
    assert_eq!(d.stop(), 0);
    let d = Daemon::start_with_flags(dir.path(), &["transparent_huge_pages=true"]);
    assert_eq!(thp_enabled(d.child.id()), "1", "allowed: the daemon leaves the setting alone");
    assert_eq!(d.stop(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn a_batched_subscription_gets_the_same_events_in_fewer_frames_live_and_on_resume() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    for msgpack in [false, true] {
        let mut ingest = Client::new(&d.addr, msgpack).await;
        let mut single = Client::new(&d.addr, msgpack).await;
        let mut batched = Client::new(&d.addr, msgpack).await;
        let from = single.ok(json!({"type": "subscribe"})).await["next_seq"].as_u64().unwrap();
        batched.ok(json!({"type": "subscribe", "batch": true})).await;
        for p in ["p1", "p2", "p3"] {
            ingest.ok(json!({"type": "upsert_pro", "pro": pro(p)})).await;
            let op = format!("pay-{p}-{msgpack}");
            ingest.ok(json!({"type": "grant_credits", "pro": p, "op": op, "credits": 50})).await;
        }
        for i in 0..4 {
            let id = format!("B{i}-{msgpack}");
            let r = ingest.ok(json!({"type": "publish_lead", "lead": lead(&id, &[], T0)})).await;
            assert_eq!(r["status"], "accepted", "{r}");
        }
        // Each grant and each publish make events: as many as the stream has numbered
        // since `from` (a fresh subscription's `next_seq` says where it is).
        let mut probe = Client::new(&d.addr, msgpack).await;
        let next = probe.ok(json!({"type": "subscribe"})).await["next_seq"].as_u64().unwrap();
        let n = (next - from) as usize;
        assert!(n >= 7, "{n} events");
        let want = single.events(n).await;
        let (got, frames) = batched.batched_events(n).await;
        assert_eq!(got, want, "msgpack {msgpack}: same events, same order, same content");
        assert!(frames <= n, "{frames} frames for {n} events");
        // Resuming with `batch`: the backlog comes in `events` frames too.
        let mut resumed = Client::new(&d.addr, msgpack).await;
        // `resume_from` is the last seq seen: everything from `from` on.
        resumed.ok(json!({"type": "subscribe", "batch": true, "resume_from": from - 1})).await;
        let (again, frames) = resumed.batched_events(n).await;
        assert_eq!(again, want, "msgpack {msgpack}: the resumed backlog");
        assert!(frames < n, "a backlog of {n} events in {frames} frames");
    }
}

/// The stream's history on disk (`stream_spill_bytes`): a resume older than the
/// replay buffer gets every evicted event from disk, in order and unchanged, then the
/// buffer, then live events; the history survives a clean restart.
#[tokio::test(flavor = "current_thread")]
async fn a_resume_older_than_the_replay_buffer_is_served_from_disk_then_live_also_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["stream_retention_events=50"];
    let d = Daemon::start_with_flags(dir.path(), &flags);
    let mut ingest = Client::new(&d.addr, true).await;
    ingest.ok(json!({"type": "upsert_pro", "pro": pro("p1")})).await;
    for i in 0..400 {
        ingest.ok(json!({"type": "grant_credits", "pro": "p1", "op": format!("g{i}"), "credits": 1})).await;
    }
    let next =
        Client::new(&d.addr, true).await.ok(json!({"type": "subscribe"})).await["next_seq"].as_u64().unwrap();
    let n = (next - 1) as usize;
    assert!(n >= 400, "{n} events, eight times the buffer");
    let mut seen: Vec<Vec<Value>> = Vec::new();
    for (msgpack, batch) in [(false, false), (true, true), (false, true), (true, false)] {
        // Each round's live event adds one to what the next round resumes.
        let total = n + seen.len();
        let mut c = Client::new(&d.addr, msgpack).await;
        c.ok(json!({"type": "subscribe", "resume_from": 0, "batch": batch})).await;
        let events = if batch { c.batched_events(total).await.0 } else { c.events(total).await };
        let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(
            seqs,
            (1..=total as u64).collect::<Vec<_>>(),
            "msgpack {msgpack} batch {batch}: every event once, in order"
        );
        // Then live: the next event follows without a gap.
        let op = format!("live-{msgpack}-{batch}");
        ingest.ok(json!({"type": "grant_credits", "pro": "p1", "op": op, "credits": 1})).await;
        let live = if batch { c.batched_events(1).await.0 } else { c.events(1).await };
        assert_eq!(live[0]["seq"].as_u64(), Some(total as u64 + 1), "{}", live[0]);
        assert_eq!(live[0]["event"]["event"], "credits");
        seen.push(events[..n].to_vec());
    }
    assert_eq!(seen[0], seen[1], "the same events in both encodings");
    assert_eq!(d.stop(), 0);
    // After a clean restart the history is still there: the same events.
    let d = Daemon::start_with_flags(dir.path(), &flags);
    let mut c = Client::new(&d.addr, false).await;
    c.ok(json!({"type": "subscribe", "resume_from": 0})).await;
    assert_eq!(c.events(n + 4).await[..n], seen[0][..], "the history after a restart");
}

/// The stream history survives a kill -9. A snapshot taken after the events were
/// evicted holds only the buffer's last 50, and the log is compacted behind it, so
/// after the restart the older events exist only in the history on disk: a resume from
/// the start gets the same events as before the kill only if the history was kept.
#[tokio::test(flavor = "current_thread")]
async fn the_stream_history_survives_a_kill_and_a_resume_after_the_restart_gets_the_same_events() {
    let dir = tempfile::tempdir().unwrap();
    let mut d =
        Daemon::start_with_flags(dir.path(), &["stream_retention_events=50", "snapshot_interval_s=1"]);
    let mut ingest = Client::new(&d.addr, true).await;
    ingest.ok(json!({"type": "upsert_pro", "pro": pro("p1")})).await;
    for i in 0..300 {
        ingest.ok(json!({"type": "grant_credits", "pro": "p1", "op": format!("g{i}"), "credits": 1})).await;
    }
    let mut c = Client::new(&d.addr, false).await;
    c.ok(json!({"type": "subscribe", "resume_from": 0})).await;
    let before = c.events(300).await;
    // Wait until the 250 evicted events are on disk, then for a snapshot after that
    // (it covers every record: nothing is replayed after the restart).
    let root = dir.path().join("streams");
    let wal = dir.path().join("wal");
    let snapshots = || {
        std::fs::read_dir(&wal)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".snap"))
            .count()
    };
    let mut seen_on_disk_with = None;
    for attempt in 0.. {
        assert!(attempt < 1_000, "no history of 250 events followed by a snapshot");
        let report = rota::engine::spill::verify(&rota::wal::RealFs, &root).unwrap();
        let on_disk = report.first().and_then(|h| h.range) == Some((1, 250));
        match seen_on_disk_with {
            None if on_disk => seen_on_disk_with = Some(snapshots()),
            Some(n) if snapshots() > n => break,
            _ => {}
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    unsafe_kill(d.child.id(), "KILL");
    d.child.wait().unwrap();
    let d = Daemon::start_with_flags(dir.path(), &["stream_retention_events=50"]);
    let mut c = Client::new(&d.addr, false).await;
    c.ok(json!({"type": "subscribe", "resume_from": 0})).await;
    assert_eq!(c.events(300).await, before, "the same events after the kill");
}

/// A per-pro feed (`subscribe` with `pro`) resumed from the history on disk gets that
/// pro's events only, in order, then its live ones.
#[tokio::test(flavor = "current_thread")]
async fn a_per_pro_resume_from_the_history_on_disk_gets_only_that_pros_events() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with_flags(dir.path(), &["stream_retention_events=20"]);
    let mut ingest = Client::new(&d.addr, true).await;
    for p in ["p1", "p2"] {
        ingest.ok(json!({"type": "upsert_pro", "pro": pro(p)})).await;
    }
    for i in 0..100 {
        let p = if i % 2 == 0 { "p1" } else { "p2" };
        ingest.ok(json!({"type": "grant_credits", "pro": p, "op": format!("g{i}"), "credits": 1})).await;
    }
    let mut c = Client::new(&d.addr, false).await;
    c.ok(json!({"type": "subscribe", "resume_from": 0, "pro": "p2"})).await;
    let events = c.events(50).await;
    assert!(events.iter().all(|e| e["event"]["pro"] == "p2"), "only p2's events");
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order: {seqs:?}");
    assert!(seqs[0] < 80, "the oldest came from disk (the buffer holds the last 20): {seqs:?}");
    ingest.ok(json!({"type": "grant_credits", "pro": "p1", "op": "live-p1", "credits": 1})).await;
    ingest.ok(json!({"type": "grant_credits", "pro": "p2", "op": "live-p2", "credits": 1})).await;
    let live = c.events(1).await;
    assert_eq!((live[0]["event"]["pro"].as_str(), live[0]["seq"].as_u64()), (Some("p2"), Some(seqs[49] + 2)));
}

/// The history is bounded (`stream_spill_bytes`, oldest segments dropped first): a
/// resume older than what it keeps gets `resume_too_old` naming the oldest cursor,
/// and resuming from that cursor gets everything after it.
#[tokio::test(flavor = "current_thread")]
async fn a_resume_older_than_the_history_on_disk_is_refused_with_the_oldest_cursor_kept() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start_with_flags(dir.path(), &["stream_retention_events=50", "stream_spill_bytes=65536"]);
    let mut ingest = Client::new(&d.addr, true).await;
    ingest.ok(json!({"type": "upsert_pro", "pro": pro("p1")})).await;
    for i in 0..1_500 {
        ingest.ok(json!({"type": "grant_credits", "pro": "p1", "op": format!("g{i}"), "credits": 1})).await;
    }
    let next =
        Client::new(&d.addr, true).await.ok(json!({"type": "subscribe"})).await["next_seq"].as_u64().unwrap();
    // The writer may still be moving the last evictions to disk (dropping an old
    // segment, which can overtake a resume, 4008): ask until the cursor named is served.
    for attempt in 0.. {
        assert!(attempt < 50, "the oldest cursor named is never served");
        let mut c = Client::new(&d.addr, false).await;
        let (r, _) = c.call(json!({"type": "subscribe", "resume_from": 0})).await;
        assert_eq!(r["code"], "resume_too_old", "{r}");
        let msg = r["message"].as_str().unwrap().to_string();
        let oldest: u64 =
            msg.split_whitespace().nth(2).and_then(|w| w.parse().ok()).unwrap_or_else(|| panic!("{msg}"));
        assert!(oldest > 300 && oldest < next - 50, "{msg}: a history of 64 KiB, more than the buffer");
        let mut c = Client::new(&d.addr, false).await;
        let (r, _) = c.call(json!({"type": "subscribe", "resume_from": oldest - 1})).await;
        if r["type"] != "ok" {
            continue;
        }
        let events = match c.events_or_close((next - oldest) as usize).await {
            Ok(events) => events,
            Err((4008, reason)) if reason.contains("overtaken") => continue,
            Err(close) => panic!("closed while catching up: {close:?}"),
        };
        let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, (oldest..next).collect::<Vec<_>>());
        break;
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_batched_resume_of_more_than_a_frame_holds_comes_in_several_frames_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path());
    let mut ingest = Client::new(&d.addr, true).await;
    ingest.ok(json!({"type": "upsert_pro", "pro": pro("p1")})).await;
    // 1,100 grants: one `credits` event each, more than the 1,024 of one frame.
    for i in 0..1_100 {
        ingest.ok(json!({"type": "grant_credits", "pro": "p1", "op": format!("g{i}"), "credits": 1})).await;
    }
    let mut resumed = Client::new(&d.addr, true).await;
    resumed.ok(json!({"type": "subscribe", "batch": true, "resume_from": 0})).await;
    let (events, frames) = resumed.batched_events(1_100).await;
    assert!(frames >= 2, "1,100 events in {frames} frame(s)");
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=1_100).collect::<Vec<u64>>(), "every event once, in order");
    assert!(events.iter().all(|e| e["type"] == "event" && e["event"]["event"] == "credits"));
}
