//! Every decoder that reads bytes from outside never panics on random or mutated input:
//! the wire protocol (both encodings), WAL records, tenant policies, the config file and
//! WAL segment scanning. Each returns an error or a value; a panic fails the property.
//!
//! These stand in for coverage-guided fuzzing (cargo-fuzz needs a nightly toolchain);
//! mutating valid samples gets the inputs past the first byte checks.

mod engine_support;
mod wal_support;

use proptest::prelude::*;
use rota::protocol::{decode, Encoding};
use rota::wal::{Fs, MemFs, OpenMode, Wal};
use serde_json::json;
use std::path::Path;
use wal_support::*;

fn publish_json() -> Vec<u8> {
    json!({"id": "c1", "type": "publish_lead", "lead": {
        "id": "L1", "category": "painting", "zone": "bologna",
        "location": {"lat": 44.49, "lon": 11.34},
        "description": "Repaint a two-room flat, walls and ceilings",
        "details": {"rooms": "2"}, "attributes": ["x"], "direct": ["p1", "p2"], "kind": "match",
        "created_at": 1_764_000_000_000i64,
        "client": {"id": "c-9", "name": "Anna Rossi", "phone": "+39 333 1234567", "phone_verified": true,
                   "contact": {"call": true, "whatsapp": false, "chat": true}, "address": null, "pro_id": null}}})
    .to_string()
    .into_bytes()
}

fn publish_msgpack() -> Vec<u8> {
    let v: serde_json::Value = serde_json::from_slice(&publish_json()).unwrap();
    rmp_serde::to_vec_named(&v).unwrap()
}

fn repo_file(rel: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)).unwrap()
}

/// Overwrites, inserts and truncates: random edits of a valid sample.
fn mutate(mut b: Vec<u8>, edits: &[(usize, u8, u8)], cut: Option<usize>) -> Vec<u8> {
    for &(at, byte, how) in edits {
        if b.is_empty() {
            b.push(byte);
            continue;
        }
        let at = at % b.len();
        match how % 3 {
            0 => b[at] = byte,
            1 => b.insert(at, byte),
            _ => {
                b.remove(at);
            }
        }
    }
    if let Some(cut) = cut {
        let len = b.len();
        b.truncate(cut % (len + 1));
    }
    b
}

fn edits() -> impl Strategy<Value = Vec<(usize, u8, u8)>> {
    prop::collection::vec(any::<(usize, u8, u8)>(), 0..8)
}

/// A valid WAL segment holding a few records, as bytes.
fn valid_segment() -> (MemFs, std::path::PathBuf, Vec<u8>) {
    let fs = MemFs::new();
    let (wal, _) = Wal::open(small_cfg(MEM_DIR), as_dyn(&fs)).unwrap();
    for i in 1..=5u64 {
        wal.append_blocking(vec![(4, rmp_serde::to_vec_named(&json!({"lead": i})).unwrap())]).unwrap();
    }
    wal.shutdown().unwrap();
    let seg = segments(&fs, Path::new(MEM_DIR))[0].clone();
    let bytes = fs.file_bytes(&seg).unwrap();
    (fs, seg, bytes)
}

/// A stream history on disk of `n` events in small segments (all but the buffer's
/// last 10 events), and the events as published.
fn valid_history(n: u64) -> (std::sync::Arc<MemFs>, Vec<std::path::PathBuf>) {
    use rota::engine::hub::StreamHub;
    use rota::engine::spill::Spill;
    let fs = std::sync::Arc::new(MemFs::new());
    let spill = Spill::open(fs.clone(), Path::new("/h"), &rota::ids::TenantId::new("t"), 64 << 10, 100_000);
    let hub = StreamHub::with_spill(10, Some(spill.clone()));
    hub.publish((1..=n).map(history_event));
    spill.drain();
    let dir = Path::new("/h/t");
    let mut segs: Vec<_> =
        fs.list(dir).unwrap().into_iter().filter(|f| f.ends_with(".spill")).map(|f| dir.join(f)).collect();
    segs.sort();
    (fs, segs)
}

fn history_event(i: u64) -> rota::protocol::StreamEvent {
    rota::protocol::StreamEvent::LeadClosed { lead: rota::ids::LeadId::new(format!("L{i}")), at: i as i64 }
}

