//! The periodic engine work (order ticks, housekeeping, refund retries, the engine's
//! figures) can wait for the disk: a full log queue, the gate, the stream history's
//! lock. While it is stuck, the daemon still accepts connections and answers them, the
//! admin port still answers (`/livez`, `/readyz`, `/metrics`), and a stop still stops
//! it.
//!
//! The daemon runs in this process (`rota::server::run_with_seams`); the test's seam
//! in the periodic work blocks it for good at its first round, as a stalled disk would:
//! a state the test controls, not a race. One test per file: the daemon installs the
//! process's metrics recorder.

mod e2e_support;

use e2e_support::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
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
fn with_the_periodic_work_stuck_the_daemon_accepts_answers_reports_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let flags = vec![
        "listen=\"127.0.0.1:0\"".to_string(),
        "admin_listen=\"127.0.0.1:0\"".to_string(),
        format!("data_dir={:?}", dir.path().display().to_string()),
        "clock=\"manual\"".to_string(),
        format!("manual_clock_start_ms={T0}"),
        "log_level=\"warn\"".to_string(),
        "wal.segment_bytes=8388608".to_string(),
    ];
    let cfg = rota::config::Config::load(&rota::config::Sources { flags, ..Default::default() }).unwrap();
    let (stuck_tx, stuck) = std::sync::mpsc::channel::<()>();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (told, listening) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let hooks = rota::server::Hooks {
        before_recovery: None,
        before_start: None,
        listening: Some(told),
        stop: Some(stopped),
    };
    let seams = rota::server::Seams {
        fs: None,
        periodic: Some(Box::new(move || {
            let _ = stuck_tx.send(());
            let _ = released.recv();
        })),
    };
    let (exit_tx, exited) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = exit_tx.send(rota::server::run_with_seams(cfg, hooks, seams).map_err(|e| e.to_string()));
    });
    let (ws, admin) = listening.recv_timeout(DEADLINE).expect("both ports listen");
    stuck.recv_timeout(DEADLINE).expect("the periodic work runs once the daemon serves");

    // The periodic work is stuck from here on.
    let since = Instant::now();
    while get(admin, "/readyz").0 != 200 {
        assert!(since.elapsed() < DEADLINE, "never ready");
        std::thread::sleep(Duration::from_millis(5));
    }
    let (status, text) = get(admin, "/livez");
    assert_eq!(status, 200, "{text}");
    assert_eq!(get(admin, "/metrics").0, 200);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = tokio::time::timeout(DEADLINE, Client::new(&ws.to_string(), false))
            .await
            .expect("a connection is accepted");
        let (reply, _) = tokio::time::timeout(DEADLINE, c.call(json!({"type": "balance", "pro": "nobody"})))
            .await
            .expect("and answered");
        assert_eq!(reply["id"], "r1", "{reply}");
    });

    stop.send(()).unwrap();
    let code = exited.recv_timeout(DEADLINE).expect("a stop ends the daemon with its periodic work stuck");
    assert_eq!(code, Ok(0), "a clean stop");
    // The periodic work stays stuck for the rest of this process.
    std::mem::forget(release);
}
