//! The load tool against the real daemon: a small generated trace replayed over
//! websockets, with every publish answered and no exactly-once violation.
//!
//! Needs the `rota` binary. `cargo test --workspace` builds it (the `rota` package's
//! own integration tests need it) before any test runs; `cargo test -p rota-loadtest`
//! alone does not, and then this test says so and skips.

use rota_loadtest::gen::{generate, GenConfig};
use rota_loadtest::replay::{self, ReplayConfig, Resubscribe};
use rota_loadtest::schedule::Pacing;
use rota_loadtest::wire::{Encoding, Request};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The daemon's binary; `None` (and a SKIPPED line) when it has not been built.
fn rota_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("CARGO_BIN_EXE_rota") {
        return Some(PathBuf::from(p));
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let p = target.join("debug/rota");
    if !p.exists() {
        eprintln!(
            "SKIPPED: no rota binary; run `cargo test --workspace` (or `cargo build --bin rota`) first"
        );
    }
    p.exists().then_some(p)
}

struct Daemon {
    child: Child,
    addr: String,
}

impl Daemon {
    /// `sets`: more `--set KEY=VALUE` overrides.
    fn start(bin: &PathBuf, dir: &std::path::Path, sets: &[&str]) -> Daemon {
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .args(["--set", "log_level=\"warn\"", "--set", "admin_listen=\"127.0.0.1:0\""])
            .args(sets.iter().flat_map(|s| ["--set", s]))
            .stderr(Stdio::piped())
            .spawn()
            .expect("the rota binary starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let mut lines = BufReader::new(stderr).lines();
        let addr = loop {
            let line =
                lines.next().expect("rota printed its address before exiting").expect("stderr is text");
            if let Some(rest) = line.split("listening on ws://").nth(1) {
                break rest.split_whitespace().next().expect("an address follows").to_string();
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Daemon { child, addr }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The replay settings of these tests against `d`: two connections, MessagePack, a
/// batched stream, no progress bar, a 10 s drain.
fn config(d: &Daemon, pacing: Pacing) -> ReplayConfig {
    ReplayConfig {
        connections: 2,
        encoding: Encoding::Msgpack,
        drain: Duration::from_secs(10),
        run_tag: "it".into(),
        ..ReplayConfig::new(format!("ws://{}", d.addr), "demo-token", pacing)
    }
}

/// 300 leads at 300/s over 60 pros in 6 zones x 4 categories.
fn small_trace(seed: u64) -> GenConfig {
    GenConfig {
        seed,
        leads: 300,
        lead_rate: 300.0,
        pros: 60,
        zones: 6,
        categories: 4,
        ..GenConfig::default()
    }
}

#[test]
fn replay_of_a_small_trace_is_answered_and_delivered_exactly_once() {
    let Some(bin) = rota_binary() else { return };
    let dir = tempfile::tempdir().expect("a temp dir");
    let d = Daemon::start(&bin, dir.path(), &[]);
    let (records, stats) = generate(&small_trace(42));
    assert!(stats.mean_offers_per_lead > 1.0, "the trace offers leads to several pros: {stats:?}");
    // The stream batched in one encoding, one frame per event in the other.
    for (encoding, stream_batch) in [(Encoding::Msgpack, true), (Encoding::Json, false)] {
        let cfg = ReplayConfig {
            // 300 leads at 1,000/s (0.3 s); the replies after the last lead keep their
            // trace distance (up to 15 s at the trace's 300 leads/s) scaled to this
            // rate: about 5 s in all (at 200/s it was 23 s per encoding).
            encoding,
            run_tag: format!("it-{encoding:?}"),
            stream_batch,
            ..config(&d, Pacing::Rate(1000.0))
        };
        let out = replay::run(&cfg, &records).expect("the replay runs");
        let s = &out.summary;
        let timed = records.len() as u64 - s.setup_records;
        assert_eq!(s.sent, timed, "{encoding:?}: every timed record sent");
        assert_eq!(s.missing_replies, 0, "{encoding:?}: every request got a reply: {s:#?}");
        assert_eq!(s.ack.count, 300, "{encoding:?}: every publish got a reply");
        assert_eq!(s.acks_accepted + s.acks_rejected, 300, "{encoding:?}: {:?}", s.errors_by_code);
        assert_eq!(s.violations.total(), 0, "{encoding:?}: {:#?}", s.violations);
        assert_eq!(s.stream_seq_gaps, 0);
        assert!(s.delivery.count > 0, "{encoding:?}: deliveries measured");
        // The daemon's share of every accepted ack: measured from the actual write,
        // so never above the corrected figure and never below zero.
        assert_eq!(s.ack_ok_service.count, s.ack_ok.count, "{encoding:?}: one service sample per ok ack");
        assert!(
            s.ack_ok_service.max <= s.ack_ok.max,
            "{encoding:?}: {:?} vs {:?}",
            s.ack_ok_service,
            s.ack_ok
        );
        assert!(s.ack_ok_service.p50 <= s.ack_ok.p50);
        let respond = records.iter().filter(|r| matches!(r.request, Request::Offer { .. })).count();
        assert!(respond > 0);
    }
}

/// `--warmup`: the leads of the first 0.1 s (then 0.3 s measured, at 1,000/s) are sent,
/// answered and checked exactly once, but left out of the latency histograms and the
/// rate.
#[test]
fn a_warm_up_is_sent_and_checked_but_left_out_of_the_figures() {
    let Some(bin) = rota_binary() else { return };
    let dir = tempfile::tempdir().expect("a temp dir");
    let d = Daemon::start(&bin, dir.path(), &["shed_backlog_bytes=0"]);
    let (records, _) = generate(&small_trace(5));
    let cfg = ReplayConfig {
        run_tag: "it-warm".into(),
        warmup: Duration::from_millis(100),
        // On top of the warm-up: 0.4 s of leads in all, the 300-lead trace and the first
        // 100 leads of its second lap.
        duration: Some(Duration::from_millis(300)),
        ..config(&d, Pacing::Rate(1000.0))
    };
    let out = replay::run(&cfg, &records).expect("the replay runs");
    let s = &out.summary;
    assert_eq!(
        s.acks_accepted + s.acks_rejected,
        400,
        "every lead answered and checked: {:?}",
        s.errors_by_code
    );
    assert_eq!(s.violations.total(), 0, "{:#?}", s.violations);
    assert_eq!(s.sent_leads, 400);
    // Leads are 1 ms apart: those intended in the first 100 ms are warm-up; the
    // measured time is the whole --duration.
    assert_eq!(s.ack.count, 300, "{s:#?}");
    assert!(s.delivery.count <= 300, "{:?}", s.delivery);
    assert!(s.send_lag.count < s.sent, "warm-up sends are not in the send lag either");
    assert_eq!(s.warmup_s, 0.1);
}

/// With a replay buffer of 200 events, a subscriber away for 0.6 s at about 850
/// events/s (50 leads/s) resumes from the stream history on disk: every resume must go
/// on at the last seq + 1, with every lead delivered once.
#[test]
fn resubscribing_streams_resume_from_the_history_without_gaps_or_duplicates() {
    let Some(bin) = rota_binary() else { return };
    let dir = tempfile::tempdir().expect("a temp dir");
    let d = Daemon::start(&bin, dir.path(), &["stream_retention_events=200"]);
    let gen = GenConfig {
        seed: 7,
        leads: 300,
        lead_rate: 100.0,
        pros: 60,
        zones: 4,
        categories: 3,
        ..GenConfig::default()
    };
    let (records, _) = generate(&gen);
    let cfg = ReplayConfig {
        // Departures at 1 s and 2 s.
        duration: Some(Duration::from_millis(2_500)),
        run_tag: "it-resub".into(),
        resubscribe: Some(Resubscribe { every: Duration::from_secs(1), away: Duration::from_millis(600) }),
        ..config(&d, Pacing::Rate(50.0))
    };
    let out = replay::run(&cfg, &records).expect("the replay runs");
    let s = &out.summary;
    let r = s.resubscribe.as_ref().expect("a resubscribe summary");
    assert_eq!((r.departures, r.resumes), (2, 2), "{r:#?}");
    assert_eq!(r.resumes_too_old, 0, "{r:#?}");
    assert_eq!(r.resume_failures, 0, "{r:#?}");
    assert_eq!(r.catch_ups_unfinished, 0, "{r:#?}");
    // More than the buffer holds: the catch-up came (partly) from the history on disk.
    assert!(r.catch_up_events_max > 200, "{r:#?}");
    assert_eq!(s.stream_seq_gaps, 0, "{r:#?}");
    assert!(!s.stream_closed_early);
    assert_eq!(s.missing_replies, 0, "{s:#?}");
    assert!(s.ack.count > 0 && s.acks_accepted > 0);
    assert_eq!(s.violations.total(), 0, "{:#?}", s.violations);
    assert!(r.delivery_outside_catch_up.count > 0 && r.delivery_outside_catch_up.count < s.delivery.count);
}

/// A platform does not respond to, decline or reply about a lead rota refused: the
/// tool skips the requests about a lead whose publish was answered with an error (here
/// one lead in three has an unknown `kind`, refused with `invalid_field`), and counts
/// them. Those sent before the refusal arrived are answered `unknown_lead`; together
/// they are every request about the refused leads.
#[test]
fn requests_about_a_refused_lead_are_not_sent() {
    let Some(bin) = rota_binary() else { return };
    let dir = tempfile::tempdir().expect("a temp dir");
    // No shedding: on a busy machine a shed lead would be refused too, and its requests
    // skipped, which the count below does not expect.
    let d = Daemon::start(&bin, dir.path(), &["shed_backlog_bytes=0"]);
    let gen = GenConfig { respond_share: 0.8, ..small_trace(11) };
    let (mut records, _) = generate(&gen);
    let mut refused = std::collections::HashSet::new();
    for (n, r) in records.iter_mut().filter(|r| matches!(r.request, Request::PublishLead { .. })).enumerate()
    {
        if let Request::PublishLead { lead } = &mut r.request {
            if n % 3 == 0 {
                lead.kind = "bogus".into();
                refused.insert(lead.id.clone());
            }
        }
    }
    let about_refused = records
        .iter()
        .filter(|r| matches!(&r.request, Request::Offer { lead, .. } if refused.contains(lead)))
        .count() as u64;
    assert!(about_refused > 20, "the trace acts on the refused leads: {about_refused}");
    let cfg = ReplayConfig { run_tag: "it-refused".into(), ..config(&d, Pacing::Rate(1000.0)) };
    let out = replay::run(&cfg, &records).expect("the replay runs");
    let s = &out.summary;
    let timed = records.len() as u64 - s.setup_records;
    assert_eq!(
        s.errors_by_code.get("invalid_field"),
        Some(&(refused.len() as u64)),
        "{:?}",
        s.errors_by_code
    );
    assert!(s.followups_skipped > 0, "{s:#?}");
    assert_eq!(s.sent + s.followups_skipped, timed, "every record sent or skipped");
    let unknown = s.errors_by_code.get("unknown_lead").copied().unwrap_or(0);
    assert_eq!(
        s.followups_skipped + unknown,
        about_refused,
        "skipped {}: {:?}",
        s.followups_skipped,
        s.errors_by_code
    );
    assert_eq!(s.missing_replies, 0, "{s:#?}");
    assert_eq!(s.violations.total(), 0, "{:#?}", s.violations);
}