/// `PROPTEST_CASES` scales every property for a long run.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(1024), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn protocol_decode_never_panics_on_random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode(Encoding::Json, &bytes);
        let _ = decode(Encoding::Msgpack, &bytes);
    }

    #[test]
    fn protocol_decode_never_panics_on_mutated_requests(e in edits(), cut in any::<Option<usize>>()) {
        let _ = decode(Encoding::Json, &mutate(publish_json(), &e, cut));
        let _ = decode(Encoding::Msgpack, &mutate(publish_msgpack(), &e, cut));
    }

    #[test]
    fn wal_record_decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512), e in edits()) {
        let _ = rota::engine::record::decode(&bytes);
        let _ = rota::engine::record::decode(&mutate(publish_msgpack(), &e, None));
    }

    #[test]
    fn policy_from_toml_never_panics(e in edits(), cut in any::<Option<usize>>(), junk in ".{0,200}") {
        let text = mutate(repo_file("config/tenants/prontopro.toml"), &e, cut);
        let _ = rota::core::Policy::from_toml(&String::from_utf8_lossy(&text));
        let _ = rota::core::Policy::from_toml(&junk);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(64), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn config_load_never_panics_on_a_random_file_body(
        e in edits(), cut in any::<Option<usize>>(), junk in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rota.toml");
        for body in [mutate(repo_file("config/rota.toml"), &e, cut), junk.clone()] {
            std::fs::write(&path, &body).unwrap();
            let src = rota::config::Sources { file: Some(path.clone()), ..Default::default() };
            let _ = rota::config::Config::load(&src);
        }
    }

    /// The stream history's segments are read back at start and on resume: damage
    /// never panics and never serves a wrong event, only a shorter history.
    #[test]
    fn stream_history_never_serves_a_wrong_event_from_damaged_segments(
        which in any::<usize>(), e in edits(), cut in any::<Option<usize>>(),
    ) {
        let (fs, segs) = valid_history(600);
        prop_assume!(segs.len() >= 2);
        let seg = &segs[which % segs.len()];
        let damaged = mutate(fs.read(seg).unwrap(), &e, cut);
        let mut f = fs.open(seg, OpenMode::Create).unwrap();
        f.write_at(0, &damaged).unwrap();
        drop(f);
        let spill = rota::engine::spill::Spill::open(fs.clone(), Path::new("/h"), &rota::ids::TenantId::new("t"), 64 << 10, 100_000);
        let mut after = spill.oldest_kept().map_or(0, |o| o - 1);
        loop {
            match spill.read_after(after, 97, 1 << 20) {
                Ok(chunk) if chunk.is_empty() => break,
                Ok(chunk) => {
                    for o in &chunk {
                        prop_assert_eq!(o.seq, after + 1, "consecutive");
                        prop_assert_eq!(&o.event, &history_event(o.seq), "the event published with that seq");
                        after = o.seq;
                    }
                }
                Err(rota::engine::spill::Unserved::Lost(lost)) => match lost.oldest {
                    Some(o) if o > after + 1 => after = o - 1,
                    _ => break,
                },
                Err(e) => prop_assert!(false, "an intact in-memory disk is always readable: {:?}", e),
            }
        }
    }

    #[test]
    fn wal_verify_never_panics_on_a_damaged_segment(
        e in edits(), cut in any::<Option<usize>>(), junk in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let (fs, seg, bytes) = valid_segment();
        let damaged = mutate(bytes, &e, cut);
        let mut f = fs.open(&seg, OpenMode::Create).unwrap();
        f.write_at(0, &damaged).unwrap();
        drop(f);
        let _ = rota::wal::tools::verify(&fs, Path::new(MEM_DIR));
        // A segment of pure junk after the valid one, on the real filesystem.
        let dir = tempfile::tempdir().unwrap();
        let real = rota::wal::RealFs;
        let mut f = real.open(&dir.path().join(seg.file_name().unwrap()), OpenMode::Create).unwrap();
        f.write_at(0, &damaged).unwrap();
        drop(f);
        let mut f = real.open(&dir.path().join("00000000000000001000.wal"), OpenMode::Create).unwrap();
        f.write_at(0, &junk).unwrap();
        drop(f);
        let _ = rota::wal::tools::verify(&real, dir.path());
    }
}

