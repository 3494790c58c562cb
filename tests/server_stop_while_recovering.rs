//! A stop (SIGTERM, SIGINT) while the log is replayed ends the daemon at once, exit 0:
//! nothing was acknowledged yet, and the next start replays again.
//!
//! The stop is a real SIGTERM sent to this process: the daemon's handler, installed
//! before it tells where it listens, takes it.
//!
//! The daemon runs in this process (`rota::server::run_with`), its replay held at a
//! gate that is never opened: "while recovering" is a state the test controls, and a
//! daemon that waited for the replay would never stop. One test per file: the daemon
//! installs the process's metrics recorder.

mod e2e_support;

use e2e_support::T0;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Generous bound on every wait: a daemon that never gets there fails the test instead
/// of hanging it. Never an assertion about speed.
const DEADLINE: Duration = Duration::from_secs(60);

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    (out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status: {out:?}")), out)
}

#[test]
fn a_stop_while_the_log_is_replayed_ends_the_daemon_at_once_without_waiting_for_the_replay() {
    let dir = tempfile::tempdir().unwrap();
    let flags = vec![
        "listen=\"127.0.0.1:0\"".to_string(),
        "admin_listen=\"127.0.0.1:0\"".to_string(),
        format!("data_dir={:?}", dir.path().display().to_string()),
        "clock=\"manual\"".to_string(),
        format!("manual_clock_start_ms={T0}"),
        "log_level=\"warn\"".to_string(),
    ];
    let cfg = rota::config::Config::load(&rota::config::Sources { flags, ..Default::default() }).unwrap();
    let (open_gate, gate) = std::sync::mpsc::channel::<()>();
    let (at_gate, held) = std::sync::mpsc::channel::<()>();
    let replayed = Arc::new(AtomicBool::new(false));
    let (told, listening) = std::sync::mpsc::channel();
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
        listening: Some(told),
        stop: None,
    };
    let (exit_tx, exited) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = exit_tx.send(rota::server::run_with(cfg, hooks).map_err(|e| e.to_string()));
    });
    let (_, admin) = listening.recv_timeout(DEADLINE).expect("both ports listen before the replay");
    held.recv_timeout(DEADLINE).expect("the replay reaches its gate");
    let (status, text) = get(admin, "/readyz");
    assert_eq!(status, 503, "{text}");
    assert!(text.ends_with("recovering\n"), "{text}");

    // SAFETY: kill with this process's own id and a signal number; no memory passed.
    assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGTERM) }, 0);
    let code = exited.recv_timeout(DEADLINE).expect("the daemon ends while its replay is still held");
    assert_eq!(code, Ok(0), "a stop while recovering exits 0");
    assert!(!replayed.load(Ordering::SeqCst), "it did not wait for the replay");
    // The replay stays held for the rest of this process, as the process's end would
    // cut it in `rota serve`.
    std::mem::forget(open_gate);
}
