//! Start-up: what the admin and websocket ports answer while the log is replayed.
//!
//! The daemon runs in this process (`rota::server::run_with`), its recovery held at a
//! gate the test opens, so "while recovering" is a state the test controls rather than
//! a race against a fast replay. One test per file: the daemon installs the process's
//! metrics recorder.

mod e2e_support;

use e2e_support::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Generous bound on every wait: a daemon that never gets there fails the test instead
/// of hanging it. Never an assertion about speed.
const DEADLINE: Duration = Duration::from_secs(60);

/// Sends `request` as is and reads the whole answer (the server closes).
fn http(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    let status =
        text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status: {text:?}"));
    (status, text)
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    http(addr, &format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"))
}

/// Both halves of a start run off the thread serving both ports: the replay of the
/// log, then spawning every shard and logging the policies that changed (a sync of the
/// log). Held at each in turn, the ports answer and say why. (One daemon per test
/// process: the metrics recorder is process-wide.)
#[test]
fn while_the_log_is_replayed_and_the_shards_start_the_ports_answer_and_say_why_then_the_daemon_serves() {
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
    let (open_second_gate, second_gate) = std::sync::mpsc::channel::<()>();
    let (reached_second, at_second) = std::sync::mpsc::channel::<()>();
    let (told, listening) = std::sync::mpsc::channel();
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let hooks = rota::server::Hooks {
        before_recovery: Some(Box::new(move || {
            let _ = gate.recv();
        })),
        before_start: Some(Box::new(move || {
            let _ = reached_second.send(());
            let _ = second_gate.recv();
        })),
        listening: Some(told),
        stop: Some(stopped),
    };
    let daemon = std::thread::spawn(move || rota::server::run_with(cfg, hooks));
    let (ws, admin) = listening.recv_timeout(DEADLINE).expect("both ports listen before the replay");

    // Recovering: alive, not ready, and the websocket port says so; first during the
    // replay, then while the shards start.
    let recovering = || {
        let (status, text) = get(admin, "/readyz");
        assert_eq!(status, 503, "{text}");
        assert!(text.ends_with("recovering\n"), "{text}");
        assert_eq!(get(admin, "/livez").0, 200);
        assert_eq!(get(admin, "/metrics").0, 200);
        let upgrade = "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                       Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
                       Sec-WebSocket-Protocol: rota.v1.json\r\nAuthorization: Bearer demo-token\r\n\r\n";
        let (status, text) = http(ws, upgrade);
        assert_eq!(status, 503, "{text}");
        assert!(text.contains("Retry-After: 1\r\n"), "{text}");
        assert!(text.ends_with("recovering its state from the log; retry shortly\n"), "{text}");
    };
    recovering();
    open_gate.send(()).unwrap();
    at_second.recv_timeout(DEADLINE).expect("the replay ends");
    recovering();

    // Recovery done: ready, and the same port now speaks the protocol.
    open_second_gate.send(()).unwrap();
    let since = Instant::now();
    while get(admin, "/readyz").0 != 200 {
        assert!(since.elapsed() < DEADLINE, "never ready");
        std::thread::sleep(Duration::from_millis(5));
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = Client::new(&ws.to_string(), false).await;
        let (reply, _) = c.call(json!({"type": "balance", "pro": "nobody"})).await;
        assert_eq!(reply["id"], "r1", "{reply}");
    });

    stop.send(()).unwrap();
    assert_eq!(daemon.join().unwrap().unwrap(), 0, "a clean stop");
}