/// The body of a real snapshot: two pros with credits, one with a top-up rule, leads
/// offered, responded to and declined, the stream's replay buffer and the policy.
fn snapshot_body() -> &'static [u8] {
    static BODY: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BODY.get_or_init(|| {
        let fs = MemFs::new();
        let flags = ["data_dir=\"/mem\"", "clock=\"manual\"", "manual_clock_start_ms=1764000000000"];
        let cfg = rota::config::Config::load(&rota::config::Sources {
            flags: flags.iter().map(|f| f.to_string()).collect(),
            ..Default::default()
        })
        .unwrap();
        engine_support::in_system(async {
            let (e, _) = rota::engine::Engine::start_with_fs(cfg, std::sync::Arc::new(fs.process_handle())).unwrap();
            let t = rota::ids::TenantId::new("demo");
            let mut requests = vec![];
            for p in ["p1", "p2"] {
                requests.push(json!({"type": "upsert_pro", "pro": {"id": p, "categories": ["painting"], "zones": ["bologna"]}}));
                requests.push(json!({"type": "grant_credits", "pro": p, "op": format!("pay-{p}"), "credits": 10_000}));
            }
            requests.push(json!({"type": "set_topup_rule", "pro": "p1", "rule": {"threshold_credits": 100, "amount_credits": 500}}));
            for i in 0..6 {
                let mut lead = serde_json::from_slice::<serde_json::Value>(&publish_json()).unwrap();
                lead["lead"]["id"] = json!(format!("L{i}"));
                lead["lead"]["direct"] = json!([]);
                lead["lead"]["kind"] = json!("match");
                lead["lead"]["client"]["id"] = json!(format!("client-{i}"));
                requests.push(lead);
            }
            requests.push(json!({"type": "offer", "lead": "L0", "pro": "p1", "action": "respond"}));
            requests.push(json!({"type": "offer", "lead": "L1", "pro": "p2", "action": "decline", "by": "pro"}));
            for r in requests {
                if let Err(err) = e.request(&t, engine_support::req(r.clone())).await {
                    panic!("{r} answered {err}");
                }
            }
            e.snapshot().unwrap();
        });
        let dir = Path::new("/mem/wal");
        let name = fs.list(dir).unwrap().into_iter().filter(|n| n.ends_with(".snap")).max().expect("a snapshot");
        let file = fs.read(&dir.join(name)).unwrap();
        rota::wal::decode_snapshot(&file).unwrap().1.to_vec()
    })
}

/// The sample is a real snapshot that restores with every invariant holding, so the
/// property below mutates something the restore accepts.
#[test]
fn a_real_snapshot_restores_with_its_invariants() {
    let body = snapshot_body();
    assert!(body.len() > 1_000, "the sample holds state: {} bytes", body.len());
    rota::engine::restore_snapshot_checked(body).unwrap();
    // The seed of the `engine_snapshot` fuzz target (fuzz/README.md).
    if let Ok(path) = std::env::var("ROTA_SNAPSHOT_SEED_OUT") {
        std::fs::write(path, body).unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(256), failure_persistence: None, ..ProptestConfig::default() })]

    /// A snapshot's body read back at start (its CRC passed, its bytes damaged all the
    /// same, or written by another build): refused or restored, never a panic.
    #[test]
    fn a_damaged_snapshot_body_is_refused_or_restored_never_a_panic(e in edits(), cut in any::<Option<usize>>()) {
        let _ = rota::engine::restore_snapshot_checked(&mutate(snapshot_body().to_vec(), &e, cut));
    }
}

/// The properties can fail: a decoder that panics is caught.
#[test]
#[should_panic(expected = "decoder panicked")]
fn a_panicking_decoder_is_caught() {
    let runner_cfg = ProptestConfig { cases: 16, failure_persistence: None, ..ProptestConfig::default() };
    let mut runner = proptest::test_runner::TestRunner::new(runner_cfg);
    let r = runner.run(&prop::collection::vec(any::<u8>(), 1..8), |b| {
        if b[0] < 255 {
            panic!("decoder panicked on {b:?}");
        }
        Ok(())
    });
    r.unwrap();
}
