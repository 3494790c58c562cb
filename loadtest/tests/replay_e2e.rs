//! The load tool against the real daemon: a small generated trace replayed over
//! websockets, with every publish answered and no exactly-once violation.
//!
//! Needs the `rota` binary. `cargo test --workspace` builds it (the `rota` package's
//! own integration tests need it) before any test runs; `cargo test -p rota-loadtest`
//! alone does not, and then this test says so and skips.

use rota_loadtest::gen::{generate, GenConfig};
use rota_loadtest::replay::{self, ReplayConfig};
use rota_loadtest::schedule::Pacing;
use rota_loadtest::wire::{Encoding, Request};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

fn rota_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("CARGO_BIN_EXE_rota") {
        return Some(PathBuf::from(p));
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let p = target.join("debug/rota");
    p.exists().then_some(p)
}

struct Daemon {
    child: Child,
    addr: String,
}

impl Daemon {
    fn start(bin: &PathBuf, dir: &std::path::Path) -> Daemon {
        let mut child = Command::new(bin)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .args(["--set", "log_level=\"warn\"", "--set", "admin_listen=\"127.0.0.1:0\""])
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

#[test]
fn replay_of_a_small_trace_is_answered_and_delivered_exactly_once() {
    let Some(bin) = rota_binary() else {
        eprintln!(
            "SKIPPED: no rota binary; run `cargo test --workspace` (or `cargo build --bin rota`) first"
        );
        return;
    };
    let dir = tempfile::tempdir().expect("a temp dir");
    let d = Daemon::start(&bin, dir.path());
    let gen = GenConfig {
        seed: 42,
        leads: 300,
        lead_rate: 300.0,
        pros: 60,
        zones: 6,
        categories: 4,
        ..GenConfig::default()
    };
    let (records, stats) = generate(&gen);
    assert!(stats.mean_offers_per_lead > 1.0, "the trace offers leads to several pros: {stats:?}");
    // The stream batched in one encoding, one frame per event in the other.
    for (encoding, stream_batch) in [(Encoding::Msgpack, true), (Encoding::Json, false)] {
        let cfg = ReplayConfig {
            url: format!("ws://{}", d.addr),
            tokens: vec![(None, "demo-token".into())],
            connections: 2,
            // 300 leads at 200/s with the rest of the trace in proportion: about 3 s.
            pacing: Pacing::Rate(200.0),
            duration: None,
            encoding,
            drain: Duration::from_secs(10),
            batch: Duration::from_micros(200),
            run_tag: format!("it-{encoding:?}"),
            progress: false,
            interval: Duration::from_secs(1),
            allowed_hosts: vec![],
            threads: 1,
            skip_setup: false,
            record: None,
            stalled_subscribers: 0,
            stream_batch,
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
