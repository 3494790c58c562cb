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
mod in_process;

use e2e_support::Client;
use in_process::*;
use serde_json::json;

#[test]
fn with_the_periodic_work_stuck_the_daemon_accepts_answers_reports_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &["wal.segment_bytes=8388608"]);
    let (stuck_tx, stuck) = std::sync::mpsc::channel::<()>();
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (stop, hooks) = stop_hook();
    let seams = rota::server::Seams {
        fs: None,
        periodic: Some(Box::new(move || {
            let _ = stuck_tx.send(());
            let _ = released.recv();
        })),
    };
    let d = InProcess::start(cfg, hooks, seams);
    let (ws, admin) = (d.ws, d.admin);
    stuck.recv_timeout(DEADLINE).expect("the periodic work runs once the daemon serves");

    // The periodic work is stuck from here on.
    d.wait_ready();
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
    let code = d.exited.recv_timeout(DEADLINE).expect("a stop ends the daemon with its periodic work stuck");
    assert_eq!(code, Ok(0), "a clean stop");
    // The periodic work stays stuck for the rest of this process.
    std::mem::forget(release);
}
