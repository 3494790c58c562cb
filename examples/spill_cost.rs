//! The stream history's cost per event on a real disk: N releases of five offers
//! published into a hub whose replay buffer holds 100,000 events (the default
//! `stream_retention_events`: evicted events are cold in the cache), the evicted ones
//! written by `Spill::drain` every 1,000 releases (the spill thread's 10 ms at
//! 100,000 leads/s), as the daemon does. Reports the CPU time (user + system) of
//! the drains alone, per event written, over several rounds.
//!
//! ```sh
//! cargo build --release --example spill_cost
//! target/release/examples/spill_cost 200000 /var/tmp/spill-cost   # releases, directory
//! ```

use rota::engine::hub::{Prepared, StreamHub};
use rota::engine::spill::Spill;
use rota::protocol::Encoding;
use rota::wal::{Fs, RealFs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[path = "support/release.rs"]
mod release;

/// CPU time of the calling thread (user + system).
fn thread_cpu() -> Duration {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_THREAD fills the struct passed.
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let root = PathBuf::from(args.get(2).cloned().unwrap_or_else(|| "/var/tmp/spill-cost".into()));
    let rounds: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(5);
    let summary = release::summary();
    let tenant = rota::ids::TenantId::new("acme");
    let mut per_event = Vec::new();
    for round in 0..rounds {
        let _ = std::fs::remove_dir_all(&root);
        let fs: Arc<dyn Fs> = Arc::new(RealFs);
        let spill = Spill::open(fs, &root, &tenant, 4 << 30, 1 << 20);
        let hub = StreamHub::with_spill(100_000, Some(spill.clone()));
        // A subscriber in MessagePack, as the history's frames are.
        let _sub = hub.subscribe(None, None, 1 << 30, Encoding::Msgpack).expect("subscribed");
        let mut drained = Duration::ZERO;
        let mut written = 0usize;
        for r in 0..n {
            let evs = release::offers(r, &summary);
            hub.publish(Prepared::batch(evs, &hub));
            if r % 1_000 == 999 {
                let t = thread_cpu();
                written += spill.drain();
                drained += thread_cpu() - t;
            }
        }
        let ns = drained.as_nanos() as f64 / written.max(1) as f64;
        println!(
            "round {round}: {written} events written, {} bytes, drain CPU {:.0} ns/event",
            spill.stats.bytes_written.load(std::sync::atomic::Ordering::Relaxed),
            ns
        );
        per_event.push(ns);
    }
    per_event.sort_by(f64::total_cmp);
    println!("median drain CPU per event: {:.0} ns", per_event[per_event.len() / 2]);
    let _ = std::fs::remove_dir_all(&root);
}
