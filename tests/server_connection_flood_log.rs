//! A flood of connections beyond `max_connections` is refused and counted
//! (`rota_overload_refusals_total{reason="connections_full"}`), but logged at most once
//! per interval with the number refused since the last line, not once per connection:
//! a connect flood must not flood the log.
//!
//! Runs the real binary and reads everything it logs.

mod e2e_support;

use e2e_support::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Generous bound on every wait: a daemon that never gets there fails the test instead
/// of hanging it. Never an assertion about speed.
const DEADLINE: Duration = Duration::from_secs(60);

/// Connections refused in the flood.
const FLOOD: usize = 40;

fn refusals(admin: &str) -> f64 {
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .find(|l| l.starts_with("rota_overload_refusals_total") && l.contains("reason=\"connections_full\""))
        .and_then(|l| l.rsplit_once(' ')?.1.trim().parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn a_connection_flood_beyond_the_limit_is_counted_whole_and_logged_in_a_few_lines() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_rota"))
        .arg("serve")
        .args(["--listen", "127.0.0.1:0", "--clock", "manual", "--data-dir"])
        .arg(dir.path())
        .args(["--set", &format!("manual_clock_start_ms={T0}")])
        .args(["--set", "admin_listen=\"127.0.0.1:0\"", "--set", "log_level=\"warn\""])
        .args(["--set", "wal.segment_bytes=8388608", "--set", "max_connections=1"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("the rota binary starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut admin, mut ws) = (None, None);
    while admin.is_none() || ws.is_none() {
        let line = lines.recv_timeout(DEADLINE).expect("rota prints where it listens");
        if let Some(rest) = line.split("metrics and health on http://").nth(1) {
            admin = rest.split('/').next().map(str::to_string);
        }
        if let Some(rest) = line.split("listening on ws://").nth(1) {
            ws = rest.split_whitespace().next().map(str::to_string);
        }
    }
    let (admin, ws) = (admin.unwrap(), ws.unwrap());

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // The one connection allowed, held open through the flood.
    let mut held = rt.block_on(Client::new(&ws, false));
    rt.block_on(held.ok(serde_json::json!({"type": "balance", "pro": "nobody"})));
    for _ in 0..FLOOD {
        let mut s = std::net::TcpStream::connect(&ws).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        // Refused: closed without a byte.
        let mut buf = [0u8; 16];
        assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
    }
    let since = Instant::now();
    while refusals(&admin) < FLOOD as f64 {
        assert!(since.elapsed() < DEADLINE, "refusals counted: {}", refusals(&admin));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(refusals(&admin), FLOOD as f64, "every refusal counted");
    drop(held);

    unsafe_kill(child.id(), "TERM");
    assert_eq!(child.wait().unwrap().code(), Some(0));
    reader.join().unwrap();
    let logged: Vec<String> = lines.try_iter().filter(|l| l.contains("connection limit reached")).collect();
    assert!(!logged.is_empty(), "the refusals are logged");
    // One line per `fdlimit::LOG_EVERY` (10 s) at most, however fast the flood comes:
    // a line for each connection would make as many lines as refusals.
    assert!(logged.len() < FLOOD, "{} lines for {FLOOD} refusals: {logged:#?}", logged.len());
    assert!(logged[0].contains("refused"), "{}", logged[0]);
}
