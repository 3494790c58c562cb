//! One connection's requests in flight (read, not answered yet) are bounded: requests
//! that wait inside rota rather than in the socket would otherwise keep the socket
//! drained, out of admission control's sight, and pile up as tasks. Beyond
//! `MAX_IN_FLIGHT_PER_CONNECTION`, a request is refused `overloaded`; every request
//! gets one reply.
//!
//! The daemon runs in this process on an in-memory disk whose syncs the test holds:
//! every request read waits in rota for its sync, so exactly those beyond the bound are
//! refused, not a number that depends on how fast the disk is. One test per file: the
//! daemon installs the process's metrics recorder.

mod e2e_support;
mod in_process;

use e2e_support::Client;
use futures_util::SinkExt;
use in_process::*;
use rota::server::ws::MAX_IN_FLIGHT_PER_CONNECTION;
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::Arc;
use tokio_tungstenite::tungstenite::Message;

#[test]
fn a_connection_pipelining_more_than_its_in_flight_bound_is_refused_beyond_it() {
    let dir = tempfile::tempdir().unwrap();
    // No other shedding: the gateway's backlog limits and the rate limits are off.
    let cfg = config(
        dir.path(),
        &[
            "wal.segment_bytes=8388608",
            "shed_backlog_bytes=0",
            "rate_limit_connection_per_s=0",
            "rate_limit_tenant_per_s=0",
        ],
    );
    let fs = rota::wal::MemFs::new();
    let (stop, hooks) = stop_hook();
    let seams = rota::server::Seams { fs: Some(Arc::new(fs.process_handle())), periodic: None };
    let d = InProcess::start(cfg, hooks, seams);
    d.wait_ready();
    let ws = d.ws;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let mut c = tokio::time::timeout(DEADLINE, Client::new(&ws.to_string(), false))
            .await
            .expect("a connection is accepted");
        let n = MAX_IN_FLIGHT_PER_CONNECTION + 2_000;
        let hold = fs.hold_syncs();
        for i in 0..n {
            let req = json!({"id": format!("g{i}"), "type": "grant_credits", "pro": "p1",
                             "op": format!("pay-{i}"), "credits": 1});
            c.ws.feed(Message::Text(req.to_string())).await.unwrap();
        }
        c.ws.flush().await.unwrap();
        // While the syncs are held, nothing is answered but the refusals: the requests
        // read after the first MAX_IN_FLIGHT_PER_CONNECTION.
        let mut refused = BTreeSet::new();
        while refused.len() < n - MAX_IN_FLIGHT_PER_CONNECTION {
            let v = c.recv().await;
            assert_eq!(v["code"], "overloaded", "only refusals while the syncs are held: {v}");
            assert!(v["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{v}");
            assert!(refused.insert(v["id"].as_str().unwrap().to_string()), "one reply per request: {v}");
        }
        let beyond: BTreeSet<String> = (MAX_IN_FLIGHT_PER_CONNECTION..n).map(|i| format!("g{i}")).collect();
        assert_eq!(refused, beyond, "exactly the requests beyond the bound are refused");

        drop(hold);
        let mut granted = BTreeSet::new();
        while granted.len() < MAX_IN_FLIGHT_PER_CONNECTION {
            let v = c.recv().await;
            assert_eq!(v["type"], "ok", "{v}");
            let id = v["id"].as_str().unwrap().to_string();
            assert!(!refused.contains(&id) && granted.insert(id), "one reply per request: {v}");
        }
        let (balance, _) = c.call(json!({"type": "balance", "pro": "p1"})).await;
        assert_eq!(
            balance["result"]["available"], MAX_IN_FLIGHT_PER_CONNECTION as u64,
            "the refused grants changed nothing: {balance}"
        );
    });

    stop.send(()).unwrap();
    let code = d.exited.recv_timeout(DEADLINE).expect("the daemon stops");
    assert_eq!(code, Ok(0), "a clean stop");
}
