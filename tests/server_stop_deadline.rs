//! A graceful stop whose final sync and snapshot stall on the disk ends at
//! `shutdown_timeout_ms`, exit status 1, as documented (docs/OPERATIONS.md).
//!
//! The daemon runs in this process on an in-memory disk whose syncs the test holds:
//! the stalled disk is a state the test controls, not a race, and the stop cannot end
//! cleanly; what is checked is that it ends, and how.

mod in_process;

use in_process::*;
use std::sync::Arc;

#[test]
fn a_stop_whose_final_sync_stalls_on_the_disk_ends_at_the_deadline_with_exit_status_1() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &["wal.segment_bytes=1048576", "snapshot_interval_s=0", "shutdown_timeout_ms=200"],
    );
    let fs = rota::wal::MemFs::new();
    let (stop, hooks) = stop_hook();
    let seams = rota::server::Seams { fs: Some(Arc::new(fs.process_handle())), periodic: None };
    let d = InProcess::start(cfg, hooks, seams);
    d.wait_ready();

    // The disk stalls for the rest of the test: the final sync and snapshot never end.
    let stall = fs.hold_syncs();
    stop.send(()).unwrap();
    let code = d.exited.recv_timeout(DEADLINE).expect("the deadline ends a stop the disk holds up");
    assert_eq!(code, Ok(1), "past the deadline: exit 1");
    drop(stall);
}
