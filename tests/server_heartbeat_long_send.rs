//! A subscriber that takes a resume's backlog, slowly, is alive: its pongs wait unread
//! behind the send, but the frames it takes prove it reads. It must not be closed 4000
//! (heartbeat timeout, no resume cursor) once the backlog is through.
//!
//! No sleep sets the pace. The subscriber reads nothing of a backlog far larger than
//! the socket buffers (so the daemon's send waits for it) until a second connection,
//! opened after the subscription and answering no ping, has been closed for its
//! heartbeat timeout: that close is the daemon's own word that more than
//! `heartbeat_timeout_ms` passed since the subscriber was last read from. Then it reads
//! everything, and asks something.

mod e2e_support;

use e2e_support::*;
use serde_json::json;
use std::io::{Read, Write};

/// A websocket connection made by hand, that never answers a ping: read raw until the
/// daemon closes it; returns what it sent.
fn silent_connection_until_closed(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(120))).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: rota.v1.json\r\nAuthorization: Bearer pp-token\r\n\r\n"
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if got.windows(b"heartbeat timeout".len()).any(|w| w == b"heartbeat timeout") {
                    break;
                }
            }
            Err(e) => panic!("the silent connection is closed for its heartbeat, not {e}"),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "current_thread")]
async fn a_subscriber_taking_a_long_backlog_is_not_closed_for_its_heartbeat() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tenants_config(
        dir.path(),
        "heartbeat_interval_ms = 200\nheartbeat_timeout_ms = 3000\nsend_timeout_ms = 600000",
    );
    let d = Daemon::start_with(dir.path(), &cfg);
    let mut c = Client::connect(&d.addr, "pp-token", true).await;
    publish_big_leads(&mut c, 1_200).await;
    let next = c.ok(json!({"type": "subscribe"})).await["next_seq"].as_u64().unwrap();
    drop(c);

    let mut slow = Client::connect(&d.addr, "pp-token", false).await;
    slow.ok(json!({"type": "subscribe", "resume_from": 0})).await;
    // Nothing more is read from `slow` until the silent connection, opened now, is
    // timed out.
    let addr = d.addr.clone();
    let closed = tokio::task::spawn_blocking(move || silent_connection_until_closed(&addr)).await.unwrap();
    assert!(closed.starts_with("HTTP/1.1 101"), "{closed}");
    assert!(closed.contains("heartbeat timeout"), "{closed}");

    let events = slow.events((next - 1) as usize).await;
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..next).collect::<Vec<_>>(), "the whole backlog, in order");
    // Still connected: answered, not closed 4000.
    let balance = slow.ok(json!({"type": "balance", "pro": "p1"})).await;
    assert!(balance.is_object(), "{balance}");
}
