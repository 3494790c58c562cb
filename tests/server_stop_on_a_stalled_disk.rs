//! A graceful stop whose final sync and snapshot stall on the disk: the admin port keeps
//! answering for the whole stop (`/readyz` 503 `stopping`, `/livez` 200, `/metrics`),
//! and a second signal ends the daemon at once with exit status 1.
//!
//! The daemon runs in this process on an in-memory disk whose syncs the test holds:
//! the stalled disk is a state the test controls, not a race. The first stop is the
//! test's seam; the second a real SIGTERM sent to this process (the daemon's handler,
//! installed before it tells where it listens, takes it).

mod in_process;

use in_process::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn while_a_stop_waits_for_a_stalled_disk_the_admin_port_answers_and_a_second_signal_ends_it() {
    let dir = tempfile::tempdir().unwrap();
    // The deadline far beyond the test: what ends this stop is the second signal.
    let cfg = config(
        dir.path(),
        &["wal.segment_bytes=1048576", "snapshot_interval_s=0", "shutdown_timeout_ms=3600000"],
    );
    let fs = rota::wal::MemFs::new();
    let (stop, hooks) = stop_hook();
    let seams = rota::server::Seams { fs: Some(Arc::new(fs.process_handle())), periodic: None };
    let d = InProcess::start(cfg, hooks, seams);
    d.wait_ready();
    let admin = d.admin;

    // The disk stalls; the stop's final sync and snapshot wait for it.
    let stall = fs.hold_syncs();
    stop.send(()).unwrap();
    let since = Instant::now();
    let text = loop {
        let (status, text) = get(admin, "/readyz");
        if status == 503 {
            break text;
        }
        assert_eq!(status, 200, "{text}");
        assert!(since.elapsed() < DEADLINE, "never stopping");
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(text.ends_with("stopping\n"), "{text}");
    let (status, text) = get(admin, "/livez");
    assert_eq!(status, 200, "{text}");
    assert_eq!(get(admin, "/metrics").0, 200);
    assert!(d.exited.try_recv().is_err(), "the stop cannot end while the disk holds its syncs");
    let (status, text) = get(admin, "/readyz");
    assert_eq!(status, 503, "still stopping: {text}");

    sigterm_self();
    let code =
        d.exited.recv_timeout(DEADLINE).expect("a second signal ends the daemon while the disk stalls");
    assert_eq!(code, Ok(1), "forced: exit 1");
    // The shutdown thread finishes in the background once the disk answers again.
    drop(stall);
}
