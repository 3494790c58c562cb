//! A stop (SIGTERM, SIGINT) while the log is replayed ends the daemon at once, exit 0:
//! nothing was acknowledged yet, and the next start replays again.
//!
//! The stop is a real SIGTERM sent to this process: the daemon's handler, installed
//! before it tells where it listens, takes it.
//!
//! The daemon runs in this process, its replay held at a
//! gate that is never opened: "while recovering" is a state the test controls, and a
//! daemon that waited for the replay would never stop. One test per file: the daemon
//! installs the process's metrics recorder.

mod in_process;

use in_process::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[test]
fn a_stop_while_the_log_is_replayed_ends_the_daemon_at_once_without_waiting_for_the_replay() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &[]);
    let (open_gate, gate) = std::sync::mpsc::channel::<()>();
    let (at_gate, held) = std::sync::mpsc::channel::<()>();
    let replayed = Arc::new(AtomicBool::new(false));
    let hooks = rota::server::Hooks {
        before_recovery: Some(Box::new({
            let replayed = replayed.clone();
            move || {
                let _ = at_gate.send(());
                let _ = gate.recv();
                replayed.store(true, Ordering::SeqCst);
            }
        })),
        before_start: None,
        listening: None,
        stop: None,
    };
    let d = InProcess::start(cfg, hooks, rota::server::Seams::default());
    let admin = d.admin;
    held.recv_timeout(DEADLINE).expect("the replay reaches its gate");
    let (status, text) = get(admin, "/readyz");
    assert_eq!(status, 503, "{text}");
    assert!(text.ends_with("recovering\n"), "{text}");

    sigterm_self();
    let code = d.exited.recv_timeout(DEADLINE).expect("the daemon ends while its replay is still held");
    assert_eq!(code, Ok(0), "a stop while recovering exits 0");
    assert!(!replayed.load(Ordering::SeqCst), "it did not wait for the replay");
    // The replay stays held for the rest of this process, as the process's end would
    // cut it in `rota serve`.
    std::mem::forget(open_gate);
}
