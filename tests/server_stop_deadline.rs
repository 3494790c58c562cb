//! A graceful stop whose final sync and snapshot stall on the disk ends at
//! `shutdown_timeout_ms`, exit status 1, as documented (docs/OPERATIONS.md).
//!
//! The daemon runs in this process (`rota::server::run_with_seams`) on an in-memory
//! disk whose syncs the test holds: the stalled disk is a state the test controls, not
//! a race, and the stop cannot end cleanly; what is checked is that it ends, and how.
//! One test per file: the daemon installs the process's metrics recorder.

mod e2e_support;

use e2e_support::T0;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Generous bound on every wait: a daemon that never gets there fails the test instead
/// of hanging it. Never an assertion about speed.
const DEADLINE: Duration = Duration::from_secs(60);

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s =
        TcpStream::connect(addr).unwrap_or_else(|e| panic!("GET {path}: the admin port is closed: {e}"));
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    (out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status: {out:?}")), out)
}

#[test]
fn a_stop_whose_final_sync_stalls_on_the_disk_ends_at_the_deadline_with_exit_status_1() {
    let dir = tempfile::tempdir().unwrap();
    let flags = vec![
        "listen=\"127.0.0.1:0\"".to_string(),
        "admin_listen=\"127.0.0.1:0\"".to_string(),
        format!("data_dir={:?}", dir.path().display().to_string()),
        "clock=\"manual\"".to_string(),
        format!("manual_clock_start_ms={T0}"),
        "log_level=\"warn\"".to_string(),
        "wal.segment_bytes=1048576".to_string(),
        "snapshot_interval_s=0".to_string(),
        "shutdown_timeout_ms=200".to_string(),
    ];
    let cfg = rota::config::Config::load(&rota::config::Sources { flags, ..Default::default() }).unwrap();
    let fs = rota::wal::MemFs::new();
    let (told, listening) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let hooks = rota::server::Hooks {
        before_recovery: None,
        before_start: None,
        listening: Some(told),
        stop: Some(stopped),
    };
    let seams = rota::server::Seams { fs: Some(Arc::new(fs.process_handle())), periodic: None };
    let (exit_tx, exited) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = exit_tx.send(rota::server::run_with_seams(cfg, hooks, seams).map_err(|e| e.to_string()));
    });
    let (_, admin) = listening.recv_timeout(DEADLINE).expect("both ports listen");
    let since = Instant::now();
    while get(admin, "/readyz").0 != 200 {
        assert!(since.elapsed() < DEADLINE, "never ready");
        std::thread::sleep(Duration::from_millis(5));
    }

    // The disk stalls for the rest of the test: the final sync and snapshot never end.
    let stall = fs.hold_syncs();
    stop.send(()).unwrap();
    let code = exited.recv_timeout(DEADLINE).expect("the deadline ends a stop the disk holds up");
    assert_eq!(code, Ok(1), "past the deadline: exit 1");
    drop(stall);
}
